//! `reflex trace ls|show|export` on traces written by the real server and recorder
//! (`reflex demo`), checked by readers no one here wrote: the Python `mcap` package, LeRobot's
//! dataset reader (`lerobot-dataset`, import `ledataset`) and DuckDB (tests/trace/readers.py),
//! against values this test computes from the trace through the recorder's reader. Then bad
//! input: a crash-cut trace, a file that is not a trace, an output that exists, an output that
//! cannot be written.
//!
//! The readers are installed by `deploy/ci-setup.sh`; a missing one fails the test with the
//! install step named, never skips it.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use reflex_recorder::reader::TraceReader;
use reflex_recorder::trace::{Record, RequestRecord};
use serde_json::{Value, json};
use util::BIN;

/// The two traces every test here reads, recorded once per test binary.
struct Traces {
    _dir: tempfile::TempDir,
    full: PathBuf,
    hash_only: PathBuf,
}

/// Runs `reflex demo` with `mode` into its own folder and returns the trace it wrote.
fn record(root: &Path, calls: u32, mode: &str) -> PathBuf {
    let dir = root.join(mode);
    let out = Command::new(BIN)
        .args([
            "demo",
            "--calls",
            &calls.to_string(),
            "--record-images",
            mode,
        ])
        .arg("--trace-dir")
        .arg(&dir)
        .env("XDG_CACHE_HOME", root.join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "demo failed: {}", text(&out));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.remove(0)
}

fn traces() -> &'static Traces {
    static T: OnceLock<Traces> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let full = record(dir.path(), 16, "full");
        let hash_only = record(dir.path(), 8, "hash_only");
        Traces {
            _dir: dir,
            full,
            hash_only,
        }
    })
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn trace_cmd(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(BIN).arg("trace").args(args).output().unwrap()
}

/// `reflex trace ARGS...` that must succeed.
fn trace_ok(args: &[&std::ffi::OsStr]) -> String {
    let out = trace_cmd(args);
    assert!(
        out.status.success(),
        "reflex trace {args:?}: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

macro_rules! os {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($a)),*] };
}

