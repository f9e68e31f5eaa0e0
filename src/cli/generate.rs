use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use std::sync::Arc;

use sdrs::pipeline::{Canvas, CanvasOptions, Pipeline, Request, RngKind, Stage};
use sdrs::model::tile::TileStats;
use sdrs::prompt::Emphasis;
use sdrs::sample::{Sampler, Schedule};

/// Generate an image from a prompt (txt2img), or from a prompt and a picture
/// (img2img with --init-img, inpainting with --mask, outpainting with --pad).
#[derive(clap::Args)]
pub struct Args {
    /// Model GGUF (from `sdrs convert`); without it, the built-in demo model (a tiny
    /// model of coloured shapes, 64x64, LCM 4 steps).
    #[arg(short, long)]
    model: Option<PathBuf>,
    #[arg(short, long, required_unless_present = "list_samplers")]
    prompt: Option<String>,
    /// Negative prompt.
    #[arg(short = 'n', long = "negative-prompt", default_value = "")]
    negative: String,
    /// Sampling steps [default: the model's, else 20].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; 1 skips the unconditional pass [default: the model's, else 7].
    #[arg(long = "cfg-scale")]
    cfg_scale: Option<f32>,
    #[arg(short = 's', long, default_value_t = 42)]
    seed: u64,
    /// Image width [default: the init image's, else the model's, else 512].
    #[arg(short = 'W', long)]
    width: Option<usize>,
    /// Image height [default: the init image's, else the model's, else 512].
    #[arg(short = 'H', long)]
    height: Option<usize>,
    /// img2img: start from this picture (PNG or JPEG, any size and pixel format). Without
    /// -W/-H the output keeps its size, centre-cropped to the model's multiple; with them
    /// it is scaled to cover that size and centre-cropped (one given: the other follows
    /// the picture's aspect ratio).
    #[arg(short = 'i', long = "init-img")]
    init_img: Option<PathBuf>,
    /// Inpainting: white repaints, black keeps (any size: stretched to the init image's).
    #[arg(long, requires = "init_img")]
    mask: Option<PathBuf>,
    /// How much of the init image to repaint, in (0, 1]: the last steps·strength steps
    /// run [default: 0.8 for img2img, 1 with a mask].
    #[arg(long, requires = "init_img")]
    strength: Option<f64>,
    /// Gaussian blur of the mask in pixels (σ), softening where the original is pasted back.
    #[arg(long = "mask-blur", default_value_t = 4.0)]
    mask_blur: f32,
    /// Outpainting: extend the canvas by L,T,R,B pixels (without -W/-H, a padded side
    /// grows on to the model's multiple), filled from the picture's edges and masked.
    #[arg(long, value_parser = parse_pad, requires = "init_img")]
    pad: Option<[usize; 4]>,
    /// Inpainting: keep the decoded image everywhere, as diffusers returns it, instead of
    /// pasting the original back outside the mask.
    #[arg(long = "no-overlay")]
    no_overlay: bool,
    /// CLIP skip (A1111's numbering): 1 takes the text encoder's usual layer, 2 the one
    /// before it (what many anime-style SD 1.5 models are made for), and so on.
    #[arg(long = "clip-skip", default_value_t = 1)]
    clip_skip: usize,
    /// What prompt weights do: original ((word:1.3), (word), [word] and BREAK, each
    /// window scaled back to its unweighted mean, as A1111), no-norm (without that
    /// rescale), none (brackets and BREAK are plain text).
    #[arg(long, default_value = "original")]
    emphasis: String,
    /// Textual-inversion embedding (.pt, .bin, .safetensors; A1111, diffusers or SDXL
    /// clip_l/clip_g), triggered by its file's stem (or a diffusers file's token) in
    /// the prompt. Repeatable.
    #[arg(long = "embedding")]
    embeddings: Vec<PathBuf>,
    /// A folder of embeddings, each triggered by its file's stem; files for other
    /// models are skipped with a warning.
    #[arg(long = "embedding-dir")]
    embedding_dir: Option<PathBuf>,
    /// Apply a LoRA at run time, beside the model's weights (the model file is not
    /// changed): FILE or FILE:MULTIPLIER [default 1]; repeatable. LCM-LoRA too.
    #[arg(long, value_name = "FILE[:MULTIPLIER]")]
    lora: Vec<String>,
    /// Where the prompt's <lora:NAME:MULTIPLIER> tags find NAME.safetensors (.pt, .ckpt, .bin).
    #[arg(long = "lora-dir")]
    lora_dir: Option<PathBuf>,
    /// A distilled model's recipe (size, sampler, schedule, steps, guidance): sdxl-turbo,
    /// sd-turbo, sdxl-lightning-2step, -4step, -8step; options given beside it win.
    #[arg(long)]
    preset: Option<String>,
    /// Sampler (see --list-samplers) [default: the model's, else euler].
    #[arg(long)]
    sampler: Option<String>,
    /// σ schedule: discrete, leading, trailing, karras, exponential, ays, sgm_uniform, simple
    /// [default: the model's, else discrete].
    #[arg(long)]
    scheduler: Option<String>,
    /// Noise of ancestral/SDE/DDIM steps (DDIM: 0 deterministic, 1 DDPM; TCD: its γ).
    #[arg(long)]
    eta: Option<f64>,
    #[arg(long = "sigma-min")]
    sigma_min: Option<f64>,
    #[arg(long = "sigma-max")]
    sigma_max: Option<f64>,
    /// Noise generator: torch (same noise as diffusers for a seed) or native.
    #[arg(long, default_value = "torch")]
    rng: String,
    /// Guidance rescale φ in [0, 1] (0.7 is the paper's choice for v-prediction models).
    #[arg(long = "guidance-rescale", default_value_t = 0.0)]
    guidance_rescale: f32,
    /// Rescale the noise schedule to zero terminal SNR (for models trained that way whose
    /// file does not say so; converted zero-SNR diffusers folders do).
    #[arg(long = "zero-terminal-snr")]
    zero_terminal_snr: bool,
    /// SDXL size conditioning: the original image size WxH the model is told the picture
    /// was cut from [default: the output size].
    #[arg(long = "original-size", value_parser = parse_pair::<'x'>)]
    original_size: Option<(usize, usize)>,
    /// SDXL crop conditioning TOP,LEFT [default: 0,0].
    #[arg(long = "crop", value_parser = parse_pair::<','>)]
    crop: Option<(usize, usize)>,
    /// The SDXL refiner's aesthetic score for the prompt [default: 6] (the negative
    /// prompt gets 2.5, diffusers' defaults).
    #[arg(long = "aesthetic-score")]
    aesthetic_score: Option<f32>,
    /// List the samplers with their order and whether they are stochastic, then exit.
    #[arg(long = "list-samplers")]
    list_samplers: bool,
    /// Decode with a TAESD-family decoder (`taesd_decoder.pth`) instead of the VAE.
    #[arg(long)]
    taesd: Option<PathBuf>,
    /// Memory budget (768M, 1.5G, 2GB): the run is planned to fit (guidance in two
    /// batches, the VAE decode in tiles) or refused before it starts [default: the
    /// memory cgroup's limit, if any].
    #[arg(long = "max-memory", value_parser = parse_budget)]
    max_memory: Option<u64>,
    /// Encode and decode images over 512x512 in overlapping tiles of 512 pixels (the
    /// planner also tiles on its own when the whole image would not fit the budget).
    #[arg(long = "vae-tiling")]
    vae_tiling: bool,
    /// Where the tiles' VAE GroupNorms take their statistics: `tile`, each tile's own
    /// (one pass, as diffusers' `enable_tiling`; tones may drift between tiles) or
    /// `image`, the whole image's (tiles equal the whole decode; one pass over the tiles
    /// per norm: ~8x `tile`'s time for SD's VAE).
    #[arg(long = "vae-tile-stats", default_value = "tile", value_name = "tile|image")]
    vae_tile_stats: String,
    /// Print the memory plan (each stage's weights, compute buffer and the peak) and exit.
    #[arg(long = "plan")]
    plan_only: bool,
    #[arg(short, long, default_value = "output.png")]
    output: PathBuf,
}

