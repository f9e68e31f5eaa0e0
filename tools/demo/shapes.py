#!/usr/bin/env python3
"""Procedural shapes dataset for the embedded demo model (issue 5).

Every sample is a pure function of one integer seed: one shape (circle, square,
triangle) of a named colour, size and position on a plain background of another named
colour, plus a caption such as "a large red circle on the left on a blue background".
Nothing is downloaded. The grammar (palette, shapes, size and position bins, caption
templates, seed ranges) lives in grammar.json next to this file, which the Rust
evaluator (tests/common/shapes.rs) reads too, so generator and judge cannot drift.

Randomness comes from our own splitmix64 stream, not from numpy's or Python's
generators, so a seed gives the same sample on every Python/numpy version (and the
stream is trivial to reproduce elsewhere). Only numpy is needed (the PyTorch venv and
the system python3 both have it); PNGs are written with zlib, no Pillow.

Seed ranges (grammar.json "seeds"): training samples use seeds in [0, 1e9); the
held-out evaluation set is seeds [1e9, 1e9 + 256) (heldout.json); the Rust test
fixture is seeds [2e9, 2e9 + 60). The training stream can only produce seeds below
1e9, so the held-out and fixture images are never trained on.

Library use (training script):

    from shapes import Grammar, train_stream
    g = Grammar.load()
    for s in train_stream(g, run_seed=0):          # endless, deterministic
        s.image   # uint8 [H, W, 3]
        s.caption # str
        s.attrs   # dict(shape, colour, position, size, background)

CLI:

    python3 tools/demo/shapes.py samples --out /tmp/shapes -n 64 --seed 0   # PNGs + captions.jsonl
    python3 tools/demo/shapes.py heldout --write    # (re)writes tools/demo/heldout.json
    python3 tools/demo/shapes.py heldout --check    # verifies the committed file
    python3 tools/demo/shapes.py fixture --out tests/fixtures/shapes
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GRAMMAR_PATH = HERE / "grammar.json"
HELDOUT_PATH = HERE / "heldout.json"

MASK64 = (1 << 64) - 1
ATTRS = ("shape", "colour", "position", "size", "background")
SUPERSAMPLE = 4  # 4x4 samples per pixel: anti-aliased edges, area-exact coverage


# ---------------------------------------------------------------- randomness

class Rng:
    """splitmix64: tiny, fast enough here, identical on every platform and version."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * ((self.next_u64() >> 11) * (1.0 / (1 << 53)))

    def below(self, n: int) -> int:
        # 53-bit uniform times n: bias < n / 2^53, irrelevant for n < 100.
        return min(int(self.uniform() * n), n - 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def weighted(self, items, weights):
        x = self.uniform() * sum(weights)
        for item, w in zip(items, weights):
            if x < w:
                return item
            x -= w
        return items[-1]


def mix(a: int, b: int) -> int:
    """Hash two integers to one 64-bit value (used to derive per-sample seeds)."""
    r = Rng((a * 0x9E3779B97F4A7C15 + b) & MASK64)
    r.next_u64()
    return r.next_u64()


# ---------------------------------------------------------------- grammar

@dataclass
class Grammar:
    raw: dict
    palette: dict = field(init=False)
    shapes: list = field(init=False)
    sizes: list = field(init=False)
    positions: list = field(init=False)
    colours: list = field(init=False)

    def __post_init__(self):
        g = self.raw
        self.palette = {k: tuple(v) for k, v in g["palette"].items()}
        self.colours = list(self.palette)
        self.shapes = list(g["shapes"])
        self.sizes = list(g["sizes"])
        self.positions = list(g["positions"])
        self.seeds = {k: tuple(v) for k, v in g["seeds"].items()}
        self.image_size = int(g["default_image_size"])

    @staticmethod
    def load(path: Path = GRAMMAR_PATH) -> "Grammar":
        with open(path) as f:
            return Grammar(json.load(f))


@dataclass
class Sample:
    seed: int
    attrs: dict
    caption: str
    image: np.ndarray  # uint8 [H, W, 3]
    # Placement actually drawn (fractions of the side): centroid and extent.
    geometry: dict


# ---------------------------------------------------------------- attributes and captions

def random_attrs(g: Grammar, rng: Rng) -> dict:
    colour = rng.choice(g.colours)
    background = rng.choice([c for c in g.colours if c != colour])
    return {
        "shape": rng.choice(g.shapes),
        "colour": colour,
        "position": rng.choice(g.positions),
        "size": rng.choice(g.sizes),
        "background": background,
    }


def canonical_caption(g: Grammar, a: dict) -> str:
    """The fixed form: 'a large red circle on the left on a blue background'."""
    pos = g.raw["positions"][a["position"]]["phrases"][0]
    return f"a {a['size']} {a['colour']} {a['shape']} {pos} on a {a['background']} background"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def varied_caption(g: Grammar, a: dict, rng: Rng) -> tuple[str, dict]:
    """A training caption: a weighted template, synonyms, sometimes an attribute left out.

    Returns the caption and the attributes it states (left-out ones are None): the image
    still has some value for them, the caption just does not say which.
    """
    cap = g.raw["captions"]
    omit = cap["omit_probability"]
    syn_p = cap["synonym_probability"]
    stated = dict(a)
    for k in ("size", "position", "background"):
        if rng.uniform() < omit[k]:
            stated[k] = None

    words = []
    if stated["size"] is not None:
        size_words = g.raw["sizes"][a["size"]]["words"]
        words.append(size_words[0] if rng.uniform() >= syn_p else rng.choice(size_words[1:] or size_words))
    words.append(a["colour"])
    words.append(g.raw["shapes"][a["shape"]]["words"][0])
    subject = f"{_article(words[0])} {' '.join(words)}"

    position = ""
    if stated["position"] is not None:
        phrases = g.raw["positions"][a["position"]]["phrases"]
        position = " " + (phrases[0] if rng.uniform() >= syn_p else rng.choice(phrases[1:] or phrases))

    if stated["background"] is None:
        text = cap["no_background_template"]
    else:
        ts = cap["templates"]
        text = rng.weighted([t["text"] for t in ts], [t["weight"] for t in ts])
    caption = text.format(subject=subject, position=position, background=a["background"] or "")
    return caption, stated


# ---------------------------------------------------------------- rendering

def place(g: Grammar, a: dict, rng: Rng) -> dict:
    """Centroid and extent (fractions of the side) inside the attribute's bins.

    The shape's *area centroid* goes to the jittered anchor (the evaluator measures the
    centroid), then the shape is shifted just enough to stay `margin` inside the image,
    so it never touches the border (the evaluator reads the background off the border).
    """
    j = g.raw["jitter"]
    lo, hi = g.raw["sizes"][a["size"]]["extent"]
    e = rng.uniform(lo, hi)
    ax, ay = g.raw["positions"][a["position"]]["anchor"]
    cx = ax + rng.uniform(-j["position"], j["position"])
    cy = ay + rng.uniform(-j["position"], j["position"])
    # Bounding box relative to the centroid. Triangles point up, base = height = e:
    # their centroid sits at 2/3 of the height from the apex.
    if a["shape"] == "triangle":
        top, bottom = cy - 2 * e / 3, cy + e / 3
    else:
        top, bottom = cy - e / 2, cy + e / 2
    left, right = cx - e / 2, cx + e / 2
    m = j["margin"]
    dx = max(0.0, m - left) - max(0.0, right - (1 - m))
    dy = max(0.0, m - top) - max(0.0, bottom - (1 - m))
    return {"cx": cx + dx, "cy": cy + dy, "extent": e,
            "bbox": [left + dx, top + dy, right + dx, bottom + dy]}


def coverage(shape: str, bbox, size: int) -> np.ndarray:
    """Fraction of each pixel inside the shape ([size, size] float32), by supersampling.

    Only the pixels under the shape's box are sampled (the rest are 0), which keeps a
    64x64 sample at ~1 ms.
    """
    left, top, right, bottom = bbox
    out = np.zeros((size, size), dtype=np.float32)
    x0, x1 = max(0, int(np.floor(left * size))), min(size, int(np.ceil(right * size)))
    y0, y1 = max(0, int(np.floor(top * size))), min(size, int(np.ceil(bottom * size)))
    if x1 <= x0 or y1 <= y0:
        return out
    n = size * SUPERSAMPLE
    # Sample centres in fractions of the side, for the pixel block [y0:y1, x0:x1].
    x = ((np.arange(x0 * SUPERSAMPLE, x1 * SUPERSAMPLE, dtype=np.float64) + 0.5) / n)[None, :]
    y = ((np.arange(y0 * SUPERSAMPLE, y1 * SUPERSAMPLE, dtype=np.float64) + 0.5) / n)[:, None]
    w, h = right - left, bottom - top
    if shape == "circle":
        inside = ((x - (left + right) / 2) / (w / 2)) ** 2 + ((y - (top + bottom) / 2) / (h / 2)) ** 2 <= 1.0
    elif shape == "square":
        inside = (x >= left) & (x <= right) & (y >= top) & (y <= bottom)
    elif shape == "triangle":
        # Apex at (centre, top), base along the bottom edge.
        half = (y - top) / h * (w / 2)
        inside = (y >= top) & (y <= bottom) & (np.abs(x - (left + right) / 2) <= half)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    block = inside.astype(np.float32).reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = block
    return out


def jittered(g: Grammar, name: str, rng: Rng) -> np.ndarray:
    amp = g.raw["jitter"]["colour"]
    base = np.array(g.palette[name], dtype=np.float32)
    noise = np.array([rng.uniform(-amp, amp) for _ in range(3)], dtype=np.float32)
    return np.clip(base + noise, 0, 255)


def render(g: Grammar, a: dict, rng: Rng, size: int) -> tuple[np.ndarray, dict]:
    geo = place(g, a, rng)
    fg = jittered(g, a["colour"], rng)
    bg = jittered(g, a["background"], rng)
    cov = coverage(a["shape"], geo["bbox"], size)[..., None]
    img = bg * (1 - cov) + fg * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), geo


