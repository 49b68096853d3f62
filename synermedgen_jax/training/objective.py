"""The loss of Stages I and II, in one place: BAGEL's next-token CE plus the flow-matching velocity MSE.

Flow matching follows BAGEL (``modeling/bagel/bagel.py``; kernels/flow_matching.py): for every generation token
the clean latent ``x0`` (the frozen VAE's encoding of its image slot), ``ε ~ N(0, 1)``,
``t = s·σ(logit) / (1 + (s − 1)·σ(logit))`` (``s = timestep_shift``; t = 0 for clean conditioning images),
``x_t = (1 − t)·x0 + t·ε``; the model predicts the velocity from ``(x_t, t)`` and the target is ``ε − x0``.

Who does what, once each:

* the pack (``data/packing.Pack``) carries the timestep *logit*: it is drawn on the host by the pack builder
  (one per noised image, from the Grain pipeline's checkpointed per-sample generator; why it stays there: the
  ``Pack`` docstring);
* :meth:`UnifiedObjective.prepare` (once per global batch, outside the gradient) turns the host's arrays into a
  ``Pack``, encodes the VAE image slots to clean latent tokens and draws ``ε``;
* :func:`flow_matching_inputs` gathers ``x0`` per generation token, maps logits to ``t`` and noises
  (``kernels.flow_matching.noised_latents`` on the active mesh);
* the model's forward (``SynerMedGen.__call__``) maps ``(pack, x_t, t)`` to logits and velocities: the same
  forward the uncached sampler runs, and the same layers as the cached one;
* :func:`token_sums` sums CE, velocity MSE (``kernels.flow_matching.velocity_mse_sum``) and correct tokens over
  the micro-batch's tokens, and :meth:`UnifiedObjective.loss` divides by the *global* token counts of the step
  (:meth:`UnifiedObjective.totals`), so summed micro-batch gradients are the full-batch gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from synermedgen_jax.axes import BATCH_LENGTH_EMBED
from synermedgen_jax.data.packing import Pack
from synermedgen_jax.kernels import flow_matching
from synermedgen_jax.modeling.generation import timesteps_from_logits
from synermedgen_jax.modeling.layers import active_mesh, constrain


@struct.dataclass
class Prepared:
    """What a step's loss reads, every leaf with the leading ``[B]`` axis (micro-batches split it).

    * ``pack``: the :class:`~synermedgen_jax.data.packing.Pack`.
    * ``clean_latents [B, S·L, C]`` float32: clean latent tokens of every VAE image slot (``C = p·p·z``).
    * ``noise [B, Tg, C]`` float32: ε, one row per generation token.
    """

    pack: Pack
    clean_latents: Any
    noise: Any


@struct.dataclass
class FlowMatching:
    """Per generation token ``[B, Tg, ...]``: ``clean`` x0 and ``noise`` ε ``[B, Tg, C]`` (the target is
    ε − x0), ``t [B, Tg]`` float32 and the model's input ``noised`` x_t ``[B, Tg, C]``."""

    clean: Any
    noise: Any
    t: Any
    noised: Any


def flow_matching_inputs(model, pack: Pack, clean_latents: jax.Array, noise: jax.Array) -> FlowMatching:
    """x0 gathered per generation token (``latent_index``), t from the pack's logits, ``x_t`` (traceable)."""
    # Row-local gathers: pinning their operands and results to the batch split keeps XLA from gathering the
    # whole global batch onto every device.
    clean_latents = constrain(clean_latents, BATCH_LENGTH_EMBED)
    clean = constrain(jnp.take_along_axis(clean_latents, pack.latent_index[..., None], axis=1), BATCH_LENGTH_EMBED)
    t = timesteps_from_logits(pack.timestep_logit, model.config.timestep_shift)
    token_dim = clean.shape[-1]
    noised = flow_matching.noised_latents(clean.reshape(-1, token_dim), noise.reshape(-1, token_dim).astype(
        clean.dtype), t.reshape(-1), impl=model.config.flow_matching_impl, mesh=active_mesh()).reshape(clean.shape)
    return FlowMatching(clean=clean, noise=noise, t=t, noised=noised)


