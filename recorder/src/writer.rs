//! One trace file: its name, its permissions, its bytes, its footer.
//!
//! # Ownership
//! The recorder alone creates trace files, and only through [`TraceWriter::create`]: the
//! name is made here from the UTC clock, `model_hash[..8]` and `session_id`, and both are
//! validated before they get near a path (`session_id` `[0-9A-Za-z-]{8,64}`, `model_hash` 16
//! lowercase hex). Files are created with `O_EXCL` and mode 0640, the directory 0750 if
//! missing. A name that exists already (the same session reconnecting or rotating within
//! one second) is bumped by one second until free.
//!
//! # Durability (the decision)
//! A `.jsonl.gz` file is written as one gzip stream with a **sync flush on a timer**: at
//! least every flush interval (default 100 ms, driven by the session's thread,
//! [`crate::session`]) the deflate state is sync-flushed and every byte handed to the OS.
//! A kill -9 of the recorder therefore loses at most the last interval, and everything
//! before it decodes (the reader reports the missing trailer as a truncation). The kernel
//! is asked to persist (`fsync`, file then directory) only on close: fsync per flush would
//! cost a disk round trip ten times a second per session for protection against power loss
//! only, which the seed does not promise. Rejected: one gzip member per flush (it resets the
//! dictionary, so files grow) and no compression until close (a crash loses everything).
//!
//! Closing writes the footer as **its own small gzip member** after the body's trailer, so
//! that start-up recovery can tell a closed file from its last few hundred bytes instead of
//! decompressing every file ([`footer_at_tail`]). Every gzip reader (`zcat`, Python's
//! `gzip`, ours) reads the two members as one text.
//!
//! # Compression level
//! Level 1 (zlib-rs' quick deflate), chosen by measurement; `--gzip-level` changes it.
//! Per 1000 hash_only records of 50×7 actions (`writer::tests::measure_levels` and the
//! daemon's `ingest_throughput`, run by hand; one core of a shared 2-core machine):
//!
//! | level | full-entropy f32 actions | smooth actions | writer CPU per record |
//! |---|---|---|---|
//! | plain | 4.9 MB | 4.9 MB | ~16 µs (JSON only) |
//! | 1 | 2.1–2.8 MB | 0.97 MB | ~46 µs |
//! | 2 | 1.4–1.9 MB | 0.68 MB | ~65 µs |
//! | 6 | 1.8 MB | 0.46 MB | ~170 µs |
//!
//! The whole ingest path (socket, decode, convert, JSON, gzip, write) at level 1 costs
//! 45–56 µs of recorder CPU per record, i.e. 18,000–22,000 records/s on one core; level 2
//! would cost a third more for files a third smaller. The seed's 0.9 MB per 1000 records is
//! out of reach for real policy outputs whatever the level: a 350-value chunk of f32 with
//! noisy low bits holds over 1 KB of entropy, and the reader must get every bit back. Only
//! smooth, low-entropy chunks get there.
//!
//! # Errors
//! Any write error (ENOSPC included) is returned as [`WriteError::Write`] and poisons the
//! writer: later writes fail fast without touching the file, so dropping a failed writer
//! never appends a stray trailer after a gap. Nothing here panics on I/O.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::clock::UtcTime;
use crate::trace::{self, Footer, Header, Record, RequestRecord};

/// Mode of trace files.
pub const FILE_MODE: u32 = 0o640;
/// Mode of the trace directory when the recorder creates it.
pub const DIR_MODE: u32 = 0o750;
/// Default gzip level (see the module comment).
pub const DEFAULT_LEVEL: u32 = 1;
/// How many one-second bumps a taken name gets before giving up.
const NAME_TRIES: i64 = 120;

/// How a file is written.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// `.jsonl.gz` (true) or plain `.jsonl`.
    pub gzip: bool,
    /// gzip level 0–9.
    pub level: u32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            gzip: true,
            level: DEFAULT_LEVEL,
        }
    }
}

/// Why a trace file could not be created or written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("session_id {0:?} is not 8 to 64 characters of [0-9A-Za-z-]")]
    InvalidSessionId(String),
    #[error("model_hash {0:?} is not 16 lowercase hex digits")]
    InvalidModelHash(String),
    #[error("cannot create trace directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot create trace file {}: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("no free trace file name for session {session_id} in {} after {NAME_TRIES} tries", dir.display())]
    NameTaken { dir: PathBuf, session_id: String },
    #[error("cannot write trace file {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

