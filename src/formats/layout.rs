//! The single-file checkpoint layout of an architecture: every tensor name and
//! shape (PyTorch order, outermost first) that a [`ModelConfig`] implies, under
//! the canonical naming of the original LDM/SGM single-file checkpoints.
//!
//! Naming choices where no published single-file name exists:
//! - LCM guidance embedding (`UnetConfig::time_cond_proj_dim`): diffusers'
//!   `time_embedding.cond_proj.weight` (a bias-free linear from the guidance
//!   embedding to the sinusoidal timestep features, `[model_channels, dim]`)
//!   becomes `model.diffusion_model.time_embed.cond_proj.weight`, beside the
//!   `time_embed.0`/`time_embed.2` layers it feeds.
//! - `mid_depth: Some(0)` (middle block without attention): one ResBlock,
//!   `middle_block.0`, as diffusers' `UNet2DConditionModel` builds its attention-free
//!   `UNetMidBlock2D` (`num_layers=0`).
//! - A Hugging Face CLIP text tower with `projection_dim` (`CLIPTextModelWithProjection`)
//!   keeps its projection beside `text_model`: `<prefix without "text_model.">text_projection.weight`,
//!   `[projection_dim, hidden]` (a linear weight), as the SD3/Flux single files do.
use std::collections::{BTreeMap, BTreeSet};

use crate::config::{ModelConfig, TextEncoderConfig, TextEncoderKind, UnetConfig, VaeConfig};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";

/// One tensor of a layout.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Every tensor of `cfg`'s UNet, VAE and text encoders, in module order.
pub fn layout(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut out = Specs(Vec::new());
    unet(&mut out, &cfg.unet);
    vae(&mut out, &cfg.vae);
    for te in &cfg.text_encoders {
        text_encoder(&mut out, te);
    }
    out.0
}

/// Why a tensor that real checkpoints carry is not part of any architecture
/// (buffers and training state a converter drops); `None` for everything else.
pub fn extra_reason(name: &str) -> Option<&'static str> {
    const DDPM_BUFFERS: &[&str] = &[
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    ];
    if DDPM_BUFFERS.contains(&name) {
        Some("LDM DDPM noise-schedule buffer; samplers derive their own schedule")
    } else if name == "denoiser.sigmas" {
        Some("SGM denoiser noise-schedule buffer; samplers derive their own schedule")
    } else if name.starts_with("model_ema.") {
        Some("EMA copy of the UNet weights (training state)")
    } else if name.starts_with("first_stage_model.loss.") {
        Some("VAE training loss (LPIPS/discriminator) weights")
    } else if name.ends_with(".position_ids") {
        Some("CLIP position_ids buffer (0..n); positions are implicit")
    } else if name.ends_with(".logit_scale") {
        Some("OpenCLIP contrastive logit scale; unused for text conditioning")
    } else if name.ends_with(".attn_mask") {
        Some("causal attention mask buffer; rebuilt at run time")
    } else {
        None
    }
}

/// Why an architecture tensor of a bigger network is not used by `cfg` (a text
/// tower trimmed to the layers the conditioning reads, a projection it never
/// applies); `None` when `cfg` uses `name` or does not know it.
///
/// SD 2.x files carry the whole OpenCLIP ViT-H tower: 24 blocks and
/// `text_projection`, while SD 2 reads the penultimate block's output, so its
/// configuration has 23 blocks and no projection and the rest is reported here.
pub fn unused_by(cfg: &ModelConfig, name: &str) -> Option<&'static str> {
    for te in &cfg.text_encoders {
        if te.projection_dim.is_none() && name == projection_name(te) {
            return Some("text projection, unused: the conditioning reads hidden states only");
        }
        let Some(rest) = name.strip_prefix(te.prefix.as_str()) else {
            continue;
        };
        let blocks = match te.kind {
            TextEncoderKind::HfClip => "encoder.layers.",
            TextEncoderKind::OpenClip => "transformer.resblocks.",
        };
        let index = rest
            .strip_prefix(blocks)
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        if index.is_some_and(|i| i >= te.num_layers) {
            return Some("text encoder layer after the one the conditioning reads");
        }
    }
    None
}

