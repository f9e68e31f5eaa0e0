//! Single-file `.safetensors` checkpoints (and the components of diffusers folders).
//!
//! The header is parsed and validated by the `safetensors` crate over a memory map
//! (only the header's pages are touched); tensor bytes are then read on demand with
//! positioned reads.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};

use super::source::{Checkpoint, DType, SourceFile, SourceFormat, SourceTensor, TensorData};
use crate::error::{Error, Result};

/// Opens a `.safetensors` file as a checkpoint with the names it stores.
pub fn open(path: &Path) -> Result<Checkpoint> {
    let (tensors, metadata) = read_tensors(path)?;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        format: SourceFormat::Safetensors,
        tensors,
        metadata,
        tokenizer: None,
    })
}

/// Reads the tensor directory of a `.safetensors` file.
pub fn read_tensors(path: &Path) -> Result<(Vec<SourceTensor>, BTreeMap<String, String>)> {
    let file = SourceFile::open(path)?;
    if file.len < 8 {
        return Err(Error::format(
            path,
            "not a safetensors file: shorter than its 8-byte header length",
        ));
    }
    // Only the header's pages are touched, and the map is dropped before returning.
    let map = crate::ggml::map_file(&file.file).map_err(|e| Error::io(&file.path, e))?;
    let (header_len, meta) = SafeTensors::read_metadata(&map)
        .map_err(|e| Error::format(path, format!("invalid safetensors header: {e}")))?;
    if !map.intact() {
        return Err(Error::format(
            path,
            "the file was truncated while its header was read",
        ));
    }
    drop(map);
    let data_start = 8 + header_len as u64;
    let mut tensors = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            Dtype::F64 => DType::F64,
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            Dtype::I16 => DType::I16,
            Dtype::I8 => DType::I8,
            Dtype::U8 => DType::U8,
            Dtype::BOOL => DType::Bool,
            other => {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` has unsupported dtype {other:?}"),
                ))
            }
        };
        tensors.push(SourceTensor {
            name: name.clone(),
            shape: info.shape.clone(),
            dtype,
            data: TensorData::Raw {
                file: file.clone(),
                offset: data_start + info.data_offsets.0 as u64,
            },
        });
    }
    // The crate hands out a hash map: restore file order so output order is stable.
    tensors.sort_by_key(|t| match t.data {
        TensorData::Raw { offset, .. } => offset,
        _ => 0,
    });
    let metadata = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok((tensors, metadata))
}

/// A tensor to be written by [`write`].
pub struct WriteSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

fn dtype_str(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F64 => "F64",
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::I16 => "I16",
        DType::I8 => "I8",
        DType::U8 => "U8",
        DType::Bool => "BOOL",
        DType::Ggml(t) => {
            return Err(Error::Invalid(format!(
                "safetensors cannot store ggml type {}",
                t.name()
            )))
        }
    })
}

/// Streams a `.safetensors` file: the header from `specs`, then each tensor's bytes
/// as `fill(i, out)` writes them (exactly the spec's byte count).
pub fn write<W: Write>(
    out: &mut W,
    specs: &[WriteSpec],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|e| Error::Invalid(e.to_string()))?,
        );
    }
    let mut offset = 0u64;
    let mut sizes = Vec::with_capacity(specs.len());
    for s in specs {
        let n: u64 = s.shape.iter().map(|&d| d as u64).product();
        let bytes = s
            .dtype
            .bytes_for(n)
            .ok_or_else(|| Error::Invalid(format!("tensor `{}`: bad size", s.name)))?;
        header.insert(
            s.name.clone(),
            serde_json::json!({ "dtype": dtype_str(s.dtype)?, "shape": s.shape, "data_offsets": [offset, offset + bytes] }),
        );
        sizes.push(bytes);
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| Error::Invalid(e.to_string()))?;
    // Pad the header so tensor data starts 8-byte aligned, as the reference writer does.
    while (8 + json.len()) % 8 != 0 {
        json.push(b' ');
    }
    let io = |e: std::io::Error| Error::io("<safetensors output>", e);
    out.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&json).map_err(io)?;
    let mut buf = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        buf.clear();
        fill(i, &mut buf)?;
        if buf.len() as u64 != sizes[i] {
            return Err(Error::Invalid(format!(
                "tensor `{}`: wrote {} bytes, expected {}",
                s.name,
                buf.len(),
                sizes[i]
            )));
        }
        out.write_all(&buf).map_err(io)?;
    }
    Ok(())
}
