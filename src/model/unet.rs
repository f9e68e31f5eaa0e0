//! The denoising UNet (LDM `openaimodel.UNetModel`, names `model.diffusion_model.*`).
//! Its shape (levels, ResNets and transformer depths per block, heads, projections)
//! comes from [`UnetConfig`]; SDXL's label embedding and LCM's guidance embedding
//! are used when the config has them.
use crate::config::UnetConfig;
use crate::error::{Error, Result};
use crate::ggml::{Backend, Context, Tensor, Type};

use super::nn::{Attention, Nn};
use super::Adapters;
use super::Weights;

use crate::formats::layout::UNET_PREFIX as P;
const GROUPS: usize = 32;

fn resblock<'c>(nn: &Nn<'c>, x: Tensor<'c>, emb: Tensor<'c>, name: &str) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let h = c.silu(nn.group_norm(x, &format!("{name}.in_layers.0"), GROUPS, 1e-5)?)?;
    let h = nn.conv(h, &format!("{name}.in_layers.2"), 3, 1, 1)?;
    let out_ch = h.ne()[2];
    let e = nn.linear(c.silu(emb)?, &format!("{name}.emb_layers.1"))?; // [C, B]
    let e = c.reshape(e, &[1, 1, out_ch, e.ne()[1]])?;
    let h = c.add(h, e)?;
    let h = c.silu(nn.group_norm(h, &format!("{name}.out_layers.0"), GROUPS, 1e-5)?)?;
    let h = nn.conv(h, &format!("{name}.out_layers.3"), 3, 1, 1)?;
    let skip = if nn
        .w
        .opt(&format!("{name}.skip_connection.weight"))
        .is_some()
    {
        nn.conv(x, &format!("{name}.skip_connection"), 1, 1, 0)?
    } else {
        x
    };
    c.add(skip, h)
}

/// Multi-head attention: queries from `x` `[C, N, B]`, keys/values from `ctx_in`
/// (`x` itself for self-attention).
fn attention<'c>(
    nn: &Nn<'c>,
    x: Tensor<'c>,
    ctx_in: Tensor<'c>,
    name: &str,
    heads: usize,
) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let [ch, n, b, _] = x.ne();
    let d = ch / heads;
    let tk = ctx_in.ne()[1];
    let q = nn.linear(x, &format!("{name}.to_q"))?;
    let k = nn.linear(ctx_in, &format!("{name}.to_k"))?;
    let v = nn.linear(ctx_in, &format!("{name}.to_v"))?;
    let q = c.permute(c.reshape(q, &[d, heads, n, b])?, [0, 2, 1, 3])?; // [D, N, H, B]
    let k = c.permute(c.reshape(k, &[d, heads, tk, b])?, [0, 2, 1, 3])?;
    let v = c.permute(c.reshape(v, &[d, heads, tk, b])?, [0, 2, 1, 3])?;
    let o = nn.attend(q, k, v, false)?; // [C, N, B]
    nn.linear(o, &format!("{name}.to_out.0"))
}

fn feed_forward<'c>(nn: &Nn<'c>, x: Tensor<'c>, name: &str) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let h = nn.linear(x, &format!("{name}.net.0.proj"))?; // [2*inner, N, B]
    let [two, n, b, _] = h.ne();
    let inner = two / 2;
    // GEGLU: the first half is the value, the second the gate.
    let value = c.view(h, [inner, n, b, 1], [0, 0, 0, 0])?;
    let gate = c.cont(c.view(h, [inner, n, b, 1], [inner, 0, 0, 0])?)?;
    let y = c.mul(c.cont(value)?, c.gelu(gate)?)?;
    nn.linear(y, &format!("{name}.net.2"))
}

