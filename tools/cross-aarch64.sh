#!/usr/bin/env bash
# Cross-builds sdrs for aarch64 Linux (Raspberry Pi 4/5, ARM boards and servers) on
# x86-64 Debian 12. Under qemu-aarch64, for three CPUs:
#   -cpu cortex-a72  Raspberry Pi 4: NEON, no dot product
#   -cpu max         dot product, i8mm, fp16 arithmetic, SVE/SVE2, SME, run with
#                    128-bit SVE vectors (Armv9 phone cores) and with 256-bit ones
#                    (Neoverse V1 servers); ggml's SVE kernels branch on the length
# `check` shows which of ggml's CPU libraries each one loads (and that a Vulkan request
# is refused clearly); `test` also runs the model tests on every CPU; `quick` runs
# the tests each CPU adds something to (about a third of `test`'s emulated time):
#   cortex-a72   the x86-recorded images (platform): the plain NEON kernels;
#   max, 128-bit the ggml wrapper's kernel checks (ggml);
#   max, 256-bit every model test (platform, reference, ggml): dot product, i8mm,
#                fp16 and the SVE kernels at the length they were written for.
# Emulation proves results, not speed: never read its timings as a device's.
#
# qemu's own default for `max` is 512-bit SVE, where ggml's q4_K dot product with i8mm
# (ggml-cpu/arch/arm/quants.c, the two-row path, written for 256 bits: SV_ALL loads)
# reads past its blocks: tests/ggml.rs catches it. No shipping CPU pairs 512-bit SVE
# with i8mm (A64FX has no i8mm), so that length is left out of the runs.
#
# Usage: tools/cross-aarch64.sh [build|check|quick|test]
# Output: target/aarch64/aarch64-unknown-linux-gnu/release/sdrs and libsdrs.so (the JNI
# library), with ggml's shared libraries and its libggml-cpu-armv*.so variants under
# .../build/llama-cpp-sys-2-*/out; `build` checks they are all 16 KB page aligned.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-build}
case $mode in
  build|check|quick|test) ;;
  *) echo "usage: tools/cross-aarch64.sh [build|check|quick|test]" >&2; exit 2 ;;
esac
tools/setup.sh --aarch64

target=aarch64-unknown-linux-gnu
dir=target/aarch64
# Debian's rustc-web, whose aarch64 standard library is a Debian package (rustup
# cannot download targets on these machines); cargo stays rustup's.
export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# ggml's CPU variants go up to armv9.2-a+sme, which gcc 12 cannot target; clang 16
# can, with the cross gcc's sysroot and libraries.
export CC_aarch64_unknown_linux_gnu=clang-16 CXX_aarch64_unknown_linux_gnu=clang++-16
# Debian's spelling of the triple, given last, makes clang use the cross binutils
# (aarch64-linux-gnu-ld); .cargo/config.toml's define must be repeated here, as
# target-specific flags replace the general ones.
export CFLAGS_aarch64_unknown_linux_gnu="--target=aarch64-linux-gnu -DGGML_MAX_NAME=128"
export CXXFLAGS_aarch64_unknown_linux_gnu="$CFLAGS_aarch64_unknown_linux_gnu"
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--sysroot=/usr/aarch64-linux-gnu"
# No Vulkan on this target: ggml would have to build its shader generator for the host.
features=(--no-default-features --features demo-model)
start=$(date +%s)
cargo build --release --locked --target "$target" --target-dir "$dir" "${features[@]}"
# The JNI library too (the same ggml build: no Vulkan, the demo model), and the 16 KB
# page alignment of it and of ggml's libraries beside it (tools/elf-align.sh).
cargo build --release --locked --target "$target" --target-dir "$dir" -p sdrs-jni --no-default-features
ggml_libs=$(ls -d "$dir/$target"/release/build/llama-cpp-sys-2-*/out/lib | head -n 1)
tools/elf-align.sh "$dir/$target/release/libsdrs.so" "$ggml_libs"/libggml.so "$ggml_libs"/libggml-base.so \
  "$ggml_libs"/../backends/libggml-cpu-*.so
echo "aarch64 build: $(( $(date +%s) - start )) s"
[ "$mode" = build ] && exit 0

# The guest's C runtime is Debian's arm64 multiarch one (libc6:arm64, libstdc++6:arm64
# under /lib/aarch64-linux-gnu, as on a Raspberry Pi OS or Debian board), not the cross
# toolchain's copy in /usr/aarch64-linux-gnu: under qemu 7.2 and 10 that glibc (2.36-8cross1)
# made sdrs spin forever inside pthread mutex code before its first log line (gdb).
qemu=(qemu-aarch64 -L /)
# This build has no Vulkan: asking for it must say how to get it, not crash.
bin="$dir/$target/release/sdrs"
if out=$("${qemu[@]}" "$bin" generate -p x --backend vulkan 2>&1); then
  echo "--backend vulkan ran on a build without Vulkan"; exit 1
fi
grep -q "built without Vulkan" <<<"$out" || { echo "$out"; exit 1; }

# The model tests: the diffusers-made tiny model at every weight type, the demo model
# and the real TAEF2 against the results recorded on x86-64 (platform), the tiny SD 1/2
# models, TAESD and a 4-step trajectory against diffusers' golden tensors (reference,
# the same tolerances as on x86), and the ggml wrapper's own checks (ggml).
all=(--test platform --test reference --test ggml)
for cpu in cortex-a72 max,sve-default-vector-length=16 max,sve-default-vector-length=32; do
  tests=("${all[@]}")
  if [ "$mode" = quick ]; then
    case $cpu in
      cortex-a72) tests=(--test platform) ;;
      *length=16) tests=(--test ggml) ;;
    esac
  fi
  runner="${qemu[*]} -cpu $cpu"
  echo "== qemu-aarch64 -cpu $cpu: the CPU library ggml picks"
  info=$($runner "$bin" info --system)
  grep -E 'features:|lib:|kernels:' <<<"$info"
  case $cpu in
    cortex-a72) grep -q 'libggml-cpu-armv8.0' <<<"$info" ;;
    max*) grep -q 'libggml-cpu-armv9.2' <<<"$info" && grep -q 'DOTPROD' <<<"$info" ;;
  esac || { echo "ggml loaded the wrong CPU library for -cpu $cpu"; exit 1; }
  [ "$mode" = check ] && continue
  start=$(date +%s)
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$runner" \
    cargo test --release --locked --target "$target" --target-dir "$dir" "${features[@]}" "${tests[@]}"
  echo "qemu -cpu $cpu tests: $(( $(date +%s) - start )) s"
done
