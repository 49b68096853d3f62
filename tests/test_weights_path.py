"""README's "Weights" workflow, run as typed on a tiny folder in BAGEL's exact layout (random weights, BAGEL's key
scheme and config files, a small Qwen2-format tokenizer): import → inference on the import → build-data with the
weights' tokenizer → eval → Stage I from the import → Stage II with its defaults → inference on the trained run →
export → re-import. Each command is README's line with only the paths, the dataset and the model variant swapped
for the tiny ones and a few speed flags appended; each runs as a user types it (``python -m synermedgen_jax``).

Checks along the way: what import writes answers, synthesizes (NIfTI and the metadata convention) and evaluates;
the build's tokenizer is the weights'; Stage II's first step holds the imported generation expert bit for bit (its
default ``init_moe`` fills only what a checkpoint lacks); the export carries ``model.safetensors`` and
``ema.safetensors`` and re-imports bit for bit (export → import → export gives the same tensors).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import train_helpers as h
from port_fixtures import make_bagel_folder, port_test_config
from qwen_tokenizer import make_qwen2_tokenizer
from state_memory import vae_overrides

pytestmark = pytest.mark.long

TRAIN_FLAGS = ["--config.train.steps=1", "--config.train.warmup=10", "--config.train.checkpoint_every=1",
               "--config.train.eval_every=0", "--config.train.image_every=0", "--config.train.progress=False",
               *vae_overrides()]
# Speed flags appended per command (the README lines stay as a user types them).
EXTRA = {
    "synthesize": ["--steps", "2", "--no-progress"],
    "ask": ["--max-new-tokens", "4"],
    "eval": ["--steps", "2", "--max-slices", "1", "--max-instances", "1", "--split", "val", "--no-progress",
             "--tasks", "mni152-sim/brain/t1->t2"],
    "train": TRAIN_FLAGS,
}
SHAPE = (40, 48)  # the metadata slices: not square, with a zero border (the official crop has work to do)


def readme_weights_commands() -> list[list[str]]:
    text = (h.REPO / "README.md").read_text()
    section = text[text.index("## Weights: BAGEL and PyTorch"):]
    section = section[: section.index("\n## ", 3)]
    block = section[section.index("```bash") + len("```bash"): section.index("```", section.index("```bash") + 7)]
    return [shlex.split(line) for line in block.strip().splitlines() if line.startswith("python -m synermedgen_jax")]


def _blob(rng, shape, value) -> np.ndarray:
    image = np.zeros(shape, np.uint8)
    image[4:-5, 6:-4] = np.clip(rng.normal(value, 20, (shape[0] - 9, shape[1] - 10)), 1, 255).astype(np.uint8)
    return image


def _inputs(root: Path) -> None:
    """t1.nii.gz, slice.png, and slices/ + metadata.json in the official convention (id, prompt, target)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    volume = np.zeros((20, 24, 4), np.float32)
    volume[3:17, 4:20] = rng.uniform(200, 800, (14, 16, 4))
    nib.save(nib.Nifti1Image(volume, np.diag([6.0, 6.0, 6.0, 1.0])), str(root / "t1.nii.gz"))
    Image.fromarray(_blob(rng, SHAPE, 120)).save(root / "slice.png")
    metadata = {}
    for key in ("case0_slice3", "case1_slice7"):
        for modality, value in (("t1", 90), ("t2", 170)):
            (root / "slices" / modality).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_blob(rng, SHAPE, value)).save(root / "slices" / modality / f"{key}.png")
        metadata[key] = {"id": f"t1/{key}.png", "target": f"t2/{key}.png",
                         "prompt": "Convert this T1-weighted MRI slice into a T2-weighted MRI slice."}
    (root / "metadata.json").write_text(json.dumps(metadata, indent=2))


PATH_FLAGS = ("--bagel", "--out", "--checkpoint", "--input", "--output", "--image", "--metadata", "--image-root",
              "--output-dir", "--predictions", "--workdir", "--tokenizer", "--data")


def _localise(argv: list[str], root: Path) -> list[str]:
    """README's line → the tiny run: user paths under ``root``, the tiny model, the simulated dataset."""
    args = argv[3:]
    command, out = args[0], [args[0]]
    i = 1
    while i < len(args):
        token = args[i]
        if command == "build-data" and token in ("--source", "--root"):
            i += 2  # the simulated subjects replace BraTS: no download here
            continue
        if token in PATH_FLAGS:
            out += [token, str(root / args[i + 1])]
            i += 2
            continue
        if token.startswith("configs/"):
            token = token.split(":")[0] + ":tiny"
        elif token.startswith(("--config.data.dir=", "--config.init_from=")):
            key, value = token.split("=", 1)
            token = f"{key}={root / value}"
        out.append(token)
        i += 1
    if command == "build-data":
        out += h.BUILD_ARGS
    extra = [] if command == "eval" and "--metadata" in args else EXTRA.get(command, [])
    return [sys.executable, "-m", "synermedgen_jax", *out, *extra]


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for name in ("ema.safetensors", "model.safetensors", "ae.safetensors"):
        for key, value in load_file(str(folder / name)).items():
            out[f"{name}:{key}"] = value
    return out


