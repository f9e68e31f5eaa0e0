//! KL autoencoder (LDM `AutoencoderKL`, single-file naming `first_stage_model.*`).
use crate::config::VaeConfig;
use crate::error::{Error, Result};
use crate::ggml::{Backend, Context, NormAct, Tensor};

use super::nn::{eval, Nn, Program};
use super::norms::{group_norm_silu, SharedNorms};
pub use super::tile::{TileStats, Tiling};
use super::{band, tile, Planes, Weights};

use crate::network::vae::{Attention, Decoder, Mid, ResBlock, Vae};
const GROUPS: usize = 32;
const EPS: f32 = 1e-6;

/// `shared`: GroupNorms with the whole image's statistics, for a tile (see [`super::norms`]).
fn resnet<'c>(
    nn: &Nn<'c>,
    x: Tensor<'c>,
    r: &ResBlock,
    shared: Option<&SharedNorms>,
) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let skip = match &r.shortcut {
        Some(s) => nn.conv(x, &s.name, 1, 1, 0)?,
        None => x,
    };
    // With a shortcut convolution, `x` has no reader after the first norm: ggml runs
    // the graph in order, and the sum below reads `skip` first, so the shortcut's
    // nodes come before the norm's. The norm then overwrites `x` instead of taking as
    // much again (256 MB for the decoder's last such block at 512x512).
    let h = match (&r.shortcut, shared) {
        (Some(_), None) => nn.group_norm_act(x, &r.norm1.name, GROUPS, EPS, NormAct::SILU_OVER)?,
        _ => group_norm_silu(nn, shared, x, &r.norm1.name, GROUPS, EPS, false)?,
    };
    let h = nn.conv(h, &r.conv1.name, 3, 1, 1)?;
    let h = group_norm_silu(nn, shared, h, &r.norm2.name, GROUPS, EPS, false)?;
    let h = nn.conv(h, &r.conv2.name, 3, 1, 1)?;
    c.add(skip, h)
}

/// Tensor objects a VAE graph may hold: ~4000 for SD's decoder in one piece, plus up
/// to ~8 per row band for each of its ~40 convolutions when large images split them.
const GRAPH_TENSORS: usize = 4096 + 8 * crate::ggml::CONV_MAX_BANDS * 40;

/// A VAE part to run in tiles ([`tile::run_exact`]).
fn net<'a, 'w>(weights: &'a Weights<'w>) -> tile::Net<'a, 'w> {
    tile::Net {
        weights,
        max_tensors: GRAPH_TENSORS,
    }
}

/// Single-head self-attention over all pixels (the mid block's `attn_1`).
fn attention<'c>(nn: &Nn<'c>, x: Tensor<'c>, a: &Attention) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let [w, h, ch, n] = x.ne();
    let hn = nn.group_norm(x, &a.norm.name, GROUPS, EPS)?;
    let q = nn.to_tokens(nn.conv(hn, &a.q.name, 1, 1, 0)?)?; // [C, N, B]
    let k = nn.to_tokens(nn.conv(hn, &a.k.name, 1, 1, 0)?)?;
    // [W, H, C, B] is already [Npix, C, B]; a permuted view gives [C, Npix] values.
    let v = c.permute(
        c.reshape(nn.conv(hn, &a.v.name, 1, 1, 0)?, &[w * h, ch, 1, n])?,
        [1, 0, 2, 3],
    )?;
    let q = c.reshape(q, &[ch, w * h, 1, n])?;
    let k = c.reshape(k, &[ch, w * h, 1, n])?;
    let o = nn.attend(q, k, v, false)?; // [C, Npix, B]
    let o = nn.from_tokens(o, w, h)?;
    c.add(x, nn.conv(o, &a.proj_out.name, 1, 1, 0)?)
}

fn mid<'c>(nn: &Nn<'c>, x: Tensor<'c>, m: &Mid) -> Result<Tensor<'c>> {
    let x = resnet(nn, x, &m.block_1, None)?;
    let x = attention(nn, x, &m.attn_1)?;
    resnet(nn, x, &m.block_2, None)
}

