//! ESRGAN-family upscalers against spandrel (`tools/reference/esrgan_fixtures.py`):
//! tiny random RRDBNets and a compact SRVGG network in the published file layouts
//! (Real-ESRGAN's `params_ema` `.pth`, the original ESRGAN names, safetensors).
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use sdrs::formats::Checkpoint;
use sdrs::model::esrgan::Arch;
use sdrs::pipeline::upscale::Upscaler;
use sdrs::pipeline::Image;

fn dir() -> PathBuf {
    sdrs::testdata::fixture("ref").join("esrgan")
}

fn golden() -> HashMap<String, Vec<f32>> {
    let ck = Checkpoint::open(&dir().join("golden.safetensors")).unwrap();
    ck.tensors
        .iter()
        .map(|t| (t.name.clone(), t.read_f32().unwrap()))
        .collect()
}

const FILES: [&str; 4] = [
    "rrdb-x4.pth",
    "rrdb-x2.pth",
    "esrgan-old-x4.pth",
    "compact-x4.safetensors",
];

#[test]
fn each_published_layout_is_recognised_and_upscales_as_spandrel_does() {
    let g = golden();
    let input = &g["input"];
    for f in FILES {
        let up = Upscaler::load(&dir().join(f), 2).unwrap();
        let want_arch = match f {
            "compact-x4.safetensors" => Arch::Compact {
                features: 8,
                convs: 3,
                scale: 4,
            },
            _ => Arch::Rrdb {
                features: 8,
                blocks: 1,
                grow: 32,
                unshuffle: if f == "rrdb-x2.pth" { 2 } else { 1 },
                doublings: 2,
            },
        };
        assert_eq!(up.arch, want_arch, "{f}");
        let got = up
            .upscale_planes(input, (24, 20), &mut |_, _| Ok(()))
            .unwrap();
        let stem = f.rsplit_once('.').unwrap().0;
        let want = &g[&format!("out.{stem}")];
        let e = rel_rms(want, &got);
        eprintln!("{f}: relative RMS error {e:.2e}");
        assert!(e <= 1e-4, "{f}: relative RMS error {e:.3e}");
    }
}

#[test]
fn upscalers_convert_to_self_describing_gguf_and_run_from_it_as_from_their_files() {
    let tmp = tempfile::tempdir().unwrap();
    let g = golden();
    let input = &g["input"];
    let bin = env!("CARGO_BIN_EXE_sdrs");
    for f in FILES {
        let stem = f.rsplit_once('.').unwrap().0;
        let want = &g[&format!("out.{stem}")];
        let from_file = Upscaler::load(&dir().join(f), 2).unwrap();
        // f32 keeps the numbers; q8_0 (the convolutions' matrices) stays close.
        for (ty, bound) in [("f32", 1e-4), ("q8_0", 5e-3)] {
            let out = tmp.path().join(format!("{stem}-{ty}.gguf"));
            let st = std::process::Command::new(bin)
                .args([
                    "convert",
                    dir().join(f).to_str().unwrap(),
                    "--type",
                    ty,
                    "-o",
                ])
                .arg(&out)
                .status()
                .unwrap();
            assert!(st.success(), "{f} {ty}");
            let g = sdrs::formats::gguf::GgufFile::open(&out).unwrap();
            assert_eq!(
                sdrs::formats::gguf::metadata::read_upscaler(&g)
                    .unwrap()
                    .as_ref(),
                Some(&from_file.arch),
                "{f}"
            );
            let up = Upscaler::load(&out, 2).unwrap();
            assert_eq!(up.arch, from_file.arch);
            let got = up
                .upscale_planes(input, (24, 20), &mut |_, _| Ok(()))
                .unwrap();
            let e = rel_rms(want, &got);
            eprintln!("{f} as {ty} GGUF: relative RMS error {e:.2e}");
            assert!(e <= bound, "{f} {ty}: {e:.3e}");
        }
    }
    // Neither kind of file passes for the other.
    let up = tmp.path().join("rrdb-x4-f32.gguf");
    let e = sdrs::pipeline::Pipeline::load(&up)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("an upscaler, not a model"), "{e}");
    let model = tmp.path().join("tiny.gguf");
    convert_to(
        &sdrs::testdata::fixture("ref").join("sd1/model"),
        sdrs::ggml::Type::F16,
        &model,
    )
    .unwrap();
    let e = Upscaler::load(&model, 1).err().unwrap().to_string();
    assert!(
        e.contains("tiny.gguf") && e.contains("not an upscaler"),
        "{e}"
    );
}

