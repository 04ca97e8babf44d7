//! Test harness: real gateway nodes in-process on 127.0.0.1:0, the real
//! RabbitMQ, and real WebSocket clients (tokio-tungstenite, an independent
//! implementation of the protocol).
#![allow(dead_code)]

pub mod cluster;
pub mod procs;
pub mod raw;
pub mod services;
pub mod wire;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use contract::event::{self, HEADER_PUBLISHED_AT, PostEvent};
use contract::slot::{routing_key, slot_of};
use contract::token::Tokens;
use contract::topology::{self, EXCHANGE};
use futures_util::{SinkExt, StreamExt};
use gateway::{Config, Gateway};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "integration-test-secret-0123456789";
/// This test process's own RabbitMQ virtual host, created on first use
/// (why: `testkit::process_vhost`).
pub fn vhost() -> &'static str {
    static VHOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VHOST.get_or_init(|| testkit::process_vhost("gateway-test-"))
}

/// The broker URL of this process's vhost.
pub fn amqp_url() -> String {
    format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost())
}

/// Generous: CI machines are noisy; waits end as soon as the thing happens.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{nanos:x}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

pub fn tokens() -> Tokens {
    Tokens::new(SECRET.as_bytes())
}

pub fn token_for(user: &str) -> String {
    tokens().issue(user, Duration::from_secs(3600))
}

