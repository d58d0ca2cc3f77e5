//! The shipper's Prometheus registry: the backlog gauge and the upload counters. The
//! endpoint that serves it is the server's (`reflex_server::telemetry`), wired in `main`,
//! so this crate links no HTTP server.

use prometheus::{IntCounter, IntGauge, Registry};

use crate::PassReport;

/// Gauges and counters, registered once.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub backlog_files: IntGauge,
    pub backlog_bytes: IntGauge,
    pub backlog_oldest_age: IntGauge,
    pub uploaded_files: IntCounter,
    pub uploaded_bytes: IntCounter,
    pub failed_files: IntCounter,
    pub retries: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("a valid metric name");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("a valid metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        Metrics {
            backlog_files: gauge(
                "reflex_ship_backlog_files",
                "Closed trace files not shipped yet",
            ),
            backlog_bytes: gauge(
                "reflex_ship_backlog_bytes",
                "Bytes of closed trace files not shipped yet",
            ),
            backlog_oldest_age: gauge(
                "reflex_ship_backlog_oldest_age_seconds",
                "Age of the oldest closed trace file not shipped yet",
            ),
            uploaded_files: counter(
                "reflex_ship_uploaded_files_total",
                "Files uploaded and verified",
            ),
            uploaded_bytes: counter(
                "reflex_ship_uploaded_bytes_total",
                "Bytes uploaded and verified",
            ),
            failed_files: counter(
                "reflex_ship_failed_files_total",
                "Files given up after their retries in a pass",
            ),
            retries: counter("reflex_ship_retries_total", "Upload attempts retried"),
            registry,
        }
    }
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// Takes in one pass's report.
    pub fn pass(&self, r: &PassReport) {
        self.backlog_files.set(r.backlog.files as i64);
        self.backlog_bytes.set(r.backlog.bytes as i64);
        self.backlog_oldest_age
            .set(r.backlog.oldest_age_secs as i64);
        self.uploaded_files.inc_by(r.uploaded);
        self.uploaded_bytes.inc_by(r.uploaded_bytes);
        self.failed_files.inc_by(r.failed.len() as u64);
    }
}
