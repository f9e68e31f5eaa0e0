#!/usr/bin/env python3
"""Golden fixtures of LoRA merging from diffusers (`load_lora_weights` + `fuse_lora`).

Writes three random LoRAs for the tiny SD 1.x model of make_fixtures.py
(tests/fixtures/ref/sd1/model), one per naming people ship:
  kohya.safetensors      kohya / A1111: `lora_unet_…`, `lora_te_…`, `.alpha`, and a LoCon
                         pair on a ResNet's 3x3 convolution;
  peft.safetensors       diffusers / PEFT: `unet.….lora_A.weight`, `text_encoder.…`;
  processor.safetensors  diffusers' older attention processors: `….processor.to_q_lora.down.weight`
(the layout of the real LoRA in shared/models). For each, diffusers loads it into the
float32 pipeline, fuses it at a multiplier, and runs a 4-step Euler txt2img from
torch.Generator("cpu").manual_seed(7); golden.safetensors holds the final 8-bit image
and the fused weights of the adapted tensors (diffusers names).

    /work/venv-ref/bin/python tools/reference/lora_fixtures.py --out tests/fixtures/ref/lora
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import EulerDiscreteScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

STREAM = 21
RANK = 4
STEPS = 4

# (module in diffusers naming, its weight's shape); the tiny sd1: 32 channels at level
# 0, 64 at level 1, context 32, text hidden 32.
UNET = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (32, 32)),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", (32, 32)),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_v", (64, 64)),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0", (32, 32)),
]
TEXT = [
    ("text_model.encoder.layers.0.self_attn.q_proj", (32, 32)),
    ("text_model.encoder.layers.1.mlp.fc1", (64, 32)),
]
CONV = ("down_blocks.0.resnets.0.conv1", (32, 32, 3, 3))
MULTIPLIERS = {"kohya": 0.8, "peft": 1.0, "processor": 1.3}


def halves(rng: np.random.Generator, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = shape[0], shape[1:]
    down = torch.from_numpy(rng.uniform(-1, 1, (RANK, *inp)).astype(np.float32)) / np.sqrt(np.prod(inp))
    up_shape = (out, RANK) + (1,) * (len(inp) - 1)
    up = torch.from_numpy(rng.uniform(-1, 1, up_shape).astype(np.float32)) * 0.5
    return down, up


def build(rng: np.random.Generator) -> dict[str, dict[str, torch.Tensor]]:
    files: dict[str, dict[str, torch.Tensor]] = {"kohya": {}, "peft": {}, "processor": {}}
    k = files["kohya"]
    for module, shape in UNET + [CONV]:
        d, u = halves(rng, shape)
        name = "lora_unet_" + module.replace(".", "_")
        k[f"{name}.lora_down.weight"], k[f"{name}.lora_up.weight"] = d, u
        k[f"{name}.alpha"] = torch.tensor(2.0)  # scale alpha / rank = 0.5
    # Not q_proj: diffusers 0.42's kohya converter renames text-encoder attention pairs
    # to keys transformers 5's CLIPTextModel rejects (it warns and leaves q_proj alone).
    for module, shape in TEXT[1:]:
        d, u = halves(rng, shape)
        name = "lora_te_" + module.replace(".", "_")
        k[f"{name}.lora_down.weight"], k[f"{name}.lora_up.weight"] = d, u
        k[f"{name}.alpha"] = torch.tensor(8.0)  # scale 2
    p = files["peft"]
    for module, shape in UNET:
        d, u = halves(rng, shape)
        p[f"unet.{module}.lora_A.weight"], p[f"unet.{module}.lora_B.weight"] = d, u
    for module, shape in TEXT:
        d, u = halves(rng, shape)
        p[f"text_encoder.{module}.lora_A.weight"], p[f"text_encoder.{module}.lora_B.weight"] = d, u
    q = files["processor"]
    for module, shape in UNET:
        block, rest = module.rsplit(".attn", 1)
        attn, proj = rest.split(".", 1)
        proj = "to_out" if proj.startswith("to_out") else proj
        d, u = halves(rng, shape)
        q[f"{block}.attn{attn}.processor.{proj}_lora.down.weight"], q[f"{block}.attn{attn}.processor.{proj}_lora.up.weight"] = d, u
    return files


def processor_to_peft(name: str) -> str:
    block, rest = name.split(".processor.")
    proj, half = rest.split("_lora.")
    proj = "to_out.0" if proj == "to_out" else proj
    return f"unet.{block}.{proj}.{'lora_A' if half.startswith('down') else 'lora_B'}.weight"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=mf.REPO / "tests/fixtures/ref/lora")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    files = build(np.random.default_rng([0, STREAM]))
    cfg = mf.sd_configs("sd1")
    g: dict[str, torch.Tensor] = {}
    runs = {}
    with torch.no_grad():
        for kind, tensors in files.items():
            path = a.out / f"{kind}.safetensors"
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(path))
            pipe = mf.load_sd("sd1", mf.REPO / "tests/fixtures/ref/sd1/model", None)
            pipe.scheduler = EulerDiscreteScheduler(**cfg["euler"])
            before = {n: v.clone() for n, v in pipe.unet.state_dict().items()}
            te_before = {n: v.clone() for n, v in pipe.text_encoder.state_dict().items()}
            if kind == "processor":
                # diffusers 0.42 no longer reads this layout (it loads nothing from it);
                # the same pairs in its own PEFT naming give the expected result.
                renamed = {processor_to_peft(n): t.contiguous() for n, t in tensors.items()}
                path = a.out / "_processor_as_peft.safetensors"
                save_file(renamed, str(path))
            pipe.load_lora_weights(str(path), adapter_name=kind)
            if kind == "processor":
                path.unlink()
            pipe.fuse_lora(lora_scale=MULTIPLIERS[kind], components=["unet", "text_encoder"])
            pipe.unload_lora_weights()
            sd = {f"unet.{n}": v for n, v in pipe.unet.state_dict().items()}
            # transformers 5 names CLIPTextModel's weights without `text_model.`.
            te = {n if n.startswith("text_model.") else f"text_model.{n}": v for n, v in pipe.text_encoder.state_dict().items()}
            sd.update({f"text_encoder.{n}": v for n, v in te.items()})
            changed = sorted(n for n, v in pipe.unet.state_dict().items() if not torch.equal(v, before[n]))
            te_changed = sorted(n for n, v in pipe.text_encoder.state_dict().items() if not torch.equal(v, te_before[n]))
            print(kind, "text encoder weights changed:", te_changed, file=sys.stderr)
            for module, _ in UNET + ([CONV] if kind == "kohya" else []):
                g[f"{kind}.unet.{module}.weight"] = mf.f32(sd[f"unet.{module}.weight"])
            for module, _ in TEXT if kind != "processor" else []:
                g[f"{kind}.text_encoder.{module}.weight"] = mf.f32(sd[f"text_encoder.{module}.weight"])
            gen = mf.seeded()
            img = pipe(prompt=mf.PROMPTS[mf.COND_PROMPT], negative_prompt="", height=mf.HEIGHT, width=mf.WIDTH,
                       num_inference_steps=STEPS, guidance_scale=mf.GUIDANCE, generator=gen, output_type="pil").images
            g[f"{kind}.image_u8"] = torch.from_numpy(np.stack([np.asarray(i) for i in img]))
            runs[kind] = {"multiplier": MULTIPLIERS[kind], "keys": len(tensors), "unet_weights_changed": changed,
                          "text_encoder_weights_changed": te_changed}
            print(f"{kind}: {len(tensors)} keys, {len(changed)} UNet weights changed", file=sys.stderr)
    meta = {
        "model": "sd1/model (float32)",
        "prompt": mf.PROMPTS[mf.COND_PROMPT],
        "negative_prompt": "",
        "scheduler": "EulerDiscreteScheduler (sd1 euler config)",
        "steps": STEPS,
        "guidance_scale": mf.GUIDANCE,
        "generator": f'torch.Generator("cpu").manual_seed({mf.E2E_SEED})',
        "rank": RANK,
        "notes": ["kohya.safetensors adapts the text encoder's MLP only: diffusers 0.42's kohya converter renames "
                  "text-encoder attention pairs to keys transformers 5's CLIPTextModel rejects",
                  "processor.safetensors: diffusers 0.42 loads nothing from the attention-processor layout, so its "
                  "pairs were loaded under diffusers' PEFT names (…attn1.to_q.lora_A.weight) to make the golden"],
        "runs": runs,
        "versions": dict(mf.versions(), peft=__import__("peft").__version__),
        "seconds": round(time.time() - t0, 1),
    }
    mf.save_golden(a.out / "golden.safetensors", g, meta)
    print(f"wrote {a.out} in {meta['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
