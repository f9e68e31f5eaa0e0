//! Encodes and decodes in overlapping tiles against whole runs: the real TAEF2 on a real
//! photo, and the tiny KL VAE of the reference fixtures; the error in the seam bands
//! against the error elsewhere; the pipeline's `vae_tiling`.
mod common;

use common::photo;
use sdrs::ggml::Backend;
use sdrs::model::tile::{TileStats, Tiling};
use sdrs::model::{taesd, vae, Planes, Weights};
use sdrs::pipeline::Decoding;

fn psnr(a: &[f32], b: &[f32], range: f32) -> f64 {
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * ((range as f64).powi(2) / mse.max(1e-20)).log10()
}

/// PSNR over pixels within `band` pixels of a tile seam, and over the rest.
fn seam_and_interior(
    a: &[f32],
    b: &[f32],
    (w, h): (usize, usize),
    t: Tiling,
    f: usize,
    band: usize,
    range: f32,
) -> (f64, f64) {
    let (lw, lh) = (w / f, h / f);
    let t = t.clamp(lw, lh);
    // Seams: the middle of each overlap, in pixels.
    let seams = |starts: Vec<usize>, tile: usize| -> Vec<usize> {
        starts
            .windows(2)
            .map(|s| ((s[1] + s[0] + tile) * f) / 2)
            .collect()
    };
    let (sx, sy) = (
        seams(Tiling::starts(lw, t.tile_w, t.overlap), t.tile_w),
        seams(Tiling::starts(lh, t.tile_h, t.overlap), t.tile_h),
    );
    let near = |p: usize, s: &[usize]| s.iter().any(|&c| p.abs_diff(c) <= band);
    let (mut seam, mut inner) = ((0f64, 0usize), (0f64, 0usize));
    for c in 0..a.len() / (w * h) {
        for y in 0..h {
            for x in 0..w {
                let i = (c * h + y) * w + x;
                let e = ((a[i] - b[i]) as f64).powi(2);
                let acc = if near(x, &sx) || near(y, &sy) {
                    &mut seam
                } else {
                    &mut inner
                };
                acc.0 += e;
                acc.1 += 1;
            }
        }
    }
    let db = |(s, n): (f64, usize)| {
        10.0 * ((range as f64).powi(2) / (s / n.max(1) as f64).max(1e-20)).log10()
    };
    (db(seam), db(inner))
}

#[test]
fn taef2_in_tiles_matches_the_whole_run_on_a_real_photo() {
    let backend = Backend::cpu(2).unwrap();
    let Some((enc, dec)) = common::taef2(&backend) else {
        return;
    };
    let (x, w, h) = photo("astronaut.png", Some((384, 320)));
    let t = Tiling::square(20, 10);
    let z = taesd::encode(&enc, Planes::single(&x, w, h), &backend).unwrap();
    let zt = taesd::encode_tiled(&enc, Planes::single(&x, w, h), t, &backend).unwrap();
    let y = taesd::decode(&dec, Planes::single(&z, w / 8, h / 8), &backend).unwrap();
    let yt = taesd::decode_tiled(&dec, Planes::single(&z, w / 8, h / 8), t, &backend).unwrap();
    let ytt = taesd::decode(&dec, Planes::single(&zt, w / 8, h / 8), &backend).unwrap();
    assert!(t.tiles(w / 8, h / 8) >= 4);
    let (pd, pe) = (psnr(&y, &yt, 1.0), psnr(&y, &ytt, 1.0));
    let (seam, inner) = seam_and_interior(&y, &yt, (w, h), t, 8, 8, 1.0);
    eprintln!("TAEF2 {w}x{h}, {} tiles of 20 latents (overlap 10): decode {pd:.1} dB, encode {pe:.1} dB; decode seam bands {seam:.1} dB, elsewhere {inner:.1} dB", t.tiles(w / 8, h / 8));
    assert!(
        pd >= 40.0 && pe >= 40.0,
        "decode {pd:.1} dB, encode {pe:.1} dB"
    );
    assert!(seam >= 40.0, "seams {seam:.1} dB");
}

