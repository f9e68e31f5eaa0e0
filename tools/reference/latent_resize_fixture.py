#!/usr/bin/env python3
"""Golden latent resizes for the hires fix's latent upscalers: torch's
`F.interpolate(x, size, mode, align_corners=False)` (what A1111's "Latent" upscalers
call, without antialiasing) on a seeded 4x5x7 latent, to 2x and to an odd 9x11.

    /work/venv-ref/bin/python tools/reference/latent_resize_fixture.py --out tests/fixtures/ref
"""
import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/ref"))
    a = ap.parse_args()
    x = torch.from_numpy(np.random.default_rng([0, 50]).standard_normal((1, 4, 5, 7)).astype(np.float32))
    g = {"input": x[0]}
    for mode in ("bilinear", "bicubic", "nearest", "nearest-exact"):
        for h, w in ((10, 14), (9, 11)):
            kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
            g[f"{mode}.{h}x{w}"] = F.interpolate(x, size=(h, w), mode=mode, **kw)[0].contiguous()
    dst = a.out / "hires"
    dst.mkdir(parents=True, exist_ok=True)
    save_file(g, str(dst / "latent_resize.safetensors"), metadata={"torch": torch.__version__})
    print(f"wrote {dst / 'latent_resize.safetensors'}")


if __name__ == "__main__":
    main()
