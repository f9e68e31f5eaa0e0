#!/usr/bin/env python3
"""Golden fixtures of a score model of the variance-exploding SDE (NCSN++, Song et al. 2021) and
of its predictor-corrector sampler, from diffusers.

Builds a tiny ScoreSdeVePipeline with seeded random weights rounded to float16 and saves it as a
diffusers folder (`score-sde/model`); records what diffusers computes from it in float32 on the CPU:

  * UNet2DModel as google/ncsnpp-* are built: Fourier time features (scale 16: the weights are
    N(0, 16^2)), SkipDownBlock2D / AttnSkipDownBlock2D / AttnSkipUpBlock2D / SkipUpBlock2D levels
    (FIR resampling ResNets, the input pyramid, the RGB output sum, residuals over sqrt 2),
    norm_num_groups null (min(C/4, 32) groups), a middle block scaled by sqrt 2; its output is
    divided by sigma. Goldens: the UNet on a numpy-drawn input at sigma = 50, 1, 0.01.
  * ScoreSdeVeScheduler (sigma 0.01..50, snr 0.16, one corrector step), a batch of 2 for 10 steps
    seeded with torch.Generator("cpu").manual_seed(7), written as the loop ScoreSdeVePipeline runs
    and checked to give exactly what the pipeline returns (output_type "np"): the grids, every noise
    draw, the sample and the predictor's mean after every step, the final image.

    /work/venv-ref/bin/python tools/reference/score_sde_fixtures.py --out tests/fixtures/ref --seed 0
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (weights, randn, goldens, noise recording, versions)

# Three levels at 16, 8, 4 pixels; attention on the deepest (AttnSkipUpBlock2D's GroupNorm takes
# min(in + skip // 4, 32) groups, so its inputs must be a multiple of 32 channels).
NCSNPP = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
              down_block_types=("SkipDownBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D"),
              up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D", "SkipUpBlock2D"),
              time_embedding_type="fourier", norm_eps=1e-6, mid_block_scale_factor=math.sqrt(2.0),
              norm_num_groups=None, attention_head_dim=8, act_fn="silu")
SDE = dict(num_train_timesteps=2000, snr=0.16, sigma_min=0.01, sigma_max=50.0, sampling_eps=1e-5, correct_steps=1)
SIGMAS = (50.0, 1.0, 0.01)
BATCH, STEPS = 2, 10
STREAM_WEIGHTS, STREAM_INPUTS = 45, 55  # numpy PCG64 streams [seed, k] (other fixtures use others)


def build(seed: int, model_dir: Path) -> dict:
    unet = UNet2DModel(**NCSNPP)
    mf.init_weights(unet, np.random.default_rng([seed, STREAM_WEIGHTS]), {"conv_out": 0.5})
    built = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    pipe = ScoreSdeVePipeline(unet=copy.deepcopy(unet).half(), scheduler=ScoreSdeVeScheduler(**SDE))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    return built


def load(model_dir: Path, built: dict) -> ScoreSdeVePipeline:
    pipe = ScoreSdeVePipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    mf.assert_f16_exact(pipe.unet, "unet")
    sd = pipe.unet.state_dict()
    if sd.keys() != built.keys() or not all(torch.equal(sd[k], built[k]) for k in built):
        raise SystemExit(f"score_sde_fixtures: {model_dir} does not load back the weights it was built with")
    return pipe


def sample(pipe: ScoreSdeVePipeline) -> dict:
    """ScoreSdeVePipeline.__call__'s loop, recording each step."""
    unet, sched = pipe.unet, pipe.scheduler
    s = unet.config.sample_size
    shape = (BATCH, 3, s, s)
    gen = mf.seeded()
    traj, means, outs = [], [], []
    first = randn_tensor(shape, generator=gen)  # the pipeline's own draw (not a patched module)
    with mf.RandnRecorder(gen) as rec:
        x = first * sched.init_noise_sigma
        sched.set_timesteps(STEPS)
        sched.set_sigmas(STEPS)
        for i, t in enumerate(sched.timesteps):
            sigma_t = sched.sigmas[i] * torch.ones(shape[0])
            for _ in range(sched.config.correct_steps):
                out = unet(x, sigma_t).sample
                outs.append(out.clone())
                x = sched.step_correct(out, x, generator=gen).prev_sample
            out = unet(x, sigma_t).sample
            outs.append(out.clone())
            res = sched.step_pred(out, t, x, generator=gen)
            x, mean = res.prev_sample, res.prev_sample_mean
            traj.append(x.clone())
            means.append(mean.clone())
    levels = [int(t * (len(sched.timesteps) - 1)) for t in sched.timesteps]
    return dict(traj=traj, means=means, outs=outs, draws=[first] + [d for _, d in rec.draws], sched=sched,
                levels=levels, image=mean.clamp(0, 1).permute(0, 2, 3, 1))


