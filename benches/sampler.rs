//! Sampler overhead: everything a sampling step does besides the UNet, on an SD 1.5
//! 512×512 latent (4×64×64), with a model that returns at once. The target is under 1%
//! of a UNet step (seconds at 512×512 on a CPU), i.e. well under 10 ms.
use criterion::{criterion_group, criterion_main, Criterion};
use sdrs::config::{NoiseSchedule, Prediction};
use sdrs::sample::{self, Discrete, Model, NativeRng, Sampler, Schedule, ScheduleOpts, Settings};

struct Instant0(Vec<f32>);

impl Model for Instant0 {
    fn predict(&mut self, x: &[f32], _t: f64) -> sdrs::Result<Vec<f32>> {
        Ok(self.0[..x.len()].to_vec())
    }
}

fn bench(c: &mut Criterion) {
    let n = 4 * 64 * 64;
    let d = Discrete::sd();
    let steps = 20;
    let mut g = c.benchmark_group("sampler 20 steps, 4x64x64 latent");
    for name in [
        "euler",
        "euler_a",
        "dpm++2m",
        "dpm++2m_sde",
        "dpm++sde",
        "unipc",
        "lms",
        "lcm",
    ] {
        let sampler = Sampler::parse(name).unwrap_or(Sampler::Euler);
        let settings = Settings::default_for(sampler);
        let plan = sample::plan_for(
            sampler,
            Schedule::Karras,
            &d,
            steps,
            &ScheduleOpts::default(),
            1.0,
            &NoiseSchedule::default(),
        );
        let noise = sample::Rng::randn(&mut NativeRng::new(1), n);
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut model = Instant0(vec![0.1; n]);
                let mut den = sample::Denoiser::new(&mut model, Prediction::Epsilon, &d, &plan);
                let x = sample::start_latent(&plan, &noise, None);
                let mut rng = NativeRng::new(2);
                let mut brownian = sample::BrownianNoise::new(NativeRng::new(3));
                let mut iid = sample::IidNoise(&mut rng);
                let src: &mut dyn sample::NoiseSampler = if sampler.brownian() {
                    &mut brownian
                } else {
                    &mut iid
                };
                sample::sample(
                    &mut den,
                    sampler,
                    &settings,
                    &plan,
                    x,
                    src,
                    &mut |_, _, _| {},
                )
                .map(|t| t.len())
                .unwrap_or(0)
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);
