//! `sdrs generate` as people used to stable-diffusion.cpp, A1111 and ComfyUI run it:
//! their files, their spellings, their seeds and output habits.
mod common;

use std::path::Path;
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

/// `m.safetensors` (`sdrs synth tiny-sd15 --seed 3`) and its f16 `m.gguf` in `dir`.
fn tiny_sd15(dir: &Path) {
    let d = |n: &str| dir.join(n).to_str().unwrap().to_string();
    run(&[
        "synth",
        "tiny-sd15",
        "--seed",
        "3",
        "-o",
        &d("m.safetensors"),
    ]);
    run(&[
        "convert",
        &d("m.safetensors"),
        "--type",
        "f16",
        "-o",
        &d("m.gguf"),
    ]);
}

fn run(args: &[&str]) -> String {
    let (ok, _, err) = sdrs(args);
    assert!(ok, "{args:?}: {err}");
    err
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
        .into_raw()
}

/// The PNG's `parameters`, from a tEXt or an iTXt chunk.
fn parameters(path: &Path) -> String {
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()))
        .read_info()
        .unwrap();
    let info = reader.info();
    let latin1 = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone());
    latin1
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|t| t.keyword == "parameters")
                .map(|t| t.get_text().unwrap())
        })
        .expect("no parameters")
}

/// Whether `text` is in the file as UTF-16BE (an EXIF UserComment, as A1111 writes it).
fn has_utf16(path: &Path, text: &str) -> bool {
    let want: Vec<u8> = text.encode_utf16().flat_map(|u| u.to_be_bytes()).collect();
    std::fs::read(path)
        .unwrap()
        .windows(want.len())
        .any(|w| w == want)
}

#[test]
fn checkpoints_and_diffusers_folders_run_directly_as_their_converted_gguf_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    tiny_sd15(dir.path());
    let folder = d("folder");
    run(&[
        "synth",
        "tiny-sd15",
        "--seed",
        "3",
        "--format",
        "diffusers",
        "-o",
        &folder,
    ]);
    let args = |m: &str, o: &str| {
        vec![
            "generate".to_string(),
            "-m".into(),
            m.into(),
            "-p".into(),
            "a red circle".into(),
            "-W".into(),
            "64".into(),
            "-H".into(),
            "64".into(),
            "--steps".into(),
            "2".into(),
            "-o".into(),
            o.into(),
        ]
    };
    let call = |m: &str, o: &str| {
        let a = args(m, o);
        run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    call(&d("m.gguf"), &d("gguf.png"));
    let err = call(&d("m.safetensors"), &d("st.png"));
    assert!(
        err.contains("is not a GGUF") && err.contains("sdrs convert"),
        "a one-line hint: {err}"
    );
    call(&d("folder"), &d("folder.png"));
    let want = pixels(&dir.path().join("gguf.png"));
    assert_eq!(
        pixels(&dir.path().join("st.png")),
        want,
        "safetensors run directly"
    );
    assert_eq!(
        pixels(&dir.path().join("folder.png")),
        want,
        "diffusers folder run directly"
    );
    // The infotext names the file the user gave, not the temporary conversion.
    assert!(
        parameters(&dir.path().join("st.png")).contains("Model: m,"),
        "{}",
        parameters(&dir.path().join("st.png"))
    );
}

#[test]
fn a_stable_diffusion_cpp_gguf_runs_from_the_command_line() {
    let Some(file) = common::external("fixtures/sdcpp-gguf/runnable/tiny-sd15-sdcpp-q8_0.gguf")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("peer.png");
    run(&[
        "generate",
        "-m",
        file.to_str().unwrap(),
        "-p",
        "a red circle",
        "-W",
        "64",
        "-H",
        "64",
        "--steps",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(pixels(&out).len(), 64 * 64 * 3);
}

#[test]
fn prompts_beyond_latin1_keep_their_image_and_their_text() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "a red circle — on a “blue” background 猫 🐈";
    for name in ["u.png", "u.jpg", "u.webp"] {
        let out = dir.path().join(name);
        run(&["generate", "-p", prompt, "-o", out.to_str().unwrap()]);
        assert_eq!(pixels(&out).len(), 64 * 64 * 3, "{name}");
        if name.ends_with("png") {
            assert!(parameters(&out).starts_with(prompt), "{}", parameters(&out));
        } else {
            assert!(
                has_utf16(&out, prompt),
                "{name}: no UTF-16 prompt in its EXIF"
            );
        }
    }
}

#[test]
fn a_random_seed_is_printed_and_a_batch_counts_seeds_up_into_numbered_files() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("img-%02d.png");
    let err = run(&[
        "generate",
        "-p",
        "a blue square",
        "-s",
        "-1",
        "-b",
        "2",
        "-o",
        pattern.to_str().unwrap(),
    ]);
    let seed: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("seed "))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no seed printed: {err}"));
    assert!(seed < 1 << 32, "A1111 takes seeds below 2^32");
    let (a, b) = (dir.path().join("img-01.png"), dir.path().join("img-02.png"));
    assert!(
        parameters(&a).contains(&format!("Seed: {seed},")),
        "{}",
        parameters(&a)
    );
    assert!(
        parameters(&b).contains(&format!("Seed: {},", seed + 1)),
        "{}",
        parameters(&b)
    );
    assert_ne!(pixels(&a), pixels(&b));
    // Without a pattern the second image gets a suffix; -s N reproduces image N.
    let plain = dir.path().join("x.jpg");
    run(&[
        "generate",
        "-p",
        "a blue square",
        "-s",
        &(seed + 1).to_string(),
        "-b",
        "2",
        "-o",
        plain.to_str().unwrap(),
        "--quality",
        "95",
    ]);
    assert!(plain.exists() && dir.path().join("x_2.jpg").exists());
    assert!(has_utf16(&plain, &format!("Seed: {},", seed + 1)));
    let (ok, _, err) = sdrs(&["generate", "-p", "x", "-s", "-5"]);
    assert!(!ok && err.contains("-1 for a random one"), "{err}");
}

