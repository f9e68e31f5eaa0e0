//! The KL autoencoder (LDM `AutoencoderKL`; diffusers `AutoencoderKL`).
//!
//! LDM numbers decoder levels by resolution (0 = full size) and runs them deepest
//! first; diffusers numbers them in run order. Both come from the walk below.
use crate::config::VaeConfig;

use super::{params_of, At, Kind, Layer, Param, VAE_PREFIX};

/// ResNet without timestep input: GroupNorm, SiLU, conv, GroupNorm, SiLU, conv, and a
/// 1x1 conv shortcut when the width changes.
#[derive(Clone, Debug)]
pub struct ResBlock {
    pub norm1: Layer,
    pub conv1: Layer,
    pub norm2: Layer,
    pub conv2: Layer,
    pub shortcut: Option<Layer>,
}

/// Single-head self-attention over all pixels with 1x1-convolution projections.
#[derive(Clone, Debug)]
pub struct Attention {
    pub norm: Layer,
    pub q: Layer,
    pub k: Layer,
    pub v: Layer,
    pub proj_out: Layer,
}

/// The block at latent resolution: ResNet, attention, ResNet.
#[derive(Clone, Debug)]
pub struct Mid {
    pub block_1: ResBlock,
    pub attn_1: Attention,
    pub block_2: ResBlock,
}

/// One resolution level: its ResNets, then the resampling convolution if any (a
/// stride-2 conv after one-pixel right/bottom padding going down, nearest-neighbour
/// upsampling then a 3x3 conv going up).
#[derive(Clone, Debug)]
pub struct Level {
    pub blocks: Vec<ResBlock>,
    pub resample: Option<Layer>,
}

#[derive(Clone, Debug)]
pub struct Encoder {
    pub conv_in: Layer,
    /// Full resolution first.
    pub down: Vec<Level>,
    pub mid: Mid,
    pub norm_out: Layer,
    /// To the latent distribution's moments (means, then log-variances).
    pub conv_out: Layer,
    /// 1x1 conv on the moments (on the latents of a VQ autoencoder).
    pub quant_conv: Layer,
    /// A VQ autoencoder's codebook, `[entries, latent_channels]`.
    pub codebook: Option<Layer>,
}

#[derive(Clone, Debug)]
pub struct Decoder {
    /// 1x1 conv on the latents.
    pub post_quant_conv: Layer,
    pub conv_in: Layer,
    pub mid: Mid,
    /// In run order: deepest first.
    pub up: Vec<Level>,
    pub norm_out: Layer,
    pub conv_out: Layer,
}

#[derive(Clone, Debug)]
pub struct Vae {
    pub encoder: Encoder,
    pub decoder: Decoder,
}

/// Whether canonical tensor `name` belongs to the encoder (with `quant_conv`).
pub fn is_encoder(name: &str) -> bool {
    name.strip_prefix(VAE_PREFIX)
        .is_some_and(|n| n.starts_with("encoder.") || n.starts_with("quant_conv."))
}

/// Whether canonical tensor `name` belongs to the decoder (with `post_quant_conv`).
pub fn is_decoder(name: &str) -> bool {
    name.strip_prefix(VAE_PREFIX)
        .is_some_and(|n| n.starts_with("decoder.") || n.starts_with("post_quant_conv."))
}

impl Vae {
    pub fn new(v: &VaeConfig) -> Self {
        let top = At::new(VAE_PREFIX, "");
        let z = v.latent_channels;
        let width = |l: usize| v.base_channels * v.channel_mult[l];
        let levels = v.channel_mult.len();

        let e = top.sub("encoder", "encoder");
        let mut ch = v.base_channels;
        let conv_in = e.conv("conv_in", "conv_in", ch, v.in_channels, 3);
        let mut down = Vec::with_capacity(levels);
        for l in 0..levels {
            let names = [format!("down.{l}"), format!("down_blocks.{l}")];
            let resample = (l + 1 < levels).then_some(["downsample", "downsamplers"]);
            down.push(Level::new(
                &e,
                names,
                v.num_res_blocks,
                (ch, width(l)),
                resample,
            ));
            ch = width(l);
        }
        // A KL encoder gives means and log-variances; a VQ encoder the latents.
        let moments = if v.codebook.is_some() { z } else { 2 * z };
        let encoder = Encoder {
            conv_in,
            down,
            mid: Mid::new(&e, ch),
            norm_out: e.norm("norm_out", "conv_norm_out", ch),
            conv_out: e.conv("conv_out", "conv_out", moments, ch, 3),
            quant_conv: top.conv("quant_conv", "quant_conv", moments, moments, 1),
            codebook: v.codebook.map(|rows| {
                top.layer(
                    "quantize.embedding",
                    "quantize.embedding",
                    Kind::Embedding { rows, dim: z },
                )
            }),
        };

        let d = top.sub("decoder", "decoder");
        let post_quant_conv = top.conv("post_quant_conv", "post_quant_conv", z, z, 1);
        let conv_in = d.conv("conv_in", "conv_in", ch, z, 3);
        let mid = Mid::new(&d, ch);
        let mut up = Vec::with_capacity(levels);
        for j in 0..levels {
            let l = levels - 1 - j;
            let names = [format!("up.{l}"), format!("up_blocks.{j}")];
            let resample = (l > 0).then_some(["upsample", "upsamplers"]);
            up.push(Level::new(
                &d,
                names,
                v.num_res_blocks + 1,
                (ch, width(l)),
                resample,
            ));
            ch = width(l);
        }
        let decoder = Decoder {
            post_quant_conv,
            conv_in,
            mid,
            up,
            norm_out: d.norm("norm_out", "conv_norm_out", ch),
            conv_out: d.conv("conv_out", "conv_out", v.in_channels, ch, 3),
        };
        Vae { encoder, decoder }
    }

