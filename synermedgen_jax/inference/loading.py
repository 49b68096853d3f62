"""What the inference commands need from a checkpoint: model, tokenizer, image sizes, normalisation rules.

``load_for_inference(path)`` wraps ``training.checkpoint.load_model`` and turns every way it can fail into
one :class:`InferenceError` line naming the path and the problem (the commands print it and exit 2).
Tests build an :class:`Inference` in memory from a model and a tokenizer instead.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from synermedgen_jax.data.geometry import ResizeRule
from synermedgen_jax.data.packing import SpecialTokens
from synermedgen_jax.data.volumes import NormConfig


class InferenceError(ValueError):
    """Bad input to an inference command: a one-line message naming the file or field and the problem."""


@dataclasses.dataclass
class Inference:
    """A model ready for inference. ``image_size``: generated/VAE size (H, W); ``vit_image_size``: ViT size.

    ``vae_rule`` / ``vit_rule``: when set (a checkpoint made for the official aspect-preserving geometry, e.g. an
    imported BAGEL/SynerMedGen), each input's sizes come from the rules (:meth:`sizes_for`), and ``image_size`` /
    ``vit_image_size`` are those of a square input.
    """

    model: Any
    tokenizer: Any
    image_size: tuple[int, int]
    vit_image_size: tuple[int, int]
    norm: NormConfig = NormConfig()
    data_dir: str | None = None
    source: str | None = None  # the dataset the run was trained on (manifest "source"), when known
    run_config: Any = None
    vae_rule: ResizeRule | None = None
    vit_rule: ResizeRule | None = None

    def sizes_for(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(image_size, vit_image_size)`` for a source slice of ``height × width``: the rules' sizes when the
        checkpoint has rules, else the fixed sizes it was trained at."""
        vae = self.vae_rule.size_for(height, width) if self.vae_rule else tuple(self.image_size)
        vit = self.vit_rule.size_for(height, width) if self.vit_rule else tuple(self.vit_image_size)
        return vae, vit

    @property
    def special(self) -> SpecialTokens:
        return SpecialTokens.from_tokenizer(self.tokenizer)


def _data_manifest(data_dir: str | None) -> dict:
    if not data_dir:
        return {}
    path = Path(data_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def norm_from_manifest(manifest: dict) -> NormConfig:
    """The build's normalisation windows (``manifest.json`` config), or the data module's defaults."""
    config = manifest.get("config") or {}
    default = NormConfig()
    return NormConfig(tuple(config.get("ct_window", default.ct_window)),
                      tuple(config.get("mr_percentiles", default.mr_percentiles)),
                      float(config.get("pet_suv_max", default.pet_suv_max)))


def load_for_inference(path: str | Path, *, tokenizer: str | Path | None = None, ema: bool = True,
                       mesh=None) -> Inference:
    """Model (EMA weights when kept), tokenizer (``--tokenizer`` or the run's ``data.dir``) and sizes.
    ``mesh``: each weight is read straight onto its place on the sampler's mesh (no whole copy on one device)."""
    path = Path(path)
    if not path.exists():
        raise InferenceError(f"{path}: checkpoint not found")
    try:
        from synermedgen_jax.training.checkpoint import load_model
    except ImportError as err:
        raise InferenceError(f"{path}: checkpoints cannot be read here ({err})") from None
    try:
        run_config, model = load_model(str(path), ema=ema, mesh=mesh)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        # CheckpointError (a ValueError) names mismatching parameters for a checkpoint of another config.
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InferenceError(f"{path}: cannot load checkpoint: {message}") from None
    if getattr(run_config, "stage", None) == "vae":
        raise InferenceError(f"{path}: a stage-0 (VAE only) checkpoint cannot synthesize or answer")
    data_dir = str(run_config.data.dir) if "data" in run_config and run_config.data.get("dir") else None
    tok_path = Path(tokenizer) if tokenizer else (Path(data_dir) / "tokenizer.json" if data_dir else None)
    if tok_path is None or not tok_path.exists():
        raise InferenceError(f"{path}: no tokenizer (the run's data.dir {data_dir!r} has no tokenizer.json); "
                             "pass --tokenizer FILE")
    from synermedgen_jax.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(tok_path)
    except (ValueError, OSError) as err:
        raise InferenceError(f"{tok_path}: {err}") from None
    if tok.vocab_size > model.config.llm.vocab_size:
        raise InferenceError(f"{tok_path}: tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
                             f"{model.config.llm.vocab_size}: a tokenizer of another run")
    pack = run_config.data.pack
    manifest = _data_manifest(data_dir)
    return Inference(model=model, tokenizer=tok, image_size=tuple(pack.image_size),
                     vit_image_size=tuple(pack.vit_image_size), norm=norm_from_manifest(manifest),
                     data_dir=data_dir, source=manifest.get("source"), run_config=run_config)
