//! The command line.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
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
    Run(RunArgs),
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
    /// Seconds to wait for stragglers after the last publish.
    #[arg(long, default_value_t = 5)]
    pub drain: u64,
    /// New connections per second during ramp-up.
    #[arg(long, default_value_t = 5000)]
    pub connect_rate: u32,
    /// Gateway nodes as `node_id=ws://host:port`; users connect to their
    /// ring owner and events are grouped by it.
    #[arg(long = "node", default_value = "gw-8084=ws://127.0.0.1:8084")]
    pub nodes: Vec<Member>,
    /// Source addresses to spread connections over (first..=last), to get
    /// past the ~28k ephemeral ports of one address.
    #[arg(long, default_value = "127.0.0.1", value_parser = parse_ip_range)]
    pub source_ips: (Ipv4Addr, Ipv4Addr),
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// Seconds to hold the connections idle after ramp-up before reading
    /// gateway memory (use more than the gateway's ping interval to count
    /// what pongs cost).
    #[arg(long, default_value_t = 2)]
    pub settle: u64,
    /// Prefix of the user ids, so runs do not collide.
    #[arg(long, default_value = "lt")]
    pub user_prefix: String,
    /// Where to write the JSON report.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Publish mode; only `gateway` (straight to feed.events) for now.
    #[arg(long, default_value = "gateway")]
    pub mode: String,
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
