//! Networks as ggml graphs. Each block mirrors the checkpoint's module tree, so a
//! weight is found by its canonical name; shapes come from the config in the GGUF.
pub mod clip;
pub mod weights;

pub use weights::Weights;
