//! 3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(4x4, 3x3),
//! a ggml custom op.
//!
//! Why: a direct 3x3 convolution costs 9 multiply-adds per output pixel and channel
//! pair; F(4x4, 3x3) makes a 4x4 output tile from a 6x6 input tile with 36, 2.25 per
//! pixel, a quarter. TAESD's decoder is nothing but 64-channel 3x3 convolutions (142
//! GFLOP at 512x512 direct, 1.4 of its 1.9 s on 2 AVX2 cores in ggml's products), and
//! ggml's own batched product is no help for the 36 products this needs: with a depth
//! of 64 channels it ran at 31–46 GFLOP/s there, against 104 for the direct im2col
//! product. So the whole convolution is one op, a block of 48 tiles at a time kept in
//! cache: the input transform `V = Bᵀ d B`, the 36 products `M = U V` over the
//! channels with a register-blocked kernel, and the output transform `Y = Aᵀ M A`
//! with the bias, written straight into the output's channel planes. The kernel's
//! transform `U = G g Gᵀ` is made once, when the weights load ([`transform_kernel`]),
//! or in the graph from a stored kernel ([`kernel_op`]), where weights are mapped
//! from a file and a transformed copy of them all would cost four times their f32
//! bytes.
//!
//! The matrices are those of Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks" (CVPR 2016), interpolation points 0, ±1, ±2 and ∞. Everything is f32: the
//! transforms for ±2 amplify rounding, which 16-bit operands would make visible.
//!
//! It reads its input through a nearest-neighbour upsampling (each pixel as an
//! `up`x`up` block), as sdrs' im2col does, so an upsampling layer's convolution never
//! makes the upsampled tensor.
use std::ffi::{c_int, c_void};

use super::sys;

/// Positions of a transformed tile: 6x6.
pub const POSITIONS: usize = 36;
/// Tiles per block: a multiple of every variant's lanes and product columns.
const BLOCK: usize = 48;
/// Row stride of the block scratch: a partial last lane vector writes past the block.
const STRIDE: usize = BLOCK + 16;

/// What the op needs besides its sources, kept alive by the context that built it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Params {
    /// The input is read upsampled by this factor (nearest neighbour); 1 for none.
    pub up: usize,
    /// Whether the source after the kernel is the bias.
    pub bias: bool,
}

/// G (6x3, the kernel's transform) applied to three values.
#[inline(always)]
fn kernel_1d(a: f32, b: f32, c: f32) -> [f32; 6] {
    [
        a / 4.0,
        -(a + b + c) / 6.0,
        -(a - b + c) / 6.0,
        a / 24.0 + b / 12.0 + c / 6.0,
        a / 24.0 - b / 12.0 + c / 6.0,
        c,
    ]
}

/// `U = G g Gᵀ` of one 3x3 kernel `g` (row-major), position `6·row + column`.
#[inline(always)]
fn transform_one(g: &[f32]) -> [f32; POSITIONS] {
    let cols: [[f32; 6]; 3] = std::array::from_fn(|c| kernel_1d(g[c], g[3 + c], g[6 + c]));
    let mut u = [0f32; POSITIONS];
    for r in 0..6 {
        u[r * 6..][..6].copy_from_slice(&kernel_1d(cols[0][r], cols[1][r], cols[2][r]));
    }
    u
}

/// The transformed kernel `U = G g Gᵀ` of a 3x3 convolution, `[36][OC][IC]` (ggml
/// shape `[IC, OC, 36]`), from its weights `[OC][IC][3][3]` (PyTorch's order, the
/// matrix `[IC·9, OC]` of sdrs' files).
pub fn transform_kernel(kernel: &[f32], ic: usize, oc: usize) -> Vec<f32> {
    assert_eq!(kernel.len(), ic * oc * 9, "a 3x3 kernel of {oc}x{ic}");
    let mut u = vec![0f32; POSITIONS * oc * ic];
    for (o, rows) in kernel.chunks_exact(ic * 9).enumerate() {
        for (i, g) in rows.chunks_exact(9).enumerate() {
            for (xi, v) in transform_one(g).into_iter().enumerate() {
                u[(xi * oc + o) * ic + i] = v;
            }
        }
    }
    u
}

