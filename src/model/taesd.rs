//! TAESD-family tiny autoencoders (the `nn.Sequential` layout of the original
//! releases: TAESD for SD 1/2 and SDXL with 4 latent channels, TAEF2 with 32 and the
//! extra `pool` branch in its latent-resolution blocks). The layer sequence is the
//! published architecture; widths, latent channels and the optional branches are
//! read from the weights.
use crate::error::Result;
use crate::ggml::{Backend, Tensor};

use super::nn::{Nn, Program};
use super::tile::{self, Tiling};
use super::{Planes, Weights};

enum Layer {
    /// `tanh(x / 3) * 3`: keeps latents in range.
    Clamp,
    Conv(usize),
    /// 3x3 convolution with stride 2.
    Down(usize),
    Relu,
    Block(usize),
    /// Nearest-neighbour 2x upsampling.
    Up,
}

use Layer::*;

const DECODER: &[Layer] = &[
    Clamp,
    Conv(1),
    Relu,
    Block(3),
    Block(4),
    Block(5),
    Up,
    Conv(7),
    Block(8),
    Block(9),
    Block(10),
    Up,
    Conv(12),
    Block(13),
    Block(14),
    Block(15),
    Up,
    Conv(17),
    Block(18),
    Conv(19),
];
const ENCODER: &[Layer] = &[
    Conv(0),
    Block(1),
    Down(2),
    Block(3),
    Block(4),
    Block(5),
    Down(6),
    Block(7),
    Block(8),
    Block(9),
    Down(10),
    Block(11),
    Block(12),
    Block(13),
    Conv(14),
];

fn block<'c>(nn: &Nn<'c>, x: Tensor<'c>, p: &str) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let mut x = x;
    if nn.w.opt(&format!("{p}.pool.0.weight")).is_some() {
        // TAEF2: x + conv1x1(relu(groupnorm(conv1x1(x)))).
        let h = nn.conv(x, &format!("{p}.pool.0"), 1, 1, 0)?;
        let h = c.relu(nn.group_norm(h, &format!("{p}.pool.1"), 4, 1e-5)?)?;
        x = c.add(x, nn.conv(h, &format!("{p}.pool.3"), 1, 1, 0)?)?;
    }
    let h = c.relu(nn.conv(x, &format!("{p}.conv.0"), 3, 1, 1)?)?;
    let h = c.relu(nn.conv(h, &format!("{p}.conv.2"), 3, 1, 1)?)?;
    let h = nn.conv(h, &format!("{p}.conv.4"), 3, 1, 1)?;
    let skip = if nn.w.opt(&format!("{p}.skip.weight")).is_some() {
        nn.conv(x, &format!("{p}.skip"), 1, 1, 0)?
    } else {
        x
    };
    c.relu(c.add(h, skip)?)
}

fn run<'c>(nn: &Nn<'c>, layers: &[Layer], x: Tensor<'c>) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let mut x = x;
    let mut layers = layers.iter().peekable();
    while let Some(l) = layers.next() {
        x = match *l {
            Clamp => c.scale(c.tanh(c.scale(x, 1.0 / 3.0)?)?, 3.0)?,
            // The convolution after an upsampling reads through it (the decoder's three
            // `Upsample, Conv` pairs), so the 4x tensor is never made.
            Up => match layers.next_if(|l| matches!(l, Conv(_))) {
                Some(Conv(i)) => nn.upsample_conv(x, &i.to_string())?,
                _ => c.upscale_nearest(x, 2)?,
            },
            Conv(i) => nn.conv(x, &i.to_string(), 3, 1, 1)?,
            Down(i) => nn.conv(x, &i.to_string(), 3, 2, 1)?,
            Relu => c.relu(x)?,
            Block(i) => block(nn, x, &i.to_string())?,
        };
    }
    Ok(x)
}

/// Latent channels expected by a TAESD decoder (its first convolution's input).
pub fn latent_channels(decoder: &Weights<'_>) -> Result<usize> {
    let w = decoder.get("1.weight")?;
    let ne = w.ne();
    // [kw, kh, C, OC] from a .pth, or [C*9, OC] flattened.
    Ok(if ne[2] > 1 || ne[3] > 1 {
        ne[2]
    } else {
        ne[0] / 9
    })
}

fn eval(
    w: &Weights<'_>,
    layers: &[Layer],
    input: &[f32],
    ne: [usize; 4],
    backend: &Backend,
) -> Result<Vec<f32>> {
    super::nn::eval(w, ne, input, 2048, backend, |nn, x| run(nn, layers, x))
}

/// Decodes latents (`[n][c][h][w]`, the UNet's scaled space) to an image in about
/// [0, 1] (`[n][3][8h][8w]`), unclamped.
pub fn decode(w: &Weights<'_>, latents: Planes<'_>, backend: &Backend) -> Result<Vec<f32>> {
    let c = latent_channels(w)?;
    let ne = [latents.width, latents.height, c, latents.n];
    eval(w, DECODER, latents.values, ne, backend)
}

/// The compute buffer [`decode`] needs for one `wd`x`h` latent, found without allocating it.
pub fn decode_buffer_bytes(w: &Weights<'_>, wd: usize, h: usize) -> Result<usize> {
    let c = latent_channels(w)?;
    super::nn::Program::measure(w, [wd, h, c, 1], 2048, |nn, x| run(nn, DECODER, x))
}

