//! Trace schema v1: the on-disk format of reflex traces. This module comment is its
//! design document; the types below are the only place the schema is written down in code.
//!
//! # Files
//! One file per server session (and per rotation of it), named by the recorder alone:
//! `<YYYYMMDD>-<HHMMSS>-<model_hash[..8]>-<session_id>.jsonl.gz` (UTC creation time), or
//! `.jsonl` when the session asked for plain text. Nothing in a name comes from the wire
//! unvalidated: `session_id` matches `[0-9A-Za-z-]{8,64}`, `model_hash` is 16 lowercase hex.
//! A `.jsonl.gz` file is one gzip member written with periodic sync flushes (see
//! [`crate::writer`] for the durability contract); readers also accept multi-member gzip and
//! detect compression by the magic bytes, never by the extension.
//!
//! # Records
//! UTF-8 JSON, one object per line, `\n`-terminated. Every record starts with
//! `"kind"` and `"schema_version"`:
//!
//! ```text
//! {"kind":"header","schema_version":1,"reflex_version":"0.1.0","model_hash":"7a8b3c1d9f2e4a55",...}
//! {"kind":"request","schema_version":1,"seq":0,"chunk_id":0,"timestamp":"...","request":{...},...}
//! {"kind":"footer","schema_version":1,"ended_at":"...","total_requests":1843,...}
//! ```
//!
//! - **header** ([`Header`]), exactly one, first: `reflex_version, model_hash, config_hash,
//!   session_id, started_at` (RFC 3339 UTC, ms, `Z`)`, export_dir, model_type, export_kind,
//!   embodiment, hardware` (string map)`, mode, providers` (the engine, `["cpu"]`: the seed
//!   tool's field)`, redaction {image, instruction}, first_seq`,
//!   and `lost_requests` on the first file of a stream that continues a broken one.
//! - **request** ([`RequestRecord`]), one per Act call: `seq, chunk_id, timestamp, request,
//!   response {actions, num_actions, action_dim}, latency {total_ms, stages {queue_ms,
//!   decode_ms, prefix_ms, denoise_ms, postprocess_ms}}` (ms, rounded to 3 decimals; flat
//!   stages of older traces read too)`, denoise
//!   {steps_used, steps_configured, adaptive}, cache {status}, mode, noise_seed`, and
//!   `error {slug, message}` only when Act failed (then `actions` may be empty).
//! - **footer** ([`Footer`]), last, absent when the writer died: `ended_at, total_requests,
//!   dropped_requests, ended_reason` (`shutdown`, `rotated`, `client_lost`,
//!   `recorder_lost`, or the server's reason)`, records_written`, and `refused_requests`
//!   (calls of the server session refused before any work: no seq, no record) when the
//!   server ended the session. The numbers are the
//!   server's (its `SessionEnd`, session-wide) when it sent them; otherwise they come from
//!   the seqs of the file: `total_requests = last_seq - first_seq + 1`, and what is missing
//!   was dropped. `records_written` is always this file's.
//!
//! A session rotated to a new file (size cap) gets a new header — the session's, with the
//! next `first_seq` — and its old file the footer `rotated`; seqs continue across files.
//!
//! **Invariant: the `request` object is the protobuf-JSON form of `reflex.v1.ActRequest`**
//! (proto field names, bytes as standard base64, `uint64` as a decimal string), so
//! `jq -c .request` of a line can be sent as is with `grpcurl -d @`. Its `noise_seed` is the
//! seed the call actually used, so such a replay draws the same noise.
//!
//! # Image modes (`header.redaction.image`)
//! - `full`: the primary image's bytes in `request.image_b64`; `images[0]` is
//!   `{camera, sha256}` without `data`; secondary cameras keep their bytes in `images[i].data`.
//! - `hash_only` (default): `images: [{camera, sha256}]` and `image_sha256`; no image bytes
//!   anywhere in the file.
//! - `none`: no `images`, `image_sha256` or `image_b64` key at all.
//!
//! The recorder applies the mode itself ([`RequestRecord::from_act`]), and it is the only
//! one that does: the server sends canonical images (every image named and hashed, bytes
//! included; `reflex_proto::images`), and whatever a client sent, bytes the mode does not
//! allow never reach the disk. A request that named two primary images (`image_b64` and
//! `images[0].data`; the server refused it) keeps both: `images[0]` like a secondary camera
//! (`data` in `full` only, its own `sha256`) and the other in `image_b64` / `image_sha256`,
//! so that its replay is refused the same way.
//!
//! # Numbers
//! `actions` and `state` are `f32` and read back bit for bit: the writer prints each value
//! as the shortest decimal that round-trips *as an f32* (ryu), and the reader parses that
//! text straight to `f32`. Going through `f64` (what most JSON readers do) rounds twice and
//! is wrong for a few values (±7.038531e-26: an exhaustive check of all 2^32 bit patterns
//! found exactly these two), so the reader never does. JSON has no NaN or infinity:
//! those are written as `null` and read back as NaN. `actions` is written as nested rows
//! (`num_actions` rows of `action_dim`) and held in memory row-major and flat, as the proto
//! has it. Empty or absent optional values are omitted from the line.
//!
//! # Versions and compatibility
//! `schema_version` is dispatched on for every record; a reader rejects a version it does
//! not know and names it. Additive fields do not bump the version: readers ignore unknown
//! fields, and almost every field is optional with a default on the read side (`null`
//! included), so traces of the seed's tool (Reflex 0.7: `request {image_b64 | image_sha256,
//! instruction, state}`, `latency {total_ms}`, no `cache`, `noise_seed` or `chunk_id`) read
//! as well.
//!
//! # The seed tool's traces, both ways
//! - Reading theirs: `request.image_sha256` is then 16 hex digits over the base64 *text*
//!   (`reflex_proto::images::seed_image_hash`; the replayer checks and converts it),
//!   `state` may be `null`, `vlm_conditioning` is read, `providers` is read into the header,
//!   and a footer without `dropped_requests` reads as "unknown" (`None`), never 0.
//! - Theirs reading ours: their reader (`reflex.replay.readers.load_reader`) and A2C2
//!   trainer index `request.instruction`, `request.state`, `response.actions`,
//!   `latency.total_ms` and `latency.stages` of every record, failed calls included, so
//!   `instruction` (`""`) and `state` (`[]`) are always written. `tests/seed_traces.rs`
//!   runs their code on our files.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use reflex_proto::images::fold_primary;
use reflex_proto::v1::{ActRecord, ActRequest, Image, SessionStart};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use crate::clock::UtcTime;

/// The only schema version this crate writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// The `kind` of each record, as written on every line.
pub trait Kind: Serialize {
    /// `"header"`, `"request"` or `"footer"`.
    const KIND: &'static str;
}

/// What a session asked to keep of its images: the one definition, in the image contract
/// (`reflex_proto::images`), with its serde form (`full`, `hash_only`, `none`; any other
/// string reads as `Unknown`).
pub use reflex_proto::images::ImageMode;
/// Lowercase hex SHA-256, and its check: the image contract's.
pub use reflex_proto::images::{is_seed_image_hash, is_sha256_hex, seed_image_hash, sha256_hex};

