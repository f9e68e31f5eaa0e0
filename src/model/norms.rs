//! GroupNorms of a tiled network, normalised with the whole image's statistics.
//!
//! A GroupNorm divides each group of channels by its mean and spread over the whole
//! image. A tile run on its own sees its own statistics instead, and its colours drift
//! from its neighbours' (diffusers' `enable_tiling` lives with that). A graph built with
//! [`SharedNorms`] takes each norm's statistics as inputs instead, and, when asked to
//! collect norm `k`, outputs the sums of that norm's input over the pixels the tile owns.
//! Norm `k`'s input depends only on the norms before it, so the host gathers the
//! statistics norm after norm, each pass adding up every tile's sums, and all of them are
//! those of the whole image ([`super::tile::run_exact`]).
use std::cell::{Cell, RefCell};

use crate::error::{Error, Result};
use crate::ggml::{Context, NormAct, Tensor, Type};

use super::nn::Nn;

/// One GroupNorm the graph holds, in the order built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norm {
    pub channels: usize,
    pub groups: usize,
    pub eps: f32,
}

/// The graph's output when it collects a norm: `[2, C]`, for each channel the sum of its
/// input and of its input squared over the tile's own pixels.
pub const SUMS: &str = "norms.sums";

/// Per-channel mean and reciprocal standard deviation inputs of norm `i`, `[1, 1, C, 1]`.
pub fn mean_name(i: usize) -> String {
    format!("norms.{i}.mean")
}
pub fn rstd_name(i: usize) -> String {
    format!("norms.{i}.rstd")
}
/// The mask input (1 on the pixels the tile owns, else 0) at one resolution, `[W, H, 1, 1]`.
pub fn mask_name(w: usize, h: usize) -> String {
    format!("norms.mask.{w}x{h}")
}

/// Builds GroupNorms that read their statistics from inputs (see the module).
#[derive(Debug, Default)]
pub struct SharedNorms {
    collect: Option<usize>,
    norms: RefCell<Vec<Norm>>,
    masks: RefCell<Vec<[usize; 2]>>,
    seen: Cell<usize>,
}

impl SharedNorms {
    /// Norms for one graph; `collect`: the norm whose input sums it outputs.
    pub fn new(collect: Option<usize>) -> Self {
        SharedNorms {
            collect,
            ..Default::default()
        }
    }

    /// The norms built so far.
    pub fn norms(&self) -> Vec<Norm> {
        self.norms.borrow().clone()
    }

    /// The `[W, H]` of each mask input built.
    pub fn masks(&self) -> Vec<[usize; 2]> {
        self.masks.borrow().clone()
    }

    /// GroupNorm `name` (affine `.weight` and `.bias`) over `x` `[W, H, C, 1]`.
    pub fn group_norm<'c>(
        &self,
        nn: &Nn<'c>,
        x: Tensor<'c>,
        name: &str,
        groups: usize,
        eps: f32,
    ) -> Result<Tensor<'c>> {
        let c = nn.ctx;
        let [w, h, ch, n] = x.ne();
        if n != 1 || groups == 0 || ch % groups != 0 {
            return Err(Error::Ggml(format!("shared GroupNorm `{name}`: {n} images of {ch} channels in {groups} groups (one image, whole groups)")));
        }
        let i = self.seen.get();
        self.seen.set(i + 1);
        self.norms.borrow_mut().push(Norm {
            channels: ch,
            groups,
            eps,
        });
        if self.collect == Some(i) {
            let mask = self.mask(c, w, h)?;
            let owned = c.reshape(c.mul(x, mask)?, &[w * h, ch])?;
            let sums = c.concat(c.sum_rows(owned)?, c.sum_rows(c.sqr(owned)?)?, 0)?;
            c.name(sums, SUMS)?;
        }
        let input = |name: String| -> Result<Tensor<'c>> {
            let t = c.tensor(Type::F32, &[1, 1, ch, 1], &name)?;
            c.set_input(t);
            Ok(t)
        };
        let (mean, rstd) = (input(mean_name(i))?, input(rstd_name(i))?);
        let gamma = c.reshape(nn.w.get(&format!("{name}.weight"))?, &[1, 1, ch, 1])?;
        let beta = c.reshape(nn.w.get(&format!("{name}.bias"))?, &[1, 1, ch, 1])?;
        // (x - mean)·rstd·γ + β as one scale and one shift per channel.
        let scale = c.mul(rstd, gamma)?;
        let shift = c.add(c.scale(c.mul(mean, scale)?, -1.0)?, beta)?;
        c.add(c.mul(x, scale)?, shift)
    }

    fn mask<'c>(&self, c: &'c Context<'c>, w: usize, h: usize) -> Result<Tensor<'c>> {
        let name = mask_name(w, h);
        if let Some(t) = c.get(&name) {
            return Ok(t);
        }
        let t = c.tensor(Type::F32, &[w, h, 1, 1], &name)?;
        c.set_input(t);
        self.masks.borrow_mut().push([w, h]);
        Ok(t)
    }
}

