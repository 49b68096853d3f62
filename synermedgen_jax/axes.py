"""Axis names, each written once (MaxText's ``common_types`` style).

Two kinds of names:

* mesh axes, the device mesh's dimensions (``sharding.MESH_AXES`` orders them; ``BATCH_AXES`` split the rows);
* logical axes, the names parameters (``nnx.Param`` metadata ``logical_axes``) and activation constraints
  (``modeling.layers.constrain``) carry; ``sharding.LOGICAL_RULES`` maps each onto mesh axes.

The model code names logical axes only; which mesh axis holds them is the rules table's business.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------------ mesh axes

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
BATCH_AXES = (DATA, FSDP)  # the mesh axes the leading (row) axis of every batch array is split over

# ------------------------------------------------------------------------------------ logical axes: activations

ACTIVATION_BATCH = "activation_batch"
ACTIVATION_LENGTH = "activation_length"
ACTIVATION_EMBED = "activation_embed"
BATCH_LENGTH_EMBED = (ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_EMBED)  # a [B, T, hidden] activation

# ------------------------------------------------------------------------------------- logical axes: parameters

VOCAB = "vocab"
EMBED = "embed"  # the LLM's hidden size
EMBED_OUT = "embed_out"  # a second hidden-size axis of the same matrix (one mesh axis per array)
HEADS = "heads"  # query heads x head_dim, flattened
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
NORM = "norm"  # a norm's scale and bias
VIT_EMBED = "vit_embed"
VIT_HEADS = "vit_heads"
VIT_MLP = "vit_mlp"
