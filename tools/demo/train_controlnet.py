#!/usr/bin/env python3
"""Trains the demo model's ControlNet: a silhouette of the shape (white on black, the
size of the image) puts the shape where the silhouette is.

The base model comes from the shipped GGUF (`models/demo/sdrs-demo-base-q8_0.gguf`,
dequantised with the `gguf` package from PyPI, loaded into diffusers' classes by their
own single-file converters), frozen; a `ControlNetModel.from_unet` copy of its encoder
(conditioning embedding 16, 16, 32, 32: four levels for the VAE's 8x) is trained with
the base model's loss (v-prediction on SD's schedule rescaled to zero terminal SNR,
x0-loss weight min(1 + SNR, 5)).

Data: the grammar's pictures (tools/demo/shapes.py) with the shape's centroid drawn
*uniformly* over [0.2, 0.8]² instead of at the five named places, so the places the
judge checks are never the trained ones in particular; captions say the position only
30% of the time (never where the silhouette disagrees), 10% are empty.

    /work/venv-ref/bin/python tools/demo/train_controlnet.py --work /work/cn-train
    target/release/sdrs convert /work/cn-train/controlnet --type q8_0 \\
        -o models/demo/sdrs-demo-controlnet-q8_0.gguf

Deterministic from --seed for a given CPU (2 threads).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import train as demo  # noqa: E402  (configs, schedule, tokenizer, lr, optimiser step)
from shapes import Grammar, Rng, coverage, jittered, mix, random_attrs, train_seed  # noqa: E402

EMBEDDING = (16, 16, 32, 32)
MODEL = REPO / "models" / "demo" / "sdrs-demo-base-q8_0.gguf"
# The run seed of the training stream's seeds (the grammar's training range, which the
# held-out and fixture seeds are outside of), and of each picture's generator.
STREAM = 0xC0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_gguf(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an sdrs GGUF, dequantised to float32 in its original shape."""
    r = gguf.GGUFReader(path)

    def field(name):
        f = r.fields.get(name)
        return None if f is None else f.contents()

    names = field("sd.reshaped.names") or []
    dims = field("sd.reshaped.shapes") or []
    original = {n: tuple(dims[4 * i:4 * i + 4]) for i, n in enumerate(names)}
    out = {}
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = original.get(t.name, tuple(int(d) for d in reversed(t.shape)))
        out[t.name] = torch.from_numpy(np.ascontiguousarray(data).reshape(shape))
    return out


