//! Recovering a [`ModelConfig`] from a checkpoint's tensor names and shapes (in
//! the canonical single-file naming), the inverse of [`layout`].
//!
//! Everything a shape shows is read from the shapes: widths, levels, the blocks
//! present at each level (so distilled UNets with ResNets, attention or the
//! middle block removed are described exactly), transformer depths, input
//! channels (9 = inpainting), projections, `label_emb`, the LCM guidance
//! embedding, the VAE and the text towers. What shapes cannot show comes from the
//! family, which the text encoders' names give away:
//!
//! | family | text encoders | heads | prediction | VAE scale |
//! |---|---|---|---|---|
//! | `sd1` | HF CLIP under `cond_stage_model.transformer.` | 8 per layer | epsilon | 0.18215 |
//! | `sd2` | OpenCLIP under `cond_stage_model.model.` | 64 wide | v | 0.18215 |
//! | `sdxl` | `conditioner.embedders.N.` (CLIP-L and OpenCLIP bigG) | 64 wide | epsilon | 0.13025 |
//! | `sdxl-refiner` | `conditioner.embedders.N.` without a HF CLIP | 64 wide | epsilon | 0.13025 |
//!
//! Text encoder heads are `max(1, hidden / 64)`. SD 2 checkpoints carry the whole
//! OpenCLIP tower but condition on its penultimate block: a tower that still has
//! its `text_projection` is taken as whole and trimmed by one block, and the
//! trimmed tensors are reported by [`layout::unused_by`].
//!
//! A checkpoint must hold the UNet, the VAE and the text encoders (a full model);
//! otherwise the error lists what is missing. The detected config is checked
//! against the checkpoint by name: a tensor missing from, or unknown to, the
//! detected layout is an error (buffers with a [`layout::extra_reason`] are
//! ignored). Widths are only checked where detection reads them, so a file with
//! the names of a known layout but inconsistently shrunk widths (test fixtures)
//! is still recognised; [`layout::compare`] reports every width difference
//! (`wrong_shape`, `shortcuts`) for callers that need an exact match.
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use super::layout;
use super::source::{Checkpoint, SourceFormat};
use crate::config::{
    ModelConfig, NoiseSchedule, Prediction, TextEncoderConfig, TextEncoderKind, UnetConfig,
    UnetStyle, VaeConfig,
};
use crate::error::Error;
use crate::network::{clip::projection_name, UNET_PREFIX, VAE_PREFIX};

type Result<T> = std::result::Result<T, String>;

const SD1_TEXT: &str = "cond_stage_model.transformer.";
const SD2_TEXT: &str = "cond_stage_model.model.";
const SDXL_TEXT: &str = "conditioner.embedders.";

