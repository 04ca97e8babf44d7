//! `/readyz` tells the truth about a real node process: 503 with a reason
//! while it does not serve (waiting for a peer in the handover, fenced and
//! rejoining, its broker connection or its Redis cut), 200 only while it
//! serves. `/healthz` and `/readyz` carry `Access-Control-Allow-Origin: *`.
//!
//! The peer is a stand-in the test controls: a membership record kept fresh
//! in Redis and a `/v1/ring` answer, which decides when the node may serve.
//! The broker and Redis are reached through forwarders the test can cut.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::procs::*;
use common::*;
use contract::membership::{Record, evicted_key, now_ms};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP forwarder to `upstream` that the test can cut: while closed it
/// drops every connection it holds and every new one at once.
struct Cuttable {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Cuttable {
    async fn start(upstream: &'static str) -> Cuttable {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Default::default();
        let (o, list) = (open.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused in effect
                }
                list.lock().push(tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    }
                }));
            }
        });
        Cuttable { addr, open, conns }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.conns.lock().drain(..).for_each(|h| h.abort());
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// A peer that exists only as a fresh membership record and a `/v1/ring`
/// answer (`ring`), both under the test's control.
struct Ghost {
    id: String,
    ring: Arc<Mutex<String>>,
}

impl Ghost {
    async fn start(key: &str) -> Ghost {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id = unique("ghost");
        // Until told otherwise it keeps every slot: the node must not serve.
        let owners: Vec<&str> = (0..contract::slot::SLOTS).map(|_| id.as_str()).collect();
        let ring = Arc::new(Mutex::new(serde_json::json!({ "node_id": id, "owners": owners }).to_string()));
        let answer = ring.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let body = answer.lock().clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return, // a membership probe: connect only
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                });
            }
        });
        // Its heartbeat, advancing like a live node's.
        let (k, i) = (key.to_owned(), id.clone());
        tokio::spawn(async move {
            let mut redis = redis_conn().await;
            loop {
                let record = Record::alive(&format!("ws://{addr}"), now_ms()).of_incarnation(1);
                let _: () = redis::cmd("HSET")
                    .arg(&k)
                    .arg(&i)
                    .arg(serde_json::to_string(&record).unwrap())
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ghost { id, ring }
    }

    /// From now on it answers with `ring` (a `/v1/ring` body).
    fn answer(&self, ring: String) {
        *self.ring.lock() = ring;
    }

    fn disagree(&self) {
        let owners: Vec<&str> = (0..contract::slot::SLOTS).map(|_| self.id.as_str()).collect();
        self.answer(serde_json::json!({ "node_id": self.id, "owners": owners }).to_string());
    }
}

/// `GET path`: status, the head (lower case) and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let Ok(mut s) = TcpStream::connect(addr).await else { return (0, String::new(), String::new()) };
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// The reason `/readyz` gives, `None` when it answers 200.
async fn not_ready(addr: SocketAddr) -> Option<String> {
    let (status, _, body) = get(addr, "/readyz").await;
    if status == 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    Some(format!("{status} {}", v["reason"].as_str().unwrap_or("?")))
}

async fn wait_reason(addr: SocketAddr, what: &str, within: Duration) {
    wait_for_within(&format!("/readyz: {what}"), within, || async move {
        not_ready(addr).await.is_some_and(|r| r.starts_with("503") && r.contains(what))
    })
    .await;
}

#[tokio::test]
async fn readyz_is_503_until_the_node_serves_and_while_its_broker_or_redis_is_cut() {
    let key = unique("ring");
    let ghost = Ghost::start(&key).await;
    let amqp = Cuttable::start("127.0.0.1:5672").await;
    let redis = Cuttable::start("127.0.0.1:6379").await;
    let services = Services {
        amqp_url: format!("amqp://guest:guest@{}/{}", amqp.addr, vhost()),
        redis_url: format!("redis://{}", redis.addr),
        membership_key: key.clone(),
    };
    let node = GatewayProc::spawn(&services);
    let addr = node.addr;

    // Joined (consuming, bound, announced) but its peer does not route its
    // slots to it yet: not serving, so not ready, and it stays so.
    wait_reason(addr, "joining the ring: waiting for every peer", Duration::from_secs(20)).await;
    assert!(members_seen_by(addr).await.contains(&ghost.id), "the peer is in the node's ring");
    let (status, head, _) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(head.contains("access-control-allow-origin: *"), "readyz CORS: {head}");
    let (status, head, _) = get(addr, "/healthz").await;
    assert_eq!(status, 200, "alive all along");
    assert!(head.contains("access-control-allow-origin: *"), "healthz CORS: {head}");
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < until {
        let r = not_ready(addr).await;
        assert!(r.as_deref().is_some_and(|r| r.contains("waiting for every peer")), "still handing over: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The peer adopts the node's ring: it serves, and says so.
    let (_, body) = http_get(addr, "/v1/ring").await;
    ghost.answer(body);
    wait_for_within("ready once the peer agrees", Duration::from_secs(10), || async move {
        not_ready(addr).await.is_none()
    })
    .await;
    let (_, head, _) = get(addr, "/readyz").await;
    assert!(head.contains("access-control-allow-origin: *"), "readyz CORS when ready: {head}");

    // Its broker connection cut (and kept from coming back): not ready.
    amqp.cut();
    wait_reason(addr, "broker consumer not up", Duration::from_secs(10)).await;
    amqp.restore();
    wait_for_within("ready after the broker is back", Duration::from_secs(20), || async move {
        not_ready(addr).await.is_none()
    })
    .await;

    // Its Redis cut: membership heartbeats fail, not ready.
    redis.cut();
    wait_reason(addr, "ring membership not up", Duration::from_secs(10)).await;
    redis.restore();
    wait_for_within(
        "ready after Redis is back",
        Duration::from_secs(20),
        || async move { not_ready(addr).await.is_none() },
    )
    .await;

    // Dropped from the ring by its peer: fenced, it rejoins as a new
    // incarnation and is not ready until the peer routes to it again.
    ghost.disagree();
    let mut conn = redis_conn().await;
    let own: String = redis::cmd("HGET").arg(&key).arg(&node.id).query_async(&mut conn).await.unwrap();
    let incarnation = serde_json::from_str::<Record>(&own).unwrap().incarnation;
    let _: () =
        redis::cmd("HSET").arg(evicted_key(&key)).arg(&node.id).arg(incarnation).query_async(&mut conn).await.unwrap();
    wait_reason(addr, "rejoining the ring (fenced)", Duration::from_secs(10)).await;
    let (_, body) = http_get(addr, "/v1/ring").await;
    ghost.answer(body);
    wait_for_within("ready once rejoined", Duration::from_secs(20), || async move { not_ready(addr).await.is_none() })
        .await;
}
