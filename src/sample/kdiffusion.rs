//! σ-space samplers as k-diffusion defines them (Crowson's `k_diffusion.sampling`,
//! after Karras et al. 2022 and Lu et al. 2022): each function takes one step from
//! σ_i to σ_{i+1} of a VE latent. Written from the published algorithms.
use super::{Denoiser, NoiseSampler, Plan, Sampler};
use crate::error::Result;

/// History kept between steps by multistep methods.
#[derive(Default)]
pub(super) struct State {
    /// Earlier denoised estimates, newest last.
    pub denoised: Vec<Vec<f64>>,
    /// Earlier derivatives (x − D)/σ, newest last.
    pub derivs: Vec<Vec<f64>>,
    /// Earlier step sizes in log σ, newest last.
    pub h: Vec<f64>,
    /// Free slot for samplers with their own bookkeeping (PLMS, UniPC).
    pub extra: Vec<Vec<f64>>,
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

fn add_noise(x: &mut [f64], noise: &mut dyn NoiseSampler, sigma: f64, sigma_next: f64, scale: f64) {
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
pub(super) fn ddim_step(
    den: &mut Denoiser<'_>,
    plan: &Plan,
    i: usize,
    x: &[f64],
    eta: f64,
    noise: &mut dyn NoiseSampler,
) -> Result<Vec<f64>> {
    let (s, sn) = (plan.sigmas[i], plan.sigmas[i + 1]);
    let d0 = den.denoise_at(x, s, plan.timesteps[i])?;
    let (down, up) = ancestral(s, sn, eta);
    let eps = deriv(x, &d0, s);
    let mut out = axpy(&d0, down, &eps);
    add_noise(&mut out, noise, s, sn, up);
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn step(
    sampler: Sampler,
    den: &mut Denoiser<'_>,
    plan: &Plan,
    i: usize,
    x: &[f64],
    eta: f64,
    noise: &mut dyn NoiseSampler,
    st: &mut State,
) -> Result<Vec<f64>> {
    let sig = &plan.sigmas;
    let (s, sn) = (sig[i], sig[i + 1]);
    let d0 = den.denoise(x, s)?;
    let out = match sampler {
        // The deterministic methods are their ancestral forms at η = 0 (σ_down = σ_next,
        // σ_up = 0: no noise is drawn).
        Sampler::Euler | Sampler::EulerA => {
            let (down, up) = ancestral(s, sn, if sampler == Sampler::Euler { 0.0 } else { eta });
            let mut out = axpy(x, down - s, &deriv(x, &d0, s));
            add_noise(&mut out, noise, s, sn, up);
            out
        }
        Sampler::Heun => {
            let d = deriv(x, &d0, s);
            let x2 = axpy(x, sn - s, &d);
            if sn == 0.0 {
                x2
            } else {
                let d2 = deriv(&x2, &den.denoise(&x2, sn)?, sn);
                let avg: Vec<f64> = d.iter().zip(&d2).map(|(a, b)| (a + b) / 2.0).collect();
                axpy(x, sn - s, &avg)
            }
        }
        Sampler::Dpm2 | Sampler::Dpm2A => {
            let (down, up) = ancestral(s, sn, if sampler == Sampler::Dpm2 { 0.0 } else { eta });
            let d = deriv(x, &d0, s);
            if down == 0.0 {
                axpy(x, down - s, &d)
            } else {
                let mid = ((s.ln() + down.ln()) / 2.0).exp();
                let x2 = axpy(x, mid - s, &d);
                let d2 = deriv(&x2, &den.denoise(&x2, mid)?, mid);
                let mut out = axpy(x, down - s, &d2);
                add_noise(&mut out, noise, s, sn, up);
                out
            }
        }
        Sampler::DpmPP2M => {
            let out = if sn == 0.0 {
                d0.clone()
            } else {
                let h = lambda(sn) - lambda(s);
                let ratio = sn / s;
                let c = -(-h).exp_m1();
                match st.denoised.last() {
                    Some(old) if i > 0 => {
                        let h_last = lambda(s) - lambda(sig[i - 1]);
                        let r = h_last / h;
                        let (a, b) = (1.0 + 1.0 / (2.0 * r), 1.0 / (2.0 * r));
                        x.iter()
                            .zip(&d0)
                            .zip(old)
                            .map(|((x, d), o)| ratio * x + c * (a * d - b * o))
                            .collect()
                    }
                    _ => x.iter().zip(&d0).map(|(x, d)| ratio * x + c * d).collect(),
                }
            };
            st.denoised = vec![d0];
            out
        }
        Sampler::DpmPP2SA => {
            let (down, up) = ancestral(s, sn, eta);
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
                let d2 = den.denoise(&x2, sm)?;
                x.iter()
                    .zip(&d2)
                    .map(|(x, d)| (down / s) * x - (-h).exp_m1() * d)
                    .collect()
            };
            if sn > 0.0 {
                add_noise(&mut out, noise, s, sn, up);
            }
            out
        }
        Sampler::DpmPPSde => {
            if sn == 0.0 {
                axpy(x, sn - s, &deriv(x, &d0, s))
            } else {
                let (t, tn) = (lambda(s), lambda(sn));
                let h = tn - t;
                let r = 0.5;
                let sm = (-(t + h * r)).exp();
                let fac = 1.0 / (2.0 * r);
                // Stage 1: to the midpoint, ancestrally.
                let (down, up) = ancestral(s, sm, eta);
                let s_ = lambda(down);
                let mut x2: Vec<f64> = x
                    .iter()
                    .zip(&d0)
                    .map(|(x, d)| (down / s) * x - (t - s_).exp_m1() * d)
                    .collect();
                add_noise(&mut x2, noise, s, sm, up);
                let d2 = den.denoise(&x2, sm)?;
                // Stage 2: the whole step with the averaged estimate.
                let (down, up) = ancestral(s, sn, eta);
                let tn_ = lambda(down);
                let mut out: Vec<f64> = x
                    .iter()
                    .zip(&d0)
                    .zip(&d2)
                    .map(|((x, a), b)| {
                        (down / s) * x - (t - tn_).exp_m1() * ((1.0 - fac) * a + fac * b)
                    })
                    .collect();
                add_noise(&mut out, noise, s, sn, up);
                out
            }
        }
        Sampler::DpmPP2MSde => {
            let out = if sn == 0.0 {
                st.h.clear();
                d0.clone()
            } else {
                let h = lambda(sn) - lambda(s);
                let eh = eta * h;
                let c = -(-h - eh).exp_m1();
                let mut out: Vec<f64> = x
                    .iter()
                    .zip(&d0)
                    .map(|(x, d)| sn / s * (-eh).exp() * x + c * d)
                    .collect();
                if let (Some(old), Some(&h_last)) = (st.denoised.last(), st.h.last()) {
                    let r = h_last / h;
                    for ((o, d), od) in out.iter_mut().zip(&d0).zip(old) {
                        *o += 0.5 * c * (1.0 / r) * (d - od);
                    }
                }
                add_noise(&mut out, noise, s, sn, sn * (-(-2.0 * eh).exp_m1()).sqrt());
                st.h = vec![h];
                out
            };
            st.denoised = vec![d0];
            out
        }
        Sampler::DpmPP3MSde => {
            let out = if sn == 0.0 {
                d0.clone()
            } else {
                let h = lambda(sn) - lambda(s);
                let he = h * (eta + 1.0);
                let mut out: Vec<f64> = x
                    .iter()
                    .zip(&d0)
                    .map(|(x, d)| (-he).exp() * x - (-he).exp_m1() * d)
                    .collect();
                let phi2 = (-he).exp_m1() / he + 1.0;
                let n = st.denoised.len();
                if n >= 2 && st.h.len() >= 2 {
                    let (d1, d2) = (&st.denoised[n - 1], &st.denoised[n - 2]);
                    let (h1, h2) = (st.h[st.h.len() - 1], st.h[st.h.len() - 2]);
                    let (r0, r1) = (h1 / h, h2 / h);
                    let phi3 = phi2 / he - 0.5;
                    for k in 0..out.len() {
                        let d10 = (d0[k] - d1[k]) / r0;
                        let d11 = (d1[k] - d2[k]) / r1;
                        let dd1 = d10 + (d10 - d11) * r0 / (r0 + r1);
                        let dd2 = (d10 - d11) / (r0 + r1);
                        out[k] += phi2 * dd1 - phi3 * dd2;
                    }
                } else if n >= 1 && !st.h.is_empty() {
                    let r = st.h[st.h.len() - 1] / h;
                    let d1 = &st.denoised[n - 1];
                    for k in 0..out.len() {
                        out[k] += phi2 * (d0[k] - d1[k]) / r;
                    }
                }
                if eta != 0.0 {
                    add_noise(
                        &mut out,
                        noise,
                        s,
                        sn,
                        sn * (-(-2.0 * h * eta).exp_m1()).sqrt(),
                    );
                }
                st.h.push(h);
                out
            };
            st.denoised.push(d0);
            if st.denoised.len() > 2 {
                st.denoised.remove(0);
            }
            if st.h.len() > 2 {
                st.h.remove(0);
            }
            out
        }
        Sampler::Lms => {
            const ORDER: usize = 4;
            st.derivs.push(deriv(x, &d0, s));
            if st.derivs.len() > ORDER {
                st.derivs.remove(0);
            }
            let order = (i + 1).min(ORDER);
            let mut out = x.to_vec();
            for j in 0..order {
                let c = lms_coeff(order, sig, i, j);
                let d = &st.derivs[st.derivs.len() - 1 - j];
                for (o, d) in out.iter_mut().zip(d) {
                    *o += c * d;
                }
            }
            out
        }
        Sampler::Ipndm => {
            // Adams–Bashforth with constant-step weights on dx/dσ, up to 4th order.
            let d = deriv(x, &d0, s);
            let hist = &st.derivs;
            let m = hist.len();
            let dt = sn - s;
            let out: Vec<f64> = match m.min(3) {
                0 => axpy(x, dt, &d),
                1 => (0..x.len())
                    .map(|k| x[k] + dt * (3.0 * d[k] - hist[m - 1][k]) / 2.0)
                    .collect(),
                2 => (0..x.len())
                    .map(|k| {
                        x[k] + dt * (23.0 * d[k] - 16.0 * hist[m - 1][k] + 5.0 * hist[m - 2][k])
                            / 12.0
                    })
                    .collect(),
                _ => (0..x.len())
                    .map(|k| {
                        x[k] + dt
                            * (55.0 * d[k] - 59.0 * hist[m - 1][k] + 37.0 * hist[m - 2][k]
                                - 9.0 * hist[m - 3][k])
                            / 24.0
                    })
                    .collect(),
            };
            st.derivs.push(d);
            if st.derivs.len() > 3 {
                st.derivs.remove(0);
            }
            out
        }
        Sampler::Ddim | Sampler::Plms | Sampler::UniPc | Sampler::Lcm | Sampler::Tcd => {
            return Err(crate::error::Error::Invalid(format!(
                "{:?} is not a σ-space sampler",
                sampler
            )));
        }
    };
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
