//! The metadata keys sdrs writes into a GGUF, and how they are read back.
//! `docs/gguf.md` documents every key.
use std::collections::HashMap;

use crate::config::{
    Activation, AttentionKind, Betas, ControlConfig, Defaults, ModelConfig, NoiseSchedule,
    Prediction, TextEncoderConfig, TextEncoderKind, TimeEmbedding, TimeId, UnetConfig, UnetStyle,
    UpscalerArch, VaeConfig, Variance, VeSde,
};
use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, Value};
use crate::vocab::ClipVocab;

pub const ARCHITECTURE: &str = "stable-diffusion";
/// Names and original (PyTorch-order) shapes of tensors stored with another shape
/// (convolution kernels flattened to 2-D matrices).
pub const RESHAPED_NAMES: &str = "sd.reshaped.names";
/// Four u32 per name in `RESHAPED_NAMES`, outermost first (only 4-D kernels are reshaped).
pub const RESHAPED_SHAPES: &str = "sd.reshaped.shapes";

type Kv = Vec<(String, Value)>;

fn put(kv: &mut Kv, k: impl Into<String>, v: Value) {
    kv.push((k.into(), v));
}

fn flatten(blocks: &[Vec<usize>]) -> (Value, Value) {
    (
        Value::u32_array(blocks.iter().map(Vec::len)),
        Value::u32_array(blocks.iter().flatten().copied()),
    )
}

/// The `sd.unet.*` keys of `u`.
fn unet_kv(kv: &mut Kv, u: &UnetConfig) {
    let p = "sd.unet.";
    put(
        kv,
        format!("{p}in_channels"),
        Value::U32(u.in_channels as u32),
    );
    put(
        kv,
        format!("{p}out_channels"),
        Value::U32(u.out_channels as u32),
    );
    put(
        kv,
        format!("{p}model_channels"),
        Value::U32(u.model_channels as u32),
    );
    put(
        kv,
        format!("{p}channel_mult"),
        Value::u32_array(u.channel_mult.iter().copied()),
    );
    let (c, d) = flatten(&u.down_blocks);
    put(kv, format!("{p}down_blocks.resnets"), c);
    put(kv, format!("{p}down_blocks.depths"), d);
    let (c, d) = flatten(&u.up_blocks);
    put(kv, format!("{p}up_blocks.resnets"), c);
    put(kv, format!("{p}up_blocks.depths"), d);
    put(
        kv,
        format!("{p}mid_depth"),
        Value::I32(u.mid_depth.map_or(-1, |d| d as i32)),
    );
    put(
        kv,
        format!("{p}num_heads"),
        Value::U32(u.num_heads.unwrap_or(0) as u32),
    );
    put(
        kv,
        format!("{p}head_dim"),
        Value::U32(u.head_dim.unwrap_or(0) as u32),
    );
    put(
        kv,
        format!("{p}context_dim"),
        Value::U32(u.context_dim as u32),
    );
    put(kv, format!("{p}linear_proj"), Value::Bool(u.linear_proj));
    put(
        kv,
        format!("{p}adm_in_channels"),
        Value::U32(u.adm_in_channels.unwrap_or(0) as u32),
    );
    put(
        kv,
        format!("{p}time_cond_proj_dim"),
        Value::U32(u.time_cond_proj_dim.unwrap_or(0) as u32),
    );
    if !u.time_ids.is_empty() {
        put(
            kv,
            format!("{p}time_ids"),
            Value::string_array(u.time_ids.iter().map(|t| t.as_str().to_string())),
        );
        put(
            kv,
            format!("{p}time_id_dim"),
            Value::U32(u.time_id_dim as u32),
        );
    }
    let st = &u.style;
    let p = "sd.unet.";
    put(
        kv,
        format!("{p}attention"),
        Value::String(st.attention.as_str().into()),
    );
    put(
        kv,
        format!("{p}norm_groups"),
        // 0: each norm's own min(channels / 4, 32).
        Value::U32(st.norm_groups.unwrap_or(0) as u32),
    );
    put(
        kv,
        format!("{p}time_embedding"),
        Value::String(st.time_embedding.as_str().into()),
    );
    put(kv, format!("{p}skip"), Value::Bool(st.skip));
    put(kv, format!("{p}mid_scale"), Value::F32(st.mid_scale));
    put(kv, format!("{p}norm_eps"), Value::F32(st.norm_eps));
    put(
        kv,
        format!("{p}flip_sin_to_cos"),
        Value::Bool(st.flip_sin_to_cos),
    );
    put(kv, format!("{p}freq_shift"), Value::F32(st.freq_shift));
    put(
        kv,
        format!("{p}downsample_padding"),
        Value::U32(st.downsample_padding as u32),
    );
    put(
        kv,
        format!("{p}num_classes"),
        Value::U32(st.num_classes.unwrap_or(0) as u32),
    );
}

