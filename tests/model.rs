//! UNet and VAE graphs on converted tiny models of every family: shapes, batch
//! independence, finiteness, and quantized weights staying close to f32 (numerics
//! against diffusers are in tests/reference.rs).
mod common;

use common::*;
use sdrs::formats::gguf::metadata;
use sdrs::formats::gguf::GgufFile;
use sdrs::formats::DType;
use sdrs::ggml::{Backend, Type};
use sdrs::model::{unet, vae, Attention, Planes, Weights};
use sdrs::synth::Format;

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 2654435761usize % 10007) as f32 / 5003.5) - 1.0)
        .collect()
}

/// Converts `src` to `ty` at `path` and opens the result with its config.
fn open_converted(
    src: &std::path::Path,
    ty: Type,
    path: &std::path::Path,
) -> (GgufFile, sdrs::config::ModelConfig) {
    convert_to(src, ty, path).unwrap();
    let g = GgufFile::open(path).unwrap();
    let cfg = metadata::read_config(&g).unwrap().unwrap();
    (g, cfg)
}

#[test]
fn unet_and_vae_run_on_every_tiny_family_and_batches_are_independent() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::cpu(2).unwrap();
    for arch in ["tiny-sd15", "tiny-sd21", "tiny-sdxl"] {
        let src = synth_tiny(arch, Format::Safetensors, DType::F32, dir.path());
        let mut outs = Vec::new();
        for ty in [Type::F32, Type::Q8_0] {
            let (g, cfg) = open_converted(
                &src,
                ty,
                &dir.path().join(format!("{arch}-{}.gguf", ty.name())),
            );
            let u = &cfg.unet;
            let w = Weights::load(&g, |n| n.starts_with("model.diffusion_model.")).unwrap();
            let (wd, ht, b, tok) = (16, 8, 2, 77);
            let x = values(b * u.in_channels * wd * ht, 1);
            let ctxv = values(b * tok * u.context_dim, 2);
            let y = u.adm_in_channels.map(|a| values(b * a, 3));
            let out = unet::forward(
                &w,
                u,
                wd,
                ht,
                &unet::Inputs {
                    x: &x,
                    t: &[500.0, 20.0],
                    context: &ctxv,
                    y: y.as_deref(),
                    guidance: None,
                    class: None,
                    control: None,
                },
                &backend,
            )
            .unwrap();
            assert_eq!(out.len(), b * u.out_channels * wd * ht);
            assert!(out.iter().all(|v| v.is_finite()), "{arch}");
            // The second batch entry alone gives the same result.
            let half = |v: &[f32]| v[v.len() / 2..].to_vec();
            let alone = unet::forward(
                &w,
                u,
                wd,
                ht,
                &unet::Inputs {
                    x: &half(&x),
                    t: &[20.0],
                    context: &half(&ctxv),
                    y: y.as_deref().map(half).as_deref(),
                    guidance: None,
                    class: None,
                    control: None,
                },
                &backend,
            )
            .unwrap();
            assert!(
                rel_rms(&half(&out), &alone) < 1e-5,
                "{arch}: batch independence {}",
                rel_rms(&half(&out), &alone)
            );
            // The VAE decodes a latent to 8x its size and encodes it back to the latent shape.
            let vw = Weights::load(&g, |n| n.starts_with("first_stage_model.")).unwrap();
            let f = cfg.autoencoder().unwrap().downscale();
            let z = values(cfg.autoencoder().unwrap().latent_channels * 4 * 6, 4);
            let img = vae::decode(
                &vw,
                cfg.autoencoder().unwrap(),
                Planes::single(&z, 6, 4),
                &backend,
            )
            .unwrap();
            assert_eq!(img.len(), 3 * 4 * f * 6 * f);
            assert!(img.iter().all(|v| v.is_finite()));
            let back = vae::encode(
                &vw,
                cfg.autoencoder().unwrap(),
                Planes::single(&img, 6 * f, 4 * f),
                &backend,
            )
            .unwrap();
            assert_eq!(back.len(), z.len());
            outs.push((out, img));
        }
        let (e1, e2) = (
            rel_rms(&outs[0].0, &outs[1].0),
            rel_rms(&outs[0].1, &outs[1].1),
        );
        assert!(
            e1 < 0.05 && e2 < 0.05,
            "{arch}: q8_0 vs f32: UNet {e1}, VAE {e2}"
        );
    }
}

