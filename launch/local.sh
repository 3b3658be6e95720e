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
# fails, the others are stopped and the script exits with its status.
#
# A run stopped early by a SIGTERM to attn.train (a preemption) saves its checkpoint and
# exits 75: it is started again to resume, up to RETRIES times (default 3). A Ctrl-C or a
# SIGTERM to this script is passed on to the processes, and they are not restarted.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: [PROCESSES=N] [PORT=P] [RETRIES=K] $0 CONFIG WORKDIR [--flags...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
processes=${PROCESSES:-1}
retries=${RETRIES:-3}
preempted=75 # attn.errors.PREEMPTED
pids=()
stopped=0

stop() {
  stopped=1
  kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM

start() { # the processes of one attempt, in the background; their ids in `pids`
  local port=${PORT:-$((20000 + RANDOM % 20000))} i
  pids=()
  for ((i = 0; i < processes; i++)); do
    local cluster=()
    if ((processes > 1)); then
      cluster=(--coordinator_address="127.0.0.1:$port" --num_processes="$processes"
        --process_id="$i")
    fi
    python -m attn.train --config="$config" --workdir="$workdir" "${cluster[@]}" "$@" &
    pids+=($!)
  done
}

finish() { # waits for every process: 0, or 75 if any stopped early, or the first failure
  local status=0 left=${#pids[@]} pid rc
  while ((left > 0)); do
    pid=''
    rc=0
    wait -n -p pid "${pids[@]}" || rc=$?
    [[ -n ${pid:-} ]] || continue # a signal, passed on by `stop`: keep waiting
    left=$((left - 1))
    if ((rc == preempted && status == 0)); then
      status=$rc
    elif ((rc != 0 && rc != preempted && (status == 0 || status == preempted))); then
      status=$rc
      kill "${pids[@]}" 2>/dev/null || true
    fi
  done
  return "$status"
}

for ((attempt = 0; ; attempt++)); do
  start "$@"
  status=0
  finish || status=$?
  if ((status != preempted || stopped || attempt >= retries)); then
    exit "$status"
  fi
  echo "attn.train stopped early with its checkpoint saved: restarting it to resume" \
    "($((attempt + 1)) of $retries)." >&2
done