/// The seed tool's `image_sha256` of image `bytes`: [`seed_image_hash`] of their standard
/// padded base64, the text its client sends (`base64.b64encode(...).decode()`).
pub fn seed_image_hash_of(bytes: &[u8]) -> String {
    use base64::engine::general_purpose::STANDARD;
    seed_image_hash(STANDARD.encode(bytes).as_bytes())
}

/// `header.redaction`: what was left out of the trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redaction {
    #[serde(default, deserialize_with = "nullable")]
    pub image: ImageMode,
    /// `"as_is"`: instructions are recorded as sent.
    #[serde(default, deserialize_with = "nullable")]
    pub instruction: String,
}

impl Default for Redaction {
    fn default() -> Self {
        Redaction {
            image: ImageMode::HashOnly,
            instruction: "as_is".into(),
        }
    }
}

/// The first record of a file: what model ran, where, and how the session is recorded.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Header {
    #[serde(default, deserialize_with = "nullable")]
    pub reflex_version: String,
    #[serde(default, deserialize_with = "nullable")]
    pub model_hash: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config_hash: String,
    #[serde(default, deserialize_with = "nullable")]
    pub session_id: String,
    /// RFC 3339 UTC with milliseconds.
    #[serde(default, deserialize_with = "nullable")]
    pub started_at: String,
    /// As the server saw it; recorded, never opened.
    #[serde(default, deserialize_with = "nullable")]
    pub export_dir: String,
    #[serde(default, deserialize_with = "nullable")]
    pub model_type: String,
    #[serde(default, deserialize_with = "nullable")]
    pub export_kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub embodiment: String,
    #[serde(default, deserialize_with = "string_map")]
    pub hardware: BTreeMap<String, String>,
    /// The export described (format, tokenizer hash, stats source, image range, noise
    /// policy, seed quirks): `SessionStart.export`. Absent in older traces.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "string_map"
    )]
    pub export: BTreeMap<String, String>,
    /// Engine of the session ("cpu", "cuda"; "onnx_gpu" in seed traces).
    #[serde(default, deserialize_with = "nullable")]
    pub mode: String,
    #[serde(default, deserialize_with = "nullable")]
    pub redaction: Redaction,
    /// What ran the model, in the seed tool's field: its ONNX Runtime execution providers
    /// (`["CUDAExecutionProvider"]`), ours the engine (`["cpu"]`, `["cuda"]`). Shown in the
    /// replay header; absent in traces written before it was added.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub providers: Vec<String>,
    /// Seq of the first request this file may hold (rotation and reconnects continue it).
    #[serde(default, deserialize_with = "nullable")]
    pub first_seq: u64,
    /// On the first file of a stream that continues a session after its connection broke:
    /// the records the server handed to the broken stream that never reached the recorder
    /// (the seqs between what the recorder received of the session and this `first_seq`).
    /// Absent on a session's first stream, on rotated files, and when the recorder cannot
    /// tell (it kept no note of the session and finds no file of it in its folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_requests: Option<u64>,
}

impl Kind for Header {
    const KIND: &'static str = "header";
}

/// Why a `SessionStart` cannot become a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("image_mode {0:?} is not one of full, hash_only, none")]
    ImageMode(String),
    #[error("instruction_mode {0:?} is not supported (only as_is)")]
    InstructionMode(String),
}

impl Header {
    /// The header of a session's file. The recorder's clock fills `started_at` when the
    /// server sent none.
    pub fn from_start(start: &SessionStart) -> Result<Header, StartError> {
        let image = ImageMode::parse(&start.image_mode)
            .ok_or_else(|| StartError::ImageMode(start.image_mode.clone()))?;
        let instruction = match start.instruction_mode.as_str() {
            "" | "as_is" => "as_is".to_string(),
            other => return Err(StartError::InstructionMode(other.to_string())),
        };
        let started_at = if start.started_at.is_empty() {
            UtcTime::now().rfc3339_millis()
        } else {
            start.started_at.clone()
        };
        Ok(Header {
            reflex_version: start.reflex_version.clone(),
            model_hash: start.model_hash.clone(),
            config_hash: start.config_hash.clone(),
            session_id: start.session_id.clone(),
            started_at,
            export_dir: start.export_dir.clone(),
            model_type: start.model_type.clone(),
            export_kind: start.export_kind.clone(),
            embodiment: start.embodiment.clone(),
            hardware: start
                .hardware
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            export: start
                .export
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            mode: start.mode.clone(),
            providers: if start.mode.is_empty() {
                Vec::new()
            } else {
                vec![start.mode.clone()]
            },
            redaction: Redaction { image, instruction },
            first_seq: start.first_seq,
            lost_requests: None,
        })
    }
}

/// One Act call.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RequestRecord {
    #[serde(default, deserialize_with = "nullable")]
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_id: Option<u64>,
    /// RFC 3339 UTC, when the call arrived at the server.
    #[serde(default, deserialize_with = "nullable")]
    pub timestamp: String,
    #[serde(default, deserialize_with = "nullable")]
    pub request: TraceRequest,
    #[serde(default, deserialize_with = "nullable")]
    pub response: TraceResponse,
    #[serde(default, deserialize_with = "nullable")]
    pub latency: TraceLatency,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoise: Option<TraceDenoise>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheInfo>,
    #[serde(default, deserialize_with = "nullable")]
    pub mode: String,
    /// The noise seed the call used.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_u64"
    )]
    pub noise_seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TraceError>,
    /// The seed tool's `vlm_conditioning`: `"real"` when the actions came from the images
    /// and instruction; anything else (its stub or fallback paths) means they did not. We
    /// never write it (every reflex answer is conditioned); a replay counts the others.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nullable"
    )]
    pub vlm_conditioning: Option<String>,
}

impl Kind for RequestRecord {
    const KIND: &'static str = "request";
}

/// `request`: the protobuf-JSON form of `reflex.v1.ActRequest` (field names are the
/// proto's; keep them in step with `reflex.proto`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TraceRequest {
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub images: Vec<TraceImage>,
    /// Always written, `""` when empty: the seed tool's reader and A2C2 trainer index it.
    #[serde(default, deserialize_with = "nullable")]
    pub instruction: String,
    /// Always written, `[]` when empty (the seed's tool writes `null`, read as empty).
    #[serde(default, deserialize_with = "f32_vec")]
    pub state: Vec<f32>,
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub episode_id: String,
    /// Written as a decimal string (protobuf JSON's `uint64`); numbers read too.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "u64_as_string",
        deserialize_with = "lenient_u64"
    )]
    pub noise_seed: Option<u64>,
    /// Lowercase hex SHA-256 of the primary image's bytes.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub image_sha256: String,
    /// The request's own flow-matching noise (`ActRequest.noise`), when it sent one.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "f32_vec"
    )]
    pub noise: Vec<f32>,
    /// Encoded bytes of the primary image (`full` mode only), base64 in JSON.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "base64_bytes")]
    pub image_b64: Vec<u8>,
}

/// One camera frame of `request.images` (`reflex.v1.Image`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TraceImage {
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub camera: String,
    /// Encoded bytes, base64 in JSON; only secondary cameras of `full` traces carry them.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "base64_bytes")]
    pub data: Vec<u8>,
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub sha256: String,
}

