//! The trace reader: the one way into a trace file (the replayer and start-up recovery both
//! read through it).
//!
//! It opens `.jsonl` or `.jsonl.gz` (gzip is recognised by its magic bytes, multi-member
//! streams included), reads the header eagerly, then yields the records after it. Every line
//! is dispatched on its `schema_version` by [`crate::trace::parse_line`].
//!
//! **A tail cut by a crash is not an error.** A gzip stream that ends without its trailer,
//! a last line without `\n`, or a last line that is cut JSON: the reader yields every whole
//! line before the cut and then reports [`Truncation`] (line number and why) instead of
//! failing. A bad line *followed by more lines* is damage, not a cut, and is an error.
//!
//! **Memory is bounded by the longest line allowed**, not by the file: a line longer than
//! [`MAX_LINE_BYTES`] (or the limit given to [`TraceReader::open_with_max_line`]) is
//! [`ReadError::LineTooLong`], found before more than the limit is buffered. Without the
//! bound a one-megabyte gzip bomb (a gigabyte of bytes with no newline) made the reader
//! allocate the whole gigabyte and more.
//!
//! Speed: gzip is inflated on a helper thread into 1 MiB chunks (bounded: four in flight)
//! while the caller's thread splits and parses lines, so reading costs about as much as
//! the slower of the two rather than their sum; one reused line buffer; typed serde
//! straight from the bytes (no intermediate `serde_json::Value`). Where no thread can be
//! started, inflating happens inline.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use flate2::bufread::MultiGzDecoder;

use crate::trace::{self, Footer, Header, LineError, Record};

const BUF_SIZE: usize = 256 * 1024;

/// Longest line [`TraceReader::open`] accepts, newline excluded: 256 MiB. The recorder's
/// largest message by default is 32 MiB, whose line (images in base64, floats as text) stays
/// well under 64 MiB; the bound leaves room for raised limits while keeping what one hostile
/// file can make a reader allocate to a fixed size.
pub const MAX_LINE_BYTES: usize = 256 * 1024 * 1024;

/// Why reading a trace stopped with an error. Every variant names the file; those about
/// one line name it 1-based.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot open trace {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read trace {} at line {line}: {source}", path.display())]
    Io {
        path: PathBuf,
        line: u64,
        source: io::Error,
    },
    #[error("trace {} is corrupt (gzip) at line {line}: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        line: u64,
        source: io::Error,
    },
    #[error("trace {} has no header: {what}", path.display())]
    NoHeader {
        path: PathBuf,
        line: u64,
        what: String,
    },
    #[error("{}:{line}: unknown schema_version {version} (this reader knows {})", path.display(), trace::SCHEMA_VERSION)]
    UnknownSchemaVersion {
        path: PathBuf,
        line: u64,
        version: String,
    },
    #[error("{}:{line}: malformed record: {source}", path.display())]
    Malformed {
        path: PathBuf,
        line: u64,
        source: serde_json::Error,
    },
    #[error("{}:{line}: unknown record kind {kind}", path.display())]
    UnknownKind {
        path: PathBuf,
        line: u64,
        kind: String,
    },
    #[error("{}:{line}: line is longer than {limit} bytes; no trace record is that long", path.display())]
    LineTooLong {
        path: PathBuf,
        line: u64,
        limit: usize,
    },
}

impl ReadError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ReadError::Open { path, .. }
            | ReadError::Io { path, .. }
            | ReadError::Corrupt { path, .. }
            | ReadError::NoHeader { path, .. }
            | ReadError::UnknownSchemaVersion { path, .. }
            | ReadError::Malformed { path, .. }
            | ReadError::UnknownKind { path, .. }
            | ReadError::LineTooLong { path, .. } => path,
        }
    }

    /// The 1-based line the error is about (0 for errors about the whole file).
    pub fn line(&self) -> u64 {
        match self {
            ReadError::Open { .. } => 0,
            ReadError::Io { line, .. }
            | ReadError::Corrupt { line, .. }
            | ReadError::NoHeader { line, .. }
            | ReadError::UnknownSchemaVersion { line, .. }
            | ReadError::Malformed { line, .. }
            | ReadError::UnknownKind { line, .. }
            | ReadError::LineTooLong { line, .. } => *line,
        }
    }
}

/// Where and why a file ends early. Everything before `line` was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// 1-based number of the first line that is missing or incomplete.
    pub line: u64,
    pub reason: TruncationReason,
}

/// How the tail was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TruncationReason {
    /// The gzip stream ends without its trailer (the writer never closed the file).
    GzipTrailerMissing,
    /// The last line has no `\n` (it was read if it is a whole record).
    NoFinalNewline,
    /// The last line is not a whole record (the JSON error says where it stops).
    CutRecord(String),
}

