//! The demo model (models/demo) judged by meaning: pictures generated for held-out
//! caption/seed pairs (tools/demo/heldout.json, never trained on) are checked against
//! their captions by the shapes evaluator (tests/common/shapes.rs): colour, background,
//! position, size and shape class.
//!
//! CI runs subsets with thresholds a few points under what the committed models score
//! (their full-set figures are in models/demo/README.md). The full table is
//! `accuracy_table` (ignored; `tools/demo/build.sh` runs it over every variant).
#![cfg(feature = "demo-model")]
mod common;

use std::path::{Path, PathBuf};

use common::shapes::{self, Tally};
use sdrs::pipeline::{Pipeline, Request};
use sdrs::sample::{Sampler, Schedule};
use serde_json::Value;

struct Item {
    seed: u64,
    caption: String,
}

fn heldout() -> Vec<Item> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/demo/heldout.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| Item {
            seed: i["seed"].as_u64().unwrap(),
            caption: i["caption"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// The folder an ignored tool-test writes to, from `var` (None, with a note, when unset).
fn env_dir(var: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(var).map(PathBuf::from);
    if dir.is_none() {
        eprintln!("{var} not set");
    }
    dir
}

fn base_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/sdrs-demo-base-q8_0.gguf")
}

fn rgb(img: &sdrs::pipeline::Image) -> image::RgbImage {
    image::RgbImage::from_raw(img.width as u32, img.height as u32, img.rgb.clone()).unwrap()
}

fn generate(pipe: &Pipeline, req: &Request) -> image::RgbImage {
    rgb(&pipe.generate(req, &mut |_| {}).unwrap())
}

/// Generates every item with `setup` applied to the model's default request and tallies
/// the verdicts.
fn score(pipe: &Pipeline, items: &[Item], setup: impl Fn(&mut Request)) -> Tally {
    let mut t = Tally::default();
    for it in items {
        let mut req = pipe.request(&it.caption);
        req.seed = it.seed;
        setup(&mut req);
        let img = generate(pipe, &req);
        let (v, a) = shapes::evaluate(&img, &shapes::parse_caption(&it.caption).unwrap());
        if !v.all_ok() && std::env::var_os("SDRS_SHAPES_VERBOSE").is_some() {
            eprintln!(
                "seed {}: {:?} found {:?}",
                it.seed,
                it.caption,
                a.as_caption()
            );
        }
        t.add(&v);
    }
    t
}

// Floors a few points under what the committed models score on these subsets: 100%
// for colour, background, position and size; shape 81.2% (LCM 4 steps, 64 pairs),
// 70.3% (LCM 2 steps, 64 pairs), 75.0% (base, 32 pairs). Subsets this small spread by
// ±5 points around the full set's figures (77.7-81%), and a CPU with other kernels
// may flip an image or two.
const FLOORS: &[(&str, f64)] = &[
    ("colour", 0.95),
    ("background", 0.95),
    ("position", 0.95),
    ("size", 0.92),
    ("shape", 0.65),
];

/// The base model's sampler in the table: DPM++ 2M, 20 steps, trailing spacing
/// (the first step at t = T-1, pure noise on this model's zero-terminal-SNR schedule).
fn dpmpp_2m_20(r: &mut Request) {
    r.sampling.sampler = Sampler::DpmPP2M;
    r.sampling.schedule = Schedule::parse("trailing").unwrap();
    r.steps = 20;
}

fn lcm_steps(r: &mut Request, steps: usize) {
    r.sampling.sampler = Sampler::Lcm;
    r.steps = steps;
}

fn assert_at_least(t: &Tally, what: &str, floors: &[(&str, f64)]) {
    eprintln!("{what}: {t}");
    for (attr, floor) in floors {
        let acc = t.accuracy(attr).unwrap();
        assert!(
            acc >= *floor,
            "{what}: {attr} accuracy {:.1}% is under {:.0}% ({t})",
            100.0 * acc,
            100.0 * floor
        );
    }
}

#[test]
fn built_in_model_says_how_to_run_it() {
    let pipe = Pipeline::demo(1).unwrap();
    let req = pipe.request("a red circle");
    assert_eq!(
        (req.width, req.height, req.steps, req.sampling.sampler),
        (64, 64, 4, Sampler::Lcm)
    );
    assert!(
        pipe.config.zero_terminal_snr,
        "trained on a zero-terminal-SNR schedule, and the file says so"
    );
    assert!(
        pipe.config.unet.time_cond_proj_dim.is_some(),
        "the default model is the LCM-distilled one"
    );
    // The architecture is SD 1.x's, smaller: CLIP BPE vocabulary, 4-channel latent at 8x.
    assert_eq!(pipe.config.text_encoders[0].vocab_size, 49408);
    assert_eq!(
        (
            pipe.config.autoencoder().unwrap().latent_channels,
            pipe.config.autoencoder().unwrap().downscale()
        ),
        (4, 8)
    );
}

#[test]
fn built_in_lcm_model_draws_what_the_caption_says_in_its_4_default_steps() {
    let pipe = Pipeline::demo(1).unwrap();
    let items = heldout();
    let t = score(&pipe, &items[..64], |_| {});
    assert_at_least(&t, "LCM q8_0, 4 steps, 64 held-out", FLOORS);
}

#[test]
fn built_in_lcm_model_keeps_its_accuracy_at_2_steps() {
    let pipe = Pipeline::demo(1).unwrap();
    let items = heldout();
    let t = score(&pipe, &items[..64], |r| lcm_steps(r, 2));
    assert_at_least(&t, "LCM q8_0, 2 steps, 64 held-out", FLOORS);
}

#[test]
fn base_model_draws_what_the_caption_says_with_dpmpp_2m() {
    let pipe = Pipeline::load_with_threads(&base_model(), 1).unwrap();
    let items = heldout();
    let t = score(&pipe, &items[..32], dpmpp_2m_20);
    assert_at_least(&t, "base q8_0, DPM++ 2M 20 steps, 32 held-out", FLOORS);
}

#[test]
fn evaluator_rejects_a_picture_drawn_for_red_when_asked_about_blue() {
    let pipe = Pipeline::demo(1).unwrap();
    let mut req = pipe.request("a large red circle in the center on a white background");
    req.seed = 3;
    let img = generate(&pipe, &req);
    let right =
        shapes::parse_caption("a large red circle in the center on a white background").unwrap();
    let wrong =
        shapes::parse_caption("a large blue circle in the center on a white background").unwrap();
    assert!(
        shapes::evaluate(&img, &right).0.all_ok(),
        "the picture drawn for red should pass as red"
    );
    let (v, _) = shapes::evaluate(&img, &wrong);
    assert_eq!(
        v.colour,
        Some(false),
        "a red picture must fail a caption that says blue"
    );
}

#[test]
fn same_seed_same_picture_and_seeds_differ() {
    let pipe = Pipeline::demo(1).unwrap();
    let mut req = pipe.request("a small green triangle on the left on a black background");
    let a = generate(&pipe, &req);
    let b = generate(&pipe, &req);
    req.seed += 1;
    let c = generate(&pipe, &req);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

/// The model card's table: every held-out item through every variant in
/// `$SDRS_DEMO_DIR` (`tools/demo/build.sh` writes them), as markdown rows on stderr
/// and JSON in `$SDRS_DEMO_DIR/accuracy.json`.
#[test]
#[ignore]
fn accuracy_table() {
    let Some(dir) = env_dir("SDRS_DEMO_DIR") else {
        return;
    };
    let items = heldout();
    let lcm4 = |r: &mut Request| lcm_steps(r, 4);
    let lcm3 = |r: &mut Request| lcm_steps(r, 3);
    let lcm2 = |r: &mut Request| lcm_steps(r, 2);
    // (file, label, how the request is set up)
    type Run<'a> = (&'a str, &'a str, &'a dyn Fn(&mut Request));
    let runs: Vec<Run> = vec![
        (
            "base f32, DPM++ 2M 20 steps",
            "demo-base-f32.gguf",
            &dpmpp_2m_20,
        ),
        (
            "base q8_0, DPM++ 2M 20 steps",
            "demo-base-q8_0.gguf",
            &dpmpp_2m_20,
        ),
        ("LCM f32, 2 steps", "demo-lcm-f32.gguf", &lcm2),
        ("LCM q8_0, 2 steps", "demo-lcm-q8_0.gguf", &lcm2),
        ("LCM q4_0, 2 steps", "demo-lcm-q4_0.gguf", &lcm2),
        ("LCM q8_0, 3 steps", "demo-lcm-q8_0.gguf", &lcm3),
        ("LCM f32, 4 steps", "demo-lcm-f32.gguf", &lcm4),
        ("LCM q8_0, 4 steps", "demo-lcm-q8_0.gguf", &lcm4),
        ("LCM q4_0, 4 steps", "demo-lcm-q4_0.gguf", &lcm4),
    ];
    let attrs = ["colour", "background", "position", "size", "shape"];
    let mut json = Vec::new();
    eprintln!("| model, sampler | {} | all right |", attrs.join(" | "));
    eprintln!("|---|{}---|", "---|".repeat(attrs.len()));
    for (what, file, setup) in runs {
        let path = dir.join(file);
        if !path.exists() {
            eprintln!("(skipping {what}: no {})", path.display());
            continue;
        }
        let pipe = Pipeline::load_with_threads(&path, 1).unwrap();
        let t = score(&pipe, &items, setup);
        let cells: Vec<String> = attrs
            .iter()
            .map(|a| format!("{:.1}%", 100.0 * t.accuracy(a).unwrap()))
            .collect();
        eprintln!(
            "| {what} | {} | {:.1}% |",
            cells.join(" | "),
            100.0 * t.all_ok as f64 / t.images as f64
        );
        let mut row = serde_json::Map::new();
        row.insert("run".into(), what.into());
        row.insert("images".into(), t.images.into());
        for a in attrs {
            row.insert(a.into(), t.accuracy(a).unwrap().into());
        }
        row.insert(
            "all_right".into(),
            (t.all_ok as f64 / t.images as f64).into(),
        );
        json.push(Value::Object(row));
    }
    std::fs::write(
        dir.join("accuracy.json"),
        serde_json::to_string_pretty(&json).unwrap() + "\n",
    )
    .unwrap();
}

#[test]
fn generate_without_a_model_draws_the_quick_start_picture() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let prompt = "a red circle on a blue background";
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args([
            "-t",
            "1",
            "generate",
            "-p",
            prompt,
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 64));
    let (v, a) = shapes::evaluate(&img, &shapes::parse_caption(prompt).unwrap());
    assert!(
        v.all_ok(),
        "the quick start's picture is not {prompt:?}: found {:?}",
        a.as_caption()
    );
}

