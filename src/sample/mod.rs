//! Sampling: a schedule of noise levels, a denoiser, and the steps between them.
//! Classifier-free guidance lives here, not in the UNet; samplers never see ggml.
pub mod rng;
pub mod schedule;

pub use schedule::{Discrete, Plan, Spacing};

use crate::config::Prediction;
use crate::error::Result;

/// One call of the network: `model_input` (the VP latent, batch of one) at
/// `timestep` → the raw model output (guidance already applied).
pub trait Model {
    fn predict(&mut self, model_input: &[f32], timestep: f64) -> Result<Vec<f32>>;
}

/// The denoised estimate x0 from a VE latent `x` at noise level `sigma`.
pub fn denoise(model: &mut dyn Model, prediction: Prediction, x: &[f32], sigma: f64, timestep: f64) -> Result<Vec<f32>> {
    let c_in = 1.0 / (sigma * sigma + 1.0).sqrt();
    let input: Vec<f32> = x.iter().map(|&v| (v as f64 * c_in) as f32).collect();
    let out = model.predict(&input, timestep)?;
    Ok(match prediction {
        Prediction::Epsilon => x.iter().zip(&out).map(|(&x, &e)| (x as f64 - sigma * e as f64) as f32).collect(),
        // x0 = ᾱ^½ x_vp − (1−ᾱ)^½ v, with ᾱ^½ = c_in and x_vp = c_in x.
        Prediction::V => x.iter().zip(&out).map(|(&x, &v)| (x as f64 * c_in * c_in - v as f64 * sigma * c_in) as f32).collect(),
        Prediction::Sample => out,
    })
}

/// The sampler algorithms of this version (the full family is its own work item).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    /// Euler's method on the probability-flow ODE (Karras et al. 2022, alg. 2 without churn).
    Euler,
    /// DDIM with η = 0 (Song et al. 2021): the same update, on DDIM's timesteps.
    Ddim,
}

impl Sampler {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "euler" => Some(Sampler::Euler),
            "ddim" => Some(Sampler::Ddim),
            _ => None,
        }
    }
    pub const NAMES: &'static [&'static str] = &["euler", "ddim"];
}

/// Runs `plan` from `noise` (unit Gaussian, VP latent layout) and returns the VP
/// latent after every step; `on_step(i)` is called after step i.
pub fn sample(model: &mut dyn Model, prediction: Prediction, plan: &Plan, noise: &[f32], on_step: &mut dyn FnMut(usize)) -> Result<Vec<Vec<f32>>> {
    let mut x: Vec<f32> = noise.iter().map(|&n| (n as f64 * plan.init_sigma) as f32).collect();
    let mut trajectory = Vec::with_capacity(plan.timesteps.len());
    for (i, &t) in plan.timesteps.iter().enumerate() {
        let (s, s_next) = (plan.sigmas[i], plan.sigmas[i + 1]);
        let x0 = denoise(model, prediction, &x, s, t)?;
        let dt = s_next - s;
        for (xv, &d0) in x.iter_mut().zip(&x0) {
            let d = (*xv as f64 - d0 as f64) / s;
            *xv = (*xv as f64 + d * dt) as f32;
        }
        let c = 1.0 / (s_next * s_next + 1.0).sqrt();
        trajectory.push(x.iter().map(|&v| (v as f64 * c) as f32).collect());
        on_step(i);
    }
    Ok(trajectory)
}
