#!/usr/bin/env bash
# The GPU fast-path measurements in one go: base and big at 96 x 256 (ANCHORS.md's
# setting), each fast-path switch against the float32 reference attention baseline, then
# decode. One JSON file per measurement under ${OUT:-bench}/.
#
#   bash experiments/benchmark/gpu.sh            # PEAK=989 (H100/H200 dense bf16)
set -euo pipefail
out="${OUT:-bench}"
peak="${PEAK:-989}"
mkdir -p "$out"
speed() {  # speed NAME ARGS...
  local name="$1"
  shift
  python experiments/benchmark/speed.py --peak_tflops="$peak" "$@" >"$out/$name.json" \
    2>"$out/$name.err" || echo "failed: $name (see $out/$name.err)"
  echo "$name: $(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["measured"])' \
    "$out/$name.json" 2>/dev/null || true)"
}
for row in base big; do
  config="--config=configs/table3.py:row=$row"
  speed "$row-fp32" "$config" --what=train
  speed "$row-bf16" "$config" --what=train --config.model.dtype=bfloat16 \
    --compare=model.dtype=float32
  speed "$row-bf16-cudnn" "$config" --what=train --config.model.dtype=bfloat16 \
    --config.model.attention=cudnn --compare=model.attention=reference
  speed "$row-bf16-cudnn-rbg" "$config" --what=train --config.model.dtype=bfloat16 \
    --config.model.attention=cudnn --config.prng_impl=unsafe_rbg \
    --compare=prng_impl=threefry2x32
done
speed decode-base "--config=configs/table3.py:row=base" --what=decode \
  --config.model.dtype=bfloat16 --compare=model.dtype=float32
