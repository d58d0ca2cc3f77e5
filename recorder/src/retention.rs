//! Which files in the trace directory are ours, which are open, and which may go.
//!
//! **Invariant: only whole, closed trace files whose names match our pattern are ever
//! deleted**, oldest first, and only to bring the directory's trace bytes under
//! `--max-total-mb`. "Oldest" is the UTC stamp in the name (second resolution), then the
//! file's modification time: two sessions that start in the same second sort by when their
//! files were last written, never by their random session ids. A file is "open" from just before it is created
//! until it is closed or abandoned; the set of open names is held under one lock while a
//! file is created and while a retention pass deletes, so a pass never sees a file that a
//! writer is about to claim. Files we did not name (other tools', temp files, links we did
//! not make) are never touched, and do not count toward the cap.
//!
//! **Shipping holds files back.** When `reflex ship` runs on the directory (its state file,
//! [`crate::shipped::STATE_FILE`], exists), a closed file that the state does not list as
//! shipped is kept even over the cap, and the pass says so in the log (`slug=record-held-back`):
//! a file leaves the robot only once it is verified in the bucket. The one exception is the
//! disk itself: when the file system's free space is under [`DISK_FLOOR_BYTES`], unshipped
//! files go too, oldest first, each logged at warn (`slug=record-unshipped-deleted`) —
//! recording new data wins over keeping old data, as without shipping. A state file that
//! cannot be read counts as "nothing shipped" (the safe side).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use crate::shipped::ShipState;

/// Free space under which retention deletes unshipped files too (see the module comment).
pub const DISK_FLOOR_BYTES: u64 = 256 << 20;

/// Whether `name` is a trace file name the recorder makes:
/// `YYYYMMDD-HHMMSS-<8 hex>-<session_id>.jsonl[.gz]`.
pub fn is_trace_name(name: &str) -> bool {
    let stem = name
        .strip_suffix(".jsonl.gz")
        .or_else(|| name.strip_suffix(".jsonl"));
    let Some(stem) = stem else { return false };
    let b = stem.as_bytes();
    if b.len() < 8 + 1 + 6 + 1 + 8 + 1 + 8 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let hex = b[16..24]
        .iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
    let session = &stem[25..];
    digits(0..8)
        && b[8] == b'-'
        && digits(9..15)
        && b[15] == b'-'
        && hex
        && b[24] == b'-'
        && crate::writer::check_session_id(session).is_ok()
}

/// The directory's deletion policy and its set of open files.
pub struct Retention {
    dir: PathBuf,
    max_total: Option<u64>,
    open: Mutex<HashSet<String>>,
}

impl Retention {
    pub fn new(dir: PathBuf, max_total: Option<u64>) -> Retention {
        Retention {
            dir,
            max_total,
            open: Mutex::new(HashSet::new()),
        }
    }

    /// The set of open file names; hold it while creating a file.
    pub fn lock_open(&self) -> MutexGuard<'_, HashSet<String>> {
        // A poisoned lock only means a thread panicked while holding the set; the names
        // in it are still right.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deletes the oldest closed trace files until the directory's trace files total at
    /// most the cap, holding back unshipped ones while shipping is on and the disk has room.
    /// Returns the names deleted.
    pub fn enforce(&self) -> io::Result<Vec<String>> {
        if self.max_total.is_none() {
            return Ok(Vec::new());
        }
        let free = free_bytes(&self.dir).unwrap_or(u64::MAX);
        self.enforce_with_free(free)
    }

