//! GroupNorm with its per-channel scale and shift, and optionally SiLU after it, as
//! one ggml custom op.
//!
//! Why: ggml makes that four nodes (GROUP_NORM, MUL by γ, ADD of β, SILU), each a pass
//! over the activations and its own output tensor; at 512x512 the SD 1.5 VAE decode
//! spent 0.75 s in them (`sdrs bench --profile`, bf16 kernels), a tenth of the decode,
//! and they hold a second copy of the largest activations. This op reads each group
//! twice (its sums, then the output) and writes once, in place where the input is dead.
//!
//! The statistics are those of PyTorch's `GroupNorm` (biased variance, `eps` inside the
//! square root); sums are shifted by the group's first value and gathered in f64.
use std::ffi::{c_int, c_void};

use super::sys;

/// What the op needs besides its sources, kept alive by the context that built it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Params {
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
    /// The statistics come as a source (mean, then rstd, per channel).
    pub given: bool,
}

/// f64 lanes the sums are gathered in.
const LANES: usize = 8;

/// Σ(v − k) and Σ(v − k)² over `v`, every term in f64: exact to a few units of f64's
/// last place whatever the order, so that a caller summing the same values in another
/// order (a tile's rows, [`finish`]) rounds the statistics to the same f32 values, and
/// a large mean costs no precision.
#[inline(always)]
fn sums(v: &[f32], k: f32) -> (f64, f64) {
    let k = k as f64;
    let (mut a, mut a2) = ([0f64; LANES], [0f64; LANES]);
    let mut lanes = v.chunks_exact(LANES);
    for c in &mut lanes {
        for i in 0..LANES {
            let d = c[i] as f64 - k;
            a[i] += d;
            a2[i] += d * d;
        }
    }
    for &x in lanes.remainder() {
        let d = x as f64 - k;
        a[0] += d;
        a2[0] += d * d;
    }
    (a.iter().sum(), a2.iter().sum())
}

/// A group's f32 mean and reciprocal standard deviation, as PyTorch's GroupNorm
/// rounds them (biased variance, `eps` inside the square root): then one scale and one
/// shift per channel (`ComputeFusedParams` in ATen).
#[inline(always)]
fn statistics(v: &[f32], eps: f32) -> (f32, f32) {
    let n = v.len();
    let k = v[0];
    let (s, s2) = sums(v, k);
    // The variance of v − k is v's; its mean is v's less k.
    let shifted = s / n as f64;
    let var = (s2 / n as f64 - shifted * shifted).max(0.0);
    finish(shifted + k as f64, var, eps)
}

/// f32 (mean, rstd) from a group's f64 mean and variance, rounded as the op rounds
/// them: what a caller that gathers a group's sums itself hands to the op.
pub fn finish(mean: f64, var: f64, eps: f32) -> (f32, f32) {
    (mean as f32, 1.0 / (var as f32 + eps).sqrt())
}

/// `y = v·scale + shift`, then `y·sigmoid(y)` if `SILU`.
#[inline(always)]
fn act<const SILU: bool>(v: f32, scale: f32, shift: f32) -> f32 {
    let y = v * scale + shift;
    if SILU {
        y / (1.0 + super::attention::exp(-y))
    } else {
        y
    }
}

/// One group of one image: `src` and `dst` its `cg` channel planes of `plane` values
/// (the same memory when the op writes over its input), with each channel's (γ, β).
struct Group<'a> {
    src: *const f32,
    dst: *mut f32,
    cg: usize,
    plane: usize,
    affine: &'a [(f32, f32)],
    eps: f32,
    /// The group's (mean, rstd), when given.
    given: Option<(f32, f32)>,
}

