//! Finding ggml's CPU backend at run time.
//!
//! ggml is built with one CPU library per instruction-set level (`GGML_CPU_ALL_VARIANTS`:
//! SSE4.2, AVX, AVX2/FMA, AVX-512, AVX-512 VNNI/BF16, …). At first use the registry loads
//! every `libggml-cpu-*.so` it finds, keeps the one that scores best on this CPU, and the
//! rest of sdrs only ever talks to that device. So one binary runs on any x86-64 and
//! still uses AVX-512 where the CPU has it. A static build (one CPU library linked in)
//! registers its device at start-up, and the same code finds it.
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::OnceLock;

use super::sys;
use crate::error::{Error, Result};

/// Where `sdrs` looks for the CPU libraries, first match wins: this environment
/// variable, the executable's own directory, then the build's output directory.
pub const BACKEND_DIR_ENV: &str = "SDRS_GGML_BACKENDS";

#[derive(Clone, Copy)]
pub(crate) struct Device(NonNull<sys::ggml_backend_device>);

// SAFETY: registered devices are process-wide singletons that ggml never frees, and
// the calls made through them here are thread-safe in ggml.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    pub(crate) fn as_ptr(self) -> *mut sys::ggml_backend_device {
        self.0.as_ptr()
    }
}

/// The CPU backend as loaded: which library, and what ggml says it can use.
#[derive(Clone, Debug)]
pub struct CpuBackendInfo {
    /// The variant library ggml picked (`None` when the CPU backend is linked in).
    pub library: Option<PathBuf>,
    /// ggml's description of the device (the CPU model name).
    pub description: String,
    /// ggml's feature list for the loaded variant, e.g. `AVX512 = 1`, `LLAMAFILE = 1`.
    pub features: Vec<(String, String)>,
}

/// The CPU device, loading the best variant on first call.
pub(crate) fn cpu_backend_device() -> Result<Device> {
    static CPU: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    CPU.get_or_init(load_cpu).clone().map_err(Error::Ggml)
}

fn find_cpu_device() -> Option<Device> {
    // SAFETY: plain registry query.
    NonNull::new(unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) })
        .map(Device)
}

fn load_cpu() -> std::result::Result<Device, String> {
    route_logs();
    if let Some(dev) = find_cpu_device() {
        return Ok(dev);
    }
    let candidates = backend_dirs();
    let Some(dir) = candidates.iter().find(|d| has_cpu_library(d)) else {
        if let Some(apk) = own_library().filter(|p| p.extension().is_some_and(|e| e == "apk")) {
            return load_from_apk(&apk);
        }
        let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
        return Err(format!(
            "no ggml CPU library (libggml-cpu-*.so) found; looked in: {} (set {BACKEND_DIR_ENV} to the folder that holds them)",
            if looked.is_empty() { "nowhere".into() } else { looked.join(", ") }
        ));
    };
    let c = CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} contains a NUL byte", dir.display()))?;
    // SAFETY: the path is a valid C string; ggml loads, scores and registers libraries.
    unsafe { sys::ggml_backend_load_all_from_path(c.as_ptr()) };
    find_cpu_device()
        .ok_or_else(|| format!("no ggml CPU library in {} runs on this CPU", dir.display()))
}

fn backend_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os(BACKEND_DIR_ENV) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(d) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(d);
    }
    // Loaded as a library (the JNI library in an Android app, beside its ggml libraries):
    // the folder of the file that holds this code.
    if let Some(d) = own_library().and_then(|p| p.parent().map(Path::to_path_buf)) {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    if let Some(d) = option_env!("SDRS_BUILD_GGML_BACKENDS") {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

fn has_cpu_library(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libggml-cpu") && name.ends_with(".so")
        })
    })
}

/// The Android ABI folder of this build's libraries inside an APK (`lib/<abi>/`).
const APK_ABI: &str = if cfg!(target_arch = "aarch64") {
    "arm64-v8a"
} else if cfg!(target_arch = "x86_64") {
    "x86_64"
} else if cfg!(target_arch = "arm") {
    "armeabi-v7a"
} else {
    "x86"
};

