//! Weights for ggml graphs. From a GGUF they are used in place from the memory map
//! (one ggml context holds their metadata, their data stays in the mapping: no
//! copy, no conversion at load). Small standalone files (TAESD `.pth`) are copied
//! into CPU memory as f32 instead.
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::formats::Checkpoint;
use crate::ggml::{Backend, Context, Tensor, Type};

pub struct Weights<'g> {
    path: PathBuf,
    ctx: Context<'g>,
}

impl<'g> Weights<'g> {
    /// Maps every tensor whose name satisfies `keep`.
    pub fn load(gguf: &'g GgufFile, keep: impl Fn(&str) -> bool) -> Result<Self> {
        let infos: Vec<_> = gguf.tensors.iter().filter(|t| keep(&t.name)).collect();
        let ctx = Context::new(infos.len() + 1)?;
        let region = ctx.borrow_host(gguf.bytes())?;
        for t in infos {
            let ne: Vec<usize> = t.ne.iter().map(|&d| d as usize).collect();
            let tensor = ctx.tensor(t.ty, &ne, &t.name).map_err(|e| Error::format(&gguf.path, format!("tensor `{}`: {e}", t.name)))?;
            ctx.place(&region, tensor, (gguf.data_offset + t.offset) as usize)?;
        }
        Ok(Weights { path: gguf.path.clone(), ctx })
    }

    /// The weight called `name`.
    pub fn get(&self, name: &str) -> Result<Tensor<'_>> {
        self.ctx.get(name).ok_or_else(|| Error::format(&self.path, format!("missing tensor `{name}`")))
    }

    /// A weight that may be absent (biases of bias-free layers).
    pub fn opt(&self, name: &str) -> Option<Tensor<'_>> {
        self.ctx.get(name)
    }
}

impl Weights<'static> {
    /// Copies every float tensor of a checkpoint into CPU memory as f32.
    pub fn from_checkpoint(ck: &Checkpoint, backend: &Backend) -> Result<Self> {
        let floats: Vec<_> = ck.tensors.iter().filter(|t| t.dtype.is_float()).collect();
        let ctx = Context::new(floats.len() + 1)?;
        let mut made = Vec::with_capacity(floats.len());
        for t in &floats {
            let mut ne: Vec<usize> = t.shape.iter().rev().copied().collect();
            if ne.is_empty() {
                ne.push(1);
            }
            if ne.len() > 4 {
                return Err(Error::format(&ck.path, format!("tensor `{}` has {} dimensions", t.name, ne.len())));
            }
            made.push(ctx.tensor(Type::F32, &ne, &t.name)?);
        }
        ctx.alloc_cpu(backend)?;
        for (t, tensor) in floats.iter().zip(made) {
            ctx.set_f32(tensor, &t.read_f32()?)?;
        }
        Ok(Weights { path: ck.path.clone(), ctx })
    }
}
