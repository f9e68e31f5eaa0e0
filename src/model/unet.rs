//! The denoising UNet as a ggml graph, walking the block plan of
//! [`network::unet`](crate::network::unet). Its shape (levels, ResNets and transformer
//! depths per block, heads, projections) comes from [`UnetConfig`]; SDXL's label
//! embedding and LCM's guidance embedding are used when the config has them.
use crate::config::{TimeEmbedding, UnetConfig, UnetStyle};
use crate::error::{Error, Result};
use crate::ggml::{Backend, Context, ConvShape, NormAct, Tensor, Type};
use crate::network::unet::{
    Attention as Attn, Block, Encoder, ResBlock, Resample, SelfAttention, Transformer, Unet,
};

use super::nn::{Attention, Nn};
use super::Adapters;
use super::Weights;

/// LDM's spatial transformers normalise with this epsilon whatever the ResNets use.
const TRANSFORMER_EPS: f32 = 1e-6;

/// NCSN++'s FIR resampling kernels as `[taps, 1]` convolution matrices. Downsampling
/// is the separable [1, 3, 3, 1]/8 filter at stride 2 over a one-pixel zero border
/// (diffusers' `downsample_2d`). Upsampling, `upsample_2d`'s zero-stuffing followed
/// by the filter ×4, equals nearest-neighbour doubling followed by the separable
/// [1, 2, 1]/4 filter over a one-pixel zero border (both give (3a + b)/4 between
/// neighbours a and b, and 3a/4 at the image's edge), which the convolution reads
/// through its upsampling instead of making the doubled tensor.
const FIR_DOWN: [f32; 4] = [1.0, 3.0, 3.0, 1.0];
const FIR_UP: [f32; 3] = [1.0, 2.0, 1.0];

fn fir_matrix(taps: &[f32]) -> Vec<f32> {
    let sum: f32 = taps.iter().sum();
    taps.iter()
        .flat_map(|&a| taps.iter().map(move |&b| a * b / (sum * sum)))
        .collect()
}

/// The FIR kernels' graph inputs (set by [`Runner::run`]).
#[derive(Clone, Copy)]
pub(super) struct Fir<'c> {
    down: Tensor<'c>,
    up: Tensor<'c>,
}

/// Resamples every channel of `x` `[W, H, C, B]` by the FIR filter.
fn fir<'c>(c: &'c Context<'c>, fir: Fir<'c>, x: Tensor<'c>, r: Resample) -> Result<Tensor<'c>> {
    let [w, h, ch, b] = x.ne();
    let x = if x.is_contiguous() { x } else { c.cont(x)? };
    let planes = c.reshape(x, &[w, h, 1, ch * b])?;
    let y = match r {
        Resample::Down => c.conv2d(planes, fir.down, ConvShape::square(4, 2, 1), None)?,
        Resample::Up => c.conv2d(
            planes,
            fir.up,
            ConvShape::square(3, 1, 1).upsampled(2),
            None,
        )?,
    };
    let y = if y.is_contiguous() { y } else { c.cont(y)? };
    let [ow, oh, _, _] = y.ne();
    c.reshape(y, &[ow, oh, ch, b])
}

/// `x / s` (the residual sums NCSN++ rescales), nothing when s = 1.
fn rescale<'c>(c: &'c Context<'c>, x: Tensor<'c>, s: f32) -> Result<Tensor<'c>> {
    if s == 1.0 {
        Ok(x)
    } else {
        c.scale(x, 1.0 / s)
    }
}