#[inline(always)]
unsafe fn group<const SILU: bool>(g: &Group<'_>) {
    let Group {
        src,
        dst,
        cg,
        plane,
        affine,
        eps,
        given,
    } = *g;
    let (mean, rstd) = match given {
        Some(stats) => stats,
        None => {
            let v = std::slice::from_raw_parts(src, cg * plane);
            statistics(v, eps)
        }
    };
    for (c, &(g, beta)) in affine.iter().enumerate() {
        let scale = rstd * g;
        let shift = beta - scale * mean;
        let off = c * plane;
        if std::ptr::eq(src, dst) {
            let v = std::slice::from_raw_parts_mut(dst.add(off), plane);
            for x in v {
                *x = act::<SILU>(*x, scale, shift);
            }
        } else {
            let v = std::slice::from_raw_parts(src.add(off), plane);
            let o = std::slice::from_raw_parts_mut(dst.add(off), plane);
            for (o, &x) in o.iter_mut().zip(v) {
                *o = act::<SILU>(x, scale, shift);
            }
        }
    }
}

/// A group's kernel, compiled for one instruction set.
type GroupFn = unsafe fn(&Group<'_>);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn group_avx512<const SILU: bool>(g: &Group<'_>) {
    group::<SILU>(g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_avx2<const SILU: bool>(g: &Group<'_>) {
    group::<SILU>(g)
}

unsafe fn group_portable<const SILU: bool>(g: &Group<'_>) {
    group::<SILU>(g)
}

fn kernel<const SILU: bool>() -> GroupFn {
    match super::attention::kernel_variant() {
        #[cfg(target_arch = "x86_64")]
        "avx512" => group_avx512::<SILU>,
        #[cfg(target_arch = "x86_64")]
        "avx2" => group_avx2::<SILU>,
        _ => group_portable::<SILU>,
    }
}

/// # Safety
/// `x` and `dst` contiguous f32 `[W, H, C, N]` (the same tensor's data, or apart);
/// `gamma` and `beta` `C` f32 values; `stats`, if `p.given`, `2C` f32 values;
/// `p.groups` divides `C`. Writes the groups `ith` owns.
unsafe fn run(
    x: &sys::ggml_tensor,
    [gamma, beta, stats]: [*const f32; 3],
    dst: &sys::ggml_tensor,
    p: &Params,
    ith: usize,
    nth: usize,
) {
    let [w, h, c, n] = x.ne.map(|v| v as usize);
    let (plane, groups) = (w * h, p.groups);
    let cg = c / groups;
    let (src, out) = (x.data as *const f32, dst.data as *mut f32);
    let f = if p.silu {
        kernel::<true>()
    } else {
        kernel::<false>()
    };
    let jobs = n * groups;
    let stats = if p.given {
        Some(std::slice::from_raw_parts(stats, 2 * c))
    } else {
        None
    };
    let mut affine = vec![(0f32, 0f32); cg];
    for job in ith * jobs / nth..(ith + 1) * jobs / nth {
        let (b, g) = (job / groups, job % groups);
        for (i, a) in affine.iter_mut().enumerate() {
            *a = (*gamma.add(g * cg + i), *beta.add(g * cg + i));
        }
        let off = (b * c + g * cg) * plane;
        f(&Group {
            src: src.add(off),
            dst: out.add(off),
            cg,
            plane,
            affine: &affine,
            eps: p.eps,
            // A group's channels share its statistics: its first channel's.
            given: stats.map(|s| (s[g * cg], s[c + g * cg])),
        });
    }
}

/// The ggml callback; never unwinds into C (see `custom_op_body`).
pub(super) unsafe extern "C" fn group_norm_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    super::custom_op_body("group norm", "the norm's output is invalid", || {
        // SAFETY: ggml passes the node built by `Context::group_norm_act`: sources x,
        // γ, β (and the statistics where `given`) of the types and shapes checked there, a contiguous f32 destination of x's
        // shape (x itself when written over), and the `Params` its context keeps alive.
        unsafe {
            let t = &*dst;
            let p = &*(userdata as *const Params);
            run(
                &*t.src[0],
                [
                    (*t.src[1]).data as *const f32,
                    (*t.src[2]).data as *const f32,
                    if p.given {
                        (*t.src[3]).data as *const f32
                    } else {
                        std::ptr::null()
                    },
                ],
                t,
                p,
                ith.max(0) as usize,
                nth.max(1) as usize,
            );
        }
    });
}
