//! Every sampler and schedule against its reference implementation (diffusers'
//! schedulers, k-diffusion) on an analytic denoiser: the exact posterior mean of a
//! Gaussian mixture, so the references ran with no network. Fixtures and their
//! conventions: tests/fixtures/samplers (written by tools/reference/sampler_fixtures.py).

use serde_json::Value;

use sdrs::config::Prediction;
use sdrs::sample::{
    self, Discrete, Model, NoiseSampler, Plan, Sampler, Schedule, ScheduleOpts, Settings, Spacing,
};

fn fixture() -> Value {
    let p = sdrs::testdata::fixture("samplers/cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn num(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "nan" => f64::NAN,
        _ => v.as_f64().unwrap(),
    }
}

fn vec(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(num).collect()
}

/// The data distribution: weights, means, isotropic standard deviations.
struct Mixture {
    w: Vec<f64>,
    mu: Vec<Vec<f64>>,
    tau: Vec<f64>,
}

impl Mixture {
    fn new(v: &Value) -> Self {
        Mixture {
            w: vec(&v["weights"]),
            mu: v["means"].as_array().unwrap().iter().map(vec).collect(),
            tau: vec(&v["stds"]),
        }
    }

    /// E[x0 | x0 + σ ε = x].
    fn denoise(&self, x: &[f64], sigma: f64) -> Vec<f64> {
        let d = x.len() as f64;
        if sigma.is_infinite() {
            return (0..x.len())
                .map(|i| self.w.iter().zip(&self.mu).map(|(w, m)| w * m[i]).sum())
                .collect();
        }
        let l: Vec<f64> = (0..self.w.len())
            .map(|k| {
                let v = self.tau[k].powi(2) + sigma * sigma;
                let r2: f64 = x
                    .iter()
                    .zip(&self.mu[k])
                    .map(|(a, b)| (a - b).powi(2))
                    .sum();
                self.w[k].ln() - 0.5 * d * v.ln() - r2 / (2.0 * v)
            })
            .collect();
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = l.iter().map(|v| (v - m).exp()).sum();
        (0..x.len())
            .map(|i| {
                (0..self.w.len())
                    .map(|k| {
                        let v = self.tau[k].powi(2) + sigma * sigma;
                        ((l[k] - m).exp() / z)
                            * (self.mu[k][i] + self.tau[k].powi(2) / v * (x[i] - self.mu[k][i]))
                    })
                    .sum()
            })
            .collect()
    }
}

/// The "UNet": VP input at timestep t → ε, v or x0, with σ(t) log-linear in t.
struct Analytic<'a> {
    mix: &'a Mixture,
    table: Vec<f64>,
    prediction: Prediction,
    calls: Vec<(f64, Vec<f64>)>,
}

impl Analytic<'_> {
    fn sigma(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, 999.0);
        let (lo, hi) = (t.floor() as usize, t.ceil() as usize);
        let w = t - lo as f64;
        if w == 0.0 {
            return self.table[lo];
        }
        ((1.0 - w) * self.table[lo].ln() + w * self.table[hi].ln()).exp()
    }
}

impl Model for Analytic<'_> {
    fn predict(&mut self, x: &[f32], t: f64) -> sdrs::Result<Vec<f32>> {
        let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        Ok(self
            .predict64(&x, t)?
            .into_iter()
            .map(|v| v as f32)
            .collect())
    }

    fn predict64(&mut self, x_vp: &[f64], t: f64) -> sdrs::Result<Vec<f64>> {
        self.calls.push((t, x_vp.to_vec()));
        let s = self.sigma(t);
        if s.is_infinite() {
            let x0 = self.mix.denoise(x_vp, s);
            return Ok(match self.prediction {
                Prediction::Epsilon => x_vp.to_vec(),
                Prediction::V => x0.iter().map(|v| -v).collect(),
                Prediction::Sample => x0,
            });
        }
        let x_ve: Vec<f64> = x_vp.iter().map(|v| v * (1.0 + s * s).sqrt()).collect();
        let x0 = self.mix.denoise(&x_ve, s);
        let eps: Vec<f64> = x_ve.iter().zip(&x0).map(|(x, d)| (x - d) / s).collect();
        let (a, b) = (1.0 / (1.0 + s * s).sqrt(), s / (1.0 + s * s).sqrt());
        Ok(match self.prediction {
            Prediction::Epsilon => eps,
            Prediction::V => eps.iter().zip(&x0).map(|(e, x)| a * e - b * x).collect(),
            Prediction::Sample => x0,
        })
    }
}

