//! Users: register, login, get, prefix search.

use axum::extract::State;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::http::{AppState, Caller, ClientAddr, Json, Path, Query};
use crate::validate::{self, MAX_BIOGRAPHY_CHARS, MAX_CITY_CHARS, MAX_NAME_CHARS};

/// Most users one search returns.
pub const SEARCH_LIMIT: i64 = 100;

#[derive(Debug, Deserialize)]
pub struct RegisterRequest {
    pub first_name: String,
    pub second_name: String,
    /// `YYYY-MM-DD`.
    pub birthdate: String,
    #[serde(default)]
    pub biography: String,
    #[serde(default)]
    pub city: String,
    pub password: String,
}

#[derive(Debug, Deserialize)]
pub struct LoginRequest {
    pub id: String,
    pub password: String,
}

/// A user as the API shows it (never the password hash).
#[derive(Debug, Serialize)]
pub struct User {
    pub id: String,
    pub first_name: String,
    pub second_name: String,
    pub birthdate: String,
    pub biography: String,
    pub city: String,
}

#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    #[serde(default)]
    pub first_name: String,
    #[serde(default)]
    pub last_name: String,
}

const USER_COLUMNS: &str = "id, first_name, second_name, birthdate::text, biography, city";

fn user_of(r: &tokio_postgres::Row) -> User {
    User {
        id: r.get(0),
        first_name: r.get(1),
        second_name: r.get(2),
        birthdate: r.get(3),
        biography: r.get(4),
        city: r.get(5),
    }
}

pub async fn register(
    State(backend): State<AppState>,
    Json(req): Json<RegisterRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    validate::text("first_name", &req.first_name, MAX_NAME_CHARS)?;
    validate::text("second_name", &req.second_name, MAX_NAME_CHARS)?;
    validate::date("birthdate", &req.birthdate)?;
    validate::optional_text("biography", &req.biography, MAX_BIOGRAPHY_CHARS)?;
    validate::optional_text("city", &req.city, MAX_CITY_CHARS)?;
    validate::password(&req.password)?;
    let hash = backend.passwords.hash(req.password).await?;
    let id = uuid::Uuid::now_v7().to_string();
    backend
        .db
        .get()
        .await?
        .execute(
            "INSERT INTO users (id, first_name, second_name, birthdate, biography, city, password_hash) \
             VALUES ($1, $2, $3, $4::text::date, $5, $6, $7)",
            &[&id, &req.first_name, &req.second_name, &req.birthdate, &req.biography, &req.city, &hash],
        )
        .await?;
    Ok(Json(serde_json::json!({ "user_id": id })))
}

/// `POST /login`. Throttled before any hash is computed (see
/// [`crate::throttle`]). An unknown user is 404, as the OTUS API has it:
/// that tells whether an id exists (see the README on enumeration).
pub async fn login(
    State(backend): State<AppState>,
    ClientAddr(addr): ClientAddr,
    Json(req): Json<LoginRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    validate::id("id", &req.id)?;
    validate::password(&req.password)?;
    if let Err(wait) = backend.logins.begin(&req.id, addr) {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        return Err(ApiError::TooManyRequests(format!("too many failed logins, retry in {secs} s"), secs));
    }
    // Counted as a failure unless it succeeds (or errs on our side).
    let checked = async {
        let row =
            backend.db.get().await?.query_opt("SELECT password_hash FROM users WHERE id = $1", &[&req.id]).await?;
        let Some(row) = row else {
            backend.logins.unknown_user(&req.id);
            return Err(ApiError::not_found("user"));
        };
        if !backend.passwords.verify(req.password, row.get(0)).await? {
            return Err(ApiError::bad("wrong password"));
        }
        Ok(())
    };
    match checked.await {
        Ok(()) => backend.logins.succeeded(&req.id, addr),
        Err(e @ (ApiError::NotFound(_) | ApiError::BadRequest(_))) => return Err(e),
        Err(e) => {
            // Our failure, not the client's guess.
            backend.logins.succeeded(&req.id, addr);
            return Err(e);
        }
    }
    let token = backend.tokens.issue(&req.id, backend.config.token_ttl);
    Ok(Json(serde_json::json!({ "token": token })))
}

pub async fn get(State(backend): State<AppState>, _caller: Caller, Path(id): Path<String>) -> ApiResult<Json<User>> {
    validate::id("id", &id)?;
    let row = backend
        .db
        .get()
        .await?
        .query_opt(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"), &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(Json(user_of(&row)))
}

pub async fn search(
    State(backend): State<AppState>,
    _caller: Caller,
    Query(q): Query<SearchQuery>,
) -> ApiResult<Json<Vec<User>>> {
    if q.first_name.is_empty() && q.last_name.is_empty() {
        return Err(ApiError::bad("give first_name or last_name (a prefix) or both"));
    }
    validate::optional_text("first_name", &q.first_name, MAX_NAME_CHARS)?;
    validate::optional_text("last_name", &q.last_name, MAX_NAME_CHARS)?;
    let rows = backend
        .db
        .get()
        .await?
        .query(
            &format!(
                "SELECT {USER_COLUMNS} FROM users WHERE first_name LIKE $1 AND second_name LIKE $2 \
                 ORDER BY id LIMIT $3"
            ),
            &[&like_prefix(&q.first_name), &like_prefix(&q.last_name), &SEARCH_LIMIT],
        )
        .await?;
    Ok(Json(rows.iter().map(user_of).collect()))
}

/// A LIKE pattern matching strings that start with `prefix` literally.
fn like_prefix(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// True if the user exists.
pub async fn exists(backend: &AppState, id: &str) -> ApiResult<bool> {
    Ok(backend.db.get().await?.query_opt("SELECT 1 FROM users WHERE id = $1", &[&id]).await?.is_some())
}

#[cfg(test)]
mod tests {
    #[test]
    fn like_prefix_escapes_wildcards() {
        assert_eq!(super::like_prefix("a%b_c\\"), "a\\%b\\_c\\\\%");
        assert_eq!(super::like_prefix(""), "%");
    }
}
