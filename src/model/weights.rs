//! Weights for ggml graphs. From a GGUF they are used in place from the memory map
//! (one ggml context holds their metadata, their data stays in the mapping: no
//! copy, no conversion at load). Small standalone files (TAESD `.pth`) are copied
//! into CPU memory as f32 instead.
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, TensorInfo};
use crate::formats::Checkpoint;
use crate::ggml::{Backend, Context, Tensor, Type};

use super::fit;

pub struct Weights<'g> {
    path: PathBuf,
    ctx: Context<'g>,
    repacked: usize,
    /// Data bytes of all the weights (mapped or copied).
    bytes: u64,
    /// Of those, the bytes converted into memory of our own (anonymous), and the
    /// largest single weight left in the mapping.
    converted_bytes: u64,
    largest_mapped: u64,
    /// Weights copied out of the mapping (into the repack buffer).
    copied: std::collections::HashSet<String>,
}

impl<'g> Weights<'g> {
    /// Maps every tensor whose name satisfies `keep`.
    pub fn load(gguf: &'g GgufFile, keep: impl Fn(&str) -> bool) -> Result<Self> {
        Self::load_repacked(gguf, keep, |_| false)
    }

    /// Maps every tensor whose name satisfies `keep`, except the matrix-product
    /// weights that `repack` picks among the types ggml rearranges (q4_0, q4_K; 2-D,
    /// rows a multiple of 8): those are copied into ggml's repack buffer, where its
    /// integer GEMM runs 2-3x faster (shared/baselines/kernels.md, section 3), at the
    /// price of their size in anonymous memory.
    pub fn load_repacked(
        gguf: &'g GgufFile,
        keep: impl Fn(&str) -> bool,
        repack: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let infos: Vec<_> = gguf.tensors.iter().filter(|t| keep(&t.name)).collect();
        let ctx = Context::new(infos.len() + 1)?;
        let region = ctx.borrow_host(gguf.bytes())?;
        // Matrices stored interleaved are read in place where this CPU's ggml reads
        // that layout, else un-interleaved like any other copy.
        let interleaved = match infos.iter().any(|t| t.interleaved) {
            true => ctx.borrow_interleaved(gguf.bytes())?,
            false => None,
        };
        let can = Context::can_repack();
        let mut later = Vec::new();
        let mut converted = Vec::new();
        let mut copied = std::collections::HashSet::new();
        let mut bytes = 0;
        let (mut converted_bytes, mut largest_mapped) = (0, 0);
        let mut in_place = 0;
        let vector_bf16 = crate::cpu::vector_bf16();
        for t in infos {
            let packable =
                matches!(t.ty, Type::Q4_0 | Type::Q4_K) && t.ne.len() == 2 && t.ne[1] % 8 == 0;
            if let Some((tensor, data)) = fitted(&ctx, gguf, t, vector_bf16)? {
                bytes += data.len() as u64;
                converted_bytes += data.len() as u64;
                converted.push((tensor, data));
                copied.insert(t.name.clone());
                // Read once: the mapped original need not stay resident beside it.
                gguf.release_tensor(t);
            } else if let (true, Some(region)) = (t.interleaved, &interleaved) {
                bytes += t.nbytes;
                largest_mapped = largest_mapped.max(t.nbytes);
                in_place += 1;
                let tensor = new_tensor(&ctx, gguf, t, t.ty)?;
                ctx.place(region, tensor, (gguf.data_offset + t.offset) as usize)?;
            } else if can && packable && repack(&t.name) {
                bytes += t.nbytes;
                later.push(t);
                copied.insert(t.name.clone());
            } else if t.interleaved {
                let data = gguf.plain(t)?.into_owned();
                bytes += t.nbytes;
                converted_bytes += t.nbytes;
                converted.push((new_tensor(&ctx, gguf, t, t.ty)?, data));
                copied.insert(t.name.clone());
                gguf.release_tensor(t);
            } else {
                bytes += t.nbytes;
                largest_mapped = largest_mapped.max(t.nbytes);
                let tensor = new_tensor(&ctx, gguf, t, t.ty)?;
                ctx.place(&region, tensor, (gguf.data_offset + t.offset) as usize)?;
            }
        }
        // Converted tensors are allocated first: the repack buffer takes every tensor
        // still without data, so its tensors are made only after.
        if !converted.is_empty() {
            ctx.alloc_host()?;
            for (tensor, data) in &converted {
                ctx.set_bytes(*tensor, data)?;
            }
            log::debug!(
                "{}: {} weights converted at load for the graphs",
                gguf.path.display(),
                converted.len()
            );
        }
        let mut repacked = in_place;
        if in_place > 0 {
            log::debug!(
                "{}: {in_place} interleaved weights read in place by ggml's integer GEMM",
                gguf.path.display()
            );
        }
        if !later.is_empty() {
            let made = later
                .iter()
                .map(|t| Ok((new_tensor(&ctx, gguf, t, t.ty)?, gguf.plain(t)?)))
                .collect::<Result<Vec<_>>>()?;
            let made: Vec<_> = made.iter().map(|(t, b)| (*t, b.as_ref())).collect();
            // Each source leaves resident memory once copied: the mapped and the
            // copied UNet are never both resident (0.93 GB at q4_0 otherwise).
            let n = ctx.alloc_repacked(&made, |i| gguf.release_tensor(later[i]))?;
            log::debug!(
                "{}: {n} of {} weights repacked for ggml's integer GEMM",
                gguf.path.display(),
                later.len()
            );
            repacked += n;
        }
        Ok(Weights {
            path: gguf.path.clone(),
            ctx,
            repacked,
            bytes,
            converted_bytes,
            largest_mapped,
            copied,
        })
    }

