//! LoRA files (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
//! which base weight each low-rank pair adapts, in the namings people ship, and the
//! update `multiplier · alpha / rank · up · down` it makes to that weight.
//!
//! Namings read:
//! - kohya / A1111: `lora_unet_{module}`, `lora_te_`, `lora_te1_`/`lora_te2_` (SDXL's two
//!   encoders), the module path with `.` written `_` (diffusers' module names, or the
//!   original single-file ones), `.lora_down.weight` / `.lora_up.weight` / `.alpha`;
//!   convolution pairs (LoCon) the same way;
//! - diffusers / PEFT: `{module}.lora_A.weight` / `.lora_B.weight`, with or without a
//!   `unet.` / `text_encoder.` / `text_encoder_2.` prefix;
//! - diffusers' older attention processors:
//!   `{block}.processor.{to_q|to_k|to_v|to_out}_lora.{down|up}.weight`.
//!
//! Module names are matched against the model's own name plan
//! ([`crate::formats::diffusers::names`]), so every pair lands on a canonical tensor of
//! this architecture, with its shape checked; a key that names nothing of it is reported.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::formats::diffusers::names;
use crate::formats::{Checkpoint, SourceTensor};
use crate::network::{Op, Param};

/// Where a pair's update goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Canonical weight name (`model.diffusion_model.…weight`).
    pub weight: String,
    /// Shape of the whole canonical weight, PyTorch order.
    pub shape: Vec<usize>,
    /// Rows of the weight the update covers: one of q, k, v inside OpenCLIP's fused
    /// `in_proj_weight`; `None` for the whole weight.
    pub rows: Option<(usize, usize)>,
}

/// One low-rank pair.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The module as the file names it (without the down/up suffix).
    pub key: String,
    pub target: Target,
    /// `[rank, in, (kh, kw)]`.
    pub down: SourceTensor,
    /// `[out, rank, (1, 1)]`.
    pub up: SourceTensor,
    pub alpha: Option<f32>,
}

impl Pair {
    pub fn rank(&self) -> usize {
        self.down.shape.first().copied().unwrap_or(1)
    }

    /// `alpha / rank` (1 without an alpha): the kohya convention diffusers follows.
    pub fn alpha_scale(&self) -> f32 {
        self.alpha.map_or(1.0, |a| a / self.rank() as f32)
    }

    /// The update of the target rows, `multiplier · alpha/rank · up · down`, laid out
    /// like those rows of the weight (`[out][in·kh·kw]`).
    pub fn delta(&self, multiplier: f32) -> Result<Vec<f32>> {
        let down = self.down.read_f32()?;
        let up = self.up.read_f32()?;
        let r = self.rank();
        let cols = down.len() / r;
        let out = up.len() / r;
        let s = multiplier * self.alpha_scale();
        let mut d = vec![0f32; out * cols];
        for o in 0..out {
            let row = &mut d[o * cols..(o + 1) * cols];
            for k in 0..r {
                let u = up[o * r + k] * s;
                if u != 0.0 {
                    for (x, &v) in row.iter_mut().zip(&down[k * cols..(k + 1) * cols]) {
                        *x += u * v;
                    }
                }
            }
        }
        Ok(d)
    }
}

/// A LoRA file mapped onto one model.
#[derive(Debug)]
pub struct Lora {
    pub path: PathBuf,
    pub pairs: Vec<Pair>,
    /// Keys that name no module of the model (reported, never silently dropped).
    pub unknown: Vec<String>,
}