pub struct Node {
    pub addr: SocketAddr,
    pub gw: Arc<Gateway>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub join: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Node {
    /// Starts a node with test defaults, changed by `tweak`, and waits until
    /// its broker consumer is up.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Node {
        // NODE_LOG=info (say) shows the nodes' logs when debugging a test.
        if let Ok(filter) = std::env::var("NODE_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config::for_tests(SECRET);
        config.amqp_url = amqp_url();
        config.listen = addr;
        config.node_id = Some(unique("t"));
        config.advertise_url = Some(format!("ws://{addr}"));
        // A ring of its own unless the test puts nodes in one cluster.
        config.membership_key = unique("ring");
        tweak(&mut config);
        let config = config.validate().unwrap();
        let gw = Gateway::new(config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(gateway::serve(gw.clone(), listener, async {
            let _ = rx.await;
        }));
        let node = Node { addr, gw, stop: Some(tx), join: Some(join) };
        node.wait_ready().await;
        node
    }

    pub async fn wait_ready(&self) {
        wait_for("node ready", || async { http_get(self.addr, "/readyz").await.0 == 200 }).await;
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/post/feed/posted", self.addr)
    }

    /// Starts a graceful shutdown and returns once the node has stopped.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            tokio::time::timeout(Duration::from_secs(30), j).await.expect("node stops").unwrap().unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Polls `cond` until it holds, failing the test after `WAIT`.
pub async fn wait_for<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for_within(what, WAIT, cond).await
}

/// Polls `cond` until it holds, failing the test after `within`.
pub async fn wait_for_within<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection to `addr` whose receive buffer is 4 KiB, which also turns
/// off the kernel's receive autotuning: a client that then reads nothing
/// makes the gateway's send buffer, then its send queue, fill within a few
/// events (the slow-consumer tests).
pub async fn small_window_stream(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A plain HTTP/1.1 GET over a fresh socket: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    raw_request(addr, &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")).await
}

/// Sends raw request bytes and reads the whole answer: (status, body).
pub async fn raw_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr).await else { return (0, String::new()) };
    s.write_all(request.as_bytes()).await.unwrap();
    // Read the head, then as much body as content-length says (the server
    // may keep the connection open).
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse::<usize>().ok());
                if len.is_some_and(|n| body.len() >= n) {
                    break;
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Connects a device with the token in `Authorization: Bearer`.
pub async fn connect(node: &Node, user: &str) -> Ws {
    let mut req = node.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", token_for(user)).parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("websocket connects");
    assert_eq!(resp.status(), 101);
    ws
}

/// A publisher on the real broker, with confirms, as the backend publishes.
pub struct Publisher {
    _conn: Connection,
    ch: Channel,
}

impl Publisher {
    pub async fn new() -> Publisher {
        Publisher::connect(&amqp_url()).await.unwrap()
    }

    pub async fn connect(url: &str) -> lapin::Result<Publisher> {
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        topology::declare_exchanges(&ch).await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher { _conn: conn, ch })
    }

    /// One message per owner in `ring`, through `topology::publish_group`
    /// (persistent, as every real publisher), each confirmed.
    pub async fn try_publish_to_owners(
        &self,
        ring: &contract::ring::Ring,
        recipients: &[String],
        ev: &PostEvent,
    ) -> anyhow::Result<()> {
        let mut groups: std::collections::BTreeMap<usize, Vec<&str>> = Default::default();
        for r in recipients {
            groups.entry(ring.owner_index(slot_of(r)).unwrap_or(0)).or_default().push(r);
        }
        for g in groups.values() {
            let body = event::encode(g, ev);
            let confirm = topology::publish_group(&self.ch, g, &body, FieldTable::default()).await?.await?;
            anyhow::ensure!(confirm.is_ack(), "publish not confirmed");
        }
        Ok(())
    }

    /// Publishes one message for `recipients`, routed by the first one's slot.
    pub async fn publish(&self, recipients: &[&str], ev: &PostEvent) {
        let body = event::encode(recipients, ev);
        self.publish_raw(slot_of(recipients[0]), &body).await;
    }

    pub async fn publish_raw(&self, slot: u16, body: &[u8]) {
        self.publish_with_headers(slot, body, FieldTable::default()).await
    }

    /// Publishes with an explicit routing slot, which may disagree with the
    /// recipients' own (how tests build a stale or wrong routing); real
    /// publishers use `topology::publish_group`.
    pub async fn publish_with_headers(&self, slot: u16, body: &[u8], mut headers: FieldTable) {
        headers.insert(HEADER_PUBLISHED_AT.into(), AMQPValue::LongLongInt(event::now_micros() as i64));
        self.ch
            .basic_publish(
                EXCHANGE.into(),
                routing_key(slot).as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

pub fn post(id: &str) -> PostEvent {
    PostEvent::new(id, &format!("text of {id}"), "author-1", event::now_micros() / 1000)
}

/// The next event frame, skipping control frames; panics on close or timeout.
pub async fn next_event(ws: &mut Ws) -> PostEvent {
    next_event_within(ws, WAIT).await.expect("an event arrives")
}

pub async fn next_event_within(ws: &mut Ws, within: Duration) -> Option<PostEvent> {
    let text = next_text_within(ws, within).await?;
    Some(serde_json::from_str(&text).expect("event is JSON"))
}

/// The next text frame as sent, skipping control frames (the keepalive
/// may ping a new device within its first second); panics on close or
/// timeout.
pub async fn next_text(ws: &mut Ws) -> String {
    next_text_within(ws, WAIT).await.expect("a text frame arrives")
}

/// The next text frame within `within` (`None`: none came), skipping
/// control frames; panics on anything else.
async fn next_text_within(ws: &mut Ws, within: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.ok()?;
        match msg {
            Some(Ok(Message::Text(t))) => return Some(t.to_string()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the close frame and returns it; events before it are
/// returned too.
pub async fn read_until_close<S>(ws: &mut WebSocketStream<S>) -> (Vec<PostEvent>, Option<CloseFrame>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut events = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("close arrives") {
            Some(Ok(Message::Text(t))) => events.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(c))) => return (events, c),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error before close frame: {e}"),
            None => return (events, None),
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: String) {
    ws.send(Message::Text(text.into())).await.unwrap();
}

/// A TCP forwarder to RabbitMQ whose connections a test can kill, to cut
/// the gateway's AMQP connection like a broker crash or network blip.
pub struct AmqpProxy {
    pub addr: SocketAddr,
    conns: Arc<parking_lot::Mutex<Vec<JoinHandle<()>>>>,
}

impl AmqpProxy {
    pub async fn start() -> AmqpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<parking_lot::Mutex<Vec<JoinHandle<()>>>> = Default::default();
        let list = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let handle = tokio::spawn(async move {
                    if let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                });
                list.lock().push(handle);
            }
        });
        AmqpProxy { addr, conns }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/{}", self.addr, vhost())
    }

    /// Drops every proxied connection at once.
    pub fn kill_all(&self) -> usize {
        let handles: Vec<_> = self.conns.lock().drain(..).collect();
        let n = handles.len();
        handles.into_iter().for_each(|h| h.abort());
        n
    }
}

/// A sortable post id whose first 12 hex digits are unix ms, like UUIDv7.
pub fn post_id(seq: u64) -> String {
    let ms = event::now_micros() / 1000;
    format!("{ms:012x}-7000-8000-{seq:012x}")
}

/// Does what the backend does for a post: puts it into each recipient's
/// feed cache, then publishes one message per owner node of `ring`.
pub async fn post_like_backend(
    redis: &mut redis::aio::MultiplexedConnection,
    publisher: &Publisher,
    ring: &contract::ring::Ring,
    recipients: &[String],
    ev: &PostEvent,
) {
    use contract::feedcache::{CachedPost, feed_key, post_key};
    let body = CachedPost {
        id: ev.id.clone(),
        text: ev.data.post_text.clone(),
        author_user_id: ev.data.author_user_id.clone(),
    };
    let mut pipe = redis::pipe();
    pipe.set(post_key(&ev.id), serde_json::to_string(&body).unwrap()).ignore();
    for r in recipients {
        pipe.zadd(feed_key(r), &ev.id, 0).ignore();
    }
    pipe.query_async::<()>(redis).await.unwrap();
    let mut groups: std::collections::BTreeMap<usize, Vec<&str>> = Default::default();
    for r in recipients {
        groups.entry(ring.owner_index(slot_of(r)).unwrap_or(0)).or_default().push(r);
    }
    for g in groups.values() {
        publisher.publish(g, ev).await;
    }
}

/// Publishes `count` posts to all `users`, one every `every`, the way a
/// backend would: the ring is read from the membership `key` before each
/// post (so it lags membership changes a little).
pub fn publish_series(users: Vec<String>, key: String, count: u64, every: Duration) -> Series {
    publish_series_via(procs::Services::shared(&key), users, count, every)
}

/// Like [`publish_series`], on the given services, and like the backend it
/// rides out their faults: a post is retried until the broker confirms it
/// (the feed cache write is attempted, and skipped while Redis is down),
/// and the last ring read stands while the membership cannot be read.
pub fn publish_series_via(services: procs::Services, users: Vec<String>, count: u64, every: Duration) -> Series {
    let published = Arc::new(AtomicU64::new(0));
    let done = published.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let handle = tokio::spawn(async move {
        let mut publisher: Option<Publisher> = None;
        let redis_client = redis::Client::open(services.redis_url.as_str()).unwrap();
        let mut redis: Option<redis::aio::MultiplexedConnection> = None;
        let mut ring = contract::ring::Ring::new(Vec::<contract::ring::Member>::new());
        let mut ids = Vec::new();
        for seq in 0..count {
            if stopped.is_cancelled() {
                break;
            }
            let mut ev = post("x");
            ev.id = post_id(seq);
            ev.data.post_id = ev.id.clone();
            if redis.is_none() {
                redis =
                    tokio::time::timeout(Duration::from_millis(500), redis_client.get_multiplexed_async_connection())
                        .await
                        .ok()
                        .and_then(Result::ok);
            }
            if let Some(conn) = redis.as_mut() {
                let read = contract::membership::fetch(conn, &services.membership_key);
                match tokio::time::timeout(Duration::from_millis(500), read).await {
                    Ok(Ok(members)) => ring = contract::ring::Ring::new(members),
                    _ => redis = None,
                }
            }
            if let Some(conn) = redis.as_mut()
                && tokio::time::timeout(Duration::from_millis(500), write_feed(conn, &users, &ev)).await.is_err()
            {
                redis = None;
            }
            loop {
                if publisher.is_none() {
                    publisher = Publisher::connect(&services.amqp_url).await.ok();
                }
                if let Some(p) = &publisher
                    && p.try_publish_to_owners(&ring, &users, &ev).await.is_ok()
                {
                    break;
                }
                publisher = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ids.push(ev.id);
            done.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(every).await;
        }
        ids
    });
    Series { handle, published, stop }
}

/// Writes a post into the recipients' feed caches, as the backend does.
async fn write_feed(redis: &mut redis::aio::MultiplexedConnection, recipients: &[String], ev: &PostEvent) {
    use contract::feedcache::{CachedPost, feed_key, post_key};
    let body = CachedPost {
        id: ev.id.clone(),
        text: ev.data.post_text.clone(),
        author_user_id: ev.data.author_user_id.clone(),
    };
    let mut pipe = redis::pipe();
    pipe.set(post_key(&ev.id), serde_json::to_string(&body).unwrap()).ignore();
    for r in recipients {
        pipe.zadd(feed_key(r), &ev.id, 0).ignore();
    }
    let _ = pipe.query_async::<()>(redis).await;
}

/// Posts being published in the background.
pub struct Series {
    handle: JoinHandle<Vec<String>>,
    published: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
}

impl Series {
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Ends the series after the post being published; returns every id.
    pub async fn stop(self) -> Vec<String> {
        self.stop.cancel();
        self.finish().await
    }

    /// Waits until at least `n` posts are out (failing the test after `WAIT`).
    pub async fn wait_published(&self, n: u64) {
        wait_for(&format!("{n} posts published"), || async { self.published.load(Ordering::Relaxed) >= n }).await;
    }

    /// Waits for the last post; returns every post id.
    pub async fn finish(self) -> Vec<String> {
        self.handle.await.expect("publisher task")
    }
}

pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open("redis://127.0.0.1:6379").unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// What a smart device saw over its life.
#[derive(Debug, Default)]
pub struct DeviceLog {
    pub ids: std::collections::BTreeSet<String>,
    pub moved: u32,
    /// Events received more than once (recovery and live overlapping).
    pub duplicates: Vec<String>,
    pub reconnects: u32,
    /// Close codes received (other than 4001), and how often.
    pub closes: std::collections::BTreeMap<u16, u32>,
}

/// A device that behaves as SPEC asks of clients: on 4001 it reconnects to
/// the URL in the reason, on any other loss it reconnects through `entry`,
/// and it always asks for `?since=` the newest id it has.
pub async fn smart_device(entry: String, user: String, stop: tokio_util::sync::CancellationToken) -> DeviceLog {
    let log = Arc::new(parking_lot::Mutex::new(DeviceLog::default()));
    smart_device_logging(entry, user, stop, log.clone()).await;
    std::mem::take(&mut *log.lock())
}

/// [`smart_device`] writing into a log the test can read while it runs.
pub async fn smart_device_logging(
    entry: String,
    user: String,
    stop: tokio_util::sync::CancellationToken,
    log: Arc<parking_lot::Mutex<DeviceLog>>,
) {
    use futures_util::StreamExt;
    let token = token_for(&user);
    let mut url = entry.clone();
    while !stop.is_cancelled() {
        let newest = log.lock().ids.iter().next_back().cloned();
        let since = newest.map(|s| format!("&since={s}")).unwrap_or_default();
        let full = format!("{url}/post/feed/posted?token={token}{since}");
        let ws = tokio::time::timeout(Duration::from_secs(3), tokio_tungstenite::connect_async(full)).await;
        let Ok(Ok((mut ws, _))) = ws else {
            url = entry.clone();
            log.lock().reconnects += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let msg = tokio::select! {
                m = ws.next() => m,
                _ = stop.cancelled() => return,
            };
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let ev: PostEvent = serde_json::from_str(&t).unwrap();
                    let mut log = log.lock();
                    if !log.ids.insert(ev.id.clone()) {
                        log.duplicates.push(ev.id);
                    }
                }
                Some(Ok(Message::Close(Some(c)))) if u16::from(c.code) == 4001 => {
                    url = c.reason.to_string();
                    log.lock().moved += 1;
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => {
                    url = entry.clone();
                    {
                        let mut log = log.lock();
                        log.reconnects += 1;
                        if let Some(Ok(Message::Close(Some(c)))) = other {
                            *log.closes.entry(u16::from(c.code)).or_default() += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
    }
}

/// Smart devices, one per user, whose logs can be read while they run.
pub struct Devices {
    pub users: Vec<String>,
    logs: Vec<Arc<parking_lot::Mutex<DeviceLog>>>,
    tasks: Vec<JoinHandle<()>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Devices {
    /// Starts one [`smart_device`] per user, all entering through `entry`.
    pub fn start(entry: &str, users: &[String]) -> Devices {
        let stop = tokio_util::sync::CancellationToken::new();
        let logs: Vec<_> = users.iter().map(|_| Arc::new(parking_lot::Mutex::new(DeviceLog::default()))).collect();
        let tasks = users
            .iter()
            .zip(&logs)
            .map(|(u, log)| tokio::spawn(smart_device_logging(entry.to_owned(), u.clone(), stop.clone(), log.clone())))
            .collect();
        Devices { users: users.to_vec(), logs, tasks, stop }
    }

    /// How many devices have every one of `ids`.
    pub fn complete(&self, ids: &std::collections::BTreeSet<String>) -> usize {
        self.logs.iter().filter(|l| ids.is_subset(&l.lock().ids)).count()
    }

    /// Waits (up to `within`) until every device has every one of `ids`;
    /// returns how long that took, or `None` if some never did (the test
    /// then reports what is missing).
    pub async fn wait_complete(&self, ids: &std::collections::BTreeSet<String>, within: Duration) -> Option<Duration> {
        let start = tokio::time::Instant::now();
        while self.complete(ids) < self.logs.len() {
            if start.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(start.elapsed())
    }

    /// Stops every device; returns (user, log) pairs.
    pub async fn finish(self) -> Vec<(String, DeviceLog)> {
        self.stop.cancel();
        for t in self.tasks {
            t.await.expect("device task");
        }
        self.users.into_iter().zip(self.logs).map(|(u, l)| (u, std::mem::take(&mut *l.lock()))).collect()
    }
}

/// The rows of `rabbitmqctl list_<what> <columns>` in this process's
/// vhost, without headers. Async, so in-process nodes keep running.
async fn rabbitmq_list(what: &str, columns: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([&format!("list_{what}"), "-p", vhost(), "-q", "--no-table-headers"])
        .args(columns)
        .output()
        .await
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names of the queues in this process's vhost.
pub async fn queues() -> Vec<String> {
    rabbitmq_list("queues", &["name"]).await.lines().map(|l| l.trim().to_owned()).collect()
}

/// The (queue, slot) bindings of `feed.events`, read with rabbitmqctl.
pub async fn bindings() -> Vec<(String, u16)> {
    rabbitmq_list("bindings", &["source_name", "destination_name", "routing_key"])
        .await
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            (f.next()? == contract::topology::EXCHANGE).then_some(())?;
            let q = f.next()?.to_owned();
            Some((q, f.next()?.parse().ok()?))
        })
        .collect()
}

/// Two converged nodes on a ring of their own, the second set up by
/// `owner_tweak`, and a user the second one owns (so a device entering the
/// first is proxied). The entry starts first: it serves at once, without
/// asking the owner anything (which a bad internal address would stop).
pub async fn entry_and_owner(owner_tweak: impl FnOnce(&mut gateway::Config)) -> ([Node; 2], String) {
    let key = unique("ring");
    let k = key.clone();
    let entry = Node::start(move |c| c.membership_key = k).await;
    let owner = Node::start(move |c| {
        c.membership_key = key;
        owner_tweak(c);
    })
    .await;
    let nodes = [entry, owner];
    cluster::wait_converged(&nodes).await;
    let user = (0..)
        .map(|i| format!("u{i}-{}", unique("p")))
        .find(|u| nodes[0].gw.owner_of(u).is_some_and(|(mine, _)| !mine))
        .unwrap();
    (nodes, user)
}
