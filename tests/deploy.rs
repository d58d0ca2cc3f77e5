//! Deploying on robots: the systemd units and their companions as files (`systemd-analyze
//! verify`, sysusers/tmpfiles into a scratch root), the daemons' side of the protocols with
//! real processes (readiness, watchdog, stopping, socket activation), and the Debian
//! package built, inspected, installed and removed.
//!
//! The tools come from `deploy/ci-setup.sh` (systemd's tools, cargo-deb). A missing tool
//! fails the test with that hint rather than skipping it. The tests that install things
//! (sysusers/tmpfiles ownership, the .deb) need root, as CI has; they fail otherwise.

mod util;

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use util::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const UNITS: [&str; 3] = [
    "reflex-recorder.socket",
    "reflex-recorder.service",
    "reflex-serve@.service",
];

// ---------------------------------------------------------------------------------------
// Tools

/// Runs a tool that deploy/ci-setup.sh provides; a missing one fails the test with that hint.
fn tool(program: &str, args: &[&OsStr]) -> Output {
    match Command::new(program).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!(
                "{program} is not installed: run deploy/ci-setup.sh (CI runs it before the tests)"
            )
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn require_root(what: &str) {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{what} needs root (it creates users and installs a package); CI runs the tests as root in a throwaway machine"
    );
}

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

/// `systemd-analyze verify` on `paths`: it must succeed and say nothing about our files
/// (it exits 0 on an unknown key, with a warning).
fn verify(paths: &[PathBuf]) {
    let args: Vec<&OsStr> = paths.iter().map(|p| p.as_os_str()).collect();
    let out = tool("systemd-analyze", &[&[os("verify")], &args[..]].concat());
    let said = text(&out);
    let about_us: Vec<&str> = said.lines().filter(|l| l.contains("reflex")).collect();
    assert!(
        out.status.success() && about_us.is_empty(),
        "systemd-analyze verify refused the units:\n{said}"
    );
}

// ---------------------------------------------------------------------------------------
// The files

#[test]
fn systemd_analyze_verify_accepts_every_unit_and_the_cuda_drop_in() {
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart= is executable: point it at the binary under test. The
    // installed units are verified as shipped by the .deb test.
    for unit in UNITS {
        let src =
            std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd").join(unit)).unwrap();
        assert!(
            unit.ends_with(".socket") || src.contains("ExecStart=/usr/bin/reflex "),
            "{unit} runs the packaged binary"
        );
        std::fs::write(dir.path().join(unit), src.replace("/usr/bin/reflex", BIN)).unwrap();
    }
    let dropin = dir.path().join("reflex-serve@.service.d");
    std::fs::create_dir(&dropin).unwrap();
    std::fs::copy(
        Path::new(ROOT).join("deploy/systemd/cuda.conf"),
        dropin.join("cuda.conf"),
    )
    .unwrap();
    // The shipper's unit (not in the package: it needs a destination before it can run).
    let ship = std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd/reflex-ship.service"))
        .unwrap();
    assert!(ship.contains("ExecStart=/usr/bin/reflex ship "));
    std::fs::write(
        dir.path().join("reflex-ship.service"),
        ship.replace("/usr/bin/reflex", BIN),
    )
    .unwrap();
    let mut units = UNITS.map(|u| dir.path().join(u)).to_vec();
    units.push(dir.path().join("reflex-ship.service"));
    verify(&units);

    // The check has teeth: a misspelt key is caught.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dropin.join("cuda.conf"))
        .unwrap();
    writeln!(f, "DeviceAlow=char-nvidiactl rw").unwrap();
    let out = tool(
        "systemd-analyze",
        &[
            os("verify"),
            dir.path().join("reflex-serve@.service").as_os_str(),
        ],
    );
    assert!(text(&out).contains("DeviceAlow"), "{}", text(&out));
}

