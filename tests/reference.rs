//! Numerics against the reference implementation: golden tensors written by
//! `tools/reference/make_fixtures.py` (diffusers/transformers on PyTorch, f32) from
//! tiny SD-1-like and SD-2-like models, converted here with our own converter.
mod common;

use sdrs::pipeline::Sampling;
use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use sdrs::config::ModelConfig;
use sdrs::formats::gguf::metadata;
use sdrs::formats::gguf::GgufFile;
use sdrs::formats::Checkpoint;
use sdrs::ggml::{Backend, Type};
use sdrs::model::{clip, unet, vae, Planes, Weights};

fn fixtures() -> PathBuf {
    sdrs::testdata::fixture("ref")
}

/// Golden tensors by name, as f32 (ids as their integer values).
fn golden(model: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let ck = Checkpoint::open(&fixtures().join(model).join("golden.safetensors")).unwrap();
    ck.tensors
        .iter()
        .map(|t| (t.name.clone(), (t.shape.clone(), t.read_f32().unwrap())))
        .collect()
}

struct Model {
    _dir: tempfile::TempDir,
    gguf: GgufFile,
    cfg: ModelConfig,
}

fn convert(model: &str, ty: Type) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    convert_to(&fixtures().join(model).join("model"), ty, &out).unwrap();
    let gguf = GgufFile::open(&out).unwrap();
    let cfg = metadata::read_config(&gguf).unwrap().unwrap();
    Model {
        _dir: dir,
        gguf,
        cfg,
    }
}

/// Relative error: RMS of the difference over RMS of the reference.
fn check(what: &str, want: &[f32], got: &[f32], bound: f64) -> f64 {
    assert_eq!(want.len(), got.len(), "{what}: sizes");
    let e = rel_rms(want, got);
    eprintln!("{what}: relative RMS error {e:.2e}");
    assert!(
        e <= bound,
        "{what}: relative RMS error {e:.3e} over {bound:.0e}"
    );
    e
}

fn run_components(model: &str, ty: Type, bound: f64) {
    let g = golden(model);
    let m = convert(model, ty);
    let backend = Backend::cpu(2).unwrap();
    let tag = format!("{model} {}", ty.name());

    // Text encoder on the pipeline's token ids.
    let te = &m.cfg.text_encoders[0];
    let (shape, ids) = &g["tokens.ids"];
    let rows: Vec<Vec<u32>> = ids
        .chunks(shape[1])
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect();
    let w = Weights::load(&m.gguf, |n| n.starts_with(&te.prefix)).unwrap();
    let hidden = clip::encode(&w, te, &rows, &backend).unwrap();
    check(
        &format!("{tag} text encoder"),
        &g["text.hidden"].1,
        &hidden,
        bound,
    );

    // One UNet evaluation at two timesteps.
    let u = &m.cfg.unet;
    let w = Weights::load(&m.gguf, |n| n.starts_with("model.diffusion_model.")).unwrap();
    let (xs, x) = &g["unet.x"];
    let (_, ctx) = &g["unet.context"];
    for t in [500.0f32, 999.0] {
        let out = unet::forward(
            &w,
            u,
            xs[3],
            xs[2],
            &unet::Inputs {
                x,
                t: &[t, t],
                context: ctx,
                y: None,
                guidance: None,
                class: None,
                control: None,
            },
            &backend,
        )
        .unwrap();
        check(
            &format!("{tag} UNet t={t}"),
            &g[&format!("unet.t{}.out", t as u32)].1,
            &out,
            bound,
        );
    }

    // VAE: decode a raw latent, encode an image to the posterior mean.
    let v = m.cfg.autoencoder().unwrap();
    let w = Weights::load(&m.gguf, |n| n.starts_with("first_stage_model.")).unwrap();
    let (zs, z) = &g["vae.decode.z"];
    let scaled: Vec<f32> = z.iter().map(|x| x * v.scaling_factor).collect();
    let img = vae::decode(&w, v, Planes::single(&scaled, zs[3], zs[2]), &backend).unwrap();
    check(
        &format!("{tag} VAE decode"),
        &g["vae.decode.out"].1,
        &img,
        bound,
    );
    let (is, x) = &g["vae.encode.x"];
    let mean: Vec<f32> = vae::encode(&w, v, Planes::single(x, is[3], is[2]), &backend)
        .unwrap()
        .iter()
        .map(|m| m / v.scaling_factor)
        .collect();
    check(
        &format!("{tag} VAE encode"),
        &g["vae.encode.mean"].1,
        &mean,
        bound,
    );
}

