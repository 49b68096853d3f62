#!/bin/bash
# TPU pod slice: the same training command on every worker, detached from the ssh session.
#   launch/tpu_pod.sh [--dry-run] [--skip-setup] TPU_NAME ZONE CONFIG WORKDIR [--config.k=v ...]
#   launch/tpu_pod.sh [--dry-run] --logs TPU_NAME ZONE [WORKER]     # follow one worker's log (default 0)
#   launch/tpu_pod.sh [--dry-run] --stop TPU_NAME ZONE              # SIGTERM: save a checkpoint, exit 0
# e.g. launch/tpu_pod.sh my-v5p-128 us-east5-a configs/stage1_gau.py:bagel_7b_mot gs://bucket/runs/s1 \
#        --config.data.dir=/data
# Steps (each is one gcloud command on all workers; --dry-run prints them instead of running them):
#  1. setup (skipped by --skip-setup): the repository's committed HEAD (git archive; uncommitted changes are not
#     sent) is copied to every worker into TPU_REPO_DIR, and a virtualenv there gets requirements.txt and
#     jax[tpu]==0.10.2 (libtpu). Every worker runs the same code and the same pinned JAX.
#  2. train: `python -m synermedgen_jax train --distributed auto` under setsid + nohup, so it outlives the ssh
#     session (and gcloud returns); output goes to TPU_REPO_DIR/logs/train-<worker hostname>.log on each worker,
#     its pid to train-<hostname>.pid. A worker whose previous run is still alive refuses to start a second one.
#     jax.distributed.initialize() finds the pod itself. The workdir must be shared storage (a gs:// bucket).
# Environment:
#  TPU_REPO_DIR       checkout on the workers (default: $HOME/synermedgen-jax, expanded on the worker)
#  TPU_PYTHON         interpreter for the virtualenv (default python3; jax 0.10.2 needs Python >= 3.11)
#  LIBTPU_INIT_ARGS   replaces the default libtpu flags below (set it to " " for none)
#  CLOUDSDK_CORE_PROJECT  the GCP project gcloud uses, if not its configured default
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

# Default libtpu flags, from JAX's "XLA compiler flags" page (TPU section) and MaxText's TPU configs: overlap the
# FSDP all-gathers / reduce-scatters with compute, which is what a fsdp-sharded 7B step spends its collectives on.
DEFAULT_LIBTPU_INIT_ARGS=(
  --xla_tpu_enable_async_collective_fusion=true                 # fuse async collectives into the compute between start/done
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true # ... all-gathers included (FSDP weight gathers)
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true  # ... a collective may span several fusions
  --xla_tpu_overlap_compute_collective_tc=true                  # overlap compute and communication on one TensorCore
  --xla_enable_async_all_gather=true                            # all-gathers run asynchronously
)
LIBTPU_ARGS=${LIBTPU_INIT_ARGS:-${DEFAULT_LIBTPU_INIT_ARGS[*]}}
REPO_DIR=${TPU_REPO_DIR:-\$HOME/synermedgen-jax}  # left unexpanded: the worker's $HOME
PY=${TPU_PYTHON:-python3}
JAX_TPU='jax[tpu]==0.10.2'
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

DRY=0
ACTION=train
SETUP=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip-setup) SETUP=0 ;;
    --logs) ACTION=logs ;;
    --stop) ACTION=stop ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done

quote() {  # one shell word per argument, readable: plain words bare, the rest in single quotes
  local out=() arg
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("${arg}")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {  # --dry-run prints the command (copy-pastable) instead of running it
  if [[ "${DRY}" == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

TPU=${1:?$(usage)}
ZONE=${2:?$(usage)}
SSH=(gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}")

case "${ACTION}" in
  logs)
    run "${SSH[@]}" --worker="${3:-0}" --command "tail -n 200 -F \"${REPO_DIR}\"/logs/train-*.log"
    exit 0
    ;;
  stop)
    # The trainers catch SIGTERM: all processes agree on a step, save it and exit 0 (rerun this script to resume).
    run "${SSH[@]}" --worker=all --command \
      "for f in \"${REPO_DIR}\"/logs/train-*.pid; do [ -f \"\$f\" ] && kill -TERM \"\$(cat \"\$f\")\" 2>/dev/null; done; true"
    exit 0
    ;;
esac

CONFIG=${3:?$(usage)}
WORKDIR=${4:?$(usage)}
shift 4
TRAIN_ARGS=$(quote -m synermedgen_jax train --distributed auto --config "${CONFIG}" --workdir "${WORKDIR}" "$@")

if [[ "${SETUP}" == 1 ]]; then
  ARCHIVE="${TMPDIR:-/tmp}/synermedgen-jax.tar.gz"
  run git -C "${REPO_ROOT}" archive --format=tar.gz -o "${ARCHIVE}" HEAD
  run gcloud compute tpus tpu-vm scp "${ARCHIVE}" "${TPU}:synermedgen-jax.tar.gz" --zone "${ZONE}" --worker=all
  # Python first: a 3.10 image would otherwise fail deep inside pip with "no matching distribution for jax".
  run "${SSH[@]}" --worker=all --command "set -e; mkdir -p \"${REPO_DIR}\"; \
tar -xzf ~/synermedgen-jax.tar.gz -C \"${REPO_DIR}\"; cd \"${REPO_DIR}\"; \
${PY} -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
{ echo \"\$(hostname): ${PY} is older than 3.11; set TPU_PYTHON (e.g. python3.11)\" >&2; exit 1; }; \
[ -x .venv/bin/python ] || ${PY} -m venv .venv; \
.venv/bin/python -m pip install -q -r requirements.txt '${JAX_TPU}'"
fi

# setsid: a new session, so the end of the ssh session sends it no SIGHUP; nohup as well for shells that do;
# stdin from /dev/null and all output to the log, so ssh holds no descriptor of it and returns at once.
run "${SSH[@]}" --worker=all --command "set -e; cd \"${REPO_DIR}\"; mkdir -p logs; \
pid=logs/train-\$(hostname).pid; log=logs/train-\$(hostname).log; \
if [ -f \"\$pid\" ] && kill -0 \"\$(cat \"\$pid\")\" 2>/dev/null; then \
echo \"\$(hostname): a run is still going (pid \$(cat \"\$pid\")); stop it first: launch/tpu_pod.sh --stop\" >&2; exit 1; fi; \
export LIBTPU_INIT_ARGS=$(quote "${LIBTPU_ARGS}"); \
setsid nohup .venv/bin/python ${TRAIN_ARGS} >>\"\$log\" 2>&1 </dev/null & echo \$! >\"\$pid\"; \
echo \"\$(hostname): started pid \$(cat \"\$pid\"), log ${REPO_DIR}/\$log\""
echo "follow: launch/tpu_pod.sh --logs ${TPU} ${ZONE} [WORKER]   stop (saves first): launch/tpu_pod.sh --stop ${TPU} ${ZONE}"
