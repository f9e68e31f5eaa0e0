//! The request options every front end offers, described once: the CLI builds its
//! `generate` flags from [`OPTIONS`] and the JNI library reads the Java `Request`'s
//! fields named here, and both apply a value through the same [`RequestOption::apply`],
//! so that a flag and its field cannot drift apart in name, parsing or meaning.
//!
//! What is not here is what only one front end can have or what is not a request
//! option: the prompt, seed and size (every front end's first fields, with their own
//! rules: the CLI's random seed `-1`, a size taken from an init picture), picture
//! inputs (files for the CLI, pixels for Java), and model-level calls (embeddings, a VAE).
use std::path::PathBuf;

use super::Request;
use crate::budget;
use crate::config::Defaults;
use crate::error::{Error, Result};
use crate::model::tile::TileStats;
use crate::prompt::Emphasis;
use crate::sample::{names, Sampler, Schedule};

use super::RngKind;

/// What kind of value an option takes, and so its Java field type and "unset" value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A word or a path. Java `String`, unset when null.
    Text,
    /// Java `float`, unset when NaN.
    Number,
    /// A positive whole number. Java `int`, unset when 0.
    Count,
    /// An on/off switch that is off unless given. Java `boolean`.
    Flag,
    /// Repeatable. Java `String[]`, unset when null.
    List,
    /// A size in bytes (the CLI takes `768M`, `1.5G`). Java `long`, unset when 0.
    Bytes,
}

impl Kind {
    /// The Java field's type descriptor.
    pub fn java_type(self) -> &'static str {
        match self {
            Kind::Text => "Ljava/lang/String;",
            Kind::Number => "F",
            Kind::Count => "I",
            Kind::Flag => "Z",
            Kind::List => "[Ljava/lang/String;",
            Kind::Bytes => "J",
        }
    }
}

/// A value given for an option.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Text(String),
    Number(f64),
    Count(usize),
    Flag(bool),
    List(Vec<String>),
    Bytes(u64),
}

/// One option of a [`Request`].
pub struct RequestOption {
    /// The CLI's long flag, without `--`.
    pub flag: &'static str,
    /// Other spellings the CLI takes (stable-diffusion.cpp's, mostly).
    pub aliases: &'static [&'static str],
    pub short: Option<char>,
    /// The Java `Request` field.
    pub field: &'static str,
    pub kind: Kind,
    /// What it does, as `--help` prints it.
    pub help: &'static str,
    /// The CLI's placeholder for the value.
    pub value_name: &'static str,
    /// A [`Kind::Text`] option that takes a name: the names to list (others may be
    /// accepted too, as other programs spell them).
    pub names: Option<fn() -> Vec<&'static str>>,
    set: fn(&mut Request, Value) -> Result<(), String>,
}

impl RequestOption {
    /// Sets the option on `req`; a value it cannot take is an [`Error::Invalid`]
    /// naming the option the way the CLI spells it.
    pub fn apply(&self, req: &mut Request, value: Value) -> Result<()> {
        self.apply_as(req, value, &format!("--{}", self.flag))
    }

    /// [`RequestOption::apply`] with the option named as the caller's user knows it
    /// (a Java field, `Request.cfgScale`).
    pub fn apply_as(&self, req: &mut Request, value: Value, name: &str) -> Result<()> {
        (self.set)(req, value).map_err(|e| Error::Invalid(format!("{name}: {e}")))
    }
}

/// The option spelled `flag` on the command line.
pub fn find(flag: &str) -> Option<&'static RequestOption> {
    OPTIONS.iter().find(|o| o.flag == flag)
}

/// `FILE` or `FILE:MULTIPLIER` (a multiplier of 1 when none parses after the last
/// `:`, as a path may itself hold one).
pub fn parse_lora(spec: &str) -> (PathBuf, f32) {
    match spec
        .rsplit_once(':')
        .and_then(|(f, m)| Some((f, m.parse::<f32>().ok()?)))
    {
        Some((file, m)) => (PathBuf::from(file), m),
        None => (PathBuf::from(spec), 1.0),
    }
}

fn text(v: Value) -> Result<String, String> {
    match v {
        Value::Text(s) => Ok(s),
        v => Err(format!("expected text, not {v:?}")),
    }
}

fn number(v: Value) -> Result<f64, String> {
    match v {
        Value::Number(n) if n.is_finite() => Ok(n),
        Value::Number(n) => Err(format!("must be a finite number, not {n}")),
        v => Err(format!("expected a number, not {v:?}")),
    }
}