/// The architecture of a checkpoint from its tensor names and shapes (PyTorch
/// order). The error says what is wrong; the caller adds the file's path.
pub fn detect(tensors: &[(&str, &[usize])]) -> Result<ModelConfig> {
    let t = Tensors::new(tensors)?;
    let has_unet = t.any(UNET_PREFIX);
    let has_vae = t.any(VAE_PREFIX);
    let has_text = t.any(SD1_TEXT) || t.any(SD2_TEXT) || t.any(SDXL_TEXT);
    if !has_unet && !has_vae && !has_text {
        let sample: Vec<&str> = t.map.keys().take(3).copied().collect();
        return Err(format!(
            "not a Stable Diffusion checkpoint: none of its {} tensors (e.g. {}) is a UNet (`{UNET_PREFIX}*`), VAE or text encoder tensor",
            t.map.len(),
            sample.join(", ")
        ));
    }
    let mut missing = Vec::new();
    if !has_unet {
        missing.push(format!("the UNet (`{UNET_PREFIX}*`)"));
    }
    if !has_vae {
        missing.push(format!("the VAE (`{VAE_PREFIX}*`)"));
    }
    if !has_text {
        missing.push(format!(
            "the text encoder (`{SD1_TEXT}*`, `{SD2_TEXT}*` or `{SDXL_TEXT}*`)"
        ));
    }
    if !missing.is_empty() {
        return Err(format!(
            "incomplete checkpoint: it lacks {}; a Stable Diffusion model needs all three",
            missing.join(" and ")
        ));
    }

    let (family, text_encoders) = text_encoders(&t)?;
    let unet = unet(&t, &family, &text_encoders)?;
    let vae = vae(&t, &family)?;
    let prediction = if family == "sd2" {
        Prediction::V
    } else {
        Prediction::Epsilon
    };
    // Nothing in the tensors tells a zero-terminal-SNR schedule apart: the scheduler
    // config does (diffusers folders), or `sdrs convert --zero-terminal-snr`.
    let zeros_for_empty_negative = unet.adm_in_channels.is_some();
    let mut cfg = ModelConfig {
        family,
        prediction,
        zero_terminal_snr: false,
        zeros_for_empty_negative,
        schedule: NoiseSchedule::default(),
        unet,
        vae: Some(vae),
        text_encoders,
    };
    cfg.check_sizes()?;
    cfg.infer_time_ids()?;

    let diff = layout::compare(&cfg, tensors).map_err(|e| e.to_string())?;
    if !diff.missing.is_empty() || !diff.unexpected.is_empty() {
        let mut parts = Vec::new();
        if !diff.missing.is_empty() {
            parts.push(format!("lacks {}", listing(&diff.missing)));
        }
        if !diff.unexpected.is_empty() {
            parts.push(format!(
                "has tensors it does not know: {}",
                listing(&diff.unexpected)
            ));
        }
        return Err(format!(
            "unsupported architecture: compared with the {} layout it detected, the checkpoint {}",
            cfg.family,
            parts.join("; ")
        ));
    }
    Ok(cfg)
}

/// A few names and how many more.
fn listing(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s += &format!(" and {} more", names.len() - SHOWN);
    }
    s
}

/// The checkpoint's tensors by name.
pub(crate) struct Tensors<'a> {
    map: BTreeMap<&'a str, &'a [usize]>,
}

impl<'a> Tensors<'a> {
    pub(crate) fn new(tensors: &[(&'a str, &'a [usize])]) -> Result<Self> {
        let mut map = BTreeMap::new();
        for &(name, shape) in tensors {
            if map.insert(name, shape).is_some() {
                return Err(format!("tensor `{name}` appears twice"));
            }
        }
        Ok(Tensors { map })
    }

    pub(crate) fn with_prefix<'s>(
        &'s self,
        prefix: &'s str,
    ) -> impl Iterator<Item = (&'a str, &'a [usize])> + 's {
        self.map
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(n, _)| n.starts_with(prefix))
            .map(|(n, s)| (*n, *s))
    }

    pub(crate) fn any(&self, prefix: &str) -> bool {
        self.with_prefix(prefix).next().is_some()
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The indices `N` of names `<prefix>N.…`.
    pub(crate) fn indices(&self, prefix: &str) -> BTreeSet<usize> {
        self.with_prefix(prefix)
            .filter_map(|(n, _)| {
                n[prefix.len()..]
                    .split('.')
                    .next()
                    .and_then(|i| i.parse().ok())
            })
            .collect()
    }

    /// How many of `<prefix>0.`, `<prefix>1.`, … exist without a gap; tensors past
    /// a gap are left for the final name check to report.
    pub(crate) fn count(&self, prefix: &str) -> usize {
        let present = self.indices(prefix);
        (0..).take_while(|i| present.contains(i)).count()
    }

    /// The shape of `name`, which must have `rank` dimensions, none of them zero.
    pub(crate) fn shape(&self, name: &str, rank: usize) -> Result<&'a [usize]> {
        let shape = self
            .map
            .get(name)
            .ok_or_else(|| format!("tensor `{name}` is missing"))?;
        if shape.len() != rank || shape.contains(&0) {
            return Err(format!(
                "tensor `{name}` has shape {shape:?}; expected {rank} non-zero dimensions"
            ));
        }
        Ok(shape)
    }

    pub(crate) fn dim(&self, name: &str, rank: usize, axis: usize) -> Result<usize> {
        Ok(self.shape(name, rank)?[axis])
    }
}