/// Marks an upscaler's GGUF (ESRGAN family).
pub const UPSCALER_ARCHITECTURE: &str = "sd-upscaler";

/// An upscaler's network → metadata: `sd.upscaler.network` (`rrdbnet` or
/// `srvgg_compact`) and its sizes.
pub fn upscaler_kv(a: &UpscalerArch) -> Kv {
    let mut kv = Kv::new();
    put(
        &mut kv,
        "general.architecture",
        Value::String(UPSCALER_ARCHITECTURE.into()),
    );
    let p = "sd.upscaler.";
    let (network, sizes): (&str, Vec<(&str, usize)>) = match *a {
        UpscalerArch::Rrdb {
            features,
            blocks,
            grow,
            unshuffle,
            doublings,
        } => (
            "rrdbnet",
            vec![
                ("features", features),
                ("blocks", blocks),
                ("grow", grow),
                ("unshuffle", unshuffle),
                ("doublings", doublings),
            ],
        ),
        UpscalerArch::Compact {
            features,
            convs,
            scale,
        } => (
            "srvgg_compact",
            vec![("features", features), ("convs", convs), ("scale", scale)],
        ),
    };
    put(
        &mut kv,
        format!("{p}network"),
        Value::String(network.into()),
    );
    for (k, v) in sizes {
        put(&mut kv, format!("{p}{k}"), Value::U32(v as u32));
    }
    kv
}

/// The upscaler network of a GGUF written with [`upscaler_kv`]; `None` for any
/// other file.
pub fn read_upscaler(g: &GgufFile) -> Result<Option<UpscalerArch>> {
    if g.get("general.architecture").and_then(Value::as_str) != Some(UPSCALER_ARCHITECTURE) {
        return Ok(None);
    }
    let r = Reader { g };
    let p = "sd.upscaler.";
    let n = |k: &str| -> Result<usize> {
        let key = format!("{p}{k}");
        let v = r.usize(&key)?;
        crate::config::limits::within(&key, v, crate::config::limits::WIDTH)
            .map_err(|e| r.err(&key, &e))?;
        Ok(v)
    };
    let key = format!("{p}network");
    Ok(Some(match r.str(&key)?.as_str() {
        "rrdbnet" => UpscalerArch::Rrdb {
            features: n("features")?,
            blocks: n("blocks")?,
            grow: n("grow")?,
            unshuffle: n("unshuffle")?,
            doublings: n("doublings")?,
        },
        "srvgg_compact" => UpscalerArch::Compact {
            features: n("features")?,
            convs: n("convs")?,
            scale: n("scale")?,
        },
        _ => return Err(r.err(&key, "not rrdbnet or srvgg_compact")),
    }))
}

/// Marks a ControlNet's GGUF, which a model loader must not take for a model.
pub const CONTROL_ARCHITECTURE: &str = "sd-controlnet";

/// A ControlNet's config → metadata: its encoder as `sd.unet.*` (no up path) and
/// the conditioning embedding as `sd.control.*`.
pub fn control_kv(c: &ControlConfig) -> Kv {
    let mut kv = Kv::new();
    put(
        &mut kv,
        "general.architecture",
        Value::String(CONTROL_ARCHITECTURE.into()),
    );
    put(&mut kv, "sd.family", Value::String(c.family.clone()));
    unet_kv(&mut kv, &c.unet);
    put(
        &mut kv,
        "sd.control.hint_channels",
        Value::U32(c.hint_channels as u32),
    );
    put(
        &mut kv,
        "sd.control.embedding_channels",
        Value::u32_array(c.embedding_channels.iter().copied()),
    );
    kv
}

/// The ControlNet config of a GGUF written by [`control_kv`]; `None` for any
/// other file.
pub fn read_control(g: &GgufFile) -> Result<Option<ControlConfig>> {
    if g.get("general.architecture").and_then(Value::as_str) != Some(CONTROL_ARCHITECTURE) {
        return Ok(None);
    }
    let r = Reader { g };
    let c = ControlConfig {
        family: r.str("sd.family")?,
        unet: r.unet()?,
        hint_channels: r.usize("sd.control.hint_channels")?,
        embedding_channels: r.list("sd.control.embedding_channels")?,
    };
    c.check_sizes()
        .map_err(|e| Error::format(&g.path, format!("metadata: {e}")))?;
    Ok(Some(c))
}