/// How the tensors of a checkpoint differ from `cfg`'s layout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayoutDiff {
    /// Layout tensors the checkpoint lacks.
    pub missing: Vec<String>,
    /// Checkpoint tensors that are neither in the layout, nor [`extra_reason`]s,
    /// nor [`unused_by`] `cfg`.
    pub unexpected: Vec<String>,
    /// Tensors of both whose shapes differ: name, layout shape, checkpoint shape.
    pub wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// ResNet 1x1 shortcuts (`skip_connection`, `nin_shortcut`) present in only one
    /// of the two. A ResNet has one exactly when it changes width, so this is a
    /// width difference like `wrong_shape`, not a different block structure.
    pub shortcuts: Vec<String>,
}

impl LayoutDiff {
    /// Whether every layout tensor is present, nothing unknown is, and shapes agree.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.wrong_shape.is_empty()
            && self.shortcuts.is_empty()
    }
}

/// Compares a checkpoint's tensors (names and shapes) with `cfg`'s layout.
pub fn compare(cfg: &ModelConfig, tensors: &[(&str, &[usize])]) -> LayoutDiff {
    let expected: BTreeMap<String, Vec<usize>> =
        layout(cfg).into_iter().map(|t| (t.name, t.shape)).collect();
    let present: BTreeSet<&str> = tensors.iter().map(|(n, _)| *n).collect();
    let mut diff = LayoutDiff::default();
    for (name, shape) in tensors {
        match expected.get(*name) {
            Some(want) if want.as_slice() != *shape => {
                diff.wrong_shape
                    .push((name.to_string(), want.clone(), shape.to_vec()))
            }
            Some(_) => {}
            None if extra_reason(name).is_some() || unused_by(cfg, name).is_some() => {}
            None => diff.unexpected.push(name.to_string()),
        }
    }
    diff.missing = expected
        .keys()
        .filter(|n| !present.contains(n.as_str()))
        .cloned()
        .collect();
    diff.unexpected.sort();
    diff.unexpected.dedup();
    let is_shortcut = |n: &String| n.contains(".skip_connection.") || n.contains(".nin_shortcut.");
    diff.shortcuts = diff
        .missing
        .iter()
        .chain(&diff.unexpected)
        .filter(|n| is_shortcut(n))
        .cloned()
        .collect();
    diff.shortcuts.sort();
    diff.missing.retain(|n| !is_shortcut(n));
    diff.unexpected.retain(|n| !is_shortcut(n));
    diff
}

/// Where a text encoder's projection lives in the single-file naming.
pub fn projection_name(te: &TextEncoderConfig) -> String {
    match te.kind {
        TextEncoderKind::OpenClip => format!("{}text_projection", te.prefix),
        // The projection of CLIPTextModelWithProjection is a sibling of `text_model`.
        TextEncoderKind::HfClip => {
            let parent = te.prefix.strip_suffix("text_model.").unwrap_or(&te.prefix);
            format!("{parent}text_projection.weight")
        }
    }
}

struct Specs(Vec<TensorSpec>);

impl Specs {
    fn push(&mut self, name: String, shape: &[usize]) {
        self.0.push(TensorSpec {
            name,
            shape: shape.to_vec(),
        });
    }
    fn weight_bias(&mut self, p: &str, weight: &[usize], bias: usize) {
        self.push(format!("{p}.weight"), weight);
        self.push(format!("{p}.bias"), &[bias]);
    }
    fn linear(&mut self, p: &str, out: usize, inp: usize) {
        self.weight_bias(p, &[out, inp], out);
    }
    fn conv(&mut self, p: &str, out: usize, inp: usize, kernel: usize) {
        self.weight_bias(p, &[out, inp, kernel, kernel], out);
    }
    fn norm(&mut self, p: &str, c: usize) {
        self.weight_bias(p, &[c], c);
    }
}