/// Every Act record of a trace, through the recorder's reader (the reference).
fn acts(path: &Path) -> Vec<RequestRecord> {
    let mut r = TraceReader::open(path).unwrap();
    let mut out = vec![];
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::Request(a) = rec {
            out.push(*a);
        }
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// What readers.py compares the exports with, computed from the trace itself.
fn expected(path: &Path) -> Value {
    let header = TraceReader::open(path).unwrap().header().clone();
    let acts = acts(path);
    assert!(!acts.is_empty());
    let mut cameras = serde_json::Map::new();
    let mut image_hw = json!(null);
    if header.redaction.image.as_str() == "full" {
        for a in &acts {
            for i in &a.request.images {
                cameras
                    .entry(i.camera.clone())
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .unwrap()
                    .push(json!(i.sha256));
            }
        }
        let first = &acts[0].request.image_b64;
        let img = image::load_from_memory(first).unwrap();
        image_hw = json!([img.height(), img.width()]);
    }
    let rows: Vec<Value> = acts
        .iter()
        .map(|a| {
            json!({
                "seq": a.seq,
                "timestamp": a.timestamp,
                "state": bits(&a.request.state),
                "actions": bits(&a.response.actions),
                "noise_seed": a.noise_seed.or(a.request.noise_seed),
                "instruction": a.request.instruction,
                "episode_id": a.request.episode_id,
                "failed": a.error.is_some(),
            })
        })
        .collect();
    let sum = |f: &dyn Fn(&RequestRecord) -> f64| acts.iter().map(f).sum::<f64>();
    json!({
        "acts": acts.len(),
        "model_hash": header.model_hash,
        "num_actions": acts[0].response.num_actions,
        "action_dim": acts[0].response.action_dim,
        "cameras": cameras,
        "image_hw": image_hw,
        "rows": rows,
        "state_sum": sum(&|a| a.request.state.iter().map(|&v| v as f64).sum()),
        "action_sum": sum(&|a| a.response.actions.iter().map(|&v| v as f64).sum()),
        "action_values": acts.iter().map(|a| a.response.actions.len()).sum::<usize>(),
        "cache_hits": acts.iter().filter(|a| a.cache.as_ref().is_some_and(|c| c.status == "hit")).count(),
        "errors": acts.iter().filter(|a| a.error.is_some()).count(),
        "latency_total_sum": sum(&|a| a.latency.total_ms),
    })
}

/// The exports of both traces, read by the Python `mcap` package, LeRobot's dataset reader
/// and DuckDB, agree with the trace: every message and schema, state and actions bit for
/// bit, images by SHA-256, counts and sums.
#[test]
fn exports_are_read_by_mcap_lerobot_and_duckdb_and_match_the_trace() {
    let t = traces();
    let work = tempfile::tempdir().unwrap();
    let mut all = serde_json::Map::new();
    for (kind, trace) in [("full", &t.full), ("hash_only", &t.hash_only)] {
        let mut e = expected(trace);
        let (mcap, lerobot, parquet) = (
            work.path().join(format!("{kind}.mcap")),
            work.path().join(format!("{kind}-dataset")),
            work.path().join(format!("{kind}.parquet")),
        );
        let acts = e["acts"].as_u64().unwrap();
        let out = trace_ok(os!["export", trace, "--to", "mcap", &mcap]);
        assert!(out.contains(&format!("exported {acts} acts")), "{out}");
        let out = trace_ok(os!["export", trace, "--to", "lerobot", &lerobot]);
        if kind == "hash_only" {
            // A hash_only trace has no image bytes: the export says so.
            assert!(out.contains("no images"), "{out}");
        } else {
            assert!(out.contains("observation.images.base"), "{out}");
        }
        trace_ok(os!["export", trace, "--to", "parquet", &parquet]);
        e["mcap"] = json!(mcap);
        e["lerobot"] = json!(lerobot);
        e["parquet"] = json!(parquet);
        all.insert(kind.into(), e);
    }
    let expected_path = work.path().join("expected.json");
    std::fs::write(
        &expected_path,
        serde_json::to_vec(&Value::Object(all)).unwrap(),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/trace/readers.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&expected_path)
        // LeRobot's reader caches through Hugging Face datasets: keep it in the temp dir and
        // offline (nothing is fetched; the dataset is local).
        .env("HF_HOME", work.path().join("hf"))
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("python3 must be installed (deploy/ci-setup.sh)");
    assert!(
        out.status.success(),
        "the readers disagree with the trace (or are missing: bash deploy/ci-setup.sh):\n{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("all readers agree"),
        "{}",
        text(&out)
    );
}

/// `ls` has one row per file with the counts of the reader; `show` prints the figures.
#[test]
fn ls_and_show_report_what_the_reader_reads() {
    let t = traces();
    let dir = t.full.parent().unwrap();
    let rows: Value = serde_json::from_str(&trace_ok(os!["ls", dir, "--json"])).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let header = TraceReader::open(&t.full).unwrap().header().clone();
    let acts = acts(&t.full);
    let row = &rows[0];
    assert_eq!(row["records"], json!(acts.len()), "{row}");
    assert_eq!(row["session_id"], json!(header.session_id));
    assert_eq!(row["image_mode"], json!("full"));
    assert_eq!(
        row["bytes"],
        json!(std::fs::metadata(&t.full).unwrap().len())
    );
    assert!(
        row["ended_reason"] != json!("cut") && row["ended_reason"] != json!("open"),
        "{row}"
    );
    assert!(row["duration_s"].as_f64().unwrap() >= 0.0, "{row}");
    let table = trace_ok(os!["ls", dir]);
    assert!(table.contains(&header.session_id[..8]), "{table}");

    let show = trace_ok(os!["show", &t.full]);
    assert!(show.contains(&format!("acts: {}", acts.len())), "{show}");
    assert!(show.contains("hit rate"), "{show}");
    let dim = acts[0].response.action_dim as usize;
    // Each dimension's range is the min and max over every step of every chunk.
    let lo = acts
        .iter()
        .flat_map(|a| a.response.actions.chunks(dim).map(|r| r[dim - 1]))
        .fold(f32::INFINITY, f32::min);
    assert!(
        show.contains(&format!("dim {:<3} [{lo:+.6},", dim - 1)),
        "{show}"
    );
    let figures: Value = serde_json::from_str(&trace_ok(os!["show", &t.full, "--json"])).unwrap();
    assert_eq!(figures["figures"]["acts"], json!(acts.len()));
    assert_eq!(figures["header"]["model_hash"], json!(header.model_hash));
}

/// A trace cut mid-gzip by a crash exports up to its last whole record and says so.
#[test]
fn a_crash_cut_trace_exports_up_to_its_last_whole_record() {
    let t = traces();
    let work = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&t.full).unwrap();
    let cut = work.path().join("cut.jsonl.gz");
    std::fs::write(&cut, &bytes[..bytes.len() * 6 / 10]).unwrap();
    let whole = acts(&t.full).len();
    let mut reader = TraceReader::open(&cut).unwrap();
    let mut n = 0;
    while let Some(r) = reader.next_record().unwrap() {
        n += matches!(r, Record::Request(_)) as usize;
    }
    assert!(
        reader.truncation().is_some() && n > 0 && n < whole,
        "{n} of {whole}"
    );
    for (to, out) in [
        ("parquet", "cut.parquet"),
        ("mcap", "cut.mcap"),
        ("lerobot", "cut-ds"),
    ] {
        let out = work.path().join(out);
        let stdout = trace_ok(os!["export", &cut, "--to", to, &out]);
        assert!(
            stdout.contains(&format!("exported {n} acts")),
            "{to}: {stdout}"
        );
        assert!(stdout.contains("was cut by a crash"), "{to}: {stdout}");
    }
    let rows: Value = serde_json::from_str(&trace_ok(os!["ls", work.path(), "--json"])).unwrap();
    assert_eq!(rows[0]["ended_reason"], json!("cut"), "{rows}");
    assert_eq!(rows[0]["records"], json!(n), "{rows}");
}

