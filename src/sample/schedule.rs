//! Noise schedules: the model's discrete training schedule, and the sigma/timestep
//! sequences samplers walk (as diffusers' schedulers compute them).
//!
//! Everything is expressed in k-diffusion's variance-exploding form: a latent at
//! noise level σ is `x = x0 + σ ε`; the model sees `x / sqrt(1 + σ²)` (the
//! variance-preserving latent) at timestep t where σ(t) = sqrt((1 − ᾱ_t) / ᾱ_t).
//! (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models".)

use crate::config::{Betas, NoiseSchedule};

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
                let s = if i < steps / 2 {
                    a + step * i as f32
                } else {
                    b - step * (steps - 1 - i) as f32
                };
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

    /// The training schedule a model's config describes.
    pub fn of(s: &NoiseSchedule) -> Self {
        match s.betas {
            Betas::ScaledLinear { start, end } => Self::scaled_linear(start, end, s.train_steps),
            Betas::Linear { start, end } => Self::linear(start, end, s.train_steps),
            Betas::SquaredCos => Self::squared_cos(s.train_steps),
        }
    }

    /// DDPM's betas, linear in t (`torch.linspace` in f32, as diffusers builds them).
    pub fn linear(start: f64, end: f64, steps: usize) -> Self {
        let (a, b) = (start as f32, end as f32);
        let step = (b - a) / (steps - 1) as f32;
        let betas = (0..steps).map(|i| {
            if i < steps / 2 {
                a + step * i as f32
            } else {
                b - step * (steps - 1 - i) as f32
            }
        });
        Self::from_betas(betas)
    }

    /// The cosine schedule (Nichol & Dhariwal 2021, eq. 17): β_t = 1 − ᾱ(t+1)/ᾱ(t),
    /// capped at 0.999, computed in f64 then stored in f32 as diffusers does.
    pub fn squared_cos(steps: usize) -> Self {
        let bar = |t: f64| {
            ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        let n = steps as f64;
        let betas = (0..steps).map(|i| {
            let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
            (1.0 - bar(t2) / bar(t1)).min(0.999) as f32
        });
        Self::from_betas(betas)
    }

    /// ᾱ from f32 betas: `torch.cumprod` of 1 − β, accumulated in f64 (PyTorch's CPU
    /// accumulator for f32) and stored in f32.
    fn from_betas(betas: impl Iterator<Item = f32>) -> Self {
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .map(|b| {
                acc *= (1.0 - b) as f64;
                acc as f32 as f64
            })
            .collect();
        Discrete { alphas_cumprod }
    }

    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    /// Steps are Flawed", alg. 1): shifts and scales sqrt(ᾱ) so the last step is pure
    /// noise. ᾱ_T is then set to 2⁻²⁴ instead of 0, as diffusers does for its
    /// σ-space schedulers, so σ_max stays finite (≈ 4096).
    pub fn rescale_zero_terminal_snr(&self) -> Self {
        let s: Vec<f64> = self.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let (first, last) = (s[0], s[s.len() - 1]);
        let mut alphas_cumprod: Vec<f64> = s
            .iter()
            .map(|v| ((v - last) * first / (first - last)).powi(2))
            .collect();
        if let Some(l) = alphas_cumprod.last_mut() {
            *l = 2f64.powi(-24);
        }
        Discrete { alphas_cumprod }
    }

    pub(crate) fn sigma_of(ac: f64) -> f64 {
        ((1.0 - ac) / ac).sqrt()
    }

    /// The discrete σ at every training step, ascending (σ_0 … σ_{T-1}).
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|&a| Self::sigma_of(a))
            .collect()
    }

    pub fn sigma_min(&self) -> f64 {
        Self::sigma_of(self.alphas_cumprod[0])
    }

    pub fn sigma_max(&self) -> f64 {
        Self::sigma_of(self.alphas_cumprod[self.len() - 1])
    }

    /// The (fractional) timestep of σ: linear interpolation in log σ between the two
    /// neighbouring training steps (k-diffusion's `sigma_to_t`, also diffusers').
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let ls = sigma.max(1e-300).ln();
        let n = self.len();
        let log_sigma = |j: usize| Self::sigma_of(self.alphas_cumprod[j]).ln();
        // Index of the last training σ at or below `sigma` (σ rises with t), kept inside
        // [0, n-2]: a binary search instead of a log of all T levels on every call.
        let below = self
            .alphas_cumprod
            .partition_point(|&a| Self::sigma_of(a).ln() <= ls);
        let low = below.saturating_sub(1).min(n - 2);
        let (lo, hi) = (log_sigma(low), log_sigma(low + 1));
        let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
        low as f64 * (1.0 - w) + (low + 1) as f64 * w
    }

    /// σ at a fractional timestep by linear interpolation in log σ (the inverse of
    /// [`Discrete::sigma_to_t`]; k-diffusion's `t_to_sigma`).
    pub fn t_to_sigma(&self, t: f64) -> f64 {
        let last = (self.len() - 1) as f64;
        let t = t.clamp(0.0, last);
        let (i, f) = (t.floor() as usize, t - t.floor());
        let lo = Self::sigma_of(self.alphas_cumprod[i]).ln();
        let hi = Self::sigma_of(self.alphas_cumprod[(i + 1).min(self.len() - 1)]).ln();
        ((1.0 - f) * lo + f * hi).exp()
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
    pub fn euler_discrete(
        s: &Discrete,
        steps: usize,
        spacing: Spacing,
        steps_offset: usize,
    ) -> Plan {
        let n = s.len();
        let timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => (0..steps)
                .rev()
                .map(|i| {
                    if steps == 1 {
                        (n - 1) as f64
                    } else {
                        (n - 1) as f64 * i as f64 / (steps - 1) as f64
                    }
                })
                .collect(),
            Spacing::Leading => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + steps_offset) as f64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                (1..=steps)
                    .rev()
                    .map(|i| (n as f64 - (steps - i) as f64 * ratio).round() - 1.0)
                    .collect()
            }
        };
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| s.sigma(t)).collect();
        let max = sigmas[0];
        sigmas.push(0.0);
        // diffusers' init_noise_sigma: σ_max for linspace/trailing, sqrt(σ_max² + 1) for leading.
        let init_sigma = if spacing == Spacing::Leading {
            (max * max + 1.0).sqrt()
        } else {
            max
        };
        Plan {
            timesteps,
            sigmas,
            init_sigma,
        }
    }

    /// diffusers' `DDIMScheduler` with η = 0 (leading spacing, `steps_offset`), as
    /// Euler steps in the VE form: the last step ends at ᾱ_0 unless `set_alpha_to_one`.
    pub fn ddim(s: &Discrete, steps: usize, steps_offset: usize, set_alpha_to_one: bool) -> Plan {
        let ratio = s.len() / steps;
        let timesteps: Vec<f64> = (0..steps)
            .rev()
            .map(|i| (i * ratio + steps_offset) as f64)
            .collect();
        Self::ddim_at(s, timesteps, set_alpha_to_one)
    }

    /// DDIM on `spacing` (leading with steps_offset 1 as SD's configs, linspace or
    /// trailing); each step goes to t − T/steps, the last to ᾱ_0.
    pub fn ddim_spaced(s: &Discrete, steps: usize, spacing: Spacing) -> Plan {
        let steps = steps.max(1);
        let n = s.len();
        let timesteps: Vec<f64> = match spacing {
            Spacing::Leading => return Self::ddim(s, steps, 1, false),
            Spacing::Linspace => (0..steps)
                .rev()
                .map(|i| {
                    if steps == 1 {
                        (n - 1) as f64
                    } else {
                        ((n - 1) as f64 * i as f64 / (steps - 1) as f64).round()
                    }
                })
                .collect(),
            Spacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| (n as f64 - i as f64 * ratio).round() - 1.0)
                    .collect()
            }
        };
        Self::ddim_at(s, timesteps, false)
    }

    /// Each step lands on the next grid timestep (diffusers' t − T/steps, the same point
    /// on the evenly spaced leading and trailing grids) and the last on ᾱ_0.
    fn ddim_at(s: &Discrete, timesteps: Vec<f64>, set_alpha_to_one: bool) -> Plan {
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| s.sigma(t)).collect();
        sigmas.push(if set_alpha_to_one { 0.0 } else { s.sigma_min() });
        // DDIM starts from unit-variance noise in the VP form.
        let init_sigma = (sigmas[0] * sigmas[0] + 1.0).sqrt();
        Plan {
            timesteps,
            sigmas,
            init_sigma,
        }
    }
}

