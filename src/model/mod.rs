//! Networks as ggml graphs. Each block mirrors the checkpoint's module tree, so a
//! weight is found by its canonical name; shapes come from the config in the GGUF.
pub mod adapter;
pub mod clip;
pub mod fit;
pub mod nn;
pub mod norms;
pub mod taesd;
pub mod tile;
pub mod unet;
pub mod vae;
pub mod weights;

pub use adapter::Adapters;
pub use nn::Attention;
pub use weights::Weights;
