//! Unconditional and class-conditional diffusion: the DDPM paper's models (Ho et al.
//! 2020; diffusers' `UNet2DModel`, e.g. `google/ddpm-celebahq-256`) and latent
//! diffusion over a VQ autoencoder (Rombach et al. 2022; `CompVis/ldm-celebahq-256`)
//! turn noise alone into images, a batch at a time, as diffusers' `DDPMPipeline`,
//! `DDIMPipeline` and `LDMPipeline` do: one draw of noise for the whole batch from the
//! seed's generator, then one more per stochastic step, so the torch generator
//! reproduces their images.
//!
//! ```no_run
//! use sdrs::pipeline::unconditional::{Batch, Unconditional};
//! let model = Unconditional::load("ddpm-celebahq.gguf".as_ref(), 2)?;
//! let req = model.request();
//! for (i, image) in model.generate(&req, &Batch::of(4), &mut |_| {})?.iter().enumerate() {
//!     image.save_png(format!("face-{i}.png").as_ref())?;
//! }
//! # Ok::<(), sdrs::Error>(())
//! ```
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::{to_rgb8, Image, Request, Stage};
use crate::budget::{self, Budget, Need};
use crate::config::{Defaults, ModelConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::formats::gguf::{metadata, GgufFile};
use crate::formats::Checkpoint;
use crate::ggml::Backend;
use crate::model::{unet, vae, Attention, Planes, Weights};
use crate::network::{self, UNET_PREFIX, VAE_PREFIX};
use crate::sample::score_sde::{self, VeGrid};
use crate::sample::{self, Sampler};
use rayon::prelude::*;

/// How many images, and their classes for a class-conditional model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub count: usize,
    /// One class per image, or one for all; empty for an unconditional model.
    pub classes: Vec<i32>,
}

impl Batch {
    /// `count` images of an unconditional model.
    pub fn of(count: usize) -> Self {
        Batch {
            count,
            classes: Vec::new(),
        }
    }
}

/// A model that needs no text, ready to sample: the GGUF mapped and its config read.
pub struct Unconditional {
    gguf: GgufFile,
    pub config: ModelConfig,
    backend: Backend,
    /// How the model is meant to be run where the file says (size, sampler, steps).
    pub defaults: Defaults,
    /// Memory budget in bytes: the batch runs through the UNet in chunks that fit it.
    pub max_memory: Option<u64>,
    model_hash: String,
}

/// The memory plan of a batch: the UNet's need per chunk and the chunk size.
#[derive(Clone, Debug)]
pub struct BatchPlan {
    pub memory: budget::Plan,
    /// Images the UNet evaluates at once.
    pub chunk: usize,
}

impl BatchPlan {
    pub fn summary(&self) -> String {
        format!(
            "{}  the UNet takes the batch {} image(s) at a time\n",
            self.memory.summary(),
            self.chunk
        )
    }
}

impl Unconditional {
    /// A model from a GGUF, or from a checkpoint (a diffusers `DDPMPipeline` folder)
    /// converted first to a temporary f16 GGUF.
    pub fn load(path: &Path, threads: usize) -> Result<Self> {
        if !crate::formats::gguf::is_gguf(path)? {
            let ck = Checkpoint::open(path)?;
            let gguf = crate::convert::to_temporary(&ck, &AtomicBool::new(false), &mut |_| {})?;
            return Self::from_gguf(gguf, threads);
        }
        Self::from_gguf(GgufFile::open(path)?, threads)
    }

    pub fn from_gguf(gguf: GgufFile, threads: usize) -> Result<Self> {
        let config = metadata::read_config(&gguf)?
            .ok_or_else(|| Error::format(&gguf.path, "no sdrs model config in its metadata"))?;
        let refuse = |m: String| Err(Error::arch(&gguf.path, m));
        if !config.is_unconditional() {
            return refuse("a text-to-image model: give it a prompt".into());
        }
        let channels = match &config.vae {
            None => 3,
            Some(v) if v.codebook.is_some() && v.in_channels == 3 => v.latent_channels,
            Some(_) => {
                return refuse(
                    "a model without text over a KL autoencoder: sdrs runs latent diffusion without text over VQ autoencoders (LDM)".into(),
                )
            }
        };
        let u = &config.unet;
        if u.in_channels != channels || u.out_channels != channels {
            return refuse(format!(
                "the UNet must take and give {channels} channels (RGB pixels, or the autoencoder's latents), this one {} and {}",
                u.in_channels, u.out_channels
            ));
        }
        let model_hash = super::model_hash(&gguf);
        Ok(Unconditional {
            defaults: metadata::read_defaults(&gguf),
            gguf,
            config,
            backend: Backend::cpu(threads)?,
            max_memory: None,
            model_hash,
        })
    }

