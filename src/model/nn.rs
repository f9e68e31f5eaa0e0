//! Layers shared by the UNet, the VAE and TAESD, named as in the checkpoint.
use crate::error::Result;
use crate::ggml::{Backend, Context, ConvShape, NormAct, Tensor, Type};

use super::{Adapters, Weights};

/// How attention is computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Attention {
    /// Scores as a matrix product, softmax, then a product with the values: fast GEMMs
    /// but the whole `[Nk, Nq]` score matrix per head in memory.
    MatMul,
    /// ggml's fused kernel (`flash_attn_ext`): no score matrix. Causal attention
    /// (text encoders, 77 tokens) always uses the matrix form.
    Flash,
    /// sdrs' own tiled kernel (`ggml/attention.rs`): no score matrix, any head size
    /// at full vector width, strided q/k/v read in place.
    Tiled,
    /// The fastest measured for the shape: the tiled kernel for every non-causal
    /// attention SD has (`cargo bench --bench kernels -- attention`, 2 threads,
    /// AVX-512: 123 against flash's 52 GFLOP/s at 4096 tokens and head size 40, 130
    /// against 73 at 1024 tokens and 80, 49–56 against 29 for cross-attention over 77
    /// text tokens; the matrix form 8–32), the matrix form for causal text encoders.
    #[default]
    Auto,
}

impl Attention {
    pub const NAMES: &'static [&'static str] = &["auto", "matmul", "flash", "tiled"];

    pub fn parse(s: &str) -> Option<Attention> {
        match s {
            "auto" => Some(Attention::Auto),
            "matmul" => Some(Attention::MatMul),
            "flash" => Some(Attention::Flash),
            "tiled" => Some(Attention::Tiled),
            _ => None,
        }
    }

    fn flash(self) -> bool {
        self == Attention::Flash
    }

    fn tiled(self) -> bool {
        matches!(self, Attention::Tiled | Attention::Auto)
    }
}

/// Head sizes are padded to a multiple of this for attention (see [`Nn::attend`]).
pub const HEAD_ALIGN: usize = 16;

/// Builds layers from the weights under one context.
#[derive(Clone, Copy)]
pub struct Nn<'c> {
    pub ctx: &'c Context<'c>,
    pub w: &'c Weights<'c>,
    pub attention: Attention,
    /// Multiply f16 kernels as f32 (cast in the graph). ggml computes an f16 kernel's
    /// product in f16, its input rounded to f16 first: activations past 65504 become
    /// infinite. SDXL's VAE decoder has such activations (the reason its community
    /// "fp16-fix" VAE exists), so the VAE sets this; the cast costs one kernel's f32 copy
    /// at a time in the compute buffer.
    pub f32_kernels: bool,
    /// LoRA branches beside the weights ([`Adapters`]).
    pub adapters: Option<&'c Adapters>,
    /// Run 3x3 convolutions (stride 1) whose kernels are stored f32, f16 or bf16 by
    /// Winograd's F(4x4, 3x3) on the CPU, each kernel transformed in the graph
    /// ([`Context::winograd_kernel`]; kernels transformed at load are used wherever
    /// the weights hold them, flag or not). The VAE sets it: its convolutions are
    /// most of a decode, and its f32 arithmetic also keeps SDXL's large activations
    /// finite.
    pub winograd: bool,
}

impl<'c> Nn<'c> {
    /// Layers over `w`, built for where `w` lives (a GPU's graph gets no CPU-only op).
    pub fn new(ctx: &'c Context<'c>, w: &'c Weights<'c>) -> Self {
        ctx.follow(w.context());
        Nn {
            ctx,
            w,
            attention: Attention::default(),
            f32_kernels: false,
            adapters: None,
            winograd: false,
        }
    }

