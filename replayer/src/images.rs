//! Turning a recorded request back into an `ActRequest` with its image bytes.
//!
//! `full` traces carry the bytes (the primary in `request.image_b64`, the others in
//! `images[i].data`). `hash_only` traces carry only SHA-256 of the encoded bytes; an
//! [`ImageIndex`] built from `--image-dir` maps hashes to files. Files are indexed by the
//! SHA-256 of their bytes (never by name: the robot's file names are not in the trace),
//! read again when a record needs them, and checked against the hash once more, so a file
//! changed after indexing is reported rather than sent.
//!
//! The seed tool's traces hash differently: 16 hex digits of SHA-256 over the image's
//! base64 *text* (`reflex_proto::images::seed_image_hash`), told from ours by length. The
//! server checks only ours, so a seed hash is checked against the bytes (a `full` trace)
//! or looked up in the index (which keys every file by both hashes), then replaced by the
//! SHA-256 of the bytes in the request sent.
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
use reflex_recorder::trace::{is_seed_image_hash, seed_image_hash_of, sha256_hex};

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

/// SHA-256 → file, for every regular file under a folder; and the seed tool's hash → file.
#[derive(Debug, Default)]
pub struct ImageIndex {
    files: HashMap<String, PathBuf>,
    seed: HashMap<String, PathBuf>,
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
                            index
                                .seed
                                .entry(seed_image_hash_of(&bytes))
                                .or_insert_with(|| path.clone());
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

    /// The bytes whose SHA-256 is `sha256` (ours, or the seed tool's 16-digit form), if a
    /// file has them (still).
    pub fn get(&self, sha256: &str) -> Option<Vec<u8>> {
        let key = sha256.to_ascii_lowercase();
        if is_seed_image_hash(&key) {
            let bytes = read_bounded(self.seed.get(&key)?)?;
            return (seed_image_hash_of(&bytes) == key).then_some(bytes);
        }
        let bytes = read_bounded(self.files.get(&key)?)?;
        (sha256_hex(&bytes) == key).then_some(bytes)
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
    // The seed's hashes of images the trace holds: checked, then made ours.
    if is_seed_image_hash(&req.image_sha256.to_ascii_lowercase()) {
        let primary = match req.images.first() {
            Some(first) if !first.data.is_empty() => Some(&first.data),
            _ if !req.image_b64.is_empty() => Some(&req.image_b64),
            _ => None,
        };
        if let Some(bytes) = primary {
            match ours_for_seed_hash(&req.image_sha256, bytes) {
                Ok(sha) => req.image_sha256 = sha,
                Err(e) => missing.push(format!("image_sha256: {e}")),
            }
        }
    }
    for (i, img) in req.images.iter_mut().enumerate() {
        if !img.data.is_empty() && is_seed_image_hash(&img.sha256.to_ascii_lowercase()) {
            match ours_for_seed_hash(&img.sha256, &img.data) {
                Ok(sha) => img.sha256 = sha,
                Err(e) => missing.push(format!("{}: {e}", describe(i, img))),
            }
        }
    }
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
            if is_seed_image_hash(&req.image_sha256.to_ascii_lowercase()) {
                req.image_sha256 = sha256_hex(&bytes);
            }
            req.image_b64 = bytes;
        }
    } else {
        let primary_sha = req.image_sha256.clone();
        let primary_in_b64 = !req.image_b64.is_empty();
        let mut req_primary_sha = None;
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
                // The server checks hashes of our form only.
                if is_seed_image_hash(&img.sha256.to_ascii_lowercase()) {
                    img.sha256 = sha256_hex(&bytes);
                }
                if i == 0 && is_seed_image_hash(&primary_sha.to_ascii_lowercase()) {
                    req_primary_sha = Some(sha256_hex(&bytes));
                }
                img.data = bytes;
            }
        }
        if let Some(sha) = req_primary_sha {
            req.image_sha256 = sha;
        }
    }
    if missing.is_empty() {
        Ok(req)
    } else {
        Err(Unresolved { missing })
    }
}

/// Our SHA-256 of `bytes` when `seed_hash` (the seed tool's form) is theirs.
fn ours_for_seed_hash(seed_hash: &str, bytes: &[u8]) -> Result<String, String> {
    let actual = seed_image_hash_of(bytes);
    if actual.eq_ignore_ascii_case(seed_hash) {
        Ok(sha256_hex(bytes))
    } else {
        Err(format!(
            "{seed_hash} (the seed tool's hash of the base64 text) does not match the \
             recorded image, whose hash in that form is {actual}"
        ))
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

    /// Regression: a full trace of the seed's tool failed every record with
    /// "image_sha256 does not match": its hash is over the base64 text, 16 hex digits.
    #[test]
    fn seed_hashes_are_checked_against_the_bytes_and_replaced_by_ours() {
        let seed_a = seed_image_hash_of(b"A");
        assert_eq!(seed_a.len(), 16);
        // Primary in image_b64 (the seed's own form).
        let r = record(vec![], b"A", &seed_a);
        let req = request_for(&r, None).unwrap();
        assert_eq!(req.image_sha256, sha256_hex(b"A"));
        assert_eq!(req.image_b64, b"A");
        // A camera slot with its bytes and a seed hash.
        let r = record(vec![img("base", b"A", &seed_a)], b"", "");
        let req = request_for(&r, None).unwrap();
        assert_eq!(req.images[0].sha256, sha256_hex(b"A"));
        // Bytes that are not the hashed image: said, not sent.
        let r = record(vec![], b"B", &seed_a);
        let e = request_for(&r, None).unwrap_err();
        assert!(
            e.missing[0].contains("does not match the recorded image"),
            "{e:?}"
        );
        let r = record(vec![img("wrist", b"B", &seed_a)], b"", "");
        let e = request_for(&r, None).unwrap_err();
        assert!(e.missing[0].starts_with("images[0] (wrist)"), "{e:?}");
    }

    #[test]
    fn seed_hashes_resolve_from_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("frame0.jpg"), b"BASE").unwrap();
        fs::write(dir.path().join("frame1.jpg"), b"WRIST").unwrap();
        let index = ImageIndex::build(dir.path()).unwrap();
        assert_eq!(index.len(), 2);
        let (sb, sw) = (seed_image_hash_of(b"BASE"), seed_image_hash_of(b"WRIST"));
        // hash_only seed trace: the primary by its seed hash alone.
        let r = record(vec![], b"", &sb);
        assert_eq!(kept(&r), Kept::Hashes);
        let req = request_for(&r, Some(&index)).unwrap();
        assert_eq!(
            (req.image_b64.as_slice(), req.image_sha256.as_str()),
            (&b"BASE"[..], sha256_hex(b"BASE").as_str())
        );
        // Camera slots by seed hash, the primary's taken from image_sha256.
        let r = record(vec![img("base", b"", ""), img("wrist", b"", &sw)], b"", &sb);
        let req = request_for(&r, Some(&index)).unwrap();
        assert_eq!(req.images[0].data, b"BASE");
        assert_eq!(req.image_sha256, sha256_hex(b"BASE"));
        assert_eq!(
            (req.images[1].data.as_slice(), req.images[1].sha256.as_str()),
            (&b"WRIST"[..], sha256_hex(b"WRIST").as_str())
        );
        // Upper case reads too; an unknown seed hash is missing.
        assert!(index.get(&sb.to_uppercase()).is_some());
        let other = seed_image_hash_of(b"other");
        let e = request_for(&record(vec![], b"", &other), Some(&index)).unwrap_err();
        assert_eq!(e.missing, vec![other]);
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
