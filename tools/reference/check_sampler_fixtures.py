#!/usr/bin/env python3
"""Independent replay of tests/fixtures/samplers/cases.json: numpy only, no diffusers, no
k-diffusion, no torch. Every sampler and schedule is re-implemented here from the
conventions written in tests/fixtures/samplers/README.md, the way the Rust side has to, and
checked against the recorded model inputs, latents and finals. It is the proof that the
fixture plus its README are enough to reproduce the references, and a readable second
description of each algorithm.

    python3 tools/reference/check_sampler_fixtures.py [tests/fixtures/samplers/cases.json]

Replays use the recorded sigma/timestep arrays (diffusers rounds them to float32); schedule
recomputations from their definitions in float64 are checked separately with a looser
tolerance (float32 rounding of the references).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

TOL = 1e-9  # replay (float64 both sides); relative to max(1, |x|)
TOL_SCHED = 2e-6  # float64 recomputation vs diffusers' float32-rounded schedules


# ---------------------------------------------------------------------------------------
# The model.


class Model:
    def __init__(self, fx, table: str):
        m = fx["mixture"]
        self.w = np.array(m["weights"])
        self.mu = np.array(m["means"])
        self.tau = np.array(m["stds"])
        self.ac = np.array(fx["tables"][table]["alphas_cumprod"], dtype=np.float64)
        with np.errstate(divide="ignore"):
            self.sig = np.sqrt((1 - self.ac) / self.ac)
        self.calls: list = []

    def denoise(self, x, sigma):
        if math.isinf(sigma):
            return (self.w[:, None] * self.mu).sum(0)
        var = self.tau**2 + sigma * sigma
        diff = x[None, :] - self.mu
        logp = np.log(self.w) - 0.5 * len(x) * np.log(2 * math.pi * var) - (diff * diff).sum(1) / (2 * var)
        r = np.exp(logp - logp.max())
        r /= r.sum()
        post = self.mu + (self.tau**2 / var)[:, None] * diff
        return (r[:, None] * post).sum(0)

    def sigma_of_t(self, t):
        t = min(max(float(t), 0.0), len(self.sig) - 1.0)
        lo, hi = math.floor(t), math.ceil(t)
        w = t - lo
        if w == 0.0:
            return float(self.sig[lo])
        return math.exp((1 - w) * math.log(self.sig[lo]) + w * math.log(self.sig[hi]))

    def outputs(self, x_vp, t):
        s = self.sigma_of_t(t)
        if math.isinf(s):
            x0 = self.denoise(x_vp, s)
            return s, {"epsilon": x_vp.copy(), "v_prediction": -x0, "sample": x0}
        c = math.sqrt(1 + s * s)
        x_ve = x_vp * c
        x0 = self.denoise(x_ve, s)
        eps = (x_ve - x0) / s
        return s, {"epsilon": eps, "v_prediction": eps / c - x0 * (s / c), "sample": x0}

    def __call__(self, x_vp, t, pred):
        self.calls.append((float(t), x_vp.copy()))
        return self.outputs(x_vp, t)[1][pred]

    # k-diffusion's discrete schedule: sigma -> fractional t (log-linear, clamped)
    def sigma_to_t(self, sigma):
        ls = np.log(self.sig)
        x = math.log(sigma)
        low = int(np.clip(np.sum(ls <= x) - 1, 0, len(ls) - 2))
        w = (ls[low] - x) / (ls[low] - ls[low + 1])
        w = min(max(w, 0.0), 1.0)
        return (1 - w) * low + w * (low + 1)


# ---------------------------------------------------------------------------------------
# Conversions.


def x0_ve(pred, out, x, s):
    """diffusers' K-schedulers (latent VE, scheduler sigma s)."""
    if pred == "epsilon":
        return x - s * out
    if pred == "v_prediction":
        return out * (-s / math.sqrt(s * s + 1)) + x / (s * s + 1)
    return out


def ab(s):
    """VP coefficients of VE sigma s: alpha = 1/sqrt(1+s^2), sigma_t = s*alpha."""
    a = 1 / math.sqrt(s * s + 1)
    return a, s * a


