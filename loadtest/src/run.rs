//! A whole run: ramp up the devices, let them settle, measure gateway
//! memory, publish at the target rate, wait for stragglers, account.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use contract::ring::Ring;
use contract::slot::slot_of;
use contract::token::Tokens;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::accounting::tally;
use crate::cli::RunArgs;
use crate::client::{self, Shared};
use crate::publisher::{self, Plan};
use crate::report::{Connections, GatewayMemory, LatencyMs, Report, scrape_gauge};

/// Connection attempts in flight at once during ramp-up.
const MAX_CONNECTING: usize = 512;
/// A connection attempt that takes longer than this counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Tokens outlive any run.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Time after ramp-up before memory is read, so allocations settle.
const SETTLE: Duration = Duration::from_secs(2);

pub async fn run(args: RunArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.mode == "gateway", "only --mode gateway is implemented");
    anyhow::ensure!(args.users > 0 && args.devices > 0, "--users and --devices must be positive");
    let ring = Ring::new(args.nodes.clone());
    let users: Arc<Vec<String>> = Arc::new((0..args.users).map(|i| format!("{}-{i}", args.user_prefix)).collect());
    let shared = Arc::new(Shared::new(users.len()));
    let tokens = Tokens::new(args.jwt_secret.as_bytes());
    let stop = CancellationToken::new();

    let rss_before = scrape_all(&ring, "gateway_process_rss_bytes").await;

    // Ramp-up.
    let target = u64::from(args.users) * u64::from(args.devices);
    let established = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let connecting = Arc::new(Semaphore::new(MAX_CONNECTING));
    let (lo, hi) = (u32::from(args.source_ips.0), u32::from(args.source_ips.1));
    let mut devices = Vec::with_capacity(target as usize);
    let ramp_start = Instant::now();
    let progress = tokio::spawn(progress(shared.clone(), established.clone(), failed.clone(), target, stop.clone()));
    for i in 0..target {
        let due = ramp_start + Duration::from_secs_f64(i as f64 / f64::from(args.connect_rate.max(1)));
        tokio::time::sleep_until(due.into()).await;
        let permit = connecting.clone().acquire_owned().await?;
        let user_idx = (i % u64::from(args.users)) as usize;
        let user = users[user_idx].clone();
        let url = ring.owner(slot_of(&user)).expect("ring has members").url.clone();
        let source = Ipv4Addr::from(lo + (i % u64::from(hi - lo + 1)) as u32);
        let token = tokens.issue(&user, TOKEN_TTL);
        let (shared, stop, established, failed) = (shared.clone(), stop.clone(), established.clone(), failed.clone());
        devices.push(tokio::spawn(async move {
            let ws = tokio::time::timeout(CONNECT_TIMEOUT, client::connect(source, &url, &token)).await;
            drop(permit);
            let ws = match ws {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    tracing::debug!("connect failed: {e:#}");
                    failed.fetch_add(1, Ordering::Relaxed);
                    return Vec::new();
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return Vec::new();
                }
            };
            established.fetch_add(1, Ordering::Relaxed);
            shared.connected_per_user[user_idx].fetch_add(1, Ordering::Relaxed);
            shared.connected.fetch_add(1, Ordering::Relaxed);
            let seqs = client::read_events(ws, i as usize, shared.clone(), stop).await;
            shared.connected_per_user[user_idx].fetch_sub(1, Ordering::Relaxed);
            shared.connected.fetch_sub(1, Ordering::Relaxed);
            seqs
        }));
    }
    while established.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < target {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp = ramp_start.elapsed();
    let est = established.load(Ordering::Relaxed);
    eprintln!("ramp-up done: {est} of {target} connected in {:.1}s", ramp.as_secs_f64());

    tokio::time::sleep(SETTLE.max(Duration::from_secs(args.settle))).await;
    let rss_after = scrape_all(&ring, "gateway_process_rss_bytes").await;
    let conns_after = scrape_all(&ring, "gateway_connections").await;

    // Publish, then wait for stragglers.
    let plan = Plan {
        users: users.clone(),
        ring: ring.clone(),
        rate: args.rate,
        fanout: args.fanout,
        duration: Duration::from_secs(args.duration),
    };
    let published = if args.rate > 0.0 {
        Some(publisher::run(&args.amqp_url, &plan, &shared).await?)
    } else {
        tokio::time::sleep(plan.duration).await;
        None
    };
    let expected_total: u64 = published.as_ref().map_or(0, |p| p.expected.iter().map(|&e| u64::from(e)).sum());
    let drain_until = Instant::now() + Duration::from_secs(args.drain);
    while shared.received.load(Ordering::Relaxed) < expected_total && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _ = progress.await;
    let mut per_device = Vec::with_capacity(devices.len());
    for d in devices {
        per_device.push(d.await.unwrap_or_default());
    }

    let expected = published.as_ref().map(|p| p.expected.clone()).unwrap_or_default();
    let messages = tally(&expected, per_device);
    let latency = shared.latency.merged();
    let deliveries_per_s = match &published {
        Some(p) => {
            let last = shared.last_receipt_us.load(Ordering::Relaxed);
            let window = last.saturating_sub(p.started_us).max(1) as f64 / 1e6;
            messages.received as f64 / window.max(p.elapsed.as_secs_f64())
        }
        None => 0.0,
    };
    let gateways = ring
        .members()
        .iter()
        .zip(rss_before.iter().zip(rss_after.iter().zip(&conns_after)))
        .map(|(m, (&before, (&after, &conns)))| GatewayMemory {
            node_id: m.node_id.clone(),
            connections: conns as u64,
            rss_before_bytes: before as u64,
            rss_after_bytes: after as u64,
            rss_per_connection_bytes: if conns > 0.0 { (after - before) / conns } else { 0.0 },
        })
        .collect();
    Ok(Report {
        connections: Connections { target, established: est, failed: failed.load(Ordering::Relaxed) },
        connect_rate_per_s: est as f64 / ramp.as_secs_f64().max(1e-3),
        messages,
        broker_messages_published: published.as_ref().map_or(0, |p| p.messages),
        events_published: expected.len() as u64,
        deliveries_per_s,
        latency_ms: LatencyMs::from_micros(&latency),
        gateways,
        close_codes: shared.closes.lock().clone(),
        params: serde_json::json!({
            "users": args.users, "devices": args.devices, "rate": args.rate, "fanout": args.fanout,
            "duration_s": args.duration, "nodes": args.nodes.iter().map(|m| &m.node_id).collect::<Vec<_>>(),
            "source_ips": format!("{}-{}", args.source_ips.0, args.source_ips.1), "mode": args.mode,
        }),
    })
}

/// One gauge from every node, in ring member order (0 when unreadable).
async fn scrape_all(ring: &Ring, name: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for m in ring.members() {
        out.push(scrape_gauge(&m.url, name).await.unwrap_or(0.0));
    }
    out
}

/// One line a second on stderr while the run goes.
async fn progress(shared: Arc<Shared>, est: Arc<AtomicU64>, failed: Arc<AtomicU64>, target: u64, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let received = shared.received.load(Ordering::Relaxed);
        eprintln!(
            "connected {}/{} (failed {}, open {})  received {} (+{}/s)",
            est.load(Ordering::Relaxed),
            target,
            failed.load(Ordering::Relaxed),
            shared.connected.load(Ordering::Relaxed),
            received,
            received - last
        );
        last = received;
    }
}
