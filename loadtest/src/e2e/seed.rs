//! Seeding through the backend: register the followers and the authors,
//! get every user a token, and make follower `u` follow author
//! `u % authors` ([`Audience::Followers`]), all over the HTTP API.
//!
//! Registering is the slow part: the backend hashes each password with
//! argon2id (tens of ms of a core each, a few at once). Tokens are minted
//! here with the shared `JWT_SECRET` exactly as the backend's `/login`
//! issues them (the contract's [`Tokens`]: HS256, `sub`, `iat`, `exp`),
//! which saves a second argon2 per user; without the secret every user
//! logs in.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use contract::token::Tokens;
use serde::Serialize;
use tokio::task::JoinSet;

use super::api::Api;
use crate::audience::Audience;

/// Seeding requests in flight at once: enough to keep the backend's
/// argon2 slots and database pool busy, few enough not to queue for
/// longer than the request timeout.
const SEED_IN_FLIGHT: usize = 32;
/// Attempts per seeding request: a blip (a 503 while the pool is busy,
/// a reset connection) should not end a run that took minutes to seed.
const SEED_ATTEMPTS: u32 = 3;
/// Pause before retrying a seeding request.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Minted tokens outlive any run.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The seeded users.
pub struct Seeded {
    /// Follower ids, index order: the devices' users.
    pub users: Vec<String>,
    /// One token per follower.
    pub tokens: Vec<String>,
    /// One token per author, author index order.
    pub author_tokens: Vec<String>,
    pub audience: Audience,
    pub times: Seeding,
}

/// What seeding did and how long it took (for the report).
#[derive(Debug, Clone, Serialize)]
pub struct Seeding {
    /// Followers plus authors registered.
    pub registered: u64,
    pub register_s: f64,
    /// `minted` (with the shared secret) or `login`.
    pub tokens: &'static str,
    pub tokens_s: f64,
    pub follows: u64,
    pub follow_s: f64,
    /// `http` (the API) or `bulk` (straight into PostgreSQL, see
    /// [`super::bulk`]).
    pub how: &'static str,
}

/// The number of authors so that each post reaches at least `fanout` of
/// `users` followers: follower `u` follows author `u % authors`.
pub fn authors_for(users: u32, fanout: u32) -> u32 {
    (users / fanout.clamp(1, users.max(1))).max(1)
}

/// Registers `users` followers and their authors (names: `prefix` and an
/// index), gets their tokens, makes the follows.
pub async fn seed(
    api: &Arc<Api>,
    users: u32,
    fanout: u32,
    prefix: &str,
    secret: Option<&str>,
    quiet: bool,
) -> anyhow::Result<Seeded> {
    let authors = authors_for(users, fanout);
    let total = (users + authors) as usize;
    let say = |s: String| {
        if !quiet {
            eprintln!("seeding: {s}");
        }
    };

    let t = Instant::now();
    let prefix: Arc<str> = prefix.into();
    let ids = each(total, {
        let (api, prefix) = (api.clone(), prefix.clone());
        move |i| {
            let (api, prefix) = (api.clone(), prefix.clone());
            // Followers are "<prefix> f<i>", authors "<prefix> a<i>".
            let second = if i < users as usize { format!("f{i}") } else { format!("a{}", i - users as usize) };
            async move { api.register(&prefix, &second).await }
        }
    })
    .await?;
    let register_s = t.elapsed().as_secs_f64();
    say(format!("{total} users registered ({users} followers, {authors} authors) in {register_s:.1}s"));

    let t = Instant::now();
    let (tokens, how): (Vec<String>, _) = match secret {
        Some(s) => {
            let minter = Tokens::new(s.as_bytes());
            (ids.iter().map(|id| minter.issue(id, TOKEN_TTL)).collect(), "minted")
        }
        None => {
            let ids = Arc::new(ids.clone());
            let api = api.clone();
            let tokens = each(total, move |i| {
                let (api, ids) = (api.clone(), ids.clone());
                async move { api.login(&ids[i]).await }
            })
            .await?;
            (tokens, "login")
        }
    };
    let tokens_s = t.elapsed().as_secs_f64();
    say(format!("{total} tokens {how} in {tokens_s:.1}s"));

    let t = Instant::now();
    let audience = Audience::Followers { users, authors };
    {
        let (ids, tokens) = (Arc::new(ids.clone()), Arc::new(tokens.clone()));
        let api = api.clone();
        each(users as usize, move |u| {
            let (api, ids, tokens) = (api.clone(), ids.clone(), tokens.clone());
            let author = &ids[users as usize + audience.author_of(u as u32) as usize];
            let author = author.clone();
            async move {
                api.follow(&tokens[u], &author)
                    .await
                    .map_err(|e| e.context("following (is --jwt-secret the backend's JWT_SECRET?)"))
            }
        })
        .await?;
    }
    let follow_s = t.elapsed().as_secs_f64();
    say(format!("{users} follows made in {follow_s:.1}s"));

    let mut users_ids = ids;
    let mut tokens = tokens;
    let author_tokens = tokens.split_off(users as usize);
    users_ids.truncate(users as usize);
    Ok(Seeded {
        users: users_ids,
        tokens,
        author_tokens,
        audience,
        times: Seeding {
            registered: total as u64,
            register_s,
            tokens: how,
            tokens_s,
            follows: u64::from(users),
            follow_s,
            how: "http",
        },
    })
}

