//! `reflex fleet index SRC --to DATASET`: closed trace files into the partitioned Parquet
//! dataset, incrementally.
//!
//! 1. The sources: every `*.jsonl` / `*.jsonl.gz` under SRC (hidden names and `reflex ship`'s
//!    `_manifest/` skipped). The robot is the `robot=<ID>` folder in the file's path (the
//!    layout `reflex ship` writes), else `--robot`.
//! 2. Its Parquet file: `robot=<ID>/date=<D>/model=<M>/<name>.parquet`, `D` and `M` from the
//!    path's `date=`/`model=` folders when it has them (shipped traces: nothing is read to
//!    decide), else from the trace's header (the session's start date, UTC, and model hash).
//! 3. Already in the dataset (one listing of DATASET): skipped, not read. So a re-run
//!    reads only new traces and writes nothing twice.
//! 4. A local trace that is not closed (no footer yet: being written, or left by a killed
//!    recorder until its next start repairs it) is skipped and counted; a later run takes it.
//! 5. Written through [`reflex_tracetools::table::export`] (one row group at a time: memory is
//!    bounded by a row group per job, never by a trace), under a temporary name renamed into
//!    place, or uploaded as one PUT: whole or not at all.
//!
//! A trace that cannot be read (damaged before its end) is logged with `slug=fleet-index-failed`
//! and named in the summary; the others are still indexed and the run exits 1.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;

use crate::location::{Bucket, Location, walk};

/// What one index run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct IndexReport {
    /// Trace files found under SRC.
    pub sources: u64,
    /// Indexed by this run.
    pub indexed: u64,
    /// Rows (Acts) written by this run.
    pub rows: u64,
    /// Trace bytes read by this run.
    pub bytes_read: u64,
    /// Parquet bytes written by this run.
    pub bytes_written: u64,
    /// Already in the dataset: not read.
    pub already: u64,
    /// Local traces not closed yet: left for a later run.
    pub open: u64,
    /// Traces that could not be indexed, with the reason.
    pub failed: Vec<(String, String)>,
    pub seconds: f64,
}

impl IndexReport {
    pub fn summary_line(&self) -> String {
        format!(
            "indexed {} new trace file(s): {} rows, {:.1} MB read, {:.1} MB written in {:.1} s; {} already indexed, {} not closed yet (left for a later run), {} failed; {} trace file(s) under the source",
            self.indexed,
            self.rows,
            self.bytes_read as f64 / 1e6,
            self.bytes_written as f64 / 1e6,
            self.seconds,
            self.already,
            self.open,
            self.failed.len(),
            self.sources
        )
    }
}

/// One trace file found under SRC.
#[derive(Debug, Clone)]
struct Source {
    /// Relative to SRC, `/`-separated.
    rel: String,
    size: u64,
    robot: String,
    /// From the path's `date=` / `model=` folders, when it has them.
    date: Option<String>,
    model: Option<String>,
}

impl Source {
    fn name(&self) -> &str {
        self.rel.rsplit('/').next().unwrap_or(&self.rel)
    }

    /// `<name>.parquet` for `<name>.jsonl[.gz]`.
    fn parquet_name(&self) -> String {
        let n = self.name();
        let stem = n
            .strip_suffix(".jsonl.gz")
            .or_else(|| n.strip_suffix(".jsonl"))
            .unwrap_or(n);
        format!("{stem}.parquet")
    }

    fn dataset_key(&self, date: &str, model: &str) -> String {
        format!(
            "robot={}/date={date}/model={model}/{}",
            self.robot,
            self.parquet_name()
        )
    }
}

fn is_trace_name(name: &str) -> bool {
    name.ends_with(".jsonl") || name.ends_with(".jsonl.gz")
}

/// The value of the `key=` folder of `rel`, if any.
fn segment<'a>(rel: &'a str, key: &str) -> Option<&'a str> {
    let want = format!("{key}=");
    let mut parts: Vec<&str> = rel.split('/').collect();
    parts.pop(); // the file name
    parts
        .into_iter()
        .rev()
        .find_map(|p| p.strip_prefix(want.as_str()))
}

