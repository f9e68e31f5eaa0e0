//! Timestep-grid multistep samplers from diffusers' family, in the VE form:
//! PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
//! Manifolds", without the Runge–Kutta warm-up, as Stable Diffusion runs it) and
//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework", bh2).
use super::kdiffusion::{Recent, Step};
use super::{Discrete, Plan};
use crate::error::Result;

/// PLMS visits the leading-spaced grid t_{n−1} … t_0 but evaluates the second point
/// twice: the first two calls form a second-order (Heun-like) step, then linear
/// multistep in ε takes over. `sigmas[i]` is the level of call i's input and
/// `sigmas[i + 1]` the level of its output, so the repeated point appears twice.
pub fn plms_plan(d: &Discrete, steps: usize) -> Plan {
    plms_plan_at(d, steps, 1, false)
}

/// PLMS on the leading grid with `steps_offset`, the last step landing on ᾱ = 1 when
/// `set_alpha_to_one` (else on ᾱ_0, as SD's configs).
pub fn plms_plan_at(
    d: &Discrete,
    steps: usize,
    steps_offset: usize,
    set_alpha_to_one: bool,
) -> Plan {
    let steps = steps.clamp(1, d.len());
    let ratio = d.len() / steps;
    let grid: Vec<usize> = (0..steps)
        .rev()
        .map(|i| (i * ratio + steps_offset).min(d.len() - 1))
        .collect();
    let mut timesteps: Vec<usize> = grid.clone();
    if steps > 1 {
        timesteps.insert(1, grid[1]);
    }
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| Discrete::sigma_of(d.alphas_cumprod[t]))
        .collect();
    // The last step lands on ᾱ_0 (set_alpha_to_one = false in SD's configs).
    sigmas.push(if set_alpha_to_one { 0.0 } else { d.sigma_min() });
    let init_sigma = (sigmas[0] * sigmas[0] + 1.0).sqrt();
    Plan {
        timesteps: timesteps.iter().map(|&t| t as f64).collect(),
        sigmas,
        init_sigma,
    }
}

/// One PLMS call: ε from the model, combined with earlier ε (Adams–Bashforth weights),
/// then the DDIM transfer x0(ε) + σ_next ε, which in the VE form is x + (σ_next − σ) ε.
/// PLMS's history: the last four ε, and the first latent (for the repeated point).
#[derive(Default)]
pub(super) struct Plms {
    eps: Recent<4>,
    first: Option<Vec<f64>>,
}

pub(super) fn plms_step(st: &mut Step, x: &[f64], hist: &mut Plms) -> Result<Vec<f64>> {
    let (plan, i) = (st.plan, st.i);
    let (s, sn) = (plan.sigmas[i], plan.sigmas[i + 1]);
    let d0 = st.den.denoise_at(x, s, plan.timesteps[i])?;
    let eps: Vec<f64> = x.iter().zip(&d0).map(|(x, d)| (x - d) / s).collect();
    let repeated = i == 1 && plan.timesteps.get(2) == Some(&plan.timesteps[1]);
    let (base, from, e): (Vec<f64>, f64, Vec<f64>) = match hist.eps.back(0).filter(|_| repeated) {
        // The repeated point: average with the first ε and redo the first step from
        // the first latent.
        Some(first_eps) => {
            let first = hist.first.clone().unwrap_or_else(|| x.to_vec());
            let avg: Vec<f64> = eps
                .iter()
                .zip(first_eps)
                .map(|(a, b)| (a + b) / 2.0)
                .collect();
            (first, plan.sigmas[0], avg)
        }
        None => {
            hist.eps.push(eps);
            let e = |back: usize| hist.eps.back(back).map_or(&[][..], |v| v.as_slice());
            let (e0, e1, e2, e3) = (e(0), e(1), e(2), e(3));
            let weighted: Vec<f64> = (0..x.len())
                .map(|k| match hist.eps.len() {
                    1 => e0[k],
                    2 => (3.0 * e0[k] - e1[k]) / 2.0,
                    3 => (23.0 * e0[k] - 16.0 * e1[k] + 5.0 * e2[k]) / 12.0,
                    _ => (55.0 * e0[k] - 59.0 * e1[k] + 37.0 * e2[k] - 9.0 * e3[k]) / 24.0,
                })
                .collect();
            if i == 0 {
                hist.first = Some(x.to_vec());
            }
            (x.to_vec(), s, weighted)
        }
    };
    Ok(base
        .iter()
        .zip(&e)
        .map(|(x, e)| x + (sn - from) * e)
        .collect())
}

/// λ = −ln σ.
fn lambda(sigma: f64) -> f64 {
    -sigma.ln()
}

