//! `sdrs upscale`: a picture through an ESRGAN-family upscaler.
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Result;
use sdrs::pipeline::upscale::{Upscaler, TILE};
use sdrs::pipeline::{Image, ImageFormat};

/// Upscale a picture with an ESRGAN-family model: RRDBNet (Real-ESRGAN x4plus, x2plus,
/// x4plus-anime-6B, the original ESRGAN) or SRVGGNetCompact (realesr-general-x4v3,
/// realesr-animevideov3), from its `.pth` or `.safetensors` file.
#[derive(clap::Args)]
pub struct Args {
    /// The picture (PNG or JPEG).
    pub input: PathBuf,
    /// The upscaler's weights.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Output image: .png, .jpg/.jpeg or .webp.
    #[arg(short, long, default_value = "upscaled.png")]
    pub output: PathBuf,
    /// Passes through the upscaler, each multiplying the size by its scale.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Input pixels per tile side: the picture goes through in overlapping tiles of
    /// this size, so memory stays one tile's; smaller tiles need less.
    #[arg(long, default_value_t = TILE)]
    pub tile: usize,
    /// JPEG quality, 1 to 100.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub quality: u8,
    /// Memory budget (e.g. 512M, 2G): the tile shrinks until a pass fits it [default:
    /// this process's memory cgroup limit, if any].
    #[arg(long = "max-memory", value_parser = super::generate::parse_budget)]
    pub max_memory: Option<u64>,
    /// Print what a pass needs (weights, one tile's compute buffer, the pictures) and exit.
    #[arg(long = "plan")]
    pub plan_only: bool,
}

pub fn run(a: Args, threads: Option<usize>) -> Result<()> {
    let format = ImageFormat::from_path(&a.output, a.quality)?;
    if a.repeats == 0 || a.tile == 0 {
        anyhow::bail!("--repeats and --tile must be at least 1");
    }
    let image = Image::open(&a.input)?;
    let threads = super::thread_count(threads);
    let mut up = Upscaler::load(&a.model, threads)?;
    up.tile = a.tile;
    up.fit((image.width, image.height), a.max_memory)?;
    log::info!("{}: {}", a.model.display(), up.arch.describe());
    if a.plan_only {
        return super::print_stdout(&plan_text(&up, (image.width, image.height))?);
    }
    let out = upscale(&up, &image, a.repeats)?;
    out.save(&a.output, format)?;
    Ok(())
}

/// What one pass over a `w`x`h` picture needs, for `--plan`.
pub fn plan_text(up: &Upscaler, (w, h): (usize, usize)) -> Result<String> {
    let n = up.need((w, h))?;
    Ok(format!(
        "upscale {w}x{h} to {}x{} ({}), tiles of up to {} pixels:\n  upscale  {} = weights {} + compute {} + pictures {}\n",
        w * up.scale(),
        h * up.scale(),
        up.arch.describe(),
        up.tile.min(w.max(h)),
        sdrs::budget::mib(n.total()),
        sdrs::budget::mib(n.weights),
        sdrs::budget::mib(n.compute),
        sdrs::budget::mib(n.other)
    ))
}

/// `image` through `up` `repeats` times, with a progress bar over the tiles; Ctrl-C
/// stops it between tiles.
pub fn upscale(up: &Upscaler, image: &Image, repeats: usize) -> Result<Image> {
    let bar = super::progress_bar(0, "{spinner} [{bar:30}] upscaling tile {pos}/{len}");
    let cancel = super::interrupt_flag();
    let started = Instant::now();
    let out = up.upscale(image, repeats, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if cancel.load(Ordering::Relaxed) {
            return Err(sdrs::Error::Interrupted);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    eprintln!(
        "upscaled {}x{} to {}x{} in {:.2} s",
        image.width,
        image.height,
        out.width,
        out.height,
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}
