//! Sampling: a schedule of noise levels, a denoiser, and the steps between them.
//! Classifier-free guidance lives in the caller's [`Model`], not here; samplers never
//! see ggml.
//!
//! Every sampler works in k-diffusion's variance-exploding form (Karras et al. 2022):
//! the latent at noise level σ is `x = x0 + σ ε`, held in f64, and the network is a
//! denoiser `D(x; σ) ≈ x0`. Samplers that diffusers writes in the variance-preserving
//! form (DDIM, LCM, TCD, PLMS, UniPC) are the same updates divided by sqrt(ᾱ); they are
//! written here in the VE form so one loop serves all of them.
pub mod brownian;
mod ddpm;
mod kdiffusion;
mod lcm;
mod multistep;
pub mod names;
pub mod philox;
pub mod rng;
pub mod schedule;
pub mod score_sde;

pub use brownian::BrownianNoise;
pub use ddpm::ddpm_plan;
pub use lcm::{lcm_plan, tcd_plan};
pub use multistep::{plms_plan, plms_plan_at};
pub use philox::CudaRng;
pub use rng::{NativeRng, Rng, TorchRng};
pub use schedule::{Discrete, Plan, Schedule, ScheduleOpts, Spacing};

use crate::config::{NoiseSchedule, Prediction, Variance};
use crate::error::{Error, Result};

/// One call of the network: `model_input` (the VP latent, batch of one) at
/// `timestep` → the raw model output (guidance already applied).
pub trait Model {
    fn predict(&mut self, model_input: &[f32], timestep: f64) -> Result<Vec<f32>>;

    /// The same in f64. Networks compute in f32 and keep this default; exact models
    /// (the analytic denoiser of the sampler tests) override it.
    fn predict64(&mut self, model_input: &[f64], timestep: f64) -> Result<Vec<f64>> {
        let input: Vec<f32> = model_input.iter().map(|&v| v as f32).collect();
        Ok(self
            .predict(&input, timestep)?
            .into_iter()
            .map(|v| v as f64)
            .collect())
    }
}

/// The denoised estimate x0 from a VE latent `x` at noise level `sigma`, calling the
/// model at `timestep`.
fn denoise64(
    model: &mut dyn Model,
    prediction: Prediction,
    x: &[f64],
    sigma: f64,
    timestep: f64,
) -> Result<Vec<f64>> {
    let c_in = 1.0 / (sigma * sigma + 1.0).sqrt();
    let input: Vec<f64> = x.iter().map(|&v| v * c_in).collect();
    let out = model.predict64(&input, timestep)?;
    if out.len() != x.len() {
        return Err(Error::Invalid(format!(
            "the model returned {} values for a latent of {}",
            out.len(),
            x.len()
        )));
    }
    Ok(match prediction {
        Prediction::Epsilon => x.iter().zip(&out).map(|(&x, &e)| x - sigma * e).collect(),
        // x0 = ᾱ^½ x_vp − (1−ᾱ)^½ v, with ᾱ^½ = c_in and x_vp = c_in x.
        Prediction::V => x
            .iter()
            .zip(&out)
            .map(|(&x, &v)| x * c_in * c_in - v * sigma * c_in)
            .collect(),
        Prediction::Sample => out,
    })
}

/// The model seen as `D(x; σ)`. The timestep for σ is the plan's own where σ is one of
/// its levels (so diffusers' linearly interpolated timesteps are kept exactly), and
/// k-diffusion's log-σ interpolation for the intermediate levels of two-stage samplers.
pub struct Denoiser<'a> {
    model: &'a mut dyn Model,
    prediction: Prediction,
    schedule: &'a Discrete,
    known: Vec<(f64, f64)>,
    /// The latest estimate of the clean latent (what step previews show).
    last: Vec<f64>,
    /// DDPM and DDIM clip the clean estimate to ±this (the model's `clip_sample`).
    clip: Option<f64>,
    /// The estimate before clipping (empty when nothing is clipped).
    raw: Vec<f64>,
}

