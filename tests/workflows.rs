//! img2img and inpainting: the images diffusers' img2img and inpaint pipelines make
//! from the same picture, mask and seed (tools/reference/workflow_fixtures.py), on an
//! ordinary and on a 9-channel inpainting UNet; the overlay; picture files of every
//! common kind; TAESD as the encoder; and the errors for bad input.
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use sdrs::formats::{Checkpoint, DType};
use sdrs::ggml::Type;
use sdrs::pipeline::{Canvas, CanvasOptions, Decoding, Init, Pipeline, Request, Sampling};
use sdrs::sample::{Sampler, Schedule, Spacing};

fn fixture(p: &str) -> PathBuf {
    sdrs::testdata::fixture("ref").join(p)
}

fn golden(name: &str) -> Vec<f32> {
    Checkpoint::open(&fixture("workflows/golden.safetensors"))
        .unwrap()
        .get(name)
        .unwrap()
        .read_f32()
        .unwrap()
}

fn load(model: &str, dir: &Path) -> Pipeline {
    let path = dir.join(format!("{model}.gguf"));
    convert_to(&fixture(&format!("{model}/model")), Type::F32, &path).unwrap();
    Pipeline::load_with_threads(&path, 2).unwrap()
}

/// The fixture's picture (and mask), read as the CLI reads files: no size given, so
/// the 24x16 files are used as they are.
fn canvas(mask: bool) -> Arc<Canvas> {
    let opts = CanvasOptions {
        multiple: 4,
        ..Default::default()
    };
    let m = fixture("workflows/mask.png");
    Arc::new(
        Canvas::open(
            &fixture("workflows/init.png"),
            mask.then_some(m.as_path()),
            &opts,
        )
        .unwrap(),
    )
}

fn request(sampler: Sampler, steps: usize, strength: f64, init: Arc<Canvas>) -> Request {
    Request {
        width: 24,
        height: 16,
        steps,
        cfg_scale: 7.5,
        seed: 7,
        sampling: Sampling {
            sampler,
            schedule: Schedule::Discrete(Spacing::Linspace),
            ..Default::default()
        },
        init: Some(Init {
            strength: Some(strength),
            overlay: false,
            ..Init::new(init)
        }),
        ..Request::new("a photograph of an astronaut riding a horse")
    }
}

/// Every run of the fixture: (key, model, sampler, steps, strength, mask).
const RUNS: [(&str, &str, Sampler, usize, f64, bool); 8] = [
    ("img2img_euler", "sd1", Sampler::Euler, 8, 0.6, false),
    ("img2img_euler_a", "sd1", Sampler::EulerA, 10, 0.75, false),
    ("img2img_ddim", "sd1", Sampler::Ddim, 10, 0.5, false),
    ("inpaint4_euler", "sd1", Sampler::Euler, 8, 1.0, true),
    ("inpaint4_euler_a", "sd1", Sampler::EulerA, 10, 0.7, true),
    ("inpaint4_ddim", "sd1", Sampler::Ddim, 10, 0.8, true),
    (
        "inpaint9_euler",
        "sd1-inpaint",
        Sampler::Euler,
        8,
        1.0,
        true,
    ),
    ("inpaint9_ddim", "sd1-inpaint", Sampler::Ddim, 10, 0.6, true),
];

#[test]
fn img2img_and_inpainting_reproduce_the_diffusers_pipelines_from_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let mut loaded: Option<(&str, Pipeline)> = None;
    let mut low = Vec::new();
    for (key, model, sampler, steps, strength, mask) in RUNS {
        if loaded.as_ref().is_none_or(|(m, _)| *m != model) {
            loaded = Some((model, load(model, dir.path())));
        }
        let pipe = &loaded.as_ref().unwrap().1;
        let img = pipe
            .generate(
                &request(sampler, steps, strength, canvas(mask)),
                &mut |_| {},
            )
            .unwrap();
        let psnr = psnr_u8(&img.rgb, &golden(&format!("{key}.image_u8")));
        eprintln!("{key}: {psnr:.1} dB against diffusers");
        assert!(
            img.parameters
                .contains(&format!("Denoising strength: {strength}")),
            "{}",
            img.parameters
        );
        if psnr < 40.0 {
            low.push(format!("{key}: {psnr:.1} dB"));
        }
    }
    assert!(low.is_empty(), "under 40 dB: {low:?}");
}

