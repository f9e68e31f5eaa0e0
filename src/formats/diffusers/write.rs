//! Writing a diffusers folder from canonical tensors.
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{json, Value};

use super::config::Depth;
use super::names;
use crate::config::{
    AttentionKind, Betas, ModelConfig, Prediction, TextEncoderConfig, UnetConfig, VaeConfig,
    CLIP_EOS,
};
use crate::error::{Error, Result};
use crate::formats::safetensors::{self, WriteSpec};
use crate::formats::source::{DType, TokenizerFiles};
use crate::network::{Op, Param};

/// Written as `_diffusers_version`: old enough that every recent diffusers loads the
/// configs without its compatibility paths, new enough to know every key written.
const DIFFUSERS_VERSION: &str = "0.30.0";
const TRANSFORMERS_VERSION: &str = "4.44.0";

/// Writes a complete diffusers folder for `cfg` into `dir` (created if needed; files
/// of the same names are replaced): `model_index.json`, `unet/`, `vae/`,
/// `text_encoder/` (and `text_encoder_2/`) with configs and `dtype` safetensors
/// weights, `scheduler/`, and `tokenizer/` (`tokenizer_2/`) when `tokenizer` holds
/// both the vocabulary and the merges.
///
/// `read(name)` returns the f32 values of a canonical tensor in row-major order. It is
/// called once per canonical tensor, one component file at a time, and only one
/// tensor's values are held at once. Every config is checked for what diffusers can
/// express before anything is written.
pub fn write(
    dir: &Path,
    cfg: &ModelConfig,
    dtype: DType,
    tokenizer: Option<&TokenizerFiles>,
    read: &mut dyn FnMut(&str) -> Result<Vec<f32>>,
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Invalid(format!(
            "diffusers weights can be written as F32, F16 or BF16, not {}",
            dtype.name()
        )));
    }
    if cfg.unet.style.attention == AttentionKind::SelfAttention {
        return write_ddpm(dir, cfg, dtype, read);
    }
    let vae = cfg.vae.as_ref().ok_or_else(|| {
        Error::Invalid("cannot write a diffusers folder: the model has no VAE".into())
    })?;
    let sdxl = cfg.unet.adm_in_channels.is_some();
    let text_folders: &[(&str, &str)] = match (sdxl, cfg.text_encoders.len()) {
        (_, 0) => &[],
        // A single-encoder SDXL model (the refiner) keeps its bigG tower as the second encoder.
        (true, 1) => &[("text_encoder_2", "tokenizer_2")],
        (_, 1) => &[("text_encoder", "tokenizer")],
        (_, 2) => &[
            ("text_encoder", "tokenizer"),
            ("text_encoder_2", "tokenizer_2"),
        ],
        (_, n) => {
            return Err(Error::Invalid(format!(
                "diffusers pipelines have at most two text encoders, the config has {n}"
            )))
        }
    };
    let invalid = |m: String| Error::Invalid(format!("cannot write a diffusers folder: {m}"));
    let (unet_cfg, aesthetic) = unet_json(cfg).map_err(invalid)?;
    let unet_plan = names::unet(&cfg.unet)?;
    let tokenizer =
        tokenizer.and_then(|t| Some((t.vocab_json.as_deref()?, t.merges_txt.as_deref()?)));
    let pad_names = match tokenizer {
        Some((vocab, _)) => cfg
            .text_encoders
            .iter()
            .map(|t| pad_name(vocab, t.pad_token).map(Some))
            .collect::<Result<Vec<_>>>()?,
        None => vec![None; cfg.text_encoders.len()],
    };

    mkdir(dir)?;
    write_component(
        &dir.join("unet"),
        &unet_cfg,
        "diffusion_pytorch_model.safetensors",
        &unet_plan,
        dtype,
        read,
    )?;
    write_component(
        &dir.join("vae"),
        &vae_json(vae),
        "diffusion_pytorch_model.safetensors",
        &names::vae(vae),
        dtype,
        read,
    )?;
    for (t, (te, _)) in cfg.text_encoders.iter().zip(text_folders) {
        write_component(
            &dir.join(te),
            &text_json(t, dtype),
            "model.safetensors",
            &names::text(t),
            dtype,
            read,
        )?;
    }
    if let Some((vocab, merges)) = tokenizer {
        for ((t, (_, tok)), pad) in cfg.text_encoders.iter().zip(text_folders).zip(&pad_names) {
            let tdir = dir.join(tok);
            mkdir(&tdir)?;
            let pad = pad.as_deref().unwrap_or("<|endoftext|>");
            write_file(&tdir.join("vocab.json"), vocab.as_bytes())?;
            write_file(&tdir.join("merges.txt"), merges.as_bytes())?;
            write_json(
                &tdir.join("special_tokens_map.json"),
                &json!({ "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad, "unk_token": "<|endoftext|>" }),
            )?;
            write_json(
                &tdir.join("tokenizer_config.json"),
                &json!({
                    "add_prefix_space": false, "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": true,
                    "do_lower_case": true, "eos_token": "<|endoftext|>", "errors": "replace",
                    "model_max_length": t.max_positions, "pad_token": pad, "tokenizer_class": "CLIPTokenizer",
                    "unk_token": "<|endoftext|>"
                }),
            )?;
        }
    }
    let sched = dir.join("scheduler");
    mkdir(&sched)?;
    write_json(
        &sched.join("scheduler_config.json"),
        &scheduler_json(cfg.prediction, cfg.zero_terminal_snr),
    )?;

    // The index goes last, so a folder with one is complete.
    let mut index = serde_json::Map::new();
    let pipeline = match (sdxl, text_folders.first()) {
        (true, Some(("text_encoder_2", _))) => "StableDiffusionXLImg2ImgPipeline",
        (true, _) => "StableDiffusionXLPipeline",
        (false, _) => "StableDiffusionPipeline",
    };
    index.insert("_class_name".into(), json!(pipeline));
    index.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
    index.insert("unet".into(), json!(["diffusers", "UNet2DConditionModel"]));
    index.insert("vae".into(), json!(["diffusers", "AutoencoderKL"]));
    index.insert(
        "scheduler".into(),
        json!(["diffusers", "EulerDiscreteScheduler"]),
    );
    for (t, (te, tok)) in cfg.text_encoders.iter().zip(text_folders) {
        index.insert(te.to_string(), json!(["transformers", text_class(t)]));
        index.insert(
            tok.to_string(),
            if tokenizer.is_some() {
                json!(["transformers", "CLIPTokenizer"])
            } else {
                json!([null, null])
            },
        );
    }
    if sdxl
        && text_folders
            .first()
            .is_some_and(|(te, _)| *te == "text_encoder_2")
    {
        index.insert("text_encoder".into(), json!([null, null]));
        index.insert("tokenizer".into(), json!([null, null]));
    }
    if sdxl {
        index.insert(
            "force_zeros_for_empty_prompt".into(),
            json!(cfg.zeros_for_empty_negative),
        );
        if aesthetic {
            index.insert("requires_aesthetics_score".into(), json!(true));
        }
    } else {
        index.insert("safety_checker".into(), json!([null, null]));
        index.insert("feature_extractor".into(), json!([null, null]));
        index.insert("requires_safety_checker".into(), json!(false));
    }
    write_json(&dir.join("model_index.json"), &Value::Object(index))
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    s.push('\n');
    write_file(path, s.as_bytes())
}

/// The token string of the pad id, as the tokenizer files must name it.
fn pad_name(vocab_json: &str, id: u32) -> Result<String> {
    let vocab: BTreeMap<String, u64> = serde_json::from_str(vocab_json)
        .map_err(|e| Error::Invalid(format!("tokenizer vocab.json: malformed: {e}")))?;
    vocab
        .into_iter()
        .find(|(_, v)| *v == u64::from(id))
        .map(|(k, _)| k)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "tokenizer vocab.json: no token has the pad id {id}"
            ))
        })
}

