use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::builder::TypedValueParser as _;

use std::sync::Arc;

use sdrs::model::tile::TileStats;
use sdrs::pipeline::ImageFormat;
use sdrs::pipeline::{
    Canvas, CanvasOptions, Decoding, Init, MicroConditioning, Pipeline, Prompting, Request,
    RngKind, Sampling, Stage,
};
use sdrs::prompt::Emphasis;
use sdrs::sample::{names, Sampler, Schedule};

/// Generate an image from a prompt (txt2img), or from a prompt and a picture
/// (img2img with --init-img, inpainting with --mask, outpainting with --pad).
#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF (from `sdrs convert` or stable-diffusion.cpp), or a checkpoint
    /// (.safetensors, .ckpt, a diffusers folder) converted to f16 on the fly; without
    /// it, the built-in demo model (a tiny model of coloured shapes, 64x64, LCM 4 steps).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// A VAE of its own (e.g. vae-ft-mse-840000-ema-pruned.safetensors; original or
    /// diffusers naming) used instead of the model's.
    #[arg(long)]
    vae: Option<PathBuf>,
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
    /// Seed; -1 picks a random one (printed, and recorded in the image).
    #[arg(short = 's', long, default_value_t = 42, allow_negative_numbers = true)]
    seed: i64,
    /// How many images, one after another, seeds counting up from --seed; the outputs
    /// are numbered (a `%d` or `%03d` in -o, else `_2`, `_3`, ... before the extension).
    #[arg(short = 'b', long = "batch-count", default_value_t = 1)]
    batch_count: usize,
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
    #[arg(long, default_value = "original", value_parser = clap::builder::PossibleValuesParser::new(Emphasis::NAMES.iter().copied()))]
    emphasis: String,
    /// Textual-inversion embedding (.pt, .bin, .safetensors; A1111, diffusers or SDXL
    /// clip_l/clip_g), triggered by its file's stem (or a diffusers file's token) in
    /// the prompt. Repeatable.
    #[arg(long = "embedding")]
    embeddings: Vec<PathBuf>,
    /// A folder of embeddings, each triggered by its file's stem; files for other
    /// models are skipped with a warning.
    #[arg(long = "embedding-dir", alias = "embd-dir")]
    embedding_dir: Option<PathBuf>,
    /// Apply a LoRA at run time, beside the model's weights (the model file is not
    /// changed): FILE or FILE:MULTIPLIER [default 1]; repeatable. LCM-LoRA too.
    #[arg(long, value_name = "FILE[:MULTIPLIER]")]
    lora: Vec<String>,
    /// Where the prompt's <lora:NAME:MULTIPLIER> tags find NAME.safetensors (.pt, .ckpt, .bin).
    #[arg(long = "lora-dir", alias = "lora-model-dir")]
    lora_dir: Option<PathBuf>,
    /// A distilled model's recipe (size, sampler, schedule, steps, guidance): sdxl-turbo,
    /// sd-turbo, sdxl-lightning-2step, -4step, -8step; options given beside it win.
    #[arg(long)]
    preset: Option<String>,
    /// Sampler (see --list-samplers); the peer's, A1111's ("DPM++ 2M Karras") and
    /// ComfyUI's (euler_ancestral, dpmpp_2m) names work too [default: the model's, else euler].
    #[arg(long, alias = "sampling-method", value_parser = SAMPLER_NAME)]
    sampler: Option<(Sampler, Option<Schedule>)>,
    /// σ schedule (A1111's and ComfyUI's names work too) [default: the model's, else discrete].
    #[arg(long, alias = "schedule", value_parser = SCHEDULE_NAME)]
    scheduler: Option<Schedule>,
    /// Noise of ancestral/SDE/DDIM steps (DDIM: 0 deterministic, 1 DDPM; TCD: its γ).
    #[arg(long)]
    eta: Option<f64>,
    #[arg(long = "sigma-min")]
    sigma_min: Option<f64>,
    #[arg(long = "sigma-max")]
    sigma_max: Option<f64>,
    /// Noise generator: torch (torch's CPU generator: diffusers' and A1111's "CPU"
    /// noise for a seed), cuda (torch's CUDA generator: A1111's default on NVIDIA GPUs,
    /// stable-diffusion.cpp's --rng cuda) or native (sdrs' own).
    #[arg(long, default_value = "torch", value_parser = clap::builder::PossibleValuesParser::new(["torch", "cuda", "native", "cpu", "gpu", "nv"]).map(|s| RngKind::parse(&s).unwrap_or(RngKind::Torch)))]
    rng: RngKind,
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
    #[arg(long = "vae-tile-stats", default_value = "tile", value_parser = ["tile", "image"])]
    vae_tile_stats: String,
    /// Print the memory plan (each stage's weights, compute buffer and the peak) and exit.
    #[arg(long = "plan")]
    plan_only: bool,
    /// Output image: .png (parameters in a text chunk), .jpg/.jpeg or .webp
    /// (parameters in EXIF, as A1111 writes them).
    #[arg(short, long, default_value = "output.png")]
    output: PathBuf,
    /// Write a preview of the image forming to this file (PNG, JPEG or WebP) as it
    /// samples: through --taesd's decoder when given, else a fast latent-to-RGB
    /// projection (SD 1.x/2.x and SDXL latents), else the model's VAE.
    #[arg(long)]
    preview: Option<PathBuf>,
    /// Preview every N steps (and after the last).
    #[arg(long = "preview-every", default_value_t = 1, requires = "preview", value_parser = clap::value_parser!(u64).range(1..))]
    preview_every: u64,
    /// JPEG quality, 1 to 100.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: u8,
}

