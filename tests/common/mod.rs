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

#[allow(unused_imports)]
pub use sdrs::testdata::{external, fixture};

/// The real TAEF2 encoder and decoder (external test data) where `backend` computes, as
/// a run loads them (f16 kernels on a CPU),
/// or `None` (the caller skips) where they are not here.
pub fn taef2(
    backend: &sdrs::ggml::Backend,
) -> Option<(sdrs::model::Weights<'static>, sdrs::model::Weights<'static>)> {
    let dir = external("models/taef2")?;
    let load = |file: &str| {
        sdrs::model::Weights::from_checkpoint_half(
            &Checkpoint::open(&dir.join(file)).unwrap(),
            backend,
        )
        .unwrap()
    };
    Some((load("taef2_encoder.pth"), load("taef2_decoder.pth")))
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
    convert_with(input, Policy::new(wtype), out)
}

/// [`convert_to`] with the q4_0 UNet matrices stored interleaved (`--cpu-layout x86`).
pub fn convert_interleaved(input: &Path, out: &Path) -> sdrs::Result<convert::Summary> {
    let mut policy = Policy::new(Type::Q4_0);
    policy.interleave = true;
    convert_with(input, policy, out)
}

pub fn convert_with(input: &Path, policy: Policy, out: &Path) -> sdrs::Result<convert::Summary> {
    let wtype = policy.wtype;
    let ck = Checkpoint::open(input)?;
    let plan = convert::plan(&ck, &policy, None)?;
    convert::run(
        &ck,
        &plan,
        wtype.name(),
        out,
        false,
        &AtomicBool::new(false),
        &mut |_| {},
    )
}

/// Files in `dir` (names), to check nothing partial was left behind.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Relative RMS error of `b` against `a`.
/// Peak signal-to-noise ratio in dB of 8-bit pixels against reference values on the
/// same 0–255 scale.
pub fn psnr_u8(got: &[u8], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mse = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((*a as f64 - *b as f64) / 255.0).powi(2))
        .sum::<f64>()
        / want.len() as f64;
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

pub fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (*x as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// A test photo of `tests/fixtures/images` as RGB in [0, 1], NCHW, cropped from the
/// top-left to `size`, or to the largest multiples of 16 when `size` is `None`.
pub fn photo(name: &str, size: Option<(usize, usize)>) -> (Vec<f32>, usize, usize) {
    let img = image::open(fixture("images").join(name)).unwrap().to_rgb8();
    let (w, h) = size.unwrap_or((
        (img.width() as usize / 16) * 16,
        (img.height() as usize / 16) * 16,
    ));
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

/// Mounts a tmpfs of `size` (mount's syntax: `4k`, `1m`) at `dir/name`. `None` where
/// mounting is not allowed; root must be able to (CI runs as root), so that is a failure.
pub fn small_disk(dir: &Path, name: &str, size: &str) -> Option<PathBuf> {
    let mnt = dir.join(name);
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        assert!(!root, "root could not mount a tmpfs");
        eprintln!("SKIP: cannot mount a tmpfs here (not root?)");
    }
    ok.then_some(mnt)
}

/// A kohya LoRA (rank 4, with alphas) on every cross-attention key projection of the
/// checkpoint `model`, named by the original single-file module paths, with small
/// deterministic values; written to `path`.
pub fn kohya_lora_for(model: &Path, path: &Path) {
    let ck = Checkpoint::open(model).unwrap();
    let mut specs = Vec::new();
    let mut values: Vec<Vec<f32>> = Vec::new();
    for t in ck
        .tensors
        .iter()
        .filter(|t| t.name.ends_with("attn2.to_k.weight"))
    {
        let module = t
            .name
            .trim_start_matches("model.diffusion_model.")
            .trim_end_matches(".weight")
            .replace('.', "_");
        let (out, inp) = (t.shape[0], t.shape[1]);
        for (part, shape) in [
            ("lora_down.weight", vec![4, inp]),
            ("lora_up.weight", vec![out, 4]),
            ("alpha", vec![]),
        ] {
            let n: usize = shape.iter().product();
            values.push(
                (0..n)
                    .map(|i| ((i * 7 + specs.len()) % 11) as f32 * 0.01 - 0.05)
                    .collect(),
            );
            specs.push(sdrs::formats::safetensors::WriteSpec {
                name: format!("lora_unet_{module}.{part}"),
                shape,
                dtype: DType::F32,
            });
        }
    }
    assert!(
        specs.len() >= 6,
        "no cross-attention in {}",
        model.display()
    );
    let mut bytes = Vec::new();
    sdrs::formats::safetensors::write(&mut bytes, &specs, &Default::default(), |i, b| {
        b.extend(values[i].iter().flat_map(|v| v.to_le_bytes()));
        Ok(())
    })
    .unwrap();
    std::fs::write(path, bytes).unwrap();
}
