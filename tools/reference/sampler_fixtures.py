#!/usr/bin/env python3
"""Golden sampler/schedule fixtures from reference implementations on an ANALYTIC model.

No network weights: the "UNet" is the exact denoiser E[x0 | x] of a 3-component isotropic
Gaussian mixture in R^16 (latent shape (1, 4, 2, 2)), wrapped as an SD-style model
`model(x_vp, t)` on SD's discrete training schedule (scaled_linear 0.00085..0.012, 1000
steps). Every sampler and schedule sdrs implements is run by its reference implementation:

  * diffusers 0.42.1 schedulers, driven by the loop of diffusers' SD pipelines
    (`scale_model_input` -> model -> `step`), in float64;
  * k-diffusion 0.1.1.post1 `k_diffusion.sampling` samplers around k-diffusion's own
    `CompVisDenoiser` / `CompVisVDenoiser` wrappers, in float64;
  * schedules that only ComfyUI / the AYS paper define (sgm_uniform, simple, normal,
    ddim_uniform, beta, AYS log-linear interpolation) are written here from their
    definitions (cited at each function) and fed to k-diffusion samplers.

Injected noise (ancestral / SDE samplers, DDIM eta 1, LCM, TCD) comes from numpy
(PCG64 seeded with [SEED, crc32(case name)]) and is recorded in consumption order, so the
Rust side can replay it. Everything written is a deterministic function of this script and
the pinned package versions; floats are written with repr() (exact round trip).

The file format and every convention are documented in tests/fixtures/samplers/README.md.

Usage (the reference venv of tools/reference/setup.sh, which also installs k-diffusion and
its sampling dependencies with --no-deps: k-diffusion==0.1.1.post1 torchsde==0.2.6
trampoline==0.1.2 torchdiffeq==0.2.5 scipy==1.17.1):

    /work/venv-ref/bin/python tools/reference/sampler_fixtures.py --out tests/fixtures/samplers
    python3 tools/reference/check_sampler_fixtures.py   # independent numpy replay
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import platform
import re
import sys
import textwrap
import types
import zlib
from pathlib import Path

import numpy as np
import torch

SEED = 20250611
D = 16
LATENT_SHAPE = (1, 4, 2, 2)
FORMAT = "sdrs-sampler-fixtures/1"

# SD 1.x / 2.x training schedule, as in the real scheduler_config.json files.
SD_BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# ---------------------------------------------------------------------------------------
# Imports of the references.


def import_k_diffusion():
    """Imports k_diffusion.sampling / .external without running the package __init__
    (which pulls in training-only dependencies: kornia, clip, clean-fid, ...). utils.py
    imports torchvision only for PIL conversions; it is stubbed when not installed."""
    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("sampler_fixtures: k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
    stubs = []
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        fn = types.ModuleType("torchvision.transforms.functional")
        tv.transforms, tr.functional = tr, fn
        stubs = {"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn}
        sys.modules.update(stubs)
    from k_diffusion import external, sampling

    for k in stubs:  # only k_diffusion.utils holds on to them
        del sys.modules[k]
    return sampling, external


import diffusers  # noqa: E402  (before the k-diffusion import: it probes for torchvision)

K, KEXT = import_k_diffusion()
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    IPNDMScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import AysSchedules  # noqa: E402
import scipy  # noqa: E402
import scipy.stats  # noqa: E402


def kdiff_version() -> str:
    from importlib.metadata import version

    return version("k-diffusion")


# ---------------------------------------------------------------------------------------
# The analytic data distribution and its exact denoiser.


def mixture_params():
    """Fixed, O(1) parameters (written to the fixture; the Rust test reads them from there).
    Means: numpy PCG64 [SEED, 0] draws rounded to 3 decimals."""
    rng = np.random.default_rng([SEED, 0])
    means = rng.normal(0.0, 0.8, size=(3, D))
    means[1] += 0.5  # separate the components a little
    means[2] -= 0.5
    means = np.round(means, 3)
    return dict(weights=[0.5, 0.3, 0.2], means=[[float(v) for v in m] for m in means], stds=[0.3, 0.5, 0.8])


class Mixture:
    """x0 ~ sum_k w_k N(mu_k, tau_k^2 I). For x = x0 + sigma*eps:
    D(x, sigma) = E[x0 | x] = sum_k r_k(x) (mu_k + tau_k^2/(tau_k^2+sigma^2) (x - mu_k)),
    r = softmax_k(log w_k - d/2 log(2 pi (tau_k^2+sigma^2)) - |x-mu_k|^2 / (2 (tau_k^2+sigma^2)))."""

    def __init__(self, p):
        self.w = torch.tensor(p["weights"], dtype=torch.float64)
        self.mu = torch.tensor(p["means"], dtype=torch.float64)
        self.tau = torch.tensor(p["stds"], dtype=torch.float64)

    def prior_mean(self):
        return (self.w[:, None] * self.mu).sum(0)

    def denoise(self, x_ve: torch.Tensor, sigma: float) -> torch.Tensor:
        x = x_ve.reshape(-1).to(torch.float64)
        if math.isinf(sigma):
            return self.prior_mean().reshape(x_ve.shape)
        var = self.tau**2 + sigma * sigma  # (K,)
        diff = x[None, :] - self.mu  # (K, d)
        logp = torch.log(self.w) - 0.5 * D * torch.log(2 * math.pi * var) - (diff * diff).sum(1) / (2 * var)
        r = torch.exp(logp - torch.logsumexp(logp, 0))
        post = self.mu + (self.tau**2 / var)[:, None] * diff
        return (r[:, None] * post).sum(0).reshape(x_ve.shape)


def sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.to(torch.float64)
    return ((1 - ac) / ac) ** 0.5


def sigma_of_t(sigmas: torch.Tensor, t: float) -> float:
    """sigma(t): log-linear interpolation of the discrete sigmas in t (k-diffusion's
    DiscreteSchedule.t_to_sigma, here in float64): t clamped to [0, T-1], lo = floor(t),
    hi = ceil(t), w = t - lo, log sigma = (1-w) log sigmas[lo] + w log sigmas[hi].
    Integer t returns the table entry itself (also when it is inf: zero terminal SNR)."""
    t = min(max(float(t), 0.0), float(len(sigmas) - 1))
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    if w == 0.0:
        return float(sigmas[lo])
    return math.exp((1 - w) * math.log(float(sigmas[lo])) + w * math.log(float(sigmas[hi])))


class AnalyticUNet:
    """The model sdrs' Rust test re-implements: model(x_vp, t) -> epsilon | v | sample.

    sigma = sigma_of_t(t); x_ve = x_vp * sqrt(1 + sigma^2); x0 = D(x_ve, sigma);
    epsilon = (x_ve - x0) / sigma; v = a*epsilon - b*x0 with a = 1/sqrt(1+sigma^2),
    b = sigma/sqrt(1+sigma^2); sample = x0. At sigma = inf (alphas_cumprod 0):
    x0 = prior mean, epsilon = x_vp, v = -x0."""

    def __init__(self, mixture: Mixture, alphas_cumprod: torch.Tensor, prediction: str, log: list):
        self.mixture = mixture
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)  # k-diffusion's CompVis wrappers read this
        self.sigmas = sigma_table(alphas_cumprod)
        self.prediction = prediction
        self.log = log

    def evaluate(self, x_vp: torch.Tensor, t: float):
        sigma = sigma_of_t(self.sigmas, t)
        x_vp = x_vp.to(torch.float64)
        if math.isinf(sigma):
            x0 = self.mixture.denoise(x_vp, sigma)
            eps, v = x_vp.clone(), -x0
        else:
            s = math.sqrt(1 + sigma * sigma)
            x_ve = x_vp * s
            x0 = self.mixture.denoise(x_ve, sigma)
            eps = (x_ve - x0) / sigma
            v = eps / s - x0 * (sigma / s)
        return sigma, {"epsilon": eps, "v_prediction": v, "sample": x0}

    def __call__(self, x_vp: torch.Tensor, t) -> torch.Tensor:
        t = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        sigma, out = self.evaluate(x_vp, t)
        self.log.append({"t": t, "model_sigma": sigma, "x": vec(x_vp)})
        return out[self.prediction]

    # k-diffusion's CompVis wrappers call inner_model.apply_model(x, t, cond)
    def apply_model(self, x, t, cond=None):
        return self(x, t)


class X0Denoiser(torch.nn.Module):
    """For prediction 'sample' with k-diffusion samplers (k-diffusion has no CompVis x0
    wrapper): built like CompVisDenoiser (c_in = 1/sqrt(1+sigma^2), t = sigma_to_t(sigma)),
    the denoised value is the model output itself."""

    def __init__(self, inner):
        super().__init__()
        self.sched = KEXT.DiscreteSchedule(sigma_table(inner.alphas_cumprod), quantize=False)
        self.inner_model = inner

    def forward(self, x, sigma, **kwargs):
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return self.inner_model.apply_model(x * c_in, self.sched.sigma_to_t(sigma))


# ---------------------------------------------------------------------------------------
# Noise.


class NoiseBank:
    """Injected noise: unit Gaussian vectors from numpy PCG64 seeded with
    [SEED, crc32(case name)], recorded in the order they are consumed. (The initial latent
    noise is one shared vector, Ctx.init_noise.)"""

    def __init__(self, name: str):
        self.rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
        self.used: list = []
        self.calls: list = []

    def draw(self) -> torch.Tensor:
        return torch.from_numpy(self.rng.standard_normal(D)).reshape(LATENT_SHAPE)

    def next(self, note=None) -> torch.Tensor:
        v = self.draw()
        self.used.append(vec(v))
        self.calls.append(note)
        return v


def vec(x) -> list:
    return [float(v) for v in torch.as_tensor(x).reshape(-1).tolist()]


def fnum(x):
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return "nan"  # only in unused schedule entries (KDPM2's last sigmas_interpol)
    return x


def flist(xs) -> list:
    return [fnum(v) for v in (xs.reshape(-1).tolist() if isinstance(xs, torch.Tensor) else xs)]


# ---------------------------------------------------------------------------------------
# diffusers in float64.


def patch_randn(cls, bank: NoiseBank):
    """Each scheduler module imports randn_tensor by name; point it at the bank."""
    mod = sys.modules[cls.__module__]

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == LATENT_SHAPE, shape
        return bank.next("randn_tensor")

    mod.randn_tensor = randn_tensor


FLOAT32_CASTS = ("sample = sample.to(torch.float32)",)


def patch_step_float64(sched):
    """EulerDiscrete, EulerAncestralDiscrete and DPMSolverMultistep cast the sample to
    float32 inside step(); recompile step() without that one line (compiled in the
    scheduler module's namespace, so it is otherwise the library's code), so that the
    arithmetic stays float64. Other schedulers are left as they are."""
    cls = type(sched)
    src = textwrap.dedent(inspect.getsource(cls.step))
    n = sum(src.count(c) for c in FLOAT32_CASTS)
    if n == 0:
        return False
    for c in FLOAT32_CASTS:
        src = src.replace(c, "pass  # float64: " + c)
    src = re.sub(r"^@.*\n", "", src, flags=re.M)
    ns: dict = {}
    exec(compile(src, f"<float64 {cls.__name__}.step>", "exec"), sys.modules[cls.__module__].__dict__, ns)
    sched.step = types.MethodType(ns["step"], sched)
    return True


def upcast_state(sched):
    """After set_timesteps: every float32 tensor of the scheduler's state (sigmas,
    alphas_cumprod, final_alpha_cumprod, sigmas_interpol, ...) becomes float64 with the
    same values, so steps compute in float64 from diffusers' own (float32-rounded) schedule.
    `timesteps` keep their dtype (they are what the model receives)."""
    for k, v in list(vars(sched).items()):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and k != "timesteps":
            setattr(sched, k, v.to(torch.float64))


def sched_config(sched) -> dict:
    out = {}
    for k, v in sched.config.items():
        if k.startswith("_"):
            continue
        if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
            v = str(v)
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------
# Fixture assembly.


class Ctx:
    def __init__(self, mixture: Mixture, sd_ac: torch.Tensor):
        self.mixture = mixture
        self.sd_ac = sd_ac  # the float32 SD table (diffusers'), promoted to float64
        self.sd_sigmas = sigma_table(sd_ac)
        self.tables: dict = {"sd": sd_ac}
        self.cases: list = []

    def table_name(self, ac: torch.Tensor) -> str:
        ac = ac.to(torch.float64)
        for k, v in self.tables.items():
            if v.shape == ac.shape and torch.equal(v, ac):
                return k
        raise SystemExit("sampler_fixtures: unregistered alphas_cumprod table")

    def add(self, case):
        for key in ("latents", "final", "noise"):
            assert all(isinstance(v, float) for v in np.ravel(np.asarray(case[key], dtype=object))), (case["name"], key)
        names = {c["name"] for c in self.cases}
        assert case["name"] not in names, case["name"]
        self.cases.append(case)


def model_calls_json(log):
    return [{"t": fnum(c["t"]), "model_sigma": fnum(c["model_sigma"]), "x": flist(c["x"])} for c in log]


def run_diffusers(
    ctx: Ctx,
    name: str,
    sampler: str,
    cls,
    prediction: str,
    steps: int,
    schedule: dict,
    overrides: dict | None = None,
    set_timesteps: dict | None = None,
    step_kwargs: dict | None = None,
    img2img: float | None = None,
    base: dict | None = None,
    notes: str | None = None,
):
    overrides = dict(overrides or {})
    cfg = dict(SD_BASE if base is None else base)
    cfg.update(overrides)
    cfg["prediction_type"] = prediction
    sched = cls(**cfg)
    ac = sched.alphas_cumprod.to(torch.float64).clone()
    table = ctx.table_name(ac)
    bank = NoiseBank(name)
    log: list = []
    model = AnalyticUNet(ctx.mixture, ac, prediction, log)
    patch_randn(cls, bank)
    st_kwargs = dict(set_timesteps or {})
    if "timesteps" in st_kwargs or "sigmas" in st_kwargs:
        sched.set_timesteps(**st_kwargs)
    else:
        sched.set_timesteps(steps, **st_kwargs)
    upcast_state(sched)
    patched = patch_step_float64(sched)
    timesteps = sched.timesteps
    full_timesteps = [fnum(t) for t in timesteps]
    init = {}
    noise0 = ctx.init_noise.clone()
    if img2img is None:
        scale = float(sched.init_noise_sigma)
        latents = noise0 * scale
        init = {"rule": "noise * init_noise_sigma", "scale": fnum(scale)}
    else:
        x0_init = ctx.x0_init
        if cls is LCMScheduler:
            # LatentConsistencyModelImg2ImgPipeline: set_timesteps(n, strength=...) shortens the
            # origin schedule itself; no get_timesteps, no begin index.
            sched.set_timesteps(steps, strength=img2img, **st_kwargs)
            upcast_state(sched)
            timesteps = sched.timesteps
            rule = "set_timesteps(steps, strength=strength); add_noise(x0_init, noise, timesteps[0])"
        else:
            # StableDiffusionImg2ImgPipeline.get_timesteps
            init_timestep = min(int(steps * img2img), steps)
            t_start = max(steps - init_timestep, 0)
            timesteps = sched.timesteps[t_start * sched.order :]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
            rule = ("set_timesteps(steps); t_start = steps - min(int(steps*strength), steps); "
                    "timesteps = timesteps[t_start:]; set_begin_index(t_start); add_noise(x0_init, noise, timesteps[0])")
        latents = sched.add_noise(x0_init, noise0, timesteps[:1])
        init = {"rule": rule, "strength": img2img, "x0_init": flist(x0_init), "t_start_timestep": fnum(timesteps[0])}
    init["noise"] = flist(noise0)
    init["latent"] = flist(latents)
    trajectory = []
    denoised = None
    for t in timesteps:
        inp = sched.scale_model_input(latents, t)
        out = model(inp, t)
        res = sched.step(out, t, latents, **(step_kwargs or {}), return_dict=False)
        latents = res[0]
        if cls is LCMScheduler:
            denoised = res[1]
        trajectory.append(flist(latents))
    final = denoised if cls is LCMScheduler else latents
    sched_info = schedule_arrays(sched, cls, full_timesteps, timesteps, ac)
    case = {
        "name": name,
        "sampler": sampler,
        "reference": {
            "library": "diffusers",
            "version": diffusers.__version__,
            "class": cls.__name__,
            "config": sched_config(sched),
            "config_overrides": {k: v for k, v in cfg.items()},
            "set_timesteps": {"num_inference_steps": steps, **st_kwargs} if not ("timesteps" in st_kwargs or "sigmas" in st_kwargs) else st_kwargs,
            "step_kwargs": step_kwargs or {},
            "float64_step_patch": patched,
            "loop": "diffusers SD pipeline loop: for t in timesteps: x_in = scale_model_input(latents, t); out = model(x_in, t); latents = step(out, t, latents).prev_sample",
        },
        "prediction": prediction,
        "table": table,
        "schedule": schedule,
        "steps": steps,
        "latent_form": LATENT_FORM[cls],
        **sched_info,
        "init": init,
        "model_calls": model_calls_json(log),
        "noise": bank.used,
        "latents_after": "each scheduler.step() call (= each model call)",
        "latents": trajectory,
        "final": flist(final),
        "final_is": "denoised of the last step (LCM pipeline output)" if cls is LCMScheduler else "latents after the last step (pipeline output)",
    }
    if notes:
        case["notes"] = notes
    ctx.add(case)
    return case


def schedule_arrays(sched, cls, full_timesteps, run_timesteps, ac) -> dict:
    """The schedule in a uniform layout: `timesteps` = what the loop iterates (one per
    model call), `sigmas` = the base noise levels of the n main steps plus the final one,
    and for the two-evaluation schedulers their midpoints; `raw` = diffusers' own arrays."""
    out: dict = {"timesteps": [fnum(t) for t in run_timesteps]}
    raw = {"timesteps": full_timesteps}
    if len(run_timesteps) != len(full_timesteps):
        out["begin_index"] = len(full_timesteps) - len(run_timesteps)
    if hasattr(sched, "sigmas") and cls not in (LCMScheduler, TCDScheduler, DDIMScheduler, PNDMScheduler, IPNDMScheduler):
        rs = flist(sched.sigmas)
        raw["sigmas"] = rs
        if cls is HeunDiscreteScheduler:
            assert len(rs) % 2 == 0
            out["sigmas"] = [rs[0]] + rs[1::2]
            out["step_timesteps"] = full_timesteps[0::2]
        elif cls in (KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler):
            base = lambda a: [a[0]] + a[1:-1:2]  # noqa: E731
            out["sigmas"] = base(rs)
            n = len(out["sigmas"]) - 1
            ri = flist(sched.sigmas_interpol)
            raw["sigmas_interpol"] = ri
            interp = base(ri)
            out["step_timesteps"] = full_timesteps[0::2]
            if cls is KDPM2DiscreteScheduler:
                mids = interp[1:n]  # step i uses sigmas_interpol[i+1] = sqrt(sigmas[i] * sigmas[i+1])
            else:
                mids = interp[0 : n - 1]  # step i uses sqrt(sigmas[i] * sigma_down[i])
                out["ancestral"] = {"sigma_up": base(flist(sched.sigmas_up))[:n], "sigma_down": base(flist(sched.sigmas_down))[:n]}
                raw["sigmas_up"], raw["sigmas_down"] = flist(sched.sigmas_up), flist(sched.sigmas_down)
            out["midpoint"] = {"sigmas": mids, "timesteps": full_timesteps[1::2]}
        else:
            out["sigmas"] = rs
    else:
        # VP schedulers on integer timesteps: the noise levels are derived (informational)
        acd = ac.to(torch.float64)
        ts = [int(t) for t in run_timesteps]
        if cls is PNDMScheduler:
            ts = [ts[0]] + ts[2:]  # the PLMS warm-up repeats its second timestep
        if cls is LCMScheduler:
            final = 0.0  # the last step returns the denoised sample
        elif cls is TCDScheduler:
            final = float(((1 - acd[0]) / acd[0]) ** 0.5)  # the last step ends at alphas_cumprod[0]
        else:
            fa = float(sched.final_alpha_cumprod)
            final = ((1 - fa) / fa) ** 0.5
        out["sigmas"] = [fnum(((1 - acd[t]) / acd[t]) ** 0.5) for t in ts] + [final]
        out["sigmas_derived"] = True
        if hasattr(sched, "final_alpha_cumprod"):
            out["final_alpha_cumprod"] = fnum(sched.final_alpha_cumprod)
    out["raw"] = raw
    return out


