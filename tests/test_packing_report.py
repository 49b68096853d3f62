"""The packing report (``plan --data``, benchmark/packing.py) and ``data/packing.real_counts``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synermedgen_jax.benchmark.packing import SIZE_KEYS, need_vector, simulate
from synermedgen_jax.data.packing import (
    Dropped,
    Geometry,
    PackBudget,
    PackBuilder,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    empty_row,
    real_counts,
    stack_rows,
)
from tests.train_helpers import build_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_data(tmp_path_factory.mktemp("packing_report") / "data")


def _cli(argv: list[str]) -> int:
    from synermedgen_jax.__main__ import main

    return main(argv)


@pytest.mark.parametrize("config", ["configs/stage1_gau.py:tiny", "configs/stage2_ucg.py:tiny"])
def test_report_runs(data, tmp_path, capsys, config):
    out = tmp_path / "report.json"
    assert _cli(["plan", "--data", str(data), "--config", config, "--rows-sampled", "24", "--no-progress",
                 "--json", str(out), "--config.train.rows=4"]) == 0
    text = capsys.readouterr().out
    assert "padding FLOP share" in text and "--config.data.pack.und_tokens=" in text
    result = json.loads(out.read_text())
    assert result["rows_sampled"] == 24 and result["overrides"] == ["--config.train.rows=4"]
    for table in (result["regions"], result["suggested"]["regions"]):
        assert [r["region"] for r in table] == list(SIZE_KEYS)
        assert all(r["fill"] is None or 0.0 <= r["fill"] <= 1.0 for r in table)
    assert 0.0 <= result["padding_flop_share"] < 1.0
    assert all(p["padding_share"] is None or -1e-9 <= p["padding_share"] <= 1.0
               for p in result["flop_parts"].values())
    # Replaying the recorded arrivals through the look-ahead packer gives back the pipeline's rows, so the
    # simulation used for the suggestion is the pipeline's packer; the config's budget is a candidate, so the
    # suggestion is no worse.
    assert result["replay_matches_pipeline"] and result["lookahead"] == 32
    packers = result["packers_simulated"]
    assert packers["next_fit"]["lookahead"] == 1
    assert result["suggested"]["padding_flop_share"] <= packers["lookahead"]["padding_flop_share"] + 1e-12
    budget = result["suggested"]["budget"]
    assert budget["und_tokens"] + budget["gen_tokens"] == result["row_tokens"]
    if "stage1" in config:
        assert budget["gen_tokens"] == 0 and budget["vae_images"] == 0


def test_bad_data_is_one_line(tmp_path, capsys):
    for folder in (tmp_path / "missing", tmp_path):
        assert _cli(["plan", "--data", str(folder), "--config", "configs/stage2_ucg.py:tiny"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --data") and "\n" not in err


def test_stage_without_packs_is_one_line(data, capsys):
    assert _cli(["plan", "--data", str(data), "--config", "configs/vae.py:tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no packs" in err and "\n" not in err


GEOMETRY = Geometry(vit_patch=4, vit_channels=3, vit_max_side=16, vae_channels=3, vae_downsample=2, latent_patch=2,
                    max_latent_size=16)
BUDGET = PackBudget(und_tokens=64, gen_tokens=64, vit_patches=32, vit_images=4, vae_images=4, ce_tokens=16,
                    image_size=(16, 16), vit_image_size=(16, 16))


def _brute_force(sample) -> dict[str, int]:
    """A sample's capacities counted straight from its items (docs/packing.md's table)."""
    count = dict.fromkeys(SIZE_KEYS, 0)
    for item in sample:
        if isinstance(item, Text):
            count["und_tokens"] += len(item.token_ids) + 2
            count["ce_tokens"] += len(item.token_ids) + 1 if item.loss else 0
        elif isinstance(item, VitImage):
            patches = (item.pixels.shape[0] // 4) * (item.pixels.shape[1] // 4)
            count["und_tokens"] += patches + 2
            count["vit_patches"] += patches
            count["vit_images"] += 1
        elif isinstance(item, VaeImage):
            count["und_tokens"] += 2
            count["gen_tokens"] += (item.pixels.shape[0] // 4) * (item.pixels.shape[1] // 4)
            count["vae_images"] += 1
    return count


def test_real_counts_match_brute_force():
    rng = np.random.default_rng(0)
    rows_of_samples = [
        [[Text([5, 6, 7], loss=True), VitImage(np.zeros((8, 8))), VaeImage(np.zeros((16, 16)), noised=True)],
         [Text([5]), Dropped("vae"), VaeImage(np.zeros((8, 12)), noised=True)]],
        [[Text([9, 9], loss=True), VitImage(np.zeros((12, 8))), VitImage(np.zeros((4, 4))),
          VaeImage(np.zeros((16, 8))), VaeImage(np.zeros((16, 16)), noised=True)]],
        [],  # an all-padding row (a batch filled to its static size)
    ]
    builder = PackBuilder(BUDGET, SpecialTokens(1, 2, 3, 4), GEOMETRY)
    rows = []
    for samples in rows_of_samples:
        for sample in samples:
            builder.add(sample, rng)
        rows.append(builder.build() if samples else empty_row(builder))
    batch = stack_rows(rows)
    counts = real_counts(batch, GEOMETRY)
    for r, samples in enumerate(rows_of_samples):
        expected = [_brute_force(s) for s in samples]
        for key in SIZE_KEYS:
            assert counts[key][r] == sum(e[key] for e in expected), (r, key)
        assert counts["samples"][r] == len(samples)
        # one row without the batch axis, and a PackBuilder / a latent stride as the geometry, agree
        single = real_counts(rows[r], builder)
        assert all(single[key] == counts[key][r] for key in counts)
        assert real_counts(rows[r], GEOMETRY.latent_stride)["vae_images"] == counts["vae_images"][r]
    assert counts["mse_tokens"].tolist() == [16 + 6, 16, 0]
    # What the report records per arriving sample is the same count.
    for samples in rows_of_samples:
        for sample in samples:
            assert need_vector(builder, sample).tolist() == [_brute_force(sample)[key] for key in SIZE_KEYS]


def test_simulate_next_fit_and_lookahead():
    inf = float("inf")
    sizes = np.array([[6, 0, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0]])
    caps = (10, 0, inf, inf, inf, inf)
    rows, counts = simulate(sizes, caps, drop_last=False)
    assert rows[:, 0].tolist() == [6, 9, 4] and counts.tolist() == [1, 2, 1]
    rows, counts = simulate(sizes, caps, lookahead=4, drop_last=False)
    assert rows[:, 0].tolist() == [9, 10] and counts.tolist() == [2, 2]
    assert simulate(sizes, (5, 0, inf, inf, inf, inf)) is None  # one sample alone does not fit


def test_vae_encoder_flops_match_xla():
    """``accounting/flops.vae_encode_flops`` (the encoder cost the report counts per VAE slot) vs XLA on the tiny
    VAE encoder: equal to the compiled convolutions + dots (HLO count), within 10 % of cost_analysis (which
    also counts GroupNorm, swish and the softmax: 2.5 % / 6 % more at 32² / 64² here)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from synermedgen_jax.accounting.flops import vae_encode_flops
    from synermedgen_jax.accounting.hlo import compiled_flops, hlo_matmul_flops
    from synermedgen_jax.config import load_config
    from synermedgen_jax.modeling.vae import Encoder

    vae = load_config("configs/stage2_ucg.py:tiny").model.vae
    graph, state = nnx.split(Encoder(vae, rngs=nnx.Rngs(0)))
    encode = jax.jit(lambda s, x: nnx.merge(graph, s)(x))
    for side in (32, 64):
        compiled = encode.lower(state, jax.ShapeDtypeStruct((1, side, side, vae.in_channels), jnp.float32)).compile()
        analytic = vae_encode_flops(vae, side, side)
        assert analytic == pytest.approx(hlo_matmul_flops(compiled.as_text())["with_trips"], rel=1e-6)
        assert analytic == pytest.approx(compiled_flops(compiled), rel=0.10)
