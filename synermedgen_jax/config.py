"""Loading ml_collections configs from ``configs/FILE.py[:variant]`` and applying ``--config.key=value``.

Config files are Python modules with ``get_config(variant: str | None)``; they may import their siblings as
``from configs import models`` (the folder holding ``configs/`` is put on ``sys.path`` while loading).
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import ml_collections

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config file, variant or override that cannot be used; the message says which and why."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/file.py[:variant]``, returns ``get_config(variant)`` after :func:`validate_config`.

    Every way a config file can fail (not a ``.py``, a syntax error, an import or run-time error inside it, no
    ``get_config``, a result that is not a ConfigDict, a value out of range) is one ConfigError line naming the
    file."""
    path_text, _, variant = spec.partition(":")
    path = Path(path_text)
    if not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.is_file():
        what = "is a folder, not a config file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {path_text}: {what}")
    if path.suffix != ".py":
        raise ConfigError(f"config file {path_text}: not a .py file (configs are Python modules with get_config; "
                          "e.g. configs/stage1_gau.py:tiny)")
    module = _exec_config(path)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{path}: has no get_config(variant) function")
    try:
        config = module.get_config(variant or None)
    except (ValueError, KeyError) as err:  # e.g. an unknown variant
        raise ConfigError(f"{spec}: {str(err).strip(chr(39))}") from None
    except Exception as err:  # noqa: BLE001 (user code: any failure is the file's, named in one line)
        raise ConfigError(f"{path}: get_config({variant or ''}) failed: {_one_line(err)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config returned a {type(config).__name__}, not an ml_collections.ConfigDict")
    try:
        validate_config(config)
    except ConfigError as err:  # a value the file itself sets: name the file too
        raise ConfigError(f"{path}{':' + variant if variant else ''}: {err}") from None
    return config


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _exec_config(path: Path):
    """Runs the config module (its folder's parent on ``sys.path`` for ``from configs import ...``)."""
    parent = str(path.resolve().parent.parent)
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)
    try:
        module_spec = importlib.util.spec_from_file_location(f"_smg_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"{err.filename or path}:{err.lineno}: syntax error in the config file ({err.msg})"
                          ) from None
    except Exception as err:  # noqa: BLE001 (user code: an import or run-time error at module level)
        raise ConfigError(f"{path}: the config file failed to load ({_one_line(err)})") from None
    finally:
        if added:
            sys.path.remove(parent)
    return module


# ------------------------------------------------------------------------------------------------------------
# Value checks shared by every command that loads a config (train, bench, plan, ablate, model-info): each
# problem is one ConfigError naming the key as ``--config.KEY=VALUE`` would, before any model or data work.
_DTYPES = ("float32", "bfloat16", "float16")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _number(config, key: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False, integer: bool = False, prefix: str = "") -> None:
    """Checks ``prefix + key`` (when present): a finite number (an int when ``integer``) within the bounds."""
    value = _get(config, key)
    if value is _MISSING or value is None:
        return
    name = f"--config.{prefix}{key}={value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{name}: expected {'an integer' if integer else 'a number'}")
    if not math.isfinite(value):
        raise ConfigError(f"{name}: must be finite")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{name}: must be {'>' if low_open else '>='} {low}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{name}: must be {'<' if high_open else '<='} {high}")


def _non_finite(node, prefix: str = "") -> str | None:
    """The first float anywhere in the tree that is NaN or infinite (a typo that no range check names)."""
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            found = _non_finite(value, f"{prefix}{key}.")
            if found:
                return found
        elif isinstance(value, float) and not math.isfinite(value):
            return f"--config.{prefix}{key}={value}"
    return None