    /// A linear layer over the weight called `weight` (and `bias`), with its LoRA branches.
    pub fn linear_weight(
        &self,
        x: Tensor<'c>,
        weight: &str,
        bias: Option<Tensor<'c>>,
    ) -> Result<Tensor<'c>> {
        let y = self
            .ctx
            .linear(x, self.kernel(self.w.get(weight)?)?, bias)?;
        match self.adapters {
            Some(a) => a.apply(self.ctx, weight, x, y, None),
            None => Ok(y),
        }
    }

    /// A convolution `name` (`.weight`, optional `.bias`) with a `k`x`k` kernel.
    /// Kernels come flattened `[IC*k*k, OC]` (our files) or 4-D (stable-diffusion.cpp's).
    pub fn conv(
        &self,
        x: Tensor<'c>,
        name: &str,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor<'c>> {
        let bias = self.w.opt(&format!("{name}.bias"));
        let y = match self.winograd(name, (k, stride, pad))? {
            Some(u) => self.ctx.conv3x3_winograd(x, u, 1, bias)?,
            None => self.ctx.conv2d(
                x,
                self.conv_kernel(name)?,
                ConvShape::square(k, stride, pad),
                bias,
            )?,
        };
        match self.adapters {
            Some(a) => a.apply(
                self.ctx,
                &format!("{name}.weight"),
                x,
                y,
                Some((k, stride, pad)),
            ),
            None => Ok(y),
        }
    }

    /// An upsampling layer (`Upsample2D`): nearest-neighbour 2x, then the 3x3
    /// convolution `name`, which reads the input through the upsampling instead of
    /// making the 4x larger tensor (see [`ConvShape::up`]). A LoRA on the convolution
    /// needs that tensor as its input, so then it is made.
    pub fn upsample_conv(&self, x: Tensor<'c>, name: &str) -> Result<Tensor<'c>> {
        if self.adapters.is_some() {
            return self.conv(self.ctx.upscale_nearest(x, 2)?, name, 3, 1, 1);
        }
        let bias = self.w.opt(&format!("{name}.bias"));
        if let Some(u) = self.winograd(name, (3, 1, 1))? {
            return self.ctx.conv3x3_winograd(x, u, 2, bias);
        }
        self.ctx.conv2d(
            x,
            self.conv_kernel(name)?,
            ConvShape::square(3, 1, 1).upsampled(2),
            bias,
        )
    }

    /// Convolution `name`'s kernel transformed for Winograd's F(4x4, 3x3), if the
    /// convolution (`(k, stride, pad)`) runs so: on a CPU, 3x3 with stride 1 and
    /// padding 1, with no LoRA branch needing the plain kernel; transformed at load if
    /// the weights hold that (see [`Weights::from_checkpoint_half`]), else in the graph
    /// if [`Nn::winograd`] asks and the stored kernel is f32, f16 or bf16 with at least
    /// 16 input channels (below that the transforms cost more than the products save).
    fn winograd(&self, name: &str, conv: (usize, usize, usize)) -> Result<Option<Tensor<'c>>> {
        if conv != (3, 1, 1) || self.adapters.is_some() || self.ctx.on_gpu() {
            return Ok(None);
        }
        if let Some(u) = self.w.opt(&format!("{name}.winograd")) {
            return Ok(Some(u));
        }
        if !self.winograd {
            return Ok(None);
        }
        let w = self.conv_matrix(name)?;
        let transformable = matches!(w.ty(), Type::F32 | Type::F16 | Type::BF16)
            && w.ne()[0] % 9 == 0
            && w.ne()[0] >= 9 * 16;
        Ok(if transformable {
            Some(self.ctx.winograd_kernel(w)?)
        } else {
            None
        })
    }

    /// Convolution `name`'s kernel as the product should see it (see
    /// [`Nn::conv_matrix`], [`Nn::f32_kernels`]).
    fn conv_kernel(&self, name: &str) -> Result<Tensor<'c>> {
        self.kernel(self.conv_matrix(name)?)
    }

    /// Convolution `name`'s kernel as the matrix `[IC*kh*kw, OC]`: our files store it so,
    /// stable-diffusion.cpp's 4-D.
    fn conv_matrix(&self, name: &str) -> Result<Tensor<'c>> {
        let w = self.w.get(&format!("{name}.weight"))?;
        let ne = w.ne();
        if ne[2] > 1 || ne[3] > 1 {
            return self.ctx.reshape(w, &[ne[0] * ne[1] * ne[2], ne[3]]);
        }
        Ok(w)
    }

    /// `w` as the product should see it (see [`Nn::f32_kernels`]).
    fn kernel(&self, w: Tensor<'c>) -> Result<Tensor<'c>> {
        if self.f32_kernels && w.ty() == Type::F16 {
            self.ctx.cast(w, Type::F32)
        } else {
            Ok(w)
        }
    }

    /// GroupNorm with affine parameters over `[W, H, C, N]`.
    pub fn group_norm(
        &self,
        x: Tensor<'c>,
        name: &str,
        groups: usize,
        eps: f32,
    ) -> Result<Tensor<'c>> {
        self.group_norm_act(x, name, groups, eps, NormAct::NONE)
    }

    /// [`Nn::group_norm`], then what `act` says (SiLU; written over `x`), as one op on
    /// the CPU ([`Context::group_norm_act`]).
    pub fn group_norm_act(
        &self,
        x: Tensor<'c>,
        name: &str,
        groups: usize,
        eps: f32,
        act: NormAct,
    ) -> Result<Tensor<'c>> {
        let (g, b) = self.affine_params(name, x.ne()[2])?;
        self.ctx.group_norm_act(x, groups, eps, g, b, act, None)
    }

    /// A norm's γ and β (`name.weight`, `name.bias`) over `channels`, shaped to
    /// broadcast over `[W, H, C, N]`.
    fn affine_params(&self, name: &str, channels: usize) -> Result<(Tensor<'c>, Tensor<'c>)> {
        let param = |p: &str| {
            self.ctx
                .reshape(self.w.get(&format!("{name}.{p}"))?, &[1, 1, channels, 1])
        };
        Ok((param("weight")?, param("bias")?))
    }

    /// LayerNorm with affine parameters over `ne[0]`.
    pub fn layer_norm(&self, x: Tensor<'c>, name: &str, eps: f32) -> Result<Tensor<'c>> {
        let y = self.ctx.norm(x, eps)?;
        let y = self.ctx.mul(y, self.w.get(&format!("{name}.weight"))?)?;
        self.ctx.add(y, self.w.get(&format!("{name}.bias"))?)
    }

    pub fn linear(&self, x: Tensor<'c>, name: &str) -> Result<Tensor<'c>> {
        self.linear_weight(
            x,
            &format!("{name}.weight"),
            self.w.opt(&format!("{name}.bias")),
        )
    }

    /// Softmax attention of `q` `[D, Nq, H, B]` over keys `k` `[D, Nk, H, B]` and
    /// values `v` `[D, Nk, H, B]` (permuted views are fine): returns `[D*H, Nq, B]`,
    /// the heads of each token side by side. `causal` hides keys after each query
    /// (text encoders).
    pub fn attend(
        &self,
        q: Tensor<'c>,
        k: Tensor<'c>,
        v: Tensor<'c>,
        causal: bool,
    ) -> Result<Tensor<'c>> {
        attend(self.ctx, q, k, v, causal, self.attention, HEAD_ALIGN)
    }

    /// `[W, H, C, N]` → `[C, W*H, N]` (tokens with channels innermost).
    pub fn to_tokens(&self, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let [w, h, c, n] = x.ne();
        let x = if x.is_contiguous() {
            x
        } else {
            self.ctx.cont(x)?
        };
        self.ctx
            .transpose_inner(self.ctx.reshape(x, &[w * h, c, n])?)
    }

    /// `[C, W*H, N]` → `[W, H, C, N]`.
    pub fn from_tokens(&self, x: Tensor<'c>, w: usize, h: usize) -> Result<Tensor<'c>> {
        let [c, _, n, _] = x.ne();
        let t = self.ctx.transpose_inner(x)?; // [W*H, C, N]
        self.ctx.reshape(t, &[w, h, c, n])
    }
}

/// [`Nn::attend`] with the kernel choice and head-size alignment explicit (1: no
/// padding), so that benchmarks can compare them.
pub fn attend<'c>(
    c: &'c Context<'_>,
    q: Tensor<'c>,
    k: Tensor<'c>,
    v: Tensor<'c>,
    causal: bool,
    kind: Attention,
    align: usize,
) -> Result<Tensor<'c>> {
    let [d, nq, h, b] = q.ne();
    let scale = 1.0 / (d as f32).sqrt();
    // The tiled kernel is the CPU's: a GPU gets ggml's fused kernel instead where it
    // has one for the shape, else the matrix form (never a copy back to the CPU).
    let kind = if c.on_gpu() && kind != Attention::MatMul {
        Attention::Flash
    } else {
        kind
    };
    if kind.tiled() && !causal {
        return c.attention(q, k, v, scale);
    }
    if kind.flash() && !causal {
        // No padding here: ggml's tiled flash kernel runs D = 40 as fast as 48
        // (`cargo bench --bench kernels -- attention`).
        let rows = |t: Tensor<'c>| {
            if t.nb()[0] == t.ty().type_size() {
                Ok(t)
            } else {
                c.cont(t)
            }
        };
        let o = c.flash_attn(rows(q)?, rows(k)?, rows(v)?, scale)?; // [D, H, Nq, B]
        if c.supports(o) {
            return c.reshape(o, &[d * h, nq, b]);
        }
    }
    // tinyBLAS wants the inner size in multiples of 16; SD 1.5's first level has head
    // size 40, where QK^T falls back to one dot product at a time: 4x slower than
    // padded to 48 (kernels bench, 1024 and 4096 tokens). Zeros appended to both q and
    // k leave every score unchanged (the scale keeps the true size): exact.
    let dp = d.next_multiple_of(align.max(1));
    let padded = |t: Tensor<'c>| {
        if dp == d {
            Ok(t)
        } else {
            c.pad(t, [dp - d, 0, 0, 0])
        }
    };
    let (q, k) = (padded(q)?, padded(k)?);
    let vt = c.cont(c.permute(v, [1, 0, 2, 3])?)?; // [Nk, D, H, B]
    let scores = c.mul_mat(k, q)?; // [Nk, Nq, H, B]
    let scores = if causal {
        c.diag_mask_inf(scores)?
    } else {
        scores
    };
    let probs = c.soft_max_ext(scores, None, scale)?;
    let o = c.mul_mat(vt, probs)?; // [D, Nq, H, B]
    c.reshape(c.cont(c.permute(o, [0, 2, 1, 3])?)?, &[d * h, nq, b])
}

