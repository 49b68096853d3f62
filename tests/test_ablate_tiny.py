"""``ablate`` end to end on the tiny variant: 2 arms × 2 seeds of the zero-shot setting (generic generation
pre-training per seed → Stage I from it → synthesis with no Stage II), the table's mean ± std recomputed from the
per-seed results, the pre-trained generation expert surviving Stage I, a resumed rerun, and then the Stage II
path on the same workdir. Steps, slices and routes are cut to the minimum: the numbers mean nothing, the
machinery is what is checked."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import REPO, env

ROUTES = "mni152-sim/brain/t1->t2,mni152-sim/brain/t1->ct"  # one route of each group
TINY = ["--variant", "tiny", "--subjects", "3", "--sim-voxel-mm", "8", "--slice-size", "32", "--vae-steps", "2",
        "--stage1-steps", "2", "--stage2-steps", "2", "--gen-pretrain-steps", "2", "--und-pretrain-steps", "2",
        "--rows", "2", "--stage2-rows", "2",
        "--eval-slices", "1", "--sample-steps", "2", "--eval-instances", "0", "--eval-tasks", ROUTES,
        "--config.train.checkpoint_every=1000", "--config.train.progress=False"]


def _ablate(workdir, cache, *args: str) -> subprocess.CompletedProcess:
    environment = {**env(cache), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # tiny programs: compiling dominates
    return subprocess.run([sys.executable, "-m", "synermedgen_jax", "ablate", "--workdir", str(workdir), *TINY, *args],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)


def _cells(markdown: str) -> dict[str, dict[str, str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    return {row[0]: dict(zip(rows[0], row)) for row in rows[2:]}


def _gen_side(name: str) -> bool:
    return "_moe_gen" in name or name.split(".")[0] in ("vae2llm", "llm2vae", "time_embedder")


def _weights(path) -> dict[str, np.ndarray]:
    from flax import nnx

    from synermedgen_jax.training.checkpoint import load_model

    _, model = load_model(str(path))
    return {".".join(str(p) for p in k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.long
def test_zero_shot_ablation_with_seeds_then_stage2(tmp_path):
    workdir, cache = tmp_path / "ablate", tmp_path / "xla"
    zero_shot = ["--arms", "gau,none", "--seeds", "0,1", "--mode", "zero-shot"]
    run = _ablate(workdir, cache, *zero_shot)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    for seed in (0, 1):
        for k, arm in enumerate(("gau", "none")):
            assert f"[ablate] seed {seed} · arm {arm} ({2 * seed + k + 1}/4)" in run.stdout

    # The table: mean ± std over the seeds, recomputed from each arm × seed's own eval results.json.
    table = json.loads((workdir / "ablation.json").read_text())
    cells = _cells((workdir / "ablation.md").read_text())
    assert table["seeds"] == [0, 1] and set(table["arms"]) == {"gau", "none"}
    for arm in ("gau", "none"):
        per_seed = table["arms"][arm]["per_seed"]
        assert set(per_seed) == {"0", "1"} and all(per_seed[s]["stage2"] is None for s in per_seed)
        for group in ("brats", "synthrad+autopet"):
            values = []
            for seed in (0, 1):
                results = json.loads((workdir / arm / f"seed{seed}" / "zero_shot_eval" / "results.json").read_text())
                values.append(results["groups"]["model"]["ssim"][group])
                assert per_seed[str(seed)]["zero_shot"]["groups"][group] == values[-1]
            assert cells[arm][f"zero-shot SSIM×100 {group}"] == \
                f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
    # 'none' evaluates the pre-trained generator itself; 'gau' its Stage I checkpoint.
    results = json.loads((workdir / "none" / "seed0" / "zero_shot_eval" / "results.json").read_text())
    assert results["synthesis"] and all(np.isfinite(r["model"]["ssim"]) for r in results["synthesis"].values())
    stages = json.loads((workdir / "ablate.json").read_text())["stages"]
    assert "gau/seed0/zero_shot_stage1" in stages and "gau/seed0/stage2" not in stages
    assert table["wall_s"]["total"] == pytest.approx(sum(s["seconds"] for s in stages.values()), abs=0.5)

    # Every arm of a seed starts from its understanding pre-training: the generic generation pre-training trains
    # the generation side only, so its understanding side is the pre-trained one, unchanged.
    assert "und_pretrain/seed0" in stages and "und_pretrain/seed0" in table["wall_s"]["shared"]
    und_pretrained = _weights(workdir / "und_pretrain" / "seed0")
    pretrained = _weights(workdir / "gen_pretrain" / "seed0")
    und = [n for n in und_pretrained if not _gen_side(n) and not n.startswith("vae.")]
    assert und and all(np.array_equal(und_pretrained[n], pretrained[n]) for n in und)

    # Stage I trained the understanding side only: the generation side is the pre-trained one, unchanged.
    stage1 = _weights(workdir / "gau" / "seed0" / "zero_shot_stage1")
    gen = [n for n in pretrained if _gen_side(n)]
    assert gen and all(np.array_equal(pretrained[n], stage1[n]) for n in gen)
    assert any(not np.array_equal(pretrained[n], stage1[n]) for n in pretrained if not _gen_side(n))

    # Resumable: the same command skips every finished stage and writes the same table.
    before = (workdir / "ablation.md").read_text()
    again = _ablate(workdir, cache, *zero_shot)
    assert again.returncode == 0 and "$ python -m synermedgen_jax train" not in again.stdout
    assert (workdir / "ablation.md").read_text() == before

    # The Stage II path on the same workdir (data and VAE reused): Stage I → Stage II → eval.
    run = _ablate(workdir, cache, "--arms", "gau", "--seeds", "0", "--mode", "stage2")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    table = json.loads((workdir / "ablation.json").read_text())
    row = table["arms"]["gau"]["per_seed"]["0"]
    assert row["zero_shot"] is None and set(row["stage2"]["groups"]) == {"brats", "synthrad+autopet"}
    cells = _cells((workdir / "ablation.md").read_text())
    assert cells["gau"]["SSIM×100 brats"] == f"{row['stage2']['groups']['brats']:.2f}"  # one seed: no ± std
