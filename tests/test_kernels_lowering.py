"""The real (non-interpret) Pallas kernels lower for TPU (Mosaic) and CUDA (Triton) on this CPU machine.

``jax.export`` runs the whole Pallas lowering (block-shape checks, Mosaic / Triton IR generation) for the
target platform without a device. The TPU export runs under an abstract mesh whose abstract device is a
TPU, which is where Mosaic reads its chip parameters; the CUDA export needs the jax CUDA plugin (which
carries the Triton bindings) but no GPU, and lists the Triton custom call in ``disabled_checks`` because
Triton kernels carry no cross-version compatibility guarantee.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from synermedgen_jax.kernels import flow_matching
from synermedgen_jax.kernels.attention.pallas import pallas_packed_attention

TRITON_CALL = "__gpu$xla.gpu.triton"
BATCH, SEQ = 1, 512


def _platform_context(platform: str):
    if platform == "tpu":
        device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
        return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        pytest.skip("jax-cuda12-plugin is not installed (pip install jax-cuda12-plugin==0.10.2 "
                    "jax-cuda12-pjrt==0.10.2, see requirements-test.txt): CUDA lowering needs its Triton bindings")
    return contextlib.nullcontext()


def _export(fn, platform: str, *args):
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if platform == "cuda" else []
    with _platform_context(platform):
        exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    assert exported.serialize()  # the artifact is complete, not just traced
    return exported.mlir_module()


def _kernel_calls(module: str, platform: str) -> int:
    return module.count("tpu_custom_call") if platform == "tpu" else module.count(TRITON_CALL)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim", "dtype"),
                         [(14, 2, 128, jnp.bfloat16), (4, 4, 64, jnp.float32), (16, 16, 72, jnp.bfloat16)])
def test_attention_forward_and_backward_lower(platform, num_q_heads, num_kv_heads, head_dim, dtype):
    backend = "mosaic" if platform == "tpu" else "triton"
    q = jax.ShapeDtypeStruct((BATCH, SEQ, num_q_heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((BATCH, SEQ, num_kv_heads, head_dim), dtype)
    meta = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)

    def attend(q, k, v, sample_id, split_id, split_kind):
        return pallas_packed_attention(q, k, v, sample_id, split_id, split_kind, False, backend=backend)

    def grads(q, k, v, sample_id, split_id, split_kind):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v, sample_id, split_id, split_kind).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    forward = _export(attend, platform, q, kv, kv, meta, meta, meta)
    assert _kernel_calls(forward, platform) == 1
    backward = _export(grads, platform, q, kv, kv, meta, meta, meta)
    assert _kernel_calls(backward, platform) == 3  # forward (for the residuals), dq, dk/dv
    # No dense T x T array anywhere: visibility is computed inside the kernels from the metadata.
    assert not re.search(rf"tensor<(\d+x)*{SEQ}x{SEQ}x", backward)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_flow_matching_kernels_lower(platform):
    backend_impl = "pallas"
    n, c = 256, 64
    x = jax.ShapeDtypeStruct((n, c), jnp.float32)
    t = jax.ShapeDtypeStruct((n,), jnp.float32)
    mask = jax.ShapeDtypeStruct((n,), jnp.float32)
    backend = "mosaic" if platform == "tpu" else "triton"

    def noise_and_loss(x0, noise, pred, t, mask):
        x_t = flow_matching.noised_latents(x0, noise, t, impl=backend_impl, backend=backend)
        loss_grad = jax.value_and_grad(lambda p: flow_matching.velocity_mse_sum(
            p, x0, noise, mask, impl=backend_impl, backend=backend))(pred)
        return x_t, loss_grad

    def step(x, v_cond, v_text, v_img, renorm):
        return flow_matching.cfg_euler_step(x, v_cond, v_text, v_img, 0.5, 0.02, cfg_text=4.0, cfg_img=1.5,
                                            renorm=renorm, impl=backend_impl, backend=backend)

    module = _export(noise_and_loss, platform, x, x, x, t, mask)
    assert _kernel_calls(module, platform) == 3  # noising, loss forward, loss backward
    module = _export(lambda *a: step(*a, "text_channel"), platform, x, x, x, x)
    assert _kernel_calls(module, platform) == 1  # one fused pass
    module = _export(lambda *a: step(*a, "global"), platform, x, x, x, x)
    assert _kernel_calls(module, platform) == 2  # image-wide norms, then the step
