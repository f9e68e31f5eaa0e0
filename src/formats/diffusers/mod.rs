//! Diffusers model folders (`model_index.json` with `unet/`, `vae/`, `text_encoder/`,
//! `text_encoder_2/`, `scheduler/`, `tokenizer/`), read into and written from the
//! canonical single-file naming.
//!
//! The tensor-name correspondence is derived from each component's `config.json`
//! (see [`names`]), so a folder whose config and weights disagree is an error rather
//! than a silently partial model.
mod config;
pub mod names;
#[cfg(test)]
mod tests;
mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::source::{Checkpoint, SourceFormat, SourceTensor, TokenizerFiles};
use crate::config::{
    AttentionKind, Defaults, ModelConfig, NoiseSchedule, Prediction, TextEncoderConfig,
    TextEncoderKind, UnetConfig, VaeConfig,
};
use crate::error::{Error, Result};
use config::{read_json, Obj, TextRole};

pub use write::write;

/// Component folders of a text-to-image pipeline, with the tokenizer folder that
/// belongs to each text encoder.
const TEXT_FOLDERS: [(&str, &str); 2] = [
    ("text_encoder", "tokenizer"),
    ("text_encoder_2", "tokenizer_2"),
];

/// Everything the configs of a folder say, component by component.
struct Parsed {
    pipeline: Option<String>,
    diffusers_version: Option<String>,
    /// (component folder, config)
    unet: Option<(PathBuf, UnetConfig)>,
    vae: Option<(PathBuf, VaeConfig)>,
    text: Vec<(PathBuf, TextEncoderConfig)>,
    prediction: Option<Prediction>,
    zero_terminal_snr: bool,
    schedule: Option<NoiseSchedule>,
    /// `force_zeros_for_empty_prompt` of `model_index.json`, when it says.
    zeros_for_empty_negative: Option<bool>,
    family: String,
}

/// The `[library, class]` pair `model_index.json` gives a component, if any.
fn index_class<'a>(index: Option<&'a Value>, component: &str) -> Option<&'a str> {
    index?.get(component)?.as_array()?.get(1)?.as_str()
}