/// Architecture config → metadata.
pub fn config_kv(cfg: &ModelConfig) -> Kv {
    let mut kv = Kv::new();
    put(
        &mut kv,
        "general.architecture",
        Value::String(ARCHITECTURE.into()),
    );
    put(&mut kv, "sd.family", Value::String(cfg.family.clone()));
    put(
        &mut kv,
        "sd.prediction",
        Value::String(cfg.prediction.as_str().into()),
    );
    put(
        &mut kv,
        "sd.zero_terminal_snr",
        Value::Bool(cfg.zero_terminal_snr),
    );
    put(
        &mut kv,
        "sd.zeros_for_empty_negative",
        Value::Bool(cfg.zeros_for_empty_negative),
    );
    unet_kv(&mut kv, &cfg.unet);
    let sc = &cfg.schedule;
    let p = "sd.schedule.";
    let (kind, start, end) = match sc.betas {
        Betas::Linear { start, end } => ("linear", start, end),
        Betas::ScaledLinear { start, end } => ("scaled_linear", start, end),
        Betas::SquaredCos => ("squaredcos_cap_v2", 0.0, 0.0),
    };
    put(&mut kv, format!("{p}betas"), Value::String(kind.into()));
    put(&mut kv, format!("{p}beta_start"), Value::F64(start));
    put(&mut kv, format!("{p}beta_end"), Value::F64(end));
    put(
        &mut kv,
        format!("{p}train_steps"),
        Value::U32(sc.train_steps as u32),
    );
    put(
        &mut kv,
        format!("{p}clip_sample"),
        Value::F32(sc.clip_sample.unwrap_or(0.0)),
    );
    put(
        &mut kv,
        format!("{p}variance"),
        Value::String(sc.variance.as_str().into()),
    );
    put(
        &mut kv,
        format!("{p}steps_offset"),
        Value::U32(sc.steps_offset as u32),
    );
    if let Some(one) = sc.set_alpha_to_one {
        put(&mut kv, format!("{p}set_alpha_to_one"), Value::Bool(one));
    }
    if let Some(v) = &sc.ve {
        let p = "sd.schedule.ve.";
        put(&mut kv, format!("{p}sigma_min"), Value::F32(v.sigma_min));
        put(&mut kv, format!("{p}sigma_max"), Value::F32(v.sigma_max));
        put(&mut kv, format!("{p}snr"), Value::F32(v.snr));
        put(
            &mut kv,
            format!("{p}sampling_eps"),
            Value::F32(v.sampling_eps),
        );
        put(
            &mut kv,
            format!("{p}correct_steps"),
            Value::U32(v.correct_steps as u32),
        );
    }
    if let Some(v) = &cfg.vae {
        let p = "sd.vae.";
        put(
            &mut kv,
            format!("{p}in_channels"),
            Value::U32(v.in_channels as u32),
        );
        put(
            &mut kv,
            format!("{p}latent_channels"),
            Value::U32(v.latent_channels as u32),
        );
        put(
            &mut kv,
            format!("{p}base_channels"),
            Value::U32(v.base_channels as u32),
        );
        put(
            &mut kv,
            format!("{p}channel_mult"),
            Value::u32_array(v.channel_mult.iter().copied()),
        );
        put(
            &mut kv,
            format!("{p}num_res_blocks"),
            Value::U32(v.num_res_blocks as u32),
        );
        put(
            &mut kv,
            format!("{p}scaling_factor"),
            Value::F32(v.scaling_factor),
        );
        put(
            &mut kv,
            format!("{p}shift_factor"),
            Value::F32(v.shift_factor),
        );
        if let Some(n) = v.codebook {
            put(&mut kv, format!("{p}codebook"), Value::U32(n as u32));
        }
    }
    put(
        &mut kv,
        "sd.text_encoder.count",
        Value::U32(cfg.text_encoders.len() as u32),
    );
    for (i, t) in cfg.text_encoders.iter().enumerate() {
        let p = format!("sd.text_encoder.{i}.");
        let kind = match t.kind {
            TextEncoderKind::HfClip => "hf_clip",
            TextEncoderKind::OpenClip => "open_clip",
        };
        put(&mut kv, format!("{p}kind"), Value::String(kind.into()));
        put(
            &mut kv,
            format!("{p}prefix"),
            Value::String(t.prefix.clone()),
        );
        put(
            &mut kv,
            format!("{p}vocab_size"),
            Value::U32(t.vocab_size as u32),
        );
        put(
            &mut kv,
            format!("{p}max_positions"),
            Value::U32(t.max_positions as u32),
        );
        put(
            &mut kv,
            format!("{p}hidden_size"),
            Value::U32(t.hidden_size as u32),
        );
        put(
            &mut kv,
            format!("{p}num_layers"),
            Value::U32(t.num_layers as u32),
        );
        put(
            &mut kv,
            format!("{p}num_heads"),
            Value::U32(t.num_heads as u32),
        );
        put(
            &mut kv,
            format!("{p}intermediate_size"),
            Value::U32(t.intermediate_size as u32),
        );
        put(
            &mut kv,
            format!("{p}activation"),
            Value::String(t.activation.as_str().into()),
        );
        put(
            &mut kv,
            format!("{p}projection_dim"),
            Value::U32(t.projection_dim.unwrap_or(0) as u32),
        );
        put(
            &mut kv,
            format!("{p}skip_layers"),
            Value::U32(t.skip_layers as u32),
        );
        put(&mut kv, format!("{p}final_norm"), Value::Bool(t.final_norm));
        put(&mut kv, format!("{p}pad_token"), Value::U32(t.pad_token));
    }
    kv
}

