//! Server-Sent Events on the WebSocket paths: the same events, to the same
//! devices, for clients that cannot keep a WebSocket or want the
//! browser's own reconnect (`EventSource`). The wire format is in
//! ARCHITECTURE.md, "Server-Sent Events".
//!
//! An SSE device is a device like any other: registered in `sessions`
//! under the same per-user limit, fed through the same bounded outbox,
//! recovered by `connection::recover`, pinged and expired by `keepalive`,
//! closed by the same rules. Only its writer differs.
//!
//! - [`wire`]: the bytes of the stream.
//! - [`stream`]: one SSE device's task.
//! - [`relay`]: a non-owner relays the stream from the owner.

pub mod relay;
pub mod stream;
pub mod wire;

use std::sync::Arc;

use bytes::Bytes;
use contract::token;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::http::{Body, message};
use crate::outbox::Close;
use crate::proxy::PROXIED_HEADER;
use crate::sessions::Transport;
use crate::state::{Gateway, SocketGuard};
use crate::takeover::Takeover;

/// The header that carries the id of the last event a client saw.
const LAST_EVENT_ID: &str = "last-event-id";
/// How long a browser may keep a preflight's answer (a day).
const PREFLIGHT_MAX_AGE_SECS: u32 = 86_400;

/// Whether the request's `Accept` names `text/event-stream` (with a
/// q-value above zero, if any).
pub fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers.get_all(ACCEPT).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let refused =
            parts.any(|p| p.strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)));
        media.eq_ignore_ascii_case("text/event-stream") && !refused
    })
}

/// The answer to a CORS preflight on the SSE paths: any origin may read
/// the stream (its token is no cookie), with the headers a client sends.
pub fn preflight() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header("access-control-allow-origin", "*")
        .header("access-control-allow-methods", "GET")
        .header("access-control-allow-headers", "authorization, last-event-id, accept, cache-control")
        .header("access-control-max-age", PREFLIGHT_MAX_AGE_SECS.to_string())
        .body(Body::new(Bytes::new()))
        .expect("static response")
}

/// A refusal before the stream starts: the status, the usual JSON
/// message, readable from any origin.
pub(crate) fn refuse(status: StatusCode, msg: &str) -> Response<Body> {
    let mut resp = message(status, msg);
    let h = resp.headers_mut();
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert("retry-after", HeaderValue::from_static("1"));
    }
    resp
}

/// Serves an SSE request on a WebSocket path: checks it as the WebSocket
/// path does (shutdown, token, resume point, owner, device limit), then
/// takes the socket over from hyper and streams; or relays to the owner.
pub async fn serve(
    gw: Arc<Gateway>,
    guard: Arc<SocketGuard>,
    takeover: Takeover,
    req: Request<Incoming>,
) -> Response<Body> {
    if gw.is_draining() {
        gw.metrics.opened_draining.increment(1);
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "node is shutting down, reconnect");
    }
    let claims = match gw.tokens.authenticate(req.headers(), req.uri().query()) {
        Ok(c) => c,
        Err(e) => {
            gw.metrics.opened_unauthorized.increment(1);
            return refuse(StatusCode::UNAUTHORIZED, &e.to_string());
        }
    };
    let since = match resume_point(&req) {
        Ok(s) => s,
        Err(why) => {
            gw.metrics.opened_bad_request.increment(1);
            return refuse(StatusCode::BAD_REQUEST, why);
        }
    };
    // Not the owner: relay to it (see the WebSocket path in `http`).
    match gw.owner_of(&claims.sub) {
        Some((true, _)) => {}
        Some((false, owner)) => {
            if req.headers().contains_key(PROXIED_HEADER) {
                return refuse(StatusCode::SERVICE_UNAVAILABLE, "ring is changing, retry");
            }
            let token = token::extract(req.headers(), req.uri().query()).unwrap_or_default().to_owned();
            return relay::relay(gw, guard, takeover, &req, &token, owner, since.as_deref()).await;
        }
        // Joining (see `handover`) with nobody else to hand over to.
        None => return refuse(StatusCode::SERVICE_UNAVAILABLE, "node is joining the ring, retry"),
    }
    let device = match gw.sessions.register(&claims.sub, claims.exp, Transport::Sse) {
        Ok(d) => d,
        Err(e) => {
            gw.metrics.opened_too_many_devices.increment(1);
            return refuse(StatusCode::TOO_MANY_REQUESTS, &e.to_string());
        }
    };
    let Some(socket) = takeover.take() else {
        gw.sessions.unregister(&device);
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "connection already taken over");
    };
    gw.metrics.opened_ok.increment(1);
    // The ring may have moved this user since the ownership check; a
    // reconcile that ran before the registration did not see this device.
    match gw.owner_of(&claims.sub) {
        Some((true, _)) => {}
        Some((false, owner)) => {
            if device.outbox.close(Close::Frame { code: crate::broker::CLOSE_MOVED, reason: owner.url }) {
                gw.metrics.closed(crate::close::CloseReason::Moved);
            }
        }
        None => {
            let rejoining =
                Close::Frame { code: crate::close::CloseCode::GoingAway, reason: "node rejoining, reconnect".into() };
            if device.outbox.close(rejoining) {
                // Not serving yet (handover): the same 1001 as a fenced node's.
                gw.metrics.closed(crate::close::CloseReason::Fenced);
            }
        }
    }
    let task_gw = gw.clone();
    gw.tasks.spawn(async move {
        let _guard = guard;
        stream::serve(task_gw, socket, device, since).await;
    });
    // hyper writes this into nothing: the socket is the stream's now.
    Response::new(Body::new(Bytes::new()))
}

/// The resume point: `Last-Event-ID` (what `EventSource` sends on a
/// reconnect, set from the last `id:` it saw), else `?since=` (what the
/// first connect carried: `EventSource` reconnects to the same URL, so the
/// header is the newer). An empty header means none, as for `EventSource`.
fn resume_point(req: &Request<Incoming>) -> Result<Option<String>, &'static str> {
    let mut headers = req.headers().get_all(LAST_EVENT_ID).iter();
    let header = match (headers.next(), headers.next()) {
        (Some(_), Some(_)) => return Err("more than one Last-Event-ID"),
        (Some(v), None) => Some(v.to_str().map_err(|_| "Last-Event-ID: a post id is 1-64 of [A-Za-z0-9._-]")?.trim()),
        (None, _) => None,
    };
    if let Some(id) = header.filter(|id| !id.is_empty()) {
        if !token::is_valid_id(id) {
            return Err("Last-Event-ID: a post id is 1-64 of [A-Za-z0-9._-]");
        }
        return Ok(Some(id.to_owned()));
    }
    match req.uri().query().and_then(|q| token::query_param(q, "since")) {
        Some(s) if !token::is_valid_id(s) => Err("since: a post id is 1-64 of [A-Za-z0-9._-]"),
        s => Ok(s.map(str::to_owned)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(values: &[&str]) -> bool {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ACCEPT, v.parse().unwrap());
        }
        wants_event_stream(&h)
    }

    #[test]
    fn accept_must_name_the_event_stream() {
        assert!(accept(&["text/event-stream"]));
        assert!(accept(&["Text/Event-Stream"]));
        assert!(accept(&["text/html, text/event-stream;q=0.9"]));
        assert!(accept(&["text/html", "text/event-stream"]));
        assert!(!accept(&[]));
        assert!(!accept(&["*/*"]), "a WebSocket client's or curl's default is not a request for SSE");
        assert!(!accept(&["text/event-stream;q=0"]));
        assert!(!accept(&["text/event-streams"]));
    }
}
