//! What to generate: a [`Request`], its options grouped by the stage they steer.
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::Canvas;
use crate::config::ModelConfig;
use crate::model::vae;
use crate::prompt::Emphasis;
use crate::sample::{
    CudaRng, Discrete, NativeRng, Plan, Rng, Sampler, Schedule, ScheduleOpts, Settings, Spacing,
    TorchRng,
};

/// What to generate.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: String,
    pub negative: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub cfg_scale: f32,
    pub seed: u64,
    /// How the sampler walks from noise to the image.
    pub sampling: Sampling,
    /// How prompts become conditioning.
    pub prompting: Prompting,
    /// SDXL's size, crop and aesthetic-score conditioning.
    pub micro: MicroConditioning,
    /// LoRAs applied at run time, with their multipliers (the model file is untouched).
    pub loras: Vec<(PathBuf, f32)>,
    /// img2img / inpainting: the picture to start from; `None` starts from noise.
    pub init: Option<Init>,
    /// ControlNets steering the run, each with its conditioning image; their
    /// residuals add up.
    pub controls: Vec<super::Control>,
    /// How latents become pixels.
    pub decoding: Decoding,
    /// Memory budget in bytes for this run, in place of [`super::Pipeline::max_memory`].
    pub max_memory: Option<u64>,
    /// Explicit initial noise (`[4][h/8][w/8]`, unit Gaussian) instead of the seed's.
    pub noise: Option<Vec<f32>>,
    /// Set from any thread to stop the run: it ends with
    /// [`Error::Interrupted`](crate::Error::Interrupted) at the next stage or UNet
    /// evaluation (within one step), leaving nothing half written.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// How the sampler walks from noise to the image.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub sampler: Sampler,
    /// σ schedule for samplers that take one (DDIM, PLMS, LCM and TCD have their own grid).
    pub schedule: Schedule,
    /// Noise scale of stochastic steps; `None` takes the sampler's default
    /// ([`crate::sample::Settings::default_for`]).
    pub eta: Option<f64>,
    /// Overrides of the model's σ range.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Which generator turns the seed into noise.
    pub rng: RngKind,
    /// Guidance rescale φ (Lin et al. 2024, sec. 3.4): 0 is plain CFG.
    pub guidance_rescale: f32,
    /// Rescale the training schedule to zero terminal SNR even when the model's config
    /// does not say it was trained that way (models whose config says so always are).
    pub zero_terminal_snr: bool,
}

impl Sampling {
    /// The model's training schedule, rescaled to zero terminal SNR where the model
    /// was trained so or the request asks.
    pub(super) fn training_schedule(&self, cfg: &ModelConfig) -> Discrete {
        let d = Discrete::of(&cfg.schedule);
        if self.zero_terminal_snr || cfg.zero_terminal_snr {
            d.rescale_zero_terminal_snr()
        } else {
            d
        }
    }

    /// The points the sampler visits over `steps` (the tail of them for `strength` < 1),
    /// on the model's own grid where the sampler has one.
    pub(super) fn plan(
        &self,
        cfg: &ModelConfig,
        d: &Discrete,
        steps: usize,
        strength: f64,
    ) -> Plan {
        // Align Your Steps has a table per model family; SDXL's is for size-conditioned UNets.
        let opts = ScheduleOpts {
            sigma_min: self.sigma_min,
            sigma_max: self.sigma_max,
            xl: !cfg.unet.time_ids.is_empty(),
        };
        crate::sample::plan_for(
            self.sampler,
            self.schedule,
            d,
            steps,
            &opts,
            strength,
            &cfg.schedule,
        )
    }

    /// The sampler's noise scale (`eta`, else its default) and the model's DDPM variance.
    pub(super) fn settings(&self, cfg: &ModelConfig) -> Settings {
        Settings {
            eta: self.eta.unwrap_or(Settings::default_for(self.sampler).eta),
            variance: cfg.schedule.variance,
        }
    }

    /// The range diffusers' DDPM and DDIM schedulers clip the predicted sample to, where
    /// the model's config asks (its other schedulers never clip).
    pub(super) fn clip(&self, cfg: &ModelConfig) -> Option<f64> {
        match self.sampler {
            Sampler::Ddpm | Sampler::Ddim => cfg.schedule.clip_sample.map(f64::from),
            _ => None,
        }
    }

