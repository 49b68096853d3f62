"""What the inference commands need from a checkpoint: model, tokenizer, image sizes, normalisation rules.

``load_for_inference(path)`` reads any of three things and turns every way it can fail into one
:class:`InferenceError` line naming the path and the problem (the commands print it and exit 2):

* a training workdir or step directory (``training.checkpoint.load_model``);
* what ``import`` writes (``config.json`` + ``params/``): its tokenizer is ``DIR/tokenizer/``, its image sizes the
  official inference rules (``data/geometry.inference_rules``);
* a BAGEL / SynerMedGen PyTorch folder itself (``ema.safetensors``, ``ae.safetensors``, ``llm_config.json``, ...):
  converted on the fly tensor by tensor (``port/bagel.py``), each array placed straight onto its sharding; nothing
  is written to disk.

A tokenizer whose ids do not fit the weights (more tokens than embedding rows, or another vocabulary than the one
the weights were trained with, when that is recorded) is refused in one line. Tests build an :class:`Inference`
in memory from a model and a tokenizer instead.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from synermedgen_jax.data.geometry import ResizeRule
from synermedgen_jax.data.packing import SpecialTokens
from synermedgen_jax.data.volumes import NormConfig
from synermedgen_jax.stages import Stage

FAMILIES = ("synermedgen", "bagel", "unimedvl")  # what a checkpoint records; inference/family.py their defaults


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
    family: str = "synermedgen"  # picks the inference defaults (inference/family.py)
    vit_after_vae: bool = False  # the ViT rule applies to the VAE-resized image (UniMedVL's inferencer)

    def sizes_for(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(image_size, vit_image_size)`` for a source slice of ``height × width``: the rules' sizes when the
        checkpoint has rules, else the fixed sizes it was trained at."""
        vae = self.vae_rule.size_for(height, width) if self.vae_rule else tuple(self.image_size)
        vit_from = vae if self.vit_after_vae else (height, width)
        vit = self.vit_rule.size_for(*vit_from) if self.vit_rule else tuple(self.vit_image_size)
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


def is_bagel_folder(path: str | Path) -> bool:
    """A BAGEL / SynerMedGen PyTorch folder (safetensors + ``llm_config.json``), as downloaded."""
    from synermedgen_jax.port.bagel import EMA_NAMES

    path = Path(path)
    return (path / "llm_config.json").is_file() and any((path / name).is_file() or any(path.glob(
        name.replace(".safetensors", "-*.safetensors"))) for name in EMA_NAMES)


def _load_bagel_folder(path: Path, mesh):
    """``(run config, model)`` straight from a PyTorch folder: each converted tensor goes onto its sharding."""
    import jax
    from flax import nnx

    from synermedgen_jax.kernels.dispatch import resolve_kernels
    from synermedgen_jax.modeling.synermedgen import build_model
    from synermedgen_jax.port.bagel import iter_params, plan_import
    from synermedgen_jax.training.checkpoint import imported_run_config, model_targets

    plan = plan_import(path)
    family = plan.family
    try:
        run_config = imported_run_config(plan.config)
        run_config.model = resolve_kernels(run_config.model, mesh_shape=None if mesh is None else dict(mesh.shape))
        model = nnx.eval_shape(lambda: build_model(run_config.model, seed=0))
        targets = model_targets(model, mesh)
        weights = {}
        for name, value in iter_params(plan):
            target = targets[name]
            value = value.astype(target.dtype, copy=False)
            weights[name] = jax.make_array_from_callback(target.shape, target.sharding, lambda index, v=value: v[index])
    finally:
        plan.close()
    state = nnx.state(model)
    for p, variable in nnx.to_flat_state(state):
        variable.set_value(weights[".".join(str(part) for part in p)])
    nnx.update(model, state)
    return run_config, model, family


def checkpoint_family(path: str | Path, run_config) -> str:
    """The family an import recorded (``port.json``), a run config's ``family``, else ``synermedgen``; a model
    with UniMedVL's latent BatchNorm is ``unimedvl`` whatever was recorded."""
    recorded = None
    info = Path(path) / "port.json"
    if info.is_file():
        try:
            recorded = json.loads(info.read_text()).get("family") or "bagel"
        except (OSError, ValueError, AttributeError):
            recorded = "bagel"
    elif "family" in run_config:
        recorded = run_config.family
    if run_config.model.vae.get("latent_batch_norm", False):
        recorded = "unimedvl"
    return recorded if recorded in FAMILIES else "synermedgen"