fn write_component(
    cdir: &Path,
    config: &Value,
    weights: &str,
    plan: &[Param],
    dtype: DType,
    read: &mut dyn FnMut(&str) -> Result<Vec<f32>>,
) -> Result<()> {
    mkdir(cdir)?;
    write_json(&cdir.join("config.json"), config)?;
    write_weights(&cdir.join(weights), plan, dtype, read)
}

/// Streams one safetensors file. Its own temporary file is renamed into place only
/// when complete, so an interrupted conversion never leaves a plausible-looking one.
fn write_weights(
    path: &Path,
    plan: &[Param],
    dtype: DType,
    read: &mut dyn FnMut(&str) -> Result<Vec<f32>>,
) -> Result<()> {
    let mut specs = Vec::new();
    let mut owner = Vec::new();
    for (ei, e) in plan.iter().enumerate() {
        let shape = e.part_shape();
        for (pi, d) in e.diffusers.iter().enumerate() {
            specs.push(WriteSpec {
                name: d.clone(),
                shape: shape.clone(),
                dtype,
            });
            owner.push((ei, pi));
        }
    }
    let parent = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".sdrs-")
        .suffix(".tmp")
        .tempfile_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    {
        let mut out = BufWriter::new(tmp.as_file_mut());
        // q, k and v of one OpenCLIP tensor are consecutive parts: read it once.
        let mut held: Option<(usize, Vec<f32>)> = None;
        let result = safetensors::write(&mut out, &specs, &BTreeMap::new(), |i, bytes| {
            let (ei, pi) = owner[i];
            let e = &plan[ei];
            let values = match held.take() {
                Some((held_ei, v)) if held_ei == ei => v,
                _ => {
                    let v = read(&e.canonical)?;
                    if v.len() != e.numel() {
                        return Err(Error::Invalid(format!(
                            "tensor `{}`: got {} values, its shape {:?} needs {}",
                            e.canonical,
                            v.len(),
                            e.shape,
                            e.numel()
                        )));
                    }
                    to_diffusers_order(e, v)
                }
            };
            let n = values.len() / e.diffusers.len();
            encode(&values[pi * n..(pi + 1) * n], dtype, bytes);
            if pi + 1 < e.diffusers.len() {
                held = Some((ei, values));
            }
            Ok(())
        });
        result.map_err(|err| match err {
            Error::Io { err: source, .. } => Error::io(path, source),
            other => other,
        })?;
        out.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

fn to_diffusers_order(e: &Param, v: Vec<f32>) -> Vec<f32> {
    match (e.op, e.shape.as_slice()) {
        (Op::Transpose, &[rows, cols]) => {
            let mut t = vec![0f32; v.len()];
            for i in 0..rows {
                for j in 0..cols {
                    t[j * rows + i] = v[i * cols + j];
                }
            }
            t
        }
        _ => v,
    }
}

fn encode(values: &[f32], dtype: DType, out: &mut Vec<u8>) {
    out.reserve(values.len() * 4);
    match dtype {
        DType::F16 => values
            .iter()
            .for_each(|&x| out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|&x| out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes())),
        _ => values
            .iter()
            .for_each(|&x| out.extend_from_slice(&x.to_le_bytes())),
    }
}

fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// A per-level value list as diffusers writes it: one integer when all agree.
fn compact(v: &[Depth]) -> Value {
    match v.first() {
        Some(first @ Depth::All(_)) if v.iter().all(|d| d == first) => first.to_json(),
        _ => Value::Array(v.iter().map(Depth::to_json).collect()),
    }
}

/// Pixel size the model was trained at, which diffusers pipelines use as the default.
fn sample_pixels(cfg: &ModelConfig) -> usize {
    match (cfg.unet.adm_in_channels.is_some(), cfg.prediction) {
        (true, _) => 1024,
        (false, Prediction::V) => 768,
        _ => 512,
    }
}

/// The UNet's `config.json`, and whether its added conditioning takes the aesthetic
/// score (five time ids, as SDXL's refiner) rather than a target size (six).
pub(super) fn unet_json(cfg: &ModelConfig) -> std::result::Result<(Value, bool), String> {
    let u: &UnetConfig = &cfg.unet;
    let levels = u.channel_mult.len();
    if u.down_blocks.len() != levels || u.up_blocks.len() != levels {
        return Err(format!(
            "the UNet has {levels} channel multipliers but {} down and {} up levels",
            u.down_blocks.len(),
            u.up_blocks.len()
        ));
    }
    let with_attn = |side: &str, i: usize, d: &[usize]| -> std::result::Result<bool, String> {
        match (d.iter().any(|&x| x > 0), d.iter().all(|&x| x > 0)) {
            (true, false) => Err(format!("{side} level {i} has ResNets with and without transformers; a diffusers block has them on all or none")),
            (any, _) => Ok(any),
        }
    };
    let down_attn = u
        .down_blocks
        .iter()
        .enumerate()
        .map(|(i, d)| with_attn("down", i, d))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let up_attn = u
        .up_blocks
        .iter()
        .enumerate()
        .map(|(i, d)| with_attn("up", i, d))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let layers: Vec<usize> = u.down_blocks.iter().map(Vec::len).collect();
    for (j, up) in u.up_blocks.iter().enumerate() {
        if up.len() != layers[levels - 1 - j] + 1 {
            return Err(format!(
                "up level {j} has {} ResNets; diffusers needs one more than its down level's {}",
                up.len(),
                layers[levels - 1 - j]
            ));
        }
    }
    let mid = u.mid_depth.filter(|&d| d > 0);
    // diffusers takes the middle block's depth from the last down level's entry, so a
    // level without transformers carries it (and 1, the default, otherwise).
    let tlpb: Vec<Depth> = (0..levels)
        .map(|l| match (down_attn[l], l + 1 == levels) {
            (true, _) => Depth::of(&u.down_blocks[l]),
            (false, true) => Depth::All(mid.unwrap_or(1)),
            (false, false) => Depth::All(1),
        })
        .collect();
    if let (Some(m), Some(first)) = (mid, tlpb[levels - 1].first()) {
        if m != first {
            return Err(format!("the middle block has depth {m} but the last down level starts with {first}; diffusers ties them together"));
        }
    }
    let default_up_matches = tlpb.iter().all(|d| matches!(d, Depth::All(_)))
        && (0..levels).all(|j| {
            !up_attn[j]
                || u.up_blocks[j]
                    .iter()
                    .all(|&x| Some(x) == tlpb[levels - 1 - j].first())
        });
    let reverse: Option<Vec<Depth>> = (!default_up_matches).then(|| {
        (0..levels)
            .map(|j| {
                if up_attn[j] {
                    Depth::PerLayer(u.up_blocks[j].clone())
                } else {
                    Depth::PerLayer(vec![1; u.up_blocks[j].len()])
                }
            })
            .collect()
    });

    let channels: Vec<usize> = u
        .channel_mult
        .iter()
        .map(|m| m * u.model_channels)
        .collect();
    let heads = match u.num_heads {
        Some(n) => json!(n),
        None => json!(channels.iter().map(|&c| u.heads_for(c)).collect::<Vec<_>>()),
    };
    let mid_type = match u.mid_depth {
        None => Value::Null,
        Some(0) => json!("UNetMidBlock2D"),
        Some(_) => json!("UNetMidBlock2DCrossAttn"),
    };
    let (mut aesthetic, mut time_dim) = (false, Value::Null);
    if u.adm_in_channels.is_some() {
        let mut c = cfg.clone();
        c.infer_time_ids()?;
        aesthetic = c
            .unet
            .time_ids
            .contains(&crate::config::TimeId::AestheticScore);
        time_dim = json!(c.unet.time_id_dim);
    }
    let mut m = serde_json::Map::new();
    let mut set = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    set("_class_name", json!("UNet2DConditionModel"));
    set("_diffusers_version", json!(DIFFUSERS_VERSION));
    set("act_fn", json!("silu"));
    set(
        "addition_embed_type",
        if u.adm_in_channels.is_some() {
            json!("text_time")
        } else {
            Value::Null
        },
    );
    set("addition_embed_type_num_heads", json!(64));
    set("addition_time_embed_dim", time_dim);
    set("attention_head_dim", heads);
    set("block_out_channels", json!(channels));
    set("center_input_sample", json!(false));
    set("class_embed_type", Value::Null);
    set("conv_in_kernel", json!(3));
    set("conv_out_kernel", json!(3));
    set("cross_attention_dim", json!(u.context_dim));
    set(
        "down_block_types",
        json!(down_attn
            .iter()
            .map(|&a| if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            })
            .collect::<Vec<_>>()),
    );
    set("downsample_padding", json!(1));
    set("dual_cross_attention", json!(false));
    set("flip_sin_to_cos", json!(true));
    set("freq_shift", json!(0));
    set("in_channels", json!(u.in_channels));
    set(
        "layers_per_block",
        if layers.iter().all(|&n| n == layers[0]) {
            json!(layers[0])
        } else {
            json!(layers)
        },
    );
    set("mid_block_scale_factor", json!(1));
    set("mid_block_type", mid_type);
    set("norm_eps", json!(1e-5));
    set("norm_num_groups", json!(32));
    set("num_class_embeds", Value::Null);
    set("only_cross_attention", json!(false));
    set("out_channels", json!(u.out_channels));
    set(
        "projection_class_embeddings_input_dim",
        json!(u.adm_in_channels),
    );
    set("resnet_time_scale_shift", json!("default"));
    set(
        "sample_size",
        json!(sample_pixels(cfg) / cfg.vae.as_ref().map_or(1, VaeConfig::downscale)),
    );
    set("time_cond_proj_dim", json!(u.time_cond_proj_dim));
    set("transformer_layers_per_block", compact(&tlpb));
    if let Some(r) = reverse {
        set(
            "reverse_transformer_layers_per_block",
            Value::Array(r.iter().map(Depth::to_json).collect()),
        );
    }
    set(
        "up_block_types",
        json!(up_attn
            .iter()
            .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
            .collect::<Vec<_>>()),
    );
    set("upcast_attention", json!(false));
    set("use_linear_projection", json!(u.linear_proj));
    Ok((Value::Object(m), aesthetic))
}

