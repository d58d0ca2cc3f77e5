//! `reflex-fleet`: the traces of a whole fleet, analysed on an engine people already run.
//!
//! - [`index`] (`reflex fleet index SRC --to DATASET`) turns closed trace files — a recorder
//!   folder, or the objects `reflex ship` put in a bucket — into a Parquet dataset partitioned
//!   hive-style `robot=<ID>/date=<YYYY-MM-DD>/model=<model_hash>/<trace name>.parquet`, one
//!   Parquet file per trace file, in the trace tools' schema (`reflex trace export --to
//!   parquet`, [`reflex_tracetools::table::schema`]). Incremental: a trace whose Parquet file
//!   is there is not read again, so re-running is idempotent; each file appears whole (a local
//!   file is renamed into place, an object is one PUT) or not at all.
//! - [`query`] (`reflex fleet query DATASET`) runs SQL over that dataset with DataFusion
//!   (embedded; `s3://` through `object_store`): the table `acts`, one row per Act, its
//!   partition columns `robot`, `date`, `model` read from the paths. [`reports`] are the
//!   built-in queries, written so that DuckDB runs the same text (the README lists them).
//!
//! `robot` lives only in the path: Spark refuses a partition column that the files repeat,
//! and DuckDB and DataFusion read it from the path as well. `model` (the path) equals the
//! file column `model_hash`.
//!
//! **Invariants:** nothing from a trace's content becomes a path except the header's model
//! hash and start date, both checked for shape first; the source is only read.

pub mod args;
pub mod index;
pub mod location;
pub mod query;
pub mod reports;

pub use args::{FleetArgs, run};
