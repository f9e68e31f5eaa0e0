//! CLIP text encoder (OpenAI CLIP in Hugging Face naming, and OpenCLIP).
use crate::config::{Activation, TextEncoderConfig, TextEncoderKind};
use crate::error::{Error, Result};
use crate::ggml::{Backend, Context, Tensor, Type};

use crate::network::clip::{projection_name, EncoderLayer, Qkv, TextEncoder};

use super::nn::Nn;
use super::{Adapters, Weights};

/// CLIP's layer-norm epsilon (both towers).
const LN_EPS: f32 = 1e-5;

/// Causal multi-head self-attention over `x` `[C, T, B]`.
fn attention<'c>(
    nn: &Nn<'c>,
    x: Tensor<'c>,
    layer: &EncoderLayer,
    heads: usize,
) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let [ch, t, b, _] = x.ne();
    let d = ch / heads;
    let (q, k, v) = match &layer.qkv {
        Qkv::Separate([q, k, v]) => (
            nn.linear(x, &q.name)?,
            nn.linear(x, &k.name)?,
            nn.linear(x, &v.name)?,
        ),
        Qkv::Stacked { weight, bias } => {
            let qkv = nn.linear_weight(x, &weight.canonical, nn.w.opt(&bias.canonical))?; // [3C, T, B]
            let part = |i: usize| c.cont(c.view(qkv, [ch, t, b, 1], [i * ch, 0, 0, 0])?);
            (part(0)?, part(1)?, part(2)?)
        }
    };
    let split = |y: Tensor<'c>| c.reshape(y, &[d, heads, t, b]);
    let q = c.permute(split(q)?, [0, 2, 1, 3])?; // [D, T, H, B]
    let k = c.permute(split(k)?, [0, 2, 1, 3])?;
    let v = c.permute(split(v)?, [0, 2, 1, 3])?;
    let o = nn.attend(q, k, v, true)?; // [C, T, B]
    nn.linear(o, &layer.out_proj.name)
}

/// Graph inputs and outputs of a text encoder run.
pub struct Graph<'c> {
    /// Token ids, i32 `[T * B]`.
    pub ids: Tensor<'c>,
    /// Positions 0..T, i32 `[T]`.
    pub positions: Tensor<'c>,
    /// With textual-inversion vectors: a 0/1 mask per token, f32 `[1, T * B]` (0 where a
    /// vector replaces the token's embedding) and the vectors `[hidden, T * B]` (zero
    /// elsewhere).
    pub vectors: Option<(Tensor<'c>, Tensor<'c>)>,
    /// Conditioning `[hidden, T, B]`.
    pub hidden: Tensor<'c>,
    /// With a pooled output: the flat index `b * T + eos_b` of each prompt's first
    /// end-of-text token (i32 `[B]`), and the projected embedding there `[proj, B]`.
    pub pooled: Option<(Tensor<'c>, Tensor<'c>)>,
}

