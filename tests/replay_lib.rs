//! Replays of real traces in depth: the reference export written by `reflex export-demo`,
//! recorded by real `reflex recorder` and `reflex serve --recorder` processes on Unix
//! sockets, replayed by the real `reflex replay` (against a `reflex serve` of its own with
//! `--target`, or its private child with `--model`), files in temp dirs. These were the
//! replayer crate's in-process tests; the crate links no server any more, so they run the
//! binary. Numbers are read from the JSON report (`--output`), text from stdout/stderr.
//!
//! Recording is done once per test binary ([`traces`]).

mod util;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reflex_proto::v1::{ActRequest, Image};
use serde_json::Value;
use util::*;

/// Every replay and recording await is bounded by this (a loaded 2-core machine is slow).
const T: Duration = Duration::from_secs(120);
/// Calls recorded per trace (one of them fails on purpose).
const CALLS: usize = 14;
/// Index of the call that is recorded failing (state of the wrong length).
const BAD_CALL: usize = 9;
/// Calls of the long trace, for stopping a replay in the middle.
const LONG_CALLS: usize = 120;

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

// ---------------------------------------------------------------------------
// Recorded traces, shared by every test.
// ---------------------------------------------------------------------------

struct Traces {
    _dir: tempfile::TempDir,
    root: PathBuf,
    export0: PathBuf,
    export1: PathBuf,
    full: PathBuf,
    hash_only: PathBuf,
    /// `full`, [`LONG_CALLS`] calls.
    long: PathBuf,
    /// The encoded frames the calls sent, one file each, in nested folders.
    images: PathBuf,
}

fn traces() -> &'static Traces {
    static TRACES: OnceLock<Traces> = OnceLock::new();
    TRACES.get_or_init(|| {
        // Its own runtime on its own thread: the caller is inside a test's runtime.
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(record_traces())
        })
        .join()
        .unwrap()
    })
}

/// A camera frame: a gradient with a bright square whose place depends on `i`.
fn frame(i: usize, wrist: bool) -> Vec<u8> {
    let (ox, oy) = ((i * 37) % 180, (i * 53) % 180);
    let img = image::RgbImage::from_fn(224, 224, |x, y| {
        let inside =
            (ox as u32..ox as u32 + 40).contains(&x) && (oy as u32..oy as u32 + 40).contains(&y);
        if inside {
            image::Rgb([230, 40, if wrist { 200 } else { 30 }])
        } else {
            image::Rgb([(x / 2) as u8, (y / 2) as u8, if wrist { 90 } else { 140 }])
        }
    });
    reflex_engine::preprocess::encode_jpeg(&img, 85)
}

/// The frame index of call `i`: frames repeat, so the prefix cache both hits and misses.
fn frame_of(i: usize) -> usize {
    [0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 0, 1, 6][i % CALLS]
}

fn request_with(i: usize, f: usize) -> ActRequest {
    let state_len = if i == BAD_CALL { 3 } else { 8 };
    ActRequest {
        images: vec![
            Image {
                camera: "base".into(),
                data: frame(f, false),
                sha256: String::new(),
            },
            Image {
                camera: "wrist".into(),
                data: frame(f, true),
                sha256: String::new(),
            },
        ],
        instruction: "pick up the red cup".into(),
        state: (0..state_len)
            .map(|k| (k as f32 * 0.1 + i as f32 * 0.01).sin())
            .collect(),
        episode_id: "ep-1".into(),
        ..Default::default()
    }
}

async fn record_traces() -> Traces {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (export0, export1) = (root.join("export0"), root.join("export1"));
    export(&export0, 0);
    export(&export1, 1);

    let images = root.join("images");
    for f in 0..7 {
        let sub = images.join(format!("cam/{}", f % 3));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("base-{f}.jpg")), frame(f, false)).unwrap();
        std::fs::write(sub.join(format!("wrist-{f}.jpg")), frame(f, true)).unwrap();
    }

    let full = record_with(&root, &export0, "full", "full", CALLS, frame_of).await;
    let hash_only = record_with(&root, &export0, "hash_only", "hash", CALLS, frame_of).await;
    let long = record_with(&root, &export0, "full", "long", LONG_CALLS, frame_of).await;
    Traces {
        _dir: dir,
        root,
        export0,
        export1,
        full,
        hash_only,
        long,
        images,
    }
}