fn unet(o: &mut Specs, u: &UnetConfig) {
    let p = UNET_PREFIX;
    let mc = u.model_channels;
    let emb = u.time_embed_dim();
    if let Some(d) = u.time_cond_proj_dim {
        o.push(format!("{p}time_embed.cond_proj.weight"), &[mc, d]);
    }
    o.linear(&format!("{p}time_embed.0"), emb, mc);
    o.linear(&format!("{p}time_embed.2"), emb, emb);
    if let Some(adm) = u.adm_in_channels {
        o.linear(&format!("{p}label_emb.0.0"), emb, adm);
        o.linear(&format!("{p}label_emb.0.2"), emb, emb);
    }

    o.conv(&format!("{p}input_blocks.0.0"), mc, u.in_channels, 3);
    // Widths of the encoder outputs the decoder concatenates, in push order.
    let mut skips = vec![mc];
    let mut ch = mc;
    let mut n = 1;
    let levels = u.channel_mult.len().min(u.down_blocks.len());
    for (level, (mult, blocks)) in u.channel_mult.iter().zip(&u.down_blocks).enumerate() {
        let width = mc * mult;
        for &depth in blocks {
            res_block(o, &format!("{p}input_blocks.{n}.0"), ch, width, emb);
            ch = width;
            if depth > 0 {
                spatial_transformer(o, &format!("{p}input_blocks.{n}.1"), ch, depth, u);
            }
            skips.push(ch);
            n += 1;
        }
        if level + 1 < levels {
            o.conv(&format!("{p}input_blocks.{n}.0.op"), ch, ch, 3);
            skips.push(ch);
            n += 1;
        }
    }

    match u.mid_depth {
        None => {}
        Some(0) => res_block(o, &format!("{p}middle_block.0"), ch, ch, emb),
        Some(depth) => {
            res_block(o, &format!("{p}middle_block.0"), ch, ch, emb);
            spatial_transformer(o, &format!("{p}middle_block.1"), ch, depth, u);
            res_block(o, &format!("{p}middle_block.2"), ch, ch, emb);
        }
    }

    let mut n = 0;
    let levels = u.channel_mult.len().min(u.up_blocks.len());
    for (i, (mult, blocks)) in u.channel_mult.iter().rev().zip(&u.up_blocks).enumerate() {
        let width = mc * mult;
        for (j, &depth) in blocks.iter().enumerate() {
            // A config with more decoder ResNets than skips is inconsistent; the
            // zero width it gets here matches no checkpoint.
            let skip = skips.pop().unwrap_or(0);
            res_block(o, &format!("{p}output_blocks.{n}.0"), ch + skip, width, emb);
            ch = width;
            let mut k = 1;
            if depth > 0 {
                spatial_transformer(o, &format!("{p}output_blocks.{n}.1"), ch, depth, u);
                k = 2;
            }
            if j + 1 == blocks.len() && i + 1 < levels {
                o.conv(&format!("{p}output_blocks.{n}.{k}.conv"), ch, ch, 3);
            }
            n += 1;
        }
    }

    o.norm(&format!("{p}out.0"), ch);
    o.conv(&format!("{p}out.2"), u.out_channels, ch, 3);
}

/// LDM `ResBlock`: GroupNorm, conv, timestep projection, GroupNorm, conv, and a
/// 1x1 conv shortcut when the width changes.
fn res_block(o: &mut Specs, p: &str, cin: usize, cout: usize, emb: usize) {
    o.norm(&format!("{p}.in_layers.0"), cin);
    o.conv(&format!("{p}.in_layers.2"), cout, cin, 3);
    o.linear(&format!("{p}.emb_layers.1"), cout, emb);
    o.norm(&format!("{p}.out_layers.0"), cout);
    o.conv(&format!("{p}.out_layers.3"), cout, cout, 3);
    if cin != cout {
        o.conv(&format!("{p}.skip_connection"), cout, cin, 1);
    }
}

