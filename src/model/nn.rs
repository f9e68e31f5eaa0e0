//! Layers shared by the UNet, the VAE and TAESD, named as in the checkpoint.
use crate::error::Result;
use crate::ggml::{Backend, Context, Tensor, Type};

use super::Weights;

/// How attention is computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Attention {
    /// Scores as a matrix product, softmax, then a product with the values: fast GEMMs
    /// but the whole `[Nk, Nq]` score matrix per head in memory.
    #[default]
    MatMul,
    /// ggml's fused kernel (`flash_attn_ext`): no score matrix. Causal attention
    /// (text encoders, 77 tokens) always uses the matrix form.
    Flash,
    /// Flash attention where the score matrix would be large (self-attention over at
    /// least [`Attention::FLASH_MIN_KEYS`] tokens), the matrix form elsewhere. Measured
    /// on SD 1.5 (2 cores, AVX2): at 512² flash is 1.4× faster per step and saves
    /// 800 MB of compute buffer; at 256² (1024 tokens) the matrix form is 15% faster.
    Auto,
}

impl Attention {
    pub const NAMES: &'static [&'static str] = &["auto", "matmul", "flash"];
    pub const FLASH_MIN_KEYS: usize = 2048;

    pub fn parse(s: &str) -> Option<Attention> {
        match s {
            "auto" => Some(Attention::Auto),
            "matmul" => Some(Attention::MatMul),
            "flash" => Some(Attention::Flash),
            _ => None,
        }
    }

    fn flash(self, keys: usize) -> bool {
        match self {
            Attention::MatMul => false,
            Attention::Flash => true,
            Attention::Auto => keys >= Self::FLASH_MIN_KEYS,
        }
    }
}

/// Builds layers from the weights under one context.
#[derive(Clone, Copy)]
pub struct Nn<'c> {
    pub ctx: &'c Context<'c>,
    pub w: &'c Weights<'c>,
    pub attention: Attention,
}

impl<'c> Nn<'c> {
    pub fn new(ctx: &'c Context<'c>, w: &'c Weights<'c>) -> Self {
        Nn { ctx, w, attention: Attention::default() }
    }

    /// A convolution `name` (`.weight`, optional `.bias`) with a `k`x`k` kernel.
    /// Kernels come flattened `[IC*k*k, OC]` (our files) or 4-D (stable-diffusion.cpp's).
    pub fn conv(&self, x: Tensor<'c>, name: &str, k: usize, stride: usize, pad: usize) -> Result<Tensor<'c>> {
        let mut w = self.w.get(&format!("{name}.weight"))?;
        let ne = w.ne();
        if ne[2] > 1 || ne[3] > 1 {
            w = self.ctx.reshape(w, &[ne[0] * ne[1] * ne[2], ne[3]])?;
        }
        self.ctx.conv2d(x, w, k, k, stride, pad, self.w.opt(&format!("{name}.bias")))
    }

    /// GroupNorm with affine parameters over `[W, H, C, N]`.
    pub fn group_norm(&self, x: Tensor<'c>, name: &str, groups: usize, eps: f32) -> Result<Tensor<'c>> {
        let c = x.ne()[2];
        let y = self.ctx.group_norm(x, groups, eps)?;
        let g = self.ctx.reshape(self.w.get(&format!("{name}.weight"))?, &[1, 1, c, 1])?;
        let b = self.ctx.reshape(self.w.get(&format!("{name}.bias"))?, &[1, 1, c, 1])?;
        self.ctx.add(self.ctx.mul(y, g)?, b)
    }

    /// LayerNorm with affine parameters over `ne[0]`.
    pub fn layer_norm(&self, x: Tensor<'c>, name: &str, eps: f32) -> Result<Tensor<'c>> {
        let y = self.ctx.norm(x, eps)?;
        let y = self.ctx.mul(y, self.w.get(&format!("{name}.weight"))?)?;
        self.ctx.add(y, self.w.get(&format!("{name}.bias"))?)
    }

    pub fn linear(&self, x: Tensor<'c>, name: &str) -> Result<Tensor<'c>> {
        self.ctx.linear(x, self.w.get(&format!("{name}.weight"))?, self.w.opt(&format!("{name}.bias")))
    }

    /// Softmax attention of `q` `[D, Nq, H, B]` over keys `k` `[D, Nk, H, B]` and
    /// values `v` `[D, Nk, H, B]` (permuted views are fine): returns `[D*H, Nq, B]`,
    /// the heads of each token side by side. `causal` hides keys after each query
    /// (text encoders).
    pub fn attend(&self, q: Tensor<'c>, k: Tensor<'c>, v: Tensor<'c>, causal: bool) -> Result<Tensor<'c>> {
        let c = self.ctx;
        let [d, nq, h, b] = q.ne();
        let scale = 1.0 / (d as f32).sqrt();
        if self.attention.flash(k.ne()[1]) && !causal {
            let o = c.flash_attn(q, k, v, scale)?; // [D, H, Nq, B]
            return c.reshape(o, &[d * h, nq, b]);
        }
        let vt = c.cont(c.permute(v, [1, 0, 2, 3])?)?; // [Nk, D, H, B]
        let scores = c.mul_mat(k, q)?; // [Nk, Nq, H, B]
        let scores = if causal { c.diag_mask_inf(scores)? } else { scores };
        let probs = c.soft_max_ext(scores, None, scale)?;
        let o = c.mul_mat(vt, probs)?; // [D, Nq, H, B]
        c.reshape(c.cont(c.permute(o, [0, 2, 1, 3])?)?, &[d * h, nq, b])
    }

    /// `[W, H, C, N]` → `[C, W*H, N]` (tokens with channels innermost).
    pub fn to_tokens(&self, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let [w, h, c, n] = x.ne();
        let t = self.ctx.cont(self.ctx.permute(x, [1, 2, 0, 3])?)?; // [C, W, H, N]
        self.ctx.reshape(t, &[c, w * h, n])
    }

    /// `[C, W*H, N]` → `[W, H, C, N]`.
    pub fn from_tokens(&self, x: Tensor<'c>, w: usize, h: usize) -> Result<Tensor<'c>> {
        let [c, _, n, _] = x.ne();
        let t = self.ctx.cont(self.ctx.permute(x, [1, 0, 2, 3])?)?; // [W*H, C, N]
        self.ctx.reshape(t, &[w, h, c, n])
    }
}

/// Runs a one-input, one-output network once: `build` maps the f32 input tensor of
/// ggml shape `ne` (holding `input`) to the output, whose values are returned.
pub fn eval(w: &Weights<'_>, ne: [usize; 4], input: &[f32], max_tensors: usize, backend: &Backend, build: impl for<'c> FnOnce(&Nn<'c>, Tensor<'c>) -> Result<Tensor<'c>>) -> Result<Vec<f32>> {
    let ctx = Context::new(max_tensors)?;
    let nn = Nn::new(&ctx, w);
    let x = ctx.tensor(Type::F32, &ne, "input")?;
    ctx.set_input(x);
    let out = build(&nn, x)?;
    ctx.set_output(out);
    let graph = ctx.graph(&[out])?;
    ctx.alloc_graph(&graph)?;
    ctx.set_f32(x, input)?;
    backend.compute(&graph)?;
    ctx.get_f32(out)
}
