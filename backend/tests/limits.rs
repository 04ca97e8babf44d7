//! The backend under abuse stays bounded: idle and slow sockets are closed,
//! connections beyond the cap get a 503, a slow body or a stuck request
//! times out, and requests beyond the in-flight limit are shed, all while
//! the backend goes on serving.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads until the peer closes (or `limit`); returns what came.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None, // still open
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn an_idle_socket_flood_is_refused_over_the_cap_and_closed_while_the_backend_serves() {
    const CAP: usize = 200;
    const FLOOD: usize = 300;
    let backend = TestBackend::start(|c| {
        c.max_connections = CAP;
        c.header_read_timeout = HEADER_READ_TIMEOUT;
    })
    .await;
    let api = backend.client();
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..FLOOD {
        idle.push(TcpStream::connect(backend.addr).await.unwrap());
    }
    // A slowloris: a header byte every 100 ms never completes in time.
    let mut slow = TcpStream::connect(backend.addr).await.unwrap();
    let slow_task = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ".iter().cycle().take(100) {
            if slow.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });

    // Every socket ends: over the cap with a 503, the others closed by the
    // header-read timer, all well within a few timeouts.
    let (mut refused, mut closed) = (0, 0);
    for s in &mut idle {
        match read_to_close(s, HEADER_READ_TIMEOUT * 5).await {
            Some(text) if text.starts_with("HTTP/1.1 503") => refused += 1,
            Some(text) => {
                assert!(text.is_empty(), "an idle socket got {text:?}");
                closed += 1;
            }
            None => panic!("an idle socket was left open after {:?}", started.elapsed()),
        }
    }
    let elapsed = started.elapsed();
    assert!(slow_task.await.unwrap(), "the slowloris socket was closed before it finished");
    eprintln!("{FLOOD} idle sockets: {refused} refused with 503, {closed} closed after {elapsed:?}");
    assert!(refused >= FLOOD - CAP, "{refused} refused");
    assert!(closed >= CAP - 1, "{closed} closed");

    // And it serves, as soon as the flood is gone.
    let r = api.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200);
    let m = api.call("GET", "/metrics", None, None).await.body;
    assert!(m.contains("backend_connections_refused_total"), "{m}");
    backend.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_left_idle_is_closed() {
    let backend = TestBackend::start(|c| c.header_read_timeout = HEADER_READ_TIMEOUT).await;
    let mut s = TcpStream::connect(backend.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let rest = read_to_close(&mut s, HEADER_READ_TIMEOUT * 5).await;
    assert_eq!(rest.as_deref(), Some(""), "closed without more bytes");
    eprintln!("idle kept-alive connection closed after {:?}", started.elapsed());
    backend.stop().await;
}

#[tokio::test]
async fn a_slow_body_times_out_and_requests_beyond_the_in_flight_limit_are_shed() {
    let backend = TestBackend::start(|c| {
        c.request_timeout = Duration::from_secs(1);
        c.max_in_flight = 1;
    })
    .await;
    let api = backend.client();
    let (_me, token) = api.user("Slow").await;
    // Headers at once, then the body at 1 byte per 100 ms.
    let mut s = TcpStream::connect(backend.addr).await.unwrap();
    let head = format!(
        "POST /post/create HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"text\":\""
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let dribble = tokio::spawn(async move {
        for _ in 0..150 {
            if wr.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // While it holds the one slot, another request is shed at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = api.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("retry"), "{r:?}");
    assert_eq!(r.headers["retry-after"], "1");

    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await.expect("an answer").unwrap();
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    eprintln!("slow body answered after {:?}: {}", started.elapsed(), answer.lines().next().unwrap_or(""));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    dribble.abort();
    assert_eq!(api.call("GET", "/healthz", None, None).await.status, 200, "the slot is free again");
    backend.stop().await;
}
