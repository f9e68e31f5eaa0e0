//! Writes the fuzz targets' seed corpora (`fuzz/seeds/<target>/`) from real files and
//! real layouts: pieces of the real pretrained files in `../shared/models`, stable-
//! diffusion.cpp's GGUFs and our tiny real-layout checkpoint in `../shared/fixtures`,
//! the photos in `../shared/data`, and files our own writers make for the published
//! SD configs. Seeds are kept small (libFuzzer mutates whole inputs, so a seed of
//! megabytes runs a hundred times slower than one of kilobytes): where a real file is
//! large, a seed keeps its real bytes up to the point the parser needs (a GGUF's
//! header) or a subset of its real tensors, names and shapes unchanged.
//!
//! `cargo run --release --example fuzz_seeds -- [SHARED_DIR] [OUT_DIR]`
use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sdrs::config::ModelConfig;
use sdrs::formats::gguf::metadata;
use sdrs::formats::gguf::{GgufFile, TensorEntry, Value, Writer};
use sdrs::formats::{ckpt, pickle, safetensors, Checkpoint, DType, SourceTensor};
use sdrs::ggml::Type;
use sdrs::vocab::ClipVocab;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shared = PathBuf::from(args.first().map(String::as_str).unwrap_or("../shared"));
    let out = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("fuzz/seeds"));
    let s = Seeds { out };
    let models = shared.join("models");
    let fixtures = shared.join("fixtures/sdcpp-gguf");
    let images = shared.join("data/images");

    // GGUF: stable-diffusion.cpp's real header (metadata and tensor directory, up to
    // the data), and a complete small file of ours with every metadata group we read.
    for q in ["q8_0", "q4_0"] {
        let path = fixtures.join(format!("tiny-sd15-sdcpp-{q}.gguf"));
        let g = GgufFile::open(&path).with_context(|| path.display().to_string())?;
        let bytes = std::fs::read(&path)?;
        s.put(
            "gguf",
            &format!("sdcpp-{q}-header.gguf"),
            &bytes[..g.data_offset as usize],
        )?;
    }
    // The runnable ones' headers (F16 and block-quantized vectors, 4-D kernels, SDXL's
    // names), and a complete small file with no metadata in the peer's habits.
    for name in [
        "tiny-sd15-sdcpp-f16",
        "tiny-sd15-sdcpp-q4_K",
        "tiny-sdxl-sdcpp-q4_0",
    ] {
        let path = fixtures.join(format!("runnable/{name}.gguf"));
        let g = GgufFile::open(&path).with_context(|| path.display().to_string())?;
        let bytes = std::fs::read(&path)?;
        s.put(
            "gguf",
            &format!("{name}-header.gguf"),
            &bytes[..g.data_offset as usize],
        )?;
    }
    s.put("gguf", "sdcpp-style-vectors.gguf", &sdcpp_style_gguf()?)?;
    s.put(
        "gguf",
        "ours-tiny-sd1.gguf",
        &our_gguf(&ModelConfig::sd1().shrink())?,
    )?;
    s.put(
        "gguf",
        "ours-tiny-sdxl.gguf",
        &our_gguf(&ModelConfig::sdxl().shrink())?,
    )?;

    // safetensors: the smallest real tensors of the tiny real-layout checkpoint (real
    // names and shapes), in f32, f16 and bf16 with metadata; the real LoRA's first pairs.
    let tiny = Checkpoint::open(&fixtures.join("tiny-sd15.safetensors"))?;
    let mut small: Vec<&SourceTensor> = tiny.tensors.iter().filter(|t| t.numel() <= 64).collect();
    small.truncate(24);
    for (dt, name) in [
        (DType::F32, "tiny-sd15-subset-f32"),
        (DType::F16, "tiny-sd15-subset-f16"),
        (DType::BF16, "tiny-sd15-subset-bf16"),
    ] {
        s.put(
            "safetensors",
            &format!("{name}.safetensors"),
            &to_safetensors(&small, dt, &[("format", "pt")])?,
        )?;
    }
    let lora =
        Checkpoint::open(&models.join("lora-sd15-catundchat/pytorch_lora_weights.safetensors"))?;
    let mut pairs: Vec<&SourceTensor> = lora
        .tensors
        .iter()
        .filter(|t| {
            t.name.contains("attn1.processor.to_q_lora")
                || t.name.contains("attn2.processor.to_k_lora")
        })
        .collect();
    pairs.sort_by(|a, b| a.name.cmp(&b.name));
    pairs.truncate(8);
    let lora_seed = to_safetensors(&pairs, DType::F16, &[])?;
    s.put(
        "safetensors",
        "catundchat-lora-subset.safetensors",
        &lora_seed,
    )?;
    s.put("lora", "catundchat-lora-subset.safetensors", &lora_seed)?;
    // The same pairs in kohya's naming, with alphas, as A1111 LoRAs ship.
    let kohya: Vec<(String, &SourceTensor)> =
        pairs.iter().map(|t| (kohya_name(&t.name), *t)).collect();
    s.put(
        "lora",
        "kohya-style.safetensors",
        &kohya_safetensors(&kohya)?,
    )?;

    // Pickles and torch zips: the real files' data.pkl, the real embedding whole, and
    // a torch zip of the smallest real TAEF2 tensors written by our writer.
    for f in [
        "taef2/taef2_decoder.pth",
        "taef2/taef2_encoder.pth",
        "ti-sd15-birb-style/learned_embeds.bin",
    ] {
        let path = models.join(f);
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        s.put("pickle", &format!("{stem}.pkl"), &data_pkl(&path)?)?;
    }
    let birb = std::fs::read(models.join("ti-sd15-birb-style/learned_embeds.bin"))?;
    s.put("ckpt", "birb-learned_embeds.bin", &birb)?;
    s.put("embedding", "birb-learned_embeds.bin", &birb)?;
    let taef2 = Checkpoint::open(&models.join("taef2/taef2_decoder.pth"))?;
    let mut small: Vec<&SourceTensor> = taef2.tensors.iter().filter(|t| t.numel() <= 64).collect();
    small.truncate(16);
    let specs: Vec<safetensors::WriteSpec> = small
        .iter()
        .map(|t| safetensors::WriteSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: DType::F32,
        })
        .collect();
    for wrap in [false, true] {
        let mut buf = Cursor::new(Vec::new());
        ckpt::write(&mut buf, &specs, wrap, |i, out| {
            out.extend(small[i].read_f32()?.iter().flat_map(|v| v.to_le_bytes()));
            Ok(())
        })?;
        let name = if wrap {
            "taef2-subset-state_dict.ckpt"
        } else {
            "taef2-subset.ckpt"
        };
        s.put("ckpt", name, buf.get_ref())?;
    }
    let refs: Vec<(&str, DType, &[usize])> = small
        .iter()
        .map(|t| (t.name.as_str(), DType::F16, t.shape.as_slice()))
        .collect();
    s.put(
        "pickle",
        "ours-state_dict.pkl",
        &pickle::state_dict_pickle(&refs, true)?,
    )?;

    // Embeddings in the other shapes people ship: A1111 safetensors, SDXL's pair.
    let emb = |n: usize, w: usize| vec![0.01f32; n * w];
    s.put(
        "embedding",
        "a1111-emb_params.safetensors",
        &named_f32(&[("emb_params", vec![2, 768], emb(2, 768))])?,
    )?;
    s.put(
        "embedding",
        "sdxl-clip_l-clip_g.safetensors",
        &named_f32(&[
            ("clip_l", vec![1, 768], emb(1, 768)),
            ("clip_g", vec![1, 1280], emb(1, 1280)),
        ])?,
    )?;

    // diffusers configs: the published SD 1.5, 2.1 and SDXL configs as our writer
    // emits them, joined by 0xFF in the order the harness splits them.
    for (name, cfg) in [
        ("sd15", ModelConfig::sd1()),
        ("sd21", ModelConfig::sd2()),
        ("sdxl", ModelConfig::sdxl()),
    ] {
        s.put(
            "diffusers_config",
            &format!("{name}.bin"),
            &diffusers_configs(&cfg.shrink())?,
        )?;
    }

    // Images: real photos, small, in the pixel formats the reader converts; with and
    // without a mask (the first byte picks the options, see `sdrs::fuzz::image`).
    let photo = image::open(images.join("chelsea.png"))?.thumbnail(40, 24);
    let mut encoded: Vec<(&str, Vec<u8>)> = Vec::new();
    for (name, img, fmt) in [
        ("rgb8.png", photo.clone(), image::ImageFormat::Png),
        (
            "rgba16.png",
            image::DynamicImage::ImageRgba16(photo.to_rgba16()),
            image::ImageFormat::Png,
        ),
        (
            "luma8.png",
            image::DynamicImage::ImageLuma8(photo.to_luma8()),
            image::ImageFormat::Png,
        ),
        (
            "lumaa8.png",
            image::DynamicImage::ImageLumaA8(photo.to_luma_alpha8()),
            image::ImageFormat::Png,
        ),
        ("rgb8.jpg", photo.clone(), image::ImageFormat::Jpeg),
    ] {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, fmt)?;
        encoded.push((name, buf.into_inner()));
    }
    for (i, (name, bytes)) in encoded.iter().enumerate() {
        let sel = (i as u8) << 1 & 0b110 | if i % 2 == 1 { 8 | 16 } else { 0 };
        s.put(
            "image",
            &format!("{name}.bin"),
            &[&[sel][..], bytes].concat(),
        )?;
        // Image and mask at equal lengths (decoders ignore bytes past the end).
        let mask = &encoded[(i + 2) % encoded.len()].1;
        let n = bytes.len().max(mask.len());
        let pad = |b: &[u8]| [b, &vec![0u8; n - b.len()]].concat();
        s.put(
            "image",
            &format!("{name}+mask.bin"),
            &[&[sel | 1][..], &pad(bytes), &pad(mask)].concat(),
        )?;
    }

    // Text: prompts in A1111's syntax, and text in many scripts for the tokenizer.
    let prompts = [
        "a (red:1.3) cat, [blue] dog BREAK ((masterpiece)), <lora:style:0.8> <birb-style>",
        "\\(escaped\\) (nested (weights:0.5):1.2) [[[low]]] <lyco:x> (unclosed",
        "photo of an astronaut riding a horse on mars, highly detailed, 8k",
    ];
    let texts = [
        "Ünïcödé naïve café — “quotes” 'll 've 're 's 't 'm 'd",
        "日本語のテキスト 中文 한국어 ελληνικά русский עברית العربية",
        "emoji 🐱‍👤👩🏽‍🚀 combining e\u{301} \u{345} zero\u{200b}width <|startoftext|> <|endoftext|>",
        "1234567890 !@#$%^&*() tab\tnewline\nDONE",
    ];
    for (i, p) in prompts.iter().enumerate() {
        s.put("prompt", &format!("prompt{i}.txt"), p.as_bytes())?;
    }
    for (i, t) in texts.iter().chain(&prompts).enumerate() {
        s.put("tokenizer", &format!("text{i}.txt"), t.as_bytes())?;
    }

    // Dictionaries: the words each format is made of, so mutations can insert a real
    // key or opcode sequence where byte flips would take millions of tries.
    let dicts = s.out.parent().unwrap_or(Path::new(".")).join("dict");
    let st = [
        "dtype",
        "shape",
        "data_offsets",
        "__metadata__",
        "F64",
        "F32",
        "F16",
        "BF16",
        "I64",
        "I32",
        "I16",
        "I8",
        "U8",
        "BOOL",
        "F8_E4M3",
    ];
    let mut gguf: Vec<String> = Vec::new();
    for cfg in [ModelConfig::sd1(), ModelConfig::sd2(), ModelConfig::sdxl()] {
        gguf.extend(metadata::config_kv(&cfg).into_iter().map(|(k, _)| k));
    }
    gguf.extend(
        metadata::defaults_kv(&sdrs::config::Defaults::preset("sd1").unwrap_or_default())
            .into_iter()
            .map(|(k, _)| k),
    );
    gguf.extend(
        [
            "tokenizer.ggml.model",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "general.alignment",
            "general.architecture",
            "GGUF",
            "model.diffusion_model.",
            "first_stage_model.",
            "cond_stage_model.transformer.text_model.",
        ]
        .map(String::from),
    );
    write_dict(&dicts, "gguf", &gguf)?;
    let mut names: Vec<String> = tiny
        .tensors
        .iter()
        .take(40)
        .map(|t| t.name.clone())
        .collect();
    names.extend(st.map(String::from));
    write_dict(&dicts, "safetensors", &names)?;
    let torch = [
        "torch._utils",
        "_rebuild_tensor_v2",
        "_rebuild_parameter",
        "collections",
        "OrderedDict",
        "torch",
        "FloatStorage",
        "HalfStorage",
        "BFloat16Storage",
        "LongStorage",
        "storage",
        "state_dict",
        "cpu",
        "archive/data.pkl",
        "archive/data/0",
        "archive/version",
        "archive/byteorder",
        "little",
    ];
    write_dict(&dicts, "pickle", &torch.map(String::from))?;
    write_dict(&dicts, "ckpt", &torch.map(String::from))?;
    let mut cfg_words = std::collections::BTreeSet::new();
    for cfg in [ModelConfig::sd1(), ModelConfig::sdxl()] {
        let bundle = diffusers_configs(&cfg.shrink())?;
        for part in bundle.split(|&b| b == 0xFF) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(part) {
                json_words(&v, &mut cfg_words);
            }
        }
    }
    write_dict(
        &dicts,
        "diffusers_config",
        &cfg_words.into_iter().collect::<Vec<_>>(),
    )?;
    let lora_words = [
        "lora_unet_",
        "lora_te_",
        "lora_te1_",
        "lora_te2_",
        ".lora_down.weight",
        ".lora_up.weight",
        ".alpha",
        ".lora_A.weight",
        ".lora_B.weight",
        "unet.",
        "text_encoder.",
        "text_encoder_2.",
        ".processor.",
        "_lora.down.weight",
        "_lora.up.weight",
        "down_blocks_0_attentions_0_",
        "transformer_blocks_0_attn1_to_q",
    ];
    write_dict(
        &dicts,
        "lora",
        &lora_words
            .iter()
            .chain(&st)
            .map(|w| w.to_string())
            .collect::<Vec<_>>(),
    )?;
    let emb_words = [
        "emb_params",
        "string_to_param",
        "string_to_token",
        "*",
        "clip_l",
        "clip_g",
        "name",
        "step",
    ];
    write_dict(
        &dicts,
        "embedding",
        &emb_words
            .iter()
            .chain(&st)
            .chain(&torch)
            .map(|w| w.to_string())
            .collect::<Vec<_>>(),
    )?;
    let prompt_words = [
        "BREAK", "(", ")", "[", "]", ":", ":1.5", "<lora:", "<lyco:", ">", "\\(", "\\)", ",",
    ];
    write_dict(&dicts, "prompt", &prompt_words.map(String::from))?;
    let text_words = [
        "<|startoftext|>",
        "<|endoftext|>",
        "'s",
        "'ll",
        "'ve",
        "'re",
        "'d",
        "'m",
        "'t",
        "\u{345}",
        " ",
    ];
    write_dict(&dicts, "tokenizer", &text_words.map(String::from))?;
    let img_words = [
        r"\x89PNG\x0d\x0a\x1a\x0a",
        "IHDR",
        "IDAT",
        "IEND",
        "PLTE",
        "tRNS",
        "gAMA",
        r"\xff\xd8\xff\xe0",
        r"\xff\xdb",
        r"\xff\xc0",
        r"\xff\xc4",
        r"\xff\xda",
        r"\xff\xd9",
        "GIF89a",
        "RIFF",
        "WEBP",
        "BM",
    ];
    let img_words: Vec<String> = img_words.iter().map(|w| w.to_string()).collect();
    write_dict(&dicts, "image", &img_words)?;
    Ok(())
}

