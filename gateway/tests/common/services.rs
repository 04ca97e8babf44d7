//! Private Redis and RabbitMQ instances for tests that stop them: each on
//! a free port with a data directory of its own, started and stopped by
//! the pid it wrote, never the machine's shared services (recipe:
//! /work/shared/notes/private-services.md).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::*;

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(what));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

async fn wait_port(port: u16, open: bool, within: Duration, what: &str) {
    wait_for_within(what, within, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() == open
    })
    .await;
}

/// A `redis-server` of this test's own, without persistence.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let r = PrivateRedis { port: free_port(), dir: scratch_dir("redis") };
        r.launch().await;
        r
    }

    async fn launch(&self) {
        let status = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "yes", "--maxclients", "20000"])
            .arg("--pidfile")
            .arg(self.dir.join("redis.pid"))
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .status()
            .expect("redis-server runs (apt-get install redis-server)");
        assert!(status.success(), "redis-server failed to start");
        wait_port(self.port, true, WAIT, "private redis up").await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it (its data is gone: no persistence), by the pid it wrote.
    pub async fn stop(&self) {
        if let Some(pid) = read_pid(&self.dir.join("redis.pid")) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        wait_port(self.port, false, WAIT, "private redis down").await;
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&self) {
        self.launch().await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(pid) = read_pid(&self.dir.join("redis.pid")) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

/// A RabbitMQ node of this test's own (`rabbitmq-server -detached` with
/// its own node name, ports, cookie and data directory).
pub struct PrivateRabbit {
    pub port: u16,
    node: String,
    dir: PathBuf,
}

impl PrivateRabbit {
    pub async fn start() -> PrivateRabbit {
        let dir = scratch_dir("rmq");
        let port = free_port();
        let dist = free_port();
        let node = format!("gwtest{}@localhost", std::process::id());
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("plugins"), "[].\n").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .unwrap();
        std::fs::write(dir.join("rabbitmq-env.conf"), format!("NODENAME={node}\nERL_EPMD_ADDRESS=127.0.0.1\n"))
            .unwrap();
        let r = PrivateRabbit { port, node, dir };
        let status = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
            .arg("-detached")
            .env("HOME", r.dir.join("home"))
            .env("RABBITMQ_NODENAME", &r.node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", r.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", r.dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", r.dir.join("plugins"))
            .env("RABBITMQ_CONFIG_FILE", r.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", r.dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", r.dir.join("node.pid"))
            .status()
            .expect("rabbitmq-server runs");
        assert!(status.success(), "rabbitmq-server failed to start");
        wait_port(port, true, Duration::from_secs(60), "private rabbitmq up").await;
        r
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        // Only HOME (for the cookie) and the node name: with the node's
        // distribution port in its environment the CLI would try to take it.
        Command::new("rabbitmqctl")
            .env("HOME", self.dir.join("home"))
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .unwrap()
    }

    /// Restarts the RabbitMQ application in place (what a broker restart
    /// does to queues and messages), returning once it accepts again.
    pub async fn restart(&self) {
        let out = self.ctl(&["stop_app"]);
        assert!(out.status.success(), "stop_app: {}", String::from_utf8_lossy(&out.stderr));
        wait_port(self.port, false, Duration::from_secs(30), "private rabbitmq stopped").await;
        let out = self.ctl(&["start_app"]);
        assert!(out.status.success(), "start_app: {}", String::from_utf8_lossy(&out.stderr));
        wait_port(self.port, true, Duration::from_secs(60), "private rabbitmq back").await;
    }

    /// `rabbitmqctl list_queues name messages`, as (name, messages).
    pub fn queues(&self) -> Vec<(String, u64)> {
        let out = self.ctl(&["list_queues", "-q", "--no-table-headers", "name", "messages"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?.to_owned(), f.next()?.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
