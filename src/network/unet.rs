//! The denoising UNet (LDM `openaimodel.UNetModel`; diffusers `UNet2DConditionModel`).
//!
//! LDM numbers its blocks sequentially along the whole path (`input_blocks.N`,
//! `output_blocks.N`) and wires the up path from a stack of skip connections;
//! diffusers numbers within levels (`down_blocks.L.resnets.I`). Both come from the
//! same walk here, so distilled UNets (fewer ResNets, no middle block, per-layer
//! transformer depths) are named as the published ones are.
//!
//! Naming choices where no published single-file name exists:
//! - LCM guidance embedding (`UnetConfig::time_cond_proj_dim`): diffusers'
//!   `time_embedding.cond_proj` (a bias-free linear from the guidance embedding to the
//!   sinusoidal timestep features) becomes `time_embed.cond_proj`, beside the
//!   `time_embed.0`/`time_embed.2` layers it feeds.
//! - `mid_depth: Some(0)` (middle block without attention): one ResBlock,
//!   `middle_block.0`, as diffusers builds its attention-free `UNetMidBlock2D`.
//! - NCSN++ (`UnetStyle::skip`), which has only diffusers' names: the resampling
//!   ResNet of a level sits where LDM puts its resampling layer (`input_blocks.N.0`,
//!   `output_blocks.N.K`), as guided diffusion's `resblock_updown` ResNets do; the
//!   image projections are `input_blocks.N.skip_conv` and `output_blocks.N.skip_norm`
//!   / `.skip_conv`; the Fourier weights `time_proj`, as in diffusers.
use crate::config::{quarter_groups, AttentionKind, TimeEmbedding, UnetConfig};
use crate::error::{Error, Result};

use super::{params_of, At, Kind, Layer, Param, UNET_PREFIX};

/// LDM `ResBlock`: GroupNorm, SiLU, conv, plus the timestep projection, GroupNorm,
/// SiLU, conv, and a 1x1 conv shortcut when the width changes; the sum divided by
/// `scale`.
#[derive(Clone, Debug)]
pub struct ResBlock {
    pub in_norm: Layer,
    pub in_conv: Layer,
    pub emb_proj: Layer,
    pub out_norm: Layer,
    pub out_conv: Layer,
    pub shortcut: Option<Layer>,
    /// GroupNorm groups of `in_norm` and `out_norm`.
    pub groups: [usize; 2],
    pub scale: f32,
    /// NCSN++'s resampling ResNet: the FIR filter resamples both the input (before the
    /// shortcut) and the first activation (before `in_conv`).
    pub resample: Option<Resample>,
}

/// A factor-2 resampling by the FIR filter [1, 3, 3, 1] (diffusers' `upsample_2d` /
/// `downsample_2d` with `kernel=(1, 3, 3, 1)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Up,
    Down,
}

