//! `/metrics` an operator can read: every family has HELP text, the
//! standard `process_*` metrics are there, and a post's fan-out lands in
//! `backend_fanout_lag_seconds` (from the post's outbox row to its events
//! published), with buckets up to minutes.

mod common;

use common::*;

/// The value of the first sample line that starts with `prefix` (labels
/// included), if any.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test]
async fn fanout_lag_and_process_metrics_are_exported_with_help() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (author, author_token) = api.user("Author").await;
    let (_, follower_token) = api.user("Follower").await;
    api.follow(&follower_token, &author).await;
    let metrics = || async { api.call("GET", "/metrics", None, None).await.body };
    let before = sample(&metrics().await, "backend_fanout_lag_seconds_count").unwrap_or(0.0);

    api.post(&author_token, "measured").await;
    wait_for("the fan-out recorded", || async {
        sample(&metrics().await, "backend_fanout_lag_seconds_count").unwrap_or(0.0) > before
    })
    .await;
    let text = metrics().await;
    let sum = sample(&text, "backend_fanout_lag_seconds_sum").unwrap();
    assert!(sum > 0.0, "a lag was measured: {sum}");
    assert!(sum < 60.0, "the lag is in seconds from the post: {sum}");
    assert!(sample(&text, "backend_fanout_lag_seconds_bucket{le=\"300\"}").is_some(), "buckets up to 300 s");

    // (CPU seconds are whole seconds, so may still be 0.)
    assert!(sample(&text, "process_cpu_seconds_total").is_some(), "process_cpu_seconds_total missing");
    for name in ["process_resident_memory_bytes", "process_open_fds", "process_max_fds"] {
        let v = sample(&text, name).unwrap_or_else(|| panic!("{name} missing"));
        assert!(v > 0.0, "{name} = {v}");
    }
    // Every family has HELP text.
    let families: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    assert!(families.len() > 10, "{families:?}");
    for f in families {
        assert!(text.contains(&format!("# HELP {f} ")), "{f} has no HELP text");
    }
}
