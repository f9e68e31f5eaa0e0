//! Where sampling starts: the initial latent (noise, or an init image noised to the
//! first step's level), the extra input channels of inpainting UNets, and for
//! inpainting with an ordinary UNet the image blended back outside the mask after
//! every step.
//!
//! Noise is drawn from one generator in the order diffusers' img2img and inpaint
//! pipelines draw it, so the torch generator reproduces their images from a seed:
//! a sample of the image's latent distribution (VAE only; TAESD encodes
//! deterministically), the initial noise, then (inpainting) a sample for the masked
//! image, even where a 4-channel UNet never uses it.
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::formats::Checkpoint;
use crate::model::vae::{TileStats, Tiling};
use crate::model::{taesd, vae, Planes, Weights};
use crate::network::VAE_PREFIX;
use crate::sample::{Plan, Rng};

use super::{Canvas, Pipeline, Request};

/// How sampling starts for one request.
pub(super) struct Start {
    /// Unit-Gaussian noise of the latent's size.
    pub noise: Vec<f32>,
    /// The init image's latent (img2img; inpainting below full strength or with an
    /// ordinary UNet).
    pub image: Option<Vec<f32>>,
    /// Channels appended to the latent for every UNet call (inpainting UNets: the
    /// latent-resolution mask, then the masked image's latent).
    pub extra: Option<Vec<f32>>,
    /// Inpainting with an ordinary UNet: the latent-resolution mask (1 = repaint).
    pub blend_mask: Option<Vec<f32>>,
    /// A mask was given.
    pub inpaint: bool,
}

impl Start {
    /// The VE latent the sampler starts from: the image's latent noised to the plan's
    /// first level, or pure noise at the plan's initial scale (txt2img, and inpainting
    /// at full strength, as diffusers' inpaint pipeline).
    pub fn latent(&self, plan: &Plan, strength: f64) -> Vec<f64> {
        let image = if self.inpaint {
            self.image.as_deref().filter(|_| strength < 1.0)
        } else {
            self.image.as_deref()
        };
        crate::sample::start_latent(plan, &self.noise, image)
    }

    /// After step `i`, outside the mask, the image's latent noised to the next
    /// level (un-noised after the last step): diffusers' blend, made in the VP form
    /// its schedulers hold latents in, so that a final σ above 0 (DDIM's) blends alike.
    pub fn blend(&self, plan: &Plan, i: usize, x: &mut [f64]) {
        let (Some(m), Some(img)) = (&self.blend_mask, &self.image) else {
            return;
        };
        let last = i + 1 == plan.timesteps.len();
        let s = plan.sigmas[i + 1];
        let c = 1.0 / (s * s + 1.0).sqrt();
        let plane = m.len();
        for (j, v) in x.iter_mut().enumerate() {
            let keep = 1.0 - m[j % plane] as f64;
            if keep == 0.0 {
                continue;
            }
            let target = if last {
                img[j] as f64 / c
            } else {
                img[j] as f64 + s * self.noise[j] as f64
            };
            *v = keep * target + (1.0 - keep) * *v;
        }
    }
}