#[test]
fn units_say_what_the_spec_asks() {
    let unit = |name: &str| {
        std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd").join(name)).unwrap()
    };
    let has = |text: &str, line: &str| text.lines().any(|l| l.trim() == line);
    let serve = unit("reflex-serve@.service");
    let recorder = unit("reflex-recorder.service");
    for (name, u) in [("reflex-serve@", &serve), ("reflex-recorder", &recorder)] {
        for line in [
            "Type=notify",
            "User=reflex",
            "Group=reflex",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "SystemCallFilter=@system-service",
        ] {
            assert!(has(u, line), "{name}: {line}");
        }
        assert!(
            u.lines()
                .any(|l| l.starts_with("RestrictAddressFamilies=AF_UNIX")),
            "{name}"
        );
    }
    assert!(has(&serve, "EnvironmentFile=/etc/reflex/%i.env"));
    assert!(has(
        &serve,
        "Environment=REFLEX_RECORDER=unix:///run/reflex/recorder.sock"
    ));
    assert!(serve.lines().any(|l| l.starts_with("WatchdogSec=")));
    assert!(has(&recorder, "ReadWritePaths=/var/lib/reflex/traces"));
    let ship = unit("reflex-ship.service");
    for line in [
        "User=reflex",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ReadWritePaths=/var/lib/reflex/traces",
        "After=reflex-recorder.service network-online.target",
        "EnvironmentFile=/etc/reflex/ship.env",
    ] {
        assert!(has(&ship, line), "reflex-ship: {line}");
    }
    let socket = unit("reflex-recorder.socket");
    for line in [
        "ListenStream=/run/reflex/recorder.sock",
        "SocketMode=0660",
        "SocketGroup=reflex",
        "FileDescriptorName=recorder",
    ] {
        assert!(has(&socket, line), "socket: {line}");
    }
}

