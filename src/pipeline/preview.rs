//! Step previews: the model's current estimate of the clean latent as a picture, so
//! that on a device where a step takes seconds the image can be watched forming.
//! With a TAESD-family decoder given for the run, it draws them (close to the final
//! image, milliseconds). Otherwise latents of a known latent space go through its
//! linear latent-to-RGB projection (no network at all, latent resolution scaled up), and
//! other latent spaces through the model's own VAE (exact, a decode per preview).
use crate::error::Result;
use crate::model::{taesd, vae, Planes, Weights};

use super::{Image, Pipeline};

/// Latent-to-RGB factors of the latent spaces sdrs knows, by the VAE's latent scaling
/// factor (which names the space: SD 1.x/2.x's VAE 0.18215, SDXL's 0.13025). Rows are
/// latent channels, columns R, G, B, applied to scaled latents, giving values in
/// [-1, 1]. Fitted by ComfyUI (comfy/latent_formats.py, `latent_rgb_factors`).
const PROJECTIONS: &[(f32, [[f32; 3]; 4])] = &[
    (
        0.18215,
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
    ),
    (
        0.13025,
        [
            [0.3920, 0.4054, 0.4549],
            [-0.2634, -0.0196, 0.0653],
            [0.0568, 0.1687, -0.0755],
            [-0.3112, -0.2359, -0.2076],
        ],
    ),
];

enum Method<'p> {
    Taesd(&'p Weights<'static>),
    Projection(&'static [[f32; 3]; 4]),
    Vae,
}

/// Draws previews for one run.
pub(super) struct Previewer<'p> {
    pipe: &'p Pipeline,
    method: Method<'p>,
    /// Latent width and height.
    lw: usize,
    lh: usize,
}

impl<'p> Previewer<'p> {
    /// Previews through `taesd`'s decoder where the run has one.
    pub fn new(
        pipe: &'p Pipeline,
        taesd: Option<&'p Weights<'static>>,
        lw: usize,
        lh: usize,
    ) -> Result<Self> {
        let cfg = &pipe.vae_config;
        let known = PROJECTIONS.iter().find(|(s, _)| {
            cfg.latent_channels == 4
                && (s - cfg.scaling_factor).abs() < 1e-6
                && cfg.shift_factor == 0.0
        });
        let method = match (taesd, known) {
            (Some(w), _) => Method::Taesd(w),
            (None, Some((_, f))) => Method::Projection(f),
            (None, None) => Method::Vae,
        };
        Ok(Previewer {
            pipe,
            method,
            lw,
            lh,
        })
    }

    /// The picture of `latent` (scaled, `[C][lh][lw]`) at the output's size.
    pub fn draw(&self, latent: &[f64]) -> Result<Image> {
        let (lw, lh) = (self.lw, self.lh);
        let f = self.pipe.vae_config.downscale();
        let z: Vec<f32> = latent.iter().map(|&v| v as f32).collect();
        let (w, h) = (lw * f, lh * f);
        let planar = |pixels: &[f32], unit: bool| super::to_rgb8(pixels, w * h, unit);
        let rgb = match &self.method {
            Method::Taesd(weights) => planar(
                &taesd::decode(weights, Planes::single(&z, lw, lh), &self.pipe.backend)?,
                true,
            ),
            Method::Vae => {
                let weights = self.pipe.vae_weights()?;
                planar(
                    &vae::decode(
                        &weights,
                        &self.pipe.vae_config,
                        Planes::single(&z, lw, lh),
                        &self.pipe.backend,
                    )?,
                    false,
                )
            }
            Method::Projection(factors) => {
                let mut rgb = vec![0u8; w * h * 3];
                let plane = lw * lh;
                for y in 0..h {
                    for x in 0..w {
                        let at = (y / f) * lw + x / f;
                        for c in 0..3 {
                            let v: f32 = (0..4)
                                .map(|k| {
                                    z.get(k * plane + at).copied().unwrap_or(0.0) * factors[k][c]
                                })
                                .sum();
                            rgb[(y * w + x) * 3 + c] =
                                ((v + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0).round() as u8;
                        }
                    }
                }
                rgb
            }
        };
        Ok(Image {
            width: w,
            height: h,
            rgb,
            parameters: String::new(),
            timings: [0.0; 3],
        })
    }
}
