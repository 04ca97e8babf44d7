//! `--celebrity`: one author whom every user follows, one post through
//! the backend (`POST /post/create`), and how long it takes from that
//! request to the devices (p50, p99, the last) and until every
//! follower's cached feed in Redis holds it.
//!
//! Devices measure from the request's start (it is in the post's text,
//! as in every e2e run). The feeds are watched from outside, in Redis,
//! from the moment the backend answers: the followers not yet seen
//! holding the post are looked up [`WATCH_BATCH`] at a time, front to
//! back, and the watch starts again from the front after a batch with a
//! miss (the backend writes feeds in follower id order, so the front is
//! what comes next). Each follower is found once, so the watch costs
//! about one lookup per follower plus the misses at the front, which is
//! what it adds to Redis's load while the backend writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use contract::event;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::api::Api;
use super::poster::Posts;
use crate::accounting::new_histogram;
use crate::client::post_text;
use crate::publisher::{Plan, Published};
use crate::report::LatencyMs;

/// Followers looked up per Redis pipeline by the feed watch.
const WATCH_BATCH: usize = 2000;
/// Pause of the watch after a batch with a miss: the backend is still
/// writing; looking again at once would only load Redis.
const WATCH_PAUSE: Duration = Duration::from_millis(5);
/// The watch gives up this long after the post's request: a feed not
/// written by then is reported missing.
pub const WATCH_LIMIT: Duration = Duration::from_secs(60);
/// Receipts are counted in steps of this for the chart.
const CHART_STEP_US: u64 = 5_000;
/// The targets of issue 16.
pub const TARGET_P99_DEVICE_MS: f64 = 1000.0;
pub const TARGET_ALL_FEEDS_MS: f64 = 5000.0;
/// The backend's histogram of when each part of a create job ended.
const PART_METRIC: &str = "backend_fanout_part_seconds";

/// The celebrity part of the report.
#[derive(Debug, Serialize)]
pub struct CelebrityReport {
    pub followers: u64,
    pub post_id: String,
    /// Devices that should get the post (connected when it was asked for) and did.
    pub devices_expected: u64,
    pub devices_received: u64,
    /// `POST /post/create`: request to answer.
    pub post_answer_ms: f64,
    /// Request to receipt at each device.
    pub device_ms: LatencyMs,
    /// Request to the moment the watch had seen the post in every feed;
    /// none when some feed did not have it within [`WATCH_LIMIT`].
    pub all_feeds_ms: Option<f64>,
    pub feeds_holding: u64,
    /// When the backend's job parts ended, from its job start (its
    /// `backend_fanout_part_seconds`): realtime events confirmed by the
    /// broker, and feeds written.
    pub backend_realtime_done_ms: Option<f64>,
    pub backend_feeds_done_ms: Option<f64>,
    pub target_p99_device_ms: f64,
    pub target_all_feeds_ms: f64,
    /// (ms since the request, devices that have the post).
    pub receipts: Vec<(f64, u64)>,
    /// (ms since the request, feeds seen holding it).
    pub feeds: Vec<(f64, u64)>,
}

/// The post and the watch of its feeds, between posting and the report.
pub struct Celebrity {
    post_id: Option<String>,
    start_us: u64,
    answer_us: u64,
    watch: Option<tokio::task::JoinHandle<Watch>>,
    parts_before: Parts,
}

/// What the feed watch saw.
#[derive(Debug, Default)]
struct Watch {
    holding: u64,
    all_at_us: Option<u64>,
    samples: Vec<(f64, u64)>,
}

/// The sums and counts of the backend's part histogram.
#[derive(Debug, Clone, Copy, Default)]
struct Parts {
    realtime: (f64, f64),
    feeds: (f64, f64),
}

impl Celebrity {
    /// Posts once as `author_token` and starts watching the feeds of
    /// `followers` in Redis at `redis_url`. `connected[u]`: follower
    /// `u`'s connected devices, what the post should reach.
    pub async fn post(
        api: &Arc<Api>,
        author_token: &str,
        plan: &Plan,
        connected: &[AtomicU32],
        followers: Arc<Vec<String>>,
        redis_url: &str,
    ) -> anyhow::Result<(Celebrity, Published, Posts)> {
        let parts_before = parts(api).await;
        let expected: u32 = connected.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let clock = Instant::now();
        let start_us = event::now_micros();
        let result = api.create_post(author_token, &post_text(plan.run, 0, start_us)).await;
        let answer_us = event::now_micros();
        let mut latency = new_histogram();
        let (post_id, failed, first_error) = match result {
            Ok(id) => {
                latency.saturating_record(answer_us.saturating_sub(start_us).max(1));
                (Some(id), 0, None)
            }
            Err(e) => (None, 1, Some(format!("{e:#}"))),
        };
        let watch = post_id.clone().map(|id| {
            let url = redis_url.to_owned();
            tokio::spawn(async move { watch(&url, &followers, &id, start_us).await })
        });
        let published = Published {
            expected: vec![if post_id.is_some() { expected } else { 0 }],
            messages: 0,
            started_us: start_us,
            elapsed: clock.elapsed(),
            faults: Default::default(),
        };
        let posts = Posts {
            attempted: 1,
            created: 1 - failed,
            failed,
            latency,
            first_start_us: start_us,
            last_end_us: answer_us,
            first_error,
            created_ids: post_id.iter().map(|id| (0, id.clone())).collect(),
        };
        Ok((Celebrity { post_id, start_us, answer_us, watch, parts_before }, published, posts))
    }

