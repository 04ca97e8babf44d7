//! Test harness: the real backend and real gateway nodes in-process on
//! 127.0.0.1:0, against the real PostgreSQL, Redis and RabbitMQ, driven by
//! real HTTP (hyper) and WebSocket (tokio-tungstenite) clients.
//!
//! Isolation: tests share the services with each other and with other
//! crates' tests, so every id is fresh (UUIDv7), every backend has its own
//! outbox queue and membership key, and nothing shared is ever flushed.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use backend::{Backend, Config};
use bytes::Bytes;
use contract::event::{self, PostEvent};
use contract::slot::{SLOTS, parse_routing_key, routing_key};
use contract::topology::{self, EXCHANGE};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "integration-test-secret-0123456789";
/// Where the shared RabbitMQ listens; tests use [`amqp_url`] (their own vhost).
pub const AMQP_ADDR: &str = "127.0.0.1:5672";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/feed";
/// This test process's own RabbitMQ virtual host, created on first use
/// (why: `testkit::process_vhost`).
pub fn vhost() -> &'static str {
    static VHOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VHOST.get_or_init(|| testkit::process_vhost("backend-test-"))
}

/// The broker URL of this process's vhost.
pub fn amqp_url() -> String {
    format!("amqp://guest:guest@{AMQP_ADDR}/{}", vhost())
}

/// Generous: CI machines are noisy; waits end as soon as the thing happens.
pub const WAIT: Duration = Duration::from_secs(15);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7())
}

pub struct TestBackend {
    pub addr: SocketAddr,
    pub backend: Arc<Backend>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestBackend {
    /// Starts a backend with test settings (own fan-out queue, own
    /// membership key, cheap argon2), changed by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestBackend {
        let tb = TestBackend::start_unready(tweak).await;
        wait_for("backend ready", || async { tb.client().call("GET", "/readyz", None, None).await.status == 200 })
            .await;
        tb
    }

    /// Like [`TestBackend::start`], without waiting for `/readyz`.
    pub async fn start_unready(tweak: impl FnOnce(&mut Config)) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config::for_tests(SECRET);
        config.listen = addr;
        config.amqp_url = amqp_url();
        config.redis_url = REDIS_URL.into();
        config.database_url = DATABASE_URL.into();
        config.membership_key = unique("test:members");
        config.fanout_queue = unique("test.fanout");
        config.workers = 2;
        config.db_pool_size = 4;
        config.argon2_memory_kib = 64;
        config.argon2_iterations = 1;
        tweak(&mut config);
        let config = config.validate().unwrap();
        let backend = Backend::connect(config).await.expect("backend connects");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(backend::serve(backend.clone(), listener, async {
            let _ = rx.await;
        }));
        let tb = TestBackend { addr, backend, stop: Some(tx), join: Some(join) };
        wait_for("backend listening", || async { TcpStream::connect(tb.addr).await.is_ok() }).await;
        tb
    }

    pub fn client(&self) -> Client {
        Client { addr: self.addr }
    }

    /// Stops the backend and deletes what is left of its outbox queue and
    /// its membership key.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            tokio::time::timeout(Duration::from_secs(30), j).await.expect("backend stops").unwrap().unwrap();
        }
        pg().await.execute("DELETE FROM outbox WHERE queue = $1", &[&self.backend.config.fanout_queue]).await.unwrap();
        let mut redis = self.redis().await;
        let _: () = redis::cmd("DEL").arg(&self.backend.config.membership_key).query_async(&mut redis).await.unwrap();
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis_conn().await
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL).unwrap().get_multiplexed_async_connection().await.unwrap()
}

