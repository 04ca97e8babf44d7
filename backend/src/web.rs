//! The demo page at `/`: static files compiled into the binary (so the
//! backend ships as one file and a page never mismatches its server), the
//! JavaScript client from `clients/js`, and `/config.json`, which tells the
//! page where the gateway is.
//!
//! Everything here is public (no token): the page logs in through the API.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::http::{AppState, Json};

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE_CSS: &str = include_str!("../web/style.css");
/// The same file `clients/js` publishes: the page is its first user.
const CLIENT_JS: &str = include_str!("../../clients/js/src/feed-client.js");

/// The page's routes, merged into the API router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/feed-client.js", get(|| async { asset("text/javascript; charset=utf-8", CLIENT_JS) }))
        .route("/config.json", get(config))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    // `no-cache`: revalidate every load, so a new binary's page is seen at
    // once (the files are small; there is no fingerprinting to cache by).
    let mut resp = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// What the page needs to know that only the deployment knows.
async fn config(State(backend): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "gateway_url": backend.config.gateway_public_url,
        "ping_interval_ms": backend.config.gateway_ping_interval.as_millis() as u64,
    }))
}