LATENT_FORM = {
    EulerDiscreteScheduler: "ve",
    EulerAncestralDiscreteScheduler: "ve",
    HeunDiscreteScheduler: "ve",
    KDPM2DiscreteScheduler: "ve",
    KDPM2AncestralDiscreteScheduler: "ve",
    LMSDiscreteScheduler: "ve",
    DPMSolverMultistepScheduler: "vp",
    UniPCMultistepScheduler: "vp",
    DDIMScheduler: "vp",
    PNDMScheduler: "vp",
    LCMScheduler: "vp",
    TCDScheduler: "vp",
    IPNDMScheduler: "vp",
}


class RecordingDenoiser(torch.nn.Module):
    def __init__(self, inner_wrapper, log_sigma: list):
        super().__init__()
        self.w = inner_wrapper
        self.log_sigma = log_sigma

    def forward(self, x, sigma, **kw):
        self.log_sigma.append(float(sigma.reshape(-1)[0]))
        return self.w(x, sigma, **kw)


def k_wrapper(inner: AnalyticUNet, prediction: str):
    if prediction == "epsilon":
        return KEXT.CompVisDenoiser(inner, quantize=False), "k_diffusion.external.CompVisDenoiser(quantize=False)"
    if prediction == "v_prediction":
        return KEXT.CompVisVDenoiser(inner, quantize=False), "k_diffusion.external.CompVisVDenoiser(quantize=False)"
    return X0Denoiser(inner), "X0Denoiser (this script; CompVisDenoiser's c_in and sigma_to_t, denoised = model output)"