/// Runs a one-input, one-output network once: `build` maps the f32 input tensor of
/// ggml shape `ne` (holding `input`) to the output, whose values are returned.
pub fn eval(
    w: &Weights<'_>,
    ne: [usize; 4],
    input: &[f32],
    max_tensors: usize,
    backend: &Backend,
    build: impl for<'c> FnOnce(&Nn<'c>, Tensor<'c>) -> Result<Tensor<'c>>,
) -> Result<Vec<f32>> {
    Program::new(w, ne, max_tensors, build)?.run(input, backend)
}

/// A one-input, one-output network built once as a graph and run on many inputs of
/// one shape (the tiles of a tiled decode): its compute buffer is allocated once.
pub struct Program<'w> {
    ctx: Context<'w>,
    ne: [usize; 4],
    /// Compute-buffer size in bytes.
    pub buffer_bytes: usize,
    _weights: std::marker::PhantomData<&'w Weights<'w>>,
}

const INPUT: &str = "program.input";
const OUTPUT: &str = "program.output";

impl<'w> Program<'w> {
    /// Builds the graph of `build` for an f32 input of ggml shape `ne`.
    pub fn new(
        w: &'w Weights<'w>,
        ne: [usize; 4],
        max_tensors: usize,
        build: impl for<'c> FnOnce(&Nn<'c>, Tensor<'c>) -> Result<Tensor<'c>>,
    ) -> Result<Self> {
        let ctx = Context::new(max_tensors)?;
        let buffer_bytes = {
            let graph = Self::graph(&ctx, w, ne, build)?;
            ctx.alloc_graph(&graph)?
        };
        Ok(Program {
            ctx,
            ne,
            buffer_bytes,
            _weights: std::marker::PhantomData,
        })
    }

