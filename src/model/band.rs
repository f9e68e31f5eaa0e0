//! A chain of convolution-and-GroupNorm units (a VAE decoder's upsampling half) run
//! in full-width horizontal bands, equal to the whole run to f32 rounding: every
//! GroupNorm takes the whole image's statistics ([`super::norms`]), and each band
//! computes a halo of rows beyond the rows it keeps, as wide as the convolutions
//! between its pass's start and end can carry a value (in pixels of the pass's input).
//! (Bit for bit before the VAE's 3x3 convolutions ran by Winograd's F(4x4, 3x3): its
//! 4x4 tiles fall differently in a band than in the whole image, and a tile's rows mix
//! in the rounding; 95.9 dB from the whole decode on the tiny reference VAE, and the
//! demo model's bytes unchanged.)
//!
//! A norm's statistics need its whole input before anything after it can run, so the
//! chain runs in passes. Each pass starts from a *checkpoint*, the whole input of one
//! unit kept in memory, and goes band by band either to a norm (gathering its input's
//! statistics) or through a unit to the next checkpoint (written whole) or to the
//! output. With every unit's input kept, a unit costs one pass per norm and one to its
//! output (the pass to a resnet's second norm repeats its first convolution): SD's VAE
//! decodes in about twice its whole time, halos included. Where the memory allowed for
//! checkpoints is too small to keep one, later passes start further back and repeat
//! more: the fewer kept, the slower, never less exact.
use crate::error::{Error, Result};
use crate::ggml::{Backend, Context, Tensor, Type};

use super::nn::{Nn, Program};
use super::norms::{self, Gather, Norm, SharedNorms};
use super::tile::{Tick, Tiling};
use super::Weights;

/// Builds unit `i` of a chain over its input, its GroupNorms through `shared`.
pub type BuildUnit<'a> =
    &'a dyn for<'c> Fn(&Nn<'c>, Tensor<'c>, usize, &SharedNorms) -> Result<Tensor<'c>>;

/// `f` as a [`BuildUnit`] (a closure's signature is only generic over the graph's
/// lifetime when a bound says so).
pub fn units<F>(f: F) -> F
where
    F: for<'c> Fn(&Nn<'c>, Tensor<'c>, usize, &SharedNorms) -> Result<Tensor<'c>>,
{
    f
}

/// A chain of units, each mapping one tensor `[W, H, C, 1]` to the next.
#[derive(Clone, Copy)]
pub struct Chain<'a, 'w> {
    pub weights: &'a Weights<'w>,
    /// The most tensor objects one pass's graph holds.
    pub max_tensors: usize,
    /// Channels of the chain's input (at one pixel per latent).
    pub c_in: usize,
    /// How far each unit carries a value, in its input's pixels (one per 3x3
    /// convolution at that resolution, one for a convolution after a 2x upsampling).
    pub reach: &'a [usize],
    pub build: BuildUnit<'a>,
}

/// What the chain looks like: each unit's input (channels, pixels per latent) and
/// norms, and the output.
#[derive(Clone, Debug, PartialEq)]
struct Layout {
    /// Per unit: (channels, pixels per latent) of its input.
    inputs: Vec<(usize, usize)>,
    /// Per unit: the global indices of its norms.
    norms: Vec<std::ops::Range<usize>>,
    all_norms: Vec<Norm>,
    /// Channels and pixels per latent of the output.
    output: (usize, usize),
}

impl Layout {
    /// Bytes of unit `u`'s whole input for a `lw`x`lh` latent.
    fn bytes(&self, u: usize, lw: usize, lh: usize) -> u64 {
        let (c, f) = self.inputs[u];
        4 * (c * lw * f * lh * f) as u64
    }
}

/// Latents a probe build uses to read the chain's resolutions.
const PROBE: usize = 8;

impl Chain<'_, '_> {
    fn layout(&self) -> Result<Layout> {
        let units = self.reach.len();
        let ctx = Context::new(self.max_tensors)?;
        let nn = Nn::new(&ctx, self.weights);
        let mut x = ctx.tensor(Type::F32, &[PROBE, PROBE, self.c_in, 1], "band.probe")?;
        let shared = SharedNorms::new(None);
        let (mut inputs, mut norms) = (Vec::with_capacity(units), Vec::with_capacity(units));
        let res = |t: Tensor<'_>| -> Result<(usize, usize)> {
            let [w, h, c, n] = t.ne();
            if n != 1 || w % PROBE != 0 || w != h {
                return Err(Error::Ggml(format!(
                    "a banded chain's unit works on {w}x{h}x{c}x{n}, not whole pixels per latent"
                )));
            }
            Ok((c, w / PROBE))
        };
        for i in 0..units {
            inputs.push(res(x)?);
            let before = shared.norms().len();
            x = (self.build)(&nn, x, i, &shared)?;
            norms.push(before..shared.norms().len());
        }
        Ok(Layout {
            inputs,
            norms,
            all_norms: shared.norms(),
            output: res(x)?,
        })
    }
}

