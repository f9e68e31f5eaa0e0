//! The same results on every platform and backend. Images and a TAEF2 round trip made
//! here (an aarch64 build under qemu, Vulkan on lavapipe, another x86 CPU variant) are
//! compared with the ones recorded on x86-64 (ggml's AVX-512 CPU library), within each
//! weight type's tolerance: summation order and kernels differ between platforms, so
//! results agree to rounding noise, not bit for bit.
//!
//! `SDRS_TEST_BACKEND=vulkan` runs them on Vulkan device 0 (lavapipe needs
//! `GGML_VK_VISIBLE_DEVICES=0`). `SDRS_RECORD_PLATFORM=1` records the fixtures anew,
//! which only makes sense on x86-64 with the CPU backend.
mod common;

use std::path::PathBuf;

use common::*;
use sdrs::ggml::{Backend, Type};
use sdrs::model::{taesd, Planes};
use sdrs::pipeline::{Pipeline, Request, Sampling};
use sdrs::sample::Sampler;

fn fixture(name: &str) -> PathBuf {
    sdrs::testdata::fixture("platform").join(name)
}

fn backend_name() -> String {
    std::env::var("SDRS_TEST_BACKEND").unwrap_or_else(|_| "cpu".into())
}

fn backend() -> Backend {
    let name = backend_name();
    let b = Backend::open(&name, 0, 2).unwrap_or_else(|e| panic!("backend {name}: {e}"));
    eprintln!("computing on {}", b.gpu_name().unwrap_or("the CPU"));
    b
}

fn recording() -> bool {
    std::env::var_os("SDRS_RECORD_PLATFORM").is_some()
}

/// PSNR of `got` against the recorded image `name`, or records it.
fn against_recorded(name: &str, width: usize, height: usize, got: &[u8]) -> f64 {
    let path = fixture(name);
    if recording() {
        assert!(
            backend_name() == "cpu" && cfg!(target_arch = "x86_64"),
            "record fixtures on x86-64 with the CPU backend"
        );
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_raw(width as u32, height as u32, got.to_vec())
            .unwrap()
            .save(&path)
            .unwrap();
        return f64::INFINITY;
    }
    let want = image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    assert_eq!(
        (want.width() as usize, want.height() as usize),
        (width, height),
        "{name}"
    );
    let mse = want
        .as_raw()
        .iter()
        .zip(got)
        .map(|(a, b)| ((*a as f64 - *b as f64) / 255.0).powi(2))
        .sum::<f64>()
        / got.len() as f64;
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

fn generate(pipe: &Pipeline, req: &Request) -> Vec<u8> {
    pipe.generate(req, &mut |_| {}).unwrap().rgb
}

/// The diffusers-made tiny SD 1.x model (tests/fixtures/ref), converted to each type.
#[test]
fn tiny_model_images_match_the_x86_results_for_every_weight_type() {
    let dir = tempfile::tempdir().unwrap();
    let src = sdrs::testdata::fixture("ref/sd1/model");
    // Lower bounds in dB: well above what a wrong kernel gives (< 20), below the
    // rounding noise between platforms.
    let all = [
        (Type::F32, 40.0),
        (Type::F16, 38.0),
        (Type::Q8_0, 34.0),
        (Type::Q4_0, 30.0),
        (Type::Q4_K, 30.0),
    ];
    // A software GPU (lavapipe) compiles every shader pipeline a type needs with LLVM on
    // first use, minutes each on two cores: the GPU run covers the float path and the
    // integer one (q8_0, as the demo model also is), the CPU runs every type.
    let types: Vec<_> = if backend_name() == "cpu" {
        all.to_vec()
    } else {
        all.iter()
            .copied()
            .filter(|(t, _)| [Type::F32, Type::Q8_0].contains(t))
            .collect()
    };
    for (ty, bound) in types {
        let model = dir.path().join(format!("sd1-{}.gguf", ty.name()));
        convert_to(&src, ty, &model).unwrap();
        let mut pipe = Pipeline::load_with_threads(&model, 2).unwrap();
        pipe.set_backend(backend()).unwrap();
        let req = Request {
            width: 16,
            height: 16,
            steps: 3,
            cfg_scale: 7.5,
            seed: 3,
            sampling: Sampling {
                sampler: Sampler::Euler,
                ..Default::default()
            },
            ..Request::new("a photograph of an astronaut riding a horse")
        };
        let psnr = against_recorded(
            &format!("sd1-{}.png", ty.name()),
            16,
            16,
            &generate(&pipe, &req),
        );
        eprintln!("{}: {psnr:.1} dB against x86", ty.name());
        assert!(
            psnr >= bound,
            "{}: {psnr:.1} dB against the x86 image (bound {bound})",
            ty.name()
        );
    }
}

#[cfg(feature = "demo-model")]
#[test]
fn demo_model_image_matches_the_x86_result() {
    let mut pipe = Pipeline::demo(2).unwrap();
    pipe.set_backend(backend()).unwrap();
    let req = Request {
        width: 64,
        height: 64,
        steps: 2,
        seed: 11,
        ..pipe.request("a small green triangle on a white background")
    };
    let psnr = against_recorded("demo.png", 64, 64, &generate(&pipe, &req));
    eprintln!("demo model: {psnr:.1} dB against x86");
    assert!(psnr >= 34.0, "{psnr:.1} dB against the x86 image");
}

/// The real TAEF2 weights (external test data, `models/taef2`): a photo through encoder and decoder.
#[test]
fn taef2_round_trip_matches_the_x86_result() {
    let backend = backend();
    let Some((enc, dec)) = common::taef2(&backend) else {
        return;
    };
    // Small: under emulation (qemu) every vector instruction is a function call.
    let (x, w, h) = photo("astronaut.png", Some((64, 64)));
    let z = taesd::encode(&enc, Planes::single(&x, w, h), &backend).unwrap();
    let y = taesd::decode(&dec, Planes::single(&z, w / 8, h / 8), &backend).unwrap();
    let mut rgb = vec![0u8; 3 * w * h];
    for i in 0..w * h {
        for c in 0..3 {
            rgb[3 * i + c] = (y[c * w * h + i].clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    let psnr = against_recorded("taef2-astronaut.png", w, h, &rgb);
    eprintln!("TAEF2 round trip: {psnr:.1} dB against x86");
    assert!(psnr >= 40.0, "{psnr:.1} dB against the x86 round trip");
}
