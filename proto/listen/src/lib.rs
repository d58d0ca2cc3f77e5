//! reflex-listen: the Unix-socket listener that `reflex serve` and `reflex recorder` share,
//! so that both bind their sockets by the same rules and both accept the same clients.
//!
//! Modules:
//! - [`unix`]: [`bind_unix`] (folder 0750, socket 0660, a stale socket replaced, a live one or
//!   a file that is not a socket refused) and [`unix_incoming`], the accepted connections as
//!   tonic's `serve_with_incoming` wants them, each behind the `:authority` fix.
//! - [`authority`]: [`AuthorityFix`], the I/O adapter that lets grpcurl, grpcio and grpc-java
//!   in over a Unix socket although they send its path as the HTTP/2 `:authority`.
//!
//! **Invariant:** nothing here knows a reflex service or the model; it is transport only
//! (tokio, tonic's `Connected`, an HPACK codec).

pub mod authority;
pub mod unix;

pub use authority::{AuthorityFix, AuthorityFixOptions, ConnectionInfo};
pub use unix::{BindError, DIR_MODE, SOCKET_MODE, bind_unix, unix_incoming};
