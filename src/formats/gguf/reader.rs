//! GGUF reader over a memory map: metadata parsed up front, tensor data viewed in
//! place (zero copy).
use std::path::{Path, PathBuf};

use super::value::{ty, Value};
use super::{GGUF_MAGIC, MAX_DIMS};
use crate::error::{Error, Result};
use crate::ggml::{self, Type};

/// One tensor's directory entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` is the innermost (contiguous) dimension.
    pub ne: Vec<u64>,
    pub ty: Type,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub nbytes: u64,
    /// A q4_0 matrix stored in the interleaved layout of [`ggml::repack`] (listed
    /// under [`INTERLEAVED_Q4_0`]); its plain bytes come from [`GgufFile::plain`].
    pub interleaved: bool,
}

/// Metadata key: the names of the q4_0 matrices stored interleaved by 8 rows
/// ([`ggml::repack`]), the layout ggml's x86 integer GEMM reads in place.
pub const INTERLEAVED_Q4_0: &str = "sd.layout.q4_0x8";

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.ne.iter().product()
    }
    /// Shape in PyTorch order (outermost first).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A GGUF file mapped into memory.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    map: Bytes,
}

/// Where a GGUF's bytes live: a file mapping, or bytes built into the binary.
enum Bytes {
    Map(ggml::Mapped),
    Static(&'static [u8]),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Static(b) => b,
        }
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let map = ggml::map_file(&file).map_err(|e| Error::io(path, e))?;
        Self::parse(path, Bytes::Map(map))
    }

    /// A GGUF held in static memory (a model built into the binary). `name` stands in
    /// for the path in messages. ggml uses the tensors in place, so the bytes must be
    /// aligned as a mapping would be (see `demo`).
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Result<GgufFile> {
        Self::parse(Path::new(name), Bytes::Static(bytes))
    }

    fn parse(path: &Path, map: Bytes) -> Result<GgufFile> {
        let mut p = Parser {
            buf: &map,
            pos: 0,
            path,
        };
        let (version, metadata, mut tensors, data_offset, alignment) = p.parse()?;
        mark_interleaved(path, &metadata, &mut tensors)?;
        let file = GgufFile {
            path: path.to_path_buf(),
            version,
            alignment,
            metadata,
            tensors,
            data_offset,
            map,
        };
        file.check_intact()?;
        Ok(file)
    }

    /// An error if the file shrank while mapped: what was read of its lost pages came
    /// back as zeros ([`ggml::Mapped::intact`]), so anything computed since is void.
    pub fn check_intact(&self) -> Result<()> {
        match &self.map {
            Bytes::Map(m) if !m.intact() => Err(Error::format(&self.path, "the file was truncated or rewritten while in use: reads past its new end came back as zeros, so this run's results were dropped (reopen the model)")),
            _ => Ok(()),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Lets the pages of every tensor whose name satisfies `which` go from this
    /// process's resident memory (see [`ggml::release_pages`]); they fault back in if
    /// read again. Nothing to do for a model built into the binary.
    pub fn release(&self, which: impl Fn(&str) -> bool) {
        let Bytes::Map(map) = &self.map else { return };
        let mut ranges: Vec<(u64, u64)> = self
            .tensors
            .iter()
            .filter(|t| which(&t.name))
            .map(|t| (self.data_offset + t.offset, t.nbytes))
            .collect();
        ranges.sort_unstable();
        // Neighbouring tensors (separated by alignment padding only) merge into one call.
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, len) in ranges {
            match merged.last_mut() {
                Some((s, l)) if start <= *s + *l + self.alignment => {
                    *l = (start + len).max(*s + *l) - *s
                }
                _ => merged.push((start, len)),
            }
        }
        for (start, len) in merged {
            ggml::release_pages(map, start as usize, len as usize);
        }
    }

    /// [`GgufFile::release`] for one tensor.
    pub fn release_tensor(&self, t: &TensorInfo) {
        if let Bytes::Map(map) = &self.map {
            ggml::release_pages(
                map,
                (self.data_offset + t.offset) as usize,
                t.nbytes as usize,
            );
        }
    }

    /// The tensor's plain bytes (ggml's layout for its type): in place in the mapping,
    /// or un-interleaved from it.
    pub fn plain(&self, t: &TensorInfo) -> Result<std::borrow::Cow<'_, [u8]>> {
        if !t.interleaved {
            return Ok(self.data(t).into());
        }
        ggml::repack::deinterleave_q4_0(self.data(t), t.ne[0] as usize)
            .map(Into::into)
            .map_err(|e| Error::format(&self.path, format!("tensor `{}`: {e}", t.name)))
    }

    /// The tensor's bytes as stored, in place in the mapping (interleaved ones too:
    /// see [`GgufFile::plain`]).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        // Bounds were validated at open time.
        &self.map[start..start + t.nbytes as usize]
    }

    /// The whole mapping (for zero-copy use by ggml: tensor `t` starts at
    /// `data_offset + t.offset`).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }
}

