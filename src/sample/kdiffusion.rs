//! σ-space samplers as k-diffusion defines them (Crowson's `k_diffusion.sampling`,
//! after Karras et al. 2022 and Lu et al. 2022): each function takes one step from
//! σ_i to σ_{i+1} of a VE latent. Written from the published algorithms.
use super::{Denoiser, NoiseSampler, Plan};
use crate::error::Result;

/// What one step needs besides the latent: the model, the plan, the noise scale and
/// the noise source.
pub(super) struct Step<'s, 'd> {
    pub den: &'s mut Denoiser<'d>,
    pub plan: &'s Plan,
    /// Which step: from `plan.sigmas[i]` to `plan.sigmas[i + 1]`.
    pub i: usize,
    pub eta: f64,
    pub variance: crate::config::Variance,
    pub noise: &'s mut dyn NoiseSampler,
}

impl Step<'_, '_> {
    pub fn sigmas(&self) -> (f64, f64) {
        (self.plan.sigmas[self.i], self.plan.sigmas[self.i + 1])
    }
}

/// Earlier values a multistep method keeps, newest last, at most `N`.
pub(super) struct Recent<const N: usize>(Vec<Vec<f64>>);

impl<const N: usize> Default for Recent<N> {
    fn default() -> Self {
        Recent(Vec::with_capacity(N + 1))
    }
}

impl<const N: usize> Recent<N> {
    pub fn push(&mut self, v: Vec<f64>) {
        self.0.push(v);
        if self.0.len() > N {
            self.0.remove(0);
        }
    }
    /// The `back`-th newest (0: the newest).
    pub fn back(&self, back: usize) -> Option<&Vec<f64>> {
        self.0.len().checked_sub(back + 1).map(|k| &self.0[k])
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Oldest first.
    pub fn as_slice(&self) -> &[Vec<f64>] {
        &self.0
    }
}

/// DPM++ 2M's history: the previous denoised estimate.
#[derive(Default)]
pub(super) struct Dpm2M {
    old: Option<Vec<f64>>,
}

/// DPM++ 2M SDE's history: the previous estimate and its step in λ (none after a step
/// to σ = 0).
#[derive(Default)]
pub(super) struct Dpm2MSde {
    old: Option<Vec<f64>>,
    h: Option<f64>,
}

/// DPM++ 3M SDE's history: the last two estimates and the last two steps in λ.
#[derive(Default)]
pub(super) struct Dpm3MSde {
    old: Recent<2>,
    h: Vec<f64>,
}

/// (x − D) / σ: the probability-flow ODE's dx/dσ.
fn deriv(x: &[f64], den: &[f64], sigma: f64) -> Vec<f64> {
    x.iter().zip(den).map(|(x, d)| (x - d) / sigma).collect()
}

/// x + a·d.
fn axpy(x: &[f64], a: f64, d: &[f64]) -> Vec<f64> {
    x.iter().zip(d).map(|(x, d)| x + a * d).collect()
}

/// σ_down and σ_up of an ancestral step from σ to σ_next with noise scale η
/// (k-diffusion's `get_ancestral_step`): descend deterministically to σ_down, then add
/// σ_up of fresh noise so the marginal lands at σ_next.
pub(super) fn ancestral(sigma: f64, sigma_next: f64, eta: f64) -> (f64, f64) {
    if eta == 0.0 || sigma_next == 0.0 {
        return (sigma_next, 0.0);
    }
    let up = (eta
        * (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma))
            .sqrt())
    .min(sigma_next);
    let down = (sigma_next * sigma_next - up * up).sqrt();
    (down, up)
}

pub(super) fn add_noise(
    x: &mut [f64],
    noise: &mut dyn NoiseSampler,
    sigma: f64,
    sigma_next: f64,
    scale: f64,
) {
    if scale == 0.0 {
        return;
    }
    let z = noise.noise(sigma, sigma_next, x.len());
    for (x, z) in x.iter_mut().zip(z) {
        *x += z * scale;
    }
}

/// λ = −ln σ (half the log SNR), the variable of DPM-Solver.
fn lambda(sigma: f64) -> f64 {
    -sigma.ln()
}

