//! `--mode e2e`: the whole path, through the backend. Users are registered
//! and follow their authors over the HTTP API ([`seed`]), the devices
//! connect to the gateways as in gateway mode, and posts are created with
//! `POST /post/create` at the target rate ([`poster`]); the backend fans
//! them out. Accounting is the gateway mode's: expected deliveries per
//! post are the connected devices of the author's followers when the post
//! is asked for, and what is missing is lost.
//!
//! Besides that, the report says how fast posts were created (HTTP) and
//! how many recipients the backend fanned them out to per second, from
//! its own counters read before and after.
//!
//! - [`api`]: the backend's HTTP API client.
//! - [`seed`]: register, tokens, follows; [`bulk`]: the same straight
//!   into PostgreSQL (`--seed-database`).
//! - [`poster`]: posts at a rate.
//! - [`celebrity`]: one author followed by everyone, one post
//!   (`--celebrity`).

pub mod api;
pub mod bulk;
pub mod celebrity;
pub mod poster;
pub mod seed;

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use crate::cli::RunArgs;
use crate::publisher::{Plan, Published};
use crate::report::LatencyMs;
use crate::run::Population;
use crate::series::Series;
use api::Api;
use celebrity::{Celebrity, CelebrityReport};
use hdrhistogram::Histogram;
use poster::Posts;
use seed::Seeding;

/// The backend's counters of what its fan-out did.
const FANOUT_RECIPIENTS: &str = "backend_fanout_recipients_total";
const EVENTS_PUBLISHED: &str = "backend_events_published_total";
/// The backend counts a fan-out's broker messages once their confirms are
/// in, which may be just after a device got them: the counters are read
/// until they stop moving, at most this long.
const COUNTERS_SETTLE: Duration = Duration::from_secs(3);
/// How often the counters are read while they settle.
const COUNTERS_POLL: Duration = Duration::from_millis(250);

/// The e2e part of the report.
#[derive(Debug, Serialize)]
pub struct E2eReport {
    pub backend_url: String,
    /// Users that post; follower `u` follows author `u % authors`.
    pub authors: u32,
    /// Followers of the author with the fewest and the most.
    pub followers_per_author: (u32, u32),
    pub seeding: Seeding,
    pub posts: PostsReport,
    pub backend: BackendFanout,
    /// Every acknowledged post looked up in every follower's feed (with
    /// --celebrity: in Redis, by the feed watch).
    pub feeds: FeedCheck,
    /// `--celebrity`: the one post's way to the devices and the feeds.
    pub celebrity: Option<CelebrityReport>,
}

/// What the devices received, for the e2e report.
pub struct Receipts<'a> {
    /// Unix micros of the last receipt at any device (0: none).
    pub last_us: u64,
    pub expected: u64,
    pub received: u64,
    /// Request (of the post) to receipt, microseconds.
    pub latency: &'a Histogram<u64>,
}

/// After the drain, each follower's feed (`GET /post/feed`, paged) must
/// hold every post the backend acknowledged for its author.
#[derive(Debug, Serialize, Default)]
pub struct FeedCheck {
    pub followers: u64,
    /// (post, follower) pairs looked for.
    pub expected: u64,
    /// Of those, not in the follower's feed.
    pub missing: u64,
    /// Followers whose feed could not be read (after retries).
    pub unreadable: u64,
    pub first_missing: Option<String>,
}

/// `POST /post/create` as the load generator saw it.
#[derive(Debug, Serialize)]
pub struct PostsReport {
    pub attempted: u64,
    pub created: u64,
    pub failed: u64,
    /// created / window_s.
    pub created_per_s: f64,
    /// First request's start to the last answer.
    pub window_s: f64,
    /// Request to answer, successful posts.
    pub latency_ms: LatencyMs,
    pub first_error: Option<String>,
}

/// The backend's own fan-out counters over the run: the increase of each
/// between just before the first post and after the last receipt.
#[derive(Debug, Serialize)]
pub struct BackendFanout {
    /// Increase of `backend_fanout_recipients_total`.
    pub fanout_recipients: u64,
    /// Increase of `backend_events_published_total` (broker messages).
    pub events_published: u64,
    /// First post request's start to the last receipt at any device.
    pub window_s: f64,
    /// fanout_recipients / window_s.
    pub fanout_recipients_per_s: f64,
    /// events_published / window_s.
    pub events_published_per_s: f64,
}

/// The backend's counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    recipients: f64,
    events: f64,
}

