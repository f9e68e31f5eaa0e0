use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::*;
use crate::config::{Betas, ModelConfig, Prediction, Variance};
use crate::formats::safetensors::{self as st, WriteSpec};
use crate::formats::source::{DType, SourceFile, TensorData};

#[derive(Deserialize)]
struct LayoutEntry {
    name: String,
    shape: Vec<usize>,
    #[serde(default)]
    extra: bool,
}

fn layout(file: &str) -> Vec<LayoutEntry> {
    let path = crate::testdata::fixture("layouts").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Maps the published diffusers layouts of `model` through the plans of `cfg` and
/// compares the result with the published single-file layout.
fn check_layout(model: &str, cfg: &ModelConfig) {
    let empty = tempfile::NamedTempFile::new().expect("temp file");
    let file = SourceFile::open(empty.path()).expect("open temp file");
    let mut comps: Vec<(&str, Vec<crate::network::Param>)> = vec![
        ("unet", names::unet(&cfg.unet).expect("unet plan")),
        ("vae", names::vae(cfg.vae.as_ref().unwrap())),
    ];
    for (t, name) in cfg
        .text_encoders
        .iter()
        .zip(["text_encoder", "text_encoder_2"])
    {
        comps.push((name, names::text(t)));
    }
    let mut got: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (comp, plan) in comps {
        let fake = layout(&format!("diffusers-{model}-{comp}.json"))
            .into_iter()
            .map(|e| SourceTensor {
                name: e.name,
                shape: e.shape,
                dtype: DType::F16,
                data: TensorData::Raw {
                    file: Arc::clone(&file),
                    offset: 0,
                },
            })
            .collect();
        let mapped = names::to_canonical(&plan, fake, Path::new(comp), |n| {
            n.ends_with("position_ids")
        })
        .unwrap_or_else(|e| panic!("{model} {comp}: {e}"));
        for t in mapped {
            assert!(
                got.insert(t.name.clone(), t.shape).is_none(),
                "{model}: `{}` produced twice",
                t.name
            );
        }
    }
    let want: BTreeMap<String, Vec<usize>> = layout(&format!("{model}.json"))
        .into_iter()
        .filter(|e| !e.extra)
        .map(|e| (e.name, e.shape))
        .collect();
    let missing: Vec<&String> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    let unexpected: Vec<&String> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "{model}: missing {missing:?}, unexpected {unexpected:?}"
    );
    for (name, shape) in &want {
        assert_eq!(&got[name], shape, "{model}: shape of `{name}`");
    }
}

#[test]
fn sd15_diffusers_layout_maps_onto_every_single_file_name_and_shape() {
    check_layout("sd15", &ModelConfig::sd1());
}

#[test]
fn sd21_diffusers_layout_maps_onto_every_single_file_name_and_shape() {
    check_layout("sd21", &ModelConfig::sd2());
}

#[test]
fn sdxl_diffusers_layout_maps_onto_every_single_file_name_and_shape() {
    check_layout("sdxl", &ModelConfig::sdxl());
}

/// Every canonical tensor of `cfg`, with its shape.
fn canonical(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut plans = names::unet(&cfg.unet).expect("unet plan");
    plans.extend(names::vae(cfg.vae.as_ref().unwrap()));
    for t in &cfg.text_encoders {
        plans.extend(names::text(t));
    }
    plans.into_iter().map(|e| (e.canonical, e.shape)).collect()
}

/// Deterministic, name-dependent values spanning many exponents and both signs.
fn values_for(name: &str, n: usize) -> Vec<f32> {
    let mut s = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x1000_0000_01b3)
    });
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = f32::from_bits((s >> 32) as u32);
            if x.is_finite() {
                x
            } else {
                (s & 0xffff) as f32 - 32768.0
            }
        })
        .collect()
}

fn test_tokenizer() -> TokenizerFiles {
    TokenizerFiles {
        vocab_json: Some(
            r#"{"!": 0, "a": 1, "<|startoftext|>": 49406, "<|endoftext|>": 49407}"#.into(),
        ),
        merges_txt: Some("#version: 0.2\na b\n".into()),
    }
}

/// Writes `cfg` with random tensors as `dtype`; returns the folder and the values.
fn write_random(cfg: &ModelConfig, dtype: DType) -> (tempfile::TempDir, HashMap<String, Vec<f32>>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let values: HashMap<String, Vec<f32>> = canonical(cfg)
        .into_iter()
        .map(|(n, s)| (n.clone(), values_for(&n, s.iter().product())))
        .collect();
    let mut reads: HashMap<String, usize> = HashMap::new();
    write(
        dir.path(),
        cfg,
        dtype,
        Some(&test_tokenizer()),
        &mut |name| {
            *reads.entry(name.to_string()).or_default() += 1;
            values
                .get(name)
                .cloned()
                .ok_or_else(|| Error::Invalid(format!("no tensor `{name}`")))
        },
    )
    .expect("write");
    assert_eq!(reads.len(), values.len(), "every canonical tensor is read");
    assert!(
        reads.values().all(|&n| n == 1),
        "each canonical tensor is read once"
    );
    (dir, values)
}

