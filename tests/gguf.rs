//! Our GGUF writer and reader against each other and against ggml's own parser.
use std::io::Write;

use sdrs::formats::gguf::{ty, GgufFile, TensorEntry, Value, Writer};
use sdrs::ggml::{self, Type};

/// The longest tensor name in the real SDXL checkpoint (90 bytes).
const SDXL_LONGEST: &str =
    "conditioner.embedders.0.transformer.text_model.encoder.layers.10.self_attn.out_proj.weight";

fn all_values() -> Vec<(String, Value)> {
    vec![
        (
            "general.architecture".into(),
            Value::String("stable-diffusion".into()),
        ),
        ("t.u8".into(), Value::U8(200)),
        ("t.i8".into(), Value::I8(-100)),
        ("t.u16".into(), Value::U16(60000)),
        ("t.i16".into(), Value::I16(-30000)),
        ("t.u32".into(), Value::U32(4_000_000_000)),
        ("t.i32".into(), Value::I32(-2_000_000_000)),
        ("t.f32".into(), Value::F32(0.18215)),
        ("t.bool".into(), Value::Bool(true)),
        ("t.str".into(), Value::String("ünïcode ✓".into())),
        ("t.u64".into(), Value::U64(u64::MAX)),
        ("t.i64".into(), Value::I64(i64::MIN)),
        ("t.f64".into(), Value::F64(std::f64::consts::PI)),
        ("t.arr".into(), Value::u32_array([1, 2, 4, 4])),
        ("t.strs".into(), Value::string_array(["a b", "c</w>"])),
    ]
}

fn write_file(path: &std::path::Path, entries: &[TensorEntry], data: &[Vec<u8>]) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = Writer::new(std::io::BufWriter::new(f), &all_values(), entries, None).unwrap();
    for d in data {
        // Odd chunk sizes exercise the chunked path.
        for c in d.chunks(7) {
            w.write_chunk(c).unwrap();
        }
    }
    w.finish().unwrap().flush().unwrap();
}

fn sample() -> (Vec<TensorEntry>, Vec<Vec<u8>>) {
    let vals: Vec<f32> = (0..64 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut q8 = Vec::new();
    Type::Q8_0.quantize_rows(&vals, 3, 64, &mut q8).unwrap();
    let f32b: Vec<u8> = vals[..10].iter().flat_map(|x| x.to_le_bytes()).collect();
    let entries = vec![
        TensorEntry {
            name: SDXL_LONGEST.into(),
            ne: vec![64, 3],
            ty: Type::Q8_0,
        },
        TensorEntry {
            name: "small".into(),
            ne: vec![10],
            ty: Type::F32,
        },
        TensorEntry {
            name: "four.d".into(),
            ne: vec![1, 1, 2, 5],
            ty: Type::F32,
        },
    ];
    (entries, vec![q8, f32b.clone(), f32b])
}

#[test]
fn tensor_struct_layout_agrees_with_linked_ggml() {
    assert_eq!(ggml::max_name_len(), 128, "GGML_MAX_NAME as bindgen saw it");
    // ggml_tensor_overhead() = sizeof(ggml_object) (32) + sizeof(ggml_tensor), computed by the C side.
    assert_eq!(ggml::tensor_overhead(), ggml::tensor_struct_size() + 32);
}

#[test]
fn written_file_round_trips_through_our_reader_with_all_value_types() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.gguf");
    let (entries, data) = sample();
    write_file(&p, &entries, &data);
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.metadata, all_values());
    assert_eq!(g.tensors.len(), 3);
    for (t, (e, d)) in g.tensors.iter().zip(entries.iter().zip(&data)) {
        assert_eq!(
            (t.name.as_str(), &t.ne, t.ty),
            (e.name.as_str(), &e.ne, e.ty)
        );
        assert_eq!(g.data(t), d.as_slice());
        assert_eq!((g.data_offset + t.offset) % 32, 0, "tensor data aligned");
    }
}