/// A file that is not a trace is an error naming it, and leaves no output behind.
#[test]
fn a_file_that_is_not_a_trace_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let junk = work.path().join("notes.jsonl");
    std::fs::write(&junk, "hello, this is not a trace\n").unwrap();
    for to in ["parquet", "mcap", "lerobot"] {
        let out = work.path().join(format!("out-{to}"));
        let o = trace_cmd(os!["export", &junk, "--to", to, &out]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("notes.jsonl"),
            "{}",
            text(&o)
        );
        let left: Vec<_> = std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("notes.jsonl")],
            "{to}: output left behind"
        );
    }
    // ls lists it as unreadable instead of failing the whole listing.
    let rows: Value = serde_json::from_str(&trace_ok(os!["ls", work.path(), "--json"])).unwrap();
    assert!(
        rows[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("notes.jsonl")),
        "{rows}"
    );
}

/// An existing output is refused without --force and replaced with it; --force never
/// replaces a folder that is not a LeRobot dataset.
#[test]
fn an_existing_output_is_refused_unless_forced() {
    let t = traces();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("acts.parquet");
    std::fs::write(&out, "precious").unwrap();
    let o = trace_cmd(os!["export", &t.hash_only, "--to", "parquet", &out]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--force"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    trace_ok(os![
        "export",
        &t.hash_only,
        "--to",
        "parquet",
        &out,
        "--force"
    ]);
    assert!(std::fs::read(&out).unwrap().starts_with(b"PAR1"));

    let dir = work.path().join("home");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    let o = trace_cmd(os![
        "export",
        &t.hash_only,
        "--to",
        "lerobot",
        &dir,
        "--force"
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a LeRobot dataset"),
        "{}",
        text(&o)
    );
    assert!(dir.join("keep.txt").exists());
    // A dataset of ours is replaced.
    let ds = work.path().join("ds");
    trace_ok(os!["export", &t.hash_only, "--to", "lerobot", &ds]);
    trace_ok(os![
        "export",
        &t.hash_only,
        "--to",
        "lerobot",
        &ds,
        "--force"
    ]);
    assert!(ds.join("meta/info.json").is_file());
}

/// An output that cannot be created (its parent is a file: refused even for root) is an
/// error naming it.
#[test]
fn an_unwritable_output_is_an_error() {
    let t = traces();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    for (to, name) in [
        ("parquet", "a.parquet"),
        ("mcap", "a.mcap"),
        ("lerobot", "ds"),
    ] {
        let out = file.join(name);
        let o = trace_cmd(os!["export", &t.hash_only, "--to", to, &out]);
        assert_eq!(o.status.code(), Some(1), "{to}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("cannot write"),
            "{to}: {}",
            text(&o)
        );
    }
}
