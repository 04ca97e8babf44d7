//! Password hashing under a registration burst: at most a few hashes run at
//! once (each takes argon2's 19 MiB), and the memory goes back when the
//! burst is over. Measured on the real binary (its own allocator), as RSS
//! from /proc; the figures are printed, not asserted against a budget
//! (the machine is noisy), except that idle RSS must come back down.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tokio::process::Command;

/// Registrations in the burst, and how many are sent at once.
const REGISTRATIONS: usize = 32;
const CONCURRENT: usize = 16;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap()
}

#[tokio::test]
async fn rss_comes_back_after_a_registration_burst() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_backend"))
        .env("BACKEND_LISTEN", addr.to_string())
        .env("AMQP_URL", amqp_url())
        .env("REDIS_URL", REDIS_URL)
        .env("DATABASE_URL", DATABASE_URL)
        .env("JWT_SECRET", SECRET)
        .env("MEMBERSHIP_KEY", unique("test:members"))
        .env("FANOUT_QUEUE", unique("test.memory"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let api = Client { addr };
    wait_for("backend answering", || async { api.try_call("GET", "/healthz", None, None).await.is_some() }).await;
    let before = rss_kib(pid);

    let started = Instant::now();
    let mut peak = before;
    let mut done = 0;
    while done < REGISTRATIONS {
        let batch: Vec<_> = (0..CONCURRENT.min(REGISTRATIONS - done))
            .map(|i| {
                tokio::spawn(async move {
                    let body = serde_json::json!({"first_name": format!("Mem{i}"), "second_name": "T",
                        "birthdate": "1990-01-01", "password": "a fine password"});
                    api.call("POST", "/user/register", None, Some(&body.to_string())).await.status
                })
            })
            .collect();
        for b in batch {
            assert_eq!(b.await.unwrap(), 200);
            peak = peak.max(rss_kib(pid));
        }
        done += CONCURRENT;
    }
    let burst = started.elapsed();
    let after = rss_kib(pid);
    // Idle: give the allocator time to hand memory back.
    let mut idle = after;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        idle = rss_kib(pid);
        if idle < before + 40 * 1024 {
            break;
        }
    }
    eprintln!(
        "RSS: {} MiB at start, peak {} MiB during {REGISTRATIONS} registrations ({CONCURRENT} at once, {burst:?}), \
         {} MiB right after, {} MiB idle",
        before / 1024,
        peak / 1024,
        after / 1024,
        idle / 1024
    );
    assert!(idle < before + 40 * 1024, "RSS stayed at {} MiB (started at {} MiB)", idle / 1024, before / 1024);
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}
