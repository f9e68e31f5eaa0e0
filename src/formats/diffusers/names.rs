//! The correspondence between diffusers tensor names and canonical (original
//! single-file) names. It is generated from a [`ModelConfig`](crate::config::ModelConfig)
//! part rather than pattern-matched, so block indices follow the real block structure
//! (distilled UNets with fewer ResNets, no middle block, or per-layer transformer
//! depths map like the published ones), and the same plan serves reading and writing.
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::config::{TextEncoderConfig, TextEncoderKind, UnetConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::formats::source::{SourceTensor, TensorData};

/// How the diffusers tensors of an [`Entry`] become the canonical one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Same,
    /// A diffusers linear weight [C, C] that the single file stores as a 1x1
    /// convolution [C, C, 1, 1] (VAE mid-block attention): same bytes, new shape.
    Conv1x1,
    /// Diffusers tensors stacked along axis 0 (OpenCLIP `in_proj` from q, k, v).
    Concat,
    /// The canonical 2-D tensor is the transpose of the diffusers one (OpenCLIP
    /// `text_projection` is applied as `x @ P`, a linear layer as `x @ W^T`).
    Transpose,
}

/// One canonical tensor and the diffusers tensor(s) it is made of.
#[derive(Clone, Debug)]
pub struct Entry {
    pub canonical: String,
    /// Canonical shape, PyTorch order.
    pub shape: Vec<usize>,
    pub diffusers: Vec<String>,
    pub op: Op,
}

