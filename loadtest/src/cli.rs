//! The command line.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use contract::ring::Member;

#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Connect devices, publish events at a rate, and report.
    Run(Box<RunArgs>),
    /// A worker process of `run` (started by it; job on stdin, reports on stdout).
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Publish straight to `feed.events`, grouped by ring owner.
    Gateway,
    /// Register users, follow and post through the backend's HTTP API.
    E2e,
}

/// What the devices connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Our gateways (Redis membership or `--node`), events through RabbitMQ.
    Gateway,
    /// The nginx + Nchan peer at `--nchan-url`: one channel per user,
    /// events published over HTTP.
    Nchan,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Users to connect.
    #[arg(long, default_value_t = 1000)]
    pub users: u32,
    /// Devices per user.
    #[arg(long, default_value_t = 1)]
    pub devices: u32,
    /// Events per second to publish (0: just hold the connections).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Recipients per event; each event is fanout x devices deliveries.
    #[arg(long, default_value_t = 10)]
    pub fanout: u32,
    /// Seconds to publish (or hold) after ramp-up.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds to wait at most for stragglers after the last publish.
    #[arg(long, default_value_t = 5)]
    pub drain: u64,
    /// New connections per second during ramp-up (all workers together).
    #[arg(long, default_value_t = 5000)]
    pub connect_rate: u32,
    /// Worker processes holding the devices (default: one per 15,000
    /// devices, since one process may open 20,000 files).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Gateway nodes as `node_id=ws://host:port` (repeatable); overrides
    /// the Redis membership.
    #[arg(long = "node")]
    pub nodes: Vec<Member>,
    /// Redis holding the gateway membership.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The Redis hash of live gateway nodes.
    #[arg(long, env = "MEMBERSHIP_KEY", default_value = contract::membership::MEMBERS_KEY)]
    pub membership_key: String,
    /// Source addresses to spread connections over (first-last), to get
    /// past the ~64k ports of one address; split among the workers.
    #[arg(long, default_value = "127.0.0.1", value_parser = parse_ip_range)]
    pub source_ips: (Ipv4Addr, Ipv4Addr),
    /// RabbitMQ; several comma-separated URLs (nodes of one cluster) are
    /// tried in turn when the connection is lost.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// HS256 secret shared with the gateways (and the backend): tokens are
    /// minted with it. e2e mode without it logs every user in instead.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Seconds to hold the connections idle after ramp-up before reading
    /// gateway memory (use more than the gateway's ping interval to count
    /// what pongs cost).
    #[arg(long, default_value_t = 2)]
    pub settle: u64,
    /// Prefix of the user ids (gateway mode) or first name of the
    /// registered users (e2e mode), so runs do not collide.
    #[arg(long, default_value = "lt")]
    pub user_prefix: String,
    /// A file written (unix microseconds) the moment publishing starts, so
    /// that a fault script can time its fault into the run.
    #[arg(long)]
    pub started_file: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Directory for the SVG charts (default: the JSON report's directory;
    /// none without --json).
    #[arg(long)]
    pub charts: Option<PathBuf>,
    /// Where to serve the load generator's own /metrics, or `off`.
    #[arg(long, env = "LOADTEST_METRICS_LISTEN", default_value = "127.0.0.1:9464", value_parser = parse_listen)]
    pub metrics_listen: Listen,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    #[arg(long, value_enum, default_value_t = Mode::Gateway)]
    pub mode: Mode,
    /// What the devices connect to: our gateways, or the nginx + Nchan
    /// peer (same devices, same accounting).
    #[arg(long, value_enum, default_value_t = Target::Gateway)]
    pub target: Target,
    /// nginx + Nchan (`--target nchan`).
    #[arg(long, default_value = "http://127.0.0.1:8090")]
    pub nchan_url: String,
    /// nginx's pid file, for its memory (`--target nchan`).
    #[arg(long, default_value = "run/nchan/nginx.pid")]
    pub nchan_pid_file: PathBuf,
    /// The gateways' process ids on this host (comma-separated): their
    /// CPU is read from `/proc/<pid>/stat` (10 ms resolution) instead of
    /// their `process_cpu_seconds_total`, which counts whole seconds.
    #[arg(long, value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Keep-alive HTTP connections publishing to Nchan.
    #[arg(long, default_value_t = 16)]
    pub nchan_connections: usize,
    /// Devices whose connection ends reconnect with `?since=<last id>`,
    /// and every event is first written into its recipients' feed caches
    /// (Redis, as the backend does) so they recover what they missed.
    /// Such devices stay expected for every event of the run.
    #[arg(long)]
    pub recover: bool,
    /// Devices closed and reconnected per second while events flow (all
    /// workers together), picked at random; implies --recover.
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// The backend (e2e mode).
    #[arg(long, env = "BACKEND_URL", default_value = "http://127.0.0.1:8080")]
    pub backend_url: String,
    /// e2e mode: seed the users and follows straight into the backend's
    /// PostgreSQL at this URL instead of over HTTP (no argon2 per user;
    /// tokens are minted, so --jwt-secret is needed); the rows are deleted
    /// at the end of the run.
    #[arg(long, env = "LOADTEST_SEED_DATABASE")]
    pub seed_database: Option<String>,
    /// e2e mode: one author whom all --users follow, one post after
    /// ramp-up (--rate, --fanout and --duration are ignored); reports the
    /// time from the POST to the devices and until every follower's feed
    /// in Redis (--redis-url) holds it.
    #[arg(long)]
    pub celebrity: bool,
    /// Each device first dials the gateways in turn, whoever owns its user
    /// (as a load balancer in front of them would), instead of its owner:
    /// with N nodes, (N-1)/N of the devices are then proxied.
    #[arg(long)]
    pub spread: bool,
}

fn parse_ip_range(s: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: Ipv4Addr = a.parse().map_err(|_| format!("bad address {a:?}"))?;
    let b: Ipv4Addr = b.parse().map_err(|_| format!("bad address {b:?}"))?;
    if u32::from(b) < u32::from(a) || !a.is_loopback() || !b.is_loopback() {
        return Err(format!("{s:?}: need a loopback range low-high (127.0.0.0/8 only)"));
    }
    Ok((a, b))
}

/// An address to listen on, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse().map(|a| Listen(Some(a))).map_err(|_| format!("{s:?}: expected host:port or off"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_listen_addresses_parse() {
        assert_eq!(parse_ip_range("127.0.0.2-127.0.0.9").unwrap().1, Ipv4Addr::new(127, 0, 0, 9));
        assert!(parse_ip_range("10.0.0.1").is_err());
        assert!(parse_ip_range("127.0.0.9-127.0.0.2").is_err());
        assert_eq!(parse_listen("off").unwrap(), Listen(None));
        assert!(parse_listen("nope").is_err());
    }
}
