//! txt2img end to end on the tiny reference model: the same image as diffusers'
//! StableDiffusionPipeline from the same initial noise, guidance on and off, PNG
//! output with its parameters, and clear errors for bad sizes.
mod common;

use std::path::Path;

use common::*;
use sdrs::formats::Checkpoint;
use sdrs::ggml::Type;
use sdrs::pipeline::{Init, MicroConditioning, Pipeline, Request, Sampling};
use sdrs::sample::Sampler;

fn fixture(p: &str) -> std::path::PathBuf {
    sdrs::testdata::fixture("ref").join(p)
}

fn golden(name: &str) -> Vec<f32> {
    golden_of("sd1", name)
}

fn golden_of(model: &str, name: &str) -> Vec<f32> {
    Checkpoint::open(&fixture(&format!("{model}/golden.safetensors")))
        .unwrap()
        .get(name)
        .unwrap()
        .read_f32()
        .unwrap()
}

#[test]
fn txt2img_reproduces_the_diffusers_pipeline_image_and_writes_a_png_with_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd1.gguf");
    convert_to(&fixture("sd1/model"), Type::F32, &model).unwrap();
    let pipe = Pipeline::load(&model).unwrap();
    for (sampler, key) in [
        (Sampler::Euler, "traj.euler.image_u8"),
        (Sampler::Ddim, "traj.ddim.image_u8"),
    ] {
        let req = Request {
            width: 16,
            height: 16,
            steps: 4,
            cfg_scale: 7.5,
            noise: Some(golden("traj.init_latent")),
            sampling: Sampling {
                sampler,
                ..Default::default()
            },
            ..Request::new("a photograph of an astronaut riding a horse")
        };
        let img = pipe.generate(&req, &mut |_| {}).unwrap();
        let psnr = psnr_u8(&img.rgb, &golden(key));
        eprintln!("{sampler:?}: {psnr:.1} dB against diffusers' PIL output");
        assert!(psnr >= 45.0, "{sampler:?}: {psnr:.1} dB");
        let out = dir.path().join(format!("{sampler:?}.png"));
        img.save_png(&out).unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
        let reader = dec.read_info().unwrap();
        let text = &reader.info().uncompressed_latin1_text;
        let params = &text
            .iter()
            .find(|t| t.keyword == "parameters")
            .unwrap()
            .text;
        assert!(
            params.starts_with("a photograph of an astronaut")
                && params.contains("Steps: 4")
                && params.contains("CFG scale: 7.5"),
            "{params}"
        );
    }
    // Guidance scale 1 runs the conditional pass only and gives another image.
    let req = Request {
        width: 16,
        height: 16,
        steps: 2,
        cfg_scale: 1.0,
        ..Request::new("a cat")
    };
    let a = pipe.generate(&req, &mut |_| {}).unwrap();
    let b = pipe
        .generate(
            &Request {
                cfg_scale: 5.0,
                ..req.clone()
            },
            &mut |_| {},
        )
        .unwrap();
    assert_ne!(a.rgb, b.rgb);
    // Same seed, same image; another seed, another image.
    assert_eq!(a.rgb, pipe.generate(&req, &mut |_| {}).unwrap().rgb);
    assert_ne!(
        a.rgb,
        pipe.generate(
            &Request {
                seed: 7,
                ..req.clone()
            },
            &mut |_| {}
        )
        .unwrap()
        .rgb
    );
    // Sizes the model cannot take are explained.
    let e = pipe
        .generate(&Request { width: 18, ..req }, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiples of 4"), "{e}");
}

