//! Images through a network in overlapping tiles: the compute buffer is one tile's
//! whatever the image's size. Tiles are all one size (one graph serves them all) and
//! are measured in latents; a decoder's tile is `f` pixels per latent on its output
//! side, an encoder's on its input side. Overlaps are blended with linear ramps.
//!
//! Convolution-only networks (TAESD) come out of an overlap wide enough for their
//! receptive field nearly as from a whole run. Networks with GroupNorms (the KL VAE) go
//! through [`run_exact`], whose norms take the whole image's statistics; run through
//! [`run`], each tile would see its own (as diffusers' `enable_tiling` does).
use crate::error::{Error, Result};
use crate::ggml::{Backend, Tensor};

use super::nn::{Nn, Program};
use super::norms::{self, Gather, SharedNorms};
use super::Weights;

/// Where the GroupNorms of a tiled run take their statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TileStats {
    /// Each tile's own ([`run`], as diffusers' `enable_tiling`): one pass, but tones
    /// drift from tile to tile.
    Tile,
    /// The whole image's: the pieces equal a whole run. The default. A KL VAE decoder
    /// runs in bands ([`super::band`], 2-3x a whole decode's time for SD's VAE); an
    /// encoder in tiles ([`run_exact`], one pass over the tiles per GroupNorm).
    #[default]
    Image,
}

impl TileStats {
    pub const NAMES: &'static [&'static str] = &["tile", "image"];

    pub fn parse(s: &str) -> Option<TileStats> {
        match s {
            "image" => Some(TileStats::Image),
            "tile" => Some(TileStats::Tile),
            _ => None,
        }
    }
}

/// How an image is cut into tiles, in latents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub tile_w: usize,
    pub tile_h: usize,
    pub overlap: usize,
}

impl Tiling {
    /// Square tiles of `side` latents overlapping by `overlap`.
    pub fn square(side: usize, overlap: usize) -> Tiling {
        Tiling {
            tile_w: side,
            tile_h: side,
            overlap,
        }
    }

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
        Tiling {
            tile_w: self.tile_w.min(w),
            tile_h: self.tile_h.min(h),
            ..self
        }
    }

    /// Whether a `w`x`h` latent is cut at all.
    pub fn cuts(&self, w: usize, h: usize) -> bool {
        self.tile_w < w || self.tile_h < h
    }

    pub fn tiles(&self, w: usize, h: usize) -> usize {
        let t = self.clamp(w, h);
        Self::starts(w, t.tile_w, t.overlap).len() * Self::starts(h, t.tile_h, t.overlap).len()
    }

    /// The latents tile `i` of `starts` owns along a side of `len`: from the middle of
    /// its overlap with the tile before to the middle of its overlap with the tile after.
    /// The tiles' own ranges cut the side without gaps or overlaps.
    pub fn owned(starts: &[usize], i: usize, tile: usize, len: usize) -> (usize, usize) {
        let a = if i == 0 {
            0
        } else {
            (starts[i - 1] + tile + starts[i]) / 2
        };
        let b = if i + 1 == starts.len() {
            len
        } else {
            (starts[i] + tile + starts[i + 1]) / 2
        };
        (a, b)
    }

    /// Latents run relative to one whole run (1 without tiling; the overlap's cost above it).
    pub fn cost(&self, w: usize, h: usize) -> f64 {
        let t = self.clamp(w, h);
        (self.tiles(w, h) * t.tile_w * t.tile_h) as f64 / (w * h) as f64
    }
}

/// Blend weights of one tile along one side, in output units (`f` per latent): 1
/// inside, a linear ramp over each overlap with a neighbour (none at the image border).
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

/// The network [`run_exact`] builds for each tile: its weights, and the most tensor
/// objects one tile's graph holds.
#[derive(Clone, Copy)]
pub struct Net<'a, 'w> {
    pub weights: &'a Weights<'w>,
    pub max_tensors: usize,
}

/// The shapes of one tiled run.
pub struct Shape {
    /// Images in the batch.
    pub n: usize,
    pub c_in: usize,
    pub c_out: usize,
    /// The image in latents.
    pub lw: usize,
    pub lh: usize,
    /// Input and output units per latent (a decoder: 1 and 8; an encoder: 8 and 1).
    pub f_in: usize,
    pub f_out: usize,
}

impl Shape {
    /// Copies the input of the tile at latent `(x0, y0)` out of one image's input
    /// (`[c_in][lh·f_in][lw·f_in]`) into `tile` (`[c_in][th·f_in][tw·f_in]`).
    fn cut(&self, image: &[f32], tile: &mut [f32], t: Tiling, x0: usize, y0: usize) {
        let (iw, ih, tiw, tih) = (
            self.lw * self.f_in,
            self.lh * self.f_in,
            t.tile_w * self.f_in,
            t.tile_h * self.f_in,
        );
        for c in 0..self.c_in {
            for y in 0..tih {
                let from = c * iw * ih + (y0 * self.f_in + y) * iw + x0 * self.f_in;
                tile[(c * tih + y) * tiw..][..tiw].copy_from_slice(&image[from..from + tiw]);
            }
        }
    }
}

