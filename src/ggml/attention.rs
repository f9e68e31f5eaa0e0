//! sdrs' own attention kernel, a ggml custom op: softmax(q kᵀ · scale) v for any head
//! size, without a score matrix.
//!
//! Why: at SD 1.5's first level (4096 tokens, head size 40) ggml's `flash_attn_ext`
//! reaches ~50 GFLOP/s on 2 Zen 4 / Xeon cores and the matrix form less (see
//! `shared/baselines/kernels.md`); attention was a quarter of a 512x512 UNet step.
//!
//! How (FlashAttention's tiling and online softmax, Dao et al. 2022, on a CPU): for
//! each head, keys are packed transposed (`[D][Nk]`) and values row-major with the
//! head size padded to a multiple of 16; a tile of 6 queries runs over blocks of 64
//! keys: scores in register accumulators (one broadcast query value against vectors
//! of keys per step of the head dimension), a running max and sum per query rescale
//! the output, and the probabilities multiply the values in register-sized chunks of
//! lanes. A thread's unit of 64 queries takes the keys in passes of ~256 KB of packed
//! keys and values, every tile of the unit over one pass before the next, its running
//! softmax kept between passes, so a wide head's keys come from cache. The AVX-512,
//! AVX2+FMA and NEON tiles are written in intrinsics, each sized
//! to its register file; the portable tile, plain Rust over fixed-size arrays, serves
//! x86-64 CPUs without AVX2 (SSE2). The variant is chosen at run
//! time, so one binary runs everywhere.
// The tile loops index several fixed-size arrays with one counter each, the form the
// compiler unrolls into registers; iterator chains over zipped rows would hide that.
#![allow(clippy::needless_range_loop)]
use std::ffi::{c_int, c_void};
use std::ops::Range;

use super::sys;

/// Queries per tile.
const R: usize = 6;
/// Keys per block.
const KB: usize = 64;
/// Head sizes are padded to multiples of this (one AVX-512 vector of f32).
const LANES: usize = 16;
/// Queries per unit of work handed to a thread.
const UNIT_ROWS: usize = 64;

/// `exp` for the softmax: Cody–Waite range reduction to |r| ≤ ln2/2 and a degree-6
/// Taylor polynomial (relative error ~2e-7), written so that it vectorises (no
/// library call, no branch): rounding by the 1.5·2²³ trick, the power of two built
/// in the exponent bits. Below -87 the result is 0 (masked keys are −∞).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let k = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let y = p * f32::from_bits(((k as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// `a * b + c`, fused where the compiled variant has FMA.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// One head's keys and values, packed.
struct Head<'a> {
    /// Keys transposed in blocks of 64 (`[nkp/64][d][64]`: one block's keys are one
    /// contiguous run, which the hardware prefetcher streams), zero beyond `nk`.
    kt: &'a [f32],
    /// `[nkp][dp]`: values, head size padded with zeros.
    v: &'a [f32],
    d: usize,
    dp: usize,
    nk: usize,
}

