//! `generate` for models that take no prompt: unconditional and class-conditional
//! diffusion (DDPM and its pixel-space UNets), a batch from one seed.
use std::path::Path;

use anyhow::{bail, Result};

use sdrs::pipeline::unconditional::{Batch, Unconditional};
use sdrs::pipeline::{Image, ImageFormat, Stage};

use super::generate::{numbered, Args};

/// The request options that mean something without a prompt.
const APPLIES: &[&str] = &[
    "steps",
    "sampler",
    "scheduler",
    "eta",
    "sigma-min",
    "sigma-max",
    "rng",
    "zero-terminal-snr",
    "max-memory",
];

/// Whether `path` holds a model that takes no text (read from its config, nothing loaded).
pub fn is_unconditional(path: &Path) -> Result<bool> {
    let config = if sdrs::formats::gguf::is_gguf(path)? {
        sdrs::formats::gguf::metadata::read_config(&sdrs::formats::gguf::GgufFile::open(path)?)?
    } else {
        Some(sdrs::formats::Checkpoint::open(path)?.model_config()?)
    };
    Ok(config.is_some_and(|c| c.is_unconditional()))
}

/// `generate`'s run for `path`, whose output format, seed and batch count `generate`
/// has already checked.
pub fn run(
    a: Args,
    path: &Path,
    seed: u64,
    format: ImageFormat,
    threads: Option<usize>,
    upscale: &dyn Fn(Image) -> Result<Image>,
) -> Result<()> {
    let refuse = |what: &str| -> Result<()> {
        bail!("{} takes no {what}: it samples from noise alone (an unconditional or class-conditional model)", path.display())
    };
    if a.prompt.is_some() {
        refuse("prompt")?;
    }
    if a.init_img.is_some() {
        refuse("init image")?;
    }
    if a.vae.is_some() || !a.embeddings.is_empty() || a.embedding_dir.is_some() {
        refuse("VAE or embedding")?;
    }
    if a.preview.is_some() {
        refuse("preview")?;
    }
    if let Some((o, _)) = a
        .request
        .given
        .iter()
        .find(|(o, _)| !APPLIES.contains(&o.flag))
    {
        bail!(
            "--{} does not apply to {}, which samples from noise alone (options that do: {})",
            o.flag,
            path.display(),
            APPLIES
                .iter()
                .map(|f| format!("--{f}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let grid_format = match &a.grid {
        Some(g) => Some(ImageFormat::from_path(g, a.quality)?),
        None => None,
    };
    let threads = super::thread_count(threads);
    let model = Unconditional::load(path, threads)?;
    let mut req = model.request();
    for (option, value) in &a.request.given {
        option.apply(&mut req, value.clone())?;
    }
    req.seed = seed;
    req.width = a.width.unwrap_or(req.width);
    req.height = a.height.unwrap_or(req.height);
    req.cancel = Some(super::interrupt_flag());
    let batch = Batch {
        count: a.batch_count,
        classes: a.classes.clone(),
    };
    let plan = model.plan(&req, &batch)?;
    if a.plan_only {
        return super::print_stdout(&format!(
            "memory plan for {} image(s) of {}x{}:\n{}",
            batch.count,
            req.width,
            req.height,
            plan.summary()
        ));
    }
    if a.seed == -1 {
        eprintln!("seed {seed}");
    }
    let bar = super::progress_bar(
        req.steps as u64,
        "{spinner} [{bar:30}] step {pos}/{len} {per_sec} {msg}",
    );
    bar.set_message(format!("{} image(s)", batch.count));
    let images = model.generate(&req, &batch, &mut |s| {
        if let Stage::Step { done, total } = s {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    })?;
    bar.finish_and_clear();
    let images = images
        .into_iter()
        .map(upscale)
        .collect::<Result<Vec<_>>>()?;
    for (i, image) in images.iter().enumerate() {
        image.save(&numbered(&a.output, i, images.len()), format)?;
    }
    if let (Some(path), Some(f)) = (&a.grid, grid_format) {
        Image::grid(&images)?.save(path, f)?;
    }
    let seconds = images.first().map_or(0.0, |i| i.timings[1]);
    eprintln!(
        "wrote {} image(s) of {}x{} to {}{} (seed {}): {:.2} s, {:.3} s/step",
        images.len(),
        req.width,
        req.height,
        a.output.display(),
        a.grid
            .as_ref()
            .map(|g| format!(" and the grid {}", g.display()))
            .unwrap_or_default(),
        seed,
        seconds,
        seconds / req.steps.max(1) as f64
    );
    Ok(())
}
