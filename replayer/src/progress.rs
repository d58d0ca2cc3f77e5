//! The progress bar of a long replay: on stderr, only when stderr is a terminal, and only
//! once a replay has run for [`SHOW_AFTER`] (a short replay never flashes one). Piped
//! output gets the plain lines and nothing else.
//!
//! Its length is the number of records when `--n` bounds it, otherwise the trace's size
//! in (compressed) bytes: the record count of a trace is only known at its end.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A replay shorter than this shows no bar.
pub const SHOW_AFTER: Duration = Duration::from_millis(1500);

/// What the bar counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Records,
    Bytes,
}

/// A bar that may never be drawn.
pub struct Progress {
    bar: Option<ProgressBar>,
    enabled: bool,
    shown: bool,
    started: Instant,
    unit: Unit,
}

impl Progress {
    /// Enabled when stderr is a terminal.
    pub fn for_stderr() -> Progress {
        use std::io::IsTerminal;
        Progress {
            enabled: std::io::stderr().is_terminal(),
            ..Progress::off()
        }
    }

    /// Never drawn.
    pub fn off() -> Progress {
        Progress {
            bar: None,
            enabled: false,
            shown: false,
            started: Instant::now(),
            unit: Unit::Records,
        }
    }

    /// Starts counting towards `len` (hidden until [`SHOW_AFTER`]).
    pub fn start(&mut self, len: u64, unit: Unit) {
        if !self.enabled {
            return;
        }
        let template = match unit {
            Unit::Records => "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} records {msg}",
            Unit::Bytes => {
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} (eta {eta}) {msg}"
            }
        };
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        self.bar = Some(bar);
        self.unit = unit;
        self.started = Instant::now();
    }

    /// One more result printed: `records` so far, `file_bytes` of the trace consumed.
    pub fn update(&mut self, records: u64, file_bytes: u64, msg: impl FnOnce() -> String) {
        let Some(bar) = &self.bar else { return };
        if !self.shown && self.started.elapsed() >= SHOW_AFTER {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        bar.set_position(match self.unit {
            Unit::Records => records,
            Unit::Bytes => file_bytes,
        });
        if self.shown {
            bar.set_message(msg());
        }
    }

    /// Runs `f` (which prints) with the bar out of the way.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) if self.shown => bar.suspend(f),
            _ => f(),
        }
    }

    /// Removes the bar before the summary.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