def validate_model(model, prefix: str = "model.") -> None:
    """A model config (configs/models.py layout): sizes positive, heads dividing their widths, GroupNorm groups
    dividing every VAE width, dtypes and remat known."""
    llm, vit, vae = (_get(model, k) for k in ("llm", "vit", "vae"))
    if llm is not _MISSING:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size"):
            _number(model, f"llm.{key}", low=1, integer=True, prefix=prefix)
        _number(model, "llm.rope_theta", low=0, low_open=True, prefix=prefix)
        _number(model, "llm.rms_norm_eps", low=0, low_open=True, prefix=prefix)
        if llm.num_heads % llm.num_kv_heads:
            raise ConfigError(f"--config.{prefix}llm.num_heads={llm.num_heads}: not a multiple of num_kv_heads="
                              f"{llm.num_kv_heads} (grouped-query attention shares each KV head evenly)")
        if llm.head_dim % 2:
            raise ConfigError(f"--config.{prefix}llm.head_dim={llm.head_dim}: must be even (rotary embedding)")
        if llm.hidden_size % llm.num_heads:
            raise ConfigError(f"--config.{prefix}llm.hidden_size={llm.hidden_size}: not divisible by num_heads="
                              f"{llm.num_heads}")
    if vit is not _MISSING:
        for key in ("hidden_size", "intermediate_size", "num_heads", "num_layers", "patch_size", "num_channels",
                    "max_num_patch_per_side"):
            _number(model, f"vit.{key}", low=1, integer=True, prefix=prefix)
        _number(model, "vit.layer_norm_eps", low=0, low_open=True, prefix=prefix)
        if vit.hidden_size % vit.num_heads:
            raise ConfigError(f"--config.{prefix}vit.hidden_size={vit.hidden_size}: not divisible by num_heads="
                              f"{vit.num_heads}")
    if vae is not _MISSING:
        for key in ("in_channels", "ch", "num_res_blocks", "z_channels", "norm_groups", "encode_chunk"):
            _number(model, f"vae.{key}", low=1, integer=True, prefix=prefix)
        _number(model, "vae.scale_factor", low=0, low_open=True, prefix=prefix)
        _number(model, "vae.shift_factor", prefix=prefix)
        mult = tuple(vae.ch_mult) if isinstance(vae.ch_mult, (tuple, list)) else ()
        if not mult or any(not isinstance(m, int) or m < 1 for m in mult):
            raise ConfigError(f"--config.{prefix}vae.ch_mult={vae.ch_mult!r}: expected a tuple of positive integers")
        for width in {vae.ch * m for m in mult}:
            if width % vae.norm_groups:
                raise ConfigError(f"--config.{prefix}vae.norm_groups={vae.norm_groups}: does not divide the VAE "
                                  f"width {width} (ch={vae.ch} x ch_mult)")
    for key in ("latent_patch_size", "max_latent_size"):
        _number(model, key, low=1, integer=True, prefix=prefix)
    for key in ("timestep_shift", "latent_pos_base", "latent_pos_step"):
        _number(model, key, low=0, low_open=True, prefix=prefix)
    for key in ("compute_dtype", "param_dtype"):
        value = _get(model, key)
        if value is not _MISSING and value not in _DTYPES:
            raise ConfigError(f"--config.{prefix}{key}={value!r}: expected one of {', '.join(_DTYPES)}")
    remat = _get(model, "remat")
    if remat is not _MISSING and remat not in ("none", "full", "dots"):
        raise ConfigError(f"--config.{prefix}remat={remat!r}: expected none, full or dots")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Every value check that needs nothing but the config: finiteness, ranges and divisibility of the model
    (a model config or a run config's ``model``), ``train``, ``data`` and ``mesh`` sections. Raises one
    ConfigError line naming the key as ``--config.KEY=VALUE``."""
    bad = _non_finite(config)
    if bad:
        raise ConfigError(f"{bad}: must be finite")
    if _get(config, "llm") is not _MISSING:
        validate_model(config, prefix="")
    elif isinstance(_get(config, "model"), ml_collections.ConfigDict):
        validate_model(config.model)
    for key in ("lr",):
        _number(config, f"train.{key}", low=0, low_open=True)
    for key in ("warmup", "seed"):
        _number(config, f"train.{key}", low=0, integer=True)
    _number(config, "train.min_lr_ratio", low=0, high=1)
    for key in ("b1", "b2", "ema"):
        _number(config, f"train.{key}", low=0, high=1, high_open=True)
    for key in ("eps", "weight_decay", "clip", "vit_lr_scale", "ce_weight", "mse_weight", "l1_weight", "l2_weight",
                "kl_weight", "ssim_weight", "checkpoint_host_gb"):
        _number(config, f"train.{key}", low=0)
    for key in ("cfg_text", "cfg_vit", "cfg_vae", "stage2_weight"):
        _number(config, f"data.{key}", low=0, high=1)
    for key in ("workers", "shards", "seed"):
        _number(config, f"data.{key}", low=0, integer=True)
    pack = _get(config, "data.pack")
    if isinstance(pack, ml_collections.ConfigDict):
        for key in ("gen_tokens", "vit_patches", "vit_images", "vae_images", "ce_tokens"):
            _number(config, f"data.pack.{key}", low=0, integer=True)
        _number(config, "data.pack.und_tokens", low=1, integer=True)  # every sample has text
    weights = _get(config, "data.task_weights")
    if weights is not _MISSING and weights is not None:
        _check_task_weights("data.task_weights", weights)
    curriculum = _get(config, "data.curriculum")
    if curriculum is not _MISSING and curriculum is not None:
        _check_curriculum(curriculum)
    mesh = _get(config, "mesh")
    if isinstance(mesh, ml_collections.ConfigDict):
        for axis, size in mesh.items():
            if isinstance(size, int) and not isinstance(size, bool) and size != -1 and size < 1:
                raise ConfigError(f"--config.mesh.{axis}={size}: must be a positive size or -1 (the rest)")


def _check_task_weights(field: str, weights) -> None:
    try:
        values = [float(w) for _, w in weights]
    except (TypeError, ValueError):
        raise ConfigError(f"--config.{field}={weights!r}: expected ((task, weight), ...)") from None
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ConfigError(f"--config.{field}={weights!r}: weights must be finite and >= 0")


def _check_curriculum(curriculum) -> None:
    """``((fraction of train.steps, task_weights), ...)``: fractions increasing from 0, at most 1; empty (a tuple in
    a config file, a list once read back from a checkpoint's config.json) means none."""
    try:
        fractions = [float(fraction) for fraction, _ in curriculum]
    except (TypeError, ValueError):
        raise ConfigError(f"--config.data.curriculum={curriculum!r}: expected ((fraction, ((task, weight), ...)), "
                          "...)") from None
    if not fractions:
        return
    if fractions[0] != 0 or fractions != sorted(fractions) or fractions[-1] > 1:
        raise ConfigError(f"--config.data.curriculum: phases start at fractions of train.steps in increasing order "
                          f"from 0 to at most 1, got {fractions}")
    for _, weights in curriculum:
        _check_task_weights("data.curriculum", weights)


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, full + "."))
    return keys


