//! `loadtest run --mode e2e`, for real: the real backend and two gateway
//! processes on a RabbitMQ vhost and a ring of their own; users registered
//! and following their authors over HTTP, posts created over HTTP and fanned
//! out by the backend. The JSON report must show every device connected,
//! every expected delivery received, every post created, and the backend's
//! own fan-out counters matching the posts.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Process, Vhost, unique, wait_with_timeout};

const SECRET: &str = "loadtest-e2e-secret-0123456789";
/// Each `loadtest run` must end within this (seeding ~1 s with the test
/// backend's cheap argon2, ramp-up, 3 s of posts, drain).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `loadtest run --mode e2e` with `args`; returns the JSON report.
/// `secret`: None makes the load generator log every user in instead of
/// minting tokens.
fn e2e_run(
    backend: &Process,
    key: &str,
    amqp_url: &str,
    secret: Option<&str>,
    args: &[&str],
    dir: &Path,
) -> serde_json::Value {
    let json = dir.join(unique("report") + ".json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadtest"));
    cmd.args(["run", "--mode", "e2e", "--backend-url", &format!("http://{}", backend.addr)])
        .args(["--drain", "10", "--settle", "1", "--metrics-listen", "off", "--quiet"])
        // Names of their own, to tell this run's users apart in the database.
        .args(["--user-prefix", &unique("e2e")])
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("MEMBERSHIP_KEY", key)
        .env("AMQP_URL", amqp_url)
        .env_remove("JWT_SECRET");
    if let Some(s) = secret {
        cmd.env("JWT_SECRET", s);
    }
    let mut run = cmd.spawn().expect("loadtest starts");
    let status = wait_with_timeout(&mut run, RUN_TIMEOUT);
    let text =
        std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("no report at {} ({status}): {e}", json.display()));
    let r: serde_json::Value = serde_json::from_str(&text).expect("the report is JSON");
    assert!(status.success(), "loadtest run failed ({status}); report: {text}");
    r
}

