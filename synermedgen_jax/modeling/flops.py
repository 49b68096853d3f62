"""Analytic FLOP counts for one packed forward(+backward) of the MoT model, and XLA's count to compare.

The count follows the token routing: every understanding slot runs the understanding expert once, every
generation slot the generation expert once (padding slots included: shapes are static), so the decoder costs
``2·N_layer·T`` per forward where ``N_layer`` is ONE expert's matmul parameters. Attention counts the score and
value products over the visible key blocks only when ``visible_fraction`` is given (a block-skipping kernel),
densely otherwise. A backward pass costs twice the forward. The frozen VAE is not included (its latents are
inputs of the step).
"""

from __future__ import annotations

import dataclasses
from typing import Any


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
    llm, vit = config.llm, config.vit
    multiplier = 3.0 if backward else 1.0  # backward = 2 × forward for matmuls
    tokens = budget.und_tokens + budget.gen_tokens
    attention_fraction = 1.0 if visible_fraction is None else visible_fraction
    decoder = 2.0 * expert_layer_matmul_params(config) * tokens * llm.num_layers
    # scores (2·T²·D per head) + weighted values (2·T²·D per head)
    attention = 4.0 * tokens**2 * llm.num_heads * llm.head_dim * llm.num_layers * attention_fraction
    lm_head = 2.0 * llm.hidden_size * llm.vocab_size * budget.ce_tokens
    patches = budget.vit_patches
    patch_dim = vit.patch_size**2 * vit.num_channels
    vit_flops = 0.0
    connector = 0.0
    if patches:
        vit_flops = 2.0 * (vit_layer_matmul_params(config) * vit.num_layers + patch_dim * vit.hidden_size) * patches
        vit_flops += 4.0 * patches**2 * vit.hidden_size * vit.num_layers
        connector = 2.0 * (vit.hidden_size * llm.hidden_size + llm.hidden_size**2) * patches
    token_dim = config.latent_patch_size**2 * config.vae.z_channels
    hidden = llm.hidden_size
    generation_head = 2.0 * (token_dim * hidden + 256 * hidden + hidden**2 + hidden * token_dim) * budget.gen_tokens
    scale = multiplier * rows
    return FlopBreakdown(decoder * scale, attention * scale, lm_head * scale, vit_flops * scale, connector * scale,
                         generation_head * scale)


def compiled_flops(compiled) -> float:
    """FLOPs XLA reports for a compiled executable (``jit(f).lower(...).compile()``)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))
