use std::path::PathBuf;

use std::sync::Arc;

use anyhow::{bail, Result};

use sdrs::pipeline::hires::{Hires, LatentResize};
use sdrs::pipeline::upscale::Upscaler;
use sdrs::pipeline::{Canvas, CanvasOptions, Image, ImageFormat, Init, Pipeline, Request, Stage};
use sdrs::sample::{Sampler, Schedule};

use super::options::RequestFlags;

/// Generate an image from a prompt (txt2img), or from a prompt and a picture
/// (img2img with --init-img, inpainting with --mask, outpainting with --pad).
#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF (from `sdrs convert` or stable-diffusion.cpp), or a checkpoint
    /// (.safetensors, .ckpt, a diffusers folder) converted to f16 on the fly; without
    /// it, the built-in demo model (a tiny model of coloured shapes, 64x64, LCM 4 steps).
    #[arg(short, long)]
    pub(super) model: Option<PathBuf>,
    /// A VAE of its own (e.g. vae-ft-mse-840000-ema-pruned.safetensors; original or
    /// diffusers naming) used instead of the model's.
    #[arg(long)]
    pub(super) vae: Option<PathBuf>,
    /// The prompt (a text-to-image model needs one; an unconditional model takes none).
    #[arg(short, long)]
    pub(super) prompt: Option<String>,
    /// Seed; -1 picks a random one (printed, and recorded in the image).
    #[arg(short = 's', long, default_value_t = 42, allow_negative_numbers = true)]
    pub(super) seed: i64,
    /// How many images, one after another, seeds counting up from --seed; the outputs
    /// are numbered (a `%d` or `%03d` in -o, else `_2`, `_3`, ... before the extension).
    /// An unconditional model samples them as one batch from the seed's generator (as
    /// diffusers' pipelines do), the UNet taking as many at once as the memory plan allows.
    #[arg(short = 'b', long = "batch-count", default_value_t = 1)]
    pub(super) batch_count: usize,
    /// A class-conditional model's class: one for every image, or one per image
    /// (repeat the flag).
    #[arg(long = "class", allow_negative_numbers = true)]
    pub(super) classes: Vec<i32>,
    /// Also write all images of the batch side by side in one picture (PNG, JPEG or WebP).
    #[arg(long)]
    pub(super) grid: Option<PathBuf>,
    /// Image width [default: the init image's, else the preset's, else the model's, else 512].
    #[arg(short = 'W', long)]
    pub(super) width: Option<usize>,
    /// Image height [default: the init image's, else the preset's, else the model's, else 512].
    #[arg(short = 'H', long)]
    pub(super) height: Option<usize>,
    /// img2img: start from this picture (PNG or JPEG, any size and pixel format). Without
    /// -W/-H the output keeps its size, centre-cropped to the model's multiple; with them
    /// it is scaled to cover that size and centre-cropped (one given: the other follows
    /// the picture's aspect ratio).
    #[arg(short = 'i', long = "init-img")]
    pub(super) init_img: Option<PathBuf>,
    /// Inpainting: white repaints, black keeps (any size: stretched to the init image's).
    #[arg(long, requires = "init_img")]
    pub(super) mask: Option<PathBuf>,
    /// Gaussian blur of the mask in pixels (σ), softening where the original is pasted back.
    #[arg(long = "mask-blur", default_value_t = 4.0)]
    mask_blur: f32,
    /// Outpainting: extend the canvas by L,T,R,B pixels (without -W/-H, a padded side
    /// grows on to the model's multiple), filled from the picture's edges and masked.
    #[arg(long, value_parser = parse_pad, requires = "init_img")]
    pub(super) pad: Option<[usize; 4]>,
    /// Textual-inversion embedding (.pt, .bin, .safetensors; A1111, diffusers or SDXL
    /// clip_l/clip_g), triggered by its file's stem (or a diffusers file's token) in
    /// the prompt. Repeatable.
    #[arg(long = "embedding")]
    pub(super) embeddings: Vec<PathBuf>,
    /// A folder of embeddings, each triggered by its file's stem; files for other
    /// models are skipped with a warning.
    #[arg(long = "embedding-dir", alias = "embd-dir")]
    pub(super) embedding_dir: Option<PathBuf>,
    /// List the samplers with their order and whether they are stochastic, then exit.
    #[arg(long = "list-samplers")]
    list_samplers: bool,
    /// Print the memory plan (each stage's weights, compute buffer and the peak) and exit.
    #[arg(long = "plan")]
    pub(super) plan_only: bool,
    /// Output image: .png (parameters in a text chunk), .jpg/.jpeg or .webp
    /// (parameters in EXIF, as A1111 writes them).
    #[arg(short, long, default_value = "output.png")]
    pub(super) output: PathBuf,
    /// Write a preview of the image forming to this file (PNG, JPEG or WebP) as it
    /// samples, every --preview-every steps [default: 1] and after the last.
    #[arg(long)]
    pub(super) preview: Option<PathBuf>,
    /// JPEG quality, 1 to 100.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub(super) quality: u8,
    /// Upscale each image once it is made, with an ESRGAN-family model (.pth or
    /// .safetensors; see `sdrs upscale`), before it is written.
    #[arg(long = "upscale-model")]
    pub(super) upscale_model: Option<PathBuf>,
    /// Passes through --upscale-model, each multiplying the size by its scale.
    #[arg(
        long = "upscale-repeats",
        default_value_t = 1,
        requires = "upscale_model"
    )]
    pub(super) upscale_repeats: usize,
    /// Hires fix: make the image, enlarge it this many times (--hires-upscaler, else
    /// Lanczos) and repaint it at that size by img2img with the same prompt and seed.
    #[arg(long = "hires-scale")]
    pub(super) hires_scale: Option<f64>,
    /// The hires pass's steps before its denoising cut [default: --steps].
    #[arg(long = "hires-steps", requires = "hires_scale")]
    pub(super) hires_steps: Option<usize>,
    /// How much the hires pass repaints (it runs the last steps·D of its steps).
    #[arg(
        long = "hires-denoise",
        default_value_t = 0.7,
        requires = "hires_scale"
    )]
    pub(super) hires_denoise: f64,
    /// What enlarges the first pass for the hires fix: an ESRGAN-family model's file,
    /// or `latent` (bilinear), `latent-bicubic`, `latent-nearest`,
    /// `latent-nearest-exact` to enlarge its latent instead (A1111's "Latent"
    /// upscalers; the first pass is then never decoded) [default: Lanczos on pixels].
    #[arg(long = "hires-upscaler", requires = "hires_scale")]
    pub(super) hires_upscaler: Option<PathBuf>,
    /// A ControlNet steering the composition: our GGUF (`sdrs convert`), lllyasviel's
    /// ControlNet 1.0/1.1 .pth or .safetensors, or a diffusers ControlNetModel folder.
    /// Repeatable: the residuals of several add up.
    #[arg(long = "control-net")]
    pub(super) control_nets: Vec<PathBuf>,
    /// The conditioning image of each --control-net, in order (one for all): a map
    /// already made (edges, depth, pose, scribble, lineart), or a picture with --canny.
    /// It is fitted to the output size as --init-img is.
    #[arg(long = "control-image", requires = "control_nets")]
    pub(super) control_images: Vec<PathBuf>,
    /// Scale of the residuals: one for all ControlNets or one each [default: 1].
    #[arg(long = "control-strength", requires = "control_nets")]
    control_strength: Vec<f32>,
    /// The share of the steps before a ControlNet starts acting: one for all or one
    /// each [default: 0].
    #[arg(long = "control-start", requires = "control_nets")]
    control_start: Vec<f32>,
    /// The share of the steps after which a ControlNet stops acting: one for all or
    /// one each [default: 1].
    #[arg(long = "control-end", requires = "control_nets")]
    control_end: Vec<f32>,
    /// Guess mode: the negative branch gets no residuals and the deep ones weigh
    /// most, so the control shows even with an empty prompt.
    #[arg(long = "guess-mode", requires = "control_nets")]
    guess_mode: bool,
    /// Turn each control image into a canny edge map first (white edges on black).
    #[arg(long, requires = "control_nets")]
    canny: bool,
    /// The canny preprocessor's lower and upper thresholds on the gradient magnitude.
    #[arg(long = "canny-low", default_value_t = sdrs::pipeline::preprocess::CANNY_LOW)]
    canny_low: f32,
    #[arg(long = "canny-high", default_value_t = sdrs::pipeline::preprocess::CANNY_HIGH)]
    canny_high: f32,
    /// What to generate and how: the options every front end shares.
    #[command(flatten)]
    pub(super) request: RequestFlags,
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
    sdrs::pipeline::options::parse_bytes(s)
}

