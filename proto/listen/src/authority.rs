//! Server-side fix for gRPC clients that send a Unix socket path as the
//! HTTP/2 `:authority`.
//!
//! # Problem
//!
//! Over Unix domain sockets, grpcurl (`-unix`), grpc-java and Python grpcio
//! (>= 1.57) put the socket path into `:authority`, either raw
//! (`/run/reflex/pi05.sock`) or %-encoded (`%2Frun%2Freflex%2Fpi05.sock`;
//! grpcio 1.85 sends `run%2Freflex%2Fpi05.sock`). None of these is a valid
//! URI authority, and h2 (under hyper/tonic) answers such a request with
//! `RST_STREAM(PROTOCOL_ERROR)` before any handler runs (hyperium/h2#487 is
//! still open). The robot's very first call fails.
//!
//! # How the fix works
//!
//! [`AuthorityFix`] wraps the server side of an accepted connection. Bytes the
//! server writes pass through untouched. Bytes the server reads go through a
//! small HTTP/2 frame rewriter:
//!
//! 1. The 24-byte client preface is passed through. If the connection does not
//!    start with it, rewriting stops for good and every byte is passed through
//!    unchanged, so hyper/h2 report their own error (or serve HTTP/1).
//! 2. Frames are parsed from their 9-byte header. Every frame except HEADERS
//!    and CONTINUATION is streamed through verbatim: its header is copied, its
//!    payload is copied straight from the socket into the caller's buffer (for
//!    large payloads without an intermediate copy) and never buffered whole.
//! 3. HEADERS + CONTINUATION frames are collected into one header block
//!    (padding stripped), decoded with an HPACK decoder (`loona-hpack`) that
//!    keeps the client's dynamic table for the whole connection, and every
//!    field is re-encoded. An `:authority` that `http::uri::Authority::try_from`
//!    rejects (the same parser h2 uses) is replaced by `localhost`. The new
//!    block is emitted as one HEADERS frame plus CONTINUATION frames when it
//!    exceeds the server's max frame size.
//!
//! # Invariants
//!
//! * Only client-to-server bytes are touched; server-to-client bytes are never
//!   looked at.
//! * Every header block is re-encoded, not only rewritten ones: once the
//!   client's HPACK stream is decoded here, the server's decoder must never see
//!   the client's original encoding again. The re-encoding uses only "literal
//!   without indexing" (or "never indexed" for credentials) with literal names
//!   and no Huffman coding, so it never references or modifies the server's
//!   dynamic table. The server's table therefore stays empty and is valid for
//!   any table size the server advertises, including h2's default 4096, and no
//!   dynamic table size update ever needs to be forwarded.
//! * Reads never return bytes that have not been through the rewriter, and a
//!   read returns whatever is ready instead of waiting for more.
//! * Memory per connection is bounded: a 16 KiB read buffer, at most one
//!   header block of [`AuthorityFixOptions::max_header_block`] encoded bytes
//!   (plus, if it uses Huffman coding, a decoded copy at most 1.6 times as
//!   large) and its re-encoding (bounded by
//!   [`AuthorityFixOptions::max_header_list_size`]), plus the client's HPACK
//!   table (bounded by [`AuthorityFixOptions::header_table_size`]).
//!
//! # Decisions
//!
//! * Errors instead of giving up: once any header block has been re-encoded,
//!   falling back to pass-through would hand the server a client HPACK stream
//!   that refers to dynamic-table entries it never saw. So every condition
//!   this adapter cannot rewrite faithfully fails the read with an
//!   [`io::Error`] (`InvalidData`), and the connection is closed: a header
//!   block over `max_header_block` (default 1 MiB), a decoded header list over
//!   `max_header_list_size` (default 1 MiB), an HPACK decoding error (including
//!   a table size update above `header_table_size`), malformed padding or
//!   priority fields, and a frame other than the expected CONTINUATION inside
//!   an open header block. h2 treats all of these but the header list limit
//!   as connection errors (GOAWAY) anyway; the list limit sits far above
//!   hyper's 16 KiB default, so hyper still answers 431 to lists in between.
//!   End of input in the middle of a frame is reported as
//!   `UnexpectedEof`, as h2 would. Frame length needs no separate bound: the
//!   24-bit length field caps it below 16 MiB, and only header frames are
//!   buffered, under `max_header_block`.
//! * Priority fields in HEADERS are kept: the PRIORITY flag and its 5 bytes
//!   are re-emitted unchanged, so h2 still sees (and validates) what the client
//!   sent, even though RFC 9113 deprecates the scheme.
//! * Padding is dropped: it carries no information, and the frames are rebuilt
//!   with new lengths anyway.
//! * The "never indexed" bit of the client's fields is not preserved (the
//!   `loona-hpack` decoder does not report it); `authorization`,
//!   `proxy-authorization` and `cookie` are always emitted as never indexed.
//!   The server is the endpoint, so the bit has no effect on what it does.
//! * A CONTINUATION frame without an open HEADERS block (or after a
//!   PUSH_PROMISE, which a client must not send) is passed through verbatim so
//!   h2 reports the protocol error itself.
//! * Only `:authority` is touched. `host` is left alone because h2 does not
//!   validate it.
//! * Huffman-coded strings are decoded before loona-hpack sees the block,
//!   with one `loona_hpack::huffman::HuffmanDecoder` reused per connection:
//!   loona's `Decoder` builds a new Huffman table for every such string, which
//!   made a 16 KiB block of one-byte strings cost 150 ms of CPU (now 1 ms).
//!   This needs a walk over the representation boundaries (RFC 7541 §6), not
//!   a second HPACK decoder: indexes and table state stay with loona.
//! * CPU per header block, release build: grpcio's first request (raw
//!   literals) ~1 µs, a Huffman-coded first request ~20 µs, and the worst
//!   1 MiB block about 0.1-0.2 s. A server that only needs hyper's defaults
//!   can set `max_header_block` to 64 KiB (4x hyper's header list limit, so
//!   nothing hyper would accept is refused) to keep the worst case ~10 ms.
//!
//! # Use with tonic
//!
//! Wrap every accepted `UnixStream` in [`AuthorityFix::new`] before handing
//! the stream of connections to `serve_with_incoming`; [`crate::unix_incoming`]
//! does that for a bound listener, with a 64 KiB header block limit. `AuthorityFix<IO>`
//! implements tonic's `Connected` whenever `IO` does, returning the inner
//! stream's connect info (`UdsConnectInfo` for a `UnixStream`) with the connection's number
//! ([`ConnectionInfo`]).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::uri::Authority;
use loona_hpack::Decoder;
use loona_hpack::huffman::HuffmanDecoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;

const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// RFC 9113 §4.2: SETTINGS_MAX_FRAME_SIZE is always within these bounds, so a
/// frame of the minimum size is acceptable to every peer.
const MIN_MAX_FRAME_SIZE: usize = 16_384;
const MAX_MAX_FRAME_SIZE: usize = (1 << 24) - 1;

const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// Client-to-server bytes are read into a buffer of this size.
const READ_BUF_SIZE: usize = 16 * 1024;
/// Payloads of pass-through frames at least this long are read straight into
/// the caller's buffer; shorter ones go through the read buffer, so that a run
/// of small frames costs one read instead of two per frame.
const DIRECT_READ_MIN: usize = 4096;
/// Scratch buffers that grew past this (for an unusually large header block)
/// are shrunk back, so an idle connection does not keep a megabyte around.
const RETAINED_SCRATCH: usize = 64 * 1024;