/// One pass over the bands.
#[derive(Clone, Debug, PartialEq)]
struct Pass {
    /// The checkpoint it starts from (the input of this unit).
    from: usize,
    /// The last unit it builds.
    to: usize,
    /// The norm whose sums it gathers; else it writes `to`'s whole output.
    collect: Option<usize>,
    /// Rows each band computes beyond the rows it keeps, in pixels of the pass's
    /// input (its own resolution, so that a pass at 8 pixels per latent pays two rows
    /// per 3x3 pair, not a latent's eight).
    halo: usize,
}

/// The passes of one banded run, and the checkpoints they keep.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    layout: Layout,
    passes: Vec<Pass>,
    /// The band's height in latents, halos included (at most the image's).
    band: usize,
    lw: usize,
    lh: usize,
    /// The room for checkpoints it was made for.
    pub keep: u64,
    /// The most bytes of checkpoints held at once.
    pub kept_bytes: u64,
}

impl Schedule {
    /// The passes for a `lw`x`lh` latent in bands `band` latents high, keeping a
    /// unit's input whole wherever it and the checkpoint it is made from fit in `keep`
    /// bytes together (the chain's input is always kept: the caller holds it).
    pub fn new(
        chain: &Chain<'_, '_>,
        lw: usize,
        lh: usize,
        band: usize,
        keep: u64,
    ) -> Result<Self> {
        Ok(Self::laid_out(
            chain.layout()?,
            chain.reach,
            lw,
            lh,
            band,
            keep,
        ))
    }

    /// The distinct schedules for bands of each of `bands` latents and every room for
    /// checkpoints that changes what is kept.
    pub fn options(
        chain: &Chain<'_, '_>,
        lw: usize,
        lh: usize,
        bands: &[usize],
    ) -> Result<Vec<Self>> {
        let layout = chain.layout()?;
        let bytes: Vec<u64> = (1..layout.inputs.len())
            .map(|u| layout.bytes(u, lw, lh))
            .collect();
        let mut keeps: Vec<u64> = bytes
            .iter()
            .enumerate()
            .flat_map(|(i, &a)| bytes[i..].iter().map(move |&b| a + b).chain([a]))
            .chain([0])
            .collect();
        keeps.sort_unstable();
        keeps.dedup();
        let mut all: Vec<Self> = Vec::new();
        for &band in bands {
            for &keep in &keeps {
                let s = Self::laid_out(layout.clone(), chain.reach, lw, lh, band, keep);
                if !all.iter().any(|o| o.band == s.band && o.passes == s.passes) {
                    all.push(s);
                }
            }
        }
        Ok(all)
    }

    fn laid_out(
        layout: Layout,
        reach: &[usize],
        lw: usize,
        lh: usize,
        band: usize,
        keep: u64,
    ) -> Self {
        let units = layout.inputs.len();
        let bytes = |u: usize| layout.bytes(u, lw, lh);
        let halo = |from: usize, to: usize| -> usize {
            // Each unit's reach in the pass input's pixels, rounded up once over the
            // whole span (a unit at a finer resolution reaches fewer of them).
            let f = layout.inputs[from].1 as f64;
            let px: f64 = (from..=to)
                .map(|i| reach[i] as f64 * f / layout.inputs[i].1 as f64)
                .sum();
            px.ceil() as usize
        };
        let (mut passes, mut from, mut kept_bytes) = (Vec::new(), 0, 0u64);
        for u in 0..units {
            for k in layout.norms[u].clone() {
                passes.push(Pass {
                    from,
                    to: u,
                    collect: Some(k),
                    halo: halo(from, u),
                });
            }
            let next = u + 1;
            let last = next == units;
            let both = if from == 0 { 0 } else { bytes(from) } + if last { 0 } else { bytes(next) };
            if last || both <= keep {
                passes.push(Pass {
                    from,
                    to: u,
                    collect: None,
                    halo: halo(from, u),
                });
                if !last {
                    kept_bytes = kept_bytes.max(both);
                    from = next;
                }
            }
        }
        Schedule {
            layout,
            passes,
            band: band.clamp(1, lh),
            lw,
            lh,
            keep,
            kept_bytes,
        }
    }

    /// The band's height in latents (halos included).
    pub fn band(&self) -> usize {
        self.band
    }

    /// Pixels per latent at pass `p`'s input.
    fn scale(&self, p: &Pass) -> usize {
        self.layout.inputs[p.from].1
    }