impl std::fmt::Display for Truncation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            TruncationReason::GzipTrailerMissing => {
                write!(f, "gzip stream ends without trailer at line {}", self.line)
            }
            TruncationReason::NoFinalNewline => {
                write!(f, "line {} has no final newline", self.line)
            }
            TruncationReason::CutRecord(e) => write!(f, "line {} is cut: {e}", self.line),
        }
    }
}

/// Reads one trace file: the header on [`TraceReader::open`], then records one by one
/// ([`TraceReader::next_record`] or the `Iterator` impl, which stops after the first error).
pub struct TraceReader {
    path: PathBuf,
    input: Input,
    header: Header,
    header_line: Vec<u8>,
    line: Vec<u8>,
    max_line: usize,
    line_no: u64,
    bytes_read: u64,
    requests_read: u64,
    footer: Option<Footer>,
    truncation: Option<Truncation>,
    done: bool,
}

type Inflater = MultiGzDecoder<BufReader<Counted<File>>>;

enum Input {
    Plain(BufReader<Counted<File>>),
    Gzip(Box<BufReader<Inflater>>),
    Threaded(Chunks),
}

/// What one attempt to read a line found.
enum Got {
    /// A `\n`-terminated line (the newline is stripped).
    Whole,
    /// Bytes at the end of a plain file without a newline.
    Unterminated,
    /// The gzip stream stopped without its trailer; the buffer holds what came before.
    StreamCut,
    Eof,
}

impl TraceReader {
    /// Opens a trace and reads its header; lines may be up to [`MAX_LINE_BYTES`] long.
    pub fn open(path: impl AsRef<Path>) -> Result<TraceReader, ReadError> {
        TraceReader::open_with_max_line(path, MAX_LINE_BYTES)
    }

