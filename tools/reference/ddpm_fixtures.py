#!/usr/bin/env python3
"""Golden fixtures of pixel-space diffusion (DDPM / DDIM / PLMS) and of VQ latent diffusion.

Builds three tiny pipelines with seeded random weights rounded to float16, saves them as
diffusers folders and records what diffusers computes from them in float32 on the CPU (from
the saved float16 files, reloaded):

  ddpm/        DDPMPipeline with a UNet2DModel built like google/ddpm-cifar10-32 and google's
               DDPMScheduler config; its safetensors use the DEPRECATED attention names of the
               google/ddpm-* files (query/key/value/proj_attn), which diffusers renames on load.
  ddpm-class/  DDPMPipeline folder of a class-conditional UNet2DModel (num_class_embeds 10)
               with a squaredcos_cap_v2 / fixed_large / no-clip DDPMScheduler.
  ldm/         LDMPipeline (as CompVis/ldm-celebahq-256): a VQModel with an N(0, 1) codebook
               (non-trivial quantisation), a UNet2DModel on its 3x8x8 latents, the celebahq
               DDIMScheduler config. As on the hub, vqvae/config.json has no scaling_factor:
               diffusers defaults it to 0.18215 and LDMPipeline decodes latents / 0.18215.

Goldens per fixture (golden.safetensors + golden.json, see ddpm/README.md):
  * the UNet on a numpy-drawn input at t = 999, 500, 10, 0 (ddpm-class: class 3, and class
    7 at t = 500); ldm: the VQ model's quantise / post_quant_conv / decode of a random latent;
  * sampling runs seeded with torch.Generator("cpu").manual_seed(7), batch 1, written as the
    manual loop the pipelines run (noise x = randn_tensor(shape, generator); set_timesteps;
    per t: unet -> scheduler.step), each checked to give exactly what the real pipeline
    (DDPMPipeline / DDIMPipeline / PNDMPipeline / LDMPipeline, output_type "np") returns
    for the same seed: the timesteps, x after every step, every noise draw, the final image.

Weights and component inputs come from numpy's PCG64 (make_fixtures.py's helpers and
conventions); the sampling noise from torch's CPU generator, so it also depends on the randn
kernel torch picks for the CPU (recorded as `randn` in golden.json).

    /work/venv-ref/bin/python tools/reference/ddpm_fixtures.py --out tests/fixtures/ref --seed 0
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, LDMPipeline, PNDMPipeline,
                       PNDMScheduler, UNet2DModel, VQModel)
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (weights, randn, goldens, noise recording, randn_info)

UNET_T = (999, 500, 10, 0)
CLASS, CLASS2 = 3, 7
# diffusers' current attention names -> the deprecated AttentionBlock names of the google/ddpm-* files.
DEPRECATED = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # group_norm stays

DDPM_UNET = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=8, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
                 attention_head_dim=None, time_embedding_type="positional", act_fn="silu")
# google/ddpm-cifar10-32 and friends.
GOOGLE_DDPM = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                   clip_sample=True, variance_type="fixed_small", prediction_type="epsilon")
CLASS_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=2,
                  down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                  norm_num_groups=8, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
                  attention_head_dim=8, num_class_embeds=10)  # UNet2DModel: a head WIDTH (2 heads at 16 ch, 4 at 32)
CLASS_DDPM = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                  variance_type="fixed_large", prediction_type="epsilon")
LDM_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0, attention_head_dim=8)
# sdrs' autoencoder graphs normalise in 32 groups, as every published VQ and KL autoencoder does.
LDM_VQ = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
              latent_channels=3, num_vq_embeddings=64, vq_embed_dim=3, norm_num_groups=32, sample_size=16)
# CompVis/ldm-celebahq-256 scheduler/scheduler_config.json (diffusers 0.0.4 era; what the old
# scripts/conversion_ldm_uncond.py wrote: the LDM config's linear_start/linear_end as a
# "scaled_linear" schedule, clip_sample False). The keys it lacks take DDIMScheduler's
# defaults: set_alpha_to_one True, steps_offset 0, timestep_spacing "leading", epsilon.
LDM_DDIM = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                clip_sample=False, trained_betas=None)

# name: models, saved scheduler, numpy streams ([seed, k]; make_fixtures uses 1-6/11-15, sdxl 7/16) and runs:
# (run, scheduler kind, steps, eta, keep the trajectory).
FIXTURES = {
    "ddpm": dict(pipeline=DDPMPipeline, unet=DDPM_UNET, scheduler=(DDPMScheduler, GOOGLE_DDPM), weights=41, inputs=51,
                 label=None, deprecated_names=True,
                 runs=[("ddpm10", "ddpm", 10, None, True), ("ddpm1000", "ddpm", 1000, None, False),
                       ("ddim20", "ddim", 20, 0.0, True), ("ddim10eta1", "ddim", 10, 1.0, True),
                       ("plms10", "plms", 10, None, True)]),
    "ddpm-class": dict(pipeline=DDPMPipeline, unet=CLASS_UNET, scheduler=(DDPMScheduler, CLASS_DDPM), weights=42,
                       inputs=52, label=CLASS, deprecated_names=False,
                       runs=[("ddpm10", "ddpm", 10, None, True), ("ddim10", "ddim", 10, 0.0, True)]),
    "ldm": dict(pipeline=LDMPipeline, unet=LDM_UNET, vqvae=LDM_VQ, scheduler=(DDIMScheduler, LDM_DDIM), weights=43,
                vq_weights=44, inputs=53, label=None, deprecated_names=False, runs=[("ldm10", "ddim", 10, 0.0, True)]),
}
SCHEDULERS = {"ddpm": lambda c: DDPMScheduler.from_config(c), "ddim": lambda c: DDIMScheduler.from_config(c),
              "plms": lambda c: PNDMScheduler.from_config(c, skip_prk_steps=True)}
PIPELINES = {"ddpm": DDPMPipeline, "ddim": DDIMPipeline, "plms": PNDMPipeline}


def cfg_dict(obj) -> dict:
    return {k: v for k, v in dict(obj.config).items() if not k.startswith("_")}


# ---------------------------------------------------------------------------
# Model folders


def attention_paths(unet: UNet2DModel) -> list[str]:
    """The attention modules that diffusers loads from deprecated AttentionBlock names."""
    return [n for n, m in unet.named_modules() if getattr(m, "_from_deprecated_attn_block", False)]


def write_deprecated_names(unet: UNet2DModel, path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    renamed = {}
    for key, value in load_file(str(path)).items():
        for p in attention_paths(unet):
            for new, old in DEPRECATED.items():
                if key.startswith(f"{p}.{new}."):
                    key = f"{p}.{old}.{key[len(p) + len(new) + 2:]}"
        renamed[key] = value
    assert not any(".to_q." in k or ".to_out." in k for k in renamed)
    save_file(renamed, str(path), metadata=metadata)


def build(name: str, seed: int, model_dir: Path) -> dict:
    """Random float16-exact weights (make_fixtures.init_weights), saved as a pipeline folder."""
    spec = FIXTURES[name]
    unet = UNet2DModel(**spec["unet"])
    mf.init_weights(unet, np.random.default_rng([seed, spec["weights"]]), {"conv_out": 0.5})
    models = {"unet": unet}
    if "vqvae" in spec:
        vq = VQModel(**spec["vqvae"])
        rng = np.random.default_rng([seed, spec["vq_weights"]])
        mf.init_weights(vq, rng, {"decoder.conv_out": 0.5})
        with torch.no_grad():  # codebook N(0, 1) (init_weights gives embeddings N(0, 0.5^2))
            w = vq.quantize.embedding.weight
            w.copy_(mf.randn(rng, *w.shape).half().float())
        models["vqvae"] = vq
    built = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    cls, sched_cfg = spec["scheduler"]
    pipe = spec["pipeline"](**{n: copy.deepcopy(m).half() for n, m in models.items()}, scheduler=cls(**sched_cfg))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    if spec["deprecated_names"]:
        write_deprecated_names(unet, model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    if "vqvae" in spec:  # as CompVis/ldm-celebahq-256's vqvae/config.json: no scaling_factor key
        f = model_dir / "vqvae" / "config.json"
        config = json.loads(f.read_text())
        del config["scaling_factor"]
        f.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return built


def load(name: str, model_dir: Path, built: dict):
    """The folder reloaded in float32: exactly the built weights (so the deprecated names load)."""
    spec = FIXTURES[name]
    pipe = spec["pipeline"].from_pretrained(model_dir, dtype=torch.float32)
    assert type(pipe) is spec["pipeline"], type(pipe)
    pipe.set_progress_bar_config(disable=True)
    for n, sd in built.items():
        model = getattr(pipe, n)
        mf.assert_f16_exact(model, n)
        loaded = model.state_dict()
        if loaded.keys() != sd.keys() or not all(torch.equal(loaded[k], sd[k]) for k in sd):
            raise SystemExit(f"ddpm_fixtures: {model_dir}/{n} does not load back the weights it was built with")
    return pipe


# ---------------------------------------------------------------------------
# Sampling


def sample(unet, sched, steps: int, *, eta=None, label=None, latent=False, replay=None) -> dict:
    """The pipelines' loop, noise from torch.Generator("cpu").manual_seed(7): x = randn_tensor(shape,
    generator) (LDM: * init_noise_sigma); set_timesteps; per t: out = unet(x (LDM: scale_model_input),
    t).sample; x = step(out, t, x, what the pipeline passes).prev_sample. `replay`: earlier draws."""
    c, s = unet.config.in_channels, unet.config.sample_size
    gen = mf.seeded()
    if replay is None:
        x = randn_tensor((1, c, s, s), generator=gen, dtype=None if latent else unet.dtype)
        noise = mf.RandnRecorder(gen)
    else:
        x = replay[0].to(unet.dtype)
        noise = mf.RandnReplay(gen, replay[1:])
    draws = [x.clone()]
    if latent:
        x = x * sched.init_noise_sigma
    sched.set_timesteps(steps)
    kw = {}
    if isinstance(sched, DDIMScheduler):  # LDMPipeline passes eta only; DDIMPipeline also these two
        kw = dict(eta=eta) if latent else dict(eta=eta, use_clipped_model_output=None, generator=gen)
    elif isinstance(sched, DDPMScheduler):
        kw = dict(generator=gen)  # PNDMScheduler.step takes no generator, PNDMPipeline passes nothing
    labels = None if label is None else torch.tensor([label])
    clip = sched.config.get("clip_sample", False) and not sched.config.get("thresholding", False)
    traj, outs, per_step, clipped = [], [], [], []
    with noise as rec:
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if latent else x
            out = unet(inp, t, class_labels=labels).sample
            outs.append(out.clone())
            if clip:  # how many x0 values step() is about to clamp
                a = sched.alphas_cumprod[t]
                clipped.append(int(((x - (1 - a) ** 0.5 * out) / a ** 0.5).abs().gt(sched.config.clip_sample_range).sum()))
            n = len(rec.draws)
            x = sched.step(out, t, x, **kw).prev_sample
            per_step.append(len(rec.draws) - n)
            traj.append(x.clone())
    draws += [d for _, d in rec.draws]
    assert replay is None or not noise.queue
    return dict(traj=traj, outs=outs, final=x, timesteps=[float(t) for t in sched.timesteps], per_step=per_step,
                draws=draws, clipped=clipped, kwargs=sorted(kw), sched=sched)


def to_image(x: torch.Tensor) -> torch.Tensor:
    """What the pipelines return: (x / 2 + 0.5).clamp(0, 1), NHWC."""
    return mf.f32((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))


def pipeline_check(kind: str, pipe, sched, steps: int, eta, label, draws) -> tuple[np.ndarray, str]:
    """The real pipeline's output for the same seed (and the same noise draws)."""
    unet = pipe.unet
    if isinstance(pipe, LDMPipeline):
        p = LDMPipeline(vqvae=pipe.vqvae, unet=unet, scheduler=sched)
    else:
        p = PIPELINES[kind](unet=unet, scheduler=sched)  # DDIM/PNDM pipelines re-create it from_config
        assert type(p.scheduler) is type(sched) and cfg_dict(p.scheduler) == cfg_dict(sched)
    p.set_progress_bar_config(disable=True)
    hook = None
    if label is not None:  # DDPMPipeline/DDIMPipeline call unet(x, t): add the class label
        hook = unet.register_forward_pre_hook(
            lambda _m, a, k: (a, dict(k, class_labels=torch.tensor([label]))), with_kwargs=True)
    kwargs = {} if eta is None else dict(eta=eta)
    gen = mf.seeded()
    try:
        with mf.RandnRecorder(gen) as rec:
            images = p(generator=gen, num_inference_steps=steps, output_type="np", **kwargs).images
    finally:
        if hook is not None:
            hook.remove()
    got = [d for _, d in rec.draws]
    assert len(got) == len(draws) and all(torch.equal(a, b) for a, b in zip(got, draws)), "pipeline noise differs"
    ref = mf.seeded()  # every draw: the next torch.randn of the one generator
    assert all(torch.equal(d, torch.randn(d.shape, generator=ref)) for d in draws)
    note = f"{type(p).__name__}(num_inference_steps={steps}, output_type='np'" + "".join(f", {k}={v}" for k, v in kwargs.items())
    return images, note + (")" if label is None else f"), class_labels=[{label}] added to its unet calls by a hook")