def x0_vp(pred, out, x, a, b):
    if pred == "epsilon":
        return (x - b * out) / a
    if pred == "v_prediction":
        return a * x - b * out
    return out


def x0_eps_ddpm(pred, out, x, ac):
    """DDIM/LCM/TCD on alphas_cumprod ac: (x0, eps)."""
    a, b = math.sqrt(ac), math.sqrt(1 - ac)
    if pred == "epsilon":
        return (x - b * out) / a, out
    if pred == "v_prediction":
        return a * x - b * out, a * out + b * x
    return out, (x - a * out) / b


# ---------------------------------------------------------------------------------------
# diffusers samplers (the SD pipeline loop).


class Noise:
    def __init__(self, vs):
        self.vs = [np.array(v) for v in vs]
        self.i = 0

    def __call__(self):
        v = self.vs[self.i]
        self.i += 1
        return v


def d_euler(c, m, x, noise):
    pred, sig, ts, b = c["prediction"], c["sigmas"], c["timesteps"], c.get("begin_index", 0)
    lat = []
    for i, t in enumerate(ts):
        s, sn = sig[b + i], sig[b + i + 1]
        out = m(x / math.sqrt(s * s + 1), t, pred)
        x0 = x0_ve(pred, out, x, s)
        d = (x - x0) / s
        if c["sampler"] == "euler":
            x = x + d * (sn - s)
        else:  # euler_a: noise drawn every step, also the last (multiplied by sigma_up = 0)
            up = math.sqrt(sn * sn * (s * s - sn * sn) / (s * s))
            down = math.sqrt(sn * sn - up * up)
            x = x + d * (down - s) + noise() * up
        lat.append(x)
    return lat, x


def d_heun(c, m, x, noise):
    pred, sig, ts = c["prediction"], c["sigmas"], c["step_timesteps"]
    lat = []
    n = len(ts)
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        out = m(x / math.sqrt(s * s + 1), ts[i], pred)
        d = (x - x0_ve(pred, out, x, s)) / s
        if sn == 0:
            x = x + d * (sn - s)
            lat.append(x)
            continue
        x2 = x + d * (sn - s)
        lat.append(x2)
        out = m(x2 / math.sqrt(sn * sn + 1), ts[i + 1], pred)
        d2 = (x2 - x0_ve(pred, out, x2, sn)) / sn
        x = x + (d + d2) / 2 * (sn - s)
        lat.append(x)
    return lat, x


def d_dpm2(c, m, x, noise):
    pred, sig, ts = c["prediction"], c["sigmas"], c["step_timesteps"]
    mid, mt = c["midpoint"]["sigmas"], c["midpoint"]["timesteps"]
    anc = c.get("ancestral")
    lat = []
    for i in range(len(ts)):
        s, sn = sig[i], sig[i + 1]
        out = m(x / math.sqrt(s * s + 1), ts[i], pred)
        d = (x - x0_ve(pred, out, x, s)) / s
        if i == len(ts) - 1:  # last step: Euler to 0 (the midpoint sigma is 0)
            x = x - d * s
            lat.append(x)
            continue
        sm = mid[i]
        x2 = x + d * (sm - s)
        lat.append(x2)
        out = m(x2 / math.sqrt(sm * sm + 1), mt[i], pred)
        d2 = (x2 - x0_ve(pred, out, x2, sm)) / sm
        if anc is None:
            x = x + d2 * (sn - s)
        else:
            x = x + d2 * (anc["sigma_down"][i] - s) + noise() * anc["sigma_up"][i]
        lat.append(x)
    return lat, x


def lms_coeff(sig, i, j, order):
    """integral over [sig[i], sig[i+1]] of the Lagrange basis polynomial of node sig[i-j]
    among the nodes sig[i], sig[i-1], ..., sig[i-order+1]."""
    nodes = [sig[i - k] for k in range(order)]
    poly = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            poly *= np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
    P = poly.integ()
    return P(sig[i + 1]) - P(sig[i])