/// `response`: the action chunk, row-major and flat in memory, nested rows in JSON.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TraceResponse {
    /// `num_actions × action_dim` values, row-major.
    pub actions: Vec<f32>,
    pub num_actions: u32,
    pub action_dim: u32,
}

/// `latency`, milliseconds: `{total_ms, stages: {queue_ms, decode_ms, prefix_ms,
/// denoise_ms, postprocess_ms}}`, the stages nested as the seed tool nests its own.
///
/// Read: stages nested under `stages` or flat beside `total_ms` (our traces before the
/// stages were nested), with or without the `_ms` suffix; a stage name we do not time is
/// kept in [`TraceLatency::other`] and written back under `stages`. Other keys beside
/// `total_ms` (the seed's `rolling_p50_ms` …) are not stages and are skipped.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TraceLatency {
    pub total_ms: f64,
    pub queue_ms: f64,
    pub decode_ms: f64,
    pub prefix_ms: f64,
    pub denoise_ms: f64,
    pub postprocess_ms: f64,
    /// Stages of other writers, by their name (`null` values kept as `None`).
    pub other: BTreeMap<String, Option<f64>>,
}

impl TraceLatency {
    /// The stage fields by their trace names, in the order they are written.
    pub const STAGES: [&'static str; 5] = [
        "queue_ms",
        "decode_ms",
        "prefix_ms",
        "denoise_ms",
        "postprocess_ms",
    ];

    fn stage_mut(&mut self, name: &str) -> Option<&mut f64> {
        let base = name.strip_suffix("_ms").unwrap_or(name);
        Some(match base {
            "queue" => &mut self.queue_ms,
            "decode" => &mut self.decode_ms,
            "prefix" => &mut self.prefix_ms,
            "denoise" => &mut self.denoise_ms,
            "postprocess" => &mut self.postprocess_ms,
            _ => return None,
        })
    }

    fn stage_values(&self) -> [f64; 5] {
        [
            self.queue_ms,
            self.decode_ms,
            self.prefix_ms,
            self.denoise_ms,
            self.postprocess_ms,
        ]
    }
}

/// `denoise`: flow-matching steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TraceDenoise {
    #[serde(default, deserialize_with = "nullable")]
    pub steps_used: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub steps_configured: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub adaptive: bool,
}

/// `cache {status}`: "hit", "miss" or "n/a". A bare string reads too.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct CacheInfo {
    pub status: String,
}

/// `error {slug, message}` of a failed call; `slug` is the gRPC code name. A bare string
/// reads as the message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct TraceError {
    pub slug: String,
    pub message: String,
}

/// The last record of a file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Footer {
    #[serde(default, deserialize_with = "nullable")]
    pub ended_at: String,
    #[serde(default, deserialize_with = "nullable")]
    pub total_requests: u64,
    /// Calls the recording dropped. `None` when the footer does not say (the seed tool's
    /// footer has `total_requests` only): unknown, not 0.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_u64"
    )]
    pub dropped_requests: Option<u64>,
    #[serde(default, deserialize_with = "nullable")]
    pub ended_reason: String,
    /// Request records in this file (absent in seed traces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_written: Option<u64>,
    /// Calls of the whole server session refused with RESOURCE_EXHAUSTED before any work:
    /// they have no seq and no record (absent when the server did not say: a stream that
    /// ended with its connection, a rotated file, an older server, seed traces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_requests: Option<u64>,
}

impl Kind for Footer {
    const KIND: &'static str = "footer";
}

/// One record after the header, as the reader yields it.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Request(Box<RequestRecord>),
    Footer(Footer),
    /// A header after the first line (for example two traces concatenated).
    Header(Box<Header>),
}

/// Why one line is not a v1 record.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("malformed JSON: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("unknown schema_version {0} (this reader knows {SCHEMA_VERSION})")]
    UnknownSchemaVersion(String),
    #[error("unknown record kind {0}")]
    UnknownKind(String),
}

impl RequestRecord {
    /// The trace record of one `ActRecord` as the recorder writes it, with `mode` applied
    /// defensively: image bytes and hashes the mode does not allow are dropped even if the
    /// client sent them, and a missing SHA-256 is computed from the bytes.
    pub fn from_act(act: ActRecord, mode: ImageMode) -> RequestRecord {
        // Every field by name: a field added to `ActRecord` fails to compile here until the
        // trace decides where it goes (the server's `build_record` does the same), instead of
        // being dropped on the way to the disk.
        let ActRecord {
            seq,
            chunk_id,
            timestamp,
            request,
            actions,
            num_actions,
            action_dim,
            latency,
            denoise,
            cache,
            mode: engine_mode,
            noise_seed,
            error,
        } = act;
        let failed = error.is_some();
        let mut request = TraceRequest::recorded(request.unwrap_or_default(), mode);
        if request.noise_seed.is_none() && !failed {
            // The seed the call drew, so that `.request` alone replays bit-exactly.
            request.noise_seed = Some(noise_seed);
        }
        let latency = latency.unwrap_or_default();
        let denoise = denoise.unwrap_or_default();
        RequestRecord {
            seq,
            chunk_id: Some(chunk_id),
            timestamp: if timestamp.is_empty() {
                UtcTime::now().rfc3339_millis()
            } else {
                timestamp
            },
            request,
            response: TraceResponse {
                actions,
                num_actions,
                action_dim,
            },
            latency: TraceLatency {
                total_ms: round3(latency.total_ms),
                queue_ms: round3(latency.queue_ms),
                decode_ms: round3(latency.decode_ms),
                prefix_ms: round3(latency.prefix_ms),
                denoise_ms: round3(latency.denoise_ms),
                postprocess_ms: round3(latency.postprocess_ms),
                other: BTreeMap::new(),
            },
            denoise: Some(TraceDenoise {
                steps_used: denoise.steps_used,
                steps_configured: denoise.steps_configured,
                adaptive: denoise.adaptive,
            }),
            cache: (!cache.is_empty()).then_some(CacheInfo { status: cache }),
            mode: engine_mode,
            noise_seed: Some(noise_seed),
            error: error.map(|e| TraceError {
                slug: e.code,
                message: e.message,
            }),
            vlm_conditioning: None,
        }
    }
}

