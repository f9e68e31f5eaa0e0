#!/usr/bin/env python3
"""Golden fixtures of the ESRGAN-family upscalers, from spandrel (PyPI; the architecture
library ComfyUI and chaiNNer load these files with, its RRDBNet and SRVGGNetCompact following
basicsr and Real-ESRGAN).

Writes tiny random networks in the published file layouts to tests/fixtures/ref/esrgan/:

  rrdb-x4.pth       Real-ESRGAN x4plus layout (float16 values, one block of 8 features): {"params_ema": basicsr RRDBNet state dict}
                    (conv_first, body.N.rdbK.convM, conv_body, conv_up1/2, conv_hr, conv_last)
  rrdb-x2.pth       Real-ESRGAN x2plus layout: the input pixel-unshuffled by 2 (conv_first takes 12)
  esrgan-old-x4.pth the original ESRGAN release's flat names (model.0, model.1.sub.N.RDBK.convM.0, ...)
  compact-x4.safetensors  SRVGGNetCompact (realesr-general-x4v3 layout): body.N convs and PReLUs

and golden.safetensors: a numpy-drawn image `input` [1, 3, 20, 24] in [0, 1] and each network's
raw output on it (`out.<file stem>`), computed by the model spandrel builds from the file.

    /work/venv-ref/bin/python tools/reference/esrgan_fixtures.py --out tests/fixtures/ref --seed 0
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import spandrel
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (goldens, versions)

F, G = 8, 32  # features of the tiny RRDBNets; spandrel reads only the published growth, 32


def conv(rng, sd: dict, name: str, out: int, inp: int) -> None:
    """A 3x3 convolution with variance-1/fan_in weights, float16-exact."""
    fan = inp * 9
    w = rng.uniform(-1, 1, (out, inp, 3, 3)) * np.sqrt(3.0 / fan)
    sd[f"{name}.weight"] = torch.from_numpy(w.astype(np.float32)).half().float()
    sd[f"{name}.bias"] = torch.from_numpy(rng.uniform(-0.05, 0.05, out).astype(np.float32)).half().float()


def rrdbnet(rng, blocks: int, unshuffle: int) -> dict:
    sd: dict = {}
    conv(rng, sd, "conv_first", F, 3 * unshuffle * unshuffle)
    for i in range(blocks):
        for k in (1, 2, 3):
            for m in (1, 2, 3, 4):
                conv(rng, sd, f"body.{i}.rdb{k}.conv{m}", G, F + (m - 1) * G)
            conv(rng, sd, f"body.{i}.rdb{k}.conv5", F, F + 4 * G)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(rng, sd, name, F, F)
    conv(rng, sd, "conv_last", 3, F)
    return sd


def original_names(sd: dict, blocks: int) -> dict:
    """basicsr names -> the original ESRGAN release's (4x: model.3, .6 upconvs, .8 hr, .10 last)."""
    top = {"conv_first": "model.0", "conv_body": f"model.1.sub.{blocks}", "conv_up1": "model.3",
           "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    out = {}
    for k, v in sd.items():
        layer, param = k.rsplit(".", 1)
        if layer.startswith("body."):
            _, i, rdb, c = layer.split(".")
            out[f"model.1.sub.{i}.RDB{rdb[3:]}.{c}.0.{param}"] = v
        else:
            out[f"{top[layer]}.{param}"] = v
    return out


def compact(rng, convs: int, scale: int) -> dict:
    sd: dict = {}
    conv(rng, sd, "body.0", F, 3)
    for i in range(convs + 1):
        sd[f"body.{2 * i + 1}.weight"] = torch.from_numpy(rng.uniform(0.05, 0.4, F).astype(np.float32)).half().float()
        if i < convs:
            conv(rng, sd, f"body.{2 * i + 2}", F, F)
    conv(rng, sd, f"body.{2 * convs + 2}", 3 * scale * scale, F)
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=mf.REPO / "tests" / "fixtures" / "ref")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    out = args.out.resolve() / "esrgan"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng([args.seed, 61])
    x4 = rrdbnet(rng, blocks=1, unshuffle=1)
    x2 = rrdbnet(rng, blocks=1, unshuffle=2)
    small = compact(rng, convs=3, scale=4)
    # float16 in the files to keep them small (the published ones are float32; both read).
    half = lambda sd: {k: v.half() for k, v in sd.items()}
    torch.save({"params_ema": half(x4)}, out / "rrdb-x4.pth")
    torch.save({"params_ema": half(x2)}, out / "rrdb-x2.pth")
    torch.save(half(original_names(x4, 1)), out / "esrgan-old-x4.pth")
    save_file(small, str(out / "compact-x4.safetensors"))

    image = torch.from_numpy(np.random.default_rng([args.seed, 62]).uniform(0, 1, (1, 3, 20, 24)).astype(np.float32))
    g = {"input": image}
    meta: dict = {"seed": args.seed, "versions": mf.versions() | {"spandrel": spandrel.__version__}, "models": {}}
    for f in ("rrdb-x4.pth", "rrdb-x2.pth", "esrgan-old-x4.pth", "compact-x4.safetensors"):
        d = spandrel.ModelLoader().load_from_file(out / f)
        model = d.model.eval().float()
        with torch.no_grad():
            y = model(image)
        stem = f.rsplit(".", 1)[0]
        g[f"out.{stem}"] = mf.f32(y)
        meta["models"][f] = {"architecture": d.architecture.name, "scale": d.scale,
                             "output_shape": list(y.shape), "params": sum(p.numel() for p in model.parameters())}
    # The original release's names load as the same network.
    assert torch.equal(g["out.rrdb-x4"], g["out.esrgan-old-x4"])
    mf.save_golden(out / "golden.safetensors", g, meta)
    (out / "README.md").write_text(
        "# ESRGAN-family fixtures (spandrel)\n\nWritten by `tools/reference/esrgan_fixtures.py` (its docstring has "
        "the details); do not edit.\n\n    /work/venv-ref/bin/python tools/reference/esrgan_fixtures.py --out "
        f"tests/fixtures/ref --seed {args.seed}\n\n```json\n{json.dumps(meta, indent=2)}\n```\n")
    print(f"esrgan_fixtures: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
