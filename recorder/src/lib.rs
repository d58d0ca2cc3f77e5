//! reflex-recorder: owns reflex trace files — the schema, the daemon that writes them for
//! every model server on the machine, and the reader the replayer uses.
//!
//! Modules:
//! - [`trace`]: trace schema v1, the design document of the on-disk format.
//! - [`reader`]: reads a trace (`.jsonl` or `.jsonl.gz`), tolerating a tail cut by a crash.
//! - [`writer`]: one session's file — naming, permissions, gzip, flushes, footer.
//! - [`retention`]: which files in the trace directory are ours and which may be deleted.
//! - [`recovery`]: start-up repair of files a killed recorder left without a footer.
//! - [`session`]: one Record stream's writer thread, rotation and disk-error handling.
//! - [`daemon`]: the `reflex.v1.Recorder` service, socket, limits, `run`.
//! - [`args`]: the `reflex recorder` command-line flags.
//! - [`clock`]: UTC timestamp formatting.

pub mod args;
pub mod clock;
pub mod daemon;
pub mod reader;
pub mod recovery;
pub mod retention;
pub mod session;
pub mod trace;
pub mod writer;

pub use args::RecorderArgs;
pub use daemon::{RecorderConfig, run, serve};
pub use reader::{ReadError, TraceReader, Truncation};
pub use trace::{Footer, Header, ImageMode, Record, RequestRecord};
