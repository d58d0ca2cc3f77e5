//! The `reflex recorder` flags ([`RecorderArgs`]: each flag's help, validation and test sit
//! together here) and the daemon configuration they make ([`RecorderConfig`]).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Default socket of the shared recorder.
pub const DEFAULT_LISTEN: &str = "unix:///run/reflex/recorder.sock";

const MIB: u64 = 1024 * 1024;

/// What the daemon needs to know; [`RecorderArgs::config`] makes one from flags.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// The trace directory.
    pub dir: PathBuf,
    /// A session's records reach the OS at least this often.
    pub flush_interval: Duration,
    /// Rotate a session's file once it is this large.
    pub max_file_bytes: Option<u64>,
    /// Delete the oldest closed traces to keep the directory under this.
    pub max_total_bytes: Option<u64>,
    /// Concurrent Record streams.
    pub max_sessions: usize,
    /// Largest decoded message.
    pub max_message_bytes: usize,
    /// Encoded bytes of records one session may have queued for its writer.
    pub session_buffer_bytes: usize,
    /// gzip level of trace files.
    pub gzip_level: u32,
    /// A stream that sends no `SessionStart` within this is closed.
    pub start_timeout: Duration,
    /// After shutdown is requested, `serve` waits this long for sessions to close.
    pub drain_deadline: Duration,
    /// Test hook: sessions whose writes go to `/dev/full` after the header.
    #[cfg(test)]
    pub(crate) fail_sessions: Vec<String>,
}

impl RecorderConfig {
    /// Defaults for a trace directory.
    pub fn new(dir: impl Into<PathBuf>) -> RecorderConfig {
        RecorderConfig {
            dir: dir.into(),
            flush_interval: Duration::from_millis(100),
            max_file_bytes: None,
            max_total_bytes: None,
            max_sessions: 64,
            max_message_bytes: 32 * 1024 * 1024,
            session_buffer_bytes: 64 * 1024 * 1024,
            gzip_level: crate::writer::DEFAULT_LEVEL,
            start_timeout: Duration::from_secs(10),
            drain_deadline: Duration::from_secs(10),
            #[cfg(test)]
            fail_sessions: Vec::new(),
        }
    }
}

/// Flags of `reflex recorder`. Each can also come from a `REFLEX_RECORDER_*` variable (what
/// systemd's `EnvironmentFile=` sets); a flag on the command line wins. The prefix keeps
/// them apart from `reflex serve`'s `REFLEX_*`, which a server's private recorder child
/// inherits.
#[derive(Debug, Clone, clap::Args)]
pub struct RecorderArgs {
    /// Directory that holds the trace files (created 0750 if missing).
    ///
    /// `--dir DIR` (the SPEC's spelling) works too.
    #[arg(
        long = "trace-dir",
        alias = "dir",
        env = "REFLEX_RECORDER_DIR",
        value_name = "DIR"
    )]
    pub dir: PathBuf,

    /// Unix socket to listen on, as unix:///abs/path or unix:rel/path.
    ///
    /// The parent directory is created if missing. A stale socket file is replaced; a live
    /// one (another recorder answers) is an error.
    #[arg(long, env = "REFLEX_RECORDER_LISTEN", value_name = "URI", default_value = DEFAULT_LISTEN)]
    pub listen: ListenAddr,

    /// Flush interval in milliseconds: a kill -9 loses at most this much of a trace.
    #[arg(long, env = "REFLEX_RECORDER_FLUSH_MS", value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub flush_ms: u64,

    /// Rotate a session to a new file once its file reaches N MiB.
    #[arg(long, env = "REFLEX_RECORDER_MAX_FILE_MB", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub max_file_mb: Option<u64>,

    /// Delete the oldest closed trace files to keep the directory under N MiB.
    #[arg(long, env = "REFLEX_RECORDER_MAX_TOTAL_MB", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_073_741_824))]
    pub max_total_mb: Option<u64>,

    /// Most Record streams at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "REFLEX_RECORDER_MAX_SESSIONS", value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_sessions: u64,

    /// Largest message accepted from a server, in MiB.
    #[arg(long, env = "REFLEX_RECORDER_MAX_MESSAGE_MB", value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_message_mb: u64,

    /// gzip level of trace files, 1 (fastest) to 9 (smallest).
    ///
    /// The default, 1, keeps one core above 20,000 records/s; 2 makes files about a third
    /// smaller at about 1.5× the CPU (see the writer module's measurements).
    #[arg(long, env = "REFLEX_RECORDER_GZIP_LEVEL", value_name = "N", default_value_t = crate::writer::DEFAULT_LEVEL, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub gzip_level: u32,
}

