//! The shipping marker: the state file `reflex ship` keeps in a trace directory, and what
//! the recorder's retention learns from it.
//!
//! The shipper and the recorder are two processes that share only the directory (no socket,
//! no lock). The shipper is the only writer of [`STATE_FILE`]; it replaces it whole by
//! write-temp-fsync-rename, so a reader sees the old state or the new one, never half. The
//! recorder only reads it: **when the file exists, shipping is on**, and retention keeps
//! every closed trace that is not listed as shipped ([`crate::retention`]).
//!
//! The format is one JSON object, versioned; both sides use this module, so the contract
//! lives in one place:
//! `{"version":1,"shipped":{"<file name>":{"key","size","sha256","records","uploaded_at"}}}`.
//! An entry is written only after the object was verified in the bucket (size and SHA-256).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::reader::TraceReader;
use crate::trace::Record;

/// The state file's name inside a trace directory (hidden: never a trace name).
pub const STATE_FILE: &str = ".reflex-ship.json";
/// The format version written and read.
pub const STATE_VERSION: u32 = 1;

/// One verified upload: also the manifest line written beside the object in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipped {
    /// Object key in the bucket.
    pub key: String,
    /// Bytes (local file and object alike).
    pub size: u64,
    /// SHA-256 of the bytes, lowercase hex.
    pub sha256: String,
    /// Request records in the file.
    pub records: u64,
    /// When the upload was verified (RFC 3339 UTC).
    pub uploaded_at: String,
}

/// What the shipper has done for one directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipState {
    pub version: u32,
    /// By local file name.
    pub shipped: BTreeMap<String, Shipped>,
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read ship state {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("ship state {} is not valid (delete it to re-verify every file): {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("ship state {} has version {version}; this build knows {STATE_VERSION}", path.display())]
    Version { path: PathBuf, version: u32 },
    #[error("cannot write ship state {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

impl ShipState {
    /// Reads `dir`'s state; `Ok(None)` when there is none (shipping is off).
    pub fn load(dir: &Path) -> Result<Option<ShipState>, StateError> {
        let path = dir.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let state: ShipState =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
                path: path.clone(),
                source,
            })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Version {
                path,
                version: state.version,
            });
        }
        Ok(Some(state))
    }

    /// Replaces `dir`'s state whole: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        let temp = dir.join(format!("{STATE_FILE}.tmp"));
        let err = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let state = ShipState {
            version: STATE_VERSION,
            shipped: self.shipped.clone(),
        };
        // Serialising plain strings and integers cannot fail.
        let json = serde_json::to_vec(&state).expect("ship state serialises");
        let write = || -> io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o640)
                .open(&temp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&temp, &path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(err)
    }
}

/// What a closed trace file holds, for shipping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedTrace {
    pub model_hash: String,
    /// The header's `started_at` (RFC 3339 UTC).
    pub started_at: String,
    /// Request records in the file.
    pub records: u64,
}

/// Reads `path` through and returns what it holds if it is **closed**: its footer is the
/// last record and nothing after it was cut. A file still being written (no footer yet), a
/// file a killed recorder left (no footer until its recovery at the next start), or a
/// truncated one is `Ok(None)`: it is not shipped. The footer is written last, by one
/// writer, after which the file never changes again (recovery rewrites only footer-less
/// files), so a file seen closed stays byte for byte the same.
pub fn closed_trace(path: &Path) -> Result<Option<ClosedTrace>, crate::ReadError> {
    // The cheap check first: an open file is answered from its last few KiB.
    if !crate::writer::footer_at_tail(path).unwrap_or(false) {
        return Ok(None);
    }
    let mut reader = TraceReader::open(path)?;
    let mut last_is_footer = false;
    let mut records = 0;
    while let Some(record) = reader.next_record()? {
        last_is_footer = matches!(record, Record::Footer(_));
        if matches!(record, Record::Request(_)) {
            records += 1;
        }
    }
    if !last_is_footer || reader.truncation().is_some() {
        return Ok(None);
    }
    let header = reader.header();
    Ok(Some(ClosedTrace {
        model_hash: header.model_hash.clone(),
        started_at: header.started_at.clone(),
        records,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ShipState::load(dir.path()).unwrap(), None);
        let mut s = ShipState::default();
        s.shipped.insert(
            "a.jsonl.gz".into(),
            Shipped {
                key: "p/robot=r/date=2026-01-01/model=0123456789abcdef/a.jsonl.gz".into(),
                size: 10,
                sha256: "00".repeat(32),
                records: 3,
                uploaded_at: "2026-01-01T00:00:00.000Z".into(),
            },
        );
        s.save(dir.path()).unwrap();
        let back = ShipState::load(dir.path()).unwrap().unwrap();
        assert_eq!(back.version, STATE_VERSION);
        assert_eq!(back.shipped, s.shipped);
        assert!(!dir.path().join(format!("{STATE_FILE}.tmp")).exists());
        fs::write(dir.path().join(STATE_FILE), b"{\"version\":1,").unwrap();
        assert!(matches!(
            ShipState::load(dir.path()),
            Err(StateError::Parse { .. })
        ));
        fs::write(
            dir.path().join(STATE_FILE),
            b"{\"version\":9,\"shipped\":{}}",
        )
        .unwrap();
        assert!(matches!(
            ShipState::load(dir.path()),
            Err(StateError::Version { version: 9, .. })
        ));
    }

    #[test]
    fn only_a_file_with_its_footer_is_closed() {
        use crate::trace::{Footer, Header};
        use crate::writer::{TraceWriter, WriterOptions};
        let dir = tempfile::tempdir().unwrap();
        for gzip in [true, false] {
            let header = Header {
                model_hash: "7a8b3c1d9f2e4a55".into(),
                session_id: format!("closed-{gzip}"),
                started_at: "2026-04-24T17:13:05.000Z".into(),
                ..Default::default()
            };
            let opts = WriterOptions {
                gzip,
                ..Default::default()
            };
            let mut w = TraceWriter::create(dir.path(), &header, &opts).unwrap();
            for seq in 0..7 {
                w.write_request(&crate::trace::tests::sample_request(seq))
                    .unwrap();
            }
            w.flush().unwrap();
            let path = w.path().to_path_buf();
            // Being written: not closed.
            assert_eq!(closed_trace(&path).unwrap(), None);
            let footer = Footer {
                ended_reason: "shutdown".into(),
                ..Default::default()
            };
            w.finish(&footer).unwrap();
            assert_eq!(
                closed_trace(&path).unwrap(),
                Some(ClosedTrace {
                    model_hash: "7a8b3c1d9f2e4a55".into(),
                    started_at: "2026-04-24T17:13:05.000Z".into(),
                    records: 7,
                })
            );
            // Cut short (a copy caught mid-write): not closed.
            let bytes = fs::read(&path).unwrap();
            let cut = dir.path().join("cut.jsonl");
            fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
            assert_eq!(closed_trace(&cut).unwrap(), None);
        }
    }
}
