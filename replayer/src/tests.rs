//! Replays of real traces: the reference export served in process on real Unix sockets,
//! recorded by the in-process recorder daemon, files in temp dirs.
//!
//! Recording is done once per test binary ([`traces`]); each test then replays against a
//! server of its own (`--target`) or a private one (`--model`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use reflex_proto::v1::policy_client::PolicyClient;
use reflex_proto::v1::{ActRequest, Image};
use reflex_server::recording::ImageMode;
use reflex_server::serve::{ListenAddr, Running, ServeArgs};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::args::{DiffMode, FailOn};
use crate::{Exit, ReplayArgs, Report};

const T: Duration = Duration::from_secs(120);
/// Calls recorded per trace (one of them fails on purpose).
const CALLS: usize = 14;
/// Index of the call that is recorded failing (state of the wrong length).
const BAD_CALL: usize = 9;

async fn timeout<F: std::future::Future>(f: F) -> F::Output {
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
    reflex_server::preprocess::encode_jpeg(&img, 85)
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
    reflex_server::export::write_reference_export(&export0, 0).unwrap();
    reflex_server::export::write_reference_export(&export1, 1).unwrap();

    let images = root.join("images");
    for f in 0..7 {
        let sub = images.join(format!("cam/{}", f % 3));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("base-{f}.jpg")), frame(f, false)).unwrap();
        std::fs::write(sub.join(format!("wrist-{f}.jpg")), frame(f, true)).unwrap();
    }

    let full = record(&root, &export0, ImageMode::Full, "full", CALLS).await;
    let hash_only = record(&root, &export0, ImageMode::HashOnly, "hash", CALLS).await;
    Traces {
        _dir: dir,
        root,
        export0,
        export1,
        full,
        hash_only,
        images,
    }
}

/// Records `calls` calls of [`request`] through an in-process recorder daemon; returns
/// the trace file.
async fn record(root: &Path, export: &Path, mode: ImageMode, name: &str, calls: usize) -> PathBuf {
    record_with(root, export, mode, name, calls, frame_of).await
}

async fn record_with(
    root: &Path,
    export: &Path,
    mode: ImageMode,
    name: &str,
    calls: usize,
    frames: fn(usize) -> usize,
) -> PathBuf {
    let traces = root.join(format!("traces-{name}"));
    let rsock = root.join(format!("rec-{name}.sock"));
    let rtoken = CancellationToken::new();
    let listener = reflex_recorder::bind(&rsock).unwrap();
    let recorder = tokio::spawn(reflex_recorder::serve(
        listener,
        reflex_recorder::RecorderConfig::new(&traces),
        rtoken.clone(),
    ));

    let psock = root.join(format!("policy-{name}.sock"));
    let mut args = ServeArgs::new(export.to_path_buf(), vec![ListenAddr::Unix(psock.clone())]);
    args.recorder = Some(format!("unix://{}", rsock.display()));
    args.record_images = mode;
    args.embodiment = "franka".into();
    let stoken = CancellationToken::new();
    let running = timeout(reflex_server::serve::start(args, stoken.clone()))
        .await
        .unwrap();
    let channel = timeout(reflex_proto::connect(&format!(
        "unix://{}",
        psock.display()
    )))
    .await
    .unwrap();
    let mut client = PolicyClient::new(channel);
    for i in 0..calls {
        let res = timeout(client.act(request_with(i, frames(i)))).await;
        assert_eq!(res.is_err(), i == BAD_CALL, "call {i}: {res:?}");
    }
    stoken.cancel();
    timeout(running.wait()).await.unwrap();
    rtoken.cancel();
    timeout(recorder).await.unwrap().unwrap();

    let files: Vec<PathBuf> = std::fs::read_dir(&traces)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".jsonl.gz"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// A `Write` whose bytes the test reads afterwards; optionally cancels a token once the
/// text contains a needle (a SIGINT in the middle of a replay).
#[derive(Clone, Default)]
struct Buf {
    bytes: Arc<Mutex<Vec<u8>>>,
    cancel_at: Option<(String, CancellationToken)>,
}

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.bytes.lock().unwrap();
        bytes.extend_from_slice(b);
        if let Some((needle, token)) = &self.cancel_at
            && String::from_utf8_lossy(&bytes).contains(needle.as_str())
        {
            token.cancel();
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
    }
}