#[test]
fn converting_a_diffusers_lcm_folder_records_its_run_defaults_and_defaults_override_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = sdrs::testdata::fixture("ref/sd1-lcm/model");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let plain = dir.path().join("plain.gguf");
    let (ok, err) = run(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        plain.to_str().unwrap(),
        "--type",
        "f16",
    ]);
    assert!(ok, "{err}");
    // The folder ships LCMScheduler and a UNet of sample_size 8 over a 2-level VAE.
    let req = Pipeline::load_with_threads(&plain, 1).unwrap().request("x");
    assert_eq!(
        (
            req.width,
            req.height,
            req.steps,
            req.sampling.sampler,
            req.cfg_scale
        ),
        (16, 16, 4, Sampler::Lcm, 8.5)
    );
    let set = dir.path().join("set.gguf");
    let (ok, err) = run(&[
        "convert",
        plain.to_str().unwrap(),
        "-o",
        set.to_str().unwrap(),
        "--type",
        "f16",
        "--defaults",
        "steps=2,cfg=1.5,sampler=tcd",
    ]);
    assert!(ok, "{err}");
    let req = Pipeline::load_with_threads(&set, 1).unwrap().request("x");
    assert_eq!(
        (req.width, req.steps, req.sampling.sampler, req.cfg_scale),
        (16, 2, Sampler::Tcd, 1.5),
        "GGUF to GGUF keeps the rest"
    );
    let (ok, err) = run(&[
        "convert",
        plain.to_str().unwrap(),
        "-o",
        set.to_str().unwrap(),
        "--force",
        "--defaults",
        "sampler=k_lms",
    ]);
    assert!(!ok && err.contains("unknown sampler `k_lms`"), "{err}");
    let (ok, err) = run(&[
        "convert",
        plain.to_str().unwrap(),
        "-o",
        set.to_str().unwrap(),
        "--force",
        "--defaults",
        "colour=red",
    ]);
    assert!(!ok && err.contains("unknown default `colour`"), "{err}");
}

