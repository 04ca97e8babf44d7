//! The feed cache in Redis (layout in `contract::feedcache`): each user's
//! newest [`FEED_LEN`] post ids, and the posts' bodies, stored once per post.
//!
//! - `feed:{user}` is a sorted set. Posts have score 0, so they order by
//!   member, and post ids are UUIDv7: lexicographic order is creation
//!   order. Adding a post twice is a no-op, which makes fan-out retries
//!   harmless.
//! - A feed that was built from PostgreSQL also holds the marker member
//!   `""` with score -1. A set without it is partial (fan-out wrote into a
//!   cold feed, or Redis lost it) and is rebuilt on the next read. Scores
//!   keep the marker out of every page and out of trimming.
//! - `post:{id}` holds the post as JSON. Update rewrites only this key;
//!   delete removes it, and reads drop ids whose post no longer exists, so
//!   a deleted post leaves feeds at once, before the fan-out of the delete
//!   removes its id from each of them.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::Pool;
use redis::aio::ConnectionManager;

use crate::error::ApiResult;

/// A feed nobody read or wrote for this long is dropped; it is rebuilt
/// from PostgreSQL on the next read. Keeps inactive users out of memory.
pub const FEED_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Cached post bodies expire too; a miss reads PostgreSQL.
pub const POST_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Marker member of a feed built from PostgreSQL.
const BUILT_MARKER: &str = "";

/// The key layout is shared with the gateways' recovery (`?since=`).
pub use contract::feedcache::{CachedPost as Post, FEED_LEN, feed_key, post_key};

/// The cache: a Redis connection (multiplexed, reconnecting).
#[derive(Clone)]
pub struct FeedCache {
    pub redis: ConnectionManager,
}

impl FeedCache {
    /// Puts `post_id` into the feeds of `followers`, in one pipeline.
    pub async fn add(&self, post_id: &str, followers: &[String]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for f in followers {
            let key = feed_key(f);
            pipe.zadd(&key, post_id, 0).ignore();
            // Keep rank 0 (the marker, or in a partial feed its oldest
            // post) and the newest FEED_LEN posts.
            pipe.cmd("ZREMRANGEBYRANK").arg(&key).arg(1).arg(-(FEED_LEN as i64) - 1).ignore();
            pipe.expire(&key, FEED_TTL.as_secs() as i64).ignore();
        }
        let mut conn = self.redis.clone();
        pipe.query_async::<()>(&mut conn).await
    }

    /// Removes `post_id` from the feeds of `followers`, in one pipeline.
    pub async fn remove(&self, post_id: &str, followers: &[String]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for f in followers {
            pipe.zrem(feed_key(f), post_id).ignore();
        }
        let mut conn = self.redis.clone();
        pipe.query_async::<()>(&mut conn).await
    }

    /// Stores (or replaces) a post's body.
    pub async fn put_post(&self, post: &Post) -> redis::RedisResult<()> {
        let json = serde_json::to_string(post).expect("posts serialize");
        let mut conn = self.redis.clone();
        redis::cmd("SET")
            .arg(post_key(&post.id))
            .arg(json)
            .arg("EX")
            .arg(POST_TTL.as_secs())
            .query_async::<()>(&mut conn)
            .await
    }