def d_lms(c, m, x, noise, order=4):
    pred, sig, ts = c["prediction"], c["sigmas"], c["timesteps"]
    lat, ds = [], []
    for i, t in enumerate(ts):
        s = sig[i]
        out = m(x / math.sqrt(s * s + 1), t, pred)
        ds.append((x - x0_ve(pred, out, x, s)) / s)
        ds = ds[-order:]
        o = min(i + 1, order)
        x = x + sum(lms_coeff(sig, i, j, o) * ds[-1 - j] for j in range(o))
        lat.append(x)
    return lat, x


def lam(s):
    return -math.log(s)  # lambda = log(alpha/sigma_t) = -log(sigma_ve)


def d_dpmpp(c, m, x, noise):
    """DPMSolverMultistep (dpmsolver++ / sde-dpmsolver++, order 2, midpoint) on VP latents."""
    pred, sig, ts, b = c["prediction"], c["sigmas"], c["timesteps"], c.get("begin_index", 0)
    sde = c["reference"]["config"]["algorithm_type"] == "sde-dpmsolver++"
    lat, prev = [], None
    for i, t in enumerate(ts):
        k = b + i
        s, sn = sig[k], sig[k + 1]
        a_s, b_s = ab(s)
        out = m(x, t, pred)
        m0 = x0_vp(pred, out, x, a_s, b_s)
        nz = noise() if sde else None
        last = i == len(ts) - 1
        if sn == 0:
            x = m0  # final sigma 0: alpha_t = 1, sigma_t = 0 (h = inf)
        else:
            a_t, b_t = ab(sn)
            h = lam(sn) - lam(s)
            if prev is None or last:
                D = m0
                corr = 0.0
            else:
                h0 = lam(s) - lam(sig[k - 1])
                D1 = (m0 - prev) / (h0 / h)
                D = m0
                corr = D1
            if sde:
                x = b_t / b_s * math.exp(-h) * x + a_t * (1 - math.exp(-2 * h)) * (D + 0.5 * corr) + b_t * math.sqrt(1 - math.exp(-2 * h)) * nz
            else:
                x = b_t / b_s * x - a_t * math.expm1(-h) * (D + 0.5 * corr)
        prev = m0
        lat.append(x)
    return lat, x


def d_unipc(c, m, x, noise):
    """UniPC bh2, order 2, predict_x0, lower_order_final, on VP latents. The corrector of
    step i-1 runs at the start of step i with the new model output; the recorded latent of
    step i is the predictor's result (before that correction)."""
    pred, sig, ts = c["prediction"], c["sigmas"], c["timesteps"]
    n = len(ts)
    lat = []
    ms, last_x, last_order = [], None, None

    def coef(s):
        a, b = ab(s)
        return a, b, math.log(a) - math.log(b)

    for i, t in enumerate(ts):
        s = sig[i]
        a_s, b_s, l_s = coef(s)
        out = m(x, t, pred)
        mt = x0_vp(pred, out, x, a_s, b_s)
        if i > 0:  # corrector: last_x at sig[i-1] -> x at sig[i], with model output mt at sig[i]
            s0 = sig[i - 1]
            a0, b0, l0 = coef(s0)
            h = l_s - l0
            hh = -h
            hphi1 = math.expm1(hh)
            Bh = math.expm1(hh)
            m0 = ms[-1]
            xt_ = b_s / b0 * last_x - a_s * hphi1 * m0
            if last_order == 1:
                x = xt_ - a_s * Bh * (0.5 * (mt - m0))
            else:  # order 2: rks = [r1, 1], D1 = (m1 - m0)/r1
                a1, b1, l1 = coef(sig[i - 2])
                r1 = (l1 - l0) / h
                D1 = (ms[-2] - m0) / r1
                hphik = hphi1 / hh - 1
                b_ = [hphik * 1 / Bh]
                hphik = hphik / hh - 1 / 2
                b_.append(hphik * 2 / Bh)
                R = np.array([[1.0, 1.0], [r1, 1.0]])
                rc = np.linalg.solve(R, np.array(b_))
                x = xt_ - a_s * Bh * (rc[0] * D1 + rc[1] * (mt - m0))
        ms.append(mt)
        ms = ms[-2:]
        order = min(2, n - i, i + 1)
        last_x, last_order = x, order
        sn = sig[i + 1]
        if sn == 0:
            x = mt
        else:
            a_t, b_t, l_t = coef(sn)
            h = l_t - l_s
            hh = -h
            hphi1 = math.expm1(hh)
            Bh = math.expm1(hh)
            xt_ = b_t / b_s * x - a_t * hphi1 * mt
            if order == 1:
                x = xt_
            else:
                a1, b1, l1 = coef(sig[i - 1])
                r1 = (l1 - l_s) / h
                D1 = (ms[-2] - mt) / r1
                x = xt_ - a_t * Bh * (0.5 * D1)
        lat.append(x)
    return lat, x