    /// Band rows pass `p` computes, in pixels of its input: the schedule's band, or
    /// more where its halos leave too few rows to keep.
    fn rows(&self, p: &Pass) -> usize {
        let f = self.scale(p);
        (self.band * f).max(2 * p.halo + MIN_KEPT).min(self.lh * f)
    }

    /// Where pass `p`'s bands start, in pixels of its input.
    fn starts(&self, p: &Pass) -> Vec<usize> {
        Tiling::starts(self.lh * self.scale(p), self.rows(p), 2 * p.halo)
    }

    /// The run's work relative to one whole run of the chain: each pass's units
    /// weighted by their products (input channels x output channels x output pixels,
    /// as a 3x3 convolution's), times the rows its bands compute over the image's.
    pub fn work(&self) -> f64 {
        let units = self.layout.inputs.len();
        let cost = |u: usize| -> f64 {
            let (c, _) = self.layout.inputs[u];
            let (oc, of) = if u + 1 == units {
                self.layout.output
            } else {
                self.layout.inputs[u + 1]
            };
            (c * oc * of * of) as f64
        };
        let whole: f64 = (0..units).map(cost).sum();
        let run: f64 = self
            .passes
            .iter()
            .map(|p| {
                let rows = self.starts(p).len() * self.rows(p) / self.scale(p);
                // A pass to a unit's norm runs that unit only so far: as a share of
                // the unit, the norms before it over all of its norms.
                let share = match p.collect {
                    Some(k) => {
                        let n = &self.layout.norms[p.to];
                        (k - n.start) as f64 / n.len() as f64
                    }
                    None => 1.0,
                };
                let units: f64 = (p.from..p.to).map(cost).sum::<f64>() + share * cost(p.to);
                units * rows as f64 / self.lh as f64
            })
            .sum();
        run / whole
    }

    /// Passes over the bands, each its band count (for progress).
    pub fn band_runs(&self) -> usize {
        self.passes.iter().map(|p| self.starts(p).len()).sum()
    }
}

/// Rows (pixels of a pass's input) a band keeps at least, halos aside.
const MIN_KEPT: usize = 4;

/// The graph of pass `p` over one band: the input of the norm it collects, else its
/// last unit's output.
fn build_pass<'c>(
    chain: &Chain<'_, '_>,
    p: &Pass,
    nn: &Nn<'c>,
    x: Tensor<'c>,
    shared: &SharedNorms,
) -> Result<Tensor<'c>> {
    let mut x = x;
    for u in p.from..=p.to {
        x = (chain.build)(nn, x, u, shared)?;
    }
    match p.collect {
        Some(k) => nn
            .ctx
            .get(norms::COLLECTED)
            .ok_or_else(|| Error::Ggml(format!("a band pass collected no norm {k}"))),
        None => Ok(x),
    }
}

/// The input shape of pass `p`'s graph, and its norms.
fn pass_graph(s: &Schedule, p: &Pass) -> ([usize; 4], SharedNorms) {
    let (c, f) = s.layout.inputs[p.from];
    let shared = SharedNorms::starting_at(s.layout.norms[p.from].start, p.collect);
    ([s.lw * f, s.rows(p), c, 1], shared)
}

/// Compute buffers of band passes already measured, by span, output and rows.
#[derive(Default)]
pub struct Measured(std::collections::HashMap<(usize, usize, bool, usize), usize>);

/// The most one of `s`'s passes holds at once: its compute buffer (found without
/// allocating it), its band's input and the copy of its output.
pub fn measure(chain: &Chain<'_, '_>, s: &Schedule, known: &mut Measured) -> Result<usize> {
    let mut most = 0;
    for p in &s.passes {
        // Passes to different norms of one span differ only in what they output.
        let key = (p.from, p.to, p.collect.is_some(), s.rows(p));
        let bytes = match known.0.get(&key) {
            Some(&b) => b,
            None => {
                let (ne, shared) = pass_graph(s, p);
                let (buffer, out) =
                    Program::measure_output(chain.weights, ne, chain.max_tensors, |nn, x| {
                        build_pass(chain, p, nn, x, &shared)
                    })?;
                // The band's input and its output's copy live on the host beside it.
                let b = buffer + 4 * (ne.iter().product::<usize>() + out);
                log::debug!(
                    "band pass over units {}..={} ({}): {} rows, halo {}, buffer {} MiB",
                    p.from,
                    p.to,
                    if p.collect.is_some() {
                        "sums"
                    } else {
                        "output"
                    },
                    s.rows(p),
                    p.halo,
                    b >> 20
                );
                known.0.insert(key, b);
                b
            }
        };
        most = most.max(bytes);
    }
    Ok(most)
}

