"""BAGEL / SynerMedGen PyTorch folder ↔ our parameters, streaming and strict.

Public API:
  ``load(dir) -> (config, params)``        the whole checkpoint in memory (``params``: nested dict, string keys)
  ``save(config, params, dir, dtype=…, ema=…)``  writes the BAGEL folder (model/ema/ae.safetensors), one tensor
                                           at a time
  ``plan_import(dir)`` / ``iter_params(plan)``  the streaming pieces the ``import`` command uses

A BAGEL folder holds ``ema.safetensors`` (or ``model.safetensors``, or shards with a ``.index.json``),
``ae.safetensors`` (FLUX naming, no config inside), ``llm_config.json`` (a plain Qwen2 config), ``vit_config.json``
(SigLIP; it says one layer more than BAGEL uses) and tokenizer files. What lives in neither JSON file is inferred
from tensor shapes: ``vit.max_num_patch_per_side`` and ``max_latent_size`` from the position tables' row
counts, the VAE widths from ``ae.safetensors``, ``latent_patch_size`` from ``vae2llm``.

Strictness: missing keys, unexpected keys and shape mismatches are all collected and raised together in one
:class:`PortError`. Exceptions, as BAGEL itself behaves: a checkpoint with no ``_moe_gen`` key at all (a plain
understanding model) gets its generation expert copied from the understanding expert (``init_moe``); the frozen
sin-cos tables are rebuilt when absent or of another size (``max_latent_size=`` override). ``allow_missing``
fnmatch patterns (matched against BAGEL keys and our paths) accept further missing keys: generation-expert keys
are then copied from their understanding twin, anything else gets a fresh initial value.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx

from synermedgen_jax import staging
from synermedgen_jax.modeling.generation import latent_pos_frequencies
from synermedgen_jax.modeling.layers import sincos_2d_table
from synermedgen_jax.port import keys as K
from synermedgen_jax.port.safetensors_stream import (
    DTYPES,
    SafetensorsError,
    SafetensorsReader,
    TensorSpec,
    dtype_name,
    write_streaming,
)

TOKENIZER_PATTERNS = ("tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                      "generation_config.json")
EMA_NAMES = ("ema.safetensors", "model.safetensors")
AE_META_KEY = "synermedgen_vae"  # our own VAE config in ae.safetensors' metadata (BAGEL ignores metadata)


class PortError(ValueError):
    """A checkpoint that cannot be converted; the message lists every problem by file and key."""


# ------------------------------------------------------------------------------------------------------------
# Reading the folder.
def read_json(path: Path) -> dict:
    if not path.is_file():
        raise PortError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PortError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise PortError(f"{path}: expected a JSON object")
    return value


FAMILIES = ("bagel", "unimedvl")
VAE_IN_MODEL = "vae_model."  # UniMedVL: Bagel(..., vae_model=vae) keeps the FLUX VAE inside the model file
LATENT_NORM = "vae_batch_norm."  # UniMedVL: BatchNorm2d(z, affine=False) over the latents (enable_e2e_vae)
LATENT_NORM_STATS = ("running_mean", "running_var")
LATENT_NORM_EPS = 1e-4  # UniMedVL's nn.BatchNorm2d(..., eps=1e-4)
SKIPPED = (LATENT_NORM + "num_batches_tracked",)  # a training counter with no effect at inference


class _Files:
    """Every tensor of the folder: key → (reader, file kind). Opens headers only.

    UniMedVL's ``vae_model.<FLUX name>`` keys (the VAE inside the model file) are served under their FLUX
    names as ``ae`` tensors; they take the place of ``ae.safetensors``' copies, as UniMedVL's loader (the model
    checkpoint loaded after ``load_ae``) lets them, and ``ae.safetensors`` may then be absent."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.readers: list[SafetensorsReader] = []
        self.where: dict[str, tuple[SafetensorsReader, str]] = {}
        self.stored: dict[str, str] = {}  # our view's name → the key in its file, where they differ
        self.skipped: list[str] = []
        self.vae_in_model = 0
        try:
            for path in self._ema_paths():
                self._add(path, "ema")
            ae = folder / "ae.safetensors"
            if ae.is_file():
                self._add(ae, "ae")
            elif not self.vae_in_model:
                raise PortError(f"{ae}: file not found (the FLUX autoencoder weights)")
        except SafetensorsError as err:
            self.close()
            raise PortError(str(err)) from err
        except PortError:
            self.close()
            raise

    def _ema_paths(self) -> list[Path]:
        for name in EMA_NAMES:
            if (self.folder / name).is_file():
                return [self.folder / name]
        for name in EMA_NAMES:
            index = self.folder / f"{name}.index.json"
            if index.is_file():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise PortError(f"{index}: no weight_map object")
                return [self.folder / shard for shard in dict.fromkeys(weight_map.values())]
        raise PortError(f"{self.folder}: none of {', '.join(EMA_NAMES)} (or a sharded .index.json) found")

    def _add(self, path: Path, kind: str) -> None:
        reader = SafetensorsReader(path)
        self.readers.append(reader)
        for key in reader.keys():
            name, file_kind = key, kind
            if kind == "ema" and key.startswith(VAE_IN_MODEL):
                name, file_kind = key[len(VAE_IN_MODEL):], "ae"
                self.stored[name] = key
                self.vae_in_model += 1
            elif key in SKIPPED:
                self.skipped.append(key)
                continue
            elif kind == "ae" and name in self.where and name in self.stored:
                continue  # the model file's vae_model.* copy is the one UniMedVL's loader ends up with
            if name in self.where:
                raise PortError(f"{path}: tensor {key!r} also appears in {self.where[name][0].path}")
            self.where[name] = (reader, file_kind)

    @property
    def family(self) -> str:
        """``unimedvl`` when the folder holds UniMedVL's extra keys, else ``bagel``."""
        extra = self.vae_in_model or self.skipped or any(k.startswith(LATENT_NORM) for k in self.where)
        return "unimedvl" if extra else "bagel"

    def info(self, key: str):
        return self.where[key][0].tensors[self.stored.get(key, key)]

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self.info(key).shape if key in self.where else None

    def read(self, key: str) -> np.ndarray:
        try:
            return self.where[key][0].read(self.stored.get(key, key))
        except SafetensorsError as err:
            raise PortError(str(err)) from err

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