def _node_of(config: ml_collections.ConfigDict, key: str, known: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """``(parent ConfigDict, leaf name)`` of a dotted key; an unknown key is an error suggesting close matches."""
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    return node, leaf


def _assign(node: ml_collections.ConfigDict, leaf: str, value, shown: str) -> None:
    try:
        with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
            node[leaf] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{shown}: {err}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies ``key.sub=value`` strings (``--config.`` prefix optional). Unknown keys are an error that
    suggests close matches; values are parsed as Python literals where the current value is not a string.
    """
    known = _all_keys(config)
    for item in overrides:
        text = item.removeprefix("--").removeprefix("config.")
        if "=" not in text:
            raise ConfigError(f"override {item!r} is not of the form --config.key=value")
        key, value_text = text.split("=", 1)
        node, leaf = _node_of(config, key, known)
        current = node[leaf]
        value = _parse_value(value_text, current)
        if isinstance(current, (bool, int, float)) and not isinstance(value, (bool, int, float)) or (
                isinstance(current, bool) != isinstance(value, bool) and current is not None):
            kind = "True or False" if isinstance(current, bool) else f"a {type(current).__name__}"
            raise ConfigError(f"--config.{key}={value_text}: expected {kind} (current value {current!r})")
        _assign(node, leaf, value, f"--config.{key}={value_text}")
    if overrides:
        validate_config(config)
    return config


def set_fields(config: ml_collections.ConfigDict, fields: Mapping[str, object]) -> ml_collections.ConfigDict:
    """Sets dotted keys (``train.steps``) to typed values, as ``apply_overrides`` sets parsed strings (code
    that builds a config: quickstart, ablate), then validates the config."""
    known = _all_keys(config)
    for key, value in fields.items():
        node, leaf = _node_of(config, key, known)
        _assign(node, leaf, value, f"--config.{key}={value}")
    validate_config(config)
    return config


def to_json(config: ml_collections.ConfigDict) -> str:
    """JSON text of a config (saved beside checkpoints; never executed when read back)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))
