//! A worker process: holds one slice of the devices, because one process
//! may open only 20,000 files. It connects its users' devices to their ring
//! owners from its own source addresses, reports every second, and at the
//! end folds what each device received into [`Receipts`]. Protocol:
//! [`crate::wire`].

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use contract::ring::{Member, Ring};
use contract::slot::slot_of;
use contract::token::Tokens;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::accounting::{Receipts, encode_histogram, merge_into, new_histogram};
use crate::client::{self, Counters, Ended};
use crate::wire::{Command, Job, Reconnects, Report};

/// A connection attempt that takes longer than this counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Tokens outlive any run.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// First wait before a reconnection attempt that failed is retried;
/// doubles up to [`MAX_BACKOFF`], with jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Short: a dead node's devices retry while the survivors take over its
/// slots (about 5.5 s), and the time they are back is what the rebalance
/// scenario measures; a long backoff would measure the client instead.
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// Churn picks devices on a timer this fine, several per tick when needed.
const CHURN_TICK: Duration = Duration::from_millis(10);

/// Runs a worker on this process's stdin and stdout.
pub async fn run() -> anyhow::Result<()> {
    let mut input = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let line = input.next_line().await?.context("no job on stdin (this subcommand is started by `loadtest run`)")?;
    let job: Job = serde_json::from_str(&line).context("bad job line")?;
    let slice = Slice::new(&job)?;

    let state = Arc::new(State::new(job.users.len(), job.users.len() * job.devices as usize));
    let stop = CancellationToken::new();
    let mut churn: Option<JoinHandle<()>> = None;
    let mut ramp = tokio::spawn(ramp(job.clone(), slice, state.clone(), stop.clone()));
    let mut devices: Option<Vec<JoinHandle<Device>>> = None;
    let mut total = new_histogram();
    let mut ticks = second_ticks();
    let events = loop {
        tokio::select! {
            _ = ticks.tick() => {
                // Ticks fire just after a whole second: that is their label.
                let tick = state.tick((contract::event::now_micros() + 500_000) / 1_000_000, &mut total);
                send(&mut out, &tick).await?;
            }
            r = &mut ramp, if devices.is_none() => {
                devices = Some(r?);
                send(&mut out, &state.ready()).await?;
            }
            line = input.next_line() => {
                let line = line?.context("the coordinator went away")?;
                match serde_json::from_str(&line).context("bad command line")? {
                    Command::Stop { events } => break events,
                    Command::Churn { per_s } => {
                        if let Some(c) = churn.take() {
                            c.abort();
                        }
                        if per_s > 0.0 {
                            churn = Some(tokio::spawn(churn_devices(state.clone(), per_s, job.run)));
                        }
                    }
                }
            }
        }
    };

    if let Some(c) = churn.take() {
        c.abort();
    }
    stop.cancel();
    let devices = match devices {
        Some(d) => d,
        None => ramp.await?, // stopped during ramp-up
    };
    let mut receipts = Receipts::new(events);
    let mut losses = std::env::var_os("LOADTEST_LOSS_LOG").map(|_| String::new());
    for d in devices {
        let d = d.await?;
        if let Some(out) = losses.as_mut() {
            loss_line(out, &job, events, &d);
        }
        receipts.add_device(d.user as usize, d.seqs, &job.audience);
    }
    if let (Some(path), Some(lines)) = (std::env::var_os("LOADTEST_LOSS_LOG"), losses)
        && !lines.is_empty()
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(lines.as_bytes())?;
    }
    // A last tick for the part of a second since the previous one, labelled
    // by the second it ends in.
    let tick = state.tick(contract::event::now_micros().div_ceil(1_000_000), &mut total);
    send(&mut out, &tick).await?;
    let close_codes = state.counters.closes.lock().clone();
    let last_receipt_us = state.counters.last_receipt_us.load(Ordering::Relaxed);
    let foreign = state.counters.foreign.load(Ordering::Relaxed);
    let latency = encode_histogram(&total);
    send(&mut out, &Report::Done { receipts, latency, close_codes, last_receipt_us, foreign }).await
}

/// One device's outcome: its user (global index) and what it received.
struct Device {
    user: u32,
    seqs: Vec<u32>,
    /// What happened to its connection (unix micros, what, events received
    /// until then), for `LOADTEST_LOSS_LOG`.
    timeline: Vec<(u64, String, usize)>,
}

