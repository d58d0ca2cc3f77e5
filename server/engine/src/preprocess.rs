//! Camera frames in, model pixels out: decode JPEG/PNG, fit to the model's
//! size, normalise to CHW f32.
//!
//! Decoding is bounded (dimensions and allocation) so a hostile image cannot
//! take the server's memory; formats other than JPEG and PNG are refused.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits, imageops::FilterType};

use crate::config::{ImageConfig, ResizePolicy};

/// Largest side accepted from the wire before resizing.
pub const MAX_SIDE: u32 = 4096;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("is not a JPEG or PNG image")]
    UnknownFormat,
    #[error("could not be decoded as {format}: {message}")]
    Decode {
        format: &'static str,
        message: String,
    },
    #[error(
        "is {width}×{height}; this model takes exactly {want_w}×{want_h} (resize policy \"exact\")"
    )]
    WrongSize {
        width: u32,
        height: u32,
        want_w: u32,
        want_h: u32,
    },
}

/// Decodes `bytes` and writes `3·H·W` normalised floats (CHW, RGB) into `out`.
pub fn decode_into(bytes: &[u8], cfg: &ImageConfig, out: &mut [f32]) -> Result<(), ImageError> {
    let rgb = decode_rgb(bytes, cfg)?;
    normalise(&rgb, cfg, out);
    Ok(())
}

/// Decodes `bytes` to the model's size: `H·W·3` bytes, HWC RGB (what an engine
/// normalises itself, see [`crate::engine::Frames`]).
pub fn decode_rgb(bytes: &[u8], cfg: &ImageConfig) -> Result<Vec<u8>, ImageError> {
    let format = match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => ImageFormat::Jpeg,
        Ok(ImageFormat::Png) => ImageFormat::Png,
        _ => return Err(ImageError::UnknownFormat),
    };
    let name = if format == ImageFormat::Jpeg {
        "JPEG"
    } else {
        "PNG"
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_SIDE as u64 * MAX_SIDE as u64 * 4);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| ImageError::Decode {
        format: name,
        message: e.to_string(),
    })?;
    let (w, h) = (cfg.width, cfg.height);
    let rgb = if img.width() == w && img.height() == h {
        img.into_rgb8()
    } else {
        match cfg.resize {
            ResizePolicy::Exact => {
                return Err(ImageError::WrongSize {
                    width: img.width(),
                    height: img.height(),
                    want_w: w,
                    want_h: h,
                });
            }
            ResizePolicy::Resize => {
                image::imageops::resize(&img.into_rgb8(), w, h, FilterType::Triangle)
            }
            ResizePolicy::PadSquare => {
                let rgb = pad_square(img.into_rgb8());
                if rgb.width() == w && rgb.height() == h {
                    rgb
                } else {
                    image::imageops::resize(&rgb, w, h, FilterType::Triangle)
                }
            }
        }
    };
    Ok(rgb.into_raw())
}

/// Centres a frame on a black square of its longer side (lerobot's and the seed tool's
/// `resize_with_pad` before the resize).
fn pad_square(rgb: image::RgbImage) -> image::RgbImage {
    let (w, h) = rgb.dimensions();
    if w == h {
        return rgb;
    }
    let side = w.max(h);
    let mut square = image::RgbImage::new(side, side);
    image::imageops::replace(
        &mut square,
        &rgb,
        ((side - w) / 2) as i64,
        ((side - h) / 2) as i64,
    );
    square
}

/// The export's normalisation as the engines apply it.
pub fn pixel_norm(cfg: &ImageConfig) -> crate::engine::PixelNorm {
    let mut n = crate::engine::PixelNorm {
        scale: [0.0; 3],
        offset: [0.0; 3],
        blank: [0.0; 3],
    };
    for c in 0..3 {
        // Precomputed per channel: out = p·scale + offset.
        n.scale[c] = 1.0 / (255.0 * cfg.std[c]);
        n.offset[c] = -cfg.mean[c] / cfg.std[c];
        // An absent optional camera: a mid-grey frame (zeros with the reference stats).
        n.blank[c] = (0.5 - cfg.mean[c]) / cfg.std[c];
    }
    n
}

/// HWC u8 → CHW f32, `(p/255 − mean)/std` per channel.
fn normalise(hwc: &[u8], cfg: &ImageConfig, out: &mut [f32]) {
    pixel_norm(cfg).apply(hwc, out);
}

/// What an absent optional camera contributes: a mid-grey frame (zeros after
/// normalisation with the reference stats).
pub fn blank_into(cfg: &ImageConfig, out: &mut [f32]) {
    pixel_norm(cfg).fill_blank(out);
}

/// Encodes an RGB image as JPEG (used by the demo, benches and tests).
pub fn encode_jpeg(rgb: &image::RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
    rgb.write_with_encoder(enc)
        .expect("encoding to a Vec cannot fail");
    out
}

