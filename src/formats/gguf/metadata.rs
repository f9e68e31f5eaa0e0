//! The metadata keys sdrs writes into a GGUF, and how they are read back.
//! `docs/gguf.md` documents every key.
use std::collections::HashMap;

use crate::config::{
    Activation, Defaults, ModelConfig, Prediction, TextEncoderConfig, TextEncoderKind, TimeId,
    UnetConfig, VaeConfig,
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
    let u = &cfg.unet;
    let p = "sd.unet.";
    put(
        &mut kv,
        format!("{p}in_channels"),
        Value::U32(u.in_channels as u32),
    );
    put(
        &mut kv,
        format!("{p}out_channels"),
        Value::U32(u.out_channels as u32),
    );
    put(
        &mut kv,
        format!("{p}model_channels"),
        Value::U32(u.model_channels as u32),
    );
    put(
        &mut kv,
        format!("{p}channel_mult"),
        Value::u32_array(u.channel_mult.iter().copied()),
    );
    let (c, d) = flatten(&u.down_blocks);
    put(&mut kv, format!("{p}down_blocks.resnets"), c);
    put(&mut kv, format!("{p}down_blocks.depths"), d);
    let (c, d) = flatten(&u.up_blocks);
    put(&mut kv, format!("{p}up_blocks.resnets"), c);
    put(&mut kv, format!("{p}up_blocks.depths"), d);
    put(
        &mut kv,
        format!("{p}mid_depth"),
        Value::I32(u.mid_depth.map_or(-1, |d| d as i32)),
    );
    put(
        &mut kv,
        format!("{p}num_heads"),
        Value::U32(u.num_heads.unwrap_or(0) as u32),
    );
    put(
        &mut kv,
        format!("{p}head_dim"),
        Value::U32(u.head_dim.unwrap_or(0) as u32),
    );
    put(
        &mut kv,
        format!("{p}context_dim"),
        Value::U32(u.context_dim as u32),
    );
    put(
        &mut kv,
        format!("{p}linear_proj"),
        Value::Bool(u.linear_proj),
    );
    put(
        &mut kv,
        format!("{p}adm_in_channels"),
        Value::U32(u.adm_in_channels.unwrap_or(0) as u32),
    );
    put(
        &mut kv,
        format!("{p}time_cond_proj_dim"),
        Value::U32(u.time_cond_proj_dim.unwrap_or(0) as u32),
    );
    if !u.time_ids.is_empty() {
        put(
            &mut kv,
            format!("{p}time_ids"),
            Value::string_array(u.time_ids.iter().map(|t| t.as_str().to_string())),
        );
        put(
            &mut kv,
            format!("{p}time_id_dim"),
            Value::U32(u.time_id_dim as u32),
        );
    }
    let v = &cfg.vae;
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
    let p = "sd.unet.";
    let mid = r
        .get(&format!("{p}mid_depth"))?
        .as_i64()
        .ok_or_else(|| r.err("sd.unet.mid_depth", "not an integer"))?;
    let unet = UnetConfig {
        in_channels: r.usize(&format!("{p}in_channels"))?,
        out_channels: r.usize(&format!("{p}out_channels"))?,
        model_channels: r.usize(&format!("{p}model_channels"))?,
        channel_mult: r.list(&format!("{p}channel_mult"))?,
        down_blocks: r.blocks(&format!("{p}down_blocks"))?,
        up_blocks: r.blocks(&format!("{p}up_blocks"))?,
        mid_depth: usize::try_from(mid).ok(),
        num_heads: r.opt(&format!("{p}num_heads"))?,
        head_dim: r.opt(&format!("{p}head_dim"))?,
        context_dim: r.usize(&format!("{p}context_dim"))?,
        linear_proj: r.bool(&format!("{p}linear_proj"))?,
        adm_in_channels: r.opt(&format!("{p}adm_in_channels"))?,
        time_cond_proj_dim: r.opt(&format!("{p}time_cond_proj_dim"))?,
        time_ids: match g.get(&format!("{p}time_ids")) {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_str().and_then(TimeId::parse)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| r.err("sd.unet.time_ids", "not a list of original_size, crop_coords_top_left, target_size, aesthetic_score"))?,
        },
        time_id_dim: match g.get(&format!("{p}time_id_dim")) {
            None => 0,
            Some(_) => r.usize(&format!("{p}time_id_dim"))?,
        },
    };
    let p = "sd.vae.";
    let vae = VaeConfig {
        in_channels: r.usize(&format!("{p}in_channels"))?,
        latent_channels: r.usize(&format!("{p}latent_channels"))?,
        base_channels: r.usize(&format!("{p}base_channels"))?,
        channel_mult: r.list(&format!("{p}channel_mult"))?,
        num_res_blocks: r.usize(&format!("{p}num_res_blocks"))?,
        scaling_factor: r.f32(&format!("{p}scaling_factor"))?,
        shift_factor: r.f32(&format!("{p}shift_factor"))?,
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
}
