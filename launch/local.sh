#!/usr/bin/env bash
# One host, all its accelerators: JAX sees every local GPU/TPU and the train step is
# data-parallel over them. Hyperparameters live in the config; extra flags pass through.
#
#   launch/local.sh configs/wmt14.py:size=big runs/wmt14-big [--config.seed=1 ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--flags...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
exec python -m attn.train --config="$config" --workdir="$workdir" "$@"
