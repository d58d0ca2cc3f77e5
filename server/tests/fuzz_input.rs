//! Fuzz targets for everything a client's `ActRequest` reaches before the model runs:
//! property tests (proptest) that run on stable Rust in every `cargo test`, for a bounded
//! number of cases.
//!
//! - `fuzz_act_request_any`: random requests (any cameras, names, image bytes, hashes, state
//!   lengths and floats, instructions of any size and script, seeds) through the service's
//!   real path ([`PolicyService::act`]: size check, `to_input`, `check_cheap`, the pool, the
//!   policy's hashing and decoding) on the loaded reference model.
//! - `fuzz_act_request_one_defect`: a valid request with exactly one known defect: the answer
//!   is `INVALID_ARGUMENT` naming that defect's field (no defect: actions).
//! - `fuzz_act_request_bytes`: any bytes, and damaged encodings of a valid request, decoded by
//!   prost as an `ActRequest` and, when they decode, answered.
//! - `fuzz_image_bytes` and `fuzz_image_mutated`: [`preprocess::decode_into`] on any bytes and
//!   on damaged JPEG/PNG files (cut, flipped, dimensions in the header edited up to
//!   60000×60000, with the PNG checksum fixed so the decoder believes them).
//!
//! What every case holds: no panic; an answer or `INVALID_ARGUMENT` whose message names a
//! request field (never `INTERNAL`, which is what a panicking inference worker becomes);
//! finite actions; and no allocation larger than the decoder's limit (`MAX_SIDE²·4` bytes),
//! however large the image claims to be.
//!
//! Cases per target: `REFLEX_FUZZ_CASES` (default [`DEFAULT_CASES`]: under a second per target,
//! 4 s for `fuzz_image_mutated`, in `cargo test --release` on two cores). A long run:
//! `REFLEX_FUZZ_CASES=200000 cargo test --release -p reflex-server --test fuzz_input`.
//! A failing case is shrunk, printed, and its seed appended to
//! `server/proptest-regressions/fuzz_input.txt`, which every run replays first; a crash we
//! fixed also gets a named regression test here.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use prost::Message;
use reflex_engine::config::ImageConfig;
use reflex_engine::policy::{MAX_INSTRUCTION_BYTES, Policy, PolicyOptions};
use reflex_engine::preprocess::{self, ImageError, MAX_SIDE};
use reflex_proto::v1 as pb;
use reflex_server::recording::Recording;
use reflex_server::service::{PolicyService, ServiceOptions};
use sha2::{Digest, Sha256};
use tonic::Code;

const DEFAULT_CASES: u32 = 5_000;

/// The service's `--max-message-mb` here: small, so oversized requests are cheap to make.
const MAX_MESSAGE: usize = 256 * 1024;

fn config() -> ProptestConfig {
    let cases = std::env::var("REFLEX_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases: cases.max(1),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/fuzz_input.txt"
        )))),
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Allocation watch: the largest single allocation made by the current thread (image
// decoding runs on the caller's thread in the image targets).

struct Watch;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static WATCH: Watch = Watch;

fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// What one decode may allocate at once: the decoder's own limit.
const DECODE_ALLOC_LIMIT: usize = MAX_SIDE as usize * MAX_SIDE as usize * 4;

// ---------------------------------------------------------------------------------------
// The reference model behind a real service, loaded once per test binary.

struct Fixture {
    service: PolicyService,
    image: ImageConfig,
    cameras: Vec<String>,
    state_dim: usize,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        reflex_engine::export::write_reference_export(dir.path(), 0).unwrap();
        let policy = Policy::load(dir.path(), &PolicyOptions::default()).unwrap();
        let cfg = policy.config().clone();
        let image = policy
            .reference_config()
            .expect("the reference export")
            .image
            .clone();
        let opts = ServiceOptions {
            workers: 2,
            queue_depth: 64,
            queue_per_connection: 64,
            max_message_bytes: MAX_MESSAGE,
            embodiment: "fuzz".into(),
            session_id: "fuzz-0001".into(),
        };
        Fixture {
            service: PolicyService::new(Arc::new(policy), &opts, Recording::off()),
            image,
            cameras: cfg.cameras.clone(),
            state_dim: cfg.state_dim,
        }
    })
}

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
}

