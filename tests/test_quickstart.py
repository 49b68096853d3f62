"""README's main command end to end on the tiny variant: data → VAE → Stage I → Stage II → eval → synthesis →
report, then a rerun that resumes (every stage already done) instead of restarting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synermedgen_jax.commands import _stages, quickstart
from synermedgen_jax.commands._runner import config_arguments
from synermedgen_jax.config import ConfigError, apply_overrides, load_config, set_fields, to_json

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--variant", "tiny", "--budget-minutes", "0.5", "--subjects", "3", "--sim-voxel-mm", "8", "--slice-size", "32",
        "--eval-slices", "1", "--sample-steps", "2"]


# The small model's run for the majority check: the default training budget and evaluation, fixed seed.
SMALL_ARGS = ["--seed", "0"]


def _quickstart(workdir: Path, args: list[str] = ARGS, timeout: int = 1200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "synermedgen_jax", "quickstart", "--workdir", str(workdir), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.long
def test_default_small_run_beats_the_copy_on_most_routes(tmp_path):
    """The quickstart's claim, checked with a fixed seed: the small model at the default budget beats the
    copy-the-source baseline on SSIM on more than half of the 18 routes. The run is the default one, not a
    shortened one: at half the training steps (--budget-minutes 9.5 today) the model was above the copy on 5 of
    18 routes (README's quickstart section gives the current run's count). Training and evaluation are
    deterministic for a fixed seed on this machine (two runs, the same table)."""
    workdir = tmp_path / "qs_small"
    run = _quickstart(workdir, SMALL_ARGS, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    synthesis = json.loads((workdir / "eval" / "results.json").read_text())["synthesis"]
    assert len(synthesis) == 18
    margins = {name: row["model"]["ssim"] - row["identity"]["ssim"] for name, row in synthesis.items()}
    better = [name for name, margin in margins.items() if margin > 0]
    table = "\n".join(f"{name}: {margin:+.2f}" for name, margin in sorted(margins.items()))
    assert len(better) > len(synthesis) / 2, f"model above the copy on {len(better)} of 18 routes:\n{table}"
    report = (workdir / "report.md").read_text()
    assert f"Model SSIM above the identity baseline on **{len(better)} of 18** routes." in report


def test_quickstart_end_to_end_and_resume(tmp_path):
    workdir = tmp_path / "qs"
    first = _quickstart(workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((workdir / "quickstart.json").read_text())
    assert list(state["stages"]) == ["data", "vae", "und_pretrain", "stage1", "stage2", "eval", "vae_ceiling",
                                     "synthesize"]
    report = (workdir / "report.md").read_text()
    assert "identity SSIM×100" in report and "## Timings" in report and "contact_sheet.png" in report
    assert "Model SSIM above the identity baseline on" in report
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["synthesis"], "no route evaluated"
    for row in results["synthesis"].values():
        assert -100.0 <= row["model"]["ssim"] <= 100.0 and np.isfinite(row["model"]["mae"])  # SSIM in [-1, 1]
    assert set(results["understanding"]) == {"cts", "mi", "tia"}
    # The identity comparison the report prints, recomputed from the per-route results.
    synthesis = results["synthesis"]
    better = sum(row["model"]["ssim"] > row["identity"]["ssim"] for row in synthesis.values())
    assert len(synthesis) == 18  # every mni152-sim route of the registry
    assert f"Model SSIM above the identity baseline on **{better} of {len(synthesis)}** routes." in report
    # Beating the copy is not asserted for this smoke run (tiny model, 8 VAE / 3 pre-training / 2 Stage I / 26
    # Stage II steps, 32-pixel slices at 8 mm, 2 sampling steps: it synthesizes noise); the claim belongs to the
    # small model's default run and is checked by test_default_small_run_beats_the_copy_on_most_routes.
    for row in synthesis.values():
        assert row["slices"] == 1 and np.isfinite(row["identity"]["ssim"])
    # The ceiling table: the same routes and slices as eval (identity SSIM equal to eval's own), one line each.
    ceiling = json.loads((workdir / "eval" / "vae_ceiling.json").read_text())
    assert sorted(ceiling) == sorted(synthesis)
    for name, row in ceiling.items():
        assert row["slices"] == 1 and abs(row["identity"] - synthesis[name]["identity"]["ssim"]) < 1e-3
        assert -100.0 <= row["local_map"] <= 100.0 and row["fit_pairs"] > 0
        assert (f"| {name} | {synthesis[name]['model']['ssim']:.2f} | {row['reconstruction']:.2f} | "
                f"{row['local_map']:.2f} | {row['identity']:.2f} |") in report
    source = nib.load(workdir / "held_out_t1.nii.gz")
    synthesized = nib.load(workdir / "synthesized_t2.nii.gz")
    assert synthesized.shape == source.shape
    np.testing.assert_allclose(synthesized.affine, source.affine, atol=1e-5)
    assert np.isfinite(synthesized.get_fdata()).all()

    again = _quickstart(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done") == 7  # vae_ceiling is skipped silently
    assert "$ python -m synermedgen_jax train" not in again.stdout


@pytest.mark.parametrize("bad", [["--budget-minutes", "0"], ["--eval-slices", "0"], ["--sample-steps", "1"],
                                 ["--cfg-text", "-1"], ["--cfg-text", "nan"]])
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, capsys, bad):
    from synermedgen_jax.__main__ import main as cli

    workdir = tmp_path / "qs"
    assert cli(["quickstart", "--workdir", str(workdir), *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and bad[0] in err
    assert not workdir.exists()  # nothing built


def _fake_run(directory: Path, stage: str, layers: int) -> str:
    """A workdir holding only a training config.json (no checkpoint)."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"stage": stage, "model": {"llm": {"num_layers": layers}}}))
    return str(directory)