/// An e2e run's state on the coordinator, from seeding to the report.
pub struct Session {
    api: Arc<Api>,
    backend_url: String,
    author_tokens: Arc<Vec<String>>,
    authors: u32,
    followers_per_author: (u32, u32),
    seeding: Seeding,
    /// The counters just before the first post.
    before: Counters,
    /// Set once posting is over.
    posts: Option<Posts>,
    /// The followers' tokens (index = user index), for the feed check.
    follower_tokens: Arc<Vec<String>>,
    /// The followers' ids (index = user index).
    follower_ids: Arc<Vec<String>>,
    audience: crate::audience::Audience,
    redis_url: String,
    /// `--seed-database`: where the run's rows are deleted at the end.
    seed_database: Option<String>,
    /// Authors' ids, for that clean-up.
    author_ids: Vec<String>,
    /// `--celebrity`, once posted.
    celebrity: Option<Celebrity>,
    celebrity_mode: bool,
}

impl Session {
    /// Seeds the run's users through the backend: the population the
    /// workers connect (with the tokens), and the session that posts.
    pub async fn seed(args: &RunArgs) -> anyhow::Result<(Population, Session)> {
        let api = Arc::new(Api::new(&args.backend_url)?);
        // Fail in a second, not after minutes of seeding, when the backend is not there.
        Self::counters(&api)
            .await
            .map_err(|e| e.context(format!("the backend at {} does not answer", args.backend_url)))?;
        // A celebrity is followed by everyone: one author.
        let fanout = if args.celebrity { args.users } else { args.fanout };
        let (prefix, secret) = (&args.user_prefix, args.jwt_secret.as_deref());
        let s = match &args.seed_database {
            Some(db) => bulk::seed(db, args.users, fanout, prefix, secret, args.quiet).await?,
            None => seed::seed(&api, args.users, fanout, prefix, secret, args.quiet).await?,
        };
        let followers_per_author = followers_range(&s.audience, s.author_tokens.len() as u32);
        let follower_tokens = Arc::new(s.tokens.clone());
        let follower_ids = Arc::new(s.users.clone());
        // Bulk ids are "<prefix>-a<i>" (the HTTP path's ids come from the backend
        // and are only needed for the bulk clean-up).
        let author_ids = (0..s.author_tokens.len()).map(|i| format!("{prefix}-a{i}")).collect();
        let audience = s.audience;
        let population = Population { users: s.users, tokens: s.tokens, audience: s.audience };
        let session = Session {
            api,
            backend_url: args.backend_url.clone(),
            authors: s.author_tokens.len() as u32,
            author_tokens: Arc::new(s.author_tokens),
            followers_per_author,
            seeding: s.times,
            before: Counters::default(),
            posts: None,
            follower_tokens,
            follower_ids,
            audience,
            redis_url: args.redis_url.clone(),
            seed_database: args.seed_database.clone(),
            author_ids,
            celebrity: None,
            celebrity_mode: args.celebrity,
        };
        Ok((population, session))
    }

    /// Creates posts at `plan.rate` for `plan.duration` (see [`poster`]).
    pub async fn post(
        &mut self,
        plan: &Plan,
        connected: &[AtomicU32],
        series: &Mutex<Series>,
    ) -> anyhow::Result<Published> {
        self.before = Self::counters(&self.api).await?;
        let (published, posts) = if self.celebrity_mode {
            let (celebrity, published, posts) = Celebrity::post(
                &self.api,
                &self.author_tokens[0],
                plan,
                connected,
                self.follower_ids.clone(),
                &self.redis_url,
            )
            .await?;
            series.lock().add_published(contract::event::now_micros().div_ceil(1_000_000), 1);
            self.celebrity = Some(celebrity);
            (published, posts)
        } else {
            poster::run(&self.api, &self.author_tokens, plan, connected, series).await?
        };
        self.posts = Some(posts);
        Ok(published)
    }

