//! The streaming pass over one or more traces: every Act record, in file order, handed to
//! a callback together with its trace's header, one at a time (memory: one record).
//!
//! A crash-cut tail is not an error: everything before the cut is handed over, and the cut
//! is logged (`slug=trace-cut`) and returned in the file's [`ReadNote`]. A file that is not
//! a trace, or damage before the end, is an error naming the file and line.

use std::path::{Path, PathBuf};

use reflex_recorder::reader::{TraceReader, Truncation};
use reflex_recorder::trace::{Footer, Header, Record, RequestRecord};

use crate::TraceToolError;
use crate::progress::Progress;

/// What reading one file found, beside its records.
#[derive(Debug, Clone)]
pub struct ReadNote {
    pub path: PathBuf,
    pub header: Header,
    pub requests: u64,
    pub truncation: Option<Truncation>,
    pub footer: Option<Footer>,
    pub file_bytes: u64,
}

/// One Act as the callback sees it.
pub struct Act<'a> {
    /// Index of the trace in the list given.
    pub trace: usize,
    pub path: &'a Path,
    pub header: &'a Header,
    pub record: &'a RequestRecord,
}

/// Reads every trace in `paths` in order and calls `each` for every Act record.
pub fn for_each_act(
    paths: &[PathBuf],
    progress: &mut Progress,
    mut each: impl FnMut(&Act<'_>) -> Result<(), TraceToolError>,
) -> Result<Vec<ReadNote>, TraceToolError> {
    let mut notes = Vec::with_capacity(paths.len());
    let mut done_before = 0u64;
    for (i, path) in paths.iter().enumerate() {
        let mut reader = TraceReader::open(path)?;
        let header = reader.header().clone();
        let mut n = 0u64;
        while let Some(record) = reader.next_record()? {
            if let Record::Request(r) = record {
                each(&Act {
                    trace: i,
                    path,
                    header: &header,
                    record: &r,
                })?;
                n += 1;
                if n.is_multiple_of(64) {
                    progress.update(done_before + reader.file_bytes_read());
                }
            }
        }
        let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        done_before += file_bytes;
        let truncation = reader.truncation().cloned();
        if let Some(t) = &truncation {
            tracing::warn!(
                slug = "trace-cut",
                path = %path.display(),
                "trace read up to its last whole record: {t}"
            );
        }
        notes.push(ReadNote {
            path: path.clone(),
            header,
            requests: n,
            truncation,
            footer: reader.footer().cloned(),
            file_bytes,
        });
    }
    progress.update(done_before);
    progress.finish();
    Ok(notes)
}

/// The total size of the files, for progress.
pub fn total_bytes(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}
