//! Numerics against the reference implementation: golden tensors written by
//! `tools/reference/make_fixtures.py` (diffusers/transformers on PyTorch, f32) from
//! tiny SD-1-like and SD-2-like models, converted here with our own converter.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use sdrs::config::ModelConfig;
use sdrs::convert::metadata;
use sdrs::formats::gguf::GgufFile;
use sdrs::formats::Checkpoint;
use sdrs::ggml::{Backend, Type};
use sdrs::model::{clip, unet, vae, Weights};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ref")
}

/// Golden tensors by name, as f32 (ids as their integer values).
fn golden(model: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let ck = Checkpoint::open(&fixtures().join(model).join("golden.safetensors")).unwrap();
    ck.tensors.iter().map(|t| (t.name.clone(), (t.shape.clone(), t.read_f32().unwrap()))).collect()
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
    Model { _dir: dir, gguf, cfg }
}

/// Relative error: RMS of the difference over RMS of the reference.
fn check(what: &str, want: &[f32], got: &[f32], bound: f64) -> f64 {
    assert_eq!(want.len(), got.len(), "{what}: sizes");
    let e = rel_rms(want, got);
    eprintln!("{what}: relative RMS error {e:.2e}");
    assert!(e <= bound, "{what}: relative RMS error {e:.3e} over {bound:.0e}");
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
    let rows: Vec<Vec<u32>> = ids.chunks(shape[1]).map(|r| r.iter().map(|&x| x as u32).collect()).collect();
    let w = Weights::load(&m.gguf, |n| n.starts_with(&te.prefix)).unwrap();
    let hidden = clip::encode(&w, te, &rows, &backend).unwrap();
    check(&format!("{tag} text encoder"), &g["text.hidden"].1, &hidden, bound);

    // One UNet evaluation at two timesteps.
    let u = &m.cfg.unet;
    let w = Weights::load(&m.gguf, |n| n.starts_with("model.diffusion_model.")).unwrap();
    let (xs, x) = &g["unet.x"];
    let (cs, ctx) = &g["unet.context"];
    for t in [500.0f32, 999.0] {
        let out = unet::forward(&w, u, x, xs[3], xs[2], &[t, t], ctx, cs[1], None, None, &backend).unwrap();
        check(&format!("{tag} UNet t={t}"), &g[&format!("unet.t{}.out", t as u32)].1, &out, bound);
    }

    // VAE: decode a raw latent, encode an image to the posterior mean.
    let v = &m.cfg.vae;
    let w = Weights::load(&m.gguf, |n| n.starts_with("first_stage_model.")).unwrap();
    let (zs, z) = &g["vae.decode.z"];
    let scaled: Vec<f32> = z.iter().map(|x| x * v.scaling_factor).collect();
    let img = vae::decode(&w, v, &scaled, 1, zs[2], zs[3], &backend).unwrap();
    check(&format!("{tag} VAE decode"), &g["vae.decode.out"].1, &img, bound);
    let (is, x) = &g["vae.encode.x"];
    let mean: Vec<f32> = vae::encode(&w, v, x, 1, is[2], is[3], &backend).unwrap().iter().map(|m| m / v.scaling_factor).collect();
    check(&format!("{tag} VAE encode"), &g["vae.encode.mean"].1, &mean, bound);
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
    assert_eq!((sd1.unet.channel_mult.clone(), sd1.unet.num_heads, sd1.unet.linear_proj), (vec![1, 2], Some(2), false));
    assert_eq!(sd1.prediction, sdrs::config::Prediction::Epsilon);
    let sd2 = convert("sd2", Type::F32).cfg;
    assert_eq!((sd2.unet.head_dim, sd2.unet.linear_proj), (Some(16), true));
    assert_eq!(sd2.prediction, sdrs::config::Prediction::V);
    assert_eq!(sd2.text_encoders[0].kind, sdrs::config::TextEncoderKind::OpenClip);
}

#[test]
fn taesd_matches_the_original_network_at_f32() {
    use sdrs::model::taesd;
    let g = golden("taesd");
    let backend = Backend::cpu(2).unwrap();
    let dir = fixtures().join("taesd");
    let dec = Weights::from_checkpoint(&Checkpoint::open(&dir.join("taesd_decoder.pth")).unwrap(), &backend).unwrap();
    let enc = Weights::from_checkpoint(&Checkpoint::open(&dir.join("taesd_encoder.pth")).unwrap(), &backend).unwrap();
    let (zs, z) = &g["taesd.decode.z"];
    let img = taesd::decode(&dec, z, 1, zs[2], zs[3], &backend).unwrap();
    check("TAESD decode", &g["taesd.decode.out"].1, &img, 1e-4);
    let (xs, x) = &g["taesd.encode.x01"];
    let lat = taesd::encode(&enc, x, 1, xs[2], xs[3], &backend).unwrap();
    check("TAESD encode", &g["taesd.encode.z"].1, &lat, 1e-4);
}
