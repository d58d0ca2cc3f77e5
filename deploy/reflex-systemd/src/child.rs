//! Child processes one reflex command runs for another: `reflex serve --record DIR` runs a
//! private `reflex recorder`, `reflex replay --model DIR` a private `reflex serve`. Both want
//! the same three things, so they live here once:
//!
//! - **Its own process group** ([`supervise`]): a terminal's Ctrl-C reaches the parent
//!   alone, which then stops the child in its own order (the server ends its recording
//!   session first; the replay answers its calls in flight first).
//! - **`PR_SET_PDEATHSIG`** ([`supervise`]): the child gets SIGTERM when its parent dies,
//!   even by SIGKILL, so it never outlives it. The kernel ties the signal to the *thread*
//!   that forked, not the process: spawn from a thread that lives as long as the child
//!   should (a tokio worker, or the main thread), not from a short-lived blocking-pool thread.
//! - **A graceful stop** ([`stop`], feature `tokio`): SIGTERM, a grace period for the child
//!   to finish its files or flush its exporters, then SIGKILL.
//!
//! The service manager is the other side of the same coin (a supervisor of reflex
//! processes), which is why this sits in this crate rather than in either command.

use std::io;
use std::os::unix::process::CommandExt;

/// Makes `cmd` a supervised child: its own process group, and SIGTERM when the spawning
/// thread's process dies (see the module docs).
pub fn supervise(cmd: &mut std::process::Command) -> &mut std::process::Command {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec, so it may only make async-signal-safe
    // calls and must not allocate: prctl, getppid and an `Os` io::Error are all that.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: no signal would ever come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd
}

/// Sends SIGTERM to `pid`: the polite request to stop.
pub fn terminate(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Stops `child`: SIGTERM, up to `grace` for it to exit, then SIGKILL. Returns how it ended.
/// A child that has already exited is only reaped.
#[cfg(feature = "tokio")]
pub async fn stop(
    child: &mut tokio::process::Child,
    grace: std::time::Duration,
) -> io::Result<std::process::ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // `id` is None only once the child is reaped, which try_wait just ruled out.
    if let Some(pid) = child.id() {
        terminate(pid)?;
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            child.kill().await?;
            child.wait().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_supervised_child_has_its_own_process_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ps -o pgid= -p $$"])
            .stdout(std::process::Stdio::piped());
        let out = supervise(&mut cmd).output().unwrap();
        assert!(out.status.success());
        let child_group: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        // SAFETY: getpgrp has no preconditions.
        let ours = unsafe { libc::getpgrp() };
        assert_ne!(child_group, ours);
    }

    #[test]
    fn a_supervised_child_gets_sigterm_when_the_thread_that_spawned_it_ends() {
        use std::os::unix::process::ExitStatusExt;
        // The kernel counts the spawning thread as the parent (see the module docs), so a
        // thread that spawns and ends stands in for a parent that dies.
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            supervise(&mut cmd).spawn().unwrap()
        })
        .join()
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("the child outlived its parent thread");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    }

    /// (Runs where the `tokio` feature is on: `cargo test --workspace`, or
    /// `cargo test -p reflex-systemd --features tokio`.)
    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn stop_asks_first_then_kills() {
        use std::os::unix::process::ExitStatusExt;
        use std::time::{Duration, Instant};
        // Each script says `ready` once its traps are set, so no signal comes too early.
        let spawn = |script: &'static str| async move {
            use tokio::io::AsyncBufReadExt;
            let mut cmd = Command::new("sh");
            cmd.args(["-c", script])
                .stdout(std::process::Stdio::piped());
            supervise(&mut cmd);
            let mut child = tokio::process::Command::from(cmd)
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut line = String::new();
            tokio::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .await
                .unwrap();
            assert_eq!(line, "ready\n");
            child
        };
        // A child that stops on SIGTERM ends by it, well within the grace.
        let mut polite = spawn("echo ready; exec sleep 30").await;
        let t = Instant::now();
        let st = stop(&mut polite, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.signal(), Some(libc::SIGTERM), "{st:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // One that ignores it (an ignored signal stays ignored across exec) is killed
        // once the grace is over.
        let mut deaf = spawn("trap '' TERM; echo ready; exec sleep 30").await;
        let t = Instant::now();
        let st = stop(&mut deaf, Duration::from_millis(300)).await.unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
        assert!(t.elapsed() >= Duration::from_millis(300));
        // Stopping one that is already gone only reaps it.
        let st = stop(&mut deaf, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn terminate_refuses_a_pid_out_of_range() {
        assert!(terminate(u32::MAX).is_err());
    }
}
