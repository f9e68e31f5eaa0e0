//! LoRA files mapped onto models: the real SD 1.5 LoRA in the old diffusers
//! attention-processor layout onto the real SD 1.5 layout, every other naming (kohya
//! with alphas and LoCon kernels, kohya over original single-file paths, PEFT with and
//! without prefixes, SDXL's two encoders, OpenCLIP's fused q/k/v) onto tiny models of
//! the same architectures, the update's arithmetic, and the errors.
mod common;

use sdrs::pipeline::Prompting;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use sdrs::config::ModelConfig;
use sdrs::formats::safetensors::{write, WriteSpec};
use sdrs::formats::DType;
use sdrs::lora::Lora;

/// Writes f32 tensors `(name, shape, values)` as a safetensors file.
fn lora_file(dir: &Path, name: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let specs: Vec<WriteSpec> = tensors
        .iter()
        .map(|(n, s, _)| WriteSpec {
            name: n.clone(),
            shape: s.clone(),
            dtype: DType::F32,
        })
        .collect();
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
fn pair(
    module: &str,
    down: &str,
    up: &str,
    r: usize,
    out: usize,
    inp: &[usize],
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let n_in: usize = inp.iter().product();
    let mut ds = vec![r];
    ds.extend_from_slice(inp);
    let mut us = vec![out, r];
    us.extend(std::iter::repeat_n(1, inp.len() - 1));
    vec![
        (
            format!("{module}{down}"),
            ds,
            (0..r * n_in).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect(),
        ),
        (
            format!("{module}{up}"),
            us,
            (0..out * r).map(|i| (i % 5) as f32 * 0.2 - 0.4).collect(),
        ),
    ]
}

fn layout(name: &str) -> HashMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(fixture("layouts").join(name)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn the_real_sd15_lora_maps_every_key_onto_the_real_sd15_layout() {
    let Some(path) = external("models/lora-sd15-catundchat/pytorch_lora_weights.safetensors")
    else {
        return;
    };
    let lora = Lora::open(&path, &ModelConfig::sd1()).unwrap();
    assert!(lora.unknown.is_empty(), "unmapped: {:?}", lora.unknown);
    // 256 tensors: 128 down/up pairs, 16 transformer blocks x 2 attentions x 4 projections.
    assert_eq!(lora.pairs.len(), 128);
    let sd15 = layout("sd15.json");
    for p in &lora.pairs {
        assert_eq!(
            sd15.get(&p.target.weight),
            Some(&p.target.shape),
            "{} -> {}",
            p.key,
            p.target.weight
        );
        assert!(p.target.weight.starts_with("model.diffusion_model.") && p.target.rows.is_none());
        assert_eq!((p.rank(), p.alpha), (4, None));
    }
    let to_out = lora
        .pairs
        .iter()
        .find(|p| p.key == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
        .unwrap();
    assert_eq!(
        to_out.target.weight,
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    );
    let k = lora
        .pairs
        .iter()
        .find(|p| p.key == "mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
        .unwrap();
    assert_eq!(
        (k.target.weight.as_str(), k.target.shape.as_slice()),
        (
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            &[320 * 4, 768][..]
        )
    );
}

#[test]
fn kohya_peft_and_locon_keys_map_with_alpha_over_rank() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::preset("tiny-sd15").unwrap();
    let te = &cfg.text_encoders[0];
    let (ch, h) = (cfg.unet.model_channels, te.hidden_size);
    let mut t = Vec::new();
    // kohya over diffusers paths, with an alpha: scale 2 / 4.
    t.extend(pair(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        ".lora_down.weight",
        ".lora_up.weight",
        4,
        ch,
        &[cfg.unet.context_dim],
    ));
    t.push((
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha".into(),
        vec![],
        vec![2.0],
    ));
    // LoCon: a 3x3 kernel of the first ResNet.
    t.extend(pair(
        "lora_unet_down_blocks_0_resnets_0_conv1",
        ".lora_down.weight",
        ".lora_up.weight",
        2,
        ch,
        &[ch, 3, 3],
    ));
    // kohya over the original single-file path.
    t.extend(pair(
        "lora_unet_input_blocks_1_1_proj_in",
        ".lora_down.weight",
        ".lora_up.weight",
        2,
        ch,
        &[ch, 1, 1],
    ));
    // The text encoder, kohya.
    t.extend(pair(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        ".lora_down.weight",
        ".lora_up.weight",
        2,
        h,
        &[h],
    ));
    // PEFT with prefixes and without.
    t.extend(pair(
        "unet.up_blocks.3.attentions.0.transformer_blocks.0.ff.net.2",
        ".lora_A.weight",
        ".lora_B.weight",
        2,
        ch,
        &[ch * 4],
    ));
    t.extend(pair(
        "text_encoder.text_model.encoder.layers.1.mlp.fc1",
        ".lora_A.weight",
        ".lora_B.weight",
        2,
        te.intermediate_size,
        &[h],
    ));
    t.extend(pair(
        "mid_block.attentions.0.proj_out",
        ".lora_A.weight",
        ".lora_B.weight",
        2,
        cfg.unet.model_channels * cfg.unet.channel_mult.last().unwrap(),
        &[
            cfg.unet.model_channels * cfg.unet.channel_mult.last().unwrap(),
            1,
            1,
        ],
    ));
    // Something that is not a LoRA tensor, and a LoRA of a module this model lacks.
    t.push((
        "lora_unet_some_extra_thing.lora_down.weight".into(),
        vec![1, 1],
        vec![0.0],
    ));
    t.push(("training_step".into(), vec![1], vec![0.0]));
    let path = lora_file(dir.path(), "mixed.safetensors", &t);
    let lora = Lora::open(&path, &cfg).unwrap();
    assert_eq!(
        lora.unknown,
        vec![
            "lora_unet_some_extra_thing.lora_down.weight".to_string(),
            "training_step".to_string()
        ]
    );
    assert_eq!(lora.pairs.len(), 7);
    let by = |w: &str| {
        lora.pairs
            .iter()
            .find(|p| p.target.weight == w)
            .unwrap_or_else(|| {
                panic!(
                    "no pair for {w}: {:?}",
                    lora.pairs
                        .iter()
                        .map(|p| &p.target.weight)
                        .collect::<Vec<_>>()
                )
            })
    };
    let u = "model.diffusion_model.";
    let k = by(&format!(
        "{u}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    ));
    assert_eq!((k.alpha, k.alpha_scale()), (Some(2.0), 0.5));
    by(&format!("{u}input_blocks.1.0.in_layers.2.weight"));
    by(&format!("{u}input_blocks.1.1.proj_in.weight"));
    by(&format!(
        "{}encoder.layers.0.self_attn.q_proj.weight",
        te.prefix
    ));
    by(&format!("{}encoder.layers.1.mlp.fc1.weight", te.prefix));
    by(&format!("{u}middle_block.1.proj_out.weight"));
    // Δ = multiplier · alpha/rank · up · down, element by element.
    let down = k.down.read_f32().unwrap();
    let up = k.up.read_f32().unwrap();
    let cols = cfg.unet.context_dim;
    let d = k.delta(1.5).unwrap();
    assert_eq!(d.len(), ch * cols);
    for (o, c) in [(0, 0), (3, 5), (ch - 1, cols - 1)] {
        let want: f32 = (0..4)
            .map(|r| up[o * 4 + r] * down[r * cols + c])
            .sum::<f32>()
            * 1.5
            * 0.5;
        assert!(
            (d[o * cols + c] - want).abs() < 1e-6,
            "({o}, {c}): {} vs {want}",
            d[o * cols + c]
        );
    }
}

#[test]
fn sdxl_encoders_and_openclip_fused_projections_get_their_own_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let xl = ModelConfig::preset("tiny-sdxl").unwrap();
    let (h1, h2) = (
        xl.text_encoders[0].hidden_size,
        xl.text_encoders[1].hidden_size,
    );
    let mut t = pair(
        "lora_te1_text_model_encoder_layers_0_self_attn_v_proj",
        ".lora_down.weight",
        ".lora_up.weight",
        2,
        h1,
        &[h1],
    );
    t.extend(pair(
        "lora_te2_text_model_encoder_layers_2_self_attn_k_proj",
        ".lora_down.weight",
        ".lora_up.weight",
        2,
        h2,
        &[h2],
    ));
    t.extend(pair(
        "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj",
        ".lora_A.weight",
        ".lora_B.weight",
        2,
        h2,
        &[h2],
    ));
    let lora = Lora::open(&lora_file(dir.path(), "xl.safetensors", &t), &xl).unwrap();
    assert_eq!(lora.pairs.len(), 3);
    let bigg = &xl.text_encoders[1].prefix;
    for p in &lora.pairs {
        eprintln!("{} -> {} rows {:?}", p.key, p.target.weight, p.target.rows);
    }
    let v = lora
        .pairs
        .iter()
        .find(|p| p.key.contains("layers_0_self_attn_v_proj"))
        .unwrap();
    assert!(
        v.target.weight.starts_with(&xl.text_encoders[0].prefix),
        "{}",
        v.target.weight
    );
    // bigG is OpenCLIP: q, k, v live in one fused in_proj_weight [3h, h].
    let k = lora
        .pairs
        .iter()
        .find(|p| p.key.contains("layers_2_self_attn_k_proj"))
        .unwrap();
    assert_eq!(
        (k.target.weight.clone(), k.target.rows),
        (
            format!("{bigg}transformer.resblocks.2.attn.in_proj_weight"),
            Some((h2, 2 * h2))
        )
    );
    let q = lora
        .pairs
        .iter()
        .find(|p| p.key.ends_with("layers.1.self_attn.q_proj"))
        .unwrap();
    assert_eq!(q.target.rows, Some((0, h2)));
}

#[test]
fn a_lora_for_another_architecture_or_with_half_a_pair_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = ModelConfig::preset("tiny-sd15").unwrap();
    // The same module path, an SDXL width: the shapes say it is not for this model.
    let t = pair(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        ".lora_down.weight",
        ".lora_up.weight",
        4,
        32,
        &[2048],
    );
    let e = Lora::open(&lora_file(dir.path(), "xl.safetensors", &t), &sd1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("xl.safetensors") && e.contains("another architecture"),
        "{e}"
    );
    // Nothing maps at all.
    let t = pair(
        "lora_prior_unet_layers_0_attn",
        ".lora_down.weight",
        ".lora_up.weight",
        2,
        4,
        &[4],
    );
    let e = Lora::open(&lora_file(dir.path(), "cascade.safetensors", &t), &sd1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cascade.safetensors") && e.contains("no key names a module"),
        "{e}"
    );
    // A down without its up.
    let mut t = pair(
        "lora_unet_down_blocks_0_resnets_0_conv1",
        ".lora_down.weight",
        ".lora_up.weight",
        2,
        32,
        &[32, 3, 3],
    );
    t.pop();
    let e = Lora::open(&lora_file(dir.path(), "half.safetensors", &t), &sd1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("half.safetensors") && e.contains("has no up half"),
        "{e}"
    );
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
    let fixtures = sdrs::testdata::fixture("ref");
    let golden = Checkpoint::open(&fixtures.join("lora/golden.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = Checkpoint::open(&fixtures.join("sd1/model")).unwrap();
    for (kind, multiplier) in [("kohya", 0.8), ("peft", 1.0), ("processor", 1.3)] {
        let mut plan = convert::plan(&src, &Policy::new(Type::F32), None).unwrap();
        plan.merge_lora(
            &fixtures.join(format!("lora/{kind}.safetensors")),
            multiplier,
        )
        .unwrap();
        let out = dir.path().join(format!("{kind}.gguf"));
        convert::run(
            &src,
            &plan,
            "f32",
            &out,
            false,
            &std::sync::atomic::AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
        let merged = Checkpoint::open(&out).unwrap();
        // Diffusers names of the golden weights → canonical, through the converter's own table.
        let mut canonical = HashMap::new();
        for e in sdrs::formats::diffusers::names::unet(&plan.config.unet).unwrap() {
            canonical.insert(format!("unet.{}", e.diffusers[0]), e.canonical.clone());
        }
        for e in sdrs::formats::diffusers::names::text(&plan.config.text_encoders[0]) {
            canonical.insert(
                format!("text_encoder.{}", e.diffusers[0]),
                e.canonical.clone(),
            );
        }
        let mut checked = 0;
        for t in golden
            .tensors
            .iter()
            .filter(|t| t.name.starts_with(&format!("{kind}.")) && t.name.ends_with(".weight"))
        {
            let name = &canonical[&t.name[kind.len() + 1..]];
            let want = t.read_f32().unwrap();
            let got = merged.get(name).unwrap().read_f32().unwrap();
            let e = rel_rms(&want, &got);
            assert!(e < 1e-6, "{kind} {name}: relative error {e:.2e}");
            checked += 1;
        }
        assert!(checked >= 4, "{kind}: {checked} weights checked");
        let pipe = Pipeline::load(&out).unwrap();
        let req = Request {
            width: 16,
            height: 16,
            steps: 4,
            cfg_scale: 7.5,
            seed: 7,
            ..Request::new("a photograph of an astronaut riding a horse")
        };
        let img = pipe.generate(&req, &mut |_| {}).unwrap();
        let want = golden
            .get(&format!("{kind}.image_u8"))
            .unwrap()
            .read_f32()
            .unwrap();
        let psnr = psnr_u8(&img.rgb, &want);
        eprintln!(
            "{kind}: {checked} fused weights within 1e-6, image {psnr:.1} dB against diffusers"
        );
        assert!(psnr >= 40.0, "{kind}: {psnr:.1} dB");
    }
}

#[test]
fn convert_command_merges_loras_and_records_them_in_the_file() {
    let fixtures = sdrs::testdata::fixture("ref");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.gguf");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .arg("convert")
        .arg(fixtures.join("sd1/model"))
        .args(["--type", "q8_0", "--lora"])
        .arg(format!(
            "{}:0.5",
            fixtures.join("lora/peft.safetensors").display()
        ))
        .arg("--lora")
        .arg(fixtures.join("lora/kohya.safetensors"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gguf = sdrs::formats::gguf::GgufFile::open(&out).unwrap();
    let merged = gguf
        .get("sd.lora.merged")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    assert_eq!(merged, "peft.safetensors:0.5, kohya.safetensors:1");
    // A LoRA for another model leaves no output behind.
    let bad = lora_file(
        dir.path(),
        "xl.safetensors",
        &pair(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
            ".lora_down.weight",
            ".lora_up.weight",
            4,
            32,
            &[2048],
        ),
    );
    let out2 = dir.path().join("bad.gguf");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .arg("convert")
        .arg(fixtures.join("sd1/model"))
        .arg("--lora")
        .arg(&bad)
        .arg("-o")
        .arg(&out2)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("xl.safetensors")
            && err.contains("another architecture"),
        "{err}"
    );
    assert!(!out2.exists());
}

/// The same LoRAs as above, but as branches beside the unmerged (f32 and q8_0) base:
/// diffusers' fused images again, and the model untouched between requests.
#[test]
fn run_time_branches_reproduce_diffusers_and_switch_per_request() {
    use sdrs::formats::Checkpoint;
    use sdrs::ggml::Type;
    use sdrs::pipeline::{Pipeline, Request};
    let fixtures = sdrs::testdata::fixture("ref");
    let golden = Checkpoint::open(&fixtures.join("lora/golden.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("base.gguf");
    convert_to(&fixtures.join("sd1/model"), Type::F32, &out).unwrap();
    let before = std::fs::read(&out).unwrap();
    let pipe = Pipeline::load(&out).unwrap();
    let base = Request {
        width: 16,
        height: 16,
        steps: 4,
        cfg_scale: 7.5,
        seed: 7,
        ..Request::new("a photograph of an astronaut riding a horse")
    };
    let plain = pipe.generate(&base, &mut |_| {}).unwrap();
    for (kind, multiplier) in [("kohya", 0.8), ("peft", 1.0), ("processor", 1.3)] {
        let req = Request {
            loras: vec![(
                fixtures.join(format!("lora/{kind}.safetensors")),
                multiplier,
            )],
            ..base.clone()
        };
        let img = pipe.generate(&req, &mut |_| {}).unwrap();
        let want = golden
            .get(&format!("{kind}.image_u8"))
            .unwrap()
            .read_f32()
            .unwrap();
        let p = psnr_u8(&img.rgb, &want);
        eprintln!("{kind} at run time: {p:.1} dB against diffusers' fused pipeline");
        assert!(p >= 40.0, "{kind}: {p:.1} dB");
        assert_ne!(img.rgb, plain.rgb, "{kind}: the LoRA changed nothing");
        // The next request without it is the plain model again.
        assert_eq!(pipe.generate(&base, &mut |_| {}).unwrap().rgb, plain.rgb);
    }
    assert!(
        std::fs::read(&out).unwrap() == before,
        "the model file changed"
    );

    // On a quantized base the branches still carry the LoRA: close to the merged q8_0 file.
    let q8 = dir.path().join("q8.gguf");
    convert_to(&fixtures.join("sd1/model"), Type::Q8_0, &q8).unwrap();
    let pipe = Pipeline::load(&q8).unwrap();
    let req = Request {
        loras: vec![(fixtures.join("lora/kohya.safetensors"), 0.8)],
        ..base.clone()
    };
    let img = pipe.generate(&req, &mut |_| {}).unwrap();
    let want = golden.get("kohya.image_u8").unwrap().read_f32().unwrap();
    let p = psnr_u8(&img.rgb, &want);
    eprintln!("kohya at run time on q8_0: {p:.1} dB against diffusers (f32)");
    assert!(p >= 30.0, "q8_0: {p:.1} dB");
}

/// `<lora:NAME:MULTIPLIER>` in the prompt picks `NAME.safetensors` from the LoRA folder;
/// the tag is not text; missing folders, names and path tricks are refused.
#[test]
fn prompt_tags_pick_loras_from_the_folder() {
    use sdrs::ggml::Type;
    use sdrs::pipeline::{Pipeline, Request};
    let fixtures = sdrs::testdata::fixture("ref");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("base.gguf");
    convert_to(&fixtures.join("sd1/model"), Type::F32, &out).unwrap();
    let pipe = Pipeline::load(&out).unwrap();
    let prompt = "a photograph of an astronaut riding a horse";
    let base = Request {
        width: 16,
        height: 16,
        steps: 4,
        cfg_scale: 7.5,
        seed: 7,
        ..Request::new(prompt)
    };
    let by_file = pipe
        .generate(
            &Request {
                loras: vec![(fixtures.join("lora/peft.safetensors"), 0.6)],
                ..base.clone()
            },
            &mut |_| {},
        )
        .unwrap();
    let tagged = Request {
        prompt: format!("{prompt} <lora:peft:0.6>"),
        prompting: Prompting {
            lora_dir: Some(fixtures.join("lora")),
            ..base.clone().prompting
        },
        ..base.clone()
    };
    assert_eq!(
        pipe.generate(&tagged, &mut |_| {}).unwrap().rgb,
        by_file.rgb
    );
    let err = |r: Request| pipe.generate(&r, &mut |_| {}).unwrap_err().to_string();
    let e = err(Request {
        prompting: Prompting {
            lora_dir: None,
            ..tagged.clone().prompting
        },
        ..tagged.clone()
    });
    assert!(e.contains("--lora-dir"), "{e}");
    let e = err(Request {
        prompt: "x <lora:nothing-here>".into(),
        ..tagged.clone()
    });
    assert!(e.contains("no LoRA `nothing-here`"), "{e}");
    let e = err(Request {
        prompt: "x <lora:../sd1/model/unet/diffusion_pytorch_model>".into(),
        ..tagged.clone()
    });
    assert!(e.contains("not a plain file name"), "{e}");
}

/// The real LoRA at full SD 1.5 width, against torch on the same tensors
/// (tools/reference/lora_block_fixture.py): the merged q projection, and a whole
/// self-attention block (q, k, v, out with their branches, 8 heads of 40) run through
/// sdrs' own layers with the branches beside the base weights.
#[test]
fn the_real_lora_on_a_full_width_attention_block_matches_torch() {
    use sdrs::formats::Checkpoint;
    use sdrs::ggml::{Backend, Context};
    use sdrs::model::nn::Nn;
    use sdrs::model::{Adapters, Weights};
    let fixtures = sdrs::testdata::fixture("ref/lora/block.safetensors");
    let want: HashMap<String, Vec<f32>> = Checkpoint::open(&fixtures)
        .unwrap()
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.read_f32().unwrap()))
        .collect();
    let Some(path) = external("models/lora-sd15-catundchat/pytorch_lora_weights.safetensors")
    else {
        return;
    };
    let lora = Lora::open(&path, &ModelConfig::sd1()).unwrap();
    let names = ["to_q", "to_k", "to_v", "to_out"];
    let block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.";
    let target = |n: &str| {
        let module = format!("{block}{}", if n == "to_out" { "to_out.0" } else { n });
        lora.pairs
            .iter()
            .find(|p| p.key == module || p.key.starts_with(&format!("{block}processor.{n}_lora")))
            .unwrap_or_else(|| {
                panic!(
                    "no pair for {module}: {:?}",
                    lora.pairs
                        .iter()
                        .map(|p| &p.key)
                        .take(4)
                        .collect::<Vec<_>>()
                )
            })
            .target
            .weight
            .clone()
    };
    let (c, heads, tokens, mult) = (320usize, 8usize, 16usize, 0.75f32);
    let formula = |rows: usize, cols: usize, f: &dyn Fn(usize, usize) -> (i64, f32)| -> Vec<f32> {
        (0..rows * cols)
            .map(|k| {
                let (n, d) = f(k / cols, k % cols);
                n as f32 / d
            })
            .collect()
    };

    // Merged: W_q + 0.75·up·down, by the converter's own arithmetic.
    let q = lora
        .pairs
        .iter()
        .find(|p| p.target.weight == target("to_q"))
        .unwrap();
    let wq = formula(c, c, &|o, i| (((o * 31 + i * 17) % 97) as i64 - 48, 480.0));
    let delta = q.delta(mult).unwrap();
    let merged: Vec<f32> = wq.iter().zip(&delta).map(|(w, d)| w + d).collect();
    let rows: Vec<f32> = merged.chunks(c).map(|r| r.iter().sum()).collect();
    let cols: Vec<f32> = (0..c)
        .map(|i| (0..c).map(|o| merged[o * c + i]).sum())
        .collect();
    let corner: Vec<f32> = (0..16)
        .flat_map(|o| merged[o * c..o * c + 16].to_vec())
        .collect();
    assert!(
        rel_rms(&want["merged.row_sums"], &rows) < 1e-5
            && rel_rms(&want["merged.col_sums"], &cols) < 1e-5
    );
    assert!(rel_rms(&want["merged.corner"], &corner) < 1e-6);

    // The block with run-time branches.
    let backend = Backend::cpu(2).unwrap();
    let mut list = Vec::new();
    for (m, n) in names.iter().enumerate() {
        let w = formula(c, c, &|o, i| {
            (((o * 31 + i * 17 + m * 11) % 97) as i64 - 48, 480.0)
        });
        list.push((target(n), vec![c, c], w));
    }
    let bias_name = target("to_out").replace(".weight", ".bias");
    list.push((
        bias_name,
        vec![c],
        formula(1, c, &|_, o| (((o * 7) % 13) as i64 - 6, 1000.0)),
    ));
    let weights = Weights::from_f32(Path::new("formula"), list, &backend).unwrap();
    let adapters = Adapters::new(
        &[(&lora, mult)],
        |n| names.iter().any(|k| n == target(k)),
        &backend,
    )
    .unwrap()
    .unwrap();
    assert_eq!(adapters.count(), 4);
    let x = formula(tokens, c, &|t, i| {
        (((t * 13 + i * 7) % 89) as i64 - 44, 440.0)
    });
    let run = |with: bool| -> Vec<f32> {
        let ctx = Context::new(256).unwrap();
        let nn = Nn {
            adapters: with.then_some(&adapters),
            ..Nn::new(&ctx, &weights)
        };
        let input = ctx
            .tensor(sdrs::ggml::Type::F32, &[c, tokens, 1], "x")
            .unwrap();
        ctx.set_input(input);
        let layer = |n: &str| target(n).trim_end_matches(".weight").to_string();
        let d = c / heads;
        let split = |y| {
            ctx.permute(
                ctx.reshape(y, &[d, heads, tokens, 1]).unwrap(),
                [0, 2, 1, 3],
            )
            .unwrap()
        };
        let (qy, ky, vy) = (
            nn.linear(input, &layer("to_q")).unwrap(),
            nn.linear(input, &layer("to_k")).unwrap(),
            nn.linear(input, &layer("to_v")).unwrap(),
        );
        let o = nn.attend(split(qy), split(ky), split(vy), false).unwrap();
        let y = nn.linear(o, &layer("to_out")).unwrap();
        ctx.set_output(y);
        let graph = ctx.graph(&[y]).unwrap();
        ctx.alloc_graph(&graph).unwrap();
        ctx.set_f32(input, &x).unwrap();
        backend.compute(&graph).unwrap();
        ctx.get_f32(y).unwrap()
    };
    let (y, y_base) = (run(true), run(false));
    assert!(
        rel_rms(&want["y_base"], &y_base) < 1e-5,
        "base block: {:.2e}",
        rel_rms(&want["y_base"], &y_base)
    );
    assert!(
        rel_rms(&want["y"], &y) < 1e-5,
        "block with the LoRA: {:.2e}",
        rel_rms(&want["y"], &y)
    );
    // The LoRA's own contribution, which is small beside the block's output, is right too.
    let dw: Vec<f32> = want["y"]
        .iter()
        .zip(&want["y_base"])
        .map(|(a, b)| a - b)
        .collect();
    let dg: Vec<f32> = y.iter().zip(&y_base).map(|(a, b)| a - b).collect();
    let e = rel_rms(&dw, &dg);
    eprintln!("real LoRA, full-width attention block: branch contribution within {e:.2e} of torch");
    assert!(e < 1e-2, "branch contribution: {e:.2e}");
}
