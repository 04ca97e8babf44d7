//! What the loadtest's process-level tests share: unique names, a RabbitMQ
//! vhost per run, and the real `gateway` and `backend` binaries started as
//! child processes on free loopback ports, stopped on drop.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Nodes are ready within seconds; this bounds a broken start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A stopped node drains its devices; after this it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A name no other test or earlier run uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// A binary of the workspace next to this test's `loadtest` (same target
/// directory).
pub fn sibling_binary(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_loadtest")).parent().expect("binary has a directory");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p {name}, or cargo test --workspace --all-targets)",
        bin.display()
    );
    bin
}

/// A RabbitMQ vhost for this run only, deleted on drop: gateways bind every
/// slot of `feed.events`, so any other cluster on the same exchange (a
/// concurrent test, a dev stack) would receive and re-publish our events.
pub struct Vhost(String);

impl Vhost {
    pub fn new() -> Vhost {
        let v = Vhost(unique("loadtest-ci"));
        testkit::add_vhost(&v.0);
        v
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.0]).output();
    }
}

/// A `gateway` or `backend` process; SIGTERM and wait on drop, even when
/// the test fails.
pub struct Process {
    child: Child,
    pub addr: SocketAddr,
    name: &'static str,
}

impl Process {
    /// A gateway node in the ring `key` (its own membership key).
    pub fn gateway(secret: &str, key: &str, amqp_url: &str) -> Process {
        let mut cmd = Command::new(sibling_binary("gateway"));
        cmd.args(["--node-id", &unique("ci")])
            .env("JWT_SECRET", secret)
            .env("MEMBERSHIP_KEY", key)
            .env("AMQP_URL", amqp_url);
        Process::start("gateway", cmd)
    }

    /// A backend (API and fan-out workers) publishing to the ring `key`,
    /// with cheap argon2 so that registering users takes ms, not tens of ms.
    pub fn backend(secret: &str, key: &str, amqp_url: &str) -> Process {
        let mut cmd = Command::new(sibling_binary("backend"));
        cmd.env("JWT_SECRET", secret)
            .env("MEMBERSHIP_KEY", key)
            .env("AMQP_URL", amqp_url)
            .env("FANOUT_QUEUE", unique("lt-ci.fanout"))
            .env("ARGON2_MEMORY_KIB", "64")
            .env("ARGON2_ITERATIONS", "1");
        Process::start("backend", cmd)
    }

    fn start(name: &'static str, mut cmd: Command) -> Process {
        // Reserve a free port, then hand it to the process.
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = cmd
            .args(["--listen", &addr.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{name} binary starts: {e}"));
        Process { child, addr, name }
    }

    /// Waits until the gateway is ready and acts on a ring of `members`
    /// nodes (so it has announced itself and seen the others).
    pub fn wait_ready(&mut self, members: usize) {
        self.wait_until(|addr| http_get(addr, "/readyz").0 == 200 && ring_size(addr) == members);
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_readyz(&mut self) {
        self.wait_until(|addr| http_get(addr, "/readyz").0 == 200);
    }

    fn wait_until(&mut self, ready: impl Fn(SocketAddr) -> bool) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !ready(self.addr) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} on {} exited during start: {status}", self.name, self.addr);
            }
            assert!(Instant::now() < deadline, "{} on {} not ready within {READY_TIMEOUT:?}", self.name, self.addr);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + STOP_TIMEOUT;
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

/// A plain HTTP/1.1 GET: (status, body); (0, "") when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
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
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
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
