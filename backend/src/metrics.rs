//! Prometheus metrics (names from SPEC).
//!
//! Each backend owns its recorder instead of installing a global one: the
//! gateway installs the process-global recorder, and tests run both in one
//! process. Handles are registered on this recorder directly.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

/// Request duration buckets (seconds): most requests are a few ms; argon2
/// logins take tens of ms.
const DURATION_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Fan-out lag buckets (seconds): a post normally reaches the broker in
/// milliseconds; a backlog or a retried job takes seconds to minutes, and
/// the top buckets say how far off it is rather than just "above 10 s".
const LAG_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
const FANOUT_LAG: &str = "backend_fanout_lag_seconds";

const METADATA: Metadata<'static> = Metadata::new("backend", Level::INFO, Some(module_path!()));

#[derive(Clone)]
pub struct Metrics {
    /// Shared so clones (handlers, workers) record into one registry.
    recorder: Arc<PrometheusRecorder>,
    /// Broker messages published by the fan-out (and confirmed).
    pub events_published: Counter,
    /// Recipients the fan-out delivered a post to (feed cache and event).
    pub fanout_recipients: Counter,
    /// Fan-out attempts that failed (the job stays in the outbox, retried
    /// with backoff).
    pub fanout_retries: Counter,
    /// Fan-out jobs finished.
    pub fanout_jobs: Counter,
    /// Connections answered 503 and closed: over `--max-connections`.
    pub connections_refused: Counter,
    /// Jobs in this process's outbox queue, those that failed at least
    /// once, and the age of the oldest (read by upkeep).
    outbox_jobs: Gauge,
    outbox_failing: Gauge,
    outbox_oldest: Gauge,
    /// From a post's outbox row (written with the post) to its job done:
    /// every event published and confirmed.
    pub fanout_lag: Histogram,
    /// The standard `process_*` metrics (CPU, RSS, open files and limit).
    process: Arc<metrics_process::Collector>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = Arc::new(
            PrometheusBuilder::new()
                .set_buckets(DURATION_BUCKETS)
                .expect("buckets are not empty")
                .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(FANOUT_LAG.into()), LAG_BUCKETS)
                .expect("buckets are not empty")
                .build_recorder(),
        );
        describe(&recorder);
        let process = Arc::new(metrics_process::Collector::default());
        metrics::with_local_recorder(&*recorder, || process.describe());
        let counter = |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let gauge = |name: &'static str| recorder.register_gauge(&Key::from_static_name(name), &METADATA);
        Metrics {
            events_published: counter("backend_events_published_total"),
            fanout_recipients: counter("backend_fanout_recipients_total"),
            fanout_retries: counter("backend_fanout_retries_total"),
            fanout_jobs: counter("backend_fanout_jobs_total"),
            connections_refused: counter("backend_connections_refused_total"),
            outbox_jobs: gauge("backend_outbox_jobs"),
            outbox_failing: gauge("backend_outbox_failing_jobs"),
            outbox_oldest: gauge("backend_outbox_oldest_job_age_seconds"),
            fanout_lag: recorder.register_histogram(&Key::from_static_name(FANOUT_LAG), &METADATA),
            process,
            recorder,
        }
    }

    /// Records one HTTP request. `route` is the matched route template, so
    /// ids in paths do not explode the label set.
    pub fn http_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = vec![
            Label::new("method", method.to_owned()),
            Label::new("route", route.to_owned()),
            Label::new("status", status.to_string()),
        ];
        self.recorder.register_counter(&Key::from_parts("backend_http_requests_total", labels), &METADATA).increment(1);
        let labels = vec![Label::new("route", route.to_owned())];
        let histogram: Histogram = self
            .recorder
            .register_histogram(&Key::from_parts("backend_http_request_duration_seconds", labels), &METADATA);
        histogram.record(elapsed.as_secs_f64());
    }

    /// The outbox gauges.
    pub fn outbox(&self, jobs: i64, failing: i64, oldest_secs: f64) {
        self.outbox_jobs.set(jobs as f64);
        self.outbox_failing.set(failing as f64);
        self.outbox_oldest.set(oldest_secs);
    }

    /// One part of a create job (see `fanout::Part`) succeeded this long
    /// after the job started: the realtime part should end well before
    /// the feeds part on a large audience.
    pub fn fanout_part_done(&self, part: crate::fanout::Part, elapsed: Duration) {
        let labels = vec![Label::new("part", part.as_str())];
        let key = Key::from_parts("backend_fanout_part_seconds", labels);
        self.recorder.register_histogram(&key, &METADATA).record(elapsed.as_secs_f64());
    }

    /// Drains histogram samples into their buckets. Run on a timer (see
    /// `server::UPKEEP_INTERVAL`), not only when scraped.
    pub fn upkeep(&self) {
        self.recorder.handle().run_upkeep();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        metrics::with_local_recorder(&*self.recorder, || self.process.collect());
        let handle = self.recorder.handle();
        handle.run_upkeep();
        handle.render()
    }
}

/// HELP text for every backend metric.
fn describe(r: &PrometheusRecorder) {
    let counter = |name: &'static str, help: &'static str| r.describe_counter(name.into(), None, help.into());
    let gauge =
        |name: &'static str, unit: Option<Unit>, help: &'static str| r.describe_gauge(name.into(), unit, help.into());
    counter("backend_events_published_total", "Broker messages the fan-out published (confirmed by RabbitMQ).");
    counter("backend_fanout_recipients_total", "Followers the fan-out delivered posts to (feed cache and event).");
    counter(
        "backend_fanout_retries_total",
        "Fan-out attempts that failed; the job stays in the outbox, retried with backoff.",
    );
    counter("backend_fanout_jobs_total", "Fan-out jobs finished (every page of followers published).");
    counter("backend_connections_refused_total", "Connections answered 503 and closed: over --max-connections.");
    counter("backend_http_requests_total", "HTTP requests by method, route template and status.");
    gauge("backend_outbox_jobs", None, "Fan-out jobs waiting in this process's outbox queue.");
    gauge("backend_outbox_failing_jobs", None, "Waiting fan-out jobs that failed at least once.");
    gauge("backend_outbox_oldest_job_age_seconds", Some(Unit::Seconds), "Age of the oldest waiting fan-out job.");
    r.describe_histogram(
        "backend_http_request_duration_seconds".into(),
        Some(Unit::Seconds),
        "HTTP request duration by route template.".into(),
    );
    r.describe_histogram(
        FANOUT_LAG.into(),
        Some(Unit::Seconds),
        "From a post's outbox row (written with the post) to its fan-out job done: every realtime event published \
         and every feed written."
            .into(),
    );
    r.describe_histogram(
        "backend_fanout_part_seconds".into(),
        Some(Unit::Seconds),
        "Time from a create job's start to the end of each of its parts, run at once: realtime (events published) \
         and feeds (follower feeds written)."
            .into(),
    );
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