impl<'a> Denoiser<'a> {
    pub fn new(
        model: &'a mut dyn Model,
        prediction: Prediction,
        schedule: &'a Discrete,
        plan: &Plan,
    ) -> Self {
        let known = plan
            .sigmas
            .iter()
            .zip(&plan.timesteps)
            .map(|(&s, &t)| (s, t))
            .collect();
        Denoiser {
            model,
            prediction,
            schedule,
            known,
            last: Vec::new(),
            clip: None,
            raw: Vec::new(),
        }
    }

    /// Clips every clean estimate to ±`range` (diffusers' `clip_sample`, which its
    /// DDPM and DDIM schedulers apply to the predicted original sample).
    pub fn with_clip(mut self, range: Option<f64>) -> Self {
        self.clip = range;
        self
    }

    pub fn timestep(&self, sigma: f64) -> f64 {
        self.known
            .iter()
            .find(|(s, _)| *s == sigma)
            .map_or_else(|| self.schedule.sigma_to_t(sigma), |k| k.1)
    }

    pub fn denoise(&mut self, x: &[f64], sigma: f64) -> Result<Vec<f64>> {
        let t = self.timestep(sigma);
        self.denoise_at(x, sigma, t)
    }

    /// σ of training step `t` (clamped to the schedule).
    pub fn training_sigma(&self, t: usize) -> f64 {
        let a = &self.schedule.alphas_cumprod;
        Discrete::sigma_of(a[t.min(a.len() - 1)])
    }

    /// The model's x0 at an explicit timestep (timestep-based samplers).
    pub fn denoise_at(&mut self, x: &[f64], sigma: f64, timestep: f64) -> Result<Vec<f64>> {
        let mut d = denoise64(self.model, self.prediction, x, sigma, timestep)?;
        if let Some(r) = self.clip {
            self.raw.clone_from(&d);
            for v in &mut d {
                *v = v.clamp(-r, r);
            }
        }
        self.last.clone_from(&d);
        Ok(d)
    }

    /// The latest clean estimate before clipping: DDIM keeps the model's own ε (diffusers'
    /// `use_clipped_model_output` is off) while it moves towards the clipped sample.
    pub fn unclipped(&self) -> &[f64] {
        if self.clip.is_some() {
            &self.raw
        } else {
            &self.last
        }
    }

    /// The clean latent the model last predicted (empty before its first call).
    pub fn last_denoised(&self) -> &[f64] {
        &self.last
    }

    /// Makes `x0` the clean estimate of this step: a consistency model's is its
    /// boundary-conditioned output, not the raw prediction (diffusers' LCMScheduler
    /// returns it as `denoised`), and its last step's is the image itself.
    fn set_estimate(&mut self, x0: &[f64]) {
        self.last.clear();
        self.last.extend_from_slice(x0);
    }
}

/// Fresh Gaussian noise for a stochastic step from σ to σ_next.
pub trait NoiseSampler {
    fn noise(&mut self, sigma: f64, sigma_next: f64, n: usize) -> Vec<f64>;
}

/// Independent draws from a seeded generator at every call (ancestral samplers: what
/// diffusers does with its generator, so the torch generator reproduces its images).
pub struct IidNoise<'a>(pub &'a mut dyn Rng);

impl NoiseSampler for IidNoise<'_> {
    fn noise(&mut self, _sigma: f64, _sigma_next: f64, n: usize) -> Vec<f64> {
        self.0.randn(n).into_iter().map(|v| v as f64).collect()
    }
}

/// The sampling algorithms (CLI names follow stable-diffusion.cpp where it has them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    Euler,
    EulerA,
    Heun,
    Dpm2,
    Dpm2A,
    DpmPP2M,
    DpmPP2SA,
    DpmPPSde,
    DpmPP2MSde,
    DpmPP3MSde,
    Ddim,
    Ddpm,
    Plms,
    Lms,
    UniPc,
    Ipndm,
    Lcm,
    Tcd,
    ScoreSdeVe,
}

