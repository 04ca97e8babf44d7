//! The feed cache layout in Redis, written by the backend and read by the
//! gateways for recovery (`?since=`).
//!
//! - `feed:{user}`: sorted set of the user's newest feed post ids, all with
//!   score 0 so they order by member; post ids are UUIDv7, so member order
//!   is creation order. A feed built from PostgreSQL also holds the marker
//!   member `""` at score -1.
//! - `post:{id}`: the post as JSON `{"id", "text", "author_user_id"}`.

use serde::{Deserialize, Serialize};

use crate::event::PostEvent;

/// Posts kept per feed (SPEC: the last 1000).
pub const FEED_LEN: usize = 1000;

pub fn feed_key(user_id: &str) -> String {
    format!("feed:{user_id}")
}

pub fn post_key(post_id: &str) -> String {
    format!("post:{post_id}")
}

/// A post as the cache holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedPost {
    pub id: String,
    pub text: String,
    pub author_user_id: String,
}

/// Unix milliseconds of a UUIDv7 (its first 48 bits), if `id` is one.
pub fn uuid7_millis(id: &str) -> Option<u64> {
    let hex: String = id.chars().filter(|c| *c != '-').take(12).collect();
    if hex.len() != 12 {
        return None;
    }
    u64::from_str_radix(&hex, 16).ok()
}

/// The feed's events newer than `since` (by id), oldest first, at most
/// [`FEED_LEN`]. Posts whose body is gone (deleted, expired) are skipped.
pub async fn events_since(
    conn: &mut impl redis::aio::ConnectionLike,
    user_id: &str,
    since: &str,
) -> redis::RedisResult<Vec<PostEvent>> {
    // Posts have score 0 and the marker -1: fetch the posts by score and
    // filter by id here (ZRANGEBYLEX is undefined across mixed scores).
    let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE").arg(feed_key(user_id)).arg(0).arg(0).query_async(conn).await?;
    let mut newer: Vec<String> = ids.into_iter().filter(|id| id.as_str() > since).collect();
    newer.sort();
    newer.truncate(FEED_LEN);
    if newer.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = newer.iter().map(|id| post_key(id)).collect();
    let bodies: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
    Ok(bodies
        .into_iter()
        .flatten()
        .filter_map(|b| serde_json::from_str::<CachedPost>(&b).ok())
        .map(|p| {
            let ts = uuid7_millis(&p.id).unwrap_or(0);
            PostEvent::new(&p.id, &p.text, &p.author_user_id, ts)
        })
        .collect())
}

/// Like [`events_since`], but at most the newest `max` of them, and how
/// many older ones were left out: a device far behind gets the newest page
/// (and reads the rest with `GET /post/feed` if it wants them), and only
/// that page's bodies are read from Redis.
pub async fn page_since(
    conn: &mut impl redis::aio::ConnectionLike,
    user_id: &str,
    since: &str,
    max: usize,
) -> redis::RedisResult<(Vec<PostEvent>, usize)> {
    let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE").arg(feed_key(user_id)).arg(0).arg(0).query_async(conn).await?;
    let mut newer: Vec<String> = ids.into_iter().filter(|id| id.as_str() > since).collect();
    newer.sort();
    let skipped = newer.len().saturating_sub(max);
    newer.drain(..skipped);
    if newer.is_empty() {
        return Ok((Vec::new(), skipped));
    }
    let keys: Vec<String> = newer.iter().map(|id| post_key(id)).collect();
    let bodies: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
    let events = bodies
        .into_iter()
        .flatten()
        .filter_map(|b| serde_json::from_str::<CachedPost>(&b).ok())
        .map(|p| {
            let ts = uuid7_millis(&p.id).unwrap_or(0);
            PostEvent::new(&p.id, &p.text, &p.author_user_id, ts)
        })
        .collect();
    Ok((events, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid7_timestamp_is_read_from_the_id() {
        assert_eq!(uuid7_millis("01937a4c-3b2a-7cde-8f00-000000000000"), Some(0x01937a4c3b2a));
        assert_eq!(uuid7_millis("short"), None);
    }
}
