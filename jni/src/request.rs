//! `org.sdrs.Request` in, `org.sdrs.Image` out.
//!
//! Unset fields (0 sizes and steps, a null sampler, a NaN guidance scale) take the
//! model's defaults, as the CLI's unset options do.
use jni::objects::{JObject, JValue};
use jni::JNIEnv;

use std::sync::Arc;

use sdrs_core::model::tile::TileStats;
use sdrs_core::pipeline::{Canvas, Decoding, Image, Init, Prompting, Request, RngKind, Sampling};
use sdrs_core::sample::{names, Sampler, Schedule};

use crate::{string, Fail};

fn int(env: &mut JNIEnv, obj: &JObject, name: &str) -> Result<i32, Fail> {
    Ok(env.get_field(obj, name, "I")?.i()?)
}

fn float(env: &mut JNIEnv, obj: &JObject, name: &str) -> Result<f32, Fail> {
    Ok(env.get_field(obj, name, "F")?.f()?)
}

fn text(env: &mut JNIEnv, obj: &JObject, name: &str) -> Result<Option<String>, Fail> {
    let value = env.get_field(obj, name, "Ljava/lang/String;")?.l()?;
    if value.is_null() {
        return Ok(None);
    }
    let s = string(env, &value, name)?;
    env.delete_local_ref(value)?;
    Ok(Some(s))
}

/// A size or step count: 0 for the model's default.
fn count(env: &mut JNIEnv, obj: &JObject, name: &str, default: usize) -> Result<usize, Fail> {
    match int(env, obj, name)? {
        0 => Ok(default),
        n => usize::try_from(n).map_err(|_| {
            Fail::Msg(format!(
                "Request.{name} must be positive (or 0 for the model's default), not {n}"
            ))
        }),
    }
}

/// Any spelling the CLI takes (sdrs', stable-diffusion.cpp's, A1111's, ComfyUI's),
/// with the schedule a name like `DPM++ 2M Karras` implies.
fn sampler(name: &str) -> Result<(Sampler, Option<Schedule>), Fail> {
    // The CLI's wording for the same mistake.
    names::sampler(name).ok_or_else(|| {
        Fail::Msg(format!(
            "unknown sampler `{name}`; valid: {}",
            names::sampler_names().join(", ")
        ))
    })
}

/// `defaults`: the model's ([`sdrs_core::pipeline::Pipeline::request`]).
pub(crate) fn read(env: &mut JNIEnv, req: &JObject, defaults: &Request) -> Result<Request, Fail> {
    if req.is_null() {
        return Err(Fail::NullPointer("request is null".into()));
    }
    let prompt = text(env, req, "prompt")?
        .ok_or_else(|| Fail::NullPointer("Request.prompt is null".into()))?;
    let base = Request {
        prompt,
        ..defaults.clone()
    };
    let cfg_scale = match float(env, req, "cfgScale")? {
        s if s.is_nan() => base.cfg_scale,
        s if s.is_finite() => s,
        s => {
            return Err(Fail::Msg(format!(
                "Request.cfgScale must be finite, not {s}"
            )))
        }
    };
    let (sampler, implied) = match text(env, req, "sampler")? {
        Some(name) => sampler(&name)?,
        None => (base.sampling.sampler, None),
    };
    let schedule = match text(env, req, "scheduler")? {
        Some(name) => names::schedule(&name).ok_or_else(|| {
            Fail::Msg(format!(
                "unknown scheduler `{name}`; valid: {}",
                names::schedule_names().join(", ")
            ))
        })?,
        None => implied.unwrap_or(base.sampling.schedule),
    };
    let rng = match text(env, req, "rng")? {
        Some(name) => RngKind::parse(&name).ok_or_else(|| {
            Fail::Msg(format!(
                "unknown rng `{name}`; valid: {}",
                RngKind::NAMES.join(", ")
            ))
        })?,
        None => base.sampling.rng,
    };
    Ok(Request {
        negative: text(env, req, "negative")?.unwrap_or_default(),
        width: count(env, req, "width", base.width)?,
        height: count(env, req, "height", base.height)?,
        steps: count(env, req, "steps", base.steps)?,
        cfg_scale,
        // Java has no unsigned long: the bits are the seed, as the CLI's u64.
        seed: env.get_field(req, "seed", "J")?.j()? as u64,
        sampling: Sampling {
            sampler,
            schedule,
            rng,
            ..base.sampling
        },
        prompting: Prompting {
            clip_skip: count(env, req, "clipSkip", base.prompting.clip_skip)?,
            lora_dir: text(env, req, "loraDir")?.map(Into::into),
            ..base.prompting
        },
        decoding: Decoding {
            vae_tiling: env.get_field(req, "vaeTiling", "Z")?.z()?,
            vae_tile_stats: match text(env, req, "vaeTileStats")? {
                Some(name) => TileStats::parse(&name).ok_or_else(|| {
                    Fail::Msg(format!(
                        "unknown vaeTileStats `{name}`; valid: {}",
                        TileStats::NAMES.join(", ")
                    ))
                })?,
                None => base.decoding.vae_tile_stats,
            },
            ..base.decoding
        },
        ..base
    })
    .and_then(|r| init(env, req, r))
}

