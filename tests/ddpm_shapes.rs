//! The unconditional demo model (models/ddpm-shapes, a pixel-space DDPM trained by
//! `tools/demo/train_ddpm.py`) judged by what it draws: a batch of 64 from its own
//! defaults (DDPM, 100 ancestral steps), each sample checked by the shapes evaluator
//! (tests/common/shapes.rs) for one clean shape on a plain background, and the batch
//! for spread (no collapse onto a few shapes, places or colours).
mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::shapes;
use sdrs::pipeline::unconditional::{Batch, Unconditional};
use sdrs::sample::Sampler;

#[test]
fn a_batch_of_64_is_one_clean_shape_each_and_spread_over_shapes_places_and_colours() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ddpm-shapes/ddpm-shapes.gguf");
    let model = Unconditional::load(&path, 2).unwrap();
    let req = model.request();
    assert_eq!((req.sampling.sampler, req.steps), (Sampler::Ddpm, 100));
    assert_eq!((req.width, req.height), (32, 32));
    let images = model.generate(&req, &Batch::of(64), &mut |_| {}).unwrap();
    let g = shapes::grammar();
    let (mut clean, mut palette) = (0, 0);
    let (mut kinds, mut places, mut backgrounds, mut colours) = (
        vec![0usize; g.shapes.len()],
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
    );
    for (i, img) in images.iter().enumerate() {
        let rgb = image::RgbImage::from_raw(32, 32, img.rgb.clone()).unwrap();
        match shapes::one_clean_shape(&rgb) {
            Ok(a) => {
                clean += 1;
                palette += usize::from(shapes::on_palette(&a));
                let s = a.shape.as_ref().unwrap();
                kinds[s.class] += 1;
                places.insert(s.position);
                backgrounds.insert(a.background);
                colours.insert(s.colour);
            }
            Err(why) => eprintln!("sample {i}: {why}"),
        }
    }
    eprintln!(
        "{clean}/64 clean ({palette} in palette colours); shapes {kinds:?}, {} positions, {} background and {} shape colour families",
        places.len(),
        backgrounds.len(),
        colours.len()
    );
    assert!(
        clean >= 58,
        "{clean}/64 samples are one clean shape on a plain background"
    );
    // No collapse: every shape at least 10 % of the clean samples, four of the five
    // places, and the colours spread over at least five of the eight families.
    assert!(kinds.iter().all(|&k| k * 10 >= clean), "shapes {kinds:?}");
    assert!(places.len() >= 4, "positions {places:?}");
    assert!(
        backgrounds.len() >= 5 && colours.len() >= 5,
        "colours {backgrounds:?} {colours:?}"
    );
}
