//! Settings: every one a CLI flag with an environment variable, validated
//! before any port is bound.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// A gateway node.
#[derive(Debug, Clone, Parser)]
#[command(name = "gateway", version, about)]
pub struct Config {
    /// Address for WebSocket and HTTP (metrics, health, route).
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:8084")]
    pub listen: SocketAddr,

    /// RabbitMQ: one URL, or several comma-separated URLs of the nodes of
    /// one RabbitMQ cluster (tried in turn when a connection is lost).
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,

    /// Redis, for ring membership.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// HS256 secret shared with the backend. Required: a default secret
    /// would be a forgeable one.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,

    /// This node's id: names its queue `gateway.<id>` and its ring points.
    /// Defaults to `gw-<listen port>`.
    #[arg(long, env = "GATEWAY_NODE_ID")]
    pub node_id: Option<String>,

    /// The ws:// base URL clients use to reach this node.
    /// Defaults to `ws://127.0.0.1:<listen port>`.
    #[arg(long, env = "GATEWAY_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// The ws:// base URL other gateway nodes dial to reach this one (to
    /// proxy a device to it, or to probe whether it died). Defaults to the
    /// advertise URL; required when that is wss:// (TLS ends in front of
    /// the nodes, which talk plain ws:// among themselves).
    #[arg(long, env = "GATEWAY_INTERNAL_URL")]
    pub internal_url: Option<String>,

    /// The Redis hash listing live gateway nodes (several clusters can share
    /// one Redis under different keys).
    #[arg(long, env = "MEMBERSHIP_KEY", default_value = contract::membership::MEMBERS_KEY)]
    pub membership_key: String,

    /// A fixed ring instead of Redis membership: `id=ws://host:port,...`
    /// (must include this node). Nodes then never join or leave at runtime.
    #[arg(long, env = "GATEWAY_STATIC_MEMBERS", value_delimiter = ',', value_parser = clap::value_parser!(contract::ring::Member))]
    pub static_members: Vec<contract::ring::Member>,

    /// Devices one user may hold on this node; one more is closed with 4029.
    #[arg(long, env = "GATEWAY_MAX_DEVICES_PER_USER", default_value_t = 10)]
    pub max_devices_per_user: usize,

    /// Frames a device may have queued; one more closes it with 4008.
    /// Small on purpose: the kernel socket buffer already absorbs bursts,
    /// and a device that is this far behind is not keeping up.
    #[arg(long, env = "GATEWAY_SEND_QUEUE", default_value_t = 512)]
    pub send_queue: usize,

    /// Largest client frame or message, in bytes; bigger closes with 1009.
    #[arg(long, env = "GATEWAY_MAX_CLIENT_FRAME", default_value_t = 4096)]
    pub max_client_frame: usize,

    /// Server ping interval. A device silent for two intervals is dropped.
    #[arg(long, env = "GATEWAY_PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Most connections this process holds (WebSocket and HTTP). Keep it
    /// under the open-file limit (20,000 here), leaving room for the broker,
    /// Redis and proxied connections.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 19_500)]
    pub max_connections: usize,

    /// RabbitMQ prefetch: unacknowledged messages in flight to this node.
    #[arg(long, env = "GATEWAY_PREFETCH", default_value_t = 512)]
    pub prefetch: u16,

    /// Most events replayed to a reconnecting device (`?since=`), the
    /// newest ones; a device further behind is told how many were left out.
    /// Capped at the send queue: a replay is queued like live events, and
    /// one that does not fit beside what is queued closes with 4008. Half
    /// the default queue, so live events have room during a replay.
    #[arg(long, env = "GATEWAY_MAX_REPLAY", default_value_t = 256)]
    pub max_replay: usize,

    /// Feed reads for `?since=` running at once on this node; more wait.
    #[arg(long, env = "GATEWAY_MAX_RECOVERIES", default_value_t = 8)]
    pub max_recoveries: usize,