#[test]
fn tiles_cover_the_image_and_blend_close_to_the_whole_run() {
    // A 64x48 picture: smooth gradients with some texture, as photos are.
    let (w, h) = (64, 48);
    let input: Vec<f32> = (0..3 * w * h)
        .map(|i| {
            let (c, y, x) = (i / (w * h), i / w % h, i % w);
            let v = 0.5 + 0.3 * ((x as f32 * 0.21 + c as f32).sin() * (y as f32 * 0.13).cos());
            v + 0.05 * (((i * 7919) % 101) as f32 / 101.0 - 0.5)
        })
        .collect();
    // Bounds twice what random weights give (a random network's edge effects reach
    // far further than a trained one's); a misplaced tile would be off by O(1).
    for (f, bound) in [
        ("compact-x4.safetensors", 8e-3),
        ("rrdb-x4.pth", 3e-2),
        ("rrdb-x2.pth", 1.5e-1),
    ] {
        let mut up = Upscaler::load(&dir().join(f), 2).unwrap();
        let whole = up
            .upscale_planes(&input, (w, h), &mut |_, _| Ok(()))
            .unwrap();
        up.tile = 32;
        let mut tiles = 0;
        let got = up
            .upscale_planes(&input, (w, h), &mut |done, total| {
                tiles = total;
                assert!(done <= total);
                Ok(())
            })
            .unwrap();
        assert!(tiles >= 4, "{f}: {tiles} tiles");
        assert_eq!(got.len(), whole.len());
        let e = rel_rms(&whole, &got);
        eprintln!("{f} in {tiles} tiles of 32 pixels: relative RMS error {e:.2e}");
        // Tiles overlap by 16 pixels (x2: 8 folded units), blended linearly; every
        // network here reaches past a tile's edge, so tiles approach the whole run.
        assert!(
            e <= bound,
            "{f}: relative RMS error {e:.3e} over {bound:.0e}"
        );
    }
}

#[test]
fn an_image_upscales_with_its_parameters_and_odd_sides_are_padded() {
    let up = Upscaler::load(&dir().join("rrdb-x2.pth"), 2).unwrap();
    let image = Image {
        width: 7,
        height: 5,
        rgb: (0..7 * 5 * 3).map(|v| (v * 7 % 256) as u8).collect(),
        parameters: "Steps: 4".into(),
        timings: [0.0; 3],
    };
    let out = up.upscale(&image, 2, &mut |_, _| Ok(())).unwrap();
    assert_eq!((out.width, out.height), (28, 20));
    assert_eq!(out.rgb.len(), 28 * 20 * 3);
    assert!(
        out.parameters.starts_with("Steps: 4, ")
            && out.parameters.contains("Postprocess upscale by: 4"),
        "{}",
        out.parameters
    );
}

#[test]
fn files_that_are_not_upscalers_are_refused_naming_the_file() {
    let e = Upscaler::load(
        &sdrs::testdata::fixture("ref").join("esrgan/golden.safetensors"),
        1,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("golden.safetensors") && e.contains("not an ESRGAN-family upscaler"),
        "{e}"
    );
}

#[test]
fn a_memory_budget_shrinks_the_tile_and_one_too_small_is_refused() {
    let mut up = Upscaler::load(&dir().join("rrdb-x4.pth"), 1).unwrap();
    let size = (256, 256);
    let whole = up.need(size).unwrap();
    up.tile = 64;
    let small = up.need(size).unwrap();
    assert!(small.compute < whole.compute);
    // What a 64-pixel tile needs fits; the default tile's does not.
    up.tile = 192;
    up.fit(size, Some(sdrs::budget::OVERHEAD + small.total()))
        .unwrap();
    assert!(up.tile <= 64, "tile {}", up.tile);
    let e = up
        .fit(size, Some(sdrs::budget::OVERHEAD + small.weights))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot fit") && e.contains("smallest tile"),
        "{e}"
    );
}

#[test]
fn the_upscale_command_writes_the_larger_picture_and_plans_it() {
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small.png");
    let image = Image {
        width: 24,
        height: 16,
        rgb: (0..24 * 16 * 3).map(|v| (v * 5 % 256) as u8).collect(),
        parameters: String::new(),
        timings: [0.0; 3],
    };
    image.save_png(&small).unwrap();
    let model = dir().join("compact-x4.safetensors");
    let out = tmp.path().join("big.png");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdrs"))
            .arg("upscale")
            .arg(&small)
            .arg("-m")
            .arg(&model)
            .arg("-o")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&["--repeats", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let big = image::open(&out).unwrap();
    assert_eq!((big.width(), big.height()), (24 * 16, 16 * 16));
    let o = run(&["--plan"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("upscale 24x16 to 96x64") && text.contains("compute"),
        "{text}"
    );
    let o = run(&["--max-memory", "1M"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cannot fit"), "{err}");
}
