"""The kernel checks on this machine's GPU/TPU: ``python -m pytest -m gpu tests`` (run it first on a new machine).

Unlike the CPU suite (interpret mode), these compile the real kernels (``impl="pallas"``: Triton on a GPU, Mosaic on
a TPU) and compare them with the jnp references: each kernel forward and backward, and the model's loss and every
gradient; the cases and tolerances are in tests/kernel_checks.py. Fresh random values each run: the seed is in
every failure message, and ``KERNEL_CHECK_SEED=<seed>`` repeats a run.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import pytest
from kernel_checks import attention_case, attention_cases, flow_matching_cases, fm_case, format_row, model_check

pytestmark = pytest.mark.gpu
SEED = int(os.environ.get("KERNEL_CHECK_SEED", int(time.time()) % 100_000))
ATTENTION = attention_cases(quick=False)
FLOW_MATCHING = flow_matching_cases(quick=False)


def _dtype(dtype) -> str:
    return dtype if isinstance(dtype, str) else jnp.dtype(dtype).name


@pytest.fixture(autouse=True)
def accelerator():
    if jax.default_backend() not in ("gpu", "tpu"):
        pytest.skip(f"needs a GPU or TPU; JAX sees {jax.default_backend()}")
    with jax.default_matmul_precision(None):  # each check sets its own precisions; the suite's "highest" is for CPU
        yield


@pytest.mark.parametrize("index", range(len(ATTENTION)), ids=[f"{c[0]} {_dtype(c[6])}" for c in ATTENTION])
def test_attention_kernel_matches_reference(index):
    row = attention_case(*ATTENTION[index], "pallas", SEED + index)
    assert row["ok"], f"seed={SEED} " + format_row(row)


@pytest.mark.parametrize("index", range(len(FLOW_MATCHING)),
                         ids=[f"{c[0]} N{c[1]} C{c[2]} {_dtype(c[3])}" for c in FLOW_MATCHING])
def test_flow_matching_kernel_matches_reference(index):
    row = fm_case(*FLOW_MATCHING[index], "pallas", SEED + 1000 + index)
    assert row["ok"], f"seed={SEED} " + format_row(row)


# "default": float32 matmuls may use TF32 (as training does); "highest": the kernels' own error alone.
@pytest.mark.parametrize(("variant", "precision"), [("small", "default"), ("tiny", "highest")])
def test_model_loss_and_gradients_match_reference(variant, precision):
    lines, failed = model_check(variant, "pallas", precision=precision)
    print("\n".join(lines))
    assert not failed, "\n".join(lines + ["FAILED: " + ", ".join(failed[:10])])
