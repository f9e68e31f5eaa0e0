//! Graph-building operations. Each checks the shapes ggml would otherwise assert
//! on (an assert aborts the whole process), then records the op; nothing is
//! computed until [`super::Backend::compute`].
use std::ffi::c_int;

use super::context::{Context, Tensor};
use super::{sys, Type};
use crate::error::{Error, Result};

/// Default for the largest column matrix a convolution builds at once, counted as f32
/// columns (see [`Context::conv2d`], [`Context::set_conv_budget`]). The SD 1.5 decode at
/// 512x512 runs as fast in bands of 32 MB as of 64, with a compute buffer 50 MB
/// smaller.
pub const CONV_COLUMNS_MAX_BYTES: usize = 32 << 20;

/// The name of the convolution epilogue's nodes (profiles show `CONV_EPILOGUE (sdrs)`).
const EPILOGUE: &str = "sdrs.conv_epilogue";

/// What follows a GroupNorm's affine step in [`Context::group_norm_act`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NormAct {
    /// SiLU after it.
    pub silu: bool,
    /// Written over the input (its other readers all come earlier in the graph).
    pub over: bool,
}

impl NormAct {
    /// The norm alone, into a new tensor.
    pub const NONE: NormAct = NormAct {
        silu: false,
        over: false,
    };
    /// SiLU after the norm, into a new tensor.
    pub const SILU: NormAct = NormAct {
        silu: true,
        over: false,
    };
    /// SiLU after the norm, written over the input.
    pub const SILU_OVER: NormAct = NormAct {
        silu: true,
        over: true,
    };
}

/// Most row bands one convolution is split into.
pub const CONV_MAX_BANDS: usize = 64;

/// The type sdrs' im2col writes a CPU convolution's columns in, for a kernel of type
/// `kernel`: the type ggml's matrix product would convert f32 columns to before
/// multiplying (its `vec_dot_type`), where that is a plain float, so the conversion is
/// made once while the columns are written, in half the bytes. On aarch64 ggml
/// multiplies an f16 kernel by f32 columns directly on cores without f16 arithmetic
/// (its tinyBLAS path), so f16 kernels keep f32 columns there. Quantized kernels take
/// f32 columns (ggml quantizes them to its 8-bit blocks itself).
fn column_type(kernel: Type) -> Type {
    match kernel {
        Type::BF16 => Type::BF16,
        Type::F16 if cfg!(target_arch = "x86_64") => Type::F16,
        _ => Type::F32,
    }
}

/// The geometry of a 2-D convolution: kernel height and width, stride and zero
/// padding (the same along both axes), and a nearest-neighbour upsampling of the
/// input by `up` that the convolution reads through instead of materialising it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    /// 1: the input as it is; 2: each input pixel read as a 2x2 block (the UNet's and
    /// the VAE's upsampling layers, `Upsample2D`: nearest, then this convolution).
    pub up: usize,
}

impl ConvShape {
    /// A `k`x`k` kernel.
    pub fn square(k: usize, stride: usize, pad: usize) -> Self {
        ConvShape {
            kh: k,
            kw: k,
            stride,
            pad,
            up: 1,
        }
    }

    /// This convolution on the input upsampled by `factor` (nearest neighbour).
    pub fn upsampled(self, factor: usize) -> Self {
        ConvShape { up: factor, ..self }
    }

    /// The output width and height on a `w`x`h` input; `None` when the kernel does not
    /// fit the padded input or the stride or the upsampling factor is 0.
    pub fn output(&self, w: usize, h: usize) -> Option<(usize, usize)> {
        let (pw, ph) = (w * self.up + 2 * self.pad, h * self.up + 2 * self.pad);
        if self.stride == 0 || self.up == 0 || pw < self.kw || ph < self.kh {
            return None;
        }
        Some((
            (pw - self.kw) / self.stride + 1,
            (ph - self.kh) / self.stride + 1,
        ))
    }
}

/// What ggml's GroupNorm asserts on: whole groups of channels, f32.
fn check_group_norm(a: Tensor<'_>, groups: usize) -> Result<()> {
    if groups == 0 || !a.ne()[2].is_multiple_of(groups) {
        return Err(bad(
            "group_norm",
            format!("{} channels in {groups} groups", a.ne()[2]),
        ));
    }
    need_f32("group_norm", "input", a)
}

fn bad(op: &str, msg: String) -> Error {
    Error::Ggml(format!("{op}: {msg}"))
}

/// Whether `b` broadcasts onto `a` (ggml's `ggml_can_repeat`).
fn can_repeat(b: [usize; 4], a: [usize; 4]) -> bool {
    (0..4).all(|i| b[i] != 0 && a[i].is_multiple_of(b[i]))
}

/// Whether ggml's CPU binary ops (add, mul) take `a ∘ b` with the result in `a`'s
/// type: f32 everywhere, or an f16/bf16 `a` with a `b` of its type or f32 (anything
/// else aborts inside ggml, e.g. an f16 norm scale on f32 activations).
fn binary_types(a: Type, b: Type) -> bool {
    match a {
        Type::F32 => b == Type::F32,
        Type::F16 | Type::BF16 => b == a || b == Type::F32,
        _ => false,
    }
}

/// What ggml's binary ops assert: `b` broadcasts onto `a`, in types it has a kernel for.
fn check_binary(op: &str, a: Tensor<'_>, b: Tensor<'_>) -> Result<()> {
    if !can_repeat(b.ne(), a.ne()) {
        let msg = format!("{:?} does not broadcast onto {:?}", b.ne(), a.ne());
        return Err(bad(op, msg));
    }
    if !binary_types(a.ty(), b.ty()) {
        let msg = format!("a {} operand onto a {} one", b.ty().name(), a.ty().name());
        return Err(bad(op, msg));
    }
    Ok(())
}

