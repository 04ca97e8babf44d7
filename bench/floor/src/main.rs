//! The machine's floor for deliveries (issue 16): the most messages per
//! second this machine moves when each message costs nothing but one
//! 150-byte `write` on its own loopback TCP connection and one wake-up of a
//! reader that counts it. No WebSocket framing, JSON, broker or
//! accounting: whatever the gateway does beyond that is its own cost, so
//! the benchmark suite gives every delivery rate also as a ratio to this.
//!
//! Two processes, like a gateway and the devices' load generator: this one
//! sends, a child (`floor receive`, the same binary) accepts the
//! connections and counts bytes. Both run tokio's multi-thread runtime with
//! its default threads, as the gateway does. The sender's tasks (one per
//! runtime thread) each own a share of the connections and write one
//! message to each in turn, so with thousands of connections every write
//! finds its reader idle and wakes it: one write and one read per message,
//! as with devices that get a few events a second each.
//!
//! After a warm-up, the window is marked at both ends in both processes;
//! the figures are over that window. Prints one JSON line:
//! `messages_per_s` (received), `sent_per_s`, and each side's CPU per
//! message (user + system, from getrusage: kernel included).
//!
//!   floor --connections 10000 --seconds 5

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use nix::sys::resource::{UsageWho, getrusage};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Parser)]
#[command(
    name = "floor",
    about = "One 150-byte write per message per loopback TCP connection: the machine's delivery floor"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Connections (each a reader in the child process).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of sending before the window opens.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Bytes per message (a feed event frame is about 150).
    #[arg(long, default_value_t = 150)]
    size: usize,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The receiving side (started by the sender; marks on stdin, counts on stdout).
    #[command(hide = true)]
    Receive,
}

/// Bytes a reader asks for per read: more than one message, so a reader
/// that fell behind catches up in one call, as a device's reader would.
const READ_BUFFER: usize = 4096;
/// Connects in flight at once while setting up.
const CONNECTING: usize = 256;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The gateway's runtime: multi-thread, default worker threads.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Some(Cmd::Receive) => runtime.block_on(receive()),
        None => {
            let line = runtime.block_on(send(&cli))?;
            println!("{line}");
            Ok(())
        }
    }
}

/// CPU time of this process so far (user + system), in microseconds.
fn cpu_us() -> anyhow::Result<u64> {
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    let us = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    Ok(us(u.user_time()) + us(u.system_time()))
}

/// The child: prints its port, accepts and reads every connection, and
/// answers each line on stdin with `<bytes received> <cpu us>`.
async fn receive() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let bytes = Arc::new(AtomicU64::new(0));
    let counted = bytes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            let bytes = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; READ_BUFFER];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    // End of input: the sender is done (or gone).
    while lines.next_line().await?.is_some() {
        let reply = format!("{} {}\n", bytes.load(Ordering::Relaxed), cpu_us()?);
        out.write_all(reply.as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}

/// The parent: starts the receiver, connects, sends, marks the window,
/// and returns the JSON line.
async fn send(cli: &Cli) -> anyhow::Result<String> {
    anyhow::ensure!(
        cli.connections > 0 && cli.size > 0 && cli.seconds > 0.0,
        "--connections, --size and --seconds must be positive"
    );
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("receive")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the receiver")?;
    let mut to_child = child.stdin.take().context("receiver stdin")?;
    let mut from_child = BufReader::new(child.stdout.take().context("receiver stdout")?).lines();
    let port: u16 = from_child.next_line().await?.context("the receiver exited")?.parse()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    let conns = connect_all(addr, cli.connections).await?;
    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut shares: Vec<Vec<TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in conns.into_iter().enumerate() {
        shares[i % threads].push(c);
    }
    let msg: Arc<[u8]> = vec![b'x'; cli.size].into();
    let senders: Vec<_> = shares
        .into_iter()
        .map(|mut share| {
            let (stop, sent, msg) = (stop.clone(), sent.clone(), msg.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for s in share.iter_mut() {
                        if s.write_all(&msg).await.is_err() {
                            return;
                        }
                    }
                    sent.fetch_add(share.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs_f64(cli.warmup)).await;
    let mut mark = async || -> anyhow::Result<(Instant, u64, u64, u64, u64)> {
        let (t, s, c) = (Instant::now(), sent.load(Ordering::Relaxed), cpu_us()?);
        to_child.write_all(b"mark\n").await?;
        let line = from_child.next_line().await?.context("the receiver exited")?;
        let (b, rc) = line.split_once(' ').context("bad receiver line")?;
        Ok((t, s, c, b.parse()?, rc.parse()?))
    };
    let (t0, sent0, cpu0, bytes0, rcpu0) = mark().await?;
    tokio::time::sleep(Duration::from_secs_f64(cli.seconds)).await;
    let (t1, sent1, cpu1, bytes1, rcpu1) = mark().await?;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.abort();
    }
    drop(to_child);
    let _ = child.wait().await;

    let secs = (t1 - t0).as_secs_f64();
    let received = (bytes1 - bytes0) as f64 / cli.size as f64;
    let sent = (sent1 - sent0) as f64;
    let per = |cpu: u64, n: f64| if n > 0.0 { cpu as f64 / n } else { 0.0 };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    Ok(serde_json::json!({
        "connections": cli.connections,
        "message_bytes": cli.size,
        "seconds": secs,
        "runtime_threads": threads,
        "messages_per_s": received / secs,
        "sent_per_s": sent / secs,
        "sender_cpu_us_per_message": per(cpu1 - cpu0, sent),
        "receiver_cpu_us_per_message": per(rcpu1 - rcpu0, received),
        "sender_cpu_share": (cpu1 - cpu0) as f64 / 1e6 / secs,
        "receiver_cpu_share": (rcpu1 - rcpu0) as f64 / 1e6 / secs,
        "load_average": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
    .to_string())
}

/// Opens `n` connections to `addr`, [`CONNECTING`] at a time, no Nagle
/// (as the gateway's sockets).
async fn connect_all(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut out = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..n {
        if pending.len() >= CONNECTING {
            out.push(pending.join_next().await.expect("pending")??);
        }
        pending.spawn(async move {
            let s = TcpStream::connect(addr).await.with_context(|| format!("connection {i}"))?;
            s.set_nodelay(true)?;
            anyhow::Ok(s)
        });
    }
    while let Some(s) = pending.join_next().await {
        out.push(s??);
    }
    Ok(out)
}