/// Decoder graph: latents `[w, h, z, n]` (already unscaled) → pixels `[8w, 8h, 3, n]` in [-1, 1].
pub fn decoder<'c>(nn: &Nn<'c>, cfg: &VaeConfig, z: Tensor<'c>) -> Result<Tensor<'c>> {
    decoder_up(nn, cfg, decoder_mid(nn, cfg, z)?, None)
}

/// The decoder at latent resolution, to the mid block's output. Its attention takes
/// every latent, so a tiled decode runs this part whole.
fn decoder_mid<'c>(nn: &Nn<'c>, cfg: &VaeConfig, z: Tensor<'c>) -> Result<Tensor<'c>> {
    // SDXL's decoder activations overflow f16 (see `Nn::f32_kernels`).
    let nn = &Nn {
        f32_kernels: true,
        winograd: true,
        ..*nn
    };
    let d = Vae::new(cfg).decoder;
    let z = nn.conv(z, &d.post_quant_conv.name, 1, 1, 0)?;
    let x = nn.conv(z, &d.conv_in.name, 3, 1, 1)?;
    mid(nn, x, &d.mid)
}

/// One link of the decoder's upsampling half: a resnet, an upsampling, or the output
/// layers. The half is described once, as this chain, for the whole decode and the
/// banded one ([`band`]).
enum UpUnit<'a> {
    Res(&'a ResBlock),
    Up(&'a str),
    Out,
}

impl UpUnit<'_> {
    /// How far the unit carries a value, in its input's pixels ([`band::Chain::reach`]).
    fn reach(&self) -> usize {
        match self {
            UpUnit::Res(_) => 2,
            UpUnit::Up(_) | UpUnit::Out => 1,
        }
    }
}

fn up_units(d: &Decoder) -> Vec<UpUnit<'_>> {
    let mut units = Vec::new();
    for level in &d.up {
        units.extend(level.blocks.iter().map(UpUnit::Res));
        if let Some(up) = &level.resample {
            units.push(UpUnit::Up(&up.name));
        }
    }
    units.push(UpUnit::Out);
    units
}

fn up_unit<'c>(
    nn: &Nn<'c>,
    d: &Decoder,
    unit: &UpUnit<'_>,
    x: Tensor<'c>,
    shared: Option<&SharedNorms>,
) -> Result<Tensor<'c>> {
    // SDXL's decoder activations overflow f16 (see `Nn::f32_kernels`).
    let nn = &Nn {
        f32_kernels: true,
        winograd: true,
        ..*nn
    };
    match unit {
        UpUnit::Res(r) => resnet(nn, x, r, shared),
        UpUnit::Up(name) => nn.upsample_conv(x, name),
        UpUnit::Out => {
            let x = group_norm_silu(nn, shared, x, &d.norm_out.name, GROUPS, EPS, true)?;
            nn.conv(x, &d.conv_out.name, 3, 1, 1)
        }
    }
}

/// The rest of the decoder: upsampling blocks and the output layers (convolutions and
/// GroupNorms only, so it runs in tiles or bands).
fn decoder_up<'c>(
    nn: &Nn<'c>,
    cfg: &VaeConfig,
    mut x: Tensor<'c>,
    shared: Option<&SharedNorms>,
) -> Result<Tensor<'c>> {
    let d = Vae::new(cfg).decoder;
    for unit in &up_units(&d) {
        x = up_unit(nn, &d, unit, x, shared)?;
    }
    Ok(x)
}

/// Encoder graph: pixels `[W, H, 3, n]` in [-1, 1] → latent distribution mean `[W/8, H/8, z, n]`.
pub fn encoder<'c>(nn: &Nn<'c>, cfg: &VaeConfig, img: Tensor<'c>) -> Result<Tensor<'c>> {
    let moments = moments(nn, cfg, img)?;
    let [w, h, _, n] = moments.ne();
    nn.ctx.cont(
        nn.ctx
            .view(moments, [w, h, cfg.latent_channels, n], [0, 0, 0, 0])?,
    )
}

/// The latent distribution `[W/8, H/8, 2z, n]`: means, then log-variances.
fn moments<'c>(nn: &Nn<'c>, cfg: &VaeConfig, img: Tensor<'c>) -> Result<Tensor<'c>> {
    encoder_mid(nn, cfg, encoder_down(nn, cfg, img, None)?)
}

