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

/// The tiny KL VAE of the reference fixtures and a real photo (192x160): `check` gets
/// the weights, the config, the photo in [-1, 1] and its latents, and the whole decode.
fn with_tiny_vae(
    check: impl FnOnce(&Weights<'_>, &sdrs::config::VaeConfig, &[f32], &[f32], &[f32]),
) {
    let fixtures = sdrs::testdata::fixture("ref");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    common::convert_to(&fixtures.join("sd1/model"), sdrs::ggml::Type::F32, &path).unwrap();
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
fn tiny_kl_vae_in_tiles_with_the_image_statistics_equals_the_whole_run() {
    with_tiny_vae(|w8, cfg, pm1, z, y| {
        let backend = Backend::cpu(2).unwrap();
        let (w, h, f) = (KL_W, KL_H, cfg.downscale());
        let (lw, lh) = (w / f, h / f);
        let t = Tiling::square(40, 16);
        assert!(t.tiles(lw, lh) >= 4);
        let yt = vae::decode_tiled(
            w8,
            cfg,
            Planes::single(z, lw, lh),
            t,
            TileStats::Image,
            &backend,
            &mut sdrs::model::tile::no_tick,
        )
        .unwrap();
        let (p, (seam, inner)) = (
            psnr(y, &yt, 2.0),
            seam_and_interior(y, &yt, (w, h), t, f, 4, 2.0),
        );
        // Encoding: the draw with zero noise is the distribution's mean, in UNet space.
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
        eprintln!("tiny KL VAE {w}x{h}, {} tiles of 40 latents (overlap 16), image statistics: decode {p:.1} dB (seam bands {seam:.1}, elsewhere {inner:.1}), encode {pe:.1} dB", t.tiles(lw, lh));
        assert!(
            p >= 40.0 && seam >= 40.0,
            "decode {p:.1} dB, seams {seam:.1} dB"
        );
        assert!(pe >= 40.0, "encode {pe:.1} dB");
    });
}

#[test]
fn tiny_kl_vae_in_tiles_with_their_own_statistics_is_near_the_whole_run_without_seams() {
    with_tiny_vae(|w8, cfg, _, z, y| {
        let backend = Backend::cpu(2).unwrap();
        let (w, h, f) = (KL_W, KL_H, cfg.downscale());
        let t = Tiling::square(40, 16);
        let yt = vae::decode_tiled(
            w8,
            cfg,
            Planes::single(z, w / f, h / f),
            t,
            TileStats::Tile,
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
fn vae_tiling_requests_tile_larger_images_and_plan_a_flat_compute_buffer() {
    use sdrs::pipeline::{Pipeline, Request, FORCED_TILE};
    let pipe = Pipeline::demo(2).unwrap();
    let plan = |side: usize, tiling: bool| {
        let req = Request {
            width: side,
            height: side,
            decoding: Decoding {
                vae_tiling: tiling,
                ..pipe.request("a red circle").decoding
            },
            ..pipe.request("a red circle")
        };
        let p = pipe.plan(&req).unwrap();
        (
            p.tiling,
            p.needs
                .iter()
                .find(|n| n.stage == "decode")
                .unwrap()
                .compute,
        )
    };
    // At or under the tile (64 latents = 512 px for an 8x VAE) nothing is cut.
    let f = 512 / FORCED_TILE.tile_w;
    let small = FORCED_TILE.tile_w * f;
    assert_eq!(plan(small, true).0, None);
    let (t1, c1) = plan(2 * small, true);
    let (t2, c2) = plan(4 * small, true);
    assert_eq!((t1, t2), (Some(FORCED_TILE), Some(FORCED_TILE)));
    let (_, whole) = plan(4 * small, false);
    eprintln!(
        "decode compute buffer: {} MiB per tile at {}² and {}², {} MiB whole at {}²",
        c1 >> 20,
        2 * small,
        4 * small,
        whole >> 20,
        4 * small
    );
    assert_eq!(c1, c2);
    assert!(whole > 4 * c2);
}