/// A GroupNorm and SiLU: over `x` itself (one op on the CPU, written over `x` if
/// `over`: `x` has no later reader), or with `shared` statistics.
pub fn group_norm_silu<'c>(
    nn: &Nn<'c>,
    shared: Option<&SharedNorms>,
    x: Tensor<'c>,
    name: &str,
    groups: usize,
    eps: f32,
    over: bool,
) -> Result<Tensor<'c>> {
    match shared {
        Some(s) => nn.ctx.silu(s.group_norm(nn, x, name, groups, eps)?),
        None => nn.group_norm_act(x, name, groups, eps, NormAct { silu: true, over }),
    }
}

/// Sums of one norm's input over every tile, turned into its statistics.
#[derive(Clone, Debug)]
pub struct Gather {
    norm: Norm,
    /// Per channel: sum of values, sum of squares.
    sums: Vec<[f64; 2]>,
    /// Pixels summed per channel.
    pixels: u64,
}

impl Gather {
    pub fn new(norm: Norm) -> Self {
        Gather {
            norm,
            sums: vec![[0.0; 2]; norm.channels],
            pixels: 0,
        }
    }

    /// Adds one tile's [`SUMS`] output, summed over `pixels` owned pixels.
    pub fn add(&mut self, sums: &[f32], pixels: usize) -> Result<()> {
        if sums.len() != 2 * self.norm.channels {
            return Err(Error::Ggml(format!(
                "{} GroupNorm sums for {} channels",
                sums.len(),
                self.norm.channels
            )));
        }
        for (acc, s) in self.sums.iter_mut().zip(sums.chunks_exact(2)) {
            acc[0] += s[0] as f64;
            acc[1] += s[1] as f64;
        }
        self.pixels += pixels as u64;
        Ok(())
    }

    /// Per-channel mean and reciprocal standard deviation (each channel has its group's),
    /// the variance biased as GroupNorm's.
    pub fn finish(&self) -> (Vec<f32>, Vec<f32>) {
        let per = self.norm.channels / self.norm.groups;
        let n = (self.pixels * per as u64).max(1) as f64;
        let (mut mean, mut rstd) = (
            Vec::with_capacity(self.norm.channels),
            Vec::with_capacity(self.norm.channels),
        );
        for g in self.sums.chunks(per) {
            let (s, s2) = g.iter().fold((0.0, 0.0), |(a, b), v| (a + v[0], b + v[1]));
            let m = s / n;
            let var = (s2 / n - m * m).max(0.0);
            let r = 1.0 / (var + self.norm.eps as f64).sqrt();
            mean.extend(std::iter::repeat_n(m as f32, per));
            rstd.extend(std::iter::repeat_n(r as f32, per));
        }
        (mean, rstd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_statistics_are_those_of_the_group_over_all_tiles() {
        // Two channels in one group, two tiles of 3 and 1 pixels.
        let norm = Norm {
            channels: 2,
            groups: 1,
            eps: 0.0,
        };
        let mut g = Gather::new(norm);
        let values = [[1.0f32, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]];
        let sums = |c: usize, r: std::ops::Range<usize>| -> [f32; 2] {
            [
                values[c][r.clone()].iter().sum(),
                values[c][r].iter().map(|v| v * v).sum(),
            ]
        };
        for r in [0..3, 3..4] {
            let (a, b) = (sums(0, r.clone()), sums(1, r.clone()));
            g.add(&[a[0], a[1], b[0], b[1]], r.len()).unwrap();
        }
        let (mean, rstd) = g.finish();
        let all: Vec<f64> = values.iter().flatten().map(|&v| v as f64).collect();
        let m = all.iter().sum::<f64>() / 8.0;
        let var = all.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 8.0;
        assert_eq!(mean, vec![m as f32; 2]);
        assert!((rstd[0] as f64 - 1.0 / var.sqrt()).abs() < 1e-6);
        assert!(g.add(&[0.0; 3], 1).is_err());
    }
}