/// Builds the encoder for `batch` prompts of `cfg.max_positions` tokens; `pooled` adds
/// the pooled, projected output (SDXL's bigG): CLIP's final-norm hidden state at the end-of-text
/// token times `text_projection`, which needs every layer even when the conditioning
/// is taken earlier. `vectors` adds the inputs that put embedding vectors in place of
/// token embeddings ([`Graph::vectors`]).
pub fn build<'c>(
    ctx: &'c Context<'c>,
    w: &'c Weights<'c>,
    cfg: &TextEncoderConfig,
    batch: usize,
    pooled: bool,
    vectors: bool,
    adapters: Option<&'c Adapters>,
) -> Result<Graph<'c>> {
    let nn = Nn {
        adapters,
        ..Nn::new(ctx, w)
    };
    let t = cfg.max_positions;
    let plan = TextEncoder::new(cfg);
    let final_norm = &plan.final_norm.name;
    let ids = ctx.tensor(Type::I32, &[t * batch], "clip.ids")?;
    let positions = ctx.tensor(Type::I32, &[t], "clip.positions")?;
    ctx.set_input(ids);
    ctx.set_input(positions);
    let mut x = ctx.get_rows(w.get(&plan.token_embedding.canonical)?, ids)?; // [hidden, T * B]
    let vectors = if vectors {
        let keep = ctx.tensor(Type::F32, &[1, t * batch], "clip.keep")?;
        let values = ctx.tensor(Type::F32, &[cfg.hidden_size, t * batch], "clip.vectors")?;
        ctx.set_input(keep);
        ctx.set_input(values);
        // x·0 + v and x·1 + 0 are exact: the replaced rows are the vectors, bit for bit.
        x = ctx.add(ctx.mul(x, keep)?, values)?;
        Some((keep, values))
    } else {
        None
    };
    let x = ctx.reshape(x, &[cfg.hidden_size, t, batch])?;
    let mut x = ctx.add(
        x,
        ctx.get_rows(w.get(&plan.position_embedding.canonical)?, positions)?,
    )?;
    let layers = cfg
        .num_layers
        .checked_sub(cfg.skip_layers)
        .filter(|&l| l > 0)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "text encoder skips {} of {} layers",
                cfg.skip_layers, cfg.num_layers
            ))
        })?;
    let mut hidden = None;
    let run = if pooled { cfg.num_layers } else { layers };
    for (i, l) in plan.layers.iter().take(run).enumerate() {
        let h = nn.layer_norm(x, &l.norm1.name, LN_EPS)?;
        x = ctx.add(x, attention(&nn, h, l, cfg.num_heads)?)?;
        let h = nn.layer_norm(x, &l.norm2.name, LN_EPS)?;
        let h = nn.linear(h, &l.fc1.name)?;
        let h = match cfg.activation {
            Activation::QuickGelu => ctx.gelu_quick(h)?,
            Activation::Gelu => ctx.gelu(h)?,
        };
        x = ctx.add(x, nn.linear(h, &l.fc2.name)?)?;
        if i + 1 == layers {
            hidden = Some(if cfg.final_norm {
                nn.layer_norm(x, final_norm, LN_EPS)?
            } else {
                x
            });
        }
    }
    let hidden = hidden.ok_or_else(|| Error::Invalid("text encoder has no layers".into()))?;
    ctx.set_output(hidden);
    let pooled = if pooled {
        let eos = ctx.tensor(Type::I32, &[batch], "clip.eos")?;
        ctx.set_input(eos);
        let last = nn.layer_norm(x, final_norm, LN_EPS)?;
        let rows = ctx.get_rows(ctx.reshape(last, &[cfg.hidden_size, t * batch])?, eos)?; // [hidden, B]
        let proj = w.get(&projection_name(cfg))?;
        let out = match cfg.kind {
            TextEncoderKind::HfClip => ctx.linear(rows, proj, None)?,
            // OpenCLIP applies it as `x @ P` (P `[hidden, proj]`): a linear layer with P^T,
            // which is why the converter keeps it in a float type.
            TextEncoderKind::OpenClip => ctx.mul_mat(ctx.cont(ctx.transpose(proj)?)?, rows)?,
        };
        ctx.set_output(out);
        Some((eos, out))
    } else {
        None
    };
    Ok(Graph {
        ids,
        positions,
        vectors,
        hidden,
        pooled,
    })
}

fn outputs<'c>(g: &Graph<'c>) -> Vec<Tensor<'c>> {
    std::iter::once(g.hidden)
        .chain(g.pooled.map(|(_, p)| p))
        .collect()
}

/// The compute buffer [`encode`] needs for `prompts` prompts, found without allocating it.
pub fn buffer_bytes(
    w: &Weights<'_>,
    cfg: &TextEncoderConfig,
    prompts: usize,
    pooled: bool,
    vectors: bool,
    adapters: Option<&Adapters>,
) -> Result<usize> {
    let ctx = Context::new(64 + 48 * cfg.num_layers + Adapters::nodes(adapters))?;
    let g = build(&ctx, w, cfg, prompts, pooled, vectors, adapters)?;
    let graph = ctx.graph(&outputs(&g))?;
    ctx.measure_graph(&graph)
}