/// Tokenizer → metadata, under the key names llama.cpp uses for BPE vocabularies.
pub fn tokenizer_kv(v: &ClipVocab) -> Kv {
    vec![
        ("tokenizer.ggml.model".into(), Value::String("clip".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::string_array(v.tokens.iter().cloned()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::string_array(v.merges.iter().cloned()),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32((v.tokens.len() - 2) as u32),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32((v.tokens.len() - 1) as u32),
        ),
    ]
}

/// Reads the tokenizer back, if the file has one.
pub fn read_tokenizer(g: &GgufFile) -> Option<ClipVocab> {
    let strings = |k: &str| -> Option<Vec<String>> {
        g.get(k)?
            .as_array()?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    Some(ClipVocab {
        tokens: strings("tokenizer.ggml.tokens")?,
        merges: strings("tokenizer.ggml.merges")?,
    })
}

pub fn reshaped_kv(list: &[(String, Vec<usize>)]) -> Kv {
    if list.is_empty() {
        return Kv::new();
    }
    let shapes = list.iter().flat_map(|(_, s)| s.iter().copied());
    vec![
        (
            RESHAPED_NAMES.into(),
            Value::string_array(list.iter().map(|(n, _)| n.clone())),
        ),
        (RESHAPED_SHAPES.into(), Value::u32_array(shapes)),
    ]
}

/// Original shapes of reshaped tensors (empty for files without the table).
pub fn original_shapes(g: &GgufFile) -> HashMap<String, Vec<usize>> {
    let (Some(names), Some(shapes)) = (
        g.get(RESHAPED_NAMES).and_then(Value::as_array),
        g.get(RESHAPED_SHAPES).and_then(Value::as_array),
    ) else {
        return HashMap::new();
    };
    let dims: Vec<usize> = shapes
        .iter()
        .filter_map(|v| v.as_u64().map(|x| x as usize))
        .collect();
    names
        .iter()
        .zip(dims.chunks_exact(4))
        .filter_map(|(n, s)| Some((n.as_str()?.to_string(), s.to_vec())))
        .collect()
}

struct Reader<'a> {
    g: &'a GgufFile,
}

impl Reader<'_> {
    fn err(&self, key: &str, what: &str) -> Error {
        Error::format(&self.g.path, format!("metadata `{key}` is {what}"))
    }
    fn get(&self, key: &str) -> Result<&Value> {
        self.g.get(key).ok_or_else(|| self.err(key, "missing"))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.get(key)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| self.err(key, "not an unsigned integer"))
    }
    fn opt(&self, key: &str) -> Result<Option<usize>> {
        Ok(Some(self.usize(key)?).filter(|&v| v > 0))
    }
    fn f32(&self, key: &str) -> Result<f32> {
        self.get(key)?
            .as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| self.err(key, "not a number"))
    }
    fn bool(&self, key: &str) -> Result<bool> {
        self.get(key)?
            .as_bool()
            .ok_or_else(|| self.err(key, "not a bool"))
    }
    fn str(&self, key: &str) -> Result<String> {
        self.get(key)?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.err(key, "not a string"))
    }
    fn list(&self, key: &str) -> Result<Vec<usize>> {
        self.get(key)?
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| self.err(key, "not an integer array"))
    }
    /// Absent in files written before the key existed: SD's.
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.g.get(key) {
            None => Ok(default),
            Some(_) => self.usize(key),
        }
    }
    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.g.get(key) {
            None => Ok(default),
            Some(_) => self.f32(key),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.g.get(key) {
            None => Ok(default),
            Some(_) => self.bool(key),
        }
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)?
            .as_f64()
            .ok_or_else(|| self.err(key, "not a number"))
    }

    /// The `sd.unet.*` keys.
    fn unet(&self) -> Result<UnetConfig> {
        let p = "sd.unet.";
        let mid = self
            .get(&format!("{p}mid_depth"))?
            .as_i64()
            .ok_or_else(|| self.err("sd.unet.mid_depth", "not an integer"))?;
        Ok(UnetConfig {
            in_channels: self.usize(&format!("{p}in_channels"))?,
            out_channels: self.usize(&format!("{p}out_channels"))?,
            model_channels: self.usize(&format!("{p}model_channels"))?,
            channel_mult: self.list(&format!("{p}channel_mult"))?,
            down_blocks: self.blocks(&format!("{p}down_blocks"))?,
            up_blocks: self.blocks(&format!("{p}up_blocks"))?,
            mid_depth: usize::try_from(mid).ok(),
            num_heads: self.opt(&format!("{p}num_heads"))?,
            head_dim: self.opt(&format!("{p}head_dim"))?,
            context_dim: self.usize(&format!("{p}context_dim"))?,
            linear_proj: self.bool(&format!("{p}linear_proj"))?,
            adm_in_channels: self.opt(&format!("{p}adm_in_channels"))?,
            time_cond_proj_dim: self.opt(&format!("{p}time_cond_proj_dim"))?,
            time_ids: match self.g.get(&format!("{p}time_ids")) {
                None => Vec::new(),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_str().and_then(TimeId::parse)).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| self.err("sd.unet.time_ids", "not a list of original_size, crop_coords_top_left, target_size, aesthetic_score"))?,
            },
            time_id_dim: match self.g.get(&format!("{p}time_id_dim")) {
                None => 0,
                Some(_) => self.usize(&format!("{p}time_id_dim"))?,
            },
            style: self.style()?,
        })
    }

    /// The UNet's `sd.unet.*` style keys; files written before them hold SD UNets.
    fn style(&self) -> Result<UnetStyle> {
        let d = UnetStyle::default();
        let p = "sd.unet.";
        let attention = match self.g.get(&format!("{p}attention")) {
            None => d.attention,
            Some(_) => {
                let key = format!("{p}attention");
                AttentionKind::parse(&self.str(&key)?)
                    .ok_or_else(|| self.err(&key, "not transformer or self_attention"))?
            }
        };
        let key = format!("{p}time_embedding");
        let time_embedding = match self.g.get(&key) {
            None => d.time_embedding,
            Some(_) => TimeEmbedding::parse(&self.str(&key)?)
                .ok_or_else(|| self.err(&key, "not positional or fourier"))?,
        };
        Ok(UnetStyle {
            attention,
            norm_groups: match self.usize_or(&format!("{p}norm_groups"), 32)? {
                0 => None,
                n => Some(n),
            },
            time_embedding,
            skip: self.bool_or(&format!("{p}skip"), d.skip)?,
            mid_scale: self.f32_or(&format!("{p}mid_scale"), d.mid_scale)?,
            norm_eps: self.f32_or(&format!("{p}norm_eps"), d.norm_eps)?,
            flip_sin_to_cos: self.bool_or(&format!("{p}flip_sin_to_cos"), d.flip_sin_to_cos)?,
            freq_shift: self.f32_or(&format!("{p}freq_shift"), d.freq_shift)?,
            downsample_padding: self
                .usize_or(&format!("{p}downsample_padding"), d.downsample_padding)?,
            num_classes: Some(self.usize_or(&format!("{p}num_classes"), 0)?).filter(|&n| n > 0),
        })
    }

    /// The `sd.schedule.*` keys; files written before them hold SD models.
    fn schedule(&self) -> Result<NoiseSchedule> {
        let d = NoiseSchedule::default();
        let p = "sd.schedule.";
        let key = format!("{p}betas");
        let key_betas = key.clone();
        let betas = match self.g.get(&key) {
            None => d.betas,
            Some(_) => {
                let range = || -> Result<(f64, f64)> {
                    Ok((
                        self.f64(&format!("{p}beta_start"))?,
                        self.f64(&format!("{p}beta_end"))?,
                    ))
                };
                match self.str(&key)?.as_str() {
                    "linear" => {
                        let (start, end) = range()?;
                        Betas::Linear { start, end }
                    }
                    "scaled_linear" => {
                        let (start, end) = range()?;
                        Betas::ScaledLinear { start, end }
                    }
                    "squaredcos_cap_v2" => Betas::SquaredCos,
                    _ => {
                        return Err(self.err(&key, "not linear, scaled_linear or squaredcos_cap_v2"))
                    }
                }
            }
        };
        let key = format!("{p}variance");
        let variance = match self.g.get(&key) {
            None => d.variance,
            Some(_) => Variance::parse(&self.str(&key)?)
                .ok_or_else(|| self.err(&key, "not fixed_small or fixed_large"))?,
        };
        let clip = self.f32_or(&format!("{p}clip_sample"), 0.0)?;
        Ok(NoiseSchedule {
            betas,
            train_steps: self.usize_or(&format!("{p}train_steps"), d.train_steps)?,
            clip_sample: Some(clip).filter(|&c| c > 0.0),
            variance,
            steps_offset: self.usize_or(&format!("{p}steps_offset"), d.steps_offset)?,
            set_alpha_to_one: match self.g.get(&format!("{p}set_alpha_to_one")) {
                None if self.g.get(&key_betas).is_some() => None,
                None => d.set_alpha_to_one,
                Some(_) => Some(self.bool(&format!("{p}set_alpha_to_one"))?),
            },
            ve: match self.g.get("sd.schedule.ve.sigma_max") {
                None => None,
                Some(_) => {
                    let p = "sd.schedule.ve.";
                    let v = VeSde::default();
                    Some(VeSde {
                        sigma_min: self.f32_or(&format!("{p}sigma_min"), v.sigma_min)?,
                        sigma_max: self.f32_or(&format!("{p}sigma_max"), v.sigma_max)?,
                        snr: self.f32_or(&format!("{p}snr"), v.snr)?,
                        sampling_eps: self.f32_or(&format!("{p}sampling_eps"), v.sampling_eps)?,
                        correct_steps: self
                            .usize_or(&format!("{p}correct_steps"), v.correct_steps)?,
                    })
                }
            },
        })
    }

    fn blocks(&self, key: &str) -> Result<Vec<Vec<usize>>> {
        let counts = self.list(&format!("{key}.resnets"))?;
        let depths = self.list(&format!("{key}.depths"))?;
        if counts.iter().try_fold(0usize, |a, &c| a.checked_add(c)) != Some(depths.len()) {
            return Err(self.err(key, "inconsistent (resnet counts do not match depths)"));
        }
        let mut it = depths.into_iter();
        Ok(counts
            .into_iter()
            .map(|c| it.by_ref().take(c).collect())
            .collect())
    }
}

