//! The `reflex replay` flags ([`ReplayArgs`]) and the choices they name.
//!
//! Validation happens while parsing where clap can do it (exactly one of `--target` and
//! `--model` unless `--no-replay`, `--concurrency` in range); [`ReplayArgs::diffs`] folds
//! `--diff` and `--fail-on` into the set of diffs that are computed. The values of both
//! flags come from [`Kind::ALL`]: a new kind of diff is a new value without an edit here.

use std::path::PathBuf;

use clap::builder::PossibleValue;

use crate::diff::{Kind, KindSet};

/// Replay a trace against a server or an export and diff actions, latency and cache.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Trace file (.jsonl or .jsonl.gz; compression is detected from the bytes), or a
    /// folder: every *.jsonl / *.jsonl.gz under it, recursively, in sorted path order.
    #[arg(value_name = "TRACE")]
    pub trace: PathBuf,

    /// More traces (files or folders, as TRACE). With several trace files the records of
    /// all of them are replayed as one fleet run with one merged report.
    #[arg(value_name = "TRACE")]
    pub more_traces: Vec<PathBuf>,

    /// Server to replay against: unix:///path/to.sock, host:port or http://host:port.
    /// Repeat it (or use --targets) to spread the records over several servers, each with
    /// --concurrency calls in flight; a target that dies mid-run (connection refused or
    /// reset, UNAVAILABLE) hands its unfinished records to the others.
    #[arg(
        long,
        value_name = "URI",
        conflicts_with = "model",
        required_unless_present_any = ["model", "no_replay", "targets"]
    )]
    pub target: Vec<String>,

    /// Comma-separated targets, the same as one --target per URI (both may be given).
    #[arg(
        long,
        value_name = "URI,URI,...",
        value_delimiter = ',',
        conflicts_with = "model"
    )]
    pub targets: Vec<String>,

    /// Export directory to load into a private server (on a temporary Unix socket) for the replay.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// File holding the bearer token of a `--target` started with `--auth-token-file`
    /// (sent as `authorization: Bearer TOKEN`; to every target).
    #[arg(long, value_name = "FILE", conflicts_with = "model")]
    pub auth_token_file: Option<PathBuf>,

    /// CA certificate (PEM) that signed the certificate of an `https://` `--target`.
    #[arg(long, value_name = "PEM", conflicts_with = "model")]
    pub tls_ca: Option<PathBuf>,

    /// Diffs to compute: one kind (actions: cos + max_abs, latency: ±5 %, cache: status
    /// match) or all.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = DiffMode::One(Kind::Actions))]
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

    /// Requests kept in flight at once, per target; with one trace and one target lines
    /// print in seq order, in a fleet run in the order answers come (the report is sorted).
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,

    /// The `reflex` binary that serves `--model` as a child process (default: this one;
    /// unused without `--model`). Hidden: for tests, and for a replay built apart from its
    /// server.
    #[arg(long, value_name = "PATH", hide = true)]
    pub serve_bin: Option<PathBuf>,
}

impl ReplayArgs {
    /// The defaults of the command line for `trace` (no target yet), for tests and callers.
    pub fn new(trace: impl Into<PathBuf>) -> ReplayArgs {
        ReplayArgs {
            trace: trace.into(),
            more_traces: Vec::new(),
            target: Vec::new(),
            targets: Vec::new(),
            model: None,
            auth_token_file: None,
            tls_ca: None,
            diff: DiffMode::One(Kind::Actions),
            n: 0,
            output: None,
            fail_on: None,
            no_replay: false,
            image_dir: None,
            concurrency: 1,
            serve_bin: None,
        }
    }

    /// Every target URI: the `--target`s, then the `--targets`, duplicates kept (two
    /// entries for one server are two connections).
    pub fn target_uris(&self) -> Vec<String> {
        self.target
            .iter()
            .chain(&self.targets)
            .filter(|t| !t.is_empty())
            .cloned()
            .collect()
    }

    /// Every TRACE argument, as given.
    pub fn trace_args(&self) -> Vec<PathBuf> {
        std::iter::once(self.trace.clone())
            .chain(self.more_traces.iter().cloned())
            .collect()
    }

    /// Whether this is a fleet run (several TRACEs, a folder, or several targets): see
    /// [`crate::fleet`]. A run of one file against one target is the classic path.
    pub fn is_fleet(&self) -> bool {
        !self.more_traces.is_empty() || self.trace.is_dir() || self.target_uris().len() > 1
    }

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

    /// The diffs computed: `--diff`, plus whatever `--fail-on` names.
    pub fn diffs(&self) -> KindSet {
        let mut d = self.diff.kinds();
        match self.fail_on {
            Some(FailOn::One(k)) => d.insert(k),
            Some(FailOn::All) => d = KindSet::ALL,
            Some(FailOn::Any) | None => {}
        }
        d
    }
}