/// The keys and string values of a JSON document.
fn json_words(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                out.insert(k.clone());
                json_words(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| json_words(v, out)),
        serde_json::Value::String(s) => {
            out.insert(s.clone());
        }
        _ => {}
    }
}

/// A libFuzzer dictionary: one quoted word per line. Words given with `\xNN`/`\r`/`\n`
/// escapes are written as they are (libFuzzer reads the same escapes); other bytes
/// that need it are escaped here.
fn write_dict(dir: &Path, target: &str, words: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut seen = std::collections::BTreeSet::new();
    let mut text = format!("# {target}: written by examples/fuzz_seeds.rs\n");
    for w in words {
        if !seen.insert(w.clone()) {
            continue;
        }
        let escaped = if w.contains("\\x") {
            w.clone()
        } else {
            w.bytes()
                .map(|b| {
                    if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
                        format!("\\x{b:02x}")
                    } else {
                        (b as char).to_string()
                    }
                })
                .collect()
        };
        text.push_str(&format!("\"{escaped}\"\n"));
    }
    std::fs::write(dir.join(format!("{target}.dict")), text)?;
    println!("dict/{target}.dict: {} words", seen.len());
    Ok(())
}

struct Seeds {
    out: PathBuf,
}

impl Seeds {
    fn put(&self, target: &str, name: &str, data: &[u8]) -> Result<()> {
        let dir = self.out.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), data)?;
        println!("{target}/{name}: {} bytes", data.len());
        Ok(())
    }
}