    /// The compute buffer [`Program::new`] would allocate, without allocating it.
    pub fn measure(
        w: &Weights<'_>,
        ne: [usize; 4],
        max_tensors: usize,
        build: impl for<'c> FnOnce(&Nn<'c>, Tensor<'c>) -> Result<Tensor<'c>>,
    ) -> Result<usize> {
        let ctx = Context::new(max_tensors)?;
        let graph = Self::graph(&ctx, w, ne, build)?;
        ctx.measure_graph(&graph)
    }

    /// [`Program::measure`], and the values the output holds.
    pub fn measure_output(
        w: &Weights<'_>,
        ne: [usize; 4],
        max_tensors: usize,
        build: impl for<'c> FnOnce(&Nn<'c>, Tensor<'c>) -> Result<Tensor<'c>>,
    ) -> Result<(usize, usize)> {
        let ctx = Context::new(max_tensors)?;
        let graph = Self::graph(&ctx, w, ne, build)?;
        let out = ctx.get(OUTPUT).map_or(0, |t| t.ne().iter().product());
        Ok((ctx.measure_graph(&graph)?, out))
    }

    fn graph<'c>(
        ctx: &'c Context<'c>,
        w: &'c Weights<'c>,
        ne: [usize; 4],
        build: impl FnOnce(&Nn<'c>, Tensor<'c>) -> Result<Tensor<'c>>,
    ) -> Result<crate::ggml::Graph<'c>> {
        let nn = Nn::new(ctx, w);
        let x = ctx.tensor(Type::F32, &ne, INPUT)?;
        ctx.set_input(x);
        let out = build(&nn, x)?;
        ctx.name(out, OUTPUT)?;
        ctx.set_output(out);
        ctx.graph(&[out])
    }

    /// Values the output holds.
    pub fn output_len(&self) -> usize {
        self.ctx.get(OUTPUT).map_or(0, |t| t.ne().iter().product())
    }

    /// One evaluation on `input` (the shape given at build time).
    pub fn run(&self, input: &[f32], backend: &Backend) -> Result<Vec<f32>> {
        self.run_with(input, &[], backend)
    }

    /// [`Program::run`] with more inputs, each an f32 tensor the build named and marked as
    /// an input; one the graph does not reach (it has no memory) is skipped.
    pub fn run_with(
        &self,
        input: &[f32],
        named: &[(&str, &[f32])],
        backend: &Backend,
    ) -> Result<Vec<f32>> {
        let get = |n: &str| {
            self.ctx
                .get(n)
                .ok_or_else(|| crate::Error::Ggml(format!("program graph lacks `{n}`")))
        };
        if input.len() != self.ne.iter().product::<usize>() {
            return Err(crate::Error::Invalid(format!(
                "{} input values for a graph of shape {:?}",
                input.len(),
                self.ne
            )));
        }
        self.ctx.set_f32(get(INPUT)?, input)?;
        for &(name, values) in named {
            let t = get(name)?;
            if t.has_data() {
                self.ctx.set_f32(t, values)?;
            }
        }
        let graph = self
            .ctx
            .built_graph()
            .ok_or_else(|| crate::Error::Ggml("program graph missing".into()))?;
        backend.compute(&graph)?;
        self.ctx.get_f32(get(OUTPUT)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention of fixed pseudo-random q, k, v `[D*H, N, B]` with the given kernel and alignment.
    fn run(d: usize, heads: usize, tokens: usize, kind: Attention, align: usize) -> Vec<f32> {
        let backend = Backend::cpu(1).unwrap();
        let ctx = Context::new(64).unwrap();
        let mut inputs = Vec::new();
        let mut views = Vec::new();
        for name in ["q", "k", "v"] {
            let t = ctx
                .tensor(Type::F32, &[d * heads, tokens, 1], name)
                .unwrap();
            ctx.set_input(t);
            inputs.push(t);
            let t = ctx.reshape(t, &[d, heads, tokens, 1]).unwrap();
            views.push(ctx.permute(t, [0, 2, 1, 3]).unwrap());
        }
        let out = attend(&ctx, views[0], views[1], views[2], false, kind, align).unwrap();
        ctx.set_output(out);
        let graph = ctx.graph(&[out]).unwrap();
        ctx.alloc_graph(&graph).unwrap();
        for (i, t) in inputs.iter().enumerate() {
            let v: Vec<f32> = (0..d * heads * tokens)
                .map(|j| ((((j + 7919 * i) * 2654435761) % 10007) as f32 / 5003.5 - 1.0) * 0.5)
                .collect();
            ctx.set_f32(*t, &v).unwrap();
        }
        backend.compute(&graph).unwrap();
        ctx.get_f32(out).unwrap()
    }

    /// Attention with `nq` queries over `nk` keys; values given transposed in memory
    /// (a permuted view, as the VAE passes them) when `v_transposed`.
    fn run_qk(
        d: usize,
        heads: usize,
        nq: usize,
        nk: usize,
        kind: Attention,
        v_transposed: bool,
    ) -> Vec<f32> {
        let backend = Backend::cpu(2).unwrap();
        let ctx = Context::new(64).unwrap();
        let mut inputs = Vec::new();
        let mut views = Vec::new();
        for (i, (name, n)) in [("q", nq), ("k", nk), ("v", nk)].into_iter().enumerate() {
            let t = if name == "v" && v_transposed {
                ctx.tensor(Type::F32, &[n, d * heads, 1], name).unwrap()
            } else {
                ctx.tensor(Type::F32, &[d * heads, n, 1], name).unwrap()
            };
            ctx.set_input(t);
            inputs.push((t, i));
            let t = if name == "v" && v_transposed {
                ctx.permute(t, [1, 0, 2, 3]).unwrap()
            } else {
                t
            };
            let t = ctx
                .reshape(
                    if t.is_contiguous() {
                        t
                    } else {
                        ctx.cont(t).unwrap()
                    },
                    &[d, heads, n, 1],
                )
                .unwrap();
            views.push(ctx.permute(t, [0, 2, 1, 3]).unwrap());
        }
        let out = attend(&ctx, views[0], views[1], views[2], false, kind, 1).unwrap();
        ctx.set_output(out);
        let graph = ctx.graph(&[out]).unwrap();
        ctx.alloc_graph(&graph).unwrap();
        for (t, i) in inputs {
            let v: Vec<f32> = (0..t.nelements())
                .map(|j| ((((j + 7919 * i) * 2654435761) % 10007) as f32 / 5003.5 - 1.0) * 1.5)
                .collect();
            ctx.set_f32(t, &v).unwrap();
        }
        backend.compute(&graph).unwrap();
        ctx.get_f32(out).unwrap()
    }

    #[test]
    fn the_tiled_kernel_equals_the_matrix_form_for_sd_head_sizes_and_ragged_lengths() {
        // SD's head sizes (40, 80, 160), the VAE's single 512-wide head; queries not a
        // multiple of the 4-query tile, keys not a multiple of the 64-key block (77
        // text tokens), a strided value view.
        for (d, heads, nq, nk, vt) in [
            (40, 2, 70, 70, false),
            (80, 1, 33, 77, false),
            (160, 2, 9, 130, false),
            (64, 3, 5, 1, false),
            (512, 1, 21, 21, true),
        ] {
            let want = run_qk(d, heads, nq, nk, Attention::MatMul, vt);
            let got = run_qk(d, heads, nq, nk, Attention::Tiled, vt);
            assert_eq!(got.len(), d * heads * nq);
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 2e-5,
                "d {d}, {heads} heads, {nq}x{nk}: max difference {worst}"
            );
        }
    }

    #[test]
    fn padding_the_head_size_leaves_attention_unchanged_for_both_kernels() {
        // SD 1.5's first level has head size 40; 24 tokens cover a partial tile.
        let (d, heads, tokens) = (40, 2, 24);
        let plain = run(d, heads, tokens, Attention::MatMul, 1);
        assert_eq!(plain.len(), d * heads * tokens);
        for (kind, align) in [
            (Attention::MatMul, 16),
            (Attention::Flash, 1),
            (Attention::Tiled, 1),
        ] {
            let other = run(d, heads, tokens, kind, align);
            let worst = plain
                .iter()
                .zip(&other)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            // Flash keeps K/V as f16 in its inner products where ggml chooses to: 1e-3.
            assert!(
                worst < 1e-3,
                "{kind:?} aligned to {align}: max difference {worst}"
            );
        }
    }
}
