//! The pictures img2img and inpainting start from: an image file of any common kind
//! and an optional mask file, padded for outpainting and fitted to the output size.
//!
//! How a picture is fitted (the same for the image and its mask):
//! - without an explicit size, the output is the picture's own size rounded down to
//!   the model's multiple (at least one multiple), and the picture is cropped to it
//!   around its centre: no resampling, so pixels stay exact;
//! - with a size, the picture is scaled (Lanczos-3) to cover it, keeping its aspect
//!   ratio, and the overhang is cropped around the centre (A1111's "crop and resize").
//!
//! Pixel formats: 8- and 16-bit, greyscale, RGB, with or without alpha, palette PNGs
//! and JPEGs all become 8-bit RGB; alpha is dropped (as PIL's `convert("RGB")`, which
//! diffusers applies). A mask is read as luma: white (255) = repaint, black = keep.
use std::path::Path;

use image::{imageops, DynamicImage, GrayImage, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// Largest picture side read; larger files are refused before they are decoded.
pub const MAX_SIDE: u32 = 16384;
/// Most bytes a decoded picture may take (a 16384² RGBA 16-bit image is 2 GiB).
const MAX_DECODED: u64 = 1 << 30;

/// An init image (and mask) at the output size.
#[derive(Clone, Debug, PartialEq)]
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    /// `[h][w][3]` 8-bit RGB.
    pub rgb: Vec<u8>,
    /// `[h][w]` in [0, 1], 1 = repaint: after blurring, soft at its edges.
    pub mask: Option<Vec<f32>>,
    /// The σ in pixels of the blur the mask was given (recorded as A1111's "Mask blur").
    pub mask_blur: f32,
}

/// How to turn files into a [`Canvas`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CanvasOptions {
    /// The output size (width, height); `None` keeps the picture's size, cropped to
    /// a multiple of [`CanvasOptions::multiple`].
    pub size: Option<(usize, usize)>,
    /// What the model needs both sides to be multiples of.
    pub multiple: usize,
    /// Outpainting: pixels added on the left, top, right and bottom, filled by
    /// stretching the picture's edge outward and masked for repainting. Without a
    /// size, a padded side grows further to reach the model's multiple.
    pub pad: [usize; 4],
    /// Standard deviation, in output pixels, of the Gaussian blur applied to the mask.
    pub mask_blur: f32,
}

impl Canvas {
    /// Reads `image` (and `mask`, any size: it is stretched to the image's size
    /// first) and fits them as [`CanvasOptions`] says.
    pub fn open(image: &Path, mask: Option<&Path>, opts: &CanvasOptions) -> Result<Canvas> {
        let img = read(image)?.to_rgb8();
        let mask = match mask {
            Some(p) => Some(read(p)?.to_luma8()),
            None => None,
        };
        Self::from_images(img, mask, opts).map_err(|e| match e {
            Error::Invalid(msg) => Error::format(image, msg),
            e => e,
        })
    }

    /// [`Canvas::from_images`] on raw pixels: `rgb` is `width` x `height` 8-bit RGB,
    /// row by row; `mask` (width, height, 8-bit luma) may have another size.
    pub fn from_rgb(
        (width, height, rgb): (usize, usize, Vec<u8>),
        mask: Option<(usize, usize, Vec<u8>)>,
        opts: &CanvasOptions,
    ) -> Result<Canvas> {
        let side = |w: usize, h: usize, what: &str| -> Result<(u32, u32)> {
            match (u32::try_from(w), u32::try_from(h)) {
                (Ok(w), Ok(h)) if (1..=MAX_SIDE).contains(&w) && (1..=MAX_SIDE).contains(&h) => {
                    Ok((w, h))
                }
                _ => Err(Error::Invalid(format!(
                    "{what} {width}x{height}: sides must be between 1 and {MAX_SIDE}"
                ))),
            }
        };
        let (w, h) = side(width, height, "image")?;
        let img = RgbImage::from_raw(w, h, rgb)
            .ok_or_else(|| Error::Invalid(format!("image {width}x{height}: too few pixels")))?;
        let mask = match mask {
            Some((mw, mh, luma)) => {
                let (mw, mh) = side(mw, mh, "mask")?;
                Some(
                    GrayImage::from_raw(mw, mh, luma)
                        .ok_or_else(|| Error::Invalid(format!("mask {mw}x{mh}: too few pixels")))?,
                )
            }
            None => None,
        };
        Self::from_images(img, mask, opts)
    }

