"""Copies weights from the PyTorch reference models (transformers, diffusers) into our NNX modules.

Test-only: the production port of BAGEL checkpoints lives in synermedgen_jax/port/.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _np(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


def randomize_affine_(module) -> None:
    """Draws every bias of a torch module from U(-0.3, 0.3) and every norm scale from U(0.5, 1.5), in place.

    Library initialisers set biases to zero and norm scales to one, so a dropped or swapped bias or norm
    parameter (in a port's key map, a loader, or the model itself) would leave the outputs unchanged; with
    distinct random values each such mistake changes them. A norm scale is the ``weight`` of a submodule
    whose class name contains ``Norm`` (LayerNorm, GroupNorm, Qwen's RMSNorm). Draws from torch's global
    generator, so ``torch.manual_seed`` makes the values reproducible."""
    import torch

    with torch.no_grad():
        for _, sub in module.named_modules():
            is_norm = "Norm" in type(sub).__name__
            for name, param in sub.named_parameters(recurse=False):
                if name == "bias":
                    low, high = -0.3, 0.3
                elif is_norm and name == "weight":
                    low, high = 0.5, 1.5
                else:
                    continue
                param.copy_(torch.empty(param.shape).uniform_(low, high).to(param.dtype))


def set_linear(linear, state: dict, prefix: str) -> None:
    """A torch ``nn.Linear`` (weight ``[out, in]``) into our ``Linear`` (kernel ``[in, out]``)."""
    linear.kernel.value = jnp.asarray(_np(state[f"{prefix}.weight"]).T)
    if linear.bias is not None:
        bias = state.get(f"{prefix}.bias")
        linear.bias.value = jnp.asarray(_np(bias)) if bias is not None else jnp.zeros_like(linear.bias.value)


def set_vector(param, tensor) -> None:
    param.value = jnp.asarray(_np(tensor))


def load_qwen_into_und_expert(language_model, hf_model, *, qk_norm: bool) -> None:
    """A transformers Qwen2/Qwen3 causal LM into the understanding expert (+ shared embed / lm_head)."""
    state = hf_model.state_dict()
    set_vector(language_model.embed_tokens, state["model.embed_tokens.weight"])
    language_model.lm_head.value = jnp.asarray(_np(state["lm_head.weight"]).T)
    set_vector(language_model.norm.weight, state["model.norm.weight"])
    for i, layer in enumerate(language_model.layers):
        prefix = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            set_linear(getattr(layer.self_attn, name), state, f"{prefix}.self_attn.{name}")
        if qk_norm:
            set_vector(layer.self_attn.q_norm.weight, state[f"{prefix}.self_attn.q_norm.weight"])
            set_vector(layer.self_attn.k_norm.weight, state[f"{prefix}.self_attn.k_norm.weight"])
        for name in ("gate_proj", "up_proj", "down_proj"):
            set_linear(getattr(layer.mlp, name), state, f"{prefix}.mlp.{name}")
        set_vector(layer.input_layernorm.weight, state[f"{prefix}.input_layernorm.weight"])
        set_vector(layer.post_attention_layernorm.weight, state[f"{prefix}.post_attention_layernorm.weight"])


def load_siglip(vit_model, hf_vision_model) -> None:
    """transformers ``SiglipVisionModel`` into our NaViT ViT (conv patch embedding → Linear over (kh, kw, c))."""
    # transformers 5 drops the "vision_model." prefix from SiglipVisionModel's own state dict.
    state = {k.removeprefix("vision_model."): v for k, v in hf_vision_model.state_dict().items()}
    conv = _np(state["embeddings.patch_embedding.weight"])  # [out, c, kh, kw]
    vit_model.embeddings.patch_embedding.kernel.value = jnp.asarray(
        conv.transpose(0, 2, 3, 1).reshape(conv.shape[0], -1).T)
    set_vector(vit_model.embeddings.patch_embedding.bias, state["embeddings.patch_embedding.bias"])
    set_vector(vit_model.embeddings.position_embedding, state["embeddings.position_embedding.weight"])
    for i, layer in enumerate(vit_model.layers):
        prefix = f"encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            set_linear(getattr(layer.self_attn, name), state, f"{prefix}.self_attn.{name}")
        set_linear(layer.mlp.fc1, state, f"{prefix}.mlp.fc1")
        set_linear(layer.mlp.fc2, state, f"{prefix}.mlp.fc2")
        for norm in ("layer_norm1", "layer_norm2"):
            set_vector(getattr(layer, norm).weight, state[f"{prefix}.{norm}.weight"])
            set_vector(getattr(layer, norm).bias, state[f"{prefix}.{norm}.bias"])
    set_vector(vit_model.post_layernorm.weight, state["post_layernorm.weight"])
    set_vector(vit_model.post_layernorm.bias, state["post_layernorm.bias"])


def _set_conv(conv, state: dict, prefix: str) -> None:
    weight = _np(state[f"{prefix}.weight"])
    if weight.ndim == 2:  # diffusers' attention projections are Linear; ours are 1×1 convs
        weight = weight[:, :, None, None]
    conv.kernel.value = jnp.asarray(weight.transpose(2, 3, 1, 0))
    set_vector(conv.bias, state[f"{prefix}.bias"])


def _set_norm(norm, state: dict, prefix: str) -> None:
    set_vector(norm.weight, state[f"{prefix}.weight"])
    set_vector(norm.bias, state[f"{prefix}.bias"])


def _set_resnet(block, state: dict, prefix: str) -> None:
    _set_norm(block.norm1, state, f"{prefix}.norm1")
    _set_conv(block.conv1, state, f"{prefix}.conv1")
    _set_norm(block.norm2, state, f"{prefix}.norm2")
    _set_conv(block.conv2, state, f"{prefix}.conv2")
    if block.nin_shortcut is not None:
        _set_conv(block.nin_shortcut, state, f"{prefix}.conv_shortcut")


def _set_mid(mid, state: dict, prefix: str) -> None:
    _set_resnet(mid.block_1, state, f"{prefix}.resnets.0")
    _set_resnet(mid.block_2, state, f"{prefix}.resnets.1")
    attn = f"{prefix}.attentions.0"
    _set_norm(mid.attn_1.norm, state, f"{attn}.group_norm")
    for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        _set_conv(getattr(mid.attn_1, ours), state, f"{attn}.{theirs}")


def load_diffusers_vae(vae, hf_vae) -> None:
    """diffusers ``AutoencoderKL`` (FLUX configuration: no quant convs) into our FLUX-named AutoEncoder."""
    state = hf_vae.state_dict()
    enc, dec = vae.encoder, vae.decoder
    _set_conv(enc.conv_in, state, "encoder.conv_in")
    for i, stage in enumerate(enc.down):
        for j, block in enumerate(stage.block):
            _set_resnet(block, state, f"encoder.down_blocks.{i}.resnets.{j}")
        if stage.downsample is not None:
            _set_conv(stage.downsample.conv, state, f"encoder.down_blocks.{i}.downsamplers.0.conv")
    _set_mid(enc.mid, state, "encoder.mid_block")
    _set_norm(enc.norm_out, state, "encoder.conv_norm_out")
    _set_conv(enc.conv_out, state, "encoder.conv_out")
    _set_conv(dec.conv_in, state, "decoder.conv_in")
    _set_mid(dec.mid, state, "decoder.mid_block")
    levels = len(dec.up)
    for k in range(levels):  # diffusers' up_blocks[0] is FLUX's top level up[levels-1]
        stage = dec.up[levels - 1 - k]
        for j, block in enumerate(stage.block):
            _set_resnet(block, state, f"decoder.up_blocks.{k}.resnets.{j}")
        if stage.upsample is not None:
            _set_conv(stage.upsample.conv, state, f"decoder.up_blocks.{k}.upsamplers.0.conv")
    _set_norm(dec.norm_out, state, "decoder.conv_norm_out")
    _set_conv(dec.conv_out, state, "decoder.conv_out")