    /// [`Retention::enforce`] with the file system's free bytes given.
    pub(crate) fn enforce_with_free(&self, free: u64) -> io::Result<Vec<String>> {
        let Some(cap) = self.max_total else {
            return Ok(Vec::new());
        };
        let open = self.lock_open();
        let mut files = trace_files(&self.dir)?;
        let mut total: u64 = files.iter().map(|f| f.size).sum();
        if total <= cap {
            return Ok(Vec::new());
        }
        // `None`: shipping is off. Read after listing, so a file shipped meanwhile is at
        // worst held back once more, never deleted unshipped.
        let shipped = match ShipState::load(&self.dir) {
            Ok(state) => state.map(|s| s.shipped),
            Err(e) => {
                tracing::warn!(error = %e, "ship state unreadable: every file counts as unshipped");
                Some(Default::default())
            }
        };
        let disk_low = free < DISK_FLOOR_BYTES;
        files.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        let mut deleted = Vec::new();
        let (mut held, mut held_bytes) = (0u64, 0u64);
        for TraceFile { name, size, .. } in files {
            if total <= cap {
                break;
            }
            if open.contains(&name) {
                continue;
            }
            let unshipped = shipped.as_ref().is_some_and(|s| !s.contains_key(&name));
            if unshipped && !disk_low {
                held += 1;
                held_bytes += size;
                continue;
            }
            match fs::remove_file(self.dir.join(&name)) {
                Ok(()) => {
                    if unshipped {
                        tracing::warn!(file = %name, bytes = size, free, slug = "record-unshipped-deleted", "unshipped trace deleted: the disk is nearly full");
                    } else {
                        tracing::info!(file = %name, bytes = size, "old trace deleted (max total size)");
                    }
                    total -= size;
                    deleted.push(name);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => total -= size,
                Err(e) => tracing::warn!(file = %name, error = %e, "cannot delete old trace"),
            }
        }
        if held > 0 {
            tracing::info!(
                files = held,
                bytes = held_bytes,
                total,
                cap,
                slug = "record-held-back",
                "over max total size, keeping traces not shipped yet"
            );
        }
        Ok(deleted)
    }
}

/// Bytes available to an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// One regular file with a trace name.
#[derive(Debug, Clone)]
pub struct TraceFile {
    pub name: String,
    pub size: u64,
    pub modified: SystemTime,
}

impl TraceFile {
    /// Oldest first: the name's UTC stamp (`YYYYMMDD-HHMMSS`), then the modification time,
    /// then the name.
    pub(crate) fn age_key(&self) -> (&str, SystemTime, &str) {
        (&self.name[..15], self.modified, &self.name)
    }
}

/// The regular files in `dir` with trace names.
pub fn trace_files(dir: &Path) -> io::Result<Vec<TraceFile>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !is_trace_name(&name) {
            continue;
        }
        // Not following links: a planted symlink is neither counted nor deleted.
        match entry.metadata() {
            Ok(m) if m.file_type().is_file() => out.push(TraceFile {
                size: m.len(),
                modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                name,
            }),
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_our_names() {
        for ok in [
            "20260424-171305-7a8b3c1d-c9d4f0ea.jsonl.gz",
            "20260424-171305-7a8b3c1d-c9d4f0ea-aaaa-bbbb.jsonl",
        ] {
            assert!(is_trace_name(ok), "{ok}");
        }
        for bad in [
            "20260424-171305-7a8b3c1d-c9d4f0ea.json",
            "20260424-171305-7A8B3C1D-c9d4f0ea.jsonl.gz",
            "2026042-1171305-7a8b3c1d-c9d4f0ea.jsonl.gz",
            "20260424-171305-7a8b3c1d-short.jsonl.gz",
            ".20260424-171305-7a8b3c1d-c9d4f0ea.jsonl.gz.recovering",
            "notes.txt",
            "20260424-171305-7a8b3c1d-c9d4f0ea.jsonl.gz.bak",
        ] {
            assert!(!is_trace_name(bad), "{bad}");
        }
    }

    #[test]
    fn deletes_oldest_closed_only() {
        let dir = tempfile::tempdir().unwrap();
        let name = |i: u32| format!("20260424-1713{i:02}-7a8b3c1d-session{i:02}.jsonl.gz");
        for i in 0..6 {
            fs::write(dir.path().join(name(i)), vec![0u8; 1000]).unwrap();
        }
        fs::write(dir.path().join("keep-me.txt"), vec![0u8; 5000]).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join(name(7))).unwrap();
        let r = Retention::new(dir.path().to_path_buf(), Some(2500));
        // The oldest is open: it stays, the next ones go.
        r.lock_open().insert(name(0));
        assert_eq!(
            r.enforce().unwrap(),
            vec![name(1), name(2), name(3), name(4)]
        );
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![name(0), name(5), name(7), "keep-me.txt".to_string()]
        );
        assert!(
            Retention::new(dir.path().to_path_buf(), None)
                .enforce()
                .unwrap()
                .is_empty()
        );
    }

    /// Two sessions that start in the same second: the one written last is the newest,
    /// whatever its session id (the demo lost its own fresh trace to this once).
    #[test]
    fn same_second_sorts_by_modification_time() {
        let dir = tempfile::tempdir().unwrap();
        let older = "20260424-171305-7a8b3c1d-ffffffff.jsonl.gz";
        let newer = "20260424-171305-7a8b3c1d-00000000.jsonl.gz";
        let write = |name: &str, secs: u64| {
            let path = dir.path().join(name);
            fs::write(&path, vec![0u8; 1000]).unwrap();
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        write(older, 1_700_000_000);
        write(newer, 1_700_000_001);
        let r = Retention::new(dir.path().to_path_buf(), Some(1500));
        assert_eq!(r.enforce().unwrap(), vec![older.to_string()]);
        assert!(dir.path().join(newer).exists());
    }

    /// Shipping on: over the cap, unshipped files stay (held back) and shipped ones go; with
    /// the disk nearly full, unshipped ones go too.
    #[test]
    fn unshipped_files_are_held_back_unless_the_disk_is_nearly_full() {
        use crate::shipped::{ShipState, Shipped};
        let dir = tempfile::tempdir().unwrap();
        let name = |i: u32| format!("20260424-1713{i:02}-7a8b3c1d-session{i:02}.jsonl.gz");
        for i in 0..4 {
            fs::write(dir.path().join(name(i)), vec![0u8; 1000]).unwrap();
        }
        let mut state = ShipState::default();
        let shipped = Shipped {
            key: String::new(),
            size: 1000,
            sha256: String::new(),
            records: 0,
            uploaded_at: String::new(),
        };
        state.shipped.insert(name(1), shipped.clone());
        state.save(dir.path()).unwrap();
        let r = Retention::new(dir.path().to_path_buf(), Some(1500));
        let roomy = DISK_FLOOR_BYTES * 10;
        // Only the shipped file may go; 0, 2 and 3 stay although over the cap.
        assert_eq!(r.enforce_with_free(roomy).unwrap(), vec![name(1)]);
        assert!(r.enforce_with_free(roomy).unwrap().is_empty());
        // Shipped later: now it goes.
        state.shipped.insert(name(0), shipped);
        state.save(dir.path()).unwrap();
        assert_eq!(r.enforce_with_free(roomy).unwrap(), vec![name(0)]);
        // The disk nearly full: unshipped files go too, oldest first, down to the cap.
        assert_eq!(
            r.enforce_with_free(DISK_FLOOR_BYTES - 1).unwrap(),
            vec![name(2)]
        );
        assert!(dir.path().join(name(3)).exists());
        // Shipping off (no state file): plain retention.
        fs::write(dir.path().join(name(4)), vec![0u8; 1000]).unwrap();
        fs::remove_file(dir.path().join(crate::shipped::STATE_FILE)).unwrap();
        assert_eq!(r.enforce_with_free(roomy).unwrap(), vec![name(3)]);
    }
}
