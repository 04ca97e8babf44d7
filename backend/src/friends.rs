//! Follows: `PUT /friend/set/{user_id}` makes the caller follow the user,
//! `PUT /friend/delete/{user_id}` undoes it. Either way the caller's
//! cached feed is dropped, to be rebuilt from PostgreSQL on the next read
//! with exactly the authors now followed.

use axum::extract::State;
use axum::response::Response;

use crate::error::{self, ApiError, ApiResult};
use crate::http::{AppState, Caller, Path, ok};
use crate::{users, validate};

pub async fn set(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Path(user_id): Path<String>,
) -> ApiResult<Response> {
    validate::id("user_id", &user_id)?;
    if user_id == me {
        return Err(ApiError::bad("a user cannot follow themselves"));
    }
    if !users::exists(&backend, &user_id).await? {
        return Err(ApiError::not_found("user"));
    }
    backend
        .db
        .get()
        .await?
        .execute(
            "INSERT INTO follows (follower_id, followee_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&me, &user_id],
        )
        .await
        .map_err(error::caller_must_exist)?;
    backend.feed.invalidate(&me).await?;
    Ok(ok())
}

pub async fn delete(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Path(user_id): Path<String>,
) -> ApiResult<Response> {
    validate::id("user_id", &user_id)?;
    if !users::exists(&backend, &user_id).await? {
        return Err(ApiError::not_found("user"));
    }
    backend
        .db
        .get()
        .await?
        .execute("DELETE FROM follows WHERE follower_id = $1 AND followee_id = $2", &[&me, &user_id])
        .await?;
    backend.feed.invalidate(&me).await?;
    Ok(ok())
}
