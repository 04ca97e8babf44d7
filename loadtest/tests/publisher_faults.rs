//! The load generator's publisher survives a cut broker connection: two
//! real gateways (on the shared RabbitMQ, a vhost of their own), and a
//! `loadtest run` whose publisher reaches RabbitMQ only through a TCP
//! proxy this test controls. Mid-run the proxy first swallows what the
//! publisher sends (so messages are published and never confirmed), then
//! cuts every connection and refuses new ones for a while. The run must
//! still end with a report that shows the reconnection, counts every event
//! as expected (none given up) and loses nothing: what was never confirmed
//! was published again. The publisher is given a dead URL first, so it
//! also shows that it goes on to the next of several `--amqp-url`s.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Process, Vhost, unique, wait_with_timeout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "loadtest-faults-secret-0123456789";
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
const USERS: u32 = 400;
const FANOUT: u32 = 10;
/// How long the proxy swallows the publisher's bytes before the cut, and
/// refuses connections after it.
const SWALLOW: Duration = Duration::from_millis(400);
const REFUSE: Duration = Duration::from_millis(1500);

/// A TCP proxy to RabbitMQ with a switch to swallow client bytes, cut all
/// connections and refuse new ones.
struct Proxy {
    addr: SocketAddr,
    swallow: Arc<AtomicBool>,
    refuse: Arc<AtomicBool>,
    /// Bytes forwarded from clients to the broker.
    upstream_bytes: Arc<AtomicU64>,
    cut: tokio::sync::watch::Sender<u64>,
    /// Connections accepted (and forwarded).
    accepted: Arc<AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let swallow = Arc::new(AtomicBool::new(false));
        let refuse = Arc::new(AtomicBool::new(false));
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let (sw, rf, ub, acc) = (swallow.clone(), refuse.clone(), upstream_bytes.clone(), accepted.clone());
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                if rf.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                acc.fetch_add(1, Ordering::SeqCst);
                let (sw, ub, mut cut) = (sw.clone(), ub.clone(), cut_rx.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw_) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = cr.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            // Swallowed bytes never reach the broker, as
                            // if lost on a dying link.
                            if !sw.load(Ordering::SeqCst) {
                                sw_.write_all(&buf[..n]).await?;
                                ub.fetch_add(n as u64, Ordering::SeqCst);
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut sr, &mut cw);
                    cut.borrow_and_update();
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                    // Both sockets close here.
                });
            }
        });
        Proxy { addr, swallow, refuse, upstream_bytes, cut, accepted, _runtime: runtime }
    }

    /// Swallows client bytes for `swallow`, then cuts every connection and
    /// refuses new ones for `refuse`.
    fn fail(&self, swallow: Duration, refuse: Duration) {
        self.swallow.store(true, Ordering::SeqCst);
        std::thread::sleep(swallow);
        self.refuse.store(true, Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
        std::thread::sleep(refuse);
        self.swallow.store(false, Ordering::SeqCst);
        self.refuse.store(false, Ordering::SeqCst);
    }
}

#[test]
fn a_cut_broker_connection_loses_nothing_and_the_run_still_reports() {
    let key = unique("lt-faults-ring");
    let vhost = Vhost::new();
    let mut gateways =
        [Process::gateway(SECRET, &key, &vhost.amqp_url()), Process::gateway(SECRET, &key, &vhost.amqp_url())];
    for g in &mut gateways {
        g.wait_ready(2);
    }
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // Nothing listens there any more: a cluster node that is down.
    let vhost_path = vhost.amqp_url().rsplit('/').next().unwrap().to_owned();
    let urls = format!("amqp://guest:guest@{dead}/{vhost_path},amqp://guest:guest@{}/{vhost_path}", proxy.addr);

    let dir = std::env::temp_dir().join(unique("lt-faults"));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, started) = (dir.join("report.json"), dir.join("started"));
    let mut run = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["run", "--rate", "200", "--fanout", &FANOUT.to_string(), "--duration", "6", "--drain", "5"])
        .args(["--users", &USERS.to_string(), "--devices", "1", "--settle", "1", "--workers", "1"])
        .args(["--metrics-listen", "off", "--quiet", "--user-prefix", &unique("faults-user")])
        .args(["--amqp-url", &urls])
        .arg("--started-file")
        .arg(&started)
        .arg("--json")
        .arg(&json)
        .env("JWT_SECRET", SECRET)
        .env("MEMBERSHIP_KEY", &key)
        .spawn()
        .expect("loadtest starts");

    // Mid-run: once publishing has started and events are flowing
    // through the proxy.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(run.try_wait().unwrap().is_none(), "loadtest ended before publishing");
        assert!(Instant::now() < deadline, "publishing never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_start = proxy.upstream_bytes.load(Ordering::SeqCst);
    while proxy.upstream_bytes.load(Ordering::SeqCst) < at_start + 20_000 {
        assert!(Instant::now() < deadline, "no events flow through the proxy");
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.fail(SWALLOW, REFUSE);

    let status = wait_with_timeout(&mut run, RUN_TIMEOUT);
    let text =
        std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("no report at {} ({status}): {e}", json.display()));
    let r: serde_json::Value = serde_json::from_str(&text).expect("the report is JSON");
    let p = &r["publisher"];
    let m = &r["messages"];
    eprintln!("publisher after the cut: {p}\nmessages: {m}");
    assert!(status.success(), "loadtest run failed ({status}); report: {text}");
    assert!(p["reconnects"].as_u64().unwrap() >= 1, "the publisher reconnected: {p}");
    assert!(proxy.accepted.load(Ordering::SeqCst) >= 2, "a second connection went through the proxy");
    assert!(p["republished"].as_u64().unwrap() >= 1, "swallowed messages were published again: {p}");
    assert_eq!(p["given_up"], 0, "{p}");
    assert_eq!(p["events_given_up"], 0, "{p}");
    assert_eq!(r["publish_errors"], 0);
    // Every event is expected at all of its recipients (all connected),
    // those published during the outage too.
    let events = r["events_published"].as_u64().unwrap();
    assert!(events >= 600, "6 s at 200/s: {events}");
    assert_eq!(m["expected"].as_u64().unwrap(), events * u64::from(FANOUT), "{m}");
    assert_eq!(m["lost"], 0, "{m}");
    assert_eq!(m["received"], m["expected"], "{m}");
    std::fs::remove_dir_all(&dir).ok();
}
