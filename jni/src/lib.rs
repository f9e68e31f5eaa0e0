//! JNI entry points of `org.sdrs.StableDiffusion` (java/org/sdrs).
//!
//! Every entry point runs its body through [`guard`]: errors and panics become Java
//! exceptions and nothing unwinds into the JVM. A model is a [`Model`] boxed into a
//! `jlong`; the Java class guarantees that no call uses a handle after `nativeFree`
//! (it counts calls in flight and frees after the last one), so the entry points only
//! see live handles.
mod request;

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use std::time::Instant;

use jni::objects::{JClass, JIntArray, JObject, JString, JValue};
use jni::sys::{jbyteArray, jint, jlong, jobject, jobjectArray};
use jni::JNIEnv;

use sdrs_core::pipeline::upscale::Upscaler;
use sdrs_core::pipeline::{ControlNet, Image, Pipeline, Request, Stage};

/// Models alive in this process: a test checks that each handle is freed exactly once.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// What a handle points to.
struct Model {
    pipe: Mutex<Pipeline>,
    /// The model's run defaults, read once so that requests are read and checked
    /// without waiting for a run that holds `pipe`.
    defaults: Request,
    /// What image sides must be multiples of (for fitting init pictures).
    multiple: usize,
    /// Kept outside `pipe`'s lock so `cancel()` never waits for a run.
    runs: Mutex<Runs>,
    /// ControlNets requests have named, opened once each (by path).
    controls: Mutex<HashMap<String, Arc<ControlNet>>>,
    /// A model opened from a file descriptor keeps its own duplicate open, so its
    /// `/proc/self/fd/N` path stays valid whatever the caller does with the original.
    /// Declared after `pipe`: the mapping goes first.
    _fd: Option<OwnedFd>,
}

impl Model {
    fn new(pipe: Pipeline, fd: Option<OwnedFd>) -> Model {
        LIVE.fetch_add(1, Ordering::SeqCst);
        let defaults = pipe.request("");
        Model {
            multiple: pipe.size_multiple(),
            pipe: Mutex::new(pipe),
            defaults,
            runs: Mutex::new(Runs::default()),
            controls: Mutex::new(HashMap::new()),
            _fd: fd,
        }
    }

    /// A Java `Request` as this model runs it (its defaults where unset).
    fn read(&self, env: &mut JNIEnv, req: &JObject) -> Result<Request, Fail> {
        let open = |path: &str| -> Result<Arc<ControlNet>, Fail> {
            let mut cache = self.controls.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = cache.get(path) {
                return Ok(Arc::clone(c));
            }
            let c = Arc::new(ControlNet::open(std::path::Path::new(path))?);
            cache.insert(path.to_string(), Arc::clone(&c));
            Ok(c)
        };
        env.with_local_frame(32, |env| {
            request::read(env, req, &self.defaults, self.multiple, &open)
        })
    }

    fn into_handle(self) -> jlong {
        Box::into_raw(Box::new(self)) as jlong
    }

