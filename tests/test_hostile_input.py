"""Hostile input against every command (issue 30, part B): each value is refused at the edge, before any work.

Table-driven, in this process (``main([...])``), one case per kind and command: bad input that used to reach deep
code (a traceback), values that used to be accepted silently (a wrong answer with exit status 0) and input that
used to hang. Every case asserts exit status 2, exactly one ``error:`` line naming the option, file or config key,
no ``Traceback``, and that nothing that existed before changed and nothing new appeared (sha256 of every file
under the case's folder and of the shared build). The checkpoints the inference cases name do not exist: the
refusal must come before any checkpoint is read. A few cases run the real CLI in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import train_helpers as h

CONFIG = "configs/stage1_gau.py:tiny"


def checksums(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``, hidden ones included (a staging leftover
    counts as a change)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def folders(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_dir()}


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` grey pixels (its data is empty: only the header is read
    before the size check)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def zero_spacing_nifti(path: Path) -> Path:
    """A volume whose affine collapses the z axis (voxel spacing 0): nibabel's reorientation fails on it."""
    import nibabel as nib

    image = nib.Nifti1Image(np.random.default_rng(0).uniform(0, 100, (16, 16, 4)).astype(np.float32), np.eye(4))
    affine = np.eye(4)
    affine[2, 2] = 0.0
    image.header.set_sform(affine, code=1)
    image.header.set_qform(None, code=0)
    image.update_header = lambda: None  # keep the degenerate sform as written
    nib.save(image, str(path))
    return path


def config_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shared read-only inputs: a tiny build, a volume, a tiny BAGEL folder."""
    root = tmp_path_factory.mktemp("hostile")
    data = h.build_data(root / "data")
    volume = nifti(root / "t1.nii.gz", np.random.default_rng(0).uniform(0, 100, (24, 24, 4)))
    return {"root": root, "data": data, "volume": volume}


@pytest.fixture(scope="module")
def bagel(world, tiny_config):
    from port_fixtures import make_bagel_folder, port_test_config

    folder = world["root"] / "bagel"
    make_bagel_folder(folder, port_test_config(tiny_config), seed=0)
    return folder


def cli(argv: list, capsys) -> tuple[int, str]:
    """``(exit status, stdout + stderr)`` of the CLI run in this process (argparse's exits included)."""
    from synermedgen_jax.__main__ import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_refused(code: int, output: str, names: list[str]) -> None:
    assert "Traceback" not in output, output[-3000:]
    assert code == 2, (code, output[-3000:])
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])


def _train(t: Path, w: dict, *overrides: str, config: str = CONFIG, workdir: Path | None = None) -> list:
    return ["train", "--config", config, "--workdir", workdir or t / "run", f"--config.data.dir={w['data']}",
            "--config.train.steps=2", *overrides]


def _synth(t: Path, w: dict, *extra, source: str = "t1", target: str = "t2", input_: Path | None = None) -> list:
    return ["synthesize", "--checkpoint", t / "no_checkpoint", "--input", input_ or w["volume"], "--source-modality",
            source, "--target-modality", target, "--output", t / "out.nii.gz", *extra]


def _metadata(t: Path, *extra) -> list:
    (t / "m.json").write_text(json.dumps({"a": {"id": "x.png", "prompt": "p"}}))
    return ["synthesize", "--checkpoint", t / "no_checkpoint", "--metadata", t / "m.json", "--image-root", t,
            "--output-dir", t / "o", *extra]


def _ask(t: Path, *extra) -> list:
    return ["ask", "--checkpoint", t / "no_checkpoint", *extra]


BUILD = ["build-data", "--source", "mni152-sim", "--subjects", "2", "--sim-voxel-mm", "8", "--slice-size", "32",
         "--split", "0.5", "0.5", "0", "--no-progress"]


def _build(t: Path, *extra) -> list:
    argv = list(BUILD)
    for option in extra[::2]:  # a case's value replaces the default one
        if option in argv:
            i = argv.index(option)
            del argv[i:i + (4 if option == "--split" else 2)]
    return [*argv, "--out", t / "built", *extra]


