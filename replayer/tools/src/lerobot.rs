//! `--to lerobot`: a LeRobotDataset v3.0 folder, the layout LeRobot's own reader loads.
//!
//! ```text
//! DIR/meta/info.json                          codebase_version v3.0, fps, features, totals
//! DIR/meta/stats.json                         min/max/mean/std/count per numeric feature
//! DIR/meta/tasks.parquet                      task (the instruction; pandas index) → task_index
//! DIR/meta/episodes/chunk-000/file-000.parquet  one row per episode: length, index range, tasks
//! DIR/data/chunk-000/file-000.parquet         one row per Act (a frame)
//! ```
//!
//! A frame is one successful Act: `observation.state` (the request's state), `action` (the
//! first step of the answered chunk: what a robot executes next), `action_chunk` (the whole
//! chunk, `num_actions × action_dim`), `timestamp` (seconds since the episode's first Act),
//! `frame_index`, `episode_index`, `index`, `task_index`, and for `full` traces one image
//! feature `observation.images.<camera>` per camera (the encoded JPEG/PNG bytes, as
//! LeRobot stores image features; no video encoding is done here). Failed Acts have no
//! action and are skipped (counted in the log). `hash_only` and `none` traces export
//! without images, and the log says so.
//!
//! Episodes: one per `episode_id`, in order of appearance; an id that comes back after
//! another episode started is a new episode (so every episode is one contiguous range of
//! rows, written in one streaming pass). `fps` is the measured Act rate, rounded (≥ 1).
//! Episode ids and camera names are never paths: episodes are numbered, camera names are
//! sanitised into feature keys.
//!
//! The folder is built as `.DIR.partial` beside DIR and renamed into place when complete.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, FixedSizeListBuilder, Float32Builder, Int64Builder, ListBuilder, StringBuilder,
    StructBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use serde_json::{Value, json};

use crate::TraceToolError;
use crate::foxglove::image_bytes;
use crate::input::{Act, ReadNote, for_each_act, total_bytes};
use crate::output::write_err;
use crate::progress::Progress;
use crate::table::{micros, open_writer};

/// Rows per row group: with images (~40 KB a frame for two cameras) about 10 MB.
const ROWS_PER_GROUP_IMAGES: usize = 256;
const ROWS_PER_GROUP: usize = 8192;

/// What `--to lerobot` wrote.
#[derive(Debug, Clone)]
pub struct LeRobotExport {
    pub frames: u64,
    pub episodes: u64,
    pub tasks: u64,
    pub fps: u32,
    pub cameras: Vec<String>,
    pub skipped_failed: u64,
    pub notes: Vec<ReadNote>,
}

/// The dataset's fixed shapes, from its first successful Act.
struct Shape {
    state_dim: usize,
    num_actions: usize,
    action_dim: usize,
    /// (original camera name, feature key, height, width)
    cameras: Vec<(String, String, u32, u32)>,
}

struct Episode {
    id: String,
    length: u64,
    from: u64,
    tasks: Vec<usize>,
    first_ns: i128,
    last_ns: i128,
}

/// Per-dimension running min/max/sum/sum of squares.
struct Moments {
    min: Vec<f64>,
    max: Vec<f64>,
    sum: Vec<f64>,
    sq: Vec<f64>,
    n: u64,
}

impl Moments {
    fn new(dims: usize) -> Moments {
        Moments {
            min: vec![f64::INFINITY; dims],
            max: vec![f64::NEG_INFINITY; dims],
            sum: vec![0.0; dims],
            sq: vec![0.0; dims],
            n: 0,
        }
    }

    fn add(&mut self, v: impl IntoIterator<Item = f64>) {
        for (i, x) in v.into_iter().enumerate() {
            self.min[i] = self.min[i].min(x);
            self.max[i] = self.max[i].max(x);
            self.sum[i] += x;
            self.sq[i] += x * x;
        }
        self.n += 1;
    }

