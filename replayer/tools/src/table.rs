//! `--to parquet`: one row per Act, every field of the record flattened into columns (the
//! schema is [`schema`], documented in the README), zstd, one row group per
//! [`ROWS_PER_GROUP`] rows so memory stays bounded by one group. Image bytes are not
//! copied (MCAP and LeRobot carry them); cameras and their SHA-256 are.
//!
//! Also the Parquet writer settings and Arrow helpers the LeRobot export shares.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Float64Builder, ListBuilder, StringBuilder,
    TimestampMicrosecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::TraceToolError;
use crate::input::{Act, ReadNote, for_each_act, total_bytes};
use crate::output::PendingFile;
use crate::progress::Progress;

/// Rows per row group: about 1.5 KB of actions a row keeps a group near 12 MB in memory.
pub const ROWS_PER_GROUP: usize = 8192;

/// zstd level 3 (the zstd default): most of the size win for little CPU.
pub fn writer_properties(rows_per_group: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("3 is a valid level"),
        ))
        .set_max_row_group_row_count(Some(rows_per_group))
        .set_created_by(format!("reflex {}", env!("CARGO_PKG_VERSION")))
        .build()
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

/// The columns of `--to parquet`, in order.
pub fn schema() -> SchemaRef {
    use DataType::*;
    let f = |name: &str, t: DataType, nullable: bool| Field::new(name, t, nullable);
    Arc::new(Schema::new(vec![
        f("trace_file", Utf8, false),
        f("session_id", Utf8, false),
        f("model_hash", Utf8, false),
        f("embodiment", Utf8, false),
        f("image_mode", Utf8, false),
        f("seq", UInt64, false),
        f("chunk_id", UInt64, true),
        f(
            "timestamp",
            Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        f("episode_id", Utf8, false),
        f("instruction", Utf8, false),
        f("state", list_of(Float32), false),
        f("cameras", list_of(Utf8), false),
        f("image_sha256", list_of(Utf8), false),
        f("num_actions", UInt32, false),
        f("action_dim", UInt32, false),
        f("actions", list_of(Float32), false),
        f("latency_total_ms", Float64, false),
        f("latency_queue_ms", Float64, false),
        f("latency_decode_ms", Float64, false),
        f("latency_prefix_ms", Float64, false),
        f("latency_denoise_ms", Float64, false),
        f("latency_postprocess_ms", Float64, false),
        f("denoise_steps_used", UInt32, true),
        f("denoise_steps_configured", UInt32, true),
        f("denoise_adaptive", Boolean, true),
        f("cache_status", Utf8, true),
        f("engine_mode", Utf8, false),
        f("noise_seed", UInt64, true),
        f("error_slug", Utf8, true),
        f("error_message", Utf8, true),
    ]))
}

/// Column builders for one row group.
struct Rows {
    trace_file: StringBuilder,
    session_id: StringBuilder,
    model_hash: StringBuilder,
    embodiment: StringBuilder,
    image_mode: StringBuilder,
    seq: UInt64Builder,
    chunk_id: UInt64Builder,
    timestamp: TimestampMicrosecondBuilder,
    episode_id: StringBuilder,
    instruction: StringBuilder,
    state: ListBuilder<Float32Builder>,
    cameras: ListBuilder<StringBuilder>,
    image_sha256: ListBuilder<StringBuilder>,
    num_actions: UInt32Builder,
    action_dim: UInt32Builder,
    actions: ListBuilder<Float32Builder>,
    latency: [Float64Builder; 6],
    steps_used: UInt32Builder,
    steps_configured: UInt32Builder,
    adaptive: BooleanBuilder,
    cache: StringBuilder,
    engine_mode: StringBuilder,
    noise_seed: UInt64Builder,
    error_slug: StringBuilder,
    error_message: StringBuilder,
    len: usize,
}

impl Rows {
    fn new() -> Rows {
        Rows {
            trace_file: StringBuilder::new(),
            session_id: StringBuilder::new(),
            model_hash: StringBuilder::new(),
            embodiment: StringBuilder::new(),
            image_mode: StringBuilder::new(),
            seq: UInt64Builder::new(),
            chunk_id: UInt64Builder::new(),
            timestamp: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            episode_id: StringBuilder::new(),
            instruction: StringBuilder::new(),
            state: ListBuilder::new(Float32Builder::new()),
            cameras: ListBuilder::new(StringBuilder::new()),
            image_sha256: ListBuilder::new(StringBuilder::new()),
            num_actions: UInt32Builder::new(),
            action_dim: UInt32Builder::new(),
            actions: ListBuilder::new(Float32Builder::new()),
            latency: std::array::from_fn(|_| Float64Builder::new()),
            steps_used: UInt32Builder::new(),
            steps_configured: UInt32Builder::new(),
            adaptive: BooleanBuilder::new(),
            cache: StringBuilder::new(),
            engine_mode: StringBuilder::new(),
            noise_seed: UInt64Builder::new(),
            error_slug: StringBuilder::new(),
            error_message: StringBuilder::new(),
            len: 0,
        }
    }

    fn push(&mut self, act: &Act<'_>, micros: i64) {
        let (h, r) = (act.header, act.record);
        let file = act
            .path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        self.trace_file.append_value(file);
        self.session_id.append_value(&h.session_id);
        self.model_hash.append_value(&h.model_hash);
        self.embodiment.append_value(&h.embodiment);
        self.image_mode.append_value(h.redaction.image.as_str());
        self.seq.append_value(r.seq);
        self.chunk_id.append_option(r.chunk_id);
        self.timestamp.append_value(micros);
        self.episode_id.append_value(&r.request.episode_id);
        self.instruction.append_value(&r.request.instruction);
        self.state.values().append_slice(&r.request.state);
        self.state.append(true);
        for (camera, sha) in cameras(r) {
            self.cameras.values().append_value(camera);
            self.image_sha256.values().append_value(sha);
        }
        self.cameras.append(true);
        self.image_sha256.append(true);
        self.num_actions.append_value(r.response.num_actions);
        self.action_dim.append_value(r.response.action_dim);
        self.actions.values().append_slice(&r.response.actions);
        self.actions.append(true);
        let l = &r.latency;
        for (b, v) in self.latency.iter_mut().zip([
            l.total_ms,
            l.queue_ms,
            l.decode_ms,
            l.prefix_ms,
            l.denoise_ms,
            l.postprocess_ms,
        ]) {
            b.append_value(v);
        }
        self.steps_used
            .append_option(r.denoise.as_ref().map(|d| d.steps_used));
        self.steps_configured
            .append_option(r.denoise.as_ref().map(|d| d.steps_configured));
        self.adaptive
            .append_option(r.denoise.as_ref().map(|d| d.adaptive));
        self.cache
            .append_option(r.cache.as_ref().map(|c| &c.status));
        self.engine_mode.append_value(&r.mode);
        self.noise_seed
            .append_option(r.noise_seed.or(r.request.noise_seed));
        self.error_slug
            .append_option(r.error.as_ref().map(|e| &e.slug));
        self.error_message
            .append_option(r.error.as_ref().map(|e| &e.message));
        self.len += 1;
    }

    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, arrow_schema::ArrowError> {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.trace_file.finish()),
            Arc::new(self.session_id.finish()),
            Arc::new(self.model_hash.finish()),
            Arc::new(self.embodiment.finish()),
            Arc::new(self.image_mode.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.chunk_id.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.episode_id.finish()),
            Arc::new(self.instruction.finish()),
            Arc::new(self.state.finish()),
            Arc::new(self.cameras.finish()),
            Arc::new(self.image_sha256.finish()),
            Arc::new(self.num_actions.finish()),
            Arc::new(self.action_dim.finish()),
            Arc::new(self.actions.finish()),
        ];
        for b in &mut self.latency {
            cols.push(Arc::new(b.finish()));
        }
        cols.extend([
            Arc::new(self.steps_used.finish()) as ArrayRef,
            Arc::new(self.steps_configured.finish()),
            Arc::new(self.adaptive.finish()),
            Arc::new(self.cache.finish()),
            Arc::new(self.engine_mode.finish()),
            Arc::new(self.noise_seed.finish()),
            Arc::new(self.error_slug.finish()),
            Arc::new(self.error_message.finish()),
        ]);
        self.len = 0;
        RecordBatch::try_new(schema.clone(), cols)
    }
}