const DEFAULTS: &str = "sd.defaults.";

/// Run defaults → metadata (only the fields that are set).
pub fn defaults_kv(d: &Defaults) -> Kv {
    let mut kv = Kv::new();
    let mut u = |k: &str, v: Option<usize>| {
        if let Some(v) = v {
            kv.push((format!("{DEFAULTS}{k}"), Value::U32(v as u32)));
        }
    };
    u("width", d.width);
    u("height", d.height);
    u("steps", d.steps);
    for (k, v) in [("sampler", &d.sampler), ("scheduler", &d.scheduler)] {
        if let Some(v) = v {
            kv.push((format!("{DEFAULTS}{k}"), Value::String(v.clone())));
        }
    }
    if let Some(c) = d.cfg_scale {
        kv.push((format!("{DEFAULTS}cfg_scale"), Value::F32(c)));
    }
    kv
}

/// The run defaults a GGUF carries (empty for files without them). Values of the
/// wrong type are ignored: defaults are advice, never a reason to refuse a model.
pub fn read_defaults(g: &GgufFile) -> Defaults {
    let get = |k: &str| g.get(&format!("{DEFAULTS}{k}"));
    let num = |k: &str| {
        get(k)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .filter(|&v| v > 0 && v <= 1 << 20)
    };
    let text = |k: &str| get(k).and_then(Value::as_str).map(str::to_string);
    Defaults {
        width: num("width"),
        height: num("height"),
        sampler: text("sampler"),
        scheduler: text("scheduler"),
        steps: num("steps"),
        cfg_scale: get("cfg_scale")
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .filter(|v| v.is_finite() && *v >= 0.0),
    }
}

