"""The model trains with the fused Pallas kernels (interpret mode on CPU) exactly as with the jnp references.

The batch and the loss/gradient computation are those of ``python -m tools.check_model_kernels`` (the check a user runs
first on a GPU/TPU machine), so this test also keeps that tool working; here the tolerances are the tight ones of
float32 on CPU.
"""

from __future__ import annotations

import jax
import numpy as np

from synermedgen_jax.benchmark.model_kernel_check import loss_and_grads, packed_batch


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


def test_gpu_kernel_check_tool_runs_in_interpret_mode(tmp_path):
    """README's per-kernel GPU check (python -m tools.gpu_kernel_check) on CPU in interpret mode (--quick): every
    attention and flow-matching case runs and agrees with its jnp reference within the tool's tolerances."""
    import json

    from synermedgen_jax.benchmark import kernel_check

    out = tmp_path / "rows.json"
    assert kernel_check.main(["--interpret", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["kind"] for row in rows} == {"attention", "flow_matching"}
    assert all(row["ok"] for row in rows) and len(rows) >= 10