/// Records `calls` calls of [`request_with`] through a `reflex recorder` process and a
/// `reflex serve --recorder` process; returns the trace file.
async fn record_with(
    root: &Path,
    export: &Path,
    mode: &str,
    name: &str,
    calls: usize,
    frames: fn(usize) -> usize,
) -> PathBuf {
    let traces = root.join(format!("traces-{name}"));
    let rsock = root.join(format!("rec-{name}.sock"));
    let mut rec = recorder(&traces, &rsock, &[]).await;

    let sdir = root.join(format!("serve-{name}"));
    std::fs::create_dir_all(&sdir).unwrap();
    let recorder_uri = format!("unix://{}", rsock.display());
    let (mut srv, psock) = serve(
        &sdir,
        export,
        &[
            "--recorder",
            &recorder_uri,
            "--record-images",
            mode,
            "--embodiment",
            "franka",
        ],
    )
    .await;
    let mut client = policy_client(&format!("unix://{}", psock.display())).await;
    for i in 0..calls {
        let res = within(client.act(request_with(i, frames(i)))).await;
        assert_eq!(res.is_err(), i == BAD_CALL, "call {i}: {res:?}");
    }
    // SIGTERM ends the session (footer `shutdown`), then the recorder closes the file.
    srv.signal(libc::SIGTERM);
    assert!(srv.wait_exit(T).expect("serve stops").success());
    rec.signal(libc::SIGTERM);
    assert!(rec.wait_exit(T).expect("recorder stops").success());

    let files: Vec<PathBuf> = trace_files(&traces)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".jsonl.gz"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// What a `reflex replay` run left: exit code, stdout, stderr, and the JSON report when
/// `--output` was given.
struct Ran {
    code: i32,
    out: String,
    err: String,
    report: Value,
}

impl Ran {
    fn summary(&self) -> &Value {
        &self.report["summary"]
    }
}

/// Runs `reflex replay ARGS...`.
async fn replay(args: &[&str]) -> Ran {
    let out = within(
        tokio::process::Command::new(BIN)
            .arg("replay")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
        report: Value::Null,
    }
}

/// [`replay`] with `--output` into a temp dir, the report parsed.
async fn replay_report(args: &[&str]) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.json");
    let mut all = args.to_vec();
    all.extend(["--output", path.to_str().unwrap()]);
    let mut ran = replay(&all).await;
    ran.report = json_report(&path);
    ran
}

/// A `reflex serve` process of its own; killed on drop.
struct Server {
    uri: String,
    proc: Proc,
    _dir: tempfile::TempDir,
}

async fn server(export: &Path) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (proc, sock) = serve(dir.path(), export, &[]).await;
    Server {
        uri: format!("unix://{}", sock.display()),
        proc,
        _dir: dir,
    }
}

/// The lines of a trace (gzip or plain).
fn lines_of(path: &Path) -> Vec<String> {
    trace_text(path).lines().map(str::to_string).collect()
}

/// Writes `lines` as a plain `.jsonl` trace into a new temp dir.
fn write_trace(lines: &[String]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edited.jsonl");
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn json_report(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// (seq, cos, max_abs, pass) of every request entry of a report.
fn action_results(report: &Value) -> Vec<(u64, Option<f64>, Option<f64>, bool)> {
    report["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let a = &r["actions"];
            (
                u(&r["seq"]),
                a["cos"].as_f64(),
                a["max_abs"].as_f64(),
                a["pass"].as_bool().unwrap_or(true),
            )
        })
        .collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for p in walk(from) {
        let dest = to.join(p.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&p, dest).unwrap();
    }
}

/// A `reflex replay` running in the background, its stdout read line by line.
struct Background {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    out: String,
}

impl Background {
    fn start(args: &[&str]) -> Background {
        let mut child = std::process::Command::new(BIN)
            .arg("replay")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Background {
            child,
            lines,
            out: String::new(),
        }
    }

    /// Reads stdout until a line starts with `prefix`.
    fn wait_line(&mut self, prefix: &str) {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.out.push_str(&l);
                    self.out.push('\n');
                    if l.starts_with(prefix) {
                        return;
                    }
                }
                Err(e) => panic!("no line {prefix:?} ({e}); stdout so far:\n{}", self.out),
            }
        }
    }

    /// The rest of stdout and the exit code.
    fn finish(mut self) -> (i32, String) {
        let deadline = Instant::now() + T;
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "the replay did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.out.push_str(&l);
            self.out.push('\n');
        }
        (st.code().unwrap_or(-1), std::mem::take(&mut self.out))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `reflex` children of `pid` (from /proc).
fn reflex_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces, so split after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).and_then(|v| v.parse().ok());
        if ppid == Some(pid) && head.contains("(reflex") {
            out.push(p);
        }
    }
    out
}

