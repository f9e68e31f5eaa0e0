//! Unconditional and class-conditional diffusion against diffusers: the golden tensors
//! of `tools/reference/ddpm_fixtures.py` (DDPMPipeline, DDIMPipeline and PNDM on tiny
//! random `UNet2DModel`s in the published layouts, f32) and of
//! `tools/reference/score_sde_fixtures.py` (ScoreSdeVePipeline on a tiny NCSN++), run
//! through our converter, UNet graph, schedules and samplers.
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use sdrs::config::ModelConfig;
use sdrs::formats::gguf::{metadata, GgufFile};
use sdrs::formats::Checkpoint;
use sdrs::ggml::{Backend, Type};
use sdrs::model::{unet, Weights};
use sdrs::pipeline::unconditional::{Batch, Unconditional};
use sdrs::pipeline::Request;
use sdrs::sample::{self, Discrete, Sampler};

fn fixtures() -> PathBuf {
    sdrs::testdata::fixture("ref")
}

type Golden = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn golden(model: &str) -> Golden {
    let ck = Checkpoint::open(&fixtures().join(model).join("golden.safetensors")).unwrap();
    ck.tensors
        .iter()
        .map(|t| (t.name.clone(), (t.shape.clone(), t.read_f32().unwrap())))
        .collect()
}

/// The fixture's diffusers folder converted at `ty`, kept in a temporary folder.
struct Converted {
    dir: tempfile::TempDir,
    path: PathBuf,
}

fn convert(model: &str, ty: Type) -> Converted {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    convert_to(&fixtures().join(model).join("model"), ty, &path).unwrap();
    Converted { dir, path }
}

fn config(c: &Converted) -> (GgufFile, ModelConfig) {
    let g = GgufFile::open(&c.path).unwrap();
    let cfg = metadata::read_config(&g).unwrap().unwrap();
    (g, cfg)
}

fn check(what: &str, want: &[f32], got: &[f32], bound: f64) {
    let e = rel_rms(want, got);
    eprintln!("{what}: relative RMS error {e:.2e}");
    assert!(
        e <= bound,
        "{what}: relative RMS error {e:.3e} over {bound:.0e}"
    );
}

/// The largest difference between 8-bit pixels and a pipeline's `np` image (in [0, 1],
/// rounded to 8 bits as its PIL output would be).
fn worst_pixel(rgb: &[u8], want: &[f32]) -> f32 {
    rgb.iter()
        .zip(want)
        .map(|(&a, b)| (a as f32 / 255.0 - (b * 255.0).round() / 255.0).abs())
        .fold(0f32, f32::max)
}

/// NCHW planes to NHWC, as the pipelines' `np` output.
fn nhwc(planar: &[f32], w: usize, h: usize) -> Vec<f32> {
    let n = w * h;
    (0..n * 3).map(|i| planar[(i % 3) * n + i / 3]).collect()
}

#[test]
fn unet2d_outputs_match_diffusers_at_every_timestep_with_and_without_classes() {
    for (model, classes) in [("ddpm", None), ("ddpm-class", Some(3)), ("ldm", None)] {
        let g = golden(model);
        let c = convert(model, Type::F32);
        let (gguf, cfg) = config(&c);
        assert_eq!(cfg.family, if model == "ldm" { "ldm" } else { "ddpm" });
        assert_eq!(cfg.vae.is_some(), model == "ldm");
        assert!(cfg.text_encoders.is_empty());
        assert_eq!(cfg.unet.style.num_classes, classes.map(|_| 10));
        let w = Weights::load(&gguf, |n| n.starts_with("model.diffusion_model.")).unwrap();
        let backend = Backend::cpu(2).unwrap();
        let (shape, x) = &g["unet.sample"];
        let (side_h, side_w) = (shape[2], shape[3]);
        let mut runs: Vec<(String, f32, Option<i32>)> = [999, 500, 10, 0]
            .into_iter()
            .map(|t| (format!("unet.out.t{t}"), t as f32, classes))
            .collect();
        if classes.is_some() {
            runs.push(("unet.out.t500.class7".into(), 500.0, Some(7)));
        }
        for (name, t, class) in runs {
            let class = class.map(|c| [c]);
            let got = unet::forward(
                &w,
                &cfg.unet,
                side_w,
                side_h,
                &unet::Inputs {
                    x,
                    t: &[t],
                    class: class.as_ref().map(|c| c.as_slice()),
                    ..Default::default()
                },
                &backend,
            )
            .unwrap();
            check(&format!("{model} {name}"), &g[&name].1, &got, 1e-4);
        }
    }
}

