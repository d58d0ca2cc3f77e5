//! Which keys of an openpi observation are the model's cameras, state and prompt, and the
//! observation turned into an `ActRequest` by them.
//!
//! openpi's policies take a dict whose keys depend on the robot; its examples send these
//! (`--openpi-preset`):
//!
//! | preset | cameras, in the model's camera order | state (concatenated) | prompt |
//! |---|---|---|---|
//! | `libero` (default) | `observation/image`, `observation/wrist_image` | `observation/state` | `prompt` |
//! | `droid` | `observation/exterior_image_1_left`, `observation/wrist_image_left` | `observation/joint_position`, `observation/gripper_position` | `prompt` |
//! | `aloha` | `images/cam_high`, `images/cam_left_wrist`, `images/cam_right_wrist`, `images/cam_low` | `state` | `prompt` |
//!
//! `--openpi-map ROLE=KEY` replaces a role of the preset: `camera=KEY` (repeated, in the
//! model's camera order), `state=KEY[,KEY…]`, `prompt=KEY` (`state=` and `prompt=` map
//! none). A nested dict is read as its paths (ALOHA's `{"images": {"cam_high": …}}` is
//! `images/cam_high`). Besides the mapped keys, `noise_seed` (an integer) is reflex's own:
//! the call's noise seed, as gRPC's `ActRequest.noise_seed`.
//!
//! Rules: the first camera and every state key must be there; the other cameras and the
//! prompt may be absent (an absent camera is the model's blank frame, as over gRPC). A key
//! the mapping does not name is refused, naming it — a typo must not silently become a
//! blank camera. Camera keys beyond the model's cameras (ALOHA's `cam_low` for a
//! three-camera model) are checked and not used, as openpi's own ALOHA policy does.
//!
//! Images are uint8 arrays, `(H, W, 3)` or `(3, H, W)` — by openpi's rule, a first axis of 3
//! is channels-first — never JPEG. Each becomes a PNG ([`reflex_engine::preprocess::
//! encode_png_rgb`]: stored, not compressed) and goes down the normal Act path: hashed for
//! the prefix cache and the trace, recorded in full mode, decoded by the engine like any PNG,
//! so a replay sends the same pixels and gets the same actions, bit for bit. Chosen by
//! measurement (224×224 frames, release, this project's 2-core machine): the stored PNG costs
//! 0.016 ms to make and 0.017 ms to decode (150,830 bytes); fdeflate's fast compression with
//! adaptive filters 0.09–0.30 ms and 0.02–0.53 ms (2–151 kB, by content), against 0.9 ms for
//! the cheapest Act (a prefix-cache hit) and 0.2–0.9 ms for the JPEG decode a gRPC caller's
//! frame costs. So no second seam into the engine for frames that arrive decoded: the PNG
//! path costs less than JPEG, and the size goes to the trace's gzip (an RGB pixel is 4
//! base64 characters, so repeated pixels stay repeated text).

use std::fmt::Write as _;

use reflex_proto::v1 as pb;

use super::wire::{NdArray, Value, WireError, key_text};

/// reflex's own observation key: the call's noise seed.
pub const NOISE_SEED_KEY: &str = "noise_seed";

/// openpi's example robots and their observation keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Preset {
    /// `images/cam_high`, `images/cam_left_wrist`, `images/cam_right_wrist`,
    /// `images/cam_low`; `state`; `prompt`.
    Aloha,
    /// `observation/exterior_image_1_left`, `observation/wrist_image_left`;
    /// `observation/joint_position` + `observation/gripper_position`; `prompt`.
    Droid,
    /// `observation/image`, `observation/wrist_image`; `observation/state`; `prompt`.
    #[default]
    Libero,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Aloha, Preset::Droid, Preset::Libero];

    pub fn as_str(self) -> &'static str {
        match self {
            Preset::Aloha => "aloha",
            Preset::Droid => "droid",
            Preset::Libero => "libero",
        }
    }

    pub fn keys(self) -> Keys {
        let v = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect();
        match self {
            Preset::Aloha => Keys {
                cameras: v(&[
                    "images/cam_high",
                    "images/cam_left_wrist",
                    "images/cam_right_wrist",
                    "images/cam_low",
                ]),
                state: v(&["state"]),
                prompt: Some("prompt".into()),
            },
            Preset::Droid => Keys {
                cameras: v(&[
                    "observation/exterior_image_1_left",
                    "observation/wrist_image_left",
                ]),
                state: v(&["observation/joint_position", "observation/gripper_position"]),
                prompt: Some("prompt".into()),
            },
            Preset::Libero => Keys {
                cameras: v(&["observation/image", "observation/wrist_image"]),
                state: v(&["observation/state"]),
                prompt: Some("prompt".into()),
            },
        }
    }
}

