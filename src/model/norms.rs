//! GroupNorms of a tiled network, normalised with the whole image's statistics.
//!
//! A GroupNorm divides each group of channels by its mean and spread over the whole
//! image. A tile run on its own sees its own statistics instead, and its colours drift
//! from its neighbours' (diffusers' `enable_tiling` lives with that). A graph built with
//! [`SharedNorms`] takes each norm's statistics as inputs instead, and, when asked to
//! collect norm `k`, outputs that norm's input. Norm `k`'s input depends only on the
//! norms before it, so the host gathers the statistics norm after norm, each pass adding
//! up every tile's own pixels, and all of them are those of the whole image
//! ([`super::tile::run_exact`], [`super::band`]).
//!
//! The norms are ggml's fused GroupNorm op given the statistics, and [`Gather`] sums in
//! f64 and rounds as that op does: a tile gets the whole run's values to the bit (bar a
//! sum that lands within f64 rounding of an f32 midpoint). Bit for bit matters: with
//! bf16 convolution inputs, a last-bit difference flips some roundings, and over the
//! decoder's layers those grow to bf16's own noise (~55 dB from the whole decode).
use std::cell::{Cell, RefCell};

use crate::error::{Error, Result};
use crate::ggml::{self, NormAct, Tensor, Type};

use super::nn::Nn;

/// One GroupNorm the graph holds, in the order built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norm {
    pub channels: usize,
    pub groups: usize,
    pub eps: f32,
}

/// The graph's output when it collects a norm: that norm's input `[W, H, C, 1]`.
pub const COLLECTED: &str = "norms.collected";

/// The statistics input of norm `i`, `[1, 1, C, 2]`: each channel's group mean, then
/// its reciprocal standard deviation ([`Gather::finish`]).
pub fn stats_name(i: usize) -> String {
    format!("norms.{i}.stats")
}

/// Builds GroupNorms that read their statistics from inputs (see the module).
#[derive(Debug, Default)]
pub struct SharedNorms {
    collect: Option<usize>,
    norms: RefCell<Vec<Norm>>,
    /// `[W, H]` of the collected norm's input.
    collected: Cell<Option<[usize; 2]>>,
    seen: Cell<usize>,
}

impl SharedNorms {
    /// Norms for one graph; `collect`: the norm whose input it outputs.
    pub fn new(collect: Option<usize>) -> Self {
        SharedNorms {
            collect,
            ..Default::default()
        }
    }

    /// Norms for a graph that starts past the network's first `first` norms (a pass
    /// of a [`super::band`] run), numbered as in the whole network.
    pub fn starting_at(first: usize, collect: Option<usize>) -> Self {
        let s = Self::new(collect);
        s.seen.set(first);
        s
    }

    /// The norms built so far.
    pub fn norms(&self) -> Vec<Norm> {
        self.norms.borrow().clone()
    }

    /// `[W, H]` of the collected norm's input, once built.
    pub fn collected(&self) -> Option<[usize; 2]> {
        self.collected.get()
    }

    /// GroupNorm `name` (affine `.weight` and `.bias`) over `x` `[W, H, C, 1]`, and a
    /// SiLU after it if `silu`.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm<'c>(
        &self,
        nn: &Nn<'c>,
        x: Tensor<'c>,
        name: &str,
        groups: usize,
        eps: f32,
        silu: bool,
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
            let out = c.cont(x)?;
            c.name(out, COLLECTED)?;
            self.collected.set(Some([w, h]));
        }
        let stats = c.tensor(Type::F32, &[1, 1, ch, 2], &stats_name(i))?;
        c.set_input(stats);
        let gamma = c.reshape(nn.w.get(&format!("{name}.weight"))?, &[1, 1, ch, 1])?;
        let beta = c.reshape(nn.w.get(&format!("{name}.bias"))?, &[1, 1, ch, 1])?;
        let act = NormAct { silu, over: false };
        c.group_norm_act(x, groups, eps, gamma, beta, act, Some(stats))
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
        Some(s) => s.group_norm(nn, x, name, groups, eps, true),
        None => nn.group_norm_act(x, name, groups, eps, NormAct { silu: true, over }),
    }
}

/// One norm's input over every tile's own pixels, turned into its statistics.
#[derive(Clone, Debug)]
pub struct Gather {
    norm: Norm,
    /// Per group: the shift (its first value seen), Σ(v − shift), Σ(v − shift)².
    sums: Vec<Option<(f32, f64, f64)>>,
    /// Values summed per group.
    count: u64,
}

