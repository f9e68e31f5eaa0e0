//! Architecture configuration: the data that describes a Stable Diffusion model.
//!
//! Everything the executor needs to know about a network's shape lives here and
//! travels inside the GGUF as metadata (see `formats::gguf::metadata`). Presets give the
//! published configurations; `formats::detect` recovers a config from tensor
//! names and shapes; `formats::layout` expands a config into the exact tensor list
//! of the original single-file layout.

/// What the UNet's output means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
    Sample,
}

impl Prediction {
    pub fn as_str(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v_prediction",
            Prediction::Sample => "sample",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "epsilon" | "eps" => Some(Prediction::Epsilon),
            "v_prediction" | "v" => Some(Prediction::V),
            "sample" => Some(Prediction::Sample),
            _ => None,
        }
    }
}

/// UNet (LDM `openaimodel.UNetModel`) configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    pub channel_mult: Vec<usize>,
    /// Per level (shallowest first), per ResNet: the transformer depth after that
    /// ResNet (0 = no spatial transformer). A level has a downsampler unless it is last.
    pub down_blocks: Vec<Vec<usize>>,
    /// Per level in the order the decoder runs (deepest first), per ResNet: transformer depth.
    /// A level has an upsampler unless it is the last one run.
    pub up_blocks: Vec<Vec<usize>>,
    /// Transformer depth of the middle block; `None` when the middle block was removed
    /// (distilled UNets), `Some(0)` for ResNets only.
    pub mid_depth: Option<usize>,
    /// Attention heads: either a fixed count per layer (SD 1.x) ...
    pub num_heads: Option<usize>,
    /// ... or a fixed head width (SD 2.x, SDXL).
    pub head_dim: Option<usize>,
    pub context_dim: usize,
    /// `proj_in`/`proj_out` are linear layers (SD 2.x, SDXL) instead of 1x1 convolutions.
    pub linear_proj: bool,
    /// Input width of `label_emb` (SDXL: pooled text + size/crop embeddings).
    pub adm_in_channels: Option<usize>,
    /// Width of the guidance embedding of LCM-distilled UNets (`time_embed.cond_proj.weight`,
    /// `[model_channels, dim]`, added to the sinusoidal timestep features); absent otherwise.
    pub time_cond_proj_dim: Option<usize>,
    /// What follows the pooled text embedding in `label_emb`'s input (SDXL: original size,
    /// crop top-left, target size; its refiner: original size, crop, aesthetic score),
    /// each value through a sinusoidal embedding `time_id_dim` wide. Empty without `label_emb`.
    pub time_ids: Vec<TimeId>,
    pub time_id_dim: usize,
    /// What diffusers' `UNet2DModel` (the DDPM/LDM papers' networks) does differently
    /// from LDM's text-conditioned UNet; SD's choices by default.
    pub style: UnetStyle,
}

/// What fills a UNet level's attention slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    /// LDM `SpatialTransformer` blocks with cross-attention to the text (SD).
    Transformer,
    /// One self-attention block over the pixels, GroupNorm first, q/k/v/out projections
    /// with biases, added to its input (DDPM's `AttnBlock`; diffusers `AttnDownBlock2D`).
    /// A depth above 0 means one such block.
    SelfAttention,
}

impl AttentionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AttentionKind::Transformer => "transformer",
            AttentionKind::SelfAttention => "self_attention",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [AttentionKind::Transformer, AttentionKind::SelfAttention]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// How the UNet sees the noise level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeEmbedding {
    /// Sinusoidal features of the timestep (Vaswani et al. 2017; DDPM, LDM, SD).
    Positional,
    /// Random Fourier features of log σ, `[sin 2πw·log σ, cos 2πw·log σ]` with fixed
    /// weights w (`time_proj.weight`), the noise-conditional score models' embedding
    /// (Song et al. 2021, "Score-Based Generative Modeling through SDEs", NCSN++;
    /// diffusers' `GaussianFourierProjection`). Their UNet's output is divided by σ.
    Fourier,
}

impl TimeEmbedding {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeEmbedding::Positional => "positional",
            TimeEmbedding::Fourier => "fourier",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [TimeEmbedding::Positional, TimeEmbedding::Fourier]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// The UNet's details that SD fixes and the pixel-space and class-conditional UNets of
/// the DDPM and LDM papers set otherwise (diffusers `UNet2DModel`'s options).
#[derive(Clone, Debug, PartialEq)]
pub struct UnetStyle {
    pub attention: AttentionKind,
    /// GroupNorm groups of the ResNets, attention blocks and output norm; `None`: each
    /// norm takes min(channels / 4, 32) (diffusers' `norm_num_groups: null`, NCSN++).
    pub norm_groups: Option<usize>,
    /// GroupNorm epsilon of the ResNets (and of self-attention blocks).
    pub norm_eps: f32,
    /// The sinusoidal timestep features are `[cos, sin]` (else `[sin, cos]`).
    pub flip_sin_to_cos: bool,
    /// Frequencies are `exp(-ln(10000) i / (half - freq_shift))` (DDPM's TensorFlow
    /// original divides by `half - 1`).
    pub freq_shift: f32,
    /// Padding of the stride-2 downsampling convolutions: 1 on every side, or 0, where
    /// the input is padded by one on the right and bottom only (DDPM's TensorFlow
    /// `SAME` padding, kept by diffusers' `downsample_padding=0`).
    pub downsample_padding: usize,
    /// Classes of a class-conditional UNet: a learnt embedding per class, added to the
    /// timestep embedding (`label_emb` in LDM, `class_embedding` in diffusers).
    pub num_classes: Option<usize>,
    pub time_embedding: TimeEmbedding,
    /// NCSN++'s levels (Song et al. 2021, app. H; diffusers' `SkipDownBlock2D` and
    /// kin): ResNets resample with the FIR filter [1, 3, 3, 1] (Karras et al. 2019's
    /// StyleGAN2 kernel) instead of a strided or upsampling convolution, the down path
    /// adds a 1x1 projection of the input image at every resolution, the up path
    /// sums a 3x3 projection to RGB at every resolution into the output, and each
    /// level block's residual sum is divided by √2.
    pub skip: bool,
    /// The middle block's residual sums are divided by this (`mid_block_scale_factor`).
    pub mid_scale: f32,
}

impl UnetStyle {
    /// GroupNorm groups of a norm over `channels` outside NCSN++'s level blocks.
    pub fn groups(&self, channels: usize) -> usize {
        self.norm_groups.unwrap_or_else(|| quarter_groups(channels))
    }
}

/// min(channels / 4, 32) groups: the count diffusers' skip blocks (and a UNet with
/// `norm_num_groups: null`) give each GroupNorm.
pub fn quarter_groups(channels: usize) -> usize {
    (channels / 4).clamp(1, 32)
}

impl Default for UnetStyle {
    fn default() -> Self {
        UnetStyle {
            attention: AttentionKind::Transformer,
            norm_groups: Some(32),
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            downsample_padding: 1,
            num_classes: None,
            time_embedding: TimeEmbedding::Positional,
            skip: false,
            mid_scale: 1.0,
        }
    }
}

/// How β_t runs over the training steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Betas {
    /// β linear in t from `start` to `end` (DDPM, Ho et al. 2020: 1e-4 to 0.02).
    Linear { start: f64, end: f64 },
    /// √β linear in t (LDM and SD: 0.00085 to 0.012).
    ScaledLinear { start: f64, end: f64 },
    /// ᾱ_t = cos²((t/T + 0.008)/1.008 · π/2), β capped at 0.999 (Nichol & Dhariwal
    /// 2021; diffusers' `squaredcos_cap_v2`).
    SquaredCos,
}