def d_ddim(c, m, x, noise, fx):
    pred, ts = c["prediction"], c["timesteps"]
    ac = m.ac
    eta = c["reference"]["step_kwargs"].get("eta", 0.0)
    ratio = 1000 // c["reference"]["set_timesteps"]["num_inference_steps"]
    fa = c["final_alpha_cumprod"]
    lat = []
    for t in ts:
        t = int(t)
        tp = t - ratio
        at, ap = ac[t], (ac[tp] if tp >= 0 else fa)
        out = m(x, t, pred)
        x0, eps = x0_eps_ddpm(pred, out, x, at)
        var = (1 - ap) / (1 - at) * (1 - at / ap)
        std = eta * math.sqrt(var)
        x = math.sqrt(ap) * x0 + math.sqrt(1 - ap - std * std) * eps
        if eta > 0:
            x = x + std * noise()
        lat.append(x)
    return lat, x


def d_plms(c, m, x, noise):
    ts = [int(t) for t in c["timesteps"]]
    ac, fa = m.ac, c["final_alpha_cumprod"]
    ratio = 1000 // c["reference"]["set_timesteps"]["num_inference_steps"]

    def prev(x, t, tp, e):
        at, ap = ac[t], (ac[tp] if tp >= 0 else fa)
        bt, bp = 1 - at, 1 - ap
        denom = at * math.sqrt(bp) + math.sqrt(at * bt * ap)
        return math.sqrt(ap / at) * x - (ap - at) * e / denom

    ets, lat, cur = [], [], None
    for k, t in enumerate(ts):
        e = m(x, t, "epsilon")
        if k == 1:  # second call: same target, eps averaged, restart from the stored sample
            e = (e + ets[-1]) / 2
            x = prev(cur, t + ratio, t, e)
        else:
            ets.append(e)
            ets = ets[-4:]
            if len(ets) == 1:
                cur = x
                e = ets[-1]
            elif len(ets) == 2:
                e = (3 * ets[-1] - ets[-2]) / 2
            elif len(ets) == 3:
                e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            else:
                e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
            x = prev(x, t, t - ratio, e)
        lat.append(x)
    return lat, x


def d_lcm_tcd(c, m, x, noise):
    pred, ts = c["prediction"], [int(t) for t in c["timesteps"]]
    ac = m.ac
    lat, fin = [], None
    for i, t in enumerate(ts):
        out = m(x, t, pred)
        x0, eps = x0_eps_ddpm(pred, out, x, ac[t])
        last = i == len(ts) - 1
        if c["sampler"] == "lcm":
            tp = ts[i + 1] if not last else t
            st = t * 10.0  # timestep_scaling
            cskip = 0.25 / (st * st + 0.25)
            cout = st / math.sqrt(st * st + 0.25)
            den = cout * x0 + cskip * x
            x = den if last else math.sqrt(ac[tp]) * den + math.sqrt(1 - ac[tp]) * noise()
            fin = den
        else:  # tcd, gamma = eta
            gamma = c["reference"]["step_kwargs"]["eta"]
            tp = ts[i + 1] if not last else 0
            s = int(math.floor((1 - gamma) * tp))
            xs = math.sqrt(ac[s]) * x0 + math.sqrt(1 - ac[s]) * eps
            x = xs if last else math.sqrt(ac[tp] / ac[s]) * xs + math.sqrt(1 - ac[tp] / ac[s]) * noise()
            fin = x
        lat.append(x)
    return lat, fin