    /// Pixels per latent: the autoencoder's downscale, 1 on pixels.
    fn factor(&self) -> usize {
        self.config.vae.as_ref().map_or(1, VaeConfig::downscale)
    }

    /// The size the UNet was trained at where the file says, else 32 latents per level.
    fn default_size(&self) -> (usize, usize) {
        let side = 32.max(1 << (self.config.unet.channel_mult.len() - 1)) * self.factor();
        (
            self.defaults.width.unwrap_or(side),
            self.defaults.height.unwrap_or(side),
        )
    }

    /// A request with this model's defaults: its size, and its scheduler's sampler and
    /// step count where the file names them (diffusers' DDPM pipeline: 1000 DDPM steps),
    /// else 50 DDIM steps.
    pub fn request(&self) -> Request {
        let (width, height) = self.default_size();
        // A score model runs ScoreSdeVePipeline's 2000 predictor-corrector steps.
        let (sampler, steps) = match self.config.schedule.ve {
            Some(_) => (Sampler::ScoreSdeVe, 2000),
            None => (Sampler::Ddim, 50),
        };
        let mut req = Request {
            width,
            height,
            steps: self.defaults.steps.unwrap_or(steps),
            ..Request::new("")
        };
        req.sampling.sampler = self
            .defaults
            .sampler
            .as_deref()
            .and_then(Sampler::parse)
            .unwrap_or(sampler);
        req
    }

    /// Image sides must halve cleanly at every level of the UNet (and of the
    /// autoencoder).
    pub fn size_multiple(&self) -> usize {
        self.factor() << (self.config.unet.channel_mult.len() - 1)
    }

    fn check(&self, req: &Request, batch: &Batch) -> Result<()> {
        let invalid = |m: String| Err(Error::Invalid(m));
        if !req.prompt.is_empty() || !req.negative.is_empty() {
            return invalid("this model takes no text: it samples without a prompt".into());
        }
        if req.init.is_some() || !req.loras.is_empty() {
            return invalid(
                "this model samples from noise alone: no init image, mask or LoRA".into(),
            );
        }
        if batch.count == 0 {
            return invalid("a batch needs at least one image".into());
        }
        let m = self.size_multiple();
        if req.width == 0
            || req.height == 0
            || !req.width.is_multiple_of(m)
            || !req.height.is_multiple_of(m)
        {
            return invalid(format!(
                "{}x{} pixels: each side must be a positive multiple of {m} for this UNet",
                req.width, req.height
            ));
        }
        match (self.config.unet.style.num_classes, batch.classes.len()) {
            (None, 0) => {}
            (None, _) => return invalid("this model is unconditional: it takes no class".into()),
            (Some(n), 0) => {
                return invalid(format!(
                    "this model is class-conditional: give a class from 0 to {}",
                    n - 1
                ))
            }
            (Some(_), k) if k != 1 && k != batch.count => {
                return invalid(format!(
                    "{k} classes for {} images: give one, or one per image",
                    batch.count
                ))
            }
            (Some(n), _) => {
                if let Some(c) = batch.classes.iter().find(|&&c| c < 0 || c as usize >= n) {
                    return invalid(format!(
                        "class {c} is not one of this model's {n} classes (0 to {})",
                        n - 1
                    ));
                }
            }
        }
        if matches!(req.sampling.sampler, Sampler::Lcm | Sampler::Tcd) {
            return invalid(format!(
                "{} sampling is for consistency-distilled models",
                req.sampling.sampler.info().name
            ));
        }
        let score_model = self.config.schedule.ve.is_some();
        if score_model != (req.sampling.sampler == Sampler::ScoreSdeVe) {
            return invalid(if score_model {
                format!(
                    "this is a score model of the VE SDE: it samples with score_sde_ve, not {}",
                    req.sampling.sampler.info().name
                )
            } else {
                "score_sde_ve sampling is for score models of the VE SDE (NCSN++)".into()
            });
        }
        if req.steps == 0 {
            return invalid("sampling needs at least one step".into());
        }
        Ok(())
    }

