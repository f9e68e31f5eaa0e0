//! txt2img, img2img and inpainting: prompt → text conditioning → sampled latents →
//! pixels, starting from noise or from an init image ([`Canvas`]).
//!
//! ```no_run
//! use sdrs::pipeline::{Pipeline, Request};
//! let pipe = Pipeline::load("sd15-q4_0.gguf".as_ref())?;
//! let image = pipe.generate(&Request::new("a lighthouse at dawn"), &mut |_| {})?;
//! image.save_png("out.png".as_ref())?;
//! # Ok::<(), sdrs::Error>(())
//! ```
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{Defaults, ModelConfig, TimeId, VaeConfig};
use crate::error::{Error, Result};
use crate::formats::gguf::metadata;
use crate::formats::gguf::GgufFile;
use crate::formats::Checkpoint;
use crate::ggml::Backend;
use crate::model::{vae, Attention, Planes, Weights};
use crate::network::{UNET_PREFIX, VAE_PREFIX};
use crate::prompt::Embeddings;
use crate::sample::{Sampler, Schedule};
use crate::tokenizer::ClipTokenizer;

pub(crate) mod canvas;
pub mod control;
mod guidance;
pub mod hires;
mod infotext;
mod lora;
pub mod options;
mod output;
mod planning;
pub mod preprocess;
mod preview;
mod request;
mod stages;
mod start;
mod text;
pub mod unconditional;
pub mod upscale;

pub use canvas::{Canvas, CanvasOptions};
pub use control::{Control, ControlNet};
use guidance::Guidance;
pub use guidance::{guidance_embedding, label_input};
pub use output::{exif_user_comment, ImageFormat};
pub use request::{
    Decoding, Init, MicroConditioning, Prompting, Request, RngKind, Sampling, FORCED_TILE,
};
pub use start::taesd_encoder_path;

/// Progress of a generation.
#[derive(Clone, Copy, Debug)]
pub enum Stage<'a> {
    TextEncoded,
    /// The UNet graph is built: matrix-product FLOPs of one step (all CFG branches)
    /// and the compute buffer it uses.
    Sampling {
        unet_flops: f64,
        compute_bytes: usize,
    },
    Step {
        done: usize,
        total: usize,
    },
    /// Sampling is over; the decode (VAE or TAESD) starts.
    Sampled,
    /// Tile runs of a tiled VAE decode.
    Decoding {
        done: usize,
        total: usize,
    },
    Decoded,
    /// A picture of the model's current estimate after step `done` of `total`
    /// ([`Request::preview_every`]).
    Preview {
        done: usize,
        total: usize,
        image: &'a Image,
    },
}

/// An 8-bit RGB image with the parameters that made it.
#[derive(Clone)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
    /// A1111-style `parameters` text.
    pub parameters: String,
    /// Seconds per stage: text encoding, sampling, decoding.
    pub timings: [f64; 3],
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Image({}x{}, {:?})",
            self.width, self.height, self.parameters
        )
    }
}