    /// The report, once the devices' receipts are in: `latency` is their
    /// request-to-receipt histogram, `received` of `expected` arrived.
    pub async fn finish(
        self,
        api: &Api,
        followers: u64,
        expected: u64,
        received: u64,
        latency: &Histogram<u64>,
    ) -> CelebrityReport {
        let watch = match self.watch {
            Some(w) => w.await.unwrap_or_default(),
            None => Watch::default(),
        };
        let after = parts(api).await;
        let mean_ms = |(s0, c0): (f64, f64), (s1, c1): (f64, f64)| (c1 > c0).then(|| (s1 - s0) / (c1 - c0) * 1000.0);
        let ms = |us: u64| us.saturating_sub(self.start_us) as f64 / 1000.0;
        CelebrityReport {
            followers,
            post_id: self.post_id.unwrap_or_default(),
            devices_expected: expected,
            devices_received: received,
            post_answer_ms: ms(self.answer_us),
            device_ms: LatencyMs::from_micros(latency),
            all_feeds_ms: watch.all_at_us.map(ms),
            feeds_holding: watch.holding,
            backend_realtime_done_ms: mean_ms(self.parts_before.realtime, after.realtime),
            backend_feeds_done_ms: mean_ms(self.parts_before.feeds, after.feeds),
            target_p99_device_ms: TARGET_P99_DEVICE_MS,
            target_all_feeds_ms: TARGET_ALL_FEEDS_MS,
            receipts: receipts_curve(latency),
            feeds: watch.samples,
        }
    }
}

/// Cumulative receipts by ms since the request, from the devices'
/// latency histogram (microseconds), in steps of [`CHART_STEP_US`].
fn receipts_curve(latency: &Histogram<u64>) -> Vec<(f64, u64)> {
    if latency.is_empty() {
        return Vec::new();
    }
    let mut out = vec![(0.0, 0)];
    let mut total = 0;
    for v in latency.iter_linear(CHART_STEP_US) {
        total += v.count_since_last_iteration();
        out.push((v.value_iterated_to() as f64 / 1000.0, total));
    }
    out
}

/// Watches `followers`' feeds until each holds `post_id` or
/// [`WATCH_LIMIT`] after `start_us`.
async fn watch(redis_url: &str, followers: &[String], post_id: &str, start_us: u64) -> Watch {
    let mut w = Watch::default();
    let conn = async { redis::Client::open(redis_url)?.get_multiplexed_async_connection().await };
    let mut redis = match conn.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("celebrity: cannot watch the feeds in Redis: {e}");
            return w;
        }
    };
    let deadline = start_us + WATCH_LIMIT.as_micros() as u64;
    let mut missing: Vec<&String> = followers.iter().collect();
    while !missing.is_empty() && event::now_micros() < deadline {
        let n = WATCH_BATCH.min(missing.len());
        let mut pipe = redis::pipe();
        for f in &missing[..n] {
            pipe.zscore(contract::feedcache::feed_key(f), post_id);
        }
        let scores: Vec<Option<f64>> = match pipe.query_async(&mut redis).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("celebrity: feed watch: {e}");
                tokio::time::sleep(WATCH_PAUSE).await;
                continue;
            }
        };
        let now = event::now_micros();
        let mut found = 0;
        let mut i = 0;
        missing.retain(|_| {
            let keep = i >= n || scores[i].is_none();
            found += usize::from(i < n && !keep);
            i += 1;
            keep
        });
        if found > 0 {
            w.holding += found as u64;
            w.samples.push((now.saturating_sub(start_us) as f64 / 1000.0, w.holding));
        }
        if missing.is_empty() {
            w.all_at_us = Some(now);
        } else if found < n {
            tokio::time::sleep(WATCH_PAUSE).await;
        }
    }
    w
}

/// The backend's part histogram (sum, count) per part; zeros when unreadable.
async fn parts(api: &Api) -> Parts {
    let Ok(text) = api.metrics_text().await else { return Parts::default() };
    let get = |part: &str| {
        let value = |suffix: &str| {
            let prefix = format!("{PART_METRIC}_{suffix}{{part=\"{part}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
        };
        (value("sum"), value("count"))
    };
    Parts { realtime: get("realtime"), feeds: get("feeds") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receipts_curve_counts_every_receipt_once() {
        let mut h = new_histogram();
        for us in [1_000, 2_000, 12_000, 40_000, 40_001] {
            h.record(us).unwrap();
        }
        let curve = receipts_curve(&h);
        assert_eq!(curve.last().unwrap().1, 5);
        assert!(curve.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{curve:?}");
        assert!(receipts_curve(&new_histogram()).is_empty());
    }
}
