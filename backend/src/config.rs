//! Settings: every one a CLI flag with an environment variable, validated
//! before any port is bound or any service is dialled.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The social network backend.
#[derive(Debug, Clone, Parser)]
#[command(name = "backend", version, about)]
pub struct Config {
    /// What to run: the HTTP API with its fan-out workers (default), or
    /// only the workers.
    #[command(subcommand)]
    pub mode: Option<Mode>,

    /// Address of the HTTP API.
    #[arg(long, env = "BACKEND_LISTEN", default_value = "0.0.0.0:8080", global = true)]
    pub listen: SocketAddr,

    /// RabbitMQ, where the workers publish realtime events: one URL, or
    /// several comma-separated (nodes of one cluster, tried in turn).
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", global = true)]
    pub amqp_url: String,

    /// Where a `backend worker` process serves `/metrics` and `/healthz`.
    #[arg(long, env = "BACKEND_WORKER_METRICS_LISTEN", default_value = "0.0.0.0:9101", global = true)]
    pub worker_metrics_listen: SocketAddr,

    /// Redis: the feed cache and the gateway membership.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379", global = true)]
    pub redis_url: String,

    /// PostgreSQL, the system of record. The database is created if missing.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/feed", global = true)]
    pub database_url: String,

    /// HS256 secret shared with the gateways. Required: a default secret
    /// would be a forgeable one.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,

    /// How long an issued token is valid.
    #[arg(long, env = "TOKEN_TTL", default_value = "24h", value_parser = humantime::parse_duration, global = true)]
    pub token_ttl: Duration,

    /// The Redis hash of live gateway nodes (the ring).
    #[arg(long, env = "MEMBERSHIP_KEY", default_value = contract::membership::MEMBERS_KEY, global = true)]
    pub membership_key: String,

    /// The outbox queue (a column of the outbox table) this process's
    /// workers take jobs from and its API writes them to.
    #[arg(long, env = "FANOUT_QUEUE", default_value = "backend.fanout", global = true)]
    pub fanout_queue: String,

    /// Fan-out workers in this process (0: the API only enqueues, and
    /// `backend worker` processes do the work).
    #[arg(long, env = "BACKEND_WORKERS", default_value_t = 2, global = true)]
    pub workers: usize,

    /// PostgreSQL connections in the pool.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16, global = true)]
    pub db_pool_size: usize,

    /// Argon2id memory cost in KiB. The default is OWASP's minimum
    /// recommendation; tests lower it to stay fast in debug builds.
    #[arg(long, env = "ARGON2_MEMORY_KIB", default_value_t = 19_456, global = true)]
    pub argon2_memory_kib: u32,

    /// Argon2id iterations (OWASP: 2 with 19 MiB).
    #[arg(long, env = "ARGON2_ITERATIONS", default_value_t = 2, global = true)]
    pub argon2_iterations: u32,

    /// Open HTTP connections at most; beyond, a new connection gets a 503
    /// and is closed. Keep it below the open-file limit (and leave room
    /// for the pool and Redis), or idle sockets can take the process down.
    #[arg(long, env = "BACKEND_MAX_CONNECTIONS", default_value_t = 4096, global = true)]
    pub max_connections: usize,

    /// How long a client may take to send a request's headers, and how
    /// long a kept-alive connection may wait for its next request (hyper
    /// runs the same timer for both): slowloris and idle sockets are closed.
    #[arg(long, env = "BACKEND_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub header_read_timeout: Duration,

    /// Longest a request may take, body upload included (503 after it): a
    /// stuck dependency or a 1 byte/s body cannot hold a request forever.
    #[arg(long, env = "BACKEND_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub request_timeout: Duration,

    /// Requests handled at once; more are answered 503 at once rather than
    /// queued (queued work only adds latency to every request).
    #[arg(long, env = "BACKEND_MAX_IN_FLIGHT", default_value_t = 512, global = true)]
    pub max_in_flight: usize,

    /// Throttle failed logins per client address too (per account is
    /// always on). Turn off when all clients reach the backend through one
    /// proxy address.
    #[arg(long, env = "LOGIN_THROTTLE_PER_ADDRESS", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub login_throttle_per_address: bool,

    /// The gateway URL the page at `/` gives its browsers (`ws://` or
    /// `wss://`, as they reach it, not as this process does). The default
    /// is the gateway `scripts/run.sh` starts.
    #[arg(long, env = "GATEWAY_PUBLIC_URL", default_value = "ws://127.0.0.1:8084", global = true)]
    pub gateway_public_url: String,

    /// The gateways' ping interval, for the page's client: silence for two
    /// of them means a dead connection. The same variable as the gateway's,
    /// so one environment serves both.
    #[arg(long, env = "GATEWAY_PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration, global = true)]
    pub gateway_ping_interval: Duration,

    /// How long shutdown waits for requests in flight.
    #[arg(long, env = "BACKEND_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Mode {
    /// The HTTP API, plus `--workers` fan-out workers (the default).
    Serve,
    /// Only fan-out workers, no HTTP.
    Worker,
}

