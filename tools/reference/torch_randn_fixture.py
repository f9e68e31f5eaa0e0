#!/usr/bin/env python3
"""Golden values of `torch.randn` (float32, CPU generator) for src/sample/rng.rs.

torch's float32 CPU `randn` has two code paths for 16+ elements, picked by the CPU
capability torch dispatches to: the AVX2 kernel (polynomial log/sin/cos in float32)
and the generic kernel (libm logf/sinf/cosf), which AVX-512 machines and non-x86
machines use. Both are recorded here by running torch once per capability
(`ATEN_CPU_CAPABILITY=avx2` and `=default`) in a child process; the machine that
runs this script must support AVX2.

Values are stored as the uint32 bit patterns of the float32 results, so the Rust
side compares them exactly. The 4x64x64 case (an SD 1.x latent at 512x512) keeps
only its first and last 64 values and an FNV-1a 64 hash of all its little-endian
float32 bytes.

Usage:

    /work/venv-ref/bin/python tools/reference/torch_randn_fixture.py --out tests/fixtures/torch_randn.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch

SEEDS = [0, 1, 42, 2**32 + 5, 2**63 - 1]
# Shapes flatten in C order, so only the element count matters to the stream; a few
# are given as multi-dimensional shapes to show that.
SHAPES = [[1], [3], [3, 5], [16], [17], [31], [100], [1, 4, 8, 8], [1, 4, 64, 64]]
# One large case: a rounding difference in the AVX2 kernel's polynomials shows up in
# about one value in 10^4..10^5, so this pins down exactly which operations are fused.
LARGE = [(1, [1024, 1024])]
FULL_LIMIT = 1024  # store every value up to this many elements
# Successive calls on one generator: exercises the cached second Box-Muller value
# of the scalar path (odd counts) across calls and across the batched path.
SEQUENCE = [[5], [20], [3], [1], [16], [2], [33], [7]]
SEQUENCE_SEEDS = [0, 42]


def bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(-1).numpy().view(np.uint32).tolist()


def fnv1a64(t: torch.Tensor) -> str:
    h = 0xCBF29CE484222325
    for b in t.contiguous().view(-1).numpy().astype("<f4").tobytes():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def record(kernel: str) -> dict:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.lower() != kernel:
        sys.exit(f"asked for ATEN_CPU_CAPABILITY={kernel}, torch runs {cap}")
    cases = []
    for seed, shape in [(s, sh) for s in SEEDS for sh in SHAPES] + LARGE:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        b = bits(x)
        case = {"seed": seed, "shape": shape, "n": len(b)}
        if len(b) <= FULL_LIMIT:
            case["bits"] = b
        else:
            case.update(head=b[:64], tail=b[-64:], fnv1a64=fnv1a64(x))
        cases.append(case)
    sequences = []
    for seed in SEQUENCE_SEEDS:
        g = torch.Generator().manual_seed(seed)
        calls = [{"shape": s, "bits": bits(torch.randn(s, generator=g))} for s in SEQUENCE]
        sequences.append({"seed": seed, "calls": calls})
    return {"capability": cap, "cases": cases, "sequences": sequences}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/torch_randn.json")
    ap.add_argument("--kernel", help=argparse.SUPPRESS)  # child mode: print one kernel's record
    args = ap.parse_args()
    if args.kernel:
        json.dump(record(args.kernel), sys.stdout)
        return
    kernels = {}
    for name, cap in [("avx2", "avx2"), ("generic", "default")]:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        out = subprocess.run([sys.executable, __file__, "--kernel", cap], env=env, check=True, capture_output=True, text=True)
        kernels[name] = json.loads(out.stdout)
    doc = {
        "about": "torch.randn float32 on a CPU torch.Generator().manual_seed(seed); values are float32 bit patterns",
        "torch": torch.__version__,
        "kernels": kernels,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
