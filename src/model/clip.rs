//! CLIP text encoder (OpenAI CLIP in Hugging Face naming, and OpenCLIP).
use crate::config::{Activation, TextEncoderConfig, TextEncoderKind};
use crate::error::{Error, Result};
use crate::ggml::{Backend, Context, Tensor, Type};

use super::nn::Nn;
use super::Weights;

/// CLIP's layer-norm epsilon (both towers).
const LN_EPS: f32 = 1e-5;

/// Names of one layer's weights, for either naming scheme.
struct LayerNames {
    ln1: String,
    ln2: String,
    /// Separate q/k/v projections (HF) or one stacked projection (OpenCLIP).
    qkv: Qkv,
    out: String,
    fc1: String,
    fc2: String,
}

enum Qkv {
    Separate([String; 3]),
    Stacked(String),
}

fn layer_names(cfg: &TextEncoderConfig, i: usize) -> LayerNames {
    let p = &cfg.prefix;
    match cfg.kind {
        TextEncoderKind::HfClip => {
            let l = format!("{p}encoder.layers.{i}.");
            LayerNames {
                ln1: format!("{l}layer_norm1"),
                ln2: format!("{l}layer_norm2"),
                qkv: Qkv::Separate([format!("{l}self_attn.q_proj"), format!("{l}self_attn.k_proj"), format!("{l}self_attn.v_proj")]),
                out: format!("{l}self_attn.out_proj"),
                fc1: format!("{l}mlp.fc1"),
                fc2: format!("{l}mlp.fc2"),
            }
        }
        TextEncoderKind::OpenClip => {
            let l = format!("{p}transformer.resblocks.{i}.");
            LayerNames {
                ln1: format!("{l}ln_1"),
                ln2: format!("{l}ln_2"),
                qkv: Qkv::Stacked(format!("{l}attn.in_proj_")),
                out: format!("{l}attn.out_proj"),
                fc1: format!("{l}mlp.c_fc"),
                fc2: format!("{l}mlp.c_proj"),
            }
        }
    }
}

/// Causal multi-head self-attention over `x` `[C, T, B]`.
fn attention<'c>(nn: &Nn<'c>, x: Tensor<'c>, names: &LayerNames, heads: usize) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let [ch, t, b, _] = x.ne();
    let d = ch / heads;
    let (q, k, v) = match &names.qkv {
        Qkv::Separate([q, k, v]) => (nn.linear(x, q)?, nn.linear(x, k)?, nn.linear(x, v)?),
        Qkv::Stacked(p) => {
            let w = nn.w.get(&format!("{p}weight"))?;
            let qkv = c.linear(x, w, nn.w.opt(&format!("{p}bias")))?; // [3C, T, B]
            let part = |i: usize| c.cont(c.view(qkv, [ch, t, b, 1], [i * ch, 0, 0, 0])?);
            (part(0)?, part(1)?, part(2)?)
        }
    };
    let split = |y: Tensor<'c>| c.reshape(y, &[d, heads, t, b]);
    let q = c.permute(split(q)?, [0, 2, 1, 3])?; // [D, T, H, B]
    let k = c.permute(split(k)?, [0, 2, 1, 3])?;
    let v = c.permute(split(v)?, [0, 2, 1, 3])?;
    let o = nn.attend(q, k, v, true)?; // [C, T, B]
    nn.linear(o, &names.out)
}

/// Graph inputs and output of a text encoder run.
pub struct Graph<'c> {
    /// Token ids, i32 `[T * B]`.
    pub ids: Tensor<'c>,
    /// Positions 0..T, i32 `[T]`.
    pub positions: Tensor<'c>,
    /// Conditioning `[hidden, T, B]`.
    pub hidden: Tensor<'c>,
}

