//! Conversion: every input format and weight type, values read back within each
//! type's bound, the real layouts planned in full, and failures that leave nothing.
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use common::*;
use sdrs::config::ModelConfig;
use sdrs::convert::{self, Policy};
use sdrs::formats::gguf::metadata;
use sdrs::formats::gguf::GgufFile;
use sdrs::formats::{layout, Checkpoint, DType, SourceFile, SourceTensor, TensorData};
use sdrs::ggml::Type;
use sdrs::synth::{self, Format};

/// Worst relative RMS error allowed per stored type, for weights uniformly
/// distributed as `synth` makes them (measured values are well below: see the
/// closing note of the foundation issue).
fn bound(t: Type) -> f64 {
    match t {
        Type::F32 | Type::F16 => 0.0,
        Type::BF16 => 4e-3,
        Type::Q8_0 => 0.006,
        Type::Q6_K => 0.015,
        Type::Q5_0 | Type::Q5_1 | Type::Q5_K => 0.04,
        Type::Q4_0 | Type::Q4_1 | Type::Q4_K => 0.09,
        Type::Q3_K => 0.2,
        Type::Q2_K => 0.4,
        _ => 0.0,
    }
}

/// Reads every tensor of a converted file back and compares it with the source.
fn check_round_trip(src: &Path, out: &Path) -> HashMap<Type, f64> {
    let ck = Checkpoint::open(src).unwrap();
    let g = GgufFile::open(out).unwrap();
    let shapes = metadata::original_shapes(&g);
    let cfg = metadata::read_config(&g).unwrap().unwrap();
    let expected = layout::layout(&cfg).unwrap();
    assert_eq!(
        g.tensors.len(),
        expected.len(),
        "one output tensor per architecture tensor"
    );
    let mut worst: HashMap<Type, f64> = HashMap::new();
    for spec in &expected {
        let t = g
            .tensor(&spec.name)
            .unwrap_or_else(|| panic!("{} missing from output", spec.name));
        let shape = shapes
            .get(&t.name)
            .cloned()
            .unwrap_or_else(|| t.torch_shape());
        assert_eq!(shape, spec.shape, "{}", t.name);
        let back = t.ty.dequantize(g.data(t), t.numel() as usize).unwrap();
        let orig = ck.get(&spec.name).unwrap().read_f32().unwrap();
        let err = rel_rms(&orig, &back);
        let b = bound(t.ty);
        let exact_expected =
            b == 0.0 && !(t.ty == Type::F16 && ck.get(&spec.name).unwrap().dtype != DType::F16);
        if exact_expected {
            assert!(orig == back, "{} ({}) must be exact", t.name, t.ty.name());
        } else {
            assert!(
                err <= b.max(1e-3),
                "{} stored as {}: relative RMS error {err:.5} over {b}",
                t.name,
                t.ty.name()
            );
        }
        let w = worst.entry(t.ty).or_default();
        *w = w.max(err);
    }
    worst
}

#[test]
fn tiny_checkpoints_convert_to_every_type_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["tiny-sd15", "tiny-sd21", "tiny-sdxl"] {
        let src = synth_tiny(arch, Format::Safetensors, DType::F32, dir.path());
        for &t in Type::CONVERT_TARGETS {
            let out = dir.path().join(format!("{arch}-{}.gguf", t.name()));
            convert_to(&src, t, &out).unwrap();
            let worst = check_round_trip(&src, &out);
            eprintln!(
                "{arch} {:>5}: {:?}",
                t.name(),
                worst
                    .iter()
                    .map(|(t, e)| format!("{}={e:.5}", t.name()))
                    .collect::<Vec<_>>()
            );
            std::fs::remove_file(&out).unwrap();
        }
    }
}

#[test]
fn ckpt_and_diffusers_inputs_convert_like_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["tiny-sd15", "tiny-sd21", "tiny-sdxl"] {
        for format in [Format::Ckpt, Format::Diffusers] {
            let src = synth_tiny(arch, format, DType::F16, dir.path());
            for t in [Type::F16, Type::Q8_0, Type::Q4_K] {
                let out = dir
                    .path()
                    .join(format!("{arch}-{format:?}-{}.gguf", t.name()));
                convert_to(&src, t, &out).unwrap_or_else(|e| panic!("{arch} {format:?}: {e}"));
                check_round_trip(&src, &out);
            }
        }
    }
}

