//! `org.sdrs.Request` in; `org.sdrs.Image`, `Progress` and `Plan` out.
//!
//! The request's option fields are the library's table of request options
//! ([`sdrs_core::pipeline::options::OPTIONS`]): each is read by the name and type the
//! table gives and applied as the CLI applies its flag. Unset fields (0, null, NaN,
//! false) take the model's defaults, as the CLI's unset options do.
use jni::objects::{JIntArray, JObject, JObjectArray, JString, JValue};
use jni::JNIEnv;

use std::sync::Arc;

use sdrs_core::budget::Plan;
use sdrs_core::model::tile::TileStats;
use sdrs_core::pipeline::options::{Kind, Value, OPTIONS};
use sdrs_core::pipeline::{
    Canvas, CanvasOptions, Control, ControlNet, Image, Init, Request, RngKind,
};
use sdrs_core::prompt::Emphasis;

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

/// A whole-number field's value: `None` for 0 (unset, which means `unset`), an error
/// when negative.
fn positive(name: &str, n: i64, unset: &str) -> Result<Option<u64>, Fail> {
    match n {
        0 => Ok(None),
        n => u64::try_from(n).map(Some).map_err(|_| {
            Fail::Msg(format!(
                "Request.{name} must be positive (or 0 for {unset}), not {n}"
            ))
        }),
    }
}

/// A size: 0 for unset.
fn size(env: &mut JNIEnv, obj: &JObject, name: &str) -> Result<Option<usize>, Fail> {
    Ok(positive(name, int(env, obj, name)?.into(), "the default")?.map(|n| n as usize))
}

/// A float through its shortest decimal form: 0.7f is 0.69999998 as a double, and
/// 10 steps × that strength would run 6 steps where the 0.7 the caller meant runs 7.
fn decimal(f: f32) -> f64 {
    f.to_string().parse::<f64>().unwrap_or(f as f64)
}

/// The value of option field `name` of kind `kind`, `None` when unset.
fn option(env: &mut JNIEnv, req: &JObject, name: &str, kind: Kind) -> Result<Option<Value>, Fail> {
    let field = env.get_field(req, name, kind.java_type())?;
    Ok(match kind {
        Kind::Text => {
            let obj = field.l()?;
            if obj.is_null() {
                None
            } else {
                let s = string(env, &obj, name)?;
                env.delete_local_ref(obj)?;
                Some(Value::Text(s))
            }
        }
        Kind::Number => Some(field.f()?)
            .filter(|f| !f.is_nan())
            .map(|f| Value::Number(decimal(f))),
        Kind::Count => {
            positive(name, field.i()?.into(), "the default")?.map(|n| Value::Count(n as usize))
        }
        Kind::Flag => field.z()?.then_some(Value::Flag(true)),
        Kind::Bytes => positive(name, field.j()?, "none")?.map(Value::Bytes),
        Kind::List => {
            let obj = field.l()?;
            if obj.is_null() {
                None
            } else {
                let arr = JObjectArray::from(obj);
                let n = env.get_array_length(&arr)?;
                let mut items = Vec::with_capacity(n as usize);
                for i in 0..n {
                    let item = env.get_object_array_element(&arr, i)?;
                    items.push(string(env, &item, &format!("Request.{name}[{i}]"))?);
                    env.delete_local_ref(item)?;
                }
                env.delete_local_ref(arr)?;
                Some(Value::List(items))
            }
        }
    })
}

/// `defaults`: the model's ([`sdrs_core::pipeline::Pipeline::request`]); `multiple`:
/// what its image sides must be multiples of.
pub(crate) fn read(
    env: &mut JNIEnv,
    req: &JObject,
    defaults: &Request,
    multiple: usize,
    open_control: &dyn Fn(&str) -> Result<Arc<ControlNet>, Fail>,
) -> Result<Request, Fail> {
    if req.is_null() {
        return Err(Fail::NullPointer("request is null".into()));
    }
    let prompt = text(env, req, "prompt")?
        .ok_or_else(|| Fail::NullPointer("Request.prompt is null".into()))?;
    let (width, height) = (size(env, req, "width")?, size(env, req, "height")?);
    let mut r = Request {
        prompt,
        // Java has no unsigned long: the bits are the seed, as the CLI's u64.
        seed: env.get_field(req, "seed", "J")?.j()? as u64,
        init: init(env, req, defaults, (width, height), multiple)?,
        ..defaults.clone()
    };
    for o in OPTIONS {
        if let Some(v) = option(env, req, o.field, o.kind)? {
            o.apply_as(&mut r, v, &format!("Request.{}", o.field))?;
        }
    }
    r.settle_size((width, height));
    r.controls = control(env, req, &r, multiple, open_control)?
        .into_iter()
        .collect();
    Ok(r)
}

