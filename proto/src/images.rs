//! The image contract: what the images of an `ActRequest` mean, written once for every
//! process that reads them — the server's validation, the record the server sends the
//! recorder, the recorder's redaction, and the replayer.
//!
//! - **The primary-image rule** ([`fold_primary`]). `images[0]` is the primary camera's
//!   image. `image_b64` (the single-image form of the seed's tool) holds the primary's bytes
//!   when `images` is empty or `images[0].data` is empty, and is then folded into `images[0]`.
//!   A request with both `image_b64` and `images[0].data` names two primary images: the
//!   server refuses it ([`TwoPrimaryImages`], `INVALID_ARGUMENT`), and its record keeps both
//!   as sent, so that replaying the record is refused the same way. No reader picks one of
//!   the two (two copies of this rule once did, differently).
//! - **Camera slots** ([`camera_slot`]): an image with an empty `camera` is the camera at its
//!   own position in the model's camera order.
//! - **Canonical images** ([`canonical_request`]): what the server sends the recorder for
//!   one call — the single-image form folded in, every image named and carrying the
//!   lowercase hex SHA-256 of its bytes, the bytes kept. The server never strips images;
//!   **only the recorder redacts**, per the session's [`ImageMode`].
//!
//! - **The seed tool's image hash** ([`seed_image_hash`]): traces written by the seed's
//!   tool (reflex-vla's `RecordWriter`) carry `image_sha256` as the first 16 hex digits of
//!   SHA-256 over the image's *base64 text*, not over its bytes. Readers tell it from ours
//!   by its length ([`is_seed_image_hash`]); the server only ever checks ours, so a replayer
//!   turns a seed hash into ours before it sends the request.
//!
//! `reflex-engine` does not use this module (it must not depend on tonic): the server maps
//! a request onto the engine's camera slots with these rules, and the engine takes the
//! already-canonical slots.

use sha2::Digest as _;

use crate::v1::{ActRequest, Image};

/// What image data a trace keeps (`reflex serve --record-images`, `SessionStart.image_mode`,
/// the trace header's `redaction.image`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[cfg_attr(feature = "clap", value(rename_all = "snake_case"))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum ImageMode {
    /// The encoded image bytes (base64 in the trace). Large; replayable anywhere.
    Full,
    /// Only the SHA-256 of each image. Replay resolves images with --image-dir.
    #[default]
    HashOnly,
    /// No image fields at all.
    None,
    /// A mode this version does not know, read from a trace written by a newer one. Never
    /// written and never a flag value; a recorder keeps no image field for it.
    #[cfg_attr(feature = "clap", value(skip))]
    #[cfg_attr(feature = "serde", serde(other))]
    Unknown,
}

impl ImageMode {
    /// Parses the wire form of `SessionStart.image_mode`; empty means the default,
    /// `hash_only`. `None` for anything else (a recorder refuses such a session).
    pub fn parse(s: &str) -> Option<ImageMode> {
        match s {
            "" | "hash_only" => Some(ImageMode::HashOnly),
            "full" => Some(ImageMode::Full),
            "none" => Some(ImageMode::None),
            _ => None,
        }
    }

    /// The wire, flag and trace form.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageMode::Full => "full",
            ImageMode::HashOnly => "hash_only",
            ImageMode::None => "none",
            ImageMode::Unknown => "unknown",
        }
    }
}

/// A request that sets both `image_b64` and `images[0].data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("image_b64 and images[0].data are both set; send the primary image once")]
pub struct TwoPrimaryImages;

/// The primary-image rule: moves `image_b64` into `images[0].data` (a new `images[0]` when
/// `images` is empty), leaving `image_b64` empty. With both `image_b64` and `images[0].data`
/// set nothing moves and the answer is [`TwoPrimaryImages`]. In place, so that the recorder
/// folds the request it owns without a copy of the bytes.
pub fn fold_primary(
    images: &mut Vec<Image>,
    image_b64: &mut Vec<u8>,
) -> Result<(), TwoPrimaryImages> {
    if image_b64.is_empty() {
        return Ok(());
    }
    match images.first_mut() {
        Some(first) if !first.data.is_empty() => Err(TwoPrimaryImages),
        Some(first) => {
            first.data = std::mem::take(image_b64);
            Ok(())
        }
        None => {
            images.push(Image {
                data: std::mem::take(image_b64),
                ..Default::default()
            });
            Ok(())
        }
    }
}

/// The camera slot (index into the model's `cameras`) of the request's image at `index`
/// named `camera`: the named camera's position, or, unnamed, the image's own position.
/// `None` when there is no such camera.
pub fn camera_slot(index: usize, camera: &str, cameras: &[String]) -> Option<usize> {
    if camera.is_empty() {
        (index < cameras.len()).then_some(index)
    } else {
        cameras.iter().position(|c| c == camera)
    }
}