    /// The memory a batch needs and the chunk the UNet takes it in: the whole batch
    /// unless the budget (the request's, the model's, else the memory cgroup's) needs
    /// smaller chunks; refused before any work when one image does not fit.
    pub fn plan(&self, req: &Request, batch: &Batch) -> Result<BatchPlan> {
        self.check(req, batch)?;
        let w = Weights::load(&self.gguf, |n| n.starts_with(UNET_PREFIX))?;
        let weights = w.bytes();
        let (lw, lh) = self.latent_size(req);
        let latents = (self.config.unet.in_channels * lw * lh) as u64;
        let pixels = (3 * req.width * req.height) as u64;
        // The sampler's f64 latents: x, the estimate and up to four history entries;
        // then the images.
        let other = 8 * 6 * latents * batch.count as u64 + 3 * pixels * batch.count as u64;
        let need = |chunk: usize| -> Result<Need> {
            let shape = self.shape(req, chunk);
            let compute =
                unet::Runner::measure(&w, &self.config.unet, shape, Attention::Auto, None)?;
            Ok(Need {
                stage: "unet",
                weights,
                compute: compute as u64,
                other,
            })
        };
        let budget = Budget::resolve(req.max_memory.or(self.max_memory));
        let fits = |n: &Need| budget.is_none_or(|b| budget::OVERHEAD + n.total() <= b.bytes);
        let mut chunk = batch.count;
        let mut n = need(chunk)?;
        while !fits(&n) && chunk > 1 {
            chunk = chunk.div_ceil(2);
            n = need(chunk)?;
        }
        let mut needs = vec![n];
        if let Some(v) = &self.config.vae {
            // One image at a time through the decoder.
            let dw = Weights::load(&self.gguf, network::vae::is_decoder)?;
            needs.push(Need {
                stage: "decode",
                weights: dw.bytes(),
                compute: vae::decode_buffer_bytes(&dw, v, lw, lh)? as u64,
                other: 4 * pixels * batch.count as u64,
            });
        }
        let memory = budget::Plan {
            budget,
            needs,
            split_guidance: false,
            tiling: None,
            decode_keep: None,
            stream_unet: false,
        };
        if let (Some(b), Some(n)) = (budget, memory.needs.iter().find(|n| !fits(n))) {
            return Err(Error::OverBudget(format!(
                "this batch cannot fit a budget of {}: one image through the {} needs {} (weights {} + compute {} + buffers {}) and the process {} more",
                budget::mib(b.bytes),
                if n.stage == "unet" { "UNet" } else { "decoder" },
                budget::mib(n.total()),
                budget::mib(n.weights),
                budget::mib(n.compute),
                budget::mib(n.other),
                budget::mib(budget::OVERHEAD)
            )));
        }
        Ok(BatchPlan { memory, chunk })
    }

    /// The UNet's width and height for the request's picture.
    fn latent_size(&self, req: &Request) -> (usize, usize) {
        (req.width / self.factor(), req.height / self.factor())
    }

    fn shape(&self, req: &Request, chunk: usize) -> unet::Shape {
        let (width, height) = self.latent_size(req);
        unet::Shape {
            width,
            height,
            batch: chunk,
            tokens: 1,
            control: false,
        }
    }