def token_sums(outputs: dict, pack: Pack, flow: FlowMatching, *, flow_impl: str) -> dict:
    """Sums over the tokens at hand: ``ce`` (CE over ``ce_mask``), ``mse`` (velocity MSE averaged over the
    ``C`` latent dims, summed over ``mse_mask``; ``flow_impl`` picks kernels/flow_matching.py's implementation,
    the fused kernel never materialising ε − x0) and ``correct`` (argmax = label over ``ce_mask``)."""
    ce_mask = pack.ce_mask.astype(jnp.float32)
    token_ce = optax.softmax_cross_entropy_with_integer_labels(outputs["logits"], pack.ce_label)
    velocity = outputs["velocity"]
    rows = lambda x: x.reshape(-1, velocity.shape[-1]).astype(jnp.float32)  # noqa: E731
    mse = flow_matching.velocity_mse_sum(rows(velocity), rows(flow.clean), rows(flow.noise),
                                         pack.mse_mask.astype(jnp.float32).reshape(-1), impl=flow_impl,
                                         mesh=active_mesh())
    correct = (jnp.argmax(outputs["logits"], axis=-1) == pack.ce_label).astype(jnp.float32)
    return {"ce": jnp.sum(token_ce * ce_mask), "mse": mse, "correct": jnp.sum(correct * ce_mask)}


def answer_exact_match(logits: jax.Array, pack: Pack) -> tuple[jax.Array, jax.Array]:
    """Per-sample greedy exact match of the answer under teacher forcing.

    A sample's answer is decoded exactly by greedy decoding iff the argmax is right at each of its CE
    positions, so this is greedy-decoding answer accuracy without a decode loop.
    Returns ``(correct, counted)`` sums over the batch (samples with at least one CE token).
    """
    ce_mask = pack.ce_mask > 0
    wrong = (jnp.argmax(logits, axis=-1) != pack.ce_label) & ce_mask
    sample = jnp.take_along_axis(pack.sample_id, pack.ce_index, axis=1)  # [B, C]
    slots = logits.shape[1]  # a row holds at most C samples with CE tokens
    onehot = jax.nn.one_hot(jnp.where(ce_mask, sample, -1), slots, dtype=jnp.float32)  # [B, C, slots]
    has = jnp.einsum("bc,bcs->bs", ce_mask.astype(jnp.float32), onehot) > 0
    bad = jnp.einsum("bc,bcs->bs", wrong.astype(jnp.float32), onehot) > 0
    return jnp.sum(has & ~bad).astype(jnp.float32), jnp.sum(has).astype(jnp.float32)


