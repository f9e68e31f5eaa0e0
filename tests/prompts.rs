//! Prompts as the text encoders see them: A1111's emphasis syntax, long prompts in
//! 77-token windows, CLIP skip and textual inversion, against
//! `tools/reference/prompt_fixtures.py` (transformers and diffusers on the tiny models).
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use sdrs::config::ModelConfig;
use sdrs::formats::Checkpoint;
use sdrs::ggml::Type;
use sdrs::pipeline::{Pipeline, Request};
use sdrs::prompt::{parse, Embedding, Emphasis, Trigger, Windows};
use sdrs::tokenizer::ClipTokenizer;

fn fixtures() -> PathBuf {
    sdrs::testdata::fixture("ref")
}

fn prompts() -> PathBuf {
    fixtures().join("prompts")
}

fn golden() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let ck = Checkpoint::open(&prompts().join("golden.safetensors")).unwrap();
    ck.tensors
        .iter()
        .map(|t| (t.name.clone(), (t.shape.clone(), t.read_f32().unwrap())))
        .collect()
}

fn cases() -> Vec<serde_json::Value> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(prompts().join("golden.json")).unwrap())
            .unwrap();
    meta["cases"].as_array().unwrap().clone()
}

fn pipeline(model: &str) -> (tempfile::TempDir, Pipeline) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    convert_to(&fixtures().join(model).join("model"), Type::F32, &out).unwrap();
    let p = Pipeline::load_with_threads(&out, 2).unwrap();
    (dir, p)
}

#[test]
fn emphasis_pieces_match_the_a1111_grammar_on_51_prompts() {
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(prompts().join("emphasis.json")).unwrap())
            .unwrap();
    assert!(list.len() >= 40);
    for case in &list {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<(String, f64)> = case["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_f64().unwrap()))
            .collect();
        let got: Vec<(String, f64)> = parse(prompt)
            .unwrap()
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect();
        // Texts exactly; weights to the last bit but one, as serde_json's float parser
        // can land one ulp off Python's shortest repr.
        let same = got.len() == want.len()
            && got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.0 == w.0 && (g.1 - w.1).abs() <= 2.0 * f64::EPSILON * w.1.abs());
        assert!(same, "prompt {prompt:?}:\n got {got:?}\nwant {want:?}");
    }
}

#[test]
fn windows_of_weighted_and_long_prompts_match_the_reference_ids_and_weights() {
    let g = golden();
    let tok = ClipTokenizer::embedded().unwrap();
    let cut = Windows::new(&tok, 77, tok.eos_id(), &[]).unwrap();
    let mut checked = 0;
    for case in cases() {
        let key = case["key"].as_str().unwrap();
        let Some((shape, ids)) = g.get(&format!("{key}.ids")) else {
            continue;
        };
        let chunks = cut
            .chunks(&parse(case["prompt"].as_str().unwrap()).unwrap())
            .unwrap();
        assert_eq!(chunks.len(), shape[0], "{key}: windows");
        let got_ids: Vec<f32> = chunks
            .iter()
            .flat_map(|c| c.ids.iter().map(|&i| i as f32))
            .collect();
        let got_w: Vec<f32> = chunks.iter().flat_map(|c| c.weights.clone()).collect();
        assert_eq!(&got_ids, ids, "{key}: ids");
        assert_eq!(got_w, g[&format!("{key}.weights")].1, "{key}: weights");
        checked += 1;
    }
    assert_eq!(checked, 12);
}

/// Relative RMS error of `got` against `want`, asserted under `bound`.
fn close(what: &str, want: &[f32], got: &[f32], bound: f64) {
    assert_eq!(want.len(), got.len(), "{what}: sizes");
    let e = rel_rms(want, got);
    eprintln!("{what}: relative RMS error {e:.2e}");
    assert!(
        e <= bound,
        "{what}: relative RMS error {e:.3e} over {bound:.0e}"
    );
}