/// `controlNet` with `controlImage` (`controlWidth` x `controlHeight`, else the
/// request's size) fitted to the output size as the CLI fits `--control-image`.
fn control(
    env: &mut JNIEnv,
    req: &JObject,
    r: &Request,
    multiple: usize,
    open: &dyn Fn(&str) -> Result<Arc<ControlNet>, Fail>,
) -> Result<Option<Control>, Fail> {
    let picture = (
        size(env, req, "controlWidth")?.unwrap_or(r.width),
        size(env, req, "controlHeight")?.unwrap_or(r.height),
    );
    let path = text(env, req, "controlNet")?;
    let argb = ints(env, req, "controlImage", picture)?;
    let (path, argb) = match (path, argb) {
        (None, None) => return Ok(None),
        (Some(p), Some(a)) => (p, a),
        _ => {
            return Err(Fail::Msg(
                "Request.controlNet and Request.controlImage go together".into(),
            ))
        }
    };
    let opts = CanvasOptions {
        size: Some((r.width, r.height)),
        multiple,
        ..Default::default()
    };
    let mut canvas = Canvas::from_rgb((picture.0, picture.1, rgb_of(&argb)), None, &opts)?;
    let canny = env.get_field(req, "canny", "Z")?.z()?;
    if canny {
        use sdrs_core::pipeline::preprocess;
        canvas = preprocess::canny(&canvas, preprocess::CANNY_LOW, preprocess::CANNY_HIGH)?;
    }
    let or = |v: f32, d: f32| if v.is_nan() { d } else { v };
    Ok(Some(Control {
        strength: or(float(env, req, "controlStrength")?, 1.0),
        start: or(float(env, req, "controlStart")?, 0.0),
        end: or(float(env, req, "controlEnd")?, 1.0),
        guess: env.get_field(req, "guessMode", "Z")?.z()?,
        module: if canny { "canny" } else { "none" }.into(),
        ..Control::new(open(&path)?, Arc::new(canvas))
    }))
}

/// `initImage` (`initWidth` x `initHeight`, else the request's size) and `maskImage`
/// (`maskWidth` x `maskHeight`, else the init picture's), fitted as the CLI fits files.
fn init(
    env: &mut JNIEnv,
    req: &JObject,
    defaults: &Request,
    asked: (Option<usize>, Option<usize>),
    multiple: usize,
) -> Result<Option<Init>, Fail> {
    let picture = (
        size(env, req, "initWidth")?
            .or(asked.0)
            .unwrap_or(defaults.width),
        size(env, req, "initHeight")?
            .or(asked.1)
            .unwrap_or(defaults.height),
    );
    let Some(argb) = ints(env, req, "initImage", picture)? else {
        if !env.get_field(req, "maskImage", "[I")?.l()?.is_null() {
            return Err(Fail::Msg("Request.maskImage needs an initImage".into()));
        }
        return Ok(None);
    };
    let rgb = rgb_of(&argb);
    let mask_size = (
        size(env, req, "maskWidth")?.unwrap_or(picture.0),
        size(env, req, "maskHeight")?.unwrap_or(picture.1),
    );
    // Luma of the mask's colour (ITU-R 601, as PIL's convert("L")): white repaints.
    let mask = ints(env, req, "maskImage", mask_size)?.map(|m| {
        let luma = m
            .iter()
            .map(|&p| {
                let (r, g, b) = ((p >> 16) & 0xFF, (p >> 8) & 0xFF, p & 0xFF);
                ((299 * r + 587 * g + 114 * b + 500) / 1000) as u8
            })
            .collect();
        (mask_size.0, mask_size.1, luma)
    });
    let pad = match env.get_field(req, "pad", "[I")?.l()? {
        obj if obj.is_null() => [0; 4],
        obj => {
            let arr = JIntArray::from(obj);
            let mut v = [0i32; 4];
            if env.get_array_length(&arr)? != 4 {
                return Err(Fail::Msg(
                    "Request.pad must hold 4 values: left, top, right, bottom".into(),
                ));
            }
            env.get_int_array_region(&arr, 0, &mut v)?;
            let mut pad = [0usize; 4];
            for (p, v) in pad.iter_mut().zip(v) {
                *p = usize::try_from(v).map_err(|_| {
                    Fail::Msg(format!("Request.pad values must not be negative, not {v}"))
                })?;
            }
            pad
        }
    };
    let mask_blur = match float(env, req, "maskBlur")? {
        b if b.is_nan() => 4.0,
        b => b,
    };
    let opts = CanvasOptions {
        size: Canvas::size_for(
            (dim(picture.0) as u32, dim(picture.1) as u32),
            asked,
            pad,
            multiple,
        ),
        multiple,
        pad,
        mask_blur,
    };
    let canvas = Canvas::from_rgb((picture.0, picture.1, rgb), mask, &opts)?;
    Ok(Some(Init::new(Arc::new(canvas))))
}