/// Attention of `R` queries (`q` `[R][d]`, already scaled) over a head; writes the
/// normalised outputs to `out` `[R][dp]`.
#[inline(always)]
fn tile<const FMA: bool>(
    h: &Head<'_>,
    q: &[f32],
    out: &mut [f32],
    st: &mut Online,
    keys: Range<usize>,
) {
    let (d, dp) = (h.d, h.dp);
    let Online { m, l } = st;
    let mut p = [[0f32; KB]; R];
    let mut j0 = keys.start;
    while j0 < keys.end {
        let mut s = [[0f32; KB]; R];
        for dd in 0..d {
            let krow: &[f32; KB] = h.kt[j0 * d + dd * KB..][..KB]
                .try_into()
                .unwrap_or(&[0.0; KB]);
            for r in 0..R {
                let qv = q[r * d + dd];
                for j in 0..KB {
                    s[r][j] = madd::<FMA>(qv, krow[j], s[r][j]);
                }
            }
        }
        let valid = (h.nk - j0).min(KB);
        for r in 0..R {
            for x in s[r][valid..].iter_mut() {
                *x = f32::NEG_INFINITY;
            }
            let mx = s[r].iter().fold(m[r], |a, &b| a.max(b));
            let corr = exp(m[r] - mx);
            let mut sum = 0.0;
            for j in 0..KB {
                let e = exp(s[r][j] - mx);
                p[r][j] = e;
                sum += e;
            }
            l[r] = l[r] * corr + sum;
            m[r] = mx;
            for x in out[r * dp..(r + 1) * dp].iter_mut() {
                *x *= corr;
            }
        }
        let mut c0 = 0;
        while c0 < dp {
            let cw = match dp - c0 {
                n if n >= 3 * LANES => 3 * LANES,
                n if n >= 2 * LANES => 2 * LANES,
                _ => LANES,
            };
            match cw {
                48 => pv::<FMA, 48>(h, &p, j0, valid, c0, out),
                32 => pv::<FMA, 32>(h, &p, j0, valid, c0, out),
                _ => pv::<FMA, 16>(h, &p, j0, valid, c0, out),
            }
            c0 += cw;
        }
        j0 += KB;
    }
}

/// A tile's running softmax: per query, the largest score so far and the sum of the
/// exponentials taken against it.
struct Online {
    m: [f32; R],
    l: [f32; R],
}

impl Online {
    fn new() -> Self {
        Online {
            m: [f32::NEG_INFINITY; R],
            l: [0.0; R],
        }
    }
}

