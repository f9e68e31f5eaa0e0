//! Reading diffusers / transformers `config.json` files into [`ModelConfig`] parts.
//!
//! Missing keys take the defaults of the diffusers/transformers class constructors,
//! as those libraries do; keys that select structures [`ModelConfig`] cannot express
//! are refused with the key's name.
use std::path::Path;

use serde_json::{Map, Value};

use crate::config::{
    limits, Activation, AttentionKind, Betas, NoiseSchedule, TextEncoderConfig, TextEncoderKind,
    TimeEmbedding, UnetConfig, UnetStyle, VaeConfig, Variance, VeSde, CLIP_EOS, CLIP_VOCAB,
};
use crate::error::{Error, Result};

/// Reads and parses a JSON file; a missing file and malformed JSON are both errors
/// naming the file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::format(
                path,
                "missing: a diffusers component folder needs this file",
            ));
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("malformed JSON: {e}")))
}

fn as_usize(v: &Value) -> Option<usize> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| x as usize).or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as usize)
        }),
        _ => None,
    }
}

/// A JSON object together with the file it came from, for error messages.
pub(crate) struct Obj<'a> {
    map: &'a Map<String, Value>,
    pub path: &'a Path,
}

impl<'a> Obj<'a> {
    pub fn new(v: &'a Value, path: &'a Path) -> Result<Self> {
        let map = v
            .as_object()
            .ok_or_else(|| Error::format(path, "expected a JSON object at the top level"))?;
        Ok(Obj { map, path })
    }
    /// The value of `key`; JSON `null` counts as absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    pub fn bad(&self, key: &str, want: &str) -> Error {
        let found = self
            .map
            .get(key)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "nothing".into());
        Error::format(self.path, format!("`{key}` must be {want}, found {found}"))
    }
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| as_usize(v).ok_or_else(|| self.bad(key, "a non-negative integer")))
            .transpose()
    }
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }
    /// The error for a key whose value selects something sdrs cannot run.
    pub fn refuse(&self, key: &str, what: &str) -> Error {
        Error::arch(
            self.path,
            format!(
                "`{key}` = {}: {what} is not supported",
                self.get(key).map(|v| v.to_string()).unwrap_or_default()
            ),
        )
    }

    /// A UNet's `block_out_channels`, one per level (absent: `default`), each a
    /// positive multiple of the first, which is the model's base width.
    pub fn level_channels(&self, levels: usize, default: &[usize]) -> Result<Vec<usize>> {
        let channels = match self.get("block_out_channels") {
            None => default.to_vec(),
            Some(_) => self.per_level("block_out_channels", levels, 0)?,
        };
        let base = channels.first().copied().unwrap_or(0);
        if base == 0 || channels.len() != levels || channels.iter().any(|c| c % base != 0) {
            return Err(self.bad(
                "block_out_channels",
                "positive multiples of the first entry, one per level",
            ));
        }
        Ok(channels)
    }

    /// Which levels of `down_block_types` and `up_block_types` have attention, each
    /// entry one of the block pair `[with, without]` (absent: `default`); the two lists
    /// must be as long as each other.
    pub fn block_attention(
        &self,
        down: [&str; 2],
        up: [&str; 2],
        default: (&[bool], &[bool]),
    ) -> Result<(Vec<bool>, Vec<bool>)> {
        let read = |key: &str, [with, without]: [&str; 2], default: &[bool]| -> Result<Vec<bool>> {
            match self.str_list(key)? {
                None => Ok(default.to_vec()),
                Some(types) => types
                    .iter()
                    .map(|&t| match t {
                        x if x == with => Ok(true),
                        x if x == without => Ok(false),
                        other => Err(Error::arch(
                            self.path,
                            format!("`{key}` entry `{other}` is not supported (only {with} and {without})"),
                        )),
                    })
                    .collect(),
            }
        };
        let down = read("down_block_types", down, default.0)?;
        let up = read("up_block_types", up, default.1)?;
        if down.is_empty() || up.len() != down.len() {
            return Err(Error::format(
                self.path,
                format!(
                    "{} down blocks and {} up blocks: they must be equal and non-zero",
                    down.len(),
                    up.len()
                ),
            ));
        }
        Ok((down, up))
    }
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, "a number")),
        }
    }
    pub fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| self.bad(key, "a number")),
        }
    }
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "true or false")),
        }
    }
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.bad(key, "a string")))
            .transpose()
    }
    fn str_list(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = v
            .as_array()
            .ok_or_else(|| self.bad(key, "a list of strings"))?;
        list.iter()
            .map(|x| x.as_str().ok_or_else(|| self.bad(key, "a list of strings")))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    /// An integer or a list of integers (one per level), broadcast to `n`.
    fn per_level(&self, key: &str, n: usize, default: usize) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(vec![default; n]),
            Some(Value::Array(a)) => {
                let v = a
                    .iter()
                    .map(as_usize)
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| self.bad(key, "an integer or a list of integers"))?;
                if v.len() != n {
                    return Err(Error::format(
                        self.path,
                        format!("`{key}` has {} entries for {n} blocks", v.len()),
                    ));
                }
                Ok(v)
            }
            Some(v) => as_usize(v)
                .map(|x| vec![x; n])
                .ok_or_else(|| self.bad(key, "an integer or a list of integers")),
        }
    }
}