    /// Connections that have not finished their upgrade (or HTTP request)
    /// this node holds at once; more get 503 at once. Far below
    /// `max_connections`, so sockets that never authenticate cannot keep
    /// devices out.
    #[arg(long, env = "GATEWAY_MAX_UNAUTHENTICATED", default_value_t = 1024)]
    pub max_unauthenticated: usize,

    /// A connection must finish its upgrade (or HTTP exchange) within this.
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Sockets one source address may hold (0: no limit). Off by default:
    /// NAT and load generators put many honest clients behind one address.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Frames a device may send per second (pings, pongs, anything); more
    /// closes it with 1008. Browsers send a ping a minute or so.
    #[arg(long, env = "GATEWAY_MAX_CLIENT_FRAMES_PER_SEC", default_value_t = 50)]
    pub max_client_frames_per_sec: u32,

    /// Kernel send buffer per device (SO_SNDBUF; Linux doubles it). Small,
    /// so a device that stops reading overflows its send queue (4008)
    /// within seconds instead of parking megabytes in the kernel.
    #[arg(long, env = "GATEWAY_DEVICE_SEND_BUFFER", default_value_t = 64 * 1024)]
    pub device_send_buffer: usize,

    /// Longest token lifetime (`exp - iat`) accepted; longer ones get 401.
    #[arg(long, env = "GATEWAY_MAX_TOKEN_LIFETIME", default_value = "7d", value_parser = humantime::parse_duration)]
    pub max_token_lifetime: Duration,