#[test]
fn training_schedules_match_diffusers_alphas_cumprod() {
    for model in ["ddpm", "ddpm-class", "ldm"] {
        let g = golden(model);
        let c = convert(model, Type::F32);
        let (_, cfg) = config(&c);
        let d = Discrete::of(&cfg.schedule);
        let got: Vec<f32> = d.alphas_cumprod.iter().map(|&a| a as f32).collect();
        check(
            &format!("{model} ᾱ"),
            &g["schedule.alphas_cumprod"].1,
            &got,
            1e-6,
        );
    }
}

/// Replays the noise diffusers drew, in order (draw 0 is the initial sample).
struct Replay {
    draws: Vec<Vec<f32>>,
    next: usize,
}

impl sample::NoiseSampler for Replay {
    fn noise(&mut self, _: f64, _: f64, n: usize) -> Vec<f64> {
        let d = &self.draws[self.next];
        self.next += 1;
        assert_eq!(d.len(), n);
        d.iter().map(|&v| v as f64).collect()
    }
}

/// The UNet as the sampler's model, for batch 1 (and one class).
struct Net<'a> {
    runner: unet::Runner<'a>,
    backend: Backend,
    class: Option<[i32; 1]>,
}

impl sample::Model for Net<'_> {
    fn predict(&mut self, x: &[f32], t: f64) -> sdrs::Result<Vec<f32>> {
        self.runner.run(
            &unet::Inputs {
                x,
                t: &[t as f32],
                class: self.class.as_ref().map(|c| c.as_slice()),
                ..Default::default()
            },
            &self.backend,
        )
    }
}

/// Runs one of the fixture's sampling runs step by step with diffusers' own noise
/// draws, comparing the timesteps, every step's sample and the image.
fn trajectory(
    model: &str,
    run: &str,
    sampler: Sampler,
    steps: usize,
    eta: f64,
    class: Option<i32>,
) {
    let g = golden(model);
    let c = convert(model, Type::F32);
    let (gguf, cfg) = config(&c);
    let w = Weights::load(&gguf, |n| n.starts_with("model.diffusion_model.")).unwrap();
    let (shape, noise) = &g[&format!("{run}.noise")];
    let per = noise.len() / shape[0];
    let (height, width) = (shape[3], shape[4]);
    let draws: Vec<Vec<f32>> = noise.chunks(per).map(<[f32]>::to_vec).collect();
    let shape = unet::Shape {
        width,
        height,
        batch: 1,
        tokens: 1,
        control: false,
    };
    let runner =
        unet::Runner::new(&w, &cfg.unet, shape, sdrs::model::Attention::Auto, None).unwrap();
    let mut net = Net {
        runner,
        backend: Backend::cpu(2).unwrap(),
        class: class.map(|c| [c]),
    };
    let d = Discrete::of(&cfg.schedule);
    let sc = &cfg.schedule;
    // The grid the pipelines lay out from the model's scheduler config.
    let plan = sample::plan_for(
        sampler,
        sample::Schedule::Discrete(sample::Spacing::Leading),
        &d,
        steps,
        &sample::ScheduleOpts::default(),
        1.0,
        sc,
    );
    let want_t = &g[&format!("{run}.timesteps")].1;
    let got_t: Vec<f32> = plan.timesteps.iter().map(|&t| t as f32).collect();
    assert_eq!(&got_t, want_t, "{model} {run} timesteps");
    let clip = match sampler {
        Sampler::Ddpm | Sampler::Ddim => sc.clip_sample.map(f64::from),
        _ => None,
    };
    let mut den = sample::Denoiser::new(&mut net, cfg.prediction, &d, &plan).with_clip(clip);
    let settings = sample::Settings {
        eta,
        variance: sc.variance,
    };
    let x = sample::start_latent(&plan, &draws[0], None);
    let mut replay = Replay { draws, next: 1 };
    let traj = sample::sample(
        &mut den,
        sampler,
        &settings,
        &plan,
        x,
        &mut replay,
        &mut |_, _, _| {},
    )
    .unwrap();
    // DDIM with η > 0 draws noise for its last step too, where σ is 0 and it is unused.
    let unused = usize::from(sampler == Sampler::Ddim && eta > 0.0);
    assert_eq!(
        replay.next + unused,
        replay.draws.len(),
        "{model} {run}: noise draws used"
    );
    // No comparison can be tighter than the reference's own arithmetic: the fixture
    // records how far diffusers' f32 run lands from the same run in f64 (DDIM clipping
    // nearly every value of a random model at ±1 turns rounding into a switch).
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(model).join("golden.json")).unwrap(),
    )
    .unwrap();
    let own = |what: &str| {
        json["runs"][run]["precision_f32_vs_f64"][what]
            .as_f64()
            .unwrap()
    };
    let step_bound = 1e-4f64.max(2.0 * own("final"));
    let image_bound = 1e-4f64.max(2.0 * own("image"));
    let want = &g[&format!("{run}.traj")].1;
    for (i, (got, want)) in traj.iter().zip(want.chunks(per)).enumerate() {
        let e = rel_rms(want, got);
        assert!(
            e <= step_bound,
            "{model} {run} step {i}: relative RMS error {e:.3e} over {step_bound:.1e}"
        );
    }
    let last = traj.last().unwrap();
    let image: Vec<f32> = nhwc(last, width, height)
        .iter()
        .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect();
    check(
        &format!("{model} {run} image"),
        &g[&format!("{run}.image")].1,
        &image,
        image_bound,
    );
}

