"""NIfTI volume I/O, alignment checks, invertible intensity normalisation and slice geometry.

Conventions used throughout the data package:

* Volumes are loaded in nibabel's closest canonical orientation (RAS+): array axes ``[X, Y, Z]`` with X
  towards the subject's right, Y anterior, Z superior.
* Slices are axial. A slice image ``[H, W]`` has row 0 = most anterior, column 0 = smallest X
  (neurological display: the subject's left on the image's left). Pixels are square (``pixel_mm``): the
  in-plane field of view is resampled isotropically, scaled so its longer side fills ``size`` and padded
  symmetrically with background (-1 after normalisation).
* Intensities are mapped linearly from a per-modality, per-volume window ``[lo, hi]`` (native units: HU for
  CT/CBCT, scanner units for MR, SUV for PET) onto ``[-1, 1]`` and clipped; ``denormalise`` inverts it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage
from skimage.transform import resize


class DataError(ValueError):
    """Bad input data; the message names the file or case, the field and the problem."""


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    name: str  # short key used in records and routes
    display: str  # the name used in prompts and MI answers
    kind: str  # "ct" (HU window), "mr" (per-volume percentiles) or "pet" (SUV clip)


MODALITIES: dict[str, ModalitySpec] = {
    spec.name: spec
    for spec in (
        ModalitySpec("ct", "CT", "ct"),
        ModalitySpec("cbct", "CBCT", "ct"),
        ModalitySpec("mr", "MRI", "mr"),
        ModalitySpec("t1", "T1 (MRI)", "mr"),
        ModalitySpec("t1ce", "T1CE (MRI)", "mr"),
        ModalitySpec("t2", "T2 (MRI)", "mr"),
        ModalitySpec("flair", "FLAIR (MRI)", "mr"),
        ModalitySpec("pet", "PET", "pet"),
    )
}
# Stable integer codes (index into this tuple) used by instance tables.
MODALITY_NAMES: tuple[str, ...] = tuple(MODALITIES)


def modality_spec(name: str) -> ModalitySpec:
    if name not in MODALITIES:
        raise DataError(f"unknown modality {name!r}; known: {', '.join(MODALITY_NAMES)}")
    return MODALITIES[name]


def display_name(name: str) -> str:
    return modality_spec(name).display


@dataclasses.dataclass(frozen=True)
class NormConfig:
    ct_window: tuple[float, float] = (-1024.0, 3071.0)  # HU, CT and CBCT
    mr_percentiles: tuple[float, float] = (0.5, 99.5)  # per volume, over the foreground
    pet_suv_max: float = 15.0  # SUV clipped to [0, pet_suv_max]


@dataclasses.dataclass
class Volume:
    """A volume in canonical (RAS+) orientation: ``data`` float32 ``[X, Y, Z]``."""

    data: np.ndarray
    affine: np.ndarray  # 4x4 voxel -> mm
    path: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


# Header sanity limits: a header claiming more than this is treated as corrupt rather than allocated.
MAX_DIM = 4096
MAX_VOXELS = 1024**3 // 2


# deflate cannot compress better than about 1032:1, so a .nii.gz claiming more is truncated or corrupt
MAX_GZIP_RATIO = 1100


def check_nifti_header(path: str | Path, img, *, max_dim: int = MAX_DIM, max_voxels: int = MAX_VOXELS
                       ) -> tuple[int, ...]:
    """The shared guard of every NIfTI reader, run on the header before any voxel is read: the shape (trailing
    singleton axes dropped) within ``max_dim`` per axis and ``max_voxels`` in all, and the claimed voxel bytes
    possible for the file's size (an uncompressed file must hold them, a gzip one cannot expand beyond
    deflate's ratio). Returns the shape; raises DataError naming the file."""
    path = Path(path)
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if shape and (min(shape) <= 0 or max(shape) > max_dim or math.prod(shape) > max_voxels):
        raise DataError(f"{path}: header claims an absurd size {shape} (limits: {max_dim} per axis, "
                        f"{max_voxels} voxels)")
    try:
        itemsize = np.dtype(img.get_data_dtype()).itemsize
        offset = int(img.header.get("vox_offset", 0) or 0)
    except (TypeError, ValueError, AttributeError):
        itemsize, offset = 1, 0
    claimed = math.prod(shape) * itemsize + offset
    size = path.stat().st_size if path.is_file() else None
    if size is not None and path.name.endswith(".gz"):
        if claimed > MAX_GZIP_RATIO * size + 2**20:
            raise DataError(f"{path}: header claims {shape} voxels ({claimed} bytes) but the {size}-byte gzip file "
                            "cannot hold them: truncated or corrupt")
    elif size is not None and path.name.endswith(".nii") and size < claimed:
        raise DataError(f"{path}: header claims {shape} voxels ({claimed} bytes) but the file holds {size} bytes: "
                        "truncated or corrupt")
    return shape


