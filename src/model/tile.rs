//! Images through a network in overlapping tiles: the compute buffer is one tile's
//! whatever the image's size. Tiles are all one size (one graph serves them all) and
//! are measured in latents; a decoder's tile is `f` pixels per latent on its output
//! side, an encoder's on its input side. Overlaps are blended with linear ramps.
//!
//! Convolution-only networks (TAESD) come out of an overlap wide enough for their
//! receptive field nearly as from a whole run. The KL VAE's GroupNorm and mid-block
//! attention see a tile instead of the image, so its tiles are close to the whole
//! decode, not equal (as with diffusers' `enable_tiling`).
use crate::error::{Error, Result};
use crate::ggml::Backend;

use super::nn::Program;

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
        Tiling { tile_w: side, tile_h: side, overlap }
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
        Tiling { tile_w: self.tile_w.min(w), tile_h: self.tile_h.min(h), ..self }
    }

    /// Whether a `w`x`h` latent is cut at all.
    pub fn cuts(&self, w: usize, h: usize) -> bool {
        self.tile_w < w || self.tile_h < h
    }

    pub fn tiles(&self, w: usize, h: usize) -> usize {
        let t = self.clamp(w, h);
        Self::starts(w, t.tile_w, t.overlap).len() * Self::starts(h, t.tile_h, t.overlap).len()
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

/// Runs `program`, built for one tile's input (`[tile·f_in]²`, `c_in` channels), over
/// `input` (`[n][c_in][lh·f_in][lw·f_in]`): `[n][c_out][lh·f_out][lw·f_out]`.
pub fn run(program: &Program<'_>, input: &[f32], s: &Shape, tiling: Tiling, backend: &Backend) -> Result<Vec<f32>> {
    let t = tiling.clamp(s.lw, s.lh);
    let (iw, ih, ow, oh) = (s.lw * s.f_in, s.lh * s.f_in, s.lw * s.f_out, s.lh * s.f_out);
    if input.len() != s.n * s.c_in * iw * ih {
        return Err(Error::Invalid(format!("{} input values for {}x{}x{ih}x{iw}", input.len(), s.n, s.c_in)));
    }
    let (xs, ys) = (Tiling::starts(s.lw, t.tile_w, t.overlap), Tiling::starts(s.lh, t.tile_h, t.overlap));
    let (tiw, tih, tow, toh) = (t.tile_w * s.f_in, t.tile_h * s.f_in, t.tile_w * s.f_out, t.tile_h * s.f_out);
    let rxs: Vec<Vec<f32>> = (0..xs.len()).map(|i| ramp(&xs, i, t.tile_w, s.f_out)).collect();
    let rys: Vec<Vec<f32>> = (0..ys.len()).map(|j| ramp(&ys, j, t.tile_h, s.f_out)).collect();
    let mut out = vec![0f32; s.n * s.c_out * ow * oh];
    let mut weight = vec![0f32; ow * oh];
    let mut tile = vec![0f32; s.c_in * tiw * tih];
    for b in 0..s.n {
        let src = &input[b * s.c_in * iw * ih..][..s.c_in * iw * ih];
        let img = &mut out[b * s.c_out * ow * oh..][..s.c_out * ow * oh];
        for (&y0, ry) in ys.iter().zip(&rys) {
            for (&x0, rx) in xs.iter().zip(&rxs) {
                for c in 0..s.c_in {
                    for y in 0..tih {
                        let from = c * iw * ih + (y0 * s.f_in + y) * iw + x0 * s.f_in;
                        tile[(c * tih + y) * tiw..][..tiw].copy_from_slice(&src[from..from + tiw]);
                    }
                }
                let got = program.run(&tile, backend)?;
                if got.len() != s.c_out * tow * toh {
                    return Err(Error::Invalid(format!("a tile gave {} values, not {}x{toh}x{tow}", got.len(), s.c_out)));
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