/// Divides each query's output row (`out` `[R][dp]`) by its softmax sum.
#[inline(always)]
fn normalise(out: &mut [f32], l: &[f32; R], dp: usize) {
    for (row, l) in out.chunks_exact_mut(dp).zip(l) {
        let inv = 1.0 / l;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// `out[r][c0..c0+CW] += Σ_j p[r][j] · v[j0+j][c0..c0+CW]`, accumulated in registers.
#[inline(always)]
fn pv<const FMA: bool, const CW: usize>(
    h: &Head<'_>,
    p: &[[f32; KB]; R],
    j0: usize,
    valid: usize,
    c0: usize,
    out: &mut [f32],
) {
    let dp = h.dp;
    let mut acc = [[0f32; CW]; R];
    for r in 0..R {
        acc[r].copy_from_slice(&out[r * dp + c0..][..CW]);
    }
    for j in 0..valid {
        let vrow: &[f32; CW] = h.v[(j0 + j) * dp + c0..][..CW]
            .try_into()
            .unwrap_or(&[0.0; CW]);
        for r in 0..R {
            let pj = p[r][j];
            for c in 0..CW {
                acc[r][c] = madd::<FMA>(pj, vrow[c], acc[r][c]);
            }
        }
    }
    for r in 0..R {
        out[r * dp + c0..][..CW].copy_from_slice(&acc[r]);
    }
}

/// A strided f32 tensor as ggml describes it (element `[i0, i1, i2, i3]` at byte
/// `Σ i·nb`).
#[derive(Clone, Copy)]
struct View {
    data: *const u8,
    ne: [usize; 4],
    nb: [usize; 4],
}

impl View {
    /// # Safety
    /// `t` must be a live f32 tensor with data.
    unsafe fn of(t: *const sys::ggml_tensor) -> View {
        let t = &*t;
        View {
            data: t.data as *const u8,
            ne: t.ne.map(|n| n as usize),
            nb: t.nb,
        }
    }

    /// # Safety
    /// Indexes within `ne`.
    #[inline(always)]
    unsafe fn at(&self, i0: usize, i1: usize, i2: usize, i3: usize) -> f32 {
        self.data
            .add(i0 * self.nb[0] + i1 * self.nb[1] + i2 * self.nb[2] + i3 * self.nb[3])
            .cast::<f32>()
            .read_unaligned()
    }
}

/// One attention op: its operands, the scale and the kernel variant that runs it.
struct Job {
    /// `[D, Nq, H, B]`.
    q: View,
    /// `[D, Nk, H, B]`, both.
    k: View,
    v: View,
    /// A contiguous f32 tensor `[D*H, Nq, B]`.
    dst: *mut f32,
    scale: f32,
    tile: TileFn,
}

/// The work of thread `ith` of `nth`: units of (batch, head, 64 queries), a contiguous
/// share of them, packing a head's keys and values when the unit's head changes.
///
/// # Safety
/// The job's views are live f32 tensors of the shapes its fields give (any strides),
/// and only this call's units write `dst`'s rows it owns.
unsafe fn run(job: &Job, ith: usize, nth: usize) {
    let Job {
        q,
        k,
        v,
        dst,
        scale,
        tile,
    } = *job;
    let [d, nq, heads, batch] = q.ne;
    let nk = k.ne[1];
    let dp = d.next_multiple_of(LANES);
    let nkp = nk.next_multiple_of(KB);
    let per_head = nq.div_ceil(UNIT_ROWS);
    let units = batch * heads * per_head;
    let (first, last) = (ith * units / nth, (ith + 1) * units / nth);
    let mut kt = vec![0f32; d * nkp];
    let mut vp = vec![0f32; nkp * dp];
    let unit_tiles = UNIT_ROWS.div_ceil(R);
    let mut qt = vec![0f32; unit_tiles * R * d];
    let mut out = vec![0f32; unit_tiles * R * dp];
    let mut online: Vec<Online> = (0..unit_tiles).map(|_| Online::new()).collect();
    // Keys per pass: their packed keys and values within ~256 KB (of a core's L2).
    let pass = ((256 << 10) / (4 * (d + dp))).max(KB) / KB * KB;
    let mut packed = None;
    for unit in first..last {
        let (bh, chunk) = (unit / per_head, unit % per_head);
        let (b, hd) = (bh / heads, bh % heads);
        if packed != Some(bh) {
            for j in 0..nk {
                for dd in 0..d {
                    kt[(j / KB) * d * KB + dd * KB + j % KB] = k.at(dd, j, hd, b);
                    vp[j * dp + dd] = v.at(dd, j, hd, b);
                }
            }
            packed = Some(bh);
        }
        let head = Head {
            kt: &kt,
            v: &vp,
            d,
            dp,
            nk,
        };
        let rows = chunk * UNIT_ROWS..((chunk + 1) * UNIT_ROWS).min(nq);
        let tiles = rows.len().div_ceil(R);
        for (t, qt) in qt.chunks_exact_mut(R * d).take(tiles).enumerate() {
            for r in 0..R {
                let i = rows.start + t * R + r;
                for dd in 0..d {
                    qt[r * d + dd] = if i < rows.end {
                        q.at(dd, i, hd, b) * scale
                    } else {
                        0.0
                    };
                }
            }
        }
        out.fill(0.0);
        online.fill_with(Online::new);
        // Key blocks outermost: a pass's keys and values are read from cache by every
        // tile of the unit. Tile by tile over all keys, a head of 512 (the VAE's) read
        // 16 MB from memory per 6 queries and ran at 22 GFLOP/s on AVX2.
        let mut keys = 0..0;
        while keys.end < nk {
            keys = keys.end..(keys.end + pass).min(nk);
            for t in 0..tiles {
                tile(
                    &head,
                    &qt[t * R * d..][..R * d],
                    &mut out[t * R * dp..][..R * dp],
                    &mut online[t],
                    keys.clone(),
                );
            }
        }
        for t in 0..tiles {
            let out = &mut out[t * R * dp..][..R * dp];
            normalise(out, &online[t].l, dp);
            for r in 0..R.min(rows.end - (rows.start + t * R)) {
                // dst[(b*Nq + i)*H + h][d]
                let row = dst.add(((b * nq + rows.start + t * R + r) * heads + hd) * d);
                std::ptr::copy_nonoverlapping(out[r * dp..].as_ptr(), row, d);
            }
        }
    }
}

/// Attention of one tile of queries over a packed head (see [`tile`]).
type TileFn = unsafe fn(&Head<'_>, &[f32], &mut [f32], &mut Online, Range<usize>);

unsafe fn tile_portable(
    h: &Head<'_>,
    q: &[f32],
    out: &mut [f32],
    st: &mut Online,
    keys: Range<usize>,
) {
    // aarch64's baseline (NEON) has fused multiply-add; x86-64's (SSE2) does not.
    tile::<{ cfg!(target_arch = "aarch64") }>(h, q, out, st, keys)
}

/// The AVX-512 tile, in intrinsics: the portable code's arrays do not all stay in
/// registers, and its softmax does not vectorise.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Head, Online, Range, KB, LANES, R};

    /// [`super::exp`] on 16 lanes, with `vscalefps` for the power of two.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let xc = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
            _mm512_set1_ps(88.0),
        );
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_145_75), xc);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_scalef_ps(p, k);
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-87.0));
        _mm512_mask_blend_ps(below, y, _mm512_setzero_ps())
    }

    /// `out[r][c0..c0+16N] = corr[r]·out[r][..] + Σ_j p[r][j] · v[j0+j][..]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv<const N: usize>(
        h: &Head<'_>,
        p: &[[f32; KB]; R],
        corr: &[f32; R],
        j0: usize,
        valid: usize,
        c0: usize,
        out: &mut [f32],
    ) {
        let dp = h.dp;
        let o = out.as_mut_ptr();
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        for r in 0..R {
            for c in 0..N {
                acc[r][c] = _mm512_mul_ps(
                    _mm512_loadu_ps(o.add(r * dp + c0 + c * LANES)),
                    _mm512_set1_ps(corr[r]),
                );
            }
        }
        let v = h.v.as_ptr().add(j0 * dp + c0);
        for j in 0..valid {
            let mut row = [_mm512_setzero_ps(); N];
            for c in 0..N {
                row[c] = _mm512_loadu_ps(v.add(j * dp + c * LANES));
            }
            for r in 0..R {
                let pj = _mm512_set1_ps(p[r][j]);
                for c in 0..N {
                    acc[r][c] = _mm512_fmadd_ps(pj, row[c], acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..N {
                _mm512_storeu_ps(o.add(r * dp + c0 + c * LANES), acc[r][c]);
            }
        }
    }

    /// # Safety
    /// `h`'s buffers hold `d × nkp` keys and `nkp × dp` values (nkp a multiple of 64,
    /// dp of 16); `q` holds `R × d`, `out` `R × dp` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        h: &Head<'_>,
        q: &[f32],
        out: &mut [f32],
        st: &mut Online,
        keys: Range<usize>,
    ) {
        let (d, dp) = (h.d, h.dp);
        let Online { m, l } = st;
        let mut p = [[0f32; KB]; R];
        let (kt, qp) = (h.kt.as_ptr(), q.as_ptr());
        let mut j0 = keys.start;
        while j0 < keys.end {
            let mut s = [[_mm512_setzero_ps(); 4]; R];
            for dd in 0..d {
                let kp = kt.add(j0 * d + dd * KB);
                let kv = [
                    _mm512_loadu_ps(kp),
                    _mm512_loadu_ps(kp.add(16)),
                    _mm512_loadu_ps(kp.add(32)),
                    _mm512_loadu_ps(kp.add(48)),
                ];
                for r in 0..R {
                    let qb = _mm512_set1_ps(*qp.add(r * d + dd));
                    for c in 0..4 {
                        s[r][c] = _mm512_fmadd_ps(qb, kv[c], s[r][c]);
                    }
                }
            }
            let valid = (h.nk - j0).min(KB);
            let mut corr = [0f32; R];
            for r in 0..R {
                if valid < KB {
                    for c in 0..4 {
                        let keep = valid.saturating_sub(c * LANES).min(LANES);
                        let mask: __mmask16 = if keep == LANES {
                            0xFFFF
                        } else {
                            ((1u32 << keep) - 1) as u16
                        };
                        s[r][c] =
                            _mm512_mask_blend_ps(mask, _mm512_set1_ps(f32::NEG_INFINITY), s[r][c]);
                    }
                }
                let top = _mm512_reduce_max_ps(_mm512_max_ps(
                    _mm512_max_ps(s[r][0], s[r][1]),
                    _mm512_max_ps(s[r][2], s[r][3]),
                ));
                let mx = m[r].max(top);
                corr[r] = super::exp(m[r] - mx);
                let mb = _mm512_set1_ps(mx);
                let mut sum = _mm512_setzero_ps();
                for c in 0..4 {
                    let e = exp(_mm512_sub_ps(s[r][c], mb));
                    sum = _mm512_add_ps(sum, e);
                    _mm512_storeu_ps(p[r].as_mut_ptr().add(c * LANES), e);
                }
                l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(sum);
                m[r] = mx;
            }
            let mut c0 = 0;
            while c0 < dp {
                let n = ((dp - c0) / LANES).min(3);
                match n {
                    3 => pv::<3>(h, &p, &corr, j0, valid, c0, out),
                    2 => pv::<2>(h, &p, &corr, j0, valid, c0, out),
                    _ => pv::<1>(h, &p, &corr, j0, valid, c0, out),
                }
                c0 += n.max(1) * LANES;
            }
            j0 += KB;
        }
    }
}

/// The AVX2 tile, in intrinsics. With 16 registers of 8 lanes the portable code's
/// 6x64 score block spills on every step (8 GFLOP/s on an AVX2-only Zen core, a third
/// of a 256x256 UNet step), so a key block is scored 16 keys at a time (6x2
/// accumulators) and the values are summed 16 lanes at a time.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Head, Online, Range, KB, R};

    /// Lanes per vector.
    const W: usize = 8;

    /// [`super::exp`] on 8 lanes, the power of two built in the exponent bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        let xc = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693_145_75), xc);
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        // k is in [-126, 127] after the clamp: a normal power of two.
        let two_k = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(k),
            _mm256_set1_epi32(127),
        )));
        let y = _mm256_mul_ps(p, two_k);
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.0));
        _mm256_blendv_ps(y, _mm256_setzero_ps(), below)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
        _mm_cvtss_f32(m)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_add_ss(m, _mm_shuffle_ps::<1>(m, m));
        _mm_cvtss_f32(m)
    }

    /// # Safety
    /// As [`super::avx512::tile`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(
        h: &Head<'_>,
        q: &[f32],
        out: &mut [f32],
        st: &mut Online,
        keys: Range<usize>,
    ) {
        let (d, dp) = (h.d, h.dp);
        let Online { m, l } = st;
        let mut s = [[0f32; KB]; R];
        let (kt, qp, o) = (h.kt.as_ptr(), q.as_ptr(), out.as_mut_ptr());
        let mut j0 = keys.start;
        while j0 < keys.end {
            for sub in (0..KB).step_by(2 * W) {
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                let mut kp = kt.add(j0 * d + sub);
                for dd in 0..d {
                    let k0 = _mm256_loadu_ps(kp);
                    let k1 = _mm256_loadu_ps(kp.add(W));
                    for r in 0..R {
                        let qb = _mm256_broadcast_ss(&*qp.add(r * d + dd));
                        acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
                    }
                    kp = kp.add(KB);
                }
                for r in 0..R {
                    _mm256_storeu_ps(s[r].as_mut_ptr().add(sub), acc[r][0]);
                    _mm256_storeu_ps(s[r].as_mut_ptr().add(sub + W), acc[r][1]);
                }
            }
            let valid = (h.nk - j0).min(KB);
            let mut corr = [0f32; R];
            for r in 0..R {
                s[r][valid..].fill(f32::NEG_INFINITY);
                let sp = s[r].as_mut_ptr();
                let mut top = _mm256_loadu_ps(sp);
                for c in (W..KB).step_by(W) {
                    top = _mm256_max_ps(top, _mm256_loadu_ps(sp.add(c)));
                }
                let mx = m[r].max(hmax(top));
                corr[r] = super::exp(m[r] - mx);
                let mb = _mm256_set1_ps(mx);
                let mut sum = _mm256_setzero_ps();
                for c in (0..KB).step_by(W) {
                    let e = exp(_mm256_sub_ps(_mm256_loadu_ps(sp.add(c)), mb));
                    sum = _mm256_add_ps(sum, e);
                    _mm256_storeu_ps(sp.add(c), e);
                }
                l[r] = l[r] * corr[r] + hsum(sum);
                m[r] = mx;
            }
            // The probabilities (now in `s`) times the values, 16 lanes at a time.
            for c0 in (0..dp).step_by(2 * W) {
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for r in 0..R {
                    let cb = _mm256_set1_ps(corr[r]);
                    acc[r][0] = _mm256_mul_ps(_mm256_loadu_ps(o.add(r * dp + c0)), cb);
                    acc[r][1] = _mm256_mul_ps(_mm256_loadu_ps(o.add(r * dp + c0 + W)), cb);
                }
                let mut vp = h.v.as_ptr().add(j0 * dp + c0);
                for j in 0..valid {
                    let v0 = _mm256_loadu_ps(vp);
                    let v1 = _mm256_loadu_ps(vp.add(W));
                    for r in 0..R {
                        let pj = _mm256_broadcast_ss(&s[r][j]);
                        acc[r][0] = _mm256_fmadd_ps(pj, v0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(pj, v1, acc[r][1]);
                    }
                    vp = vp.add(dp);
                }
                for r in 0..R {
                    _mm256_storeu_ps(o.add(r * dp + c0), acc[r][0]);
                    _mm256_storeu_ps(o.add(r * dp + c0 + W), acc[r][1]);
                }
            }
            j0 += KB;
        }
    }
}