/// Runs `f(i)` for every `i` in `0..n`, [`SEED_IN_FLIGHT`] at a time, each
/// tried up to [`SEED_ATTEMPTS`] times; the results in index order, or the
/// first error (the rest are then abandoned).
async fn each<T, F, Fut>(n: usize, f: F) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<T>> + Send,
    T: Send + 'static,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..SEED_IN_FLIGHT.min(n) {
        let (f, next) = (f.clone(), next.clone());
        set.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(done);
                }
                let mut attempt = 1;
                let t = loop {
                    match f(i).await {
                        Ok(t) => break t,
                        Err(e) if attempt >= SEED_ATTEMPTS => return Err(e),
                        Err(e) => tracing::debug!("seeding request {i} failed (attempt {attempt}): {e:#}"),
                    }
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                };
                done.push((i, t));
            }
        });
    }
    let mut all: Vec<Option<T>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        for (i, t) in r?? {
            all[i] = Some(t);
        }
    }
    Ok(all.into_iter().map(|t| t.expect("every index was done")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authors_give_each_post_at_least_fanout_followers() {
        for (users, fanout) in [(200, 50), (1000, 300), (20_000, 20_000), (10, 50), (7, 1), (1, 1)] {
            let authors = authors_for(users, fanout);
            let a = Audience::Followers { users, authors };
            let mut out = Vec::new();
            for seq in 0..authors {
                a.recipients(seq, &mut out);
                assert!(
                    out.len() >= fanout.min(users) as usize,
                    "{users} users, fanout {fanout}: {} followers",
                    out.len()
                );
            }
        }
        assert_eq!(authors_for(200, 50), 4);
        assert_eq!(authors_for(20_000, 20_000), 1);
    }

    #[tokio::test]
    async fn each_keeps_index_order_retries_and_stops_at_an_error() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let out = each(100, move |i| {
            let first = c.fetch_add(1, Ordering::Relaxed) == 0;
            async move { if first { anyhow::bail!("a blip") } else { Ok(i * 2) } }
        })
        .await
        .unwrap();
        assert_eq!(out, (0..100).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(calls.load(Ordering::Relaxed), 101, "the blip was retried once");
        let err = each(10, |i| async move { if i == 3 { anyhow::bail!("broken") } else { Ok(i) } }).await.unwrap_err();
        assert_eq!(err.to_string(), "broken");
    }
}
