//! KL autoencoder (LDM `AutoencoderKL`, single-file naming `first_stage_model.*`).
use crate::config::VaeConfig;
use crate::error::{Error, Result};
use crate::ggml::{Backend, Context, Tensor};

use super::nn::{eval, Nn};
use super::Weights;

const PREFIX: &str = "first_stage_model.";
const GROUPS: usize = 32;
const EPS: f32 = 1e-6;

fn resnet<'c>(nn: &Nn<'c>, x: Tensor<'c>, name: &str) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let h = c.silu(nn.group_norm(x, &format!("{name}.norm1"), GROUPS, EPS)?)?;
    let h = nn.conv(h, &format!("{name}.conv1"), 3, 1, 1)?;
    let h = c.silu(nn.group_norm(h, &format!("{name}.norm2"), GROUPS, EPS)?)?;
    let h = nn.conv(h, &format!("{name}.conv2"), 3, 1, 1)?;
    let skip = if nn.w.opt(&format!("{name}.nin_shortcut.weight")).is_some() { nn.conv(x, &format!("{name}.nin_shortcut"), 1, 1, 0)? } else { x };
    c.add(skip, h)
}

/// Tensor objects a VAE graph may hold: ~4000 for SD's decoder in one piece, plus up
/// to ~8 per row band for each of its ~40 convolutions when large images split them.
const GRAPH_TENSORS: usize = 4096 + 8 * crate::ggml::CONV_MAX_BANDS * 40;

/// Single-head self-attention over all pixels (the mid block's `attn_1`).
fn attention<'c>(nn: &Nn<'c>, x: Tensor<'c>, name: &str) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let [w, h, ch, n] = x.ne();
    let hn = nn.group_norm(x, &format!("{name}.norm"), GROUPS, EPS)?;
    let q = nn.to_tokens(nn.conv(hn, &format!("{name}.q"), 1, 1, 0)?)?; // [C, N, B]
    let k = nn.to_tokens(nn.conv(hn, &format!("{name}.k"), 1, 1, 0)?)?;
    // [W, H, C, B] is already [Npix, C, B]; a permuted view gives [C, Npix] values.
    let v = c.permute(c.reshape(nn.conv(hn, &format!("{name}.v"), 1, 1, 0)?, &[w * h, ch, 1, n])?, [1, 0, 2, 3])?;
    let q = c.reshape(q, &[ch, w * h, 1, n])?;
    let k = c.reshape(k, &[ch, w * h, 1, n])?;
    let o = nn.attend(q, k, v, false)?; // [C, Npix, B]
    let o = nn.from_tokens(o, w, h)?;
    c.add(x, nn.conv(o, &format!("{name}.proj_out"), 1, 1, 0)?)
}

fn mid<'c>(nn: &Nn<'c>, x: Tensor<'c>, p: &str) -> Result<Tensor<'c>> {
    let x = resnet(nn, x, &format!("{p}mid.block_1"))?;
    let x = attention(nn, x, &format!("{p}mid.attn_1"))?;
    resnet(nn, x, &format!("{p}mid.block_2"))
}

/// Decoder graph: latents `[w, h, z, n]` (already unscaled) → pixels `[8w, 8h, 3, n]` in [-1, 1].
pub fn decoder<'c>(nn: &Nn<'c>, cfg: &VaeConfig, z: Tensor<'c>) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let p = format!("{PREFIX}decoder.");
    let z = nn.conv(z, &format!("{PREFIX}post_quant_conv"), 1, 1, 0)?;
    let mut x = nn.conv(z, &format!("{p}conv_in"), 3, 1, 1)?;
    x = mid(nn, x, &p)?;
    for level in (0..cfg.channel_mult.len()).rev() {
        for j in 0..=cfg.num_res_blocks {
            x = resnet(nn, x, &format!("{p}up.{level}.block.{j}"))?;
        }
        if level > 0 {
            x = c.upscale_nearest(x, 2)?;
            x = nn.conv(x, &format!("{p}up.{level}.upsample.conv"), 3, 1, 1)?;
        }
    }
    let x = c.silu(nn.group_norm(x, &format!("{p}norm_out"), GROUPS, EPS)?)?;
    nn.conv(x, &format!("{p}conv_out"), 3, 1, 1)
}