#[test]
fn ddpm_ancestral_sampling_follows_diffusers_step_by_step() {
    trajectory("ddpm", "ddpm10", Sampler::Ddpm, 10, 1.0, None);
    trajectory("ddpm-class", "ddpm10", Sampler::Ddpm, 10, 1.0, Some(3));
}

#[test]
fn ddim_with_clipping_and_eta_follows_diffusers_step_by_step() {
    trajectory("ddpm", "ddim20", Sampler::Ddim, 20, 0.0, None);
    trajectory("ddpm", "ddim10eta1", Sampler::Ddim, 10, 1.0, None);
    trajectory("ddpm-class", "ddim10", Sampler::Ddim, 10, 0.0, Some(3));
}

#[test]
fn plms_follows_diffusers_pndm_step_by_step() {
    trajectory("ddpm", "plms10", Sampler::Plms, 10, 0.0, None);
}

#[test]
fn latent_diffusion_samples_and_decodes_through_the_vq_codebook_as_ldm_pipeline() {
    let g = golden("ldm");
    let c = convert("ldm", Type::F32);
    let model = Unconditional::load(&c.path, 2).unwrap();
    let vq = model.config.vae.clone().unwrap();
    assert_eq!(vq.codebook, Some(64));
    // The VQModel's decode of given latents: quantised to the codebook, then decoded.
    let (gguf, _) = config(&c);
    let w = Weights::load(&gguf, |n| n.starts_with("first_stage_model.")).unwrap();
    let latent = &g["vq.latent"].1;
    let decoded = model.decode_latents(latent, (8, 8), &mut |_| {}).unwrap();
    check("ldm VQ decode", &g["vq.decoded"].1, &decoded, 1e-4);
    drop(w);
    // The whole LDMPipeline run: its sampled latents (DDIM, η = 0: the first draw is
    // all the noise) through the scaling, the codebook and the decoder.
    let (_, noise) = &g["ldm10.noise"];
    let mut req = Request {
        steps: 10,
        noise: Some(noise.clone()),
        ..model.request()
    };
    req.sampling.sampler = Sampler::Ddim;
    assert_eq!((req.width, req.height), (16, 16));
    let images = model.generate(&req, &Batch::of(1), &mut |_| {}).unwrap();
    let worst = worst_pixel(&images[0].rgb, &g["ldm10.image"].1);
    assert!(worst <= 1.5 / 255.0, "ldm10: a pixel {worst} away");
}