/// The encoder to latent resolution: its downsampling blocks (convolutions and
/// GroupNorms only, so it runs in tiles).
fn encoder_down<'c>(
    nn: &Nn<'c>,
    cfg: &VaeConfig,
    img: Tensor<'c>,
    shared: Option<&SharedNorms>,
) -> Result<Tensor<'c>> {
    let nn = &Nn {
        f32_kernels: true,
        winograd: true,
        ..*nn
    };
    let c = nn.ctx;
    let e = Vae::new(cfg).encoder;
    let mut x = nn.conv(img, &e.conv_in.name, 3, 1, 1)?;
    for level in &e.down {
        for r in &level.blocks {
            x = resnet(nn, x, r, shared)?;
        }
        if let Some(down) = &level.resample {
            // LDM pads right and bottom by one, then convolves with stride 2 and no padding.
            x = nn.conv(pad_right_bottom(c, x)?, &down.name, 3, 2, 0)?;
        }
    }
    Ok(x)
}

/// The rest of the encoder, at latent resolution: the mid block (whose attention takes
/// every latent) and the output layers, to the moments.
fn encoder_mid<'c>(nn: &Nn<'c>, cfg: &VaeConfig, x: Tensor<'c>) -> Result<Tensor<'c>> {
    let nn = &Nn {
        f32_kernels: true,
        winograd: true,
        ..*nn
    };
    let e = Vae::new(cfg).encoder;
    let x = mid(nn, x, &e.mid)?;
    let x = nn.group_norm_act(x, &e.norm_out.name, GROUPS, EPS, NormAct::SILU_OVER)?;
    let x = nn.conv(x, &e.conv_out.name, 3, 1, 1)?;
    nn.conv(x, &e.quant_conv.name, 1, 1, 0)
}

fn pad_right_bottom<'c>(c: &'c Context<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
    c.pad(x, [1, 1, 0, 0])
}

/// Decodes UNet-space latents (`[n][z][h][w]`, PyTorch order) to pixels in [-1, 1]
/// (`[n][3][8h][8w]`): undoes the latent scaling, then runs the decoder.
pub fn decode(
    w: &Weights<'_>,
    cfg: &VaeConfig,
    planes: Planes<'_>,
    backend: &Backend,
) -> Result<Vec<f32>> {
    let zc = cfg.latent_channels;
    let Planes {
        values: latents,
        n,
        width: wd,
        height: h,
    } = planes;
    if !planes.holds(zc) {
        return Err(Error::Invalid(format!(
            "{} latent values for {n}x{zc}x{h}x{wd}",
            latents.len()
        )));
    }
    eval(
        w,
        [wd, h, zc, n],
        latents,
        GRAPH_TENSORS,
        backend,
        |nn, z| decode_graph(nn, cfg, z),
    )
}

fn decode_graph<'c>(nn: &Nn<'c>, cfg: &VaeConfig, z: Tensor<'c>) -> Result<Tensor<'c>> {
    decoder(nn, cfg, unscale(nn, cfg, z)?)
}

/// UNet-space latents back to the decoder's.
fn unscale<'c>(nn: &Nn<'c>, cfg: &VaeConfig, z: Tensor<'c>) -> Result<Tensor<'c>> {
    let zs = nn.ctx.scale(z, 1.0 / cfg.scaling_factor)?;
    if cfg.shift_factor != 0.0 {
        nn.ctx.add1(zs, cfg.shift_factor)
    } else {
        Ok(zs)
    }
}

/// The compute buffer a decode of one `w`x`h` latent needs, in bytes, found without
/// allocating it.
pub fn decode_buffer_bytes(w: &Weights<'_>, cfg: &VaeConfig, wd: usize, h: usize) -> Result<usize> {
    Program::measure(
        w,
        [wd, h, cfg.latent_channels, 1],
        GRAPH_TENSORS,
        |nn, z| decode_graph(nn, cfg, z),
    )
}