fn parse_pair<const SEP: char>(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once(SEP).ok_or_else(|| format!("`{s}`: expected two numbers separated by `{SEP}`"))?;
    let num = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("`{v}` is not a non-negative integer"));
    Ok((num(a)?, num(b)?))
}

fn parse_pad(s: &str) -> Result<[usize; 4], String> {
    let v: Vec<usize> = s.split(',').map(|p| p.trim().parse::<usize>().map_err(|_| format!("`{p}` is not a non-negative integer"))).collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("`{s}`: expected four numbers L,T,R,B"))
}

pub(super) fn parse_budget(s: &str) -> Result<u64, String> {
    sdrs::budget::parse_size(s).ok_or_else(|| format!("`{s}` is not a size: write bytes or a number with K, M, G (binary) or KB, MB, GB"))
}

pub fn run(a: Args, threads: Option<usize>, target: &super::Target) -> Result<()> {
    if a.list_samplers {
        let mut o = String::new();
        out!(o, "{:<12} {:<13} {:>5} {:>10} {:>10}  about", "name", "A1111 name", "order", "evals/step", "stochastic");
        for i in Sampler::all() {
            out!(o, "{:<12} {:<13} {:>5} {:>10} {:>10}  {}", i.name, i.display, i.order, i.evals_per_step, if i.stochastic { "yes" } else { "no" }, i.about);
        }
        out!(o, "schedulers: {}", Schedule::NAMES.join(", "));
        return super::print_stdout(&o);
    }
    let Some(prompt) = a.prompt else { bail!("give a prompt with -p") };
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut pipe = match &a.model {
        Some(m) => Pipeline::load_with_threads(m, threads)?,
        None => demo_pipeline(threads)?,
    };
    pipe.max_memory = a.max_memory;
    if let Some(name) = &a.preset {
        let p = sdrs::config::Defaults::preset(name).with_context(|| format!("unknown preset `{name}`; valid: {}", sdrs::config::Defaults::PRESETS.join(", ")))?;
        pipe.defaults = pipe.defaults.over(&p);
    }
    target.apply(&mut pipe, threads)?;
    // What the user gave, else what the model file recommends (Pipeline::request),
    // else SD's usual settings.
    let base = pipe.request(&prompt);
    let sampler = match &a.sampler {
        None => base.sampler,
        Some(s) => Sampler::parse(s).with_context(|| format!("unknown sampler `{s}`; valid: {}", Sampler::names().join(", ")))?,
    };
    let schedule = match &a.scheduler {
        None => base.schedule,
        Some(s) => Schedule::parse(s).with_context(|| format!("unknown scheduler `{s}`; valid: {}", Schedule::NAMES.join(", ")))?,
    };
    let Some(rng) = RngKind::parse(&a.rng) else { bail!("unknown rng `{}`; valid: torch, native", a.rng) };
    if !(0.0..=1.0).contains(&a.guidance_rescale) {
        bail!("--guidance-rescale must be in [0, 1], not {}", a.guidance_rescale);
    }
    let Some(vae_tile_stats) = TileStats::parse(&a.vae_tile_stats) else { bail!("unknown --vae-tile-stats `{}`; valid: {}", a.vae_tile_stats, TileStats::NAMES.join(", ")) };
    let Some(emphasis) = Emphasis::parse(&a.emphasis) else { bail!("unknown emphasis `{}`; valid: {}", a.emphasis, Emphasis::NAMES.join(", ")) };
    for path in a.embedding_dir.iter().chain(&a.embeddings) {
        let n = pipe.add_embeddings(path)?;
        log::info!("{n} embedding(s) from {}", path.display());
    }
    let init = match &a.init_img {
        Some(path) => Some(Arc::new(open_canvas(&pipe, path, a.mask.as_deref(), (a.width, a.height), a.pad.unwrap_or_default(), a.mask_blur)?)),
        None => None,
    };
    let (width, height) = match &init {
        Some(c) => (c.width, c.height),
        None => (a.width.unwrap_or(base.width), a.height.unwrap_or(base.height)),
    };
    let req = Request {
        negative: a.negative,
        width,
        height,
        steps: a.steps.unwrap_or(base.steps),
        cfg_scale: a.cfg_scale.unwrap_or(base.cfg_scale),
        seed: a.seed,
        sampler,
        schedule,
        eta: a.eta,
        sigma_min: a.sigma_min,
        sigma_max: a.sigma_max,
        rng,
        guidance_rescale: a.guidance_rescale,
        zero_terminal_snr: a.zero_terminal_snr,
        taesd: a.taesd,
        original_size: a.original_size,
        crop_top_left: a.crop.unwrap_or((0, 0)),
        aesthetic_score: a.aesthetic_score.unwrap_or(base.aesthetic_score),
        init,
        strength: a.strength,
        overlay: !a.no_overlay,
        clip_skip: a.clip_skip,
        emphasis,
        loras: a.lora.iter().map(|s| super::convert::parse_lora(s)).collect(),
        lora_dir: a.lora_dir,
        vae_tiling: a.vae_tiling,
        vae_tile_stats,
        // Ctrl-C ends the run within one step and writes no image.
        cancel: Some(super::interrupt_flag()),
        ..base
    };
    pipe.latent_size(req.width, req.height)?;
    if a.plan_only {
        let plan = pipe.plan(&req)?;
        return super::print_stdout(&format!("memory plan for {}x{}:\n{}\n", req.width, req.height, plan.summary()));
    }
    let bar = super::progress_bar(req.steps as u64, "{spinner} [{bar:30}] step {pos}/{len} {per_sec} {msg}");
    let image = pipe.generate(&req, &mut |s| match s {
        Stage::TextEncoded | Stage::Sampling { .. } => bar.set_message("sampling"),
        Stage::Step { done, total } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        Stage::Decoding { done, total } => bar.set_message(format!("decoding tile {done}/{total}")),
        Stage::Decoded => bar.set_message("decoded"),
    })?;
    bar.finish_and_clear();
    image.save_png(&a.output)?;
    let [text, sampling, decode] = image.timings;
    eprintln!(
        "wrote {} ({}x{}): text {:.2} s, sampling {:.2} s ({:.2} s/step), decode {:.2} s",
        a.output.display(),
        image.width,
        image.height,
        text,
        sampling,
        sampling / (req.steps as f64 * req.strength()).floor().max(1.0),
        decode
    );
    Ok(())
}