    /// The file the weights come from.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The context holding the weights (graphs over them follow where it lives).
    pub(crate) fn context(&self) -> &Context<'g> {
        &self.ctx
    }

    /// Whether the weight `name` was copied out of the mapping (so the mapping's pages
    /// for it are no longer read).
    pub fn is_copied(&self, name: &str) -> bool {
        self.copied.contains(name)
    }

    /// Data bytes of all the weights, mapped or copied (what a stage keeps resident).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What must stay resident when the mapped weights are left to the page cache (a
    /// memory cgroup reclaims their clean pages and the next step reads them again):
    /// the converted ones, and the largest mapped weight, which one product reads whole.
    pub fn streamed_bytes(&self) -> u64 {
        self.converted_bytes + self.largest_mapped
    }

    /// How many weights are held in ggml's repacked layout.
    pub fn repacked(&self) -> usize {
        self.repacked
    }

    /// The weight called `name`.
    pub fn get(&self, name: &str) -> Result<Tensor<'_>> {
        self.ctx
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("missing tensor `{name}`")))
    }

    /// The values of the f32 weight `name`, read on the host.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        if t.ty() != Type::F32 {
            return Err(Error::format(
                &self.path,
                format!("`{name}` is {}, not f32", t.ty().name()),
            ));
        }
        self.ctx.get_f32(t)
    }

    /// A weight that may be absent (biases of bias-free layers).
    pub fn opt(&self, name: &str) -> Option<Tensor<'_>> {
        self.ctx.get(name)
    }
}

/// A tensor as [`Weights::from_f32`] takes it: name, ggml shape `ne`, f32 values.
pub type F32Tensor = (String, Vec<usize>, Vec<f32>);

/// Every float tensor of a checkpoint, the list [`Weights::from_f32`] takes.
pub fn f32_tensors(ck: &Checkpoint) -> Result<Vec<F32Tensor>> {
    ck.tensors
        .iter()
        .filter(|t| t.dtype.is_float())
        .map(|t| {
            let ne: Vec<usize> = t.shape.iter().rev().copied().collect();
            Ok((t.name.clone(), ne, t.read_f32()?))
        })
        .collect()
}

/// A tensor object for the stored weight `t`, as type `ty`, named as stored.
fn new_tensor<'c>(
    ctx: &'c Context<'_>,
    gguf: &GgufFile,
    t: &TensorInfo,
    ty: Type,
) -> Result<Tensor<'c>> {
    let ne: Vec<usize> = t.ne.iter().map(|&d| d as usize).collect();
    ctx.tensor(ty, &ne, &t.name)
        .map_err(|e| Error::format(&gguf.path, format!("tensor `{}`: {e}", t.name)))
}

