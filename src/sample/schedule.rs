//! Noise schedules: the model's discrete training schedule, and the sigma/timestep
//! sequences samplers walk (as diffusers' schedulers compute them).
//!
//! Everything is expressed in k-diffusion's variance-exploding form: a latent at
//! noise level σ is `x = x0 + σ ε`; the model sees `x / sqrt(1 + σ²)` (the
//! variance-preserving latent) at timestep t where σ(t) = sqrt((1 − ᾱ_t) / ᾱ_t).
//! (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models".)

/// The discrete training schedule ᾱ_t, t = 0..T.
#[derive(Clone, Debug)]
pub struct Discrete {
    pub alphas_cumprod: Vec<f64>,
}

impl Discrete {
    /// SD's "scaled_linear" betas: linear in sqrt(β) from `start` to `end`. Computed in
    /// f32 as PyTorch does, so sigmas agree with diffusers' to the last bit that matters.
    pub fn scaled_linear(start: f64, end: f64, steps: usize) -> Self {
        let (a, b) = ((start.sqrt()) as f32, (end.sqrt()) as f32);
        let step = (b - a) / (steps - 1) as f32;
        let mut acc = 1f32;
        let alphas_cumprod = (0..steps)
            .map(|i| {
                // torch.linspace fills from both ends.
                let s = if i < steps / 2 { a + step * i as f32 } else { b - step * (steps - 1 - i) as f32 };
                acc *= 1.0 - s * s;
                acc as f64
            })
            .collect();
        Discrete { alphas_cumprod }
    }

    /// The SD 1.x/2.x/SDXL training schedule.
    pub fn sd() -> Self {
        Self::scaled_linear(0.00085, 0.012, 1000)
    }

    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    fn sigma_of(ac: f64) -> f64 {
        ((1.0 - ac) / ac).sqrt()
    }

    /// σ at a (possibly fractional) timestep, interpolated linearly in σ as diffusers does.
    pub fn sigma(&self, t: f64) -> f64 {
        let last = (self.len() - 1) as f64;
        let t = t.clamp(0.0, last);
        let (i, f) = (t.floor() as usize, t - t.floor());
        let lo = Self::sigma_of(self.alphas_cumprod[i]);
        if f == 0.0 {
            return lo;
        }
        let hi = Self::sigma_of(self.alphas_cumprod[(i + 1).min(self.len() - 1)]);
        lo + (hi - lo) * f
    }
}

/// How timesteps are spread over the training range (diffusers' `timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// The points a sampler visits.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Model timestep at each step.
    pub timesteps: Vec<f64>,
    /// σ at each step, plus the final σ (`timesteps.len() + 1` values).
    pub sigmas: Vec<f64>,
    /// Initial noise in the VE form is `noise * init_sigma`.
    pub init_sigma: f64,
}

impl Plan {
    /// diffusers' `EulerDiscreteScheduler` (interpolated sigmas, final σ = 0).
    pub fn euler_discrete(s: &Discrete, steps: usize, spacing: Spacing, steps_offset: usize) -> Plan {
        let n = s.len();
        let timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => (0..steps).rev().map(|i| if steps == 1 { (n - 1) as f64 } else { (n - 1) as f64 * i as f64 / (steps - 1) as f64 }).collect(),
            Spacing::Leading => {
                let ratio = n / steps;
                (0..steps).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
            }
            Spacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                (1..=steps).rev().map(|i| (n as f64 - (steps - i) as f64 * ratio).round() - 1.0).collect()
            }
        };
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| s.sigma(t)).collect();
        let max = sigmas[0];
        sigmas.push(0.0);
        // diffusers' init_noise_sigma: σ_max for linspace/trailing, sqrt(σ_max² + 1) for leading.
        let init_sigma = if spacing == Spacing::Leading { (max * max + 1.0).sqrt() } else { max };
        Plan { timesteps, sigmas, init_sigma }
    }

    /// diffusers' `DDIMScheduler` with η = 0 (leading spacing, `steps_offset`), as
    /// Euler steps in the VE form: the last step ends at ᾱ_0 unless `set_alpha_to_one`.
    pub fn ddim(s: &Discrete, steps: usize, steps_offset: usize, set_alpha_to_one: bool) -> Plan {
        let ratio = s.len() / steps;
        let timesteps: Vec<f64> = (0..steps).rev().map(|i| (i * ratio + steps_offset) as f64).collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| s.sigma(t)).collect();
        sigmas.push(if set_alpha_to_one { 0.0 } else { Discrete::sigma_of(s.alphas_cumprod[0]) });
        // DDIM starts from unit-variance noise in the VP form.
        let init_sigma = (sigmas[0] * sigmas[0] + 1.0).sqrt();
        Plan { timesteps, sigmas, init_sigma }
    }
}