/// An app that keeps its native libraries uncompressed in the APK (Android's default
/// since 6.0, `extractNativeLibs="false"`) has them mapped straight from the APK: there
/// is no folder to list. The CPU variants are listed from the APK's zip directory
/// instead and loaded by file name, which the app's linker namespace finds inside it.
fn load_from_apk(apk: &Path) -> std::result::Result<Device, String> {
    let names = apk_cpu_libraries(apk)?;
    let (best, _) = best_variant(&names).ok_or_else(|| {
        format!(
            "{}: none of its ggml CPU libraries ({}) runs on this CPU",
            apk.display(),
            names.join(", ")
        )
    })?;
    let c = CString::new(best.as_str()).map_err(|_| format!("{best}: a NUL byte"))?;
    // SAFETY: a valid C string; ggml loads and registers the library.
    unsafe { sys::ggml_backend_load(c.as_ptr()) };
    find_cpu_device()
        .ok_or_else(|| format!("{}: {best} did not register a CPU device", apk.display()))
}

/// The `libggml-cpu-*.so` files of this ABI in an APK (a zip file).
fn apk_cpu_libraries(apk: &Path) -> std::result::Result<Vec<String>, String> {
    let file = std::fs::File::open(apk).map_err(|e| format!("{}: {e}", apk.display()))?;
    let zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| format!("{}: not a readable APK: {e}", apk.display()))?;
    let folder = format!("lib/{APK_ABI}/");
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.strip_prefix(&folder))
        .filter(|n| n.starts_with("libggml-cpu") && n.ends_with(".so") && !n.contains('/'))
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Err(format!(
            "{}: no ggml CPU library (lib/{APK_ABI}/libggml-cpu-*.so) in the APK",
            apk.display()
        ));
    }
    Ok(names)
}

/// The library among `libraries` (paths, or names the dynamic linker resolves) that
/// scores best on this CPU, by each one's own `ggml_backend_score` (0: it cannot run
/// here), as ggml's folder scan chooses.
fn best_variant(libraries: &[String]) -> Option<(String, i32)> {
    let mut best: Option<(String, i32)> = None;
    for lib in libraries {
        let Ok(c) = CString::new(lib.as_str()) else {
            continue;
        };
        // SAFETY: loading a ggml CPU variant runs no code beyond its initialisers;
        // the score function takes nothing and returns an int; the handle is closed
        // before the next.
        let score = unsafe {
            let handle = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if handle.is_null() {
                continue;
            }
            let f = libc::dlsym(handle, c"ggml_backend_score".as_ptr());
            let score = if f.is_null() {
                0
            } else {
                let f: extern "C" fn() -> std::ffi::c_int = std::mem::transmute(f);
                f()
            };
            libc::dlclose(handle);
            score
        };
        if score > 0 && best.as_ref().is_none_or(|(_, b)| score > *b) {
            best = Some((lib.clone(), score));
        }
    }
    best
}

/// Which CPU library is in use and what it can do, for `sdrs info --system` and bench.
pub fn cpu_backend_info() -> Result<CpuBackendInfo> {
    let dev = cpu_backend_device()?;
    // SAFETY: registered device; returned strings are owned by ggml and NUL-terminated.
    let description = unsafe { cstr(sys::ggml_backend_dev_description(dev.as_ptr())) };
    let mut features = Vec::new();
    // SAFETY: as above; the feature array is static in the library and ends with a NULL name.
    unsafe {
        let reg = sys::ggml_backend_dev_backend_reg(dev.as_ptr());
        let f = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_backend_get_features".as_ptr());
        if !f.is_null() {
            let get: sys::ggml_backend_get_features_t = std::mem::transmute::<*mut c_void, _>(f);
            if let Some(get) = get {
                let mut p = get(reg);
                while !p.is_null() && !(*p).name.is_null() {
                    features.push((cstr((*p).name), cstr((*p).value)));
                    p = p.add(1);
                }
            }
        }
    }
    Ok(CpuBackendInfo {
        library: loaded_cpu_library(),
        description,
        features,
    })
}

/// The mapped file that holds this function's code, from the process's memory map.
fn own_library() -> Option<PathBuf> {
    let here = own_library as *const () as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (lo, hi) = f.next()?.split_once('-')?;
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).ok()?,
            usize::from_str_radix(hi, 16).ok()?,
        );
        let path = f.nth(4)?;
        (lo <= here && here < hi && path.starts_with('/')).then(|| PathBuf::from(path))
    })
}

