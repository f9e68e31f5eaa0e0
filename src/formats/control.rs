//! ControlNet checkpoints in every published layout, read into the canonical names
//! of [`network::controlnet`](crate::network::controlnet):
//!
//! - lllyasviel's ControlNet 1.0 `.pth` files: `control_model.*` beside the whole SD
//!   model they were trained with (those weights are left out, and listed);
//! - ControlNet 1.1 `.pth` and the `.safetensors` repackagings, with the
//!   `control_model.` prefix or without it;
//! - diffusers `ControlNetModel` folders, their weights file beside its `config.json`,
//!   or such a file on its own (the SDXL `diffusers_xl_*` files), its config read from
//!   its shapes;
//! - our own GGUFs (to requantize).
//!
//! A single file states no config: it is read from the shapes as a model's UNet is
//! ([`detect`](super::detect)). Heads leave no trace in shapes; the family decides
//! them as for models: a 768-wide context with convolution projections is SD 1.x's
//! (8 heads), anything else has 64-wide heads (SD 2.x, SDXL).
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::detect::{unet_at, Tensors};
use super::gguf::{metadata, GgufFile};
use super::source::{Checkpoint, SourceFormat, SourceTensor};
use crate::config::ControlConfig;
use crate::error::{Error, Result};
use crate::network::controlnet::{ControlNet, CONTROL_PREFIX};

/// A ControlNet opened for conversion.
#[derive(Debug)]
pub struct Source {
    pub config: ControlConfig,
    /// Its tensors, canonical names and shapes.
    pub checkpoint: Checkpoint,
    /// Tensors of the file that are not the ControlNet's, with the reason.
    pub dropped: Vec<(String, String)>,
}

/// Names a ControlNet file without the `control_model.` prefix starts with.
const OWN: [&str; 7] = [
    "input_hint_block.",
    "zero_convs.",
    "middle_block_out.",
    "input_blocks.",
    "middle_block.",
    "time_embed.",
    "label_emb.",
];

/// Whether `path` holds a ControlNet rather than a model: a diffusers
/// `ControlNetModel` folder, our ControlNet GGUF, or a file with a conditioning
/// embedding (`input_hint_block` or `controlnet_cond_embedding`).
pub fn is_controlnet(path: &Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(super::diffusers::is_controlnet(path));
    }
    if super::gguf::is_gguf(path)? {
        return Ok(metadata::read_control(&GgufFile::open(path)?)?.is_some());
    }
    let ck = Checkpoint::open(path)?;
    Ok(ck.tensors.iter().any(|t| {
        t.name.contains("input_hint_block.") || t.name.starts_with("controlnet_cond_embedding.")
    }))
}

/// Opens the ControlNet at `path` (any layout above) and checks every tensor
/// against the plan of its config.
pub fn open(path: &Path) -> Result<Source> {
    if path.is_dir() {
        return from_diffusers(path, path);
    }
    if super::gguf::is_gguf(path)? {
        let g = GgufFile::open(path)?;
        let config = metadata::read_control(&g)?.ok_or_else(|| {
            Error::arch(path, "a GGUF without ControlNet metadata (`sd-controlnet`)")
        })?;
        let checkpoint = Checkpoint::open(path)?;
        check(&config, &checkpoint)?;
        return Ok(Source {
            config,
            checkpoint,
            dropped: Vec::new(),
        });
    }
    let ck = Checkpoint::open(path)?;
    if ck
        .tensors
        .iter()
        .any(|t| t.name.starts_with("controlnet_cond_embedding."))
    {
        let dir = path.parent().unwrap_or(Path::new("."));
        if super::diffusers::is_controlnet(dir) {
            return from_diffusers(dir, path);
        }
        // A diffusers-named file on its own (the SDXL "diffusers_xl_*" files that A1111
        // and ComfyUI users collect): the config from its shapes.
        let list: Vec<(&str, &[usize])> = ck
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        let config = detect_diffusers(&list).map_err(|e| Error::arch(path, e))?;
        let plan = ControlNet::new(&config)
            .map_err(|e| Error::arch(path, e.to_string()))?
            .params();
        let tensors = super::diffusers::names::to_canonical(&plan, ck.tensors, path, |_| false)?;
        return Ok(Source {
            config,
            checkpoint: Checkpoint { tensors, ..ck },
            dropped: Vec::new(),
        });
    }
    from_original(ck)
}