    /// `{min, max, mean, std, count}`, each shaped by `rows` (0: flat).
    fn json(&self, rows: usize) -> Value {
        let n = self.n.max(1) as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let std: Vec<f64> = self
            .sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / n - m * m).max(0.0).sqrt())
            .collect();
        let shape = |v: &[f64]| -> Value {
            match v.len().checked_div(rows) {
                Some(width) => json!(v.chunks(width).collect::<Vec<_>>()),
                None => json!(v),
            }
        };
        json!({
            "min": shape(&self.min),
            "max": shape(&self.max),
            "mean": shape(&mean),
            "std": shape(&std),
            "count": [self.n],
        })
    }
}

/// Column builders of the data file.
struct Frames {
    schema: SchemaRef,
    state: FixedSizeListBuilder<Float32Builder>,
    action: FixedSizeListBuilder<Float32Builder>,
    chunk: ListBuilder<ListBuilder<Float32Builder>>,
    timestamp: Float32Builder,
    frame_index: Int64Builder,
    episode_index: Int64Builder,
    index: Int64Builder,
    task_index: Int64Builder,
    images: Vec<StructBuilder>,
    len: usize,
}

fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

impl Frames {
    fn new(shape: &Shape) -> Frames {
        let f32_item = || Arc::new(Field::new("item", DataType::Float32, true));
        let mut fields = vec![
            Field::new(
                "observation.state",
                DataType::FixedSizeList(f32_item(), shape.state_dim as i32),
                false,
            ),
            Field::new(
                "action",
                DataType::FixedSizeList(f32_item(), shape.action_dim as i32),
                false,
            ),
            Field::new(
                "action_chunk",
                DataType::List(Arc::new(Field::new(
                    "item",
                    DataType::List(f32_item()),
                    true,
                ))),
                false,
            ),
            Field::new("timestamp", DataType::Float32, false),
            Field::new("frame_index", DataType::Int64, false),
            Field::new("episode_index", DataType::Int64, false),
            Field::new("index", DataType::Int64, false),
            Field::new("task_index", DataType::Int64, false),
        ];
        for (_, key, _, _) in &shape.cameras {
            fields.push(Field::new(key, DataType::Struct(image_fields()), true));
        }
        let fixed = |n: usize| {
            FixedSizeListBuilder::new(Float32Builder::new(), n as i32)
                .with_field(Arc::new(Field::new("item", DataType::Float32, true)))
        };
        Frames {
            schema: Arc::new(Schema::new(fields)),
            state: fixed(shape.state_dim),
            action: fixed(shape.action_dim),
            chunk: ListBuilder::new(ListBuilder::new(Float32Builder::new())),
            timestamp: Float32Builder::new(),
            frame_index: Int64Builder::new(),
            episode_index: Int64Builder::new(),
            index: Int64Builder::new(),
            task_index: Int64Builder::new(),
            images: shape
                .cameras
                .iter()
                .map(|_| StructBuilder::from_fields(image_fields(), 0))
                .collect(),
            len: 0,
        }
    }

    fn finish(&mut self) -> Result<RecordBatch, arrow_schema::ArrowError> {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.state.finish()),
            Arc::new(self.action.finish()),
            Arc::new(self.chunk.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.frame_index.finish()),
            Arc::new(self.episode_index.finish()),
            Arc::new(self.index.finish()),
            Arc::new(self.task_index.finish()),
        ];
        for b in &mut self.images {
            cols.push(Arc::new(b.finish()));
        }
        self.len = 0;
        RecordBatch::try_new(self.schema.clone(), cols)
    }
}

fn image_size(bytes: &[u8]) -> Option<(u32, u32)> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
}

fn shape_of(act: &Act<'_>) -> Shape {
    let r = act.record;
    let mut cameras: Vec<(String, String, u32, u32)> = Vec::new();
    for (camera, bytes) in image_bytes(r) {
        let key = format!("observation.images.{}", crate::sanitise_name(camera));
        if cameras.iter().any(|c| c.1 == key) {
            continue;
        }
        let (w, h) = image_size(bytes).unwrap_or((0, 0));
        cameras.push((camera.to_string(), key, h, w));
    }
    Shape {
        state_dim: r.request.state.len(),
        num_actions: r.response.num_actions as usize,
        action_dim: r.response.action_dim as usize,
        cameras,
    }
}

