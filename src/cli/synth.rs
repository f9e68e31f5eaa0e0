use std::path::PathBuf;

use anyhow::{bail, Result};

use sdrs::config::ModelConfig;
use sdrs::formats::DType;
use sdrs::synth::{self, Format};

/// Write a random-weight checkpoint in a real layout (for benchmarks and tests).
#[derive(clap::Args)]
pub struct Args {
    /// Architecture: sd15, sd21, sdxl, tiny-sd15, tiny-sd21, tiny-sdxl; ddpm-cifar10,
    /// ddpm-celebahq (pixel-space DDPM UNets: --format diffusers only); controlnet-ARCH
    /// (a ControlNet for one of the first six, lllyasviel's layout, safetensors).
    arch: String,
    /// Output file (or folder for --format diffusers).
    #[arg(short, long)]
    output: PathBuf,
    /// safetensors, diffusers or ckpt.
    #[arg(long, default_value = "safetensors")]
    format: Format,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Element type: f16, f32 or bf16.
    #[arg(long = "type", default_value = "f16")]
    dtype: String,
    /// 9-channel inpainting UNet.
    #[arg(long)]
    inpaint: bool,
    /// Overwrite an existing output.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = match a.dtype.to_ascii_lowercase().as_str() {
        "f16" => DType::F16,
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => bail!("unknown type `{other}`: use f16, f32 or bf16"),
    };
    if let Some(base) = a.arch.strip_prefix("controlnet-") {
        let Some(cfg) = ModelConfig::preset(base) else {
            bail!(
                "unknown architecture `{base}` for a ControlNet; choose one of {}",
                ModelConfig::PRESETS.join(", ")
            );
        };
        if !matches!(a.format, Format::Safetensors) || a.inpaint {
            bail!("a ControlNet is written as lllyasviel's single safetensors file only");
        }
        let c = synth::controlnet_config(&cfg)?;
        synth::synth_controlnet(&c, &a.output, a.seed, dtype, a.force)?;
        eprintln!(
            "wrote {} (ControlNet for {}, seed {})",
            a.output.display(),
            c.family,
            a.seed
        );
        return Ok(());
    }
    let Some(mut cfg) = ModelConfig::preset(&a.arch) else {
        bail!(
            "unknown architecture `{}`; choose one of {}, {}",
            a.arch,
            ModelConfig::PRESETS.join(", "),
            ModelConfig::DDPM_PRESETS.join(", ")
        );
    };
    if a.inpaint {
        cfg.unet.in_channels = 9;
    }
    let bar = super::progress_bar(0, "{spinner} [{bar:30}] {pos}/{len} tensors");
    synth::synth(
        &cfg,
        a.format,
        &a.output,
        a.seed,
        dtype,
        a.force,
        &mut |i, n| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
        },
    )?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({} {:?}, seed {})",
        a.output.display(),
        cfg.family,
        a.format,
        a.seed
    );
    Ok(())
}