/// A value named in one of several spellings ([`sdrs::sample::names`]): `--help`
/// lists sdrs' own names, and a name nobody uses is refused with them.
#[derive(Clone, Copy)]
struct Named<T: 'static> {
    what: &'static str,
    parse: fn(&str) -> Option<T>,
    listed: fn() -> Vec<&'static str>,
}

impl<T: Clone + Send + Sync + 'static> clap::builder::TypedValueParser for Named<T> {
    type Value = T;
    fn parse_ref(
        &self,
        _: &clap::Command,
        _: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let v = value.to_string_lossy();
        (self.parse)(&v).ok_or_else(|| {
            let valid = (self.listed)().join(", ");
            let msg = format!("unknown {} `{v}`; valid: {valid}\n", self.what);
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, msg)
        })
    }
    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        let names = (self.listed)().into_iter();
        Some(Box::new(names.map(clap::builder::PossibleValue::new)))
    }
}

/// `--sampler`.
const SAMPLER_NAME: Named<(Sampler, Option<Schedule>)> = Named {
    what: "sampler",
    parse: names::sampler,
    listed: names::sampler_names,
};

/// `--scheduler`: sdrs' names listed, every spelling in the message.
const SCHEDULE_NAME: Named<Schedule> = Named {
    what: "scheduler",
    parse: names::schedule,
    listed: || Schedule::NAMES.to_vec(),
};

fn parse_pair<const SEP: char>(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once(SEP)
        .ok_or_else(|| format!("`{s}`: expected two numbers separated by `{SEP}`"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{v}` is not a non-negative integer"))
    };
    Ok((num(a)?, num(b)?))
}

fn parse_pad(s: &str) -> Result<[usize; 4], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{p}` is not a non-negative integer"))
        })
        .collect::<Result<_, _>>()?;
    v.try_into()
        .map_err(|_| format!("`{s}`: expected four numbers L,T,R,B"))
}

pub(super) fn parse_budget(s: &str) -> Result<u64, String> {
    sdrs::budget::parse_size(s).ok_or_else(|| {
        format!("`{s}` is not a size: write bytes or a number with K, M, G (binary) or KB, MB, GB")
    })
}