impl Entry {
    /// The shape of each diffusers tensor of this entry.
    pub fn part_shape(&self) -> Vec<usize> {
        match self.op {
            Op::Same => self.shape.clone(),
            Op::Conv1x1 => self.shape.iter().take(2).copied().collect(),
            Op::Concat => {
                let mut s = self.shape.clone();
                if let Some(first) = s.first_mut() {
                    *first /= self.diffusers.len().max(1);
                }
                s
            }
            Op::Transpose => self.shape.iter().rev().copied().collect(),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Default)]
struct Plan(Vec<Entry>);

impl Plan {
    fn add(&mut self, d: String, c: String, shape: Vec<usize>, op: Op) {
        self.0.push(Entry {
            canonical: c,
            shape,
            diffusers: vec![d],
            op,
        });
    }
    /// `d.suffix` ↔ `c.suffix`, unchanged.
    fn param(&mut self, d: &str, c: &str, suffix: &str, shape: Vec<usize>) {
        self.add(
            format!("{d}.{suffix}"),
            format!("{c}.{suffix}"),
            shape,
            Op::Same,
        );
    }
    fn norm(&mut self, d: &str, c: &str, ch: usize) {
        self.param(d, c, "weight", vec![ch]);
        self.param(d, c, "bias", vec![ch]);
    }
    fn linear(&mut self, d: &str, c: &str, out: usize, inp: usize, bias: bool) {
        self.param(d, c, "weight", vec![out, inp]);
        if bias {
            self.param(d, c, "bias", vec![out]);
        }
    }
    fn conv(&mut self, d: &str, c: &str, out: usize, inp: usize, k: usize) {
        self.param(d, c, "weight", vec![out, inp, k, k]);
        self.param(d, c, "bias", vec![out]);
    }
}

use crate::formats::layout::{UNET_PREFIX as UNET, VAE_PREFIX as VAE};

fn unet_resnet(p: &mut Plan, d: &str, c: &str, inp: usize, out: usize, temb: usize) {
    p.norm(&format!("{d}.norm1"), &format!("{c}.in_layers.0"), inp);
    p.conv(
        &format!("{d}.conv1"),
        &format!("{c}.in_layers.2"),
        out,
        inp,
        3,
    );
    p.linear(
        &format!("{d}.time_emb_proj"),
        &format!("{c}.emb_layers.1"),
        out,
        temb,
        true,
    );
    p.norm(&format!("{d}.norm2"), &format!("{c}.out_layers.0"), out);
    p.conv(
        &format!("{d}.conv2"),
        &format!("{c}.out_layers.3"),
        out,
        out,
        3,
    );
    if inp != out {
        p.conv(
            &format!("{d}.conv_shortcut"),
            &format!("{c}.skip_connection"),
            out,
            inp,
            1,
        );
    }
}

/// A spatial transformer: diffusers `Transformer2DModel` and LDM `SpatialTransformer`
/// share every name below the block prefix.
fn unet_transformer(p: &mut Plan, d: &str, c: &str, ch: usize, depth: usize, u: &UnetConfig) {
    let both = |s: &str| (format!("{d}.{s}"), format!("{c}.{s}"));
    let (dn, cn) = both("norm");
    p.norm(&dn, &cn, ch);
    for proj in ["proj_in", "proj_out"] {
        let (dp, cp) = both(proj);
        if u.linear_proj {
            p.linear(&dp, &cp, ch, ch, true);
        } else {
            p.conv(&dp, &cp, ch, ch, 1);
        }
    }
    for b in 0..depth {
        let (db, cb) = both(&format!("transformer_blocks.{b}"));
        for (attn, kv) in [("attn1", ch), ("attn2", u.context_dim)] {
            let sub = |s: &str| (format!("{db}.{attn}.{s}"), format!("{cb}.{attn}.{s}"));
            for (s, inp) in [("to_q", ch), ("to_k", kv), ("to_v", kv)] {
                let (x, y) = sub(s);
                p.linear(&x, &y, ch, inp, false);
            }
            let (x, y) = sub("to_out.0");
            p.linear(&x, &y, ch, ch, true);
        }
        p.linear(
            &format!("{db}.ff.net.0.proj"),
            &format!("{cb}.ff.net.0.proj"),
            ch * 8,
            ch,
            true,
        );
        p.linear(
            &format!("{db}.ff.net.2"),
            &format!("{cb}.ff.net.2"),
            ch,
            ch * 4,
            true,
        );
        for n in ["norm1", "norm2", "norm3"] {
            p.norm(&format!("{db}.{n}"), &format!("{cb}.{n}"), ch);
        }
    }
}

/// The UNet's names. Fails only for configurations that have no consistent block
/// structure (more up-path ResNets than skip connections, an empty up level).
pub fn unet(u: &UnetConfig) -> Result<Vec<Entry>> {
    unet_plan(u).map_err(Error::Invalid)
}

fn unet_plan(u: &UnetConfig) -> std::result::Result<Vec<Entry>, String> {
    let levels = u.channel_mult.len();
    if levels == 0 || u.down_blocks.len() != levels || u.up_blocks.len() != levels {
        return Err(format!(
            "the UNet has {} channel multipliers, {} down levels and {} up levels; they must agree",
            levels,
            u.down_blocks.len(),
            u.up_blocks.len()
        ));
    }
    let mut p = Plan::default();
    let mc = u.model_channels;
    let temb = u.time_embed_dim();
    let c = |s: &str| format!("{UNET}{s}");
    p.linear(
        "time_embedding.linear_1",
        &c("time_embed.0"),
        temb,
        mc,
        true,
    );
    p.linear(
        "time_embedding.linear_2",
        &c("time_embed.2"),
        temb,
        temb,
        true,
    );
    if let Some(d) = u.time_cond_proj_dim {
        p.linear(
            "time_embedding.cond_proj",
            &c("time_embed.cond_proj"),
            mc,
            d,
            false,
        );
    }
    if let Some(a) = u.adm_in_channels {
        p.linear("add_embedding.linear_1", &c("label_emb.0.0"), temb, a, true);
        p.linear(
            "add_embedding.linear_2",
            &c("label_emb.0.2"),
            temb,
            temb,
            true,
        );
    }
    p.conv("conv_in", &c("input_blocks.0.0"), mc, u.in_channels, 3);

    // LDM numbers its blocks sequentially along the whole path and wires the up path
    // from a stack of skip connections; diffusers numbers within levels.
    let mut skips = vec![mc];
    let mut ch = mc;
    let mut idx = 1;
    for (l, depths) in u.down_blocks.iter().enumerate() {
        let out = mc * u.channel_mult[l];
        for (i, &depth) in depths.iter().enumerate() {
            unet_resnet(
                &mut p,
                &format!("down_blocks.{l}.resnets.{i}"),
                &c(&format!("input_blocks.{idx}.0")),
                ch,
                out,
                temb,
            );
            ch = out;
            if depth > 0 {
                unet_transformer(
                    &mut p,
                    &format!("down_blocks.{l}.attentions.{i}"),
                    &c(&format!("input_blocks.{idx}.1")),
                    ch,
                    depth,
                    u,
                );
            }
            skips.push(ch);
            idx += 1;
        }
        if l + 1 < levels {
            p.conv(
                &format!("down_blocks.{l}.downsamplers.0.conv"),
                &c(&format!("input_blocks.{idx}.0.op")),
                ch,
                ch,
                3,
            );
            skips.push(ch);
            idx += 1;
        }
    }
    match u.mid_depth {
        None => {}
        // diffusers' attention-free `UNetMidBlock2D` inside a conditional UNet holds a single ResNet.
        Some(0) => unet_resnet(
            &mut p,
            "mid_block.resnets.0",
            &c("middle_block.0"),
            ch,
            ch,
            temb,
        ),
        Some(depth) => {
            unet_resnet(
                &mut p,
                "mid_block.resnets.0",
                &c("middle_block.0"),
                ch,
                ch,
                temb,
            );
            unet_transformer(
                &mut p,
                "mid_block.attentions.0",
                &c("middle_block.1"),
                ch,
                depth,
                u,
            );
            unet_resnet(
                &mut p,
                "mid_block.resnets.1",
                &c("middle_block.2"),
                ch,
                ch,
                temb,
            );
        }
    }
    let mut idx = 0;
    for (j, depths) in u.up_blocks.iter().enumerate() {
        let out = mc * u.channel_mult[levels - 1 - j];
        if depths.is_empty() {
            return Err(format!("up level {j} has no ResNets"));
        }
        for (i, &depth) in depths.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                format!("up level {j} has more ResNets than the down path has skip connections")
            })?;
            unet_resnet(
                &mut p,
                &format!("up_blocks.{j}.resnets.{i}"),
                &c(&format!("output_blocks.{idx}.0")),
                ch + skip,
                out,
                temb,
            );
            ch = out;
            let mut next = 1;
            if depth > 0 {
                unet_transformer(
                    &mut p,
                    &format!("up_blocks.{j}.attentions.{i}"),
                    &c(&format!("output_blocks.{idx}.1")),
                    ch,
                    depth,
                    u,
                );
                next = 2;
            }
            if i + 1 == depths.len() && j + 1 < levels {
                p.conv(
                    &format!("up_blocks.{j}.upsamplers.0.conv"),
                    &c(&format!("output_blocks.{idx}.{next}.conv")),
                    ch,
                    ch,
                    3,
                );
            }
            idx += 1;
        }
    }
    p.norm("conv_norm_out", &c("out.0"), ch);
    p.conv("conv_out", &c("out.2"), u.out_channels, ch, 3);
    Ok(p.0)
}

