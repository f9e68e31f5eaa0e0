//! Networks as ggml graphs. Each block mirrors the checkpoint's module tree, so a
//! weight is found by its canonical name; shapes come from the config in the GGUF.
pub mod adapter;
pub mod band;
pub mod clip;
pub mod controlnet;
pub mod esrgan;
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

/// A batch of images or latents in PyTorch order: `values` is `[n][channels][height][width]`
/// (the channels follow from the network).
#[derive(Clone, Copy, Debug)]
pub struct Planes<'a> {
    pub values: &'a [f32],
    pub n: usize,
    pub width: usize,
    pub height: usize,
}

impl<'a> Planes<'a> {
    /// One image or latent of `width` x `height`.
    pub fn single(values: &'a [f32], width: usize, height: usize) -> Self {
        Planes {
            values,
            n: 1,
            width,
            height,
        }
    }

    /// Whether `values` holds exactly `n` planes of `channels` x `height` x `width`.
    pub fn holds(&self, channels: usize) -> bool {
        self.values.len() == self.n * channels * self.height * self.width
    }
}
