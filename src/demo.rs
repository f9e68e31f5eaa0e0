//! The demo model built into sdrs: a tiny Stable Diffusion 1.x-architecture model of
//! coloured shapes, trained by `tools/demo/train.py` and LCM-distilled for 2-4 steps
//! (4 by default; model card: `models/demo/README.md`). It lets `sdrs generate` make a
//! real picture on a fresh machine with nothing downloaded, and lets tests judge images
//! by meaning.
use crate::error::Result;
use crate::formats::gguf::GgufFile;

/// File name of the built-in model, as messages show it.
pub const NAME: &str = "<built-in demo model: models/demo/sdrs-demo-lcm-q8_0.gguf>";

/// ggml uses weights in place and needs each tensor 32-byte aligned, as in a file
/// mapping; `include_bytes!` alone only guarantees byte alignment.
#[repr(C, align(64))]
struct Aligned<B: ?Sized>(B);

static GGUF: &Aligned<[u8]> = &Aligned(*include_bytes!("../models/demo/sdrs-demo-lcm-q8_0.gguf"));

/// The built-in model's GGUF bytes.
pub fn bytes() -> &'static [u8] {
    &GGUF.0
}

/// The built-in model, parsed (metadata and tensor directory; the weights stay in place).
pub fn gguf() -> Result<GgufFile> {
    GgufFile::from_static(NAME, bytes())
}
