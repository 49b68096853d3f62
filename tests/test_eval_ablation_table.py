"""The ablate command's table, from arms' eval results (results.json as the eval command writes them), and its
argument check. The end-to-end run (every arm trained and evaluated) is too slow for the suite."""

from __future__ import annotations

import argparse
import json

import pytest

from synermedgen_jax.__main__ import main as cli
from synermedgen_jax.commands import ablate


def _results(model: dict[str, float], identity: dict[str, float], accuracy: dict[str, float]) -> dict:
    """A results.json with one route per group: model/identity SSIM×100 equal to the group's value."""
    routes = {"brats": "mni152-sim/brain/t1->t2", "synthrad+autopet": "mni152-sim/brain/t1->ct"}
    synthesis = {routes[g]: {"model": {"ssim": model[g]}, "identity": {"ssim": identity[g]}} for g in model}
    return {"synthesis": synthesis,
            "groups": {"model": {"ssim": model}, "identity": {"ssim": identity}},
            "understanding": {t: {"accuracy": a, "n": 32, "unparseable": 0} for t, a in accuracy.items()}}


def test_table_from_eval_results(tmp_path):
    identity = {"brats": 72.5, "synthrad+autopet": 34.7}
    arms = {"gau": ({"brats": 74.25, "synthrad+autopet": 60.0}, {"cts": 0.5, "mi": 0.25, "tia": 0.75}),
            "none": ({"brats": 70.0, "synthrad+autopet": 20.0}, {})}
    for arm, (model, accuracy) in arms.items():
        (tmp_path / arm / "eval").mkdir(parents=True)
        (tmp_path / arm / "eval" / "results.json").write_text(json.dumps(_results(model, identity, accuracy)))
    table = ablate.collect(tmp_path, list(arms))
    assert table["gau"]["routes_better"] == 2 and table["none"]["routes_better"] == 0
    text = ablate.render(table, argparse.Namespace(variant="tiny", seed=7))
    lines = text.splitlines()
    assert lines[0] == "# Ablation: generation-aligned understanding (variant tiny, seed 7)"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    assert rows[0] == ["arm", "SSIM×100 brats", "SSIM×100 synthrad+autopet", "routes above identity", "cts acc",
                       "mi acc", "tia acc"]
    assert rows[2] == ["gau", "74.25", "60.00", "2 of 2", "0.500", "0.250", "0.750"]
    assert rows[3] == ["none", "70.00", "20.00", "0 of 2", "–", "–", "–"]
    assert rows[4] == ["identity (copy source)", "72.50", "34.70", "", "", "", ""]
    assert all(len(r) == len(rows[0]) for r in rows[2:])


def test_missing_eval_results_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        ablate.collect(tmp_path, ["gau"])


def test_unknown_arm_is_refused_before_any_work(tmp_path, capsys):
    assert cli(["ablate", "--workdir", str(tmp_path / "w"), "--arms", "gau,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
