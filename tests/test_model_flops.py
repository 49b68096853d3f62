"""The compiled forward+backward does one expert's work per token: XLA's FLOPs ≈ the analytic count."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_compiled_flops_match_single_expert_count():
    from synermedgen_jax.benchmark import model_flops

    result = model_flops.measure("tiny")
    # Elementwise work (norms, softmax, RoPE) is not in the analytic count, so the ratio sits a little above 1;
    # running both experts on every token would put it near 2.
    assert 0.95 <= result["ratio"] <= 1.10, result


def test_model_info_command():
    out = subprocess.run([sys.executable, "-m", "synermedgen_jax", "model-info", "--config",
                          "configs/models.py:tiny"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "language_model" in out.stdout and "total" in out.stdout


def test_bagel_7b_mot_parameter_count_matches_release():
    from flax import nnx

    from synermedgen_jax.config import load_config
    from synermedgen_jax.modeling.synermedgen import SynerMedGen, count_params

    config = load_config("configs/models.py:bagel_7b_mot")
    counts = count_params(nnx.eval_shape(lambda: SynerMedGen(config, rngs=nnx.Rngs(params=0))))
    # The released checkpoint (docs/architecture.md): 14,607,260,128 in ema.safetensors, of which 32,241,664 are the two
    # frozen sin-cos tables (not trainable Params here), and 83,819,683 in ae.safetensors.
    assert counts["vae"] == 83_819_683
    assert counts["total"] - counts["vae"] == 14_607_260_128 - (4900 + 64 * 64) * 3584


def test_cli_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "synermedgen_jax", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert "model-info" in out.stdout and "quickstart" in out.stdout