/// Limits and parameters of the rewriter; [`Default`] matches h2's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorityFixOptions {
    /// Largest frame payload emitted for a re-encoded header block: the
    /// server's SETTINGS_MAX_FRAME_SIZE. Clamped to 16384..=16777215.
    /// Default 16384 (h2's default).
    pub max_frame_size: usize,
    /// Largest accepted client header block (encoded, all HEADERS and
    /// CONTINUATION payloads of one block together). Default 1 MiB.
    pub max_header_block: usize,
    /// Largest accepted decoded header list, counted as in RFC 9113 §6.5.2
    /// (name + value + 32 per field). Bounds the re-encoded block, which HPACK
    /// indexing could otherwise blow up far beyond `max_header_block`.
    /// Default 1 MiB; keep it at or above the server's own limit so the server
    /// answers oversized requests itself.
    pub max_header_list_size: usize,
    /// The server's SETTINGS_HEADER_TABLE_SIZE: the largest HPACK dynamic
    /// table the client may ask for. Default 4096 (h2's default).
    pub header_table_size: usize,
}

impl Default for AuthorityFixOptions {
    fn default() -> Self {
        Self {
            max_frame_size: MIN_MAX_FRAME_SIZE,
            max_header_block: 1 << 20,
            max_header_list_size: 1 << 20,
            header_table_size: 4096,
        }
    }
}

/// An I/O adapter that rewrites an invalid `:authority` in the client's
/// HTTP/2 requests to `localhost`; see the [module docs](self).
pub struct AuthorityFix<IO> {
    io: IO,
    /// This connection's number, unique in the process (see [`ConnectionInfo`]).
    connection: u64,
    rewriter: Rewriter,
    /// Client bytes read but not yet rewritten: `read_buf[head..tail]`.
    /// Allocated on the first read.
    read_buf: Vec<u8>,
    head: usize,
    tail: usize,
}

impl<IO> AuthorityFix<IO> {
    /// Wraps the server side of an accepted connection, with default options.
    pub fn new(io: IO) -> Self {
        Self::with_options(io, AuthorityFixOptions::default())
    }

    /// Wraps the server side of an accepted connection.
    pub fn with_options(io: IO, options: AuthorityFixOptions) -> Self {
        Self {
            io,
            connection: NEXT_CONNECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rewriter: Rewriter::new(options),
            read_buf: Vec::new(),
            head: 0,
            tail: 0,
        }
    }

    /// The wrapped connection, e.g. for its peer address.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The wrapped connection. Reading from it directly bypasses the rewriter
    /// and desynchronises it; use it for socket options only.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// Unwraps the connection. Client bytes already read but not yet returned
    /// by [`AsyncRead::poll_read`] are lost.
    pub fn into_inner(self) -> IO {
        self.io
    }

    /// How many `:authority` values have been replaced on this connection.
    pub fn rewrites(&self) -> u64 {
        self.rewriter.rewrites
    }
}

impl<IO: fmt::Debug> fmt::Debug for AuthorityFix<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("io", &self.io)
            .field("rewrites", &self.rewriter.rewrites)
            .finish_non_exhaustive()
    }
}

/// Numbers the connections of this process: a Unix peer's address and credentials do not
/// tell two connections of one client apart, and per-connection policies (the server's
/// fair share of its queue) need to.
static NEXT_CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What tonic puts in each request's extensions for a connection behind the adapter: the
/// inner stream's connect info (`UdsConnectInfo` for a `UnixStream`) and the connection's
/// number, unique in the process.
#[derive(Debug, Clone)]
pub struct ConnectionInfo<C> {
    pub inner: C,
    pub connection: u64,
}

