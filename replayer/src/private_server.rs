//! The private server of `--model DIR`: `reflex serve DIR` as a child process, on a Unix
//! socket in a temporary folder. The replay drives it over that socket like any target, and
//! this crate links no model runtime.
//!
//! **Lifecycle.** Spawn, supervised (own process group, SIGTERM if the replay dies: see
//! `reflex_systemd::child`) → wait until `grpc.health.v1` says SERVING, the child exits
//! (its error becomes the replay's, exit 2), or the replay is interrupted → replay →
//! [`PrivateServer::stop`]: SIGTERM (the server answers what is in flight and flushes its
//! telemetry), SIGKILL after [`STOP_GRACE`]. Dropped without `stop` (a panic), it is killed.
//! There is no limit on the start-up: a large export can take minutes to load, and the
//! child either serves, exits, or is stopped with the replay on Ctrl-C.
//!
//! **Its stderr** is held while it starts, so a failed start shows up once, inside the
//! replay's error; once it serves, held and later lines are copied to the replay's stderr,
//! prefixed `private server: `. Its log level is the replay's `RUST_LOG` when set, `warn`
//! otherwise: a private server's start-up chatter is not the replay's report.
//!
//! **Its flags** are the ones given here only: `REFLEX_*` variables (which configure a
//! user's own `reflex serve`) are not passed on, so a shell set up for serving cannot
//! switch recording or authentication on in the replay's server. `OTEL_*` are passed on:
//! the server's `act` spans join the replay's traces.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long the server gets after SIGTERM: its drain (`--drain-ms` below) plus a telemetry
/// flush (bounded at 8 s by the server).
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// `--drain-ms` of the private server: calls in flight at the stop are the replay's own,
/// and it has stopped sending.
const DRAIN_MS: u64 = 2000;
/// `reflex serve`'s default `--queue-depth`; a replay with more calls in flight raises it.
const SERVE_QUEUE_DEPTH: usize = 32;
/// Lines of stderr kept while the server starts (the error is at the end).
const HELD_LINES: usize = 200;
/// Each health probe may take this long.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the private server is not serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot make a folder for the private socket: {0}")]
    SocketDir(std::io::Error),
    #[error("cannot start {}: {source}", bin.display())]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    /// The child ended before it served; `stderr` is what it said (its error, mostly).
    #[error("reflex serve {}: {stderr}", describe(.status))]
    Exited { status: ExitStatus, stderr: String },
    #[error("waiting for reflex serve failed: {0}")]
    Wait(std::io::Error),
    #[error("interrupted before the private server was ready")]
    Interrupted,
}

fn describe(status: &ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exited with code {code}"),
        None => format!("ended by {status}"),
    }
}

/// A `reflex serve` child that serves `--model DIR`.
pub struct PrivateServer {
    child: tokio::process::Child,
    /// `unix://…` of its socket.
    pub uri: String,
    stderr: Arc<Mutex<Stderr>>,
    copier: JoinHandle<()>,
    // Holds the socket's folder until the server is gone.
    _dir: tempfile::TempDir,
}

/// The child's stderr: held until it serves, then copied through.
#[derive(Default)]
struct Stderr {
    held: VecDeque<String>,
    copying: bool,
}

impl PrivateServer {
    /// Starts `bin serve dir` and waits until it serves. `queue_depth` is the number of
    /// calls the replay keeps in flight, so the replay itself never overflows its queue.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        queue_depth: usize,
        shutdown: &CancellationToken,
    ) -> Result<PrivateServer, StartError> {
        let tmp = tempfile::Builder::new()
            .prefix("reflex-replay-")
            .tempdir()
            .map_err(StartError::SocketDir)?;
        let uri = format!("unix://{}", tmp.path().join("policy.sock").display());

        let mut cmd = std::process::Command::new(bin);
        cmd.arg("serve")
            .arg(dir)
            .arg("--listen")
            .arg(&uri)
            .arg("--queue-depth")
            .arg(queue_depth.max(SERVE_QUEUE_DEPTH).to_string())
            .arg("--drain-ms")
            .arg(DRAIN_MS.to_string())
            .stdin(Stdio::null())
            // The replay's stdout carries its report only.
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REFLEX_") {
                cmd.env_remove(&key);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        reflex_systemd::child::supervise(&mut cmd);
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| StartError::Spawn {
                bin: bin.to_path_buf(),
                source,
            })?;
        tracing::debug!(pid = child.id(), bin = %bin.display(), %uri, "private server started");

        let stderr = Arc::new(Mutex::new(Stderr::default()));
        let pipe = child.stderr.take();
        let copier = tokio::spawn(copy_stderr(pipe, stderr.clone()));
        let mut server = PrivateServer {
            child,
            uri,
            stderr,
            copier,
            _dir: tmp,
        };

        enum Outcome {
            Serving,
            Exited(std::io::Result<ExitStatus>),
            Interrupted,
        }
        let uri = server.uri.clone();
        let outcome = tokio::select! {
            _ = wait_serving(&uri) => Outcome::Serving,
            st = server.child.wait() => Outcome::Exited(st),
            _ = shutdown.cancelled() => Outcome::Interrupted,
        };
        match outcome {
            Outcome::Serving => {
                {
                    let mut s = lock(&server.stderr);
                    s.copying = true;
                    for line in s.held.drain(..) {
                        eprintln!("private server: {line}");
                    }
                }
                Ok(server)
            }
            Outcome::Exited(Ok(status)) => {
                // The pipe ends with the child: let the copier take its last lines.
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut server.copier).await;
                let held: Vec<String> = lock(&server.stderr).held.drain(..).collect();
                Err(StartError::Exited {
                    status,
                    stderr: what_it_said(&held),
                })
            }
            Outcome::Exited(Err(e)) => Err(StartError::Wait(e)),
            Outcome::Interrupted => {
                server.stop().await;
                Err(StartError::Interrupted)
            }
        }
    }

    /// The child's pid (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops the server (after the replay's calls are answered): SIGTERM, then SIGKILL
    /// after [`STOP_GRACE`].
    pub async fn stop(mut self) {
        match reflex_systemd::child::stop(&mut self.child, STOP_GRACE).await {
            Ok(st) if st.success() => {}
            Ok(st) => {
                tracing::warn!(status = %st, "the private server did not stop cleanly")
            }
            Err(e) => tracing::warn!(error = %e, "cannot stop the private server"),
        }
        // Its last lines (the pipe closes with the child).
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.copier).await;
    }
}

