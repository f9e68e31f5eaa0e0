//! LoRA files mapped onto models: the real SD 1.5 LoRA in the old diffusers
//! attention-processor layout onto the real SD 1.5 layout, every other naming (kohya
//! with alphas and LoCon kernels, kohya over original single-file paths, PEFT with and
//! without prefixes, SDXL's two encoders, OpenCLIP's fused q/k/v) onto tiny models of
//! the same architectures, the update's arithmetic, and the errors.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use sdrs::config::ModelConfig;
use sdrs::formats::safetensors::{write, WriteSpec};
use sdrs::formats::DType;
use sdrs::lora::Lora;

/// Writes f32 tensors `(name, shape, values)` as a safetensors file.
fn lora_file(dir: &Path, name: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let specs: Vec<WriteSpec> = tensors.iter().map(|(n, s, _)| WriteSpec { name: n.clone(), shape: s.clone(), dtype: DType::F32 }).collect();
    let mut bytes = Vec::new();
    write(&mut bytes, &specs, &Default::default(), |i, b| {
        b.extend(tensors[i].2.iter().flat_map(|v| v.to_le_bytes()));
        Ok(())
    })
    .unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A pair `{module}{down}` [r, in…] / `{module}{up}` [out, r, 1…] of small ramps.
fn pair(module: &str, down: &str, up: &str, r: usize, out: usize, inp: &[usize]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let n_in: usize = inp.iter().product();
    let mut ds = vec![r];
    ds.extend_from_slice(inp);
    let mut us = vec![out, r];
    us.extend(std::iter::repeat_n(1, inp.len() - 1));
    vec![
        (format!("{module}{down}"), ds, (0..r * n_in).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect()),
        (format!("{module}{up}"), us, (0..out * r).map(|i| (i % 5) as f32 * 0.2 - 0.4).collect()),
    ]
}

fn layout(name: &str) -> HashMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(shared().join("layouts").join(name)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array().unwrap().iter().map(|t| (t["name"].as_str().unwrap().to_string(), t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())).collect()
}

#[test]
fn the_real_sd15_lora_maps_every_key_onto_the_real_sd15_layout() {
    let path = shared().join("models/lora-sd15-catundchat/pytorch_lora_weights.safetensors");
    let lora = Lora::open(&path, &ModelConfig::sd1()).unwrap();
    assert!(lora.unknown.is_empty(), "unmapped: {:?}", lora.unknown);
    // 256 tensors: 128 down/up pairs, 16 transformer blocks x 2 attentions x 4 projections.
    assert_eq!(lora.pairs.len(), 128);
    let sd15 = layout("sd15.json");
    for p in &lora.pairs {
        assert_eq!(sd15.get(&p.target.weight), Some(&p.target.shape), "{} -> {}", p.key, p.target.weight);
        assert!(p.target.weight.starts_with("model.diffusion_model.") && p.target.rows.is_none());
        assert_eq!((p.rank(), p.alpha), (4, None));
    }
    let to_out = lora.pairs.iter().find(|p| p.key == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0").unwrap();
    assert_eq!(to_out.target.weight, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight");
    let k = lora.pairs.iter().find(|p| p.key == "mid_block.attentions.0.transformer_blocks.0.attn2.to_k").unwrap();
    assert_eq!((k.target.weight.as_str(), k.target.shape.as_slice()), ("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight", &[320 * 4, 768][..]));
}

#[test]
fn kohya_peft_and_locon_keys_map_with_alpha_over_rank() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::preset("tiny-sd15").unwrap();
    let te = &cfg.text_encoders[0];
    let (ch, h) = (cfg.unet.model_channels, te.hidden_size);
    let mut t = Vec::new();
    // kohya over diffusers paths, with an alpha: scale 2 / 4.
    t.extend(pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", ".lora_down.weight", ".lora_up.weight", 4, ch, &[cfg.unet.context_dim]));
    t.push(("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha".into(), vec![], vec![2.0]));
    // LoCon: a 3x3 kernel of the first ResNet.
    t.extend(pair("lora_unet_down_blocks_0_resnets_0_conv1", ".lora_down.weight", ".lora_up.weight", 2, ch, &[ch, 3, 3]));
    // kohya over the original single-file path.
    t.extend(pair("lora_unet_input_blocks_1_1_proj_in", ".lora_down.weight", ".lora_up.weight", 2, ch, &[ch, 1, 1]));
    // The text encoder, kohya.
    t.extend(pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", ".lora_down.weight", ".lora_up.weight", 2, h, &[h]));
    // PEFT with prefixes and without.
    t.extend(pair("unet.up_blocks.3.attentions.0.transformer_blocks.0.ff.net.2", ".lora_A.weight", ".lora_B.weight", 2, ch, &[ch * 4]));
    t.extend(pair("text_encoder.text_model.encoder.layers.1.mlp.fc1", ".lora_A.weight", ".lora_B.weight", 2, te.intermediate_size, &[h]));
    t.extend(pair("mid_block.attentions.0.proj_out", ".lora_A.weight", ".lora_B.weight", 2, cfg.unet.model_channels * cfg.unet.channel_mult.last().unwrap(), &[cfg.unet.model_channels * cfg.unet.channel_mult.last().unwrap(), 1, 1]));
    // Something that is not a LoRA tensor, and a LoRA of a module this model lacks.
    t.push(("lora_unet_some_extra_thing.lora_down.weight".into(), vec![1, 1], vec![0.0]));
    t.push(("training_step".into(), vec![1], vec![0.0]));
    let path = lora_file(dir.path(), "mixed.safetensors", &t);
    let lora = Lora::open(&path, &cfg).unwrap();
    assert_eq!(lora.unknown, vec!["lora_unet_some_extra_thing.lora_down.weight".to_string(), "training_step".to_string()]);
    assert_eq!(lora.pairs.len(), 7);
    let by = |w: &str| lora.pairs.iter().find(|p| p.target.weight == w).unwrap_or_else(|| panic!("no pair for {w}: {:?}", lora.pairs.iter().map(|p| &p.target.weight).collect::<Vec<_>>()));
    let u = "model.diffusion_model.";
    let k = by(&format!("{u}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"));
    assert_eq!((k.alpha, k.alpha_scale()), (Some(2.0), 0.5));
    by(&format!("{u}input_blocks.1.0.in_layers.2.weight"));
    by(&format!("{u}input_blocks.1.1.proj_in.weight"));
    by(&format!("{}encoder.layers.0.self_attn.q_proj.weight", te.prefix));
    by(&format!("{}encoder.layers.1.mlp.fc1.weight", te.prefix));
    by(&format!("{u}middle_block.1.proj_out.weight"));
    // Δ = multiplier · alpha/rank · up · down, element by element.
    let down = k.down.read_f32().unwrap();
    let up = k.up.read_f32().unwrap();
    let cols = cfg.unet.context_dim;
    let d = k.delta(1.5).unwrap();
    assert_eq!(d.len(), ch * cols);
    for (o, c) in [(0, 0), (3, 5), (ch - 1, cols - 1)] {
        let want: f32 = (0..4).map(|r| up[o * 4 + r] * down[r * cols + c]).sum::<f32>() * 1.5 * 0.5;
        assert!((d[o * cols + c] - want).abs() < 1e-6, "({o}, {c}): {} vs {want}", d[o * cols + c]);
    }
}

#[test]
fn sdxl_encoders_and_openclip_fused_projections_get_their_own_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let xl = ModelConfig::preset("tiny-sdxl").unwrap();
    let (h1, h2) = (xl.text_encoders[0].hidden_size, xl.text_encoders[1].hidden_size);
    let mut t = pair("lora_te1_text_model_encoder_layers_0_self_attn_v_proj", ".lora_down.weight", ".lora_up.weight", 2, h1, &[h1]);
    t.extend(pair("lora_te2_text_model_encoder_layers_2_self_attn_k_proj", ".lora_down.weight", ".lora_up.weight", 2, h2, &[h2]));
    t.extend(pair("text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj", ".lora_A.weight", ".lora_B.weight", 2, h2, &[h2]));
    let lora = Lora::open(&lora_file(dir.path(), "xl.safetensors", &t), &xl).unwrap();
    assert_eq!(lora.pairs.len(), 3);
    let bigg = &xl.text_encoders[1].prefix;
    for p in &lora.pairs {
        eprintln!("{} -> {} rows {:?}", p.key, p.target.weight, p.target.rows);
    }
    let v = lora.pairs.iter().find(|p| p.key.contains("layers_0_self_attn_v_proj")).unwrap();
    assert!(v.target.weight.starts_with(&xl.text_encoders[0].prefix), "{}", v.target.weight);
    // bigG is OpenCLIP: q, k, v live in one fused in_proj_weight [3h, h].
    let k = lora.pairs.iter().find(|p| p.key.contains("layers_2_self_attn_k_proj")).unwrap();
    assert_eq!((k.target.weight.clone(), k.target.rows), (format!("{bigg}transformer.resblocks.2.attn.in_proj_weight"), Some((h2, 2 * h2))));
    let q = lora.pairs.iter().find(|p| p.key.ends_with("layers.1.self_attn.q_proj")).unwrap();
    assert_eq!(q.target.rows, Some((0, h2)));
}

#[test]
fn a_lora_for_another_architecture_or_with_half_a_pair_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = ModelConfig::preset("tiny-sd15").unwrap();
    // The same module path, an SDXL width: the shapes say it is not for this model.
    let t = pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", ".lora_down.weight", ".lora_up.weight", 4, 32, &[2048]);
    let e = Lora::open(&lora_file(dir.path(), "xl.safetensors", &t), &sd1).unwrap_err().to_string();
    assert!(e.contains("xl.safetensors") && e.contains("another architecture"), "{e}");
    // Nothing maps at all.
    let t = pair("lora_prior_unet_layers_0_attn", ".lora_down.weight", ".lora_up.weight", 2, 4, &[4]);
    let e = Lora::open(&lora_file(dir.path(), "cascade.safetensors", &t), &sd1).unwrap_err().to_string();
    assert!(e.contains("cascade.safetensors") && e.contains("no key names a module"), "{e}");
    // A down without its up.
    let mut t = pair("lora_unet_down_blocks_0_resnets_0_conv1", ".lora_down.weight", ".lora_up.weight", 2, 32, &[32, 3, 3]);
    t.pop();
    let e = Lora::open(&lora_file(dir.path(), "half.safetensors", &t), &sd1).unwrap_err().to_string();
    assert!(e.contains("half.safetensors") && e.contains("has no up half"), "{e}");
}

/// `sdrs convert --lora` against diffusers' `load_lora_weights` + `fuse_lora` on the tiny
/// SD 1.x model (tools/reference/lora_fixtures.py): the fused weights, and the image a
/// seeded 4-step Euler run makes with them, for a kohya (alphas, LoCon), a PEFT and an
/// attention-processor file.
#[test]
fn merged_conversion_matches_diffusers_fuse_lora_for_each_naming() {
    use sdrs::convert::{self, Policy};
    use sdrs::formats::Checkpoint;
    use sdrs::ggml::Type;
    use sdrs::pipeline::{Pipeline, Request};
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ref");
    let golden = Checkpoint::open(&fixtures.join("lora/golden.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = Checkpoint::open(&fixtures.join("sd1/model")).unwrap();
    for (kind, multiplier) in [("kohya", 0.8), ("peft", 1.0), ("processor", 1.3)] {
        let mut plan = convert::plan(&src, &Policy::new(Type::F32), None).unwrap();
        plan.merge_lora(&fixtures.join(format!("lora/{kind}.safetensors")), multiplier).unwrap();
        let out = dir.path().join(format!("{kind}.gguf"));
        convert::run(&src, &plan, "f32", &out, false, &std::sync::atomic::AtomicBool::new(false), &mut |_| {}).unwrap();
        let merged = Checkpoint::open(&out).unwrap();
        // Diffusers names of the golden weights → canonical, through the converter's own table.
        let mut canonical = HashMap::new();
        for e in sdrs::formats::diffusers::names::unet(&plan.config.unet).unwrap() {
            canonical.insert(format!("unet.{}", e.diffusers[0]), e.canonical.clone());
        }
        for e in sdrs::formats::diffusers::names::text(&plan.config.text_encoders[0]) {
            canonical.insert(format!("text_encoder.{}", e.diffusers[0]), e.canonical.clone());
        }
        let mut checked = 0;
        for t in golden.tensors.iter().filter(|t| t.name.starts_with(&format!("{kind}.")) && t.name.ends_with(".weight")) {
            let name = &canonical[&t.name[kind.len() + 1..]];
            let want = t.read_f32().unwrap();
            let got = merged.get(name).unwrap().read_f32().unwrap();
            let e = rel_rms(&want, &got);
            assert!(e < 1e-6, "{kind} {name}: relative error {e:.2e}");
            checked += 1;
        }
        assert!(checked >= 4, "{kind}: {checked} weights checked");
        let pipe = Pipeline::load(&out).unwrap();
        let req = Request { width: 16, height: 16, steps: 4, cfg_scale: 7.5, seed: 7, ..Request::new("a photograph of an astronaut riding a horse") };
        let img = pipe.generate(&req, &mut |_| {}).unwrap();
        let want = golden.get(&format!("{kind}.image_u8")).unwrap().read_f32().unwrap();
        let mse = img.rgb.iter().zip(&want).map(|(&a, &b)| ((a as f64 - b as f64) / 255.0).powi(2)).sum::<f64>() / want.len() as f64;
        let psnr = 10.0 * (1.0 / mse.max(1e-12)).log10();
        eprintln!("{kind}: {checked} fused weights within 1e-6, image {psnr:.1} dB against diffusers");
        assert!(psnr >= 40.0, "{kind}: {psnr:.1} dB");
    }
}

#[test]
fn convert_command_merges_loras_and_records_them_in_the_file() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ref");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.gguf");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .arg("convert")
        .arg(fixtures.join("sd1/model"))
        .args(["--type", "q8_0", "--lora"])
        .arg(format!("{}:0.5", fixtures.join("lora/peft.safetensors").display()))
        .arg("--lora")
        .arg(fixtures.join("lora/kohya.safetensors"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gguf = sdrs::formats::gguf::GgufFile::open(&out).unwrap();
    let merged = gguf.get("sd.lora.merged").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    assert_eq!(merged, "peft.safetensors:0.5, kohya.safetensors:1");
    // A LoRA for another model leaves no output behind.
    let bad = lora_file(dir.path(), "xl.safetensors", &pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", ".lora_down.weight", ".lora_up.weight", 4, 32, &[2048]));
    let out2 = dir.path().join("bad.gguf");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs")).arg("convert").arg(fixtures.join("sd1/model")).arg("--lora").arg(&bad).arg("-o").arg(&out2).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("xl.safetensors") && err.contains("another architecture"), "{err}");
    assert!(!out2.exists());
}