    /// Every parameter, in module order (encoder, decoder, then the two 1x1 convs
    /// between them and the latents, as the single files list them).
    pub fn params(&self) -> Vec<Param> {
        let mut out = Vec::new();
        let e = &self.encoder;
        e.conv_in.params(&mut out);
        for level in &e.down {
            level.params(&mut out);
        }
        e.mid.params(&mut out);
        params_of([&e.norm_out, &e.conv_out], &mut out);
        let d = &self.decoder;
        d.conv_in.params(&mut out);
        d.mid.params(&mut out);
        for level in &d.up {
            level.params(&mut out);
        }
        params_of([&d.norm_out, &d.conv_out], &mut out);
        params_of([&e.quant_conv, &d.post_quant_conv], &mut out);
        params_of(&e.codebook, &mut out);
        out
    }
}

impl Level {
    /// `count` ResNets from `inp` to `out` channels, LDM's `side.{canonical}.block.I`
    /// and diffusers' `side.{group}.resnets.I`, then the resampling conv if `resample`
    /// names it (LDM's and diffusers' word for it).
    fn new(
        side: &At,
        [canonical, group]: [String; 2],
        count: usize,
        (inp, out): (usize, usize),
        resample: Option<[&str; 2]>,
    ) -> Self {
        let blocks = (0..count)
            .map(|i| {
                let at = side.sub(
                    &format!("{canonical}.block.{i}"),
                    &format!("{group}.resnets.{i}"),
                );
                ResBlock::new(&at, if i == 0 { inp } else { out }, out)
            })
            .collect();
        let resample = resample.map(|[c, d]| {
            side.conv(
                &format!("{canonical}.{c}.conv"),
                &format!("{group}.{d}.0.conv"),
                out,
                out,
                3,
            )
        });
        Level { blocks, resample }
    }

    fn params(&self, out: &mut Vec<Param>) {
        for b in &self.blocks {
            b.params(out);
        }
        params_of(&self.resample, out);
    }
}

impl ResBlock {
    fn new(at: &At, inp: usize, out: usize) -> Self {
        ResBlock {
            norm1: at.norm("norm1", "norm1", inp),
            conv1: at.conv("conv1", "conv1", out, inp, 3),
            norm2: at.norm("norm2", "norm2", out),
            conv2: at.conv("conv2", "conv2", out, out, 3),
            shortcut: (inp != out).then(|| at.conv("nin_shortcut", "conv_shortcut", out, inp, 1)),
        }
    }

    fn params(&self, out: &mut Vec<Param>) {
        params_of(
            [&self.norm1, &self.conv1, &self.norm2, &self.conv2]
                .into_iter()
                .chain(&self.shortcut),
            out,
        );
    }
}

impl Mid {
    fn new(side: &At, ch: usize) -> Self {
        let m = side.sub("mid", "mid_block");
        let a = m.sub("attn_1", "attentions.0");
        let proj = |c: &str, d: &str| a.layer(c, d, Kind::LinearAsConv { channels: ch });
        Mid {
            block_1: ResBlock::new(&m.sub("block_1", "resnets.0"), ch, ch),
            attn_1: Attention {
                norm: a.norm("norm", "group_norm", ch),
                q: proj("q", "to_q"),
                k: proj("k", "to_k"),
                v: proj("v", "to_v"),
                proj_out: proj("proj_out", "to_out.0"),
            },
            block_2: ResBlock::new(&m.sub("block_2", "resnets.1"), ch, ch),
        }
    }

    fn params(&self, out: &mut Vec<Param>) {
        self.block_1.params(out);
        let a = &self.attn_1;
        params_of([&a.norm, &a.q, &a.k, &a.v, &a.proj_out], out);
        self.block_2.params(out);
    }
}
