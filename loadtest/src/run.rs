//! A whole run, on the coordinator: find the gateways, start the workers,
//! wait for ramp-up, read gateway memory, publish at the target rate, wait
//! for stragglers, stop the workers, merge what they received, account.
//!
//! The coordinator holds no WebSocket: every device lives in a worker
//! process ([`crate::worker`]), because one process may open only 20,000
//! files. It alone publishes, so it alone knows what each event should
//! reach.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use contract::ring::Ring;

use crate::accounting::{Receipts, merge_into, new_histogram, tally};
use crate::audience::Audience;
use crate::charts;
use crate::cli::{Mode, RunArgs, Target};
use crate::cpu;
use crate::discovery;
use crate::e2e;
use crate::metrics;
use crate::nchan;
use crate::pool::Pool;
use crate::progress::Bars;
use crate::publisher::{self, Plan, Sink};
use crate::report::{Connections, GatewayMemory, LatencyMs, ReconnectReport, Report, scrape_gauge};
use crate::wire::{Command, Job};

/// Devices per worker when `--workers` is not given: one process may open
/// 20,000 files, and a worker also needs a few for itself.
const DEVICES_PER_WORKER: u64 = 15_000;
/// A worker given more than this would run out of open files.
const MAX_DEVICES_PER_WORKER: u64 = 19_000;
/// Time after ramp-up before memory is read, so allocations settle.
const MIN_SETTLE: Duration = Duration::from_secs(1);
/// Nchan needs longer: subscriptions reach its other workers asynchronously.
const NCHAN_SETTLE: Duration = Duration::from_secs(3);
/// Connection attempts in flight per gateway node, all workers together,
/// at most: half the gateway's default cap on sockets that have not
/// upgraded yet (GATEWAY_MAX_UNAUTHENTICATED, 1024), beyond which it
/// answers 503. A fast ramp over few nodes by many workers (4 x 512 in
/// flight on 2 nodes) had 1,660 of 20,000 connects refused with 503 by a
/// debug-build gateway whose handshakes were slow enough to pile up.
const IN_FLIGHT_PER_NODE: usize = 512;
/// Nor more than this per worker (nor fewer than [`MIN_IN_FLIGHT`]).
const MAX_IN_FLIGHT_PER_WORKER: usize = 512;
const MIN_IN_FLIGHT: usize = 8;

/// `since` below every backend post id (UUIDv7: lowercase hex and dashes).
const E2E_SINCE_FLOOR: &str = "0";
/// How often the coordinator looks whether the stragglers have arrived.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// The users of a run and who receives what.
pub struct Population {
    pub users: Vec<String>,
    /// One per user, or empty: the workers mint them with the secret.
    pub tokens: Vec<String>,
    pub audience: Audience,
}

