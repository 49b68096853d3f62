"""The one mapping table between BAGEL checkpoint keys and our parameter paths (docs/architecture.md).

The table is derived from our model's own (abstract) state, so it can never drift from the model code: every
leaf path is renamed with a handful of prefix rules and given a layout transform, used in both directions:

  ``linear``  PyTorch Linear ``[out, in]``  ↔  our kernel ``[in, out]`` (2-D transpose; also lm_head and the ViT
              patch embedding, which BAGEL stores as a Linear over (kh, kw, c), the same order as ours)
  ``conv``    PyTorch Conv2d ``[out, in, kh, kw]``  ↔  our kernel ``[kh, kw, in, out]``
  ``none``    same layout (biases, norms, embeddings, position tables)

``file`` says where the key lives: ``ema`` (``ema.safetensors`` / ``model.safetensors``) or ``ae``
(``ae.safetensors``, FLUX naming, which our VAE uses verbatim). UniMedVL folders may also carry the VAE inside
the model file as ``vae_model.<FLUX name>`` (read in place of ``ae.safetensors``, port/bagel.py) and the latent
BatchNorm's running statistics ``vae_batch_norm.running_mean/var`` (our ``vae.latent_norm.*``, ema file).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

# Ours → BAGEL prefix renames, first match wins (checked on dotted paths).
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.lm_head", "language_model.lm_head.weight"),
    ("language_model.embed_tokens", "language_model.model.embed_tokens.weight"),
    ("language_model.", "language_model.model."),
    ("vit_model.embeddings.position_embedding", "vit_model.vision_model.embeddings.position_embedding.weight"),
    ("vit_model.embeddings.", "vit_model.vision_model.embeddings."),
    ("vit_model.layers.", "vit_model.vision_model.encoder.layers."),
    ("vit_model.post_layernorm.", "vit_model.vision_model.post_layernorm."),
    ("vit_pos_embed", "vit_pos_embed.pos_embed"),
    ("latent_pos_embed", "latent_pos_embed.pos_embed"),
    ("time_embedder.mlp_0.", "time_embedder.mlp.0."),
    ("time_embedder.mlp_2.", "time_embedder.mlp.2."),
    ("vae.latent_norm.", "vae_batch_norm."),  # UniMedVL's latent BatchNorm statistics (in its model file)
    ("vae.", ""),
)
LATENT_NORM = "vae.latent_norm."
TABLES = ("vit_pos_embed", "latent_pos_embed")  # frozen sin-cos tables: saved, rebuilt when absent or resized
MOE_SUFFIX = "_moe_gen"


@dataclasses.dataclass(frozen=True)
class KeyRule:
    ours: str  # dotted path in our state, e.g. "language_model.layers.0.self_attn.q_proj.kernel"
    bagel: str  # checkpoint key, e.g. "language_model.model.layers.0.self_attn.q_proj.weight"
    file: str  # "ema" or "ae"
    transform: str  # "linear" | "conv" | "none"
    our_shape: tuple[int, ...]

    @property
    def bagel_shape(self) -> tuple[int, ...]:
        return bagel_shape(self.our_shape, self.transform)

    @property
    def is_table(self) -> bool:
        return self.ours in TABLES

    @property
    def und_source(self) -> str | None:
        """For a generation-expert key, the understanding key BAGEL's ``init_moe`` copies from."""
        return self.bagel.replace(MOE_SUFFIX, "") if MOE_SUFFIX in self.bagel else None


def dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _bagel_name(ours: str, ndim: int) -> tuple[str, str]:
    name = ours
    for old, new in _PREFIXES:
        if name.startswith(old) or name == old.rstrip("."):
            name = new + name[len(old):]
            break
    transform = "none"
    if name.endswith(".kernel"):
        name = name[: -len(".kernel")] + ".weight"
        transform = {2: "linear", 4: "conv"}[ndim]
    elif ours == "language_model.lm_head":
        transform = "linear"
    return name, transform


def bagel_shape(our_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    if transform == "linear":
        return (our_shape[1], our_shape[0])
    if transform == "conv":
        kh, kw, cin, cout = our_shape
        return (cout, cin, kh, kw)
    return tuple(our_shape)


def to_ours(array: np.ndarray, transform: str, dtype: np.dtype | None = None) -> np.ndarray:
    """BAGEL layout → ours, cast to ``dtype``; the layout change and the cast share one new buffer (peak memory
    during an import is a few copies of the largest tensor, so each copy saved matters)."""
    dtype = np.dtype(dtype or array.dtype)
    if transform == "linear":
        view = array.T
    elif transform == "conv":
        view = array.transpose(2, 3, 1, 0)
    else:
        return array.astype(dtype, copy=False)
    out = np.empty(view.shape, dtype)
    np.copyto(out, view, casting="unsafe")
    return out


def to_bagel(array: np.ndarray, transform: str) -> np.ndarray:
    """Ours → BAGEL layout (inverse of :func:`to_ours`)."""
    if transform == "linear":
        return np.ascontiguousarray(array.T)
    if transform == "conv":
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return array


def abstract_state(config) -> nnx.State:
    """Our model's state as shapes only (no allocation): Params and the frozen tables."""
    from synermedgen_jax.modeling.synermedgen import SynerMedGen  # heavy import, only when needed

    model = nnx.eval_shape(lambda: SynerMedGen(config, rngs=nnx.Rngs(params=0)))
    return nnx.state(model)


def build_table(config) -> list[KeyRule]:
    """Every leaf of our model with its BAGEL key, file and transform, in our state's order."""
    rules = []
    for path, variable in nnx.to_flat_state(abstract_state(config)):
        ours = dotted(path)
        shape = tuple(variable.get_value().shape)
        bagel, transform = _bagel_name(ours, len(shape))
        in_ae = ours.startswith("vae.") and not ours.startswith(LATENT_NORM)
        rules.append(KeyRule(ours, bagel, "ae" if in_ae else "ema", transform, shape))
    return rules


# --------------------------------------------------------------------------------------------------------
# Initial values for keys a partial checkpoint leaves out (--allow-missing); these follow our modules' own
# initialisers (modeling/layers.py): norms ones/zeros, llm2vae zeros, embeddings normal, Linear/Conv uniform
# ±1/sqrt(fan_in) as PyTorch does.
def initial_value(rule: KeyRule, rng: np.random.Generator, fan_in: int | None = None) -> np.ndarray:
    """A fresh value for ``rule`` (float32, our layout). ``fan_in``: the owning kernel's, for Linear/Conv biases."""
    name, shape = rule.ours, rule.our_shape
    parent, _, leaf = name.rpartition(".")
    is_norm = "norm" in parent.rpartition(".")[2]
    if is_norm and leaf == "weight":
        return np.ones(shape, np.float32)
    if (is_norm and leaf == "bias") or name.startswith("llm2vae."):
        return np.zeros(shape, np.float32)
    if name in ("language_model.embed_tokens", "language_model.lm_head"):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("position_embedding"):
        return rng.standard_normal(shape).astype(np.float32)
    if leaf == "kernel":
        fan_in = int(np.prod(shape[:-1]))
    if leaf in ("kernel", "bias") and fan_in:
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    raise ValueError(f"no initialiser for {name} (shape {list(shape)})")