#[test]
fn the_same_weights_give_the_same_gguf_tensors_from_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for format in [Format::Safetensors, Format::Ckpt, Format::Diffusers] {
        let src = synth_tiny("tiny-sdxl", format, DType::F16, dir.path());
        let out = dir.path().join(format!("{format:?}.gguf"));
        convert_to(&src, Type::Q4_0, &out).unwrap();
        files.push(GgufFile::open(&out).unwrap());
    }
    for t in &files[0].tensors {
        for other in &files[1..] {
            let u = other.tensor(&t.name).unwrap();
            assert_eq!((t.ty, &t.ne), (u.ty, &u.ne), "{}", t.name);
            assert_eq!(files[0].data(t), other.data(u), "{}", t.name);
        }
    }
}

#[test]
fn malicious_pickle_is_refused_by_the_converter_and_nothing_is_written() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("evil.ckpt");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
    z.start_file(
        "archive/data.pkl",
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
    )
    .unwrap();
    // {"state_dict": os.system("touch pwned")}
    z.write_all(b"\x80\x02}q\x00X\x0a\x00\x00\x00state_dictq\x01cos\nsystem\nq\x02X\x0b\x00\x00\x00touch pwnedq\x03\x85q\x04Rq\x05s.").unwrap();
    z.finish().unwrap();
    let before = listing(dir.path());
    let e = convert_to(&p, Type::Q8_0, &dir.path().join("out.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("os.system") && e.contains("evil.ckpt"), "{e}");
    assert_eq!(listing(dir.path()), before);
    assert!(!Path::new("pwned").exists());
}

#[test]
fn f16_checkpoint_converts_to_f16_bit_exactly_and_records_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth_tiny("tiny-sd15", Format::Safetensors, DType::F16, dir.path());
    let out = dir.path().join("o.gguf");
    let s = convert_to(&src, Type::F16, &out).unwrap();
    check_round_trip(&src, &out);
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(
        g.get("sd.source.sha256").and_then(|v| v.as_str()),
        Some(s.sha256.as_str())
    );
    assert_eq!(s.sha256.len(), 64);
    assert_eq!(metadata::read_tokenizer(&g).unwrap().tokens.len(), 49408);
    // ggml's own parser agrees on every tensor
    let summary = sdrs::ggml::gguf_summary(&out).unwrap();
    assert_eq!(summary.tensors.len(), g.tensors.len());
}

#[test]
fn our_gguf_reconverts_with_original_kernel_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth_tiny("tiny-sd15", Format::Safetensors, DType::F16, dir.path());
    let q8 = dir.path().join("q8.gguf");
    convert_to(&src, Type::Q8_0, &q8).unwrap();
    let again = dir.path().join("again.gguf");
    convert_to(&q8, Type::Q8_0, &again).unwrap();
    // Re-encoding q8_0 → q8_0 copies blocks: identical tensor bytes.
    let (a, b) = (
        GgufFile::open(&q8).unwrap(),
        GgufFile::open(&again).unwrap(),
    );
    for t in &a.tensors {
        assert_eq!(a.data(t), b.data(b.tensor(&t.name).unwrap()), "{}", t.name);
    }
}

/// A checkpoint whose tensors follow a real layout list; the bytes are never read.
fn layout_checkpoint(json: &str, file: &Path) -> Checkpoint {
    std::fs::write(file, b"placeholder").unwrap();
    let f = SourceFile::open(file).unwrap();
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("layouts").join(json)).unwrap())
            .unwrap();
    let tensors = list
        .iter()
        .map(|e| SourceTensor {
            name: e["name"].as_str().unwrap().to_string(),
            shape: e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect(),
            dtype: match e["dtype"].as_str().unwrap() {
                "F32" => DType::F32,
                "I64" => DType::I64,
                _ => DType::F16,
            },
            data: TensorData::Raw {
                file: f.clone(),
                offset: 0,
            },
        })
        .collect();
    Checkpoint {
        path: file.to_path_buf(),
        format: sdrs::formats::source::SourceFormat::Safetensors,
        tensors,
        metadata: Default::default(),
        tokenizer: None,
    }
}

fn unet_bytes(plan: &convert::Plan) -> u64 {
    plan.entries
        .iter()
        .filter(|e| e.name.starts_with("model.diffusion_model."))
        .map(|e| e.nbytes)
        .sum()
}

