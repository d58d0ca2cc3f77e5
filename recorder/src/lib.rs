//! reflex-recorder: owns reflex trace files — the schema, the daemon that writes them for
//! every model server on the machine, and the reader the replayer uses.
//!
//! Input to output: model servers stream `reflex.v1.Recorder/Record` sessions over a Unix
//! socket ([`daemon`]); each session's thread ([`session`]) turns `ActRecord`s into trace
//! records ([`trace`]) and writes them to its own gzip file ([`writer`]), under the
//! directory's size policy ([`retention`]); files a crash left open are repaired at the
//! next start ([`recovery`]); the replayer reads any trace back through [`reader`].
//!
//! **Invariants.** The recorder alone creates, rotates and deletes trace files, and names
//! them itself: no string from the wire reaches a path unvalidated. The schema is written
//! down once, in [`trace`]. Recording never waits on the disk from the network side: a
//! session's queue is bounded and a write error degrades that session only.
//!
//! Modules:
//! - [`trace`]: trace schema v1, the design document of the on-disk format.
//! - [`reader`]: reads a trace (`.jsonl` or `.jsonl.gz`), tolerating a tail cut by a crash.
//! - [`writer`]: one trace file — naming, permissions, gzip, flushes, footer, durability.
//! - [`retention`]: which files in the trace directory are ours and which may be deleted.
//! - [`recovery`]: start-up repair of files a killed recorder left without a footer.
//! - [`shipped`]: the state file `reflex ship` keeps in a trace directory (the shipping
//!   marker retention reads), and when a trace file counts as closed.
//! - [`session`]: one Record stream's writer thread, rotation and disk-error handling, and
//!   what sessions share with the daemon.
//! - [`daemon`]: the `reflex.v1.Recorder` service (with reflection), socket, limits,
//!   [`serve`] and [`run`].
//! - [`args`]: the `reflex recorder` command-line flags ([`RecorderArgs`]) and the
//!   configuration they make ([`RecorderConfig`]).
//! - [`clock`]: UTC timestamp formatting.

pub mod args;
pub mod clock;
pub mod daemon;
pub mod reader;
pub mod recovery;
pub mod retention;
pub mod session;
pub mod shipped;
pub mod trace;
pub mod writer;

pub use args::RecorderArgs;
pub use args::RecorderConfig;
pub use daemon::{DaemonError, bind, run, serve, serve_std, serve_with};
pub use reader::{ReadError, TraceReader, Truncation, TruncationReason};
pub use trace::{Footer, Header, ImageMode, Record, RequestRecord, TraceRequest};
