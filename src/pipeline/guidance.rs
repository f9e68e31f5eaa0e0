//! Classifier-free guidance around the UNet, and the conditioning a UNet takes beside
//! the text: the added `label_emb` input of SDXL-style UNets and the guidance-scale
//! embedding of LCM-distilled ones.
use std::sync::atomic::AtomicBool;

use super::control::{Branch, Steering};
use super::{check_cancel, Pipeline};
use crate::config::UnetConfig;
use crate::error::{Error, Result};
use crate::model::unet::{self, Inputs};
use crate::sample;

/// The input of a `label_emb` UNet's added embedding for one branch: the pooled text
/// embedding, then each value of the size/crop/score ids (in [`UnetConfig::time_ids`]
/// order: height before width, top before left) through a sinusoidal embedding
/// (Podell et al. 2023, sec. 2.2; diffusers' `add_time_ids` through `add_time_proj`).
pub fn label_input(u: &UnetConfig, pooled: &[f32], values: &[f32]) -> Result<Vec<f32>> {
    let adm = u.adm_in_channels.unwrap_or(0);
    let mut y = pooled.to_vec();
    for &v in values {
        y.extend(sinusoidal(v, u.time_id_dim));
    }
    if y.len() != adm {
        return Err(Error::Invalid(format!("label_emb takes {adm} values; the pooled embedding ({}) and {} size/crop values make {}", pooled.len(), values.len(), y.len())));
    }
    Ok(y)
}

/// The sinusoidal embedding of one value, cosines then sines (diffusers' `Timesteps`
/// with `flip_sin_to_cos`, frequencies 10000^(-j/half)), in f32 like the reference.
fn sinusoidal(v: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let args: Vec<f32> = (0..half)
        .map(|j| v * (-(10000f32).ln() * j as f32 / half as f32).exp())
        .collect();
    let mut out: Vec<f32> = args
        .iter()
        .map(|a| a.cos())
        .chain(args.iter().map(|a| a.sin()))
        .collect();
    out.resize(dim, 0.0);
    out
}

/// The guidance-scale embedding of LCM-distilled UNets (Luo et al. 2023; the sinusoidal
/// embedding of w·1000, sines then cosines, as diffusers' `get_guidance_scale_embedding`),
/// computed in f32 like the reference.
pub fn guidance_embedding(w: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let step = (10000f32).ln() / (half.max(2) - 1) as f32;
    let w = w * 1000.0;
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut out: Vec<f32> = args
        .iter()
        .map(|a| a.sin())
        .chain(args.iter().map(|a| a.cos()))
        .collect();
    out.resize(dim, 0.0);
    out
}

/// Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
/// are Flawed", eq. 15–16): scale the guided prediction to the conditional one's
/// standard deviation, and mix by φ; counters over-exposure at high CFG.
fn rescale_guidance(guided: &[f32], cond: &[f32], phi: f32) -> Vec<f32> {
    let std = |v: &[f32]| {
        let n = v.len() as f64;
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        // Unbiased, as torch.std.
        (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt()
    };
    let f = std(cond) / std(guided).max(1e-30);
    guided
        .iter()
        .map(|&g| phi * (g as f64 * f) as f32 + (1.0 - phi) * g)
        .collect()
}

/// The two branches' halves of a per-branch input.
fn halves(v: Option<&[f32]>) -> (Option<&[f32]>, Option<&[f32]>) {
    match v {
        Some(v) => {
            let (a, b) = v.split_at(v.len() / 2);
            (Some(a), Some(b))
        }
        None => (None, None),
    }
}

/// The UNet with classifier-free guidance: one batch of [uncond, cond] when guided,
/// the cond pass alone at scale 1.
pub(super) struct Guidance<'a> {
    pub(super) runner: &'a unet::Runner<'a>,
    pub(super) pipe: &'a Pipeline,
    pub(super) context: &'a [f32],
    /// `label_emb`'s input per branch, laid out like `context`.
    pub(super) y: Option<&'a [f32]>,
    pub(super) scale: f32,
    /// Guidance rescale φ.
    pub(super) rescale: f32,
    pub(super) guided: bool,
    /// The two guidance branches run as two batches of one (the graph has batch 1).
    pub(super) split: bool,
    /// Channels appended to the latent of every batch element (inpainting UNets).
    pub(super) extra: Option<&'a [f32]>,
    /// Guidance-scale embedding of LCM-distilled UNets (then never batched with uncond).
    pub(super) embedded: Option<&'a [f32]>,
    pub(super) cancel: Option<&'a AtomicBool>,
    /// The request's ControlNets.
    pub(super) steering: Option<&'a Steering<'a>>,
}