/// Answers `req` through the service and checks what every answer must hold.
fn answer(req: pb::ActRequest) -> Result<pb::ActResponse, tonic::Status> {
    let f = fixture();
    let seed = req.noise_seed;
    let res = RT.with(|rt| rt.block_on(f.service.act(req)));
    match &res {
        Ok(r) => {
            assert_eq!((r.num_actions, r.action_dim), (50, 7));
            assert_eq!(r.actions.len(), 350);
            assert!(
                r.actions.iter().all(|a| a.is_finite()),
                "non-finite actions"
            );
            if let Some(s) = seed {
                assert_eq!(r.noise_seed, s);
            }
        }
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            let m = s.message();
            assert!(
                [
                    "images",
                    "image_b64",
                    "image_sha256",
                    "state",
                    "instruction",
                    "noise",
                    "request is"
                ]
                .iter()
                .any(|field| m.contains(field)),
                "the message names no field: {m:?}"
            );
            assert!(
                m.len() < 1024,
                "a message the user can read: {} bytes",
                m.len()
            );
        }
    }
    res
}

// ---------------------------------------------------------------------------------------
// Images.

fn pattern(w: u32, h: u32, seed: u8) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x as u8).wrapping_add(seed),
            (y as u8).wrapping_mul(3),
            seed.wrapping_mul(7),
        ])
    })
}

fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// Valid images of several kinds: the model's size and others, RGB, grey, RGBA, 16-bit.
fn valid_images() -> &'static [Vec<u8>] {
    static I: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    I.get_or_init(|| {
        use image::DynamicImage as D;
        use image::ImageFormat::{Jpeg, Png};
        vec![
            preprocess::encode_jpeg(&pattern(224, 224, 1), 90),
            preprocess::encode_png(&pattern(224, 224, 2)),
            preprocess::encode_jpeg(&pattern(64, 48, 3), 50),
            preprocess::encode_png(&pattern(1, 1, 4)),
            encode(D::ImageRgb8(pattern(31, 17, 5)).grayscale(), Png),
            encode(D::ImageRgb8(pattern(40, 30, 6)).grayscale(), Jpeg),
            encode(
                D::ImageRgba8(D::ImageRgb8(pattern(20, 20, 7)).to_rgba8()),
                Png,
            ),
            encode(
                D::ImageRgb16(D::ImageRgb8(pattern(12, 9, 8)).to_rgb16()),
                Png,
            ),
        ]
    })
}

/// Header edits that make a file claim other dimensions.
#[derive(Debug, Clone)]
enum ImageEdit {
    Truncate(Index),
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    /// PNG: IHDR width and height, with its CRC recomputed so the decoder trusts them.
    PngSize(u32, u32),
    /// JPEG: the first SOF segment's height and width.
    JpegSize(u16, u16),
}

fn dimension() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(MAX_SIDE),
        Just(MAX_SIDE + 1),
        Just(60000),
        Just(u32::MAX),
        Just(1 << 31),
        any::<u32>(),
    ]
}

fn image_edit() -> impl Strategy<Value = ImageEdit> {
    prop_oneof![
        2 => any::<Index>().prop_map(ImageEdit::Truncate),
        2 => (any::<Index>(), 1u8..=255).prop_map(|(a, m)| ImageEdit::Flip(a, m)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(a, b)| ImageEdit::Insert(a, b)),
        2 => (dimension(), dimension()).prop_map(|(w, h)| ImageEdit::PngSize(w, h)),
        2 => (dimension(), dimension())
            .prop_map(|(w, h)| ImageEdit::JpegSize(w.min(65535) as u16, h.min(65535) as u16)),
    ]
}