fn spatial_transformer<'c>(
    nn: &Nn<'c>,
    x: Tensor<'c>,
    context: Tensor<'c>,
    name: &str,
    depth: usize,
    cfg: &UnetConfig,
) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let [w, h, ch, _] = x.ne();
    let heads = cfg.heads_for(ch);
    let hn = nn.group_norm(x, &format!("{name}.norm"), GROUPS, 1e-6)?;
    let mut t = if cfg.linear_proj {
        nn.linear(nn.to_tokens(hn)?, &format!("{name}.proj_in"))?
    } else {
        nn.to_tokens(nn.conv(hn, &format!("{name}.proj_in"), 1, 1, 0)?)?
    };
    for i in 0..depth {
        let b = format!("{name}.transformer_blocks.{i}");
        let n1 = nn.layer_norm(t, &format!("{b}.norm1"), 1e-5)?;
        t = c.add(t, attention(nn, n1, n1, &format!("{b}.attn1"), heads)?)?;
        let n2 = nn.layer_norm(t, &format!("{b}.norm2"), 1e-5)?;
        t = c.add(t, attention(nn, n2, context, &format!("{b}.attn2"), heads)?)?;
        let n3 = nn.layer_norm(t, &format!("{b}.norm3"), 1e-5)?;
        t = c.add(t, feed_forward(nn, n3, &format!("{b}.ff"))?)?;
    }
    let out = if cfg.linear_proj {
        nn.from_tokens(nn.linear(t, &format!("{name}.proj_out"))?, w, h)?
    } else {
        nn.conv(
            nn.from_tokens(t, w, h)?,
            &format!("{name}.proj_out"),
            1,
            1,
            0,
        )?
    };
    c.add(out, x)
}

/// Graph inputs and output of one UNet evaluation.
pub struct Graph<'c> {
    /// Noisy latents `[W, H, in_channels, B]`.
    pub x: Tensor<'c>,
    /// Model timesteps `[B]` (f32).
    pub t: Tensor<'c>,
    /// Text conditioning `[context_dim, T, B]`.
    pub context: Tensor<'c>,
    /// Pooled-text/size conditioning `[adm_in_channels, B]` (SDXL).
    pub y: Option<Tensor<'c>>,
    /// Guidance embedding input `[time_cond_proj_dim, B]` (LCM).
    pub guidance: Option<Tensor<'c>>,
    /// Model output `[W, H, out_channels, B]`.
    pub out: Tensor<'c>,
}

