#!/usr/bin/env python3
"""Seconds per guided step of SD 1.5's UNet at 512², without and with an SD 1.5
ControlNet, in diffusers on the CPU (float32, random weights: speed does not depend
on them), for the README's comparison with `sdrs bench --control-net`.

    /work/venv-ref/bin/python tools/reference/controlnet_speed.py --threads 2
"""
import argparse
import resource
import time

import torch
from diffusers import ControlNetModel, UNet2DConditionModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    # SD 1.5's UNet (diffusers' defaults with its 768-wide text) and its ControlNet.
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64).eval()
    cn = ControlNetModel.from_unet(unet).eval()
    x = torch.randn(2, 4, 64, 64)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, 768)
    hint = torch.rand(2, 3, 512, 512)
    with torch.inference_mode():
        for name, control in (("unet", False), ("unet+controlnet", True)):
            times = []
            for _ in range(a.reps + 1):
                t0 = time.perf_counter()
                kw = {}
                if control:
                    down, mid = cn(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
                    kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
                unet(x, t, encoder_hidden_states=ctx, **kw)
                times.append(time.perf_counter() - t0)
            print(f"{name}: {min(times[1:]):.2f} s per guided step (batch 2), first {times[0]:.2f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
