//! `reflex replay` over many traces and many targets, as real processes: traces recorded
//! by real `reflex serve --record` sessions (the real recorder), four real targets, one
//! killed with SIGKILL mid-run; the merged report against single-target runs.

mod util;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use util::*;

/// Sessions recorded, and Act calls per session.
const SESSIONS: usize = 3;
const CALLS: usize = 80;

/// Records `SESSIONS` sessions of `CALLS` calls each (full images, so no --image-dir)
/// into `dir/traces`, one `reflex serve --record` per session; returns the folder and
/// its files.
async fn record_sessions(dir: &Path, export: &Path) -> (PathBuf, Vec<PathBuf>) {
    let traces = dir.join("traces");
    for s in 0..SESSIONS {
        let sdir = dir.join(format!("rec-{s}"));
        std::fs::create_dir_all(&sdir).unwrap();
        let (mut p, sock) = serve(
            &sdir,
            export,
            &[
                "--record",
                traces.to_str().unwrap(),
                "--record-images",
                "full",
            ],
        )
        .await;
        let mut c = policy_client(&format!("unix://{}", sock.display())).await;
        for i in 0..CALLS {
            // Fresh seeds (none sent): the replay must send back the recorded ones.
            timeout(c.act(act_request(((i + s) % 5) as u8 * 30, None)))
                .await
                .unwrap();
        }
        p.signal(libc::SIGTERM);
        assert!(p.wait_exit(Duration::from_secs(10)).unwrap().success());
    }
    let files = trace_files(&traces);
    assert_eq!(files.len(), SESSIONS, "one trace file per session");
    for f in &files {
        let n = trace_lines(f)
            .iter()
            .filter(|l| l["kind"] == "request")
            .count();
        assert_eq!(n, CALLS, "{} holds every call", f.display());
    }
    (traces, files)
}

/// Four (or `n`) `reflex serve` targets of `export`, each on its own Unix socket.
async fn targets(dir: &Path, export: &Path, n: usize) -> Vec<(Proc, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let tdir = dir.join(format!("target-{i}"));
        std::fs::create_dir_all(&tdir).unwrap();
        let (mut p, sock) = serve(&tdir, export, &[]).await;
        p.name = format!("reflex serve (target {i})");
        out.push((p, format!("unix://{}", sock.display())));
    }
    out
}

/// `reflex replay ARGS` run to the end; (exit code, stdout, stderr).
fn replay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).arg("replay").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `reflex replay ARGS`, calls `at_line(n)` after each answered record line of
/// stdout (n counts them from 1), and returns (exit code, stdout, stderr).
fn replay_watching(args: &[String], mut at_line: impl FnMut(usize)) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .arg("replay")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let mut text = String::new();
    let mut answered = 0;
    loop {
        match rx.recv_timeout(TIMEOUT) {
            Ok(l) => {
                if l.contains("seq=") {
                    answered += 1;
                    at_line(answered);
                }
                text.push_str(&l);
                text.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("reflex replay printed nothing for {TIMEOUT:?}; stdout so far:\n{text}");
            }
        }
    }
    let code = child.wait().unwrap().code().unwrap_or(-1);
    (code, text, err.join().unwrap())
}

