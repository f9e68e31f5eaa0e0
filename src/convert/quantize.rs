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

/// f32 values of `raw` (little-endian `dtype`), converted in parallel.
fn to_f32(dtype: DType, raw: &[u8], n: usize) -> Result<Vec<f32>> {
    match dtype {
        DType::F16 => {
            let bits: Vec<u16> = raw.par_chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
            let mut out = vec![0f32; n];
            out.par_chunks_mut(1 << 16).zip(bits.par_chunks(1 << 16)).for_each(|(o, b)| b.reinterpret_cast::<half::f16>().convert_to_f32_slice(o));
            Ok(out)
        }
        other => crate::formats::source::to_f32(other, raw, n).ok_or_else(|| Error::Invalid(format!("cannot convert {} to f32", other.name()))),
    }
}

/// Encodes `rows` rows of `row_len` floats as `ty`, rows split across threads.
fn encode(ty: Type, src: &[f32], row_len: usize) -> Result<Vec<u8>> {
    let rows = src.len() / row_len;
    let per_task = (rows / (4 * rayon::current_num_threads())).max(1);
    let parts: Vec<Result<Vec<u8>>> = src
        .par_chunks(per_task * row_len)
        .map(|c| {
            let mut out = Vec::new();
            ty.quantize_rows(c, c.len() / row_len, row_len, &mut out)?;
            Ok(out)
        })
        .collect();
    let mut out = Vec::with_capacity(ty.bytes_for(src.len() as u64).unwrap_or(0) as usize);
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

fn same_storage(src: DType, dst: Type) -> bool {
    matches!((src, dst), (DType::F32, Type::F32) | (DType::F16, Type::F16) | (DType::BF16, Type::BF16)) || src == DType::Ggml(dst)
}

/// Streams the stored bytes of `t` under decision `d` into `sink`, chunk by chunk.
/// Returns the number of source bytes consumed.
pub fn convert_tensor(t: &SourceTensor, d: &Decision, cancel: &AtomicBool, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<u64> {
    let numel = t.numel() as usize;
    let row_len = d.ne[0] as usize;
    if numel == 0 {
        return Ok(0);
    }
    let int_type = match t.dtype {
        DType::I64 => Some(Type::I64),
        DType::I32 => Some(Type::I32),
        DType::I16 => Some(Type::I16),
        DType::I8 => Some(Type::I8),
        _ => None,
    };
    match &t.data {
        TensorData::Raw { file, offset } => {
            let elems_per_chunk = (CHUNK_ELEMS / row_len).max(1) * row_len;
            let mut done = 0usize;
            let mut consumed = 0u64;
            while done < numel {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Interrupted);
                }
                let n = elems_per_chunk.min(numel - done);
                let start = t.dtype.bytes_for(done as u64).ok_or_else(|| Error::Invalid(format!("tensor `{}`: misaligned chunk", t.name)))?;
                let len = t.dtype.bytes_for(n as u64).ok_or_else(|| Error::Invalid(format!("tensor `{}`: misaligned chunk", t.name)))?;
                let mut raw = vec![0u8; len as usize];
                file.read_at(offset + start, &mut raw)?;
                if same_storage(t.dtype, d.ty) || int_type == Some(d.ty) {
                    sink(&raw)?;
                } else {
                    let f = to_f32(t.dtype, &raw, n)?;
                    drop(raw);
                    sink(&encode(d.ty, &f, row_len)?)?;
                }
                consumed += len;
                done += n;
            }
            Ok(consumed)
        }
        _ => {
            let f = t.read_f32()?;
            sink(&encode(d.ty, &f, row_len)?)?;
            Ok(t.nbytes())
        }
    }
}