/// The folder being built, and the output it will replace.
struct PendingDir {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl Drop for PendingDir {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: the export already failed with its own error.
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

impl PendingDir {
    fn create(dest: &Path, force: bool) -> Result<PendingDir, TraceToolError> {
        if dest.symlink_metadata().is_ok() {
            if !force {
                return Err(TraceToolError::OutputExists { path: dest.into() });
            }
            // --force replaces a dataset (or an empty folder), never anything else: a typo
            // must not delete someone's home folder.
            let empty = std::fs::read_dir(dest)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty && !dest.join("meta/info.json").is_file() {
                return Err(TraceToolError::NotADataset { path: dest.into() });
            }
        }
        let name = dest
            .file_name()
            .ok_or_else(|| TraceToolError::Write {
                path: dest.into(),
                source: std::io::Error::other("no folder name"),
            })?
            .to_string_lossy();
        let tmp = dest.with_file_name(format!(".{name}.partial"));
        if tmp.exists() {
            // A leftover of an interrupted export of ours (the name is ours alone).
            std::fs::remove_dir_all(&tmp).map_err(write_err(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(write_err(dest))?;
        Ok(PendingDir {
            tmp,
            dest: dest.into(),
            done: false,
        })
    }

    fn finish(mut self) -> Result<(), TraceToolError> {
        if self.dest.symlink_metadata().is_ok() {
            std::fs::remove_dir_all(&self.dest).map_err(write_err(&self.dest))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(write_err(&self.dest))?;
        self.done = true;
        Ok(())
    }
}

fn create_file(path: &Path) -> Result<BufWriter<File>, TraceToolError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(write_err(parent))?;
    }
    Ok(BufWriter::with_capacity(
        1 << 20,
        File::create(path).map_err(write_err(path))?,
    ))
}

fn close(path: &Path, w: ArrowWriter<BufWriter<File>>) -> Result<(), TraceToolError> {
    let f = w.into_inner().map_err(|source| TraceToolError::Parquet {
        path: path.into(),
        source,
    })?;
    f.into_inner()
        .map_err(|e| TraceToolError::Write {
            path: path.into(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(write_err(path))
}

/// `reflex trace export TRACE... --to lerobot DIR`.
pub fn export(
    traces: &[PathBuf],
    dest: &Path,
    force: bool,
) -> Result<LeRobotExport, TraceToolError> {
    let pending = PendingDir::create(dest, force)?;
    let root = pending.tmp.clone();
    let data_path = root.join("data/chunk-000/file-000.parquet");

    let mut shape: Option<Shape> = None;
    let mut frames: Option<Frames> = None;
    let mut writer: Option<ArrowWriter<BufWriter<File>>> = None;
    let mut episodes: Vec<Episode> = Vec::new();
    let mut tasks: Vec<String> = Vec::new();
    let mut task_ids: HashMap<String, usize> = HashMap::new();
    let (mut st_state, mut st_action, mut st_chunk) =
        (Moments::new(0), Moments::new(0), Moments::new(0));
    let mut st_scalar: [Moments; 5] = std::array::from_fn(|_| Moments::new(1));
    let mut index = 0u64;
    let mut skipped_failed = 0u64;
    let mut missing_images = 0u64;
    let mut progress = Progress::new("lerobot", total_bytes(traces));
    let pq = |source| TraceToolError::Parquet {
        path: data_path.clone(),
        source,
    };
    let arrow = |source| TraceToolError::Arrow {
        path: data_path.clone(),
        source,
    };

    let notes = for_each_act(traces, &mut progress, |act| {
        let r = act.record;
        if r.error.is_some() || r.response.actions.is_empty() {
            skipped_failed += 1;
            return Ok(());
        }
        if shape.is_none() {
            let s = shape_of(act);
            st_state = Moments::new(s.state_dim);
            st_action = Moments::new(s.action_dim);
            st_chunk = Moments::new(s.num_actions * s.action_dim);
            let f = Frames::new(&s);
            let rows = if s.cameras.is_empty() {
                ROWS_PER_GROUP
            } else {
                ROWS_PER_GROUP_IMAGES
            };
            writer = Some(open_writer(
                &data_path,
                create_file(&data_path)?,
                f.schema.clone(),
                rows,
            )?);
            frames = Some(f);
            shape = Some(s);
        }
        let (s, f) = (
            shape.as_ref().expect("set above"),
            frames.as_mut().expect("set above"),
        );
        let got = (
            r.request.state.len(),
            r.response.num_actions as usize,
            r.response.action_dim as usize,
        );
        if got != (s.state_dim, s.num_actions, s.action_dim)
            || r.response.actions.len() != got.1 * got.2
        {
            return Err(TraceToolError::ShapeChanged {
                path: act.path.into(),
                seq: r.seq,
                want: format!(
                    "state {} and actions {}×{}",
                    s.state_dim, s.num_actions, s.action_dim
                ),
                got: format!(
                    "state {} and actions {}×{} ({} values)",
                    got.0,
                    got.1,
                    got.2,
                    r.response.actions.len()
                ),
            });
        }
        let ns = micros(act)? as i128 * 1000;
        let task = *task_ids
            .entry(r.request.instruction.clone())
            .or_insert_with(|| {
                tasks.push(r.request.instruction.clone());
                tasks.len() - 1
            });
        let new_episode = episodes.last().is_none_or(|e| e.id != r.request.episode_id);
        if new_episode {
            episodes.push(Episode {
                id: r.request.episode_id.clone(),
                length: 0,
                from: index,
                tasks: vec![],
                first_ns: ns,
                last_ns: ns,
            });
        }
        let ep_index = episodes.len() as i64 - 1;
        let ep = episodes.last_mut().expect("pushed above");
        if !ep.tasks.contains(&task) {
            ep.tasks.push(task);
        }
        let frame_index = ep.length;
        let t = ((ns - ep.first_ns).max(0) as f64 / 1e9) as f32;
        ep.length += 1;
        ep.last_ns = ep.last_ns.max(ns);

        f.state.values().append_slice(&r.request.state);
        f.state.append(true);
        f.action
            .values()
            .append_slice(&r.response.actions[..s.action_dim]);
        f.action.append(true);
        for row in r.response.actions.chunks(s.action_dim) {
            f.chunk.values().values().append_slice(row);
            f.chunk.values().append(true);
        }
        f.chunk.append(true);
        f.timestamp.append_value(t);
        f.frame_index.append_value(frame_index as i64);
        f.episode_index.append_value(ep_index);
        f.index.append_value(index as i64);
        f.task_index.append_value(task as i64);
        let bytes = image_bytes(r);
        for ((camera, _, _, _), b) in s.cameras.iter().zip(f.images.iter_mut()) {
            match bytes.iter().find(|(c, _)| c == camera) {
                Some((_, data)) => {
                    b.field_builder::<BinaryBuilder>(0)
                        .expect("bytes field")
                        .append_value(data);
                    b.field_builder::<StringBuilder>(1)
                        .expect("path field")
                        .append_null();
                    b.append(true);
                }
                None => {
                    missing_images += 1;
                    b.field_builder::<BinaryBuilder>(0)
                        .expect("bytes field")
                        .append_null();
                    b.field_builder::<StringBuilder>(1)
                        .expect("path field")
                        .append_null();
                    b.append(false);
                }
            }
        }
        st_state.add(r.request.state.iter().map(|&v| v as f64));
        st_action.add(r.response.actions[..s.action_dim].iter().map(|&v| v as f64));
        st_chunk.add(r.response.actions.iter().map(|&v| v as f64));
        for (m, v) in st_scalar.iter_mut().zip([
            t as f64,
            frame_index as f64,
            ep_index as f64,
            index as f64,
            task as f64,
        ]) {
            m.add([v]);
        }
        index += 1;
        f.len += 1;
        let group = if s.cameras.is_empty() {
            ROWS_PER_GROUP
        } else {
            ROWS_PER_GROUP_IMAGES
        };
        if f.len >= group {
            writer
                .as_mut()
                .expect("opened with the shape")
                .write(&f.finish().map_err(arrow)?)
                .map_err(pq)?;
        }
        Ok(())
    })?;

    let (Some(s), Some(mut f), Some(mut w)) = (shape, frames, writer) else {
        return Err(TraceToolError::NoActs);
    };
    if f.len > 0 {
        w.write(&f.finish().map_err(arrow)?).map_err(pq)?;
    }
    close(&data_path, w)?;
    if skipped_failed > 0 {
        tracing::info!(
            skipped = skipped_failed,
            "failed Acts have no actions: not exported as frames"
        );
    }
    if missing_images > 0 {
        tracing::warn!(
            missing = missing_images,
            "some frames lack a camera's image (null image)"
        );
    }
    if s.cameras.is_empty() {
        tracing::info!(
            "the traces hold no image bytes (hash_only or none): exported without images"
        );
    } else {
        tracing::info!(
            cameras = s.cameras.len(),
            "camera frames stored as image features (encoded bytes in the data file; no video)"
        );
    }

    // fps: the Act rate over all episodes (intervals / time), rounded, at least 1.
    let (intervals, secs) = episodes.iter().fold((0u64, 0f64), |(n, t), e| {
        (n + e.length - 1, t + (e.last_ns - e.first_ns) as f64 / 1e9)
    });
    let fps = if secs > 0.0 {
        ((intervals as f64 / secs).round() as u32).max(1)
    } else {
        1
    };

    write_tasks(&root.join("meta/tasks.parquet"), &tasks)?;
    write_episodes(
        &root.join("meta/episodes/chunk-000/file-000.parquet"),
        &episodes,
        &tasks,
    )?;

    let mut features = serde_json::Map::new();
    let vector = |n: usize, prefix: &str| json!({"dtype": "float32", "shape": [n], "names": (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>()});
    features.insert("observation.state".into(), vector(s.state_dim, "state_"));
    features.insert("action".into(), vector(s.action_dim, "action_"));
    features.insert(
        "action_chunk".into(),
        json!({"dtype": "float32", "shape": [s.num_actions, s.action_dim], "names": ["step", "action"]}),
    );
    for (name, dtype) in [
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ] {
        features.insert(
            name.into(),
            json!({"dtype": dtype, "shape": [1], "names": null}),
        );
    }
    for (_, key, h, w) in &s.cameras {
        features.insert(
            key.clone(),
            json!({"dtype": "image", "shape": [h, w, 3], "names": ["height", "width", "channels"]}),
        );
    }
    let info = json!({
        "codebase_version": "v3.0",
        "robot_type": traces_embodiment(&notes),
        "total_episodes": episodes.len(),
        "total_frames": index,
        "total_tasks": tasks.len(),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": format!("0:{}", episodes.len())},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": null,
        "features": features,
    });
    let mut stats = serde_json::Map::new();
    stats.insert("observation.state".into(), st_state.json(0));
    stats.insert("action".into(), st_action.json(0));
    stats.insert("action_chunk".into(), st_chunk.json(s.num_actions));
    for (name, m) in [
        "timestamp",
        "frame_index",
        "episode_index",
        "index",
        "task_index",
    ]
    .iter()
    .zip(&st_scalar)
    {
        stats.insert((*name).into(), m.json(0));
    }
    write_json(&root.join("meta/info.json"), &info)?;
    write_json(&root.join("meta/stats.json"), &Value::Object(stats))?;
    pending.finish()?;
    Ok(LeRobotExport {
        frames: index,
        episodes: episodes.len() as u64,
        tasks: tasks.len() as u64,
        fps,
        cameras: s.cameras.iter().map(|c| c.1.clone()).collect(),
        skipped_failed,
        notes,
    })
}

fn traces_embodiment(notes: &[ReadNote]) -> Value {
    notes
        .iter()
        .map(|n| n.header.embodiment.as_str())
        .find(|e| !e.is_empty())
        .map_or(Value::Null, |e| json!(e))
}

fn write_json(path: &Path, v: &Value) -> Result<(), TraceToolError> {
    let text = serde_json::to_string_pretty(v).expect("a JSON value always serialises");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(write_err(parent))?;
    }
    std::fs::write(path, text + "\n").map_err(write_err(path))
}

/// `meta/tasks.parquet` as pandas writes it: the task text is the frame's index (LeRobot
/// reads `tasks.iloc[i].name`), which pandas restores from the `pandas` schema metadata.
fn write_tasks(path: &Path, tasks: &[String]) -> Result<(), TraceToolError> {
    let mut meta = HashMap::new();
    meta.insert(
        "pandas".to_string(),
        json!({
            "index_columns": ["task"],
            "column_indexes": [{"name": null, "field_name": null, "pandas_type": "unicode", "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
            "columns": [
                {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": null},
                {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": null}
            ],
            "creator": {"library": "reflex", "version": env!("CARGO_PKG_VERSION")},
            "pandas_version": "2.2.3"
        })
        .to_string(),
    );
    let schema = Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("task_index", DataType::Int64, false),
            Field::new("task", DataType::Utf8, false),
        ],
        meta,
    ));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(arrow_array::Int64Array::from_iter_values(
                0..tasks.len() as i64,
            )),
            Arc::new(arrow_array::StringArray::from_iter_values(tasks)),
        ],
    )
    .map_err(|source| TraceToolError::Arrow {
        path: path.into(),
        source,
    })?;
    write_batch(path, schema, &batch)
}

/// `meta/episodes/chunk-000/file-000.parquet`: where each episode's rows are.
fn write_episodes(
    path: &Path,
    episodes: &[Episode],
    tasks: &[String],
) -> Result<(), TraceToolError> {
    let int = |f: &dyn Fn(usize, &Episode) -> i64| -> ArrayRef {
        Arc::new(arrow_array::Int64Array::from_iter_values(
            episodes.iter().enumerate().map(|(i, e)| f(i, e)),
        ))
    };
    let mut task_lists = ListBuilder::new(StringBuilder::new());
    for e in episodes {
        for t in &e.tasks {
            task_lists.values().append_value(&tasks[*t]);
        }
        task_lists.append(true);
    }
    let names: Vec<&str> = vec![
        "episode_index",
        "tasks",
        "length",
        "data/chunk_index",
        "data/file_index",
        "dataset_from_index",
        "dataset_to_index",
        "meta/episodes/chunk_index",
        "meta/episodes/file_index",
        "episode_id",
    ];
    let cols: Vec<ArrayRef> = vec![
        int(&|i, _| i as i64),
        Arc::new(task_lists.finish()),
        int(&|_, e| e.length as i64),
        int(&|_, _| 0),
        int(&|_, _| 0),
        int(&|_, e| e.from as i64),
        int(&|_, e| (e.from + e.length) as i64),
        int(&|_, _| 0),
        int(&|_, _| 0),
        Arc::new(arrow_array::StringArray::from_iter_values(
            episodes.iter().map(|e| &e.id),
        )),
    ];
    let fields: Vec<Field> = names
        .iter()
        .zip(&cols)
        .map(|(n, c)| Field::new(*n, c.data_type().clone(), false))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let batch =
        RecordBatch::try_new(schema.clone(), cols).map_err(|source| TraceToolError::Arrow {
            path: path.into(),
            source,
        })?;
    write_batch(path, schema, &batch)
}

fn write_batch(path: &Path, schema: SchemaRef, batch: &RecordBatch) -> Result<(), TraceToolError> {
    let mut w = open_writer(path, create_file(path)?, schema, ROWS_PER_GROUP)?;
    w.write(batch).map_err(|source| TraceToolError::Parquet {
        path: path.into(),
        source,
    })?;
    close(path, w)
}