fn assert_round_trip(cfg: ModelConfig) {
    let (dir, values) = write_random(&cfg, DType::F32);
    let ck = open(dir.path()).expect("open");
    assert_eq!(ck.format, SourceFormat::Diffusers);
    assert_eq!(ck.tensors.len(), values.len());
    for t in &ck.tensors {
        let want = values
            .get(&t.name)
            .unwrap_or_else(|| panic!("unexpected tensor `{}`", t.name));
        let got = t.read_f32().expect("read");
        assert_eq!(got.len(), want.len(), "`{}`", t.name);
        assert!(
            got.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "`{}` values differ",
            t.name
        );
    }
    let tok = ck.tokenizer.expect("tokenizer files");
    assert_eq!(tok.vocab_json, test_tokenizer().vocab_json);
    assert_eq!(tok.merges_txt, test_tokenizer().merges_txt);
    assert_eq!(
        ck.metadata.get("prediction_type").map(String::as_str),
        Some(cfg.prediction.as_str())
    );

    let mut got = read_config(dir.path()).expect("read_config");
    assert_eq!(got.family, cfg.family.trim_start_matches("tiny-"));
    got.family = cfg.family.clone();
    assert_eq!(got, cfg);
}

#[test]
fn tiny_sd1_folder_round_trips_bit_exact_with_its_config() {
    assert_round_trip(ModelConfig::sd1().shrink());
}

#[test]
fn tiny_sd2_folder_round_trips_bit_exact_with_its_config() {
    assert_round_trip(ModelConfig::sd2().shrink());
}

#[test]
fn tiny_sdxl_folder_round_trips_bit_exact_with_its_config() {
    assert_round_trip(ModelConfig::sdxl().shrink());
}

#[test]
fn distilled_unet_without_mid_block_and_with_lcm_guidance_embedding_round_trips() {
    // BK-SDM-like: one ResNet per down level, no middle block; LCM's cond_proj.
    let mut cfg = ModelConfig::sd1().shrink();
    cfg.unet.down_blocks = vec![vec![1], vec![1], vec![1], vec![0]];
    cfg.unet.up_blocks = vec![vec![0, 0], vec![1, 1], vec![1, 1], vec![1, 1]];
    cfg.unet.mid_depth = None;
    cfg.unet.time_cond_proj_dim = Some(16);
    assert_round_trip(cfg);
}

#[test]
fn unet_with_per_layer_transformer_depths_round_trips() {
    // SSD-1B-like: depths differ between the layers of a level and between the paths.
    let mut cfg = ModelConfig::sdxl().shrink();
    cfg.unet.down_blocks = vec![vec![0, 0], vec![1, 2], vec![2, 2]];
    cfg.unet.up_blocks = vec![vec![2, 2, 1], vec![2, 1, 1], vec![0, 0, 0]];
    cfg.unet.mid_depth = Some(2);
    assert_round_trip(cfg);
}

#[test]
fn refiner_like_sdxl_with_only_the_second_encoder_round_trips() {
    let mut cfg = ModelConfig::sdxl().shrink();
    let mut big_g = cfg.text_encoders.remove(1);
    big_g.prefix = "conditioner.embedders.0.model.".into();
    cfg.text_encoders = vec![big_g];
    // Pooled width plus five time ids (the refiner's aesthetic score replaces the target size).
    cfg.unet.adm_in_channels = Some(32 + 5 * 8);
    cfg.unet.time_ids = crate::config::TimeId::REFINER.to_vec();
    let (dir, _) = write_random(&cfg, DType::F32);
    assert!(dir
        .path()
        .join("text_encoder_2/model.safetensors")
        .is_file());
    assert!(!dir.path().join("text_encoder").exists());
    drop(dir);
    assert_round_trip(cfg);
}

#[test]
fn f16_folder_holds_the_f16_rounding_of_each_value() {
    let cfg = ModelConfig::sd2().shrink();
    let (dir, values) = write_random(&cfg, DType::F16);
    let ck = open(dir.path()).expect("open");
    for t in &ck.tensors {
        assert_eq!(t.dtype, DType::F16);
        let want: Vec<u32> = values[&t.name]
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32().to_bits())
            .collect();
        let got: Vec<u32> = t
            .read_f32()
            .expect("read")
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert!(got == want, "`{}`", t.name);
    }
}