#[test]
fn overlay_keeps_unmasked_pixels_and_strength_sets_how_far_the_image_moves() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = load("sd1", dir.path());
    let init = canvas(true);
    let over = pipe
        .generate(
            &Request {
                init: request(Sampler::Euler, 8, 1.0, init.clone())
                    .init
                    .clone()
                    .map(|i| Init { overlay: true, ..i }),
                ..request(Sampler::Euler, 8, 1.0, init.clone())
            },
            &mut |_| {},
        )
        .unwrap();
    let plain = pipe
        .generate(&request(Sampler::Euler, 8, 1.0, init.clone()), &mut |_| {})
        .unwrap();
    let mask = init.mask.as_ref().unwrap();
    let (mut kept, mut painted) = (0, 0);
    for (i, &m) in mask.iter().enumerate() {
        let (o, p, src) = (
            &over.rgb[i * 3..i * 3 + 3],
            &plain.rgb[i * 3..i * 3 + 3],
            &init.rgb[i * 3..i * 3 + 3],
        );
        if m == 0.0 {
            assert_eq!(o, src, "pixel {i} outside the mask changed");
            kept += 1;
        } else if m == 1.0 {
            assert_eq!(o, p, "pixel {i} inside the mask is not the generated one");
            painted += 1;
        }
    }
    assert!(kept > 100 && painted > 50, "{kept} kept, {painted} painted");
    assert_ne!(over.rgb, plain.rgb);
}

#[test]
fn the_lower_the_strength_the_closer_img2img_stays_to_the_picture() {
    // The demo model's VAE is trained, so its decode reproduces a picture it encodes.
    let pipe = Pipeline::demo(2).unwrap();
    let base = pipe
        .generate(
            &Request {
                seed: 3,
                ..pipe.request("a red circle on a blue background")
            },
            &mut |_| {},
        )
        .unwrap();
    let init = Arc::new(Canvas {
        width: base.width,
        height: base.height,
        rgb: base.rgb.clone(),
        mask: None,
        mask_blur: 0.0,
    });
    let want: Vec<f32> = base.rgb.iter().map(|&v| v as f32).collect();
    let to_init = |s: f64| {
        let req = Request {
            steps: 10,
            init: Some(Init {
                strength: Some(s),
                ..Init::new(init.clone())
            }),
            ..pipe.request("a yellow square on a green background")
        };
        psnr_u8(&pipe.generate(&req, &mut |_| {}).unwrap().rgb, &want)
    };
    let (low, mid, high) = (to_init(0.2), to_init(0.5), to_init(1.0));
    eprintln!(
        "PSNR to the init image: strength 0.2 {low:.1} dB, 0.5 {mid:.1} dB, 1.0 {high:.1} dB"
    );
    assert!(low > mid && mid > high + 5.0, "{low} {mid} {high}");
}

/// The memory plan of an img2img run counts the VAE encode as a stage of its own, and
/// a budget it cannot fit is refused before any work.
#[test]
fn img2img_plans_the_encode_stage_and_refuses_a_budget_it_cannot_fit() {
    let mut pipe = Pipeline::demo(2).unwrap();
    let rgb = vec![128u8; 256 * 256 * 3];
    let init = Arc::new(Canvas {
        width: 256,
        height: 256,
        rgb,
        mask: None,
        mask_blur: 0.0,
    });
    let req = Request {
        width: 256,
        height: 256,
        init: Some(Init::new(init)),
        ..pipe.request("a red circle")
    };
    let free = pipe.plan(&req).unwrap();
    let encode = free
        .needs
        .iter()
        .find(|n| n.stage == "encode")
        .unwrap_or_else(|| panic!("no encode stage: {}", free.summary()));
    assert!(
        encode.weights > 0 && encode.compute > 0,
        "{}",
        free.summary()
    );
    let txt2img = pipe
        .plan(&Request {
            init: None,
            ..req.clone()
        })
        .unwrap();
    assert!(
        txt2img.needs.iter().all(|n| n.stage != "encode"),
        "{}",
        txt2img.summary()
    );
    pipe.max_memory = Some(sdrs::budget::OVERHEAD + encode.total() - 1);
    let e = pipe.generate(&req, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("stage needs"), "{e}");
}