/// `initImage` (and `maskImage`, `strength`): ARGB_8888 ints at the request's size.
fn init(env: &mut JNIEnv, req: &JObject, r: Request) -> Result<Request, Fail> {
    let Some(argb) = ints(env, req, "initImage", r.width * r.height)? else {
        if !env.get_field(req, "maskImage", "[I")?.l()?.is_null() {
            return Err(Fail::Msg("Request.maskImage needs an initImage".into()));
        }
        return Ok(r);
    };
    let rgb = argb
        .iter()
        .flat_map(|&p| [(p >> 16) as u8, (p >> 8) as u8, p as u8])
        .collect();
    // Luma of the mask's colour (ITU-R 601, as PIL's convert("L")): white repaints.
    let mask = ints(env, req, "maskImage", r.width * r.height)?.map(|m| {
        m.iter()
            .map(|&p| {
                (299 * ((p >> 16) & 0xFF) + 587 * ((p >> 8) & 0xFF) + 114 * (p & 0xFF)) as f32
                    / 255_000.0
            })
            .collect()
    });
    // Through its shortest decimal form: 0.7f is 0.69999998 as a double, and
    // 10 steps × that would run 6 steps where the 0.7 the caller meant runs 7.
    let strength = match float(env, req, "strength")? {
        s if s.is_nan() => None,
        s => Some(s.to_string().parse::<f64>().unwrap_or(s as f64)),
    };
    Ok(Request {
        init: Some(Init {
            strength,
            ..Init::new(Arc::new(Canvas {
                width: r.width,
                height: r.height,
                rgb,
                mask,
                mask_blur: 0.0,
            }))
        }),
        ..r
    })
}

/// An int array field: `None` when null, an error unless it holds `len` values.
fn ints(env: &mut JNIEnv, req: &JObject, name: &str, len: usize) -> Result<Option<Vec<i32>>, Fail> {
    let obj = env.get_field(req, name, "[I")?.l()?;
    if obj.is_null() {
        return Ok(None);
    }
    let arr = jni::objects::JIntArray::from(obj);
    let n = env.get_array_length(&arr)? as usize;
    if n != len {
        return Err(Fail::Msg(format!(
            "Request.{name} has {n} pixels; the request is for width x height = {len}"
        )));
    }
    let mut v = vec![0i32; n];
    env.get_int_array_region(&arr, 0, &mut v)?;
    env.delete_local_ref(arr)?;
    Ok(Some(v))
}

/// Writes the model's defaults into the unset fields of `req`.
pub(crate) fn fill_defaults(env: &mut JNIEnv, req: &JObject, base: &Request) -> Result<(), Fail> {
    if req.is_null() {
        return Err(Fail::NullPointer("request is null".into()));
    }
    for (name, value) in [
        ("width", base.width),
        ("height", base.height),
        ("steps", base.steps),
    ] {
        if int(env, req, name)? == 0 {
            env.set_field(
                req,
                name,
                "I",
                JValue::Int(i32::try_from(value).unwrap_or(i32::MAX)),
            )?;
        }
    }
    if float(env, req, "cfgScale")?.is_nan() {
        env.set_field(req, "cfgScale", "F", JValue::Float(base.cfg_scale))?;
    }
    if text(env, req, "sampler")?.is_none() {
        let name = env.new_string(base.sampling.sampler.info().name)?;
        env.set_field(req, "sampler", "Ljava/lang/String;", JValue::Object(&name))?;
    }
    Ok(())
}

/// Android's `Bitmap.setPixels` takes ARGB_8888 in ints; PNG bytes are for saving.
pub(crate) fn image<'l>(env: &mut JNIEnv<'l>, image: &Image) -> Result<JObject<'l>, Fail> {
    let pixels = image.width * image.height;
    let len = i32::try_from(pixels).map_err(|_| {
        Fail::Msg(format!(
            "image {}x{} is too large for a Java array",
            image.width, image.height
        ))
    })?;
    let argb: Vec<i32> = image
        .rgb
        .chunks_exact(3)
        .map(|p| (0xFF00_0000u32 | (p[0] as u32) << 16 | (p[1] as u32) << 8 | p[2] as u32) as i32)
        .collect();
    let ints = env.new_int_array(len)?;
    env.set_int_array_region(&ints, 0, &argb)?;
    let png = env.byte_array_from_slice(&image.to_png()?)?;
    let parameters = env.new_string(&image.parameters)?;
    let dims = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let obj = env.new_object(
        "org/sdrs/Image",
        "(II[I[BLjava/lang/String;)V",
        &[
            JValue::Int(dims(image.width)),
            JValue::Int(dims(image.height)),
            JValue::Object(&ints),
            JValue::Object(&png),
            JValue::Object(&parameters),
        ],
    )?;
    Ok(obj)
}