impl TraceRequest {
    /// Applies the image mode to a request as the server sent it: the one place images are
    /// redacted. The server sends canonical images (bytes and hashes); any other client's
    /// request is read by the same primary-image rule (`reflex_proto::images`).
    fn recorded(req: ActRequest, mode: ImageMode) -> TraceRequest {
        let ActRequest {
            mut images,
            instruction,
            state,
            episode_id,
            noise_seed,
            mut image_b64,
            image_sha256,
            noise,
        } = req;
        let mut out = TraceRequest {
            instruction,
            state,
            episode_id,
            noise_seed,
            noise,
            ..Default::default()
        };
        if matches!(mode, ImageMode::None | ImageMode::Unknown) {
            return out;
        }
        let keep_bytes = mode == ImageMode::Full;
        // A request that names two primary images (the server refused it) is kept as sent,
        // `images[0]` like any other image and `image_b64` beside it, so that its replay is
        // refused the same way; no reader picks one of the two.
        let two_primaries = fold_primary(&mut images, &mut image_b64).is_err();
        // The primary's bytes: after the fold, `images[0].data`; the trace keeps them in
        // `image_b64`.
        let primary = if two_primaries {
            image_b64
        } else {
            images
                .first_mut()
                .map(|first| std::mem::take(&mut first.data))
                .unwrap_or_default()
        };
        let first_sha = match images.first() {
            Some(first) if !two_primaries => first.sha256.as_str(),
            _ => "",
        };
        let primary_sha = first_valid_sha(&[first_sha, &image_sha256])
            .map(str::to_string)
            .or_else(|| (!primary.is_empty()).then(|| sha256_hex(&primary)));
        if images.is_empty() && primary_sha.is_some() {
            images.push(Image::default());
        }
        out.images = images
            .into_iter()
            .enumerate()
            .map(|(i, img)| {
                let sha256 = if i == 0 && !two_primaries {
                    primary_sha.clone().unwrap_or_default()
                } else if is_sha256_hex(&img.sha256) {
                    img.sha256
                } else if !img.data.is_empty() {
                    sha256_hex(&img.data)
                } else {
                    String::new()
                };
                // The primary's bytes were taken above: what is left is secondary cameras'
                // (and, with two primaries, `images[0]`'s).
                let data = if keep_bytes { img.data } else { Vec::new() };
                TraceImage {
                    camera: img.camera,
                    data,
                    sha256,
                }
            })
            .collect();
        out.image_sha256 = primary_sha.unwrap_or_default();
        if keep_bytes {
            out.image_b64 = primary;
        }
        out
    }

    /// The `ActRequest` this record replays (image bytes only where the trace kept them).
    pub fn to_proto(&self) -> ActRequest {
        ActRequest {
            images: self
                .images
                .iter()
                .map(|i| Image {
                    camera: i.camera.clone(),
                    data: i.data.clone(),
                    sha256: i.sha256.clone(),
                })
                .collect(),
            instruction: self.instruction.clone(),
            state: self.state.clone(),
            episode_id: self.episode_id.clone(),
            noise_seed: self.noise_seed,
            image_b64: self.image_b64.clone(),
            image_sha256: self.image_sha256.clone(),
            noise: self.noise.clone(),
        }
    }
}

/// Appends one record as a JSON line (with its `kind`, `schema_version` and `\n`).
pub fn encode_line<T: Kind>(record: &T, out: &mut Vec<u8>) -> serde_json::Result<()> {
    #[derive(Serialize)]
    struct Tagged<'a, T> {
        kind: &'static str,
        schema_version: u32,
        #[serde(flatten)]
        body: &'a T,
    }
    serde_json::to_writer(
        &mut *out,
        &Tagged {
            kind: T::KIND,
            schema_version: SCHEMA_VERSION,
            body: record,
        },
    )?;
    out.push(b'\n');
    Ok(())
}

/// Parses one line (without its `\n`), dispatching on `schema_version`, then `kind`.
pub fn parse_line(line: &[u8]) -> Result<Record, LineError> {
    // Every writer we know puts these two keys first: parse a request line once, straight
    // into its type. Anything else goes through the probe below.
    const FAST: &[u8] = br#"{"kind":"request","schema_version":1,"#;
    if line.starts_with(FAST) {
        return serde_json::from_slice::<RequestRecord>(line)
            .map(|r| Record::Request(Box::new(r)))
            .map_err(LineError::Malformed);
    }
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, default)]
        kind: Option<Cow<'a, str>>,
        #[serde(default)]
        schema_version: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(line).map_err(LineError::Malformed)?;
    match probe.schema_version {
        Some(v) if v.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {}
        Some(v) => return Err(LineError::UnknownSchemaVersion(v.to_string())),
        None => return Err(LineError::UnknownSchemaVersion("(missing)".into())),
    }
    match probe.kind.as_deref() {
        Some("request") => serde_json::from_slice(line).map(|r| Record::Request(Box::new(r))),
        Some("footer") => serde_json::from_slice(line).map(Record::Footer),
        Some("header") => serde_json::from_slice(line).map(|h| Record::Header(Box::new(h))),
        Some(other) => return Err(LineError::UnknownKind(format!("{other:?}"))),
        None => return Err(LineError::UnknownKind("(missing)".into())),
    }
    .map_err(LineError::Malformed)
}

fn first_valid_sha<'a>(candidates: &[&'a str]) -> Option<&'a str> {
    candidates.iter().copied().find(|s| is_sha256_hex(s))
}

fn round3(ms: f64) -> f64 {
    if ms.is_finite() {
        (ms * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------
// serde helpers. Read side: lenient (null is the default, numbers may be strings) and
// allocation-light, since the replayer reads 100,000s of lines through them.
// ---------------------------------------------------------------------------

/// `null` reads as the default value.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn u64_as_string<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// A u64 written as a JSON number or as a decimal string; `null` is `None`.
fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an unsigned integer or a decimal string")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom("negative u64"))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            v.trim()
                .parse()
                .map(Some)
                .map_err(|_| E::custom(format!("{v:?} is not a u64")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// Arrays of f32 (`state`, and `actions` as rows or flat) are taken as one raw slice of
/// the line and scanned here: each number's own text goes straight to `f32` (never via
/// f64, see "Numbers" above), and `null` is NaN. Serde's per-element machinery costs
/// three times the parsing itself on a 350-value chunk, which is why this is not a
/// `Visitor`. Reads only from borrowed input (`from_slice`, `from_str`).
fn scan_f32s(text: &str, max_depth: u32, out: &mut Vec<f32>) -> Result<Shape, String> {
    let b = text.as_bytes();
    let mut shape = Shape::default();
    if text.trim() == "null" {
        return Ok(shape);
    }
    let (mut depth, mut i, mut row_start) = (0u32, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(format!("arrays nested deeper than {max_depth}"));
                }
                row_start = out.len();
                i += 1;
            }
            b']' => {
                if depth == 2 {
                    shape.rows += 1;
                    shape.first_row.get_or_insert(out.len() - row_start);
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b',' | b' ' | b'\n' | b'\r' | b'\t' => i += 1,
            b'n' if b[i..].starts_with(b"null") && depth > 0 => {
                out.push(f32::NAN);
                i += 4;
            }
            b'-' | b'0'..=b'9' if depth > 0 => {
                let start = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let num = &text[start..i];
                out.push(
                    num.parse::<f32>()
                        .map_err(|_| format!("{num} is not a number"))?,
                );
            }
            _ => {
                return Err(format!(
                    "expected an array of numbers, found {}",
                    text.chars().take(40).collect::<String>()
                ));
            }
        }
    }
    Ok(shape)
}

/// Nesting found by [`scan_f32s`].
#[derive(Default)]
struct Shape {
    rows: usize,
    first_row: Option<usize>,
}

fn f32_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    let raw = <&serde_json::value::RawValue>::deserialize(d)?;
    let mut out = Vec::new();
    scan_f32s(raw.get(), 1, &mut out).map_err(de::Error::custom)?;
    Ok(out)
}

impl Serialize for TraceResponse {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Rows<'a>(&'a [f32], usize);
        impl Serialize for Rows<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.chunks(self.1.max(1)))
            }
        }
        let dim = self.action_dim as usize;
        // A shape that does not fit the values is written as one row rather than lost.
        let row = if dim > 0 && self.actions.len().is_multiple_of(dim) {
            dim
        } else {
            self.actions.len()
        };
        let mut st = s.serialize_struct("TraceResponse", 3)?;
        st.serialize_field("actions", &Rows(&self.actions, row))?;
        st.serialize_field("num_actions", &self.num_actions)?;
        st.serialize_field("action_dim", &self.action_dim)?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for TraceResponse {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            actions: Nested,
            #[serde(default, deserialize_with = "nullable")]
            num_actions: Option<u32>,
            #[serde(default, deserialize_with = "nullable")]
            action_dim: Option<u32>,
        }
        let w = Wire::deserialize(d)?;
        let n = w.actions.values.len();
        // Seed traces may lack the shape: take it from the nesting.
        let action_dim = w.action_dim.unwrap_or(match w.actions.first_row {
            Some(r) => r as u32,
            None => n as u32,
        });
        let num_actions = w.num_actions.unwrap_or(match w.actions.first_row {
            Some(_) => w.actions.rows as u32,
            None => u32::from(n > 0),
        });
        Ok(TraceResponse {
            actions: w.actions.values,
            num_actions,
            action_dim,
        })
    }
}

