//! Which ggml type each tensor gets.
//!
//! Defaults keep what is small or sensitive in float (norms and biases in f32;
//! token/position embeddings and the timestep/label embeddings in f16), put the
//! VAE's kernels in bf16 unless f32 is asked for, and give every other linear and
//! convolution kernel (UNet, text encoders) the requested type. Convolution kernels are
//! stored as 2-D matrices with rows spanning in_channels·kh·kw, so they quantize.
//! User rules (`REGEX=TYPE`, the last match wins) override the defaults.
//!
//! Why bf16 for the VAE: it is 84 M parameters (~10% of an SD 1.5 model) but most of
//! a few-step run's arithmetic, and decoded pixels show its error directly. In bf16
//! its products run on AVX512-BF16 dot products where the CPU has them, and at the
//! f32 rate on any AVX CPU (ggml's tinyBLAS), with f32's exponent range (SDXL's
//! decoder overflows f16, so an f16 VAE is multiplied as f32). The SD 1.5 decode at
//! 512x512 on 2 Zen 4 cores: 6.7 s in bf16, 13.3 s in f16, 17.5 s in q8_0; on the
//! same CPU through ggml's AVX2 library 15.5 / 15.9 / 19.5 s. And bf16 is the closer
//! to an f32 decode: 51.6 dB PSNR, q8_0 46.3 dB. CPUs whose ggml has no vector bf16
//! product (aarch64) get the weights converted to f16 at load (`model::fit`).
use std::str::FromStr;

use regex::Regex;

use crate::error::{Error, Result};
use crate::ggml::Type;

#[derive(Clone, Debug)]
pub struct Rule {
    pub pattern: Regex,
    pub ty: Type,
}

impl FromStr for Rule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Rule> {
        let (re, ty) = s.rsplit_once('=').ok_or_else(|| {
            Error::Invalid(format!("tensor type rule `{s}`: expected REGEX=TYPE"))
        })?;
        let ty = parse_type(ty)?;
        let pattern =
            Regex::new(re).map_err(|e| Error::Invalid(format!("tensor type rule `{s}`: {e}")))?;
        Ok(Rule { pattern, ty })
    }
}

/// Parses a weight type name accepted by `--type` (case-insensitive).
pub fn parse_type(s: &str) -> Result<Type> {
    Type::parse(s)
        .filter(|t| Type::CONVERT_TARGETS.contains(t))
        .ok_or_else(|| {
            let names: Vec<&str> = Type::CONVERT_TARGETS.iter().map(|t| t.name()).collect();
            Error::Invalid(format!(
                "unknown weight type `{s}`; valid types: {}",
                names.join(", ")
            ))
        })
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub wtype: Type,
    pub rules: Vec<Rule>,
    /// Store the UNet's q4_0 matrices interleaved ([`crate::ggml::repack`]): the layout
    /// ggml's x86 integer GEMM reads, so they are used in place from the mapping.
    pub interleave: bool,
}

/// The decision for one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub ty: Type,
    /// Shape in ggml order as stored.
    pub ne: Vec<u64>,
    /// Whether the stored shape differs from the source's (4-D kernels stored 2-D).
    pub reshaped: bool,
    /// Stored in the interleaved q4_0 layout ([`Policy::interleave`]).
    pub interleaved: bool,
    pub why: String,
}

fn is_float(t: Type) -> bool {
    matches!(t, Type::F32 | Type::F16 | Type::BF16)
}

/// Fallback when a row is not a whole number of blocks: K-quants (256-element
/// blocks) fall back to the 32-element type of about the same precision.
fn fallback(t: Type) -> Option<Type> {
    match t {
        Type::Q2_K | Type::Q3_K | Type::Q4_K => Some(Type::Q4_0),
        Type::Q5_K => Some(Type::Q5_0),
        Type::Q6_K => Some(Type::Q8_0),
        t if t.is_quantized() => Some(Type::F16),
        _ => None,
    }
}

impl Policy {
    pub fn new(wtype: Type) -> Self {
        Policy {
            wtype,
            rules: Vec::new(),
            interleave: false,
        }
    }

    fn default_type(&self, name: &str, ndim: usize) -> (Type, &'static str) {
        let w = self.wtype;
        let float_w = if is_float(w) { w } else { Type::F16 };
        if ndim <= 1 {
            return (Type::F32, "1-D (norm, bias, scale)");
        }
        if [
            "token_embedding",
            "position_embedding",
            "positional_embedding",
        ]
        .iter()
        .any(|k| name.contains(k))
        {
            return (float_w, "embedding table");
        }
        if name.contains(".time_embed.") || name.contains(".label_emb.") {
            return (float_w, "timestep/label embedding");
        }
        if name.ends_with("text_projection") {
            // OpenCLIP's is applied transposed (`x @ P`), which ggml can do for floats only.
            return (float_w, "text projection");
        }
        if name.starts_with(crate::network::VAE_PREFIX) && w != Type::F32 {
            return (Type::BF16, "VAE kernels in bf16");
        }
        (w, "weight")
    }