/// The variance of DDPM's reverse step (Ho et al. 2020, sec. 3.2): the posterior's β̃_t
/// or the forward process's β_t.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variance {
    FixedSmall,
    FixedLarge,
}

impl Variance {
    pub fn as_str(self) -> &'static str {
        match self {
            Variance::FixedSmall => "fixed_small",
            Variance::FixedLarge => "fixed_large",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fixed_small" => Some(Variance::FixedSmall),
            "fixed_large" => Some(Variance::FixedLarge),
            _ => None,
        }
    }
}

/// The noise schedule a model was trained on and the scheduler options its pipelines
/// sample with (diffusers' `scheduler_config.json`); SD's by default.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSchedule {
    pub betas: Betas,
    pub train_steps: usize,
    /// DDPM and DDIM clip each step's predicted clean sample to ±this (`clip_sample`).
    pub clip_sample: Option<f32>,
    pub variance: Variance,
    /// Added to every timestep of the leading grids (SD's configs: 1).
    pub steps_offset: usize,
    /// DDIM's and PLMS's last step lands on ᾱ = 1 (else on ᾱ_0); unset, each
    /// scheduler's own default (DDIM's true, PNDM's false), as diffusers' `from_config`.
    pub set_alpha_to_one: Option<bool>,
    /// A score model of the variance-exploding SDE: no β, noise levels from σ_min to
    /// σ_max (the β fields are then unused).
    pub ve: Option<VeSde>,
}

/// The variance-exploding SDE of Song et al. 2021 ("Score-Based Generative Modeling
/// through Stochastic Differential Equations", eq. 30: σ(t) = σ_min (σ_max/σ_min)^t)
/// and its predictor–corrector sampler's options (diffusers' `ScoreSdeVeScheduler`).
/// Its models denoise images in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VeSde {
    pub sigma_min: f32,
    pub sigma_max: f32,
    /// The Langevin corrector's signal-to-noise ratio r (alg. 4).
    pub snr: f32,
    /// Where the time grid ends (t runs from 1 to this).
    pub sampling_eps: f32,
    /// Langevin corrector steps before each predictor step.
    pub correct_steps: usize,
}

impl Default for VeSde {
    /// `ScoreSdeVeScheduler`'s defaults.
    fn default() -> Self {
        VeSde {
            sigma_min: 0.01,
            sigma_max: 1348.0,
            snr: 0.15,
            sampling_eps: 1e-5,
            correct_steps: 1,
        }
    }
}

impl Default for NoiseSchedule {
    fn default() -> Self {
        NoiseSchedule {
            betas: Betas::ScaledLinear {
                start: 0.00085,
                end: 0.012,
            },
            train_steps: 1000,
            clip_sample: None,
            variance: Variance::FixedSmall,
            steps_offset: 1,
            set_alpha_to_one: Some(false),
            ve: None,
        }
    }
}

impl NoiseSchedule {
    /// Whether the counts are within [`limits`] and the betas usable.
    pub fn check(&self) -> Result<(), String> {
        limits::within("the training step count", self.train_steps, 1 << 20)?;
        if self.train_steps < 2 {
            return Err(format!(
                "{} training steps: a schedule needs at least 2",
                self.train_steps
            ));
        }
        limits::within(
            "the scheduler's steps_offset",
            self.steps_offset,
            self.train_steps,
        )?;
        if let Betas::Linear { start, end } | Betas::ScaledLinear { start, end } = self.betas {
            let ok = |b: f64| b.is_finite() && b > 0.0 && b < 1.0;
            if !ok(start) || !ok(end) {
                return Err(format!(
                    "betas from {start} to {end}: each must be in (0, 1)"
                ));
            }
        }
        if let Some(c) = self.clip_sample {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!("clip_sample_range {c} must be positive"));
            }
        }
        if let Some(v) = &self.ve {
            let pos = |x: f32| x.is_finite() && x > 0.0;
            if !(pos(v.sigma_min) && pos(v.sigma_max) && v.sigma_min < v.sigma_max) {
                return Err(format!(
                    "VE noise levels from {} to {}: both must be positive, the first smaller",
                    v.sigma_min, v.sigma_max
                ));
            }
            if !(pos(v.snr) && pos(v.sampling_eps) && v.sampling_eps < 1.0) {
                return Err(format!(
                    "VE snr {} and sampling_eps {}: both must be positive, sampling_eps below 1",
                    v.snr, v.sampling_eps
                ));
            }
            limits::within("the corrector step count", v.correct_steps, 100)?;
        }
        Ok(())
    }
}

/// One item of SDXL's size-and-crop conditioning (Podell et al. 2023, sec. 2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeId {
    /// The training image's size before resizing, (height, width).
    OriginalSize,
    /// Where the training crop started, (top, left).
    CropTopLeft,
    /// The output size, (height, width).
    TargetSize,
    /// The refiner's aesthetic score (one value).
    AestheticScore,
}