def checkpoint_tokenizer(path: str | Path, run_config=None) -> tuple[Path | None, dict | None]:
    """``(tokenizer path, expected description)`` of a checkpoint: where its tokenizer is, and the ``describe()``
    of the tokenizer its weights were trained with (None when not recorded)."""
    path = Path(path)
    if is_bagel_folder(path):
        if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
            return None, None
        from synermedgen_jax.data.tokenizer import load_tokenizer

        return path, load_tokenizer(path).describe()  # the weights' own tokenizer is the record
    if (path / "port.json").is_file():  # what import writes
        try:
            info = json.loads((path / "port.json").read_text())
        except (OSError, ValueError):
            info = {}
        folder = path / "tokenizer"
        has_files = folder.is_dir() and any(folder.iterdir())
        return (folder if has_files else None), (info.get("tokenizer") or None)
    data_dir = str(run_config.data.dir) if run_config is not None and "data" in run_config and \
        run_config.data.get("dir") else None
    if not data_dir:
        return None, None
    manifest = _data_manifest(data_dir)
    return Path(data_dir) / "tokenizer.json", (manifest.get("tokenizer") or None)


def load_for_inference(path: str | Path, *, tokenizer: str | Path | None = None, ema: bool = True,
                       mesh=None) -> Inference:
    """Model (EMA weights when kept), tokenizer (``--tokenizer``, the import's ``tokenizer/``, the BAGEL folder's
    or the run's ``data.dir``) and sizes. ``mesh``: each weight is read straight onto its place on the sampler's
    mesh (no whole copy on one device)."""
    path = Path(path)
    if not path.exists():
        raise InferenceError(f"{path}: checkpoint not found")
    try:
        from synermedgen_jax.port.bagel import PortError
        from synermedgen_jax.port.safetensors_stream import SafetensorsError
        from synermedgen_jax.training.checkpoint import load_model
    except ImportError as err:
        raise InferenceError(f"{path}: checkpoints cannot be read here ({err})") from None
    try:
        if is_bagel_folder(path):
            run_config, model, family = _load_bagel_folder(path, mesh)
        else:
            run_config, model = load_model(str(path), ema=ema, mesh=mesh)
            family = checkpoint_family(path, run_config)
    except (ValueError, KeyError, FileNotFoundError, OSError, PortError, SafetensorsError) as err:
        # CheckpointError (a ValueError) names mismatching parameters for a checkpoint of another config.
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InferenceError(f"{path}: cannot load checkpoint: {message}") from None
    if getattr(run_config, "stage", None) == Stage.VAE:
        raise InferenceError(f"{path}: a stage-0 (VAE only) checkpoint cannot synthesize or answer")
    own_tokenizer, expected = checkpoint_tokenizer(path, run_config)
    if tokenizer and not Path(tokenizer).exists():
        raise InferenceError(f"--tokenizer {tokenizer}: no such file or folder")
    tok_path = Path(tokenizer) if tokenizer else own_tokenizer
    if tok_path is None or not tok_path.exists():
        where = "the import has no tokenizer/ folder" if run_config.stage == Stage.IMPORTED else \
            f"the run's data.dir {run_config.data.get('dir')!r} has no tokenizer.json"
        raise InferenceError(f"{path}: no tokenizer ({where}); pass --tokenizer FILE_OR_FOLDER")
    from synermedgen_jax.data.tokenizer import load_tokenizer, tokenizer_mismatch

    try:
        tok = load_tokenizer(tok_path)
    except (ValueError, OSError) as err:
        raise InferenceError(f"{tok_path}: {err}") from None
    problem = tokenizer_mismatch(tok.describe(), expected, int(model.config.llm.vocab_size))
    if problem:
        raise InferenceError(f"{tok_path}: {problem}")
    data_dir = str(run_config.data.dir) if "data" in run_config and run_config.data.get("dir") else None
    pack = run_config.data.pack
    manifest = _data_manifest(data_dir)
    vae_rule, vit_rule = _rules(run_config)
    # With rules, the fixed sizes are those of a square slice up to 512 px (every NIfTI slice and build slice).
    image_size = vae_rule.size_for(1, 1) if vae_rule else tuple(pack.image_size)
    vit_image_size = vit_rule.size_for(1, 1) if vit_rule else tuple(pack.vit_image_size)
    return Inference(model=model, tokenizer=tok, image_size=image_size,
                     vit_image_size=vit_image_size, norm=norm_from_manifest(manifest),
                     data_dir=data_dir, source=manifest.get("source"), run_config=run_config,
                     vae_rule=vae_rule, vit_rule=vit_rule, family=family)


def _rules(run_config) -> tuple[ResizeRule | None, ResizeRule | None]:
    """The image rules of a checkpoint at inference: the official inference rules (VAE 512–1024 px, ViT 378–980 px,
    fitted to the model's tables) for an import and for a run trained with the official geometry (its config has
    ``data.pack.*_resize``: the 7B and ``source=synermed`` configs), as the official inference script resizes; None
    (fixed sizes) for a run trained on fixed squares."""
    from synermedgen_jax.data import geometry
    if run_config.stage == Stage.IMPORTED or geometry.ImageRules.from_pack(run_config.data.pack).any:
        return geometry.inference_rules(run_config.model)
    return None, None
