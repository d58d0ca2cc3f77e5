//! Shared helpers for the workspace tests: real `reflex` processes in a temp
//! dir per test, killed on drop, their stderr shown when a test fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reflex_proto::v1 as pb;

pub const BIN: &str = env!("CARGO_BIN_EXE_reflex");

/// Every await in a test is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub async fn timeout<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, f).await.expect("timed out")
}

/// Where `deploy/ci-setup.sh` installs the seed tool (reflex-vla 0.11.2, `pip install
/// --no-deps --target`): `$REFLEX_SEED_TOOL_DIR`, by default
/// `${XDG_CACHE_HOME:-~/.cache}/reflex-ci/reflex-vla-0.11.2`.
pub fn seed_tool_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REFLEX_SEED_TOOL_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    cache.join("reflex-ci/reflex-vla-0.11.2")
}

/// Writes the reference export with `seed` into `dir` using the real binary.
pub fn export(dir: &Path, seed: u64) {
    let out = Command::new(BIN)
        .args([
            "export-demo",
            dir.to_str().unwrap(),
            "--seed",
            &seed.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "export-demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `reflex` child process.
pub struct Proc {
    pub child: Child,
    pub name: String,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `reflex ARGS...`; stderr is collected in the background.
    pub fn start(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env("RUST_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Proc::spawn(name, cmd)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr contains `needle`; returns the matching line.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(line) = self.stderr().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{}: no log line with {needle:?}; stderr:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The TCP address the server logged for its port-0 listener.
    pub fn tcp_addr(&self) -> String {
        let line = self.wait_for_log("listen=tcp://");
        let at = line.find("listen=tcp://").unwrap() + "listen=tcp://".len();
        line[at..].split_whitespace().next().unwrap().to_string()
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} stderr -----\n{}", self.name, self.stderr());
        }
    }
}

/// Starts `reflex serve EXPORT --listen unix://SOCK [--listen 127.0.0.1:0] EXTRA...` and waits for health.
pub async fn serve(dir: &Path, export: &Path, extra: &[&str]) -> (Proc, PathBuf) {
    serve_env(dir, export, extra, &[]).await
}

/// Polls grpc.health.v1 until SERVING (no sleeping on a guess).
pub async fn wait_healthy(target: &str, p: &Proc) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(ch) = reflex_proto::connect(target).await {
            let mut c = HealthClient::new(ch);
            if let Ok(r) = c
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never became healthy; stderr:\n{}",
            p.name,
            p.stderr()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn policy_client(
    target: &str,
) -> pb::policy_client::PolicyClient<tonic::transport::Channel> {
    pb::policy_client::PolicyClient::new(timeout(reflex_proto::connect(target)).await.unwrap())
}

/// Sends `reqs` on one ActStream and collects every answer until the server ends it.
pub async fn act_stream_all(
    c: &mut pb::policy_client::PolicyClient<tonic::transport::Channel>,
    reqs: Vec<pb::ActRequest>,
) -> Vec<pb::ActResponse> {
    let mut stream = timeout(c.act_stream(tokio_stream::iter(reqs)))
        .await
        .unwrap()
        .into_inner();
    let mut got = vec![];
    while let Some(r) = timeout(stream.message()).await.unwrap() {
        got.push(r);
    }
    got
}

/// A 224×224 JPEG with a pattern that depends on `shade`.
pub fn jpeg(shade: u8) -> Vec<u8> {
    jpeg_of_side(shade, 224)
}

/// [`jpeg`] at `side`×`side` pixels (the pattern repeats every 256).
pub fn jpeg_of_side(shade: u8, side: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([
            (x as u8).wrapping_add(shade),
            (y as u8).wrapping_mul(3),
            shade.wrapping_mul(7),
        ])
    });
    reflex_engine::preprocess::encode_jpeg(&img, 90)
}

pub fn state() -> Vec<f32> {
    vec![0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04]
}

/// A valid Act request for the reference model.
pub fn act_request(shade: u8, seed: Option<u64>) -> pb::ActRequest {
    pb::ActRequest {
        images: vec![pb::Image {
            camera: "base".into(),
            data: jpeg(shade),
            sha256: String::new(),
        }],
        instruction: "pick up the red cup".into(),
        state: state(),
        episode_id: "ep-test".into(),
        noise_seed: seed,
        ..Default::default()
    }
}

/// Standard base64 with padding (what protobuf JSON uses for bytes).
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    bytes
        .chunks(3)
        .flat_map(|c| {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            (0..4).map(move |i| {
                if i <= c.len() {
                    T[(n >> (18 - 6 * i) & 63) as usize] as char
                } else {
                    '='
                }
            })
        })
        .collect()
}

pub fn read_to_string(path: &Path) -> String {
    let mut s = String::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    s
}

/// Starts `reflex recorder --dir DIR --listen unix://SOCK EXTRA...` and waits until Status answers.
pub async fn recorder(dir: &Path, sock: &Path, extra: &[&str]) -> Proc {
    let listen = format!("unix://{}", sock.display());
    let mut args = vec![
        "recorder",
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    args.extend_from_slice(extra);
    let p = Proc::start("reflex recorder", &args, &[]);
    let deadline = Instant::now() + TIMEOUT;
    while recorder_status(sock).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "recorder never answered Status; stderr:\n{}",
            p.stderr()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    p
}

pub async fn recorder_status(sock: &Path) -> Option<pb::RecorderStatus> {
    let ch = reflex_proto::connect(&format!("unix://{}", sock.display()))
        .await
        .ok()?;
    let mut c = pb::recorder_client::RecorderClient::new(ch);
    tokio::time::timeout(Duration::from_secs(5), c.status(pb::StatusRequest {}))
        .await
        .ok()?
        .ok()
        .map(|r| r.into_inner())
}

/// The README's check of a recorder, with the real grpcurl as an operator types it (no
/// `-authority`, no `.proto`): reflection lists `reflex.v1.Recorder`, and `Status` answers.
/// Returns the `Status` answer as JSON. Fails with grpcurl's stderr, which said
/// `RST_STREAM ... PROTOCOL_ERROR` before the recorder's listener rewrote `:authority`.
pub fn grpcurl_recorder_status(sock: &Path) -> serde_json::Value {
    let grpcurl = |args: &[&str]| {
        let out = Command::new("grpcurl")
            .args(["-plaintext", "-unix", sock.to_str().unwrap()])
            .args(args)
            .output()
            .expect("grpcurl is installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "grpcurl {args:?} against the recorder failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = grpcurl(&["list"]);
    assert!(
        listed.lines().any(|l| l == "reflex.v1.Recorder"),
        "reflex.v1.Recorder missing from:\n{listed}"
    );
    serde_json::from_str(&grpcurl(&["reflex.v1.Recorder/Status"])).unwrap()
}

/// Trace files (`*.jsonl.gz` / `*.jsonl`) in `dir`, sorted by name.
pub fn trace_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| {
        let n = p.file_name().unwrap().to_string_lossy().to_string();
        n.ends_with(".jsonl.gz") || n.ends_with(".jsonl")
    });
    v.sort();
    v
}

/// Decompressed text of a trace file (tolerates a cut gzip stream).
pub fn trace_text(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        let _ = flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    } else {
        String::from_utf8(bytes).unwrap()
    }
}

/// The trace's whole JSON lines, parsed.
pub fn trace_lines(path: &Path) -> Vec<serde_json::Value> {
    trace_text(path)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until `f` holds, polling.
pub async fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`serve`], with extra environment variables for the server.
pub async fn serve_env(
    dir: &Path,
    export: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (Proc, PathBuf) {
    let sock = dir.join("policy.sock");
    let listen = format!("unix://{}", sock.display());
    let mut args = vec!["serve", export.to_str().unwrap(), "--listen", &listen];
    args.extend_from_slice(extra);
    let p = Proc::start("reflex serve", &args, envs);
    wait_healthy(&format!("unix://{}", sock.display()), &p).await;
    (p, sock)
}

/// `GET http://ADDR/PATH` over a plain TCP connection; the whole response, headers included.
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = timeout(tokio::net::TcpStream::connect(addr)).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    timeout(s.write_all(req.as_bytes())).await.unwrap();
    let mut out = String::new();
    timeout(s.read_to_string(&mut out)).await.unwrap();
    out
}

impl Proc {
    /// Like [`Proc::start`] for a command the test prepared itself (inherited descriptors,
    /// a wrapper such as `sh -c`): stderr is collected, the child is killed on drop.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting the command");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc {
            child,
            name: name.into(),
            stderr,
        }
    }
}