def run_k(ctx: Ctx, name: str, sampler: str, fn_name: str, sigmas: torch.Tensor, schedule: dict,
          prediction: str = "epsilon", kwargs: dict | None = None, stochastic: bool = False,
          record: bool = True, notes: str | None = None, init_scale: str = "sigmas[0]", noise0=None):
    sigmas = sigmas.to(torch.float64)
    bank = NoiseBank(name)
    log: list = []
    inner = AnalyticUNet(ctx.mixture, ctx.sd_ac, prediction, log)
    wrapper, wrapper_name = k_wrapper(inner, prediction)
    ksig: list = []
    den = RecordingDenoiser(wrapper, ksig)
    n0 = ctx.init_noise.clone() if noise0 is None else noise0
    if init_scale == "sigmas[0]":
        x = n0 * sigmas[0]
    else:
        raise ValueError(init_scale)
    init = {"rule": "noise * sigmas[0]", "scale": fnum(sigmas[0]), "noise": flist(n0), "latent": flist(x)}
    xs: list = []
    extra_args = {"cond": None}
    kw = dict(kwargs or {})
    if stochastic:
        def noise_sampler(s, sn):
            return bank.next({"sigma": fnum(s), "sigma_next": fnum(sn)})
        kw["noise_sampler"] = noise_sampler
    fn = getattr(K, fn_name)
    out = fn(den, x, sigmas, extra_args=extra_args, callback=lambda d: xs.append(d["x"].clone()), disable=True, **kw)
    assert len(ksig) == len(log)
    for c, s in zip(log, ksig):
        c["k_sigma"] = s
    if not record:
        return out, len(log)
    traj = [flist(v) for v in xs[1:]] + [flist(out)]
    case = {
        "name": name,
        "sampler": sampler,
        "reference": {
            "library": "k-diffusion",
            "version": kdiff_version(),
            "function": f"k_diffusion.sampling.{fn_name}",
            "kwargs": {k: v for k, v in kw.items() if k != "noise_sampler"},
            "noise_sampler": "injected: noise_sampler(sigma, sigma_next) returns the next recorded vector" if stochastic else None,
            "denoiser": wrapper_name,
            "model_extra_args": {"cond": None},
        },
        "prediction": prediction,
        "table": "sd",
        "schedule": schedule,
        "steps": len(sigmas) - 1,
        "latent_form": "ve",
        "sigmas": flist(sigmas),
        "timesteps": flist(KEXT.DiscreteSchedule(ctx.sd_sigmas, quantize=False).sigma_to_t(sigmas[:-1])),
        "init": init,
        "model_calls": [{"sigma": fnum(c["k_sigma"]), "t": fnum(c["t"]), "model_sigma": fnum(c["model_sigma"]), "x": flist(c["x"])} for c in log],
        "noise": bank.used,
        "noise_calls": bank.calls,
        "latents_after": "each sampler iteration i (sigmas[i] -> sigmas[i+1])",
        "latents": traj,
        "final": flist(out),
        "final_is": "the sampler's return value",
    }
    if not stochastic:
        del case["noise_calls"]
        assert not case["noise"]
    if notes:
        case["notes"] = notes
    ctx.add(case)
    return out, len(log)