/// Every camera of a record with its SHA-256, primary first (empty for `none` traces).
pub fn cameras(r: &reflex_recorder::trace::RequestRecord) -> Vec<(&str, &str)> {
    let mut out: Vec<(&str, &str)> = r
        .request
        .images
        .iter()
        .map(|i| (i.camera.as_str(), i.sha256.as_str()))
        .collect();
    if out.is_empty() && !r.request.image_sha256.is_empty() {
        // The seed tool's traces: one unnamed primary image.
        out.push(("primary", r.request.image_sha256.as_str()));
    }
    out
}

/// Microseconds since the epoch of a record's timestamp.
pub fn micros(act: &Act<'_>) -> Result<i64, TraceToolError> {
    crate::time::unix_nanos(&act.record.timestamp)
        .map(|ns| (ns / 1000) as i64)
        .ok_or_else(|| TraceToolError::BadTimestamp {
            path: act.path.into(),
            seq: act.record.seq,
            timestamp: act.record.timestamp.clone(),
        })
}

/// Opens an Arrow Parquet writer on `file` with our settings.
pub fn open_writer(
    path: &Path,
    file: BufWriter<File>,
    schema: SchemaRef,
    rows_per_group: usize,
) -> Result<ArrowWriter<BufWriter<File>>, TraceToolError> {
    ArrowWriter::try_new(file, schema, Some(writer_properties(rows_per_group))).map_err(|source| {
        TraceToolError::Parquet {
            path: path.into(),
            source,
        }
    })
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub acts: u64,
    pub notes: Vec<ReadNote>,
}

/// `reflex trace export TRACE... --to parquet OUT`.
pub fn export(
    traces: &[std::path::PathBuf],
    out: &Path,
    force: bool,
) -> Result<Exported, TraceToolError> {
    let (pending, file) = PendingFile::create(out, force)?;
    let schema = schema();
    let mut writer = open_writer(out, file, schema.clone(), ROWS_PER_GROUP)?;
    let pq = |source| TraceToolError::Parquet {
        path: out.into(),
        source,
    };
    let arrow = |source| TraceToolError::Arrow {
        path: out.into(),
        source,
    };
    let mut rows = Rows::new();
    let mut acts = 0u64;
    let mut progress = Progress::new("parquet", total_bytes(traces));
    let notes = for_each_act(traces, &mut progress, |act| {
        rows.push(act, micros(act)?);
        acts += 1;
        if rows.len >= ROWS_PER_GROUP {
            writer
                .write(&rows.finish(&schema).map_err(arrow)?)
                .map_err(pq)?;
        }
        Ok(())
    })?;
    if rows.len > 0 {
        writer
            .write(&rows.finish(&schema).map_err(arrow)?)
            .map_err(pq)?;
    }
    let file = writer.into_inner().map_err(pq)?;
    let file = file.into_inner().map_err(|e| TraceToolError::Write {
        path: out.into(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(crate::output::write_err(out))?;
    pending.finish()?;
    Ok(Exported { acts, notes })
}
