#!/usr/bin/env python3
"""Golden fixtures of prompt handling: emphasis syntax, long prompts, CLIP skip and
textual inversion, on the tiny SD 1.x and SDXL models of make_fixtures.py /
sdxl_fixtures.py.

Writes to --out (tests/fixtures/ref/prompts):
  emphasis.json          the (text, weight) pieces of 48 prompts under A1111's emphasis
                         grammar (the tokenizing regular expression and bracket rules
                         published in stable-diffusion-webui's prompt_parser docs,
                         implemented here from that description);
  tiny-ti.bin            a random 2-vector embedding in diffusers' format
                         ({"<tiny-ti>": [2, 32]}, torch.save);
  tiny-a1111.pt          the same vectors in A1111's format (string_to_param), trigger
                         "tiny-a1111" (its file stem);
  tiny-xl.safetensors    an SDXL embedding (clip_l [2, 32], clip_g [2, 32]);
  golden.safetensors     per case: the windows' token ids and weights, and the UNet
                         conditioning (and SDXL's pooled embedding);
  golden.json            the cases.

References, per case:
  - plain prompts with textual inversion and CLIP skip: diffusers' own `encode_prompt`
    after `load_textual_inversion` (its clip_skip = ours - 1);
  - weighted and long prompts: transformers' CLIPTextModel on the windows A1111's
    scheme cuts (BOS + 75 tokens + EOS, comma backtrack of 20 tokens, BREAK), each
    window's hidden states times its weights and scaled back to the unweighted mean,
    the windows concatenated.

    /work/venv-ref/bin/python tools/reference/prompt_fixtures.py --out tests/fixtures/ref/prompts
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STREAM = 31

# ---- A1111's emphasis grammar (from its documentation) -------------------------------
LEX = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text: str) -> list[list]:
    res: list[list] = []
    round_, square = [], []

    def mul(start, m):
        for p in range(start, len(res)):
            res[p][1] *= m

    for m in LEX.finditer(text):
        t, w = m.group(0), m.group(1)
        if t.startswith("\\"):
            res.append([t[1:], 1.0])
        elif t == "(":
            round_.append(len(res))
        elif t == "[":
            square.append(len(res))
        elif w is not None and round_:
            mul(round_.pop(), float(w))
        elif t == ")" and round_:
            mul(round_.pop(), 1.1)
        elif t == "]" and square:
            mul(square.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(BREAK, t)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for p in round_:
        mul(p, 1.1)
    for p in square:
        mul(p, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


PARSER_PROMPTS = [
    "normal text", "an (important) word", "(unbalanced", r"\(literal\]", "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "", "   ", "(word:1.3)", "(word:0.5)",
    "(word:-1)", "(word:+2.5)", "(word:.5)", "(word:2.)", "((word))", "[[word]]", "[(word)]",
    "([word])", "((a:1.2) b:1.5)", "(a (b (c:2) d) e)", "[a [b [c] d] e]", "a)", "a]", "((a)",
    "[[a]", "(a]", "[a)", r"\\", "a\\b", r"\(\)\[\]", r"(a\)b)", r"(a\:1.5)", "(a: 1.3)",
    "(a:1.3 )", "(a:1.3", "a:1.3)", "a:b:c", "[a:b:0.5]", "(a:b:1.2)", "a BREAK b",
    "a BREAK BREAK b", "BREAK", "BREAKfast BREAK", "a break b", "(a BREAK b)", "a\nBREAK\nb",
    "(emphasis) BREAK [less]", "masterpiece, (best quality:1.2), 1girl, [lowres], ((detailed eyes))",
    "ünïcödé (wörds:1.1) 日本語 [テキスト]", "(x:0)", "(nested (weights:2):3)",
]

# ---- A1111's windows -------------------------------------------------------------------
CHUNK = 75
BACKTRACK = 20


def windows(tok, text: str, triggers: dict[tuple, int] | None = None):
    """[(ids[77], weights[77])] for one prompt; `triggers` maps a token tuple to its
    vector count (positions get id 0)."""
    triggers = triggers or {}
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad = tok.pad_token_id
    comma = tok.get_vocab().get(",</w>")
    out = []
    ids, ws = [], []
    last_comma = -1

    def close():
        nonlocal ids, ws, last_comma
        t = ids + [eos] * (CHUNK - len(ids))
        w = ws + [1.0] * (CHUNK - len(ws))
        t = [bos] + t + [eos]
        w = [1.0] + w + [1.0]
        first = t.index(eos)
        t = t[:first + 1] + [pad] * (len(t) - first - 1)
        out.append((t, w))
        ids, ws, last_comma = [], [], -1

    for text_, weight in parse(text):
        if text_ == "BREAK" and weight == -1:
            close()
            continue
        toks = tok(text_, add_special_tokens=False, truncation=False)["input_ids"]
        pos = 0
        while pos < len(toks):
            t = toks[pos]
            if t == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= BACKTRACK:
                cut = last_comma + 1
                rid, rw = ids[cut:], ws[cut:]
                ids, ws = ids[:cut], ws[:cut]
                close()
                ids, ws = rid, rw
            if len(ids) == CHUNK:
                close()
            match = max((k for k in triggers if tuple(toks[pos:pos + len(k)]) == k), key=len, default=None)
            if match is None:
                ids.append(t)
                ws.append(weight)
                pos += 1
                continue
            n = triggers[match]
            if len(ids) + n > CHUNK:
                close()
            ids += [0] * n
            ws += [weight] * n
            pos += len(match)
    if ids or not out:
        close()
    return out


def encode_windows(te, wins, skip: int, final_norm: bool, n_windows: int, empty):
    """Hidden states of each window (padded to n_windows with `empty`), weighted with
    the mean restored, concatenated: [n_windows * 77, hidden]."""
    zs = []
    for i in range(n_windows):
        ids, w = wins[i] if i < len(wins) else empty
        out = te(torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[-(skip + 1)]
        if final_norm:
            # transformers 5 flattened CLIPTextModel (no `.text_model`).
            z = (te.final_layer_norm if hasattr(te, "final_layer_norm") else te.text_model.final_layer_norm)(z)
        mult = torch.tensor(w, dtype=torch.float32)[None, :, None]
        mean = z.mean()
        z = z * mult
        z = z * (mean / z.mean())
        zs.append(z[0])
    return torch.cat(zs)


WEIGHTED = [
    ("weighted", "a (red:1.5) [blue] ((circle)) on a (square:0.7)"),
    ("nested", "(a (b:1.4) [c [d]] e:1.2)"),
    ("long", ", ".join(f"word{i} thing{i}" for i in range(40))),
    ("long_weighted", " ".join(["(cat:1.3) dog [bird]"] * 30)),
    ("break", "a cat BREAK (a dog:1.2) on grass"),
    ("comma_backtrack", " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/ref/prompts")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    (out / "emphasis.json").write_text(json.dumps(
        [{"prompt": p, "pieces": parse(p)} for p in PARSER_PROMPTS], ensure_ascii=False, indent=1) + "\n")

    rng = np.random.default_rng([a.seed, STREAM])
    vec = torch.from_numpy(rng.normal(0, 0.5, (2, 32)).astype(np.float32))
    torch.save({"<tiny-ti>": vec}, out / "tiny-ti.bin")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "tiny-a1111", "step": 100},
               out / "tiny-a1111.pt")
    vl = torch.from_numpy(rng.normal(0, 0.5, (2, 32)).astype(np.float32))
    vg = torch.from_numpy(rng.normal(0, 0.5, (2, 32)).astype(np.float32))
    save_file({"clip_l": vl, "clip_g": vg}, str(out / "tiny-xl.safetensors"))

    golden, cases = {}, []

    # SD 1.x: weighted/long prompts on transformers, CLIP skip and TI through diffusers.
    sd1 = StableDiffusionPipeline.from_pretrained(ROOT / "tests/fixtures/ref/sd1/model", dtype=torch.float32,
                                                  safety_checker=None, requires_safety_checker=False)
    tok, te = sd1.tokenizer, sd1.text_encoder
    empty = windows(tok, "")[0]
    for skip in (0, 1):
        for name, prompt in WEIGHTED:
            wins = windows(tok, prompt)
            key = f"sd1.{name}.skip{skip}"
            golden[f"{key}.ids"] = torch.tensor([w[0] for w in wins], dtype=torch.int32)
            golden[f"{key}.weights"] = torch.tensor([w[1] for w in wins], dtype=torch.float32)
            golden[f"{key}.context"] = encode_windows(te, wins, skip, True, len(wins), empty)
            cases.append({"key": key, "model": "sd1", "prompt": prompt, "clip_skip": skip + 1, "windows": len(wins),
                          "reference": "transformers CLIPTextModel on A1111's windows"})
    plain = "a red circle"
    e, _ = sd1.encode_prompt(plain, "cpu", 1, False)
    golden["sd1.plain.skip0.context"] = e[0]
    cases.append({"key": "sd1.plain.skip0", "model": "sd1", "prompt": plain, "clip_skip": 1, "windows": 1,
                  "reference": "diffusers encode_prompt"})
    # diffusers 0.42's SD 1 clip_skip path reads `text_encoder.text_model`, which
    # transformers 5 removed: its definition (hidden_states[-(clip_skip + 1)], then the
    # final layer norm) is computed here on transformers directly.
    golden["sd1.plain.skip1.context"] = encode_windows(te, windows(tok, plain), 1, True, 1, empty)
    cases.append({"key": "sd1.plain.skip1", "model": "sd1", "prompt": plain, "clip_skip": 2, "windows": 1,
                  "reference": "diffusers' clip_skip=1 definition on transformers"})
    sd1.load_textual_inversion(str(out / "tiny-ti.bin"))
    sd1.load_textual_inversion(str(out / "tiny-a1111.pt"), token="tiny-a1111")
    for name, prompt in (("ti_diffusers", "a <tiny-ti> circle"), ("ti_a1111", "tiny-a1111 on a tiny-a1111 square")):
        e, _ = sd1.encode_prompt(prompt, "cpu", 1, False)
        key = f"sd1.{name}"
        golden[f"{key}.context"] = e[0]
        cases.append({"key": key, "model": "sd1", "prompt": prompt, "clip_skip": 1, "windows": 1,
                      "embeddings": ["tiny-ti.bin", "tiny-a1111.pt"], "reference": "diffusers load_textual_inversion + encode_prompt"})

    # SDXL: CLIP skip and a clip_l/clip_g embedding through diffusers.
    xl = StableDiffusionXLPipeline.from_pretrained(ROOT / "tests/fixtures/ref/sdxl/model", dtype=torch.float32)
    for skip in (0, 1):
        e, _, pooled, _ = xl.encode_prompt(plain, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                           clip_skip=skip or None)
        key = f"sdxl.plain.skip{skip}"
        golden[f"{key}.context"], golden[f"{key}.pooled"] = e[0], pooled[0]
        cases.append({"key": key, "model": "sdxl", "prompt": plain, "clip_skip": skip + 1, "windows": 1,
                      "reference": "diffusers encode_prompt"})
    xl.load_textual_inversion(vl, token="tiny-xl", text_encoder=xl.text_encoder, tokenizer=xl.tokenizer)
    xl.load_textual_inversion(vg, token="tiny-xl", text_encoder=xl.text_encoder_2, tokenizer=xl.tokenizer_2)
    prompt = "a tiny-xl circle"
    e, _, pooled, _ = xl.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    golden["sdxl.ti.context"], golden["sdxl.ti.pooled"] = e[0], pooled[0]
    cases.append({"key": "sdxl.ti", "model": "sdxl", "prompt": prompt, "clip_skip": 1, "windows": 1,
                  "embeddings": ["tiny-xl.safetensors"], "reference": "diffusers load_textual_inversion (both encoders) + encode_prompt"})

    mf.save_golden(out / "golden.safetensors", golden, {"cases": cases, "versions": mf.versions()})
    print(f"prompt fixtures: {len(PARSER_PROMPTS)} parser prompts, {len(cases)} encoder cases -> {out}")


if __name__ == "__main__":
    main()