impl<IO: Connected> Connected for AuthorityFix<IO> {
    type ConnectInfo = ConnectionInfo<IO::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo {
            inner: self.io.connect_info(),
            connection: self.connection,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFix<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let before = buf.filled().len();
            let consumed = this
                .rewriter
                .process(&this.read_buf[this.head..this.tail], buf)?;
            this.head += consumed;
            if this.head == this.tail {
                this.head = 0;
                this.tail = 0;
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            // Nothing was produced, so `process` consumed all buffered input
            // (it only stops early once `buf` is full); the read buffer is
            // empty from here on.

            if let Some(limit) = this.rewriter.direct_read_limit() {
                let limit = limit.min(buf.remaining());
                // A plain slice (zeroed once if needed) keeps this free of
                // `unsafe`; the inner reader fills a prefix of it.
                let dst = buf.initialize_unfilled_to(limit);
                let mut direct = ReadBuf::new(dst);
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                if n == 0 {
                    return Poll::Ready(this.rewriter.on_eof());
                }
                buf.advance(n);
                this.rewriter.passed_directly(n);
                return Poll::Ready(Ok(()));
            }

            if this.read_buf.is_empty() {
                this.read_buf = vec![0; READ_BUF_SIZE];
            }
            let mut rb = ReadBuf::new(&mut this.read_buf);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(this.rewriter.on_eof());
            }
            this.tail = n;
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Where the rewriter is in the client's byte stream.
#[derive(Debug)]
enum State {
    /// Checking the client preface; `matched` bytes of it were seen.
    Preface { matched: usize },
    /// Collecting a 9-byte frame header into `Rewriter::frame_header`.
    FrameHeader,
    /// Passing through the rest of a frame that is not rewritten.
    Pass { remaining: usize },
    /// Collecting the payload of a HEADERS or CONTINUATION frame into
    /// `Rewriter::block`.
    HeaderPayload {
        remaining: usize,
        flags: u8,
        is_headers: bool,
    },
    /// Not HTTP/2: everything passes through unchanged.
    Passthrough,
    /// A read failed; the stream cannot be rewritten faithfully any more.
    Failed {
        kind: io::ErrorKind,
        message: String,
    },
}

/// The header block being collected.
#[derive(Debug)]
struct OpenBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

/// The sans-I/O core: turns client bytes into rewritten client bytes.
struct Rewriter {
    options: AuthorityFixOptions,
    state: State,
    frame_header: [u8; FRAME_HEADER_LEN],
    frame_header_len: usize,
    open: Option<OpenBlock>,
    /// Header block fragments collected so far; while a frame's payload is
    /// still arriving, it starts at `frame_start`.
    block: Vec<u8>,
    frame_start: usize,
    /// The client's HPACK state: lives as long as the connection.
    decoder: Decoder<'static>,
    /// Built on the first Huffman-coded string and reused; see
    /// `strip_huffman`.
    huffman: Option<HuffmanDecoder>,
    /// `block` with Huffman-coded strings replaced by raw ones.
    raw_block: Vec<u8>,
    /// Re-encoded header block, before framing.
    encoded: Vec<u8>,
    /// Rewritten bytes not yet handed to the reader: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    rewrites: u64,
}

impl Rewriter {
    fn new(mut options: AuthorityFixOptions) -> Self {
        options.max_frame_size = options
            .max_frame_size
            .clamp(MIN_MAX_FRAME_SIZE, MAX_MAX_FRAME_SIZE);
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(options.header_table_size);
        Self {
            options,
            state: State::Preface { matched: 0 },
            frame_header: [0; FRAME_HEADER_LEN],
            frame_header_len: 0,
            open: None,
            block: Vec::new(),
            frame_start: 0,
            decoder,
            huffman: None,
            raw_block: Vec::new(),
            encoded: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            rewrites: 0,
        }
    }

    /// Rewrites as much of `input` as fits into `dst`; returns how many input
    /// bytes were consumed. Stops early only when `dst` is full.
    fn process(&mut self, mut input: &[u8], dst: &mut ReadBuf<'_>) -> io::Result<usize> {
        let total = input.len();
        loop {
            self.drain_out(dst);
            if self.out_pos < self.out.len() || dst.remaining() == 0 {
                break;
            }
            if let State::Failed { kind, message } = &self.state {
                return Err(io::Error::new(*kind, message.clone()));
            }
            if input.is_empty() {
                break;
            }
            let n = match self.step(input, dst) {
                Ok(n) => n,
                Err(e) => {
                    self.state = State::Failed {
                        kind: e.kind(),
                        message: e.to_string(),
                    };
                    return Err(e);
                }
            };
            input = &input[n..];
        }
        Ok(total - input.len())
    }

    /// Advances the state machine over a prefix of `input`; returns how many
    /// bytes it consumed. Pass-through bytes go straight into `dst`, rebuilt
    /// frames into `out`.
    fn step(&mut self, input: &[u8], dst: &mut ReadBuf<'_>) -> io::Result<usize> {
        match &mut self.state {
            State::Preface { matched } => {
                let expected = &PREFACE[*matched..];
                let n = expected.len().min(input.len()).min(dst.remaining());
                if input[..n] != expected[..n] {
                    // Not HTTP/2 with prior knowledge. This chunk has not been
                    // emitted yet, so passing it through from its start keeps
                    // the stream intact.
                    self.state = State::Passthrough;
                    return Ok(0);
                }
                dst.put_slice(&input[..n]);
                *matched += n;
                if *matched == PREFACE.len() {
                    self.state = State::FrameHeader;
                }
                Ok(n)
            }
            State::FrameHeader => {
                let n = (FRAME_HEADER_LEN - self.frame_header_len).min(input.len());
                self.frame_header[self.frame_header_len..self.frame_header_len + n]
                    .copy_from_slice(&input[..n]);
                self.frame_header_len += n;
                if self.frame_header_len == FRAME_HEADER_LEN {
                    self.frame_header_len = 0;
                    self.on_frame_header()?;
                }
                Ok(n)
            }
            State::Pass { remaining } => {
                let n = (*remaining).min(input.len()).min(dst.remaining());
                dst.put_slice(&input[..n]);
                *remaining -= n;
                if *remaining == 0 {
                    self.state = State::FrameHeader;
                }
                Ok(n)
            }
            State::Passthrough => {
                let n = input.len().min(dst.remaining());
                dst.put_slice(&input[..n]);
                Ok(n)
            }
            State::HeaderPayload {
                remaining,
                flags,
                is_headers,
            } => {
                let n = (*remaining).min(input.len());
                self.block.extend_from_slice(&input[..n]);
                *remaining -= n;
                if *remaining == 0 {
                    let (flags, is_headers) = (*flags, *is_headers);
                    self.finish_header_frame(flags, is_headers)?;
                }
                Ok(n)
            }
            State::Failed { kind, message } => Err(io::Error::new(*kind, message.clone())),
        }
    }

    fn on_frame_header(&mut self) -> io::Result<()> {
        let h = self.frame_header;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (frame_type, flags) = (h[3], h[4]);
        let stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;

        let is_headers = match (frame_type, &self.open) {
            (TYPE_HEADERS, None) => {
                self.open = Some(OpenBlock {
                    stream_id,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    priority: None,
                });
                true
            }
            (TYPE_CONTINUATION, Some(open)) if open.stream_id == stream_id => false,
            (_, Some(open)) => {
                return Err(invalid_data(format!(
                    "frame of type {frame_type:#x} on stream {stream_id} inside the header \
                     block of stream {}",
                    open.stream_id
                )));
            }
            (_, None) => {
                self.out.extend_from_slice(&h);
                self.state = if len == 0 {
                    State::FrameHeader
                } else {
                    State::Pass { remaining: len }
                };
                return Ok(());
            }
        };

        if self.block.len() + len > self.options.max_header_block {
            return Err(invalid_data(format!(
                "client header block exceeds {} bytes",
                self.options.max_header_block
            )));
        }
        self.frame_start = self.block.len();
        if len == 0 {
            // No payload byte will arrive to trigger completion.
            self.finish_header_frame(flags, is_headers)
        } else {
            self.state = State::HeaderPayload {
                remaining: len,
                flags,
                is_headers,
            };
            Ok(())
        }
    }

    /// Called once a HEADERS or CONTINUATION payload is complete in
    /// `block[frame_start..]`.
    fn finish_header_frame(&mut self, flags: u8, is_headers: bool) -> io::Result<()> {
        if is_headers {
            let payload = &self.block[self.frame_start..];
            let mut prefix = 0;
            let mut padding = 0;
            if flags & FLAG_PADDED != 0 {
                padding = usize::from(*payload.first().ok_or_else(|| {
                    invalid_data("PADDED HEADERS frame without pad length".to_owned())
                })?);
                prefix = 1;
            }
            if flags & FLAG_PRIORITY != 0 {
                let fields: [u8; 5] = payload
                    .get(prefix..prefix + 5)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| invalid_data("PRIORITY HEADERS frame too short".to_owned()))?;
                if let Some(open) = self.open.as_mut() {
                    open.priority = Some(fields);
                }
                prefix += 5;
            }
            if padding > payload.len() - prefix {
                return Err(invalid_data(
                    "HEADERS padding exceeds the frame payload".to_owned(),
                ));
            }
            self.block.truncate(self.block.len() - padding);
            self.block
                .drain(self.frame_start..self.frame_start + prefix);
        }
        self.state = State::FrameHeader;
        if flags & FLAG_END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    /// Decodes the complete header block, re-encodes it and queues the new
    /// frames.
    fn finish_block(&mut self) -> io::Result<()> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        self.encoded.clear();
        let max_list = self.options.max_header_list_size;
        let mut list_size = 0usize;
        let mut too_large = false;
        let mut replaced: Option<Vec<u8>> = None;
        let block = if strip_huffman(&self.block, &mut self.huffman, &mut self.raw_block)? {
            &self.raw_block
        } else {
            &self.block
        };
        let encoded = &mut self.encoded;
        let result = self.decoder.decode_with_cb(block, |name, value| {
            // Decoding must run to the end even past the limit, or the
            // client's dynamic table would diverge; only the output stops.
            list_size = list_size.saturating_add(name.len() + value.len() + 32);
            if too_large || list_size > max_list {
                too_large = true;
                return;
            }
            let mut value: &[u8] = &value;
            if &*name == b":authority" && Authority::try_from(value).is_err() {
                if replaced.is_none() {
                    replaced = Some(value.to_vec());
                }
                value = REPLACEMENT_AUTHORITY;
            }
            encode_field(encoded, &name, value);
        });
        self.block.clear();
        shrink(&mut self.block);
        self.raw_block.clear();
        shrink(&mut self.raw_block);
        result.map_err(|e| invalid_data(format!("HPACK error in client header block: {e}")))?;
        if too_large {
            return Err(invalid_data(format!(
                "client header list exceeds {max_list} bytes"
            )));
        }
        if let Some(original) = replaced {
            if self.rewrites == 0 {
                tracing::debug!(
                    original = %String::from_utf8_lossy(&original),
                    stream_id = open.stream_id,
                    "replaced invalid HTTP/2 :authority with localhost",
                );
            }
            self.rewrites += 1;
        }
        self.emit_block(&open);
        self.encoded.clear();
        shrink(&mut self.encoded);
        Ok(())
    }

    /// Frames `encoded` as HEADERS + CONTINUATION* into `out`.
    fn emit_block(&mut self, open: &OpenBlock) {
        let max = self.options.max_frame_size;
        let priority_len = if open.priority.is_some() { 5 } else { 0 };
        let first_len = self.encoded.len().min(max - priority_len);
        let mut flags = 0;
        if open.end_stream {
            flags |= FLAG_END_STREAM;
        }
        if open.priority.is_some() {
            flags |= FLAG_PRIORITY;
        }
        if first_len == self.encoded.len() {
            flags |= FLAG_END_HEADERS;
        }
        self.out.reserve(
            self.encoded.len() + priority_len + FRAME_HEADER_LEN * (2 + self.encoded.len() / max),
        );
        push_frame_header(
            &mut self.out,
            first_len + priority_len,
            TYPE_HEADERS,
            flags,
            open.stream_id,
        );
        if let Some(priority) = open.priority {
            self.out.extend_from_slice(&priority);
        }
        self.out.extend_from_slice(&self.encoded[..first_len]);
        let mut rest = &self.encoded[first_len..];
        while !rest.is_empty() {
            let n = rest.len().min(max);
            let flags = if n == rest.len() { FLAG_END_HEADERS } else { 0 };
            push_frame_header(&mut self.out, n, TYPE_CONTINUATION, flags, open.stream_id);
            self.out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }

    fn drain_out(&mut self, dst: &mut ReadBuf<'_>) {
        if self.out_pos == self.out.len() {
            return;
        }
        let n = (self.out.len() - self.out_pos).min(dst.remaining());
        dst.put_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            shrink(&mut self.out);
        }
    }

    /// With the read buffer empty: how many bytes may be read straight into
    /// the caller's buffer, if that is worthwhile now.
    fn direct_read_limit(&self) -> Option<usize> {
        if self.out_pos < self.out.len() {
            return None;
        }
        match self.state {
            State::Pass { remaining } if remaining >= DIRECT_READ_MIN => Some(remaining),
            State::Passthrough => Some(usize::MAX),
            _ => None,
        }
    }

    /// `n` bytes were read straight into the caller's buffer.
    fn passed_directly(&mut self, n: usize) {
        if let State::Pass { remaining } = &mut self.state {
            *remaining -= n;
            if *remaining == 0 {
                self.state = State::FrameHeader;
            }
        }
    }

    /// The client closed its side: a clean end only between frames.
    fn on_eof(&self) -> io::Result<()> {
        let clean = match &self.state {
            State::Preface { matched } => *matched == 0,
            State::FrameHeader => self.frame_header_len == 0 && self.open.is_none(),
            State::Passthrough => true,
            State::Pass { .. } | State::HeaderPayload { .. } => false,
            State::Failed { kind, message } => {
                return Err(io::Error::new(*kind, message.clone()));
            }
        };
        if clean {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "HTTP/2 client closed the connection in the middle of a frame",
            ))
        }
    }
}