    pub async fn forget_post(&self, post_id: &str) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        redis::cmd("DEL").arg(post_key(post_id)).query_async::<()>(&mut conn).await
    }

    /// Drops a user's feed; the next read rebuilds it from PostgreSQL.
    pub async fn invalidate(&self, user_id: &str) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        redis::cmd("DEL").arg(feed_key(user_id)).query_async::<()>(&mut conn).await
    }

    /// A post by id: the cached body, else PostgreSQL (then cached).
    pub async fn post(&self, db: &Pool, post_id: &str) -> ApiResult<Option<Post>> {
        let mut found = self.posts(db, &[post_id.to_owned()]).await?;
        Ok(found.pop())
    }

    /// One page of a user's feed, newest first. Rebuilds a missing or
    /// partial feed from PostgreSQL first.
    pub async fn page(&self, db: &Pool, user_id: &str, offset: usize, limit: usize) -> ApiResult<Vec<Post>> {
        if offset >= FEED_LEN {
            return Ok(Vec::new());
        }
        let limit = limit.min(FEED_LEN - offset);
        let key = feed_key(user_id);
        let mut conn = self.redis.clone();
        let (marker, ids): (Option<f64>, Vec<String>) = redis::pipe()
            .zscore(&key, BUILT_MARKER)
            .cmd("ZREVRANGEBYSCORE")
            .arg(&key)
            .arg("+inf")
            .arg(0)
            .arg("LIMIT")
            .arg(offset)
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        let ids = if marker.is_some() {
            ids
        } else {
            let all = self.rebuild(db, user_id).await?;
            all.into_iter().skip(offset).take(limit).collect()
        };
        let posts = self.posts(db, &ids).await?;
        if posts.len() < ids.len() {
            // Deleted posts: take their ids out of this feed as we pass.
            let gone: Vec<&String> = ids.iter().filter(|id| !posts.iter().any(|p| &p.id == *id)).collect();
            let _ = redis::cmd("ZREM").arg(&key).arg(gone).query_async::<()>(&mut conn).await;
        }
        Ok(posts)
    }

    /// Rebuilds a feed from PostgreSQL; returns its ids, newest first.
    /// Adds to whatever the set holds rather than replacing it, so a post
    /// fanned out while the query ran is not lost.
    pub async fn rebuild(&self, db: &Pool, user_id: &str) -> ApiResult<Vec<String>> {
        let rows = db
            .get()
            .await?
            .query(
                "SELECT p.id FROM posts p JOIN follows f ON f.followee_id = p.author_id \
                 WHERE f.follower_id = $1 ORDER BY p.id DESC LIMIT $2",
                &[&user_id, &(FEED_LEN as i64)],
            )
            .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let key = feed_key(user_id);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.zadd(&key, BUILT_MARKER, -1).ignore();
        for chunk in ids.chunks(500) {
            let members: Vec<(i32, &String)> = chunk.iter().map(|id| (0, id)).collect();
            pipe.zadd_multiple(&key, &members).ignore();
        }
        pipe.cmd("ZREMRANGEBYRANK").arg(&key).arg(1).arg(-(FEED_LEN as i64) - 1).ignore();
        pipe.expire(&key, FEED_TTL.as_secs() as i64).ignore();
        let mut conn = self.redis.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(ids)
    }

    /// The posts with these ids, in the given order; missing ones (deleted)
    /// are left out. Bodies come from Redis, misses from PostgreSQL.
    pub async fn posts(&self, db: &Pool, ids: &[String]) -> ApiResult<Vec<Post>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| post_key(id)).collect();
        let mut conn = self.redis.clone();
        let cached: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut by_id: HashMap<String, Post> = HashMap::with_capacity(ids.len());
        let mut missing: Vec<String> = Vec::new();
        for (id, json) in ids.iter().zip(cached) {
            match json.and_then(|j| serde_json::from_str::<Post>(&j).ok()) {
                Some(p) => {
                    by_id.insert(id.clone(), p);
                }
                None => missing.push(id.clone()),
            }
        }
        if !missing.is_empty() {
            for p in load_posts(db, &missing).await? {
                let _ = self.put_post(&p).await;
                by_id.insert(p.id.clone(), p);
            }
        }
        Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
    }
}

/// Posts by id from PostgreSQL, in no particular order.
pub async fn load_posts(db: &Pool, ids: &[String]) -> ApiResult<Vec<Post>> {
    let rows = db.get().await?.query("SELECT id, text, author_id FROM posts WHERE id = ANY($1)", &[&ids]).await?;
    Ok(rows.iter().map(|r| Post { id: r.get(0), text: r.get(1), author_user_id: r.get(2) }).collect())
}

/// A feed page straight from PostgreSQL, for when Redis is down.
pub async fn page_from_db(db: &Pool, user_id: &str, offset: usize, limit: usize) -> ApiResult<Vec<Post>> {
    if offset >= FEED_LEN {
        return Ok(Vec::new());
    }
    let limit = limit.min(FEED_LEN - offset);
    let rows = db
        .get()
        .await?
        .query(
            "SELECT p.id, p.text, p.author_id FROM posts p JOIN follows f ON f.followee_id = p.author_id \
             WHERE f.follower_id = $1 ORDER BY p.id DESC OFFSET $2 LIMIT $3",
            &[&user_id, &(offset as i64), &(limit as i64)],
        )
        .await?;
    Ok(rows.iter().map(|r| Post { id: r.get(0), text: r.get(1), author_user_id: r.get(2) }).collect())
}
