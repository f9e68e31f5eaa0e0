#!/usr/bin/env bash
# Creates the Python environment of tools/reference/make_fixtures.py: the reference
# implementation (diffusers + transformers on PyTorch) at the versions that produced
# tests/fixtures/ref. Only needed to regenerate those fixtures; the Rust tests read
# the committed files and never need Python.
#
#   tools/reference/setup.sh                  # venv at $SDRS_REF_VENV, default /work/venv-ref
#   SDRS_REF_VENV=~/venvs/sdrs-ref tools/reference/setup.sh
#
# torch is PyPI's default wheel (a CUDA build, a few GB); the fixtures are computed on
# the CPU, so a CPU-only torch 2.15.0 gives the same results. Safe to run repeatedly.
set -euo pipefail
VENV="${SDRS_REF_VENV:-/work/venv-ref}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "sdrs reference: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --disable-pip-version-check -q \
  torch==2.15.0 \
  diffusers==0.42.1 \
  transformers==5.24.0 \
  tokenizers==0.23.3 \
  safetensors==0.8.0 \
  numpy==2.4.6 \
  accelerate==1.15.0 \
  huggingface-hub==2.4.0 \
  Pillow==13.0.0
# tools/reference/sampler_fixtures.py: k-diffusion's sampling module and what it imports
# (--no-deps: the package's own requirements are training tools it does not need here).
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps \
  k-diffusion==0.1.1.post1 \
  torchsde==0.2.6 \
  trampoline==0.1.2 \
  torchdiffeq==0.2.5 \
  scipy==1.17.1
# tools/reference/esrgan_fixtures.py: spandrel's RRDBNet and SRVGGNetCompact (its package
# imports torchvision; --no-deps keeps torch at the pin above, which that wheel loads with).
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps \
  spandrel==0.4.2 \
  einops==0.8.2 \
  torchvision==0.29.2
# tools/demo/train_controlnet.py reads the shipped demo GGUF with llama.cpp's reader.
"$VENV/bin/python" -m pip install --disable-pip-version-check -q gguf==0.19.0
"$VENV/bin/python" - <<'EOF'
import diffusers, numpy, safetensors, torch, transformers
print("sdrs reference: torch", torch.__version__, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__, "safetensors", safetensors.__version__, "numpy", numpy.__version__)
EOF
echo "sdrs reference: run  $VENV/bin/python tools/reference/make_fixtures.py --out tests/fixtures/ref" >&2
echo "sdrs reference: and   $VENV/bin/python tools/reference/sampler_fixtures.py --out tests/fixtures/samplers" >&2
echo "sdrs reference: and   $VENV/bin/python tools/reference/ddpm_fixtures.py --out tests/fixtures/ref" >&2
echo "sdrs reference: and   $VENV/bin/python tools/reference/score_sde_fixtures.py --out tests/fixtures/ref" >&2
echo "sdrs reference: and   $VENV/bin/python tools/reference/esrgan_fixtures.py --out tests/fixtures/ref" >&2
