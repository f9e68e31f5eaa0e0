#!/usr/bin/env python3
"""Golden fixtures from the reference implementation (diffusers + transformers on PyTorch).

Builds two tiny Stable Diffusion pipelines (SD 1.x-like and SD 2.x-like), a tiny SD 1.x
inpainting pipeline (sd1's text encoder and VAE, a 9-channel UNet), a tiny LCM-distilled-style
SD 1.x pipeline (sd1's text encoder and VAE, a UNet with a guidance embedding,
`time_cond_proj_dim` 32) and one tiny TAESD, with seeded random weights rounded to
float16, saves them as diffusers folders (and TAESD also as the original `.pth` state
dicts), and records what the reference implementation computes from them, in float32 on
the CPU:

  token ids, text-encoder conditioning, UNet outputs, VAE decode/encode, TAESD
  decode/encode, complete 4-step txt2img trajectories (Euler and DDIM, CFG 7.5), a
  4-step Euler trajectory of the inpainting pipeline with a fully masked grey image,
  and end-to-end pipeline calls seeded with a torch generator: on sd1 (DDIM, DPM++ 2M
  Karras, LCM, Euler ancestral; sd1/pipelines.safetensors) and on sd1-lcm
  (LatentConsistencyModelPipeline).

Everything is a pure function of `--seed`: inputs come from numpy's PCG64 generator,
never from torch's RNG, so the fixtures do not depend on the torch version's RNG --
except the end-to-end pipeline calls, whose noise the pipelines draw themselves from
torch.Generator("cpu").manual_seed(7): that depends on torch's CPU randn kernel, which
torch picks by CPU capability (AVX2 or generic; recorded in their JSON under `randn`).
The golden values are computed by reloading the saved folders in float32, so they
correspond exactly to the float16 weights on disk upcast to float32.

Usage (see tools/reference/setup.sh for the environment):

    /work/venv-ref/bin/python tools/reference/make_fixtures.py --out tests/fixtures/ref
    /work/venv-ref/bin/python tools/reference/make_fixtures.py --only sd1-inpaint  # one fixture (+ README)
    /work/venv-ref/bin/python tools/reference/make_fixtures.py --only sd1-pipelines  # sd1/pipelines.*
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import diffusers
import safetensors
import transformers
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# ---------------------------------------------------------------------------
# What the fixtures contain

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    # Longer than 75 tokens: exercises truncation to 77 ids (BOS + 75 + EOS). Plain
    # ASCII only, so every CLIP tokenizer implementation agrees on it (no ftfy / NFC
    # questions, no "!", which SD 2's tokenizer declares as its pad token).
    "A highly detailed, ultra-realistic oil painting of an old lighthouse on a rocky "
    "cliff at sunset, waves crashing below, seagulls flying overhead, warm golden light, "
    "dramatic clouds, 8k resolution, trending on ArtStation, by Greg Rutkowski and "
    "Thomas Kinkade; cinematic composition, volumetric lighting, sharp focus, "
    "intricate details (masterpiece), 35mm film grain, HDR, octane render - don't "
    "forget the tiny red boat in the bay #2",
]
COND_PROMPT = 0  # the prompt of the UNet check and the trajectories (negative = "")
UNET_TIMESTEPS = [500, 999]
GUIDANCE = 7.5
STEPS = 4
HEIGHT = WIDTH = 16  # latent 8x8 with the VAE's downscale 2
TAESD_IMAGE = 64  # TAESD downscales 8x: 64x64 image <-> 8x8 latent

# The DDPM training schedule of SD 1.x / 2.x (scheduler_config.json of the real repos).
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
)

# Numbered streams of numpy's generator, one per purpose (seeded with [seed, stream]).
# sd1-inpaint and sd1-lcm draw their text encoder from sd1's stream (the same first draws,
# so the same weights) and only their UNet from their own stream.
STREAM_WEIGHTS = {"sd1": 1, "sd2": 2, "taesd": 3, "vae": 4, "sd1-inpaint": 5, "sd1-lcm": 6}
STREAM_INPUTS = {"sd1": 11, "sd2": 12, "taesd": 13, "sd1-inpaint": 14, "sd1-lcm": 15}
MODELS = ("sd1", "sd2", "sd1-inpaint", "taesd", "sd1-lcm")
# End-to-end pipeline runs of the saved sd1 model (sd1/pipelines.safetensors): the
# initial noise (and any ancestral / LCM noise) drawn by the pipelines themselves from
# a seeded torch CPU generator, not passed in.
PIPELINES = "sd1-pipelines"
E2E_SEED = 7  # torch.Generator("cpu").manual_seed(E2E_SEED), fresh for every pipeline call
# sd1-lcm: an LCM-distilled-style UNet with a guidance embedding (time_cond_proj_dim).
LCM_COND_DIM = 32
LCM_GUIDANCE = 8.5  # LatentConsistencyModelPipeline's default; w = guidance - 1 is embedded
LCM_STEPS = 4
# An LCM scheduler config modelled on published LCM-distilled SD 1.5 folders (SD schedule,
# 50 distillation steps, LCMScheduler's own defaults otherwise, steps_offset 1). `timestep_spacing`, `steps_offset` and `set_alpha_to_one` are
# recorded but unused by LCMScheduler's own timestep schedule.
LCM_SCHEDULE = dict(SD_SCHEDULE, original_inference_steps=50, clip_sample=False, set_alpha_to_one=True,
                    steps_offset=1, timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False)


def sd_configs(kind: str) -> dict:
    """The exact configurations of the tiny models. "sd1-inpaint" is sd1 with a 9-channel
    UNet input (latent 4 + mask 1 + masked-image latent 4), like SD 1.5 inpainting."""
    if kind not in ("sd1", "sd2", "sd1-inpaint", "sd1-lcm"):
        raise SystemExit(f"make_fixtures: unknown SD kind {kind}")
    sd2 = kind == "sd2"
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=32,
        # diffusers' `attention_head_dim` is a head COUNT (historical misnomer).
        # SD 1: one count everywhere (real: 8). SD 2: a count per level that keeps the
        # head width constant (real: [5, 10, 20, 20] heads of width 64; here width 16).
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=False,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    if kind == "sd1-inpaint":
        unet["in_channels"] = 9
    if kind == "sd1-lcm":
        # LCM-distilled SD 1.5 (e.g. LCM_Dreamshaper_v7: 256): a guidance embedding
        # Linear(time_cond_proj_dim -> block_out_channels[0], no bias) added to the
        # sinusoidal timestep embedding before time_embedding.linear_1.
        unet["time_cond_proj_dim"] = LCM_COND_DIM
    vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=HEIGHT,
        scaling_factor=0.18215,
    )
    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    prediction = "v_prediction" if sd2 else "epsilon"
    # steps_offset 1 as in the SD repositories (StableDiffusionPipeline rewrites any other
    # value to 1); "linspace" spacing does not use it.
    euler = dict(SD_SCHEDULE, prediction_type=prediction, timestep_spacing="linspace", steps_offset=1,
                 interpolation_type="linear", use_karras_sigmas=False)
    ddim = dict(SD_SCHEDULE, prediction_type=prediction, timestep_spacing="leading", steps_offset=1,
                clip_sample=False, set_alpha_to_one=False, rescale_betas_zero_snr=False)
    # The end-to-end samplers (sd1/pipelines.safetensors, sd1-lcm): DPM++ 2M Karras and
    # Euler ancestral with the SD schedule and otherwise the schedulers' defaults (DPM++:
    # timestep_spacing "linspace", unused with Karras sigmas; Euler a: "linspace").
    dpmpp_karras = dict(SD_SCHEDULE, prediction_type=prediction, algorithm_type="dpmsolver++", solver_order=2,
                        use_karras_sigmas=True, steps_offset=1)
    euler_a = dict(SD_SCHEDULE, prediction_type=prediction, steps_offset=1)
    lcm = dict(LCM_SCHEDULE, prediction_type=prediction)
    pipeline = {"sd1-inpaint": StableDiffusionInpaintPipeline,
                "sd1-lcm": LatentConsistencyModelPipeline}.get(kind, StableDiffusionPipeline)
    # The scheduler saved in the model folder: an LCM model ships LCMScheduler.
    saved_scheduler = (LCMScheduler, lcm) if kind == "sd1-lcm" else (DDIMScheduler, ddim)
    return dict(unet=unet, vae=vae, text_encoder=text, euler=euler, ddim=ddim, dpmpp_karras=dpmpp_karras,
                euler_a=euler_a, lcm=lcm, pad_token="!" if sd2 else "<|endoftext|>", prediction=prediction,
                base="sd2" if sd2 else "sd1", pipeline=pipeline, saved_scheduler=saved_scheduler)


TAESD_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=(16, 16, 16, 16),
    decoder_block_out_channels=(16, 16, 16, 16),
    num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1),
    latent_channels=4,
    act_fn="relu",
    upsample_fn="nearest",
    upsampling_scaling_factor=2,
)

# ---------------------------------------------------------------------------
# Weights


def init_weights(model: nn.Module, rng: np.random.Generator, gains: dict[str, float] | None = None) -> None:
    """Seeded random weights, then rounded to float16 (kept as float32 values).

    Linear/conv weights: uniform with variance 1/fan_in (activations keep their scale);
    norms: weight 1 + U(-0.2, 0.2), bias U(-0.1, 0.1); other biases U(-0.1, 0.1);
    embeddings: normal, std 0.5; Fourier time features: normal, std 16. `gains` multiplies the weights of the named modules
    (exact module names), to keep the outputs of a random network O(1).
    """
    gains = gains or {}
    seen = set()
    with torch.no_grad():
        for mname, m in sorted(model.named_modules(), key=lambda x: x[0]):
            own = list(m.named_parameters(recurse=False))
            if not own:
                continue
            for pname, p in sorted(own):
                full = f"{mname}.{pname}" if mname else pname
                shape = tuple(p.shape)
                if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                    v = 1.0 + rng.uniform(-0.2, 0.2, shape) if pname == "weight" else rng.uniform(-0.1, 0.1, shape)
                elif isinstance(m, nn.Embedding):
                    v = rng.normal(0.0, 0.5, shape)
                elif type(m).__name__ == "GaussianFourierProjection":  # UNet2DModel's scale 16
                    v = rng.normal(0.0, 16.0, shape)
                elif pname == "bias":
                    v = rng.uniform(-0.1, 0.1, shape)
                elif p.dim() >= 2:
                    fan_in = int(np.prod(shape[1:]))
                    v = rng.uniform(-1.0, 1.0, shape) * np.sqrt(3.0 / fan_in) * gains.get(mname, 1.0)
                else:
                    raise SystemExit(f"make_fixtures: no init rule for parameter {full} {shape} of {type(m).__name__}")
                p.copy_(torch.from_numpy(np.asarray(v, dtype=np.float32)).half().float())
                seen.add(full)
    missing = {n for n, _ in model.named_parameters()} - seen
    if missing:
        raise SystemExit(f"make_fixtures: parameters left uninitialised: {sorted(missing)[:5]}")
    for n, b in model.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise SystemExit(f"make_fixtures: buffer {n} is not finite")


def assert_f16_exact(model: nn.Module, what: str) -> None:
    for n, p in model.named_parameters():
        if p.dtype != torch.float32:
            raise SystemExit(f"make_fixtures: {what}.{n} loaded as {p.dtype}, expected float32")
        if not torch.equal(p, p.half().float()):
            raise SystemExit(f"make_fixtures: {what}.{n} is not exactly representable in float16")


# ---------------------------------------------------------------------------
# Activation watch: every module output must stay finite and well inside f16 range.


class ActivationWatch:
    LIMIT = 1.0e4

    def __init__(self, *models: nn.Module):
        self.max = 0.0
        self.where = ""
        self.handles = []
        for model in models:
            for name, m in model.named_modules():
                if len(list(m.children())) == 0:
                    self.handles.append(m.register_forward_hook(self._hook(f"{type(model).__name__}.{name}")))

    def _hook(self, name):
        def hook(_m, _i, out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for o in outs:
                if isinstance(o, torch.Tensor) and o.is_floating_point():
                    if not torch.isfinite(o).all():
                        raise SystemExit(f"make_fixtures: non-finite activation in {name}")
                    a = float(o.abs().max())
                    if a > self.max:
                        self.max, self.where = a, name
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        if self.max > self.LIMIT:
            raise SystemExit(f"make_fixtures: activation {self.max:.3g} in {self.where} exceeds {self.LIMIT}")
        return {"max_abs_activation": round(self.max, 4), "at": self.where}


# ---------------------------------------------------------------------------
# Helpers


def randn(rng: np.random.Generator, *shape) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().clone()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def stats(t: torch.Tensor) -> dict:
    t = t.double()
    return {"min": round(float(t.min()), 5), "max": round(float(t.max()), 5), "std": round(float(t.std()), 5)}


def write_tokenizer(dst: Path, clip_dir: Path, pad_token: str) -> None:
    """A tokenizer folder in the layout of the real SD repositories (vocab.json,
    merges.txt, special_tokens_map.json, tokenizer_config.json); SD 2's pads with "!"."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(clip_dir / f, dst / f)
    special = lambda s: {"content": s, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (dst / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": special("<|startoftext|>"),
        "eos_token": special("<|endoftext|>"),
        "pad_token": pad_token,
        "unk_token": special("<|endoftext|>"),
    }, indent=2) + "\n")
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False,
        "bos_token": "<|startoftext|>",
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }, indent=2) + "\n")


