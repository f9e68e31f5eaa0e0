//! LoRA at run time: each adapted layer gets a low-rank branch beside its base weight,
//! `y = W·x + scale·up·(down·x)`, with scale = multiplier × alpha / rank (Hu et al. 2021,
//! "LoRA"; the kohya convention diffusers follows). The base weight stays as it is in
//! the file (quantized, memory-mapped, shared between requests); the branches are small
//! f32 tensors of their own, so a request can use any set of LoRAs, or none, without
//! touching the model.
use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::ggml::{Backend, ConvShape, Tensor};
use crate::lora::Lora;

use super::Weights;

/// One branch on a weight.
struct Branch {
    down: String,
    up: String,
    scale: f32,
    /// The down projection's kernel size (1 for linear layers; LoCon: the base conv's).
    kernel: usize,
}

/// The branches of one stage's weights (a text encoder, the UNet).
pub struct Adapters {
    w: Weights<'static>,
    /// Base weight name (`….weight`) → its branches, in the order the LoRAs were given.
    branches: HashMap<String, Vec<Branch>>,
}

impl Adapters {
    /// The branches of `loras` (each with its multiplier) on the weights `keep` picks;
    /// `None` when no pair lands there.
    pub fn new(
        loras: &[(&Lora, f32)],
        keep: impl Fn(&str) -> bool,
        backend: &Backend,
    ) -> Result<Option<Self>> {
        let mut list = Vec::new();
        let mut branches: HashMap<String, Vec<Branch>> = HashMap::new();
        // The file named in messages about the branch tensors (the last one used).
        let mut path = PathBuf::new();
        for (l, (lora, multiplier)) in loras.iter().enumerate() {
            let mut pairs = lora
                .pairs
                .iter()
                .enumerate()
                .filter(|(_, p)| keep(&p.target.weight))
                .peekable();
            if pairs.peek().is_some() {
                path = lora.path.clone();
            }
            for (p, pair) in pairs {
                let bad = |msg: String| Error::format(&lora.path, format!("`{}`: {msg}", pair.key));
                let rank = pair.rank();
                let down = pair.down.read_f32()?;
                let up = pair.up.read_f32()?;
                let kernel = match pair.down.shape.as_slice() {
                    [_, _] | [_, _, 1, 1] => 1,
                    [_, _, k, kw] if k == kw => *k,
                    s => return Err(bad(format!("down projection of shape {s:?}"))),
                };
                if rank == 0 || down.len() % rank != 0 || up.len() % rank != 0 {
                    return Err(bad("rank does not divide the pair's sizes".into()));
                }
                let (cols, out) = (down.len() / rank, up.len() / rank);
                // OpenCLIP's fused q/k/v: the branch writes its third of the rows, zeros elsewhere.
                let (rows, up) = match pair.target.rows {
                    Some((start, end)) => {
                        let total = pair.target.shape.first().copied().unwrap_or(0);
                        if end - start != out || end > total {
                            return Err(bad(format!(
                                "rows {start}..{end} of {total} for an update of {out} rows"
                            )));
                        }
                        let mut full = vec![0f32; total * rank];
                        full[start * rank..end * rank].copy_from_slice(&up);
                        (total, full)
                    }
                    None => (out, up),
                };
                let name = format!("lora.{l}.{p}");
                list.push((format!("{name}.down"), vec![cols, rank], down));
                list.push((format!("{name}.up"), vec![rank, rows], up));
                branches
                    .entry(pair.target.weight.clone())
                    .or_default()
                    .push(Branch {
                        down: format!("{name}.down"),
                        up: format!("{name}.up"),
                        scale: multiplier * pair.alpha_scale(),
                        kernel,
                    });
            }
        }
        if list.is_empty() {
            return Ok(None);
        }
        Ok(Some(Adapters {
            w: Weights::from_f32(&path, list, backend)?,
            branches,
        }))
    }

    /// Bytes of the branch tensors.
    pub fn bytes(&self) -> u64 {
        self.w.bytes()
    }

    /// How many branches there are (each adds a few graph nodes).
    pub fn count(&self) -> usize {
        self.branches.values().map(Vec::len).sum()
    }

    /// Graph nodes the branches add, at most.
    pub fn nodes(a: Option<&Adapters>) -> usize {
        8 * a.map_or(0, Adapters::count)
    }

    /// Adds the branches on `weight` to `y`, the base layer's output for `x`: `conv`
    /// gives the base convolution's (kernel, stride, padding), `None` for a linear layer.
    pub(super) fn apply<'c>(
        &'c self,
        ctx: &'c crate::ggml::Context<'c>,
        weight: &str,
        x: Tensor<'c>,
        mut y: Tensor<'c>,
        conv: Option<(usize, usize, usize)>,
    ) -> Result<Tensor<'c>> {
        let Some(list) = self.branches.get(weight) else {
            return Ok(y);
        };
        for b in list {
            let (down, up) = (self.w.get(&b.down)?, self.w.get(&b.up)?);
            let h = match conv {
                None => ctx.mul_mat(up, ctx.mul_mat(down, x)?)?,
                Some((k, stride, pad)) => {
                    let (dk, dstride, dpad) = if b.kernel == k {
                        (k, stride, pad)
                    } else if b.kernel == 1 && k == 1 {
                        (1, 1, 0)
                    } else {
                        return Err(Error::Invalid(format!("LoRA on `{weight}`: a {0}x{0} down projection on a {k}x{k} convolution", b.kernel)));
                    };
                    let h = ctx.conv2d(x, down, ConvShape::square(dk, dstride, dpad), None)?;
                    ctx.conv2d(h, up, ConvShape::square(1, 1, 0), None)?
                }
            };
            y = ctx.add(y, ctx.scale(h, b.scale)?)?;
        }
        Ok(y)
    }
}