impl Gather {
    pub fn new(norm: Norm) -> Self {
        Gather {
            norm,
            sums: vec![None; norm.groups],
            count: 0,
        }
    }

    /// Adds the pixels `rows` x `cols` of one tile's collected input `[C][h][w]`
    /// (`size` is `[w, h]`): the pixels the tile owns.
    pub fn add(
        &mut self,
        values: &[f32],
        size: [usize; 2],
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) -> Result<()> {
        let [w, h] = size;
        let c = self.norm.channels;
        if values.len() != c * w * h || rows.end > h || cols.end > w {
            return Err(Error::Ggml(format!(
                "{} GroupNorm input values for {c}x{h}x{w}, rows {rows:?}, columns {cols:?}",
                values.len()
            )));
        }
        if rows.is_empty() || cols.is_empty() {
            return Ok(());
        }
        let per = c / self.norm.groups;
        for (g, acc) in self.sums.iter_mut().enumerate() {
            let plane = |ch: usize| &values[ch * w * h..(ch + 1) * w * h];
            let k = acc.map_or(plane(g * per)[rows.start * w + cols.start], |a| a.0);
            // Eight f64 lanes: the sums' order does not matter at f64's precision (see
            // the module), and independent lanes keep the loop off the adder's latency.
            const LANES: usize = 8;
            let (mut a, mut a2) = ([0f64; LANES], [0f64; LANES]);
            for ch in g * per..(g + 1) * per {
                let p = plane(ch);
                for y in rows.clone() {
                    let row = &p[y * w + cols.start..y * w + cols.end];
                    let mut lanes = row.chunks_exact(LANES);
                    for c in &mut lanes {
                        for i in 0..LANES {
                            let d = c[i] as f64 - k as f64;
                            a[i] += d;
                            a2[i] += d * d;
                        }
                    }
                    for &v in lanes.remainder() {
                        let d = v as f64 - k as f64;
                        a[0] += d;
                        a2[0] += d * d;
                    }
                }
            }
            let (s, s2): (f64, f64) = (a.iter().sum(), a2.iter().sum());
            let (_, a, b) = acc.unwrap_or((k, 0.0, 0.0));
            *acc = Some((k, a + s, b + s2));
        }
        self.count += (per * rows.len() * cols.len()) as u64;
        Ok(())
    }

    /// The `[1, 1, C, 2]` statistics input ([`stats_name`]): each channel's group
    /// mean, then reciprocal standard deviation, the variance biased as GroupNorm's.
    pub fn finish(&self) -> Vec<f32> {
        let c = self.norm.channels;
        let per = c / self.norm.groups;
        let n = self.count.max(1) as f64;
        let mut out = vec![0f32; 2 * c];
        for (g, acc) in self.sums.iter().enumerate() {
            let (k, s, s2) = acc.unwrap_or((0.0, 0.0, 0.0));
            let shifted = s / n;
            let var = (s2 / n - shifted * shifted).max(0.0);
            let (mean, rstd) = ggml::group_norm_statistics(shifted + k as f64, var, self.norm.eps);
            out[g * per..(g + 1) * per].fill(mean);
            out[c + g * per..c + (g + 1) * per].fill(rstd);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_statistics_are_those_of_the_group_over_all_tiles() {
        // Two channels in one group, 2x2 pixels each, gathered from two tiles that own
        // one row each; offset far from zero (a large mean costs no precision).
        let norm = Norm {
            channels: 2,
            groups: 1,
            eps: 0.0,
        };
        let values = [
            1000.25f32, 1000.5, 1000.75, 1001.0, 999.0, 999.5, 1002.0, 1003.25,
        ];
        let mut g = Gather::new(norm);
        g.add(&values, [2, 2], 0..1, 0..2).unwrap();
        g.add(&values, [2, 2], 1..2, 0..2).unwrap();
        let stats = g.finish();
        let all: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        let m = all.iter().sum::<f64>() / 8.0;
        let var = all.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 8.0;
        let (mean, rstd) = ggml::group_norm_statistics(m, var, 0.0);
        assert_eq!(stats, [mean, mean, rstd, rstd]);
        assert!((rstd as f64 - 1.0 / var.sqrt()).abs() < 1e-6 / var.sqrt());
        assert!(g.add(&values[..3], [2, 2], 0..1, 0..2).is_err());
    }
}