fn run_cases(model: &str) -> usize {
    let g = golden();
    let (_dir, mut pipe) = pipeline(model);
    for f in ["tiny-ti.bin", "tiny-a1111.pt"] {
        if model == "sd1" {
            pipe.add_embeddings(&prompts().join(f)).unwrap();
        }
    }
    if model == "sdxl" {
        pipe.add_embeddings(&prompts().join("tiny-xl.safetensors"))
            .unwrap();
    }
    let mut n = 0;
    for case in cases().iter().filter(|c| c["model"] == model) {
        let key = case["key"].as_str().unwrap();
        let mut req = Request::new(case["prompt"].as_str().unwrap());
        req.cfg_scale = 1.0;
        req.prompting.clip_skip = case["clip_skip"].as_u64().unwrap() as usize;
        let c = pipe.text_conditioning(&req).unwrap();
        assert_eq!(
            c.tokens,
            77 * case["windows"].as_u64().unwrap() as usize,
            "{key}"
        );
        close(
            &format!("{key} context"),
            &g[&format!("{key}.context")].1,
            &c.context,
            1e-5,
        );
        if let Some((_, pooled)) = g.get(&format!("{key}.pooled")) {
            close(
                &format!("{key} pooled"),
                pooled,
                c.pooled.as_deref().unwrap(),
                1e-5,
            );
        }
        n += 1;
    }
    n
}

#[test]
fn sd1_conditioning_of_weighted_long_clip_skipped_and_embedded_prompts_matches_the_reference() {
    assert_eq!(run_cases("sd1"), 16);
}

#[test]
fn sdxl_conditioning_with_clip_skip_and_a_clip_l_clip_g_embedding_matches_diffusers() {
    assert_eq!(run_cases("sdxl"), 3);
}

#[test]
fn a_short_prompt_beside_a_long_negative_is_padded_with_the_empty_window() {
    let (_dir, pipe) = pipeline("sd1");
    let long = vec!["cat"; 100].join(" ");
    let mut req = Request::new("a red circle");
    req.negative = long.clone();
    let both = pipe.text_conditioning(&req).unwrap();
    assert_eq!(both.tokens, 154);
    let width = both.context.len() / 2 / 154;
    let one = |prompt: &str| {
        let mut r = Request::new(prompt);
        r.cfg_scale = 1.0;
        pipe.text_conditioning(&r).unwrap()
    };
    let (neg, pos, empty) = (one(&long), one("a red circle"), one(""));
    assert_eq!(neg.tokens, 154);
    // Branch 0 is the negative prompt, branch 1 the prompt: its second window is "".
    assert_eq!(both.context[..154 * width], neg.context[..]);
    assert_eq!(both.context[154 * width..][..77 * width], pos.context[..]);
    assert_eq!(both.context[231 * width..], empty.context[..]);
}

#[test]
fn emphasis_none_reads_brackets_as_text_and_weights_change_the_conditioning() {
    let (_dir, pipe) = pipeline("sd1");
    let run = |prompt: &str, emphasis: Emphasis| {
        let mut r = Request::new(prompt);
        r.cfg_scale = 1.0;
        r.prompting.emphasis = emphasis;
        pipe.text_conditioning(&r).unwrap().context
    };
    let plain = run("a red circle", Emphasis::Original);
    assert_eq!(run("a (red:1.0) circle", Emphasis::Original), plain);
    assert_ne!(run("a (red:1.5) circle", Emphasis::Original), plain);
    assert_ne!(run("a (red) circle", Emphasis::None), plain);
    let none = run("a (red) circle", Emphasis::None);
    let literal = run(r"a \(red\) circle", Emphasis::Original);
    assert_eq!(none, literal);
}

#[test]
fn clip_skip_beyond_the_encoder_is_refused_before_any_work() {
    let (_dir, pipe) = pipeline("sd1");
    let mut req = Request::new("x");
    req.width = 16;
    req.height = 16;
    req.prompting.clip_skip = 9;
    let e = pipe.plan(&req).unwrap_err().to_string();
    assert!(e.contains("CLIP skip 9") && e.contains("1 to 2"), "{e}");
    req.prompting.clip_skip = 0;
    assert!(pipe.text_conditioning(&req).is_err());
    // 33 windows: over the cap, refused at planning.
    req.prompting.clip_skip = 1;
    req.prompt = vec!["cat"; 33 * 75].join(" ");
    let e = pipe.plan(&req).unwrap_err().to_string();
    assert!(e.contains("33 75-token windows is too long"), "{e}");
    req.prompt = vec!["cat"; 32 * 75].join(" ");
    assert!(pipe.plan(&req).is_ok());
}