def short(values: list) -> list | dict:
    """A per-step list, abbreviated for long runs (ddpm1000)."""
    return values if len(values) <= 20 else {"count": len(values), "first": values[:3], "last": values[-3:]}


def run_info(res: dict, kind: str, steps: int, eta) -> dict:
    sched = res["sched"]
    ac = sched.alphas_cumprod.double()
    ts = [int(t) for t in res["timesteps"]]
    info = {"scheduler": type(sched).__name__, "config": cfg_dict(sched), "steps": steps, "eta": eta,
            "step_kwargs": res["kwargs"], "timesteps": short(res["timesteps"]), "unet_evaluations": len(ts),
            "alphas_cumprod_at_timesteps": short([float(ac[t]) for t in ts]),
            "noise_draws": {"initial": 1, "per_step": short(res["per_step"]), "total": len(res["draws"]),
                            "shape": list(res["draws"][0].shape), "dtype": "float32"}}
    if kind == "ddpm":
        info["noise_draws"]["rule"] = "DDPMScheduler.step draws one randn(x.shape) when t > 0 (none at t = 0)"
        info["prev_timesteps"] = short([int(sched.previous_timestep(t)) for t in sched.timesteps])
        if steps <= 20:
            info["variance"] = [float(sched._get_variance(t)) if t > 0 else 0.0 for t in sched.timesteps]
    elif kind == "ddim":
        info["final_alpha_cumprod"] = float(sched.final_alpha_cumprod)
        info["noise_draws"]["rule"] = "DDIMScheduler.step draws one randn(x.shape) at every step iff eta > 0"
        if eta:
            ratio = sched.config.num_train_timesteps // steps
            info["std_dev_t"] = [eta * float(sched._get_variance(t, t - ratio)) ** 0.5 for t in ts]
    else:
        info["final_alpha_cumprod"] = float(sched.final_alpha_cumprod)
        info["noise_draws"]["rule"] = "PNDMScheduler (PLMS) draws no noise"
    if res["clipped"]:
        info["x0_values_clipped_per_step"] = short(res["clipped"])
    return info