#[test]
fn preset_unet_configs_survive_diffusers_json() {
    for cfg in [ModelConfig::sd1(), ModelConfig::sd2(), ModelConfig::sdxl()] {
        let (json, _) = write::unet_json(&cfg).expect("unet json");
        let back = config::unet(&json, Path::new("unet/config.json")).expect("parse");
        // Which values fill `label_emb` is counted once the pooled width is known (read_config).
        let want = UnetConfig {
            time_ids: Vec::new(),
            ..cfg.unet.clone()
        };
        assert_eq!(back, want, "{}", cfg.family);
    }
}

fn put(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

const SD_VAE: &str = r#"{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;
const CLIP_L: &str = r#"{"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
  "hidden_size": 768, "intermediate_size": 3072, "max_position_embeddings": 77, "model_type": "clip_text_model",
  "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408}"#;

#[test]
fn published_sd15_configs_read_as_the_sd1_preset() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    put(
        d,
        "model_index.json",
        r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "safety_checker": [null, null]}"#,
    );
    put(
        d,
        "unet/config.json",
        r#"{"_class_name": "UNet2DConditionModel", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": false, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#,
    );
    put(d, "vae/config.json", SD_VAE);
    put(d, "text_encoder/config.json", CLIP_L);
    put(
        d,
        "scheduler/scheduler_config.json",
        r#"{"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
    );
    assert_eq!(read_config(d).expect("read_config"), ModelConfig::sd1());
}

#[test]
fn published_sd21_configs_read_as_the_sd2_preset() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    put(
        d,
        "unet/config.json",
        r#"{"_class_name": "UNet2DConditionModel", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024, "dual_cross_attention": false, "num_class_embeds": null, "only_cross_attention": false,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "in_channels": 4, "layers_per_block": 2, "out_channels": 4, "sample_size": 96, "upcast_attention": true, "use_linear_projection": true,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#,
    );
    put(d, "vae/config.json", SD_VAE);
    put(
        d,
        "text_encoder/config.json",
        r#"{"architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
        "max_position_embeddings": 77, "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512, "vocab_size": 49408}"#,
    );
    put(
        d,
        "tokenizer/special_tokens_map.json",
        r#"{"pad_token": "!", "eos_token": {"content": "<|endoftext|>"}}"#,
    );
    put(
        d,
        "scheduler/scheduler_config.json",
        r#"{"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
    );
    assert_eq!(read_config(d).expect("read_config"), ModelConfig::sd2());
}

#[test]
fn published_sdxl_configs_read_as_the_sdxl_preset() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    put(
        d,
        "unet/config.json",
        r#"{"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "class_embed_type": null, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "encoder_hid_dim": null,
        "encoder_hid_dim_type": null, "in_channels": 4, "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "num_attention_heads": null, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "time_cond_proj_dim": null, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": true}"#,
    );
    put(
        d,
        "vae/config.json",
        &SD_VAE.replace(
            "\"sample_size\": 512",
            "\"sample_size\": 1024, \"scaling_factor\": 0.13025",
        ),
    );
    put(d, "text_encoder/config.json", CLIP_L);
    put(
        d,
        "text_encoder_2/config.json",
        r#"{"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
        "max_position_embeddings": 77, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280, "vocab_size": 49408}"#,
    );
    put(
        d,
        "scheduler/scheduler_config.json",
        r#"{"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
    );
    assert_eq!(read_config(d).expect("read_config"), ModelConfig::sdxl());
}

/// Copies a safetensors file, renaming tensors and optionally appending one.
fn rewrite(
    src: &Path,
    dst: &Path,
    keep: impl Fn(&str) -> bool,
    rename: impl Fn(&str) -> String,
    extra: Option<&str>,
) {
    let (tensors, _) = st::read_tensors(src).expect("read");
    let tensors: Vec<_> = tensors.into_iter().filter(|t| keep(&t.name)).collect();
    let mut specs: Vec<WriteSpec> = tensors
        .iter()
        .map(|t| WriteSpec {
            name: rename(&t.name),
            shape: t.shape.clone(),
            dtype: t.dtype,
        })
        .collect();
    if let Some(name) = extra {
        specs.push(WriteSpec {
            name: name.into(),
            shape: vec![2],
            dtype: DType::F32,
        });
    }
    let mut out = Vec::new();
    st::write(&mut out, &specs, &BTreeMap::new(), |i, buf| {
        match tensors.get(i) {
            Some(t) => buf.extend(t.read_raw()?),
            None => buf.extend([0u8; 8]),
        }
        Ok(())
    })
    .expect("write");
    std::fs::write(dst, out).expect("write file");
}