/// What `--list-samplers` shows.
pub struct SamplerInfo {
    pub sampler: Sampler,
    pub name: &'static str,
    pub display: &'static str,
    /// Order of accuracy of the deterministic part.
    pub order: u32,
    /// Model evaluations per step.
    pub evals_per_step: u32,
    pub stochastic: bool,
    pub about: &'static str,
}

const INFO: &[SamplerInfo] = &[
    SamplerInfo {
        sampler: Sampler::Euler,
        name: "euler",
        display: "Euler",
        order: 1,
        evals_per_step: 1,
        stochastic: false,
        about: "Euler's method on the probability-flow ODE (Karras et al. 2022, alg. 2)",
    },
    SamplerInfo {
        sampler: Sampler::EulerA,
        name: "euler_a",
        display: "Euler a",
        order: 1,
        evals_per_step: 1,
        stochastic: true,
        about: "Euler with ancestral noise (k-diffusion)",
    },
    SamplerInfo {
        sampler: Sampler::Heun,
        name: "heun",
        display: "Heun",
        order: 2,
        evals_per_step: 2,
        stochastic: false,
        about: "Heun's second-order method (Karras et al. 2022, alg. 1)",
    },
    SamplerInfo {
        sampler: Sampler::Dpm2,
        name: "dpm2",
        display: "DPM2",
        order: 2,
        evals_per_step: 2,
        stochastic: false,
        about: "DPM-Solver-2 midpoint in log σ (Karras et al. 2022's variant)",
    },
    SamplerInfo {
        sampler: Sampler::Dpm2A,
        name: "dpm2_a",
        display: "DPM2 a",
        order: 2,
        evals_per_step: 2,
        stochastic: true,
        about: "DPM2 with ancestral noise",
    },
    SamplerInfo {
        sampler: Sampler::DpmPP2M,
        name: "dpm++2m",
        display: "DPM++ 2M",
        order: 2,
        evals_per_step: 1,
        stochastic: false,
        about: "DPM-Solver++(2M) multistep (Lu et al. 2022)",
    },
    SamplerInfo {
        sampler: Sampler::DpmPP2SA,
        name: "dpm++2s_a",
        display: "DPM++ 2S a",
        order: 2,
        evals_per_step: 2,
        stochastic: true,
        about: "DPM-Solver++(2S) single-step with ancestral noise",
    },
    SamplerInfo {
        sampler: Sampler::DpmPPSde,
        name: "dpm++sde",
        display: "DPM++ SDE",
        order: 2,
        evals_per_step: 2,
        stochastic: true,
        about: "DPM-Solver++ SDE, two stages, Brownian noise",
    },
    SamplerInfo {
        sampler: Sampler::DpmPP2MSde,
        name: "dpm++2m_sde",
        display: "DPM++ 2M SDE",
        order: 2,
        evals_per_step: 1,
        stochastic: true,
        about: "DPM-Solver++(2M) SDE, midpoint",
    },
    SamplerInfo {
        sampler: Sampler::DpmPP3MSde,
        name: "dpm++3m_sde",
        display: "DPM++ 3M SDE",
        order: 3,
        evals_per_step: 1,
        stochastic: true,
        about: "DPM-Solver++(3M) SDE",
    },
    SamplerInfo {
        sampler: Sampler::Ddim,
        name: "ddim",
        display: "DDIM",
        order: 1,
        evals_per_step: 1,
        stochastic: false,
        about: "DDIM (Song et al. 2021); --eta > 0 adds noise (η = 1 is DDPM)",
    },
    SamplerInfo {
        sampler: Sampler::Ddpm,
        name: "ddpm",
        display: "DDPM",
        order: 1,
        evals_per_step: 1,
        stochastic: true,
        about: "DDPM ancestral sampling with the posterior variance (Ho et al. 2020), as diffusers' DDPMScheduler",
    },
    SamplerInfo {
        sampler: Sampler::Plms,
        name: "plms",
        display: "PLMS",
        order: 4,
        evals_per_step: 1,
        stochastic: false,
        about: "pseudo linear multistep (Liu et al. 2022, PNDM without Runge-Kutta warm-up)",
    },
    SamplerInfo {
        sampler: Sampler::Lms,
        name: "lms",
        display: "LMS",
        order: 4,
        evals_per_step: 1,
        stochastic: false,
        about: "linear multistep in σ, order 4 (k-diffusion)",
    },
    SamplerInfo {
        sampler: Sampler::UniPc,
        name: "unipc",
        display: "UniPC",
        order: 2,
        evals_per_step: 1,
        stochastic: false,
        about: "UniPC bh2 predictor-corrector (Zhao et al. 2023)",
    },
    SamplerInfo {
        sampler: Sampler::Ipndm,
        name: "ipndm",
        display: "iPNDM",
        order: 4,
        evals_per_step: 1,
        stochastic: false,
        about: "improved PNDM: Adams-Bashforth in σ (Zhang & Chen 2023)",
    },
    SamplerInfo {
        sampler: Sampler::Lcm,
        name: "lcm",
        display: "LCM",
        order: 1,
        evals_per_step: 1,
        stochastic: true,
        about: "latent consistency sampling (Luo et al. 2023); for LCM-distilled models",
    },
    SamplerInfo {
        sampler: Sampler::Tcd,
        name: "tcd",
        display: "TCD",
        order: 1,
        evals_per_step: 1,
        stochastic: true,
        about: "trajectory consistency distillation sampling (Zheng et al. 2024), --eta is its γ",
    },
    SamplerInfo {
        sampler: Sampler::ScoreSdeVe,
        name: "score_sde_ve",
        display: "Score SDE VE",
        order: 1,
        evals_per_step: 2,
        stochastic: true,
        about: "reverse-diffusion predictor and Langevin corrector (Song et al. 2021); for VE score models",
    },
];