#[test]
fn sd1_components_match_diffusers_at_f32() {
    run_components("sd1", Type::F32, 1e-4);
}

#[test]
fn sd2_components_match_diffusers_at_f32() {
    run_components("sd2", Type::F32, 1e-4);
}

#[test]
fn sd1_and_sd2_components_match_diffusers_at_f16() {
    run_components("sd1", Type::F16, 1e-2);
    run_components("sd2", Type::F16, 1e-2);
}

#[test]
fn fixture_models_convert_to_the_configs_diffusers_used() {
    let sd1 = convert("sd1", Type::F32).cfg;
    assert_eq!(
        (
            sd1.unet.channel_mult.clone(),
            sd1.unet.num_heads,
            sd1.unet.linear_proj
        ),
        (vec![1, 2], Some(2), false)
    );
    assert_eq!(sd1.prediction, sdrs::config::Prediction::Epsilon);
    let sd2 = convert("sd2", Type::F32).cfg;
    assert_eq!((sd2.unet.head_dim, sd2.unet.linear_proj), (Some(16), true));
    assert_eq!(sd2.prediction, sdrs::config::Prediction::V);
    assert_eq!(
        sd2.text_encoders[0].kind,
        sdrs::config::TextEncoderKind::OpenClip
    );
}

#[test]
fn taesd_matches_the_original_network_at_f32() {
    use sdrs::model::taesd;
    let g = golden("taesd");
    let backend = Backend::cpu(2).unwrap();
    let dir = fixtures().join("taesd");
    let dec = Weights::from_checkpoint(
        &Checkpoint::open(&dir.join("taesd_decoder.pth")).unwrap(),
        &backend,
    )
    .unwrap();
    let enc = Weights::from_checkpoint(
        &Checkpoint::open(&dir.join("taesd_encoder.pth")).unwrap(),
        &backend,
    )
    .unwrap();
    let (zs, z) = &g["taesd.decode.z"];
    let img = taesd::decode(&dec, Planes::single(z, zs[3], zs[2]), &backend).unwrap();
    check("TAESD decode", &g["taesd.decode.out"].1, &img, 1e-4);
    let (xs, x) = &g["taesd.encode.x01"];
    let lat = taesd::encode(&enc, Planes::single(x, xs[3], xs[2]), &backend).unwrap();
    check("TAESD encode", &g["taesd.encode.z"].1, &lat, 1e-4);
}

/// A run loads TAESD for the CPU (`from_checkpoint_half`): its 3x3 convolutions by
/// Winograd F(4x4, 3x3) in f32, the strided and 1x1 ones with f16 kernels. Within f16's
/// precision of the f32 network: the decoder, all Winograd, measured 1.8e-6 relative
/// RMS, the encoder 4.6e-4; f16 kernels throughout were 8.9e-4 on the decode, bf16
/// 9.6e-3.
#[test]
fn taesd_as_loaded_for_the_cpu_stays_within_f16_precision_of_the_original_network() {
    use sdrs::model::taesd;
    let g = golden("taesd");
    let backend = Backend::cpu(2).unwrap();
    let dir = fixtures().join("taesd");
    let load = |file: &str| {
        Weights::from_checkpoint_half(&Checkpoint::open(&dir.join(file)).unwrap(), &backend)
            .unwrap()
    };
    let (dec, enc) = (load("taesd_decoder.pth"), load("taesd_encoder.pth"));
    let (zs, z) = &g["taesd.decode.z"];
    let img = taesd::decode(&dec, Planes::single(z, zs[3], zs[2]), &backend).unwrap();
    check(
        "TAESD decode, as loaded for the CPU",
        &g["taesd.decode.out"].1,
        &img,
        2e-3,
    );
    let (xs, x) = &g["taesd.encode.x01"];
    let lat = taesd::encode(&enc, Planes::single(x, xs[3], xs[2]), &backend).unwrap();
    check(
        "TAESD encode, as loaded for the CPU",
        &g["taesd.encode.z"].1,
        &lat,
        2e-3,
    );
}