fn valid_date(d: &str) -> bool {
    let b = d.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

fn valid_model(m: &str) -> bool {
    (1..=64).contains(&m.len())
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn sources(
    listing: Vec<(String, u64)>,
    robot_flag: Option<&str>,
    src: &Location,
) -> anyhow::Result<Vec<Source>> {
    let mut out = Vec::new();
    for (rel, size) in listing {
        let name = rel.rsplit('/').next().unwrap_or(&rel);
        if !is_trace_name(name)
            || rel
                .split('/')
                .any(|p| p == "_manifest" || p.starts_with('.'))
        {
            continue;
        }
        let robot = match segment(&rel, "robot") {
            Some(r) => reflex_ship::args::parse_robot(r)
                .map_err(|e| anyhow::anyhow!("{}/{rel}: {e}", src.display()))?,
            None => match robot_flag {
                Some(r) => r.to_string(),
                None => bail!(
                    "cannot tell which robot wrote {}/{rel}: its path has no robot=<ID> folder (the layout `reflex ship` writes); pass --robot ID for a recorder folder",
                    src.display()
                ),
            },
        };
        let date = segment(&rel, "date")
            .filter(|d| valid_date(d))
            .map(str::to_string);
        let model = segment(&rel, "model")
            .filter(|m| valid_model(m))
            .map(str::to_string);
        out.push(Source {
            rel,
            size,
            robot,
            date,
            model,
        });
    }
    Ok(out)
}

/// The dataset: where its files go.
#[derive(Clone)]
enum Dataset {
    Local(PathBuf),
    S3(Bucket),
}

impl Dataset {
    async fn existing(&self) -> anyhow::Result<std::collections::HashSet<String>> {
        let listing = match self {
            Dataset::Local(dir) if !dir.exists() => Vec::new(),
            Dataset::Local(dir) => walk(dir)?,
            Dataset::S3(b) => b.list().await?,
        };
        Ok(listing
            .into_iter()
            .map(|(rel, _)| rel)
            .filter(|rel| rel.ends_with(".parquet"))
            .collect())
    }
}

/// The source side.
#[derive(Clone)]
enum Src {
    Local(PathBuf),
    S3(Bucket),
}

/// Runs one index pass.
pub async fn run(
    src: &Location,
    to: &Location,
    robot: Option<&str>,
    endpoint: Option<&str>,
    jobs: usize,
) -> anyhow::Result<IndexReport> {
    let started = Instant::now();
    let source = match src {
        Location::Local(p) => {
            if !p.is_dir() {
                bail!("{} is not a folder of traces", p.display());
            }
            Src::Local(p.clone())
        }
        Location::S3(d) => Src::S3(Bucket::open(d, endpoint)?),
    };
    let dataset = match to {
        Location::Local(p) => {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
            Dataset::Local(p.clone())
        }
        Location::S3(d) => Dataset::S3(Bucket::open(d, endpoint)?),
    };
    if let (Src::Local(a), Dataset::Local(b)) = (&source, &dataset) {
        let (a, b) = (a.canonicalize()?, b.canonicalize()?);
        if b.starts_with(&a) || a.starts_with(&b) {
            bail!(
                "the dataset {} and the source {} must not contain each other",
                b.display(),
                a.display()
            );
        }
    }
    let listing = match &source {
        Src::Local(p) => walk(p)?,
        Src::S3(b) => b.list().await?,
    };
    let found = sources(listing, robot, src)?;
    let existing = dataset.existing().await?;
    let mut report = IndexReport {
        sources: found.len() as u64,
        ..Default::default()
    };
    // Shipped traces name their partition in their path: skip those already there unread.
    let mut todo = Vec::new();
    for s in found {
        match (&s.date, &s.model) {
            (Some(d), Some(m)) if existing.contains(&s.dataset_key(d, m)) => report.already += 1,
            _ => todo.push(s),
        }
    }
    let scratch = tempfile::Builder::new()
        .prefix("reflex-fleet-index-")
        .tempdir()
        .context("creating a scratch folder")?;
    let existing = Arc::new(existing);
    let counter = Arc::new(AtomicU64::new(0));
    let results: Vec<(Source, anyhow::Result<Outcome>)> = futures::stream::iter(todo)
        .map(|s| {
            let (source, dataset, existing, counter) = (
                source.clone(),
                dataset.clone(),
                existing.clone(),
                counter.clone(),
            );
            let scratch = scratch.path().to_path_buf();
            async move {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let r = index_one(
                    &s,
                    &source,
                    &dataset,
                    existing,
                    &scratch.join(n.to_string()),
                )
                .await;
                (s, r)
            }
        })
        .buffer_unordered(jobs.max(1))
        .collect()
        .await;
    for (s, r) in results {
        match r {
            Ok(Outcome::Indexed { rows, written, key }) => {
                tracing::debug!(source = s.rel, key, rows, "indexed");
                report.indexed += 1;
                report.rows += rows;
                report.bytes_read += s.size;
                report.bytes_written += written;
            }
            Ok(Outcome::Already) => report.already += 1,
            Ok(Outcome::Open) => {
                tracing::info!(
                    source = s.rel,
                    "not closed yet (no footer): left for a later run"
                );
                report.open += 1;
            }
            Err(e) => {
                let why = format!("{e:#}");
                tracing::error!(
                    slug = "fleet-index-failed",
                    source = s.rel,
                    error = why,
                    "trace not indexed"
                );
                report.failed.push((s.rel, why));
            }
        }
    }
    report.failed.sort();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

enum Outcome {
    Indexed {
        rows: u64,
        written: u64,
        key: String,
    },
    Already,
    Open,
}

/// What the blocking part of [`index_one`] decided.
enum Converted {
    /// Written to `out` (the dataset file, or a scratch file to upload as `key`).
    Written {
        key: String,
        out: PathBuf,
        rows: u64,
    },
    Already,
    Open,
}

async fn index_one(
    s: &Source,
    source: &Src,
    dataset: &Dataset,
    existing: Arc<std::collections::HashSet<String>>,
    scratch: &Path,
) -> anyhow::Result<Outcome> {
    // A scratch folder only for what goes through a bucket.
    if matches!(source, Src::S3(_)) || matches!(dataset, Dataset::S3(_)) {
        std::fs::create_dir_all(scratch)?;
    }
    let trace = match source {
        Src::Local(root) => root.join(&s.rel),
        Src::S3(b) => {
            let local = scratch.join(s.name());
            b.download(&s.rel, &local).await?;
            local
        }
    };
    let s2 = s.clone();
    let (trace2, scratch2, dataset2) = (trace.clone(), scratch.to_path_buf(), dataset.clone());
    // Reading and writing Parquet is CPU work: off the async threads.
    let done = tokio::task::spawn_blocking(move || -> anyhow::Result<Converted> {
        // The partition from the path, else from the header (its first line only).
        let (date, model) = match (&s2.date, &s2.model) {
            (Some(d), Some(m)) => (d.clone(), m.clone()),
            _ => {
                let reader = reflex_recorder::reader::TraceReader::open(&trace2)
                    .with_context(|| format!("reading {}", trace2.display()))?;
                let h = reader.header();
                let date = h
                    .started_at
                    .get(..10)
                    .filter(|d| valid_date(d))
                    .map(str::to_string)
                    .ok_or_else(|| {
                        anyhow::anyhow!("its header's started_at {:?} has no date", h.started_at)
                    })?;
                if !valid_model(&h.model_hash) {
                    bail!("its header's model_hash {:?} is not a hash", h.model_hash);
                }
                (date, h.model_hash.clone())
            }
        };
        let key = s2.dataset_key(&date, &model);
        if existing.contains(&key) {
            return Ok(Converted::Already);
        }
        // Closed? Only a closed trace is final: its footer at the tail (the last few KiB),
        // else the whole file read through to decide.
        let closed = reflex_recorder::writer::footer_at_tail(&trace2).unwrap_or(false)
            || reflex_recorder::shipped::closed_trace(&trace2)
                .with_context(|| format!("reading {}", trace2.display()))?
                .is_some();
        if !closed {
            return Ok(Converted::Open);
        }
        let out = match &dataset2 {
            Dataset::Local(dir) => {
                let out = dir.join(&key);
                std::fs::create_dir_all(out.parent().expect("a key has folders"))?;
                out
            }
            Dataset::S3(_) => scratch2.join(s2.parquet_name()),
        };
        let exported = reflex_tracetools::table::export(std::slice::from_ref(&trace2), &out, true)?;
        Ok(Converted::Written {
            key,
            out,
            rows: exported.acts,
        })
    })
    .await
    .context("the indexing job panicked")??;
    let (key, out, rows) = match done {
        Converted::Written { key, out, rows } => (key, out, rows),
        Converted::Already => return Ok(Outcome::Already),
        Converted::Open => return Ok(Outcome::Open),
    };
    let written = match dataset {
        Dataset::Local(_) => std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0),
        Dataset::S3(b) => b.upload(&out, &key).await?,
    };
    if let Src::S3(_) = source {
        let _ = std::fs::remove_file(&trace);
    }
    if let Dataset::S3(_) = dataset {
        let _ = std::fs::remove_file(&out);
    }
    Ok(Outcome::Indexed { rows, written, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_take_the_robot_date_and_model_from_the_shipped_layout() {
        let src = Location::parse("s3://fleet/traces").unwrap();
        let got = sources(
            vec![
                (
                    "robot=r7/date=2026-12-01/model=0123abcd/a.jsonl.gz".into(),
                    10,
                ),
                ("robot=r7/_manifest/a.jsonl.gz.json".into(), 1),
                (
                    "robot=r7/date=2026-12-01/model=0123abcd/notes.txt".into(),
                    1,
                ),
            ],
            None,
            &src,
        )
        .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].robot, "r7");
        assert_eq!(
            got[0].dataset_key(
                got[0].date.as_deref().unwrap(),
                got[0].model.as_deref().unwrap()
            ),
            "robot=r7/date=2026-12-01/model=0123abcd/a.parquet"
        );
    }

    #[test]
    fn a_trace_without_a_robot_needs_the_flag_and_bad_ids_are_refused() {
        let src = Location::parse("traces").unwrap();
        let e = sources(vec![("a.jsonl".into(), 1)], None, &src).unwrap_err();
        assert!(e.to_string().contains("--robot"), "{e}");
        let got = sources(vec![("a.jsonl".into(), 1)], Some("arm-1"), &src).unwrap();
        assert_eq!(
            (got[0].robot.as_str(), got[0].date.as_deref()),
            ("arm-1", None)
        );
        assert!(sources(vec![("robot=../x/a.jsonl".into(), 1)], None, &src).is_err());
    }
}
