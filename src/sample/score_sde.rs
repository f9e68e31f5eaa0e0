//! The predictor–corrector sampler of score models trained on the variance-exploding
//! SDE (Song et al. 2021, "Score-Based Generative Modeling through Stochastic
//! Differential Equations", alg. 2–4: the reverse-diffusion predictor and the
//! Langevin corrector), computed as diffusers' `ScoreSdeVeScheduler` and
//! `ScoreSdeVePipeline` do, so the torch generator reproduces their images:
//!
//! - the time grid runs from 1 to `sampling_eps` (`torch.linspace` in f32); the model
//!   sees σ(t) = σ_min (σ_max/σ_min)^t, the predictor the discrete levels
//!   exp(linspace(log σ_min, log σ_max, steps)) at ⌊t (steps − 1)⌋;
//! - each step runs `correct_steps` Langevin moves, then the predictor; every move
//!   draws one Gaussian the size of the whole batch;
//! - the corrector's step size (2 (r ‖z‖ / ‖s‖)², norms averaged over the batch)
//!   couples the images of a batch, as in diffusers;
//! - the result is the last predictor's mean, without its noise.
use super::{Model, NoiseSampler};
use crate::config::VeSde;
use crate::error::{Error, Result};

/// `torch.linspace(start, end, n)` in f32 (ATen's CPU kernel: the first half counted
/// from the start, the second from the end, with the step computed in f32).
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// The grids of `steps` predictor–corrector steps.
#[derive(Clone, Debug, PartialEq)]
pub struct VeGrid {
    /// t from 1 down to `sampling_eps`.
    pub timesteps: Vec<f32>,
    /// σ(t): the noise level the model is told at each step.
    pub sigmas: Vec<f32>,
    /// The predictor's levels, smallest first.
    pub discrete: Vec<f32>,
}

impl VeGrid {
    pub fn new(sde: &VeSde, steps: usize) -> Self {
        let steps = steps.max(1);
        let timesteps = linspace_f32(1.0, sde.sampling_eps, steps);
        // diffusers: `sigma_min * (sigma_max / sigma_min) ** t`, the ratio a Python
        // float raised to an f32 tensor, so f32 throughout.
        let ratio = (sde.sigma_max as f64 / sde.sigma_min as f64) as f32;
        let sigmas = timesteps
            .iter()
            .map(|&t| sde.sigma_min * ratio.powf(t))
            .collect();
        let (lo, hi) = (
            (sde.sigma_min as f64).ln() as f32,
            (sde.sigma_max as f64).ln() as f32,
        );
        let discrete = linspace_f32(lo, hi, steps)
            .into_iter()
            .map(f32::exp)
            .collect();
        VeGrid {
            timesteps,
            sigmas,
            discrete,
        }
    }

    /// The predictor's step i: its level σ and the next lower one (0 past the end).
    pub fn predictor_levels(&self, i: usize) -> (f32, f32) {
        let n = self.timesteps.len();
        // `(t * (len - 1)).long()` in f32: truncation, as diffusers indexes.
        let k = ((self.timesteps[i] * (n - 1) as f32) as usize).min(n - 1);
        let below = if k == 0 { 0.0 } else { self.discrete[k - 1] };
        (self.discrete[k], below)
    }
}

/// What [`sample`] calls after each step: `(step, sample, predictor mean)`.
pub type OnStep<'a> = dyn FnMut(usize, &[f64], &[f64]) + 'a;

/// The Euclidean norm of each image's values, averaged over the batch.
fn mean_norm(v: &[f64], images: usize) -> f64 {
    let per = v.len() / images;
    v.chunks(per)
        .map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt())
        .sum::<f64>()
        / images as f64
}

