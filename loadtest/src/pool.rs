//! The coordinator's side of the workers: start them, follow their
//! reports, stop them, collect their results. Protocol: [`crate::wire`].

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

use crate::accounting::{Receipts, decode_histogram};
use crate::series::Series;
use crate::wire::{self, Job, Reconnects, Report};

/// How long a worker may take to report after `Stop` (closing 15,000
/// devices and folding their receipts takes well under this).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the coordinator knows while the run goes, updated by the readers.
pub struct Live {
    /// Devices connected per user (global index): what an event to that
    /// user should reach.
    pub connected_per_user: Vec<AtomicU32>,
    /// Per worker: devices open, attempts established and failed.
    open: Vec<AtomicU64>,
    established: Vec<AtomicU64>,
    failed: Vec<AtomicU64>,
    reconnects: Vec<Mutex<Reconnects>>,
    /// Per worker: how its ramp went (from its `Ready`).
    ramps: Vec<Mutex<Ramp>>,
    /// Events received by all devices (duplicates too).
    pub received: AtomicU64,
    ready: AtomicUsize,
    /// Set when a worker's output ends or makes no sense.
    broken: Mutex<Option<String>>,
    changed: tokio::sync::Notify,
    pub series: Mutex<Series>,
}

impl Live {
    pub fn open(&self) -> u64 {
        self.open.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    pub fn established(&self) -> u64 {
        self.established.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    pub fn failed(&self) -> u64 {
        self.failed.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Reconnection counters of all workers, since the start.
    pub fn reconnects(&self) -> Reconnects {
        let mut total = Reconnects::default();
        for r in &self.reconnects {
            total.add(&r.lock());
        }
        total
    }

    /// All workers' ramps together: failures by cause added up, the
    /// earliest first attempt, the latest outcome, the longest minting.
    pub fn ramp(&self) -> Ramp {
        let mut total = Ramp::default();
        for r in &self.ramps {
            let r = r.lock();
            for (cause, n) in &r.failed_by_cause {
                *total.failed_by_cause.entry(cause.clone()).or_default() += n;
            }
            if r.first_attempt_us > 0 && (total.first_attempt_us == 0 || r.first_attempt_us < total.first_attempt_us) {
                total.first_attempt_us = r.first_attempt_us;
            }
            total.last_outcome_us = total.last_outcome_us.max(r.last_outcome_us);
            total.mint_us = total.mint_us.max(r.mint_us);
        }
        total
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// How a ramp-up went: failed attempts by cause, the window from the
/// first attempt to the last outcome (unix micros), and the time spent
/// minting tokens before it.
#[derive(Debug, Clone, Default)]
pub struct Ramp {
    pub failed_by_cause: std::collections::BTreeMap<String, u64>,
    pub first_attempt_us: u64,
    pub last_outcome_us: u64,
    pub mint_us: u64,
}

/// A worker's final result.
pub struct Finished {
    pub receipts: Receipts,
    pub latency: Histogram<u64>,
    pub close_codes: std::collections::BTreeMap<u16, u64>,
    pub last_receipt_us: u64,
    pub foreign: u64,
}

pub struct Pool {
    pub live: Arc<Live>,
    workers: Vec<Worker>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    reader: JoinHandle<anyhow::Result<Finished>>,
}

impl Pool {
    /// Starts one worker process per job (this binary, `worker`
    /// subcommand) and hands each its job.
    pub async fn start(jobs: Vec<Job>, users: usize) -> anyhow::Result<Pool> {
        let n = jobs.len();
        let live = Arc::new(Live {
            connected_per_user: (0..users).map(|_| AtomicU32::new(0)).collect(),
            open: (0..n).map(|_| AtomicU64::new(0)).collect(),
            established: (0..n).map(|_| AtomicU64::new(0)).collect(),
            failed: (0..n).map(|_| AtomicU64::new(0)).collect(),
            reconnects: (0..n).map(|_| Mutex::new(Reconnects::default())).collect(),
            ramps: (0..n).map(|_| Mutex::default()).collect(),
            received: AtomicU64::new(0),
            ready: AtomicUsize::new(0),
            broken: Mutex::new(None),
            changed: tokio::sync::Notify::new(),
            series: Mutex::new(Series::default()),
        });
        let exe = std::env::current_exe().context("cannot find this program to start workers")?;
        let mut workers = Vec::with_capacity(n);
        for job in jobs {
            let mut child = Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start a worker ({})", exe.display()))?;
            let mut stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let mut line = serde_json::to_vec(&job).expect("jobs serialize");
            line.push(b'\n');
            stdin.write_all(&line).await.context("cannot hand a worker its job")?;
            let reader = tokio::spawn(follow(job.worker, job.first_user as usize, stdout, live.clone()));
            workers.push(Worker { child, stdin, reader });
        }
        Ok(Pool { live, workers })
    }

    /// Waits until every worker has attempted all its devices.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        loop {
            let changed = self.live.changed.notified();
            if let Some(why) = self.live.broken.lock().clone() {
                anyhow::bail!(why);
            }
            if self.live.ready.load(Ordering::Relaxed) == self.workers.len() {
                return Ok(());
            }
            changed.await;
        }
    }

    /// Fails if a worker has gone wrong.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.live.broken.lock().clone() {
            Some(why) => anyhow::bail!(why),
            None => Ok(()),
        }
    }

    /// Sends `command` to every worker.
    pub async fn broadcast(&mut self, command: &wire::Command) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(command).expect("commands serialize");
        line.push(b'\n');
        for (i, w) in self.workers.iter_mut().enumerate() {
            w.stdin.write_all(&line).await.with_context(|| format!("cannot write to worker {i}"))?;
            w.stdin.flush().await.with_context(|| format!("cannot write to worker {i}"))?;
        }
        Ok(())
    }