fn vae_resnet(p: &mut Plan, d: &str, c: &str, inp: usize, out: usize) {
    p.norm(&format!("{d}.norm1"), &format!("{c}.norm1"), inp);
    p.conv(&format!("{d}.conv1"), &format!("{c}.conv1"), out, inp, 3);
    p.norm(&format!("{d}.norm2"), &format!("{c}.norm2"), out);
    p.conv(&format!("{d}.conv2"), &format!("{c}.conv2"), out, out, 3);
    if inp != out {
        p.conv(
            &format!("{d}.conv_shortcut"),
            &format!("{c}.nin_shortcut"),
            out,
            inp,
            1,
        );
    }
}

fn vae_mid(p: &mut Plan, side: &str, ch: usize) {
    let d = format!("{side}.mid_block");
    let c = format!("{VAE}{side}.mid");
    vae_resnet(
        p,
        &format!("{d}.resnets.0"),
        &format!("{c}.block_1"),
        ch,
        ch,
    );
    let (da, ca) = (format!("{d}.attentions.0"), format!("{c}.attn_1"));
    p.norm(&format!("{da}.group_norm"), &format!("{ca}.norm"), ch);
    for (x, y) in [
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
    ] {
        p.add(
            format!("{da}.{x}.weight"),
            format!("{ca}.{y}.weight"),
            vec![ch, ch, 1, 1],
            Op::Conv1x1,
        );
        p.add(
            format!("{da}.{x}.bias"),
            format!("{ca}.{y}.bias"),
            vec![ch],
            Op::Same,
        );
    }
    vae_resnet(
        p,
        &format!("{d}.resnets.1"),
        &format!("{c}.block_2"),
        ch,
        ch,
    );
}

