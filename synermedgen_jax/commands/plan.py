"""Ahead-of-time memory and FLOP plan of the REAL sharded train step (and sampler) on simulated devices.

Lowers and compiles the trainer's jitted step (state donated, shardings from the logical-axis rules) for
--mesh on --devices simulated CPU devices, from abstract inputs only (jax.ShapeDtypeStruct with shardings:
no parameter, moment or batch is allocated), with XLA:CPU's memory-minimising scheduler, and prints per
device: argument / output / temporary / peak bytes (compiled.memory_analysis()); the compiled FLOPs (XLA's
cost_analysis plus (trips - 1) x the dot/convolution FLOPs of every loop body, which cost_analysis counts once)
next to the analytic count of what the step executes (MoT routing, frozen parts, remat and flash-attention
recomputation); the buffers live at the memory peak (from XLA's buffer live ranges, with the JAX op that made
each); the theoretical minimum (parameters + gradients + optimizer state + EMA of the trained parameters, each
divided by its sharding), an analytic activation estimate under the configured remat, and peak / minimum.
For Stage II configs it also compiles one batch of the CFG sampler (--sampler-steps, KV cache, one slice per
data shard unless --sampler-slices) on the same mesh and prints its peak bytes per device.

Examples:
  python -m synermedgen_jax plan --config configs/stage2_ucg.py:tiny --mesh data=1,fsdp=4,tensor=1 --devices 4
  python -m synermedgen_jax plan --config configs/stage2_ucg.py:bagel_7b_mot --mesh data=1,fsdp=64,tensor=1 \\
      --devices 64 --tokens 32768 --rows 64 --layers 4 --attention chunked --json plan_7b.json

--layers K compiles with 1 and K decoder layers and extrapolates linearly to the config's layer count (XLA:CPU
compiles of the 28 unrolled 7B layers take long on a small machine); the output says so.
--tokens N rescales the pack budget to N tokens per row (every capacity by the same factor).
--target gpu|tpu (default gpu): the config's kernels are resolved for that platform (kernels/dispatch.py; the
default "auto" gives the Pallas kernels). Pallas cannot be compiled on CPU, so each kernel is compiled as its
stand-in of the same memory class (attention: "chunked", O(T·chunk) instead of the kernel's O(T·block), never
O(T²); flow matching: the jnp reference), the output and JSON say so, and the kernel's own device-memory working
set (padded copies, output, log-sum-exp and delta per query row and head, dq/dk/dv, block lists) is added to the
per-device figure. --attention reference plans the dense path on purpose.
The plan always runs on the CPU backend (simulated devices); it re-executes itself in a subprocess when jax
was already initialised with another device count. XLA:CPU computes bf16 dots in f32 and keeps f32 copies of
bf16 operands (and gathers FSDP weights in f32); the plan counts those copies live at the peak and prints an
accelerator-equivalent figure (per device minus the copies) beside the CPU one.

--data DIR: the packing report instead (benchmark/packing.py, docs/packing.md). Builds the run's batches from the
built folder DIR exactly as training does (the config and its --config.KEY=VALUE overrides, as train takes them),
reads --rows-sampled rows and prints per region (und / gen tokens, ViT patches / images, VAE images, CE slots)
slots, mean real count and fill, samples per row and the share of the step's FLOPs spent on padding (the VAE
encoder counted on real images only: it skips empty slots); then the budget split of --tokens und+gen tokens per
row (default: the config's) that minimises that share under the pipeline's look-ahead packer (config.data.lookahead),
replayed offline on the recorded arrivals, as --config.data.pack.* overrides. No device or compilation is involved.
  python -m synermedgen_jax plan --data /tmp/data --config configs/stage2_ucg.py:small --rows-sampled 200 \\
      --config.train.rows=8 --json packing.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jax

from synermedgen_jax.benchmark.packing import PackingReportError, format_report, run_report
from synermedgen_jax.benchmark.plan_inputs import parse_mesh, resolve_mesh
from synermedgen_jax.benchmark.plan_run import run_plan
from synermedgen_jax.benchmark.report import BenchError, write_json
from synermedgen_jax.commands._args import non_negative_int, one_line_errors, positive_float, positive_int
from synermedgen_jax.commands._runner import accept_config_overrides
from synermedgen_jax.config import ConfigError, apply_overrides, load_config

_GUARD = "SMG_PLAN_CHILD"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/stage2_ucg.py:tiny", help="run config FILE.py[:variant]")
    parser.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                        help="mesh sizes AXIS=SIZE for data, fsdp, tensor (one may be -1 = the rest)")
    parser.add_argument("--devices", type=positive_int, default=8, help="simulated devices (default 8)")
    parser.add_argument("--rows", type=non_negative_int, default=0,
                        help="global pack rows per step (default: config.train.rows)")
    parser.add_argument("--tokens", type=non_negative_int, default=0,
                        help="rescale the pack budget to N tokens per row")
    parser.add_argument("--layers", type=non_negative_int, default=0,
                        help="compile K decoder layers (and 1) and extrapolate linearly to the full depth")
    parser.add_argument("--attention", default="",
                        help="override model.attention_impl (reference, xla_dense, chunked, pallas_interpret); "
                             "default: what the config resolves to on --target")
    parser.add_argument("--remat", default="", help="override model.remat (none, full, dots)")
    parser.add_argument("--target", default="gpu", choices=("gpu", "tpu"),
                        help="platform the plan is for (default gpu): the config's kernels are resolved for it and "
                             "each Pallas kernel is compiled as its CPU stand-in")
    parser.add_argument("--device-memory-gb", type=positive_float, default=80.0,
                        help="device memory the plan must fit (GB = 1e9 bytes, default 80)")
    parser.add_argument("--sampler-steps", type=non_negative_int, default=50,
                        help="also plan one sampler batch with this many steps (Stage II configs; 0 skips it)")
    parser.add_argument("--sampler-slices", type=non_negative_int, default=0,
                        help="slices per sampler batch (default: one per data x fsdp shard)")
    parser.add_argument("--devices-per-host", type=non_negative_int, default=0,
                        help="devices per host process for the host-memory figures (default: 8 for gpu, 4 for tpu)")
    parser.add_argument("--json", metavar="OUT", help="write the figures to this JSON file")
    parser.add_argument("--data", metavar="DIR", default="",
                        help="packing report of the run's real batches over this built data folder (see above)")
    parser.add_argument("--rows-sampled", type=positive_int, default=200,
                        help="pack rows the packing report reads (--data; default 200)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (--data)")
    parser.epilog = (parser.epilog or "") + ("\n--config.KEY=VALUE   override any config key (repeatable), as in "
                                             "train (with --data)")
    accept_config_overrides(parser)
    one_line_errors(parser)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["plan", "--config", args.config, "--mesh", args.mesh, "--devices", str(args.devices),
            "--rows", str(args.rows), "--tokens", str(args.tokens), "--layers", str(args.layers),
            "--device-memory-gb", str(args.device_memory_gb), "--sampler-steps", str(args.sampler_steps),
            "--sampler-slices", str(args.sampler_slices), "--target", args.target]
    for flag, value in (("--attention", args.attention), ("--remat", args.remat), ("--json", args.json)):
        if value:
            argv += [flag, value]
    return argv


def _set_device_env(devices: int) -> dict[str, str | None]:
    """Puts the simulated device count in the environment; returns the previous values (to restore them)."""
    # The simulated device count is read when the CPU backend starts: it must be in XLA_FLAGS before that.
    previous = {key: os.environ.get(key) for key in ("XLA_FLAGS", "JAX_PLATFORMS")}
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    return previous


def _restore_env(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _packing_report(args: argparse.Namespace) -> int:
    """``plan --data``: the packing report of the config's real batches (benchmark/packing.py)."""
    overrides = list(getattr(args, "overrides", None) or [])
    try:
        config = apply_overrides(load_config(args.config), overrides)
        result = run_report(config, args.data, args.rows_sampled, args.tokens, progress=not args.no_progress)
    except (ConfigError, PackingReportError) as err:
        return _error(str(err))
    print(format_report(result))
    if args.json:
        write_json(args.json, {"command": "plan --data", "config": args.config, "overrides": overrides,
                               "data": args.data, **result})
        print(f"wrote {args.json}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.data:
        return _packing_report(args)
    if getattr(args, "overrides", None):
        return _error(f"{args.overrides[0]}: --config.KEY=VALUE overrides are read with --data only")
    try:
        if args.devices < 1:
            raise BenchError(f"--devices must be >= 1, got {args.devices}")
        mesh_spec = resolve_mesh(parse_mesh(args.mesh), args.devices)
        for name in ("rows", "tokens", "layers"):
            if getattr(args, name) < 0:
                raise BenchError(f"--{name} must be >= 0")
        if args.layers == 1:
            raise BenchError("--layers must be >= 2 (the extrapolation fits 1 and K layers)")
    except BenchError as err:
        return _error(str(err))

    previous_env = _set_device_env(args.devices)
    if jax.device_count() != args.devices or jax.default_backend() != "cpu":
        if os.environ.get(_GUARD):
            return _error(f"could not get {args.devices} simulated CPU devices (got {jax.device_count()} "
                          f"{jax.default_backend()} devices)")
        # jax was initialised earlier in this process with another device count: plan in a fresh one.
        env = {**os.environ, _GUARD: "1"}
        _restore_env(previous_env)  # the caller's process keeps its own device settings
        return subprocess.run([sys.executable, "-m", "synermedgen_jax", *_child_argv(args)], env=env).returncode

    try:
        result = run_plan(args, mesh_spec)
    except BenchError as err:
        return _error(str(err))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0 if result else 1
