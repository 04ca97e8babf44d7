//! Progress bars on the coordinator's terminal: one for ramp-up, one for
//! the run. Hidden with `--quiet` or when stderr is not a terminal, so
//! logs and CI output stay plain.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::pool::Live;

/// How often a bar reads the workers' figures (they change once a second,
/// but the elapsed time moves on).
const REFRESH: Duration = Duration::from_millis(250);

pub struct Bars {
    visible: bool,
}

impl Bars {
    pub fn new(quiet: bool) -> Bars {
        Bars { visible: !quiet && std::io::stderr().is_terminal() }
    }

    pub fn visible(&self) -> bool {
        self.visible
    }

    fn bar(&self, len: u64, template: &str) -> ProgressBar {
        let target = if self.visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
        bar
    }

    /// Devices attempted of `target`, until [`ProgressBar::finish`].
    pub fn ramp(&self, target: u64, live: Arc<Live>) -> ProgressBar {
        let bar = self.bar(target, "ramp-up [{bar:30}] {pos}/{len} devices {msg} ({elapsed})");
        follow(bar.clone(), live, |bar, live| {
            bar.set_position(live.established() + live.failed());
            bar.set_message(format!("open {}  failed {}", live.open(), live.failed()));
        });
        bar
    }

    /// Seconds of the run of `secs`, with deliveries, until finished.
    pub fn run(&self, secs: u64, live: Arc<Live>) -> ProgressBar {
        let bar = self.bar(secs.max(1), "run     [{bar:30}] {elapsed}/{len}s {msg}");
        let started = std::time::Instant::now();
        let mut last = (0u64, std::time::Instant::now());
        follow(bar.clone(), live, move |bar, live| {
            bar.set_position(started.elapsed().as_secs());
            let received = live.received();
            let per_s = if last.1.elapsed() >= Duration::from_secs(1) {
                let r = (received - last.0) as f64 / last.1.elapsed().as_secs_f64();
                last = (received, std::time::Instant::now());
                Some(r)
            } else {
                None
            };
            if let Some(r) = per_s {
                bar.set_message(format!("open {}  received {received}  {r:.0}/s", live.open()));
            }
        });
        bar
    }
}

/// Refreshes `bar` from `live` until the bar is finished.
fn follow(bar: ProgressBar, live: Arc<Live>, mut update: impl FnMut(&ProgressBar, &Live) + Send + 'static) {
    if bar.is_hidden() {
        return;
    }
    tokio::spawn(async move {
        while !bar.is_finished() {
            update(&bar, &live);
            tokio::time::sleep(REFRESH).await;
        }
    });
}
