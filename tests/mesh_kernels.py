"""Subprocess body of tests/test_mesh_kernels.py (needs 8 simulated host devices, set before jax starts).

    python tests/mesh_kernels.py numerics   -> prints {"mesh": {"loss": .., "max_grad_diff": ..}} as JSON
    python tests/mesh_kernels.py export     -> prints {"platform/mesh/what": [custom calls]} as JSON

``numerics``: loss and every parameter gradient of the tiny Stage II model with the Pallas kernels (interpret
mode) on three simulated meshes, against the same on one device. ``export``: the jitted sharded Stage II train
step and one sampler step of the default ``small`` config (no override: ``auto`` resolved for the target),
lowered for CUDA (Triton) and TPU (Mosaic) on the same meshes; every kernel custom call is listed with its
operand shapes and whether it sits inside a manual-sharding (``shard_map``) region, next to the sizes the test
expects per device.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

MESHES = {"data2_fsdp4": (2, 4, 1), "fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2)}
ROWS = 8


def stage2_config(impl: str | None, variant: str = "tiny", platform: str | None = None):
    """Stage II of ``variant`` at ROWS rows; ``impl`` forces both kernel switches, None keeps the config's
    ``auto`` and resolves it for ``platform``."""
    from synermedgen_jax.config import load_config
    from synermedgen_jax.kernels import dispatch
    from synermedgen_jax.training.loop import resolve_config

    config = load_config(f"configs/stage2_ucg.py:{variant}")
    if impl is None:
        config.model = dispatch.resolve_kernels(config.model, platform)
    else:
        config.model.attention_impl = config.model.flow_matching_impl = impl
    config.model.vae.sample_posterior = False
    config.train.rows = ROWS
    config.train.ema = 0.0
    return resolve_config(config)


def setup(config, mesh):
    """``(codec, objective, state, shardings, global batch, batch shardings)`` on ``mesh``."""
    from synermedgen_jax import sharding
    from synermedgen_jax.benchmark.train_bench import synthetic_batch
    from synermedgen_jax.data.packing import PackBudget
    from synermedgen_jax.training import loop, optim
    from synermedgen_jax.training import step as step_lib

    make_model, codec, objective = loop.build(config)
    tx = optim.make_optimizer(config.train)
    _, shardings = step_lib.plan_state(codec, make_model, tx, config.train, mesh)
    state = step_lib.create_state(codec, make_model, tx, config.train, shardings)
    local, _ = synthetic_batch(config, PackBudget.from_config(config.data.pack), ROWS, seed=3)
    return codec, objective, tx, state, shardings, sharding.global_batch(local, mesh), sharding.batch_sharding(
        mesh, local)


def loss_and_grads_fn(codec, objective):
    def fn(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 0)
        frozen = state["frozen"]
        full = objective.prepare(codec.model(state["params"], frozen), batch, key)
        totals = objective.totals(full)
        (loss, _), grads = jax.value_and_grad(lambda p: objective.loss(codec.model(p, frozen), full, totals),
                                              has_aux=True)(state["params"])
        return loss, grads
    return fn


def make_mesh(shape, devices=None):
    from synermedgen_jax import sharding

    spec = dict(zip(sharding.MESH_AXES, shape))
    return sharding.make_mesh(spec, devices or jax.devices()[: int(np.prod(shape))])


def numerics() -> dict:
    from synermedgen_jax import sharding

    jax.config.update("jax_default_matmul_precision", "highest")
    config = stage2_config("pallas_interpret")
    results, reference = {}, None
    for name, shape in {"single": (1, 1, 1), **MESHES}.items():
        mesh = make_mesh(shape)
        codec, objective, _, state, shardings, batch, batch_sh = setup(config, mesh)
        # llm2vae starts at zero (as in BAGEL), which zeroes every gradient upstream of it: random values make
        # every parameter's gradient depend on the sharded forward and backward.
        kernel = state["params"]["llm2vae.kernel"]
        state["params"]["llm2vae.kernel"] = jax.device_put(
            0.05 * jax.random.normal(jax.random.key(7), kernel.shape, kernel.dtype), kernel.sharding)
        fn = jax.jit(sharding.traced_on_mesh(loss_and_grads_fn(codec, objective), mesh),
                     in_shardings=(shardings, batch_sh))
        loss, grads = jax.device_get(fn(state, batch))
        if reference is None:
            reference = (loss, grads)
        results[name] = {"loss": float(loss), "grad_norm": float(np.sqrt(sum(np.sum(np.square(g))
                                                                            for g in grads.values()))),
                         "grad_rel_diff": relative_differences(grads, reference[1]),
                         "zero_grads": sorted(n for n, g in reference[1].items() if not np.any(g))}
    return results


def relative_differences(grads: dict, reference: dict) -> dict[str, float]:
    """``{name: max |g − g_ref| / max |g_ref|}`` per parameter: each gradient at its own scale, so a small
    gradient (a norm's, a bias's) cannot hide behind the largest one of the model. A parameter whose reference
    gradient is exactly zero gets its largest absolute difference."""
    out = {}
    for name, ref in reference.items():
        diff = float(np.max(np.abs(np.asarray(grads[name], np.float64) - ref)))
        scale = float(np.max(np.abs(ref)))
        out[name] = diff / scale if scale > 0 else diff
    return out


# ------------------------------------------------------------------------------------------------ export
TRITON_CALL = "__gpu$xla.gpu.triton"
_TENSOR = re.compile(r"tensor<([0-9x]*)(?:x?[a-z]+[0-9]*)")


def kernel_calls(module: str, platform: str) -> list[dict]:
    """Every Pallas custom call of a StableHLO module: its operand shapes and whether it runs inside a
    ``shard_map`` body: in the region of an ``sdy.manual_computation`` op, or in a function called from one."""
    target = "tpu_custom_call" if platform == "tpu" else TRITON_CALL
    manual_functions = manual_bodies(module)
    calls, function = [], None
    for line, manual in _lines_with_manual_flag(module):
        match = re.match(r"\s*func\.func (?:public |private )?@([\w.$-]+)\(", line)
        if match:
            function = match.group(1)
        if "stablehlo.custom_call" in line and target in line:
            signature = line[line.rindex(" : ("):] if " : (" in line else line
            operands = signature.split("->")[0]
            shapes = [tuple(int(d) for d in m.split("x") if d) for m in _TENSOR.findall(operands)]
            calls.append({"function": function, "shapes": shapes, "manual": manual or function in manual_functions})
    return calls


def _lines_with_manual_flag(module: str):
    """``(line, inside a manual_computation region)`` for each line (regions are the lines indented deeper
    than their op, up to the closing brace at the op's own depth)."""
    depths: list[int] = []
    for line in module.splitlines():
        indent = len(line) - len(line.lstrip())
        while depths and line.strip() and indent <= depths[-1] and not line.strip().startswith("}"):
            depths.pop()
        yield line, bool(depths)
        if "sdy.manual_computation(" in line:
            depths.append(indent)


def manual_bodies(module: str) -> set[str]:
    """Functions called (directly or not) from inside a manual region."""
    calls: dict[str, set[str]] = {}
    function, roots = None, set()
    for line, manual in _lines_with_manual_flag(module):
        match = re.match(r"\s*func\.func (?:public |private )?@([\w.$-]+)\(", line)
        if match:
            function = match.group(1)
            calls.setdefault(function, set())
        for callee in re.findall(r"call @([\w.$-]+)", line):
            calls.setdefault(function, set()).add(callee)
            if manual:
                roots.add(callee)
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(calls.get(name, ()))
    return seen


def export_all(platforms=("tpu", "cuda"), meshes=tuple(MESHES)) -> dict:
    """``{"platform/mesh/train|sample": [custom calls], "expect": {...}}`` (CUDA only where the jax CUDA plugin
    is installed)."""
    import importlib.util

    from jax import export

    from synermedgen_jax import sharding
    from synermedgen_jax.kernels import dispatch

    out = {}
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        platforms = [p for p in platforms if p != "cuda"]
    for platform in platforms:
        config = stage2_config(None, "small", platform)
        assert (config.model.attention_impl, config.model.flow_matching_impl) == ("pallas", "pallas"), platform
        model = config.model
        out["expect"] = {"heads": sorted({model.llm.num_heads, model.llm.num_kv_heads, model.vit.num_heads}),
                         "gen_train": int(config.data.pack.gen_tokens)}
        for name in meshes:
            shape = MESHES[name]
            if platform == "tpu":
                device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
                mesh = jax.sharding.AbstractMesh(shape, sharding.MESH_AXES, abstract_device=device,
                                                 axis_types=(jax.sharding.AxisType.Auto,) * 3)
            else:
                mesh = make_mesh(shape)
            train, sample = lowerable_steps(config, mesh)
            out["expect"]["gen_sample"] = int(sample[1][3].shape[1])  # the sampler's noise: [B, Lq, C]
            checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if platform == "cuda" else []
            for what, (fn, args) in {"train": train, "sample": sample}.items():
                context = (jax.sharding.use_abstract_mesh(mesh) if platform == "tpu"
                           else contextlib.nullcontext())
                with context, dispatch.for_platform(platform):
                    exported = export.export(fn, platforms=[platform], disabled_checks=checks)(*args)
                out[f"{platform}/{name}/{what}"] = kernel_calls(exported.mlir_module(), platform)
    return out


def lowerable_steps(config, mesh):
    """The jitted sharded train step and sampler call with abstract sharded arguments on ``mesh``."""
    from flax import nnx

    from synermedgen_jax import sharding
    from synermedgen_jax.benchmark.train_bench import synthetic_batch
    from synermedgen_jax.data.packing import PackBudget, SpecialTokens
    from synermedgen_jax.inference.sampler import Sampler, SamplerConfig
    from synermedgen_jax.modeling.synermedgen import build_model
    from synermedgen_jax.training import loop, optim
    from synermedgen_jax.training import step as step_lib

    make_model, codec, objective = loop.build(config)
    tx = optim.make_optimizer(config.train)
    abstract, shardings = step_lib.plan_state(codec, make_model, tx, config.train, mesh)
    local, _ = synthetic_batch(config, PackBudget.from_config(config.data.pack), ROWS, seed=3)
    batch_sh = sharding.batch_sharding(mesh, local)
    train_fn = step_lib.jit_train_step(step_lib.make_train_step(codec, tx, objective, config.train), shardings,
                                       batch_sh, mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in local.items()}
    train = (train_fn, (step_lib.with_shardings(abstract, shardings), batch))

    pack = config.data.pack
    sampler = Sampler(nnx.eval_shape(lambda: build_model(config.model, 0)), SpecialTokens(1, 2, 3, 4, 0),
                      tuple(pack.image_size), tuple(pack.vit_image_size),
                      SamplerConfig(num_steps=3), mesh=mesh)
    lowered_args = sampler.lowering_args(ROWS, [5, 6, 7])
    return train, lowered_args


def unpartitioned() -> dict:
    """The negative control: the same CUDA export with the model's kernel call sites blind to the mesh (as
    before the mesh path existed), so the test shows it can fail."""
    import importlib

    for module in ("modeling.llm", "modeling.vit", "training.objective", "inference.sampler"):
        importlib.import_module(f"synermedgen_jax.{module}").active_mesh = lambda: None
    return export_all(platforms=("cuda",), meshes=("data2_fsdp4",))


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    modes = {"numerics": numerics, "export": export_all, "unpartitioned": unpartitioned}
    print(json.dumps(modes[sys.argv[1]]()))


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before any mesh is made
    main()
