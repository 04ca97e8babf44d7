//! Posts and the feed. A post's creation, update or deletion and its
//! fan-out job (see [`crate::outbox`]) are one PostgreSQL transaction; the
//! workers ([`crate::fanout`]) touch followers, never the request path. The
//! post's body is cached in Redis right away for read-your-writes.

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;

use crate::error::{self, ApiError, ApiResult};
use crate::feed::{self, Post};
use crate::http::{AppState, Caller, Json, Path, Query, ok};
use crate::outbox::{self, JobKind};
use crate::validate::{self, MAX_POST_CHARS};

/// Default feed page size (OTUS: 10).
pub const DEFAULT_FEED_LIMIT: usize = 10;
/// Largest feed page.
pub const MAX_FEED_LIMIT: usize = 100;

#[derive(Debug, Deserialize)]
pub struct CreateRequest {
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct UpdateRequest {
    pub id: String,
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct FeedQuery {
    #[serde(default)]
    pub offset: usize,
    #[serde(default = "default_limit")]
    pub limit: usize,
}

fn default_limit() -> usize {
    DEFAULT_FEED_LIMIT
}

/// `POST /post/create`: stores the post and its fan-out job in one
/// transaction, so a stored post is always fanned out, whatever dies
/// after the commit (the answer is 200 only after it).
pub async fn create(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Json(req): Json<CreateRequest>,
) -> ApiResult<Json<String>> {
    validate::text("text", &req.text, MAX_POST_CHARS)?;
    let post = Post { id: uuid::Uuid::now_v7().to_string(), text: req.text, author_user_id: me };
    let mut client = backend.db.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO posts (id, author_id, text) VALUES ($1, $2, $3)",
        &[&post.id, &post.author_user_id, &post.text],
    )
    .await
    .map_err(error::caller_must_exist)?;
    outbox::enqueue(&tx, &backend.config.fanout_queue, JobKind::Create, &post.id, &post.author_user_id).await?;
    tx.commit().await?;
    if let Err(e) = backend.feed.put_post(&post).await {
        // Only a cache: readers fall back to PostgreSQL, and the job caches it.
        tracing::warn!(post = post.id, error = %e, "could not cache post body");
    }
    Ok(Json(post.id))
}

/// `PUT /post/update`: only the author may; others get 404. The update
/// job rewrites the cached body if this request cannot.
pub async fn update(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Json(req): Json<UpdateRequest>,
) -> ApiResult<Response> {
    validate::id("id", &req.id)?;
    validate::text("text", &req.text, MAX_POST_CHARS)?;
    let mut client = backend.db.get().await?;
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "UPDATE posts SET text = $1, updated_at = now() WHERE id = $2 AND author_id = $3",
            &[&req.text, &req.id, &me],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("post"));
    }
    outbox::enqueue(&tx, &backend.config.fanout_queue, JobKind::Update, &req.id, &me).await?;
    tx.commit().await?;
    // Feeds hold ids; the one cached body is all there is to update.
    let post = Post { id: req.id, text: req.text, author_user_id: me };
    if let Err(e) = backend.feed.put_post(&post).await {
        tracing::warn!(post = post.id, error = %e, "could not cache the new body (its job will)");
    }
    Ok(ok())
}

/// `PUT /post/delete/{id}`: only the author may; others get 404. The
/// delete job takes the id out of followers' feeds.
pub async fn delete(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    validate::id("id", &id)?;
    let mut client = backend.db.get().await?;
    let tx = client.transaction().await?;
    let n = tx.execute("DELETE FROM posts WHERE id = $1 AND author_id = $2", &[&id, &me]).await?;
    if n == 0 {
        return Err(ApiError::not_found("post"));
    }
    outbox::enqueue(&tx, &backend.config.fanout_queue, JobKind::Delete, &id, &me).await?;
    tx.commit().await?;
    // Without its body the post drops out of every feed read at once.
    if let Err(e) = backend.feed.forget_post(&id).await {
        tracing::warn!(post = id, error = %e, "could not drop the cached body (its job will)");
    }
    Ok(ok())
}

pub async fn get(State(backend): State<AppState>, _caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Post>> {
    validate::id("id", &id)?;
    match backend.feed.post(&backend.db, &id).await? {
        Some(p) => Ok(Json(p)),
        None => Err(ApiError::not_found("post")),
    }
}

/// `GET /post/feed`: from the Redis feed cache; straight from PostgreSQL
/// while Redis is down.
pub async fn feed(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Query(q): Query<FeedQuery>,
) -> ApiResult<Json<Vec<Post>>> {
    if q.limit == 0 || q.limit > MAX_FEED_LIMIT {
        return Err(ApiError::bad(format!("limit must be 1 to {MAX_FEED_LIMIT}")));
    }
    match backend.feed.page(&backend.db, &me, q.offset, q.limit).await {
        Ok(posts) => Ok(Json(posts)),
        Err(ApiError::Unavailable(why)) if why.starts_with("redis") => {
            tracing::warn!(error = %why, "feed cache unavailable, reading PostgreSQL");
            Ok(Json(feed::page_from_db(&backend.db, &me, q.offset, q.limit).await?))
        }
        Err(e) => Err(e),
    }
}