/// The architecture config stored in a GGUF, or `None` for files without one
/// (stable-diffusion.cpp writes no metadata).
pub fn read_config(g: &GgufFile) -> Result<Option<ModelConfig>> {
    match g.get("general.architecture").and_then(Value::as_str) {
        Some(ARCHITECTURE) => {}
        Some(UPSCALER_ARCHITECTURE) => {
            return Err(Error::arch(
                &g.path,
                "an upscaler, not a model: give it to `sdrs upscale -m` or `--upscale-model`",
            ))
        }
        Some(CONTROL_ARCHITECTURE) => {
            return Err(Error::arch(
                &g.path,
                "a ControlNet, not a model: give it to `--control-net` beside the model it steers",
            ))
        }
        Some(other) => {
            return Err(Error::arch(
                &g.path,
                format!("general.architecture is `{other}`, not `{ARCHITECTURE}`"),
            ))
        }
        None => return Ok(None),
    }
    let r = Reader { g };
    let pred = r.str("sd.prediction")?;
    let unet = r.unet()?;
    let p = "sd.vae.";
    // A pixel-space model has no VAE keys at all.
    let vae = match g.get(&format!("{p}latent_channels")) {
        None => None,
        Some(_) => Some(VaeConfig {
            in_channels: r.usize(&format!("{p}in_channels"))?,
            latent_channels: r.usize(&format!("{p}latent_channels"))?,
            base_channels: r.usize(&format!("{p}base_channels"))?,
            channel_mult: r.list(&format!("{p}channel_mult"))?,
            num_res_blocks: r.usize(&format!("{p}num_res_blocks"))?,
            scaling_factor: r.f32(&format!("{p}scaling_factor"))?,
            shift_factor: r.f32(&format!("{p}shift_factor"))?,
            codebook: Some(r.usize_or(&format!("{p}codebook"), 0)?).filter(|&n| n > 0),
        }),
    };
    let n = r.usize("sd.text_encoder.count")?;
    if n > 8 {
        return Err(r.err("sd.text_encoder.count", "absurd"));
    }
    let mut text_encoders = Vec::with_capacity(n);
    for i in 0..n {
        let p = format!("sd.text_encoder.{i}.");
        let kind = match r.str(&format!("{p}kind"))?.as_str() {
            "hf_clip" => TextEncoderKind::HfClip,
            "open_clip" => TextEncoderKind::OpenClip,
            _ => return Err(r.err(&format!("{p}kind"), "not hf_clip or open_clip")),
        };
        let act = r.str(&format!("{p}activation"))?;
        text_encoders.push(TextEncoderConfig {
            kind,
            prefix: r.str(&format!("{p}prefix"))?,
            vocab_size: r.usize(&format!("{p}vocab_size"))?,
            max_positions: r.usize(&format!("{p}max_positions"))?,
            hidden_size: r.usize(&format!("{p}hidden_size"))?,
            num_layers: r.usize(&format!("{p}num_layers"))?,
            num_heads: r.usize(&format!("{p}num_heads"))?,
            intermediate_size: r.usize(&format!("{p}intermediate_size"))?,
            activation: Activation::parse(&act)
                .ok_or_else(|| r.err(&format!("{p}activation"), "unknown"))?,
            projection_dim: r.opt(&format!("{p}projection_dim"))?,
            skip_layers: r.usize(&format!("{p}skip_layers"))?,
            final_norm: r.bool(&format!("{p}final_norm"))?,
            pad_token: r.usize(&format!("{p}pad_token"))? as u32,
        });
    }
    let mut cfg = ModelConfig {
        family: r.str("sd.family")?,
        prediction: Prediction::parse(&pred).ok_or_else(|| r.err("sd.prediction", "unknown"))?,
        // Absent in files written before the key existed: SD's own schedule.
        zero_terminal_snr: match g.get("sd.zero_terminal_snr") {
            Some(_) => r.bool("sd.zero_terminal_snr")?,
            None => false,
        },
        // Absent in older files: what diffusers' SDXL pipelines do.
        zeros_for_empty_negative: match g.get("sd.zeros_for_empty_negative") {
            Some(_) => r.bool("sd.zeros_for_empty_negative")?,
            None => unet.adm_in_channels.is_some(),
        },
        schedule: r.schedule()?,
        unet,
        vae,
        text_encoders,
    };
    cfg.check_sizes()
        .map_err(|e| Error::format(&g.path, format!("metadata: {e}")))?;
    cfg.infer_time_ids().map_err(|e| Error::arch(&g.path, e))?;
    cfg.check_label_width()
        .map_err(|e| r.err("sd.unet.time_ids", &format!("inconsistent: {e}")))?;
    Ok(Some(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `read_config` of a GGUF holding `kv` and no tensors.
    fn read_back(kv: &Kv) -> Result<Option<ModelConfig>> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("<temp dir>", e))?;
        let path = dir.path().join("m.gguf");
        let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let w = crate::formats::gguf::Writer::new(std::io::BufWriter::new(f), kv, &[], None)?;
        std::io::Write::flush(&mut w.finish()?).map_err(|e| Error::io(&path, e))?;
        read_config(&GgufFile::open(&path)?)
    }

    fn refusal(kv: &Kv) -> String {
        match read_back(kv) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn metadata_counting_beyond_any_model_is_refused_naming_the_file() {
        let good = ModelConfig::sd1().shrink();
        assert_eq!(
            read_back(&config_kv(&good)).expect("the shrunk preset reads back"),
            Some(good.clone())
        );

        let mut deep = good.clone();
        deep.unet.down_blocks[1] = vec![u32::MAX as usize; 2];
        let m = refusal(&config_kv(&deep));
        assert!(
            m.contains("m.gguf") && m.contains("transformer depth is 4294967295"),
            "{m}"
        );

        let mut long = good.clone();
        long.text_encoders[0].num_layers = u32::MAX as usize;
        let m = refusal(&config_kv(&long));
        assert!(
            m.contains("m.gguf") && m.contains("layer count is 4294967295"),
            "{m}"
        );

        // ResNet counts whose sum wraps around to the number of depths listed.
        let mut kv = config_kv(&good);
        let depths = good.unet.down_blocks.iter().map(Vec::len).sum::<usize>() as u64;
        for (k, v) in kv.iter_mut() {
            if k == "sd.unet.down_blocks.resnets" {
                *v = Value::Array(
                    crate::formats::gguf::ty::U64,
                    vec![Value::U64(u64::MAX), Value::U64(depths + 1)],
                );
            }
        }
        let m = refusal(&kv);
        assert!(
            m.contains("m.gguf") && m.contains("resnet counts do not match depths"),
            "{m}"
        );
    }

    #[test]
    fn ddpm_style_and_schedule_read_back_as_written() {
        let mut ddpm = ModelConfig::ddpm(&[1, 2, 2, 2], 1);
        ddpm.unet.style.num_classes = Some(10);
        ddpm.schedule.variance = Variance::FixedLarge;
        ddpm.schedule.set_alpha_to_one = Some(true);
        assert_eq!(read_back(&config_kv(&ddpm)).unwrap(), Some(ddpm.clone()));
        ddpm.schedule = NoiseSchedule {
            betas: Betas::SquaredCos,
            clip_sample: None,
            set_alpha_to_one: None,
            ..ddpm.schedule
        };
        assert_eq!(read_back(&config_kv(&ddpm)).unwrap(), Some(ddpm));
    }

    #[test]
    fn a_score_models_style_and_ve_sde_read_back_as_written() {
        let mut ncsnpp = ModelConfig::preset("ncsnpp-celebahq").unwrap();
        assert_eq!(
            read_back(&config_kv(&ncsnpp)).unwrap(),
            Some(ncsnpp.clone())
        );
        ncsnpp.schedule.ve = Some(VeSde {
            snr: 0.17,
            correct_steps: 2,
            ..VeSde::default()
        });
        ncsnpp.unet.style.norm_groups = Some(16);
        assert_eq!(read_back(&config_kv(&ncsnpp)).unwrap(), Some(ncsnpp));
    }

    #[test]
    fn files_written_before_the_style_and_schedule_keys_read_as_sd() {
        let sd = ModelConfig::sd1().shrink();
        let old: Kv = config_kv(&sd)
            .into_iter()
            .filter(|(k, _)| {
                !k.starts_with("sd.schedule.")
                    && ![
                        "sd.unet.attention",
                        "sd.unet.norm_groups",
                        "sd.unet.norm_eps",
                        "sd.unet.flip_sin_to_cos",
                        "sd.unet.freq_shift",
                        "sd.unet.downsample_padding",
                        "sd.unet.num_classes",
                        "sd.unet.time_embedding",
                        "sd.unet.skip",
                        "sd.unet.mid_scale",
                    ]
                    .contains(&k.as_str())
            })
            .collect();
        assert_eq!(read_back(&old).unwrap(), Some(sd));
    }

    #[test]
    fn an_unknown_schedule_or_attention_is_refused_naming_the_key() {
        let ddpm = ModelConfig::ddpm(&[1, 2], 1);
        for (key, value, want) in [
            ("sd.schedule.betas", "sigmoid", "sd.schedule.betas"),
            ("sd.schedule.variance", "learned", "sd.schedule.variance"),
            ("sd.unet.attention", "linear", "sd.unet.attention"),
        ] {
            let mut kv = config_kv(&ddpm);
            for (k, v) in kv.iter_mut() {
                if k == key {
                    *v = Value::String(value.into());
                }
            }
            let m = refusal(&kv);
            assert!(m.contains(want) && m.contains("m.gguf"), "{m}");
        }
    }
}
