//! Conditioning maps made without a model. Canny edges come from imageproc's
//! `edges::canny` (Sobel gradients, non-maximum suppression, hysteresis between
//! the two thresholds on the gradient magnitude, as OpenCV's `cv2.Canny` that
//! A1111's ControlNet extension and diffusers' examples run, with the same defaults
//! of 100 and 200). Other maps (depth, pose, scribble, lineart) are given as
//! images and pass through unchanged.
use image::{GrayImage, RgbImage};

use super::Canvas;
use crate::error::{Error, Result};

/// OpenCV's usual thresholds for 8-bit images, as A1111's canny preprocessor has them.
pub const CANNY_LOW: f32 = 100.0;
pub const CANNY_HIGH: f32 = 200.0;

/// The edges of `image` as a white-on-black RGB map of its size.
pub fn canny(image: &Canvas, low: f32, high: f32) -> Result<Canvas> {
    if !(low.is_finite() && high.is_finite() && 0.0 <= low && low <= high) {
        return Err(Error::Invalid(format!(
            "canny thresholds {low} and {high}: they must satisfy 0 ≤ low ≤ high"
        )));
    }
    let (w, h) = (image.width as u32, image.height as u32);
    let rgb = RgbImage::from_raw(w, h, image.rgb.clone()).ok_or_else(|| {
        Error::Invalid(format!(
            "a {w}x{h} picture with {} bytes of RGB",
            image.rgb.len()
        ))
    })?;
    let grey: GrayImage = image::DynamicImage::ImageRgb8(rgb).to_luma8();
    let edges = imageproc::edges::canny(&grey, low, high);
    Ok(Canvas {
        rgb: edges.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        mask: None,
        ..image.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(size: usize) -> Canvas {
        let mut rgb = vec![20u8; size * size * 3];
        for y in size / 4..3 * size / 4 {
            for x in size / 4..3 * size / 4 {
                rgb[(y * size + x) * 3..][..3].copy_from_slice(&[230, 200, 40]);
            }
        }
        Canvas {
            width: size,
            height: size,
            rgb,
            mask: None,
            mask_blur: 0.0,
        }
    }

    #[test]
    fn canny_outlines_a_square_in_white_on_black() {
        let n = 64;
        let e = canny(&square(n), CANNY_LOW, CANNY_HIGH).unwrap();
        let at = |x: usize, y: usize| e.rgb[(y * n + x) * 3];
        let white = e.rgb.chunks(3).filter(|p| p[0] == 255).count();
        // The outline: one or two pixels either side of the step along the square's
        // 128-pixel perimeter, nothing inside.
        assert!((100..=280).contains(&white), "{white} edge pixels");
        assert!(e
            .rgb
            .chunks(3)
            .all(|p| (p[0] == 0 || p[0] == 255) && p[0] == p[1] && p[1] == p[2]));
        assert_eq!(at(n / 2, n / 2), 0);
        assert_eq!(at(2, 2), 0);
        assert!((n / 4 - 2..=n / 4 + 1).any(|x| at(x, n / 2) == 255));
        // Higher thresholds than any gradient leave nothing.
        let none = canny(&square(n), 5000.0, 6000.0).unwrap();
        assert!(none.rgb.iter().all(|&v| v == 0));
        assert!(canny(&square(n), 200.0, 100.0).is_err());
    }
}
