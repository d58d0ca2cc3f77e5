//! The reflex inference server: serves a model (run by `reflex-engine`) as
//! `reflex.v1.Policy` over gRPC, and streams each call's record to the recorder.
//!
//! Modules: `pool` (bounded inference workers), `error` (the service's errors and their
//! one mapping to a gRPC status),
//! `recording` (per-session seq, the uplink to the recorder, the private recorder child),
//! `service` (wire ↔ domain), `serve` (listeners, health, reflection, shutdown), `auth`
//! (bearer token and TLS for TCP listeners), `systemd`
//! (readiness, the engine-probing watchdog and stopping notices under systemd), `telemetry`
//! (OpenTelemetry spans and metrics, the Prometheus endpoint, `traceparent`), `frontend`
//! (the seed tool's HTTP API, through the same Act seam as gRPC).

pub mod auth;
pub mod budget;
pub mod error;
pub mod frontend;
pub mod pool;
pub mod recording;
pub mod serve;
pub mod service;
pub mod systemd;
pub mod telemetry;
