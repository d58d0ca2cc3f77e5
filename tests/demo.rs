//! `reflex demo` as a real process, with its cache folder in a temp dir: the replay command
//! it prints works as printed, the trace folder stays bounded, and a failing latency diff
//! comes with the reason.

mod util;

use std::path::Path;
use std::process::{Command, Output};

use util::*;

/// Runs `reflex demo ARGS...` with `cache` as $XDG_CACHE_HOME.
fn demo(cache: &Path, args: &[&str]) -> (Output, String) {
    let out = Command::new(BIN)
        .arg("demo")
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .unwrap();
    let text = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "demo failed:\n{text}");
    (out, text)
}

/// The `$ reflex replay ...` line the demo printed, without the `$ `.
fn printed_command(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("$ "))
        .unwrap_or_else(|| panic!("no command line in:\n{stdout}"))
        .to_string()
}

/// Runs a printed `reflex ...` command through the shell, with this build as `reflex`.
fn run_printed(command: &str) -> Output {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-c", command])
        .env("PATH", path)
        .output()
        .unwrap()
}

/// The demo with `--record-images hash_only` printed `reflex replay TRACE --model DIR`,
/// which exits 1 (a hash_only trace has no images to send). It now keeps the frames it sent
/// and prints a command with `--image-dir` that replays the trace bit for bit.
#[test]
fn demo_hash_only_prints_a_replay_command_that_works() {
    let cache = tempfile::tempdir().unwrap();
    let (out, text) = demo(
        cache.path(),
        &["--calls", "12", "--record-images", "hash_only"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let command = printed_command(&stdout);
    assert!(command.contains("--image-dir"), "{command}\n{text}");
    // The demo itself replayed (not only summarised) the hash_only trace.
    assert!(stdout.contains("actions: 12/12 pass"), "{text}");

    let replay = run_printed(&command);
    let (rout, rerr) = (
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr),
    );
    assert_eq!(replay.status.code(), Some(0), "{command}\n{rout}\n{rerr}");
    assert_eq!(
        rout.matches("max_abs=0.00e+00 [PASS]").count(),
        12,
        "every call replays bit for bit:\n{rout}"
    );

    // A trace without images cannot be replayed: the command says --no-replay, and works.
    let (out, _) = demo(cache.path(), &["--calls", "3", "--record-images", "none"]);
    let command = printed_command(&String::from_utf8_lossy(&out.stdout));
    assert!(command.contains("--no-replay"), "{command}");
    assert_eq!(run_printed(&command).status.code(), Some(0), "{command}");
}

/// Every demo run left another trace in the cache's demo-traces with no bound. The
/// recorder now keeps that folder under a cap (--max-total-mb, default 256 MiB), deleting
/// the oldest traces, and the demo says so.
#[test]
fn demo_traces_are_bounded_by_the_recorders_cap() {
    let cache = tempfile::tempdir().unwrap();
    let folder = cache.path().join("reflex").join("demo-traces");
    let mut newest = vec![];
    for _ in 0..3 {
        // 40 calls with full images: about 650 KB of trace per run, two over a 1 MiB cap.
        // Runs follow each other within a second: the newest must still be the one kept.
        let (out, _) = demo(cache.path(), &["--calls", "40", "--max-total-mb", "1"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("keeps at most 1 MiB"),
            "the demo says the folder is bounded:\n{stdout}"
        );
        let traces = trace_files(&folder);
        newest.push(traces.last().cloned().expect("the newest trace is kept"));
        let total: u64 = traces
            .iter()
            .map(|t| std::fs::metadata(t).unwrap().len())
            .sum();
        assert_eq!(
            traces.len(),
            1,
            "older traces are deleted beyond the cap ({total} bytes): {traces:?}"
        );
    }
    newest.dedup();
    assert_eq!(newest.len(), 3, "each run kept its own trace: {newest:?}");

    // The default cap applies to the default folder only; a --trace-dir of the user's is
    // left alone unless they ask.
    let (out, _) = demo(cache.path(), &["--calls", "2"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("keeps at most 256 MiB"));
    let mine = cache.path().join("mine");
    let (out, _) = demo(
        cache.path(),
        &["--calls", "2", "--trace-dir", mine.to_str().unwrap()],
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("keeps at most"));
}

/// Latency diffs pass within ±5 % of the recorded total, which a busy machine rarely
/// repeats; the demo said nothing when most of them failed. Whenever one fails, it now says
/// why in one line.
#[test]
fn demo_explains_failing_latency_diffs() {
    let cache = tempfile::tempdir().unwrap();
    let (out, text) = demo(cache.path(), &["--calls", "30"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The replay's summary line: `latency: PASSED/TOTAL pass (within ±5% ...)`.
    let latency = stdout
        .lines()
        .filter(|l| l.contains(" pass (within"))
        .find_map(|l| l.trim_start().strip_prefix("latency: "))
        .unwrap_or_else(|| panic!("no latency tally in:\n{text}"));
    let (passed, total) = latency
        .split_whitespace()
        .next()
        .and_then(|t| t.split_once('/'))
        .map(|(p, t)| (p.parse::<u64>().unwrap(), t.parse::<u64>().unwrap()))
        .unwrap_or_else(|| panic!("{latency}"));
    assert_eq!(total, 30, "{latency}");
    let failed = passed < total;
    let notes = stdout
        .lines()
        .filter(|l| l.contains("note: latency passes only"))
        .count();
    assert_eq!(
        notes,
        usize::from(failed),
        "one note exactly when a latency diff failed ({latency}):\n{stdout}"
    );
}