fn parse(dir: &Path) -> Result<Parsed> {
    if !dir.is_dir() {
        return Err(Error::format(dir, "not a folder"));
    }
    let index_path = dir.join("model_index.json");
    let index = if index_path.is_file() {
        Some(read_json(&index_path)?)
    } else {
        None
    };
    let index_obj = index
        .as_ref()
        .map(|v| Obj::new(v, &index_path))
        .transpose()?;
    let pipeline = index_obj
        .as_ref()
        .map(|o| o.opt_str("_class_name"))
        .transpose()?
        .flatten()
        .map(str::to_string);
    let diffusers_version = index_obj
        .as_ref()
        .map(|o| o.opt_str("_diffusers_version"))
        .transpose()?
        .flatten()
        .map(str::to_string);

    let zeros_for_empty_negative = index_obj
        .as_ref()
        .and_then(|o| o.get("force_zeros_for_empty_prompt"))
        .and_then(Value::as_bool);
    let mut p = Parsed {
        pipeline,
        diffusers_version,
        unet: None,
        vae: None,
        text: Vec::new(),
        prediction: None,
        zero_terminal_snr: false,
        schedule: None,
        zeros_for_empty_negative,
        family: "sd1".into(),
    };

    let root_config = dir.join("config.json");
    if index.is_none() && root_config.is_file() {
        // A lone model folder (a VAE or UNet repository) keeps config and weights at its root.
        let v = read_json(&root_config)?;
        let class = Obj::new(&v, &root_config)?
            .opt_str("_class_name")?
            .unwrap_or_default()
            .to_string();
        match class.as_str() {
            "UNet2DConditionModel" => p.unet = Some((dir.to_path_buf(), config::unet(&v, &root_config)?)),
            "UNet2DModel" => p.unet = Some((dir.to_path_buf(), config::unet2d(&v, &root_config)?)),
            "AutoencoderKL" => p.vae = Some((dir.to_path_buf(), config::vae(&v, &root_config)?)),
            other => {
                return Err(Error::arch(
                    &root_config,
                    format!("`_class_name` {other:?}: only a pipeline folder (model_index.json) or a lone UNet2DConditionModel, UNet2DModel or AutoencoderKL folder can be read"),
                ))
            }
        }
        p.family = family(&p);
        return Ok(p);
    }

    let present = |name: &str| -> Result<bool> {
        let here = dir.join(name).is_dir();
        if !here && index_class(index.as_ref(), name).is_some() {
            return Err(Error::format(
                &index_path,
                format!(
                    "lists the component `{name}` but the folder {} is missing",
                    dir.join(name).display()
                ),
            ));
        }
        Ok(here)
    };
    if present("unet")? {
        let cdir = dir.join("unet");
        let path = cdir.join("config.json");
        let v = read_json(&path)?;
        let class = Obj::new(&v, &path)?
            .opt_str("_class_name")?
            .map(str::to_string);
        let cfg = match class.as_deref() {
            Some("UNet2DModel") => config::unet2d(&v, &path)?,
            _ => config::unet(&v, &path)?,
        };
        p.unet = Some((cdir, cfg));
    }
    // LDM's pipelines call their VQ autoencoder `vqvae`.
    for folder in ["vae", "vqvae"] {
        if present(folder)? {
            if p.vae.is_some() {
                return Err(Error::format(
                    dir,
                    "both vae/ and vqvae/: which autoencoder is the model's?",
                ));
            }
            let cdir = dir.join(folder);
            let path = cdir.join("config.json");
            p.vae = Some((cdir, config::vae(&read_json(&path)?, &path)?));
        }
    }
    let mut text_dirs = Vec::new();
    for (te, tok) in TEXT_FOLDERS {
        if present(te)? {
            text_dirs.push((te, tok));
        }
    }
    if p.unet.is_none() && p.vae.is_none() && text_dirs.is_empty() {
        return Err(Error::format(dir, "no diffusers components: expected unet/, vae/ or text_encoder/ folders (or a config.json for a lone model)"));
    }
    let sdxl = text_dirs.iter().any(|(te, _)| *te == "text_encoder_2")
        || p.unet
            .as_ref()
            .is_some_and(|(_, u)| u.adm_in_channels.is_some())
        || p.pipeline.as_deref().is_some_and(|c| c.contains("XL"));
    for (k, (te, tok)) in text_dirs.iter().enumerate() {
        let path = dir.join(te).join("config.json");
        let v = read_json(&path)?;
        let kind = if config::is_open_clip(&v, &path)? {
            TextEncoderKind::OpenClip
        } else {
            TextEncoderKind::HfClip
        };
        let inner = match kind {
            TextEncoderKind::HfClip => "transformer.text_model.",
            TextEncoderKind::OpenClip => "model.",
        };
        let prefix = if sdxl {
            format!("conditioner.embedders.{k}.{inner}")
        } else {
            format!("cond_stage_model.{inner}")
        };
        let tok_dir = dir.join(tok);
        let role = TextRole {
            prefix,
            kind,
            projection: config::has_projection(&v, &path, index_class(index.as_ref(), te))?,
            sdxl,
            pad_token: if tok_dir.is_dir() {
                config::pad_token(&tok_dir)?
            } else {
                None
            },
        };
        p.text.push((dir.join(te), config::text(&v, &path, role)?));
    }
    let sched = dir.join("scheduler").join("scheduler_config.json");
    if sched.is_file() {
        let v = read_json(&sched)?;
        let o = Obj::new(&v, &sched)?;
        if let Some(s) = o.opt_str("prediction_type")? {
            p.prediction = Some(Prediction::parse(s).ok_or_else(|| {
                Error::format(&sched, format!("unknown `prediction_type` {s:?}"))
            })?);
        }
        p.zero_terminal_snr = o.bool_or("rescale_betas_zero_snr", false)?;
        p.schedule = Some(config::scheduler(&v, &sched)?);
    }
    p.family = family(&p);
    Ok(p)
}

