//! Turning a recorded request back into an `ActRequest` with its image bytes.
//!
//! `full` traces carry the bytes (the primary in `request.image_b64`, the others in
//! `images[i].data`). `hash_only` traces carry only SHA-256 of the encoded bytes; an
//! [`ImageIndex`] built from `--image-dir` maps hashes to files. Files are indexed by the
//! SHA-256 of their bytes (never by name: the robot's file names are not in the trace),
//! read again when a record needs them, and checked against the hash once more, so a file
//! changed after indexing is reported rather than sent.
//!
//! Bounds: regular files only (a symlink to a file counts; symlinked folders are not
//! followed, so a loop cannot make the walk endless), at most [`MAX_IMAGE_BYTES`] each,
//! at most [`MAX_FILES`] files and [`MAX_DEPTH`] levels.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use reflex_proto::v1::{ActRequest, Image};
use reflex_recorder::RequestRecord;
use reflex_recorder::trace::sha256_hex;

/// Largest file indexed (a camera frame is far smaller).
pub const MAX_IMAGE_BYTES: u64 = 32 * 1024 * 1024;
/// Most files looked at in one `--image-dir`.
pub const MAX_FILES: usize = 1_000_000;
/// Deepest folder level walked.
pub const MAX_DEPTH: usize = 64;

/// Why `--image-dir` could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("--image-dir {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("--image-dir {} is not a folder", .0.display())]
    NotADir(PathBuf),
    #[error("--image-dir {} holds more than {MAX_FILES} files; point it at the images only", .0.display())]
    TooManyFiles(PathBuf),
}

/// SHA-256 → file, for every regular file under a folder.
#[derive(Debug, Default)]
pub struct ImageIndex {
    files: HashMap<String, PathBuf>,
    /// Files left out: larger than [`MAX_IMAGE_BYTES`].
    pub skipped_large: usize,
    /// Files or folders that could not be read.
    pub unreadable: usize,
}

impl ImageIndex {
    /// Walks `dir` recursively and hashes every file.
    pub fn build(dir: &Path) -> Result<ImageIndex, IndexError> {
        let meta = fs::metadata(dir).map_err(|source| IndexError::Open {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(IndexError::NotADir(dir.to_path_buf()));
        }
        let mut index = ImageIndex::default();
        let mut seen = 0usize;
        let mut stack = vec![(dir.to_path_buf(), 0usize)];
        while let Some((folder, depth)) = stack.pop() {
            let entries = match fs::read_dir(&folder) {
                Ok(e) => e,
                Err(_) => {
                    index.unreadable += 1;
                    continue;
                }
            };
            for entry in entries {
                let Ok(entry) = entry else {
                    index.unreadable += 1;
                    continue;
                };
                let path = entry.path();
                let Ok(kind) = entry.file_type() else {
                    index.unreadable += 1;
                    continue;
                };
                if kind.is_dir() {
                    if depth < MAX_DEPTH {
                        stack.push((path, depth + 1));
                    }
                    continue;
                }
                seen += 1;
                if seen > MAX_FILES {
                    return Err(IndexError::TooManyFiles(dir.to_path_buf()));
                }
                // Follows a symlink to see whether it names a regular file.
                match fs::metadata(&path) {
                    Ok(m) if m.is_file() && m.len() > MAX_IMAGE_BYTES => index.skipped_large += 1,
                    Ok(m) if m.is_file() => match read_bounded(&path) {
                        Some(bytes) => {
                            index.files.entry(sha256_hex(&bytes)).or_insert(path);
                        }
                        None => index.unreadable += 1,
                    },
                    Ok(_) => {}
                    Err(_) => index.unreadable += 1,
                }
            }
        }
        Ok(index)
    }

    /// Distinct images indexed.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The bytes whose SHA-256 is `sha256`, if a file has them (still).
    pub fn get(&self, sha256: &str) -> Option<Vec<u8>> {
        let path = self.files.get(&sha256.to_ascii_lowercase())?;
        let bytes = read_bounded(path)?;
        (sha256_hex(&bytes).eq_ignore_ascii_case(sha256)).then_some(bytes)
    }
}

fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    let file = fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_IMAGE_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    (bytes.len() as u64 <= MAX_IMAGE_BYTES).then_some(bytes)
}

/// What a record lacks to be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// One entry per missing image: its SHA-256, or why there is none.
    pub missing: Vec<String>,
}

/// What the trace keeps of a record's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Every image's bytes.
    Bytes,
    /// Hashes for at least one image without bytes.
    Hashes,
    /// Neither bytes nor hashes for some image (`--record-images none`).
    Nothing,
}

/// What `record` keeps of its images (decides, before anything is sent, whether a
/// replay needs `--image-dir` or cannot be done at all).
pub fn kept(record: &RequestRecord) -> Kept {
    let req = &record.request;
    if req.images.is_empty() {
        return if !req.image_b64.is_empty() {
            Kept::Bytes
        } else if !req.image_sha256.is_empty() {
            Kept::Hashes
        } else {
            Kept::Nothing
        };
    }
    let mut kept = Kept::Bytes;
    for (i, img) in req.images.iter().enumerate() {
        let has_bytes = !img.data.is_empty() || (i == 0 && !req.image_b64.is_empty());
        let has_hash = !img.sha256.is_empty() || (i == 0 && !req.image_sha256.is_empty());
        if !has_bytes {
            if !has_hash {
                return Kept::Nothing;
            }
            kept = Kept::Hashes;
        }
    }
    kept
}

