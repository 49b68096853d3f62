"""Understanding inference: autoregressive answers with a KV cache (BAGEL's ``generate_text``), batched.

A question is packed as in training (``[question text, image 1 (ViT), image 2, ...]``, data/record_samples.py), the
context is prefilled once (inference/kv_cache.py), then the answer split — ``<|im_start|>`` followed by the
generated tokens, one ``causal`` split at the next RoPE id — is decoded one token per step against the cache.
Every step writes its key/value into preallocated cache slots, so the loop (``lax.while_loop``, stopping when
every row has produced ``<|im_end|>``) has static shapes and compiles once per (batch, context length,
``max_new_tokens``). Greedy when ``temperature <= 0``; otherwise temperature + nucleus (top-p) sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from synermedgen_jax.data.packing import Geometry, Pack, SpecialTokens, prompt_items
from synermedgen_jax.data.volumes import resize_image
from synermedgen_jax.inference.kv_cache import Meta, empty_slots, extend, forward_cached, prefill
from synermedgen_jax.inference.sampler import exact_pack
from synermedgen_jax.kernels.attention import CAUSAL


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # <= 0: greedy
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def choose_tokens(logits: jax.Array, key: jax.Array, config: DecodeConfig) -> jax.Array:
    """``logits [B, V]`` float32 → token ids ``[B]``: argmax, or a sample from the top-p nucleus at
    ``temperature`` (the smallest set of most likely tokens whose probability reaches ``top_p``)."""
    if config.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / config.temperature
    if config.top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep_sorted = before < config.top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(keep_sorted)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def decode(model, batch: Pack, key: jax.Array, config: DecodeConfig, *, bos: int, eos: int, pad: int,
           vocab_limit: int) -> jax.Array:
    """Traceable decoding. ``batch``: an understanding pack (no generation tokens), ``[B, ...]``. Returns token
    ids ``[B, max_new_tokens]`` (after the first ``eos`` of a row: ``pad``). Ids ≥ ``vocab_limit`` (rows of the
    embedding table the tokenizer never produces) are never chosen."""
    lm = model.language_model
    x = model.embed_understanding(batch)
    batch_size, context = x.shape[:2]
    fields = [v[:, :context] for v in batch.meta().values()]  # sample, split, kind, rope
    meta = Meta(*fields, jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), fields[0].shape))
    cache = empty_slots(prefill(lm, x, context, meta)[1], config.max_new_tokens)
    valid = meta.sample_id >= 0
    next_rope = jnp.max(jnp.where(valid, meta.rope_id, -1), axis=1) + 1
    answer_split = jnp.max(jnp.where(valid, meta.split_id, -1), axis=1) + 1
    allowed = jnp.arange(lm.embed_tokens.value.shape[0]) < vocab_limit
    out = jnp.full((batch_size, config.max_new_tokens), pad, jnp.int32)
    column = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.int32).reshape(-1, 1), (batch_size, 1))

    def body(carry):
        i, token, cache, done, out = carry
        q_meta = Meta(column(0), column(answer_split), column(CAUSAL), column(next_rope + i), column(context + i))
        hidden, k, v = forward_cached(lm, lm.embed(token[:, None]), 1, q_meta, cache)
        cache = extend(cache, k, v, q_meta, context + i)
        logits = jnp.where(allowed, lm.logits(hidden[:, 0]), -jnp.inf)
        new = jnp.where(done, pad, choose_tokens(logits, jax.random.fold_in(key, i), config))
        out = out.at[:, i].set(new)
        return i + 1, new, cache, done | (new == eos), out

    def more(carry):
        i, _, _, done, _ = carry
        return (i < config.max_new_tokens) & ~jnp.all(done)

    start = (jnp.int32(0), jnp.full((batch_size,), bos, jnp.int32), cache, ~jnp.any(valid, axis=1), out)
    return jax.lax.while_loop(more, body, start)[-1]


def image_first_items(question_ids: Sequence[int], vit_images: Sequence[np.ndarray],
                      label_ids: Sequence[Sequence[int]] = ()) -> list:
    """``[label?, image, ..., question]``: UniMedVL's understanding order (``interleave_inference(images +
    [text], understanding_output=True)``; images enter as ViT tokens only), each image after its label if any."""
    from synermedgen_jax.data.packing import Text, VitImage

    items: list = []
    for i, image in enumerate(vit_images):
        if label_ids:
            items.append(Text(list(label_ids[i])))
        items.append(VitImage(image))
    return items + [Text(list(question_ids))]


class Answerer:
    """Batched answers to prompts with images: ``Answerer(model, tokenizer, ...).answer([(text, [img...])])``."""

    def __init__(self, model, tokenizer, image_size: tuple[int, int], vit_image_size: tuple[int, int],
                 config: DecodeConfig = DecodeConfig(), *, image_first: bool = False):
        self.tokenizer, self.config = tokenizer, config
        self.image_first = image_first  # UniMedVL's order: the (labelled) images, then the question
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.geometry = Geometry.from_model_config(model.config)
        self.image_size, self.vit_image_size = tuple(image_size), tuple(vit_image_size)
        self.graphdef, self.state = nnx.split(model)
        self._compiled: dict[tuple, Callable] = {}

    def _function(self, shapes: tuple) -> Callable:
        if shapes not in self._compiled:
            graphdef, config, special = self.graphdef, self.config, self.special
            vocab_limit = self.tokenizer.vocab_size

            def run(state, batch, key):
                return decode(nnx.merge(graphdef, state), batch, key, config, bos=special.bos, eos=special.eos,
                              pad=special.pad, vocab_limit=vocab_limit)

            self._compiled[shapes] = jax.jit(run)
        return self._compiled[shapes]

    def pack(self, prompts: Sequence[tuple]) -> Pack:
        """Understanding packs, one prompt per row: ``(question ids, images)`` or ``(question ids, images, label
        ids per image)`` (:func:`packing.prompt_items`)."""
        build = image_first_items if self.image_first else prompt_items
        samples = [build(prompt[0], [resize_image(img, self.vit_image_size) for img in prompt[1]],
                         prompt[2] if len(prompt) > 2 else ()) for prompt in prompts]
        return exact_pack(samples, self.geometry, self.special, self.image_size, self.vit_image_size)[0]

    def generate_ids(self, prompts: Sequence[tuple[Sequence[int], Sequence[np.ndarray]]], *, seed: int = 0
                     ) -> list[list[int]]:
        """Token ids of each answer up to (not including) ``<|im_end|>``."""
        return self._generate(self.pack(prompts), seed)

    def generate_item_ids(self, samples: Sequence[Sequence], *, seed: int = 0) -> list[list[int]]:
        """As :meth:`generate_ids` for contexts given as packing items (``Text`` / ``VitImage``, ViT images at
        ``vit_image_size``) in any order, e.g. UniMedVL's image-first question (inference/family.py)."""
        return self._generate(exact_pack(samples, self.geometry, self.special, self.image_size,
                                         self.vit_image_size)[0], seed)

    def _generate(self, batch: Pack, seed: int) -> list[list[int]]:
        shapes = tuple(sorted((k, v.shape) for k, v in batch.arrays().items()))
        tokens = np.asarray(self._function(shapes)(self.state, jax.tree.map(jnp.asarray, batch),
                                                   jax.random.PRNGKey(seed)))
        answers = []
        for row in tokens:
            ids = row.tolist()
            answers.append(ids[:ids.index(self.special.eos)] if self.special.eos in ids else ids)
        return answers

    def answer(self, prompts: Sequence[tuple], *, seed: int = 0, batch_size: int = 8) -> list[str]:
        """Answers ``(question text, images in [-1, 1])`` or ``(question text, images, label per image)``
        prompts, ``batch_size`` per compiled call."""
        out: list[str] = []
        encoded = [(self.tokenizer.encode(prompt[0]), prompt[1],
                    [self.tokenizer.encode(label) for label in prompt[2]] if len(prompt) > 2 else ())
                   for prompt in prompts]
        for start in range(0, len(encoded), batch_size):
            for ids in self.generate_ids(encoded[start:start + batch_size], seed=seed + start):
                out.append(self.tokenizer.decode(ids).strip())
        return out