pub async fn pg() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(DATABASE_URL, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Polls `cond` until it holds, failing the test after `WAIT`.
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// A real HTTP/1.1 client (hyper), one connection per request.
#[derive(Clone, Copy)]
pub struct Client {
    pub addr: SocketAddr,
}

impl Client {
    pub async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Resp {
        self.call_with(method, path, body, |b| match token {
            Some(t) => b.header("authorization", format!("Bearer {t}")),
            None => b,
        })
        .await
    }

    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        build: impl FnOnce(hyper::http::request::Builder) -> hyper::http::request::Builder,
    ) -> Resp {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let mut b = build(hyper::Request::builder().method(method).uri(path).header("host", "backend"));
        if body.is_some() && !b.headers_ref().is_some_and(|h| h.contains_key("content-type")) {
            b = b.header("content-type", "application/json");
        }
        let req = b.body(Full::new(Bytes::from(body.unwrap_or("").to_owned()))).unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Resp { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
    }

    /// A POST with a JSON body from a given loopback source address (a
    /// client on another host, as far as the backend can tell).
    pub async fn post_from(&self, source: std::net::IpAddr, path: &str, body: &str) -> Resp {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let stream = socket.connect(self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method("POST")
            .uri(path)
            .header("host", "backend")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Resp { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
    }

    /// Like [`Client::call`], but `None` when there is no answer (refused,
    /// reset, or none within 10 s): for a server that may be killed.
    pub async fn try_call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Option<Resp> {
        let attempt = async {
            let stream = TcpStream::connect(self.addr).await.ok()?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
            tokio::spawn(conn);
            let mut b = hyper::Request::builder().method(method).uri(path).header("host", "backend");
            if let Some(t) = token {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            if body.is_some() {
                b = b.header("content-type", "application/json");
            }
            let req = b.body(Full::new(Bytes::from(body.unwrap_or("").to_owned()))).unwrap();
            let resp = sender.send_request(req).await.ok()?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some(Resp { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
        };
        tokio::time::timeout(Duration::from_secs(10), attempt).await.ok().flatten()
    }

    /// Registers a user and logs in: (user id, token).
    pub async fn user(&self, first_name: &str) -> (String, String) {
        let body = serde_json::json!({
            "first_name": first_name, "second_name": "Tester", "birthdate": "1990-05-17",
            "biography": "tests things", "city": "Testville", "password": "pa55word",
        });
        let r = self.call("POST", "/user/register", None, Some(&body.to_string())).await;
        assert_eq!(r.status, 200, "{r:?}");
        let id = r.json()["user_id"].as_str().unwrap().to_owned();
        let login = serde_json::json!({"id": id, "password": "pa55word"});
        let r = self.call("POST", "/login", None, Some(&login.to_string())).await;
        assert_eq!(r.status, 200, "{r:?}");
        (id, r.json()["token"].as_str().unwrap().to_owned())
    }

    pub async fn follow(&self, token: &str, user_id: &str) {
        let r = self.call("PUT", &format!("/friend/set/{user_id}"), Some(token), None).await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    pub async fn unfollow(&self, token: &str, user_id: &str) {
        let r = self.call("PUT", &format!("/friend/delete/{user_id}"), Some(token), None).await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    pub async fn post(&self, token: &str, text: &str) -> String {
        let body = serde_json::json!({ "text": text });
        let r = self.call("POST", "/post/create", Some(token), Some(&body.to_string())).await;
        assert_eq!(r.status, 200, "{r:?}");
        r.json().as_str().expect("post id is a JSON string").to_owned()
    }

    /// A feed page: the post ids, newest first.
    pub async fn feed(&self, token: &str, offset: usize, limit: usize) -> Vec<Value> {
        let r = self.call("GET", &format!("/post/feed?offset={offset}&limit={limit}"), Some(token), None).await;
        assert_eq!(r.status, 200, "{r:?}");
        r.json().as_array().unwrap().clone()
    }

    pub async fn feed_ids(&self, token: &str, offset: usize, limit: usize) -> Vec<String> {
        self.feed(token, offset, limit).await.iter().map(|p| p["id"].as_str().unwrap().to_owned()).collect()
    }
}

/// A real gateway node, from the `gateway` crate.
pub struct TestGateway {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestGateway {
    /// Starts a node that joins the ring under `membership_key` (give it
    /// the backend's, so the backend sees this node as the owner).
    pub async fn start(membership_key: &str) -> TestGateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = gateway::Config::for_tests(SECRET);
        config.amqp_url = amqp_url();
        config.redis_url = REDIS_URL.into();
        config.listen = addr;
        config.node_id = Some(unique("bt"));
        config.advertise_url = Some(format!("ws://{addr}"));
        config.membership_key = membership_key.into();
        let config = config.validate().unwrap();
        let gw = gateway::Gateway::new(config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(gateway::serve(gw, listener, async {
            let _ = rx.await;
        }));
        let node = TestGateway { addr, stop: Some(tx), join: Some(join) };
        let client = Client { addr };
        wait_for("gateway ready", || async { client.call("GET", "/readyz", None, None).await.status == 200 }).await;
        node
    }

    /// Connects a device with the token in `Authorization: Bearer`.
    pub async fn connect(&self, token: &str) -> Ws {
        let mut req = format!("ws://{}/post/feed/posted", self.addr).into_client_request().unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("websocket connects");
        assert_eq!(resp.status(), 101);
        ws
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            tokio::time::timeout(Duration::from_secs(30), j).await.expect("gateway stops").unwrap().unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The next event a device receives, skipping control frames.
pub async fn next_event(ws: &mut Ws) -> PostEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("an event arrives");
        match msg {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("event is JSON"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// Creates `n` users following `author`, in bulk, straight in PostgreSQL.
/// Returns their ids.
pub async fn bulk_followers(author: &str, n: usize) -> Vec<String> {
    let prefix = unique("fan");
    let db = pg().await;
    db.execute(
        "INSERT INTO users (id, first_name, second_name, birthdate, biography, city, password_hash) \
         SELECT $1 || '-' || g, 'Fan', 'Of', '2000-01-01', '', '', 'x' FROM generate_series(1, $2::int) g",
        &[&prefix, &(n as i32)],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO follows (follower_id, followee_id) SELECT $1 || '-' || g, $3 FROM generate_series(1, $2::int) g",
        &[&prefix, &(n as i32), &author],
    )
    .await
    .unwrap();
    (1..=n).map(|i| format!("{prefix}-{i}")).collect()
}

/// How many of `users`' cached feeds hold `post_id`.
pub async fn feeds_holding(users: &[String], post_id: &str) -> usize {
    let mut redis = redis_conn().await;
    let mut pipe = redis::pipe();
    for u in users {
        pipe.zscore(format!("feed:{u}"), post_id);
    }
    let scores: Vec<Option<f64>> = pipe.query_async(&mut redis).await.unwrap();
    scores.iter().filter(|s| s.is_some()).count()
}

/// Deletes `users`' cached feeds (tidying the shared Redis).
pub async fn drop_feeds(users: &[String]) {
    let mut redis = redis_conn().await;
    let mut pipe = redis::pipe();
    for u in users {
        pipe.del(format!("feed:{u}")).ignore();
    }
    let _: () = pipe.query_async(&mut redis).await.unwrap();
}

/// A TCP forwarder to RabbitMQ whose connections a test can kill, like a
/// broker crash or a network blip. It reads the AMQP frames the clients
/// send, so a test can cut every connection at an exact point of a fan-out
/// (before a client's `n`th `basic.publish` reaches the broker), and it can
/// refuse new connections (the broker is down) until told otherwise.
pub struct AmqpProxy {
    pub addr: SocketAddr,
    inner: Arc<ProxyInner>,
}

#[derive(Default)]
struct ProxyInner {
    conns: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
    /// Cut everything when one connection is about to forward its
    /// `cut_at`th publish (0: never). One-shot: reset to 0 by the cut.
    cut_at: std::sync::atomic::AtomicU64,
    refuse: std::sync::atomic::AtomicBool,
    accepted: std::sync::atomic::AtomicUsize,
    cuts: std::sync::atomic::AtomicUsize,
}

/// AMQP 0-9-1: frame type 1 is a method; class 60 method 40 is basic.publish.
const FRAME_METHOD: u8 = 1;
const BASIC_PUBLISH: [u8; 4] = [0, 60, 0, 40];
/// "AMQP" 0 0 9 1, sent once by the client before any frame.
const PROTOCOL_HEADER_LEN: usize = 8;

impl AmqpProxy {
    pub async fn start() -> AmqpProxy {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner: Arc<ProxyInner> = Default::default();
        let shared = inner.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if shared.refuse.load(SeqCst) {
                    drop(client);
                    continue;
                }
                shared.accepted.fetch_add(1, SeqCst);
                let conn_inner = shared.clone();
                let handle = tokio::spawn(async move {
                    if let Ok(broker) = TcpStream::connect(AMQP_ADDR).await {
                        forward(client, broker, &conn_inner).await;
                    }
                });
                shared.conns.lock().unwrap().push(handle.abort_handle());
            }
        });
        AmqpProxy { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/{}", self.addr, vhost())
    }

    /// Drops every proxied connection at once; returns how many.
    pub fn kill_all(&self) -> usize {
        self.inner.kill_all()
    }

    /// Drops every connection when one of them is about to forward its
    /// `n`th `basic.publish` (that publish never reaches the broker).
    pub fn cut_before_publish(&self, n: u64) {
        self.inner.cut_at.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// While true, new connections are closed at once (existing ones are
    /// left alone: combine with [`AmqpProxy::kill_all`] for an outage).
    pub fn refuse(&self, refuse: bool) {
        self.inner.refuse.store(refuse, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections accepted so far (a reconnect is one more).
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Cuts made by [`AmqpProxy::cut_before_publish`].
    pub fn cuts(&self) -> usize {
        self.inner.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl ProxyInner {
    fn kill_all(&self) -> usize {
        let handles: Vec<_> = self.conns.lock().unwrap().drain(..).collect();
        let n = handles.len();
        handles.into_iter().for_each(|h| h.abort());
        n
    }
}

/// Copies both ways; the client's side frame by frame, counting publishes.
async fn forward(client: TcpStream, broker: TcpStream, inner: &ProxyInner) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut broker_rd, mut broker_wr) = broker.into_split();
    let down = async move {
        let _ = tokio::io::copy(&mut broker_rd, &mut client_wr).await;
    };
    let up = async move {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut header_sent = false;
        let mut publishes = 0u64;
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            if !header_sent {
                if buf.len() < PROTOCOL_HEADER_LEN {
                    continue;
                }
                start = PROTOCOL_HEADER_LEN;
                header_sent = true;
            }
            // Whole frames: type(1) channel(2) size(4) payload frame-end(1).
            let mut end = start;
            while buf.len() >= end + 7 {
                let size = u32::from_be_bytes(buf[end + 3..end + 7].try_into().unwrap()) as usize;
                let frame_len = 7 + size + 1;
                if buf.len() < end + frame_len {
                    break;
                }
                if buf[end] == FRAME_METHOD && size >= 4 && buf[end + 7..end + 11] == BASIC_PUBLISH {
                    publishes += 1;
                    let cut_at = inner.cut_at.load(SeqCst);
                    if cut_at != 0 && publishes >= cut_at && inner.cut_at.swap(0, SeqCst) != 0 {
                        // Forward what came before this publish, then cut.
                        let _ = broker_wr.write_all(&buf[..end]).await;
                        inner.cuts.fetch_add(1, SeqCst);
                        inner.kill_all();
                        return;
                    }
                }
                end += frame_len;
            }
            if broker_wr.write_all(&buf[..end]).await.is_err() {
                return;
            }
            buf.drain(..end);
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}

/// A queue bound to `feed.events` for every slot: sees every event message.
pub struct Tap {
    _conn: lapin::Connection,
    consumer: lapin::Consumer,
}

impl Tap {
    pub async fn new() -> Tap {
        let conn = lapin::Connection::connect(&amqp_url(), Default::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        topology::declare_exchanges(&ch).await.unwrap();
        let name = unique("test.tap");
        // Exclusive and auto-delete: it goes away with this connection.
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        ch.queue_declare(name.as_str().into(), opts, FieldTable::default()).await.unwrap();
        let binds = (0..SLOTS).map(|s| {
            let key = routing_key(s);
            let ch = ch.clone();
            let name = name.clone();
            async move {
                ch.queue_bind(
                    name.as_str().into(),
                    EXCHANGE.into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
            }
        });
        futures_util::future::try_join_all(binds).await.unwrap();
        let consumer = ch
            .basic_consume(name.as_str().into(), "tap".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        Tap { _conn: conn, consumer }
    }

    /// The next event message the backend published (not a gateway's
    /// re-publish): (post id, recipients). `None` after `wait` without one.
    pub async fn next_message(&mut self, wait: Duration) -> Option<(String, Vec<String>)> {
        loop {
            let d = tokio::time::timeout(wait, self.consumer.next()).await.ok()?.unwrap().unwrap();
            d.ack(BasicAckOptions::default()).await.unwrap();
            if topology::header_u64(d.properties.headers().as_ref(), event::HEADER_HOPS).unwrap_or(0) > 0 {
                continue;
            }
            assert_eq!(*d.properties.delivery_mode(), Some(2), "events are published persistent");
            let msg = event::decode(&d.data).unwrap();
            let ev: event::PostEvent = serde_json::from_str(msg.event.get()).unwrap();
            return Some((ev.id, msg.recipients.iter().map(|r| r.to_string()).collect()));
        }
    }

    /// Collects the messages of `post_id` until they name `expected`
    /// distinct recipients, then for a further `settle` to catch extras.
    /// Returns (routing slot, recipients) per message.
    pub async fn collect(&mut self, post_id: &str, expected: usize, settle: Duration) -> Vec<(u16, Vec<String>)> {
        self.collect_into(post_id, &mut HashSet::new(), expected, settle).await
    }

    /// Like `collect`, counting the recipients already in `seen`.
    pub async fn collect_into(
        &mut self,
        post_id: &str,
        seen: &mut HashSet<String>,
        expected: usize,
        settle: Duration,
    ) -> Vec<(u16, Vec<String>)> {
        let mut messages = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut settle_until: Option<tokio::time::Instant> =
            (seen.len() >= expected).then(|| tokio::time::Instant::now() + settle);
        loop {
            let until = settle_until.unwrap_or(deadline);
            let next = match tokio::time::timeout_at(until, self.consumer.next()).await {
                Ok(n) => n,
                Err(_) if settle_until.is_some() => return messages,
                Err(_) => panic!("timed out: {} of {expected} recipients in {} messages", seen.len(), messages.len()),
            };
            let d = next.unwrap().unwrap();
            d.ack(BasicAckOptions::default()).await.unwrap();
            let msg = event::decode(&d.data).unwrap();
            let ev: event::PostEvent = serde_json::from_str(msg.event.get()).unwrap();
            if ev.id != post_id {
                continue; // another test's event
            }
            // Gateways of other tests (other rings) that got this message
            // re-publish the recipients they do not own, with x-hops 1:
            // those are not the backend's messages.
            if topology::header_u64(d.properties.headers().as_ref(), event::HEADER_HOPS).unwrap_or(0) > 0 {
                continue;
            }
            assert_eq!(*d.properties.delivery_mode(), Some(2), "events are published persistent");
            let recipients: Vec<String> = msg.recipients.iter().map(|r| r.to_string()).collect();
            seen.extend(recipients.iter().cloned());
            messages.push((parse_routing_key(d.routing_key.as_str()).unwrap(), recipients));
            if seen.len() >= expected && settle_until.is_none() {
                settle_until = Some(tokio::time::Instant::now() + settle);
            }
        }
    }
}