fn resblock<'c>(
    nn: &Nn<'c>,
    st: &UnetStyle,
    fir_k: Option<Fir<'c>>,
    x: Tensor<'c>,
    emb: Tensor<'c>,
    r: &ResBlock,
) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let eps = st.norm_eps;
    let h = nn.group_norm_act(x, &r.in_norm.name, r.groups[0], eps, NormAct::SILU)?;
    let (x, h) = match (r.resample, fir_k) {
        (None, _) => (x, h),
        (Some(rs), Some(k)) => (fir(c, k, x, rs)?, fir(c, k, h, rs)?),
        (Some(_), None) => return Err(Error::Invalid("FIR resampling without its kernels".into())),
    };
    let h = nn.conv(h, &r.in_conv.name, 3, 1, 1)?;
    let out_ch = h.ne()[2];
    let e = nn.linear(c.silu(emb)?, &r.emb_proj.name)?; // [C, B]
    let e = c.reshape(e, &[1, 1, out_ch, e.ne()[1]])?;
    let h = c.add(h, e)?;
    // The sum has no other reader.
    let h = nn.group_norm_act(h, &r.out_norm.name, r.groups[1], eps, NormAct::SILU_OVER)?;
    let h = nn.conv(h, &r.out_conv.name, 3, 1, 1)?;
    let skip = match &r.shortcut {
        Some(s) => nn.conv(x, &s.name, 1, 1, 0)?,
        None => x,
    };
    rescale(c, c.add(skip, h)?, r.scale)
}

/// Multi-head attention: queries from `x` `[C, N, B]`, keys/values from `ctx_in`
/// (`x` itself for self-attention).
fn attention<'c>(
    nn: &Nn<'c>,
    x: Tensor<'c>,
    ctx_in: Tensor<'c>,
    a: &Attn,
    heads: usize,
) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let [ch, n, b, _] = x.ne();
    let d = ch / heads;
    let tk = ctx_in.ne()[1];
    let q = nn.linear(x, &a.q.name)?;
    let k = nn.linear(ctx_in, &a.k.name)?;
    let v = nn.linear(ctx_in, &a.v.name)?;
    let q = c.permute(c.reshape(q, &[d, heads, n, b])?, [0, 2, 1, 3])?; // [D, N, H, B]
    let k = c.permute(c.reshape(k, &[d, heads, tk, b])?, [0, 2, 1, 3])?;
    let v = c.permute(c.reshape(v, &[d, heads, tk, b])?, [0, 2, 1, 3])?;
    let o = nn.attend(q, k, v, false)?; // [C, N, B]
    nn.linear(o, &a.out.name)
}

/// GEGLU feed-forward: the input projection's first half is the value, the second the gate.
fn feed_forward<'c>(nn: &Nn<'c>, x: Tensor<'c>, ff_in: &str, ff_out: &str) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let h = nn.linear(x, ff_in)?; // [2*inner, N, B]: value, then gate
    nn.linear(c.geglu(h)?, ff_out)
}

/// DDPM's attention block: the transformer's multi-head attention over the pixels as
/// tokens (its 1x1-convolution kernels are stored as the linear layers' matrices).
fn self_attention<'c>(
    nn: &Nn<'c>,
    style: &UnetStyle,
    x: Tensor<'c>,
    a: &SelfAttention,
) -> Result<Tensor<'c>> {
    let [w, h, _, _] = x.ne();
    let hn = nn.group_norm(x, &a.norm.name, a.groups, style.norm_eps)?;
    let t = nn.to_tokens(hn)?;
    let o = attention(nn, t, t, &a.attn, a.heads)?;
    rescale(nn.ctx, nn.ctx.add(x, nn.from_tokens(o, w, h)?)?, a.scale)
}

