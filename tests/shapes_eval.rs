//! The demo-model evaluator (tests/common/shapes.rs) on ground truth: images the Python
//! generator drew (tests/fixtures/shapes, made by
//! `python3 tools/demo/shapes.py fixture --out tests/fixtures/shapes`), the held-out
//! split's bookkeeping, and proof that the evaluator can fail.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::shapes::{self, Caption, Tally, ATTRS};
use image::RgbImage;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

struct Item {
    file: String,
    caption: String,
    truth: Caption,
    stated: Caption,
    image: RgbImage,
}

fn caption_from(v: &Value) -> Caption {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Caption {
        shape: s("shape"),
        colour: s("colour"),
        position: s("position"),
        size: s("size"),
        background: s("background"),
    }
}

fn fixture() -> Vec<Item> {
    let dir = root().join("tests/fixtures/shapes");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("captions.json")).unwrap()).unwrap();
    meta["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let file = v["file"].as_str().unwrap().to_string();
            let image = image::open(dir.join(&file)).unwrap().to_rgb8();
            Item {
                caption: v["caption"].as_str().unwrap().to_string(),
                truth: caption_from(v),
                stated: caption_from(&v["stated"]),
                image,
                file,
            }
        })
        .collect()
}

fn heldout() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("tools/demo/heldout.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Every other value `attr` can take (colours for colour and background).
fn alternatives(attr: &str, value: &str) -> Vec<String> {
    let g = shapes::grammar();
    let all: Vec<String> = match attr {
        "shape" => g.shapes.iter().map(|s| s.name.clone()).collect(),
        "position" => g.positions.iter().map(|p| p.name.clone()).collect(),
        "size" => g.sizes.iter().map(|s| s.name.clone()).collect(),
        _ => g.palette.iter().map(|(n, _)| n.clone()).collect(),
    };
    all.into_iter().filter(|v| v != value).collect()
}

#[test]
fn grammar_is_consistent() {
    let g = shapes::grammar();
    assert_eq!(g.image_size, 64);
    assert!(
        g.palette.len() >= 8 && g.shapes.len() >= 3 && g.positions.len() >= 5 && g.sizes.len() >= 2
    );
    // The analysis thresholds are fractions of this distance; the palette is the RGB
    // cube's corners pulled 25 levels inwards, so every pair is 205 or more apart.
    assert!(
        g.min_palette_distance >= 200.0,
        "{}",
        g.min_palette_distance
    );
    let [t, h, f] = [g.seeds_train, g.seeds_heldout, g.seeds_fixture];
    for (a, b) in [(t, h), (t, f), (h, f)] {
        assert!(
            a[1] <= b[0] || b[1] <= a[0],
            "seed ranges {a:?} and {b:?} overlap"
        );
    }
}

#[test]
fn heldout_split_is_disjoint_balanced_and_parses() {
    let g = shapes::grammar();
    let items = heldout();
    assert!(items.len() >= 200, "{} held-out items", items.len());
    let mut seen = std::collections::BTreeSet::new();
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for v in &items {
        let seed = v["seed"].as_u64().unwrap();
        assert!(
            seed >= g.seeds_heldout[0] && seed < g.seeds_heldout[1],
            "seed {seed} outside the held-out range"
        );
        assert!(
            seed >= g.seeds_train[1] || seed < g.seeds_train[0],
            "held-out seed {seed} is a training seed"
        );
        assert!(seen.insert(seed), "seed {seed} twice");
        let truth = caption_from(v);
        assert_ne!(truth.colour, truth.background);
        assert_eq!(
            shapes::parse_caption(v["caption"].as_str().unwrap()).unwrap(),
            truth,
            "{v}"
        );
        for a in ["shape", "position", "size"] {
            *counts
                .entry((a.to_string(), truth.get(a).unwrap().to_string()))
                .or_default() += 1;
        }
    }
    // Shape, position and size cycle through the set (i mod 3, 5, 2): counts differ by one at most.
    for a in ["shape", "position", "size"] {
        let n: Vec<usize> = counts
            .iter()
            .filter(|((k, _), _)| k == a)
            .map(|(_, &c)| c)
            .collect();
        let (lo, hi) = (n.iter().min().unwrap(), n.iter().max().unwrap());
        assert!(hi - lo <= 1, "{a} unbalanced: {counts:?}");
    }
}

#[test]
fn captions_parse() {
    let c = shapes::parse_caption("a large red circle on the left on a blue background").unwrap();
    assert_eq!(
        c,
        Caption {
            shape: Some("circle".into()),
            colour: Some("red".into()),
            position: Some("left".into()),
            size: Some("large".into()),
            background: Some("blue".into())
        }
    );
    let c = shapes::parse_caption("A Blue background with a big YELLOW triangle in the middle")
        .unwrap();
    assert_eq!(
        (c.shape.as_deref(), c.colour.as_deref(), c.size.as_deref()),
        (Some("triangle"), Some("yellow"), Some("large"))
    );
    assert_eq!(
        (c.position.as_deref(), c.background.as_deref()),
        (Some("center"), Some("blue"))
    );
    let c = shapes::parse_caption("a red circle on a blue background").unwrap();
    assert_eq!((c.size, c.position), (None, None));
    for bad in [
        "a purple circle",
        "a red circle and a square",
        "a red blue circle",
        "",
        "on the",
    ] {
        assert!(shapes::parse_caption(bad).is_err(), "{bad:?} parsed");
    }
    // Every fixture caption (all the generator's templates, synonyms, omissions) reads
    // back as exactly what it states.
    for it in fixture() {
        assert_eq!(
            shapes::parse_caption(&it.caption).unwrap(),
            it.stated,
            "{}: {:?}",
            it.file,
            it.caption
        );
    }
}

#[test]
fn evaluator_scores_ground_truth() {
    let items = fixture();
    assert!(items.len() >= 60);
    let (mut full, mut stated) = (Tally::default(), Tally::default());
    for it in &items {
        let a = shapes::analyse(&it.image);
        let v = a.judge(&it.truth);
        if !v.all_ok() {
            eprintln!(
                "{}: {:?}\n  found {:?}\n  {:?}",
                it.file,
                it.caption,
                a.as_caption(),
                a
            );
        }
        full.add(&v);
        stated.add(&shapes::evaluate(&it.image, &shapes::parse_caption(&it.caption).unwrap()).0);
    }
    eprintln!("ground truth, every attribute: {full}\nground truth, as captioned:    {stated}");
    for t in [&full, &stated] {
        for a in ATTRS {
            let acc = t.accuracy(a).unwrap();
            assert!(acc >= 0.98, "{a}: {acc} ({t})");
        }
    }
}

#[test]
fn wrong_captions_are_rejected() {
    let items = fixture();
    // Item 0 is pinned: a large red circle on the left on a blue background.
    let img = &items[0].image;
    let ok = |text: &str| shapes::evaluate(img, &shapes::parse_caption(text).unwrap()).0;
    assert!(ok("a large red circle on the left on a blue background").all_ok());
    assert!(ok("a red circle on a blue background").all_ok());
    let v = ok("a large blue circle on the left on a blue background");
    assert_eq!(v.colour, Some(false));
    assert_eq!(ok("a blue circle").colour, Some(false));
    assert_eq!(
        ok("a large red circle on the right on a blue background").position,
        Some(false)
    );
    assert_eq!(
        ok("a large red square on the left on a blue background").shape,
        Some(false)
    );
    assert_eq!(ok("a large red triangle").shape, Some(false));
    assert_eq!(ok("a small red circle on the left").size, Some(false));
    assert_eq!(
        ok("a red circle on a green background").background,
        Some(false)
    );

    // Every image against every single-attribute change of its truth.
    let (mut wrong, mut rejected) = (0, 0);
    for it in &items {
        for a in ATTRS {
            for alt in alternatives(a, it.truth.get(a).unwrap()) {
                let mut c = it.truth.clone();
                c.set(a, Some(alt));
                wrong += 1;
                let v = shapes::evaluate(&it.image, &c).0;
                rejected += (v.get(a) == Some(false)) as usize;
            }
        }
    }
    eprintln!("single-attribute wrong captions rejected: {rejected}/{wrong}");
    assert!(rejected as f64 >= 0.98 * wrong as f64);
}

#[test]
fn no_shape_means_no_shape_attribute_passes() {
    let g = shapes::grammar();
    let blue = g.palette[g.colour_index("blue").unwrap()]
        .1
        .map(|c| c as u8);
    let img = RgbImage::from_pixel(64, 64, image::Rgb(blue));
    let a = shapes::analyse(&img);
    assert!(a.shape.is_none());
    let v = a.judge(
        &shapes::parse_caption("a large red circle on the left on a blue background").unwrap(),
    );
    assert_eq!(
        (v.shape, v.colour, v.position, v.size, v.background),
        (
            Some(false),
            Some(false),
            Some(false),
            Some(false),
            Some(true)
        )
    );
}

/// A small deterministic generator for the perturbations below.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What a generated image is likely to look like next to the ground truth: softer
/// edges (two 3x3 box blurs), a colour cast, per-pixel noise and a few stray specks.
fn degrade(img: &RgbImage, rng: &mut Lcg) -> RgbImage {
    let (w, h) = img.dimensions();
    let blur = |src: &RgbImage| {
        RgbImage::from_fn(w, h, |x, y| {
            let mut s = [0u32; 3];
            let mut n = 0;
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (
                        (x as i64 + dx).clamp(0, w as i64 - 1),
                        (y as i64 + dy).clamp(0, h as i64 - 1),
                    );
                    let p = src.get_pixel(nx as u32, ny as u32).0;
                    for c in 0..3 {
                        s[c] += p[c] as u32;
                    }
                    n += 1;
                }
            }
            image::Rgb(s.map(|v| (v / n) as u8))
        })
    };
    let mut out = blur(&blur(img));
    let cast: [f64; 3] = [
        (rng.next() - 0.5) * 40.0,
        (rng.next() - 0.5) * 40.0,
        (rng.next() - 0.5) * 40.0,
    ];
    for p in out.pixels_mut() {
        for (v, cast) in p.0.iter_mut().zip(cast) {
            *v = (*v as f64 + cast + (rng.next() - 0.5) * 30.0)
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }
    for _ in 0..6 {
        let (x, y) = (
            (rng.next() * w as f64) as u32,
            (rng.next() * h as f64) as u32,
        );
        let v = [rng.next(), rng.next(), rng.next()].map(|c| (c * 255.0) as u8);
        out.put_pixel(x.min(w - 1), y.min(h - 1), image::Rgb(v));
    }
    out
}