pub fn run(a: Args, threads: Option<usize>, target: &super::Target) -> Result<()> {
    if a.list_samplers {
        let mut o = String::new();
        out!(
            o,
            "{:<12} {:<13} {:>5} {:>10} {:>10}  about",
            "name",
            "A1111 name",
            "order",
            "evals/step",
            "stochastic"
        );
        for i in Sampler::all() {
            out!(
                o,
                "{:<12} {:<13} {:>5} {:>10} {:>10}  {}",
                i.name,
                i.display,
                i.order,
                i.evals_per_step,
                if i.stochastic { "yes" } else { "no" },
                i.about
            );
        }
        out!(o, "schedulers: {}", Schedule::NAMES.join(", "));
        return super::print_stdout(&o);
    }
    let Some(prompt) = a.prompt.clone() else {
        bail!("give a prompt with -p")
    };
    // Everything that can be checked without the model is, before it loads.
    let format = ImageFormat::from_path(&a.output, a.quality)?;
    let preview = match &a.preview {
        Some(path) => Some((path.clone(), ImageFormat::from_path(path, a.quality)?)),
        None => None,
    };
    let Some(vae_tile_stats) = TileStats::parse(&a.vae_tile_stats) else {
        bail!(
            "unknown --vae-tile-stats `{}`; valid: {}",
            a.vae_tile_stats,
            TileStats::NAMES.join(", ")
        )
    };
    let Some(emphasis) = Emphasis::parse(&a.emphasis) else {
        bail!(
            "unknown emphasis `{}`; valid: {}",
            a.emphasis,
            Emphasis::NAMES.join(", ")
        )
    };
    if !(0.0..=1.0).contains(&a.guidance_rescale) {
        bail!(
            "--guidance-rescale must be in [0, 1], not {}",
            a.guidance_rescale
        );
    }
    let preset = match &a.preset {
        Some(name) => Some(sdrs::config::Defaults::preset(name).with_context(|| {
            format!(
                "unknown preset `{name}`; valid: {}",
                sdrs::config::Defaults::PRESETS.join(", ")
            )
        })?),
        None => None,
    };
    let seed = match a.seed {
        -1 => random_seed(),
        s if s < 0 => {
            bail!("--seed must be a non-negative integer, or -1 for a random one (not {s})")
        }
        s => s as u64,
    };
    if a.batch_count == 0 {
        bail!("--batch-count must be at least 1");
    }
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut pipe = match &a.model {
        Some(m) => load(m, threads)?,
        None => demo_pipeline(threads)?,
    };
    pipe.max_memory = a.max_memory;
    if let Some(p) = &preset {
        pipe.defaults = pipe.defaults.over(p);
    }
    target.apply(&mut pipe, threads)?;
    if let Some(vae) = &a.vae {
        pipe.set_vae(vae)?;
    }
    // What the user gave, else what the model file recommends (Pipeline::request),
    // else SD's usual settings.
    let base = pipe.request(&prompt);
    let (sampler, implied) = a.sampler.unwrap_or((base.sampling.sampler, None));
    let schedule = a.scheduler.or(implied).unwrap_or(base.sampling.schedule);
    for path in a.embedding_dir.iter().chain(&a.embeddings) {
        let n = pipe.add_embeddings(path)?;
        log::info!("{n} embedding(s) from {}", path.display());
    }
    let init = match &a.init_img {
        Some(path) => Some(Arc::new(open_canvas(
            &pipe,
            path,
            a.mask.as_deref(),
            (a.width, a.height),
            a.pad.unwrap_or_default(),
            a.mask_blur,
        )?)),
        None => None,
    };
    let (width, height) = match &init {
        Some(c) => (c.width, c.height),
        None => (
            a.width.unwrap_or(base.width),
            a.height.unwrap_or(base.height),
        ),
    };
    let req = Request {
        negative: a.negative.clone(),
        width,
        height,
        steps: a.steps.unwrap_or(base.steps),
        cfg_scale: a.cfg_scale.unwrap_or(base.cfg_scale),
        seed,
        loras: a
            .lora
            .iter()
            .map(|s| super::convert::parse_lora(s))
            .collect(),
        // Ctrl-C ends the run within one step and writes no image.
        cancel: Some(super::interrupt_flag()),
        sampling: Sampling {
            sampler,
            schedule,
            eta: a.eta,
            sigma_min: a.sigma_min,
            sigma_max: a.sigma_max,
            rng: a.rng,
            guidance_rescale: a.guidance_rescale,
            zero_terminal_snr: a.zero_terminal_snr,
        },
        decoding: Decoding {
            taesd: a.taesd.clone(),
            vae_tiling: a.vae_tiling,
            vae_tile_stats,
            preview_every: if preview.is_some() {
                a.preview_every as usize
            } else {
                0
            },
        },
        micro: MicroConditioning {
            original_size: a.original_size,
            crop_top_left: a.crop.unwrap_or((0, 0)),
            aesthetic_score: a.aesthetic_score.unwrap_or(base.micro.aesthetic_score),
            ..base.micro
        },
        prompting: Prompting {
            clip_skip: a.clip_skip,
            emphasis,
            lora_dir: a.lora_dir.clone(),
        },
        init: init.map(|canvas| Init {
            strength: a.strength,
            overlay: !a.no_overlay,
            ..Init::new(canvas)
        }),
        ..base
    };
    pipe.latent_size(req.width, req.height)?;
    if a.plan_only {
        let plan = pipe.plan(&req)?;
        return super::print_stdout(&format!(
            "memory plan for {}x{}:\n{}\n",
            req.width,
            req.height,
            plan.summary()
        ));
    }
    if a.seed == -1 {
        eprintln!("seed {seed}");
    }
    for i in 0..a.batch_count {
        let req = Request {
            seed: seed + i as u64,
            ..req.clone()
        };
        let output = numbered(&a.output, i, a.batch_count);
        draw(&pipe, &req, &output, format, preview.as_ref())?;
    }
    Ok(())
}

