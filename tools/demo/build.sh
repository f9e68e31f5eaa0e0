#!/usr/bin/env bash
# Turns a finished training run (tools/demo/train.py --work WORK) into sdrs's demo
# model: converts both diffusers folders with `sdrs convert`, installs the two shipped
# GGUFs in models/demo/, and measures the model card's accuracy table on the 256
# held-out caption/seed pairs for every variant.
#
#   tools/demo/build.sh /work/demo-train
#
# Shipped (committed; the LCM one is built into the binary):
#   models/demo/sdrs-demo-lcm-q8_0.gguf   LCM-distilled, 4 steps, the `generate` default
#   models/demo/sdrs-demo-base-q8_0.gguf  the base model (DPM++ 2M, 20 steps)
# Everything is q8_0, the token embedding too (3.2 M of the model's 10 M parameters,
# f16 by the default policy). Variants for the table go to WORK/gguf/.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK="${1:?usage: tools/demo/build.sh WORK}"
cargo build --release --quiet
sdrs=target/release/sdrs
out="$WORK/gguf"
mkdir -p "$out"
base_defaults="size=64,sampler=dpm++2m,scheduler=trailing,steps=20,cfg=${SDRS_DEMO_BASE_CFG:-2}"
lcm_defaults="size=64,sampler=lcm,steps=4,cfg=${SDRS_DEMO_LCM_CFG:-2}"
for t in f32 q8_0 q4_0; do
  emb=$([ "$t" = f32 ] && echo f32 || echo "$t")
  "$sdrs" convert "$WORK/out/demo-base" -o "$out/demo-base-$t.gguf" --type "$t" --tensor-type "token_embedding=$emb" --defaults "$base_defaults" --force
  "$sdrs" convert "$WORK/out/demo-lcm" -o "$out/demo-lcm-$t.gguf" --type "$t" --tensor-type "token_embedding=$emb" --defaults "$lcm_defaults" --force
done
cp "$out/demo-lcm-q8_0.gguf" models/demo/sdrs-demo-lcm-q8_0.gguf
cp "$out/demo-base-q8_0.gguf" models/demo/sdrs-demo-base-q8_0.gguf
cp "$WORK/journal.json" models/demo/journal.json
SDRS_DEMO_DIR="$out" cargo test --release --test demo -- --ignored --nocapture accuracy_table
cp "$out/accuracy.json" models/demo/accuracy.json
ls -l models/demo
SDRS_DEMO_PICTURES=docs/demo cargo test --release --test demo -- --ignored --nocapture readme_pictures