impl Sampler {
    pub fn parse(name: &str) -> Option<Self> {
        INFO.iter().find(|i| i.name == name).map(|i| i.sampler)
    }

    pub fn info(self) -> &'static SamplerInfo {
        // Every variant has a row (checked by a test).
        INFO.iter().find(|i| i.sampler == self).unwrap_or(&INFO[0])
    }

    pub fn all() -> &'static [SamplerInfo] {
        INFO
    }

    pub fn names() -> Vec<&'static str> {
        INFO.iter().map(|i| i.name).collect()
    }

    /// Whether the sampler walks its own timestep grid (diffusers-style) rather than
    /// a σ schedule chosen with `--scheduler`.
    pub fn has_own_timesteps(self) -> bool {
        matches!(
            self,
            Sampler::Ddim | Sampler::Ddpm | Sampler::Plms | Sampler::Lcm | Sampler::Tcd
        )
    }

    /// Whether noise comes from a Brownian path (so a step's noise does not depend on
    /// how the interval was split) rather than fresh draws.
    pub fn brownian(self) -> bool {
        matches!(
            self,
            Sampler::DpmPPSde | Sampler::DpmPP2MSde | Sampler::DpmPP3MSde
        )
    }
}

/// Sampler parameters beyond the plan.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Noise scale of ancestral / SDE / DDIM steps (`--eta`); TCD's γ.
    pub eta: f64,
    /// The variance of DDPM's steps (the model's `variance_type`).
    pub variance: Variance,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            eta: 1.0,
            variance: Variance::FixedSmall,
        }
    }
}

impl Settings {
    /// The η a sampler uses when the user gives none: 0 for DDIM (deterministic DDIM),
    /// 0.3 for TCD (its paper's default γ), 1 for ancestral and SDE samplers.
    pub fn default_for(sampler: Sampler) -> Self {
        Settings {
            eta: match sampler {
                Sampler::Ddim => 0.0,
                Sampler::Tcd => 0.3,
                _ => 1.0,
            },
            ..Settings::default()
        }
    }
}