/// CRC-32 (IEEE) as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Rewrites a PNG's IHDR dimensions; `false` if `png` has no IHDR where PNGs keep it.
fn set_png_size(png: &mut [u8], w: u32, h: u32) -> bool {
    if png.len() < 33 || &png[12..16] != b"IHDR" {
        return false;
    }
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    true
}

/// Rewrites the first SOF segment of a JPEG; `false` if there is none.
fn set_jpeg_size(jpg: &mut [u8], w: u16, h: u16) -> bool {
    let mut i = 2;
    while i + 9 < jpg.len() {
        if jpg[i] != 0xff {
            return false;
        }
        let marker = jpg[i + 1];
        let len = usize::from(u16::from_be_bytes([jpg[i + 2], jpg[i + 3]]));
        if matches!(marker, 0xc0..=0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf) {
            jpg[i + 5..i + 7].copy_from_slice(&h.to_be_bytes());
            jpg[i + 7..i + 9].copy_from_slice(&w.to_be_bytes());
            return true;
        }
        i += 2 + len;
    }
    false
}

fn apply_image_edit(bytes: &mut Vec<u8>, e: &ImageEdit) {
    match e {
        ImageEdit::Truncate(a) => bytes.truncate(a.index(bytes.len() + 1)),
        ImageEdit::Flip(a, m) if !bytes.is_empty() => {
            let i = a.index(bytes.len());
            bytes[i] ^= m;
        }
        ImageEdit::Flip(..) => {}
        ImageEdit::Insert(a, b) => {
            let i = a.index(bytes.len() + 1);
            bytes.splice(i..i, b.iter().copied());
        }
        ImageEdit::PngSize(w, h) => {
            set_png_size(bytes, *w, *h);
        }
        ImageEdit::JpegSize(w, h) => {
            set_jpeg_size(bytes, *w, *h);
        }
    }
}

/// What the header of `bytes` claims, where it can be read.
fn claimed_size(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() >= 24 && &bytes[12..16] == b"IHDR" {
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        return Some((w.into(), h.into()));
    }
    None
}

/// Decodes `bytes` for the reference model and checks what every decode must hold.
fn decode(bytes: &[u8]) -> Result<(), ImageError> {
    let cfg = &fixture().image;
    let mut out = vec![f32::NAN; 3 * (cfg.width * cfg.height) as usize];
    let (res, largest) = largest_allocation(|| preprocess::decode_into(bytes, cfg, &mut out));
    assert!(
        largest <= DECODE_ALLOC_LIMIT,
        "decoding {} bytes allocated {largest} bytes at once",
        bytes.len()
    );
    match &res {
        Ok(()) => assert!(out.iter().all(|v| v.is_finite()), "non-finite pixels"),
        Err(e) => {
            let known = matches!(
                image::guess_format(bytes),
                Ok(image::ImageFormat::Jpeg | image::ImageFormat::Png)
            );
            assert_eq!(matches!(e, ImageError::UnknownFormat), !known, "{e}");
            assert!(!e.to_string().is_empty());
        }
    }
    res
}

// ---------------------------------------------------------------------------------------
// Requests.

fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        1 => Just(String::new()),
        1 => "[\\x00-\\x1f\"\\\\/\u{2028}\u{feff}\u{10ffff}]{0,8}",
    ]
}

/// Camera names, mostly the model's own (so that requests get past the camera checks).
fn camera_name(usual: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        12 => Just(usual.to_string()),
        3 => Just(String::new()),
        1 => prop::sample::select(vec!["base", "wrist", "left_wrist", "BASE", "base ", "wrist\0"])
            .prop_map(String::from),
        1 => any_string(),
        1 => (1usize..100_000).prop_map(|n| "c".repeat(n)),
    ]
}

/// Image bytes: none, valid, damaged, or junk.
fn image_bytes() -> impl Strategy<Value = Vec<u8>> {
    let n = valid_images().len();
    prop_oneof![
        1 => Just(Vec::new()),
        6 => (0..n).prop_map(|i| valid_images()[i].clone()),
        3 => ((0..n), prop::collection::vec(image_edit(), 1..3)).prop_map(|(i, edits)| {
            let mut b = valid_images()[i].clone();
            for e in &edits {
                apply_image_edit(&mut b, e);
            }
            b
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|junk| [&b"\xff\xd8\xff"[..], &junk].concat()),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|junk| [&b"\x89PNG\r\n\x1a\n"[..], &junk].concat()),
    ]
}

