//! Prometheus metrics (names from SPEC).
//!
//! Each backend owns its recorder instead of installing a global one: the
//! gateway installs the process-global recorder, and tests run both in one
//! process. Handles are registered on this recorder directly.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

/// Request duration buckets (seconds): most requests are a few ms; argon2
/// logins take tens of ms.
const DURATION_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

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
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = Arc::new(
            PrometheusBuilder::new().set_buckets(DURATION_BUCKETS).expect("buckets are not empty").build_recorder(),
        );
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

    /// Drains histogram samples into their buckets. Run on a timer (see
    /// `server::UPKEEP_INTERVAL`), not only when scraped.
    pub fn upkeep(&self) {
        self.recorder.handle().run_upkeep();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let handle = self.recorder.handle();
        handle.run_upkeep();
        handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