/// A complete GGUF as our converter writes one: model config, defaults, a tokenizer of
/// 40 merges (the byte symbols make it complete), recorded original shapes, and a few
/// real-named tensors in f32, f16 and q8_0.
fn our_gguf(cfg: &ModelConfig) -> Result<Vec<u8>> {
    let full = ClipVocab::embedded()?;
    let vocab = ClipVocab::from_merges(full.merges.iter().take(40).cloned().collect())?;
    let mut kv = metadata::config_kv(cfg);
    kv.extend(metadata::defaults_kv(
        &sdrs::config::Defaults::preset("sd1").unwrap_or_default(),
    ));
    kv.extend(metadata::tokenizer_kv(&vocab));
    kv.extend(metadata::reshaped_kv(&[(
        "model.diffusion_model.out.2.weight".into(),
        vec![4, 32, 3, 3],
    )]));
    kv.push(("general.name".into(), Value::String("fuzz seed".into())));
    let tensors = [
        TensorEntry {
            name: "model.diffusion_model.out.2.bias".into(),
            ne: vec![4],
            ty: Type::F32,
        },
        TensorEntry {
            name: "first_stage_model.quant_conv.bias".into(),
            ne: vec![8],
            ty: Type::F16,
        },
        TensorEntry {
            name: "model.diffusion_model.out.2.weight".into(),
            ne: vec![288, 4],
            ty: Type::Q8_0,
        },
    ];
    let mut w = Writer::new(Vec::new(), &kv, &tensors, None)?;
    for t in &tensors {
        let n = t.nbytes().context("size")? as usize;
        w.write_chunk(&vec![0x11u8; n])?;
    }
    Ok(w.finish()?)
}