def run_ipndm(ctx: Ctx, name: str, sigmas: torch.Tensor, schedule: dict):
    """diffusers' IPNDMScheduler is written for v-diffusion models on the trigonometric
    schedule (x = cos(phi) x0 + sin(phi) eps, model(x, t) -> v, t = phi*2/pi). Any
    VP noise-level sequence can be given through `trained_betas` (its "betas" are the VP
    noise stds sin(phi_i), one per step plus the final 0). We feed it SD's sigmas
    (sin phi = sigma/sqrt(1+sigma^2)) and adapt the eps-model: t -> sigma = tan(t*pi/2) ->
    SD timestep t_sd = sigma_to_t(sigma) (k-diffusion's log-linear rule) -> epsilon ->
    v = cos(phi) eps - sin(phi) x0_hat with x0_hat = (x - sin(phi) eps)/cos(phi)."""
    sigmas = sigmas.to(torch.float64)
    bank = NoiseBank(name)
    log: list = []
    inner = AnalyticUNet(ctx.mixture, ctx.sd_ac, "epsilon", log)
    ks = KEXT.DiscreteSchedule(ctx.sd_sigmas, quantize=False)
    betas = (sigmas / (1 + sigmas**2) ** 0.5)
    steps = len(sigmas) - 1
    sched = IPNDMScheduler(num_train_timesteps=1000, trained_betas=betas.tolist())
    sched.set_timesteps(steps)
    # float64 state by set_timesteps' own formulas (it stores trained_betas as float32)
    sched.betas = betas.clone()
    sched.alphas = (1.0 - sched.betas**2) ** 0.5
    sched.timesteps = (torch.atan2(sched.betas, sched.alphas) / math.pi * 2)[:-1]
    n0 = ctx.init_noise.clone()
    latents = n0 * float(sched.init_noise_sigma)
    init = {"rule": "noise * init_noise_sigma (VP latent)", "scale": fnum(sched.init_noise_sigma), "noise": flist(n0), "latent": flist(latents)}
    traj, tsd = [], []
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(latents, t)
        sigma = math.tan(float(t) * math.pi / 2)
        t_sd = float(ks.sigma_to_t(torch.tensor(sigma, dtype=torch.float64)))
        tsd.append(t_sd)
        eps = inner(x_in, t_sd)
        a, b = sched.alphas[i], sched.betas[i]
        x0_hat = (x_in - b * eps) / a
        v = a * eps - b * x0_hat
        latents = sched.step(v, t, latents).prev_sample
        traj.append(flist(latents))
    case = {
        "name": name,
        "sampler": "ipndm",
        "reference": {
            "library": "diffusers",
            "version": diffusers.__version__,
            "class": "IPNDMScheduler",
            "config": {"num_train_timesteps": 1000, "trained_betas": "sigmas/sqrt(1+sigmas^2) of this case (steps+1 values, last 0)"},
            "set_timesteps": {"num_inference_steps": steps},
            "adapter": "v-diffusion adapter, see run_ipndm(): t -> sigma = tan(t pi/2) -> t_sd = k-diffusion sigma_to_t(sigma); model output converted eps -> v",
            "float64_state": "betas, alphas = sqrt(1-betas^2), timesteps = atan2(betas, alphas)*2/pi recomputed in float64 after set_timesteps",
        },
        "prediction": "epsilon",
        "table": "sd",
        "schedule": schedule,
        "steps": steps,
        "latent_form": "vp",
        "sigmas": flist(sigmas),
        "timesteps": flist(sched.timesteps),
        "timesteps_sd": flist(tsd),
        "init": init,
        "model_calls": model_calls_json(log),
        "noise": [],
        "latents_after": "each scheduler.step() call (= each model call)",
        "latents": traj,
        "final": flist(latents),
        "final_is": "latents after the last step",
    }
    ctx.add(case)
    return case


# ---------------------------------------------------------------------------------------
# Schedules defined outside diffusers / k-diffusion (written here from their definitions).


def comfy_timestep(sigmas_asc: torch.Tensor, sigma: float) -> int:
    """ComfyUI ModelSamplingDiscrete.timestep: index of the nearest log-sigma (an integer)."""
    return int(torch.argmin((math.log(sigma) - sigmas_asc.log()).abs()))