/// The VAE's names.
pub fn vae(v: &VaeConfig) -> Vec<Entry> {
    let mut p = Plan::default();
    let c = |s: &str| format!("{VAE}{s}");
    let levels = v.channel_mult.len();
    let z = v.latent_channels;
    let width = |l: usize| v.base_channels * v.channel_mult[l];

    p.conv(
        "encoder.conv_in",
        &c("encoder.conv_in"),
        v.base_channels,
        v.in_channels,
        3,
    );
    let mut ch = v.base_channels;
    for l in 0..levels {
        for i in 0..v.num_res_blocks {
            vae_resnet(
                &mut p,
                &format!("encoder.down_blocks.{l}.resnets.{i}"),
                &c(&format!("encoder.down.{l}.block.{i}")),
                ch,
                width(l),
            );
            ch = width(l);
        }
        if l + 1 < levels {
            p.conv(
                &format!("encoder.down_blocks.{l}.downsamplers.0.conv"),
                &c(&format!("encoder.down.{l}.downsample.conv")),
                ch,
                ch,
                3,
            );
        }
    }
    vae_mid(&mut p, "encoder", ch);
    p.norm("encoder.conv_norm_out", &c("encoder.norm_out"), ch);
    p.conv("encoder.conv_out", &c("encoder.conv_out"), 2 * z, ch, 3);
    p.conv("quant_conv", &c("quant_conv"), 2 * z, 2 * z, 1);
    p.conv("post_quant_conv", &c("post_quant_conv"), z, z, 1);

    p.conv("decoder.conv_in", &c("decoder.conv_in"), ch, z, 3);
    vae_mid(&mut p, "decoder", ch);
    // LDM numbers decoder levels by resolution (0 = full size), diffusers in run order.
    for j in 0..levels {
        let l = levels - 1 - j;
        for i in 0..=v.num_res_blocks {
            vae_resnet(
                &mut p,
                &format!("decoder.up_blocks.{j}.resnets.{i}"),
                &c(&format!("decoder.up.{l}.block.{i}")),
                ch,
                width(l),
            );
            ch = width(l);
        }
        if l > 0 {
            p.conv(
                &format!("decoder.up_blocks.{j}.upsamplers.0.conv"),
                &c(&format!("decoder.up.{l}.upsample.conv")),
                ch,
                ch,
                3,
            );
        }
    }
    p.norm("decoder.conv_norm_out", &c("decoder.norm_out"), ch);
    p.conv(
        "decoder.conv_out",
        &c("decoder.conv_out"),
        v.in_channels,
        ch,
        3,
    );
    p.0
}

/// A text encoder's names: diffusers always uses HF CLIP naming, the canonical side
/// follows `t.kind` under `t.prefix`.
pub fn text(t: &TextEncoderConfig) -> Vec<Entry> {
    let mut p = Plan::default();
    let (h, n, pre) = (t.hidden_size, t.intermediate_size, t.prefix.as_str());
    match t.kind {
        TextEncoderKind::HfClip => {
            // The canonical HF names are the diffusers names below `text_model.`.
            let both = |s: &str| (format!("text_model.{s}"), format!("{pre}{s}"));
            let (d, c) = both("embeddings.token_embedding");
            p.param(&d, &c, "weight", vec![t.vocab_size, h]);
            let (d, c) = both("embeddings.position_embedding");
            p.param(&d, &c, "weight", vec![t.max_positions, h]);
            for l in 0..t.num_layers {
                let (d, c) = both(&format!("encoder.layers.{l}"));
                p.norm(&format!("{d}.layer_norm1"), &format!("{c}.layer_norm1"), h);
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    p.linear(
                        &format!("{d}.self_attn.{proj}"),
                        &format!("{c}.self_attn.{proj}"),
                        h,
                        h,
                        true,
                    );
                }
                p.norm(&format!("{d}.layer_norm2"), &format!("{c}.layer_norm2"), h);
                p.linear(&format!("{d}.mlp.fc1"), &format!("{c}.mlp.fc1"), n, h, true);
                p.linear(&format!("{d}.mlp.fc2"), &format!("{c}.mlp.fc2"), h, n, true);
            }
            let (d, c) = both("final_layer_norm");
            p.norm(&d, &c, h);
            if let Some(proj) = t.projection_dim {
                // HF keeps the projection beside `text_model`, not inside it.
                let outer = pre.strip_suffix("text_model.").unwrap_or(pre);
                p.add(
                    "text_projection.weight".into(),
                    format!("{outer}text_projection.weight"),
                    vec![proj, h],
                    Op::Same,
                );
            }
        }
        TextEncoderKind::OpenClip => {
            p.add(
                "text_model.embeddings.token_embedding.weight".into(),
                format!("{pre}token_embedding.weight"),
                vec![t.vocab_size, h],
                Op::Same,
            );
            p.add(
                "text_model.embeddings.position_embedding.weight".into(),
                format!("{pre}positional_embedding"),
                vec![t.max_positions, h],
                Op::Same,
            );
            for l in 0..t.num_layers {
                let d = format!("text_model.encoder.layers.{l}");
                let c = format!("{pre}transformer.resblocks.{l}");
                p.norm(&format!("{d}.layer_norm1"), &format!("{c}.ln_1"), h);
                for (kind, shape) in [("weight", vec![3 * h, h]), ("bias", vec![3 * h])] {
                    p.0.push(Entry {
                        canonical: format!("{c}.attn.in_proj_{kind}"),
                        shape,
                        diffusers: ["q_proj", "k_proj", "v_proj"]
                            .iter()
                            .map(|x| format!("{d}.self_attn.{x}.{kind}"))
                            .collect(),
                        op: Op::Concat,
                    });
                }
                p.linear(
                    &format!("{d}.self_attn.out_proj"),
                    &format!("{c}.attn.out_proj"),
                    h,
                    h,
                    true,
                );
                p.norm(&format!("{d}.layer_norm2"), &format!("{c}.ln_2"), h);
                p.linear(
                    &format!("{d}.mlp.fc1"),
                    &format!("{c}.mlp.c_fc"),
                    n,
                    h,
                    true,
                );
                p.linear(
                    &format!("{d}.mlp.fc2"),
                    &format!("{c}.mlp.c_proj"),
                    h,
                    n,
                    true,
                );
            }
            p.norm("text_model.final_layer_norm", &format!("{pre}ln_final"), h);
            if let Some(proj) = t.projection_dim {
                p.add(
                    "text_projection.weight".into(),
                    format!("{pre}text_projection"),
                    vec![h, proj],
                    Op::Transpose,
                );
            }
        }
    }
    p.0
}

