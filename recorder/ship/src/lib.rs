//! reflex-ship: moves a recorder directory's closed trace files to S3-compatible object
//! storage, verified, resumable and never twice.
//!
//! Input to output: every pass lists the directory, keeps the files the recorder has
//! closed ([`reflex_recorder::shipped::closed_trace`]) that the state does not list, and
//! ships them oldest first ([`upload`]); each verified upload is added to the state file
//! in the directory ([`reflex_recorder::shipped::ShipState`]), which is also the marker
//! that makes the recorder's retention keep unshipped files. `--once` runs one pass and
//! exits; the daemon repeats it every `--interval-secs` until SIGTERM.
//!
//! **Invariants.** The shipper never writes a trace file: it reads closed ones and, with
//! `--delete-after-upload`, deletes one only after its object is verified. The state lists
//! a file only after its object and manifest are in the bucket; a crash anywhere means at
//! worst one more look at the bucket, never a lost or doubled object. It knows nothing of
//! gRPC, servers or the recorder's socket: the directory is the whole interface.
//!
//! Modules:
//! - [`args`]: the `reflex ship` flags ([`ShipArgs`]) and the destination URL.
//! - [`credentials`]: keys and region from the environment or the shared credentials file.
//! - [`upload`]: one file into the bucket, verified; the bandwidth pacer.
//! - [`metrics`]: the Prometheus registry (backlog gauge, uploads, retries); `main` serves it.

pub mod args;
pub mod credentials;
pub mod metrics;
pub mod upload;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, Checksum};
use reflex_recorder::retention::trace_files;
use reflex_recorder::shipped::{ClosedTrace, ShipState, closed_trace};
use tokio_util::sync::CancellationToken;

pub use args::{Destination, ShipArgs};
use upload::{Outcome, Pacer, UploadError, Uploader};

/// Files closed and not shipped yet: the backlog gauge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backlog {
    pub files: u64,
    pub bytes: u64,
    /// Seconds since the oldest waiting file was last written.
    pub oldest_age_secs: u64,
}

/// What one pass did.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    pub uploaded: u64,
    pub uploaded_bytes: u64,
    pub already_there: u64,
    pub failed: Vec<(String, String)>,
    /// Closed and unshipped after the pass.
    pub backlog: Backlog,
    /// Files seen still open (not shipped, not counted in the backlog).
    pub open: u64,
}