#[test]
fn unet_refuses_sizes_it_cannot_downsample() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth_tiny("tiny-sd15", Format::Safetensors, DType::F16, dir.path());
    let (g, cfg) = open_converted(&src, Type::F16, &dir.path().join("m.gguf"));
    let w = Weights::load(&g, |n| n.starts_with("model.diffusion_model.")).unwrap();
    let e = unet::forward(
        &w,
        &cfg.unet,
        9,
        8,
        &unet::Inputs {
            x: &vec![0.0; 4 * 9 * 8],
            t: &[1.0],
            context: &vec![0.0; 77 * 32],
            y: None,
            guidance: None,
            class: None,
            control: None,
        },
        &Backend::cpu(1).unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("multiple of 8"), "{e}");
}

/// One UNet evaluation of a batch of two 16x8 latents (timesteps 500 and 20) on fixed
/// inputs.
fn unet_pair(
    w: &Weights,
    u: &sdrs::config::UnetConfig,
    attention: Attention,
    backend: &Backend,
) -> Vec<f32> {
    let shape = unet::Shape {
        width: 16,
        height: 8,
        batch: 2,
        tokens: 77,
        control: false,
    };
    let x = values(2 * u.in_channels * 16 * 8, 1);
    let context = values(2 * 77 * u.context_dim, 2);
    let inputs = unet::Inputs {
        x: &x,
        t: &[500.0, 20.0],
        context: &context,
        y: None,
        guidance: None,
        class: None,
        control: None,
    };
    unet::Runner::new(w, u, shape, attention, None)
        .unwrap()
        .run(&inputs, backend)
        .unwrap()
}

#[test]
fn flash_attention_gives_the_same_unet_output_as_matmul_attention() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::cpu(2).unwrap();
    for arch in ["tiny-sd15", "tiny-sd21"] {
        let src = synth_tiny(arch, Format::Safetensors, DType::F32, dir.path());
        let (g, cfg) = open_converted(&src, Type::F32, &dir.path().join(format!("{arch}.gguf")));
        let u = &cfg.unet;
        let w = Weights::load(&g, |n| n.starts_with("model.diffusion_model.")).unwrap();
        let run = |a: Attention| unet_pair(&w, u, a, &backend);
        let (m, f) = (run(Attention::MatMul), run(Attention::Flash));
        let e = rel_rms(&m, &f);
        assert!(e < 1e-4, "{arch}: flash vs matmul attention {e}");
    }
}

#[test]
fn repacked_q4_weights_give_the_unet_output_of_mapped_ones_within_quantization_noise() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::cpu(2).unwrap();
    let src = synth_tiny("tiny-sd15", Format::Safetensors, DType::F32, dir.path());
    let unet_part = |n: &str| n.starts_with("model.diffusion_model.");
    let (g32, cfg) = open_converted(&src, Type::F32, &dir.path().join("f32.gguf"));
    let u = &cfg.unet;
    let run = |w: &Weights| unet_pair(w, u, Attention::Auto, &backend);
    let exact = run(&Weights::load(&g32, unet_part).unwrap());
    for ty in [Type::Q4_0, Type::Q4_K] {
        let (g, _) = open_converted(&src, ty, &dir.path().join(format!("{}.gguf", ty.name())));
        let mapped = Weights::load(&g, unet_part).unwrap();
        let packed = Weights::load_repacked(&g, unet_part, |_| true).unwrap();
        assert_eq!(mapped.repacked(), 0);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // ggml has 8x8 layouts for both types on AVX2 and up.
            assert!(packed.repacked() > 0, "{}: nothing repacked", ty.name());
        }
        let (m, p) = (run(&mapped), run(&packed));
        // Single products agree to 1e-7 (tests/ggml.rs); through a UNet such a difference
        // can flip the rounding of a q8_0-quantized activation and grow. It must stay
        // well inside the type's own error against f32 weights.
        let (noise, diff) = (rel_rms(&m, &exact), rel_rms(&m, &p));
        eprintln!(
            "{}: mapped vs f32 {noise:.2e}, repacked vs mapped {diff:.2e}",
            ty.name()
        );
        assert!(
            diff < 0.25 * noise,
            "{}: repacked vs mapped {diff}, mapped vs f32 {noise}",
            ty.name()
        );
    }
}