/// The whole pipeline: the model's defaults, the seed's torch generator.
#[test]
fn the_pipeline_reproduces_diffusers_pipelines_from_the_seed() {
    let g = golden("ddpm");
    let c = convert("ddpm", Type::F32);
    let model = Unconditional::load(&c.path, 2).unwrap();
    // The folder's DDPMScheduler makes DDPM over 1000 steps the default, as DDPMPipeline.
    let req = model.request();
    assert_eq!((req.sampling.sampler, req.steps), (Sampler::Ddpm, 1000));
    assert_eq!((req.width, req.height), (16, 16));
    for (run, sampler, steps, eta) in [
        ("ddpm10", Sampler::Ddpm, 10, None),
        ("ddim20", Sampler::Ddim, 20, None),
        ("ddim10eta1", Sampler::Ddim, 10, Some(1.0)),
        ("ddpm1000", Sampler::Ddpm, 1000, None),
    ] {
        let mut req = Request {
            seed: 7,
            steps,
            ..model.request()
        };
        req.sampling.sampler = sampler;
        req.sampling.eta = eta;
        let images = model.generate(&req, &Batch::of(1), &mut |_| {}).unwrap();
        // 8-bit pixels: at most one level apart where a value sits on a rounding edge.
        let worst = worst_pixel(&images[0].rgb, &g[&format!("{run}.image")].1);
        eprintln!("ddpm {run}: largest pixel difference {worst}");
        assert!(worst <= 1.5 / 255.0, "{run}: a pixel {worst} away");
        assert!(images[0].parameters.contains("Seed: 7"));
    }
}

#[test]
fn a_batch_is_one_draw_of_noise_and_its_images_differ() {
    let c = convert("ddpm", Type::F16);
    let model = Unconditional::load(&c.path, 2).unwrap();
    let req = Request {
        steps: 5,
        ..model.request()
    };
    let four = model.generate(&req, &Batch::of(4), &mut |_| {}).unwrap();
    assert_eq!(four.len(), 4);
    assert!(four[0].rgb != four[1].rgb);
    assert!(four[3].parameters.contains("Batch size: 4, Batch pos: 3"));
    // A budget that holds one image at a time runs the UNet in chunks: the same images.
    let plan = model.plan(&req, &Batch::of(4)).unwrap();
    assert_eq!(plan.chunk, 4);
    let one = plan.memory.needs[0].weights + 4 * plan.memory.needs[0].other / 3;
    let small = Request {
        max_memory: Some(sdrs::budget::OVERHEAD + one + plan.memory.needs[0].compute / 3),
        ..req.clone()
    };
    let chunked = model.plan(&small, &Batch::of(4)).unwrap();
    assert!(chunked.chunk < 4, "chunk {}", chunked.chunk);
    let again = model.generate(&small, &Batch::of(4), &mut |_| {}).unwrap();
    for (a, b) in four.iter().zip(&again) {
        let worst = a
            .rgb
            .iter()
            .zip(&b.rgb)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        // Not bit for bit everywhere: with AVX2 only, ggml's f16 products take another
        // path (its own dot product or llamafile's tiles, summing in another order) for
        // a batch of 4 than for fewer, and five DDPM steps grow that to 2 levels.
        assert!(worst <= 3, "chunked batch differs by {worst} levels");
    }
    let none = Request {
        max_memory: Some(sdrs::budget::OVERHEAD),
        ..req
    };
    let e = model.plan(&none, &Batch::of(4)).unwrap_err().to_string();
    assert!(e.contains("cannot fit") && e.contains("UNet"), "{e}");
    drop(c.dir);
}

