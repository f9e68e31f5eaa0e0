//! ControlNets steering a run: each reads its conditioning image (an edge map,
//! depth, pose, scribble…) and the current latent, and its residuals, scaled by
//! their strength, are added to the UNet's skip connections and middle block
//! while the step is inside its `[start, end]` share of the walk (diffusers'
//! `control_guidance_start` / `_end`).
//!
//! Each ControlNet evaluates one guidance branch at a time (batch 1): the UNet's
//! batch of two is assembled from the branches' residuals, and guess mode gives
//! the unconditional branch none (diffusers' `guess_mode`), so a ControlNet's
//! compute buffer is that of one latent whatever the UNet's batch.
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::Canvas;
use crate::config::{ControlConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::formats::gguf::{metadata, GgufFile};
use crate::ggml::Backend;
use crate::model::controlnet::Runner;
use crate::model::unet::{Inputs, Shape};
use crate::network::controlnet::{ControlNet as Plan, CONTROL_PREFIX};
use crate::network::unet::Encoder;

/// A ControlNet ready to steer a model: its GGUF mapped and its config read.
pub struct ControlNet {
    pub(super) gguf: GgufFile,
    pub config: ControlConfig,
}

impl std::fmt::Debug for ControlNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ControlNet({}, {})",
            self.gguf.path.display(),
            self.config.family
        )
    }
}

impl ControlNet {
    /// A ControlNet from our GGUF (used from its mapping), or from any layout
    /// [`crate::formats::control`] reads, converted first to a temporary f16 GGUF.
    pub fn open(path: &Path) -> Result<ControlNet> {
        if crate::formats::gguf::is_gguf(path)? {
            let gguf = GgufFile::open(path)?;
            let config = metadata::read_control(&gguf)?.ok_or_else(|| {
                Error::arch(
                    path,
                    "not a ControlNet (no `sd-controlnet` metadata): convert it with `sdrs convert`",
                )
            })?;
            return Ok(ControlNet { gguf, config });
        }
        let src = crate::formats::control::open(path)?;
        let gguf = crate::convert::control_to_temporary(&src, &AtomicBool::new(false))?;
        Ok(ControlNet {
            gguf,
            config: src.config,
        })
    }

    pub fn path(&self) -> &Path {
        &self.gguf.path
    }

    /// The first 8 hex digits of its source file's SHA-256 where the converter
    /// recorded it (A1111's short model hash), else empty.
    pub fn source_hash(&self) -> String {
        self.gguf
            .get("sd.source.sha256")
            .and_then(|v| v.as_str())
            .map(|h| h.chars().take(8).collect())
            .unwrap_or_default()
    }

    /// The name the infotext gives it: its file's stem.
    pub fn name(&self) -> String {
        self.gguf
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Whether it can steer `model`'s UNet: the same latent channels, text width and
    /// label input, and residuals as wide and at the resolutions of the UNet's skip
    /// connections and middle block.
    pub fn check(&self, model: &ModelConfig) -> Result<()> {
        let (c, u) = (&self.config.unet, &model.unet);
        let err = |what: String| {
            Err(Error::arch(
                self.path(),
                format!("this ControlNet cannot steer the model: {what}"),
            ))
        };
        let latent = model
            .vae
            .as_ref()
            .map_or(u.in_channels, |v| v.latent_channels);
        if c.in_channels != latent {
            return err(format!(
                "it reads {} latent channels, the model's latents have {latent}",
                c.in_channels
            ));
        }
        if c.context_dim != u.context_dim || c.adm_in_channels != u.adm_in_channels {
            return err(format!(
                "it takes a {}-wide text conditioning and a label input of {:?}, the model {} and {:?} (a ControlNet for another model family?)",
                c.context_dim, c.adm_in_channels, u.context_dim, u.adm_in_channels
            ));
        }
        let ours = Encoder::new(c, CONTROL_PREFIX)?;
        let theirs = Encoder::new(u, crate::network::UNET_PREFIX)?;
        if ours.skips != theirs.skips || ours.width != theirs.width {
            return err(format!(
                "its residuals are {:?} (middle {}) wide, the UNet's skip connections {:?} (middle {})",
                ours.skips, ours.width, theirs.skips, theirs.width
            ));
        }
        if c.channel_mult.len() != u.channel_mult.len() {
            return err(format!(
                "it has {} levels, the UNet {}",
                c.channel_mult.len(),
                u.channel_mult.len()
            ));
        }
        let vae = model.vae.as_ref().map_or(1, |v| v.downscale());
        if self.config.downscale() != vae {
            return err(format!(
                "it reads its image at {}x the latent size, the model's autoencoder scales by {vae}",
                self.config.downscale()
            ));
        }
        Ok(())
    }
}

/// One ControlNet's part in a request.
#[derive(Clone, Debug)]
pub struct Control {
    pub net: Arc<ControlNet>,
    /// The conditioning image (a map already made, or a preprocessor's output); it
    /// is fitted to the request's size as init images are.
    pub image: Arc<Canvas>,
    /// Scale of its residuals (diffusers' `controlnet_conditioning_scale`).
    pub strength: f32,
    /// The share of the steps it acts on: step i of n when i/n ≥ start and
    /// (i+1)/n ≤ end.
    pub start: f32,
    pub end: f32,
    /// The preprocessor that made the image (A1111's "Module"): `none` for a map given
    /// as it is, `canny` for [`super::preprocess::canny`]'s.
    pub module: String,
    /// Guess mode: the unconditional branch gets no residuals and the residuals are
    /// weighted from 0.1 (shallowest) to 1 (middle block), so the ControlNet's
    /// content shows with an empty prompt.
    pub guess: bool,
}

impl Control {
    pub fn new(net: Arc<ControlNet>, image: Arc<Canvas>) -> Self {
        Control {
            net,
            image,
            strength: 1.0,
            start: 0.0,
            end: 1.0,
            module: "none".into(),
            guess: false,
        }
    }