/// Marks the tensors listed under [`INTERLEAVED_Q4_0`], each checked to be a q4_0
/// matrix that layout can hold.
fn mark_interleaved(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &mut [TensorInfo],
) -> Result<()> {
    let Some((_, list)) = metadata.iter().find(|(k, _)| k == INTERLEAVED_Q4_0) else {
        return Ok(());
    };
    let bad = |what: String| Error::format(path, format!("metadata `{INTERLEAVED_Q4_0}`: {what}"));
    let names = list
        .as_array()
        .ok_or_else(|| bad("is not an array of tensor names".into()))?;
    let index: std::collections::HashMap<&str, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut marked = Vec::with_capacity(names.len());
    for n in names {
        let n = n
            .as_str()
            .ok_or_else(|| bad("holds a value that is not a string".into()))?;
        let i = *index
            .get(n)
            .ok_or_else(|| bad(format!("names `{n}`, which the file lacks")))?;
        let t = &tensors[i];
        if !ggml::repack::can_interleave(t.ty, &t.ne) {
            return Err(bad(format!(
                "names `{n}`, a {} tensor {:?}: only q4_0 matrices of 8-row groups are stored interleaved",
                t.ty.name(),
                t.ne
            )));
        }
        marked.push(i);
    }
    for i in marked {
        tensors[i].interleaved = true;
    }
    Ok(())
}

struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

/// Smallest possible encodings, used to refuse counts the file cannot hold before
/// allocating anything for them.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
const MAX_STRING: u64 = 1 << 30;