#[test]
fn real_layouts_plan_every_tensor_and_meet_the_size_targets() {
    let dir = tempfile::tempdir().unwrap();
    for (json, preset, n_extra) in [
        ("sd15.json", ModelConfig::sd1(), 13),
        ("sd21.json", ModelConfig::sd2(), 26),
        ("sdxl.json", ModelConfig::sdxl(), 2),
    ] {
        let ck = layout_checkpoint(json, &dir.path().join("x"));
        let plan = convert::plan(&ck, &Policy::new(Type::Q4_0), None).unwrap();
        assert_eq!(plan.config, preset, "{json}: detected architecture");
        assert!(plan.unknown.is_empty(), "{json}: {:?}", plan.unknown);
        assert_eq!(
            plan.dropped.len(),
            n_extra,
            "{json}: only the extra buffers are dropped: {:?}",
            plan.dropped
        );
        assert_eq!(plan.entries.len() + plan.dropped.len(), ck.tensors.len());
        let (unet, total) = (unet_bytes(&plan), plan.output_bytes());
        eprintln!(
            "{json}: q4_0 UNet {:.1} MB, file {:.1} MB",
            unet as f64 / 1e6,
            total as f64 / 1e6
        );
        match json {
            "sd15.json" => {
                assert!(unet < 600_000_000, "SD 1.5 q4_0 UNet {unet} bytes");
                assert!(total < 800_000_000, "SD 1.5 q4_0 file {total} bytes");
            }
            // The VAE's kernels are bf16 (+80 MB over q8_0, for a decode 1.3-2.6x as fast).
            "sdxl.json" => assert!(total < 2_300_000_000, "SDXL q4_0 file {total} bytes"),
            _ => {}
        }
    }
}

#[test]
fn stable_diffusion_cpp_files_map_and_match_their_source() {
    let Some(dir) = external("fixtures/sdcpp-gguf") else {
        return;
    };
    let src = Checkpoint::open(&dir.join("tiny-sd15.safetensors")).unwrap();
    for (file, ty, b) in [
        ("tiny-sd15-sdcpp-q8_0.gguf", Type::Q8_0, 0.006),
        ("tiny-sd15-sdcpp-q4_0.gguf", Type::Q4_0, 0.12),
    ] {
        let ck = Checkpoint::open(&dir.join(file)).unwrap();
        let cfg = ck.model_config().unwrap();
        assert_eq!(cfg.family, "sd1", "{file}");
        assert_eq!(ck.tensors.len(), 1131);
        for t in &ck.tensors {
            let s = src
                .get(&t.name)
                .unwrap_or_else(|| panic!("{file}: {} not in the source", t.name));
            assert_eq!(s.numel(), t.numel(), "{}", t.name);
            let (a, b2) = (s.read_f32().unwrap(), t.read_f32().unwrap());
            match t.dtype {
                DType::Ggml(x) if x == ty => {
                    assert!(rel_rms(&a, &b2) < b, "{}: {}", t.name, rel_rms(&a, &b2))
                }
                _ => assert!(a == b2, "{} ({}) must be exact", t.name, t.dtype.name()),
            }
        }
        // Every name maps to the canonical layout; only widths differ (the file's
        // widths are shrunk inconsistently, which moves 1x1 shortcuts).
        let shapes: Vec<(&str, &[usize])> = ck
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        let diff = layout::compare(&cfg, &shapes).unwrap();
        assert!(
            diff.missing.is_empty() && diff.unexpected.is_empty(),
            "{file}: {diff:?}"
        );
    }
}

#[test]
fn old_clip_naming_without_text_model_converts_like_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::sd1().shrink();
    let list = synth::tensor_list(&cfg, DType::F16).unwrap();
    let old = |n: &str| {
        n.replace(
            "cond_stage_model.transformer.text_model.",
            "cond_stage_model.transformer.",
        )
    };
    let specs: Vec<_> = list
        .iter()
        .map(|(n, s, d)| sdrs::formats::safetensors::WriteSpec {
            name: old(n),
            shape: s.clone(),
            dtype: *d,
        })
        .collect();
    let mut f = Vec::new();
    sdrs::formats::safetensors::write(&mut f, &specs, &Default::default(), |i, b| {
        let (n, s, d) = &list[i];
        b.resize(
            d.bytes_for(s.iter().product::<usize>() as u64).unwrap() as usize,
            0,
        );
        if *d == DType::F16 {
            let v = synth::tensor_values(n, s, 1);
            b.clear();
            b.extend(v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()));
        }
        Ok(())
    })
    .unwrap();
    let src = dir.path().join("old.safetensors");
    std::fs::write(&src, f).unwrap();
    let out = dir.path().join("old.gguf");
    convert_to(&src, Type::F16, &out).unwrap();
    let g = GgufFile::open(&out).unwrap();
    assert!(g
        .tensor("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight")
        .is_some());
    assert_eq!(g.tensors.len(), layout::layout(&cfg).unwrap().len());
}