#[test]
fn sysusers_and_tmpfiles_make_the_user_and_folders_with_the_spec_modes() {
    require_root("creating the reflex user and folders in a scratch root");
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let rootarg = format!("--root={}", root.path().display());
    let out = tool(
        "systemd-sysusers",
        &[
            os(&rootarg),
            Path::new(ROOT)
                .join("deploy/sysusers.d/reflex.conf")
                .as_os_str(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let entry: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("reflex:"))
        .expect("user reflex")
        .split(':')
        .collect();
    let (uid, gid) = (
        entry[2].parse::<u32>().unwrap(),
        entry[3].parse::<u32>().unwrap(),
    );
    assert_eq!(&entry[5..], ["/var/lib/reflex", "/usr/sbin/nologin"]);
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(
        group
            .lines()
            .any(|l| l.starts_with(&format!("reflex:x:{gid}:"))),
        "{group}"
    );

    let out = tool(
        "systemd-tmpfiles",
        &[
            os(&rootarg),
            os("--create"),
            Path::new(ROOT)
                .join("deploy/tmpfiles.d/reflex.conf")
                .as_os_str(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    for dir in ["run/reflex", "var/lib/reflex", "var/lib/reflex/traces"] {
        let m = std::fs::metadata(root.path().join(dir)).unwrap();
        assert!(m.is_dir(), "{dir}");
        assert_eq!(
            (m.permissions().mode() & 0o7777, m.uid(), m.gid()),
            (0o750, uid, gid),
            "{dir}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// sd_notify, as systemd would receive it

/// A `NOTIFY_SOCKET` owned by the test: every datagram, with the time it arrived.
struct Notifications {
    value: String,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Notifications {
    fn at_path(path: &Path) -> Notifications {
        Self::listen(
            UnixDatagram::bind(path).unwrap(),
            path.display().to_string(),
        )
    }

    fn abstract_name() -> Notifications {
        let name = format!(
            "reflex-deploy-test/{}/{:?}",
            std::process::id(),
            Instant::now()
        );
        let sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        Self::listen(sock, format!("@{name}"))
    }

    fn listen(sock: UnixDatagram, value: String) -> Notifications {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                sink.lock().unwrap().push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        });
        Notifications { value, got }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.got.lock().unwrap().clone()
    }

    /// Index and arrival time of the first datagram with the line `line`.
    fn wait_for(&self, line: &str, p: &Proc) -> (usize, Instant) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(i) = self
                .all()
                .iter()
                .position(|(_, m)| m.lines().any(|l| l == line))
            {
                return (i, self.all()[i].0);
            }
            assert!(
                Instant::now() < deadline,
                "no {line} from {}; got {:?}; stderr:\n{}",
                p.name,
                self.all(),
                p.stderr()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn count(&self, line: &str) -> usize {
        self.all()
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == line))
            .count()
    }
}

async fn health_once(target: &str) -> bool {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let Ok(ch) = reflex_proto::connect(target).await else {
        return false;
    };
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    r.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_says_ready_only_when_healthy_pings_the_watchdog_at_half_the_interval_and_says_stopping()
 {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let notes = Notifications::at_path(&dir.path().join("notify"));
    let sock = dir.path().join("policy.sock");
    let target = format!("unix://{}", sock.display());
    let watchdog = Duration::from_millis(600);
    let usec = watchdog.as_micros().to_string();
    let mut p = Proc::start(
        "reflex serve",
        &["serve", exp.to_str().unwrap(), "--listen", &target],
        &[("NOTIFY_SOCKET", &notes.value), ("WATCHDOG_USEC", &usec)],
    );

    let (first, ready_at) = notes.wait_for("READY=1", &p);
    assert!(
        timeout(health_once(&target)).await,
        "health answers SERVING as soon as READY=1 has arrived"
    );
    assert_eq!(
        first,
        0,
        "READY=1 is the first notification: {:?}",
        notes.all()
    );
    let ready = &notes.all()[0].1;
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving model ")),
        "{ready}"
    );

    // Pings come from the engine probe, every half interval.
    tokio::time::sleep(watchdog * 5).await;
    let pings: Vec<Instant> = notes
        .all()
        .into_iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| t)
        .collect();
    assert!(
        pings.iter().all(|t| *t >= ready_at),
        "no ping before READY=1"
    );
    assert!(
        (6..=12).contains(&pings.len()),
        "{} pings in 3 s at a 300 ms period; stderr:\n{}",
        pings.len(),
        p.stderr()
    );
    let mut gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(
        median >= watchdog / 2 - Duration::from_millis(100)
            && median <= watchdog / 2 + Duration::from_millis(150),
        "median gap {median:?}, want about {:?}",
        watchdog / 2
    );
    assert!(p.stderr().contains("watchdog on"), "{}", p.stderr());

    p.signal(libc::SIGTERM);
    notes.wait_for("STOPPING=1", &p);
    assert!(
        p.wait_exit(Duration::from_secs(10))
            .expect("exits after SIGTERM")
            .success(),
        "{}",
        p.stderr()
    );
    assert_eq!(notes.count("READY=1"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_notify_socket_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    // A watchdog request with nowhere to send pings is ignored with a warning, not fatal.
    let target = format!("unix://{}", dir.path().join("policy.sock").display());
    let mut p = Proc::start(
        "reflex serve",
        &["serve", exp.to_str().unwrap(), "--listen", &target],
        &[("WATCHDOG_USEC", "1000000")],
    );
    wait_healthy(&target, &p).await;
    p.wait_for_log("no watchdog");
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(10)).unwrap().success());
}

// ---------------------------------------------------------------------------------------
// Socket activation

/// `reflex recorder` started the way systemd starts it for reflex-recorder.socket: the
/// listening socket as fd 3, `LISTEN_FDS=1`, `LISTEN_PID` = its own PID (set by the
/// shell it `exec`s from), flags from `REFLEX_RECORDER_*`.
fn activated_recorder(fd3: &impl AsRawFd, traces: &Path, notify: &str) -> Proc {
    spawn_activated_recorder(fd3, traces, notify, false)
}

/// [`activated_recorder`], optionally held to one CPU (as on a loaded machine: its runtime
/// gets one worker, so tasks it wakes together run one after the other).
fn spawn_activated_recorder(
    fd3: &impl AsRawFd,
    traces: &Path,
    notify: &str,
    one_cpu: bool,
) -> Proc {
    let fd = fd3.as_raw_fd();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", r#"LISTEN_PID=$$ exec "$0" "$@""#, BIN, "recorder"])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "recorder")
        .env("NOTIFY_SOCKET", notify)
        .env("REFLEX_RECORDER_DIR", traces)
        .env("RUST_LOG", "info");
    // SAFETY: dup2, fcntl and sched_setaffinity are system calls (async-signal-safe);
    // nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if one_cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if fd == 3 {
                // Already in place; dup2 would keep close-on-exec.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Proc::spawn("reflex recorder (socket-activated)", cmd)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_recorder_serves_the_socket_it_is_handed_and_leaves_it_to_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    let rsock = dir.path().join("recorder.sock");
    // The test plays systemd: it owns the socket for the whole test.
    let listener = UnixListener::bind(&rsock).unwrap();
    std::fs::set_permissions(&rsock, std::fs::Permissions::from_mode(0o660)).unwrap();
    let notes = Notifications::abstract_name();
    let mut rec = activated_recorder(&listener, &traces, &notes.value);
    notes.wait_for("READY=1", &rec);
    assert!(
        timeout(recorder_status(&rsock)).await.is_some(),
        "Status answers on the handed-over socket"
    );
    rec.wait_for_log("using the socket passed by the service manager");

    let exp = dir.path().join("export");
    export(&exp, 0);
    let recorder_uri = format!("unix://{}", rsock.display());
    let (mut server, sock) = serve(dir.path(), &exp, &["--recorder", &recorder_uri]).await;
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    for i in 0..3 {
        let r = timeout(c.act(act_request(i, Some(u64::from(i)))))
            .await
            .unwrap()
            .into_inner();
        assert!(r.recorded);
    }
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_exit(Duration::from_secs(10)).unwrap().success(),
        "{}",
        server.stderr()
    );

    rec.signal(libc::SIGTERM);
    notes.wait_for("STOPPING=1", &rec);
    assert!(
        rec.wait_exit(Duration::from_secs(15)).unwrap().success(),
        "{}",
        rec.stderr()
    );
    assert!(
        rsock.exists(),
        "the socket belongs to its owner (systemd): the recorder does not remove it"
    );

    let files = trace_files(&traces);
    assert_eq!(files.len(), 1, "{files:?}");
    let kinds: Vec<String> = trace_lines(&files[0])
        .iter()
        .map(|l| l["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["header", "request", "request", "request", "footer"]);
    let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);

    // Restarted on the same socket (what systemd does after a crash): it serves again.
    let notes2 = Notifications::abstract_name();
    let _rec2 = activated_recorder(&listener, &traces, &notes2.value);
    notes2.wait_for("READY=1", &_rec2);
    assert!(timeout(recorder_status(&rsock)).await.is_some());
}

/// Regression, socket-activated: grpcurl against the socket systemd hands the recorder got
/// `RST_STREAM PROTOCOL_ERROR` and no reflection (see
/// `grpcurl_recorder_status_no_rst_stream_protocol_error` in tests/record.rs).
#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_socket_activated_recorder_status_no_rst_stream_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    let rsock = dir.path().join("recorder.sock");
    let listener = UnixListener::bind(&rsock).unwrap();
    let notes = Notifications::abstract_name();
    let rec = activated_recorder(&listener, &traces, &notes.value);
    notes.wait_for("READY=1", &rec);
    rec.wait_for_log("using the socket passed by the service manager");
    let status = grpcurl_recorder_status(&rsock);
    assert_eq!(status["dir"], traces.display().to_string(), "{status}");
}

/// Regression (a CI failure): an idle recorder stops as soon as it is told to, and it used to
/// abort the task that sends STOPPING=1 before that task had run. On one CPU (CI's loaded
/// two cores hit it) that lost the notice about once in 150 stops, so it stops 200 times.
#[test]
fn an_idle_recorder_says_stopping_each_time_it_is_told_to_stop() {
    let dir = tempfile::tempdir().unwrap();
    let rsock = dir.path().join("recorder.sock");
    let listener = UnixListener::bind(&rsock).unwrap();
    let traces = dir.path().join("traces");
    for round in 0..200 {
        let notes = Notifications::abstract_name();
        let mut rec = spawn_activated_recorder(&listener, &traces, &notes.value, true);
        notes.wait_for("READY=1", &rec);
        rec.signal(libc::SIGTERM);
        let status = rec.wait_exit(TIMEOUT).expect("exits");
        assert!(status.success(), "round {round}: {}", rec.stderr());
        notes.wait_for("STOPPING=1", &rec);
        assert_eq!(
            notes.count("STOPPING=1"),
            1,
            "round {round}: got {:?}; stderr:\n{}",
            notes.all(),
            rec.stderr()
        );
    }
}

#[test]
fn a_handed_over_descriptor_that_is_not_a_listening_unix_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("not-a-socket")).unwrap();
    let notes = Notifications::abstract_name();
    let mut rec = activated_recorder(&file, &dir.path().join("traces"), &notes.value);
    let status = rec.wait_exit(TIMEOUT).expect("exits");
    assert_eq!(status.code(), Some(1), "{}", rec.stderr());
    assert!(
        rec.stderr()
            .contains("inherited descriptor 3 (recorder) is not a socket"),
        "{}",
        rec.stderr()
    );
    assert_eq!(notes.count("READY=1"), 0);
}

// ---------------------------------------------------------------------------------------
// The Debian package

/// Removes the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let out = Command::new("dpkg").args(["--purge", "reflex"]).output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!("dpkg --purge reflex failed:\n{}", text(&out));
        }
    }
}

