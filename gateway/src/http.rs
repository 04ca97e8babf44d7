//! HTTP on the gateway port: the WebSocket endpoints (authenticated before
//! any upgrade) and the same paths as Server-Sent Events (`sse`),
//! `/v1/route`, `/metrics`, `/healthz` and `/readyz`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use contract::slot::slot_of;
use contract::token::{self, Claims, TokenError};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tracing::Instrument;

use crate::state::{Gateway, SocketGuard};
use crate::takeover::Takeover;
use crate::{connection, proxy, sse};

pub type Body = Full<Bytes>;

/// The WebSocket paths: the OTUS one and a short alias.
pub const WS_PATHS: [&str; 2] = ["/post/feed/posted", "/posts"];

pub async fn handle(
    gw: Arc<Gateway>,
    guard: Arc<SocketGuard>,
    takeover: Takeover,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // Every log line of the request (a refusal, a proxy failure, the
    // upgrade) carries its id, which the answer carries too. The span ends
    // with the answer: an upgraded device logs under its own (`Device::span`).
    let request_id = request_id(&gw, &req);
    let span =
        tracing::info_span!("request", request_id = %request_id, method = %req.method(), path = req.uri().path());
    let mut resp = dispatch(gw, guard, takeover, req).instrument(span.clone()).await;
    span.in_scope(|| tracing::debug!(status = resp.status().as_u16(), "answered"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    Ok(resp)
}

/// The caller's `x-request-id` if sane (as the backend takes it), else
/// this node's id and a counter: unique in the cluster, and no allocation
/// beyond the string.
fn request_id(gw: &Gateway, req: &Request<Incoming>) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!("{}-{:x}", gw.config.node_id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
        })
}

async fn dispatch(
    gw: Arc<Gateway>,
    guard: Arc<SocketGuard>,
    takeover: Takeover,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path();
    match (req.method(), path) {
        // An upgrade request is a WebSocket whatever its `Accept` says.
        (&Method::GET, p)
            if WS_PATHS.contains(&p)
                && !fastwebsockets::upgrade::is_upgrade_request(&req)
                && sse::wants_event_stream(req.headers()) =>
        {
            sse::serve(gw, guard, takeover, req).await
        }
        (&Method::GET, p) if WS_PATHS.contains(&p) => websocket(gw, guard, req).await,
        // WebSocket handshakes have no preflight: this is for SSE.
        (&Method::OPTIONS, p) if WS_PATHS.contains(&p) => sse::preflight(),
        (&Method::GET, "/v1/ring") => ring(&gw),
        (&Method::GET, "/v1/route") => route(&gw, &req),
        (&Method::GET, "/metrics") => {
            gw.metrics.refresh_memory();
            Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(gw.prometheus.render())))
                .expect("static response")
        }
        // Probes a browser page may make too (any origin).
        (&Method::GET, "/healthz") => any_origin(json(StatusCode::OK, r#"{"status":"ok"}"#.into())),
        // 200 only while the node serves its users: not while it waits for
        // its peers (handover), is fenced and rejoining, has lost its broker
        // consumer or its membership heartbeats, failed, or shuts down.
        (&Method::GET, "/readyz") => any_origin(match gw.readiness() {
            Ok(()) => json(StatusCode::OK, r#"{"status":"ready"}"#.into()),
            Err(why) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "status": "not ready", "reason": why, "message": why }).to_string(),
            ),
        }),
        _ => message(StatusCode::NOT_FOUND, "not found"),
    }
}