/// `[[f32]]` (or a flat `[f32]`) read into one flat vector without a `Vec` per row.
#[derive(Default)]
struct Nested {
    values: Vec<f32>,
    rows: usize,
    first_row: Option<usize>,
}

impl<'de> Deserialize<'de> for Nested {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&serde_json::value::RawValue>::deserialize(d)?;
        let mut values = Vec::with_capacity(raw.get().len() / 8);
        let shape = scan_f32s(raw.get(), 2, &mut values).map_err(de::Error::custom)?;
        Ok(Nested {
            values,
            rows: shape.rows,
            first_row: shape.first_row,
        })
    }
}

impl Serialize for TraceLatency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeStruct};
        struct Stages<'a>(&'a TraceLatency);
        impl Serialize for Stages<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(5 + self.0.other.len()))?;
                for (name, v) in TraceLatency::STAGES.iter().zip(self.0.stage_values()) {
                    m.serialize_entry(name, &v)?;
                }
                for (name, v) in &self.0.other {
                    m.serialize_entry(name, v)?;
                }
                m.end()
            }
        }
        let mut st = s.serialize_struct("TraceLatency", 2)?;
        st.serialize_field("total_ms", &self.total_ms)?;
        st.serialize_field("stages", &Stages(self))?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for TraceLatency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TraceLatency;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a latency object")
            }
            fn visit_unit<E: de::Error>(self) -> Result<TraceLatency, E> {
                Ok(TraceLatency::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TraceLatency, A::Error> {
                let mut out = TraceLatency::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "total_ms" {
                        out.total_ms = map.next_value::<Option<f64>>()?.unwrap_or_default();
                    } else if key == "stages" {
                        let stages: Option<BTreeMap<String, Option<f64>>> = map.next_value()?;
                        for (name, v) in stages.unwrap_or_default() {
                            match out.stage_mut(&name) {
                                Some(field) => *field = v.unwrap_or_default(),
                                None => {
                                    out.other.insert(name, v);
                                }
                            }
                        }
                    } else if let Some(field) = out.stage_mut(&key)
                        && key.ends_with("_ms")
                    {
                        // A flat stage of our older traces.
                        *field = map.next_value::<Option<f64>>()?.unwrap_or_default();
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for CacheInfo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CacheInfo;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("{\"status\": ...} or a status string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CacheInfo, E> {
                Ok(CacheInfo {
                    status: v.to_string(),
                })
            }
            fn visit_unit<E: de::Error>(self) -> Result<CacheInfo, E> {
                Ok(CacheInfo::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CacheInfo, A::Error> {
                let mut out = CacheInfo::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "status" {
                        out.status = map.next_value::<Option<String>>()?.unwrap_or_default();
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for TraceError {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TraceError;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("{\"slug\": ..., \"message\": ...} or a message string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TraceError, E> {
                Ok(TraceError {
                    slug: String::new(),
                    message: v.to_string(),
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TraceError, A::Error> {
                let mut out = TraceError::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match &*key {
                        // `code` is the proto's name for the slug.
                        "slug" | "code" => {
                            out.slug = map.next_value::<Option<String>>()?.unwrap_or_default()
                        }
                        "message" => {
                            out.message = map.next_value::<Option<String>>()?.unwrap_or_default()
                        }
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// `hardware`: values that are not strings (numbers, booleans, objects) keep their JSON text.
fn string_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: Option<BTreeMap<String, serde_json::Value>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}

/// `bytes` as protobuf JSON has them: standard base64 (URL-safe and unpadded read too).
mod base64_bytes {
    use super::*;
    use base64::engine::DecodePaddingMode;
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};

    const LENIENT: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STD_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
    const URL_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&base64::display::Base64Display::new(v, &STANDARD))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: Option<Cow<'de, str>> = Option::deserialize(d)?;
        let Some(text) = text else {
            return Ok(Vec::new());
        };
        STD_LENIENT
            .decode(text.as_bytes())
            .or_else(|_| URL_LENIENT.decode(text.as_bytes()))
            .map_err(|e| de::Error::custom(format!("invalid base64: {e}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use reflex_proto::v1::{ActError, Denoise, Latency};

    /// A hash_only request record with a full 50×7 chunk of varied actions.
    pub(crate) fn sample_request(seq: u64) -> RequestRecord {
        let mut act = sample_act(seq, b"image");
        act.actions = (0..350)
            .map(|i| ((seq * 350 + i) as f32 * 0.37).sin())
            .collect();
        act.num_actions = 50;
        RequestRecord::from_act(act, ImageMode::HashOnly)
    }

    pub(crate) fn sample_act(seq: u64, image: &[u8]) -> ActRecord {
        ActRecord {
            seq,
            chunk_id: seq,
            timestamp: "2026-04-24T17:13:05.123Z".into(),
            request: Some(ActRequest {
                images: vec![
                    Image {
                        camera: "base".into(),
                        data: image.to_vec(),
                        sha256: String::new(),
                    },
                    Image {
                        camera: "wrist".into(),
                        data: b"wrist-bytes".to_vec(),
                        sha256: String::new(),
                    },
                ],
                instruction: "pick up the red cup".into(),
                state: vec![0.1, -0.2, 3.5e-8, 1.0],
                episode_id: "ep-1".into(),
                noise_seed: None,
                image_b64: Vec::new(),
                image_sha256: String::new(),
                noise: vec![0.5, -1.25],
            }),
            actions: (0..14).map(|i| (i as f32 * 0.1f32).sin() / 3.0).collect(),
            num_actions: 2,
            action_dim: 7,
            latency: Some(Latency {
                total_ms: 98.123456,
                queue_ms: 0.0004,
                decode_ms: 1.5,
                prefix_ms: 20.0,
                denoise_ms: 70.25,
                postprocess_ms: 0.1,
            }),
            denoise: Some(Denoise {
                steps_used: 10,
                steps_configured: 10,
                adaptive: false,
            }),
            cache: "miss".into(),
            mode: "cpu".into(),
            noise_seed: u64::MAX - 7,
            error: None,
        }
    }

    fn line<T: Kind>(r: &T) -> String {
        let mut out = Vec::new();
        encode_line(r, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    #[test]
    fn header_round_trips() {
        let start = SessionStart {
            session_id: "c9d4f0ea-0001".into(),
            reflex_version: "0.1.0".into(),
            model_hash: "7a8b3c1d9f2e4a55".into(),
            config_hash: "e12f44c7b1a93802".into(),
            export_dir: "/srv/export".into(),
            model_type: "pi0.5".into(),
            export_kind: "decomposed".into(),
            embodiment: "franka".into(),
            mode: "cpu".into(),
            hardware: [("gpu".to_string(), "none".to_string())].into(),
            image_mode: "full".into(),
            instruction_mode: String::new(),
            no_gzip: false,
            started_at: "2026-04-24T17:13:05.000Z".into(),
            first_seq: 42,
            export: [("format".to_string(), "reflex-export v2".to_string())].into(),
        };
        let h = Header::from_start(&start).unwrap();
        assert_eq!(h.export["format"], "reflex-export v2");
        let text = line(&h);
        assert!(
            text.starts_with(r#"{"kind":"header","schema_version":1,"reflex_version":"0.1.0""#),
            "{text}"
        );
        assert!(
            text.contains(r#""redaction":{"image":"full","instruction":"as_is"}"#),
            "{text}"
        );
        assert!(text.contains(r#""first_seq":42"#));
        match parse_line(text.trim_end().as_bytes()).unwrap() {
            Record::Header(back) => assert_eq!(*back, h),
            other => panic!("{other:?}"),
        }
        let bad = SessionStart {
            image_mode: "jpeg".into(),
            ..start.clone()
        };
        assert_eq!(
            Header::from_start(&bad),
            Err(StartError::ImageMode("jpeg".into()))
        );
        let bad = SessionStart {
            instruction_mode: "redact".into(),
            ..start
        };
        assert!(matches!(
            Header::from_start(&bad),
            Err(StartError::InstructionMode(_))
        ));
    }

    #[test]
    fn request_round_trips_with_exact_floats() {
        let mut act = sample_act(7, b"primary-image-bytes");
        // Values whose shortest f32 text goes wrong through f64 (double rounding),
        // plus the awkward ones.
        act.actions[0] = 7.038531e-26;
        act.actions[1] = f32::MIN_POSITIVE / 3.0;
        act.actions[2] = -0.0;
        act.actions[3] = f32::MAX;
        act.actions[4] = 16_777_217.0;
        let rec = RequestRecord::from_act(act, ImageMode::HashOnly);
        let text = line(&rec);
        assert!(
            text.starts_with(r#"{"kind":"request","schema_version":1,"seq":7,"chunk_id":7,"#),
            "{text}"
        );
        assert!(
            text.contains(r#""latency":{"total_ms":98.123,"stages":{"queue_ms":0.0,"#),
            "{text}"
        );
        assert!(text.contains(r#""cache":{"status":"miss"}"#));
        assert!(
            text.contains(r#""noise":[0.5,-1.25]"#),
            "the request's own noise: {text}"
        );
        assert!(
            text.contains(&format!(r#""noise_seed":"{}""#, u64::MAX - 7)),
            "request.noise_seed is a string"
        );
        assert!(
            text.contains(&format!(r#""noise_seed":{}}}"#, u64::MAX - 7))
                || text.contains(&format!(r#""noise_seed":{}"#, u64::MAX - 7))
        );
        let back = match parse_line(text.trim_end().as_bytes()).unwrap() {
            Record::Request(r) => *r,
            other => panic!("{other:?}"),
        };
        assert_eq!(back, rec);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.response.actions), bits(&rec.response.actions));
        assert_eq!(bits(&back.request.state), bits(&rec.request.state));
        // Nested rows on disk.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["response"]["actions"].as_array().unwrap().len(), 2);
        assert_eq!(v["response"]["actions"][1].as_array().unwrap().len(), 7);
    }

    #[test]
    fn random_f32_bits_round_trip() {
        // xorshift over the whole bit space, finite values only.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut values = Vec::new();
        while values.len() < 200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f32::from_bits(x as u32);
            if f.is_finite() {
                values.push(f);
            }
        }
        let rec = RequestRecord {
            response: TraceResponse {
                num_actions: (values.len() / 8) as u32,
                action_dim: 8,
                actions: values,
            },
            ..Default::default()
        };
        let back = match parse_line(line(&rec).trim_end().as_bytes()).unwrap() {
            Record::Request(r) => r,
            other => panic!("{other:?}"),
        };
        for (a, b) in rec.response.actions.iter().zip(&back.response.actions) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a:e}");
        }
    }

    #[test]
    fn nan_is_written_as_null_and_read_as_nan() {
        let rec = RequestRecord {
            response: TraceResponse {
                actions: vec![f32::NAN, 1.0],
                num_actions: 1,
                action_dim: 2,
            },
            ..Default::default()
        };
        let text = line(&rec);
        assert!(text.contains(r#""actions":[[null,1.0]]"#), "{text}");
        let Record::Request(back) = parse_line(text.trim_end().as_bytes()).unwrap() else {
            panic!()
        };
        assert!(back.response.actions[0].is_nan());
    }

    #[test]
    fn image_modes_keep_only_what_they_allow() {
        let image = b"\x89PNG-primary-image-bytes-that-must-not-leak".to_vec();
        let (img_b64, wrist_b64) = (b64(&image), b64(b"wrist-bytes"));
        let sha = sha256_hex(&image);

        let full = line(&RequestRecord::from_act(
            sample_act(0, &image),
            ImageMode::Full,
        ));
        let v: serde_json::Value = serde_json::from_str(&full).unwrap();
        assert_eq!(v["request"]["image_b64"], img_b64.as_str());
        assert_eq!(v["request"]["image_sha256"], sha.as_str());
        assert_eq!(
            v["request"]["images"][0],
            serde_json::json!({"camera": "base", "sha256": sha})
        );
        assert_eq!(v["request"]["images"][1]["data"], wrist_b64.as_str());

        let hash = line(&RequestRecord::from_act(
            sample_act(0, &image),
            ImageMode::HashOnly,
        ));
        assert!(
            !hash.contains(&img_b64) && !hash.contains(&wrist_b64),
            "{hash}"
        );
        assert!(!hash.contains("image_b64") && !hash.contains("\"data\""));
        let v: serde_json::Value = serde_json::from_str(&hash).unwrap();
        assert_eq!(v["request"]["image_sha256"], sha.as_str());
        assert_eq!(
            v["request"]["images"][1]["sha256"],
            sha256_hex(b"wrist-bytes").as_str()
        );

        // A client that sent the single-image field and a hash of its own.
        let mut act = sample_act(0, &image);
        let req = act.request.as_mut().unwrap();
        req.images.clear();
        req.image_b64 = image.clone();
        req.image_sha256 = "ab".repeat(32);
        let hash2 = line(&RequestRecord::from_act(act, ImageMode::HashOnly));
        assert!(!hash2.contains(&img_b64));
        let v: serde_json::Value = serde_json::from_str(&hash2).unwrap();
        assert_eq!(v["request"]["image_sha256"], "ab".repeat(32));
        assert_eq!(
            v["request"]["images"],
            serde_json::json!([{"sha256": "ab".repeat(32)}])
        );

        let none = line(&RequestRecord::from_act(
            sample_act(0, &image),
            ImageMode::None,
        ));
        for key in [
            "images",
            "image_sha256",
            "image_b64",
            &img_b64,
            &wrist_b64,
            &sha,
        ] {
            assert!(!none.contains(key), "{key} in {none}");
        }
    }

    /// What the server's own stripping promised before only the recorder redacted (moved
    /// from the server's `recording` tests): a canonical record, named and hashed with its
    /// bytes, keeps per mode exactly what the mode allows.
    #[test]
    fn canonical_records_are_redacted_by_the_session_mode() {
        let cameras = ["base".to_string(), "wrist".to_string()];
        let sent = ActRequest {
            images: vec![Image {
                camera: String::new(),
                data: b"JPEGBYTES".to_vec(),
                sha256: String::new(),
            }],
            ..Default::default()
        };
        // The policy's hash of the primary, reused by the server.
        let known = [Some("aa".repeat(32)), None];
        let canonical = reflex_proto::images::canonical_request(&sent, &cameras, &known);
        let act = |req: &ActRequest| ActRecord {
            request: Some(req.clone()),
            ..sample_act(0, b"")
        };
        let full = RequestRecord::from_act(act(&canonical), ImageMode::Full).request;
        assert_eq!(full.images[0].camera, "base");
        assert_eq!(full.image_b64, b"JPEGBYTES");
        assert_eq!(full.images[0].sha256, "aa".repeat(32));
        assert_eq!(full.image_sha256, "aa".repeat(32));
        let hashed = RequestRecord::from_act(act(&canonical), ImageMode::HashOnly).request;
        assert!(hashed.images[0].data.is_empty() && hashed.image_b64.is_empty());
        assert_eq!(hashed.images[0].sha256, "aa".repeat(32));
        let none = RequestRecord::from_act(act(&canonical), ImageMode::None).request;
        assert!(
            none.images.is_empty() && none.image_sha256.is_empty() && none.image_b64.is_empty()
        );
    }

    /// Regression: with `image_b64` and `images[0].data` both set (the server answers
    /// INVALID_ARGUMENT), the recorder kept `images[0].data` as the primary and dropped
    /// `image_b64`, so the recorded request replayed as a valid one.
    #[test]
    fn two_primary_images_are_recorded_as_sent() {
        let mut act = sample_act(0, b"IMAGES0");
        act.request.as_mut().unwrap().image_b64 = b"B64".to_vec();
        let full = RequestRecord::from_act(act.clone(), ImageMode::Full).request;
        assert_eq!(full.images[0].data, b"IMAGES0");
        assert_eq!(full.images[0].sha256, sha256_hex(b"IMAGES0"));
        assert_eq!(full.image_b64, b"B64");
        assert_eq!(full.image_sha256, sha256_hex(b"B64"));
        assert_eq!(full.images[1].data, b"wrist-bytes");
        // Replayed, it names two primary images again.
        let back = full.to_proto();
        let (mut images, mut b64) = (back.images, back.image_b64);
        assert!(fold_primary(&mut images, &mut b64).is_err());
        let hashed = RequestRecord::from_act(act, ImageMode::HashOnly).request;
        assert!(hashed.images.iter().all(|i| i.data.is_empty()) && hashed.image_b64.is_empty());
        assert_eq!(hashed.images[0].sha256, sha256_hex(b"IMAGES0"));
        assert_eq!(hashed.image_sha256, sha256_hex(b"B64"));
    }

    #[test]
    fn request_object_uses_the_proto_field_names() {
        let rec = RequestRecord::from_act(sample_act(0, b"img"), ImageMode::Full);
        let v: serde_json::Value = serde_json::from_str(&line(&rec)).unwrap();
        let proto = include_str!("../../proto/proto/reflex/v1/reflex.proto");
        let fields_of = |message: &str| -> Vec<String> {
            let body = proto
                .split(&format!("message {message} {{"))
                .nth(1)
                .unwrap()
                .split("\n}")
                .next()
                .unwrap();
            body.lines()
                .filter_map(|l| {
                    let l = l.trim();
                    (!l.starts_with("//") && l.contains(" = ")).then(|| {
                        l.split(" = ")
                            .next()
                            .unwrap()
                            .split_whitespace()
                            .last()
                            .unwrap()
                            .to_string()
                    })
                })
                .collect()
        };
        let act_request = fields_of("ActRequest");
        for key in v["request"].as_object().unwrap().keys() {
            assert!(
                act_request.contains(key),
                "request.{key} is not an ActRequest field: {act_request:?}"
            );
        }
        assert_eq!(
            v["request"].as_object().unwrap().len(),
            act_request.len(),
            "every field is set here"
        );
        let image = fields_of("Image");
        for key in v["request"]["images"][1].as_object().unwrap().keys() {
            assert!(image.contains(key), "{key} not in {image:?}");
        }
        // The proto's latency fields: total_ms beside the stages, the stages nested.
        let mut latency = fields_of("Latency");
        latency.sort();
        let mut keys: Vec<_> = v["latency"]["stages"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        keys.push("total_ms".into());
        keys.sort();
        assert_eq!(keys, latency);
        assert_eq!(v["latency"].as_object().unwrap().len(), 2);
        // Replays as the request it was (with the noise seed the call used).
        let back = rec.request.to_proto();
        assert_eq!(back.noise_seed, Some(u64::MAX - 7));
        assert_eq!(back.image_b64, b"img");
    }

    #[test]
    fn failed_call_records_its_error() {
        let mut act = sample_act(3, b"x");
        act.actions.clear();
        act.num_actions = 0;
        act.error = Some(ActError {
            code: "INVALID_ARGUMENT".into(),
            message: "state has 3 values, expected 4".into(),
        });
        let rec = RequestRecord::from_act(act, ImageMode::HashOnly);
        assert_eq!(rec.request.noise_seed, None, "a failed call drew no noise");
        let text = line(&rec);
        assert!(text.contains(
            r#""error":{"slug":"INVALID_ARGUMENT","message":"state has 3 values, expected 4"}"#
        ));
        assert!(text.contains(r#""actions":[]"#));
        let Record::Request(back) = parse_line(text.trim_end().as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(*back, rec);
    }

    #[test]
    fn footer_round_trips() {
        let f = Footer {
            ended_at: "2026-04-24T18:00:00.000Z".into(),
            total_requests: 1843,
            dropped_requests: Some(2),
            ended_reason: "shutdown".into(),
            records_written: Some(1841),
            refused_requests: None,
        };
        let text = line(&f);
        assert_eq!(
            text,
            "{\"kind\":\"footer\",\"schema_version\":1,\"ended_at\":\"2026-04-24T18:00:00.000Z\",\"total_requests\":1843,\"dropped_requests\":2,\"ended_reason\":\"shutdown\",\"records_written\":1841}\n"
        );
        assert_eq!(
            parse_line(text.trim_end().as_bytes()).unwrap(),
            Record::Footer(f)
        );
    }

    #[test]
    fn dispatch_errors() {
        let e = parse_line(br#"{"kind":"request","schema_version":2,"seq":0}"#).unwrap_err();
        assert!(
            matches!(&e, LineError::UnknownSchemaVersion(v) if v == "2"),
            "{e}"
        );
        let e = parse_line(br#"{"kind":"request","seq":0}"#).unwrap_err();
        assert!(matches!(e, LineError::UnknownSchemaVersion(_)));
        let e = parse_line(br#"{"schema_version":1,"kind":"metrics"}"#).unwrap_err();
        assert!(
            matches!(&e, LineError::UnknownKind(k) if k == "\"metrics\""),
            "{e}"
        );
        let e = parse_line(br#"{"kind":"request","schema_version":1,"seq":"#).unwrap_err();
        assert!(matches!(e, LineError::Malformed(_)));
        // Key order and unknown fields do not matter.
        let r = parse_line(
            br#"{"future":{"x":[1,2]},"seq":5,"schema_version":1,"kind":"request","mode":"cpu"}"#,
        )
        .unwrap();
        assert!(matches!(r, Record::Request(r) if r.seq == 5 && r.mode == "cpu"));
    }

    #[test]
    fn reads_seed_style_records() {
        let line = br#"{"kind":"request","schema_version":1,"seq":0,"chunk_id":null,"timestamp":"2026-04-24T17:13:05.412Z","request":{"image_b64":"aGVsbG8=","instruction":"pick up the cup","state":[0.1,0.2]},"response":{"actions":[[0.10000000149011612,0.5],[1,2]],"latency_ms":98.1},"latency":{"total_ms":98.1},"denoise":{"steps":10},"mode":"onnx_gpu","cache":"hit","error":null}"#;
        let Record::Request(r) = parse_line(line).unwrap() else {
            panic!()
        };
        assert_eq!(r.request.image_b64, b"hello");
        assert_eq!(r.response.actions, vec![0.1, 0.5, 1.0, 2.0]);
        assert_eq!((r.response.num_actions, r.response.action_dim), (2, 2));
        assert_eq!(r.cache.unwrap().status, "hit");
        assert_eq!(r.noise_seed, None);
        assert_eq!(r.chunk_id, None);
        assert_eq!(r.error, None);
        assert_eq!(r.latency.total_ms, 98.1);
    }

    #[test]
    fn latency_reads_nested_flat_and_seed_stage_names() {
        let read = |json: &str| -> TraceLatency { serde_json::from_str(json).unwrap() };
        // Ours, nested.
        let nested = read(
            r#"{"total_ms":9.5,"stages":{"queue_ms":0.5,"decode_ms":1,"prefix_ms":2,"denoise_ms":5,"postprocess_ms":1}}"#,
        );
        assert_eq!(
            (nested.total_ms, nested.stage_values()),
            (9.5, [0.5, 1.0, 2.0, 5.0, 1.0])
        );
        assert!(nested.other.is_empty());
        // Ours before the stages were nested: flat beside total_ms.
        let flat = read(
            r#"{"total_ms":9.5,"queue_ms":0.5,"decode_ms":1,"prefix_ms":2,"denoise_ms":5,"postprocess_ms":1}"#,
        );
        assert_eq!(flat, nested);
        // The seed tool's: any names, nullable, and rolling percentiles that are not stages.
        let seed = read(
            r#"{"total_ms":98.0,"stages":{"prefix":20.0,"vlm_forward_ms":40.5,"expert_ms":null},"rolling_p50_ms":97.0}"#,
        );
        assert_eq!(
            (seed.total_ms, seed.prefix_ms, seed.denoise_ms),
            (98.0, 20.0, 0.0)
        );
        assert_eq!(seed.other.len(), 2);
        assert_eq!(seed.other["vlm_forward_ms"], Some(40.5));
        assert_eq!(seed.other["expert_ms"], None);
        // Unknown stages are written back under `stages`.
        let back = serde_json::to_value(&seed).unwrap();
        assert_eq!(back["stages"]["vlm_forward_ms"], 40.5);
        assert!(back["stages"]["expert_ms"].is_null());
        assert_eq!(back["stages"]["prefix_ms"], 20.0);
        assert_eq!(read(&back.to_string()), seed);
        assert_eq!(read("null"), TraceLatency::default());
    }

    #[test]
    fn seed_header_and_footer_read_with_providers_and_unknown_drops() {
        let header = r#"{"kind":"header","schema_version":1,"session_id":"5b0e","started_at":"2026-04-24T17:13:05.000Z","model_hash":"7a8b3c1d9f2e4a55","config_hash":"","export_dir":"/x","model_type":"pi0","export_kind":"monolithic","embodiment":null,"hardware":{"gpu":"","cuda":"","ort":"1.20.1"},"providers":["CUDAExecutionProvider","CPUExecutionProvider"],"sample_rate":1.0,"redaction":{"image":"full","instruction":"full"},"notes":"","reflex_version":"0.11.2"}"#;
        let Record::Header(h) = parse_line(header.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(
            h.providers,
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
        );
        assert_eq!(
            (h.embodiment.as_str(), h.redaction.image),
            ("", ImageMode::Full)
        );
        let footer = r#"{"kind":"footer","schema_version":1,"ended_at":"2026-04-24T17:20:00.000Z","total_requests":4}"#;
        let Record::Footer(f) = parse_line(footer.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!((f.total_requests, f.dropped_requests), (4, None));
        // Ours always says, 0 included.
        let ours = Footer {
            dropped_requests: Some(0),
            ..Default::default()
        };
        assert!(line(&ours).contains(r#""dropped_requests":0"#));
        let request = r#"{"kind":"request","schema_version":1,"seq":0,"chunk_id":0,"timestamp":"2026-04-24T17:13:05.412Z","request":{"instruction":"pick","state":null,"image_sha256":"6f5c445fb1a70752"},"response":{"actions":[[0.5]],"num_actions":1,"action_dim":1},"latency":{"total_ms":3.0},"denoise":{"steps_used":0,"steps_configured":0,"adaptive":false},"mode":"onnx_cpu","vlm_conditioning":"stub"}"#;
        let Record::Request(r) = parse_line(request.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(r.vlm_conditioning.as_deref(), Some("stub"));
        assert!(r.request.state.is_empty());
        assert_eq!(r.request.image_sha256, "6f5c445fb1a70752");
    }

    #[test]
    fn our_header_names_the_engine_as_providers() {
        let start = SessionStart {
            mode: "cpu".into(),
            ..Default::default()
        };
        let h = Header::from_start(&start).unwrap();
        assert!(line(&h).contains(r#""providers":["cpu"]"#), "{}", line(&h));
    }

    /// Regression: a failed call with no instruction and no state was written without
    /// `request.instruction` and `request.state`, and the seed tool's A2C2 trainer, which
    /// indexes both on every record, raised KeyError on our traces.
    #[test]
    fn empty_instruction_and_state_are_written() {
        let mut act = sample_act(1, b"x");
        act.request.as_mut().unwrap().instruction.clear();
        act.request.as_mut().unwrap().state.clear();
        act.actions.clear();
        act.error = Some(reflex_proto::v1::ActError {
            code: "INVALID_ARGUMENT".into(),
            message: "no state".into(),
        });
        let rec = RequestRecord::from_act(act, ImageMode::HashOnly);
        let v: serde_json::Value = serde_json::from_str(&line(&rec)).unwrap();
        assert_eq!(v["request"]["instruction"], "");
        assert_eq!(v["request"]["state"], serde_json::json!([]));
        assert!(v["latency"]["stages"].is_object());
    }
}