/// A GGUF as stable-diffusion.cpp writes one: no metadata, norm scales in blocks (Q8_0,
/// Q4_K), biases in f16, a 4-D f16 kernel, OpenCLIP's text projection quantized: every
/// conversion sdrs makes at load (`model::fit`).
fn sdcpp_style_gguf() -> Result<Vec<u8>> {
    let tensors = [
        TensorEntry {
            name: "first_stage_model.decoder.norm_out.weight".into(),
            ne: vec![32],
            ty: Type::Q8_0,
        },
        TensorEntry {
            name: "first_stage_model.decoder.norm_out.bias".into(),
            ne: vec![32],
            ty: Type::F16,
        },
        TensorEntry {
            name: "model.diffusion_model.out.0.weight".into(),
            ne: vec![256],
            ty: Type::Q4_K,
        },
        TensorEntry {
            name: "model.diffusion_model.out.2.weight".into(),
            ne: vec![3, 3, 32, 4],
            ty: Type::F16,
        },
        TensorEntry {
            name: "conditioner.embedders.1.model.text_projection".into(),
            ne: vec![32, 32],
            ty: Type::Q4_0,
        },
    ];
    let mut w = Writer::new(Vec::new(), &[], &tensors, None)?;
    for t in &tensors {
        let n = t.ne.iter().product::<u64>() as usize;
        let values: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) / 8.0).collect();
        let mut bytes = Vec::new();
        t.ty.quantize_rows(&values, n / t.ne[0] as usize, t.ne[0] as usize, &mut bytes)?;
        w.write_chunk(&bytes)?;
    }
    Ok(w.finish()?)
}