fn count(v: Value) -> Result<usize, String> {
    match v {
        Value::Count(n) if n > 0 => Ok(n),
        Value::Count(_) => Err("must be at least 1".into()),
        v => Err(format!("expected a count, not {v:?}")),
    }
}

fn flag(v: Value) -> Result<bool, String> {
    match v {
        Value::Flag(b) => Ok(b),
        v => Err(format!("expected on or off, not {v:?}")),
    }
}

/// A name out of `valid`'s list, through `parse`.
fn named<T>(
    v: Value,
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
    valid: &[&str],
) -> Result<T, String> {
    let name = text(v)?;
    parse(&name).ok_or_else(|| format!("unknown {what} `{name}`; valid: {}", valid.join(", ")))
}

fn pair(v: Value, sep: char) -> Result<(usize, usize), String> {
    let s = text(v)?;
    let (a, b) = s
        .split_once(sep)
        .ok_or_else(|| format!("`{s}`: expected two numbers separated by `{sep}`"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{v}` is not a non-negative integer"))
    };
    Ok((num(a)?, num(b)?))
}

fn init(r: &mut Request) -> Result<&mut super::Init, String> {
    r.init
        .as_mut()
        .ok_or_else(|| "needs an init image (img2img or inpainting)".to_string())
}

/// In the order they are applied: a preset first, so that options given beside it win.
pub const OPTIONS: &[RequestOption] = &[
    RequestOption {
        flag: "preset",
        aliases: &[],
        short: None,
        field: "preset",
        kind: Kind::Text,
        names: Some(|| Defaults::PRESETS.to_vec()),
        value_name: "NAME",
        help: "A distilled model's recipe (size, sampler, schedule, steps, guidance): sdxl-turbo, sd-turbo, sdxl-lightning-2step, -4step, -8step; options given beside it win.",
        set: |r, v| {
            let d = named(v, "preset", Defaults::preset, &Defaults::PRESETS)?;
            r.width = d.width.unwrap_or(r.width);
            r.height = d.height.unwrap_or(r.height);
            r.steps = d.steps.unwrap_or(r.steps);
            r.cfg_scale = d.cfg_scale.unwrap_or(r.cfg_scale);
            if let Some(s) = d.sampler.as_deref().and_then(Sampler::parse) {
                r.sampling.sampler = s;
            }
            if let Some(s) = d.scheduler.as_deref().and_then(Schedule::parse) {
                r.sampling.schedule = s;
            }
            Ok(())
        },
    },
    RequestOption {
        flag: "negative-prompt",
        aliases: &[],
        short: Some('n'),
        field: "negative",
        kind: Kind::Text,
        names: None,
        value_name: "TEXT",
        help: "Negative prompt.",
        set: |r, v| {
            r.negative = text(v)?;
            Ok(())
        },
    },
    RequestOption {
        flag: "steps",
        aliases: &[],
        short: None,
        field: "steps",
        kind: Kind::Count,
        names: None,
        value_name: "N",
        help: "Sampling steps [default: the model's, else 20].",
        set: |r, v| {
            r.steps = count(v)?;
            Ok(())
        },
    },
    RequestOption {
        flag: "cfg-scale",
        aliases: &[],
        short: None,
        field: "cfgScale",
        kind: Kind::Number,
        names: None,
        value_name: "SCALE",
        help: "Classifier-free guidance scale; 1 skips the unconditional pass [default: the model's, else 7].",
        set: |r, v| {
            r.cfg_scale = number(v)? as f32;
            Ok(())
        },
    },
    RequestOption {
        flag: "sampler",
        aliases: &["sampling-method"],
        short: None,
        field: "sampler",
        kind: Kind::Text,
        names: Some(names::sampler_names),
        value_name: "NAME",
        help: "Sampler (see --list-samplers); the peer's, A1111's (\"DPM++ 2M Karras\", which sets the schedule too) and ComfyUI's (euler_ancestral, dpmpp_2m) names work too [default: the model's, else euler].",
        set: |r, v| {
            let (sampler, implied) = named(v, "sampler", names::sampler, &names::sampler_names())?;
            r.sampling.sampler = sampler;
            if let Some(s) = implied {
                r.sampling.schedule = s;
            }
            Ok(())
        },
    },
    RequestOption {
        flag: "scheduler",
        aliases: &["schedule"],
        short: None,
        field: "scheduler",
        kind: Kind::Text,
        names: Some(|| Schedule::NAMES.to_vec()),
        value_name: "NAME",
        help: "σ schedule (A1111's and ComfyUI's names work too) [default: the sampler name's, else the model's, else discrete].",
        set: |r, v| {
            r.sampling.schedule = named(v, "scheduler", names::schedule, &names::schedule_names())?;
            Ok(())
        },
    },
    RequestOption {
        flag: "eta",
        aliases: &[],
        short: None,
        field: "eta",
        kind: Kind::Number,
        names: None,
        value_name: "ETA",
        help: "Noise of ancestral/SDE/DDIM steps (DDIM: 0 deterministic, 1 DDPM; TCD: its γ) [default: the sampler's].",
        set: |r, v| {
            r.sampling.eta = Some(number(v)?);
            Ok(())
        },
    },
    RequestOption {
        flag: "sigma-min",
        aliases: &[],
        short: None,
        field: "sigmaMin",
        kind: Kind::Number,
        names: None,
        value_name: "SIGMA",
        help: "The σ range's low end [default: the model's].",
        set: |r, v| {
            r.sampling.sigma_min = Some(number(v)?);
            Ok(())
        },
    },
    RequestOption {
        flag: "sigma-max",
        aliases: &[],
        short: None,
        field: "sigmaMax",
        kind: Kind::Number,
        names: None,
        value_name: "SIGMA",
        help: "The σ range's high end [default: the model's].",
        set: |r, v| {
            r.sampling.sigma_max = Some(number(v)?);
            Ok(())
        },
    },
    RequestOption {
        flag: "rng",
        aliases: &[],
        short: None,
        field: "rng",
        kind: Kind::Text,
        names: Some(|| RngKind::NAMES.to_vec()),
        value_name: "NAME",
        help: "Noise generator: torch (torch's CPU generator: diffusers' and A1111's \"CPU\" noise for a seed), cuda (torch's CUDA generator: A1111's default on NVIDIA GPUs, stable-diffusion.cpp's --rng cuda) or native (sdrs' own) [default: torch].",
        set: |r, v| {
            r.sampling.rng = named(v, "rng", RngKind::parse, RngKind::NAMES)?;
            Ok(())
        },
    },
    RequestOption {
        flag: "guidance-rescale",
        aliases: &[],
        short: None,
        field: "guidanceRescale",
        kind: Kind::Number,
        names: None,
        value_name: "PHI",
        help: "Guidance rescale φ in [0, 1] (0.7 is the paper's choice for v-prediction models) [default: 0].",
        set: |r, v| {
            let phi = number(v)?;
            if !(0.0..=1.0).contains(&phi) {
                return Err(format!("must be in [0, 1], not {phi}"));
            }
            r.sampling.guidance_rescale = phi as f32;
            Ok(())
        },
    },
    RequestOption {
        flag: "zero-terminal-snr",
        aliases: &[],
        short: None,
        field: "zeroTerminalSnr",
        kind: Kind::Flag,
        names: None,
        value_name: "",
        help: "Rescale the noise schedule to zero terminal SNR (for models trained that way whose file does not say so; converted zero-SNR diffusers folders do).",
        set: |r, v| {
            r.sampling.zero_terminal_snr = flag(v)?;
            Ok(())
        },
    },
    RequestOption {
        flag: "clip-skip",
        aliases: &[],
        short: None,
        field: "clipSkip",
        kind: Kind::Count,
        names: None,
        value_name: "N",
        help: "CLIP skip (A1111's numbering): 1 takes the text encoder's usual layer, 2 the one before it (what many anime-style SD 1.5 models are made for), and so on [default: 1].",
        set: |r, v| {
            r.prompting.clip_skip = count(v)?;
            Ok(())
        },
    },
    RequestOption {
        flag: "emphasis",
        aliases: &[],
        short: None,
        field: "emphasis",
        kind: Kind::Text,
        names: Some(|| Emphasis::NAMES.to_vec()),
        value_name: "MODE",
        help: "What prompt weights do: original ((word:1.3), (word), [word] and BREAK, each window scaled back to its unweighted mean, as A1111), no-norm (without that rescale), none (brackets and BREAK are plain text) [default: original].",
        set: |r, v| {
            r.prompting.emphasis = named(v, "emphasis", Emphasis::parse, Emphasis::NAMES)?;
            Ok(())
        },
    },
    RequestOption {
        flag: "lora",
        aliases: &[],
        short: None,
        field: "loras",
        kind: Kind::List,
        names: None,
        value_name: "FILE[:MULTIPLIER]",
        help: "Apply a LoRA at run time, beside the model's weights (the model file is not changed): FILE or FILE:MULTIPLIER [default 1]; repeatable. LCM-LoRA too.",
        set: |r, v| match v {
            Value::List(specs) => {
                r.loras.extend(specs.iter().map(|s| parse_lora(s)));
                Ok(())
            }
            v => Err(format!("expected a list, not {v:?}")),
        },
    },
    RequestOption {
        flag: "lora-dir",
        aliases: &["lora-model-dir"],
        short: None,
        field: "loraDir",
        kind: Kind::Text,
        names: None,
        value_name: "DIR",
        help: "Where the prompt's <lora:NAME:MULTIPLIER> tags find NAME.safetensors (.pt, .ckpt, .bin).",
        set: |r, v| {
            r.prompting.lora_dir = Some(text(v)?.into());
            Ok(())
        },
    },
    RequestOption {
        flag: "original-size",
        aliases: &[],
        short: None,
        field: "originalSize",
        kind: Kind::Text,
        names: None,
        value_name: "WxH",
        help: "SDXL size conditioning: the original image size WxH the model is told the picture was cut from [default: the output size].",
        set: |r, v| {
            r.micro.original_size = Some(pair(v, 'x')?);
            Ok(())
        },
    },
    RequestOption {
        flag: "crop",
        aliases: &[],
        short: None,
        field: "crop",
        kind: Kind::Text,
        names: None,
        value_name: "TOP,LEFT",
        help: "SDXL crop conditioning TOP,LEFT [default: 0,0].",
        set: |r, v| {
            r.micro.crop_top_left = pair(v, ',')?;
            Ok(())
        },
    },
    RequestOption {
        flag: "aesthetic-score",
        aliases: &[],
        short: None,
        field: "aestheticScore",
        kind: Kind::Number,
        names: None,
        value_name: "SCORE",
        help: "The SDXL refiner's aesthetic score for the prompt [default: 6] (the negative prompt gets 2.5, diffusers' defaults).",
        set: |r, v| {
            r.micro.aesthetic_score = number(v)? as f32;
            Ok(())
        },
    },
    RequestOption {
        flag: "strength",
        aliases: &[],
        short: None,
        field: "strength",
        kind: Kind::Number,
        names: None,
        value_name: "S",
        help: "How much of the init image to repaint, in (0, 1]: the last steps·strength steps run [default: 0.8 for img2img, 1 with a mask].",
        set: |r, v| {
            let s = number(v)?;
            init(r)?.strength = Some(s);
            Ok(())
        },
    },
    RequestOption {
        flag: "no-overlay",
        aliases: &[],
        short: None,
        field: "noOverlay",
        kind: Kind::Flag,
        names: None,
        value_name: "",
        help: "Inpainting: keep the decoded image everywhere, as diffusers returns it, instead of pasting the original back outside the mask.",
        set: |r, v| {
            if flag(v)? {
                init(r)?.overlay = false;
            }
            Ok(())
        },
    },
    RequestOption {
        flag: "taesd",
        aliases: &[],
        short: None,
        field: "taesd",
        kind: Kind::Text,
        names: None,
        value_name: "FILE",
        help: "Decode with a TAESD-family decoder (`taesd_decoder.pth`) instead of the VAE.",
        set: |r, v| {
            r.decoding.taesd = Some(text(v)?.into());
            Ok(())
        },
    },
    RequestOption {
        flag: "vae-tiling",
        aliases: &[],
        short: None,
        field: "vaeTiling",
        kind: Kind::Flag,
        names: None,
        value_name: "",
        help: "Encode and decode images over 512x512 in overlapping tiles of 512 pixels (the planner also tiles on its own when the whole image would not fit the budget).",
        set: |r, v| {
            r.decoding.vae_tiling = flag(v)?;
            Ok(())
        },
    },
    RequestOption {
        flag: "vae-tile-stats",
        aliases: &[],
        short: None,
        field: "vaeTileStats",
        kind: Kind::Text,
        names: Some(|| TileStats::NAMES.to_vec()),
        value_name: "WHERE",
        help: "Where a tiled VAE's GroupNorms take their statistics: `image`, the whole image's (the decode runs in bands that equal the whole decode, bit for bit, at 2-3x its time) or `tile`, each tile's own (one pass, as diffusers' `enable_tiling`; tones may drift between tiles) [default: image].",
        set: |r, v| {
            r.decoding.vae_tile_stats = named(v, "vae tile stats", TileStats::parse, TileStats::NAMES)?;
            Ok(())
        },
    },
    RequestOption {
        flag: "preview-every",
        aliases: &[],
        short: None,
        field: "previewEvery",
        kind: Kind::Count,
        names: None,
        value_name: "N",
        help: "Preview the image forming every N steps (and after the last): through --taesd's decoder when given, else a fast latent-to-RGB projection (SD 1.x/2.x and SDXL latents), else the model's VAE.",
        set: |r, v| {
            r.decoding.preview_every = count(v)?;
            Ok(())
        },
    },
    RequestOption {
        flag: "max-memory",
        aliases: &[],
        short: None,
        field: "maxMemory",
        kind: Kind::Bytes,
        names: None,
        value_name: "SIZE",
        help: "Memory budget (768M, 1.5G, 2GB): the run is planned to fit (guidance in two batches, the VAE decode in tiles) or refused before it starts [default: the memory cgroup's limit, if any].",
        set: |r, v| match v {
            Value::Bytes(0) => Err("must be more than 0 bytes".into()),
            Value::Bytes(b) => {
                r.max_memory = Some(b);
                Ok(())
            }
            v => Err(format!("expected a size, not {v:?}")),
        },
    },
];

/// `768M`, `1.5G`, `2GB` or bytes, for [`Kind::Bytes`] options given as text.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    budget::parse_size(s).ok_or_else(|| {
        format!("`{s}` is not a size: write bytes or a number with K, M, G (binary) or KB, MB, GB")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_has_one_flag_and_one_java_field() {
        let mut flags = std::collections::HashSet::new();
        let mut fields = std::collections::HashSet::new();
        for o in OPTIONS {
            assert!(flags.insert(o.flag), "flag {} twice", o.flag);
            assert!(fields.insert(o.field), "field {} twice", o.field);
            for a in o.aliases {
                assert!(flags.insert(a), "alias {a} twice");
            }
            assert!(o.field.chars().all(|c| c.is_ascii_alphanumeric()));
            assert_eq!(o.kind == Kind::Flag, o.value_name.is_empty(), "{}", o.flag);
        }
    }

    #[test]
    fn options_set_the_request_fields_they_name_and_refuse_bad_values() {
        let mut r = Request::new("x");
        let set = |r: &mut Request, flag: &str, v: Value| find(flag).unwrap().apply(r, v);
        set(&mut r, "sampler", Value::Text("DPM++ 2M Karras".into())).unwrap();
        assert_eq!(r.sampling.sampler, Sampler::DpmPP2M);
        assert_eq!(r.sampling.schedule, Schedule::Karras);
        set(&mut r, "scheduler", Value::Text("exponential".into())).unwrap();
        assert_eq!(r.sampling.schedule, Schedule::Exponential);
        set(
            &mut r,
            "lora",
            Value::List(vec!["a.safetensors:0.5".into(), "b".into()]),
        )
        .unwrap();
        assert_eq!(
            r.loras,
            vec![("a.safetensors".into(), 0.5), ("b".into(), 1.0)]
        );
        set(
            &mut r,
            "max-memory",
            Value::Bytes(parse_bytes("1.5G").unwrap()),
        )
        .unwrap();
        assert_eq!(r.max_memory, Some(3 << 29));
        set(&mut r, "preset", Value::Text("sdxl-lightning-4step".into())).unwrap();
        assert_eq!((r.width, r.steps, r.cfg_scale), (1024, 4, 1.0));

        let err = |r: &mut Request, flag: &str, v: Value| set(r, flag, v).unwrap_err().to_string();
        assert_eq!(
            err(&mut r, "rng", Value::Text("dice".into())),
            "--rng: unknown rng `dice`; valid: torch, cuda, native"
        );
        assert!(err(&mut r, "guidance-rescale", Value::Number(1.5)).contains("in [0, 1]"));
        assert!(err(&mut r, "strength", Value::Number(0.5)).contains("needs an init image"));
        assert!(err(&mut r, "steps", Value::Count(0)).contains("at least 1"));
        assert!(err(&mut r, "eta", Value::Number(f64::NAN)).contains("finite"));
        assert!(err(&mut r, "crop", Value::Text("3".into())).contains("two numbers"));
    }
}
