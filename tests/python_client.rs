//! The Python client package (`proto/python`, import `reflex_client`) tested by its own
//! pytest suite against this build's `reflex` binary: Unix socket and TCP with TLS + token,
//! bad input, a server killed and restarted under a running ChunkBroker, a SIGSTOPped
//! server, the openpi adapter, stub freshness, and the wheel installed beside reflex-vla.
//!
//! The suite needs python3 with the packages `deploy/ci-setup.sh` installs; a missing
//! pytest or module fails this test: it never skips.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole suite takes about two minutes on two cores; this only stops a hang.
const LIMIT: Duration = Duration::from_secs(900);

#[test]
fn python_client_suite_passes_against_the_real_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = tempfile::tempdir().unwrap();
    let log_path = out_dir.path().join("pytest.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new("python3")
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfEs",
            "proto/python/tests",
        ])
        .current_dir(root)
        .env("REFLEX_BIN", env!("CARGO_BIN_EXE_reflex"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("python3 must be installed (deploy/ci-setup.sh)");
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let Some(status) = status else {
        panic!("pytest ran past {LIMIT:?} and was killed; its output:\n{output}");
    };
    assert!(
        status.success(),
        "pytest failed ({status}); run `bash deploy/ci-setup.sh` if a module is missing. Output:\n{output}"
    );
    // Exit 0 with nothing run would be a silent pass: the summary must count passes.
    let summary = output
        .lines()
        .rev()
        .find(|l| l.contains(" passed"))
        .unwrap_or("");
    assert!(
        !summary.is_empty() && !summary.contains("skipped"),
        "pytest's summary shows no passed tests, or skipped ones:\n{output}"
    );
    println!("{output}");
}