/// Multi-head attention with bias-free q/k/v projections.
#[derive(Clone, Debug)]
pub struct Attention {
    pub q: Layer,
    pub k: Layer,
    pub v: Layer,
    pub out: Layer,
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each
/// after a LayerNorm and added to its input.
#[derive(Clone, Debug)]
pub struct TransformerBlock {
    pub norm1: Layer,
    pub attn1: Attention,
    pub norm2: Layer,
    pub attn2: Attention,
    pub norm3: Layer,
    /// GEGLU input projection to twice the inner width (value, then gate).
    pub ff_in: Layer,
    pub ff_out: Layer,
}

/// LDM `SpatialTransformer` (diffusers `Transformer2DModel`): GroupNorm, projection to
/// tokens (1x1 conv, or linear with `use_linear_in_transformer`), blocks, projection back,
/// plus the input.
#[derive(Clone, Debug)]
pub struct Transformer {
    pub norm: Layer,
    pub proj_in: Layer,
    pub blocks: Vec<TransformerBlock>,
    pub proj_out: Layer,
    pub heads: usize,
}

impl Transformer {
    /// Whether the projections are linear layers over tokens (else 1x1 convolutions).
    pub fn linear_proj(&self) -> bool {
        matches!(self.proj_in.kind, Kind::Linear { .. })
    }
}

/// DDPM's attention block (diffusers `Attention` in `AttnDownBlock2D`, named as
/// LDM's autoencoder names its `AttnBlock`: `norm`, `q`, `k`, `v`, `proj_out`):
/// GroupNorm, multi-head self-attention over the pixels with biased projections (1x1
/// convolutions in the single file, linear layers in diffusers), plus the input.
#[derive(Clone, Debug)]
pub struct SelfAttention {
    pub norm: Layer,
    pub attn: Attention,
    pub heads: usize,
    pub groups: usize,
    /// The residual sum is divided by this (`rescale_output_factor`).
    pub scale: f32,
}

/// NCSN++'s projection of the decoder's features to RGB at one resolution: GroupNorm,
/// SiLU, 3x3 convolution.
#[derive(Clone, Debug)]
pub struct ToRgb {
    pub norm: Layer,
    pub groups: usize,
    pub conv: Layer,
}

/// One step of a UNet block.
#[derive(Clone, Debug)]
pub enum Block {
    Res(Box<ResBlock>),
    Transformer(Transformer),
    SelfAttention(SelfAttention),
    /// A 3x3 convolution with stride 2.
    Downsample(Layer),
    /// Nearest-neighbour upsampling by 2, then a 3x3 convolution.
    Upsample(Layer),
    /// NCSN++'s input pyramid: the input image FIR-downsampled to this level, through
    /// a 1x1 convolution, added to the features.
    SkipDown(Layer),
    /// NCSN++'s output sum: the RGB sum so far FIR-upsampled to this level, plus this
    /// level's projection to RGB when it has one (all but the last level).
    SkipUp(Option<ToRgb>),
}

/// The whole UNet, blocks in the order they run.
#[derive(Clone, Debug)]
pub struct Unet {
    pub encoder: Encoder,
    pub decoder: Decoder,
}

/// The UNet's embeddings and down path up to its middle block: all of a UNet that a
/// ControlNet copies ([`super::controlnet`]).
#[derive(Clone, Debug)]
pub struct Encoder {
    /// The Fourier time embedding's fixed weights ([`TimeEmbedding::Fourier`]).
    pub fourier: Option<Layer>,
    /// Timestep MLP: linear, SiLU, linear.
    pub time_embed: [Layer; 2],
    /// LCM's guidance embedding, added to the sinusoidal timestep features.
    pub cond_proj: Option<Layer>,
    /// SDXL's pooled-text/size embedding MLP, added to the timestep embedding.
    pub label_embed: Option<[Layer; 2]>,
    /// A class-conditional UNet's class embeddings, added to the timestep embedding.
    pub class_embed: Option<Layer>,
    pub conv_in: Layer,
    /// Encoder blocks after `conv_in`; each one's output (and `conv_in`'s) is kept for
    /// the decoder.
    pub input_blocks: Vec<Vec<Block>>,
    /// The middle block (empty when removed).
    pub middle: Vec<Block>,
    /// Widths of the kept outputs (`conv_in`'s, then each input block's), in the order
    /// they are kept.
    pub skips: Vec<usize>,
    /// Width of the middle block's output.
    pub width: usize,
}

/// The UNet's up path and output layers.
#[derive(Clone, Debug)]
pub struct Decoder {
    /// Decoder blocks; each first concatenates the latest kept encoder output.
    pub output_blocks: Vec<Vec<Block>>,
    pub norm_out: Layer,
    pub out_groups: usize,
    pub conv_out: Layer,
}

impl Unet {
    /// The plan of `u`'s UNet. Fails for configurations that have no consistent block
    /// structure (levels that disagree, an empty up level, more up-path ResNets than
    /// skip connections).
    pub fn new(u: &UnetConfig) -> Result<Self> {
        let (encoder, decoder) = plan(u, UNET_PREFIX, true)?;
        let decoder = decoder.ok_or_else(|| Error::Invalid("the UNet has no decoder".into()))?;
        Ok(Unet { encoder, decoder })
    }