fn spatial_transformer<'c>(
    nn: &Nn<'c>,
    style: &UnetStyle,
    x: Tensor<'c>,
    context: Tensor<'c>,
    st: &Transformer,
) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let [w, h, ch, _] = x.ne();
    let hn = nn.group_norm(x, &st.norm.name, style.groups(ch), TRANSFORMER_EPS)?;
    let linear = st.linear_proj();
    let mut t = if linear {
        nn.linear(nn.to_tokens(hn)?, &st.proj_in.name)?
    } else {
        nn.to_tokens(nn.conv(hn, &st.proj_in.name, 1, 1, 0)?)?
    };
    for b in &st.blocks {
        let n1 = nn.layer_norm(t, &b.norm1.name, 1e-5)?;
        t = c.add(t, attention(nn, n1, n1, &b.attn1, st.heads)?)?;
        let n2 = nn.layer_norm(t, &b.norm2.name, 1e-5)?;
        t = c.add(t, attention(nn, n2, context, &b.attn2, st.heads)?)?;
        let n3 = nn.layer_norm(t, &b.norm3.name, 1e-5)?;
        t = c.add(t, feed_forward(nn, n3, &b.ff_in.name, &b.ff_out.name)?)?;
    }
    let out = if linear {
        nn.from_tokens(nn.linear(t, &st.proj_out.name)?, w, h)?
    } else {
        nn.conv(nn.from_tokens(t, w, h)?, &st.proj_out.name, 1, 1, 0)?
    };
    c.add(out, x)
}

/// What every block may read besides its input: the timestep embedding, the text,
/// and NCSN++'s image paths.
pub(super) struct Side<'c> {
    emb: Tensor<'c>,
    context: Tensor<'c>,
    fir: Option<Fir<'c>>,
    /// The input image at the down path's current resolution.
    pyramid: Option<Tensor<'c>>,
    /// The up path's RGB sum so far.
    rgb: Option<Tensor<'c>>,
}

/// Runs the steps of one block.
fn block<'c>(
    nn: &Nn<'c>,
    st: &UnetStyle,
    mut x: Tensor<'c>,
    side: &mut Side<'c>,
    steps: &[Block],
) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let (emb, context) = (side.emb, side.context);
    let fir_k = || {
        side.fir
            .ok_or_else(|| Error::Invalid("NCSN++ block without FIR kernels".into()))
    };
    for step in steps {
        x = match step {
            Block::Res(r) => resblock(nn, st, side.fir, x, emb, r)?,
            Block::Transformer(t) => spatial_transformer(nn, st, x, context, t)?,
            Block::SelfAttention(a) => self_attention(nn, st, x, a)?,
            Block::Downsample(l) if st.downsample_padding == 0 => {
                nn.conv(nn.ctx.pad(x, [1, 1, 0, 0])?, &l.name, 3, 2, 0)?
            }
            Block::Downsample(l) => nn.conv(x, &l.name, 3, 2, 1)?,
            Block::Upsample(l) => nn.upsample_conv(x, &l.name)?,
            Block::SkipDown(l) => {
                let p = side.pyramid.ok_or_else(|| {
                    Error::Invalid("NCSN++ down path without its input image".into())
                })?;
                let p = fir(c, fir_k()?, p, Resample::Down)?;
                side.pyramid = Some(p);
                c.add(x, nn.conv(p, &l.name, 1, 1, 0)?)?
            }
            Block::SkipUp(to_rgb) => {
                let up = match side.rgb {
                    Some(r) => Some(fir(c, fir_k()?, r, Resample::Up)?),
                    None => None,
                };
                side.rgb = match to_rgb {
                    Some(t) => {
                        let h = nn.group_norm_act(
                            x,
                            &t.norm.name,
                            t.groups,
                            st.norm_eps,
                            NormAct::SILU,
                        )?;
                        let h = nn.conv(h, &t.conv.name, 3, 1, 1)?;
                        Some(match up {
                            Some(u) => c.add(u, h)?,
                            None => h,
                        })
                    }
                    None => up,
                };
                x
            }
        };
    }
    Ok(x)
}

/// The width of the time features the UNet's first time-embedding layer takes.
fn feature_width(cfg: &UnetConfig) -> usize {
    match cfg.style.time_embedding {
        TimeEmbedding::Positional => cfg.model_channels,
        TimeEmbedding::Fourier => 2 * cfg.model_channels,
    }
}

