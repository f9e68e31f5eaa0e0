//! ControlNets against diffusers on tiny random-weight models in the real layouts
//! (tests/fixtures/ref/controlnet, made by tools/reference/controlnet_fixtures.py):
//! the residuals of ControlNetModel for SD 1.x and SDXL, the UNet with them added,
//! guess mode's weights, and StableDiffusionControlNetPipeline's image; lllyasviel's
//! single-file names read as the diffusers folder; and clear refusals.
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::*;
use sdrs::config::ControlConfig;
use sdrs::convert::{self, Policy};
use sdrs::formats::gguf::{metadata, GgufFile};
use sdrs::formats::Checkpoint;
use sdrs::ggml::{Backend, Type};
use sdrs::model::{controlnet, unet, Attention, Weights};
use sdrs::network::controlnet::CONTROL_PREFIX;
use sdrs::network::UNET_PREFIX;
use sdrs::pipeline::{Canvas, CanvasOptions, Control, ControlNet, Pipeline, Request, Sampling};
use sdrs::sample::Sampler;

fn fixture(p: &str) -> PathBuf {
    sdrs::testdata::fixture("ref").join(p)
}

fn golden(name: &str) -> Vec<f32> {
    Checkpoint::open(&fixture("controlnet/golden.safetensors"))
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no golden {name}"))
        .read_f32()
        .unwrap()
}

/// `src` (any ControlNet layout) converted to a GGUF of `ty` in `dir`.
fn convert_controlnet(src: &Path, ty: Type, dir: &Path) -> PathBuf {
    let s = sdrs::formats::control::open(src).unwrap();
    let plan = convert::plan_control(&s, &Policy::new(ty)).unwrap();
    let out = dir.join(format!("{}.gguf", ty.name()));
    convert::run(
        &s.checkpoint,
        &plan,
        ty.name(),
        &out,
        true,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    out
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    diff / scale.max(1e-30)
}

/// The residuals of the ControlNet in `gguf` on the golden inputs of `key`, and the
/// UNet of `model` (a diffusers folder) with them added.
fn residuals_and_unet(key: &str, model: &str, dir: &Path) -> (Vec<Vec<f32>>, Vec<f32>) {
    let gguf = GgufFile::open(&convert_controlnet(
        &fixture(&format!("controlnet/{key}")),
        Type::F32,
        dir,
    ))
    .unwrap();
    let cfg: ControlConfig = metadata::read_control(&gguf).unwrap().unwrap();
    let w = Weights::load(&gguf, |n| n.starts_with(CONTROL_PREFIX)).unwrap();
    let backend = Backend::cpu(2).unwrap();
    let (x, t, context, hint) = (
        golden(&format!("{key}.x")),
        golden(&format!("{key}.t"))[0],
        golden(&format!("{key}.context")),
        golden(&format!("{key}.hint")),
    );
    let y = (key == "sdxl").then(|| golden(&format!("{key}.y")));
    let shape = unet::Shape {
        width: 8,
        height: 8,
        batch: 2,
        tokens: 5,
        control: false,
    };
    let inputs = unet::Inputs {
        x: &x,
        t: &[t, t],
        context: &context,
        y: y.as_deref(),
        ..Default::default()
    };
    let r = controlnet::Runner::new(&w, &cfg, shape, Attention::default())
        .unwrap()
        .run(&inputs, &hint, &backend)
        .unwrap();
    let model_gguf = dir.join(format!("{key}-model.gguf"));
    convert_to(&fixture(model), Type::F32, &model_gguf).unwrap();
    let mg = GgufFile::open(&model_gguf).unwrap();
    let mcfg = metadata::read_config(&mg).unwrap().unwrap();
    let uw = Weights::load(&mg, |n| n.starts_with(UNET_PREFIX)).unwrap();
    let out = unet::forward(
        &uw,
        &mcfg.unet,
        8,
        8,
        &unet::Inputs {
            control: Some(&r),
            ..inputs
        },
        &backend,
    )
    .unwrap();
    (r, out)
}

fn check_against_diffusers(key: &str, model: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (r, out) = residuals_and_unet(key, model, dir.path());
    let n = r.len() - 1;
    for (k, got) in r[..n].iter().enumerate() {
        let e = max_rel(got, &golden(&format!("{key}.down.{k}")));
        assert!(e < 1e-4, "{key} residual {k}: {e:.2e}");
    }
    let e = max_rel(&r[n], &golden(&format!("{key}.mid")));
    assert!(e < 1e-4, "{key} middle residual: {e:.2e}");
    let e = max_rel(&out, &golden(&format!("{key}.unet_out")));
    assert!(e < 1e-4, "{key} UNet with residuals: {e:.2e}");
}

#[test]
fn sd1_controlnet_residuals_and_the_unet_they_steer_match_diffusers() {
    check_against_diffusers("sd1", "sd1/model");
}

#[test]
fn sdxl_controlnet_with_the_label_input_matches_diffusers() {
    check_against_diffusers("sdxl", "sdxl/model");
}

#[test]
fn guess_mode_weights_residuals_from_a_tenth_to_one_as_diffusers_does() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _) = residuals_and_unet("sd1", "sd1/model", dir.path());
    let net = Arc::new(
        ControlNet::open(&convert_controlnet(
            &fixture("controlnet/sd1"),
            Type::F32,
            dir.path(),
        ))
        .unwrap(),
    );
    let canvas =
        Arc::new(Canvas::from_rgb((1, 1, vec![0; 3]), None, &CanvasOptions::default()).unwrap());
    let c = Control {
        strength: 0.7,
        guess: true,
        ..Control::new(net, canvas)
    };
    let scales = c.scales(r.len());
    let n = r.len() - 1;
    for (k, raw) in r.iter().enumerate() {
        let want = if k < n {
            golden(&format!("sd1.guess.down.{k}"))
        } else {
            golden("sd1.guess.mid")
        };
        let got: Vec<f32> = raw.iter().map(|v| v * scales[k]).collect();
        let e = max_rel(&got, &want);
        assert!(e < 1e-4, "guess residual {k}: {e:.2e}");
    }
}