/// Encodes an RGB image as PNG.
pub fn encode_png(rgb: &image::RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    rgb.write_to(&mut out, ImageFormat::Png)
        .expect("encoding to a Vec cannot fail");
    out.into_inner()
}

/// Encodes `width·height·3` bytes of RGB (HWC) as a PNG with stored (uncompressed) deflate
/// blocks and no filter: speed over size, ~0.02 ms to make and to decode for 224×224. The
/// lossless copy of a frame that arrives as raw pixels (openpi's front-end), which the Act
/// path then hashes, records and decodes like any PNG. `None` when `rgb` does not hold
/// `width·height·3` bytes.
pub fn encode_png_rgb(width: u32, height: u32, rgb: &[u8]) -> Option<Vec<u8>> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::with_capacity(rgb.len() / 2);
    let enc = PngEncoder::new_with_quality(
        &mut out,
        CompressionType::Uncompressed,
        FilterType::NoFilter,
    );
    enc.write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
        .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::reference_config;

    fn solid(w: u32, h: u32, rgb: [u8; 3]) -> image::RgbImage {
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
    }

    #[test]
    fn png_decodes_and_normalises_per_channel() {
        let cfg = reference_config(0).image;
        let png = encode_png(&solid(224, 224, [255, 0, 128]));
        let mut out = vec![0.0; 3 * 224 * 224];
        decode_into(&png, &cfg, &mut out).unwrap();
        let plane = 224 * 224;
        assert_eq!(out[0], 1.0);
        assert_eq!(out[plane], -1.0);
        assert!((out[2 * plane] - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn other_sizes_are_resized_or_refused_by_policy() {
        let mut cfg = reference_config(0).image;
        let jpg = encode_jpeg(&solid(320, 240, [10, 20, 30]), 90);
        let mut out = vec![0.0; 3 * 224 * 224];
        decode_into(&jpg, &cfg, &mut out).unwrap();
        cfg.resize = ResizePolicy::Exact;
        let err = decode_into(&jpg, &cfg, &mut out).unwrap_err();
        assert_eq!(
            err,
            ImageError::WrongSize {
                width: 320,
                height: 240,
                want_w: 224,
                want_h: 224
            }
        );
        assert!(err.to_string().contains("320×240"));
    }

    #[test]
    fn pad_square_centres_the_frame_on_black_before_resizing() {
        let mut cfg = reference_config(0).image;
        cfg.resize = ResizePolicy::PadSquare;
        cfg.width = 8;
        cfg.height = 8;
        // 8 wide, 4 high, white: pads to 8×8 with two black rows above and below.
        let png = encode_png(&solid(8, 4, [255, 255, 255]));
        let rgb = decode_rgb(&png, &cfg).unwrap();
        let row = |y: usize| &rgb[y * 24..(y + 1) * 24];
        assert!(row(0).iter().all(|&p| p == 0) && row(1).iter().all(|&p| p == 0));
        assert!(row(2).iter().all(|&p| p == 255) && row(5).iter().all(|&p| p == 255));
        assert!(row(6).iter().all(|&p| p == 0) && row(7).iter().all(|&p| p == 0));
        // A larger non-square frame is padded then resized: still black bands.
        let png = encode_png(&solid(64, 32, [255, 255, 255]));
        let rgb = decode_rgb(&png, &cfg).unwrap();
        assert_eq!(rgb.len(), 8 * 8 * 3);
        assert!(rgb[..24].iter().all(|&p| p == 0), "{:?}", &rgb[..24]);
        assert!(rgb[4 * 24..5 * 24].iter().all(|&p| p > 250));
    }

    #[test]
    fn garbage_and_truncated_images_are_errors_not_panics() {
        let cfg = reference_config(0).image;
        let mut out = vec![0.0; 3 * 224 * 224];
        assert_eq!(
            decode_into(b"hello", &cfg, &mut out),
            Err(ImageError::UnknownFormat)
        );
        let jpg = encode_jpeg(&solid(224, 224, [1, 2, 3]), 90);
        let cut = &jpg[..jpg.len() / 3];
        // A cut JPEG either fails cleanly or decodes a partial frame; never panics.
        let _ = decode_into(cut, &cfg, &mut out);
        let png = encode_png(&solid(224, 224, [1, 2, 3]));
        assert!(matches!(
            decode_into(&png[..60], &cfg, &mut out),
            Err(ImageError::Decode { .. })
        ));
    }

    #[test]
    fn oversized_dimensions_are_refused_before_allocating() {
        let cfg = reference_config(0).image;
        // A PNG header claiming 100000×100000 pixels.
        let mut png = encode_png(&solid(1, 1, [0, 0, 0]));
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let mut out = vec![0.0; 3 * 224 * 224];
        assert!(decode_into(&png, &cfg, &mut out).is_err());
    }
}
