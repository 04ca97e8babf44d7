//! Server-Sent Events on the WebSocket paths (ARCHITECTURE.md, "Server-Sent
//! Events"): real nodes (in-process, or processes where metrics or a
//! shutdown must be their own), the real RabbitMQ and Redis, and a raw
//! HTTP client on a real socket that parses the stream itself.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::procs::{GatewayProc, Services, metric};
use common::*;
use contract::event::PostEvent;
use contract::ring::{Member, Ring};
use contract::slot::slot_of;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// One dispatched block of the stream: an event, or a comment.
#[derive(Debug, Default, Clone, PartialEq)]
struct Block {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    retry: Option<u64>,
    comments: Vec<String>,
}

/// A raw SSE client: the request is written by hand, the answer head and
/// the stream are parsed here (lines end with "\n", as the gateway writes).
struct Sse {
    s: TcpStream,
    buf: Vec<u8>,
    status: u16,
    head: String,
}

/// The request head for an SSE stream on `path` (with its query), with
/// `extra` header lines (each ending in "\r\n").
fn sse_head(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n{extra}\r\n")
}

impl Sse {
    async fn request(addr: SocketAddr, head: &str) -> Sse {
        Sse::request_on(TcpStream::connect(addr).await.unwrap(), head).await
    }

    /// Like [`Sse::request`], on a socket the caller connected.
    async fn request_on(mut s: TcpStream, head: &str) -> Sse {
        s.write_all(head.as_bytes()).await.unwrap();
        let mut sse = Sse { s, buf: Vec::new(), status: 0, head: String::new() };
        let end = loop {
            if let Some(end) = sse.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            assert!(sse.read_some(WAIT).await, "an answer head; got {:?}", String::from_utf8_lossy(&sse.buf));
        };
        sse.head = String::from_utf8_lossy(&sse.buf[..end]).into_owned();
        sse.status = sse.head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        sse.buf.drain(..end);
        sse
    }

    /// Opens a stream for `user` with `?token=` (as `EventSource` does) and
    /// reads the first block, which must be `retry:`.
    async fn open(addr: SocketAddr, user: &str, query: &str, extra: &str) -> Sse {
        let path = format!("/post/feed/posted?token={}{query}", token_for(user));
        let mut sse = Sse::request(addr, &sse_head(&path, extra)).await;
        assert_eq!(sse.status, 200, "{}", sse.head);
        let first = sse.next_within(WAIT).await.expect("the retry field first");
        assert_eq!(first.retry, Some(1000), "{first:?}");
        sse
    }