#[test]
fn controlnet_pipeline_reproduces_diffusers_images_plain_and_in_guess_mode_over_half_the_steps() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd1.gguf");
    convert_to(&fixture("sd1/model"), Type::F32, &model).unwrap();
    let pipe = Pipeline::load(&model).unwrap();
    let net = Arc::new(
        ControlNet::open(&convert_controlnet(
            &fixture("controlnet/sd1"),
            Type::F32,
            dir.path(),
        ))
        .unwrap(),
    );
    let hint: Vec<u8> = golden("pipe.hint_u8").iter().map(|&v| v as u8).collect();
    let canvas = Arc::new(
        Canvas::from_rgb(
            (16, 16, hint),
            None,
            &CanvasOptions {
                multiple: 8,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let base = Request {
        width: 16,
        height: 16,
        steps: 4,
        cfg_scale: 7.5,
        noise: Some(golden("pipe.init_latent")),
        sampling: Sampling {
            sampler: Sampler::Euler,
            ..Default::default()
        },
        ..Request::new("a photograph of an astronaut riding a horse")
    };
    let plain = Control::new(net.clone(), canvas.clone());
    let guess = Control {
        strength: 0.8,
        guess: true,
        end: 0.5,
        ..Control::new(net, canvas)
    };
    let without = pipe.generate(&base, &mut |_| {}).unwrap();
    for (name, control) in [("plain", plain), ("guess", guess)] {
        let req = Request {
            controls: vec![control],
            ..base.clone()
        };
        let img = pipe.generate(&req, &mut |_| {}).unwrap();
        let want = golden(&format!("pipe.{name}.image_u8"));
        let psnr = psnr_u8(&img.rgb, &want);
        let moved = psnr_u8(&without.rgb, &want);
        eprintln!("{name}: {psnr:.1} dB against diffusers (without the ControlNet: {moved:.1} dB)");
        assert!(psnr >= 45.0, "{name}: {psnr:.1} dB");
        assert!(moved < psnr - 10.0, "{name}: the ControlNet changed little");
    }
}

#[test]
fn lllyasviels_single_files_with_and_without_the_prefix_read_as_the_diffusers_folder() {
    let dir = tempfile::tempdir().unwrap();
    let folder = sdrs::formats::control::open(&fixture("controlnet/sd1")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = folder
        .checkpoint
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.read_f32().unwrap()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let write = |path: &Path, rename: &dyn Fn(&str) -> String, extra: bool| {
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, s, v)| {
                (
                    rename(n),
                    s.clone(),
                    v.iter().flat_map(|f| f.to_le_bytes()).collect(),
                )
            })
            .collect();
        if extra {
            // ControlNet 1.0 files carry the SD model they were trained with.
            data.push((
                "model.diffusion_model.out.2.bias".into(),
                vec![4],
                vec![0; 16],
            ));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    };
    let v10 = dir.path().join("control_sd15_tiny.safetensors");
    write(&v10, &|n| n.to_string(), true);
    let v11 = dir.path().join("control_v11p_sd15_tiny.safetensors");
    write(
        &v11,
        &|n| n.strip_prefix(CONTROL_PREFIX).unwrap().to_string(),
        false,
    );
    for (path, dropped) in [(&v10, 1), (&v11, 0)] {
        assert!(sdrs::formats::control::is_controlnet(path).unwrap());
        let s = sdrs::formats::control::open(path).unwrap();
        assert_eq!(s.dropped.len(), dropped, "{}", path.display());
        // Shapes show everything but the heads, which single files leave to the family.
        let (mut a, mut b) = (s.config.clone(), folder.config.clone());
        (a.unet.num_heads, a.unet.head_dim, a.family) = (None, None, String::new());
        (b.unet.num_heads, b.unet.head_dim, b.family) = (None, None, String::new());
        assert_eq!(a, b, "{}", path.display());
        let mut got: Vec<(String, Vec<usize>, Vec<f32>)> = s
            .checkpoint
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), t.read_f32().unwrap()))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(got == tensors, "{}", path.display());
    }
    // A file missing a tensor, or with one of the wrong shape, is refused naming it.
    let cut = dir.path().join("control_cut.safetensors");
    let keep = tensors.len() - 1;
    let mut short = tensors.clone();
    short.truncate(keep);
    let write_list = |path: &Path, list: &[(String, Vec<usize>, Vec<f32>)]| {
        let bytes: Vec<Vec<u8>> = list
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|f| f.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = list
            .iter()
            .zip(&bytes)
            .map(|((n, s, _), b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    };
    write_list(&cut, &short);
    let err = sdrs::formats::control::open(&cut).unwrap_err().to_string();
    assert!(
        err.contains("control_cut.safetensors") && err.contains("missing"),
        "{err}"
    );
    let mut odd = tensors.clone();
    let zc = odd
        .iter_mut()
        .find(|t| t.0 == "control_model.zero_convs.0.0.bias")
        .unwrap();
    (zc.1, zc.2) = (vec![3], vec![0.0; 3]);
    let bad = dir.path().join("control_odd.safetensors");
    write_list(&bad, &odd);
    let err = sdrs::formats::control::open(&bad).unwrap_err().to_string();
    assert!(
        err.contains("control_odd.safetensors") && err.contains("zero_convs.0.0.bias"),
        "{err}"
    );
    // A model is not a ControlNet, and a ControlNet is not a model.
    assert!(!sdrs::formats::control::is_controlnet(&fixture("sd1/model")).unwrap());
    let gguf = convert_controlnet(&fixture("controlnet/sd1"), Type::F16, dir.path());
    let err = Pipeline::load(&gguf).err().unwrap().to_string();
    assert!(
        err.contains("ControlNet") && err.contains("--control-net"),
        "{err}"
    );
}

#[test]
fn a_diffusers_named_file_without_its_config_reads_as_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    for key in ["sd1", "sdxl"] {
        let folder = sdrs::formats::control::open(&fixture(&format!("controlnet/{key}"))).unwrap();
        let alone = dir.path().join(format!("diffusers_{key}_tiny.safetensors"));
        std::fs::copy(
            fixture(&format!(
                "controlnet/{key}/diffusion_pytorch_model.safetensors"
            )),
            &alone,
        )
        .unwrap();
        assert!(sdrs::formats::control::is_controlnet(&alone).unwrap());
        let s = sdrs::formats::control::open(&alone).unwrap();
        let (mut a, mut b) = (s.config.clone(), folder.config.clone());
        // Shapes show all but the heads and the family of a tiny model (64-wide heads
        // and `sd2` for its 32-wide text).
        (a.unet.num_heads, a.unet.head_dim, a.family) = (None, None, String::new());
        (b.unet.num_heads, b.unet.head_dim, b.family) = (None, None, String::new());
        b.unet.time_id_dim = 0;
        assert_eq!(a, b, "{key}");
        let names = |src: &sdrs::formats::control::Source| {
            let mut v: Vec<(String, Vec<usize>)> = src
                .checkpoint
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&s), names(&folder), "{key}");
    }
}