#[test]
fn synth_is_deterministic_per_seed() {
    let a = synth::tensor_values("model.diffusion_model.out.2.weight", &[4, 320, 3, 3], 1);
    assert_eq!(
        a,
        synth::tensor_values("model.diffusion_model.out.2.weight", &[4, 320, 3, 3], 1)
    );
    assert_ne!(
        a,
        synth::tensor_values("model.diffusion_model.out.2.weight", &[4, 320, 3, 3], 2)
    );
    let std = (a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32).sqrt();
    assert!(
        (std - (1.0 / 2880f32).sqrt()).abs() < 0.002,
        "variance 1/fan_in: std {std}"
    );
}

fn fails_cleanly(input: &Path, out_dir: &Path, needle: &str) {
    let before = listing(out_dir);
    let out = out_dir.join("out.gguf");
    let e = convert_to(input, Type::Q8_0, &out)
        .err()
        .unwrap_or_else(|| panic!("{} converted", input.display()))
        .to_string();
    assert!(e.contains(needle), "error `{e}` lacks `{needle}`");
    assert_eq!(listing(out_dir), before, "nothing left behind");
}

#[test]
fn bad_inputs_fail_with_a_clear_error_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = synth_tiny("tiny-sd15", Format::Safetensors, DType::F16, d);
    let bytes = std::fs::read(&good).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + hlen].to_vec()).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let with_header = |h: &str| {
        let mut h = h.as_bytes().to_vec();
        while h.len() < hlen {
            h.push(b' ');
        }
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend(h);
        b.extend(&bytes[8 + hlen..]);
        b
    };
    let out_dir = tempfile::tempdir().unwrap();
    let od = out_dir.path();
    fails_cleanly(
        &write("trunc.safetensors", &bytes[..bytes.len() / 2]),
        od,
        "trunc.safetensors",
    );
    fails_cleanly(
        &write(
            "corrupt.safetensors",
            &with_header(&header.replacen('{', "[", 1)),
        ),
        od,
        "invalid safetensors header",
    );
    let mut absurd = bytes.clone();
    absurd[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    fails_cleanly(
        &write("absurd.safetensors", &absurd),
        od,
        "absurd.safetensors",
    );
    // A UNet weight declared as int32: the bytes are the same size, the type is wrong.
    let name = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
    let pos = header.find(&format!("\"{name}\"")).unwrap();
    let wrong = format!(
        "{}{}",
        &header[..pos],
        header[pos..].replacen("\"F16\"", "\"I16\"", 1)
    );
    fails_cleanly(&write("dtype.safetensors", &with_header(&wrong)), od, name);
    // Missing tensors: drop one from a real checkpoint.
    let cfg = ModelConfig::sd1().shrink();
    let list: Vec<_> = synth::tensor_list(&cfg, DType::F16)
        .unwrap()
        .into_iter()
        .filter(|t| !t.0.ends_with("out.2.weight"))
        .collect();
    let specs: Vec<_> = list
        .iter()
        .map(|(n, s, d)| sdrs::formats::safetensors::WriteSpec {
            name: n.clone(),
            shape: s.clone(),
            dtype: *d,
        })
        .collect();
    let mut f = Vec::new();
    sdrs::formats::safetensors::write(&mut f, &specs, &Default::default(), |i, b| {
        b.resize(
            list[i]
                .2
                .bytes_for(list[i].1.iter().product::<usize>() as u64)
                .unwrap() as usize,
            0,
        );
        Ok(())
    })
    .unwrap();
    fails_cleanly(&write("missing.safetensors", &f), od, "missing");
    // Not a Stable Diffusion model at all.
    let mut f = Vec::new();
    let specs = vec![sdrs::formats::safetensors::WriteSpec {
        name: "lm_head.weight".into(),
        shape: vec![4, 4],
        dtype: DType::F32,
    }];
    sdrs::formats::safetensors::write(&mut f, &specs, &Default::default(), |_, b| {
        b.resize(64, 0);
        Ok(())
    })
    .unwrap();
    fails_cleanly(
        &write("llm.safetensors", &f),
        od,
        "not a Stable Diffusion checkpoint",
    );
    fails_cleanly(&write("tiny.bin", b"abc"), od, "too short");
}

