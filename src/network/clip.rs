//! The CLIP text encoders: OpenAI CLIP in Hugging Face naming (`CLIPTextModel`) and
//! OpenCLIP, under the prefix the config gives. Diffusers always uses the Hugging Face
//! naming, so an OpenCLIP tower's stacked `in_proj` is diffusers' q, k and v, and its
//! `text_projection` (applied as `x @ P`) is the transpose of diffusers' linear weight.
//!
//! A Hugging Face tower with `projection_dim` (`CLIPTextModelWithProjection`) keeps its
//! projection beside `text_model`: `<prefix without "text_model.">text_projection.weight`,
//! `[projection_dim, hidden]`, as the SD3/Flux single files do.
use crate::config::{TextEncoderConfig, TextEncoderKind};

use super::{At, Layer, Op, Param};

/// The q, k and v projections of one layer.
#[derive(Clone, Debug)]
pub enum Qkv {
    /// Three linear layers (Hugging Face).
    Separate([Layer; 3]),
    /// One stacked `[3 hidden, hidden]` weight and its bias (OpenCLIP `in_proj_*`).
    Stacked { weight: Param, bias: Param },
}

/// One pre-norm transformer layer: causal self-attention and an MLP.
#[derive(Clone, Debug)]
pub struct EncoderLayer {
    pub norm1: Layer,
    pub qkv: Qkv,
    pub out_proj: Layer,
    pub norm2: Layer,
    pub fc1: Layer,
    pub fc2: Layer,
}

#[derive(Clone, Debug)]
pub struct TextEncoder {
    /// `[vocab, hidden]`.
    pub token_embedding: Param,
    /// `[positions, hidden]`.
    pub position_embedding: Param,
    pub layers: Vec<EncoderLayer>,
    pub final_norm: Layer,
    /// The pooled output's projection, when the config has one.
    pub projection: Option<Param>,
}

impl TextEncoder {
    pub fn new(t: &TextEncoderConfig) -> Self {
        let (h, n, pre) = (t.hidden_size, t.intermediate_size, t.prefix.as_str());
        let top = At::new(pre, "text_model.");
        let tensor = |c: &str, d: &str, shape: Vec<usize>| {
            Param::same(format!("{pre}{c}"), format!("text_model.{d}"), shape)
        };
        let projection = t.projection_dim.map(|d| match t.kind {
            TextEncoderKind::HfClip => Param::same(
                projection_name(t),
                "text_projection.weight".into(),
                vec![d, h],
            ),
            TextEncoderKind::OpenClip => Param {
                op: Op::Transpose,
                ..Param::same(
                    projection_name(t),
                    "text_projection.weight".into(),
                    vec![h, d],
                )
            },
        });
        let layers = (0..t.num_layers).map(|l| {
            let d = format!("encoder.layers.{l}");
            match t.kind {
                TextEncoderKind::HfClip => {
                    let at = top.sub(&d, &d);
                    let proj = |p: &str| {
                        at.linear(&format!("self_attn.{p}"), &format!("self_attn.{p}"), h, h)
                    };
                    EncoderLayer {
                        norm1: at.norm("layer_norm1", "layer_norm1", h),
                        qkv: Qkv::Separate([proj("q_proj"), proj("k_proj"), proj("v_proj")]),
                        out_proj: proj("out_proj"),
                        norm2: at.norm("layer_norm2", "layer_norm2", h),
                        fc1: at.linear("mlp.fc1", "mlp.fc1", n, h),
                        fc2: at.linear("mlp.fc2", "mlp.fc2", h, n),
                    }
                }
                TextEncoderKind::OpenClip => {
                    let c = format!("transformer.resblocks.{l}");
                    let at = top.sub(&c, &d);
                    let stacked = |kind: &str, shape: Vec<usize>| Param {
                        canonical: format!("{pre}{c}.attn.in_proj_{kind}"),
                        shape,
                        diffusers: ["q_proj", "k_proj", "v_proj"]
                            .iter()
                            .map(|x| format!("text_model.{d}.self_attn.{x}.{kind}"))
                            .collect(),
                        op: Op::Concat,
                    };
                    EncoderLayer {
                        norm1: at.norm("ln_1", "layer_norm1", h),
                        qkv: Qkv::Stacked {
                            weight: stacked("weight", vec![3 * h, h]),
                            bias: stacked("bias", vec![3 * h]),
                        },
                        out_proj: at.linear("attn.out_proj", "self_attn.out_proj", h, h),
                        norm2: at.norm("ln_2", "layer_norm2", h),
                        fc1: at.linear("mlp.c_fc", "mlp.fc1", n, h),
                        fc2: at.linear("mlp.c_proj", "mlp.fc2", h, n),
                    }
                }
            }
        });
        // Canonical names of the embeddings and the final norm; diffusers' are HF's.
        let (token, position, final_norm) = match t.kind {
            TextEncoderKind::HfClip => (
                "embeddings.token_embedding.weight",
                "embeddings.position_embedding.weight",
                "final_layer_norm",
            ),
            TextEncoderKind::OpenClip => {
                ("token_embedding.weight", "positional_embedding", "ln_final")
            }
        };
        TextEncoder {
            token_embedding: tensor(
                token,
                "embeddings.token_embedding.weight",
                vec![t.vocab_size, h],
            ),
            position_embedding: tensor(
                position,
                "embeddings.position_embedding.weight",
                vec![t.max_positions, h],
            ),
            layers: layers.collect(),
            final_norm: top.norm(final_norm, "final_layer_norm", h),
            projection,
        }
    }

    /// Every parameter, in module order.
    pub fn params(&self) -> Vec<Param> {
        let mut out = vec![
            self.token_embedding.clone(),
            self.position_embedding.clone(),
        ];
        for l in &self.layers {
            l.norm1.params(&mut out);
            match &l.qkv {
                Qkv::Separate(layers) => super::params_of(layers, &mut out),
                Qkv::Stacked { weight, bias } => out.extend([weight.clone(), bias.clone()]),
            }
            super::params_of([&l.out_proj, &l.norm2, &l.fc1, &l.fc2], &mut out);
        }
        self.final_norm.params(&mut out);
        out.extend(self.projection.clone());
        out
    }
}

/// Where a text encoder's projection lives in the single-file naming (whether or not
/// the config uses it).
pub fn projection_name(te: &TextEncoderConfig) -> String {
    match te.kind {
        TextEncoderKind::OpenClip => format!("{}text_projection", te.prefix),
        TextEncoderKind::HfClip => {
            let parent = te.prefix.strip_suffix("text_model.").unwrap_or(&te.prefix);
            format!("{parent}text_projection.weight")
        }
    }
}

/// The index of the transformer layer canonical tensor `name` belongs to, if it is
/// one of `te`'s layers (any index, also past `te.num_layers`).
pub fn layer_index(te: &TextEncoderConfig, name: &str) -> Option<usize> {
    let blocks = match te.kind {
        TextEncoderKind::HfClip => "encoder.layers.",
        TextEncoderKind::OpenClip => "transformer.resblocks.",
    };
    name.strip_prefix(te.prefix.as_str())?
        .strip_prefix(blocks)?
        .split('.')
        .next()?
        .parse()
        .ok()
}
