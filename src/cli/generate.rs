use std::path::PathBuf;

use anyhow::{bail, Result};

use sdrs::pipeline::{Pipeline, Request, RngKind, Stage};
use sdrs::sample::{Sampler, Schedule};

/// Generate an image from a prompt (txt2img).
#[derive(clap::Args)]
pub struct Args {
    /// Model GGUF (from `sdrs convert`).
    #[arg(short, long, required_unless_present = "list_samplers")]
    model: Option<PathBuf>,
    #[arg(short, long, required_unless_present = "list_samplers")]
    prompt: Option<String>,
    /// Negative prompt.
    #[arg(short = 'n', long = "negative-prompt", default_value = "")]
    negative: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Classifier-free guidance scale; 1 skips the unconditional pass.
    #[arg(long = "cfg-scale", default_value_t = 7.0)]
    cfg_scale: f32,
    #[arg(short = 's', long, default_value_t = 42)]
    seed: u64,
    #[arg(short = 'W', long, default_value_t = 512)]
    width: usize,
    #[arg(short = 'H', long, default_value_t = 512)]
    height: usize,
    /// Sampler (see --list-samplers).
    #[arg(long, default_value = "euler")]
    sampler: String,
    /// σ schedule: discrete, leading, trailing, karras, exponential, ays, sgm_uniform, simple.
    #[arg(long, default_value = "discrete")]
    scheduler: String,
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
    /// Rescale the noise schedule to zero terminal SNR (models trained that way).
    #[arg(long = "zero-terminal-snr")]
    zero_terminal_snr: bool,
    /// List the samplers with their order and whether they are stochastic, then exit.
    #[arg(long = "list-samplers")]
    list_samplers: bool,
    /// Decode with a TAESD-family decoder (`taesd_decoder.pth`) instead of the VAE.
    #[arg(long)]
    taesd: Option<PathBuf>,
    #[arg(short, long, default_value = "output.png")]
    output: PathBuf,
}

pub fn run(a: Args, threads: Option<usize>) -> Result<()> {
    if a.list_samplers {
        let mut o = String::new();
        out!(o, "{:<12} {:<13} {:>5} {:>10} {:>10}  about", "name", "A1111 name", "order", "evals/step", "stochastic");
        for i in Sampler::all() {
            out!(o, "{:<12} {:<13} {:>5} {:>10} {:>10}  {}", i.name, i.display, i.order, i.evals_per_step, if i.stochastic { "yes" } else { "no" }, i.about);
        }
        out!(o, "schedulers: {}", Schedule::NAMES.join(", "));
        return super::print_stdout(&o);
    }
    let (Some(model), Some(prompt)) = (a.model, a.prompt) else { bail!("give -m MODEL.gguf and -p PROMPT") };
    let Some(sampler) = Sampler::parse(&a.sampler) else {
        bail!("unknown sampler `{}`; valid: {}", a.sampler, Sampler::names().join(", "));
    };
    let Some(schedule) = Schedule::parse(&a.scheduler) else {
        bail!("unknown scheduler `{}`; valid: {}", a.scheduler, Schedule::NAMES.join(", "));
    };
    let Some(rng) = RngKind::parse(&a.rng) else { bail!("unknown rng `{}`; valid: torch, native", a.rng) };
    if !(0.0..=1.0).contains(&a.guidance_rescale) {
        bail!("--guidance-rescale must be in [0, 1], not {}", a.guidance_rescale);
    }
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pipe = Pipeline::load_with_threads(&model, threads)?;
    let req = Request {
        negative: a.negative,
        width: a.width,
        height: a.height,
        steps: a.steps,
        cfg_scale: a.cfg_scale,
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
        ..Request::new(&prompt)
    };
    pipe.latent_size(req.width, req.height)?;
    let bar = super::progress_bar(req.steps as u64, "{spinner} [{bar:30}] step {pos}/{len} {per_sec} {msg}");
    let image = pipe.generate(&req, &mut |s| match s {
        Stage::TextEncoded | Stage::Sampling { .. } => bar.set_message("sampling"),
        Stage::Step { done, total } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
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
        sampling / req.steps as f64,
        decode
    );
    Ok(())
}
