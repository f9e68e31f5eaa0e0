//! Processes killed mid-write: `sdrs convert` (plain and with a merged LoRA) and `sdrs generate` stopped with SIGKILL
//! at random moments leave at their target either nothing or the whole file, and never
//! touch their input. A kill can leave only the hidden staging file beside the target
//! (`.NAME.XXXXXX.tmp`), which the killed process had no chance to remove.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sdrs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sdrs"));
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// Deterministic delays spread over `0..span` (a fixed-seed generator: the schedule
/// repeats, the moments the kills land at do not).
fn delays(n: usize, span: Duration) -> Vec<Duration> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            span.mul_f64((s >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect()
}

/// What one killed run left: whether the target exists, and the names beside it that are
/// neither the target nor the input.
fn leftovers(dir: &Path, keep: &[&Path]) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !keep.contains(&p.as_path()))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Where and how [`kill_trials`] kills: `n` runs in `dir`, each writing a `.ext`
/// target, killed at delays spread over `span`; `inputs` must keep their bytes.
struct Trials<'a> {
    dir: &'a Path,
    inputs: &'a [&'a Path],
    ext: &'a str,
    span: Duration,
    n: usize,
}

/// Runs `args` (which write the `.ext` target it is given) killed after each delay;
/// checks every outcome against `whole` (what an uninterrupted run wrote, at
/// `whole.ext`) with `same`, and that every file of `inputs` kept its bytes. Returns how many runs were
/// killed before their target appeared, and how many of those after writing had begun
/// (a staging file left).
fn kill_trials(
    trials: &Trials<'_>,
    args: impl Fn(&Path) -> Vec<String>,
    whole: &[u8],
    same: impl Fn(&[u8], &[u8]) -> bool,
) -> (usize, usize) {
    let Trials {
        dir,
        inputs,
        ext,
        span,
        n,
    } = *trials;
    let original: Vec<Vec<u8>> = inputs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let (mut cut_short, mut mid_write) = (0, 0);
    for (i, delay) in delays(n, span).into_iter().enumerate() {
        let target = dir.join(format!("out{i}.{ext}"));
        let mut child = sdrs().args(args(&target)).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL; an error means it had already exited.
        child.wait().unwrap();
        if target.exists() {
            let got = std::fs::read(&target).unwrap();
            assert!(
                same(&got, whole),
                "trial {i} (killed after {delay:?}): {} is not the complete output",
                target.display()
            );
            std::fs::remove_file(&target).unwrap();
        } else {
            cut_short += 1;
        }
        let whole_path = dir.join(format!("whole.{ext}"));
        let keep: Vec<&Path> = inputs
            .iter()
            .copied()
            .chain([whole_path.as_path()])
            .collect();
        for name in leftovers(dir, &keep) {
            let stem = target.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                name.starts_with(&format!(".{stem}.")) && name.ends_with(".tmp"),
                "trial {i}: `{name}` left beside the target"
            );
            std::fs::remove_file(dir.join(&name)).unwrap();
            mid_write += 1;
        }
        for (p, o) in inputs.iter().zip(&original) {
            assert!(
                &std::fs::read(p).unwrap() == o,
                "trial {i}: the input {} changed",
                p.display()
            );
        }
    }
    (cut_short, mid_write)
}