struct Guided<'a> {
    w: &'a Weights<'a>,
    cfg: &'a sdrs::config::UnetConfig,
    context: &'a [f32],
    scale: f32,
    size: (usize, usize),
    backend: &'a Backend,
}

impl sdrs::sample::Model for Guided<'_> {
    fn predict(&mut self, x: &[f32], t: f64) -> sdrs::Result<Vec<f32>> {
        let mut batch = x.to_vec();
        batch.extend_from_slice(x);
        let (w, h) = self.size;
        let out = unet::forward(
            self.w,
            self.cfg,
            w,
            h,
            &unet::Inputs {
                x: &batch,
                t: &[t as f32, t as f32],
                context: self.context,
                y: None,
                guidance: None,
                class: None,
                control: None,
            },
            self.backend,
        )?;
        let (uncond, cond) = out.split_at(out.len() / 2);
        Ok(uncond
            .iter()
            .zip(cond)
            .map(|(u, c)| u + self.scale * (c - u))
            .collect())
    }
}

fn psnr_pm1(a: &[f32], b: &[f32]) -> f64 {
    let f = |v: f32| (v / 2.0 + 0.5).clamp(0.0, 1.0) as f64;
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f(*x) - f(*y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (1.0 / mse.max(1e-20)).log10()
}

fn run_trajectory(model: &str, sampler: &str) {
    use sdrs::sample::{self, Discrete, Plan, Spacing};
    let g = golden(model);
    let m = convert(model, Type::F32);
    let backend = Backend::cpu(2).unwrap();
    let sched = Discrete::sd();
    let plan = match sampler {
        "euler" => Plan::euler_discrete(&sched, 4, Spacing::Linspace, 1),
        _ => Plan::ddim(&sched, 4, 1, false),
    };
    let key = |k: &str| format!("traj.{sampler}.{k}");
    let want_t: Vec<f64> = g[&key("timesteps")].1.iter().map(|&v| v as f64).collect();
    assert_eq!(plan.timesteps, want_t, "{model} {sampler}: timesteps");
    let want_s = &g[&key("sigmas")].1;
    for (i, s) in want_s.iter().enumerate() {
        assert!(
            (plan.sigmas[i] - *s as f64).abs() <= 1e-5 * (*s as f64).max(1e-3),
            "{model} {sampler}: sigma {i}: {} vs {s}",
            plan.sigmas[i]
        );
    }
    let w = Weights::load(&m.gguf, |n| n.starts_with("model.diffusion_model.")).unwrap();
    let (xs, _) = &g["unet.x"];
    let (_, ctx) = &g["unet.context"];
    let mut guided = Guided {
        w: &w,
        cfg: &m.cfg.unet,
        context: ctx,
        scale: 7.5,
        size: (xs[3], xs[2]),
        backend: &backend,
    };
    let which = if sampler == "euler" {
        sample::Sampler::Euler
    } else {
        sample::Sampler::Ddim
    };
    let x = sample::start_latent(&plan, &g["traj.init_latent"].1, None);
    let mut den = sample::Denoiser::new(&mut guided, m.cfg.prediction, &sched, &plan);
    let mut rng = sample::NativeRng::new(0);
    let traj = sample::sample(
        &mut den,
        which,
        &sample::Settings::default_for(which),
        &plan,
        x,
        &mut sample::IidNoise(&mut rng),
        &mut |_, _, _| {},
    )
    .unwrap();
    let latents = &g[&key("latents")].1;
    let per = latents.len() / traj.len();
    for (i, step) in traj.iter().enumerate() {
        // diffusers' Euler keeps its latents in the VE form, DDIM in the VP form
        // (what `sample` returns).
        let c = if sampler == "euler" {
            (plan.sigmas[i + 1].powi(2) + 1.0).sqrt() as f32
        } else {
            1.0
        };
        let step: Vec<f32> = step.iter().map(|v| v * c).collect();
        check(
            &format!("{model} {sampler} step {i}"),
            &latents[i * per..(i + 1) * per],
            &step,
            1e-4,
        );
    }
    let v = m.cfg.autoencoder().unwrap();
    let vw = Weights::load(&m.gguf, |n| n.starts_with("first_stage_model.")).unwrap();
    let img = vae::decode(
        &vw,
        v,
        Planes::single(traj.last().unwrap(), xs[3], xs[2]),
        &backend,
    )
    .unwrap();
    let p = psnr_pm1(&g[&key("image")].1, &img);
    eprintln!("{model} {sampler}: final image PSNR {p:.1} dB");
    assert!(p >= 45.0, "{model} {sampler}: PSNR {p:.1} dB");
}

#[test]
fn four_step_euler_and_ddim_trajectories_match_diffusers_pipelines() {
    for model in ["sd1", "sd2"] {
        for sampler in ["euler", "ddim"] {
            run_trajectory(model, sampler);
        }
    }
}

#[test]
fn inpainting_unet_with_nine_input_channels_matches_diffusers() {
    let g = golden("sd1-inpaint");
    let m = convert("sd1-inpaint", Type::F32);
    assert_eq!(m.cfg.unet.in_channels, 9);
    let backend = Backend::cpu(2).unwrap();
    let w = Weights::load(&m.gguf, |n| n.starts_with("model.diffusion_model.")).unwrap();
    let (xs, x) = &g["unet.x"];
    let (_, ctx) = &g["unet.context"];
    let out = unet::forward(
        &w,
        &m.cfg.unet,
        xs[3],
        xs[2],
        &unet::Inputs {
            x,
            t: &[500.0, 500.0],
            context: ctx,
            y: None,
            guidance: None,
            class: None,
            control: None,
        },
        &backend,
    )
    .unwrap();
    check("sd1-inpaint UNet t=500", &g["unet.t500.out"].1, &out, 1e-4);
    // The txt2img conditioning: the VAE mean of a grey image, scaled.
    let vw = Weights::load(&m.gguf, |n| n.starts_with("first_stage_model.")).unwrap();
    let grey = vec![0.0f32; 3 * 16 * 16];
    let lat = vae::encode(
        &vw,
        m.cfg.autoencoder().unwrap(),
        Planes::single(&grey, 16, 16),
        &backend,
    )
    .unwrap();
    // Constant channels make the encoder's first GroupNorms divide by ~eps: the
    // reference itself moves by 1.7e-5 between f32 and f64 here.
    check(
        "sd1-inpaint grey latents",
        &g["cond.masked_image_latents"].1,
        &lat,
        1e-3,
    );
}

#[test]
fn tokenizer_gives_the_pipelines_token_ids() {
    use sdrs::tokenizer::ClipTokenizer;
    let tok = ClipTokenizer::embedded().unwrap();
    for model in ["sd1", "sd2"] {
        let g = golden(model);
        let m = convert(model, Type::F32);
        let te = &m.cfg.text_encoders[0];
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(model).join("golden.json")).unwrap(),
        )
        .unwrap();
        let (shape, ids) = &g["tokens.ids"];
        for (i, prompt) in json["prompts"].as_array().unwrap().iter().enumerate() {
            let want: Vec<u32> = ids[i * shape[1]..(i + 1) * shape[1]]
                .iter()
                .map(|&x| x as u32)
                .collect();
            assert_eq!(
                tok.encode_for(prompt.as_str().unwrap(), te).unwrap(),
                want,
                "{model} prompt {i}"
            );
        }
    }
}