/// How a hash field is filled in relation to the bytes it is about.
#[derive(Debug, Clone)]
enum Sha {
    Empty,
    Right,
    RightUpper,
    Wrong(String),
}

fn sha() -> impl Strategy<Value = Sha> {
    prop_oneof![
        12 => Just(Sha::Empty),
        2 => Just(Sha::Right),
        1 => Just(Sha::RightUpper),
        1 => "[0-9a-f]{64}".prop_map(Sha::Wrong),
        1 => any_string().prop_map(Sha::Wrong),
    ]
}

fn sha_of(s: &Sha, data: &[u8]) -> String {
    let hex = || {
        Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    match s {
        Sha::Empty => String::new(),
        Sha::Right => hex(),
        Sha::RightUpper => hex().to_uppercase(),
        Sha::Wrong(w) => w.clone(),
    }
}

fn any_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -3.0f32..3.0,
        2 => any::<u32>().prop_map(f32::from_bits),
        1 => prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, -0.0, f32::MIN_POSITIVE, 1e-45]),
    ]
}

fn instruction() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => Just("pick up the red cup".to_string()),
        3 => any_string(),
        // Around the limit, in one- to four-byte characters.
        2 => ((MAX_INSTRUCTION_BYTES - 8)..(MAX_INSTRUCTION_BYTES + 8), prop::sample::select(vec!["a", "é", "€", "🤖"]))
            .prop_map(|(n, c)| c.repeat(n / c.len())),
        1 => (1usize..(2 * MAX_MESSAGE)).prop_map(|n| "x".repeat(n)),
    ]
}

/// Requests that are mostly right: each field is valid more often than not, so that the
/// requests reach every check and, some of them, the model.
fn any_request() -> impl Strategy<Value = pb::ActRequest> {
    let image = |usual| {
        (camera_name(usual), image_bytes(), sha()).prop_map(|(camera, data, s)| pb::Image {
            sha256: sha_of(&s, &data),
            camera,
            data,
        })
    };
    let images = prop_oneof![
        1 => Just(Vec::new()),
        6 => image("base").prop_map(|a| vec![a]),
        3 => (image("base"), image("wrist")).prop_map(|(a, b)| vec![a, b]),
        1 => prop::collection::vec(image("wrist"), 0..4),
    ];
    (
        images,
        instruction(),
        prop_oneof![
            6 => prop::collection::vec(-3.0f32..3.0, 8),
            3 => prop::collection::vec(any_f32(), 8),
            1 => prop::collection::vec(any_f32(), 0..20),
        ],
        any_string(),
        any::<Option<u64>>(),
        prop_oneof![6 => Just(Vec::new()), 1 => image_bytes()],
        sha(),
        // The request's own noise: mostly absent, sometimes any floats, sometimes the size the
        // model takes (50 × 7).
        prop_oneof![
            8 => Just(Vec::new()),
            1 => prop::collection::vec(any_f32(), 0..20),
            1 => prop::collection::vec(any_f32(), 350..=350),
        ],
    )
        .prop_map(
            |(images, instruction, state, episode_id, noise_seed, image_b64, s, noise)| {
                let primary = images
                    .first()
                    .filter(|i| !i.data.is_empty())
                    .map_or(&image_b64, |i| &i.data);
                pb::ActRequest {
                    image_sha256: sha_of(&s, primary),
                    images,
                    instruction,
                    state,
                    episode_id,
                    noise_seed,
                    image_b64,
                    noise,
                }
            },
        )
}

fn valid_state() -> Vec<f32> {
    vec![0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04]
}