def sched_sgm_uniform(sig: torch.Tensor, n: int) -> torch.Tensor:
    """ComfyUI comfy/samplers.py normal_scheduler(sgm=True): start = timestep(sigma_max),
    end = timestep(sigma_min); t_i = linspace(start, end, n+1)[:-1]; sigma(t_i) by the
    log-linear rule; append 0."""
    start, end = comfy_timestep(sig, float(sig[-1])), comfy_timestep(sig, float(sig[0]))
    ts = torch.linspace(start, end, n + 1, dtype=torch.float64)[:-1]
    return torch.tensor([sigma_of_t(sig, float(t)) for t in ts] + [0.0], dtype=torch.float64)


def sched_normal(sig: torch.Tensor, n: int) -> torch.Tensor:
    """ComfyUI normal_scheduler(sgm=False): t_i = linspace(start, end, n) (the last is the
    minimum timestep 0, so sigma_min is visited), sigma(t_i), append 0."""
    start, end = comfy_timestep(sig, float(sig[-1])), comfy_timestep(sig, float(sig[0]))
    ts = torch.linspace(start, end, n, dtype=torch.float64)
    return torch.tensor([sigma_of_t(sig, float(t)) for t in ts] + [0.0], dtype=torch.float64)


def sched_simple(sig: torch.Tensor, n: int) -> torch.Tensor:
    """ComfyUI simple_scheduler: ss = len(sigmas)/n; sigma_i = sigmas[-(1 + int(i*ss))]
    (table entries, descending from sigma_max), append 0."""
    ss = len(sig) / n
    return torch.tensor([float(sig[-(1 + int(i * ss))]) for i in range(n)] + [0.0], dtype=torch.float64)


def sched_ddim_uniform(sig: torch.Tensor, n: int) -> torch.Tensor:
    """ComfyUI ddim_scheduler: ss = max(len(sigmas)//n, 1); table entries at 1, 1+ss,
    1+2ss, ... < len; reversed; final 0."""
    ss = max(len(sig) // n, 1)
    idx = list(range(1, len(sig), ss))
    return torch.tensor([float(sig[i]) for i in idx][::-1] + [0.0], dtype=torch.float64)


def sched_beta_comfy(sig: torch.Tensor, n: int, alpha=0.6, beta=0.6) -> torch.Tensor:
    """ComfyUI beta_scheduler (arXiv:2407.12173): ts = 1 - linspace(0, 1, n, endpoint=False);
    ts = rint(beta.ppf(ts, alpha, beta) * (len-1)); consecutive duplicates dropped;
    sigma = sigmas[int(t)]; append 0."""
    total = len(sig) - 1
    ts = 1 - np.linspace(0, 1, n, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total)
    out, last = [], -1
    for t in ts:
        if t != last:
            out.append(float(sig[int(t)]))
        last = t
    return torch.tensor(out + [0.0], dtype=torch.float64)


# AYS (Sabour et al. 2024, "Align Your Steps"): the published SD 1.5 10-step noise levels
# (NVIDIA's how-to page; the same digits as ComfyUI's nodes_align_your_steps.py), ending at
# sigma_min. diffusers' AysSchedules["StableDiffusionSigmas"] are the same rounded to 3
# decimals with the last replaced by 0.
AYS_SD15 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]


def loglinear_interp(levels, num):
    """AYS how-to / ComfyUI loglinear_interp: the decreasing levels placed at x = linspace(0,
    1, len), log(level) interpolated linearly at linspace(0, 1, num)."""
    xs = np.linspace(0, 1, len(levels))
    ys = np.log(np.asarray(levels, dtype=np.float64)[::-1])
    new = np.interp(np.linspace(0, 1, num), xs, ys)
    return np.exp(new)[::-1].copy()


def sched_ays(n: int) -> torch.Tensor:
    """AYS SD 1.5 for n steps: the 11 levels as they are for n = 10, else log-linearly
    interpolated to n+1 values; the last one is then set to 0 (ComfyUI AlignYourStepsScheduler)."""
    s = np.asarray(AYS_SD15, dtype=np.float64) if n + 1 == len(AYS_SD15) else loglinear_interp(AYS_SD15, n + 1)
    s = s.copy()
    s[-1] = 0.0
    return torch.from_numpy(s)


def k_karras(sig, n):
    return K.get_sigmas_karras(n, float(sig[0]), float(sig[-1]), rho=7.0)


def k_exponential(sig, n):
    return K.get_sigmas_exponential(n, float(sig[0]), float(sig[-1]))


# ---------------------------------------------------------------------------------------
# The cases.


