//! The broker connection of a node: connect (with backoff, rotating over
//! the nodes of a RabbitMQ cluster), declare, adopt the wanted view
//! (`rebalance`), consume, dispatch (`dispatch`) and ack in batches.
//!
//! The node's queue is durable, not exclusive, and gets persistent
//! messages, so what was published while the connection was down, or while
//! the broker restarted, waits there. When that cannot be vouched for (the
//! queue is gone when the node comes back, or the consumer was away long
//! enough for messages to expire), the node is fenced: its devices are
//! closed so they recover with `since`, and it rejoins as a new
//! incarnation.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use contract::topology::{self, NODE_QUEUE_MESSAGE_TTL, node_queue};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::time::Instant;

use crate::acks::{Acks, Settle};
use crate::dispatch::{dispatch, republish};
pub use crate::rebalance::CLOSE_MOVED;
use crate::rebalance::{Rebalance, adopt, queue_exists};
use crate::routing::Source;
use crate::state::Gateway;

/// First wait before reconnecting; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts: short, since devices are
/// waiting on this node for their events.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often a consumer whose lease lapsed looks again.
const LEASE_POLL: Duration = Duration::from_millis(50);
/// A consumer away longer than this may have had messages expire in its
/// queue (`NODE_QUEUE_MESSAGE_TTL`, with half of it as margin for clock
/// and queue age): its devices are then told to recover.
const AWAY_LIMIT: Duration = Duration::from_secs(NODE_QUEUE_MESSAGE_TTL.as_secs() / 2);

/// Why a connection's life ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("node fenced")]
    Fenced,
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// What outlives one connection.
#[derive(Default)]
struct Life {
    rebalance: Rebalance,
    /// The incarnation whose queue was last consumed, and since when it is
    /// not (`None` while consuming).
    consumed: Option<(u64, Option<Instant>)>,
}