/// The descriptive family name: the structure decides, since nothing branches on it.
fn family(p: &Parsed) -> String {
    if p.unet
        .as_ref()
        .is_some_and(|(_, u)| u.style.attention == AttentionKind::SelfAttention)
    {
        return if p.vae.is_some() {
            "ldm"
        } else if p.schedule.as_ref().is_some_and(|s| s.ve.is_some()) {
            "score-sde"
        } else {
            "ddpm"
        }
        .into();
    }
    let sdxl = p
        .unet
        .as_ref()
        .is_some_and(|(_, u)| u.adm_in_channels.is_some())
        || p.text.len() > 1;
    let open_clip = p
        .text
        .first()
        .is_some_and(|(_, t)| t.kind == TextEncoderKind::OpenClip);
    match (sdxl, open_clip) {
        (true, _) => "sdxl",
        (false, true) => "sd2",
        (false, false) => "sd1",
    }
    .into()
}

/// The model configuration a diffusers folder describes: its components' `config.json`
/// files and `scheduler/scheduler_config.json` (prediction type, epsilon when absent;
/// `rescale_betas_zero_snr`).
/// Needs at least `unet/` and `vae/`.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let p = parse(dir)?;
    let (_, unet) = p.unet.ok_or_else(|| {
        Error::format(
            dir.join("unet").join("config.json"),
            "missing: a model needs a UNet",
        )
    })?;
    // A DDPM UNet works on pixels, or on a VQ autoencoder's latents (LDM); a
    // text-conditioned UNet needs the VAE of its latents.
    let pixels = unet.style.attention == AttentionKind::SelfAttention && p.text.is_empty();
    let vae = match p.vae {
        Some((_, v)) => Some(v),
        None if pixels => None,
        None => {
            return Err(Error::format(
                dir.join("vae").join("config.json"),
                "missing: a model needs a VAE",
            ))
        }
    };
    if let (true, Some(v)) = (pixels, &vae) {
        if v.codebook.is_none() {
            return Err(Error::arch(
                dir,
                "a UNet2DModel with a KL autoencoder is not supported (LDM's unconditional models use a VQ autoencoder)",
            ));
        }
        if v.latent_channels != unet.in_channels || unet.in_channels != unet.out_channels {
            return Err(Error::arch(
                dir,
                format!(
                    "the UNet takes {} channels but the VQ autoencoder's latents have {}",
                    unet.in_channels, v.latent_channels
                ),
            ));
        }
    }
    let unet_config = dir.join("unet").join("config.json");
    let mut cfg = ModelConfig {
        family: p.family,
        prediction: p.prediction.unwrap_or(Prediction::Epsilon),
        zero_terminal_snr: p.zero_terminal_snr,
        // diffusers' SDXL pipelines default to it; SD 1/2 pipelines have no such option.
        zeros_for_empty_negative: p
            .zeros_for_empty_negative
            .unwrap_or(unet.adm_in_channels.is_some()),
        // A text-to-image model takes the folder's betas; it samples on SD's grids
        // (steps offset 1, DDIM ending on ᾱ_0, no clipping) whichever scheduler the
        // folder ships, as single files without a scheduler config do.
        schedule: match p.schedule {
            Some(s) if pixels => s,
            Some(s) => NoiseSchedule {
                betas: s.betas,
                train_steps: s.train_steps,
                ..NoiseSchedule::default()
            },
            None => NoiseSchedule::default(),
        },
        unet,
        vae,
        text_encoders: p.text.into_iter().map(|(_, t)| t).collect(),
    };
    cfg.infer_time_ids()
        .map_err(|e| Error::arch(&unet_config, e))?;
    Ok(cfg)
}