/// Which σ sequence a sampler walks (`--scheduler`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// The training schedule at evenly spaced timesteps, as diffusers' schedulers
    /// space them (σ interpolated linearly in t).
    Discrete(Spacing),
    /// Karras et al. 2022, eq. 5 (ρ = 7).
    Karras,
    /// Evenly spaced in log σ.
    Exponential,
    /// Align Your Steps (Sabour et al. 2024): the paper's optimised 10-step σ for SD 1.5
    /// or SDXL, log-linearly interpolated to other step counts.
    Ays,
    /// Evenly spaced timesteps from t(σ_max) to t(σ_min) (σ log-interpolated), as
    /// ComfyUI's `sgm_uniform`.
    SgmUniform,
    /// Every (T/steps)-th training σ from the top, as ComfyUI's `simple`.
    Simple,
}

/// Align Your Steps' optimised 10-step noise levels (Sabour et al., arXiv 2404.14507;
/// the full-precision values of NVIDIA's AYS how-to): SD 1.5 and SDXL. The last level
/// is replaced by 0 when used.
const AYS_SD15: [f64; 11] = [
    14.6146412293,
    6.4745760956,
    3.8636745985,
    2.694615152,
    1.8841921177,
    1.3943805092,
    0.9642583904,
    0.6523686016,
    0.3977456272,
    0.1515232662,
    0.0291671582,
];
const AYS_SDXL: [f64; 11] = [
    14.6146412293,
    6.3184485287,
    3.7681790315,
    2.1811480769,
    1.3405244945,
    0.8620721141,
    0.5550693289,
    0.3798540708,
    0.2332364134,
    0.1114188177,
    0.0291671582,
];

