//! A post's realtime events do not wait for its feed writes: with the
//! backend's Redis stalled (a proxy that holds every byte) every device of
//! every follower still gets the post, while no feed holds it; once Redis
//! answers again every feed gets it and the job leaves the outbox. The
//! long version, 100,000 followers, is `scripts/bench.sh --only celebrity`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use contract::token::Tokens;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const FOLLOWERS: usize = 300;
const REDIS_ADDR: &str = "127.0.0.1:6379";

#[tokio::test]
async fn devices_get_a_post_while_its_feed_writes_are_stalled() {
    let proxy = StallProxy::start().await;
    let backend = TestBackend::start(|c| c.redis_url = format!("redis://{}", proxy.addr)).await;
    let node = TestGateway::start(&backend.backend.config.membership_key).await;
    let api = backend.client();
    let (author, author_token) = api.user("Star").await;
    let followers = bulk_followers(&author, FOLLOWERS).await;
    let tokens = Tokens::new(SECRET.as_bytes());
    let mut devices = Vec::new();
    for f in &followers {
        devices.push(node.connect(&tokens.issue(f, Duration::from_secs(3600))).await);
    }

    // While Redis answers: every device and every feed.
    let first = api.post(&author_token, "warm-up").await;
    for d in &mut devices {
        assert_eq!(next_event(d).await.id, first);
    }
    wait_for("every feed holds the first post", || async { feeds_holding(&followers, &first).await == FOLLOWERS })
        .await;

    proxy.stall(true);
    // The handler caches the post's body after its commit, which waits
    // for Redis too: the request is left running.
    let text = "while Redis is stalled";
    let request = tokio::spawn({
        let token = author_token.clone();
        async move { api.post(&token, text).await }
    });
    let mut id = None;
    for d in &mut devices {
        let ev = next_event(d).await;
        assert_eq!(ev.data.post_text, text);
        assert_eq!(id.get_or_insert_with(|| ev.id.clone()), &ev.id);
    }
    let id = id.unwrap();
    // Read on Redis itself, not through the stalled proxy.
    assert_eq!(feeds_holding(&followers, &id).await, 0, "every device got the post before any feed write");

    proxy.stall(false);
    wait_for("every feed holds the post", || async { feeds_holding(&followers, &id).await == FOLLOWERS }).await;
    assert_eq!(request.await.unwrap(), id);
    let queue = backend.backend.config.fanout_queue.clone();
    wait_for("the job is done", || async {
        let n: i64 =
            pg().await.query_one("SELECT count(*) FROM outbox WHERE queue = $1", &[&queue]).await.unwrap().get(0);
        n == 0
    })
    .await;

    drop_feeds(&followers).await;
    node.stop().await;
    backend.stop().await;
}

/// A TCP forwarder to Redis that a test can stall: while stalled, what
/// clients send is held (nothing is lost, nothing answered), as when
/// Redis hangs.
struct StallProxy {
    addr: SocketAddr,
    stalled: Arc<watch::Sender<bool>>,
}

impl StallProxy {
    async fn start() -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(watch::Sender::new(false));
        let shared = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = shared.subscribe();
                tokio::spawn(async move {
                    if let Ok(redis) = TcpStream::connect(REDIS_ADDR).await {
                        forward(client, redis, rx).await;
                    }
                });
            }
        });
        StallProxy { addr, stalled }
    }

    fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }
}

async fn forward(client: TcpStream, redis: TcpStream, mut stalled: watch::Receiver<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut redis_rd, mut redis_wr) = redis.into_split();
    let down = tokio::io::copy(&mut redis_rd, &mut client_wr);
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if stalled.wait_for(|s| !*s).await.is_err() || redis_wr.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}
