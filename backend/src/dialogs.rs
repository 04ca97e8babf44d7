//! Dialogs: private messages between two users.

use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use crate::error::{self, ApiError, ApiResult};
use crate::http::{AppState, Caller, Json, Path, ok};
use crate::users;
use crate::validate::{self, MAX_MESSAGE_CHARS};

/// Most messages one list returns (the newest ones, oldest first).
pub const LIST_LIMIT: i64 = 1000;

#[derive(Debug, Deserialize)]
pub struct SendRequest {
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct Message {
    pub from: String,
    pub to: String,
    pub text: String,
}

/// The key of the dialog between two users: both ids, sorted.
fn dialog_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("{lo}|{hi}")
}

pub async fn send(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Path(user_id): Path<String>,
    Json(req): Json<SendRequest>,
) -> ApiResult<Response> {
    validate::id("user_id", &user_id)?;
    validate::text("text", &req.text, MAX_MESSAGE_CHARS)?;
    if !users::exists(&backend, &user_id).await? {
        return Err(ApiError::not_found("user"));
    }
    let id = uuid::Uuid::now_v7().to_string();
    backend
        .db
        .get()
        .await?
        .execute(
            "INSERT INTO messages (id, dialog_id, from_id, to_id, text) VALUES ($1, $2, $3, $4, $5)",
            &[&id, &dialog_id(&me, &user_id), &me, &user_id, &req.text],
        )
        .await
        .map_err(error::caller_must_exist)?;
    Ok(ok())
}

pub async fn list(
    State(backend): State<AppState>,
    Caller(me): Caller,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Vec<Message>>> {
    validate::id("user_id", &user_id)?;
    if !users::exists(&backend, &user_id).await? {
        return Err(ApiError::not_found("user"));
    }
    let rows = backend
        .db
        .get()
        .await?
        .query(
            "SELECT from_id, to_id, text FROM \
             (SELECT id, from_id, to_id, text FROM messages WHERE dialog_id = $1 ORDER BY id DESC LIMIT $2) m \
             ORDER BY id",
            &[&dialog_id(&me, &user_id), &LIST_LIMIT],
        )
        .await?;
    Ok(Json(rows.iter().map(|r| Message { from: r.get(0), to: r.get(1), text: r.get(2) }).collect()))
}