/// Builds the UNet for a batch of `b` latents of `w`x`h`, with `tokens` context tokens.
pub fn build<'c>(
    nn: &Nn<'c>,
    cfg: &UnetConfig,
    w: usize,
    h: usize,
    b: usize,
    tokens: usize,
) -> Result<Graph<'c>> {
    let c = nn.ctx;
    let levels = cfg.channel_mult.len();
    let f = 1 << (levels - 1);
    if !w.is_multiple_of(f) || !h.is_multiple_of(f) || w == 0 || h == 0 {
        return Err(Error::Invalid(format!(
            "latent size {w}x{h} must be a multiple of {f} for this UNet"
        )));
    }
    let x_in = c.tensor(Type::F32, &[w, h, cfg.in_channels, b], "unet.x")?;
    let t_in = c.tensor(Type::F32, &[b], "unet.t")?;
    let ctx_in = c.tensor(Type::F32, &[cfg.context_dim, tokens, b], "unet.context")?;
    for t in [x_in, t_in, ctx_in] {
        c.set_input(t);
    }
    let mc = cfg.model_channels;
    let mut temb = c.timestep_embedding(t_in, mc, 10000)?; // [mc, B]
    let guidance = match cfg.time_cond_proj_dim {
        Some(dim) => {
            let g = c.tensor(Type::F32, &[dim, b], "unet.guidance")?;
            c.set_input(g);
            temb = c.add(temb, nn.linear(g, &format!("{P}time_embed.cond_proj"))?)?;
            Some(g)
        }
        None => None,
    };
    let mut emb = nn.linear(
        c.silu(nn.linear(temb, &format!("{P}time_embed.0"))?)?,
        &format!("{P}time_embed.2"),
    )?;
    let y = match cfg.adm_in_channels {
        Some(adm) => {
            let y = c.tensor(Type::F32, &[adm, b], "unet.y")?;
            c.set_input(y);
            let l = nn.linear(
                c.silu(nn.linear(y, &format!("{P}label_emb.0.0"))?)?,
                &format!("{P}label_emb.0.2"),
            )?;
            emb = c.add(emb, l)?;
            Some(y)
        }
        None => None,
    };

    let mut x = nn.conv(x_in, &format!("{P}input_blocks.0.0"), 3, 1, 1)?;
    let mut skips = vec![x];
    let mut n = 1;
    for (level, blocks) in cfg.down_blocks.iter().enumerate() {
        for &depth in blocks {
            x = resblock(nn, x, emb, &format!("{P}input_blocks.{n}.0"))?;
            if depth > 0 {
                x = spatial_transformer(
                    nn,
                    x,
                    ctx_in,
                    &format!("{P}input_blocks.{n}.1"),
                    depth,
                    cfg,
                )?;
            }
            skips.push(x);
            n += 1;
        }
        if level + 1 < levels {
            x = nn.conv(x, &format!("{P}input_blocks.{n}.0.op"), 3, 2, 1)?;
            skips.push(x);
            n += 1;
        }
    }
    if let Some(depth) = cfg.mid_depth {
        x = resblock(nn, x, emb, &format!("{P}middle_block.0"))?;
        if depth > 0 {
            x = spatial_transformer(nn, x, ctx_in, &format!("{P}middle_block.1"), depth, cfg)?;
            x = resblock(nn, x, emb, &format!("{P}middle_block.2"))?;
        }
    }
    let mut n = 0;
    for (i, blocks) in cfg.up_blocks.iter().enumerate() {
        for (j, &depth) in blocks.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                Error::Invalid("UNet config has more decoder blocks than skip connections".into())
            })?;
            x = c.concat(x, skip, 2)?;
            let name = format!("{P}output_blocks.{n}");
            x = resblock(nn, x, emb, &format!("{name}.0"))?;
            let mut idx = 1;
            if depth > 0 {
                x = spatial_transformer(nn, x, ctx_in, &format!("{name}.1"), depth, cfg)?;
                idx = 2;
            }
            if j + 1 == blocks.len() && i + 1 < cfg.up_blocks.len() {
                x = c.upscale_nearest(x, 2)?;
                x = nn.conv(x, &format!("{name}.{idx}.conv"), 3, 1, 1)?;
            }
            n += 1;
        }
    }
    let x = c.silu(nn.group_norm(x, &format!("{P}out.0"), GROUPS, 1e-5)?)?;
    let out = nn.conv(x, &format!("{P}out.2"), 3, 1, 1)?;
    c.set_output(out);
    Ok(Graph {
        x: x_in,
        t: t_in,
        context: ctx_in,
        y,
        guidance,
        out,
    })
}

/// A UNet graph built once for one shape and run at every sampling step: the
/// compute buffer is allocated once and reused.
pub struct Runner<'w> {
    ctx: Context<'w>,
    cfg: UnetConfig,
    shape: (usize, usize, usize, usize),
    /// Compute-buffer size in bytes.
    pub buffer_bytes: usize,
    /// Matrix-product FLOPs of one evaluation (all of the batch).
    pub flops: f64,
    _weights: std::marker::PhantomData<&'w Weights<'w>>,
}

