//! The book check: the session's trace files, read through the recorder's reader, must
//! account for every Act the server answered (see the module docs of [`super`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use reflex_recorder::{Footer, Record, TraceReader};

use super::clients::Load;

/// What one trace file of the session holds.
#[derive(Debug, Clone, Default)]
pub(super) struct FileBooks {
    name: String,
    first_seq: u64,
    seqs: Vec<u64>,
    /// Request records that carry an `error` (answered errors).
    error_records: u64,
    footer: Option<Footer>,
    /// The header's count of records lost on the broken stream before this file's.
    lost_declared: Option<u64>,
    /// Why the file ends early or could not be read to the end.
    damage: Option<String>,
    pub(super) bytes: u64,
}

/// Every trace file in `dir` whose header names `session_id`, read through the recorder's reader.
pub(super) fn session_files(dir: &Path, session_id: &str) -> anyhow::Result<Vec<FileBooks>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list the trace folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.ends_with(".jsonl.gz") || n.ends_with(".jsonl")
        })
        .collect();
    paths.sort();
    let mut out = vec![];
    for path in paths {
        let mut reader = TraceReader::open(&path)?;
        if reader.header().session_id != session_id {
            continue;
        }
        let mut f = FileBooks {
            name: path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into(),
            first_seq: reader.header().first_seq,
            lost_declared: reader.header().lost_requests,
            bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            ..Default::default()
        };
        loop {
            match reader.next_record() {
                Ok(Some(Record::Request(r))) => {
                    f.seqs.push(r.seq);
                    f.error_records += r.error.is_some() as u64;
                }
                Ok(Some(Record::Footer(_))) | Ok(Some(Record::Header(_))) => {}
                Ok(None) => break,
                Err(e) => {
                    f.damage = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(t) = reader.truncation() {
            f.damage = Some(format!("cut: {t}"));
        }
        f.footer = reader.footer().cloned();
        out.push(f);
    }
    Ok(out)
}

/// The server-side books of one session, from its trace files alone.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Books {
    files: usize,
    /// Distinct seqs with a request record.
    written: u64,
    /// Counted drops: the server's footer numbers for the last stream, seq gaps inside
    /// earlier streams (a stream that ended with the connection).
    dropped: u64,
    /// Seqs handed to a stream that broke before the recorder wrote them: between the last
    /// record of a lost stream and the first seq of the next one.
    lost: u64,
    /// What the recorder counted of `lost` (the continuing files' `lost_requests`), where it
    /// could tell.
    lost_declared: u64,
    /// Seqs the session issued: the last stream's first seq + its footer's total_requests.
    issued: u64,
    /// Calls refused before any work (no seq, no record): the last footer's
    /// `refused_requests`, session-wide.
    refused: u64,
    /// Answered errors among the written records.
    error_records: u64,
    /// Structural problems (no footer, cut file, duplicate seqs...): any one is a FAIL.
    problems: Vec<String>,
}

impl Books {
    pub(super) fn check(files: &[FileBooks]) -> Books {
        let mut b = Books {
            files: files.len(),
            ..Default::default()
        };
        if files.is_empty() {
            b.problems.push("no trace file for the session".into());
            return b;
        }
        let mut files: Vec<&FileBooks> = files.iter().collect();
        files.sort_by(|x, y| (x.first_seq, &x.name).cmp(&(y.first_seq, &y.name)));
        for f in &files {
            if let Some(d) = &f.damage {
                b.problems.push(format!("{}: {d}", f.name));
            }
            if f.footer.is_none() {
                b.problems.push(format!("{} has no footer", f.name));
            }
        }
        let mut all: Vec<u64> = files.iter().flat_map(|f| f.seqs.iter().copied()).collect();
        all.sort_unstable();
        let before = all.len();
        all.dedup();
        if all.len() != before {
            b.problems
                .push(format!("{} seqs written twice", before - all.len()));
        }
        b.written = all.len() as u64;
        b.error_records = files.iter().map(|f| f.error_records).sum();
        if files[0].first_seq != 0 {
            b.problems.push(format!(
                "the first file starts at seq {}: seqs before it are in no file",
                files[0].first_seq
            ));
        }
        // Streams: a file whose footer says "rotated" continues in the next file.
        let mut streams: Vec<Vec<&FileBooks>> = vec![];
        let mut cur = vec![];
        for f in files {
            cur.push(f);
            if f.footer
                .as_ref()
                .is_none_or(|ft| ft.ended_reason != "rotated")
            {
                streams.push(std::mem::take(&mut cur));
            }
        }
        if !cur.is_empty() {
            b.problems
                .push("the last file says it was rotated, but no file follows it".into());
            streams.push(cur);
        }
        let n = streams.len();
        for (i, s) in streams.iter().enumerate() {
            let first = s[0].first_seq;
            let written: u64 = s.iter().map(|f| f.seqs.len() as u64).sum();
            let covered = s
                .iter()
                .flat_map(|f| f.seqs.iter())
                .max()
                .map_or(first, |m| m + 1);
            if i + 1 < n {
                // Ended with the connection: the recorder wrote this footer, not the server.
                let next = streams[i + 1][0].first_seq;
                b.dropped += (covered - first).saturating_sub(written);
                if next < covered {
                    b.problems.push(format!(
                        "{} overlaps the next stream (next first_seq {next} < {covered})",
                        s[0].name
                    ));
                }
                let lost = next.saturating_sub(covered);
                b.lost += lost;
                // The recorder's own count, in the next file's header, must agree.
                match streams[i + 1][0].lost_declared {
                    Some(declared) if declared != lost => b.problems.push(format!(
                        "{} says lost_requests {declared}, the seqs say {lost}",
                        streams[i + 1][0].name
                    )),
                    Some(declared) => b.lost_declared += declared,
                    None => {}
                }
                continue;
            }
            let last = s[s.len() - 1];
            match &last.footer {
                Some(ft) if ft.ended_reason != "client_lost" && ft.ended_reason != "rotated" => {
                    b.issued = first + ft.total_requests;
                    // Our footers always state it.
                    b.dropped += ft.dropped_requests.unwrap_or(0);
                    b.refused = ft.refused_requests.unwrap_or(0);
                }
                other => {
                    b.problems.push(format!(
                        "{}: the session has no footer from the server (ended_reason {:?}); it did not end cleanly",
                        last.name,
                        other.as_ref().map(|f| f.ended_reason.as_str())
                    ));
                    b.issued = covered;
                }
            }
        }
        if let Some(&max) = all.last()
            && max >= b.issued
        {
            b.problems.push(format!(
                "seq {max} was written, beyond the {} the footer says were issued",
                b.issued
            ));
        }
        b
    }

    fn balanced(&self) -> bool {
        self.written + self.dropped + self.lost == self.issued
    }

    fn sum_text(&self) -> String {
        let lost = if self.lost > 0 {
            format!(
                " + lost on reconnect {} (the recorder counted {})",
                self.lost, self.lost_declared
            )
        } else {
            String::new()
        };
        format!(
            "written {} + dropped {}{lost} {} seqs {}; + refused {} = answered {}",
            self.written,
            self.dropped,
            if self.balanced() { "=" } else { "≠" },
            self.issued,
            self.refused,
            self.issued + self.refused
        )
    }
}

#[derive(Debug)]
pub(super) enum BookOutcome {
    Pass { line: String, notes: Vec<String> },
    Fail(String),
    Skipped(String),
}

/// Server books plus the client cross-checks. `exclusive`: this tool was the server's only
/// client (it started it), so the client's count must match the server's exactly.
pub(super) fn book_outcome(
    books: anyhow::Result<(Books, Vec<FileBooks>)>,
    load: &Load,
    exclusive: bool,
    mut problems: Vec<String>,
) -> BookOutcome {
    let (b, files) = match books {
        Ok(x) => x,
        Err(e) => {
            problems.push(format!("cannot read the traces: {e:#}"));
            return BookOutcome::Fail(problems.join("; "));
        }
    };
    problems.extend(b.problems.iter().cloned());
    if !b.balanced() {
        let (lhs, rhs) = (b.written + b.dropped + b.lost, b.issued);
        problems.push(format!(
            "{} (difference {})",
            b.sum_text(),
            lhs as i128 - rhs as i128
        ));
    }
    let t = &load.tally;
    let answered = t.answered();
    let mut notes = vec![];
    let server_answered = b.issued + b.refused;
    if exclusive {
        if answered != server_answered {
            problems.push(format!(
                "the server issued {} seqs and refused {} calls but the clients got {answered} answers (OK {} + errors {})",
                b.issued,
                b.refused,
                t.ok_all,
                answered - t.ok_all
            ));
        } else {
            notes.push(format!(
                "clients: OK {} + answered errors {} = {answered} = the footer's total_requests + refused_requests",
                t.ok_all,
                answered - t.ok_all
            ));
        }
    } else if answered > server_answered {
        problems.push(format!(
            "the clients got {answered} answers but the server answered only {server_answered} (seqs {} + refused {})",
            b.issued, b.refused
        ));
    } else {
        notes.push(format!(
            "clients: {answered} answers of the {server_answered} the server gave (not required to be equal: others may call a --target server)",
        ));
    }
    let written: std::collections::HashSet<u64> =
        files.iter().flat_map(|f| f.seqs.iter().copied()).collect();
    let missing = t.recorded.iter().filter(|s| !written.contains(s)).count() as u64;
    let unexpected = t.unrecorded.iter().filter(|s| written.contains(s)).count();
    if missing > b.lost {
        problems.push(format!(
            "{missing} OK answers said recorded: true but their seq is in no trace file"
        ));
    }
    if unexpected > 0 {
        problems.push(format!(
            "{unexpected} OK answers said recorded: false but their seq is in a trace file"
        ));
    }
    notes.push(format!(
        "per seq: {} OK answers said recorded, all in the trace{}; {} said not recorded, none in it; {} error records written",
        t.recorded.len(),
        if missing > 0 {
            format!(" but {missing} lost on a reconnect")
        } else {
            String::new()
        },
        t.unrecorded.len(),
        b.error_records
    ));
    if problems.is_empty() {
        BookOutcome::Pass {
            line: format!("books: PASS ({})", b.sum_text()),
            notes,
        }
    } else {
        BookOutcome::Fail(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::load::clients::Tally;

    fn footer(reason: &str, total: u64, dropped: u64) -> Option<Footer> {
        Some(Footer {
            ended_at: String::new(),
            total_requests: total,
            dropped_requests: Some(dropped),
            ended_reason: reason.into(),
            records_written: None,
            refused_requests: None,
        })
    }

    fn file(
        name: &str,
        first: u64,
        seqs: impl IntoIterator<Item = u64>,
        f: Option<Footer>,
    ) -> FileBooks {
        FileBooks {
            name: name.into(),
            first_seq: first,
            seqs: seqs.into_iter().collect(),
            footer: f,
            ..Default::default()
        }
    }

    #[test]
    fn one_clean_file_balances_with_its_drops() {
        // seqs 0..10, 3 and 7 dropped by the server's full queue.
        let seqs = (0..10).filter(|s| *s != 3 && *s != 7);
        let b = Books::check(&[file("a", 0, seqs, footer("shutdown", 10, 2))]);
        assert!(b.problems.is_empty(), "{:?}", b.problems);
        assert_eq!((b.written, b.dropped, b.lost, b.issued), (8, 2, 0, 10));
        assert!(b.balanced());
        assert_eq!(
            b.sum_text(),
            "written 8 + dropped 2 = seqs 10; + refused 0 = answered 10"
        );
    }

    #[test]
    fn a_record_missing_without_a_counted_drop_does_not_balance() {
        let seqs = (0..10).filter(|s| *s != 5);
        let b = Books::check(&[file("a", 0, seqs, footer("shutdown", 10, 0))]);
        assert!(!b.balanced());
        assert!(b.sum_text().contains('≠'));
    }

    #[test]
    fn rotation_and_a_reconnect_are_followed_across_files() {
        // Stream 1: 0..=4 rotated into 5..=9 (6 dropped), the connection broke after 9 was
        // written with 10 and 11 in flight; stream 2 starts at 12, ends at 20 issued.
        let files = [
            file("r1", 0, 0..5, footer("rotated", 5, 0)),
            file(
                "r2",
                5,
                (5..10).filter(|s| *s != 6),
                footer("client_lost", 5, 1),
            ),
            file("s2", 12, 12..20, footer("shutdown", 8, 0)),
        ];
        let b = Books::check(&files);
        assert!(b.problems.is_empty(), "{:?}", b.problems);
        assert_eq!((b.written, b.dropped, b.lost, b.issued), (17, 1, 2, 20));
        assert!(b.balanced());
        assert!(b.sum_text().contains("lost on reconnect 2"));

        // The recorder counts the loss itself in the continuing file's header; its count
        // must be the seqs' count.
        let mut counted = files.clone();
        counted[2].lost_declared = Some(2);
        let b = Books::check(&counted);
        assert!(b.problems.is_empty(), "{:?}", b.problems);
        assert_eq!(b.lost_declared, 2);
        assert!(b.sum_text().contains("(the recorder counted 2)"));
        counted[2].lost_declared = Some(1);
        let b = Books::check(&counted);
        assert!(
            b.problems
                .iter()
                .any(|p| p.contains("lost_requests 1, the seqs say 2")),
            "{:?}",
            b.problems
        );
    }

    #[test]
    fn structural_damage_is_reported() {
        let b = Books::check(&[file("a", 0, [0, 1, 1], None)]);
        assert!(b.problems.iter().any(|p| p.contains("no footer")));
        assert!(b.problems.iter().any(|p| p.contains("written twice")));
        assert!(b.problems.iter().any(|p| p.contains("did not end cleanly")));
        let b = Books::check(&[file("a", 3, [3], footer("shutdown", 1, 0))]);
        assert!(b.problems.iter().any(|p| p.contains("starts at seq 3")));
        let b = Books::check(&[]);
        assert!(!b.problems.is_empty());
    }

    fn load(ok: &[(u64, bool)], errors: u64) -> Load {
        let mut t = Tally::default();
        for &(seq, rec) in ok {
            t.ok_all += 1;
            if rec {
                t.recorded.push(seq)
            } else {
                t.unrecorded.push(seq)
            }
        }
        if errors > 0 {
            t.server_errors_all.insert("RESOURCE_EXHAUSTED", errors);
        }
        Load {
            tally: t,
            measured_secs: 1.0,
            interrupted: false,
            cpu: [None; 3],
        }
    }

    #[test]
    fn client_counts_and_recorded_flags_are_cross_checked() {
        // 4 answered: OK 0, 1 (recorded), OK 2 (dropped), one refusal (no seq, counted).
        let mut ft = footer("shutdown", 3, 1);
        ft.as_mut().unwrap().refused_requests = Some(1);
        let files = vec![file("a", 0, [0, 1], ft)];
        let good = load(&[(0, true), (1, true), (2, false)], 1);
        let b = Books::check(&files);
        match book_outcome(Ok((b, files.clone())), &good, true, vec![]) {
            BookOutcome::Pass { line, .. } => assert_eq!(
                line,
                "books: PASS (written 2 + dropped 1 = seqs 3; + refused 1 = answered 4)"
            ),
            other => panic!("{other:?}"),
        }
        // One answer the server never booked.
        let extra = load(&[(0, true), (1, true), (2, false), (4, true)], 1);
        let b = Books::check(&files);
        match book_outcome(Ok((b, files.clone())), &extra, true, vec![]) {
            BookOutcome::Fail(why) => {
                assert!(
                    why.contains("issued 3 seqs and refused 1 calls but the clients got 5"),
                    "{why}"
                );
                assert!(
                    why.contains("recorded: true but their seq is in no trace"),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A seq the server said it did not record, found in the trace.
        let liar = load(&[(0, true), (1, false), (2, false)], 1);
        let b = Books::check(&files);
        match book_outcome(Ok((b, files.clone())), &liar, true, vec![]) {
            BookOutcome::Fail(why) => assert!(why.contains("recorded: false"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