/// Builds the S3 client from flags and environment.
pub fn store(
    args: &ShipArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Arc<dyn ObjectStore>> {
    // Our own retries (with their log lines) decide; the client tries each request once.
    s3_store(
        &args.to.bucket,
        args.endpoint.as_deref(),
        Duration::from_secs(args.timeout_secs),
        Some(0),
        env,
    )
}

/// An S3 client for `bucket`, configured as the AWS tools are (credentials and region from
/// `env`, see [`credentials`]); `endpoint` for S3-compatible servers (http:// allowed, the
/// operator named it); `max_retries` `None` keeps the client's own retry policy. Also used
/// by `reflex fleet` to read shipped traces and write its dataset.
pub fn s3_store(
    bucket: &str,
    endpoint: Option<&str>,
    timeout: Duration,
    max_retries: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let creds = credentials::find(env)?;
    let region = credentials::region(env);
    tracing::info!(source = %creds.source, %region, endpoint = endpoint.unwrap_or("aws"), "credentials");
    let mut retry = object_store::RetryConfig {
        retry_timeout: timeout,
        ..Default::default()
    };
    if let Some(n) = max_retries {
        retry.max_retries = n;
    }
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(region)
        .with_access_key_id(creds.access_key_id)
        .with_secret_access_key(creds.secret_access_key)
        .with_checksum_algorithm(Checksum::SHA256)
        .with_retry(retry)
        .with_client_options(
            object_store::ClientOptions::new()
                .with_timeout(timeout)
                .with_connect_timeout(Duration::from_secs(10)),
        );
    if let Some(token) = creds.session_token {
        b = b.with_token(token);
    }
    if let Some(endpoint) = endpoint {
        // http is allowed only for an endpoint the operator named (tests use loopback).
        b = b
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    let s3 = b.build().context("configuring the S3 client")?;
    Ok(Arc::new(s3))
}

/// `reflex ship`: one pass with `--once`, else passes until `shutdown`.
/// Returns whether everything closed is shipped (always true for the daemon's clean stop).
pub async fn run(
    args: ShipArgs,
    shutdown: CancellationToken,
    metrics: metrics::Metrics,
) -> anyhow::Result<bool> {
    let env = |k: &str| std::env::var(k).ok();
    let store = store(&args, &env)?;
    let mut shipper = Shipper::new(args, store, shutdown.clone())?;
    shipper.metrics = metrics;
    shipper.preflight().await?;
    if shipper.args.once {
        let report = shipper.pass().await?;
        println!("{}", report.summary_line());
        if report.failed.is_empty() && report.backlog.files == 0 {
            return Ok(true);
        }
        for (file, why) in &report.failed {
            eprintln!("not shipped: {file}: {why}");
        }
        anyhow::bail!(
            "{} closed file(s) not shipped (see slug=ship-failed above)",
            report.backlog.files
        );
    }
    loop {
        let report = shipper.pass().await?;
        let b = &report.backlog;
        tracing::info!(
            slug = "ship-backlog",
            uploaded = report.uploaded,
            uploaded_bytes = report.uploaded_bytes,
            failed = report.failed.len(),
            backlog_files = b.files,
            backlog_bytes = b.bytes,
            oldest_age_s = b.oldest_age_secs,
            open = report.open,
            "ship pass"
        );
        tokio::select! {
            _ = tokio::time::sleep(shipper.args.interval()) => {}
            _ = shutdown.cancelled() => return Ok(true),
        }
    }
}

/// The shipper of one directory.
pub struct Shipper {
    pub args: ShipArgs,
    uploader: Uploader,
    state: tokio::sync::Mutex<ShipState>,
    pub metrics: metrics::Metrics,
}

impl PassReport {
    pub fn summary_line(&self) -> String {
        format!(
            "shipped {} file(s), {} bytes; {} already in the bucket; {} failed; backlog: files={} bytes={} oldest_age_s={}; open={}",
            self.uploaded,
            self.uploaded_bytes,
            self.already_there,
            self.failed.len(),
            self.backlog.files,
            self.backlog.bytes,
            self.backlog.oldest_age_secs,
            self.open
        )
    }
}

impl Shipper {
    /// Loads the directory's state, or writes an empty one at once: from here on the
    /// recorder's retention knows shipping is on.
    pub fn new(
        args: ShipArgs,
        store: Arc<dyn ObjectStore>,
        stop: CancellationToken,
    ) -> anyhow::Result<Shipper> {
        std::fs::read_dir(&args.dir)
            .with_context(|| format!("cannot read trace directory {}", args.dir.display()))?;
        let state = match ShipState::load(&args.dir)? {
            Some(state) => state,
            None => {
                let state = ShipState::default();
                state.save(&args.dir)?;
                state
            }
        };
        Ok(Shipper {
            uploader: Uploader {
                store,
                part_bytes: args.part_bytes(),
                pacer: Pacer::new(args.max_bytes_per_sec()),
                stop,
            },
            state: tokio::sync::Mutex::new(state),
            args,
            metrics: metrics::Metrics::default(),
        })
    }

    /// One list call, so that wrong credentials, a missing bucket or an unreachable
    /// endpoint are one clear error before any file is touched.
    pub async fn preflight(&self) -> anyhow::Result<()> {
        let root = object_store::path::Path::from(self.args.to.robot_root(&self.args.robot));
        let mut last = None;
        for attempt in 0..self.args.attempts {
            match self.uploader.store.list_with_delimiter(Some(&root)).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let e = UploadError::Store {
                        op: "list",
                        key: root.to_string(),
                        source: e,
                    };
                    if e.is_permanent() {
                        last = Some(e);
                        break;
                    }
                    tracing::warn!(slug = "ship-retry", attempt = attempt + 1, error = %e, "bucket not reachable yet");
                    last = Some(e);
                    if attempt + 1 < self.args.attempts {
                        self.backoff(attempt).await?;
                    }
                }
            }
        }
        let e = last.expect("at least one attempt ran");
        tracing::error!(slug = "ship-failed", error = %e, "cannot use the bucket");
        Err(anyhow::Error::new(e).context(format!(
            "cannot use s3://{}/{} (credentials, bucket name, endpoint?)",
            self.args.to.bucket, self.args.to.prefix
        )))
    }

    /// Ships every closed, unshipped file, oldest first.
    pub async fn pass(&self) -> anyhow::Result<PassReport> {
        let dir = self.args.dir.clone();
        let mut files = trace_files(&dir)
            .with_context(|| format!("cannot list trace directory {}", dir.display()))?;
        files.sort_by(|a, b| (&a.name[..15], a.modified).cmp(&(&b.name[..15], b.modified)));
        let mut report = PassReport::default();
        self.prune(&files).await?;
        for f in files {
            if self.uploader.stop.is_cancelled() {
                break;
            }
            let path = dir.join(&f.name);
            if self.state.lock().await.shipped.contains_key(&f.name) {
                // Verified by an earlier pass (perhaps one without --delete-after-upload).
                if self.args.delete_after_upload {
                    self.delete(&path, &f.name);
                }
                continue;
            }
            let p = path.clone();
            let closed = match tokio::task::spawn_blocking(move || closed_trace(&p)).await? {
                Ok(Some(c)) => c,
                Ok(None) => {
                    report.open += 1;
                    continue;
                }
                // Vanished meanwhile (retention, an operator): nothing to ship.
                Err(e) if !path.exists() => {
                    tracing::debug!(file = %f.name, error = %e, "trace gone");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(file = %f.name, error = %e, slug = "ship-unreadable", "trace not shipped: unreadable");
                    report.failed.push((f.name.clone(), e.to_string()));
                    continue;
                }
            };
            match self.ship_with_retries(&path, &f.name, &closed).await {
                Ok((outcome, size)) => match outcome {
                    Outcome::Uploaded => {
                        report.uploaded += 1;
                        report.uploaded_bytes += size;
                    }
                    Outcome::AlreadyThere => report.already_there += 1,
                },
                Err(UploadError::Stopped) => break,
                Err(e) => report.failed.push((f.name.clone(), e.to_string())),
            }
        }
        report.backlog = self.backlog().await?;
        self.metrics.pass(&report);
        Ok(report)
    }

    /// The key of a file: hive partitions robot, date (UTC, the session's start), model.
    pub fn key(&self, name: &str, trace: &ClosedTrace) -> String {
        let date = trace
            .started_at
            .get(..10)
            .filter(|d| d.len() == 10 && d.as_bytes()[4] == b'-')
            .map(str::to_string)
            // The name's stamp (YYYYMMDD) when the header has no usable time.
            .unwrap_or_else(|| format!("{}-{}-{}", &name[..4], &name[4..6], &name[6..8]));
        format!(
            "{}/date={date}/model={}/{name}",
            self.args.to.robot_root(&self.args.robot),
            trace.model_hash
        )
    }

    fn manifest_key(&self, name: &str) -> String {
        format!(
            "{}/_manifest/{name}.json",
            self.args.to.robot_root(&self.args.robot)
        )
    }

    async fn ship_with_retries(
        &self,
        path: &Path,
        name: &str,
        trace: &ClosedTrace,
    ) -> Result<(Outcome, u64), UploadError> {
        let key = self.key(name, trace);
        let manifest = self.manifest_key(name);
        let mut attempt = 0;
        loop {
            match self.uploader.ship(path, &key, &manifest, trace).await {
                Ok((shipped, outcome)) => {
                    let size = shipped.size;
                    tracing::info!(file = name, key, bytes = size, records = shipped.records, sha256 = %shipped.sha256, already_there = (outcome == Outcome::AlreadyThere), "shipped");
                    let mut state = self.state.lock().await;
                    state.shipped.insert(name.to_string(), shipped);
                    if let Err(e) = state.save(&self.args.dir) {
                        // The object is verified; only the record of it failed. The next
                        // pass finds it in the bucket and does not upload it again.
                        state.shipped.remove(name);
                        tracing::error!(slug = "ship-failed", file = name, error = %e, "cannot record the upload");
                        return Err(UploadError::Local {
                            path: self.args.dir.display().to_string(),
                            source: std::io::Error::other(e),
                        });
                    }
                    drop(state);
                    if self.args.delete_after_upload {
                        self.delete(path, name);
                    }
                    return Ok((outcome, size));
                }
                Err(UploadError::Stopped) => return Err(UploadError::Stopped),
                Err(e) => {
                    attempt += 1;
                    if e.is_permanent() || attempt >= self.args.attempts {
                        tracing::error!(slug = "ship-failed", file = name, key, attempts = attempt, error = %e, "not shipped");
                        return Err(e);
                    }
                    tracing::warn!(slug = "ship-retry", file = name, key, attempt, error = %e, "upload failed, retrying");
                    self.metrics.retries.inc();
                    self.backoff(attempt - 1).await?;
                }
            }
        }
    }

    /// `--delete-after-upload`, for a file whose object is verified and recorded.
    fn delete(&self, path: &Path, name: &str) {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(file = name, "deleted after verified upload"),
            Err(e) => tracing::warn!(file = name, error = %e, "cannot delete after upload"),
        }
    }

    /// Capped exponential backoff with full jitter: a random wait in
    /// `[0, min(cap, base·2^attempt)]`, so a fleet that lost the bucket at once does not come
    /// back at once.
    async fn backoff(&self, attempt: u32) -> Result<(), UploadError> {
        const BASE: Duration = Duration::from_millis(200);
        const CAP: Duration = Duration::from_secs(20);
        let ceiling = BASE.saturating_mul(1 << attempt.min(16)).min(CAP);
        let wait = ceiling.mul_f64(jitter());
        tokio::select! {
            _ = tokio::time::sleep(wait) => Ok(()),
            _ = self.uploader.stop.cancelled() => Err(UploadError::Stopped),
        }
    }

    /// Drops state entries of files no longer in the directory (deleted after upload or
    /// by retention), so the state stays small.
    async fn prune(&self, files: &[reflex_recorder::retention::TraceFile]) -> anyhow::Result<()> {
        let names: std::collections::HashSet<&str> =
            files.iter().map(|f| f.name.as_str()).collect();
        let mut state = self.state.lock().await;
        let before = state.shipped.len();
        state
            .shipped
            .retain(|name, _| names.contains(name.as_str()));
        if state.shipped.len() != before {
            state.save(&self.args.dir)?;
        }
        Ok(())
    }

    /// Closed files not shipped yet.
    pub async fn backlog(&self) -> anyhow::Result<Backlog> {
        let dir = self.args.dir.clone();
        let shipped: Vec<String> = self.state.lock().await.shipped.keys().cloned().collect();
        let b = tokio::task::spawn_blocking(move || backlog_of(&dir, &shipped)).await??;
        Ok(b)
    }
}

fn backlog_of(dir: &Path, shipped: &[String]) -> anyhow::Result<Backlog> {
    let now = SystemTime::now();
    let mut b = Backlog::default();
    for f in trace_files(dir)? {
        if shipped.binary_search(&f.name).is_ok() {
            continue;
        }
        if !reflex_recorder::writer::footer_at_tail(&dir.join(&f.name)).unwrap_or(false) {
            continue;
        }
        b.files += 1;
        b.bytes += f.size;
        let age = now.duration_since(f.modified).unwrap_or_default().as_secs();
        b.oldest_age_secs = b.oldest_age_secs.max(age);
    }
    Ok(b)
}

/// A number in [0, 1) that differs between processes and calls (no cryptographic need).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