/// What every e2e report must show: all devices connected, nothing lost,
/// every post created, and the backend having fanned out each post to
/// every follower of its author.
fn check(r: &serde_json::Value, users: u64, devices: u64, followers_per_post: u64) {
    let c = &r["connections"];
    assert_eq!(c["target"], users * devices, "{c}");
    assert_eq!(c["established"], users * devices, "{c}");
    assert_eq!(c["failed"], 0, "{c}");

    let e = &r["e2e"];
    let p = &e["posts"];
    let created = p["created"].as_u64().expect("posts.created");
    assert!(created > 0, "no post created: {p}");
    assert_eq!(p["failed"], 0, "{p}");
    assert_eq!(p["attempted"], created, "{p}");
    assert_eq!(r["events_published"], created, "one event per post");
    assert!(p["created_per_s"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{p}");
    assert_eq!(e["followers_per_author"], serde_json::json!([followers_per_post, followers_per_post]), "{e}");

    let m = &r["messages"];
    let expected = m["expected"].as_u64().unwrap();
    assert_eq!(expected, created * followers_per_post * devices, "every follower's devices expected: {m}");
    assert_eq!(m["received"], expected, "{m}");
    assert_eq!(m["lost"], 0, "{m}");
    assert_eq!(m["duplicates"], 0, "{m}");
    assert_eq!(m["unexpected"], 0, "{m}");
    assert_eq!(r["foreign_frames"], 0, "only this run's posts reach its users");
    let f = &e["feeds"];
    assert_eq!(f["expected"], created * followers_per_post, "every post looked up at every follower: {f}");
    assert_eq!(f["missing"], 0, "every acknowledged post is in every follower's feed: {f}");
    assert_eq!(f["unreadable"], 0, "{f}");

    let l = &r["latency_ms"];
    let ms = |k: &str| l[k].as_f64().unwrap_or_else(|| panic!("latency_ms.{k} missing: {l}"));
    assert!(ms("p50") > 0.0 && ms("p50") <= ms("p99") && ms("p99") <= ms("max"), "{l}");

    // This backend serves only this test: its counters moved by exactly
    // this run's posts.
    let b = &e["backend"];
    assert_eq!(b["fanout_recipients"], created * followers_per_post, "{b}");
    let messages = b["events_published"].as_u64().unwrap();
    assert!(messages >= created && messages <= created * 2, "one message per post and owner node (2 nodes): {b}");
    assert_eq!(r["broker_messages_published"], messages);
    assert!(b["fanout_recipients_per_s"].as_f64().unwrap() > 0.0 && b["window_s"].as_f64().unwrap() > 0.0, "{b}");
}

/// The backend's database (the test backend's default).
const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/feed";

/// A `--celebrity` report: every device and every feed got the one post,
/// the figures are there, and the bulk-seeded users are gone again.
fn check_celebrity(r: &serde_json::Value, followers: u64) {
    let e = &r["e2e"];
    assert_eq!(e["seeding"]["how"], "bulk", "{}", e["seeding"]);
    assert_eq!(e["authors"], 1);
    let c = &e["celebrity"];
    assert_eq!(c["followers"], followers, "{c}");
    assert_eq!(c["devices_expected"], followers, "{c}");
    assert_eq!(c["devices_received"], followers, "{c}");
    assert_eq!(c["feeds_holding"], followers, "{c}");
    let ms = |k: &str| c[k].as_f64().unwrap_or_else(|| panic!("celebrity.{k} missing: {c}"));
    assert!(ms("post_answer_ms") > 0.0 && ms("all_feeds_ms") > 0.0, "{c}");
    assert!(ms("backend_realtime_done_ms") > 0.0 && ms("backend_feeds_done_ms") > 0.0, "{c}");
    let d = &c["device_ms"];
    assert!(d["p50"].as_f64().unwrap() > 0.0 && d["p99"].as_f64() <= d["max"].as_f64(), "{d}");
    for curve in ["receipts", "feeds"] {
        let last = c[curve].as_array().and_then(|a| a.last()).unwrap_or_else(|| panic!("no {curve} curve: {c}"));
        assert_eq!(last[1], followers, "the {curve} curve ends at every follower: {last}");
    }
    // The run deleted its users, and their post with them.
    let post_id = c["post_id"].as_str().unwrap().to_owned();
    let left: i64 = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let (db, conn) = tokio_postgres::connect(DATABASE_URL, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        db.query_one("SELECT count(*) FROM posts WHERE id = $1", &[&post_id]).await.unwrap().get(0)
    });
    assert_eq!(left, 0, "the bulk-seeded users (and their post) are deleted at the end");
}

#[test]
fn posts_created_over_http_reach_every_follower_device() {
    let started = Instant::now();
    let key = unique("lt-e2e-ring");
    // Declared first, so it is dropped after the processes.
    let vhost = Vhost::new();
    let url = vhost.amqp_url();
    let mut gateways = [Process::gateway(SECRET, &key, &url), Process::gateway(SECRET, &key, &url)];
    let mut backend = Process::backend(SECRET, &key, &url);
    for g in &mut gateways {
        g.wait_ready(2);
    }
    backend.wait_readyz();
    let dir = std::env::temp_dir().join(unique("lt-e2e"));
    std::fs::create_dir_all(&dir).unwrap();

    // Tokens minted with the shared secret: 200 users on 4 authors, 2 devices each.
    let args =
        ["--users", "200", "--devices", "2", "--fanout", "50", "--rate", "4", "--duration", "3", "--workers", "2"];
    let r = e2e_run(&backend, &key, &url, Some(SECRET), &args, &dir);
    check(&r, 200, 2, 50);
    assert_eq!(r["e2e"]["seeding"]["tokens"], "minted");
    assert_eq!(r["e2e"]["authors"], 4);

    // Without the secret every user logs in.
    let args = ["--users", "30", "--fanout", "10", "--rate", "3", "--duration", "2"];
    let r = e2e_run(&backend, &key, &url, None, &args, &dir);
    check(&r, 30, 1, 10);
    assert_eq!(r["e2e"]["seeding"]["tokens"], "login");

    // A celebrity: one author whom all follow, bulk-seeded, one post.
    let args = ["--celebrity", "--users", "300", "--workers", "2", "--seed-database", DATABASE_URL];
    let r = e2e_run(&backend, &key, &url, Some(SECRET), &args, &dir);
    check(&r, 300, 1, 300);
    check_celebrity(&r, 300);

    std::fs::remove_dir_all(&dir).ok();
    eprintln!("e2e run: {:.1}s in all", started.elapsed().as_secs_f64());
}