# ---------------------------------------------------------------- samples and splits

def sample(g: Grammar, seed: int, size: int | None = None, attrs: dict | None = None,
           varied: bool = True) -> Sample:
    """The sample of `seed`: attributes (unless given), caption, image.

    `varied=False` gives the canonical caption with every attribute stated (held-out set).
    """
    size = size or g.image_size
    rng = Rng(mix(seed, 0x5EED))
    a = dict(attrs) if attrs is not None else random_attrs(g, rng)
    if varied:
        caption, stated = varied_caption(g, a, rng)
    else:
        caption, stated = canonical_caption(g, a), dict(a)
    image, geo = render(g, a, rng, size)
    return Sample(seed=seed, attrs={**a, "stated": stated}, caption=caption, image=image, geometry=geo)


def train_seed(g: Grammar, run_seed: int, index: int) -> int:
    lo, hi = g.seeds["train"]
    return lo + mix(run_seed, index) % (hi - lo)


def train_stream(g: Grammar, run_seed: int = 0, start: int = 0, step: int = 1, size: int | None = None):
    """Endless deterministic training stream: samples start, start+step, ... of run `run_seed`.

    (start, step) = (worker_id, num_workers) shards it across DataLoader workers. Seeds
    always fall in the training range, so held-out/fixture samples never appear.
    """
    k = start
    while True:
        s = sample(g, train_seed(g, run_seed, k), size=size)
        assert g.seeds["train"][0] <= s.seed < g.seeds["train"][1]
        yield s
        k += step


