//! Progress of a training stage: a bar with ETA on stderr when it is a terminal, periodic log
//! lines otherwise (logs, CI, `cargo xtask ablate`'s captured stderr), or nothing.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Nothing (the library default).
    #[default]
    Off,
    /// A bar when stderr is a terminal, plain lines otherwise (the command line's default).
    Auto,
    /// Always a bar.
    Bar,
    /// Always plain lines: about ten per stage, at most one per 10 seconds in between, as
    /// `tracing` info events of target `slime_trainer::progress` (shown by the subscriber the
    /// command line installs, [`crate::logging::init_logging`]).
    Lines,
}

/// The display of one stage.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    stage: &'static str,
    total: u64,
    first: u64,
    started: Instant,
    last_line: Instant,
    every: u64,
}

impl Progress {
    /// Starts the display of `stage`, `done` of `total` steps already taken (a resumed run).
    pub(crate) fn new(mode: ProgressMode, stage: &'static str, done: u64, total: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = matches!(mode, ProgressMode::Bar) || (matches!(mode, ProgressMode::Auto) && terminal);
        let lines = matches!(mode, ProgressMode::Lines) || (matches!(mode, ProgressMode::Auto) && !terminal);
        let bar = bar.then(|| {
            let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} steps, ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            pb.set_style(style);
            pb.set_prefix(stage);
            pb.set_position(done);
            pb.reset_eta();
            pb
        });
        let now = Instant::now();
        Self { bar, lines, stage, total, first: done, started: now, last_line: now, every: (total / 10).max(1) }
    }

    /// Reports that step `step` (1-based) finished with `loss`.
    pub(crate) fn step(&mut self, step: u64, loss: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4}"));
        }
        let periodic = step.is_multiple_of(self.every) || step == self.total || step == self.first + 1;
        if self.lines && (periodic || self.last_line.elapsed() >= Duration::from_secs(10)) {
            self.last_line = Instant::now();
            let elapsed = self.started.elapsed().as_secs_f64();
            let done = step.saturating_sub(self.first).max(1) as f64;
            let eta = elapsed / done * self.total.saturating_sub(step) as f64;
            tracing::info!(
                "[{}] step {step}/{} ({:.0}%) loss {loss:.4}, {:.1} s elapsed, ETA {:.1} s",
                self.stage,
                self.total,
                100.0 * step as f64 / self.total.max(1) as f64,
                elapsed,
                eta
            );
        }
    }

    /// Ends the display.
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // Stopped early (an error): leave the bar where it stopped.
        if let Some(bar) = &self.bar
            && !bar.is_finished()
        {
            bar.abandon();
        }
    }
}