#[test]
fn the_debian_package_builds_holds_the_expected_files_installs_and_runs() {
    let cargo_deb = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["deb", "--version"])
        .output();
    assert!(
        cargo_deb.as_ref().is_ok_and(|o| o.status.success()),
        "cargo-deb is not installed: run deploy/ci-setup.sh (CI runs it before the tests)"
    );
    // cargo deb --no-build packages target/release/reflex: the binary these tests run.
    assert!(
        Path::new(BIN)
            .parent()
            .is_some_and(|d| d.ends_with("release")),
        "{BIN} is not a release build: run the tests with `cargo test --release` so the package holds this binary"
    );
    let out_dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["deb", "--no-build", "--fast", "-o"])
        .arg(format!("{}/", out_dir.path().display()))
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo deb failed:\n{}", text(&out));
    eprintln!("cargo deb took {:?}", started.elapsed());
    let deb = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb in the output folder");
    let name = deb.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with(&format!("reflex_{}-", env!("CARGO_PKG_VERSION"))),
        "{name}"
    );

    let listing = text(&tool("dpkg-deb", &[os("-c"), deb.as_os_str()]));
    for path in [
        "./usr/bin/reflex",
        "./usr/lib/systemd/system/reflex-recorder.socket",
        "./usr/lib/systemd/system/reflex-recorder.service",
        "./usr/lib/systemd/system/reflex-serve@.service",
        "./usr/lib/sysusers.d/reflex.conf",
        "./usr/lib/tmpfiles.d/reflex.conf",
        "./etc/reflex/recorder.env",
        "./usr/share/reflex/model.env",
        "./usr/share/reflex/cuda.conf",
        "./usr/share/reflex/proto/reflex/v1/reflex.proto",
        "./usr/share/doc/reflex/README.md",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} missing from:\n{listing}"
        );
    }
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" ./usr/bin/reflex")),
        "{listing}"
    );
    let postinst = text(&tool(
        "dpkg-deb",
        &[os("-I"), deb.as_os_str(), os("postinst")],
    ));
    let sysusers = postinst
        .find("systemd-sysusers")
        .expect("postinst creates the user");
    let tmpfiles = postinst
        .find("systemd-tmpfiles --create reflex.conf")
        .expect("postinst creates the folders");
    let start = postinst
        .find("deb-systemd-invoke")
        .expect("postinst starts the recorder socket");
    assert!(
        sysusers < tmpfiles && tmpfiles < start,
        "user, then folders, then the socket:\n{postinst}"
    );
    let conffiles = text(&tool(
        "dpkg-deb",
        &[os("-I"), deb.as_os_str(), os("conffiles")],
    ));
    assert_eq!(conffiles.trim(), "/etc/reflex/recorder.env");

    require_root("installing the package");
    let before = Command::new("dpkg")
        .args(["-s", "reflex"])
        .output()
        .unwrap();
    assert!(
        !before.status.success(),
        "a reflex package is already installed here; this test installs and purges its own (dpkg --purge reflex first)"
    );
    let _cleanup = Installed;
    let out = tool("dpkg", &[os("-i"), deb.as_os_str()]);
    assert!(out.status.success(), "dpkg -i failed:\n{}", text(&out));

    let out = tool("/usr/bin/reflex", &[os("--version")]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("reflex {}", env!("CARGO_PKG_VERSION"))
    );
    let user = text(&tool("getent", &[os("passwd"), os("reflex")]));
    assert!(
        user.trim_end()
            .ends_with(":/var/lib/reflex:/usr/sbin/nologin"),
        "{user}"
    );
    // The units exactly as installed, with the binary where ExecStart= says.
    verify(&UNITS.map(|u| Path::new("/usr/lib/systemd/system").join(u)));

    drop(_cleanup);
    assert!(!Path::new("/usr/bin/reflex").exists(), "purged");
}
