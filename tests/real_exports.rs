//! Real VLA exports in the seed tool's layouts, through the real `reflex serve` and gRPC:
//! each fixture kind (`reflex export-demo --kind pi05|pi05-per-step|pi05-monolithic|pi0|smolvla`,
//! our generator) is served unchanged, its actions match onnxruntime running the same graphs
//! with the seed runtime's pre- and post-processing (`tests/fixtures/act_ort.py`, installed
//! by `deploy/ci-setup.sh`), its trace header describes the export, and its trace replays
//! bit-exactly.

mod util;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use reflex_proto::v1 as pb;
use util::*;

/// A `size`×`size` PNG (the fixture's image size: no resize on either side).
fn png(shade: u8, size: u32) -> Vec<u8> {
    let step = (256 / size).max(1);
    let img = image::RgbImage::from_fn(size, size, |x, y| {
        image::Rgb([
            (x * step) as u8 ^ shade,
            (y * step) as u8,
            shade.wrapping_mul(3),
        ])
    });
    reflex_engine::preprocess::encode_png(&img)
}

/// What a fixture's `fixture.json` says of its cameras: their names and image size.
#[derive(Clone)]
struct Cameras {
    names: Vec<String>,
    size: u32,
}

impl Cameras {
    fn of(export: &Path) -> Cameras {
        let facts: serde_json::Value =
            serde_json::from_slice(&std::fs::read(export.join("fixture.json")).unwrap()).unwrap();
        Cameras {
            names: facts["cameras"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect(),
            size: facts["image_size"].as_u64().unwrap() as u32,
        }
    }
}

/// Noise the test chooses (not drawn by either side): chunk × width, smooth and varied.
fn noise(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.37).sin() * 1.3).collect()
}

/// The first two cameras' frames (the third absent), the test's instruction and state.
fn request(cams: &Cameras, noise: Vec<f32>, seed: Option<u64>) -> pb::ActRequest {
    pb::ActRequest {
        images: [40u8, 200]
            .iter()
            .zip(&cams.names)
            .map(|(shade, camera)| pb::Image {
                camera: camera.clone(),
                data: png(*shade, cams.size),
                sha256: String::new(),
            })
            .collect(),
        instruction: "pick up the red block".into(),
        state: state(),
        episode_id: "ep-real".into(),
        noise_seed: seed,
        noise,
        ..Default::default()
    }
}

/// The actions a Python reference in `tests/fixtures` computes for `req`: the request is
/// written as `act_ort.py` and `seed_runtime.py` read it (each image as `CAMERA.png`,
/// instruction, state, noise) and `script LEAD… EXPORT REQUEST OUT` is run.
fn python_actions(
    dir: &Path,
    export: &Path,
    req: &pb::ActRequest,
    script: &str,
    lead: &[&Path],
) -> Vec<f32> {
    python_actions_with(dir, export, req, script, lead, &[])
}

