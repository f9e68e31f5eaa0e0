//! Unconditional and class-conditional diffusion: the DDPM paper's models (Ho et al.
//! 2020; diffusers' `UNet2DModel`, e.g. `google/ddpm-celebahq-256`) turn noise alone
//! into images, a batch at a time, as diffusers' `DDPMPipeline` and `DDIMPipeline` do:
//! one draw of noise for the whole batch from the seed's generator, then one more per
//! stochastic step, so the torch generator reproduces their images.
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
use crate::config::{Defaults, ModelConfig};
use crate::error::{Error, Result};
use crate::formats::gguf::{metadata, GgufFile};
use crate::formats::Checkpoint;
use crate::ggml::Backend;
use crate::model::{unet, Attention, Weights};
use crate::network::UNET_PREFIX;
use crate::sample::{self, Discrete, Plan, Sampler, ScheduleOpts};

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
        if config.vae.is_some() {
            return refuse(
                "a latent model without text (its VAE is not a VQ autoencoder sdrs runs)".into(),
            );
        }
        let u = &config.unet;
        if u.in_channels != 3 || u.out_channels != 3 {
            return refuse(format!(
                "a pixel-space UNet must take and give 3 channels (RGB), this one {} and {}",
                u.in_channels, u.out_channels
            ));
        }
        let model_hash = gguf
            .get("sd.source.sha256")
            .and_then(|v| v.as_str())
            .map(|h| h.chars().take(10).collect())
            .unwrap_or_default();
        Ok(Unconditional {
            defaults: metadata::read_defaults(&gguf),
            gguf,
            config,
            backend: Backend::cpu(threads)?,
            max_memory: None,
            model_hash,
        })
    }

    /// The size the UNet was trained at where the file says, else 32 pixels per level.
    fn default_size(&self) -> (usize, usize) {
        let side = 32.max(1 << (self.config.unet.channel_mult.len() - 1));
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
        let mut req = Request {
            width,
            height,
            steps: self.defaults.steps.unwrap_or(50),
            ..Request::new("")
        };
        req.sampling.sampler = self
            .defaults
            .sampler
            .as_deref()
            .and_then(Sampler::parse)
            .unwrap_or(Sampler::Ddim);
        req
    }

    /// Image sides must halve cleanly at every level of the UNet.
    pub fn size_multiple(&self) -> usize {
        1 << (self.config.unet.channel_mult.len() - 1)
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
        Ok(())
    }

    fn unet_weights_bytes(&self) -> u64 {
        self.gguf
            .tensors
            .iter()
            .filter(|t| t.name.starts_with(UNET_PREFIX))
            .map(|t| t.nbytes)
            .sum()
    }

    /// The memory a batch needs and the chunk the UNet takes it in: the whole batch
    /// unless the budget (the request's, the model's, else the memory cgroup's) needs
    /// smaller chunks; refused before any work when one image does not fit.
    pub fn plan(&self, req: &Request, batch: &Batch) -> Result<BatchPlan> {
        self.check(req, batch)?;
        let weights = self.unet_weights_bytes();
        let w = Weights::load(&self.gguf, |n| n.starts_with(UNET_PREFIX))?;
        let pixels = (3 * req.width * req.height) as u64;
        // The sampler's f64 latents: x, the estimate and up to four history entries.
        let other = 8 * 6 * pixels * batch.count as u64 + 3 * pixels * batch.count as u64;
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
        let memory = budget::Plan {
            budget,
            needs: vec![n],
            split_guidance: false,
            tiling: None,
            stream_unet: false,
        };
        if let (Some(b), false) = (budget, fits(&memory.needs[0])) {
            return Err(Error::OverBudget(format!(
                "this batch cannot fit a budget of {}: one image through the UNet needs {} (weights {} + compute {} + latents {}) and the process {} more",
                budget::mib(b.bytes),
                budget::mib(memory.needs[0].total()),
                budget::mib(memory.needs[0].weights),
                budget::mib(memory.needs[0].compute),
                budget::mib(memory.needs[0].other),
                budget::mib(budget::OVERHEAD)
            )));
        }
        Ok(BatchPlan { memory, chunk })
    }

    fn shape(&self, req: &Request, chunk: usize) -> unet::Shape {
        unet::Shape {
            width: req.width,
            height: req.height,
            batch: chunk,
            tokens: 1,
        }
    }

    /// The walk the request's sampler takes, as the model's scheduler config lays it
    /// out (`steps_offset`, `set_alpha_to_one`).
    fn sampling_plan(&self, req: &Request, d: &Discrete) -> Plan {
        let sc = &self.config.schedule;
        let steps = req.steps.clamp(1, d.len());
        match req.sampling.sampler {
            Sampler::Ddim => Plan::ddim(
                d,
                steps,
                sc.steps_offset,
                sc.set_alpha_to_one.unwrap_or(true),
            ),
            Sampler::Ddpm => sample::ddpm_plan(d, steps, sc.steps_offset),
            Sampler::Plms => sample::plms_plan_at(
                d,
                steps,
                sc.steps_offset,
                sc.set_alpha_to_one.unwrap_or(false),
            ),
            _ => {
                let opts = ScheduleOpts {
                    sigma_min: req.sampling.sigma_min,
                    sigma_max: req.sampling.sigma_max,
                    xl: false,
                };
                req.sampling.schedule.plan(d, steps, &opts)
            }
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
        let d = Discrete::of(&cfg.schedule);
        let d = if req.sampling.zero_terminal_snr || cfg.zero_terminal_snr {
            d.rescale_zero_terminal_snr()
        } else {
            d
        };
        let walk = self.sampling_plan(req, &d);
        let per_image = 3 * req.width * req.height;
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
        let x = sample::start_latent(&walk, &noise, None);

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
        let settings = sample::Settings {
            variance: cfg.schedule.variance,
            ..req.sampling.eta.map_or_else(
                || sample::Settings::default_for(req.sampling.sampler),
                |eta| sample::Settings {
                    eta,
                    ..Default::default()
                },
            )
        };
        // diffusers' DDPM and DDIM schedulers clip the predicted sample; its others do not.
        let clip = match req.sampling.sampler {
            Sampler::Ddpm | Sampler::Ddim => cfg.schedule.clip_sample.map(f64::from),
            _ => None,
        };
        let mut den = sample::Denoiser::new(&mut model, cfg.prediction, &d, &walk).with_clip(clip);
        let mut brownian;
        let mut iid;
        let noise_src: &mut dyn sample::NoiseSampler = if req.sampling.sampler.brownian() {
            brownian =
                sample::BrownianNoise::new(req.sampling.rng.make(req.seed ^ 0x9E37_79B9_7F4A_7C15));
            &mut brownian
        } else {
            iid = sample::IidNoise(rng.as_mut());
            &mut iid
        };
        let total = walk.timesteps.len();
        let trajectory = sample::sample(
            &mut den,
            req.sampling.sampler,
            &settings,
            &walk,
            x,
            noise_src,
            &mut |i, _, _| progress(Stage::Step { done: i + 1, total }),
        )?;
        let pixels = trajectory
            .last()
            .ok_or_else(|| Error::Invalid("no sampling steps".into()))?;
        progress(Stage::Sampled);
        let seconds = started.elapsed().as_secs_f64();
        let images = pixels
            .chunks(per_image)
            .enumerate()
            .map(|(i, p)| Image {
                width: req.width,
                height: req.height,
                rgb: to_rgb8(p, req.width * req.height, false),
                parameters: self.infotext(req, batch, &classes, i),
                timings: [0.0, seconds, 0.0],
            })
            .collect();
        progress(Stage::Decoded);
        Ok(images)
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