    /// Like [`TraceReader::open`], with another bound on the length of a line (newline
    /// excluded): a longer line is [`ReadError::LineTooLong`], and at most `max_line` bytes of
    /// it are ever buffered.
    pub fn open_with_max_line(
        path: impl AsRef<Path>,
        max_line: usize,
    ) -> Result<TraceReader, ReadError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| ReadError::Open {
            path: path.clone(),
            source,
        })?;
        let mut raw = BufReader::with_capacity(
            BUF_SIZE,
            Counted {
                inner: file,
                count: 0,
            },
        );
        let magic = raw.fill_buf().map_err(|source| ReadError::Open {
            path: path.clone(),
            source,
        })?;
        let input = if magic.starts_with(&[0x1f, 0x8b]) {
            Chunks::spawn(MultiGzDecoder::new(raw))
        } else {
            Input::Plain(raw)
        };
        let mut reader = TraceReader {
            path,
            input,
            header: Header::default(),
            header_line: Vec::new(),
            line: Vec::with_capacity(16 * 1024),
            max_line,
            line_no: 0,
            bytes_read: 0,
            requests_read: 0,
            footer: None,
            truncation: None,
            done: false,
        };
        reader.read_header()?;
        Ok(reader)
    }

    fn read_header(&mut self) -> Result<(), ReadError> {
        let got = loop {
            let got = self.read_line()?;
            if !matches!(got, Got::Whole) || !is_blank(&self.line) {
                break got;
            }
        };
        let no_header = |this: &Self, what: &str| ReadError::NoHeader {
            path: this.path.clone(),
            line: this.line_no.max(1),
            what: what.to_string(),
        };
        match got {
            Got::Eof => return Err(no_header(self, "the file is empty")),
            Got::StreamCut if self.line.is_empty() => {
                return Err(no_header(
                    self,
                    "the gzip stream ends before the first line",
                ));
            }
            _ => {}
        }
        let record = match trace::parse_line(&self.line) {
            Ok(r) => r,
            Err(LineError::Malformed(_)) if !matches!(got, Got::Whole) => {
                return Err(no_header(self, "the file ends inside its first line"));
            }
            Err(e) => return Err(self.line_error(e)),
        };
        match record {
            Record::Header(h) => {
                self.header = *h;
                self.header_line = std::mem::take(&mut self.line);
            }
            Record::Request(_) => return Err(no_header(self, "the first record is a request")),
            Record::Footer(_) => return Err(no_header(self, "the first record is a footer")),
        }
        match got {
            Got::Unterminated | Got::StreamCut => {
                self.done = true;
                self.truncation = Some(Truncation {
                    line: self.line_no + u64::from(matches!(got, Got::StreamCut)),
                    reason: if matches!(got, Got::StreamCut) {
                        TruncationReason::GzipTrailerMissing
                    } else {
                        TruncationReason::NoFinalNewline
                    },
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// The header (first record).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The header's line as it is in the file (no newline).
    pub fn header_line(&self) -> &[u8] {
        &self.header_line
    }

    /// The path given to [`TraceReader::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw bytes (no newline) of the line of the last record returned.
    pub fn last_line(&self) -> &[u8] {
        &self.line
    }

    /// 1-based number of the last line read.
    pub fn line_number(&self) -> u64 {
        self.line_no
    }

    /// How the file ends early, once reading has reached the end.
    pub fn truncation(&self) -> Option<&Truncation> {
        self.truncation.as_ref()
    }

    /// The footer, once it has been read.
    pub fn footer(&self) -> Option<&Footer> {
        self.footer.as_ref()
    }

    /// Request records returned so far.
    pub fn requests_read(&self) -> u64 {
        self.requests_read
    }

    /// Decoded (JSON) bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Bytes of the file itself consumed so far (compressed size for `.gz`).
    pub fn file_bytes_read(&self) -> u64 {
        match &self.input {
            Input::Plain(r) => r.get_ref().count - r.buffer().len() as u64,
            Input::Gzip(r) => file_position(r.get_ref()),
            Input::Threaded(c) => c.file_bytes,
        }
    }

    /// Whether the file is gzip.
    pub fn is_gzip(&self) -> bool {
        matches!(self.input, Input::Gzip(_) | Input::Threaded(_))
    }

    /// The next record after the header; `Ok(None)` at the end (see [`Self::truncation`]).
    pub fn next_record(&mut self) -> Result<Option<Record>, ReadError> {
        while !self.done {
            let got = self.read_line()?;
            match got {
                Got::Eof => {
                    self.done = true;
                    return Ok(None);
                }
                Got::Whole if is_blank(&self.line) => continue,
                Got::StreamCut if self.line.is_empty() => {
                    self.done = true;
                    self.truncate(self.line_no + 1, TruncationReason::GzipTrailerMissing);
                    return Ok(None);
                }
                _ => {}
            }
            let parsed = trace::parse_line(&self.line);
            let whole = matches!(got, Got::Whole);
            match parsed {
                Ok(record) => {
                    if !whole {
                        // A whole record without its newline: read it, and report the cut
                        // where the next line would have been (gzip) or on this line
                        // (plain, where the missing newline is all that is wrong).
                        self.done = true;
                        if matches!(got, Got::StreamCut) {
                            self.truncate(self.line_no + 1, TruncationReason::GzipTrailerMissing);
                        } else {
                            self.truncate(self.line_no, TruncationReason::NoFinalNewline);
                        }
                    }
                    match &record {
                        Record::Request(_) => self.requests_read += 1,
                        Record::Footer(f) => self.footer = Some(f.clone()),
                        Record::Header(_) => {}
                    }
                    return Ok(Some(record));
                }
                Err(LineError::Malformed(e)) if !whole || self.at_end() => {
                    self.done = true;
                    self.truncate(self.line_no, TruncationReason::CutRecord(e.to_string()));
                    return Ok(None);
                }
                Err(e) => {
                    self.done = true;
                    return Err(self.line_error(e));
                }
            }
        }
        Ok(None)
    }

    fn truncate(&mut self, line: u64, reason: TruncationReason) {
        self.truncation.get_or_insert(Truncation { line, reason });
    }

    /// Whether nothing but a clean end or a cut gzip stream follows the current line.
    fn at_end(&mut self) -> bool {
        let peek = match &mut self.input {
            Input::Plain(r) => r.fill_buf().map(|b| b.is_empty()),
            Input::Gzip(r) => r.fill_buf().map(|b| b.is_empty()),
            Input::Threaded(r) => r.fill_buf().map(|b| b.is_empty()),
        };
        match peek {
            Ok(empty) => empty,
            Err(e) => e.kind() == io::ErrorKind::UnexpectedEof,
        }
    }

    fn read_line(&mut self) -> Result<Got, ReadError> {
        self.line.clear();
        let (res, gzip) = match &mut self.input {
            Input::Plain(r) => (read_line_bounded(r, &mut self.line, self.max_line), false),
            Input::Gzip(r) => (
                read_line_bounded(r.as_mut(), &mut self.line, self.max_line),
                true,
            ),
            Input::Threaded(r) => (read_line_bounded(r, &mut self.line, self.max_line), true),
        };
        self.bytes_read += self.line.len() as u64;
        if !self.line.is_empty() {
            self.line_no += 1;
        }
        match res {
            Ok(Line::TooLong) => {
                self.done = true;
                Err(ReadError::LineTooLong {
                    path: self.path.clone(),
                    line: self.line_no.max(1),
                    limit: self.max_line,
                })
            }
            Ok(Line::Read(0)) => Ok(Got::Eof),
            Ok(Line::Read(_)) if self.line.last() == Some(&b'\n') => {
                self.line.pop();
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                Ok(Got::Whole)
            }
            Ok(Line::Read(_)) => Ok(Got::Unterminated),
            Err(e) if gzip && e.kind() == io::ErrorKind::UnexpectedEof => Ok(Got::StreamCut),
            Err(e)
                if gzip
                    && matches!(
                        e.kind(),
                        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData
                    ) =>
            {
                self.done = true;
                Err(ReadError::Corrupt {
                    path: self.path.clone(),
                    line: self.line_no.max(1),
                    source: e,
                })
            }
            Err(e) => {
                self.done = true;
                Err(ReadError::Io {
                    path: self.path.clone(),
                    line: self.line_no.max(1),
                    source: e,
                })
            }
        }
    }

    fn line_error(&self, e: LineError) -> ReadError {
        let (path, line) = (self.path.clone(), self.line_no.max(1));
        match e {
            LineError::Malformed(source) => ReadError::Malformed { path, line, source },
            LineError::UnknownSchemaVersion(version) => ReadError::UnknownSchemaVersion {
                path,
                line,
                version,
            },
            LineError::UnknownKind(kind) => ReadError::UnknownKind { path, line, kind },
        }
    }
}

impl Iterator for TraceReader {
    type Item = Result<Record, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// Bytes of the file consumed by an inflater (what its input buffer holds is not).
fn file_position(inflater: &Inflater) -> u64 {
    let raw = inflater.get_ref();
    raw.get_ref().count - raw.buffer().len() as u64
}

/// What the inflating thread sends: a chunk and the file position after it, or the
/// error that ended it.
type ChunkMsg = Result<(Vec<u8>, u64), (io::ErrorKind, String)>;

/// Inflated bytes from the helper thread, as a `BufRead`.
struct Chunks {
    rx: mpsc::Receiver<ChunkMsg>,
    /// Emptied chunks go back to the thread for reuse.
    recycle: mpsc::SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    file_bytes: u64,
    /// An error is kept and returned again on every later call, as flate2's own reader
    /// does: the caller may look ahead and then read.
    error: Option<(io::ErrorKind, String)>,
    eof: bool,
}

const CHUNK: usize = 1 << 20;

impl Chunks {
    /// Starts the inflating thread; inline inflating where a thread cannot be had.
    fn spawn(inflater: Inflater) -> Input {
        let (tx, rx) = mpsc::sync_channel(4);
        let (recycle, spare) = mpsc::sync_channel::<Vec<u8>>(8);
        // The decoder moves into the thread only if the spawn succeeds; keep a way back.
        let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(inflater)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("trace-inflate".into())
            .spawn(move || {
                let taken = theirs.lock().ok().and_then(|mut s| s.take());
                if let Some(mut inflater) = taken {
                    inflate(&mut inflater, &tx, &spare);
                }
            });
        match spawned {
            Ok(_) => Input::Threaded(Chunks {
                rx,
                recycle,
                cur: Vec::new(),
                pos: 0,
                file_bytes: 0,
                error: None,
                eof: false,
            }),
            Err(_) => {
                let inflater = slot.lock().ok().and_then(|mut s| s.take());
                match inflater {
                    Some(inflater) => {
                        Input::Gzip(Box::new(BufReader::with_capacity(BUF_SIZE, inflater)))
                    }
                    // Unreachable: the thread never ran, so the decoder is still in the slot.
                    None => Input::Threaded(Chunks {
                        rx,
                        recycle,
                        cur: Vec::new(),
                        pos: 0,
                        file_bytes: 0,
                        error: Some((io::ErrorKind::Other, "inflating thread lost".into())),
                        eof: false,
                    }),
                }
            }
        }
    }
}

/// The helper thread: fills chunks until the end or an error, which it passes on. It
/// stops as soon as the reader is dropped (a send fails).
fn inflate(
    inflater: &mut Inflater,
    tx: &mpsc::SyncSender<ChunkMsg>,
    spare: &mpsc::Receiver<Vec<u8>>,
) {
    loop {
        let mut buf = spare.try_recv().unwrap_or_default();
        buf.resize(CHUNK, 0);
        let mut filled = 0;
        let mut end = None;
        while filled < CHUNK {
            match inflater.read(&mut buf[filled..]) {
                Ok(0) => {
                    end = Some(Ok(()));
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    end = Some(Err((e.kind(), e.to_string())));
                    break;
                }
            }
        }
        buf.truncate(filled);
        if filled > 0 && tx.send(Ok((buf, file_position(inflater)))).is_err() {
            return;
        }
        match end {
            None => {}
            Some(Ok(())) => return,
            Some(Err(e)) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

impl BufRead for Chunks {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos >= self.cur.len() {
            if let Some((kind, msg)) = &self.error {
                return Err(io::Error::new(*kind, msg.clone()));
            }
            if self.eof {
                return Ok(&[]);
            }
            match self.rx.recv() {
                Ok(Ok((chunk, file_bytes))) => {
                    let done = std::mem::replace(&mut self.cur, chunk);
                    let _ = self.recycle.try_send(done);
                    self.pos = 0;
                    self.file_bytes = file_bytes;
                }
                Ok(Err(e)) => self.error = Some(e),
                Err(mpsc::RecvError) => self.eof = true,
            }
        }
        Ok(&self.cur[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.cur.len());
    }
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// What [`read_line_bounded`] found.
enum Line {
    /// Bytes read, as `read_until` counts them (0 at the end of the input).
    Read(usize),
    /// No newline within the limit; the buffer holds the first `limit + 1` bytes.
    TooLong,
}

/// `read_until(b'\n')` that never buffers more than `limit` bytes of a line plus its newline.
/// The buffer grows by doubling up to that size and no further, so its capacity stays within
/// `limit + 1` however long the line is; std's `read_until` finds the newline (memchr).
fn read_line_bounded<R: BufRead + ?Sized>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Line> {
    let cap = limit.saturating_add(1);
    let mut total = 0;
    loop {
        if buf.len() >= cap {
            return Ok(Line::TooLong);
        }
        if buf.len() == buf.capacity() {
            let want = buf.capacity().saturating_mul(2).max(4096).min(cap);
            buf.reserve_exact(want - buf.len());
        }
        let room = buf.capacity().min(cap) - buf.len();
        let n = (&mut *r).take(room as u64).read_until(b'\n', buf)?;
        total += n;
        if n < room || buf.last() == Some(&b'\n') {
            // A newline, or the end of the input before the room was filled.
            return Ok(Line::Read(total));
        }
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Counts the bytes read from the file.
struct Counted<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{RequestRecord, encode_line};
    use crate::writer::{TraceWriter, WriterOptions};
    use std::io::Write;

    fn header() -> Header {
        Header {
            reflex_version: "0.1.0".into(),
            model_hash: "7a8b3c1d9f2e4a55".into(),
            session_id: "c9d4f0ea-0001".into(),
            ..Default::default()
        }
    }

    fn request(seq: u64) -> RequestRecord {
        crate::trace::tests::sample_request(seq)
    }

    fn lines(n: u64, footer: bool) -> Vec<u8> {
        let mut out = Vec::new();
        encode_line(&header(), &mut out).unwrap();
        for seq in 0..n {
            encode_line(&request(seq), &mut out).unwrap();
        }
        if footer {
            encode_line(
                &Footer {
                    total_requests: n,
                    ended_reason: "shutdown".into(),
                    ..Default::default()
                },
                &mut out,
            )
            .unwrap();
        }
        out
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// Reads everything; returns the request seqs, whether a footer came, and the truncation.
    fn read_all(path: &Path) -> Result<(Vec<u64>, bool, Option<Truncation>), ReadError> {
        let mut r = TraceReader::open(path)?;
        let mut seqs = Vec::new();
        let mut footer = false;
        while let Some(rec) = r.next_record()? {
            match rec {
                Record::Request(q) => seqs.push(q.seq),
                Record::Footer(_) => footer = true,
                Record::Header(_) => {}
            }
        }
        Ok((seqs, footer, r.truncation().cloned()))
    }

    #[test]
    fn reads_plain_and_gzip_alike() {
        let dir = tempfile::tempdir().unwrap();
        let text = lines(20, true);
        // The extension says nothing: gzip is told by its magic bytes.
        for (name, bytes) in [
            ("a.jsonl", text.clone()),
            ("b.jsonl.gz", gzip(&text)),
            ("c.jsonl", gzip(&text)),
        ] {
            let p = write(dir.path(), name, &bytes);
            let mut r = TraceReader::open(&p).unwrap();
            assert_eq!(r.header(), &header());
            let recs: Vec<_> = r.by_ref().collect::<Result<_, _>>().unwrap();
            assert_eq!(recs.len(), 21);
            assert_eq!(recs[5], Record::Request(Box::new(request(5))));
            assert!(r.truncation().is_none(), "{name}");
            assert_eq!(r.footer().unwrap().total_requests, 20);
            assert_eq!(r.requests_read(), 20);
            assert_eq!(r.bytes_read(), text.len() as u64);
            assert_eq!(r.file_bytes_read(), bytes.len() as u64);
        }
        // Multi-member gzip (two flushes written as separate members, or `cat a.gz b.gz`).
        let (a, b) = text.split_at(text.len() / 2);
        let mut multi = gzip(a);
        multi.extend(gzip(b));
        let p = write(dir.path(), "m.jsonl.gz", &multi);
        assert_eq!(read_all(&p).unwrap(), ((0..20).collect(), true, None));
    }

    #[test]
    fn reads_a_seed_trace() {
        // Written by hand after the seed page's example (Reflex 0.7).
        let seed = concat!(
            r#"{"kind":"header","schema_version":1,"reflex_version":"0.7.0","model_hash":"7a8b3c1d9f2e4a55","config_hash":"e12f44c7b1a93802","session_id":"c9d4f0ea","started_at":"2026-04-24T17:13:05Z","model_type":"pi0.5","export_kind":"decomposed","embodiment":"franka","hardware":{"gpu":"Jetson Orin","vram_gb":64},"redaction":{"image":"hash_only","instruction":"as_is"}}"#,
            "\n",
            r#"{"kind":"request","schema_version":1,"seq":0,"chunk_id":0,"timestamp":"2026-04-24T17:13:05.412Z","request":{"image_sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","instruction":"pick up the red cup","state":[0.1,0.2,0.3]},"response":{"actions":[[0.1,0.2],[0.3,0.4]],"num_actions":2,"action_dim":2},"latency":{"total_ms":98.0},"denoise":{"steps":10},"mode":"onnx_gpu"}"#,
            "\n",
            r#"{"kind":"request","schema_version":1,"seq":1,"chunk_id":1,"timestamp":"2026-04-24T17:13:05.512Z","request":{"image_b64":"aGk=","instruction":"pick up the red cup","state":[0.1,0.2,0.3]},"response":{"actions":[[0.5,0.6],[0.7,0.8]]},"latency":{"total_ms":103.0},"mode":"onnx_gpu","cache":{"status":"hit"}}"#,
            "\n",
            r#"{"kind":"footer","schema_version":1,"ended_at":"2026-04-24T17:20:00Z","total_requests":2}"#,
            "\n",
        );
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "20260424-171305-7a8b3c1d-c9d4f0ea.jsonl.gz",
            &gzip(seed.as_bytes()),
        );
        let mut r = TraceReader::open(&p).unwrap();
        assert_eq!(r.header().reflex_version, "0.7.0");
        assert_eq!(r.header().hardware["vram_gb"], "64");
        let Some(Record::Request(a)) = r.next_record().unwrap() else {
            panic!()
        };
        assert_eq!(a.mode, "onnx_gpu");
        assert_eq!(a.request.image_sha256.len(), 64);
        assert_eq!(a.response.actions, [0.1, 0.2, 0.3, 0.4]);
        assert_eq!(a.latency.total_ms, 98.0);
        assert_eq!(a.cache, None);
        let Some(Record::Request(b)) = r.next_record().unwrap() else {
            panic!()
        };
        assert_eq!(b.request.image_b64, b"hi");
        assert_eq!((b.response.num_actions, b.response.action_dim), (2, 2));
        assert_eq!(b.cache.as_ref().unwrap().status, "hit");
        let Some(Record::Footer(f)) = r.next_record().unwrap() else {
            panic!()
        };
        assert_eq!(
            (f.total_requests, f.dropped_requests, f.records_written),
            (2, None, None)
        );
        assert!(r.next_record().unwrap().is_none());
        assert!(r.truncation().is_none());
    }

    #[test]
    fn file_errors_say_which() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl.gz");
        assert!(matches!(
            TraceReader::open(&missing),
            Err(ReadError::Open { .. })
        ));

        let empty = write(dir.path(), "empty.jsonl", b"");
        let e = TraceReader::open(&empty).err().unwrap();
        assert!(matches!(e, ReadError::NoHeader { .. }), "{e}");
        assert!(e.to_string().contains("empty"), "{e}");

        let mut body = Vec::new();
        encode_line(&request(0), &mut body).unwrap();
        let p = write(dir.path(), "headless.jsonl", &body);
        let e = TraceReader::open(&p).err().unwrap();
        assert!(matches!(e, ReadError::NoHeader { line: 1, .. }), "{e}");

        let mut v2 = lines(3, true);
        let at = v2.len() / 2;
        let next = at + v2[at..].iter().position(|&b| b == b'\n').unwrap() + 1;
        v2.splice(
            next..next,
            br#"{"kind":"request","schema_version":2,"seq":99}"#
                .iter()
                .chain(b"\n")
                .copied(),
        );
        let p = write(dir.path(), "v2.jsonl", &v2);
        let e = read_all(&p).unwrap_err();
        match &e {
            ReadError::UnknownSchemaVersion { version, line, .. } => {
                assert_eq!(version, "2");
                assert_eq!(*line, 4);
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("unknown schema_version 2"), "{e}");
        // Even on the header line, and even as the last line.
        let p = write(
            dir.path(),
            "v3.jsonl",
            br#"{"kind":"header","schema_version":3}"#,
        );
        assert!(matches!(
            TraceReader::open(&p),
            Err(ReadError::UnknownSchemaVersion { line: 1, .. })
        ));

        let mut kinds = lines(2, false);
        kinds.extend(b"{\"kind\":\"metrics\",\"schema_version\":1}\n");
        let p = write(dir.path(), "kind.jsonl", &kinds);
        assert!(matches!(
            read_all(&p),
            Err(ReadError::UnknownKind { line: 4, .. })
        ));
    }

    #[test]
    fn malformed_middle_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let text = String::from_utf8(lines(5, true)).unwrap();
        let mut ls: Vec<&str> = text.lines().collect();
        ls[3] = r#"{"kind":"request","schema_version":1,"seq":2,"request":{"state":[1.0,"#;
        let broken = ls.join("\n") + "\n";
        for (name, bytes) in [
            ("m.jsonl", broken.as_bytes().to_vec()),
            ("m.jsonl.gz", gzip(broken.as_bytes())),
        ] {
            let p = write(dir.path(), name, &bytes);
            let mut r = TraceReader::open(&p).unwrap();
            assert!(matches!(r.next(), Some(Ok(Record::Request(_)))));
            assert!(matches!(r.next(), Some(Ok(Record::Request(_)))));
            match r.next() {
                Some(Err(ReadError::Malformed { line: 4, .. })) => {}
                other => panic!("{other:?}"),
            }
            assert!(r.next().is_none(), "the iterator stops after an error");
        }
    }

    #[test]
    fn cut_plain_file_reads_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let text = lines(10, true);
        let ends: Vec<usize> = text
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i + 1)
            .collect();
        // Mid-line in the 6th request (line 7): six whole requests, truncation at line 7.
        let cut = ends[6] + 40;
        let p = write(dir.path(), "cut.jsonl", &text[..cut]);
        let (seqs, footer, t) = read_all(&p).unwrap();
        assert_eq!(seqs, (0..6).collect::<Vec<_>>());
        assert!(!footer);
        let t = t.unwrap();
        assert_eq!(t.line, 8);
        assert!(matches!(t.reason, TruncationReason::CutRecord(_)), "{t}");
        // Cut right before a newline: the record is whole and read; the cut is still reported.
        let p = write(dir.path(), "nonl.jsonl", &text[..ends[6] - 1]);
        let (seqs, _, t) = read_all(&p).unwrap();
        assert_eq!(seqs.len(), 6);
        assert_eq!(t.unwrap().reason, TruncationReason::NoFinalNewline);
        // Cut in the header: nothing to read.
        let p = write(dir.path(), "head.jsonl", &text[..10]);
        assert!(matches!(
            TraceReader::open(&p),
            Err(ReadError::NoHeader { .. })
        ));
    }

    /// Truncates a real file written by the writer at many offsets, mid-line included.
    #[test]
    fn cut_gzip_stream_reads_up_to_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WriterOptions {
            gzip: true,
            ..Default::default()
        };
        let mut w = TraceWriter::create(dir.path(), &header(), &opts).unwrap();
        // The header is flushed on create: from this size on, the file has a header.
        let header_len = std::fs::metadata(w.path()).unwrap().len() as usize;
        let mut flushed_at = Vec::new();
        for seq in 0..300 {
            w.write_request(&request(seq)).unwrap();
            if seq % 50 == 49 {
                w.flush().unwrap();
                flushed_at.push((std::fs::metadata(w.path()).unwrap().len(), seq + 1));
            }
        }
        let closed = w
            .finish(&Footer {
                total_requests: 300,
                ..Default::default()
            })
            .unwrap();
        let full = std::fs::read(&closed.path).unwrap();
        assert_eq!(
            read_all(&closed.path).unwrap(),
            ((0..300).collect(), true, None)
        );

        let mut cuts: Vec<usize> = (1..40).map(|i| full.len() * i / 40).collect();
        cuts.extend([
            11,
            30,
            header_len - 1,
            header_len,
            full.len() - 1,
            full.len() - 8,
            full.len() - 9,
        ]);
        // Every byte around the first flush point, where cuts fall in practice.
        let first_flush = flushed_at[0].0 as usize;
        cuts.extend(first_flush - 64..first_flush + 64);
        cuts.sort();
        let mut last_seen = 0;
        for cut in cuts {
            let p = write(dir.path(), "cut.jsonl.gz", &full[..cut]);
            match read_all(&p) {
                Ok((seqs, footer, t)) => {
                    assert_eq!(
                        seqs,
                        (0..seqs.len() as u64).collect::<Vec<_>>(),
                        "cut at {cut}"
                    );
                    let t =
                        t.unwrap_or_else(|| panic!("cut at {cut} of {} not reported", full.len()));
                    assert_eq!(
                        t.line,
                        seqs.len() as u64 + 2 + u64::from(footer),
                        "cut at {cut}: {t}"
                    );
                    assert!(seqs.len() >= last_seen, "more bytes never read less");
                    last_seen = seqs.len();
                    // Everything flushed before the cut reads back.
                    for &(len, n) in &flushed_at {
                        if cut as u64 >= len {
                            assert!(seqs.len() as u64 >= n, "cut at {cut}: {} < {n}", seqs.len());
                        }
                    }
                }
                Err(ReadError::NoHeader { .. }) => assert!(cut < header_len, "cut at {cut}"),
                Err(e) => panic!("cut at {cut}: {e}"),
            }
        }
    }

    #[test]
    fn flipped_byte_is_a_clean_error() {
        let dir = tempfile::tempdir().unwrap();
        let full = gzip(&lines(200, true));
        let mut errors = 0;
        for i in 1..30 {
            let mut bad = full.clone();
            let at = bad.len() * i / 30;
            bad[at] ^= 0x55;
            let p = write(dir.path(), "flip.jsonl.gz", &bad);
            // Never a panic, never a silent success.
            match read_all(&p) {
                Err(e) => {
                    errors += 1;
                    assert!(e.to_string().contains("flip.jsonl.gz"), "{e}");
                }
                Ok((seqs, footer, t)) => {
                    assert!(
                        t.is_some() || !footer || seqs.len() < 200,
                        "flip at {at} went unnoticed"
                    );
                }
            }
        }
        assert!(errors >= 20, "{errors}");
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use crate::trace::{Footer, Header, ImageMode, RequestRecord};
    use crate::writer::{TraceWriter, WriterOptions};
    use std::time::Instant;

    /// Reader speed against `gzip -dc` on a 100,000-record file (run by hand:
    /// `cargo test -p reflex-recorder --release reader_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "benchmark: cargo test -p reflex-recorder --release reader_speed -- --ignored --nocapture"]
    fn reader_speed() {
        let dir = tempfile::tempdir().unwrap();
        let header = Header {
            model_hash: "7a8b3c1d9f2e4a55".into(),
            session_id: "bench-0001".into(),
            ..Default::default()
        };
        let mut w = TraceWriter::create(dir.path(), &header, &WriterOptions::default()).unwrap();
        let template = crate::trace::tests::sample_act(0, b"image");
        for seq in 0..100_000u64 {
            let mut act = template.clone();
            act.seq = seq;
            act.actions = (0..350)
                .map(|i| ((seq * 350 + i) as f32 * 0.37).sin())
                .collect();
            act.num_actions = 50;
            w.write_request(&RequestRecord::from_act(act, ImageMode::HashOnly))
                .unwrap();
        }
        let closed = w.finish(&Footer::default()).unwrap();

        let t = Instant::now();
        let out = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&closed.path)
            .stdout(std::process::Stdio::null())
            .status();
        let gzip_secs = t.elapsed().as_secs_f64();
        assert!(out.unwrap().success());

        let t = Instant::now();
        let mut lines = BufReader::with_capacity(
            BUF_SIZE,
            MultiGzDecoder::new(BufReader::with_capacity(
                BUF_SIZE,
                File::open(&closed.path).unwrap(),
            )),
        );
        let mut line = Vec::new();
        let mut count = 0;
        while lines.read_until(b'\n', &mut line).unwrap() > 0 {
            count += 1;
            line.clear();
        }
        println!(
            "lines only (inflate + split): {:.2} s, {count}",
            t.elapsed().as_secs_f64()
        );

        let t = Instant::now();
        let mut r = TraceReader::open(&closed.path).unwrap();
        let mut n = 0u64;
        let mut checksum = 0f64;
        while let Some(rec) = r.next_record().unwrap() {
            if let Record::Request(q) = rec {
                n += 1;
                checksum += f64::from(q.response.actions[0]);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(n, 100_000);
        println!(
            "file {:.1} MB gz, {:.1} MB JSON; gzip -dc {gzip_secs:.2} s; reader {secs:.2} s = {:.0} records/s, {:.0} MB/s of JSON ({checksum:.3})",
            closed.bytes as f64 / 1e6,
            r.bytes_read() as f64 / 1e6,
            n as f64 / secs,
            r.bytes_read() as f64 / 1e6 / secs
        );
    }
}