/// Whether `pid` is gone (or a zombie nobody reaps yet: dead all the same).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    gone(pid)
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_model_replays_bit_exactly_through_a_private_server() {
    let t = traces();
    let ran = replay_report(&[s(&t.full), "--model", s(&t.export0), "--diff", "all"]).await;
    assert_eq!(ran.code, 0, "{}\n{}", ran.out, ran.err);

    let lines: Vec<&str> = ran.out.lines().collect();
    assert_eq!(lines[0], format!("Replay: {}", t.full.display()));
    assert!(lines[1].starts_with("reflex_version: "), "{}", ran.out);
    assert!(lines[3].starts_with("config_hash: "));
    assert!(lines.contains(&"embodiment: franka"), "{}", ran.out);
    assert!(
        ran.out
            .contains(&format!("Loading target model: {}", t.export0.display()))
    );
    assert!(
        ran.out
            .contains("Replaying requests (--n=all, --diff=all):")
    );
    assert!(!ran.out.contains("MODEL HASH DIFFERS"), "{}", ran.out);
    let first = lines.iter().find(|l| l.starts_with("seq= 0 ")).unwrap();
    assert!(
        first.starts_with("seq= 0 actions: cos=1.000000 max_abs=0.00e+00 [PASS] latency: "),
        "{first}"
    );
    assert!(first.ends_with("cache: miss→miss [PASS]"), "{first}");
    assert!(ran.out.contains("seq= 1 ") && ran.out.contains("cache: hit→hit [PASS]"));
    let bad = lines
        .iter()
        .find(|l| l.starts_with(&format!("seq= {BAD_CALL} ")))
        .unwrap();
    assert!(
        bad.contains("error: invalid-argument→INVALID_ARGUMENT"),
        "{bad}"
    );
    assert!(bad.ends_with("[PASS]"), "{bad}");

    let sum = ran.summary();
    assert_eq!(
        (u(&sum["records"]), u(&sum["replayed"]), u(&sum["diffed"])),
        (CALLS as u64, CALLS as u64, CALLS as u64 - 1)
    );
    let (acts, cache) = (&sum["actions"], &sum["cache"]);
    assert_eq!(
        (u(&acts["pass"]), u(&acts["total"])),
        (CALLS as u64 - 1, CALLS as u64 - 1)
    );
    assert_eq!(
        (u(&cache["pass"]), u(&cache["total"])),
        (CALLS as u64 - 1, CALLS as u64 - 1)
    );
    assert_eq!(
        (u(&sum["errors"]["pass"]), u(&sum["errors"]["total"])),
        (1, 1)
    );
    assert!(ran.out.contains(&format!(
        "actions: {0}/{0} pass (cos≥0.999, max_abs<1e-3)",
        CALLS - 1
    )));
    assert!(
        ran.out.contains("latency: ") && ran.out.contains("pass (within ±5% of recorded total_ms)")
    );

    // The JSON report: the fields the README documents.
    let v = &ran.report;
    assert_eq!(v["report_version"], 1);
    assert_eq!(v["trace"], t.full.display().to_string());
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["header"]["embodiment"], "franka");
    assert_eq!(v["header"]["redaction"]["image"], "full");
    assert!(v["header"]["model_hash"].as_str().unwrap().len() == 16);
    assert_eq!(v["target"]["model_hash"], v["header"]["model_hash"]);
    assert_eq!(v["target"]["model_hash_matches"], true);
    assert_eq!(v["target"]["model_dir"], t.export0.display().to_string());
    let uri = v["target"]["uri"].as_str().unwrap();
    assert!(uri.starts_with("unix://"));
    assert_eq!(v["options"]["diff"], "all");
    assert_eq!(v["options"]["n"], Value::Null);
    assert_eq!(v["options"]["concurrency"], 1);
    assert_eq!(sum["replayed"], CALLS);
    assert_eq!(sum["diffed"], CALLS - 1);
    assert_eq!(sum["actions"]["pass"], CALLS - 1);
    assert_eq!(sum["actions"]["fail"], 0);
    assert_eq!(sum["cache"]["total"], CALLS - 1);
    assert!(sum["latency"]["total"].as_u64().unwrap() == CALLS as u64 - 1);
    assert_eq!(sum["errors"]["pass"], 1);
    assert_eq!(sum["thresholds"]["actions_min_cos"], 0.999);
    assert_eq!(sum["thresholds"]["actions_max_abs"], 0.001);
    assert_eq!(sum["thresholds"]["latency_pct"], 5.0);
    assert_eq!(sum["stopped"], Value::Null);
    assert_eq!(sum["truncation"], Value::Null);
    let reqs = v["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), CALLS);
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r["seq"], i, "seq order");
        assert!(r["line"].as_u64().unwrap() >= 2);
        assert_eq!(r["status"], "replayed");
        if i == BAD_CALL {
            assert_eq!(r["error"]["recorded"]["slug"], "invalid-argument");
            assert_eq!(r["error"]["replayed"]["code"], "INVALID_ARGUMENT");
            assert_eq!(r["error"]["pass"], true);
            assert!(r.get("actions").is_none());
            continue;
        }
        assert_eq!(r["actions"]["cos"], 1.0);
        assert_eq!(r["actions"]["max_abs"], 0.0);
        assert_eq!(r["actions"]["pass"], true);
        let l = &r["latency"];
        assert!(l["recorded_ms"].as_f64().unwrap() > 0.0);
        assert!(l["replayed_ms"].as_f64().unwrap() > 0.0);
        assert!(l["delta_pct"].is_number() && l["pass"].is_boolean());
        assert_eq!(r["cache"]["recorded"], r["cache"]["replayed"]);
        assert_eq!(r["cache"]["pass"], true);
        assert!(r.get("error").is_none());
    }
    // The private server is gone with the replay, and so is its socket's folder.
    let sock = Path::new(uri.trim_start_matches("unix://"));
    assert!(!sock.parent().unwrap().exists(), "{}", sock.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_model_fails_actions_and_fail_on_exits_3() {
    let t = traces();
    let other = server(&t.export1).await;
    // First, on the fresh server: only a cache diff asked for, and it matches (the cache
    // does not depend on the weights), so --fail-on any does not fire...
    let ran = replay_report(&[
        s(&t.full),
        "--target",
        &other.uri,
        "--diff",
        "cache",
        "--fail-on",
        "any",
    ])
    .await;
    let sum = ran.summary();
    assert!(
        sum["actions"].is_null() && sum["cache"].is_object(),
        "{sum}"
    );
    assert_eq!(sum["cache"]["fail"], 0, "{}", ran.out);
    assert_eq!(ran.code, 0, "{}", ran.out);
    assert!(
        ran.out.contains("warning: MODEL HASH DIFFERS"),
        "{}",
        ran.out
    );
    // ...but --fail-on all computes every diff.
    let ran = replay(&[
        s(&t.full),
        "--target",
        &other.uri,
        "--diff",
        "cache",
        "--fail-on",
        "all",
    ])
    .await;
    assert_eq!(ran.code, 3, "{}", ran.out);

    let ran = replay_report(&[s(&t.full), "--target", &other.uri]).await;
    assert_eq!(
        ran.code, 0,
        "failing diffs alone exit 0 (seed behaviour): {}",
        ran.out
    );
    let acts = &ran.summary()["actions"];
    assert_eq!(
        (u(&acts["pass"]), u(&acts["total"])),
        (0, CALLS as u64 - 1),
        "{}",
        ran.out
    );
    assert!(ran.out.contains("[FAIL]"));

    let ran = replay(&[s(&t.full), "--target", &other.uri, "--fail-on", "actions"]).await;
    assert_eq!(ran.code, 3, "{}", ran.out);
    assert!(ran.out.contains("fail-on actions: triggered"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_file_errors_exit_1() {
    let t = traces();
    let dir = tempfile::tempdir().unwrap();
    let lines = lines_of(&t.full);
    assert_eq!(lines.len(), CALLS + 2, "header, requests, footer");

    // Missing file.
    let missing = dir.path().join("nope.jsonl.gz");
    let ran = replay(&[s(&missing), "--target", "unix:///nowhere.sock"]).await;
    assert_eq!(ran.code, 1);
    assert!(
        ran.err.contains("cannot open trace") && ran.err.contains("nope.jsonl.gz"),
        "{}",
        ran.err
    );

    // Unknown schema_version in the header.
    let mut edited = lines.clone();
    edited[0] = edited[0].replace("\"schema_version\":1", "\"schema_version\":7");
    let (_d1, p) = write_trace(&edited);
    let ran = replay(&[s(&p), "--target", "unix:///nowhere.sock"]).await;
    assert_eq!(ran.code, 1);
    assert!(
        ran.err.contains(":1: unknown schema_version 7"),
        "{}",
        ran.err
    );

    // No header: the file starts with a request.
    let (_d2, p) = write_trace(&lines[1..]);
    let ran = replay(&[s(&p), "--target", "unix:///nowhere.sock"]).await;
    assert_eq!(ran.code, 1);
    assert!(ran.err.contains("has no header"), "{}", ran.err);

    // Damage in the middle, found while replaying: what came before is replayed and
    // summarised, then exit 1 naming the line.
    let target = server(&t.export0).await;
    let mut edited = lines.clone();
    edited[5] = edited[5][..edited[5].len() / 2].to_string();
    let (_d3, p) = write_trace(&edited);
    let ran = replay(&[s(&p), "--target", &target.uri]).await;
    assert_eq!(ran.code, 1, "{}", ran.out);
    assert!(
        ran.err.contains("edited.jsonl:6: malformed record"),
        "{}",
        ran.err
    );
    assert!(ran.out.contains("Summary:\nreplayed: 4\n"), "{}", ran.out);
    assert!(
        ran.out
            .contains("stopped: the trace could not be read further")
    );

    // An unknown schema_version on a request line in the middle.
    let mut edited = lines.clone();
    edited[8] = edited[8].replace("\"schema_version\":1", "\"schema_version\":2");
    let (_d4, p) = write_trace(&edited);
    let ran = replay(&[s(&p), "--target", &target.uri]).await;
    assert_eq!(ran.code, 1);
    assert!(
        ran.err.contains("edited.jsonl:9: unknown schema_version 2"),
        "{}",
        ran.err
    );

    // --no-replay reports the same damage the same way.
    let ran = replay(&[s(&p), "--no-replay"]).await;
    assert_eq!(ran.code, 1);
    assert!(
        ran.err.contains("edited.jsonl:9: unknown schema_version 2"),
        "{}",
        ran.err
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_cut_trace_replays_up_to_its_last_whole_line() {
    let t = traces();
    let dir = tempfile::tempdir().unwrap();
    let raw = std::fs::read(&t.full).unwrap();
    let cut = dir.path().join("cut.jsonl.gz");
    std::fs::write(&cut, &raw[..raw.len() / 2]).unwrap();
    let target = server(&t.export0).await;
    let ran = replay_report(&[s(&cut), "--target", &target.uri]).await;
    assert_eq!(ran.code, 0, "{}\n{}", ran.out, ran.err);
    let sum = ran.summary();
    let replayed = u(&sum["replayed"]);
    assert!(replayed > 2 && replayed < CALLS as u64, "{}", ran.out);
    assert_eq!(sum["actions"]["fail"], 0);
    assert!(ran.out.contains("warning: trace truncated"), "{}", ran.out);
    assert!(u(&sum["truncation"]["line"]) >= replayed + 2);
    assert!(
        ran.report["warnings"][0]
            .as_str()
            .unwrap()
            .contains("trace truncated")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_or_bad_model_exits_2() {
    let t = traces();
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix://{}", dir.path().join("none.sock").display());
    let ran = replay(&[s(&t.full), "--target", &sock]).await;
    assert_eq!(ran.code, 2);
    assert!(
        ran.err.contains("cannot reach --target unix://"),
        "{}",
        ran.err
    );

    // A TCP port nobody listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ran = replay(&[s(&t.full), "--target", &format!("127.0.0.1:{port}")]).await;
    assert_eq!(ran.code, 2, "{}", ran.err);

    for model in [dir.path().join("missing"), dir.path().to_path_buf()] {
        let ran = replay(&[s(&t.full), "--model", s(&model)]).await;
        assert_eq!(ran.code, 2, "{}", ran.err);
        assert!(
            ran.err.contains(&format!("--model {}", model.display())),
            "{}",
            ran.err
        );
    }
}

/// The serve child's own words reach the user when the `--model` folder does not load;
/// its stdout never reaches the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_folder_that_does_not_load_exits_2_with_the_serve_childs_error() {
    let t = traces();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("reflex_config.json"), "{ not json").unwrap();
    // What `reflex serve` itself says about this folder.
    let serve = std::process::Command::new(BIN)
        .args(["serve", s(&broken), "--listen"])
        .arg(format!("unix://{}", dir.path().join("s.sock").display()))
        .output()
        .unwrap();
    assert!(!serve.status.success());
    let said = String::from_utf8_lossy(&serve.stderr);
    let said = said
        .lines()
        .find_map(|l| l.strip_prefix("error: "))
        .unwrap_or_else(|| panic!("reflex serve printed no error line: {said}"))
        .to_string();

    let ran = replay(&[s(&t.full), "--model", s(&broken)]).await;
    assert_eq!(ran.code, 2, "{}", ran.err);
    let err = ran.err.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert!(
        err.starts_with(&format!(
            "error: --model {}: reflex serve exited with code 1: ",
            broken.display()
        )),
        "{err}"
    );
    assert!(err.contains(&said), "{err}\nserve said: {said}");
    assert_eq!(
        ran.err.matches(&said).count(),
        1,
        "shown once, inside the replay's error: {}",
        ran.err
    );
    assert!(
        !ran.out.contains(&said),
        "stdout is the report: {}",
        ran.out
    );

    // The hidden --serve-bin names the binary that serves: a missing one is exit 2 too.
    let ran = replay(&[
        s(&t.full),
        "--model",
        s(&t.export0),
        "--serve-bin",
        s(&dir.path().join("no-such-reflex")),
    ])
    .await;
    assert_eq!(ran.code, 2, "{}", ran.err);
    assert!(ran.err.contains("cannot start "), "{}", ran.err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_failing_a_call_that_succeeded_when_recorded_exits_2() {
    let t = traces();
    let target = server(&t.export0).await;
    // Record 3 recorded as a success, but now with a state the model refuses.
    let mut lines = lines_of(&t.full);
    let mut v: Value = serde_json::from_str(&lines[4]).unwrap();
    v["request"]["state"] = serde_json::json!([0.1, 0.2]);
    lines[4] = v.to_string();
    let (_d, p) = write_trace(&lines);
    let ran = replay_report(&[s(&p), "--target", &target.uri]).await;
    assert_eq!(ran.code, 2, "{}", ran.out);
    let line = ran.out.lines().find(|l| l.starts_with("seq= 3 ")).unwrap();
    assert!(
        line.contains("actions: target error INVALID_ARGUMENT [FAIL]"),
        "{line}"
    );
    assert!(line.contains("error: ok→INVALID_ARGUMENT"), "{line}");
    assert!(ran.out.contains("target errors: 1 "), "{}", ran.out);
    assert_eq!(
        u(&ran.summary()["replayed"]),
        CALLS as u64,
        "the replay went on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_only_trace_needs_and_uses_image_dir() {
    let t = traces();
    // Without images: stops before any model is loaded, naming both ways out.
    let ran = replay(&[
        s(&t.hash_only),
        "--model",
        s(&t.root.join("no-such-export")),
    ])
    .await;
    assert_eq!(ran.code, 1, "{}", ran.err);
    assert!(
        ran.err.contains("--image-dir") && ran.err.contains("--no-replay"),
        "{}",
        ran.err
    );
    assert!(!ran.out.contains("Loading target model"));

    // With the folder of frames: bit-exact.
    let ran = replay_report(&[
        s(&t.hash_only),
        "--model",
        s(&t.export0),
        "--image-dir",
        s(&t.images),
        "--diff",
        "all",
    ])
    .await;
    assert_eq!(ran.code, 0, "{}\n{}", ran.out, ran.err);
    assert!(
        ran.out.contains("Images: 14 distinct files indexed"),
        "{}",
        ran.out
    );
    let sum = ran.summary();
    assert_eq!(
        (u(&sum["replayed"]), u(&sum["not_replayed"])),
        (CALLS as u64, 0)
    );
    assert_eq!(u(&sum["actions"]["pass"]), CALLS as u64 - 1);
    assert_eq!(u(&sum["cache"]["pass"]), CALLS as u64 - 1);
    assert!(
        ran.out
            .contains("seq= 0 actions: cos=1.000000 max_abs=0.00e+00 [PASS]")
    );

    // A folder missing one frame: its records are reported and not replayed.
    let partial = tempfile::tempdir().unwrap();
    copy_dir(&t.images, partial.path());
    let gone = walk(partial.path())
        .into_iter()
        .find(|p| p.ends_with("wrist-4.jpg"))
        .unwrap();
    std::fs::remove_file(gone).unwrap();
    let target = server(&t.export0).await;
    let ran = replay_report(&[
        s(&t.hash_only),
        "--target",
        &target.uri,
        "--image-dir",
        s(partial.path()),
    ])
    .await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    let missing = (0..CALLS).filter(|&i| frame_of(i) == 4).count() as u64;
    let sum = ran.summary();
    assert_eq!(
        (u(&sum["not_replayed"]), u(&sum["replayed"])),
        (missing, CALLS as u64 - missing)
    );
    assert!(
        ran.out.contains("images: 1 not found (sha256 "),
        "{}",
        ran.out
    );
    assert!(
        ran.out
            .contains(&format!("not replayed: {missing} (images not found)"))
    );
    let not_replayed: Vec<&Value> = ran.report["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "not_replayed")
        .collect();
    assert_eq!(not_replayed.len() as u64, missing);
    assert_eq!(
        not_replayed[0]["missing_images"].as_array().unwrap().len(),
        1
    );
    // (That entries are kept only for --output is a unit test of the report:
    // replayer/src/report.rs, requests_are_kept_only_for_output.)

    // A folder with none of the frames: nothing replayed is an error, not a pass.
    let empty = tempfile::tempdir().unwrap();
    let ran = replay(&[
        s(&t.hash_only),
        "--target",
        &target.uri,
        "--image-dir",
        s(empty.path()),
    ])
    .await;
    assert_eq!(ran.code, 1, "{}", ran.out);
    assert!(
        ran.err
            .contains("none of its 14 records were found under --image-dir"),
        "{}",
        ran.err
    );
    assert!(
        ran.out.contains("not replayed: 14 (images not found)"),
        "{}",
        ran.out
    );

    // A `none` trace (image fields dropped): the same message, even with --image-dir.
    let lines: Vec<String> = lines_of(&t.hash_only)
        .into_iter()
        .map(|l| {
            let mut v: Value = serde_json::from_str(&l).unwrap();
            if v["kind"] == "header" {
                v["redaction"]["image"] = "none".into();
            }
            if let Some(r) = v.get_mut("request").and_then(Value::as_object_mut) {
                r.remove("images");
                r.remove("image_sha256");
            }
            v.to_string()
        })
        .collect();
    let (_d, p) = write_trace(&lines);
    let ran = replay(&[s(&p), "--target", &target.uri, "--image-dir", s(&t.images)]).await;
    assert_eq!(ran.code, 1);
    assert!(
        ran.err.contains("--image-dir") && ran.err.contains("--no-replay"),
        "{}",
        ran.err
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_limits_and_concurrency_keeps_seq_order_and_results() {
    let t = traces();
    let target = server(&t.export0).await;

    let ran = replay_report(&[s(&t.full), "--target", &target.uri, "--n", "5"]).await;
    assert_eq!(ran.code, 0);
    assert!(
        ran.out
            .contains("Replaying requests (--n=5, --diff=actions):")
    );
    assert_eq!(ran.out.lines().filter(|l| l.starts_with("seq=")).count(), 5);
    assert_eq!(u(&ran.summary()["replayed"]), 5);
    let v = &ran.report;
    assert_eq!(v["options"]["n"], 5);
    assert_eq!(v["requests"].as_array().unwrap().len(), 5);
    assert!(
        v["requests"][0].get("latency").is_none(),
        "only the asked diffs"
    );

    let mut results = Vec::new();
    for k in ["1", "4"] {
        let ran = replay_report(&[s(&t.full), "--target", &target.uri, "--concurrency", k]).await;
        assert_eq!(ran.code, 0, "{}", ran.out);
        let seqs: Vec<u64> = ran.report["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| u(&r["seq"]))
            .collect();
        assert_eq!(seqs, (0..CALLS as u64).collect::<Vec<_>>());
        let printed: Vec<String> = ran
            .out
            .lines()
            .filter(|l| l.starts_with("seq="))
            .map(|l| l.split(' ').take(2).collect())
            .collect();
        assert_eq!(printed.len(), CALLS);
        results.push(action_results(&ran.report));
    }
    assert_eq!(results[0], results[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_replay_summarises_the_trace() {
    let t = traces();
    let dir = tempfile::tempdir().unwrap();
    let ran = replay_report(&[
        s(&t.full),
        "--no-replay",
        "--target",
        "unix:///ignored.sock",
    ])
    .await;
    assert_eq!(ran.code, 0, "{}", ran.err);
    let out = &ran.out;
    assert!(out.contains("Reading trace (--no-replay, --n=all):"));
    assert!(
        out.contains(&format!(
            "records: {CALLS} (seq 0–{}, 0 missing)",
            CALLS - 1
        )),
        "{out}"
    );
    assert!(out.contains("time span: "), "{out}");
    // Frames 0,0,1,2,2,2,3,4,4,5,5,0,1,6 with call 9 failing before the cache: 6 hits.
    assert!(out.contains("cache: 6 hit, 7 miss, "), "{out}");
    assert!(out.contains("(hit ratio 46.2%)"), "{out}");
    assert!(out.contains("errors: 1 (invalid-argument: 1)"), "{out}");
    assert!(out.contains("latency (recorded total_ms): p50 "), "{out}");
    assert!(
        out.contains(&format!("images: {CALLS} with bytes")),
        "{out}"
    );
    assert!(out.contains("footer: ended_reason=shutdown"), "{out}");
    assert!(out.contains("truncation: none"), "{out}");
    let v = &ran.report;
    assert_eq!(v["inspection"]["records"], CALLS);
    assert_eq!(v["inspection"]["cache"]["hit"], 6);
    assert_eq!(v["summary"], Value::Null);
    assert_eq!(v["target"], Value::Null);
    assert_eq!(v["exit_code"], 0);

    // hash_only traces inspect without images; a cut one says where it ends.
    let raw = std::fs::read(&t.hash_only).unwrap();
    let cut = dir.path().join("cut.jsonl.gz");
    std::fs::write(&cut, &raw[..raw.len() * 2 / 3]).unwrap();
    let ran = replay(&[s(&cut), "--no-replay"]).await;
    assert_eq!(ran.code, 0);
    assert!(
        ran.out
            .contains("with hashes only (replay needs --image-dir)"),
        "{}",
        ran.out
    );
    assert!(ran.out.contains("truncation: "), "{}", ran.out);
    assert!(!ran.out.contains("truncation: none"), "{}", ran.out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_stops_sending_and_summarises() {
    let t = traces();
    let target = server(&t.export0).await;
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let mut run = Background::start(&[s(&t.long), "--target", &target.uri, "--output", s(&report)]);
    run.wait_line("seq= 3 ");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(run.child.id() as i32, libc::SIGINT) };
    let (code, out) = run.finish();
    assert_eq!(code, 0, "results so far passed: {out}");
    let replayed = u(&json_report(&report)["summary"]["replayed"]);
    assert!(
        replayed >= 4 && replayed < LONG_CALLS as u64,
        "{replayed}: {out}"
    );
    assert!(out.contains("stopped: interrupted"), "{out}");
    assert!(out.contains("Summary:"));
}

/// `--model`'s `reflex serve` child never outlives the replay: Ctrl-C stops it with the
/// replay, and a replay killed outright takes it along (PR_SET_PDEATHSIG).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_private_server_dies_with_the_replay_on_ctrl_c_and_on_kill() {
    let t = traces();
    for signal in [libc::SIGINT, libc::SIGKILL] {
        let mut run = Background::start(&[s(&t.long), "--model", s(&t.export0)]);
        run.wait_line("seq= 3 ");
        let children = reflex_children(run.child.id());
        assert_eq!(children.len(), 1, "one private server: {children:?}");
        let serve = children[0];
        let cmdline = std::fs::read_to_string(format!("/proc/{serve}/cmdline")).unwrap();
        assert!(
            cmdline.starts_with("serve\0") || cmdline.contains("\0serve\0"),
            "{cmdline:?}"
        );
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(run.child.id() as i32, signal) };
        let (code, out) = run.finish();
        if signal == libc::SIGINT {
            assert_eq!(code, 0, "{out}");
            assert!(out.contains("stopped: interrupted"), "{out}");
            assert!(gone(serve), "stopped before the replay exits");
        } else {
            assert!(
                wait_gone(serve, Duration::from_secs(30)),
                "the private server outlived a killed replay"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Benchmark (by hand): cargo test --release --test replay_lib -- --ignored --nocapture
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_replay_throughput() {
    let t = traces();
    let calls = 400;
    let root = tempfile::tempdir().unwrap();
    // A new frame every second call: half the calls run the prefix graph (the demo's
    // robot gets about a quarter of hits).
    let trace = record_with(root.path(), &t.export0, "full", "bench", calls, |i| i / 2).await;
    for k in ["1", "4", "1", "4"] {
        // A fresh server each time: the same cache history as the recording.
        let target = server(&t.export0).await;
        let started = Instant::now();
        let ran = replay_report(&[s(&trace), "--target", &target.uri, "--concurrency", k]).await;
        let secs = started.elapsed().as_secs_f64();
        let sum = ran.summary();
        assert_eq!(u(&sum["actions"]["pass"]), calls as u64 - 1, "{}", ran.out);
        let replayed = u(&sum["replayed"]);
        println!(
            "replay --concurrency {k}: {replayed} calls in {secs:.3} s = {:.0} calls/s (whole run: process start, connect, read, call, diff, print)",
            replayed as f64 / secs
        );
        drop(target.proc);
    }
}