    /// Whether step `i` of `n` is in its range (diffusers' `controlnet_keep`).
    pub fn active(&self, i: usize, n: usize) -> bool {
        let (i, n) = (i as f32, n.max(1) as f32);
        !(i / n < self.start || (i + 1.0) / n > self.end)
    }

    /// The residual scales, shallowest first, middle block last: the strength, or
    /// in guess mode the strength times 10^(-1 … 0) spaced evenly in the exponent
    /// (`torch.logspace(-1, 0, n)`).
    pub fn scales(&self, n: usize) -> Vec<f32> {
        if !self.guess {
            return vec![self.strength; n];
        }
        (0..n)
            .map(|k| {
                let e = if n > 1 {
                    -1.0 + k as f64 / (n - 1) as f64
                } else {
                    0.0
                };
                (10f64.powf(e) as f32) * self.strength
            })
            .collect()
    }

    /// Checks the numbers a request gives.
    pub fn validate(&self) -> Result<()> {
        if !self.strength.is_finite() {
            return Err(Error::Invalid(format!(
                "ControlNet strength {} is not a number",
                self.strength
            )));
        }
        if !(0.0..=1.0).contains(&self.start)
            || !(0.0..=1.0).contains(&self.end)
            || self.start > self.end
        {
            return Err(Error::Invalid(format!(
                "ControlNet range {}..{}: start and end are shares of the steps, 0 ≤ start ≤ end ≤ 1",
                self.start, self.end
            )));
        }
        Ok(())
    }
}

impl super::Pipeline {
    /// The request's ControlNets (checked by `validate`) with their images fitted to
    /// the request's size as init images are (scaled to cover, centre-cropped).
    pub(super) fn fit_controls(&self, req: &super::Request) -> Result<Vec<Control>> {
        req.controls
            .iter()
            .map(|c| {
                let im = &c.image;
                if (im.width, im.height) == (req.width, req.height) {
                    return Ok(c.clone());
                }
                let opts = super::CanvasOptions {
                    size: Some((req.width, req.height)),
                    multiple: self.size_multiple(),
                    ..Default::default()
                };
                let fitted = Canvas::from_rgb((im.width, im.height, im.rgb.clone()), None, &opts)?;
                Ok(Control {
                    image: Arc::new(fitted),
                    ..c.clone()
                })
            })
            .collect()
    }
}

/// One guidance branch a ControlNet evaluates: its text and label input, and
/// whether it is the conditional one.
#[derive(Clone, Copy)]
pub(super) struct Branch<'a> {
    pub context: &'a [f32],
    pub y: Option<&'a [f32]>,
    pub cond: bool,
}

/// A request's ControlNets with their graphs built, run at every UNet evaluation.
pub(super) struct Steering<'a> {
    nets: Vec<Active<'a>>,
    /// The walk's model timesteps, to find a step's index from its timestep.
    timesteps: Vec<f64>,
    /// Values per latent of each residual.
    sizes: Vec<usize>,
}

struct Active<'a> {
    control: &'a Control,
    runner: Runner<'a>,
    /// `[3][H][W]` in [0, 1].
    hint: Vec<f32>,
}

