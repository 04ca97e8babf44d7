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
    dist: u16,
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
        // The node's and the CLI's cookie, written before either runs.
        let cookie = dir.join("home/.erlang.cookie");
        std::fs::write(&cookie, unique("cookie").replace('-', "")).unwrap();
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .unwrap();
        std::fs::write(dir.join("rabbitmq-env.conf"), format!("NODENAME={node}\nERL_EPMD_ADDRESS=127.0.0.1\n"))
            .unwrap();
        let r = PrivateRabbit { port, dist, node, dir };
        r.launch().await;
        r
    }

    async fn launch(&self) {
        let status = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
            .arg("-detached")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.join("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("plugins"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", self.dir.join("node.pid"))
            .status()
            .expect("rabbitmq-server runs");
        assert!(status.success(), "rabbitmq-server failed to start");
        wait_port(self.port, true, Duration::from_secs(60), "private rabbitmq up").await;
    }

    /// Stops the node (SIGTERM by its pid file: a clean broker shutdown)
    /// and starts it again on the same data directory.
    pub async fn restart(&self) {
        let pid = read_pid(&self.dir.join("node.pid")).expect("rabbitmq pid file");
        let _ = Command::new("kill").arg(pid.to_string()).status();
        wait_for_within("private rabbitmq stopped", Duration::from_secs(60), || async move {
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
        .await;
        self.launch().await;
    }

    /// How many messages `queue` holds (a passive declare), `None` if it
    /// does not exist or the broker does not answer.
    pub async fn messages(&self, queue: &str) -> Option<u32> {
        let conn = lapin::Connection::connect(&self.url(), Default::default()).await.ok()?;
        let ch = conn.create_channel().await.ok()?;
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let q = ch.queue_declare(queue.into(), passive, Default::default()).await.ok()?;
        let _ = conn.close(200, "".into()).await;
        Some(q.message_count())
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if let Some(pid) = read_pid(&self.dir.join("node.pid")) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