/// The NEON tile, in intrinsics: with 32 registers of 4 lanes the portable code's
/// 6x64 score block spills as the AVX2 one did, so keys are scored and values summed
/// 16 lanes at a time (6x4 accumulators).
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{Head, Online, Range, KB, R};

    /// Lanes per vector.
    const W: usize = 4;

    /// [`super::exp`] on 4 lanes, the power of two built in the exponent bits.
    #[inline(always)]
    unsafe fn exp(x: float32x4_t) -> float32x4_t {
        let xc = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0)), vdupq_n_f32(88.0));
        let k = vrndnq_f32(vmulq_f32(xc, vdupq_n_f32(std::f32::consts::LOG2_E)));
        let r = vfmsq_f32(xc, k, vdupq_n_f32(0.693_145_75));
        let r = vfmsq_f32(r, k, vdupq_n_f32(1.428_606_8e-6));
        let mut p = vdupq_n_f32(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = vfmaq_f32(vdupq_n_f32(c), p, r);
        }
        // k is in [-126, 127] after the clamp: a normal power of two.
        let two_k = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(
            vcvtq_s32_f32(k),
            vdupq_n_s32(127),
        )));
        let y = vmulq_f32(p, two_k);
        vbslq_f32(vcltq_f32(x, vdupq_n_f32(-87.0)), vdupq_n_f32(0.0), y)
    }

    /// # Safety
    /// As [`super::avx2::tile`] (NEON is part of aarch64's baseline).
    pub(super) unsafe fn tile(
        h: &Head<'_>,
        q: &[f32],
        out: &mut [f32],
        st: &mut Online,
        keys: Range<usize>,
    ) {
        let (d, dp) = (h.d, h.dp);
        let Online { m, l } = st;
        let mut s = [[0f32; KB]; R];
        let (kt, qp, o) = (h.kt.as_ptr(), q.as_ptr(), out.as_mut_ptr());
        let mut j0 = keys.start;
        while j0 < keys.end {
            for sub in (0..KB).step_by(4 * W) {
                let mut acc = [[vdupq_n_f32(0.0); 4]; R];
                let mut kp = kt.add(j0 * d + sub);
                for dd in 0..d {
                    let kv = [
                        vld1q_f32(kp),
                        vld1q_f32(kp.add(W)),
                        vld1q_f32(kp.add(2 * W)),
                        vld1q_f32(kp.add(3 * W)),
                    ];
                    for r in 0..R {
                        let qv = *qp.add(r * d + dd);
                        for c in 0..4 {
                            acc[r][c] = vfmaq_n_f32(acc[r][c], kv[c], qv);
                        }
                    }
                    kp = kp.add(KB);
                }
                for r in 0..R {
                    for c in 0..4 {
                        vst1q_f32(s[r].as_mut_ptr().add(sub + c * W), acc[r][c]);
                    }
                }
            }
            let valid = (h.nk - j0).min(KB);
            let mut corr = [0f32; R];
            for r in 0..R {
                s[r][valid..].fill(f32::NEG_INFINITY);
                let sp = s[r].as_mut_ptr();
                let mut top = vld1q_f32(sp);
                for c in (W..KB).step_by(W) {
                    top = vmaxq_f32(top, vld1q_f32(sp.add(c)));
                }
                let mx = m[r].max(vmaxvq_f32(top));
                corr[r] = super::exp(m[r] - mx);
                let mb = vdupq_n_f32(mx);
                let mut sum = vdupq_n_f32(0.0);
                for c in (0..KB).step_by(W) {
                    let e = exp(vsubq_f32(vld1q_f32(sp.add(c)), mb));
                    sum = vaddq_f32(sum, e);
                    vst1q_f32(sp.add(c), e);
                }
                l[r] = l[r] * corr[r] + vaddvq_f32(sum);
                m[r] = mx;
            }
            // The probabilities (now in `s`) times the values, 16 lanes at a time.
            for c0 in (0..dp).step_by(4 * W) {
                let mut acc = [[vdupq_n_f32(0.0); 4]; R];
                for r in 0..R {
                    for c in 0..4 {
                        acc[r][c] = vmulq_n_f32(vld1q_f32(o.add(r * dp + c0 + c * W)), corr[r]);
                    }
                }
                let mut vp = h.v.as_ptr().add(j0 * dp + c0);
                for j in 0..valid {
                    let vv = [
                        vld1q_f32(vp),
                        vld1q_f32(vp.add(W)),
                        vld1q_f32(vp.add(2 * W)),
                        vld1q_f32(vp.add(3 * W)),
                    ];
                    for r in 0..R {
                        let pj = s[r][j];
                        for c in 0..4 {
                            acc[r][c] = vfmaq_n_f32(acc[r][c], vv[c], pj);
                        }
                    }
                    vp = vp.add(dp);
                }
                for r in 0..R {
                    for c in 0..4 {
                        vst1q_f32(o.add(r * dp + c0 + c * W), acc[r][c]);
                    }
                }
            }
            j0 += KB;
        }
    }
}

