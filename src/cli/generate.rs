use std::path::PathBuf;

use anyhow::{bail, Result};

use sdrs::pipeline::{Pipeline, Request, Stage};
use sdrs::sample::Sampler;

/// Generate an image from a prompt (txt2img).
#[derive(clap::Args)]
pub struct Args {
    /// Model GGUF (from `sdrs convert`).
    #[arg(short, long)]
    model: PathBuf,
    #[arg(short, long)]
    prompt: String,
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
    /// euler or ddim.
    #[arg(long, default_value = "euler")]
    sampler: String,
    /// Decode with a TAESD-family decoder (`taesd_decoder.pth`) instead of the VAE.
    #[arg(long)]
    taesd: Option<PathBuf>,
    #[arg(short, long, default_value = "output.png")]
    output: PathBuf,
}

pub fn run(a: Args, threads: Option<usize>) -> Result<()> {
    let Some(sampler) = Sampler::parse(&a.sampler) else {
        bail!("unknown sampler `{}`; valid: {}", a.sampler, Sampler::NAMES.join(", "));
    };
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pipe = Pipeline::load_with_threads(&a.model, threads)?;
    let req = Request { prompt: a.prompt, negative: a.negative, width: a.width, height: a.height, steps: a.steps, cfg_scale: a.cfg_scale, seed: a.seed, sampler, taesd: a.taesd, noise: None };
    pipe.latent_size(req.width, req.height)?;
    let bar = super::progress_bar(req.steps as u64, "{spinner} [{bar:30}] step {pos}/{len} {per_sec} {msg}");
    let image = pipe.generate(&req, &mut |s| match s {
        Stage::TextEncoded | Stage::Sampling { .. } => bar.set_message("sampling"),
        Stage::Step { done, .. } => bar.set_position(done as u64),
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