struct Ran {
    exit: Exit,
    out: String,
    err: String,
    report: Report,
}

async fn replay_with(args: ReplayArgs, shutdown: CancellationToken, out: Buf) -> Ran {
    let err = Buf::default();
    let (exit, report) = timeout(crate::run_with(
        &args,
        &shutdown,
        Box::new(out.clone()),
        Box::new(err.clone()),
    ))
    .await;
    Ran {
        exit,
        out: out.text(),
        err: err.text(),
        report,
    }
}

async fn replay(args: ReplayArgs) -> Ran {
    replay_with(args, CancellationToken::new(), Buf::default()).await
}

fn args(trace: &Path, target: Option<&str>) -> ReplayArgs {
    let mut a = ReplayArgs::new(trace);
    a.target = target.map(str::to_string);
    a
}

/// An in-process server on a Unix socket; stopped on drop.
struct Server {
    token: CancellationToken,
    _running: Running,
    uri: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

async fn server(export: &Path) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("policy.sock");
    let token = CancellationToken::new();
    let running = timeout(reflex_server::serve::start(
        ServeArgs::new(export.to_path_buf(), vec![ListenAddr::Unix(sock.clone())]),
        token.clone(),
    ))
    .await
    .unwrap();
    Server {
        token,
        _running: running,
        uri: format!("unix://{}", sock.display()),
        _dir: dir,
    }
}

/// The lines of a trace (gzip or plain).
fn trace_lines(path: &Path) -> Vec<String> {
    let raw = std::fs::read(path).unwrap();
    let mut text = String::new();
    if raw.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_string(&mut text)
            .unwrap();
    } else {
        text = String::from_utf8(raw).unwrap();
    }
    text.lines().map(str::to_string).collect()
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