impl<'a> Parser<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(
            self.path,
            format!("invalid GGUF at byte {}: {msg}", self.pos),
        )
    }
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let n_us = usize::try_from(n).map_err(|_| self.err("length overflows"))?;
        let end = self
            .pos
            .checked_add(n_us)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                self.err(format!(
                    "needs {n} more bytes but the file ends (truncated?)"
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(self.err(format!("string of {n} bytes")));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    fn value(&mut self, t: u32, depth: u32) -> Result<Value> {
        Ok(match t {
            ty::U8 => Value::U8(self.u8()?),
            ty::I8 => Value::I8(self.u8()? as i8),
            ty::U16 => Value::U16(self.u16()?),
            ty::I16 => Value::I16(self.u16()? as i16),
            ty::U32 => Value::U32(self.u32()?),
            ty::I32 => Value::I32(self.u32()? as i32),
            ty::F32 => Value::F32(f32::from_bits(self.u32()?)),
            ty::BOOL => match self.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("bool byte {b}"))),
            },
            ty::STRING => Value::String(self.string()?),
            ty::U64 => Value::U64(self.u64()?),
            ty::I64 => Value::I64(self.u64()? as i64),
            ty::F64 => Value::F64(f64::from_bits(self.u64()?)),
            ty::ARRAY => {
                if depth > 4 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let et = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least one byte: refuse counts the file cannot hold.
                if n > self.remaining() {
                    return Err(self.err(format!(
                        "array of {n} elements in {} remaining bytes",
                        self.remaining()
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                Value::Array(et, v)
            }
            other => return Err(self.err(format!("unknown value type {other}"))),
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(&mut self) -> Result<(u32, Vec<(String, Value)>, Vec<TensorInfo>, u64, u64)> {
        if self.buf.len() < 4 || self.take(4)? != GGUF_MAGIC {
            return Err(Error::format(self.path, "not a GGUF file (bad magic)"));
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(self.err(format!(
                "unsupported GGUF version {version} (2 and 3 are supported)"
            )));
        }
        let n_tensors = self.u64()?;
        let n_kv = self.u64()?;
        let room = self.remaining();
        if n_kv.checked_mul(MIN_KV_BYTES).is_none_or(|b| b > room) {
            return Err(self.err(format!(
                "{n_kv} metadata entries cannot fit in a {}-byte file",
                self.buf.len()
            )));
        }
        if n_tensors
            .checked_mul(MIN_TENSOR_INFO_BYTES)
            .is_none_or(|b| b > room)
        {
            return Err(self.err(format!(
                "{n_tensors} tensors cannot fit in a {}-byte file",
                self.buf.len()
            )));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        // A set, not a scan of the list: a file of many tiny entries would otherwise
        // cost quadratic time.
        let mut keys = std::collections::HashSet::new();
        for _ in 0..n_kv {
            let key = self.string()?;
            let t = self.u32()?;
            let v = self.value(t, 0)?;
            if !keys.insert(key.clone()) {
                return Err(self.err(format!("duplicate metadata key `{key}`")));
            }
            metadata.push((key, v));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(self.err(format!("general.alignment {v} is not a power of two"))),
            },
            None => super::DEFAULT_ALIGNMENT,
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for _ in 0..n_tensors {
            let name = self.string()?;
            if name.len() >= ggml::max_name_len() {
                return Err(self.err(format!(
                    "tensor name `{name}` is {} bytes; ggml holds at most {}",
                    name.len(),
                    ggml::max_name_len() - 1
                )));
            }
            let nd = self.u32()?;
            if nd == 0 || nd as usize > MAX_DIMS {
                return Err(self.err(format!("tensor `{name}` has {nd} dimensions")));
            }
            let mut ne = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                ne.push(self.u64()?);
            }
            let tid = self.u32()?;
            let ty = Type::from_id(tid)
                .ok_or_else(|| self.err(format!("tensor `{name}` has unknown ggml type {tid}")))?;
            let offset = self.u64()?;
            // An empty dimension would hide any size in the others from the product.
            let numel = ne
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0 && n < 1 << 50)
                .ok_or_else(|| self.err(format!("tensor `{name}` has absurd shape {ne:?}")))?;
            if ne[0] % ty.block_size() as u64 != 0 {
                return Err(self.err(format!(
                    "tensor `{name}`: row of {} is not whole {} blocks",
                    ne[0],
                    ty.name()
                )));
            }
            let nbytes = ty
                .bytes_for(numel)
                .ok_or_else(|| self.err(format!("tensor `{name}` size overflows")))?;
            if offset % alignment != 0 {
                return Err(self.err(format!(
                    "tensor `{name}` offset {offset} is not aligned to {alignment}"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(self.err(format!("duplicate tensor `{name}`")));
            }
            tensors.push(TensorInfo {
                name,
                ne,
                ty,
                offset,
                nbytes,
                interleaved: false,
            });
        }
        let data_offset = (self.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (self.buf.len() as u64).saturating_sub(data_offset);
        for t in &tensors {
            if t.offset
                .checked_add(t.nbytes)
                .is_none_or(|end| end > data_len)
            {
                return Err(Error::format(
                    self.path,
                    format!("tensor `{}` needs data bytes {}..{} but the data section has {data_len} (truncated?)", t.name, t.offset, t.offset.saturating_add(t.nbytes)),
                ));
            }
        }
        Ok((version, metadata, tensors, data_offset, alignment))
    }
}