fn vae_json(v: &VaeConfig) -> Value {
    let channels: Vec<usize> = v.channel_mult.iter().map(|m| m * v.base_channels).collect();
    let mut m = json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; channels.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; channels.len()],
        "force_upcast": true,
        "in_channels": v.in_channels,
        "out_channels": v.in_channels,
        "latent_channels": v.latent_channels,
        "layers_per_block": v.num_res_blocks,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": v.scaling_factor,
    });
    // Only diffusers versions that know `shift_factor` can honour a non-zero one.
    if v.shift_factor != 0.0 {
        m["shift_factor"] = json!(v.shift_factor);
    }
    m
}

fn text_class(t: &TextEncoderConfig) -> &'static str {
    if t.projection_dim.is_some() {
        "CLIPTextModelWithProjection"
    } else {
        "CLIPTextModel"
    }
}

fn text_json(t: &TextEncoderConfig, dtype: DType) -> Value {
    json!({
        "architectures": [text_class(t)],
        "attention_dropout": 0.0,
        "bos_token_id": CLIP_EOS - 1,
        "dropout": 0.0,
        "eos_token_id": CLIP_EOS,
        "hidden_act": t.activation.as_str(),
        "hidden_size": t.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": t.max_positions,
        "model_type": "clip_text_model",
        "num_attention_heads": t.num_heads,
        "num_hidden_layers": t.num_layers,
        "pad_token_id": t.pad_token,
        "projection_dim": t.projection_dim.unwrap_or(t.hidden_size),
        "torch_dtype": torch_dtype(dtype),
        "transformers_version": TRANSFORMERS_VERSION,
        "vocab_size": t.vocab_size,
    })
}

