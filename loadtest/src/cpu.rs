//! The servers' CPU per delivery: process CPU (user + system, so the
//! kernel's share of each write is included) over the publishing window,
//! minus what the same connections cost while only held, divided by the
//! deliveries. Read from `/proc/<pid>/stat` for nginx's master and workers
//! and for gateways whose pids are given (`--server-pids`), else from each
//! gateway's `/metrics` (`process_cpu_seconds_total`, whole seconds only:
//! too coarse for windows of a few seconds).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use contract::ring::Ring;
use serde::Serialize;

use crate::report::scrape_gauge;

/// Where the servers' CPU time is read.
pub enum Source {
    /// Every ring member's `/metrics`.
    Gateways(Ring),
    /// These processes (gateways on this host).
    Pids(Vec<u32>),
    /// nginx's master (pid file) and its workers.
    Nginx(PathBuf),
}

/// Servers' CPU seconds so far, and when it was read.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    at: Instant,
    cpu_s: f64,
}

impl Source {
    /// All servers' CPU seconds so far; `None` if one cannot be read (a
    /// node that is gone would make the figure meaningless).
    pub async fn sample(&self) -> Option<Sample> {
        let cpu_s = match self {
            Source::Gateways(ring) => {
                let mut total = 0.0;
                for m in ring.members() {
                    total += scrape_gauge(&m.url, "process_cpu_seconds_total").await?;
                }
                total
            }
            Source::Nginx(pid_file) => cpu_seconds(&crate::nchan::nginx_pids(pid_file).ok()?)?,
            Source::Pids(pids) => cpu_seconds(pids)?,
        };
        Some(Sample { at: Instant::now(), cpu_s })
    }
}

/// The figure in the report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuReport {
    /// Servers' CPU seconds while the devices were only held, and over
    /// how long.
    pub hold_cpu_s: f64,
    pub hold_window_s: f64,
    /// Servers' CPU seconds from the first publish until the drain ended.
    pub publish_cpu_s: f64,
    pub publish_window_s: f64,
    pub deliveries: u64,
    /// (publish CPU - hold CPU over the same time) / deliveries, in µs.
    pub us_per_delivery: f64,
    /// Cores busy on average while publishing (all servers together).
    pub publish_cores: f64,
}

impl CpuReport {
    /// From the samples at both ends of the hold and of the publishing
    /// window; `None` when a sample is missing or nothing was delivered.
    pub fn new(
        hold: (Option<Sample>, Option<Sample>),
        publish: (Option<Sample>, Option<Sample>),
        deliveries: u64,
    ) -> Option<CpuReport> {
        let (h0, h1) = (hold.0?, hold.1?);
        let (p0, p1) = (publish.0?, publish.1?);
        let secs =
            |a: &Sample, b: &Sample| b.at.saturating_duration_since(a.at).max(Duration::from_millis(1)).as_secs_f64();
        let (hold_window_s, publish_window_s) = (secs(&h0, &h1), secs(&p0, &p1));
        let hold_cpu_s = h1.cpu_s - h0.cpu_s;
        let publish_cpu_s = p1.cpu_s - p0.cpu_s;
        if deliveries == 0 {
            return None;
        }
        let extra = publish_cpu_s - hold_cpu_s / hold_window_s * publish_window_s;
        Some(CpuReport {
            hold_cpu_s,
            hold_window_s,
            publish_cpu_s,
            publish_window_s,
            deliveries,
            us_per_delivery: extra * 1e6 / deliveries as f64,
            publish_cores: publish_cpu_s / publish_window_s,
        })
    }
}

/// CPU seconds (utime + stime) of these processes together.
fn cpu_seconds(pids: &[u32]) -> Option<f64> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??.max(1) as f64;
    let mut total = 0u64;
    for &pid in pids {
        total += stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    }
    Some(total as f64 / ticks)
}

/// utime + stime (clock ticks) from a `/proc/<pid>/stat` line: fields 14
/// and 15, counted after the command in parens (which may hold spaces).
fn stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        let line = "42 (nginx: worker (x)) S 1 42 42 0 -1 4194624 10 0 0 0 250 75 0 0 20 0 1";
        assert_eq!(stat_ticks(line), Some(325));
        assert_eq!(stat_ticks("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(stat_ticks(&own).is_some());
    }

    #[test]
    fn hold_cpu_is_subtracted_at_its_rate() {
        let t = Instant::now();
        let s = |secs: u64, cpu_s: f64| Some(Sample { at: t + Duration::from_secs(secs), cpu_s });
        // Held: 0.1 CPU s over 2 s (0.05 cores). Publishing: 4.0 CPU s over
        // 10 s, of which 0.5 is holding: 3.5 s for 1,000,000 deliveries.
        let r = CpuReport::new((s(0, 1.0), s(2, 1.1)), (s(3, 2.0), s(13, 6.0)), 1_000_000).unwrap();
        assert!((r.us_per_delivery - 3.5).abs() < 1e-9, "{r:?}");
        assert!((r.publish_cores - 0.4).abs() < 1e-9);
        assert!(CpuReport::new((s(0, 1.0), None), (s(3, 2.0), s(13, 6.0)), 10).is_none());
        assert!(CpuReport::new((s(0, 1.0), s(2, 1.1)), (s(3, 2.0), s(13, 6.0)), 0).is_none());
    }
}
