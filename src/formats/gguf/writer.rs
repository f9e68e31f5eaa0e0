//! Streaming GGUF writer: the header first (every tensor's type and shape is known
//! before any data), then tensor data in order, in chunks of any size.
use std::io::Write;

use super::value::Value;
use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::error::{Error, Result};
use crate::ggml::Type;

/// A tensor to be written.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    /// ggml order (innermost first).
    pub ne: Vec<u64>,
    pub ty: Type,
}

impl TensorEntry {
    pub fn nbytes(&self) -> Option<u64> {
        self.ty.bytes_for(self.ne.iter().product())
    }
}

pub struct Writer<W: Write> {
    out: W,
    alignment: u64,
    sizes: Vec<u64>,
    names: Vec<String>,
    /// Index of the tensor being written and bytes of it written so far.
    current: usize,
    done_in_current: u64,
    pos: u64,
    /// File offsets of the bytes of each string metadata value.
    string_offsets: Vec<(String, u64)>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend(x.to_le_bytes()),
        Value::I16(x) => b.extend(x.to_le_bytes()),
        Value::U32(x) => b.extend(x.to_le_bytes()),
        Value::I32(x) => b.extend(x.to_le_bytes()),
        Value::F32(x) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_str(b, s),
        Value::U64(x) => b.extend(x.to_le_bytes()),
        Value::I64(x) => b.extend(x.to_le_bytes()),
        Value::F64(x) => b.extend(x.to_le_bytes()),
        Value::Array(et, items) => {
            if *et == super::value::ty::ARRAY {
                return Err(Error::Invalid(
                    "GGUF writer: nested arrays are not readable by ggml".into(),
                ));
            }
            b.extend(et.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for it in items {
                if it.type_id() != *et {
                    return Err(Error::Invalid(format!(
                        "GGUF writer: array of type {et} holds a {}",
                        it.type_id()
                    )));
                }
                put_value(b, it)?;
            }
        }
    }
    Ok(())
}

fn io(e: std::io::Error) -> Error {
    Error::io("<gguf output>", e)
}

impl<W: Write> Writer<W> {
    /// Writes the header. `metadata` must not contain `general.alignment` (it is
    /// written from `alignment` when that is not the default).
    pub fn new(
        mut out: W,
        metadata: &[(String, Value)],
        tensors: &[TensorEntry],
        alignment: Option<u64>,
    ) -> Result<Self> {
        let alignment = alignment.unwrap_or(DEFAULT_ALIGNMENT);
        let mut kv: Vec<(String, Value)> = metadata.to_vec();
        if alignment != DEFAULT_ALIGNMENT {
            kv.push(("general.alignment".into(), Value::U32(alignment as u32)));
        }
        let mut h = Vec::with_capacity(1 << 16);
        h.extend(GGUF_MAGIC);
        h.extend(3u32.to_le_bytes());
        h.extend((tensors.len() as u64).to_le_bytes());
        h.extend((kv.len() as u64).to_le_bytes());
        let mut string_offsets = Vec::new();
        for (k, v) in &kv {
            put_str(&mut h, k);
            h.extend(v.type_id().to_le_bytes());
            if matches!(v, Value::String(_)) {
                string_offsets.push((k.clone(), h.len() as u64 + 8));
            }
            put_value(&mut h, v)?;
        }
        let mut offset = 0u64;
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in tensors {
            if t.name.len() >= crate::ggml::max_name_len() {
                return Err(Error::Invalid(format!(
                    "tensor name `{}` is longer than ggml's limit of {}",
                    t.name,
                    crate::ggml::max_name_len() - 1
                )));
            }
            let n = t.nbytes().ok_or_else(|| {
                Error::Invalid(format!(
                    "tensor `{}`: {:?} is not whole {} blocks",
                    t.name,
                    t.ne,
                    t.ty.name()
                ))
            })?;
            put_str(&mut h, &t.name);
            h.extend((t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                h.extend(d.to_le_bytes());
            }
            h.extend(t.ty.id().to_le_bytes());
            h.extend(offset.to_le_bytes());
            sizes.push(n);
            offset = (offset + n).div_ceil(alignment) * alignment;
        }
        let pad = (h.len() as u64).div_ceil(alignment) * alignment - h.len() as u64;
        h.resize(h.len() + pad as usize, 0);
        out.write_all(&h).map_err(io)?;
        let mut w = Writer {
            out,
            alignment,
            sizes,
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            current: 0,
            done_in_current: 0,
            pos: 0,
            string_offsets,
        };
        w.skip_empty();
        Ok(w)
    }

    fn skip_empty(&mut self) {
        while self.current < self.sizes.len() && self.sizes[self.current] == 0 {
            self.current += 1;
        }
    }

    /// Appends bytes of the current tensor; moves to the next one when it is complete.
    pub fn write_chunk(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let Some(&size) = self.sizes.get(self.current) else {
                return Err(Error::Invalid(
                    "GGUF writer: more data than the header announced".into(),
                ));
            };
            let take = ((size - self.done_in_current) as usize).min(data.len());
            self.out.write_all(&data[..take]).map_err(io)?;
            self.done_in_current += take as u64;
            self.pos += take as u64;
            data = &data[take..];
            if self.done_in_current == size {
                let padded = self.pos.div_ceil(self.alignment) * self.alignment;
                if padded > self.pos {
                    self.out
                        .write_all(&vec![0u8; (padded - self.pos) as usize])
                        .map_err(io)?;
                    self.pos = padded;
                }
                self.current += 1;
                self.done_in_current = 0;
                self.skip_empty();
            }
        }
        Ok(())
    }

    /// Where the bytes of string value `key` sit in the file, so a value of fixed
    /// length (a digest computed while the data streams) can be filled in afterwards.
    pub fn string_value_offset(&self, key: &str) -> Option<u64> {
        self.string_offsets
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, o)| *o)
    }

    /// Name of the tensor whose bytes are expected next.
    pub fn expecting(&self) -> Option<&str> {
        self.names.get(self.current).map(|s| s.as_str())
    }

    /// Checks every tensor was written in full and returns the output.
    pub fn finish(mut self) -> Result<W> {
        if self.current != self.sizes.len() {
            return Err(Error::Invalid(format!(
                "GGUF writer: tensor `{}` was not written in full",
                self.names[self.current]
            )));
        }
        self.out.flush().map_err(io)?;
        Ok(self.out)
    }
}