/// The classifier-free-guided UNet of an SDXL-style model: context and `label_emb`
/// input per branch ([uncond, cond]), or the conditional branch alone.
struct GuidedXl<'a> {
    w: &'a Weights<'a>,
    cfg: &'a sdrs::config::UnetConfig,
    context: &'a [f32],
    y: &'a [f32],
    /// `None`: unguided (the context and y hold the conditional branch only).
    scale: Option<f32>,
    size: (usize, usize),
    backend: &'a Backend,
}

impl sdrs::sample::Model for GuidedXl<'_> {
    fn predict(&mut self, x: &[f32], t: f64) -> sdrs::Result<Vec<f32>> {
        let (w, h) = self.size;
        let Some(scale) = self.scale else {
            return unet::forward(
                self.w,
                self.cfg,
                w,
                h,
                &unet::Inputs {
                    x,
                    t: &[t as f32],
                    context: self.context,
                    y: Some(self.y),
                    guidance: None,
                    class: None,
                    control: None,
                },
                self.backend,
            );
        };
        let batch = [x, x].concat();
        let out = unet::forward(
            self.w,
            self.cfg,
            w,
            h,
            &unet::Inputs {
                x: &batch,
                t: &[t as f32, t as f32],
                context: self.context,
                y: Some(self.y),
                guidance: None,
                class: None,
                control: None,
            },
            self.backend,
        )?;
        let (uncond, cond) = out.split_at(out.len() / 2);
        Ok(uncond
            .iter()
            .zip(cond)
            .map(|(u, c)| u + scale * (c - u))
            .collect())
    }
}

