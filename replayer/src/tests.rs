//! Runs of the library that need no server: a trace written by the recorder's own writer,
//! replayed without a target. Replays against real servers are root-package integration
//! tests (`tests/replay_lib.rs`, `tests/replay.rs`), which run the real `reflex` binary.

use std::path::{Path, PathBuf};

use reflex_proto::v1::{ActRequest, Image};
use tokio_util::sync::CancellationToken;

use crate::{Exit, ReplayArgs};

/// A hash_only trace of `n` records shaped like the reference model's, through the
/// recorder's own writer.
fn trace(dir: &Path, n: u64) -> PathBuf {
    bench::generate(dir, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_target_at_all_exits_2() {
    // A library caller that skipped clap's "--target or --model" check.
    let dir = tempfile::tempdir().unwrap();
    let t = trace(dir.path(), 3);
    let err = SharedBuf::default();
    let (exit, report) = crate::run_with(
        &ReplayArgs::new(&t),
        &CancellationToken::new(),
        Box::new(std::io::sink()),
        Box::new(err.clone()),
    )
    .await;
    assert_eq!(exit, Exit::TargetFailed);
    assert!(err.text().contains("no target"), "{}", err.text());
    assert!(
        report
            .error
            .unwrap()
            .contains("--target URI or --model DIR")
    );
}

/// A writer the test reads back.
#[derive(Clone, Default)]
struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Benchmarks (by hand): cargo test -p reflex-replayer --release -- --ignored --nocapture
// (the replay throughput benchmark, which needs a server, is in tests/replay_lib.rs)
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
    pub(super) fn generate(dir: &Path, n: u64) -> PathBuf {
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
}