    /// Every parameter, in module order.
    pub fn params(&self) -> Vec<Param> {
        let mut out = self.encoder.params();
        let d = &self.decoder;
        for block in &d.output_blocks {
            for step in block {
                step.params(&mut out);
            }
        }
        params_of([&d.norm_out, &d.conv_out], &mut out);
        out
    }
}

impl Encoder {
    /// The plan of `u`'s encoder, its canonical names under `prefix`.
    pub fn new(u: &UnetConfig, prefix: &str) -> Result<Self> {
        Ok(plan(u, prefix, false)?.0)
    }

    /// Every parameter, in module order.
    pub fn params(&self) -> Vec<Param> {
        let mut out = Vec::new();
        params_of(&self.fourier, &mut out);
        params_of(&self.cond_proj, &mut out);
        params_of(&self.time_embed, &mut out);
        params_of(self.label_embed.iter().flatten(), &mut out);
        params_of(&self.class_embed, &mut out);
        self.conv_in.params(&mut out);
        for block in self
            .input_blocks
            .iter()
            .chain(std::iter::once(&self.middle))
        {
            for step in block {
                step.params(&mut out);
            }
        }
        out
    }
}

/// The plans of `u`'s encoder, canonical names under `prefix`, and of its decoder
/// where asked. Fails for configurations that have no consistent block structure.
fn plan(u: &UnetConfig, prefix: &str, with_decoder: bool) -> Result<(Encoder, Option<Decoder>)> {
    let levels = u.channel_mult.len();
    if levels == 0 || u.down_blocks.len() != levels || (with_decoder && u.up_blocks.len() != levels)
    {
        return Err(Error::Invalid(format!(
            "the UNet has {} channel multipliers, {} down levels and {} up levels; they must agree",
            levels,
            u.down_blocks.len(),
            u.up_blocks.len()
        )));
    }
    let st = &u.style;
    if st.skip && st.attention != AttentionKind::SelfAttention {
        return Err(Error::Invalid(
            "a UNet with image skip paths (NCSN++) has self-attention blocks, not transformers"
                .into(),
        ));
    }
    let top = At::new(prefix, "");
    let mc = u.model_channels;
    let temb = u.time_embed_dim();
    // NCSN++'s level blocks divide their residual sums by √2 and take
    // min(C/4, 32) groups whatever `norm_num_groups` says (diffusers' skip blocks).
    let level_scale = if st.skip {
        std::f32::consts::SQRT_2
    } else {
        1.0
    };
    let groups = |ch: usize| {
        if st.skip {
            quarter_groups(ch)
        } else {
            st.groups(ch)
        }
    };
    let res = |at: At, inp: usize, out: usize, groups: [usize; 2], scale: f32| {
        Box::new(ResBlock::new(&at, inp, out, temb, groups, scale))
    };
    // Skip blocks' attention norms take 32 groups (diffusers' `AttnSkip*Block2D`).
    let attn_groups = |ch: usize| if st.skip { 32 } else { groups(ch) };
    let attention = |at: At, ch: usize, depth: usize, scale: f32| match st.attention {
        AttentionKind::Transformer => Block::Transformer(Transformer::new(&at, ch, depth, u)),
        AttentionKind::SelfAttention => {
            Block::SelfAttention(SelfAttention::new(&at, ch, u, attn_groups(ch), scale))
        }
    };
    // ResNet `i` of a level (and its attention block `a` when `depth` > 0): LDM's
    // block `canonical.0` (`.1`), diffusers' `group.resnets.i` (`group.attentions.a`).
    let level_block = |(canonical, group): (String, String),
                       (i, a): (usize, usize),
                       (inp, out): (usize, usize),
                       norm_groups: [usize; 2],
                       depth: usize| {
        let at = |k: usize, kind: &str, i: usize| {
            top.sub(&format!("{canonical}.{k}"), &format!("{group}.{kind}.{i}"))
        };
        let r = res(at(0, "resnets", i), inp, out, norm_groups, level_scale);
        let mut block = vec![Block::Res(r)];
        if depth > 0 {
            block.push(attention(at(1, "attentions", a), out, depth, level_scale));
        }
        block
    };

    let fourier = (st.time_embedding == TimeEmbedding::Fourier)
        .then(|| top.layer("time_proj", "time_proj", Kind::Vector { len: mc }));
    let features = if fourier.is_some() { 2 * mc } else { mc };
    let time_embed = [
        top.linear("time_embed.0", "time_embedding.linear_1", temb, features),
        top.linear("time_embed.2", "time_embedding.linear_2", temb, temb),
    ];
    let cond_proj = u.time_cond_proj_dim.map(|d| {
        top.layer(
            "time_embed.cond_proj",
            "time_embedding.cond_proj",
            Kind::Linear {
                out: mc,
                inp: d,
                bias: false,
            },
        )
    });
    let label_embed = u.adm_in_channels.map(|a| {
        [
            top.linear("label_emb.0.0", "add_embedding.linear_1", temb, a),
            top.linear("label_emb.0.2", "add_embedding.linear_2", temb, temb),
        ]
    });
    let class_embed = st.num_classes.map(|rows| {
        top.layer(
            "label_emb",
            "class_embedding",
            Kind::Embedding { rows, dim: temb },
        )
    });
    let conv_in = top.conv("input_blocks.0.0", "conv_in", mc, u.in_channels, 3);

    // Widths of the kept encoder outputs, in push order.
    let mut skips = vec![mc];
    let mut ch = mc;
    let mut input_blocks = Vec::new();
    for (l, depths) in u.down_blocks.iter().enumerate() {
        let out = mc * u.channel_mult[l];
        for (i, &depth) in depths.iter().enumerate() {
            let n = input_blocks.len() + 1;
            let names = (format!("input_blocks.{n}"), format!("down_blocks.{l}"));
            let g = [groups(ch), groups(out)];
            input_blocks.push(level_block(names, (i, i), (ch, out), g, depth));
            ch = out;
            skips.push(ch);
        }
        if l + 1 < levels {
            let n = input_blocks.len() + 1;
            let canonical = format!("input_blocks.{n}");
            let group = format!("down_blocks.{l}");
            input_blocks.push(if st.skip {
                let at = top.sub(&format!("{canonical}.0"), &format!("{group}.resnet_down"));
                let r = ResBlock::resampling(&at, ch, temb, groups(ch), Resample::Down);
                let skip = top.conv(
                    &format!("{canonical}.skip_conv"),
                    &format!("{group}.skip_conv"),
                    ch,
                    u.in_channels,
                    1,
                );
                vec![Block::Res(Box::new(r)), Block::SkipDown(skip)]
            } else {
                vec![Block::Downsample(top.conv(
                    &format!("{canonical}.0.op"),
                    &format!("{group}.downsamplers.0.conv"),
                    ch,
                    ch,
                    3,
                ))]
            });
            skips.push(ch);
        }
    }

    let mid = |k: usize, d: &str| top.sub(&format!("middle_block.{k}"), d);
    let (mg, ms) = ([st.groups(ch); 2], st.mid_scale);
    let middle = match u.mid_depth {
        None => Vec::new(),
        Some(0) => vec![Block::Res(res(
            mid(0, "mid_block.resnets.0"),
            ch,
            ch,
            mg,
            ms,
        ))],
        Some(depth) => vec![
            Block::Res(res(mid(0, "mid_block.resnets.0"), ch, ch, mg, ms)),
            match st.attention {
                AttentionKind::Transformer => Block::Transformer(Transformer::new(
                    &mid(1, "mid_block.attentions.0"),
                    ch,
                    depth,
                    u,
                )),
                AttentionKind::SelfAttention => Block::SelfAttention(SelfAttention::new(
                    &mid(1, "mid_block.attentions.0"),
                    ch,
                    u,
                    st.groups(ch),
                    ms,
                )),
            },
            Block::Res(res(mid(2, "mid_block.resnets.1"), ch, ch, mg, ms)),
        ],
    };

    let encoder = Encoder {
        fourier,
        time_embed,
        cond_proj,
        label_embed,
        class_embed,
        conv_in,
        input_blocks,
        middle,
        skips: skips.clone(),
        width: ch,
    };
    if !with_decoder {
        return Ok((encoder, None));
    }
    let mut output_blocks = Vec::new();
    for (j, depths) in u.up_blocks.iter().enumerate() {
        let out = mc * u.channel_mult[levels - 1 - j];
        if depths.is_empty() {
            return Err(Error::Invalid(format!("up level {j} has no ResNets")));
        }
        if st.skip && depths[..depths.len() - 1].iter().any(|&d| d > 0) {
            return Err(Error::Invalid(format!(
                "up level {j}: an NCSN++ level has attention after its last ResNet only"
            )));
        }
        for (i, &depth) in depths.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                Error::Invalid(format!(
                    "up level {j} has more ResNets than the down path has skip connections"
                ))
            })?;
            let n = output_blocks.len();
            let names = (format!("output_blocks.{n}"), format!("up_blocks.{j}"));
            let g = if st.skip && depths.iter().any(|&d| d > 0) {
                // diffusers' AttnSkipUpBlock2D computes `min(in + skip // 4, 32)`
                // (an operator-precedence slip kept by its checkpoints).
                [(ch + skip / 4).min(32), groups(out)]
            } else {
                [groups(ch + skip), groups(out)]
            };
            // An NCSN++ up level's one attention block is its `attentions.0`.
            let a = if st.skip { 0 } else { i };
            let mut block = level_block(names, (i, a), (ch + skip, out), g, depth);
            ch = out;
            let last = i + 1 == depths.len();
            let group = format!("up_blocks.{j}");
            if last && st.skip {
                let to_rgb = (j + 1 < levels).then(|| ToRgb {
                    norm: top.norm(
                        &format!("output_blocks.{n}.skip_norm"),
                        &format!("{group}.skip_norm"),
                        ch,
                    ),
                    groups: quarter_groups(ch),
                    conv: top.conv(
                        &format!("output_blocks.{n}.skip_conv"),
                        &format!("{group}.skip_conv"),
                        u.out_channels,
                        ch,
                        3,
                    ),
                });
                let has_up = to_rgb.is_some();
                block.push(Block::SkipUp(to_rgb));
                if has_up {
                    let k = block.len() - 1;
                    let at = top.sub(
                        &format!("output_blocks.{n}.{k}"),
                        &format!("{group}.resnet_up"),
                    );
                    let r = ResBlock::resampling(&at, ch, temb, groups(ch), Resample::Up);
                    block.push(Block::Res(Box::new(r)));
                }
            } else if last && j + 1 < levels {
                let k = block.len();
                block.push(Block::Upsample(top.conv(
                    &format!("output_blocks.{n}.{k}.conv"),
                    &format!("{group}.upsamplers.0.conv"),
                    ch,
                    ch,
                    3,
                )));
            }
            output_blocks.push(block);
        }
    }

    let decoder = Decoder {
        output_blocks,
        norm_out: top.norm("out.0", "conv_norm_out", ch),
        out_groups: st.groups(ch),
        conv_out: top.conv("out.2", "conv_out", u.out_channels, ch, 3),
    };
    Ok((encoder, Some(decoder)))
}

