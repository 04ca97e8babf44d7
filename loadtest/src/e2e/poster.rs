//! Creates posts over HTTP at a target rate: post `seq` by author
//! `seq % authors` ([`Audience::Followers`]), its text carrying the run,
//! `seq` and the request's start time, so a device measures from the
//! moment the post was asked for to its own receipt.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use contract::event;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::api::Api;
use crate::accounting::new_histogram;
use crate::client::post_text;
use crate::pace::Pace;
use crate::publisher::{Plan, Published};
use crate::series::Series;

/// `POST /post/create` requests in flight at once. Beyond this the poster
/// waits, so an overloaded backend lowers the achieved rate (reported)
/// instead of piling up requests without bound.
const MAX_POSTS_IN_FLIGHT: usize = 256;

/// What the posting did, as the HTTP client saw it.
pub struct Posts {
    pub attempted: u64,
    pub created: u64,
    pub failed: u64,
    /// Request start to answer read, microseconds, successes only.
    pub latency: Histogram<u64>,
    /// Unix micros: first request's start, last answer's end.
    pub first_start_us: u64,
    pub last_end_us: u64,
    /// The first failure, to say why posts failed.
    pub first_error: Option<String>,
    /// (seq, post id) of every post the backend acknowledged.
    pub created_ids: Vec<(u32, String)>,
}

/// What the request tasks share.
struct Shared {
    latency: Histogram<u64>,
    failed: Vec<u32>,
    first_start_us: u64,
    last_end_us: u64,
    first_error: Option<String>,
    created_ids: Vec<(u32, String)>,
}

/// Posts for `plan.duration` at `plan.rate`. `connected[u]` is the number
/// of devices of follower `u` connected now: what a post that reaches `u`
/// should reach. A post whose request failed is expected nowhere (if it
/// was created after all, its receipts count as unexpected).
pub async fn run(
    api: &Arc<Api>,
    author_tokens: &Arc<Vec<String>>,
    plan: &Plan,
    connected: &[AtomicU32],
    series: &Mutex<Series>,
) -> anyhow::Result<(Published, Posts)> {
    let shared = Arc::new(Mutex::new(Shared {
        latency: new_histogram(),
        failed: Vec::new(),
        first_start_us: u64::MAX,
        last_end_us: 0,
        first_error: None,
        created_ids: Vec::new(),
    }));
    let in_flight = Arc::new(Semaphore::new(MAX_POSTS_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut expected: Vec<u32> = Vec::new();
    let mut pace = Pace::new(plan.rate, plan.duration);
    let started_us = event::now_micros();
    let mut picked: Vec<usize> = Vec::new();
    while let Some(due) = pace.due().await {
        for seq in due {
            let permit = in_flight.clone().acquire_owned().await.expect("semaphore is never closed");
            // Waiting for a permit may have run past the end.
            if pace.is_over() {
                break;
            }
            plan.audience.recipients(seq, &mut picked);
            expected.push(picked.iter().map(|&u| connected[u].load(Ordering::Relaxed)).sum());
            let token = author_tokens[plan.audience.author_of(seq) as usize].clone();
            let (api, shared, run) = (api.clone(), shared.clone(), plan.run);
            tasks.spawn(async move {
                let start_us = event::now_micros();
                let result = api.create_post(&token, &post_text(run, seq, start_us)).await;
                let end_us = event::now_micros();
                drop(permit);
                let mut s = shared.lock();
                s.first_start_us = s.first_start_us.min(start_us);
                s.last_end_us = s.last_end_us.max(end_us);
                match result {
                    Ok(id) => {
                        s.latency.saturating_record(end_us.saturating_sub(start_us).max(1));
                        s.created_ids.push((seq, id));
                    }
                    Err(e) => {
                        s.failed.push(seq);
                        s.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            });
            // Labelled by the second it ends in, like the workers' ticks.
            series.lock().add_published(event::now_micros().div_ceil(1_000_000), 1);
        }
        // Reap finished requests so the set stays small on long runs.
        while tasks.try_join_next().is_some() {}
    }
    let elapsed = pace.elapsed();
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    let shared = Arc::try_unwrap(shared).ok().expect("every request task ended").into_inner();
    for &seq in &shared.failed {
        expected[seq as usize] = 0;
    }
    let attempted = expected.len() as u64;
    let failed = shared.failed.len() as u64;
    let posts = Posts {
        attempted,
        created: attempted - failed,
        failed,
        latency: shared.latency,
        first_start_us: if attempted > 0 { shared.first_start_us } else { 0 },
        last_end_us: shared.last_end_us,
        first_error: shared.first_error,
        created_ids: shared.created_ids,
    };
    // The backend, not this process, publishes the broker messages; its
    // count comes from its /metrics ([`super::Session::finish`]).
    Ok((Published { expected, messages: 0, started_us, elapsed, faults: Default::default() }, posts))
}