/// One `--openpi-map ROLE=KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapEntry {
    Camera(String),
    State(Vec<String>),
    Prompt(Option<String>),
}

impl std::str::FromStr for MapEntry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "expected camera=KEY, state=KEY[,KEY…] or prompt=KEY";
        let (role, key) = s.split_once('=').ok_or_else(|| format!("{s:?}: {usage}"))?;
        match role {
            "camera" if !key.is_empty() => Ok(MapEntry::Camera(key.into())),
            "camera" => Err(format!("{s:?}: a camera needs a key")),
            "state" => Ok(MapEntry::State(
                key.split(',')
                    .filter(|k| !k.is_empty())
                    .map(String::from)
                    .collect(),
            )),
            "prompt" => Ok(MapEntry::Prompt((!key.is_empty()).then(|| key.into()))),
            _ => Err(format!("{s:?}: unknown role {role:?}; {usage}")),
        }
    }
}

/// The observation keys of each role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// In the model's camera order; the first is required.
    pub cameras: Vec<String>,
    /// Concatenated in this order; all required.
    pub state: Vec<String>,
    pub prompt: Option<String>,
}

impl Keys {
    /// The preset with the `--openpi-map` entries over it: any `camera=` replaces the
    /// preset's cameras (all of them, in the order given), a `state=` or `prompt=` its state
    /// or prompt. A key may have one role only.
    pub fn new(preset: Preset, entries: &[MapEntry]) -> Result<Keys, String> {
        let mut keys = preset.keys();
        let cameras: Vec<String> = entries
            .iter()
            .filter_map(|e| match e {
                MapEntry::Camera(k) => Some(k.clone()),
                _ => None,
            })
            .collect();
        if !cameras.is_empty() {
            keys.cameras = cameras;
        }
        for e in entries {
            match e {
                MapEntry::Camera(_) => {}
                MapEntry::State(s) => keys.state = s.clone(),
                MapEntry::Prompt(p) => keys.prompt = p.clone(),
            }
        }
        let all = keys.all();
        for (i, k) in all.iter().enumerate() {
            if all[..i].contains(k) {
                return Err(format!(
                    "--openpi-map: observation key {k:?} is given two roles"
                ));
            }
            if *k == NOISE_SEED_KEY {
                return Err(format!(
                    "--openpi-map: {NOISE_SEED_KEY:?} is reflex's own key (the noise seed)"
                ));
            }
        }
        Ok(keys)
    }

    fn all(&self) -> Vec<&str> {
        self.cameras
            .iter()
            .chain(&self.state)
            .chain(&self.prompt)
            .map(String::as_str)
            .collect()
    }
}

/// The keys of the server's mapping against the model's cameras.
#[derive(Debug, Clone)]
pub struct Mapping {
    keys: Keys,
    model_cameras: Vec<String>,
}

/// What is wrong with an observation; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ObservationError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the observation must be a dict (a msgpack map) of its keys, not {0}")]
    NotADict(&'static str),
    #[error("an observation key is {0}, not a string")]
    KeyNotText(&'static str),
    #[error(
        "unknown observation key \"{key}\": this server reads {known} (see `reflex serve --help`: --openpi-preset, --openpi-map)"
    )]
    UnknownKey { key: String, known: String },
    #[error("observation key \"{key}\" appears twice (flat and nested)")]
    Twice { key: String },
    #[error("observation key \"{key}\" ({role}) is missing")]
    Missing { key: String, role: String },
    #[error("observation key \"{key}\": {problem}")]
    BadValue { key: String, problem: String },
}

/// What one observation key is for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Camera(usize),
    State(usize),
    Prompt,
    NoiseSeed,
}

impl Mapping {
    pub fn new(keys: Keys, model_cameras: &[String]) -> Mapping {
        Mapping {
            keys,
            model_cameras: model_cameras.to_vec(),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Camera keys the model has no camera for: read and checked, not used.
    pub fn unused_cameras(&self) -> &[String] {
        self.keys
            .cameras
            .get(self.model_cameras.len()..)
            .unwrap_or_default()
    }

    /// One line for the start-up log: `observation/image→base, …; state ← …; prompt ← …`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (k, cam) in self.keys.cameras.iter().zip(&self.model_cameras) {
            let _ = write!(s, "{k}→{cam}, ");
        }
        for k in self.unused_cameras() {
            let _ = write!(s, "{k}→(unused), ");
        }
        let _ = write!(s, "state←[{}]", self.keys.state.join(", "));
        if let Some(p) = &self.keys.prompt {
            let _ = write!(s, ", prompt←{p}");
        }
        s
    }

