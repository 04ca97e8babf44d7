//! Who receives event `seq`: a rule both the publisher and the workers can
//! evaluate, so a worker knows, without being told, whether one of its
//! devices was meant to get an event. That is what lets every expected
//! (event, device) pair be accounted for across processes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Audience {
    /// Gateway mode: `fanout` users evenly spaced over all `users`,
    /// starting at a pseudo-random index derived from `seed` and `seq`.
    /// Distinct by construction, and membership is O(1).
    Spread { users: u32, fanout: u32, seed: u64 },
    /// e2e mode: event `seq` is a post by author `seq % authors`; user `u`
    /// follows author `u % authors`.
    Followers { users: u32, authors: u32 },
}

impl Audience {
    /// A spread of `fanout` of `users` (fanout is capped at users).
    pub fn spread(users: u32, fanout: u32, seed: u64) -> Audience {
        Audience::Spread { users, fanout: fanout.clamp(1, users.max(1)), seed }
    }

    /// The author of event `seq` in e2e mode (index into the authors).
    pub fn author_of(&self, seq: u32) -> u32 {
        match *self {
            Audience::Spread { .. } => 0,
            Audience::Followers { authors, .. } => seq % authors,
        }
    }

    /// Fills `out` with the user indexes that receive event `seq`.
    pub fn recipients(&self, seq: u32, out: &mut Vec<usize>) {
        out.clear();
        match *self {
            Audience::Spread { users, fanout, seed } => {
                let (n, step, start) = spread_params(users, fanout, seed, seq);
                out.extend((0..fanout as usize).map(|i| (start + i * step) % n));
            }
            Audience::Followers { users, authors } => {
                out.extend((self.author_of(seq) as usize..users as usize).step_by(authors as usize));
            }
        }
    }

    /// Whether user index `user` receives event `seq`.
    pub fn contains(&self, seq: u32, user: usize) -> bool {
        match *self {
            Audience::Spread { users, fanout, seed } => {
                let (n, step, start) = spread_params(users, fanout, seed, seq);
                if user >= n {
                    return false;
                }
                let d = (user + n - start) % n;
                d.is_multiple_of(step) && d / step < fanout as usize
            }
            Audience::Followers { users, authors } => {
                user < users as usize && user as u32 % authors == self.author_of(seq)
            }
        }
    }
}

/// (users, step, first index) of a spread event.
fn spread_params(users: u32, fanout: u32, seed: u64, seq: u32) -> (usize, usize, usize) {
    let n = users.max(1) as usize;
    let step = (n / fanout.max(1) as usize).max(1);
    let start = (splitmix64(seed ^ u64::from(seq)) % n as u64) as usize;
    (n, step, start)
}

/// A well-mixed hash of a counter: the choice of recipients needs to be
/// spread, not secret.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(a: Audience, users: usize) {
        let mut out = Vec::new();
        for seq in 0..200 {
            a.recipients(seq, &mut out);
            let mut sorted = out.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), out.len(), "recipients are distinct");
            for u in 0..users + 3 {
                assert_eq!(a.contains(seq, u), sorted.binary_search(&u).is_ok(), "{a:?} seq {seq} user {u}");
            }
        }
    }

    #[test]
    fn spread_recipients_are_distinct_and_contains_agrees() {
        for (n, k) in [(10, 10), (10, 3), (1000, 250), (5, 1), (7, 50)] {
            let a = Audience::spread(n, k, 42);
            let mut out = Vec::new();
            a.recipients(3, &mut out);
            assert_eq!(out.len(), k.min(n) as usize);
            check(a, n as usize);
        }
    }

    #[test]
    fn followers_are_the_users_of_the_authors_residue() {
        let a = Audience::Followers { users: 10, authors: 3 };
        let mut out = Vec::new();
        a.recipients(4, &mut out); // author 1
        assert_eq!(out, [1, 4, 7]);
        check(a, 10);
    }
}
