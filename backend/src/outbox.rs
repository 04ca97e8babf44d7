//! The transactional outbox: fan-out jobs live in PostgreSQL, written in
//! the same transaction as the post change they are about, so a post that
//! is stored always has its job, and a job exists only for a stored change.
//!
//! Workers claim the oldest due job of their queue with `FOR UPDATE SKIP
//! LOCKED` and keep the row locked, in an open transaction, while they run
//! it: several workers (and processes) share the table without handing a
//! job to two at once, and a worker that dies (SIGKILL, lost connection)
//! releases its lock with its connection, so the job is simply claimed
//! again. A finished job's row is deleted in that transaction. A failed one
//! stays, with `attempts`, `last_error` and a `next_attempt_at` that backs
//! off, so a job that keeps failing is retried, visible, and never dropped.
//!
//! Jobs of one post run in order (create, then update, then delete): a job
//! is due only when no earlier job of its post is left.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::GenericClient;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls, Row};
use tokio_util::sync::CancellationToken;

/// The PostgreSQL notification channel a committed job is announced on.
/// The payload is the queue name.
pub const CHANNEL: &str = "backend_outbox";
/// First retry delay of a failed job; doubles per attempt up to the max.
pub const FIRST_RETRY: Duration = Duration::from_millis(250);
/// Longest delay between two attempts: a dependency that is back is used
/// within this long.
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// Longest `last_error` kept: enough for a chain of causes.
const MAX_ERROR_CHARS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Put the post into followers' feeds and push it to their devices.
    Create,
    /// Rewrite the post's cached body.
    Update,
    /// Take the post's body and id out of the cache and the feeds.
    Delete,
}

impl JobKind {
    fn as_str(self) -> &'static str {
        match self {
            JobKind::Create => "create",
            JobKind::Update => "update",
            JobKind::Delete => "delete",
        }
    }

    fn parse(s: &str) -> Option<JobKind> {
        match s {
            "create" => Some(JobKind::Create),
            "update" => Some(JobKind::Update),
            "delete" => Some(JobKind::Delete),
            _ => None,
        }
    }
}

/// One fan-out job. Small on purpose: the worker reads the post and the
/// followers from PostgreSQL, so a job never carries a recipient list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub kind: JobKind,
    pub post_id: String,
    /// Whose followers to reach (a deleted post can no longer tell).
    pub author_id: String,
    /// Failed attempts so far.
    pub attempts: i32,
}

/// The migration that creates the table (see `db::MIGRATIONS`).
pub const SCHEMA: &str = r#"
    CREATE TABLE outbox (
        id              bigserial PRIMARY KEY,
        -- FANOUT_QUEUE: processes (and tests) sharing a database but not a
        -- broker or a ring keep their jobs apart.
        queue           text NOT NULL,
        kind            text NOT NULL CHECK (kind IN ('create', 'update', 'delete')),
        post_id         text NOT NULL,
        author_id       text NOT NULL,
        created_at      timestamptz NOT NULL DEFAULT now(),
        attempts        int NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL DEFAULT now(),
        last_error      text
    );
    -- Claiming: the oldest due job of a queue.
    CREATE INDEX outbox_due ON outbox (queue, next_attempt_at, id);
    -- Per-post order: is an earlier job of this post still there?
    CREATE INDEX outbox_post ON outbox (post_id, id);
"#;

/// Adds a job, inside the caller's transaction (the one that changes the
/// post), and announces it on [`CHANNEL`] when that transaction commits.
pub async fn enqueue(
    tx: &impl GenericClient,
    queue: &str,
    kind: JobKind,
    post_id: &str,
    author_id: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO outbox (queue, kind, post_id, author_id) VALUES ($1, $2, $3, $4)",
        &[&queue, &kind.as_str(), &post_id, &author_id],
    )
    .await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &queue]).await?;
    Ok(())
}

/// Claims the oldest due job of `queue` whose post has no earlier job left,
/// skipping rows other workers hold. The row stays locked until `tx` ends.
pub async fn claim(tx: &impl GenericClient, queue: &str) -> Result<Option<Job>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "SELECT id, kind, post_id, author_id, attempts FROM outbox o \
             WHERE queue = $1 AND next_attempt_at <= now() \
               AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.post_id = o.post_id AND e.id < o.id) \
             ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
            &[&queue],
        )
        .await?;
    Ok(row.as_ref().and_then(job_of))
}

