#!/usr/bin/env python3
"""Reference for the real SD 1.5 LoRA (shared/models/lora-sd15-catundchat) at full
width: one self-attention block (down_blocks.0…attn1: 320 channels, 8 heads of 40) with
the LoRA's low-rank branches on q, k, v and out, computed with torch from the same
tensors sdrs reads.

The base weights are not random but a closed formula both sides evaluate exactly in
float32 (so nothing 400 KB-sized is committed):
  W_m[o][i] = ((o*31 + i*17 + m*11) % 97 - 48) / 480,  m = 0..3 for q, k, v, out
  b_out[o]  = ((o*7) % 13 - 6) / 1000
  x[t][i]   = ((t*13 + i*7) % 89 - 44) / 440,            16 tokens
Writes block.safetensors beside the LoRA fixtures:
  y        [16, 320]  the block's output with every branch at multiplier 0.75
  y_base   [16, 320]  without the LoRA
  merged.* W_q + 0.75·up·down: its row sums, column sums and top-left 16x16 block

    /work/venv-ref/bin/python tools/reference/lora_block_fixture.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
LORA = ROOT.parent / "shared/models/lora-sd15-catundchat/pytorch_lora_weights.safetensors"
PREFIX = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor."
C, HEADS, TOKENS, MULT = 320, 8, 16, 0.75


def formula(rows: int, cols: int, f) -> torch.Tensor:
    o, i = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    num, den = f(o, i)
    return torch.from_numpy(num.astype(np.float32) / np.float32(den))


def main() -> None:
    torch.set_grad_enabled(False)
    lora = load_file(str(LORA))
    w = [formula(C, C, lambda o, i, m=m: ((o * 31 + i * 17 + m * 11) % 97 - 48, 480)) for m in range(4)]
    b_out = formula(1, C, lambda _, o: ((o * 7) % 13 - 6, 1000))[0]
    x = formula(TOKENS, C, lambda t, i: ((t * 13 + i * 7) % 89 - 44, 440))

    def proj(m: int, name: str, inp: torch.Tensor, with_lora: bool) -> torch.Tensor:
        y = inp @ w[m].T
        if with_lora:
            down, up = lora[f"{PREFIX}{name}_lora.down.weight"], lora[f"{PREFIX}{name}_lora.up.weight"]
            y = y + MULT * ((inp @ down.T) @ up.T)
        return y

    def block(with_lora: bool) -> torch.Tensor:
        q, k, v = (proj(m, n, x, with_lora) for m, n in enumerate(("to_q", "to_k", "to_v")))
        d = C // HEADS
        split = lambda t: t.reshape(TOKENS, HEADS, d).transpose(0, 1)  # [H, T, d]
        a = torch.softmax(split(q) @ split(k).transpose(1, 2) / np.sqrt(d), dim=-1) @ split(v)
        a = a.transpose(0, 1).reshape(TOKENS, C)
        return proj(3, "to_out", a, with_lora) + b_out

    merged = w[0] + MULT * (lora[f"{PREFIX}to_q_lora.up.weight"] @ lora[f"{PREFIX}to_q_lora.down.weight"])
    out = {
        "y": block(True), "y_base": block(False),
        "merged.row_sums": merged.sum(1), "merged.col_sums": merged.sum(0), "merged.corner": merged[:16, :16].contiguous(),
    }
    dst = ROOT / "tests/fixtures/ref/lora/block.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst), metadata={"torch": torch.__version__, "multiplier": str(MULT)})
    print(f"wrote {dst}: |y - y_base| max {float((out['y'] - out['y_base']).abs().max()):.3g}")


if __name__ == "__main__":
    main()