    /// # Safety
    /// `h` came from [`Model::into_handle`] and has not been freed.
    unsafe fn from_handle<'a>(h: jlong) -> Result<&'a Model, Fail> {
        (h as *const Model)
            .as_ref()
            .ok_or_else(|| Fail::IllegalState("the model is closed".into()))
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, Runs> {
        // Nothing that holds this lock can leave it inconsistent.
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Java's cancel(): its `cancels`-th call.
    fn cancel(&self, cancels: i64) {
        let mut runs = self.runs();
        runs.cancels = runs.cancels.max(cancels);
        for flag in &runs.flags {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The `generate` calls in flight (running or waiting for the pipeline).
#[derive(Default)]
struct Runs {
    flags: Vec<Arc<AtomicBool>>,
    /// The most recent cancel() seen. A Java call between entering `generate` (where it
    /// took its ticket, the count of cancel() calls so far) and registering here may
    /// have missed its flag being set: a ticket below this count says it was cancelled.
    cancels: i64,
}

/// Runs started with an `org.sdrs.Cancellation`: its id and the run's flag. Global,
/// as a token may serve runs on several models.
static TOKENS: Mutex<Vec<(i64, Arc<AtomicBool>)>> = Mutex::new(Vec::new());

fn tokens() -> std::sync::MutexGuard<'static, Vec<(i64, Arc<AtomicBool>)>> {
    // Nothing that holds this lock can leave it inconsistent.
    TOKENS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A registered cancel flag, unregistered when the run ends however it ends.
struct Run<'a> {
    model: &'a Model,
    flag: Arc<AtomicBool>,
}

impl<'a> Run<'a> {
    /// `token`: the id of the call's `Cancellation`, registered before its
    /// `isCancelled()` is read, so that a `cancel()` racing this start is seen by one
    /// side or the other (it sets its volatile field before it looks for runs).
    fn start(
        env: &mut JNIEnv,
        model: &'a Model,
        ticket: i64,
        token: &JObject,
    ) -> Result<Run<'a>, Fail> {
        let run = {
            let mut runs = model.runs();
            let flag = Arc::new(AtomicBool::new(ticket < runs.cancels));
            runs.flags.push(Arc::clone(&flag));
            Run { model, flag }
        };
        if !token.is_null() {
            let id = env.get_field(token, "id", "J")?.j()?;
            tokens().push((id, Arc::clone(&run.flag)));
            if env.call_method(token, "isCancelled", "()Z", &[])?.z()? {
                run.flag.store(true, Ordering::SeqCst);
            }
        }
        Ok(run)
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        self.model
            .runs()
            .flags
            .retain(|f| !Arc::ptr_eq(f, &self.flag));
        tokens().retain(|(_, f)| !Arc::ptr_eq(f, &self.flag));
    }
}

/// Why a call failed, and so which Java exception it throws.
pub(crate) enum Fail {
    /// `SdrsException`, or `CancelledException` for [`sdrs_core::Error::Interrupted`].
    Sdrs(sdrs_core::Error),
    /// `SdrsException` with this message.
    Msg(String),
    IllegalState(String),
    NullPointer(String),
    /// A Java exception is already pending (a listener threw, or a JNI call failed
    /// and raised one): it propagates as it is.
    Java,
}

impl From<sdrs_core::Error> for Fail {
    fn from(e: sdrs_core::Error) -> Self {
        Fail::Sdrs(e)
    }
}

impl From<jni::errors::Error> for Fail {
    fn from(e: jni::errors::Error) -> Self {
        match e {
            jni::errors::Error::JavaException => Fail::Java,
            e => Fail::Msg(format!("JNI: {e}")),
        }
    }
}

/// The message of an sdrs error: its Display, then each cause its Display leaves out.
/// (Most variants already print their cause, as `Io`'s "path: os error" does.)
pub(crate) fn message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        cause = c.source();
    }
    text
}

fn throw(env: &mut JNIEnv, fail: Fail) {
    // A pending exception says more than anything raised on top of it (and JNI
    // forbids most calls while one is pending).
    if env.exception_check().unwrap_or(true) {
        return;
    }
    let (class, msg) = match fail {
        Fail::Sdrs(e @ sdrs_core::Error::Interrupted) => {
            ("org/sdrs/CancelledException", message(&e))
        }
        Fail::Sdrs(e) => ("org/sdrs/SdrsException", message(&e)),
        Fail::Msg(m) => ("org/sdrs/SdrsException", m),
        Fail::IllegalState(m) => ("java/lang/IllegalStateException", m),
        Fail::NullPointer(m) => ("java/lang/NullPointerException", m),
        Fail::Java => return,
    };
    if env.throw_new(class, &msg).is_err() && !env.exception_check().unwrap_or(true) {
        // Only if the class itself cannot be found (a broken classpath): still an exception.
        let _ = env.throw_new("java/lang/RuntimeException", msg);
    }
}

/// Runs an entry point's body: its errors and panics become Java exceptions, and
/// `default` is returned to the JVM (which ignores it while an exception is pending).
fn guard<'local, T>(
    env: &mut JNIEnv<'local>,
    default: T,
    body: impl FnOnce(&mut JNIEnv<'local>) -> Result<T, Fail>,
) -> T {
    match catch_unwind(AssertUnwindSafe(|| body(env))) {
        Ok(Ok(v)) => v,
        Ok(Err(fail)) => {
            throw(env, fail);
            default
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            throw(
                env,
                Fail::Msg(format!(
                    "sdrs internal error (a bug; please report it): {what}"
                )),
            );
            default
        }
    }
}

/// `threads <= 0`: every core.
fn threads(n: jint) -> usize {
    match usize::try_from(n) {
        Ok(n) if n > 0 => n,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// A Java string that must not be null.
pub(crate) fn string(env: &mut JNIEnv, s: &JObject, what: &str) -> Result<String, Fail> {
    if s.is_null() {
        return Err(Fail::NullPointer(format!("{what} is null")));
    }
    // get_string checks that the object is a java.lang.String.
    Ok(env.get_string(<&JString>::from(s))?.into())
}

/// Called by the JVM when it loads the library. A HotSpot JVM owns the process's SIGBUS
/// handler (another library may only chain to it through `libjsig`), so sdrs leaves it
/// alone there: a model file truncated while mapped then ends the process, as any
/// mapped file's would. Android's runtime ("Dalvik" as `java.vm.name`) chains native
/// handlers itself, so there sdrs keeps its guard and turns that into an `SdrsException`.
#[no_mangle]
pub extern "system" fn JNI_OnLoad(vm: jni::JavaVM, _reserved: *mut std::ffi::c_void) -> jint {
    // The library's `log` records go to logcat under the tag "sdrs" (warnings and
    // errors; a debug build's info too), where an app developer reads them.
    #[cfg(target_os = "android")]
    android_logger::init_once(
        android_logger::Config::default()
            .with_tag("sdrs")
            .with_max_level(if cfg!(debug_assertions) {
                log::LevelFilter::Info
            } else {
                log::LevelFilter::Warn
            }),
    );
    let android = catch_unwind(AssertUnwindSafe(|| -> Option<bool> {
        let mut env = vm.get_env().ok()?;
        let mut vm_name = || -> Option<String> {
            let key = env.new_string("java.vm.name").ok()?;
            let name = env
                .call_static_method(
                    "java/lang/System",
                    "getProperty",
                    "(Ljava/lang/String;)Ljava/lang/String;",
                    &[(&key).into()],
                )
                .ok()?
                .l()
                .ok()?;
            if name.is_null() {
                return None;
            }
            env.get_string(&name.into()).ok().map(Into::into)
        };
        let name = vm_name();
        // A failed lookup must not leave an exception to fail the library's loading.
        let _ = env.exception_clear();
        Some(name.as_deref() == Some("Dalvik"))
    }));
    if !matches!(android, Ok(Some(true))) {
        sdrs_core::ggml::MapGuard::disable();
    }
    jni::sys::JNI_VERSION_1_6
}

#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeLoad<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    path: JString<'l>,
    n: jint,
) -> jlong {
    guard(&mut env, 0, |env| {
        let path = PathBuf::from(string(env, &path, "path")?);
        Ok(Model::new(Pipeline::load_gguf(&path, threads(n))?, None).into_handle())
    })
}

#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeFromFd<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    fd: jint,
    n: jint,
) -> jlong {
    guard(&mut env, 0, |_| {
        // Our own descriptor: the caller may close theirs as soon as this returns.
        // SAFETY: fcntl on any integer is safe; it fails with EBADF on a closed one.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(Fail::Msg(format!(
                "file descriptor {fd}: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        // The path opens the same file anew (a mapping needs no more), also where the
        // app has no path of its own (Android's storage access framework).
        let path = PathBuf::from(format!("/proc/self/fd/{dup}"));
        Ok(Model::new(Pipeline::load_gguf(&path, threads(n))?, Some(owned)).into_handle())
    })
}

#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeDemo<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    n: jint,
) -> jlong {
    guard(&mut env, 0, |_| {
        Ok(Model::new(Pipeline::demo(threads(n))?, None).into_handle())
    })
}

