//! One closed file into the bucket: hash locally, upload (one PUT or a multipart upload),
//! verify, write the manifest object.
//!
//! **An object appears whole or not at all**: a PUT and a multipart *complete* are atomic in
//! S3; a multipart upload that fails or is stopped is aborted (and one a kill -9 leaves
//! behind is invisible: it never becomes an object; a bucket lifecycle rule
//! `AbortIncompleteMultipartUpload` reclaims its parts). **Nothing twice**: before uploading,
//! the key is looked up; an object already there with the local size and SHA-256 (a crash
//! after the upload and before the state was written) is taken as done, one that differs
//! is replaced. New objects are written with `PutMode::Create` (`If-None-Match: *`), so two
//! shippers racing on one key cannot both write it where the server supports that.
//!
//! **Verification** is by reading back: HEAD for the size, then the whole object is read
//! and hashed, and its SHA-256 compared with the local file's. The `x-amz-checksum-sha256`
//! header is also sent with every PUT and part (the server rejects a body that does not
//! match it, where it checks), but servers do not all return a whole-object SHA-256 (a
//! multipart object's checksum is a checksum of part checksums), so the read-back is what
//! the manifest's `sha256` vouches for. It costs a download per upload, which on a robot's
//! uplink is cheap next to shipping a wrong file.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use reflex_recorder::shipped::{ClosedTrace, Shipped};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// Why one file did not ship (this attempt).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot read {path}: {source}")]
    Local {
        path: String,
        source: std::io::Error,
    },
    #[error("{op} {key}: {source}")]
    Store {
        op: &'static str,
        key: String,
        source: object_store::Error,
    },
    #[error("verify {key}: {what}")]
    Verify { key: String, what: String },
    #[error("stopped")]
    Stopped,
}

impl UploadError {
    /// Errors that another attempt will not fix (credentials refused, no such bucket):
    /// given up at once, with the server's words.
    pub fn is_permanent(&self) -> bool {
        match self {
            UploadError::Store { source, .. } => {
                matches!(
                    source,
                    object_store::Error::PermissionDenied { .. }
                        | object_store::Error::Unauthenticated { .. }
                ) || {
                    let s = source.to_string();
                    s.contains("NoSuchBucket")
                        || s.contains("InvalidAccessKeyId")
                        || s.contains("SignatureDoesNotMatch")
                }
            }
            UploadError::Stopped => true,
            _ => false,
        }
    }
}

/// What the uploader needs besides the file.
pub struct Uploader {
    pub store: Arc<dyn ObjectStore>,
    pub part_bytes: usize,
    pub pacer: Pacer,
    pub stop: CancellationToken,
}

/// Local size and SHA-256 of a file.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&h.finalize())))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What became of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Uploaded and verified now.
    Uploaded,
    /// Already in the bucket, whole and equal (a restart after the upload).
    AlreadyThere,
}

impl Uploader {
    /// Ships `path` to `key` and writes its manifest object to `manifest_key`.
    pub async fn ship(
        &self,
        path: &Path,
        key: &str,
        manifest_key: &str,
        trace: &ClosedTrace,
    ) -> Result<(Shipped, Outcome), UploadError> {
        let local = |source| UploadError::Local {
            path: path.display().to_string(),
            source,
        };
        let p = path.to_path_buf();
        let (size, sha256) = tokio::task::spawn_blocking(move || hash_file(&p))
            .await
            .map_err(|e| local(std::io::Error::other(e)))?
            .map_err(local)?;
        let object = ObjectPath::from(key);
        let store_err = |op, source| UploadError::Store {
            op,
            key: key.to_string(),
            source,
        };
        let outcome = match self.store.head(&object).await {
            Ok(meta) if meta.size == size && self.object_sha(&object).await? == sha256 => {
                Outcome::AlreadyThere
            }
            Ok(meta) => {
                tracing::warn!(
                    key,
                    remote_size = meta.size,
                    size,
                    "object differs from the local file; replacing it"
                );
                self.upload(path, &object, size, PutMode::Overwrite).await?;
                Outcome::Uploaded
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.upload(path, &object, size, PutMode::Create).await?;
                Outcome::Uploaded
            }
            Err(e) => return Err(store_err("head", e)),
        };
        // Verify what is there now, whoever wrote it.
        let meta = self
            .store
            .head(&object)
            .await
            .map_err(|e| store_err("head", e))?;
        if meta.size != size {
            return Err(UploadError::Verify {
                key: key.into(),
                what: format!("size {} in the bucket, {size} locally", meta.size),
            });
        }
        let remote = self.object_sha(&object).await?;
        if remote != sha256 {
            return Err(UploadError::Verify {
                key: key.into(),
                what: format!("sha256 {remote} in the bucket, {sha256} locally"),
            });
        }
        let shipped = Shipped {
            key: key.to_string(),
            size,
            sha256,
            records: trace.records,
            uploaded_at: reflex_recorder::clock::UtcTime::now().rfc3339_millis(),
        };
        let mut line = serde_json::to_vec(&shipped).expect("plain fields serialise");
        line.push(b'\n');
        self.store
            .put(&ObjectPath::from(manifest_key), PutPayload::from(line))
            .await
            .map_err(|e| UploadError::Store {
                op: "put manifest",
                key: manifest_key.to_string(),
                source: e,
            })?;
        Ok((shipped, outcome))
    }