/// Runs `s` over one image's chain input `[c_in][lh][lw]`: the output
/// `[c_out][lh·f][lw·f]`, equal to the whole chain's.
pub fn run(
    chain: &Chain<'_, '_>,
    s: &Schedule,
    input: &[f32],
    backend: &Backend,
    tick: Tick<'_>,
) -> Result<Vec<f32>> {
    let (lw, lh) = (s.lw, s.lh);
    if input.len() != chain.c_in * lw * lh {
        return Err(Error::Invalid(format!(
            "{} values for a {}x{lh}x{lw} chain input",
            input.len(),
            chain.c_in
        )));
    }
    let mut stats: Vec<Option<Vec<f32>>> = vec![None; s.layout.all_norms.len()];
    // The checkpoint passes start from: (unit, values). The chain's input is borrowed.
    let mut kept: Option<(usize, Vec<f32>)> = None;
    let (mut done, total) = (0, s.band_runs());
    for p in &s.passes {
        let clock = std::time::Instant::now();
        let (c, f) = s.layout.inputs[p.from];
        let start: &[f32] = match &kept {
            Some((u, v)) if *u == p.from => v,
            _ if p.from == 0 => input,
            _ => {
                return Err(Error::Ggml(format!(
                    "banded run: no checkpoint at unit {}",
                    p.from
                )))
            }
        };
        // Rows and bands in pixels of the pass's input.
        let (rows, starts) = (s.rows(p), s.starts(p));
        let (iw, ih) = (lw * f, lh * f);
        let inputs: Vec<(String, Vec<f32>)> = stats
            .iter()
            .enumerate()
            .skip(s.layout.norms[p.from].start)
            .filter_map(|(i, st)| st.as_ref().map(|st| (norms::stats_name(i), st.clone())))
            .collect();
        let refs: Vec<(&str, &[f32])> = inputs
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        let (ne, shared) = pass_graph(s, p);
        let prog = Program::new(chain.weights, ne, chain.max_tensors, |nn, x| {
            build_pass(chain, p, nn, x, &shared)
        })?;
        let (oc, of) = match p.collect {
            Some(_) => (0, f),
            None if p.to + 1 == s.layout.inputs.len() => s.layout.output,
            None => s.layout.inputs[p.to + 1],
        };
        // Output pixels per input pixel (the resolutions are whole multiples).
        let r = of / f;
        let mut out = match p.collect {
            Some(_) => Vec::new(),
            None => vec![0f32; oc * lw * of * lh * of],
        };
        let mut gather = p.collect.map(|k| Gather::new(s.layout.all_norms[k]));
        let mut band = vec![0f32; c * iw * rows];
        for (j, &y0) in starts.iter().enumerate() {
            let (a, b) = Tiling::owned(&starts, j, rows, ih);
            // The band's input rows, every channel.
            for ch in 0..c {
                let from = (ch * ih + y0) * iw;
                band[ch * rows * iw..][..rows * iw].copy_from_slice(&start[from..from + rows * iw]);
            }
            let got = prog.run_with(&band, &refs, backend)?;
            done += 1;
            tick(done, total)?;
            match &mut gather {
                Some(g) => {
                    // The rows the band keeps, at the norm's resolution.
                    let [mw, mh] = shared
                        .collected()
                        .ok_or_else(|| Error::Ggml("a band pass collected no norm".into()))?;
                    let fy = mh / rows;
                    g.add(&got, [mw, mh], (a - y0) * fy..(b - y0) * fy, 0..mw)?;
                }
                None => {
                    let (ow, bh) = (lw * of, rows * r);
                    if got.len() != oc * ow * bh {
                        return Err(Error::Ggml(format!(
                            "a band gave {} values, not {oc}x{bh}x{ow}",
                            got.len()
                        )));
                    }
                    let (ra, rb) = ((a - y0) * r, (b - y0) * r);
                    for ch in 0..oc {
                        let to = (ch * lh * of + a * r) * ow;
                        out[to..to + (rb - ra) * ow]
                            .copy_from_slice(&got[(ch * bh + ra) * ow..(ch * bh + rb) * ow]);
                    }
                }
            }
        }
        log::debug!(
            "band pass over units {}..={} ({}): {} bands of {} rows, {:.2} s",
            p.from,
            p.to,
            if p.collect.is_some() {
                "statistics"
            } else {
                "output"
            },
            starts.len(),
            rows,
            clock.elapsed().as_secs_f64()
        );
        match (p.collect, gather) {
            (Some(k), Some(g)) => stats[k] = Some(g.finish()),
            _ if p.to + 1 == s.layout.inputs.len() => return Ok(out),
            _ => kept = Some((p.to + 1, out)),
        }
    }
    Err(Error::Ggml(
        "banded run: the schedule has no output pass".into(),
    ))
}