impl TimeId {
    pub const SDXL: [TimeId; 3] = [
        TimeId::OriginalSize,
        TimeId::CropTopLeft,
        TimeId::TargetSize,
    ];
    pub const REFINER: [TimeId; 3] = [
        TimeId::OriginalSize,
        TimeId::CropTopLeft,
        TimeId::AestheticScore,
    ];

    /// How many scalars the item contributes.
    pub fn values(self) -> usize {
        if self == TimeId::AestheticScore {
            1
        } else {
            2
        }
    }

    /// The items of `n` values: six (SDXL) or five (the refiner).
    fn for_values(n: usize) -> Option<Vec<TimeId>> {
        match n {
            6 => Some(TimeId::SDXL.to_vec()),
            5 => Some(TimeId::REFINER.to_vec()),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TimeId::OriginalSize => "original_size",
            TimeId::CropTopLeft => "crop_coords_top_left",
            TimeId::TargetSize => "target_size",
            TimeId::AestheticScore => "aesthetic_score",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            TimeId::OriginalSize,
            TimeId::CropTopLeft,
            TimeId::TargetSize,
            TimeId::AestheticScore,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }

    /// The items and embedding width that fill `adm` channels after a pooled embedding
    /// `pooled` wide, for files that do not list them (stable-diffusion.cpp's, or a
    /// bare checkpoint): six values (SDXL) or five (the refiner), 256-wide as published
    /// where that fits.
    pub fn infer(adm: usize, pooled: usize) -> Option<(Vec<TimeId>, usize)> {
        let rest = adm.checked_sub(pooled).filter(|&r| r > 0)?;
        let n = [6, 5]
            .into_iter()
            .find(|n| rest == n * 256)
            .or_else(|| [6, 5].into_iter().find(|n| rest % n == 0))?;
        Some((TimeId::for_values(n)?, rest / n))
    }
}

impl UnetConfig {
    /// How many scalars the size/crop conditioning has (SDXL 6, the refiner 5).
    pub fn time_id_values(&self) -> usize {
        self.time_ids.iter().map(|t| t.values()).sum()
    }
    pub fn time_embed_dim(&self) -> usize {
        self.model_channels * 4
    }
    /// Heads of an attention layer with `channels` channels.
    pub fn heads_for(&self, channels: usize) -> usize {
        match (self.num_heads, self.head_dim) {
            (Some(n), _) => n,
            (None, Some(d)) => (channels / d).max(1),
            (None, None) => 8,
        }
    }
}

/// KL autoencoder (LDM `AutoencoderKL`) configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub latent_channels: usize,
    pub base_channels: usize,
    pub channel_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// Latents are `(z - shift) * scale` when fed to the UNet.
    pub scaling_factor: f32,
    pub shift_factor: f32,
    /// A VQ autoencoder's codebook size (LDM's `VQModel`, vectors `latent_channels`
    /// wide): the decoder reads each latent pixel as its nearest codebook vector, and
    /// the encoder gives latents rather than a distribution's moments.
    pub codebook: Option<usize>,
}

impl VaeConfig {
    /// Spatial downsampling factor between pixels and latents.
    pub fn downscale(&self) -> usize {
        1 << (self.channel_mult.len() - 1)
    }
}

/// How a text encoder's tensors are named and laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextEncoderKind {
    /// Hugging Face `CLIPTextModel` naming (`text_model.encoder.layers.N.self_attn.q_proj`).
    HfClip,
    /// OpenCLIP naming (`transformer.resblocks.N.attn.in_proj_weight`, q/k/v stacked).
    OpenClip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }
}

/// CLIP-architecture text encoder configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct TextEncoderConfig {
    pub kind: TextEncoderKind,
    /// Canonical tensor-name prefix, e.g. `cond_stage_model.transformer.text_model.`.
    pub prefix: String,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub activation: Activation,
    /// Output width of `text_projection` when the checkpoint carries one.
    pub projection_dim: Option<usize>,
    /// Layers skipped from the end to produce the conditioning (0: last layer; 1: penultimate).
    pub skip_layers: usize,
    /// Whether the final layer norm is applied to the chosen hidden state.
    pub final_norm: bool,
    /// Token used to pad prompts to `max_positions`.
    pub pad_token: u32,
}

/// The whole model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Descriptive family name (`sd1`, `sd2`, `sdxl`); nothing branches on it.
    pub family: String,
    pub prediction: Prediction,
    /// The training schedule (SD's scaled-linear betas) was rescaled to zero terminal
    /// SNR (Lin et al. 2024; diffusers' `rescale_betas_zero_snr`): samplers must use the
    /// same schedule, or the first step sees far less noise than the model expects.
    pub zero_terminal_snr: bool,
    /// The unconditional branch of an empty negative prompt is all zeros (text
    /// conditioning and pooled embedding) rather than the encoding of "" (diffusers'
    /// `force_zeros_for_empty_prompt`, on for SDXL's pipelines).
    pub zeros_for_empty_negative: bool,
    /// The training noise schedule and the sampling options its scheduler config sets.
    pub schedule: NoiseSchedule,
    pub unet: UnetConfig,
    /// The autoencoder between pixels and the UNet's latents; `None` for a UNet that
    /// works on pixels (DDPM).
    pub vae: Option<VaeConfig>,
    /// Empty for unconditional and class-conditional models.
    pub text_encoders: Vec<TextEncoderConfig>,
}

/// A ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image
/// Diffusion Models"): a trainable copy of a UNet's encoder and middle block that
/// reads a conditioning image through a small convolutional embedding, and whose
/// outputs, through zero-initialised 1x1 convolutions, are added to the UNet's skip
/// connections and middle-block output.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlConfig {
    /// Descriptive family of the UNet it steers (`sd1`, `sd2`, `sdxl`).
    pub family: String,
    /// The copied encoder's config (`up_blocks` empty).
    pub unet: UnetConfig,
    /// Channels of the conditioning image (3 for RGB maps).
    pub hint_channels: usize,
    /// Widths of the conditioning embedding's levels (diffusers'
    /// `conditioning_embedding_out_channels`; (16, 32, 96, 256) in every published
    /// ControlNet): each level but the last halves the resolution, so the image is
    /// read at `2^(levels-1)` times the latent size.
    pub embedding_channels: Vec<usize>,
}

impl ControlConfig {
    /// How many pixels of the conditioning image make one latent pixel.
    pub fn downscale(&self) -> usize {
        1 << self.embedding_channels.len().saturating_sub(1)
    }

