//! The common shape of every input: tensors with canonical names, shapes, element
//! types and a recipe to fetch their bytes.
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ggml;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    /// A ggml block type from a GGUF input (quantized or not).
    Ggml(ggml::Type),
}

impl DType {
    /// Bytes taken by `n` elements stored contiguously. For ggml types `n` must be
    /// a multiple of the block size; returns `None` otherwise.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let s = match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::Ggml(t) => return t.bytes_for(n),
        };
        n.checked_mul(s)
    }
    pub fn is_float(self) -> bool {
        match self {
            DType::F64 | DType::F32 | DType::F16 | DType::BF16 => true,
            DType::Ggml(t) => t.is_float_or_quant(),
            _ => false,
        }
    }
    pub fn name(self) -> String {
        match self {
            DType::Ggml(t) => t.name().to_string(),
            other => format!("{other:?}"),
        }
    }
}

/// An open input file. Tensor bytes are read with positioned reads, never through a
/// shared mapping, so converting a model keeps resident memory at one tensor.
#[derive(Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
}

impl SourceFile {
    pub fn open(path: &Path) -> Result<Arc<SourceFile>> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(Arc::new(SourceFile {
            path: path.to_path_buf(),
            file,
            len,
        }))
    }
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::format(
                    &self.path,
                    format!(
                        "file ends before byte {} (truncated?)",
                        offset + buf.len() as u64
                    ),
                )
            } else {
                Error::io(&self.path, e)
            }
        })
    }
}

/// Where a tensor's elements come from.
#[derive(Clone, Debug)]
pub enum TensorData {
    /// Contiguous little-endian row-major elements at `offset` in `file`.
    Raw { file: Arc<SourceFile>, offset: u64 },
    /// Several tensors stacked along the outermost axis (OpenCLIP's `in_proj_weight`
    /// from separate q, k and v projections).
    Concat(Vec<SourceTensor>),
    /// A 2-D tensor stored transposed (OpenCLIP `text_projection` vs a linear weight).
    Transpose(Box<SourceTensor>),
    /// A q4_0 matrix stored interleaved by 8 rows (our GGUF's x86 layout,
    /// [`crate::ggml::repack`]); it reads back plain.
    Interleaved(Box<SourceTensor>),
}

impl TensorData {
    /// This data as read by a tensor of `shape` that is stored interleaved if `yes`.
    pub fn interleaved_if(self, yes: bool, name: &str, shape: &[usize], dtype: DType) -> Self {
        if !yes {
            return self;
        }
        TensorData::Interleaved(Box::new(SourceTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            data: self,
        }))
    }
}

/// One tensor of an input, under its canonical name.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub name: String,
    /// PyTorch order, outermost first.
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: TensorData,
}

impl SourceTensor {
    /// Elements in the tensor. A count past u64 reads as `u64::MAX`, which no dtype's
    /// size fits, so `validate` refuses it. A zero dimension makes it 0 whatever the
    /// others claim: a plain product would overflow on `[2^40, 2^40, 0]` first (the
    /// `gguf` fuzzer's find, stop 27).
    pub fn numel(&self) -> u64 {
        if self.shape.contains(&0) {
            return 0;
        }
        self.shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .unwrap_or(u64::MAX)
    }
    /// Stored size in bytes.
    pub fn nbytes(&self) -> u64 {
        self.dtype.bytes_for(self.numel()).unwrap_or(0)
    }

    /// Checks that a raw tensor's bytes lie inside its file (so truncation is found
    /// when the file is opened, not halfway through a conversion).
    pub fn validate(&self) -> Result<()> {
        match &self.data {
            TensorData::Raw { file, offset } => {
                let n = self.dtype.bytes_for(self.numel()).ok_or_else(|| {
                    Error::format(
                        &file.path,
                        format!(
                            "tensor `{}`: shape {:?} does not fit type {}",
                            self.name,
                            self.shape,
                            self.dtype.name()
                        ),
                    )
                })?;
                match offset.checked_add(n) {
                    Some(end) if end <= file.len => Ok(()),
                    _ => Err(Error::format(
                        &file.path,
                        format!("tensor `{}` needs bytes {}..{} but the file has {} (truncated or corrupt)", self.name, offset, offset.saturating_add(n), file.len),
                    )),
                }
            }
            TensorData::Concat(parts) => parts.iter().try_for_each(|p| p.validate()),
            TensorData::Transpose(t) | TensorData::Interleaved(t) => t.validate(),
        }
    }