# ------------------------------------------------------------------------------------------------------------
# The model config from the two JSON files and the tensor shapes.
def _need(files: _Files, key: str, what: str) -> tuple[int, ...]:
    shape = files.shape(key)
    if shape is None:
        raise PortError(f"{files.folder}: tensor {key!r} is missing; it is needed to infer {what}")
    return shape


def _square_side(rows: int, key: str) -> int:
    side = math.isqrt(rows)
    if side * side != rows:
        raise PortError(f"{key}: {rows} rows is not a square side² table")
    return side


def _rope_theta(llm_json: dict, path: Path) -> float:
    params = llm_json.get("rope_parameters") or llm_json.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in ("default", None):
        raise PortError(f"{path}: rope type {kind!r} is not supported (BAGEL uses plain RoPE)")
    theta = llm_json.get("rope_theta", params.get("rope_theta") if isinstance(params, dict) else None)
    return float(theta if theta is not None else 10000.0)  # Qwen2Config's default


def infer_config(folder: Path, files: _Files, llm_json: dict, vit_json: dict, *, max_latent_size: int | None,
                 param_dtype: str, compute_dtype: str) -> ml_collections.ConfigDict:
    from synermedgen_jax.config import load_config

    config = load_config("configs/models.py:bagel_7b_mot")
    config.variant = "imported"
    llm_path, vit_path = folder / "llm_config.json", folder / "vit_config.json"
    try:
        hidden, heads = int(llm_json["hidden_size"]), int(llm_json["num_attention_heads"])
        llm = config.llm
        llm.vocab_size = int(llm_json["vocab_size"])
        llm.hidden_size = hidden
        llm.num_layers = int(llm_json["num_hidden_layers"])
        llm.num_heads = heads
        llm.num_kv_heads = int(llm_json.get("num_key_value_heads") or heads)
        llm.intermediate_size = int(llm_json["intermediate_size"])
        llm.rms_norm_eps = float(llm_json.get("rms_norm_eps", 1e-6))
    except (KeyError, TypeError, ValueError) as err:
        raise PortError(f"{llm_path}: missing or bad field {err}") from err
    llm.head_dim = hidden // heads  # BAGEL ignores head_dim in the file and uses hidden / heads
    if llm_json.get("head_dim") not in (None, llm.head_dim):
        raise PortError(f"{llm_path}: head_dim {llm_json['head_dim']} differs from hidden_size/num_attention_heads "
                        f"= {llm.head_dim}, which BAGEL uses")
    llm.rope_theta = _rope_theta(llm_json, llm_path)
    llm.qk_norm = bool(llm_json.get("qk_norm", True))  # BAGEL sets qk_norm=True in code
    llm.tie_word_embeddings = False
    try:
        vit = config.vit
        vit.hidden_size = int(vit_json["hidden_size"])
        vit.intermediate_size = int(vit_json["intermediate_size"])
        vit.num_heads = int(vit_json["num_attention_heads"])
        vit.config_num_layers = int(vit_json["num_hidden_layers"])
        vit.num_layers = vit.config_num_layers - 1  # BAGEL drops the last SigLIP layer
        vit.patch_size = int(vit_json["patch_size"])
        vit.num_channels = int(vit_json.get("num_channels", 3))
        vit.layer_norm_eps = float(vit_json.get("layer_norm_eps", 1e-6))
    except (KeyError, TypeError, ValueError) as err:
        raise PortError(f"{vit_path}: missing or bad field {err}") from err
    if vit_json.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise PortError(f"{vit_path}: hidden_act {vit_json['hidden_act']!r} is not supported (gelu_pytorch_tanh)")
    pos_key = "vit_model.vision_model.embeddings.position_embedding.weight"
    vit.max_num_patch_per_side = _square_side(_need(files, pos_key, "vit max_num_patch_per_side")[0], pos_key)

    vae = config.vae
    conv_in = _need(files, "encoder.conv_in.weight", "the VAE width")
    vae.ch, vae.in_channels = conv_in[0], conv_in[1]
    levels = sorted({int(k.split(".")[2]) for k in files.where if k.startswith("encoder.down.")})
    if levels != list(range(len(levels))) or not levels:
        raise PortError(f"{folder / 'ae.safetensors'}: encoder.down.* levels {levels} are not 0..n-1")
    vae.ch_mult = tuple(_need(files, f"encoder.down.{i}.block.0.conv1.weight", "ch_mult")[0] // vae.ch
                        for i in levels)
    vae.num_res_blocks = len({k.split(".")[4] for k in files.where if k.startswith("encoder.down.0.block.")})
    vae.z_channels = _need(files, "decoder.conv_in.weight", "z_channels")[1]
    ae_meta = files.where["encoder.conv_in.weight"][0].metadata.get(AE_META_KEY)
    if ae_meta:  # written by our export; FLUX/BAGEL files have none and use the hard-coded FLUX values
        for name, value in json.loads(ae_meta).items():
            vae[name] = tuple(value) if isinstance(value, list) else value
    widths = [vae.ch * m for m in vae.ch_mult]
    if any(width % vae.norm_groups for width in widths):
        raise PortError(f"{folder / 'ae.safetensors'}: widths {widths} are not multiples of {vae.norm_groups} "
                        "GroupNorm groups")

    norm_keys = sorted(k for k in files.where if k.startswith(LATENT_NORM))
    if norm_keys:
        # UniMedVL creates vae_batch_norm only with enable_e2e_vae + enable_batch_norm, and then normalises every
        # encoded latent with it: a checkpoint carrying its statistics was trained that way.
        stats = [LATENT_NORM + name for name in LATENT_NORM_STATS]
        unmappable = [k for k in norm_keys if k not in stats]
        if unmappable or len(norm_keys) != len(stats):
            missing = [k for k in stats if k not in files.where]
            raise PortError(f"{folder}: cannot map UniMedVL's latent BatchNorm: "
                            + (f"{', '.join(unmappable)} (an affine or other BatchNorm tensor; only "
                               "affine=False running statistics are supported)" if unmappable else
                               f"{', '.join(missing)} missing"))
        vae.latent_batch_norm = True
        vae.latent_batch_norm_eps = LATENT_NORM_EPS
    token_dim = files.shape("vae2llm.weight")
    if token_dim is not None:
        patch = math.isqrt(token_dim[1] // vae.z_channels)
        if patch * patch * vae.z_channels != token_dim[1]:
            raise PortError(f"vae2llm.weight: input width {token_dim[1]} is not p²·{vae.z_channels}")
        config.latent_patch_size = patch
    table = files.shape("latent_pos_embed.pos_embed")
    stored_side = _square_side(table[0], "latent_pos_embed.pos_embed") if table else None
    config.max_latent_size = max_latent_size or stored_side or config.max_latent_size
    config.param_dtype = param_dtype
    config.compute_dtype = compute_dtype
    config.remat = "none"
    return config


# ------------------------------------------------------------------------------------------------------------
# The import plan: for every leaf of our model, where its value comes from.
@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "read" (the key itself), "copy" (from the understanding twin), "sincos", "init"
    key: str = ""


@dataclasses.dataclass
class ImportPlan:
    folder: Path
    config: ml_collections.ConfigDict
    rules: list[K.KeyRule]
    sources: dict[str, Source]
    notes: list[str]
    files: _Files
    llm_json: dict
    vit_json: dict
    source_dtypes: dict[str, str]  # file kind → the dtype most of its tensors had
    family: str = "bagel"  # "bagel" or "unimedvl" (FAMILIES): the layout read, which picks inference defaults

    def close(self) -> None:
        self.files.close()


def _matches(patterns: Sequence[str], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names)


def plan_import(folder: str | os.PathLike, *, allow_missing: Sequence[str] = (), max_latent_size: int | None = None,
                param_dtype: str = "float32", compute_dtype: str = "bfloat16", family: str = "auto") -> ImportPlan:
    """Opens the folder (headers only), derives the config and checks every key; raises one PortError listing
    every missing / unexpected / mis-shaped key. ``family``: ``auto`` (UniMedVL when the folder holds its extra
    keys ``vae_model.*`` / ``vae_batch_norm.*``, else BAGEL), ``bagel`` or ``unimedvl`` (UniMedVL's release may
    hold no extra key at all: its layout is then BAGEL's and only the family's inference defaults differ)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PortError(f"{folder}: not a folder")
    if family not in ("auto", *FAMILIES):
        raise PortError(f"family {family!r}: expected auto, {' or '.join(FAMILIES)}")
    llm_json, vit_json = read_json(folder / "llm_config.json"), read_json(folder / "vit_config.json")
    files = _Files(folder)
    if family == "bagel" and files.family == "unimedvl":
        files.close()
        raise PortError(f"{folder}: holds UniMedVL keys (vae_model.* / vae_batch_norm.*), which BAGEL's layout "
                        "has not; read it as family unimedvl (or auto)")
    family = files.family if family == "auto" else family
    try:
        config = infer_config(folder, files, llm_json, vit_json, max_latent_size=max_latent_size,
                              param_dtype=param_dtype, compute_dtype=compute_dtype)
        rules = K.build_table(config)
        sources, notes = _resolve(rules, files, allow_missing)
    except Exception:
        files.close()
        raise
    dtypes: dict[str, str] = {}
    for kind in ("ema", "ae"):
        found = [files.info(k).dtype for k, (_, f) in files.where.items() if f == kind]
        dtypes[kind] = max(set(found), key=found.count) if found else "F32"
    if files.vae_in_model:
        notes.append(f"VAE: {files.vae_in_model} vae_model.* tensors read from the model file (UniMedVL keeps the "
                     "VAE inside the model; they replace ae.safetensors' copies, as its loader does)")
    if config.vae.get("latent_batch_norm", False):
        notes.append(f"latent BatchNorm: {LATENT_NORM}running_mean/var applied to every encoded latent "
                     f"(eps {LATENT_NORM_EPS}, UniMedVL's enable_e2e_vae + enable_batch_norm)")
    for key in files.skipped:
        notes.append(f"{key}: skipped (a training counter; no effect at inference)")
    return ImportPlan(folder, config, rules, sources, notes, files, llm_json, vit_json, dtypes, family)


def _resolve(rules: list[K.KeyRule], files: _Files, allow_missing: Sequence[str]):
    expected = {rule.bagel: rule for rule in rules}
    has_moe = any(K.MOE_SUFFIX in key for key in files.where)
    sources: dict[str, Source] = {}
    missing, mismatched, notes = [], [], []
    copied = initialised = 0
    for rule in rules:
        stored = files.shape(rule.bagel)
        if stored is not None and not files.info(rule.bagel).is_float:  # e.g. an int tensor as the token embedding
            info = files.info(rule.bagel)
            raise PortError(f"{files.where[rule.bagel][0].path}: tensor {rule.bagel!r} is stored as {info.dtype}; a "
                            "model weight must be floating point (F32, F16, BF16 or F64)")
        kind_ok = stored is None or files.where[rule.bagel][1] == rule.file
        if stored is not None and stored == rule.bagel_shape and kind_ok:
            sources[rule.ours] = Source("read", rule.bagel)
        elif rule.is_table:  # frozen sin-cos: rebuilt from the config, as BAGEL's training loader does
            sources[rule.ours] = Source("sincos")
            notes.append(f"{rule.bagel}: " + ("absent" if stored is None else f"stored {list(stored)}")
                         + f", rebuilt as a sin-cos table {list(rule.bagel_shape)}")
        elif stored is not None:
            where = "ae.safetensors" if rule.file == "ae" else "the ema file"
            problem = f"checkpoint {list(stored)}" if kind_ok else f"found outside {where}"
            mismatched.append(f"{rule.bagel}: {problem}, model expects {list(rule.bagel_shape)}")
        elif rule.und_source and files.shape(rule.und_source) == rule.bagel_shape and (
                not has_moe or _matches(allow_missing, rule.bagel, rule.ours)):
            sources[rule.ours] = Source("copy", rule.und_source)
            copied += 1
        elif _matches(allow_missing, rule.bagel, rule.ours):
            sources[rule.ours] = Source("init")
            initialised += 1
        else:
            missing.append(rule.bagel)
    unexpected = sorted(set(files.where) - set(expected))
    if copied:
        notes.append(f"generation expert: {copied} tensors copied from the understanding expert (init_moe)")
    if initialised:
        notes.append(f"{initialised} missing tensors freshly initialised (--allow-missing)")
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
    if problems:
        raise PortError(f"{files.folder}: checkpoint does not match the model\n" + "\n".join(problems))
    return sources, notes


def iter_params(plan: ImportPlan, *, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(our dotted path, array in our layout)`` one tensor at a time (ema tensors in the config's
    ``param_dtype``, the VAE in float32)."""
    rng = np.random.default_rng(seed)
    rules = {rule.ours: rule for rule in plan.rules}
    target = np.dtype(DTYPES[dtype_name(plan.config.param_dtype)])
    for rule in plan.rules:
        source = plan.sources[rule.ours]
        dtype = np.dtype(np.float32) if rule.file == "ae" else target
        if source.kind in ("read", "copy"):
            value = K.to_ours(plan.files.read(source.key), rule.transform, dtype)
        elif source.kind == "sincos":
            if rule.ours == "vit_pos_embed":
                value = sincos_2d_table(rule.our_shape[1], plan.config.vit.max_num_patch_per_side)
            else:
                value = sincos_2d_table(rule.our_shape[1], plan.config.max_latent_size,
                                        *latent_pos_frequencies(plan.config))
        else:
            kernel = rules.get(rule.ours[: -len("bias")] + "kernel")
            fan_in = int(np.prod(kernel.our_shape[:-1])) if kernel is not None else None
            value = K.initial_value(rule, rng, fan_in)
        if source.kind in ("read", "copy") and not np.all(np.isfinite(value)):
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise PortError(f"{plan.files.folder}: tensor {source.key} holds {bad} NaN/Inf values of {value.size}")
        yield rule.ours, value.astype(dtype, copy=False)


# ------------------------------------------------------------------------------------------------------------
# Our nested parameter dicts.
def nest(flat: Mapping[str, object]) -> dict:
    """``{"a.b.0.c": x}`` → ``{"a": {"b": {"0": {"c": x}}}}`` (string keys throughout, as Orbax stores them)."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def flatten(params) -> dict[str, object]:
    """Nested dict / nnx.State / flat dotted dict → ``{dotted path: value}`` (nnx Variables unwrapped)."""
    if isinstance(params, nnx.State):
        return {K.dotted(path): var.get_value() for path, var in nnx.to_flat_state(params)}
    out: dict[str, object] = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(value, name + ".")
            else:
                out[name] = value.get_value() if isinstance(value, nnx.Variable) else value

    walk(params, "")
    return out


def load(folder: str | os.PathLike, **options) -> tuple[ml_collections.ConfigDict, dict]:
    """The whole checkpoint in memory: ``(config, params)`` with ``params`` a nested dict of numpy arrays.

    ``options`` go to :func:`plan_import` (``allow_missing``, ``max_latent_size``, ``param_dtype``,
    ``compute_dtype``). Large checkpoints: use the ``import`` command, which streams.
    """
    plan = plan_import(folder, **options)
    try:
        return plan.config, nest(dict(iter_params(plan)))
    finally:
        plan.close()


# ------------------------------------------------------------------------------------------------------------
# Writing a BAGEL folder.
def llm_config_json(config, base: dict | None = None) -> dict:
    llm = config.llm
    out = dict(base or {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                        "max_position_embeddings": 32768, "torch_dtype": "bfloat16"})
    out.update(hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
               num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
               num_key_value_heads=llm.num_kv_heads, vocab_size=llm.vocab_size, rms_norm_eps=llm.rms_norm_eps,
               tie_word_embeddings=False)
    if isinstance(out.get("rope_parameters"), dict) and "rope_theta" not in out:
        out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": llm.rope_theta}
    else:
        out["rope_theta"] = llm.rope_theta
    if not llm.qk_norm or "qk_norm" in out:  # BAGEL's default is on; say so only when it is off (or was said)
        out["qk_norm"] = bool(llm.qk_norm)
    return out


def vit_config_json(config, base: dict | None = None) -> dict:
    vit = config.vit
    out = dict(base or {"model_type": "siglip_vision_model"})
    out.update(hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size,
               num_attention_heads=vit.num_heads, num_hidden_layers=vit.num_layers + 1,  # BAGEL drops one
               patch_size=vit.patch_size, image_size=vit.max_num_patch_per_side * vit.patch_size)
    if vit.num_channels != 3 or "num_channels" in out:
        out["num_channels"] = vit.num_channels
    if vit.layer_norm_eps != 1e-6 or "layer_norm_eps" in out:
        out["layer_norm_eps"] = vit.layer_norm_eps
    return out


def _vae_metadata(config) -> str:
    vae = config.vae
    return json.dumps({"norm_groups": vae.norm_groups, "scale_factor": vae.scale_factor,
                       "shift_factor": vae.shift_factor})


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for item in sorted(src.iterdir()) if src.is_dir() else []:
        if item.is_file() and any(fnmatch.fnmatch(item.name, p) for p in TOKENIZER_PATTERNS):
            shutil.copyfile(item, dst / item.name)
            copied.append(item.name)
    return copied


def atomic_folder(out: Path) -> Path:
    """A temporary sibling folder that :func:`commit_folder` renames onto ``out`` (refuses a non-empty ``out``)."""
    out = Path(out).absolute()  # Orbax wants absolute paths
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PortError(f"{out}: already exists and is not an empty folder; choose a new output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.clear_stale(out, "tmp")  # left by a killed import/export
    tmp = staging.staging_folder(out, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_folder(tmp: Path, out: Path) -> None:
    out = Path(out).absolute()
    if out.exists():
        out.rmdir()  # empty (checked by atomic_folder)
    os.replace(tmp, out)


# The autoencoder the official ``load_ae`` (modeling/autoencoder.py) builds, whatever ae.safetensors holds: FLUX's.
# Its GroupNorms are hard-coded to 32 groups; out_ch is in_channels in our model. scale/shift are its latent map.
FLUX_AE = {"in_channels": 3, "ch": 128, "ch_mult": (1, 2, 4, 4), "num_res_blocks": 2, "z_channels": 16,
           "norm_groups": 32, "scale_factor": 0.3611, "shift_factor": 0.1159}


def flux_ae_differences(config) -> list[str]:
    """The VAE config fields that differ from what the official ``load_ae`` hard-codes, as ``"field ours (FLUX
    theirs)"``; empty for a FLUX-shaped autoencoder (the official code can load its ae.safetensors)."""
    out = []
    for field, flux in FLUX_AE.items():
        ours = config.vae[field]
        if (tuple(ours) if isinstance(flux, tuple) else ours) != flux:
            out.append(f"{field} {list(ours) if isinstance(flux, tuple) else ours} "
                       f"(FLUX {list(flux) if isinstance(flux, tuple) else flux})")
    return out


