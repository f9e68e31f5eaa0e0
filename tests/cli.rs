//! The `sdrs` binary: convert, info and synth as a user runs them.
mod common;

use std::process::Command;

fn sdrs(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn synth_convert_and_info_work_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m.safetensors");
    let out = dir.path().join("m.gguf");
    let (s, t) = (src.to_str().unwrap(), out.to_str().unwrap());
    let (ok, _, err) = sdrs(&["synth", "tiny-sd15", "-o", s, "--seed", "3"]);
    assert!(ok, "{err}");
    let (ok, plan, err) = sdrs(&["convert", s, "--type", "q4_0", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(
        plan.contains("q4_0") && plan.contains("total") && plan.contains("architecture: sd1"),
        "{plan}"
    );
    assert!(!out.exists(), "dry run writes nothing");
    let (ok, _, err) = sdrs(&[
        "convert",
        s,
        "--type",
        "q4_0",
        "-o",
        t,
        "--tensor-type",
        "attn2=q8_0",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("MB/s"), "{err}");
    let (ok, info, err) = sdrs(&["info", t]);
    assert!(ok, "{err}");
    for needle in [
        "architecture:  sd1",
        "unet",
        "vae",
        "text_encoder.0",
        "q4_0",
        "q8_0",
        "sd.source.sha256",
        "parameters",
    ] {
        assert!(info.contains(needle), "info lacks {needle}:\n{info}");
    }
    // again without --force: refused, file kept
    let (ok, _, err) = sdrs(&["convert", s, "--type", "q8_0", "-o", t]);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, info, _) = sdrs(&["info", s]);
    assert!(ok && info.contains("Safetensors checkpoint"), "{info}");
    // The x86 layout: said per type, and whether this CPU reads it in place.
    let x86 = dir.path().join("x86.gguf");
    let x = x86.to_str().unwrap();
    let (ok, _, err) = sdrs(&[
        "convert",
        s,
        "--type",
        "q4_0",
        "--cpu-layout",
        "x86",
        "-o",
        x,
    ]);
    assert!(ok, "{err}");
    let (ok, info, err) = sdrs(&["info", x]);
    assert!(ok, "{err}");
    assert!(
        info.contains("q4_0 (x86 layout)") && info.contains("sd.layout.q4_0x8 = ["),
        "{info}"
    );
}

#[test]
fn info_reads_stable_diffusion_cpp_files() {
    let Some(f) = common::external("fixtures/sdcpp-gguf/tiny-sd15-sdcpp-q4_0.gguf") else {
        return;
    };
    let (ok, info, err) = sdrs(&["info", f.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        info.contains("without sdrs metadata")
            && info.contains("architecture:  sd1")
            && info.contains("tensors:       1131"),
        "{info}"
    );
}

#[test]
fn user_mistakes_get_one_clear_line() {
    let (ok, _, err) = sdrs(&[
        "convert",
        "/nonexistent/model.safetensors",
        "-o",
        "/tmp/x.gguf",
    ]);
    assert!(
        !ok && err.contains("/nonexistent/model.safetensors") && err.contains("No such file"),
        "{err}"
    );
    let (ok, _, err) = sdrs(&["convert", "x", "--type", "q9_9", "-o", "y"]);
    assert!(
        !ok && err.contains("valid types") && err.contains("q4_K"),
        "{err}"
    );
    let (ok, _, err) = sdrs(&["synth", "sd99", "-o", "/tmp/x"]);
    assert!(!ok && err.contains("sd15"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bench_measures_a_synthetic_model_and_reports_json() {
    let (ok, out, err) = sdrs(&[
        "bench",
        "--synth",
        "tiny-sd15",
        "--type",
        "q8_0",
        "--sizes",
        "64",
        "--steps",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["family"], "sd1");
    let run = &v["runs"][0];
    assert_eq!(run["size"], 64);
    for k in ["text_s", "step_s", "decode_s"] {
        assert!(run[k].as_f64().unwrap() > 0.0, "{k}: {run}");
    }
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(
        run["unet_gflops"].as_f64().unwrap() > 0.0
            && v["machine"]["fma_peak_gflops"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    // Two reports compare side by side with the ratio B/A.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    std::fs::write(&a, &out).unwrap();
    let mut other = v.clone();
    other["runs"][0]["step_s"] = serde_json::json!(run["step_s"].as_f64().unwrap() * 2.0);
    std::fs::write(&b, other.to_string()).unwrap();
    let (ok, table, err) = sdrs(&[
        "bench",
        "--compare",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let line = table
        .lines()
        .find(|l| l.starts_with("64: s/step"))
        .unwrap_or_default();
    assert!(line.trim_end().ends_with("2.00"), "{table}");
    let (ok, _, err) = sdrs(&[
        "bench",
        "--compare",
        a.to_str().unwrap(),
        "/nonexistent.json",
    ]);
    assert!(!ok && err.contains("/nonexistent.json"), "{err}");
}

#[test]
fn generate_prints_its_memory_plan_and_refuses_a_budget_it_cannot_fit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    let (ok, plan, err) = sdrs(&[
        "generate",
        "-p",
        "a red circle",
        "-W",
        "512",
        "-H",
        "512",
        "--plan",
        "--max-memory",
        "200M",
    ]);
    assert!(ok, "{err}");
    for needle in [
        "text",
        "unet",
        "decode",
        "peak",
        "VAE decode in",
        "budget 200 MiB",
    ] {
        assert!(plan.contains(needle), "plan lacks {needle}:\n{plan}");
    }
    let (ok, _, err) = sdrs(&[
        "generate",
        "-p",
        "a red circle",
        "--max-memory",
        "40M",
        "-o",
        o,
    ]);
    assert!(
        !ok && err.contains("cannot fit the memory budget of 40 MiB"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run writes nothing");
    let (ok, _, err) = sdrs(&["generate", "-p", "a red circle", "--max-memory", "lots"]);
    assert!(!ok && err.contains("is not a size"), "{err}");
    // With the image's GroupNorm statistics the decode runs in full-width bands of a
    // forced tile's area (64x64 latents over rows of 128: 32 rows).
    let (ok, plan, err) = sdrs(&[
        "generate",
        "-p",
        "a red circle",
        "-W",
        "1024",
        "-H",
        "1024",
        "--plan",
        "--vae-tiling",
        "--vae-tile-stats",
        "image",
    ]);
    assert!(ok && plan.contains("32-latent bands"), "{err}{plan}");
    let (ok, _, err) = sdrs(&[
        "generate",
        "-p",
        "a red circle",
        "--vae-tiling",
        "--vae-tile-stats",
        "mine",
        "-o",
        o,
    ]);
    assert!(
        !ok && err.contains("unknown vae tile stats `mine`") && err.contains("tile, image"),
        "{err}"
    );
}

#[test]
fn info_system_names_the_cpu_kernels_in_use() {
    let (ok, out, err) = sdrs(&["info", "--system"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("ggml kernels:") && out.contains("LLAMAFILE"),
        "{out}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("sdrs kernels:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        ["avx512", "avx2", "neon", "baseline"]
            .iter()
            .any(|v| line.ends_with(v)),
        "{line}"
    );
    // What the CPU has, as detected at run time (every x86-64 has SSE2-era basics; an
    // aarch64 one has NEON).
    let features = out
        .lines()
        .find(|l| l.starts_with("cpu features:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        features.contains(if cfg!(target_arch = "aarch64") {
            "neon"
        } else {
            "sse4.2"
        }),
        "{features}"
    );
    assert!(out.contains("gpu devices:"), "{out}");
}

#[test]
fn devices_lists_the_cpu_and_a_missing_gpu_is_a_clear_error() {
    let (ok, out, err) = sdrs(&["devices"]);
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("cpu ")), "{out}");
    // A device index past the end names the backend and how many there are; a build
    // without Vulkan says how to get it.
    let (ok, _, err) = sdrs(&[
        "generate",
        "-p",
        "x",
        "--backend",
        "vulkan",
        "--device",
        "99",
    ]);
    assert!(!ok, "{err}");
    if sdrs::ggml::VULKAN_BUILT {
        assert!(
            err.contains("Vulkan")
                && (err.contains("no Vulkan device") || err.contains("did not load")),
            "{err}"
        );
    } else {
        assert!(
            err.contains("built without Vulkan") && err.contains("--features vulkan"),
            "{err}"
        );
    }
    let (ok, _, err) = sdrs(&["generate", "-p", "x", "--backend", "cuda"]);
    assert!(
        !ok && err.contains("cuda") && err.contains("vulkan"),
        "{err}"
    );
}

/// The prompt options on the built-in demo model: weights, BREAK, CLIP skip, an
/// embedding by file, and each mistake named.
#[test]
fn generate_takes_weighted_prompts_embeddings_and_clip_skip() {
    use sdrs::formats::safetensors::{write, WriteSpec};
    use sdrs::formats::DType;
    let dir = tempfile::tempdir().unwrap();
    // An A1111-style safetensors embedding (`emb_params`, 2 vectors) for the 64-wide demo encoder.
    let emb = dir.path().join("shiny-demo.safetensors");
    let values: Vec<f32> = (0..128).map(|i| ((i % 9) as f32 - 4.0) * 0.05).collect();
    let mut bytes = Vec::new();
    write(
        &mut bytes,
        &[WriteSpec {
            name: "emb_params".into(),
            shape: vec![2, 64],
            dtype: DType::F32,
        }],
        &Default::default(),
        |_, b| {
            b.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            Ok(())
        },
    )
    .unwrap();
    std::fs::write(&emb, bytes).unwrap();
    let out = dir.path().join("p.png");
    let (e, o) = (emb.to_str().unwrap(), out.to_str().unwrap());
    let prompt = "a (red:1.3) circle on a [blue] background BREAK shiny-demo";
    let (ok, _, err) = sdrs(&[
        "generate",
        "-p",
        prompt,
        "--embedding",
        e,
        "--clip-skip",
        "2",
        "--emphasis",
        "no-norm",
        "-o",
        o,
    ]);
    assert!(ok, "{err}");
    let png = std::fs::read(&out).unwrap();
    let text = String::from_utf8_lossy(&png);
    assert!(
        text.contains("Clip skip: 2") && text.contains("Emphasis: No norm"),
        "parameters lack the prompt options"
    );
    // A1111's record of the embedding: its trigger and the file's SHA-256, 12 digits.
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(std::fs::read(&emb).unwrap())
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        text.contains(&format!("TI hashes: \"shiny-demo: {hash}\"")),
        "no TI hash in the parameters"
    );
    for (args, needle) in [
        (vec!["--clip-skip", "3"], "CLIP skip 3 is out of range"),
        (vec!["--emphasis", "loud"], "unknown emphasis `loud`"),
        (
            vec!["--embedding", "/nonexistent/x.pt"],
            "/nonexistent/x.pt",
        ),
        (vec!["-p", "x <lora:mine:0.5>"], "--lora-dir"),
        (
            vec!["--lora", "/nonexistent/l.safetensors:0.5"],
            "/nonexistent/l.safetensors",
        ),
        (vec!["-p", "(x:1.2.3)"], "not a number"),
    ] {
        let mut all = vec!["generate", "-o", o];
        if args[0] != "-p" {
            all.extend(["-p", "x"]);
        }
        all.extend(args);
        let (ok, _, err) = sdrs(&all);
        assert!(!ok && err.contains(needle), "{all:?}: {err}");
    }
}
