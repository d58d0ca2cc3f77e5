//! `reflex bench load` as a real process: 32 clients against a real server and
//! recorder it starts itself, and the book check at the end. CI runs 3 s; the
//! documented manual run is `reflex bench load --clients 32 --secs 20`.

mod util;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use util::*;

/// Runs `reflex bench load ARGS...` with its temp folders under `dir`, bounded by `limit`.
fn bench_load(dir: &Path, args: &[&str], limit: Duration) -> Output {
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Command::new(BIN)
        .args(["bench", "load"])
        .args(args)
        .env("TMPDIR", dir)
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "bench load did not finish in {limit:?}; stdout:\n{}\nstderr:\n{}",
                read_to_string(&out),
                read_to_string(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

/// `(written, dropped, seqs, refused, answered)` from the books line:
/// `written W + dropped D = seqs S; + refused R = answered A`.
fn books_numbers(stdout: &str) -> (u64, u64, u64, u64, u64) {
    let line = stdout
        .lines()
        .find(|l| l.contains("books: PASS ("))
        .unwrap_or_else(|| panic!("no PASS books line in:\n{stdout}"));
    let after = |label: &str| -> u64 {
        let at = line
            .find(label)
            .unwrap_or_else(|| panic!("no {label:?} in {line}"))
            + label.len();
        line[at..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{label:?} in {line}: {e}"))
    };
    (
        after("written"),
        after("dropped"),
        after("seqs"),
        after("refused"),
        after("answered"),
    )
}

#[test]
fn thirty_two_clients_for_three_seconds_balance_the_books() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("load.json");
    let out = bench_load(
        dir.path(),
        &[
            "--clients",
            "32",
            "--secs",
            "3",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );

    // The books balance, and every answer the clients got is in them.
    let (written, dropped, seqs, refused, answered) = books_numbers(&stdout);
    assert_eq!(written + dropped, seqs, "{stdout}");
    assert_eq!(seqs + refused, answered, "{stdout}");
    assert!(answered > 0);
    assert!(
        stdout.contains(&format!(
            "= {answered} = the footer's total_requests + refused_requests"
        )),
        "{stdout}"
    );

    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let run = &doc["runs"][0];
    assert_eq!(run["clients"], 32);
    assert_eq!(run["books"], "pass");
    assert_eq!(run["mode"], "cpu");
    assert!(run["measured_secs"].as_f64().unwrap() > 2.9, "{run}");
    assert!(run["ok"].as_u64().unwrap() > 0, "{run}");
    assert!(run["throughput_per_s"].as_f64().unwrap() > 0.0, "{run}");
    // Warm-up calls are booked too: more answered than measured.
    assert!(run["ok_including_warmup"].as_u64().unwrap() > run["ok"].as_u64().unwrap());
    let lat = &run["latency_ms"];
    let (p50, p99, p999) = (
        lat["p50"].as_f64().expect("p50"),
        lat["p99"].as_f64().expect("p99"),
        lat["p999"].as_f64().expect("p999"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{lat}");
    assert!(
        run["transport_errors"].as_object().unwrap().is_empty(),
        "{run}"
    );
    // Both processes' peaks: the kernel's high-water mark and the sampled maximum.
    for who in ["server_rss", "recorder_rss"] {
        let peak = run[who]["peak_kib"].as_u64().expect(who);
        let sampled = run[who]["sampled_max_kib"].as_u64().expect(who);
        // The kernel's RSS counters are cached per CPU, so a VmRSS sample can exceed a
        // later VmHWM by a little (seen: 244 KiB); more than 4 MiB would be a wrong reading.
        assert!(peak > 1024 && peak + 4096 >= sampled, "{who}: {run}");
    }
    // A model server holding the reference export is far bigger than the recorder.
    assert!(run["server_rss"]["peak_kib"].as_u64() > run["recorder_rss"]["peak_kib"].as_u64());
    // Scene frames repeat only while the arm pauses: some hits, mostly misses.
    let hit = run["cache"]["hit_pct"].as_f64().unwrap();
    assert!((5.0..50.0).contains(&hit), "hit rate {hit}");

    for needle in [
        "32 clients",
        "calls/s",
        "p50 ",
        "p99 ",
        "p999 ",
        "RESOURCE_EXHAUSTED",
        "server RSS:   peak ",
        "recorder RSS: peak ",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    // The children's temp folders are gone with the run.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("reflex-load-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The recorder killed with SIGKILL mid-run and started again: the server reconnects and
/// continues its seqs in a new file, the restarted recorder counts the records that were
/// in flight on the broken stream (`lost_requests` in the new file's header), and the
/// books still balance exactly.
#[test]
fn books_balance_when_the_recorder_is_killed_and_restarted_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench_load(
        dir.path(),
        &[
            "--clients",
            "8",
            "--secs",
            "3",
            "--warmup-secs",
            "1",
            "--kill-recorder-at",
            "2",
        ],
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stderr.contains("recorder killed with SIGKILL"), "{stderr}");
    let (written, dropped, seqs, refused, answered) = books_numbers(&stdout);
    assert!(written > 0 && written + dropped <= seqs, "{stdout}");
    assert_eq!(seqs + refused, answered, "{stdout}");
    // What the seqs say was lost is what the restarted recorder counted.
    if let Some(at) = stdout.find("lost on reconnect ") {
        let rest = &stdout[at..];
        let n = |label: &str| -> String {
            let i = rest.find(label).unwrap() + label.len();
            rest[i..].chars().take_while(char::is_ascii_digit).collect()
        };
        assert_eq!(
            n("lost on reconnect "),
            n("the recorder counted "),
            "{stdout}"
        );
    }
}

/// A server that records nothing cannot balance books: the tool says FAIL and exits 1,
/// after stopping the --target server with SIGTERM so that a footer would have been written.
#[tokio::test(flavor = "multi_thread")]
async fn books_fail_and_exit_1_when_the_target_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let (mut server, sock) = serve(dir.path(), &exp, &[]).await;
    let traces = dir.path().join("traces");
    std::fs::create_dir(&traces).unwrap();
    let target = format!("unix://{}", sock.display());
    let pid = server.child.id().to_string();
    let d = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        bench_load(
            &d,
            &[
                "--target",
                &target,
                "--clients",
                "2",
                "--secs",
                "1",
                "--warmup-secs",
                "0",
                "--server-pid",
                &pid,
                "--record-dir",
                traces.to_str().unwrap(),
            ],
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("books: FAIL (no trace file for the session"),
        "{stdout}"
    );
    assert!(stderr.contains("error: books FAIL"), "{stderr}");
    // The load itself ran, and the server was stopped gracefully.
    assert!(stdout.contains("2 clients"), "{stdout}");
    assert!(!stdout.contains(" 0 OK in"), "{stdout}");
    let st = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server exits after SIGTERM");
    assert!(st.success(), "{st}");
}