impl Block {
    fn params(&self, out: &mut Vec<Param>) {
        match self {
            Block::Res(r) => r.params(out),
            Block::Transformer(t) => t.params(out),
            Block::SelfAttention(a) => {
                let p = &a.attn;
                params_of([&a.norm, &p.q, &p.k, &p.v, &p.out], out);
            }
            Block::Downsample(l) | Block::Upsample(l) | Block::SkipDown(l) => l.params(out),
            Block::SkipUp(to_rgb) => {
                if let Some(t) = to_rgb {
                    params_of([&t.norm, &t.conv], out);
                }
            }
        }
    }
}

impl ResBlock {
    fn new(at: &At, inp: usize, out: usize, temb: usize, groups: [usize; 2], scale: f32) -> Self {
        ResBlock {
            in_norm: at.norm("in_layers.0", "norm1", inp),
            in_conv: at.conv("in_layers.2", "conv1", out, inp, 3),
            emb_proj: at.linear("emb_layers.1", "time_emb_proj", out, temb),
            out_norm: at.norm("out_layers.0", "norm2", out),
            out_conv: at.conv("out_layers.3", "conv2", out, out, 3),
            shortcut: (inp != out)
                .then(|| at.conv("skip_connection", "conv_shortcut", out, inp, 1)),
            groups,
            scale,
            resample: None,
        }
    }