/// Fills the unset fields of a `Request` with the model's defaults.
#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeDefaults<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    req: JObject<'l>,
) {
    guard(&mut env, (), |env| {
        // SAFETY: the Java class passes only live handles.
        let model = unsafe { Model::from_handle(h)? };
        env.with_local_frame(8, |env| request::fill_defaults(env, &req, &model.defaults))
    })
}

/// `Progress.Stage`'s ordinals.
const TEXT: i32 = 0;
const SAMPLING: i32 = 1;
const DECODING: i32 = 2;
const DONE: i32 = 3;

#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeGenerate<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    ticket: jlong,
    req: JObject<'l>,
    listener: JObject<'l>,
    token: JObject<'l>,
) -> jobject {
    guard(&mut env, std::ptr::null_mut(), |env| {
        // SAFETY: the Java class passes only live handles.
        let model = unsafe { Model::from_handle(h)? };
        let mut r = model.read(env, &req)?;
        let run = Run::start(env, model, ticket, &token)?;
        r.cancel = Some(Arc::clone(&run.flag));
        let pipe = lock(model)?;
        let start = Instant::now();
        let mut sampling_from = start;
        // A listener that throws stops the run, and its exception is what the caller sees.
        let mut listener_threw = false;
        let mut report = |env: &mut JNIEnv<'l>,
                          stage: i32,
                          counts: (usize, usize),
                          remaining: f64,
                          preview: Option<&sdrs_core::pipeline::Image>| {
            if listener.is_null() || listener_threw {
                return;
            }
            let elapsed = start.elapsed().as_secs_f64();
            let sent = env.with_local_frame(8, |env| -> Result<(), Fail> {
                let p = request::progress(env, stage, counts, (elapsed, remaining), preview)?;
                env.call_method(
                    &listener,
                    "onProgress",
                    "(Lorg/sdrs/Progress;)V",
                    &[JValue::Object(&p)],
                )?;
                Ok(())
            });
            if sent.is_err() {
                listener_threw = true;
                run.flag.store(true, Ordering::SeqCst);
            }
        };
        report(env, TEXT, (0, 1), f64::NAN, None);
        let result = pipe.generate(&r, &mut |stage| match stage {
            Stage::TextEncoded => sampling_from = Instant::now(),
            Stage::Step { done, total } => {
                // The steps so far at their mean rate (the first includes graph setup,
                // so the estimate errs long and shortens).
                let per_step = sampling_from.elapsed().as_secs_f64() / done.max(1) as f64;
                let left = per_step * total.saturating_sub(done) as f64;
                report(env, SAMPLING, (done, total), left, None);
            }
            Stage::Preview { done, total, image } => {
                report(env, SAMPLING, (done, total), f64::NAN, Some(image))
            }
            Stage::Sampled => report(env, DECODING, (0, 1), f64::NAN, None),
            Stage::Decoding { done, total } => report(env, DECODING, (done, total), f64::NAN, None),
            Stage::Decoded => report(env, DONE, (1, 1), 0.0, None),
            Stage::Sampling { .. } => {}
        });
        drop(pipe);
        if listener_threw {
            return Err(Fail::Java);
        }
        let image = result?;
        Ok(request::image(env, &image)?.into_raw())
    })
}