/// Replays the recorded noise vectors in order.
struct Replay(std::collections::VecDeque<Vec<f64>>);

impl NoiseSampler for Replay {
    fn noise(&mut self, _s: f64, _sn: f64, n: usize) -> Vec<f64> {
        self.0.pop_front().unwrap_or_else(|| vec![0.0; n])
    }
}

fn rel(want: &[f64], got: &[f64]) -> f64 {
    assert_eq!(want.len(), got.len());
    let num: f64 = want
        .iter()
        .zip(got)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = want.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
    num / den
}

fn discrete(table: &[f64]) -> Discrete {
    Discrete {
        alphas_cumprod: table.to_vec(),
    }
}

fn prediction(p: &str) -> Prediction {
    match p {
        "epsilon" => Prediction::Epsilon,
        "v_prediction" => Prediction::V,
        _ => Prediction::Sample,
    }
}

/// The plan a case walked, rebuilt by sdrs' own plan constructors where sdrs has that
/// schedule (so the constructors are checked too), from the recorded levels otherwise.
fn plan_of(case: &Value, sampler: Sampler, d: &Discrete) -> Plan {
    let steps = case["steps"].as_u64().unwrap() as usize;
    let sigmas = vec(&case["sigmas"]);
    let begin = case["begin_index"].as_u64().unwrap_or(0) as usize;
    let lib = case["reference"]["library"].as_str().unwrap();
    let sched = case["schedule"]["name"].as_str().unwrap();
    let img2img = case["name"].as_str().unwrap().ends_with("img2img");
    match sampler {
        Sampler::Plms => return sample::plms_plan(d, steps),
        Sampler::Lcm => return sample::lcm_plan(d, steps, 50, if img2img { 0.6 } else { 1.0 }),
        Sampler::Tcd => return sample::tcd_plan(d, steps, 50, 1.0),
        Sampler::Ddim => {
            let spacing = if sched == "trailing" {
                Spacing::Trailing
            } else {
                Spacing::Leading
            };
            let p = Plan::ddim_spaced(d, steps, spacing);
            return if img2img { p.tail(0.6) } else { p };
        }
        _ => {}
    }
    // Main-step timesteps: Heun/KDPM2 record one per model call, the rest one per step.
    let ts = if case.get("step_timesteps").is_some() {
        vec(&case["step_timesteps"])
    } else if case.get("timesteps_sd").is_some() {
        vec(&case["timesteps_sd"])
    } else if lib == "k-diffusion" {
        sigmas[..steps].iter().map(|&s| d.sigma_to_t(s)).collect()
    } else {
        vec(&case["timesteps"])
    };
    let ts = if ts.len() > steps - begin && begin > 0 {
        ts[begin..].to_vec()
    } else {
        ts
    };
    Plan {
        timesteps: ts,
        sigmas: sigmas[begin..].to_vec(),
        init_sigma: sigmas[begin],
    }
}

struct Outcome {
    calls: Vec<(f64, Vec<f64>)>,
    final_vp: Vec<f64>,
}

fn run_case(mix: &Mixture, tables: &Value, case: &Value) -> Option<(Outcome, Plan)> {
    let name = case["name"].as_str().unwrap();
    let sampler = Sampler::parse(case["sampler"].as_str().unwrap()).unwrap();
    if name.starts_with("dpm++2m_sde_heun") {
        return None; // k-diffusion's Heun variant of 2M SDE: not an sdrs sampler.
    }
    let table = vec(&tables[case["table"].as_str().unwrap()]["alphas_cumprod"]);
    // σ-space samplers need a finite σ_max: zero-SNR runs on diffusers' 2⁻²⁴ clamp.
    let sched_table = if case["table"] == "sd_zsnr" {
        vec(&tables["sd_zsnr_euler"]["alphas_cumprod"])
    } else {
        table.clone()
    };
    let d = discrete(&sched_table);
    let plan = plan_of(case, sampler, &d);
    let eta = case["reference"]["step_kwargs"]["eta"]
        .as_f64()
        .or_else(|| case["reference"]["kwargs"]["eta"].as_f64());
    let settings = eta.map_or_else(
        || Settings::default_for(sampler),
        |eta| Settings {
            eta,
            ..Default::default()
        },
    );
    let init = vec(&case["init"]["latent"]);
    let s0 = plan.sigmas[0];
    let x: Vec<f64> = if case["latent_form"] == "vp" {
        init.iter().map(|v| v * (1.0 + s0 * s0).sqrt()).collect()
    } else {
        init
    };
    let sigma_table: Vec<f64> = table.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
    let mut model = Analytic {
        mix,
        table: sigma_table,
        prediction: prediction(case["prediction"].as_str().unwrap()),
        calls: Vec::new(),
    };
    let mut noise = Replay(case["noise"].as_array().unwrap().iter().map(vec).collect());
    let traj = {
        let mut den = sample::Denoiser::new(&mut model, model_prediction(case), &d, &plan);
        sample::sample(
            &mut den,
            sampler,
            &settings,
            &plan,
            x,
            &mut noise,
            &mut |_, _, _| {},
        )
        .unwrap()
    };
    let final_vp = traj.last().unwrap().iter().map(|&v| v as f64).collect();
    Some((
        Outcome {
            calls: model.calls,
            final_vp,
        },
        plan,
    ))
}

