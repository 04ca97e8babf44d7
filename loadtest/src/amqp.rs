//! A RabbitMQ publisher that survives the broker: a restart, a cut
//! connection or the death of one node of a cluster. It publishes with
//! confirms, keeps every message until its confirm is in, and re-publishes
//! what was refused or never confirmed, over a new connection to the next
//! of its URLs when the old one broke. A message whose confirm was lost
//! with the connection may thus reach the gateways twice (devices see a
//! duplicate, counted as such); one that could not be published before the
//! give-up deadline is handed back to the caller ([`Broker::take_given_up`]),
//! which then expects it nowhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use contract::event::HEADER_PUBLISHED_AT;
use contract::topology;
use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, PublisherConfirm};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Publisher confirms awaited concurrently; beyond this the publisher
/// waits, so a saturated broker slows the rate rather than eating memory.
const CONFIRM_WINDOW: usize = 4096;
/// A connection attempt (TCP, AMQP handshake, channel, declarations) that
/// takes longer than this failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One `basic.publish` that has not been written within this: the
/// connection is stuck (a hung or blocked broker); a new one is made.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// A confirm not in after this is taken as lost and the message is
/// published again (a duplicate at worst).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Waits between failed connection attempts: from the first, doubling up
/// to the last. Short, because a restarted broker is back in seconds and
/// every second of waiting delays the run's events.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// One broker message of one event: a group of recipients of one owner.
#[derive(Debug, Clone)]
pub struct Msg {
    /// The event's sequence number.
    pub seq: u32,
    /// Deliveries this message should make (connected devices of its
    /// recipients when it was first published).
    pub deliveries: u32,
    /// The group's first recipient: its slot is the routing key.
    pub first: String,
    pub body: Vec<u8>,
    /// Unix micros of the first publish attempt (`x-published-at`, so
    /// latency counts the time an outage held the message back).
    pub published_us: u64,
}

/// What the publisher went through, for the report.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct BrokerStats {
    /// Connections made after the first one.
    pub reconnects: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Messages published again (refused, or their confirm never came).
    pub republished: u64,
    /// Messages that could not be published before the deadline.
    pub given_up: u64,
}

struct Link {
    conn: Connection,
    ch: Channel,
}

/// The publisher: one connection at a time, to one of `urls`.
pub struct Broker {
    urls: Vec<String>,
    /// Where the next connection attempt goes.
    next_url: usize,
    link: Option<Link>,
    connected_once: bool,
    confirms: mpsc::Sender<(PublisherConfirm, Msg)>,
    failed: mpsc::UnboundedReceiver<Msg>,
    /// Messages published and not yet confirmed (in the confirm window or
    /// back in `failed`).
    unconfirmed: Arc<AtomicUsize>,
    confirmer: tokio::task::JoinHandle<()>,
    /// After this, what cannot be published is given up.
    deadline: Instant,
    given_up: Vec<Msg>,
    stats: BrokerStats,
}

/// Splits `--amqp-url a,b,c` (nodes of one cluster, tried in turn).
pub fn split_urls(urls: &str) -> Vec<String> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect()
}

impl Broker {
    /// Connects to the first of `urls` that answers; fails when none does
    /// (the run cannot start). Later losses are retried until `deadline`.
    pub async fn connect(urls: Vec<String>, deadline: Instant) -> anyhow::Result<Broker> {
        anyhow::ensure!(!urls.is_empty(), "--amqp-url lists no URL");
        let (confirms, rx) = mpsc::channel(CONFIRM_WINDOW);
        let (failed_tx, failed) = mpsc::unbounded_channel();
        let unconfirmed = Arc::new(AtomicUsize::new(0));
        let confirmer = tokio::spawn(confirm_loop(rx, failed_tx, unconfirmed.clone()));
        let mut b = Broker {
            urls,
            next_url: 0,
            link: None,
            connected_once: false,
            confirms,
            failed,
            unconfirmed,
            confirmer,
            deadline,
            given_up: Vec::new(),
            stats: BrokerStats::default(),
        };
        let mut errors = Vec::new();
        for _ in 0..b.urls.len() {
            match b.try_link().await {
                Ok(()) => return Ok(b),
                Err(e) => errors.push(e),
            }
        }
        anyhow::bail!("no RabbitMQ answers at {}: {}", b.urls.join(", "), errors.join("; "))
    }