/// Refuses an operand of a type other than f32 (ops whose CPU kernels assert it).
fn need_f32(op: &str, what: &str, t: Tensor<'_>) -> Result<()> {
    if t.ty() != Type::F32 {
        return Err(bad(op, format!("{what} is {}, not f32", t.ty().name())));
    }
    Ok(())
}

impl Context<'_> {
    fn op<'c>(&'c self, p: *mut sys::ggml_tensor) -> Result<Tensor<'c>> {
        self.wrap_op(p)
    }

    /// `a + b`, `b` broadcast over `a`.
    pub fn add<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        check_binary("add", a, b)?;
        // SAFETY: shapes and types checked; tensors valid for 'c.
        self.op(unsafe { sys::ggml_add(self.raw(), a.raw(), b.raw()) })
    }

    /// `a * b` elementwise, `b` broadcast over `a`.
    pub fn mul<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        check_binary("mul", a, b)?;
        // SAFETY: as above.
        self.op(unsafe { sys::ggml_mul(self.raw(), a.raw(), b.raw()) })
    }

    pub fn scale<'c>(&'c self, a: Tensor<'c>, s: f32) -> Result<Tensor<'c>> {
        // SAFETY: unary op.
        self.op(unsafe { sys::ggml_scale(self.raw(), a.raw(), s) })
    }

    /// Normalises over `ne[0]` (layer norm without affine parameters).
    pub fn norm<'c>(&'c self, a: Tensor<'c>, eps: f32) -> Result<Tensor<'c>> {
        need_f32("norm", "input", a)?;
        // SAFETY: unary op.
        self.op(unsafe { sys::ggml_norm(self.raw(), a.raw(), eps) })
    }

    /// Group norm over `[W, H, C, N]` with `groups` groups of channels (`ne[2]`).
    pub fn group_norm<'c>(&'c self, a: Tensor<'c>, groups: usize, eps: f32) -> Result<Tensor<'c>> {
        check_group_norm(a, groups)?;
        // SAFETY: unary op, checked.
        self.op(unsafe { sys::ggml_group_norm(self.raw(), a.raw(), groups as i32, eps) })
    }

    /// `group_norm(a)·gamma + beta`, then SiLU if `act.silu`, over `a` `[W, H, C, N]`
    /// (`gamma`, `beta` `[1, 1, C, 1]`). On the CPU one node of sdrs' op
    /// (`ggml/norm.rs`), written over `a` if `act.over`: only for an `a` whose other
    /// readers all come earlier in the graph's order (ggml runs a CPU graph in that
    /// order). On a GPU, whose backend may reorder nodes, ggml's ops into new tensors.
    ///
    /// `stats`, when given, replaces the statistics the op would gather: `[1, 1, C, 2]`
    /// f32, each channel's group mean, then its reciprocal standard deviation, rounded as
    /// the op rounds them ([`super::group_norm_statistics`]), for every image: a tile
    /// normalised with the whole image's statistics then gets the whole run's values.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_act<'c>(
        &'c self,
        a: Tensor<'c>,
        groups: usize,
        eps: f32,
        gamma: Tensor<'c>,
        beta: Tensor<'c>,
        act: NormAct,
        stats: Option<Tensor<'c>>,
    ) -> Result<Tensor<'c>> {
        check_group_norm(a, groups)?;
        check_binary("mul", a, gamma)?;
        check_binary("add", a, beta)?;
        let channels = a.ne()[2];
        let per_channel = |t: Tensor<'_>| {
            t.ty() == Type::F32 && t.ne() == [1, 1, channels, 1] && t.is_contiguous()
        };
        if let Some(s) = stats {
            if s.ty() != Type::F32 || s.ne() != [1, 1, channels, 2] || !s.is_contiguous() {
                return Err(Error::Ggml(format!(
                    "group norm statistics: {} {:?}, not f32 [1, 1, {channels}, 2]",
                    s.ty().name(),
                    s.ne()
                )));
            }
        }
        if self.on_gpu() || !a.is_contiguous() || !per_channel(gamma) || !per_channel(beta) {
            let y = match stats {
                Some(s) => {
                    // (x - mean)·rstd·γ + β as one scale and one shift per channel.
                    let plane = |i: usize| self.view(s, [1, 1, channels, 1], [0, 0, 0, i]);
                    let scale = self.mul(plane(1)?, gamma)?;
                    let shift = self.add(self.scale(self.mul(plane(0)?, scale)?, -1.0)?, beta)?;
                    self.add(self.mul(a, scale)?, shift)?
                }
                None => {
                    let y = self.group_norm(a, groups, eps)?;
                    self.add(self.mul(y, gamma)?, beta)?
                }
            };
            return if act.silu { self.silu(y) } else { Ok(y) };
        }
        let params = self.keep(super::norm::Params {
            groups,
            eps,
            silu: act.silu,
            given: stats.is_some(),
        });
        let [w, h, c, n] = a.ne();
        // SAFETY: types, shapes and contiguity checked as the kernel reads them; `params`
        // lives as long as this context (and so the graph); written over, the result is
        // a view of `a` (source 0, then γ, β and the statistics), else a new tensor
        // with sources a, γ, β (and the statistics).
        let t = self.op(unsafe {
            if act.over {
                let mut args = [
                    gamma.raw(),
                    beta.raw(),
                    stats.map_or(std::ptr::null_mut(), |s| s.raw()),
                ];
                sys::ggml_custom_inplace(
                    self.raw(),
                    a.raw(),
                    args.as_mut_ptr(),
                    2 + stats.is_some() as c_int,
                    Some(super::norm::group_norm_op),
                    sys::GGML_N_TASKS_MAX,
                    params,
                )
            } else {
                let mut args = [
                    a.raw(),
                    gamma.raw(),
                    beta.raw(),
                    stats.map_or(std::ptr::null_mut(), |s| s.raw()),
                ];
                sys::ggml_custom_4d(
                    self.raw(),
                    Type::F32.0,
                    w as i64,
                    h as i64,
                    c as i64,
                    n as i64,
                    args.as_mut_ptr(),
                    3 + stats.is_some() as c_int,
                    Some(super::norm::group_norm_op),
                    sys::GGML_N_TASKS_MAX,
                    params,
                )
            }
        })?;
        self.name(t, "sdrs.group_norm")?;
        Ok(t)
    }

    /// GEGLU: `h` `[2·inner, tokens, B]` is `[value ‖ gate]` per token; the result
    /// `[inner, tokens, B]` is `value · GELU(gate)` (exact GELU). On the CPU one pass of
    /// sdrs' op (`ggml/geglu.rs`), elsewhere ggml's ops.
    pub fn geglu<'c>(&'c self, h: Tensor<'c>) -> Result<Tensor<'c>> {
        let [two, n, b, m] = h.ne();
        if two % 2 != 0 {
            return Err(bad("geglu", format!("{:?}: an odd width", h.ne())));
        }
        let inner = two / 2;
        if self.on_gpu() || h.ty() != Type::F32 || !h.is_contiguous() {
            let value = self.view(h, [inner, n, b, m], [0, 0, 0, 0])?;
            let gate = self.cont(self.view(h, [inner, n, b, m], [inner, 0, 0, 0])?)?;
            return self.mul(self.cont(value)?, self.gelu(gate)?);
        }
        let mut args = [h.raw()];
        // SAFETY: type, shape and contiguity checked as the kernel reads them.
        let t = self.op(unsafe {
            sys::ggml_custom_4d(
                self.raw(),
                Type::F32.0,
                inner as i64,
                n as i64,
                b as i64,
                m as i64,
                args.as_mut_ptr(),
                1,
                Some(super::geglu::geglu_op),
                sys::GGML_N_TASKS_MAX,
                std::ptr::null_mut(),
            )
        })?;
        self.name(t, "sdrs.geglu")?;
        Ok(t)
    }

    /// Exact (erf) GELU, as PyTorch's default `nn.GELU` (ggml's `gelu` is a tanh
    /// approximation read from an f16 table: ~1e-3 off).
    pub fn gelu<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: unary op.
        self.op(unsafe { sys::ggml_gelu_erf(self.raw(), a.raw()) })
    }
    /// CLIP's quick GELU, `x * sigmoid(1.702 x)`, in f32 (ggml's `gelu_quick`
    /// reads an f16 table, which costs the f32 path its 1e-4 accuracy).
    pub fn gelu_quick<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        let s = self.scale(a, 1.702)?;
        // SAFETY: unary op.
        let s = self.op(unsafe { sys::ggml_sigmoid(self.raw(), s.raw()) })?;
        self.mul(a, s)
    }
    pub fn silu<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: unary op.
        self.op(unsafe { sys::ggml_silu(self.raw(), a.raw()) })
    }
    /// `a²` elementwise.
    pub fn sqr<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: unary op.
        self.op(unsafe { sys::ggml_sqr(self.raw(), a.raw()) })
    }

    /// Sums over `ne[0]`: `[1, ne1, ne2, ne3]` (ggml accumulates each row in f64).
    pub fn sum_rows<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        if a.ty() != Type::F32 || a.nb()[0] != 4 {
            return Err(bad(
                "sum_rows",
                format!(
                    "a {} tensor with rows {} bytes apart (f32 rows of adjacent values only)",
                    a.ty().name(),
                    a.nb()[0]
                ),
            ));
        }
        // SAFETY: unary op on an f32 tensor.
        self.op(unsafe { sys::ggml_sum_rows(self.raw(), a.raw()) })
    }

    pub fn relu<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: unary op.
        self.op(unsafe { sys::ggml_relu(self.raw(), a.raw()) })
    }
    /// `max(x, 0) + slope · min(x, 0)`.
    pub fn leaky_relu<'c>(&'c self, a: Tensor<'c>, slope: f32) -> Result<Tensor<'c>> {
        need_f32("leaky_relu", "input", a)?;
        // SAFETY: unary op on an f32 tensor.
        self.op(unsafe { sys::ggml_leaky_relu(self.raw(), a.raw(), slope, false) })
    }
    pub fn tanh<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: unary op.
        self.op(unsafe { sys::ggml_tanh(self.raw(), a.raw()) })
    }

    /// Softmax over `ne[0]` of `a * scale + mask` (mask broadcast over rows; f32 or f16).
    pub fn soft_max_ext<'c>(
        &'c self,
        a: Tensor<'c>,
        mask: Option<Tensor<'c>>,
        scale: f32,
    ) -> Result<Tensor<'c>> {
        if let Some(m) = mask {
            if m.ne()[0] != a.ne()[0] || m.ne()[1] < a.ne()[1] {
                return Err(bad(
                    "soft_max",
                    format!("mask {:?} for scores {:?}", m.ne(), a.ne()),
                ));
            }
        }
        let m = mask.map_or(std::ptr::null_mut(), |m| m.raw());
        // SAFETY: mask shape checked.
        self.op(unsafe { sys::ggml_soft_max_ext(self.raw(), a.raw(), m, scale, 0.0) })
    }

    /// Fused attention (ggml's `flash_attn_ext`, online softmax, no score matrix):
    /// `q` `[D, Nq, H, B]`, `k` `[D, Nk, H, B]`, `v` `[Dv, Nk, H, B]` (views allowed)
    /// give `[Dv, H, Nq, B]`: heads already interleaved per token.
    pub fn flash_attn<'c>(
        &'c self,
        q: Tensor<'c>,
        k: Tensor<'c>,
        v: Tensor<'c>,
        scale: f32,
    ) -> Result<Tensor<'c>> {
        let (qn, kn, vn) = (q.ne(), k.ne(), v.ne());
        if qn[0] != kn[0]
            || kn[1] != vn[1]
            || kn[2] != vn[2]
            || kn[3] != vn[3]
            || qn[3] != kn[3]
            || qn[2] % kn[2] != 0
        {
            return Err(bad(
                "flash_attn_ext",
                format!("q {qn:?}, k {kn:?}, v {vn:?}"),
            ));
        }
        // The CPU kernel reads rows as contiguous runs (it asserts so).
        if [q, k, v].iter().any(|t| t.nb()[0] != t.ty().type_size()) {
            return Err(bad(
                "flash_attn_ext",
                "q, k and v rows must be contiguous (make a transposed view contiguous first)"
                    .into(),
            ));
        }
        // SAFETY: shapes checked as ggml asserts them; no mask, no ALiBi, no softcap.
        self.op(unsafe {
            sys::ggml_flash_attn_ext(
                self.raw(),
                q.raw(),
                k.raw(),
                v.raw(),
                std::ptr::null_mut(),
                scale,
                0.0,
                0.0,
            )
        })
    }

    /// softmax(q kᵀ · scale) v with sdrs' own kernel (see `ggml/attention.rs`):
    /// q `[D, Nq, H, B]`, k and v `[D, Nk, H, B]` (f32, any strides, so permuted
    /// views need no copy) → `[D*H, Nq, B]`, each token's heads side by side.
    pub fn attention<'c>(
        &'c self,
        q: Tensor<'c>,
        k: Tensor<'c>,
        v: Tensor<'c>,
        scale: f32,
    ) -> Result<Tensor<'c>> {
        let (qn, kn, vn) = (q.ne(), k.ne(), v.ne());
        let same = qn[0] == kn[0] && kn == vn && qn[2] == kn[2] && qn[3] == kn[3] && kn[1] > 0;
        if !same || [q, k, v].iter().any(|t| t.ty() != Type::F32) {
            return Err(bad(
                "attention",
                format!("q {qn:?}, k {kn:?}, v {vn:?} (f32, equal head sizes, heads and batch)"),
            ));
        }
        let mut args = [q.raw(), k.raw(), v.raw()];
        // SAFETY: shapes and types checked as the kernel assumes them; the scale
        // travels in the userdata pointer's bits (no allocation to outlive the graph).
        let t = self.op(unsafe {
            sys::ggml_custom_4d(
                self.raw(),
                Type::F32.0,
                (qn[0] * qn[2]) as i64,
                qn[1] as i64,
                qn[3] as i64,
                1,
                args.as_mut_ptr(),
                3,
                Some(super::attention::attention_op),
                sys::GGML_N_TASKS_MAX,
                scale.to_bits() as usize as *mut std::ffi::c_void,
            )
        })?;
        self.name(t, "sdrs.attention")?;
        Ok(t)
    }

    /// `a` `[K, N, ...]` (weights; may be quantized) times `b` `[K, M, ...]` (f32): `[N, M, ...]`.
    pub fn mul_mat<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        let (x, y) = (a.ne(), b.ne());
        if x[0] != y[0] || y[2] % x[2] != 0 || y[3] % x[3] != 0 || a.is_transposed() {
            return Err(bad("mul_mat", format!("{x:?} x {y:?}")));
        }
        if !a.ty().is_matrix_weight()
            || !(b.ty() == Type::F32 || (b.ty() == a.ty() && !a.ty().is_quantized()))
        {
            return Err(bad(
                "mul_mat",
                format!("{} weights times {} values", a.ty().name(), b.ty().name()),
            ));
        }
        // SAFETY: shapes checked.
        self.op(unsafe { sys::ggml_mul_mat(self.raw(), a.raw(), b.raw()) })
    }

    /// A linear layer: `x W^T + bias`, weight `[in, out]` in ggml order.
    pub fn linear<'c>(
        &'c self,
        x: Tensor<'c>,
        w: Tensor<'c>,
        bias: Option<Tensor<'c>>,
    ) -> Result<Tensor<'c>> {
        let y = self.mul_mat(w, x)?;
        match bias {
            Some(b) => self.add(y, b),
            None => Ok(y),
        }
    }

    pub fn reshape<'c>(&'c self, a: Tensor<'c>, ne: &[usize]) -> Result<Tensor<'c>> {
        let n: usize = ne.iter().product();
        if n != a.nelements()
            || !a.is_contiguous()
            || ne.is_empty()
            || ne.len() > 4
            || !a.ty().fits_row(ne[0])
        {
            return Err(bad("reshape", format!("{:?} to {ne:?}", a.ne())));
        }
        let d: Vec<i64> = ne.iter().map(|&x| x as i64).collect();
        // SAFETY: element count and contiguity checked.
        self.op(unsafe {
            match d.len() {
                1 => sys::ggml_reshape_1d(self.raw(), a.raw(), d[0]),
                2 => sys::ggml_reshape_2d(self.raw(), a.raw(), d[0], d[1]),
                3 => sys::ggml_reshape_3d(self.raw(), a.raw(), d[0], d[1], d[2]),
                _ => sys::ggml_reshape_4d(self.raw(), a.raw(), d[0], d[1], d[2], d[3]),
            }
        })
    }

    /// Moves axis i of `a` to position `axes[i]` (ggml's convention).
    pub fn permute<'c>(&'c self, a: Tensor<'c>, axes: [usize; 4]) -> Result<Tensor<'c>> {
        let mut seen = [false; 4];
        for &x in &axes {
            if x > 3 || seen[x] {
                return Err(bad("permute", format!("axes {axes:?}")));
            }
            seen[x] = true;
        }
        // SAFETY: axes form a permutation.
        self.op(unsafe {
            sys::ggml_permute(
                self.raw(),
                a.raw(),
                axes[0] as i32,
                axes[1] as i32,
                axes[2] as i32,
                axes[3] as i32,
            )
        })
    }

    /// A contiguous copy.
    pub fn cont<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: unary op.
        self.op(unsafe { sys::ggml_cont(self.raw(), a.raw()) })
    }

    /// `a` converted to the float type `ty` (a copy).
    pub fn cast<'c>(&'c self, a: Tensor<'c>, ty: Type) -> Result<Tensor<'c>> {
        if a.ty().is_quantized() || ty.is_quantized() {
            return Err(bad(
                "cast",
                format!("{} to {}: float types only", a.ty().name(), ty.name()),
            ));
        }
        // SAFETY: float to float copy of a graph tensor.
        self.op(unsafe { sys::ggml_cast(self.raw(), a.raw(), ty.0) })
    }

    pub fn transpose<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: swaps the first two axes (a view).
        self.op(unsafe { sys::ggml_transpose(self.raw(), a.raw()) })
    }

    /// A view of `ne` elements starting `offset` elements along each axis of `a`.
    pub fn view<'c>(
        &'c self,
        a: Tensor<'c>,
        ne: [usize; 4],
        start: [usize; 4],
    ) -> Result<Tensor<'c>> {
        let full = a.ne();
        if (0..4).any(|i| ne[i] == 0 || start[i] + ne[i] > full[i]) || a.ty().is_quantized() {
            return Err(bad("view", format!("{ne:?} at {start:?} of {full:?}")));
        }
        let nb = a.nb();
        let offset: usize = (0..4).map(|i| start[i] * nb[i]).sum();
        // SAFETY: the view lies inside `a` (checked above).
        self.op(unsafe {
            sys::ggml_view_4d(
                self.raw(),
                a.raw(),
                ne[0] as i64,
                ne[1] as i64,
                ne[2] as i64,
                ne[3] as i64,
                nb[1],
                nb[2],
                nb[3],
                offset,
            )
        })
    }

    /// Concatenates along `dim`; all other dims must agree.
    pub fn concat<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>, dim: usize) -> Result<Tensor<'c>> {
        let (x, y) = (a.ne(), b.ne());
        if dim > 3 || (0..4).any(|i| i != dim && x[i] != y[i]) || a.ty() != b.ty() {
            return Err(bad("concat", format!("{x:?} and {y:?} along {dim}")));
        }
        // SAFETY: shapes checked.
        self.op(unsafe { sys::ggml_concat(self.raw(), a.raw(), b.raw(), dim as i32) })
    }

    /// Rows of `table` (`[width, rows]`) selected by the i32 `ids`.
    pub fn get_rows<'c>(&'c self, table: Tensor<'c>, ids: Tensor<'c>) -> Result<Tensor<'c>> {
        if ids.ty() != Type::I32 {
            return Err(bad("get_rows", "ids must be i32".into()));
        }
        if !(table.ty().is_matrix_weight() || table.ty() == Type::I32) {
            return Err(bad(
                "get_rows",
                format!("rows of a {} table", table.ty().name()),
            ));
        }
        // SAFETY: types checked; ggml bounds-checks ids at compute time in debug only,
        // so callers validate id values when they set them.
        self.op(unsafe { sys::ggml_get_rows(self.raw(), table.raw(), ids.raw()) })
    }

    /// 2-D convolution of `x` `[W, H, IC, N]` with a kernel stored as the matrix
    /// `[IC*kh*kw, OC]` (quantized or float), through im2col + mul_mat.
    pub fn conv2d<'c>(
        &'c self,
        x: Tensor<'c>,
        kernel: Tensor<'c>,
        shape: ConvShape,
        bias: Option<Tensor<'c>>,
    ) -> Result<Tensor<'c>> {
        let ConvShape {
            kh,
            kw,
            stride,
            pad,
            up,
        } = shape;
        let [w, h, ic, n] = x.ne();
        let [k, oc, _, _] = kernel.ne();
        let Some((ow, oh)) = shape.output(w, h).filter(|_| k == ic * kh * kw) else {
            return Err(bad(
                "conv2d",
                format!("kernel {:?} ({kh}x{kw}) on input {:?}", kernel.ne(), x.ne()),
            ));
        };
        need_f32("conv2d", "input", x)?;
        let pointwise = kh == 1 && kw == 1 && stride == 1 && pad == 0;
        if up > 1 && (pointwise || self.on_gpu()) {
            // Only sdrs' im2col reads through an upsampling; elsewhere it is made.
            let x = self.upscale_nearest(x, up)?;
            return self.conv2d(x, kernel, ConvShape { up: 1, ..shape }, bias);
        }
        let product_of = |cols: Tensor<'c>, pixels: usize| {
            // [OC, pixels·N], a pixel's channels together.
            let y = self.mul_mat(kernel, self.reshape(cols, &[k, pixels * n])?)?;
            self.reshape(y, &[oc, pixels, n])
        };
        // The column matrix a band of output rows needs, and so how many bands keep it
        // within the budget.
        let columns = if self.on_gpu() {
            Type::F32
        } else {
            column_type(kernel.ty())
        };
        // Counted as f32 even where the columns are 16-bit: the bands stay as tall, and
        // the product's f32 output per band with them.
        let row_bytes = k * ow * n * Type::F32.type_size();
        let bands = (row_bytes * oh)
            .div_ceil(self.conv_budget.get())
            .clamp(1, oh.min(CONV_MAX_BANDS));
        if pointwise && bands == 1 {
            // A 1x1 convolution is a matmul over channels: [W*H, IC] per image.
            let x = if x.is_contiguous() { x } else { self.cont(x)? };
            let xt = self.transpose_inner(self.reshape(x, &[w * h, ic, n])?)?; // [IC, W*H, N]
            let y = product_of(xt, w * h)?;
            return self.conv_epilogue(&[(y, 0)], bias, [ow, oh, oc, n], EPILOGUE);
        }
        if self.on_gpu() {
            // sdrs' im2col is a CPU custom op; on a GPU, ggml's own. It reads only the
            // kernel's shape from its first source, so a small stand-in carries that (the
            // weights may be quantized, which no 4-D view of them can be).
            self.ensure_room(8)?;
            let shape = self.tensor(Type::F16, &[kw, kh, ic, 1], "conv.kernel_shape")?;
            let (s, p) = (stride as i32, pad as i32);
            // SAFETY: shapes checked above; im2col reads b's data and a's shape.
            let cols = self.op(unsafe {
                sys::ggml_im2col(
                    self.raw(),
                    shape.raw(),
                    x.raw(),
                    s,
                    s,
                    p,
                    p,
                    1,
                    1,
                    true,
                    Type::F32.0,
                )
            })?;
            let y = product_of(cols, ow * oh)?;
            return self.conv_epilogue(&[(y, 0)], bias, [ow, oh, oc, n], EPILOGUE);
        }
        // The column matrix of a large convolution (a VAE decoder's at 512x512: 2.4 GB
        // for one 3x3 conv of 256 channels) is built and multiplied a band of output rows
        // at a time. Each output is the same dot product as in one piece, so this is
        // exact, and the columns stay within the budget. A large 1x1 convolution (the
        // VAE's last shortcut: 256 MB of input at 512x512) goes the same way, its
        // transposed input made a band at a time rather than whole. At most
        // CONV_MAX_BANDS bands: each adds ~8 tensors to the graph, and the context was
        // sized by its builder.
        self.ensure_room(8 * bands + 8)?;
        let band = oh.div_ceil(bands);
        let mut products = Vec::with_capacity(bands);
        for r0 in (0..oh).step_by(band) {
            let rows = band.min(oh - r0);
            let cols = self.im2col_rows(x, shape, r0, rows, columns)?;
            products.push((product_of(cols, ow * rows)?, r0));
        }
        self.conv_epilogue(&products, bias, [ow, oh, oc, n], EPILOGUE)
    }

    /// The 3x3 kernel `kernel` (`[IC·9, OC]`, f32, f16 or bf16) transformed for
    /// [`Context::conv3x3_winograd`] (`[IC, OC, 36]` f32), in the graph (a CPU op).
    pub fn winograd_kernel<'c>(&'c self, kernel: Tensor<'c>) -> Result<Tensor<'c>> {
        let [k, oc, one, one_more] = kernel.ne();
        let ty = match kernel.ty() {
            Type::F32 => super::winograd::KernelType::F32,
            Type::F16 => super::winograd::KernelType::F16,
            Type::BF16 => super::winograd::KernelType::BF16,
            other => return Err(bad("Winograd kernel", format!("a {} kernel", other.name()))),
        };
        if self.on_gpu() || !kernel.is_contiguous() || k % 9 != 0 || one != 1 || one_more != 1 {
            return Err(bad(
                "Winograd kernel",
                format!("kernel {:?} for a 3x3 convolution", kernel.ne()),
            ));
        }
        self.ensure_room(2)?;
        let params = self.keep(ty);
        let mut args = [kernel.raw()];
        // SAFETY: type, shape and contiguity checked as the kernel reads them; `params`
        // lives as long as this context (and so the graph).
        let t = self.op(unsafe {
            sys::ggml_custom_4d(
                self.raw(),
                Type::F32.0,
                (k / 9) as i64,
                oc as i64,
                super::winograd::POSITIONS as i64,
                1,
                args.as_mut_ptr(),
                1,
                Some(super::winograd::kernel_op),
                sys::GGML_N_TASKS_MAX,
                params,
            )
        })?;
        self.name(t, "sdrs.winograd_kernel")?;
        Ok(t)
    }

    /// A 3x3 convolution, stride 1, padding 1, of `x` `[W, H, IC, N]` read upsampled by
    /// `up` (nearest neighbour; a power of two, 1 for none), by Winograd's F(4x4, 3x3)
    /// in one CPU op (`ggml/winograd.rs`): `u` is the kernel as
    /// [`super::winograd_kernel`] transforms it (`[IC, OC, 36]` f32), `bias` `[OC]` f32.
    /// Output `[W·up, H·up, OC, N]`.
    pub fn conv3x3_winograd<'c>(
        &'c self,
        x: Tensor<'c>,
        u: Tensor<'c>,
        up: usize,
        bias: Option<Tensor<'c>>,
    ) -> Result<Tensor<'c>> {
        let [w, h, ic, n] = x.ne();
        let [uic, oc, positions, one] = u.ne();
        let bias_ok = bias
            .is_none_or(|b| b.ty() == Type::F32 && b.ne() == [oc, 1, 1, 1] && b.is_contiguous());
        if self.on_gpu()
            || x.ty() != Type::F32
            || !x.is_contiguous()
            || u.ty() != Type::F32
            || !u.is_contiguous()
            || uic != ic
            || positions != super::winograd::POSITIONS
            || one != 1
            || !up.is_power_of_two()
            || !bias_ok
        {
            return Err(bad(
                "Winograd conv",
                format!(
                    "input {:?} {} and kernel {:?} {} (bias {:?}, up {up}){}",
                    x.ne(),
                    x.ty().name(),
                    u.ne(),
                    u.ty().name(),
                    bias.map(|b| b.ne()),
                    if self.on_gpu() { ", on a GPU" } else { "" }
                ),
            ));
        }
        self.ensure_room(4)?;
        let params = self.keep(super::winograd::Params {
            up,
            bias: bias.is_some(),
        });
        let mut args = vec![x.raw(), u.raw()];
        args.extend(bias.map(|b| b.raw()));
        // SAFETY: shapes, types and contiguity checked as the kernel reads them;
        // `params` lives as long as this context (and so the graph).
        let t = self.op(unsafe {
            sys::ggml_custom_4d(
                self.raw(),
                Type::F32.0,
                (w * up) as i64,
                (h * up) as i64,
                oc as i64,
                n as i64,
                args.as_mut_ptr(),
                args.len() as c_int,
                Some(super::winograd::winograd_op),
                sys::GGML_N_TASKS_MAX,
                params,
            )
        })?;
        self.name(t, "sdrs.winograd")?;
        Ok(t)
    }

    /// `x` `[A, B, N]` as `[B, A, N]` (the inner two axes swapped, contiguous): on the
    /// CPU by the epilogue op (a cache-blocked transpose), else a permuted copy.
    pub fn transpose_inner<'c>(&'c self, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let [a, b, n, m] = x.ne();
        if m != 1 {
            return Err(bad("transpose", format!("{:?} has a fourth axis", x.ne())));
        }
        if x.ty() != Type::F32 || !x.is_contiguous() {
            return self.cont(self.permute(x, [1, 0, 2, 3])?);
        }
        self.ensure_room(4)?;
        let y = self.conv_epilogue(&[(x, 0)], None, [b, 1, a, n], "sdrs.transpose")?; // [B, 1, A, N]
        self.reshape(y, &[b, a, n])
    }

    /// The output `[OW, OH, OC, N]` of a convolution from its product in bands
    /// (`[OC, OW·rows, N]` each, with its first output row, in order, covering every
    /// row), `bias` `[OC]` added: on the CPU sdrs' epilogue op (`ggml/epilogue.rs`), one
    /// per band, each writing its rows in place into the first one's output; on a GPU
    /// (one band) a permuted copy and ggml's add. `name` names the custom ops (for
    /// profiles).
    fn conv_epilogue<'c>(
        &'c self,
        bands: &[(Tensor<'c>, usize)],
        bias: Option<Tensor<'c>>,
        ne: [usize; 4],
        name: &str,
    ) -> Result<Tensor<'c>> {
        let [ow, oh, oc, n] = ne;
        if self.on_gpu() {
            let [(y, 0)] = bands else {
                return Err(bad("conv epilogue", "a GPU graph takes one band".into()));
            };
            let y = self.reshape(*y, &[oc, ow, oh, n])?;
            let y = self.cont(self.permute(y, [2, 0, 1, 3])?)?; // [OW, OH, OC, N]
            return match bias {
                Some(b) => self.add(y, self.reshape(b, &[1, 1, oc, 1])?),
                None => Ok(y),
            };
        }
        // A bias the kernel cannot read directly is added afterwards.
        let (fused, later) = match bias {
            Some(b) if b.ty() == Type::F32 && b.ne() == [oc, 1, 1, 1] && b.is_contiguous() => {
                (Some(b), None)
            }
            other => (None, other),
        };
        let mut out: Option<Tensor<'c>> = None;
        let mut next_row = 0;
        for &(y, row0) in bands {
            let [c, pixels, m, _] = y.ne();
            let rows = pixels / ow.max(1);
            if c != oc
                || m != n
                || rows * ow != pixels
                || row0 != next_row
                || row0 + rows > oh
                || y.ty() != Type::F32
                || !y.is_contiguous()
            {
                return Err(bad(
                    "conv epilogue",
                    format!("band {:?} at row {row0} of an output {ne:?}", y.ne()),
                ));
            }
            next_row = row0 + rows;
            let params = self.keep(super::epilogue::Params {
                row0,
                band: usize::from(out.is_some()),
                bias: fused.is_some(),
            });
            let mut args = vec![y.raw()];
            args.extend(fused.map(|b| b.raw()));
            // SAFETY: shapes, types and contiguity checked as the kernel reads them;
            // `params` lives as long as this context (and so the graph); an in-place op
            // writes only its band's rows of the output the earlier ops made.
            let t = self.op(unsafe {
                match out {
                    None => sys::ggml_custom_4d(
                        self.raw(),
                        Type::F32.0,
                        ow as i64,
                        oh as i64,
                        oc as i64,
                        n as i64,
                        args.as_mut_ptr(),
                        args.len() as c_int,
                        Some(super::epilogue::epilogue_op),
                        sys::GGML_N_TASKS_MAX,
                        params,
                    ),
                    Some(prev) => sys::ggml_custom_inplace(
                        self.raw(),
                        prev.raw(),
                        args.as_mut_ptr(),
                        args.len() as c_int,
                        Some(super::epilogue::epilogue_op),
                        sys::GGML_N_TASKS_MAX,
                        params,
                    ),
                }
            })?;
            self.name(t, name)?;
            out = Some(t);
        }
        let out = match out {
            Some(t) if next_row == oh => t,
            _ => {
                return Err(bad(
                    "conv epilogue",
                    format!("bands cover {next_row} of {oh} rows"),
                ))
            }
        };
        match later {
            Some(b) => self.add(out, self.reshape(b, &[1, 1, oc, 1])?),
            None => Ok(out),
        }
    }

    /// The column matrix `[IC*kh*kw, OW, rows, N]` of output rows `row0..row0+rows`
    /// of a convolution of `x` `[W, H, IC, N]` (f32, rows contiguous; read upsampled
    /// by `shape.up`) with `pad` zeros on every side, by sdrs' own kernel
    /// (`ggml/im2col.rs`), in type `ty` (f32, f16 or bf16).
    fn im2col_rows<'c>(
        &'c self,
        x: Tensor<'c>,
        shape: ConvShape,
        row0: usize,
        rows: usize,
        ty: Type,
    ) -> Result<Tensor<'c>> {
        let [w, h, ic, n] = x.ne();
        let Some((ow, oh)) = shape
            .output(w, h)
            .filter(|_| x.ty() == Type::F32 && x.nb()[0] == 4)
        else {
            return Err(bad(
                "im2col",
                format!(
                    "input {:?} must be f32 with contiguous rows, at least the kernel's size",
                    x.ne()
                ),
            ));
        };
        let (kh, kw) = (shape.kh, shape.kw);
        let out = match ty {
            Type::F32 => super::im2col::Out::F32,
            Type::F16 => super::im2col::Out::F16,
            Type::BF16 => super::im2col::Out::BF16,
            other => return Err(bad("im2col", format!("columns in {}", other.name()))),
        };
        if rows == 0 || row0 + rows > oh {
            return Err(bad(
                "im2col",
                format!("rows {row0}..{} of {oh}", row0 + rows),
            ));
        }
        let params = self.keep(super::im2col::Params {
            kh,
            kw,
            stride: shape.stride,
            pad: shape.pad,
            up: shape.up,
            row0,
            out,
        });
        let mut args = [x.raw()];
        // SAFETY: shapes checked as the kernel reads them; `params` lives as long as
        // this context (and so the graph).
        let t = self.op(unsafe {
            sys::ggml_custom_4d(
                self.raw(),
                ty.0,
                (ic * kh * kw) as i64,
                ow as i64,
                rows as i64,
                n as i64,
                args.as_mut_ptr(),
                1,
                Some(super::im2col::im2col_op),
                sys::GGML_N_TASKS_MAX,
                params,
            )
        })?;
        self.name(t, "sdrs.im2col")?;
        Ok(t)
    }

    /// Zero padding at the end of each axis.
    pub fn pad<'c>(&'c self, a: Tensor<'c>, p: [usize; 4]) -> Result<Tensor<'c>> {
        // SAFETY: unary op.
        self.op(unsafe {
            sys::ggml_pad(
                self.raw(),
                a.raw(),
                p[0] as i32,
                p[1] as i32,
                p[2] as i32,
                p[3] as i32,
            )
        })
    }

    /// Adds a scalar to every element.
    pub fn add1<'c>(&'c self, a: Tensor<'c>, v: f32) -> Result<Tensor<'c>> {
        // A 1-element tensor would need its own data; scale-and-bias does it in one op.
        // SAFETY: unary op.
        self.op(unsafe { sys::ggml_scale_bias(self.raw(), a.raw(), 1.0, v) })
    }

    /// Nearest-neighbour upsampling by an integer factor in W and H.
    pub fn upscale_nearest<'c>(&'c self, a: Tensor<'c>, factor: usize) -> Result<Tensor<'c>> {
        need_f32("upscale", "input", a)?;
        // SAFETY: unary op.
        self.op(unsafe {
            sys::ggml_upscale(
                self.raw(),
                a.raw(),
                factor as i32,
                sys::GGML_SCALE_MODE_NEAREST,
            )
        })
    }

    /// Sets `-inf` above the diagonal of each `[n, n]` score matrix (causal mask).
    pub fn diag_mask_inf<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: unary op.
        self.op(unsafe { sys::ggml_diag_mask_inf(self.raw(), a.raw(), 0) })
    }

    /// Marks a graph input (allocated so its data can be set before compute).
    pub fn set_input(&self, t: Tensor<'_>) {
        // SAFETY: flag only.
        unsafe { sys::ggml_set_input(t.raw()) }
    }
    /// Marks a graph output (never overwritten by the allocator).
    pub fn set_output(&self, t: Tensor<'_>) {
        // SAFETY: flag only.
        unsafe { sys::ggml_set_output(t.raw()) }
    }
}
