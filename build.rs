//! Generates Rust bindings for the ggml headers installed by `llama-cpp-sys-2`.
//!
//! The dependency builds ggml with CMake and exports the install prefix's CMake
//! directory as `DEP_LLAMA_GGML_CMAKE_DIR`; the headers sit in `<prefix>/include`.
use std::env;
use std::path::PathBuf;

/// Must equal the define in `.cargo/config.toml` (CFLAGS/CXXFLAGS), which the C build uses.
const GGML_MAX_NAME: usize = 128;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_GGML_CMAKE_DIR");
    let cmake_dir = match env::var("DEP_LLAMA_GGML_CMAKE_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => fail("llama-cpp-sys-2 did not export DEP_LLAMA_GGML_CMAKE_DIR (its ggml build failed or changed)"),
    };
    // <prefix>/lib/cmake -> <prefix>/include
    let include = cmake_dir
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("include"))
        .filter(|p| p.join("ggml.h").exists())
        .unwrap_or_else(|| fail(&format!("no ggml.h found near {}", cmake_dir.display())));
    // ggml is built as shared libraries with one loadable CPU library per instruction-set
    // level (llama-cpp-sys-2's `dynamic-backends`). The binary finds the shared
    // libraries beside itself ($ORIGIN), which is how a release is laid out and where
    // the dependency also links them inside target/. The CPU variants are looked for at
    // run time beside the executable, or in the build's own folder recorded here.
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_BACKENDS_DIR");
    if let Ok(dir) = env::var("DEP_LLAMA_BACKENDS_DIR") {
        println!("cargo:rustc-env=SDRS_BUILD_GGML_BACKENDS={dir}");
    }
    // The dependency's install prefix holds the versioned sonames (libggml-base.so.0);
    // its copies in target/ are only the unversioned names, so builds and tests find the
    // libraries through the prefix, a release through $ORIGIN.
    if env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux" || os == "android") {
        let libdir = cmake_dir
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN:{libdir}");
    }
    let cflags = env::var("CFLAGS").unwrap_or_default();
    if !cflags.contains(&format!("-DGGML_MAX_NAME={GGML_MAX_NAME}")) {
        fail("CFLAGS lacks -DGGML_MAX_NAME=128: build from the repository root so .cargo/config.toml applies");
    }

    let mut headers = vec![
        "ggml.h",
        "ggml-alloc.h",
        "ggml-backend.h",
        "ggml-cpu.h",
        "gguf.h",
    ];
    if env::var_os("CARGO_FEATURE_VULKAN").is_some() {
        headers.push("ggml-vulkan.h");
    }
    let mut builder = bindgen::Builder::default()
        .clang_arg(format!("-I{}", include.display()))
        .clang_arg(format!("-DGGML_MAX_NAME={GGML_MAX_NAME}"))
        .allowlist_function("(ggml|gguf)_.*")
        .allowlist_type("(ggml|gguf)_.*")
        .allowlist_var("(GGML|GGUF)_.*")
        .prepend_enum_name(false)
        .layout_tests(true)
        .generate_comments(false);
    for h in &headers {
        let path = include.join(h);
        println!("cargo:rerun-if-changed={}", path.display());
        builder = builder.header(path.to_string_lossy());
    }
    let bindings = builder.generate().unwrap_or_else(|e| {
        fail(&format!(
            "bindgen failed on the ggml headers: {e} (is libclang installed? run tools/setup.sh)"
        ))
    });
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("ggml_sys.rs");
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", out.display())));
}

fn fail(msg: &str) -> ! {
    eprintln!("\nsdrs build: {msg}\n");
    std::process::exit(1);
}
