"""Peak host memory (VmHWM) of each process of a multi-process run, at init and at restore.

Runs the real ``train`` command as N local processes joined by ``jax.distributed`` on 127.0.0.1 (simulated CPU
devices), twice: a fresh start that initialises the state, saves it at step 0 and exits (``--stop-at 0``), then
a resume that restores that checkpoint and exits. Each process reports its own peak resident memory, printed
next to the full train state's bytes. On CPU the devices' buffers are host memory, so a process holding only its
devices' shards peaks near ``state / N`` plus the runtime, and one that builds the whole state first peaks above
the whole state.

    python -m tools.host_memory --processes 2 --devices-per-process 4 --data data/sim \
        --config configs/stage1_gau.py:tiny --config.model.llm.hidden_size=1024 ...
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from synermedgen_jax.accounting.memory import tree_bytes
from synermedgen_jax.benchmark.report import REPO_ROOT as REPO
from synermedgen_jax.config import apply_overrides, load_config
from synermedgen_jax.training import loop, optim
from synermedgen_jax.training import step as step_lib

# Runs the train command in this process and prints its peak RSS as the last line (works on any version of the
# project: it only calls the CLI's main).
WRAPPER = ("import json, resource, sys; from synermedgen_jax.__main__ import main; rc = main(sys.argv[1:]); "
           "print(json.dumps({'rc': rc, 'vmhwm_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))")


def run_processes(args, train_args: list[str], repo: Path) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(repo),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
    procs = [subprocess.Popen([sys.executable, "-c", WRAPPER, "train", *train_args, "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", str(args.processes), "--process-id", str(i)],
                              cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(args.processes)]
    results = []
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"process {i} failed ({proc.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def state_bytes(config_spec: str, overrides: list[str]) -> tuple[int, int]:
    """``(full train state bytes, parameters)`` from the abstract state (nothing allocated)."""
    config = loop.resolve_config(apply_overrides(load_config(config_spec), overrides))
    make_model, codec, _ = loop.build(config)
    abstract = step_lib.abstract_state(codec, make_model, optim.make_optimizer(config.train), config.train)
    total = tree_bytes(abstract)
    params = sum(int(np.prod(x.shape)) for part in ("params", "frozen") for x in abstract[part].values())
    return total, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--config", required=True, help="configs/FILE.py[:variant]")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to measure (e.g. an older commit)")
    args, overrides = parser.parse_known_args(argv)
    total, params = state_bytes(args.config, overrides)
    mesh = [f"--config.mesh.fsdp={args.processes * args.devices_per_process}", "--config.mesh.data=1",
            "--config.mesh.tensor=1"]
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--config", args.config, "--workdir", str(Path(tmp) / "run"), "--stop-at", "0", *mesh, *overrides]
        init = run_processes(args, common, args.repo)
        restore = run_processes(args, common, args.repo)
    gib = 2**30
    print(f"# {params / 1e6:.0f} M parameters, full train state {total / gib:.2f} GiB; "
          f"{args.processes} processes x {args.devices_per_process} devices ({args.repo})")
    for name, rows in (("init", init), ("restore", restore)):
        peaks = ", ".join(f"{r['vmhwm_bytes'] / gib:.2f}" for r in rows)
        print(f"{name:8s} peak RSS per process (GiB): {peaks}   (state / processes = "
              f"{total / args.processes / gib:.2f})")
    print(json.dumps({"state_bytes": total, "params": params, "init": init, "restore": restore}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
