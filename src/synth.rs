//! Random-weight checkpoints in the real layouts, for benchmarking a device without
//! downloading a model and for tests. Timings do not depend on weight values, but
//! the scales are kept sensible (variance 1/fan_in, norms near 1) so activations
//! stay finite through a full network.
use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::Path;

use half::f16;
use rayon::prelude::*;

use crate::config::{ModelConfig, TextEncoderKind};
use crate::error::{Error, Result};
use crate::formats::layout::{self, TensorSpec};
use crate::formats::safetensors::{self as st, WriteSpec};
use crate::formats::DType;
use crate::sample::rng::SplitMix;
use crate::staged::Staged;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    Diffusers,
    Ckpt,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "safetensors" => Ok(Format::Safetensors),
            "diffusers" => Ok(Format::Diffusers),
            "ckpt" => Ok(Format::Ckpt),
            _ => Err(Error::Invalid(format!(
                "unknown format `{s}`: use safetensors, diffusers or ckpt"
            ))),
        }
    }
}

/// Uniform in [-1, 1) from the generator's next draw.
fn uniform(r: &mut SplitMix) -> f32 {
    ((r.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Deterministic values of one tensor for `seed`.
pub fn tensor_values(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let (center, scale) = if shape.len() <= 1 {
        let norm = ["norm", "ln_", "layer_norm"]
            .iter()
            .any(|k| name.contains(k));
        if norm && name.ends_with("weight") {
            (1.0, 0.1)
        } else {
            (0.0, 0.02)
        }
    } else if ["embedding", "positional_embedding"]
        .iter()
        .any(|k| name.contains(k))
    {
        (0.0, 0.02 * 3f32.sqrt())
    } else {
        let fan_in = (n / shape[0]).max(1) as f32;
        (0.0, (3.0 / fan_in).sqrt())
    };
    const CHUNK: usize = 1 << 16;
    let base = seed ^ name_hash(name);
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut r = SplitMix(base.wrapping_add((i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)));
        for x in c {
            *x = center + scale * uniform(&mut r);
        }
    });
    v
}

/// Buffers real checkpoints carry beside the weights (so converters see them too).
fn extras(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, DType)> {
    let mut v = Vec::new();
    for t in cfg
        .text_encoders
        .iter()
        .filter(|t| t.kind == TextEncoderKind::HfClip)
    {
        v.push((
            format!("{}embeddings.position_ids", t.prefix),
            vec![1, t.max_positions],
            DType::I64,
        ));
    }
    if cfg.unet.adm_in_channels.is_none() {
        v.push(("alphas_cumprod".to_string(), vec![1000], DType::F32));
    }
    v
}

/// `alphas_cumprod` of the scaled-linear schedule SD uses (β from 0.00085 to 0.012).
fn alphas_cumprod() -> Vec<f32> {
    let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let mut acc = 1.0f64;
    (0..1000)
        .map(|i| {
            let beta = (a + (b - a) * i as f64 / 999.0).powi(2);
            acc *= 1.0 - beta;
            acc as f32
        })
        .collect()
}

fn encode(values: &[f32], dtype: DType, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => out.extend(values.iter().flat_map(|x| x.to_le_bytes())),
        DType::BF16 => out.extend(
            values
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()),
        ),
        _ => out.extend(values.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes())),
    }
}

/// Writes the bytes of a layout tensor or an extra buffer.
fn fill_tensor(name: &str, shape: &[usize], dtype: DType, seed: u64, out: &mut Vec<u8>) {
    match (name, dtype) {
        (_, DType::I64) => {
            out.extend((0..shape.iter().product::<usize>() as i64).flat_map(|i| i.to_le_bytes()))
        }
        ("alphas_cumprod", _) => encode(&alphas_cumprod(), DType::F32, out),
        _ => encode(&tensor_values(name, shape, seed), dtype, out),
    }
}

/// All tensors of a synthetic checkpoint: the architecture's layout plus extras.
pub fn tensor_list(cfg: &ModelConfig, dtype: DType) -> Result<Vec<(String, Vec<usize>, DType)>> {
    let mut v: Vec<(String, Vec<usize>, DType)> = layout::layout(cfg)?
        .into_iter()
        .map(|TensorSpec { name, shape }| (name, shape, dtype))
        .collect();
    v.extend(extras(cfg));
    Ok(v)
}

