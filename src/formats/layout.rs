//! The single-file checkpoint layout of an architecture: every tensor name and
//! shape (PyTorch order, outermost first) that a [`ModelConfig`] implies, under
//! the canonical naming of the original LDM/SGM single-file checkpoints. The
//! structure and the names come from the [`network`](crate::network) plans.
use std::collections::{BTreeMap, BTreeSet};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::network::{self, clip::projection_name, Param};

/// One tensor of a layout.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Every tensor of `cfg`'s UNet, VAE and text encoders, in module order. Fails for a
/// UNet config with no consistent block structure.
pub fn layout(cfg: &ModelConfig) -> Result<Vec<TensorSpec>> {
    Ok(params(cfg)?
        .into_iter()
        .map(|p| TensorSpec {
            name: p.canonical,
            shape: p.shape,
        })
        .collect())
}

/// Every parameter of `cfg`'s networks (with its diffusers names), in module order.
pub fn params(cfg: &ModelConfig) -> Result<Vec<Param>> {
    let mut out = network::unet::Unet::new(&cfg.unet)?.params();
    if let Some(v) = &cfg.vae {
        out.extend(network::vae::Vae::new(v).params());
    }
    for te in &cfg.text_encoders {
        out.extend(network::clip::TextEncoder::new(te).params());
    }
    Ok(out)
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
        if network::clip::layer_index(te, name).is_some_and(|i| i >= te.num_layers) {
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
pub fn compare(cfg: &ModelConfig, tensors: &[(&str, &[usize])]) -> Result<LayoutDiff> {
    let expected: BTreeMap<String, Vec<usize>> = layout(cfg)?
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
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
    Ok(diff)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::network::{UNET_PREFIX, VAE_PREFIX};

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
        let got = sorted(layout(cfg).unwrap());
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
            for t in layout(&cfg).unwrap() {
                assert_eq!(extra_reason(&t.name), None, "{name}: {}", t.name);
                assert_eq!(unused_by(&cfg, &t.name), None, "{name}: {}", t.name);
            }
        }
    }

    fn count(specs: &[TensorSpec], prefix: &str) -> usize {
        specs
            .iter()
            .filter(|t| t.name.starts_with(prefix))
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    #[test]
    fn parameter_counts_match_published_models() {
        let sd1 = layout(&ModelConfig::sd1()).unwrap();
        assert_eq!(count(&sd1, UNET_PREFIX), 859_520_964);
        assert_eq!(count(&sd1, VAE_PREFIX), 83_653_863);
        assert_eq!(count(&sd1, "cond_stage_model."), 123_060_480);
        assert_eq!(
            count(&layout(&ModelConfig::sd2()).unwrap(), UNET_PREFIX),
            865_910_724
        );
        assert_eq!(
            count(&layout(&ModelConfig::sdxl()).unwrap(), UNET_PREFIX),
            2_567_463_684
        );
    }

    #[test]
    fn lcm_guidance_embedding_feeds_the_timestep_features() {
        let mut cfg = ModelConfig::sd1();
        cfg.unet.time_cond_proj_dim = Some(256);
        let specs = layout(&cfg).unwrap();
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
        assert_eq!(specs.len(), layout(&ModelConfig::sd1()).unwrap().len() + 1);
    }

    #[test]
    fn removed_blocks_shift_the_numbering_and_skip_widths() {
        // BK-SDM-style: one ResNet per encoder level, two per decoder level, no middle block.
        let mut cfg = ModelConfig::sd1();
        cfg.unet.down_blocks = vec![vec![1], vec![1], vec![1], vec![0]];
        cfg.unet.up_blocks = vec![vec![0, 0], vec![1, 1], vec![1, 1], vec![1, 1]];
        cfg.unet.mid_depth = None;
        let specs = layout(&cfg).unwrap();
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
            .unwrap()
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
        let specs = layout(&cfg).unwrap();
        let mut tensors: Vec<(&str, &[usize])> = specs
            .iter()
            .skip(1)
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        let odd = [7usize];
        tensors.push(("model.diffusion_model.something_new.weight", &odd));
        tensors.push(("betas", &[1000]));
        tensors[0].1 = &odd;
        let diff = compare(&cfg, &tensors).unwrap();
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
        assert!(compare(&cfg, &all).unwrap().is_exact());
        let shortcut = "first_stage_model.encoder.down.0.block.0.nin_shortcut.weight";
        let mut with_shortcut = all.clone();
        with_shortcut.push((shortcut, &odd));
        let diff = compare(&cfg, &with_shortcut).unwrap();
        assert_eq!(
            (diff.shortcuts, diff.unexpected),
            (vec![shortcut.to_string()], vec![])
        );
    }
}
