//! Where traces are read from and where the dataset lives: a local folder or an `s3://`
//! prefix (S3 or an S3-compatible server, configured as the AWS tools are).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use reflex_ship::Destination;

/// A folder or an `s3://BUCKET/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    S3(Destination),
}

impl Location {
    /// `s3://…` is a bucket prefix, anything else a local path.
    pub fn parse(s: &str) -> Result<Location, String> {
        if s.starts_with("s3://") {
            Destination::parse(s).map(Location::S3)
        } else if s.contains("://") {
            Err(format!(
                "{s:?}: only local folders and s3://BUCKET/PREFIX are supported"
            ))
        } else if s.is_empty() {
            Err("an empty path".into())
        } else {
            Ok(Location::Local(PathBuf::from(s)))
        }
    }

    /// As the user wrote it, for messages.
    pub fn display(&self) -> String {
        match self {
            Location::Local(p) => p.display().to_string(),
            Location::S3(d) if d.prefix.is_empty() => format!("s3://{}", d.bucket),
            Location::S3(d) => format!("s3://{}/{}", d.bucket, d.prefix),
        }
    }
}

/// An opened `s3://` location: the client and the prefix.
#[derive(Clone)]
pub struct Bucket {
    pub store: Arc<dyn ObjectStore>,
    pub dest: Destination,
}

impl Bucket {
    pub fn open(dest: &Destination, endpoint: Option<&str>) -> anyhow::Result<Bucket> {
        let env = |k: &str| std::env::var(k).ok();
        let store =
            reflex_ship::s3_store(&dest.bucket, endpoint, Duration::from_secs(60), None, &env)?;
        Ok(Bucket {
            store,
            dest: dest.clone(),
        })
    }

    /// The object path of `rel` (a `/`-separated path) under the prefix.
    pub fn path(&self, rel: &str) -> ObjectPath {
        if self.dest.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.dest.prefix))
        }
    }

    /// Every object under the prefix: its path relative to the prefix and its size.
    pub async fn list(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let prefix =
            (!self.dest.prefix.is_empty()).then(|| ObjectPath::from(self.dest.prefix.as_str()));
        let metas: Vec<_> = self
            .store
            .list(prefix.as_ref())
            .try_collect()
            .await
            .with_context(|| format!("listing s3://{}/{}", self.dest.bucket, self.dest.prefix))?;
        let strip = if self.dest.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.dest.prefix)
        };
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.to_string();
                key.strip_prefix(&strip)
                    .map(|rel| (rel.to_string(), m.size))
            })
            .collect())
    }

    /// Downloads `rel` into `file` chunk by chunk (memory: one chunk).
    pub async fn download(&self, rel: &str, file: &Path) -> anyhow::Result<u64> {
        use tokio::io::AsyncWriteExt;
        let path = self.path(rel);
        let got = self
            .store
            .get(&path)
            .await
            .with_context(|| format!("reading s3://{}/{path}", self.dest.bucket))?;
        let mut stream = got.into_stream();
        let mut out = tokio::fs::File::create(file)
            .await
            .with_context(|| format!("creating {}", file.display()))?;
        let mut n = 0u64;
        while let Some(chunk) = stream
            .try_next()
            .await
            .with_context(|| format!("reading s3://{}/{path}", self.dest.bucket))?
        {
            n += chunk.len() as u64;
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        Ok(n)
    }

    /// Uploads the local `file` as `rel`: one PUT, so the object appears whole or not at all.
    pub async fn upload(&self, file: &Path, rel: &str) -> anyhow::Result<u64> {
        let bytes = tokio::fs::read(file)
            .await
            .with_context(|| format!("reading {}", file.display()))?;
        let n = bytes.len() as u64;
        let path = self.path(rel);
        self.store
            .put(&path, bytes.into())
            .await
            .with_context(|| format!("writing s3://{}/{path}", self.dest.bucket))?;
        Ok(n)
    }
}

/// Every file under `root` (recursively, symlinks not followed), as `/`-separated paths
/// relative to it, with sizes; hidden names (`.…`) skipped.
pub fn walk(root: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let ty = e.file_type()?;
            let child = rel.join(name);
            if ty.is_dir() {
                stack.push(child);
            } else if ty.is_file() {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                let parts: Vec<_> = child
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push((parts.join("/"), size));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(
            Location::parse("s3://fleet/traces").unwrap(),
            Location::S3(Destination {
                bucket: "fleet".into(),
                prefix: "traces".into()
            })
        );
        assert_eq!(
            Location::parse("data/x").unwrap(),
            Location::Local("data/x".into())
        );
        assert!(Location::parse("gs://b/x").is_err());
        assert!(Location::parse("s3://B").is_err());
    }

    #[test]
    fn walk_lists_files_relative_and_skips_hidden() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("robot=a/date=2026-01-01")).unwrap();
        std::fs::write(d.path().join("robot=a/date=2026-01-01/x.jsonl"), b"12").unwrap();
        std::fs::write(d.path().join(".reflex-ship.json"), b"{}").unwrap();
        assert_eq!(
            walk(d.path()).unwrap(),
            vec![("robot=a/date=2026-01-01/x.jsonl".to_string(), 2)]
        );
    }
}