#[test]
fn inpainting_model_txt2img_reproduces_the_diffusers_inpaint_pipeline_on_a_fully_masked_grey_image()
{
    // diffusers' StableDiffusionInpaintPipeline with mask 1 everywhere and the VAE
    // mean of a grey image as masked-image latents: what sdrs feeds a 9-channel UNet
    // when no init image is given.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("inpaint.gguf");
    convert_to(&fixture("sd1-inpaint/model"), Type::F32, &model).unwrap();
    let pipe = Pipeline::load(&model).unwrap();
    assert_eq!(pipe.config.unet.in_channels, 9);
    let req = Request {
        width: 16,
        height: 16,
        steps: 4,
        cfg_scale: 7.5,
        noise: Some(golden_of("sd1-inpaint", "traj.init_latent")),
        sampling: Sampling {
            sampler: Sampler::Euler,
            ..Default::default()
        },
        ..Request::new("a photograph of an astronaut riding a horse")
    };
    let img = pipe.generate(&req, &mut |_| {}).unwrap();
    let psnr = psnr_u8(&img.rgb, &golden_of("sd1-inpaint", "traj.euler.image_u8"));
    eprintln!("inpaint: {psnr:.1} dB against diffusers' PIL output");
    assert!(psnr >= 45.0, "inpaint: {psnr:.1} dB");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

#[test]
fn a_folder_trained_on_zero_terminal_snr_samples_on_that_schedule_without_being_asked() {
    // The same weights twice: once as published (SD's schedule), once with the scheduler
    // config saying `rescale_betas_zero_snr`. The second must sample exactly as the first
    // does with the request flag, and not as the first does without it.
    let dir = tempfile::tempdir().unwrap();
    let zsnr_dir = dir.path().join("zsnr");
    copy_dir(&fixture("sd1/model"), &zsnr_dir);
    let sched = zsnr_dir.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&sched).unwrap();
    std::fs::write(
        &sched,
        text.replace(
            r#""rescale_betas_zero_snr": false"#,
            r#""rescale_betas_zero_snr": true"#,
        ),
    )
    .unwrap();
    let (plain, zsnr) = (dir.path().join("plain.gguf"), dir.path().join("zsnr.gguf"));
    convert_to(&fixture("sd1/model"), Type::F32, &plain).unwrap();
    convert_to(&zsnr_dir, Type::F32, &zsnr).unwrap();
    let (plain, zsnr) = (
        Pipeline::load(&plain).unwrap(),
        Pipeline::load(&zsnr).unwrap(),
    );
    assert!(zsnr.config.zero_terminal_snr && !plain.config.zero_terminal_snr);
    let req = Request {
        width: 16,
        height: 16,
        steps: 3,
        cfg_scale: 3.0,
        sampling: Sampling {
            sampler: Sampler::Euler,
            ..Default::default()
        },
        ..Request::new("a red circle")
    };
    let run = |p: &Pipeline, r: &Request| p.generate(r, &mut |_| {}).unwrap().rgb;
    let asked = run(
        &plain,
        &Request {
            sampling: Sampling {
                zero_terminal_snr: true,
                ..req.clone().sampling
            },
            ..req.clone()
        },
    );
    assert_eq!(run(&zsnr, &req), asked);
    assert_ne!(run(&plain, &req), asked);
}