def save_golden(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    json.dumps(meta, allow_nan=False)  # strict JSON (no NaN / Infinity) for every reader
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    for k, v in tensors.items():
        if v.is_floating_point() and v.dtype != torch.float32:
            raise SystemExit(f"make_fixtures: golden {k} is {v.dtype}")
    save_file(tensors, str(path), metadata={"sdrs.golden": json.dumps(meta, sort_keys=True)})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------
# SD pipelines


def build_sd(kind: str, seed: int, model_dir: Path, clip_dir: Path) -> dict:
    cfg = sd_configs(kind)
    rng = np.random.default_rng([seed, STREAM_WEIGHTS[cfg["base"]]])
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    # Gains chosen from the output statistics: the random UNet's prediction and the VAE
    # decoder's image come out with std ~0.3 instead of ~0.6.
    init_weights(text, rng)
    if kind != cfg["base"]:
        # sd1-inpaint, sd1-lcm: sd1's text encoder (drawn above from sd1's stream,
        # identical), then their own UNet stream (sd1's UNet would come next in sd1's stream).
        rng = np.random.default_rng([seed, STREAM_WEIGHTS[kind]])
    init_weights(unet, rng, {"conv_out": 0.5})
    # SD 2 reuses SD 1's VAE architecture: both fixtures get the same VAE weights (one
    # stream), so git stores the file once.
    init_weights(vae, np.random.default_rng([seed, STREAM_WEIGHTS["vae"]]), {"decoder.conv_out": 0.5})
    built = {n: {k: v.detach().clone() for k, v in m.state_dict().items()}
             for n, m in (("unet", unet), ("vae", vae), ("text_encoder", text))}
    tok_dir = model_dir.parent / "_tokenizer_tmp"
    write_tokenizer(tok_dir, clip_dir, cfg["pad_token"])
    sched_cls, sched_cfg = cfg["saved_scheduler"]
    pipe = cfg["pipeline"](
        vae=vae.half(), text_encoder=text.half(), tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=unet.half(), scheduler=sched_cls(**sched_cfg),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    if model_dir.exists():
        shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # transformers 5 writes tokenizer.json (3.6 MB, fast-tokenizer format) only; the real
    # SD repositories (and our converter) carry vocab.json + merges.txt instead.
    shutil.rmtree(model_dir / "tokenizer")
    tok_dir.rename(model_dir / "tokenizer")
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix; every
    # published SD repository (transformers 4) has it, and transformers 5 still loads it
    # (run_sd checks that the loaded weights are exact). Store the published layout.
    te = model_dir / "text_encoder" / "model.safetensors"
    weights = load_file(str(te))
    if not all(k.startswith("text_model.") for k in weights):
        save_file({f"text_model.{k}": v for k, v in weights.items()}, str(te), metadata={"format": "pt"})
    return built


def load_sd(kind: str, model_dir: Path, built: dict | None):
    """The saved folder reloaded in float32 (checked: exactly the weights it was built
    with, when `built` is given; float16-exact in any case)."""
    cls = sd_configs(kind)["pipeline"]
    pipe = cls.from_pretrained(model_dir, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    assert type(pipe) is cls, type(pipe)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_f16_exact(getattr(pipe, name), name)
        if built is None:
            continue
        loaded = getattr(pipe, name).state_dict()
        if loaded.keys() != built[name].keys() or not all(torch.equal(loaded[k], built[name][k]) for k in loaded):
            raise SystemExit(f"make_fixtures: {model_dir}/{name} does not load back the weights it was saved with")
    assert pipe.vae_scale_factor == 2, pipe.vae_scale_factor
    assert pipe.tokenizer.pad_token_id == (0 if kind == "sd2" else 49407), pipe.tokenizer.pad_token_id
    return pipe


def sd_meta_configs(kind: str, pipe) -> dict:
    return {
        "unet": {k: v for k, v in dict(pipe.unet.config).items() if k != "_name_or_path"},
        "vae": {k: v for k, v in dict(pipe.vae.config).items() if k != "_name_or_path"},
        "text_encoder": {k: v for k, v in pipe.text_encoder.config.to_dict().items()
                         if k in sd_configs(kind)["text_encoder"] or k in ("model_type", "projection_dim")},
        "tokenizer": {"pad_token": pipe.tokenizer.pad_token, "pad_token_id": pipe.tokenizer.pad_token_id,
                      "model_max_length": pipe.tokenizer.model_max_length},
    }


def run_sd(kind: str, seed: int, model_dir: Path, built: dict) -> tuple[dict, dict]:
    cfg = sd_configs(kind)
    pipe = load_sd(kind, model_dir, built)
    rng = np.random.default_rng([seed, STREAM_INPUTS[kind]])
    g: dict[str, torch.Tensor] = {}
    meta: dict = {"model": kind, "prompts": PROMPTS, "cond_prompt": COND_PROMPT, "negative_prompt": ""}
    precision: dict[str, float] = {}
    # The same modules in float64, for the f32-vs-f64 precision floor (copied before the
    # activation hooks are attached).
    p64 = {n: copy.deepcopy(getattr(pipe, n)).double() for n in ("unet", "vae", "text_encoder")}
    watch = ActivationWatch(pipe.unet, pipe.vae, pipe.text_encoder)

    with torch.no_grad():
        # 1-2. tokens and conditioning, exactly as the pipeline computes them.
        tok = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids = tok.input_ids
        g["tokens.ids"] = ids.to(torch.int32)
        emb = torch.cat([pipe.encode_prompt(p, "cpu", 1, False)[0] for p in PROMPTS])
        direct = pipe.text_encoder(ids)[0]
        assert torch.equal(emb, direct), "encode_prompt differs from text_encoder(ids).last_hidden_state"
        g["text.hidden"] = f32(emb)
        precision["text.hidden"] = maxdiff(emb, p64["text_encoder"](ids)[0])

        # 3. UNet on fixed inputs; batch = [uncond, cond] as classifier-free guidance runs it.
        x = randn(rng, 2, 4, 8, 8)
        ctx = torch.stack([emb[1], emb[COND_PROMPT]])
        g["unet.x"] = x
        g["unet.context"] = f32(ctx)
        for t in UNET_TIMESTEPS:
            out = pipe.unet(x, torch.tensor(t), encoder_hidden_states=ctx).sample
            g[f"unet.t{t}.out"] = f32(out)
            precision[f"unet.t{t}.out"] = maxdiff(out, p64["unet"](x.double(), torch.tensor(t), encoder_hidden_states=ctx.double()).sample)

        # 4. VAE decode (of a raw, unscaled latent z) and encode (posterior mean / logvar).
        z = randn(rng, 1, 4, 8, 8)
        dec = pipe.vae.decode(z).sample
        g["vae.decode.z"] = z
        g["vae.decode.out"] = f32(dec)
        precision["vae.decode.out"] = maxdiff(dec, p64["vae"].decode(z.double()).sample)
        img = torch.from_numpy(rng.uniform(-1.0, 1.0, (1, 3, HEIGHT, WIDTH)).astype(np.float32))
        dist = pipe.vae.encode(img).latent_dist
        g["vae.encode.x"] = img
        g["vae.encode.mean"] = f32(dist.mean)
        g["vae.encode.logvar"] = f32(dist.logvar)
        precision["vae.encode.mean"] = maxdiff(dist.mean, p64["vae"].encode(img.double()).latent_dist.mean)

        # 6. Trajectories from a fixed initial latent (the pipeline multiplies it by the
        # scheduler's init_noise_sigma).
        x_T = randn(rng, 1, 4, 8, 8)
        g["traj.init_latent"] = x_T
        meta["trajectories"] = {}
        for sname, cls in (("euler", EulerDiscreteScheduler), ("ddim", DDIMScheduler)):
            meta["trajectories"][sname] = trajectory(pipe, cls, cfg[sname], x_T, g, f"traj.{sname}", p64)

    meta["activation_check"] = watch.close()
    meta["unet_timesteps"] = UNET_TIMESTEPS
    meta["precision_f32_vs_f64"] = {k: float(f"{v:.3g}") for k, v in precision.items()}
    meta["stats"] = {k: stats(v) for k, v in g.items() if v.is_floating_point()}
    meta["configs"] = sd_meta_configs(kind, pipe)
    return g, meta


def trajectory(pipe, cls, sched_cfg: dict, x_T: torch.Tensor, g: dict, key: str, p64: dict,
               extra: dict | None = None) -> dict:
    """One 4-step run of `pipe` (its own class: txt2img, or inpainting with `extra` =
    image / mask_image / masked_image_latents / strength) from the fixed latent x_T."""
    extra = extra or {}
    pipe.scheduler = cls(**sched_cfg)
    unet_in, unet_t, unet_out, after = [], [], [], []

    def pre(_m, args, kwargs):
        unet_in.append(f32(args[0]))
        unet_t.append(float(args[1]))

    def post(_m, _args, _kwargs, out):
        unet_out.append(f32(out[0] if isinstance(out, tuple) else out.sample))

    def on_step(_pipe, i, t, kw):
        after.append(f32(kw["latents"]))
        return kw

    h1 = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = pipe.unet.register_forward_hook(post, with_kwargs=True)
    try:
        lat = pipe(PROMPTS[COND_PROMPT], height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, negative_prompt=None, latents=x_T.clone(), output_type="latent",
                   callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"], **extra).images
    finally:
        h1.remove()
        h2.remove()
    sch = pipe.scheduler
    assert len(after) == STEPS and torch.equal(after[-1], lat)
    # The pipeline's own decode: vae.decode(latents / scaling_factor), then postprocess.
    image = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
    np_img = pipe.image_processor.postprocess(image, output_type="np")
    u8 = np.stack([np.asarray(p) for p in pipe.image_processor.numpy_to_pil(np_img)])
    # The same run end to end (output_type="pil") must give the same pixels.
    pipe.scheduler = cls(**sched_cfg)
    pil = pipe(PROMPTS[COND_PROMPT], height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, latents=x_T.clone(), output_type="pil", **extra).images
    assert np.array_equal(np.stack([np.asarray(p) for p in pil]), u8), "manual decode differs from the pipeline's"

    g[f"{key}.unet_in"] = torch.stack(unet_in)
    g[f"{key}.unet_out"] = torch.stack(unet_out)
    g[f"{key}.latents"] = torch.stack(after)
    g[f"{key}.final"] = f32(lat)
    g[f"{key}.image"] = f32(image)
    g[f"{key}.image_u8"] = torch.from_numpy(u8)
    timesteps = [float(t) for t in sch.timesteps]
    assert timesteps == unet_t, (timesteps, unet_t)
    ac = sch.alphas_cumprod.double()
    info = {
        "scheduler": cls.__name__,
        "config": {k: v for k, v in dict(sch.config).items() if not k.startswith("_")},
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "init_noise_sigma": float(sch.init_noise_sigma),
        "timesteps": timesteps,
    }
    if cls is EulerDiscreteScheduler:
        info["sigmas"] = [float(s) for s in sch.sigmas]
    else:
        info["alphas_cumprod"] = [float(ac[int(t)]) for t in sch.timesteps]
        info["sigmas"] = [float(((1 - ac[int(t)]) / ac[int(t)]).sqrt()) for t in sch.timesteps]
        info["final_alpha_cumprod"] = float(sch.final_alpha_cumprod)
    # The same run with float64 modules (diffusers' schedulers still do part of their
    # arithmetic in float32, so this bounds the f32 noise from below, not exactly).
    pipe64 = type(pipe)(vae=p64["vae"], text_encoder=p64["text_encoder"], tokenizer=pipe.tokenizer,
                        unet=p64["unet"], scheduler=cls(**sched_cfg), safety_checker=None,
                        feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe64.set_progress_bar_config(disable=True)
    lat64 = pipe64(PROMPTS[COND_PROMPT], height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=x_T.double(), output_type="latent", **extra).images
    image64 = p64["vae"].decode(lat64 / pipe.vae.config.scaling_factor, return_dict=False)[0]
    info["precision_f32_vs_f64"] = {"final": float(f"{maxdiff(lat, lat64):.3g}"),
                                    "image": float(f"{maxdiff(image, image64):.3g}")}
    g[f"{key}.timesteps"] = torch.tensor(timesteps, dtype=torch.float32)
    g[f"{key}.sigmas"] = torch.tensor(info["sigmas"], dtype=torch.float32)
    return info


# ---------------------------------------------------------------------------
# SD 1.x inpainting (9-channel UNet)


def run_inpaint(kind: str, seed: int, model_dir: Path, built: dict) -> tuple[dict, dict]:
    """Goldens of the inpainting pipeline: the 9-channel UNet on fixed inputs, the txt2img
    conditioning of an inpainting model (grey image, fully masked: what A1111 feeds such
    a model when it is not inpainting), and a 4-step Euler run of
    StableDiffusionInpaintPipeline with exactly that conditioning."""
    cfg = sd_configs(kind)
    pipe = load_sd(kind, model_dir, built)
    assert pipe.unet.config.in_channels == 9 and pipe.unet.config.out_channels == 4
    rng = np.random.default_rng([seed, STREAM_INPUTS[kind]])
    g: dict[str, torch.Tensor] = {}
    meta: dict = {"model": kind, "prompts": [PROMPTS[COND_PROMPT], ""], "cond_prompt": PROMPTS[COND_PROMPT],
                  "negative_prompt": ""}
    precision: dict[str, float] = {}
    p64 = {n: copy.deepcopy(getattr(pipe, n)).double() for n in ("unet", "vae", "text_encoder")}
    watch = ActivationWatch(pipe.unet, pipe.vae, pipe.text_encoder)
    sf = pipe.vae.config.scaling_factor

    with torch.no_grad():
        # 1. The UNet on fixed random inputs (all 9 channels random); context [uncond, cond].
        cond = pipe.encode_prompt(PROMPTS[COND_PROMPT], "cpu", 1, False)[0]
        uncond = pipe.encode_prompt("", "cpu", 1, False)[0]
        ctx = torch.cat([uncond, cond])
        x = randn(rng, 2, 9, 8, 8)
        g["unet.x"] = x
        g["unet.context"] = f32(ctx)
        t = 500
        out = pipe.unet(x, torch.tensor(t), encoder_hidden_states=ctx).sample
        assert out.shape == (2, 4, 8, 8), out.shape
        g[f"unet.t{t}.out"] = f32(out)
        precision[f"unet.t{t}.out"] = maxdiff(out, p64["unet"](x.double(), torch.tensor(t), encoder_hidden_states=ctx.double()).sample)

        # 2. Conditioning: mask all ones (everything is to be generated) and the latent of a
        # neutral grey image (0 in [-1, 1]), posterior mean times the scaling factor.
        grey = torch.zeros(1, 3, HEIGHT, WIDTH)
        mli = pipe.vae.encode(grey).latent_dist.mean * sf
        mask = torch.ones(1, 1, HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor)
        g["cond.mask"] = mask
        g["cond.masked_image_latents"] = f32(mli)
        precision["cond.masked_image_latents"] = maxdiff(mli, p64["vae"].encode(grey.double()).latent_dist.mean * sf)

        # 3. The pipeline run. `image` in [0, 1] (the processor maps 0.5 to 0 = grey); with
        # strength 1, a 9-channel UNet, given latents and given masked_image_latents the
        # pipeline never VAE-encodes it. `mask_image` at image resolution: binarised, then
        # nearest-resized to the latent grid (-> cond.mask).
        image_01 = torch.full((1, 3, HEIGHT, WIDTH), 0.5)
        mask_image = torch.ones(1, 1, HEIGHT, WIDTH)
        assert torch.equal(pipe.image_processor.preprocess(image_01, height=HEIGHT, width=WIDTH), grey)
        assert torch.equal(pipe.mask_processor.preprocess(mask_image, height=HEIGHT, width=WIDTH), mask_image)
        extra = dict(image=image_01, mask_image=mask_image, masked_image_latents=mli.clone(), strength=1.0)
        x_T = randn(rng, 1, 4, 8, 8)
        g["traj.init_latent"] = x_T
        # Record what prepare_latents hands to the loop (the pipeline scales x_T by init_noise_sigma).
        prepared = []
        orig_prepare = pipe.prepare_latents

        def prepare_latents(*a, **k):
            res = orig_prepare(*a, **k)
            prepared.append(res[0].clone())
            return res

        pipe.prepare_latents = prepare_latents
        try:
            info = trajectory(pipe, EulerDiscreteScheduler, cfg["euler"], x_T, g, "traj.euler", p64, extra)
        finally:
            del pipe.prepare_latents
        meta["trajectories"] = {"euler": info}

        # The pipeline really used the given conditioning and scaled x_T.
        ins = info["init_noise_sigma"]
        assert len(prepared) == 2 and all(torch.equal(p, x_T * ins) for p in prepared), "x_T not scaled by init_noise_sigma"
        u = g["traj.euler.unet_in"]
        assert u.shape == (STEPS, 2, 9, 8, 8), u.shape
        for b in range(2):
            assert torch.equal(u[:, b, 4:5], mask.expand(STEPS, -1, -1, -1)), "UNet input channel 4 is not the mask"
            assert torch.equal(u[:, b, 5:9], mli.expand(STEPS, -1, -1, -1)), "UNet input channels 5..8 are not masked_image_latents"
        assert torch.equal(u[:, 0, :4], u[:, 1, :4])
        sch = EulerDiscreteScheduler(**cfg["euler"])
        sch.set_timesteps(STEPS)
        expected = sch.scale_model_input(x_T * ins, sch.timesteps[0])
        assert torch.equal(u[0, 0, :4], expected[0]), "first UNet input is not scale_model_input(x_T * init_noise_sigma)"
        info["unet_in_channels"] = {"0:4": "scale_model_input(latents)", "4": "mask", "5:9": "masked_image_latents"}
        info["strength"] = 1.0

    meta["conditioning"] = {
        "image": "zeros(1, 3, 16, 16) in [-1, 1] (grey), fully masked",
        "cond.mask": "ones(1, 1, 8, 8)",
        "cond.masked_image_latents": "vae.encode(grey).latent_dist.mean * scaling_factor",
        "pipeline_args": {"image": "full((1, 3, 16, 16), 0.5) in [0, 1]", "mask_image": "ones(1, 1, 16, 16)",
                          "masked_image_latents": "cond.masked_image_latents", "strength": 1.0},
    }
    meta["activation_check"] = watch.close()
    meta["unet_timesteps"] = [500]
    meta["precision_f32_vs_f64"] = {k: float(f"{v:.3g}") for k, v in precision.items()}
    meta["stats"] = {k: stats(v) for k, v in g.items() if v.is_floating_point()}
    meta["configs"] = sd_meta_configs(kind, pipe)
    return g, meta


SHARED_WITH_SD1 = ["scheduler/scheduler_config.json", "text_encoder/config.json",
                   "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
                   "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "vae/config.json",
                   "vae/diffusion_pytorch_model.safetensors"]


def check_shared_with_sd1(out: Path, seed: int, kind: str) -> bool:
    """sd1-inpaint's tokenizer, text encoder, VAE and scheduler files are sd1's, byte for byte;
    sd1-lcm's too except the scheduler (LCMScheduler). Checked when an sd1 fixture of the
    same seed is present."""
    sd1 = out / "sd1"
    if not (sd1 / "golden.json").is_file() or json.loads((sd1 / "golden.json").read_text()).get("seed") != seed:
        print(f"{kind}: no sd1 fixture of this seed to compare the shared files with", file=sys.stderr)
        return False
    for rel in SHARED_WITH_SD1:
        if kind == "sd1-lcm" and rel.startswith("scheduler/"):
            continue
        a, b = (sd1 / "model" / rel).read_bytes(), (out / kind / "model" / rel).read_bytes()
        if a != b:
            raise SystemExit(f"make_fixtures: {kind}/model/{rel} differs from sd1's")
    return True


# ---------------------------------------------------------------------------
# End-to-end pipeline runs with noise from a seeded torch generator
# (sd1/pipelines.safetensors, sd1-lcm)


class RandnRecorder:
    """Records every `randn_tensor` draw diffusers makes while active (a pipeline's initial
    latent, a scheduler's ancestral / LCM noise), in order, with the module that drew it,
    and checks that each one came from the pipeline call's generator."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.draws: list[tuple[str, torch.Tensor]] = []

    def __enter__(self):
        import diffusers.utils.torch_utils as tu
        self.orig = tu.randn_tensor
        self.patched = [m for n, m in sorted(sys.modules.items())
                        if n.startswith(("diffusers.pipelines.", "diffusers.schedulers."))
                        and m.__dict__.get("randn_tensor") is self.orig]
        for m in self.patched:
            m.randn_tensor = self._wrap(m.__name__.rsplit(".", 1)[-1])
        return self

    def _wrap(self, name: str):
        def randn_tensor(*args, **kwargs):
            gen = kwargs["generator"] if "generator" in kwargs else (args[1] if len(args) > 1 else None)
            if gen is not self.generator:
                raise SystemExit(f"make_fixtures: {name} drew noise without the pipeline call's generator")
            t = self.orig(*args, **kwargs)
            self.draws.append((name, t.detach().clone()))
            return t
        return randn_tensor

    def __exit__(self, *exc):
        for m in self.patched:
            m.randn_tensor = self.orig
        return False


class RandnReplay(RandnRecorder):
    """Hands out the given (float32) draws again, in order, cast to the dtype asked for:
    the same noise for a float64 run of the same pipeline call."""

    def __init__(self, generator: torch.Generator, draws: list[torch.Tensor]):
        super().__init__(generator)
        self.queue = list(draws)

    def _wrap(self, name: str):
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
            nxt = self.queue.pop(0)
            assert generator is self.generator and tuple(shape) == tuple(nxt.shape), (name, shape)
            self.draws.append((name, nxt))
            return nxt.to(dtype or torch.float32)
        return randn_tensor


def seeded() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(E2E_SEED)


def to_u8(pipe, image: torch.Tensor) -> np.ndarray:
    """The pipeline's postprocessing: PIL images (round(clamp(x/2 + 0.5, 0, 1)·255)) as uint8 HWC."""
    np_img = pipe.image_processor.postprocess(image, output_type="np")
    return np.stack([np.asarray(p) for p in pipe.image_processor.numpy_to_pil(np_img)])


def e2e_run(pipe, key: str, sched_cls, sched_cfg: dict, g: dict, p64: dict, *, steps: int, guidance: float,
            call_kwargs: dict | None = None) -> tuple[dict, torch.Tensor | None]:
    """One txt2img call of `pipe` with scheduler `sched_cls(**sched_cfg)` and
    generator=torch.Generator("cpu").manual_seed(E2E_SEED), made twice with a fresh
    generator each time: output_type "latent" (with per-step callbacks) and "pil". The
    pipeline draws every bit of noise itself. Returns the metadata and the UNet's
    `timestep_cond` (the LCM guidance embedding; None without one). A third call with the
    float64 modules `p64` and the same noise (replayed) gives the f32-vs-f64 floor."""
    call_kwargs = call_kwargs or {}
    args = dict(prompt=PROMPTS[COND_PROMPT], height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                guidance_scale=guidance, **call_kwargs)
    calls, after, denoised = [], [], []

    def pre(_m, a, kw):
        tc = kw.get("timestep_cond")
        calls.append({"x": f32(a[0]), "t": float(a[1]), "timestep_cond": None if tc is None else f32(tc)})

    def on_step(_pipe, i, t, kw):
        after.append(f32(kw["latents"]))
        return kw

    pipe.scheduler = sched_cls(**sched_cfg)
    if sched_cls is LCMScheduler:  # its step returns (prev_sample, denoised): keep denoised
        orig_step = pipe.scheduler.step

        @functools.wraps(orig_step)  # keeps the signature the pipeline inspects for `generator`
        def step(*a, **k):
            res = orig_step(*a, **k)
            denoised.append(f32(res[1] if isinstance(res, tuple) else res.denoised))
            return res

        pipe.scheduler.step = step
    h = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    gen = seeded()
    try:
        with RandnRecorder(gen) as rec:
            lat = pipe(**args, generator=gen, output_type="latent", callback_on_step_end=on_step,
                       callback_on_step_end_tensor_inputs=["latents"]).images
    finally:
        h.remove()
    sch = pipe.scheduler
    pipe.scheduler = sched_cls(**sched_cfg)
    gen2 = seeded()
    with RandnRecorder(gen2) as rec2:
        pil = pipe(**args, generator=gen2, output_type="pil").images

    # The noise: the first draw is the pipeline's initial latent, the rest the scheduler's;
    # all of them successive torch.randn calls on the one generator, the same in both runs.
    draws = [t for _, t in rec.draws]
    where = [n for n, _ in rec.draws]
    assert where[0].startswith("pipeline_") and all(n.startswith("scheduling_") for n in where[1:]), where
    assert len(rec2.draws) == len(draws) and all(torch.equal(a, b) for (_, a), b in zip(rec2.draws, draws))
    ref = seeded()
    for d in draws:
        assert d.dtype == torch.float32 and torch.equal(d, torch.randn(d.shape, generator=ref, dtype=torch.float32))
    x_T = draws[0]
    g[f"{key}.init_latent"] = f32(x_T)
    if len(draws) > 1:
        g[f"{key}.step_noise"] = torch.stack(draws[1:])

    # The UNet's first input is scale_model_input(x_T · init_noise_sigma) (twice with CFG).
    batch = {c["x"].shape[0] for c in calls}
    assert len(batch) == 1, batch
    batch = batch.pop()
    cfg_ran = batch == 2
    assert batch in (1, 2) and len(calls) == steps, (batch, len(calls))
    fresh = sched_cls(**sched_cfg)
    fresh.set_timesteps(steps)
    ins = fresh.init_noise_sigma
    first = fresh.scale_model_input(torch.cat([x_T * ins] * batch), fresh.timesteps[0])
    assert torch.equal(calls[0]["x"], first), "the first UNet input is not scale_model_input(x_T * init_noise_sigma)"

    assert len(after) == steps and torch.equal(after[-1], lat)
    image = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
    u8 = to_u8(pipe, image)
    assert np.array_equal(np.stack([np.asarray(p) for p in pil]), u8), "manual decode differs from the pipeline's"
    g[f"{key}.final"] = f32(lat)
    g[f"{key}.latents"] = torch.stack(after)
    if denoised:
        assert len(denoised) == steps and torch.equal(denoised[-1], lat)
        g[f"{key}.denoised"] = torch.stack(denoised)
    g[f"{key}.image"] = f32(image)
    g[f"{key}.image_u8"] = torch.from_numpy(u8)
    timesteps = [float(t) for t in sch.timesteps]
    assert timesteps == [c["t"] for c in calls], (timesteps, [c["t"] for c in calls])
    g[f"{key}.timesteps"] = torch.tensor(timesteps, dtype=torch.float32)

    # The same call with float64 modules and the same (float32) noise replayed.
    pipe64 = type(pipe)(vae=p64["vae"], text_encoder=p64["text_encoder"], tokenizer=pipe.tokenizer,
                        unet=p64["unet"], scheduler=sched_cls(**sched_cfg), safety_checker=None,
                        feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe64.set_progress_bar_config(disable=True)
    gen3 = seeded()
    with RandnReplay(gen3, draws) as rep64:
        lat64 = pipe64(**args, generator=gen3, output_type="latent").images
    assert not rep64.queue and len(rep64.draws) == len(draws)
    image64 = p64["vae"].decode(lat64 / pipe.vae.config.scaling_factor, return_dict=False)[0]
    u8_64 = to_u8(pipe, image64.float())
    precision = {"final": float(f"{maxdiff(lat, lat64):.3g}"), "image": float(f"{maxdiff(image, image64):.3g}"),
                 "image_u8_values_differing": int((u8_64 != u8).sum())}

    conds = [c["timestep_cond"] for c in calls]
    w_emb = conds[0]
    assert all((c is None) == (w_emb is None) and (c is None or torch.equal(c, w_emb)) for c in conds)
    info = {
        "pipeline": type(pipe).__name__,
        "scheduler": sched_cls.__name__,
        # Non-finite values (DPM-Solver's lambda_min_clipped -inf) as strings: strict JSON.
        "config": {k: (v if not isinstance(v, float) or np.isfinite(v) else str(v))
                   for k, v in dict(sch.config).items() if not k.startswith("_")},
        "steps": steps,
        "guidance_scale": guidance,
        "classifier_free_guidance": cfg_ran,
        "unet_batch": batch,
        "negative_prompt": call_kwargs.get("negative_prompt"),
        "call_kwargs": {k: v for k, v in call_kwargs.items()},
        "init_noise_sigma": float(ins),
        "timesteps": timesteps,
        "noise_draws": {"initial_latent": where[0], "per_step": len(draws) - 1,
                        "step_noise_from": where[1] if len(where) > 1 else None,
                        "shape": list(x_T.shape)},
        "timestep_cond": None if w_emb is None else list(w_emb.shape),
        "precision_f32_vs_f64": precision,
    }
    if hasattr(sch, "sigmas"):
        info["sigmas"] = [float(s) for s in sch.sigmas]
        g[f"{key}.sigmas"] = sch.sigmas.to(torch.float32).clone()
    if sched_cls is DPMSolverMultistepScheduler and sch.config.use_karras_sigmas:
        # What diffusers computes before rounding the timesteps to integers.
        s = (((1 - sch.alphas_cumprod) / sch.alphas_cumprod) ** 0.5).numpy()  # float32, as diffusers
        ks = sch._convert_to_karras(in_sigmas=np.flip(s).copy(), num_inference_steps=steps)
        unrounded = [float(sch._sigma_to_t(x, np.log(s))) for x in ks]
        assert [float(t) for t in np.round(unrounded)] == timesteps
        info["karras"] = {"rho": 7.0, "sigma_min": float(s[0]), "sigma_max": float(s[-1]),
                          "sigmas_f64": [float(x) for x in ks], "timesteps_unrounded": unrounded,
                          "timesteps_rounded": "np.round (half to even)", "final_sigma": "zero"}
    if sched_cls is LCMScheduler:
        sc = [sch.get_scalings_for_boundary_condition_discrete(int(t)) for t in sch.timesteps]
        ac = sch.alphas_cumprod.double()
        info["lcm"] = {"c_skip": [float(a) for a, _ in sc], "c_out": [float(b) for _, b in sc],
                       "alphas_cumprod": [float(ac[int(t)]) for t in sch.timesteps],
                       "noise": "prev = sqrt(ᾱ_prev)·denoised + sqrt(1 − ᾱ_prev)·randn, every step but the last"}
    if sched_cls is DDIMScheduler:
        ac = sch.alphas_cumprod.double()
        info["alphas_cumprod"] = [float(ac[int(t)]) for t in sch.timesteps]
        info["final_alpha_cumprod"] = float(sch.final_alpha_cumprod)
    return info, w_emb


def randn_info(n_draws: int) -> dict:
    """The CPU capability torch dispatches to (it picks the float32 randn kernel for 16+
    elements: AVX2 polynomial Box-Muller or the generic libm one), and how the noise of
    the seed would differ under the generic kernel (a child process with
    ATEN_CPU_CAPABILITY=default)."""
    cap = torch.backends.cpu.get_cpu_capability()
    gen = seeded()
    here = torch.stack([torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=gen) for _ in range(n_draws)])
    code = ("import sys, torch\n"
            "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT', torch.backends.cpu.get_cpu_capability()\n"
            f"g = torch.Generator('cpu').manual_seed({E2E_SEED})\n"
            f"x = torch.stack([torch.randn(1, 4, {HEIGHT // 2}, {WIDTH // 2}, generator=g) for _ in range({n_draws})])\n"
            "sys.stdout.write(x.numpy().tobytes().hex())\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    generic = torch.from_numpy(np.frombuffer(bytes.fromhex(res.stdout), dtype=np.float32).copy()).reshape(here.shape)
    differ = int((here != generic).sum())
    return {
        "cpu_capability": cap,
        "kernel": "avx2" if cap == "AVX2" else "generic",
        "generator": f'torch.Generator("cpu").manual_seed({E2E_SEED})',
        "draws_compared": n_draws,
        "generic_kernel_vs_this": {"values_differing": differ, "of": here.numel(),
                                   "max_abs_diff": float(f"{maxdiff(here, generic):.3g}")},
    }


def run_pipelines(kind: str, seed: int, model_dir: Path) -> tuple[dict, dict]:
    """sd1/pipelines.safetensors: whole pipeline calls on the saved sd1 folder (float32),
    four samplers, noise drawn by the pipelines from a seeded torch CPU generator."""
    cfg = sd_configs(kind)
    pipe = load_sd(kind, model_dir, None)
    g: dict[str, torch.Tensor] = {}
    p64 = {n: copy.deepcopy(getattr(pipe, n)).double() for n in ("unet", "vae", "text_encoder")}
    watch = ActivationWatch(pipe.unet, pipe.vae, pipe.text_encoder)
    runs = {}
    sd = dict(negative_prompt="")
    with torch.no_grad():
        runs["ddim10"], _ = e2e_run(pipe, "ddim10", DDIMScheduler, cfg["ddim"], g, p64, steps=10, guidance=GUIDANCE,
                                    call_kwargs=dict(sd, eta=0.0))
        runs["dpmpp2m_karras8"], _ = e2e_run(pipe, "dpmpp2m_karras8", DPMSolverMultistepScheduler,
                                             cfg["dpmpp_karras"], g, p64, steps=8, guidance=GUIDANCE, call_kwargs=sd)
        # LCM on sd1: LatentConsistencyModelPipeline needs a UNet with time_cond_proj_dim
        # (it embeds w unconditionally); sd1's has none, so StableDiffusionPipeline runs the
        # LCMScheduler, with guidance 1 = no classifier-free guidance (as the LCM pipeline,
        # and LCM-LoRA's recommended setting).
        lcm_pipe = LatentConsistencyModelPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            scheduler=LCMScheduler(**cfg["lcm"]), safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False)
        lcm_pipe.set_progress_bar_config(disable=True)
        try:
            lcm_pipe(PROMPTS[COND_PROMPT], height=HEIGHT, width=WIDTH, num_inference_steps=LCM_STEPS,
                     generator=seeded(), output_type="latent")
            refused = None
        except TypeError as e:
            refused = f"{type(e).__name__}: {e}"
        if refused is None:
            raise SystemExit("make_fixtures: LatentConsistencyModelPipeline now runs a UNet without "
                             "time_cond_proj_dim; decide which pipeline lcm4 should use")
        runs["lcm4"], _ = e2e_run(pipe, "lcm4", LCMScheduler, cfg["lcm"], g, p64, steps=LCM_STEPS, guidance=1.0)
        runs["lcm4"]["latent_consistency_pipeline"] = (
            f"refused sd1's UNet (time_cond_proj_dim None): {refused}; StableDiffusionPipeline used instead, "
            "guidance_scale 1.0 so no classifier-free guidance (batch 1, prompt only) and no timestep_cond")
        runs["euler_a8"], _ = e2e_run(pipe, "euler_a8", EulerAncestralDiscreteScheduler, cfg["euler_a"], g, p64,
                                      steps=8, guidance=GUIDANCE, call_kwargs=sd)
    meta = {
        "model": kind,
        "model_dir": "sd1/model (float16 files, loaded in float32)",
        "prompt": PROMPTS[COND_PROMPT],
        "negative_prompt": "",
        "height": HEIGHT,
        "width": WIDTH,
        "dtype": "float32",
        "generator": f'torch.Generator("cpu").manual_seed({E2E_SEED}), a fresh one per pipeline call',
        "runs": runs,
        "activation_check": watch.close(),
        "randn": randn_info(max(1 + r["noise_draws"]["per_step"] for r in runs.values())),
        "stats": {k: stats(v) for k, v in g.items() if v.is_floating_point()},
    }
    return g, meta


def run_lcm(kind: str, seed: int, model_dir: Path, built: dict) -> tuple[dict, dict]:
    """sd1-lcm: the UNet with a guidance embedding on fixed inputs, and a seeded 4-step
    LatentConsistencyModelPipeline run."""
    cfg = sd_configs(kind)
    pipe = load_sd(kind, model_dir, built)
    assert pipe.unet.config.time_cond_proj_dim == LCM_COND_DIM
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert all(pipe.scheduler.config[k] == v for k, v in cfg["lcm"].items()), dict(pipe.scheduler.config)
    rng = np.random.default_rng([seed, STREAM_INPUTS[kind]])
    g: dict[str, torch.Tensor] = {}
    precision: dict[str, float] = {}
    p64 = {n: copy.deepcopy(getattr(pipe, n)).double() for n in ("unet", "vae", "text_encoder")}
    watch = ActivationWatch(pipe.unet, pipe.vae, pipe.text_encoder)
    with torch.no_grad():
        # The guidance embedding exactly as the pipeline computes it (float32).
        w = torch.tensor(LCM_GUIDANCE - 1).repeat(1)
        w_emb = pipe.get_guidance_scale_embedding(w, embedding_dim=LCM_COND_DIM).to(dtype=torch.float32)
        w_emb64 = pipe.get_guidance_scale_embedding(w.double(), embedding_dim=LCM_COND_DIM, dtype=torch.float64)
        precision["unet.w_embedding"] = maxdiff(w_emb, w_emb64)
        cond = pipe.encode_prompt(PROMPTS[COND_PROMPT], "cpu", 1, False)[0]
        x = randn(rng, 1, 4, 8, 8)
        g["unet.x"] = x
        g["unet.context"] = f32(cond)
        g["unet.w_embedding"] = f32(w_emb)
        t = 500
        out = pipe.unet(x, torch.tensor(t), encoder_hidden_states=cond, timestep_cond=w_emb).sample
        g[f"unet.t{t}.out"] = f32(out)
        precision[f"unet.t{t}.out"] = maxdiff(out, p64["unet"](x.double(), torch.tensor(t), encoder_hidden_states=cond.double(),
                                                                timestep_cond=w_emb.double()).sample)
        no_w = pipe.unet(x, torch.tensor(t), encoder_hidden_states=cond).sample
        w_effect = maxdiff(out, no_w)
        assert w_effect > 1e-3, f"the guidance embedding barely changes the UNet output ({w_effect})"

        info, used = e2e_run(pipe, "lcm4", LCMScheduler, cfg["lcm"], g, p64, steps=LCM_STEPS, guidance=LCM_GUIDANCE)
        assert used is not None and torch.equal(used, w_emb), "the pipeline's timestep_cond differs from unet.w_embedding"
        assert not info["classifier_free_guidance"]
    info["w_embedding"] = {
        "w": LCM_GUIDANCE - 1,
        "formula": "w = guidance_scale - 1; x = w·1000; half = dim/2; f_i = exp(-i·ln(10000)/(half - 1)), "
                   "i < half; emb = [sin(x·f_i) for i] ++ [cos(x·f_i) for i] (sin first, no flip), float32 ops",
        "embedding_dim": LCM_COND_DIM,
        "dtype": str(w_emb.dtype),
        "key": "unet.w_embedding",
    }
    meta = {
        "model": kind,
        "prompts": [PROMPTS[COND_PROMPT]],
        "cond_prompt": PROMPTS[COND_PROMPT],
        "negative_prompt": None,
        "height": HEIGHT,
        "width": WIDTH,
        "guidance_scale": LCM_GUIDANCE,
        "unet_timesteps": [500],
        "unet_w_effect": float(f"{w_effect:.3g}"),
        "runs": {"lcm4": info},
        "activation_check": watch.close(),
        "precision_f32_vs_f64": {k: float(f"{v:.3g}") for k, v in precision.items()},
        "randn": randn_info(1 + info["noise_draws"]["per_step"]),
        "stats": {k: stats(v) for k, v in g.items() if v.is_floating_point()},
        "configs": sd_meta_configs(kind, pipe),
    }
    meta["configs"]["scheduler"] = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return g, meta


# ---------------------------------------------------------------------------
# TAESD


def taesd_key(diffusers_key: str) -> tuple[str, str]:
    """diffusers AutoencoderTiny key -> (file, original TAESD key). The original
    networks are flat nn.Sequentials; the decoder's index 0 is the tanh clamp, which
    diffusers applies outside `layers`, so decoder indices shift by one."""
    part, rest = diffusers_key.split(".layers.", 1)
    idx, tail = rest.split(".", 1)
    if part == "encoder":
        return "encoder", f"{int(idx)}.{tail}"
    if part == "decoder":
        return "decoder", f"{int(idx) + 1}.{tail}"
    raise SystemExit(f"make_fixtures: unexpected TAESD key {diffusers_key}")


def build_taesd(seed: int, out: Path) -> None:
    rng = np.random.default_rng([seed, STREAM_WEIGHTS["taesd"]])
    model = AutoencoderTiny(**TAESD_CONFIG)
    # Variance 1/fan_in everywhere (He's sqrt(2) makes the residual ReLU stacks blow up
    # to ~30); the last convs scaled so latents come out with std ~1 and images ~0.5.
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    last = lambda part: max((n for n in convs if n.startswith(part)), key=lambda n: int(n.split(".")[2]))
    init_weights(model, rng, {last("encoder."): 6.0, last("decoder."): 2.0})
    mdir = out / "model"
    if mdir.exists():
        shutil.rmtree(mdir)
    model.half().save_pretrained(mdir, safe_serialization=True)
    enc, dec = {}, {}
    for k, v in model.state_dict().items():
        which, new = taesd_key(k)
        (enc if which == "encoder" else dec)[new] = v.detach().clone().half().contiguous()
    torch.save(enc, out / "taesd_encoder.pth")
    torch.save(dec, out / "taesd_decoder.pth")


def run_taesd(seed: int, out: Path) -> tuple[dict, dict]:
    model = AutoencoderTiny.from_pretrained(out / "model", dtype=torch.float32).eval()
    assert_f16_exact(model, "taesd")
    # The .pth files hold exactly the same tensors under the original names.
    enc = torch.load(out / "taesd_encoder.pth", weights_only=True)
    dec = torch.load(out / "taesd_decoder.pth", weights_only=True)
    sd = model.state_dict()
    assert len(enc) + len(dec) == len(sd)
    for k, v in sd.items():
        which, new = taesd_key(k)
        src = enc if which == "encoder" else dec
        assert src[new].dtype == torch.float16 and torch.equal(src[new].float(), v), k
    m64 = copy.deepcopy(model).double()
    rng = np.random.default_rng([seed, STREAM_INPUTS["taesd"]])
    g: dict[str, torch.Tensor] = {}
    precision = {}
    watch = ActivationWatch(model)
    with torch.no_grad():
        z = randn(rng, 1, 4, 8, 8)
        out_pm1 = model.decode(z).sample  # diffusers convention: [-1, 1] = 2 * taesd - 1
        native = model.decoder.layers(torch.tanh(z / 3) * 3)  # the original TAESD output, ~[0, 1]
        assert maxdiff(out_pm1, native * 2 - 1) < 1e-5
        g["taesd.decode.z"] = z
        g["taesd.decode.out"] = f32(native)
        g["taesd.decode.out_pm1"] = f32(out_pm1)
        precision["taesd.decode.out"] = maxdiff(native, m64.decoder.layers(torch.tanh(z.double() / 3) * 3))
        x = torch.from_numpy(rng.uniform(-1.0, 1.0, (1, 3, TAESD_IMAGE, TAESD_IMAGE)).astype(np.float32))
        x01 = x.add(1).div(2)
        lat = model.encode(x).latents
        assert torch.equal(lat, model.encoder.layers(x01))
        g["taesd.encode.x"] = x
        g["taesd.encode.x01"] = f32(x01)
        g["taesd.encode.z"] = f32(lat)
        precision["taesd.encode.z"] = maxdiff(lat, m64.encoder.layers(x01.double()))
    meta = {
        "model": "taesd",
        "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        "activation_check": watch.close(),
        "precision_f32_vs_f64": {k: float(f"{v:.3g}") for k, v in precision.items()},
        "stats": {k: stats(v) for k, v in g.items()},
    }
    return g, meta


# ---------------------------------------------------------------------------
# README


def describe_files(root: Path) -> list[str]:
    from safetensors import safe_open
    lines = []
    for p in sorted(root.rglob("*")):
        if p.is_dir() or p.name == "README.md":
            continue
        rel = p.relative_to(root).as_posix()
        size = p.stat().st_size
        lines.append(f"| `{rel}` | {size:,} |")
    return lines


def golden_table(path: Path) -> list[str]:
    from safetensors import safe_open
    rows = []
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            rows.append(f"| `{k}` | {t.get_dtype()} | {list(t.get_shape())} |")
    return rows


def write_readme(out: Path, seed: int, seconds: float, metas: dict) -> None:
    v = versions()
    rel = os.path.relpath(out, REPO) if out.is_relative_to(REPO) else str(out)
    sd1, sd2 = sd_configs("sd1"), sd_configs("sd2")
    lines = [
        "# Reference fixtures (diffusers / transformers on PyTorch)",
        "",
        "Golden values that the sdrs executor must reproduce, computed by the reference Python",
        "implementation from tiny random-weight models. Generated by",
        "[`tools/reference/make_fixtures.py`](../../../tools/reference/make_fixtures.py); do not edit by hand.",
        "",
        "```sh",
        "tools/reference/setup.sh    # venv with the pinned versions below (SDRS_REF_VENV, default /work/venv-ref)",
        f"/work/venv-ref/bin/python tools/reference/make_fixtures.py --out {rel} --seed {seed}",
        f"/work/venv-ref/bin/python tools/reference/make_fixtures.py --out {rel} --seed {seed} --only sd1-inpaint"
        "  # one fixture",
        f"/work/venv-ref/bin/python tools/reference/make_fixtures.py --out {rel} --seed {seed} --only {PIPELINES}"
        "  # sd1/pipelines.*",
        "```",
        "",
        f"Versions: {', '.join(f'{k} {x}' for k, x in v.items())}. Takes about two minutes on 2 CPU cores.",
        "The output is a deterministic function of `--seed` (inputs from numpy's PCG64; the",
        "weights likewise), so rerunning with the same versions reproduces every file bit for bit.",
        "The end-to-end pipeline goldens (`sd1/pipelines.*`, `sd1-lcm`'s `lcm4.*`) are the exception:",
        f"their noise comes from `torch.Generator(\"cpu\").manual_seed({E2E_SEED})`, drawn by the pipelines,",
        "so it also depends on the float32 randn kernel torch picks for the CPU (AVX2 or generic;",
        f"these were made with `{metas[PIPELINES]['randn']['cpu_capability']}`, see `randn` in their JSON).",
        "",
        "## The models",
        "",
        "- `sd1/model`, `sd2/model`: diffusers pipeline folders (`StableDiffusionPipeline`), weights",
        "  float16 safetensors; `sdrs convert sd1/model --type f32` reads them. `taesd/model`:",
        "  an `AutoencoderTiny` folder; `taesd/taesd_{encoder,decoder}.pth`: the same weights as",
        "  the flat state dicts of the original TAESD releases (`nn.Sequential` indices, float16,",
        "  `torch.save` zip format; decoder index 0 is the `tanh(x/3)*3` clamp, so its first conv",
        "  is `1.*`).",
        "- `sd1-inpaint/model`: a `StableDiffusionInpaintPipeline` folder: sd1's tokenizer, text",
        "  encoder, VAE and scheduler files (byte-identical to sd1's) and a UNet with sd1's config but",
        "  `in_channels` 9 (4 latent + 1 mask + 4 masked-image latent, as SD 1.5 inpainting), out 4.",
        "- `sd1-lcm/model`: a `LatentConsistencyModelPipeline` folder: sd1's tokenizer, text encoder",
        "  and VAE files (byte-identical to sd1's), an `LCMScheduler` config, and a UNet with sd1's",
        f"  config plus `time_cond_proj_dim` {LCM_COND_DIM} (LCM-distilled SD 1.5 style, e.g. 256 in",
        "  LCM_Dreamshaper_v7): `time_embedding.cond_proj`, Linear(32 → 32, no bias), maps the guidance",
        "  embedding and is added to the sinusoidal timestep embedding before `time_embedding.linear_1`.",
        "- Weights: numpy PCG64 seeded with `[seed, k]` (k: sd1 1, sd2 2, TAESD 3, the VAE all",
        "  share 4, the sd1-inpaint UNet 5, the sd1-lcm UNet 6 (their text encoders are sd1's, from",
        "  stream 1); inputs use 11, 12, 13, 14 for sd1-inpaint and 15 for sd1-lcm); linear/conv weights uniform with",
        "  variance 1/fan_in (× a gain on a few output convs, see `build_sd`/`build_taesd`), norm",
        "  weights 1±0.2, biases ±0.1, embeddings N(0, 0.5²); then rounded to float16. All golden",
        "  values are computed in float32 from the float16 files (reloaded and upcast), so an f32",
        "  conversion (`--type f32`) runs on exactly the same weights.",
        "- sd1 (SD 1.x-like): UNet `block_out_channels` (32, 64), `layers_per_block` 1, down",
        "  (CrossAttnDownBlock2D, DownBlock2D), up (UpBlock2D, CrossAttnUpBlock2D), middle block with",
        "  attention, 2 heads everywhere (`attention_head_dim=2`, a head count in diffusers), 1×1",
        "  conv `proj_in`/`proj_out`, GroupNorm 32, context 32; CLIP text (HF naming) hidden 32, 2",
        "  layers, 2 heads, MLP 64, quick_gelu, vocab 49408, 77 positions, pads with `<|endoftext|>`",
        "  (49407); epsilon prediction. `text_encoder/model.safetensors` uses the published SD",
        "  repositories' names (`text_model.*`, the transformers 4 layout): transformers 5 saves",
        "  them without that prefix, which `sdrs convert` rejects; transformers 5 loads both.",
        "- sd2 (SD 2.x-like): the same UNet with `use_linear_projection=True` and",
        "  `attention_head_dim=(2, 4)` (2 heads at 32 ch, 4 at 64 ch: constant head width 16, as SD 2's",
        "  [5, 10, 20, 20] keeps width 64); text encoder with exact `gelu` (OpenCLIP style; sdrs",
        "  converts it as `open_clip`), conditioning = last hidden state after the final norm (what",
        "  diffusers' SD 2 pipeline uses with its 23-layer encoder); tokenizer pads with `!` (id 0);",
        "  v-prediction.",
        "- VAE (both, the same weights, as SD 2 reuses SD 1's VAE): `AutoencoderKL` `block_out_channels` (32, 64), `layers_per_block` 1, 4 latent",
        "  channels, GroupNorm 32, downscale 2 (`pipe.vae_scale_factor == 2`), `scaling_factor` 0.18215.",
        f"- TAESD: `AutoencoderTiny` with width 16 at every level, blocks (1, 3, 3, 3) / (3, 3, 3, 1),",
        "  4 latent channels, ReLU, nearest ×2 upsampling: the SD TAESD architecture at width 16",
        "  instead of 64. Downscale 8 (64×64 image ↔ 8×8 latent).",
        "",
        "Exact configs: `golden.json` → `configs` (and each folder's `config.json`).",
        "",
        "## Golden tensors",
        "",
        "Each `golden.safetensors` holds float32 tensors (ids int32, pixels uint8); its metadata key",
        "`sdrs.golden` holds the JSON also written beside it as `golden.json`: prompts, timesteps,",
        "scheduler configs, per-step timesteps and sigmas, value statistics, the largest activation",
        "seen, and `precision_f32_vs_f64` (max |f32 − f64| of the same computation: a floor for",
        "comparison tolerances).",
        "",
        "Prompts (`tokens.ids` rows, `text.hidden` rows):",
        "",
    ]
    lines += [f"{i}. `{json.dumps(p)}`" for i, p in enumerate(PROMPTS)]
    lines += [
        "",
        "The UNet check and the trajectories use prompt 0 with negative prompt `\"\"` (prompt 1).",
        "",
        "### sd1/golden.safetensors and sd2/golden.safetensors",
        "",
        "| key | dtype | shape |",
        "|---|---|---|",
    ]
    lines += golden_table(out / "sd1" / "golden.safetensors")
    lines += [
        "",
        "- `tokens.ids`: the pipeline tokenizer (`padding=max_length`, 77, truncation), one row per prompt.",
        "- `text.hidden`: the conditioning the pipeline uses (`encode_prompt` = `last_hidden_state`).",
        "- `unet.x`, `unet.context` (= `text.hidden[[1, 0]]`: [uncond, cond]): UNet inputs;",
        "  `unet.t500.out`, `unet.t999.out`: `unet(x, t, encoder_hidden_states=context).sample`.",
        "- `vae.decode.z` → `vae.decode.out`: `vae.decode(z)` of a raw (unscaled) latent.",
        "  `vae.encode.x` (uniform in [-1, 1]) → `vae.encode.mean`, `vae.encode.logvar`: the",
        "  posterior (`latent_dist`); `logvar` is after diffusers' clamp to [-30, 20].",
        "- `traj.init_latent`: the fixed initial noise passed as `latents=` (the pipeline multiplies",
        "  it by `init_noise_sigma`, recorded in `golden.json`).",
        "- `traj.{euler,ddim}.*` (4 steps, guidance 7.5, 16×16 image, 8×8 latent):",
        "  `unet_in` [step, 2, ...] the UNet's input (after `scale_model_input`; batch [uncond, cond]),",
        "  `unet_out` [step, 2, ...] its raw output, `latents` [step, ...] the latent after each",
        "  scheduler step, `final` = `latents[-1]`, `image` = `vae.decode(final / 0.18215)` before",
        "  the pipeline's denormalise/clamp, `image_u8` [1, 16, 16, 3] HWC = the pipeline's PIL",
        "  output (`round(clamp(image/2 + 0.5, 0, 1) · 255)`), `timesteps` per step, `sigmas` (Euler:",
        "  the scheduler's 5 sigmas, last 0; DDIM: sqrt((1−ᾱ_t)/ᾱ_t) at each step's timestep).",
        f"  Euler: `timestep_spacing` \"{sd1['euler']['timestep_spacing']}\" → timesteps "
        f"{metas['sd1']['trajectories']['euler']['timesteps']};",
        f"  DDIM: \"{sd1['ddim']['timestep_spacing']}\", `steps_offset` 1, eta 0, `set_alpha_to_one` false →"
        f" timesteps {metas['sd1']['trajectories']['ddim']['timesteps']}.",
        "  Schedule: scaled_linear β 0.00085 … 0.012, 1000 steps; prediction epsilon (sd1),",
        "  v_prediction (sd2).",
        "",
        "### sd1-inpaint/golden.safetensors",
        "",
        "| key | dtype | shape |",
        "|---|---|---|",
    ]
    lines += golden_table(out / "sd1-inpaint" / "golden.safetensors")
    inp = metas["sd1-inpaint"]["trajectories"]["euler"]
    lines += [
        "",
        "- `unet.x` (all 9 channels random), `unet.context` ([uncond `\"\"`, cond prompt 0]; the same",
        "  embeddings as sd1's) → `unet.t500.out` (4 channels).",
        "- `cond.mask` = ones, `cond.masked_image_latents` = `vae.encode(zeros(1, 3, 16, 16)).latent_dist.mean",
        "  · 0.18215`: the conditioning of an inpainting model for plain txt2img (a neutral grey image,",
        "  0 in [-1, 1], fully masked; A1111's txt2img conditioning for inpainting models).",
        "- `traj.init_latent`, `traj.euler.*`: as in sd1, but `StableDiffusionInpaintPipeline` with",
        "  `strength=1.0`, `image` = grey (passed as 0.5 in [0, 1]), `mask_image` = ones (16×16),",
        "  `masked_image_latents=cond.masked_image_latents`, `latents=traj.init_latent` (the pipeline",
        f"  multiplies it by `init_noise_sigma` = {inp['init_noise_sigma']:.6g}). `unet_in` [step, 2, 9, 8, 8]:",
        "  channels 0–3 = `scale_model_input(latents)`, 4 = `cond.mask`, 5–8 = `cond.masked_image_latents`",
        "  (mask and masked latents not scaled by `scale_model_input`, the same in both CFG halves;",
        "  checked by the script). Euler, the same scheduler config as sd1's → timesteps",
        f"  {inp['timesteps']}.",
        "- Precision: the grey image is a degenerate VAE input (the first encoder GroupNorm sees exactly",
        "  constant channels, the next one variances ~1e-5, near its eps 1e-6), so rounding is amplified:",
        "  `cond.masked_image_latents` differs from float64 by "
        f"{metas['sd1-inpaint']['precision_f32_vs_f64']['cond.masked_image_latents']:.3g} (sd1's random-image",
        "  `vae.encode.mean`, unscaled: "
        f"{metas['sd1']['precision_f32_vs_f64']['vae.encode.mean']:.3g}). Compare it with a looser tolerance;",
        "  the UNet and trajectory goldens take it as a given input.",
        "",
    ]
    pl = metas[PIPELINES]
    runs = pl["runs"]
    rnd = pl["randn"]

    def sched_line(name: str) -> str:
        r = runs[name]
        keep = {k: v for k, v in r["config"].items() if k not in SD_SCHEDULE and k not in (
            "clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value", "thresholding",
            "rescale_betas_zero_snr", "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas",
            "use_flow_sigmas", "use_lu_lambdas", "variance_type", "flow_shift", "time_shift_type",
            "lambda_min_clipped")}
        return f"  `{r['scheduler']}` {json.dumps(keep, sort_keys=True)}"

    def prec(r: dict) -> str:
        p = r["precision_f32_vs_f64"]
        return (f"f32 vs f64: final {p['final']:.3g}, image {p['image']:.3g}, "
                f"{p['image_u8_values_differing']} of 768 `image_u8` values differ")

    lines += [
        "### sd1/pipelines.safetensors (end to end, noise from a torch generator)",
        "",
        "Whole pipeline calls on `sd1/model` (the float16 files loaded in float32), noise drawn by the",
        f"pipelines themselves: `generator=torch.Generator(\"cpu\").manual_seed({E2E_SEED})` (a fresh one per",
        f"call), prompt 0, negative prompt `\"\"`, {HEIGHT}×{WIDTH} image (8×8 latent), `output_type=\"pil\"` for",
        "`image_u8` and `\"latent\"` (same seed) for `final`. Metadata: `sd1/pipelines.json`.",
        "",
        "| key | dtype | shape |",
        "|---|---|---|",
    ]
    lines += golden_table(out / "sd1" / "pipelines.safetensors")
    lines += [
        "",
        "Per run `<key>`:",
        "",
        "- `<key>.init_latent`: the pipeline's first draw, `torch.randn((1, 4, 8, 8), generator)`",
        "  (float32, before the pipeline multiplies it by `init_noise_sigma`); the same tensor in every",
        "  run (same seed, same shape). `<key>.step_noise` [n, 1, 4, 8, 8] (Euler a: one per step; LCM:",
        "  every step but the last): the scheduler's later draws, the next `torch.randn((1, 4, 8, 8))`",
        "  calls on the same generator (checked: all draws are one generator's successive calls).",
        "- `<key>.latents` [steps, 1, 4, 8, 8]: the latent after each scheduler step (for LCM the",
        "  re-noised `prev_sample`; `<key>.denoised` the step's denoised prediction); `<key>.final` =",
        "  `latents[-1]` = the `output_type=\"latent\"` result; `<key>.image` = `vae.decode(final / 0.18215)`",
        "  before postprocessing; `<key>.image_u8` [1, 16, 16, 3] HWC = the pipeline's PIL output.",
        "- `<key>.timesteps`: the UNet's timestep per step; `<key>.sigmas` (DPM++, Euler a): the",
        "  scheduler's sigmas, last 0.",
        "- The script also checks that the first UNet input is `scale_model_input(init_latent ·",
        "  init_noise_sigma)` and that decoding `final` gives the PIL pixels. Precision: each call is",
        "  repeated with float64 modules and the same noise; `image_u8` values that flip there sit on a",
        "  rounding edge, so compare `image_u8` within ±1 (or `image` with a tolerance).",
        "",
        f"- `ddim10`: `{runs['ddim10']['pipeline']}`, 10 steps, guidance {runs['ddim10']['guidance_scale']}"
        f" (CFG, batch [uncond, cond]), eta 0;",
        sched_line("ddim10") + f" → timesteps {[int(t) for t in runs['ddim10']['timesteps']]}. {prec(runs['ddim10'])}.",
        f"- `dpmpp2m_karras8`: `{runs['dpmpp2m_karras8']['pipeline']}`, 8 steps, guidance "
        f"{runs['dpmpp2m_karras8']['guidance_scale']} (CFG);",
        sched_line("dpmpp2m_karras8") + ". Karras sigmas (ρ 7, σ_max = σ(999) "
        f"{runs['dpmpp2m_karras8']['karras']['sigma_max']:.6g}, σ_min = σ(0) "
        f"{runs['dpmpp2m_karras8']['karras']['sigma_min']:.6g}), then 0;",
        "  the UNet's timesteps are diffusers' `_sigma_to_t` of each sigma (interpolated in log σ) rounded",
        f"  to integers: {[int(t) for t in runs['dpmpp2m_karras8']['timesteps']]} (unrounded in `pipelines.json`"
        " → `karras`), while the solver",
        "  steps with the unrounded float32 sigmas `dpmpp2m_karras8.sigmas`. 2nd order (midpoint) from the",
        "  second step, first order at the last (`lower_order_final`, final sigma 0). "
        f"{prec(runs['dpmpp2m_karras8'])}.",
        f"- `lcm4`: `LatentConsistencyModelPipeline` refuses sd1's UNet (no `time_cond_proj_dim`: it",
        "  embeds the guidance scale unconditionally and fails with "
        f"`{runs['lcm4']['latent_consistency_pipeline'].split(': ', 1)[1].split(';')[0]}`), so",
        f"  `{runs['lcm4']['pipeline']}` runs the LCM scheduler, guidance {runs['lcm4']['guidance_scale']}: no",
        "  classifier-free guidance (UNet batch 1, prompt only), like the LCM pipeline; 4 steps;",
        sched_line("lcm4") + f" → timesteps {[int(t) for t in runs['lcm4']['timesteps']]}"
        " (`original_inference_steps` 50: of 999, 979, …, 19 the",
        "  entries floor(linspace(0, 50, 4, endpoint=False)) = 0, 12, 25, 37). LCM step: c_skip, c_out",
        "  with `timestep_scaling` 10 (listed in `pipelines.json`), denoised = c_skip·x + c_out·x0_pred,",
        "  then re-noised with the next `step_noise` draw to the next timestep's ᾱ except at the last step.",
        f"  {prec(runs['lcm4'])}.",
        f"- `euler_a8`: `{runs['euler_a8']['pipeline']}`, 8 steps, guidance {runs['euler_a8']['guidance_scale']}"
        " (CFG);",
        sched_line("euler_a8") + f" → timesteps {[round(t, 4) for t in runs['euler_a8']['timesteps']]},",
        f"  `init_noise_sigma` = σ_max = {runs['euler_a8']['init_noise_sigma']:.6g}. One `step_noise` draw"
        " per step (also the last, where σ_up = 0).",
        f"  {prec(runs['euler_a8'])}.",
        "",
        f"torch CPU capability when these were made: `{rnd['cpu_capability']}` (`torch.backends.cpu.get_cpu_capability()`),",
        f"so the noise is torch's {'AVX2' if rnd['kernel'] == 'avx2' else 'generic'} float32 randn kernel. Under the other"
        f" kernel (`ATEN_CPU_CAPABILITY=default`) {rnd['generic_kernel_vs_this']['values_differing']} of the"
        f" {rnd['generic_kernel_vs_this']['of']} values of",
        f"the first {rnd['draws_compared']} draws differ (by up to {rnd['generic_kernel_vs_this']['max_abs_diff']:.3g}):"
        " a bit-exact comparison must use the kernel named here.",
        "",
    ]
    lcm = metas["sd1-lcm"]
    lr = lcm["runs"]["lcm4"]
    lines += [
        "### sd1-lcm/golden.safetensors",
        "",
        "| key | dtype | shape |",
        "|---|---|---|",
    ]
    lines += golden_table(out / "sd1-lcm" / "golden.safetensors")
    lines += [
        "",
        f"- `unet.w_embedding` [1, {LCM_COND_DIM}]: the guidance embedding `LatentConsistencyModelPipeline` computes",
        f"  for `guidance_scale` {LCM_GUIDANCE}: w = guidance_scale − 1 = {LCM_GUIDANCE - 1}, x = 1000·w, half = 16,",
        "  f_i = exp(−i·ln(10000)/(half − 1)) for i < half, embedding = [sin(x·f_i)…, cos(x·f_i)…] (sin",
        "  half first), all in float32 (`get_guidance_scale_embedding`). The arguments reach 7500 rad, so",
        "  float32 rounding of x·f_i matters: the float64 formula differs by "
        f"{lcm['precision_f32_vs_f64']['unet.w_embedding']:.3g}; reproduce the float32 operations.",
        "- `unet.x` [1, 4, 8, 8] (numpy stream 15), `unet.context` [1, 77, 32] (prompt 0; equal to sd1's",
        "  `unet.context[1]`) → `unet.t500.out` = `unet(x, 500, encoder_hidden_states=context,",
        f"  timestep_cond=w_embedding).sample` (the embedding changes it by up to {lcm['unet_w_effect']:.3g}).",
        f"- `lcm4.*`: `{lr['pipeline']}`, {lr['steps']} steps, `guidance_scale` {lr['guidance_scale']}, generator seed"
        f" {E2E_SEED}, prompt 0,",
        f"  {HEIGHT}×{WIDTH}; keys as in `sd1/pipelines.safetensors`. No classifier-free guidance (the pipeline's",
        "  `do_classifier_free_guidance` is always false; UNet batch 1, prompt only, no negative prompt):",
        "  the guidance scale only enters through `timestep_cond = unet.w_embedding` (float32, the latents'",
        f"  dtype) at every step. {lr['scheduler']} (the folder's) → timesteps",
        f"  {[int(t) for t in lr['timesteps']]}; {prec(lr)}. Its `init_latent` equals sd1's (same seed and shape).",
        "",
        "### taesd/golden.safetensors",
        "",
        "| key | dtype | shape |",
        "|---|---|---|",
    ]
    lines += golden_table(out / "taesd" / "golden.safetensors")
    lines += [
        "",
        "- `taesd.decode.z` → `taesd.decode.out`: the original TAESD decoder's output (clamp",
        "  `tanh(z/3)·3`, then the network; ≈ [0, 1] image space); `taesd.decode.out_pm1` is",
        "  diffusers' `AutoencoderTiny.decode` (= 2·out − 1).",
        "- `taesd.encode.x` ([-1, 1]) / `taesd.encode.x01` (= (x + 1)/2, what the original TAESD",
        "  encoder takes) → `taesd.encode.z`. TAESD latents are in the UNet's scaled latent space",
        "  (no 0.18215 factor).",
        "",
        "## Files",
        "",
        "| file | bytes |",
        "|---|---|",
    ]
    lines += describe_files(out)
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "README.md"]
    total = sum(p.stat().st_size for p in files)
    unique = sum(len(b) for b in {p.read_bytes() for p in files})
    lines += ["", f"Total {total / 1e6:.1f} MB (before this README); {unique / 1e6:.1f} MB of distinct file contents",
              "(sd1-inpaint and sd1-lcm share most of their files with sd1, sd2 its VAE and tokenizer vocabulary; git stores",
              "identical files once).", ""]
    (out / "README.md").write_text("\n".join(lines))


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "ref")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", choices=MODELS + (PIPELINES,), default=None,
                    help="generate only this fixture (repeatable; sd1-pipelines: sd1/pipelines.*, runs on the "
                         "saved sd1/model); the others stay as they are, the README is rewritten from their "
                         "golden.json / pipelines.json")
    ap.add_argument("--clip-dir", type=Path, default=None,
                    help="folder with CLIP ViT-L/14 vocab.json + merges.txt (default: $SDRS_CLIP_HF, "
                         "/work/shared/data/clip/hf, or an existing fixture's tokenizer)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)  # nothing should draw from it; set for safety anyway
    torch.use_deterministic_algorithms(True)
    out = args.out.resolve()
    clip_dir = args.clip_dir
    if clip_dir is None:
        for c in (os.environ.get("SDRS_CLIP_HF"), "/work/shared/data/clip/hf", out / "sd1" / "model" / "tokenizer"):
            if c and (Path(c) / "vocab.json").is_file() and (Path(c) / "merges.txt").is_file():
                clip_dir = Path(c)
                break
    if clip_dir is None:
        raise SystemExit("make_fixtures: no CLIP vocab.json/merges.txt found; pass --clip-dir")
    if clip_dir.resolve().is_relative_to(out):  # regenerating in place: copy it away first
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "sdrs-clip-tokenizer"
        tmp.mkdir(exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copyfile(clip_dir / f, tmp / f)
        clip_dir = tmp

    kinds = [k for k in MODELS + (PIPELINES,) if args.only is None or k in args.only]
    start = time.time()
    metas = {}
    for kind in ("sd1", "sd2", "sd1-inpaint", "sd1-lcm"):
        if kind not in kinds:
            continue
        d = out / kind
        d.mkdir(parents=True, exist_ok=True)
        built = build_sd(kind, args.seed, d / "model", clip_dir)
        if kind == "sd1-lcm":
            shared = check_shared_with_sd1(out, args.seed, kind)
            g, meta = run_lcm(kind, args.seed, d / "model", built)
            if shared:
                sd1_ctx = load_file(str(out / "sd1" / "golden.safetensors"))["unet.context"]
                assert torch.equal(g["unet.context"], sd1_ctx[1:2]), "sd1-lcm's unet.context differs from sd1's cond row"
        elif kind == "sd1-inpaint":
            if check_shared_with_sd1(out, args.seed, kind):
                g, meta = run_inpaint(kind, args.seed, d / "model", built)
                sd1_ctx = load_file(str(out / "sd1" / "golden.safetensors"))["unet.context"]
                assert torch.equal(g["unet.context"], sd1_ctx), "sd1-inpaint's unet.context differs from sd1's"
            else:
                g, meta = run_inpaint(kind, args.seed, d / "model", built)
        else:
            g, meta = run_sd(kind, args.seed, d / "model", built)
        meta["seed"] = args.seed
        meta["versions"] = versions()
        save_golden(d / "golden.safetensors", g, meta)
        metas[kind] = meta
        print(f"{kind}: {len(g)} golden tensors, max activation {meta['activation_check']}", file=sys.stderr)
    if "taesd" in kinds:
        d = out / "taesd"
        d.mkdir(parents=True, exist_ok=True)
        build_taesd(args.seed, d)
        g, meta = run_taesd(args.seed, d)
        meta["seed"] = args.seed
        meta["versions"] = versions()
        save_golden(d / "golden.safetensors", g, meta)
        metas["taesd"] = meta
    if PIPELINES in kinds:
        d = out / "sd1"
        f = d / "golden.json"
        if not f.is_file() or json.loads(f.read_text()).get("seed") != args.seed:
            raise SystemExit(f"make_fixtures: {PIPELINES} runs on sd1/model of seed {args.seed}; generate sd1 first")
        g, meta = run_pipelines("sd1", args.seed, d / "model")
        meta["seed"] = args.seed
        meta["versions"] = versions()
        save_golden(d / "pipelines.safetensors", g, meta)
        metas[PIPELINES] = meta
        print(f"{PIPELINES}: {len(g)} golden tensors, torch CPU capability {meta['randn']['cpu_capability']}",
              file=sys.stderr)
    else:
        f = out / "sd1" / "pipelines.json"
        if not f.is_file():
            raise SystemExit(f"make_fixtures: {f} missing; generate {PIPELINES} too")
        metas[PIPELINES] = json.loads(f.read_text())
        if metas[PIPELINES].get("seed") != args.seed:
            raise SystemExit(f"make_fixtures: {f} was made with seed {metas[PIPELINES].get('seed')}, not {args.seed}")
    for kind in MODELS:  # the fixtures not regenerated: the README reads their golden.json
        if kind not in metas:
            f = out / kind / "golden.json"
            if not f.is_file():
                raise SystemExit(f"make_fixtures: {f} missing; generate {kind} too")
            metas[kind] = json.loads(f.read_text())
            if metas[kind].get("seed") != args.seed:
                raise SystemExit(f"make_fixtures: {f} was made with seed {metas[kind].get('seed')}, not {args.seed}")
    seconds = time.time() - start
    write_readme(out, args.seed, seconds, metas)
    print(f"make_fixtures: wrote {out} in {seconds:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