/// The request as the server sends it to the recorder: `req` with canonical images (see
/// the module comment). `known` holds a SHA-256 per camera slot already computed (the
/// policy hashes every image it runs), so that an image is not hashed twice; an image
/// without bytes keeps the hash the client sent.
///
/// A request that names two primary images keeps `images` and `image_b64` as sent (each
/// hashed, `image_sha256` the hash of `image_b64`): its record replays to the same refusal.
pub fn canonical_request(
    req: &ActRequest,
    cameras: &[String],
    known: &[Option<String>],
) -> ActRequest {
    let mut images = req.images.clone();
    let mut image_b64 = req.image_b64.clone();
    let folded = fold_primary(&mut images, &mut image_b64).is_ok();
    for (index, img) in images.iter_mut().enumerate() {
        if img.camera.is_empty()
            && let Some(name) = cameras.get(index)
        {
            img.camera = name.clone();
        }
        let known = camera_slot(index, &img.camera, cameras).and_then(|s| known.get(s)?.clone());
        match known {
            Some(sha) => img.sha256 = sha,
            None if !img.data.is_empty() => img.sha256 = sha256_hex(&img.data),
            None => {}
        }
    }
    let image_sha256 = if folded {
        images.first().map(|i| i.sha256.clone()).unwrap_or_default()
    } else {
        sha256_hex(&image_b64)
    };
    // Every field by name: a field added to ActRequest must be decided on here.
    let ActRequest {
        images: _,
        instruction,
        state,
        episode_id,
        noise_seed,
        image_b64: _,
        image_sha256: _,
        noise,
    } = req;
    ActRequest {
        images,
        instruction: instruction.clone(),
        state: state.clone(),
        episode_id: episode_id.clone(),
        noise_seed: *noise_seed,
        image_b64,
        image_sha256,
        noise: noise.clone(),
    }
}

