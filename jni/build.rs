//! Where libsdrs.so finds ggml's shared libraries at run time, and its page alignment.
//!
//! The root crate's link arguments (its rpath) apply to its own binaries only, not to
//! a library that depends on it, so this cdylib sets its own.
use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_GGML_CMAKE_DIR");
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" && os != "android" {
        return;
    }
    // $ORIGIN: a release (and an Android app's extracted jniLibs folder) keeps the ggml
    // libraries beside libsdrs.so. The install prefix's lib/: host builds and tests,
    // where only that folder has the versioned sonames (libggml.so.0) the link records.
    let mut rpath = String::from("$ORIGIN");
    if os == "linux" {
        if let Some(lib) = env::var_os("DEP_LLAMA_GGML_CMAKE_DIR")
            .as_deref()
            .map(std::path::Path::new)
            .and_then(|p| p.parent())
        {
            rpath.push(':');
            rpath.push_str(&lib.display().to_string());
        }
    }
    println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,{rpath}");
    // 16 KB pages: Android 15+ devices may use them, and Google Play requires 16 KB
    // aligned libraries of apps that target them; ARM Linux boards (Raspberry Pi 5's
    // kernel, Apple-silicon Asahi) run such kernels too. Aligned this way the library
    // loads with 4 KB pages as well.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if os == "android" || arch == "aarch64" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,max-page-size=16384");
    }
}
