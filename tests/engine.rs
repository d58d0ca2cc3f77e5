//! `--engine cuda` and `--engine auto` with the real binary. CI has no GPU:
//! there `cuda` must refuse to start with a sentence naming what is missing,
//! and `auto` must serve on the CPU and say why. On a machine with the NVIDIA
//! driver the same tests check the other branch (see deploy/gpu-check.sh for
//! the GPU run itself).

mod util;

use std::time::Duration;

use reflex_proto::v1 as pb;
use util::*;

fn driver_present() -> bool {
    // SAFETY: dlopen of the driver library by its soname, closed on drop.
    ["libcuda.so.1", "libcuda.so"]
        .iter()
        .any(|n| unsafe { libloading::Library::new(*n) }.is_ok())
}

#[test]
fn engine_cuda_without_a_gpu_fails_at_start_and_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    util::export(&export, 0);
    let sock = dir.path().join("p.sock");
    let listen = format!("unix://{}", sock.display());
    let mut p = Proc::start(
        "reflex serve --engine cuda",
        &[
            "serve",
            export.to_str().unwrap(),
            "--listen",
            &listen,
            "--engine",
            "cuda",
        ],
        &[],
    );
    let status = p
        .wait_exit(Duration::from_secs(60))
        .expect("serve --engine cuda must exit when the engine cannot load");
    let err = p.stderr();
    if driver_present() {
        // A machine with the driver: either it loaded (no exit) or it named the problem.
        assert!(!status.success(), "{err}");
    } else {
        assert!(!status.success(), "exit status {status:?}");
        assert!(
            err.contains("engine cuda is not available") && err.contains("libcuda.so"),
            "the message must name the engine and the missing driver library:\n{err}"
        );
    }
    assert!(
        !err.contains("panicked"),
        "no panic on a missing GPU:\n{err}"
    );
    assert!(!sock.exists(), "nothing listens when the engine failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_auto_falls_back_to_cpu_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    util::export(&export, 0);
    let (p, sock) = serve(dir.path(), &export, &["--engine", "auto"]).await;
    let target = format!("unix://{}", sock.display());
    let mut client = policy_client(&target).await;
    let info = timeout(client.get_model_info(pb::GetModelInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    if driver_present() {
        assert!(info.mode == "cuda" || p.stderr().contains("running on cpu, because"));
    } else {
        assert_eq!(info.mode, "cpu");
        let line = p.wait_for_log("engine auto: running on cpu, because");
        assert!(
            line.contains("libcuda.so"),
            "the reason names the library: {line}"
        );
        let lines = p
            .stderr()
            .lines()
            .filter(|l| l.contains("engine auto"))
            .count();
        assert_eq!(lines, 1, "one log line, not a stream of them");
    }
    let r = timeout(client.act(act_request(3, Some(11))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.num_actions, r.actions.len()), (50, 350));
    assert_eq!(r.mode, info.mode);
}
