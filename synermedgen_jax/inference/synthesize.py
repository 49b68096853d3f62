"""NIfTI in, NIfTI out: synthesize a target-modality volume slice by slice.

Steps (the data module's conventions, data/volumes.py):

1. Read the input (3-D; trailing singleton axes dropped), reorient to RAS+ canonical as the data builder does.
2. Normalise with the source modality's rule (CT/CBCT: HU window; MR: per-volume foreground percentiles;
   PET: SUV clip) using the windows the run's data was built with (its ``manifest.json``; defaults otherwise).
3. Cut axial slices exactly as the builder does (square pixels, field of view fitted and padded to the
   model's image size), synthesize the slices that hold foreground in batches (inference/sampler.py), fill
   the others with the target's background.
4. Undo the slicing (crop, resize back, reorient to the input's voxel order) and de-normalise into the
   target's native units: HU for CT/CBCT, SUV for PET; MR has no absolute scale, so MR targets use
   ``target_window`` (default 0..1000, arbitrary units).
5. Write float32 NIfTI with the input's affine and header geometry, atomically (temporary file + rename).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation
from scipy import ndimage
from skimage.transform import resize

from synermedgen_jax.data.routes import Task, all_tasks, valid_modalities
from synermedgen_jax.data.volumes import (
    DataError,
    check_nifti_header,
    modality_foreground,
    modality_spec,
    norm_params,
    normalise,
    slice_geometry,
    to_axial_slices,
)
from synermedgen_jax.inference.loading import Inference, InferenceError
from synermedgen_jax.inference.sampler import Sampler, SamplerConfig
from synermedgen_jax.staging import atomic_path

MR_DEFAULT_WINDOW = (0.0, 1000.0)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def resolve_route(source: str, target: str, *, task: str | None = None, dataset: str | None = None) -> Task:
    """The registry task for ``source -> target`` (``task`` picks one by name; ``dataset`` prefers its
    dataset's phrasing). Unknown modalities or routes raise InferenceError listing the valid ones."""
    modalities = valid_modalities()
    for what, m in (("--source-modality", source), ("--target-modality", target)):
        if m not in modalities:
            raise InferenceError(f"{what}: unknown modality {m!r}; valid: {', '.join(modalities)}")
    tasks = [t for t in all_tasks() if t.source == source and t.target == target]
    if task is not None:
        named = [t for t in tasks if t.name == task]
        if not named:
            valid = ", ".join(t.name for t in tasks) or "none"
            raise InferenceError(f"--task: {task!r} is not a {source}->{target} task; valid: {valid}")
        return named[0]
    if not tasks:
        routes = sorted({t.route for t in all_tasks()})
        raise InferenceError(f"route {source}->{target} is not one the model was trained for; valid routes: "
                             f"{', '.join(routes)}")
    preferred = [t for t in tasks if t.dataset == dataset]
    return (preferred or tasks)[0]


def read_nifti(path: str | Path) -> nib.Nifti1Image:
    """A 3-D NIfTI image (trailing singleton axes dropped); anything else is an InferenceError."""
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise InferenceError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    if not path.is_file():
        raise InferenceError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
        shape = check_nifti_header(path, image)  # the shared size guard, before any voxel is read
    except DataError as err:
        raise InferenceError(str(err)) from None
    except Exception as err:  # nibabel raises many types for unreadable files
        raise InferenceError(f"{path}: unreadable NIfTI ({type(err).__name__}: {err})") from None
    if len(shape) != 3 or min(shape) < 1:
        kind = "2-D" if len(shape) < 3 else f"{len(shape)}-D"
        raise InferenceError(f"{path}: a {kind} image of shape {tuple(image.shape)}; synthesis needs a 3-D volume")
    if min(shape[:2]) < 2:
        raise InferenceError(f"{path}: shape {shape} is a 2-D image stored as 3-D; synthesis needs axial slices")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as err:  # truncated gzip streams raise EOFError/OSError/zlib.error
        raise InferenceError(f"{path}: truncated or corrupt voxel data ({type(err).__name__})") from None
    if not np.all(np.isfinite(data)):
        raise InferenceError(f"{path}: voxel data holds NaN or Inf")
    return nib.Nifti1Image(data, image.affine, image.header)


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(canonical data, index map)``: the index map holds each canonical voxel's flat input index, so
    ``out.ravel()[index] = canonical_result`` puts a result back in the input's voxel order exactly."""
    ornt = io_orientation(affine)
    index = apply_orientation(np.arange(data.size).reshape(data.shape), ornt)
    return np.ascontiguousarray(apply_orientation(data, ornt)), index


def _unslice(slices: np.ndarray, geometry, shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of ``volumes.to_axial_slices``: ``[Z, size, size]`` → ``[X, Y, Z]`` (bilinear resize back)."""
    nx, ny, nz = shape
    crop = slices[:, geometry.pad_top:geometry.pad_top + geometry.rows,
                  geometry.pad_left:geometry.pad_left + geometry.cols]
    if crop.shape[1:] != (ny, nx):
        down = ny < crop.shape[1] or nx < crop.shape[2]
        crop = resize(crop, (nz, ny, nx), order=1, mode="edge", preserve_range=True, anti_aliasing=down)
    return np.ascontiguousarray(crop.transpose(2, 1, 0)[:, ::-1, :]).astype(np.float32)


def target_params(target: str, inference: Inference, target_window: tuple[float, float] | None) -> dict:
    """Native-unit window of the target modality (see module docstring)."""
    kind = modality_spec(target).kind
    if target_window is not None:
        lo, hi = target_window
    elif kind == "ct":
        lo, hi = inference.norm.ct_window
    elif kind == "pet":
        lo, hi = 0.0, inference.norm.pet_suv_max
    else:
        lo, hi = MR_DEFAULT_WINDOW
    if not hi > lo:
        raise InferenceError(f"--target-window: high {hi} must exceed low {lo}")
    return {"lo": float(lo), "hi": float(hi)}


def synthesize_volume(inference: Inference, image: nib.Nifti1Image, source: str, target: str, instruction: str, *,
                      mask: nib.Nifti1Image | None = None, config: SamplerConfig | None = None,
                      batch_size: int = 8, seed: int = 0, target_window: tuple[float, float] | None = None,
                      progress: Callable[[int], None] | None = None, on_total: Callable[[int], None] | None = None,
                      sampler: Sampler | None = None,
                      edit_texts: Callable[[np.ndarray], list[str]] | None = None) -> np.ndarray:
    """The synthesized volume in target native units, ``float32`` with the input's shape and voxel order.

    ``sampler``: reuse one (and its compiled functions) across volumes; built from ``config`` otherwise.
    ``edit_texts``: the text each slice's edit is conditioned on, from the slices ``[N, H, W]`` (UniMedVL's
    understanding-then-edit, inference/family.py); default ``instruction`` for every slice.
    """
    data = np.asarray(image.dataobj, np.float32)
    canon, index = _canonical(data, image.affine)
    if mask is not None:
        if tuple(mask.shape[:3]) != data.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
            raise InferenceError(f"--mask: shape {tuple(mask.shape)} / affine do not match the input {data.shape}")
        fg = _canonical(np.asarray(mask.dataobj, np.float32).reshape(data.shape) > 0.5, image.affine)[0]
    else:
        fg = modality_foreground(source, canon)
        for z in range(fg.shape[2]):
            fg[:, :, z] = ndimage.binary_fill_holes(fg[:, :, z])
    params = norm_params(source, canon, fg, inference.norm)
    size = inference.image_size
    if size[0] != size[1]:
        raise InferenceError(f"checkpoint image size {size} is not square; slices are square")
    spacing = tuple(float(s) for s in np.sqrt((nib.as_closest_canonical(image).affine[:3, :3] ** 2).sum(axis=0)))
    geometry = slice_geometry(canon.shape, spacing, size[0])
    slices = to_axial_slices(normalise(canon, params), geometry, background=-1.0)
    fg_slices = to_axial_slices(fg.astype(np.float32), geometry, background=0.0, order=0) > 0.5
    todo = np.nonzero(fg_slices.any(axis=(1, 2)))[0]
    if on_total is not None:
        on_total(len(todo))
    out = np.full(slices.shape, -1.0, np.float32)  # background of every modality after normalisation
    if len(todo):
        sampler = sampler or Sampler(inference.model, inference.special, inference.image_size,
                                     inference.vit_image_size, config or SamplerConfig())
        # indices = slice numbers: a slice's noise depends on (seed, z) only, not on batching.
        if edit_texts is None:
            out[todo] = sampler.generate(slices[todo], inference.tokenizer.encode(instruction), seed=seed,
                                         batch_size=batch_size, indices=todo, progress=progress)
        else:
            from synermedgen_jax.inference.family import generate_edits

            ids = [inference.tokenizer.encode(text) for text in edit_texts(slices[todo])]
            out[todo] = generate_edits(sampler, slices[todo], ids, seed=seed, batch_size=batch_size, indices=todo,
                                       progress=progress)
    out = np.where(fg_slices, out, -1.0) if mask is not None else out
    tparams = target_params(target, inference, target_window)
    native = (out + 1.0) * np.float32((tparams["hi"] - tparams["lo"]) / 2.0) + np.float32(tparams["lo"])
    canon_out = _unslice(native, geometry, canon.shape)
    result = np.empty(data.size, np.float32)
    result[index.ravel()] = canon_out.ravel()
    return result.reshape(data.shape)


def write_nifti(path: str | Path, data: np.ndarray, reference: nib.Nifti1Image) -> None:
    """Writes ``data`` (float32) with ``reference``'s affine and header geometry, atomically (staging.py)."""
    path = Path(path)
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    image = nib.Nifti1Image(np.asarray(data, np.float32), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # the temp name keeps .nii / .nii.gz: nibabel picks the format from it
        nib.save(image, tmp)
