use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;

use sdrs::config::ModelConfig;
use sdrs::formats::gguf::metadata;
use sdrs::formats::gguf::{GgufFile, Value};
use sdrs::formats::Checkpoint;
use sdrs::network::{UNET_PREFIX, VAE_PREFIX};

/// Describe a GGUF or a checkpoint: architecture, components, types, metadata.
#[derive(clap::Args)]
pub struct Args {
    /// A GGUF file, a .safetensors/.ckpt checkpoint or a diffusers folder.
    #[arg(required_unless_present = "system")]
    file: Option<PathBuf>,
    /// Describe this machine instead: CPU, the ggml CPU library chosen for it and its kernels.
    #[arg(long)]
    system: bool,
    /// Also list every tensor.
    #[arg(long)]
    tensors: bool,
}

struct Row {
    name: String,
    shape: Vec<usize>,
    ty: String,
    bytes: u64,
}

fn component(name: &str, cfg: Option<&ModelConfig>) -> String {
    if name.starts_with(UNET_PREFIX) {
        return "unet".into();
    }
    if name.starts_with(VAE_PREFIX) {
        return "vae".into();
    }
    if let Some(c) = cfg {
        if let Some(i) = c
            .text_encoders
            .iter()
            .position(|t| name.starts_with(&t.prefix))
        {
            return format!("text_encoder.{i}");
        }
    }
    if name.starts_with("cond_stage_model.") || name.starts_with("conditioner.") {
        return "text_encoder".into();
    }
    "other".into()
}

pub fn run(a: Args) -> Result<()> {
    let mut o = String::new();
    if a.system {
        system(&mut o)?;
    }
    if let Some(file) = &a.file {
        describe(file, a.tensors, &mut o)?;
    }
    super::print_stdout(&o)
}

