#!/usr/bin/env bash
# Runs the same training command on every worker of a TPU VM slice. jax.distributed
# detects the pod; the workdir must be shared storage (e.g. a gs:// bucket).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/wmt14.py:size=big gs://bucket/runs/wmt14-big
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--flags...]" >&2
  exit 2
fi
tpu=$1
zone=$2
config=$3
workdir=$4
shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd ~/attn && python -m attn.train --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")${extra}"