/// Copies `block` into `raw` with every Huffman-coded string literal decoded
/// to a raw literal; returns false (leaving `raw` empty) if there were none.
///
/// loona-hpack builds a fresh Huffman table for every Huffman-coded string
/// (about 20 µs each): a 16 KiB block of one-byte strings cost 150 ms of CPU.
/// Decoding the strings here with one reused `HuffmanDecoder` is 10-100x
/// cheaper. Only representation boundaries are parsed (RFC 7541 §6); indexes
/// and table state are left to loona's decoder, which then sees an
/// equivalent block.
fn strip_huffman(
    block: &[u8],
    huffman: &mut Option<HuffmanDecoder>,
    raw: &mut Vec<u8>,
) -> io::Result<bool> {
    raw.clear();
    let hpack_error =
        |what: &str| invalid_data(format!("HPACK error in client header block: {what}"));
    // `block[..copied]` is already in `raw` once a Huffman string was found.
    let mut copied = 0;
    let mut found = false;
    let mut pos = 0;
    while pos < block.len() {
        let (prefix_bits, literal) = match block[pos] {
            b if b & 0x80 != 0 => (7, false), // indexed field
            b if b & 0x40 != 0 => (6, true),  // literal, incremental indexing
            b if b & 0x20 != 0 => (5, false), // dynamic table size update
            _ => (4, true),                   // literal, without / never indexed
        };
        let (index, n) = decode_integer(&block[pos..], prefix_bits).map_err(hpack_error)?;
        pos += n;
        if !literal {
            continue;
        }
        // A literal name precedes the value when the name index is 0.
        for _ in 0..if index == 0 { 2 } else { 1 } {
            let start = pos;
            let (len, n) = decode_integer(&block[pos..], 7).map_err(hpack_error)?;
            let data = pos + n;
            let end = data
                .checked_add(len)
                .filter(|&end| end <= block.len())
                .ok_or_else(|| hpack_error("truncated string literal"))?;
            if block[start] & 0x80 != 0 {
                let decoded = huffman
                    .get_or_insert_with(HuffmanDecoder::new)
                    .decode(&block[data..end])
                    .map_err(|e| hpack_error(&e.to_string()))?;
                raw.extend_from_slice(&block[copied..start]);
                encode_string(raw, &decoded);
                copied = end;
                found = true;
            }
            pos = end;
        }
    }
    if found {
        raw.extend_from_slice(&block[copied..]);
    }
    Ok(found)
}

/// RFC 7541 §5.1 integer with an N-bit prefix at the start of `buf`; returns
/// the value and the octets used. At most 4 continuation octets, as in
/// loona-hpack, which keeps the value far below `usize::MAX`.
fn decode_integer(buf: &[u8], prefix_bits: u8) -> Result<(usize, usize), &'static str> {
    let max_prefix = (1usize << prefix_bits) - 1;
    let first = *buf.first().ok_or("truncated integer")?;
    let mut value = usize::from(first) & max_prefix;
    if value < max_prefix {
        return Ok((value, 1));
    }
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        value += usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(if buf.len() < 6 {
        "truncated integer"
    } else {
        "integer too long"
    })
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Gives back memory after an unusually large header block.
fn shrink(buf: &mut Vec<u8>) {
    if buf.capacity() > RETAINED_SCRATCH {
        buf.shrink_to(RETAINED_SCRATCH);
    }
}

fn push_frame_header(out: &mut Vec<u8>, len: usize, frame_type: u8, flags: u8, stream_id: u32) {
    // `len` never exceeds the clamped max frame size, which fits 24 bits.
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(frame_type);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// Appends one field as a literal with a literal name, without touching the
/// receiver's dynamic table (RFC 7541 §6.2.2 and §6.2.3). No Huffman coding:
/// on a local socket the bytes saved are not worth the CPU.
fn encode_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    let never_indexed = matches!(name, b"authorization" | b"proxy-authorization" | b"cookie");
    out.push(if never_indexed { 0x10 } else { 0x00 });
    encode_string(out, name);
    encode_string(out, value);
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_integer(out, s.len(), 7, 0x00);
    out.extend_from_slice(s);
}

