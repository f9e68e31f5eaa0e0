//! sdrs' own im2col, a ggml custom op: the column matrix of a convolution for a band
//! of output rows, zero padding included.
//!
//! Why: ggml's `im2col` took a sixth of the SD 1.5 VAE decode (7.9 of 45.6 s at
//! 512x512, `sdrs bench --profile`), and a band of rows of a padded input needed a
//! padded copy first (`pad_ext`, 2.1 s more). This one reads the unpadded input
//! directly (rows outside it are zeros) and writes each output pixel's `IC·kh·kw`
//! values as one contiguous run from a few input-row pointers, so it runs at memory
//! speed. It also reads through a nearest-neighbour upsampling of its input (each
//! pixel as an `up`x`up` block), so an upsampling layer's convolution never makes the
//! upsampled tensor: at 512x512 the VAE's last one is 256 MB.
//!
//! For a kernel stored in bf16 or f16 it writes the columns in that type, the one
//! ggml's matrix product converts them to anyway (its `vec_dot_type`, rounded to
//! nearest even as ggml does): half the bytes written and read back, and no
//! conversion pass inside the product. Each input row a band reads is converted once
//! into a zero-padded scratch row, in bulk, and the columns are copied from those; an
//! element-by-element conversion while writing the columns cost more than it saved.
use std::ffi::{c_int, c_void};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::sys;

/// What the op needs besides its input, kept alive by the context that built it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Params {
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    /// The input is read upsampled by this factor (nearest neighbour); 1 for none.
    pub up: usize,
    /// First output row of the band.
    pub row0: usize,
    /// The element type written.
    pub out: Out,
}

/// Element types the columns can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Out {
    F32,
    F16,
    BF16,
}

/// A 16-bit column element, converted from the input's f32 a row at a time.
trait Narrow: Copy + Default {
    fn convert(src: &[f32], dst: &mut [Self]);
}

impl Narrow for f16 {
    fn convert(src: &[f32], dst: &mut [f16]) {
        // half converts slices with F16C where the CPU has it (checked at run time).
        dst.convert_from_f32_slice(src);
    }
}

impl Narrow for bf16 {
    fn convert(src: &[f32], dst: &mut [bf16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(bf16_bits(*s));
        }
    }
}

/// f32 to bf16, rounded to nearest even, NaN kept quiet: ggml's rule (`ggml_compute_fp32_to_bf16`),
/// written without branches so the row loop vectorises.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    let rounded = (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16;
    let nan = ((u >> 16) | 0x40) as u16;
    if u & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// # Safety
/// `x` `[W, H, C, N]` f32 with contiguous rows; `dst` `[C*kh*kw, OW, rows, N]`
/// contiguous f32, rows `ith`-th share written by this call only.
unsafe fn run(x: &sys::ggml_tensor, dst: &sys::ggml_tensor, p: &Params, ith: usize, nth: usize) {
    let [w, h, c, _] = x.ne.map(|n| n as usize);
    let nb = x.nb;
    let [k, ow, rows, n] = dst.ne.map(|n| n as usize);
    let (kh, kw, s, pad, up) = (p.kh, p.kw, p.stride, p.pad as isize, p.up.max(1));
    // The input as the convolution sees it: upsampled.
    let (w, h) = (w * up, h * up);
    let out = dst.data.cast::<f32>();
    let base = x.data as *const u8;
    let total = rows * n;
    let (first, last) = (ith * total / nth, (ith + 1) * total / nth);
    // One pointer per (channel, kernel row): the input row it reads, or none (zeros).
    let mut src: Vec<Option<*const f32>> = vec![None; c * kh];
    for job in first..last {
        let (b, oy) = (job / rows, job % rows);
        let y0 = ((p.row0 + oy) * s) as isize - pad;
        for ic in 0..c {
            for ky in 0..kh {
                let iy = y0 + ky as isize;
                src[ic * kh + ky] = (iy >= 0 && (iy as usize) < h).then(|| {
                    base.add(b * nb[3] + ic * nb[2] + iy as usize / up * nb[1])
                        .cast::<f32>()
                });
            }
        }
        let row_out = out.add((b * rows + oy) * ow * k);
        for ox in 0..ow {
            let x0 = (ox * s) as isize - pad;
            let inside = x0 >= 0 && x0 as usize + kw <= w;
            let mut o = row_out.add(ox * k);
            for r in &src {
                match r {
                    Some(row) if inside && up > 1 => {
                        for kx in 0..kw {
                            *o.add(kx) = *row.add((x0 as usize + kx) / up);
                        }
                    }
                    // The common 3-wide kernel row as three moves (a memcpy call per
                    // row measured 2.2 GB/s on the VAE decode).
                    Some(row) if inside && kw == 3 => {
                        let r = row.add(x0 as usize);
                        *o = *r;
                        *o.add(1) = *r.add(1);
                        *o.add(2) = *r.add(2);
                    }
                    Some(row) if inside => {
                        for kx in 0..kw {
                            *o.add(kx) = *row.add(x0 as usize + kx);
                        }
                    }
                    Some(row) => {
                        for kx in 0..kw {
                            let ix = x0 + kx as isize;
                            *o.add(kx) = if ix >= 0 && (ix as usize) < w {
                                *row.add(ix as usize / up)
                            } else {
                                0.0
                            };
                        }
                    }
                    None => {
                        for kx in 0..kw {
                            *o.add(kx) = 0.0;
                        }
                    }
                }
                o = o.add(kw);
            }
        }
    }
}