#[test]
fn bad_requests_and_pictures_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = load("sd1", dir.path());
    let err = |req: Request| pipe.generate(&req, &mut |_| {}).unwrap_err().to_string();
    let e = err(Request {
        width: 16,
        ..request(Sampler::Euler, 8, 0.5, canvas(false))
    });
    assert!(
        e.contains("init image is 24x16 but the request is for 16x16"),
        "{e}"
    );
    let e = err(request(Sampler::Euler, 8, 0.0, canvas(false)));
    assert!(e.contains("strength must be in (0, 1]"), "{e}");
    let e = err(request(Sampler::Euler, 4, 0.2, canvas(false)));
    assert!(e.contains("leaves no step"), "{e}");
    // Files: missing, not a picture, too large, and a mask that is not an image.
    let opts = CanvasOptions {
        multiple: 4,
        ..Default::default()
    };
    let missing = dir.path().join("missing.png");
    let e = Canvas::open(&missing, None, &opts).unwrap_err().to_string();
    assert!(e.contains("missing.png"), "{e}");
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "not a picture").unwrap();
    let e = Canvas::open(&text, None, &opts).unwrap_err().to_string();
    assert!(
        e.contains("notes.png") && e.contains("cannot decode"),
        "{e}"
    );
    let unknown = dir.path().join("notes.txt");
    std::fs::write(&unknown, "not a picture").unwrap();
    let e = Canvas::open(&unknown, None, &opts).unwrap_err().to_string();
    assert!(
        e.contains("notes.txt") && e.contains("not a PNG or JPEG"),
        "{e}"
    );
    let wide = dir.path().join("wide.png");
    image::GrayImage::new(20000, 1).save(&wide).unwrap();
    let e = Canvas::open(&wide, None, &opts).unwrap_err().to_string();
    assert!(e.contains("wide.png") && e.contains("too large"), "{e}");
    let e = Canvas::open(&fixture("workflows/init.png"), Some(&text), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("notes.png"), "{e}");
}

#[test]
fn pictures_of_every_pixel_format_read_as_8_bit_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CanvasOptions {
        multiple: 8,
        ..Default::default()
    };
    let read = |img: image::DynamicImage, name: &str| {
        let p = dir.path().join(name);
        img.save(&p).unwrap();
        Canvas::open(&p, None, &opts).unwrap()
    };
    // 16-bit greyscale: scaled to 8 bits and copied to the three channels.
    let g16 = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(8, 8, |x, _| {
        image::Luma([if x < 4 { 0xFFFF } else { 0x8080 }])
    });
    let c = read(image::DynamicImage::ImageLuma16(g16), "g16.png");
    assert_eq!(
        (&c.rgb[..3], &c.rgb[4 * 3..4 * 3 + 3]),
        (&[255u8, 255, 255][..], &[128u8, 128, 128][..])
    );
    // RGBA: alpha dropped (PIL's convert("RGB")), colour kept even where transparent.
    let rgba = image::RgbaImage::from_pixel(8, 8, image::Rgba([10, 20, 30, 0]));
    assert_eq!(
        &read(image::DynamicImage::ImageRgba8(rgba), "rgba.png").rgb[..3],
        &[10, 20, 30]
    );
    // 16-bit RGB.
    let rgb16 =
        image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(8, 8, image::Rgb([0, 0x8080, 0xFFFF]));
    assert_eq!(
        &read(image::DynamicImage::ImageRgb16(rgb16), "rgb16.png").rgb[..3],
        &[0, 128, 255]
    );
    // JPEG: the shared photo decodes to within JPEG decoders' rounding of Pillow's decode.
    let photos = sdrs::testdata::fixture("images");
    let jpeg = Canvas::open(&photos.join("rocket.jpg"), None, &opts).unwrap();
    let png = Canvas::open(&photos.join("rocket.png"), None, &opts).unwrap();
    assert_eq!((jpeg.width, jpeg.height), (640, 424));
    let want: Vec<f32> = png.rgb.iter().map(|&v| v as f32).collect();
    let p = psnr_u8(&jpeg.rgb, &want);
    eprintln!("rocket.jpg against Pillow's decode: {p:.1} dB");
    assert!(p > 40.0, "{p:.1} dB");
}

