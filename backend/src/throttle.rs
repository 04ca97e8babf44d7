//! Failed-login throttling, per account and per client address: a token
//! bucket per key, drained by failed logins only and refilled with time.
//! A login is refused (429 with `Retry-After`) while either bucket is
//! empty, before any password is hashed, so a flood of guesses against one
//! account costs a few hashes, not the hashing capacity other users' logins
//! need. Successful logins take nothing, so one address (a load test, a
//! NAT) can log in any number of users.
//!
//! Per process and in memory: with N API replicas an attacker gets N
//! buckets, which is still a fixed rate. The maps are bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed logins an account may have in a burst...
pub const ACCOUNT_BURST: f64 = 5.0;
/// ...and then one per this long: 360 guesses an hour at most.
pub const ACCOUNT_REFILL: Duration = Duration::from_secs(10);
/// Failed logins (wrong password or unknown user) from one address in a
/// burst, then one per second: room for users who mistype, none for a
/// dictionary.
pub const ADDRESS_BURST: f64 = 20.0;
pub const ADDRESS_REFILL: Duration = Duration::from_secs(1);
/// Keys tracked per map. Full buckets carry no information and are pruned
/// first; beyond that new keys are not tracked (and logged), so memory is
/// bounded whatever an attacker sends.
pub const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One kind of key's buckets.
struct Buckets<K> {
    burst: f64,
    refill: Duration,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    fn new(burst: f64, refill: Duration) -> Self {
        Buckets { burst, refill, map: Mutex::new(HashMap::new()) }
    }

    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        (b.tokens + now.duration_since(b.at).as_secs_f64() / self.refill.as_secs_f64()).min(self.burst)
    }

    /// How long until `key` may try again, if it may not now.
    fn wait(&self, key: &K, now: Instant) -> Option<Duration> {
        let map = self.map.lock().expect("not poisoned");
        let b = map.get(key)?;
        let level = self.level(b, now);
        (level < 1.0).then(|| self.refill.mul_f64(1.0 - level))
    }

    fn give_back(&self, key: &K, now: Instant) {
        let mut map = self.map.lock().expect("not poisoned");
        if let Some(b) = map.get(key).copied() {
            let level = (self.level(&b, now) + 1.0).min(self.burst);
            map.insert(key.clone(), Bucket { tokens: level, at: now });
        }
    }

    fn take(&self, key: &K, now: Instant) {
        let mut map = self.map.lock().expect("not poisoned");
        if !map.contains_key(key) && map.len() >= MAX_TRACKED {
            map.retain(|_, b| {
                (b.tokens + now.duration_since(b.at).as_secs_f64() / self.refill.as_secs_f64()) < self.burst
            });
            if map.len() >= MAX_TRACKED {
                tracing::warn!(keys = MAX_TRACKED, "login throttle full: not tracking a new one");
                return;
            }
        }
        let level = map.get(key).map_or(self.burst, |b| self.level(b, now));
        map.insert(key.clone(), Bucket { tokens: (level - 1.0).max(0.0), at: now });
    }
}

pub struct LoginThrottle {
    accounts: Buckets<String>,
    addresses: Buckets<IpAddr>,
    /// `LOGIN_THROTTLE_PER_ADDRESS`: off when every client comes through
    /// one proxy address and throttling it would lock everyone out.
    per_address: bool,
}

impl LoginThrottle {
    pub fn new(per_address: bool) -> LoginThrottle {
        LoginThrottle {
            accounts: Buckets::new(ACCOUNT_BURST, ACCOUNT_REFILL),
            addresses: Buckets::new(ADDRESS_BURST, ADDRESS_REFILL),
            per_address,
        }
    }

    /// Starts a login attempt: `Err(wait)` when it must be refused, else
    /// the attempt is counted as a failure until [`LoginThrottle::succeeded`]
    /// or [`LoginThrottle::unknown_user`] says otherwise. Counting before
    /// the password is checked means concurrent guesses cannot all slip
    /// through while the first ones are still being hashed.
    pub fn begin(&self, account: &str, addr: Option<IpAddr>) -> Result<(), Duration> {
        let now = Instant::now();
        let account = account.to_owned();
        let by_account = self.accounts.wait(&account, now);
        let by_address = match addr {
            Some(a) if self.per_address => self.addresses.wait(&a, now),
            _ => None,
        };
        if let Some(wait) = by_account.max(by_address) {
            return Err(wait);
        }
        self.accounts.take(&account, now);
        if let (Some(a), true) = (addr, self.per_address) {
            self.addresses.take(&a, now);
        }
        Ok(())
    }

    /// The password was right: neither the account nor the address pays.
    pub fn succeeded(&self, account: &str, addr: Option<IpAddr>) {
        let now = Instant::now();
        self.accounts.give_back(&account.to_owned(), now);
        if let (Some(a), true) = (addr, self.per_address) {
            self.addresses.give_back(&a, now);
        }
    }

    /// There is no such account to protect (the address still pays).
    pub fn unknown_user(&self, account: &str) {
        self.accounts.map.lock().expect("not poisoned").remove(account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_refused_after_its_burst_and_others_are_not() {
        let t = LoginThrottle::new(true);
        let ip: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
        for _ in 0..ACCOUNT_BURST as usize {
            assert!(t.begin("a", ip).is_ok());
        }
        let wait = t.begin("a", ip).expect_err("refused");
        assert!(wait > Duration::ZERO && wait <= ACCOUNT_REFILL, "{wait:?}");
        assert!(t.begin("b", Some("10.0.0.2".parse().unwrap())).is_ok());
    }

    #[test]
    fn an_address_is_refused_after_its_burst_unless_turned_off() {
        for per_address in [true, false] {
            let t = LoginThrottle::new(per_address);
            let ip: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
            for i in 0..ADDRESS_BURST as usize {
                assert!(t.begin(&format!("u{i}"), ip).is_ok());
            }
            assert_eq!(t.begin("fresh", ip).is_err(), per_address);
            // Successes give back what they took.
            let t = LoginThrottle::new(per_address);
            for _ in 0..100 {
                t.begin("ok", ip).unwrap();
                t.succeeded("ok", ip);
            }
        }
    }
}