#[test]
fn evaluator_survives_generated_looking_images() {
    let mut rng = Lcg(5);
    let mut t = Tally::default();
    // Five differently degraded copies of each fixture image.
    let items = fixture();
    for it in items.iter().cycle().take(5 * items.len()) {
        let img = degrade(&it.image, &mut rng);
        let (v, a) = shapes::evaluate(&img, &it.truth);
        if !v.all_ok() {
            eprintln!(
                "{} degraded: {:?}\n  found {:?}",
                it.file,
                it.caption,
                a.as_caption()
            );
        }
        t.add(&v);
    }
    eprintln!("blurred, cast, noisy ground truth: {t}");
    for a in ATTRS {
        assert!(t.accuracy(a).unwrap() >= 0.95, "{a}: {t}");
    }
}

/// Scores a folder of images against their captions: `SDRS_SHAPES_DIR=DIR cargo test
/// --release --test shapes_eval -- --ignored --nocapture`. DIR holds `captions.jsonl`
/// lines with "file" and "caption" (what `tools/demo/shapes.py samples` writes, and
/// what a run of the model over the held-out set should write).
#[test]
#[ignore]
fn score_folder() {
    let Some(dir) = std::env::var_os("SDRS_SHAPES_DIR") else {
        eprintln!("SDRS_SHAPES_DIR not set; nothing to score");
        return;
    };
    let dir = PathBuf::from(dir);
    let text = std::fs::read_to_string(dir.join("captions.jsonl")).unwrap();
    let mut t = Tally::default();
    let mut by_truth: BTreeMap<String, Tally> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap();
        let file = v["file"].as_str().unwrap();
        let img = image::open(dir.join(file)).unwrap().to_rgb8();
        let (verdict, a) = shapes::evaluate(
            &img,
            &shapes::parse_caption(v["caption"].as_str().unwrap()).unwrap(),
        );
        if !verdict.all_ok() && std::env::var_os("SDRS_SHAPES_VERBOSE").is_some() {
            eprintln!(
                "{file}: {:?} found {:?} {:?}",
                v["caption"],
                a.as_caption(),
                a.shape
            );
        }
        t.add(&verdict);
        // Breakdown by the true shape and size where the listing gives them.
        for k in ["shape", "size"] {
            if let Some(val) = v.get(k).and_then(Value::as_str) {
                by_truth
                    .entry(format!("{k}={val}"))
                    .or_default()
                    .add(&verdict);
            }
        }
    }
    eprintln!("{}: {t}", dir.display());
    for (k, v) in &by_truth {
        eprintln!("  {k}: {v}");
    }
}