def stratified_attrs(g: Grammar, i: int, seed: int) -> dict:
    """Item i of a balanced set: shape i mod 3, position i mod 5, size i mod 2. The counts
    are coprime, so every 30 consecutive items hold each (shape, position, size) once and
    each value's count differs by at most one over any prefix; the colour pair comes from
    the seed."""
    rng = Rng(mix(seed, 0xC010))
    a = random_attrs(g, rng)
    a["shape"] = g.shapes[i % len(g.shapes)]
    a["position"] = g.positions[i % len(g.positions)]
    a["size"] = g.sizes[i % len(g.sizes)]
    return a


def heldout(g: Grammar) -> list[dict]:
    """The held-out evaluation set: canonical captions, balanced shape/position/size.

    `seed` is both the ground-truth render's seed and the `sdrs generate --seed` to use.
    """
    lo, hi = g.seeds["heldout"]
    out = []
    for i, seed in enumerate(range(lo, hi)):
        a = stratified_attrs(g, i, seed)
        out.append({"seed": seed, "caption": canonical_caption(g, a), **a})
    return out


# ---------------------------------------------------------------- output

def write_png(path: Path, img: np.ndarray) -> None:
    """8-bit RGB PNG with zlib only (no Pillow needed)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def heldout_json(g: Grammar) -> str:
    items = heldout(g)
    lines = ",\n".join("  " + json.dumps(x) for x in items)
    return f"[\n{lines}\n]\n"


def cmd_samples(g: Grammar, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w") as f:
        for k, s in zip(range(args.n), train_stream(g, args.seed, size=args.size)):
            name = f"{k:05d}.png"
            write_png(out / name, s.image)
            f.write(json.dumps({"file": name, "seed": s.seed, "caption": s.caption, **s.attrs}) + "\n")
    print(f"wrote {args.n} samples to {out}")


def cmd_heldout(g: Grammar, args) -> None:
    text = heldout_json(g)
    ok = True
    if args.write:
        HELDOUT_PATH.write_text(text)
        print(f"wrote {HELDOUT_PATH} ({text.count('seed')} items)")
    else:
        ok = HELDOUT_PATH.exists() and HELDOUT_PATH.read_text() == text
        print("heldout.json is up to date" if ok else "heldout.json differs from the generator")
    if args.render:
        # Ground truth for each held-out item, plus a captions.jsonl that the Rust
        # evaluator's score_folder test reads.
        out = Path(args.render)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "captions.jsonl", "w") as f:
            for x in heldout(g):
                a = {k: x[k] for k in ATTRS}
                name = f"{x['seed']}.png"
                write_png(out / name, sample(g, x["seed"], size=args.size, attrs=a, varied=False).image)
                f.write(json.dumps({"file": name, **x}) + "\n")
        print(f"rendered the held-out ground truth to {out}")
    sys.exit(0 if ok else 1)


def cmd_fixture(g: Grammar, args) -> None:
    """Ground-truth images for the Rust evaluator test: balanced, varied captions.

    Item 0 is pinned to a large red circle on the left on a blue background, which the
    wrong-caption test asks about as blue.
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = g.seeds["fixture"]
    items = []
    for i, seed in enumerate(range(lo, hi)):
        a = stratified_attrs(g, i, seed)
        if i == 0:
            a.update(shape="circle", colour="red", position="left", size="large", background="blue")
        s = sample(g, seed, size=args.size, attrs=a, varied=True)
        name = f"{i:02d}.png"
        write_png(out / name, s.image)
        items.append({"file": name, "seed": seed, "caption": s.caption, **a, "stated": s.attrs["stated"]})
    meta = {
        "generator": "python3 tools/demo/shapes.py fixture --out tests/fixtures/shapes",
        "size": args.size or g.image_size,
        "items": items,
    }
    lines = ",\n".join("    " + json.dumps(x) for x in items)
    head = json.dumps({k: meta[k] for k in ("generator", "size")}, indent=2)[:-2]
    (out / "captions.json").write_text(f"{head},\n  \"items\": [\n{lines}\n  ]\n}}\n")
    print(f"wrote {len(items)} fixture images to {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("samples", help="write N training-stream samples (PNGs + captions.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="run seed of the training stream")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: grammar's)")
    p = sub.add_parser("heldout", help="write or check tools/demo/heldout.json")
    p.add_argument("--write", action="store_true")
    p.add_argument("--check", action="store_true")
    p.add_argument("--render", metavar="DIR", help="also render the ground-truth images to DIR")
    p.add_argument("--size", type=int, default=None)
    p = sub.add_parser("fixture", help="write the Rust evaluator's ground-truth fixture")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=None)
    args = ap.parse_args(argv)
    g = Grammar.load()
    {"samples": cmd_samples, "heldout": cmd_heldout, "fixture": cmd_fixture}[args.cmd](g, args)


if __name__ == "__main__":
    main()