# ---------------------------------------------------------------------------
# Goldens


def run_fixture(name: str, seed: int, model_dir: Path, built: dict) -> tuple[dict, dict]:
    spec = FIXTURES[name]
    pipe = load(name, model_dir, built)
    unet, label = pipe.unet, spec["label"]
    vq = getattr(pipe, "vqvae", None)
    rng = np.random.default_rng([seed, spec["inputs"]])
    unet64 = copy.deepcopy(unet).double()
    vq64 = copy.deepcopy(vq).double() if vq is not None else None
    watch = mf.ActivationWatch(*[m for m in (unet, vq) if m is not None])
    g: dict[str, torch.Tensor] = {}
    meta: dict = {"fixture": name, "runs": {}, "tensors": {}}
    precision: dict[str, float] = {}
    d = meta["tensors"]
    with torch.no_grad():
        s = unet.config.sample_size
        x = mf.randn(rng, 1, 3, s, s)
        g["unet.sample"] = x
        d["unet.sample"] = "numpy PCG64 standard normal (stream [seed, inputs])"
        labels = None if label is None else torch.tensor([label])
        for t in UNET_T:
            out = unet(x, torch.tensor(t), class_labels=labels).sample
            g[f"unet.out.t{t}"] = mf.f32(out)
            precision[f"unet.out.t{t}"] = mf.maxdiff(out, unet64(x.double(), torch.tensor(t), class_labels=labels).sample)
        d["unet.out.t{T}"] = "unet(unet.sample, torch.tensor(T) (int64, 0-d)" + (
            ", class_labels=unet.class).sample" if label is not None else ").sample")
        if label is not None:
            g["unet.class"] = torch.tensor([label], dtype=torch.int32)
            g[f"unet.out.t500.class{CLASS2}"] = mf.f32(unet(x, torch.tensor(500), class_labels=torch.tensor([CLASS2])).sample)
            d["unet.class"] = "the class label of unet.out.t* (int32 here; pass int64 to diffusers)"
            d[f"unet.out.t500.class{CLASS2}"] = f"as unet.out.t500 with class_labels=[{CLASS2}]"
        if spec["deprecated_names"]:  # the same weights under current names give the same outputs
            fresh = UNet2DModel(**spec["unet"]).eval()
            fresh.load_state_dict(built["unet"])
            assert torch.equal(fresh(x, torch.tensor(500)).sample, g["unet.out.t500"])
            meta["deprecated_attention_names"] = {
                "paths": attention_paths(unet), "renamed": DEPRECATED,
                "check": "from_pretrained renames them (ModelMixin._fix_state_dict_keys_on_load); loaded weights "
                         "equal the built ones and the outputs equal a model loaded with current names"}
        g["schedule.alphas_cumprod"] = mf.f32(pipe.scheduler.alphas_cumprod)
        d["schedule.alphas_cumprod"] = "alphas_cumprod of the saved scheduler config (float32, as diffusers)"

        if vq is not None:
            z = mf.randn(rng, 1, 3, s, s)
            quant, _, (_, _, idx) = vq.quantize(z)
            post = vq.post_quant_conv(quant)
            dec = vq.decode(z).sample
            assert torch.equal(dec, vq.decoder(post)), "decode != decoder(post_quant_conv(quantize(z)))"
            g.update({"vq.latent": z, "vq.indices": idx.to(torch.int32), "vq.quantized": mf.f32(quant),
                      "vq.post_quant": mf.f32(post), "vq.decoded": mf.f32(dec)})
            d.update({"vq.latent": "numpy PCG64 standard normal", "vq.indices": "argmin_k |z_hw - e_k| (row-major h, w)",
                      "vq.quantized": "vqvae.quantize(vq.latent)[0] = z + (e_idx - z) in float32 (see vq_quantize)",
                      "vq.post_quant": "vqvae.post_quant_conv(vq.quantized)",
                      "vq.decoded": "vqvae.decode(vq.latent).sample (quantises first; = decoder(vq.post_quant))"})
            precision["vq.decoded"] = mf.maxdiff(dec, vq64.decode(z.double()).sample)
            meta["vq_quantize"] = vq_check(vq, z, idx, quant)

        for run, kind, steps, eta, keep in spec["runs"]:
            latent = vq is not None
            sched = SCHEDULERS[kind](pipe.scheduler.config)
            res = sample(unet, sched, steps, eta=eta, label=label, latent=latent)
            info = run_info(res, kind, steps, eta)
            final, draws = res["final"], res["draws"]
            if latent:
                sf = vq.config.scaling_factor
                decoded = vq.decode(final / sf).sample
                image = to_image(decoded)
                g[f"{run}.decoded"] = mf.f32(decoded)
                g[f"{run}.indices"] = vq.quantize(final / sf)[2][2].to(torch.int32)
                meta["vq_quantize"][run] = vq_check(vq, final / sf, g[f"{run}.indices"])
                info["decode"] = {"scaling_factor": sf, "vqvae_config_has_scaling_factor": False,
                                  "rule": "image = vqvae.decode(latents / vqvae.config.scaling_factor).sample "
                                          "(decode quantises), then (x / 2 + 0.5).clamp(0, 1), NHWC"}
                d[f"{run}.decoded"] = f"vqvae.decode({run}.traj[-1] / {sf}).sample"
                d[f"{run}.indices"] = f"codebook indices of {run}.traj[-1] / {sf}"
            else:
                image = to_image(final)
            ref, note = pipeline_check(kind, pipe, sched, steps, eta, label, draws)
            assert np.array_equal(ref, image.numpy()), f"{name}/{run}: the manual loop differs from the pipeline"
            info["pipeline_check"] = f"equal (bitwise): {note}"
            g[f"{run}.timesteps"] = torch.tensor(res["timesteps"], dtype=torch.float32)
            g[f"{run}.image"] = image
            if keep:
                g[f"{run}.traj"] = torch.stack(res["traj"])
                g[f"{run}.unet_out"] = torch.stack(res["outs"])
                g[f"{run}.noise"] = torch.stack(draws)
                d[f"{run}.noise"] = "every randn draw in order: [0] the initial x, then the scheduler's"
            else:
                g[f"{run}.final"] = mf.f32(final)
            # The same run in float64 with the same noise: a floor for comparison tolerances.
            res64 = sample(unet64, SCHEDULERS[kind](pipe.scheduler.config), steps, eta=eta, label=label,
                           latent=latent, replay=[t.double() for t in draws])
            final64 = res64["final"]
            image64 = to_image(vq64.decode(final64 / sf).sample if latent else final64)
            info["precision_f32_vs_f64"] = {"final": float(f"{mf.maxdiff(final, final64):.3g}"),
                                            "image": float(f"{mf.maxdiff(image, image64):.3g}")}
            meta["runs"][run] = info
    d["{run}.timesteps"] = "scheduler.timesteps after set_timesteps(steps), as float32"
    d["{run}.traj"] = "[unet evaluations, 1, C, H, W]: x after each scheduler.step (prev_sample)"
    d["{run}.unet_out"] = "[unet evaluations, 1, C, H, W]: the UNet output each step() got"
    d["{run}.image"] = "the pipeline's output_type='np' image: (x / 2 + 0.5).clamp(0, 1), NHWC"
    meta["activation_check"] = watch.close()
    meta["precision_f32_vs_f64"] = {k: float(f"{v:.3g}") for k, v in precision.items()}
    meta["stats"] = {k: mf.stats(v) for k, v in g.items() if v.is_floating_point()}
    meta["configs"] = {n: cfg_dict(getattr(pipe, n)) for n in ("unet", "vqvae", "scheduler") if hasattr(pipe, n)}
    meta["weights"] = {"numpy_streams": {k: [seed, spec[k]] for k in ("weights", "vq_weights", "inputs") if k in spec},
                       "rule": "make_fixtures.init_weights (gain 0.5 on unet.conv_out / vqvae.decoder.conv_out), "
                               "rounded to float16" + ("; then vqvae.quantize.embedding.weight N(0, 1)" if vq else "")}
    return g, meta