def _corrupt_shard(t: Path, w: dict) -> Path:
    data = t / "data"
    shutil.copytree(w["data"], data)
    shard = sorted((data / "records").glob("train-*.array_record"))[0]
    payload = bytearray(shard.read_bytes())
    for i in range(200, 264):  # inside the first record's chunk
        payload[i] ^= 0xFF
    shard.write_bytes(bytes(payload))
    return data


def _fake_run(t: Path) -> Path:
    """A run folder with one checkpoint step (what train's step detection looks at)."""
    step = t / "run" / "2"
    (step / "state").mkdir(parents=True)
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    (t / "run" / "config.json").write_text("{}")
    return step


def _import_edited(t: Path, bagel: Path, edit: Callable[[dict, dict], None]) -> Path:
    """A copy of the BAGEL folder whose ema.safetensors header is edited in place (no tensor bytes move)."""
    folder = t / "bagel"
    shutil.copytree(bagel, folder)
    path = folder / "ema.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header, {k: v for k, v in header.items() if k != "__metadata__"})
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length, "the edit must not grow the header"
    path.write_bytes(raw[:8] + text + b" " * (length - len(text)) + raw[8 + length:])
    return folder


def _overlap(header: dict, tensors: dict) -> None:
    """Points a tensor's byte range at another of the same size (both in range: only the overlap is wrong)."""
    by_size: dict[tuple, list[str]] = {}
    for name, entry in tensors.items():
        by_size.setdefault((entry["dtype"], tuple(entry["shape"])), []).append(name)
    first, second = next(names for names in by_size.values() if len(names) > 1)[:2]
    header[second]["data_offsets"] = list(header[first]["data_offsets"])


def _integer_embedding(header: dict, tensors: dict) -> None:
    """The token embedding's bytes relabelled as int32 (same size as the float32 fixture)."""
    name = next(k for k in tensors if "embed_tokens" in k)
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "I32"