/// The compute buffer of [`decode_tiled`] for a `wd`x`h` latent with
/// [`TileStats::Tile`]: one tile's. (With [`TileStats::Image`] see
/// [`decode_banded_bytes`].)
pub fn decode_tiled_bytes(
    w: &Weights<'_>,
    cfg: &VaeConfig,
    wd: usize,
    h: usize,
    tiling: Tiling,
) -> Result<usize> {
    let t = tiling.clamp(wd, h);
    if !t.cuts(wd, h) {
        return decode_buffer_bytes(w, cfg, wd, h);
    }
    decode_buffer_bytes(w, cfg, t.tile_w, t.tile_h)
}

/// Runs `f` with the decoder's upsampling half as a [`band::Chain`].
fn with_chain<T>(
    w: &Weights<'_>,
    cfg: &VaeConfig,
    f: impl FnOnce(&band::Chain<'_, '_>) -> Result<T>,
) -> Result<T> {
    let d = Vae::new(cfg).decoder;
    let units = up_units(&d);
    let reach: Vec<usize> = units.iter().map(UpUnit::reach).collect();
    let build = band::units(|nn, x, i, shared| up_unit(nn, &d, &units[i], x, Some(shared)));
    f(&band::Chain {
        weights: w,
        max_tensors: GRAPH_TENSORS,
        c_in: mid_channels(cfg),
        reach: &reach,
        build: &build,
    })
}

/// One way to run a banded decode ([`decode_tiled`] with [`TileStats::Image`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bands {
    /// Band height in latents.
    pub band: usize,
    /// Room for checkpoints, in bytes (`u64::MAX`: every one kept).
    pub keep: u64,
    /// The most checkpoint bytes held at once beside the mid block's output.
    pub kept: u64,
    /// The mid block's output, which the band passes may start from.
    pub mid: u64,
    /// The upsampling half's work relative to running it whole (1: no band overlaps,
    /// no pass repeated).
    pub work: f64,
}

/// The distinct banded decodes of a `wd`x`h` latent in bands of each of `heights`
/// latents, with every room for checkpoints that changes the passes; least work first.
pub fn decode_band_options(
    w: &Weights<'_>,
    cfg: &VaeConfig,
    wd: usize,
    h: usize,
    heights: &[usize],
) -> Result<Vec<Bands>> {
    with_chain(w, cfg, |chain| {
        let mut all: Vec<Bands> = band::Schedule::options(chain, wd, h, heights)?
            .iter()
            .map(|s| Bands {
                band: s.band(),
                keep: s.keep,
                kept: s.kept_bytes,
                mid: 4 * (mid_channels(cfg) * wd * h) as u64,
                work: s.work(),
            })
            .collect();
        all.sort_by(|a, b| a.work.total_cmp(&b.work).then(a.kept.cmp(&b.kept)));
        Ok(all)
    })
}

/// The banded decode `b`'s largest compute buffer: the whole mid block's or one band
/// pass's (`known` keeps the passes measured across calls).
pub fn decode_band_bytes(
    w: &Weights<'_>,
    cfg: &VaeConfig,
    wd: usize,
    h: usize,
    b: &Bands,
    known: &mut band::Measured,
) -> Result<usize> {
    let head = Program::measure(
        w,
        [wd, h, cfg.latent_channels, 1],
        GRAPH_TENSORS,
        |nn, z| decoder_mid(nn, cfg, unscale(nn, cfg, z)?),
    )?;
    with_chain(w, cfg, |chain| {
        let s = band::Schedule::new(chain, wd, h, b.band, b.keep)?;
        Ok(head.max(band::measure(chain, &s, known)?))
    })
}

/// Channels at latent resolution (the mid block's).
pub fn mid_channels(cfg: &VaeConfig) -> usize {
    cfg.base_channels * cfg.channel_mult.last().copied().unwrap_or(1)
}