/// The init image (and mask) at the output size: -W/-H where given (one alone keeps
/// the picture's aspect ratio), else the picture's own size.
fn open_canvas(pipe: &Pipeline, path: &std::path::Path, mask: Option<&std::path::Path>, size: (Option<usize>, Option<usize>), pad: [usize; 4], mask_blur: f32) -> Result<Canvas> {
    let multiple = pipe.size_multiple();
    let [l, t, r, b] = pad;
    let size = match size {
        (Some(w), Some(h)) => Some((w, h)),
        (None, None) => None,
        (w, h) => {
            let (iw, ih) = image::image_dimensions(path).with_context(|| format!("{}: cannot read the image's size", path.display()))?;
            let aspect = (iw as usize + l + r) as f64 / (ih as usize + t + b) as f64;
            let round = |v: f64| ((v / multiple as f64).round() as usize).max(1) * multiple;
            Some((w.unwrap_or_else(|| round(h.unwrap_or(0) as f64 * aspect)), h.unwrap_or_else(|| round(w.unwrap_or(0) as f64 / aspect))))
        }
    };
    let opts = CanvasOptions { size, multiple, pad, mask_blur };
    Ok(Canvas::open(path, mask, &opts)?)
}

#[cfg(feature = "demo-model")]
fn demo_pipeline(threads: usize) -> Result<Pipeline> {
    Ok(Pipeline::demo(threads)?)
}

#[cfg(not(feature = "demo-model"))]
fn demo_pipeline(_threads: usize) -> Result<Pipeline> {
    bail!("give a model with -m MODEL.gguf (this build has no built-in demo model: it was built without the `demo-model` feature)")
}