pub fn run(a: Args, threads: Option<usize>, target: &super::Target) -> Result<()> {
    if a.list_samplers {
        let mut o = String::new();
        out!(
            o,
            "{:<13} {:<13} {:>5} {:>10} {:>10}  about",
            "name",
            "A1111 name",
            "order",
            "evals/step",
            "stochastic"
        );
        for i in Sampler::all() {
            out!(
                o,
                "{:<13} {:<13} {:>5} {:>10} {:>10}  {}",
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
    // Everything that can be checked without the model is, before it loads.
    let format = ImageFormat::from_path(&a.output, a.quality)?;
    let preview = match &a.preview {
        Some(path) => Some((path.clone(), ImageFormat::from_path(path, a.quality)?)),
        None => None,
    };
    if a.request.has("preview-every") && a.preview.is_none() {
        bail!("--preview-every needs --preview FILE");
    }
    // The request options on a stand-in request: a bad value is refused before the
    // model loads.
    let mut probe = Request::new("");
    if a.init_img.is_some() {
        let stand_in = Canvas {
            width: 1,
            height: 1,
            rgb: vec![0; 3],
            mask: None,
            mask_blur: 0.0,
        };
        probe.init = Some(Init::new(Arc::new(stand_in)));
    }
    for (option, value) in &a.request.given {
        option.apply(&mut probe, value.clone())?;
    }
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
    if a.upscale_repeats == 0 {
        bail!("--upscale-repeats must be at least 1");
    }
    // Upscalers load first: a file that is not one is refused before any work.
    let load_upscaler = |path: &Option<PathBuf>| -> Result<Option<Upscaler>> {
        Ok(match path {
            Some(p) => Some(Upscaler::load(p, super::thread_count(threads))?),
            None => None,
        })
    };
    let upscaler = load_upscaler(&a.upscale_model)?;
    // `latent`, `latent-bicubic`, … (or A1111's "Latent (…)" names) enlarge the
    // latent; anything else is an upscaler's file.
    let hires_latent = a
        .hires_upscaler
        .as_ref()
        .and_then(|p| p.to_str())
        .and_then(LatentResize::parse);
    let hires_upscaler = match hires_latent {
        Some(_) => None,
        None => load_upscaler(&a.hires_upscaler)?,
    };
    let hires = a.hires_scale.map(|scale| Hires {
        scale,
        steps: a.hires_steps,
        denoise: a.hires_denoise,
        upscaler: hires_upscaler.as_ref(),
        latent: hires_latent,
    });
    let repeats = a.upscale_repeats;
    let upscale = |image: Image| -> Result<Image> {
        match &upscaler {
            Some(up) => super::upscale::upscale(up, &image, repeats),
            None => Ok(image),
        }
    };
    // A model that takes no prompt has its own run (it reads the model's config only).
    if let Some(m) = a.model.clone() {
        if super::sample::is_unconditional(&m)? {
            if hires.is_some() {
                bail!(
                    "the hires fix repaints with a prompt: {} samples from noise alone",
                    m.display()
                );
            }
            if !a.control_nets.is_empty() {
                bail!(
                    "a ControlNet steers a text-to-image UNet: {} samples from noise alone",
                    m.display()
                );
            }
            return super::sample::run(a, &m, seed, format, threads, &upscale);
        }
    }
    if !a.classes.is_empty() || a.grid.is_some() {
        bail!("--class and --grid are for unconditional and class-conditional models (DDPM, LDM); this model takes a prompt");
    }
    let Some(prompt) = a.prompt.clone() else {
        bail!("give a prompt with -p")
    };
    let threads = super::thread_count(threads);
    let mut pipe = match &a.model {
        Some(m) => load(m, threads)?,
        None => demo_pipeline(threads)?,
    };
    target.apply(&mut pipe, threads)?;
    if let Some(vae) = &a.vae {
        pipe.set_vae(vae)?;
    }
    for path in a.embedding_dir.iter().chain(&a.embeddings) {
        let n = pipe.add_embeddings(path)?;
        log::info!("{n} embedding(s) from {}", path.display());
    }
    let canvas = match &a.init_img {
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
    // The request options apply over what the model file recommends
    // (Pipeline::request), else SD's usual settings; the init picture comes first, as
    // strength and overlay belong to it.
    let mut req = Request {
        seed,
        // Ctrl-C ends the run within one step and writes no image.
        cancel: Some(super::interrupt_flag()),
        init: canvas.map(Init::new),
        ..pipe.request(&prompt)
    };
    for (option, value) in &a.request.given {
        option.apply(&mut req, value.clone())?;
    }
    req.settle_size((a.width, a.height));
    req.decoding.preview_every = match &preview {
        Some(_) => req.decoding.preview_every.max(1),
        None => 0,
    };
    pipe.latent_size(req.width, req.height)?;
    req.controls = controls(&a, &pipe, (req.width, req.height))?;
    if let Some(h) = &hires {
        let (w, ht) = h.size((req.width, req.height), pipe.size_multiple());
        pipe.latent_size(w, ht)?;
        if req.init.is_some() {
            bail!("--hires-scale repaints a text-to-image result: it takes no --init-img");
        }
    }
    if a.plan_only {
        let plan = pipe.plan(&req)?;
        let mut text = format!(
            "memory plan for {}x{}:\n{}\n",
            req.width,
            req.height,
            plan.summary()
        );
        if let Some(up) = &upscaler {
            text += &super::upscale::plan_text(up, (req.width, req.height))?;
        }
        if let Some(h) = &hires {
            let second = h.second_pass(&req, pipe.size_multiple(), None, None);
            text += &format!(
                "hires pass at {}x{}:\n{}\n",
                second.width,
                second.height,
                pipe.plan(&second)?.summary()
            );
        }
        return super::print_stdout(&text);
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
        let hires = hires.as_ref();
        draw(
            &pipe,
            (&req, hires),
            &output,
            (format, preview.as_ref()),
            &upscale,
        )?;
    }
    Ok(())
}

/// One image of the batch, drawn and written.
fn draw(
    pipe: &Pipeline,
    (req, hires): (&Request, Option<&Hires<'_>>),
    output: &std::path::Path,
    (format, preview): (ImageFormat, Option<&(PathBuf, ImageFormat)>),
    upscale: &dyn Fn(Image) -> Result<Image>,
) -> Result<()> {
    let bar = super::progress_bar(
        req.steps as u64,
        "{spinner} [{bar:30}] step {pos}/{len} {per_sec} {msg}",
    );
    let mut on_stage = |s: Stage| match s {
        Stage::TextEncoded | Stage::Sampling { .. } => bar.set_message("sampling"),
        Stage::Step { done, total } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        Stage::Sampled => bar.set_message("decoding"),
        Stage::Decoding { done, total } => bar.set_message(format!("decoding tile {done}/{total}")),
        Stage::Decoded => bar.set_message("decoded"),
        Stage::Preview { image, .. } => {
            if let Some((path, format)) = preview {
                if let Err(e) = image.save(path, *format) {
                    log::warn!("preview: {e}");
                }
            }
        }
    };
    let image = match hires {
        Some(h) => pipe.generate_hires(req, h, &mut on_stage)?,
        None => pipe.generate(req, &mut on_stage)?,
    };
    bar.finish_and_clear();
    let image = upscale(image)?;
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
pub(super) fn numbered(output: &std::path::Path, i: usize, n: usize) -> PathBuf {
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

/// `v`'s value for the `i`th of `n` ControlNets: one for all, or one each.
fn per_net(v: &[f32], i: usize, n: usize, default: f32, flag: &str) -> Result<f32> {
    match v.len() {
        0 => Ok(default),
        1 => Ok(v[0]),
        m if m == n => Ok(v[i]),
        m => bail!("{m} values of --{flag} for {n} ControlNets: give one for all, or one each"),
    }
}

/// The request's ControlNets with their images at the output size (edges first with
/// --canny).
fn controls(
    a: &Args,
    pipe: &Pipeline,
    size: (usize, usize),
) -> Result<Vec<sdrs::pipeline::Control>> {
    let n = a.control_nets.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let images = a.control_images.len();
    if images != 1 && images != n {
        bail!("{n} ControlNets need one --control-image each (or one for all), not {images}");
    }
    let opts = CanvasOptions {
        size: Some(size),
        multiple: pipe.size_multiple(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(n);
    for (i, path) in a.control_nets.iter().enumerate() {
        let net = Arc::new(sdrs::pipeline::ControlNet::open(path)?);
        let image = &a.control_images[if images == 1 { 0 } else { i }];
        let mut canvas = Canvas::open(image, None, &opts)?;
        if a.canny {
            canvas = sdrs::pipeline::preprocess::canny(&canvas, a.canny_low, a.canny_high)?;
        }
        out.push(sdrs::pipeline::Control {
            strength: per_net(&a.control_strength, i, n, 1.0, "control-strength")?,
            start: per_net(&a.control_start, i, n, 0.0, "control-start")?,
            end: per_net(&a.control_end, i, n, 1.0, "control-end")?,
            guess: a.guess_mode,
            module: if a.canny { "canny" } else { "none" }.into(),
            ..sdrs::pipeline::Control::new(net, Arc::new(canvas))
        });
    }
    Ok(out)
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
    let size = match size {
        (None, None) => None,
        size => {
            let picture = image::image_dimensions(path).map_err(|e| {
                anyhow::anyhow!("{}: cannot read the image's size: {e}", path.display())
            })?;
            Canvas::size_for(picture, size, pad, multiple)
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