# name -> (kind, argv(tmp_path, world, bagel), names the error line must hold). Kinds: what the case was before
# (issue 30's probes): "traceback" (bad input reaching deep code), "silent" (exit 0 with a wrong result),
# "hang", or "range" (more of the same kinds found in the other commands).
CASES: dict[str, tuple[str, Callable, list[str]]] = {
    # -- config files and values (train, bench, plan, model-info, ablate share load_config/apply_overrides)
    "config syntax error": ("traceback", lambda t, w, b: _train(t, w, config=str(config_file(
        t / "broken.py", "def get_config(variant=None):\n    return {\n")) + ":tiny"), ["broken.py", "syntax error"]),
    "config not .py": ("traceback", lambda t, w, b: _train(t, w, config=str(config_file(t / "c.yaml", "a: 1\n"))),
                       ["c.yaml", ".py"]),
    "config get_config returns a dict": ("traceback", lambda t, w, b: ["model-info", "--config", config_file(
        t / "d.py", "def get_config(variant=None):\n    return {'llm': {}}\n")], ["d.py", "dict"]),
    "config raises at import": ("traceback", lambda t, w, b: ["model-info", "--config", config_file(
        t / "e.py", "import no_such_module_xyz\n")], ["e.py", "ModuleNotFoundError"]),
    "hidden size not divisible by heads": ("traceback", lambda t, w, b: _train(
        t, w, "--config.model.llm.hidden_size=66"), ["model.llm.hidden_size", "num_heads"]),
    "vit hidden size not divisible by heads (bench)": ("traceback", lambda t, w, b: [
        "bench", "--config", CONFIG, "--what", "train", "--config.model.vit.hidden_size=33"],
        ["model.vit.hidden_size"]),
    "vae groups not dividing widths (plan)": ("traceback", lambda t, w, b: [
        "plan", "--config", CONFIG, "--devices", "1", "--config.model.vae.norm_groups=3"], ["vae.norm_groups"]),
    "train lr negative": ("silent", lambda t, w, b: _train(t, w, "--config.train.lr=-1"), ["train.lr"]),
    "train lr infinite": ("silent", lambda t, w, b: _train(t, w, "--config.train.lr=1e999"), ["train.lr", "finite"]),
    "train ema above 1": ("silent", lambda t, w, b: _train(t, w, "--config.train.ema=1.5"), ["train.ema"]),
    "train cfg dropout above 1": ("silent", lambda t, w, b: _train(t, w, "--config.data.cfg_text=2.0"),
                                  ["data.cfg_text"]),
    "train mesh size zero": ("traceback", lambda t, w, b: _train(t, w, "--config.mesh.fsdp=0"), ["mesh.fsdp"]),
    "train corrupted record shard": ("traceback", lambda t, w, b: _train(
        t, w, f"--config.data.dir={_corrupt_shard(t, w)}"), ["data.dir", "train-00000.array_record", "corrupt"]),
    "train workdir is a step folder": ("silent", lambda t, w, b: _train(t, w, workdir=_fake_run(t)),
                                       ["--workdir", "step folder"]),
    "train workdir is a data folder": ("silent", lambda t, w, b: _train(t, w, workdir=w["data"]),
                                       ["--workdir", "data folder"]),
    "train rows not a multiple of grad_accum": ("traceback", lambda t, w, b: _train(
        t, w, "--config.train.grad_accum=3"), ["train.rows", "grad_accum"]),
    "train pack without text slots": ("range", lambda t, w, b: _train(t, w, "--config.data.pack.und_tokens=0"),
                                      ["data.pack.und_tokens"]),
    "train split not in the build": ("traceback", lambda t, w, b: _train(t, w, "--config.data.split=nosuch"),
                                     ["data.split", "nosuch"]),
    "train init_from is a file": ("range", lambda t, w, b: _train(
        t, w, f"--config.init_from={t / 'precious.txt'}"), ["config.init_from", "is a file"]),
    "train stop-at negative": ("range", lambda t, w, b: [*_train(t, w), "--stop-at", "-3"], ["--stop-at"]),
    # -- build-data
    "build slice-size 0": ("traceback", lambda t, w, b: _build(t, "--slice-size", "0"), ["--slice-size"]),
    "build split not summing to 1": ("silent", lambda t, w, b: _build(t, "--split", "0.5", "0.5", "0.5"),
                                     ["--split", "sum to 1"]),
    "build split negative": ("silent", lambda t, w, b: _build(t, "--split", "1.2", "-0.2", "0"), ["--split"]),
    "build inverted ct-window": ("silent", lambda t, w, b: _build(t, "--ct-window=3071,-1024"), ["--ct-window"]),
    "build ct-window NaN": ("silent", lambda t, w, b: _build(t, "--ct-window=nan,10"), ["--ct-window"]),
    "build records-per-shard 0": ("silent", lambda t, w, b: _build(t, "--records-per-shard", "0"),
                                  ["--records-per-shard"]),
    "build mr-percentiles beyond 100": ("range", lambda t, w, b: _build(t, "--mr-percentiles", "1,150"),
                                        ["--mr-percentiles"]),
    "build vocab-size too small": ("traceback", lambda t, w, b: _build(t, "--vocab-size", "10"), ["--vocab-size"]),
    "build mix all zero": ("range", lambda t, w, b: _build(t, "--mix", "cts=0,tia=0,mi=0"), ["--mix"]),
    "build sim-voxel-mm 0": ("range", lambda t, w, b: _build(t, "--sim-voxel-mm", "0"), ["--sim-voxel-mm"]),
    "build pet-suv-max NaN": ("range", lambda t, w, b: _build(t, "--pet-suv-max", "nan"), ["--pet-suv-max"]),
    "build-synermed process-index out of range": ("range", lambda t, w, b: [
        "build-data", "--source", "synermed", "--root", t, "--out", t / "built", "--process-index", "3",
        "--process-count", "2"], ["--process-index"]),
    # -- synthesize
    "synthesize target-window 0,inf": ("silent", lambda t, w, b: _synth(t, w, "--target-window", "0,inf"),
                                       ["--target-window"]),
    "synthesize inverted target-window": ("silent", lambda t, w, b: _synth(t, w, "--target-window", "5,1"),
                                          ["--target-window"]),
    "synthesize zero voxel spacing": ("traceback", lambda t, w, b: _synth(
        t, w, input_=zero_spacing_nifti(t / "flat.nii.gz")), ["flat.nii.gz", "spacing"]),
    "synthesize all-zero mask": ("silent", lambda t, w, b: _synth(
        t, w, "--mask", nifti(t / "mask.nii.gz", np.zeros((24, 24, 4)))), ["--mask", "mask.nii.gz"]),
    "synthesize mask on another grid": ("range", lambda t, w, b: _synth(
        t, w, "--mask", nifti(t / "mask.nii.gz", np.ones((20, 24, 4)))), ["--mask", "mask.nii.gz"]),
    "synthesize empty input": ("silent", lambda t, w, b: _synth(
        t, w, input_=nifti(t / "empty.nii.gz", np.zeros((24, 24, 4)))), ["--input", "empty.nii.gz"]),
    "synthesize steps 1": ("range", lambda t, w, b: _synth(t, w, "--steps", "1"), ["--steps"]),
    "synthesize cfg-text NaN": ("silent", lambda t, w, b: _synth(t, w, "--cfg-text", "nan"), ["--cfg-text"]),
    "synthesize batch-size 0": ("range", lambda t, w, b: _synth(t, w, "--batch-size", "0"), ["--batch-size"]),
    "synthesize metadata split-count 0": ("range", lambda t, w, b: _metadata(t, "--split-count", "0"),
                                          ["--split-count"]),
    "synthesize metadata split-index beyond split-count": ("range", lambda t, w, b: _metadata(
        t, "--split-count", "2", "--split-index", "2"), ["--split-index"]),
    # -- ask
    "ask 1 MB prompt": ("hang", lambda t, w, b: _ask(t, "--prompt", "x" * 2**20), ["--prompt", "characters"]),
    "ask max-new-tokens huge": ("traceback", lambda t, w, b: _ask(t, "--prompt", "q", "--max-new-tokens",
                                                                  str(10**9)), ["--max-new-tokens"]),
    "ask temperature NaN": ("silent", lambda t, w, b: _ask(t, "--prompt", "q", "--temperature", "nan"),
                            ["--temperature"]),
    "ask top-p 0": ("range", lambda t, w, b: _ask(t, "--prompt", "q", "--top-p", "0"), ["--top-p"]),
    "ask 30k x 30k PNG": ("traceback", lambda t, w, b: _ask(t, "--prompt", "q", "--image", png_claiming(
        t / "huge.png", 30_000, 30_000)), ["--image", "huge.png", "pixels"]),
    "ask 9k x 9k PNG": ("range", lambda t, w, b: _ask(t, "--prompt", "q", "--image", png_claiming(
        t / "big.png", 9_000, 9_000)), ["--image", "big.png", "pixels"]),
    "ask NIfTI with zero spacing": ("traceback", lambda t, w, b: _ask(
        t, "--prompt", "q", "--image", zero_spacing_nifti(t / "flat.nii.gz")), ["--image", "flat.nii.gz", "spacing"]),
    "ask 65 images": ("range", lambda t, w, b: _ask(t, "--prompt", "q", *[a for _ in range(65) for a in (
        "--image", w["volume"])]), ["--image", "65"]),
    # -- import / export
    "import overlapping safetensors ranges": ("silent", lambda t, w, b: [
        "import", "--bagel", _import_edited(t, b, _overlap), "--out", t / "ckpt"], ["ema.safetensors", "overlap"]),
    "import integer token embedding": ("silent", lambda t, w, b: [
        "import", "--bagel", _import_edited(t, b, _integer_embedding), "--out", t / "ckpt"],
        ["ema.safetensors", "embed_tokens", "I32"]),
    "import chunk-mb 0": ("range", lambda t, w, b: ["import", "--bagel", b, "--out", t / "ckpt", "--chunk-mb", "0"],
                          ["--chunk-mb"]),
    "export chunk-mb NaN": ("range", lambda t, w, b: ["export", "--checkpoint", t / "no_checkpoint", "--out",
                                                      t / "exported", "--chunk-mb", "nan"], ["--chunk-mb"]),
    # -- eval, bench, plan, quickstart, ablate, model-info
    "eval steps 1": ("range", lambda t, w, b: ["eval", "--checkpoint", t / "no_checkpoint", "--data", w["data"],
                                               "--steps", "1"], ["--steps"]),
    "eval corrupted record shard": ("traceback", lambda t, w, b: [
        "eval", "--checkpoint", t / "no_checkpoint", "--data", _corrupt_shard(t, w), "--out", t / "report"],
        ["--data", "train-00000.array_record", "corrupt"]),
    "eval cfg-img NaN": ("silent", lambda t, w, b: ["eval", "--checkpoint", t / "no_checkpoint", "--data",
                                                    w["data"], "--cfg-img", "nan"], ["--cfg-img"]),
    "bench peak-tflops NaN": ("silent", lambda t, w, b: ["bench", "--what", "metrics", "--peak-tflops", "nan"],
                              ["--peak-tflops"]),
    "bench lr negative": ("silent", lambda t, w, b: ["bench", "--config", CONFIG, "--what", "train",
                                                     "--config.train.lr=-1"], ["train.lr"]),
    "plan devices 0": ("range", lambda t, w, b: ["plan", "--config", CONFIG, "--devices", "0"], ["--devices"]),
    "plan device-memory-gb inf": ("range", lambda t, w, b: ["plan", "--config", CONFIG, "--device-memory-gb",
                                                            "inf"], ["--device-memory-gb"]),
    "quickstart budget NaN": ("silent", lambda t, w, b: ["quickstart", "--workdir", t / "qs", "--budget-minutes",
                                                         "nan"], ["--budget-minutes"]),
    "quickstart slice-size 0": ("traceback", lambda t, w, b: ["quickstart", "--workdir", t / "qs", "--slice-size",
                                                              "0"], ["--slice-size"]),
    "quickstart workdir is a file": ("traceback", lambda t, w, b: ["quickstart", "--workdir", t / "precious.txt"],
                                     ["--workdir", "precious.txt"]),
    "bench seq-lens not positive": ("traceback", lambda t, w, b: ["bench", "--what", "attention", "--seq-lens",
                                                                  "0,-5"], ["--seq-lens"]),
    "ablate vae-steps 0": ("range", lambda t, w, b: ["ablate", "--workdir", t / "ab", "--vae-steps", "0"],
                           ["--vae-steps"]),
    "model-info heads not dividing hidden": ("traceback", lambda t, w, b: ["model-info", "--config", config_file(
        t / "m.py", "from configs import models\n\ndef get_config(variant=None):\n    c = models.get_config('tiny')\n"
        "    c.vit.num_heads = 5\n    return c\n")], ["m.py", "vit.hidden_size"]),
}
NEEDS_BAGEL = {name for name in CASES if name.startswith("import")}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_before_any_work(case, world, request, tmp_path, capsys):
    _, argv, names = CASES[case]
    bagel = request.getfixturevalue("bagel") if case in NEEDS_BAGEL else None
    (tmp_path / "precious.txt").write_text("existed before")
    args = argv(tmp_path, world, bagel)
    before = checksums(tmp_path), folders(tmp_path), checksums(world["data"])
    code, output = cli(args, capsys)
    assert_refused(code, output, names)
    assert (checksums(tmp_path), folders(tmp_path), checksums(world["data"])) == before, "a refusal wrote files"


