//! Wall-clock formatting for trace files: RFC 3339 UTC timestamps with milliseconds and the
//! `YYYYMMDD-HHMMSS` stamp of file names. The formatter is the one the server stamps its
//! calls with, in `reflex-proto` (one copy, so a header and its records never disagree).

pub use reflex_proto::time::UtcTime;