/// The Fourier features `[B][2·len(w)]` of noise levels `sigma`: `[sin, cos]` of
/// log σ · w · 2π, in f32 in the order diffusers' `GaussianFourierProjection`
/// computes them (its weights reach ±60 at scale 16, so the phase needs f32 all the
/// way).
pub fn fourier_features(sigma: &[f32], w: &[f32]) -> Vec<f32> {
    let n = w.len();
    let mut out = vec![0f32; sigma.len() * 2 * n];
    for (row, &s) in out.chunks_mut(2 * n).zip(sigma) {
        let l = s.ln();
        for (i, &wi) in w.iter().enumerate() {
            let a = l * wi * 2.0 * std::f32::consts::PI;
            row[i] = a.sin();
            row[n + i] = a.cos();
        }
    }
    out
}

/// The Fourier time embedding's weights `name`, one per model channel.
fn fourier_weights(w: &Weights<'_>, name: &str, cfg: &UnetConfig) -> Result<Vec<f32>> {
    let v = w.read_f32(name)?;
    if v.len() != cfg.model_channels {
        return Err(Error::Invalid(format!(
            "`{name}` holds {} values, not {}",
            v.len(),
            cfg.model_channels
        )));
    }
    Ok(v)
}

/// The sinusoidal timestep features `[B][dim]` of diffusers' `get_timestep_embedding`,
/// in f32 in the order PyTorch computes them, so the first layer sees the reference's
/// values bit for bit where the libm agrees (t·ω at t ≈ 1000 is where f32 loses most).
pub fn timestep_features(t: &[f32], dim: usize, style: &UnetStyle) -> Vec<f32> {
    let half = dim / 2;
    let ln = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| (ln * i as f32 / (half as f32 - style.freq_shift)).exp())
        .collect();
    let mut out = vec![0f32; t.len() * dim];
    for (row, &tb) in out.chunks_mut(dim).zip(t) {
        for (i, &f) in freqs.iter().enumerate() {
            let a = tb * f;
            let (first, second) = if style.flip_sin_to_cos {
                (a.cos(), a.sin())
            } else {
                (a.sin(), a.cos())
            };
            row[i] = first;
            row[half + i] = second;
        }
    }
    out
}

/// The size of one UNet evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Latent width and height.
    pub width: usize,
    pub height: usize,
    /// Latents evaluated at once.
    pub batch: usize,
    /// Context tokens per latent.
    pub tokens: usize,
    /// The graph adds ControlNet residuals to its skip connections and middle block.
    pub control: bool,
}

/// The inputs of one evaluation, PyTorch order.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inputs<'a> {
    /// Noisy latents `[B][C][H][W]`.
    pub x: &'a [f32],
    /// Model timesteps `[B]`.
    pub t: &'a [f32],
    /// Text conditioning `[B][T][context_dim]`.
    pub context: &'a [f32],
    /// Pooled-text/size conditioning `[B][adm_in_channels]` (SDXL).
    pub y: Option<&'a [f32]>,
    /// Guidance embedding input `[B][time_cond_proj_dim]` (LCM).
    pub guidance: Option<&'a [f32]>,
    /// Class labels `[B]` of a class-conditional UNet.
    pub class: Option<&'a [i32]>,
    /// ControlNet residuals (a graph built with [`Shape::control`]): one `[B][C][H][W]`
    /// per kept encoder output, then one for the middle block's output.
    pub control: Option<&'a [Vec<f32>]>,
}

/// Graph inputs and output of one UNet evaluation.
pub struct Graph<'c> {
    /// Noisy latents `[W, H, in_channels, B]`.
    pub x: Tensor<'c>,
    /// Time features `[model_channels, B]` ([`timestep_features`]), or
    /// `[2·model_channels, B]` ([`fourier_features`]).
    pub t: Tensor<'c>,
    /// Text conditioning `[context_dim, T, B]`.
    pub context: Tensor<'c>,
    /// Pooled-text/size conditioning `[adm_in_channels, B]` (SDXL).
    pub y: Option<Tensor<'c>>,
    /// Guidance embedding input `[time_cond_proj_dim, B]` (LCM).
    pub guidance: Option<Tensor<'c>>,
    /// Class labels `[B]` (i32) of a class-conditional UNet.
    pub class: Option<Tensor<'c>>,
    /// Model output `[W, H, out_channels, B]`.
    pub out: Tensor<'c>,
    /// The Fourier time embedding's weight, whose values the caller computes the time
    /// features from ([`fourier_features`]).
    pub fourier: Option<String>,
}

