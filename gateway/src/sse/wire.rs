//! The bytes of an SSE stream (ARCHITECTURE.md, "Server-Sent Events").
//!
//! Events reach an SSE device as the encoded WebSocket frames that every
//! device's outbox holds (delivery does not know transports); they are
//! re-framed here as they are written. The event's JSON is a slice of the
//! shared frame, never copied; only its small `id:` prefix is made per
//! device.

use std::borrow::Cow;

use bytes::Bytes;
use contract::token::is_valid_id;

use crate::close::CloseCode;
use crate::frame;

/// The reconnection delay a client's `EventSource` uses after the stream
/// ends or breaks (the `retry:` field). One second: what browsers use by
/// default, short enough that a client moved by a node's shutdown is back
/// within a second or two, and its `Last-Event-ID` recovers what it missed.
pub const RETRY_MS: u64 = 1000;

/// A keepalive comment; clients ignore it, but it shows them (and every
/// proxy between) that the stream is alive.
pub const PING: &[u8] = b": ping\n\n";

/// What ends every event: the blank line that dispatches it.
const END: &[u8] = b"\n\n";

/// The answer head and the first field, `retry:`. The body has no length
/// and no chunked encoding: it ends when the gateway closes the socket.
pub fn head() -> Bytes {
    Bytes::from(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
         x-accel-buffering: no\r\naccess-control-allow-origin: *\r\nconnection: close\r\n\r\n\
         retry: {RETRY_MS}\n\n"
    ))
}

/// The fields of a message that name it: an event's `id`, a control
/// message's `type`.
#[derive(serde::Deserialize)]
struct Names<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

/// Appends the SSE form of a queued text frame to `out`: `id: <id>` for an
/// event, `event: <type>` for a control message without an id (such as
/// `recovery_cut`), then its JSON as `data:`.
pub fn message(frame: &Bytes, out: &mut Vec<Bytes>) {
    let Some(payload) = frame::payload(frame) else { return };
    let json = frame.slice(frame.len() - payload.len()..);
    let names = serde_json::from_slice::<Names>(&json).ok();
    let mut prefix = String::with_capacity(80);
    match names {
        // Only ids of the contract alphabet: they cannot hold a line
        // break or a NUL, which would break the field (or make
        // `EventSource` ignore it).
        Some(Names { id: Some(id), .. }) if is_valid_id(&id) => {
            prefix.push_str("id: ");
            prefix.push_str(&id);
            prefix.push('\n');
        }
        Some(Names { kind: Some(kind), .. }) if is_valid_id(&kind) => {
            prefix.push_str("event: ");
            prefix.push_str(&kind);
            prefix.push('\n');
        }
        _ => {}
    }
    if !json.iter().any(|b| matches!(b, b'\r' | b'\n')) {
        prefix.push_str("data: ");
        out.push(Bytes::from(prefix));
        out.push(json);
        out.push(Bytes::from_static(END));
        return;
    }
    // A line break can only be whitespace between JSON tokens (strings
    // cannot hold one): one `data:` line per line, which the client joins
    // with "\n" into the same JSON.
    let mut buf = prefix.into_bytes();
    for line in json.split(|b| matches!(b, b'\r' | b'\n')).filter(|l| !l.is_empty()) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(line);
        buf.push(b'\n');
    }
    buf.push(b'\n');
    out.push(Bytes::from(buf));
}

/// Where a WebSocket would close with `code`: an `event: close` whose data
/// is `{"code", "reason"}`. The stream ends after it.
pub fn close(code: CloseCode, reason: &str) -> Bytes {
    let data = serde_json::json!({ "code": code.code(), "reason": reason });
    Bytes::from(format!("event: close\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(json: &str) -> String {
        let mut out = Vec::new();
        message(&frame::text(json.as_bytes()), &mut out);
        out.iter().map(|b| std::str::from_utf8(b).unwrap()).collect()
    }

    #[test]
    fn an_event_carries_its_id_and_its_exact_json() {
        let json = r#"{"type":"post","id":"p-1","ts":5,"data":{"postText":"a\nb"}}"#;
        assert_eq!(sse(json), format!("id: p-1\ndata: {json}\n\n"));
    }

    #[test]
    fn a_control_message_is_named_by_its_type() {
        let json = r#"{"type":"recovery_cut","since":"0","skipped":7,"first_id":"p-8"}"#;
        assert_eq!(sse(json), format!("event: recovery_cut\ndata: {json}\n\n"));
    }

    #[test]
    fn ids_and_types_that_could_break_a_field_are_left_out() {
        assert_eq!(sse(r#"{"id":"a\nb","x":1}"#), "data: {\"id\":\"a\\nb\",\"x\":1}\n\n");
        assert_eq!(sse(r#"{"type":"a b"}"#), "data: {\"type\":\"a b\"}\n\n");
        assert_eq!(sse("[1,2]"), "data: [1,2]\n\n");
    }

    #[test]
    fn line_breaks_between_tokens_become_data_lines_of_the_same_json() {
        let json = "{\r\n  \"type\": \"post\",\n  \"id\": \"p-2\"\r}";
        let text = sse(json);
        assert_eq!(text, "id: p-2\ndata: {\ndata:   \"type\": \"post\",\ndata:   \"id\": \"p-2\"\ndata: }\n\n");
        // What a client reassembles (data lines joined with "\n") parses
        // to the same value.
        let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        let joined: serde_json::Value = serde_json::from_str(&data.join("\n")).unwrap();
        assert_eq!(joined, serde_json::from_str::<serde_json::Value>(json).unwrap());
    }

    #[test]
    fn close_events_carry_the_websocket_code_and_reason() {
        let c = close(CloseCode::Moved, "ws://10.0.0.2:8080");
        assert_eq!(&c[..], b"event: close\ndata: {\"code\":4001,\"reason\":\"ws://10.0.0.2:8080\"}\n\n");
    }

    #[test]
    fn the_head_starts_the_stream_with_retry() {
        let h = head();
        let text = std::str::from_utf8(&h).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("content-type: text/event-stream\r\n"));
        assert!(text.ends_with(&format!("\r\n\r\nretry: {RETRY_MS}\n\n")));
    }
}