    /// The output size for a picture of `picture` pixels (width, height) given
    /// `size`: both sides as they are; one side alone with the other following the
    /// padded picture's aspect ratio, rounded to `multiple`; neither: `None` (the
    /// picture's own size, [`CanvasOptions::size`]).
    pub fn size_for(
        picture: (u32, u32),
        size: (Option<usize>, Option<usize>),
        pad: [usize; 4],
        multiple: usize,
    ) -> Option<(usize, usize)> {
        let [l, t, r, b] = pad;
        let m = multiple.max(1);
        let aspect =
            (picture.0 as usize + l + r) as f64 / (picture.1 as usize + t + b).max(1) as f64;
        let round = |v: f64| ((v / m as f64).round() as usize).max(1) * m;
        match size {
            (Some(w), Some(h)) => Some((w, h)),
            (None, None) => None,
            (Some(w), None) => Some((w, round(w as f64 / aspect))),
            (None, Some(h)) => Some((round(h as f64 * aspect), h)),
        }
    }

    /// [`Canvas::open`] on decoded pictures (a mask of another size is stretched to
    /// the image's first).
    pub fn from_images(
        img: RgbImage,
        mask: Option<GrayImage>,
        opts: &CanvasOptions,
    ) -> Result<Canvas> {
        let mask = mask.map(|m| {
            if m.dimensions() == img.dimensions() {
                m
            } else {
                imageops::resize(
                    &m,
                    img.width(),
                    img.height(),
                    imageops::FilterType::Triangle,
                )
            }
        });
        if !(opts.mask_blur >= 0.0 && opts.mask_blur <= 512.0) {
            return Err(Error::Invalid(format!(
                "mask blur {} is not between 0 and 512 pixels",
                opts.mask_blur
            )));
        }
        let m = opts.multiple.max(1);
        let mut pad = opts.pad;
        if opts.size.is_none() {
            // The canvas grows by at least the padding asked for: up to the multiple,
            // on the padded sides, so that fitting crops none of it.
            let grow = |len: u32, a: &mut usize, b: &mut usize| {
                let total = len as usize + *a + *b;
                let extra = total.next_multiple_of(m) - total;
                if *b > 0 {
                    *b += extra;
                } else if *a > 0 {
                    *a += extra;
                }
            };
            let [l, t, r, b] = &mut pad;
            grow(img.width(), l, r);
            grow(img.height(), t, b);
        }
        let [l, t, r, b] = pad;
        let padded = l + t + r + b > 0;
        let (img, mask) = if padded {
            let (iw, ih) = (img.width() as usize, img.height() as usize);
            if iw + l + r > MAX_SIDE as usize || ih + t + b > MAX_SIDE as usize {
                return Err(Error::Invalid(format!(
                    "padding {iw}x{ih} by {l},{t},{r},{b} makes a side over {MAX_SIDE}"
                )));
            }
            let mask = mask.unwrap_or_else(|| GrayImage::new(iw as u32, ih as u32));
            (self::pad(&img, pad), Some(pad_mask(&mask, pad)))
        } else {
            (img, mask)
        };
        let (w, h) = match opts.size {
            Some(s) => s,
            None => {
                let down = |v: u32| ((v as usize / m) * m).max(m);
                (down(img.width()), down(img.height()))
            }
        };
        if w == 0 || h == 0 || w > MAX_SIDE as usize || h > MAX_SIDE as usize {
            return Err(Error::Invalid(format!(
                "output size {w}x{h}: sides must be between 1 and {MAX_SIDE}"
            )));
        }
        let scale = opts.size.is_some();
        let img = fit(&img, w, h, scale);
        let mask = mask.map(|m| {
            let m = fit(&m, w, h, scale);
            let soft: Vec<f32> = m.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
            blur(&soft, w, h, opts.mask_blur)
        });
        Ok(Canvas {
            width: w,
            height: h,
            rgb: img.into_raw(),
            mask,
            mask_blur: opts.mask_blur,
        })
    }

