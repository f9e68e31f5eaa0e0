//! Hires fix (A1111's "Hires. fix"): a picture made at the model's own size, enlarged
//! in pixels (by an ESRGAN-family upscaler, then Lanczos to the exact size, or by
//! Lanczos alone), and repainted at the larger size by img2img with the same prompt
//! and seed. The first pass settles the composition where the model was trained;
//! the second adds the detail the larger size has room for.
use std::sync::Arc;

use image::{imageops, RgbImage};

use super::upscale::Upscaler;
use super::{Canvas, Image, Init, Pipeline, Request, Stage};
use crate::error::{Error, Result};

/// The second pass of a hires fix.
#[derive(Clone, Copy)]
pub struct Hires<'a> {
    /// How much larger the second pass is (A1111's "Upscale by"); each side is rounded
    /// down to the model's multiple.
    pub scale: f64,
    /// The second pass's steps before its denoising cut (A1111's "Hires steps");
    /// `None`: the first pass's.
    pub steps: Option<usize>,
    /// How much the second pass repaints (A1111's "Denoising strength"): it runs the
    /// last ⌊steps·denoise⌋ steps.
    pub denoise: f64,
    /// Enlarges the first pass before the Lanczos resize; `None`: Lanczos alone.
    pub upscaler: Option<&'a Upscaler>,
}

impl Hires<'_> {
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if !(self.scale > 1.0 && self.scale <= 8.0) {
            return bad(format!(
                "hires scale {}: it must be above 1 and at most 8",
                self.scale
            ));
        }
        if !(self.denoise > 0.0 && self.denoise <= 1.0) {
            return bad(format!(
                "hires denoising strength {}: it must be in (0, 1]",
                self.denoise
            ));
        }
        if self.steps == Some(0) {
            return bad("hires steps must be at least 1".into());
        }
        Ok(())
    }

    /// The second pass's size for a first pass of `w`x`h`.
    pub fn size(&self, (w, h): (usize, usize), multiple: usize) -> (usize, usize) {
        let side = |v: usize| (v as f64 * self.scale) as usize / multiple * multiple;
        (side(w), side(h))
    }

    /// The second pass's request: `req` at the larger size and the hires steps,
    /// repainting `rgb` (a grey stand-in of the right size when `None`, for planning).
    pub fn second_pass(&self, req: &Request, multiple: usize, rgb: Option<Vec<u8>>) -> Request {
        let (width, height) = self.size((req.width, req.height), multiple);
        let canvas = Canvas {
            width,
            height,
            rgb: rgb.unwrap_or_else(|| vec![128; 3 * width * height]),
            mask: None,
            mask_blur: 0.0,
        };
        Request {
            width,
            height,
            steps: self.steps.unwrap_or(req.steps),
            init: Some(Init {
                canvas: Arc::new(canvas),
                strength: Some(self.denoise),
                overlay: false,
            }),
            ..req.clone()
        }
    }

    fn upscaler_name(&self) -> String {
        self.upscaler
            .map_or_else(|| "Lanczos".into(), Upscaler::name)
    }
}

impl Pipeline {
    /// `req` (a text-to-image request) made, enlarged and repainted as `hires` says.
    /// The image's parameters are the first pass's plus A1111's hires keys.
    pub fn generate_hires(
        &self,
        req: &Request,
        hires: &Hires<'_>,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<Image> {
        hires.check()?;
        if req.init.is_some() {
            return Err(Error::Invalid(
                "the hires fix repaints a text-to-image result: it takes no init image".into(),
            ));
        }
        let multiple = self.size_multiple();
        let planned = hires.second_pass(req, multiple, None);
        // Both passes fit before either runs; the stand-in picture plans the second as
        // its real one will run (the same size, no mask).
        let (first_memory, second_memory) = (self.plan(req)?, self.plan(&planned)?);
        let first = self.generate_planned(req, &first_memory, progress)?;
        let cancel = req.cancel.clone();
        let enlarged = match hires.upscaler {
            Some(up) => up.upscale(&first, 1, &mut |_, _| match &cancel {
                Some(c) if c.load(std::sync::atomic::Ordering::Relaxed) => Err(Error::Interrupted),
                _ => Ok(()),
            })?,
            None => first.clone(),
        };
        let rgb =
            RgbImage::from_raw(enlarged.width as u32, enlarged.height as u32, enlarged.rgb)
                .ok_or_else(|| Error::Invalid("the enlarged picture has the wrong size".into()))?;
        let resized = imageops::resize(
            &rgb,
            planned.width as u32,
            planned.height as u32,
            imageops::FilterType::Lanczos3,
        );
        let second = hires.second_pass(req, multiple, Some(resized.into_raw()));
        let mut image = self.generate_planned(&second, &second_memory, progress)?;
        image.parameters = format!(
            "{}, Denoising strength: {}, Hires upscale: {}, Hires steps: {}, Hires upscaler: {}",
            first.parameters,
            hires.denoise,
            hires.scale,
            second.steps,
            hires.upscaler_name()
        );
        for (t, f) in image.timings.iter_mut().zip(first.timings) {
            *t += f;
        }
        Ok(image)
    }
}
