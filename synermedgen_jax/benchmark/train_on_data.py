"""Train-step benchmark: median step time after warm-up (block_until_ready) and tokens/s on this machine.

    JAX_PLATFORMS=cpu python -m tools.bench_train --data DIR [--variants tiny small] [--steps 5] [--config stage1_gau]
Needs a built dataset (python -m synermedgen_jax build-data ...). Tokens = non-padding pack tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

from synermedgen_jax import sharding
from synermedgen_jax.config import apply_overrides, load_config
from synermedgen_jax.training import inputs, loop, optim
from synermedgen_jax.training import step as step_lib


def bench(spec: str, data: str, steps: int, warmup: int) -> dict:
    config = loop.resolve_config(apply_overrides(load_config(spec), [f"--config.data.dir={data}"]))
    make_model, codec, objective = loop.build(config)
    tx = optim.make_optimizer(config.train)
    mesh = sharding.make_mesh(config.mesh)
    _, shardings = step_lib.plan_state(codec, make_model, tx, config.train, mesh)
    state = step_lib.create_state(codec, make_model, tx, config.train, shardings)
    batches = inputs.train_batches(config)
    local = [next(batches) for _ in range(warmup + steps)]
    fn = step_lib.jit_train_step(step_lib.make_train_step(codec, tx, objective, config.train), shardings,
                                 sharding.batch_sharding(mesh, local[0]), mesh)
    times = []
    for i, batch in enumerate(local):
        global_batch = sharding.global_batch(batch, mesh)
        start = time.perf_counter()
        state, metrics = fn(state, global_batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    tokens = np.mean([int(np.sum(b["sample_id"] >= 0)) for b in local[warmup:]])
    median = statistics.median(times)
    return {"config": spec, "rows": int(config.train.rows), "median_step_s": median, "tokens_per_step": tokens,
            "tokens_per_s": tokens / median}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--variants", nargs="+", default=["tiny", "small"])
    parser.add_argument("--config", default="stage1_gau", help="configs/<name>.py")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    for variant in args.variants:
        r = bench(f"configs/{args.config}.py:{variant}", args.data, args.steps, args.warmup)
        print(f"{r['config']}: rows {r['rows']}, median step {r['median_step_s'] * 1e3:.1f} ms, "
              f"{r['tokens_per_step']:.0f} tokens/step, {r['tokens_per_s']:.0f} tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
