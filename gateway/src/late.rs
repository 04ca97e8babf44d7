//! Late arrivals: events that reached this node by a detour (re-published
//! by a peer whose ring or publisher was stale, or drained from a departed
//! queue) for a user of this node who had no device here at that moment.
//!
//! Such an event can arrive *after* a newer event of the same user that
//! took the direct path. The loss this prevents (seen in the fault suite's
//! gateway hang): a device held by the old owner gets event N+1 directly,
//! N is still on its detour, the device is moved (4001) or its node fenced
//! (1001) and reconnects here with `since` = N+1, and N, which arrived here
//! while the device was between nodes, is older than `since`: neither the
//! live path nor the feed replay would give it to the device again.
//!
//! So each such event is kept for [`KEEP`] and added to the replay of a
//! device of that user that connects with `since` (see `recovery`),
//! whatever its id; a device that already had it drops the duplicate by id.
//! Only detoured events for absent users are kept, so in a stable ring
//! (nothing re-published) this holds nothing.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

/// How long a late arrival is kept: longer than a device takes to be moved
/// or fenced, find its new owner (which may not serve yet) and reconnect.
pub const KEEP: Duration = Duration::from_secs(30);
/// Most late arrivals kept at once (all users); the oldest go first.
pub const MAX_KEPT: usize = 100_000;
/// Most kept per user.
const MAX_PER_USER: usize = 64;

#[derive(Default)]
struct Inner {
    by_user: HashMap<String, VecDeque<(Instant, String, Bytes)>>,
    /// Every entry's user and id, oldest first, for expiry and the cap
    /// (an entry the per-user cap dropped already is skipped there).
    order: VecDeque<(Instant, String, String)>,
    /// Entries in `by_user`.
    kept: usize,
}

#[derive(Default)]
pub struct Late {
    inner: Mutex<Inner>,
}

impl Late {
    /// Keeps event `id` (its encoded frame) for `user`.
    pub fn keep(&self, user: &str, id: &str, frame: &Bytes) {
        let now = Instant::now();
        let mut g = self.inner.lock();
        expire(&mut g, now);
        let q = g.by_user.entry(user.to_owned()).or_default();
        if q.iter().any(|(_, i, _)| i == id) {
            return;
        }
        let full = q.len() >= MAX_PER_USER;
        if full {
            q.pop_front();
        }
        q.push_back((now, id.to_owned(), frame.clone()));
        g.kept += usize::from(!full);
        g.order.push_back((now, user.to_owned(), id.to_owned()));
        while g.kept > MAX_KEPT {
            let Some((_, u, i)) = g.order.pop_front() else { break };
            drop_entry(&mut g, &u, &i);
        }
    }

    /// The late arrivals kept for `user`: (id, frame), oldest first.
    pub fn of(&self, user: &str) -> Vec<(String, Bytes)> {
        let mut g = self.inner.lock();
        expire(&mut g, Instant::now());
        g.by_user.get(user).map_or_else(Vec::new, |q| q.iter().map(|(_, i, f)| (i.clone(), f.clone())).collect())
    }

    /// How many are kept now.
    pub fn len(&self) -> usize {
        self.inner.lock().kept
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn expire(g: &mut Inner, now: Instant) {
    while g.order.front().is_some_and(|(t, _, _)| now.duration_since(*t) >= KEEP) {
        let Some((_, u, i)) = g.order.pop_front() else { break };
        drop_entry(g, &u, &i);
    }
}

fn drop_entry(g: &mut Inner, user: &str, id: &str) {
    if let Some(q) = g.by_user.get_mut(user) {
        if let Some(at) = q.iter().position(|(_, i, _)| i == id) {
            q.remove(at);
            g.kept -= 1;
        }
        if q.is_empty() {
            g.by_user.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_per_user_once_and_bounded() {
        let late = Late::default();
        let f = Bytes::from_static(b"x");
        late.keep("u", "a", &f);
        late.keep("u", "a", &f);
        late.keep("u", "b", &f);
        late.keep("v", "c", &f);
        let ids: Vec<String> = late.of("u").into_iter().map(|(i, _)| i).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(late.len(), 3);
        for i in 0..MAX_PER_USER + 5 {
            late.keep("w", &format!("e{i:03}"), &f);
        }
        assert_eq!(late.of("w").len(), MAX_PER_USER);
        assert_eq!(late.of("w")[0].0, "e005");
        assert!(late.of("nobody").is_empty());
    }
}