    fn role(&self, key: &str) -> Option<Role> {
        if key == NOISE_SEED_KEY {
            return Some(Role::NoiseSeed);
        }
        if let Some(i) = self.keys.cameras.iter().position(|k| k == key) {
            return Some(Role::Camera(i));
        }
        if let Some(i) = self.keys.state.iter().position(|k| k == key) {
            return Some(Role::State(i));
        }
        (self.keys.prompt.as_deref() == Some(key)).then_some(Role::Prompt)
    }

    fn role_name(&self, role: Role) -> String {
        match role {
            Role::Camera(i) => match self.model_cameras.get(i) {
                Some(c) => format!("camera {c}"),
                None => "a camera the model does not have".into(),
            },
            Role::State(_) => "state".into(),
            Role::Prompt => "prompt".into(),
            Role::NoiseSeed => "noise seed".into(),
        }
    }

    /// The observation as an `ActRequest` for the model's cameras.
    pub fn request(&self, obs: Value<'_>) -> Result<pb::ActRequest, ObservationError> {
        let Value::Map(entries) = obs else {
            return Err(ObservationError::NotADict(kind(&obs)));
        };
        let mut flat = Vec::new();
        flatten(String::new(), entries, &mut flat)?;
        let mut found: Vec<(Role, &str, &Value<'_>)> = Vec::with_capacity(flat.len());
        for (i, (key, value)) in flat.iter().enumerate() {
            if flat[..i].iter().any(|(k, _)| k == key) {
                return Err(ObservationError::Twice { key: quoted(key) });
            }
            let role = self.role(key).ok_or_else(|| ObservationError::UnknownKey {
                key: quoted(key),
                known: self.known(),
            })?;
            found.push((role, key, value));
        }
        let get = |role: Role| found.iter().find(|(r, _, _)| *r == role);
        let missing = |role: Role, key: &str| ObservationError::Missing {
            key: key.to_string(),
            role: self.role_name(role),
        };
        let bad = |key: &str, problem: String| ObservationError::BadValue {
            key: quoted(key),
            problem,
        };

        let mut images = Vec::new();
        for (i, key) in self.keys.cameras.iter().enumerate() {
            let Some((_, _, v)) = get(Role::Camera(i)) else {
                if i == 0 {
                    return Err(missing(Role::Camera(0), key));
                }
                continue;
            };
            let frame = Frame::of(v).map_err(|p| bad(key, p))?;
            // A key beyond the model's cameras is checked above and goes no further.
            if let Some(camera) = self.model_cameras.get(i) {
                images.push(pb::Image {
                    camera: camera.clone(),
                    data: frame.png().map_err(|p| bad(key, p))?,
                    sha256: String::new(),
                });
            }
        }
        let mut state = Vec::new();
        for (i, key) in self.keys.state.iter().enumerate() {
            let (_, _, v) = get(Role::State(i)).ok_or_else(|| missing(Role::State(i), key))?;
            state.extend(numbers(v).map_err(|p| bad(key, p))?);
        }
        let instruction = match get(Role::Prompt) {
            None => String::new(),
            Some((_, key, v)) => text(v)
                .ok_or_else(|| bad(key, format!("expected a string, got {}", kind(v))))?
                .to_string(),
        };
        let noise_seed = match get(Role::NoiseSeed) {
            None => None,
            Some((_, key, v)) => Some(seed(v).ok_or_else(|| {
                bad(
                    key,
                    format!("expected an integer from 0 to 2^64-1, got {}", kind(v)),
                )
            })?),
        };
        Ok(pb::ActRequest {
            images,
            instruction,
            state,
            noise_seed,
            ..Default::default()
        })
    }

    fn known(&self) -> String {
        let mut keys = self.keys.all();
        keys.push(NOISE_SEED_KEY);
        keys.iter()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Nested dicts as paths joined with `/`; numpy values and everything else are leaves.
fn flatten<'a>(
    prefix: String,
    entries: Vec<(Value<'a>, Value<'a>)>,
    out: &mut Vec<(String, Value<'a>)>,
) -> Result<(), ObservationError> {
    for (k, v) in entries {
        let name = key_text(&k).ok_or_else(|| ObservationError::KeyNotText(kind(&k)))?;
        let path = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        match v {
            Value::Map(inner) => flatten(path, inner, out)?,
            leaf => out.push((path, leaf)),
        }
    }
    Ok(())
}

/// A client's key as an error message repeats it: the first 64 characters.
fn quoted(key: &str) -> String {
    crate::service::quoted(key)
}

fn kind(v: &Value<'_>) -> &'static str {
    match v {
        Value::Nil => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Str(_) => "a string",
        Value::Bin(_) => "bytes",
        Value::Array(_) => "a list",
        Value::Map(_) => "a dict",
        Value::NdArray(_) => "a numpy array",
        Value::Scalar { .. } => "a numpy scalar",
    }
}

fn text<'a>(v: &Value<'a>) -> Option<&'a str> {
    match v {
        Value::Str(s) => Some(s),
        // `np.str_`, as `msgpack_numpy` packs it.
        Value::Scalar { value, .. } => match **value {
            Value::Str(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

fn seed(v: &Value<'_>) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::Scalar { value, .. } => seed(value),
        _ => None,
    }
}

/// A state value as f32s: a numeric array (any shape, flattened), a numpy scalar, a
/// number, or a list of numbers.
fn numbers(v: &Value<'_>) -> Result<Vec<f32>, String> {
    let one = |v: &Value<'_>| match v {
        Value::Float(x) => Some(*x as f32),
        Value::Int(n) => Some(*n as f32),
        Value::Bool(b) => Some(f32::from(u8::from(*b))),
        _ => None,
    };
    match v {
        Value::NdArray(a) => a.to_f32(),
        Value::Scalar { value, dtype } => one(value)
            .map(|x| vec![x])
            .ok_or_else(|| format!("a numpy scalar of dtype {dtype} is not a number")),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, x)| one(x).ok_or_else(|| format!("item {i} is {}, not a number", kind(x))))
            .collect(),
        other => one(other)
            .map(|x| vec![x])
            .ok_or_else(|| format!("expected numbers, got {}", kind(other))),
    }
}

/// A camera frame as it arrived: uint8, HWC or CHW.
struct Frame<'a> {
    array: &'a NdArray<'a>,
    height: usize,
    width: usize,
    channels_first: bool,
}

impl<'a> Frame<'a> {
    fn of(v: &'a Value<'a>) -> Result<Frame<'a>, String> {
        let Value::NdArray(array) = v else {
            return Err(format!(
                "expected an image, a uint8 numpy array (H, W, 3) or (3, H, W), got {}",
                kind(v)
            ));
        };
        if !matches!(array.dtype, "|u1" | "<u1" | ">u1") {
            return Err(format!(
                "an image must be uint8 (H, W, 3) or (3, H, W), got dtype {}",
                array.dtype
            ));
        }
        let (height, width, channels_first) = match array.shape[..] {
            // openpi's own rule (`_parse_image`): a first axis of 3 is channels-first.
            [3, h, w] => (h, w, true),
            [h, w, 3] => (h, w, false),
            _ => {
                return Err(format!(
                    "an image must be (H, W, 3) or (3, H, W) uint8, got shape {:?}",
                    array.shape
                ));
            }
        };
        let max = reflex_engine::preprocess::MAX_SIDE as usize;
        if height == 0 || width == 0 || height > max || width > max {
            return Err(format!(
                "an image of {width}×{height}: each side must be 1 to {max} pixels"
            ));
        }
        Ok(Frame {
            array,
            height,
            width,
            channels_first,
        })
    }

