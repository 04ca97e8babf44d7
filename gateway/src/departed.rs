//! Taking over the queue of a node incarnation that left the ring (died,
//! stopped, was dropped as silent, or restarted as a new incarnation).
//! Queues are per incarnation (`gateway.<id>.<incarnation>`), so a take-over
//! never touches the queue of a live process.
//!
//! Survivors drop a dead node at slightly different moments (each polls
//! the membership on its own), and publishers keep it a little longer
//! still (`PUBLISHER_GRACE`). Until the new owner of one of its slots has
//! bound that slot, a message routed there reaches only the dead node's
//! queue, while the user's device may already be served, and recovered
//! from the feed, by another survivor. Deleting that queue at once would
//! lose such messages; so each survivor:
//!
//! 1. unbinds the dead queue from the slots it just bound itself, so from
//!    now on those slots reach only the living;
//! 2. consumes what the queue holds, from now on and until
//!    [`DRAIN_DELAY`] has passed (every survivor and publisher has moved
//!    on), and delivers it like a stale-view message (own recipients
//!    delivered, the rest re-published once). At once, not after the
//!    delay: a message held back would reach its device after newer ones,
//!    and a device that then reconnects asks only for what is newer than
//!    the newest it has (`since`), so the held one would be lost;
//! 3. deletes the queue. Every step is idempotent and every survivor does
//!    them, so the queue goes away even if some survivor fails; a queue
//!    nobody uses also expires on its own (`NODE_QUEUE_EXPIRES`).
//!
//! Drained messages may duplicate what devices already recovered from the
//! feed; events carry their id, so duplicates are detectable, losses not.

use std::sync::Arc;
use std::time::Duration;

use contract::membership::{HEARTBEAT_INTERVAL, PUBLISHER_GRACE};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicRejectOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};

use crate::acks::confirmed;
use crate::dispatch::{dispatch, republish};
use crate::routing::Source;
use crate::state::Gateway;
use crate::{bindings, broker};

/// Wait before draining: the publishers' grace plus two membership polls,
/// by which time every survivor has dropped the dead node (each decides
/// within one poll of the others) and bound its share of the slots.
pub const DRAIN_DELAY: Duration =
    Duration::from_millis(PUBLISHER_GRACE.as_millis() as u64 + 2 * HEARTBEAT_INTERVAL.as_millis() as u64);

/// How often a departed queue found empty is looked at again until the
/// drain delay is over.
const DRAIN_POLL: Duration = Duration::from_millis(25);

/// Most messages drained from one dead queue. The queue's message TTL
/// bounds it anyway; this keeps a runaway publisher from holding a
/// survivor in the drain loop.
const MAX_DRAINED: usize = 1_000_000;

/// A departed node's queue being taken over by this node.
pub struct Departed {
    queue: String,
    /// Its own channel, because the broker answers a command on a queue
    /// that another survivor already deleted by closing the channel.
    ch: Channel,
    pub_ch: Channel,
    /// Where this take-over is listed until its queue is deleted.
    unfinished: crate::rebalance::Unfinished,
}

impl Departed {
    /// Opens the channels the take-over uses.
    pub async fn open(
        conn: &Connection,
        queue: String,
        unfinished: crate::rebalance::Unfinished,
    ) -> lapin::Result<Departed> {
        let ch = conn.create_channel().await?;
        let pub_ch = conn.create_channel().await?;
        pub_ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Departed { queue, ch, pub_ch, unfinished })
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Unbinds the departed queue from a slot this node has just bound:
    /// from now on the slot reaches only the living. Done slot by slot,
    /// right after each bind, so that a message reaches both queues (and
    /// is later delivered twice) only for one round trip per slot.
    pub async fn unbind(&self, slot: u16) {
        if let Err(e) = bindings::unbind(&self.ch, &self.queue, slot).await {
            // The queue is gone: another survivor drained and deleted it.
            tracing::debug!(queue = self.queue, error = %e, "departed queue not unbound");
        }
    }

    /// Drains the queue from now until [`DRAIN_DELAY`] has passed, then
    /// deletes it, in the background.
    pub fn drain_later(self, gw: Arc<Gateway>) {
        gw.clone().tasks.spawn(async move {
            let Departed { queue, ch, pub_ch, unfinished } = self;
            let until = tokio::time::Instant::now() + DRAIN_DELAY;
            let mut total = 0;
            let result = loop {
                match drain(&gw, &ch, &pub_ch, &queue).await {
                    Ok(n) => total += n,
                    Err(e) => break Err(e),
                }
                if tokio::time::Instant::now() >= until {
                    // One last look, then the queue goes.
                    break drain(&gw, &ch, &pub_ch, &queue).await.map(|n| total += n);
                }
                tokio::select! {
                    _ = tokio::time::sleep(DRAIN_POLL) => {}
                    _ = gw.stop_consuming.cancelled() => return,
                }
            };
            match result {
                Ok(()) => tracing::info!(queue, drained = total, "took over a departed node's queue"),
                Err(e) => tracing::debug!(queue, error = %e, "departed queue not drained (another survivor may have)"),
            }
            // Finished once the queue is gone. When the broker connection
            // went meanwhile, the next one resumes the take-over.
            match ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await {
                Ok(_) => {
                    unfinished.lock().remove(&queue);
                }
                Err(e) if crate::rebalance::is_not_found(&e) => {
                    unfinished.lock().remove(&queue);
                }
                Err(e) => tracing::debug!(queue, error = %e, "departed queue not deleted"),
            }
            let _ = ch.close(200, "departed queue taken over".into()).await;
            let _ = pub_ch.close(200, "departed queue taken over".into()).await;
        });
    }
}

/// Consumes the queue until it is empty. Returns how many messages.
async fn drain(gw: &Gateway, ch: &Channel, pub_ch: &Channel, queue: &str) -> anyhow::Result<usize> {
    let mut n = 0;
    while n < MAX_DRAINED {
        // Delivering is what the lease guards (see `membership`).
        broker::lease_held(gw).await?;
        let Some(msg) = ch.basic_get(queue.into(), BasicGetOptions::default()).await? else { break };
        let delivery = msg.delivery;
        match dispatch(gw, &delivery, Source::Departed) {
            Some(users) => {
                if !users.is_empty() {
                    confirmed(republish(gw, pub_ch, &delivery, &users, Source::Departed).await?).await?;
                }
                delivery.ack(BasicAckOptions::default()).await?;
            }
            None => {
                delivery.reject(BasicRejectOptions { requeue: false }).await?;
            }
        }
        n += 1;
        gw.metrics.departed_drained.increment(1);
    }
    Ok(n)
}
