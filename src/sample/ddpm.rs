//! DDPM's ancestral sampler (Ho et al. 2020, "Denoising Diffusion Probabilistic
//! Models", alg. 2 and eq. 7), on a grid of fewer steps as diffusers' `DDPMScheduler`
//! runs it: each step from t to the previous grid point t' draws from the posterior
//! q(x_t' | x_t, x̂_0) with ᾱ_t/ᾱ_t' in place of α_t, and the last step lands on
//! ᾱ = 1, the clean sample.
use super::kdiffusion::{add_noise, Step};
use super::{Discrete, Plan};
use crate::config::Variance;
use crate::error::Result;

/// The leading grid `t = i·T/steps + offset` from the top, each step ending on the next
/// grid point and the last on σ = 0.
pub fn ddpm_plan(d: &Discrete, steps: usize, steps_offset: usize) -> Plan {
    let steps = steps.clamp(1, d.len());
    let ratio = d.len() / steps;
    let timesteps: Vec<f64> = (0..steps)
        .rev()
        .map(|i| (i * ratio + steps_offset).min(d.len() - 1) as f64)
        .collect();
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| d.sigma(t)).collect();
    sigmas.push(0.0);
    Plan {
        init_sigma: (sigmas[0] * sigmas[0] + 1.0).sqrt(),
        timesteps,
        sigmas,
    }
}

/// One step. In VP terms, with ā = ᾱ_t, ā' = ᾱ_t' and β = 1 − ā/ā':
/// mean = √ā' β/(1 − ā) x̂_0 + √(ā/ā') (1 − ā')/(1 − ā) x_t; the variance is β (fixed
/// large) or the posterior's (1 − ā')/(1 − ā) β (fixed small); noise is added only
/// above timestep 0, as diffusers does. Computed in VP form and returned in VE form.
pub(super) fn ddpm_step(st: &mut Step, x: &[f64]) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let t = st.plan.timesteps[st.i];
    let x0 = st.den.denoise_at(x, s, t)?;
    let a = 1.0 / (1.0 + s * s);
    let a_prev = 1.0 / (1.0 + sn * sn);
    let beta = 1.0 - a / a_prev;
    let c0 = a_prev.sqrt() * beta / (1.0 - a);
    let ct = (a / a_prev).sqrt() * (1.0 - a_prev) / (1.0 - a);
    let variance = match st.variance {
        Variance::FixedSmall => ((1.0 - a_prev) / (1.0 - a) * beta).max(1e-20),
        Variance::FixedLarge => beta,
    };
    // x_t (VP) = √ā x_ve; the result is divided by √ā' to return to VE.
    let (sa, sa_prev) = (a.sqrt(), a_prev.sqrt());
    let mut out: Vec<f64> = x
        .iter()
        .zip(&x0)
        .map(|(&xv, &d)| (c0 * d + ct * sa * xv) / sa_prev)
        .collect();
    if t > 0.0 {
        add_noise(&mut out, st.noise, s, sn, variance.sqrt() / sa_prev);
    }
    Ok(out)
}
