#!/usr/bin/env bash
# The dependency audit: cargo-deny over every crate sdrs and its JNI library build
# with, against deny.toml:
#   licences  every dependency under a licence deny.toml allows (permissive ones we
#             can ship in a binary, a library and an Android library under MIT);
#   sources   crates.io only: no git dependencies, no other registries;
#   bans      no wildcard version requirements.
#   yanked    no locked version withdrawn by its authors (tools/yanked.py, against
#             crates.io's index), for the shipped workspace and the fuzz workspace.
# Advisories (RustSec) need the advisory database, which cargo-deny fetches from
# GitHub: checked when GitHub answers, and otherwise reported as not checked, never
# as passed. CI machines reach the package registries only, so the yanked check is
# the part of an advisory audit they can make.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deny --version >/dev/null 2>&1; then
  # ~5 minutes to build on 2 cores.
  cargo install cargo-deny --version 0.20.2 --locked
fi
cargo deny --locked check --hide-inclusion-graph licenses bans sources
python3 tools/yanked.py Cargo.lock fuzz/Cargo.lock
if timeout 20 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  cargo deny --locked check advisories
else
  echo "audit: github.com (RustSec's advisory database) is unreachable: advisories NOT checked" >&2
fi