#[test]
fn options_are_checked_before_the_model_loads_and_help_lists_their_values() {
    let missing = "/nonexistent/model.gguf";
    for (args, needle) in [
        (vec!["--sampler", "nope"], "unknown sampler `nope`"),
        (vec!["--scheduler", "wavy"], "unknown scheduler `wavy`"),
        (vec!["--rng", "dice"], "unknown rng `dice`"),
        (vec!["-o", "out.gif"], "out.gif"),
        (vec!["--quality", "0"], "--quality"),
        (vec!["--preset", "turbo-xxl"], "unknown preset"),
    ] {
        let mut all = vec!["generate", "-m", missing, "-p", "x"];
        all.extend(args);
        let (ok, _, err) = sdrs(&all);
        assert!(
            !ok && err.contains(needle) && !err.contains(missing),
            "{all:?}: {err}"
        );
    }
    let (ok, help, _) = sdrs(&["generate", "--help"]);
    assert!(ok);
    for needle in [
        "euler_a",
        "dpm++2m",
        "karras",
        "sgm_uniform",
        "cuda",
        "no-norm",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn the_peers_a1111s_and_comfyuis_spellings_run_the_same_sampler() {
    let dir = tempfile::tempdir().unwrap();
    let out = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let base = ["generate", "-p", "a green triangle", "--steps", "3"];
    let with = |extra: &[&str], o: &str| {
        let mut a = base.to_vec();
        a.extend(extra.iter().copied());
        a.extend(["-o", o]);
        run(&a)
    };
    with(&["--sampler", "DPM++ 2M Karras"], &out("a1111.png"));
    with(
        &["--sampling-method", "dpmpp_2m", "--scheduler", "Karras"],
        &out("comfy.png"),
    );
    with(
        &["--sampler", "dpm++2m", "--schedule", "karras"],
        &out("sdrs.png"),
    );
    let a = pixels(Path::new(&out("a1111.png")));
    assert_eq!(a, pixels(Path::new(&out("comfy.png"))));
    assert_eq!(a, pixels(Path::new(&out("sdrs.png"))));
    let p = parameters(Path::new(&out("a1111.png")));
    assert!(
        p.contains("Sampler: DPM++ 2M, Schedule type: Karras") && p.contains("RNG: CPU"),
        "{p}"
    );
    with(
        &["--sampler", "euler_ancestral", "--rng", "cuda"],
        &out("cuda.png"),
    );
    assert!(
        parameters(Path::new(&out("cuda.png"))).contains("Sampler: Euler a, CFG")
            && parameters(Path::new(&out("cuda.png"))).contains("RNG: NV")
    );
}

#[test]
fn a_vae_of_its_own_replaces_the_models_in_either_naming() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    // Same seed, f32: the model's own VAE and its copies in other files are equal.
    run(&[
        "synth",
        "tiny-sd15",
        "--seed",
        "4",
        "--type",
        "f32",
        "--format",
        "diffusers",
        "-o",
        &d("folder"),
    ]);
    run(&["convert", &d("folder"), "--type", "f32", "-o", &d("m.gguf")]);
    // The original naming without the `first_stage_model.` prefix, as vae-ft-mse files are.
    let ck = sdrs::formats::Checkpoint::open(Path::new(&d("folder"))).unwrap();
    let vae: Vec<_> = ck
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("first_stage_model."))
        .collect();
    let specs: Vec<_> = vae
        .iter()
        .map(|t| sdrs::formats::safetensors::WriteSpec {
            name: t.name["first_stage_model.".len()..].to_string(),
            shape: t.shape.clone(),
            dtype: sdrs::formats::DType::F32,
        })
        .collect();
    let mut bytes = Vec::new();
    sdrs::formats::safetensors::write(&mut bytes, &specs, &Default::default(), |i, b| {
        b.extend(vae[i].read_f32()?.iter().flat_map(|v| v.to_le_bytes()));
        Ok(())
    })
    .unwrap();
    std::fs::write(d("vae.safetensors"), bytes).unwrap();
    let model = d("m.gguf");
    let draw = |extra: &[&str], o: &str| {
        let mut a = vec![
            "generate", "-m", &model, "-p", "a cat", "-W", "64", "-H", "64", "--steps", "2",
        ];
        a.extend(extra.iter().copied());
        let o = d(o);
        a.extend(["-o", &o]);
        run(&a);
        pixels(Path::new(&o))
    };
    let own = draw(&[], "own.png");
    assert_eq!(
        draw(&["--vae", &d("folder/vae")], "diffusers.png"),
        own,
        "a diffusers vae/ folder"
    );
    assert_eq!(
        draw(&["--vae", &d("vae.safetensors")], "ldm.png"),
        own,
        "an original-naming file"
    );
    let (ok, _, err) = sdrs(&[
        "generate",
        "-m",
        &d("m.gguf"),
        "-p",
        "x",
        "--vae",
        &d("folder/unet"),
        "-o",
        &d("no.png"),
    ]);
    assert!(!ok && err.contains("not a VAE for this model"), "{err}");
}