/// What the request needs in memory, stage by stage, as the run would plan it.
#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativePlan<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    req: JObject<'l>,
) -> jobject {
    guard(&mut env, std::ptr::null_mut(), |env| {
        // SAFETY: the Java class passes only live handles.
        let model = unsafe { Model::from_handle(h)? };
        let r = model.read(env, &req)?;
        let pipe = lock(model)?;
        let (lw, _) = pipe.latent_size(r.width, r.height)?;
        let plan = pipe.plan(&r)?;
        drop(pipe);
        Ok(request::plan(env, &plan, r.width / lw.max(1))?.into_raw())
    })
}

#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeSetVae<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    path: JString<'l>,
) {
    guard(&mut env, (), |env| {
        // SAFETY: the Java class passes only live handles.
        let model = unsafe { Model::from_handle(h)? };
        let path = string(env, &path, "path")?;
        // Waits for runs in progress: they read the VAE.
        lock(model)?.set_vae(std::path::Path::new(&path))?;
        Ok(())
    })
}

/// `Cancellation.cancel()`: stops every run started with that token.
#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeCancelToken<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    id: jlong,
) {
    guard(&mut env, (), |_| {
        for (_, flag) in tokens().iter().filter(|(t, _)| *t == id) {
            flag.store(true, Ordering::SeqCst);
        }
        Ok(())
    })
}