/// ARGB_8888 ints as 8-bit RGB (alpha dropped).
pub(crate) fn rgb_of(argb: &[i32]) -> Vec<u8> {
    argb.iter()
        .flat_map(|&p| [(p >> 16) as u8, (p >> 8) as u8, p as u8])
        .collect()
}

/// An int array field: `None` when null, an error unless it holds width x height values.
fn ints(
    env: &mut JNIEnv,
    req: &JObject,
    name: &str,
    (w, h): (usize, usize),
) -> Result<Option<Vec<i32>>, Fail> {
    let obj = env.get_field(req, name, "[I")?.l()?;
    if obj.is_null() {
        return Ok(None);
    }
    let arr = JIntArray::from(obj);
    let n = env.get_array_length(&arr)? as usize;
    if n != w * h {
        return Err(Fail::Msg(format!(
            "Request.{name} has {n} pixels; {w}x{h} needs {}",
            w * h
        )));
    }
    let mut v = vec![0i32; n];
    env.get_int_array_region(&arr, 0, &mut v)?;
    env.delete_local_ref(arr)?;
    Ok(Some(v))
}

/// Writes the model's defaults (and the CLI's, where the model has none) into the
/// unset fields of `req`, so that an app can show what a run would use.
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
    let floats = [
        ("cfgScale", base.cfg_scale),
        ("guidanceRescale", base.sampling.guidance_rescale),
        ("aestheticScore", base.micro.aesthetic_score),
        // The CLI's --mask-blur default.
        ("maskBlur", 4.0),
    ];
    for (name, value) in floats {
        if float(env, req, name)?.is_nan() {
            env.set_field(req, name, "F", JValue::Float(value))?;
        }
    }
    if int(env, req, "clipSkip")? == 0 {
        env.set_field(
            req,
            "clipSkip",
            "I",
            JValue::Int(dim(base.prompting.clip_skip)),
        )?;
    }
    let names = [
        ("negative", base.negative.as_str()),
        ("sampler", base.sampling.sampler.info().name),
        (
            "rng",
            match base.sampling.rng {
                RngKind::Torch => "torch",
                RngKind::Cuda => "cuda",
                RngKind::Native => "native",
            },
        ),
        (
            "emphasis",
            match base.prompting.emphasis {
                Emphasis::Original => "original",
                Emphasis::NoNorm => "no-norm",
                Emphasis::None => "none",
            },
        ),
        (
            "vaeTileStats",
            match base.decoding.vae_tile_stats {
                TileStats::Tile => "tile",
                TileStats::Image => "image",
            },
        ),
    ];
    for (name, value) in names {
        if text(env, req, name)?.is_none() {
            let value = env.new_string(value)?;
            env.set_field(req, name, "Ljava/lang/String;", JValue::Object(&value))?;
            env.delete_local_ref(value)?;
        }
    }
    Ok(())
}

fn dim(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Opaque ARGB_8888 ints, as Android's `Bitmap.setPixels` takes them.
pub(crate) fn argb<'l>(env: &mut JNIEnv<'l>, image: &Image) -> Result<JIntArray<'l>, Fail> {
    let len = i32::try_from(image.width * image.height).map_err(|_| {
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
    Ok(ints)
}

/// The finished picture: its pixels, and a PNG only when asked for (`Image.png()`).
pub(crate) fn image<'l>(env: &mut JNIEnv<'l>, image: &Image) -> Result<JObject<'l>, Fail> {
    let ints = argb(env, image)?;
    let parameters = env.new_string(&image.parameters)?;
    let [text, sampling, decode] = image.timings;
    Ok(env.new_object(
        "org/sdrs/Image",
        "(II[ILjava/lang/String;DDD)V",
        &[
            JValue::Int(dim(image.width)),
            JValue::Int(dim(image.height)),
            JValue::Object(&ints),
            JValue::Object(&parameters),
            JValue::Double(text),
            JValue::Double(sampling),
            JValue::Double(decode),
        ],
    )?)
}