/// Writes a secret (token, key) as a 0600 file, as `reflex serve` wants it.
pub fn write_secret(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// The test TLS material of `tests/fixtures/tls`: (server certificate, a 0600 copy of its
/// key in `dir`, the CA that signed it). Git checks keys out 0644, which serve refuses.
pub fn tls_fixture(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let key = std::fs::read(fixtures.join("server.key")).unwrap();
    (
        fixtures.join("server.crt"),
        write_secret(dir, "server.key", &key),
        fixtures.join("ca.crt"),
    )
}

/// A Policy client through [`reflex_proto::connect_with`] (token and/or TLS).
pub async fn policy_client_with(
    target: &str,
    opts: &reflex_proto::ConnectOptions,
) -> pb::policy_client::PolicyClient<reflex_proto::AuthChannel> {
    pb::policy_client::PolicyClient::new(
        timeout(reflex_proto::connect_with(target, opts))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {target}: {e:?}")),
    )
}

/// Resident memory of process `pid` in KiB (`VmRSS` in /proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for {pid}:\n{status}"))
}

/// `reflex replay TRACE --model EXPORT`: exits 0 with `calls` answers equal bit for bit.
pub fn assert_replays_bit_exactly(trace: &Path, export_dir: &Path, calls: usize) {
    let out = Command::new(BIN)
        .args(["replay", trace.to_str().unwrap(), "--model"])
        .arg(export_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.matches("cos=1.000000 max_abs=0.00e+00").count(),
        calls,
        "{text}"
    );
}