/// TAESD encodes for img2img when the run decodes with it: its encoder is found
/// beside the decoder, and it draws no posterior noise (TAESD is deterministic).
#[test]
fn img2img_with_taesd_encodes_with_the_encoder_beside_the_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let ck = synth_tiny(
        "tiny-sd15",
        sdrs::synth::Format::Safetensors,
        DType::F16,
        dir.path(),
    );
    let model = dir.path().join("tiny.gguf");
    convert_to(&ck, Type::F16, &model).unwrap();
    let pipe = Pipeline::load_with_threads(&model, 2).unwrap();
    let (px, w, h) = photo("astronaut.png", Some((64, 64)));
    let px = &px;
    let rgb: Vec<u8> = (0..w * h)
        .flat_map(|i| (0..3).map(move |c| (px[c * w * h + i] * 255.0).round() as u8))
        .collect();
    let init = Arc::new(Canvas {
        width: w,
        height: h,
        rgb,
        mask: None,
        mask_blur: 0.0,
    });
    // The decoder in a folder of its own, to show the encoder is looked for beside it.
    let alone = dir.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    std::fs::copy(
        fixture("taesd/taesd_decoder.pth"),
        alone.join("taesd_decoder.pth"),
    )
    .unwrap();
    let req = Request {
        width: 64,
        height: 64,
        steps: 4,
        cfg_scale: 1.0,
        init: Some(Init {
            strength: Some(0.5),
            ..Init::new(init.clone())
        }),
        ..Request::new("a cat")
    };
    let e = pipe
        .generate(
            &Request {
                decoding: Decoding {
                    taesd: Some(alone.join("taesd_decoder.pth")),
                    ..req.clone().decoding
                },
                ..req.clone()
            },
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("taesd_encoder.pth") && e.contains("not there"),
        "{e}"
    );
    let taesd = pipe
        .generate(
            &Request {
                decoding: Decoding {
                    taesd: Some(fixture("taesd/taesd_decoder.pth")),
                    ..req.clone().decoding
                },
                ..req.clone()
            },
            &mut |_| {},
        )
        .unwrap();
    let vae = pipe.generate(&req, &mut |_| {}).unwrap();
    assert_eq!((taesd.width, taesd.height), (64, 64));
    assert_ne!(taesd.rgb, vae.rgb);
}

#[test]
fn generate_command_runs_img2img_inpainting_and_outpainting_on_the_demo_model() {
    let dir = tempfile::tempdir().unwrap();
    let photo = sdrs::testdata::fixture("images/chelsea.png");
    let mask = dir.path().join("mask.png");
    image::GrayImage::from_fn(451, 300, |x, _| {
        image::Luma([if x > 225 { 255 } else { 0 }])
    })
    .save(&mask)
    .unwrap();
    let run = |extra: &[&str], out: &str| {
        let out = dir.path().join(out);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
            .args(["generate", "-p", "a red circle on a blue background", "-o"])
            .arg(&out)
            .arg("--init-img")
            .arg(&photo)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        image::open(&out).unwrap().to_rgb8()
    };
    // -W alone: the height follows the photo's aspect ratio (451x300 -> 64x43), rounded
    // to the demo model's multiple of 32.
    let a = run(&["-W", "64", "--strength", "0.6"], "img2img.png");
    assert_eq!(a.dimensions(), (64, 32));
    let m = mask.to_string_lossy().into_owned();
    let b = run(&["-W", "64", "-H", "64", "--mask", &m], "inpaint.png");
    assert_eq!(b.dimensions(), (64, 64));
    // Outpainting the 64x32 img2img result by 20 pixels on the left: the canvas grows
    // on to the next multiple of 32 (96x32), nothing of the picture is cropped.
    let out = dir.path().join("outpaint.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args([
            "generate",
            "-p",
            "a red circle on a blue background",
            "--pad",
            "20,0,0,0",
            "--init-img",
        ])
        .arg(dir.path().join("img2img.png"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = image::open(&out).unwrap().to_rgb8();
    assert_eq!(c.dimensions(), (96, 32));
    // The overlay keeps the picture's pixels (right of the mask's blurred edge) as they were.
    let same = (60..96).all(|x| (0..32).all(|y| c.get_pixel(x, y) == a.get_pixel(x - 32, y)));
    assert!(same, "the picture moved or changed under the overlay");
    // Refused before any work, with the file named.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args(["generate", "-p", "x", "--init-img"])
        .arg(dir.path().join("nope.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nope.png"), "{err}");
}
