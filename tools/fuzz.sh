#!/usr/bin/env bash
# Fuzzing every parser that reads files from strangers (fuzz/, harness in src/fuzz.rs).
#
#   tools/fuzz.sh build                      install cargo-fuzz if needed, build the targets
#   tools/fuzz.sh run SECONDS [TARGET...]    fuzz each target for SECONDS (all by default),
#                                            two at a time; a summary line per target
#   tools/fuzz.sh seeds                      regenerate fuzz/seeds and fuzz/dict from ../shared
#   tools/fuzz.sh ledger                     each target's totals in fuzz/ledger.tsv
#
# Limits, as the hardening issue sets them: an input that runs over 10 s is a hang,
# over 2 GB of memory an out-of-memory; both, and every crash or sanitizer report,
# fail the run and leave the input under target/fuzz/artifacts/TARGET/.
# New corpus entries go to target/fuzz/corpus/TARGET (kept between runs on this
# machine; fuzz/seeds holds the committed seeds). With SDRS_FUZZ_LEDGER=1 each
# target's run is appended to fuzz/ledger.tsv, the record of fuzzing time.
#
# Toolchain: cargo-fuzz passes `-Zsanitizer=address` and friends, which only nightly
# compilers accept. We use the pinned stable compiler with RUSTC_BOOTSTRAP=1 instead:
# the same compiler that builds the product, and no extra toolchain to fetch (CI
# reaches the package registries, not rustup's servers).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
TARGETS=(gguf safetensors pickle ckpt diffusers_config lora embedding prompt image tokenizer)
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$triple/release
work=target/fuzz

build() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked
  fi
  # ggml stays uninstrumented: we fuzz our parsers, not ggml, and the `cc` crate's
  # automatic -fsanitize=address would build ggml against GCC's ASan runtime, which
  # cannot share a process with rustc's. With that flag cancelled, ggml's objects
  # are those of the release build, and ccache (tools/setup.sh installs it; ggml's
  # CMake uses it when present) serves them instead of a second 15-minute C++ build:
  # the sanitizer options are left out of its hash, and CCACHE_BASEDIR makes the two
  # build folders' paths the same.
  export CFLAGS="-DGGML_MAX_NAME=128 -fno-sanitize=address" CXXFLAGS="-DGGML_MAX_NAME=128 -fno-sanitize=address"
  export CCACHE_BASEDIR=$PWD CCACHE_IGNOREOPTIONS="-fsanitize=address -fno-sanitize=address -fno-ipa-icf-variables"
  # Release with debug assertions and overflow checks on (cargo-fuzz's defaults), so
  # an arithmetic overflow on a hostile size is a finding, not a silent wrap.
  cargo fuzz build -O --debug-assertions
}

run_one() {
  local t=$1 secs=$2
  mkdir -p "$work/corpus/$t" "$work/artifacts/$t" "$work/logs"
  local log=$work/logs/$t.log
  local scratch=/dev/shm
  [ -w "$scratch" ] || scratch=${TMPDIR:-/tmp}
  # The ledger records the seconds a run really lasted: a run that stops on a finding
  # has not fuzzed for the time it asked for.
  local start=$(date +%s)
  set +e
  TMPDIR=$scratch LD_LIBRARY_PATH=$ggml_libs ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
    "$bin_dir/$t" "$work/corpus/$t" "fuzz/seeds/$t" \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -max_len=1048576 -dict="fuzz/dict/$t.dict" -print_final_stats=1 -artifact_prefix="$work/artifacts/$t/" > "$log" 2>&1
  local rc=$?
  set -e
  local took=$(( $(date +%s) - start ))
  local execs cov ft
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  local found
  found=$(find "$work/artifacts/$t" -type f | wc -l)
  printf '%s\t%s\t%s s\t%s execs\tcov %s\tft %s\trc %s\tartifacts %s\n' "$(date -u +%F)" "$t" "$took" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$rc" "$found"
  if [ "${SDRS_FUZZ_LEDGER:-0}" = 1 ]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%F)" "$t" "$took" "${execs:-0}" "${cov:-0}" "${ft:-0}" "$rc" >> fuzz/ledger.tsv
  fi
  if [ "$rc" != 0 ]; then
    echo "== $t failed (exit $rc); the end of its log:" >&2
    tail -40 "$log" >&2
    return 1
  fi
}

ledger() {
  # Totals per target over every recorded run: the figures of the hardening issue's
  # closing table, and how far each target is from its hour.
  printf 'target\truns\tseconds\texecutions\tbest edges\tfailed runs\n'
  for t in "${TARGETS[@]}"; do
    awk -F'\t' -v t="$t" '!/^#/ && $2 == t { s += $3; e += $4; if ($5 > c) c = $5; n++; if ($7 != 0) f++ }
      END { printf "%s\t%d\t%d%s\t%d\t%d\t%d\n", t, n, s, (s >= 3600 ? "" : " (under 1 h)"), e, c, f }' fuzz/ledger.tsv
  done
}

case "${1:-}" in
  build) build ;;
  ledger) ledger ;;
  run)
    secs=${2:?seconds per target}
    shift 2
    list=("$@")
    [ ${#list[@]} -gt 0 ] || list=("${TARGETS[@]}")
    for t in "${list[@]}"; do
      [ -x "$bin_dir/$t" ] || { echo "no fuzz binary $bin_dir/$t: run tools/fuzz.sh build" >&2; exit 1; }
    done
    # ggml's shared libraries, which the binaries link (the rpath that build.rs sets
    # applies to sdrs' own binaries only).
    ggml_libs=${SDRS_FUZZ_GGML_LIBS:-$(dirname "$(find "fuzz/target/$triple/release/build" -name 'libggml-base.so.0' -print -quit)")}
    export -f run_one
    export bin_dir work ggml_libs
    # Two at a time: one per core of the machines this runs on.
    printf '%s\n' "${list[@]}" | xargs -P 2 -I{} bash -c 'run_one "$1" "$2"' _ {} "$secs"
    ;;
  seeds) cargo run --release --example fuzz_seeds -- ../shared fuzz/seeds ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