    pub fn check_sizes(&self) -> Result<(), String> {
        use limits::{within, WIDTH};
        self.unet.check_sizes()?;
        limits::levels(
            "the ControlNet's conditioning embedding",
            self.embedding_channels.len(),
        )?;
        within(
            "the conditioning image's channel count",
            self.hint_channels,
            64,
        )?;
        for &c in &self.embedding_channels {
            within("a conditioning embedding width", c, WIDTH)?;
        }
        if self.hint_channels == 0 || self.embedding_channels.contains(&0) {
            return Err("the conditioning embedding has a level without channels".into());
        }
        Ok(())
    }
}

/// An ESRGAN-family upscaler (`model::esrgan`): which network, and its sizes (read
/// from the weights, or from an upscaler GGUF's metadata).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpscalerArch {
    Rrdb {
        features: usize,
        blocks: usize,
        /// Channels each dense-block convolution adds.
        grow: usize,
        /// The input is folded into `unshuffle`² times the channels first.
        unshuffle: usize,
        /// Nearest-neighbour doublings (`conv_up1`, `conv_up2`, …).
        doublings: usize,
    },
    Compact {
        features: usize,
        /// Convolutions between the first and the last.
        convs: usize,
        scale: usize,
    },
}

impl UpscalerArch {
    /// How many times larger the output is.
    pub fn scale(&self) -> usize {
        match *self {
            UpscalerArch::Rrdb {
                unshuffle,
                doublings,
                ..
            } => (1 << doublings) / unshuffle,
            UpscalerArch::Compact { scale, .. } => scale,
        }
    }

    /// Input sides must be multiples of this.
    pub fn unit(&self) -> usize {
        match *self {
            UpscalerArch::Rrdb { unshuffle, .. } => unshuffle,
            UpscalerArch::Compact { .. } => 1,
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            UpscalerArch::Rrdb {
                features,
                blocks,
                grow,
                ..
            } => format!(
                "RRDBNet ×{}: {blocks} blocks of {features} features (growth {grow})",
                self.scale()
            ),
            UpscalerArch::Compact {
                features, convs, ..
            } => format!(
                "SRVGGNetCompact ×{}: {convs} convolutions of {features} features",
                self.scale()
            ),
        }
    }
}

pub const CLIP_VOCAB: usize = 49408;
pub const CLIP_EOS: u32 = 49407;

/// Bounds on what a config may state. Configs come from files (GGUF metadata, diffusers
/// `config.json`s, tensor names), and every count multiplies into the tensors sdrs
/// names, plans and builds: a depth of 2^64 would have it plan tensors until memory ran
/// out. The bounds sit far above every SD-family model (SDXL: 3 UNet levels of 2
/// ResNets, transformers 10 deep, 2816-wide label input; OpenCLIP bigG: 32 layers,
/// 5120-wide MLP), so only a corrupt or hostile file meets them.
pub mod limits {
    /// UNet and VAE levels (resolutions).
    pub const LEVELS: usize = 8;
    /// ResNets in one level.
    pub const RESNETS: usize = 16;
    /// Transformer blocks after one ResNet, or in the middle block.
    pub const DEPTH: usize = 64;
    /// Text encoder layers.
    pub const TEXT_LAYERS: usize = 256;
    /// Any channel count, head count or head width, embedding width or position count.
    pub const WIDTH: usize = 1 << 16;
    /// Text encoder vocabulary.
    pub const VOCAB: usize = 1 << 20;

    /// `what` is at most `max`.
    pub fn within(what: &str, v: usize, max: usize) -> Result<(), String> {
        if v > max {
            return Err(format!("{what} is {v}, beyond the {max} sdrs accepts"));
        }
        Ok(())
    }

    /// `what` lists between 1 and [`LEVELS`] levels.
    pub fn levels(what: &str, n: usize) -> Result<(), String> {
        match n {
            0 => Err(format!("{what} has no levels")),
            n if n > LEVELS => Err(format!(
                "{what} has {n} levels, beyond the {LEVELS} sdrs accepts"
            )),
            _ => Ok(()),
        }
    }
}

fn uniform_blocks(levels: &[usize], res: usize) -> Vec<Vec<usize>> {
    levels.iter().map(|&d| vec![d; res]).collect()
}

impl UnetConfig {
    /// Whether every count and width is within [`limits`]; the error names the first
    /// that is not.
    pub fn check_sizes(&self) -> Result<(), String> {
        use limits::{within, DEPTH, RESNETS, WIDTH};
        limits::levels("the UNet", self.channel_mult.len())?;
        for (what, blocks) in [("down", &self.down_blocks), ("up", &self.up_blocks)] {
            // A ControlNet's copy of the encoder has no up path.
            if what == "up" && blocks.is_empty() {
                continue;
            }
            limits::levels(&format!("the UNet's {what} path"), blocks.len())?;
            for level in blocks.iter() {
                within(
                    &format!("the ResNet count of a UNet {what} level"),
                    level.len(),
                    RESNETS,
                )?;
                for &d in level {
                    within(
                        &format!("a UNet {what} level's transformer depth"),
                        d,
                        DEPTH,
                    )?;
                }
            }
        }
        within(
            "the UNet middle block's transformer depth",
            self.mid_depth.unwrap_or(0),
            DEPTH,
        )?;
        for &m in &self.channel_mult {
            within(
                "a UNet level's channel count",
                self.model_channels.saturating_mul(m),
                WIDTH,
            )?;
        }
        let st = &self.style;
        within(
            "the UNet's class count",
            st.num_classes.unwrap_or(0),
            1 << 20,
        )?;
        if st.norm_groups == Some(0) || st.downsample_padding > 1 {
            return Err(format!(
                "GroupNorm groups {:?} and downsample padding {}: groups must be positive, padding 0 or 1",
                st.norm_groups, st.downsample_padding
            ));
        }
        for &m in &self.channel_mult {
            let ch = self.model_channels.saturating_mul(m);
            if ch % st.groups(ch) != 0 {
                return Err(format!(
                    "a UNet level of {ch} channels cannot be split into {} GroupNorm groups",
                    st.groups(ch)
                ));
            }
        }
        if !(st.mid_scale.is_finite() && st.mid_scale > 0.0) {
            return Err(format!(
                "middle block scale {}: it must be positive",
                st.mid_scale
            ));
        }
        if st.skip && (self.in_channels != 3 || self.out_channels != 3) {
            return Err(format!(
                "a UNet with image skip paths takes and gives 3 channels, not {} and {}",
                self.in_channels, self.out_channels
            ));
        }
        let widths = [
            ("the UNet's in_channels", self.in_channels),
            ("the UNet's out_channels", self.out_channels),
            ("the UNet's model_channels", self.model_channels),
            ("the UNet's head count", self.num_heads.unwrap_or(0)),
            ("the UNet's head width", self.head_dim.unwrap_or(0)),
            ("the UNet's context width", self.context_dim),
            (
                "the UNet's label input width",
                self.adm_in_channels.unwrap_or(0),
            ),
            (
                "the UNet's guidance embedding width",
                self.time_cond_proj_dim.unwrap_or(0),
            ),
            ("the UNet's size/crop embedding width", self.time_id_dim),
        ];
        widths
            .into_iter()
            .try_for_each(|(what, v)| within(what, v, WIDTH))
    }

