//! q4_0 matrices stored in the layout ggml's x86 integer GEMM reads (`block_q4_0x8`),
//! and using such stored bytes in place from a file's mapping.
//!
//! The layout (ggml-cpu `repack.cpp`, `make_block_q4_0x8` with an interleave of 8
//! bytes): rows go in groups of 8; for each 32-value block column of a group, one
//! 144-byte block holds the 8 rows' f16 scales, then their 16 quant bytes each in
//! 8-byte pieces, piece `i` coming from row `i % 8` at byte `(i / 8) * 8`, every byte
//! XORed with 0x88 (nibbles stored signed). Same size as plain q4_0, so a tensor keeps
//! its offsets and byte count.
//!
//! ggml chooses this layout on AVX2/AVX-512 (and 256-bit SVE with int8 matmul). Which
//! layout the loaded CPU library uses is not a guess here: [`mapped_traits`] has it
//! repack a probe and compares the bytes with [`interleave_q4_0`]'s.
use std::ffi::c_void;
use std::sync::OnceLock;

use super::{device, sys, Type};
use crate::error::{Error, Result};

/// Rows per interleaved group.
pub const ROWS: usize = 8;
/// Bytes of one plain q4_0 block (f16 scale + 16 bytes of nibbles).
const BLOCK: usize = 18;
/// Values per q4_0 block.
const QK: usize = 32;

/// Whether a tensor of type `ty`, ggml shape `ne`, can be stored interleaved.
pub fn can_interleave(ty: Type, ne: &[u64]) -> bool {
    ty == Type::Q4_0
        && ne.len() == 2
        && ne[0] > 0
        && ne[0].is_multiple_of(QK as u64)
        && ne[1] > 0
        && ne[1].is_multiple_of(ROWS as u64)
}

fn check(len: usize, ne0: usize, rows: usize) -> Result<usize> {
    let blocks = ne0 / QK;
    if !ne0.is_multiple_of(QK) || !rows.is_multiple_of(ROWS) || len != blocks * BLOCK * rows {
        return Err(Error::Ggml(format!(
            "q4_0 interleave: {len} bytes are not {rows} rows of {ne0} values in groups of {ROWS}"
        )));
    }
    Ok(blocks)
}

/// Plain q4_0 rows (`ne0` values each; a whole number of groups of 8) in the
/// interleaved layout, appended to `out`.
pub fn interleave_q4_0(plain: &[u8], ne0: usize, out: &mut Vec<u8>) -> Result<()> {
    let rows = plain.len() / (ne0 / QK * BLOCK).max(1);
    let blocks = check(plain.len(), ne0, rows)?;
    let row_bytes = blocks * BLOCK;
    out.reserve(plain.len());
    for group in plain.chunks_exact(ROWS * row_bytes) {
        for b in 0..blocks {
            let block = |r: usize| &group[r * row_bytes + b * BLOCK..][..BLOCK];
            for r in 0..ROWS {
                out.extend_from_slice(&block(r)[..2]);
            }
            for i in 0..16 {
                let src = &block(i % ROWS)[2 + (i / ROWS) * 8..][..8];
                out.extend(src.iter().map(|q| q ^ 0x88));
            }
        }
    }
    Ok(())
}

/// The inverse of [`interleave_q4_0`]: `stored` back to plain q4_0 rows.
pub fn deinterleave_q4_0(stored: &[u8], ne0: usize) -> Result<Vec<u8>> {
    let rows = stored.len() / (ne0 / QK * BLOCK).max(1);
    let blocks = check(stored.len(), ne0, rows)?;
    let row_bytes = blocks * BLOCK;
    let mut out = vec![0u8; stored.len()];
    for (group, dst) in stored
        .chunks_exact(ROWS * row_bytes)
        .zip(out.chunks_exact_mut(ROWS * row_bytes))
    {
        for (b, x) in group.chunks_exact(ROWS * BLOCK).enumerate() {
            let (scales, quants) = x.split_at(2 * ROWS);
            for r in 0..ROWS {
                dst[r * row_bytes + b * BLOCK..][..2].copy_from_slice(&scales[2 * r..2 * r + 2]);
            }
            for (i, piece) in quants.chunks_exact(8).enumerate() {
                let d = &mut dst[(i % ROWS) * row_bytes + b * BLOCK + 2 + (i / ROWS) * 8..][..8];
                for (d, q) in d.iter_mut().zip(piece) {
                    *d = q ^ 0x88;
                }
            }
        }
    }
    Ok(out)
}

/// ggml's kernel choice for interleaved q4_0 matrices (its `tensor->extra`), where the
/// loaded CPU library reads exactly [`interleave_q4_0`]'s layout for q4_0 matrices of
/// 8-row groups; `None` elsewhere (another layout, or no repack buffer at all).
pub(crate) fn mapped_traits() -> Option<usize> {
    static PROBE: OnceLock<Option<usize>> = OnceLock::new();
    *PROBE.get_or_init(|| match probe() {
        Ok(t) => t,
        Err(e) => {
            log::debug!("interleaved q4_0 probe: {e}");
            None
        }
    })
}

