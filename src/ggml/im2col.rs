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
use std::ffi::{c_int, c_void};

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
            // contiguous rows, a contiguous f32 destination of the checked shape, and the
            // `Params` its context keeps alive.
            unsafe {
                let t = &*dst;
                let p = &*(userdata as *const Params);
                run(&*t.src[0], t, p, ith.max(0) as usize, nth.max(1) as usize);
            }
        },
    );
}
