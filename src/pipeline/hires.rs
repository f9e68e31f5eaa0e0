//! Hires fix (A1111's "Hires. fix"): a picture made at the model's own size, enlarged
//! in pixels (by an ESRGAN-family upscaler, then Lanczos to the exact size, or by
//! Lanczos alone) or as a latent (A1111's "Latent" upscalers: the first pass is never
//! decoded), and repainted at the larger size by img2img with the same prompt and
//! seed. The first pass settles the composition where the model was trained; the
//! second adds the detail the larger size has room for.
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
    /// Enlarge the first pass's latent instead of its picture (then `upscaler` must
    /// be `None`).
    pub latent: Option<LatentResize>,
}

/// How a latent is enlarged: `torch.nn.functional.interpolate`'s modes without
/// antialiasing, as A1111's latent upscalers call it ("Latent" is bilinear).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatentResize {
    Bilinear,
    Bicubic,
    Nearest,
    NearestExact,
}

impl LatentResize {
    /// The `--hires-upscaler` words, and A1111's names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "latent" | "Latent" => Some(Self::Bilinear),
            "latent-bicubic" | "Latent (bicubic)" => Some(Self::Bicubic),
            "latent-nearest" | "Latent (nearest)" => Some(Self::Nearest),
            "latent-nearest-exact" | "Latent (nearest-exact)" => Some(Self::NearestExact),
            _ => None,
        }
    }

    /// A1111's name for it (its infotexts' `Hires upscaler`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bilinear => "Latent",
            Self::Bicubic => "Latent (bicubic)",
            Self::Nearest => "Latent (nearest)",
            Self::NearestExact => "Latent (nearest-exact)",
        }
    }

    /// `x` (`[C][h][w]`) resized to `nw`x`nh` as `F.interpolate(x, size=(nh, nw),
    /// mode, align_corners=False)` does it: source coordinates `(i + ½)·in/out − ½`
    /// (clamped at 0 for bilinear), bicubic with A = −0.75 and the border repeated,
    /// nearest at `⌊i·in/out⌋`, nearest-exact at `⌊(i + ½)·in/out⌋`.
    pub fn resize(self, x: &[f32], (w, h): (usize, usize), (nw, nh): (usize, usize)) -> Vec<f32> {
        let c = x.len() / (w * h).max(1);
        // Per output coordinate: source indices and weights along one axis.
        let taps = |inp: usize, out: usize| -> Vec<Vec<(usize, f32)>> {
            let scale = inp as f32 / out as f32;
            let clamp = |i: i64| i.clamp(0, inp as i64 - 1) as usize;
            (0..out)
                .map(|o| match self {
                    Self::Nearest => {
                        vec![(((o as f32 * scale).floor() as usize).min(inp - 1), 1.0)]
                    }
                    Self::NearestExact => {
                        vec![(
                            (((o as f32 + 0.5) * scale).floor() as usize).min(inp - 1),
                            1.0,
                        )]
                    }
                    Self::Bilinear => {
                        let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                        let i0 = src.floor() as i64;
                        let l = src - i0 as f32;
                        vec![(clamp(i0), 1.0 - l), (clamp(i0 + 1), l)]
                    }
                    Self::Bicubic => {
                        let src = (o as f32 + 0.5) * scale - 0.5;
                        let i0 = src.floor() as i64;
                        let t = src - i0 as f32;
                        const A: f32 = -0.75;
                        let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
                        let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
                        vec![
                            (clamp(i0 - 1), far(t + 1.0)),
                            (clamp(i0), near(t)),
                            (clamp(i0 + 1), near(1.0 - t)),
                            (clamp(i0 + 2), far(2.0 - t)),
                        ]
                    }
                })
                .collect()
        };
        let (tx, ty) = (taps(w, nw), taps(h, nh));
        let mut out = vec![0f32; c * nw * nh];
        for ch in 0..c {
            let plane = &x[ch * w * h..][..w * h];
            for (oy, ry) in ty.iter().enumerate() {
                for (ox, rx) in tx.iter().enumerate() {
                    let mut v = 0f32;
                    for &(iy, wy) in ry {
                        for &(ix, wx) in rx {
                            v += wy * wx * plane[iy * w + ix];
                        }
                    }
                    out[(ch * nh + oy) * nw + ox] = v;
                }
            }
        }
        out
    }
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
        if self.latent.is_some() && self.upscaler.is_some() {
            return bad("a hires fix enlarges the latent or the picture, not both".into());
        }
        Ok(())
    }

    /// The second pass's size for a first pass of `w`x`h`.
    pub fn size(&self, (w, h): (usize, usize), multiple: usize) -> (usize, usize) {
        let side = |v: usize| (v as f64 * self.scale) as usize / multiple * multiple;
        (side(w), side(h))
    }

    /// The second pass's request: `req` at the larger size and the hires steps,
    /// repainting `rgb` (a grey stand-in of the right size when `None`, for planning),
    /// or starting from `latent` where the hires fix enlarges latents.
    pub fn second_pass(
        &self,
        req: &Request,
        multiple: usize,
        rgb: Option<Vec<u8>>,
        latent: Option<Vec<f32>>,
    ) -> Request {
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
                // Planned with a stand-in: what matters is that no encode runs.
                latent: self.latent.map(|_| Arc::new(latent.unwrap_or_default())),
            }),
            ..req.clone()
        }
    }

    fn upscaler_name(&self) -> String {
        match (self.latent, self.upscaler) {
            (Some(l), _) => l.name().into(),
            (None, Some(u)) => u.name(),
            (None, None) => "Lanczos".into(),
        }
    }
}

impl Hires<'_> {
    /// The first pass's parameters with A1111's hires keys.
    fn parameters(&self, first: &str, steps: usize) -> String {
        format!(
            "{first}, Denoising strength: {}, Hires upscale: {}, Hires steps: {steps}, Hires upscaler: {}",
            self.denoise,
            self.scale,
            self.upscaler_name()
        )
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
        let planned = hires.second_pass(req, multiple, None, None);
        // Both passes fit before either runs; the stand-in picture plans the second as
        // its real one will run (the same size, no mask).
        let (first_memory, second_memory) = (self.plan(req)?, self.plan(&planned)?);
        if let Some(mode) = hires.latent {
            let (latent, first_parameters, first_timings) =
                self.sample_only(req, &first_memory, progress)?;
            let (lw, lh) = self.latent_size(req.width, req.height)?;
            let size = self.latent_size(planned.width, planned.height)?;
            let second = hires.second_pass(
                req,
                multiple,
                None,
                Some(mode.resize(&latent, (lw, lh), size)),
            );
            let mut image = self.generate_planned(&second, &second_memory, progress)?;
            image.parameters = hires.parameters(&first_parameters, second.steps);
            for (t, f) in image.timings.iter_mut().zip(first_timings) {
                *t += f;
            }
            return Ok(image);
        }
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
        let second = hires.second_pass(req, multiple, Some(resized.into_raw()), None);
        let mut image = self.generate_planned(&second, &second_memory, progress)?;
        image.parameters = hires.parameters(&first.parameters, second.steps);
        for (t, f) in image.timings.iter_mut().zip(first.timings) {
            *t += f;
        }
        Ok(image)
    }
}
