//! Start-up repair of trace files that a killed recorder left without a footer. Runs once,
//! before the daemon accepts any stream, so no file it touches is open.
//!
//! For each file with our name pattern: a closed file is recognised from its tail
//! ([`crate::writer::footer_at_tail`]); any other is read through the reader. A file that
//! reads to the end with a footer and no truncation is left as it is. Otherwise it is
//! rewritten — every whole line up to the cut, copied byte for byte, then a footer
//! `ended_reason: "recorder_lost"` (unless the cut came after the footer) — into a hidden
//! temp file in the same directory, fsynced, and renamed over the original, so a crash
//! during recovery leaves either the old file or the repaired one. A file the reader
//! cannot read (no header, corrupt, unknown version) is left alone and logged: recovery
//! never destroys data it does not understand.

use std::fs;
use std::io;
use std::path::Path;

use crate::clock::UtcTime;
use crate::reader::TraceReader;
use crate::retention::trace_files;
use crate::trace::{self, Footer, Record};
use crate::writer::{self, Sink, WriterOptions, create_exclusive, sync_dir};

/// What start-up recovery did to a directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Files rewritten with a footer.
    pub repaired: Vec<String>,
    /// Files that could not be read, with the reason; left as they were.
    pub left_alone: Vec<(String, String)>,
    /// Temp files of an interrupted earlier recovery, removed.
    pub removed_temps: Vec<String>,
}

/// What one file needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Closed,
    Repaired { records: u64, footer_added: bool },
}

const TEMP_SUFFIX: &str = ".recovering";

/// Repairs every footer-less trace file in `dir`.
pub fn recover_dir(dir: &Path, level: u32) -> io::Result<RecoveryReport> {
    let mut report = RecoveryReport::default();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
            fs::remove_file(dir.join(&name))?;
            report.removed_temps.push(name);
        }
    }
    let mut names: Vec<String> = trace_files(dir)?.into_iter().map(|f| f.name).collect();
    names.sort();
    for name in names {
        match recover_file(&dir.join(&name), level) {
            Ok(Outcome::Closed) => {}
            Ok(Outcome::Repaired {
                records,
                footer_added,
            }) => {
                tracing::warn!(file = %name, records, footer_added, "trace without footer repaired (recorder_lost)");
                report.repaired.push(name);
            }
            Err(e) => {
                tracing::warn!(file = %name, error = %e, slug = "record-recover-failed", "trace left as it is");
                report.left_alone.push((name, e.to_string()));
            }
        }
    }
    Ok(report)
}

/// Why one file was not repaired.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Read(#[from] crate::reader::ReadError),
    #[error(transparent)]
    Write(#[from] writer::WriteError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Checks one file and repairs it if it has no footer or a cut tail.
pub fn recover_file(path: &Path, level: u32) -> Result<Outcome, RecoverError> {
    if writer::footer_at_tail(path)? {
        return Ok(Outcome::Closed);
    }
    // First pass: read only, to learn whether anything needs doing.
    let mut reader = TraceReader::open(path)?;
    let mut last_is_footer = false;
    while let Some(record) = reader.next_record()? {
        last_is_footer = matches!(record, Record::Footer(_));
    }
    if last_is_footer && reader.truncation().is_none() {
        return Ok(Outcome::Closed);
    }

    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}{TEMP_SUFFIX}"));
    let result = rewrite(path, &temp, level);
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    let (records, footer_added) = result?;
    fs::rename(&temp, path)?;
    sync_dir(dir)?;
    Ok(Outcome::Repaired {
        records,
        footer_added,
    })
}

