//! Front-ends in the protocols robots already speak, beside our own gRPC: each one only
//! translates its wire form to a `reflex.v1.ActRequest` and back, and every call goes
//! through [`crate::service::PolicyService::submit`], the seam gRPC's Act goes through —
//! so a front-end's call gets the same admission (and refusal before any work), seq,
//! record, spans, metrics and errors as a gRPC call.
//!
//! - [`http`]: the seed tool's HTTP API (`reflex serve --http-listen ADDR`): `POST /act`,
//!   `GET /health`, `GET /config`, with its JSON bodies, error shapes and auth headers.
//!
//! **Invariant:** a front-end never runs model work or touches the recorder itself; it
//! holds no state but its listener's.

pub mod http;