    /// Tells every worker that `events` were published, then collects
    /// their results and waits for them to exit.
    pub async fn stop(self, events: u32) -> anyhow::Result<Vec<Finished>> {
        let mut line = serde_json::to_vec(&wire::Command::Stop { events }).expect("commands serialize");
        line.push(b'\n');
        let mut workers = self.workers;
        for w in &mut workers {
            // A worker that already died shows up below, with its reason.
            let _ = w.stdin.write_all(&line).await;
            let _ = w.stdin.flush().await;
        }
        let mut out = Vec::with_capacity(workers.len());
        for (i, mut w) in workers.into_iter().enumerate() {
            let finished = tokio::time::timeout(STOP_TIMEOUT, &mut w.reader)
                .await
                .with_context(|| format!("worker {i} did not report within {STOP_TIMEOUT:?} of the stop"))??;
            out.push(finished?);
            drop(w.stdin);
            let _ = tokio::time::timeout(STOP_TIMEOUT, w.child.wait()).await;
        }
        Ok(out)
    }
}

/// Reads one worker's reports until its `Done`.
async fn follow(worker: usize, first_user: usize, stdout: ChildStdout, live: Arc<Live>) -> anyhow::Result<Finished> {
    let result = read_reports(worker, first_user, stdout, &live).await;
    if let Err(e) = &result {
        live.broken.lock().get_or_insert_with(|| format!("{e:#}"));
    }
    live.changed.notify_waiters();
    result
}

async fn read_reports(worker: usize, first_user: usize, stdout: ChildStdout, live: &Live) -> anyhow::Result<Finished> {
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        let report: Report = serde_json::from_str(&line)
            .with_context(|| format!("worker {worker} wrote a line that is not a report"))?;
        match report {
            Report::Tick { unix_s, open, established, failed, received, latency, closed, reconnects } => {
                *live.reconnects[worker].lock() = reconnects;
                let latency = decode_histogram(&latency)?;
                live.open[worker].store(open, Ordering::Relaxed);
                live.established[worker].store(established, Ordering::Relaxed);
                live.failed[worker].store(failed, Ordering::Relaxed);
                live.received.fetch_add(received, Ordering::Relaxed);
                for u in closed {
                    if let Some(c) = live.connected_per_user.get(u as usize) {
                        c.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                live.series.lock().add_tick(unix_s, open, received, &latency);
                crate::metrics::on_tick(live.open(), received, &latency);
            }
            Report::Ready {
                connected,
                established,
                failed,
                failed_by_cause,
                first_attempt_us,
                last_outcome_us,
                mint_us,
            } => {
                *live.ramps[worker].lock() = Ramp { failed_by_cause, first_attempt_us, last_outcome_us, mint_us };
                live.established[worker].store(established, Ordering::Relaxed);
                live.failed[worker].store(failed, Ordering::Relaxed);
                for (i, n) in connected.into_iter().enumerate() {
                    live.connected_per_user[first_user + i].fetch_add(n, Ordering::Relaxed);
                }
                live.ready.fetch_add(1, Ordering::Relaxed);
                live.changed.notify_waiters();
            }
            Report::Done { receipts, latency, close_codes, last_receipt_us, foreign } => {
                let latency = decode_histogram(&latency)?;
                return Ok(Finished { receipts, latency, close_codes, last_receipt_us, foreign });
            }
        }
    }
    anyhow::bail!("worker {worker} exited without reporting (see its errors above)")
}
