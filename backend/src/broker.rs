//! The workers' RabbitMQ side: a connection with a confirm channel on
//! `feed.events`, opened when there is something to publish, to the next
//! node of the cluster when one is lost. Events are published with
//! `contract::topology::publish_group` (persistent, so what waits in a
//! gateway's durable queue survives a broker restart).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use contract::topology;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};

/// A connection (TCP, AMQP handshake, channel, declarations) that takes
/// longer than this is treated as the node being down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A publish whose confirm has not come back in this long fails the job
/// (it is retried): a stuck broker must not hold a job forever.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The URLs of one RabbitMQ cluster's nodes, tried in turn: a connection
/// starts at the node after the one that failed last.
#[derive(Debug)]
pub struct Nodes {
    urls: Vec<String>,
    next: AtomicUsize,
}

impl Nodes {
    /// `list` is one URL or several, comma-separated.
    pub fn parse(list: &str) -> Vec<String> {
        list.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect()
    }

    pub fn new(list: &str) -> Nodes {
        Nodes { urls: Nodes::parse(list), next: AtomicUsize::new(0) }
    }

    /// Connects to the first node that answers, starting with the current
    /// one; each attempt bounded by [`CONNECT_TIMEOUT`].
    pub async fn connect(&self, name: &str) -> anyhow::Result<Connection> {
        let start = self.next.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.urls.len() {
            let at = (start + i) % self.urls.len();
            let props = ConnectionProperties::default().with_connection_name(name.into());
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.urls[at], props)).await {
                Ok(Ok(conn)) => {
                    self.next.store(at, Ordering::Relaxed);
                    return Ok(conn);
                }
                Ok(Err(e)) => errors.push(format!("node {}: {e}", at + 1)),
                Err(_) => errors.push(format!("node {}: timed out after {CONNECT_TIMEOUT:?}", at + 1)),
            }
        }
        // Next time, start after the node that was tried first.
        self.next.store((start + 1) % self.urls.len().max(1), Ordering::Relaxed);
        anyhow::bail!("broker unreachable ({})", errors.join("; "))
    }

    /// The node a lost connection was on is tried last next time.
    pub fn failed(&self) {
        let n = self.urls.len().max(1);
        let _ = self.next.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| Some((i + 1) % n));
    }
}

/// One worker's broker link: opened on first use, dropped on any error.
pub struct Link {
    name: String,
    open: Option<(Connection, Channel)>,
}

impl Link {
    pub fn new(name: String) -> Link {
        Link { name, open: None }
    }

    /// The confirm channel on `feed.events`, (re)connecting as needed.
    pub async fn channel(&mut self, nodes: &Nodes) -> anyhow::Result<&Channel> {
        if self.open.as_ref().is_some_and(|(c, ch)| c.status().connected() && ch.status().connected()) {
            return Ok(&self.open.as_ref().expect("checked").1);
        }
        if self.open.take().is_some() {
            nodes.failed();
        }
        let conn = nodes.connect(&self.name).await?;
        let setup = async {
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            topology::declare_exchanges(&ch).await?;
            lapin::Result::Ok(ch)
        };
        let ch = match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("broker channel set-up timed out after {CONNECT_TIMEOUT:?}"),
        };
        Ok(&self.open.insert((conn, ch)).1)
    }

    /// Forgets the connection after an error, so the next use reconnects.
    pub fn reset(&mut self, nodes: &Nodes) {
        if let Some((conn, _)) = self.open.take() {
            nodes.failed();
            tokio::spawn(async move {
                let _ = conn.close(200, "backend worker reconnecting".into()).await;
            });
        }
    }

    pub async fn close(&mut self) {
        if let Some((conn, _)) = self.open.take() {
            let _ = conn.close(200, "backend shutting down".into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_urls_is_split_and_trimmed() {
        assert_eq!(Nodes::parse("amqp://a/%2f"), vec!["amqp://a/%2f"]);
        assert_eq!(Nodes::parse("amqp://a/x, amqp://b/x,,"), vec!["amqp://a/x", "amqp://b/x"]);
    }
}
