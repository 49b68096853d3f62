#!/bin/bash
# TPU pod slice: run the same command on every worker; jax.distributed.initialize() finds the pod itself.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/stage1_gau.py:bagel_7b_mot gs://bucket/runs/s1 --config.data.dir=/data
set -euo pipefail
TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.k=v ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}" --worker=all --command \
  "cd ~/synermedgen-jax && python -m synermedgen_jax train --distributed auto --config ${CONFIG} --workdir ${WORKDIR}${EXTRA}"