/// The mapped `libggml-cpu-*.so`, read from the process's own memory map.
fn loaded_cpu_library() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libggml-cpu"))
        })
        .map(PathBuf::from)
}

pub(super) unsafe fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: caller passes a NUL-terminated string or null.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// ggml prints to stderr unless told otherwise; sdrs is quiet by default, so its
/// messages go through `log` (visible with `RUST_LOG=debug` or `-v`).
fn route_logs() {
    // SAFETY: the callback is a plain function valid for the whole process.
    unsafe { sys::ggml_log_set(Some(log_callback), std::ptr::null_mut()) };
}

unsafe extern "C" fn log_callback(
    level: sys::ggml_log_level,
    text: *const c_char,
    _user: *mut c_void,
) {
    // Never unwind into C.
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: ggml passes a NUL-terminated message.
        let msg = unsafe { cstr(text) };
        let msg = msg.trim_end();
        if msg.is_empty() {
            return;
        }
        match level {
            sys::GGML_LOG_LEVEL_ERROR => log::error!(target: "ggml", "{msg}"),
            sys::GGML_LOG_LEVEL_WARN => log::warn!(target: "ggml", "{msg}"),
            sys::GGML_LOG_LEVEL_INFO => log::info!(target: "ggml", "{msg}"),
            _ => log::debug!(target: "ggml", "{msg}"),
        }
    });
}

/// ggml's `CPU_REPACK` buffer type, where the loaded CPU library has one: weights
/// placed there are rearranged at load into interleaved blocks (q4_0 → 8×8 on
/// AVX2/AVX-512, q4_K likewise) for its integer GEMM kernels.
pub(crate) fn repack_buffer_type() -> Option<NonNull<sys::ggml_backend_buffer_type>> {
    let dev = cpu_backend_device().ok()?;
    // SAFETY: registry entries are valid for the process; the proc name is
    // NUL-terminated, and ggml documents it as `ggml_backend_dev_get_extra_bufts_t`
    // (a NULL-terminated array).
    unsafe {
        let reg = sys::ggml_backend_dev_backend_reg(dev.as_ptr());
        let p = sys::ggml_backend_reg_get_proc_address(
            reg,
            c"ggml_backend_dev_get_extra_bufts".as_ptr(),
        );
        if p.is_null() {
            return None;
        }
        let get: sys::ggml_backend_dev_get_extra_bufts_t = std::mem::transmute(p);
        let mut list = get?(dev.as_ptr());
        while !list.is_null() && !(*list).is_null() {
            let name = CStr::from_ptr(sys::ggml_backend_buft_name(*list));
            if name.to_bytes() == b"CPU_REPACK" {
                return NonNull::new(*list);
            }
            list = list.add(1);
        }
        None
    }
}

/// What kind of device ggml reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
    /// A GPU that shares the host's memory (phones, laptops' integrated graphics).
    IntegratedGpu,
    Accelerator,
}

/// One device of a loaded ggml backend, for `sdrs devices`.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// ggml's backend (registry) name: `CPU`, `Vulkan`.
    pub backend: String,
    /// Index among that backend's devices (what `--device` takes).
    pub index: usize,
    /// ggml's device name (`Vulkan0`) and description (the GPU's model).
    pub name: String,
    pub description: String,
    pub kind: DeviceKind,
    pub memory_free: u64,
    pub memory_total: u64,
}

/// Every device of every backend ggml loaded (the CPU's, plus GPU backends the build
/// has and this machine can start).
pub fn devices() -> Result<Vec<DeviceInfo>> {
    cpu_backend_device()?;
    let mut out = Vec::new();
    // SAFETY: registry queries; returned strings are owned by ggml and NUL-terminated.
    unsafe {
        for r in 0..sys::ggml_backend_reg_count() {
            let reg = sys::ggml_backend_reg_get(r);
            let backend = cstr(sys::ggml_backend_reg_name(reg));
            for i in 0..sys::ggml_backend_reg_dev_count(reg) {
                let dev = sys::ggml_backend_reg_dev_get(reg, i);
                let (mut free, mut total) = (0usize, 0usize);
                sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
                let kind = match sys::ggml_backend_dev_type(dev) {
                    sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
                    sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
                    sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
                    _ => DeviceKind::Accelerator,
                };
                out.push(DeviceInfo {
                    backend: backend.clone(),
                    index: i,
                    name: cstr(sys::ggml_backend_dev_name(dev)),
                    description: cstr(sys::ggml_backend_dev_description(dev)),
                    kind,
                    memory_free: free as u64,
                    memory_total: total as u64,
                });
            }
        }
    }
    Ok(out)
}