fn rows_of(g: &HashMap<String, (Vec<usize>, Vec<f32>)>, key: &str) -> Vec<Vec<u32>> {
    let (shape, ids) = &g[key];
    ids.chunks(shape[1])
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect()
}

#[test]
fn sdxl_fixture_converts_to_two_encoders_and_size_conditioning() {
    use sdrs::config::{TextEncoderKind, TimeId};
    let m = convert("sdxl", Type::F32);
    let c = &m.cfg;
    assert_eq!(
        c.text_encoders
            .iter()
            .map(|t| (t.kind, t.skip_layers, t.final_norm, t.pad_token))
            .collect::<Vec<_>>(),
        [
            (TextEncoderKind::HfClip, 1, false, 49407),
            (TextEncoderKind::OpenClip, 1, false, 0)
        ]
    );
    assert_eq!(
        (
            c.unet.adm_in_channels,
            c.unet.time_ids.clone(),
            c.unet.time_id_dim
        ),
        (Some(80), TimeId::SDXL.to_vec(), 8)
    );
    assert_eq!(
        (
            c.unet.down_blocks.clone(),
            c.unet.mid_depth,
            c.unet.context_dim
        ),
        (vec![vec![0, 0], vec![2, 2]], Some(2), 64)
    );
    assert!(
        c.zeros_for_empty_negative,
        "diffusers' SDXL pipeline zeroes an empty negative prompt"
    );
}

