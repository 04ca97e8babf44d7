//! The realtime wire formats.
//!
//! A RabbitMQ message carries `{"recipients": [...], "event": {...}}`. The
//! `event` object is what every device receives, byte for byte: gateways
//! never re-serialize it per device.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// AMQP header: publish time in unix microseconds (any AMQP integer type).
pub const HEADER_PUBLISHED_AT: &str = "x-published-at";
/// AMQP header: how many times a gateway re-published the message (absent = 0).
pub const HEADER_HOPS: &str = "x-hops";

/// A broker message as a gateway reads it, borrowing from the body.
#[derive(Debug, Deserialize)]
pub struct InboundMessage<'a> {
    #[serde(borrow)]
    pub recipients: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    pub event: &'a RawValue,
}

/// A broker message as a publisher writes it.
#[derive(Debug, Serialize)]
pub struct OutboundMessage<'a, E: Serialize> {
    pub recipients: &'a [&'a str],
    pub event: &'a E,
}

/// The event a device receives when a followed user posts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostEvent {
    /// Always `"post"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The post id; also what `?since=` takes.
    pub id: String,
    /// Publish time, unix milliseconds.
    pub ts: u64,
    pub data: PostData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostData {
    #[serde(rename = "postId")]
    pub post_id: String,
    #[serde(rename = "postText")]
    pub post_text: String,
    pub author_user_id: String,
}

impl PostEvent {
    pub fn new(post_id: &str, text: &str, author: &str, ts_ms: u64) -> PostEvent {
        PostEvent {
            kind: "post".into(),
            id: post_id.into(),
            ts: ts_ms,
            data: PostData { post_id: post_id.into(), post_text: text.into(), author_user_id: author.into() },
        }
    }
}

/// Encodes a broker message body.
pub fn encode<E: Serialize>(recipients: &[&str], event: &E) -> Vec<u8> {
    serde_json::to_vec(&OutboundMessage { recipients, event }).expect("events serialize")
}

/// Decodes a broker message body.
pub fn decode(body: &[u8]) -> Result<InboundMessage<'_>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// Unix time now, in microseconds, for `x-published-at`.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_bytes_pass_through_unchanged() {
        let ev = PostEvent::new("p1", "hi \"there\"", "a", 7);
        let body = encode(&["u1", "u\\2"], &ev);
        let msg = decode(&body).unwrap();
        assert_eq!(msg.recipients, vec!["u1", "u\\2"]);
        assert_eq!(msg.event.get(), serde_json::to_string(&ev).unwrap());
        let back: PostEvent = serde_json::from_str(msg.event.get()).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn event_has_spec_field_names() {
        let v = serde_json::to_value(PostEvent::new("p", "t", "a", 1)).unwrap();
        assert_eq!(v["type"], "post");
        assert_eq!(v["data"]["postId"], "p");
        assert_eq!(v["data"]["postText"], "t");
        assert_eq!(v["data"]["author_user_id"], "a");
    }
}