    /// The e2e report, once the devices' receipts are known.
    pub async fn finish(mut self, receipts: Receipts<'_>) -> anyhow::Result<E2eReport> {
        let last_receipt_us = receipts.last_us;
        let after = match &self.posts {
            // Best effort: the backend may be down at the end of a fault
            // run, and the run's report matters more than these figures.
            Some(_) => self.settled_counters().await.unwrap_or_else(|e| {
                tracing::warn!("the backend's fan-out counters are unreadable at the end: {e:#}");
                self.before
            }),
            None => self.before,
        };
        let celebrity = match self.celebrity.take() {
            Some(c) => {
                let followers = self.follower_ids.len() as u64;
                Some(c.finish(&self.api, followers, receipts.expected, receipts.received, receipts.latency).await)
            }
            None => None,
        };
        let feeds = match (&self.posts, &celebrity) {
            // The feed watch looked in every follower's feed already.
            (Some(_), Some(c)) if !c.post_id.is_empty() => {
                let missing = c.followers - c.feeds_holding;
                FeedCheck {
                    followers: c.followers,
                    expected: c.followers,
                    missing,
                    unreadable: 0,
                    first_missing: (missing > 0).then(|| {
                        format!("{missing} feeds without post {} after {:?}", c.post_id, celebrity::WATCH_LIMIT)
                    }),
                }
            }
            (Some(p), _) => self.check_feeds(&p.created_ids).await,
            (None, _) => FeedCheck::default(),
        };
        if let Some(db) = &self.seed_database {
            let users: Vec<String> = self.follower_ids.iter().chain(&self.author_ids).cloned().collect();
            bulk::cleanup(db, &self.redis_url, &users).await;
        }
        let posts = self.posts.as_ref();
        let first_start_us = posts.map_or(0, |p| p.first_start_us);
        let window = |end_us: u64| {
            if first_start_us > 0 && end_us > first_start_us { (end_us - first_start_us) as f64 / 1e6 } else { 0.0 }
        };
        let per_s = |n: u64, w: f64| if w > 0.0 { n as f64 / w } else { 0.0 };
        let post_window = window(posts.map_or(0, |p| p.last_end_us));
        let fanout_window = window(last_receipt_us);
        let recipients = (after.recipients - self.before.recipients).max(0.0) as u64;
        let events = (after.events - self.before.events).max(0.0) as u64;
        Ok(E2eReport {
            backend_url: self.backend_url,
            authors: self.authors,
            followers_per_author: self.followers_per_author,
            seeding: self.seeding,
            posts: PostsReport {
                attempted: posts.map_or(0, |p| p.attempted),
                created: posts.map_or(0, |p| p.created),
                failed: posts.map_or(0, |p| p.failed),
                created_per_s: per_s(posts.map_or(0, |p| p.created), post_window),
                window_s: post_window,
                latency_ms: posts.map(|p| LatencyMs::from_micros(&p.latency)).unwrap_or_default(),
                first_error: posts.and_then(|p| p.first_error.clone()),
            },
            backend: BackendFanout {
                fanout_recipients: recipients,
                events_published: events,
                window_s: fanout_window,
                fanout_recipients_per_s: per_s(recipients, fanout_window),
                events_published_per_s: per_s(events, fanout_window),
            },
            feeds,
            celebrity,
        })
    }

    /// Looks every acknowledged post up in the feed of every follower of
    /// its author, [`FEED_CHECKS_IN_FLIGHT`] followers at a time.
    async fn check_feeds(&self, created: &[(u32, String)]) -> FeedCheck {
        let users = self.follower_tokens.len();
        let mut want: Vec<Vec<String>> = vec![Vec::new(); users];
        let mut out = Vec::new();
        for (seq, id) in created {
            self.audience.recipients(*seq, &mut out);
            for &u in &out {
                want[u].push(id.clone());
            }
        }
        let mut check = FeedCheck { followers: users as u64, ..FeedCheck::default() };
        check.expected = want.iter().map(|w| w.len() as u64).sum();
        let sem = Arc::new(tokio::sync::Semaphore::new(FEED_CHECKS_IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        for (u, want) in want.into_iter().enumerate() {
            if want.is_empty() {
                continue;
            }
            let (api, tokens, sem) = (self.api.clone(), self.follower_tokens.clone(), sem.clone());
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await.expect("never closed");
                let got = read_feed(&api, &tokens[u]).await;
                (u, want, got)
            });
        }
        while let Some(r) = tasks.join_next().await {
            let Ok((u, want, got)) = r else { continue };
            match got {
                Some(got) => {
                    let got: std::collections::HashSet<String> = got.into_iter().collect();
                    for id in want.iter().filter(|id| !got.contains(*id)) {
                        check.missing += 1;
                        check.first_missing.get_or_insert_with(|| format!("post {id} not in follower #{u}'s feed"));
                    }
                }
                None => {
                    check.unreadable += 1;
                    check.missing += want.len() as u64;
                }
            }
        }
        check
    }