/// DDIM with η (Song et al. 2021, eq. 12) in the VE form: the ancestral step with η,
/// since DDIM's σ_t(η)/sqrt(ᾱ_prev) equals k-diffusion's σ_up (DDIM keeps the
/// direction ε, so x_prev = D + σ_down ε + σ_up z).
pub(super) fn ddim(st: &mut Step, x: &[f64]) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let d0 = st.den.denoise_at(x, s, st.plan.timesteps[st.i])?;
    let (down, up) = ancestral(s, sn, st.eta);
    let eps = deriv(x, st.den.unclipped(), s);
    let mut out = axpy(&d0, down, &eps);
    add_noise(&mut out, st.noise, s, sn, up);
    Ok(out)
}

/// Euler's method, or with `ancestral` its ancestral form (η of fresh noise); the
/// deterministic form is the ancestral one at η = 0 (σ_down = σ_next, σ_up = 0).
pub(super) fn euler(st: &mut Step, x: &[f64], ancestral_noise: bool) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let d0 = st.den.denoise(x, s)?;
    let (down, up) = ancestral(s, sn, if ancestral_noise { st.eta } else { 0.0 });
    let mut out = axpy(x, down - s, &deriv(x, &d0, s));
    add_noise(&mut out, st.noise, s, sn, up);
    Ok(out)
}

/// Heun's second-order method (Karras et al. 2022, alg. 1).
pub(super) fn heun(st: &mut Step, x: &[f64]) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let d = deriv(x, &st.den.denoise(x, s)?, s);
    let x2 = axpy(x, sn - s, &d);
    if sn == 0.0 {
        return Ok(x2);
    }
    let d2 = deriv(&x2, &st.den.denoise(&x2, sn)?, sn);
    let avg: Vec<f64> = d.iter().zip(&d2).map(|(a, b)| (a + b) / 2.0).collect();
    Ok(axpy(x, sn - s, &avg))
}

/// DPM-Solver-2, the midpoint in log σ; with `ancestral_noise`, DPM2 a.
pub(super) fn dpm2(st: &mut Step, x: &[f64], ancestral_noise: bool) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let d0 = st.den.denoise(x, s)?;
    let (down, up) = ancestral(s, sn, if ancestral_noise { st.eta } else { 0.0 });
    let d = deriv(x, &d0, s);
    if down == 0.0 {
        return Ok(axpy(x, down - s, &d));
    }
    let mid = ((s.ln() + down.ln()) / 2.0).exp();
    let x2 = axpy(x, mid - s, &d);
    let d2 = deriv(&x2, &st.den.denoise(&x2, mid)?, mid);
    let mut out = axpy(x, down - s, &d2);
    add_noise(&mut out, st.noise, s, sn, up);
    Ok(out)
}

/// DPM-Solver++(2M) (Lu et al. 2022): second order from the previous estimate.
pub(super) fn dpmpp_2m(st: &mut Step, x: &[f64], hist: &mut Dpm2M) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let d0 = st.den.denoise(x, s)?;
    let old = hist.old.replace(d0.clone());
    if sn == 0.0 {
        return Ok(d0);
    }
    let h = lambda(sn) - lambda(s);
    let ratio = sn / s;
    let c = -(-h).exp_m1();
    Ok(match old {
        Some(old) if st.i > 0 => {
            let h_last = lambda(s) - lambda(st.plan.sigmas[st.i - 1]);
            let r = h_last / h;
            let (a, b) = (1.0 + 1.0 / (2.0 * r), 1.0 / (2.0 * r));
            x.iter()
                .zip(&d0)
                .zip(&old)
                .map(|((x, d), o)| ratio * x + c * (a * d - b * o))
                .collect()
        }
        _ => x.iter().zip(&d0).map(|(x, d)| ratio * x + c * d).collect(),
    })
}