    /// Where the stochastic steps draw their noise: SDE samplers from a Brownian path
    /// with its own generator (seeded from `seed`), so their noise does not depend on
    /// how steps split intervals; the others from `rng`, after the initial noise, in
    /// the order diffusers draws.
    pub(super) fn noise<'a>(
        &self,
        seed: u64,
        rng: &'a mut dyn Rng,
    ) -> Box<dyn crate::sample::NoiseSampler + 'a> {
        if self.sampler.brownian() {
            Box::new(crate::sample::BrownianNoise::new(
                self.rng.make(seed ^ 0x9E37_79B9_7F4A_7C15),
            ))
        } else {
            Box::new(crate::sample::IidNoise(rng))
        }
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            sampler: Sampler::Euler,
            schedule: Schedule::Discrete(Spacing::Linspace),
            eta: None,
            sigma_min: None,
            sigma_max: None,
            rng: RngKind::Torch,
            guidance_rescale: 0.0,
            zero_terminal_snr: false,
        }
    }
}

/// How prompts become conditioning.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompting {
    /// CLIP skip in A1111's numbering: 1 takes the model's own layer, 2 the one before
    /// it, and so on ([`super::Pipeline::encoder_for`]).
    pub clip_skip: usize,
    /// What prompt weights do.
    pub emphasis: Emphasis,
    /// Where the prompt's `<lora:NAME:MULTIPLIER>` tags find `NAME.safetensors` (or
    /// `.pt`, `.ckpt`, `.bin`).
    pub lora_dir: Option<PathBuf>,
}

impl Default for Prompting {
    fn default() -> Self {
        Prompting {
            clip_skip: 1,
            emphasis: Emphasis::Original,
            lora_dir: None,
        }
    }
}

/// SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2) and the refiner's
/// aesthetic score.
#[derive(Clone, Debug, PartialEq)]
pub struct MicroConditioning {
    /// The "original" image size (width, height) the model is told the picture was cut
    /// from [default: the output size, as diffusers].
    pub original_size: Option<(usize, usize)>,
    /// Crop conditioning, (top, left) [default: (0, 0), an uncropped picture].
    pub crop_top_left: (usize, usize),
    /// The refiner's aesthetic-score conditioning, for the prompt and the negative prompt.
    pub aesthetic_score: f32,
    pub negative_aesthetic_score: f32,
}

impl Default for MicroConditioning {
    fn default() -> Self {
        MicroConditioning {
            original_size: None,
            crop_top_left: (0, 0),
            // diffusers' StableDiffusionXLImg2ImgPipeline defaults.
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

/// img2img / inpainting: the picture to start from.
///
/// ```no_run
/// use std::sync::Arc;
/// use sdrs::pipeline::{Canvas, CanvasOptions, Init, Pipeline, Request};
/// let pipe = Pipeline::load("sd15-q4_0.gguf".as_ref())?;
/// let opts = CanvasOptions { multiple: pipe.size_multiple(), ..Default::default() };
/// let canvas = Arc::new(Canvas::open("in.png".as_ref(), None, &opts)?);
/// let (width, height) = (canvas.width, canvas.height);
/// let init = Init { strength: Some(0.75), ..Init::new(canvas) };
/// let req = Request { width, height, init: Some(init), ..pipe.request("a red door") };
/// pipe.generate(&req, &mut |_| {})?.save_png("door.png".as_ref())?;
/// # Ok::<(), sdrs::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Init {
    /// The picture (and its mask), at the request's size.
    pub canvas: Arc<Canvas>,
    /// How much of it is repainted: sampling runs the last ⌊steps·strength⌋ steps from
    /// the image noised to that point. `None`: 0.8 for img2img, 1 for inpainting
    /// (diffusers' pipeline defaults).
    pub strength: Option<f64>,
    /// Inpainting: paste the init image back outside the (blurred) mask after the
    /// decode, so unmasked pixels come back unchanged (as A1111 does); off gives the
    /// decoded image everywhere, as diffusers' inpaint pipeline returns it.
    pub overlay: bool,
    /// A latent to start from in place of encoding `canvas` (`[C][H/f][W/f]`, in the
    /// UNet's units: the VAE's latent times its scaling factor): the hires fix's
    /// latent upscale. `canvas` then only gives the size.
    pub latent: Option<Arc<Vec<f32>>>,
}

impl Init {
    /// `canvas` at the default strength, overlaid.
    pub fn new(canvas: Arc<Canvas>) -> Self {
        Init {
            canvas,
            strength: None,
            overlay: true,
            latent: None,
        }
    }
}

/// How latents become pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoding {
    /// Decode with a TAESD-family decoder (`.pth`) instead of the VAE.
    pub taesd: Option<PathBuf>,
    /// Encode and decode images larger than [`FORCED_TILE`] latents in overlapping
    /// tiles even when the whole image would fit the memory budget (the planner tiles
    /// on its own when it would not).
    pub vae_tiling: bool,
    /// Where a tiled KL VAE's GroupNorms take their statistics: the whole image's (the
    /// default: the pieces equal the whole run) or each tile's (one pass, as diffusers'
    /// `enable_tiling`; tones may drift between tiles).
    pub vae_tile_stats: vae::TileStats,
    /// Report a preview of the image forming ([`super::Stage::Preview`]) every this
    /// many steps and after the last; 0 for none.
    pub preview_every: usize,
}

impl Default for Decoding {
    fn default() -> Self {
        Decoding {
            taesd: None,
            vae_tiling: false,
            vae_tile_stats: vae::TileStats::Image,
            preview_every: 0,
        }
    }
}

/// The tiles `vae_tiling` asks for: 64 latents (512 pixels) a side, overlapping by a
/// quarter (diffusers' `enable_tiling` sizes).
pub const FORCED_TILE: vae::Tiling = vae::Tiling {
    tile_w: 64,
    tile_h: 64,
    overlap: 16,
};

impl Request {
    pub fn new(prompt: &str) -> Self {
        Request {
            prompt: prompt.into(),
            negative: String::new(),
            width: 512,
            height: 512,
            steps: 20,
            cfg_scale: 7.0,
            seed: 42,
            sampling: Sampling::default(),
            prompting: Prompting::default(),
            micro: MicroConditioning::default(),
            loras: Vec::new(),
            decoding: Decoding::default(),
            max_memory: None,
            noise: None,
            cancel: None,
            init: None,
            controls: Vec::new(),
        }
    }

