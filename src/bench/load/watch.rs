//! Watching the processes under load: peak memory (VmHWM, and VmRSS sampled every 100 ms),
//! CPU time from /proc, and the trace folder's size.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
pub(super) struct Rss {
    /// VmHWM (the kernel's peak) read at the end of the load, before the stop.
    pub(super) hwm_kib: Option<u64>,
    /// Largest VmRSS sampled every 100 ms during the run.
    pub(super) sampled_max_kib: u64,
}

impl Rss {
    /// The larger of the two: per-CPU RSS counter caching can leave VmHWM a little
    /// below a VmRSS sample.
    pub(super) fn peak_mib(&self) -> f64 {
        self.hwm_kib.unwrap_or(0).max(self.sampled_max_kib) as f64 / 1024.0
    }
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
pub(super) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces; the
    // state is field 3, so utime (14) and stime (15) are at 11 and 12 here.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    Some(rest.next()?.parse::<u64>().ok()? + rest.next()?.parse::<u64>().ok()?)
}

/// A `kB` field of /proc/PID/status.
pub(in crate::bench) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Samples VmRSS of up to two processes every 100 ms and keeps the largest.
pub(super) struct RssWatch {
    max: Arc<[AtomicU64; 2]>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RssWatch {
    pub(super) fn start(pids: &[Option<u32>; 2]) -> RssWatch {
        let max = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let stop = CancellationToken::new();
        let (m, s, pids) = (max.clone(), stop.clone(), *pids);
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                for (i, pid) in pids.iter().enumerate() {
                    if let Some(kib) = pid.and_then(|p| proc_status_kib(p, "VmRSS")) {
                        m[i].fetch_max(kib, Ordering::Relaxed);
                    }
                }
                tokio::select! {
                    _ = every.tick() => {}
                    _ = s.cancelled() => return,
                }
            }
        });
        RssWatch { max, stop, task }
    }

    pub(super) async fn stop(self) -> [u64; 2] {
        self.stop.cancel();
        let _ = self.task.await;
        [0, 1].map(|i| self.max[i].load(Ordering::Relaxed))
    }
}

pub(super) fn trace_bytes(dir: &Path) -> Option<u64> {
    Some(
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn cpu_ticks_count_up_while_working() {
        let me = std::process::id();
        let before = cpu_ticks(me).unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        assert!(cpu_ticks(me).unwrap() > before);
        assert_eq!(cpu_ticks(u32::MAX), None);
    }

    #[test]
    fn proc_status_fields_are_read() {
        let me = std::process::id();
        assert!(proc_status_kib(me, "VmRSS").unwrap() > 0);
        assert!(proc_status_kib(me, "VmHWM").unwrap() >= proc_status_kib(me, "VmRSS").unwrap());
        assert_eq!(proc_status_kib(me, "NoSuchField"), None);
    }
}
