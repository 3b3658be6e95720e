#!/usr/bin/env bash
# Every GPU measurement of the fast path in one call, most important first, at the peers'
# setting (96 x 256 tokens per side, vocabulary 32768; ANCHORS.md):
#   1. base with every switch on (bfloat16, cuDNN attention, unsafe_rbg dropout) against
#      one switch off at a time (float32 turns cuDNN off too) and the float32 reference,
#      in the same process
#      (`baselines` in the JSON; speedup > 1 = the switches help); big against its reference;
#   2. base beam-4 decoding in bfloat16 against float32;
#   3. a ranked profile of base with the switches on (profile-base.txt);
#   4. big's switches one at a time, the memory switches (loss_chunk, remat), an XLA flag.
# A measurement is started only while BUDGET seconds (default 480) have not passed, and
# is stopped at the budget (the trace summary and the archive come after it). Memory
# figures: XLA's estimate of each step, and the device allocator's peak so far in the
# process (only a process's first measurement owns its peak). Results: $OUT/summary.txt (one line per measurement),
# $OUT/profile-base.txt and $OUT/results.tgz (each measurement's JSON and stderr).
#
# Needs jax, flax, optax and ml_collections (the benchmark imports no data stack). On a
# machine without ml_collections (or with a flax older than pyproject's), fetch wheels here
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0 flax==0.12.12
# (tested beside jax 0.11.2 and 0.12.0), carry `.whl`, and run from the repo root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site OUT=$OUT bash experiments/benchmark/gpu.sh
# A dry run on a CPU (no cuDNN there): OUT=/tmp/b FAST=--config.model.dtype=bfloat16 \
#   EXTRA="--batch=2 --length=8 --steps=2 --warmup=1 --runs=1 --vocab=64" bash experiments/benchmark/gpu.sh
set -uo pipefail
out="${OUT:-bench}"
peak="${PEAK:-989}"  # dense bf16 TFLOP/s of one H100/H200
budget="${BUDGET:-480}"
python="${PYTHON:-python3}"
read -r -a extra <<<"${EXTRA:-}"
work="$(mktemp -d)"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: >"$summary"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$python" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'
} >>"$summary" 2>&1

speed() { # speed NAME ARGS...: one process of speed.py; its lines go to the summary
  local name="$1" left=$((budget - SECONDS))
  shift
  if ((left < 20)); then
    echo "$name skipped: budget spent" >>"$summary"
    return
  fi
  timeout -k 15 "$left" "$python" experiments/benchmark/speed.py --peak_tflops="$peak" "$@" \
    "${extra[@]}" >"$work/$name.json" 2>"$work/$name.err"
  local rc=$?
  if ((rc == 0)); then
    "$python" - "$work/$name.json" "$name" >>"$summary" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
def line(label, parts, speedup=None):
    for part, m in parts.items():
        if part == 'train':
            text = (f"{m['step_ms']} ms/step, {m['tflops_per_s']} TFLOP/s, MFU {m.get('mfu')}, "
                    f"XLA {m['xla_memory_gib']} GiB, peak {m['device_peak_gib']} GiB, "
                    f"compile {m['compile_s']} s")
        else:
            text = f"{m['target_tokens_per_s']} target tok/s, {m['sentences_per_s']} sent/s"
        ratio = f'  (measured config {speedup[part]}x as fast)' if speedup else ''
        print(f'{label:60s} {part:6s} {text}{ratio}')
line(sys.argv[2], report['measured'])
for b in report['baselines']:
    if 'error' in b:
        print(f"  vs {b['overrides']}: failed: {b['error'][:200]}")
    else:
        line(f"  vs {b['overrides']}", {k: b[k] for k in ('train', 'decode') if k in b},
             b['speedup'])
EOF
  elif ((rc == 124)); then
    echo "$name stopped at the budget (${left}s were left)" >>"$summary"
  else
    echo "$name failed (exit $rc): $(grep -v '^[IW][0-9]' "$work/$name.err" | tail -n 3 | tr '\n' ' ')" >>"$summary"
  fi
}

read -r -a fast <<<"${FAST:---config.model.dtype=bfloat16 --config.model.attention=cudnn \
--config.prng_impl=unsafe_rbg}"
reference=model.dtype=float32,model.attention=reference,prng_impl=threefry2x32
table3="--config=configs/table3.py:row"
speed base-fast "$table3=base" --what=train "${fast[@]}" --compare=prng_impl=threefry2x32 \
  --compare=model.attention=fused --compare=model.dtype=float32,model.attention=fused \
  --compare="$reference"
speed big-fast "$table3=big" --what=train "${fast[@]}" --compare="$reference"
speed decode-base "$table3=base" --what=decode --config.model.dtype=bfloat16 \
  --compare=model.dtype=float32
speed profile-base "$table3=base" --what=train --steps=5 "${fast[@]}" \
  --profile_dir="$work/profile-base"
"$python" experiments/benchmark/trace_summary.py "$work/profile-base" --top=25 \
  >"$out/profile-base.txt" 2>&1 || echo "no trace summary" >>"$summary"
speed big-fast-switches "$table3=big" --what=train "${fast[@]}" \
  --compare=prng_impl=threefry2x32 --compare=model.attention=fused
speed base-memory "$table3=base" --what=train "${fast[@]}" \
  --compare=loss_chunk=64 --compare=model.remat=dots --compare=model.remat=full
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false ${XLA_FLAGS:-}" \
  speed base-fast-no-triton-gemm "$table3=base" --what=train "${fast[@]}"

tar czf "$out/results.tgz" -C "$work" --exclude=profile-base . && rm -rf "$work"
cat "$summary"