#[test]
fn conversions_killed_at_random_moments_leave_the_whole_file_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in.safetensors");
    assert!(sdrs()
        .args(["synth", "tiny-sdxl", "--type", "f32", "-o"])
        .arg(&input)
        .status()
        .unwrap()
        .success());
    let convert = |out: &Path| -> Vec<String> {
        [
            "convert",
            input.to_str().unwrap(),
            "--type",
            "q4_K",
            "-o",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let whole_path: PathBuf = d.join("whole.gguf");
    let t0 = Instant::now();
    assert!(sdrs()
        .args(convert(&whole_path))
        .status()
        .unwrap()
        .success());
    let took = t0.elapsed();
    let whole = std::fs::read(&whole_path).unwrap();
    // Conversion is deterministic, so a finished target equals the uninterrupted one.
    let (killed, mid_write) = kill_trials(
        &Trials {
            dir: d,
            inputs: &[&input],
            ext: "gguf",
            span: took.mul_f64(1.2),
            n: 20,
        },
        convert,
        &whole,
        |a, b| a == b,
    );
    eprintln!("20 conversions of {} MB killed within {:?}: {killed} before the target appeared, {mid_write} of them after writing began", whole.len() >> 20, took.mul_f64(1.2));
    assert!(
        mid_write >= 3,
        "only {mid_write} of 20 kills landed while the output was being written"
    );
}

/// The same with a LoRA merged into the weights (`--lora`): the output is still the
/// whole merged file or nothing, and neither the checkpoint nor the LoRA changes.
#[test]
fn merged_lora_conversions_killed_at_random_moments_leave_the_whole_file_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in.safetensors");
    assert!(sdrs()
        .args(["synth", "tiny-sd15", "--type", "f32", "-o"])
        .arg(&input)
        .status()
        .unwrap()
        .success());
    let lora = d.join("style.safetensors");
    common::kohya_lora_for(&input, &lora);
    let lora_arg = format!("{}:0.7", lora.display());
    let convert = |out: &Path| -> Vec<String> {
        [
            "convert",
            input.to_str().unwrap(),
            "--type",
            "q4_K",
            "--lora",
            &lora_arg,
            "-o",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let whole_path: PathBuf = d.join("whole.gguf");
    let t0 = Instant::now();
    let o = sdrs()
        .args(convert(&whole_path))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let took = t0.elapsed();
    let whole = std::fs::read(&whole_path).unwrap();
    let merged = sdrs::formats::gguf::GgufFile::open(&whole_path)
        .unwrap()
        .get("sd.lora.merged")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    assert_eq!(merged.as_deref(), Some("style.safetensors:0.7"));
    let (killed, mid_write) = kill_trials(
        &Trials {
            dir: d,
            inputs: &[&input, &lora],
            ext: "gguf",
            span: took.mul_f64(1.2),
            n: 10,
        },
        convert,
        &whole,
        |a, b| a == b,
    );
    eprintln!("10 merged conversions killed within {:?}: {killed} before the target appeared, {mid_write} of them after writing began", took.mul_f64(1.2));
    assert!(
        killed >= 2,
        "only {killed} of 10 kills landed before the end"
    );
}

#[test]
fn generations_killed_at_random_moments_leave_a_whole_png_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The built-in demo model: no input file.
    let generate = |out: &Path| -> Vec<String> {
        [
            "generate",
            "-p",
            "a red circle",
            "-W",
            "256",
            "-H",
            "256",
            "--steps",
            "4",
            "-o",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let whole_path = d.join("whole.png");
    // The kills are spread over a run's length: the shorter of two runs, so that one
    // slowed by the tests beside it does not spread them past the end of most trials.
    let mut took = Duration::MAX;
    for _ in 0..2 {
        let t0 = Instant::now();
        assert!(sdrs()
            .args(generate(&whole_path))
            .status()
            .unwrap()
            .success());
        took = took.min(t0.elapsed());
    }
    let whole = std::fs::read(&whole_path).unwrap();
    let pixels = |png: &[u8]| -> Vec<u8> {
        image::load_from_memory(png)
            .expect("a whole, decodable PNG")
            .to_rgb8()
            .into_raw()
    };
    let (killed, _) = kill_trials(
        &Trials {
            dir: d,
            inputs: &[],
            ext: "png",
            span: took.mul_f64(1.2),
            n: 10,
        },
        generate,
        &whole,
        |a, b| pixels(a) == pixels(b),
    );
    eprintln!(
        "10 generations killed within {:?}: {killed} before the image appeared",
        took.mul_f64(1.2)
    );
    assert!(
        killed >= 3,
        "only {killed} of 10 kills landed before the end"
    );
}

#[test]
fn a_model_file_truncated_while_mapped_is_an_error_not_a_crash() {
    use sdrs::pipeline::{Pipeline, Request};
    let dir = tempfile::tempdir().unwrap();
    let (input, model) = (dir.path().join("in.safetensors"), dir.path().join("m.gguf"));
    assert!(sdrs()
        .args(["synth", "tiny-sd15", "-o"])
        .arg(&input)
        .status()
        .unwrap()
        .success());
    assert!(sdrs()
        .args(["convert", "--type", "f16", "-o"])
        .arg(&model)
        .arg(&input)
        .status()
        .unwrap()
        .success());
    let pipe = Pipeline::load_with_threads(&model, 2).unwrap();
    let req = Request {
        steps: 2,
        ..pipe.request("a red circle")
    };
    let req = Request {
        width: req.width.min(128),
        height: req.height.min(128),
        ..req
    };
    let before = pipe.generate(&req, &mut |_| {}).unwrap();
    // Another process shrinks the file to half: the weights past that are gone from the
    // mapping, and reading them raises SIGBUS.
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    for _ in 0..2 {
        let e = pipe.generate(&req, &mut |_| {}).unwrap_err().to_string();
        assert!(
            e.contains("m.gguf") && e.contains("truncated or rewritten while in use"),
            "{e}"
        );
    }
    // A model reopened from the whole file again works.
    assert!(sdrs()
        .args(["convert", "--force", "--type", "f16", "-o"])
        .arg(&model)
        .arg(&input)
        .status()
        .unwrap()
        .success());
    let again = Pipeline::load_with_threads(&model, 2)
        .unwrap()
        .generate(&req, &mut |_| {})
        .unwrap();
    assert_eq!(again.rgb, before.rgb);
}

/// Image outputs and LoRA-merged conversions on a full disk, and into a path whose
/// folder is a file: each fails naming its target and the cause, and leaves nothing.
#[test]
fn image_and_merged_outputs_on_a_full_disk_or_a_bad_path_fail_naming_them_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| -> (bool, String) {
        let o = Command::new(env!("CARGO_BIN_EXE_sdrs"))
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // Into a "folder" that is a file.
    let file = d.join("plain");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("out.png");
    let (ok, err) = run(&[
        "generate",
        "-p",
        "a red circle",
        "--steps",
        "1",
        "-o",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("plain/out.png"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    let Some(mnt) = common::small_disk(d, "small", "4k") else {
        return;
    };
    // A 512² PNG of the demo model is tens of kilobytes: more than the one 4 KiB page.
    let png = mnt.join("full.png");
    let (ok, err) = run(&[
        "generate",
        "-p",
        "a red circle",
        "-W",
        "512",
        "-H",
        "512",
        "--steps",
        "1",
        "-o",
        png.to_str().unwrap(),
    ]);
    let png_left = std::fs::read_dir(&mnt).unwrap().count();
    // A LoRA-merged conversion to the same full disk.
    let input = d.join("in.safetensors");
    assert!(sdrs()
        .args(["synth", "tiny-sd15", "--type", "f16", "-o"])
        .arg(&input)
        .status()
        .unwrap()
        .success());
    let lora = d.join("style.safetensors");
    common::kohya_lora_for(&input, &lora);
    let gguf = mnt.join("merged.gguf");
    let (ok2, err2) = run(&[
        "convert",
        input.to_str().unwrap(),
        "--type",
        "q8_0",
        "--lora",
        lora.to_str().unwrap(),
        "-o",
        gguf.to_str().unwrap(),
    ]);
    let left = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(
        !ok && err.contains("full.png") && err.contains("No space left"),
        "{err}"
    );
    assert_eq!(png_left, 0, "the PNG left something on the full disk");
    assert!(
        !ok2 && err2.contains("merged.gguf") && err2.contains("No space left"),
        "{err2}"
    );
    assert!(left.is_empty(), "{left:?}");
}