def real_vae_slots(pack: Pack, model_config) -> jax.Array:
    """``[B, S]`` bool: the VAE slots some real generation token reads (``latent_index = slot·L + token``), the
    same rule as ``data.packing.real_counts``; the encoder skips the others."""
    stride = 2 ** (len(model_config.vae.ch_mult) - 1) * model_config.latent_patch_size
    slots, height, width = pack.vae_images.shape[1:4]
    per_slot = max((height // stride) * (width // stride), 1)
    gen_real = pack.sample_id[:, pack.und_tokens:] >= 0
    slot_of = jnp.where(gen_real, pack.latent_index // per_slot, slots)  # padding -> slot S (none)
    return (slot_of[..., None] == jnp.arange(slots)).any(axis=1)


@dataclasses.dataclass(frozen=True)
class UnifiedObjective:
    """BAGEL's CE + flow-matching MSE on packed batches (Stage I, Stage II, baselines); the train step's
    ``Objective`` (training/step.py): ``loss = ce_weight·CE + mse_weight·MSE``, each term summed over tokens
    and divided by its global token count."""

    ce_weight: float = 1.0
    mse_weight: float = 1.0

    def prepare(self, model, batch, key) -> Prepared:
        """Host arrays → :class:`Prepared` (outside the gradient, once per global batch): the ``Pack``, the
        frozen VAE's clean latent tokens of every image slot, ε per generation token."""
        pack = Pack.from_arrays(batch)
        k_vae, k_noise = jax.random.split(key)
        rows, slots = pack.vae_images.shape[:2]
        token_dim = model.config.latent_patch_size ** 2 * model.config.vae.z_channels
        if slots == 0:
            clean = jnp.zeros((rows, 0, token_dim), jnp.float32)
        else:
            clean = model.latent_tokens(pack.vae_images, k_vae, real_vae_slots(pack, model.config))
        noise = jax.random.normal(k_noise, (rows, pack.gen_tokens, token_dim), jnp.float32)
        return Prepared(pack=pack, clean_latents=clean, noise=noise)

    def totals(self, inputs: Prepared) -> dict:
        """The step's global token counts (under ``jit`` over a sharded batch the sums are global)."""
        return {"ce": jnp.sum(inputs.pack.ce_mask.astype(jnp.float32)),
                "mse": jnp.sum(inputs.pack.mse_mask.astype(jnp.float32))}

    def forward(self, model, inputs: Prepared, *, flow_impl: str | None = None) -> tuple[dict, dict]:
        """``(model outputs, token sums)`` of a (micro-)batch: noising, the model's forward, :func:`token_sums`.
        ``flow_impl``: the velocity-MSE implementation (default: the model's ``flow_matching_impl``)."""
        flow = flow_matching_inputs(model, inputs.pack, inputs.clean_latents, inputs.noise)
        outputs = model(inputs.pack, flow.noised, flow.t)
        impl = model.config.flow_matching_impl if flow_impl is None else flow_impl
        return outputs, token_sums(outputs, inputs.pack, flow, flow_impl=impl)

    def _combine(self, sums: dict, totals: dict) -> jax.Array:
        return (self.ce_weight * sums["ce"] / jnp.maximum(totals["ce"], 1.0)
                + self.mse_weight * sums["mse"] / jnp.maximum(totals["mse"], 1.0))

    def loss(self, model, micro: Prepared, totals: dict) -> tuple[jax.Array, dict]:
        """The micro-batch's share of the step's loss (divided by the global counts) and its token sums."""
        sums = self.forward(model, micro)[1]
        return self._combine(sums, totals), sums

    def metrics(self, sums: dict, totals: dict) -> dict:
        ce = sums["ce"] / jnp.maximum(totals["ce"], 1.0)
        mse = sums["mse"] / jnp.maximum(totals["mse"], 1.0)
        return {"loss": self._combine(sums, totals), "ce": ce, "mse": mse,
                "token_accuracy": sums["correct"] / jnp.maximum(totals["ce"], 1.0),
                "ce_tokens": totals["ce"], "mse_tokens": totals["mse"]}

    def batch_metrics(self, model, inputs: Prepared, *, flow_impl: str | None = None) -> dict:
        """:meth:`metrics` of one whole batch (its own totals): ``loss``, ``ce``, ``mse``, ``token_accuracy``,
        ``ce_tokens``, ``mse_tokens``."""
        return self.metrics(self.forward(model, inputs, flow_impl=flow_impl)[1], self.totals(inputs))

    def evaluate(self, model, inputs: Prepared, *, flow_impl: str | None = None) -> dict:
        """Metrics of one whole batch plus the answers' greedy exact-match sums (``answers_correct``,
        ``answers``)."""
        outputs, sums = self.forward(model, inputs, flow_impl=flow_impl)
        correct, counted = answer_exact_match(outputs["logits"], inputs.pack)
        return {**self.metrics(sums, self.totals(inputs)), "answers_correct": correct, "answers": counted}