/// Runs until the node stops consuming, reconnecting whenever the broker
/// goes away.
pub async fn run(gw: Arc<Gateway>) {
    let mut backoff = MIN_BACKOFF;
    // Several URLs are nodes of one RabbitMQ cluster: after a loss, the next.
    let urls: Vec<String> = gw.config.amqp_urls().map(str::to_owned).collect();
    let mut life = Life::default();
    for attempt in 0usize.. {
        let url = &urls[attempt % urls.len()];
        let result = consume(&gw, url, &mut backoff, &mut life).await;
        gw.broker_ready.store(false, Ordering::Relaxed);
        if let Some((_, away @ None)) = &mut life.consumed {
            *away = Some(Instant::now());
        }
        life.rebalance.reconnected();
        match result {
            Ok(()) => return,
            Err(Ended::Fenced) => {
                backoff = MIN_BACKOFF;
                continue;
            }
            Err(e) => {
                gw.metrics.broker_reconnects.increment(1);
                tracing::warn!(error = %format_args!("{e:#}"), retry_in = ?backoff, "broker connection lost");
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
async fn consume(gw: &Arc<Gateway>, url: &str, backoff: &mut Duration, life: &mut Life) -> Result<(), Ended> {
    let node = gw.config.node_id();
    let mut wanted = gw.wanted.subscribe();
    let mut incarnations = gw.incarnations();
    let incarnation = *incarnations.borrow_and_update();
    // Bind nothing before membership has been read once.
    let view = tokio::select! {
        v = wanted.wait_for(|v| v.is_some()) => v.map_err(anyhow::Error::from)?.clone().expect("some"),
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
    let queue = node_queue(node, incarnation);
    if let Some((inc, away)) = life.consumed
        && inc == incarnation
    {
        // This incarnation consumed before: what waited in its queue meanwhile
        // must still be there, or its devices are told to recover.
        let lost = !queue_exists(&conn, &queue).await?;
        let too_long = away.is_some_and(|t| t.elapsed() > AWAY_LIMIT);
        if lost || too_long {
            let why = if lost { "its queue was lost" } else { "its consumer was away too long" };
            gw.fence(&format!("{why} while the broker connection was down"));
            let _ = conn.close(200, "fenced".into()).await;
            return Err(Ended::Fenced);
        }
    }
    topology::declare_node_queue(&ch, node, incarnation).await?;
    adopt(gw, &conn, &ch, &queue, &mut life.rebalance, view).await?;
    ch.basic_qos(gw.config.prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            format!("gateway-{node}").into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    life.consumed = Some((incarnation, None));
    gw.broker_ready.store(true, Ordering::Relaxed);
    gw.joined.store(true, Ordering::Relaxed);
    if !gw.serving.load(Ordering::Acquire) {
        // Announced from the next beat on; serving once the peers agree.
        gw.tasks.spawn(crate::handover::serve_when_peers_agree(gw.clone()));
    }
    *backoff = MIN_BACKOFF;
    tracing::info!(queue, "consuming");

    // Acks (after re-publish confirms) are settled off this loop, in order.
    let acks = Acks::start(gw.config.prefetch as usize);
    loop {
        // The stop, a fence and a ring change are looked at on every turn,
        // even when messages never stop coming (the select below runs only
        // in a lull).
        if gw.stop_consuming.is_cancelled() {
            return stop(gw, conn, &ch, &queue, acks).await;
        }
        if acks.failed().is_cancelled() {
            return Err(anyhow::anyhow!("acknowledging deliveries failed").into());
        }
        if incarnations.has_changed().unwrap_or(true) {
            let _ = conn.close(200, "fenced".into()).await;
            return Err(Ended::Fenced);
        }
        if wanted.has_changed().unwrap_or(false) {
            let view = wanted.borrow_and_update().clone();
            if let Some(view) = view {
                adopt(gw, &conn, &ch, &queue, &mut life.rebalance, view).await?;
            }
            continue;
        }
        // Deliver only under a lease (see `membership`); until it is
        // renewed, what comes waits unacked, and goes back to the queue if
        // the node is fenced instead.
        if !gw.lease.holds() {
            tokio::select! {
                _ = tokio::time::sleep(LEASE_POLL) => {}
                _ = incarnations.changed() => {
                    let _ = conn.close(200, "fenced".into()).await;
                    return Err(Ended::Fenced);
                }
                _ = gw.stop_consuming.cancelled() => {}
            }
            continue;
        }
        // Polling `next` once and dropping it loses nothing: a stream hands
        // out an item only from the poll that returns it.
        let next = match consumer.next().now_or_never() {
            Some(item) => item,
            None => {
                // `changed` marks the value seen: it is handled right here.
                tokio::select! {
                    item = consumer.next() => item,
                    changed = wanted.changed() => {
                        changed.map_err(anyhow::Error::from)?;
                        let view = wanted.borrow_and_update().clone();
                        if let Some(view) = view {
                            adopt(gw, &conn, &ch, &queue, &mut life.rebalance, view).await?;
                        }
                        continue;
                    }
                    _ = incarnations.changed() => {
                        let _ = conn.close(200, "fenced".into()).await;
                        return Err(Ended::Fenced);
                    }
                    _ = gw.stop_consuming.cancelled() => continue,
                    _ = acks.failed().cancelled() => continue,
                }
            }
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            // The broker cancelled the consumer: the queue was deleted.
            None => return Err(anyhow::anyhow!("consumer cancelled by the broker").into()),
        };
        if !gw.lease.holds() {
            // Not delivered: it comes again, here or to whoever takes over.
            acks.push(delivery.acker, Settle::Requeue).await?;
            continue;
        }
        let settle = match dispatch(gw, &delivery, Source::Bound) {
            // Rare: stale ring views only. Acked once confirmed, by `acks`.
            Some(others) if !others.is_empty() => {
                Settle::AckAfter(republish(gw, &pub_ch, &delivery, &others, Source::Bound).await?)
            }
            Some(_) => Settle::Ack,
            // Unreadable: requeueing would loop forever. Counted and logged.
            None => Settle::Reject,
        };
        acks.push(delivery.acker, settle).await?;
    }
}

/// A clean stop: ack what was delivered, leave, close the connection.
async fn stop(gw: &Gateway, conn: Connection, ch: &Channel, queue: &str, acks: Acks) -> Result<(), Ended> {
    acks.finish().await;
    leave(gw, ch, queue).await;
    let _ = conn.close(200, "gateway shutting down".into()).await;
    Ok(())
}

/// With peers, the queue stays: they take it over like a dead node's
/// (`departed`: unbind slot by slot as they bind, drain what was routed
/// here meanwhile, delete). Alone, it goes at once rather than on expiry.
async fn leave(gw: &Gateway, ch: &Channel, queue: &str) {
    if gw.ring().members().len() > 1 {
        return;
    }
    if let Err(e) = ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await {
        tracing::warn!(queue, error = %e, "could not delete queue on shutdown");
    }
}

/// Waits until this node holds a delivery lease (see `membership`); an
/// error once it stops consuming.
pub async fn lease_held(gw: &Gateway) -> anyhow::Result<()> {
    while !gw.lease.holds() {
        if gw.stop_consuming.is_cancelled() {
            anyhow::bail!("stopping");
        }
        tokio::time::sleep(LEASE_POLL).await;
    }
    Ok(())
}
