//! The reflex inference server: loads an export, runs the policy on an
//! engine and serves `reflex.v1.Policy` over gRPC.
//!
//! Modules: `config` (export config and hashes), `export` (the reference
//! export writer), `tokenizer`, `preprocess` (image decode/resize/normalise),
//! `engine` (the `Engine` trait and the `cpu` engine), `policy` (the Act
//! pipeline: cache, noise, Euler loop), `pool` (bounded inference workers),
//! `service` (wire ↔ domain), `serve` (listeners, health, reflection, shutdown), `auth`
//! (bearer token and TLS for TCP listeners), `authority` (the
//! Unix-socket `:authority` rewrite that lets grpcio and grpcurl clients in), `systemd`
//! (readiness, the engine-probing watchdog and stopping notices under systemd), `telemetry`
//! (OpenTelemetry spans and metrics, the Prometheus endpoint, `traceparent`).

pub mod auth;
pub mod authority;
pub mod budget;
pub mod config;
pub mod engine;
pub mod export;
pub mod policy;
pub mod pool;
pub mod preprocess;
pub mod recording;
pub mod serve;
pub mod service;
pub mod systemd;
pub mod telemetry;
pub mod tokenizer;
