#!/usr/bin/env python3
"""Golden fixtures of img2img and inpainting from diffusers' own pipelines.

Runs StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline on the tiny
models that make_fixtures.py saved (tests/fixtures/ref/sd1/model: a 4-channel UNet;
tests/fixtures/ref/sd1-inpaint/model: the 9-channel inpainting UNet), in float32 on the
CPU, with a real photo and a mask, every bit of noise drawn by the pipelines from
torch.Generator("cpu").manual_seed(7) (a fresh one per call): the posterior samples of
the VAE encodes, the initial noise and the ancestral noise. Writes
tests/fixtures/ref/workflows/: init.png (24x16 RGB, from shared/data/images/chelsea.png),
mask.png (24x16 greyscale, white = repaint), golden.safetensors and golden.json (for each
run: the final latents, the 8-bit image the pipeline returns, and the order in which
it drew its noise).

    /work/venv-ref/bin/python tools/reference/workflow_fixtures.py --out tests/fixtures/ref/workflows
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (configs, prompts, golden writer, RNG recorder)

WIDTH, HEIGHT = 24, 16  # not square, so a transposed axis shows; latent 12x8
PHOTO = mf.REPO.parent / "shared" / "data" / "images" / "chelsea.png"

# (key, pipeline, model, scheduler class, scheduler config key, steps, strength)
RUNS = [
    ("img2img_euler", "img2img", "sd1", EulerDiscreteScheduler, "euler", 8, 0.6),
    ("img2img_euler_a", "img2img", "sd1", EulerAncestralDiscreteScheduler, "euler_a", 10, 0.75),
    ("img2img_ddim", "img2img", "sd1", DDIMScheduler, "ddim", 10, 0.5),
    ("inpaint4_euler", "inpaint", "sd1", EulerDiscreteScheduler, "euler", 8, 1.0),
    ("inpaint4_euler_a", "inpaint", "sd1", EulerAncestralDiscreteScheduler, "euler_a", 10, 0.7),
    ("inpaint4_ddim", "inpaint", "sd1", DDIMScheduler, "ddim", 10, 0.8),
    ("inpaint9_euler", "inpaint", "sd1-inpaint", EulerDiscreteScheduler, "euler", 8, 1.0),
    ("inpaint9_ddim", "inpaint", "sd1-inpaint", DDIMScheduler, "ddim", 10, 0.6),
]


class Recorder(mf.RandnRecorder):
    """make_fixtures' recorder, also watching the VAE's posterior sampling."""

    def __enter__(self):
        import diffusers.utils.torch_utils as tu
        self.orig = tu.randn_tensor
        self.patched = [m for n, m in sorted(sys.modules.items())
                        if n.startswith(("diffusers.pipelines.", "diffusers.schedulers.", "diffusers.models."))
                        and m.__dict__.get("randn_tensor") is self.orig]
        for m in self.patched:
            m.randn_tensor = self._wrap(m.__name__.rsplit(".", 1)[-1])
        return self


def inputs(out: Path) -> tuple[Image.Image, Image.Image]:
    photo = Image.open(PHOTO).convert("RGB")
    # The cat's face: a 3:2 crop, downscaled.
    init = photo.crop((120, 40, 330, 180)).resize((WIDTH, HEIGHT), Image.LANCZOS)
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    # An ellipse off centre, so the latent-resolution mask is not a plain block.
    ImageDraw.Draw(mask).ellipse((7, 3, 19, 13), fill=255)
    init.save(out / "init.png")
    mask.save(out / "mask.png")
    # What the Rust side reads back: the files, not the objects.
    return Image.open(out / "init.png"), Image.open(out / "mask.png")


def run(key: str, kind: str, model: str, sched_cls, sched_key: str, steps: int, strength: float,
        init: Image.Image, mask: Image.Image, g: dict) -> dict:
    cfg = mf.sd_configs(model)
    base = mf.load_sd(model, mf.REPO / "tests/fixtures/ref" / model / "model", None)
    comps = {k: v for k, v in base.components.items()}
    cls = StableDiffusionImg2ImgPipeline if kind == "img2img" else StableDiffusionInpaintPipeline
    args = dict(prompt=mf.PROMPTS[mf.COND_PROMPT], negative_prompt="", image=init, strength=strength,
                num_inference_steps=steps, guidance_scale=mf.GUIDANCE)
    if kind == "inpaint":
        args.update(mask_image=mask, height=HEIGHT, width=WIDTH)
    results = {}
    for output_type in ("latent", "pil"):
        comps["scheduler"] = sched_cls(**cfg[sched_key])
        pipe = cls(**comps)
        pipe.set_progress_bar_config(disable=True)
        gen = mf.seeded()
        with Recorder(gen) as rec:
            results[output_type] = pipe(**args, generator=gen, output_type=output_type).images
        draws = [(n, tuple(t.shape)) for n, t in rec.draws]
        if output_type == "latent":
            first = draws
        assert draws == first, (draws, first)
    lat = results["latent"]
    assert lat.shape == (1, 4, HEIGHT // 2, WIDTH // 2), lat.shape
    u8 = np.stack([np.asarray(p) for p in results["pil"]])
    # The returned image is the decode of the returned latents (no overlay).
    image = base.vae.decode(lat / base.vae.config.scaling_factor, return_dict=False)[0]
    assert np.array_equal(mf.to_u8(base, image), u8), f"{key}: the pipeline's image is not its latents' decode"
    g[f"{key}.final"] = mf.f32(lat)
    g[f"{key}.image_u8"] = torch.from_numpy(u8)
    sch = sched_cls(**cfg[sched_key])
    sch.set_timesteps(steps)
    kept = min(int(steps * strength), steps)
    return {
        "pipeline": cls.__name__,
        "model": model,
        "unet_in_channels": base.unet.config.in_channels,
        "scheduler": sched_cls.__name__,
        "steps": steps,
        "strength": strength,
        "steps_run": kept,
        "timesteps_run": [float(t) for t in sch.timesteps[steps - kept:]],
        "guidance_scale": mf.GUIDANCE,
        "noise_draws_in_order": [f"{n} {list(s)}" for n, s in first],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=mf.REPO / "tests/fixtures/ref/workflows")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(0)  # nothing should draw from the global generator; fixed anyway
    init, mask = inputs(a.out)
    g: dict[str, torch.Tensor] = {}
    runs = {}
    with torch.no_grad():
        for key, kind, model, sched_cls, sched_key, steps, strength in RUNS:
            runs[key] = run(key, kind, model, sched_cls, sched_key, steps, strength, init, mask, g)
            print(f"{key}: {runs[key]['steps_run']} steps, draws {runs[key]['noise_draws_in_order']}", file=sys.stderr)
    meta = {
        "prompt": mf.PROMPTS[mf.COND_PROMPT],
        "negative_prompt": "",
        "width": WIDTH,
        "height": HEIGHT,
        "init": "init.png: shared/data/images/chelsea.png cropped to (120, 40, 330, 180), Lanczos-resized to 24x16",
        "mask": "mask.png: 24x16, white ellipse (7, 3, 19, 13) on black",
        "generator": f'torch.Generator("cpu").manual_seed({mf.E2E_SEED}), a fresh one per pipeline call',
        "dtype": "float32",
        "runs": runs,
        "randn": {"cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "versions": mf.versions(),
        "seconds": round(time.time() - t0, 1),
    }
    mf.save_golden(a.out / "golden.safetensors", g, meta)
    print(f"wrote {a.out} in {meta['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