    fn sd(
        model_channels: usize,
        context_dim: usize,
        linear_proj: bool,
        heads: (Option<usize>, Option<usize>),
    ) -> Self {
        UnetConfig {
            in_channels: 4,
            out_channels: 4,
            model_channels,
            channel_mult: vec![1, 2, 4, 4],
            down_blocks: uniform_blocks(&[1, 1, 1, 0], 2),
            up_blocks: uniform_blocks(&[0, 1, 1, 1], 3),
            mid_depth: Some(1),
            num_heads: heads.0,
            head_dim: heads.1,
            context_dim,
            linear_proj,
            adm_in_channels: None,
            time_cond_proj_dim: None,
            time_ids: Vec::new(),
            time_id_dim: 0,
            style: UnetStyle::default(),
        }
    }
}

impl VaeConfig {
    /// Whether every count and width is within [`limits`].
    pub fn check_sizes(&self) -> Result<(), String> {
        use limits::{within, RESNETS, WIDTH};
        limits::levels("the VAE", self.channel_mult.len())?;
        within(
            "the VAE's ResNet count per level",
            self.num_res_blocks,
            RESNETS,
        )?;
        for &m in &self.channel_mult {
            within(
                "a VAE level's channel count",
                self.base_channels.saturating_mul(m),
                WIDTH,
            )?;
        }
        within(
            "the VAE's codebook size",
            self.codebook.unwrap_or(0),
            1 << 24,
        )?;
        let widths = [
            ("the VAE's in_channels", self.in_channels),
            ("the VAE's latent_channels", self.latent_channels),
            ("the VAE's base channels", self.base_channels),
        ];
        widths
            .into_iter()
            .try_for_each(|(what, v)| within(what, v, WIDTH))
    }

    pub fn sd(scaling_factor: f32) -> Self {
        VaeConfig {
            in_channels: 3,
            latent_channels: 4,
            base_channels: 128,
            channel_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            scaling_factor,
            shift_factor: 0.0,
            codebook: None,
        }
    }
}

impl TextEncoderConfig {
    /// Whether every count and width is within [`limits`].
    pub fn check_sizes(&self) -> Result<(), String> {
        use limits::{within, TEXT_LAYERS, VOCAB, WIDTH};
        within(
            "the text encoder's layer count",
            self.num_layers,
            TEXT_LAYERS,
        )?;
        within(
            "the text encoder's skipped layers",
            self.skip_layers,
            TEXT_LAYERS,
        )?;
        within("the text encoder's vocabulary", self.vocab_size, VOCAB)?;
        let widths = [
            ("the text encoder's positions", self.max_positions),
            ("the text encoder's width", self.hidden_size),
            ("the text encoder's head count", self.num_heads),
            ("the text encoder's MLP width", self.intermediate_size),
            (
                "the text encoder's projection width",
                self.projection_dim.unwrap_or(0),
            ),
        ];
        widths
            .into_iter()
            .try_for_each(|(what, v)| within(what, v, WIDTH))
    }

    /// OpenAI CLIP ViT-L/14 text tower (SD 1.x; SDXL's first encoder).
    pub fn clip_l(prefix: &str) -> Self {
        TextEncoderConfig {
            kind: TextEncoderKind::HfClip,
            prefix: prefix.to_string(),
            vocab_size: CLIP_VOCAB,
            max_positions: 77,
            hidden_size: 768,
            num_layers: 12,
            num_heads: 12,
            intermediate_size: 3072,
            activation: Activation::QuickGelu,
            projection_dim: None,
            skip_layers: 0,
            final_norm: true,
            pad_token: CLIP_EOS,
        }
    }
    /// OpenCLIP text tower (ViT-H: 1024 wide, 24 layers; ViT-bigG: 1280 wide, 32 layers).
    pub fn open_clip(
        prefix: &str,
        hidden: usize,
        layers: usize,
        heads: usize,
        projection_dim: Option<usize>,
    ) -> Self {
        TextEncoderConfig {
            kind: TextEncoderKind::OpenClip,
            prefix: prefix.to_string(),
            vocab_size: CLIP_VOCAB,
            max_positions: 77,
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            intermediate_size: hidden * 4,
            activation: Activation::Gelu,
            projection_dim,
            skip_layers: 1,
            final_norm: true,
            pad_token: 0,
        }
    }
}

impl ModelConfig {
    /// Stable Diffusion 1.x (v1-inference.yaml).
    pub fn sd1() -> Self {
        ModelConfig {
            family: "sd1".into(),
            prediction: Prediction::Epsilon,
            zero_terminal_snr: false,
            zeros_for_empty_negative: false,
            schedule: NoiseSchedule::default(),
            unet: UnetConfig::sd(320, 768, false, (Some(8), None)),
            vae: Some(VaeConfig::sd(0.18215)),
            text_encoders: vec![TextEncoderConfig::clip_l(
                "cond_stage_model.transformer.text_model.",
            )],
        }
    }

    /// Stable Diffusion 2.x (v2-inference-v.yaml). 2.x-base is the same with epsilon prediction.
    pub fn sd2() -> Self {
        ModelConfig {
            family: "sd2".into(),
            prediction: Prediction::V,
            zero_terminal_snr: false,
            zeros_for_empty_negative: false,
            schedule: NoiseSchedule::default(),
            unet: UnetConfig::sd(320, 1024, true, (None, Some(64))),
            vae: Some(VaeConfig::sd(0.18215)),
            // SD 2 conditions on the penultimate block of OpenCLIP ViT-H (24 blocks), with the
            // final norm: the last block and `text_projection` are never used, so the
            // architecture has 23 layers (as diffusers stores it) and no projection.
            text_encoders: vec![{
                let mut t =
                    TextEncoderConfig::open_clip("cond_stage_model.model.", 1024, 23, 16, None);
                t.skip_layers = 0;
                t
            }],
        }
    }