    /// Samples `batch.count` images from `req.seed` (its size, steps and sampling
    /// options; no prompt). `req.noise`, when given, is the batch's initial noise.
    pub fn generate(
        &self,
        req: &Request,
        batch: &Batch,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<Vec<Image>> {
        let plan = self.plan(req, batch)?;
        let started = Instant::now();
        let cfg = &self.config;
        let (lw, lh) = self.latent_size(req);
        let per_image = cfg.unet.in_channels * lw * lh;
        let n = batch.count * per_image;
        let mut rng = req.sampling.rng.make(req.seed);
        let noise = match &req.noise {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => {
                return Err(Error::Invalid(format!(
                    "initial noise of {} values for {} images of {per_image}",
                    v.len(),
                    batch.count
                )))
            }
            None => rng.randn(n),
        };

        let w = Weights::load(&self.gguf, |n| n.starts_with(UNET_PREFIX))?;
        let full = unet::Runner::new(
            &w,
            &cfg.unet,
            self.shape(req, plan.chunk),
            Attention::Auto,
            None,
        )?;
        let rest = batch.count % plan.chunk;
        let tail = match rest {
            0 => None,
            r => Some(unet::Runner::new(
                &w,
                &cfg.unet,
                self.shape(req, r),
                Attention::Auto,
                None,
            )?),
        };
        progress(Stage::Sampling {
            unet_flops: full.flops * batch.count as f64 / plan.chunk as f64,
            compute_bytes: full.buffer_bytes,
        });
        let classes: Vec<i32> = match batch.classes.as_slice() {
            [] => Vec::new(),
            [one] => vec![*one; batch.count],
            all => all.to_vec(),
        };
        let mut model = Chunked {
            full: &full,
            tail: tail.as_ref(),
            chunk: plan.chunk,
            per_image,
            classes: &classes,
            backend: &self.backend,
            cancel: req.cancel.as_deref(),
        };
        let mut noise_src = req.sampling.noise(req.seed, rng.as_mut());
        let sampled: Vec<f32> = match &cfg.schedule.ve {
            Some(sde) => {
                let grid = VeGrid::new(sde, req.steps);
                let total = grid.timesteps.len();
                // ScoreSdeVePipeline: randn × init_noise_sigma, in f32.
                let x = noise.iter().map(|&v| (v * sde.sigma_max) as f64).collect();
                let mean = score_sde::sample(
                    &mut model,
                    sde,
                    &grid,
                    batch.count,
                    x,
                    noise_src.as_mut(),
                    &mut |i, _, _| progress(Stage::Step { done: i + 1, total }),
                )?;
                mean.iter().map(|&v| v.clamp(0.0, 1.0) as f32).collect()
            }
            None => {
                let d = req.sampling.training_schedule(cfg);
                let walk = req.sampling.plan(cfg, &d, req.steps.clamp(1, d.len()), 1.0);
                let x = sample::start_latent(&walk, &noise, None);
                let settings = req.sampling.settings(cfg);
                let mut den = sample::Denoiser::new(&mut model, cfg.prediction, &d, &walk)
                    .with_clip(req.sampling.clip(cfg));
                let total = walk.timesteps.len();
                let mut trajectory = sample::sample(
                    &mut den,
                    req.sampling.sampler,
                    &settings,
                    &walk,
                    x,
                    noise_src.as_mut(),
                    &mut |i, _, _| progress(Stage::Step { done: i + 1, total }),
                )?;
                trajectory
                    .pop()
                    .ok_or_else(|| Error::Invalid("no sampling steps".into()))?
            }
        };
        drop((full, tail));
        progress(Stage::Sampled);
        let seconds = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let pixels = match &cfg.vae {
            None => sampled,
            Some(v) => {
                // LDMPipeline divides by the VQModel's scaling factor before its decode.
                let z: Vec<f32> = sampled
                    .iter()
                    .map(|&x| x / v.scaling_factor + v.shift_factor)
                    .collect();
                self.decode(v, &z, (lw, lh), req.cancel.as_deref(), progress)?
            }
        };
        let decode = started.elapsed().as_secs_f64();
        let n = req.width * req.height;
        let images = pixels
            .chunks(3 * n)
            .enumerate()
            .map(|(i, p)| Image {
                width: req.width,
                height: req.height,
                // A VE score model's images are in [0, 1], the others' in [-1, 1].
                rgb: to_rgb8(p, n, cfg.schedule.ve.is_some()),
                parameters: self.infotext(req, batch, &classes, i),
                timings: [0.0, seconds, decode],
            })
            .collect();
        progress(Stage::Decoded);
        Ok(images)
    }

    /// Latents `[B][C][lh][lw]` to pixels `[B][3][H][W]` in [-1, 1] through the model's
    /// VQ autoencoder, as `VQModel.decode` (an error for a pixel-space model).
    pub fn decode_latents(
        &self,
        latents: &[f32],
        size: (usize, usize),
        progress: &mut dyn FnMut(Stage),
    ) -> Result<Vec<f32>> {
        let v = self.config.autoencoder()?;
        self.decode(v, latents, size, None, progress)
    }

    /// `VQModel.decode`: each latent pixel's vector replaced by its nearest codebook
    /// entry, then the decoder; one image at a time.
    fn decode(
        &self,
        v: &VaeConfig,
        latents: &[f32],
        (lw, lh): (usize, usize),
        cancel: Option<&AtomicBool>,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<Vec<f32>> {
        let name = format!("{VAE_PREFIX}quantize.embedding.weight");
        let t = self
            .gguf
            .tensor(&name)
            .ok_or_else(|| Error::format(&self.gguf.path, format!("no `{name}`")))?;
        let c = v.latent_channels;
        let codebook = t.ty.dequantize(&self.gguf.plain(t)?, t.numel() as usize)?;
        if codebook.len() != v.codebook.unwrap_or(0) * c {
            return Err(Error::format(
                &self.gguf.path,
                format!(
                    "`{name}` holds {} values, not {} codes of {c}",
                    codebook.len(),
                    v.codebook.unwrap_or(0)
                ),
            ));
        }
        let w = Weights::load(&self.gguf, network::vae::is_decoder)?;
        // The latents are quantised here, so the graph's own unscaling is the identity.
        let unit = VaeConfig {
            scaling_factor: 1.0,
            shift_factor: 0.0,
            ..v.clone()
        };
        let per = c * lw * lh;
        let total = latents.len() / per;
        let mut out = Vec::with_capacity(total * 3 * lw * lh * v.downscale().pow(2));
        for (i, z) in latents.chunks(per).enumerate() {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::Interrupted);
            }
            let q = quantize(z, &codebook, c);
            out.extend(vae::decode(
                &w,
                &unit,
                Planes::single(&q, lw, lh),
                &self.backend,
            )?);
            progress(Stage::Decoding { done: i + 1, total });
        }
        Ok(out)
    }

