"""Local multi-process launcher: N processes on 127.0.0.1, each with its own simulated CPU devices.

    python launch/local.py --processes 2 --devices-per-process 4 -- \
        --config configs/stage1_gau.py:tiny --workdir runs/mp --config.data.dir=data/sim

Everything after ``--`` goes to ``python -m synermedgen_jax train``; the launcher adds --coordinator,
--num-processes and --process-id. Exit status: 0 when every process exits 0, else the first failure's.
SIGTERM sent to the launcher is forwarded to every process (a scheduler's preemption notice): the
trainers agree on a step, save one checkpoint together and exit 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4, help="simulated CPU devices per process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--log-dir", help="write process_<i>.log here instead of inheriting stdout/stderr")
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    port = args.port or free_port()
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    procs = []

    def forward(signum, frame):
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    # Installed before the first child starts: a notice can never kill the launcher and orphan a trainer.
    # (SIGINT from a terminal already reaches the whole process group.)
    previous = signal.signal(signal.SIGTERM, forward)
    for i in range(args.processes):
        cmd = [sys.executable, "-m", "synermedgen_jax", "train", *train_args, "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", str(args.processes), "--process-id", str(i)]
        out = None
        if args.log_dir:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(args.log_dir) / f"process_{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT if out else None),
                      out))
    status = 0
    for proc, out in procs:
        code = proc.wait()
        if out:
            out.close()
        if code and not status:
            status = code
    signal.signal(signal.SIGTERM, previous)
    return status


if __name__ == "__main__":
    sys.exit(main())
