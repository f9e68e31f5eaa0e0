//! sdrs: Stable Diffusion at the edge.
//!
//! Data flows one way: checkpoint → [`formats`] → [`convert`] → GGUF → mmap → graph.
pub mod config;
pub mod error;
pub mod formats;
pub mod ggml;

pub use error::{Error, Result};