fn text_encoders(t: &Tensors) -> Result<(String, Vec<TextEncoderConfig>)> {
    let families = [(SD1_TEXT, "sd1"), (SD2_TEXT, "sd2"), (SDXL_TEXT, "sdxl")];
    let found: Vec<&str> = families
        .iter()
        .filter(|(p, _)| t.any(p))
        .map(|(_, f)| *f)
        .collect();
    if found.len() > 1 {
        return Err(format!(
            "text encoders of several families ({}) in one checkpoint",
            found.join(", ")
        ));
    }
    match found.first().copied() {
        Some("sd1") => {
            let mut te = text_encoder(
                t,
                "cond_stage_model.transformer.text_model.",
                TextEncoderKind::HfClip,
            )?;
            te.skip_layers = 0;
            te.final_norm = true;
            Ok(("sd1".into(), vec![te]))
        }
        Some("sd2") => {
            let mut te = text_encoder(t, SD2_TEXT, TextEncoderKind::OpenClip)?;
            if te.projection_dim.is_some() {
                // The whole OpenCLIP tower: SD 2 reads the penultimate block and never projects.
                if te.num_layers < 2 {
                    return Err(format!(
                        "OpenCLIP text encoder `{SD2_TEXT}` has {} block(s); SD 2 needs at least 2",
                        te.num_layers
                    ));
                }
                te.num_layers -= 1;
                te.projection_dim = None;
            }
            te.skip_layers = 0;
            te.final_norm = true;
            Ok(("sd2".into(), vec![te]))
        }
        Some(_) => {
            let mut encoders = Vec::new();
            for n in t.indices(SDXL_TEXT) {
                let hf = format!("{SDXL_TEXT}{n}.transformer.text_model.");
                let open = format!("{SDXL_TEXT}{n}.model.");
                let mut te = if t.any(&hf) {
                    text_encoder(t, &hf, TextEncoderKind::HfClip)?
                } else if t.any(&open) {
                    text_encoder(t, &open, TextEncoderKind::OpenClip)?
                } else {
                    return Err(format!("`{SDXL_TEXT}{n}.*` is neither a CLIP (`transformer.text_model.`) nor an OpenCLIP (`model.`) text encoder"));
                };
                // SDXL conditions on every encoder's penultimate layer, without the final norm.
                te.skip_layers = 1;
                te.final_norm = false;
                encoders.push(te);
            }
            if encoders.is_empty() {
                return Err(format!("no text encoder found under `{SDXL_TEXT}N.`"));
            }
            let family = if encoders.iter().any(|e| e.kind == TextEncoderKind::HfClip) {
                "sdxl"
            } else {
                "sdxl-refiner"
            };
            Ok((family.into(), encoders))
        }
        None => Err("no text encoder found".into()),
    }
}

fn text_encoder(t: &Tensors, prefix: &str, kind: TextEncoderKind) -> Result<TextEncoderConfig> {
    let (token, position, blocks, fc) = match kind {
        TextEncoderKind::HfClip => (
            "embeddings.token_embedding.weight",
            "embeddings.position_embedding.weight",
            "encoder.layers.",
            "mlp.fc1.weight",
        ),
        TextEncoderKind::OpenClip => (
            "token_embedding.weight",
            "positional_embedding",
            "transformer.resblocks.",
            "mlp.c_fc.weight",
        ),
    };
    let token = t.shape(&format!("{prefix}{token}"), 2)?;
    let (vocab_size, hidden) = (token[0], token[1]);
    let max_positions = t.dim(&format!("{prefix}{position}"), 2, 0)?;
    let num_layers = t.count(&format!("{prefix}{blocks}"));
    if num_layers == 0 {
        return Err(format!(
            "text encoder `{prefix}` has no layers (`{prefix}{blocks}0.*`)"
        ));
    }
    let intermediate_size = t.dim(&format!("{prefix}{blocks}0.{fc}"), 2, 0)?;
    let mut te = match kind {
        TextEncoderKind::HfClip => TextEncoderConfig::clip_l(prefix),
        TextEncoderKind::OpenClip => {
            TextEncoderConfig::open_clip(prefix, hidden, num_layers, 1, None)
        }
    };
    te.vocab_size = vocab_size;
    te.max_positions = max_positions;
    te.hidden_size = hidden;
    te.num_layers = num_layers;
    te.num_heads = (hidden / 64).max(1);
    te.intermediate_size = intermediate_size;
    let projection = projection_name(&te);
    te.projection_dim = match kind {
        _ if !t.has(&projection) => None,
        TextEncoderKind::HfClip => Some(t.dim(&projection, 2, 0)?),
        TextEncoderKind::OpenClip => Some(t.dim(&projection, 2, 1)?),
    };
    Ok(te)
}