impl WriteError {
    /// Errors caused by what the client sent (the rest are the disk's).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            WriteError::InvalidSessionId(_) | WriteError::InvalidModelHash(_)
        )
    }

    /// Whether the disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        let source = match self {
            WriteError::CreateDir { source, .. }
            | WriteError::Create { source, .. }
            | WriteError::Write { source, .. } => source,
            _ => return false,
        };
        matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        )
    }
}

/// Checks a client's session id before it is used in a file name.
pub fn check_session_id(id: &str) -> Result<(), WriteError> {
    let ok =
        (8..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(WriteError::InvalidSessionId(clip(id)))
    }
}

/// Checks a model hash before its first 8 characters are used in a file name.
pub fn check_model_hash(hash: &str) -> Result<(), WriteError> {
    let ok = hash.len() == 16
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(WriteError::InvalidModelHash(clip(hash)))
    }
}

/// A hostile value is quoted in errors and logs only in part.
fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// `<YYYYMMDD>-<HHMMSS>-<model_hash[..8]>-<session_id>.jsonl[.gz]`, from validated parts.
pub fn file_name(
    time: UtcTime,
    model_hash: &str,
    session_id: &str,
    gzip: bool,
) -> Result<String, WriteError> {
    check_session_id(session_id)?;
    check_model_hash(model_hash)?;
    let ext = if gzip { "jsonl.gz" } else { "jsonl" };
    Ok(format!(
        "{}-{}-{session_id}.{ext}",
        time.file_stamp(),
        &model_hash[..8]
    ))
}