def d_ipndm(c, m, x, noise):
    """AB(4) on eps with the fixed PNDM coefficients, DDIM-style transfer (VP)."""
    sig, tsd = c["sigmas"], c["timesteps_sd"]
    lat, ets = [], []
    for i in range(len(tsd)):
        a, b = ab(sig[i])
        an, bn = ab(sig[i + 1])
        e = m(x, tsd[i], "epsilon")
        ets.append(e)
        E = [None, lambda: ets[-1], lambda: (3 * ets[-1] - ets[-2]) / 2, lambda: (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12,
             lambda: (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24][min(len(ets), 4)]()
        x = an * (x - b * E) / a + bn * E
        lat.append(x)
    return lat, x


# ---------------------------------------------------------------------------------------
# k-diffusion samplers (VE latents, CompVis wrappers).


def k_denoiser(m, pred):
    def D(x, s):
        t = m.sigma_to_t(s)
        c_in = 1 / math.sqrt(s * s + 1)
        out = m(x * c_in, t, pred)
        if pred == "epsilon":
            return x - s * out
        if pred == "v_prediction":
            return x / (s * s + 1) - out * s / math.sqrt(s * s + 1)
        return out

    return D


def anc_step(sf, st, eta=1.0):
    up = min(st, eta * math.sqrt(st * st * (sf * sf - st * st) / (sf * sf)))
    return math.sqrt(st * st - up * up), up


def k_sampler(c, m, x, noise):
    name, sig = c["reference"]["function"].split(".")[-1], c["sigmas"]
    kw = c["reference"]["kwargs"]
    D = k_denoiser(m, c["prediction"])
    n = len(sig) - 1
    lat = []
    old = None
    ds = []
    h_last, d1, d2, h1, h2 = None, None, None, None, None
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        den = D(x, s)
        d = (x - den) / s
        if name == "sample_euler":
            x = x + d * (sn - s)
        elif name == "sample_euler_ancestral":
            down, up = anc_step(s, sn)
            x = x + d * (down - s)
            if sn > 0:
                x = x + noise() * up
        elif name == "sample_heun":
            if sn == 0:
                x = x + d * (sn - s)
            else:
                x2 = x + d * (sn - s)
                d2_ = (x2 - D(x2, sn)) / sn
                x = x + (d + d2_) / 2 * (sn - s)
        elif name in ("sample_dpm_2", "sample_dpm_2_ancestral"):
            if name == "sample_dpm_2":
                target, up = sn, 0.0
            else:
                target, up = anc_step(s, sn)
            if target == 0:
                x = x + d * (target - s)
            else:
                sm = math.exp(0.5 * (math.log(s) + math.log(target)))  # log-space midpoint
                x2 = x + d * (sm - s)
                d2_ = (x2 - D(x2, sm)) / sm
                x = x + d2_ * (target - s)
                if name == "sample_dpm_2_ancestral":
                    x = x + noise() * up
        elif name == "sample_lms":
            ds.append(d)
            ds = ds[-4:]
            o = min(i + 1, 4)
            x = x + sum(lms_coeff(sig, i, j, o) * ds[-1 - j] for j in range(o))
        elif name == "sample_dpmpp_2m":
            t, tn = -math.log(s), (math.inf if sn == 0 else -math.log(sn))
            h = tn - t
            if old is None or sn == 0:
                x = (sn / s) * x - math.expm1(-h) * den
            else:
                r = (t + math.log(sig[i - 1])) / h
                x = (sn / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old)
            old = den
        elif name == "sample_dpmpp_2s_ancestral":
            down, up = anc_step(s, sn)
            if down == 0:
                x = x + d * (down - s)
            else:
                t, tn = -math.log(s), -math.log(down)
                h = tn - t
                sm = math.exp(-(t + 0.5 * h))
                x2 = (sm / s) * x - math.expm1(-0.5 * h) * den
                x = (down / s) * x - math.expm1(-h) * D(x2, sm)
            if sn > 0:
                x = x + noise() * up
        elif name == "sample_dpmpp_sde":
            r = kw.get("r", 0.5)
            if sn == 0:
                x = x + d * (sn - s)
            else:
                t, tn = -math.log(s), -math.log(sn)
                h = tn - t
                ss = math.exp(-(t + h * r))
                sd, su = anc_step(s, ss)
                x2 = (sd / s) * x - math.expm1(t + math.log(sd)) * den
                x2 = x2 + noise() * su
                den2 = D(x2, ss)
                sd, su = anc_step(s, sn)
                fac = 1 / (2 * r)
                dd = (1 - fac) * den + fac * den2
                x = (sd / s) * x - math.expm1(t + math.log(sd)) * dd
                x = x + noise() * su
        elif name == "sample_dpmpp_2m_sde":
            if sn == 0:
                x = den
            else:
                h = -math.log(sn) + math.log(s)
                eh = h  # eta = 1
                x = sn / s * math.exp(-eh) * x - math.expm1(-h - eh) * den
                if old is not None:
                    r = h_last / h
                    if kw["solver_type"] == "heun":
                        x = x + (-math.expm1(-h - eh) / (-h - eh) + 1) * (1 / r) * (den - old)
                    else:
                        x = x + 0.5 * -math.expm1(-h - eh) * (1 / r) * (den - old)
                x = x + noise() * sn * math.sqrt(-math.expm1(-2 * eh))
            old = den
            h_last = None if sn == 0 else h
        elif name == "sample_dpmpp_3m_sde":
            h = None
            if sn == 0:
                x = den
            else:
                h = -math.log(sn) + math.log(s)
                he = 2 * h  # h * (eta + 1)
                x = math.exp(-he) * x - math.expm1(-he) * den
                if h2 is not None:
                    r0, r1 = h1 / h, h2 / h
                    d10 = (den - d1) / r0
                    d11 = (d1 - d2) / r1
                    dd1 = d10 + (d10 - d11) * r0 / (r0 + r1)
                    dd2 = (d10 - d11) / (r0 + r1)
                    phi2 = math.expm1(-he) / he + 1
                    phi3 = phi2 / he - 0.5
                    x = x + phi2 * dd1 - phi3 * dd2
                elif h1 is not None:
                    r = h1 / h
                    phi2 = math.expm1(-he) / he + 1
                    x = x + phi2 * (den - d1) / r
                x = x + noise() * sn * math.sqrt(-math.expm1(-2 * h))
            d1, d2 = den, d1
            h1, h2 = h, h1
        else:
            raise SystemExit(f"no replay for {name}")
        lat.append(x)
    return lat, x


# ---------------------------------------------------------------------------------------
# Schedules recomputed from their definitions (float64).


def base_sigmas(ac):
    return np.sqrt((1 - ac) / ac)


def interp_lin(sig, t):
    return np.interp(t, np.arange(len(sig)), sig)


def karras(n, smin, smax, rho=7.0):
    ramp = np.linspace(0, 1, n)
    return list((smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho) + [0.0]


def schedule_expect(c, m):
    """Expected sigmas (and timesteps) for a case from the schedule definitions, or None."""
    sched, sig = c["schedule"], m.sig
    name = sched.get("name")
    n = c["steps"]
    ref = c["reference"]
    cls = ref.get("class")
    cfg = ref.get("config", {})
    T = 1000
    if ref["library"] == "diffusers" and cls in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        st = ref["set_timesteps"]
        if "timesteps" in st:
            t = np.array(st["timesteps"], dtype=np.float64)
            return list(interp_lin(sig, t)) + [0.0], list(t)
        if "sigmas" in st:
            return list(st["sigmas"]), None
        if cfg.get("use_karras_sigmas"):
            return karras(n, sig[0], sig[-1]), None
        if cfg.get("use_exponential_sigmas"):
            return list(np.exp(np.linspace(math.log(sig[-1]), math.log(sig[0]), n))) + [0.0], None
        if cfg.get("use_beta_sigmas"):
            return None, None
        sp = cfg["timestep_spacing"]
        if sp == "linspace":
            t = np.linspace(0, T - 1, n)[::-1]
        elif sp == "leading":
            t = np.arange(n)[::-1] * (T // n) + cfg["steps_offset"]
        else:
            t = np.round(np.arange(T, 0, -T / n)) - 1
        return list(interp_lin(sig, t)) + [0.0], list(t)
    if ref["library"] == "diffusers" and cls in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        st = ref["set_timesteps"]
        if "timesteps" in st:
            t = np.array(st["timesteps"], dtype=np.float64)
        elif cfg.get("use_karras_sigmas"):
            s = karras(n, sig[0], sig[-1])
            return s, [round(m.sigma_to_t(v)) for v in s[:-1]]
        elif cfg.get("use_exponential_sigmas") or cfg.get("use_beta_sigmas"):
            return None, None
        else:
            sp = cfg["timestep_spacing"]
            if sp == "linspace":
                t = np.round(np.linspace(0, T - 1, n + 1))[::-1][:-1]
            elif sp == "leading":
                t = (np.arange(n + 1) * (T // (n + 1)))[::-1][:-1] + cfg["steps_offset"]
            else:
                t = np.round(np.arange(T, 0, -T / n)) - 1
        return [float(sig[int(v)]) for v in t] + [0.0], list(t)
    if ref["library"] == "k-diffusion" and name:
        smin, smax = float(sig[0]), float(sig[-1])
        if name == "karras":
            return karras(n, smin, smax), None
        if name == "exponential":
            return list(np.exp(np.linspace(math.log(smax), math.log(smin), n))) + [0.0], None
        if name == "k_uniform":
            return [m.sigma_of_t(t) for t in np.linspace(T - 1, 0, n)] + [0.0], None
        if name == "sgm_uniform":
            return [m.sigma_of_t(t) for t in np.linspace(T - 1, 0, n + 1)[:-1]] + [0.0], None
        if name == "normal":
            return [m.sigma_of_t(t) for t in np.linspace(T - 1, 0, n)] + [0.0], None
        if name == "simple":
            return [float(sig[-(1 + int(i * (len(sig) / n)))]) for i in range(n)] + [0.0], None
        if name == "ddim_uniform":
            return [float(sig[i]) for i in range(1, len(sig), len(sig) // n)][::-1] + [0.0], None
        if name == "ays":
            lv = np.array(sched["levels"])
            if n + 1 != len(lv):
                lv = np.exp(np.interp(np.linspace(0, 1, n + 1), np.linspace(0, 1, len(lv)), np.log(lv[::-1])))[::-1]
            return list(lv[:-1]) + [0.0], None
        return None, None
    return None, None


# ---------------------------------------------------------------------------------------


def close(a, b, tol):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))) if a.size else 0.0


def num(v):
    return float(v)  # also parses the strings "inf" / "nan"


def check_case(fx, c):
    m = Model(fx, c["table"])
    noise = Noise(c["noise"])
    x = np.array(c["init"]["latent"])
    # the initial latent from its recorded parts
    if "x0_init" in c["init"]:
        x0i, nz = np.array(c["init"]["x0_init"]), np.array(c["init"]["noise"])
        t0 = c["timesteps"][0]
        if c["latent_form"] == "ve":
            s = c["sigmas"][c.get("begin_index", 0)]
            exp = x0i + s * nz
        elif c["reference"]["class"] == "DPMSolverMultistepScheduler":
            a, b = ab(c["sigmas"][c.get("begin_index", 0)])
            exp = a * x0i + b * nz
        else:
            ac = m.ac[int(t0)]
            exp = math.sqrt(ac) * x0i + math.sqrt(1 - ac) * nz
    else:
        exp = np.array(c["init"]["noise"]) * c["init"]["scale"]
    err = {"init": close(x, exp, TOL)}
    ref = c["reference"]
    if ref["library"] == "k-diffusion":
        lat, fin = k_sampler(c, m, x, noise)
    else:
        cls = ref["class"]
        f = {"EulerDiscreteScheduler": d_euler, "EulerAncestralDiscreteScheduler": d_euler, "HeunDiscreteScheduler": d_heun,
             "KDPM2DiscreteScheduler": d_dpm2, "KDPM2AncestralDiscreteScheduler": d_dpm2, "LMSDiscreteScheduler": d_lms,
             "DPMSolverMultistepScheduler": d_dpmpp, "UniPCMultistepScheduler": d_unipc, "PNDMScheduler": d_plms,
             "LCMScheduler": d_lcm_tcd, "TCDScheduler": d_lcm_tcd, "IPNDMScheduler": d_ipndm}.get(cls)
        if cls == "DDIMScheduler":
            lat, fin = d_ddim(c, m, x, noise, fx)
        else:
            lat, fin = f(c, m, x, noise)
    err["noise_count"] = 0.0 if noise.i == len(c["noise"]) else float("inf")
    err["calls_t"] = close([t for t, _ in m.calls], [num(mc["t"]) for mc in c["model_calls"]], TOL) if len(m.calls) == len(c["model_calls"]) else float("inf")
    err["calls_x"] = close(np.array([x for _, x in m.calls]), np.array([mc["x"] for mc in c["model_calls"]]), TOL) if len(m.calls) == len(c["model_calls"]) else float("inf")
    err["latents"] = close(np.array(lat), np.array(c["latents"]), TOL) if len(lat) == len(c["latents"]) else float("inf")
    err["final"] = close(fin, c["final"], TOL)
    exp_s, exp_t = schedule_expect(c, m)
    if exp_s is not None:
        got = c["sigmas"]
        err["schedule_sigmas"] = close(got, exp_s, TOL_SCHED) if len(got) == len(exp_s) else float("inf")
    if exp_t is not None and c.get("begin_index") is None:
        got_t = c.get("step_timesteps", c["timesteps"])
        err["schedule_timesteps"] = close(got_t, exp_t, TOL_SCHED) if len(got_t) == len(exp_t) else float("inf")
    return err


def check_models(fx):
    worst = 0.0
    for e in fx["model_checks"]:
        if "table" in e:
            m = Model(fx, e["table"])
            s, o = m.outputs(np.array(e["x"]), e["t"])
            assert (math.isinf(s) and e["model_sigma"] == "inf") or abs(s - e["model_sigma"]) <= 1e-12 * s
            for k in ("epsilon", "v_prediction", "sample"):
                worst = max(worst, close(o[k], e[k], TOL))
        else:
            m = Model(fx, "sd")
            worst = max(worst, close(m.denoise(np.array(e["x_ve"]), e["denoiser_sigma"]), e["D"], TOL))
    return worst


def main():
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "tests/fixtures/samplers/cases.json")
    fx = json.loads(path.read_text())
    bad = 0
    wm = check_models(fx)
    print(f"model_checks: worst {wm:.2e}")
    bad += wm > TOL
    for c in fx["cases"]:
        err = check_case(fx, c)
        tol = {k: (TOL_SCHED if k.startswith("schedule") else TOL) for k in err}
        fails = {k: v for k, v in err.items() if not v <= tol[k]}
        worst = max(v for k, v in err.items() if not k.startswith("schedule"))
        ws = [v for k, v in err.items() if k.startswith("schedule")]
        ws = f"{max(ws):.1e}" if ws else "-"
        print(f"{'FAIL' if fails else 'ok  '} {c['name']:42s} replay {worst:.1e}  schedule {ws}" + (f"  {fails}" if fails else ""))
        bad += bool(fails)
    print(f"{len(fx['cases']) + 1 - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