    /// The frame as a PNG (RGB, HWC inside).
    fn png(&self) -> Result<Vec<u8>, String> {
        let (h, w) = (self.height, self.width);
        let data = self.array.data;
        let hwc: std::borrow::Cow<'_, [u8]> = if self.channels_first {
            let plane = h * w;
            let mut out = vec![0u8; plane * 3];
            for (i, px) in out.chunks_exact_mut(3).enumerate() {
                px[0] = data[i];
                px[1] = data[plane + i];
                px[2] = data[2 * plane + i];
            }
            out.into()
        } else {
            data.into()
        };
        // The sides are at most MAX_SIDE (checked in `of`): the casts hold.
        reflex_engine::preprocess::encode_png_rgb(w as u32, h as u32, &hwc)
            .ok_or_else(|| format!("{} bytes are not a {w}×{h} RGB image", hwc.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::Writer;
    use super::*;

    fn cams() -> Vec<String> {
        vec!["base".into(), "wrist".into()]
    }

    fn libero() -> Mapping {
        Mapping::new(Preset::Libero.keys(), &cams())
    }

    fn image(w: &mut Writer, shape: [u64; 3], fill: u8) {
        let n = shape.iter().product::<u64>() as usize;
        w.map(4);
        w.bin(b"__ndarray__").bool(true);
        w.bin(b"data").bin(&vec![fill; n]);
        w.bin(b"dtype").str("|u1");
        w.bin(b"shape").array(3);
        for d in shape {
            w.uint(d);
        }
    }

    fn state(w: &mut Writer, values: &[f64]) {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.map(4);
        w.bin(b"__ndarray__").bool(true);
        w.bin(b"data").bin(&data);
        w.bin(b"dtype").str("<f8");
        w.bin(b"shape").array(1).uint(values.len() as u64);
    }

    fn request(m: &Mapping, msg: &[u8]) -> Result<pb::ActRequest, ObservationError> {
        m.request(super::super::wire::read(msg)?)
    }

    fn err(m: &Mapping, msg: &[u8]) -> String {
        request(m, msg).unwrap_err().to_string()
    }

    #[test]
    fn a_libero_observation_becomes_an_act_request() {
        let mut w = Writer::default();
        w.map(5).str("observation/image");
        image(&mut w, [4, 2, 3], 10);
        w.str("observation/wrist_image");
        image(&mut w, [3, 4, 2], 20);
        w.str("observation/state");
        state(&mut w, &[0.5, 1.0]);
        w.str("prompt").str("pick up the bowl");
        w.str("noise_seed").uint(42);
        let r = request(&libero(), &w.0).unwrap();
        assert_eq!(
            r.images
                .iter()
                .map(|i| i.camera.as_str())
                .collect::<Vec<_>>(),
            ["base", "wrist"]
        );
        assert_eq!(
            (r.state.as_slice(), r.instruction.as_str(), r.noise_seed),
            (&[0.5f32, 1.0][..], "pick up the bowl", Some(42))
        );
        // HWC and CHW both become the same kind of PNG: 2 wide, 4 high.
        for img in &r.images {
            let png = image::load_from_memory(&img.data).unwrap().into_rgb8();
            assert_eq!(png.dimensions(), (2, 4));
        }
    }

    #[test]
    fn channels_first_frames_are_transposed_pixel_for_pixel() {
        // (3, 1, 2): R plane [1, 2], G plane [3, 4], B plane [5, 6].
        let data = [1u8, 2, 3, 4, 5, 6];
        let arr = NdArray {
            dtype: "|u1",
            shape: vec![3, 1, 2],
            data: &data,
        };
        let v = Value::NdArray(arr);
        let png = Frame::of(&v).unwrap().png().unwrap();
        let img = image::load_from_memory(&png).unwrap().into_rgb8();
        assert_eq!(img.into_raw(), [1, 3, 5, 2, 4, 6]);
    }

    #[test]
    fn aloha_nests_its_images_and_cam_low_is_read_but_unused() {
        let m = Mapping::new(Preset::Aloha.keys(), &["high".into(), "left".into()]);
        assert_eq!(
            m.unused_cameras(),
            ["images/cam_right_wrist", "images/cam_low"]
        );
        let mut w = Writer::default();
        w.map(2).str("images").map(2).str("cam_high");
        image(&mut w, [3, 2, 2], 1);
        w.str("cam_low");
        image(&mut w, [3, 2, 2], 2);
        w.str("state");
        state(&mut w, &[1.0]);
        let r = request(&m, &w.0).unwrap();
        assert_eq!(r.images.len(), 1);
        assert_eq!(r.images[0].camera, "high");
        assert!(r.instruction.is_empty(), "the prompt may be absent");
        // A bad cam_low is still an error: it is checked.
        let mut w = Writer::default();
        w.map(2).str("images").map(2).str("cam_high");
        image(&mut w, [3, 2, 2], 1);
        w.str("cam_low").str("nope");
        w.str("state");
        state(&mut w, &[1.0]);
        assert!(err(&m, &w.0).contains("\"images/cam_low\""));
    }

    #[test]
    fn droid_concatenates_its_state_keys() {
        let m = Mapping::new(Preset::Droid.keys(), &cams());
        let mut w = Writer::default();
        w.map(3).str("observation/exterior_image_1_left");
        image(&mut w, [2, 2, 3], 1);
        w.str("observation/joint_position");
        state(&mut w, &[1.0, 2.0]);
        w.str("observation/gripper_position");
        w.array(1).float(0.5);
        let r = request(&m, &w.0).unwrap();
        assert_eq!(r.state, [1.0, 2.0, 0.5]);
        assert_eq!(r.images.len(), 1, "the wrist camera may be absent");
    }

    #[test]
    fn mistakes_name_the_key() {
        let m = libero();
        let base = |w: &mut Writer, n: u32| {
            w.map(n).str("observation/image");
            image(w, [2, 2, 3], 1);
            w.str("observation/state");
            state(w, &[1.0]);
        };
        let mut w = Writer::default();
        base(&mut w, 3);
        w.str("observation/imgae").str("x");
        let e = err(&m, &w.0);
        assert!(
            e.starts_with("unknown observation key \"observation/imgae\"")
                && e.contains("\"observation/image\""),
            "{e}"
        );
        let mut w = Writer::default();
        w.map(1).str("observation/image");
        image(&mut w, [2, 2, 3], 1);
        assert_eq!(
            err(&m, &w.0),
            "observation key \"observation/state\" (state) is missing"
        );
        let mut w = Writer::default();
        w.map(1).str("observation/state");
        state(&mut w, &[1.0]);
        assert_eq!(
            err(&m, &w.0),
            "observation key \"observation/image\" (camera base) is missing"
        );
        let mut w = Writer::default();
        w.map(2).str("observation/image");
        image(&mut w, [2, 2, 4], 1);
        w.str("observation/state");
        state(&mut w, &[1.0]);
        let e = err(&m, &w.0);
        assert!(
            e.starts_with("observation key \"observation/image\": ") && e.contains("[2, 2, 4]"),
            "{e}"
        );
        let mut w = Writer::default();
        w.map(2).str("observation/image");
        state(&mut w, &[1.0, 2.0, 3.0]);
        w.str("observation/state");
        state(&mut w, &[1.0]);
        assert!(err(&m, &w.0).contains("dtype <f8"));
        let mut w = Writer::default();
        base(&mut w, 3);
        w.str("prompt").uint(3);
        assert!(err(&m, &w.0).contains("\"prompt\": expected a string"));
        let mut w = Writer::default();
        base(&mut w, 3);
        w.str("noise_seed").str("7");
        assert!(err(&m, &w.0).contains("\"noise_seed\": expected an integer"));
        assert!(err(&m, b"\x93\x01\x02\x03").contains("must be a dict"));
        assert!(err(&m, b"\xc1").starts_with("the message is not msgpack"));
        let mut w = Writer::default();
        w.map(1).uint(1).uint(2);
        assert!(err(&m, &w.0).contains("an integer, not a string"));
        // The same path flat and nested.
        let mut w = Writer::default();
        base(&mut w, 3);
        w.str("observation").map(1).str("state");
        state(&mut w, &[1.0]);
        assert!(err(&m, &w.0).contains("appears twice"));
    }

    #[test]
    fn map_entries_parse_and_override_the_preset() {
        let e = |s: &str| s.parse::<MapEntry>();
        assert_eq!(e("camera=a/b"), Ok(MapEntry::Camera("a/b".into())));
        assert_eq!(
            e("state=x,y"),
            Ok(MapEntry::State(vec!["x".into(), "y".into()]))
        );
        assert_eq!(e("prompt="), Ok(MapEntry::Prompt(None)));
        assert!(e("cam=x").unwrap_err().contains("unknown role"));
        assert!(e("camera").unwrap_err().contains("camera=KEY"));
        assert!(e("camera=").is_err());
        let keys = Keys::new(
            Preset::Droid,
            &[
                MapEntry::Camera("top".into()),
                MapEntry::State(vec!["q".into()]),
            ],
        )
        .unwrap();
        assert_eq!(
            (keys.cameras, keys.state, keys.prompt.as_deref()),
            (
                vec!["top".to_string()],
                vec!["q".to_string()],
                Some("prompt")
            )
        );
        assert!(
            Keys::new(
                Preset::Libero,
                &[MapEntry::Prompt(Some("observation/state".into()))]
            )
            .unwrap_err()
            .contains("two roles")
        );
        assert!(
            Keys::new(Preset::Libero, &[MapEntry::Camera("noise_seed".into())])
                .unwrap_err()
                .contains("reflex's own")
        );
        for p in Preset::ALL {
            let k = p.keys();
            assert!(
                !k.cameras.is_empty() && !k.state.is_empty(),
                "{}",
                p.as_str()
            );
        }
    }
}
