//! sdrs: Stable Diffusion at the edge.
//!
//! Data flows one way: checkpoint ([`formats`]) → [`convert`] → GGUF on disk →
//! memory map → ggml graphs → sampler → image.
//!
//! Every `unsafe` block and raw ggml call lives in [`ggml`] (which alone allows it);
//! the compiler holds the rest of the crate to that.
#![deny(unsafe_code)]
pub mod budget;
pub mod config;
pub mod convert;
pub mod cpu;
#[cfg(feature = "demo-model")]
pub mod demo;
pub mod error;
pub mod formats;
#[doc(hidden)]
pub mod fuzz;
pub mod ggml;
pub mod lora;
pub mod memory;
pub mod model;
pub mod network;
pub mod pipeline;
pub mod prompt;
pub mod sample;
pub mod staged;
pub mod synth;
#[doc(hidden)]
pub mod testdata;
pub mod tokenizer;
pub mod vocab;

pub use error::{Error, Result};