/// How the folder's own pipeline would run it by default: diffusers' text-to-image
/// pipelines take the image size from `unet.sample_size` × the VAE factor, and a folder
/// that ships `LCMScheduler` or `TCDScheduler` is a consistency-distilled model meant
/// for 4 steps at the LCM pipeline's guidance 8.5 (LatentConsistencyModelPipeline's
/// defaults). Missing or unreadable configs give no defaults rather than an error.
pub fn read_defaults(dir: &Path) -> Defaults {
    let mut d = Defaults::default();
    let num = |comp: &str, key: &str| -> Option<u64> {
        read_json(&dir.join(comp).join("config.json"))
            .ok()?
            .get(key)?
            .as_u64()
    };
    let unet_class = read_json(&dir.join("unet").join("config.json"))
        .ok()
        .and_then(|v| v.get("_class_name")?.as_str().map(str::to_string));
    let pixels = unet_class.as_deref() == Some("UNet2DModel");
    // A pixel-space UNet's sample size is the image's; LDM's autoencoder is `vqvae`.
    let vae_levels = ["vae", "vqvae"]
        .iter()
        .find_map(|f| {
            read_json(&dir.join(f).join("config.json"))
                .ok()
                .and_then(|v| v.get("block_out_channels")?.as_array().map(Vec::len))
        })
        .or(pixels.then_some(1));
    if let (Some(s), Some(levels)) = (
        num("unet", "sample_size"),
        vae_levels.filter(|&n| (1..=6).contains(&n)),
    ) {
        let px = (s as usize)
            .checked_mul(1 << (levels - 1))
            .filter(|&p| p <= 1 << 16);
        d.width = px;
        d.height = px;
    }
    let class = read_json(&dir.join("scheduler").join("scheduler_config.json"))
        .ok()
        .and_then(|v| v.get("_class_name")?.as_str().map(str::to_string));
    let distilled = match class.as_deref() {
        Some("LCMScheduler") => Some("lcm"),
        Some("TCDScheduler") => Some("tcd"),
        _ => None,
    };
    if let Some(s) = distilled {
        d.sampler = Some(s.into());
        d.steps = Some(4);
        d.cfg_scale = Some(8.5);
    }
    // The DDPM paper's models run as their own pipelines do: DDPMPipeline's 1000
    // ancestral steps, or 50 of DDIM (DDIMPipeline, LDMPipeline) or PLMS; a score
    // model ScoreSdeVePipeline's 2000 predictor-corrector steps.
    if pixels {
        let (sampler, steps) = match class.as_deref() {
            Some("ScoreSdeVeScheduler") => ("score_sde_ve", 2000),
            Some("DDPMScheduler") => ("ddpm", 1000),
            Some("PNDMScheduler") => ("plms", 50),
            _ => ("ddim", 50),
        };
        d.sampler = Some(sampler.into());
        d.steps = Some(steps);
    }
    d
}