/// DPM-Solver++(2S), single step, with ancestral noise.
pub(super) fn dpmpp_2s_a(st: &mut Step, x: &[f64]) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let d0 = st.den.denoise(x, s)?;
    let (down, up) = ancestral(s, sn, st.eta);
    let mut out = if down == 0.0 {
        axpy(x, down - s, &deriv(x, &d0, s))
    } else {
        let (t, tn) = (lambda(s), lambda(down));
        let h = tn - t;
        let sm = (-(t + 0.5 * h)).exp();
        let x2: Vec<f64> = x
            .iter()
            .zip(&d0)
            .map(|(x, d)| (sm / s) * x - (-0.5 * h).exp_m1() * d)
            .collect();
        let d2 = st.den.denoise(&x2, sm)?;
        x.iter()
            .zip(&d2)
            .map(|(x, d)| (down / s) * x - (-h).exp_m1() * d)
            .collect()
    };
    if sn > 0.0 {
        add_noise(&mut out, st.noise, s, sn, up);
    }
    Ok(out)
}

/// DPM-Solver++ SDE: two stages, the midpoint reached ancestrally.
pub(super) fn dpmpp_sde(st: &mut Step, x: &[f64]) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let d0 = st.den.denoise(x, s)?;
    if sn == 0.0 {
        return Ok(axpy(x, sn - s, &deriv(x, &d0, s)));
    }
    let (t, tn) = (lambda(s), lambda(sn));
    let h = tn - t;
    let r = 0.5;
    let sm = (-(t + h * r)).exp();
    let fac = 1.0 / (2.0 * r);
    // Stage 1: to the midpoint, ancestrally.
    let (down, up) = ancestral(s, sm, st.eta);
    let s_ = lambda(down);
    let mut x2: Vec<f64> = x
        .iter()
        .zip(&d0)
        .map(|(x, d)| (down / s) * x - (t - s_).exp_m1() * d)
        .collect();
    add_noise(&mut x2, st.noise, s, sm, up);
    let d2 = st.den.denoise(&x2, sm)?;
    // Stage 2: the whole step with the averaged estimate.
    let (down, up) = ancestral(s, sn, st.eta);
    let tn_ = lambda(down);
    let mut out: Vec<f64> = x
        .iter()
        .zip(&d0)
        .zip(&d2)
        .map(|((x, a), b)| (down / s) * x - (t - tn_).exp_m1() * ((1.0 - fac) * a + fac * b))
        .collect();
    add_noise(&mut out, st.noise, s, sn, up);
    Ok(out)
}

/// DPM-Solver++(2M) SDE, midpoint variant.
pub(super) fn dpmpp_2m_sde(st: &mut Step, x: &[f64], hist: &mut Dpm2MSde) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let d0 = st.den.denoise(x, s)?;
    let old = hist.old.replace(d0.clone());
    if sn == 0.0 {
        hist.h = None;
        return Ok(d0);
    }
    let h = lambda(sn) - lambda(s);
    let eh = st.eta * h;
    let c = -(-h - eh).exp_m1();
    let mut out: Vec<f64> = x
        .iter()
        .zip(&d0)
        .map(|(x, d)| sn / s * (-eh).exp() * x + c * d)
        .collect();
    if let (Some(old), Some(h_last)) = (old, hist.h) {
        let r = h_last / h;
        for ((o, d), od) in out.iter_mut().zip(&d0).zip(&old) {
            *o += 0.5 * c * (1.0 / r) * (d - od);
        }
    }
    add_noise(
        &mut out,
        st.noise,
        s,
        sn,
        sn * (-(-2.0 * eh).exp_m1()).sqrt(),
    );
    hist.h = Some(h);
    Ok(out)
}

/// DPM-Solver++(3M) SDE.
pub(super) fn dpmpp_3m_sde(st: &mut Step, x: &[f64], hist: &mut Dpm3MSde) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let d0 = st.den.denoise(x, s)?;
    let out = if sn == 0.0 {
        d0.clone()
    } else {
        let h = lambda(sn) - lambda(s);
        let he = h * (st.eta + 1.0);
        let mut out: Vec<f64> = x
            .iter()
            .zip(&d0)
            .map(|(x, d)| (-he).exp() * x - (-he).exp_m1() * d)
            .collect();
        let phi2 = (-he).exp_m1() / he + 1.0;
        let hs = &hist.h;
        match (hist.old.back(0), hist.old.back(1)) {
            (Some(d1), Some(d2)) if hs.len() >= 2 => {
                let (h1, h2) = (hs[hs.len() - 1], hs[hs.len() - 2]);
                let (r0, r1) = (h1 / h, h2 / h);
                let phi3 = phi2 / he - 0.5;
                for (k, o) in out.iter_mut().enumerate() {
                    let d10 = (d0[k] - d1[k]) / r0;
                    let d11 = (d1[k] - d2[k]) / r1;
                    let dd1 = d10 + (d10 - d11) * r0 / (r0 + r1);
                    let dd2 = (d10 - d11) / (r0 + r1);
                    *o += phi2 * dd1 - phi3 * dd2;
                }
            }
            (Some(d1), _) if !hs.is_empty() => {
                let r = hs[hs.len() - 1] / h;
                for ((o, a), b) in out.iter_mut().zip(&d0).zip(d1) {
                    *o += phi2 * (a - b) / r;
                }
            }
            _ => {}
        }
        if st.eta != 0.0 {
            let up = sn * (-(-2.0 * h * st.eta).exp_m1()).sqrt();
            add_noise(&mut out, st.noise, s, sn, up);
        }
        hist.h.push(h);
        if hist.h.len() > 2 {
            hist.h.remove(0);
        }
        out
    };
    hist.old.push(d0);
    Ok(out)
}