/// The inputs every UNet-shaped graph takes (latents, time features, text, and the
/// conditioning its embeddings read), with the timestep embedding computed from them.
pub(super) struct Embedded<'c> {
    pub x: Tensor<'c>,
    pub t: Tensor<'c>,
    pub context: Tensor<'c>,
    pub y: Option<Tensor<'c>>,
    pub guidance: Option<Tensor<'c>>,
    pub class: Option<Tensor<'c>>,
    pub fir: Option<Fir<'c>>,
    /// The timestep embedding `[temb, B]`, label and class embeddings added.
    pub emb: Tensor<'c>,
}

/// Declares the graph inputs of `enc` for `shape` (named `unet.*`, set by
/// [`set_inputs`]) and computes the timestep embedding.
pub(super) fn embed<'c>(
    nn: &Nn<'c>,
    cfg: &UnetConfig,
    enc: &Encoder,
    shape: Shape,
) -> Result<Embedded<'c>> {
    let c = nn.ctx;
    let Shape {
        width: w,
        height: h,
        batch: b,
        tokens,
        ..
    } = shape;
    let f = 1 << (cfg.channel_mult.len() - 1);
    if !w.is_multiple_of(f) || !h.is_multiple_of(f) || w == 0 || h == 0 {
        return Err(Error::Invalid(format!(
            "latent size {w}x{h} must be a multiple of {f} for this UNet"
        )));
    }
    let st = &cfg.style;
    let x_in = c.tensor(Type::F32, &[w, h, cfg.in_channels, b], "unet.x")?;
    let t_in = c.tensor(Type::F32, &[feature_width(cfg), b], "unet.t")?;
    // A model without text still has the input: zero-width, so it costs nothing.
    let ctx_in = c.tensor(
        Type::F32,
        &[cfg.context_dim.max(1), tokens.max(1), b],
        "unet.context",
    )?;
    for t in [x_in, t_in, ctx_in] {
        c.set_input(t);
    }
    let mut temb = t_in; // [mc, B]
    let guidance = match (&enc.cond_proj, cfg.time_cond_proj_dim) {
        (Some(l), Some(dim)) => {
            let g = c.tensor(Type::F32, &[dim, b], "unet.guidance")?;
            c.set_input(g);
            temb = c.add(temb, nn.linear(g, &l.name)?)?;
            Some(g)
        }
        _ => None,
    };
    let [t0, t2] = &enc.time_embed;
    let mut emb = nn.linear(c.silu(nn.linear(temb, &t0.name)?)?, &t2.name)?;
    let y = match (&enc.label_embed, cfg.adm_in_channels) {
        (Some([l0, l2]), Some(adm)) => {
            let y = c.tensor(Type::F32, &[adm, b], "unet.y")?;
            c.set_input(y);
            let l = nn.linear(c.silu(nn.linear(y, &l0.name)?)?, &l2.name)?;
            emb = c.add(emb, l)?;
            Some(y)
        }
        _ => None,
    };
    let class = match &enc.class_embed {
        Some(l) => {
            let ids = c.tensor(Type::I32, &[b], "unet.class")?;
            c.set_input(ids);
            let rows = c.get_rows(nn.w.get(&format!("{}.weight", l.name))?, ids)?;
            emb = c.add(emb, rows)?;
            Some(ids)
        }
        None => None,
    };
    let fir = if st.skip {
        let down = c.tensor(Type::F32, &[FIR_DOWN.len().pow(2), 1], "unet.fir_down")?;
        let up = c.tensor(Type::F32, &[FIR_UP.len().pow(2), 1], "unet.fir_up")?;
        c.set_input(down);
        c.set_input(up);
        Some(Fir { down, up })
    } else {
        None
    };
    Ok(Embedded {
        x: x_in,
        t: t_in,
        context: ctx_in,
        y,
        guidance,
        class,
        fir,
        emb,
    })
}

