//! Raw bindgen output for ggml.h, ggml-alloc.h, ggml-backend.h, ggml-cpu.h and gguf.h.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    clippy::all
)]
include!(concat!(env!("OUT_DIR"), "/ggml_sys.rs"));
