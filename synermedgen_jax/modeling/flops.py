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
import math
import re
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


def executed_step_flops(config: Any, budget: Any, rows: int, *, train_und: bool, train_gen: bool,
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


def compiled_flops(compiled) -> float:
    """FLOPs XLA reports for a compiled executable (``jit(f).lower(...).compile()``)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


# ------------------------------------------------------------------------------------------------------------
# Counting the compiled program's matmul FLOPs from its HLO text, loops included.
#
# XLA's cost_analysis() counts the body of a while loop ONCE, whatever its trip count: the chunked attention
# (a scan over key chunks), the grouped VAE encoding (lax.map) and gradient accumulation run in loops, so its
# figure undercounts them. The optimised HLO states each loop's trip count (``known_trip_count``), so the dot
# and convolution FLOPs can be counted with every loop body multiplied by its trips.
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")
_OPERANDS = re.compile(r"%?([\w.\-]+),\s*%?([\w.\-]+)\)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _dims(type_text: str) -> list[int] | None:
    match = _ARRAY.match(type_text)
    return [int(d) for d in match.group(1).split(",") if d] if match else None


def _parse_hlo(text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str | None]:
    """``{computation: [(name, type, opcode, rest of line)]}`` and the entry computation's name."""
    computations: dict[str, list] = {}
    entry, current = None, None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None:
            match = _COMPUTATION.match(stripped)
            if match and not stripped.startswith("HloModule"):
                current = match.group(2)
                computations[current] = []
                entry = current if match.group(1) else entry
            continue
        if stripped == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            computations[current].append(match.groups())
    return computations, entry


def _matmul_flops(opcode: str, out_type: str, rest: str, types: dict[str, str]) -> float:
    operands = _OPERANDS.match(rest)
    out = _dims(out_type)
    if operands is None or out is None:
        return 0.0
    if opcode == "dot":
        lhs = _dims(types.get(operands.group(1), ""))
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
        if lhs is None or contracting is None:
            return 0.0
        depth = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
        return 2.0 * math.prod(out) * depth
    rhs = _dims(types.get(operands.group(2), ""))
    labels = re.search(r"dim_labels=[^_]*_([0-9a-z]+)->", rest)
    if rhs is None or labels is None or "o" not in labels.group(1):
        return 0.0
    # Each output element sums over the kernel's spatial window × input features (per feature group).
    return 2.0 * math.prod(out) * math.prod(rhs) / rhs[labels.group(1).index("o")]


def hlo_matmul_flops(hlo_text: str) -> dict:
    """Dot + convolution FLOPs of a compiled HLO module (``compiled.as_text()``).

    Returns ``{"once": every loop body counted once (what cost_analysis does), "with_trips": loop bodies
    times their known trip counts, "loops": [{"trips", "body_flops"}, ...] for loops doing matmuls}``.
    Fusions, calls and conditionals (largest branch) are followed; loops without a known trip count count
    once in both figures.
    """
    computations, entry = _parse_hlo(hlo_text)
    loops: list[dict] = []

    def total(name: str, trips: bool, memo: dict) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # guards against cycles
        instructions = computations.get(name, [])
        types = {n: t for n, t, _, _ in instructions}
        flops = 0.0
        for _, out_type, opcode, rest in instructions:
            if opcode in ("dot", "convolution"):
                flops += _matmul_flops(opcode, out_type, rest, types)
            elif opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
                condition = re.search(r"condition=%?([\w.\-]+)", rest).group(1)
                known = _TRIPS.search(rest)
                count = int(known.group(1)) if (trips and known) else 1
                inner = total(body, trips, memo) + total(condition, trips, memo)
                if trips and inner:
                    loops.append({"trips": int(known.group(1)) if known else None, "body_flops": inner})
                flops += count * inner
            elif opcode == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                if branches:
                    flops += max(total(b.strip().lstrip("%"), trips, memo) for b in branches.group(1).split(","))
            else:
                for called in re.findall(r"(?:calls|to_apply|called_computations)=\{?%?([\w.\-]+)", rest):
                    flops += total(called, trips, memo)
        memo[name] = flops
        return flops

    if entry is None:
        raise ValueError("hlo_matmul_flops: no ENTRY computation in the HLO text")
    once = total(entry, False, {})
    with_trips = total(entry, True, {})
    return {"once": once, "with_trips": with_trips, "loops": loops}