/// One image of the batch, drawn and written.
fn draw(
    pipe: &Pipeline,
    req: &Request,
    output: &std::path::Path,
    format: ImageFormat,
    preview: Option<&(PathBuf, ImageFormat)>,
) -> Result<()> {
    let bar = super::progress_bar(
        req.steps as u64,
        "{spinner} [{bar:30}] step {pos}/{len} {per_sec} {msg}",
    );
    let image = pipe.generate(req, &mut |s| match s {
        Stage::TextEncoded | Stage::Sampling { .. } => bar.set_message("sampling"),
        Stage::Step { done, total } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        Stage::Decoding { done, total } => bar.set_message(format!("decoding tile {done}/{total}")),
        Stage::Decoded => bar.set_message("decoded"),
        Stage::Preview { image, .. } => {
            if let Some((path, format)) = preview {
                if let Err(e) = image.save(path, *format) {
                    log::warn!("preview: {e}");
                }
            }
        }
    })?;
    bar.finish_and_clear();
    image.save(output, format)?;
    let [text, sampling, decode] = image.timings;
    eprintln!(
        "wrote {} ({}x{}, seed {}): text {:.2} s, sampling {:.2} s ({:.2} s/step), decode {:.2} s",
        output.display(),
        image.width,
        image.height,
        req.seed,
        text,
        sampling,
        sampling / (req.steps as f64 * req.strength()).floor().max(1.0),
        decode
    );
    Ok(())
}

