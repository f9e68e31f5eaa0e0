//! Decodes random latents with a model's KL VAE, whole or in tiles, and prints the time
//! and the process's peak memory: how the VAE decode's memory grows with the image.
//!
//! `cargo run --release --example vae_decode -- MODEL.gguf SIDE [whole|image|tile] [TILE] [compare|once] [KEEP]`
//! (SIDE in pixels; `image`: in bands TILE latents high with the whole image's GroupNorm
//! statistics, keeping at most KEEP MiB of checkpoints (default: every one); `tile`: in
//! tiles with their own, TILE latents a side (default 64), overlapping by a quarter;
//! `compare`: then decode whole too and print the PSNR between the two).
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sdrs::formats::gguf::GgufFile;
use sdrs::ggml::Backend;
use sdrs::model::tile::{TileStats, Tiling};
use sdrs::model::{vae, Planes, Weights};

fn main() -> Result<()> {
    // RUST_LOG=sdrs=debug: each band pass's time.
    env_logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, side, rest @ ..] = args.as_slice() else {
        bail!("usage: vae_decode MODEL.gguf SIDE [whole|image|tile] [TILE]")
    };
    let side: usize = side.parse().context("SIDE")?;
    let mode = rest.first().map_or("whole", String::as_str);
    let tile: usize = rest.get(1).map_or(Ok(64), |t| t.parse()).context("TILE")?;
    let gguf = GgufFile::open(std::path::Path::new(model))?;
    let cfg = sdrs::formats::gguf::metadata::read_config(&gguf)?
        .context("the GGUF has no sdrs config")?
        .vae
        .context("the model has no VAE")?;
    let w = Weights::load(&gguf, |n| n.starts_with("first_stage_model."))?;
    let backend = Backend::cpu(std::thread::available_parallelism().map_or(2, |n| n.get()))?;
    let l = side / cfg.downscale();
    // Deterministic latents of unit spread, in UNet space.
    let z: Vec<f32> = (0..cfg.latent_channels * l * l)
        .map(|i| ((i.wrapping_mul(2654435761) % 10007) as f32 / 5003.5 - 1.0) * 1.7)
        .collect();
    let before = sdrs::memory::peak_and_current().0;
    let t0 = Instant::now();
    let px = match mode {
        "whole" => vae::decode(&w, &cfg, Planes::single(&z, l, l), &backend)?,
        m => {
            let stats =
                TileStats::parse(m).with_context(|| format!("mode `{m}`: whole, image or tile"))?;
            vae::decode_tiled(
                &w,
                &cfg,
                Planes::single(&z, l, l),
                Tiling::square(tile, tile / 4),
                stats,
                rest.get(3)
                    .map(|k| k.parse::<u64>().map(|m| m << 20))
                    .transpose()
                    .context("KEEP")?,
                &backend,
                &mut sdrs::model::tile::no_tick,
            )?
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    let (peak, _) = sdrs::memory::peak_and_current();
    let mean = px.iter().map(|&v| v as f64).sum::<f64>() / px.len() as f64;
    println!("{side}x{side} {mode} (tile {tile}): {secs:.1} s, peak RSS {} MiB (before the decode {} MiB), mean pixel {mean:.4}", peak >> 20, before >> 20);
    if rest.get(2).is_some_and(|c| c == "compare") {
        let t0 = Instant::now();
        let whole = vae::decode(&w, &cfg, Planes::single(&z, l, l), &backend)?;
        let mse = whole
            .iter()
            .zip(&px)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / px.len() as f64;
        println!(
            "whole decode {:.1} s; PSNR against it (range 2) {:.1} dB",
            t0.elapsed().as_secs_f64(),
            10.0 * (4.0 / mse.max(1e-20)).log10()
        );
    }
    Ok(())
}
