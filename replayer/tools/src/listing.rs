//! `reflex trace ls DIR`: one row per trace file in DIR (not recursive), oldest first by
//! name (the recorder's names start with the UTC time). Each file is read to its end —
//! counts and the footer are only known there — one record at a time.

use std::path::{Path, PathBuf};

use reflex_recorder::reader::TraceReader;
use reflex_recorder::trace::Record;
use serde::Serialize;

use crate::TraceToolError;
use crate::progress::Progress;

/// One row of `ls`.
#[derive(Debug, Clone, Serialize)]
pub struct TraceRow {
    pub file: String,
    pub bytes: u64,
    pub started_at: Option<String>,
    pub session_id: Option<String>,
    pub model_hash: Option<String>,
    pub embodiment: Option<String>,
    pub image_mode: Option<String>,
    pub records: u64,
    pub errors: u64,
    /// Seconds from the header's `started_at` to the last record's timestamp.
    pub duration_s: Option<f64>,
    /// The footer's reason; `cut` when a crash cut the file, `open` when it simply has no
    /// footer yet (a session still recording).
    pub ended_reason: Option<String>,
    /// Why the file could not be read as a trace (then most fields are absent).
    pub error: Option<String>,
}

/// Whether a file name is a trace's (`.jsonl` or `.jsonl.gz`).
pub fn is_trace_name(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    !n.starts_with('.') && (n.ends_with(".jsonl") || n.ends_with(".jsonl.gz"))
}

/// Lists the traces of `dir`.
pub fn list(dir: &Path) -> Result<Vec<TraceRow>, TraceToolError> {
    let err = |source| TraceToolError::List {
        path: dir.into(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_trace_name(p))
        .collect();
    paths.sort();
    let mut progress = Progress::new("ls", crate::input::total_bytes(&paths));
    let mut done = 0;
    let rows = paths
        .iter()
        .map(|p| {
            let row = summarise(p);
            done += row.bytes;
            progress.update(done);
            row
        })
        .collect();
    progress.finish();
    Ok(rows)
}

/// Reads one file to its end; an unreadable file becomes a row with `error`.
pub fn summarise(path: &Path) -> TraceRow {
    let mut row = TraceRow {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        started_at: None,
        session_id: None,
        model_hash: None,
        embodiment: None,
        image_mode: None,
        records: 0,
        errors: 0,
        duration_s: None,
        ended_reason: None,
        error: None,
    };
    let mut reader = match TraceReader::open(path) {
        Ok(r) => r,
        Err(e) => {
            row.error = Some(e.to_string());
            return row;
        }
    };
    let h = reader.header().clone();
    let start = crate::time::unix_nanos(&h.started_at);
    row.started_at = Some(h.started_at);
    row.session_id = Some(h.session_id);
    row.model_hash = Some(h.model_hash);
    row.embodiment = Some(h.embodiment);
    row.image_mode = Some(h.redaction.image.as_str().to_string());
    let mut last = None;
    loop {
        match reader.next_record() {
            Ok(Some(Record::Request(r))) => {
                row.records += 1;
                if r.error.is_some() {
                    row.errors += 1;
                }
                if let Some(t) = crate::time::unix_nanos(&r.timestamp) {
                    last = Some(t);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                row.error = Some(e.to_string());
                break;
            }
        }
    }
    if let (Some(s), Some(l)) = (start, last) {
        row.duration_s = Some(((l - s) as f64 / 1e9 * 1000.0).round() / 1000.0);
    }
    row.ended_reason = Some(match (reader.footer(), reader.truncation()) {
        (Some(f), _) => f.ended_reason.clone(),
        (None, Some(_)) => "cut".into(),
        (None, None) => "open".into(),
    });
    row
}

/// The human table of `ls`.
pub fn print_table(rows: &[TraceRow], out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<18} {:<16} {:<10} {:<9} {:>8} {:>6} {:>10} {:<12} {:>10}  file",
        "started",
        "session",
        "model_hash",
        "embodiment",
        "images",
        "records",
        "errors",
        "duration",
        "ended",
        "bytes"
    )?;
    for r in rows {
        if let Some(e) = &r.error
            && r.session_id.is_none()
        {
            writeln!(out, "{:<24} unreadable: {e}  {}", "-", r.file)?;
            continue;
        }
        let s = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let mut session = s(&r.session_id);
        session.truncate(18);
        writeln!(
            out,
            "{:<24} {:<18} {:<16} {:<10} {:<9} {:>8} {:>6} {:>10} {:<12} {:>10}  {}{}",
            s(&r.started_at),
            session,
            s(&r.model_hash),
            s(&r.embodiment),
            s(&r.image_mode),
            r.records,
            r.errors,
            r.duration_s.map_or("-".into(), |d| format!("{d:.1}s")),
            s(&r.ended_reason),
            r.bytes,
            r.file,
            r.error
                .as_ref()
                .map_or(String::new(), |e| format!("  (damaged: {e})")),
        )?;
    }
    Ok(())
}