/// Polls `grpc.health.v1.Health/Check` until the server says SERVING.
async fn wait_serving(uri: &str) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    loop {
        let probe = async {
            let channel = reflex_proto::connect(uri).await.ok()?;
            let r = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .ok()?;
            Some(r.into_inner().status == ServingStatus::Serving as i32)
        };
        if let Ok(Some(true)) = tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn copy_stderr(pipe: Option<tokio::process::ChildStderr>, to: Arc<Mutex<Stderr>>) {
    let Some(pipe) = pipe else { return };
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut s = lock(&to);
        if s.copying {
            eprintln!("private server: {line}");
        } else {
            if s.held.len() == HELD_LINES {
                s.held.pop_front();
            }
            s.held.push_back(line);
        }
    }
}

/// A poisoned lock only means the copier panicked mid-line; the lines are still good.
fn lock(m: &Mutex<Stderr>) -> std::sync::MutexGuard<'_, Stderr> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The part of a failed server's stderr worth repeating: its `error: …` lines (what
/// `reflex` prints last when it fails), else its last lines.
fn what_it_said(lines: &[String]) -> String {
    let errors: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("error: "))
        .collect();
    if !errors.is_empty() {
        return errors.join("; ");
    }
    let tail: Vec<&str> = lines
        .iter()
        .rev()
        .take(10)
        .rev()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    if tail.is_empty() {
        "(it printed nothing)".to_string()
    } else {
        tail.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_server_is_quoted_by_its_error_lines() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            what_it_said(&l(&[
                "WARN something",
                "error: cannot load export: no config"
            ])),
            "cannot load export: no config"
        );
        assert_eq!(what_it_said(&l(&["a", "", "b "])), "a | b");
        assert_eq!(what_it_said(&[]), "(it printed nothing)");
    }

    #[tokio::test]
    async fn a_server_that_fails_to_start_shows_its_stderr_and_exit_code() {
        // `sh -c SCRIPT serve DIR …`: the script stands in for a `reflex` that fails.
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("fake-reflex");
        std::fs::write(
            &bin,
            "#!/bin/sh\necho 'INFO loading' >&2\necho \"error: cannot load $2: no reflex_config.json\" >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e =
            match PrivateServer::start(&bin, Path::new("/x/export"), 1, &CancellationToken::new())
                .await
            {
                Err(e) => e,
                Ok(_) => panic!("a server that exits cannot be serving"),
            };
        assert_eq!(
            e.to_string(),
            "reflex serve exited with code 1: cannot load /x/export: no reflex_config.json"
        );

        let e = PrivateServer::start(
            &dir.path().join("missing"),
            Path::new("/x"),
            1,
            &CancellationToken::new(),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, StartError::Spawn { .. }), "{e}");
    }

    #[tokio::test]
    async fn an_interrupt_while_starting_stops_the_child() {
        // A "server" that never serves: only the interrupt ends the wait.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let bin = dir.path().join("slow-reflex");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho $$ > {}\nexec sleep 60\n",
                pidfile.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let token = CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            t.cancel();
        });
        let e = tokio::time::timeout(
            Duration::from_secs(20),
            PrivateServer::start(&bin, dir.path(), 1, &token),
        )
        .await
        .expect("the interrupt ends the wait")
        .err()
        .unwrap();
        assert!(matches!(e, StartError::Interrupted), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "the child was stopped (and reaped)");
    }
}