#[test]
fn text_init_images_and_wrong_classes_are_refused_before_any_work() {
    let c = convert("ddpm-class", Type::F16);
    let model = Unconditional::load(&c.path, 2).unwrap();
    let base = Request {
        steps: 2,
        ..model.request()
    };
    let err = |req: &Request, batch: &Batch| {
        model
            .generate(req, batch, &mut |_| {})
            .unwrap_err()
            .to_string()
    };
    let classes = |c: &[i32]| Batch {
        count: 2,
        classes: c.to_vec(),
    };
    let prompt = Request {
        prompt: "a face".into(),
        ..base.clone()
    };
    assert!(err(&prompt, &classes(&[1])).contains("takes no text"));
    assert!(err(&base, &classes(&[])).contains("give a class from 0 to 9"));
    assert!(err(&base, &classes(&[10])).contains("class 10 is not one of this model's 10 classes"));
    assert!(err(&base, &classes(&[1, 2, 3])).contains("3 classes for 2 images"));
    let odd = Request {
        width: 9,
        ..base.clone()
    };
    assert!(err(&odd, &classes(&[1])).contains("multiple of 2"));
    // One class for all, or one each.
    assert_eq!(
        model
            .generate(&base, &classes(&[4]), &mut |_| {})
            .unwrap()
            .len(),
        2
    );
    let each = model
        .generate(&base, &classes(&[4, 5]), &mut |_| {})
        .unwrap();
    assert!(each[1].parameters.contains("Class: 5"));

    // A text-to-image pipeline refuses the file, naming what it is.
    let e = sdrs::pipeline::Pipeline::load_gguf(&c.path, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unconditional or class-conditional"), "{e}");
}

/// The score model (NCSN++ layout) of `tools/reference/score_sde_fixtures.py`.
const SCORE: &str = "score-sde";

#[test]
fn ncsnpp_unet_scores_match_diffusers_at_every_noise_level() {
    let g = golden(SCORE);
    let c = convert(SCORE, Type::F32);
    let (gguf, cfg) = config(&c);
    assert_eq!(cfg.family, "score-sde");
    let st = &cfg.unet.style;
    assert!(st.skip);
    assert_eq!(st.time_embedding, sdrs::config::TimeEmbedding::Fourier);
    assert_eq!(st.norm_groups, None);
    assert!((st.mid_scale - std::f32::consts::SQRT_2).abs() < 1e-6);
    let ve = cfg.schedule.ve.unwrap();
    assert_eq!((ve.sigma_min, ve.sigma_max, ve.snr), (0.01, 50.0, 0.16));
    assert_eq!((ve.correct_steps, cfg.schedule.train_steps), (1, 2000));
    let w = Weights::load(&gguf, |n| n.starts_with("model.diffusion_model.")).unwrap();
    // The Fourier weights stay f32 in the file: at N(0, 16²) an f16 copy would move
    // the phase by up to a radian.
    assert_eq!(
        gguf.tensor("model.diffusion_model.time_proj.weight")
            .unwrap()
            .ty,
        Type::F32
    );
    // The Fourier features themselves, f32 as diffusers computes them.
    let fw = w
        .read_f32("model.diffusion_model.time_proj.weight")
        .unwrap();
    check(
        "score-sde Fourier features at σ = 5",
        &g["unet.time_features.s5"].1,
        &unet::fourier_features(&[5.0], &fw),
        1e-6,
    );
    let backend = Backend::cpu(2).unwrap();
    let (_, x) = &g["unet.sample"];
    for s in ["50", "1", "0.01"] {
        let sigma: f32 = s.parse().unwrap();
        let got = unet::forward(
            &w,
            &cfg.unet,
            16,
            16,
            &unet::Inputs {
                x,
                t: &[sigma],
                ..Default::default()
            },
            &backend,
        )
        .unwrap();
        check(
            &format!("score-sde unet σ = {s}"),
            &g[&format!("unet.out.s{s}")].1,
            &got,
            1e-4,
        );
    }
}

/// The UNet over a batch as a score model: σ in, the UNet's output (already ÷ σ) out.
struct Batched<'a> {
    runner: unet::Runner<'a>,
    backend: Backend,
    images: usize,
}

impl sample::Model for Batched<'_> {
    fn predict(&mut self, x: &[f32], sigma: f64) -> sdrs::Result<Vec<f32>> {
        let t = vec![sigma as f32; self.images];
        self.runner.run(
            &unet::Inputs {
                x,
                t: &t,
                ..Default::default()
            },
            &self.backend,
        )
    }
}

