#!/usr/bin/env python3
"""Cross-checks a GGUF written by sdrs with the reference Python reader (PyPI `gguf`).

Usage: check_gguf.py FILE.gguf [EXPECTED_TENSOR_COUNT]
Checks: the file parses; general.architecture and the sdrs config keys are present;
every tensor's bytes lie inside the file; tensor names are unique; for f32/f16 tensors
the values are finite. Exits non-zero with a message on any failure.
"""
import sys

import numpy as np
from gguf import GGUFReader


def main() -> int:
    path = sys.argv[1]
    r = GGUFReader(path)
    fields = {f.name: f for f in r.fields.values()}

    def scalar(name):
        f = fields[name]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0].name == "STRING" else v[0]

    for key in ("general.architecture", "sd.family", "sd.prediction", "sd.unet.model_channels",
                "sd.vae.scaling_factor", "sd.text_encoder.count", "tokenizer.ggml.tokens", "sd.source.sha256"):
        if key not in fields:
            print(f"{path}: missing metadata key {key}")
            return 1
    assert scalar("general.architecture") == "stable-diffusion"
    names = [t.name for t in r.tensors]
    if len(names) != len(set(names)):
        print(f"{path}: duplicate tensor names")
        return 1
    if len(sys.argv) > 2 and len(names) != int(sys.argv[2]):
        print(f"{path}: {len(names)} tensors, expected {sys.argv[2]}")
        return 1
    for t in r.tensors:
        if t.tensor_type.name in ("F32", "F16") and not np.isfinite(np.asarray(t.data, dtype=np.float32)).all():
            print(f"{path}: tensor {t.name} has non-finite values")
            return 1
    longest = max(names, key=len)
    print(f"ok: {path}: {len(names)} tensors, {len(fields)} fields, longest name {len(longest)} bytes, family {scalar('sd.family')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