/// Called after each tile run with the runs done and the total; an error stops the run
/// (a cancelled request).
pub type Tick<'a> = &'a mut dyn FnMut(usize, usize) -> Result<()>;

/// A [`Tick`] that does nothing.
pub fn no_tick(_: usize, _: usize) -> Result<()> {
    Ok(())
}

/// Runs `program`, built for one tile's input (`[tile·f_in]²`, `c_in` channels), over
/// `input` (`[n][c_in][lh·f_in][lw·f_in]`): `[n][c_out][lh·f_out][lw·f_out]`.
pub fn run(
    program: &Program<'_>,
    input: &[f32],
    s: &Shape,
    tiling: Tiling,
    backend: &Backend,
    tick: Tick<'_>,
) -> Result<Vec<f32>> {
    let t = tiling.clamp(s.lw, s.lh);
    let (iw, ih, ow, oh) = (s.lw * s.f_in, s.lh * s.f_in, s.lw * s.f_out, s.lh * s.f_out);
    if input.len() != s.n * s.c_in * iw * ih {
        return Err(Error::Invalid(format!(
            "{} input values for {}x{}x{ih}x{iw}",
            input.len(),
            s.n,
            s.c_in
        )));
    }
    let (xs, ys) = (
        Tiling::starts(s.lw, t.tile_w, t.overlap),
        Tiling::starts(s.lh, t.tile_h, t.overlap),
    );
    let (tiw, tih, tow, toh) = (
        t.tile_w * s.f_in,
        t.tile_h * s.f_in,
        t.tile_w * s.f_out,
        t.tile_h * s.f_out,
    );
    let rxs: Vec<Vec<f32>> = (0..xs.len())
        .map(|i| ramp(&xs, i, t.tile_w, s.f_out))
        .collect();
    let rys: Vec<Vec<f32>> = (0..ys.len())
        .map(|j| ramp(&ys, j, t.tile_h, s.f_out))
        .collect();
    let mut out = vec![0f32; s.n * s.c_out * ow * oh];
    let (mut done, total) = (0, s.n * xs.len() * ys.len());
    let mut weight = vec![0f32; ow * oh];
    let mut tile = vec![0f32; s.c_in * tiw * tih];
    for b in 0..s.n {
        let src = &input[b * s.c_in * iw * ih..][..s.c_in * iw * ih];
        let img = &mut out[b * s.c_out * ow * oh..][..s.c_out * ow * oh];
        for (&y0, ry) in ys.iter().zip(&rys) {
            for (&x0, rx) in xs.iter().zip(&rxs) {
                s.cut(src, &mut tile, t, x0, y0);
                let got = program.run(&tile, backend)?;
                done += 1;
                tick(done, total)?;
                if got.len() != s.c_out * tow * toh {
                    return Err(Error::Invalid(format!(
                        "a tile gave {} values, not {}x{toh}x{tow}",
                        got.len(),
                        s.c_out
                    )));
                }
                for y in 0..toh {
                    for x in 0..tow {
                        let wgt = ry[y] * rx[x];
                        let at = (y0 * s.f_out + y) * ow + x0 * s.f_out + x;
                        if b == 0 {
                            weight[at] += wgt;
                        }
                        for c in 0..s.c_out {
                            img[c * ow * oh + at] += wgt * got[(c * toh + y) * tow + x];
                        }
                    }
                }
            }
        }
        for c in 0..s.c_out {
            for (v, &wgt) in img[c * ow * oh..(c + 1) * ow * oh].iter_mut().zip(&weight) {
                *v /= wgt;
            }
        }
    }
    Ok(out)
}

