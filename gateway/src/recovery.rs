//! `?since=` recovery, bounded so that one user's reconnect storm cannot
//! take the node's memory or its Redis link from everybody else.
//!
//! - A replay is at most `max_replay` events, the newest ones: a device
//!   further behind first gets a `recovery_cut` frame saying how many older
//!   events were left out, so it can read them with `GET /post/feed`.
//! - Devices of one user that ask for the same `since` while a read is
//!   queued share that one read, and its encoded frames (one `Bytes` per
//!   event for all of them). Reads for one (user, since) run one at a time,
//!   so a storm of N devices costs at most two reads, not N.
//! - At most `max_recoveries` reads run at once per node; the others wait
//!   their turn (up to `QUEUE_TIMEOUT`) instead of failing.
//! - Each read is bounded by `READ_TIMEOUT`, and the Redis client's own
//!   response timeout is set to the same value (`Gateway::redis`), so the
//!   two never disagree.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{OnceCell, Semaphore};

use crate::frame;
use crate::state::Gateway;

/// Reading the feed page for a replay must take less than this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Waiting for a turn to read (behind other recoveries) at most this long;
/// beyond it the device is closed with 1011 to retry later.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// `replay` with the late arrivals kept for `user` (see `late`) that it
/// does not hold, whatever their id: one may be older than `since` because
/// it came by a detour while a newer one came straight. In id order.
fn with_late(gw: &Gateway, user: &str, replay: Arc<Replay>) -> Arc<Replay> {
    let late = gw.late.of(user);
    let mut extra: Vec<(String, Bytes)> =
        late.into_iter().filter(|(id, _)| !replay.events.iter().any(|(e, _)| e == id)).collect();
    if extra.is_empty() {
        return replay;
    }
    extra.extend(replay.events.iter().cloned());
    extra.sort_by(|a, b| a.0.cmp(&b.0));
    Arc::new(Replay { events: extra, cut: replay.cut.clone() })
}

/// One read of a feed page, encoded once for every device that shares it.
#[derive(Debug)]
pub struct Replay {
    /// Event frames, oldest first, with their ids.
    pub events: Vec<(String, Bytes)>,
    /// The `recovery_cut` frame when older events were left out.
    pub cut: Option<Bytes>,
}

/// Why a replay could not be made; the device gets 1011 and retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecoveryError {
    #[error("feed recovery unavailable, retry")]
    Unavailable,
    #[error("feed recovery timed out, retry")]
    TimedOut,
}

type Outcome = Result<Arc<Replay>, RecoveryError>;

#[derive(Default)]
struct Shared {
    result: OnceCell<Outcome>,
    /// Set when the read starts: a device registered after that point must
    /// not share it (it could miss what was published in between).
    started: AtomicBool,
}

#[derive(Default)]
struct PerKey {
    /// Reads of one (user, since) one at a time.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// The read not started yet, which newcomers join.
    waiting: Option<Arc<Shared>>,
}

pub struct Recoveries {
    permits: Semaphore,
    max_replay: usize,
    keys: Mutex<HashMap<(Arc<str>, String), PerKey>>,
}

impl Recoveries {
    pub fn new(max_concurrent: usize, max_replay: usize) -> Recoveries {
        Recoveries { permits: Semaphore::new(max_concurrent), max_replay, keys: Mutex::new(HashMap::new()) }
    }

    /// The replay for a device of `user` registered just now. Call only
    /// after the device is registered (so live events from here on reach it).
    pub async fn replay(&self, gw: &Gateway, user: &Arc<str>, since: &str) -> Outcome {
        let key = (user.clone(), since.to_owned());
        let (turn, shared) = {
            let mut keys = self.keys.lock();
            let k = keys.entry(key.clone()).or_default();
            let shared = match &k.waiting {
                Some(s) if !s.started.load(Ordering::SeqCst) => s.clone(),
                _ => {
                    let s = Arc::new(Shared::default());
                    k.waiting = Some(s.clone());
                    s
                }
            };
            (k.turn.clone(), shared)
        };
        let read = shared.result.get_or_init(|| async {
            let _turn = turn.lock().await;
            let Ok(_permit) = self.permits.acquire().await else { return Err(RecoveryError::Unavailable) };
            shared.started.store(true, Ordering::SeqCst);
            gw.metrics.recovery_reads.increment(1);
            match tokio::time::timeout(READ_TIMEOUT, self.read(gw, user, since)).await {
                Ok(Ok(replay)) => Ok(Arc::new(replay)),
                Ok(Err(e)) => {
                    tracing::warn!(user = %user, error = %e, "feed recovery failed");
                    Err(RecoveryError::Unavailable)
                }
                Err(_) => Err(RecoveryError::TimedOut),
            }
        });
        let outcome = match tokio::time::timeout(QUEUE_TIMEOUT, read).await {
            Ok(o) => o.clone().map(|r| with_late(gw, user, r)),
            Err(_) => Err(RecoveryError::TimedOut),
        };
        drop(turn);
        let mut keys = self.keys.lock();
        if let Some(k) = keys.get_mut(&key) {
            if k.waiting.as_ref().is_some_and(|w| Arc::ptr_eq(w, &shared) && w.result.initialized()) {
                k.waiting = None;
            }
            if k.waiting.is_none() && Arc::strong_count(&k.turn) == 1 {
                keys.remove(&key);
            }
        }
        outcome
    }

    async fn read(&self, gw: &Gateway, user: &str, since: &str) -> redis::RedisResult<Replay> {
        let mut conn = gw.redis().await?;
        let (events, skipped) = contract::feedcache::page_since(&mut conn, user, since, self.max_replay).await?;
        let cut = (skipped > 0).then(|| {
            let cut = serde_json::json!({
                "type": "recovery_cut",
                "since": since,
                "skipped": skipped,
                "first_id": events.first().map(|e| e.id.as_str()),
            });
            frame::text(cut.to_string().as_bytes())
        });
        let events = events
            .into_iter()
            .map(|e| {
                let bytes = frame::text(&serde_json::to_vec(&e).expect("events serialize"));
                (e.id, bytes)
            })
            .collect();
        Ok(Replay { events, cut })
    }
}
