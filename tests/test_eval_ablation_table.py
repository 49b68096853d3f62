"""The ablate command's table from arms' per-seed eval results (results.json as the eval command writes them):
mean ± std over seeds recomputed here, and the argument checks (one-line errors, exit 2, before any work). The
tiny end-to-end run is tests/test_ablate_tiny.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synermedgen_jax.__main__ import main as cli
from synermedgen_jax.commands import ablate

ROUTES = {"brats": "mni152-sim/brain/t1->t2", "synthrad+autopet": "mni152-sim/brain/t1->ct"}
IDENTITY = {"brats": 72.5, "synthrad+autopet": 34.7}


def _results(model: dict[str, float], accuracy: dict[str, float]) -> dict:
    """A results.json with one route per group: model/identity SSIM×100 equal to the group's value."""
    synthesis = {ROUTES[g]: {"model": {"ssim": model[g]}, "identity": {"ssim": IDENTITY[g]}} for g in model}
    understanding = {t: {"accuracy": a, "n": 32, "unparseable": 0} for t, a in accuracy.items()}
    if "mi" in understanding:
        understanding["mi"]["panel_accuracy"] = accuracy["mi"] + 0.25
    return {"synthesis": synthesis, "groups": {"model": {"ssim": model}, "identity": {"ssim": IDENTITY}},
            "understanding": understanding}


def _write(path, results: dict) -> None:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results))


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_mean_and_std_over_seeds(tmp_path):
    rng = np.random.default_rng(0)
    seeds = [0, 1, 2]
    expected = {}
    for arm in ("gau", "none"):
        for seed in seeds:
            model = {g: float(rng.uniform(60, 80)) for g in ROUTES}
            zero = {g: float(rng.uniform(20, 40)) for g in ROUTES}
            accuracy = {t: float(rng.uniform(0, 0.7)) for t in ("cts", "mi", "tia")} if arm == "gau" else {}
            _write(tmp_path / arm / f"seed{seed}" / "eval", _results(model, accuracy))
            _write(tmp_path / arm / f"seed{seed}" / "zero_shot_eval", _results(zero, {}))
            expected.setdefault(arm, []).append((model, zero, accuracy))
    stages = {f"{arm}/seed{s}/stage2": {"seconds": 10.0 + s} for arm in ("gau", "none") for s in seeds}
    stages.update({"vae": {"seconds": 5.0}, "gen_pretrain/seed0": {"seconds": 7.0}, "other/old": {"seconds": 99.0}})
    table = ablate.collect(tmp_path, ["gau", "none"], seeds, ["gau", "none"], "both", stages)
    table.update(variant="tiny", seeds=seeds, mode="both")
    rows = _rows(ablate.render(table))
    assert rows[0] == ["arm", "SSIM×100 brats", "SSIM×100 synthrad+autopet", "routes above copy",
                       "zero-shot SSIM×100 brats", "zero-shot SSIM×100 synthrad+autopet", "zero-shot routes above copy",
                       "CTS acc %", "MI panel acc %", "TIA acc %", "wall s"]
    for r, arm in ((2, "gau"), (3, "none")):
        cells = dict(zip(rows[0], rows[r]))
        assert cells["arm"] == arm
        for g in ROUTES:
            for column, k in ((f"SSIM×100 {g}", 0), (f"zero-shot SSIM×100 {g}", 1)):
                values = [e[k][g] for e in expected[arm]]
                assert cells[column] == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
        better = [sum(e[0][g] > IDENTITY[g] for g in ROUTES) for e in expected[arm]]
        assert cells["routes above copy"] == f"{np.mean(better):.1f} ± {np.std(better, ddof=1):.1f} of 2"
        for column, task, shift in (("CTS acc %", "cts", 0), ("MI panel acc %", "mi", 0.25), ("TIA acc %", "tia", 0)):
            values = [100 * (e[2][task] + shift) for e in expected[arm] if e[2]]
            assert cells[column] == (f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}" if values else "–")
        assert cells["wall s"] == f"{sum(10.0 + s for s in seeds):.0f}"
    assert rows[4][:3] == ["identity (copy source)", "72.50", "34.70"]
    assert table["wall_s"]["shared"] == {"vae": 5.0, "gen_pretrain/seed0": 7.0}  # another run's stage is left out
    assert table["wall_s"]["total"] == pytest.approx(2 * sum(10.0 + s for s in seeds) + 12.0)
    assert json.loads(json.dumps(table, allow_nan=False)) == table  # the .json is plain JSON


def test_one_seed_shows_the_mean_alone():
    assert ablate.mean_std([3.0]) == {"mean": 3.0, "std": None, "n": 1}
    assert ablate._cell(ablate.mean_std([3.0])) == "3.00"
    assert ablate.mean_std([None, 1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}


def test_missing_eval_results_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        ablate.collect(tmp_path, ["gau"], [0], [], "stage2", {})


@pytest.mark.parametrize("argv, message", [
    (["--arms", "gau,bogus"], "bogus"),
    (["--arms", "gau,gau"], "twice"),
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "1,1"], "distinct"),
    (["--seeds", ""], "--seeds"),
    (["--arms", "gau,none", "--zero-shot-arms", "vqa"], "--zero-shot-arms"),
    (["--arms", "no_mi", "--mode", "zero-shot"], "no zero-shot arm"),
    (["--stage1-steps", "0"], "--stage1-steps"),
    (["--data", "/nonexistent/data"], "--data"),
    (["--variant", "huge"], "huge"),
    (["--config.train.bogus=1"], "bogus"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, argv, message):
    assert cli(["ablate", "--workdir", str(tmp_path / "w"), "--variant", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "w").exists()


def test_bad_mode_is_an_argparse_error(tmp_path, capsys):
    assert cli(["ablate", "--workdir", str(tmp_path / "w"), "--mode", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --mode: invalid choice: 'nope'") and "\n" not in err
    assert not (tmp_path / "w").exists()