/// Transformer depth of one level as diffusers states it: one depth for every
/// layer, or one per layer.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Depth {
    All(usize),
    PerLayer(Vec<usize>),
}

impl Depth {
    /// The shortest statement of a level's per-layer depths.
    pub fn of(depths: &[usize]) -> Depth {
        match depths.first() {
            Some(&d) if depths.iter().all(|&x| x == d) => Depth::All(d),
            _ => Depth::PerLayer(depths.to_vec()),
        }
    }
    pub fn to_json(&self) -> Value {
        match self {
            Depth::All(d) => Value::from(*d),
            Depth::PerLayer(v) => Value::from(v.clone()),
        }
    }
    fn parse(v: &Value) -> Option<Depth> {
        match v {
            Value::Array(a) => a
                .iter()
                .map(as_usize)
                .collect::<Option<Vec<_>>>()
                .map(Depth::PerLayer),
            other => as_usize(other).map(Depth::All),
        }
    }
    pub fn first(&self) -> Option<usize> {
        match self {
            Depth::All(d) => Some(*d),
            Depth::PerLayer(v) => v.first().copied(),
        }
    }
    fn expand(&self, layers: usize, o: &Obj, key: &str) -> Result<Vec<usize>> {
        match self {
            Depth::All(d) => Ok(vec![*d; layers]),
            Depth::PerLayer(v) if v.len() == layers => Ok(v.clone()),
            Depth::PerLayer(v) => Err(Error::format(
                o.path,
                format!(
                    "`{key}` gives {} depths for a block of {layers} layers",
                    v.len()
                ),
            )),
        }
    }
}

fn depth_list(o: &Obj, key: &str, n: usize) -> Result<Option<Vec<Depth>>> {
    let Some(v) = o.get(key) else { return Ok(None) };
    let want = "an integer, or a list of integers or lists of integers";
    match v {
        Value::Array(a) => {
            let list = a
                .iter()
                .map(Depth::parse)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| o.bad(key, want))?;
            if list.len() != n {
                return Err(Error::format(
                    o.path,
                    format!("`{key}` has {} entries for {n} blocks", list.len()),
                ));
            }
            Ok(Some(list))
        }
        other => Ok(Some(vec![
            Depth::parse(other)
                .ok_or_else(|| o.bad(key, want))?;
            n
        ])),
    }
}