#[test]
fn output_problems_leave_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth_tiny("tiny-sd15", Format::Safetensors, DType::F16, dir.path());
    // Existing output without --force.
    let out = dir.path().join("exists.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let e = convert_to(&src, Type::Q8_0, &out).unwrap_err().to_string();
    assert!(e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    // A directory that cannot exist (parent is a file).
    let e = convert_to(&src, Type::Q8_0, &out.join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists.gguf"), "{e}");
    // Interrupted conversion.
    let ck = Checkpoint::open(&src).unwrap();
    let plan = convert::plan(&ck, &Policy::new(Type::Q4_0), None).unwrap();
    let before = listing(dir.path());
    let e = convert::run(
        &ck,
        &plan,
        "q4_0",
        &dir.path().join("int.gguf"),
        false,
        &AtomicBool::new(true),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(e, sdrs::Error::Interrupted));
    assert_eq!(listing(dir.path()), before);
}

/// Disk full, on a 1 MiB tmpfs (needs root to mount; CI runs as root).
#[test]
fn disk_full_is_reported_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth_tiny("tiny-sd15", Format::Safetensors, DType::F16, dir.path());
    let Some(mnt) = small_disk(dir.path(), "small", "1m") else {
        return;
    };
    let e = convert_to(&src, Type::F16, &mnt.join("full.gguf"))
        .unwrap_err()
        .to_string();
    let listing_after = listing(&mnt);
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert!(
        e.contains("No space left") && e.contains("full.gguf"),
        "{e}"
    );
    assert!(listing_after.is_empty(), "{listing_after:?}");
}

#[test]
fn an_interleaved_file_lists_its_matrices_and_converts_back_to_the_plain_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = sdrs::testdata::fixture("ref/sd1/model");
    let plain = dir.path().join("plain.gguf");
    let x86 = dir.path().join("x86.gguf");
    let back = dir.path().join("back.gguf");
    convert_to(&src, Type::Q4_0, &plain).unwrap();
    convert_interleaved(&src, &x86).unwrap();
    convert_to(&x86, Type::Q4_0, &back).unwrap();
    let (p, x, b) = (
        GgufFile::open(&plain).unwrap(),
        GgufFile::open(&x86).unwrap(),
        GgufFile::open(&back).unwrap(),
    );
    let mut interleaved = 0;
    for t in &p.tensors {
        let tx = x.tensor(&t.name).unwrap();
        // Exactly the UNet's q4_0 matrices, in the same bytes once un-interleaved.
        let expect = t.name.starts_with("model.diffusion_model.")
            && sdrs::ggml::repack::can_interleave(t.ty, &t.ne);
        assert_eq!(tx.interleaved, expect, "{}", t.name);
        assert_eq!(x.plain(tx).unwrap().as_ref(), p.data(t), "{}", t.name);
        assert_eq!(tx.interleaved, x.data(tx) != p.data(t), "{}", t.name);
        interleaved += tx.interleaved as usize;
        // Converting back stores them plain again, never requantized.
        let tb = b.tensor(&t.name).unwrap();
        assert!(!tb.interleaved && b.data(tb) == p.data(t), "{}", t.name);
    }
    assert!(interleaved > 50, "{interleaved}");
    assert!(b.get(sdrs::formats::gguf::INTERLEAVED_Q4_0).is_none());
}

#[test]
fn an_interleaved_list_naming_what_cannot_be_interleaved_is_refused() {
    use sdrs::formats::gguf::{TensorEntry, Value, Writer, INTERLEAVED_Q4_0};
    let dir = tempfile::tempdir().unwrap();
    let t = [
        TensorEntry {
            name: "a".into(),
            ne: vec![32, 8],
            ty: Type::F32,
        },
        TensorEntry {
            name: "b".into(),
            ne: vec![32, 4],
            ty: Type::Q4_0,
        },
    ];
    for (name, what) in [
        ("a", "a f32 tensor"),
        ("b", "a q4_0 tensor [32, 4]"),
        ("c", "which the file lacks"),
    ] {
        let kv = [(INTERLEAVED_Q4_0.to_string(), Value::string_array([name]))];
        let mut w = Writer::new(Vec::new(), &kv, &t, None).unwrap();
        w.write_chunk(&[0u8; 32 * 8 * 4]).unwrap();
        w.write_chunk(&[0u8; 18 * 4]).unwrap();
        let f = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&f, w.finish().unwrap()).unwrap();
        let e = GgufFile::open(&f).expect_err("refused").to_string();
        assert!(
            e.contains(&format!("{name}.gguf")) && e.contains(INTERLEAVED_Q4_0) && e.contains(what),
            "{e}"
        );
    }
}