/// Planar `[3][n]` pixels as interleaved 8-bit RGB: in [0, 1] when `unit`, else in
/// [-1, 1] (the VAE's range).
fn to_rgb8(pixels: &[f32], n: usize, unit: bool) -> Vec<u8> {
    let mut rgb = vec![0u8; n * 3];
    for c in 0..3 {
        for i in 0..n {
            let v = pixels[c * n + i];
            let v = if unit { v } else { v / 2.0 + 0.5 };
            rgb[i * 3 + c] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    rgb
}

/// The model hash A1111 shows: the first ten hex digits of the source file's SHA-256
/// that `sdrs convert` recorded (empty for files without it).
fn model_hash(gguf: &GgufFile) -> String {
    gguf.get("sd.source.sha256")
        .and_then(|v| v.as_str())
        .map(|h| h.chars().take(10).collect())
        .unwrap_or_default()
}

/// A run default parsed by `parse`; a name this version does not know is advice it
/// cannot follow, so it is skipped with a warning rather than refused.
fn known_default<T>(
    file: &Path,
    what: &str,
    name: Option<&str>,
    parse: impl Fn(&str) -> Option<T>,
) -> Option<T> {
    let name = name?;
    let parsed = parse(name);
    if parsed.is_none() {
        log::warn!(
            "{}: ignoring unknown default {what} `{name}`",
            file.display()
        );
    }
    parsed
}

/// A model ready to generate: the GGUF mapped, its config and tokenizer read.
pub struct Pipeline {
    gguf: GgufFile,
    pub config: ModelConfig,
    tokenizer: ClipTokenizer,
    backend: Backend,
    model_hash: String,
    /// How the UNet computes attention (a speed/memory trade-off, same numbers).
    pub attention: Attention,
    /// Copy the UNet's q4_0/q4_K matrices into ggml's repack layout at each run
    /// (faster GEMMs, their size in anonymous memory) instead of using them mapped.
    pub repack: bool,
    /// Memory budget in bytes: runs are planned to fit it (guidance split into two
    /// batches, the VAE decode tiled) or refused before any work. `None` plans for
    /// the memory cgroup's limit where the process has one, else runs unconstrained.
    pub max_memory: Option<u64>,
    /// How the model is meant to be run (size, sampler, steps, guidance) where the
    /// file says; front ends use it for options the user leaves unset.
    pub defaults: Defaults,
    /// On a GPU, every stage's weights in its memory, uploaded once by
    /// [`Pipeline::set_backend`] (on the CPU they are used from the mapping instead).
    device: Option<DeviceWeights>,
    /// Textual-inversion embeddings, triggered by their words in prompts.
    pub embeddings: Embeddings,
    /// A VAE from its own file ([`Pipeline::set_vae`]) in place of the model's.
    vae_file: Option<Weights<'static>>,
    /// The model's autoencoder (a text-to-image model always has one).
    vae_config: VaeConfig,
}

struct DeviceWeights {
    text: Weights<'static>,
    unet: Weights<'static>,
    vae: Weights<'static>,
}

/// A stage's weights: mapped for this run, or kept in device memory.
enum StageWeights<'a> {
    Mapped(Box<Weights<'a>>),
    Kept(&'a Weights<'static>),
}

impl<'a> std::ops::Deref for StageWeights<'a> {
    type Target = Weights<'a>;
    fn deref(&self) -> &Weights<'a> {
        match self {
            StageWeights::Mapped(w) => w,
            StageWeights::Kept(w) => w,
        }
    }
}

impl Pipeline {
    pub fn load(path: &Path) -> Result<Pipeline> {
        Self::load_with_threads(
            path,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )
    }

    pub fn load_with_threads(path: &Path, threads: usize) -> Result<Pipeline> {
        Self::open(path, threads, &AtomicBool::new(false), &mut |_| {})
    }

    /// A model from a GGUF (used in place from its mapping), or from a checkpoint
    /// (`.safetensors`, `.ckpt`, a diffusers folder) converted first to a temporary
    /// f16 GGUF ([`crate::convert::to_temporary`]; `progress` follows that
    /// conversion, which `cancel` stops).
    pub fn open(
        path: &Path,
        threads: usize,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(&crate::convert::Progress),
    ) -> Result<Pipeline> {
        if !crate::formats::gguf::is_gguf(path)? {
            let ck = Checkpoint::open(path)?;
            let gguf = crate::convert::to_temporary(&ck, cancel, progress)?;
            let config = metadata::read_config(&gguf)?
                .ok_or_else(|| Error::format(path, "no model config after conversion"))?;
            return Self::from_gguf(gguf, config, threads);
        }
        Self::load_gguf(path, threads)
    }

    /// A model from a GGUF only (sdrs' own, or another writer's such as
    /// stable-diffusion.cpp's, whose architecture is recognised from its tensors).
    pub fn load_gguf(path: &Path, threads: usize) -> Result<Pipeline> {
        let gguf = GgufFile::open(path)?;
        let config = match metadata::read_config(&gguf)? {
            Some(c) => c,
            None => Checkpoint::open(path)?.model_config()?,
        };
        Self::from_gguf(gguf, config, threads)
    }

    /// The demo model built into the binary (`models/demo`): a tiny SD-architecture
    /// model of coloured shapes that needs no download.
    #[cfg(feature = "demo-model")]
    pub fn demo(threads: usize) -> Result<Pipeline> {
        let gguf = crate::demo::gguf()?;
        let config = metadata::read_config(&gguf)?
            .ok_or_else(|| Error::format(&gguf.path, "no model config in metadata"))?;
        Self::from_gguf(gguf, config, threads)
    }

    fn from_gguf(gguf: GgufFile, config: ModelConfig, threads: usize) -> Result<Pipeline> {
        let path = gguf.path.clone();
        let path = path.as_path();
        if config.is_unconditional() {
            return Err(Error::arch(
                path,
                "an unconditional or class-conditional model (it has no text encoder): run it with `sdrs generate` without a prompt, or sdrs::pipeline::unconditional",
            ));
        }
        check_conditioning(&config).map_err(|e| Error::arch(path, e))?;
        let vae_config = config
            .autoencoder()
            .map_err(|e| Error::arch(path, e.to_string()))?
            .clone();
        let vocab =
            metadata::read_tokenizer(&gguf).map_or_else(crate::vocab::ClipVocab::embedded, Ok)?;
        let tokenizer = ClipTokenizer::new(&vocab)?;
        let model_hash = model_hash(&gguf);
        let defaults = metadata::read_defaults(&gguf);
        Ok(Pipeline {
            gguf,
            config,
            tokenizer,
            backend: Backend::cpu(threads)?,
            model_hash,
            attention: Attention::Auto,
            repack: true,
            max_memory: None,
            defaults,
            device: None,
            embeddings: Embeddings::default(),
            vae_file: None,
            vae_config,
        })
    }

    /// Runs every stage on `backend` from now on (a GPU: [`Backend::open`]). On a GPU,
    /// the weights of every stage are uploaded here, once, and stay in its memory.
    pub fn set_backend(&mut self, backend: Backend) -> Result<()> {
        self.device = None;
        if backend.gpu_name().is_some() {
            let text = Weights::upload(&self.gguf, |n| self.is_text(n), &backend)?;
            let unet = Weights::upload(&self.gguf, |n| n.starts_with(UNET_PREFIX), &backend)?;
            let vae = Weights::upload(&self.gguf, |n| n.starts_with(VAE_PREFIX), &backend)?;
            self.device = Some(DeviceWeights { text, unet, vae });
        }
        self.backend = backend;
        Ok(())
    }

    /// The weights of one stage: its tensors mapped (`keep`, with `repack` choosing
    /// matrices to copy into ggml's repacked layout), or the GPU's copies.
    fn stage<'a>(
        &'a self,
        keep: impl Fn(&str) -> bool,
        repack: impl Fn(&str) -> bool,
        kept: impl Fn(&'a DeviceWeights) -> &'a Weights<'static>,
    ) -> Result<StageWeights<'a>> {
        Ok(match &self.device {
            Some(d) => StageWeights::Kept(kept(d)),
            None => {
                StageWeights::Mapped(Box::new(Weights::load_repacked(&self.gguf, keep, repack)?))
            }
        })
    }

    /// Encodes and decodes with the VAE of `path` (a fine-tuned VAE kept beside the
    /// model: original or diffusers naming, any float type) instead of the model's own.
    /// Its weights are held in f32 where the pipeline computes.
    pub fn set_vae(&mut self, path: &Path) -> Result<()> {
        let tensors = crate::formats::vae_file::open(path, &self.vae_config)?;
        let mut list = Vec::with_capacity(tensors.len());
        for t in &tensors {
            list.push((
                t.name.clone(),
                t.shape.iter().rev().copied().collect(),
                t.read_f32()?,
            ));
        }
        self.vae_file = Some(Weights::from_f32(path, list, &self.backend)?);
        Ok(())
    }

    /// The VAE's weights: from [`Pipeline::set_vae`]'s file, else the model's.
    fn vae_weights(&self) -> Result<StageWeights<'_>> {
        match &self.vae_file {
            Some(w) => Ok(StageWeights::Kept(w)),
            None => self.stage(|n| n.starts_with(VAE_PREFIX), |_| false, |d| &d.vae),
        }
    }

    /// The GPU the pipeline runs on (`Vulkan0`), or `None` for the CPU.
    pub fn gpu_name(&self) -> Option<&str> {
        self.backend.gpu_name()
    }

    /// Times every ggml node of the following runs (see [`Backend::set_profiling`]).
    pub fn set_profiling(&self, on: bool) {
        self.backend.set_profiling(on);
    }

    /// Node timings recorded since profiling started or the last call.
    pub fn take_profile(&self) -> Vec<crate::ggml::NodeTiming> {
        self.backend.take_profile()
    }

    /// A request for `prompt` with the model's own defaults (image size, sampler,
    /// schedule, steps, guidance) where its file gives them, [`Request::new`]'s elsewhere.
    pub fn request(&self, prompt: &str) -> Request {
        let d = &self.defaults;
        let base = Request::new(prompt);
        let sampler = known_default(
            &self.gguf.path,
            "sampler",
            d.sampler.as_deref(),
            Sampler::parse,
        );
        let schedule = known_default(
            &self.gguf.path,
            "scheduler",
            d.scheduler.as_deref(),
            Schedule::parse,
        );
        Request {
            width: d.width.unwrap_or(base.width),
            height: d.height.unwrap_or(base.height),
            steps: d.steps.unwrap_or(base.steps),
            cfg_scale: d.cfg_scale.unwrap_or(base.cfg_scale),
            sampling: Sampling {
                sampler: sampler.unwrap_or(base.sampling.sampler),
                schedule: schedule.unwrap_or(base.sampling.schedule),
                ..base.sampling
            },
            ..base
        }
    }

    /// What image sides must be multiples of for this model.
    pub fn size_multiple(&self) -> usize {
        self.vae_config.downscale() << (self.config.unet.channel_mult.len() - 1)
    }

    /// Latent size for an image size, or an error that says what is allowed.
    pub fn latent_size(&self, width: usize, height: usize) -> Result<(usize, usize)> {
        let (f, m) = (self.vae_config.downscale(), self.size_multiple());
        if width == 0 || height == 0 || !width.is_multiple_of(m) || !height.is_multiple_of(m) {
            return Err(Error::Invalid(format!("image size {width}x{height}: width and height must be positive multiples of {m} for this model (the VAE divides by {f}, the UNet halves {} more times)", self.config.unet.channel_mult.len() - 1)));
        }
        Ok((width / f, height / f))
    }

    /// What an inpainting UNet (latent + mask + masked-image latent channels) gets
    /// for plain txt2img: the whole image masked (mask 1) over a neutral grey image
    /// (0 in [-1, 1]), as A1111 conditions inpainting models without an init image.
    /// `None` for ordinary UNets.
    fn image_conditioning(&self, lw: usize, lh: usize) -> Result<Option<Vec<f32>>> {
        let zc = self.vae_config.latent_channels;
        match self.config.unet.in_channels {
            c if c == zc => Ok(None),
            c if c == 2 * zc + 1 => {
                let f = self.vae_config.downscale();
                let w = self.vae_weights()?;
                let grey = vec![0.0f32; 3 * lw * f * lh * f];
                let masked = vae::encode(&w, &self.vae_config, Planes::single(&grey, lw * f, lh * f), &self.backend)?;
                let mut cond = vec![1.0f32; lw * lh];
                cond.extend_from_slice(&masked);
                Ok(Some(cond))
            }
            c => Err(Error::Invalid(format!(
                "the UNet takes {c} input channels; sdrs runs {zc} (txt2img) and {} (inpainting: latent, mask, masked image)",
                2 * zc + 1
            ))),
        }
    }

    /// Whether `req` runs both guidance branches (LCM-distilled UNets take the scale
    /// as an embedding instead and run the conditional pass alone, as diffusers'
    /// LatentConsistencyModelPipeline).
    fn guided(&self, req: &Request) -> bool {
        req.cfg_scale != 1.0 && self.config.unet.time_cond_proj_dim.is_none()
    }

    /// The latent size of a valid request, or what is wrong with it.
    fn validate(&self, req: &Request) -> Result<(usize, usize)> {
        if req.steps == 0 || req.steps > 1000 {
            return Err(Error::Invalid(format!(
                "steps must be between 1 and 1000, not {}",
                req.steps
            )));
        }
        for te in &self.config.text_encoders {
            self.encoder_for(te, req)?;
        }
        for c in &req.controls {
            c.validate()?;
            c.net.check(&self.config)?;
        }
        if let Some(c) = req.canvas() {
            if (c.width, c.height) != (req.width, req.height) {
                return Err(Error::Invalid(format!(
                    "the init image is {}x{} but the request is for {}x{}",
                    c.width, c.height, req.width, req.height
                )));
            }
            let s = req.strength();
            if !(s > 0.0 && s <= 1.0) {
                return Err(Error::Invalid(format!(
                    "strength must be in (0, 1], not {s}"
                )));
            }
            if (req.steps as f64 * s) < 1.0 && !req.sampling.sampler.has_own_timesteps() {
                return Err(Error::Invalid(format!(
                    "strength {s} of {} steps leaves no step to run: raise either",
                    req.steps
                )));
            }
        }
        self.latent_size(req.width, req.height)
    }

    /// Whether tensor `name` belongs to one of the text encoders.
    fn is_text(&self, name: &str) -> bool {
        self.config
            .text_encoders
            .iter()
            .any(|t| name.starts_with(&t.prefix))
    }

    /// `label_emb`'s input for each branch (`[uncond, cond]` when guided): see [`label_input`].
    fn vector_conditioning(&self, req: &Request, pooled: &[f32], guided: bool) -> Result<Vec<f32>> {
        let u = &self.config.unet;
        let (w, h) = (req.width as f32, req.height as f32);
        let (ow, oh) = req
            .micro
            .original_size
            .map_or((w, h), |(a, b)| (a as f32, b as f32));
        let (top, left) = (
            req.micro.crop_top_left.0 as f32,
            req.micro.crop_top_left.1 as f32,
        );
        let branches = if guided { 2 } else { 1 };
        let d = pooled.len() / branches;
        let mut y = Vec::new();
        for b in 0..branches {
            let negative = guided && b == 0;
            let values: Vec<f32> = u
                .time_ids
                .iter()
                .flat_map(|id| match id {
                    TimeId::OriginalSize => vec![oh, ow],
                    TimeId::CropTopLeft => vec![top, left],
                    TimeId::TargetSize => vec![h, w],
                    TimeId::AestheticScore => vec![if negative {
                        req.micro.negative_aesthetic_score
                    } else {
                        req.micro.aesthetic_score
                    }],
                })
                .collect();
            y.extend(label_input(u, &pooled[b * d..(b + 1) * d], &values)?);
        }
        Ok(y)
    }

    /// Plans the run ([`Pipeline::plan`]), then runs it.
    pub fn generate(&self, req: &Request, progress: &mut dyn FnMut(Stage)) -> Result<Image> {
        let memory = self.plan(req)?;
        log::info!("memory plan:\n{}", memory.summary());
        self.generate_planned(req, &memory, progress)
    }
}

