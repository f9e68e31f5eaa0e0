//! The hires fix on the built-in demo model (coloured shapes, 64x64, LCM): a first
//! pass at the model's size, enlarged, repainted at the larger size.
#![cfg(feature = "demo-model")]

use sdrs::pipeline::hires::{Hires, LatentResize};
use sdrs::pipeline::upscale::Upscaler;
use sdrs::pipeline::{Image, Pipeline, Request};

/// Where the shape is: pixels whose red or green is over 100 (the prompts' backgrounds
/// are blue), in blocks of `shrink`² pixels.
fn shape_mask(image: &Image, shrink: usize) -> Vec<bool> {
    let (w, h) = (image.width / shrink, image.height / shrink);
    (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            let mut sum = [0usize; 2];
            for dy in 0..shrink {
                for dx in 0..shrink {
                    let at = ((y * shrink + dy) * image.width + x * shrink + dx) * 3;
                    sum[0] += image.rgb[at] as usize;
                    sum[1] += image.rgb[at + 1] as usize;
                }
            }
            sum.iter().any(|&v| v > 100 * shrink * shrink)
        })
        .collect()
}

/// Intersection over union of the shape in the hires image and in the first pass.
fn shape_overlap(hires: &Image, first: &Image) -> f64 {
    let (a, b) = (shape_mask(hires, 2), shape_mask(first, 1));
    let both = a.iter().zip(&b).filter(|(x, y)| **x && **y).count();
    let either = a.iter().zip(&b).filter(|(x, y)| **x || **y).count();
    both as f64 / either.max(1) as f64
}

#[test]
fn the_hires_pass_keeps_the_first_pass_composition_at_twice_the_size() {
    let pipe = Pipeline::demo(2).unwrap();
    let req = Request {
        seed: 3,
        ..pipe.request("a red circle on a blue background")
    };
    let first = pipe.generate(&req, &mut |_| {}).unwrap();
    fn hires(denoise: f64, upscaler: Option<&Upscaler>) -> Hires<'_> {
        Hires {
            scale: 2.0,
            steps: Some(8),
            denoise,
            upscaler,
            latent: None,
        }
    }
    let light = pipe
        .generate_hires(&req, &hires(0.3, None), &mut |_| {})
        .unwrap();
    assert_eq!(
        (light.width, light.height),
        (2 * first.width, 2 * first.height)
    );
    for key in [
        "Denoising strength: 0.3",
        "Hires upscale: 2",
        "Hires steps: 8",
        "Hires upscaler: Lanczos",
        "Seed: 3",
    ] {
        assert!(
            light.parameters.contains(key),
            "{key}: {}",
            light.parameters
        );
    }
    // A light repaint keeps the picture; a full one draws its own.
    let full = pipe
        .generate_hires(&req, &hires(1.0, None), &mut |_| {})
        .unwrap();
    // (The demo model, trained at 64x64, recolours at 128x128; where it puts the shape
    // is what a light repaint keeps.)
    let (kept, redrawn) = (shape_overlap(&light, &first), shape_overlap(&full, &first));
    eprintln!(
        "the shape where the first pass put it (IoU): denoise 0.3 {kept:.2}, 1.0 {redrawn:.2}"
    );
    assert!(kept > 0.5 && redrawn < kept / 2.0, "{kept} vs {redrawn}");

    // An ESRGAN upscaler enlarges the first pass instead of Lanczos.
    let up = Upscaler::load(
        &sdrs::testdata::fixture("ref").join("esrgan/compact-x4.safetensors"),
        2,
    )
    .unwrap();
    let esr = pipe
        .generate_hires(&req, &hires(0.3, Some(&up)), &mut |_| {})
        .unwrap();
    assert!(esr.parameters.contains("Hires upscaler: compact-x4"));
    assert_eq!((esr.width, esr.height), (light.width, light.height));
}

#[test]
fn bad_hires_settings_are_refused_before_any_work() {
    let pipe = Pipeline::demo(1).unwrap();
    let req = pipe.request("a square");
    let e = |h: Hires<'_>| {
        pipe.generate_hires(&req, &h, &mut |_| panic!("no work"))
            .unwrap_err()
            .to_string()
    };
    let base = Hires {
        scale: 2.0,
        steps: None,
        denoise: 0.5,
        upscaler: None,
        latent: None,
    };
    assert!(e(Hires { scale: 1.0, ..base }).contains("hires scale 1"));
    assert!(e(Hires {
        denoise: 0.0,
        ..base
    })
    .contains("denoising strength 0"));
    assert!(e(Hires {
        steps: Some(0),
        ..base
    })
    .contains("at least 1"));
    let up = Upscaler::load(
        &sdrs::testdata::fixture("ref").join("esrgan/compact-x4.safetensors"),
        1,
    )
    .unwrap();
    assert!(e(Hires {
        latent: Some(LatentResize::Bilinear),
        upscaler: Some(&up),
        ..base
    })
    .contains("not both"));
}

#[test]
fn latent_resizes_match_torch_interpolate() {
    let ck = sdrs::formats::Checkpoint::open(
        &sdrs::testdata::fixture("ref").join("hires/latent_resize.safetensors"),
    )
    .unwrap();
    let get = |n: &str| ck.get(n).unwrap().read_f32().unwrap();
    let x = get("input");
    for (mode, name) in [
        (LatentResize::Bilinear, "bilinear"),
        (LatentResize::Bicubic, "bicubic"),
        (LatentResize::Nearest, "nearest"),
        (LatentResize::NearestExact, "nearest-exact"),
    ] {
        for (h, w) in [(10, 14), (9, 11)] {
            let want = get(&format!("{name}.{h}x{w}"));
            let got = mode.resize(&x, (7, 5), (w, h));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5, "{name} to {w}x{h}: {err}");
        }
    }
    assert_eq!(
        LatentResize::parse("Latent (nearest-exact)"),
        Some(LatentResize::NearestExact)
    );
    assert_eq!(
        LatentResize::parse("latent-bicubic").map(LatentResize::name),
        Some("Latent (bicubic)")
    );
}

#[test]
fn a_latent_hires_fix_never_decodes_the_first_pass_and_keeps_its_composition() {
    let pipe = Pipeline::demo(2).unwrap();
    let req = Request {
        seed: 3,
        ..pipe.request("a red circle on a blue background")
    };
    let first = pipe.generate(&req, &mut |_| {}).unwrap();
    let h = Hires {
        scale: 2.0,
        steps: Some(8),
        denoise: 0.6,
        upscaler: None,
        latent: Some(LatentResize::Bilinear),
    };
    let mut decodes = 0;
    let image = pipe
        .generate_hires(&req, &h, &mut |s| {
            decodes += matches!(s, sdrs::pipeline::Stage::Decoded) as usize
        })
        .unwrap();
    assert_eq!(decodes, 1, "the first pass was decoded");
    assert_eq!((image.width, image.height), (128, 128));
    assert!(
        image.parameters.contains("Hires upscaler: Latent,")
            || image.parameters.ends_with("Hires upscaler: Latent"),
        "{}",
        image.parameters
    );
    assert!(
        image.parameters.contains("Size: 64x64")
            && image.parameters.contains("Denoising strength: 0.6")
    );
    let kept = shape_overlap(&image, &first);
    eprintln!("latent hires at denoise 0.6: the shape where the first pass put it (IoU) {kept:.2}");
    assert!(kept > 0.5, "{kept}");
}
