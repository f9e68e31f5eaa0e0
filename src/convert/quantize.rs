//! Turning one source tensor into the bytes of its stored type, in bounded memory.
use std::sync::atomic::{AtomicBool, Ordering};

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::prelude::*;

use super::policy::Decision;
use crate::error::{Error, Result};
use crate::formats::{DType, SourceTensor, TensorData};
use crate::ggml::Type;

/// Elements converted per step: bounds the working set (f32 copy plus output) to
/// tens of MB whatever the tensor's size.
const CHUNK_ELEMS: usize = 1 << 22;
/// Elements per parallel task in element-wise conversions.
const TASK_ELEMS: usize = 1 << 15;

/// Buffers reused from chunk to chunk and tensor to tensor: allocating them afresh
/// costs a page fault per 4 KiB, which showed up as a third of conversion time.
#[derive(Default)]
pub struct Scratch {
    raw: Vec<u8>,
    f32s: Vec<f32>,
    out: Vec<u8>,
}

/// Fills `out` with the f32 values of `raw` (little-endian `dtype`).
fn to_f32(dtype: DType, raw: &[u8], out: &mut Vec<f32>) -> Result<()> {
    match dtype {
        DType::F16 => {
            out.resize(raw.len() / 2, 0.0);
            out.par_chunks_mut(TASK_ELEMS)
                .zip(raw.par_chunks(TASK_ELEMS * 2))
                .for_each(|(o, b)| {
                    let bits: Vec<u16> = b
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .collect();
                    bits.reinterpret_cast::<half::f16>().convert_to_f32_slice(o);
                });
            Ok(())
        }
        DType::F32 => {
            out.resize(raw.len() / 4, 0.0);
            out.par_chunks_mut(TASK_ELEMS)
                .zip(raw.par_chunks(TASK_ELEMS * 4))
                .for_each(|(o, b)| {
                    for (x, b) in o.iter_mut().zip(b.chunks_exact(4)) {
                        *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                });
            Ok(())
        }
        other => {
            let n = raw.len() as u64 / other.bytes_for(1).unwrap_or(1).max(1);
            *out = crate::formats::source::to_f32(other, raw, n as usize)
                .ok_or_else(|| Error::Invalid(format!("cannot convert {} to f32", other.name())))?;
            Ok(())
        }
    }
}

/// Encodes whole rows of `src` as `ty` into `out`, rows split across threads.
fn encode(ty: Type, src: &[f32], row_len: usize, out: &mut Vec<u8>) -> Result<()> {
    let rows = src.len() / row_len;
    let row_bytes = ty.bytes_for(row_len as u64).ok_or_else(|| {
        Error::Ggml(format!(
            "rows of {row_len} are not whole {} blocks",
            ty.name()
        ))
    })? as usize;
    out.resize(rows * row_bytes, 0);
    let per_task = (rows / (4 * rayon::current_num_threads())).max(1);
    out.par_chunks_mut(per_task * row_bytes)
        .zip(src.par_chunks(per_task * row_len))
        .try_for_each(|(o, s)| ty.quantize_rows_into(s, row_len, o))
}

fn same_storage(src: DType, dst: Type) -> bool {
    matches!(
        (src, dst),
        (DType::F32, Type::F32) | (DType::F16, Type::F16) | (DType::BF16, Type::BF16)
    ) || src == DType::Ggml(dst)
}

/// Stores `values` (the whole tensor, f32) under decision `d`.
pub fn convert_values(
    values: &[f32],
    d: &Decision,
    scratch: &mut Scratch,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    encode(d.ty, values, d.ne[0] as usize, &mut scratch.out)?;
    sink(&scratch.out)
}

/// Streams the stored bytes of `t` under decision `d` into `sink`, chunk by chunk.
pub fn convert_tensor(
    t: &SourceTensor,
    d: &Decision,
    scratch: &mut Scratch,
    cancel: &AtomicBool,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let numel = t.numel() as usize;
    let row_len = d.ne[0] as usize;
    if numel == 0 {
        return Ok(());
    }
    let Scratch { raw, f32s, out } = scratch;
    match &t.data {
        TensorData::Raw { file, offset } => {
            let elems_per_chunk = (CHUNK_ELEMS / row_len).max(1) * row_len;
            let mut done = 0usize;
            while done < numel {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Interrupted);
                }
                let n = elems_per_chunk.min(numel - done);
                let misaligned =
                    || Error::Invalid(format!("tensor `{}`: chunk is not whole blocks", t.name));
                let start = t.dtype.bytes_for(done as u64).ok_or_else(misaligned)?;
                let len = t.dtype.bytes_for(n as u64).ok_or_else(misaligned)? as usize;
                raw.resize(len, 0);
                file.read_at(offset + start, raw)?;
                if same_storage(t.dtype, d.ty) {
                    sink(raw)?;
                } else {
                    to_f32(t.dtype, raw, f32s)?;
                    encode(d.ty, f32s, row_len, out)?;
                    sink(out)?;
                }
                done += n;
            }
            Ok(())
        }
        // Read whole (one matrix), and stored plain again unless the decision says
        // otherwise: never requantized from its own values.
        TensorData::Interleaved(_) if same_storage(t.dtype, d.ty) => sink(&t.read_raw()?),
        _ => {
            let f = t.read_f32()?;
            encode(d.ty, &f, row_len, out)?;
            sink(out)
        }
    }
}