/// Creates the trace directory (0750) if it does not exist.
pub fn ensure_dir(dir: &Path) -> Result<(), WriteError> {
    if dir.is_dir() {
        return Ok(());
    }
    let err = |source| WriteError::CreateDir {
        path: dir.to_path_buf(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(err)?;
    // The umask may have taken bits off; the mode is part of the contract.
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(err)
}

/// Creates a new file with `O_EXCL` and mode 0640 exactly (whatever the umask).
pub(crate) fn create_exclusive(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// fsyncs a directory, so that entries created or renamed in it persist.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What a closed file amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedFile {
    pub path: PathBuf,
    pub file_name: String,
    pub records: u64,
    pub bytes: u64,
}

/// Writes one session's file: header on create, request records, footer on finish.
pub struct TraceWriter {
    sink: Sink,
    file_name: String,
    first_seq: u64,
    last_seq: Option<u64>,
    records: u64,
    line: Vec<u8>,
    dirty: bool,
}

impl TraceWriter {
    /// Creates the file for `header` in `dir` and writes the header (flushed to the OS at
    /// once, so even a file that dies young has a readable header).
    pub fn create(
        dir: &Path,
        header: &Header,
        opts: &WriterOptions,
    ) -> Result<TraceWriter, WriteError> {
        check_session_id(&header.session_id)?;
        check_model_hash(&header.model_hash)?;
        ensure_dir(dir)?;
        let now = UtcTime::now();
        for bump in 0..NAME_TRIES {
            let name = file_name(
                now.plus_secs(bump),
                &header.model_hash,
                &header.session_id,
                opts.gzip,
            )?;
            let path = dir.join(&name);
            match create_exclusive(&path) {
                Ok(file) => return Self::start(file, path, name, header, opts),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(WriteError::Create { path, source }),
            }
        }
        Err(WriteError::NameTaken {
            dir: dir.to_path_buf(),
            session_id: header.session_id.clone(),
        })
    }

    fn start(
        file: File,
        path: PathBuf,
        file_name: String,
        header: &Header,
        opts: &WriterOptions,
    ) -> Result<TraceWriter, WriteError> {
        let mut w = TraceWriter {
            sink: Sink::new(file, path, opts),
            file_name,
            first_seq: header.first_seq,
            last_seq: None,
            records: 0,
            line: Vec::with_capacity(8 * 1024),
            dirty: false,
        };
        w.encode(header)?;
        w.flush()?;
        Ok(w)
    }

    fn encode<T: trace::Kind>(&mut self, record: &T) -> Result<(), WriteError> {
        self.line.clear();
        trace::encode_line(record, &mut self.line).map_err(|e| {
            self.sink
                .error(io::Error::new(io::ErrorKind::InvalidData, e))
        })?;
        self.sink.write_all(&self.line)?;
        self.dirty = true;
        Ok(())
    }

    /// Appends one request record.
    pub fn write_request(&mut self, record: &RequestRecord) -> Result<(), WriteError> {
        self.encode(record)?;
        self.records += 1;
        self.last_seq = Some(self.last_seq.map_or(record.seq, |s| s.max(record.seq)));
        Ok(())
    }

    /// Sync-flushes the compressor and hands every byte to the OS (no fsync): after this,
    /// a kill -9 loses nothing written so far. A no-op when nothing was written since.
    pub fn flush(&mut self) -> Result<(), WriteError> {
        if self.dirty {
            self.sink.flush()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Footer numbers computed from the seqs in this file: `total_requests` spans
    /// `first_seq..=last_seq`, and what is missing from it was dropped.
    pub fn seq_totals(&self) -> (u64, u64) {
        let total = match self.last_seq {
            Some(last) => (last + 1).saturating_sub(self.first_seq).max(self.records),
            None => 0,
        };
        (total, total - self.records)
    }

    /// Writes the footer (its `records_written` is this file's), the gzip trailer, and
    /// fsyncs the file and its directory.
    pub fn finish(mut self, footer: &Footer) -> Result<ClosedFile, WriteError> {
        let footer = Footer {
            records_written: Some(self.records),
            ..footer.clone()
        };
        self.line.clear();
        trace::encode_line(&footer, &mut self.line).map_err(|e| {
            self.sink
                .error(io::Error::new(io::ErrorKind::InvalidData, e))
        })?;
        let bytes = self.sink.finish(&self.line)?;
        Ok(ClosedFile {
            path: self.sink.path.clone(),
            file_name: self.file_name,
            records: self.records,
            bytes,
        })
    }

    /// Full path of the file.
    pub fn path(&self) -> &Path {
        &self.sink.path
    }

    /// File name (no directory).
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// Request records written.
    pub fn records_written(&self) -> u64 {
        self.records
    }

    /// Bytes handed to the OS so far (compressed size; the compressor holds some back
    /// between flushes).
    pub fn bytes_written(&self) -> u64 {
        self.sink.bytes()
    }

    /// Highest seq written.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Test hook: from now on the bytes go to `file` (for example `/dev/full`).
    #[cfg(test)]
    pub(crate) fn redirect(&mut self, file: File) {
        self.sink.counted_mut().file = file;
    }
}

/// The byte end of a trace file: gzip or plain, counting, fail-fast after an error.
pub(crate) struct Sink {
    kind: SinkKind,
    path: PathBuf,
    level: u32,
}

enum SinkKind {
    Gzip(GzEncoder<Counted>),
    Plain(BufWriter<Counted>),
    /// While finishing.
    Gone,
}

impl Sink {
    pub(crate) fn new(file: File, path: PathBuf, opts: &WriterOptions) -> Sink {
        let counted = Counted {
            file,
            bytes: 0,
            failed: false,
        };
        let kind = if opts.gzip {
            SinkKind::Gzip(GzEncoder::new(counted, Compression::new(opts.level.min(9))))
        } else {
            SinkKind::Plain(BufWriter::with_capacity(64 * 1024, counted))
        };
        Sink {
            kind,
            path,
            level: opts.level.min(9),
        }
    }

    fn error(&mut self, source: io::Error) -> WriteError {
        if let Some(c) = self.counted_opt() {
            c.failed = true;
        }
        WriteError::Write {
            path: self.path.clone(),
            source,
        }
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        let res = match &mut self.kind {
            SinkKind::Gzip(g) => g.write_all(bytes),
            SinkKind::Plain(p) => p.write_all(bytes),
            SinkKind::Gone => Ok(()),
        };
        res.map_err(|e| self.error(e))
    }

    pub(crate) fn flush(&mut self) -> Result<(), WriteError> {
        let res = match &mut self.kind {
            // `flush` on a flate2 writer is a Z_SYNC_FLUSH followed by a write of
            // everything compressed so far; `Counted` writes straight to the fd.
            SinkKind::Gzip(g) => g.flush(),
            SinkKind::Plain(p) => p.flush(),
            SinkKind::Gone => Ok(()),
        };
        res.map_err(|e| self.error(e))
    }

    /// Ends the body, appends `last_line` (a gzip member of its own when compressed),
    /// fsyncs the file and the directory. Returns the file's size.
    pub(crate) fn finish(&mut self, last_line: &[u8]) -> Result<u64, WriteError> {
        let res = (|| -> io::Result<Counted> {
            match std::mem::replace(&mut self.kind, SinkKind::Gone) {
                SinkKind::Gzip(g) => {
                    let counted = g.finish()?;
                    let mut tail = GzEncoder::new(counted, Compression::new(self.level));
                    tail.write_all(last_line)?;
                    tail.finish()
                }
                SinkKind::Plain(mut p) => {
                    p.write_all(last_line)?;
                    p.into_inner().map_err(|e| e.into_error())
                }
                SinkKind::Gone => Err(io::Error::other("trace file already finished")),
            }
        })();
        let counted = res.map_err(|e| WriteError::Write {
            path: self.path.clone(),
            source: e,
        })?;
        let sync = counted
            .file
            .sync_all()
            .and_then(|()| match self.path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
                _ => Ok(()),
            });
        sync.map_err(|source| WriteError::Write {
            path: self.path.clone(),
            source,
        })?;
        Ok(counted.bytes)
    }

    pub(crate) fn bytes(&self) -> u64 {
        match &self.kind {
            SinkKind::Gzip(g) => g.get_ref().bytes,
            SinkKind::Plain(p) => p.get_ref().bytes,
            SinkKind::Gone => 0,
        }
    }

    fn counted_opt(&mut self) -> Option<&mut Counted> {
        match &mut self.kind {
            SinkKind::Gzip(g) => Some(g.get_mut()),
            SinkKind::Plain(p) => Some(p.get_mut()),
            SinkKind::Gone => None,
        }
    }

    #[cfg(test)]
    fn counted_mut(&mut self) -> &mut Counted {
        self.counted_opt().expect("sink in use")
    }
}

/// The file under the compressor: counts bytes and refuses to write after a failure.
struct Counted {
    file: File,
    bytes: u64,
    failed: bool,
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io::Error::other(
                "an earlier write to this trace file failed",
            ));
        }
        match self.file.write(buf) {
            Ok(n) => {
                self.bytes += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether `path` ends with a footer written by [`TraceWriter::finish`] (its own gzip
/// member, or the last line of a plain file), read from the last few KiB only. `false`
/// means "not known closed": the caller reads the whole file to decide.
pub fn footer_at_tail(path: &Path) -> io::Result<bool> {
    const TAIL: u64 = 4096;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity(TAIL as usize);
    file.read_to_end(&mut tail)?;
    let is_footer = |line: &[u8]| {
        line.last() == Some(&b'\n')
            && !line[..line.len() - 1].contains(&b'\n')
            && matches!(
                trace::parse_line(&line[..line.len() - 1]),
                Ok(Record::Footer(_))
            )
    };
    let mut head = [0u8; 2];
    file.seek(SeekFrom::Start(0))?;
    let gzip = file.read_exact(&mut head).is_ok() && head == [0x1f, 0x8b];
    if !gzip {
        let body = tail.strip_suffix(b"\n").unwrap_or(&[]);
        let from = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        return Ok((start > 0 || from > 0) && is_footer(&tail[from..]));
    }
    // The footer member starts at the last gzip magic from which one whole member decodes
    // to exactly the end of the file (its CRC makes a false match practically impossible).
    for at in (1..tail.len().saturating_sub(18)).rev() {
        if tail[at..].starts_with(&[0x1f, 0x8b, 0x08]) {
            let mut member = &tail[at..];
            let mut dec = flate2::bufread::GzDecoder::new(&mut member);
            let mut out = Vec::new();
            if dec.by_ref().take(TAIL).read_to_end(&mut out).is_ok() && member.is_empty() {
                return Ok(is_footer(&out));
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::TraceReader;
    use crate::trace::ImageMode;

    fn header(session: &str) -> Header {
        Header {
            model_hash: "7a8b3c1d9f2e4a55".into(),
            session_id: session.into(),
            ..Default::default()
        }
    }

    fn request(seq: u64) -> RequestRecord {
        crate::trace::tests::sample_request(seq)
    }

    #[test]
    fn names_are_validated_and_made_here() {
        let t = UtcTime::from_unix(1_777_050_785, 0);
        assert_eq!(
            file_name(t, "7a8b3c1d9f2e4a55", "c9d4f0ea", true).unwrap(),
            "20260424-171305-7a8b3c1d-c9d4f0ea.jsonl.gz"
        );
        assert_eq!(
            file_name(t, "7a8b3c1d9f2e4a55", "c9d4f0ea", false).unwrap(),
            "20260424-171305-7a8b3c1d-c9d4f0ea.jsonl"
        );
        for bad in [
            "../../etc/x",
            "short",
            "has space-0001",
            "a/b-cdefgh",
            "x".repeat(65).as_str(),
            "ünïcode-0001",
            "",
        ] {
            assert!(check_session_id(bad).is_err(), "{bad}");
        }
        for bad in [
            "7A8B3C1D9F2E4A55",
            "7a8b3c1d",
            "7a8b3c1d9f2e4a55ff",
            "../../../etc/pas",
            "",
        ] {
            assert!(check_model_hash(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let e = TraceWriter::create(
            dir.path(),
            &header("../../etc/x"),
            &WriterOptions::default(),
        )
        .err()
        .unwrap();
        assert!(e.is_invalid_input());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing created"
        );
    }

    #[test]
    fn creates_files_0640_in_a_0750_dir_and_bumps_taken_names() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("traces/nested");
        let h = header("c9d4f0ea-0001");
        let opts = WriterOptions::default();
        let a = TraceWriter::create(&dir, &h, &opts).unwrap();
        let b = TraceWriter::create(&dir, &h, &opts).unwrap();
        let c = TraceWriter::create(&dir, &h, &opts).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            DIR_MODE
        );
        let names = [a.file_name(), b.file_name(), c.file_name()];
        assert!(names[0] < names[1] && names[1] < names[2], "{names:?}");
        for w in [&a, &b, &c] {
            assert_eq!(
                fs::metadata(w.path()).unwrap().permissions().mode() & 0o777,
                FILE_MODE
            );
            assert!(w.file_name().ends_with("-7a8b3c1d-c9d4f0ea-0001.jsonl.gz"));
        }
    }

    #[test]
    fn writes_header_records_footer_gzip_and_plain() {
        let dir = tempfile::tempdir().unwrap();
        for gzip in [true, false] {
            let mut h = header(if gzip { "sessiongz" } else { "sessionplain" });
            h.first_seq = 10;
            let mut w = TraceWriter::create(
                dir.path(),
                &h,
                &WriterOptions {
                    gzip,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(w.file_name().ends_with(".gz"), gzip);
            for seq in [10, 11, 13, 14] {
                w.write_request(&request(seq)).unwrap();
            }
            assert_eq!(w.seq_totals(), (5, 1));
            let closed = w
                .finish(&Footer {
                    ended_reason: "shutdown".into(),
                    total_requests: 5,
                    dropped_requests: Some(1),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(closed.bytes, fs::metadata(&closed.path).unwrap().len());
            assert!(footer_at_tail(&closed.path).unwrap());
            let mut r = TraceReader::open(&closed.path).unwrap();
            assert_eq!(r.header(), &h);
            let recs: Vec<_> = r.by_ref().collect::<Result<_, _>>().unwrap();
            assert_eq!(recs.len(), 5);
            assert_eq!(recs[2], Record::Request(Box::new(request(13))));
            let Record::Footer(f) = &recs[4] else {
                panic!()
            };
            assert_eq!(f.records_written, Some(4));
            assert!(r.truncation().is_none());
        }
    }

    #[test]
    fn flushed_records_survive_a_kill() {
        // What a kill -9 leaves: the bytes in the file at the moment, no trailer.
        let dir = tempfile::tempdir().unwrap();
        let mut w = TraceWriter::create(
            dir.path(),
            &header("killed-0001"),
            &WriterOptions::default(),
        )
        .unwrap();
        for seq in 0..100 {
            w.write_request(&request(seq)).unwrap();
        }
        w.flush().unwrap();
        for seq in 100..103 {
            w.write_request(&request(seq)).unwrap();
        }
        let snapshot = dir.path().join("snapshot.jsonl.gz");
        fs::copy(w.path(), &snapshot).unwrap();
        assert!(!footer_at_tail(&snapshot).unwrap());
        let mut r = TraceReader::open(&snapshot).unwrap();
        let n = r.by_ref().inspect(|x| assert!(x.is_ok())).count();
        assert!((100..=103).contains(&n), "{n}");
        assert!(r.truncation().is_some());
    }

    #[test]
    fn write_error_is_returned_and_poisons() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TraceWriter::create(
            dir.path(),
            &header("diskfull-0001"),
            &WriterOptions::default(),
        )
        .unwrap();
        let before = fs::read(w.path()).unwrap();
        w.redirect(OpenOptions::new().write(true).open("/dev/full").unwrap());
        let mut err = None;
        for seq in 0..500 {
            if let Err(e) = w.write_request(&request(seq)).and_then(|()| w.flush()) {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("/dev/full refuses writes");
        assert!(err.is_disk_full(), "{err}");
        assert!(matches!(err, WriteError::Write { .. }));
        assert!(w.write_request(&request(1)).is_err(), "poisoned");
        drop(w);
        assert_eq!(
            fs::read(
                dir.path().join(
                    fs::read_dir(dir.path())
                        .unwrap()
                        .next()
                        .unwrap()
                        .unwrap()
                        .file_name()
                )
            )
            .unwrap(),
            before
        );
    }

    #[test]
    fn footer_at_tail_is_false_for_foreign_or_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl.gz");
        // One member holding everything (as another tool writes it): not known closed.
        let mut text = Vec::new();
        trace::encode_line(&header("abcdefgh"), &mut text).unwrap();
        trace::encode_line(&Footer::default(), &mut text).unwrap();
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(&text).unwrap();
        fs::write(&p, e.finish().unwrap()).unwrap();
        assert!(!footer_at_tail(&p).unwrap());
        fs::write(&p, &text).unwrap();
        assert!(
            footer_at_tail(&p).unwrap(),
            "plain: the last line is enough"
        );
        fs::write(&p, &text[..text.len() - 1]).unwrap();
        assert!(!footer_at_tail(&p).unwrap());
        fs::write(&p, b"").unwrap();
        assert!(!footer_at_tail(&p).unwrap());
    }

    /// Size and speed per compression level (run by hand:
    /// `cargo test -p reflex-recorder --release measure_levels -- --ignored --nocapture`).
    #[test]
    #[ignore = "benchmark: cargo test -p reflex-recorder --release measure_levels -- --ignored --nocapture"]
    fn measure_levels() {
        use std::time::Instant;
        let dir = tempfile::tempdir().unwrap();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rng = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32
        };
        let make = |kind: &str, rng: &mut dyn FnMut() -> f32| -> Vec<RequestRecord> {
            (0..1000u64)
                .map(|seq| {
                    let mut act = crate::trace::tests::sample_act(seq, b"image");
                    act.actions = (0..350)
                        .map(|i| match kind {
                            // Uniform in [-1, 1): every mantissa bit is noise.
                            "random" => rng() * 2.0 - 1.0,
                            // A smooth trajectory computed in f32 (a policy's chunk looks so).
                            _ => {
                                ((seq as f32) * 0.05 + (i / 7) as f32 * 0.02 + (i % 7) as f32).sin()
                                    * 0.8
                            }
                        })
                        .collect();
                    act.num_actions = 50;
                    act.request.as_mut().unwrap().state = (0..8).map(|_| rng()).collect();
                    RequestRecord::from_act(act, ImageMode::HashOnly)
                })
                .collect()
        };
        for kind in ["random", "smooth"] {
            let recs = make(kind, &mut rng);
            for level in [0u32, 1, 2, 3, 6, 9] {
                let h = header(&format!("level{level}-{kind}"));
                let t = Instant::now();
                let mut w = TraceWriter::create(
                    dir.path(),
                    &h,
                    &WriterOptions {
                        gzip: level > 0,
                        level,
                    },
                )
                .unwrap();
                for r in &recs {
                    w.write_request(r).unwrap();
                }
                let closed = w.finish(&Footer::default()).unwrap();
                let secs = t.elapsed().as_secs_f64();
                println!(
                    "{kind:>6} level {level}: {:.3} MB per 1000 records, {:.0} records/s (encode + compress + write)",
                    closed.bytes as f64 / 1e6,
                    1000.0 / secs
                );
            }
        }
    }
}