    /// SDXL base 1.0 (sd_xl_base.yaml).
    pub fn sdxl() -> Self {
        let mut clip_l =
            TextEncoderConfig::clip_l("conditioner.embedders.0.transformer.text_model.");
        clip_l.skip_layers = 1;
        clip_l.final_norm = false;
        let mut big_g = TextEncoderConfig::open_clip(
            "conditioner.embedders.1.model.",
            1280,
            32,
            20,
            Some(1280),
        );
        big_g.final_norm = false;
        ModelConfig {
            family: "sdxl".into(),
            prediction: Prediction::Epsilon,
            zero_terminal_snr: false,
            zeros_for_empty_negative: true,
            schedule: NoiseSchedule::default(),
            unet: UnetConfig {
                in_channels: 4,
                out_channels: 4,
                model_channels: 320,
                channel_mult: vec![1, 2, 4],
                down_blocks: vec![vec![0, 0], vec![2, 2], vec![10, 10]],
                up_blocks: vec![vec![10, 10, 10], vec![2, 2, 2], vec![0, 0, 0]],
                mid_depth: Some(10),
                num_heads: None,
                head_dim: Some(64),
                context_dim: 2048,
                linear_proj: true,
                adm_in_channels: Some(2816),
                time_cond_proj_dim: None,
                time_ids: TimeId::SDXL.to_vec(),
                time_id_dim: 256,
                style: UnetStyle::default(),
            },
            vae: Some(VaeConfig::sd(0.13025)),
            text_encoders: vec![clip_l, big_g],
        }
    }

    /// The autoencoder, or an error for a model that works on pixels.
    pub fn autoencoder(&self) -> crate::error::Result<&VaeConfig> {
        self.vae.as_ref().ok_or_else(|| {
            crate::error::Error::Invalid("this model's UNet works on pixels: it has no VAE".into())
        })
    }

    /// Whether the model takes no text: an unconditional or class-conditional model
    /// (DDPM, LDM), run by [`crate::pipeline::unconditional`].
    pub fn is_unconditional(&self) -> bool {
        self.text_encoders.is_empty()
    }

    /// The pooled text embedding's width: the last text encoder's projection (SDXL's
    /// bigG `text_projection`), else its hidden size.
    pub fn pooled_dim(&self) -> Option<usize> {
        self.text_encoders
            .last()
            .map(|t| t.projection_dim.unwrap_or(t.hidden_size))
    }

    /// Whether every part's counts and widths are within [`limits`]. Readers call it
    /// before anything is named, planned or sized from the config.
    pub fn check_sizes(&self) -> Result<(), String> {
        use limits::within;
        within("the text encoder count", self.text_encoders.len(), 8)?;
        self.unet.check_sizes()?;
        self.schedule.check()?;
        if let Some(v) = &self.vae {
            v.check_sizes()?;
        }
        self.text_encoders
            .iter()
            .try_for_each(TextEncoderConfig::check_sizes)
    }

    /// Fills in the size/crop conditioning of a `label_emb` UNet whose source did not
    /// describe it (see [`TimeId::infer`]); a no-op for other UNets.
    pub fn infer_time_ids(&mut self) -> Result<(), String> {
        let Some(adm) = self.unet.adm_in_channels else {
            self.unet.time_ids.clear();
            self.unet.time_id_dim = 0;
            return Ok(());
        };
        if !self.unet.time_ids.is_empty() {
            return Ok(());
        }
        let pooled = self
            .pooled_dim()
            .ok_or("a UNet with a label embedding needs a text encoder for its pooled embedding")?;
        let dim = self.unet.time_id_dim;
        let found = if dim > 0 {
            // The width is known (diffusers' `addition_time_embed_dim`): count the values.
            let n = adm
                .checked_sub(pooled)
                .filter(|r| r % dim == 0)
                .map(|r| r / dim);
            n.and_then(TimeId::for_values).map(|ids| (ids, dim))
        } else {
            TimeId::infer(adm, pooled)
        };
        let (ids, dim) = found.ok_or_else(|| format!("label_emb takes {adm} channels: the pooled embedding ({pooled}) and five or six size/crop embeddings cannot fill that"))?;
        self.unet.time_ids = ids;
        self.unet.time_id_dim = dim;
        Ok(())
    }

    /// Whether `label_emb`'s input width is the pooled embedding plus every size/crop
    /// value's embedding (trivially so without `label_emb`).
    pub fn check_label_width(&self) -> Result<(), String> {
        let (Some(adm), u) = (self.unet.adm_in_channels, &self.unet) else {
            return Ok(());
        };
        let pooled = self
            .pooled_dim()
            .ok_or("a UNet with a label embedding needs a text encoder for its pooled embedding")?;
        let values = u.time_id_values();
        if pooled + values * u.time_id_dim != adm {
            return Err(format!("label_emb takes {adm} channels, not the pooled embedding ({pooled}) and {values} size/crop values × {}", u.time_id_dim));
        }
        Ok(())
    }

    /// The pixel-space DDPM of Ho et al. 2020 as diffusers publishes it
    /// (`google/ddpm-cifar10-32`: 4 levels, attention at 16×16; `google/ddpm-celebahq-256`
    /// and the LSUN church/bedroom models: 6 levels, attention at 16×16), with the
    /// paper's linear schedule, clipping and posterior variance.
    pub fn ddpm(levels: &[usize], attention_level: usize) -> Self {
        let depth = |l: usize| usize::from(l == attention_level);
        let n = levels.len();
        ModelConfig {
            family: "ddpm".into(),
            prediction: Prediction::Epsilon,
            zero_terminal_snr: false,
            zeros_for_empty_negative: false,
            schedule: NoiseSchedule {
                betas: Betas::Linear {
                    start: 0.0001,
                    end: 0.02,
                },
                clip_sample: Some(1.0),
                steps_offset: 0,
                set_alpha_to_one: None,
                ..NoiseSchedule::default()
            },
            unet: UnetConfig {
                in_channels: 3,
                out_channels: 3,
                model_channels: 128,
                channel_mult: levels.to_vec(),
                down_blocks: (0..n).map(|l| vec![depth(l); 2]).collect(),
                up_blocks: (0..n).map(|j| vec![depth(n - 1 - j); 3]).collect(),
                mid_depth: Some(1),
                num_heads: Some(1),
                head_dim: None,
                context_dim: 0,
                linear_proj: false,
                adm_in_channels: None,
                time_cond_proj_dim: None,
                time_ids: Vec::new(),
                time_id_dim: 0,
                style: UnetStyle {
                    attention: AttentionKind::SelfAttention,
                    norm_eps: 1e-6,
                    flip_sin_to_cos: false,
                    freq_shift: 1.0,
                    downsample_padding: 0,
                    ..UnetStyle::default()
                },
            },
            vae: None,
            text_encoders: Vec::new(),
        }
    }