def check_affine(path: str | Path, affine: np.ndarray) -> None:
    """The voxel-to-mm affine must be usable: finite, each axis a plausible spacing (0 < mm <= 100) and the three
    axes independent (else nibabel's reorientation fails deep inside with an OrientationError); DataError naming
    the file."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: header affine is not a finite 4x4 matrix")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(spacing <= 1e-6) or np.any(spacing > 100):
        raise DataError(f"{path}: header affine gives voxel spacing {np.round(spacing, 6).tolist()} mm; each axis "
                        "must be > 0 and <= 100 mm (a zero spacing collapses an axis)")
    if abs(np.linalg.det(affine[:3, :3] / spacing)) < 1e-3:
        raise DataError(f"{path}: header affine has dependent axes (its voxel axes do not span 3-D space)")


def load_volume(path: str | Path, *, max_dim: int = MAX_DIM, max_voxels: int = MAX_VOXELS) -> Volume:
    """Reads a NIfTI file into canonical orientation with checks; raises DataError naming the file."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for unreadable files
        raise DataError(f"{path}: unreadable NIfTI ({type(err).__name__}: {err})") from err
    shape = check_nifti_header(path, img, max_dim=max_dim, max_voxels=max_voxels)
    if len(shape) != 3:
        raise DataError(f"{path}: header shape {tuple(img.shape)} is not a 3D volume")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0) or np.any(zooms > 100):
        raise DataError(f"{path}: header voxel spacing {zooms.tolist()} mm is not plausible")
    check_affine(path, img.affine)
    try:
        img = nib.Nifti1Image(np.asarray(img.dataobj).reshape(shape), img.affine, img.header)
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # truncated gzip streams raise EOFError/OSError/zlib.error
        raise DataError(f"{path}: truncated or corrupt voxel data ({type(err).__name__}: {err})") from err
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(f"{path}: {bad} of {data.size} voxels are NaN or Inf")
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), path=str(path))


def check_aligned(volumes: Mapping[str, Volume], *, atol_mm: float = 1e-2, resample: bool = False,
                  reference: str | None = None) -> dict[str, Volume]:
    """Checks that all volumes share shape and affine (within ``atol_mm``); returns them.

    With ``resample=True`` a mismatching volume is resampled (trilinear) onto the reference volume's grid
    instead of raising.
    """
    names = list(volumes)
    ref_name = reference if reference in volumes else names[0]
    ref = volumes[ref_name]
    out = {}
    for name in names:
        vol = volumes[name]
        same_shape = vol.data.shape == ref.data.shape
        same_affine = np.allclose(vol.affine, ref.affine, atol=atol_mm, rtol=0)
        if same_shape and same_affine:
            out[name] = vol
            continue
        if not resample:
            what = (f"shape {vol.data.shape} != {ref.data.shape}" if not same_shape
                    else f"affine differs by up to {np.abs(vol.affine - ref.affine).max():.4g} mm")
            raise DataError(f"{vol.path or name}: {name} is not aligned with {ref_name} ({what}); "
                            "pass --resample to resample onto the reference grid")
        img = nib.Nifti1Image(vol.data, vol.affine)
        moved = resample_from_to(img, (ref.data.shape, ref.affine), order=1, mode="nearest")
        out[name] = Volume(np.asarray(moved.dataobj, dtype=np.float32), ref.affine.copy(), vol.path)
    return out


def norm_params(modality: str, data: np.ndarray, foreground: np.ndarray | None,
                config: NormConfig = NormConfig()) -> dict:
    """The window ``{"kind", "lo", "hi"}`` mapping this volume onto [-1, 1] (native units)."""
    kind = modality_spec(modality).kind
    if kind == "ct":
        lo, hi = config.ct_window
    elif kind == "pet":
        lo, hi = 0.0, float(config.pet_suv_max)
    else:
        values = data[foreground] if foreground is not None and foreground.any() else data.ravel()
        lo, hi = (float(v) for v in np.percentile(values, config.mr_percentiles))
        if not hi > lo:
            raise DataError(f"{modality}: flat intensities in the foreground (percentiles "
                            f"{config.mr_percentiles} both {lo:.4g})")
    return {"kind": {"ct": "hu_window", "pet": "suv_clip", "mr": "percentile"}[kind],
            "lo": float(lo), "hi": float(hi)}