/// Kernel element types [`kernel_op`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KernelType {
    F32,
    F16,
    BF16,
}

/// The ggml callback of `Context::winograd_kernel`: [`transform_kernel`] in the graph,
/// output channels split among the threads. Never unwinds into C.
pub(super) unsafe extern "C" fn kernel_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    super::custom_op_body(
        "Winograd kernel transform",
        "the convolution's output is invalid",
        || {
            // SAFETY: ggml passes the node built by `Context::winograd_kernel`: a
            // contiguous kernel [IC·9, OC] of the type `userdata` names, a contiguous f32
            // destination [IC, OC, 36], checked there; thread `ith` writes its output
            // channels' values only.
            unsafe {
                use half::slice::HalfFloatSliceExt;
                let t = &*dst;
                let ty = *(userdata as *const KernelType);
                let k = &*t.src[0];
                let (ic, oc) = (t.ne[0] as usize, t.ne[1] as usize);
                let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
                let out = t.data.cast::<f32>();
                let mut row = vec![0f32; ic * 9];
                for o in ith * oc / nth..(ith + 1) * oc / nth {
                    let n = ic * 9;
                    match ty {
                        KernelType::F32 => row.copy_from_slice(std::slice::from_raw_parts(
                            (k.data as *const f32).add(o * n),
                            n,
                        )),
                        KernelType::F16 => {
                            std::slice::from_raw_parts((k.data as *const half::f16).add(o * n), n)
                                .convert_to_f32_slice(&mut row)
                        }
                        KernelType::BF16 => {
                            std::slice::from_raw_parts((k.data as *const half::bf16).add(o * n), n)
                                .convert_to_f32_slice(&mut row)
                        }
                    }
                    for (i, g) in row.chunks_exact(9).enumerate() {
                        for (xi, v) in transform_one(g).into_iter().enumerate() {
                            *out.add((xi * oc + o) * ic + i) = v;
                        }
                    }
                }
            }
        },
    );
}

/// The convolution's geometry.
#[derive(Clone, Copy, Debug)]
struct Shape {
    /// Input plane as stored.
    w: usize,
    h: usize,
    up: usize,
    /// Output plane: the input as read, upsampled.
    ow: usize,
    oh: usize,
    ic: usize,
    oc: usize,
    /// Tiles per row, per image.
    tx: usize,
    per_image: usize,
}

impl Shape {
    fn new(w: usize, h: usize, up: usize, ic: usize, oc: usize) -> Shape {
        let (ow, oh) = (w * up, h * up);
        let (tx, ty) = (ow.div_ceil(4), oh.div_ceil(4));
        Shape {
            w,
            h,
            up,
            ow,
            oh,
            ic,
            oc,
            tx,
            per_image: tx * ty,
        }
    }
}

/// One convolution as a thread's blocks see it.
struct Job<'a> {
    s: Shape,
    x: &'a [f32],
    u: &'a [f32],
    bias: Option<&'a [f32]>,
    /// The whole output `[OW, OH, OC, N]`; threads write disjoint tiles of it.
    out: *mut f32,
}

/// A run of tiles in one tile row of one image, at column `col` of its block.
#[derive(Clone, Copy, Debug)]
struct Segment {
    image: usize,
    row: usize,
    tx0: usize,
    count: usize,
    col: usize,
}

/// The segments of the block of tiles `first..first + count` (tiles numbered image by
/// image, row by row).
fn segments(s: &Shape, first: usize, count: usize) -> impl Iterator<Item = Segment> + '_ {
    let mut t = first;
    let end = first + count;
    std::iter::from_fn(move || {
        (t < end).then(|| {
            let (image, r) = (t / s.per_image, t % s.per_image);
            let (row, tx0) = (r / s.tx, r % s.tx);
            let count = (s.tx - tx0).min(end - t);
            let seg = Segment {
                image,
                row,
                tx0,
                count,
                col: t - first,
            };
            t += count;
            seg
        })
    })
}

