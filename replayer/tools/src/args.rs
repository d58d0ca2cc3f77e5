//! The flags of `reflex trace` and its entry point, [`run`].

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::TraceToolError;

/// Look at traces and export them: `ls`, `show`, `export --to mcap|lerobot|parquet`.
#[derive(Args, Debug)]
#[command(
    long_about = "Look at recorded traces and turn them into formats other tools open.\n\n\
                  Every file is read through the recorder's trace reader, one record at a time \
                  (memory does not grow with the trace); a file whose tail a crash cut is read up \
                  to its last whole record and the cut is reported. Progress is drawn on stderr \
                  when it is a terminal.",
    after_help = "Examples:\n  reflex trace ls /var/lib/reflex/traces\n  reflex trace show TRACE.jsonl.gz\n  \
                  reflex trace export TRACE.jsonl.gz --to mcap run.mcap        (open in Foxglove)\n  \
                  reflex trace export A.jsonl.gz B.jsonl.gz --to lerobot ./dataset\n  \
                  reflex trace export TRACE.jsonl.gz --to parquet acts.parquet (DuckDB, pandas, Spark)\n\n\
                  Exit codes: 0 success, 1 error (unreadable trace, output exists without --force, \
                  cannot write), 64 usage error."
)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub command: TraceCommand,
}

#[derive(Subcommand, Debug)]
pub enum TraceCommand {
    /// One row per trace file in DIR: started, session, model, embodiment, image mode,
    /// records, errors, duration, how it ended, bytes.
    Ls {
        /// Folder of traces (`*.jsonl.gz`, `*.jsonl`; not recursive).
        dir: PathBuf,
        /// One JSON array of rows instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The header, then latency percentiles per stage, cache hit rate, errors by slug,
    /// action ranges per dimension and the Act rate over time.
    Show {
        /// The trace file.
        trace: PathBuf,
        /// The header and figures as one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Export traces to MCAP (Foxglove), a LeRobotDataset v3.0 folder or Parquet.
    ///
    /// Several traces go into one output, in the order given.
    Export {
        /// Trace files.
        #[arg(required = true, value_name = "TRACE")]
        traces: Vec<PathBuf>,
        /// The format and the output: `mcap OUT.mcap`, `parquet OUT.parquet`, or
        /// `lerobot DIR` (a folder, created; its parent must exist).
        #[arg(long, num_args = 2, value_names = ["FORMAT", "OUT"], required = true)]
        to: Vec<std::ffi::OsString>,
        /// Replace OUT if it exists (for lerobot: only a LeRobot dataset or an empty folder).
        #[arg(long)]
        force: bool,
    },
}

/// Export formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// MCAP with zstd chunks and a summary: an Act channel (JSON) and a
    /// foxglove.CompressedImage channel per camera (full-mode traces). Opens in Foxglove.
    Mcap,
    /// A LeRobotDataset v3.0 folder: one episode per episode_id, state, action (the chunk's
    /// first step), action_chunk, and camera images for full-mode traces.
    Lerobot,
    /// One row per Act, every field flattened into columns, zstd (schema in the README).
    Parquet,
}

impl TraceArgs {
    /// What clap cannot check itself: the FORMAT of `--to FORMAT OUT`. An error here is a
    /// usage error (exit 64), like any other clap error.
    pub fn validate(&self) -> Result<(), clap::Error> {
        if let TraceCommand::Export { to, .. } = &self.command {
            export_target(to)?;
        }
        Ok(())
    }
}

/// `--to FORMAT OUT` as a format and a path.
fn export_target(to: &[std::ffi::OsString]) -> Result<(Format, PathBuf), clap::Error> {
    let bad = || {
        clap::Error::raw(
            clap::error::ErrorKind::InvalidValue,
            format!(
                "--to FORMAT OUT: FORMAT must be mcap, lerobot or parquet, got {:?}\n",
                to.first().map(|f| f.to_string_lossy()).unwrap_or_default()
            ),
        )
    };
    let [format, out] = to else { return Err(bad()) };
    let format = Format::from_str(&format.to_string_lossy(), false).map_err(|_| bad())?;
    Ok((format, PathBuf::from(out)))
}

/// Runs `reflex trace …`; writes what it prints to stdout.
pub fn run(args: TraceArgs) -> Result<(), TraceToolError> {
    let mut out = std::io::stdout().lock();
    let io = |source| TraceToolError::Write {
        path: "<stdout>".into(),
        source,
    };
    match args.command {
        TraceCommand::Ls { dir, json } => {
            let rows = crate::listing::list(&dir)?;
            if json {
                serde_json::to_writer_pretty(&mut out, &rows).map_err(|e| io(e.into()))?;
                use std::io::Write;
                writeln!(out).map_err(io)?;
            } else {
                crate::listing::print_table(&rows, &mut out).map_err(io)?;
            }
        }
        TraceCommand::Show { trace, json } => {
            let (figures, note) = crate::figures::compute(&trace)?;
            if json {
                let v = serde_json::json!({
                    "header": note.header,
                    "bytes": note.file_bytes,
                    "footer": note.footer,
                    "truncation": note.truncation.as_ref().map(|t| t.to_string()),
                    "figures": figures,
                });
                serde_json::to_writer_pretty(&mut out, &v).map_err(|e| io(e.into()))?;
                use std::io::Write;
                writeln!(out).map_err(io)?;
            } else {
                crate::figures::print(&note, &figures, &mut out).map_err(io)?;
            }
        }
        TraceCommand::Export { traces, to, force } => {
            use std::io::Write;
            let (to, dest) =
                export_target(&to).map_err(|e| TraceToolError::Usage(e.to_string()))?;
            let started = std::time::Instant::now();
            let bytes_in = crate::input::total_bytes(&traces);
            let (acts, notes, extra) = match to {
                Format::Parquet => {
                    let e = crate::table::export(&traces, &dest, force)?;
                    (e.acts, e.notes, String::new())
                }
                Format::Mcap => {
                    let e = crate::foxglove::export(&traces, &dest, force)?;
                    (e.acts, e.notes, String::new())
                }
                Format::Lerobot => {
                    let e = crate::lerobot::export(&traces, &dest, force)?;
                    let images = if e.cameras.is_empty() {
                        "no images (the traces hold none: hash_only or none mode)".to_string()
                    } else {
                        format!("images {} (image features)", e.cameras.join(", "))
                    };
                    let extra = format!(
                        "; {} episodes, {} tasks, fps {}, {images}{}",
                        e.episodes,
                        e.tasks,
                        e.fps,
                        if e.skipped_failed > 0 {
                            format!(", {} failed Acts skipped", e.skipped_failed)
                        } else {
                            String::new()
                        }
                    );
                    (e.frames, e.notes, extra)
                }
            };
            let secs = started.elapsed().as_secs_f64().max(1e-6);
            writeln!(
                out,
                "exported {acts} acts from {} trace(s) to {} ({}){extra}; {:.1} MB of trace in {:.2} s ({:.1} MB/s)",
                notes.len(),
                dest.display(),
                match to {
                    Format::Mcap => "mcap",
                    Format::Lerobot => "lerobot",
                    Format::Parquet => "parquet",
                },
                bytes_in as f64 / 1e6,
                secs,
                bytes_in as f64 / 1e6 / secs
            )
            .map_err(io)?;
            for n in &notes {
                if let Some(t) = &n.truncation {
                    writeln!(
                        out,
                        "note: {} was cut by a crash ({t}); its {} whole records were exported",
                        n.path.display(),
                        n.requests
                    )
                    .map_err(io)?;
                }
            }
        }
    }
    Ok(())
}
