//! KL autoencoder (LDM `AutoencoderKL`, single-file naming `first_stage_model.*`).
use crate::config::VaeConfig;
use crate::error::{Error, Result};
use crate::ggml::{Backend, Context, Tensor};

use super::nn::{eval, Nn, Program};
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
    // SDXL's decoder activations overflow f16 (see `Nn::f32_kernels`).
    let nn = &Nn { f32_kernels: true, ..*nn };
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
    let moments = moments(nn, cfg, img)?;
    let [w, h, _, n] = moments.ne();
    nn.ctx.cont(nn.ctx.view(moments, [w, h, cfg.latent_channels, n], [0, 0, 0, 0])?)
}

/// The latent distribution `[W/8, H/8, 2z, n]`: means, then log-variances.
fn moments<'c>(nn: &Nn<'c>, cfg: &VaeConfig, img: Tensor<'c>) -> Result<Tensor<'c>> {
    let nn = &Nn { f32_kernels: true, ..*nn };
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
    nn.conv(x, &format!("{PREFIX}quant_conv"), 1, 1, 0)
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
    eval(w, [wd, h, zc, n], latents, GRAPH_TENSORS, backend, |nn, z| decode_graph(nn, cfg, z))
}

/// How a decode is cut into tiles of latents, all of one size (so that one graph
/// serves every tile), each overlapping its neighbours by at least `overlap`
/// latents. The overlaps are blended with linear ramps; GroupNorm and the mid-block
/// attention then see a tile instead of the whole image, so a tiled decode is close
/// to the whole one, not equal (as with diffusers' `enable_tiling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub tile_w: usize,
    pub tile_h: usize,
    pub overlap: usize,
}

impl Tiling {
    /// Tile origins along one side of `len` latents: evenly spread, the first at 0 and
    /// the last at `len - tile`, as few as keep every overlap at least `overlap`.
    pub fn starts(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
        if tile >= len {
            return vec![0];
        }
        let stride = tile.saturating_sub(overlap).max(1);
        let n = (len - tile).div_ceil(stride) + 1;
        (0..n).map(|i| i * (len - tile) / (n - 1)).collect()
    }

    /// The tile actually used for a `w`x`h` latent (never larger than it).
    pub fn clamp(self, w: usize, h: usize) -> Tiling {
        Tiling { tile_w: self.tile_w.min(w), tile_h: self.tile_h.min(h), ..self }
    }

    pub fn tiles(&self, w: usize, h: usize) -> usize {
        let t = self.clamp(w, h);
        Self::starts(w, t.tile_w, t.overlap).len() * Self::starts(h, t.tile_h, t.overlap).len()
    }

    /// Latents decoded relative to one whole decode (1 without tiling; the overlap's cost above it).
    pub fn cost(&self, w: usize, h: usize) -> f64 {
        let t = self.clamp(w, h);
        (self.tiles(w, h) * t.tile_w * t.tile_h) as f64 / (w * h) as f64
    }
}

/// Blend weights of one tile along one side, in pixels: 1 inside, a linear ramp over
/// each overlap with a neighbour (none at the image border).
fn ramp(starts: &[usize], i: usize, tile: usize, f: usize) -> Vec<f32> {
    let px = tile * f;
    let before = (i > 0).then(|| (starts[i - 1] + tile - starts[i]) * f);
    let after = starts.get(i + 1).map(|&next| (starts[i] + tile - next) * f);
    (0..px)
        .map(|p| {
            let mut w = 1.0f32;
            if let Some(o) = before.filter(|&o| o > 0) {
                w = w.min((p as f32 + 0.5) / o as f32);
            }
            if let Some(o) = after.filter(|&o| o > 0) {
                w = w.min(((px - p) as f32 - 0.5) / o as f32);
            }
            w
        })
        .collect()
}

fn decode_graph<'c>(nn: &Nn<'c>, cfg: &VaeConfig, z: Tensor<'c>) -> Result<Tensor<'c>> {
    let zs = nn.ctx.scale(z, 1.0 / cfg.scaling_factor)?;
    let zs = if cfg.shift_factor != 0.0 { nn.ctx.add1(zs, cfg.shift_factor)? } else { zs };
    decoder(nn, cfg, zs)
}

/// The compute buffer a decode of one `w`x`h` latent (or tile) needs, in bytes,
/// found without allocating it.
pub fn decode_buffer_bytes(w: &Weights<'_>, cfg: &VaeConfig, wd: usize, h: usize) -> Result<usize> {
    Program::measure(w, [wd, h, cfg.latent_channels, 1], GRAPH_TENSORS, |nn, z| decode_graph(nn, cfg, z))
}

