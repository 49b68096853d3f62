"""The model trains with the fused Pallas kernels (interpret mode on CPU) exactly as with the jnp references.

The batch, the loss/gradient computation and the per-kernel cases are those of the GPU checks (``pytest -m gpu``,
tests/kernel_checks.py, the check a user runs first on a GPU/TPU machine), so these tests also keep that code
working; here the model's tolerances are the tight ones of float32 on CPU.
"""

from __future__ import annotations

import jax
import numpy as np
from kernel_checks import (
    attention_case,
    attention_cases,
    flow_matching_cases,
    fm_case,
    format_row,
    interpret_sized,
    loss_and_grads,
    packed_batch,
)


def test_pallas_interpret_training_matches_reference(tiny_config):
    reference = tiny_config.copy_and_resolve_references()
    reference.attention_impl = reference.flow_matching_impl = "reference"  # not the configs' "auto"
    reference.vae.sample_posterior = False
    fused = reference.copy_and_resolve_references()
    fused.attention_impl = "pallas_interpret"
    fused.flow_matching_impl = "pallas_interpret"
    seed = int(np.random.SeedSequence().entropy % 2**31)
    batch, budget = packed_batch(reference, image_side=16, samples=2, seed=seed)
    noise = jax.random.normal(jax.random.key(seed), (1, budget.gen_tokens, 16))
    ref_losses, ref_grads = loss_and_grads(reference, batch, noise)
    fused_losses, fused_grads = loss_and_grads(fused, batch, noise)
    assert ref_losses["mse_tokens"] > 0 and ref_losses["ce_tokens"] > 0  # both loss terms are exercised
    for key in ("loss", "ce", "mse"):
        np.testing.assert_allclose(fused_losses[key], ref_losses[key], rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == fused_grads.keys()
    for path, value in ref_grads.items():
        np.testing.assert_allclose(fused_grads[path], value, atol=1e-4, err_msg=path)


def test_gpu_kernel_checks_pass_in_interpret_mode():
    """The GPU checks' quick cases (tests/test_gpu_kernels.py) on CPU in interpret mode, attention at an eighth of
    T: every attention and flow-matching case runs and agrees with its jnp reference within the checks' tolerances."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rows = [attention_case(*case, "pallas_interpret", seed + i)
            for i, case in enumerate(interpret_sized(attention_cases(quick=True)))]
    rows += [fm_case(*case, "pallas_interpret", seed + 1000 + i)
             for i, case in enumerate(flow_matching_cases(quick=True))]
    assert {row["kind"] for row in rows} == {"attention", "flow_matching"} and len(rows) >= 10
    failed = [format_row(row) for row in rows if not row["ok"]]
    assert not failed, f"seed={seed}\n" + "\n".join(failed)
