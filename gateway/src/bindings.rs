//! Bindings of a queue to the slots of `feed.events`.

use std::collections::BTreeSet;

use contract::slot::routing_key;
use contract::topology::EXCHANGE;
use lapin::Channel;
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;

/// Binds `queue` to one slot of `feed.events`. Idempotent.
pub async fn bind(ch: &Channel, queue: &str, slot: u16) -> lapin::Result<()> {
    let key = routing_key(slot);
    ch.queue_bind(
        queue.into(),
        EXCHANGE.into(),
        key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Unbinds `queue` from one slot of `feed.events`. Idempotent.
pub async fn unbind(ch: &Channel, queue: &str, slot: u16) -> lapin::Result<()> {
    let key = routing_key(slot);
    ch.queue_unbind(queue.into(), EXCHANGE.into(), key.as_str().into(), FieldTable::default()).await
}

/// Binds (or unbinds) `queue` to each slot. The calls are issued together
/// and awaited together: one round trip each would take a second for 1024
/// slots. Both directions are idempotent.
pub async fn set(ch: &Channel, queue: &str, slots: &BTreeSet<u16>, bound: bool) -> lapin::Result<()> {
    if bound {
        futures_util::future::try_join_all(slots.iter().map(|&s| bind(ch, queue, s))).await?;
    } else {
        futures_util::future::try_join_all(slots.iter().map(|&s| unbind(ch, queue, s))).await?;
    }
    Ok(())
}