    /// The image as `[3][h][w]` in [-1, 1] (the VAE's input range).
    pub fn planar_pm1(&self) -> Vec<f32> {
        let n = self.width * self.height;
        let mut v = vec![0f32; 3 * n];
        for (i, px) in self.rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                // As diffusers normalises: x/255, then 2x - 1.
                v[c * n + i] = px[c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
        v
    }

    /// The mask as diffusers' mask processor binarises it: 1 where ≥ 0.5.
    pub fn binary_mask(&self) -> Option<Vec<f32>> {
        self.mask.as_ref().map(|m| {
            m.iter()
                .map(|&v| if v >= 0.5 { 1.0 } else { 0.0 })
                .collect()
        })
    }
}

/// Decodes a picture file, refusing unreadable files and sizes past [`MAX_SIDE`]
/// before their pixels are allocated.
pub fn read(path: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = reader
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(Error::format(path, "not a PNG or JPEG image"));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => Error::format(
            path,
            format!(
                "the image is too large (sides up to {MAX_SIDE} pixels, {} MiB decoded)",
                MAX_DECODED >> 20
            ),
        ),
        e => Error::format(path, format!("cannot decode the image: {e}")),
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::format(path, "the image is empty"));
    }
    Ok(img)
}

/// `img` scaled to cover `w`x`h` (when `scale`) and cropped to it around the centre.
fn fit<P: image::Pixel<Subpixel = u8> + 'static>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    w: usize,
    h: usize,
    scale: bool,
) -> image::ImageBuffer<P, Vec<u8>> {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    if (iw, ih) == (w, h) {
        return img.clone();
    }
    let covered;
    let src = if scale || iw < w || ih < h {
        let s = (w as f64 / iw as f64).max(h as f64 / ih as f64);
        let (sw, sh) = (
            ((iw as f64 * s).round() as usize).max(w),
            ((ih as f64 * s).round() as usize).max(h),
        );
        covered = imageops::resize(img, sw as u32, sh as u32, imageops::FilterType::Lanczos3);
        &covered
    } else {
        img
    };
    let (x0, y0) = (
        (src.width() as usize - w) / 2,
        (src.height() as usize - h) / 2,
    );
    imageops::crop_imm(src, x0 as u32, y0 as u32, w as u32, h as u32).to_image()
}

/// The image on a larger canvas, the new border filled with the nearest edge pixel.
fn pad(img: &RgbImage, [l, t, r, b]: [usize; 4]) -> RgbImage {
    let (iw, ih) = (img.width() as i64, img.height() as i64);
    RgbImage::from_fn(
        (iw as usize + l + r) as u32,
        (ih as usize + t + b) as u32,
        |x, y| {
            let sx = (x as i64 - l as i64).clamp(0, iw - 1);
            let sy = (y as i64 - t as i64).clamp(0, ih - 1);
            *img.get_pixel(sx as u32, sy as u32)
        },
    )
}

/// The mask on the padded canvas: the padding is all to be painted.
fn pad_mask(mask: &GrayImage, [l, t, r, b]: [usize; 4]) -> GrayImage {
    let (iw, ih) = (mask.width() as usize, mask.height() as usize);
    GrayImage::from_fn((iw + l + r) as u32, (ih + t + b) as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        if x < l || y < t || x >= l + iw || y >= t + ih {
            image::Luma([255])
        } else {
            *mask.get_pixel((x - l) as u32, (y - t) as u32)
        }
    })
}