impl<'a> Steering<'a> {
    /// Builds a batch-1 graph per ControlNet for `shape`'s latent size, on the
    /// weights `weights[k]` of `controls[k]`.
    pub(super) fn new(
        controls: &'a [Control],
        weights: &'a [crate::model::Weights<'a>],
        shape: Shape,
        attention: crate::model::Attention,
        timesteps: &[f64],
    ) -> Result<Self> {
        let one = Shape {
            batch: 1,
            control: false,
            ..shape
        };
        let mut nets = Vec::with_capacity(controls.len());
        for (control, w) in controls.iter().zip(weights) {
            let f = control.net.config.downscale();
            let (pw, ph) = (shape.width * f, shape.height * f);
            let c = &control.image;
            if (c.width, c.height) != (pw, ph) {
                return Err(Error::Invalid(format!(
                    "the control image is {}x{}, the run {pw}x{ph}",
                    c.width, c.height
                )));
            }
            if control.net.config.hint_channels != 3 {
                return Err(Error::arch(
                    control.net.path(),
                    format!(
                        "a conditioning image of {} channels (sdrs passes RGB maps)",
                        control.net.config.hint_channels
                    ),
                ));
            }
            let n = pw * ph;
            let mut hint = vec![0f32; 3 * n];
            for (i, px) in c.rgb.chunks_exact(3).enumerate() {
                for ch in 0..3 {
                    hint[ch * n + i] = px[ch] as f32 / 255.0;
                }
            }
            nets.push(Active {
                control,
                runner: Runner::new(w, &control.net.config, one, attention)?,
                hint,
            });
        }
        let sizes = match controls.first() {
            Some(c) => residual_sizes(&c.net.config, shape.width, shape.height)?,
            None => Vec::new(),
        };
        Ok(Steering {
            nets,
            timesteps: timesteps.to_vec(),
            sizes,
        })
    }

    /// Compute-buffer bytes and FLOPs of one evaluation of every ControlNet.
    pub(super) fn cost(&self) -> (usize, f64) {
        self.nets.iter().fold((0, 0.0), |(b, f), a| {
            (b + a.runner.buffer_bytes, f + a.runner.flops)
        })
    }

    /// The step index of timestep `t`: the last step that starts at or above it (a
    /// second-order sampler's intermediate evaluations count with their step).
    fn step(&self, t: f64) -> usize {
        self.timesteps
            .iter()
            .filter(|&&s| s >= t - 1e-6)
            .count()
            .saturating_sub(1)
    }

    /// The residuals of the branches `branches` (each its text and label input,
    /// and whether it is the conditional one) on latent `x` at timestep `t`, laid
    /// out as the UNet's batch of those branches takes them: per residual, the
    /// branches one after the other, zeros where no ControlNet acts.
    pub(super) fn residuals(
        &self,
        x: &[f32],
        t: f32,
        branches: &[Branch<'_>],
        guidance: Option<&[f32]>,
        backend: &Backend,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out: Vec<Vec<f32>> = self
            .sizes
            .iter()
            .map(|&len| vec![0.0; len * branches.len()])
            .collect();
        let (i, n) = (self.step(t as f64), self.timesteps.len());
        for a in self.nets.iter().filter(|a| a.control.active(i, n)) {
            let cfg = &a.control.net.config.unet;
            for (b, &Branch { context, y, cond }) in branches.iter().enumerate() {
                if a.control.guess && !cond {
                    continue;
                }
                let inputs = Inputs {
                    x,
                    t: &[t],
                    context,
                    y,
                    guidance: cfg.time_cond_proj_dim.and(guidance),
                    class: None,
                    control: None,
                };
                let r = a.runner.run(&inputs, &a.hint, backend)?;
                for ((acc, v), s) in out
                    .iter_mut()
                    .zip(r)
                    .zip(a.control.scales(self.sizes.len()))
                {
                    let len = v.len();
                    acc[b * len..][..len]
                        .iter_mut()
                        .zip(v)
                        .for_each(|(a, v)| *a += s * v);
                }
            }
        }
        Ok(out)
    }
}

/// Values per latent of each residual a ControlNet gives at latent size `lw`x`lh`.
pub(super) fn residual_sizes(c: &ControlConfig, lw: usize, lh: usize) -> Result<Vec<usize>> {
    let plan = Plan::new(c)?;
    let (mut w, mut h) = (lw, lh);
    let mut widths = plan.encoder.skips.iter();
    let mut out = Vec::with_capacity(plan.encoder.skips.len() + 1);
    out.extend(widths.next().map(|&ch| ch * w * h));
    for block in &plan.encoder.input_blocks {
        // Only downsamplers change the resolution of a ControlNet's (SD) encoder.
        if block
            .iter()
            .any(|b| matches!(b, crate::network::unet::Block::Downsample(_)))
        {
            w = w.div_ceil(2);
            h = h.div_ceil(2);
        }
        out.extend(widths.next().map(|&ch| ch * w * h));
    }
    out.push(plan.encoder.width * w * h);
    Ok(out)
}