    /// NCSN++, the score model of Song et al. 2021 for the VE SDE, as diffusers converts
    /// it (`google/ncsnpp-*`: skip blocks with FIR resampling, Fourier time features,
    /// GroupNorm min(C/4, 32), middle block over √2, one head), with
    /// `ScoreSdeVeScheduler`'s sampler options and σ_max.
    pub fn ncsnpp(levels: &[usize], attention_level: usize, sigma_max: f32) -> Self {
        let mut cfg = Self::ddpm(levels, attention_level);
        let n = levels.len();
        cfg.family = "score-sde".into();
        cfg.unet.up_blocks = (0..n)
            .map(|j| {
                let mut d = vec![0; 3];
                d[2] = usize::from(n - 1 - j == attention_level);
                d
            })
            .collect();
        cfg.unet.style = UnetStyle {
            attention: AttentionKind::SelfAttention,
            norm_groups: None,
            norm_eps: 1e-6,
            time_embedding: TimeEmbedding::Fourier,
            skip: true,
            mid_scale: std::f32::consts::SQRT_2,
            ..UnetStyle::default()
        };
        cfg.schedule = NoiseSchedule {
            train_steps: 2000,
            clip_sample: None,
            steps_offset: 0,
            set_alpha_to_one: None,
            ve: Some(VeSde {
                sigma_max,
                ..VeSde::default()
            }),
            ..NoiseSchedule::default()
        };
        cfg
    }

    /// A preset by name (`sd1`, `sd15`, `sd2`, `sd21`, `sdxl`, and `tiny-*` variants;
    /// `ddpm-cifar10`, `ddpm-celebahq`, `ncsnpp-celebahq`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "ddpm-cifar10" => Some(Self::ddpm(&[1, 2, 2, 2], 1)),
            "ddpm-celebahq" => Some(Self::ddpm(&[1, 1, 2, 2, 4, 4], 4)),
            // score_sde's configs/ve/celebahq_256_ncsnpp_continuous.py: nf 128,
            // ch_mult (1, 1, 2, 2, 2, 2, 2), attention at 16x16, σ_max 348.
            "ncsnpp-celebahq" => Some(Self::ncsnpp(&[1, 1, 2, 2, 2, 2, 2], 4, 348.0)),
            "sd1" | "sd15" => Some(Self::sd1()),
            "sd2" | "sd21" => Some(Self::sd2()),
            "sdxl" => Some(Self::sdxl()),
            "tiny-sd1" | "tiny-sd15" => Some(Self::sd1().shrink()),
            "tiny-sd2" | "tiny-sd21" => Some(Self::sd2().shrink()),
            "tiny-sdxl" => Some(Self::sdxl().shrink()),
            _ => None,
        }
    }

    pub const PRESETS: &'static [&'static str] = &[
        "sd15",
        "sd21",
        "sdxl",
        "tiny-sd15",
        "tiny-sd21",
        "tiny-sdxl",
    ];

    /// Presets of the pixel-space models of the DDPM and score-SDE papers (no text, no
    /// VAE).
    pub const DDPM_PRESETS: &'static [&'static str] =
        &["ddpm-cifar10", "ddpm-celebahq", "ncsnpp-celebahq"];

    /// The same architecture with small widths and depths: a consistent network for
    /// tests (every name of the real layout family present, shapes shrunk).
    pub fn shrink(mut self) -> Self {
        let u = &mut self.unet;
        u.model_channels = 32;
        u.context_dim = 32 * self.text_encoders.len();
        for d in u.down_blocks.iter_mut().chain(u.up_blocks.iter_mut()) {
            for x in d.iter_mut() {
                *x = (*x).min(2);
            }
        }
        u.mid_depth = u.mid_depth.map(|d| d.min(2));
        let values = u.time_id_values();
        u.adm_in_channels = u.adm_in_channels.map(|_| 32 + values * 8);
        u.time_id_dim = if u.time_ids.is_empty() { 0 } else { 8 };
        if let Some(v) = &mut self.vae {
            v.base_channels = 32;
        }
        for t in &mut self.text_encoders {
            t.hidden_size = 32;
            t.num_layers = 3;
            t.num_heads = 1;
            t.intermediate_size = 64;
            t.projection_dim = t.projection_dim.map(|_| 32);
        }
        self.family = format!("tiny-{}", self.family);
        self
    }
}

/// How a model is meant to be run when the user does not say: the image size it was
/// trained at (diffusers' pipelines default to `unet.sample_size` × the VAE factor), and
/// for distilled models the sampler, step count and guidance they were distilled for.
/// Not architecture: nothing in the executor reads it, only front ends filling in
/// unset options. Stored as `sd.defaults.*` metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Defaults {
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub sampler: Option<String>,
    pub scheduler: Option<String>,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f32>,
}

impl Defaults {
    pub const KEYS: [&'static str; 6] = [
        "width",
        "height",
        "sampler",
        "scheduler",
        "steps",
        "cfg_scale",
    ];

