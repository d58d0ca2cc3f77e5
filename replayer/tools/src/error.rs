//! The one error type of the trace tools: every variant names the file it is about.

use std::io;
use std::path::PathBuf;

use reflex_recorder::reader::ReadError;

/// Why a `reflex trace` command failed.
#[derive(Debug, thiserror::Error)]
pub enum TraceToolError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("cannot list {}: {source}", path.display())]
    List { path: PathBuf, source: io::Error },
    #[error("{} exists; pass --force to replace it", path.display())]
    OutputExists { path: PathBuf },
    #[error(
        "{} exists and is not a LeRobot dataset (no meta/info.json); refusing to replace it even with --force",
        path.display()
    )]
    NotADataset { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot write Parquet {}: {source}", path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("cannot build the Arrow batch for {}: {source}", path.display())]
    Arrow {
        path: PathBuf,
        source: arrow_schema::ArrowError,
    },
    #[error("cannot write MCAP {}: {source}", path.display())]
    Mcap {
        path: PathBuf,
        source: mcap::McapError,
    },
    #[error("{}: record seq {seq} has timestamp {timestamp:?}, which is not RFC 3339", path.display())]
    BadTimestamp {
        path: PathBuf,
        seq: u64,
        timestamp: String,
    },
    #[error("{}: seq {seq} has {got} but the dataset's first Act had {want}; a LeRobot dataset needs one shape", path.display())]
    ShapeChanged {
        path: PathBuf,
        seq: u64,
        want: String,
        got: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("the traces hold no Act record to export")]
    NoActs,
}