def vq_check(vq, z, idx, quant=None) -> dict:
    """The codebook choice is unambiguous (float64 distances agree with torch.cdist's argmin,
    with a margin) and how far quantize()'s straight-through value is from the codebook entry."""
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    dist = ((zf[:, None, :] - vq.quantize.embedding.weight.double()[None]) ** 2).sum(-1)
    assert torch.equal(dist.argmin(1).to(torch.int32), idx.to(torch.int32)), "cdist argmin differs from exact"
    two = dist.topk(2, largest=False).values
    gap = float((two[:, 1] - two[:, 0]).min())
    assert gap > 1e-4, f"near tie in the codebook search (squared-distance gap {gap})"
    info = {"min_squared_distance_gap": float(f"{gap:.4g}"), "codes_used": int(idx.unique().numel())}
    if quant is not None:
        code = vq.quantize.embedding.weight[idx.long()].reshape(quant.shape[0], *quant.shape[2:], -1).permute(0, 3, 1, 2)
        info["max_abs_quantized_minus_codebook_entry"] = float(f"{mf.maxdiff(quant, code):.3g}")
    return info


def randn_info() -> dict:
    """make_fixtures.randn_info, with the kernel identified by comparison: draws of this run's shape
    in child processes with torch's own dispatch, ATEN_CPU_CAPABILITY=avx2 and =default (generic).
    make_fixtures calls every capability but AVX2 "generic"; torch 2.15 on AVX-512 draws the AVX2
    kernel's values."""
    info = mf.randn_info(11)
    code = ("import sys, torch\ng = torch.Generator('cpu').manual_seed(7)\n"
            "x = torch.stack([torch.randn(1, 3, 16, 16, generator=g) for _ in range(11)])\n"
            "sys.stdout.write(torch.backends.cpu.get_cpu_capability() + ' ' + x.numpy().tobytes().hex())\n")
    draws = {}
    for cap in ("", "avx2", "default"):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"} | ({"ATEN_CPU_CAPABILITY": cap} if cap else {})
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        draws[cap] = res.stdout.split(" ")
    same = {cap: draws[cap][1] == draws[""][1] for cap in ("avx2", "default")}
    info["kernel"] = "avx2" if same["avx2"] else "generic" if same["default"] else "other"
    info["kernel_check"] = {"draws": "11 x randn(1, 3, 16, 16)", "dispatch": draws[""][0],
                            "equals_avx2_kernel": same["avx2"], "equals_default_kernel": same["default"],
                            "avx2_override_dispatch": draws["avx2"][0]}
    return info