@pytest.mark.parametrize("command", ["quickstart", "ablate"])
def test_und_pretrained_that_is_not_a_finished_pretraining_fails_in_one_line(tmp_path, capsys, command):
    from synermedgen_jax.__main__ import main as cli

    tiny_layers = load_config("configs/und_pretrain.py:tiny").model.llm.num_layers
    cases = {  # --und-pretrained DIR -> what the one line must name
        str(tmp_path / "missing"): "no readable training config.json",
        _fake_run(tmp_path / "stage1_run", "stage1", tiny_layers): "'stage1' run",
        _fake_run(tmp_path / "small_run", "und_pretrain", tiny_layers + 1): "und_pretrain run of the tiny model",
        _fake_run(tmp_path / "no_steps", "und_pretrain", tiny_layers): "holds no complete checkpoint",
    }
    for path, reason in cases.items():
        workdir = tmp_path / f"{command}_work"
        assert cli([command, "--workdir", str(workdir), "--variant", "tiny", "--und-pretrained", path]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1, err
        assert f"--und-pretrained {path}" in err and reason in err, err
        assert not workdir.exists()  # nothing built


@pytest.mark.parametrize("stage", [s[0] for s in quickstart.STAGES])
def test_echoed_command_line_gives_the_config_of_the_typed_call(tmp_path, stage):
    """A stage's typed fields (what quickstart trains with) and the ``--config.KEY=VALUE`` options its echoed
    command line shows give the same config: the log replays the run."""
    _, config_file, steps, rows, init_from = next(s for s in quickstart.STAGES if s[0] == stage)
    fields = _stages.quick_train_fields(tmp_path / "data", steps, rows, 7) | quickstart.STAGE_FIELDS.get(stage, {})
    if init_from:
        fields |= quickstart.init_fields(stage, str(tmp_path / init_from))
    spec = f"{config_file}:tiny"
    typed = to_json(set_fields(load_config(spec), fields))
    assert typed == to_json(apply_overrides(load_config(spec), config_arguments(fields)))
    assert typed != to_json(load_config(spec))


def test_unknown_config_field_is_a_config_error():
    with pytest.raises(ConfigError, match="train.stepz"):
        set_fields(load_config("configs/vae.py:tiny"), {"train.stepz": 3})