/// The plan a sampler walks: its own timestep grid for DDIM/DDPM/PLMS/LCM/TCD (laid
/// out as the model's scheduler config says: `grid.steps_offset`, and where the last
/// step lands), otherwise the chosen σ schedule.
/// `strength` < 1 keeps only the tail of the plan (img2img): the last
/// ⌊steps·strength⌋ steps, or for LCM/TCD the grid of a distillation schedule cut at
/// that strength, as diffusers' pipelines do.
pub fn plan_for(
    sampler: Sampler,
    schedule: Schedule,
    d: &Discrete,
    steps: usize,
    opts: &ScheduleOpts,
    strength: f64,
    grid: &NoiseSchedule,
) -> Plan {
    // DDIM runs on the config's leading grid unless trailing is asked for; an unset
    // `set_alpha_to_one` is each scheduler's default (DDIM's true, PNDM's false).
    let spacing = match schedule {
        Schedule::Discrete(Spacing::Trailing) => Spacing::Trailing,
        _ => Spacing::Leading,
    };
    let last_is_clean = |default: bool| grid.set_alpha_to_one.unwrap_or(default);
    match sampler {
        Sampler::Ddim if spacing == Spacing::Leading => {
            Plan::ddim(d, steps, grid.steps_offset, last_is_clean(true)).tail(strength)
        }
        Sampler::Ddim => Plan::ddim_spaced(d, steps, spacing).tail(strength),
        Sampler::Ddpm => ddpm::ddpm_plan(d, steps, grid.steps_offset).tail(strength),
        Sampler::Plms => multistep::plms_plan_at(d, steps, grid.steps_offset, last_is_clean(false))
            .tail(strength),
        Sampler::Lcm => lcm::lcm_plan(d, steps, 50, strength),
        Sampler::Tcd => lcm::tcd_plan(d, steps, 50, strength),
        _ => schedule.plan(d, steps, opts).tail(strength),
    }
}

/// The VE latent sampling starts from: `noise · init_sigma` for txt2img, or the image
/// latent noised to the plan's first level (img2img; `noise` is unit Gaussian).
pub fn start_latent(plan: &Plan, noise: &[f32], image: Option<&[f32]>) -> Vec<f64> {
    match image {
        None => noise.iter().map(|&n| n as f64 * plan.init_sigma).collect(),
        Some(img) => img
            .iter()
            .zip(noise)
            .map(|(&x, &n)| x as f64 + n as f64 * plan.sigmas[0])
            .collect(),
    }
}

/// A sampler with the history its family keeps between steps.
enum Family {
    Euler {
        ancestral: bool,
    },
    Heun,
    Dpm2 {
        ancestral: bool,
    },
    DpmPP2M(kdiffusion::Dpm2M),
    DpmPP2SA,
    DpmPPSde,
    DpmPP2MSde(kdiffusion::Dpm2MSde),
    DpmPP3MSde(kdiffusion::Dpm3MSde),
    Lms(kdiffusion::Recent<4>),
    Ipndm(kdiffusion::Recent<3>),
    Ddim,
    Ddpm,
    Plms(multistep::Plms),
    UniPc(multistep::UniPc),
    Lcm,
    Tcd,
    /// Runs through [`score_sde::sample`], not step by step.
    ScoreSde,
}

impl Family {
    fn new(sampler: Sampler) -> Family {
        match sampler {
            Sampler::Euler => Family::Euler { ancestral: false },
            Sampler::EulerA => Family::Euler { ancestral: true },
            Sampler::Heun => Family::Heun,
            Sampler::Dpm2 => Family::Dpm2 { ancestral: false },
            Sampler::Dpm2A => Family::Dpm2 { ancestral: true },
            Sampler::DpmPP2M => Family::DpmPP2M(Default::default()),
            Sampler::DpmPP2SA => Family::DpmPP2SA,
            Sampler::DpmPPSde => Family::DpmPPSde,
            Sampler::DpmPP2MSde => Family::DpmPP2MSde(Default::default()),
            Sampler::DpmPP3MSde => Family::DpmPP3MSde(Default::default()),
            Sampler::Lms => Family::Lms(Default::default()),
            Sampler::Ipndm => Family::Ipndm(Default::default()),
            Sampler::Ddim => Family::Ddim,
            Sampler::Ddpm => Family::Ddpm,
            Sampler::Plms => Family::Plms(Default::default()),
            Sampler::UniPc => Family::UniPc(Default::default()),
            Sampler::Lcm => Family::Lcm,
            Sampler::Tcd => Family::Tcd,
            Sampler::ScoreSdeVe => Family::ScoreSde,
        }
    }