fn describe(file: &std::path::Path, tensors: bool, o: &mut String) -> Result<()> {
    // Unreadable files go on to the checkpoint reader, whose error names the problem.
    let is_gguf = file.is_file() && sdrs::formats::gguf::is_gguf(file).unwrap_or(false);
    // What the file holds: its tensors by component, its architecture, metadata, kind.
    type Contents = (Vec<Row>, Option<ModelConfig>, Vec<(String, Value)>, String);
    let (rows, cfg, meta, origin): Contents = if is_gguf {
        let g = GgufFile::open(file)?;
        let stored = metadata::read_config(&g)?;
        let shapes = metadata::original_shapes(&g);
        let rows = g
            .tensors
            .iter()
            .map(|t| Row {
                name: t.name.clone(),
                shape: shapes
                    .get(&t.name)
                    .cloned()
                    .unwrap_or_else(|| t.torch_shape()),
                ty: match t.interleaved {
                    true => format!("{} (x86 layout)", t.ty.name()),
                    false => t.ty.name().to_string(),
                },
                bytes: t.nbytes,
            })
            .collect();
        let (cfg, origin) = match stored {
            Some(c) => (
                Some(c),
                format!("GGUF v{} (config from metadata)", g.version),
            ),
            None => {
                let ck = Checkpoint::open(file)?;
                (
                    ck.model_config().ok(),
                    format!(
                        "GGUF v{} without sdrs metadata (architecture detected from tensor names)",
                        g.version
                    ),
                )
            }
        };
        (rows, cfg, g.metadata.clone(), origin)
    } else {
        let ck = Checkpoint::open(file)?;
        let rows = ck
            .tensors
            .iter()
            .map(|t| Row {
                name: t.name.clone(),
                shape: t.shape.clone(),
                ty: t.dtype.name(),
                bytes: t.nbytes(),
            })
            .collect();
        let cfg = ck.model_config();
        if let Err(e) = &cfg {
            out!(o, "architecture: not recognised ({e})");
        }
        let meta = ck
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        (rows, cfg.ok(), meta, format!("{:?} checkpoint", ck.format))
    };
    out!(o, "file:          {}", file.display());
    out!(o, "format:        {origin}");
    if let Some(c) = &cfg {
        let zsnr = if c.zero_terminal_snr {
            ", zero terminal SNR"
        } else {
            ""
        };
        out!(
            o,
            "architecture:  {} ({} prediction{zsnr})",
            c.family,
            c.prediction.as_str()
        );
        let u = &c.unet;
        out!(
            o,
            "unet:          in {} out {} channels {} mult {:?} context {} {}{}{}",
            u.in_channels,
            u.out_channels,
            u.model_channels,
            u.channel_mult,
            u.context_dim,
            if u.linear_proj {
                "linear proj"
            } else {
                "conv proj"
            },
            u.adm_in_channels
                .map(|d| format!(", adm {d}"))
                .unwrap_or_default(),
            if u.mid_depth.is_none() {
                ", no mid block"
            } else {
                ""
            }
        );
        out!(
            o,
            "  down blocks: {:?}  up blocks: {:?}",
            u.down_blocks,
            u.up_blocks
        );
        let st = &u.style;
        if st.attention == sdrs::config::AttentionKind::SelfAttention {
            let groups = st
                .norm_groups
                .map_or_else(|| "min(C/4, 32)".to_string(), |g| g.to_string());
            let time = match st.time_embedding {
                sdrs::config::TimeEmbedding::Fourier => "Fourier (log σ)".to_string(),
                sdrs::config::TimeEmbedding::Positional => format!(
                    "{} timestep features (shift {})",
                    if st.flip_sin_to_cos {
                        "cos-sin"
                    } else {
                        "sin-cos"
                    },
                    st.freq_shift
                ),
            };
            out!(
                o,
                "  DDPM style:  self-attention, GroupNorm {groups} eps {}, {time}, downsample padding {}{}{}",
                st.norm_eps,
                st.downsample_padding,
                st.num_classes
                    .map(|n| format!(", {n} classes"))
                    .unwrap_or_default(),
                if st.skip {
                    format!(", NCSN++ image skip paths (FIR resampling), middle scale {}", st.mid_scale)
                } else {
                    String::new()
                }
            );
        }
        let sc = &c.schedule;
        match &sc.ve {
            Some(v) => out!(
                o,
                "schedule:      VE SDE, σ from {} to {} over {} steps; corrector snr {}, {} step(s)",
                v.sigma_min,
                v.sigma_max,
                sc.train_steps,
                v.snr,
                v.correct_steps
            ),
            None => out!(
                o,
                "schedule:      {:?} over {} steps, {} variance{}",
                sc.betas,
                sc.train_steps,
                sc.variance.as_str(),
                sc.clip_sample
                    .map(|r| format!(", predicted samples clipped to ±{r}"))
                    .unwrap_or_default()
            ),
        }
        match &c.vae {
            Some(v) => out!(
                o,
                "vae:           latent {} channels, base {} mult {:?}, scale {}",
                v.latent_channels,
                v.base_channels,
                v.channel_mult,
                v.scaling_factor
            ),
            None => out!(o, "vae:           none (the UNet works on pixels)"),
        }
        for (i, t) in c.text_encoders.iter().enumerate() {
            out!(
                o,
                "text_encoder.{i}: {:?} {} wide, {} layers, {} heads{} ({})",
                t.kind,
                t.hidden_size,
                t.num_layers,
                t.num_heads,
                t.projection_dim
                    .map(|p| format!(", projection {p}"))
                    .unwrap_or_default(),
                t.prefix
            );
        }
    }
    let mut comps: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    let mut types: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    for r in &rows {
        let n: u64 = r.shape.iter().map(|&d| d as u64).product();
        for (m, k) in [
            (&mut comps, component(&r.name, cfg.as_ref())),
            (&mut types, r.ty.clone()),
        ] {
            let e = m.entry(k).or_default();
            e.0 += 1;
            e.1 += n;
            e.2 += r.bytes;
        }
    }
    let params: u64 = comps.values().map(|c| c.1).sum();
    let bytes: u64 = comps.values().map(|c| c.2).sum();
    out!(
        o,
        "tensors:       {}  parameters: {} ({:.1} M)  bytes: {} ({})",
        rows.len(),
        params,
        params as f64 / 1e6,
        bytes,
        super::mb(bytes)
    );
    out!(
        o,
        "\n{:<16} {:>8} {:>14} {:>14}",
        "component",
        "tensors",
        "parameters",
        "bytes"
    );
    for (k, (n, p, b)) in &comps {
        out!(o, "{k:<16} {n:>8} {p:>14} {b:>14}");
    }
    out!(
        o,
        "\n{:<16} {:>8} {:>14} {:>14}",
        "type",
        "tensors",
        "parameters",
        "bytes"
    );
    for (k, (n, p, b)) in &types {
        out!(o, "{k:<16} {n:>8} {p:>14} {b:>14}");
    }
    if !meta.is_empty() {
        out!(o, "\nmetadata:");
        for (k, v) in &meta {
            if k == metadata::RESHAPED_NAMES || k == metadata::RESHAPED_SHAPES {
                out!(
                    o,
                    "  {k} = [{} entries]",
                    v.as_array().map_or(0, |a| a.len())
                );
                continue;
            }
            if k == sdrs::formats::gguf::INTERLEAVED_Q4_0 {
                let here = match sdrs::ggml::Context::reads_interleaved_q4_0() {
                    true => "read in place on this CPU",
                    false => "this CPU's ggml reads another layout: un-interleaved at load",
                };
                out!(
                    o,
                    "  {k} = [{} entries] ({here})",
                    v.as_array().map_or(0, |a| a.len())
                );
                continue;
            }
            out!(o, "  {k} = {v}");
        }
    }
    if tensors {
        out!(o, "");
        for r in &rows {
            out!(
                o,
                "{:<8} {:>12} {:<24} {}",
                r.ty,
                r.bytes,
                format!("{:?}", r.shape),
                r.name
            );
        }
    }
    Ok(())
}