/// The parts of a key: which network, the module path, and which tensor of the pair.
#[derive(Debug, PartialEq, Eq)]
struct Key {
    net: Net,
    /// A diffusers module path, or (kohya) the same with `_` for `.`.
    module: String,
    part: Part,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Net {
    Unet,
    Text(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

const SUFFIXES: [(&str, Part); 13] = [
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_A.default.weight", Part::Down),
    (".lora_B.default.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    // The attention-processor layout (`…processor.to_q_lora.down.weight`).
    (".down.weight", Part::Down),
    (".up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

fn parse(raw: &str) -> Option<Key> {
    let (stem, part) = SUFFIXES
        .iter()
        .find_map(|&(suffix, part)| raw.strip_suffix(suffix).map(|s| (s, part)))?;
    for (prefix, net) in [
        ("lora_unet_", Net::Unet),
        ("lora_te1_", Net::Text(0)),
        ("lora_te2_", Net::Text(1)),
        ("lora_te_", Net::Text(0)),
    ] {
        if let Some(m) = stem.strip_prefix(prefix) {
            return Some(Key {
                net,
                module: m.to_string(),
                part,
            });
        }
    }
    let (net, module) = if let Some(m) = stem.strip_prefix("unet.") {
        (Net::Unet, m)
    } else if let Some(m) = stem.strip_prefix("text_encoder_2.") {
        (Net::Text(1), m)
    } else if let Some(m) = stem.strip_prefix("text_encoder.") {
        (Net::Text(0), m)
    } else if stem.starts_with("text_model.") {
        (Net::Text(0), stem)
    } else {
        (Net::Unet, stem)
    };
    // `attn1.processor.to_q_lora` adapts `attn1.to_q`; `to_out_lora` adapts `to_out.0`.
    let module = match module.rsplit_once(".processor.") {
        Some((block, proc)) => {
            let proj = proc.strip_suffix("_lora")?;
            format!(
                "{block}.{}",
                if proj == "to_out" { "to_out.0" } else { proj }
            )
        }
        None => module.to_string(),
    };
    Some(Key { net, module, part })
}

/// Every weight a LoRA may adapt (the matrices and kernels of the UNet and the text
/// encoders), under each name a file may give its module: the diffusers path, its
/// kohya spelling, and the kohya spelling of the original single-file path.
fn modules(cfg: &ModelConfig) -> Result<HashMap<(Net, String), Target>> {
    let mut by_name = HashMap::new();
    let mut add = |net: Net, entries: Vec<Param>, canonical_prefix: &str| {
        // Norms and biases are vectors; OpenCLIP's transposed projection has no LoRA.
        for e in entries
            .into_iter()
            .filter(|e| e.shape.len() >= 2 && e.op != Op::Transpose)
        {
            let parts = e.diffusers.len();
            for (i, d) in e.diffusers.iter().enumerate() {
                let Some(module) = d.strip_suffix(".weight") else {
                    continue;
                };
                // One of q, k, v of a fused projection covers a third of its rows.
                let rows = (e.op == Op::Concat)
                    .then(|| (i * e.shape[0] / parts, (i + 1) * e.shape[0] / parts));
                let target = Target {
                    weight: e.canonical.clone(),
                    shape: e.shape.clone(),
                    rows,
                };
                by_name.insert((net, module.to_string()), target.clone());
                by_name.insert((net, module.replace('.', "_")), target.clone());
                if let Some(own) = e
                    .canonical
                    .strip_suffix(".weight")
                    .and_then(|c| c.strip_prefix(canonical_prefix))
                    .filter(|_| rows.is_none())
                {
                    by_name
                        .entry((net, own.replace('.', "_")))
                        .or_insert(target);
                }
            }
        }
    };
    add(
        Net::Unet,
        names::unet(&cfg.unet)?,
        crate::network::UNET_PREFIX,
    );
    for (i, te) in cfg.text_encoders.iter().enumerate() {
        add(Net::Text(i), names::text(te), &te.prefix);
    }
    Ok(by_name)
}

/// The tensors of one pair as they are found.
struct Group {
    target: Target,
    key: String,
    down: Option<SourceTensor>,
    up: Option<SourceTensor>,
    alpha: Option<SourceTensor>,
}

impl Lora {
    /// Reads `path` (safetensors, or a torch pickle through the safe unpickler) and maps
    /// every pair onto `cfg`'s weights. Errors: a pair without its other half or with
    /// shapes that do not multiply to its target's, and a file of which nothing maps
    /// (a LoRA for another architecture).
    pub fn open(path: &Path, cfg: &ModelConfig) -> Result<Lora> {
        let ck = Checkpoint::open(path)?;
        Self::from_tensors(path, ck.tensors, cfg)
    }

    /// [`Lora::open`] on tensors already read; `path` names the file in messages.
    pub fn from_tensors(
        path: &Path,
        tensors: Vec<SourceTensor>,
        cfg: &ModelConfig,
    ) -> Result<Lora> {
        let modules = modules(cfg)?;
        let mut groups: BTreeMap<(String, Option<(usize, usize)>), Group> = BTreeMap::new();
        let mut unknown = Vec::new();
        for t in tensors {
            let Some(key) = parse(&t.name) else {
                unknown.push(t.name.clone());
                continue;
            };
            let Some(target) = modules.get(&(key.net, key.module.clone())) else {
                unknown.push(t.name.clone());
                continue;
            };
            let g = groups
                .entry((target.weight.clone(), target.rows))
                .or_insert_with(|| Group {
                    target: target.clone(),
                    key: key.module.clone(),
                    down: None,
                    up: None,
                    alpha: None,
                });
            let slot = match key.part {
                Part::Down => &mut g.down,
                Part::Up => &mut g.up,
                Part::Alpha => &mut g.alpha,
            };
            if let Some(other) = slot {
                return Err(Error::format(
                    path,
                    format!(
                        "`{}` and `{}` are the same part of one pair",
                        other.name, t.name
                    ),
                ));
            }
            *slot = Some(t);
        }
        let mut pairs = Vec::new();
        for g in groups.into_values() {
            let (down, up) = match (g.down, g.up) {
                (Some(d), Some(u)) => (d, u),
                (d, u) => {
                    let half = if d.is_some() { "up" } else { "down" };
                    let have = d.or(u).or(g.alpha).map(|t| t.name).unwrap_or_default();
                    return Err(Error::format(path, format!("`{have}` has no {half} half")));
                }
            };
            let alpha = match g.alpha {
                Some(a) => Some(
                    *a.read_f32()?
                        .first()
                        .ok_or_else(|| Error::format(path, format!("`{}` is empty", a.name)))?,
                ),
                None => None,
            };
            check_shapes(path, &g.key, &g.target, &down, &up)?;
            pairs.push(Pair {
                key: g.key,
                target: g.target,
                down,
                up,
                alpha,
            });
        }
        if pairs.is_empty() {
            let first: Vec<String> = unknown.iter().take(3).cloned().collect();
            return Err(Error::arch(path, format!("no key names a module of this {} model: a LoRA for another architecture? (first keys: {})", cfg.family, first.join(", "))));
        }
        unknown.sort();
        if !unknown.is_empty() {
            log::warn!(
                "{}: {} keys name nothing in this model and are ignored: {}",
                path.display(),
                unknown.len(),
                unknown
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(Lora {
            path: path.to_path_buf(),
            pairs,
            unknown,
        })
    }
}

/// `up · down` must make the target's rows: `[out, in, kh, kw]` (or `[out, in]`).
fn check_shapes(
    path: &Path,
    key: &str,
    target: &Target,
    down: &SourceTensor,
    up: &SourceTensor,
) -> Result<()> {
    // Products of dimensions from the file: one past usize reads as usize::MAX, which
    // matches nothing real and is refused below as a mismatch.
    let product = |dims: &[usize]| {
        dims.iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    };
    let (r, rest) = match down.shape.split_first() {
        Some((&r, rest)) if r > 0 => (r, product(rest)),
        _ => {
            return Err(Error::format(
                path,
                format!("`{}` has shape {:?}", down.name, down.shape),
            ))
        }
    };
    let out = up.shape.first().copied().unwrap_or(0);
    let up_rank = up.shape.get(1..).map_or(1, product);
    let rows = target.rows.map_or(target.shape[0], |(a, b)| b - a);
    let cols = target.shape.get(1..).map_or(1, product);
    if up_rank != r || out != rows || rest != cols {
        return Err(Error::arch(
            path,
            format!("`{key}`: down {:?} and up {:?} do not make the {rows}x{cols} update of `{}` {:?}: a LoRA for another architecture?", down.shape, up.shape, target.weight, target.shape),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_every_naming_parse_to_one_module() {
        let k = parse("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").unwrap();
        assert_eq!(
            (k.net, k.module.as_str(), k.part),
            (Net::Unet, "down_blocks_0_attentions_0_proj_in", Part::Down)
        );
        let k = parse("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap();
        assert_eq!((k.net, k.part), (Net::Text(1), Part::Alpha));
        let k = parse("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight")
            .unwrap();
        assert_eq!(
            (k.net, k.module.as_str(), k.part),
            (
                Net::Unet,
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
                Part::Up
            )
        );
        let k = parse("text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_A.weight")
            .unwrap();
        assert_eq!(
            (k.net, k.module.as_str()),
            (Net::Text(0), "text_model.encoder.layers.3.self_attn.q_proj")
        );
        let k = parse(
            "up_blocks.1.attentions.2.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
        )
        .unwrap();
        assert_eq!(
            (k.net, k.module.as_str()),
            (
                Net::Unet,
                "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0"
            )
        );
        assert_eq!(parse("model.diffusion_model.out.0.weight"), None);
    }
}