impl sample::Model for Guidance<'_> {
    fn predict(&mut self, x: &[f32], t: f64) -> Result<Vec<f32>> {
        check_cancel(self.cancel)?;
        let backend = &self.pipe.backend;
        // One latent per evaluation the graph takes: two when the guided branches share it.
        let n = if self.guided && !self.split { 2 } else { 1 };
        let mut batch = Vec::with_capacity(n * (x.len() + self.extra.map_or(0, <[f32]>::len)));
        for _ in 0..n {
            batch.extend_from_slice(x);
            if let Some(e) = self.extra {
                batch.extend_from_slice(e);
            }
        }
        // ControlNet residuals of the branches one graph evaluates.
        let control = |branches: &[Branch<'_>]| {
            self.steering
                .map(|s| s.residuals(x, t as f32, branches, self.embedded, backend))
                .transpose()
        };
        if !self.guided {
            let r = control(&[Branch {
                context: self.context,
                y: self.y,
                cond: true,
            }])?;
            let inputs = Inputs {
                x: &batch,
                t: &[t as f32],
                context: self.context,
                y: self.y,
                guidance: self.embedded,
                class: None,
                control: r.as_deref(),
            };
            return self.runner.run(&inputs, backend);
        }
        let (ctx_u, ctx_c) = self.context.split_at(self.context.len() / 2);
        let (y_u, y_c) = halves(self.y);
        let out = if self.split {
            let one = [t as f32];
            let branch = |context, y, control| Inputs {
                x: &batch,
                t: &one,
                context,
                y,
                guidance: None,
                class: None,
                control,
            };
            let r = control(&[Branch {
                context: ctx_u,
                y: y_u,
                cond: false,
            }])?;
            let mut out = self
                .runner
                .run(&branch(ctx_u, y_u, r.as_deref()), backend)?;
            let r = control(&[Branch {
                context: ctx_c,
                y: y_c,
                cond: true,
            }])?;
            out.extend(
                self.runner
                    .run(&branch(ctx_c, y_c, r.as_deref()), backend)?,
            );
            out
        } else {
            let r = control(&[
                Branch {
                    context: ctx_u,
                    y: y_u,
                    cond: false,
                },
                Branch {
                    context: ctx_c,
                    y: y_c,
                    cond: true,
                },
            ])?;
            let inputs = Inputs {
                x: &batch,
                t: &[t as f32, t as f32],
                context: self.context,
                y: self.y,
                guidance: None,
                class: None,
                control: r.as_deref(),
            };
            self.runner.run(&inputs, backend)?
        };
        let (uncond, cond) = out.split_at(out.len() / 2);
        let guided: Vec<f32> = uncond
            .iter()
            .zip(cond)
            .map(|(u, c)| u + self.scale * (c - u))
            .collect();
        Ok(if self.rescale > 0.0 {
            rescale_guidance(&guided, cond, self.rescale)
        } else {
            guided
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_rescale_matches_the_conditional_spread_at_one_and_is_off_at_zero() {
        let cond: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
            .collect();
        let guided: Vec<f32> = cond
            .iter()
            .enumerate()
            .map(|(i, c)| 3.0 * c + (i % 5) as f32 * 0.3)
            .collect();
        assert_eq!(rescale_guidance(&guided, &cond, 0.0), guided);
        let std = |v: &[f32]| {
            let m = v.iter().sum::<f32>() / v.len() as f32;
            (v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / (v.len() - 1) as f32).sqrt()
        };
        let full = rescale_guidance(&guided, &cond, 1.0);
        assert!((std(&full) - std(&cond)).abs() < 1e-5);
        let half = rescale_guidance(&guided, &cond, 0.5);
        assert!((half[3] - 0.5 * (full[3] + guided[3])).abs() < 1e-5);
    }

    #[test]
    fn guidance_embedding_is_sines_then_cosines_of_w_times_1000() {
        let e = guidance_embedding(7.5, 8);
        assert_eq!(e.len(), 8);
        // First frequency is 1: sin(7500), cos(7500).
        assert!((e[0] - 7500f32.sin()).abs() < 1e-3 && (e[4] - 7500f32.cos()).abs() < 1e-3);
        // Last frequency is 1/10000.
        assert!((e[3] - 0.75f32.sin()).abs() < 1e-5 && (e[7] - 0.75f32.cos()).abs() < 1e-5);
    }
}
