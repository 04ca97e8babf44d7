//! Gateway nodes as real processes (the `gateway` binary), which a test can
//! SIGKILL, SIGSTOP/SIGCONT or SIGTERM and start again under the same id.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::*;

/// Where a node process connects to.
#[derive(Clone)]
pub struct Services {
    pub amqp_url: String,
    pub redis_url: String,
    pub membership_key: String,
}

impl Services {
    /// The machine's shared Redis and this test process's vhost.
    pub fn shared(membership_key: &str) -> Services {
        Services {
            amqp_url: amqp_url(),
            redis_url: "redis://127.0.0.1:6379".into(),
            membership_key: membership_key.into(),
        }
    }
}

pub struct GatewayProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub id: String,
}

impl GatewayProc {
    /// Starts a node on a free port with a new id.
    pub fn spawn(services: &Services) -> GatewayProc {
        // Reserve a free port, then hand it to the node.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        GatewayProc::spawn_as(services, &unique("k"), addr)
    }

    /// Starts a node with the given id and address (a restart).
    pub fn spawn_as(services: &Services, id: &str, addr: SocketAddr) -> GatewayProc {
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", &addr.to_string(), "--node-id", id, "--advertise-url", &format!("ws://{addr}")])
            .env("JWT_SECRET", SECRET)
            .env("MEMBERSHIP_KEY", &services.membership_key)
            .env("AMQP_URL", &services.amqp_url)
            .env("REDIS_URL", &services.redis_url)
            // NODE_LOG=info (say) shows the nodes' logs when debugging.
            .env("RUST_LOG", std::env::var("NODE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(if std::env::var_os("NODE_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
            .kill_on_drop(true)
            .spawn()
            .expect("gateway binary starts");
        GatewayProc { child, addr, id: id.to_owned() }
    }

    /// Starts a node on a free port whose log (standard error) goes to
    /// `log`, with `env` on top (`LOG_FORMAT`, `RUST_LOG`): for tests of
    /// what the binary writes.
    pub fn spawn_logging_to(services: &Services, log: &std::path::Path, env: &[(&str, &str)]) -> GatewayProc {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let id = unique("log");
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", &addr.to_string(), "--node-id", &id, "--advertise-url", &format!("ws://{addr}")])
            .env("JWT_SECRET", SECRET)
            .env("MEMBERSHIP_KEY", &services.membership_key)
            .env("AMQP_URL", &services.amqp_url)
            .env("REDIS_URL", &services.redis_url)
            .env_remove("LOG_FORMAT")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("gateway binary starts");
        GatewayProc { child, addr, id }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGTERM, then waits for the exit; returns how long the stop took.
    pub async fn terminate(&mut self) -> Duration {
        let start = Instant::now();
        self.signal("-TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.expect("node stops");
        assert!(status.unwrap().success(), "a clean stop exits 0");
        start.elapsed()
    }

    pub async fn wait_ready(&self) {
        let addr = self.addr;
        wait_for_within(
            "node ready",
            Duration::from_secs(20),
            || async move { http_get(addr, "/readyz").await.0 == 200 },
        )
        .await;
    }
}

/// The node ids in `addr`'s view of the ring.
pub async fn members_seen_by(addr: SocketAddr) -> BTreeSet<String> {
    let (_, body) = http_get(addr, "/v1/ring").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["members"].as_array().into_iter().flatten().filter_map(|m| m["node_id"].as_str().map(str::to_owned)).collect()
}

/// Waits until every one of `addrs` sees exactly `ids` as the ring.
pub async fn wait_members(addrs: &[SocketAddr], ids: &BTreeSet<String>, within: Duration) {
    wait_for_within("ring members", within, || async {
        for a in addrs {
            if members_seen_by(*a).await != *ids {
                return false;
            }
        }
        true
    })
    .await;
}

/// A metric's value summed over its lines (all label sets), 0 if absent.
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, m) = http_get(addr, "/metrics").await;
    m.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ') || r.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Devices held (not proxied) over `addrs`.
pub async fn devices_held(addrs: &[SocketAddr]) -> f64 {
    let mut n = 0.0;
    for a in addrs {
        n += metric(*a, "gateway_connections").await;
    }
    n
}

/// Sums up what smart devices saw: (lost, duplicates), printing each loss.
pub fn losses(all: &BTreeSet<String>, logs: &[(String, DeviceLog)]) -> (usize, usize) {
    let (mut lost, mut dups) = (0, 0);
    for (u, log) in logs {
        dups += log.duplicates.len();
        let missing: Vec<&String> = all.difference(&log.ids).collect();
        if !missing.is_empty() {
            let seqs: Vec<&str> = missing.iter().map(|i| &i[i.len() - 4..]).collect();
            eprintln!("{u} (reconnects {}, closes {:?}) lost {}: {seqs:?}", log.reconnects, log.closes, missing.len());
        }
        lost += missing.len();
    }
    (lost, dups)
}