/// [`decode`] in pieces, the compute buffer one piece's. With [`TileStats::Image`] the
/// mid block (whose attention takes every latent) runs whole, then the upsampling
/// blocks in full-width bands `tiling.tile_h` latents high with the whole image's
/// GroupNorm statistics ([`band`]), keeping at most `keep` bytes of checkpoints
/// (`None`: every one): the whole decode's result to f32 rounding (see [`band`]). With
/// [`TileStats::Tile`] the whole
/// decoder runs per tile, blended: one pass, each tile normalised on its own (as
/// diffusers' `enable_tiling`). `tick` hears of each piece run (and may stop the
/// decode).
#[allow(clippy::too_many_arguments)]
pub fn decode_tiled(
    w: &Weights<'_>,
    cfg: &VaeConfig,
    planes: Planes<'_>,
    tiling: Tiling,
    stats: TileStats,
    keep: Option<u64>,
    backend: &Backend,
    tick: tile::Tick<'_>,
) -> Result<Vec<f32>> {
    let zc = cfg.latent_channels;
    let Planes {
        values: latents,
        n,
        width: wd,
        height: h,
    } = planes;
    if !planes.holds(zc) {
        return Err(Error::Invalid(format!(
            "{} latent values for {n}x{zc}x{h}x{wd}",
            latents.len()
        )));
    }
    let t = tiling.clamp(wd, h);
    if !t.cuts(wd, h) {
        return decode(w, cfg, planes, backend);
    }
    let f = cfg.downscale();
    match stats {
        TileStats::Tile => {
            let program = Program::new(w, [t.tile_w, t.tile_h, zc, 1], GRAPH_TENSORS, |nn, z| {
                decode_graph(nn, cfg, z)
            })?;
            let shape = tile::Shape {
                n,
                c_in: zc,
                c_out: 3,
                lw: wd,
                lh: h,
                f_in: 1,
                f_out: f,
            };
            tile::run(&program, latents, &shape, t, backend, tick)
        }
        TileStats::Image => {
            let mid = eval(
                w,
                [wd, h, zc, n],
                latents,
                GRAPH_TENSORS,
                backend,
                |nn, z| decoder_mid(nn, cfg, unscale(nn, cfg, z)?),
            )?;
            with_chain(w, cfg, |chain| {
                let s = band::Schedule::new(chain, wd, h, t.tile_h, keep.unwrap_or(u64::MAX))?;
                let per = mid.len() / n;
                let mut out = Vec::with_capacity(n * 3 * wd * f * h * f);
                let runs = s.band_runs();
                for (b, image) in mid.chunks_exact(per).enumerate() {
                    out.extend(band::run(chain, &s, image, backend, &mut |done, _| {
                        tick(b * runs + done, n * runs)
                    })?);
                }
                Ok(out)
            })
        }
    }
}

/// The compute buffer of one tile of [`encode_sample`] (its moments), found without
/// allocating it; with [`TileStats::Image`] the larger of one tile's downsampling and the
/// whole `lw`x`lh` mid block's.
pub fn encode_tile_bytes(
    w: &Weights<'_>,
    cfg: &VaeConfig,
    lw: usize,
    lh: usize,
    tiling: Tiling,
    stats: TileStats,
) -> Result<usize> {
    let f = cfg.downscale();
    let t = tiling.clamp(lw, lh);
    match stats {
        TileStats::Tile => Program::measure(
            w,
            [t.tile_w * f, t.tile_h * f, 3, 1],
            GRAPH_TENSORS,
            |nn, img| moments(nn, cfg, img),
        ),
        TileStats::Image => {
            let shared = SharedNorms::new(None);
            let down = Program::measure(
                w,
                [t.tile_w * f, t.tile_h * f, 3, 1],
                GRAPH_TENSORS,
                |nn, img| encoder_down(nn, cfg, img, Some(&shared)),
            )?;
            let mid =
                Program::measure(w, [lw, lh, mid_channels(cfg), 1], GRAPH_TENSORS, |nn, x| {
                    encoder_mid(nn, cfg, x)
                })?;
            Ok(down.max(mid))
        }
    }
}

/// The compute buffer [`encode`] needs for one `wd`x`h` image, found without allocating it.
pub fn encode_buffer_bytes(w: &Weights<'_>, cfg: &VaeConfig, wd: usize, h: usize) -> Result<usize> {
    Program::measure(w, [wd, h, 3, 1], GRAPH_TENSORS, |nn, img| {
        encoder(nn, cfg, img)
    })
}