/// With `LOADTEST_LOSS_LOG=FILE`, every device that misses an event of its
/// user is written to FILE (one JSON line: the user, the events missed, the
/// events received in arrival order and its connection timeline): what a
/// loss is diagnosed from.
fn loss_line(out: &mut String, job: &Job, events: u32, d: &Device) {
    if d.timeline.is_empty() {
        return; // never connected: expected nowhere
    }
    let got: std::collections::HashSet<u32> = d.seqs.iter().copied().collect();
    let missing: Vec<u32> =
        (0..events).filter(|&s| job.audience.contains(s, d.user as usize) && !got.contains(&s)).collect();
    if missing.is_empty() {
        return;
    }
    let local = (d.user - job.first_user) as usize;
    let line = serde_json::json!({
        "user": job.users.get(local),
        "missing": missing,
        "seqs": d.seqs,
        "timeline": d.timeline,
    });
    out.push_str(&line.to_string());
    out.push('\n');
}

/// Where this worker's devices go.
struct Slice {
    ring: Ring,
    tokens: Vec<String>,
    /// Microseconds it took to mint the tokens (done before the ramp).
    mint_us: u64,
}

impl Slice {
    fn new(job: &Job) -> anyhow::Result<Slice> {
        let minting = Instant::now();
        let members: Vec<Member> =
            job.members.iter().map(|m| m.parse()).collect::<Result<_, String>>().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(!members.is_empty(), "the job lists no gateway");
        let tokens = if job.nchan {
            // Nchan: the bearer "token" is the user id, naming its channel.
            job.users.clone()
        } else if job.tokens.is_empty() {
            let minter = Tokens::new(job.jwt_secret.as_bytes());
            job.users.iter().map(|u| minter.issue(u, TOKEN_TTL)).collect()
        } else {
            anyhow::ensure!(job.tokens.len() == job.users.len(), "one token per user");
            job.tokens.clone()
        };
        let mint_us = minting.elapsed().as_micros() as u64;
        Ok(Slice { ring: Ring::new(members), tokens, mint_us })
    }

    /// The URL of reconnection attempt `attempt` for `user`: the owner,
    /// then the other members in turn (any node accepts any user and
    /// proxies to the owner it sees).
    fn url(&self, user: &str, attempt: usize) -> &str {
        let members = self.ring.members();
        let owner = self.ring.owner(slot_of(user)).expect("ring has members");
        let at = members.iter().position(|m| m == owner).unwrap_or(0);
        &members[(at + attempt) % members.len()].url
    }
}

/// What the worker's devices share.
struct State {
    counters: Counters,
    open: AtomicU64,
    established: AtomicU64,
    failed: AtomicU64,
    /// Failed first attempts by cause.
    failed_by_cause: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Unix micros of the first attempt and of the latest outcome.
    first_attempt_us: AtomicU64,
    last_outcome_us: AtomicU64,
    mint_us: AtomicU64,
    per_user: Mutex<PerUser>,
    /// Per device (ramp-up order): whether it is connected now, and how
    /// churn tells it to close and reconnect.
    churn: Vec<(std::sync::atomic::AtomicBool, tokio::sync::Notify)>,
    reconnects: Mutex<Reconnects>,
}

/// Devices per user, and the users whose devices ended since the last
/// tick. One lock for both, so a device that ends while `Ready` is being
/// written is counted exactly once: in the snapshot or in `closed`.
struct PerUser {
    connected: Vec<u32>,
    ready: bool,
    closed: Vec<u32>,
}

impl State {
    fn new(users: usize, devices: usize) -> State {
        State {
            counters: Counters::new(),
            open: AtomicU64::new(0),
            established: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            failed_by_cause: Mutex::default(),
            first_attempt_us: AtomicU64::new(0),
            last_outcome_us: AtomicU64::new(0),
            mint_us: AtomicU64::new(0),
            per_user: Mutex::new(PerUser { connected: vec![0; users], ready: false, closed: Vec::new() }),
            churn: (0..devices).map(|_| Default::default()).collect(),
            reconnects: Mutex::new(Reconnects::default()),
        }
    }

    fn opened(&self, local: usize) {
        self.per_user.lock().connected[local] += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        self.established.fetch_add(1, Ordering::Relaxed);
    }