/// Samples from `x` (the batch's initial noise times σ_max) and returns the final
/// mean, images in [0, 1] before clamping. `model.predict(x, σ)` is the score (the
/// UNet's output divided by σ); `on_step(i, x, mean)` is called after step i with the
/// sample and the predictor's mean.
pub fn sample(
    model: &mut dyn Model,
    sde: &VeSde,
    grid: &VeGrid,
    images: usize,
    mut x: Vec<f64>,
    noise: &mut dyn NoiseSampler,
    on_step: &mut OnStep<'_>,
) -> Result<Vec<f64>> {
    if images == 0 || !x.len().is_multiple_of(images) || x.is_empty() {
        return Err(Error::Invalid(format!(
            "{} values do not make {images} images",
            x.len()
        )));
    }
    let n = x.len();
    let mut mean = x.clone();
    for i in 0..grid.timesteps.len() {
        let sigma = grid.sigmas[i] as f64;
        for _ in 0..sde.correct_steps {
            let score = model.predict64(&x, sigma)?;
            let z = noise.noise(sigma, sigma, n);
            let ratio = sde.snr as f64 * mean_norm(&z, images) / mean_norm(&score, images);
            let step = 2.0 * ratio * ratio;
            let spread = (2.0 * step).sqrt();
            for ((v, s), z) in x.iter_mut().zip(&score).zip(&z) {
                *v += step * s + spread * z;
            }
        }
        let score = model.predict64(&x, sigma)?;
        let (level, below) = grid.predictor_levels(i);
        let g2 = (level as f64).powi(2) - (below as f64).powi(2);
        let z = noise.noise(sigma, below as f64, n);
        let g = g2.sqrt();
        for (((v, m), s), z) in x.iter_mut().zip(mean.iter_mut()).zip(&score).zip(&z) {
            *m = *v + g2 * s;
            *v = *m + g * z;
        }
        on_step(i, &x, &mean);
    }
    Ok(mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_at_both_ends_and_keeps_the_requested_count() {
        let v = linspace_f32(1.0, 1e-5, 5);
        assert_eq!(v.len(), 5);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[4], 1e-5);
        assert_eq!(linspace_f32(2.0, 3.0, 1), vec![2.0]);
    }

    #[test]
    fn predictor_levels_walk_down_the_discrete_grid_to_zero() {
        let sde = VeSde {
            sigma_min: 0.01,
            sigma_max: 50.0,
            ..VeSde::default()
        };
        let g = VeGrid::new(&sde, 10);
        assert!((g.sigmas[0] - 50.0).abs() < 1e-3);
        assert!(g.sigmas.windows(2).all(|w| w[1] < w[0]));
        let (top, below) = g.predictor_levels(0);
        assert_eq!(top, g.discrete[9]);
        assert_eq!(below, g.discrete[8]);
        assert_eq!(g.predictor_levels(9), (g.discrete[0], 0.0));
    }

    /// For data that is one point μ, the score at level σ is (μ − x)/σ²; the sampler
    /// must end at μ (the predictor's last mean adds σ_0² times the score).
    #[test]
    fn sampling_a_point_mass_ends_on_the_point() {
        struct Point;
        impl Model for Point {
            fn predict(&mut self, x: &[f32], sigma: f64) -> Result<Vec<f32>> {
                let s2 = (sigma * sigma) as f32;
                Ok(x.iter().map(|&v| (0.25 - v) / s2).collect())
            }
            fn predict64(&mut self, x: &[f64], sigma: f64) -> Result<Vec<f64>> {
                Ok(x.iter().map(|&v| (0.25 - v) / (sigma * sigma)).collect())
            }
        }
        struct Fixed(u64);
        impl NoiseSampler for Fixed {
            fn noise(&mut self, _: f64, _: f64, n: usize) -> Vec<f64> {
                (0..n)
                    .map(|_| {
                        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((self.0 >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 3.4
                    })
                    .collect()
            }
        }
        let sde = VeSde {
            sigma_min: 0.01,
            sigma_max: 20.0,
            ..VeSde::default()
        };
        let grid = VeGrid::new(&sde, 200);
        let mut noise = Fixed(3);
        let x: Vec<f64> = noise.noise(0.0, 0.0, 64).iter().map(|v| v * 20.0).collect();
        let out = sample(&mut Point, &sde, &grid, 2, x, &mut noise, &mut |_, _, _| {}).unwrap();
        let worst = out.iter().map(|v| (v - 0.25).abs()).fold(0.0, f64::max);
        assert!(worst < 0.05, "ended {worst} from the point");
    }
}