/// The machine as ggml sees it: which CPU library it loaded and what that library uses.
fn system(o: &mut String) -> Result<()> {
    let info = sdrs::ggml::cpu_backend_info()?;
    out!(o, "cpu:           {}", info.description);
    out!(
        o,
        "cores:         {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    });
    if let Some(kb) = mem {
        out!(
            o,
            "memory:        {:.1} GiB",
            kb as f64 / (1u64 << 20) as f64
        );
    }
    out!(o, "cpu features:  {}", sdrs::cpu::features().join(" "));
    match &info.library {
        Some(p) => out!(o, "ggml cpu lib:  {}", p.display()),
        None => out!(o, "ggml cpu lib:  built in"),
    }
    let on: Vec<String> = info
        .features
        .iter()
        .map(|(k, v)| {
            if v == "1" {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    out!(o, "ggml kernels:  {}", on.join(" "));
    out!(
        o,
        "sdrs kernels:  attention and im2col (ggml custom ops), attention compiled for {}",
        sdrs::ggml::attention_kernel()
    );
    let gpus: Vec<String> = sdrs::ggml::devices()?
        .into_iter()
        .filter(|d| d.kind != sdrs::ggml::DeviceKind::Cpu)
        .map(|d| {
            format!(
                "{} ({}, {:.1} GB)",
                d.name,
                d.description,
                d.memory_total as f64 / 1e9
            )
        })
        .collect();
    let vulkan = if sdrs::ggml::VULKAN_BUILT {
        ""
    } else {
        " (built without Vulkan)"
    };
    out!(
        o,
        "gpu devices:   {}{vulkan}",
        if gpus.is_empty() {
            "none".to_string()
        } else {
            gpus.join(", ")
        }
    );
    out!(o, "");
    Ok(())
}
