//! The `reflex replay` flags ([`ReplayArgs`]) and the choices they name.
//!
//! Validation happens while parsing where clap can do it (exactly one of `--target` and
//! `--model` unless `--no-replay`, `--concurrency` in range); [`ReplayArgs::diffs`] folds
//! `--diff` and `--fail-on` into the set of diffs that are computed.

use std::path::PathBuf;

/// Replay a trace against a server or an export and diff actions, latency and cache.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Trace file (.jsonl or .jsonl.gz; compression is detected from the bytes).
    #[arg(value_name = "TRACE")]
    pub trace: PathBuf,

    /// Server to replay against: unix:///path/to.sock, host:port or http://host:port.
    #[arg(
        long,
        value_name = "URI",
        conflicts_with = "model",
        required_unless_present_any = ["model", "no_replay"]
    )]
    pub target: Option<String>,

    /// Export directory to load into a private server (on a temporary Unix socket) for the replay.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// File holding the bearer token of a `--target` started with `--auth-token-file`
    /// (sent as `authorization: Bearer TOKEN`).
    #[arg(long, value_name = "FILE", requires = "target")]
    pub auth_token_file: Option<PathBuf>,

    /// CA certificate (PEM) that signed the certificate of an `https://` `--target`.
    #[arg(long, value_name = "PEM", requires = "target")]
    pub tls_ca: Option<PathBuf>,

    /// Diffs to compute: actions (cos + max_abs), latency (±5 %), cache (status match) or all.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = DiffMode::Actions)]
    pub diff: DiffMode,

    /// Replay only the first N request records (0: all).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub n: u64,

    /// Write a machine-readable JSON report to PATH (schema: README, "Replay report").
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Exit 3 if any diff of MODE failed: actions, latency, cache, all (computes every
    /// diff) or any (whichever --diff computes). The named diff is computed even if --diff
    /// leaves it out.
    #[arg(long, value_name = "MODE", value_enum)]
    pub fail_on: Option<FailOn>,

    /// Read and summarise the trace (records, time span, cache, errors, latency) without a target.
    #[arg(long)]
    pub no_replay: bool,

    /// Folder of image files (searched recursively) that resolves the SHA-256 of hash_only traces.
    #[arg(long, value_name = "DIR")]
    pub image_dir: Option<PathBuf>,

    /// Requests kept in flight at once; lines still print in seq order.
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
}

impl ReplayArgs {
    /// The defaults of the command line for `trace` (no target yet), for tests and callers.
    pub fn new(trace: impl Into<PathBuf>) -> ReplayArgs {
        ReplayArgs {
            trace: trace.into(),
            target: None,
            model: None,
            auth_token_file: None,
            tls_ca: None,
            diff: DiffMode::Actions,
            n: 0,
            output: None,
            fail_on: None,
            no_replay: false,
            image_dir: None,
            concurrency: 1,
        }
    }

    /// The diffs computed: `--diff`, plus whatever `--fail-on` names.
    /// How to dial `--target`: its token and CA, read now (a bad file fails here).
    pub fn connect_options(
        &self,
    ) -> Result<reflex_proto::ConnectOptions, reflex_proto::ConnectError> {
        let mut o = reflex_proto::ConnectOptions::default();
        if let Some(f) = &self.auth_token_file {
            o = o.bearer_token_file(f)?;
        }
        if let Some(f) = &self.tls_ca {
            o = o.tls_ca_file(f)?;
        }
        Ok(o)
    }

    pub fn diffs(&self) -> Diffs {
        let mut d = Diffs::from(self.diff);
        match self.fail_on {
            Some(FailOn::Actions) => d.actions = true,
            Some(FailOn::Latency) => d.latency = true,
            Some(FailOn::Cache) => d.cache = true,
            Some(FailOn::All) => d = Diffs::ALL,
            Some(FailOn::Any) | None => {}
        }
        d
    }
}

/// `--diff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffMode {
    /// Cosine similarity and max |Δ| of the action chunk.
    Actions,
    /// The target's `latency.total_ms` against the recorded one.
    Latency,
    /// The target's own cache status against the recorded one.
    Cache,
    /// All three.
    All,
}

/// `--fail-on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailOn {
    /// A failing actions diff, or a recorded failure replayed differently.
    Actions,
    /// A failing latency diff.
    Latency,
    /// A failing cache diff.
    Cache,
    /// Computes every diff and fails on any of them.
    All,
    /// Fails on any diff that `--diff` computes.
    Any,
}

impl FailOn {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FailOn::Actions => "actions",
            FailOn::Latency => "latency",
            FailOn::Cache => "cache",
            FailOn::All => "all",
            FailOn::Any => "any",
        }
    }
}

/// Which diffs a run computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Diffs {
    pub actions: bool,
    pub latency: bool,
    pub cache: bool,
}

impl Diffs {
    pub const ALL: Diffs = Diffs {
        actions: true,
        latency: true,
        cache: true,
    };

    /// `all`, or the names joined by commas (as the report's first line shows them).
    pub fn label(self) -> String {
        if self == Diffs::ALL {
            return "all".into();
        }
        let names: Vec<&str> = [
            (self.actions, "actions"),
            (self.latency, "latency"),
            (self.cache, "cache"),
        ]
        .iter()
        .filter_map(|(on, name)| on.then_some(*name))
        .collect();
        names.join(",")
    }
}

impl From<DiffMode> for Diffs {
    fn from(m: DiffMode) -> Diffs {
        match m {
            DiffMode::Actions => Diffs {
                actions: true,
                latency: false,
                cache: false,
            },
            DiffMode::Latency => Diffs {
                actions: false,
                latency: true,
                cache: false,
            },
            DiffMode::Cache => Diffs {
                actions: false,
                latency: false,
                cache: true,
            },
            DiffMode::All => Diffs::ALL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReplayArgs,
    }

    fn parse(argv: &[&str]) -> Result<ReplayArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("replay").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn one_target_unless_no_replay() {
        assert!(parse(&["t.jsonl"]).is_err(), "a target is required");
        assert!(parse(&["t.jsonl", "--target", "x:1", "--model", "d"]).is_err());
        let a = parse(&["t.jsonl", "--no-replay"]).unwrap();
        assert!(a.no_replay);
        let a = parse(&["t.jsonl", "--target", "unix:///s.sock"]).unwrap();
        assert_eq!(a.target.as_deref(), Some("unix:///s.sock"));
        assert_eq!((a.diff, a.n, a.concurrency), (DiffMode::Actions, 0, 1));
        assert!(parse(&["t.jsonl", "--model", "d", "--concurrency", "0"]).is_err());
        assert!(parse(&["t.jsonl", "--model", "d", "--diff", "bogus"]).is_err());
    }

    #[test]
    fn fail_on_adds_its_diff() {
        let a = parse(&["t", "--model", "d", "--fail-on", "latency"]).unwrap();
        assert_eq!(a.diffs().label(), "actions,latency");
        let a = parse(&["t", "--model", "d", "--diff", "cache", "--fail-on", "any"]).unwrap();
        assert_eq!(a.diffs().label(), "cache");
        let a = parse(&["t", "--model", "d", "--fail-on", "all"]).unwrap();
        assert_eq!(a.diffs().label(), "all");
    }
}