impl Config {
    /// Checks what clap cannot. The error names the setting.
    pub fn validate(self) -> Result<Config, String> {
        match self.jwt_secret.as_deref() {
            None => return Err("JWT_SECRET (--jwt-secret) is required".into()),
            Some(s) if s.len() < 16 => return Err("JWT_SECRET (--jwt-secret) must be at least 16 bytes".into()),
            Some(_) => {}
        }
        let urls = crate::broker::Nodes::parse(&self.amqp_url);
        if urls.is_empty() {
            return Err("AMQP_URL (--amqp-url) must name at least one amqp:// URL".into());
        }
        for url in &urls {
            if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
                return Err(format!("AMQP_URL (--amqp-url) {url:?} must be an amqp:// URL"));
            }
        }
        if redis::Client::open(self.redis_url.as_str()).is_err() {
            return Err(format!("REDIS_URL (--redis-url) {:?} is not a Redis URL", self.redis_url));
        }
        if self.database_url.parse::<tokio_postgres::Config>().is_err() {
            return Err(format!("DATABASE_URL (--database-url) {:?} is not a PostgreSQL URL", self.database_url));
        }
        if self.membership_key.is_empty() {
            return Err("MEMBERSHIP_KEY (--membership-key) must not be empty".into());
        }
        if self.fanout_queue.is_empty() {
            return Err("FANOUT_QUEUE (--fanout-queue) must not be empty".into());
        }
        if self.db_pool_size == 0 {
            return Err("DATABASE_POOL_SIZE (--db-pool-size) must be at least 1".into());
        }
        // A job holds two connections (its claim and its feed part): with
        // fewer, workers would take them all and wait for each other.
        if self.db_pool_size < 2 * self.workers {
            return Err(format!(
                "DATABASE_POOL_SIZE (--db-pool-size) must be at least twice BACKEND_WORKERS (--workers): {} < 2 x {}",
                self.db_pool_size, self.workers
            ));
        }
        if self.mode == Some(Mode::Worker) && self.workers == 0 {
            return Err("BACKEND_WORKERS (--workers) must be at least 1 for `backend worker`".into());
        }
        if argon2::Params::new(self.argon2_memory_kib, self.argon2_iterations, 1, None).is_err() {
            return Err("ARGON2_MEMORY_KIB / ARGON2_ITERATIONS are out of argon2's range".into());
        }
        if self.max_connections == 0 {
            return Err("BACKEND_MAX_CONNECTIONS (--max-connections) must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return Err("BACKEND_MAX_IN_FLIGHT (--max-in-flight) must be at least 1".into());
        }
        if self.header_read_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err("BACKEND_HEADER_READ_TIMEOUT and BACKEND_REQUEST_TIMEOUT must be positive".into());
        }
        if !self.gateway_public_url.starts_with("ws://") && !self.gateway_public_url.starts_with("wss://") {
            return Err(format!(
                "GATEWAY_PUBLIC_URL (--gateway-public-url) {:?} must be a ws:// or wss:// URL",
                self.gateway_public_url
            ));
        }
        if self.gateway_ping_interval.is_zero() {
            return Err("GATEWAY_PING_INTERVAL (--gateway-ping-interval) must be positive".into());
        }
        if self.token_ttl.is_zero() {
            return Err("TOKEN_TTL (--token-ttl) must be positive".into());
        }
        Ok(self)
    }

    pub fn jwt_secret(&self) -> &str {
        self.jwt_secret.as_deref().expect("validated")
    }

    /// A config for tests and embedding: defaults, with the given secret.
    pub fn for_tests(jwt_secret: &str) -> Config {
        Config::parse_from(["backend", "--jwt-secret", jwt_secret])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_short_secret_is_named() {
        let err = Config::parse_from(["backend"]).validate().unwrap_err();
        assert!(err.contains("JWT_SECRET"), "{err}");
        let err = Config::parse_from(["backend", "--jwt-secret", "short"]).validate().unwrap_err();
        assert!(err.contains("JWT_SECRET"), "{err}");
    }

    #[test]
    fn bad_urls_are_named() {
        let base = ["backend", "--jwt-secret", "0123456789abcdef"];
        let with = |flag: &str, v: &str| {
            let mut args: Vec<&str> = base.to_vec();
            args.extend([flag, v]);
            Config::parse_from(args).validate()
        };
        assert!(with("--amqp-url", "http://x").unwrap_err().contains("AMQP_URL"));
        assert!(with("--amqp-url", "amqp://a/%2f,http://x").unwrap_err().contains("AMQP_URL"));
        assert!(with("--amqp-url", " , ").unwrap_err().contains("AMQP_URL"));
        assert!(with("--amqp-url", "amqp://a:5672/%2f, amqp://b:5672/%2f").is_ok());
        assert!(with("--redis-url", "nope://").unwrap_err().contains("REDIS_URL"));
        assert!(with("--database-url", "postgres://host:notaport/db").unwrap_err().contains("DATABASE_URL"));
        assert!(with("--listen", "0.0.0.0:8080").is_ok());
        assert!(with("--gateway-public-url", "http://x").unwrap_err().contains("GATEWAY_PUBLIC_URL"));
        assert!(with("--gateway-public-url", "wss://feed.example").is_ok());
        assert!(with("--workers", "9").unwrap_err().contains("twice BACKEND_WORKERS"));
        assert!(with("--workers", "8").is_ok());
    }

    #[test]
    fn worker_subcommand_parses() {
        let c = Config::parse_from(["backend", "worker", "--jwt-secret", "0123456789abcdef", "--workers", "4"]);
        assert_eq!(c.mode, Some(Mode::Worker));
        assert_eq!(c.workers, 4);
    }
}
