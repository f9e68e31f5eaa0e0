//! Reading checkpoints: every supported input becomes a [`Checkpoint`], a list of
//! tensors under one canonical naming (the original single-file names:
//! `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`,
//! `conditioner.embedders.*`) whose bytes are read on demand, one at a time.
pub mod ckpt;
pub mod control;
pub mod detect;
pub mod diffusers;
pub mod gguf;
pub mod layout;
pub mod pickle;
pub mod safetensors;
pub mod source;
pub mod vae_file;

pub use source::{Checkpoint, DType, SourceFile, SourceTensor, TensorData};
