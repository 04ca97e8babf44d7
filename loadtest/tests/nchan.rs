//! The nginx + Nchan peer, for real: `scripts/nchan.sh` starts nginx on a
//! free loopback port (own run directory), devices connect with the same
//! client code as against our gateway, and `loadtest::nchan::Publisher`
//! publishes. Each subscriber must get exactly the published bytes, in a
//! text frame; a user who is not a recipient gets nothing. nginx and the
//! Nchan module must be installed (`scripts/nchan.sh ensure`, run by
//! `scripts/test.sh`): without them the test fails, it never installs.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::OpCode;
use http_body_util::Empty;
use hyper::Request;
use loadtest::client::{self, Ws};
use loadtest::nchan::{self, Publisher};

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// What `scripts/nchan.sh ensure` installs (the paths the script checks).
const NGINX: &str = "/usr/sbin/nginx";
const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/nchan.sh")
}

/// nginx started by the script; stopped on drop, even when the test fails.
struct Nginx {
    run_dir: PathBuf,
    port: u16,
}

impl Nginx {
    fn script(&self, args: &[&str]) -> std::process::Output {
        Command::new(script()).args(args).env("NCHAN_RUN_DIR", &self.run_dir).output().expect("run scripts/nchan.sh")
    }
    fn base(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }
    fn pid_file(&self) -> PathBuf {
        self.run_dir.join("nginx.pid")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let out = self.script(&["stop"]);
        eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}

/// Starts nginx + Nchan. It must be installed already (`scripts/nchan.sh
/// ensure`, which `scripts/test.sh` runs): a test installs nothing, and a
/// missing dependency fails here with the command that provides it.
fn start_nginx() -> Nginx {
    let missing: Vec<&str> = [NGINX, NCHAN_MODULE].into_iter().filter(|p| !Path::new(p).exists()).collect();
    assert!(
        missing.is_empty(),
        "nginx with Nchan is not installed ({} missing): run `scripts/nchan.sh ensure` first \
         (scripts/test.sh does), or leave this test out with `cargo test -p loadtest -- --skip nchan_`",
        missing.join(", ")
    );
    let port = std::net::TcpListener::bind((LOOPBACK, 0)).unwrap().local_addr().unwrap().port();
    let run_dir = std::env::temp_dir().join(format!("nchan-test-{}-{port}", std::process::id()));
    let nginx = Nginx { run_dir, port };
    let out = nginx.script(&["start", "--workers", "2", "--port", &port.to_string()]);
    assert!(
        out.status.success(),
        "scripts/nchan.sh start failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    nginx
}

/// A device on `/sub/<user>` (the URL of `nchan::subscribe_url`): the same
/// handshake as `client::connect`, to the URL's path.
async fn connect_path(ws_url: &str) -> Ws {
    let rest = ws_url.strip_prefix("ws://").unwrap();
    let (hostport, path) = rest.split_at(rest.find('/').unwrap());
    let stream = tokio::net::TcpStream::connect(hostport).await.unwrap();
    let req = Request::get(format!("http://{hostport}{path}"))
        .header("host", hostport)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-key", fastwebsockets::handshake::generate_key())
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (ws, _) = fastwebsockets::handshake::client(&Spawn, req, stream).await.unwrap();
    ws
}

struct Spawn;

impl<F> hyper::rt::Executor<F> for Spawn
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// The next data frame, or None if nothing comes within `wait`.
async fn next_frame(ws: &mut Ws, wait: Duration) -> Option<(OpCode, Vec<u8>)> {
    loop {
        let frame = tokio::time::timeout(wait, ws.read_frame()).await.ok()?.expect("read a frame");
        match frame.opcode {
            OpCode::Text | OpCode::Binary | OpCode::Close => return Some((frame.opcode, frame.payload.to_vec())),
            _ => continue, // pings are answered by fastwebsockets
        }
    }
}

/// Waits until Nchan counts `n` subscribers (subscriptions complete
/// asynchronously between workers; a message published before that is not
/// for them, as with any live-only delivery).
async fn wait_subscribers(nginx: &Nginx, n: usize) {
    for _ in 0..100 {
        let text = nchan_status(nginx.port).await;
        if text.lines().any(|l| l.trim() == format!("subscribers: {n}")) {
            // The counter is the owner's; give the other worker's IPC a beat.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("Nchan never counted {n} subscribers");
}

/// Nchan's counters (`nchan_stub_status`), as text.
async fn nchan_status(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((LOOPBACK, port)).await.unwrap();
    s.write_all(b"GET /nchan_status HTTP/1.0\r\nHost: nchan\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text
}

fn event_bytes(seq: u32) -> Vec<u8> {
    serde_json::to_vec(&client::event_for(seq, contract::event::now_micros())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nchan_delivers_the_published_bytes_to_each_recipient_only() {
    let nginx = start_nginx();
    let base = nginx.base();
    // The run's user ids: all but dave are one more than the multiplexed-
    // publish limit, so a publish to them takes two requests.
    let users: Vec<String> = (0..nchan::MAX_CHANNELS_PER_REQUEST + 2).map(|i| format!("lt-{i}")).collect();
    let (alice, bob, carol, dave) = (&users[0], &users[1], &users[2], &users[3]);
    let last = users.last().unwrap();

    // Devices as the load test connects them (client::connect asks for
    // /post/feed/posted with the token as bearer: here the user id).
    let mut alice1 = client::connect(LOOPBACK, &base, alice).await.unwrap();
    let mut alice2 = client::connect(LOOPBACK, &base, alice).await.unwrap();
    let mut bob1 = client::connect(LOOPBACK, &base, bob).await.unwrap();
    let mut dave1 = client::connect(LOOPBACK, &base, dave).await.unwrap();
    // And on the /sub/<user> URL.
    let mut carol1 = connect_path(&nchan::subscribe_url(&base, carol)).await;
    let mut last1 = connect_path(&nchan::subscribe_url(&base, last)).await;
    wait_subscribers(&nginx, 6).await;

    let publisher = Publisher::new(&format!("http://127.0.0.1:{}", nginx.port), 2);
    // One request for three channels.
    let first = event_bytes(1);
    publisher.publish(&[alice, bob, carol], &first).await.unwrap();
    // One channel.
    let second = event_bytes(2);
    publisher.publish(&[bob], &second).await.unwrap();
    // 256 channels: two requests (255 + 1); dave is not among them.
    let third = event_bytes(3);
    let all_but_dave: Vec<&str> = users.iter().filter(|u| *u != dave).map(String::as_str).collect();
    assert_eq!(all_but_dave.len(), nchan::MAX_CHANNELS_PER_REQUEST + 1);
    publisher.publish(&all_but_dave, &third).await.unwrap();

    let wait = Duration::from_secs(5);
    for (name, ws, want) in [
        ("alice #1", &mut alice1, vec![&first, &third]),
        ("alice #2", &mut alice2, vec![&first, &third]),
        ("bob", &mut bob1, vec![&first, &second, &third]),
        ("carol", &mut carol1, vec![&first, &third]),
        ("last user", &mut last1, vec![&third]),
    ] {
        for (i, body) in want.into_iter().enumerate() {
            let got = next_frame(ws, wait).await.unwrap_or_else(|| panic!("{name}: frame {i} never came"));
            assert_eq!(got.0, OpCode::Text, "{name}: frame {i}");
            assert_eq!(
                got.1,
                *body,
                "{name}: frame {i} is not the published body:\n{}",
                String::from_utf8_lossy(&got.1)
            );
        }
        assert_eq!(next_frame(ws, Duration::from_millis(300)).await, None, "{name}: an extra frame");
    }
    assert_eq!(next_frame(&mut dave1, Duration::from_millis(500)).await, None, "dave is no recipient");

    // dave's device was listening all along: it gets what is for him.
    let fourth = event_bytes(4);
    publisher.publish(&[dave], &fourth).await.unwrap();
    assert_eq!(next_frame(&mut dave1, wait).await, Some((OpCode::Text, fourth)));

    // Non-2xx is an error: the body is above the config's 64 KB limit.
    let err = publisher.publish(&[alice], &vec![b'x'; 100_000]).await.unwrap_err();
    assert!(format!("{err:#}").contains("413"), "{err:#}");
    // The publisher still works after a refused request.
    publisher.publish(&[alice], &first).await.unwrap();
    assert_eq!(next_frame(&mut alice1, wait).await.map(|f| f.1), Some(first.clone()));

    // Memory of master + workers is readable from the pid file.
    let rss = nchan::nginx_rss_bytes(&nginx.pid_file()).unwrap();
    let pids = nchan::nginx_pids(&nginx.pid_file()).unwrap();
    assert_eq!(pids.len(), 3, "master and 2 workers: {pids:?}");
    assert!(rss > 1 << 20, "nginx RSS {rss}");
}