impl Pipeline {
    /// The start of `req`'s sampling, drawing from `rng` as diffusers would.
    pub(super) fn start(
        &self,
        req: &Request,
        lw: usize,
        lh: usize,
        tiling: Option<Tiling>,
        rng: &mut dyn Rng,
    ) -> Result<Start> {
        let zc = self.vae_config.latent_channels;
        let n = zc * lw * lh;
        let nine = self.config.unet.in_channels == 2 * zc + 1;
        let strength = req.strength();
        let canvas = req.canvas();
        let mask = canvas.and_then(Canvas::binary_mask);
        let given = req.init.as_ref().and_then(|i| i.latent.clone());
        if let Some(l) = &given {
            if l.len() != n {
                return Err(Error::Invalid(format!(
                    "the starting latent has {} values, a {}x{} latent {n}",
                    l.len(),
                    lw,
                    lh
                )));
            }
        }
        // Every image encode happens with the VAE's weights in (or TAESD's): one stage.
        let encoder = match (canvas, &req.decoding.taesd) {
            (None, _) => None,
            _ if given.is_some() && mask.is_none() => None,
            (Some(_), Some(dec)) => Some(Encoder::Taesd(Box::new(Weights::from_checkpoint_half(
                &Checkpoint::open(&taesd_encoder_path(dec)?)?,
                &self.backend,
            )?))),
            (Some(_), None) => Some(Encoder::Vae),
        };
        let image = match canvas {
            _ if given.is_some() => given.map(|l| l.to_vec()),
            // diffusers' inpaint pipeline encodes the image only where it is used.
            Some(c) if mask.is_none() || !nine || strength < 1.0 => Some(self.encode_image(
                encoder.as_ref(),
                &c.planar_pm1(),
                lw,
                lh,
                tiling.map(|t| (t, req.decoding.vae_tile_stats)),
                rng,
            )?),
            _ => None,
        };
        let noise = match &req.noise {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => {
                return Err(Error::Invalid(format!(
                    "initial noise has {} values, the latent has {n}",
                    v.len()
                )))
            }
            None => rng.randn(n),
        };
        let (mut extra, mut blend_mask) = (None, None);
        if let (Some(c), Some(m)) = (canvas, &mask) {
            // The pipeline zeroes the masked pixels (0 is grey in [-1, 1]) and encodes them.
            let mut masked = c.planar_pm1();
            let plane = m.len();
            for (j, v) in masked.iter_mut().enumerate() {
                if m[j % plane] >= 0.5 {
                    *v = 0.0;
                }
            }
            let small = nearest(m, c.width, c.height, lw, lh);
            if nine {
                let latent = self.encode_image(
                    encoder.as_ref(),
                    &masked,
                    lw,
                    lh,
                    tiling.map(|t| (t, req.decoding.vae_tile_stats)),
                    rng,
                )?;
                let mut e = small;
                e.extend(latent);
                extra = Some(e);
            } else {
                // Drawn and dropped: a 4-channel UNet does not take the masked image,
                // but diffusers encodes it all the same, and its later noise follows.
                if matches!(encoder, Some(Encoder::Vae)) {
                    rng.randn(n);
                }
                blend_mask = Some(small);
            }
        }
        if extra.is_none() && nine {
            // No mask: everything is to be painted, over a grey image (as A1111 runs
            // img2img and txt2img with inpainting models).
            extra = self.image_conditioning(lw, lh)?;
        }
        // After every encode, so the VAE is not resident through the UNet stage.
        self.gguf.release(|n| n.starts_with(VAE_PREFIX));
        Ok(Start {
            noise,
            image,
            extra,
            blend_mask,
            inpaint: mask.is_some(),
        })
    }

    /// UNet-space latents of an image in [-1, 1]: a draw from the VAE's latent
    /// distribution, or TAESD's (deterministic) latent.
    fn encode_image(
        &self,
        encoder: Option<&Encoder>,
        pixels: &[f32],
        lw: usize,
        lh: usize,
        tiling: Option<(Tiling, TileStats)>,
        rng: &mut dyn Rng,
    ) -> Result<Vec<f32>> {
        let cfg = &self.vae_config;
        let (h, w) = (lh * cfg.downscale(), lw * cfg.downscale());
        match encoder {
            Some(Encoder::Taesd(t)) => {
                let unit: Vec<f32> = pixels.iter().map(|v| v * 0.5 + 0.5).collect();
                let z = match tiling {
                    Some((tiles, _)) => {
                        taesd::encode_tiled(t, Planes::single(&unit, w, h), tiles, &self.backend)?
                    }
                    None => taesd::encode(t, Planes::single(&unit, w, h), &self.backend)?,
                };
                if z.len() != cfg.latent_channels * lw * lh {
                    return Err(Error::Invalid(format!(
                        "the TAESD encoder gives {} latent values per image, the model takes {}",
                        z.len() / (lw * lh).max(1),
                        cfg.latent_channels
                    )));
                }
                Ok(z)
            }
            _ => {
                let eps = rng.randn(cfg.latent_channels * lw * lh);
                let weights = self.vae_weights()?;
                vae::encode_sample(
                    &weights,
                    cfg,
                    Planes::single(pixels, w, h),
                    &eps,
                    tiling,
                    &self.backend,
                )
            }
        }
    }
}

enum Encoder {
    Vae,
    Taesd(Box<Weights<'static>>),
}

/// The encoder beside a TAESD decoder file: `taesd_decoder.pth` → `taesd_encoder.pth`
/// (every TAESD release names its pair so).
pub fn taesd_encoder_path(decoder: &std::path::Path) -> Result<PathBuf> {
    let name = decoder
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains("decoder") {
        return Err(Error::Invalid(format!("{}: img2img with TAESD needs the encoder too; name the decoder file `…decoder…` and put its `…encoder…` file beside it", decoder.display())));
    }
    let enc = decoder.with_file_name(name.replacen("decoder", "encoder", 1));
    if !enc.is_file() {
        return Err(Error::Invalid(format!(
            "{}: img2img with TAESD needs its encoder, {}, which is not there",
            decoder.display(),
            enc.display()
        )));
    }
    Ok(enc)
}

/// A `w`x`h` plane resized to `lw`x`lh` by nearest neighbour, as torch's
/// `interpolate(mode="nearest")`: source index ⌊dst · in / out⌋.
fn nearest(v: &[f32], w: usize, h: usize, lw: usize, lh: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(lw * lh);
    for y in 0..lh {
        let sy = y * h / lh;
        for x in 0..lw {
            out.push(v[sy * w + x * w / lw]);
        }
    }
    out
}
