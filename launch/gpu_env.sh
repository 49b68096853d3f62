#!/bin/bash
# GPU environment for multi-GPU training, in one place. launch/slurm.sbatch sources it; source it yourself before
# any other GPU launch:
#   . launch/gpu_env.sh            # sets the variables below in this shell
#   bash launch/gpu_env.sh         # prints what it would set (XLA_FLAGS, cache dir, memory fraction) and exits
#   bash launch/gpu_env.sh --help
# What it does:
#  - appends the XLA GPU flags below to XLA_FLAGS. A flag your XLA_FLAGS already names keeps your value (XLA takes
#    the last occurrence of a flag, so appending ours after yours would silently override you).
#  - JAX_COMPILATION_CACHE_DIR: a persistent compilation cache, so a requeued or restarted job reuses the compiled
#    train step instead of compiling it again. Default: runs/jax_cache under the current directory (the submit
#    directory on SLURM, which every node can see); set JAX_COMPILATION_CACHE_DIR to put it elsewhere (a gs:// URL
#    works too). Only process 0 writes entries; every process reads them.
#  - XLA_PYTHON_CLIENT_MEM_FRACTION: left to JAX (it preallocates 75% of each GPU) unless you ask, with
#    SMG_MEM_FRACTION=0.9 (or by exporting XLA_PYTHON_CLIENT_MEM_FRACTION yourself). Ask when
#    `python -m synermedgen_jax plan` gives a per-device peak above 75% of the card (60 GB on an 80 GB H100), e.g.
#    Stage II of the 7B-MoT at --mesh data=1,fsdp=8,tensor=8 (63 GB accelerator-equivalent).
# Every flag here is one that jaxlib 0.10.2 parses (tests/test_launchers.py runs JAX with them: XLA aborts at start
# on an unknown flag).

_smg_gpu_env_usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# Sources: JAX "GPU performance tips" and "XLA compiler flags" (docs.jax.dev), NVIDIA JAX-Toolbox
# "GPU performance" (docs.nvidia.com/jax-toolbox). Reasons, one line each:
SMG_GPU_XLA_FLAGS=(
  # Schedule collectives asynchronously around compute so FSDP all-gathers / reduce-scatters overlap the layers
  # (default in recent XLA; explicit so a PGLE or older-jaxlib run gets it too).
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Give the collective stream priority over compute streams, so overlapped collectives are not starved.
  --xla_gpu_enable_highest_priority_async_stream=true
  # Pipeline collectives across while-loop iterations: here the gradient-accumulation scan (train.accum > 1);
  # the decoder is an unrolled Python loop, so its layers are overlapped by the scheduler above, not by these.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Combine small collectives up to 1 GiB: at least one 7B-MoT decoder layer's gathered weights (~0.93 GB in
  # bf16) go as one collective, while the bound stops XLA from merging the independent gathers of many layers
  # into one huge buffer (that would undo FSDP's memory saving).
  --xla_gpu_all_gather_combine_threshold_bytes=1073741824
  --xla_gpu_reduce_scatter_combine_threshold_bytes=1073741824
  # The data-axis gradient all-reduce crosses nodes (InfiniBand): fewer, larger all-reduces amortise latency.
  --xla_gpu_all_reduce_combine_threshold_bytes=1073741824
  # FSDP shards `embed`, dim 0 of q/k/v/gate/up kernels but dim 1 of o/down: combine regardless of the dim.
  --xla_gpu_enable_all_gather_combine_by_dim=false
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
)

_smg_append_xla_flag() {  # --name=value; skipped when XLA_FLAGS already names --name
  local name=${1%%=*}
  case " ${XLA_FLAGS:-} " in
    *" ${name}="* | *" ${name} "*) ;;
    *) XLA_FLAGS="${XLA_FLAGS:+${XLA_FLAGS} }$1" ;;
  esac
}

_smg_gpu_env() {  # $1 = show: change nothing on disk
  local flag
  for flag in "${SMG_GPU_XLA_FLAGS[@]}"; do
    _smg_append_xla_flag "${flag}"
  done
  export XLA_FLAGS
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${PWD}/runs/jax_cache}"
  case "${JAX_COMPILATION_CACHE_DIR}" in
    *://*) ;;  # object store: JAX creates what it needs
    *) [[ "${1:-}" == show ]] || mkdir -p "${JAX_COMPILATION_CACHE_DIR}" ;;
  esac
  if [[ -n "${SMG_MEM_FRACTION:-}" ]]; then
    # A typo here would otherwise surface as an opaque allocator error on every GPU.
    if ! [[ "${SMG_MEM_FRACTION}" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || [[ "${SMG_MEM_FRACTION}" =~ ^0?\.0*$ ]]; then
      echo "gpu_env.sh: SMG_MEM_FRACTION=${SMG_MEM_FRACTION} must be a fraction in (0, 1], e.g. 0.9" >&2
      return 2
    fi
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${SMG_MEM_FRACTION}"
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # executed, not sourced: show, change nothing in the caller
  set -euo pipefail
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    _smg_gpu_env_usage
    exit 0
  fi
  _smg_gpu_env show
  echo "XLA_FLAGS=${XLA_FLAGS}"
  echo "JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR}"
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-<JAX default, 0.75>}"
else
  _smg_gpu_env
fi