/// The address a server logged after `needle` (e.g. `listen=http://`), port 0 resolved.
pub fn logged_addr(p: &Proc, needle: &str) -> String {
    let line = p.wait_for_log(needle);
    let at = line.find(needle).unwrap() + needle.len();
    line[at..].split_whitespace().next().unwrap().to_string()
}

/// SIGTERM, and a clean exit within 10 s.
pub fn stop_cleanly(mut p: Proc) {
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(10)).unwrap().success());
}

pub mod s3;

/// A tmpfs of `size` (mount's `size=` syntax) mounted on `dir` (created) until the guard
/// drops: a small disk that fills. Needs root, which CI has.
pub fn mount_tmpfs(dir: &Path, size: &str) -> Unmount {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test mounts a tmpfs and needs root (CI runs as root)"
    );
    std::fs::create_dir_all(dir).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    Unmount(dir.to_path_buf())
}

/// Unmounts (lazily) on drop.
pub struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `cmd` to completion with stdout and stderr captured, SIGKILLed after `limit`.
pub fn run_bounded_for(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = tx.send(());
    out
}

/// A finished command's status, stdout and stderr, for assertion messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `reflex export-demo --kind KIND DIR/KIND`, checked; returns the folder.
pub fn export_demo(dir: &Path, kind: &str) -> std::path::PathBuf {
    let export = dir.join(kind);
    let out = Command::new(BIN)
        .args(["export-demo", "--kind", kind, export.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    export
}

/// Every seed-layout kind `reflex export-demo --kind` writes.
pub const SEED_KINDS: [&str; 6] = [
    "pi05",
    "pi05-per-step",
    "pi05-monolithic",
    "pi0",
    "smolvla",
    "smolvla-four-graph",
];