/// Lowercase hex SHA-256 of `data` (the form of every `sha256` field).
pub fn sha256_hex(data: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha2::Sha256::digest(data);
    let mut s = String::with_capacity(64);
    for b in digest.iter() {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

/// The seed tool's `image_sha256`: the first 16 lowercase hex digits of SHA-256 over the
/// base64 *text* of the image (reflex-vla `runtime/record.py`, `_redact_image`). Give it
/// the text as the seed's client sent it: standard base64, padded.
pub fn seed_image_hash(base64_text: &[u8]) -> String {
    let mut full = sha256_hex(base64_text);
    full.truncate(16);
    full
}

/// `true` for 16 lowercase hex digits: the form of [`seed_image_hash`] (ours has 64).
pub fn is_seed_image_hash(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `true` for 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(camera: &str, data: &[u8]) -> Image {
        Image {
            camera: camera.into(),
            data: data.to_vec(),
            sha256: String::new(),
        }
    }

    fn cams() -> Vec<String> {
        vec!["base".into(), "wrist".into()]
    }

    #[test]
    fn image_b64_fills_an_empty_primary_and_two_primaries_are_refused() {
        let fold = |images: Vec<Image>, b64: &[u8]| {
            let (mut images, mut b64) = (images, b64.to_vec());
            fold_primary(&mut images, &mut b64).map(|()| (images, b64))
        };
        // No single-image form: images as sent.
        let (i, b) = fold(vec![img("base", b"a")], b"").unwrap();
        assert_eq!((i, b), (vec![img("base", b"a")], vec![]));
        // Alone: it becomes images[0].
        let (i, b) = fold(vec![], b"x").unwrap();
        assert_eq!((i, b.is_empty()), (vec![img("", b"x")], true));
        // images[0] without bytes: its bytes, its name and hash kept.
        let mut named = img("base", b"");
        named.sha256 = "ab".into();
        let (i, _) = fold(vec![named, img("wrist", b"w")], b"x").unwrap();
        assert_eq!(
            (i[0].camera.as_str(), i[0].data.as_slice()),
            ("base", &b"x"[..])
        );
        assert_eq!((i[0].sha256.as_str(), i.len()), ("ab", 2));
        // Both: refused, nothing moved (whatever images[0] names).
        for camera in ["", "base", "wrist"] {
            assert_eq!(fold(vec![img(camera, b"y")], b"x"), Err(TwoPrimaryImages));
            let (mut images, mut b64) = (vec![img(camera, b"y")], b"x".to_vec());
            let _ = fold_primary(&mut images, &mut b64);
            assert_eq!((images, b64), (vec![img(camera, b"y")], b"x".to_vec()));
        }
    }

    #[test]
    fn unnamed_images_take_the_camera_of_their_position() {
        assert_eq!(camera_slot(0, "", &cams()), Some(0));
        assert_eq!(camera_slot(1, "", &cams()), Some(1));
        assert_eq!(camera_slot(2, "", &cams()), None);
        assert_eq!(camera_slot(0, "wrist", &cams()), Some(1));
        assert_eq!(camera_slot(0, "left", &cams()), None);
    }

    #[test]
    fn canonical_images_are_named_hashed_and_keep_their_bytes() {
        let req = ActRequest {
            images: vec![img("", b""), img("", b"W")],
            image_b64: b"B".to_vec(),
            instruction: "pick".into(),
            state: vec![0.5],
            episode_id: "e".into(),
            noise_seed: Some(3),
            image_sha256: String::new(),
            noise: vec![0.25, -1.0],
        };
        let known = vec![Some("aa".repeat(32)), None];
        let c = canonical_request(&req, &cams(), &known);
        assert_eq!(c.images[0].camera, "base");
        assert_eq!(c.images[0].data, b"B");
        assert_eq!(
            c.images[0].sha256,
            "aa".repeat(32),
            "the policy's hash is reused"
        );
        assert_eq!(c.images[1].camera, "wrist");
        assert_eq!(c.images[1].data, b"W");
        assert_eq!(c.images[1].sha256, sha256_hex(b"W"));
        assert!(c.image_b64.is_empty());
        assert_eq!(c.image_sha256, "aa".repeat(32));
        assert_eq!(
            (
                c.instruction.as_str(),
                c.state.as_slice(),
                c.episode_id.as_str(),
                c.noise_seed
            ),
            ("pick", &[0.5][..], "e", Some(3))
        );
        assert_eq!(c.noise, [0.25, -1.0], "the request's own noise is kept");
        // Without the policy's hashes (a failed call) every image is hashed here.
        let c = canonical_request(&req, &cams(), &[]);
        assert_eq!(c.image_sha256, sha256_hex(b"B"));
    }

    /// Regression: the server's validation refused a request with `image_b64` and
    /// `images[0].data`, while the record kept `images[0]` and silently dropped `image_b64`
    /// (and the recorder did the same), so the recorded request replayed as a success.
    #[test]
    fn two_primary_images_are_sent_to_the_recorder_as_they_came() {
        let req = ActRequest {
            images: vec![img("base", b"Y")],
            image_b64: b"X".to_vec(),
            ..Default::default()
        };
        let c = canonical_request(&req, &cams(), &[]);
        assert_eq!(c.images[0].data, b"Y");
        assert_eq!(c.images[0].sha256, sha256_hex(b"Y"));
        assert_eq!(c.image_b64, b"X");
        assert_eq!(c.image_sha256, sha256_hex(b"X"));
        let (mut images, mut b64) = (c.images.clone(), c.image_b64.clone());
        assert_eq!(fold_primary(&mut images, &mut b64), Err(TwoPrimaryImages));
    }

    #[test]
    fn image_modes_parse_their_wire_form() {
        for m in [ImageMode::Full, ImageMode::HashOnly, ImageMode::None] {
            assert_eq!(ImageMode::parse(m.as_str()), Some(m));
        }
        assert_eq!(ImageMode::parse(""), Some(ImageMode::HashOnly));
        assert_eq!(ImageMode::parse("jpeg"), None);
        assert_eq!(ImageMode::parse("unknown"), None);
        assert_eq!(ImageMode::default(), ImageMode::HashOnly);
    }

    /// Pinned against Python: `hashlib.sha256(base64.b64encode(b"\x89PNG-frame")).hexdigest()[:16]`.
    #[test]
    fn seed_image_hash_is_16_hex_over_the_base64_text() {
        // base64.b64encode(b"\x89PNG-frame") == b"iVBORy1mcmFtZQ=="
        let text = b"iVBORy1mcmFtZQ==";
        let h = seed_image_hash(text);
        assert_eq!(h, "6f5c445fb1a70752");
        assert!(is_seed_image_hash(&h));
        assert!(!is_seed_image_hash(&sha256_hex(text)));
        assert!(!is_seed_image_hash(&h.to_uppercase()));
        assert_ne!(
            h,
            sha256_hex(b"\x89PNG-frame")[..16],
            "over the text, not the bytes"
        );
    }

    #[test]
    fn sha256_hex_is_lowercase_and_checked() {
        let h = sha256_hex(b"abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&h));
        assert!(!is_sha256_hex(&h.to_uppercase()));
        assert!(!is_sha256_hex(&h[1..]));
    }
}
