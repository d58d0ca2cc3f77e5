//! Progress on stderr while a long pass runs — only when stderr is a terminal, so logs,
//! pipes and CI stay clean. One line, redrawn at most four times a second.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Bytes of trace read against the total, drawn on stderr.
pub struct Progress {
    enabled: bool,
    total: u64,
    started: Instant,
    last: Option<Instant>,
    what: &'static str,
}

impl Progress {
    /// Progress over `total` bytes of input; silent unless stderr is a terminal.
    pub fn new(what: &'static str, total: u64) -> Progress {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            total,
            started: Instant::now(),
            last: None,
            what,
        }
    }

    /// Progress that never draws (tests, library callers).
    pub fn hidden() -> Progress {
        Progress {
            enabled: false,
            ..Progress::new("", 0)
        }
    }

    /// `done` bytes of the total have been read.
    pub fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now - l < Duration::from_millis(250))
        {
            return;
        }
        self.last = Some(now);
        let secs = (now - self.started).as_secs_f64().max(1e-3);
        let pct = if self.total > 0 {
            100.0 * done as f64 / self.total as f64
        } else {
            0.0
        };
        // A failed write to a terminal is not worth stopping an export for.
        let _ = write!(
            std::io::stderr(),
            "\r{} {pct:5.1}%  {:.1} of {:.1} MB  {:.1} MB/s ",
            self.what,
            done as f64 / 1e6,
            self.total as f64 / 1e6,
            done as f64 / 1e6 / secs
        );
    }

    /// Clears the line.
    pub fn finish(&mut self) {
        if self.enabled && self.last.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}