def load_base(path: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = read_gguf(path)
    unet = UNet2DConditionModel(**demo.UNET)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet.config), strict=True)
    vae = AutoencoderKL(**demo.VAE)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae.config), strict=True)
    text = CLIPTextModel(CLIPTextConfig(**demo.TEXT))
    # transformers 5's CLIPTextModel has no `text_model.` level.
    prefix = "cond_stage_model.transformer.text_model."
    missing, unexpected = text.load_state_dict(
        {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    scale = gguf.GGUFReader(path).fields["sd.vae.scaling_factor"].contents()
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    return unet, vae, text, float(scale)


def silhouette(shape: str, bbox, size: int) -> np.ndarray:
    """The shape's mask, white on black, [size, size, 3] uint8."""
    m = (coverage(shape, bbox, size) >= 0.5).astype(np.uint8) * 255
    return np.repeat(m[..., None], 3, axis=2)


def bbox_at(shape: str, cx: float, cy: float, e: float):
    """The box of a shape of extent `e` whose area centroid is (cx, cy) (triangles point
    up with the centroid at 2/3 of the height, as shapes.place puts them)."""
    top, bottom = (cy - 2 * e / 3, cy + e / 3) if shape == "triangle" else (cy - e / 2, cy + e / 2)
    return [cx - e / 2, top, cx + e / 2, bottom]


def position_word(g: Grammar, cx: float, cy: float) -> str | None:
    """The named place (cx, cy) is within the jitter of, if any."""
    j = g.raw["jitter"]["position"]
    for name in g.positions:
        ax, ay = g.raw["positions"][name]["anchor"]
        if abs(cx - ax) <= j and abs(cy - ay) <= j:
            return name
    return None


def caption(g: Grammar, a: dict, where: str | None, rng: Rng) -> str:
    if rng.uniform() < 0.1:
        return ""
    size = "" if rng.uniform() < 0.2 else f"{a['size']} "
    place = ""
    if where is not None and rng.uniform() < 0.3:
        place = " " + g.raw["positions"][where]["phrases"][0]
    return f"a {size}{a['colour']} {a['shape']}{place} on a {a['background']} background"


def make_data(g: Grammar, n: int, seed: int):
    images = np.zeros((n, demo.SIZE, demo.SIZE, 3), np.uint8)
    hints = np.zeros((n, demo.SIZE, demo.SIZE, 3), np.uint8)
    captions = []
    for i in range(n):
        rng = Rng(mix(train_seed(g, STREAM + seed, i), STREAM))
        a = random_attrs(g, rng)
        lo, hi = g.raw["sizes"][a["size"]]["extent"]
        e = rng.uniform(lo, hi)
        cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        box = bbox_at(a["shape"], cx, cy, e)
        # Kept 0.02 inside the image, as the grammar's pictures are.
        dx = max(0.0, 0.02 - box[0]) - max(0.0, box[2] - 0.98)
        dy = max(0.0, 0.02 - box[1]) - max(0.0, box[3] - 0.98)
        box = [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]
        fg, bg = jittered(g, a["colour"], rng), jittered(g, a["background"], rng)
        cov = coverage(a["shape"], box, demo.SIZE)[..., None]
        images[i] = np.clip(np.rint(bg * (1 - cov) + fg * cov), 0, 255).astype(np.uint8)
        hints[i] = silhouette(a["shape"], box, demo.SIZE)
        captions.append(caption(g, a, position_word(g, cx + dx, cy + dy), rng))
    return images, hints, captions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    a = ap.parse_args()
    torch.set_num_threads(2)
    a.work.mkdir(parents=True, exist_ok=True)
    from diffusers import ControlNetModel

    t0 = time.time()
    g = Grammar.load()
    unet, vae, text, scale = load_base(MODEL)
    images, hints, captions = make_data(g, a.samples, a.seed)
    tok = demo.tokenizer(a.work)
    distinct = sorted(set(captions))
    index = {c: k for k, c in enumerate(distinct)}
    with torch.no_grad():
        ids = tok(distinct, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ctx = torch.cat([text(ids[i:i + 256]).last_hidden_state for i in range(0, len(ids), 256)])
        px = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        post = [vae.encode(px[i:i + 256]).latent_dist for i in range(0, len(px), 256)]
        mean = torch.cat([p.mean for p in post])
        std = torch.cat([p.std for p in post])
    cap_idx = torch.tensor([index[c] for c in captions])
    hint_t = torch.from_numpy(hints).permute(0, 3, 1, 2).float() / 255.0
    log(f"data: {a.samples} samples, {len(distinct)} captions, latents ({time.time() - t0:.0f} s)")

    gen = demo.seeded(a, 7)
    sched = demo.Schedule("cpu")
    # The base model's own loss on this data: the check that the GGUF loaded right.
    with torch.no_grad():
        idx = torch.randint(0, a.samples, (256,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (256,), generator=gen)
        v = unet(sched.noised(x0, noise, t), t, ctx[cap_idx[idx]]).sample
        w = torch.clamp(1 + sched.snr[t], max=demo.LOSS_CAP) / (1 + sched.snr[t])
        base_loss = float((w * ((v - sched.velocity(x0, noise, t)) ** 2).mean(dim=(1, 2, 3))).mean())
    log(f"base model's loss on this data: {base_loss:.4f}")

    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING)
    cn.train().requires_grad_(True)
    params = list(cn.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    losses = []
    for step in range(a.steps):
        demo.set_lr(opt, demo.cosine_lr(step, a.steps, a.lr, 100))
        idx = torch.randint(0, a.samples, (a.batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (a.batch,), generator=gen)
        xt = sched.noised(x0, noise, t)
        c = ctx[cap_idx[idx]]
        down, mid = cn(xt, t, encoder_hidden_states=c, controlnet_cond=hint_t[idx], return_dict=False)
        v = unet(xt, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        w = torch.clamp(1 + sched.snr[t], max=demo.LOSS_CAP) / (1 + sched.snr[t])
        loss = (w * ((v - sched.velocity(x0, noise, t)) ** 2).mean(dim=(1, 2, 3))).mean()
        demo.descend(opt, loss, params)
        losses.append(loss.item())
        if step % 100 == 0 or step == a.steps - 1:
            log(f"controlnet {step}/{a.steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f} s)")
    out = a.work / "controlnet"
    cn.save_pretrained(out, safe_serialization=True)
    (a.work / "journal.json").write_text(json.dumps({
        "samples": a.samples, "steps": a.steps, "batch": a.batch, "lr": a.lr, "seed": a.seed,
        "embedding_channels": EMBEDDING, "base_loss": round(base_loss, 5),
        "final_loss": round(float(np.mean(losses[-200:])), 5), "seconds": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__}, indent=1) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