/// Options that shape a σ schedule.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScheduleOpts {
    /// Overrides of the model's σ range (`--sigma-min/--sigma-max`).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Use the SDXL table of Align Your Steps.
    pub xl: bool,
}

impl Schedule {
    pub const NAMES: &'static [&'static str] = &[
        "discrete",
        "leading",
        "trailing",
        "karras",
        "exponential",
        "ays",
        "sgm_uniform",
        "simple",
    ];

    pub fn parse(s: &str) -> Option<Schedule> {
        Some(match s {
            "discrete" | "linspace" | "normal" => Schedule::Discrete(Spacing::Linspace),
            "leading" => Schedule::Discrete(Spacing::Leading),
            "trailing" => Schedule::Discrete(Spacing::Trailing),
            "karras" => Schedule::Karras,
            "exponential" => Schedule::Exponential,
            "ays" => Schedule::Ays,
            "sgm_uniform" => Schedule::SgmUniform,
            "simple" => Schedule::Simple,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Discrete(Spacing::Linspace) => "discrete",
            Schedule::Discrete(Spacing::Leading) => "leading",
            Schedule::Discrete(Spacing::Trailing) => "trailing",
            Schedule::Karras => "karras",
            Schedule::Exponential => "exponential",
            Schedule::Ays => "ays",
            Schedule::SgmUniform => "sgm_uniform",
            Schedule::Simple => "simple",
        }
    }

    /// The plan of `steps` steps: σ descending to 0, the model timestep at each σ.
    pub fn plan(self, d: &Discrete, steps: usize, opts: &ScheduleOpts) -> Plan {
        let steps = steps.max(1);
        let (lo, hi) = (
            opts.sigma_min.unwrap_or_else(|| d.sigma_min()),
            opts.sigma_max.unwrap_or_else(|| d.sigma_max()),
        );
        let mut sigmas: Vec<f64> = match self {
            Schedule::Discrete(spacing) => return Plan::euler_discrete(d, steps, spacing, 1),
            Schedule::Karras => {
                let rho = 7.0;
                let (a, b) = (hi.powf(1.0 / rho), lo.powf(1.0 / rho));
                (0..steps)
                    .map(|i| (a + ramp(i, steps) * (b - a)).powf(rho))
                    .collect()
            }
            Schedule::Exponential => (0..steps)
                .map(|i| (hi.ln() + ramp(i, steps) * (lo.ln() - hi.ln())).exp())
                .collect(),
            Schedule::Ays => {
                let table = if opts.xl { &AYS_SDXL } else { &AYS_SD15 };
                let mut s = loglinear_interp(table, steps + 1);
                s.truncate(steps);
                s
            }
            Schedule::SgmUniform => {
                let (t0, t1) = (d.sigma_to_t(hi), d.sigma_to_t(lo));
                (0..steps)
                    .map(|i| d.t_to_sigma(t0 + (t1 - t0) * i as f64 / steps as f64))
                    .collect()
            }
            Schedule::Simple => {
                let all = d.sigmas();
                let ss = all.len() as f64 / steps as f64;
                (0..steps)
                    .map(|i| all[all.len() - 1 - (i as f64 * ss) as usize])
                    .collect()
            }
        };
        let timesteps = sigmas.iter().map(|&s| d.sigma_to_t(s)).collect();
        let init_sigma = sigmas[0];
        sigmas.push(0.0);
        Plan {
            timesteps,
            sigmas,
            init_sigma,
        }
    }
}

/// i/(n-1), or 0 for a single step.
fn ramp(i: usize, n: usize) -> f64 {
    if n <= 1 {
        0.0
    } else {
        i as f64 / (n - 1) as f64
    }
}

/// Resamples a descending σ table to `n` points, linearly in log σ over an evenly
/// spaced index (the interpolation the AYS authors give for other step counts).
fn loglinear_interp(table: &[f64], n: usize) -> Vec<f64> {
    let ys: Vec<f64> = table.iter().rev().map(|s| s.ln()).collect();
    let m = ys.len();
    let mut out: Vec<f64> = (0..n)
        .map(|i| {
            let x = ramp(i, n) * (m - 1) as f64;
            let j = (x.floor() as usize).min(m - 2);
            let f = x - j as f64;
            (ys[j] * (1.0 - f) + ys[j + 1] * f).exp()
        })
        .collect();
    out.reverse();
    out
}

impl Plan {
    /// The last `round_down(steps · strength)` steps (img2img / partial denoising,
    /// as diffusers' img2img pipelines cut a schedule): sampling starts at the noise
    /// level of the first kept step.
    pub fn tail(&self, strength: f64) -> Plan {
        let n = self.timesteps.len();
        let keep = ((n as f64 * strength.clamp(0.0, 1.0)) as usize).min(n);
        let start = n - keep;
        if start == 0 {
            return self.clone();
        }
        let sigmas = self.sigmas[start..].to_vec();
        Plan {
            timesteps: self.timesteps[start..].to_vec(),
            init_sigma: sigmas[0],
            sigmas,
        }
    }
}