/// A model file: a GGUF as it is, a checkpoint converted first (with its progress).
fn load(path: &std::path::Path, threads: usize) -> Result<Pipeline> {
    if sdrs::formats::gguf::is_gguf(path)? {
        return Ok(Pipeline::load_gguf(path, threads)?);
    }
    eprintln!("{} is not a GGUF: converting it to f16 for this run (`sdrs convert {} --type q8_0 -o model.gguf` makes a smaller file that loads at once)", path.display(), path.display());
    let bar = super::progress_bar(
        0,
        "{spinner} converting [{bar:30}] {bytes}/{total_bytes} {msg}",
    );
    let cancel = super::interrupt_flag();
    let pipe = Pipeline::open(path, threads, &cancel, &mut |p| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(format!("{}/{} tensors", p.tensors_done, p.tensors_total));
    })?;
    bar.finish_and_clear();
    Ok(pipe)
}

/// A seed below 2³², as A1111 takes them, from the OS's randomness (std's hasher keys).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() & 0xFFFF_FFFF
}

/// The file of image `i` of `n`: `-o` with its `%d`/`%0Nd` filled in (from 1), else for
/// n > 1 `_2`, `_3`, ... before the extension from the second image on (as
/// stable-diffusion.cpp numbers its batches).
fn numbered(output: &std::path::Path, i: usize, n: usize) -> PathBuf {
    let s = output.to_string_lossy();
    if let Some(at) = s.find('%') {
        let spec = &s[at + 1..];
        let digits: String = spec.chars().take_while(|c| c.is_ascii_digit()).collect();
        if spec[digits.len()..].starts_with('d') {
            let width = digits.parse::<usize>().unwrap_or(0);
            return PathBuf::from(format!(
                "{}{:0width$}{}",
                &s[..at],
                i + 1,
                &spec[digits.len() + 1..]
            ));
        }
    }
    if n == 1 || i == 0 {
        return output.to_path_buf();
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match output.extension() {
        Some(ext) => format!("{stem}_{}.{}", i + 1, ext.to_string_lossy()),
        None => format!("{stem}_{}", i + 1),
    };
    output.with_file_name(name)
}

/// The init image (and mask) at the output size: -W/-H where given (one alone keeps
/// the picture's aspect ratio), else the picture's own size.
fn open_canvas(
    pipe: &Pipeline,
    path: &std::path::Path,
    mask: Option<&std::path::Path>,
    size: (Option<usize>, Option<usize>),
    pad: [usize; 4],
    mask_blur: f32,
) -> Result<Canvas> {
    let multiple = pipe.size_multiple();
    let [l, t, r, b] = pad;
    let size = match size {
        (Some(w), Some(h)) => Some((w, h)),
        (None, None) => None,
        (w, h) => {
            let (iw, ih) = image::image_dimensions(path)
                .with_context(|| format!("{}: cannot read the image's size", path.display()))?;
            let aspect = (iw as usize + l + r) as f64 / (ih as usize + t + b) as f64;
            let round = |v: f64| ((v / multiple as f64).round() as usize).max(1) * multiple;
            Some((
                w.unwrap_or_else(|| round(h.unwrap_or(0) as f64 * aspect)),
                h.unwrap_or_else(|| round(w.unwrap_or(0) as f64 / aspect)),
            ))
        }
    };
    let opts = CanvasOptions {
        size,
        multiple,
        pad,
        mask_blur,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_outputs_are_numbered_by_pattern_or_suffix() {
        let p = |s: &str, i, n| {
            numbered(std::path::Path::new(s), i, n)
                .to_string_lossy()
                .into_owned()
        };
        assert_eq!(p("out/img-%03d.png", 0, 3), "out/img-001.png");
        assert_eq!(p("img%d.jpg", 11, 12), "img12.jpg");
        assert_eq!(p("a/out.png", 0, 3), "a/out.png");
        assert_eq!(p("a/out.png", 2, 3), "a/out_3.png");
        assert_eq!(p("out.png", 0, 1), "out.png");
        assert_eq!(p("100%.png", 1, 2), "100%_2.png");
    }
}
