#!/usr/bin/env python3
"""SD 1.5's UNet (one guided step: batch 2) and VAE decoder, timed in diffusers on
PyTorch and in OpenVINO (the runtime FastSD CPU uses), on the CPU, for the README's
comparison with `sdrs bench`. Random weights: speed does not depend on them.

The modules are diffusers' own, converted with `openvino.convert_model` and compiled
for the CPU with `INFERENCE_PRECISION_HINT` f32 or bf16 (bf16 where the CPU has
AVX512-BF16 or AMX) and the thread count given.

    tools/reference/setup.sh && $VENV/bin/pip install openvino==2026.4.1
    $VENV/bin/python tools/reference/openvino_speed.py --threads 2 --sizes 256 512
"""
import argparse
import json
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel


class Decoder(torch.nn.Module):
    """The VAE's decode as one module: post_quant_conv and the decoder."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, return_dict=False)[0]


class Unet(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x, t, ctx):
        return self.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]


def best(fn, reps: int) -> tuple[float, float]:
    """(first call, best of the rest) in seconds."""
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times[0], min(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["bf16", "f32"])
    ap.add_argument("--torch", action="store_true", help="time PyTorch fp32 too")
    a = ap.parse_args()
    import openvino as ov

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    # SD 1.5: diffusers' UNet defaults with a 768-wide text context; the SD VAE.
    unet = Unet(UNet2DConditionModel(cross_attention_dim=768, sample_size=64).eval())
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    ).eval()
    dec = Decoder(vae)
    core = ov.Core()
    results = []
    for size in a.sizes:
        lat = size // 8
        x = torch.randn(2, 4, lat, lat)
        t = torch.tensor([500, 500])
        ctx = torch.randn(2, 77, 768)
        z = torch.randn(1, 4, lat, lat)
        jobs = {
            "unet_step": (unet, (x, t, ctx)),
            "vae_decode": (dec, (z,)),
        }
        for job, (module, inputs) in jobs.items():
            if a.torch:
                with torch.inference_mode():
                    first, s = best(lambda: module(*inputs), a.reps)
                results.append(dict(runtime="torch-f32", job=job, size=size, seconds=s, first=first))
                print(json.dumps(results[-1]), flush=True)
            with torch.no_grad():
                model = ov.convert_model(module, example_input=inputs)
            for prec in a.precisions:
                compiled = core.compile_model(
                    model,
                    "CPU",
                    {
                        "INFERENCE_PRECISION_HINT": prec,
                        "INFERENCE_NUM_THREADS": a.threads,
                        "PERFORMANCE_HINT": "LATENCY",
                    },
                )
                feed = [i.numpy() for i in inputs]
                req = compiled.create_infer_request()
                first, s = best(lambda: req.infer(feed), a.reps)
                results.append(
                    dict(runtime=f"openvino-{prec}", job=job, size=size, seconds=s, first=first)
                )
                print(json.dumps(results[-1]), flush=True)
                del compiled, req
            del model
    print(json.dumps(dict(openvino=ov.__version__, torch=torch.__version__, threads=a.threads)))


if __name__ == "__main__":
    main()