/// A `DDPMPipeline` folder: the `UNet2DModel` and a `DDPMScheduler` with the model's
/// schedule; for a score model, a `ScoreSdeVePipeline` with its `ScoreSdeVeScheduler`.
fn write_ddpm(
    dir: &Path,
    cfg: &ModelConfig,
    dtype: DType,
    read: &mut dyn FnMut(&str) -> Result<Vec<f32>>,
) -> Result<()> {
    if cfg.vae.is_some() || !cfg.text_encoders.is_empty() {
        return Err(Error::Invalid(
            "cannot write a diffusers folder: a UNet2DModel with a VAE or text encoders has no diffusers pipeline".into(),
        ));
    }
    let unet = unet2d_json(&cfg.unet)
        .map_err(|m| Error::Invalid(format!("cannot write a diffusers folder: {m}")))?;
    let plan = names::unet(&cfg.unet)?;
    mkdir(dir)?;
    write_component(
        &dir.join("unet"),
        &unet,
        "diffusion_pytorch_model.safetensors",
        &plan,
        dtype,
        read,
    )?;
    let sched = dir.join("scheduler");
    mkdir(&sched)?;
    let sc = &cfg.schedule;
    if let Some(v) = &sc.ve {
        write_json(
            &sched.join("scheduler_config.json"),
            &json!({
                "_class_name": "ScoreSdeVeScheduler",
                "_diffusers_version": DIFFUSERS_VERSION,
                "correct_steps": v.correct_steps,
                "num_train_timesteps": sc.train_steps,
                "sampling_eps": shortest(v.sampling_eps),
                "sigma_max": shortest(v.sigma_max),
                "sigma_min": shortest(v.sigma_min),
                "snr": shortest(v.snr),
            }),
        )?;
        return write_json(
            &dir.join("model_index.json"),
            &json!({
                "_class_name": "ScoreSdeVePipeline",
                "_diffusers_version": DIFFUSERS_VERSION,
                "scheduler": ["diffusers", "ScoreSdeVeScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            }),
        );
    }
    let (kind, start, end) = match sc.betas {
        Betas::Linear { start, end } => ("linear", start, end),
        Betas::ScaledLinear { start, end } => ("scaled_linear", start, end),
        Betas::SquaredCos => ("squaredcos_cap_v2", 0.0001, 0.02),
    };
    let mut s = json!({
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": end,
        "beta_schedule": kind,
        "beta_start": start,
        "clip_sample": sc.clip_sample.is_some(),
        "clip_sample_range": sc.clip_sample.unwrap_or(1.0),
        "num_train_timesteps": sc.train_steps,
        "prediction_type": cfg.prediction.as_str(),
        "steps_offset": sc.steps_offset,
        "trained_betas": null,
        "variance_type": sc.variance.as_str(),
    });
    if let (Some(one), Some(m)) = (sc.set_alpha_to_one, s.as_object_mut()) {
        m.insert("set_alpha_to_one".into(), json!(one));
    }
    write_json(&sched.join("scheduler_config.json"), &s)?;
    // The index goes last, so a folder with one is complete.
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "DDPMPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        }),
    )
}

/// `v` as the shortest decimal that reads back as it (1e-6, not 9.99999997e-7).
fn shortest(v: f32) -> Value {
    json!(v.to_string().parse::<f64>().unwrap_or(f64::from(v)))
}

/// A `UNet2DModel`'s `config.json` (the inverse of the reader's `unet2d`).
fn unet2d_json(u: &UnetConfig) -> std::result::Result<Value, String> {
    let st = &u.style;
    let layers = u.down_blocks.first().map_or(0, Vec::len);
    let uniform = u.down_blocks.iter().all(|l| l.len() == layers)
        && u.up_blocks.iter().all(|l| l.len() == layers + 1);
    let attn = |l: &[usize]| l.last().is_some_and(|&d| d > 0);
    // An NCSN++ up level has its attention after the last ResNet only.
    let attn_pattern = |l: &[usize]| {
        l.iter()
            .enumerate()
            .all(|(i, &d)| (d > 0) == (attn(l) && (!st.skip || i + 1 == l.len())))
    };
    if !uniform
        || !u.up_blocks.iter().all(|l| attn_pattern(l))
        || u.down_blocks
            .iter()
            .any(|l| l.iter().any(|&d| d > 0) != attn(l))
    {
        return Err("a UNet2DModel has the same ResNet count on every level and attention after all of a level's ResNets or none".into());
    }
    let skip = if st.skip { "Skip" } else { "" };
    let block =
        |attn: bool, dir: &str| format!("{}{skip}{dir}Block2D", if attn { "Attn" } else { "" });
    let head_dim = match (u.num_heads, u.head_dim) {
        (Some(1), _) => Value::Null,
        (None, Some(d)) => json!(d),
        _ => return Err("a UNet2DModel's heads are given by their width, or one per block".into()),
    };
    Ok(json!({
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "add_attention": u.mid_depth.unwrap_or(0) > 0,
        "attention_head_dim": head_dim,
        "block_out_channels": u.channel_mult.iter().map(|m| m * u.model_channels).collect::<Vec<_>>(),
        "center_input_sample": false,
        "down_block_types": u.down_blocks.iter().map(|l| block(attn(l), "Down")).collect::<Vec<_>>(),
        "downsample_padding": st.downsample_padding,
        "flip_sin_to_cos": st.flip_sin_to_cos,
        "freq_shift": shortest(st.freq_shift),
        "in_channels": u.in_channels,
        "layers_per_block": layers,
        "mid_block_scale_factor": shortest(st.mid_scale),
        "norm_eps": shortest(st.norm_eps),
        "norm_num_groups": st.norm_groups,
        "num_class_embeds": st.num_classes,
        "out_channels": u.out_channels,
        "time_embedding_type": st.time_embedding.as_str(),
        "up_block_types": u.up_blocks.iter().map(|l| block(attn(l), "Up")).collect::<Vec<_>>(),
    }))
}

fn scheduler_json(p: Prediction, zero_terminal_snr: bool) -> Value {
    json!({
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": p.as_str(),
        "rescale_betas_zero_snr": zero_terminal_snr,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
        "use_karras_sigmas": false,
    })
}