impl RecorderArgs {
    /// The daemon configuration these flags describe.
    pub fn config(&self) -> RecorderConfig {
        RecorderConfig {
            flush_interval: Duration::from_millis(self.flush_ms),
            max_file_bytes: self.max_file_mb.map(|n| n * MIB),
            max_total_bytes: self.max_total_mb.map(|n| n * MIB),
            max_sessions: self.max_sessions as usize,
            max_message_bytes: (self.max_message_mb * MIB) as usize,
            gzip_level: self.gzip_level,
            ..RecorderConfig::new(self.dir.clone())
        }
    }
}

/// A `unix:` listen URI, reduced to its socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr(PathBuf);

impl ListenAddr {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let path = if let Some(p) = s.strip_prefix("unix://") {
            if !p.starts_with('/') {
                return Err(format!(
                    "{s:?}: unix:// needs an absolute path (unix:///run/reflex/recorder.sock)"
                ));
            }
            p
        } else if let Some(p) = s.strip_prefix("unix:") {
            p
        } else {
            return Err(format!(
                "{s:?}: the recorder listens on a Unix socket only (unix:///path/to.sock)"
            ));
        };
        if path.is_empty() || path.ends_with('/') {
            return Err(format!("{s:?}: no socket file name"));
        }
        Ok(ListenAddr(PathBuf::from(path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RecorderArgs,
    }

    fn parse(argv: &[&str]) -> Result<RecorderArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("recorder").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn defaults() {
        let a = parse(&["--dir", "/var/log/reflex"]).unwrap();
        assert_eq!(a.listen.path(), Path::new("/run/reflex/recorder.sock"));
        let c = a.config();
        assert_eq!(c.dir, Path::new("/var/log/reflex"));
        assert_eq!(c.flush_interval, Duration::from_millis(100));
        assert_eq!((c.max_file_bytes, c.max_total_bytes), (None, None));
        assert_eq!(
            (c.max_sessions, c.max_message_bytes),
            (64, 32 * 1024 * 1024)
        );
        assert_eq!(c.gzip_level, 1);
    }

    #[test]
    fn flags_are_validated_while_parsing() {
        assert!(parse(&[]).is_err(), "--dir is required");
        let a = parse(&[
            "--dir",
            "d",
            "--listen",
            "unix:run/r.sock",
            "--max-file-mb",
            "5",
            "--max-total-mb",
            "50",
        ])
        .unwrap();
        assert_eq!(a.listen.path(), Path::new("run/r.sock"));
        assert_eq!(a.config().max_file_bytes, Some(5 * MIB));
        for bad in [
            &["--dir", "d", "--listen", "127.0.0.1:5000"][..],
            &["--dir", "d", "--listen", "unix://relative.sock"],
            &["--dir", "d", "--listen", "unix:///run/reflex/"],
            &["--dir", "d", "--flush-ms", "0"],
            &["--dir", "d", "--max-file-mb", "0"],
            &["--dir", "d", "--max-sessions", "0"],
            &["--dir", "d", "--max-message-mb", "-1"],
            &["--dir", "d", "--gzip-level", "0"],
            &["--dir", "d", "--gzip-level", "10"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
