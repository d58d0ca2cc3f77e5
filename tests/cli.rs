//! The command line itself, with the real binary: a usage error exits 64 (EX_USAGE), not
//! clap's 2 (which `reflex replay` means as "the target failed"); `--help` exits 0; and each
//! renamed flag's old spelling still works as a hidden alias (README, "Commands and flags").

mod util;

use std::process::{Command, Output};

use util::*;

fn reflex(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn an_unknown_flag_exits_64_for_serve_replay_recorder_and_the_rest() {
    for cmd in [
        &["serve", "./export"][..],
        &["replay", "t.jsonl", "--no-replay"],
        &["recorder", "--trace-dir", "d"],
        &["demo"],
        &["bench", "load"],
        &["export-demo", "d"],
        &[
            "ship",
            "--trace-dir",
            "d",
            "--to",
            "s3://bkt/p",
            "--robot",
            "r1",
        ],
    ] {
        let mut args = cmd.to_vec();
        args.push("--no-such-flag");
        let out = reflex(&args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("unexpected argument '--no-such-flag'"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // A bad value and a missing required argument are usage errors too.
    let out = reflex(&["replay", "t.jsonl", "--model", "d", "--diff", "bogus"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let out = reflex(&["recorder"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let out = reflex(&[]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
}

#[test]
fn help_and_version_exit_0_and_help_names_exit_code_64() {
    let out = reflex(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("64 usage error"));
    let out = reflex(&["replay", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("64 usage error"));
    assert_eq!(reflex(&["--version"]).status.code(), Some(0));
}

/// Parsing succeeded when the command got as far as loading the (missing) export: exit 1
/// with the loader's message, where an unknown flag would have been 64.
fn assert_parsed_then_failed_on_the_export(args: &[&str]) {
    let out = reflex(args);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
    assert!(
        stderr(&out).contains("has no reflex_config.json"),
        "{args:?}: {}",
        stderr(&out)
    );
}

#[test]
fn serve_takes_the_export_as_model_or_first_argument_and_record_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-export");
    let missing = missing.to_str().unwrap();
    let traces = dir.path().join("traces");
    let traces = traces.to_str().unwrap();
    for args in [
        &["serve", "--model", missing, "--listen", "127.0.0.1:0"][..],
        &["serve", missing, "--listen", "127.0.0.1:0"],
        // `--record DIR`: the seed's and the SPEC's spelling of --trace-dir.
        &[
            "serve",
            missing,
            "--record",
            traces,
            "--listen",
            "127.0.0.1:0",
        ],
        &[
            "serve",
            missing,
            "--trace-dir",
            traces,
            "--listen",
            "127.0.0.1:0",
        ],
    ] {
        assert_parsed_then_failed_on_the_export(args);
    }
    // REFLEX_EXPORT_DIR (the systemd env files) still names it.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("REFLEX_EXPORT_DIR", missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("has no reflex_config.json"));
    // Neither: a usage error that names both spellings.
    let out = reflex(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("--model <DIR>"), "{}", stderr(&out));
}

#[test]
fn recorder_dir_is_the_old_spelling_of_trace_dir() {
    let dir = tempfile::tempdir().unwrap();
    // A socket whose parent is a regular file: the recorder parses its flags, then fails
    // to bind (exit 1). An unknown flag would exit 64 before that.
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let listen = format!("unix://{}/r.sock", file.display());
    for flag in ["--trace-dir", "--dir"] {
        let out = reflex(&[
            "recorder",
            flag,
            dir.path().join("t").to_str().unwrap(),
            "--listen",
            &listen,
        ]);
        assert_eq!(out.status.code(), Some(1), "{flag}: {}", stderr(&out));
    }
}

#[test]
fn bench_load_queue_json_and_record_dir_are_old_spellings() {
    // Each old spelling combined with a flag it conflicts with: clap's message names the
    // flag by its new name, which it can only do if it knew the old one.
    for (old, value, new) in [
        ("--queue", "4", "--queue-depth <N>"),
        ("--record-dir", "d", "--trace-dir <DIR>"),
    ] {
        let out = reflex(&[
            "bench", "load", old, value, "--sweep", "1,2", "--target", "x:1",
        ]);
        assert_eq!(out.status.code(), Some(64), "{old}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(new) && !stderr(&out).contains("unexpected argument"),
            "{old}: {}",
            stderr(&out)
        );
    }
    // --json is exercised for real by tests/load.rs; here it must at least parse.
    let out = reflex(&["bench", "load", "--json", "x.json", "--secs", "0"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("for '--secs") && !stderr(&out).contains("unexpected argument"),
        "{}",
        stderr(&out)
    );
}

/// Every `REFLEX_*` setting the packaged env files show (commented out or not), and the
/// unit's own, is still a variable of the renamed flags: the command gets past parsing
/// (exit 1 on the missing token file or socket folder, not 64).
#[test]
fn the_packaged_env_files_still_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let settings = |file: &str, prefix: &str| -> Vec<(String, String)> {
        read_to_string(&root.join(file))
            .lines()
            .map(|l| l.trim_start_matches('#'))
            .filter(|l| l.starts_with(prefix) && !l.contains(' '))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut serve = settings("deploy/env/model.env", "REFLEX_");
    serve.extend(settings(
        "deploy/systemd/reflex-serve@.service",
        "Environment=REFLEX_",
    ));
    assert!(serve.len() > 10, "{serve:?}");
    let out = Command::new(BIN)
        .arg("serve")
        .envs(
            serve
                .iter()
                .map(|(k, v)| (k.trim_start_matches("Environment="), v)),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{serve:?}: {}", stderr(&out));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let recorder = settings("deploy/env/recorder.env", "REFLEX_RECORDER_");
    assert!(recorder.len() > 4, "{recorder:?}");
    let out = Command::new(BIN)
        .arg("recorder")
        .envs(recorder.iter().map(|(k, v)| (k, v)))
        // Not the robot's folders: a temp trace folder, and a socket that cannot be bound.
        .env("REFLEX_RECORDER_DIR", dir.path().join("traces"))
        .env(
            "REFLEX_RECORDER_LISTEN",
            format!("unix://{}/r.sock", file.display()),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{recorder:?}: {}", stderr(&out));

    // The shipper's file and unit parse; with no credentials anywhere it stops there.
    let mut ship = settings("deploy/env/ship.env", "REFLEX_SHIP_");
    ship.extend(settings(
        "deploy/systemd/reflex-ship.service",
        "Environment=REFLEX_SHIP_",
    ));
    assert!(ship.len() >= 3, "{ship:?}");
    std::fs::create_dir(dir.path().join("traces")).unwrap();
    let out = Command::new(BIN)
        .arg("ship")
        .envs(
            ship.iter()
                .map(|(k, v)| (k.trim_start_matches("Environment="), v)),
        )
        .env("REFLEX_SHIP_DIR", dir.path().join("traces"))
        .env("HOME", dir.path())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SHARED_CREDENTIALS_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{ship:?}: {}", stderr(&out));
    assert!(stderr(&out).contains("no credentials"), "{}", stderr(&out));
}

#[test]
fn export_demo_help_lists_every_kind_and_a_bad_kind_is_a_usage_error() {
    let out = reflex(&["export-demo", "--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for kind in [
        "reference",
        "pi05",
        "pi05-per-step",
        "pi05-monolithic",
        "pi0",
        "smolvla",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(kind)),
            "--help does not explain {kind}:\n{help}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("x");
    let out = reflex(&["export-demo", "--kind", "pi1", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(!target.exists());
}

#[test]
fn export_demo_writes_the_seed_layout_for_pi05() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("pi05");
    let out = reflex(&["export-demo", "--kind", "pi05", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for f in [
        "vlm_prefix.onnx",
        "vlm_prefix.onnx.data",
        "expert_denoise.onnx",
        "expert_denoise.onnx.data",
        "reflex_config.json",
        "tokenizer.json",
        "policy_preprocessor_step_2_normalizer_processor.safetensors",
        "fixture.json",
    ] {
        assert!(target.join(f).is_file(), "{f} missing");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wrote the pi05 export"), "{stdout}");
    // What a seed-tool export lacks stops `reflex serve` in one line that names the file
    // and the flag (not a parse error about the config's first unknown field).
    std::fs::remove_file(target.join("tokenizer.json")).unwrap();
    let out = reflex(&["serve", "--model", target.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(
        err.contains("seed-tool export has no tokenizer")
            && err.contains("--tokenizer FILE")
            && err.matches("has no tokenizer").count() == 1,
        "{err}"
    );
}