/// LDM `SpatialTransformer` with `depth` `BasicTransformerBlock`s (bias-free q/k/v,
/// GEGLU feed-forward of inner width 4c).
fn spatial_transformer(o: &mut Specs, p: &str, c: usize, depth: usize, u: &UnetConfig) {
    let proj = |o: &mut Specs, name: &str| {
        if u.linear_proj {
            o.linear(&format!("{p}.{name}"), c, c);
        } else {
            o.conv(&format!("{p}.{name}"), c, c, 1);
        }
    };
    o.norm(&format!("{p}.norm"), c);
    proj(o, "proj_in");
    for k in 0..depth {
        let b = format!("{p}.transformer_blocks.{k}");
        for (attn, kv) in [("attn1", c), ("attn2", u.context_dim)] {
            o.push(format!("{b}.{attn}.to_q.weight"), &[c, c]);
            o.push(format!("{b}.{attn}.to_k.weight"), &[c, kv]);
            o.push(format!("{b}.{attn}.to_v.weight"), &[c, kv]);
            o.linear(&format!("{b}.{attn}.to_out.0"), c, c);
        }
        o.linear(&format!("{b}.ff.net.0.proj"), 8 * c, c);
        o.linear(&format!("{b}.ff.net.2"), c, 4 * c);
        for norm in ["norm1", "norm2", "norm3"] {
            o.norm(&format!("{b}.{norm}"), c);
        }
    }
    proj(o, "proj_out");
}

fn vae(o: &mut Specs, v: &VaeConfig) {
    let p = VAE_PREFIX;
    let base = v.base_channels;
    let z = v.latent_channels;
    let levels = v.channel_mult.len();
    let deepest = base * v.channel_mult.last().copied().unwrap_or(1);

    let e = format!("{p}encoder");
    o.conv(&format!("{e}.conv_in"), base, v.in_channels, 3);
    let mut ch = base;
    for (level, mult) in v.channel_mult.iter().enumerate() {
        let width = base * mult;
        for b in 0..v.num_res_blocks {
            vae_res_block(o, &format!("{e}.down.{level}.block.{b}"), ch, width);
            ch = width;
        }
        if level + 1 < levels {
            o.conv(&format!("{e}.down.{level}.downsample.conv"), ch, ch, 3);
        }
    }
    vae_mid(o, &format!("{e}.mid"), ch);
    o.norm(&format!("{e}.norm_out"), ch);
    o.conv(&format!("{e}.conv_out"), 2 * z, ch, 3);

    let d = format!("{p}decoder");
    let mut ch = deepest;
    o.conv(&format!("{d}.conv_in"), ch, z, 3);
    vae_mid(o, &format!("{d}.mid"), ch);
    // Decoder levels are indexed like the encoder's (0 = full resolution) but run deepest first.
    for (level, mult) in v.channel_mult.iter().enumerate().rev() {
        let width = base * mult;
        for b in 0..=v.num_res_blocks {
            vae_res_block(o, &format!("{d}.up.{level}.block.{b}"), ch, width);
            ch = width;
        }
        if level > 0 {
            o.conv(&format!("{d}.up.{level}.upsample.conv"), ch, ch, 3);
        }
    }
    o.norm(&format!("{d}.norm_out"), ch);
    o.conv(&format!("{d}.conv_out"), v.in_channels, ch, 3);

    o.conv(&format!("{p}quant_conv"), 2 * z, 2 * z, 1);
    o.conv(&format!("{p}post_quant_conv"), z, z, 1);
}

fn vae_res_block(o: &mut Specs, p: &str, cin: usize, cout: usize) {
    o.norm(&format!("{p}.norm1"), cin);
    o.conv(&format!("{p}.conv1"), cout, cin, 3);
    o.norm(&format!("{p}.norm2"), cout);
    o.conv(&format!("{p}.conv2"), cout, cout, 3);
    if cin != cout {
        o.conv(&format!("{p}.nin_shortcut"), cout, cin, 1);
    }
}