/// Runs the network `build` makes (one tile's input `[tile·f_in]²`, `c_in` channels) over
/// `input` (`[n][c_in][lh·f_in][lw·f_in]`) in tiles, every GroupNorm built through the
/// [`SharedNorms`] handed to `build` and so normalised with the whole image's statistics
/// ([`norms`]): `[n][c_out][lh·f_out][lw·f_out]`. Each tile keeps only the region it owns
/// ([`Tiling::owned`]), so the result is the whole run's wherever half an overlap is at
/// least the network's reach.
///
/// The statistics take one pass over the tiles per norm, each pass as deep as its norm;
/// then one pass makes the output. The compute buffer is the deepest pass's, one tile's.
pub fn run_exact(
    net: Net<'_, '_>,
    input: &[f32],
    s: &Shape,
    tiling: Tiling,
    backend: &Backend,
    tick: Tick<'_>,
    build: impl for<'c> Fn(&Nn<'c>, Tensor<'c>, &SharedNorms) -> Result<Tensor<'c>>,
) -> Result<Vec<f32>> {
    let Net {
        weights: w,
        max_tensors,
    } = net;
    let t = tiling.clamp(s.lw, s.lh);
    let (iw, ih, ow, oh) = (s.lw * s.f_in, s.lh * s.f_in, s.lw * s.f_out, s.lh * s.f_out);
    if input.len() != s.n * s.c_in * iw * ih {
        return Err(Error::Invalid(format!(
            "{} input values for {}x{}x{ih}x{iw}",
            input.len(),
            s.n,
            s.c_in
        )));
    }
    let (tiw, tih, tow, toh) = (
        t.tile_w * s.f_in,
        t.tile_h * s.f_in,
        t.tile_w * s.f_out,
        t.tile_h * s.f_out,
    );
    let program = |collect: Option<usize>| -> Result<(Program<'_>, SharedNorms)> {
        let shared = SharedNorms::new(collect);
        let p = Program::new(w, [tiw, tih, s.c_in, 1], max_tensors, |nn, x| {
            let y = build(nn, x, &shared)?;
            match collect {
                Some(k) => nn.ctx.get(norms::COLLECTED).ok_or_else(|| {
                    Error::Ggml(format!("the tile graph has no GroupNorm {k} to collect"))
                }),
                None => Ok(y),
            }
        })?;
        Ok((p, shared))
    };
    let (last, shared) = program(None)?;
    let norm_list = shared.norms();
    let (xs, ys) = (
        Tiling::starts(s.lw, t.tile_w, t.overlap),
        Tiling::starts(s.lh, t.tile_h, t.overlap),
    );
    // (origin, owned range) in latents, x then y.
    let tiles: Vec<_> = (0..ys.len())
        .flat_map(|j| (0..xs.len()).map(move |i| (i, j)))
        .map(|(i, j)| {
            (
                (xs[i], Tiling::owned(&xs, i, t.tile_w, s.lw)),
                (ys[j], Tiling::owned(&ys, j, t.tile_h, s.lh)),
            )
        })
        .collect();
    // The statistics gathered so far, as named inputs.
    let stat_inputs = |stats: &[Vec<f32>]| -> Vec<(String, Vec<f32>)> {
        stats
            .iter()
            .enumerate()
            .map(|(i, s)| (norms::stats_name(i), s.clone()))
            .collect()
    };
    let (mut done, total) = (0, s.n * tiles.len() * (norm_list.len() + 1));
    let mut tile = vec![0f32; s.c_in * tiw * tih];
    let image = |b: usize| &input[b * s.c_in * iw * ih..][..s.c_in * iw * ih];
    // Each image's statistics, norm by norm; each pass's graph serves every image.
    let mut stats: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(norm_list.len()); s.n];
    for (k, &norm) in norm_list.iter().enumerate() {
        let (p, shared) = program(Some(k))?;
        // The collected norm's input, at its resolution.
        let [mw, mh] = shared
            .collected()
            .ok_or_else(|| Error::Ggml(format!("GroupNorm {k} was not collected")))?;
        if mw % t.tile_w != 0 || mh % t.tile_h != 0 {
            return Err(Error::Ggml(format!(
                "GroupNorm {k} sees a {mw}x{mh} tile, not a whole multiple of {}x{} latents",
                t.tile_w, t.tile_h
            )));
        }
        let (fx, fy) = (mw / t.tile_w, mh / t.tile_h);
        for (b, stats) in stats.iter_mut().enumerate() {
            let inputs = stat_inputs(stats);
            let named: Vec<(&str, &[f32])> = inputs
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice()))
                .collect();
            let mut gather = Gather::new(norm);
            for &((x0, ox), (y0, oy)) in &tiles {
                s.cut(image(b), &mut tile, t, x0, y0);
                let (xr, yr) = (
                    (ox.0 - x0) * fx..(ox.1 - x0) * fx,
                    (oy.0 - y0) * fy..(oy.1 - y0) * fy,
                );
                gather.add(&p.run_with(&tile, &named, backend)?, [mw, mh], yr, xr)?;
                done += 1;
                tick(done, total)?;
            }
            stats.push(gather.finish());
        }
    }
    let mut out = vec![0f32; s.n * s.c_out * ow * oh];
    for (b, stats) in stats.iter().enumerate() {
        let inputs = stat_inputs(stats);
        let named: Vec<(&str, &[f32])> = inputs
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        let img = &mut out[b * s.c_out * ow * oh..][..s.c_out * ow * oh];
        for &((x0, ox), (y0, oy)) in &tiles {
            s.cut(image(b), &mut tile, t, x0, y0);
            let got = last.run_with(&tile, &named, backend)?;
            done += 1;
            tick(done, total)?;
            if got.len() != s.c_out * tow * toh {
                return Err(Error::Invalid(format!(
                    "a tile gave {} values, not {}x{toh}x{tow}",
                    got.len(),
                    s.c_out
                )));
            }
            let (xa, xb) = ((ox.0 - x0) * s.f_out, (ox.1 - x0) * s.f_out);
            for c in 0..s.c_out {
                for y in (oy.0 - y0) * s.f_out..(oy.1 - y0) * s.f_out {
                    let at = c * ow * oh + (y0 * s.f_out + y) * ow + x0 * s.f_out;
                    img[at + xa..at + xb]
                        .copy_from_slice(&got[(c * toh + y) * tow + xa..][..xb - xa]);
                }
            }
        }
    }
    Ok(out)
}