fn to_safetensors(
    tensors: &[&SourceTensor],
    dtype: DType,
    meta: &[(&str, &str)],
) -> Result<Vec<u8>> {
    let specs: Vec<safetensors::WriteSpec> = tensors
        .iter()
        .map(|t| safetensors::WriteSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype,
        })
        .collect();
    let meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut out = Vec::new();
    safetensors::write(&mut out, &specs, &meta, |i, buf| {
        let v = tensors[i].read_f32()?;
        match dtype {
            DType::F16 => buf.extend(v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes())),
            DType::BF16 => buf.extend(
                v.iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()),
            ),
            _ => buf.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        }
        Ok(())
    })?;
    Ok(out)
}

fn named_f32(list: &[(&str, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>> {
    let specs: Vec<safetensors::WriteSpec> = list
        .iter()
        .map(|(n, s, _)| safetensors::WriteSpec {
            name: n.to_string(),
            shape: s.clone(),
            dtype: DType::F32,
        })
        .collect();
    let mut out = Vec::new();
    safetensors::write(&mut out, &specs, &BTreeMap::new(), |i, buf| {
        buf.extend(list[i].2.iter().flat_map(|x| x.to_le_bytes()));
        Ok(())
    })?;
    Ok(out)
}

/// diffusers' processor naming, `down_blocks.0…attn1.processor.to_q_lora.down.weight`,
/// → kohya's `lora_unet_down_blocks_0…attn1_to_q.lora_down.weight`.
fn kohya_name(name: &str) -> String {
    let (module, part) = name.rsplit_once("_lora.").unwrap_or((name, "down.weight"));
    let module = module.replace(".processor", "").replace('.', "_");
    format!("lora_unet_{module}.lora_{part}")
}

fn kohya_safetensors(pairs: &[(String, &SourceTensor)]) -> Result<Vec<u8>> {
    let mut list: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, t) in pairs {
        list.push((name.clone(), t.shape.clone(), t.read_f32()?));
        if name.ends_with("lora_down.weight") {
            list.push((name.replace("lora_down.weight", "alpha"), vec![], vec![4.0]));
        }
    }
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = list
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    named_f32(&refs)
}

/// The `data.pkl` record of a torch zip.
fn data_pkl(path: &Path) -> Result<Vec<u8>> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path)?)?;
    let name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl"))
        .map(str::to_string)
        .context("no data.pkl")?;
    let mut out = Vec::new();
    zip.by_name(&name)?.read_to_end(&mut out)?;
    Ok(out)
}

/// A diffusers folder's config files for `cfg`, as [`sdrs::fuzz::DIFFUSERS_FILES`] orders them.
fn diffusers_configs(cfg: &ModelConfig) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let shapes: std::collections::HashMap<String, usize> =
        sdrs::synth::tensor_list(cfg, DType::F16)?
            .into_iter()
            .map(|(n, s, _)| (n, s.iter().product()))
            .collect();
    sdrs::formats::diffusers::write(dir.path(), cfg, DType::F16, None, &mut |name| {
        Ok(vec![0.0; shapes.get(name).copied().unwrap_or(0)])
    })?;
    let parts: Vec<Vec<u8>> = sdrs::fuzz::DIFFUSERS_FILES
        .iter()
        .map(|f| std::fs::read(dir.path().join(f)).unwrap_or_default())
        .collect();
    Ok(parts.join(&0xFFu8))
}