/// (seq, cos, max_abs, pass) of every request entry of a report.
fn action_results(report: &Report) -> Vec<(u64, Option<f64>, Option<f64>, bool)> {
    report
        .requests
        .iter()
        .map(|r| {
            let a = r.actions.as_ref();
            (
                r.seq,
                a.and_then(|a| a.cos),
                a.and_then(|a| a.max_abs),
                a.is_none_or(|a| a.pass),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_model_replays_bit_exactly_through_a_private_server() {
    let t = traces();
    let out = tempfile::tempdir().unwrap();
    let report_path = out.path().join("report.json");
    let mut a = ReplayArgs::new(&t.full);
    a.model = Some(t.export0.clone());
    a.diff = DiffMode::All;
    a.output = Some(report_path.clone());
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::Passed, "{}\n{}", ran.out, ran.err);

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

    let s = ran.report.summary.as_ref().unwrap();
    assert_eq!(
        (s.records, s.replayed, s.diffed),
        (CALLS as u64, CALLS as u64, CALLS as u64 - 1)
    );
    let (acts, cache) = (s.actions.unwrap(), s.cache.unwrap());
    assert_eq!(
        (acts.pass, acts.total),
        (CALLS as u64 - 1, CALLS as u64 - 1)
    );
    assert_eq!(
        (cache.pass, cache.total),
        (CALLS as u64 - 1, CALLS as u64 - 1)
    );
    assert_eq!((s.errors.pass, s.errors.total), (1, 1));
    assert!(ran.out.contains(&format!(
        "actions: {0}/{0} pass (cos≥0.999, max_abs<1e-3)",
        CALLS - 1
    )));
    assert!(
        ran.out.contains("latency: ") && ran.out.contains("pass (within ±5% of recorded total_ms)")
    );
    for r in &ran.report.requests {
        if let Some(a) = &r.actions {
            assert_eq!((a.cos, a.max_abs), (Some(1.0), Some(0.0)), "seq {}", r.seq);
        }
    }

    // The JSON report, parsed back: the fields the README documents.
    let v = json_report(&report_path);
    assert_eq!(v["report_version"], 1);
    assert_eq!(v["trace"], t.full.display().to_string());
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["header"]["embodiment"], "franka");
    assert_eq!(v["header"]["redaction"]["image"], "full");
    assert!(v["header"]["model_hash"].as_str().unwrap().len() == 16);
    assert_eq!(v["target"]["model_hash"], v["header"]["model_hash"]);
    assert_eq!(v["target"]["model_hash_matches"], true);
    assert_eq!(v["target"]["model_dir"], t.export0.display().to_string());
    assert!(v["target"]["uri"].as_str().unwrap().starts_with("unix://"));
    assert_eq!(v["options"]["diff"], "all");
    assert_eq!(v["options"]["n"], Value::Null);
    assert_eq!(v["options"]["concurrency"], 1);
    let sum = &v["summary"];
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_model_fails_actions_and_fail_on_exits_3() {
    let t = traces();
    let other = server(&t.export1).await;
    // First, on the fresh server: only a cache diff asked for, and it matches (the cache
    // does not depend on the weights), so --fail-on any does not fire...
    let mut a = args(&t.full, Some(&other.uri));
    a.diff = DiffMode::Cache;
    a.fail_on = Some(FailOn::Any);
    let ran = replay(a).await;
    let s = ran.report.summary.as_ref().unwrap();
    assert!(s.actions.is_none() && s.cache.is_some());
    assert_eq!(s.cache.unwrap().fail, 0, "{}", ran.out);
    assert_eq!(ran.exit, Exit::Passed, "{}", ran.out);
    assert!(
        ran.out.contains("warning: MODEL HASH DIFFERS"),
        "{}",
        ran.out
    );
    // ...but --fail-on all computes every diff.
    let mut a = args(&t.full, Some(&other.uri));
    a.diff = DiffMode::Cache;
    a.fail_on = Some(FailOn::All);
    assert_eq!(replay(a).await.exit, Exit::FailOn);

    let ran = replay(args(&t.full, Some(&other.uri))).await;
    assert_eq!(
        ran.exit,
        Exit::Passed,
        "failing diffs alone exit 0 (seed behaviour)"
    );
    let acts = ran.report.summary.as_ref().unwrap().actions.unwrap();
    assert_eq!(
        (acts.pass, acts.total),
        (0, CALLS as u64 - 1),
        "{}",
        ran.out
    );
    assert!(ran.out.contains("[FAIL]"));

    let mut a = args(&t.full, Some(&other.uri));
    a.fail_on = Some(FailOn::Actions);
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::FailOn, "{}", ran.out);
    assert!(ran.out.contains("fail-on actions: triggered"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_file_errors_exit_1() {
    let t = traces();
    let dir = tempfile::tempdir().unwrap();
    let lines = trace_lines(&t.full);
    assert_eq!(lines.len(), CALLS + 2, "header, requests, footer");

    // Missing file.
    let ran = replay(args(
        &dir.path().join("nope.jsonl.gz"),
        Some("unix:///nowhere.sock"),
    ))
    .await;
    assert_eq!(ran.exit, Exit::TraceError);
    assert!(
        ran.err.contains("cannot open trace") && ran.err.contains("nope.jsonl.gz"),
        "{}",
        ran.err
    );

    // Unknown schema_version in the header.
    let mut edited = lines.clone();
    edited[0] = edited[0].replace("\"schema_version\":1", "\"schema_version\":7");
    let (_d1, p) = write_trace(&edited);
    let ran = replay(args(&p, Some("unix:///nowhere.sock"))).await;
    assert_eq!(ran.exit, Exit::TraceError);
    assert!(
        ran.err.contains(":1: unknown schema_version 7"),
        "{}",
        ran.err
    );

    // No header: the file starts with a request.
    let (_d2, p) = write_trace(&lines[1..]);
    let ran = replay(args(&p, Some("unix:///nowhere.sock"))).await;
    assert_eq!(ran.exit, Exit::TraceError);
    assert!(ran.err.contains("has no header"), "{}", ran.err);

    // Damage in the middle, found while replaying: what came before is replayed and
    // summarised, then exit 1 naming the line.
    let target = server(&t.export0).await;
    let mut edited = lines.clone();
    edited[5] = edited[5][..edited[5].len() / 2].to_string();
    let (_d3, p) = write_trace(&edited);
    let ran = replay(args(&p, Some(&target.uri))).await;
    assert_eq!(ran.exit, Exit::TraceError, "{}", ran.out);
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
    let ran = replay(args(&p, Some(&target.uri))).await;
    assert_eq!(ran.exit, Exit::TraceError);
    assert!(
        ran.err.contains("edited.jsonl:9: unknown schema_version 2"),
        "{}",
        ran.err
    );

    // --no-replay reports the same damage the same way.
    let mut a = ReplayArgs::new(&p);
    a.no_replay = true;
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::TraceError);
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
    let out = dir.path().join("r.json");
    let mut a = args(&cut, Some(&target.uri));
    a.output = Some(out.clone());
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::Passed, "{}\n{}", ran.out, ran.err);
    let s = ran.report.summary.as_ref().unwrap();
    assert!(s.replayed > 2 && s.replayed < CALLS as u64, "{}", ran.out);
    assert_eq!(s.actions.unwrap().fail, 0);
    assert!(ran.out.contains("warning: trace truncated"), "{}", ran.out);
    let v = json_report(&out);
    assert!(v["summary"]["truncation"]["line"].as_u64().unwrap() >= s.replayed + 2);
    assert!(
        v["warnings"][0]
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
    let ran = replay(args(&t.full, Some(&sock))).await;
    assert_eq!(ran.exit, Exit::TargetFailed);
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
    let ran = replay(args(&t.full, Some(&format!("127.0.0.1:{port}")))).await;
    assert_eq!(ran.exit, Exit::TargetFailed, "{}", ran.err);

    for model in [dir.path().join("missing"), dir.path().to_path_buf()] {
        let mut a = ReplayArgs::new(&t.full);
        a.model = Some(model.clone());
        let ran = replay(a).await;
        assert_eq!(ran.exit, Exit::TargetFailed, "{}", ran.err);
        assert!(
            ran.err.contains(&format!("--model {}", model.display())),
            "{}",
            ran.err
        );
    }

    // No target at all (a caller that skipped clap's check).
    let ran = replay(ReplayArgs::new(&t.full)).await;
    assert_eq!(ran.exit, Exit::TargetFailed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_failing_a_call_that_succeeded_when_recorded_exits_2() {
    let t = traces();
    let target = server(&t.export0).await;
    // Record 3 recorded as a success, but now with a state the model refuses.
    let mut lines = trace_lines(&t.full);
    let mut v: Value = serde_json::from_str(&lines[4]).unwrap();
    v["request"]["state"] = serde_json::json!([0.1, 0.2]);
    lines[4] = v.to_string();
    let (_d, p) = write_trace(&lines);
    let ran = replay(args(&p, Some(&target.uri))).await;
    assert_eq!(ran.exit, Exit::TargetFailed, "{}", ran.out);
    let line = ran.out.lines().find(|l| l.starts_with("seq= 3 ")).unwrap();
    assert!(
        line.contains("actions: target error INVALID_ARGUMENT [FAIL]"),
        "{line}"
    );
    assert!(line.contains("error: ok→INVALID_ARGUMENT"), "{line}");
    assert!(ran.out.contains("target errors: 1 "), "{}", ran.out);
    assert_eq!(
        ran.report.summary.unwrap().replayed,
        CALLS as u64,
        "the replay went on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_only_trace_needs_and_uses_image_dir() {
    let t = traces();
    // Without images: stops before any model is loaded, naming both ways out.
    let mut a = ReplayArgs::new(&t.hash_only);
    a.model = Some(t.root.join("no-such-export"));
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::TraceError, "{}", ran.err);
    assert!(
        ran.err.contains("--image-dir") && ran.err.contains("--no-replay"),
        "{}",
        ran.err
    );
    assert!(!ran.out.contains("Loading target model"));

    // With the folder of frames: bit-exact.
    let mut a = ReplayArgs::new(&t.hash_only);
    a.model = Some(t.export0.clone());
    a.image_dir = Some(t.images.clone());
    a.diff = DiffMode::All;
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::Passed, "{}\n{}", ran.out, ran.err);
    assert!(
        ran.out.contains("Images: 14 distinct files indexed"),
        "{}",
        ran.out
    );
    let s = ran.report.summary.as_ref().unwrap();
    assert_eq!((s.replayed, s.not_replayed), (CALLS as u64, 0));
    assert_eq!(s.actions.unwrap().pass, CALLS as u64 - 1);
    assert_eq!(s.cache.unwrap().pass, CALLS as u64 - 1);
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
    let mut a = args(&t.hash_only, Some(&target.uri));
    a.image_dir = Some(partial.path().to_path_buf());
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::Passed, "{}", ran.out);
    let missing = (0..CALLS).filter(|&i| frame_of(i) == 4).count() as u64;
    let s = ran.report.summary.as_ref().unwrap();
    assert_eq!(
        (s.not_replayed, s.replayed),
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
    assert!(
        ran.report.requests.is_empty(),
        "entries are kept only for --output"
    );

    // A folder with none of the frames: nothing replayed is an error, not a pass.
    let empty = tempfile::tempdir().unwrap();
    let mut a = args(&t.hash_only, Some(&target.uri));
    a.image_dir = Some(empty.path().to_path_buf());
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::TraceError, "{}", ran.out);
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
    let lines: Vec<String> = trace_lines(&t.hash_only)
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
    let mut a = args(&p, Some(&target.uri));
    a.image_dir = Some(t.images.clone());
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::TraceError);
    assert!(
        ran.err.contains("--image-dir") && ran.err.contains("--no-replay"),
        "{}",
        ran.err
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_limits_and_concurrency_keeps_seq_order_and_results() {
    let t = traces();
    let target = server(&t.export0).await;

    let dir = tempfile::tempdir().unwrap();
    let mut a = args(&t.full, Some(&target.uri));
    a.n = 5;
    a.output = Some(dir.path().join("n5.json"));
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::Passed);
    assert!(
        ran.out
            .contains("Replaying requests (--n=5, --diff=actions):")
    );
    assert_eq!(ran.out.lines().filter(|l| l.starts_with("seq=")).count(), 5);
    assert_eq!(ran.report.summary.as_ref().unwrap().replayed, 5);
    let v = json_report(&dir.path().join("n5.json"));
    assert_eq!(v["options"]["n"], 5);
    assert_eq!(v["requests"].as_array().unwrap().len(), 5);
    assert!(
        v["requests"][0].get("latency").is_none(),
        "only the asked diffs"
    );

    let mut results = Vec::new();
    for k in [1u16, 4] {
        let mut a = args(&t.full, Some(&target.uri));
        a.concurrency = k;
        a.output = Some(dir.path().join(format!("k{k}.json")));
        let ran = replay(a).await;
        assert_eq!(ran.exit, Exit::Passed, "{}", ran.out);
        let seqs: Vec<u64> = ran.report.requests.iter().map(|r| r.seq).collect();
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
    let mut a = ReplayArgs::new(&t.full);
    a.no_replay = true;
    a.target = Some("unix:///ignored.sock".into());
    a.output = Some(dir.path().join("r.json"));
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::Passed, "{}", ran.err);
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
    let v = json_report(&dir.path().join("r.json"));
    assert_eq!(v["inspection"]["records"], CALLS);
    assert_eq!(v["inspection"]["cache"]["hit"], 6);
    assert_eq!(v["summary"], Value::Null);
    assert_eq!(v["target"], Value::Null);
    assert_eq!(v["exit_code"], 0);

    // hash_only traces inspect without images; a cut one says where it ends.
    let raw = std::fs::read(&t.hash_only).unwrap();
    let cut = dir.path().join("cut.jsonl.gz");
    std::fs::write(&cut, &raw[..raw.len() * 2 / 3]).unwrap();
    let mut a = ReplayArgs::new(&cut);
    a.no_replay = true;
    let ran = replay(a).await;
    assert_eq!(ran.exit, Exit::Passed);
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
    let token = CancellationToken::new();
    let out = Buf {
        cancel_at: Some(("seq= 3 ".into(), token.clone())),
        ..Default::default()
    };
    let ran = replay_with(args(&t.full, Some(&target.uri)), token, out).await;
    assert_eq!(ran.exit, Exit::Passed, "results so far passed: {}", ran.out);
    let s = ran.report.summary.as_ref().unwrap();
    assert!(s.replayed >= 4 && s.replayed < CALLS as u64, "{}", ran.out);
    assert!(ran.out.contains("stopped: interrupted"), "{}", ran.out);
    assert!(ran.out.contains("Summary:"));
}

// ---------------------------------------------------------------------------
// Benchmarks (by hand): cargo test -p reflex-replayer --release -- --ignored --nocapture
// ---------------------------------------------------------------------------

mod bench {
    use super::*;
    use reflex_proto::v1::{ActRecord, Denoise, Latency};
    use reflex_recorder::trace::{
        Footer, Header, ImageMode as TraceImageMode, RequestRecord, sha256_hex,
    };
    use reflex_recorder::writer::{TraceWriter, WriterOptions};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    /// Writes a `hash_only` trace of `n` records shaped like the reference model's
    /// (2 cameras, state 8, 50×7 actions) through the recorder's own writer and record
    /// builder, with the recorder's defaults (gzip level 1, a sync flush every 100 records).
    fn generate(dir: &Path, n: u64) -> PathBuf {
        let header = Header {
            reflex_version: "0.1.0".into(),
            model_hash: "d0ee7d11f70fbfb0".into(),
            config_hash: "249c1e10a76f532c".into(),
            session_id: "bench-0000-0001".into(),
            started_at: "2026-04-24T17:13:05.000Z".into(),
            model_type: "reflex-reference-vla".into(),
            export_kind: "decomposed".into(),
            embodiment: "franka".into(),
            mode: "cpu".into(),
            ..Default::default()
        };
        let mut w = TraceWriter::create(dir, &header, &WriterOptions::default()).unwrap();
        // A frame changes every 4 calls, as a robot that sometimes stands still.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for seq in 0..n {
            let frame = seq / 4;
            let act = ActRecord {
                seq,
                chunk_id: seq % 200,
                timestamp: format!(
                    "2026-04-24T17:{:02}:{:02}.{:03}Z",
                    13 + seq / 60_000 % 40,
                    seq / 1000 % 60,
                    seq % 1000
                ),
                request: Some(ActRequest {
                    images: vec![
                        Image {
                            camera: "base".into(),
                            data: Vec::new(),
                            sha256: sha256_hex(&frame.to_le_bytes()),
                        },
                        Image {
                            camera: "wrist".into(),
                            data: Vec::new(),
                            sha256: sha256_hex(&(!frame).to_le_bytes()),
                        },
                    ],
                    instruction: "pick up the red cup".into(),
                    state: (0..8).map(|_| rnd()).collect(),
                    episode_id: format!("ep-{}", seq / 200),
                    ..Default::default()
                }),
                actions: (0..350).map(|_| rnd() * 0.2).collect(),
                num_actions: 50,
                action_dim: 7,
                latency: Some(Latency {
                    total_ms: 3.0 + f64::from(rnd()),
                    queue_ms: 0.01,
                    decode_ms: 0.7,
                    prefix_ms: if seq % 4 == 0 { 2.0 } else { 0.0 },
                    denoise_ms: 0.44,
                    postprocess_ms: 0.01,
                }),
                denoise: Some(Denoise {
                    steps_used: 10,
                    steps_configured: 10,
                    adaptive: false,
                }),
                cache: if seq % 4 == 0 { "miss" } else { "hit" }.into(),
                mode: "cpu".into(),
                noise_seed: seq.wrapping_mul(0x2545_f491_4f6c_dd1d),
                error: None,
            };
            w.write_request(&RequestRecord::from_act(act, TraceImageMode::HashOnly))
                .unwrap();
            if seq % 100 == 99 {
                w.flush().unwrap();
            }
        }
        w.finish(&Footer {
            ended_at: "2026-04-24T18:00:00.000Z".into(),
            total_requests: n,
            ended_reason: "shutdown".into(),
            ..Default::default()
        })
        .unwrap();
        std::fs::read_dir(dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    #[test]
    #[ignore = "benchmark: run with --ignored --nocapture"]
    fn bench_no_replay_100k_hash_only() {
        let dir = tempfile::tempdir().unwrap();
        let n = 100_000u64;
        let t0 = Instant::now();
        let path = generate(dir.path(), n);
        let gen_s = t0.elapsed().as_secs_f64();
        let file_bytes = std::fs::metadata(&path).unwrap().len();
        let _ = std::fs::read(&path); // page cache warm for both contenders
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mut ours, mut gz) = (Vec::new(), Vec::new());
        let mut json_bytes = 0;
        for _ in 0..5 {
            let mut a = ReplayArgs::new(&path);
            a.no_replay = true;
            let t = Instant::now();
            let (exit, report) = rt.block_on(crate::run_with(
                &a,
                &CancellationToken::new(),
                Box::new(std::io::sink()),
                Box::new(std::io::sink()),
            ));
            ours.push(t.elapsed().as_secs_f64());
            assert_eq!(exit, Exit::Passed);
            let ins = report.inspection.unwrap();
            assert_eq!(ins.records, n);
            json_bytes = ins.json_bytes;

            let t = Instant::now();
            let st = Command::new("gzip")
                .arg("-dc")
                .arg(&path)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            gz.push(t.elapsed().as_secs_f64());
            assert!(st.success());
        }
        let (ours, gz) = (median(ours), median(gz));
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "no-replay: {n} records, file {:.1} MB gz, {:.1} MB JSON (generated in {gen_s:.1} s)\n\
             reflex replay --no-replay: {ours:.3} s = {:.0} records/s, {:.1} MB/s JSON, {:.1} MB/s file\n\
             gzip -dc > /dev/null:      {gz:.3} s = {:.1} MB/s JSON\n\
             ratio (ours / gzip -dc):   {:.2}x (median of 5)",
            mb(file_bytes),
            mb(json_bytes),
            n as f64 / ours,
            mb(json_bytes) / ours,
            mb(file_bytes) / ours,
            mb(json_bytes) / gz,
            ours / gz,
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark: run with --ignored --nocapture"]
    async fn bench_replay_throughput() {
        let t = traces();
        let calls = 400;
        let root = tempfile::tempdir().unwrap();
        // A new frame every second call: half the calls run the prefix graph (the demo's
        // robot gets about a quarter of hits).
        let trace = record_with(
            root.path(),
            &t.export0,
            ImageMode::Full,
            "bench",
            calls,
            |i| i / 2,
        )
        .await;
        for k in [1u16, 4, 1, 4] {
            // A fresh server each time: the same cache history as the recording.
            let target = server(&t.export0).await;
            let mut a = args(&trace, Some(&target.uri));
            a.concurrency = k;
            let started = Instant::now();
            let ran = replay(a).await;
            let secs = started.elapsed().as_secs_f64();
            let s = ran.report.summary.unwrap();
            assert_eq!(s.actions.unwrap().pass, calls as u64 - 1, "{}", ran.out);
            println!(
                "replay --concurrency {k}: {} calls in {secs:.3} s = {:.0} calls/s (whole run: connect, read, call, diff, print)",
                s.replayed,
                s.replayed as f64 / secs
            );
        }
    }
}