#[test]
fn generate_command_writes_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd2.gguf");
    convert_to(&fixture("sd2/model"), Type::Q8_0, &model).unwrap();
    let out = dir.path().join("o.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args([
            "generate",
            "-m",
            model.to_str().unwrap(),
            "-p",
            "a red circle",
            "-W",
            "24",
            "-H",
            "16",
            "--steps",
            "3",
            "--sampler",
            "ddim",
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (24, 16));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args([
            "generate",
            "-m",
            model.to_str().unwrap(),
            "-p",
            "x",
            "--sampler",
            "euler_x",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("unknown sampler `euler_x`") && err.contains("dpm++2m"),
        "{err}"
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args([
            "generate",
            "-m",
            model.to_str().unwrap(),
            "-p",
            "x",
            "--scheduler",
            "cosine",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("unknown scheduler `cosine`") && err.contains("karras"),
        "{err}"
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args(["generate", "--list-samplers"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && list
                .lines()
                .filter(|l| l.contains(" yes ") || l.contains(" no "))
                .count()
                == 19,
        "{list}"
    );
}

#[test]
fn seeded_runs_of_ddim_dpmpp2m_karras_euler_a_and_lcm_reproduce_diffusers_pipelines() {
    // diffusers pipelines with torch.Generator("cpu").manual_seed(7): sdrs' torch RNG
    // draws the same initial latent and ancestral noise from the seed alone.
    use sdrs::sample::{Schedule, Spacing};
    let dir = tempfile::tempdir().unwrap();
    let golden_in = |file: &str, name: &str| {
        Checkpoint::open(&fixture(file))
            .unwrap()
            .get(name)
            .unwrap()
            .read_f32()
            .unwrap()
    };
    let cases: [(&str, &str, &str, Sampler, Schedule, usize, f32); 5] = [
        (
            "sd1",
            "sd1/pipelines.safetensors",
            "ddim10",
            Sampler::Ddim,
            Schedule::Discrete(Spacing::Linspace),
            10,
            7.5,
        ),
        (
            "sd1",
            "sd1/pipelines.safetensors",
            "dpmpp2m_karras8",
            Sampler::DpmPP2M,
            Schedule::Karras,
            8,
            7.5,
        ),
        (
            "sd1",
            "sd1/pipelines.safetensors",
            "euler_a8",
            Sampler::EulerA,
            Schedule::Discrete(Spacing::Linspace),
            8,
            7.5,
        ),
        // LatentConsistencyModelPipeline runs no classifier-free guidance.
        (
            "sd1",
            "sd1/pipelines.safetensors",
            "lcm4",
            Sampler::Lcm,
            Schedule::Discrete(Spacing::Linspace),
            4,
            1.0,
        ),
        // An LCM-distilled UNet: the scale goes in as its guidance embedding.
        (
            "sd1-lcm",
            "sd1-lcm/golden.safetensors",
            "lcm4",
            Sampler::Lcm,
            Schedule::Discrete(Spacing::Linspace),
            4,
            8.5,
        ),
    ];
    let mut loaded: Option<(String, Pipeline)> = None;
    for (model, file, key, sampler, schedule, steps, cfg_scale) in cases {
        if loaded.as_ref().is_none_or(|(m, _)| m != model) {
            let path = dir.path().join(format!("{model}.gguf"));
            convert_to(&fixture(&format!("{model}/model")), Type::F32, &path).unwrap();
            loaded = Some((model.to_string(), Pipeline::load(&path).unwrap()));
        }
        let pipe = &loaded.as_ref().unwrap().1;
        let req = Request {
            width: 16,
            height: 16,
            steps,
            cfg_scale,
            seed: 7,
            sampling: Sampling {
                sampler,
                schedule,
                ..Default::default()
            },
            ..Request::new("a photograph of an astronaut riding a horse")
        };
        let img = pipe.generate(&req, &mut |_| {}).unwrap();
        let psnr = psnr_u8(&img.rgb, &golden_in(file, &format!("{key}.image_u8")));
        eprintln!("{model} {key}: {psnr:.1} dB against diffusers");
        assert!(psnr >= 40.0, "{model} {key}: {psnr:.1} dB");
    }
}

/// SDXL-family variants end to end, from a checkpoint whose tensors alone say what it
/// is: a distilled UNet with removed blocks (SSD-1B style: thinner levels, ResNet-only
/// middle block) and a refiner-like model (bigG only, aesthetic-score conditioning).
/// The size and score conditioning reach the UNet: changing them changes the image.
#[test]
fn distilled_and_refiner_sdxl_variants_generate_with_their_conditioning() {
    use sdrs::config::{ModelConfig, TimeId};
    use sdrs::formats::DType;
    use sdrs::synth::{self, Format};
    let dir = tempfile::tempdir().unwrap();
    let mut ssd = ModelConfig::sdxl().shrink();
    ssd.unet.down_blocks = vec![vec![0, 0], vec![1, 1], vec![2, 2]];
    ssd.unet.up_blocks = vec![vec![2, 2, 1], vec![1, 1, 0], vec![0, 0, 0]];
    ssd.unet.mid_depth = Some(0);
    let mut refiner = ModelConfig::sdxl().shrink();
    refiner.text_encoders.remove(0);
    refiner.text_encoders[0].prefix = "conditioner.embedders.0.model.".into();
    refiner.unet.context_dim = 32;
    refiner.unet.time_ids = TimeId::REFINER.to_vec();
    refiner.unet.adm_in_channels = Some(32 + 5 * 8);
    for (name, cfg) in [("ssd", &ssd), ("refiner", &refiner)] {
        let src = dir.path().join(format!("{name}.safetensors"));
        synth::synth(
            cfg,
            Format::Safetensors,
            &src,
            3,
            DType::F16,
            false,
            &mut |_, _| {},
        )
        .unwrap();
        let gguf = dir.path().join(format!("{name}.gguf"));
        convert_to(&src, Type::Q8_0, &gguf).unwrap();
        let pipe = Pipeline::load(&gguf).unwrap();
        assert_eq!(
            (&pipe.config.unet.down_blocks, pipe.config.unet.mid_depth),
            (&cfg.unet.down_blocks, cfg.unet.mid_depth),
            "{name}: detected from its tensors"
        );
        assert_eq!(pipe.config.unet.time_ids, cfg.unet.time_ids, "{name}");
        let req = Request {
            width: 32,
            height: 32,
            steps: 2,
            cfg_scale: 4.0,
            negative: "blurry".into(),
            ..Request::new("a lighthouse")
        };
        let a = pipe.generate(&req, &mut |_| {}).unwrap();
        let changed = match name {
            "ssd" => Request {
                micro: MicroConditioning {
                    original_size: Some((512, 384)),
                    crop_top_left: (16, 0),
                    ..req.clone().micro
                },
                ..req.clone()
            },
            _ => Request {
                micro: MicroConditioning {
                    aesthetic_score: 2.0,
                    ..req.clone().micro
                },
                ..req.clone()
            },
        };
        let b = pipe.generate(&changed, &mut |_| {}).unwrap();
        assert_ne!(
            a.rgb, b.rgb,
            "{name}: the size/score conditioning must reach the UNet"
        );
        assert_eq!(
            a.rgb,
            pipe.generate(&req, &mut |_| {}).unwrap().rgb,
            "{name}: deterministic"
        );
        if name == "refiner" {
            // What a refiner is for: img2img on a finished picture, the last few steps.
            let init = std::sync::Arc::new(sdrs::pipeline::Canvas {
                width: 32,
                height: 32,
                rgb: a.rgb.clone(),
                mask: None,
                mask_blur: 0.0,
            });
            let refine = Request {
                steps: 10,
                init: Some(Init {
                    strength: Some(0.3),
                    ..Init::new(init)
                }),
                ..req.clone()
            };
            let refined = pipe.generate(&refine, &mut |_| {}).unwrap();
            assert!(
                refined.parameters.contains("Denoising strength: 0.3"),
                "{}",
                refined.parameters
            );
            assert_ne!(refined.rgb, a.rgb, "refining changes the picture");
        }
    }
}

/// An empty negative prompt is all-zero conditioning for SDXL (diffusers'
/// `force_zeros_for_empty_prompt`): not the same image as an encoded one-word negative.
#[test]
fn sdxl_empty_negative_prompt_is_zero_conditioning() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sdxl.gguf");
    convert_to(&fixture("sdxl/model"), Type::F32, &model).unwrap();
    let pipe = Pipeline::load(&model).unwrap();
    assert!(pipe.config.zeros_for_empty_negative);
    let req = Request {
        width: 16,
        height: 16,
        steps: 2,
        cfg_scale: 5.0,
        ..Request::new("a cat")
    };
    let empty = pipe.generate(&req, &mut |_| {}).unwrap();
    let worded = pipe
        .generate(
            &Request {
                negative: "a".into(),
                ..req.clone()
            },
            &mut |_| {},
        )
        .unwrap();
    assert_ne!(empty.rgb, worded.rgb);
}