    /// A1111-style parameters (no prompt lines: the model takes none).
    fn infotext(&self, req: &Request, batch: &Batch, classes: &[i32], pos: usize) -> String {
        let mut parts = vec![
            format!("Steps: {}", req.steps),
            format!("Sampler: {}", req.sampling.sampler.info().display),
        ];
        if let Some(eta) = req.sampling.eta {
            parts.push(format!("Eta: {eta}"));
        }
        parts.push(format!("Seed: {}", req.seed));
        parts.push(format!("Size: {}x{}", req.width, req.height));
        if !self.model_hash.is_empty() {
            parts.push(format!("Model hash: {}", self.model_hash));
        }
        if let Some(name) = self.gguf.path.file_stem().and_then(|s| s.to_str()) {
            parts.push(format!("Model: {name}"));
        }
        if let Some(c) = classes.get(pos) {
            parts.push(format!("Class: {c}"));
        }
        if batch.count > 1 {
            parts.push(format!("Batch size: {}", batch.count));
            parts.push(format!("Batch pos: {pos}"));
        }
        parts.push(format!("RNG: {}", req.sampling.rng.infotext_name()));
        parts.join(", ")
    }
}

/// Each pixel of planar `[C][N]` latents replaced by its nearest of the `[K][C]`
/// codebook vectors (Euclidean distance; diffusers' `VectorQuantizer`).
fn quantize(z: &[f32], codebook: &[f32], c: usize) -> Vec<f32> {
    let n = z.len() / c;
    let codes: Vec<&[f32]> = codebook.chunks(c).collect();
    let nearest: Vec<usize> = (0..n)
        .into_par_iter()
        .map(|i| {
            let mut best = (f32::INFINITY, 0);
            for (k, code) in codes.iter().enumerate() {
                let d: f32 = code
                    .iter()
                    .enumerate()
                    .map(|(ch, &e)| (z[ch * n + i] - e).powi(2))
                    .sum();
                if d < best.0 {
                    best = (d, k);
                }
            }
            best.1
        })
        .collect();
    let mut out = vec![0f32; z.len()];
    for (i, &k) in nearest.iter().enumerate() {
        for ch in 0..c {
            out[ch * n + i] = codes[k][ch];
        }
    }
    out
}

/// The UNet over the whole batch, in chunks of the planned size.
struct Chunked<'a, 'w> {
    full: &'a unet::Runner<'w>,
    tail: Option<&'a unet::Runner<'w>>,
    chunk: usize,
    per_image: usize,
    classes: &'a [i32],
    backend: &'a Backend,
    cancel: Option<&'a AtomicBool>,
}

impl sample::Model for Chunked<'_, '_> {
    fn predict(&mut self, x: &[f32], timestep: f64) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(x.len());
        for (k, part) in x.chunks(self.chunk * self.per_image).enumerate() {
            if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::Interrupted);
            }
            let images = part.len() / self.per_image;
            let runner = match (images == self.chunk, self.tail) {
                (true, _) => self.full,
                (false, Some(t)) => t,
                (false, None) => {
                    return Err(Error::Invalid(
                        "UNet batch chunk of an unplanned size".into(),
                    ))
                }
            };
            let first = k * self.chunk;
            let t = vec![timestep as f32; images];
            let class = (!self.classes.is_empty()).then(|| &self.classes[first..first + images]);
            out.extend(runner.run(
                &unet::Inputs {
                    x: part,
                    t: &t,
                    class,
                    ..Default::default()
                },
                self.backend,
            )?);
        }
        Ok(out)
    }
}