#[test]
fn sdxl_components_match_diffusers_at_f32() {
    let g = golden("sdxl");
    let m = convert("sdxl", Type::F32);
    let backend = Backend::cpu(2).unwrap();
    let tok = sdrs::tokenizer::ClipTokenizer::embedded().unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sdxl/golden.json")).unwrap(),
    )
    .unwrap();
    let prompts: Vec<&str> = json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();

    // Both tokenizers (the second pads with "!"), both encoders, side by side; the
    // second's pooled projection.
    let (t1, t2) = (&m.cfg.text_encoders[0], &m.cfg.text_encoders[1]);
    let mut hidden = Vec::new();
    let mut pooled = None;
    for (te, key) in [(t1, "tokens.ids"), (t2, "tokens2.ids")] {
        let rows = rows_of(&g, key);
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(tok.encode_for(p, te).unwrap(), rows[i], "{key} prompt {i}");
        }
        let w = Weights::load(&m.gguf, |n| n.starts_with(&te.prefix)).unwrap();
        let out = clip::encode_all(&w, te, &rows, std::ptr::eq(te, t2), &backend).unwrap();
        hidden.push(out.hidden);
        pooled = out.pooled.or(pooled);
    }
    let (h1, h2) = (t1.hidden_size, t2.hidden_size);
    let context: Vec<f32> = (0..3 * 77)
        .flat_map(|r| {
            hidden[0][r * h1..(r + 1) * h1]
                .iter()
                .chain(&hidden[1][r * h2..(r + 1) * h2])
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    check(
        "sdxl prompt embeddings (both encoders)",
        &g["text.hidden"].1,
        &context,
        1e-4,
    );
    check(
        "sdxl pooled embedding",
        &g["text.pooled"].1,
        &pooled.unwrap(),
        1e-4,
    );

    // The added conditioning: pooled text and the six size/crop ids, embedded.
    let u = &m.cfg.unet;
    let (ps, p) = &g["text.pooled"];
    let ids = &g["add.time_ids"].1;
    let y: Vec<f32> = [1, 0]
        .iter()
        .zip(ids.chunks(6))
        .flat_map(|(&row, v)| {
            sdrs::pipeline::label_input(u, &p[row * ps[1]..(row + 1) * ps[1]], v).unwrap()
        })
        .collect();
    check("sdxl label_emb input", &g["add.y"].1, &y, 1e-5);

    let w = Weights::load(&m.gguf, |n| n.starts_with("model.diffusion_model.")).unwrap();
    let (xs, x) = &g["unet.x"];
    let (_, ctx) = &g["unet.context"];
    let out = unet::forward(
        &w,
        u,
        xs[3],
        xs[2],
        &unet::Inputs {
            x,
            t: &[500.0, 500.0],
            context: ctx,
            y: Some(&g["add.y"].1),
            guidance: None,
            class: None,
            control: None,
        },
        &backend,
    )
    .unwrap();
    check("sdxl UNet t=500", &g["unet.t500.out"].1, &out, 1e-4);
}

/// diffusers' SDXL pipeline, step by step, from its fixed initial latent: the 4-step
/// guided Euler run of SDXL base's scheduler config and the 2-step trailing Euler run
/// with guidance off (SDXL-Lightning's recipe).
#[test]
fn sdxl_trajectories_match_the_diffusers_pipeline() {
    use sdrs::sample::{self, Discrete, Plan, Spacing};
    let g = golden("sdxl");
    let m = convert("sdxl", Type::F32);
    let backend = Backend::cpu(2).unwrap();
    let sched = Discrete::sd();
    let w = Weights::load(&m.gguf, |n| n.starts_with("model.diffusion_model.")).unwrap();
    let vw = Weights::load(&m.gguf, |n| n.starts_with("first_stage_model.")).unwrap();
    let (cs, ctx) = &g["unet.context"];
    let (ys, y) = &g["add.y"];
    let row = |v: &[f32], i: usize, n: usize| v[i * n..(i + 1) * n].to_vec();
    for (key, steps, spacing, scale) in [
        ("euler", 4, Spacing::Leading, Some(5.0)),
        ("lightning", 2, Spacing::Trailing, None),
    ] {
        let plan = Plan::euler_discrete(&sched, steps, spacing, 1);
        let k = |s: &str| format!("traj.{key}.{s}");
        assert_eq!(
            plan.timesteps,
            g[&k("timesteps")]
                .1
                .iter()
                .map(|&v| v as f64)
                .collect::<Vec<_>>(),
            "{key}: timesteps"
        );
        // The uncond branch of an empty negative prompt is zeros (force_zeros_for_empty_prompt).
        let n = cs[1] * cs[2];
        let (context, yy) = match scale {
            Some(_) => (
                [vec![0.0; n], row(ctx, 1, n)].concat(),
                [
                    vec![0.0; ys[1] - 6 * 8],
                    row(y, 1, ys[1])[ys[1] - 6 * 8..].to_vec(),
                    row(y, 1, ys[1]),
                ]
                .concat(),
            ),
            None => (row(ctx, 1, n), row(y, 1, ys[1])),
        };
        let mut model = GuidedXl {
            w: &w,
            cfg: &m.cfg.unet,
            context: &context,
            y: &yy,
            scale,
            size: (8, 8),
            backend: &backend,
        };
        let x = sample::start_latent(&plan, &g["traj.init_latent"].1, None);
        let mut den = sample::Denoiser::new(&mut model, m.cfg.prediction, &sched, &plan);
        let mut rng = sample::NativeRng::new(0);
        let traj = sample::sample(
            &mut den,
            sample::Sampler::Euler,
            &sample::Settings::default_for(sample::Sampler::Euler),
            &plan,
            x,
            &mut sample::IidNoise(&mut rng),
            &mut |_, _, _| {},
        )
        .unwrap();
        let latents = &g[&k("latents")].1;
        let per = latents.len() / traj.len();
        for (i, step) in traj.iter().enumerate() {
            let c = (plan.sigmas[i + 1].powi(2) + 1.0).sqrt() as f32;
            let step: Vec<f32> = step.iter().map(|v| v * c).collect();
            check(
                &format!("sdxl {key} step {i}"),
                &latents[i * per..(i + 1) * per],
                &step,
                1e-4,
            );
        }
        let img = vae::decode(
            &vw,
            m.cfg.autoencoder().unwrap(),
            Planes::single(traj.last().unwrap(), 8, 8),
            &backend,
        )
        .unwrap();
        let p = psnr_pm1(&g[&k("image")].1, &img);
        eprintln!("sdxl {key}: final image PSNR {p:.1} dB");
        assert!(p >= 45.0, "sdxl {key}: PSNR {p:.1} dB");
    }
}

/// The same two runs through `Pipeline::generate` (tokenizers, both encoders, the
/// zeroed negative branch, the size conditioning, the sampler and the decode): the
/// 8-bit image diffusers' pipeline returns.
#[test]
fn sdxl_pipeline_generates_the_diffusers_image() {
    use sdrs::pipeline::{Pipeline, Request};
    use sdrs::sample::{Sampler, Schedule, Spacing};
    let g = golden("sdxl");
    let m = convert("sdxl", Type::F32);
    let pipe = Pipeline::load_with_threads(&m._dir.path().join("m.gguf"), 2).unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sdxl/golden.json")).unwrap(),
    )
    .unwrap();
    let prompt = json["prompts"][0].as_str().unwrap();
    for (key, steps, spacing, cfg_scale) in [
        ("euler", 4, Spacing::Leading, 5.0),
        ("lightning", 2, Spacing::Trailing, 1.0),
    ] {
        let req = Request {
            width: 16,
            height: 16,
            steps,
            cfg_scale,
            noise: Some(g["traj.init_latent"].1.clone()),
            sampling: Sampling {
                sampler: Sampler::Euler,
                schedule: Schedule::Discrete(spacing),
                ..Default::default()
            },
            ..Request::new(prompt)
        };
        let img = pipe.generate(&req, &mut |_| {}).unwrap();
        let want = &g[&format!("traj.{key}.image_u8")].1;
        let mse = img
            .rgb
            .iter()
            .zip(want)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
            / want.len() as f64;
        let psnr = 10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10();
        eprintln!("sdxl pipeline {key}: 8-bit PSNR {psnr:.1} dB");
        assert!(psnr >= 45.0, "sdxl pipeline {key}: PSNR {psnr:.1} dB");
    }
}