    /// NCSN++'s resampling ResNet (diffusers' `resnet_down` / `resnet_up`): `ch`
    /// channels in and out, a 1x1 shortcut all the same, the residual sum over √2.
    fn resampling(at: &At, ch: usize, temb: usize, groups: usize, resample: Resample) -> Self {
        ResBlock {
            shortcut: Some(at.conv("skip_connection", "conv_shortcut", ch, ch, 1)),
            resample: Some(resample),
            ..ResBlock::new(at, ch, ch, temb, [groups; 2], std::f32::consts::SQRT_2)
        }
    }

    fn params(&self, out: &mut Vec<Param>) {
        params_of(
            [
                &self.in_norm,
                &self.in_conv,
                &self.emb_proj,
                &self.out_norm,
                &self.out_conv,
            ]
            .into_iter()
            .chain(&self.shortcut),
            out,
        );
    }
}

impl SelfAttention {
    fn new(at: &At, ch: usize, u: &UnetConfig, groups: usize, scale: f32) -> Self {
        let proj = |c: &str, d: &str| at.layer(c, d, Kind::LinearAsConv { channels: ch });
        SelfAttention {
            norm: at.norm("norm", "group_norm", ch),
            attn: Attention {
                q: proj("q", "to_q"),
                k: proj("k", "to_k"),
                v: proj("v", "to_v"),
                out: proj("proj_out", "to_out.0"),
            },
            heads: u.heads_for(ch),
            groups,
            scale,
        }
    }
}