    fn step(&mut self, st: &mut kdiffusion::Step, x: &[f64]) -> Result<Vec<f64>> {
        match self {
            Family::Euler { ancestral } => kdiffusion::euler(st, x, *ancestral),
            Family::Heun => kdiffusion::heun(st, x),
            Family::Dpm2 { ancestral } => kdiffusion::dpm2(st, x, *ancestral),
            Family::DpmPP2M(h) => kdiffusion::dpmpp_2m(st, x, h),
            Family::DpmPP2SA => kdiffusion::dpmpp_2s_a(st, x),
            Family::DpmPPSde => kdiffusion::dpmpp_sde(st, x),
            Family::DpmPP2MSde(h) => kdiffusion::dpmpp_2m_sde(st, x, h),
            Family::DpmPP3MSde(h) => kdiffusion::dpmpp_3m_sde(st, x, h),
            Family::Lms(h) => kdiffusion::lms(st, x, h),
            Family::Ipndm(h) => kdiffusion::ipndm(st, x, h),
            Family::Ddim => kdiffusion::ddim(st, x),
            Family::Ddpm => ddpm::ddpm_step(st, x),
            Family::Plms(h) => multistep::plms_step(st, x, h),
            Family::UniPc(h) => multistep::unipc_step(st, x, h),
            Family::Lcm => lcm::lcm_step(st, x),
            Family::Tcd => lcm::tcd_step(st, x),
            Family::ScoreSde => Err(Error::Invalid(
                "score_sde_ve sampling is for score models of the VE SDE (NCSN++), which take no prompt".into(),
            )),
        }
    }
}

/// What [`sample`] calls after each step: `(step, latent, denoised)`.
pub type OnStep<'a> = dyn FnMut(usize, &mut [f64], &[f64]) + 'a;

/// Runs `plan` from the VE latent `x` and returns the VP latent after every step;
/// `on_step(i, x, denoised)` is called after step i with the VE latent, which it may
/// change before the next step, and the model's latest clean estimate (inpainting with an ordinary UNet blends the re-noised image
/// back outside the mask there, as diffusers does after each scheduler step).
pub fn sample(
    den: &mut Denoiser<'_>,
    sampler: Sampler,
    settings: &Settings,
    plan: &Plan,
    mut x: Vec<f64>,
    noise: &mut dyn NoiseSampler,
    on_step: &mut OnStep<'_>,
) -> Result<Vec<Vec<f32>>> {
    let n = plan.timesteps.len();
    if plan.sigmas.len() != n + 1 {
        return Err(Error::Invalid(format!(
            "a plan of {n} steps needs {} noise levels, not {}",
            n + 1,
            plan.sigmas.len()
        )));
    }
    let mut trajectory = Vec::with_capacity(n);
    let mut family = Family::new(sampler);
    for i in 0..n {
        let mut step = kdiffusion::Step {
            den: &mut *den,
            plan,
            i,
            eta: settings.eta,
            variance: settings.variance,
            noise: &mut *noise,
        };
        x = family.step(&mut step, &x)?;
        on_step(i, &mut x, den.last_denoised());
        let s = plan.sigmas[i + 1];
        let c = 1.0 / (s * s + 1.0).sqrt();
        trajectory.push(x.iter().map(|&v| (v * c) as f32).collect());
    }
    Ok(trajectory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sampler_has_one_info_row_and_parses_by_name() {
        for info in Sampler::all() {
            assert_eq!(Sampler::parse(info.name), Some(info.sampler));
            assert_eq!(info.sampler.info().name, info.name);
        }
        assert_eq!(Sampler::all().len(), 19);
        assert_eq!(Sampler::parse("euler_ancestral"), None);
    }
}