/// Which compiled variant of sdrs' own kernels this CPU runs (attention, GroupNorm,
/// GEGLU; for `info --system` and benches too).
pub fn kernel_variant() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2";
        }
    }
    if cfg!(target_arch = "aarch64") {
        "neon"
    } else {
        "baseline"
    }
}

/// The ggml callback. Never unwinds into C: a panic (a bug) poisons the output with
/// NaN, which the caller sees as a wrong result, and is logged.
pub(super) unsafe extern "C" fn attention_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    let finished = super::custom_op_body("attention kernel", "its output is NaN", || {
        // SAFETY: ggml passes the node built by `Context::attention`: three f32
        // sources of the checked shapes, an allocated contiguous f32 destination of
        // [D*H, Nq, B]; threads ith < nth write disjoint units.
        unsafe {
            let t = &*dst;
            let (q, k, v) = (View::of(t.src[0]), View::of(t.src[1]), View::of(t.src[2]));
            let scale = f32::from_bits(userdata as usize as u32);
            let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
            let out = t.data.cast::<f32>();
            let tile: TileFn = match kernel_variant() {
                #[cfg(target_arch = "x86_64")]
                "avx512" => avx512::tile,
                #[cfg(target_arch = "x86_64")]
                "avx2" => avx2::tile,
                #[cfg(target_arch = "aarch64")]
                "neon" => neon::tile,
                _ => tile_portable,
            };
            run(
                &Job {
                    q,
                    k,
                    v,
                    dst: out,
                    scale,
                    tile,
                },
                ith,
                nth,
            );
        }
    });
    if !finished {
        // SAFETY: as above; only this thread's first unit range is touched by the fill
        // of the whole tensor, which is fine: the result is invalid anyway.
        unsafe {
            let t = &*dst;
            let n = (t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]) as usize;
            if ith == 0 {
                std::slice::from_raw_parts_mut(t.data.cast::<f32>(), n).fill(f32::NAN);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every compiled tile variant this CPU can run, against a plain softmax, on a
    /// packed head with a partial last key block, in two passes over the keys.
    #[test]
    fn every_tile_variant_matches_a_plain_softmax() {
        let (d, nk): (usize, usize) = (40, 77);
        let (dp, nkp) = (d.next_multiple_of(LANES), nk.next_multiple_of(KB));
        let val = |i: usize| ((i * 2654435761) % 10007) as f32 / 5003.5 - 1.0;
        let keys: Vec<f32> = (0..nk * d).map(val).collect(); // [nk][d]
        let values: Vec<f32> = (0..nk * d).map(|i| val(i + 99991)).collect();
        let q: Vec<f32> = (0..R * d).map(|i| val(i + 7) * 0.5).collect();
        let mut kt = vec![0f32; d * nkp];
        let mut vp = vec![0f32; nkp * dp];
        for j in 0..nk {
            for dd in 0..d {
                kt[(j / KB) * d * KB + dd * KB + j % KB] = keys[j * d + dd];
                vp[j * dp + dd] = values[j * d + dd];
            }
        }
        let head = Head {
            kt: &kt,
            v: &vp,
            d,
            dp,
            nk,
        };
        let mut want = vec![0f32; R * d];
        for r in 0..R {
            let s: Vec<f64> = (0..nk)
                .map(|j| {
                    (0..d)
                        .map(|i| q[r * d + i] as f64 * keys[j * d + i] as f64)
                        .sum()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for i in 0..d {
                want[r * d + i] = (0..nk)
                    .map(|j| e[j] / z * values[j * d + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        let mut variants: Vec<(&str, TileFn)> = vec![("portable", tile_portable)];
        #[cfg(target_arch = "aarch64")]
        variants.push(("neon", neon::tile));
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                variants.push(("avx2", avx2::tile));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                variants.push(("avx512", avx512::tile));
            }
        }
        for (name, tile) in variants {
            let mut out = vec![0f32; R * dp];
            let mut online = Online::new();
            // Two passes, as `run` makes them: the running softmax carries over.
            for keys in [0..KB, KB..nk] {
                // SAFETY: buffers sized as `tile` requires; the variant's features were
                // detected.
                unsafe { tile(&head, &q, &mut out, &mut online, keys) };
            }
            normalise(&mut out, &online.l, dp);
            for r in 0..R {
                for i in 0..d {
                    let (g, w) = (out[r * dp + i], want[r * d + i]);
                    assert!(
                        (g - w).abs() < 1e-5,
                        "{name}: row {r}, {i}: {g} against {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_range_and_zero_far_below() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }
}
