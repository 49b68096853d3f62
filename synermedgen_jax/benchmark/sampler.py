"""Sampler throughput with and without the KV cache, and one forward over the latent tokens alone.

  JAX_PLATFORMS=cpu python -m tools.bench_sampler --variant small --batch 4 --steps 10 --image 64

Prints, per mode, per-slice latency and slices/s of the whole jitted sampler (prefill, steps-1 Euler steps
with three CFG passes, VAE decode), and the per-step cost next to a forward over the noised split's tokens
only (no context). Random weights; timing excludes compilation (one warm-up call per mode).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from synermedgen_jax.config import load_config
from synermedgen_jax.data.packing import SpecialTokens
from synermedgen_jax.inference import sampler as smp
from synermedgen_jax.inference.kv_cache import prefill
from synermedgen_jax.modeling.synermedgen import build_model


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timesteps (steps-1 Euler steps)")
    parser.add_argument("--image", type=int, default=32, help="generated image side (pixels)")
    parser.add_argument("--vit-image", type=int, default=28)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = build_model(load_config(f"configs/models.py:{args.variant}"))
    special = SpecialTokens(1, 2, 3, 4, 0)
    ids = list(range(5, 5 + args.prompt_tokens))
    sources = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.image, args.image)).astype(np.float32)
    size, vit = (args.image, args.image), (args.vit_image, args.vit_image)
    print(f"{args.variant}, batch {args.batch}, {args.steps} timesteps, {args.image}px, device "
          f"{jax.devices()[0].device_kind}")
    per_slice = {}
    for use_cache in (True, False):
        s = smp.Sampler(model, special, size, vit, smp.SamplerConfig(num_steps=args.steps, use_cache=use_cache))
        seconds = _time(lambda s=s: s.generate(sources, ids, batch_size=args.batch), args.repeats)
        per_slice[use_cache] = seconds / args.batch
        print(f"  {'KV cache   ' if use_cache else 'no KV cache'}: {1e3 * seconds / args.batch:9.2f} ms/slice, "
              f"{args.batch / seconds:8.2f} slices/s")
    # One forward over the noised split alone (markers + latent tokens, no context), for comparison.
    s = smp.Sampler(model, special, size, vit)
    batches, layouts = s._packs(ids, sources)
    batch, layout = jax.tree.map(jnp.asarray, batches["cond"]), layouts["cond"]
    x = jax.random.normal(jax.random.key(0), (args.batch, len(layout.q_gen), s.token_dim))

    graphdef, state = nnx.split(model)

    @jax.jit  # plain jit over the split state: nnx.jit's per-call graph traversal would dominate the timing
    def latent_only(state, batch, x):
        m = nnx.merge(graphdef, state)
        x_q, meta = smp.query_embeddings(m, batch, layout, x, jnp.float32(0.5))
        return m.llm2vae(prefill(m.language_model, x_q, len(layout.q_und), meta)[0])

    forward = _time(lambda: latent_only(state, batch, x), args.repeats * 5)
    passes = 3 * (args.steps - 1)
    print(f"  latent-token-only forward: {1e3 * forward:.2f} ms per batch; the cached sampler spends "
          f"{1e3 * per_slice[True] * args.batch / passes:.2f} ms per pass ({passes} passes incl. prefill/decode), "
          f"the uncached {1e3 * per_slice[False] * args.batch / passes:.2f} ms")


if __name__ == "__main__":
    main()
