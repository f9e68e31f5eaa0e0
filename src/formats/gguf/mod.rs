//! GGUF: the one file format sdrs runs from (and reads from stable-diffusion.cpp).
//!
//! Layout (v3): magic, version, tensor count, metadata count, metadata key/values,
//! tensor directory (name, dims in ggml order, type, offset), padding to the
//! alignment, then tensor data, each tensor aligned.
pub mod metadata;
mod reader;
mod value;
mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub use reader::{GgufFile, TensorInfo, INTERLEAVED_Q4_0};
pub use value::{ty, Value};
pub use writer::{TensorEntry, Writer};

use super::source::{Checkpoint, DType, SourceFile, SourceFormat, SourceTensor, TensorData};
use crate::error::{Error, Result};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const MAX_DIMS: usize = 4;

/// Whether `path` is to be read as a GGUF rather than a checkpoint: its name ends in
/// `.gguf` (so a damaged GGUF says what is wrong with it as one) or it starts with the
/// GGUF magic. Folders are not.
pub fn is_gguf(path: &Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(false);
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return Ok(true);
    }
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = std::io::Read::read(&mut f, &mut magic).map_err(|e| Error::io(path, e))?;
    Ok(n == 4 && &magic == GGUF_MAGIC)
}

/// Opens a GGUF file as a conversion input (ours, or stable-diffusion.cpp's, whose
/// tensors keep the original checkpoint names). Tensors whose original shape was
/// recorded by our converter get it back.
pub fn open_checkpoint(path: &Path) -> Result<Checkpoint> {
    let g = GgufFile::open(path)?;
    let file = SourceFile::open(path)?;
    let shapes = metadata::original_shapes(&g);
    let tensors = g
        .tensors
        .iter()
        .map(|t| SourceTensor {
            name: t.name.clone(),
            shape: shapes
                .get(&t.name)
                .cloned()
                .unwrap_or_else(|| t.torch_shape()),
            dtype: DType::Ggml(t.ty),
            data: TensorData::Raw {
                file: Arc::clone(&file),
                offset: g.data_offset + t.offset,
            }
            .interleaved_if(
                t.interleaved,
                &t.name,
                &t.torch_shape(),
                DType::Ggml(t.ty),
            ),
        })
        .collect();
    let metadata: BTreeMap<String, String> = g
        .metadata
        .iter()
        .filter(|(_, v)| !matches!(v, Value::Array(..)))
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            )
        })
        .collect();
    Ok(Checkpoint {
        path: path.to_path_buf(),
        format: SourceFormat::Gguf,
        tensors,
        metadata,
        tokenizer: None,
    })
}
