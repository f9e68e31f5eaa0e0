//! The correspondence between diffusers tensor names and canonical (original
//! single-file) names, read off the [`network`](crate::network) plans: block indices
//! follow the real block structure (distilled UNets with fewer ResNets, no middle
//! block, or per-layer transformer depths map like the published ones), and the same
//! plan serves reading and writing.
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::config::{TextEncoderConfig, UnetConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::formats::source::{SourceTensor, TensorData};
use crate::network;
use crate::network::{Op, Param};

/// The UNet's parameters. Fails only for configurations that have no consistent block
/// structure (more up-path ResNets than skip connections, an empty up level).
pub fn unet(u: &UnetConfig) -> Result<Vec<Param>> {
    Ok(network::unet::Unet::new(u)?.params())
}

/// The VAE's parameters.
pub fn vae(v: &VaeConfig) -> Vec<Param> {
    network::vae::Vae::new(v).params()
}

/// A text encoder's parameters: diffusers always uses HF CLIP naming, the canonical
/// side follows `t.kind` under `t.prefix`.
pub fn text(t: &TextEncoderConfig) -> Vec<Param> {
    network::clip::TextEncoder::new(t).params()
}

/// Renames the tensors of one diffusers component into canonical tensors following
/// `plan`. `file` names the weights in errors. Every plan entry must be present with
/// the shape the config implies, and every tensor must be used, except those
/// `ignorable` accepts (buffers such as `position_ids`).
pub(crate) fn to_canonical(
    plan: &[Param],
    tensors: Vec<SourceTensor>,
    file: &Path,
    ignorable: impl Fn(&str) -> bool,
) -> Result<Vec<SourceTensor>> {
    let mut by_name: BTreeMap<String, SourceTensor> = BTreeMap::new();
    for t in tensors {
        if ignorable(&t.name) {
            continue;
        }
        if by_name.contains_key(&t.name) {
            return Err(Error::format(
                file,
                format!("tensor `{}` is stored twice", t.name),
            ));
        }
        by_name.insert(t.name.clone(), t);
    }
    let mut out = Vec::with_capacity(plan.len());
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    for e in plan {
        if !seen.insert(e.canonical.as_str()) {
            return Err(Error::Invalid(format!(
                "name plan maps two tensors to `{}`",
                e.canonical
            )));
        }
        let want = e.part_shape();
        let mut parts = Vec::with_capacity(e.diffusers.len());
        for d in &e.diffusers {
            match by_name.remove(d) {
                None => missing.push(d.clone()),
                Some(t) if t.shape != want => {
                    return Err(Error::format(
                        file,
                        format!(
                        "tensor `{d}` has shape {:?} but the component's config.json implies {:?}",
                        t.shape, want
                    ),
                    ))
                }
                Some(t) => parts.push(t),
            }
        }
        if parts.len() != e.diffusers.len() {
            continue;
        }
        let dtype = parts[0].dtype;
        if let Some(odd) = parts.iter().find(|t| t.dtype != dtype) {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{}` is {} while `{}` is {}",
                    odd.name,
                    odd.dtype.name(),
                    parts[0].name,
                    dtype.name()
                ),
            ));
        }
        let data = match e.op {
            Op::Same | Op::Conv1x1 => parts.remove(0).data,
            Op::Concat => TensorData::Concat(parts),
            Op::Transpose => TensorData::Transpose(Box::new(parts.remove(0))),
        };
        out.push(SourceTensor {
            name: e.canonical.clone(),
            shape: e.shape.clone(),
            dtype,
            data,
        });
    }
    if !by_name.is_empty() {
        let names: Vec<&str> = by_name.keys().take(5).map(String::as_str).collect();
        return Err(Error::format(
            file,
            format!(
                "{} tensor(s) that the component's config.json does not account for (unknown names or a config that does not match the weights): {}{}",
                by_name.len(),
                names.join(", "),
                if by_name.len() > names.len() { ", …" } else { "" }
            ),
        ));
    }
    if !missing.is_empty() {
        let n = missing.len();
        missing.truncate(5);
        return Err(Error::format(
            file,
            format!(
                "{n} tensor(s) that the component's config.json requires are missing: {}{}",
                missing.join(", "),
                if n > 5 { ", …" } else { "" }
            ),
        ));
    }
    Ok(out)
}