impl Transformer {
    /// LDM `SpatialTransformer` and diffusers `Transformer2DModel` share every name
    /// below the block prefix.
    fn new(at: &At, ch: usize, depth: usize, u: &UnetConfig) -> Self {
        let same = |at: &At, s: &str| at.sub(s, s);
        let proj = |name: &str| {
            if u.linear_proj {
                at.linear(name, name, ch, ch)
            } else {
                at.conv(name, name, ch, ch, 1)
            }
        };
        let attention = |at: &At, kv: usize| {
            let qkv = |name: &str, inp: usize| {
                at.layer(
                    name,
                    name,
                    Kind::Linear {
                        out: ch,
                        inp,
                        bias: false,
                    },
                )
            };
            Attention {
                q: qkv("to_q", ch),
                k: qkv("to_k", kv),
                v: qkv("to_v", kv),
                out: at.linear("to_out.0", "to_out.0", ch, ch),
            }
        };
        let blocks = (0..depth)
            .map(|i| {
                let b = same(at, &format!("transformer_blocks.{i}"));
                TransformerBlock {
                    norm1: b.norm("norm1", "norm1", ch),
                    attn1: attention(&same(&b, "attn1"), ch),
                    norm2: b.norm("norm2", "norm2", ch),
                    attn2: attention(&same(&b, "attn2"), u.context_dim),
                    norm3: b.norm("norm3", "norm3", ch),
                    ff_in: b.linear("ff.net.0.proj", "ff.net.0.proj", 8 * ch, ch),
                    ff_out: b.linear("ff.net.2", "ff.net.2", ch, 4 * ch),
                }
            })
            .collect();
        Transformer {
            norm: at.norm("norm", "norm", ch),
            proj_in: proj("proj_in"),
            blocks,
            proj_out: proj("proj_out"),
            heads: u.heads_for(ch),
        }
    }

    fn params(&self, out: &mut Vec<Param>) {
        params_of([&self.norm, &self.proj_in], out);
        for b in &self.blocks {
            params_of(
                [
                    &b.attn1.q,
                    &b.attn1.k,
                    &b.attn1.v,
                    &b.attn1.out,
                    &b.attn2.q,
                    &b.attn2.k,
                    &b.attn2.v,
                    &b.attn2.out,
                    &b.ff_in,
                    &b.ff_out,
                    &b.norm1,
                    &b.norm2,
                    &b.norm3,
                ],
                out,
            );
        }
        self.proj_out.params(out);
    }
}