/// Renames the tensors of one diffusers component into canonical tensors following
/// `plan`. `file` names the weights in errors. Every plan entry must be present with
/// the shape the config implies, and every tensor must be used, except those
/// `ignorable` accepts (buffers such as `position_ids`).
pub(crate) fn to_canonical(
    plan: &[Entry],
    tensors: Vec<SourceTensor>,
    file: &Path,
    ignorable: impl Fn(&str) -> bool,
) -> Result<Vec<SourceTensor>> {
    let mut by_name: BTreeMap<String, SourceTensor> = BTreeMap::new();
    for t in tensors {
        if ignorable(&t.name) {
            continue;
        }
        if by_name.contains_key(&t.name) {
            return Err(Error::format(
                file,
                format!("tensor `{}` is stored twice", t.name),
            ));
        }
        by_name.insert(t.name.clone(), t);
    }
    let mut out = Vec::with_capacity(plan.len());
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    for e in plan {
        if !seen.insert(e.canonical.as_str()) {
            return Err(Error::Invalid(format!(
                "name plan maps two tensors to `{}`",
                e.canonical
            )));
        }
        let want = e.part_shape();
        let mut parts = Vec::with_capacity(e.diffusers.len());
        for d in &e.diffusers {
            match by_name.remove(d) {
                None => missing.push(d.clone()),
                Some(t) if t.shape != want => {
                    return Err(Error::format(
                        file,
                        format!(
                        "tensor `{d}` has shape {:?} but the component's config.json implies {:?}",
                        t.shape, want
                    ),
                    ))
                }
                Some(t) => parts.push(t),
            }
        }
        if parts.len() != e.diffusers.len() {
            continue;
        }
        let dtype = parts[0].dtype;
        if let Some(odd) = parts.iter().find(|t| t.dtype != dtype) {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{}` is {} while `{}` is {}",
                    odd.name,
                    odd.dtype.name(),
                    parts[0].name,
                    dtype.name()
                ),
            ));
        }
        let data = match e.op {
            Op::Same | Op::Conv1x1 => parts.remove(0).data,
            Op::Concat => TensorData::Concat(parts),
            Op::Transpose => TensorData::Transpose(Box::new(parts.remove(0))),
        };
        out.push(SourceTensor {
            name: e.canonical.clone(),
            shape: e.shape.clone(),
            dtype,
            data,
        });
    }
    if !by_name.is_empty() {
        let names: Vec<&str> = by_name.keys().take(5).map(String::as_str).collect();
        return Err(Error::format(
            file,
            format!(
                "{} tensor(s) that the component's config.json does not account for (unknown names or a config that does not match the weights): {}{}",
                by_name.len(),
                names.join(", "),
                if by_name.len() > names.len() { ", …" } else { "" }
            ),
        ));
    }
    if !missing.is_empty() {
        let n = missing.len();
        missing.truncate(5);
        return Err(Error::format(
            file,
            format!(
                "{n} tensor(s) that the component's config.json requires are missing: {}{}",
                missing.join(", "),
                if n > 5 { ", …" } else { "" }
            ),
        ));
    }
    Ok(out)
}
