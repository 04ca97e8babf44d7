//! Fan-out jobs: what the API hands to the workers, on a durable RabbitMQ
//! queue, so a post's fan-out survives a backend restart and never runs
//! on the request path.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// A connection attempt that takes longer than this is treated as the
/// broker being down (the request answers 503 instead of hanging).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Put the post into followers' feeds and push it to their devices.
    Create,
    /// Take the post out of followers' feeds.
    Delete,
}

/// One fan-out job. Small on purpose: the worker reads the post and the
/// followers from PostgreSQL, so a job never carries a recipient list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub kind: JobKind,
    pub post_id: String,
    /// Whose followers to reach (a deleted post can no longer tell).
    pub author_id: String,
}

/// Declares the job queue (durable). Idempotent.
pub async fn declare_queue(ch: &Channel, queue: &str) -> lapin::Result<()> {
    ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await?;
    Ok(())
}

/// Connects to the broker, with [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(r) => r,
        Err(_) => Err(lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out connecting to the broker",
        ))),
    }
}

/// The API's side of the queue: one connection and confirm channel,
/// opened on first use and again after the broker goes away.
pub struct JobQueue {
    url: String,
    queue: String,
    /// tokio's Mutex: held across the (re)connect, which awaits.
    chan: Mutex<Option<(Connection, Channel)>>,
}

impl JobQueue {
    pub fn new(url: &str, queue: &str) -> JobQueue {
        JobQueue { url: url.to_owned(), queue: queue.to_owned(), chan: Mutex::new(None) }
    }

    /// Publishes a job persistently and waits for the broker's confirm.
    pub async fn enqueue(&self, job: &Job) -> lapin::Result<()> {
        let ch = self.channel().await?;
        let body = serde_json::to_vec(job).expect("jobs serialize");
        let confirm = ch
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(PERSISTENT).with_content_type("application/json".into()),
            )
            .await?
            .await?;
        if confirm.is_ack() {
            Ok(())
        } else {
            Err(lapin::Error::from(std::io::Error::other("broker refused the fan-out job")))
        }
    }

    /// True when a channel is open (for `/readyz`); tries to open one.
    pub async fn is_up(&self) -> bool {
        self.channel().await.is_ok()
    }

    async fn channel(&self) -> lapin::Result<Channel> {
        let mut slot = self.chan.lock().await;
        if let Some((_, ch)) = slot.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        *slot = None;
        let conn = connect(&self.url, "backend api").await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        declare_queue(&ch, &self.queue).await?;
        *slot = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Closes the connection (shutdown).
    pub async fn close(&self) {
        if let Some((conn, _)) = self.chan.lock().await.take() {
            let _ = conn.close(200, "backend shutting down".into()).await;
        }
    }
}