fn job_of(r: &Row) -> Option<Job> {
    let kind: String = r.get(1);
    Some(Job { id: r.get(0), kind: JobKind::parse(&kind)?, post_id: r.get(2), author_id: r.get(3), attempts: r.get(4) })
}

/// A finished job leaves the table (in the claiming transaction).
/// Returns its age in seconds: how long since the post was written (the
/// row is written with it), by the database's clock, so clocks of other
/// hosts do not matter.
pub async fn done(tx: &impl GenericClient, job: &Job) -> Result<f64, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "DELETE FROM outbox WHERE id = $1 RETURNING extract(epoch FROM clock_timestamp() - created_at)::float8",
            &[&job.id],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, f64>(0)).unwrap_or(0.0))
}

/// Records a failed attempt: why, and when to try again.
pub async fn failed(tx: &impl GenericClient, job: &Job, why: &str) -> Result<Duration, tokio_postgres::Error> {
    let delay = retry_delay(job.attempts + 1);
    let why: String = why.chars().take(MAX_ERROR_CHARS).collect();
    tx.execute(
        "UPDATE outbox SET attempts = attempts + 1, last_error = $2, \
         next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
        &[&job.id, &why, &delay.as_secs_f64()],
    )
    .await?;
    Ok(delay)
}

/// The wait before attempt `attempts + 1`: doubling from [`FIRST_RETRY`],
/// at most [`MAX_RETRY`].
pub fn retry_delay(attempts: i32) -> Duration {
    let exp = attempts.clamp(1, 16) as u32 - 1;
    FIRST_RETRY.saturating_mul(1 << exp).min(MAX_RETRY)
}

/// What is waiting in a queue: jobs, jobs that failed at least once, and
/// the age of the oldest job in seconds (0 when empty).
pub async fn backlog(client: &impl GenericClient, queue: &str) -> Result<(i64, i64, f64), tokio_postgres::Error> {
    let r = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE attempts > 0), \
             coalesce(extract(epoch FROM now() - min(created_at))::float8, 0) FROM outbox WHERE queue = $1",
            &[&queue],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

/// Wakes this process's idle workers whenever a job of `queue` is
/// committed, by any process: a connection of its own `LISTEN`s on
/// [`CHANNEL`]. Reconnects when it is lost (workers poll meanwhile).
pub async fn listen(config: tokio_postgres::Config, queue: String, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        match listen_once(&config, &queue, &wake, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %format_args!("{e:#}"), "outbox listener lost PostgreSQL; workers poll until it is back")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Wakes every idle worker, and the next one to go idle (it may have just
/// found nothing, a moment before this job was committed).
fn wake_all(wake: &Notify) {
    wake.notify_waiters();
    wake.notify_one();
}

async fn listen_once(
    config: &tokio_postgres::Config,
    queue: &str,
    wake: &Notify,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let (client, mut conn) = tokio::time::timeout(Duration::from_secs(5), config.connect(NoTls))
        .await
        .context("connecting timed out")?
        .context("connecting")?;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    let sql = format!("LISTEN {CHANNEL}");
    let listen = client.batch_execute(&sql);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            r = &mut listen, if !listening => {
                r.context("LISTEN")?;
                listening = true;
                // Jobs committed while nobody listened.
                wake_all(wake);
            }
            m = messages.next() => match m {
                Some(Ok(AsyncMessage::Notification(n))) if n.payload() == queue => wake_all(wake),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("listening"),
                None => anyhow::bail!("connection closed"),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_and_are_capped() {
        assert_eq!(retry_delay(1), FIRST_RETRY);
        assert_eq!(retry_delay(2), FIRST_RETRY * 2);
        assert_eq!(retry_delay(3), FIRST_RETRY * 4);
        assert_eq!(retry_delay(100), MAX_RETRY);
        assert_eq!(retry_delay(0), FIRST_RETRY);
    }

    #[test]
    fn kinds_round_trip() {
        for k in [JobKind::Create, JobKind::Update, JobKind::Delete] {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(JobKind::parse("nope"), None);
    }
}