/// An f16 VAE stays finite where f16 arithmetic would not: latents scaled so that the
/// decoder's first convolutions see values past f16's 65504 decode to the image the f32
/// weights give (see `Nn::f32_kernels`), and an ordinary latent still matches.
#[test]
fn f16_vae_decodes_activations_beyond_the_f16_range() {
    let g = golden("sdxl");
    let z = &g["traj.euler.final"].1;
    let backend = Backend::cpu(2).unwrap();
    let decode = |ty: Type, scale: f32| {
        let m = convert("sdxl", ty);
        let w = Weights::load(&m.gguf, |n| n.starts_with("first_stage_model.")).unwrap();
        let zs: Vec<f32> = z.iter().map(|v| v * scale).collect();
        vae::decode(
            &w,
            m.cfg.autoencoder().unwrap(),
            Planes::single(&zs, 8, 8),
            &backend,
        )
        .unwrap()
    };
    let peak = z.iter().fold(0f32, |m, v| m.max(v.abs())) / 0.13025;
    let scale = 4.0e5 / peak;
    assert!(peak * scale > 65504.0);
    let (wide, narrow) = (decode(Type::F32, scale), decode(Type::F16, scale));
    assert!(
        narrow.iter().all(|v| v.is_finite()),
        "f16 VAE decode overflowed"
    );
    check("f16 VAE on activations beyond f16", &wide, &narrow, 1e-2);
    check(
        "f16 VAE on the trajectory's latent",
        &decode(Type::F32, 1.0),
        &decode(Type::F16, 1.0),
        1e-2,
    );
}
