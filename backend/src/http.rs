//! The HTTP surface: the router, the middleware that gives every request
//! an id, writes error bodies and records metrics, the extractors that
//! turn bad input into 400s, and the operational routes (`/metrics`,
//! `/healthz`, `/readyz`, `/openapi.json`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::de::DeserializeOwned;
use tower::ServiceExt;

use crate::error::{ApiError, ErrorInfo};
use crate::state::Backend;
use crate::{dialogs, friends, posts, users};

/// The OpenAPI description, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");
/// Largest request body accepted: a post of `MAX_POST_CHARS` 4-byte
/// characters plus JSON overhead fits.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub type AppState = Arc<Backend>;

/// The whole API.
pub fn router(backend: AppState) -> Router {
    Router::new()
        .route("/user/register", post(users::register))
        .route("/login", post(users::login))
        .route("/user/get/{id}", get(users::get))
        .route("/user/search", get(users::search))
        .route("/friend/set/{user_id}", put(friends::set))
        .route("/friend/delete/{user_id}", put(friends::delete))
        .route("/post/create", post(posts::create))
        .route("/post/update", put(posts::update))
        .route("/post/delete/{id}", put(posts::delete))
        .route("/post/get/{id}", get(posts::get))
        .route("/post/feed", get(posts::feed))
        .route("/dialog/{user_id}/send", post(dialogs::send))
        .route("/dialog/{user_id}/list", get(dialogs::list))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .merge(crate::web::router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        // At most max_in_flight at once, the rest shed at once (503), and
        // each bounded in time, body upload included.
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
                .load_shed()
                // Global: `Router::layer` makes one service per route, and
                // the limit is for all of them together.
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(backend.config.max_in_flight))
                .timeout(backend.config.request_timeout),
        )
        .layer(middleware::from_fn_with_state(backend.clone(), observe))
        .with_state(backend)
}

/// Gives the request an id (the caller's `x-request-id` if sane), turns an
/// [`ErrorInfo`] into the JSON error body, and records metrics.
async fn observe(State(backend): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    // The router serves only these: any other method is one label value,
    // or made-up methods would each add a time series, forever.
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        _ => "other",
    };
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    // Every log line of this request (the cause of a 500 among them)
    // carries its id and route.
    let span = tracing::info_span!("request", request_id = %request_id, route = %route);
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    if let Some(info) = resp.extensions_mut().remove::<ErrorInfo>() {
        let body = serde_json::json!({"message": info.message, "request_id": request_id, "code": info.code});
        let (mut parts, _) = resp.into_parts();
        parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        parts.headers.remove(header::CONTENT_LENGTH);
        resp = Response::from_parts(parts, axum::body::Body::from(body.to_string()));
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    backend.metrics.http_request(method, &route, resp.status().as_u16(), start.elapsed());
    resp
}

async fn metrics(State(backend): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], backend.metrics.render())
}

/// Ready when PostgreSQL and Redis answer. The broker is not asked: the
/// API accepts posts without it (their fan-out waits in the outbox).
async fn readyz(State(backend): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    backend.db.get().await?.query_one("SELECT 1", &[]).await?;
    let mut redis = backend.feed.redis.clone();
    redis::cmd("PING").query_async::<()>(&mut redis).await?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

/// What a `backend worker` process serves: its metrics and liveness.
pub fn metrics_router(backend: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .merge(crate::web::router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(backend)
}

/// The answer to a connection over `--max-connections`, written without
/// reading its request.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 68\r\n\r\n{\"message\":\"too many connections, retry later\",\"code\":\"unavailable\"}";
/// Pause after a failed accept (out of file descriptors): retrying at once
/// would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` until `shutdown`, then lets requests in
/// flight finish (the caller bounds that with the grace timeout).
/// Connections are capped at `max_connections`, and each has hyper's
/// header-read timer, which also closes kept-alive connections left idle.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    backend: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = &backend.config;
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(config.header_read_timeout);
    let service = app.into_service::<hyper::body::Incoming>();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            backend.metrics.connections_refused.increment(1);
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(OVER_CAPACITY)).await;
            });
            continue;
        };
        let service = service.clone().map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ClientAddr(Some(peer.ip())));
            req
        });
        let service = hyper_util::service::TowerToHyperService::new(service);
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Turns the errors of the timeout and load-shed layers into API errors.
async fn overloaded(e: tower::BoxError) -> ApiError {
    if e.is::<tower::timeout::error::Elapsed>() {
        ApiError::Unavailable("request timed out".into())
    } else if e.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Unavailable("too many requests in flight".into())
    } else {
        ApiError::Internal(anyhow::anyhow!("request layer: {e}"))
    }
}

/// The client's address (the TCP peer; `None` where there is none).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<ClientAddr, Self::Rejection> {
        Ok(parts.extensions.get::<ClientAddr>().copied().unwrap_or(ClientAddr(None)))
    }
}

/// The authenticated caller's user id.
pub struct Caller(pub String);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, backend: &AppState) -> Result<Caller, ApiError> {
        let result = backend.tokens.authenticate(&parts.headers, parts.uri.query());
        result.map(|c| Caller(c.sub)).map_err(|e| ApiError::Unauthorized(e.to_string()))
    }
}

/// `axum::Json`, with rejections as 400s that say what is wrong.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Json<T>, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => {
                Err(ApiError::bad("expected a JSON body with content-type: application/json"))
            }
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::TooLarge(format!("request body is over {MAX_BODY_BYTES} bytes")))
            }
            Err(e) => Err(ApiError::bad(e.body_text())),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query`, with rejections as 400s.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Query<T>, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e: QueryRejection| ApiError::bad(e.body_text()))
    }
}

/// `axum::extract::Path`, with rejections as 400s.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Path<T>, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e: PathRejection| ApiError::bad(e.body_text()))
    }
}

/// An empty 200.
pub fn ok() -> Response {
    StatusCode::OK.into_response()
}