/// Encoder graph: pixels `[W, H, 3, n]` in [-1, 1] → latent distribution mean `[W/8, H/8, z, n]`.
pub fn encoder<'c>(nn: &Nn<'c>, cfg: &VaeConfig, img: Tensor<'c>) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let p = format!("{PREFIX}encoder.");
    let mut x = nn.conv(img, &format!("{p}conv_in"), 3, 1, 1)?;
    let levels = cfg.channel_mult.len();
    for level in 0..levels {
        for j in 0..cfg.num_res_blocks {
            x = resnet(nn, x, &format!("{p}down.{level}.block.{j}"))?;
        }
        if level + 1 < levels {
            // LDM pads right and bottom by one, then convolves with stride 2 and no padding.
            let padded = pad_right_bottom(c, x)?;
            x = nn.conv(padded, &format!("{p}down.{level}.downsample.conv"), 3, 2, 0)?;
        }
    }
    x = mid(nn, x, &p)?;
    let x = c.silu(nn.group_norm(x, &format!("{p}norm_out"), GROUPS, EPS)?)?;
    let x = nn.conv(x, &format!("{p}conv_out"), 3, 1, 1)?;
    let moments = nn.conv(x, &format!("{PREFIX}quant_conv"), 1, 1, 0)?;
    let [w, h, _, n] = moments.ne();
    c.cont(c.view(moments, [w, h, cfg.latent_channels, n], [0, 0, 0, 0])?)
}

fn pad_right_bottom<'c>(c: &'c Context<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
    c.pad(x, [1, 1, 0, 0])
}

/// Decodes UNet-space latents (`[n][z][h][w]`, PyTorch order) to pixels in [-1, 1]
/// (`[n][3][8h][8w]`): undoes the latent scaling, then runs the decoder.
pub fn decode(w: &Weights<'_>, cfg: &VaeConfig, latents: &[f32], n: usize, h: usize, wd: usize, backend: &Backend) -> Result<Vec<f32>> {
    let zc = cfg.latent_channels;
    if latents.len() != n * zc * h * wd {
        return Err(Error::Invalid(format!("{} latent values for {n}x{zc}x{h}x{wd}", latents.len())));
    }
    eval(w, [wd, h, zc, n], latents, GRAPH_TENSORS, backend, |nn, z| {
        let zs = nn.ctx.scale(z, 1.0 / cfg.scaling_factor)?;
        let zs = if cfg.shift_factor != 0.0 { nn.ctx.add1(zs, cfg.shift_factor)? } else { zs };
        decoder(nn, cfg, zs)
    })
}

/// Encodes pixels in [-1, 1] (`[n][3][H][W]`) to UNet-space latents (the
/// distribution's mean, shifted and scaled).
pub fn encode(w: &Weights<'_>, cfg: &VaeConfig, pixels: &[f32], n: usize, h: usize, wd: usize, backend: &Backend) -> Result<Vec<f32>> {
    let f = cfg.downscale();
    if pixels.len() != n * 3 * h * wd || h % f != 0 || wd % f != 0 {
        return Err(Error::Invalid(format!("{} pixel values for {n}x3x{h}x{wd} (sides must be multiples of {f})", pixels.len())));
    }
    eval(w, [wd, h, 3, n], pixels, GRAPH_TENSORS, backend, |nn, img| {
        let mean = encoder(nn, cfg, img)?;
        let mean = if cfg.shift_factor != 0.0 { nn.ctx.add1(mean, -cfg.shift_factor)? } else { mean };
        nn.ctx.scale(mean, cfg.scaling_factor)
    })
}