/// Writes a random-weight checkpoint of architecture `cfg` to `out`, atomically.
pub fn synth(
    cfg: &ModelConfig,
    format: Format,
    out: &Path,
    seed: u64,
    dtype: DType,
    force: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Invalid(format!(
            "synth writes f32, f16 or bf16, not {}",
            dtype.name()
        )));
    }
    let list = tensor_list(cfg, dtype)?;
    match format {
        Format::Safetensors => {
            let staged = Staged::new(out, force)?;
            let specs: Vec<WriteSpec> = list
                .iter()
                .map(|(n, s, d)| WriteSpec {
                    name: n.clone(),
                    shape: s.clone(),
                    dtype: *d,
                })
                .collect();
            let mut meta = BTreeMap::new();
            meta.insert("format".to_string(), "pt".to_string());
            meta.insert(
                "sdrs.synth".to_string(),
                format!("{} seed {seed}", cfg.family),
            );
            let mut w = BufWriter::with_capacity(8 << 20, staged.file());
            st::write(&mut w, &specs, &meta, |i, buf| {
                let (n, s, d) = &list[i];
                fill_tensor(n, s, *d, seed, buf);
                progress(i + 1, list.len());
                Ok(())
            })
            .map_err(|e| relabel(e, out))?;
            std::io::Write::flush(&mut w).map_err(|e| Error::io(out, e))?;
            drop(w);
            staged.commit()
        }
        Format::Ckpt => {
            let staged = Staged::new(out, force)?;
            let specs: Vec<WriteSpec> = list
                .iter()
                .map(|(n, s, d)| WriteSpec {
                    name: n.clone(),
                    shape: s.clone(),
                    dtype: *d,
                })
                .collect();
            // Real SD .ckpt files wrap the weights as {"state_dict": ...}.
            crate::formats::ckpt::write(
                std::io::BufWriter::with_capacity(8 << 20, staged.file()),
                &specs,
                true,
                |i, buf| {
                    let (n, s, d) = &list[i];
                    fill_tensor(n, s, *d, seed, buf);
                    progress(i + 1, list.len());
                    Ok(())
                },
            )
            .map_err(|e| relabel(e, out))?
            .into_inner()
            .map_err(|e| Error::io(out, e.into_error()))?;
            staged.commit()
        }
        Format::Diffusers => {
            if out.exists() && !force {
                return Err(Error::Invalid(format!(
                    "{}: output exists (use --force to overwrite)",
                    out.display()
                )));
            }
            // Build the folder beside the target and move it into place when complete.
            let parent = out
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let tmp = tempfile::Builder::new()
                .prefix(".sdrs-synth.")
                .tempdir_in(parent)
                .map_err(|e| Error::io(parent, e))?;
            let vocab = crate::vocab::ClipVocab::embedded()?;
            let tok = crate::formats::source::TokenizerFiles {
                vocab_json: Some(vocab.vocab_json()),
                merges_txt: Some(vocab.merges_txt()),
            };
            let total = layout::layout(cfg)?.len();
            let mut i = 0;
            crate::formats::diffusers::write(
                tmp.path(),
                cfg,
                dtype,
                Some(&tok),
                &mut |name: &str| {
                    let shape = list
                        .iter()
                        .find(|t| t.0 == name)
                        .map(|t| t.1.clone())
                        .ok_or_else(|| Error::Invalid(format!("synth: no tensor `{name}`")))?;
                    i += 1;
                    progress(i.min(total), total);
                    Ok(tensor_values(name, &shape, seed))
                },
            )?;
            if out.exists() {
                std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
            }
            let tmp = tmp.keep();
            std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
        }
    }
}

/// The ControlNet a `base` model would have: its UNet's encoder, an RGB
/// conditioning embedding of the published widths (16, 32, 96, 256), cut to the levels
/// the model's autoencoder scale needs.
pub fn controlnet_config(base: &ModelConfig) -> Result<crate::config::ControlConfig> {
    let f = base.vae.as_ref().map_or(1, |v| v.downscale());
    let levels = f.trailing_zeros() as usize + 1;
    if !f.is_power_of_two() || levels > 4 {
        return Err(Error::Invalid(format!(
            "no ControlNet layout reads an image at {f}x its latent"
        )));
    }
    let mut unet = base.unet.clone();
    unet.up_blocks.clear();
    unet.out_channels = unet.in_channels;
    Ok(crate::config::ControlConfig {
        family: base.family.clone(),
        unet,
        hint_channels: 3,
        embedding_channels: [16, 32, 96, 256][..levels].to_vec(),
    })
}

/// Writes a random-weight ControlNet of `cfg` in lllyasviel's layout (`control_model.*`)
/// as safetensors, atomically.
pub fn synth_controlnet(
    cfg: &crate::config::ControlConfig,
    out: &Path,
    seed: u64,
    dtype: DType,
    force: bool,
) -> Result<()> {
    let list: Vec<(String, Vec<usize>)> = crate::network::controlnet::ControlNet::new(cfg)?
        .params()
        .into_iter()
        .map(|p| (p.canonical, p.shape))
        .collect();
    let staged = Staged::new(out, force)?;
    let specs: Vec<WriteSpec> = list
        .iter()
        .map(|(n, s)| WriteSpec {
            name: n.clone(),
            shape: s.clone(),
            dtype,
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "sdrs.synth".to_string(),
        format!("ControlNet for {} seed {seed}", cfg.family),
    );
    let mut w = BufWriter::with_capacity(8 << 20, staged.file());
    st::write(&mut w, &specs, &meta, |i, buf| {
        let (n, s) = &list[i];
        fill_tensor(n, s, dtype, seed, buf);
        Ok(())
    })
    .map_err(|e| relabel(e, out))?;
    std::io::Write::flush(&mut w).map_err(|e| Error::io(out, e))?;
    drop(w);
    staged.commit()
}

fn relabel(e: Error, out: &Path) -> Error {
    match e {
        Error::Io { err: source, .. } => Error::io(out, source),
        other => other,
    }
}
