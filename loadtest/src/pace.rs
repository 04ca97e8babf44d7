//! Paces a publisher: which event numbers are due now, at a target rate,
//! for a given duration. Wakes every [`TICK`] and catches up, so the rate
//! holds on average even when one wake-up comes late.

use std::ops::Range;
use std::time::{Duration, Instant};

/// How often the publisher wakes to catch up with the target rate.
const TICK: Duration = Duration::from_millis(2);

pub struct Pace {
    started: Instant,
    rate: f64,
    duration: Duration,
    tick: tokio::time::Interval,
    next: u32,
}

impl Pace {
    /// Starts the clock now.
    pub fn new(rate: f64, duration: Duration) -> Pace {
        Pace { started: Instant::now(), rate, duration, tick: tokio::time::interval(TICK), next: 0 }
    }

    /// Waits for the next tick and returns the event numbers that became
    /// due; `None` once the duration is over (or at once for rate 0).
    pub async fn due(&mut self) -> Option<Range<u32>> {
        if self.rate <= 0.0 || self.is_over() {
            return None;
        }
        self.tick.tick().await;
        let due = ((self.started.elapsed().as_secs_f64() * self.rate) as u32).max(self.next);
        let range = self.next..due;
        self.next = due;
        Some(range)
    }

    pub fn is_over(&self) -> bool {
        self.started.elapsed() >= self.duration
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hands_out_each_number_once_at_about_the_rate() {
        let mut pace = Pace::new(1000.0, Duration::from_millis(200));
        let mut seen = Vec::new();
        while let Some(r) = pace.due().await {
            seen.extend(r);
        }
        assert_eq!(seen, (0..seen.len() as u32).collect::<Vec<_>>(), "in order, no gap, no repeat");
        assert!((150..=260).contains(&seen.len()), "{} numbers in 0.2 s at 1000/s", seen.len());
        assert!(Pace::new(0.0, Duration::from_secs(1)).due().await.is_none());
    }
}