    /// One connection attempt to the next URL.
    async fn try_link(&mut self) -> Result<(), String> {
        let url = self.urls[self.next_url % self.urls.len()].clone();
        self.next_url += 1;
        let attempt = async {
            let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            topology::declare_exchanges(&ch).await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(Link { conn, ch })
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(link)) => {
                if self.connected_once {
                    self.stats.reconnects += 1;
                    tracing::warn!(%url, "publisher reconnected");
                }
                self.connected_once = true;
                // Whoever comes next starts from this node again.
                self.next_url -= 1;
                self.link = Some(link);
                Ok(())
            }
            Ok(Err(e)) => {
                self.stats.connect_failures += 1;
                Err(format!("{url}: {e}"))
            }
            Err(_) => {
                self.stats.connect_failures += 1;
                Err(format!("{url}: no connection within {CONNECT_TIMEOUT:?}"))
            }
        }
    }

    /// A live channel, reconnecting (every URL in turn, with backoff)
    /// until the deadline; None after it.
    async fn channel(&mut self) -> Option<Channel> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if let Some(link) = &self.link {
                if link.ch.status().connected() && link.conn.status().connected() {
                    return Some(link.ch.clone());
                }
                self.drop_link();
            }
            if Instant::now() >= self.deadline {
                return None;
            }
            match self.try_link().await {
                Ok(()) => continue,
                Err(e) => tracing::debug!("publisher: cannot connect: {e}"),
            }
            // A cluster: the next node is tried at once, the same one
            // again only after a wait.
            if self.next_url.is_multiple_of(self.urls.len()) {
                tokio::time::sleep(backoff.min(self.deadline.saturating_duration_since(Instant::now()))).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    fn drop_link(&mut self) {
        if let Some(link) = self.link.take() {
            // Its pending confirms fail (lapin rejects them when the
            // channel goes) and come back through `failed`.
            tokio::spawn(async move {
                let _ = link.conn.close(320, "publisher reconnects".into()).await;
            });
        }
    }

    /// Publishes `msg`, reconnecting as needed; first re-publishes what
    /// came back unconfirmed. Waits when the confirm window is full.
    pub async fn publish(&mut self, msg: Msg) {
        self.republish_failed().await;
        self.send(msg).await;
    }

    /// Re-publishes every message whose confirm failed.
    pub async fn republish_failed(&mut self) {
        while let Ok(msg) = self.failed.try_recv() {
            self.unconfirmed.fetch_sub(1, Ordering::Relaxed);
            self.stats.republished += 1;
            self.send(msg).await;
        }
    }

    async fn send(&mut self, msg: Msg) {
        loop {
            let Some(ch) = self.channel().await else {
                self.stats.given_up += 1;
                self.given_up.push(msg);
                return;
            };
            let mut headers = FieldTable::default();
            headers.insert(HEADER_PUBLISHED_AT.into(), AMQPValue::LongLongInt(msg.published_us as i64));
            let sent =
                tokio::time::timeout(PUBLISH_TIMEOUT, topology::publish_group(&ch, &[&msg.first], &msg.body, headers))
                    .await;
            match sent {
                Ok(Ok(confirm)) => {
                    self.unconfirmed.fetch_add(1, Ordering::Relaxed);
                    if let Err(mpsc::error::SendError((_, msg))) = self.confirms.send((confirm, msg)).await {
                        // The confirmer is gone (it never ends first): keep it failed.
                        self.unconfirmed.fetch_sub(1, Ordering::Relaxed);
                        self.given_up.push(msg);
                        self.stats.given_up += 1;
                    }
                    return;
                }
                Ok(Err(e)) => tracing::warn!("publish failed, reconnecting: {e}"),
                Err(_) => tracing::warn!("publish not written within {PUBLISH_TIMEOUT:?}, reconnecting"),
            }
            self.drop_link();
        }
    }

    /// Waits until every message is confirmed, re-publishing what fails,
    /// until the deadline (and the confirms in flight then, at most
    /// [`CONFIRM_TIMEOUT`] more); then closes. What failed by then is
    /// given up.
    pub async fn finish(&mut self) -> BrokerStats {
        let last = self.deadline + CONFIRM_TIMEOUT;
        while self.unconfirmed.load(Ordering::Relaxed) > 0 && Instant::now() < last {
            // Past the deadline this publishes only on a live connection.
            self.republish_failed().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while let Ok(msg) = self.failed.try_recv() {
            self.unconfirmed.fetch_sub(1, Ordering::Relaxed);
            self.stats.given_up += 1;
            self.given_up.push(msg);
        }
        let left = self.unconfirmed.load(Ordering::Relaxed);
        if left > 0 {
            // Confirms that never resolved: their deliveries stay expected.
            tracing::warn!(left, "publisher: confirms still outstanding at the end");
        }
        self.confirmer.abort();
        if let Some(link) = self.link.take() {
            let _ = link.ch.close(200, "done".into()).await;
            let _ = link.conn.close(200, "done".into()).await;
        }
        self.stats
    }

    /// The messages given up so far (their events are expected nowhere
    /// for those recipients).
    pub fn take_given_up(&mut self) -> Vec<Msg> {
        std::mem::take(&mut self.given_up)
    }
}

/// Awaits confirms in publish order; sends back what was nacked, failed
/// with the channel, or did not come in time.
async fn confirm_loop(
    mut rx: mpsc::Receiver<(PublisherConfirm, Msg)>,
    failed: mpsc::UnboundedSender<Msg>,
    unconfirmed: Arc<AtomicUsize>,
) {
    while let Some((confirm, msg)) = rx.recv().await {
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(c)) if c.is_ack() => {
                unconfirmed.fetch_sub(1, Ordering::Relaxed);
            }
            outcome => {
                tracing::debug!(seq = msg.seq, "not confirmed ({outcome:?}); will be published again");
                if failed.send(msg).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_urls_split_on_commas() {
        assert_eq!(split_urls("amqp://a:1/%2f"), vec!["amqp://a:1/%2f"]);
        assert_eq!(split_urls(" amqp://a , amqp://b,,"), vec!["amqp://a", "amqp://b"]);
        assert!(split_urls("").is_empty());
    }
}