/// The UniPC coefficients for `order` with ratios `rks` (the last is 1): the
/// Vandermonde system R·ρ = b of the paper's B(h) = e^h − 1 variant ("bh2").
fn unipc_system(order: usize, rks: &[f64], hh: f64) -> (Vec<Vec<f64>>, Vec<f64>) {
    let b_h = hh.exp_m1();
    let mut h_phi_k = hh.exp_m1() / hh - 1.0;
    let mut factorial = 1.0;
    let mut r = Vec::new();
    let mut b = Vec::new();
    for i in 1..=order {
        r.push(
            rks.iter()
                .map(|rk| rk.powi(i as i32 - 1))
                .collect::<Vec<f64>>(),
        );
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    (r, b)
}

/// Solves a small dense system by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap_or(c);
        a.swap(c, p);
        b.swap(c, p);
        for r in c + 1..n {
            let f = a[r][c] / a[c][c];
            let (top, bottom) = a.split_at_mut(r);
            for (x, y) in bottom[0][c..n].iter_mut().zip(&top[c][c..n]) {
                *x -= f * y;
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| a[r][k] * x[k]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    x
}

/// UniPC's ratios r_k = (λ_{j−k} − λ_j)/h of the earlier model outputs (the newest of
/// `outputs` belongs to step j) and the scaled differences D1_k = (m_{j−k} − m_j)/r_k;
/// the ratios end with 1.
fn differences(
    outputs: &[Vec<f64>],
    sig: &[f64],
    j: usize,
    order: usize,
    h: f64,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let m0 = &outputs[outputs.len() - 1];
    let mut rks = Vec::new();
    let mut d1s = Vec::new();
    for k in 1..order {
        let mi = &outputs[outputs.len() - 1 - k];
        let rk = (lambda(sig[j - k]) - lambda(sig[j])) / h;
        d1s.push(mi.iter().zip(m0).map(|(a, b)| (a - b) / rk).collect());
        rks.push(rk);
    }
    rks.push(1.0);
    (rks, d1s)
}

/// The UniPC order used at step i of n (solver order 2, lower order in the first
/// steps and at the last, as diffusers' defaults).
fn unipc_order(i: usize, n: usize) -> usize {
    const SOLVER_ORDER: usize = 2;
    SOLVER_ORDER.min(n - i).min(i + 1)
}

/// UniPC's history: the last two model outputs and the previous starting latent.
#[derive(Default)]
pub(super) struct UniPc {
    outputs: Recent<2>,
    last: Option<Vec<f64>>,
}

/// One UniPC step (x0 prediction, bh2): correct the current latent with the new model
/// output (UniC), then predict the next one (UniP).
pub(super) fn unipc_step(st: &mut Step, x: &[f64], hist: &mut UniPc) -> Result<Vec<f64>> {
    let (plan, i) = (st.plan, st.i);
    let sig = &plan.sigmas;
    let n = plan.timesteps.len();
    let m_t = st.den.denoise(x, sig[i])?;
    let mut x = x.to_vec();
    // Corrector: refine x (at σ_i) using m_t and the outputs before it.
    if i > 0 {
        if let (Some(last), Some(m0)) = (&hist.last, hist.outputs.back(0)) {
            let order = unipc_order(i - 1, n);
            let (s0, t) = (sig[i - 1], sig[i]);
            let h = lambda(t) - lambda(s0);
            let (rks, d1s) = differences(hist.outputs.as_slice(), sig, i - 1, order, h);
            let hh = -h;
            let (r, b) = unipc_system(order, &rks, hh);
            let rhos = if order == 1 { vec![0.5] } else { solve(r, b) };
            let (h_phi_1, b_h) = (hh.exp_m1(), hh.exp_m1());
            x = (0..x.len())
                .map(|k| {
                    let corr: f64 = d1s.iter().zip(&rhos).map(|(d, r)| r * d[k]).sum();
                    let d1_t = m_t[k] - m0[k];
                    t / s0 * last[k] - h_phi_1 * m0[k] - b_h * (corr + rhos[rhos.len() - 1] * d1_t)
                })
                .collect();
        }
    }
    hist.outputs.push(m_t.clone());
    hist.last = Some(x.clone());
    // Predictor: from σ_i to σ_{i+1}.
    let (s0, t) = (sig[i], sig[i + 1]);
    let m0 = &m_t;
    if t == 0.0 {
        return Ok(m_t);
    }
    let order = unipc_order(i, n);
    let h = lambda(t) - lambda(s0);
    let (rks, d1s) = differences(hist.outputs.as_slice(), sig, i, order, h);
    let hh = -h;
    let (h_phi_1, b_h) = (hh.exp_m1(), hh.exp_m1());
    let rhos_p = match order {
        1 => vec![],
        2 => vec![0.5],
        _ => {
            let (r, b) = unipc_system(order, &rks, hh);
            let k = order - 1;
            solve(
                r[..k].iter().map(|row| row[..k].to_vec()).collect(),
                b[..k].to_vec(),
            )
        }
    };
    Ok((0..x.len())
        .map(|k| {
            let res: f64 = d1s.iter().zip(&rhos_p).map(|(d, r)| r * d[k]).sum();
            t / s0 * x[k] - h_phi_1 * m0[k] - b_h * res
        })
        .collect())
}