def test_readme_weights_workflow(tmp_path, tiny_config):
    from synermedgen_jax.port import orbax_io
    from synermedgen_jax.training.checkpoint import read_weights

    commands = readme_weights_commands()
    assert [c[3] for c in commands][:2] == ["import", "synthesize"] and len(commands) >= 10
    config = port_test_config(tiny_config)
    make_bagel_folder(tmp_path / "BAGEL-7B-MoT", config, seed=21, dtype=torch.bfloat16)
    make_qwen2_tokenizer(tmp_path / "BAGEL-7B-MoT", int(config.llm.vocab_size))
    _inputs(tmp_path)
    environment = h.env(tmp_path / "cache")
    trains = 0
    for argv in commands:
        cmd = _localise(argv, tmp_path)
        result = h.run(cmd, environment, timeout=900)
        assert result.returncode == 0, (shlex.join(argv), result.stdout[-2000:], result.stderr[-3000:])
        command = argv[3]
        if command == "import" and trains == 0:
            port = json.loads((tmp_path / "ckpt" / "bagel" / "port.json").read_text())
            assert port["tokenizer"]["special_ids"]["bos"] == 502
        if command == "build-data":
            built = json.loads((tmp_path / "data" / "brats" / "manifest.json").read_text())["tokenizer"]
            assert built["fingerprint"] == port["tokenizer"]["fingerprint"]
        if command == "synthesize" and "--input" in argv:
            out = nib.load(str(tmp_path / argv[argv.index("--output") + 1]))
            assert out.shape == (20, 24, 4) and np.isfinite(np.asarray(out.dataobj)).all()
        if command == "synthesize" and "--metadata" in argv:
            from PIL import Image

            folder = tmp_path / argv[argv.index("--output-dir") + 1]
            for key in ("case0_slice3", "case1_slice7"):
                with Image.open(folder / f"{key}.png") as image:
                    assert image.mode == "RGB"  # the official script's output
                    assert image.size[0] <= 64 and image.size[1] <= 64  # generated at the tiny model's rule size
        if command == "train":
            trains += 1
        if command == "train" and trains == 2:  # Stage II with its defaults (init_moe=True) from Stage I
            _assert_generation_expert_kept(tmp_path / "ckpt" / "bagel", tmp_path / "runs" / "s2", read_weights)
        if command == "export":
            exported = tmp_path / "SynerMedGen-ft"
            assert (exported / "model.safetensors").is_file() and (exported / "ema.safetensors").is_file()
    # The export re-imports bit for bit: exporting the re-import gives the same tensors.
    again = tmp_path / "again"
    result = h.run([sys.executable, "-m", "synermedgen_jax", "export", "--checkpoint", str(tmp_path / "ckpt" / "ft"),
                    "--out", str(again)], environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = _tensors(tmp_path / "SynerMedGen-ft"), _tensors(again)
    assert sorted(first) == sorted(second)
    differing = [k for k in first if first[k].dtype != second[k].dtype or not np.array_equal(first[k], second[k])]
    assert not differing, differing[:5]
    assert sorted(orbax_io.checkpoint_shapes(tmp_path / "ckpt" / "ft")) == sorted(
        orbax_io.checkpoint_shapes(tmp_path / "ckpt" / "bagel"))


def _assert_generation_expert_kept(imported: Path, workdir: Path, read_weights) -> None:
    from flax import nnx

    from synermedgen_jax.modeling.synermedgen import build_model, expert_twin_names
    from synermedgen_jax.port import orbax_io
    from synermedgen_jax.training.checkpoint import model_targets, read_config

    run = read_config(workdir)
    assert run.init_moe  # Stage II's default
    model = nnx.eval_shape(lambda: build_model(run.model, 0))
    generation = sorted(expert_twin_names(model))
    targets = {n: t for n, t in model_targets(model).items() if n in generation}
    trained = read_weights(workdir, targets)
    expected = orbax_io.read_leaves(imported, generation)
    assert sorted(trained) == generation
    differing = [n for n in generation if not np.array_equal(np.asarray(trained[n]), expected[n])]
    assert not differing, differing[:5]
