//! A small load run, for real, in CI: two gateway processes in one ring
//! (their own membership key), `loadtest run` with two workers finding them
//! through Redis, ~3,000 devices, a short publish at a modest rate. The
//! JSON report must show every device connected, nothing lost or
//! duplicated, ordered latency percentiles and the gateways' memory.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "loadtest-ci-secret-0123456789";
/// Gateways are ready within seconds; this bounds a broken start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole `loadtest run` must end within this (it takes ~15 s).
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const USERS: u32 = 1500;
const DEVICES: u32 = 2;

/// A name no other test or earlier run uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// The `gateway` binary next to this test's `loadtest` (same target dir).
fn gateway_binary() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_loadtest")).parent().expect("binary has a directory");
    let gw = dir.join("gateway");
    assert!(
        gw.is_file(),
        "{} is missing: build it first (cargo build -p gateway, or cargo test --workspace --all-targets)",
        gw.display()
    );
    gw
}

/// A RabbitMQ vhost for this run only, deleted on drop: gateways bind every
/// slot of `feed.events`, so any other cluster on the same exchange (a
/// concurrent test, a dev stack) would receive and re-publish our events.
struct Vhost(String);

impl Vhost {
    fn new() -> Vhost {
        let v = Vhost(unique("loadtest-ci"));
        rabbitmqctl(&["add_vhost", &v.0]);
        rabbitmqctl(&["set_permissions", "-p", &v.0, "guest", ".*", ".*", ".*"]);
        v
    }

    fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.0]).output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A gateway process; SIGTERM and wait on drop, even when the test fails.
struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Gateway {
    fn start(key: &str, amqp_url: &str) -> Gateway {
        // Reserve a free port, then hand it to the node.
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = Command::new(gateway_binary())
            .args(["--listen", &addr.to_string(), "--node-id", &unique("ci")])
            .env("JWT_SECRET", SECRET)
            .env("MEMBERSHIP_KEY", key)
            .env("AMQP_URL", amqp_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("gateway binary starts");
        Gateway { child, addr }
    }

    /// Waits until the node is ready and acts on a ring of `members` nodes
    /// (so it has announced itself and seen the others).
    fn wait_ready(&mut self, members: usize) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while http_get(self.addr, "/readyz").0 != 200 || ring_size(self.addr) != members {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("gateway on {} exited during start: {status}", self.addr);
            }
            assert!(Instant::now() < deadline, "gateway on {} not ready within {READY_TIMEOUT:?}", self.addr);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET: (status, body); (0, "") when the node does not answer.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return (0, String::new()) };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes());
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// The number of distinct owners in the node's `/v1/ring`.
fn ring_size(addr: SocketAddr) -> usize {
    let v: serde_json::Value = serde_json::from_str(&http_get(addr, "/v1/ring").1).unwrap_or_default();
    let owners = v["owners"].as_array().cloned().unwrap_or_default();
    owners.iter().filter_map(|o| o.as_str()).collect::<std::collections::BTreeSet<_>>().len()
}

/// Waits for a child with a deadline; kills it when the deadline passes.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("loadtest run did not end within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_small_run_over_two_gateways_and_two_workers_loses_nothing() {
    let started = Instant::now();
    let key = unique("lt-ci-ring");
    // Declared first, so it is dropped after the gateways.
    let vhost = Vhost::new();
    let mut gateways = [Gateway::start(&key, &vhost.amqp_url()), Gateway::start(&key, &vhost.amqp_url())];
    for g in &mut gateways {
        g.wait_ready(2);
    }
    let dir = std::env::temp_dir().join(unique("lt-ci"));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");

    let mut run = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["run", "--workers", "2", "--rate", "40", "--fanout", "25", "--duration", "3", "--drain", "5"])
        .args(["--users", &USERS.to_string(), "--devices", &DEVICES.to_string(), "--settle", "1"])
        .args(["--source-ips", "127.0.0.1-127.0.0.4", "--metrics-listen", "off", "--quiet"])
        // Users of their own: other runs on this broker publish to `lt-*`.
        .args(["--user-prefix", &unique("ci-user")])
        .arg("--json")
        .arg(&json)
        .env("JWT_SECRET", SECRET)
        .env("MEMBERSHIP_KEY", &key)
        .env("AMQP_URL", vhost.amqp_url())
        .spawn()
        .expect("loadtest starts");
    let status = wait_with_timeout(&mut run, RUN_TIMEOUT);
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("no report at {} ({status}): {e}", json.display()));
    let r: serde_json::Value = serde_json::from_str(&text).expect("the report is JSON");
    assert!(status.success(), "loadtest run failed ({status}); report: {text}");

    let target = u64::from(USERS * DEVICES);
    let c = &r["connections"];
    assert_eq!(c["target"], target, "{c}");
    assert_eq!(c["established"], target, "{c}");
    assert_eq!(c["failed"], 0, "{c}");
    assert_eq!(r["workers"], 2);
    assert!(r["connect_rate_per_s"].as_f64().unwrap() > 0.0);

    let m = &r["messages"];
    let expected = m["expected"].as_u64().unwrap();
    assert!(expected > 0, "nothing was expected: {m}");
    assert_eq!(m["received"], expected, "{m}");
    assert_eq!(m["lost"], 0, "{m}");
    assert_eq!(m["duplicates"], 0, "{m}");
    assert_eq!(m["unexpected"], 0, "{m}");
    assert!(r["deliveries_per_s"].as_f64().unwrap() > 0.0);

    let l = &r["latency_ms"];
    let ms = |k: &str| l[k].as_f64().unwrap_or_else(|| panic!("latency_ms.{k} missing: {l}"));
    assert!(ms("p50") > 0.0, "{l}");
    assert!(ms("p50") <= ms("p90") && ms("p90") <= ms("p99") && ms("p99") <= ms("p999") && ms("p999") <= ms("max"), "{l}");

    let gws = r["gateways"].as_array().expect("gateways listed");
    assert_eq!(gws.len(), 2, "both gateways found through Redis: {gws:?}");
    let held: u64 = gws.iter().map(|g| g["connections"].as_u64().unwrap()).sum();
    assert_eq!(held, target, "the gateways hold every device: {gws:?}");
    for g in gws {
        let per = g["rss_per_connection_bytes"].as_f64().expect("RSS per connection present");
        assert!(per > 0.0, "{g}");
    }

    let series = r["series"].as_array().expect("series present");
    assert!(series.iter().any(|p| p["connections"] == target), "a second with every device connected: {series:?}");
    let delivered: u64 = series.iter().map(|p| p["deliveries_per_s"].as_u64().unwrap()).sum();
    assert_eq!(delivered, expected, "the per-second deliveries add up");

    std::fs::remove_dir_all(&dir).ok();
    eprintln!("ci run: {:.1}s in all; report {text:.0}", started.elapsed().as_secs_f64());
}