def test_cases_cover_every_command_and_kind(world, tmp_path):
    """The table holds at least one case per command of ``--help`` and per kind of issue 30's probes."""
    from synermedgen_jax.__main__ import COMMANDS

    commands = {"import"} if NEEDS_BAGEL else set()
    for i, (name, (_, argv, _)) in enumerate(CASES.items()):
        if name not in NEEDS_BAGEL:
            (tmp_path / str(i)).mkdir()
            commands.add(str(argv(tmp_path / str(i), world, None)[0]))
    assert set(COMMANDS) <= commands, set(COMMANDS) - commands
    assert {kind for kind, _, _ in CASES.values()} == {"traceback", "silent", "hang", "range"}


def test_safetensors_reader_refuses_overlap_and_knows_float_dtypes(tmp_path):
    from synermedgen_jax.port.safetensors_stream import SafetensorsError, SafetensorsReader, TensorSpec, write_streaming

    path = tmp_path / "t.safetensors"
    write_streaming(path, [TensorSpec("a", "F32", (2, 2), lambda: np.ones((2, 2))),
                           TensorSpec("b", "I32", (2, 2), lambda: np.zeros((2, 2)))])
    with SafetensorsReader(path) as reader:
        assert reader.tensors["a"].is_float and not reader.tensors["b"].is_float
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["b"]["data_offsets"] = [8, 24]  # half inside a's [0, 16)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    with pytest.raises(SafetensorsError, match="'a' and 'b' have overlapping byte ranges"):
        SafetensorsReader(path)


