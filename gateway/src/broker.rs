//! The RabbitMQ side of a node: declare the topology, bind the slots this
//! node owns, consume, and hand each event to the sessions. Survives broker
//! restarts and killed connections by starting over with backoff; the
//! node's queue is durable and not exclusive, so what was published while
//! the connection was down waits there.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use contract::event::{self, HEADER_PUBLISHED_AT};
use contract::slot::routing_key;
use contract::topology::{self, EXCHANGE, header_u64, node_queue};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueBindOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

use crate::frame;
use crate::outbox::Queued;
use crate::state::Gateway;

/// First wait before reconnecting; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts: short, since devices are
/// waiting on this node for their events.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Acknowledge at most this many deliveries in one `multiple` ack.
const ACK_BATCH: u64 = 64;

/// Runs until shutdown, reconnecting whenever the broker goes away.
pub async fn run(gw: Arc<Gateway>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let result = consume(&gw, &mut backoff).await;
        gw.broker_ready.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return,
            Err(e) => {
                gw.metrics.broker_reconnects.increment(1);
                tracing::warn!("broker connection lost: {e}; retrying in {backoff:?}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = gw.shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: returns `Ok` only on shutdown.
async fn consume(gw: &Arc<Gateway>, backoff: &mut Duration) -> anyhow::Result<()> {
    let node = gw.config.node_id();
    let props = ConnectionProperties::default().with_connection_name(format!("gateway {node}").into());
    let conn = tokio::select! {
        c = Connection::connect(&gw.config.amqp_url, props) => c?,
        _ = gw.shutdown.cancelled() => return Ok(()),
    };
    let ch = conn.create_channel().await?;
    topology::declare_exchanges(&ch).await?;
    topology::declare_node_queue(&ch, node).await?;
    bind_owned_slots(gw, &ch).await?;
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
    *backoff = MIN_BACKOFF;
    tracing::info!(queue, "consuming");

    let mut unacked: Option<(Delivery, u64)> = None;
    loop {
        // Acknowledge when the stream has nothing ready, or every ACK_BATCH.
        // Polling `next` once and dropping it loses nothing: a stream hands
        // out an item only from the poll that returns it.
        let next = match consumer.next().now_or_never() {
            Some(item) => item,
            None => {
                if let Some((d, _)) = unacked.take() {
                    d.ack(BasicAckOptions { multiple: true }).await?;
                }
                tokio::select! {
                    item = consumer.next() => item,
                    _ = gw.shutdown.cancelled() => {
                        leave(&ch, &queue).await;
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
        if dispatch(gw, &delivery) {
            let count = unacked.as_ref().map_or(0, |(_, n)| *n) + 1;
            if count >= ACK_BATCH {
                delivery.ack(BasicAckOptions { multiple: true }).await?;
                unacked = None;
            } else {
                unacked = Some((delivery, count));
            }
        } else {
            // Unreadable: requeueing would loop forever. Counted and logged.
            delivery.reject(BasicRejectOptions { requeue: false }).await?;
        }
    }
}

/// Binds every slot this node owns. Binding is idempotent, so a rebind
/// after a reconnect is harmless.
async fn bind_owned_slots(gw: &Gateway, ch: &Channel) -> lapin::Result<()> {
    let node = gw.config.node_id();
    let queue = node_queue(node);
    let slots = gw.ring().slots_of(node);
    // Issue the binds back to back and wait for all: one round trip each
    // would take a second for 1024 slots.
    let binds = slots.iter().map(|&s| {
        ch.queue_bind(
            queue.as_str().into(),
            EXCHANGE.into(),
            routing_key(s).as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
    });
    futures_util::future::try_join_all(binds).await?;
    gw.metrics.owned_slots.set(slots.len() as f64);
    Ok(())
}

/// A clean stop: this node's queue goes away at once rather than on expiry.
async fn leave(ch: &Channel, queue: &str) {
    if let Err(e) = ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await {
        tracing::warn!(queue, "could not delete queue on shutdown: {e}");
    }
}

/// Hands one message to the sessions. Returns false if it is unreadable.
fn dispatch(gw: &Gateway, delivery: &Delivery) -> bool {
    let msg = match event::decode(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            gw.metrics.broker_bad_messages.increment(1);
            tracing::warn!(routing_key = %delivery.routing_key, "unreadable broker message: {e}");
            return false;
        }
    };
    gw.metrics.broker_messages.increment(1);
    let published_at_us = header_u64(delivery.properties.headers().as_ref(), HEADER_PUBLISHED_AT)
        .unwrap_or_else(event::now_micros);
    // Encoded once; every device gets the same bytes.
    let item = Queued { frame: frame::text(msg.event.get().as_bytes()), published_at_us };
    let (mut offline, mut dropped, mut slow) = (0u64, 0u64, 0u64);
    for user in &msg.recipients {
        let d = gw.sessions.deliver(user, &item);
        if d.queued == 0 && d.dropped == 0 {
            offline += 1;
        }
        dropped += d.dropped as u64;
        slow += d.slow_closed as u64;
    }
    gw.metrics.recipients_offline.increment(offline);
    gw.metrics.dropped_slow.increment(dropped);
    gw.metrics.slow_closes.increment(slow);
    true
}
