//! The CLIP text encoder graph on converted tiny models (numerics against the
//! reference implementation live in tests/reference.rs).
mod common;

use common::*;
use sdrs::formats::gguf::metadata;
use sdrs::formats::gguf::GgufFile;
use sdrs::formats::DType;
use sdrs::ggml::{Backend, Type};
use sdrs::model::{clip, Weights};
use sdrs::synth::Format;

fn tokens(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| {
            if i == 0 {
                49406
            } else {
                (seed * 7919 + i * 104729) % 49406
            }
        })
        .collect()
}

#[test]
fn text_encoders_are_causal_batch_independent_and_stable_under_quantization() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["tiny-sd15", "tiny-sd21", "tiny-sdxl"] {
        let src = synth_tiny(arch, Format::Safetensors, DType::F32, dir.path());
        let f32_path = dir.path().join(format!("{arch}-f32.gguf"));
        let q8_path = dir.path().join(format!("{arch}-q8.gguf"));
        convert_to(&src, Type::F32, &f32_path).unwrap();
        convert_to(&src, Type::Q8_0, &q8_path).unwrap();
        let g = GgufFile::open(&f32_path).unwrap();
        let q = GgufFile::open(&q8_path).unwrap();
        let cfg = metadata::read_config(&g).unwrap().unwrap();
        let backend = Backend::cpu(2).unwrap();
        for te in &cfg.text_encoders {
            let w = Weights::load(&g, |n| n.starts_with(&te.prefix)).unwrap();
            let wq = Weights::load(&q, |n| n.starts_with(&te.prefix)).unwrap();
            let t = te.max_positions;
            let (a, mut b) = (tokens(1, t), tokens(2, t));
            let both = clip::encode(&w, te, &[a.clone(), b.clone()], &backend).unwrap();
            assert_eq!(both.len(), 2 * t * te.hidden_size);
            assert!(both.iter().all(|x| x.is_finite()), "{arch}: finite");
            let alone = clip::encode(&w, te, std::slice::from_ref(&a), &backend).unwrap();
            assert_eq!(
                &both[..alone.len()],
                &alone[..],
                "{arch}: batch entries are independent"
            );
            // Changing token 40 leaves positions before it untouched (causal mask) and changes later ones.
            let before = clip::encode(&w, te, &[b.clone()], &backend).unwrap();
            b[40] = (b[40] + 1) % 49406;
            let after = clip::encode(&w, te, &[b], &backend).unwrap();
            let h = te.hidden_size;
            assert_eq!(
                &before[..40 * h],
                &after[..40 * h],
                "{arch}: earlier positions unchanged"
            );
            assert_ne!(
                &before[40 * h..],
                &after[40 * h..],
                "{arch}: later positions change"
            );
            let quant = clip::encode(&wq, te, &[a], &backend).unwrap();
            let err = rel_rms(&alone, &quant);
            assert!(err < 0.05, "{arch}: q8_0 vs f32 relative RMS {err}");
            // Ids outside the vocabulary are refused before ggml sees them.
            assert!(clip::encode(&w, te, &[vec![60000; t]], &backend).is_err());
        }
    }
}