/// Repacks a probe of 16 rows of 64 values (2 groups, 2 block columns) in ggml's own
/// repack buffer and compares the result with ours.
fn probe() -> Result<Option<usize>> {
    let Some(buft) = device::repack_buffer_type() else {
        return Ok(None);
    };
    let (ne0, ne1) = (2 * QK, 2 * ROWS);
    // Distinct bytes everywhere, so that any other arrangement shows.
    let plain: Vec<u8> = (0..ne0 / QK * BLOCK * ne1)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let mut ours = Vec::new();
    interleave_q4_0(&plain, ne0, &mut ours)?;
    // SAFETY: a fresh context holds one tensor without data; it is allocated in a
    // buffer of the repack type big enough for its bytes (ggml_nbytes); its data is
    // host memory of that many bytes, read only after ggml's set returned. Everything
    // is freed before returning.
    unsafe {
        let params = sys::ggml_init_params {
            mem_size: 4 * sys::ggml_tensor_overhead(),
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        let ctx = sys::ggml_init(params);
        if ctx.is_null() {
            return Err(Error::Ggml("ggml_init failed".into()));
        }
        let t = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_Q4_0, ne0 as i64, ne1 as i64);
        let buf = sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft.as_ptr());
        let result = if buf.is_null() || (*t).data.is_null() || (*t).extra.is_null() {
            Ok(None)
        } else {
            sys::ggml_backend_tensor_set(t, plain.as_ptr().cast(), 0, plain.len());
            let theirs = std::slice::from_raw_parts((*t).data.cast::<u8>(), ours.len());
            Ok((theirs == ours.as_slice()).then_some((*t).extra as usize))
        };
        if !buf.is_null() {
            sys::ggml_backend_buffer_free(buf);
        }
        sys::ggml_free(ctx);
        result
    }
}

/// The fields of ggml's `struct ggml_backend_buffer` (ggml-backend-impl.h, not an
/// installed header) up to the one written here: its interface is eleven function
/// pointers, then the buffer type. Checked against the public getters before use.
#[repr(C)]
struct BufferHead {
    iface: [Option<unsafe extern "C" fn()>; 11],
    buft: sys::ggml_backend_buffer_type_t,
    context: *mut c_void,
    size: usize,
}

/// Turns `buf` (a CPU buffer over borrowed memory) into one of the repack type, so that
/// ggml's CPU backend sends products whose weights live there to the kernel that the
/// weight's `extra` names. The memory is unchanged: it must already hold the layout.
///
/// # Safety
/// `buf` must be a live buffer made by `ggml_backend_cpu_buffer_from_ptr`, of `size`
/// bytes, with no tensor allocated in it yet.
pub(super) unsafe fn retype_as_repack(buf: sys::ggml_backend_buffer_t, size: usize) -> Result<()> {
    let buft = device::repack_buffer_type()
        .ok_or_else(|| Error::Ggml("this CPU library has no repack buffer".into()))?;
    let head = buf.cast::<BufferHead>();
    // The mirrored layout must agree with what ggml's own getters read.
    if (*head).buft != sys::ggml_backend_buffer_get_type(buf)
        || (*head).size != sys::ggml_backend_buffer_get_size(buf)
        || (*head).size != size
        || (*head).context != sys::ggml_backend_buffer_get_base(buf)
    {
        return Err(Error::Ggml(
            "ggml's buffer struct is not laid out as this build expects".into(),
        ));
    }
    (*head).buft = buft.as_ptr();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaving_round_trips_and_moves_every_byte() {
        let (ne0, rows) = (96, 16);
        let plain: Vec<u8> = (0..ne0 / QK * BLOCK * rows).map(|i| i as u8).collect();
        let mut stored = Vec::new();
        interleave_q4_0(&plain, ne0, &mut stored).unwrap();
        assert_eq!(stored.len(), plain.len());
        assert_ne!(stored, plain);
        // The first block holds row 0..8's scales, then row 0's first quant bytes.
        assert_eq!(&stored[..2], &plain[..2]);
        assert_eq!(&stored[2..4], &plain[ne0 / QK * BLOCK..][..2]);
        assert_eq!(stored[16], plain[2] ^ 0x88);
        assert_eq!(deinterleave_q4_0(&stored, ne0).unwrap(), plain);
    }

    #[test]
    fn rows_not_in_groups_of_eight_are_refused() {
        let plain = vec![0u8; BLOCK * 4];
        assert!(interleave_q4_0(&plain, QK, &mut Vec::new()).is_err());
        assert!(deinterleave_q4_0(&plain, QK).is_err());
        assert!(!can_interleave(Type::Q4_0, &[32, 12]));
        assert!(!can_interleave(Type::Q8_0, &[32, 16]));
        assert!(can_interleave(Type::Q4_0, &[64, 16]));
    }
}