/// The judge of unconditional samples passes every ground-truth picture, at 64×64 and
/// shrunk to the 32×32 the DDPM demo is trained at, and fails pictures that are not one
/// clean shape on a plain background.
#[test]
fn every_generator_picture_is_one_clean_shape_and_broken_ones_are_not() {
    for item in fixture() {
        let small =
            image::imageops::resize(&item.image, 32, 32, image::imageops::FilterType::Triangle);
        for (img, side) in [(&item.image, 64), (&small, 32)] {
            if let Err(why) = shapes::one_clean_shape(img) {
                panic!("{} at {side}: {why}", item.file);
            }
        }
    }
    let items = fixture();
    let (a, b) = (&items[0].image, &items[1].image);
    // Two shapes: a small shape's box copied beside it, on its own background.
    let small = items
        .iter()
        .find_map(|i| {
            let s = shapes::analyse(&i.image).shape?;
            (s.extent < 0.3).then_some((i.image.clone(), s.bbox))
        })
        .expect("the fixture has a small shape");
    let (img, [x0, y0, x1, y1]) = small;
    let shift: i64 = if x0 < 32 { 30 } else { -30 };
    let mut two = img.clone();
    for y in y0..=y1 {
        for x in x0..=x1 {
            let nx = (x as i64 + shift).clamp(0, 63) as u32;
            two.put_pixel(nx, y, *img.get_pixel(x, y));
        }
    }
    let broken: Vec<(&str, RgbImage)> = vec![
        (
            "blank",
            RgbImage::from_pixel(32, 32, image::Rgb([25, 25, 230])),
        ),
        (
            "noise",
            RgbImage::from_fn(32, 32, |x, y| {
                let v = ((x * 7919 + y * 104729) % 251) as u8;
                image::Rgb([v, v.wrapping_mul(3), v.wrapping_mul(7)])
            }),
        ),
        (
            "halves",
            RgbImage::from_fn(64, 64, |x, y| {
                if x < 32 {
                    *a.get_pixel(x, y)
                } else {
                    *b.get_pixel(x, y)
                }
            }),
        ),
        ("two shapes", two),
    ];
    for (what, img) in &broken {
        assert!(
            shapes::one_clean_shape(img).is_err(),
            "{what} passed as one clean shape"
        );
    }
}