    /// The tensor's raw bytes in its own dtype (only for `Raw` data).
    pub fn read_raw(&self) -> Result<Vec<u8>> {
        match &self.data {
            TensorData::Raw { file, offset } => {
                let n = self.nbytes() as usize;
                let mut buf = vec![0u8; n];
                file.read_at(*offset, &mut buf)?;
                Ok(buf)
            }
            TensorData::Interleaved(t) => {
                // The stored matrix's rows (the outer shape may be a 4-D kernel's).
                let row = t.shape.last().copied().unwrap_or(0);
                crate::ggml::repack::deinterleave_q4_0(&t.read_raw()?, row)
                    .map_err(|e| Error::Invalid(format!("tensor `{}`: {e}", self.name)))
            }
            _ => {
                let v = self.read_f32()?;
                Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        }
    }

    /// All elements as f32, in row-major order of `shape`.
    pub fn read_f32(&self) -> Result<Vec<f32>> {
        match &self.data {
            TensorData::Raw { .. } | TensorData::Interleaved(_) => {
                let raw = self.read_raw()?;
                to_f32(self.dtype, &raw, self.numel() as usize).ok_or_else(|| {
                    Error::Invalid(format!(
                        "tensor `{}`: cannot convert {} to f32",
                        self.name,
                        self.dtype.name()
                    ))
                })
            }
            TensorData::Concat(parts) => {
                let mut out = Vec::with_capacity(self.numel() as usize);
                for p in parts {
                    out.extend(p.read_f32()?);
                }
                Ok(out)
            }
            TensorData::Transpose(t) => {
                let v = t.read_f32()?;
                let (r, c) = match t.shape.as_slice() {
                    [r, c] => (*r, *c),
                    _ => {
                        return Err(Error::Invalid(format!(
                            "tensor `{}`: transpose of a non-2-D tensor",
                            self.name
                        )))
                    }
                };
                let mut out = vec![0f32; v.len()];
                for i in 0..r {
                    for j in 0..c {
                        out[j * r + i] = v[i * c + j];
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Converts `n` little-endian elements of `dtype` to f32.
pub fn to_f32(dtype: DType, raw: &[u8], n: usize) -> Option<Vec<f32>> {
    use half::{bf16, f16};
    let v = match dtype {
        DType::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => raw
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => raw
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::F64 => raw
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        DType::I64 => raw
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        DType::I32 => raw
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
            .collect(),
        DType::I16 => raw
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32)
            .collect(),
        DType::I8 => raw.iter().map(|&b| b as i8 as f32).collect(),
        DType::U8 | DType::Bool => raw.iter().map(|&b| b as f32).collect(),
        DType::Ggml(t) => return t.dequantize(raw, n).ok(),
    };
    Some(v)
}

/// Which kind of file a checkpoint came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    Safetensors,
    Ckpt,
    Diffusers,
    Gguf,
}

/// Tokenizer files found beside a model (diffusers `tokenizer/`), if any.
#[derive(Clone, Debug, Default)]
pub struct TokenizerFiles {
    /// `vocab.json` content.
    pub vocab_json: Option<String>,
    /// `merges.txt` content.
    pub merges_txt: Option<String>,
}

/// A model checkpoint opened for reading, in canonical naming.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub format: SourceFormat,
    pub tensors: Vec<SourceTensor>,
    /// Free-form string metadata found in the input (safetensors `__metadata__`,
    /// diffusers config values such as `prediction_type`).
    pub metadata: BTreeMap<String, String>,
    pub tokenizer: Option<TokenizerFiles>,
}

impl Checkpoint {
    /// Opens any supported input: a `.safetensors` file, a `.ckpt`/`.pt`/`.pth`/`.bin`
    /// torch zip, a diffusers folder, or a GGUF file.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        if path.is_dir() {
            return super::diffusers::open(path);
        }
        let f = SourceFile::open(path)?;
        let mut magic = [0u8; 9];
        let n = (f.len as usize).min(9);
        f.read_at(0, &mut magic[..n])?;
        let ck = if &magic[..4.min(n)] == b"GGUF" {
            super::gguf::open_checkpoint(path)?
        } else if n == 9 && magic[8] == b'{' {
            // safetensors: 8-byte header length, then the JSON header.
            super::safetensors::open(path)?
        } else if &magic[..2.min(n)] == b"PK" || magic[0] == 0x80 {
            // Torch zip archives; a bare pickle (pre-1.6 torch) gets ckpt's explanation.
            super::ckpt::open(path)?
        } else if n >= 8 {
            super::safetensors::open(path)?
        } else {
            return Err(Error::format(
                path,
                format!("{} bytes is too short for any model format", f.len),
            ));
        };
        let mut ck = ck;
        ck.canonicalize_names();
        for t in &ck.tensors {
            t.validate()?;
        }
        Ok(ck)
    }

    /// Maps older spellings of the original single-file names onto the canonical
    /// ones: SD 1.x files saved with transformers before 4.x name the CLIP tower
    /// `cond_stage_model.transformer.*` without the `text_model.` level.
    fn canonicalize_names(&mut self) {
        const OLD: &str = "cond_stage_model.transformer.";
        const NEW: &str = "cond_stage_model.transformer.text_model.";
        let has_new = self.tensors.iter().any(|t| t.name.starts_with(NEW));
        if has_new {
            return;
        }
        for t in &mut self.tensors {
            if let Some(rest) = t.name.strip_prefix(OLD) {
                t.name = format!("{NEW}{rest}");
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&SourceTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_counts_past_u64_are_refused_and_a_zero_dimension_counts_zero() {
        let tmp = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(tmp.path(), [0u8; 64]).expect("write");
        let file = SourceFile::open(tmp.path()).expect("open");
        let t = |shape: Vec<usize>| SourceTensor {
            name: "w".into(),
            shape,
            dtype: DType::F32,
            data: TensorData::Raw {
                file: file.clone(),
                offset: 0,
            },
        };
        // The gguf fuzzer's find: ggml order [0, 2^40, 2^40] passes the reader's checked
        // product; PyTorch order multiplied the two large dimensions first.
        let empty = t(vec![1 << 40, 1 << 40, 0]);
        assert_eq!(empty.numel(), 0);
        assert!(empty.validate().is_ok());
        let huge = t(vec![1 << 40, 1 << 40, 16]);
        assert_eq!(huge.numel(), u64::MAX);
        let e = huge
            .validate()
            .expect_err("2^84 elements cannot lie in 64 bytes")
            .to_string();
        assert!(e.contains("does not fit type"), "{e}");
        assert!(t(vec![4, 4]).validate().is_ok());
    }
}
