#!/usr/bin/env bash
# Installs what building sdrs needs and a fresh Debian machine lacks:
#   cmake        - the ggml C library is built by llama-cpp-sys-2 with CMake
#   libclang-dev - bindgen (ours and llama-cpp-sys-2's) parses the ggml headers with libclang
#   gguf (PyPI)  - only for tools/check_gguf.py, the cross-check with the reference Python reader
# Safe to run repeatedly; installs nothing that is already there.
set -euo pipefail
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
if [ -z "${LIBCLANG_PATH:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so'; then
  missing+=(libclang-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "sdrs setup: installing ${missing[*]} (apt-get)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "sdrs setup: missing ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import gguf' 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check gguf >/dev/null 2>&1 \
    || echo "sdrs setup: could not pip install gguf (only tools/check_gguf.py needs it)" >&2
fi