def run(seed: int, model_dir: Path, built: dict) -> tuple[dict, dict]:
    pipe = load(model_dir, built)
    unet = pipe.unet
    rng = np.random.default_rng([seed, STREAM_INPUTS])
    g: dict[str, torch.Tensor] = {}
    meta: dict = {"fixture": "score-sde", "unet_config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
                  "tensors": {}}
    d = meta["tensors"]
    with torch.no_grad():
        x = mf.randn(rng, 1, 3, NCSNPP["sample_size"], NCSNPP["sample_size"])
        g["unet.sample"] = x
        d["unet.sample"] = "numpy PCG64 standard normal (stream [seed, 55])"
        for s in SIGMAS:
            g[f"unet.out.s{s:g}"] = mf.f32(unet(x, torch.tensor([s])).sample)
        d["unet.out.s{S}"] = "unet(unet.sample, torch.tensor([S]) (float32 sigma)).sample: the score, already / sigma"
        g["unet.time_features.s5"] = mf.f32(unet.time_proj(torch.tensor([5.0])))
        d["unet.time_features.s5"] = "unet.time_proj(torch.tensor([5.0])): [sin, cos] of log(5) * w * 2 pi"

        res = sample(pipe)
        sched = res["sched"]
        gen = mf.seeded()
        with mf.RandnRecorder(gen) as rec:
            images = ScoreSdeVePipeline(unet=unet, scheduler=ScoreSdeVeScheduler(**SDE))(
                batch_size=BATCH, num_inference_steps=STEPS, generator=gen, output_type="np").images
        got = [t for _, t in rec.draws]
        assert len(got) == len(res["draws"]) and all(torch.equal(a, b) for a, b in zip(got, res["draws"]))
        assert np.array_equal(images, res["image"].numpy()), "the pipeline's image differs from the loop's"
        ref = mf.seeded()
        assert all(torch.equal(t, torch.randn(t.shape, generator=ref)) for t in res["draws"])

    key = f"pc{STEPS}"
    g[f"{key}.timesteps"] = mf.f32(sched.timesteps)
    g[f"{key}.sigmas"] = mf.f32(sched.sigmas)
    g[f"{key}.discrete_sigmas"] = mf.f32(sched.discrete_sigmas)
    g[f"{key}.noise"] = torch.stack(res["draws"])
    g[f"{key}.traj"] = torch.stack(res["traj"])
    g[f"{key}.mean"] = torch.stack(res["means"])
    g[f"{key}.unet_out"] = torch.stack(res["outs"])
    g[f"{key}.image"] = mf.f32(res["image"])
    d.update({
        f"{key}.timesteps": "scheduler.timesteps: torch.linspace(1, sampling_eps, steps) (float32)",
        f"{key}.sigmas": "scheduler.sigmas: sigma_min * (sigma_max / sigma_min) ** t, what the UNet is told",
        f"{key}.discrete_sigmas": "exp(linspace(log sigma_min, log sigma_max, steps)): the predictor's levels",
        f"{key}.noise": "every randn draw in order: the initial x (before * sigma_max), then per step one per "
                        "corrector move and one for the predictor",
        f"{key}.traj": "x after each step (prev_sample of step_pred)",
        f"{key}.mean": "prev_sample_mean of each step_pred; the last one, clamped, is the image",
        f"{key}.unet_out": "every UNet output (corrector, predictor, per step)",
        f"{key}.image": "ScoreSdeVePipeline(batch_size=2, num_inference_steps=10, generator, output_type='np').images",
    })
    meta["run"] = {"key": key, "scheduler": "ScoreSdeVeScheduler", "config": SDE, "steps": STEPS, "batch": BATCH,
                   "predictor_level_index": res["levels"], "noise_draws": len(res["draws"]),
                   "generator": "torch.Generator('cpu').manual_seed(7)"}
    return g, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=mf.REPO / "tests" / "fixtures" / "ref")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)  # nothing should draw from it
    torch.use_deterministic_algorithms(True)
    start = time.time()
    out = args.out.resolve() / "score-sde"
    out.mkdir(parents=True, exist_ok=True)
    built = build(args.seed, out / "model")
    g, meta = run(args.seed, out / "model", built)
    meta.update(seed=args.seed, versions=mf.versions(), randn=mf.randn_info(1))
    mf.save_golden(out / "golden.safetensors", g, meta)
    rows = [f"| `{k}` | {list(v.shape)} | {meta['tensors'].get(k, meta['tensors'].get('unet.out.s{S}', ''))} |"
            for k, v in sorted(g.items())]
    (out / "README.md").write_text(f"""# Score SDE (VE) fixture (diffusers)

Written by `tools/reference/score_sde_fixtures.py` (its docstring has the details); do not edit.
Versions: {json.dumps(meta['versions'])}. The sampling noise depends on torch's randn kernel
(`randn` in golden.json).

    /work/venv-ref/bin/python tools/reference/score_sde_fixtures.py --out tests/fixtures/ref --seed {args.seed}

`model/`: a `ScoreSdeVePipeline` folder, float16 weights (numpy PCG64 [seed, 45], make_fixtures.py's
`init_weights`, the Fourier weights N(0, 16²), gain 0.5 on `conv_out`). UNet2DModel 3×16×16, channels
(16, 32, 32), 1 resnet per level, NCSN++ skip blocks, attention (4 heads) on the deepest level and in the
middle, GroupNorm min(C/4, 32), middle scale √2. ScoreSdeVeScheduler: {json.dumps(SDE)}.

| key | shape | what |
|---|---|---|
""" + "\n".join(rows) + "\n")
    print(f"score_sde_fixtures: wrote {out} in {time.time() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