/// The tiny KL VAE of the reference fixtures, converted to `ty` (for quantized types
/// its kernels are bf16, as in every converted model), and a real photo (192x160):
/// `check` gets the weights, the config, the photo in [-1, 1] and its latents, and the
/// whole decode.
fn with_tiny_vae(
    ty: sdrs::ggml::Type,
    check: impl FnOnce(&Weights<'_>, &sdrs::config::VaeConfig, &[f32], &[f32], &[f32]),
) {
    let fixtures = sdrs::testdata::fixture("ref");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    common::convert_to(&fixtures.join("sd1/model"), ty, &path).unwrap();
    let gguf = sdrs::formats::gguf::GgufFile::open(&path).unwrap();
    let cfg = sdrs::formats::gguf::metadata::read_config(&gguf)
        .unwrap()
        .unwrap()
        .vae
        .unwrap();
    let w8 = Weights::load(&gguf, |n| n.starts_with("first_stage_model.")).unwrap();
    let (x, w, h) = photo("chelsea.png", Some((192, 160)));
    assert_eq!((w, h), (KL_W, KL_H));
    let pm1: Vec<f32> = x.iter().map(|v| v * 2.0 - 1.0).collect();
    let backend = Backend::cpu(2).unwrap();
    let f = cfg.downscale();
    let z = vae::encode(&w8, &cfg, Planes::single(&pm1, w, h), &backend).unwrap();
    let y = vae::decode(&w8, &cfg, Planes::single(&z, w / f, h / f), &backend).unwrap();
    check(&w8, &cfg, &pm1, &z, &y);
}

const KL_W: usize = 192;
const KL_H: usize = 160;

#[test]
fn tiny_kl_vae_decoded_in_bands_with_the_image_statistics_equals_the_whole_run() {
    // bf16 kernels: their inputs are rounded to bf16, so any last-bit difference
    // upstream would show (and grow over the layers).
    with_tiny_vae(sdrs::ggml::Type::Q8_0, |w8, cfg, pm1, z, y| {
        let backend = Backend::cpu(2).unwrap();
        let (w, h, f) = (KL_W, KL_H, cfg.downscale());
        let (lw, lh) = (w / f, h / f);
        // Bands of 6 latents (of 80: as many bands as the passes' halos leave room
        // for), with every checkpoint kept, with none (each pass from the mid block's
        // output), and with room for the low-resolution ones only.
        let band = Tiling {
            tile_w: lw,
            tile_h: 6,
            overlap: 0,
        };
        let full = 4 * (64 * w * h) as u64;
        for keep in [None, Some(0), Some(full / 4), Some(full)] {
            let mut runs = (0, 0);
            let yt = vae::decode_tiled(
                w8,
                cfg,
                Planes::single(z, lw, lh),
                band,
                TileStats::Image,
                keep,
                &backend,
                &mut |done, total| {
                    runs = (done, total);
                    Ok(())
                },
            )
            .unwrap();
            assert!(runs.0 == runs.1 && runs.1 > 20, "{runs:?} band runs");
            let worst = y
                .iter()
                .zip(&yt)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let p = psnr(y, &yt, 2.0);
            eprintln!("tiny KL VAE {w}x{h} in bands of 6 latents, checkpoints {keep:?}: {} band runs, {p:.1} dB from the whole decode, largest difference {worst:e}", runs.1);
            // To rounding: the statistics' f64 sums (over bands, against one pass) round
            // to the same f32 values, but the Winograd convolutions' 4x4 tiles fall
            // differently in a band, so their f32 rounding differs (95.9 dB measured;
            // bit for bit before them).
            assert!(
                p > 80.0 && worst < 1e-2,
                "checkpoints {keep:?}: {p:.1} dB, largest difference {worst:e}"
            );
        }
        // Encoding: the draw with zero noise is the distribution's mean, in UNet space.
        let t = Tiling::square(32, 16);
        assert!(t.tiles(lw, lh) >= 4);
        let zero = vec![0f32; z.len()];
        let zw =
            vae::encode_sample(w8, cfg, Planes::single(pm1, w, h), &zero, None, &backend).unwrap();
        let zt = vae::encode_sample(
            w8,
            cfg,
            Planes::single(pm1, w, h),
            &zero,
            Some((t, TileStats::Image)),
            &backend,
        )
        .unwrap();
        let range = zw.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
        let pe = psnr(&zw, &zt, range);
        eprintln!("tiny KL VAE {w}x{h}, encode in {} tiles of 32 latents (overlap 16), image statistics: {pe:.1} dB", t.tiles(lw, lh));
        assert!(pe >= 40.0, "encode {pe:.1} dB");
    });
}

#[test]
fn tiny_kl_vae_in_tiles_with_their_own_statistics_is_near_the_whole_run_without_seams() {
    with_tiny_vae(sdrs::ggml::Type::F32, |w8, cfg, _, z, y| {
        let backend = Backend::cpu(2).unwrap();
        let (w, h, f) = (KL_W, KL_H, cfg.downscale());
        let t = Tiling::square(40, 16);
        let yt = vae::decode_tiled(
            w8,
            cfg,
            Planes::single(z, w / f, h / f),
            t,
            TileStats::Tile,
            None,
            &backend,
            &mut sdrs::model::tile::no_tick,
        )
        .unwrap();
        let p = psnr(y, &yt, 2.0);
        let (seam, inner) = seam_and_interior(y, &yt, (w, h), t, f, 4, 2.0);
        eprintln!("tiny KL VAE {w}x{h}, {} tiles of 40 latents (overlap 16), tile statistics: {p:.1} dB; seam bands {seam:.1} dB, elsewhere {inner:.1} dB", t.tiles(w / f, h / f));
        // Every GroupNorm and the mid-block attention see a tile, not the image: with this
        // random tiny VAE (whose statistics vary far more across an image than a trained
        // one's) a tile is only near the whole decode (16.9 dB). What blending must not
        // add is seams: the error at the seams is the error elsewhere.
        assert!(p >= 15.0, "{p:.1} dB");
        assert!(
            (seam - inner).abs() <= 2.0,
            "seams {seam:.1} dB against {inner:.1} dB elsewhere"
        );
    });
}

#[test]
fn vae_tiling_requests_cut_larger_images_and_plan_a_flat_compute_buffer() {
    use sdrs::pipeline::{Pipeline, Request, FORCED_TILE};
    let pipe = Pipeline::demo(2).unwrap();
    let plan = |side: usize, tiling: bool, stats: TileStats| {
        let req = Request {
            width: side,
            height: side,
            decoding: Decoding {
                vae_tiling: tiling,
                vae_tile_stats: stats,
                ..pipe.request("a red circle").decoding
            },
            ..pipe.request("a red circle")
        };
        let p = pipe.plan(&req).unwrap();
        let d = p
            .needs
            .iter()
            .find(|n| n.stage == "decode")
            .unwrap()
            .clone();
        (p.tiling, d.compute, d.other)
    };
    // At or under the tile (64 latents = 512 px for an 8x VAE) nothing is cut.
    let f = 512 / FORCED_TILE.tile_w;
    let small = FORCED_TILE.tile_w * f;
    let (_, whole, _) = plan(4 * small, false, TileStats::Image);
    for stats in [TileStats::Tile, TileStats::Image] {
        assert_eq!(plan(small, true, stats).0, None);
        let (t1, c1, o1) = plan(2 * small, true, stats);
        let (t2, c2, o2) = plan(4 * small, true, stats);
        eprintln!(
            "{stats:?}: decode compute buffer {} MiB at {}² ({t1:?}, buffers {} MiB) and {} MiB at {}² ({t2:?}, buffers {} MiB); {} MiB whole at {}²",
            c1 >> 20,
            2 * small,
            o1 >> 20,
            c2 >> 20,
            4 * small,
            o2 >> 20,
            whole >> 20,
            4 * small
        );
        match stats {
            // Tiles of the forced size.
            TileStats::Tile => {
                assert_eq!((t1, t2), (Some(FORCED_TILE), Some(FORCED_TILE)));
                assert_eq!(c1, c2);
            }
            // Full-width bands of about a tile's area; the checkpoints kept within a
            // tile's whole decode.
            TileStats::Image => {
                let (t1, t2) = (t1.unwrap(), t2.unwrap());
                assert_eq!((t1.tile_w, t2.tile_w), (2 * small / f, 4 * small / f));
                assert_eq!(t1.tile_w * t1.tile_h, t2.tile_w * t2.tile_h);
                assert!(c2 as f64 <= 1.5 * c1 as f64, "{c1} then {c2}");
            }
        }
        assert!(whole > 4 * c2);
    }
}
