//! Consistency-model samplers: LCM (Luo et al. 2023, "Latent Consistency Models") and
//! TCD (Zheng et al. 2024, "Trajectory Consistency Distillation"). Both walk a coarse
//! grid of the distillation's timesteps and predict x0 at every step.
use super::kdiffusion::Step;
use super::{Discrete, Plan};
use crate::error::Result;

/// LCM's skipping-step grid: the distillation used every (T / original)-th timestep
/// (k·i − 1 for i = 1…original); inference takes `steps` of them evenly from the top.
fn consistency_timesteps(d: &Discrete, steps: usize, original: usize, strength: f64) -> Vec<usize> {
    let steps = steps.max(1);
    let k = d.len() / original;
    // img2img cuts the distillation grid itself (diffusers' `strength` in set_timesteps).
    let top = ((original as f64 * strength.clamp(0.0, 1.0)) as usize).max(1);
    let origin: Vec<usize> = (1..=top).rev().map(|i| i * k - 1).collect();
    let steps = steps.min(origin.len());
    (0..steps)
        .map(|j| origin[((j * origin.len()) as f64 / steps as f64).floor() as usize])
        .collect()
}

pub fn lcm_plan(d: &Discrete, steps: usize, original: usize, strength: f64) -> Plan {
    let ts = consistency_timesteps(d, steps, original, strength);
    let mut sigmas: Vec<f64> = ts
        .iter()
        .map(|&t| Discrete::sigma_of(d.alphas_cumprod[t]))
        .collect();
    // LCM starts from unit noise in the VP form.
    let init_sigma = (sigmas[0] * sigmas[0] + 1.0).sqrt();
    sigmas.push(0.0);
    Plan {
        timesteps: ts.iter().map(|&t| t as f64).collect(),
        sigmas,
        init_sigma,
    }
}

/// LCM's boundary condition (c_skip, c_out) at timestep t: σ_data = 0.5 and the
/// timestep scaled by 10, as the LCM models were distilled.
fn boundary(t: f64) -> (f64, f64) {
    let (sd, st) = (0.5f64, t * 10.0);
    (
        sd * sd / (st * st + sd * sd),
        st / (st * st + sd * sd).sqrt(),
    )
}

/// x0 = c_out·D + c_skip·x_vp, then re-noised to the next level (fresh noise) unless last.
pub(super) fn lcm_step(st: &mut Step, x: &[f64]) -> Result<Vec<f64>> {
    let (den, plan, i, noise) = (&mut *st.den, st.plan, st.i, &mut *st.noise);
    let (s, sn, t) = (plan.sigmas[i], plan.sigmas[i + 1], plan.timesteps[i]);
    let d0 = den.denoise_at(x, s, t)?;
    let (c_skip, c_out) = boundary(t);
    let c_in = 1.0 / (s * s + 1.0).sqrt();
    let mut out: Vec<f64> = x
        .iter()
        .zip(&d0)
        .map(|(x, d)| c_out * d + c_skip * x * c_in)
        .collect();
    den.set_estimate(&out);
    if i + 1 < plan.timesteps.len() {
        let z = noise.noise(s, sn, out.len());
        for (o, z) in out.iter_mut().zip(z) {
            *o += sn * z;
        }
    }
    Ok(out)
}

/// TCD's plan: LCM's grid; each step goes to the next grid timestep and the last to
/// t = 0 (σ_min), where TCD's "strategic stochastic sampling" ends.
pub fn tcd_plan(d: &Discrete, steps: usize, original: usize, strength: f64) -> Plan {
    let ts = consistency_timesteps(d, steps, original, strength);
    let mut sigmas: Vec<f64> = ts
        .iter()
        .map(|&t| Discrete::sigma_of(d.alphas_cumprod[t]))
        .collect();
    let init_sigma = (sigmas[0] * sigmas[0] + 1.0).sqrt();
    sigmas.push(d.sigma_min());
    Plan {
        timesteps: ts.iter().map(|&t| t as f64).collect(),
        sigmas,
        init_sigma,
    }
}

/// One TCD step with γ: predict x0 and ε at t, jump deterministically to
/// s = ⌊(1 − γ)·t_prev⌋, then forward-diffuse from s to t_prev with fresh noise.
pub(super) fn tcd_step(st: &mut Step, x: &[f64]) -> Result<Vec<f64>> {
    let (den, plan, i, gamma, noise) = (&mut *st.den, st.plan, st.i, st.eta, &mut *st.noise);
    let (s, t) = (plan.sigmas[i], plan.timesteps[i]);
    let last = i + 1 == plan.timesteps.len();
    let t_prev = if last { 0.0 } else { plan.timesteps[i + 1] };
    let sigma_prev = plan.sigmas[i + 1];
    let d0 = den.denoise_at(x, s, t)?;
    let ts = ((1.0 - gamma) * t_prev).floor().max(0.0);
    let sigma_s = den.training_sigma(ts as usize);
    let mut out: Vec<f64> = x
        .iter()
        .zip(&d0)
        .map(|(x, d)| d + sigma_s * (x - d) / s)
        .collect();
    if gamma > 0.0 && !last {
        // Forward diffusion from σ_s up to σ_prev: the VE form of TCD's
        // sqrt(ᾱ_prev/ᾱ_s)·x + sqrt(1 − ᾱ_prev/ᾱ_s)·z.
        let up = (sigma_prev * sigma_prev - sigma_s * sigma_s)
            .max(0.0)
            .sqrt();
        let z = noise.noise(sigma_s, sigma_prev, out.len());
        for (o, z) in out.iter_mut().zip(z) {
            *o += up * z;
        }
    }
    Ok(out)
}