fn valid_request(shade: u8, seed: u64) -> pb::ActRequest {
    pb::ActRequest {
        images: vec![pb::Image {
            camera: "base".into(),
            data: valid_images()[usize::from(shade) % 2].clone(),
            sha256: String::new(),
        }],
        instruction: "pick up the red cup".into(),
        state: valid_state(),
        episode_id: "ep-fuzz".into(),
        noise_seed: Some(seed),
        ..Default::default()
    }
}

/// One thing wrong with an otherwise valid request, and what the answer must say.
#[derive(Debug, Clone)]
enum Defect {
    None,
    StateLength(usize),
    StateNotFinite(usize, f32),
    StateOverflow(usize, f32),
    InstructionTooLong(usize),
    UnknownCamera(String),
    DuplicateCamera,
    PrimaryNotFirst,
    TooManyImages,
    EmptyImage,
    Junk(Vec<u8>),
    BadHash(String),
    TwoPrimaries,
    TooLarge,
}

fn defect() -> impl Strategy<Value = Defect> {
    prop_oneof![
        1 => Just(Defect::None),
        1 => (0usize..64).prop_filter("not the model's", |n| *n != 8).prop_map(Defect::StateLength),
        1 => (0usize..8, prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]))
            .prop_map(|(i, v)| Defect::StateNotFinite(i, v)),
        1 => (0usize..8, prop::sample::select(vec![f32::MAX, f32::MIN, 2e38, -1.8e38]))
            .prop_map(|(i, v)| Defect::StateOverflow(i, v)),
        1 => ((MAX_INSTRUCTION_BYTES + 1)..(MAX_INSTRUCTION_BYTES * 4)).prop_map(Defect::InstructionTooLong),
        1 => any_string().prop_filter("not a camera", |s| !s.is_empty() && s != "base" && s != "wrist")
            .prop_map(Defect::UnknownCamera),
        1 => Just(Defect::DuplicateCamera),
        1 => Just(Defect::PrimaryNotFirst),
        1 => Just(Defect::TooManyImages),
        1 => Just(Defect::EmptyImage),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Defect::Junk),
        1 => "[0-9a-f]{64}".prop_map(Defect::BadHash),
        1 => Just(Defect::TwoPrimaries),
        1 => Just(Defect::TooLarge),
    ]
}

/// Applies `d` to a valid request; returns what the error message must contain.
fn apply_defect(req: &mut pb::ActRequest, d: &Defect) -> Option<String> {
    let wrist = || pb::Image {
        camera: "wrist".into(),
        data: valid_images()[2].clone(),
        sha256: String::new(),
    };
    Some(match d {
        Defect::None => return None,
        Defect::StateLength(n) => {
            req.state.resize(*n, 0.5);
            format!("state has {n} values; this model takes 8")
        }
        Defect::StateNotFinite(i, v) => {
            let i = *i;
            req.state[i] = *v;
            format!("state[{i}] is not a finite number")
        }
        Defect::StateOverflow(i, v) => {
            req.state[*i] = *v;
            format!("state[{i}] is {v:e}, out of this model's range")
        }
        Defect::InstructionTooLong(n) => {
            req.instruction = "a".repeat(*n);
            format!("instruction is {n} bytes; the limit is {MAX_INSTRUCTION_BYTES}")
        }
        Defect::UnknownCamera(name) => {
            let mut img = wrist();
            img.camera = name.clone();
            req.images.push(img);
            format!("images[1].camera {name:?} is not a camera of this model")
        }
        Defect::DuplicateCamera => {
            let mut img = wrist();
            img.camera = "base".into();
            req.images.push(img);
            "images[1].camera \"base\" appears twice".into()
        }
        Defect::PrimaryNotFirst => {
            req.images.insert(0, wrist());
            "images[0] must be the primary camera \"base\", got \"wrist\"".into()
        }
        Defect::TooManyImages => {
            req.images.push(wrist());
            req.images.push(wrist());
            "images has 3 entries; this model has 2 cameras (base, wrist)".into()
        }
        Defect::EmptyImage => {
            req.images.push(pb::Image {
                camera: "wrist".into(),
                ..Default::default()
            });
            "images[1].data is empty (camera \"wrist\")".into()
        }
        Defect::Junk(bytes) => {
            req.images[0].data = bytes.clone();
            "images[0].data (camera \"base\")".into()
        }
        Defect::BadHash(h) => {
            req.images[0].sha256 = h.clone();
            "images[0].sha256 does not match the SHA-256 of the image bytes".into()
        }
        Defect::TwoPrimaries => {
            req.image_b64 = req.images[0].data.clone();
            "image_b64 and images[0].data are both set".into()
        }
        Defect::TooLarge => {
            req.episode_id = "e".repeat(MAX_MESSAGE);
            format!("the limit is {MAX_MESSAGE} bytes")
        }
    })
}