/// Opens a diffusers folder as a checkpoint in canonical naming: every component
/// folder present, mapped through the names its config implies. Also accepts a lone
/// UNet or VAE folder (config.json and weights at the root).
pub fn open(dir: &Path) -> Result<Checkpoint> {
    let p = parse(dir)?;
    let mut tensors = Vec::new();
    if let Some((cdir, u)) = &p.unet {
        let plan =
            names::unet(u).map_err(|e| Error::arch(cdir.join("config.json"), e.to_string()))?;
        let (file, mut found) = load_weights(cdir, DIFFUSERS_WEIGHTS)?;
        for t in &mut found {
            if let Some(new) = legacy_attention_name(&t.name) {
                t.name = new;
            }
        }
        tensors.extend(names::to_canonical(&plan, found, &file, |_| false)?);
    }
    if let Some((cdir, v)) = &p.vae {
        let (file, mut found) = load_weights(cdir, DIFFUSERS_WEIGHTS)?;
        for t in &mut found {
            if let Some(new) = legacy_attention_name(&t.name) {
                t.name = new;
            }
        }
        tensors.extend(names::to_canonical(&names::vae(v), found, &file, |_| {
            false
        })?);
    }
    for (cdir, t) in &p.text {
        let (file, mut found) = load_weights(cdir, TRANSFORMERS_WEIGHTS)?;
        // transformers 5 saves CLIP towers without the `text_model.` level that every
        // published SD repository (and transformers 4) has.
        if !found.iter().any(|t| t.name.starts_with("text_model.")) {
            for t in &mut found {
                if ["embeddings.", "encoder.", "final_layer_norm."]
                    .iter()
                    .any(|p| t.name.starts_with(p))
                {
                    t.name = format!("text_model.{}", t.name);
                }
            }
        }
        // Older transformers saved the `position_ids` buffer; it carries no weights.
        tensors.extend(names::to_canonical(&names::text(t), found, &file, |n| {
            n == "text_model.embeddings.position_ids"
        })?);
    }
    for t in &tensors {
        t.validate()?;
    }

    let mut metadata = BTreeMap::new();
    metadata.insert("family".to_string(), p.family.clone());
    if let Some(c) = &p.pipeline {
        metadata.insert("diffusers.pipeline".into(), c.clone());
    }
    if let Some(v) = &p.diffusers_version {
        metadata.insert("diffusers.version".into(), v.clone());
    }
    if let Some(pr) = p.prediction {
        metadata.insert("prediction_type".into(), pr.as_str().into());
    }
    if let Some((_, v)) = &p.vae {
        metadata.insert("vae.scaling_factor".into(), v.scaling_factor.to_string());
        metadata.insert("vae.shift_factor".into(), v.shift_factor.to_string());
    }
    Ok(Checkpoint {
        path: dir.to_path_buf(),
        format: SourceFormat::Diffusers,
        tensors,
        metadata,
        tokenizer: read_tokenizer(dir)?,
    })
}

/// A diffusers `ControlNetModel` folder (`config.json` and its weights at the
/// root): its config, and the weights file read with its tensors in diffusers naming.
pub(crate) fn controlnet(
    dir: &Path,
) -> Result<(crate::config::ControlConfig, PathBuf, Vec<SourceTensor>)> {
    let path = dir.join("config.json");
    let cfg = config::controlnet(&read_json(&path)?, &path)?;
    let (file, tensors) = load_weights(dir, DIFFUSERS_WEIGHTS)?;
    Ok((cfg, file, tensors))
}

/// Whether `dir` holds a diffusers `ControlNetModel` (its `config.json` says so).
pub fn is_controlnet(dir: &Path) -> bool {
    let path = dir.join("config.json");
    path.is_file()
        && read_json(&path)
            .is_ok_and(|v| v.get("_class_name").and_then(Value::as_str) == Some("ControlNetModel"))
}

/// A diffusers `ControlNetModel` config read from `path`.
pub(crate) fn controlnet_config(path: &Path) -> Result<crate::config::ControlConfig> {
    config::controlnet(&read_json(path)?, path)
}

/// Diffusers' names for old-style attention blocks (`AttentionBlock`, before diffusers
/// 0.14; the `google/ddpm-*` and `CompVis/ldm-*` repositories still hold them), mapped
/// to the current ones. Transformer blocks never had these names.
fn legacy_attention_name(name: &str) -> Option<String> {
    if !name.contains("attentions.") || name.contains(".transformer_blocks.") {
        return None;
    }
    [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ]
    .iter()
    .find(|(old, _)| name.contains(old))
    .map(|(old, new)| name.replacen(old, new, 1))
}