/// The encoder's path from the embedded inputs: returns the kept outputs (the
/// skip connections, in the order kept) and the middle block's output, with the
/// side state the decoder goes on with. `hint` is added after `conv_in` (a
/// ControlNet's conditioning).
pub(super) fn encode<'c>(
    nn: &Nn<'c>,
    cfg: &UnetConfig,
    enc: &Encoder,
    e: &Embedded<'c>,
    hint: Option<Tensor<'c>>,
) -> Result<(Vec<Tensor<'c>>, Tensor<'c>, Side<'c>)> {
    let c = nn.ctx;
    let st = &cfg.style;
    let mut side = Side {
        emb: e.emb,
        context: e.context,
        fir: e.fir,
        pyramid: st.skip.then_some(e.x),
        rgb: None,
    };
    let mut x = nn.conv(e.x, &enc.conv_in.name, 3, 1, 1)?;
    if let Some(h) = hint {
        x = c.add(x, h)?;
    }
    let mut skips = vec![x];
    for steps in &enc.input_blocks {
        x = block(nn, st, x, &mut side, steps)?;
        skips.push(x);
    }
    let mid = block(nn, st, x, &mut side, &enc.middle)?;
    Ok((skips, mid, side))
}

/// Builds the UNet for `shape`.
pub fn build<'c>(nn: &Nn<'c>, cfg: &UnetConfig, shape: Shape) -> Result<Graph<'c>> {
    let c = nn.ctx;
    let plan = Unet::new(cfg)?;
    let st = &cfg.style;
    let e = embed(nn, cfg, &plan.encoder, shape)?;
    let (mut skips, mut x, mut side) = encode(nn, cfg, &plan.encoder, &e, None)?;
    if shape.control {
        // The residuals are inputs shaped as what they are added to.
        for (k, s) in skips.iter_mut().chain(std::iter::once(&mut x)).enumerate() {
            let r = c.tensor(Type::F32, &s.ne(), &format!("unet.control.{k}"))?;
            c.set_input(r);
            *s = c.add(*s, r)?;
        }
    }
    for steps in &plan.decoder.output_blocks {
        let skip = skips.pop().ok_or_else(|| {
            Error::Invalid("UNet config has more decoder blocks than skip connections".into())
        })?;
        x = block(nn, st, c.concat(x, skip, 2)?, &mut side, steps)?;
    }
    let d = &plan.decoder;
    let x = nn.group_norm_act(
        x,
        &d.norm_out.name,
        d.out_groups,
        st.norm_eps,
        NormAct::SILU,
    )?;
    let mut out = nn.conv(x, &d.conv_out.name, 3, 1, 1)?;
    if let Some(rgb) = side.rgb {
        out = c.add(out, rgb)?;
    }
    c.set_output(out);
    Ok(Graph {
        x: e.x,
        t: e.t,
        context: e.context,
        y: e.y,
        guidance: e.guidance,
        class: e.class,
        out,
        fourier: plan.encoder.fourier.map(|l| format!("{}.weight", l.name)),
    })
}

/// A UNet graph built once for one shape and run at every sampling step: the
/// compute buffer is allocated once and reused.
pub struct Runner<'w> {
    ctx: Context<'w>,
    cfg: UnetConfig,
    shape: Shape,
    /// The Fourier time embedding's weights, read once for the host-side features.
    fourier: Option<Vec<f32>>,
    /// Compute-buffer size in bytes.
    pub buffer_bytes: usize,
    /// Matrix-product FLOPs of one evaluation (all of the batch).
    pub flops: f64,
    _weights: std::marker::PhantomData<&'w Weights<'w>>,
}

