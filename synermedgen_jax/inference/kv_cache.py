"""KV-cached forwards of the MoT decoder: prefill a context once, then run only new tokens against it.

BAGEL's inference (``NaiveCache`` + ``forward_inference``) keeps, per layer, the post-RoPE keys and values of
every context token. Our cache is the same idea in static shapes:

* :func:`prefill` runs the context tokens (instruction text, ViT tokens, clean VAE latents — every split that
  is not a noised target) through all layers, with the packed attention of kernels/attention/, and keeps
  ``k, v [L, B, Tc, Hkv, D]`` plus each key's metadata (sample, split, kind, order).
* :func:`forward_cached` runs new query tokens (the noised target's split: its two marker tokens on the
  understanding expert and its latent tokens on the generation expert; or one decoded text token) through
  the same layers. A query sees the cached keys its own visibility rule allows — every earlier non-noise
  split of its own sample — plus the new tokens themselves (whole split for ``noise``/``full``, up to itself
  for ``causal``), by the one visibility rule (kernels/attention/tile_math.py) with the keys' metadata.

Both loop over the model's own layers (``MoTDecoderLayer`` of modeling/llm.py, the training code: prefill calls
it without a cache, the cached forward with a ``LayerCache``) and end with the model's ``final_norm``.

Since no query changes a cached key (a context token never sees a later split), the cached result equals
the full uncached forward exactly up to floating point (tests/test_sampler.py checks 1e-4 in float32).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from synermedgen_jax.modeling.layers import rope_cos_sin
from synermedgen_jax.modeling.llm import LayerCache


class Meta(NamedTuple):
    """Per-token metadata ``[B, T]`` int32. ``order``: position along the sequence (for the causal rule)."""

    sample_id: jax.Array
    split_id: jax.Array
    split_kind: jax.Array
    rope_id: jax.Array
    order: jax.Array

    def take(self, index: jax.Array) -> Meta:
        """Columns ``index [T']`` (static or traced) of every field."""
        return Meta(*(jnp.take(f, index, axis=1) for f in self))


class KVCache(NamedTuple):
    """Keys/values after RoPE, ``[L, B, Tc, Hkv, D]``, and the keys' metadata (rope ids unused)."""

    k: jax.Array
    v: jax.Array
    meta: Meta

    @property
    def length(self) -> int:
        return self.k.shape[2]


def _layers(language_model, x: jax.Array, und: int, meta: Meta, cache: KVCache | None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's layers then its final norm on ``x [B, T, E]`` (first ``und`` tokens understanding).
    Returns hidden ``[B, T, E]`` and the layers' new keys/values ``[L, B, T, Hkv, D]``."""
    llm = language_model.config.llm
    rope = rope_cos_sin(meta.rope_id, llm.head_dim, llm.rope_theta)
    fields = meta._asdict()
    ks, vs = [], []
    for i, layer in enumerate(language_model.layers):
        layer_cache = None if cache is None else LayerCache(cache.k[i], cache.v[i], cache.meta._asdict())
        x, (k, v) = layer(x, und, fields, rope, layer_cache, return_kv=True)
        ks.append(k)
        vs.append(v)
    return language_model.final_norm(x, und), jnp.stack(ks), jnp.stack(vs)


def prefill(language_model, x: jax.Array, und: int, meta: Meta) -> tuple[jax.Array, KVCache]:
    """Context pass. ``x [B, Tc, E]`` embedded context (first ``und`` tokens understanding), ``meta`` its
    metadata. Returns the final hidden states ``[B, Tc, E]`` (after the per-expert norm) and the cache."""
    hidden, k, v = _layers(language_model, x, und, meta, None)
    return hidden, KVCache(k, v, meta)


def forward_cached(language_model, x: jax.Array, und: int, meta: Meta, cache: KVCache
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """New tokens against a cache. ``x [B, Tq, E]`` (first ``und`` understanding), ``meta`` their metadata
    (``order`` after the cache's). Returns hidden ``[B, Tq, E]`` (normed) and the new keys/values
    ``[L, B, Tq, Hkv, D]`` (for callers that extend the cache, e.g. text decoding)."""
    return _layers(language_model, x, und, meta, cache)


def extend(cache: KVCache, k: jax.Array, v: jax.Array, meta: Meta, at: jax.Array) -> KVCache:
    """Writes new keys ``[L, B, Tn, Hkv, D]`` and their metadata into a preallocated cache at ``at``."""
    write = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), at, axis)
    new_meta = Meta(*(write(old, new, 1) for old, new in zip(cache.meta, meta)))
    return KVCache(write(cache.k, k, 2), write(cache.v, v, 2), new_meta)


def empty_slots(cache: KVCache, slots: int) -> KVCache:
    """The cache with ``slots`` invisible (sample −1) positions appended, to be filled by :func:`extend`."""
    pad = lambda a, value: jnp.concatenate(
        [a, jnp.full((*a.shape[:2], slots, *a.shape[3:]) if a.ndim == 5 else (a.shape[0], slots), value, a.dtype)],
        axis=2 if a.ndim == 5 else 1)
    meta = Meta(*(pad(f, -1 if name == "sample_id" else 0) for name, f in zip(Meta._fields, cache.meta)))
    return KVCache(pad(cache.k, 0), pad(cache.v, 0), meta)