#[test]
fn the_real_sd15_embedding_loads_and_its_token_triggers_it() {
    let Some(file) = external("models/ti-sd15-birb-style/learned_embeds.bin") else {
        return;
    };
    let sd15 = ModelConfig::sd1();
    let list = Embedding::open(&file, &sd15.text_encoders).unwrap();
    assert_eq!(list.len(), 1);
    let e = &list[0];
    assert!(
        e.names.contains(&"<birb-style>".to_string()),
        "{:?}",
        e.names
    );
    assert_eq!((e.vectors, e.data[0].len()), (1, 768));
    // The same values torch stores (read through the tensor directly).
    let raw = Checkpoint::open(&file).unwrap().tensors[0]
        .read_f32()
        .unwrap();
    assert_eq!(e.data[0], raw);
    assert!(raw.iter().all(|v| v.is_finite()) && raw.iter().any(|&v| v != 0.0));

    let tok = ClipTokenizer::embedded().unwrap();
    let triggers: Vec<Trigger> = e
        .names
        .iter()
        .map(|n| Trigger {
            ids: tok.encode(n).unwrap(),
            vectors: 1,
            embedding: 0,
        })
        .collect();
    let cut = Windows::new(&tok, 77, tok.eos_id(), &triggers).unwrap();
    let c = cut
        .chunks(&parse("a painting in <birb-style> of a bird").unwrap())
        .unwrap();
    assert_eq!(c[0].fixes.len(), 1);
    assert_eq!(c[0].fixes[0].offset, 4);
    assert_eq!(c[0].ids[4], 0);
    assert_eq!(c[0].ids[5], tok.encode("of").unwrap()[0]);

    // A 768-wide embedding on a 32-wide model: refused, naming the file.
    let (_dir, mut tiny) = pipeline("sd1");
    let err = tiny.add_embeddings(&file).unwrap_err().to_string();
    assert!(
        err.contains("learned_embeds.bin") && err.contains("another model"),
        "{err}"
    );
}

#[test]
fn an_embedding_folder_skips_files_for_other_models_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tiny-ti.bin", "tiny-a1111.pt", "tiny-xl.safetensors"] {
        std::fs::copy(prompts().join(f), dir.path().join(f)).unwrap();
    }
    // A real SD 1.5 embedding (768 wide) where the external data has one: another model's.
    let birb = sdrs::testdata::external_dir().join("models/ti-sd15-birb-style/learned_embeds.bin");
    if birb.exists() {
        std::fs::copy(birb, dir.path().join("birb.bin")).unwrap();
    }
    std::fs::write(dir.path().join("junk.pt"), b"not a torch file").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
    let (_d, mut pipe) = pipeline("sd1");
    // tiny-ti.bin and tiny-a1111.pt fit; the SDXL one (clip_g without a bigG encoder),
    // birb (768 wide) and junk do not.
    let n = pipe.add_embeddings(dir.path()).unwrap();
    assert_eq!(n, 2);
    let names: Vec<&String> = pipe.embeddings.list.iter().flat_map(|e| &e.names).collect();
    assert!(
        names.contains(&&"<tiny-ti>".to_string())
            && names.contains(&&"tiny-ti".to_string())
            && names.contains(&&"tiny-a1111".to_string())
    );
    let err = pipe
        .add_embeddings(&dir.path().join("tiny-xl.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("clip_g") && err.contains("another model"),
        "{err}"
    );
    let err = pipe
        .add_embeddings(&dir.path().join("junk.pt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("junk.pt"), "{err}");
    let err = pipe
        .add_embeddings(&dir.path().join("missing.pt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pt"), "{err}");
}
