//! `reflex-tracetools`: looking at reflex traces and turning them into the formats robotics
//! people open every day — `reflex trace ls|show|export`.
//!
//! Every trace is read through [`reflex_recorder::reader`] (the one way into a trace), one
//! record at a time: memory is bounded by one record plus what each writer buffers (a row
//! group, an MCAP chunk), never by the trace. A file whose tail was cut by a crash is read
//! up to its last whole record and the cut is reported ([`input::ReadNote`]).
//!
//! Modules: [`args`] (the clap flags of `reflex trace`, and [`run`]), [`input`] (the
//! streaming pass over one or more traces), [`listing`] (`ls`), [`figures`] (`show`),
//! [`foxglove`] (`--to mcap`), [`lerobot`] (`--to lerobot`), [`table`] (`--to parquet`, and
//! the Arrow helpers the LeRobot export shares), [`output`] (creating outputs: `--force`, a
//! temporary name renamed into place), [`progress`] (stderr, on a terminal only), [`time`]
//! (RFC 3339 timestamps of records to Unix time).
//!
//! **Invariants:** nothing from a trace's content becomes a path (camera names and episode
//! ids become MCAP topics, column names or numbers, sanitised); outputs are created under a
//! temporary name and renamed into place only when complete; this crate writes no trace.

pub mod args;
pub mod error;
pub mod figures;
pub mod foxglove;
pub mod input;
pub mod lerobot;
pub mod listing;
pub mod output;
pub mod progress;
pub mod table;
pub mod time;

pub use args::{TraceArgs, run};
pub use error::TraceToolError;

/// A name from a trace (a camera) made safe for a column name or topic: ASCII letters,
/// digits and `_` only, lowercase; empty becomes `camera`. Never used as a path.
pub fn sanitise_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() { "camera".into() } else { s }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sanitise_name_keeps_no_path_characters() {
        assert_eq!(super::sanitise_name("../../etc/passwd"), "______etc_passwd");
        assert_eq!(super::sanitise_name("Wrist-Cam"), "wrist_cam");
        assert_eq!(super::sanitise_name(""), "camera");
    }
}