/// Whether this build includes ggml's Vulkan backend (the `vulkan` cargo feature).
pub const VULKAN_BUILT: bool = cfg!(feature = "vulkan");

/// The `index`-th device of ggml's backend `name` (`Vulkan`), or an error that says
/// what is missing: the backend in this build, its library, a driver, the device.
pub(crate) fn gpu_device(name: &str, index: usize) -> Result<Device> {
    cpu_backend_device()?;
    if name.eq_ignore_ascii_case("vulkan") && !VULKAN_BUILT {
        return Err(Error::Invalid(
            "this sdrs was built without Vulkan: rebuild with `tools/setup.sh --vulkan && cargo build --release --features vulkan`".into(),
        ));
    }
    let c = CString::new(name)
        .map_err(|_| Error::Invalid(format!("backend name `{name}` contains NUL")))?;
    // SAFETY: registry queries with a valid C string.
    let reg = unsafe { sys::ggml_backend_reg_by_name(c.as_ptr()) };
    if reg.is_null() {
        return Err(Error::Invalid(format!(
            "the {name} backend did not load: its library (libggml-{}.so) must sit with the CPU libraries in {}, and the {name} loader (libvulkan.so.1) must be installed",
            name.to_lowercase(),
            backend_dirs().iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" or ")
        )));
    }
    // SAFETY: reg is a registered backend; its name is static.
    let (count, name) = unsafe {
        (
            sys::ggml_backend_reg_dev_count(reg),
            cstr(sys::ggml_backend_reg_name(reg)),
        )
    };
    if index >= count {
        return Err(Error::Invalid(if count == 0 {
            format!("no {name} device found (software renderers such as lavapipe are hidden unless GGML_VK_VISIBLE_DEVICES names them)")
        } else {
            format!("no {name} device {index}: there are {count} (see `sdrs devices`)")
        }));
    }
    // SAFETY: index in range.
    NonNull::new(unsafe { sys::ggml_backend_reg_dev_get(reg, index) })
        .map(Device)
        .ok_or_else(|| Error::Ggml(format!("{name} device {index} vanished")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apk_listing_finds_this_abis_cpu_variants_only() {
        let dir = tempfile::tempdir().unwrap();
        let apk = dir.path().join("base.apk");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&apk).unwrap());
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for name in [
            format!("lib/{APK_ABI}/libggml-cpu-a.so"),
            format!("lib/{APK_ABI}/libggml-cpu-b.so"),
            format!("lib/{APK_ABI}/libggml-base.so"),
            format!("lib/{APK_ABI}/libsdrs.so"),
            "lib/mips/libggml-cpu-c.so".to_string(),
            "assets/libggml-cpu-d.so".to_string(),
        ] {
            zip.start_file(name, stored).unwrap();
        }
        zip.finish().unwrap();
        let mut names = apk_cpu_libraries(&apk).unwrap();
        names.sort();
        assert_eq!(names, ["libggml-cpu-a.so", "libggml-cpu-b.so"]);
        let empty = dir.path().join("empty.apk");
        zip::ZipWriter::new(std::fs::File::create(&empty).unwrap())
            .finish()
            .unwrap();
        assert!(apk_cpu_libraries(&empty)
            .unwrap_err()
            .contains("no ggml CPU library"));
    }

    #[test]
    fn apk_loader_scores_the_variants_as_ggmls_folder_scan_does() {
        cpu_backend_device().unwrap();
        let Some(loaded) = loaded_cpu_library() else {
            eprintln!("SKIP: the CPU backend is linked in; no variants to score");
            return;
        };
        let dir = loaded.parent().unwrap();
        let variants: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.starts_with("libggml-cpu") && n.ends_with(".so")
            })
            .map(|p| p.display().to_string())
            .collect();
        let (best, score) = best_variant(&variants).unwrap();
        assert!(score > 0);
        assert_eq!(Path::new(&best).file_name(), loaded.file_name());
    }
}