/// The compute buffer [`encode`] needs for one `wd`x`h` image, found without allocating it.
pub fn encode_buffer_bytes(w: &Weights<'_>, cfg: &VaeConfig, wd: usize, h: usize) -> Result<usize> {
    Program::measure(w, [wd, h, 3, 1], GRAPH_TENSORS, |nn, img| encoder(nn, cfg, img))
}

/// [`decode`] in tiles: the compute buffer is that of one tile.
pub fn decode_tiled(w: &Weights<'_>, cfg: &VaeConfig, latents: &[f32], n: usize, h: usize, wd: usize, tiling: Tiling, backend: &Backend) -> Result<Vec<f32>> {
    let zc = cfg.latent_channels;
    if latents.len() != n * zc * h * wd {
        return Err(Error::Invalid(format!("{} latent values for {n}x{zc}x{h}x{wd}", latents.len())));
    }
    let t = tiling.clamp(wd, h);
    if t.tile_w == wd && t.tile_h == h {
        return decode(w, cfg, latents, n, h, wd, backend);
    }
    let (xs, ys) = (Tiling::starts(wd, t.tile_w, t.overlap), Tiling::starts(h, t.tile_h, t.overlap));
    let f = cfg.downscale();
    let (pw, ph, tpw, tph) = (wd * f, h * f, t.tile_w * f, t.tile_h * f);
    let program = Program::new(w, [t.tile_w, t.tile_h, zc, 1], GRAPH_TENSORS, |nn, z| decode_graph(nn, cfg, z))?;
    let rxs: Vec<Vec<f32>> = (0..xs.len()).map(|i| ramp(&xs, i, t.tile_w, f)).collect();
    let rys: Vec<Vec<f32>> = (0..ys.len()).map(|j| ramp(&ys, j, t.tile_h, f)).collect();
    let mut out = vec![0f32; n * 3 * pw * ph];
    let mut weight = vec![0f32; pw * ph];
    let mut tile = vec![0f32; zc * t.tile_w * t.tile_h];
    for b in 0..n {
        let z = &latents[b * zc * h * wd..(b + 1) * zc * h * wd];
        let img = &mut out[b * 3 * pw * ph..(b + 1) * 3 * pw * ph];
        for (&y0, ry) in ys.iter().zip(&rys) {
            for (&x0, rx) in xs.iter().zip(&rxs) {
                for c in 0..zc {
                    for y in 0..t.tile_h {
                        let src = c * h * wd + (y0 + y) * wd + x0;
                        tile[(c * t.tile_h + y) * t.tile_w..][..t.tile_w].copy_from_slice(&z[src..src + t.tile_w]);
                    }
                }
                let px = program.run(&tile, backend)?;
                for y in 0..tph {
                    for x in 0..tpw {
                        let wgt = ry[y] * rx[x];
                        let at = (y0 * f + y) * pw + x0 * f + x;
                        if b == 0 {
                            weight[at] += wgt;
                        }
                        for c in 0..3 {
                            img[c * pw * ph + at] += wgt * px[(c * tph + y) * tpw + x];
                        }
                    }
                }
            }
        }
        for c in 0..3 {
            for (v, &wgt) in img[c * pw * ph..(c + 1) * pw * ph].iter_mut().zip(&weight) {
                *v /= wgt;
            }
        }
    }
    Ok(out)
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

/// Encodes one image in [-1, 1] (`[3][H][W]`) to a draw from the latent distribution,
/// `mean + exp(logvar / 2)·eps` with `eps` unit Gaussian of the latent's size (diffusers'
/// `latent_dist.sample`, log-variance clamped to [-30, 20] as there), shifted and scaled
/// into UNet space.
pub fn encode_sample(w: &Weights<'_>, cfg: &VaeConfig, pixels: &[f32], h: usize, wd: usize, eps: &[f32], backend: &Backend) -> Result<Vec<f32>> {
    let f = cfg.downscale();
    let zc = cfg.latent_channels;
    let n = zc * (h / f) * (wd / f);
    if pixels.len() != 3 * h * wd || h % f != 0 || wd % f != 0 || eps.len() != n {
        return Err(Error::Invalid(format!("{} pixel values for 3x{h}x{wd} (sides must be multiples of {f}) and {} noise values for {n} latents", pixels.len(), eps.len())));
    }
    let m = eval(w, [wd, h, 3, 1], pixels, GRAPH_TENSORS, backend, |nn, img| moments(nn, cfg, img))?;
    let (mean, logvar) = m.split_at(n);
    Ok(mean.iter().zip(logvar).zip(eps).map(|((&mu, &lv), &e)| (mu + (0.5 * lv.clamp(-30.0, 20.0)).exp() * e - cfg.shift_factor) * cfg.scaling_factor).collect())
}