def normalise(data: np.ndarray, params: Mapping) -> np.ndarray:
    """Native units -> [-1, 1] float32 (clipped to the window)."""
    lo, hi = params["lo"], params["hi"]
    out = (np.asarray(data, np.float32) - np.float32(lo)) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)
    return np.clip(out, -1.0, 1.0)


def denormalise(image: np.ndarray, params: Mapping) -> np.ndarray:
    """[-1, 1] -> native units (HU for CT/CBCT, SUV for PET); exact inverse of ``normalise`` in the window."""
    lo, hi = params["lo"], params["hi"]
    return (np.asarray(image, np.float32) + np.float32(1.0)) * np.float32((hi - lo) / 2.0) + np.float32(lo)


def modality_foreground(modality: str, data: np.ndarray) -> np.ndarray:
    """A rough body mask from one modality (used when the dataset ships no mask)."""
    kind = modality_spec(modality).kind
    if kind == "ct":
        return data > -500.0  # air is about -1000 HU, any tissue is above -500
    positive = data[data > 0]
    if positive.size == 0:
        return np.zeros(data.shape, bool)
    # MR/PET backgrounds are near zero; 2 % of the bright end separates tissue from background noise.
    return data > 0.02 * float(np.percentile(positive, 99.5))


def case_foreground(volumes: Mapping[str, Volume], mask: Volume | None = None) -> np.ndarray:
    """Boolean ``[X, Y, Z]`` foreground: the dataset's mask if given, else the union over modalities with
    holes filled per axial slice."""
    if mask is not None:
        return mask.data > 0.5
    fg = None
    for name, vol in volumes.items():
        m = modality_foreground(name, vol.data)
        fg = m if fg is None else fg | m
    for z in range(fg.shape[2]):
        fg[:, :, z] = ndimage.binary_fill_holes(fg[:, :, z])
    return fg


@dataclasses.dataclass(frozen=True)
class SliceGeometry:
    """Where the resampled field of view sits inside the ``size x size`` slice."""

    size: int
    pixel_mm: float
    rows: int
    cols: int
    pad_top: int
    pad_left: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def slice_geometry(shape: tuple[int, int, int], spacing: tuple[float, float, float], size: int) -> SliceGeometry:
    nx, ny, _ = shape
    sx, sy, _ = spacing
    pixel = max(nx * sx, ny * sy) / size
    rows = min(size, max(1, round(ny * sy / pixel)))
    cols = min(size, max(1, round(nx * sx / pixel)))
    return SliceGeometry(size, float(pixel), rows, cols, (size - rows) // 2, (size - cols) // 2)


def to_axial_slices(data: np.ndarray, geometry: SliceGeometry, *, background: float,
                    order: int = 1) -> np.ndarray:
    """``[X, Y, Z]`` -> ``[Z, size, size]`` float32 axial slices in display orientation (see module doc).

    ``order=0`` (nearest, no anti-aliasing) is for masks.
    """
    display = np.ascontiguousarray(data[:, ::-1, :].transpose(2, 1, 0))  # [Z, Y(anterior first), X]
    target = (display.shape[0], geometry.rows, geometry.cols)
    if target != display.shape:
        downscale = geometry.rows < display.shape[1] or geometry.cols < display.shape[2]
        display = resize(display.astype(np.float32), target, order=order, mode="edge", preserve_range=True,
                         anti_aliasing=bool(order > 0 and downscale))
    out = np.full((display.shape[0], geometry.size, geometry.size), background, np.float32)
    out[:, geometry.pad_top:geometry.pad_top + geometry.rows,
        geometry.pad_left:geometry.pad_left + geometry.cols] = display
    return out


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``[H, W]`` slice to ``size`` (anti-aliased when shrinking), float32.

    The one resize of the project: training pipelines, the sampler and evaluation must see images the same way.
    """
    image = np.asarray(image, np.float32)
    if image.shape == tuple(size):
        return image
    down = size[0] < image.shape[0] or size[1] < image.shape[1]
    return resize(image, size, order=1, mode="edge", anti_aliasing=down, preserve_range=True).astype(np.float32)
