#!/usr/bin/env bash
# One host, all its accelerators: JAX sees every local GPU/TPU and the train step is
# data-parallel over them. Hyperparameters live in the config; extra flags pass through.
#
#   launch/local.sh configs/wmt14.py:size=big runs/wmt14-big [--config.seed=1 ...]
#
# PROCESSES=N starts N processes on this host that join over loopback (jax.distributed,
# coordinator 127.0.0.1:$PORT), as N hosts would: a multi-host run rehearsed on one
# machine. Each process sees all local devices unless the environment splits them
# (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=K on CPU). If one process
# fails, the others are stopped and the script exits non-zero.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: [PROCESSES=N] [PORT=P] $0 CONFIG WORKDIR [--flags...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
processes=${PROCESSES:-1}
if [[ $processes -eq 1 ]]; then
  exec python -m attn.train --config="$config" --workdir="$workdir" "$@"
fi
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < processes; i++)); do
  python -m attn.train --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$processes" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then
    status=1
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit "$status"