#[test]
fn sharded_fp16_variant_and_legacy_vae_attention_names_are_read() {
    let cfg = ModelConfig::sd1().shrink();
    let (dir, values) = write_random(&cfg, DType::F32);
    let d = dir.path();
    // UNet as the fp16 variant file name.
    std::fs::rename(
        d.join("unet/diffusion_pytorch_model.safetensors"),
        d.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .expect("rename");
    // VAE in two shards with an index, and the pre-0.14 attention names.
    let vae = d.join("vae/diffusion_pytorch_model.safetensors");
    let legacy = |n: &str| {
        n.replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.")
    };
    rewrite(
        &vae,
        &d.join("vae/a.safetensors"),
        |n| n.starts_with("encoder."),
        legacy,
        None,
    );
    rewrite(
        &vae,
        &d.join("vae/b.safetensors"),
        |n| !n.starts_with("encoder."),
        legacy,
        None,
    );
    let (tensors, _) = st::read_tensors(&vae).expect("read");
    let map: BTreeMap<String, &str> = tensors
        .iter()
        .map(|t| {
            (
                legacy(&t.name),
                if t.name.starts_with("encoder.") {
                    "a.safetensors"
                } else {
                    "b.safetensors"
                },
            )
        })
        .collect();
    put(
        d,
        "vae/diffusion_pytorch_model.safetensors.index.json",
        &serde_json::json!({ "metadata": {}, "weight_map": map }).to_string(),
    );
    std::fs::remove_file(&vae).expect("remove");

    let ck = open(d).expect("open");
    assert_eq!(ck.tensors.len(), values.len());
    for t in &ck.tensors {
        assert_eq!(t.read_f32().expect("read"), values[&t.name], "`{}`", t.name);
    }
}

#[test]
fn text_encoders_saved_by_transformers_5_without_text_model_prefix_are_read() {
    let cfg = ModelConfig::sd1().shrink();
    let (dir, values) = write_random(&cfg, DType::F32);
    let te = dir.path().join("text_encoder/model.safetensors");
    let tmp = dir.path().join("text_encoder/new.safetensors");
    rewrite(
        &te,
        &tmp,
        |_| true,
        |n| n.strip_prefix("text_model.").unwrap_or(n).to_string(),
        None,
    );
    std::fs::rename(&tmp, &te).expect("rename");
    let ck = open(dir.path()).expect("open");
    assert_eq!(ck.tensors.len(), values.len());
    for t in &ck.tensors {
        assert_eq!(t.read_f32().expect("read"), values[&t.name], "`{}`", t.name);
    }
}

fn message(r: Result<impl std::fmt::Debug>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_component_config_is_an_error_naming_it() {
    let (dir, _) = write_random(&ModelConfig::sd1().shrink(), DType::F32);
    std::fs::remove_file(dir.path().join("vae/config.json")).expect("remove");
    let m = message(open(dir.path()));
    assert!(
        m.contains("vae/config.json") && m.contains("missing"),
        "{m}"
    );
}

#[test]
fn malformed_config_json_is_an_error_naming_the_file() {
    let (dir, _) = write_random(&ModelConfig::sd1().shrink(), DType::F32);
    put(dir.path(), "unet/config.json", "{\"in_channels\": 4,");
    let m = message(read_config(dir.path()));
    assert!(
        m.contains("unet/config.json") && m.contains("malformed JSON"),
        "{m}"
    );
}

#[test]
fn unknown_tensor_name_is_an_error_naming_file_and_tensor() {
    let (dir, _) = write_random(&ModelConfig::sd1().shrink(), DType::F32);
    let vae = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let tmp = dir.path().join("vae/new.safetensors");
    rewrite(
        &vae,
        &tmp,
        |_| true,
        str::to_string,
        Some("encoder.mystery.weight"),
    );
    std::fs::rename(&tmp, &vae).expect("rename");
    let m = message(open(dir.path()));
    assert!(
        m.contains("vae/diffusion_pytorch_model.safetensors")
            && m.contains("encoder.mystery.weight"),
        "{m}"
    );
}

#[test]
fn missing_weights_file_is_an_error_naming_the_folder_and_expected_files() {
    let (dir, _) = write_random(&ModelConfig::sd1().shrink(), DType::F32);
    std::fs::remove_file(dir.path().join("text_encoder/model.safetensors")).expect("remove");
    let m = message(open(dir.path()));
    assert!(
        m.contains("text_encoder") && m.contains("model.safetensors") && m.contains("no weights"),
        "{m}"
    );
}

#[test]
fn config_that_disagrees_with_the_weights_is_an_error_naming_the_tensor() {
    let (dir, _) = write_random(&ModelConfig::sd1().shrink(), DType::F32);
    let path = dir.path().join("text_encoder/config.json");
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 128");
    std::fs::write(&path, text).expect("write");
    let m = message(open(dir.path()));
    assert!(
        m.contains("text_encoder/model.safetensors")
            && m.contains("mlp.fc1.weight")
            && m.contains("[128, 32]"),
        "{m}"
    );
}

#[test]
fn configs_counting_beyond_any_model_are_refused_before_anything_is_planned() {
    // The first is the fuzzer's find (stop 27): a depth past u64 that parsed as a float
    // and saturated, and then had the UNet's names planned until memory ran out.
    let cases = [
        (
            "unet/config.json",
            "transformer_layers_per_block",
            "88888888888888888888888888888888888888888888888888888888882",
            "transformer depth",
        ),
        (
            "unet/config.json",
            "layers_per_block",
            "1000000000",
            "`layers_per_block` is 1000000000, beyond the 16",
        ),
        (
            "unet/config.json",
            "cross_attention_dim",
            "18446744073709551615",
            "context width",
        ),
        (
            "vae/config.json",
            "layers_per_block",
            "4294967295",
            "ResNet count",
        ),
        (
            "text_encoder/config.json",
            "num_hidden_layers",
            "4294967295",
            "layer count is 4294967295",
        ),
    ];
    let (dir, _) = write_random(&ModelConfig::sd1().shrink(), DType::F32);
    for (file, key, value, says) in cases {
        let path = dir.path().join(file);
        let good = std::fs::read_to_string(&path).expect("read");
        let mut v: serde_json::Value = serde_json::from_str(&good).expect("json");
        v[key] = serde_json::from_str(value).expect("value");
        std::fs::write(&path, v.to_string()).expect("write");
        let m = message(read_config(dir.path()));
        assert!(m.contains(file) && m.contains(says), "{key} = {value}: {m}");
        std::fs::write(&path, good).expect("restore");
    }
    assert!(read_config(dir.path()).is_ok());
}

#[test]
fn unexpressible_unet_is_refused_before_anything_is_written() {
    let mut cfg = ModelConfig::sd1().shrink();
    cfg.unet.down_blocks[0] = vec![1, 0];
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let m = message(write(&out, &cfg, DType::F16, None, &mut |_| Ok(Vec::new())));
    assert!(m.contains("down level 0"), "{m}");
    assert!(!out.exists());
}

#[test]
fn prediction_type_zero_snr_and_pipeline_reach_the_metadata_and_config() {
    let mut cfg = ModelConfig::sd2().shrink();
    cfg.prediction = Prediction::V;
    cfg.zero_terminal_snr = true;
    let (dir, _) = write_random(&cfg, DType::F32);
    assert!(
        read_config(dir.path())
            .expect("read_config")
            .zero_terminal_snr
    );
    let ck = open(dir.path()).expect("open");
    assert_eq!(
        ck.metadata.get("prediction_type").map(String::as_str),
        Some("v_prediction")
    );
    assert_eq!(
        ck.metadata.get("diffusers.pipeline").map(String::as_str),
        Some("StableDiffusionPipeline")
    );
    assert_eq!(ck.metadata.get("family").map(String::as_str), Some("sd2"));
}

/// Pairs that the layout comparison cannot tell apart (tensors of equal shape), as
/// diffusers' own single-file conversion maps them.
#[test]
fn known_diffusers_names_map_to_their_single_file_names() {
    let plan_of = |cfg: &ModelConfig| {
        let mut p = names::unet(&cfg.unet).expect("unet plan");
        p.extend(names::vae(cfg.vae.as_ref().unwrap()));
        for t in &cfg.text_encoders {
            p.extend(names::text(t));
        }
        p
    };
    let u = "model.diffusion_model.";
    let v = "first_stage_model.";
    let check = |plan: &[crate::network::Param], pairs: &[(&str, String)]| {
        for (d, c) in pairs {
            let hits: Vec<&crate::network::Param> = plan
                .iter()
                .filter(|e| e.diffusers.iter().any(|x| x == d))
                .collect();
            assert_eq!(hits.len(), 1, "`{d}`");
            assert_eq!(&hits[0].canonical, c, "`{d}`");
        }
    };
    let sd1 = plan_of(&ModelConfig::sd1());
    check(
        &sd1,
        &[
            ("conv_in.weight", format!("{u}input_blocks.0.0.weight")),
            (
                "time_embedding.linear_2.bias",
                format!("{u}time_embed.2.bias"),
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                format!("{u}input_blocks.3.0.op.weight"),
            ),
            (
                "down_blocks.1.attentions.1.proj_in.weight",
                format!("{u}input_blocks.5.1.proj_in.weight"),
            ),
            (
                "down_blocks.3.resnets.1.norm2.weight",
                format!("{u}input_blocks.11.0.out_layers.0.weight"),
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                format!("{u}middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                format!("{u}middle_block.2.emb_layers.1.weight"),
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                format!("{u}output_blocks.2.1.conv.weight"),
            ),
            (
                "up_blocks.1.upsamplers.0.conv.bias",
                format!("{u}output_blocks.5.2.conv.bias"),
            ),
            (
                "up_blocks.3.resnets.2.conv_shortcut.weight",
                format!("{u}output_blocks.11.0.skip_connection.weight"),
            ),
            (
                "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight",
                format!("{u}output_blocks.11.1.transformer_blocks.0.ff.net.2.weight"),
            ),
            ("conv_norm_out.weight", format!("{u}out.0.weight")),
            ("conv_out.bias", format!("{u}out.2.bias")),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                format!("{v}encoder.down.1.block.0.nin_shortcut.weight"),
            ),
            (
                "encoder.mid_block.attentions.0.to_k.weight",
                format!("{v}encoder.mid.attn_1.k.weight"),
            ),
            (
                "encoder.mid_block.attentions.0.to_v.bias",
                format!("{v}encoder.mid.attn_1.v.bias"),
            ),
            (
                "decoder.mid_block.attentions.0.to_out.0.bias",
                format!("{v}decoder.mid.attn_1.proj_out.bias"),
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.weight",
                format!("{v}decoder.mid.attn_1.norm.weight"),
            ),
            (
                "decoder.mid_block.resnets.1.norm1.weight",
                format!("{v}decoder.mid.block_2.norm1.weight"),
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                format!("{v}decoder.up.3.block.2.conv1.weight"),
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                format!("{v}decoder.up.1.upsample.conv.weight"),
            ),
            (
                "encoder.conv_norm_out.bias",
                format!("{v}encoder.norm_out.bias"),
            ),
            (
                "text_model.encoder.layers.11.self_attn.v_proj.bias",
                "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.v_proj.bias"
                    .into(),
            ),
        ],
    );
    let sdxl = ModelConfig::sdxl();
    check(
        &names::unet(&sdxl.unet).expect("unet plan"),
        &[
            (
                "add_embedding.linear_1.weight",
                format!("{u}label_emb.0.0.weight"),
            ),
            (
                "up_blocks.0.attentions.2.transformer_blocks.9.norm3.bias",
                format!("{u}output_blocks.2.1.transformer_blocks.9.norm3.bias"),
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                format!("{u}output_blocks.2.2.conv.weight"),
            ),
        ],
    );
    let xl = names::text(&sdxl.text_encoders[1]);
    let g = "conditioner.embedders.1.model.";
    check(
        &xl,
        &[
            (
                "text_model.encoder.layers.31.mlp.fc2.weight",
                format!("{g}transformer.resblocks.31.mlp.c_proj.weight"),
            ),
            (
                "text_model.encoder.layers.0.layer_norm2.weight",
                format!("{g}transformer.resblocks.0.ln_2.weight"),
            ),
            (
                "text_model.encoder.layers.7.self_attn.out_proj.bias",
                format!("{g}transformer.resblocks.7.attn.out_proj.bias"),
            ),
            (
                "text_model.embeddings.position_embedding.weight",
                format!("{g}positional_embedding"),
            ),
            (
                "text_model.final_layer_norm.bias",
                format!("{g}ln_final.bias"),
            ),
        ],
    );
    let in_proj = xl
        .iter()
        .find(|e| e.canonical == format!("{g}transformer.resblocks.5.attn.in_proj_weight"))
        .expect("in_proj");
    assert_eq!(in_proj.op, crate::network::Op::Concat);
    assert_eq!(
        in_proj.diffusers,
        ["q_proj", "k_proj", "v_proj"]
            .map(|x| format!("text_model.encoder.layers.5.self_attn.{x}.weight"))
    );
    let proj = xl
        .iter()
        .find(|e| e.canonical == format!("{g}text_projection"))
        .expect("text_projection");
    assert_eq!(
        (proj.op, proj.diffusers.as_slice()),
        (
            crate::network::Op::Transpose,
            ["text_projection.weight".to_string()].as_slice()
        )
    );
}

#[test]
fn written_tensors_are_split_transposed_and_reshaped_as_diffusers_stores_them() {
    let cfg = ModelConfig::sdxl().shrink();
    let (dir, values) = write_random(&cfg, DType::F32);
    let read = |comp: &str| -> HashMap<String, (Vec<usize>, Vec<f32>)> {
        let (tensors, _) = st::read_tensors(&dir.path().join(comp)).expect("read");
        tensors
            .into_iter()
            .map(|t| {
                (
                    t.name.clone(),
                    (t.shape.clone(), t.read_f32().expect("values")),
                )
            })
            .collect()
    };
    let te2 = read("text_encoder_2/model.safetensors");
    let g = "conditioner.embedders.1.model.";
    let in_proj = &values[&format!("{g}transformer.resblocks.1.attn.in_proj_weight")];
    for (i, x) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        let (shape, v) = &te2[&format!("text_model.encoder.layers.1.self_attn.{x}.weight")];
        assert_eq!(shape, &vec![32, 32]);
        assert_eq!(v.as_slice(), &in_proj[i * 1024..(i + 1) * 1024], "{x}");
    }
    let p = &values[&format!("{g}text_projection")];
    let (shape, v) = &te2["text_projection.weight"];
    assert_eq!(shape, &vec![32, 32]);
    for r in 0..32 {
        for c in 0..32 {
            assert_eq!(v[r * 32 + c].to_bits(), p[c * 32 + r].to_bits());
        }
    }
    let vae = read("vae/diffusion_pytorch_model.safetensors");
    let (shape, v) = &vae["decoder.mid_block.attentions.0.to_q.weight"];
    assert_eq!(shape, &vec![128, 128]);
    assert_eq!(v, &values["first_stage_model.decoder.mid.attn_1.q.weight"]);
}

/// `google/ddpm-cifar10-32`'s and `google/ddpm-celebahq-256`'s `unet/config.json`, as
/// published (keys the reader does not need left out).
const DDPM_CIFAR10: &str = r#"{"_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": null,
  "block_out_channels": [128, 256, 256, 256], "center_input_sample": false,
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
  "downsample_padding": 0, "flip_sin_to_cos": false, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
  "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}"#;
const DDPM_CELEBAHQ: &str = r#"{"_class_name": "UNet2DModel", "act_fn": "silu", "block_out_channels": [128, 128, 256, 256, 512, 512],
  "center_input_sample": false,
  "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 0, "flip_sin_to_cos": false, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
  "time_embedding_type": "positional",
  "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]}"#;
const DDPM_SCHEDULER: &str = r#"{"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
  "beta_start": 0.0001, "clip_sample": true, "num_train_timesteps": 1000, "trained_betas": null, "variance_type": "fixed_small"}"#;

fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("json")
}

#[test]
fn the_ddpm_papers_published_unet2d_configs_read_as_the_presets() {
    let path = Path::new("unet/config.json");
    for (text, preset) in [
        (DDPM_CIFAR10, "ddpm-cifar10"),
        (DDPM_CELEBAHQ, "ddpm-celebahq"),
    ] {
        let got = config::unet2d(&json(text), path).expect("parse");
        assert_eq!(
            got,
            ModelConfig::preset(preset).expect("preset").unet,
            "{preset}"
        );
    }
    let sched = config::scheduler(&json(DDPM_SCHEDULER), Path::new("s.json")).expect("scheduler");
    assert_eq!(sched, ModelConfig::ddpm(&[1, 2], 1).schedule);
}

#[test]
fn unet2d_options_sdrs_cannot_run_are_refused_naming_the_key() {
    for (key, value) in [
        ("time_embedding_type", r#""learned""#),
        ("resnet_time_scale_shift", r#""scale_shift""#),
        ("class_embed_type", r#""timestep""#),
        ("center_input_sample", "true"),
        // NCSN++'s skip blocks pass the image paths on: no mixing with DDPM's.
        (
            "down_block_types",
            r#"["SkipDownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]"#,
        ),
    ] {
        let mut v = json(DDPM_CIFAR10);
        v[key] = json(value);
        let e = config::unet2d(&v, Path::new("unet/config.json"))
            .expect_err(key)
            .to_string();
        assert!(
            e.contains(key) || e.contains("SkipDownBlock2D"),
            "{key}: {e}"
        );
        assert!(e.contains("unet/config.json"), "{e}");
    }
}

#[test]
fn an_unset_scheduler_option_takes_the_named_schedulers_default() {
    let read = |text: &str| config::scheduler(&json(text), Path::new("s.json"));
    // DDPMScheduler and DDIMScheduler clip by default; others do not.
    let ddim = read(r#"{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195}"#).unwrap();
    assert_eq!(ddim.clip_sample, Some(1.0));
    assert_eq!(ddim.set_alpha_to_one, None);
    let pndm = read(r#"{"_class_name": "PNDMScheduler", "set_alpha_to_one": false}"#).unwrap();
    assert_eq!(
        (pndm.clip_sample, pndm.set_alpha_to_one),
        (None, Some(false))
    );
    let cos = read(r#"{"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_large_log", "clip_sample_range": 2.0}"#).unwrap();
    assert_eq!(
        (cos.betas, cos.variance, cos.clip_sample),
        (Betas::SquaredCos, Variance::FixedLarge, Some(2.0))
    );
    for (text, key) in [
        (r#"{"variance_type": "learned_range"}"#, "variance_type"),
        (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
        (r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule"),
    ] {
        let e = read(text).expect_err(key).to_string();
        assert!(e.contains(key) && e.contains("s.json"), "{e}");
    }
}

/// `cfg` with random weights, written as a diffusers folder in a temporary directory.
fn synth_folder(cfg: &ModelConfig) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("model");
    crate::synth::synth(
        cfg,
        crate::synth::Format::Diffusers,
        &out,
        0,
        DType::F32,
        false,
        &mut |_, _| {},
    )
    .expect("synth");
    (dir, out)
}

#[test]
fn a_ddpm_model_written_as_a_diffusers_folder_reads_back_as_itself() {
    let mut cfg = ModelConfig::ddpm(&[1, 2], 1);
    cfg.unet.model_channels = 32;
    cfg.unet.style.norm_groups = Some(8);
    cfg.unet.style.num_classes = Some(4);
    cfg.unet.head_dim = Some(16);
    cfg.unet.num_heads = None;
    let (_dir, out) = synth_folder(&cfg);
    assert_eq!(read_config(&out).expect("read"), cfg);
    let ck = open(&out).expect("open");
    assert!(ck
        .tensors
        .iter()
        .any(|t| t.name == "model.diffusion_model.label_emb.weight"));
}

/// NCSN++ as diffusers' conversion of score_sde's CelebA-HQ 256 model configures it
/// (`attention_head_dim` null: one head; `norm_num_groups` null: min(C/4, 32)).
const NCSNPP_CELEBAHQ: &str = r#"{"_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": null,
  "block_out_channels": [128, 128, 256, 256, 256, 256, 256], "center_input_sample": false,
  "down_block_types": ["SkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D",
    "AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 3, "layers_per_block": 2,
  "mid_block_scale_factor": 1.41421356237, "norm_eps": 1e-06, "norm_num_groups": null, "out_channels": 3,
  "sample_size": 256, "time_embedding_type": "fourier",
  "up_block_types": ["SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D", "SkipUpBlock2D",
    "SkipUpBlock2D", "SkipUpBlock2D"]}"#;

#[test]
fn an_ncsnpp_config_reads_as_the_preset_and_its_scheduler_as_the_ve_sde() {
    let got = config::unet2d(&json(NCSNPP_CELEBAHQ), Path::new("unet/config.json")).expect("parse");
    let want = ModelConfig::preset("ncsnpp-celebahq").expect("preset");
    assert_eq!(got, want.unet);
    // Attention after the last ResNet of the 16x16 up level only.
    assert_eq!(got.up_blocks[2], vec![0, 0, 1]);
    let sched = config::scheduler(
        &json(r#"{"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 2000, "sigma_max": 348.0, "sigma_min": 0.01, "snr": 0.15, "sampling_eps": 1e-5, "correct_steps": 1}"#),
        Path::new("s.json"),
    )
    .expect("scheduler");
    assert_eq!(sched, want.schedule);
}

#[test]
fn an_ncsnpp_model_written_as_a_diffusers_folder_reads_back_as_itself() {
    let mut cfg = ModelConfig::ncsnpp(&[1, 2, 2], 2, 50.0);
    cfg.unet.model_channels = 16;
    cfg.unet.head_dim = Some(8);
    cfg.unet.num_heads = None;
    let (_dir, out) = synth_folder(&cfg);
    let index = std::fs::read_to_string(out.join("model_index.json")).expect("index");
    assert!(index.contains("ScoreSdeVePipeline"), "{index}");
    assert_eq!(read_config(&out).expect("read"), cfg);
    let ck = open(&out).expect("open");
    for name in [
        "model.diffusion_model.time_proj.weight",
        "model.diffusion_model.input_blocks.3.skip_conv.weight",
        "model.diffusion_model.output_blocks.2.skip_norm.weight",
    ] {
        assert!(ck.tensors.iter().any(|t| t.name == name), "{name}");
    }
}