fn model_prediction(case: &Value) -> Prediction {
    prediction(case["prediction"].as_str().unwrap())
}

#[test]
fn every_sampler_and_schedule_reproduces_its_reference_trajectory() {
    let f = fixture();
    let mix = Mixture::new(&f["mixture"]);
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let Some((out, plan)) = run_case(&mix, &f["tables"], case) else {
            continue;
        };
        let want_calls = case["model_calls"].as_array().unwrap();
        // Every model call: the same count, timestep and input.
        let mut worst_call = 0.0f64;
        let mut bad = Vec::new();
        if want_calls.len() != out.calls.len() {
            bad.push(format!(
                "{} model calls, reference {}",
                out.calls.len(),
                want_calls.len()
            ));
        } else {
            for (i, (w, (t, x))) in want_calls.iter().zip(&out.calls).enumerate() {
                let wt = num(&w["t"]);
                if (wt - t).abs() > 1e-3 * wt.abs().max(1.0) {
                    bad.push(format!("call {i}: t {t} vs {wt}"));
                    break;
                }
                worst_call = worst_call.max(rel(&vec(&w["x"]), x));
            }
        }
        let sf = *plan.sigmas.last().unwrap();
        let want_final: Vec<f64> = if case["latent_form"] == "ve" {
            vec(&case["final"])
                .iter()
                .map(|v| v / (1.0 + sf * sf).sqrt())
                .collect()
        } else {
            vec(&case["final"])
        };
        let e_final = rel(&want_final, &out.final_vp);
        // Zero terminal SNR: sdrs (like diffusers' σ-space schedulers) clamps ᾱ_T to 2⁻²⁴,
        // so σ_max = 4096 is finite; DDIM's exact ᾱ_T = 0 gives ε = x there, the clamp
        // ε = x + O(1/σ_max), 2.4e-4 relative.
        let tol = if case["table"] == "sd_zsnr" {
            5e-4
        } else {
            1e-5
        };
        if worst_call > tol || e_final > tol || !bad.is_empty() {
            failures.push(format!(
                "{name}: calls {worst_call:.2e}, final {e_final:.2e} {}",
                bad.join("; ")
            ));
        }
        report.push(format!(
            "{name:<40} calls {:>3}  worst input {worst_call:.1e}  final {e_final:.1e}",
            out.calls.len()
        ));
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        report.len(),
        failures.join("\n")
    );
}

#[test]
fn schedules_give_the_references_noise_levels() {
    let f = fixture();
    let d = discrete(&vec(&f["tables"]["sd"]["alphas_cumprod"]));
    let opts = ScheduleOpts::default();
    let mut checked = 0;
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if case["table"] != "sd" || name.ends_with("img2img") {
            continue;
        }
        let steps = case["steps"].as_u64().unwrap() as usize;
        let lib = case["reference"]["library"].as_str().unwrap();
        let sched = case["schedule"]["name"].as_str().unwrap();
        let sampler = case["sampler"].as_str().unwrap();
        let ours = match (lib, sched) {
            ("k-diffusion", "karras") => Schedule::Karras,
            ("k-diffusion", "exponential") => Schedule::Exponential,
            ("k-diffusion", "ays") => Schedule::Ays,
            ("k-diffusion", "sgm_uniform") => Schedule::SgmUniform,
            ("k-diffusion", "simple") => Schedule::Simple,
            // diffusers' own spacing for its σ-space schedulers.
            ("diffusers", "linspace") if ["euler", "euler_a", "heun", "lms"].contains(&sampler) => {
                Schedule::Discrete(Spacing::Linspace)
            }
            ("diffusers", "leading") if sampler == "euler" => Schedule::Discrete(Spacing::Leading),
            ("diffusers", "trailing") if sampler == "euler" => {
                Schedule::Discrete(Spacing::Trailing)
            }
            _ => continue,
        };
        let plan = ours.plan(&d, steps, &opts);
        let want = vec(&case["sigmas"]);
        // diffusers rounds its levels to f32; AYS's published levels have 10 digits.
        let tol = if lib == "diffusers" {
            2e-7
        } else if sched == "ays" {
            1e-9
        } else {
            1e-12
        };
        assert_eq!(plan.sigmas.len(), want.len(), "{name}");
        for (i, (a, b)) in plan.sigmas.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1e-3),
                "{name}: σ[{i}] {a} vs {b}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} schedule cases checked");
}