/// Damage to an encoded request.
#[derive(Debug, Clone)]
enum ByteEdit {
    Truncate(Index),
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Append(Vec<u8>),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    // Field keys and varints that steer prost into the interesting places: huge lengths,
    // unknown fields, wrong wire types, packed floats cut mid-value.
    let snippets: Vec<&'static [u8]> = vec![
        b"\x0a\xff\xff\xff\xff\x0f",
        b"\x1a\x07\x00\x00\x80\x7f\x00\x00\xc0",
        b"\x1d\x00\x00\xc0\x7f",
        b"\x28\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        b"\x12\x02\xc3\x28",
        b"\x0a\x04\x0a\x02\xff\xfe",
        b"\xf8\xff\xff\xff\x0f\x01",
        b"\x0b\x0c",
        b"\x0f",
    ];
    prop_oneof![
        2 => any::<Index>().prop_map(ByteEdit::Truncate),
        2 => (any::<Index>(), 1u8..=255).prop_map(|(a, m)| ByteEdit::Flip(a, m)),
        2 => (any::<Index>(), prop::sample::select(snippets.clone())).prop_map(|(a, s)| ByteEdit::Insert(a, s.to_vec())),
        1 => prop::sample::select(snippets).prop_map(|s| ByteEdit::Append(s.to_vec())),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(a, b)| ByteEdit::Insert(a, b)),
    ]
}