/// `UNet2DConditionModel` config.
pub(crate) fn unet(v: &Value, path: &Path) -> Result<UnetConfig> {
    let o = Obj::new(v, path)?;
    let refuse = |key: &str, what: &str| o.refuse(key, what);
    for key in [
        "class_embed_type",
        "encoder_hid_dim_type",
        "num_class_embeds",
    ] {
        if o.get(key).is_some() {
            return Err(refuse(key, "this conditioning"));
        }
    }
    let all_false = |v: &Value| match v {
        Value::Bool(b) => !b,
        Value::Array(a) => a.iter().all(|x| x == &Value::Bool(false)),
        _ => false,
    };
    for key in ["dual_cross_attention", "only_cross_attention"] {
        if o.get(key).is_some_and(|v| !all_false(v)) {
            return Err(refuse(key, "this attention variant"));
        }
    }

    let (down_attn, up_attn) = o.block_attention(
        ["CrossAttnDownBlock2D", "DownBlock2D"],
        ["CrossAttnUpBlock2D", "UpBlock2D"],
        (&[true, true, true, false], &[false, true, true, true]),
    )?;
    let levels = down_attn.len();

    let default: Vec<usize> = [320, 640, 1280, 1280]
        .into_iter()
        .cycle()
        .take(levels)
        .collect();
    let channels = o.level_channels(levels, &default)?;
    let mc = channels[0];
    let layers = o.per_level("layers_per_block", levels, 2)?;
    // Bounded before the per-layer lists below are allocated at these lengths (the
    // level count is bounded by the file's own list, and checked with the rest below).
    for &n in &layers {
        limits::within("`layers_per_block`", n, limits::RESNETS)
            .map_err(|e| Error::format(path, e))?;
    }

    let tlpb = depth_list(&o, "transformer_layers_per_block", levels)?
        .unwrap_or_else(|| vec![Depth::All(1); levels]);
    let down_blocks = (0..levels)
        .map(|l| {
            if down_attn[l] {
                tlpb[l].expand(layers[l], &o, "transformer_layers_per_block")
            } else {
                Ok(vec![0; layers[l]])
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let reverse = match depth_list(&o, "reverse_transformer_layers_per_block", levels)? {
        Some(r) => r,
        None if tlpb.iter().any(|d| matches!(d, Depth::PerLayer(_))) => {
            return Err(Error::format(path, "`transformer_layers_per_block` has per-layer lists but `reverse_transformer_layers_per_block` is missing"));
        }
        None => tlpb.iter().rev().cloned().collect(),
    };
    let up_blocks = (0..levels)
        .map(|j| {
            let n = layers[levels - 1 - j] + 1;
            if up_attn[j] {
                reverse[j].expand(n, &o, "reverse_transformer_layers_per_block")
            } else {
                Ok(vec![0; n])
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let mid_depth = match o.get("mid_block_type") {
        None if o.map.contains_key("mid_block_type") => None,
        None => Some(tlpb[levels - 1].first().unwrap_or(1)),
        Some(Value::String(s)) if s == "UNetMidBlock2DCrossAttn" => {
            Some(tlpb[levels - 1].first().unwrap_or(1))
        }
        Some(Value::String(s)) if s == "UNetMidBlock2D" => Some(0),
        Some(_) => return Err(refuse("mid_block_type", "this middle block")),
    };

    // diffusers reads `attention_head_dim` as the number of heads (a historical
    // misnomer that it keeps for compatibility); `num_attention_heads` wins if set.
    let head_key = if o.get("num_attention_heads").is_some() {
        "num_attention_heads"
    } else {
        "attention_head_dim"
    };
    let heads = o.per_level(head_key, levels, 8)?;
    let attn_level: Vec<bool> = (0..levels)
        .map(|l| {
            down_attn[l]
                || up_attn[levels - 1 - l]
                || (l + 1 == levels && mid_depth.unwrap_or(0) > 0)
        })
        .collect();
    let (num_heads, head_dim) = head_layout(&heads, &channels, &attn_level).ok_or_else(|| {
        Error::arch(path, format!("`{head_key}` {heads:?} for channels {channels:?}: neither one head count nor one head width for all attention blocks"))
    })?;

    let adm_in_channels = match o.opt_str("addition_embed_type")? {
        None => None,
        Some("text_time") => Some(
            o.opt_usize("projection_class_embeddings_input_dim")?
                .ok_or_else(|| {
                    o.bad(
                        "projection_class_embeddings_input_dim",
                        "set for addition_embed_type text_time",
                    )
                })?,
        ),
        Some(_) => return Err(refuse("addition_embed_type", "this added embedding")),
    };
    let context_dim = match o.get("cross_attention_dim") {
        None => 1280,
        Some(v) => as_usize(v).ok_or_else(|| o.bad("cross_attention_dim", "one integer"))?,
    };
    let unet = UnetConfig {
        in_channels: o.usize_or("in_channels", 4)?,
        out_channels: o.usize_or("out_channels", 4)?,
        model_channels: mc,
        channel_mult: channels.iter().map(|c| c / mc).collect(),
        down_blocks,
        up_blocks,
        mid_depth,
        num_heads,
        head_dim,
        context_dim,
        linear_proj: o.bool_or("use_linear_projection", false)?,
        adm_in_channels,
        time_cond_proj_dim: o.opt_usize("time_cond_proj_dim")?,
        // Which values fill it is counted once the pooled width is known (`read_config`).
        time_ids: Vec::new(),
        time_id_dim: if adm_in_channels.is_some() {
            o.usize_or("addition_time_embed_dim", 256)?
        } else {
            0
        },
        style: UnetStyle {
            norm_groups: Some(o.usize_or("norm_num_groups", 32)?),
            norm_eps: o.f32_or("norm_eps", 1e-5)?,
            flip_sin_to_cos: o.bool_or("flip_sin_to_cos", true)?,
            freq_shift: o.f32_or("freq_shift", 0.0)?,
            downsample_padding: o.usize_or("downsample_padding", 1)?,
            ..UnetStyle::default()
        },
    };
    unet.check_sizes().map_err(|e| Error::format(path, e))?;
    Ok(unet)
}

/// `UNet2DModel` config: the pixel-space and latent UNets of the DDPM and LDM papers
/// (`google/ddpm-*`, `CompVis/ldm-celebahq-256`), with their defaults where a key is
/// absent.
pub(crate) fn unet2d(v: &Value, path: &Path) -> Result<UnetConfig> {
    let o = Obj::new(v, path)?;
    let refuse = |key: &str, what: &str| o.refuse(key, what);
    let string_is = |key: &str, want: &str| -> Result<()> {
        match o.opt_str(key)? {
            Some(s) if s != want => Err(refuse(key, "this option")),
            _ => Ok(()),
        }
    };
    let time_embedding = match o.opt_str("time_embedding_type")? {
        None => TimeEmbedding::Positional,
        Some(s) => TimeEmbedding::parse(s)
            .ok_or_else(|| refuse("time_embedding_type", "this time embedding"))?,
    };
    string_is("resnet_time_scale_shift", "default")?;
    string_is("act_fn", "silu")?;
    string_is("downsample_type", "conv")?;
    string_is("upsample_type", "conv")?;
    if o.get("class_embed_type").is_some_and(|v| !v.is_null()) {
        return Err(refuse("class_embed_type", "this class embedding"));
    }
    if o.bool_or("center_input_sample", false)? {
        return Err(refuse("center_input_sample", "this option"));
    }
    // NCSN++ (`google/ncsnpp-*`) is built of skip blocks only: each level passes the
    // image paths on, so a mixed UNet would not fit together.
    let skip = o
        .str_list("down_block_types")?
        .is_some_and(|t| t.iter().any(|b| b.contains("Skip")));
    let (down_attn, up_attn) = if skip {
        o.block_attention(
            ["AttnSkipDownBlock2D", "SkipDownBlock2D"],
            ["AttnSkipUpBlock2D", "SkipUpBlock2D"],
            (&[], &[]),
        )?
    } else {
        o.block_attention(
            ["AttnDownBlock2D", "DownBlock2D"],
            ["AttnUpBlock2D", "UpBlock2D"],
            (&[false, true, true, true], &[true, true, true, false]),
        )?
    };
    let levels = down_attn.len();
    let channels = o.level_channels(levels, &[224, 448, 672, 896])?;
    let mc = channels[0];
    if o.opt_usize("time_embedding_dim")?
        .is_some_and(|d| d != 4 * mc)
    {
        return Err(refuse(
            "time_embedding_dim",
            "a width other than 4 × block_out_channels[0]",
        ));
    }
    let layers = o.usize_or("layers_per_block", 2)?;
    limits::within("`layers_per_block`", layers, limits::RESNETS)
        .map_err(|e| Error::format(path, e))?;
    // `null` (NCSN++): each norm takes min(channels / 4, 32) groups.
    let groups = match o.map.get("norm_num_groups") {
        Some(Value::Null) => None,
        _ => Some(o.usize_or("norm_num_groups", 32)?),
    };
    if o.opt_usize("attn_norm_num_groups")?
        .is_some_and(|g| Some(g) != groups)
    {
        return Err(refuse(
            "attn_norm_num_groups",
            "a group count other than norm_num_groups",
        ));
    }
    // `attention_head_dim` is a head width here (diffusers' UNet2DModel divides the
    // channels by it); unset, every attention block has one head.
    let (num_heads, head_dim) = match o.opt_usize("attention_head_dim")? {
        None => (Some(1), None),
        Some(0) => return Err(o.bad("attention_head_dim", "positive")),
        Some(d) => (None, Some(d)),
    };
    let depth = |attn: bool| usize::from(attn);
    let unet = UnetConfig {
        in_channels: o.usize_or("in_channels", 3)?,
        out_channels: o.usize_or("out_channels", 3)?,
        model_channels: mc,
        channel_mult: channels.iter().map(|c| c / mc).collect(),
        down_blocks: down_attn.iter().map(|&a| vec![depth(a); layers]).collect(),
        up_blocks: up_attn
            .iter()
            .map(|&a| {
                // An AttnSkipUpBlock2D has one attention block, after its last ResNet.
                let mut d = vec![depth(a && !skip); layers + 1];
                d[layers] = depth(a);
                d
            })
            .collect(),
        mid_depth: Some(depth(o.bool_or("add_attention", true)?)),
        num_heads,
        head_dim,
        context_dim: 0,
        linear_proj: false,
        adm_in_channels: None,
        time_cond_proj_dim: None,
        time_ids: Vec::new(),
        time_id_dim: 0,
        style: UnetStyle {
            attention: AttentionKind::SelfAttention,
            norm_groups: groups,
            norm_eps: o.f32_or("norm_eps", 1e-5)?,
            flip_sin_to_cos: o.bool_or("flip_sin_to_cos", true)?,
            freq_shift: o.f32_or("freq_shift", 0.0)?,
            downsample_padding: o.usize_or("downsample_padding", 1)?,
            num_classes: o.opt_usize("num_class_embeds")?,
            time_embedding,
            skip,
            mid_scale: o.f32_or("mid_block_scale_factor", 1.0)?,
        },
    };
    unet.check_sizes().map_err(|e| Error::format(path, e))?;
    Ok(unet)
}

/// A `scheduler_config.json`: the training schedule and the sampling options, each
/// absent key at the default of the scheduler class the file names (diffusers'
/// `DDPMScheduler` and `DDIMScheduler` clip the predicted sample by default; an
/// unset `set_alpha_to_one` stays unset, each sampler taking its scheduler's default).
pub(crate) fn scheduler(v: &Value, path: &Path) -> Result<NoiseSchedule> {
    let o = Obj::new(v, path)?;
    if o.get("trained_betas").is_some_and(|v| !v.is_null()) {
        return Err(Error::arch(
            path,
            "`trained_betas`: a list of betas is not supported",
        ));
    }
    let class = o.opt_str("_class_name")?.unwrap_or_default();
    if class == "ScoreSdeVeScheduler" {
        let d = VeSde::default();
        let schedule = NoiseSchedule {
            train_steps: o.usize_or("num_train_timesteps", 2000)?,
            clip_sample: None,
            steps_offset: 0,
            set_alpha_to_one: None,
            ve: Some(VeSde {
                sigma_min: o.f32_or("sigma_min", d.sigma_min)?,
                sigma_max: o.f32_or("sigma_max", d.sigma_max)?,
                snr: o.f32_or("snr", d.snr)?,
                sampling_eps: o.f32_or("sampling_eps", d.sampling_eps)?,
                correct_steps: o.usize_or("correct_steps", d.correct_steps)?,
            }),
            ..NoiseSchedule::default()
        };
        schedule.check().map_err(|e| Error::format(path, e))?;
        return Ok(schedule);
    }
    let clips = matches!(class, "DDPMScheduler" | "DDIMScheduler");
    let start = o.f64_or("beta_start", 0.0001)?;
    let end = o.f64_or("beta_end", 0.02)?;
    let betas = match o.opt_str("beta_schedule")?.unwrap_or("linear") {
        "linear" => Betas::Linear { start, end },
        "scaled_linear" => Betas::ScaledLinear { start, end },
        "squaredcos_cap_v2" => Betas::SquaredCos,
        other => {
            return Err(Error::arch(
                path,
                format!("`beta_schedule` {other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"),
            ))
        }
    };
    let variance = match o.opt_str("variance_type")?.unwrap_or("fixed_small") {
        // The log forms compute the same standard deviation through its logarithm.
        "fixed_small" | "fixed_small_log" => Variance::FixedSmall,
        "fixed_large" | "fixed_large_log" => Variance::FixedLarge,
        other => {
            return Err(Error::arch(
                path,
                format!(
                    "`variance_type` {other:?} (a variance the UNet predicts) is not supported"
                ),
            ))
        }
    };
    let range = o.f32_or("clip_sample_range", 1.0)?;
    let schedule = NoiseSchedule {
        betas,
        train_steps: o.usize_or("num_train_timesteps", 1000)?,
        clip_sample: o.bool_or("clip_sample", clips)?.then_some(range),
        variance,
        steps_offset: o.usize_or("steps_offset", 0)?,
        set_alpha_to_one: match o.get("set_alpha_to_one") {
            None => None,
            Some(_) => Some(o.bool_or("set_alpha_to_one", false)?),
        },
        ve: None,
    };
    schedule.check().map_err(|e| Error::format(path, e))?;
    Ok(schedule)
}

/// Turns per-level head counts into the single-file description: one head count for
/// all attention blocks, or one head width. A head width is chosen when the counts
/// differ; it must reproduce every count through [`UnetConfig::heads_for`].
fn head_layout(
    heads: &[usize],
    channels: &[usize],
    attn: &[bool],
) -> Option<(Option<usize>, Option<usize>)> {
    let used: Vec<(usize, usize)> = (0..heads.len())
        .filter(|&l| attn[l])
        .map(|l| (heads[l], channels[l]))
        .collect();
    let Some(&(first, _)) = used.first() else {
        return Some((Some(heads[0]), None));
    };
    if used.iter().all(|&(h, _)| h == first) {
        return Some((Some(first), None));
    }
    used.iter()
        .filter(|&&(h, c)| h > 0 && c % h == 0)
        .map(|&(h, c)| c / h)
        .filter(|&d| used.iter().all(|&(h, c)| (c / d).max(1) == h))
        .max()
        .map(|d| (None, Some(d)))
}

/// `AutoencoderKL` config, or `VQModel` (LDM's VQ autoencoder, the same encoder and
/// decoder around a codebook).
pub(crate) fn vae(v: &Value, path: &Path) -> Result<VaeConfig> {
    let o = Obj::new(v, path)?;
    let vq = o.opt_str("_class_name")? == Some("VQModel");
    // sdrs' autoencoder graphs normalise in 32 groups, as every published one does.
    if o.usize_or("norm_num_groups", 32)? != 32 {
        return Err(o.bad("norm_num_groups", "32"));
    }
    if vq {
        if o.opt_str("norm_type")?.is_some_and(|t| t != "group") {
            return Err(Error::arch(
                path,
                "`norm_type` other than group (MoVQ's spatial norm) is not supported",
            ));
        }
        if o.bool_or("lookup_from_codebook", false)? {
            return Err(Error::arch(
                path,
                "`lookup_from_codebook` = true is not supported",
            ));
        }
        let latent = o.usize_or("latent_channels", 3)?;
        if o.opt_usize("vq_embed_dim")?.is_some_and(|d| d != latent) {
            return Err(o.bad("vq_embed_dim", "latent_channels"));
        }
    }
    for key in [
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
    ] {
        if !o.bool_or(key, true)? {
            return Err(Error::arch(
                path,
                format!("`{key}` = false is not supported"),
            ));
        }
    }
    let channels = match o.get("block_out_channels") {
        None => vec![64],
        Some(Value::Array(a)) => a
            .iter()
            .map(as_usize)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| o.bad("block_out_channels", "a list of integers"))?,
        Some(_) => return Err(o.bad("block_out_channels", "a list of integers")),
    };
    let base = channels.first().copied().unwrap_or(0);
    if base == 0 || channels.iter().any(|c| c % base != 0) {
        return Err(o.bad(
            "block_out_channels",
            "positive multiples of the first entry",
        ));
    }
    for (key, want) in [
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ] {
        if let Some(types) = o.str_list(key)? {
            if types.len() != channels.len() || types.iter().any(|t| *t != want) {
                return Err(Error::arch(
                    path,
                    format!(
                        "`{key}` {types:?}: only {} × {want} is supported",
                        channels.len()
                    ),
                ));
            }
        }
    }
    let in_channels = o.usize_or("in_channels", 3)?;
    if o.usize_or("out_channels", in_channels)? != in_channels {
        return Err(Error::arch(
            path,
            "`out_channels` differs from `in_channels`: not supported",
        ));
    }
    let vae = VaeConfig {
        in_channels,
        latent_channels: o.usize_or("latent_channels", if vq { 3 } else { 4 })?,
        base_channels: base,
        channel_mult: channels.iter().map(|c| c / base).collect(),
        num_res_blocks: o.usize_or("layers_per_block", 1)?,
        // VQModel's default too: LDMPipeline divides the sampled latents by it.
        scaling_factor: o.f32_or("scaling_factor", 0.18215)?,
        shift_factor: o.f32_or("shift_factor", 0.0)?,
        codebook: if vq {
            Some(o.usize_or("num_vq_embeddings", 256)?)
        } else {
            None
        },
    };
    vae.check_sizes().map_err(|e| Error::format(path, e))?;
    Ok(vae)
}

/// Whether a `CLIPTextModel` config describes an OpenCLIP tower. Only OpenCLIP
/// towers (SD 2's ViT-H, SDXL's bigG) use exact GELU; OpenAI's CLIP uses quick GELU.
pub(crate) fn is_open_clip(v: &Value, path: &Path) -> Result<bool> {
    let o = Obj::new(v, path)?;
    Ok(o.opt_str("hidden_act")?.unwrap_or("quick_gelu") == "gelu")
}

/// Whether a text encoder carries `text_projection` (`CLIPTextModelWithProjection`),
/// from its `architectures`, else from the pipeline's class for the component.
pub(crate) fn has_projection(v: &Value, path: &Path, pipeline_class: Option<&str>) -> Result<bool> {
    let o = Obj::new(v, path)?;
    let arch = o
        .str_list("architectures")?
        .and_then(|a| a.first().copied())
        .or(pipeline_class);
    Ok(arch == Some("CLIPTextModelWithProjection"))
}

/// The conditioning choices the single file's config states and diffusers'
/// text-encoder config does not: they follow the pipeline family.
pub(crate) struct TextRole {
    pub prefix: String,
    pub kind: TextEncoderKind,
    pub projection: bool,
    /// SDXL-style conditioning: penultimate layer, no final norm.
    pub sdxl: bool,
    /// Pad token id from the tokenizer folder, when one states it.
    pub pad_token: Option<u32>,
}

/// `CLIPTextModel` / `CLIPTextModelWithProjection` config.
pub(crate) fn text(v: &Value, path: &Path, role: TextRole) -> Result<TextEncoderConfig> {
    let o = Obj::new(v, path)?;
    let act = o.opt_str("hidden_act")?.unwrap_or("quick_gelu");
    let activation = Activation::parse(act)
        .ok_or_else(|| Error::arch(path, format!("`hidden_act` = {act:?} is not supported")))?;
    let open = role.kind == TextEncoderKind::OpenClip;
    let text = TextEncoderConfig {
        kind: role.kind,
        prefix: role.prefix,
        vocab_size: o.usize_or("vocab_size", CLIP_VOCAB)?,
        max_positions: o.usize_or("max_position_embeddings", 77)?,
        hidden_size: o.usize_or("hidden_size", 512)?,
        num_layers: o.usize_or("num_hidden_layers", 12)?,
        num_heads: o.usize_or("num_attention_heads", 8)?,
        intermediate_size: o.usize_or("intermediate_size", 2048)?,
        activation,
        projection_dim: if role.projection {
            Some(o.usize_or("projection_dim", 512)?)
        } else {
            None
        },
        skip_layers: usize::from(role.sdxl),
        final_norm: !role.sdxl,
        pad_token: role.pad_token.unwrap_or(if open { 0 } else { CLIP_EOS }),
    };
    text.check_sizes().map_err(|e| Error::format(path, e))?;
    Ok(text)
}

/// The pad token id a tokenizer folder states (`special_tokens_map.json`, else
/// `tokenizer_config.json`), looked up in its `vocab.json`.
pub(crate) fn pad_token(tokenizer_dir: &Path) -> Result<Option<u32>> {
    let mut pad = None;
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = tokenizer_dir.join(file);
        if !path.is_file() {
            continue;
        }
        let v = read_json(&path)?;
        let o = Obj::new(&v, &path)?;
        pad = match o.get("pad_token") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(m)) => m.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        if pad.is_some() {
            break;
        }
    }
    let Some(pad) = pad else { return Ok(None) };
    match pad.as_str() {
        "<|endoftext|>" => return Ok(Some(CLIP_EOS)),
        "!" => return Ok(Some(0)),
        _ => {}
    }
    let vocab_path = tokenizer_dir.join("vocab.json");
    let vocab = read_json(&vocab_path)?;
    let id = vocab.get(&pad).and_then(Value::as_u64).ok_or_else(|| {
        Error::format(
            &vocab_path,
            format!("pad token {pad:?} is not in the vocabulary"),
        )
    })?;
    Ok(Some(id as u32))
}

/// `ControlNetModel` config: the UNet encoder's keys as `UNet2DConditionModel` has
/// them, and the conditioning embedding's.
pub(crate) fn controlnet(v: &Value, path: &Path) -> Result<crate::config::ControlConfig> {
    let o = Obj::new(v, path)?;
    if o.bool_or("global_pool_conditions", false)? {
        return Err(o.refuse(
            "global_pool_conditions",
            "pooled control (the shuffle ControlNet)",
        ));
    }
    if let Some(order) = o.opt_str("controlnet_conditioning_channel_order")? {
        if order != "rgb" {
            return Err(o.refuse("controlnet_conditioning_channel_order", "a non-RGB order"));
        }
    }
    // The encoder is read as a UNet's whose up path mirrors it; a ControlNet has none.
    let mut unet_json = v.clone();
    if let (Some(map), Some(Value::Array(down))) =
        (unet_json.as_object_mut(), v.get("down_block_types"))
    {
        let up: Vec<Value> = down
            .iter()
            .rev()
            .map(|d| match d.as_str() {
                Some("CrossAttnDownBlock2D") => Value::from("CrossAttnUpBlock2D"),
                _ => Value::from("UpBlock2D"),
            })
            .collect();
        map.insert("up_block_types".into(), Value::Array(up));
    }
    let mut unet = unet(&unet_json, path)?;
    unet.up_blocks.clear();
    unet.out_channels = unet.in_channels;
    let embedding_channels = match o.get("conditioning_embedding_out_channels") {
        None => vec![16, 32, 96, 256],
        Some(Value::Array(a)) => a
            .iter()
            .map(as_usize)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| o.bad("conditioning_embedding_out_channels", "a list of integers"))?,
        Some(_) => return Err(o.bad("conditioning_embedding_out_channels", "a list of integers")),
    };
    let family = if unet.adm_in_channels.is_some() {
        "sdxl"
    } else if unet.linear_proj || unet.head_dim.is_some() {
        "sd2"
    } else {
        "sd1"
    };
    let c = crate::config::ControlConfig {
        family: family.into(),
        unet,
        hint_channels: o.usize_or("conditioning_channels", 3)?,
        embedding_channels,
    };
    c.check_sizes().map_err(|e| Error::format(path, e))?;
    Ok(c)
}