/// (safetensors stem, torch stem) of a component's weight files.
type Stems = (&'static str, &'static str);
const DIFFUSERS_WEIGHTS: Stems = ("diffusion_pytorch_model", "diffusion_pytorch_model");
const TRANSFORMERS_WEIGHTS: Stems = ("model", "pytorch_model");

/// Finds and reads the weights of one component: safetensors before torch files,
/// full precision before the `fp16` variant, a single file before a sharded index.
/// Returns the file (or index) read, for messages, and its tensors.
fn load_weights(cdir: &Path, (st, pt): Stems) -> Result<(PathBuf, Vec<SourceTensor>)> {
    let candidates = [
        format!("{st}.safetensors"),
        format!("{st}.safetensors.index.json"),
        format!("{st}.fp16.safetensors"),
        format!("{st}.safetensors.index.fp16.json"),
        format!("{pt}.bin"),
        format!("{pt}.bin.index.json"),
        format!("{pt}.fp16.bin"),
        format!("{pt}.bin.index.fp16.json"),
    ];
    for c in &candidates {
        let path = cdir.join(c);
        if path.is_file() {
            let tensors = if c.ends_with(".json") {
                read_sharded(&path)?
            } else {
                read_weight_file(&path)?
            };
            return Ok((path, tensors));
        }
    }
    Err(Error::format(
        cdir,
        format!("no weights file: expected one of {}", candidates.join(", ")),
    ))
}

fn read_weight_file(path: &Path) -> Result<Vec<SourceTensor>> {
    let (tensors, _) = if path.extension().is_some_and(|e| e == "safetensors") {
        super::safetensors::read_tensors(path)?
    } else {
        super::ckpt::read_tensors(path)?
    };
    Ok(tensors)
}

/// Reads the shards an index file (`weight_map`: tensor name → shard file) lists.
fn read_sharded(index: &Path) -> Result<Vec<SourceTensor>> {
    let v = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
    let mut shard_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(
                index,
                format!("`weight_map` entry for `{name}` is not a file name"),
            )
        })?;
        // Shards live beside the index; anything else would read outside the model.
        if file.contains(['/', '\\']) || file.starts_with('.') {
            return Err(Error::format(
                index,
                format!("shard name {file:?} is not a plain file name"),
            ));
        }
        shard_of.insert(name, file);
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<&str> = shard_of.values().copied().collect();
    files.sort_unstable();
    files.dedup();
    let mut out = Vec::new();
    for file in files {
        let path = dir.join(file);
        for t in read_weight_file(&path)? {
            match shard_of.remove(t.name.as_str()) {
                Some(f) if f == file => out.push(t),
                _ => {
                    return Err(Error::format(
                        &path,
                        format!(
                            "holds tensor `{}` which {} does not assign to it",
                            t.name,
                            index.display()
                        ),
                    ))
                }
            }
        }
    }
    if let Some((name, file)) = shard_of.iter().next() {
        return Err(Error::format(
            index,
            format!(
                "assigns `{name}` to {file}, which does not hold it ({} such tensors)",
                shard_of.len()
            ),
        ));
    }
    Ok(out)
}

/// The CLIP tokenizer files of the first tokenizer folder present (SDXL's two
/// encoders share one vocabulary).
fn read_tokenizer(dir: &Path) -> Result<Option<TokenizerFiles>> {
    for (_, tok) in TEXT_FOLDERS {
        let tdir = dir.join(tok);
        let read = |f: &str| -> Result<Option<String>> {
            let path = tdir.join(f);
            if path.is_file() {
                std::fs::read_to_string(&path)
                    .map(Some)
                    .map_err(|e| Error::io(&path, e))
            } else {
                Ok(None)
            }
        };
        let files = TokenizerFiles {
            vocab_json: read("vocab.json")?,
            merges_txt: read("merges.txt")?,
        };
        if files.vocab_json.is_some() || files.merges_txt.is_some() {
            return Ok(Some(files));
        }
    }
    Ok(None)
}