#[test]
fn a_second_lora_multiplier_weighs_the_unet_and_the_infotext_names_the_lora_by_hash() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    tiny_sd15(dir.path());
    std::fs::create_dir(d("loras")).unwrap();
    // Adapts only the UNet's cross-attention keys: the text-encoder multiplier has nothing to weigh.
    common::kohya_lora_for(
        Path::new(&d("m.safetensors")),
        Path::new(&d("loras/mine.safetensors")),
    );
    let draw = |tag: &str, o: &str| {
        let o = d(o);
        run(&[
            "generate",
            "-m",
            &d("m.gguf"),
            "-p",
            &format!("a cat {tag}"),
            "--lora-dir",
            &d("loras"),
            "-W",
            "64",
            "-H",
            "64",
            "--steps",
            "2",
            "-o",
            &o,
        ]);
        (pixels(Path::new(&o)), parameters(Path::new(&o)))
    };
    let (a, text) = draw("<lora:mine:0.5:3>", "a.png");
    let (b, _) = draw("<lora:mine:0.1:3>", "b.png");
    let (c, _) = draw("<lora:mine:3>", "c.png");
    let (e, _) = draw("<lora:mine:3:0.5>", "e.png");
    assert_eq!(a, b, "the text-encoder multiplier weighs no UNet branch");
    assert_eq!(a, c, "one number weighs both");
    assert_ne!(a, e, "the second number weighs the UNet's branches");
    let hash = text
        .split("Lora hashes: \"mine: ")
        .nth(1)
        .map(|s| &s[..12])
        .unwrap_or_else(|| panic!("{text}"));
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()), "{text}");
}

#[test]
fn step_previews_show_the_image_forming_and_the_last_one_is_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    // The demo model's own latent space: previews through its VAE, the last one exact.
    run(&[
        "generate",
        "-p",
        "a red circle on a blue background",
        "--preview",
        &d("p.png"),
        "-o",
        &d("out.png"),
    ]);
    assert_eq!(
        pixels(Path::new(&d("p.png"))),
        pixels(Path::new(&d("out.png")))
    );
    // SD's latent space: the linear projection, at the output's size.
    tiny_sd15(dir.path());
    run(&[
        "generate",
        "-m",
        &d("m.gguf"),
        "-p",
        "x",
        "-W",
        "128",
        "-H",
        "64",
        "--steps",
        "3",
        "--preview",
        &d("p.jpg"),
        "--preview-every",
        "2",
        "-o",
        &d("m.png"),
    ]);
    let p = image::open(d("p.jpg")).unwrap();
    assert_eq!((p.width(), p.height()), (128, 64));
    // Every N steps and after the last: steps 2, 4 and 5 of 5.
    let pipe = sdrs::pipeline::Pipeline::demo(2).unwrap();
    let req = sdrs::pipeline::Request {
        steps: 5,
        decoding: sdrs::pipeline::Decoding {
            preview_every: 2,
            ..Default::default()
        },
        ..pipe.request("a green square")
    };
    let mut seen = Vec::new();
    pipe.generate(&req, &mut |s| {
        if let sdrs::pipeline::Stage::Preview { done, total, image } = s {
            assert_eq!((total, image.width, image.height), (5, 64, 64));
            seen.push(done);
        }
    })
    .unwrap();
    assert_eq!(seen, vec![2, 4, 5]);
}