    fn ended(&self, local: usize, global: u32) {
        let mut p = self.per_user.lock();
        p.connected[local] -= 1;
        if p.ready {
            p.closed.push(global);
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The per-user counts at the moment the worker declares itself ready.
    fn ready(&self) -> Report {
        let mut p = self.per_user.lock();
        p.ready = true;
        p.closed.clear();
        Report::Ready {
            connected: p.connected.clone(),
            established: self.established.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            failed_by_cause: self.failed_by_cause.lock().clone(),
            first_attempt_us: self.first_attempt_us.load(Ordering::Relaxed),
            last_outcome_us: self.last_outcome_us.load(Ordering::Relaxed),
            mint_us: self.mint_us.load(Ordering::Relaxed),
        }
    }

    /// A first attempt failed, for `cause`.
    fn failed(&self, cause: String) {
        *self.failed_by_cause.lock().entry(cause).or_default() += 1;
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.outcome();
    }

    /// A first attempt ended (either way) now.
    fn outcome(&self) {
        self.last_outcome_us.fetch_max(contract::event::now_micros(), Ordering::Relaxed);
    }

    /// The report of the second that ends at `unix_s`; adds its latencies
    /// into `total`.
    fn tick(&self, unix_s: u64, total: &mut Histogram<u64>) -> Report {
        let latency = self.counters.latency.take();
        merge_into(total, &latency);
        Report::Tick {
            unix_s,
            open: self.open.load(Ordering::Relaxed),
            established: self.established.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            received: self.counters.received.swap(0, Ordering::Relaxed),
            latency: encode_histogram(&latency),
            closed: std::mem::take(&mut self.per_user.lock().closed),
            reconnects: *self.reconnects.lock(),
        }
    }
}

/// Connects every device of the slice at the job's rate; returns once each
/// has connected or failed.
async fn ramp(job: Job, slice: Slice, state: Arc<State>, stop: CancellationToken) -> Vec<JoinHandle<Device>> {
    state.mint_us.store(slice.mint_us, Ordering::Relaxed);
    let slice = Arc::new(slice);
    let n_users = job.users.len();
    let target = n_users * job.devices as usize;
    let connecting = Arc::new(Semaphore::new(job.max_connecting.max(1)));
    let (lo, hi) = (u32::from(job.source_ips.0), u32::from(job.source_ips.1));
    let started = Instant::now();
    state.first_attempt_us.store(contract::event::now_micros(), Ordering::Relaxed);
    let mut devices = Vec::with_capacity(target);
    for i in 0..target {
        if stop.is_cancelled() {
            break;
        }
        let due = started + Duration::from_secs_f64(i as f64 / job.connect_rate.max(1.0));
        tokio::time::sleep_until(due.into()).await;
        let permit = connecting.clone().acquire_owned().await.expect("semaphore is never closed");
        // Devices of one user are spread over the ramp, not back to back.
        let local = i % n_users;
        let global = job.first_user + local as u32;
        let url = if job.spread {
            // Round-robin over the members: by user, shifted per device.
            let members = slice.ring.members();
            members[(global as usize + i / n_users) % members.len()].url.clone()
        } else {
            slice.ring.owner(slot_of(&job.users[local])).expect("ring has members").url.clone()
        };
        let source = Ipv4Addr::from(lo + (i as u32 % (hi - lo + 1)));
        let (slice, state, stop) = (slice.clone(), state.clone(), stop.clone());
        let (user, run, recover) = (job.users[local].clone(), job.run, job.recover);
        let job_floor = job.since_floor.clone().unwrap_or_else(|| client::since_floor(run));
        devices.push(tokio::spawn(async move {
            let token = &slice.tokens[local];
            let ws = tokio::time::timeout(CONNECT_TIMEOUT, client::connect(source, &url, token)).await;
            drop(permit);
            let mut ws = match ws {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    tracing::debug!("connect failed: {e:#}");
                    state.failed(client::failure_cause(&e));
                    return Device { user: global, seqs: Vec::new(), timeline: Vec::new() };
                }
                Err(_) => {
                    tracing::debug!("connect timed out");
                    state.failed("timeout".to_owned());
                    return Device { user: global, seqs: Vec::new(), timeline: Vec::new() };
                }
            };
            state.outcome();
            state.opened(local);
            let (connected, churn) = &state.churn[i];
            let (mut seqs, mut newest) = (Vec::new(), String::new());
            let mut timeline = vec![(contract::event::now_micros(), format!("connected {url}"), 0)];
            let floor = job_floor.clone();
            loop {
                connected.store(true, Ordering::Relaxed);
                let churn = recover.then_some(churn);
                let ended = client::read_until(ws, i, run, &state.counters, &stop, churn, &mut seqs, &mut newest).await;
                connected.store(false, Ordering::Relaxed);
                timeline.push((contract::event::now_micros(), format!("ended {ended:?}"), seqs.len()));
                if ended == Ended::Stopped || !recover {
                    break;
                }
                // Reconnect and recover what was missed meanwhile.
                state.open.fetch_sub(1, Ordering::Relaxed);
                {
                    let mut r = state.reconnects.lock();
                    r.disconnects += 1;
                    r.churned += u64::from(ended == Ended::Churned);
                }
                let moved = match ended {
                    Ended::Moved(url) => Some(url),
                    _ => None,
                };
                let since = if newest.is_empty() { floor.clone() } else { newest.clone() };
                match reconnect(&slice, &user, token, source, moved, &since, &seqs, &state, &stop).await {
                    Some((w, url)) => {
                        timeline.push((
                            contract::event::now_micros(),
                            format!("reconnected {url} since {since}"),
                            seqs.len(),
                        ));
                        ws = w;
                        state.open.fetch_add(1, Ordering::Relaxed);
                        state.reconnects.lock().connects += 1;
                    }
                    None => {
                        // Stopped while reconnecting: not open, but still
                        // counted once by `ended` below.
                        state.open.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            state.ended(local, global);
            Device { user: global, seqs, timeline }
        }));
    }
    let attempted = devices.len() as u64;
    while state.established.load(Ordering::Relaxed) + state.failed.load(Ordering::Relaxed) < attempted {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    devices
}

/// Reconnects a device whose connection ended, with `?since=` the newest
/// event it has (or the run's floor), first to `moved` (a 4001 reason),
/// else to the owner, then to the other members, backing off between
/// failures; `None` once the run stops.
#[allow(clippy::too_many_arguments)]
async fn reconnect(
    slice: &Slice,
    user: &str,
    token: &str,
    source: Ipv4Addr,
    moved: Option<String>,
    since: &str,
    seqs: &[u32],
    state: &State,
    stop: &CancellationToken,
) -> Option<(client::Ws, String)> {
    let mut backoff = FIRST_BACKOFF;
    // Members that refused the TCP connection (the process is gone) are
    // skipped for the rest of this reconnection, and the next member is
    // tried at once: a smart client does not wait on a dead address.
    let members = slice.ring.members().len();
    let mut refused: Vec<&str> = Vec::new();
    let mut turn = 0;
    for attempt in 0.. {
        let url = match (&moved, attempt) {
            (Some(u), 0) => u.as_str(),
            _ => {
                let mut u = slice.url(user, turn);
                for _ in 0..members {
                    if !refused.contains(&u) {
                        break;
                    }
                    turn += 1;
                    u = slice.url(user, turn);
                }
                turn += 1;
                u
            }
        };
        let ws = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, client::connect_since(source, url, token, Some(since))) => r,
            _ = stop.cancelled() => return None,
        };
        match ws {
            Ok(Ok(ws)) => return Some((ws, url.to_owned())),
            Ok(Err(e)) => {
                tracing::debug!("reconnect to {url} failed: {e:#}");
                let was_refused = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
                });
                if was_refused && !refused.contains(&url) && refused.len() + 1 < members {
                    refused.push(url);
                    state.reconnects.lock().failures += 1;
                    continue;
                }
            }
            Err(_) => tracing::debug!("reconnect to {url} timed out"),
        }
        state.reconnects.lock().failures += 1;
        // Jitter, so the devices of a dead node do not retry in step.
        let jitter = splitmix(
            u64::from(state.counters.received.load(Ordering::Relaxed) as u32)
                ^ attempt as u64
                ^ seqs.len() as u64
                ^ user.len() as u64,
        );
        let wait = backoff.mul_f64(0.5 + (jitter % 1000) as f64 / 1000.0);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return None,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    None
}

/// Closes and reconnects `per_s` connected devices per second, picked at
/// random, until aborted.
async fn churn_devices(state: Arc<State>, per_s: f64, seed: u64) {
    let n = state.churn.len();
    if n == 0 {
        return;
    }
    let started = Instant::now();
    let mut done = 0u64;
    let mut x = seed;
    let mut tick = tokio::time::interval(CHURN_TICK);
    loop {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * per_s) as u64;
        while done < due {
            done += 1;
            // A few tries to find a device that is connected now.
            for _ in 0..8 {
                x = splitmix(x);
                let (connected, notify) = &state.churn[(x % n as u64) as usize];
                if connected.load(Ordering::Relaxed) {
                    notify.notify_one();
                    break;
                }
            }
        }
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Ticks at whole unix seconds, so that the ticks of all workers of a run
/// fall into the same second and the coordinator can add them up.
fn second_ticks() -> tokio::time::Interval {
    let into_second = contract::event::now_micros() % 1_000_000;
    let first = tokio::time::Instant::now() + Duration::from_micros(1_000_000 - into_second);
    let mut t = tokio::time::interval_at(first, Duration::from_secs(1));
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    t
}

async fn send(out: &mut (impl AsyncWrite + Unpin), report: &Report) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(report).expect("reports serialize");
    line.push(b'\n');
    out.write_all(&line).await?;
    out.flush().await.context("the coordinator went away")
}
