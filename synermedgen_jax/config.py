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
import sys
from pathlib import Path

import ml_collections

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config file, variant or override that cannot be used; the message says which and why."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/file.py[:variant]`` and returns ``get_config(variant)``."""
    path_text, _, variant = spec.partition(":")
    path = Path(path_text)
    if not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(f"config file not found: {path_text}")
    parent = str(path.resolve().parent.parent)
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)
    try:
        module_spec = importlib.util.spec_from_file_location(f"_smg_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(parent)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: has no get_config(variant) function")
    try:
        return module.get_config(variant or None)
    except (ValueError, KeyError) as err:  # e.g. an unknown variant
        raise ConfigError(f"{spec}: {str(err).strip(chr(39))}") from None


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
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        current = node[leaf]
        value = _parse_value(value_text, current)
        if isinstance(current, (bool, int, float)) and not isinstance(value, (bool, int, float)) or (
                isinstance(current, bool) != isinstance(value, bool) and current is not None):
            kind = "True or False" if isinstance(current, bool) else f"a {type(current).__name__}"
            raise ConfigError(f"--config.{key}={value_text}: expected {kind} (current value {current!r})")
        try:
            with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
                node[leaf] = value
        except (TypeError, ValueError) as err:
            raise ConfigError(f"--config.{key}={value_text}: {err}") from None
    return config


def to_json(config: ml_collections.ConfigDict) -> str:
    """JSON text of a config (saved beside checkpoints; never executed when read back)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))