/// Per-thread scratch: the block's transformed input `[36][IC][STRIDE]`, its products
/// `[36][OC][STRIDE]`, and one segment's input rows split by column phase.
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    phases: Vec<f32>,
}

/// Columns of one phase row: a block's tiles, a lane vector's overrun, one more tile.
const PHASE_LEN: usize = STRIDE + 1;

impl Scratch {
    /// Grown to fit `s` (never shrunk: each of ggml's threads keeps one, and a network
    /// runs the same few shapes over and over).
    fn fit(&mut self, s: &Shape) {
        for (v, n) in [
            (&mut self.v, POSITIONS * s.ic * STRIDE),
            (&mut self.m, POSITIONS * s.oc * STRIDE),
            (&mut self.phases, 6 * 4 * PHASE_LEN),
        ] {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        }
    }
}

thread_local! {
    /// Zeroed pages for every call cost 5 % of a 64-channel convolution at 512x512.
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch { v: Vec::new(), m: Vec::new(), phases: Vec::new() })
    };
}

type Lanes<const L: usize> = [f32; L];

/// Bᵀ applied to six lane vectors (one column or row of 6x6 tiles).
#[inline(always)]
fn input_1d<const L: usize>(d: &[Lanes<L>; 6]) -> [Lanes<L>; 6] {
    let mut t = [[0f32; L]; 6];
    for k in 0..L {
        let [d0, d1, d2, d3, d4, d5] = [d[0][k], d[1][k], d[2][k], d[3][k], d[4][k], d[5][k]];
        t[0][k] = 4.0 * d0 - 5.0 * d2 + d4;
        t[1][k] = (d3 + d4) - 4.0 * (d1 + d2);
        t[2][k] = (d4 - d3) + 4.0 * (d1 - d2);
        t[3][k] = (d4 - d2) + 2.0 * (d3 - d1);
        t[4][k] = (d4 - d2) - 2.0 * (d3 - d1);
        t[5][k] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    t
}

/// Aᵀ applied to six lane vectors: four outputs.
#[inline(always)]
fn output_1d<const L: usize>(m: &[Lanes<L>; 6]) -> [Lanes<L>; 4] {
    let mut y = [[0f32; L]; 4];
    for k in 0..L {
        let (p1, m1) = (m[1][k] + m[2][k], m[1][k] - m[2][k]);
        let (p2, m2) = (m[3][k] + m[4][k], m[3][k] - m[4][k]);
        y[0][k] = m[0][k] + p1 + p2;
        y[1][k] = m1 + 2.0 * m2;
        y[2][k] = p1 + 4.0 * p2;
        y[3][k] = m1 + 8.0 * m2 + m[5][k];
    }
    y
}

/// The input transform of one segment into the block's `v`, `L` tiles at a time.
#[inline(always)]
fn transform_input<const L: usize>(s: &Shape, x: &[f32], seg: Segment, sc: &mut Scratch) {
    let hu = s.oh as isize;
    let plane = s.w * s.h;
    let shift = s.up.trailing_zeros();
    // Phase columns needed: the segment's tiles rounded up to lanes, and one more
    // (the 5th and 6th input columns of a tile are the 1st and 2nd of the next).
    let cols = seg.count.div_ceil(L) * L + 1;
    // Phase p's column k reads input column 4·(tx0 + k) + p - 1 (upsampled): the
    // columns k in lo[p]..hi[p] lie inside the input, the rest are padding.
    let bounds: [(usize, usize); 4] = std::array::from_fn(|p| {
        let lo = usize::from(seg.tx0 == 0 && p == 0);
        let hi = match s.ow.checked_sub(p) {
            Some(room) => (room / 4 + 1).saturating_sub(seg.tx0).min(cols),
            None => 0,
        };
        (lo.min(hi), hi)
    });
    for ic in 0..s.ic {
        let src = &x[(seg.image * s.ic + ic) * plane..][..plane];
        for a in 0..6 {
            let iy = (4 * seg.row + a) as isize - 1;
            let rows = &mut sc.phases[a * 4 * PHASE_LEN..][..4 * PHASE_LEN];
            if iy < 0 || iy >= hu {
                rows.fill(0.0);
                continue;
            }
            let row = &src[(iy as usize >> shift) * s.w..][..s.w];
            for (p, &(lo, hi)) in bounds.iter().enumerate() {
                let out = &mut rows[p * PHASE_LEN..][..cols];
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                if lo == hi {
                    continue;
                }
                let first = 4 * (seg.tx0 + lo) + p - 1;
                if shift == 0 {
                    for (o, v) in out[lo..hi].iter_mut().zip(row[first..].iter().step_by(4)) {
                        *o = *v;
                    }
                } else {
                    for (k, o) in out[lo..hi].iter_mut().enumerate() {
                        *o = row[(first + 4 * k) >> shift];
                    }
                }
            }
        }
        let mut k0 = 0;
        while k0 < seg.count {
            // Column b of the tiles at k0.. is phase b % 4, shifted by b / 4 tiles.
            let mut d = [[[0f32; L]; 6]; 6]; // [b][a]
            for (b, db) in d.iter_mut().enumerate() {
                for (a, da) in db.iter_mut().enumerate() {
                    let at = (a * 4 + b % 4) * PHASE_LEN + k0 + b / 4;
                    *da = sc.phases[at..at + L].try_into().unwrap();
                }
            }
            // Bᵀ down each column, then along each row.
            let mut rows6 = [[[0f32; L]; 6]; 6]; // [i][b]
            for (b, db) in d.iter().enumerate() {
                let t = input_1d(db);
                for i in 0..6 {
                    rows6[i][b] = t[i];
                }
            }
            for (i, ri) in rows6.iter().enumerate() {
                let v = input_1d(ri);
                for (j, vj) in v.iter().enumerate() {
                    let at = ((i * 6 + j) * s.ic + ic) * STRIDE + seg.col + k0;
                    sc.v[at..at + L].copy_from_slice(vj);
                }
            }
            k0 += L;
        }
    }
}

/// The 36 products `M[ξ] = U[ξ] V[ξ]` of a block of `cols` tiles (rounded up to
/// `COLS`), `R` output channels by `COLS` tiles at a time (then the last few).
#[inline(always)]
fn products<const R: usize, const COLS: usize, const FMA: bool>(
    s: &Shape,
    u: &[f32],
    cols: usize,
    sc: &mut Scratch,
) {
    let (ic, oc) = (s.ic, s.oc);
    for xi in 0..POSITIONS {
        let v = &sc.v[xi * ic * STRIDE..][..ic * STRIDE];
        let uk = &u[xi * oc * ic..][..oc * ic];
        let m = &mut sc.m[xi * oc * STRIDE..][..oc * STRIDE];
        let mut o0 = 0;
        while o0 + R <= oc {
            micro::<R, COLS, FMA>(v, uk, m, ic, o0, cols);
            o0 += R;
        }
        match oc - o0 {
            0 => {}
            1 => micro::<1, COLS, FMA>(v, uk, m, ic, o0, cols),
            2 => micro::<2, COLS, FMA>(v, uk, m, ic, o0, cols),
            3 => micro::<3, COLS, FMA>(v, uk, m, ic, o0, cols),
            4 => micro::<4, COLS, FMA>(v, uk, m, ic, o0, cols),
            5 => micro::<5, COLS, FMA>(v, uk, m, ic, o0, cols),
            _ => unreachable!("R is at most 6"),
        }
    }
}

/// Output channels `o0..o0 + R` of one position's product, `COLS` tiles at a time:
/// `R x COLS` accumulators in registers; each step loads `COLS` transformed inputs and
/// broadcasts `R` kernel values. (AVX2's 6 x 16 keeps 12 of its 16 registers
/// accumulating with 8 loads per 12 FMAs; a 4 x 24 block folded a load into every FMA
/// and ran at half the FMA rate.)
#[inline(always)]
fn micro<const R: usize, const COLS: usize, const FMA: bool>(
    v: &[f32],
    uk: &[f32],
    m: &mut [f32],
    ic: usize,
    o0: usize,
    cols: usize,
) {
    let w: [&[f32]; R] = std::array::from_fn(|r| &uk[(o0 + r) * ic..][..ic]);
    for c0 in (0..cols).step_by(COLS) {
        let mut acc = [[0f32; COLS]; R];
        for i in 0..ic {
            let vi: [f32; COLS] = v[i * STRIDE + c0..][..COLS].try_into().unwrap();
            for r in 0..R {
                let wr = w[r][i];
                for k in 0..COLS {
                    acc[r][k] = if FMA {
                        wr.mul_add(vi[k], acc[r][k])
                    } else {
                        wr * vi[k] + acc[r][k]
                    };
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            m[(o0 + r) * STRIDE + c0..][..COLS].copy_from_slice(a);
        }
    }
}

/// The output transform of one segment, bias added, into the output planes.
///
/// # Safety
/// `out` is the convolution's whole output `[OW, OH, OC, N]`; the segment's tiles are
/// written by this call only.
#[inline(always)]
unsafe fn transform_output<const L: usize>(
    s: &Shape,
    bias: Option<&[f32]>,
    out: *mut f32,
    seg: Segment,
    sc: &Scratch,
) {
    let plane = s.ow * s.oh;
    for o in 0..s.oc {
        let b = bias.map_or(0.0, |b| b[o]);
        let dst = out.add((seg.image * s.oc + o) * plane);
        let mut k0 = 0;
        while k0 < seg.count {
            let mut m = [[[0f32; L]; 6]; 6]; // [j][i]
            for (j, mj) in m.iter_mut().enumerate() {
                for (i, mi) in mj.iter_mut().enumerate() {
                    let at = ((i * 6 + j) * s.oc + o) * STRIDE + seg.col + k0;
                    *mi = sc.m[at..at + L].try_into().unwrap();
                }
            }
            // Aᵀ down each column, then along each row.
            let mut rows4 = [[[0f32; L]; 6]; 4]; // [r][j]
            for (j, mj) in m.iter().enumerate() {
                let t = output_1d(mj);
                for r in 0..4 {
                    rows4[r][j] = t[r];
                }
            }
            let n = L.min(seg.count - k0);
            for (r, row4) in rows4.iter().enumerate() {
                let oy = 4 * seg.row + r;
                if oy >= s.oh {
                    break;
                }
                let mut y = output_1d(row4);
                for yc in &mut y {
                    for v in yc.iter_mut() {
                        *v += b;
                    }
                }
                let row = dst.add(oy * s.ow);
                let ox0 = 4 * (seg.tx0 + k0);
                if n == L && ox0 + 4 * L <= s.ow {
                    // Interleaved: pixel 4k + c is y[c][k].
                    let mut line = [[0f32; 4]; L];
                    for (k, px) in line.iter_mut().enumerate() {
                        *px = [y[0][k], y[1][k], y[2][k], y[3][k]];
                    }
                    std::ptr::copy_nonoverlapping(line.as_ptr().cast::<f32>(), row.add(ox0), 4 * L);
                    continue;
                }
                for k in 0..n {
                    let ox = ox0 + 4 * k;
                    for (c, yc) in y.iter().enumerate().take(s.ow - ox) {
                        *row.add(ox + c) = yc[k];
                    }
                }
            }
            k0 += L;
        }
    }
}

/// The convolution of the tiles `first..first + count`.
///
/// # Safety
/// As [`transform_output`].
#[inline(always)]
unsafe fn block<const L: usize, const R: usize, const COLS: usize, const FMA: bool>(
    j: &Job<'_>,
    first: usize,
    count: usize,
    sc: &mut Scratch,
) {
    const { assert!(BLOCK.is_multiple_of(L) && BLOCK.is_multiple_of(COLS) && L <= STRIDE - BLOCK) };
    let s = &j.s;
    for seg in segments(s, first, count) {
        transform_input::<L>(s, j.x, seg, sc);
    }
    products::<R, COLS, FMA>(s, j.u, count.div_ceil(COLS) * COLS, sc);
    for seg in segments(s, first, count) {
        transform_output::<L>(s, j.bias, j.out, seg, sc);
    }
}

/// One compiled variant of [`block`].
type BlockFn = unsafe fn(&Job<'_>, usize, usize, &mut Scratch);

unsafe fn block_portable(j: &Job<'_>, first: usize, count: usize, sc: &mut Scratch) {
    // No FMA in baseline x86-64: `mul_add` would be a libm call.
    block::<4, 6, 8, { cfg!(target_arch = "aarch64") }>(j, first, count, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(j: &Job<'_>, first: usize, count: usize, sc: &mut Scratch) {
    // 6 x 16 accumulators: 12 of the 16 ymm registers.
    block::<8, 6, 16, true>(j, first, count, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_avx512(j: &Job<'_>, first: usize, count: usize, sc: &mut Scratch) {
    // 6 x 48 accumulators: 18 of the 32 zmm registers.
    block::<16, 6, 48, true>(j, first, count, sc)
}

#[cfg(target_arch = "aarch64")]
unsafe fn block_neon(j: &Job<'_>, first: usize, count: usize, sc: &mut Scratch) {
    // 6 x 16 accumulators: 24 of the 32 q registers.
    block::<4, 6, 16, true>(j, first, count, sc)
}

fn variant() -> BlockFn {
    match super::attention::kernel_variant() {
        #[cfg(target_arch = "x86_64")]
        "avx512" => block_avx512,
        #[cfg(target_arch = "x86_64")]
        "avx2" => block_avx2,
        #[cfg(target_arch = "aarch64")]
        "neon" => block_neon,
        _ => block_portable,
    }
}

/// Thread `ith` of `nth`'s share of the convolution of `n` images: whole blocks of
/// tiles.
///
/// # Safety
/// `j.out` is the whole output of `j`; calls with the same `nth` and distinct `ith`
/// write disjoint tiles.
unsafe fn run(f: BlockFn, j: &Job<'_>, n: usize, ith: usize, nth: usize) {
    let tiles = n * j.s.per_image;
    let blocks = tiles.div_ceil(BLOCK);
    let (first, last) = (ith * blocks / nth, (ith + 1) * blocks / nth);
    if first == last {
        return;
    }
    SCRATCH.with_borrow_mut(|sc| {
        sc.fit(&j.s);
        for b in first..last {
            let t0 = b * BLOCK;
            f(j, t0, BLOCK.min(tiles - t0), sc);
        }
    });
}

/// The ggml callback; never unwinds into C (see `custom_op_body`).
pub(super) unsafe extern "C" fn winograd_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    super::custom_op_body(
        "Winograd convolution",
        "the convolution's output is invalid",
        || {
            // SAFETY: ggml passes the node built by `Context::conv3x3_winograd`: a
            // contiguous f32 input [W, H, IC, N], the transformed kernel [IC, OC, 36],
            // the bias [OC] where `Params::bias` says, a contiguous f32 destination
            // [W·up, H·up, OC, N], all checked there, and the `Params` its context keeps
            // alive.
            unsafe {
                let t = &*dst;
                let p = &*(userdata as *const Params);
                let (x, u) = (&*t.src[0], &*t.src[1]);
                let [w, h, ic, n] = x.ne.map(|v| v as usize);
                let oc = u.ne[1] as usize;
                let s = Shape::new(w, h, p.up, ic, oc);
                let xs = std::slice::from_raw_parts(x.data as *const f32, w * h * ic * n);
                let us = std::slice::from_raw_parts(u.data as *const f32, POSITIONS * oc * ic);
                let bias = p
                    .bias
                    .then(|| std::slice::from_raw_parts((*t.src[2]).data as *const f32, oc));
                let job = Job {
                    s,
                    x: xs,
                    u: us,
                    bias,
                    out: t.data.cast::<f32>(),
                };
                run(variant(), &job, n, ith.max(0) as usize, nth.max(1) as usize);
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + salt) * 2654435761usize) % 10007) as f32 / 5003.5 - 1.0)
            .collect()
    }

    /// The direct convolution in f64: `x` `[N][IC][H][W]` read upsampled, `k`
    /// `[OC][IC][3][3]`, padding 1.
    #[allow(clippy::too_many_arguments)]
    fn direct(
        x: &[f32],
        k: &[f32],
        bias: &[f32],
        (w, h, up): (usize, usize, usize),
        ic: usize,
        oc: usize,
        n: usize,
    ) -> Vec<f32> {
        let (ow, oh) = (w * up, h * up);
        let mut out = vec![0f32; ow * oh * oc * n];
        for b in 0..n {
            for o in 0..oc {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[o] as f64;
                        for i in 0..ic {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy == 0 || ix == 0 || iy > oh || ix > ow {
                                        continue;
                                    }
                                    let (iy, ix) = ((iy - 1) / up, (ix - 1) / up);
                                    acc += k[((o * ic + i) * 3 + ky) * 3 + kx] as f64
                                        * x[((b * ic + i) * h + iy) * w + ix] as f64;
                                }
                            }
                        }
                        out[((b * oc + o) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_variant_matches_the_direct_convolution_on_ragged_tiles() {
        let mut variants: Vec<(&str, BlockFn)> = vec![("portable", block_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                variants.push(("avx2", block_avx2));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                variants.push(("avx512", block_avx512));
            }
        }
        #[cfg(target_arch = "aarch64")]
        variants.push(("neon", block_neon));
        // Sizes that are no multiple of 4 (partial tiles), rows of tiles that are no
        // multiple of a block (segments across rows and images), an upsampled input,
        // and more than one thread.
        for (w, h, up, ic, oc, n, nth) in [
            (13, 7, 1, 8, 5, 2, 1),
            (30, 21, 1, 16, 12, 1, 3),
            (9, 11, 2, 5, 8, 2, 2),
            (64, 9, 1, 64, 64, 1, 2),
        ] {
            let x = values(w * h * ic * n, 1);
            let k = values(oc * ic * 9, 2);
            let bias = values(oc, 3);
            let want = direct(&x, &k, &bias, (w, h, up), ic, oc, n);
            let u = transform_kernel(&k, ic, oc);
            let job = |out: *mut f32| Job {
                s: Shape::new(w, h, up, ic, oc),
                x: &x,
                u: &u,
                bias: Some(&bias),
                out,
            };
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (name, f) in &variants {
                let mut got = vec![f32::NAN; want.len()];
                for ith in 0..nth {
                    // SAFETY: `got` is the whole output; threads write disjoint tiles.
                    unsafe { run(*f, &job(got.as_mut_ptr()), n, ith, nth) };
                }
                let err = want
                    .iter()
                    .zip(&got)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                // F(4x4, 3x3) in f32 measured 1.0e-5 of the largest output at 64
                // channels (the ±2 points amplify rounding); f16 operands are ~1e-3.
                assert!(
                    err <= 4e-5 * scale,
                    "{name} {w}x{h} up {up}, {ic}->{oc} x{n}: max error {err} of {scale}"
                );
            }
        }
    }
}
