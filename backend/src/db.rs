//! PostgreSQL, the system of record: the connection pool, creating the
//! database when it is missing, and the schema migrations applied at start.

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

/// Key of the advisory lock that serializes migrations: several processes
/// (replicas, parallel tests) may start at once against one database.
const MIGRATION_LOCK: i64 = 0x6665_6564; // "feed"

/// The schema, in order. A migration is applied once; never edit one that
/// has shipped, add another.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
    CREATE TABLE users (
        id            text PRIMARY KEY,
        first_name    text NOT NULL,
        second_name   text NOT NULL,
        birthdate     date NOT NULL,
        biography     text NOT NULL,
        city          text NOT NULL,
        password_hash text NOT NULL,
        created_at    timestamptz NOT NULL DEFAULT now()
    );
    -- Prefix search on (first_name, second_name): LIKE 'x%' needs pattern ops.
    CREATE INDEX users_name_prefix ON users (first_name text_pattern_ops, second_name text_pattern_ops);
    CREATE INDEX users_second_name_prefix ON users (second_name text_pattern_ops);

    CREATE TABLE follows (
        follower_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        followee_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        created_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (follower_id, followee_id)
    );
    -- Fan-out pages through the followers of an author in id order.
    CREATE INDEX follows_followee ON follows (followee_id, follower_id);

    CREATE TABLE posts (
        id         text PRIMARY KEY,
        author_id  text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        text       text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    -- Feed rebuild: the newest posts of each followed author.
    CREATE INDEX posts_author ON posts (author_id, id DESC);

    CREATE TABLE messages (
        id         text PRIMARY KEY,
        dialog_id  text NOT NULL,
        from_id    text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        to_id      text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        text       text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    -- A dialog is listed by its key (the two user ids, sorted) in id order.
    CREATE INDEX messages_dialog ON messages (dialog_id, id);
    "#,
    ),
    (2, crate::outbox::SCHEMA),
];

/// How long a request waits for a free pooled connection before it gets a
/// 503: a stuck or saturated database must not hold requests forever.
pub const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a new connection (TCP and start-up) may take.
pub const POOL_CREATE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long checking a returned connection may take.
pub const POOL_RECYCLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates the database if missing, connects a pool and applies the
/// migrations.
pub async fn connect(url: &str, pool_size: usize) -> anyhow::Result<Pool> {
    let mut config: tokio_postgres::Config = url.parse().context("DATABASE_URL")?;
    config.connect_timeout(POOL_CREATE_TIMEOUT);
    create_database_if_missing(&config).await?;
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let pool = Pool::builder(manager)
        .max_size(pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .create_timeout(Some(POOL_CREATE_TIMEOUT))
        .recycle_timeout(Some(POOL_RECYCLE_TIMEOUT))
        .build()
        .context("database pool")?;
    migrate(&pool).await?;
    Ok(pool)
}

/// Connects to the `postgres` maintenance database and creates the target
/// database if it does not exist. Racing creators are fine.
async fn create_database_if_missing(config: &tokio_postgres::Config) -> anyhow::Result<()> {
    let name = config.get_dbname().unwrap_or("postgres").to_owned();
    if name == "postgres" {
        return Ok(());
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, conn) = admin.connect(NoTls).await.context("connecting to PostgreSQL")?;
    let task = tokio::spawn(conn);
    let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some();
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match client.batch_execute(&sql).await {
            Ok(()) => tracing::info!(database = name, "created database"),
            // Another process created it between our check and our create.
            Err(e) if matches!(e.code(), Some(c) if *c == SqlState::DUPLICATE_DATABASE || *c == SqlState::UNIQUE_VIOLATION) =>
                {}
            Err(e) => return Err(e).context(format!("creating database {name}")),
        }
    }
    drop(client);
    let _ = task.await;
    Ok(())
}

/// Applies the migrations not applied yet, under an advisory lock.
async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool.get().await.context("connecting to the database")?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = async {
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            .await?;
        for (version, sql) in MIGRATIONS {
            let applied = client.query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[version]).await?;
            if applied.is_some() {
                continue;
            }
            let tx = client.transaction().await?;
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[version]).await?;
            tx.commit().await?;
            tracing::info!(version, "applied migration");
        }
        anyhow::Ok(())
    }
    .await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await?;
    result.context("applying migrations")
}

/// True when a database error means "the database is unreachable or
/// overloaded" (answer 503) rather than a bug (answer 500).
pub fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code()
            .is_none_or(|c| c.code().starts_with("08") || c.code().starts_with("53") || c.code().starts_with("57"))
}