/// One encoder or decoder level of the UNet: its width and the transformer depth
/// after each of its ResNets.
struct Level {
    width: usize,
    depths: Vec<usize>,
}

/// Adds the ResNet at `block` (`…input_blocks.N` or `…output_blocks.N`) to `level`.
fn add_resnet(t: &Tensors, level: &mut Option<Level>, block: &str) -> Result<()> {
    let width = t.dim(&format!("{block}.0.in_layers.2.weight"), 4, 0)?;
    let depth = t.count(&format!("{block}.1.transformer_blocks."));
    match level {
        Some(l) if l.width != width => {
            return Err(format!(
                "`{block}` is {width} wide where the other ResNets of its level are {}",
                l.width
            ))
        }
        Some(l) => l.depths.push(depth),
        None => {
            *level = Some(Level {
                width,
                depths: vec![depth],
            })
        }
    }
    Ok(())
}

fn unet(t: &Tensors, family: &str, text_encoders: &[TextEncoderConfig]) -> Result<UnetConfig> {
    unet_at(t, UNET_PREFIX, family, text_encoders, true)
}

/// The UNet whose tensors are under `p`; only its encoder (no up path, `out_channels`
/// = `in_channels`) where `decoder` is false, as a ControlNet copies it.
pub(crate) fn unet_at(
    t: &Tensors,
    p: &str,
    family: &str,
    text_encoders: &[TextEncoderConfig],
    decoder: bool,
) -> Result<UnetConfig> {
    let conv_in = t.shape(&format!("{p}input_blocks.0.0.weight"), 4)?;
    let (model_channels, in_channels) = (conv_in[0], conv_in[1]);
    let out_channels = if decoder {
        t.dim(&format!("{p}out.2.weight"), 4, 0)?
    } else {
        in_channels
    };

    // Encoder: ResNets (each maybe followed by a transformer) until a downsampler closes the level.
    let mut down: Vec<Level> = Vec::new();
    let mut level: Option<Level> = None;
    let inputs = t
        .indices(&format!("{p}input_blocks."))
        .last()
        .copied()
        .unwrap_or(0);
    for n in 1..=inputs {
        let block = format!("{p}input_blocks.{n}");
        if t.has(&format!("{block}.0.op.weight")) {
            let l = level
                .take()
                .ok_or_else(|| format!("`{block}` downsamples a level that has no ResNet"))?;
            down.push(l);
        } else if t.has(&format!("{block}.0.in_layers.2.weight")) {
            add_resnet(t, &mut level, &block)?;
        } else {
            return Err(format!("`{block}` is neither a ResNet nor a downsampler"));
        }
    }
    down.push(
        level
            .take()
            .ok_or_else(|| "the UNet encoder ends with a downsampler, not a ResNet".to_string())?,
    );

    // Decoder: the same, closed by an upsampler (`.1.conv` or, after a transformer, `.2.conv`).
    let mut up: Vec<Level> = Vec::new();
    let outputs = t.indices(&format!("{p}output_blocks."));
    let mut level: Option<Level> = None;
    for n in 0..outputs.last().map_or(0, |last| last + 1) {
        let block = format!("{p}output_blocks.{n}");
        add_resnet(t, &mut level, &block)?;
        if t.has(&format!("{block}.1.conv.weight")) || t.has(&format!("{block}.2.conv.weight")) {
            up.extend(level.take());
        }
    }
    up.extend(level.take());

    if decoder && up.len() != down.len() {
        return Err(format!(
            "the UNet encoder has {} levels but the decoder {}",
            down.len(),
            up.len()
        ));
    }
    for (i, (u, d)) in up.iter().zip(down.iter().rev()).enumerate() {
        if u.width != d.width {
            return Err(format!(
                "UNet decoder level {i} is {} wide, its encoder level {}",
                u.width, d.width
            ));
        }
    }
    let skips = 1 + down.iter().map(|l| l.depths.len()).sum::<usize>() + (down.len() - 1);
    let decoder_resnets: usize = up.iter().map(|l| l.depths.len()).sum();
    if decoder && skips != decoder_resnets {
        return Err(format!(
            "the UNet decoder has {decoder_resnets} ResNets for {skips} encoder skip connections"
        ));
    }
    let channel_mult = down
        .iter()
        .map(|l| match l.width % model_channels {
            0 => Ok(l.width / model_channels),
            _ => Err(format!(
                "UNet level width {} is not a multiple of the base width {model_channels}",
                l.width
            )),
        })
        .collect::<Result<Vec<_>>>()?;

    let mid = |i: usize| format!("{p}middle_block.{i}");
    let mid_depth = if !t.any(&format!("{p}middle_block.")) {
        None
    } else if !t.any(&format!("{}.", mid(1))) {
        // A lone ResNet: diffusers' attention-free middle block.
        Some(0)
    } else {
        let depth = t.count(&format!("{}.transformer_blocks.", mid(1)));
        if depth == 0 {
            return Err(format!(
                "`{}` is neither a transformer nor a ResNet",
                mid(1)
            ));
        }
        Some(depth)
    };

    // Any transformer tells the projection kind and the context width.
    let (linear_proj, context_dim) = match t
        .with_prefix(p)
        .find(|(n, _)| n.ends_with(".attn2.to_k.weight"))
    {
        Some((to_k, _)) => {
            let block = to_k.split(".transformer_blocks.").next().unwrap_or(to_k);
            let context = t.dim(to_k, 2, 1)?;
            let proj_in = format!("{block}.proj_in.weight");
            let linear = match t.shape(&proj_in, 2) {
                Ok(_) => true,
                Err(_) => t.shape(&proj_in, 4).map(|_| false)?,
            };
            (linear, context)
        }
        None => (
            family != "sd1",
            text_encoders.iter().map(|te| te.hidden_size).sum(),
        ),
    };

    let input_width = |name: String| {
        if t.has(&name) {
            t.dim(&name, 2, 1).map(Some)
        } else {
            Ok(None)
        }
    };
    let adm_in_channels = input_width(format!("{p}label_emb.0.0.weight"))?;
    let time_cond_proj_dim = input_width(format!("{p}time_embed.cond_proj.weight"))?;
    // Head counts leave no trace in shapes: SD 1.x used 8 per layer, later models 64-wide heads.
    let (num_heads, head_dim) = if family == "sd1" {
        (Some(8), None)
    } else {
        (None, Some(64))
    };

    Ok(UnetConfig {
        in_channels,
        out_channels,
        model_channels,
        channel_mult,
        down_blocks: down.into_iter().map(|l| l.depths).collect(),
        up_blocks: up.into_iter().map(|l| l.depths).collect(),
        mid_depth,
        num_heads,
        head_dim,
        context_dim,
        linear_proj,
        adm_in_channels,
        time_cond_proj_dim,
        time_ids: Vec::new(),
        time_id_dim: 0,
        style: UnetStyle::default(),
    })
}