/// [`python_actions`] with arguments after `OUT` (`act_ort.py`'s `keep|fix`).
fn python_actions_with(
    dir: &Path,
    export: &Path,
    req: &pb::ActRequest,
    script: &str,
    lead: &[&Path],
    tail: &[&str],
) -> Vec<f32> {
    let work = dir.join(script.trim_end_matches(".py"));
    std::fs::create_dir_all(&work).unwrap();
    let mut images = serde_json::Map::new();
    for img in &req.images {
        let file = format!("{}.png", img.camera);
        std::fs::write(work.join(&file), &img.data).unwrap();
        images.insert(img.camera.clone(), file.into());
    }
    let spec = serde_json::json!({
        "images": images, "instruction": req.instruction, "state": req.state, "noise": req.noise,
    });
    std::fs::write(work.join("request.json"), spec.to_string()).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(lead)
        .args([export, &work.join("request.json"), &work.join("out.json")])
        .args(tail)
        .output()
        .expect("python3 must be installed (deploy/ci-setup.sh)");
    assert!(
        out.status.success(),
        "{script} failed (onnxruntime, tokenizers, safetensors, pillow, transformers and reflex-vla come from deploy/ci-setup.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("out.json")).unwrap()).unwrap();
    v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// onnxruntime's actions for `req` (the seed runtime's flow, `act_ort.py`).
fn onnxruntime_actions(dir: &Path, export: &Path, req: &pb::ActRequest) -> Vec<f32> {
    python_actions(dir, export, req, "act_ort.py", &[])
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_seed_layout_serves_over_grpc_matches_onnxruntime_and_replays_bit_exactly() {
    for kind in SEED_KINDS {
        let dir = tempfile::tempdir().unwrap();
        let export = export_demo(dir.path(), kind);
        let cams = Cameras::of(&export);
        let request = |noise, seed| request(&cams, noise, seed);
        let traces = dir.path().join("traces");
        let (mut p, sock) = serve(
            dir.path(),
            &export,
            &[
                "--record",
                traces.to_str().unwrap(),
                "--record-images",
                "full",
            ],
        )
        .await;
        p.wait_for_log("real VLA export loaded");
        let log = p.stderr();
        assert!(log.contains("seed quirks: keep"), "{kind}: {log}");
        let mut c = policy_client(&format!("unix://{}", sock.display())).await;

        let info = timeout(c.get_model_info(pb::GetModelInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.cameras, cams.names, "{kind}");
        assert_eq!(
            (
                info.state_dim,
                info.action_dim,
                info.chunk_size,
                info.noise_width
            ),
            (8, 7, 50, 32),
            "{kind}"
        );
        assert_eq!(
            (info.image_height, info.image_width),
            (cams.size, cams.size),
            "{kind}"
        );
        assert_eq!(info.export["source"], "reflex-vla");
        assert_eq!(info.export["seed_quirks"], "keep");
        let tok = std::fs::read(export.join("tokenizer.json")).unwrap();
        assert_eq!(
            info.export["tokenizer_hash"],
            reflex_engine::config::hex(&sha2_16(&tok)),
            "the tokenizer hash is the tokenizer.json's"
        );
        assert_eq!(info.export["tokenizer"], "tokenizer.json");
        assert_eq!(
            info.export["stats_source"],
            "policy_preprocessor_step_2_normalizer_processor.safetensors"
        );

        // One call with the test's own noise, held against onnxruntime.
        let req = request(noise(50 * 32), None);
        let ours = timeout(c.act(req.clone())).await.unwrap().into_inner();
        assert_eq!((ours.num_actions, ours.action_dim), (50, 7));
        let reference = onnxruntime_actions(dir.path(), &export, &req);
        assert_eq!(reference.len(), ours.actions.len());
        let (cos, max_abs) = reflex_engine::engine::cos_and_max_abs(&ours.actions, &reference);
        eprintln!("{kind}: reflex serve vs onnxruntime: cos {cos:.9} max_abs {max_abs:.2e}");
        assert!(
            cos >= 0.99999 && max_abs <= 1e-4,
            "{kind}: cos {cos} max_abs {max_abs}"
        );

        // Seeded calls: the same seed gives the same bits (the decomposed kinds from the
        // prefix cache the second time).
        let a = timeout(c.act(request(vec![], Some(5))))
            .await
            .unwrap()
            .into_inner();
        let b = timeout(c.act(request(vec![], Some(5))))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(bits(&a.actions), bits(&b.actions), "{kind}");
        assert_eq!(a.noise_seed, 5);
        if kind == "pi05" || kind == "pi05-per-step" || kind == "smolvla-four-graph" {
            assert_eq!(b.cache, "hit");
        }

        // Bad input: the robot's state width, not the graph's; noise of the wrong size.
        let mut bad = request(vec![], None);
        bad.state = vec![0.0; 32];
        let e = timeout(c.act(bad)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message()
                .contains("state has 32 values; this model takes 8"),
            "{}",
            e.message()
        );
        let e = timeout(c.act(request(vec![0.5; 50 * 7], None)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message()
                .contains("noise has 350 values; this model takes 50 × 32"),
            "{}",
            e.message()
        );

        p.signal(libc::SIGTERM);
        assert!(p.wait_exit(Duration::from_secs(10)).unwrap().success());
        let trace = trace_files(&traces).pop().expect("trace written");
        let lines = trace_lines(&trace);
        assert_eq!(lines[0]["export"]["source"], "reflex-vla", "{}", lines[0]);
        assert_eq!(
            lines[0]["export"]["tokenizer_hash"],
            info.export["tokenizer_hash"]
        );
        assert_eq!(
            lines[1]["request"]["noise"].as_array().unwrap().len(),
            50 * 32
        );

        // The trace replays bit-exactly against the same export: the explicit noise and the
        // seeds are sent again.
        let out = Command::new(BIN)
            .args([
                "replay",
                trace.to_str().unwrap(),
                "--model",
                export.to_str().unwrap(),
                "--diff",
                "all",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{kind}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout
                .matches("cos=1.000000 max_abs=0.00e+00 [PASS]")
                .count(),
            3,
            "{kind}: {stdout}"
        );
    }
}

fn sha2_16(bytes: &[u8]) -> [u8; 8] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)[..8].try_into().unwrap()
}

/// The seed tool's package folder, checked.
fn seed_package() -> std::path::PathBuf {
    let dir = seed_tool_dir();
    assert!(
        dir.join("reflex/runtime/decomposed_server.py").is_file(),
        "the seed tool (reflex-vla 0.11.2) is not installed in {}: run `bash deploy/ci-setup.sh` (REFLEX_SEED_TOOL_DIR overrides the folder)",
        dir.display()
    );
    dir
}

/// The seed tool's own runtime's actions for `req` (`seed_runtime.py`).
fn seed_runtime_actions(dir: &Path, export: &Path, req: &pb::ActRequest) -> Vec<f32> {
    python_actions(dir, export, req, "seed_runtime.py", &[&seed_package()])
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_tools_own_runtime_gives_the_same_actions_as_reflex_serve() {
    for kind in [
        "pi05",
        "pi05-monolithic",
        "pi0",
        "smolvla",
        "smolvla-four-graph",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let export = export_demo(dir.path(), kind);
        let cams = Cameras::of(&export);
        let (mut p, sock) = serve(dir.path(), &export, &[]).await;
        let mut c = policy_client(&format!("unix://{}", sock.display())).await;
        let req = if kind == "pi05" || kind == "smolvla-four-graph" {
            // The cameras its /act takes (pi0.5: both; the four-graph SmolVLA: one), and the
            // noise its one unseeded draw is given (the four-graph predict takes it).
            request(&cams, noise(50 * 32), None)
        } else {
            // Its monolithic /act takes one image and replays RandomState(0) noise: so does
            // `reflex serve` with --seed-quirks keep (the default) when the call sends no noise.
            // Its SmolVLA server does not resize: the frame is the graph's 512 pixels.
            let mut r = request(&cams, vec![], None);
            r.images.truncate(1);
            r
        };
        let ours = timeout(c.act(req.clone())).await.unwrap().into_inner();
        let theirs = seed_runtime_actions(dir.path(), &export, &req);
        assert_eq!(theirs.len(), ours.actions.len(), "{kind}");
        let (cos, max_abs) = reflex_engine::engine::cos_and_max_abs(&ours.actions, &theirs);
        eprintln!(
            "{kind}: reflex serve vs the seed tool's runtime: cos {cos:.9} max_abs {max_abs:.2e}"
        );
        assert!(cos >= 0.9999, "{kind}: cos {cos} max_abs {max_abs}");
        assert!(max_abs <= 1e-4, "{kind}: cos {cos} max_abs {max_abs}");
        p.signal(libc::SIGTERM);
        assert!(p.wait_exit(Duration::from_secs(10)).unwrap().success());
    }
}

/// The libonnxruntime of the Python onnxruntime package `deploy/ci-setup.sh` installs.
fn python_ort_lib() -> std::path::PathBuf {
    reflex_engine::engine::onnxruntime::python_library()
        .unwrap_or_else(|e| panic!("{e} (run deploy/ci-setup.sh)"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ort_engine_serves_every_seed_layout_and_agrees_with_tract() {
    let lib = python_ort_lib();
    let lib_arg = lib.to_str().unwrap();
    for kind in SEED_KINDS {
        let dir = tempfile::tempdir().unwrap();
        let export = export_demo(dir.path(), kind);
        let cams = Cameras::of(&export);
        let req = request(&cams, noise(50 * 32), None);

        let (mut tract, sock) = serve(dir.path(), &export, &[]).await;
        let mut c = policy_client(&format!("unix://{}", sock.display())).await;
        let by_tract = timeout(c.act(req.clone())).await.unwrap().into_inner();
        tract.signal(libc::SIGTERM);
        assert!(tract.wait_exit(Duration::from_secs(10)).unwrap().success());

        let ort_dir = dir.path().join("ort");
        std::fs::create_dir_all(&ort_dir).unwrap();
        let (mut p, sock) = serve(
            &ort_dir,
            &export,
            &[
                "--engine",
                "ort",
                "--ort-lib",
                lib_arg,
                "--ort-threads",
                "2",
            ],
        )
        .await;
        p.wait_for_log("engine ort: onnxruntime runs the graphs");
        let mut c = policy_client(&format!("unix://{}", sock.display())).await;
        let info = timeout(c.get_model_info(pb::GetModelInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.mode, "ort", "{kind}");
        let by_ort = timeout(c.act(req.clone())).await.unwrap().into_inner();
        let (cos, max_abs) =
            reflex_engine::engine::cos_and_max_abs(&by_ort.actions, &by_tract.actions);
        eprintln!("{kind}: --engine ort vs --engine cpu: cos {cos:.9} max_abs {max_abs:.2e}");
        assert!(
            cos >= 0.99999 && max_abs <= 1e-4,
            "{kind}: cos {cos} max_abs {max_abs}"
        );
        // Repeats are bit-identical on this engine too (seeded; cached prefix or not).
        let a = timeout(c.act(request(&cams, vec![], Some(9))))
            .await
            .unwrap()
            .into_inner();
        let b = timeout(c.act(request(&cams, vec![], Some(9))))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(bits(&a.actions), bits(&b.actions), "{kind}");
        p.signal(libc::SIGTERM);
        assert!(p.wait_exit(Duration::from_secs(10)).unwrap().success());
    }
}

/// `reflex serve --model EXPORT EXTRA…` that must fail at start (no `ORT_DYLIB_PATH` from the
/// environment): its stderr.
fn failed_start(export: &Path, extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--model", export.to_str().unwrap()])
        .args(extra)
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn the_ort_engine_without_a_library_or_on_the_reference_export_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let export = export_demo(dir.path(), "pi05");
    let run = |export: &Path, extra: &[&str]| {
        failed_start(export, &[&["--engine", "ort"], extra].concat())
    };
    let err = run(&export, &[]);
    assert!(
        err.contains("--ort-lib") && err.contains("ORT_DYLIB_PATH"),
        "{err}"
    );
    let err = run(&export, &["--ort-lib", "/nonexistent/libonnxruntime.so"]);
    assert!(
        err.contains("/nonexistent/libonnxruntime.so: no such file"),
        "{err}"
    );
    let reference = dir.path().join("reference");
    let out = Command::new(BIN)
        .args(["export-demo", reference.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let lib = python_ort_lib();
    let err = run(&reference, &["--ort-lib", lib.to_str().unwrap()]);
    assert!(
        err.contains("reference export runs on --engine cpu or cuda"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_quirks_fix_serves_what_lerobot_trains_and_matches_onnxruntime() {
    for kind in ["pi05", "pi05-monolithic", "smolvla", "smolvla-four-graph"] {
        let dir = tempfile::tempdir().unwrap();
        let export = export_demo(dir.path(), kind);
        let (mut p, sock) = serve(dir.path(), &export, &["--seed-quirks", "fix"]).await;
        p.wait_for_log("real VLA export loaded");
        let log = p.stderr();
        assert!(log.contains("seed quirks: fix"), "{kind}: {log}");
        let mut c = policy_client(&format!("unix://{}", sock.display())).await;
        let info = timeout(c.get_model_info(pb::GetModelInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.export["seed_quirks"], "fix");
        // Under fix the four-graph export takes SmolVLA's three cameras (absent ones masked).
        let cams = Cameras {
            names: info.cameras.clone(),
            size: info.image_height,
        };
        if kind == "smolvla-four-graph" {
            assert_eq!(info.cameras, ["cam1", "cam2", "cam3"]);
            assert!(
                info.export["prefix_assembly"].contains("mask valid"),
                "{:?}",
                info.export
            );
        }
        let req = request(&cams, noise(50 * 32), None);
        let ours = timeout(c.act(req.clone())).await.unwrap().into_inner();
        let reference = python_actions_with(dir.path(), &export, &req, "act_ort.py", &[], &["fix"]);
        let (cos, max_abs) = reflex_engine::engine::cos_and_max_abs(&ours.actions, &reference);
        eprintln!("{kind} (fix): reflex serve vs onnxruntime: cos {cos:.9} max_abs {max_abs:.2e}");
        assert!(
            cos >= 0.99999 && max_abs <= 1e-4,
            "{kind}: cos {cos} max_abs {max_abs}"
        );
        p.signal(libc::SIGTERM);
        assert!(p.wait_exit(Duration::from_secs(10)).unwrap().success());
    }
}

#[test]
fn a_four_graph_export_missing_a_piece_fails_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let export = export_demo(dir.path(), "smolvla-four-graph");
    let start = || failed_start(&export, &[]);
    std::fs::rename(
        export.join("state_proj_weight.npy"),
        dir.path().join("w.npy"),
    )
    .unwrap();
    let err = start();
    assert!(
        err.contains("state_proj_weight.npy is missing") && err.contains("random weights"),
        "{err}"
    );
    // Not an f32 array (float64 here): refused with the reason.
    let mut f8 = std::fs::read(dir.path().join("w.npy")).unwrap();
    let at = f8.windows(3).position(|w| w == b"<f4").unwrap();
    f8[at + 2] = b'8';
    std::fs::write(export.join("state_proj_weight.npy"), &f8).unwrap();
    let err = start();
    assert!(
        err.contains("state_proj_weight.npy") && err.contains("is not little-endian float32"),
        "{err}"
    );
    std::fs::rename(
        dir.path().join("w.npy"),
        export.join("state_proj_weight.npy"),
    )
    .unwrap();
    std::fs::remove_file(export.join("decoder_prefill.onnx")).unwrap();
    let err = start();
    assert!(
        err.contains("decoder_prefill.onnx") && err.contains("noise-only actions"),
        "{err}"
    );
}