    /// Like [`Sse::open`], but a 503 (a node taking over or handing over
    /// the user, with `Retry-After`) is retried, as `EventSource` does,
    /// until the deadline.
    async fn open_when_served(addr: SocketAddr, user: &str) -> Sse {
        let deadline = tokio::time::Instant::now() + WAIT;
        let path = format!("/post/feed/posted?token={}", token_for(user));
        loop {
            let mut sse = Sse::request(addr, &sse_head(&path, "")).await;
            if sse.status == 200 {
                let first = sse.next_within(WAIT).await.expect("the retry field first");
                assert_eq!(first.retry, Some(1000), "{first:?}");
                return sse;
            }
            assert_eq!(sse.status, 503, "{}", sse.head);
            assert!(tokio::time::Instant::now() < deadline, "still 503 after {WAIT:?}: {}", sse.head);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    /// Reads more; false at the end of the stream or after `within`.
    async fn read_some(&mut self, within: Duration) -> bool {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(within, self.s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// The next block (up to a blank line), or `None` if the stream ends
    /// or nothing whole comes within `within`.
    async fn next_within(&mut self, within: Duration) -> Option<Block> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let text = String::from_utf8(self.buf.drain(..end + 2).collect()).expect("UTF-8");
                return Some(parse_block(&text));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !self.read_some(left).await {
                return None;
            }
        }
    }

    /// The next block that is an event (comments skipped).
    async fn next_event(&mut self) -> Block {
        loop {
            let b = self.next_within(WAIT).await.expect("an event arrives");
            if b.data.is_some() {
                return b;
            }
        }
    }

    /// Whether the server ended the stream within `within` (blocks before
    /// the end are dropped).
    async fn ended_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.buf.clear();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(left, self.s.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn parse_block(text: &str) -> Block {
    let mut b = Block::default();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix(':') {
            b.comments.push(c.trim().to_owned());
            continue;
        }
        let (field, value) =
            line.split_once(':').map(|(f, v)| (f, v.strip_prefix(' ').unwrap_or(v))).unwrap_or((line, ""));
        match field {
            "id" => b.id = Some(value.to_owned()),
            "event" => b.event = Some(value.to_owned()),
            "retry" => b.retry = value.parse().ok(),
            "data" => match &mut b.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => b.data = Some(value.to_owned()),
            },
            "" => {}
            other => panic!("unknown field {other:?} in {text:?}"),
        }
    }
    b
}

/// The `event: close` data, checked to be one.
fn close_of(b: &Block) -> (u64, String) {
    assert_eq!(b.event.as_deref(), Some("close"), "{b:?}");
    let v: serde_json::Value = serde_json::from_str(b.data.as_deref().unwrap()).unwrap();
    (v["code"].as_u64().unwrap(), v["reason"].as_str().unwrap().to_owned())
}

/// Reads blocks up to an `event: close`; returns (events before it, code,
/// reason), checking the stream ends right after.
async fn until_close(sse: &mut Sse) -> (Vec<Block>, u64, String) {
    let mut events = Vec::new();
    loop {
        let b = sse.next_within(WAIT).await.expect("a close event");
        if b.event.as_deref() == Some("close") {
            let (code, reason) = close_of(&b);
            assert!(sse.ended_within(WAIT).await, "the stream ends after its close event");
            return (events, code, reason);
        }
        if b.data.is_some() {
            events.push(b);
        }
    }
}

/// Status and body of a refused SSE request.
async fn refused(addr: SocketAddr, head: &str) -> (u16, String, Sse) {
    let mut sse = Sse::request(addr, head).await;
    let len: usize = sse.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while sse.buf.len() < len && sse.read_some(WAIT).await {}
    let body = String::from_utf8_lossy(&sse.buf).into_owned();
    (sse.status, body, sse)
}

#[tokio::test]
async fn events_arrive_with_their_ids_and_the_websocket_json() {
    let node = Node::start(|_| {}).await;
    let user = unique("u");
    let mut sse = Sse::open(node.addr, &user, "", "").await;
    assert_eq!(sse.header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(sse.header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(sse.header("x-accel-buffering").as_deref(), Some("no"));
    assert_eq!(sse.header("access-control-allow-origin").as_deref(), Some("*"));
    // A WebSocket device of the same user: the data must be its frames.
    let mut ws = connect(&node, &user).await;
    wait_for("both devices registered", || async { node.gw.sessions.device_count_of(&user) == 2 }).await;

    let publisher = Publisher::new().await;
    let posts: Vec<PostEvent> = (0..3).map(|_| post(&unique("p"))).collect();
    for p in &posts {
        publisher.publish(&[&user], p).await;
    }
    for p in &posts {
        let b = sse.next_event().await;
        assert_eq!(b.id.as_deref(), Some(p.id.as_str()), "{b:?}");
        assert_eq!(b.event, None, "an event is an unnamed message");
        let frame = loop {
            match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame") {
                Some(Ok(Message::Text(t))) => break t.to_string(),
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(b.data.as_deref(), Some(frame.as_str()), "the exact JSON of the WebSocket frame");
        assert_eq!(serde_json::from_str::<PostEvent>(&frame).unwrap(), *p);
    }
}

#[tokio::test]
async fn last_event_id_recovers_exactly_the_missed_events() {
    let node = Node::start(|_| {}).await;
    let user = unique("u");
    let publisher = Publisher::new().await;
    let mut redis = redis_conn().await;
    let ring = node.gw.ring();
    let recipients = vec![user.clone()];
    let posts: Vec<PostEvent> = (0..6).map(|i| post(&post_id(i))).collect();

    let mut sse = Sse::open(node.addr, &user, "", "").await;
    for p in &posts[..2] {
        post_like_backend(&mut redis, &publisher, &ring, &recipients, p).await;
        assert_eq!(sse.next_event().await.id.as_deref(), Some(p.id.as_str()));
    }
    drop(sse);
    wait_for("device gone", || async { node.gw.sessions.device_count_of(&user) == 0 }).await;
    // Missed while away. The node must have consumed them before the
    // device is back: one consumed later would reach it live too, after
    // the replay (a duplicate, which at-least-once allows but this test
    // would read as the live event; CI saw it under load).
    let before = consumed(node.addr).await;
    for p in &posts[2..5] {
        post_like_backend(&mut redis, &publisher, &ring, &recipients, p).await;
    }
    wait_consumed(node.addr, before + 3.0).await;
    // What EventSource does on a reconnect: the same URL (whose `since`
    // was the first connect's) and Last-Event-ID, which wins.
    let query = format!("&since={}", posts[0].id);
    let mut sse = Sse::open(node.addr, &user, &query, &format!("last-event-id: {}\r\n", posts[1].id)).await;
    for p in &posts[2..5] {
        let b = sse.next_event().await;
        assert_eq!(b.id.as_deref(), Some(p.id.as_str()), "the missed ones, in order, nothing older");
        assert_eq!(serde_json::from_str::<PostEvent>(b.data.as_deref().unwrap()).unwrap().id, p.id);
    }
    // Then live ones, and nothing else in between.
    post_like_backend(&mut redis, &publisher, &ring, &recipients, &posts[5]).await;
    assert_eq!(sse.next_event().await.id.as_deref(), Some(posts[5].id.as_str()));
    // Without the header, `?since=` is the resume point.
    let mut again = Sse::open(node.addr, &user, &format!("&since={}", posts[3].id), "").await;
    for p in &posts[4..6] {
        assert_eq!(again.next_event().await.id.as_deref(), Some(p.id.as_str()));
    }
}

#[tokio::test]
async fn a_device_far_behind_gets_recovery_cut_as_a_named_event() {
    let node = Node::start(|c| c.max_replay = 2).await;
    let user = unique("u");
    let publisher = Publisher::new().await;
    let mut redis = redis_conn().await;
    let ring = node.gw.ring();
    let posts: Vec<PostEvent> = (0..5).map(|i| post(&post_id(i))).collect();
    let before = consumed(node.addr).await;
    for p in &posts {
        post_like_backend(&mut redis, &publisher, &ring, std::slice::from_ref(&user), p).await;
    }
    // Consumed (and dropped: no device yet) before the device connects,
    // so that none arrives live among the replay's frames.
    wait_consumed(node.addr, before + 5.0).await;
    let mut sse = Sse::open(node.addr, &user, "", &format!("last-event-id: {}\r\n", posts[0].id)).await;
    let cut = sse.next_event().await;
    assert_eq!(cut.event.as_deref(), Some("recovery_cut"), "{cut:?}");
    assert_eq!(cut.id, None, "a control message leaves Last-Event-ID alone");
    let v: serde_json::Value = serde_json::from_str(cut.data.as_deref().unwrap()).unwrap();
    assert_eq!((v["skipped"].as_u64(), v["first_id"].as_str()), (Some(2), Some(posts[3].id.as_str())));
    for p in &posts[3..] {
        assert_eq!(sse.next_event().await.id.as_deref(), Some(p.id.as_str()));
    }
}

#[tokio::test]
async fn bad_tokens_and_resume_points_are_refused_before_the_stream() {
    let node = Node::start(|_| {}).await;
    let user = unique("u");
    let good = token_for(&user);
    let other = token_for(&unique("v"));
    let cases = [
        (sse_head("/posts", ""), 401, "missing token"),
        (sse_head("/posts?token=not.a.jwt", ""), 401, "token malformed"),
        (sse_head(&format!("/posts?token={good}"), &format!("authorization: Bearer {other}\r\n")), 401, "differ"),
        (sse_head(&format!("/posts?token={good}&token={other}"), ""), 401, "differ"),
        (sse_head(&format!("/posts?token={good}"), "last-event-id: a b\r\n"), 400, "Last-Event-ID"),
        (sse_head(&format!("/posts?token={good}&since=%00"), ""), 400, "since"),
        (sse_head(&format!("/posts?token={good}"), "last-event-id: a\r\nlast-event-id: b\r\n"), 400, "more than one"),
    ];
    for (head, status, says) in cases {
        let (got, body, sse) = refused(node.addr, &head).await;
        assert_eq!(got, status, "{head}: {body}");
        assert!(body.contains(says), "{head}: {body}");
        assert_eq!(sse.header("access-control-allow-origin").as_deref(), Some("*"), "{head}");
    }
    // The same token twice is one token.
    let same = sse_head(&format!("/posts?token={good}"), &format!("authorization: Bearer {good}\r\n"));
    let held = Sse::request(node.addr, &same).await;
    assert_eq!(held.status, 200);
    // A preflight is answered for any origin.
    let (status, _, pre) = refused(
        node.addr,
        "OPTIONS /posts HTTP/1.1\r\nhost: x\r\norigin: http://page\r\naccess-control-request-method: GET\r\n\
         access-control-request-headers: last-event-id\r\n\r\n",
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(pre.header("access-control-allow-origin").as_deref(), Some("*"));
    assert!(pre.header("access-control-allow-headers").unwrap().contains("last-event-id"));
    // Neither SSE nor an upgrade: still 426, as before.
    let (status, _, _) = refused(node.addr, &format!("GET /posts?token={good} HTTP/1.1\r\nhost: x\r\n\r\n")).await;
    assert_eq!(status, 426);
    assert_eq!(node.gw.sessions.device_count(), 1, "only the good request holds a device");
    drop(held);
}

#[tokio::test]
async fn the_device_limit_counts_both_transports() {
    let node = Node::start(|c| c.max_devices_per_user = 2).await;
    let user = unique("u");
    let _ws = connect(&node, &user).await;
    let _sse = Sse::open(node.addr, &user, "", "").await;
    let (status, body, _) = refused(node.addr, &sse_head(&format!("/posts?token={}", token_for(&user)), "")).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("already holds 2 devices"), "{body}");
    assert_eq!(node.gw.sessions.device_count_of(&user), 2);
}

#[tokio::test]
async fn a_slow_sse_device_gets_4008_while_a_healthy_device_keeps_receiving() {
    let node = Node::start(|c| c.send_queue = 16).await;
    let user = unique("u");
    let mut healthy = connect(&node, &user).await;
    // The slow device reads nothing until told; a tiny receive buffer
    // makes the backlog reach the gateway soon (as in `limits`).
    let stream = small_window_stream(node.addr).await;
    let mut slow = Sse::request_on(stream, &sse_head(&format!("/posts?token={}", token_for(&user)), "")).await;
    assert_eq!(slow.status, 200);
    wait_for("two devices", || async { node.gw.sessions.device_count_of(&user) == 2 }).await;

    let (tx, mut healthy_ids) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = next_event_within(&mut healthy, WAIT).await {
            if tx.send(ev.id).is_err() {
                break;
            }
        }
    });
    // Publish until the node counts the slow device's overflow, then read
    // it at once: a device that stays stuck for the whole write stall (5 s)
    // is dropped without its close event.
    let slow_closed = "gateway_connections_closed_total{reason=\"slow_consumer\"}";
    let closed_before = common::raw::metric(node.addr, slow_closed).await;
    let publisher = Publisher::new().await;
    let big_text = "x".repeat(16 * 1024);
    let mut ids = Vec::new();
    while ids.len() % 8 != 0 || common::raw::metric(node.addr, slow_closed).await == closed_before {
        assert!(ids.len() < 2000, "the slow device never overflowed");
        let mut ev = post(&format!("{user}-{}", ids.len()));
        ev.data.post_text = big_text.clone();
        publisher.publish(&[&user], &ev).await;
        ids.push(ev.id);
    }
    // The slow one finds a prefix of the events, then 4008.
    let (events, code, _) = until_close(&mut slow).await;
    assert_eq!(code, 4008);
    let got: Vec<String> = events.into_iter().map(|b| b.id.unwrap()).collect();
    assert!(got.len() < ids.len(), "the slow device lost its backlog");
    assert_eq!(got, ids[..got.len()], "what did arrive is in order and without gaps");
    let mut healthy_got = Vec::new();
    while healthy_got.len() < ids.len() {
        healthy_got.push(tokio::time::timeout(WAIT, healthy_ids.recv()).await.unwrap().expect("healthy events"));
    }
    assert_eq!(healthy_got, ids, "the healthy device got everything, in order");
}

#[tokio::test]
async fn pings_come_as_comments_and_keep_an_idle_stream_open() {
    let interval = Duration::from_millis(300);
    let node = Node::start(move |c| c.ping_interval = interval).await;
    let user = unique("u");
    let mut sse = Sse::open(node.addr, &user, "", "").await;
    // Well past the two unanswered pings that drop a silent WebSocket.
    let mut pings = 0;
    while pings < 6 {
        let b = sse.next_within(interval * 4).await.expect("a ping every interval");
        assert_eq!((b.comments.as_slice(), b.data.as_deref()), (&["ping".to_owned()][..], None), "{b:?}");
        pings += 1;
    }
    assert_eq!(node.gw.sessions.device_count_of(&user), 1, "an SSE device cannot answer pings and is not dropped");
    let p = post(&unique("p"));
    Publisher::new().await.publish(&[&user], &p).await;
    assert_eq!(sse.next_event().await.id, Some(p.id));
}

#[tokio::test]
async fn an_expired_token_and_a_shutdown_send_close_events() {
    let interval = Duration::from_millis(200);
    let mut node = Node::start(move |c| c.ping_interval = interval).await;
    let user = unique("u");
    let now = contract::token::unix_now();
    let short = tokens().encode(&contract::token::Claims { sub: user.clone(), iat: now, exp: now + 2 });
    let mut expiring = Sse::request(node.addr, &sse_head(&format!("/posts?token={short}"), "")).await;
    assert_eq!(expiring.status, 200);
    let (_, code, reason) = until_close(&mut expiring).await;
    assert_eq!((code, reason.as_str()), (1008, "token expired"));

    let mut sse = Sse::open(node.addr, &unique("u"), "", "").await;
    node.stop().await;
    let (_, code, _) = until_close(&mut sse).await;
    assert_eq!(code, 1001);
}

/// A user that `joiner` will own once it joins a ring of `first` alone.
fn user_moving_to(first: &Member, joiner: &Member) -> String {
    let two = Ring::new([first.clone(), joiner.clone()]);
    (0..)
        .map(|i| format!("mover-{}-{i}", std::process::id()))
        .find(|u| two.owner(slot_of(u)).unwrap().node_id == joiner.node_id)
        .unwrap()
}

#[tokio::test]
async fn a_moved_user_gets_close_4001_with_the_new_owners_url() {
    let key = unique("ring");
    let k = key.clone();
    let a = Node::start(move |c| c.membership_key = k).await;
    let joiner_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let joiner_id = unique("joiner");
    let joiner = Member { node_id: joiner_id.clone(), url: format!("ws://{joiner_addr}") };
    let me = Member { node_id: a.gw.config.node_id().to_owned(), url: format!("ws://{}", a.addr) };
    let user = user_moving_to(&me, &joiner);
    let mut sse = Sse::open(a.addr, &user, "", "").await;

    let services = Services::shared(&key);
    let b = GatewayProc::spawn_as(&services, &joiner_id, joiner_addr);
    b.wait_ready().await;
    let (_, code, reason) = until_close(&mut sse).await;
    assert_eq!((code, reason), (4001, joiner.url.clone()));
    // Reconnecting to the same URL, as EventSource would, works: the old
    // node relays to the new owner (once the owner serves the user: until
    // its handover is done the relay gets 503 with Retry-After, and
    // EventSource retries).
    let p = post(&unique("p"));
    let mut again = Sse::open_when_served(a.addr, &user).await;
    wait_for("relayed device registered at the owner", || async {
        metric(b.addr, "gateway_connections_by_transport{transport=\"sse\"}").await == 1.0
    })
    .await;
    Publisher::new().await.publish(&[&user], &p).await;
    assert_eq!(again.next_event().await.id, Some(p.id));
}

#[tokio::test]
async fn a_non_owner_relays_the_stream_and_its_shutdown_sends_1001() {
    let key = unique("ring");
    let services = Services::shared(&key);
    let mut relay = GatewayProc::spawn(&services);
    let owner = GatewayProc::spawn(&services);
    relay.wait_ready().await;
    owner.wait_ready().await;
    let ids: std::collections::BTreeSet<String> = [relay.id.clone(), owner.id.clone()].into();
    common::procs::wait_members(&[relay.addr, owner.addr], &ids, WAIT).await;
    let ring = Ring::new([
        Member { node_id: relay.id.clone(), url: relay.url() },
        Member { node_id: owner.id.clone(), url: owner.url() },
    ]);
    let user = (0..)
        .map(|i| format!("relayed-{}-{i}", std::process::id()))
        .find(|u| ring.owner(slot_of(u)).unwrap().node_id == owner.id)
        .unwrap();

    let bad = sse_head("/posts?token=x", "");
    assert_eq!(refused(relay.addr, &bad).await.0, 401, "refused at the relay itself");
    let mut sse = Sse::open(relay.addr, &user, "", "").await;
    wait_for("device at the owner, relay counted", || async {
        metric(owner.addr, "gateway_connections_by_transport{transport=\"sse\"}").await == 1.0
            && metric(relay.addr, "gateway_proxied_connections_by_transport{transport=\"sse\"}").await == 1.0
    })
    .await;
    assert_eq!(metric(relay.addr, "gateway_connections_by_transport{transport=\"sse\"}").await, 0.0);
    let publisher = Publisher::new().await;
    let posts: Vec<PostEvent> = (0..3).map(|_| post(&unique("p"))).collect();
    for p in &posts {
        publisher.publish(&[&user], p).await;
    }
    for p in &posts {
        assert_eq!(sse.next_event().await.id.as_deref(), Some(p.id.as_str()));
    }
    // A refusal by the owner comes back as it is: the user's device limit
    // (10 by default) is the owner's.
    let mut more = Vec::new();
    for _ in 1..10 {
        more.push(Sse::open(relay.addr, &user, "", "").await);
    }
    let (status, body, over) = refused(relay.addr, &sse_head(&format!("/posts?token={}", token_for(&user)), "")).await;
    assert_eq!((status, body.contains("already holds 10 devices")), (429, true), "{body}");
    assert_eq!(over.header("access-control-allow-origin").as_deref(), Some("*"));
    drop(more);

    // The relaying node stops: its relayed device is told to reconnect.
    relay.signal("-TERM");
    let (_, code, _) = until_close(&mut sse).await;
    assert_eq!(code, 1001);
    let _ = tokio::time::timeout(WAIT, relay.child.wait()).await;
}

#[tokio::test]
async fn metrics_count_devices_by_transport() {
    let services = Services::shared(&unique("ring"));
    let node = GatewayProc::spawn(&services);
    node.wait_ready().await;
    let user = unique("u");
    let ws_url = format!("{}/posts?token={}", node.url(), token_for(&user));
    let (_ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let _a = Sse::open(node.addr, &user, "", "").await;
    let _b = Sse::open(node.addr, &unique("u"), "", "").await;
    wait_for("gauges", || async {
        metric(node.addr, "gateway_connections_by_transport{transport=\"sse\"}").await == 2.0
            && metric(node.addr, "gateway_connections_by_transport{transport=\"ws\"}").await == 1.0
    })
    .await;
    assert_eq!(metric(node.addr, "gateway_connections").await, 3.0, "the total counts both");
    assert_eq!(metric(node.addr, "gateway_connections_opened_by_transport_total{transport=\"sse\"}").await, 2.0);
    let (_, text) = http_get(node.addr, "/metrics").await;
    for help in [
        "# HELP gateway_connections_by_transport ",
        "# HELP gateway_connections_opened_by_transport_total ",
        "# HELP gateway_proxied_connections_by_transport ",
    ] {
        assert!(text.contains(help), "{help} missing");
    }
    drop(_a);
    wait_for("gauge down", || async {
        metric(node.addr, "gateway_connections_by_transport{transport=\"sse\"}").await == 1.0
    })
    .await;
}

/// Broker messages the node has consumed so far.
async fn consumed(node: SocketAddr) -> f64 {
    metric(node, "gateway_broker_messages_total").await
}

/// Waits until the node has consumed `total` broker messages.
async fn wait_consumed(node: SocketAddr, total: f64) {
    wait_for("the node consumed the posts", || async move { consumed(node).await >= total }).await;
}