fn vae_mid(o: &mut Specs, p: &str, c: usize) {
    vae_res_block(o, &format!("{p}.block_1"), c, c);
    let a = format!("{p}.attn_1");
    o.norm(&format!("{a}.norm"), c);
    for proj in ["q", "k", "v", "proj_out"] {
        o.conv(&format!("{a}.{proj}"), c, c, 1);
    }
    vae_res_block(o, &format!("{p}.block_2"), c, c);
}

fn text_encoder(o: &mut Specs, t: &TextEncoderConfig) {
    let p = t.prefix.as_str();
    let h = t.hidden_size;
    let inner = t.intermediate_size;
    match t.kind {
        TextEncoderKind::HfClip => {
            o.push(
                format!("{p}embeddings.token_embedding.weight"),
                &[t.vocab_size, h],
            );
            o.push(
                format!("{p}embeddings.position_embedding.weight"),
                &[t.max_positions, h],
            );
            for l in 0..t.num_layers {
                let b = format!("{p}encoder.layers.{l}");
                o.norm(&format!("{b}.layer_norm1"), h);
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    o.linear(&format!("{b}.self_attn.{proj}"), h, h);
                }
                o.norm(&format!("{b}.layer_norm2"), h);
                o.linear(&format!("{b}.mlp.fc1"), inner, h);
                o.linear(&format!("{b}.mlp.fc2"), h, inner);
            }
            o.norm(&format!("{p}final_layer_norm"), h);
            if let Some(d) = t.projection_dim {
                o.push(projection_name(t), &[d, h]);
            }
        }
        TextEncoderKind::OpenClip => {
            o.push(format!("{p}token_embedding.weight"), &[t.vocab_size, h]);
            o.push(format!("{p}positional_embedding"), &[t.max_positions, h]);
            for l in 0..t.num_layers {
                let b = format!("{p}transformer.resblocks.{l}");
                o.norm(&format!("{b}.ln_1"), h);
                o.push(format!("{b}.attn.in_proj_weight"), &[3 * h, h]);
                o.push(format!("{b}.attn.in_proj_bias"), &[3 * h]);
                o.linear(&format!("{b}.attn.out_proj"), h, h);
                o.norm(&format!("{b}.ln_2"), h);
                o.linear(&format!("{b}.mlp.c_fc"), inner, h);
                o.linear(&format!("{b}.mlp.c_proj"), h, inner);
            }
            o.norm(&format!("{p}ln_final"), h);
            // Applied as `x @ text_projection`, hence [hidden, projection] rather than a linear weight.
            if let Some(d) = t.projection_dim {
                o.push(projection_name(t), &[h, d]);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One entry of `shared/layouts/*.json`.
    #[derive(serde::Deserialize)]
    pub(crate) struct RealTensor {
        pub name: String,
        pub shape: Vec<usize>,
        #[serde(default)]
        pub extra: bool,
    }

    pub(crate) fn real_layout(file: &str) -> Vec<RealTensor> {
        let path = crate::testdata::fixture("layouts").join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn sorted(mut specs: Vec<TensorSpec>) -> Vec<TensorSpec> {
        specs.sort();
        specs
    }

    /// The real file minus its buffers and the tensors `cfg` does not use.
    fn architecture_part(real: &[RealTensor], cfg: &ModelConfig) -> Vec<TensorSpec> {
        sorted(
            real.iter()
                .filter(|t| !t.extra)
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                })
                .collect(),
        )
        .into_iter()
        .filter(|t| unused_by(cfg, &t.name).is_none())
        .collect()
    }

    fn assert_same_layout(cfg: &ModelConfig, file: &str) {
        let real = real_layout(file);
        let want = architecture_part(&real, cfg);
        let got = sorted(layout(cfg));
        let want_set: BTreeSet<_> = want.iter().collect();
        let got_set: BTreeSet<_> = got.iter().collect();
        let missing: Vec<_> = want_set.difference(&got_set).take(10).collect();
        let surplus: Vec<_> = got_set.difference(&want_set).take(10).collect();
        assert!(
            missing.is_empty() && surplus.is_empty(),
            "{file}: layout lacks {missing:#?}\nlayout has in excess {surplus:#?}"
        );
        assert_eq!(got, want, "{file}: duplicate names in the layout");
    }

    #[test]
    fn sd15_layout_matches_real_checkpoint_names_and_shapes() {
        assert_same_layout(&ModelConfig::sd1(), "sd15.json");
    }

    #[test]
    fn sd21_layout_matches_real_checkpoint_names_and_shapes() {
        assert_same_layout(&ModelConfig::sd2(), "sd21.json");
    }

    #[test]
    fn sdxl_layout_matches_real_checkpoint_names_and_shapes() {
        assert_same_layout(&ModelConfig::sdxl(), "sdxl.json");
    }

    #[test]
    fn every_real_buffer_has_a_reason_to_be_dropped() {
        for (cfg, file) in [
            (ModelConfig::sd1(), "sd15.json"),
            (ModelConfig::sd2(), "sd21.json"),
            (ModelConfig::sdxl(), "sdxl.json"),
        ] {
            for t in real_layout(file).iter().filter(|t| t.extra) {
                assert!(
                    extra_reason(&t.name).is_some() || unused_by(&cfg, &t.name).is_some(),
                    "{file}: {} is neither a known buffer nor unused by the architecture",
                    t.name
                );
            }
        }
    }

    #[test]
    fn sd21_last_openclip_block_and_projection_are_unused_by_sd2_not_buffers() {
        let cfg = ModelConfig::sd2();
        let real = real_layout("sd21.json");
        let unused: Vec<&str> = real
            .iter()
            .filter(|t| unused_by(&cfg, &t.name).is_some())
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(unused.len(), 13, "{unused:#?}");
        for name in unused {
            assert!(extra_reason(name).is_none(), "{name}");
            assert!(
                name == "cond_stage_model.model.text_projection"
                    || name.starts_with("cond_stage_model.model.transformer.resblocks.23."),
                "{name}"
            );
        }
        // The same tensors are architecture for a tower that keeps them.
        let mut full = cfg.clone();
        full.text_encoders[0].num_layers = 24;
        full.text_encoders[0].projection_dim = Some(1024);
        assert!(real.iter().all(|t| unused_by(&full, &t.name).is_none()));
    }

    #[test]
    fn architecture_tensors_are_never_taken_for_buffers() {
        for name in ModelConfig::PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            for t in layout(&cfg) {
                assert_eq!(extra_reason(&t.name), None, "{name}: {}", t.name);
                assert_eq!(unused_by(&cfg, &t.name), None, "{name}: {}", t.name);
            }
        }
    }

    fn params(specs: &[TensorSpec], prefix: &str) -> usize {
        specs
            .iter()
            .filter(|t| t.name.starts_with(prefix))
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    #[test]
    fn parameter_counts_match_published_models() {
        let sd1 = layout(&ModelConfig::sd1());
        assert_eq!(params(&sd1, UNET_PREFIX), 859_520_964);
        assert_eq!(params(&sd1, VAE_PREFIX), 83_653_863);
        assert_eq!(params(&sd1, "cond_stage_model."), 123_060_480);
        assert_eq!(
            params(&layout(&ModelConfig::sd2()), UNET_PREFIX),
            865_910_724
        );
        assert_eq!(
            params(&layout(&ModelConfig::sdxl()), UNET_PREFIX),
            2_567_463_684
        );
    }

    #[test]
    fn lcm_guidance_embedding_feeds_the_timestep_features() {
        let mut cfg = ModelConfig::sd1();
        cfg.unet.time_cond_proj_dim = Some(256);
        let specs = layout(&cfg);
        let cond: Vec<_> = specs
            .iter()
            .filter(|t| t.name.contains("cond_proj"))
            .collect();
        assert_eq!(
            cond,
            [&TensorSpec {
                name: "model.diffusion_model.time_embed.cond_proj.weight".into(),
                shape: vec![320, 256]
            }]
        );
        assert_eq!(specs.len(), layout(&ModelConfig::sd1()).len() + 1);
    }

    #[test]
    fn removed_blocks_shift_the_numbering_and_skip_widths() {
        // BK-SDM-style: one ResNet per encoder level, two per decoder level, no middle block.
        let mut cfg = ModelConfig::sd1();
        cfg.unet.down_blocks = vec![vec![1], vec![1], vec![1], vec![0]];
        cfg.unet.up_blocks = vec![vec![0, 0], vec![1, 1], vec![1, 1], vec![1, 1]];
        cfg.unet.mid_depth = None;
        let specs = layout(&cfg);
        let shape = |name: &str| {
            specs
                .iter()
                .find(|t| t.name == format!("{UNET_PREFIX}{name}"))
                .map(|t| t.shape.clone())
        };
        assert_eq!(
            shape("input_blocks.2.0.op.weight"),
            Some(vec![320, 320, 3, 3])
        );
        assert_eq!(
            shape("input_blocks.7.0.in_layers.2.weight"),
            Some(vec![1280, 1280, 3, 3])
        );
        assert_eq!(shape("input_blocks.8.0.in_layers.2.weight"), None);
        assert!(specs.iter().all(|t| !t.name.contains("middle_block")));
        // Decoder: level 1280 takes the deepest ResNet, then the last downsampler's output.
        assert_eq!(
            shape("output_blocks.1.0.skip_connection.weight"),
            Some(vec![1280, 2560, 1, 1])
        );
        assert_eq!(
            shape("output_blocks.1.1.conv.weight"),
            Some(vec![1280, 1280, 3, 3])
        );
        assert_eq!(
            shape("output_blocks.5.0.skip_connection.weight"),
            Some(vec![640, 960, 1, 1])
        );
        assert_eq!(
            shape("output_blocks.7.0.skip_connection.weight"),
            Some(vec![320, 640, 1, 1])
        );
        assert_eq!(shape("output_blocks.8.0.in_layers.2.weight"), None);
    }

    #[test]
    fn middle_block_without_attention_is_one_resnet() {
        let mut cfg = ModelConfig::sdxl().shrink();
        cfg.unet.mid_depth = Some(0);
        let mid: Vec<String> = layout(&cfg)
            .into_iter()
            .filter(|t| t.name.contains("middle_block") && t.name.ends_with("in_layers.2.weight"))
            .map(|t| t.name)
            .collect();
        assert_eq!(
            mid,
            ["model.diffusion_model.middle_block.0.in_layers.2.weight"]
        );
    }

    #[test]
    fn compare_reports_missing_unknown_and_misshapen_tensors() {
        let cfg = ModelConfig::sd1().shrink();
        let specs = layout(&cfg);
        let mut tensors: Vec<(&str, &[usize])> = specs
            .iter()
            .skip(1)
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        let odd = [7usize];
        tensors.push(("model.diffusion_model.something_new.weight", &odd));
        tensors.push(("betas", &[1000]));
        tensors[0].1 = &odd;
        let diff = compare(&cfg, &tensors);
        assert_eq!(diff.missing, [specs[0].name.clone()]);
        assert_eq!(
            diff.unexpected,
            ["model.diffusion_model.something_new.weight"]
        );
        assert_eq!(
            diff.wrong_shape,
            [(specs[1].name.clone(), specs[1].shape.clone(), vec![7])]
        );
        assert!(!diff.is_exact());
        let all: Vec<(&str, &[usize])> = specs
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        assert!(compare(&cfg, &all).is_exact());
        let shortcut = "first_stage_model.encoder.down.0.block.0.nin_shortcut.weight";
        let mut with_shortcut = all.clone();
        with_shortcut.push((shortcut, &odd));
        let diff = compare(&cfg, &with_shortcut);
        assert_eq!(
            (diff.shortcuts, diff.unexpected),
            (vec![shortcut.to_string()], vec![])
        );
    }
}
