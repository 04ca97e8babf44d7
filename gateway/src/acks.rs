//! Settling the consumer's deliveries (ack, requeue, reject) in delivery
//! order, off the delivery path.
//!
//! A delivery some of whose recipients were re-published (a stale ring
//! view) may be acked only once the broker confirmed those re-publishes:
//! acked before, a crash in between would lose them. Acks are `multiple`
//! (one per batch), so a later ack would cover it too. Waiting for the
//! confirm in the consumer would hold every other user's events behind one
//! round trip; so the consumer hands each delivery to one task per
//! connection and goes on, and that task settles them in order, waiting
//! for confirms where there are some and acking in batches.
//!
//! If a confirm fails (a nack, or the channel went), nothing after it is
//! acked and the task reports the failure; the consumer then ends the
//! connection, and what was not acked comes again.

use lapin::{Acker, PublisherConfirm};

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Acknowledge at most this many deliveries in one `multiple` ack.
const ACK_BATCH: u64 = 64;

/// What to do with one delivery.
pub enum Settle {
    /// Delivered: ack (in a batch).
    Ack,
    /// Delivered, some recipients re-published: ack once these confirm.
    AckAfter(Vec<PublisherConfirm>),
    /// Not delivered (no lease): back to the queue.
    Requeue,
    /// Unreadable: dropped (requeueing would loop forever).
    Reject,
}

/// The settling task of one consumer channel.
pub struct Acks {
    tx: mpsc::Sender<(Acker, Settle)>,
    failed: CancellationToken,
    /// Taken by `finish`; dropped with the connection otherwise (its acks
    /// could not reach the broker any more: what is unacked comes again).
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Acks {
    /// Starts the task. `capacity` is the consumer's prefetch: the broker
    /// never has more deliveries unacked, so a send never waits long.
    pub fn start(capacity: usize) -> Acks {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let failed = CancellationToken::new();
        let task = tokio::spawn(settle_all(rx, failed.clone()));
        Acks { tx, failed, task: Some(task) }
    }

    /// Hands one delivery over, in delivery order.
    pub async fn push(&self, acker: Acker, settle: Settle) -> anyhow::Result<()> {
        self.tx.send((acker, settle)).await.map_err(|_| anyhow::anyhow!("acknowledging stopped"))
    }

    /// Cancelled once a confirm or an ack failed: the connection must go.
    pub fn failed(&self) -> &CancellationToken {
        &self.failed
    }

    /// Settles everything handed over, then ends.
    pub async fn finish(mut self) {
        let task = self.task.take();
        // Closes the channel: the task settles what is left, then ends.
        drop(self);
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Acks {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn settle_all(mut rx: mpsc::Receiver<(Acker, Settle)>, failed: CancellationToken) {
    // The newest delivered one not acked yet, and how many it covers.
    let mut pending: Option<(Acker, u64)> = None;
    loop {
        let next = match rx.try_recv() {
            Ok(item) => Some(item),
            Err(mpsc::error::TryRecvError::Empty) => {
                // Nothing more right now: ack what is done, then wait.
                if let Err(e) = flush(&mut pending).await {
                    return fail(&failed, e);
                }
                rx.recv().await
            }
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        };
        let Some((acker, settle)) = next else { break };
        let result = match settle {
            Settle::Ack => Ok(true),
            Settle::AckAfter(confirms) => confirmed(confirms).await.map(|()| true),
            // Settled one by one, after the acks before them (a requeued
            // or rejected tag must never be the one a `multiple` ack names).
            Settle::Requeue => match flush(&mut pending).await {
                Ok(()) => acker
                    .nack(BasicNackOptions { requeue: true, ..Default::default() })
                    .await
                    .map(|_| false)
                    .map_err(Into::into),
                Err(e) => Err(e),
            },
            Settle::Reject => match flush(&mut pending).await {
                Ok(()) => acker.reject(BasicRejectOptions { requeue: false }).await.map(|_| false).map_err(Into::into),
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(true) => {
                let count = pending.as_ref().map_or(0, |(_, n)| *n) + 1;
                pending = Some((acker, count));
                if count >= ACK_BATCH
                    && let Err(e) = flush(&mut pending).await
                {
                    return fail(&failed, e);
                }
            }
            Ok(false) => {}
            Err(e) => return fail(&failed, e),
        }
    }
    if let Err(e) = flush(&mut pending).await {
        fail(&failed, e);
    }
}

async fn flush(pending: &mut Option<(Acker, u64)>) -> anyhow::Result<()> {
    if let Some((acker, _)) = pending.take() {
        acker.ack(BasicAckOptions { multiple: true }).await?;
    }
    Ok(())
}

/// Waits for re-publish confirms; a nack is an error.
pub async fn confirmed(confirms: Vec<PublisherConfirm>) -> anyhow::Result<()> {
    for c in confirms {
        if c.await?.is_nack() {
            anyhow::bail!("broker refused a re-publish");
        }
    }
    Ok(())
}

fn fail(failed: &CancellationToken, e: anyhow::Error) {
    tracing::warn!(error = %format_args!("{e:#}"), "acknowledging deliveries failed; the broker connection is renewed");
    failed.cancel();
}
