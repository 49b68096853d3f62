"""NIfTI loading checks, alignment, normalisation inverse and slice orientation."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from synermedgen_jax.data.volumes import (
    DataError,
    NormConfig,
    Volume,
    check_aligned,
    denormalise,
    load_volume,
    norm_params,
    normalise,
    slice_geometry,
    to_axial_slices,
)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def test_ct_window_roundtrip_is_exact_inside_window():
    hu = np.array([-1024.0, -1000.0, 0.0, 40.0, 1500.0, 3071.0], np.float32)
    params = norm_params("ct", hu, None, NormConfig())
    x = normalise(hu, params)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(denormalise(x, params), hu, atol=1e-3)
    # Outside the window values clip: the record documents it through lo/hi.
    assert normalise(np.array([5000.0]), params)[0] == 1.0


def test_mr_percentiles_and_pet_clip():
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 100, size=10000).astype(np.float32)
    params = norm_params("t2", data, data > 0, NormConfig(mr_percentiles=(1.0, 99.0)))
    assert params["lo"] == pytest.approx(np.percentile(data, 1.0))
    assert params["hi"] == pytest.approx(np.percentile(data, 99.0))
    pet = norm_params("pet", data, None, NormConfig(pet_suv_max=20.0))
    assert (pet["lo"], pet["hi"]) == (0.0, 20.0)
    np.testing.assert_allclose(denormalise(normalise(np.float32(10.0), pet), pet), 10.0, rtol=1e-6)
    with pytest.raises(DataError, match="flat"):
        norm_params("t1", np.ones(100, np.float32), None)
    with pytest.raises(DataError, match="unknown modality"):
        norm_params("xray", data, None)


def test_load_volume_rejects_bad_files(tmp_path):
    good = _save(tmp_path / "good.nii.gz", np.ones((6, 7, 5), np.float32))
    assert load_volume(good).data.shape == (6, 7, 5)
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 50])[:-20])
    with pytest.raises(DataError, match="trunc.nii.gz"):
        load_volume(tmp_path / "trunc.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(DataError, match="unreadable"):
        load_volume(tmp_path / "junk.nii.gz")
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(DataError, match="1 of 64 voxels are NaN or Inf"):
        load_volume(_save(tmp_path / "nan.nii.gz", nan))
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "huge.nii"))
    raw = bytearray((tmp_path / "huge.nii").read_bytes())
    raw[42:48] = np.array([30000] * 3, "<i2").tobytes()  # NIfTI-1 dim[1..3] at byte 42: 2.7e13 voxels
    (tmp_path / "huge.nii").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="absurd size"):
        load_volume(tmp_path / "huge.nii")
    # A trailing singleton 4th dimension is accepted as 3D.
    assert load_volume(_save(tmp_path / "four.nii.gz", np.ones((3, 4, 5, 1), np.float32))).data.shape == (3, 4, 5)


def test_canonical_orientation_keeps_world_coordinates(tmp_path):
    data = np.zeros((5, 6, 7), np.float32)
    data[1, 2, 3] = 9.0
    lps = np.diag([-2.0, -1.5, 3.0, 1.0])  # x and y flipped relative to RAS
    lps[:3, 3] = [10.0, 20.0, -5.0]
    vol = load_volume(_save(tmp_path / "lps.nii.gz", data, lps))
    world_before = lps @ np.array([1, 2, 3, 1.0])
    idx = np.argwhere(vol.data == 9.0)[0]
    np.testing.assert_allclose(vol.affine @ np.r_[idx, 1.0], world_before)
    assert np.all(np.diag(vol.affine)[:3] > 0)
    assert vol.spacing == pytest.approx((2.0, 1.5, 3.0))


def test_check_aligned_and_resample():
    a = Volume(np.zeros((4, 5, 6), np.float32), np.eye(4), "a.nii.gz")
    shifted = np.eye(4)
    shifted[0, 3] = 1.0
    b = Volume(np.arange(120, dtype=np.float32).reshape(4, 5, 6), shifted, "b.nii.gz")
    with pytest.raises(DataError, match=r"b.nii.gz: ct is not aligned with mr \(affine differs by up to 1"):
        check_aligned({"mr": a, "ct": b})
    c = Volume(np.zeros((4, 5, 7), np.float32), np.eye(4), "c.nii.gz")
    with pytest.raises(DataError, match="shape"):
        check_aligned({"mr": a, "ct": c})
    out = check_aligned({"mr": a, "ct": b}, resample=True)
    assert out["ct"].data.shape == a.data.shape
    np.testing.assert_array_equal(out["ct"].affine, a.affine)
    # Voxel i of the resampled grid is world x=i, i.e. voxel i-1 of b: b's values shifted by one along x.
    np.testing.assert_allclose(out["ct"].data[1:], b.data[:-1], atol=1e-4)


def test_axial_slice_orientation_and_padding():
    # X=8 (left..right), Y=4 (posterior..anterior), Z=3; mark the most anterior, leftmost voxel.
    data = np.zeros((8, 4, 3), np.float32)
    data[0, 3, :] = 1.0
    geom = slice_geometry(data.shape, (1.0, 1.0, 2.0), 16)
    assert (geom.rows, geom.cols, geom.pad_top, geom.pad_left) == (8, 16, 4, 0)
    slices = to_axial_slices(data, geom, background=-1.0, order=0)
    assert slices.shape == (3, 16, 16)
    assert slices[0, 4, 0] == 1.0  # anterior = first content row, subject left = column 0
    assert slices[0, 0, 0] == -1.0 and slices[0, 15, 15] == -1.0  # padding
    # Anisotropic pixels become square: 4 voxels of 2 mm (8 mm) span as many pixels as 8 voxels of 1 mm.
    geom2 = slice_geometry((8, 4, 1), (1.0, 2.0, 1.0), 16)
    assert geom2.rows == geom2.cols == 16