fn vae(t: &Tensors, family: &str) -> Result<VaeConfig> {
    let e = format!("{VAE_PREFIX}encoder.");
    let conv_in = t.shape(&format!("{e}conv_in.weight"), 4)?;
    let (base_channels, in_channels) = (conv_in[0], conv_in[1]);
    let levels = t.count(&format!("{e}down."));
    if levels == 0 {
        return Err(format!("VAE encoder has no levels (`{e}down.0.*`)"));
    }
    let num_res_blocks = t.count(&format!("{e}down.0.block."));
    if num_res_blocks == 0 {
        return Err(format!(
            "VAE encoder level 0 has no ResNets (`{e}down.0.block.0.*`)"
        ));
    }
    let channel_mult = (0..levels)
        .map(|level| {
            let width = t.dim(&format!("{e}down.{level}.block.0.conv1.weight"), 4, 0)?;
            match width % base_channels {
                0 => Ok(width / base_channels),
                _ => {
                    Err(format!("VAE level {level} width {width} is not a multiple of the base width {base_channels}"))
                }
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let latent_channels = t.dim(&format!("{VAE_PREFIX}post_quant_conv.weight"), 4, 0)?;
    let scaling_factor = if family.starts_with("sdxl") {
        0.13025
    } else {
        0.18215
    };
    Ok(VaeConfig {
        in_channels,
        latent_channels,
        base_channels,
        channel_mult,
        num_res_blocks,
        scaling_factor,
        shift_factor: 0.0,
        codebook: None,
    })
}

impl Checkpoint {
    /// The architecture of this checkpoint: its stored config (sdrs' GGUF metadata, a
    /// diffusers folder's configs) or, failing that, [`detect`] on its tensor names and
    /// shapes; a `prediction_type` in its metadata overrides the config's.
    pub fn model_config(&self) -> crate::error::Result<ModelConfig> {
        let stored = match self.format {
            SourceFormat::Gguf => {
                super::gguf::metadata::read_config(&super::gguf::GgufFile::open(&self.path)?)?
            }
            SourceFormat::Diffusers => Some(super::diffusers::read_config(&self.path)?),
            _ => None,
        };
        let mut cfg = match stored {
            Some(c) => c,
            None => {
                let shapes: Vec<(&str, &[usize])> = self
                    .tensors
                    .iter()
                    .map(|t| (t.name.as_str(), t.shape.as_slice()))
                    .collect();
                detect(&shapes).map_err(|m| Error::arch(&self.path, m))?
            }
        };
        if let Some(p) = self
            .metadata
            .get("prediction_type")
            .and_then(|p| Prediction::parse(p))
        {
            cfg.prediction = p;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::layout::{layout, tests::real_layout, TensorSpec};

    fn names_and_shapes(specs: &[TensorSpec]) -> Vec<(&str, &[usize])> {
        specs
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect()
    }

    fn detect_layout_of(cfg: &ModelConfig) -> Result<ModelConfig> {
        detect(&names_and_shapes(&layout(cfg).unwrap()))
    }

    /// `cfg` as detection describes it: the family without the `tiny-` of shrunk presets.
    fn as_detected(cfg: &ModelConfig) -> ModelConfig {
        ModelConfig {
            family: cfg.family.trim_start_matches("tiny-").to_string(),
            ..cfg.clone()
        }
    }

    fn assert_round_trip(cfg: &ModelConfig) {
        assert_eq!(detect_layout_of(cfg), Ok(as_detected(cfg)));
    }

    #[test]
    fn detects_every_preset_from_its_own_layout() {
        for name in ModelConfig::PRESETS {
            assert_round_trip(&ModelConfig::preset(name).unwrap());
        }
    }

    #[test]
    fn detects_real_checkpoint_layouts_as_their_presets() {
        for (file, want) in [
            ("sd15.json", ModelConfig::sd1()),
            ("sd21.json", ModelConfig::sd2()),
            ("sdxl.json", ModelConfig::sdxl()),
        ] {
            let real = real_layout(file);
            let tensors: Vec<(&str, &[usize])> = real
                .iter()
                .map(|t| (t.name.as_str(), t.shape.as_slice()))
                .collect();
            assert_eq!(detect(&tensors), Ok(want), "{file}");
        }
    }

    #[test]
    fn detects_inpainting_unet_from_its_nine_input_channels() {
        for base in [
            ModelConfig::sd1(),
            ModelConfig::sd2().shrink(),
            ModelConfig::sdxl(),
        ] {
            let mut cfg = base;
            cfg.unet.in_channels = 9;
            assert_round_trip(&cfg);
        }
    }

    #[test]
    fn detects_distilled_unets_with_removed_resnets_attention_and_middle_block() {
        // BK-SDM: one ResNet(+attention) fewer per encoder level, two per decoder level, no middle block.
        for base in [ModelConfig::sd1(), ModelConfig::sd2().shrink()] {
            let mut cfg = base;
            cfg.unet.down_blocks = vec![vec![1], vec![1], vec![1], vec![0]];
            cfg.unet.up_blocks = vec![vec![0, 0], vec![1, 1], vec![1, 1], vec![1, 1]];
            cfg.unet.mid_depth = None;
            assert_round_trip(&cfg);
        }
        // SSD-1B/Vega style: SDXL with per-block transformer depths and a thinner middle.
        let mut ssd = ModelConfig::sdxl();
        ssd.unet.down_blocks = vec![vec![0, 0], vec![2, 2], vec![4, 4]];
        ssd.unet.up_blocks = vec![vec![4, 4, 10], vec![2, 2, 1], vec![0, 0, 0]];
        ssd.unet.mid_depth = Some(0);
        assert_round_trip(&ssd);
        let mut vega = ModelConfig::sdxl().shrink();
        vega.unet.down_blocks = vec![vec![0], vec![1], vec![2]];
        vega.unet.up_blocks = vec![vec![2, 1], vec![1, 0], vec![0, 0]];
        vega.unet.mid_depth = Some(1);
        assert_round_trip(&vega);
    }

    #[test]
    fn detects_lcm_guidance_embedding() {
        for base in [ModelConfig::sd1(), ModelConfig::sdxl().shrink()] {
            let mut cfg = base;
            cfg.unet.time_cond_proj_dim = Some(256);
            assert_round_trip(&cfg);
        }
    }

    #[test]
    fn detects_sdxl_refiner_with_only_openclip() {
        let mut cfg = ModelConfig::sdxl();
        cfg.family = "sdxl-refiner".into();
        cfg.text_encoders.remove(0);
        cfg.text_encoders[0].prefix = "conditioner.embedders.0.model.".into();
        cfg.unet.model_channels = 384;
        cfg.unet.channel_mult = vec![1, 2, 4, 4];
        cfg.unet.down_blocks = vec![vec![0, 0], vec![4, 4], vec![4, 4], vec![0, 0]];
        cfg.unet.up_blocks = vec![vec![0, 0, 0], vec![4, 4, 4], vec![4, 4, 4], vec![0, 0, 0]];
        cfg.unet.mid_depth = Some(4);
        cfg.unet.context_dim = 1280;
        cfg.unet.adm_in_channels = Some(2560);
        cfg.unet.time_ids = crate::config::TimeId::REFINER.to_vec();
        assert_round_trip(&cfg);
    }

    #[test]
    fn detects_sd1_in_inconsistently_shrunk_sdcpp_fixture() {
        let Some(path) = crate::testdata::external("fixtures/sdcpp-gguf/tiny-sd15.safetensors")
        else {
            return;
        };
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        let shapes: Vec<(String, Vec<usize>)> = header
            .iter()
            .filter(|(name, _)| *name != "__metadata__")
            .map(|(name, v)| {
                (
                    name.clone(),
                    serde_json::from_value(v["shape"].clone()).unwrap(),
                )
            })
            .collect();
        assert_eq!(shapes.len(), 1143);
        let tensors: Vec<(&str, &[usize])> = shapes
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        let cfg = detect(&tensors).unwrap();
        assert_eq!(cfg.family, "sd1");
        assert_eq!(cfg.prediction, Prediction::Epsilon);
        assert_eq!(cfg.unet.num_heads, Some(8));
        assert_eq!(cfg.text_encoders.len(), 1);
        assert_eq!(cfg.text_encoders[0].num_layers, 12);
        assert_eq!(
            (cfg.unet.down_blocks.clone(), cfg.unet.up_blocks.clone()),
            (
                ModelConfig::sd1().unet.down_blocks,
                ModelConfig::sd1().unet.up_blocks
            )
        );
        // Every name is accounted for; only the widths fail to form a network.
        let diff = layout::compare(&cfg, &tensors).unwrap();
        assert!(diff.missing.is_empty() && diff.unexpected.is_empty());
        assert!(!diff.wrong_shape.is_empty() && !diff.shortcuts.is_empty());
    }

    #[test]
    fn rejects_a_pile_of_unrelated_names() {
        let shape = [3usize, 4];
        let tensors: Vec<(&str, &[usize])> = [
            "encoder.layer.0.weight",
            "lm_head.weight",
            "foo",
            "bar.baz.1",
        ]
        .iter()
        .map(|n| (*n, &shape[..]))
        .collect();
        let err = detect(&tensors).unwrap_err();
        assert!(err.contains("not a Stable Diffusion checkpoint"), "{err}");
        assert!(detect(&[])
            .unwrap_err()
            .contains("not a Stable Diffusion checkpoint"));
    }

    #[test]
    fn lists_the_components_a_checkpoint_lacks() {
        let specs = layout(&ModelConfig::sd1().shrink()).unwrap();
        let without = |prefix: &str| -> Vec<(&str, &[usize])> {
            names_and_shapes(&specs)
                .into_iter()
                .filter(|(n, _)| !n.starts_with(prefix))
                .collect()
        };
        let err = detect(&without(UNET_PREFIX)).unwrap_err();
        assert!(err.contains("the UNet") && !err.contains("VAE"), "{err}");
        let unet_only: Vec<_> = names_and_shapes(&specs)
            .into_iter()
            .filter(|(n, _)| n.starts_with(UNET_PREFIX))
            .collect();
        let err = detect(&unet_only).unwrap_err();
        assert!(
            err.contains("the VAE") && err.contains("the text encoder") && !err.contains("UNet ("),
            "{err}"
        );
    }

    #[test]
    fn rejects_tensors_the_detected_layout_does_not_have() {
        let specs = layout(&ModelConfig::sd1().shrink()).unwrap();
        let mut tensors = names_and_shapes(&specs);
        let shape = [32usize];
        tensors.push((
            "model.diffusion_model.input_blocks.1.1.extra_norm.weight",
            &shape,
        ));
        let err = detect(&tensors).unwrap_err();
        assert!(err.contains("extra_norm"), "{err}");
        // A transformer block after a gap is not counted, then reported.
        let mut tensors = names_and_shapes(&specs);
        tensors.retain(|(n, _)| !n.contains("input_blocks.1.1.transformer_blocks.0."));
        let err = detect(&tensors).unwrap_err();
        assert!(err.contains("input_blocks.1.1"), "{err}");
    }

    #[test]
    fn rejects_shapes_that_do_not_make_a_unet() {
        let cfg = ModelConfig::sd1().shrink();
        let specs = layout(&cfg).unwrap();
        let mut tensors = names_and_shapes(&specs);
        let odd = [48usize, 32, 3, 3];
        for t in tensors
            .iter_mut()
            .filter(|(n, _)| *n == "model.diffusion_model.input_blocks.4.0.in_layers.2.weight")
        {
            t.1 = &odd;
        }
        let err = detect(&tensors).unwrap_err();
        assert!(
            err.contains("input_blocks.5") || err.contains("input_blocks.4"),
            "{err}"
        );
        let mut tensors = names_and_shapes(&specs);
        let flat = [32usize];
        for t in tensors
            .iter_mut()
            .filter(|(n, _)| *n == "model.diffusion_model.input_blocks.0.0.weight")
        {
            t.1 = &flat;
        }
        assert!(detect(&tensors)
            .unwrap_err()
            .contains("input_blocks.0.0.weight"));
    }

    #[test]
    fn rejects_duplicate_names() {
        let specs = layout(&ModelConfig::sd1().shrink()).unwrap();
        let mut tensors = names_and_shapes(&specs);
        tensors.push(tensors[0]);
        assert!(detect(&tensors).unwrap_err().contains("twice"));
    }
}
