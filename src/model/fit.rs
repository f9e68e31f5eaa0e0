//! What the graphs need of a stored weight, and the one-time conversion of a weight
//! that another writer stored in a form they cannot take.
//!
//! `sdrs convert` writes every tensor as the graphs read it. stable-diffusion.cpp's
//! converter does not: it stores norm scales and biases as F16, quantizes any 1-D
//! tensor whose length is a whole number of blocks (a GroupNorm scale becomes a Q8_0
//! or Q4_K row), and quantizes OpenCLIP's text projection, which the graph applies
//! transposed. ggml's elementwise ops take f32 operands only, a quantized row cannot
//! be reshaped into a channel vector, and a transposed quantized matrix cannot be
//! made contiguous, so those few small tensors are converted once at load; every
//! other tensor (all the large ones) is used in place from the mapping.
//!
//! One more conversion is the machine's, not the writer's: bf16 matrices (sdrs writes
//! the VAE's kernels so) where ggml has no vector bf16 product. Its aarch64 build
//! multiplies bf16 one element at a time, in double, so there they become f16, which
//! holds every bf16 weight's value exactly (a weight's 8 significant bits within f16's
//! range). q8_0 would take half the memory but moved a VAE decode 1.4-1.8% (relative
//! RMS) from diffusers' on aarch64, past the f16 tests' bound.
use crate::error::{Error, Result};
use crate::ggml::Type;

/// The type a stored weight must be converted to before a graph uses it, or `None`
/// when the graph takes it as stored. `ne` is the shape in ggml order; `vector_bf16`
/// says whether the device multiplies bf16 matrices at vector speed
/// ([`crate::cpu::vector_bf16`] on the CPU).
pub fn convert_to(name: &str, ty: Type, ne: &[u64], vector_bf16: bool) -> Option<Type> {
    let vector = ne.iter().skip(1).all(|&d| d == 1);
    if vector {
        // Biases, norm scales and shifts: operands of elementwise ops.
        return (ty != Type::F32).then_some(Type::F32);
    }
    if ty == Type::BF16 && !vector_bf16 {
        return Some(Type::F16);
    }
    if name.ends_with("text_projection") && !is_plain_float(ty) {
        // OpenCLIP's projection is applied as `x @ P`: transposed, then made contiguous.
        return Some(Type::F16);
    }
    if !ty.is_matrix_weight() {
        return Some(if ty == Type::F64 || ty.block_size() == 1 {
            Type::F32
        } else {
            Type::F16
        });
    }
    None
}

fn is_plain_float(ty: Type) -> bool {
    matches!(ty, Type::F32 | Type::F16 | Type::BF16)
}

/// `raw` (`ne`'s elements of type `from`) as bytes of type `to`, for a weight that
/// [`convert_to`] picked; `what` names the file and tensor in errors.
pub fn convert(what: &str, from: Type, to: Type, raw: &[u8], ne: &[u64]) -> Result<Vec<u8>> {
    let n: u64 = ne.iter().product();
    let row = ne.first().copied().unwrap_or(1) as usize;
    let bad = |e: Error| {
        Error::Invalid(format!(
            "{what}: cannot convert {} to {}: {e}",
            from.name(),
            to.name()
        ))
    };
    let values = from.dequantize(raw, n as usize).map_err(bad)?;
    let mut out = Vec::new();
    to.quantize_rows(&values, values.len() / row.max(1), row, &mut out)
        .map_err(bad)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_in_any_type_but_f32_become_f32() {
        for ty in [Type::F16, Type::BF16, Type::Q8_0, Type::Q4_K] {
            assert_eq!(
                convert_to("m.out.0.weight", ty, &[256], true),
                Some(Type::F32),
                "{}",
                ty.name()
            );
            assert_eq!(
                convert_to("m.norm.bias", ty, &[256, 1, 1, 1], true),
                Some(Type::F32)
            );
        }
        assert_eq!(convert_to("m.out.0.weight", Type::F32, &[256], true), None);
    }

    #[test]
    fn matrices_stay_as_stored_unless_the_graph_cannot_multiply_or_transpose_them() {
        for ty in [
            Type::F16,
            Type::BF16,
            Type::Q8_0,
            Type::Q4_0,
            Type::Q5_1,
            Type::Q2_K,
            Type::Q6_K,
        ] {
            assert_eq!(
                convert_to("m.attn.to_q.weight", ty, &[320, 320], true),
                None,
                "{}",
                ty.name()
            );
            assert_eq!(
                convert_to("m.conv.weight", ty, &[3, 3, 32, 320], true).filter(|_| ty.fits_row(3)),
                None
            );
        }
        let q8k = Type::parse("q8_K").unwrap();
        assert_eq!(
            convert_to("m.attn.to_q.weight", q8k, &[256, 320], true),
            Some(Type::F16)
        );
        assert_eq!(
            convert_to(
                "conditioner.embedders.1.model.text_projection",
                Type::Q4_0,
                &[32, 32],
                true
            ),
            Some(Type::F16)
        );
        assert_eq!(
            convert_to(
                "conditioner.embedders.1.model.text_projection",
                Type::F16,
                &[32, 32],
                true
            ),
            None
        );
    }

    #[test]
    fn bf16_matrices_become_f16_where_the_device_has_no_vector_bf16_product() {
        let conv = "first_stage_model.decoder.up.0.block.0.conv1.weight";
        assert_eq!(convert_to(conv, Type::BF16, &[1152, 128], true), None);
        assert_eq!(
            convert_to(conv, Type::BF16, &[1152, 128], false),
            Some(Type::F16)
        );
        assert_eq!(
            convert_to("cond.model.text_projection", Type::BF16, &[64, 64], false),
            Some(Type::F16)
        );
        // Other types are not the machine's concern.
        assert_eq!(convert_to(conv, Type::F16, &[1152, 128], false), None);
        assert_eq!(convert_to(conv, Type::Q8_0, &[1152, 128], false), None);
    }

    #[test]
    fn conversion_keeps_the_values_within_the_target_type() {
        let v: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 8.0).collect();
        let mut q = Vec::new();
        Type::Q8_0.quantize_rows(&v, 1, 64, &mut q).unwrap();
        let out = convert("x.gguf: `n.weight`", Type::Q8_0, Type::F32, &q, &[64]).unwrap();
        let back = Type::F32.dequantize(&out, 64).unwrap();
        assert!(back.iter().zip(&v).all(|(a, b)| (a - b).abs() < 0.02));
        let err =
            convert("x.gguf: `n.weight`", Type::Q8_0, Type::F32, &q[..10], &[64]).unwrap_err();
        assert!(err.to_string().contains("x.gguf: `n.weight`"), "{err}");
    }
}