/// What a text encoder gives for a batch of prompts.
pub struct Encoded {
    /// `[B][T][hidden]`, flattened.
    pub hidden: Vec<f32>,
    /// `[B][proj]`, when asked for.
    pub pooled: Option<Vec<f32>>,
}

/// Runs the encoder on padded token sequences; returns `[B][T][hidden]` flattened.
pub fn encode(
    w: &Weights<'_>,
    cfg: &TextEncoderConfig,
    tokens: &[Vec<u32>],
    backend: &Backend,
) -> Result<Vec<f32>> {
    Ok(encode_all(w, cfg, tokens, false, backend)?.hidden)
}

/// [`encode`], with the pooled output too when `pooled` (see [`build`]).
pub fn encode_all(
    w: &Weights<'_>,
    cfg: &TextEncoderConfig,
    tokens: &[Vec<u32>],
    pooled: bool,
    backend: &Backend,
) -> Result<Encoded> {
    encode_with(w, cfg, tokens, &[], pooled, None, backend)
}

/// A textual-inversion vector put in place of the token embedding at `row`
/// (`prompt * T + position`).
#[derive(Clone, Copy, Debug)]
pub struct Vector<'a> {
    pub row: usize,
    pub values: &'a [f32],
}

/// [`encode_all`] with embedding `vectors` in place of some tokens' embeddings.
/// `adapters`: LoRA branches beside the weights.
pub fn encode_with(
    w: &Weights<'_>,
    cfg: &TextEncoderConfig,
    tokens: &[Vec<u32>],
    vectors: &[Vector<'_>],
    pooled: bool,
    adapters: Option<&Adapters>,
    backend: &Backend,
) -> Result<Encoded> {
    let t = cfg.max_positions;
    let mut flat = Vec::with_capacity(t * tokens.len());
    let mut eos = Vec::with_capacity(tokens.len());
    for (b, seq) in tokens.iter().enumerate() {
        if seq.len() != t {
            return Err(Error::Invalid(format!(
                "text encoder takes {t} tokens per prompt, got {}",
                seq.len()
            )));
        }
        for &id in seq {
            if id as usize >= cfg.vocab_size {
                return Err(Error::Invalid(format!(
                    "token id {id} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            flat.push(id as i32);
        }
        // The end-of-text token has the largest id: OpenCLIP pools at `argmax(ids)`
        // (its first occurrence), as transformers does for these configs.
        let first_max = seq
            .iter()
            .enumerate()
            .fold(0, |best, (i, &id)| if id > seq[best] { i } else { best });
        eos.push((b * t + first_max) as i32);
    }
    let ctx = Context::new(64 + 48 * cfg.num_layers + Adapters::nodes(adapters))?;
    let g = build(
        &ctx,
        w,
        cfg,
        tokens.len(),
        pooled,
        !vectors.is_empty(),
        adapters,
    )?;
    let graph = ctx.graph(&outputs(&g))?;
    ctx.alloc_graph(&graph)?;
    if let Some((keep, values)) = g.vectors {
        let h = cfg.hidden_size;
        let mut k = vec![1f32; t * tokens.len()];
        let mut v = vec![0f32; h * t * tokens.len()];
        for vec in vectors {
            if vec.row >= k.len() || vec.values.len() != h {
                return Err(Error::Invalid(format!(
                    "embedding vector of width {} at token {} of {}",
                    vec.values.len(),
                    vec.row,
                    k.len()
                )));
            }
            k[vec.row] = 0.0;
            v[vec.row * h..][..h].copy_from_slice(vec.values);
        }
        ctx.set_f32(keep, &k)?;
        ctx.set_f32(values, &v)?;
    }
    ctx.set_i32(g.ids, &flat)?;
    ctx.set_i32(g.positions, &(0..t as i32).collect::<Vec<_>>())?;
    if let Some((e, _)) = g.pooled {
        ctx.set_i32(e, &eos)?;
    }
    backend.compute(&graph)?;
    Ok(Encoded {
        hidden: ctx.get_f32(g.hidden)?,
        pooled: g.pooled.map(|(_, p)| ctx.get_f32(p)).transpose()?,
    })
}
