"""Builds random tiny BAGEL-layout folders with PyTorch (transformers / diffusers modules), for the port tests.

The folder is written with the official ``safetensors.torch.save_file`` (not our writer), so reading it tests
our reader against the reference implementation. Key names follow the released BAGEL checkpoint (docs/architecture.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from torch_refs import randomize_affine_

SPECIAL_IDS = dict(bos=1, eos=2, vision_start=3, vision_end=4, pad=0)


def sincos_table(dim: int, side: int, base: float = 10000.0, step: float = 1.0) -> np.ndarray:
    """BAGEL's frozen 2-D sin-cos table (docs/architecture.md), written independently of our layers.py: row r*side+c,
    first half encodes the column, second half the row, each half [sin(p·w_k), cos(p·w_k)],
    w_k=step/base^(k/(D/4)) (BAGEL: base 1e4, step 1)."""
    quarter = dim // 4
    omega = step / base ** (np.arange(quarter) / quarter)
    table = np.zeros((side * side, dim))
    for r in range(side):
        for c in range(side):
            row = r * side + c
            table[row, :quarter] = np.sin(c * omega)
            table[row, quarter: 2 * quarter] = np.cos(c * omega)
            table[row, 2 * quarter: 3 * quarter] = np.sin(r * omega)
            table[row, 3 * quarter:] = np.cos(r * omega)
    return table.astype(np.float32)


def _qwen(config, qk_norm: bool):
    llm = config.llm
    kw = dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, num_hidden_layers=llm.num_layers,
              num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim,
              intermediate_size=llm.intermediate_size, rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps,
              tie_word_embeddings=False, max_position_embeddings=256, attn_implementation="eager")
    if qk_norm:  # Qwen3 = Qwen2 + per-head q/k RMSNorm before RoPE; BAGEL has q/k/v biases but no o_proj bias
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(attention_bias=True, **kw))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    randomize_affine_(model)  # random q/k/v biases and norm scales, so a swapped or dropped one shows
    if qk_norm:
        for layer in model.model.layers:
            torch.nn.init.zeros_(layer.self_attn.o_proj.bias)
    return model.eval()


def _llm_keys(model, suffix: str) -> dict[str, torch.Tensor]:
    """transformers Qwen state dict → BAGEL's ``language_model.*`` keys (``suffix`` makes the _moe_gen twin)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("o_proj.bias") or "rotary_emb" in name:
            continue
        if suffix:
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                continue  # shared between experts
            name = name.replace("model.norm.", f"model.norm{suffix}.")
            for part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "input_layernorm",
                         "post_attention_layernorm"):
                name = name.replace(f".{part}.", f".{part}{suffix}.")
            name = name.replace(".mlp.", f".mlp{suffix}.")
        out[f"language_model.{name}"] = tensor
    return out


def siglip(config):
    vit = config.vit
    hf_config = transformers.SiglipVisionConfig(
        hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size, num_hidden_layers=vit.num_layers,
        num_attention_heads=vit.num_heads, num_channels=vit.num_channels,
        image_size=vit.max_num_patch_per_side * vit.patch_size, patch_size=vit.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=vit.layer_norm_eps, attn_implementation="eager")
    model = transformers.SiglipVisionModel(hf_config).eval()
    randomize_affine_(model)  # every bias and LayerNorm scale/offset, post_layernorm included
    return model


