"""The compiled forward+backward does one expert's work per token: XLA's FLOPs ≈ the analytic count."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def test_compiled_flops_match_single_expert_count():
    import model_flops

    result = model_flops.measure("tiny")
    # Elementwise work (norms, softmax, RoPE) is not in the analytic count, so the ratio sits a little above 1;
    # running both experts on every token would put it near 2.
    assert 0.95 <= result["ratio"] <= 1.10, result


@pytest.mark.parametrize("variant,expected", [("tiny", None), ("bagel_7b_mot", 14_658_838_147)])
def test_model_info_command(variant, expected):
    out = subprocess.run([sys.executable, "-m", "synermedgen_jax", "model-info", "--config",
                          f"configs/models.py:{variant}"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "total" in out.stdout
    if expected is not None:
        # BAGEL-7B-MoT: 14,607,260,128 in ema.safetensors (of which 32,241,664 are the two frozen sin-cos
        # tables, not trainable parameters) + 83,819,683 in ae.safetensors (shared/reference).
        assert f"{expected:,d}" in out.stdout
        assert 14_607_260_128 - 32_241_664 + 83_819_683 == expected


def test_cli_lists_unbuilt_commands_plainly():
    out = subprocess.run([sys.executable, "-m", "synermedgen_jax", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert "model-info" in out.stdout and "quickstart" in out.stdout