def build(ctx: Ctx):
    sig = ctx.sd_sigmas
    S = 8
    karras = k_karras(sig, S)
    kar = {"name": "karras", "source": "k_diffusion.sampling.get_sigmas_karras(n, sigma_min=sigmas[0], sigma_max=sigmas[999], rho=7)", "sigma_min": float(sig[0]), "sigma_max": float(sig[-1]), "rho": 7.0}
    lin = {"name": "linspace", "source": "diffusers timestep_spacing='linspace'", "steps_offset": 1}
    ddim_sd = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    # --- 1. every sampler, epsilon, 8 steps (DDIM 10), diffusers on its default spacing ---
    E = "epsilon"
    run_diffusers(ctx, "euler/diffusers/linspace", "euler", EulerDiscreteScheduler, E, S, lin, {"steps_offset": 1})
    run_diffusers(ctx, "euler_a/diffusers/linspace", "euler_a", EulerAncestralDiscreteScheduler, E, S, lin, {"steps_offset": 1})
    run_diffusers(ctx, "heun/diffusers/linspace", "heun", HeunDiscreteScheduler, E, S, lin, {"steps_offset": 1})
    run_diffusers(ctx, "dpm2/diffusers/linspace", "dpm2", KDPM2DiscreteScheduler, E, S, lin, {"steps_offset": 1})
    run_diffusers(ctx, "dpm2_a/diffusers/linspace", "dpm2_a", KDPM2AncestralDiscreteScheduler, E, S, lin, {"steps_offset": 1})
    run_diffusers(ctx, "lms/diffusers/linspace", "lms", LMSDiscreteScheduler, E, S, lin, {"steps_offset": 1})
    dpm_lin = {"name": "linspace", "source": "DPMSolverMultistep/UniPC timestep_spacing='linspace': linspace(0, 999, n+1).round()[::-1][:-1]", "steps_offset": 1}
    run_diffusers(ctx, "dpm++2m/diffusers/linspace", "dpm++2m", DPMSolverMultistepScheduler, E, S, dpm_lin,
                  {"steps_offset": 1, "algorithm_type": "dpmsolver++", "solver_order": 2})
    run_diffusers(ctx, "dpm++2m_sde/diffusers/linspace", "dpm++2m_sde", DPMSolverMultistepScheduler, E, S, dpm_lin,
                  {"steps_offset": 1, "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"})
    run_diffusers(ctx, "unipc/diffusers/linspace", "unipc", UniPCMultistepScheduler, E, S, dpm_lin,
                  {"steps_offset": 1, "solver_type": "bh2", "solver_order": 2})
    lead = {"name": "leading", "source": "diffusers timestep_spacing='leading'", "steps_offset": 1}
    run_diffusers(ctx, "ddim_eta0/diffusers/leading", "ddim", DDIMScheduler, E, 10, lead, ddim_sd, step_kwargs={"eta": 0.0})
    run_diffusers(ctx, "ddim_eta1/diffusers/leading", "ddim", DDIMScheduler, E, 10, lead, ddim_sd, step_kwargs={"eta": 1.0})
    run_diffusers(ctx, "plms/diffusers/leading", "plms", PNDMScheduler, E, S, lead,
                  {"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1})
    lcm_s = {"name": "lcm", "source": "LCMScheduler.set_timesteps (origin schedule of original_inference_steps=50)", "original_inference_steps": 50}
    run_diffusers(ctx, "lcm/diffusers", "lcm", LCMScheduler, E, 4, lcm_s, {"original_inference_steps": 50, "steps_offset": 1})
    tcd_s = {"name": "tcd", "source": "TCDScheduler.set_timesteps (origin schedule of original_inference_steps=50)", "original_inference_steps": 50}
    run_diffusers(ctx, "tcd/diffusers", "tcd", TCDScheduler, E, 4, tcd_s, {"original_inference_steps": 50}, step_kwargs={"eta": 0.3})

    # k-diffusion samplers on Karras sigmas
    run_k(ctx, "euler/k/karras", "euler", "sample_euler", karras, kar)
    run_k(ctx, "euler_a/k/karras", "euler_a", "sample_euler_ancestral", karras, kar, kwargs={"eta": 1.0, "s_noise": 1.0}, stochastic=True)
    run_k(ctx, "heun/k/karras", "heun", "sample_heun", karras, kar)
    run_k(ctx, "dpm2/k/karras", "dpm2", "sample_dpm_2", karras, kar)
    run_k(ctx, "dpm2_a/k/karras", "dpm2_a", "sample_dpm_2_ancestral", karras, kar, kwargs={"eta": 1.0, "s_noise": 1.0}, stochastic=True)
    run_k(ctx, "lms/k/karras", "lms", "sample_lms", karras, kar, kwargs={"order": 4})
    run_k(ctx, "dpm++2m/k/karras", "dpm++2m", "sample_dpmpp_2m", karras, kar)
    run_k(ctx, "dpm++2s_a/k/karras", "dpm++2s_a", "sample_dpmpp_2s_ancestral", karras, kar, kwargs={"eta": 1.0, "s_noise": 1.0}, stochastic=True)
    run_k(ctx, "dpm++sde/k/karras", "dpm++sde", "sample_dpmpp_sde", karras, kar, kwargs={"eta": 1.0, "s_noise": 1.0, "r": 0.5}, stochastic=True)
    run_k(ctx, "dpm++2m_sde/k/karras", "dpm++2m_sde", "sample_dpmpp_2m_sde", karras, kar, kwargs={"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}, stochastic=True)
    run_k(ctx, "dpm++2m_sde_heun/k/karras", "dpm++2m_sde", "sample_dpmpp_2m_sde", karras, kar, kwargs={"eta": 1.0, "s_noise": 1.0, "solver_type": "heun"}, stochastic=True)
    run_k(ctx, "dpm++3m_sde/k/karras", "dpm++3m_sde", "sample_dpmpp_3m_sde", karras, kar, kwargs={"eta": 1.0, "s_noise": 1.0}, stochastic=True)
    run_ipndm(ctx, "ipndm/diffusers/karras", karras, kar)

    # --- 2. schedules, with euler and dpm++2m (and a few more) ---
    for spacing in ("leading", "trailing"):
        sp = {"name": spacing, "source": f"diffusers timestep_spacing='{spacing}'", "steps_offset": 1}
        run_diffusers(ctx, f"euler/diffusers/{spacing}", "euler", EulerDiscreteScheduler, E, S, sp, {"steps_offset": 1, "timestep_spacing": spacing})
        run_diffusers(ctx, f"dpm++2m/diffusers/{spacing}", "dpm++2m", DPMSolverMultistepScheduler, E, S, sp, {"steps_offset": 1, "timestep_spacing": spacing})
    run_diffusers(ctx, "ddim_eta0/diffusers/trailing", "ddim", DDIMScheduler, E, 10, {"name": "trailing", "source": "diffusers timestep_spacing='trailing'"},
                  dict(ddim_sd, timestep_spacing="trailing"), step_kwargs={"eta": 0.0})
    dk = {"name": "karras", "source": "diffusers use_karras_sigmas=True (sigma_min/max = ends of the table, rho 7)"}
    for cls, nm, smp, extra in [
        (EulerDiscreteScheduler, "euler", "euler", {}),
        (DPMSolverMultistepScheduler, "dpm++2m", "dpm++2m", {}),
        (KDPM2DiscreteScheduler, "dpm2", "dpm2", {}),
        (HeunDiscreteScheduler, "heun", "heun", {}),
        (LMSDiscreteScheduler, "lms", "lms", {}),
        (UniPCMultistepScheduler, "unipc", "unipc", {}),
    ]:
        run_diffusers(ctx, f"{nm}/diffusers/karras", smp, cls, E, S, dk, {"steps_offset": 1, "use_karras_sigmas": True, **extra})
    de = {"name": "exponential", "source": "diffusers use_exponential_sigmas=True"}
    db = {"name": "beta_diffusers", "source": "diffusers use_beta_sigmas=True (alpha = beta = 0.6, linear in sigma)"}
    for cls, nm in [(EulerDiscreteScheduler, "euler"), (DPMSolverMultistepScheduler, "dpm++2m")]:
        run_diffusers(ctx, f"{nm}/diffusers/exponential", nm, cls, E, S, de, {"steps_offset": 1, "use_exponential_sigmas": True})
        run_diffusers(ctx, f"{nm}/diffusers/beta", nm, cls, E, S, db, {"steps_offset": 1, "use_beta_sigmas": True})
    ays_t = AysSchedules["StableDiffusionTimesteps"]
    ays_s = AysSchedules["StableDiffusionSigmas"]
    at = {"name": "ays_timesteps", "source": "diffusers AysSchedules['StableDiffusionTimesteps'] passed as set_timesteps(timesteps=...)", "timesteps": ays_t}
    run_diffusers(ctx, "euler/diffusers/ays_timesteps", "euler", EulerDiscreteScheduler, E, 10, at, {"steps_offset": 1}, set_timesteps={"timesteps": ays_t})
    run_diffusers(ctx, "dpm++2m/diffusers/ays_timesteps", "dpm++2m", DPMSolverMultistepScheduler, E, 10, at, {"steps_offset": 1}, set_timesteps={"timesteps": ays_t})
    asg = {"name": "ays_sigmas", "source": "diffusers AysSchedules['StableDiffusionSigmas'] passed as EulerDiscreteScheduler.set_timesteps(sigmas=...)", "sigmas": ays_s}
    run_diffusers(ctx, "euler/diffusers/ays_sigmas", "euler", EulerDiscreteScheduler, E, 10, asg, {"steps_offset": 1}, set_timesteps={"sigmas": ays_s})

    # k-diffusion / ComfyUI-defined schedules with sample_euler and sample_dpmpp_2m
    kschedules = [
        ("exponential", k_exponential(sig, S), {"name": "exponential", "source": "k_diffusion.sampling.get_sigmas_exponential(n, sigmas[0], sigmas[999])"}),
        ("k_uniform", KEXT.DiscreteSchedule(sig, quantize=False).get_sigmas(S), {"name": "k_uniform", "source": "k_diffusion.external.DiscreteSchedule.get_sigmas(n): t = linspace(999, 0, n), k-diffusion t_to_sigma (t cast to float32), append 0 (A1111 'Automatic' for k samplers)"}),
        ("ays", sched_ays(S), {"name": "ays", "source": "AYS SD1.5 noise levels, log-linear interpolation to n+1 values, last set to 0 (ComfyUI AlignYourStepsScheduler / AYS how-to)", "levels": AYS_SD15}),
        ("ays10", sched_ays(10), {"name": "ays", "source": "AYS SD1.5 noise levels as published (10 steps), last set to 0", "levels": AYS_SD15}),
        ("sgm_uniform", sched_sgm_uniform(sig, S), {"name": "sgm_uniform", "source": "ComfyUI comfy/samplers.py normal_scheduler(sgm=True)"}),
        ("normal", sched_normal(sig, S), {"name": "normal", "source": "ComfyUI comfy/samplers.py normal_scheduler(sgm=False)"}),
        ("simple", sched_simple(sig, S), {"name": "simple", "source": "ComfyUI comfy/samplers.py simple_scheduler"}),
        ("ddim_uniform", sched_ddim_uniform(sig, S), {"name": "ddim_uniform", "source": "ComfyUI comfy/samplers.py ddim_scheduler"}),
        ("beta", sched_beta_comfy(sig, S), {"name": "beta", "source": "ComfyUI comfy/samplers.py beta_scheduler(alpha=0.6, beta=0.6)", "alpha": 0.6, "beta": 0.6}),
    ]
    for nm, sigmas, sd in kschedules:
        run_k(ctx, f"euler/k/{nm}", "euler", "sample_euler", sigmas, sd)
        run_k(ctx, f"dpm++2m/k/{nm}", "dpm++2m", "sample_dpmpp_2m", sigmas, sd)
    run_k(ctx, "heun/k/sgm_uniform", "heun", "sample_heun", kschedules[4][1], kschedules[4][2])

    # --- 3. prediction types ---
    for pred in ("v_prediction", "sample"):
        p = "v" if pred == "v_prediction" else "x0"
        run_diffusers(ctx, f"euler/diffusers/linspace/{p}", "euler", EulerDiscreteScheduler, pred, S, lin, {"steps_offset": 1})
        run_diffusers(ctx, f"dpm++2m/diffusers/linspace/{p}", "dpm++2m", DPMSolverMultistepScheduler, pred, S, dpm_lin, {"steps_offset": 1})
        run_diffusers(ctx, f"ddim_eta0/diffusers/leading/{p}", "ddim", DDIMScheduler, pred, 10, lead, ddim_sd, step_kwargs={"eta": 0.0})
        run_diffusers(ctx, f"unipc/diffusers/linspace/{p}", "unipc", UniPCMultistepScheduler, pred, S, dpm_lin, {"steps_offset": 1})
        run_diffusers(ctx, f"lcm/diffusers/{p}", "lcm", LCMScheduler, pred, 4, lcm_s, {"original_inference_steps": 50, "steps_offset": 1})
        run_k(ctx, f"euler/k/karras/{p}", "euler", "sample_euler", karras, kar, prediction=pred)
        run_k(ctx, f"dpm++2m/k/karras/{p}", "dpm++2m", "sample_dpmpp_2m", karras, kar, prediction=pred)
    run_diffusers(ctx, "heun/diffusers/linspace/v", "heun", HeunDiscreteScheduler, "v_prediction", S, lin, {"steps_offset": 1})
    run_diffusers(ctx, "euler_a/diffusers/linspace/v", "euler_a", EulerAncestralDiscreteScheduler, "v_prediction", S, lin, {"steps_offset": 1})

    # zero terminal SNR (Lin et al. 2023), v-prediction, trailing spacing
    zs = {"name": "trailing", "source": "diffusers timestep_spacing='trailing', rescale_betas_zero_snr=True", "zero_terminal_snr": True}
    run_diffusers(ctx, "ddim_eta0/diffusers/trailing/v/zsnr", "ddim", DDIMScheduler, "v_prediction", 10, zs,
                  dict(ddim_sd, timestep_spacing="trailing", rescale_betas_zero_snr=True), step_kwargs={"eta": 0.0})
    run_diffusers(ctx, "euler/diffusers/trailing/v/zsnr", "euler", EulerDiscreteScheduler, "v_prediction", S, zs,
                  {"steps_offset": 1, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True})

    # --- 4. img2img, strength 0.6 ---
    run_diffusers(ctx, "euler/diffusers/linspace/img2img", "euler", EulerDiscreteScheduler, E, S, lin, {"steps_offset": 1}, img2img=0.6)
    run_diffusers(ctx, "euler_a/diffusers/linspace/img2img", "euler_a", EulerAncestralDiscreteScheduler, E, S, lin, {"steps_offset": 1}, img2img=0.6)
    run_diffusers(ctx, "dpm++2m/diffusers/linspace/img2img", "dpm++2m", DPMSolverMultistepScheduler, E, S, dpm_lin, {"steps_offset": 1}, img2img=0.6)
    run_diffusers(ctx, "ddim_eta0/diffusers/leading/img2img", "ddim", DDIMScheduler, E, 10, lead, ddim_sd, step_kwargs={"eta": 0.0}, img2img=0.6)
    run_diffusers(ctx, "lcm/diffusers/img2img", "lcm", LCMScheduler, E, 4, lcm_s, {"original_inference_steps": 50, "steps_offset": 1}, img2img=0.6)


def convergence(ctx: Ctx):
    """Deterministic samplers on Karras sigmas (8 -> n steps), all from the same VE start
    x_T = noise * sigma_max; final samples for n = 4..64 and 1024."""
    sig = ctx.sd_sigmas
    n0 = ctx.init_noise.clone()
    ns = [4, 8, 16, 32, 64, 1024]
    out = {"schedule": {"name": "karras", "sigma_min": float(sig[0]), "sigma_max": float(sig[-1]), "rho": 7.0,
                        "source": "k_diffusion.sampling.get_sigmas_karras (float64)"},
           "init": {"rule": "x_T = noise * sigma_max (VE); UniPC starts from the VP latent x_T / sqrt(1 + sigma_max^2)", "noise": flist(n0)},
           "steps": ns, "runs": []}
    for sampler, fn in [("euler", "sample_euler"), ("heun", "sample_heun"), ("dpm++2m", "sample_dpmpp_2m"), ("lms", "sample_lms")]:
        finals, calls = {}, {}
        for n in ns:
            x, nc = run_k(ctx, f"conv/{sampler}/{n}", sampler, fn, k_karras(sig, n), {}, record=False, noise0=n0,
                          kwargs={"order": 4} if sampler == "lms" else None)
            finals[str(n)] = flist(x)
            calls[str(n)] = nc
        out["runs"].append({"sampler": sampler, "reference": f"k_diffusion.sampling.{fn}" + (" (order=4)" if sampler == "lms" else ""),
                            "finals": finals, "model_calls": calls})
    # UniPC (diffusers), on exactly the same float64 Karras grid: sched.sigmas replaced by
    # get_sigmas_karras' float64 values and sched.timesteps by the unrounded t(sigma)
    # (diffusers rounds Karras timesteps to integers, which changes the ODE being solved).
    finals, calls = {}, {}
    ks = KEXT.DiscreteSchedule(sig, quantize=False)
    for n in ns:
        log: list = []
        model = AnalyticUNet(ctx.mixture, ctx.sd_ac, "epsilon", log)
        sched = UniPCMultistepScheduler(**SD_BASE, steps_offset=1, use_karras_sigmas=True, solver_type="bh2", solver_order=2)
        sched.set_timesteps(n)
        upcast_state(sched)
        grid = k_karras(sig, n)
        sched.sigmas = grid.clone()
        sched.timesteps = ks.sigma_to_t(grid[:-1])
        lat = n0 * grid[0] / (1 + grid[0] ** 2) ** 0.5
        for t in sched.timesteps:
            lat = sched.step(model(sched.scale_model_input(lat, t), t), t, lat).prev_sample
        finals[str(n)] = flist(lat)
        calls[str(n)] = len(log)
    out["runs"].append({"sampler": "unipc", "reference": "diffusers UniPCMultistepScheduler(solver_type='bh2', solver_order=2), sigmas/timesteps replaced by the float64 Karras grid and its fractional t",
                        "finals": finals, "model_calls": calls})
    # observed errors vs each sampler's own 1024-step result, and how far the 1024-step
    # results are from Heun's (informational)
    heun = torch.tensor(out["runs"][1]["finals"]["1024"])
    for r in out["runs"]:
        ref = torch.tensor(r["finals"]["1024"])
        r["rms_error_vs_1024"] = {k: float(((torch.tensor(v) - ref) ** 2).mean().sqrt()) for k, v in r["finals"].items() if k != "1024"}
        r["rms_1024_vs_heun_1024"] = float(((ref - heun) ** 2).mean().sqrt())
    return out


CROSS = [
    ("euler/diffusers/linspace", "euler/diffusers/linspace/v", "prediction types agree (same x0 from an exact model)"),
    ("euler/diffusers/linspace", "euler/diffusers/linspace/x0", "prediction types agree"),
    ("dpm++2m/diffusers/linspace", "dpm++2m/diffusers/linspace/v", "prediction types agree"),
    ("unipc/diffusers/linspace", "unipc/diffusers/linspace/x0", "prediction types agree"),
    ("ddim_eta0/diffusers/leading", "ddim_eta0/diffusers/leading/v", "prediction types agree"),
    ("euler/k/karras", "euler/k/karras/v", "prediction types agree (k-diffusion wrappers)"),
    ("euler/diffusers/karras", "euler/k/karras", "diffusers vs k-diffusion: float32 sigmas/timesteps in diffusers"),
    ("heun/diffusers/karras", "heun/k/karras", "diffusers vs k-diffusion"),
    ("lms/diffusers/karras", "lms/k/karras", "diffusers vs k-diffusion"),
    ("dpm2/diffusers/karras", "dpm2/k/karras", "diffusers rounds KDPM2's Karras timesteps to integers"),
    ("dpm++2m/diffusers/karras", "dpm++2m/k/karras", "diffusers rounds DPMSolverMultistep's Karras timesteps to integers"),
    ("euler/diffusers/exponential", "euler/k/exponential", "diffusers vs k-diffusion"),
    ("euler/diffusers/ays_sigmas", "euler/k/ays10", "AYS: diffusers' 3-decimal sigmas vs the published levels"),
]


def cross_checks(ctx: Ctx):
    """How far some cases that compute the same thing differently are apart (informational)."""
    by = {c["name"]: c for c in ctx.cases}
    out = []
    for a, b, why in CROSS:
        fa, fb = np.array(by[a]["final"]), np.array(by[b]["final"])
        out.append({"a": a, "b": b, "why": why, "max_abs_diff_final": float(np.abs(fa - fb).max())})
    return out


def model_checks(ctx: Ctx):
    """Direct evaluations of the analytic model (all three outputs) for unit tests."""
    rng = np.random.default_rng([SEED, 1])
    out = []
    for table, ts in [("sd", [0.0, 1.0, 0.25, 137.5, 500.0, 998.75, 999.0, -3.0, 1200.0]),
                      ("sd_zsnr", [999.0, 998.0, 500.0]), ("sd_zsnr_euler", [999.0, 998.5])]:
        ac = ctx.tables[table]
        model = AnalyticUNet(ctx.mixture, ac, "epsilon", [])
        for t in ts:
            x = torch.from_numpy(rng.standard_normal(D)).reshape(LATENT_SHAPE)
            sigma, o = model.evaluate(x, t)
            out.append({"table": table, "t": t, "x": flist(x), "model_sigma": fnum(sigma),
                        "epsilon": flist(o["epsilon"]), "v_prediction": flist(o["v_prediction"]), "sample": flist(o["sample"])})
    # the denoiser itself at a few sigmas
    for s in [0.01, 0.5, 3.0, 14.6]:
        x = torch.from_numpy(rng.standard_normal(D))
        out.append({"denoiser_sigma": s, "x_ve": flist(x), "D": flist(ctx.mixture.denoise(x, s))})
    return out


# ---------------------------------------------------------------------------------------
# Output.


def dumps(obj, indent: int = 0) -> str:
    """JSON (floats as repr(), so they round-trip exactly), indented one space per level,
    with lists of scalars kept on one line."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad} {json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return "[" + ", ".join(json.dumps(v, allow_nan=False) for v in obj) + "]"
        items = [pad + " " + dumps(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/fixtures/samplers"))
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    np.seterr(all="ignore")  # diffusers' KDPM2 takes log(0) on the final sigma

    mp = mixture_params()
    mixture = Mixture(mp)
    sd = EulerDiscreteScheduler(**SD_BASE)
    ctx = Ctx(mixture, sd.alphas_cumprod.to(torch.float64).clone())
    ctx.tables["sd_zsnr"] = DDIMScheduler(**SD_BASE, rescale_betas_zero_snr=True).alphas_cumprod.to(torch.float64).clone()
    ctx.tables["sd_zsnr_euler"] = EulerDiscreteScheduler(**SD_BASE, rescale_betas_zero_snr=True).alphas_cumprod.to(torch.float64).clone()
    for cls in (DDIMScheduler, PNDMScheduler, LCMScheduler, TCDScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
                HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, LMSDiscreteScheduler, EulerAncestralDiscreteScheduler):
        assert torch.equal(cls(**SD_BASE).alphas_cumprod.to(torch.float64), ctx.sd_ac), cls
    # the initial noise of every case (so that cases can be compared with each other)
    ctx.init_noise = torch.from_numpy(np.random.default_rng([SEED, 3]).standard_normal(D)).reshape(LATENT_SHAPE)
    # a clean latent for img2img: a draw from component 0 of the mixture
    rng = np.random.default_rng([SEED, 2])
    ctx.x0_init = (mixture.mu[0] + mixture.tau[0] * torch.from_numpy(rng.standard_normal(D))).reshape(LATENT_SHAPE)

    build(ctx)
    conv = convergence(ctx)
    checks = model_checks(ctx)

    fixture = {
        "format": FORMAT,
        "generator": {
            "script": "tools/reference/sampler_fixtures.py",
            "command": "/work/venv-ref/bin/python tools/reference/sampler_fixtures.py --out tests/fixtures/samplers",
            "seed": SEED,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "scipy": scipy.__version__, "diffusers": diffusers.__version__, "k-diffusion": kdiff_version()},
        },
        "latent_shape": list(LATENT_SHAPE),
        "mixture": mp,
        "tables": {k: {"alphas_cumprod": flist(v)} for k, v in ctx.tables.items()},
        "model_checks": checks,
        "cases": ctx.cases,
        "cross_checks": cross_checks(ctx),
        "convergence": conv,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(dumps(fixture) + "\n")
    print(f"sampler_fixtures: {len(ctx.cases)} cases -> {out / 'cases.json'} ({(out / 'cases.json').stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
