//! Publishes events at a target rate straight to `feed.events`, grouped by
//! ring owner as the backend does: one message per (event, owner node),
//! routed by the slot of the group's first recipient.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use contract::event::{self, HEADER_PUBLISHED_AT};
use contract::ring::Ring;
use contract::slot::slot_of;
use contract::topology::{self};
use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

use crate::audience::Audience;
use crate::client::run_event;
use crate::series::Series;

/// Publisher confirms awaited concurrently; beyond this the publisher
/// waits, so a saturated broker slows the rate rather than eating memory.
const CONFIRM_WINDOW: usize = 4096;
/// How often the publisher wakes to catch up with the target rate.
const TICK: Duration = Duration::from_millis(2);

pub struct Plan {
    pub users: Arc<Vec<String>>,
    pub ring: Ring,
    pub rate: f64,
    pub audience: Audience,
    pub duration: Duration,
    /// Tags every event, so devices ignore other runs' events.
    pub run: u64,
}

/// What the publisher did.
pub struct Published {
    /// Deliveries expected per event sequence number.
    pub expected: Vec<u32>,
    pub messages: u64,
    pub started_us: u64,
    pub elapsed: Duration,
}

/// Publishes for `plan.duration`. `connected[u]` is the number of devices
/// of user `u` connected now: what an event to `u` should reach.
pub async fn run(
    amqp_url: &str,
    plan: &Plan,
    connected: &[AtomicU32],
    series: &parking_lot::Mutex<Series>,
) -> anyhow::Result<Published> {
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
    let mut picked: Vec<usize> = Vec::new();
    while plan.rate > 0.0 && started.elapsed() < plan.duration {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * plan.rate) as usize;
        while expected.len() < due {
            let seq = expected.len() as u32;
            plan.audience.recipients(seq, &mut picked);
            let deliveries: u32 = picked.iter().map(|&u| connected[u].load(Ordering::Relaxed)).sum();
            expected.push(deliveries);
            let published_us = event::now_micros();
            let ev = run_event(plan.run, seq, published_us);
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
            // Labelled by the second it ends in, like the workers' ticks.
            series.lock().add_published(published_us.div_ceil(1_000_000), 1);
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
