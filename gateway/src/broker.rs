//! The RabbitMQ side of a node: declare the topology, bind exactly the
//! slots this node owns, consume, and hand each event to the sessions.
//! Ring changes are reconciled here, make before break: bind the new
//! slots, switch the ring, close moved devices (4001), unbind the old.
//! Survives broker restarts and killed connections by starting over with
//! backoff; the node's queue is durable and not exclusive, so what was
//! published while the connection was down waits there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use contract::event::{self, HEADER_HOPS, HEADER_PUBLISHED_AT};
use contract::ring::Ring;
use contract::slot::{SLOTS, parse_routing_key, routing_key, slot_of};
use contract::topology::{self, EXCHANGE, header_u64, node_queue};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::departed::Departed;
use crate::frame;
use crate::outbox::{Close, Queued};
use crate::state::Gateway;

/// First wait before reconnecting; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts: short, since devices are
/// waiting on this node for their events.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Acknowledge at most this many deliveries in one `multiple` ack.
const ACK_BATCH: u64 = 64;
/// Close code for a device whose user moved to another node.
pub const CLOSE_MOVED: crate::close::CloseCode = crate::close::CloseCode::Moved;

/// Runs until the node stops consuming, reconnecting whenever the broker
/// goes away.
pub async fn run(gw: Arc<Gateway>) {
    let mut backoff = MIN_BACKOFF;
    // Several URLs are nodes of one RabbitMQ cluster: after a loss, the next.
    let urls: Vec<String> = gw.config.amqp_urls().map(str::to_owned).collect();
    for attempt in 0usize.. {
        let url = &urls[attempt % urls.len()];
        let result = consume(&gw, url, &mut backoff).await;
        gw.broker_ready.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return,
            Err(e) => {
                gw.metrics.broker_reconnects.increment(1);
                tracing::warn!("broker connection lost: {e:#}; retrying in {backoff:?}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = gw.stop_consuming.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: returns `Ok` only when told to stop consuming.
async fn consume(gw: &Arc<Gateway>, url: &str, backoff: &mut Duration) -> anyhow::Result<()> {
    let node = gw.config.node_id();
    let mut wanted = gw.wanted_ring.subscribe();
    // Bind nothing before membership has been read once.
    let ring = tokio::select! {
        r = wanted.wait_for(|r| r.is_some()) => r?.clone().expect("some"),
        _ = gw.stop_consuming.cancelled() => return Ok(()),
    };
    let props = ConnectionProperties::default().with_connection_name(format!("gateway {node}").into());
    let conn = tokio::select! {
        c = Connection::connect(url, props) => c?,
        _ = gw.stop_consuming.cancelled() => return Ok(()),
    };
    let ch = conn.create_channel().await?;
    // Re-publishing (stale ring views) uses its own channel, with confirms.
    let pub_ch = conn.create_channel().await?;
    pub_ch.confirm_select(ConfirmSelectOptions::default()).await?;
    topology::declare_exchanges(&ch).await?;
    topology::declare_node_queue(&ch, node).await?;
    // After a reconnect the queue may carry bindings of an older ring:
    // bind what is owned, unbind everything else.
    let owned: BTreeSet<u16> = ring.slots_of(node).into_iter().collect();
    let others: BTreeSet<u16> = (0..SLOTS).filter(|s| !owned.contains(s)).collect();
    set_bindings(&ch, node, &owned, true).await?;
    adopt_ring(gw, ring.clone());
    set_bindings(&ch, node, &others, false).await?;
    let mut bound = owned;
    ch.basic_qos(gw.config.prefetch, BasicQosOptions::default()).await?;
    let queue = node_queue(node);
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            format!("gateway-{node}").into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    gw.broker_ready.store(true, Ordering::Relaxed);
    gw.joined.store(true, Ordering::Relaxed);
    *backoff = MIN_BACKOFF;
    tracing::info!(queue, slots = bound.len(), "consuming");

    let mut unacked: Option<(Delivery, u64)> = None;
    loop {
        // A ring change is handled before the next message even when
        // messages never stop coming (the select below runs only in a lull).
        if wanted.has_changed().unwrap_or(false) {
            let ring = wanted.borrow_and_update().clone();
            if let Some(ring) = ring {
                bound = reconcile(gw, &conn, &ch, bound, ring).await?;
            }
            continue;
        }
        // Polling `next` once and dropping it loses nothing: a stream hands
        // out an item only from the poll that returns it.
        let next = match consumer.next().now_or_never() {
            Some(item) => item,
            None => {
                // Acknowledge when the stream has nothing ready.
                if let Some((d, _)) = unacked.take() {
                    d.ack(BasicAckOptions { multiple: true }).await?;
                }
                tokio::select! {
                    item = consumer.next() => item,
                    changed = wanted.changed() => {
                        changed?;
                        let Some(ring) = wanted.borrow_and_update().clone() else { continue };
                        bound = reconcile(gw, &conn, &ch, bound, ring).await?;
                        continue;
                    }
                    _ = gw.stop_consuming.cancelled() => {
                        leave(gw, &ch, &queue).await;
                        let _ = conn.close(200, "gateway shutting down".into()).await;
                        return Ok(());
                    }
                }
            }
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("consumer stream ended"),
        };
        match dispatch(gw, &delivery, Source::Bound) {
            Some(others) => {
                if !others.is_empty() {
                    republish(gw, &pub_ch, &delivery, &others, Source::Bound).await?;
                }
                let count = unacked.as_ref().map_or(0, |(_, n)| *n) + 1;
                if count >= ACK_BATCH {
                    delivery.ack(BasicAckOptions { multiple: true }).await?;
                    unacked = None;
                } else {
                    unacked = Some((delivery, count));
                }
            }
            None => {
                // Unreadable: requeueing would loop forever. Counted and logged.
                delivery.reject(BasicRejectOptions { requeue: false }).await?;
            }
        }
    }
}

/// Moves this node to `ring`, make before break. Returns the slots bound.
async fn reconcile(
    gw: &Arc<Gateway>,
    conn: &Connection,
    ch: &Channel,
    bound: BTreeSet<u16>,
    ring: Arc<Ring>,
) -> anyhow::Result<BTreeSet<u16>> {
    let node = gw.config.node_id();
    let old_ring = gw.ring();
    let owned: BTreeSet<u16> = ring.slots_of(node).into_iter().collect();
    let gained: BTreeSet<u16> = owned.difference(&bound).copied().collect();
    let lost: BTreeSet<u16> = bound.difference(&owned).copied().collect();
    // Every survivor takes over the queues of members that left: as it
    // binds their slots it unbinds them there; what was routed only to
    // them is drained and delivered later (see `departed`).
    let mut departed = BTreeMap::new();
    for gone in old_ring.members().iter().filter(|m| ring.index_of(&m.node_id).is_none() && m.node_id != node) {
        departed.insert(old_ring.index_of(&gone.node_id), Departed::open(conn, &gone.node_id).await?);
    }
    let queue = node_queue(node);
    let handovers = gained.iter().map(|&s| {
        let from = departed.get(&old_ring.owner_index(s));
        let (ch, queue) = (ch, queue.as_str());
        async move {
            bind(ch, queue, s).await?;
            if let Some(d) = from {
                d.unbind(s).await;
            }
            lapin::Result::Ok(())
        }
    });
    futures_util::future::try_join_all(handovers).await?;
    adopt_ring(gw, ring.clone());
    let moved = close_moved(gw, &ring);
    set_bindings(ch, node, &lost, false).await?;
    for d in departed.into_values() {
        d.drain_later(gw.clone());
    }
    gw.metrics.rebalances.increment(1);
    tracing::info!(gained = gained.len(), lost = lost.len(), moved, members = ring.members().len(), "rebalanced");
    Ok(owned)
}

/// Makes `ring` the one this node acts on.
fn adopt_ring(gw: &Gateway, ring: Arc<Ring>) {
    gw.metrics.ring_members.set(ring.members().len() as f64);
    gw.metrics.owned_slots.set(ring.slots_of(gw.config.node_id()).len() as f64);
    *gw.ring.write() = ring;
}

/// Closes, with 4001 and the new owner's URL, every device whose user this
/// node no longer owns. Returns how many.
pub fn close_moved(gw: &Gateway, ring: &Ring) -> usize {
    let me = ring.index_of(gw.config.node_id());
    let mut n = 0;
    gw.sessions.for_each_device(|d| {
        let slot = slot_of(&d.user);
        if ring.owner_index(slot) != me
            && let Some(owner) = ring.owner(slot)
        {
            d.outbox.close(Close::Frame { code: CLOSE_MOVED, reason: owner.url.clone() });
            n += 1;
        }
    });
    gw.metrics.moved_closes.increment(n as u64);
    n
}

/// Binds `queue` to one slot of `feed.events`. Idempotent.
async fn bind(ch: &Channel, queue: &str, slot: u16) -> lapin::Result<()> {
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
pub(crate) async fn unbind(ch: &Channel, queue: &str, slot: u16) -> lapin::Result<()> {
    let key = routing_key(slot);
    ch.queue_unbind(queue.into(), EXCHANGE.into(), key.as_str().into(), FieldTable::default()).await
}

/// Binds (or unbinds) the node's queue to each slot. The calls are issued
/// together and awaited together: one round trip each would take a second
/// for 1024 slots. Both directions are idempotent.
async fn set_bindings(ch: &Channel, node: &str, slots: &BTreeSet<u16>, bound: bool) -> lapin::Result<()> {
    let queue = node_queue(node);
    if bound {
        futures_util::future::try_join_all(slots.iter().map(|&s| bind(ch, &queue, s))).await?;
    } else {
        futures_util::future::try_join_all(slots.iter().map(|&s| unbind(ch, &queue, s))).await?;
    }
    Ok(())
}

/// A clean stop. With peers, the queue stays: they take it over like a
/// dead node's (`departed`: unbind slot by slot as they bind, drain what
/// was routed here meanwhile, delete). Alone, it goes at once rather than
/// on expiry.
async fn leave(gw: &Gateway, ch: &Channel, queue: &str) {
    if gw.ring().members().len() > 1 {
        return;
    }
    if let Err(e) = ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await {
        tracing::warn!(queue, "could not delete queue on shutdown: {e}");
    }
}

/// Where a message was consumed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// This node's own queue: the routing slot is one this node bound.
    Bound,
    /// A departed node's queue: nothing about its routing is ours.
    Departed,
}

/// Most hops a message drained from a departed node's queue may have
/// behind it and still be re-published: it may already be a re-publish
/// (hop 1) that reached the dead node's queue before the new owner bound.
const MAX_HOPS_DRAINED: u64 = 1;

/// Marks a re-publish of a message drained from a departed node's queue,
/// so its receivers skip devices that registered after it (gateway-only
/// header; publishers never set it).
const HEADER_DRAINED: &str = "x-drained";

/// How far the publisher's clock (`x-published-at`) may lag this node's
/// and a drained event still reach every device that could have missed it
/// (NTP keeps hosts within a few milliseconds; on one host it is zero).
/// Larger means more duplicates after a node death, never fewer events.
const DRAINED_SKEW: Duration = Duration::from_millis(100);

/// Hands one message to the sessions. Returns the recipients to re-publish
/// (the publisher's ring view was stale), or `None` if it is unreadable.
pub(crate) fn dispatch(gw: &Gateway, delivery: &Delivery, source: Source) -> Option<Vec<String>> {
    let msg = match event::decode(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            gw.metrics.broker_bad_messages.increment(1);
            tracing::warn!(routing_key = %delivery.routing_key, "unreadable broker message: {e}");
            return None;
        }
    };
    gw.metrics.broker_messages.increment(1);
    let headers = delivery.properties.headers().as_ref();
    let published_at_us = header_u64(headers, HEADER_PUBLISHED_AT).unwrap_or_else(event::now_micros);
    let hops = header_u64(headers, HEADER_HOPS).unwrap_or(0);
    // A routing slot we bound counts as ours even if the ring moved it
    // since; one of a departed node's queue does not.
    let routing_slot = match source {
        Source::Bound => parse_routing_key(delivery.routing_key.as_str()),
        Source::Departed => None,
    };
    // A device registered more than a clock-skew margin after the event
    // was published recovered it from the feed (or connected without
    // `since`, so never expected it): a late copy from a departed queue
    // would only be a duplicate.
    let drained = source == Source::Departed || header_u64(headers, HEADER_DRAINED).is_some();
    let cutoff_us = if drained { published_at_us.saturating_add(DRAINED_SKEW.as_micros() as u64) } else { u64::MAX };
    let may_republish = match source {
        Source::Bound => hops == 0,
        Source::Departed => hops <= MAX_HOPS_DRAINED,
    };
    let ring = gw.ring();
    let me = ring.index_of(gw.config.node_id());
    // Encoded once; every device gets the same bytes.
    let item = Queued { frame: frame::text(msg.event.get().as_bytes()), published_at_us };
    let (mut offline, mut dropped, mut slow, mut written) = (0u64, 0u64, 0u64, 0usize);
    let mut republish = Vec::new();
    for user in &msg.recipients {
        let slot = slot_of(user);
        if Some(slot) != routing_slot && ring.owner_index(slot) != me {
            // Not ours and not what the publisher routed on: its ring view
            // was stale. Re-publish once; never a second time (no loops).
            if may_republish {
                republish.push(user.to_string());
                continue;
            }
            gw.metrics.misrouted.increment(1);
        }
        let d = gw.sessions.deliver_registered_before(user, &item, cutoff_us);
        if d.written == 0 && d.queued == 0 && d.dropped == 0 {
            offline += 1;
        }
        written += d.written;
        dropped += d.dropped as u64;
        slow += d.slow_closed as u64;
    }
    if written > 0 {
        // Written straight from here: counted as the writer counts its own.
        gw.metrics.delivered.increment(written as u64);
        let latency = event::now_micros().saturating_sub(published_at_us) as f64 / 1e6;
        gw.metrics.latency.record_many(latency, written);
    }
    gw.metrics.recipients_offline.increment(offline);
    gw.metrics.dropped_slow.increment(dropped);
    gw.metrics.slow_closes.increment(slow);
    Some(republish)
}

/// Re-publishes recipients grouped by this node's ring, with `x-hops` one
/// more than the message had, and waits for the broker's confirms before
/// the original is acked.
pub(crate) async fn republish(
    gw: &Gateway,
    ch: &Channel,
    delivery: &Delivery,
    users: &[String],
    source: Source,
) -> anyhow::Result<()> {
    let msg = event::decode(&delivery.data)?;
    let ring = gw.ring();
    let mut groups: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for u in users {
        let owner = ring.owner_index(slot_of(u)).unwrap_or(0);
        groups.entry(owner).or_default().push(u);
    }
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let hops = header_u64(Some(&headers), HEADER_HOPS).unwrap_or(0);
    headers.insert(HEADER_HOPS.into(), AMQPValue::LongLongInt(hops as i64 + 1));
    if source == Source::Departed {
        headers.insert(HEADER_DRAINED.into(), AMQPValue::LongLongInt(1));
    }
    for recipients in groups.values() {
        let body = event::encode(recipients, &msg.event);
        topology::publish_group(ch, recipients, &body, headers.clone()).await?.await?;
        gw.metrics.republished.increment(1);
    }
    Ok(())
}