def write_readme(out: Path, seed: int, metas: dict, goldens: dict) -> None:
    rows = [f"| `{n}` | `{k}` | {str(v.dtype).replace('torch.', '')} | {list(v.shape)} |"
            for n, g in goldens.items() for k, v in sorted(g.items())]
    runs = [f"- `{n}/{r}`: {i['scheduler']}, {i['steps']} steps ({i['unet_evaluations']} UNet calls)"
            + ("" if i["eta"] is None else f", eta {i['eta']}") + f", {i['noise_draws']['total']} noise draws; = "
            + i["pipeline_check"].split(": ", 1)[1] for n, m in metas.items() for r, i in m["runs"].items()]
    v = metas["ddpm"]
    text = f"""# DDPM / DDIM / PLMS and VQ latent diffusion fixtures (diffusers)

Written by `tools/reference/ddpm_fixtures.py` (its docstring has the details); do not edit. Covers
`ddpm/`, `ddpm-class/` and `ldm/`. Versions: {json.dumps(v['versions'])}. The sampling noise depends
on torch's randn kernel: CPU capability `{v['randn']['cpu_capability']}`, kernel `{v['randn']['kernel']}` (`randn` in golden.json).

    /work/venv-ref/bin/python tools/reference/ddpm_fixtures.py --out tests/fixtures/ref --seed {seed}

## Models: diffusers folders, float16 weights; goldens in float32 from those weights

- `ddpm/model` (`DDPMPipeline`, like google/ddpm-cifar10-32): UNet2DModel 3×16×16, channels (16, 32),
  1 resnet per level, one-head attention at level 2 and in the middle, GroupNorm 8 eps 1e-6, sin-first
  sinusoids with `freq_shift` 1, downsample padding 0 (pad right/bottom by 1, then the stride-2 conv).
  Deprecated attention names, as the hub files: `…attentions.N.{{group_norm,query,key,value,proj_attn}}`.
  DDPMScheduler: linear 1e-4…0.02, `clip_sample`, `fixed_small`, epsilon.
- `ddpm-class/model` (`DDPMPipeline`): UNet2DModel 3×8×8, (16, 32), 2 resnets per level, attention at
  level 1 (2 heads) and in the middle (4 heads; UNet2DModel's `attention_head_dim` 8 is a head width),
  GroupNorm 8, cos-first sinusoids, shift 0, `class_embedding` (10 classes) added to the time embedding.
  DDPMScheduler: `squaredcos_cap_v2`, no clipping, `fixed_large`.
- `ldm/model` (`LDMPipeline`, like CompVis/ldm-celebahq-256): VQModel (32, 32), GroupNorm 32, 3 latent channels,
  64 N(0, 1) codes; `vqvae/config.json` has no `scaling_factor` (as the hub's): diffusers uses 0.18215
  and LDMPipeline decodes `latents / 0.18215`, `decode` quantising first. UNet2DModel 3×8×8, (16, 32), head
  width 8. DDIMScheduler: the hub config (scaled_linear 0.0015…0.0195, no clipping) + defaults.
- Weights: numpy PCG64 `[seed, k]` (UNets k = 41, 42, 43, VQ 44; inputs 51, 52, 53), make_fixtures.py's
  `init_weights` (gain 0.5 on the output convs), rounded to float16.

## Goldens (`golden.json`: configs, per-run schedules, noise draws, precision, what each tensor is)

- `unet.sample` (numpy) → `unet.out.t{{999,500,10,0}}` (int64 timestep); ddpm-class: class `unet.class`
  (3), and `unet.out.t500.class7`. `schedule.alphas_cumprod`: the saved scheduler's ᾱ (float32).
- ldm: `vq.latent` → `vq.indices`, `vq.quantized` (`quantize(z)[0]` = z + (e − z), float32 rounding
  off the code), `vq.post_quant`, `vq.decoded` (= `decode(z)`).
- Runs, noise from `torch.Generator("cpu").manual_seed(7)`, batch 1, bitwise equal to the pipelines'
  `output_type="np"` results: `.timesteps`, `.traj` (x after each step), `.unet_out`, `.noise` (all
  draws: initial x first), `.image` (NHWC, [0, 1]); `ddpm1000`: `.final` instead; ldm: `.decoded`, `.indices`.

""" + "\n".join(runs) + "\n\n| fixture | key | dtype | shape |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    (out / "ddpm" / "README.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=mf.REPO / "tests" / "fixtures" / "ref")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)  # nothing should draw from it
    torch.use_deterministic_algorithms(True)
    out = args.out.resolve()
    start = time.time()
    randn = randn_info()
    metas, goldens = {}, {}
    for name in FIXTURES:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        built = build(name, args.seed, d / "model")
        g, meta = run_fixture(name, args.seed, d / "model", built)
        meta.update(seed=args.seed, versions=mf.versions(), randn=randn, generator="torch.Generator('cpu').manual_seed(7)")
        mf.save_golden(d / "golden.safetensors", g, meta)
        metas[name], goldens[name] = meta, g
        print(f"{name}: {len(g)} golden tensors, {meta['activation_check']}", file=sys.stderr)
    write_readme(out, args.seed, metas, goldens)
    print(f"ddpm_fixtures: wrote {out} in {time.time() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
