//! What the gateway binary writes to its log: with `LOG_FORMAT=json` one
//! JSON object per line, a device's lines carrying the device's span
//! (node, user, device id, transport) and a request's lines its
//! `request_id` (the one the caller sent, echoed in `x-request-id`); errors
//! as fields; and, in either format, no ANSI escape codes when the log is
//! not a terminal (here: a file).

mod common;

use std::path::PathBuf;

use common::procs::{GatewayProc, Services};
use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn log_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}.log", unique(name)))
}

/// The log's lines, each parsed as JSON (the test fails on one that is not).
fn json_lines(path: &PathBuf) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // The last line may be half written.
    let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

#[tokio::test]
async fn json_log_lines_carry_the_device_and_request_spans() {
    let log = log_path("gateway-json");
    let services = Services::shared(&unique("ring"));
    let node = GatewayProc::spawn_logging_to(&services, &log, &[("LOG_FORMAT", "json"), ("RUST_LOG", "gateway=debug")]);
    node.wait_ready().await;

    let user = unique("u");
    let request_id = unique("req");
    let mut req = format!("ws://{}/posts", node.addr).into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", token_for(&user)).parse().unwrap());
    req.headers_mut().insert("x-request-id", request_id.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.expect("upgrade");
    assert_eq!(resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()), Some(request_id.as_str()));
    let bye = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
    ws.send(Message::Close(Some(bye))).await.unwrap();

    let device_line = |lines: &[serde_json::Value], message: &str| {
        lines.iter().find(|l| l["message"] == message && l["span"]["user"] == user.as_str()).cloned()
    };
    wait_for("the device's closed line", || async { device_line(&json_lines(&log), "device closed").is_some() }).await;
    let lines = json_lines(&log);
    for message in ["device connected", "device closed"] {
        let line = device_line(&lines, message).unwrap_or_else(|| panic!("no {message:?} line for {user}"));
        let span = &line["span"];
        assert_eq!(span["name"], "device", "{line}");
        assert_eq!(span["node"], node.id.as_str(), "{line}");
        assert_eq!(span["transport"], "ws", "{line}");
        assert!(span["device"].as_u64().is_some_and(|d| d > 0), "a device id: {line}");
        assert_eq!(line["level"], "DEBUG", "{line}");
    }
    let answered = lines
        .iter()
        .find(|l| l["message"] == "answered" && l["span"]["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("no line with request_id {request_id}"));
    assert_eq!(answered["status"], 101, "{answered}");
    assert_eq!(answered["span"]["name"], "request", "{answered}");
    assert_eq!(answered["span"]["path"], "/posts", "{answered}");

    // A refused request: its own generated id, the status as a field.
    let (status, _) = http_get(node.addr, "/posts").await;
    assert_eq!(status, 401);
    wait_for("the refusal's line", || async {
        json_lines(&log).iter().any(|l| l["message"] == "answered" && l["status"] == 401)
    })
    .await;
    let refused = json_lines(&log).into_iter().find(|l| l["message"] == "answered" && l["status"] == 401).unwrap();
    let generated = refused["span"]["request_id"].as_str().expect("an id");
    assert!(generated.starts_with(&format!("{}-", node.id)), "{refused}");

    let raw = std::fs::read(&log).unwrap();
    assert!(!raw.contains(&0x1b), "no ANSI escape codes in a log file");
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn a_text_log_that_is_not_a_terminal_has_no_colour_codes() {
    let log = log_path("gateway-text");
    let services = Services::shared(&unique("ring"));
    let node = GatewayProc::spawn_logging_to(&services, &log, &[("RUST_LOG", "gateway=debug")]);
    node.wait_ready().await;
    let (status, _) = http_get(node.addr, "/healthz").await;
    assert_eq!(status, 200);
    wait_for("the request's line", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("answered") && l.contains("/healthz"))
    })
    .await;
    let raw = std::fs::read(&log).unwrap();
    assert!(!raw.contains(&0x1b), "no ANSI escape codes: {}", String::from_utf8_lossy(&raw));
    let text = String::from_utf8(raw).unwrap();
    let line = text.lines().find(|l| l.contains("answered") && l.contains("/healthz")).unwrap();
    assert!(line.contains("request_id=") && line.contains("status=200"), "{line}");
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn a_misspelt_log_format_is_refused_at_start() {
    let log = log_path("gateway-bad");
    let services = Services::shared(&unique("ring"));
    let mut node = GatewayProc::spawn_logging_to(&services, &log, &[("LOG_FORMAT", "jsno")]);
    let status = tokio::time::timeout(WAIT, node.child.wait()).await.expect("exits at once").unwrap();
    assert_eq!(status.code(), Some(2));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("LOG_FORMAT"), "{text}");
    let _ = std::fs::remove_file(&log);
}