def test_check_shards_names_damage_in_both_modes(world, tmp_path):
    """Full mode (sha256 against the manifest) and the large-build mode (each shard's ends decoded) both name a
    shard whose first record is damaged; a sound build passes both."""
    from synermedgen_jax.data.records import ShardError, check_shards

    assert check_shards(world["data"]) == check_shards(world["data"], hash_limit_bytes=0) > 0
    data = _corrupt_shard(tmp_path, world)
    for limit in (2**40, 0):
        with pytest.raises(ShardError, match="train-00000.array_record"):
            check_shards(data, hash_limit_bytes=limit)
    shard = sorted((data / "records").glob("train-*.array_record"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    with pytest.raises(ShardError, match="train-00000.array_record"):
        check_shards(data, hash_limit_bytes=0)


def test_load_volume_names_zero_spacing(tmp_path):
    from synermedgen_jax.data.volumes import DataError, load_volume

    with pytest.raises(DataError, match="flat.nii.gz: header affine gives voxel spacing"):
        load_volume(zero_spacing_nifti(tmp_path / "flat.nii.gz"))


def test_build_config_api_refuses_what_the_cli_refuses(tmp_path):
    """BuildConfig used directly (benchmarks, tests) meets the same checks as the command line."""
    from synermedgen_jax.data.build import BuildConfig, build
    from synermedgen_jax.data.volumes import DataError

    for field, value, name in (("split_fractions", (0.5, 0.5, 0.5), "--split"), ("ct_window", (10.0, -10.0),
                               "--ct-window"), ("records_per_shard", 0, "--records-per-shard"),
                               ("slice_size", 0, "--slice-size"), ("mr_percentiles", (0.0, float("nan")),
                               "--mr-percentiles")):
        with pytest.raises(DataError, match=name):
            build(BuildConfig(source="mni152-sim", out=str(tmp_path / "out"), progress=False, **{field: value}))
    assert not (tmp_path / "out").exists()


SUBPROCESS_CASES = {
    "config syntax error": (["train", "--config", "{t}/broken.py", "--workdir", "{t}/run"],
                            ["broken.py", "syntax error"]),
    "build split not summing to 1": (["build-data", "--source", "mni152-sim", "--out", "{t}/built", "--split",
                                      "0.5", "0.5", "0.5"], ["--split", "sum to 1"]),
    "ask temperature NaN": (["ask", "--checkpoint", "{t}/none", "--prompt", "q", "--temperature", "nan"],
                            ["--temperature"]),
}


@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_real_cli_refuses_in_one_line(case, tmp_path):
    (tmp_path / "broken.py").write_text("def get_config(variant=None):\n    return (\n")
    before = checksums(tmp_path), folders(tmp_path)
    argv, names = SUBPROCESS_CASES[case]
    result = subprocess.run([sys.executable, "-m", "synermedgen_jax", *[a.format(t=tmp_path) for a in argv]],
                            capture_output=True, text=True, timeout=300, cwd=h.REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(h.REPO)})
    assert_refused(result.returncode, result.stdout + result.stderr, names)
    assert (checksums(tmp_path), folders(tmp_path)) == before