/// The request to send for `record`: its recorded request with the recorded noise seed,
/// every image's bytes filled in (from the trace, else from `index`).
pub fn request_for(
    record: &RequestRecord,
    index: Option<&ImageIndex>,
) -> Result<ActRequest, Unresolved> {
    let mut req = record.request.to_proto();
    // The seed the call drew, so the same model draws the same noise.
    if let Some(seed) = record.noise_seed.or(record.request.noise_seed) {
        req.noise_seed = Some(seed);
    }
    let mut missing = Vec::new();
    let mut lookup = |sha: &str, what: String| -> Option<Vec<u8>> {
        if sha.is_empty() {
            missing.push(format!("{what}: no bytes and no hash in the trace"));
            return None;
        }
        let found = index.and_then(|ix| ix.get(sha));
        if found.is_none() {
            missing.push(sha.to_string());
        }
        found
    };
    if req.images.is_empty() {
        if req.image_b64.is_empty()
            && let Some(bytes) = lookup(&req.image_sha256.clone(), "primary image".into())
        {
            req.image_b64 = bytes;
        }
    } else {
        let primary_sha = req.image_sha256.clone();
        let primary_in_b64 = !req.image_b64.is_empty();
        for (i, img) in req.images.iter_mut().enumerate() {
            if !img.data.is_empty() || (i == 0 && primary_in_b64) {
                continue;
            }
            let sha = if img.sha256.is_empty() && i == 0 {
                primary_sha.clone()
            } else {
                img.sha256.clone()
            };
            if let Some(bytes) = lookup(&sha, describe(i, img)) {
                img.data = bytes;
            }
        }
    }
    if missing.is_empty() {
        Ok(req)
    } else {
        Err(Unresolved { missing })
    }
}

fn describe(i: usize, img: &Image) -> String {
    if img.camera.is_empty() {
        format!("images[{i}]")
    } else {
        format!("images[{i}] ({})", img.camera)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reflex_recorder::trace::{TraceImage, TraceRequest};

    fn record(images: Vec<TraceImage>, b64: &[u8], sha: &str) -> RequestRecord {
        RequestRecord {
            request: TraceRequest {
                images,
                image_b64: b64.to_vec(),
                image_sha256: sha.into(),
                state: vec![0.5],
                ..Default::default()
            },
            noise_seed: Some(42),
            ..Default::default()
        }
    }

    fn img(camera: &str, data: &[u8], sha: &str) -> TraceImage {
        TraceImage {
            camera: camera.into(),
            data: data.to_vec(),
            sha256: sha.into(),
        }
    }

    #[test]
    fn full_records_need_no_index() {
        let r = record(
            vec![img("base", b"", &sha256_hex(b"A")), img("wrist", b"B", "")],
            b"A",
            &sha256_hex(b"A"),
        );
        assert_eq!(kept(&r), Kept::Bytes);
        let req = request_for(&r, None).unwrap();
        assert_eq!(req.noise_seed, Some(42));
        assert_eq!(req.image_b64, b"A");
        assert_eq!(req.images[1].data, b"B");
    }

    #[test]
    fn hash_only_records_resolve_from_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/base.jpg"), b"BASE").unwrap();
        fs::write(dir.path().join("a/b/wrist.png"), b"WRIST").unwrap();
        fs::write(dir.path().join("other"), b"unrelated").unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("a/loop")).unwrap();
        let index = ImageIndex::build(dir.path()).unwrap();
        assert_eq!(index.len(), 3);

        let (sb, sw) = (sha256_hex(b"BASE"), sha256_hex(b"WRIST"));
        let r = record(
            vec![img("base", b"", &sb), img("wrist", b"", &sw)],
            b"",
            &sb,
        );
        assert_eq!(kept(&r), Kept::Hashes);
        let req = request_for(&r, Some(&index)).unwrap();
        assert_eq!(
            (req.images[0].data.as_slice(), req.images[1].data.as_slice()),
            (&b"BASE"[..], &b"WRIST"[..])
        );
        let e = request_for(&r, None).unwrap_err();
        assert_eq!(e.missing, vec![sb.clone(), sw.clone()]);

        // Seed-style single image by hash.
        let r = record(vec![], b"", &sw);
        assert_eq!(request_for(&r, Some(&index)).unwrap().image_b64, b"WRIST");

        // A file changed after indexing is not sent.
        fs::write(dir.path().join("a/base.jpg"), b"EDITED").unwrap();
        let r = record(vec![img("base", b"", &sb)], b"", &sb);
        assert_eq!(request_for(&r, Some(&index)).unwrap_err().missing, vec![sb]);
    }

    #[test]
    fn none_records_keep_nothing() {
        let r = record(vec![], b"", "");
        assert_eq!(kept(&r), Kept::Nothing);
        let e = request_for(&r, None).unwrap_err();
        assert!(e.missing[0].contains("no bytes and no hash"), "{e:?}");
    }

    #[test]
    fn index_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ImageIndex::build(&dir.path().join("nope")),
            Err(IndexError::Open { .. })
        ));
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert!(matches!(ImageIndex::build(&f), Err(IndexError::NotADir(_))));
    }
}
