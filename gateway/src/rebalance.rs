//! Moving this node to a new view of the ring, make before break: bind the
//! gained slots (unbinding each from the queues of departed incarnations
//! right after), switch the ring, close moved devices (4001), unbind the
//! lost slots, and take over the departed queues (`departed`). One path
//! for a fresh broker connection and for a membership change, so a
//! take-over happens also when a peer died while this node was
//! reconnecting.

use std::collections::BTreeSet;
use std::sync::Arc;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use parking_lot::Mutex;

use contract::ring::Ring;
use contract::slot::{SLOTS, slot_of};
use contract::topology::node_queue;
use lapin::{Channel, Connection};

use crate::bindings;
use crate::departed::Departed;
use crate::membership::View;
use crate::outbox::Close;
use crate::state::Gateway;

/// Close code for a device whose user moved to another node.
pub const CLOSE_MOVED: crate::close::CloseCode = crate::close::CloseCode::Moved;

/// Most departed queues remembered as taken over (so one is not taken over
/// twice); far more than nodes ever leave within a drain delay.
const MAX_TAKEN: usize = 1024;

/// What this node has adopted so far.
#[derive(Default)]
pub struct Rebalance {
    /// The view bindings and sessions match; `None` before the first.
    pub view: Option<View>,
    /// The slots this node's queue is bound to, `None` when unknown (a new
    /// connection to a queue that may carry bindings of an older ring).
    pub bound: Option<BTreeSet<u16>>,
    /// Queues whose take-over was started, oldest first.
    taken: Vec<String>,
    /// Take-overs started and not finished (the queue not deleted yet),
    /// shared with their drain tasks: when the broker connection is lost
    /// during one, it is opened again on the next connection.
    unfinished: Unfinished,
}

/// Take-overs not finished yet (see `departed`), at most `MAX_TAKEN`.
pub type Unfinished = Arc<Mutex<BTreeSet<String>>>;

impl Rebalance {
    /// A new broker connection: the queue's bindings are not known.
    pub fn reconnected(&mut self) {
        self.bound = None;
    }

    /// Queues of incarnations that were in the adopted view and are not in
    /// `to`, and of this node's own predecessor; each only once.
    fn departed(&mut self, gw: &Gateway, to: &View) -> Vec<String> {
        let mut gone: Vec<String> = Vec::new();
        if let Some(from) = &self.view {
            for (id, inc) in &from.incarnations {
                if to.incarnations.get(id) != Some(inc) {
                    gone.push(node_queue(id, *inc));
                }
            }
        }
        if let Some(p) = to.predecessor {
            gone.push(node_queue(gw.config.node_id(), p));
        }
        gone.retain(|q| !self.taken.contains(q));
        for q in &gone {
            if self.taken.len() >= MAX_TAKEN {
                self.taken.remove(0);
            }
            self.taken.push(q.clone());
        }
        let mut unfinished = self.unfinished.lock();
        for q in &gone {
            if unfinished.len() < MAX_TAKEN {
                unfinished.insert(q.clone());
            }
        }
        gone
    }

    /// On a new connection: the take-overs the last one did not finish
    /// (their drain ended with the connection), other than `starting`.
    fn interrupted(&self, starting: &[String]) -> Vec<String> {
        self.unfinished.lock().iter().filter(|q| !starting.contains(q)).cloned().collect()
    }
}

/// Moves this node to `to`, make before break.
pub async fn adopt(
    gw: &Arc<Gateway>,
    conn: &Connection,
    ch: &Channel,
    queue: &str,
    state: &mut Rebalance,
    to: View,
) -> anyhow::Result<()> {
    let node = gw.config.node_id();
    let owned: BTreeSet<u16> = to.ring.slots_of(node).into_iter().collect();
    let (gained, lost): (BTreeSet<u16>, BTreeSet<u16>) = match &state.bound {
        Some(bound) => (owned.difference(bound).copied().collect(), bound.difference(&owned).copied().collect()),
        None => (owned.clone(), (0..SLOTS).filter(|s| !owned.contains(s)).collect()),
    };
    // Every survivor takes over the queues of incarnations that left: as it
    // binds their slots it unbinds them there; what was routed only to
    // them is drained and delivered later (see `departed`).
    let mut departed = Vec::new();
    let gone = state.departed(gw, &to);
    // A new connection (bindings unknown) also resumes the take-overs the
    // last one left unfinished, if their queue is still there.
    let resumed = if state.bound.is_none() { state.interrupted(&gone) } else { Vec::new() };
    for q in resumed {
        if queue_exists(conn, &q).await? {
            tracing::info!(queue = q, "resuming a take-over the lost broker connection interrupted");
            departed.push(Departed::open(conn, q, state.unfinished.clone()).await?);
        } else {
            state.unfinished.lock().remove(&q);
        }
    }
    for q in gone {
        departed.push(Departed::open(conn, q, state.unfinished.clone()).await?);
    }
    let handovers = gained.iter().map(|&s| {
        let departed = &departed;
        async move {
            bindings::bind(ch, queue, s).await?;
            for d in departed {
                d.unbind(s).await;
            }
            lapin::Result::Ok(())
        }
    });
    futures_util::future::try_join_all(handovers).await?;
    adopt_ring(gw, to.ring.clone());
    let moved = close_moved(gw, &to.ring);
    bindings::set(ch, queue, &lost, false).await?;
    let took_over: Vec<&str> = departed.iter().map(Departed::queue).collect();
    if !took_over.is_empty() {
        tracing::info!(queues = ?took_over, "taking over departed queues");
    }
    for d in departed {
        d.drain_later(gw.clone());
    }
    gw.metrics.rebalances.increment(1);
    tracing::info!(gained = gained.len(), lost = lost.len(), moved, members = to.ring.members().len(), "rebalanced");
    state.view = Some(to);
    state.bound = Some(owned);
    Ok(())
}

/// Whether `queue` exists, asked on a channel of its own (the broker
/// answers "no" by closing the channel).
pub async fn queue_exists(conn: &Connection, queue: &str) -> lapin::Result<bool> {
    let ch = conn.create_channel().await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    match ch.queue_declare(queue.into(), passive, FieldTable::default()).await {
        Ok(_) => {
            let _ = ch.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn is_not_found(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND") || e.to_string().contains("404")
}

/// Makes `ring` the one this node acts on.
fn adopt_ring(gw: &Gateway, ring: Arc<Ring>) {
    gw.metrics.ring_members.set(ring.members().len() as f64);
    gw.metrics.owned_slots.set(ring.slots_of(gw.config.node_id()).len() as f64);
    gw.set_ring(ring);
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