fn from_diffusers(dir: &Path, weights: &Path) -> Result<Source> {
    let (config, file, tensors) = if weights == dir {
        super::diffusers::controlnet(dir)?
    } else {
        let config = super::diffusers::controlnet_config(&dir.join("config.json"))?;
        let ck = Checkpoint::open(weights)?;
        (config, weights.to_path_buf(), ck.tensors)
    };
    let plan = ControlNet::new(&config)
        .map_err(|e| Error::arch(dir.join("config.json"), e.to_string()))?
        .params();
    let tensors = super::diffusers::names::to_canonical(&plan, tensors, &file, |_| false)?;
    Ok(Source {
        config,
        checkpoint: Checkpoint {
            path: weights.to_path_buf(),
            format: SourceFormat::Diffusers,
            tensors,
            metadata: BTreeMap::new(),
            tokenizer: None,
        },
        dropped: Vec::new(),
    })
}

fn from_original(mut ck: Checkpoint) -> Result<Source> {
    let prefixed = ck
        .tensors
        .iter()
        .any(|t| t.name.starts_with(CONTROL_PREFIX));
    let mut dropped = Vec::new();
    let mut kept: Vec<SourceTensor> = Vec::new();
    let mut unknown = Vec::new();
    for mut t in std::mem::take(&mut ck.tensors) {
        if prefixed {
            if t.name.starts_with(CONTROL_PREFIX) {
                kept.push(t);
            } else {
                dropped.push((
                    t.name,
                    "the base model stored beside the ControlNet (ControlNet 1.0 files)".into(),
                ));
            }
        } else if OWN.iter().any(|p| t.name.starts_with(p)) {
            t.name = format!("{CONTROL_PREFIX}{}", t.name);
            kept.push(t);
        } else {
            unknown.push(t.name);
        }
    }
    if !unknown.is_empty() {
        unknown.truncate(5);
        return Err(Error::arch(
            &ck.path,
            format!(
                "not a ControlNet tensor: {} (a ControlNet has `input_hint_block`, `zero_convs` and a UNet encoder)",
                unknown.join(", ")
            ),
        ));
    }
    ck.tensors = kept;
    let config = detect(&ck).map_err(|e| Error::arch(&ck.path, e))?;
    check(&config, &ck)?;
    Ok(Source {
        config,
        checkpoint: ck,
        dropped,
    })
}

/// The config of a ControlNet in canonical names, from its shapes.
fn detect(ck: &Checkpoint) -> std::result::Result<ControlConfig, String> {
    let list: Vec<(&str, &[usize])> = ck
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let t = Tensors::new(&list)?;
    let p = CONTROL_PREFIX;
    let mut unet = unet_at(&t, p, "sd1", &[], false)?;
    let family = if unet.adm_in_channels.is_some() {
        "sdxl"
    } else if unet.context_dim == 768 && !unet.linear_proj {
        "sd1"
    } else {
        "sd2"
    };
    if family != "sd1" {
        unet.num_heads = None;
        unet.head_dim = Some(64);
    }
    // An SDXL ControlNet's `label_emb` reads the label input the base UNet's does,
    // built from the model's own size/crop conditioning: nothing to describe here.
    let hint = format!("{p}input_hint_block.");
    let convs: Vec<usize> = t.indices(&hint).into_iter().collect();
    let n = convs.len();
    if n < 2 || !n.is_multiple_of(2) || convs.iter().enumerate().any(|(i, &k)| k != 2 * i) {
        return Err(format!(
            "`input_hint_block` has convolutions {convs:?}; a conditioning embedding has an even count at 0, 2, 4, …"
        ));
    }
    let out = |k: usize| t.dim(&format!("{hint}{k}.weight"), 4, 0);
    let hint_channels = t.dim(&format!("{hint}0.weight"), 4, 1)?;
    let embedding_channels = (0..n / 2)
        .map(|i| out(4 * i))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let c = ControlConfig {
        family: family.into(),
        unet,
        hint_channels,
        embedding_channels,
    };
    c.check_sizes()?;
    Ok(c)
}