/// Encodes an image in [0, 1] (`[n][3][H][W]`, sides multiples of 8) to latents.
pub fn encode(w: &Weights<'_>, image: Planes<'_>, backend: &Backend) -> Result<Vec<f32>> {
    let Planes {
        values: pixels,
        n,
        width: wd,
        height: h,
    } = image;
    if !h.is_multiple_of(8) || !wd.is_multiple_of(8) {
        return Err(crate::Error::Invalid(format!(
            "TAESD encodes images whose sides are multiples of 8, not {wd}x{h}"
        )));
    }
    eval(w, ENCODER, pixels, [wd, h, 3, n], backend)
}

/// Whether layer `l` normalizes over the whole image (TAEF2's `pool` branch has a
/// GroupNorm): such layers cannot see a tile alone.
fn global(w: &Weights<'_>, l: &Layer) -> bool {
    matches!(l, Block(i) if w.opt(&format!("{i}.pool.0.weight")).is_some())
}

/// Where the layers split into the part that runs whole and the part that runs in
/// tiles: the decoder's global layers come first (TAEF2: its latent-resolution
/// blocks), so the layers up to the last of them run whole on the small latent and the
/// rest, where the memory is, in tiles; the encoder's come last, so the layers before
/// the first of them run in tiles and the latent-resolution rest whole. TAESD has
/// none: everything is tiled. Convolutions alone, with overlaps wider than their reach,
/// make tiles that match the whole run.
fn split(w: &Weights<'_>, layers: &[Layer], decoder: bool) -> usize {
    if decoder {
        layers
            .iter()
            .rposition(|l| global(w, l))
            .map_or(0, |i| i + 1)
    } else {
        layers
            .iter()
            .position(|l| global(w, l))
            .unwrap_or(layers.len())
    }
}

/// [`decode`] in tiles ([`tile`](super::tile)); see [`split`] for what runs whole.
pub fn decode_tiled(
    w: &Weights<'_>,
    planes: Planes<'_>,
    tiling: Tiling,
    backend: &Backend,
) -> Result<Vec<f32>> {
    let c = latent_channels(w)?;
    let Planes {
        values: latents,
        n,
        width: wd,
        height: h,
    } = planes;
    let t = tiling.clamp(wd, h);
    if !t.cuts(wd, h) {
        return decode(w, planes, backend);
    }
    let at = split(w, DECODER, true);
    let (head, tail) = DECODER.split_at(at);
    let head_out;
    let (x, c) = if head.is_empty() {
        (latents, c)
    } else {
        head_out = eval(w, head, latents, [wd, h, c, n], backend)?;
        (head_out.as_slice(), head_out.len() / (n * wd * h))
    };
    let program = Program::new(w, [t.tile_w, t.tile_h, c, 1], 2048, |nn, x| {
        run(nn, tail, x)
    })?;
    tile::run(
        &program,
        x,
        &tile::Shape {
            n,
            c_in: c,
            c_out: 3,
            lw: wd,
            lh: h,
            f_in: 1,
            f_out: 8,
        },
        t,
        backend,
        &mut tile::no_tick,
    )
}

/// [`encode`] in tiles of `tiling` latents (8 pixels each); see [`split`].
pub fn encode_tiled(
    w: &Weights<'_>,
    image: Planes<'_>,
    tiling: Tiling,
    backend: &Backend,
) -> Result<Vec<f32>> {
    let Planes {
        values: pixels,
        n,
        width: wd,
        height: h,
    } = image;
    if !h.is_multiple_of(8) || !wd.is_multiple_of(8) {
        return Err(crate::Error::Invalid(format!(
            "TAESD encodes images whose sides are multiples of 8, not {wd}x{h}"
        )));
    }
    let (lw, lh) = (wd / 8, h / 8);
    let t = tiling.clamp(lw, lh);
    if !t.cuts(lw, lh) {
        return encode(w, image, backend);
    }
    let at = split(w, ENCODER, false);
    let (head, tail) = ENCODER.split_at(at);
    let program = Program::new(w, [t.tile_w * 8, t.tile_h * 8, 3, 1], 2048, |nn, x| {
        run(nn, head, x)
    })?;
    // The head's channels at latent resolution.
    let c = program.output_len() / (t.tile_w * t.tile_h);
    let x = tile::run(
        &program,
        pixels,
        &tile::Shape {
            n,
            c_in: 3,
            c_out: c,
            lw,
            lh,
            f_in: 8,
            f_out: 1,
        },
        t,
        backend,
        &mut tile::no_tick,
    )?;
    if tail.is_empty() {
        return Ok(x);
    }
    eval(w, tail, &x, [lw, lh, c, n], backend)
}

/// The compute buffer of one [`decode_tiled`] tile (or of its whole-image head, if
/// larger), found without allocating it.
pub fn decode_tile_bytes(w: &Weights<'_>, tiling: Tiling, lw: usize, lh: usize) -> Result<usize> {
    let c = latent_channels(w)?;
    let t = tiling.clamp(lw, lh);
    if !t.cuts(lw, lh) {
        return decode_buffer_bytes(w, lw, lh);
    }
    let (head, tail) = DECODER.split_at(split(w, DECODER, true));
    let (mut bytes, mut c_tail) = (0, c);
    if !head.is_empty() {
        bytes = super::nn::Program::measure(w, [lw, lh, c, 1], 2048, |nn, x| run(nn, head, x))?;
        let p = Program::new(w, [1, 1, c, 1], 2048, |nn, x| run(nn, head, x))?;
        c_tail = p.output_len();
    }
    Ok(bytes.max(super::nn::Program::measure(
        w,
        [t.tile_w, t.tile_h, c_tail, 1],
        2048,
        |nn, x| run(nn, tail, x),
    )?))
}
