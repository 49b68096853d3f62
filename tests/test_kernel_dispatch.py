"""``auto`` kernels (kernels/dispatch.py): one rule, written into the run's config.json and first metrics row,
and the default ``small`` config's compiled programs for GPU and TPU contain the Pallas kernels.

The lowering tests build ``configs/stage2_ucg.py:small`` with no override, resolve it for the target platform
and lower its jitted Stage II train step (``jax.export``, as tests/test_kernels_lowering.py does) and one
sampler step (one Euler step, KV cache, 3-pass CFG) for ``cuda`` and ``tpu`` on one device, then read the
names of the Pallas custom calls in the module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from pathlib import Path

import jax
import pytest
import train_helpers as h
from jax import export

from synermedgen_jax.config import apply_overrides, load_config
from synermedgen_jax.kernels import dispatch

REPO = Path(__file__).resolve().parent.parent
TRITON_CALL = "__gpu$xla.gpu.triton"
ATTENTION_KERNELS = {"packed_attention_fwd", "packed_attention_dq", "packed_attention_dkv"}
FLOW_TRAIN_KERNELS = {"_noise_kernel", "_row_mse_kernel", "_row_mse_grad_kernel"}  # noising, loss fwd, loss bwd


def test_auto_rule_per_platform_and_explicit_choices_kept():
    model = load_config("configs/models.py:small")
    assert (model.attention_impl, model.flow_matching_impl) == ("auto", "auto")  # the default of every variant
    for variant in ("tiny", "bagel_7b_mot"):
        assert load_config(f"configs/models.py:{variant}").attention_impl == "auto"
    expected = {"cpu": (dispatch.CPU_ATTENTION, "reference"), "gpu": ("pallas", "pallas"),
                "cuda": ("pallas", "pallas"), "tpu": ("pallas", "pallas")}
    for platform, impls in expected.items():
        resolved = dispatch.resolve_kernels(model, platform)
        assert (resolved.attention_impl, resolved.flow_matching_impl) == impls, platform
        assert resolved.kernels.attention_requested == "auto"
    gpu = dispatch.resolve_kernels(model, "gpu", mesh_shape={"data": 2, "fsdp": 4, "tensor": 1})
    assert gpu.kernels.summary.startswith("attention: pallas/triton, flow matching: pallas/triton, under shard_map "
                                          "over data×fsdp, heads over tensor")
    assert dispatch.resolve_kernels(model, "tpu").kernels.summary.startswith(
        "attention: pallas/mosaic, flow matching: pallas/mosaic")
    # A run resolved on a GPU resolves again from its request on the machine that loads it.
    assert dispatch.resolve_kernels(gpu, "cpu").attention_impl == dispatch.CPU_ATTENTION
    explicit = model.copy_and_resolve_references()
    explicit.attention_impl, explicit.flow_matching_impl = "xla_dense", "pallas_interpret"
    kept = dispatch.resolve_kernels(explicit, "gpu")
    assert (kept.attention_impl, kept.flow_matching_impl) == ("xla_dense", "pallas_interpret")
    explicit.attention_impl = "fast"
    with pytest.raises(ValueError, match="attention_impl 'fast'"):
        dispatch.resolve_kernels(explicit, "cpu")


def test_readme_names_the_cpu_path():
    readme = (REPO / "README.md").read_text()
    assert f"On CPU, `auto` runs the `{dispatch.CPU_ATTENTION}` attention" in readme


def test_tiny_run_records_its_kernels(tmp_path):
    from synermedgen_jax.training.checkpoint import load_model
    from synermedgen_jax.training.loop import train

    data = h.build_data(tmp_path / "data")
    overrides = {"data.dir": str(data), "train.progress": False, "train.eval_every": 0, "train.steps": 2,
                 "train.rows": 2, "train.checkpoint_every": 2}
    config = apply_overrides(load_config("configs/stage1_gau.py:tiny"), [f"--config.{k}={v}"
                                                                         for k, v in overrides.items()])
    assert config.model.attention_impl == "auto"
    assert train(config, tmp_path / "run") == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    summary = f"attention: {dispatch.CPU_ATTENTION}, flow matching: reference, one device [cpu]"
    assert (saved["attention_impl"], saved["flow_matching_impl"]) == (dispatch.CPU_ATTENTION, "reference")
    assert saved["kernels"] == {"attention_requested": "auto", "flow_matching_requested": "auto",
                                "platform": "cpu", "summary": summary}
    rows = h.read_metrics(tmp_path / "run")
    assert rows[0]["kernels"] == summary and "kernels" not in rows[1]
    # Each step's real-token fractions (issue 29) are those of the batch it trained on: recomputed here with
    # data/packing.real_counts from the same stream (same seed), per region over the step's rows.
    from synermedgen_jax.data.packing import real_counts
    from synermedgen_jax.training.inputs import train_batches

    batches = train_batches(config)
    for step in (0, 1):
        batch = next(batches)
        counts = real_counts(batch, config.model)
        expected = {"und": counts["und_tokens"].sum() / batch["token_ids"].size,
                    "vit": counts["vit_patches"].sum() / batch["vit_image_id"].size,
                    "ce": counts["ce_tokens"].sum() / batch["ce_mask"].size,
                    "tokens": (batch["sample_id"] >= 0).mean()}
        logged = {k.removeprefix("real_frac/"): v for k, v in rows[step].items() if k.startswith("real_frac/")}
        assert logged == pytest.approx(expected), step  # Stage I: no gen / VAE slots, so no such keys
        assert all(0 < v <= 1 for v in logged.values())
    run_config, model = load_model(str(tmp_path / "run"))  # the inference path resolves the same way
    assert run_config.model.attention_impl == model.config.attention_impl == dispatch.CPU_ATTENTION


# ------------------------------------------------------------------------------------------ lowering for GPU / TPU
def _platform_context(platform: str):
    if platform == "tpu":  # Mosaic reads its chip parameters from the abstract mesh's device
        device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
        return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        pytest.skip("jax-cuda12-plugin is not installed: CUDA lowering needs its Triton bindings")
    return contextlib.nullcontext()


def kernel_names(module: str, platform: str) -> list[str]:
    """The kernel name of every Pallas custom call in a StableHLO module (Mosaic: ``kernel_name``, Triton:
    ``name`` in the backend config)."""
    target, pattern = (("tpu_custom_call", r'kernel_name = \\?"(\w+)') if platform == "tpu"
                       else (TRITON_CALL, r'\bname = \\?"(\w+)'))
    names = []
    for line in module.splitlines():
        if "custom_call" in line and target in line:
            found = re.search(pattern, line)
            names.append(found.group(1) if found else "?")
    return names


@pytest.fixture(scope="module")
def small_stage2():
    return load_config("configs/stage2_ucg.py:small")  # no override: the kernels come from "auto"


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_default_small_train_step_lowers_to_the_kernels(small_stage2, platform):
    from flax import nnx

    from synermedgen_jax.data.packing import PackBudget, PackBuilder, SpecialTokens, empty_row
    from synermedgen_jax.modeling.synermedgen import build_model
    from synermedgen_jax.training import optim
    from synermedgen_jax.training import step as step_lib
    from synermedgen_jax.training.loop import resolve_config
    from synermedgen_jax.training.objective import UnifiedObjective

    config = resolve_config(small_stage2)
    config.model = dispatch.resolve_kernels(config.model, platform)
    assert (config.model.attention_impl, config.model.flow_matching_impl) == ("pallas", "pallas")
    make_model = lambda: build_model(config.model, 0)  # noqa: E731
    codec = step_lib.Codec(nnx.eval_shape(make_model), optim.trainable_predicate(config))
    tx = optim.make_optimizer(config.train)
    state = jax.eval_shape(lambda: step_lib.init_state(codec, make_model(), tx, config.train))
    row = empty_row(PackBuilder(PackBudget.from_config(config.data.pack), SpecialTokens(1, 2, 3, 4), config.model))
    batch = {k: jax.ShapeDtypeStruct((2, *v.shape), v.dtype) for k, v in row.items()}
    objective = UnifiedObjective(float(config.train.ce_weight), float(config.train.mse_weight))
    step = jax.jit(step_lib.make_train_step(codec, tx, objective, config.train), donate_argnums=0)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if platform == "cuda" else []
    with _platform_context(platform), dispatch.for_platform(platform):
        exported = export.export(step, platforms=[platform], disabled_checks=checks)(state, batch)
    names = kernel_names(exported.mlir_module(), platform)
    # Attention forward, dq and dk/dv kernels (decoder and ViT) and the three flow-matching kernels of the loss,
    # and no other custom call: nothing on the model's path fell back to a jnp path.
    assert ATTENTION_KERNELS <= set(names), names
    assert FLOW_TRAIN_KERNELS <= set(names), names
    assert set(names) <= ATTENTION_KERNELS | FLOW_TRAIN_KERNELS, names
    assert names.count("packed_attention_fwd") >= config.model.llm.num_layers


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_default_small_sampler_step_lowers_to_the_kernels(small_stage2, platform):
    from flax import nnx

    from synermedgen_jax.data.packing import SpecialTokens
    from synermedgen_jax.inference.sampler import Sampler, SamplerConfig
    from synermedgen_jax.modeling.synermedgen import build_model

    model_config = dispatch.resolve_kernels(small_stage2.model, platform)
    model = nnx.eval_shape(lambda: build_model(model_config, 0))
    pack = small_stage2.data.pack
    sampler = Sampler(model, SpecialTokens(1, 2, 3, 4), tuple(pack.image_size), tuple(pack.vit_image_size),
                      SamplerConfig(num_steps=2))  # one Euler step
    assert sampler.config.step_impl == "pallas"  # the step follows the model's resolved kernels
    jitted = sampler._function

    class ForPlatform:  # Sampler.lower's abstract arguments, lowered for the target instead of this CPU
        def __init__(self, fn):
            self.fn = fn

        def lower(self, *args):
            return self.fn.trace(*args).lower(lowering_platforms=(platform,))

    sampler._function = lambda layouts: ForPlatform(jitted(layouts))
    with _platform_context(platform), dispatch.for_platform(platform):
        module = sampler.lower(1, [5, 6, 7, 8]).as_text()
    names = kernel_names(module, platform)
    assert "packed_attention_fwd" in names and "_step_kernel" in names, names
    assert set(names) <= {"packed_attention_fwd", "_step_kernel"}, names
