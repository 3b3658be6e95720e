#!/usr/bin/env bash
# The GPU fast-path measurements in one go, at the peers' setting (96 x 256 tokens per side,
# vocabulary 32768; ANCHORS.md). For each row the switches are added one at a time, each
# measured once, so every step's gain is the ratio to the line before:
#   float32 reference attention -> bfloat16 -> + cuDNN attention -> + unsafe_rbg dropout PRNG
# then base decoding (beam 4) in float32 and bfloat16, and a profile of base with the
# switches on (profile-base.txt). One JSON per measurement in $OUT.
#
#   bash experiments/benchmark/gpu.sh [base big]      # PEAK=989 (H100/H200 dense bf16)
#   OUT=/tmp/b EXTRA="--batch=2 --length=8 --steps=2 --runs=1" bash experiments/benchmark/gpu.sh base
set -euo pipefail
out="${OUT:-bench}"
peak="${PEAK:-989}"
if [[ $# -gt 0 ]]; then rows=("$@"); else rows=(base big); fi
read -r -a extra <<<"${EXTRA:-}" # e.g. EXTRA="--steps=5" for a quick look
mkdir -p "$out"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/attn-jax}"

speed() { # speed NAME ARGS...: one measurement; a failure is reported and skipped
  local name="$1"
  shift
  if python experiments/benchmark/speed.py --peak_tflops="$peak" "$@" "${extra[@]}" \
    >"$out/$name.json" 2>"$out/$name.err"; then
    python - "$out/$name.json" "$name" <<'EOF'
import json, sys
result = json.load(open(sys.argv[1]))['measured']
for part, m in result.items():
    rate = f"{m['tflops_per_s']} TFLOP/s, MFU {m.get('mfu')}" if part == 'train' else ''
    time = f"{m['step_ms']} ms/step" if part == 'train' else f"{m['target_tokens_per_s']} tok/s"
    print(f'{sys.argv[2]:28s} {part:6s} {time:>16s}  {rate}')
EOF
  else
    echo "$name failed: see $out/$name.err"
  fi
}

for row in "${rows[@]}"; do
  config="--config=configs/table3.py:row=$row"
  speed "$row-fp32" "$config" --what=train
  speed "$row-bf16" "$config" --what=train --config.model.dtype=bfloat16
  speed "$row-bf16-cudnn" "$config" --what=train --config.model.dtype=bfloat16 \
    --config.model.attention=cudnn
  speed "$row-bf16-cudnn-rbg" "$config" --what=train --config.model.dtype=bfloat16 \
    --config.model.attention=cudnn --config.prng_impl=unsafe_rbg
done
speed decode-base-fp32 --config=configs/table3.py:row=base --what=decode
speed decode-base-bf16 --config=configs/table3.py:row=base --what=decode \
  --config.model.dtype=bfloat16
# Where base's time goes with the switches on: a trace of 3 steps, ranked by operation.
speed profile-base --config=configs/table3.py:row=base --what=train --steps=5 \
  --config.model.dtype=bfloat16 --config.model.attention=cudnn --profile_dir="$out/profile-base"
python experiments/benchmark/trace_summary.py "$out/profile-base" --top=25 \
  >"$out/profile-base.txt" 2>&1 || echo "no trace summary: see $out/profile-base.txt"
