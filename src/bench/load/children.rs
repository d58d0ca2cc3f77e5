//! The processes of a load run: `reflex recorder` and `reflex serve` children of this
//! binary (stderr tail kept for errors, killed on drop, stopped with SIGTERM), waiting until
//! they answer, and stopping a `--target` server somebody else started.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use reflex_proto::v1::{self as pb, policy_client::PolicyClient};
use tokio::io::AsyncBufReadExt;

/// SIGTERM to a process that is not our child, then wait until it is gone.
pub(super) async fn stop_foreign(pid: u32, limit: Duration) -> anyhow::Result<()> {
    // SAFETY: kill(2) with a pid the user named for exactly this purpose (--server-pid).
    if unsafe { libc::kill(pid as i32, libc::SIGTERM) } != 0 {
        anyhow::bail!(
            "cannot signal the server (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = Instant::now() + limit;
    while !exited(pid) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server (pid {pid}) did not exit within {} s of SIGTERM",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Whether `pid` has exited: no such process, or a zombie its parent has not reaped yet.
pub(super) fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// A `reflex` child: its stderr's last lines are kept for error messages; killed on drop.
pub(super) struct Spawned {
    name: &'static str,
    pub(super) pid: u32,
    child: tokio::process::Child,
    tail: Arc<Mutex<std::collections::VecDeque<String>>>,
}

const TAIL_LINES: usize = 40;

impl Spawned {
    pub(super) fn start(
        name: &'static str,
        bin: &Path,
        args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Spawned> {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(args)
            // The children's own flags only: nothing from this shell's REFLEX_*/OTEL_* setup.
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("REFLEX_") || k.starts_with("OTEL_") {
                cmd.env_remove(k.as_ref());
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", bin.display()))?;
        let pid = child.id().context("the child has no pid")?;
        let tail = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            });
        }
        Ok(Spawned {
            name,
            pid,
            child,
            tail,
        })
    }

    pub(super) fn tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Fails (with its stderr) if the child has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            anyhow::bail!(
                "{} exited early ({st}); its stderr ends:\n{}",
                self.name,
                self.tail()
            );
        }
        Ok(())
    }

    /// Waits for a stderr line containing `needle` (the kept tail is searched).
    pub(super) async fn wait_log(&mut self, needle: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self
                .tail
                .lock()
                .ok()
                .and_then(|t| t.iter().find(|l| l.contains(needle)).cloned())
            {
                return Ok(l);
            }
            self.check_alive()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} logged no line with {needle:?} in 30 s; its stderr ends:\n{}",
                self.name,
                self.tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL (no chance to close its files), and reap it.
    pub(super) async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM, then wait up to `limit` (then SIGKILL and an error).
    pub(super) async fn terminate(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        if self.child.try_wait()?.is_none() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(st) => Ok(st?),
            Err(_) => {
                let _ = self.child.kill().await;
                anyhow::bail!(
                    "{} did not exit within {} s of SIGTERM; its stderr ends:\n{}",
                    self.name,
                    limit.as_secs(),
                    self.tail()
                )
            }
        }
    }
}

pub(super) async fn wait_recorder(uri: &str, p: &mut Spawned) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = reflex_proto::connect(uri).await
            && pb::recorder_client::RecorderClient::new(ch)
                .status(pb::StatusRequest {})
                .await
                .is_ok()
        {
            return Ok(());
        }
        p.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the recorder did not answer on {uri} in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the server answers GetModelInfo (it loads and optimises the model first).
pub(super) async fn wait_server(target: &str, p: &mut Spawned) -> anyhow::Result<pb::ModelInfo> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(ch) = reflex_proto::connect(target).await
            && let Ok(info) = PolicyClient::new(ch)
                .get_model_info(pb::GetModelInfoRequest {})
                .await
        {
            return Ok(info.into_inner());
        }
        p.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server did not answer on {target} in 120 s; its stderr ends:\n{}",
            p.tail()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_counts_as_exited() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !exited(pid) {
            assert!(Instant::now() < deadline, "true never exited");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Not reaped yet: /proc still has it, as a zombie.
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        child.wait().unwrap();
        assert!(exited(pid));
        assert!(!exited(std::process::id()));
    }
}