/// `Image.png()`: the pixels (opaque ARGB ints) as a PNG with the parameters chunk.
pub(crate) fn png<'l>(
    env: &mut JNIEnv<'l>,
    (width, height): (i32, i32),
    argb: &JIntArray,
    parameters: &JString,
) -> Result<jni::objects::JByteArray<'l>, Fail> {
    let (w, h) = (width.max(0) as usize, height.max(0) as usize);
    let n = env.get_array_length(argb)? as usize;
    if n != w * h {
        return Err(Fail::Msg(format!("{n} pixels for a {w}x{h} image")));
    }
    let mut px = vec![0i32; n];
    env.get_int_array_region(argb, 0, &mut px)?;
    let image = Image {
        width: w,
        height: h,
        rgb: rgb_of(&px),
        parameters: string(env, parameters, "parameters")?,
        timings: [0.0; 3],
    };
    Ok(env.byte_array_from_slice(&image.to_png()?)?)
}

/// `org.sdrs.Plan` from the library's plan.
pub(crate) fn plan<'l>(
    env: &mut JNIEnv<'l>,
    plan: &Plan,
    scale: usize,
) -> Result<JObject<'l>, Fail> {
    let needs =
        env.new_object_array(dim(plan.needs.len()), "org/sdrs/Plan$Need", JObject::null())?;
    let bytes = |b: u64| JValue::Long(i64::try_from(b).unwrap_or(i64::MAX));
    for (i, n) in plan.needs.iter().enumerate() {
        let stage = env.new_string(n.stage)?;
        let need = env.new_object(
            "org/sdrs/Plan$Need",
            "(Ljava/lang/String;JJJ)V",
            &[
                JValue::Object(&stage),
                bytes(n.weights),
                bytes(n.compute),
                bytes(n.other),
            ],
        )?;
        env.set_object_array_element(&needs, dim(i), &need)?;
        env.delete_local_ref(need)?;
        env.delete_local_ref(stage)?;
    }
    let summary = env.new_string(plan.summary())?;
    // Tiles in pixels, as an app sizes things.
    let tile = plan.tiling.map_or(0, |t| t.tile_w.max(t.tile_h) * scale);
    Ok(env.new_object(
        "org/sdrs/Plan",
        "(J[Lorg/sdrs/Plan$Need;JZZILjava/lang/String;)V",
        &[
            bytes(plan.peak()),
            JValue::Object(&needs),
            bytes(plan.budget.map_or(0, |b| b.bytes)),
            JValue::Bool(plan.split_guidance.into()),
            JValue::Bool(plan.stream_unet.into()),
            JValue::Int(dim(tile)),
            JValue::Object(&summary),
        ],
    )?)
}

/// `org.sdrs.Progress`. `preview`: ARGB pixels and their size.
pub(crate) fn progress<'l>(
    env: &mut JNIEnv<'l>,
    stage: i32,
    (done, total): (usize, usize),
    (elapsed, remaining): (f64, f64),
    preview: Option<&Image>,
) -> Result<JObject<'l>, Fail> {
    let (pixels, pw, ph) = match preview {
        Some(p) => (JObject::from(argb(env, p)?), p.width, p.height),
        None => (JObject::null(), 0, 0),
    };
    Ok(env.new_object(
        "org/sdrs/Progress",
        "(IIIDD[III)V",
        &[
            JValue::Int(stage),
            JValue::Int(dim(done)),
            JValue::Int(dim(total)),
            JValue::Double(elapsed),
            JValue::Double(remaining),
            JValue::Object(&pixels),
            JValue::Int(dim(pw)),
            JValue::Int(dim(ph)),
        ],
    )?)
}

/// Every option field as `name:descriptor`, for the test that the Java class has them.
pub(crate) fn option_fields() -> Vec<String> {
    OPTIONS
        .iter()
        .map(|o| format!("{}:{}", o.field, o.kind.java_type()))
        .collect()
}
