//! A small load run, for real, in CI: two gateway processes in one ring
//! (their own membership key), `loadtest run` with two workers finding them
//! through Redis, ~3,000 devices, a short publish at a modest rate. The
//! JSON report must show every device connected, nothing lost or
//! duplicated, ordered latency percentiles and the gateways' memory.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Process, Vhost, unique, wait_with_timeout};

const SECRET: &str = "loadtest-ci-secret-0123456789";
/// The whole `loadtest run` must end within this (it takes ~15 s).
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const USERS: u32 = 1500;
const DEVICES: u32 = 2;

#[test]
fn a_small_run_over_two_gateways_and_two_workers_loses_nothing() {
    let started = Instant::now();
    let key = unique("lt-ci-ring");
    // Declared first, so it is dropped after the gateways.
    let vhost = Vhost::new();
    let mut gateways =
        [Process::gateway(SECRET, &key, &vhost.amqp_url()), Process::gateway(SECRET, &key, &vhost.amqp_url())];
    for g in &mut gateways {
        g.wait_ready(2);
    }
    let dir = std::env::temp_dir().join(unique("lt-ci"));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");

    let mut run = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["run", "--workers", "2", "--rate", "40", "--fanout", "25", "--duration", "3", "--drain", "5"])
        .args(["--users", &USERS.to_string(), "--devices", &DEVICES.to_string(), "--settle", "1"])
        .args(["--source-ips", "127.0.0.1-127.0.0.4", "--metrics-listen", "off", "--quiet"])
        // Users of their own: other runs on this broker publish to `lt-*`.
        .args(["--user-prefix", &unique("ci-user")])
        .arg("--json")
        .arg(&json)
        .env("JWT_SECRET", SECRET)
        .env("MEMBERSHIP_KEY", &key)
        .env("AMQP_URL", vhost.amqp_url())
        .spawn()
        .expect("loadtest starts");
    let status = wait_with_timeout(&mut run, RUN_TIMEOUT);
    let text =
        std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("no report at {} ({status}): {e}", json.display()));
    let r: serde_json::Value = serde_json::from_str(&text).expect("the report is JSON");
    assert!(status.success(), "loadtest run failed ({status}); report: {text}");

    let target = u64::from(USERS * DEVICES);
    let c = &r["connections"];
    assert_eq!(c["target"], target, "{c}");
    assert_eq!(c["established"], target, "{c}");
    assert_eq!(c["failed"], 0, "{c}");
    assert_eq!(r["workers"], 2);
    assert!(r["connect_rate_per_s"].as_f64().unwrap() > 0.0);

    let m = &r["messages"];
    let expected = m["expected"].as_u64().unwrap();
    assert!(expected > 0, "nothing was expected: {m}");
    assert_eq!(m["received"], expected, "{m}");
    assert_eq!(m["lost"], 0, "{m}");
    assert_eq!(m["duplicates"], 0, "{m}");
    assert_eq!(m["unexpected"], 0, "{m}");
    assert!(r["deliveries_per_s"].as_f64().unwrap() > 0.0);

    let l = &r["latency_ms"];
    let ms = |k: &str| l[k].as_f64().unwrap_or_else(|| panic!("latency_ms.{k} missing: {l}"));
    assert!(ms("p50") > 0.0, "{l}");
    assert!(
        ms("p50") <= ms("p90") && ms("p90") <= ms("p99") && ms("p99") <= ms("p999") && ms("p999") <= ms("max"),
        "{l}"
    );

    let gws = r["gateways"].as_array().expect("gateways listed");
    assert_eq!(gws.len(), 2, "both gateways found through Redis: {gws:?}");
    let held: u64 = gws.iter().map(|g| g["connections"].as_u64().unwrap()).sum();
    assert_eq!(held, target, "the gateways hold every device: {gws:?}");
    for g in gws {
        let per = g["rss_per_connection_bytes"].as_f64().expect("RSS per connection present");
        assert!(per > 0.0, "{g}");
    }

    let series = r["series"].as_array().expect("series present");
    assert!(series.iter().any(|p| p["connections"] == target), "a second with every device connected: {series:?}");
    let delivered: u64 = series.iter().map(|p| p["deliveries_per_s"].as_u64().unwrap()).sum();
    assert_eq!(delivered, expected, "the per-second deliveries add up");

    std::fs::remove_dir_all(&dir).ok();
    eprintln!("ci run: {:.1}s in all; report {text:.0}", started.elapsed().as_secs_f64());
}