impl<'w> Runner<'w> {
    /// Builds the graph for `shape`. `adapters`: LoRA branches beside the weights.
    pub fn new(
        w: &'w Weights<'w>,
        cfg: &UnetConfig,
        shape: Shape,
        attention: Attention,
        adapters: Option<&'w Adapters>,
    ) -> Result<Self> {
        let ctx = Context::new(16384 + Adapters::nodes(adapters))?;
        let (buffer_bytes, flops, fourier) = {
            let nn = Nn {
                attention,
                adapters,
                ..Nn::new(&ctx, w)
            };
            let g = build(&nn, cfg, shape)?;
            ctx.name(g.out, "unet.out")?;
            let graph = ctx.graph(&[g.out])?;
            (
                ctx.alloc_graph(&graph)?,
                graph.matmul_flops(),
                g.fourier
                    .as_deref()
                    .map(|name| fourier_weights(w, name, cfg))
                    .transpose()?,
            )
        };
        Ok(Runner {
            ctx,
            cfg: cfg.clone(),
            shape,
            fourier,
            buffer_bytes,
            flops,
            _weights: std::marker::PhantomData,
        })
    }

    /// The compute buffer [`Runner::new`] would allocate, without allocating it.
    pub fn measure(
        w: &Weights<'_>,
        cfg: &UnetConfig,
        shape: Shape,
        attention: Attention,
        adapters: Option<&Adapters>,
    ) -> Result<usize> {
        let ctx = Context::new(16384 + Adapters::nodes(adapters))?;
        let nn = Nn {
            attention,
            adapters,
            ..Nn::new(&ctx, w)
        };
        let g = build(&nn, cfg, shape)?;
        let graph = ctx.graph(&[g.out])?;
        ctx.measure_graph(&graph)
    }

    /// One evaluation; returns the model output `[B][out_channels][H][W]`.
    pub fn run(&self, inputs: &Inputs<'_>, backend: &Backend) -> Result<Vec<f32>> {
        set_inputs(
            &self.ctx,
            &self.cfg,
            self.shape,
            self.fourier.as_deref(),
            inputs,
        )?;
        let get = |n: &str| {
            self.ctx
                .get(n)
                .ok_or_else(|| Error::Invalid(format!("UNet graph lacks `{n}`")))
        };
        match (self.shape.control, inputs.control) {
            (true, Some(residuals)) => {
                for (k, r) in residuals.iter().enumerate() {
                    let tensor = get(&format!("unet.control.{k}"))?;
                    if tensor.nelements() != r.len() {
                        return Err(Error::Invalid(format!(
                            "ControlNet residual {k} holds {} values where the UNet's skip connection has {}",
                            r.len(),
                            tensor.nelements()
                        )));
                    }
                    self.ctx.set_f32(tensor, r)?;
                }
                if self
                    .ctx
                    .get(&format!("unet.control.{}", residuals.len()))
                    .is_some()
                {
                    return Err(Error::Invalid(format!(
                        "{} ControlNet residuals for a UNet that takes more",
                        residuals.len()
                    )));
                }
            }
            (false, None) => {}
            _ => {
                return Err(Error::Invalid(
                    "ControlNet residuals must be given exactly when the UNet graph takes them"
                        .into(),
                ))
            }
        }
        let graph = self
            .ctx
            .built_graph()
            .ok_or_else(|| Error::Invalid("UNet graph missing".into()))?;
        backend.compute(&graph)?;
        let mut out = self.ctx.get_f32(get("unet.out")?)?;
        if self.fourier.is_some() {
            // A score model's output is the network's divided by σ (diffusers'
            // UNet2DModel with Fourier features).
            let per = out.len() / self.shape.batch;
            for (o, &s) in out.chunks_mut(per).zip(inputs.t) {
                o.iter_mut().for_each(|v| *v /= s);
            }
        }
        Ok(out)
    }
}