/// `loadtest run`: the run, its summary and its files. Exit code 3 when
/// something was lost or a device could not connect.
pub async fn main(args: RunArgs) -> anyhow::Result<std::process::ExitCode> {
    let json = args.json.clone();
    // Charts go next to the JSON report unless told otherwise.
    let charts_dir = args.charts.clone().or_else(|| {
        let dir = json.as_ref()?.parent()?;
        Some(if dir.as_os_str().is_empty() { std::path::PathBuf::from(".") } else { dir.to_path_buf() })
    });
    let report = run(args).await?;
    report.print_summary();
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).expect("report serializes");
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("report        {}", path.display());
    }
    if let Some(dir) = charts_dir {
        let mut files = charts::write(&dir, &report.series)?;
        if let Some(c) = report.e2e.as_ref().and_then(|e| e.celebrity.as_ref()) {
            files.push(charts::celebrity(&dir, &c.receipts, &c.feeds)?);
        }
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        println!("charts        {}", names.join("  "));
    }
    // A post that failed is expected nowhere, so it is not counted as lost.
    let posts_failed = report.e2e.as_ref().is_some_and(|e| e.posts.failed > 0 || e.feeds.missing > 0);
    if report.messages.lost > 0 || report.connections.failed > 0 || posts_failed {
        return Ok(std::process::ExitCode::from(3));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn run(args: RunArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.users > 0 && args.devices > 0, "--users and --devices must be positive");
    anyhow::ensure!(args.rate >= 0.0 && args.rate.is_finite(), "--rate must be a number >= 0");
    anyhow::ensure!(args.fanout > 0, "--fanout must be positive");
    let target = u64::from(args.users) * u64::from(args.devices);
    let workers = worker_count(args.workers, target, args.users)?;
    let nchan = args.target == Target::Nchan;
    anyhow::ensure!(!(nchan && args.mode == Mode::E2e), "--target nchan works in gateway mode only");
    anyhow::ensure!(
        args.mode == Mode::E2e || !(args.celebrity || args.seed_database.is_some()),
        "--celebrity and --seed-database need --mode e2e"
    );
    let recover = args.recover || args.churn > 0.0;
    anyhow::ensure!(
        !(nchan && recover),
        "--recover and --churn need the gateways' ?since= recovery (not --target nchan)"
    );
    anyhow::ensure!(args.churn >= 0.0 && args.churn.is_finite(), "--churn must be a number >= 0");
    // Against Nchan, the ring is one member: its URL (every device goes there).
    let gateways = if nchan {
        let url = format!(
            "ws://{}",
            args.nchan_url.trim_start_matches("http://").trim_start_matches("ws://").trim_end_matches('/')
        );
        vec![format!("nchan={url}").parse().map_err(anyhow::Error::msg)?]
    } else {
        discovery::gateways(&args.nodes, &args.redis_url, &args.membership_key).await?
    };
    let ring = Ring::new(gateways);
    let (population, mut e2e) = match args.mode {
        Mode::Gateway => {
            let users = (0..args.users).map(|i| format!("{}-{i}", args.user_prefix)).collect();
            let seed = contract::event::now_micros();
            (Population { users, tokens: Vec::new(), audience: Audience::spread(args.users, args.fanout, seed) }, None)
        }
        Mode::E2e => {
            let (population, session) = e2e::Session::seed(&args).await?;
            (population, Some(session))
        }
    };
    let secret = match (&args.jwt_secret, args.mode) {
        (Some(s), _) => s.clone(),
        (None, Mode::E2e) => String::new(),
        (None, Mode::Gateway) => {
            anyhow::bail!("--jwt-secret (or JWT_SECRET) is required to mint tokens in gateway mode")
        }
    };

    if let Some(listen) = args.metrics_listen.0 {
        metrics::serve(listen)?;
    }
    let bars = Bars::new(args.quiet);

    let run_id = contract::event::now_micros() ^ u64::from(std::process::id()) << 40;
    let memory = Memory { nchan_pid_file: nchan.then(|| args.nchan_pid_file.clone()) };
    let rss_before = memory.read(&ring).await?;
    let jobs = jobs(&args, &ring, &population, &secret, workers, run_id);
    let start_unix_s = contract::event::now_micros() / 1_000_000;
    let ramp_start = Instant::now();
    let mut pool = Pool::start(jobs, population.users.len()).await?;
    let live = pool.live.clone();
    let bar = bars.ramp(target, live.clone());
    let ready = pool.wait_ready().await;
    bar.finish();
    ready?;
    let ramp = ramp_start.elapsed();
    let established = live.established();
    if !args.quiet {
        eprintln!(
            "ramp-up: {established} of {target} devices connected in {:.1}s by {workers} workers",
            ramp.as_secs_f64()
        );
    }

    // Nchan subscriptions reach the other nginx workers asynchronously.
    // The servers' CPU while the devices are only held is read over the
    // settle's second half (the first may still see the ramp's tail).
    let min_settle = if nchan { NCHAN_SETTLE } else { MIN_SETTLE };
    let settle = min_settle.max(Duration::from_secs(args.settle));
    let cpu = match (nchan, args.server_pids.is_empty()) {
        (true, _) => cpu::Source::Nginx(args.nchan_pid_file.clone()),
        (false, false) => cpu::Source::Pids(args.server_pids.clone()),
        (false, true) => cpu::Source::Gateways(ring.clone()),
    };
    tokio::time::sleep(settle / 2).await;
    let hold_cpu0 = cpu.sample().await;
    tokio::time::sleep(settle - settle / 2).await;
    let hold_cpu1 = cpu.sample().await;
    pool.check()?;
    let rss_after = memory.read(&ring).await?;
    let conns_after = match nchan {
        true => vec![live.open() as f64],
        false => scrape_all(&ring, "gateway_connections").await,
    };

    // Publish, then wait for stragglers.
    let plan = Plan {
        users: Arc::new(population.users.clone()),
        ring: ring.clone(),
        rate: args.rate,
        audience: population.audience,
        duration: Duration::from_secs(args.duration),
        run: run_id,
        feed_cache: recover.then(|| args.redis_url.clone()),
    };
    let sink = match nchan {
        true => Sink::Nchan { url: args.nchan_url.clone(), connections: args.nchan_connections },
        false => Sink::Amqp { urls: crate::amqp::split_urls(&args.amqp_url) },
    };
    if args.churn > 0.0 {
        pool.broadcast(&Command::Churn { per_s: args.churn / f64::from(workers) }).await?;
    }
    let mut publish_errors = 0;
    if let Some(path) = &args.started_file {
        std::fs::write(path, contract::event::now_micros().to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let bar = bars.run(args.duration, live.clone());
    let publish_cpu0 = cpu.sample().await;
    let published = if args.rate > 0.0 || args.celebrity {
        match e2e.as_mut() {
            Some(session) => session.post(&plan, &live.connected_per_user, &live.series).await,
            None => publisher::run(&sink, &plan, &live.connected_per_user, &live.series).await.map(|(p, errors)| {
                publish_errors = errors;
                p
            }),
        }
        .map(Some)
    } else {
        tokio::time::sleep(plan.duration).await;
        Ok(None)
    };
    bar.finish();
    let published = published?;
    let expected = published.as_ref().map(|p| p.expected.clone()).unwrap_or_default();
    let expected_total: u64 = expected.iter().map(|&e| u64::from(e)).sum();
    if args.churn > 0.0 {
        pool.broadcast(&Command::Churn { per_s: 0.0 }).await?;
    }
    let churn_window = published.as_ref().map_or(plan.duration, |p| p.elapsed);
    let drain_until = Instant::now() + Duration::from_secs(args.drain);
    // Recovered events come with duplicates, so the received count says
    // nothing about stragglers: wait the whole drain.
    while (recover || live.received() < expected_total) && Instant::now() < drain_until {
        pool.check()?;
        tokio::time::sleep(DRAIN_POLL).await;
    }
    // Before the stop: closing the devices is not the deliveries' cost.
    let publish_cpu1 = cpu.sample().await;
    let finished = pool.stop(expected.len() as u32).await?;

    let mut receipts = Receipts::default();
    let mut latency = new_histogram();
    let mut close_codes = std::collections::BTreeMap::new();
    let mut last_receipt_us = 0;
    let mut foreign = 0;
    for f in &finished {
        foreign += f.foreign;
        receipts.merge(&f.receipts);
        merge_into(&mut latency, &f.latency);
        for (code, n) in &f.close_codes {
            *close_codes.entry(*code).or_insert(0) += n;
        }
        last_receipt_us = last_receipt_us.max(f.last_receipt_us);
    }
    let messages = tally(&expected, &receipts);
    let deliveries_per_s = match &published {
        Some(p) => {
            let window = last_receipt_us.saturating_sub(p.started_us) as f64 / 1e6;
            messages.received as f64 / window.max(p.elapsed.as_secs_f64()).max(1e-3)
        }
        None => 0.0,
    };
    let gateways = ring
        .members()
        .iter()
        .zip(rss_before.iter().zip(rss_after.iter().zip(&conns_after)))
        .map(|(m, (before, (after, &conns)))| GatewayMemory {
            node_id: m.node_id.clone(),
            connections: conns as u64,
            rss_before_bytes: before.rss,
            rss_after_bytes: after.rss,
            rss_per_connection_bytes: if conns > 0.0 { (after.rss as f64 - before.rss as f64) / conns } else { 0.0 },
            pss_before_bytes: before.pss,
            pss_after_bytes: after.pss,
            pss_per_connection_bytes: match (before.pss, after.pss) {
                (Some(b), Some(a)) if conns > 0.0 => Some((a as f64 - b as f64) / conns),
                _ => None,
            },
        })
        .collect();
    let series = live.series.lock().points(start_unix_s);
    let server_cpu = published
        .as_ref()
        .and_then(|_| cpu::CpuReport::new((hold_cpu0, hold_cpu1), (publish_cpu0, publish_cpu1), messages.received));
    let e2e = match e2e {
        Some(session) => {
            let receipts = e2e::Receipts {
                last_us: last_receipt_us,
                expected: expected_total,
                received: messages.received,
                latency: &latency,
            };
            Some(session.finish(receipts).await?)
        }
        None => None,
    };
    Ok(Report {
        connections: {
            let r = live.ramp();
            let window = r.last_outcome_us.saturating_sub(r.first_attempt_us) as f64 / 1e6;
            Connections {
                target,
                established,
                failed: live.failed(),
                failed_by_cause: r.failed_by_cause,
                attempt_window_s: window,
                connects_per_s_in_window: if window > 0.0 { established as f64 / window } else { 0.0 },
                token_minting_s: r.mint_us as f64 / 1e6,
            }
        },
        connect_rate_per_s: established as f64 / ramp.as_secs_f64().max(1e-3),
        ramp_up_s: ramp.as_secs_f64(),
        workers,
        messages,
        // In e2e mode the backend publishes: its own count.
        broker_messages_published: e2e
            .as_ref()
            .map_or_else(|| published.as_ref().map_or(0, |p| p.messages), |e| e.backend.events_published),
        events_published: expected.len() as u64,
        deliveries_per_s,
        server_cpu,
        latency_ms: LatencyMs::from_micros(&latency),
        gateways,
        close_codes,
        foreign_frames: foreign,
        publish_errors,
        publisher: published.as_ref().map(|p| p.faults).unwrap_or_default(),
        // After the stop: the workers' last ticks are in.
        reconnects: ReconnectReport::new(&live.reconnects(), churn_window, args.churn),
        series,
        series_start_unix_s: start_unix_s,
        e2e,
        params: serde_json::json!({
            "users": args.users, "devices": args.devices, "rate": args.rate, "fanout": args.fanout,
            "duration_s": args.duration, "workers": workers,
            "nodes": ring.members().iter().map(|m| format!("{}={}", m.node_id, m.url)).collect::<Vec<_>>(),
            "source_ips": format!("{}-{}", args.source_ips.0, args.source_ips.1),
            "mode": format!("{:?}", args.mode).to_lowercase(),
            "target": format!("{:?}", args.target).to_lowercase(),
            "recover": recover, "churn_per_s": args.churn, "spread": args.spread,
        }),
    })
}

/// `--workers`, or one per [`DEVICES_PER_WORKER`] devices; never more
/// workers than users, never more than [`MAX_DEVICES_PER_WORKER`] each.
pub fn worker_count(requested: Option<u32>, devices: u64, users: u32) -> anyhow::Result<u32> {
    let k = match requested {
        Some(0) => anyhow::bail!("--workers must be at least 1"),
        Some(k) => k.min(users),
        None => (devices.div_ceil(DEVICES_PER_WORKER).max(1) as u32).min(users),
    };
    let per_worker = devices.div_ceil(u64::from(k));
    anyhow::ensure!(
        per_worker <= MAX_DEVICES_PER_WORKER,
        "--workers {k} gives {per_worker} devices to a worker, over the {MAX_DEVICES_PER_WORKER} one process can hold (20,000 open files); use more workers"
    );
    Ok(k)
}

/// One job per worker: a contiguous slice of the users, and a slice of
/// the source addresses (shared round-robin when there are fewer
/// addresses than workers; ports are picked at connect time, so two
/// workers on one address do not collide).
fn jobs(args: &RunArgs, ring: &Ring, population: &Population, secret: &str, workers: u32, run: u64) -> Vec<Job> {
    let n = population.users.len();
    let k = workers as usize;
    let (lo, hi) = (u32::from(args.source_ips.0), u32::from(args.source_ips.1));
    let ips = (hi - lo + 1) as usize;
    (0..k)
        .map(|w| {
            let (from, to) = (w * n / k, (w + 1) * n / k);
            let source_ips = if ips >= k {
                let (a, b) = (w * ips / k, (w + 1) * ips / k - 1);
                (Ipv4Addr::from(lo + a as u32), Ipv4Addr::from(lo + b as u32))
            } else {
                let ip = Ipv4Addr::from(lo + (w % ips) as u32);
                (ip, ip)
            };
            Job {
                worker: w,
                run,
                first_user: from as u32,
                users: population.users[from..to].to_vec(),
                tokens: if population.tokens.is_empty() { Vec::new() } else { population.tokens[from..to].to_vec() },
                jwt_secret: secret.to_owned(),
                devices: args.devices,
                members: ring.members().iter().map(|m| format!("{}={}", m.node_id, m.url)).collect(),
                source_ips,
                connect_rate: f64::from(args.connect_rate.max(1)) / k as f64,
                max_connecting: max_connecting(ring.members().len(), k),
                audience: population.audience,
                nchan: args.target == Target::Nchan,
                recover: args.recover || args.churn > 0.0,
                spread: args.spread,
                // The backend's post ids (UUIDv7, hex) all sort above "0";
                // this run's users are new, so their feeds hold only its posts.
                since_floor: (args.mode == Mode::E2e).then(|| E2E_SINCE_FLOOR.to_owned()),
            }
        })
        .collect()
}

/// Attempts one of `workers` keeps in flight against `nodes` nodes, so
/// that all together stay at [`IN_FLIGHT_PER_NODE`] per node.
pub fn max_connecting(nodes: usize, workers: usize) -> usize {
    (IN_FLIGHT_PER_NODE * nodes / workers.max(1)).clamp(MIN_IN_FLIGHT, MAX_IN_FLIGHT_PER_WORKER)
}

/// Memory of one server process tree: RSS, and PSS where known.
#[derive(Debug, Clone, Copy)]
struct Mem {
    rss: u64,
    pss: Option<u64>,
}

/// Where the servers' memory is read: each gateway's `/metrics`, or
/// nginx's processes in `/proc`.
struct Memory {
    nchan_pid_file: Option<std::path::PathBuf>,
}

impl Memory {
    /// One figure per ring member (0 when a gateway does not answer).
    async fn read(&self, ring: &Ring) -> anyhow::Result<Vec<Mem>> {
        match &self.nchan_pid_file {
            Some(pid_file) => {
                let rss = nchan::nginx_rss_bytes(pid_file)
                    .with_context(|| format!("nginx memory (--nchan-pid-file {})", pid_file.display()))?;
                Ok(vec![Mem { rss, pss: nchan::nginx_pss_bytes(pid_file).ok() }])
            }
            None => Ok(scrape_all(ring, "gateway_process_rss_bytes")
                .await
                .into_iter()
                .map(|r| Mem { rss: r as u64, pss: None })
                .collect()),
        }
    }
}

/// One gauge from every node, in ring member order (0 when unreadable).
async fn scrape_all(ring: &Ring, name: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for m in ring.members() {
        out.push(scrape_gauge(&m.url, name).await.unwrap_or(0.0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_default_to_one_per_15000_devices() {
        assert_eq!(worker_count(None, 1, 1).unwrap(), 1);
        assert_eq!(worker_count(None, 15_000, 15_000).unwrap(), 1);
        assert_eq!(worker_count(None, 15_001, 15_001).unwrap(), 2);
        assert_eq!(worker_count(None, 100_000, 50_000).unwrap(), 7);
        assert_eq!(worker_count(Some(4), 10, 2).unwrap(), 2, "never more workers than users");
        assert!(worker_count(Some(0), 10, 10).is_err());
        let e = worker_count(Some(1), 40_000, 40_000).unwrap_err().to_string();
        assert!(e.contains("19000"), "{e}");
    }

    #[test]
    fn attempts_in_flight_stay_below_the_gateways_pending_cap() {
        // 2 nodes, 4 workers: 256 each, 1,024 in all = 512 per node.
        assert_eq!(max_connecting(2, 4), 256);
        assert_eq!(max_connecting(14, 14), 512);
        assert_eq!(max_connecting(1, 1), 512, "capped per worker");
        assert_eq!(max_connecting(1, 200), MIN_IN_FLIGHT);
        for (nodes, workers) in [(2, 8), (4, 3), (8, 8), (1, 2)] {
            assert!(
                max_connecting(nodes, workers) * workers <= IN_FLIGHT_PER_NODE * nodes,
                "{nodes} nodes, {workers} workers"
            );
        }
    }
}
