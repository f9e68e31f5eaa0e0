//! The convolution's epilogue, a ggml custom op: one band of output rows from the
//! matrix product (`[OC, OW, rows, N]`, a pixel's channels together) written into its
//! rows of the output (`[OW, OH, OC, N]`, one plane per channel), with the bias added
//! on the way.
//!
//! Why: the product's layout had been turned into planes by a permuted copy (CONT), the
//! bands of a large convolution joined by a tree of CONCATs and the bias added by a
//! broadcast ADD: three to eight passes over every convolution's output, 4.8 of the
//! 23.7 s of SD 1.5's f16 VAE decode at 512x512 (`sdrs bench --profile`). This is one
//! pass, a cache-blocked transpose: each band lands in place in the shared output
//! (the ops after the first write into the first one's tensor), so the bands also
//! never coexist with a joined copy in the compute buffer.
use std::ffi::{c_int, c_void};

use super::sys;

/// Channels and pixels of one transposed block: 16 channels are one 64-byte line of
/// a product row; 64 pixels one line of each of 16 output rows per step.
const BLOCK_C: usize = 16;
const BLOCK_P: usize = 64;

/// What the op needs besides its sources, kept alive by the context that built it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Params {
    /// First output row of the band.
    pub row0: usize,
    /// Index of the band among the node's sources: 0 for the op that makes the output,
    /// 1 for those that write into it (their source 0 is the output so far).
    pub band: usize,
    /// Whether the source after the band is the bias.
    pub bias: bool,
}

/// # Safety
/// `band` contiguous f32 `[OC, OW·rows, N]`; `bias` `OC` values or none; `dst`
/// contiguous f32 `[OW, OH, OC, N]` with `row0 + rows <= OH`. Writes the band's rows of
/// the channel blocks `ith` owns, so calls with the same `nth` never overlap.
unsafe fn run(
    band: &sys::ggml_tensor,
    bias: Option<*const f32>,
    dst: &sys::ggml_tensor,
    p: &Params,
    ith: usize,
    nth: usize,
) {
    let [ow, oh, oc, n] = dst.ne.map(|v| v as usize);
    let pixels = band.ne[1] as usize; // OW·rows
    let src = band.data as *const f32;
    let out = (dst.data as *mut f32).add(p.row0 * ow);
    let plane = ow * oh;
    let blocks = oc.div_ceil(BLOCK_C);
    let jobs = n * blocks;
    let mut tile = [[0f32; BLOCK_P]; BLOCK_C];
    for job in ith * jobs / nth..(ith + 1) * jobs / nth {
        let (b, c0) = (job / blocks, (job % blocks) * BLOCK_C);
        let cs = BLOCK_C.min(oc - c0);
        let rows_in = src.add(b * pixels * oc + c0);
        let planes = out.add((b * oc + c0) * plane);
        let mut p0 = 0;
        while p0 < pixels {
            let ps = BLOCK_P.min(pixels - p0);
            for i in 0..ps {
                let row = rows_in.add((p0 + i) * oc);
                for (c, t) in tile.iter_mut().enumerate().take(cs) {
                    t[i] = *row.add(c);
                }
            }
            for (c, t) in tile.iter().enumerate().take(cs) {
                let o = std::slice::from_raw_parts_mut(planes.add(c * plane + p0), ps);
                match bias {
                    Some(b) => {
                        let add = *b.add(c0 + c);
                        for (o, v) in o.iter_mut().zip(t) {
                            *o = v + add;
                        }
                    }
                    None => o.copy_from_slice(&t[..ps]),
                }
            }
            p0 += ps;
        }
    }
}

/// The ggml callback; never unwinds into C (see `custom_op_body`).
pub(super) unsafe extern "C" fn epilogue_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    super::custom_op_body(
        "convolution epilogue",
        "the convolution's output is invalid",
        || {
            // SAFETY: ggml passes the node built by `Context::conv_epilogue`: the band (and
            // the bias) at the sources `Params` names, checked there, a contiguous f32
            // destination of the checked shape, and the `Params` its context keeps alive.
            unsafe {
                let t = &*dst;
                let p = &*(userdata as *const Params);
                let bias = p.bias.then(|| (*t.src[p.band + 1]).data as *const f32);
                run(
                    &*t.src[p.band],
                    bias,
                    t,
                    p,
                    ith.max(0) as usize,
                    nth.max(1) as usize,
                );
            }
        },
    );
}