    /// Named recipes of distilled models, as their authors publish them:
    /// - `sdxl-turbo`, `sd-turbo` (Sauer et al. 2023, "Adversarial Diffusion Distillation";
    ///   the model cards' example: 1 step, guidance off, Euler ancestral on trailing
    ///   timesteps, 512×512);
    /// - `sdxl-lightning-2step`, `-4step`, `-8step` (Lin et al. 2024, "SDXL-Lightning";
    ///   the model card: Euler, "trailing" timesteps, guidance off, 1024×1024).
    ///
    /// Guidance "off" is a scale of 1 here: the unconditional pass is skipped.
    pub fn preset(name: &str) -> Option<Defaults> {
        let recipe = |size, sampler: &str, steps| Defaults {
            width: Some(size),
            height: Some(size),
            sampler: Some(sampler.into()),
            scheduler: Some("trailing".into()),
            steps: Some(steps),
            cfg_scale: Some(1.0),
        };
        match name {
            "sdxl-turbo" | "sd-turbo" => Some(recipe(512, "euler_a", 1)),
            "sdxl-lightning-2step" => Some(recipe(1024, "euler", 2)),
            "sdxl-lightning-4step" => Some(recipe(1024, "euler", 4)),
            "sdxl-lightning-8step" => Some(recipe(1024, "euler", 8)),
            _ => None,
        }
    }

    pub const PRESETS: [&'static str; 5] = [
        "sdxl-turbo",
        "sd-turbo",
        "sdxl-lightning-2step",
        "sdxl-lightning-4step",
        "sdxl-lightning-8step",
    ];

    /// `other`'s fields where it sets them, `self`'s elsewhere.
    pub fn over(&self, other: &Defaults) -> Defaults {
        Defaults {
            width: other.width.or(self.width),
            height: other.height.or(self.height),
            sampler: other.sampler.clone().or_else(|| self.sampler.clone()),
            scheduler: other.scheduler.clone().or_else(|| self.scheduler.clone()),
            steps: other.steps.or(self.steps),
            cfg_scale: other.cfg_scale.or(self.cfg_scale),
        }
    }

    /// Parses `key=value[,key=value...]` (the keys of [`Defaults::KEYS`]; `size=N`
    /// sets width and height; `preset=NAME` a whole [`Defaults::preset`], which later
    /// keys override) over `self`.
    pub fn apply(&mut self, spec: &str) -> Result<(), String> {
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}`: expected KEY=VALUE"))?;
            let (k, v) = (k.trim(), v.trim());
            if k == "preset" {
                let p = Defaults::preset(v).ok_or_else(|| {
                    format!(
                        "unknown preset `{v}`; valid: {}",
                        Defaults::PRESETS.join(", ")
                    )
                })?;
                *self = self.over(&p);
                continue;
            }
            let num = |v: &str| {
                v.parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("`{k}`: `{v}` is not a positive integer"))
            };
            match k {
                "width" => self.width = Some(num(v)?),
                "height" => self.height = Some(num(v)?),
                "size" => {
                    self.width = Some(num(v)?);
                    self.height = self.width;
                }
                "sampler" => self.sampler = Some(v.to_string()),
                "scheduler" => self.scheduler = Some(v.to_string()),
                "steps" => self.steps = Some(num(v)?),
                "cfg_scale" | "cfg" => {
                    self.cfg_scale = Some(
                        v.parse::<f32>()
                            .ok()
                            .filter(|x| x.is_finite() && *x >= 0.0)
                            .ok_or_else(|| format!("`{k}`: `{v}` is not a guidance scale"))?,
                    )
                }
                _ => {
                    return Err(format!(
                        "unknown default `{k}`; valid: preset, size, {}",
                        Self::KEYS.join(", ")
                    ))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Defaults, ModelConfig, TimeId};

    #[test]
    fn presets_set_the_published_recipes_and_later_keys_override_them() {
        let mut d = Defaults::default();
        d.apply("preset=sdxl-turbo").unwrap();
        assert_eq!(
            (
                d.width,
                d.steps,
                d.cfg_scale,
                d.sampler.as_deref(),
                d.scheduler.as_deref()
            ),
            (
                Some(512),
                Some(1),
                Some(1.0),
                Some("euler_a"),
                Some("trailing")
            )
        );
        d.apply("preset=sdxl-lightning-4step,steps=6").unwrap();
        assert_eq!(
            (d.width, d.steps, d.sampler.as_deref()),
            (Some(1024), Some(6), Some("euler"))
        );
        assert!(d
            .apply("preset=sdxl-nitro")
            .unwrap_err()
            .contains("unknown preset"));
        for name in Defaults::PRESETS {
            let p = Defaults::preset(name).unwrap();
            assert!(
                crate::sample::Sampler::parse(p.sampler.as_deref().unwrap()).is_some()
                    && crate::sample::Schedule::parse(p.scheduler.as_deref().unwrap()).is_some(),
                "{name}"
            );
        }
    }

    #[test]
    fn size_conditioning_is_inferred_from_label_emb_width() {
        assert_eq!(
            TimeId::infer(2816, 1280),
            Some((TimeId::SDXL.to_vec(), 256))
        );
        assert_eq!(
            TimeId::infer(2560, 1280),
            Some((TimeId::REFINER.to_vec(), 256))
        );
        assert_eq!(TimeId::infer(32 + 48, 32), Some((TimeId::SDXL.to_vec(), 8)));
        assert_eq!(
            TimeId::infer(32 + 40, 32),
            Some((TimeId::REFINER.to_vec(), 8))
        );
        assert_eq!(TimeId::infer(1280 + 7, 1280), None);
        let mut cfg = ModelConfig::sdxl();
        cfg.unet.time_ids.clear();
        cfg.unet.time_id_dim = 0;
        cfg.infer_time_ids().unwrap();
        assert_eq!(cfg, ModelConfig::sdxl());
        cfg.unet.time_ids.clear();
        cfg.unet.adm_in_channels = Some(2817);
        assert!(cfg.infer_time_ids().unwrap_err().contains("2817"));
    }

    #[test]
    fn defaults_spec_sets_named_fields_and_refuses_unknown_keys_and_bad_values() {
        let mut d = Defaults {
            steps: Some(20),
            ..Default::default()
        };
        d.apply("size=64, sampler=lcm,cfg=1.5").unwrap();
        assert_eq!(
            d,
            Defaults {
                width: Some(64),
                height: Some(64),
                sampler: Some("lcm".into()),
                steps: Some(20),
                cfg_scale: Some(1.5),
                scheduler: None
            }
        );
        assert!(d
            .apply("colour=red")
            .unwrap_err()
            .contains("unknown default `colour`"));
        assert!(d.apply("steps=0").unwrap_err().contains("positive integer"));
        assert!(d.apply("cfg=-1").unwrap_err().contains("guidance scale"));
        assert!(d.apply("steps").unwrap_err().contains("KEY=VALUE"));
    }
}