/// Sets the `unet.*` inputs that [`embed`] declared in `ctx` from `inputs`, after
/// checking their sizes against `shape`.
pub(super) fn set_inputs(
    ctx: &Context<'_>,
    cfg: &UnetConfig,
    shape: Shape,
    fourier: Option<&[f32]>,
    inputs: &Inputs<'_>,
) -> Result<()> {
    let Shape {
        width: w,
        height: h,
        batch: b,
        tokens,
        ..
    } = shape;
    let Inputs {
        x,
        t,
        context,
        y,
        guidance,
        class,
        ..
    } = *inputs;
    let context_len = b * tokens * cfg.context_dim;
    if t.len() != b || x.len() != b * cfg.in_channels * w * h || context.len() != context_len {
        return Err(Error::Invalid(format!(
            "UNet inputs: {} latent, {} timestep and {} context values for a graph of batch {b}",
            x.len(),
            t.len(),
            context.len()
        )));
    }
    let get = |n: &str| {
        ctx.get(n)
            .ok_or_else(|| Error::Invalid(format!("UNet graph lacks `{n}`")))
    };
    ctx.set_f32(get("unet.x")?, x)?;
    let features = match fourier {
        Some(w) => {
            if let Some(bad) = t.iter().find(|&&s| !(s > 0.0 && s.is_finite())) {
                return Err(Error::Invalid(format!(
                    "a score model's noise level must be positive, not {bad}"
                )));
            }
            fourier_features(t, w)
        }
        None => timestep_features(t, cfg.model_channels, &cfg.style),
    };
    ctx.set_f32(get("unet.t")?, &features)?;
    if cfg.style.skip {
        ctx.set_f32(get("unet.fir_down")?, &fir_matrix(&FIR_DOWN))?;
        ctx.set_f32(get("unet.fir_up")?, &fir_matrix(&FIR_UP))?;
    }
    if context_len > 0 {
        ctx.set_f32(get("unet.context")?, context)?;
    }
    match (ctx.get("unet.class"), class, cfg.style.num_classes) {
        (Some(tensor), Some(ids), Some(n)) if ids.len() == b => {
            if let Some(bad) = ids.iter().find(|&&k| k < 0 || k as usize >= n) {
                return Err(Error::Invalid(format!(
                    "class {bad} is not one of this model's {n} classes (0 to {})",
                    n - 1
                )));
            }
            ctx.set_i32(tensor, ids)?;
        }
        (None, None, _) => {}
        _ => {
            return Err(Error::Invalid(format!(
                "a class label per image must be given exactly when the UNet is class-conditional ({b} images)"
            )))
        }
    }
    for (name, value) in [("unet.y", y), ("unet.guidance", guidance)] {
        match (ctx.get(name), value) {
            (Some(tensor), Some(v)) => ctx.set_f32(tensor, v)?,
            (None, None) => {}
            _ => {
                return Err(Error::Invalid(format!(
                    "`{name}` must be given exactly when the UNet uses it"
                )))
            }
        }
    }
    Ok(())
}

/// Evaluates the UNet once on `width`x`height` latents; the batch and the context
/// length follow from `inputs`.
pub fn forward(
    w: &Weights<'_>,
    cfg: &UnetConfig,
    width: usize,
    height: usize,
    inputs: &Inputs<'_>,
    backend: &Backend,
) -> Result<Vec<f32>> {
    let batch = inputs.t.len();
    let per_token = batch * cfg.context_dim;
    if batch == 0
        || (per_token == 0 && !inputs.context.is_empty())
        || (per_token > 0 && !inputs.context.len().is_multiple_of(per_token))
        || inputs.x.len() != batch * cfg.in_channels * width * height
    {
        return Err(Error::Invalid(format!(
            "UNet inputs: {} latent and {} context values for batch {batch}",
            inputs.x.len(),
            inputs.context.len()
        )));
    }
    let shape = Shape {
        width,
        height,
        batch,
        tokens: inputs.context.len().checked_div(per_token).unwrap_or(1),
        control: inputs.control.is_some(),
    };
    Runner::new(w, cfg, shape, Attention::default(), None)?.run(inputs, backend)
}
