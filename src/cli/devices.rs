//! `sdrs devices`: the ggml backends this build loaded and their devices.
use anyhow::Result;

use sdrs::ggml::{DeviceKind, VULKAN_BUILT};

/// List the backends and devices sdrs can compute on, with their memory.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_: Args) -> Result<()> {
    let mut o = String::new();
    out!(
        o,
        "{:<8} {:>6}  {:<10} {:<15} {:>12}  description",
        "backend",
        "device",
        "name",
        "kind",
        "memory"
    );
    for d in sdrs::ggml::devices()? {
        let kind = match d.kind {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::IntegratedGpu => "integrated gpu",
            DeviceKind::Accelerator => "accelerator",
        };
        let mem = format!(
            "{:.1}/{:.1} GB",
            d.memory_free as f64 / 1e9,
            d.memory_total as f64 / 1e9
        );
        out!(
            o,
            "{:<8} {:>6}  {:<10} {:<15} {:>12}  {}",
            d.backend.to_lowercase(),
            d.index,
            d.name,
            kind,
            mem,
            d.description
        );
    }
    if !VULKAN_BUILT {
        out!(
            o,
            "(built without Vulkan: `cargo build --release --features vulkan` adds it)"
        );
    }
    super::print_stdout(&o)
}