#[test]
fn score_sde_ve_predictor_corrector_follows_diffusers_step_by_step_for_a_batch() {
    use sdrs::sample::score_sde::{self, VeGrid};
    let g = golden(SCORE);
    let c = convert(SCORE, Type::F32);
    let (gguf, cfg) = config(&c);
    let sde = cfg.schedule.ve.unwrap();
    let grid = VeGrid::new(&sde, 10);
    // The grids bit for bit where f32 arithmetic agrees (exp and pow to an ulp).
    check("VE timesteps", &g["pc10.timesteps"].1, &grid.timesteps, 0.0);
    check("VE σ(t)", &g["pc10.sigmas"].1, &grid.sigmas, 1e-7);
    check(
        "VE levels",
        &g["pc10.discrete_sigmas"].1,
        &grid.discrete,
        1e-7,
    );

    let w = Weights::load(&gguf, |n| n.starts_with("model.diffusion_model.")).unwrap();
    let shape = unet::Shape {
        width: 16,
        height: 16,
        batch: 2,
        tokens: 1,
        control: false,
    };
    let mut net = Batched {
        runner: unet::Runner::new(&w, &cfg.unet, shape, sdrs::model::Attention::Auto, None)
            .unwrap(),
        backend: Backend::cpu(2).unwrap(),
        images: 2,
    };
    let (dshape, noise) = &g["pc10.noise"];
    let per = noise.len() / dshape[0];
    let draws: Vec<Vec<f32>> = noise.chunks(per).map(<[f32]>::to_vec).collect();
    assert_eq!(draws.len(), 21, "one initial draw, then two per step");
    let x = draws[0]
        .iter()
        .map(|&v| (v * sde.sigma_max) as f64)
        .collect();
    let mut replay = Replay { draws, next: 1 };
    let (mut xs, mut means) = (Vec::new(), Vec::new());
    let last = score_sde::sample(&mut net, &sde, &grid, 2, x, &mut replay, &mut |_, x, m| {
        xs.push(x.iter().map(|&v| v as f32).collect::<Vec<f32>>());
        means.push(m.iter().map(|&v| v as f32).collect::<Vec<f32>>());
    })
    .unwrap();
    assert_eq!(replay.next, 21, "every draw used");
    let step = 2 * 3 * 16 * 16;
    for (i, (got, want)) in xs.iter().zip(g["pc10.traj"].1.chunks(step)).enumerate() {
        check(&format!("VE step {i} sample"), want, got, 1e-4);
    }
    for (i, (got, want)) in means.iter().zip(g["pc10.mean"].1.chunks(step)).enumerate() {
        check(&format!("VE step {i} mean"), want, got, 1e-4);
    }
    let image: Vec<f32> = last
        .chunks(3 * 16 * 16)
        .flat_map(|img| {
            let img: Vec<f32> = img.iter().map(|&v| v.clamp(0.0, 1.0) as f32).collect();
            nhwc(&img, 16, 16)
        })
        .collect();
    check("VE image", &g["pc10.image"].1, &image, 1e-4);
}

/// The whole pipeline from the seed: the folder's scheduler makes score_sde_ve over
/// 2000 steps the default, as ScoreSdeVePipeline's; images in [0, 1].
#[test]
fn a_score_model_samples_as_score_sde_ve_pipeline_from_the_seed_and_refuses_other_samplers() {
    let g = golden(SCORE);
    let c = convert(SCORE, Type::F32);
    let model = Unconditional::load(&c.path, 2).unwrap();
    let req = model.request();
    assert_eq!(
        (req.sampling.sampler, req.steps, req.width),
        (Sampler::ScoreSdeVe, 2000, 16)
    );
    let req = Request {
        seed: 7,
        steps: 10,
        ..req
    };
    let images = model.generate(&req, &Batch::of(2), &mut |_| {}).unwrap();
    let want = &g["pc10.image"].1;
    for (k, image) in images.iter().enumerate() {
        let worst = worst_pixel(&image.rgb, &want[k * 768..(k + 1) * 768]);
        eprintln!("score-sde image {k}: largest pixel difference {worst}");
        assert!(worst <= 1.5 / 255.0, "image {k}: a pixel {worst} away");
        assert!(image.parameters.contains("Sampler: Score SDE VE"));
    }
    let refusal = |m: &Unconditional, mut req: Request, sampler: Sampler| {
        req.sampling.sampler = sampler;
        m.generate(&req, &Batch::of(1), &mut |_| {})
            .unwrap_err()
            .to_string()
    };
    let e = refusal(&model, req.clone(), Sampler::Ddim);
    assert!(e.contains("samples with score_sde_ve, not ddim"), "{e}");
    // And a DDPM model refuses the score sampler.
    let d = convert("ddpm", Type::F16);
    let ddpm = Unconditional::load(&d.path, 2).unwrap();
    let e = refusal(&ddpm, ddpm.request(), Sampler::ScoreSdeVe);
    assert!(e.contains("for score models"), "{e}");
}