    /// The strength in effect ([`Init::strength`]); 1 without an init image.
    pub fn strength(&self) -> f64 {
        match &self.init {
            None => 1.0,
            Some(Init {
                strength: Some(s), ..
            }) => *s,
            Some(i) if i.canvas.mask.is_some() => 1.0,
            Some(_) => 0.8,
        }
    }

    /// The init image, if any.
    pub fn canvas(&self) -> Option<&Canvas> {
        self.init.as_ref().map(|i| i.canvas.as_ref())
    }

    /// Sets the image size as every front end settles it: the init picture's (already
    /// fitted to what was asked), else each side given, else the one the request has.
    pub fn settle_size(&mut self, (width, height): (Option<usize>, Option<usize>)) {
        (self.width, self.height) = match self.canvas() {
            Some(c) => (c.width, c.height),
            None => (width.unwrap_or(self.width), height.unwrap_or(self.height)),
        };
    }
}

/// How a seed becomes Gaussian noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RngKind {
    /// `torch.randn` on a CPU generator, bit for bit: a seed gives diffusers' image
    /// (A1111's "CPU" generator source).
    Torch,
    /// `torch.randn` on a CUDA device (Philox), bit for bit, computed on the CPU:
    /// the noise of A1111's default "GPU" source on NVIDIA cards, of its "NV" source,
    /// and of stable-diffusion.cpp's `--rng cuda`, so their seeds give their images.
    Cuda,
    /// sdrs' own fast generator (SplitMix64 + Box–Muller).
    Native,
}

impl RngKind {
    /// The names [`RngKind::parse`] takes first (each kind also has A1111's).
    pub const NAMES: &'static [&'static str] = &["torch", "cuda", "native"];

    /// `torch`/`cpu`, `cuda`/`gpu`/`nv`/`philox`, `native` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "torch" | "cpu" => Some(RngKind::Torch),
            "cuda" | "gpu" | "nv" | "philox" => Some(RngKind::Cuda),
            "native" => Some(RngKind::Native),
            _ => None,
        }
    }

    pub(super) fn make(self, seed: u64) -> Box<dyn Rng> {
        match self {
            RngKind::Torch => Box::new(TorchRng::new(seed)),
            RngKind::Cuda => Box::new(CudaRng::new(seed)),
            RngKind::Native => Box::new(NativeRng::new(seed)),
        }
    }
}