/// RFC 7541 §5.1 integer with an N-bit prefix; `first` holds the bits above
/// the prefix. No `as u8` below truncates: each value is under 0x100 there.
fn encode_integer(out: &mut Vec<u8>, mut value: usize, prefix_bits: u8, first: u8) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max_prefix as u8);
    value -= max_prefix;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    use loona_hpack::Encoder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn grpc_request(authority: &str) -> Fields {
        fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/reflex.v1.Policy/Act"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            (
                "user-agent",
                "grpc-python/1.71.0 grpc-c/46.0.0 (linux; chttp2)",
            ),
            ("grpc-timeout", "100m"),
            ("x-robot-id", "pi05-arm-7"),
        ])
    }

    fn hpack(encoder: &mut Encoder<'_>, list: &Fields) -> Vec<u8> {
        encoder.encode(list.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    fn frame(frame_type: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_frame_header(&mut out, payload.len(), frame_type, flags, stream_id);
        out.extend_from_slice(payload);
        out
    }

    const SETTINGS: u8 = 0x4;
    const DATA: u8 = 0x0;
    const RST_STREAM: u8 = 0x3;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const WINDOW_UPDATE: u8 = 0x8;

    fn client_start() -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        // SETTINGS_HEADER_TABLE_SIZE=4096, SETTINGS_INITIAL_WINDOW_SIZE=1 MiB.
        out.extend(frame(
            SETTINGS,
            0,
            0,
            &[0, 1, 0, 0, 0x10, 0, 0, 4, 0, 0x10, 0, 0],
        ));
        out
    }

    #[derive(Debug, PartialEq)]
    struct Frame {
        frame_type: u8,
        flags: u8,
        stream_id: u32,
        payload: Vec<u8>,
    }

    fn parse_frames(mut bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            frames.push(Frame {
                frame_type: bytes[3],
                flags: bytes[4],
                stream_id: u32::from_be_bytes(bytes[5..9].try_into().unwrap()),
                payload: bytes[9..9 + len].to_vec(),
            });
            bytes = &bytes[9 + len..];
        }
        frames
    }

    /// An `AsyncRead` that hands out at most `chunk` bytes per read.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = (self.data.len() - self.pos)
                .min(self.chunk)
                .min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.data[start..start + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    async fn rewrite_with(
        input: &[u8],
        in_chunk: usize,
        out_chunk: usize,
        options: AuthorityFixOptions,
    ) -> io::Result<Vec<u8>> {
        let reader = Chunked {
            data: input.to_vec(),
            pos: 0,
            chunk: in_chunk,
        };
        let mut fix = AuthorityFix::with_options(reader, options);
        let mut out = Vec::new();
        let mut buf = vec![0; out_chunk];
        loop {
            let n = fix.read(&mut buf).await?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    async fn rewrite(input: &[u8]) -> Vec<u8> {
        rewrite_with(input, usize::MAX, 64 * 1024, AuthorityFixOptions::default())
            .await
            .unwrap()
    }

    /// Splits rewritten output into the client start (checked verbatim) and
    /// the decoded header lists, using one decoder for the whole connection
    /// as the server does.
    fn decode_blocks(output: &[u8]) -> Vec<(Frame, Fields)> {
        let start = client_start();
        assert_eq!(&output[..start.len()], &start[..]);
        let mut decoder = Decoder::new();
        let mut result = Vec::new();
        let mut frames = parse_frames(&output[start.len()..]).into_iter();
        while let Some(first) = frames.next() {
            assert_eq!(first.frame_type, TYPE_HEADERS);
            assert_eq!(first.flags & FLAG_PADDED, 0);
            let skip = if first.flags & FLAG_PRIORITY != 0 {
                5
            } else {
                0
            };
            let mut block = first.payload[skip..].to_vec();
            let mut end = first.flags & FLAG_END_HEADERS != 0;
            while !end {
                let next = frames.next().unwrap();
                assert_eq!(next.frame_type, TYPE_CONTINUATION);
                assert_eq!(next.stream_id, first.stream_id);
                block.extend_from_slice(&next.payload);
                end = next.flags & FLAG_END_HEADERS != 0;
            }
            assert_no_dynamic_table_use(&block);
            result.push((first, decoder.decode(&block).unwrap()));
        }
        result
    }

    /// Every re-encoded field must be a literal with a literal name, without
    /// indexing or never indexed: the server's table is never used.
    fn assert_no_dynamic_table_use(mut block: &[u8]) {
        fn skip_string(b: &[u8]) -> &[u8] {
            let (len, used) = decode_int(b, 7);
            assert_eq!(b[0] & 0x80, 0, "no Huffman");
            &b[used + len..]
        }
        while !block.is_empty() {
            assert!(
                block[0] == 0x00 || block[0] == 0x10,
                "field {:#x}",
                block[0]
            );
            block = skip_string(skip_string(&block[1..]));
        }
    }

    fn decode_int(b: &[u8], prefix: u8) -> (usize, usize) {
        decode_integer(b, prefix).unwrap()
    }

    fn with_authority(list: &Fields, authority: &str) -> Fields {
        list.iter()
            .map(|(n, v)| {
                if n == b":authority" {
                    (n.clone(), authority.as_bytes().to_vec())
                } else {
                    (n.clone(), v.clone())
                }
            })
            .collect()
    }

    fn single_request(authority: &str, flags: u8) -> (Fields, Vec<u8>) {
        let list = grpc_request(authority);
        let block = hpack(&mut Encoder::new(), &list);
        let mut input = client_start();
        input.extend(frame(TYPE_HEADERS, flags | FLAG_END_HEADERS, 1, &block));
        (list, input)
    }

    #[tokio::test]
    async fn socket_path_authority_becomes_localhost() {
        for path in ["/tmp/x.sock", "%2Frun%2Freflex%2Fpi05.sock", ""] {
            let (list, input) = single_request(path, 0);
            let blocks = decode_blocks(&rewrite(&input).await);
            assert_eq!(blocks.len(), 1);
            let (frame, decoded) = &blocks[0];
            assert_eq!(decoded, &with_authority(&list, "localhost"), "{path}");
            assert_eq!(frame.stream_id, 1);
            assert_eq!(frame.flags, FLAG_END_HEADERS);
        }
    }

    #[tokio::test]
    async fn valid_authority_is_kept() {
        for authority in ["localhost:50051", "localhost", "[::1]:50051", "pi05.local"] {
            let (list, input) = single_request(authority, FLAG_END_STREAM);
            let blocks = decode_blocks(&rewrite(&input).await);
            assert_eq!(blocks[0].1, list);
            assert_eq!(blocks[0].0.flags, FLAG_END_HEADERS | FLAG_END_STREAM);
        }
        let (list, input) = single_request("localhost:50051", 0);
        let reader = Chunked {
            data: input,
            pos: 0,
            chunk: usize::MAX,
        };
        let mut fix = AuthorityFix::new(reader);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        assert_eq!(fix.rewrites(), 0);
        assert_eq!(decode_blocks(&out)[0].1, list);
    }

    /// The HEADERS payload grpcio 1.85.3 sent for `unix:/tmp/cap.sock`
    /// (captured from a real client): `:authority` is `tmp%2Fcap.sock`.
    const GRPCIO_HEADERS: &str = concat!(
        "40053a706174681c2f677270632e6865616c74682e76312e4865616c74682f43",
        "6865636b400a3a617574686f726974790e746d702532466361702e736f636b83",
        "86400c636f6e74656e742d74797065106170706c69636174696f6e2f67727063",
        "4002746508747261696c6572734014677270632d6163636570742d656e636f64",
        "696e67176964656e746974792c206465666c6174652c20677a6970400c677270",
        "632d74696d656f7574023553400a757365722d6167656e7430677270632d7079",
        "74686f6e2f312e38352e3320677270632d632f35382e302e3020286c696e7578",
        "3b2063687474703229",
    );

    #[tokio::test]
    async fn real_grpcio_header_block() {
        let block = unhex(GRPCIO_HEADERS);
        let original = Decoder::new().decode(&block).unwrap();
        assert_eq!(
            header(&original, ":authority"),
            Some(&b"tmp%2Fcap.sock"[..])
        );
        let mut input = client_start();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let blocks = decode_blocks(&rewrite(&input).await);
        let expected = fields(&[
            (":path", "/grpc.health.v1.Health/Check"),
            (":authority", "localhost"),
            (":method", "POST"),
            (":scheme", "http"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-accept-encoding", "identity, deflate, gzip"),
            ("grpc-timeout", "5S"),
            (
                "user-agent",
                "grpc-python/1.85.3 grpc-c/58.0.0 (linux; chttp2)",
            ),
        ]);
        assert_eq!(blocks[0].1, expected);
    }

    fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Two requests Huffman-coded by Python's `hpack` package (as grpc-java
    /// and grpc-go do); the second one is almost all dynamic-table indexes.
    const HUFFMAN_BLOCKS: [&str; 2] = [
        concat!(
            "8386449062c2cb417cafdc2beb3d0627a621227f419062cb6a62c2cb417cb159",
            "80dae8393aff5f8b1d75d0620d263d4c4d65644082497f864d833505b11f7a90",
            "9acac8b741f71ad51529f4c057740b83408e9acac8b0c842d6958b510f21aa9b",
            "839bd9ab40899acac8b24d494f6a7f837dfa7f4088f2b5878ce958d27f88acc0",
            "6d61d94aceff",
        ),
        "8386c5c4c3c2c1c07f00837dea7fbf",
    ];

    fn huffman_request() -> Fields {
        fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/reflex.v1.Policy/Act"),
            (":authority", "/run/reflex/pi05.sock"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "grpc-java-netty/1.70.0"),
            ("grpc-accept-encoding", "gzip"),
            ("grpc-timeout", "99m"),
            ("x-robot-id", "pi05-arm-7"),
        ])
    }

    #[tokio::test]
    async fn huffman_coded_blocks() {
        let blocks: Vec<Vec<u8>> = HUFFMAN_BLOCKS.iter().map(|h| unhex(h)).collect();
        let first = huffman_request();
        let mut second = first.clone();
        second[8].1 = b"98m".to_vec();

        // Stripping Huffman coding yields an equivalent block.
        let mut reference = Decoder::new();
        let mut stripped = Decoder::new();
        let mut huffman = None;
        let mut raw = Vec::new();
        for (block, expected) in blocks.iter().zip([&first, &second]) {
            assert_eq!(&reference.decode(block).unwrap(), expected);
            let found = strip_huffman(block, &mut huffman, &mut raw).unwrap();
            let equivalent = if found { &raw } else { block };
            assert_eq!(&stripped.decode(equivalent).unwrap(), expected);
        }

        let mut input = client_start();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &blocks[0]));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &blocks[1]));
        let decoded = decode_blocks(&rewrite(&input).await);
        assert_eq!(decoded[0].1, with_authority(&first, "localhost"));
        assert_eq!(decoded[1].1, with_authority(&second, "localhost"));
    }

    #[tokio::test]
    async fn invalid_huffman_fails_the_read() {
        // Eight 1-bits are padding longer than 7 bits; 32 contain EOS
        // (RFC 7541 §5.2).
        for value in [&[0x81, 0xff][..], &[0x84, 0xff, 0xff, 0xff, 0xff]] {
            let mut block = vec![0x01];
            block.extend_from_slice(value);
            let mut input = client_start();
            input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
            let err = rewrite_with(&input, usize::MAX, 4096, AuthorityFixOptions::default())
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        }
    }

    #[test]
    fn integer_decoding_bounds() {
        assert_eq!(decode_integer(&[0x0f, 0x00], 4), Ok((15, 2)));
        assert_eq!(decode_integer(&[0xee], 4), Ok((14, 1)));
        assert!(decode_integer(&[], 4).is_err());
        assert!(decode_integer(&[0x7f, 0x80], 7).is_err());
        assert!(decode_integer(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0x01], 7).is_err());
        assert_eq!(
            decode_integer(&[0x7f, 0xff, 0xff, 0xff, 0x7f], 7),
            Ok((127 + (1 << 28) - 1, 5))
        );
    }

    #[tokio::test]
    async fn block_split_across_headers_and_continuation() {
        let list = grpc_request("/run/reflex/pi05.sock");
        let block = hpack(&mut Encoder::new(), &list);
        let mut input = client_start();
        input.extend(frame(TYPE_HEADERS, FLAG_END_STREAM, 1, &block[..7]));
        input.extend(frame(TYPE_CONTINUATION, 0, 1, &block[7..20]));
        input.extend(frame(TYPE_CONTINUATION, 0, 1, &[]));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block[20..]));
        let blocks = decode_blocks(&rewrite(&input).await);
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].1, with_authority(&list, "localhost"));
        assert_eq!(blocks[0].0.flags, FLAG_END_STREAM | FLAG_END_HEADERS);
    }

    #[tokio::test]
    async fn padded_and_priority_headers() {
        let list = grpc_request("/tmp/x.sock");
        let block = hpack(&mut Encoder::new(), &list);
        let priority = [0x80, 0, 0, 0, 15];
        let mut payload = vec![3];
        payload.extend_from_slice(&priority);
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = client_start();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_HEADERS,
            3,
            &payload,
        ));
        let output = rewrite(&input).await;
        let blocks = decode_blocks(&output);
        let (frame, decoded) = &blocks[0];
        assert_eq!(frame.flags, FLAG_PRIORITY | FLAG_END_HEADERS);
        assert_eq!(frame.stream_id, 3);
        assert_eq!(frame.payload[..5], priority);
        assert_eq!(decoded, &with_authority(&list, "localhost"));
    }

    #[tokio::test]
    async fn dynamic_table_state_across_requests() {
        let mut encoder = Encoder::new();
        let first = grpc_request("/tmp/x.sock");
        let mut second = first.clone();
        second[2].1 = b"/reflex.v1.Policy/Reset".to_vec();
        let block1 = hpack(&mut encoder, &first);
        let block2 = hpack(&mut encoder, &second);
        // The second block leans on entries the first one added (te,
        // grpc-timeout, x-robot-id): it cannot be decoded on its own.
        assert!(block2.len() < block1.len());
        assert!(block2.iter().filter(|&&b| b >= 0x80 + 62).count() >= 3);
        assert!(Decoder::new().decode(&block2).is_err());
        let mut input = client_start();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block1));
        input.extend(frame(DATA, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &block2));
        let output = rewrite(&input).await;
        let start = client_start().len();
        let frames = parse_frames(&output[start..]);
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames[1],
            parse_frames(&frame(DATA, FLAG_END_STREAM, 1, &[0; 5]))[0]
        );
        let mut decoder = Decoder::new();
        for (frame, expected) in [(&frames[0], &first), (&frames[2], &second)] {
            assert_no_dynamic_table_use(&frame.payload);
            let decoded = decoder.decode(&frame.payload).unwrap();
            assert_eq!(decoded, with_authority(expected, "localhost"));
        }
    }

    #[tokio::test]
    async fn table_size_update_is_honoured_and_bounded() {
        let list = grpc_request("/tmp/x.sock");
        let mut encoder = Encoder::new();
        // A size update to 0 at the start of a block empties the client's
        // table; indexes into it are then invalid, plain literals still work.
        let mut block = vec![0x20];
        block.extend(hpack(&mut encoder, &list));
        let mut input = client_start();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let blocks = decode_blocks(&rewrite(&input).await);
        assert_eq!(blocks[0].1, with_authority(&list, "localhost"));

        // Above the server's SETTINGS_HEADER_TABLE_SIZE: a compression error.
        let mut block = Vec::new();
        encode_integer(&mut block, 8192, 5, 0x20);
        block.extend(hpack(&mut Encoder::new(), &list));
        let mut input = client_start();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let err = rewrite_with(&input, usize::MAX, 4096, AuthorityFixOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn large_block_is_split_at_max_frame_size() {
        let mut list = grpc_request("/tmp/x.sock");
        list.push((b"x-big-bin".to_vec(), vec![b'a'; 40_000]));
        let block = hpack(&mut Encoder::new(), &list);
        let mut input = client_start();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_STREAM | FLAG_END_HEADERS,
            5,
            &block,
        ));

        for (max_frame_size, frames) in [(0, 3), (16_384, 3), (20_000, 3), (30_000, 2)] {
            let options = AuthorityFixOptions {
                max_frame_size,
                ..Default::default()
            };
            let output = rewrite_with(&input, 1000, 7000, options).await.unwrap();
            let parsed = parse_frames(&output[client_start().len()..]);
            assert_eq!(parsed.len(), frames, "{max_frame_size}");
            let limit = max_frame_size.max(16_384);
            assert!(parsed.iter().all(|f| f.payload.len() <= limit));
            assert_eq!(parsed[0].flags, FLAG_END_STREAM);
            assert_eq!(parsed.last().unwrap().flags, FLAG_END_HEADERS);
            let blocks = decode_blocks(&output);
            assert_eq!(blocks[0].1, with_authority(&list, "localhost"));
        }
    }

    fn control_frames() -> Vec<u8> {
        let mut input = client_start();
        input.extend(frame(SETTINGS, 0x1, 0, &[]));
        input.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 0x0f, 0, 1]));
        input.extend(frame(PING, 0, 0, b"pingpong"));
        input.extend(frame(DATA, 0, 1, &[7; 100]));
        // A padded DATA frame is passed through with its padding.
        input.extend(frame(
            DATA,
            FLAG_PADDED | FLAG_END_STREAM,
            1,
            &[2, 1, 2, 3, 0, 0],
        ));
        input.extend(frame(DATA, 0, 3, &vec![9; 70_000]));
        input.extend(frame(0xfa, 0xff, 7, b"unknown extension frame"));
        input.extend(frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]));
        // CONTINUATION outside a header block: h2 reports it, not us.
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 9, &[0x82]));
        input.extend(frame(GOAWAY, 0, 0, &[0, 0, 0, 3, 0, 0, 0, 0]));
        input
    }

    #[tokio::test]
    async fn non_header_frames_pass_through_verbatim() {
        let input = control_frames();
        assert_eq!(rewrite(&input).await, input);
        // Large reads on both sides take the direct path for the big DATA
        // payload; check it too.
        let out = rewrite_with(&input, usize::MAX, 1 << 20, AuthorityFixOptions::default())
            .await
            .unwrap();
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn one_byte_at_a_time_gives_the_same_output() {
        let mut encoder = Encoder::new();
        let mut input = control_frames();
        input.truncate(input.len() - 17); // Drop GOAWAY.
        let first = grpc_request("/tmp/x.sock");
        let block = hpack(&mut encoder, &first);
        input.extend(frame(TYPE_HEADERS, 0, 11, &block[..10]));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 11, &block[10..]));
        input.extend(frame(DATA, FLAG_END_STREAM, 11, b"\0\0\0\0\x02hi"));
        let mut big = grpc_request("/tmp/x.sock");
        big.push((b"x-big".to_vec(), vec![b'b'; 20_000]));
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            13,
            &hpack(&mut encoder, &big),
        ));

        let expected = rewrite(&input).await;
        assert!(expected.len() > 90_000);
        let options = AuthorityFixOptions::default();
        for (in_chunk, out_chunk) in [(1, 64 * 1024), (1, 1), (64 * 1024, 1), (3, 5), (9, 9)] {
            let out = rewrite_with(&input, in_chunk, out_chunk, options.clone())
                .await
                .unwrap();
            assert!(out == expected, "in {in_chunk}, out {out_chunk}");
        }
    }

    #[tokio::test]
    async fn not_http2_passes_through() {
        let input = b"GET / HTTP/1.1\r\nHost: /tmp/x.sock\r\n\r\n".to_vec();
        assert_eq!(rewrite(&input).await, input);
        let out = rewrite_with(&input, 1, 1, AuthorityFixOptions::default())
            .await
            .unwrap();
        assert_eq!(out, input);
        // Diverging after a matching prefix.
        let input = b"PRI * HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(rewrite(&input).await, input);
    }

    #[tokio::test]
    async fn sensitive_fields_stay_never_indexed() {
        let mut list = grpc_request("/tmp/x.sock");
        list.push((b"authorization".to_vec(), b"Bearer secret".to_vec()));
        let mut input = client_start();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &hpack(&mut Encoder::new(), &list),
        ));
        let blocks = decode_blocks(&rewrite(&input).await);
        let payload = &blocks[0].0.payload;
        let pos = payload
            .windows(14)
            .position(|w| w == b"\x0dauthorization")
            .unwrap();
        assert_eq!(payload[pos - 1], 0x10);
        assert_eq!(blocks[0].1, with_authority(&list, "localhost"));
    }

    #[tokio::test]
    async fn malformed_input_fails_the_read() {
        let block = hpack(&mut Encoder::new(), &grpc_request("/tmp/x.sock"));
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            (
                "frame inside header block",
                vec![
                    frame(TYPE_HEADERS, 0, 1, &block),
                    frame(PING, 0, 0, &[0; 8]),
                ],
            ),
            (
                "continuation on another stream",
                vec![
                    frame(TYPE_HEADERS, 0, 1, &block),
                    frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[]),
                ],
            ),
            (
                "padding longer than payload",
                vec![frame(
                    TYPE_HEADERS,
                    FLAG_PADDED | FLAG_END_HEADERS,
                    1,
                    &[200, 0x82],
                )],
            ),
            (
                "short priority",
                vec![frame(
                    TYPE_HEADERS,
                    FLAG_PRIORITY | FLAG_END_HEADERS,
                    1,
                    &[0, 0],
                )],
            ),
            (
                "bad hpack index",
                vec![frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0x80 | 70])],
            ),
            (
                "header block too large",
                vec![
                    frame(TYPE_HEADERS, 0, 1, &vec![0; 16_384]),
                    frame(TYPE_CONTINUATION, 0, 1, &vec![0; 16_384]),
                ],
            ),
        ];
        let options = AuthorityFixOptions {
            max_header_block: 20_000,
            ..Default::default()
        };
        for (name, frames) in cases {
            let mut input = client_start();
            input.extend(frames.concat());
            let err = rewrite_with(&input, usize::MAX, 64 * 1024, options.clone())
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{name}: {err}");
        }

        // Decoded list over the limit, even though the encoded block is tiny.
        let mut encoder = Encoder::new();
        let huge = fields(&[("x-a", &"v".repeat(3000))]);
        let mut input = client_start();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &hpack(&mut encoder, &huge),
        ));
        let indexed = vec![0x80 | 62; 400];
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &indexed));
        let options = AuthorityFixOptions {
            max_header_list_size: 100_000,
            ..Default::default()
        };
        let err = rewrite_with(&input, usize::MAX, 1 << 20, options)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn eof_mid_frame_is_unexpected() {
        let (_, input) = single_request("/tmp/x.sock", 0);
        for cut in [1, client_start().len() + 4, input.len() - 1] {
            let err = rewrite_with(&input[..cut], 7, 64, AuthorityFixOptions::default())
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
        let mut data = control_frames();
        data.truncate(data.len() - 3);
        let err = rewrite_with(&data, usize::MAX, 1 << 20, AuthorityFixOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(rewrite(&[]).await.is_empty());
    }

    #[test]
    fn integer_encoding_matches_rfc_examples() {
        // RFC 7541 C.1.1 - C.1.3.
        let mut out = Vec::new();
        encode_integer(&mut out, 10, 5, 0);
        encode_integer(&mut out, 1337, 5, 0);
        encode_integer(&mut out, 42, 8, 0);
        assert_eq!(out, [10, 31, 154, 10, 42]);
        assert_eq!(decode_int(&[31, 154, 10], 5), (1337, 3));
    }

    // End to end against a real h2 server.

    /// What the client side learned from the server about stream `stream_id`.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Status(Vec<u8>),
        Reset(u32),
        Closed,
    }

    async fn read_frame(io: &mut UnixStream) -> io::Result<Frame> {
        let mut header = [0; 9];
        io.read_exact(&mut header).await?;
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0; len];
        io.read_exact(&mut payload).await?;
        Ok(Frame {
            frame_type: header[3],
            flags: header[4],
            stream_id: u32::from_be_bytes(header[5..].try_into().unwrap()),
            payload,
        })
    }

    /// Reads server frames until stream `stream_id` is answered or reset.
    async fn outcome(io: &mut UnixStream, decoder: &mut Decoder<'_>, stream_id: u32) -> Outcome {
        let fut = async {
            loop {
                let Ok(f) = read_frame(io).await else {
                    return Outcome::Closed;
                };
                match f.frame_type {
                    SETTINGS if f.flags & 0x1 == 0 => {
                        io.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
                    }
                    TYPE_HEADERS => {
                        // Always decode, to keep the server's HPACK state.
                        assert_ne!(f.flags & FLAG_END_HEADERS, 0);
                        let list = decoder.decode(&f.payload).unwrap();
                        if f.stream_id == stream_id {
                            let status = list.into_iter().find(|(n, _)| n == b":status");
                            return Outcome::Status(status.unwrap().1);
                        }
                    }
                    RST_STREAM if f.stream_id == stream_id => {
                        return Outcome::Reset(u32::from_be_bytes(
                            f.payload[..4].try_into().unwrap(),
                        ));
                    }
                    GOAWAY => return Outcome::Closed,
                    _ => {}
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), fut)
            .await
            .expect("server did not answer")
    }

    /// Serves h2 on `io`, answering every request with 200 and reporting the
    /// request's authority.
    fn spawn_h2_server<T>(io: T) -> tokio::sync::mpsc::UnboundedReceiver<Option<String>>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(io).await.unwrap();
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                let authority = request.uri().authority().map(|a| a.to_string());
                let _ = tx.send(authority);
                let response = http::Response::builder().status(200).body(()).unwrap();
                respond.send_response(response, true).unwrap();
            }
        });
        rx
    }

    /// Two gRPC-style requests; the second is HPACK-encoded against the
    /// dynamic table the first one filled.
    fn two_requests(authority: &str) -> (Vec<u8>, Vec<u8>) {
        let mut encoder = Encoder::new();
        let first = grpc_request(authority);
        let mut input = client_start();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &hpack(&mut encoder, &first),
        ));
        let second = frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &hpack(&mut encoder, &first),
        );
        (input, second)
    }

    #[tokio::test]
    async fn h2_server_accepts_socket_path_authority_through_adapter() {
        for path in ["/run/reflex/pi05.sock", "%2Frun%2Freflex%2Fpi05.sock"] {
            let (mut client, server) = UnixStream::pair().unwrap();
            let mut authorities = spawn_h2_server(AuthorityFix::new(server));
            let (first, second) = two_requests(path);
            let mut decoder = Decoder::new();

            client.write_all(&first).await.unwrap();
            assert_eq!(
                outcome(&mut client, &mut decoder, 1).await,
                Outcome::Status(b"200".to_vec())
            );
            assert_eq!(
                authorities.recv().await.unwrap().as_deref(),
                Some("localhost")
            );

            client.write_all(&second).await.unwrap();
            assert_eq!(
                outcome(&mut client, &mut decoder, 3).await,
                Outcome::Status(b"200".to_vec())
            );
            assert_eq!(
                authorities.recv().await.unwrap().as_deref(),
                Some("localhost")
            );
        }
    }

    #[tokio::test]
    async fn h2_server_accepts_huffman_coded_requests_through_adapter() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut authorities = spawn_h2_server(AuthorityFix::new(server));
        let mut decoder = Decoder::new();
        client.write_all(&client_start()).await.unwrap();
        for (stream_id, block) in [(1, HUFFMAN_BLOCKS[0]), (3, HUFFMAN_BLOCKS[1])] {
            let flags = FLAG_END_HEADERS | FLAG_END_STREAM;
            client
                .write_all(&frame(TYPE_HEADERS, flags, stream_id, &unhex(block)))
                .await
                .unwrap();
            assert_eq!(
                outcome(&mut client, &mut decoder, stream_id).await,
                Outcome::Status(b"200".to_vec())
            );
            assert_eq!(
                authorities.recv().await.unwrap().as_deref(),
                Some("localhost")
            );
        }
    }

    #[tokio::test]
    async fn h2_server_resets_socket_path_authority_without_adapter() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut authorities = spawn_h2_server(server);
        let (first, _) = two_requests("/run/reflex/pi05.sock");
        client.write_all(&first).await.unwrap();
        let mut decoder = Decoder::new();
        // RST_STREAM with PROTOCOL_ERROR (0x1), and the handler never runs.
        assert_eq!(
            outcome(&mut client, &mut decoder, 1).await,
            Outcome::Reset(1)
        );
        assert!(authorities.try_recv().is_err());
    }

    #[tokio::test]
    async fn h2_server_keeps_valid_authority_through_adapter() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut authorities = spawn_h2_server(AuthorityFix::new(server));
        let (first, second) = two_requests("localhost:50051");
        let mut decoder = Decoder::new();
        client.write_all(&first).await.unwrap();
        client.write_all(&second).await.unwrap();
        assert_eq!(
            outcome(&mut client, &mut decoder, 3).await,
            Outcome::Status(b"200".to_vec())
        );
        for _ in 0..2 {
            assert_eq!(
                authorities.recv().await.unwrap().as_deref(),
                Some("localhost:50051")
            );
        }
    }

    /// Everything the server sent on one stream, until it ended or was reset.
    #[derive(Debug, Default)]
    struct Exchange {
        headers: Vec<Fields>,
        data: Vec<u8>,
        reset: Option<u32>,
    }

    async fn exchange(io: &mut UnixStream, stream_id: u32) -> Exchange {
        let mut decoder = Decoder::new();
        let mut seen = Exchange::default();
        let fut = async {
            loop {
                let f = read_frame(io).await.expect("connection closed");
                match f.frame_type {
                    SETTINGS if f.flags & 0x1 == 0 => {
                        io.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
                    }
                    TYPE_HEADERS => {
                        let list = decoder.decode(&f.payload).unwrap();
                        if f.stream_id == stream_id {
                            seen.headers.push(list);
                        }
                    }
                    DATA if f.stream_id == stream_id => seen.data.extend(&f.payload),
                    RST_STREAM if f.stream_id == stream_id => {
                        seen.reset = Some(u32::from_be_bytes(f.payload[..4].try_into().unwrap()));
                        return;
                    }
                    _ => {}
                }
                if f.stream_id == stream_id && f.flags & FLAG_END_STREAM != 0 {
                    return;
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), fut)
            .await
            .expect("server did not answer");
        seen
    }

    fn header<'a>(list: &'a Fields, name: &str) -> Option<&'a [u8]> {
        list.iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| &v[..])
    }

    /// A gRPC health check as grpcio sends it over a Unix socket.
    fn health_check(socket: &str) -> Vec<u8> {
        let mut list = grpc_request(socket);
        list[2].1 = b"/grpc.health.v1.Health/Check".to_vec();
        let mut input = client_start();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &hpack(&mut Encoder::new(), &list),
        ));
        // An empty HealthCheckRequest: uncompressed, zero length.
        input.extend(frame(DATA, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]));
        input
    }

    #[tokio::test]
    async fn tonic_server_answers_socket_path_authority() {
        use tokio_stream::StreamExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pi05.sock");
        for (fixed, name) in [(true, "fixed"), (false, "plain")] {
            let socket = dir.path().join(name);
            let listener = tokio::net::UnixListener::bind(&socket).unwrap();
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let (_reporter, health) = tonic_health::server::health_reporter();
            let router = tonic::transport::Server::builder().add_service(health);
            if fixed {
                let incoming = incoming.map(|conn| conn.map(AuthorityFix::new));
                tokio::spawn(router.serve_with_incoming(incoming));
            } else {
                tokio::spawn(router.serve_with_incoming(incoming));
            }

            let mut client = UnixStream::connect(&socket).await.unwrap();
            let path = path.to_str().unwrap();
            client.write_all(&health_check(path)).await.unwrap();
            let seen = exchange(&mut client, 1).await;
            if fixed {
                assert_eq!(seen.reset, None);
                assert_eq!(header(&seen.headers[0], ":status"), Some(&b"200"[..]));
                // HealthCheckResponse { status: SERVING }.
                assert_eq!(seen.data, [0, 0, 0, 0, 2, 0x08, 0x01]);
                assert_eq!(header(&seen.headers[1], "grpc-status"), Some(&b"0"[..]));
            } else {
                assert_eq!(seen.reset, Some(1), "PROTOCOL_ERROR without the adapter");
            }
        }
    }

    /// What both daemons serve on: `bind_unix` + `unix_incoming`.
    #[tokio::test]
    async fn unix_incoming_answers_socket_path_authority() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/recorder.sock");
        let listener = crate::bind_unix(&socket).unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let router = tonic::transport::Server::builder().add_service(health);
        tokio::spawn(router.serve_with_incoming(crate::unix_incoming(listener)));

        let mut client = UnixStream::connect(&socket).await.unwrap();
        client
            .write_all(&health_check(socket.to_str().unwrap()))
            .await
            .unwrap();
        let seen = exchange(&mut client, 1).await;
        assert_eq!(seen.reset, None);
        assert_eq!(header(&seen.headers[0], ":status"), Some(&b"200"[..]));
        assert_eq!(seen.data, [0, 0, 0, 0, 2, 0x08, 0x01]);
        assert_eq!(header(&seen.headers[1], "grpc-status"), Some(&b"0"[..]));
    }

    #[test]
    fn adapter_is_send_and_sync() {
        fn check<T: Send + Sync + Unpin + 'static>() {}
        check::<AuthorityFix<UnixStream>>();
    }

    #[tokio::test]
    async fn connect_info_is_the_inner_streams() {
        let (_client, server) = UnixStream::pair().unwrap();
        let fix = AuthorityFix::new(server);
        let info: ConnectionInfo<tonic::transport::server::UdsConnectInfo> = fix.connect_info();
        assert!(info.inner.peer_cred.is_some());
        assert!(fix.get_ref().peer_addr().is_ok());
        let (_c2, s2) = UnixStream::pair().unwrap();
        let other = AuthorityFix::new(s2).connect_info();
        assert_ne!(
            info.connection, other.connection,
            "each connection its own number"
        );
    }
}