def export_order(config) -> list[str]:
    """Our parameter names in the order :func:`save` asks for them (ae.safetensors first, then the ema-file
    tensors), so a caller streaming from disk can read them in the same order."""
    rules = K.build_table(config)
    return [r.ours for r in rules if r.file == "ae"] + [r.ours for r in rules if r.file == "ema"]


def save(config, params, folder: str | os.PathLike, dtype: str = "bf16", *, ema=None, ae_dtype: str = "f32",
         llm_json: dict | None = None, vit_json: dict | None = None,
         tokenizer_dir: str | os.PathLike | None = None, family: str = "bagel") -> None:
    """Writes a BAGEL folder: ``model.safetensors`` (``params``), ``ema.safetensors`` (``ema``), ``ae.safetensors``
    (the VAE of ``params``), the two JSON configs, tokenizer files.

    BAGEL's inference reads ema.safetensors; its training restart reads model.safetensors unless told to start
    from the EMA (``finetune_from_ema``), so a folder holds both. ``params``/``ema``: nested dict, ``nnx.State``
    or flat ``{dotted path: value}``; a value may be a zero-argument callable, called once when its tensor is
    written (in :func:`export_order`), so a caller can stream from disk. ``ema=None``: the same tensors as
    ``params`` (model.safetensors is copied, not converted twice); ``ema``'s VAE, if any, is not used. ``dtype``
    applies to model.safetensors and ema.safetensors, ``ae_dtype`` to ae.safetensors. ``llm_json``/``vit_json``:
    original files whose extra fields are kept. Written into a temporary folder renamed onto ``folder`` at the end.

    ``family="unimedvl"``: UniMedVL's layout, the BAGEL files plus the VAE inside model/ema.safetensors as
    ``vae_model.<FLUX name>`` (in ``ae_dtype``, so a re-import is exact) and, for a model with the latent
    BatchNorm, ``vae_batch_norm.running_mean/var/num_batches_tracked``. BAGEL's layout has no BatchNorm: a model
    with one is refused for ``family="bagel"``.
    """
    if family not in FAMILIES:
        raise PortError(f"family {family!r}: expected {' or '.join(FAMILIES)}")
    if family == "bagel" and config.vae.get("latent_batch_norm", False):
        raise PortError("the model has UniMedVL's latent BatchNorm (vae_batch_norm), which BAGEL's layout cannot "
                        "hold; export it as family unimedvl")
    rules = K.build_table(config)
    flat = _checked(rules, flatten(params), "params")
    ema_flat = None if ema is None else _checked([r for r in rules if r.file == "ema"], flatten(ema), "ema")
    out = Path(folder)
    # UniMedVL: each converted VAE tensor is kept for the model files' vae_model.* copies (the VAE is small).
    vae_copy: dict[str, np.ndarray] | None = {} if family == "unimedvl" else None
    tmp = atomic_folder(out)
    try:
        for kind, file_dtype, filename, values, metadata in (
                ("ae", dtype_name(ae_dtype), "ae.safetensors", flat,
                 {"format": "pt", AE_META_KEY: _vae_metadata(config)}),
                ("ema", dtype_name(dtype), "model.safetensors", flat, {"format": "pt"}),
                ("ema", dtype_name(dtype), "ema.safetensors", ema_flat, {"format": "pt"})):
            if values is None:  # the EMA is the parameters: the same bytes
                shutil.copyfile(tmp / "model.safetensors", tmp / filename)
                continue
            specs = [TensorSpec(rule.bagel, file_dtype, rule.bagel_shape,
                                _producer(values[rule.ours], rule, vae_copy if kind == "ae" else None))
                     for rule in rules if rule.file == kind]
            if family == "unimedvl" and kind == "ema":
                specs += _unimedvl_extras(config, rules, vae_copy, dtype_name(ae_dtype))
            write_streaming(tmp / filename, specs, metadata)
        _write_json(tmp / "llm_config.json", llm_config_json(config, llm_json))
        _write_json(tmp / "vit_config.json", vit_config_json(config, vit_json))
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
        commit_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _checked(rules: list[K.KeyRule], flat: dict[str, object], what: str) -> dict[str, object]:
    """``flat`` when it holds exactly the rules' names (extra VAE names tolerated in an EMA set, which holds
    the frozen VAE too); else one PortError naming every difference."""
    names = {rule.ours for rule in rules}
    missing = [rule.ours for rule in rules if rule.ours not in flat]
    unexpected = sorted(n for n in set(flat) - names if what == "params" or not n.startswith("vae."))
    if missing or unexpected:
        raise PortError(f"{what} do not match the model config: "
                        + (f"{len(missing)} missing: {', '.join(missing)}; " if missing else "")
                        + (f"{len(unexpected)} unexpected: {', '.join(unexpected)}" if unexpected else ""))
    return flat


def _producer(value, rule: K.KeyRule, keep: dict | None = None) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        array = np.asarray(value() if callable(value) else value)
        if tuple(array.shape) != rule.our_shape:
            raise PortError(f"{rule.ours}: shape {list(array.shape)}, model expects {list(rule.our_shape)}")
        out = K.to_bagel(array, rule.transform)
        if keep is not None:
            keep[rule.bagel] = out
        return out
    return produce


def _unimedvl_extras(config, rules: list[K.KeyRule], vae_copy: dict[str, np.ndarray], ae_dtype: str
                     ) -> list[TensorSpec]:
    """UniMedVL's extra model-file tensors: ``vae_model.*`` (the VAE already written to ae.safetensors) and the
    BatchNorm's step counter (zero: it has no effect at inference)."""
    specs = [TensorSpec(VAE_IN_MODEL + rule.bagel, ae_dtype, rule.bagel_shape,
                        lambda key=rule.bagel: vae_copy[key]) for rule in rules if rule.file == "ae"]
    if config.vae.get("latent_batch_norm", False):
        specs.append(TensorSpec(SKIPPED[0], "I64", (), lambda: np.zeros((), np.int64)))
    return specs