/// For a weight stored in a form the graphs cannot take ([`fit::convert_to`]; the
/// device multiplies bf16 at vector speed if `vector_bf16`): a tensor object of the
/// type they need and its converted bytes.
fn fitted<'c>(
    ctx: &'c Context<'_>,
    gguf: &GgufFile,
    t: &TensorInfo,
    vector_bf16: bool,
) -> Result<Option<(Tensor<'c>, Vec<u8>)>> {
    let Some(ty) = fit::convert_to(&t.name, t.ty, &t.ne, vector_bf16) else {
        return Ok(None);
    };
    let what = format!("{}: tensor `{}`", gguf.path.display(), t.name);
    let data = fit::convert(&what, t.ty, ty, &gguf.plain(t)?, &t.ne)?;
    Ok(Some((new_tensor(ctx, gguf, t, ty)?, data)))
}

impl Weights<'static> {
    /// Copies the tensors whose names satisfy `keep` into `backend`'s GPU memory (or
    /// its CPU's, for a CPU backend). Nothing stays borrowed from the file: each
    /// tensor's mapped pages are released once it is uploaded.
    pub fn upload(gguf: &GgufFile, keep: impl Fn(&str) -> bool, backend: &Backend) -> Result<Self> {
        let infos: Vec<_> = gguf.tensors.iter().filter(|t| keep(&t.name)).collect();
        let ctx = Context::new(infos.len() + 1)?;
        let mut made = Vec::with_capacity(infos.len());
        // ggml's GPU backends multiply bf16 themselves.
        let vector_bf16 = backend.gpu_name().is_some() || crate::cpu::vector_bf16();
        for t in &infos {
            made.push(match fitted(&ctx, gguf, t, vector_bf16)? {
                Some((tensor, data)) => (tensor, Some(data)),
                None => (new_tensor(&ctx, gguf, t, t.ty)?, None),
            });
        }
        let bytes = made.iter().map(|(t, _)| t.nbytes() as u64).sum();
        ctx.alloc_on(backend).map_err(|e| {
            Error::format(
                &gguf.path,
                format!(
                    "{} bytes of weights on {}: {e}",
                    bytes,
                    backend.gpu_name().unwrap_or("?")
                ),
            )
        })?;
        let mut copied = std::collections::HashSet::new();
        for (t, (tensor, data)) in infos.iter().zip(made) {
            match data {
                Some(data) => ctx.set_bytes(tensor, &data)?,
                None => ctx.set_bytes(tensor, &gguf.plain(t)?)?,
            }
            gguf.release_tensor(t);
            copied.insert(t.name.clone());
        }
        // Every weight is copied (onto a device, or into our own memory).
        Ok(Weights {
            path: gguf.path.clone(),
            ctx,
            repacked: 0,
            bytes,
            converted_bytes: bytes,
            largest_mapped: 0,
            copied,
        })
    }

    /// Copies every float tensor of a checkpoint, as f32, where `backend` computes.
    pub fn from_checkpoint(ck: &Checkpoint, backend: &Backend) -> Result<Self> {
        Self::from_checkpoint_as(ck, backend, Type::F32, false)
    }

    /// As [`Weights::from_checkpoint`], laid out for the small convolutional networks
    /// run from checkpoints (TAESD and its kin) on a CPU: each 3x3 kernel also
    /// transformed for Winograd's F(4x4, 3x3) (`{layer}.winograd`, f32, which
    /// [`crate::model::nn::Nn::conv`] uses where it applies), and every convolution
    /// kernel in f16.
    ///
    /// Why: a Winograd 3x3 convolution makes a quarter of the multiplications
    /// (`ggml/winograd.rs`); the f16 kernels serve the rest (strided and 1x1 layers),
    /// whose im2col columns are then f16 too (half the bytes) and ggml multiplies 16-bit
    /// operands. The real TAEF2 decoder at 512x512 on 2 AVX2 cores: 3.0 s with f32
    /// kernels through im2col, 1.9 s with f16 ones (2.05 s bf16; f16, not bf16: its
    /// 11-bit significand keeps the real TAEF2 round trip on PyTorch's PSNR to 0.01 dB,
    /// where bf16 lost 0.12 dB). The Winograd kernels take four times an f32 kernel's
    /// bytes. GPUs keep f32 kernels and direct convolutions: these networks are small
    /// there.
    pub fn from_checkpoint_half(ck: &Checkpoint, backend: &Backend) -> Result<Self> {
        if backend.gpu_name().is_some() {
            Self::from_checkpoint_as(ck, backend, Type::F32, false)
        } else {
            Self::from_checkpoint_as(ck, backend, Type::F16, true)
        }
    }

    /// Float tensors as f32, 4-D ones (convolution kernels) as `kernels`, with the
    /// Winograd transform of each 3x3 kernel it applies to if `winograd`.
    fn from_checkpoint_as(
        ck: &Checkpoint,
        backend: &Backend,
        kernels: Type,
        winograd: bool,
    ) -> Result<Self> {
        // One tensor at a time from the file into the buffer: the weights are in
        // memory once, not as a list and then its copy.
        let floats: Vec<_> = ck.tensors.iter().filter(|t| t.dtype.is_float()).collect();
        // ggml shape [3, 3, IC, OC].
        let transformable = |ne: &[usize]| winograd && matches!(ne, [3, 3, _, _]);
        let ctx = Context::new(2 * floats.len() + 1)?;
        let mut made = Vec::with_capacity(floats.len());
        for t in &floats {
            let ne: Vec<usize> = t.shape.iter().rev().copied().collect();
            let tensor = if ne.len() == 4 {
                ctx.tensor(kernels, &ne, &t.name)?
            } else {
                f32_tensor(&ctx, &ck.path, &t.name, ne.clone())?
            };
            let transformed = match t.name.strip_suffix(".weight") {
                Some(layer) if transformable(&ne) => Some(ctx.tensor(
                    Type::F32,
                    &[ne[2], ne[3], crate::ggml::WINOGRAD_POSITIONS],
                    &format!("{layer}.winograd"),
                )?),
                _ => None,
            };
            made.push((tensor, transformed));
        }
        ctx.alloc_on(backend)?;
        let mut bytes = 0;
        for (t, (tensor, transformed)) in floats.iter().zip(made) {
            let values = t.read_f32()?;
            if let Some(u) = transformed {
                let [ic, oc, ..] = u.ne();
                ctx.set_f32(u, &crate::ggml::winograd_kernel(&values, ic, oc))?;
                bytes += u.nbytes() as u64;
            }
            if tensor.ty() == Type::F32 {
                ctx.set_f32(tensor, &values)?;
            } else {
                let mut data = Vec::new();
                tensor
                    .ty()
                    .quantize_rows(&values, 1, values.len(), &mut data)
                    .map_err(|e| Error::format(&ck.path, format!("tensor `{}`: {e}", t.name)))?;
                ctx.set_bytes(tensor, &data)?;
            }
            bytes += tensor.nbytes() as u64;
        }
        Ok(Self::copied(&ck.path, ctx, bytes))
    }

    /// Weights held in `ctx`'s own buffer (`bytes` of them), none mapped.
    fn copied(path: &std::path::Path, ctx: Context<'static>, bytes: u64) -> Self {
        Weights {
            path: path.to_path_buf(),
            ctx,
            repacked: 0,
            bytes,
            converted_bytes: bytes,
            largest_mapped: 0,
            copied: Default::default(),
        }
    }

    /// f32 tensors `(name, ggml shape ne, values)` where `backend` computes; `path`
    /// names their source in messages.
    pub fn from_f32(
        path: &std::path::Path,
        list: Vec<F32Tensor>,
        backend: &Backend,
    ) -> Result<Self> {
        let ctx = Context::new(list.len() + 1)?;
        let mut made = Vec::with_capacity(list.len());
        for (name, ne, data) in &list {
            let tensor = f32_tensor(&ctx, path, name, ne.clone())?;
            if tensor.nelements() != data.len() {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}`: {} values for shape {ne:?}", data.len()),
                ));
            }
            made.push(tensor);
        }
        ctx.alloc_on(backend)?;
        for ((_, _, data), tensor) in list.iter().zip(made) {
            ctx.set_f32(tensor, data)?;
        }
        let bytes = list.iter().map(|(_, _, d)| 4 * d.len() as u64).sum();
        Ok(Self::copied(path, ctx, bytes))
    }
}

/// An f32 tensor object `name` of ggml shape `ne` (a scalar as `[1]`), at most 4-D.
fn f32_tensor<'c>(
    ctx: &'c Context<'_>,
    path: &std::path::Path,
    name: &str,
    mut ne: Vec<usize>,
) -> Result<Tensor<'c>> {
    if ne.is_empty() {
        ne.push(1);
    }
    if ne.len() > 4 {
        return Err(Error::format(
            path,
            format!("tensor `{name}` has {} dimensions", ne.len()),
        ));
    }
    ctx.tensor(Type::F32, &ne, name)
}