/// Builds the encoder for `batch` prompts of `cfg.max_positions` tokens.
pub fn build<'c>(ctx: &'c Context<'c>, w: &'c Weights<'c>, cfg: &TextEncoderConfig, batch: usize) -> Result<Graph<'c>> {
    let nn = Nn::new(ctx, w);
    let t = cfg.max_positions;
    let p = &cfg.prefix;
    let (tok, pos) = match cfg.kind {
        TextEncoderKind::HfClip => (format!("{p}embeddings.token_embedding.weight"), format!("{p}embeddings.position_embedding.weight")),
        TextEncoderKind::OpenClip => (format!("{p}token_embedding.weight"), format!("{p}positional_embedding")),
    };
    let ids = ctx.tensor(Type::I32, &[t * batch], "clip.ids")?;
    let positions = ctx.tensor(Type::I32, &[t], "clip.positions")?;
    ctx.set_input(ids);
    ctx.set_input(positions);
    let x = ctx.get_rows(w.get(&tok)?, ids)?;
    let x = ctx.reshape(x, &[cfg.hidden_size, t, batch])?;
    let mut x = ctx.add(x, ctx.get_rows(w.get(&pos)?, positions)?)?;
    let layers = cfg.num_layers.checked_sub(cfg.skip_layers).ok_or_else(|| Error::Invalid(format!("text encoder skips {} of {} layers", cfg.skip_layers, cfg.num_layers)))?;
    for i in 0..layers {
        let n = layer_names(cfg, i);
        let h = nn.layer_norm(x, &n.ln1, LN_EPS)?;
        x = ctx.add(x, attention(&nn, h, &n, cfg.num_heads)?)?;
        let h = nn.layer_norm(x, &n.ln2, LN_EPS)?;
        let h = nn.linear(h, &n.fc1)?;
        let h = match cfg.activation {
            Activation::QuickGelu => ctx.gelu_quick(h)?,
            Activation::Gelu => ctx.gelu(h)?,
        };
        x = ctx.add(x, nn.linear(h, &n.fc2)?)?;
    }
    if cfg.final_norm {
        let name = match cfg.kind {
            TextEncoderKind::HfClip => format!("{p}final_layer_norm"),
            TextEncoderKind::OpenClip => format!("{p}ln_final"),
        };
        x = nn.layer_norm(x, &name, LN_EPS)?;
    }
    ctx.set_output(x);
    Ok(Graph { ids, positions, hidden: x })
}

/// The compute buffer [`encode`] needs for `prompts` prompts, found without allocating it.
pub fn buffer_bytes(w: &Weights<'_>, cfg: &TextEncoderConfig, prompts: usize) -> Result<usize> {
    let ctx = Context::new(64 + 40 * cfg.num_layers)?;
    let g = build(&ctx, w, cfg, prompts)?;
    let graph = ctx.graph(&[g.hidden])?;
    ctx.measure_graph(&graph)
}

/// Runs the encoder on padded token sequences; returns `[B][T][hidden]` flattened.
pub fn encode(w: &Weights<'_>, cfg: &TextEncoderConfig, tokens: &[Vec<u32>], backend: &Backend) -> Result<Vec<f32>> {
    let t = cfg.max_positions;
    let mut flat = Vec::with_capacity(t * tokens.len());
    for seq in tokens {
        if seq.len() != t {
            return Err(Error::Invalid(format!("text encoder takes {t} tokens per prompt, got {}", seq.len())));
        }
        for &id in seq {
            if id as usize >= cfg.vocab_size {
                return Err(Error::Invalid(format!("token id {id} is outside the vocabulary of {}", cfg.vocab_size)));
            }
            flat.push(id as i32);
        }
    }
    let ctx = Context::new(64 + 40 * cfg.num_layers)?;
    let g = build(&ctx, w, cfg, tokens.len())?;
    let graph = ctx.graph(&[g.hidden])?;
    ctx.alloc_graph(&graph)?;
    ctx.set_i32(g.ids, &flat)?;
    ctx.set_i32(g.positions, &(0..t as i32).collect::<Vec<_>>())?;
    backend.compute(&graph)?;
    ctx.get_f32(g.hidden)
}
