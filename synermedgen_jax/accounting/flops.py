"""Analytic FLOP counts of one train step of the MoT model: the model-FLOPs convention behind MFU
(:func:`step_flops`, :func:`analytic_step_flops`) and what the step actually executes (:func:`executed_step_flops`).

The count follows the token routing: every understanding slot runs the understanding expert once, every
generation slot the generation expert once (padding slots included: shapes are static), so the decoder costs
``2·N_layer·T`` per forward where ``N_layer`` is ONE expert's matmul parameters. Attention counts the score and
value products over the visible key blocks only when ``visible_fraction`` is given (a block-skipping kernel),
densely otherwise. A backward pass costs twice the forward. The frozen VAE encoder runs forward only, in the
step's ``prepare`` (:func:`vae_encode_flops`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from synermedgen_jax.training.optim import trainable_groups


@dataclasses.dataclass(frozen=True)
class FlopBreakdown:
    decoder_matmuls: float
    decoder_attention: float
    lm_head: float
    vit: float
    connector: float
    generation_head: float

    @property
    def total(self) -> float:
        return sum(dataclasses.asdict(self).values())


def expert_layer_matmul_params(config: Any) -> int:
    """Matmul weights of ONE expert in ONE decoder layer (q/k/v/o + SwiGLU MLP)."""
    llm = config.llm
    hidden, q_dim, kv_dim = llm.hidden_size, llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    return hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden + 3 * hidden * llm.intermediate_size


def vit_layer_matmul_params(config: Any) -> int:
    vit = config.vit
    return 4 * vit.hidden_size**2 + 2 * vit.hidden_size * vit.intermediate_size


def step_flops(config: Any, budget: Any, rows: int, *, backward: bool = True,
               visible_fraction: float | None = None) -> FlopBreakdown:
    """FLOPs of one forward (+ backward when ``backward``) over ``rows`` pack rows of ``budget``.

    ``visible_fraction``: fraction of (query, key) pairs the attention computes; ``None`` = dense T².
    """
    llm = config.llm
    multiplier = 3.0 if backward else 1.0  # backward = 2 × forward for matmuls
    tokens = budget.und_tokens + budget.gen_tokens
    attention_fraction = 1.0 if visible_fraction is None else visible_fraction
    decoder = 2.0 * expert_layer_matmul_params(config) * tokens * llm.num_layers
    # scores (2·T²·D per head) + weighted values (2·T²·D per head)
    attention = 4.0 * tokens**2 * llm.num_heads * llm.head_dim * llm.num_layers * attention_fraction
    lm_head = 2.0 * llm.hidden_size * llm.vocab_size * budget.ce_tokens
    vit_flops, connector = _vit_forward(config, budget.vit_patches), _connector_forward(config, budget.vit_patches)
    generation_head = _generation_head_forward(config, budget.gen_tokens)
    scale = multiplier * rows
    return FlopBreakdown(decoder * scale, attention * scale, lm_head * scale, vit_flops * scale, connector * scale,
                         generation_head * scale)


FLASH_STYLE_ATTENTION = ("chunked", "pallas", "pallas_interpret", "auto")


def executed_model_flops(config: Any, budget: Any, rows: int, *, train_und: bool, train_gen: bool,
                         visible_fraction: float | None = None) -> dict[str, float]:
    """Matmul FLOPs one train step actually executes (what a compiled program should show), by part.

    Unlike :func:`step_flops` (the model-FLOPs convention behind MFU: every token's forward + a 2x backward),
    this follows the step: a frozen part gets no weight gradients; with ``llm.freeze_und`` the understanding
    side is detached, so it gets no backward at all; ``remat == "full"`` recomputes each decoder layer's
    forward in the backward pass (minus what a detached understanding side does not need: its o_proj and MLP);
    flash-style attention backward passes (chunked, Pallas) recompute the scores, 2.5x the forward instead of
    2x. ``config`` is a model config (``attention_impl``, ``remat``, ``llm``, ``vit``).
    """
    llm = config.llm
    layers, und, gen = llm.num_layers, budget.und_tokens, budget.gen_tokens
    hidden, q_dim, kv_dim = llm.hidden_size, llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    qkv = 2.0 * hidden * (q_dim + 2 * kv_dim)
    layer = 2.0 * expert_layer_matmul_params(config)
    detached = bool(llm.freeze_und) and not train_und

    def backward(trained: bool, is_und: bool) -> float:
        # weight gradients + input gradients (1x forward each); inputs still need gradients when not detached
        return 2.0 if trained else (0.0 if (detached or not is_und) else 1.0)

    parts = {"decoder_forward": layer * (und + gen) * layers,
             "decoder_backward": layer * layers * (und * backward(train_und, True) + gen * backward(train_gen, False))}
    if config.remat == "full":
        parts["decoder_remat_recompute"] = layers * (gen * layer + und * (qkv if detached else layer))
    attention_forward = 4.0 * (und + gen) ** 2 * llm.num_heads * llm.head_dim * layers
    attention_forward *= 1.0 if visible_fraction is None else visible_fraction
    parts["attention_forward"] = attention_forward
    parts["attention_backward"] = attention_forward * (2.5 if config.attention_impl in FLASH_STYLE_ATTENTION else 2.0)
    if config.remat == "full":
        parts["attention_remat_recompute"] = attention_forward
    lm_head = 2.0 * hidden * llm.vocab_size * budget.ce_tokens
    parts["lm_head"] = lm_head * (1.0 + backward(train_und, True))
    if budget.vit_patches:
        vit_forward = _vit_forward(config, budget.vit_patches) + _connector_forward(config, budget.vit_patches)
        parts["vit_and_connector"] = vit_forward * (3.0 if train_und else 1.0)
    parts["generation_head"] = _generation_head_forward(config, gen) * (3.0 if train_gen else 1.0)
    return {name: value * rows for name, value in parts.items()}


def _vit_forward(config: Any, patches: int) -> float:
    """ViT forward over ``patches`` patches of one row: patch embedding, layers, attention (all patches)."""
    vit = config.vit
    if not patches:
        return 0.0
    patch_dim = vit.patch_size**2 * vit.num_channels
    flops = 2.0 * (vit_layer_matmul_params(config) * vit.num_layers + patch_dim * vit.hidden_size) * patches
    return flops + 4.0 * patches**2 * vit.hidden_size * vit.num_layers


def _connector_forward(config: Any, patches: int) -> float:
    """ViT → LLM connector (two linears) over ``patches`` patches."""
    hidden = config.llm.hidden_size
    return 2.0 * (config.vit.hidden_size * hidden + hidden**2) * patches


def _generation_head_forward(config: Any, gen_tokens: int) -> float:
    """vae2llm, the time embedder (256-d features, two linears) and llm2vae over ``gen_tokens`` tokens."""
    token_dim = config.latent_patch_size**2 * config.vae.z_channels
    hidden = config.llm.hidden_size
    return 2.0 * (token_dim * hidden + 256 * hidden + hidden**2 + hidden * token_dim) * gen_tokens


def _conv(k: int, cin: int, cout: int, h: int, w: int) -> float:
    return 2.0 * k * k * cin * cout * h * w


def vae_encode_flops(vae: Any, height: int, width: int) -> float:
    """Forward FLOPs of the frozen VAE encoder on one image (convolutions + mid attention; the step runs it
    in ``prepare`` to get the clean latents, so it belongs to the step's count)."""
    ch, mult = vae.ch, tuple(vae.ch_mult)
    h, w = height, width
    flops = _conv(3, vae.in_channels, ch, h, w)
    block_in = ch
    for level, level_mult in enumerate(mult):
        block_out = ch * level_mult
        for _ in range(vae.num_res_blocks):
            flops += _conv(3, block_in, block_out, h, w) + _conv(3, block_out, block_out, h, w)
            if block_in != block_out:
                flops += _conv(1, block_in, block_out, h, w)
            block_in = block_out
        if level != len(mult) - 1:
            h, w = h // 2, w // 2
            flops += _conv(3, block_in, block_in, h, w)
    top = block_in
    res_block = 2 * _conv(3, top, top, h, w)
    attention = 4 * _conv(1, top, top, h, w) + 4.0 * (h * w) ** 2 * top  # q/k/v/proj + scores and values
    return flops + 2 * res_block + attention + _conv(3, top, 2 * vae.z_channels, h, w)


def analytic_step_flops(model_config: Any, budget: Any, rows: int, visible_fraction: float | None = None) -> dict:
    """Analytic model FLOPs of one train step over ``rows`` packs (the MFU convention): the MoT forward+backward
    of :func:`step_flops` (token routing: each token through its own expert) + the frozen VAE encoder forward.
    ``visible_fraction`` None = dense attention (what the jnp reference and xla_dense compute)."""
    breakdown = step_flops(model_config, budget, rows, backward=True, visible_fraction=visible_fraction)
    parts = {k: float(v) for k, v in dataclasses.asdict(breakdown).items()}
    parts["vae_encoder_forward"] = _vae_flops(model_config, budget, rows)
    return {"total": sum(parts.values()), "parts": parts,
            "counted_as": "MoT fwd+bwd with real routing (2·N_expert·T per forward, backward 2x), attention "
                          + ("dense T^2" if visible_fraction is None else f"x visible fraction {visible_fraction:.3f}")
                          + ", lm_head at CE slots, ViT+connector, generation head, frozen VAE encoder fwd"}


def _vae_flops(model_config: Any, budget: Any, rows: int) -> float:
    height, width = budget.image_size
    return float(rows * budget.vae_images * vae_encode_flops(model_config.vae, height, width))


def executed_step_flops(config: Any, budget: Any, rows: int) -> dict:
    """Analytic FLOPs the step of run config ``config`` executes (:func:`executed_model_flops`):
    only trained parts get weight gradients, a detached understanding side gets no backward, the remat policy's
    recomputation and the flash-style attention backward's score recomputation are counted; + the frozen VAE
    encoder forward. This is the count a compiled program should match."""
    groups = trainable_groups(config)
    parts = executed_model_flops(config.model, budget, rows, train_und="und" in groups, train_gen="gen" in groups)
    parts["vae_encoder_forward"] = _vae_flops(config.model, budget, rows)
    return {"total": sum(parts.values()), "parts": parts,
            "counted_as": f"matmul FLOPs the step executes: trained groups {'+'.join(groups)}, "
                          f"freeze_und={bool(config.model.llm.freeze_und)}, remat {config.model.remat} "
                          f"(recomputation counted), attention {config.model.attention_impl} dense T^2"}