/// Encodes pixels in [-1, 1] (`[n][3][H][W]`) to UNet-space latents (the
/// distribution's mean, shifted and scaled).
pub fn encode(
    w: &Weights<'_>,
    cfg: &VaeConfig,
    image: Planes<'_>,
    backend: &Backend,
) -> Result<Vec<f32>> {
    let f = cfg.downscale();
    let Planes {
        values: pixels,
        n,
        width: wd,
        height: h,
    } = image;
    if !image.holds(3) || !h.is_multiple_of(f) || !wd.is_multiple_of(f) {
        return Err(Error::Invalid(format!(
            "{} pixel values for {n}x3x{h}x{wd} (sides must be multiples of {f})",
            pixels.len()
        )));
    }
    eval(
        w,
        [wd, h, 3, n],
        pixels,
        GRAPH_TENSORS,
        backend,
        |nn, img| {
            let mean = encoder(nn, cfg, img)?;
            let mean = if cfg.shift_factor != 0.0 {
                nn.ctx.add1(mean, -cfg.shift_factor)?
            } else {
                mean
            };
            nn.ctx.scale(mean, cfg.scaling_factor)
        },
    )
}

/// Encodes one image in [-1, 1] (`[3][H][W]`) to a draw from the latent distribution,
/// `mean + exp(logvar / 2)·eps` with `eps` unit Gaussian of the latent's size (diffusers'
/// `latent_dist.sample`, log-variance clamped to [-30, 20] as there), shifted and scaled
/// into UNet space.
/// With `tiling`, the downsampling runs in overlapping tiles (see [`decode_tiled`]).
pub fn encode_sample(
    w: &Weights<'_>,
    cfg: &VaeConfig,
    image: Planes<'_>,
    eps: &[f32],
    tiling: Option<(Tiling, TileStats)>,
    backend: &Backend,
) -> Result<Vec<f32>> {
    let f = cfg.downscale();
    let zc = cfg.latent_channels;
    let Planes {
        values: pixels,
        width: wd,
        height: h,
        ..
    } = image;
    let n = zc * (h / f) * (wd / f);
    if image.n != 1
        || !image.holds(3)
        || !h.is_multiple_of(f)
        || !wd.is_multiple_of(f)
        || eps.len() != n
    {
        return Err(Error::Invalid(format!("{} pixel values for 3x{h}x{wd} (sides must be multiples of {f}) and {} noise values for {n} latents", pixels.len(), eps.len())));
    }
    let (lw, lh) = (wd / f, h / f);
    let m = match tiling
        .map(|(t, s)| (t.clamp(lw, lh), s))
        .filter(|(t, _)| t.cuts(lw, lh))
    {
        Some((t, TileStats::Tile)) => {
            let program = Program::new(
                w,
                [t.tile_w * f, t.tile_h * f, 3, 1],
                GRAPH_TENSORS,
                |nn, img| moments(nn, cfg, img),
            )?;
            tile::run(
                &program,
                pixels,
                &tile::Shape {
                    n: 1,
                    c_in: 3,
                    c_out: 2 * zc,
                    lw,
                    lh,
                    f_in: f,
                    f_out: 1,
                },
                t,
                backend,
                &mut tile::no_tick,
            )?
        }
        Some((t, TileStats::Image)) => {
            let ch = mid_channels(cfg);
            let down = tile::run_exact(
                net(w),
                pixels,
                &tile::Shape {
                    n: 1,
                    c_in: 3,
                    c_out: ch,
                    lw,
                    lh,
                    f_in: f,
                    f_out: 1,
                },
                t,
                backend,
                &mut tile::no_tick,
                |nn, img, shared| encoder_down(nn, cfg, img, Some(shared)),
            )?;
            eval(
                w,
                [lw, lh, ch, 1],
                &down,
                GRAPH_TENSORS,
                backend,
                |nn, x| encoder_mid(nn, cfg, x),
            )?
        }
        None => eval(
            w,
            [wd, h, 3, 1],
            pixels,
            GRAPH_TENSORS,
            backend,
            |nn, img| moments(nn, cfg, img),
        )?,
    };
    let (mean, logvar) = m.split_at(n);
    Ok(mean
        .iter()
        .zip(logvar)
        .zip(eps)
        .map(|((&mu, &lv), &e)| {
            (mu + (0.5 * lv.clamp(-30.0, 20.0)).exp() * e - cfg.shift_factor) * cfg.scaling_factor
        })
        .collect())
}