    /// How long shutdown waits for devices to take their 1001 and go.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

impl Config {
    /// Checks what clap cannot and fills in derived defaults. The error
    /// names the setting.
    pub fn validate(mut self) -> Result<Config, String> {
        if self.jwt_secret.len() < 16 {
            return Err("JWT_SECRET (--jwt-secret) must be at least 16 bytes".into());
        }
        let port = self.listen.port();
        let node_id = self.node_id.take().unwrap_or_else(|| format!("gw-{port}"));
        let valid = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if node_id.is_empty() || node_id.len() > 64 || !node_id.chars().all(valid) {
            return Err(format!("GATEWAY_NODE_ID (--node-id) {node_id:?} must be 1-64 of [A-Za-z0-9._-]"));
        }
        self.node_id = Some(node_id);
        let url = self.advertise_url.take().unwrap_or_else(|| format!("ws://127.0.0.1:{port}"));
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            return Err(format!("GATEWAY_ADVERTISE_URL (--advertise-url) {url:?} must start with ws:// or wss://"));
        }
        self.advertise_url = Some(url.trim_end_matches('/').to_owned());
        match self.internal_url.take() {
            Some(u) if !u.starts_with("ws://") => {
                return Err(format!("GATEWAY_INTERNAL_URL (--internal-url) {u:?} must start with ws://"));
            }
            Some(u) => self.internal_url = Some(u.trim_end_matches('/').to_owned()),
            None if url.starts_with("wss://") => {
                return Err(format!(
                    "GATEWAY_INTERNAL_URL (--internal-url) is required when GATEWAY_ADVERTISE_URL is wss:// ({url:?}): \
                     other nodes dial that ws:// address to proxy devices"
                ));
            }
            None => {}
        }
        if self.amqp_urls().next().is_none() {
            return Err("AMQP_URL (--amqp-url) must name at least one amqp:// URL".into());
        }
        for url in self.amqp_urls() {
            let parsed = url.parse::<lapin::uri::AMQPUri>();
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) || parsed.is_err() {
                let why = parsed.err().unwrap_or_else(|| "not an amqp:// or amqps:// URL".into());
                return Err(format!("AMQP_URL (--amqp-url) {url:?} is not a usable AMQP URL: {why}"));
            }
        }
        // Parsing checks the form only; nothing is connected here, so a
        // Redis that is down at start is waited for, not refused.
        if let Err(e) = redis::Client::open(self.redis_url.as_str()) {
            return Err(format!("REDIS_URL (--redis-url) {:?} is not a usable Redis URL: {e}", self.redis_url));
        }
        if !self.static_members.is_empty()
            && !self.static_members.iter().any(|m| Some(&m.node_id) == self.node_id.as_ref())
        {
            return Err("GATEWAY_STATIC_MEMBERS (--static-members) must include this node's id".into());
        }
        if self.max_devices_per_user == 0 {
            return Err("GATEWAY_MAX_DEVICES_PER_USER must be at least 1".into());
        }
        if self.send_queue == 0 {
            return Err("GATEWAY_SEND_QUEUE must be at least 1".into());
        }
        if self.max_replay == 0 {
            return Err("GATEWAY_MAX_REPLAY must be at least 1".into());
        }
        if self.max_unauthenticated == 0 {
            return Err("GATEWAY_MAX_UNAUTHENTICATED must be at least 1".into());
        }
        if self.handshake_timeout.is_zero() {
            return Err("GATEWAY_HANDSHAKE_TIMEOUT must be positive".into());
        }
        if self.max_client_frames_per_sec == 0 {
            return Err("GATEWAY_MAX_CLIENT_FRAMES_PER_SEC must be at least 1".into());
        }
        if self.max_recoveries == 0 {
            return Err("GATEWAY_MAX_RECOVERIES must be at least 1".into());
        }
        if self.max_client_frame < 125 {
            return Err("GATEWAY_MAX_CLIENT_FRAME must be at least 125 (a control frame)".into());
        }
        if self.ping_interval.is_zero() {
            return Err("GATEWAY_PING_INTERVAL must be positive".into());
        }
        Ok(self)
    }

    /// The broker URLs, in the order they are tried.
    pub fn amqp_urls(&self) -> impl Iterator<Item = &str> {
        self.amqp_url.split(',').map(str::trim).filter(|u| !u.is_empty())
    }

    pub fn node_id(&self) -> &str {
        self.node_id.as_deref().expect("validated")
    }

    pub fn advertise_url(&self) -> &str {
        self.advertise_url.as_deref().expect("validated")
    }

    /// The address other nodes dial, when it differs from the advertised one.
    pub fn internal_url(&self) -> Option<&str> {
        self.internal_url.as_deref()
    }

    /// A config for tests and embedding: defaults, with the given secret.
    pub fn for_tests(jwt_secret: &str) -> Config {
        Config::parse_from(["gateway", "--jwt-secret", jwt_secret])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(args: &[&str]) -> Result<Config, String> {
        let base = ["gateway", "--jwt-secret", "0123456789abcdef0123"];
        Config::parse_from(base.iter().chain(args)).validate()
    }

    #[test]
    fn a_bad_broker_or_redis_url_is_refused_naming_the_setting() {
        assert!(with(&[]).is_ok());
        let e = with(&["--redis-url", "http://127.0.0.1:6379"]).unwrap_err();
        assert!(e.starts_with("REDIS_URL (--redis-url)"), "{e}");
        let e = with(&["--redis-url", "redis://127.0.0.1:notaport"]).unwrap_err();
        assert!(e.starts_with("REDIS_URL (--redis-url)"), "{e}");
        let e = with(&["--amqp-url", "amqp://guest:guest@127.0.0.1:notaport/%2f"]).unwrap_err();
        assert!(e.starts_with("AMQP_URL (--amqp-url)"), "{e}");
        let e = with(&["--amqp-url", "http://127.0.0.1:5672"]).unwrap_err();
        assert!(e.starts_with("AMQP_URL (--amqp-url)"), "{e}");
        assert!(with(&["--amqp-url", " , "]).unwrap_err().starts_with("AMQP_URL"));
    }

    #[test]
    fn several_broker_urls_are_the_nodes_of_one_cluster() {
        let c = with(&["--amqp-url", "amqp://a:5672/%2f, amqp://b:5673/%2f"]).unwrap();
        assert_eq!(c.amqp_urls().collect::<Vec<_>>(), ["amqp://a:5672/%2f", "amqp://b:5673/%2f"]);
    }
}