// ---------------------------------------------------------------------------------------
// The targets.

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_act_request_any(req in any_request()) {
        let _ = answer(req);
    }

    #[test]
    fn fuzz_act_request_one_defect(d in defect(), shade in 0u8..2, seed in any::<u64>()) {
        let mut req = valid_request(shade, seed);
        let want = apply_defect(&mut req, &d);
        match (answer(req), want) {
            (Ok(_), None) => {}
            (Err(s), Some(want)) => prop_assert!(s.message().contains(&want), "{:?} lacks {want:?}", s.message()),
            (Ok(_), Some(want)) if matches!(d, Defect::Junk(_)) => {
                // Junk that happens to be an image is fine; say so if it ever is.
                prop_assert!(false, "junk decoded as an image; wanted {want:?}");
            }
            (got, want) => prop_assert!(false, "{got:?}, wanted {want:?}"),
        }
    }

    #[test]
    fn fuzz_act_request_bytes(
        base in prop_oneof![Just(None), (0u8..2, any::<u64>()).prop_map(Some)],
        junk in prop::collection::vec(any::<u8>(), 0..256),
        edits in prop::collection::vec(byte_edit(), 1..4),
    ) {
        let mut bytes = match base {
            None => junk,
            Some((shade, seed)) => valid_request(shade, seed).encode_to_vec(),
        };
        if base.is_some() {
            for e in &edits {
                match e {
                    ByteEdit::Truncate(a) => bytes.truncate(a.index(bytes.len() + 1)),
                    ByteEdit::Flip(a, m) if !bytes.is_empty() => { let i = a.index(bytes.len()); bytes[i] ^= m; }
                    ByteEdit::Flip(..) => {}
                    ByteEdit::Insert(a, s) => { let i = a.index(bytes.len() + 1); bytes.splice(i..i, s.iter().copied()); }
                    ByteEdit::Append(s) => bytes.extend_from_slice(s),
                }
            }
        }
        if let Ok(req) = pb::ActRequest::decode(&bytes[..]) {
            let _ = answer(req);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_image_bytes(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(|junk| [&b"\xff\xd8\xff"[..], &junk].concat()),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(|junk| [&b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"[..], &junk].concat()),
    ]) {
        let _ = decode(&bytes);
    }

    #[test]
    fn fuzz_image_mutated(i in 0..8usize, edits in prop::collection::vec(image_edit(), 1..4)) {
        let mut bytes = valid_images()[i].clone();
        for e in &edits {
            apply_image_edit(&mut bytes, e);
        }
        let res = decode(&bytes);
        if let Some((w, h)) = claimed_size(&bytes)
            && (w > u64::from(MAX_SIDE) || h > u64::from(MAX_SIDE))
        {
            prop_assert!(res.is_err(), "a PNG claiming {w}×{h} decoded");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Named regression and limit tests.

/// A PNG and a JPEG whose headers (checksum fixed) claim 60000×60000: refused with a clear
/// error before any allocation of that size (10.8 GB of RGB).
#[test]
fn images_claiming_60000_by_60000_are_refused_before_allocating() {
    let mut png = valid_images()[1].clone();
    assert!(set_png_size(&mut png, 60000, 60000));
    let e = decode(&png).unwrap_err();
    assert!(e.to_string().contains("could not be decoded as PNG"), "{e}");
    let mut jpg = valid_images()[0].clone();
    assert!(set_jpeg_size(&mut jpg, 60000, 60000));
    let e = decode(&jpg).unwrap_err();
    assert!(
        e.to_string().contains("could not be decoded as JPEG"),
        "{e}"
    );
    // And one pixel over the side limit, for both.
    let mut png = valid_images()[3].clone();
    assert!(set_png_size(&mut png, MAX_SIDE + 1, 1));
    assert!(decode(&png).is_err());
    let mut jpg = valid_images()[2].clone();
    assert!(set_jpeg_size(&mut jpg, 1, MAX_SIDE as u16 + 1));
    assert!(decode(&jpg).is_err());
}

/// The same through the service: `INVALID_ARGUMENT` naming the image, and the service answers
/// the next call.
#[test]
fn a_request_with_a_60000_by_60000_png_is_invalid_argument() {
    let mut req = valid_request(0, 1);
    let mut png = valid_images()[1].clone();
    assert!(set_png_size(&mut png, 60000, 60000));
    req.images[0].data = png;
    let s = answer(req).unwrap_err();
    assert!(
        s.message()
            .starts_with("images[0].data (camera \"base\") could not be decoded as PNG"),
        "{s:?}"
    );
    answer(valid_request(1, 2)).unwrap();
}

/// Regression (found by `fuzz_act_request_any`): an unknown camera name came back whole in
/// the error message — and so in the `grpc-message` trailer, 100 kB for a 100 kB name.
#[test]
fn a_huge_camera_name_gets_a_short_message() {
    for (images, starts) in [
        (
            vec![pb::Image {
                camera: "c".repeat(100_000),
                data: valid_images()[0].clone(),
                sha256: String::new(),
            }],
            format!(
                "images[0].camera \"{}…\" is not a camera of this model",
                "c".repeat(64)
            ),
        ),
        (
            vec![
                pb::Image {
                    camera: "wrist".into(),
                    data: valid_images()[0].clone(),
                    sha256: String::new(),
                },
                pb::Image {
                    camera: "€".repeat(30_000),
                    data: valid_images()[0].clone(),
                    sha256: String::new(),
                },
            ],
            "images[0] must be the primary camera \"base\", got \"wrist\"".into(),
        ),
    ] {
        let req = pb::ActRequest {
            images,
            ..valid_request(0, 3)
        };
        let s = answer(req).unwrap_err();
        assert!(s.message().starts_with(&starts), "{:?}", s.message());
        assert!(s.message().len() < 256, "{} bytes", s.message().len());
    }
}

/// Regression (found by `fuzz_act_request_any`): `state[1] = 3.4028235e38` is finite, so it
/// passed validation, but normalised (÷ std 0.5) it is infinite and the model answered 350
/// NaN actions with status OK — to a robot. It is now `INVALID_ARGUMENT` naming the value.
#[test]
fn a_state_that_overflows_when_normalised_is_invalid_argument() {
    let mut req = valid_request(0, 11);
    req.state[1] = f32::MAX;
    let s = answer(req).unwrap_err();
    assert!(
        s.message()
            .starts_with("state[1] is 3.4028235e38, out of this model's range"),
        "{:?}",
        s.message()
    );
    // Large values that stay finite once normalised get actions, finite ones (`answer`
    // checks), or the same error.
    for v in [1e30f32, -1e37, 1.7e38, f32::MIN / 2.0] {
        let mut req = valid_request(1, 12);
        req.state = vec![v; 8];
        if let Err(s) = answer(req) {
            assert!(
                s.message().contains("out of this model's range"),
                "{v}: {s:?}"
            );
        }
    }
}

/// Every known defect, once each, in the order the validation runs into them.
#[test]
fn each_defect_names_its_field() {
    for d in [
        Defect::StateLength(3),
        Defect::StateNotFinite(5, f32::NAN),
        Defect::StateOverflow(0, f32::MIN),
        Defect::InstructionTooLong(MAX_INSTRUCTION_BYTES + 1),
        Defect::UnknownCamera("left".into()),
        Defect::DuplicateCamera,
        Defect::PrimaryNotFirst,
        Defect::TooManyImages,
        Defect::EmptyImage,
        Defect::Junk(b"not an image".to_vec()),
        Defect::BadHash("0".repeat(64)),
        Defect::TwoPrimaries,
        Defect::TooLarge,
    ] {
        let mut req = valid_request(0, 7);
        let want = apply_defect(&mut req, &d).unwrap();
        let s = answer(req).unwrap_err();
        assert!(
            s.message().contains(&want),
            "{d:?}: {:?} lacks {want:?}",
            s.message()
        );
    }
    assert_eq!(fixture().cameras, ["base", "wrist"]);
    assert_eq!(fixture().state_dim, 8);
}

/// The request generator reaches every stage of validation and the model itself, not only the
/// first check: a fixed sample of its requests, sorted by what they got.
#[test]
fn fuzz_act_request_any_reaches_every_outcome() {
    use proptest::strategy::ValueTree;
    use std::collections::BTreeMap;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = any_request();
    let mut seen: BTreeMap<&'static str, u32> = BTreeMap::new();
    for _ in 0..600 {
        let req = strategy.new_tree(&mut runner).unwrap().current();
        let kind = match answer(req) {
            Ok(_) => "actions",
            Err(s) => {
                let m = s.message();
                [
                    ("request is", "too large"),
                    ("images is empty", "no image"),
                    ("entries", "too many images"),
                    ("data is empty", "empty image"),
                    ("both set", "two primaries"),
                    ("not a JPEG or PNG", "not an image"),
                    ("could not be decoded", "undecodable image"),
                    ("does not match", "hash mismatch"),
                    ("state has", "state length"),
                    ("state[", "state value"),
                    ("instruction is", "instruction too long"),
                    ("noise", "noise"),
                    ("camera", "camera"),
                ]
                .iter()
                .find(|(w, _)| m.contains(w))
                .map_or("other", |(_, k)| k)
            }
        };
        *seen.entry(kind).or_default() += 1;
    }
    eprintln!("{seen:?}");
    for kind in [
        "actions",
        "too large",
        "no image",
        "camera",
        "empty image",
        "not an image",
        "undecodable image",
        "hash mismatch",
        "state length",
        "state value",
        "instruction too long",
        "noise",
    ] {
        assert!(seen.contains_key(kind), "no request got {kind:?}: {seen:?}");
    }
    assert!(!seen.contains_key("other"), "{seen:?}");
}