    /// Reads the whole object back and hashes it.
    async fn object_sha(&self, object: &ObjectPath) -> Result<String, UploadError> {
        let err = |op, source| UploadError::Store {
            op,
            key: object.to_string(),
            source,
        };
        let got = self.store.get(object).await.map_err(|e| err("get", e))?;
        let mut stream = got.into_stream();
        let mut h = Sha256::new();
        while let Some(chunk) = tokio::select! {
            c = stream.next() => c,
            _ = self.stop.cancelled() => return Err(UploadError::Stopped),
        } {
            h.update(&chunk.map_err(|e| err("get", e))?);
        }
        Ok(hex(&h.finalize()))
    }

    async fn upload(
        &self,
        path: &Path,
        object: &ObjectPath,
        size: u64,
        mode: PutMode,
    ) -> Result<(), UploadError> {
        let key = object.to_string();
        let store_err = |op, source| UploadError::Store {
            op,
            key: key.clone(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(|source| UploadError::Local {
            path: path.display().to_string(),
            source,
        })?;
        if size < self.part_bytes as u64 {
            let bytes = read_part(&mut file, size as usize, path)?;
            self.pacer.pace(bytes.len(), &self.stop).await?;
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            return match self
                .store
                .put_opts(object, PutPayload::from(bytes), opts)
                .await
            {
                Ok(_) => Ok(()),
                // Someone (our own earlier attempt whose answer was lost) wrote it first:
                // verification decides.
                Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
                Err(e) => Err(store_err("put", e)),
            };
        }
        let mut upload = self
            .store
            .put_multipart(object)
            .await
            .map_err(|e| store_err("create multipart", e))?;
        let mut left = size;
        let result: Result<(), UploadError> = async {
            while left > 0 {
                if self.stop.is_cancelled() {
                    return Err(UploadError::Stopped);
                }
                let n = left.min(self.part_bytes as u64) as usize;
                let bytes = read_part(&mut file, n, path)?;
                self.pacer.pace(n, &self.stop).await?;
                upload
                    .put_part(PutPayload::from(bytes))
                    .await
                    .map_err(|e| store_err("upload part", e))?;
                left -= n as u64;
            }
            upload
                .complete()
                .await
                .map(|_| ())
                .map_err(|e| store_err("complete multipart", e))
        }
        .await;
        if result.is_err() {
            // Best effort: a failed abort leaves only invisible parts.
            if let Err(e) = upload.abort().await {
                tracing::warn!(key, error = %e, "cannot abort the multipart upload");
            }
        }
        result
    }
}

fn read_part(file: &mut std::fs::File, n: usize, path: &Path) -> Result<Bytes, UploadError> {
    let mut buf = vec![0u8; n];
    file.read_exact(&mut buf)
        .map_err(|source| UploadError::Local {
            path: path.display().to_string(),
            source,
        })?;
    Ok(Bytes::from(buf))
}

/// The bandwidth cap: before each body is sent, waits until the bytes sent so far fit the
/// rate since the pacer started (so the average over any part holds, and a long idle time
/// does not earn a burst larger than one part).
pub struct Pacer {
    rate: Option<f64>,
    state: tokio::sync::Mutex<(Instant, f64)>,
}

impl Pacer {
    pub fn new(bytes_per_sec: Option<f64>) -> Pacer {
        Pacer {
            rate: bytes_per_sec,
            state: tokio::sync::Mutex::new((Instant::now(), 0.0)),
        }
    }

    pub async fn pace(&self, n: usize, stop: &CancellationToken) -> Result<(), UploadError> {
        let Some(rate) = self.rate else { return Ok(()) };
        let mut s = self.state.lock().await;
        let now = Instant::now();
        // Credit never builds beyond "now": an idle shipper starts afresh.
        let ready_at = s.0.max(now);
        let wait = ready_at.saturating_duration_since(now);
        s.0 = ready_at + Duration::from_secs_f64(n as f64 / rate);
        s.1 += n as f64;
        drop(s);
        tokio::select! {
            _ = tokio::time::sleep(wait) => Ok(()),
            _ = stop.cancelled() => Err(UploadError::Stopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacer_holds_the_rate() {
        let p = Pacer::new(Some(1_000_000.0));
        let stop = CancellationToken::new();
        let t0 = tokio::time::Instant::now();
        for _ in 0..5 {
            p.pace(500_000, &stop).await.unwrap();
        }
        // Five half-second bodies: the fifth starts after two seconds.
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
        Pacer::new(None).pace(1 << 30, &stop).await.unwrap();
    }

    #[test]
    fn hashes_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(
            hash_file(&f).unwrap(),
            (
                3,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into()
            )
        );
    }
}
