//! sdrs: Stable Diffusion at the edge.
//!
//! Data flows one way: checkpoint ([`formats`]) → [`convert`] → GGUF on disk →
//! memory map → ggml graphs → sampler → image.
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
pub mod lora;
pub mod synth;
pub mod tokenizer;
pub mod ggml;
pub mod memory;
pub mod model;
pub mod pipeline;
pub mod prompt;
pub mod sample;
pub mod vocab;

pub use error::{Error, Result};