/// `--diff`: one [`Kind`], or all of them. Its values are [`Kind::ALL`]'s names and `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffMode {
    One(Kind),
    All,
}

impl DiffMode {
    /// The kinds this mode computes.
    pub fn kinds(self) -> KindSet {
        match self {
            DiffMode::One(k) => KindSet::of(k),
            DiffMode::All => KindSet::ALL,
        }
    }
}

const DIFF_MODES: [DiffMode; Kind::COUNT + 1] = {
    let mut v = [DiffMode::All; Kind::COUNT + 1];
    let mut i = 0;
    while i < Kind::COUNT {
        v[i] = DiffMode::One(Kind::ALL[i]);
        i += 1;
    }
    v
};

impl clap::ValueEnum for DiffMode {
    fn value_variants<'a>() -> &'a [Self] {
        &DIFF_MODES
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            DiffMode::One(k) => PossibleValue::new(k.as_str()).help(k.help()),
            DiffMode::All => PossibleValue::new("all").help("Every kind"),
        })
    }
}

/// `--fail-on`: one [`Kind`], `all` (computes every diff) or `any` (whichever `--diff`
/// computes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOn {
    One(Kind),
    All,
    Any,
}

impl FailOn {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FailOn::One(k) => k.as_str(),
            FailOn::All => "all",
            FailOn::Any => "any",
        }
    }
}

const FAIL_ONS: [FailOn; Kind::COUNT + 2] = {
    let mut v = [FailOn::Any; Kind::COUNT + 2];
    let mut i = 0;
    while i < Kind::COUNT {
        v[i] = FailOn::One(Kind::ALL[i]);
        i += 1;
    }
    v[Kind::COUNT] = FailOn::All;
    v
};

impl clap::ValueEnum for FailOn {
    fn value_variants<'a>() -> &'a [Self] {
        &FAIL_ONS
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let help = match self {
            FailOn::One(k) if k.counts_call_outcome() => {
                format!("A failing {k} diff, or a recorded failure replayed differently")
            }
            FailOn::One(k) => format!("A failing {k} diff"),
            FailOn::All => "Computes every diff and fails on any of them".into(),
            FailOn::Any => "Fails on any diff that --diff computes".into(),
        };
        Some(PossibleValue::new(self.as_str()).help(help))
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
        assert_eq!(a.target_uris(), ["unix:///s.sock"]);
        assert!(!a.is_fleet());
        assert_eq!(
            (a.diff, a.n, a.concurrency),
            (DiffMode::One(Kind::Actions), 0, 1)
        );
        assert!(parse(&["t.jsonl", "--model", "d", "--concurrency", "0"]).is_err());
        assert!(parse(&["t.jsonl", "--model", "d", "--diff", "bogus"]).is_err());
    }

    #[test]
    fn targets_repeat_and_split_on_commas() {
        let a = parse(&[
            "t.jsonl",
            "u.jsonl",
            "--target",
            "a:1",
            "--targets",
            "b:2,c:3",
            "--target",
            "d:4",
        ])
        .unwrap();
        assert_eq!(a.target_uris(), ["a:1", "d:4", "b:2", "c:3"]);
        assert_eq!(a.trace_args().len(), 2);
        assert!(a.is_fleet());
        let a = parse(&["t.jsonl", "--targets", "b:2,c:3"]).unwrap();
        assert_eq!(a.target_uris().len(), 2);
        assert!(parse(&["t.jsonl", "--targets", "b:2", "--model", "d"]).is_err());
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

    #[test]
    fn every_kind_is_a_value_of_both_flags() {
        for k in Kind::ALL {
            let a = parse(&["t", "--model", "d", "--diff", k.as_str()]).unwrap();
            assert_eq!((a.diff, a.diffs()), (DiffMode::One(k), KindSet::of(k)));
            let a = parse(&[
                "t",
                "--model",
                "d",
                "--diff",
                "all",
                "--fail-on",
                k.as_str(),
            ])
            .unwrap();
            assert_eq!(a.fail_on, Some(FailOn::One(k)));
            assert_eq!(a.fail_on.unwrap().as_str(), k.as_str());
        }
        let a = parse(&["t", "--model", "d", "--diff", "all"]).unwrap();
        assert_eq!(a.diffs(), KindSet::ALL);
        let a = parse(&["t", "--model", "d", "--fail-on", "any"]).unwrap();
        assert_eq!(a.fail_on, Some(FailOn::Any));
        assert!(parse(&["t", "--model", "d", "--fail-on", "bogus"]).is_err());
    }

    #[test]
    fn serve_bin_names_the_binary_that_serves_model() {
        let a = parse(&["t", "--model", "d", "--serve-bin", "/x/reflex"]).unwrap();
        assert_eq!(
            a.serve_bin.as_deref(),
            Some(std::path::Path::new("/x/reflex"))
        );
        assert_eq!(parse(&["t", "--model", "d"]).unwrap().serve_bin, None);
    }
}