async fn websocket(gw: Arc<Gateway>, guard: Arc<SocketGuard>, mut req: Request<Incoming>) -> Response<Body> {
    if gw.is_draining() {
        gw.metrics.opened_draining.increment(1);
        return message(StatusCode::SERVICE_UNAVAILABLE, "node is shutting down, reconnect");
    }
    let claims = match authenticate(&gw, &req) {
        Ok(c) => c,
        Err(e) => {
            gw.metrics.opened_unauthorized.increment(1);
            return message(StatusCode::UNAUTHORIZED, &e.to_string());
        }
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        gw.metrics.opened_bad_request.increment(1);
        return message(StatusCode::UPGRADE_REQUIRED, "expected a WebSocket upgrade");
    }
    if let Some(resp) = check_handshake(&req) {
        gw.metrics.opened_bad_request.increment(1);
        return resp;
    }
    // Not the owner: proxy to it. A node never serves a user whose slot it
    // has not bound: events for that user would not reach it. So when a
    // proxied request arrives while the rings disagree (the proxy reconciled
    // first), the client is asked to retry in a moment.
    match gw.owner_of(&claims.sub) {
        Some((true, _)) => {}
        Some((false, owner)) => {
            if req.headers().contains_key(proxy::PROXIED_HEADER) {
                gw.metrics.opened_ring_changing.increment(1);
                let mut resp = message(StatusCode::SERVICE_UNAVAILABLE, "ring is changing, retry");
                resp.headers_mut().insert("retry-after", "1".parse().expect("static"));
                return resp;
            }
            let token = token::extract(req.headers(), req.uri().query()).unwrap_or_default().to_owned();
            return proxy::proxy(gw, guard, req, token, owner).await;
        }
        // Joining (see `handover`) with nobody else to hand over to.
        None => {
            gw.metrics.opened_ring_changing.increment(1);
            let mut resp = message(StatusCode::SERVICE_UNAVAILABLE, "node is joining the ring, retry");
            resp.headers_mut().insert("retry-after", "1".parse().expect("static"));
            return resp;
        }
    }
    let (resp, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            gw.metrics.opened_bad_request.increment(1);
            return message(StatusCode::BAD_REQUEST, &format!("bad WebSocket handshake: {e}"));
        }
    };
    let since = req.uri().query().and_then(|q| token::query_param(q, "since")).map(str::to_owned);
    if since.as_ref().is_some_and(|s| !token::is_valid_id(s)) {
        gw.metrics.opened_bad_request.increment(1);
        return message(StatusCode::BAD_REQUEST, "since: a post id is 1-64 of [A-Za-z0-9._-]");
    }
    let task_gw = gw.clone();
    gw.tasks.spawn(async move {
        let _guard = guard;
        match upgrade.await {
            // fastwebsockets' own framing is set aside (see `frame`): take
            // the raw upgraded stream back.
            Ok(ws) => {
                let req = connection::Request { user: claims.sub, token_expires_at: claims.exp, since };
                connection::serve(task_gw, ws.into_inner().into_inner(), req).await
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    resp.map(|_| Full::new(Bytes::new()))
}

/// What RFC 6455 §4.2.1 asks of an opening handshake beyond what
/// `is_upgrade_request` checks: HTTP/1.1 (1.0 has no upgrade; hyper would
/// otherwise switch protocols on it), version 13 (else 426 naming the one
/// supported, §4.4), and a key that is 16 bytes in base64. The refusal to
/// send, if any.
pub fn check_handshake(req: &Request<Incoming>) -> Option<Response<Body>> {
    use base64::Engine;
    if req.version() != hyper::Version::HTTP_11 {
        return Some(message(StatusCode::BAD_REQUEST, "a WebSocket upgrade needs HTTP/1.1"));
    }
    let version = req.headers().get_all("sec-websocket-version").into_iter().collect::<Vec<_>>();
    if version.len() != 1 || version[0] != "13" {
        let mut resp = message(StatusCode::UPGRADE_REQUIRED, "unsupported Sec-WebSocket-Version, 13 is");
        resp.headers_mut().insert("sec-websocket-version", hyper::header::HeaderValue::from_static("13"));
        return Some(resp);
    }
    let keys = req.headers().get_all("sec-websocket-key").into_iter().collect::<Vec<_>>();
    let key_ok = keys.len() == 1
        && base64::engine::general_purpose::STANDARD.decode(keys[0].as_bytes()).is_ok_and(|k| k.len() == 16);
    if !key_ok {
        return Some(message(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key must be 16 bytes in base64"));
    }
    None
}

/// `GET /v1/route`: which node owns the caller, for clients that want to
/// connect to it directly.
fn route(gw: &Gateway, req: &Request<Incoming>) -> Response<Body> {
    let claims = match authenticate(gw, req) {
        Ok(c) => c,
        Err(e) => return message(StatusCode::UNAUTHORIZED, &e.to_string()),
    };
    let slot = slot_of(&claims.sub);
    let ring = gw.ring();
    let Some(owner) = ring.owner(slot) else {
        return message(StatusCode::SERVICE_UNAVAILABLE, "no gateway node is a ring member");
    };
    let body = serde_json::json!({
        "user_id": claims.sub,
        "slot": slot,
        "node_id": owner.node_id,
        "url": owner.url,
    });
    json(StatusCode::OK, body.to_string())
}

/// `GET /v1/ring`: this node's view of the ring, the owner of every slot.
fn ring(gw: &Gateway) -> Response<Body> {
    let ring = gw.ring();
    let owners: Vec<&str> =
        (0..contract::slot::SLOTS).filter_map(|s| ring.owner(s).map(|m| m.node_id.as_str())).collect();
    let members: Vec<_> =
        ring.members().iter().map(|m| serde_json::json!({"node_id": m.node_id, "url": m.url})).collect();
    let body = serde_json::json!({ "node_id": gw.config.node_id(), "members": members, "owners": owners });
    json(StatusCode::OK, body.to_string())
}

/// Verifies the request's token; the error is the reason to tell the client.
fn authenticate(gw: &Gateway, req: &Request<Incoming>) -> Result<Claims, TokenError> {
    gw.tokens.authenticate(req.headers(), req.uri().query())
}

pub fn message(status: StatusCode, msg: &str) -> Response<Body> {
    json(status, serde_json::json!({ "message": msg }).to_string())
}

fn any_origin(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().insert("access-control-allow-origin", hyper::header::HeaderValue::from_static("*"));
    resp
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}