#[test]
fn longest_sdxl_name_survives_ggmls_own_gguf_parser() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.gguf");
    let (entries, data) = sample();
    write_file(&p, &entries, &data);
    let s = ggml::gguf_summary(&p).unwrap();
    let ours = GgufFile::open(&p).unwrap();
    assert_eq!(s.version, 3);
    assert_eq!(s.n_kv, all_values().len());
    let names: Vec<_> = s.tensors.iter().map(|t| (t.0.clone(), t.1, t.2)).collect();
    let expect: Vec<_> = ours
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.ty, t.offset))
        .collect();
    assert_eq!(names, expect);
    assert_eq!(names[0].0.len(), 90);
}

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    std::fs::write(&p, bytes).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("bad.gguf"), "error names the file: {e}");
    e
}

#[test]
fn hostile_counts_are_refused_before_allocating() {
    let mut b = header(1 << 40, 0);
    b.resize(1024, 0);
    assert!(open_err(&b).contains("cannot fit"));
    let mut b = header(0, u64::MAX);
    b.resize(1024, 0);
    assert!(open_err(&b).contains("cannot fit"));
    // an array claiming 2^40 elements
    let mut b = header(0, 1);
    b.extend(1u64.to_le_bytes());
    b.push(b'k');
    b.extend(ty::ARRAY.to_le_bytes());
    b.extend(ty::U8.to_le_bytes());
    b.extend((1u64 << 40).to_le_bytes());
    b.resize(1024, 0);
    assert!(open_err(&b).contains("array of"));
}

#[test]
fn an_empty_dimension_cannot_hide_an_absurd_shape() {
    // One tensor `t`, f32, [32, 0, 2^62, 4]: zero elements by product, yet more than an
    // i64 can count in ggml (which aborts on such a tensor).
    let mut b = header(1, 0);
    b.extend(1u64.to_le_bytes());
    b.push(b't');
    b.extend(4u32.to_le_bytes());
    for d in [32u64, 0, 1 << 62, 4] {
        b.extend(d.to_le_bytes());
    }
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(1024, 0);
    assert!(open_err(&b).contains("absurd shape"));
}

#[test]
fn corrupt_and_truncated_files_give_clear_errors() {
    assert!(open_err(b"GGUX\x03\0\0\0").contains("bad magic"));
    assert!(open_err(b"GG").contains("bad magic"));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.gguf");
    let (entries, data) = sample();
    write_file(&p, &entries, &data);
    let full = std::fs::read(&p).unwrap();
    // cut inside the data section
    assert!(open_err(&full[..full.len() - 30]).contains("truncated"));
    // cut inside the header
    let e = open_err(&full[..40]);
    assert!(e.contains("truncated") || e.contains("cannot fit"), "{e}");
    // unknown ggml type id for the first tensor
    let g = GgufFile::open(&p).unwrap();
    let name_pos = full
        .windows(SDXL_LONGEST.len())
        .position(|w| w == SDXL_LONGEST.as_bytes())
        .unwrap();
    let type_pos = name_pos + SDXL_LONGEST.len() + 4 + 2 * 8;
    let mut bad = full.clone();
    bad[type_pos..type_pos + 4].copy_from_slice(&999u32.to_le_bytes());
    assert!(open_err(&bad).contains("unknown ggml type"));
    // offset pointing past the end
    let mut bad = full.clone();
    bad[type_pos + 4..type_pos + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(open_err(&bad).contains("truncated"));
    // misaligned offset
    let mut bad = full;
    bad[type_pos + 4..type_pos + 12].copy_from_slice(&3u64.to_le_bytes());
    assert!(open_err(&bad).contains("aligned"));
    drop(g);
}

#[test]
fn every_convert_type_quantizes_and_dequantizes_through_ggml() {
    let vals: Vec<f32> = (0..256 * 4)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    for &t in Type::CONVERT_TARGETS {
        let mut out = Vec::new();
        t.quantize_rows(&vals, 4, 256, &mut out).unwrap();
        assert_eq!(out.len() as u64, t.bytes_for(vals.len() as u64).unwrap());
        let back = t.dequantize(&out, vals.len()).unwrap();
        let err: f32 = vals
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.6, "{}: max error {err}", t.name());
    }
    assert!(
        Type::Q4_0
            .quantize_rows(&vals[..40], 1, 40, &mut Vec::new())
            .is_err(),
        "partial block refused"
    );
    assert!(
        Type::I32
            .quantize_rows(&vals[..32], 1, 32, &mut Vec::new())
            .is_err(),
        "non-float target refused"
    );
}