/// The config of a ControlNet in diffusers naming, from its shapes (the family's
/// heads, as for single files).
fn detect_diffusers(list: &[(&str, &[usize])]) -> std::result::Result<ControlConfig, String> {
    let t = Tensors::new(list)?;
    let conv_in = t.shape("conv_in.weight", 4)?;
    let (mc, in_channels) = (conv_in[0], conv_in[1]);
    let levels = t.count("down_blocks.");
    if levels == 0 {
        return Err("no `down_blocks`: not a ControlNet's encoder".into());
    }
    let mut channel_mult = Vec::with_capacity(levels);
    let mut down_blocks = Vec::with_capacity(levels);
    for l in 0..levels {
        let p = format!("down_blocks.{l}.");
        let resnets = t.count(&format!("{p}resnets."));
        if resnets == 0 {
            return Err(format!("down level {l} has no ResNets"));
        }
        let width = t.dim(&format!("{p}resnets.0.conv2.weight"), 4, 0)?;
        if width % mc != 0 {
            return Err(format!("level width {width} is not a multiple of {mc}"));
        }
        channel_mult.push(width / mc);
        down_blocks.push(
            (0..resnets)
                .map(|i| t.count(&format!("{p}attentions.{i}.transformer_blocks.")))
                .collect(),
        );
    }
    let mid_depth = if t.any("mid_block.attentions.0.") {
        Some(t.count("mid_block.attentions.0.transformer_blocks."))
    } else if t.any("mid_block.") {
        Some(0)
    } else {
        None
    };
    let to_k = list
        .iter()
        .find(|(n, _)| n.ends_with(".attn2.to_k.weight"))
        .ok_or("no cross-attention: not a text-conditioned ControlNet")?;
    let context_dim = t.dim(to_k.0, 2, 1)?;
    let proj_in = list
        .iter()
        .find(|(n, _)| n.ends_with(".proj_in.weight"))
        .map_or(0, |(_, s)| s.len());
    let linear_proj = proj_in == 2;
    let adm_in_channels = t
        .has("add_embedding.linear_1.weight")
        .then(|| t.dim("add_embedding.linear_1.weight", 2, 1))
        .transpose()?;
    let hint = t.shape("controlnet_cond_embedding.conv_in.weight", 4)?;
    let blocks = t.count("controlnet_cond_embedding.blocks.");
    if blocks % 2 != 0 {
        return Err(format!(
            "{blocks} conditioning embedding blocks: an even count"
        ));
    }
    let mut embedding_channels = vec![hint[0]];
    for i in 0..blocks / 2 {
        embedding_channels.push(t.dim(
            &format!("controlnet_cond_embedding.blocks.{}.weight", 2 * i + 1),
            4,
            0,
        )?);
    }
    let sd1 = context_dim == 768 && !linear_proj && adm_in_channels.is_none();
    let family = match (adm_in_channels, sd1) {
        (Some(_), _) => "sdxl",
        (None, true) => "sd1",
        (None, false) => "sd2",
    };
    let unet = crate::config::UnetConfig {
        in_channels,
        out_channels: in_channels,
        model_channels: mc,
        channel_mult,
        down_blocks,
        up_blocks: Vec::new(),
        mid_depth,
        num_heads: sd1.then_some(8),
        head_dim: (!sd1).then_some(64),
        context_dim,
        linear_proj,
        adm_in_channels,
        time_cond_proj_dim: None,
        time_ids: Vec::new(),
        time_id_dim: 0,
        style: crate::config::UnetStyle::default(),
    };
    let c = ControlConfig {
        family: family.into(),
        unet,
        hint_channels: hint[1],
        embedding_channels,
    };
    c.check_sizes()?;
    Ok(c)
}

/// Every tensor the plan of `config` names is in `ck` with its shape, and nothing else.
fn check(config: &ControlConfig, ck: &Checkpoint) -> Result<()> {
    let plan = ControlNet::new(config).map_err(|e| Error::arch(&ck.path, e.to_string()))?;
    let mut want: BTreeMap<String, Vec<usize>> = plan
        .params()
        .into_iter()
        .map(|p| (p.canonical, p.shape))
        .collect();
    let mut unknown = BTreeSet::new();
    for t in &ck.tensors {
        match want.remove(&t.name) {
            Some(shape)
                if shape == t.shape || shape.iter().product::<usize>() as u64 == t.numel() => {}
            Some(shape) => {
                return Err(Error::arch(
                    &ck.path,
                    format!(
                        "ControlNet tensor `{}` has shape {:?}; its config needs {shape:?}",
                        t.name, t.shape
                    ),
                ))
            }
            None => {
                unknown.insert(t.name.as_str());
            }
        }
    }
    if let Some(first) = want.keys().next() {
        return Err(Error::arch(
            &ck.path,
            format!(
                "{} ControlNet tensors are missing, e.g. `{first}`",
                want.len()
            ),
        ));
    }
    if !unknown.is_empty() {
        let list: Vec<&str> = unknown.into_iter().take(5).collect();
        return Err(Error::arch(
            &ck.path,
            format!(
                "tensors the ControlNet's plan does not have: {}",
                list.join(", ")
            ),
        ));
    }
    Ok(())
}
