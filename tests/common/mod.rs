//! Helpers shared by the integration tests.
#![allow(dead_code)]
pub mod shapes;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use sdrs::config::ModelConfig;
use sdrs::convert::{self, Policy};
use sdrs::formats::{Checkpoint, DType};
use sdrs::ggml::Type;
use sdrs::synth::{self, Format};

pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub fn synth_tiny(arch: &str, format: Format, dtype: DType, dir: &Path) -> PathBuf {
    let cfg = ModelConfig::preset(arch).unwrap();
    let ext = match format {
        Format::Safetensors => ".safetensors",
        Format::Ckpt => ".ckpt",
        Format::Diffusers => "",
    };
    let out = dir.join(format!("{arch}-{}{ext}", dtype.name()));
    synth::synth(&cfg, format, &out, 7, dtype, false, &mut |_, _| {}).unwrap();
    out
}

pub fn convert_to(input: &Path, wtype: Type, out: &Path) -> sdrs::Result<convert::Summary> {
    let ck = Checkpoint::open(input)?;
    let plan = convert::plan(&ck, &Policy::new(wtype), None)?;
    convert::run(&ck, &plan, wtype.name(), out, false, &AtomicBool::new(false), &mut |_| {})
}

/// Files in `dir` (names), to check nothing partial was left behind.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Relative RMS error of `b` against `a`.
pub fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (*x as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// A test photo of `shared/data/images` as RGB in [0, 1], NCHW, cropped from the
/// top-left to `size`, or to the largest multiples of 16 when `size` is `None`.
pub fn photo(name: &str, size: Option<(usize, usize)>) -> (Vec<f32>, usize, usize) {
    let img = image::open(shared().join("data/images").join(name)).unwrap().to_rgb8();
    let (w, h) = size.unwrap_or(((img.width() as usize / 16) * 16, (img.height() as usize / 16) * 16));
    let mut v = vec![0f32; 3 * w * h];
    for y in 0..h {
        for x in 0..w {
            let p = img.get_pixel(x as u32, y as u32);
            for c in 0..3 {
                v[(c * h + y) * w + x] = p[c] as f32 / 255.0;
            }
        }
    }
    (v, w, h)
}
