//! Publishes events at a target rate straight to `feed.events`, grouped by
//! ring owner as the backend does: one message per (event, owner node),
//! routed by the slot of the group's first recipient.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use contract::event::{self, HEADER_PUBLISHED_AT};
use contract::ring::Ring;
use contract::slot::slot_of;
use contract::topology::{self};
use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

use crate::client::{Shared, event_for};

/// Publisher confirms awaited concurrently; beyond this the publisher
/// waits, so a saturated broker slows the rate rather than eating memory.
const CONFIRM_WINDOW: usize = 4096;
/// How often the publisher wakes to catch up with the target rate.
const TICK: Duration = Duration::from_millis(2);

pub struct Plan {
    pub users: Arc<Vec<String>>,
    pub ring: Ring,
    pub rate: f64,
    pub fanout: u32,
    pub duration: Duration,
}

/// What the publisher did.
pub struct Published {
    /// Deliveries expected per event sequence number.
    pub expected: Vec<u32>,
    pub messages: u64,
    pub started_us: u64,
    pub elapsed: Duration,
}

pub async fn run(amqp_url: &str, plan: &Plan, shared: &Shared) -> anyhow::Result<Published> {
    let conn = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    topology::declare_exchanges(&ch).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    // Confirms are awaited off the publishing loop, in a bounded window.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<lapin::PublisherConfirm>(CONFIRM_WINDOW);
    let confirmer = tokio::spawn(async move {
        let mut nacked = 0u64;
        while let Some(c) = rx.recv().await {
            match c.await {
                Ok(conf) if conf.is_ack() => {}
                _ => nacked += 1,
            }
        }
        nacked
    });

    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ event::now_micros());
    let n_users = plan.users.len();
    let fanout = (plan.fanout as usize).min(n_users);
    let owner_of_user: Vec<usize> = plan
        .users
        .iter()
        .map(|u| {
            let owner = plan.ring.owner(slot_of(u)).expect("ring has members");
            plan.ring.members().iter().position(|m| m == owner).expect("owner is a member")
        })
        .collect();

    let mut expected = Vec::new();
    let mut messages = 0u64;
    let started = Instant::now();
    let started_us = event::now_micros();
    let mut tick = tokio::time::interval(TICK);
    let mut picked: Vec<usize> = Vec::with_capacity(fanout);
    while plan.rate > 0.0 && started.elapsed() < plan.duration {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * plan.rate) as usize;
        while expected.len() < due {
            let seq = expected.len() as u32;
            pick_distinct(&mut rng, n_users, fanout, &mut picked);
            let deliveries: u32 =
                picked.iter().map(|&u| shared.connected_per_user[u].load(Ordering::Relaxed)).sum();
            expected.push(deliveries);
            let published_us = event::now_micros();
            let ev = event_for(seq, published_us);
            let mut groups: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
            for &u in &picked {
                groups.entry(owner_of_user[u]).or_default().push(&plan.users[u]);
            }
            for recipients in groups.values() {
                let body = event::encode(recipients, &ev);
                let mut headers = FieldTable::default();
                headers.insert(HEADER_PUBLISHED_AT.into(), AMQPValue::LongLongInt(published_us as i64));
                let confirm = topology::publish_group(&ch, recipients, &body, headers).await?;
                tx.send(confirm).await.ok();
                messages += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    drop(tx);
    let nacked = confirmer.await?;
    if nacked > 0 {
        tracing::warn!(nacked, "the broker refused some messages");
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(Published { expected, messages, started_us, elapsed })
}

/// Fills `out` with `k` distinct indexes below `n`.
fn pick_distinct(rng: &mut XorShift, n: usize, k: usize, out: &mut Vec<usize>) {
    // Evenly spaced positions, shifted and rotated at random: distinct by
    // construction (i * step + offset < n) and cheap at any fanout.
    out.clear();
    if k == 0 {
        return;
    }
    let step = n / k;
    let offset = rng.below(step);
    let rotate = rng.below(n);
    out.extend((0..k).map(|i| (rotate + offset + i * step) % n));
}

/// A tiny, fast, seeded generator: the choice of recipients needs to be
/// spread, not secret.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_are_distinct_and_in_range() {
        let mut rng = XorShift(42);
        let mut out = Vec::new();
        for (n, k) in [(10, 10), (10, 3), (1000, 250), (5, 1)] {
            pick_distinct(&mut rng, n, k, &mut out);
            let mut sorted = out.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), k);
            assert!(out.iter().all(|&u| u < n));
        }
    }
}
