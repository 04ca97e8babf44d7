//! Bulk seeding (`--seed-database`): the users and their follows written
//! straight into the backend's PostgreSQL, thousands of rows per
//! statement, instead of one HTTP request each. A celebrity run needs
//! 100,000 followers: through the API that is 100,000 argon2 hashes (tens
//! of ms of a core each on this machine, so most of an hour), while the
//! post and its fan-out, which are what is measured, go through the API
//! and the workers as always.
//!
//! What it skips, so that nobody mistakes it for the API: request
//! validation, password hashing (the rows hold a hash that matches no
//! password, so these users cannot log in: their tokens are minted with
//! the shared secret, which is therefore required) and whatever the
//! follow handler does besides the row (these users have no cached feed
//! yet, so there is nothing to invalidate). The rows are deleted, and
//! the followers' feeds dropped, at the end of the run ([`cleanup`]).

use std::time::{Duration, Instant};

use anyhow::Context;
use contract::token::Tokens;
use tokio_postgres::NoTls;

use super::seed::{Seeded, Seeding, authors_for};
use crate::audience::Audience;

/// Rows per INSERT: big enough that 100,000 users are a few dozen round
/// trips, small enough that one statement's arrays stay a few MiB.
const ROWS_PER_STATEMENT: usize = 10_000;
/// The `password_hash` of bulk users: not a PHC string, so no password
/// verifies against it (a locked account).
const NO_PASSWORD: &str = "!bulk-seeded: no password";
/// Minted tokens outlive any run.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Connecting to PostgreSQL takes longer than this only when it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Users `"<prefix>-f<i>"` (followers) and `"<prefix>-a<i>"` (authors),
/// follower `u` following author `u % authors`, as [`super::seed::seed`]
/// makes them over HTTP.
pub async fn seed(
    database_url: &str,
    users: u32,
    fanout: u32,
    prefix: &str,
    secret: Option<&str>,
    quiet: bool,
) -> anyhow::Result<Seeded> {
    let secret = secret.context("--seed-database mints the users' tokens: --jwt-secret (JWT_SECRET) is required")?;
    let db = connect(database_url).await?;
    let authors = authors_for(users, fanout);
    let followers: Vec<String> = (0..users).map(|i| format!("{prefix}-f{i}")).collect();
    let author_ids: Vec<String> = (0..authors).map(|i| format!("{prefix}-a{i}")).collect();

    let t = Instant::now();
    for chunk in followers.chunks(ROWS_PER_STATEMENT).chain(author_ids.chunks(ROWS_PER_STATEMENT)) {
        db.execute(
            "INSERT INTO users (id, first_name, second_name, birthdate, biography, city, password_hash) \
             SELECT id, $2, id, '2000-01-01', '', '', $3 FROM unnest($1::text[]) AS id",
            &[&chunk, &prefix, &NO_PASSWORD],
        )
        .await
        .context("bulk seeding: inserting users (is --seed-database the backend's database?)")?;
    }
    let register_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let audience = Audience::Followers { users, authors };
    for (a, author) in author_ids.iter().enumerate() {
        let mine: Vec<&str> = (0..users)
            .filter(|&u| audience.author_of(u) as usize == a)
            .map(|u| followers[u as usize].as_str())
            .collect();
        for chunk in mine.chunks(ROWS_PER_STATEMENT) {
            db.execute(
                "INSERT INTO follows (follower_id, followee_id) SELECT f, $2 FROM unnest($1::text[]) AS f",
                &[&chunk, author],
            )
            .await
            .context("bulk seeding: inserting follows")?;
        }
    }
    let follow_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let minter = Tokens::new(secret.as_bytes());
    let tokens = followers.iter().map(|id| minter.issue(id, TOKEN_TTL)).collect();
    let author_tokens = author_ids.iter().map(|id| minter.issue(id, TOKEN_TTL)).collect();
    let tokens_s = t.elapsed().as_secs_f64();
    if !quiet {
        eprintln!(
            "seeding: {} users and {users} follows inserted in {:.1}s (bulk, straight into PostgreSQL)",
            users + authors,
            register_s + follow_s
        );
    }
    Ok(Seeded {
        users: followers,
        tokens,
        author_tokens,
        audience,
        times: Seeding {
            registered: u64::from(users + authors),
            register_s,
            tokens: "minted",
            tokens_s,
            follows: u64::from(users),
            follow_s,
            how: "bulk",
        },
    })
}

/// Deletes the run's `users` (followers and authors; their follows and
/// posts go with them) and drops their cached feeds, so that a 100,000-user run does
/// not stay in the shared database. Best effort: a run's report matters
/// more; what fails is logged.
pub async fn cleanup(database_url: &str, redis_url: &str, users: &[String]) {
    let rows = async {
        let db = connect(database_url).await?;
        let mut n = 0;
        for chunk in users.chunks(ROWS_PER_STATEMENT) {
            n += db.execute("DELETE FROM users WHERE id = ANY($1)", &[&chunk]).await.context("deleting users")?;
        }
        anyhow::Ok(n)
    };
    match rows.await {
        Ok(n) => tracing::debug!("bulk seeding: {n} users deleted"),
        Err(e) => tracing::warn!("bulk seeding: the run's users stay in the database: {e:#}"),
    }
    let feeds = async {
        let mut redis = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
        for chunk in users.chunks(ROWS_PER_STATEMENT) {
            let mut pipe = redis::pipe();
            for f in chunk {
                pipe.del(contract::feedcache::feed_key(f)).ignore();
            }
            pipe.query_async::<()>(&mut redis).await?;
        }
        anyhow::Ok(())
    };
    if let Err(e) = feeds.await {
        tracing::warn!("bulk seeding: the followers' feeds stay in Redis: {e:#}");
    }
}

async fn connect(database_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_postgres::connect(database_url, NoTls))
        .await
        .with_context(|| format!("--seed-database: no answer within {CONNECT_TIMEOUT:?}"))?
        .context("--seed-database: cannot connect")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!("bulk seeding: PostgreSQL connection: {e}");
        }
    });
    Ok(client)
}
