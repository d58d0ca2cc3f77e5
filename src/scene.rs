//! A synthetic robot: camera frames and joint states that move like a real
//! arm approaching a cup, with pauses where the frames repeat byte for byte
//! (a robot standing still sends the same frame; the prefix cache sees it), and the Act
//! request a robot builds from them. The demo and every benchmark drive the server with it;
//! it imports neither.

use reflex_engine::preprocess::encode_jpeg;
use reflex_proto::v1 as pb;

/// What the synthetic robot is told to do.
pub const INSTRUCTION: &str = "pick up the red cup";

pub struct Scene {
    /// Static table texture, generated once.
    background: image::RgbImage,
}

/// One control tick's observation.
pub struct Tick {
    pub base_jpeg: Vec<u8>,
    pub wrist_jpeg: Vec<u8>,
    pub state: Vec<f32>,
    /// True when the arm did not move since the previous tick.
    pub still: bool,
}

impl Default for Scene {
    fn default() -> Self {
        Self::new()
    }
}

impl Scene {
    pub fn new() -> Scene {
        // Wood-like texture: smooth stripes plus a little deterministic grain,
        // so JPEG sizes resemble a real camera (~15–25 KB at quality 90).
        let background = image::RgbImage::from_fn(224, 224, |x, y| {
            let grain = (((x * 7919 + y * 104_729) ^ (x * y)) % 23) as f32;
            let stripe = (y as f32 * 0.21 + (x as f32 * 0.03).sin() * 4.0).sin() * 18.0;
            let v = 150.0 + stripe + grain;
            image::Rgb([v as u8, (v * 0.78) as u8, (v * 0.55) as u8])
        });
        Scene { background }
    }

    /// Arm pose at `tick`: moves for 24 ticks, stands still for 8.
    fn phase(tick: usize) -> (f32, bool) {
        let cycle = tick / 32;
        let within = tick % 32;
        let moving = within < 24;
        let progress = cycle as f32 * 24.0 + within.min(23) as f32;
        (progress * 0.04, !moving && within > 24)
    }

    pub fn tick(&self, tick: usize) -> Tick {
        let (p, still) = Self::phase(tick);
        let cup = (
            112.0 + 60.0 * (p * 0.3).cos(),
            140.0 + 20.0 * (p * 0.2).sin(),
        );
        let grip = (
            112.0 + 70.0 * (p * 0.5).sin(),
            60.0 + 30.0 * (p * 0.35).cos(),
        );
        let mut base = self.background.clone();
        disk(&mut base, cup, 22.0, [200, 30, 35]);
        rect(&mut base, grip, (26.0, 14.0), [70, 70, 78]);
        // The wrist camera sees the cup from the gripper: larger and offset.
        let mut wrist = image::RgbImage::from_pixel(224, 224, image::Rgb([40, 44, 52]));
        let rel = (
            112.0 + (cup.0 - grip.0) * 1.5,
            112.0 + (cup.1 - grip.1) * 1.5,
        );
        disk(&mut wrist, rel, 48.0, [200, 30, 35]);
        let state = vec![
            0.3 * (p * 0.5).sin(),
            0.2 + 0.25 * (p * 0.35).cos(),
            0.1 * (p * 0.2).sin(),
            -1.8 + 0.3 * (p * 0.4).sin(),
            0.05 * p.cos(),
            2.0 + 0.2 * (p * 0.3).sin(),
            0.8 + 0.1 * (p * 0.25).cos(),
            0.04 - 0.03 * ((p * 0.1).sin() * 0.5 + 0.5),
        ];
        Tick {
            base_jpeg: encode_jpeg(&base, 90),
            wrist_jpeg: encode_jpeg(&wrist, 85),
            state,
            still,
        }
    }
}

/// The Act request a robot sends at `tick`.
pub fn request(tick: &Tick, noise_seed: Option<u64>) -> pb::ActRequest {
    pb::ActRequest {
        images: vec![
            pb::Image {
                camera: "base".into(),
                data: tick.base_jpeg.clone(),
                sha256: String::new(),
            },
            pb::Image {
                camera: "wrist".into(),
                data: tick.wrist_jpeg.clone(),
                sha256: String::new(),
            },
        ],
        instruction: INSTRUCTION.into(),
        state: tick.state.clone(),
        episode_id: "demo-episode-1".into(),
        noise_seed,
        ..Default::default()
    }
}

fn disk(img: &mut image::RgbImage, c: (f32, f32), r: f32, rgb: [u8; 3]) {
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 - c.0, y as f32 - c.1);
        let d2 = dx * dx + dy * dy;
        if d2 < r * r {
            let shade = 1.0 - 0.35 * (d2 / (r * r));
            *px = image::Rgb(rgb.map(|v| (v as f32 * shade) as u8));
        }
    }
}

fn rect(img: &mut image::RgbImage, c: (f32, f32), half: (f32, f32), rgb: [u8; 3]) {
    for (x, y, px) in img.enumerate_pixels_mut() {
        if (x as f32 - c.0).abs() < half.0 && (y as f32 - c.1).abs() < half.1 {
            *px = image::Rgb(rgb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn still_ticks_repeat_frames_and_moving_ticks_do_not() {
        let s = Scene::new();
        let (a, b) = (s.tick(26), s.tick(27));
        assert!(b.still);
        assert_eq!(a.base_jpeg, b.base_jpeg);
        assert_eq!(a.state, b.state);
        let (c, d) = (s.tick(3), s.tick(4));
        assert!(!d.still);
        assert_ne!(c.base_jpeg, d.base_jpeg);
        assert!(c.base_jpeg.len() > 5_000, "{} bytes", c.base_jpeg.len());
    }
}