/// Linear multistep in σ, order 4 (k-diffusion's LMS): `derivs` holds the earlier
/// derivatives dx/dσ.
pub(super) fn lms(st: &mut Step, x: &[f64], derivs: &mut Recent<4>) -> Result<Vec<f64>> {
    let (s, _) = st.sigmas();
    let d0 = st.den.denoise(x, s)?;
    derivs.push(deriv(x, &d0, s));
    let order = (st.i + 1).min(4);
    let mut out = x.to_vec();
    for j in 0..order {
        let c = lms_coeff(order, &st.plan.sigmas, st.i, j);
        if let Some(d) = derivs.back(j) {
            for (o, d) in out.iter_mut().zip(d) {
                *o += c * d;
            }
        }
    }
    Ok(out)
}

/// iPNDM: Adams–Bashforth with constant-step weights on dx/dσ, up to 4th order
/// (Zhang & Chen 2023); `derivs` holds the three before this step's.
pub(super) fn ipndm(st: &mut Step, x: &[f64], derivs: &mut Recent<3>) -> Result<Vec<f64>> {
    let (s, sn) = st.sigmas();
    let d = deriv(x, &st.den.denoise(x, s)?, s);
    let dt = sn - s;
    let out: Vec<f64> = match (derivs.back(0), derivs.back(1), derivs.back(2)) {
        (Some(a), Some(b), Some(c)) => (0..x.len())
            .map(|k| x[k] + dt * (55.0 * d[k] - 59.0 * a[k] + 37.0 * b[k] - 9.0 * c[k]) / 24.0)
            .collect(),
        (Some(a), Some(b), None) => (0..x.len())
            .map(|k| x[k] + dt * (23.0 * d[k] - 16.0 * a[k] + 5.0 * b[k]) / 12.0)
            .collect(),
        (Some(a), None, _) => (0..x.len())
            .map(|k| x[k] + dt * (3.0 * d[k] - a[k]) / 2.0)
            .collect(),
        _ => axpy(x, dt, &d),
    };
    derivs.push(d);
    Ok(out)
}

/// ∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial of node σ_{i−j} over the
/// nodes σ_i … σ_{i−order+1}: the weight of the j-th newest derivative in a linear
/// multistep step. The integrand is a polynomial, integrated exactly.
fn lms_coeff(order: usize, t: &[f64], i: usize, j: usize) -> f64 {
    // Expand ∏_{k≠j} (τ − t_{i−k}) / (t_{i−j} − t_{i−k}) into coefficients of τ.
    let mut poly = vec![1.0];
    let mut denom = 1.0;
    for k in 0..order {
        if k == j {
            continue;
        }
        let root = t[i - k];
        let mut next = vec![0.0; poly.len() + 1];
        for (p, &c) in poly.iter().enumerate() {
            next[p + 1] += c;
            next[p] -= c * root;
        }
        poly = next;
        denom *= t[i - j] - root;
    }
    let integral = |tau: f64| {
        poly.iter()
            .enumerate()
            .map(|(p, c)| c * tau.powi(p as i32 + 1) / (p + 1) as f64)
            .sum::<f64>()
    };
    (integral(t[i + 1]) - integral(t[i])) / denom
}
