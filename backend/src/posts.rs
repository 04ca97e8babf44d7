//! Posts and the feed. Writes go to PostgreSQL first; the post's body is
//! cached in Redis, and creation and deletion enqueue a fan-out job (see
//! [`crate::fanout`]) instead of touching followers on the request path.

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::feed::{self, Post};
use crate::http::{AppState, Caller, Json, Path, Query, ok};
use crate::jobs::{Job, JobKind};
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

/// `POST /post/create`: stores the post, then enqueues its fan-out. If the
/// job cannot be enqueued the post is removed again and the client gets a
/// 503 to retry: a stored post nobody would ever see is worse.
pub async fn create(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Json(req): Json<CreateRequest>,
) -> ApiResult<Json<String>> {
    validate::text("text", &req.text, MAX_POST_CHARS)?;
    let post = Post { id: uuid::Uuid::now_v7().to_string(), text: req.text, author_user_id: me };
    backend
        .db
        .get()
        .await?
        .execute(
            "INSERT INTO posts (id, author_id, text) VALUES ($1, $2, $3)",
            &[&post.id, &post.author_user_id, &post.text],
        )
        .await?;
    if let Err(e) = backend.feed.put_post(&post).await {
        // Only a cache: readers fall back to PostgreSQL.
        tracing::warn!(post = post.id, "could not cache post body: {e}");
    }
    let job = Job { kind: JobKind::Create, post_id: post.id.clone(), author_id: post.author_user_id.clone() };
    if let Err(e) = backend.jobs.enqueue(&job).await {
        let undo = async {
            backend.db.get().await?.execute("DELETE FROM posts WHERE id = $1", &[&post.id]).await?;
            backend.feed.forget_post(&post.id).await?;
            ApiResult::Ok(())
        };
        if let Err(undo_err) = undo.await {
            tracing::error!(post = post.id, "post stored but not enqueued, and not removed: {undo_err}");
        }
        return Err(e.into());
    }
    Ok(Json(post.id))
}

/// `PUT /post/update`: only the author may; others get 404.
pub async fn update(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Json(req): Json<UpdateRequest>,
) -> ApiResult<Response> {
    validate::id("id", &req.id)?;
    validate::text("text", &req.text, MAX_POST_CHARS)?;
    let n = backend
        .db
        .get()
        .await?
        .execute(
            "UPDATE posts SET text = $1, updated_at = now() WHERE id = $2 AND author_id = $3",
            &[&req.text, &req.id, &me],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("post"));
    }
    // Feeds hold ids; the one cached body is all there is to update.
    backend.feed.put_post(&Post { id: req.id, text: req.text, author_user_id: me }).await?;
    Ok(ok())
}

/// `PUT /post/delete/{id}`: only the author may; others get 404.
pub async fn delete(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    validate::id("id", &id)?;
    let n = backend.db.get().await?.execute("DELETE FROM posts WHERE id = $1 AND author_id = $2", &[&id, &me]).await?;
    if n == 0 {
        return Err(ApiError::not_found("post"));
    }
    // Without its body the post drops out of every feed read at once.
    backend.feed.forget_post(&id).await?;
    let job = Job { kind: JobKind::Delete, post_id: id, author_id: me };
    if let Err(e) = backend.jobs.enqueue(&job).await {
        // Feeds keep a dangling id until read or trimmed; reads skip it.
        tracing::warn!(post = job.post_id, "could not enqueue the delete fan-out: {e}");
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
            tracing::warn!("feed cache unavailable, reading PostgreSQL: {why}");
            Ok(Json(feed::page_from_db(&backend.db, &me, q.offset, q.limit).await?))
        }
        Err(e) => Err(e),
    }
}
