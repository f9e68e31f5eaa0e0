//! Weights used in place from a memory-mapped GGUF: one ggml context holds their
//! metadata, their data stays in the mapping (no copy, no conversion at load).
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::ggml::{Context, Tensor};

pub struct Weights<'g> {
    pub gguf: &'g GgufFile,
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
        Ok(Weights { gguf, ctx })
    }

    /// The weight called `name`.
    pub fn get(&self, name: &str) -> Result<Tensor<'_>> {
        self.ctx.get(name).ok_or_else(|| Error::format(&self.gguf.path, format!("missing tensor `{name}`")))
    }

    /// A weight that may be absent (biases of bias-free layers).
    pub fn opt(&self, name: &str) -> Option<Tensor<'_>> {
        self.ctx.get(name)
    }
}