impl<'w> Runner<'w> {
    /// Builds the graph for `batch` latents of `width`x`height` with `tokens` context tokens.
    /// `adapters`: LoRA branches beside the weights.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &'w Weights<'w>,
        cfg: &UnetConfig,
        width: usize,
        height: usize,
        batch: usize,
        tokens: usize,
        attention: Attention,
        adapters: Option<&'w Adapters>,
    ) -> Result<Self> {
        let ctx = Context::new(16384 + Adapters::nodes(adapters))?;
        let (buffer_bytes, flops) = {
            let nn = Nn {
                attention,
                adapters,
                ..Nn::new(&ctx, w)
            };
            let g = build(&nn, cfg, width, height, batch, tokens)?;
            ctx.name(g.out, "unet.out")?;
            let graph = ctx.graph(&[g.out])?;
            (ctx.alloc_graph(&graph)?, graph.matmul_flops())
        };
        Ok(Runner {
            ctx,
            cfg: cfg.clone(),
            shape: (width, height, batch, tokens),
            buffer_bytes,
            flops,
            _weights: std::marker::PhantomData,
        })
    }

    /// The compute buffer [`Runner::new`] would allocate, without allocating it.
    #[allow(clippy::too_many_arguments)]
    pub fn measure(
        w: &Weights<'_>,
        cfg: &UnetConfig,
        width: usize,
        height: usize,
        batch: usize,
        tokens: usize,
        attention: Attention,
        adapters: Option<&Adapters>,
    ) -> Result<usize> {
        let ctx = Context::new(16384 + Adapters::nodes(adapters))?;
        let nn = Nn {
            attention,
            adapters,
            ..Nn::new(&ctx, w)
        };
        let g = build(&nn, cfg, width, height, batch, tokens)?;
        let graph = ctx.graph(&[g.out])?;
        ctx.measure_graph(&graph)
    }

    /// One evaluation: `x` `[B][C][H][W]`, `t` `[B]`, `context` `[B][T][ctx]`.
    pub fn run(
        &self,
        x: &[f32],
        t: &[f32],
        context: &[f32],
        y: Option<&[f32]>,
        guidance: Option<&[f32]>,
        backend: &Backend,
    ) -> Result<Vec<f32>> {
        let (w, h, b, tokens) = self.shape;
        let cfg = &self.cfg;
        if t.len() != b
            || x.len() != b * cfg.in_channels * w * h
            || context.len() != b * tokens * cfg.context_dim
        {
            return Err(Error::Invalid(format!("UNet inputs: {} latent, {} timestep and {} context values for a graph of batch {b}", x.len(), t.len(), context.len())));
        }
        let get = |n: &str| {
            self.ctx
                .get(n)
                .ok_or_else(|| Error::Invalid(format!("UNet graph lacks `{n}`")))
        };
        self.ctx.set_f32(get("unet.x")?, x)?;
        self.ctx.set_f32(get("unet.t")?, t)?;
        self.ctx.set_f32(get("unet.context")?, context)?;
        for (name, value) in [("unet.y", y), ("unet.guidance", guidance)] {
            match (self.ctx.get(name), value) {
                (Some(tensor), Some(v)) => self.ctx.set_f32(tensor, v)?,
                (None, None) => {}
                _ => {
                    return Err(Error::Invalid(format!(
                        "`{name}` must be given exactly when the UNet uses it"
                    )))
                }
            }
        }
        let graph = self
            .ctx
            .built_graph()
            .ok_or_else(|| Error::Invalid("UNet graph missing".into()))?;
        backend.compute(&graph)?;
        self.ctx.get_f32(get("unet.out")?)
    }
}

/// Evaluates the UNet once: `x` `[B][C][H][W]`, `t` `[B]`, `context` `[B][T][ctx]`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    w: &Weights<'_>,
    cfg: &UnetConfig,
    x: &[f32],
    width: usize,
    height: usize,
    t: &[f32],
    context: &[f32],
    tokens: usize,
    y: Option<&[f32]>,
    guidance: Option<&[f32]>,
    backend: &Backend,
) -> Result<Vec<f32>> {
    let b = t.len();
    if x.len() != b * cfg.in_channels * width * height
        || context.len() != b * tokens * cfg.context_dim
    {
        return Err(Error::Invalid(format!(
            "UNet inputs: {} latent and {} context values for batch {b}",
            x.len(),
            context.len()
        )));
    }
    Runner::new(w, cfg, width, height, b, tokens, Attention::default(), None)?
        .run(x, t, context, y, guidance, backend)
}