    async fn counters(api: &Api) -> anyhow::Result<Counters> {
        Ok(Counters { recipients: api.metric(FANOUT_RECIPIENTS).await?, events: api.metric(EVENTS_PUBLISHED).await? })
    }

    /// The counters once two reads in a row agree (or after
    /// [`COUNTERS_SETTLE`]).
    async fn settled_counters(&self) -> anyhow::Result<Counters> {
        let deadline = tokio::time::Instant::now() + COUNTERS_SETTLE;
        let mut last = Self::counters(&self.api).await?;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(COUNTERS_POLL).await;
            let now = Self::counters(&self.api).await?;
            if now.recipients == last.recipients && now.events == last.events {
                break;
            }
            last = now;
        }
        Ok(last)
    }
}

impl E2eReport {
    pub fn print_summary(&self) {
        let p = &self.posts;
        let b = &self.backend;
        let s = &self.seeding;
        println!(
            "seeding       {} users registered ({}) in {:.1}s, tokens {} in {:.1}s, {} follows in {:.1}s ({} authors, {}-{} followers each)",
            s.registered,
            s.how,
            s.register_s,
            if s.tokens == "login" { "from login" } else { s.tokens },
            s.tokens_s,
            s.follows,
            s.follow_s,
            self.authors,
            self.followers_per_author.0,
            self.followers_per_author.1
        );
        println!(
            "posts (HTTP)  {} created  {} failed  = {:.1} posts/s over {:.2}s  latency ms p50 {:.2}  p99 {:.2}  max {:.2}",
            p.created, p.failed, p.created_per_s, p.window_s, p.latency_ms.p50, p.latency_ms.p99, p.latency_ms.max
        );
        if let Some(e) = &p.first_error {
            println!("post failure  {e}");
        }
        let f = &self.feeds;
        println!(
            "feeds         {} (post, follower) pairs looked up in {} followers' feeds: {} missing, {} feeds unreadable",
            f.expected, f.followers, f.missing, f.unreadable
        );
        if let Some(m) = &f.first_missing {
            println!("feed missing  {m}");
        }
        println!(
            "backend       {} recipients fanned out, {} broker messages = {:.0} recipients/s, {:.0} messages/s (first post to last receipt, {:.2}s)",
            b.fanout_recipients, b.events_published, b.fanout_recipients_per_s, b.events_published_per_s, b.window_s
        );
        if let Some(c) = &self.celebrity {
            let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
            println!(
                "celebrity     1 post to {} followers: {} of {} devices; ms from the POST: answer {:.0}, devices p50 {:.0}  p99 {:.0}  last {:.0} (target p99 <= {:.0}); all {} feeds {} ms (target <= {:.0}); backend job: realtime done {} ms, feeds done {} ms",
                c.followers,
                c.devices_received,
                c.devices_expected,
                c.post_answer_ms,
                c.device_ms.p50,
                c.device_ms.p99,
                c.device_ms.max,
                c.target_p99_device_ms,
                c.feeds_holding,
                opt(c.all_feeds_ms),
                c.target_all_feeds_ms,
                opt(c.backend_realtime_done_ms),
                opt(c.backend_feeds_done_ms),
            );
        }
    }
}

/// Followers' feeds read at once by the feed check.
const FEED_CHECKS_IN_FLIGHT: usize = 32;
/// The backend's largest feed page.
const FEED_PAGE: usize = 100;
/// A feed read that fails is tried again this many times (the backend may
/// be restarting at the end of a fault run).
const FEED_READ_TRIES: u32 = 5;

/// The ids in a follower's feed, paged until a short page (at most the
/// cache's 1,000); None when it cannot be read.
async fn read_feed(api: &Api, token: &str) -> Option<Vec<String>> {
    let mut ids = Vec::new();
    let mut offset = 0;
    loop {
        let mut page = None;
        for attempt in 0..FEED_READ_TRIES {
            match api.feed_page(token, offset, FEED_PAGE).await {
                Ok(p) => {
                    page = Some(p);
                    break;
                }
                Err(e) => {
                    tracing::warn!("feed check: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        let page = page?;
        let n = page.len();
        ids.extend(page);
        offset += n;
        if n < FEED_PAGE || offset >= 1000 {
            return Some(ids);
        }
    }
}

/// The fewest and the most followers any author has.
fn followers_range(audience: &crate::audience::Audience, authors: u32) -> (u32, u32) {
    let mut out = Vec::new();
    let counts = (0..authors).map(|a| {
        audience.recipients(a, &mut out);
        out.len() as u32
    });
    counts.fold((u32::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)))
}