/// As [`run`], writing `E`: each job's input rows (`kh` per channel, read upsampled)
/// are first converted into one zero-padded scratch row each, so every kernel row is a
/// plain `kw`-element copy.
///
/// # Safety
/// As [`run`], with `dst` contiguous `E`.
unsafe fn run_narrow<E: Narrow>(
    x: &sys::ggml_tensor,
    dst: &sys::ggml_tensor,
    p: &Params,
    ith: usize,
    nth: usize,
) {
    const { assert!(std::mem::size_of::<E>() == 2) };
    let [w, h, c, _] = x.ne.map(|n| n as usize);
    let nb = x.nb;
    let [k, ow, rows, n] = dst.ne.map(|n| n as usize);
    let (kh, kw, s, pad, up) = (p.kh, p.kw, p.stride, p.pad, p.up.max(1));
    let (wu, hu) = (w * up, h * up);
    // A scratch row: `pad` zeros, the upsampled input row, zeros to the last read.
    let span = (ow - 1) * s + kw;
    let padded = span.max(pad + wu);
    // One element of slack: the last run's 4-element read (below) ends past its row.
    let mut scratch = vec![E::default(); c * kh * padded + 1];
    let mut narrow = vec![E::default(); w];
    let out = dst.data.cast::<E>();
    let base = x.data as *const u8;
    let total = rows * n;
    let (first, last) = (ith * total / nth, (ith + 1) * total / nth);
    for job in first..last {
        let (b, oy) = (job / rows, job % rows);
        let y0 = ((p.row0 + oy) * s) as isize - pad as isize;
        for ic in 0..c {
            for ky in 0..kh {
                let iy = y0 + ky as isize;
                let row = &mut scratch[(ic * kh + ky) * padded..][pad..pad + wu];
                if iy < 0 || iy as usize >= hu {
                    row.fill(E::default());
                    continue;
                }
                let src = std::slice::from_raw_parts(
                    base.add(b * nb[3] + ic * nb[2] + iy as usize / up * nb[1])
                        .cast::<f32>(),
                    w,
                );
                if up == 1 {
                    E::convert(src, row);
                } else {
                    E::convert(src, &mut narrow);
                    for (block, v) in row.chunks_exact_mut(up).zip(&narrow) {
                        block.fill(*v);
                    }
                }
            }
        }
        let row_out = out.add((b * rows + oy) * ow * k);
        let scratch = scratch.as_ptr();
        let runs = c * kh;
        for ox in 0..ow {
            let mut o = row_out.add(ox * k);
            let mut r = scratch.add(ox * s);
            if kw == 3 {
                // The common 3-wide kernel row as one 8-byte move of 4 elements, the
                // 4th overwritten by the next run; a pixel's last run writes exactly 3,
                // so no write leaves the pixel (another thread's rows may follow).
                for _ in 1..runs {
                    o.cast::<u64>()
                        .write_unaligned(r.cast::<u64>().read_unaligned());
                    o = o.add(3);
                    r = r.add(padded);
                }
                *o = *r;
                *o.add(1) = *r.add(1);
                *o.add(2) = *r.add(2);
            } else {
                for _ in 0..runs {
                    std::ptr::copy_nonoverlapping(r, o, kw);
                    o = o.add(kw);
                    r = r.add(padded);
                }
            }
        }
    }
}

/// The ggml callback; never unwinds into C (see `custom_op_body`).
pub(super) unsafe extern "C" fn im2col_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    super::custom_op_body(
        "im2col kernel",
        "the convolution's output is invalid",
        || {
            // SAFETY: ggml passes the node built by `Context::im2col`: one f32 source with
            // contiguous rows, a contiguous destination of the checked shape in the type
            // `Params::out` names, and the `Params` its context keeps alive.
            unsafe {
                let t = &*dst;
                let p = &*(userdata as *const Params);
                let (x, ith, nth) = (&*t.src[0], ith.max(0) as usize, nth.max(1) as usize);
                match p.out {
                    Out::F32 => run(x, t, p, ith, nth),
                    Out::F16 => run_narrow::<f16>(x, t, p, ith, nth),
                    Out::BF16 => run_narrow::<bf16>(x, t, p, ith, nth),
                }
            }
        },
    );
}
