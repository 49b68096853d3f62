"""synthesize: NIfTI round trip (affine, voxel order, native units), a real tiny-model volume, bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from synermedgen_jax.__main__ import main as cli
from synermedgen_jax.data.tokenizer import build_default_tokenizer
from synermedgen_jax.inference import synthesize as syn
from synermedgen_jax.inference.loading import Inference, InferenceError
from synermedgen_jax.inference.sampler import Sampler, SamplerConfig
from synermedgen_jax.modeling.synermedgen import SynerMedGen

# A non-canonical affine: axes permuted (Y, X, Z) and X flipped, 1.5 mm in-plane, 3 mm slices, offset origin.
AFFINE = np.array([[0.0, -1.5, 0.0, 20.0], [1.5, 0.0, 0.0, -12.0], [0.0, 0.0, 3.0, 5.0], [0, 0, 0, 1]])


pytestmark = pytest.mark.usefixtures("fast_compile")


def _ct_volume(rng, shape=(16, 16, 6)):
    data = np.full(shape, -1000.0, np.float32)
    data[3:13, 2:14, 1:5] = rng.normal(40.0, 200.0, (10, 12, 4))  # body in slices 1..4 only
    data[5:8, 5:8, 2] = 1500.0
    return data


@pytest.fixture(scope="module")
def inference(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.vae.sample_posterior = False
    model = SynerMedGen(config, rngs=nnx.Rngs(params=0))
    return Inference(model=model, tokenizer=build_default_tokenizer(), image_size=(16, 16), vit_image_size=(28, 28))


def test_round_trip_restores_affine_voxel_order_and_units(inference, monkeypatch, tmp_path):
    """With an identity generator, slicing + normalisation + un-slicing + de-normalisation must give the input
    back in HU (the in-plane size equals the image size, so no resampling is involved)."""
    calls = []

    def identity(self, sources, instruction_ids, *, seed=0, batch_size=8, indices=None, progress=None):
        calls.append(list(indices))
        return np.asarray(sources, np.float32)

    monkeypatch.setattr(Sampler, "generate", identity)
    rng = np.random.default_rng(0)
    data = _ct_volume(rng)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    image = syn.read_nifti(path)
    out = syn.synthesize_volume(inference, image, "ct", "ct", "copy", batch_size=3)
    # Slices along the canonical Z axis that hold body: Z is the input's third axis here.
    assert calls == [[1, 2, 3, 4]]
    lo, hi = inference.norm.ct_window
    body = np.zeros(data.shape, bool)
    body[:, :, 1:5] = True
    np.testing.assert_allclose(out[body], np.clip(data, lo, hi)[body], atol=2e-3, rtol=0)
    assert np.all(out[~body] == np.float32(lo))  # slices without foreground: background
    target = tmp_path / "out.nii.gz"
    syn.write_nifti(target, out, image)
    back = nib.load(str(target))
    np.testing.assert_array_equal(back.affine, AFFINE)
    assert back.header.get_zooms() == nib.load(str(path)).header.get_zooms()
    np.testing.assert_allclose(np.asarray(back.dataobj), out, atol=0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_tiny_model_volume_is_deterministic_and_in_target_units(inference, tmp_path):
    rng = np.random.default_rng(1)
    data = np.where(_ct_volume(rng) > -500, rng.uniform(100, 900, (16, 16, 6)), 0.0).astype(np.float32)
    image = nib.Nifti1Image(data, AFFINE)
    sampler = Sampler(inference.model, inference.special, inference.image_size, inference.vit_image_size,
                      SamplerConfig(num_steps=3))
    kw = dict(sampler=sampler, batch_size=4, seed=3)
    a = syn.synthesize_volume(inference, image, "t1", "ct", "Synthesize CT.", **kw)
    b = syn.synthesize_volume(inference, image, "t1", "ct", "Synthesize CT.", **kw)
    lo, hi = inference.norm.ct_window
    assert a.shape == data.shape and a.dtype == np.float32
    assert np.all(np.isfinite(a)) and a.min() >= lo - 1e-3 and a.max() <= hi + 1e-3
    assert a[:, :, 1:5].std() > 1.0  # synthesized slices are not constant
    np.testing.assert_array_equal(a, b)
    pet = syn.synthesize_volume(inference, image, "t1", "pet", "Synthesize CT.", **kw)  # same prompt: same compile
    assert pet.min() >= -1e-4 and pet.max() <= inference.norm.pet_suv_max + 1e-4


def test_route_and_modality_errors_list_valid_ones():
    with pytest.raises(InferenceError, match="valid: ct, cbct, mr"):
        syn.resolve_route("xray", "ct")
    with pytest.raises(InferenceError, match="valid routes: .*cbct->ct"):
        syn.resolve_route("pet", "flair")
    assert syn.resolve_route("cbct", "ct", dataset="mni152-sim").name == "mni152-sim/brain/cbct->ct"
    assert syn.resolve_route("cbct", "ct").dataset == "synthrad2023"


def _run(tmp_path, capsys, *args):
    code = cli(["synthesize", "--checkpoint", str(tmp_path / "no_ckpt"), "--no-progress", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    vol = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), str(vol))
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(flat))
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4)), str(four))
    png = tmp_path / "in.png"
    png.write_bytes(b"\x89PNG\r\n")
    garbage = tmp_path / "bad.nii.gz"
    garbage.write_bytes(b"not a nifti")
    out = tmp_path / "out.nii.gz"
    base = ["--source-modality", "cbct", "--target-modality", "ct", "--output", str(out)]
    cases = [
        (["--input", str(vol), "--source-modality", "xray", "--target-modality", "ct", "--output", str(out)],
         "unknown modality 'xray'; valid: ct, cbct"),
        (["--input", str(vol), "--source-modality", "pet", "--target-modality", "flair", "--output", str(out)],
         "valid routes:"),
        (["--input", str(flat), *base], "2-D"),
        (["--input", str(four), *base], "4-D"),
        (["--input", str(png), *base], "not a NIfTI file"),
        (["--input", str(garbage), *base], "unreadable NIfTI"),
        (["--input", str(vol), "--source-modality", "cbct", "--target-modality", "ct", "--output", str(vol)],
         "is the input file"),
        (["--input", str(vol), *base], "checkpoint not found"),
    ]
    for args, message in cases:
        code, err = _run(tmp_path, capsys, *args)
        assert code == 2, (args, err)
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.nii.gz", "flat.nii.gz", "four.nii.gz", "in.png", "bad.nii.gz"])