/// A request's prompts as the UNet takes them, branch by branch (the negative
/// prompt first when guided).
pub struct Conditioning {
    /// `[B][T][context_dim]`.
    pub context: Vec<f32>,
    /// `[B][pooled]`, for `label_emb` UNets.
    pub pooled: Option<Vec<f32>>,
    /// T: 77 per window.
    pub tokens: usize,
}

/// Whether the text encoders can feed the UNet: hidden sizes summing to its context
/// width, one token count, and a pooled embedding where it has a label embedding.
fn check_conditioning(cfg: &ModelConfig) -> std::result::Result<(), String> {
    let tes = &cfg.text_encoders;
    let first = tes.first().ok_or("the model has no text encoder")?;
    if tes.iter().any(|t| t.max_positions != first.max_positions) {
        return Err("its text encoders take different token counts".into());
    }
    let width: usize = tes.iter().map(|t| t.hidden_size).sum();
    if width != cfg.unet.context_dim {
        return Err(format!(
            "the UNet attends to {}-wide text but its text encoders give {width}",
            cfg.unet.context_dim
        ));
    }
    if cfg.unet.adm_in_channels.is_some() {
        let last = tes.last().ok_or("no text encoder")?;
        if last.projection_dim.is_none() {
            return Err(format!("the UNet's label embedding takes a pooled text embedding, but `{}` has no text_projection", last.prefix));
        }
    }
    cfg.check_label_width()
}

/// [`Error::Interrupted`] once `flag` is set.
fn check_cancel(flag: Option<&AtomicBool>) -> Result<()> {
    match flag {
        Some(f) if f.load(Ordering::Relaxed) => Err(Error::Interrupted),
        _ => Ok(()),
    }
}