/// Second pass: copies every whole line into `temp`, adds the footer, fsyncs.
fn rewrite(path: &Path, temp: &Path, level: u32) -> Result<(u64, bool), RecoverError> {
    let mut reader = TraceReader::open(path)?;
    let opts = WriterOptions {
        gzip: reader.is_gzip(),
        level,
    };
    let mut sink = Sink::new(create_exclusive(temp)?, temp.to_path_buf(), &opts);
    let first_seq = reader.header().first_seq;
    let mut line = Vec::with_capacity(16 * 1024);
    line.extend_from_slice(reader.header_line());
    line.push(b'\n');
    sink.write_all(&line)?;
    let (mut records, mut max_seq, mut last_is_footer) = (0u64, None::<u64>, false);
    while let Some(record) = reader.next_record()? {
        last_is_footer = matches!(record, Record::Footer(_));
        if let Record::Request(r) = &record {
            records += 1;
            max_seq = Some(max_seq.map_or(r.seq, |m| m.max(r.seq)));
        }
        line.clear();
        line.extend_from_slice(reader.last_line());
        line.push(b'\n');
        sink.write_all(&line)?;
    }
    line.clear();
    if !last_is_footer {
        let total = max_seq.map_or(0, |m| (m + 1).saturating_sub(first_seq).max(records));
        let footer = Footer {
            ended_at: UtcTime::now().rfc3339_millis(),
            total_requests: total,
            dropped_requests: Some(total - records),
            ended_reason: "recorder_lost".into(),
            records_written: Some(records),
            refused_requests: None,
        };
        trace::encode_line(&footer, &mut line).map_err(io::Error::other)?;
    }
    // `finish` fsyncs the temp file (and the directory) before the rename.
    sink.finish(&line)?;
    Ok((records, !last_is_footer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Header, ImageMode, RequestRecord};
    use crate::writer::TraceWriter;

    fn header() -> Header {
        Header {
            model_hash: "7a8b3c1d9f2e4a55".into(),
            session_id: "recover-0001".into(),
            first_seq: 5,
            ..Default::default()
        }
    }

    fn request(seq: u64) -> RequestRecord {
        RequestRecord::from_act(
            crate::trace::tests::sample_act(seq, b"image"),
            ImageMode::HashOnly,
        )
    }

    fn read(path: &Path) -> (Vec<u64>, Option<Footer>, bool) {
        let mut r = TraceReader::open(path).unwrap();
        let mut seqs = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            if let Record::Request(q) = rec {
                seqs.push(q.seq);
            }
        }
        (seqs, r.footer().cloned(), r.truncation().is_some())
    }

    #[test]
    fn repairs_footerless_files_and_leaves_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut names = Vec::new();
        for gzip in [true, false] {
            let mut w = TraceWriter::create(
                dir.path(),
                &header(),
                &WriterOptions {
                    gzip,
                    ..Default::default()
                },
            )
            .unwrap();
            for seq in [5, 6, 8] {
                w.write_request(&request(seq)).unwrap();
            }
            w.flush().unwrap();
            // Killed: the writer's state is lost, the flushed bytes stay (plus a cut line).
            let bytes = fs::read(w.path()).unwrap();
            let path = w.path().to_path_buf();
            drop(w);
            let mut cut = bytes.clone();
            if !gzip {
                cut.extend_from_slice(br#"{"kind":"request","schema_version":1,"seq":9,"req"#);
            }
            fs::write(&path, &cut).unwrap();
            names.push(path);
        }
        // A closed file, and junk with a trace name.
        let mut w = TraceWriter::create(dir.path(), &header(), &WriterOptions::default()).unwrap();
        w.write_request(&request(5)).unwrap();
        let closed = w
            .finish(&Footer {
                ended_reason: "shutdown".into(),
                ..Default::default()
            })
            .unwrap();
        let closed_bytes = fs::read(&closed.path).unwrap();
        let junk = dir
            .path()
            .join("20200101-000000-7a8b3c1d-junkjunk.jsonl.gz");
        fs::write(&junk, b"\x1f\x8b\x08garbage").unwrap();
        fs::write(dir.path().join(".x.jsonl.gz.recovering"), b"half").unwrap();

        let report = recover_dir(dir.path(), 1).unwrap();
        assert_eq!(report.repaired.len(), 2, "{report:?}");
        assert_eq!(report.left_alone.len(), 1);
        assert_eq!(
            report.removed_temps,
            vec![".x.jsonl.gz.recovering".to_string()]
        );
        for path in &names {
            let (seqs, footer, truncated) = read(path);
            assert_eq!(seqs, vec![5, 6, 8]);
            let f = footer.unwrap();
            assert_eq!(f.ended_reason, "recorder_lost");
            assert_eq!(
                (f.total_requests, f.dropped_requests, f.records_written),
                (4, Some(1), Some(3))
            );
            assert!(!truncated);
            assert!(writer::footer_at_tail(path).unwrap());
            assert_eq!(
                fs::metadata(path).unwrap().permissions().mode() & 0o777,
                0o640
            );
        }
        assert_eq!(
            fs::read(&closed.path).unwrap(),
            closed_bytes,
            "closed file untouched"
        );
        assert_eq!(
            fs::read(&junk).unwrap(),
            b"\x1f\x8b\x08garbage",
            "unreadable file untouched"
        );
        // Idempotent.
        assert!(recover_dir(dir.path(), 1).unwrap().repaired.is_empty());
    }

    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn footer_then_cut_trailer_gets_no_second_footer() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TraceWriter::create(dir.path(), &header(), &WriterOptions::default()).unwrap();
        w.write_request(&request(5)).unwrap();
        let closed = w
            .finish(&Footer {
                ended_reason: "shutdown".into(),
                total_requests: 1,
                ..Default::default()
            })
            .unwrap();
        let bytes = fs::read(&closed.path).unwrap();
        fs::write(&closed.path, &bytes[..bytes.len() - 4]).unwrap();
        assert_eq!(
            recover_file(&closed.path, 1).unwrap(),
            Outcome::Repaired {
                records: 1,
                footer_added: false
            }
        );
        let (seqs, footer, truncated) = read(&closed.path);
        assert_eq!(
            (seqs, footer.unwrap().ended_reason.as_str(), truncated),
            (vec![5], "shutdown", false)
        );
    }
}