fn read_report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// What must be equal, record for record, between two runs: seq, status and the
/// actions diff.
fn essentials(r: &Value) -> (u64, String, Value, Value, Value) {
    (
        r["seq"].as_u64().unwrap(),
        r["status"].as_str().unwrap().to_string(),
        r["actions"]["cos"].clone(),
        r["actions"]["max_abs"].clone(),
        r["actions"]["pass"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_replay_survives_a_killed_target_and_matches_single_target_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let export = dir.join("export");
    util::export(&export, 0);
    let (traces, files) = record_sessions(dir, &export).await;
    let total = SESSIONS * CALLS;
    let mut targets = targets(dir, &export, 4).await;

    // The reference: the classic path, one trace file against one target, per file.
    let mut single = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let out = dir.join(format!("single-{i}.json"));
        let (code, stdout, stderr) = replay(&[
            f.to_str().unwrap(),
            "--target",
            &targets[0].1,
            "--concurrency",
            "4",
            "--output",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        let r = read_report(&out);
        assert!(
            r.get("targets").is_none(),
            "the classic report is unchanged"
        );
        single.extend(r["requests"].as_array().unwrap().clone());
    }
    assert_eq!(single.len(), total);

    // The fleet: the folder over four targets, four calls in flight each; target 2 is
    // killed once a fifth of the records are answered.
    let report = dir.join("fleet.json");
    let mut args: Vec<String> = vec![traces.to_str().unwrap().into()];
    for (_, uri) in &targets {
        args.extend(["--target".into(), uri.clone()]);
    }
    args.extend(
        ["--concurrency", "4", "--output", report.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string()),
    );
    let victim = 2;
    let mut killed_at = None;
    let (code, stdout, stderr) = replay_watching(&args, |n| {
        if n == total / 5 && killed_at.is_none() {
            targets[victim].0.signal(libc::SIGKILL);
            killed_at = Some(n);
        }
    });
    assert!(killed_at.is_some(), "the kill happened mid-run:\n{stdout}");
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        targets[victim]
            .0
            .wait_exit(Duration::from_secs(5))
            .is_some(),
        "the victim is gone"
    );
    assert!(stdout.contains("died"), "the death is reported:\n{stdout}");

    let r = read_report(&report);
    assert_eq!(r["report_version"], 1);
    assert_eq!(r["exit_code"], 0);
    let s = &r["summary"];
    assert_eq!(s["records"], total as u64, "{s}");
    assert_eq!(s["replayed"], total as u64, "{s}");
    assert_eq!(s["target_errors"], 0, "{s}");
    let failed_over = s["failed_over"].as_u64().unwrap();
    assert!(failed_over > 0, "the victim's calls in flight moved: {s}");
    assert_eq!(s["dead_targets"], 1, "{s}");

    let ts = r["targets"].as_array().unwrap();
    assert_eq!(ts.len(), 4);
    for (i, t) in ts.iter().enumerate() {
        assert_eq!(t["uri"], targets[i].1.as_str());
        assert_eq!(t["dead"], i == victim, "{t}");
        if i == victim {
            assert!(t["error"].as_str().is_some_and(|e| !e.is_empty()), "{t}");
            assert_eq!(t["failed_over_from"].as_u64().unwrap(), failed_over);
        } else {
            assert_eq!(t["failed_over_from"], 0, "{t}");
            assert!(t["replayed"].as_u64().unwrap() > 0, "{t}");
            assert!(t["latency_p50_ms"].as_f64().unwrap() > 0.0, "{t}");
            assert!(t["latency_p99_ms"].as_f64() >= t["latency_p50_ms"].as_f64());
        }
    }
    let answered: u64 = ts.iter().map(|t| t["replayed"].as_u64().unwrap()).sum();
    assert_eq!(
        answered, total as u64,
        "each record answered once, by one target"
    );
    let listed: Vec<&str> = r["traces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["path"].as_str().unwrap())
        .collect();
    let want: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    assert_eq!(listed, want, "the trace files, in path order");

    // Every (trace, seq) exactly once, sorted, equal to the single-target runs.
    let requests = r["requests"].as_array().unwrap();
    let mut count: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for q in requests {
        let key = (
            q["trace"].as_str().unwrap().to_string(),
            q["seq"].as_u64().unwrap(),
        );
        *count.entry(key).or_default() += 1;
    }
    assert_eq!(count.len(), total, "every record replayed");
    assert!(count.values().all(|&n| n == 1), "and only once");
    let keys: Vec<(String, u64)> = requests
        .iter()
        .map(|q| {
            (
                q["trace"].as_str().unwrap().into(),
                q["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_by_key(|(t, s)| (want.iter().position(|w| w == t).unwrap(), *s));
    assert_eq!(keys, sorted, "requests sorted by (trace, seq)");
    for (i, (f, s)) in requests.iter().zip(&single).enumerate() {
        assert_eq!(essentials(f), essentials(s), "request {i}: fleet vs single");
    }
    assert_eq!(
        requests
            .iter()
            .filter(|q| q["actions"]["cos"] == 1.0 && q["actions"]["pass"] == true)
            .count(),
        total,
        "the same model replays bit-exactly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_dead_exits_2_and_the_report_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let export = dir.join("export");
    util::export(&export, 0);
    let (traces, _) = record_sessions(dir, &export).await;
    let targets = targets(dir, &export, 2).await;

    let report = dir.join("fleet.json");
    let args: Vec<String> = vec![
        traces.to_str().unwrap().into(),
        "--targets".into(),
        format!("{},{}", targets[0].1, targets[1].1),
        "--concurrency".into(),
        "2".into(),
        "--output".into(),
        report.to_str().unwrap().into(),
    ];
    let (code, stdout, stderr) = replay_watching(&args, |n| {
        if n == 10 {
            for (p, _) in &targets {
                p.signal(libc::SIGKILL);
            }
        }
    });
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stdout.contains("stopped: every target died"),
        "the summary says so:\n{stdout}"
    );
    let r = read_report(&report);
    assert_eq!(r["exit_code"], 2);
    assert_eq!(r["summary"]["stopped"], "all_targets_dead");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("every target died"), "{error}");
    for (_, uri) in &targets {
        assert!(error.contains(uri.as_str()), "names {uri}: {error}");
    }
    for t in r["targets"].as_array().unwrap() {
        assert_eq!(t["dead"], true, "{t}");
        assert!(t["error"].as_str().is_some(), "{t}");
    }
    let replayed = r["summary"]["replayed"].as_u64().unwrap();
    assert!(
        replayed >= 10 && replayed < (SESSIONS * CALLS) as u64,
        "stopped mid-run: {replayed}"
    );
    assert_eq!(
        r["requests"].as_array().unwrap().len() as u64,
        replayed,
        "only what was answered is reported"
    );
}