#[test]
fn zero_terminal_snr_rescaling_gives_the_reference_table() {
    let f = fixture();
    let ours = discrete(&vec(&f["tables"]["sd"]["alphas_cumprod"])).rescale_zero_terminal_snr();
    let want = vec(&f["tables"]["sd_zsnr_euler"]["alphas_cumprod"]);
    for (i, (a, b)) in ours.alphas_cumprod.iter().zip(&want).enumerate() {
        // diffusers rescales in f32: sqrt(ᾱ) − sqrt(ᾱ_T) cancels near the end, where its
        // values carry up to 3e-5 relative error (ours is f64).
        assert!((a - b).abs() <= 5e-5 * b, "ᾱ[{i}]: {a} vs {b}");
    }
    assert_eq!(ours.alphas_cumprod[999], 2f64.powi(-24));
}

#[test]
fn error_shrinks_at_each_methods_order() {
    // Final-sample error against the sampler's own 1024-step result, fitted over
    // 8…64 steps on Karras σ: the slope of log error against log steps. (iPNDM uses
    // constant-step Adams–Bashforth weights on this non-uniform grid, hence < 2.)
    let f = fixture();
    let mix = Mixture::new(&f["mixture"]);
    let c = &f["convergence"];
    let d = discrete(&vec(&f["tables"]["sd"]["alphas_cumprod"]));
    let sigma_table: Vec<f64> = d
        .alphas_cumprod
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect();
    let noise = vec(&c["init"]["noise"]);
    for (name, order) in [
        ("euler", 1.0),
        ("heun", 2.0),
        ("dpm++2m", 2.0),
        ("lms", 3.0),
        ("unipc", 2.5),
        ("ipndm", 1.5),
    ] {
        let sampler = Sampler::parse(name).unwrap();
        let run = |steps: usize| -> Vec<f64> {
            let plan = Schedule::Karras.plan(&d, steps, &ScheduleOpts::default());
            let mut model = Analytic {
                mix: &mix,
                table: sigma_table.clone(),
                prediction: Prediction::Epsilon,
                calls: Vec::new(),
            };
            let mut den = sample::Denoiser::new(&mut model, Prediction::Epsilon, &d, &plan);
            let x: Vec<f64> = noise.iter().map(|v| v * plan.sigmas[0]).collect();
            let traj = sample::sample(
                &mut den,
                sampler,
                &Settings::default_for(sampler),
                &plan,
                x,
                &mut Replay(Default::default()),
                &mut |_, _, _| {},
            )
            .unwrap();
            traj.last().unwrap().iter().map(|&v| v as f64).collect()
        };
        let reference = c["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["sampler"] == name);
        let mut finals = std::collections::HashMap::new();
        for n in [8usize, 16, 32, 64, 1024] {
            let got = run(n);
            // Each run agrees with the reference's run of the same length (iPNDM has no
            // reference run: only its order is checked).
            if let Some(r) = reference {
                let e = rel(&vec(&r["finals"][n.to_string()]), &got);
                assert!(e < 1e-5, "{name} at {n} steps: {e:.2e} from the reference");
            }
            finals.insert(n, got);
        }
        let exact = &finals[&1024];
        let pts: Vec<(f64, f64)> = [8usize, 16, 32, 64]
            .iter()
            .map(|&n| ((n as f64).ln(), rel(exact, &finals[&n]).ln()))
            .collect();
        let (mx, my) = (
            pts.iter().map(|p| p.0).sum::<f64>() / 4.0,
            pts.iter().map(|p| p.1).sum::<f64>() / 4.0,
        );
        let slope = -pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
            / pts.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>();
        eprintln!("{name}: error slope {slope:.2} (order {order})");
        assert!(
            slope > order - 0.35,
            "{name}: error falls with slope {slope:.2}, expected about {order}"
        );
    }
}