/// The README's pictures: the quick start's image and a grid of the first held-out
/// captions (built-in model, default settings), upscaled 3x with nearest neighbours.
/// Written to `$SDRS_DEMO_PICTURES` (tools/demo/build.sh: docs/demo).
#[test]
#[ignore]
fn readme_pictures() {
    let Some(dir) = env_dir("SDRS_DEMO_PICTURES") else {
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    let pipe = Pipeline::demo(1).unwrap();
    let up = |img: &image::RgbImage| {
        image::imageops::resize(
            img,
            img.width() * 3,
            img.height() * 3,
            image::imageops::FilterType::Nearest,
        )
    };
    up(&generate(
        &pipe,
        &pipe.request("a red circle on a blue background"),
    ))
    .save(dir.join("quickstart.png"))
    .unwrap();
    let (cols, rows, side, gap) = (4u32, 2u32, 192u32, 8u32);
    let mut grid = image::RgbImage::from_pixel(
        cols * side + (cols - 1) * gap,
        rows * side + (rows - 1) * gap,
        image::Rgb([255, 255, 255]),
    );
    let mut captions = Vec::new();
    for (k, it) in heldout().iter().take((cols * rows) as usize).enumerate() {
        let mut req = pipe.request(&it.caption);
        req.seed = it.seed;
        let tile = up(&generate(&pipe, &req));
        let (x, y) = (
            (k as u32 % cols) * (side + gap),
            (k as u32 / cols) * (side + gap),
        );
        image::imageops::replace(&mut grid, &tile, x as i64, y as i64);
        captions.push(format!("{}. {} (seed {})", k + 1, it.caption, it.seed));
    }
    grid.save(dir.join("heldout.png")).unwrap();
    std::fs::write(dir.join("heldout.txt"), captions.join("\n") + "\n").unwrap();
}
