//! A VAE on its own, as people keep them beside their models (`--vae`): a single
//! file (`vae-ft-mse-840000-ema-pruned.safetensors`, `.ckpt`, `.pt`) in the original
//! naming, with or without the `first_stage_model.` prefix, or diffusers' naming
//! (`AutoencoderKL`, a `vae/` folder or its weights file). Its tensors come out under
//! the canonical names, checked against the model's VAE config.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::diffusers::names;
use super::{Checkpoint, SourceTensor};
use crate::config::VaeConfig;
use crate::error::{Error, Result};

use crate::network::{self, VAE_PREFIX as PREFIX};

/// The weights file of a diffusers `vae/` folder (or the file itself).
fn weights_file(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let names = [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
    ];
    names
        .iter()
        .map(|n| path.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::format(
                path,
                format!("a VAE folder holds one of {}", names.join(", ")),
            )
        })
}

/// The VAE tensors of `path` under canonical names, for a model whose VAE is `cfg`.
pub fn open(path: &Path, cfg: &VaeConfig) -> Result<Vec<SourceTensor>> {
    let file = weights_file(path)?;
    let ck = Checkpoint::open(&file)?;
    let plan = names::vae(cfg);
    let diffusers = ck
        .tensors
        .iter()
        .any(|t| t.name.contains("up_blocks.") || t.name.contains("down_blocks."));
    let tensors = if diffusers {
        // Only the VAE's own tensors: a full pipeline file given as a VAE keeps the rest.
        let wanted: std::collections::HashSet<&str> = plan
            .iter()
            .flat_map(|e| e.diffusers.iter().map(String::as_str))
            .collect();
        let mine: Vec<SourceTensor> = ck
            .tensors
            .into_iter()
            .filter(|t| wanted.contains(t.name.as_str()))
            .collect();
        let have: std::collections::HashSet<&str> = mine.iter().map(|t| t.name.as_str()).collect();
        let missing: Vec<String> = wanted
            .iter()
            .filter(|n| !have.contains(*n))
            .map(|n| n.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(not_a_vae(&file, missing));
        }
        names::to_canonical(&plan, mine, &file, |_| false)?
    } else {
        let bare = !ck.tensors.iter().any(|t| t.name.starts_with(PREFIX));
        // A bare VAE file holds the VAE's tensors without the checkpoint's prefix.
        let vae_part = |n: &str| {
            let full = format!("{PREFIX}{n}");
            network::vae::is_encoder(&full) || network::vae::is_decoder(&full)
        };
        ck.tensors
            .into_iter()
            .filter_map(|mut t| {
                if bare {
                    vae_part(&t.name).then(|| {
                        t.name = format!("{PREFIX}{}", t.name);
                        t
                    })
                } else {
                    t.name.starts_with(PREFIX).then_some(t)
                }
            })
            .collect()
    };
    check(&file, &plan, tensors)
}

fn not_a_vae(file: &Path, mut missing: Vec<String>) -> Error {
    let n = missing.len();
    missing.sort();
    missing.truncate(4);
    Error::format(
        file,
        format!(
            "not a VAE for this model: {n} of its tensors are missing ({}{})",
            missing.join(", "),
            if n > 4 { ", …" } else { "" }
        ),
    )
}

/// Every tensor the config implies, with its element count (attention projections are
/// 1x1 convolutions in one naming and matrices in another: the same values).
fn check(
    file: &Path,
    plan: &[crate::network::Param],
    tensors: Vec<SourceTensor>,
) -> Result<Vec<SourceTensor>> {
    let mut by_name: HashMap<String, SourceTensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut out = Vec::with_capacity(plan.len());
    let mut missing = Vec::new();
    for e in plan {
        match by_name.remove(&e.canonical) {
            None => missing.push(e.canonical.trim_start_matches(PREFIX).to_string()),
            Some(t) if t.numel() != e.shape.iter().product::<usize>() as u64 => {
                return Err(Error::format(
                    file,
                    format!(
                        "VAE tensor `{}` has shape {:?}; the model's VAE needs {:?}",
                        t.name.trim_start_matches(PREFIX),
                        t.shape,
                        e.shape
                    ),
                ));
            }
            Some(mut t) => {
                t.shape = e.shape.clone();
                out.push(t);
            }
        }
    }
    if !missing.is_empty() {
        return Err(not_a_vae(file, missing));
    }
    if !by_name.is_empty() {
        log::warn!(
            "{}: {} tensors beside the VAE's are ignored",
            file.display(),
            by_name.len()
        );
    }
    Ok(out)
}
