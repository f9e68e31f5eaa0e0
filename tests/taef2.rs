//! The real pretrained TAEF2 autoencoder (the external test data's `models/taef2`) through the
//! TAESD-family code: photo round trips must reach the PSNR the published network
//! reaches in PyTorch (figures from the executor issue).
mod common;

use common::photo;
use sdrs::ggml::Backend;
use sdrs::model::{taesd, Planes};

fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y.clamp(0.0, 1.0)) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (1.0 / mse).log10()
}

#[test]
fn taef2_round_trips_photos_at_the_published_networks_psnr() {
    let backend = Backend::cpu(2).unwrap();
    let Some((enc, dec)) = common::taef2(&backend) else {
        return;
    };
    assert_eq!(taesd::latent_channels(&dec).unwrap(), 32);
    for (file, reference) in [
        ("astronaut.png", 31.19),
        ("chelsea.png", 32.70),
        ("coffee.png", 29.62),
        ("rocket.png", 30.49),
    ] {
        let (x, w, h) = photo(file, None);
        let z = taesd::encode(&enc, Planes::single(&x, w, h), &backend).unwrap();
        let y = taesd::decode(&dec, Planes::single(&z, w / 8, h / 8), &backend).unwrap();
        let p = psnr(&x, &y);
        eprintln!("{file}: {p:.2} dB (PyTorch {reference})");
        assert!(
            (p - reference).abs() <= 0.1,
            "{file}: {p:.2} dB vs {reference}"
        );
    }
}