/// Separable Gaussian blur with standard deviation `sigma` (edges clamped); kept in
/// floats so that a soft edge is not quantised.
pub fn blur(v: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return v.to_vec();
    }
    let r = (3.0 * sigma).ceil() as i64;
    let mut k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|x| *x /= sum);
    let pass = |src: &[f32], along_x: bool| -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0.0;
                for (j, &kw) in k.iter().enumerate() {
                    let d = j as i64 - r;
                    let (sx, sy) = if along_x {
                        ((x as i64 + d).clamp(0, w as i64 - 1) as usize, y)
                    } else {
                        (x, (y as i64 + d).clamp(0, h as i64 - 1) as usize)
                    };
                    acc += kw * src[sy * w + sx];
                }
                out[y * w + x] = acc;
            }
        }
        out
    };
    pass(&pass(v, true), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x + y) as u8]))
    }

    #[test]
    fn without_a_size_the_picture_is_cropped_around_its_centre_to_the_multiple() {
        let c = Canvas::from_images(
            gradient(37, 22),
            None,
            &CanvasOptions {
                multiple: 8,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((c.width, c.height), (32, 16));
        // (37 - 32) / 2 = 2 columns and (22 - 16) / 2 = 3 rows cut on the left and top.
        assert_eq!(&c.rgb[..3], &[2, 3, 5]);
        assert_eq!(&c.rgb[(15 * 32 + 31) * 3..][..3], &[33, 18, 51]);
    }

    #[test]
    fn with_a_size_the_picture_is_scaled_to_cover_it_and_cropped() {
        let img = RgbImage::from_fn(40, 20, |x, _| {
            image::Rgb(if x < 20 { [255, 0, 0] } else { [0, 0, 255] })
        });
        let c = Canvas::from_images(
            img,
            None,
            &CanvasOptions {
                size: Some((16, 16)),
                multiple: 8,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((c.width, c.height), (16, 16));
        // Scaled to 32x16, 8 columns cut on each side: left half red, right half blue.
        assert_eq!(&c.rgb[..3], &[255, 0, 0]);
        assert_eq!(&c.rgb[15 * 3..][..3], &[0, 0, 255]);
    }

    #[test]
    fn a_picture_smaller_than_one_multiple_is_scaled_up() {
        let c = Canvas::from_images(
            gradient(5, 3),
            None,
            &CanvasOptions {
                multiple: 8,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((c.width, c.height, c.rgb.len()), (8, 8, 8 * 8 * 3));
    }

    #[test]
    fn padding_extends_the_edges_and_masks_only_the_new_border() {
        let img = gradient(8, 8);
        let mask = GrayImage::from_pixel(8, 8, image::Luma([0]));
        let c = Canvas::from_images(
            img.clone(),
            Some(mask),
            &CanvasOptions {
                multiple: 8,
                pad: [8, 0, 0, 8],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((c.width, c.height), (16, 16));
        let m = c.mask.unwrap();
        assert_eq!(m[0], 1.0); // padded left
        assert_eq!(m[8], 0.0); // the original picture
        assert_eq!(m[15 * 16 + 12], 1.0); // padded bottom
                                          // Left padding repeats the picture's first column.
        assert_eq!(&c.rgb[..3], &img.get_pixel(0, 0).0);
        assert_eq!(&c.rgb[(2 * 16 + 3) * 3..][..3], &img.get_pixel(0, 2).0);
        // Without a mask file the picture is kept and the border painted.
        let c = Canvas::from_images(
            img,
            None,
            &CanvasOptions {
                multiple: 8,
                pad: [0, 0, 8, 0],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((c.width, c.height), (16, 8));
        let m = c.mask.unwrap();
        assert_eq!((m[7], m[8]), (0.0, 1.0));
    }

    #[test]
    fn padding_grows_to_the_multiple_instead_of_being_cropped() {
        let c = Canvas::from_images(
            gradient(64, 64),
            None,
            &CanvasOptions {
                multiple: 32,
                pad: [3, 0, 0, 0],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((c.width, c.height), (96, 64));
        let m = c.mask.unwrap();
        // 32 padded columns on the left (3 asked, 29 to reach the multiple), then the picture.
        assert_eq!((m[31], m[32]), (1.0, 0.0));
        assert_eq!(&c.rgb[32 * 3..33 * 3], &[0, 0, 0]);
    }

    #[test]
    fn mask_blur_softens_the_edge_and_binarising_restores_it() {
        let mask = GrayImage::from_fn(16, 8, |x, _| image::Luma([if x >= 8 { 255 } else { 0 }]));
        let c = Canvas::from_images(
            gradient(16, 8),
            Some(mask),
            &CanvasOptions {
                multiple: 8,
                mask_blur: 2.0,
                ..Default::default()
            },
        )
        .unwrap();
        let m = c.mask.as_ref().unwrap();
        assert!(
            m[7] > 0.2 && m[7] < 0.5 && m[8] > 0.5 && m[8] < 0.8,
            "{:?}",
            &m[..16]
        );
        assert!(m[0] < 1e-3 && m[15] > 0.999);
        let b = c.binary_mask().unwrap();
        assert_eq!(
            &b[..16],
            &[0., 0., 0., 0., 0., 0., 0., 0., 1., 1., 1., 1., 1., 1., 1., 1.]
        );
        let e = Canvas::from_images(
            gradient(8, 8),
            None,
            &CanvasOptions {
                multiple: 8,
                mask_blur: f32::NAN,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("mask blur"), "{e}");
    }

    #[test]
    fn planar_pixels_span_minus_one_to_one() {
        let c = Canvas {
            width: 2,
            height: 1,
            rgb: vec![0, 255, 0, 255, 0, 255],
            mask: None,
            mask_blur: 0.0,
        };
        assert_eq!(c.planar_pm1(), vec![-1.0, 1.0, 1.0, -1.0, -1.0, 1.0]);
    }
}