    /// Decides the stored type and shape of a tensor with PyTorch `shape`.
    pub fn decide(&self, name: &str, shape: &[usize]) -> Decision {
        let (mut ty, why) = self.default_type(name, shape.len());
        let mut why = why.to_string();
        if let Some(r) = self.rules.iter().rev().find(|r| r.pattern.is_match(name)) {
            ty = r.ty;
            why = format!("rule `{}`", r.pattern.as_str());
        }
        let reshaped = shape.len() == 4;
        let ne: Vec<u64> = match shape {
            [] => vec![1],
            [out, rest @ ..] if reshaped => {
                vec![rest.iter().product::<usize>() as u64, *out as u64]
            }
            s => s.iter().rev().map(|&d| d as u64).collect(),
        };
        while !ty.fits_row(ne[0] as usize) {
            let Some(next) = fallback(ty) else { break };
            why = format!(
                "{why}; rows of {} are not whole {} blocks",
                ne[0],
                ty.name()
            );
            ty = next;
        }
        // Only the UNet's: every one of its matrices is the weight of a product, the one
        // use the layout serves.
        let interleaved = self.interleave
            && name.starts_with(crate::network::UNET_PREFIX)
            && crate::ggml::repack::can_interleave(ty, &ne);
        Decision {
            ty,
            ne,
            reshaped,
            interleaved,
            why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_kernels_are_stored_as_quantizable_matrices() {
        let p = Policy::new(Type::Q4_0);
        let d = p.decide(
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
            &[320, 320, 3, 3],
        );
        assert_eq!(
            (d.ty, d.ne.clone(), d.reshaped),
            (Type::Q4_0, vec![2880, 320], true)
        );
        // conv_in: 4 channels * 3 * 3 = 36 is not a whole block of 32
        let d = p.decide(
            "model.diffusion_model.input_blocks.0.0.weight",
            &[320, 4, 3, 3],
        );
        assert_eq!(d.ty, Type::F16);
    }

    #[test]
    fn sensitive_tensors_stay_float_and_the_vae_kernels_are_bf16() {
        let p = Policy::new(Type::Q4_K);
        assert_eq!(
            p.decide("model.diffusion_model.out.0.weight", &[320]).ty,
            Type::F32
        );
        assert_eq!(
            p.decide(
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                &[49408, 768]
            )
            .ty,
            Type::F16
        );
        assert_eq!(
            p.decide(
                "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                &[3072, 768]
            )
            .ty,
            Type::Q4_K
        );
        assert_eq!(
            p.decide(
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                &[128, 128, 3, 3]
            )
            .ty,
            Type::BF16
        );
        // The VAE's 1-D tensors stay f32, and an f32 request keeps f32 kernels.
        assert_eq!(
            p.decide("first_stage_model.decoder.norm_out.weight", &[128])
                .ty,
            Type::F32
        );
        assert_eq!(
            Policy::new(Type::F32)
                .decide("first_stage_model.decoder.conv_out.weight", &[3, 128, 3, 3])
                .ty,
            Type::F32
        );
        assert_eq!(
            Policy::new(Type::F16)
                .decide("first_stage_model.decoder.conv_out.weight", &[3, 128, 3, 3])
                .ty,
            Type::BF16
        );
        // 2880 is not a multiple of 256: q4_K falls back to q4_0
        assert_eq!(
            p.decide(
                "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
                &[320, 320, 3, 3]
            )
            .ty,
            Type::Q4_0
        );
        assert_eq!(
            p.decide(
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                &[320, 320]
            )
            .ty,
            Type::Q4_0
        );
        assert_eq!(
            p.decide(
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
                &[640, 1280]
            )
            .ty,
            Type::Q4_K
        );
    }

    #[test]
    fn user_rules_override_defaults_and_last_match_wins() {
        let mut p = Policy::new(Type::Q4_0);
        p.rules.push("attn1=q8_0".parse().unwrap());
        p.rules.push("to_q=f16".parse().unwrap());
        assert_eq!(
            p.decide("model.diffusion_model.x.attn1.to_k.weight", &[320, 320])
                .ty,
            Type::Q8_0
        );
        assert_eq!(
            p.decide("model.diffusion_model.x.attn1.to_q.weight", &[320, 320])
                .ty,
            Type::F16
        );
        assert!("nonsense".parse::<Rule>().is_err());
        assert!("x=q9_9".parse::<Rule>().is_err());
    }
}