/// `StableDiffusion.upscale`: an image enlarged by an ESRGAN-family upscaler, in tiles
/// that fit the process's memory cgroup.
#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeUpscale<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    path: JString<'l>,
    width: jint,
    height: jint,
    argb: JIntArray<'l>,
    parameters: JString<'l>,
    repeats: jint,
    n: jint,
) -> jobject {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let path = PathBuf::from(string(env, &path, "upscaler")?);
        let (w, h) = match (usize::try_from(width), usize::try_from(height)) {
            (Ok(w), Ok(h)) if w > 0 && h > 0 => (w, h),
            _ => return Err(Fail::Msg(format!("a {width}x{height} image"))),
        };
        let repeats = usize::try_from(repeats)
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| Fail::Msg(format!("{repeats} upscale passes: at least one")))?;
        let count = env.get_array_length(&argb)? as usize;
        if count != w * h {
            return Err(Fail::Msg(format!("{count} pixels for a {w}x{h} image")));
        }
        let mut px = vec![0i32; count];
        env.get_int_array_region(&argb, 0, &mut px)?;
        let parameters = string(env, &parameters, "parameters")?;
        let image = Image {
            width: w,
            height: h,
            rgb: request::rgb_of(&px),
            parameters,
            timings: [0.0; 3],
        };
        let mut up = Upscaler::load(&path, threads(n))?;
        up.fit((w, h), None)?;
        let out = up.upscale(&image, repeats, &mut |_, _| Ok(()))?;
        Ok(request::image(env, &out)?.into_raw())
    })
}

/// `Image.png()`, encoded when first asked for.
#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativePng<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    width: jint,
    height: jint,
    argb: JIntArray<'l>,
    parameters: JString<'l>,
) -> jbyteArray {
    guard(&mut env, std::ptr::null_mut(), |env| {
        Ok(request::png(env, (width, height), &argb, &parameters)?.into_raw())
    })
}

/// The request option fields as `name:descriptor` (for tests).
#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeOptionFields<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
) -> jobjectArray {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let fields = request::option_fields();
        let arr = env.new_object_array(clamp(fields.len()), "java/lang/String", JObject::null())?;
        for (i, f) in fields.iter().enumerate() {
            let s = env.new_string(f)?;
            env.set_object_array_element(&arr, clamp(i), &s)?;
            env.delete_local_ref(s)?;
        }
        Ok(arr.into_raw())
    })
}

#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeAddEmbeddings<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    path: JString<'l>,
) -> jint {
    guard(&mut env, 0, |env| {
        // SAFETY: the Java class passes only live handles.
        let model = unsafe { Model::from_handle(h)? };
        let path = string(env, &path, "path")?;
        // Waits for runs in progress: they read the embeddings.
        let added = lock(model)?.add_embeddings(std::path::Path::new(&path))?;
        Ok(clamp(added))
    })
}

#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeCancel<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    cancels: jlong,
) {
    guard(&mut env, (), |_| {
        // SAFETY: the Java class passes only live handles.
        unsafe { Model::from_handle(h)? }.cancel(cancels);
        Ok(())
    })
}

#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeFree<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
) {
    guard(&mut env, (), |_| {
        if h != 0 {
            // SAFETY: the Java class frees each handle once, after its last call.
            drop(unsafe { Box::from_raw(h as *mut Model) });
        }
        Ok(())
    })
}

/// Models not yet freed (for tests).
#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativeLiveModels<'l>(
    _env: JNIEnv<'l>,
    _c: JClass<'l>,
) -> jint {
    clamp(LIVE.load(Ordering::SeqCst))
}

/// Panics inside an entry point, so a test can see the panic become an exception.
#[no_mangle]
pub extern "system" fn Java_org_sdrs_StableDiffusion_nativePanicForTest<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    msg: JString<'l>,
) {
    guard(&mut env, (), |env| {
        let msg = string(env, &msg, "message")?;
        panic!("{msg}")
    })
}

/// The pipeline, unless an earlier run panicked while holding it: its state is then
/// unknown, and a fresh load is the safe way on.
fn lock(model: &Model) -> Result<std::sync::MutexGuard<'_, Pipeline>, Fail> {
    model.pipe.lock().map_err(|_| Fail::Msg("this model stopped at an internal error in an earlier call; close it and load it again".into()))
}

fn clamp(n: usize) -> jint {
    jint::try_from(n).unwrap_or(jint::MAX)
}
