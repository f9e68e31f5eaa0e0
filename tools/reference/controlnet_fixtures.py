#!/usr/bin/env python3
"""Golden fixtures for ControlNets, from diffusers' ControlNetModel and
StableDiffusionControlNetPipeline.

Builds two tiny ControlNets with seeded random weights rounded to float16, each the
shape of a tiny reference UNet's encoder (`ControlNetModel.from_unet`): `sd1` for
tests/fixtures/ref/sd1/model and `sdxl` for tests/fixtures/ref/sdxl/model. The zero
convolutions get random weights too (trained ControlNets' are not zero), or the
residuals would prove nothing. Both are saved as diffusers folders; the goldens,
computed in float32 on the CPU from the reloaded folders, are:

  - `{sd1,sdxl}.*`: one ControlNet evaluation on fixed inputs (latent, timestep, text,
    conditioning image; SDXL's added `y` input), every residual, and the UNet's output
    with the residuals added; `sd1.guess.*`: the residuals in guess mode at scale 0.7.
  - `pipe.*`: StableDiffusionControlNetPipeline on sd1 (Euler, 4 steps, guidance 7.5,
    16x16, a fixed initial latent) with the control image `pipe.hint_u8`: at scale 1
    (`pipe.plain.image_u8`), and in guess mode at scale 0.8 acting on the first half of
    the steps only (`pipe.guess.image_u8`).

Inputs come from numpy's PCG64 (seed, stream 40), so the files are a pure function of
the seed and the versions.

    /work/venv-ref/bin/python tools/reference/controlnet_fixtures.py --out tests/fixtures/ref
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (weights, randn, goldens, versions)

STREAM = 40
EMBEDDING = (8, 16)  # two levels: the tiny VAEs downscale by 2


def controlnet_for(unet: UNet2DConditionModel, rng: np.random.Generator, out: Path) -> ControlNetModel:
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING)
    mf.init_weights(cn, rng)
    if out.exists():
        shutil.rmtree(out)
    cn.half().save_pretrained(out, safe_serialization=True)
    loaded = ControlNetModel.from_pretrained(out, torch_dtype=torch.float32)
    mf.assert_f16_exact(loaded, out.name)
    loaded.eval()
    return loaded


def evaluate(cn, unet, rng, g: dict, key: str, added: dict | None) -> None:
    h = w = 8
    x = mf.randn(rng, 2, 4, h, w)
    t = torch.tensor(500.0)
    ctx = mf.randn(rng, 2, 5, unet.config.cross_attention_dim) * 0.5
    hint = torch.from_numpy(rng.uniform(0.0, 1.0, (2, 3, 2 * h, 2 * w)).astype(np.float32))
    kw = {"added_cond_kwargs": added} if added else {}
    down, mid = cn(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, conditioning_scale=1.0,
                   return_dict=False, **kw)
    g[f"{key}.x"], g[f"{key}.t"], g[f"{key}.context"], g[f"{key}.hint"] = x, t.reshape(1), ctx, hint
    for k, d in enumerate(down):
        g[f"{key}.down.{k}"] = mf.f32(d)
    g[f"{key}.mid"] = mf.f32(mid)
    out = unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
               mid_block_additional_residual=mid, **kw).sample
    g[f"{key}.unet_out"] = mf.f32(out)
    if added:
        # The label input both networks' `add_embedding` reads: pooled text, then the
        # sinusoidal embeddings of the six size/crop values.
        tid = unet.add_time_proj(added["time_ids"].flatten()).reshape(x.shape[0], -1)
        g[f"{key}.y"] = mf.f32(torch.cat([added["text_embeds"], tid], dim=-1))
    if key == "sd1":
        down, mid = cn(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, conditioning_scale=0.7,
                       guess_mode=True, return_dict=False)
        for k, d in enumerate(down):
            g[f"{key}.guess.down.{k}"] = mf.f32(d)
        g[f"{key}.guess.mid"] = mf.f32(mid)


def pipeline_runs(sd1: Path, cn: ControlNetModel, rng, g: dict) -> dict:
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        sd1, controlnet=cn, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # A blocky map: a bright square on dark, like an edge or mask map.
    hint = np.zeros((mf.HEIGHT, mf.WIDTH, 3), np.uint8)
    hint[4:12, 3:10] = 255
    hint[rng.uniform(size=hint.shape[:2]) < 0.1] = 128
    x_T = mf.randn(rng, 1, 4, 8, 8)
    g["pipe.init_latent"] = x_T
    g["pipe.hint_u8"] = torch.from_numpy(hint.copy())
    runs = {"plain": dict(controlnet_conditioning_scale=1.0),
            "guess": dict(controlnet_conditioning_scale=0.8, guess_mode=True, control_guidance_end=0.5)}
    for name, extra in runs.items():
        # The Euler config of the sd1 trajectories (tests/fixtures/ref/sd1).
        pipe.scheduler = EulerDiscreteScheduler(**mf.sd_configs("sd1")["euler"])
        img = pipe(mf.PROMPTS[mf.COND_PROMPT], image=Image.fromarray(hint), height=mf.HEIGHT, width=mf.WIDTH,
                   num_inference_steps=mf.STEPS, guidance_scale=mf.GUIDANCE, latents=x_T.clone(),
                   output_type="pil", **extra).images[0]
        g[f"pipe.{name}.image_u8"] = torch.from_numpy(np.asarray(img).copy())
    return {"prompt": mf.PROMPTS[mf.COND_PROMPT], "steps": mf.STEPS, "guidance": mf.GUIDANCE,
            "scheduler": mf.sd_configs("sd1")["euler"], "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/ref"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(0)
    dst = a.out / "controlnet"
    dst.mkdir(parents=True, exist_ok=True)
    g: dict[str, torch.Tensor] = {}
    meta: dict = {"versions": mf.versions(), "seed": a.seed, "embedding_channels": EMBEDDING}
    rng = np.random.default_rng([a.seed, STREAM])
    with torch.no_grad():
        sd1_unet = UNet2DConditionModel.from_pretrained(a.out / "sd1/model/unet", torch_dtype=torch.float32)
        cn1 = controlnet_for(sd1_unet, rng, dst / "sd1")
        evaluate(cn1, sd1_unet, rng, g, "sd1", None)
        xl_unet = UNet2DConditionModel.from_pretrained(a.out / "sdxl/model/unet", torch_dtype=torch.float32)
        cnxl = controlnet_for(xl_unet, rng, dst / "sdxl")
        pooled = xl_unet.config.projection_class_embeddings_input_dim - 6 * xl_unet.config.addition_time_embed_dim
        added = {"text_embeds": mf.randn(rng, 2, pooled) * 0.5,
                 "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)}
        evaluate(cnxl, xl_unet, rng, g, "sdxl", added)
        meta["pipeline"] = pipeline_runs(a.out / "sd1/model", cn1, rng, g)
    mf.save_golden(dst / "golden.safetensors", g, meta)
    (dst / "golden.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"wrote {dst}: {len(g)} tensors")


if __name__ == "__main__":
    main()