/// The tiny sd1 model and the ControlNet fixture `key`, both as f16 GGUFs in `dir`,
/// and a black 16x16 conditioning image.
fn sd1_with(key: &str, dir: &Path) -> (Pipeline, Arc<ControlNet>, Arc<Canvas>) {
    let model = dir.join("sd1.gguf");
    convert_to(&fixture("sd1/model"), Type::F16, &model).unwrap();
    let net = convert_controlnet(&fixture(&format!("controlnet/{key}")), Type::F16, dir);
    let canvas = Canvas::from_rgb((16, 16, vec![0; 768]), None, &CanvasOptions::default()).unwrap();
    (
        Pipeline::load(&model).unwrap(),
        Arc::new(ControlNet::open(&net).unwrap()),
        Arc::new(canvas),
    )
}

#[test]
fn the_memory_plan_counts_a_controlnets_weights_and_graph() {
    let dir = tempfile::tempdir().unwrap();
    let (pipe, net, canvas) = sd1_with("sd1", dir.path());
    let req = Request {
        width: 16,
        height: 16,
        steps: 2,
        ..Request::new("a cat")
    };
    let unet = |r: &Request| {
        let p = pipe.plan(r).unwrap();
        let n = p.needs.iter().find(|n| n.stage == "unet").unwrap().clone();
        (n.weights, n.compute, n.other)
    };
    let (w0, c0, o0) = unet(&req);
    let with = Request {
        controls: vec![Control::new(net.clone(), canvas.clone())],
        ..req.clone()
    };
    let (w1, c1, o1) = unet(&with);
    let cw = GgufFile::open(net.path()).unwrap();
    let bytes: u64 = cw.tensors.iter().map(|t| t.nbytes).sum();
    assert!(
        w1 - w0 >= bytes * 9 / 10 && w1 - w0 <= bytes,
        "{w0} -> {w1} for {bytes}"
    );
    assert!(
        c1 > c0 && o1 > o0,
        "compute {c0} -> {c1}, buffers {o0} -> {o1}"
    );
    // Two ControlNets count twice.
    let two = Request {
        controls: vec![
            Control::new(net.clone(), canvas.clone()),
            Control::new(net, canvas),
        ],
        ..req
    };
    let (w2, _, _) = unet(&two);
    assert_eq!(w2 - w0, 2 * (w1 - w0));
}

#[test]
fn a_controlnet_for_another_model_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let (pipe, xl, canvas) = sd1_with("sdxl", dir.path());
    let req = Request {
        width: 16,
        height: 16,
        steps: 2,
        controls: vec![Control::new(xl, canvas)],
        ..Request::new("a cat")
    };
    let err = pipe.generate(&req, &mut |_| {}).err().unwrap().to_string();
    assert!(err.contains("cannot steer"), "{err}");
}