def _vit_keys(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("vision_model.")
        if name.startswith("head."):
            continue
        if name == "embeddings.patch_embedding.weight":  # BAGEL's convert_conv2d_to_linear
            tensor = tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
        if name == "embeddings.position_ids":
            continue
        out[f"vit_model.vision_model.{name}"] = tensor
    return out


def diffusers_vae(config):
    import diffusers

    vae = config.vae
    levels = len(vae.ch_mult)
    model = diffusers.AutoencoderKL(
        in_channels=vae.in_channels, out_channels=vae.in_channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(vae.ch * m for m in vae.ch_mult),
        layers_per_block=vae.num_res_blocks, latent_channels=vae.z_channels, norm_num_groups=vae.norm_groups,
        use_quant_conv=False, use_post_quant_conv=False).eval()
    randomize_affine_(model)  # GroupNorm scales/offsets are 1/0 by default
    return model


def _flux_keys(model, levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names → the original FLUX ``ae.safetensors`` names."""
    renames = [("conv_norm_out", "norm_out"), ("mid_block.resnets.0", "mid.block_1"),
               ("mid_block.resnets.1", "mid.block_2"), ("mid_block.attentions.0", "mid.attn_1"),
               ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
               ("conv_shortcut", "nin_shortcut"), ("downsamplers.0", "downsample"), ("upsamplers.0", "upsample"),
               ("resnets", "block")]
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("encoder.down_blocks."):
            name = name.replace("encoder.down_blocks.", "encoder.down.")
        elif name.startswith("decoder.up_blocks."):  # diffusers' up_blocks[k] is FLUX's up[levels-1-k]
            k = int(name.split(".")[2])
            name = ".".join(["decoder", "up", str(levels - 1 - k), *name.split(".")[3:]])
        for old, new in renames:
            name = name.replace(old, new)
        if ".attn_1." in name and name.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # FLUX's attention projections are 1x1 convs
        out[name] = tensor.contiguous()
    return out


def make_bagel_folder(folder: Path, config, *, seed: int, qk_norm: bool = True, moe: bool = True,
                      dtype: torch.dtype = torch.float32) -> dict:
    """Writes a BAGEL folder for ``config`` and returns ``{"ema": {...}, "ae": {...}, "llm", "vit", "vae"}``
    (the torch tensors as written, and the reference modules)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    hidden = config.llm.hidden_size
    token_dim = config.latent_patch_size**2 * config.vae.z_channels
    llm, llm_gen = _qwen(config, qk_norm), _qwen(config, qk_norm)
    vit, vae = siglip(config), diffusers_vae(config)
    ema = _llm_keys(llm, "")
    if moe:
        ema.update(_llm_keys(llm_gen, "_moe_gen"))
    ema.update(_vit_keys(vit))
    linears = {"connector.fc1": (config.vit.hidden_size, hidden), "connector.fc2": (hidden, hidden),
               "vae2llm": (token_dim, hidden), "llm2vae": (hidden, token_dim),
               "time_embedder.mlp.0": (256, hidden), "time_embedder.mlp.2": (hidden, hidden)}
    for name, (fan_in, fan_out) in linears.items():
        layer = torch.nn.Linear(fan_in, fan_out)
        randomize_affine_(layer)  # PyTorch's default bias bound 1/sqrt(fan_in) is tiny at fan-in 256
        ema[f"{name}.weight"], ema[f"{name}.bias"] = layer.weight.detach(), layer.bias.detach()
    ema["vit_pos_embed.pos_embed"] = torch.from_numpy(sincos_table(hidden, config.vit.max_num_patch_per_side))
    ema["latent_pos_embed.pos_embed"] = torch.from_numpy(sincos_table(hidden, config.max_latent_size))
    ema = {k: v.detach().to(dtype).contiguous() for k, v in ema.items()}
    ae = {k: v.detach().float() for k, v in _flux_keys(vae, len(config.vae.ch_mult)).items()}
    save_file(ema, str(folder / "ema.safetensors"), metadata={"format": "pt"})
    save_file(ae, str(folder / "ae.safetensors"), metadata={"format": "pt"})
    llm_json = {k: v for k, v in llm.config.to_dict().items() if not k.startswith("_")}
    llm_json.pop("layer_types", None)
    if not qk_norm:
        llm_json["qk_norm"] = False
    (folder / "llm_config.json").write_text(json.dumps(llm_json, indent=2))
    vit_json = {"hidden_size": config.vit.hidden_size, "intermediate_size": config.vit.intermediate_size,
                "model_type": "siglip_vision_model", "num_attention_heads": config.vit.num_heads,
                "num_hidden_layers": config.vit.num_layers + 1, "patch_size": config.vit.patch_size,
                "image_size": config.vit.max_num_patch_per_side * config.vit.patch_size}
    (folder / "vit_config.json").write_text(json.dumps(vit_json, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return {"ema": ema, "ae": ae, "llm": llm, "vit": vit, "vae": vae}


def port_test_config(tiny_config):
    """The tiny model with a small FLUX-structured VAE: 3 channels and FLUX's 32 GroupNorm groups (an
    ae.safetensors carries no config, so the importer assumes FLUX's groups)."""
    config = tiny_config.copy_and_resolve_references()
    config.vae.in_channels = 3
    config.vae.ch, config.vae.ch_mult, config.vae.norm_groups = 32, (1, 2), 32
    config.compute_dtype = "float32"
    return config
