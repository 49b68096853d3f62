"""bench and plan commands: numbers present and self-consistent (never timed assertions)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from synermedgen_jax.__main__ import main as cli
from synermedgen_jax.accounting.hlo import largest_buffers, peak_live_buffers
from synermedgen_jax.benchmark import peaks
from synermedgen_jax.benchmark.plan_inputs import parse_mesh, scale_budget
from synermedgen_jax.benchmark.report import BenchError, compare, flatten_numbers

REPO = Path(__file__).resolve().parents[1]


def test_plan_tiny_on_4_simulated_devices(tmp_path):
    out = tmp_path / "plan.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "synermedgen_jax", "plan", "--config", "configs/stage2_ucg.py:tiny",
                           "--mesh", "data=1,fsdp=4,tensor=1", "--devices", "4", "--rows", "4",
                           "--devices-per-host", "2", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    for key in ("peak_bytes_per_device", "min_bytes_per_device", "compiled_flops", "analytic_flops", "devices",
                "mesh"):
        assert key in plan, key
    assert plan["devices"] == 4 and plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert plan["environment"]["device_count"] == 4
    assert 0 < plan["min_bytes_per_device"] <= plan["peak_bytes_per_device"]
    memory = plan["memory_per_device"]
    assert memory["argument_bytes"] > 0 and memory["temp_bytes"] > 0
    assert plan["peak_bytes_per_device"] == (memory["argument_bytes"] + memory["output_bytes"]
                                             - memory["alias_bytes"] + memory["temp_bytes"])
    # The trained state is donated: nearly all of the output aliases the arguments.
    assert memory["alias_bytes"] > 0.9 * memory["output_bytes"]
    assert plan["min_bytes_per_device"] == sum(plan["min_parts_per_device"].values())
    # Host memory per process (2 hosts x 2 devices): nothing at init (born on device), this host's shards at
    # restore: at least its devices' shares, less than the whole state (what every host held before).
    host = plan["host_bytes_per_process"]
    assert host["processes"] == 2 and host["devices_per_process"] == 2 and host["init"] == 0
    state_per_device = plan["min_bytes_per_device"] - plan["min_parts_per_device"]["grads"]
    assert 2 * state_per_device * 0.99 >= host["restore"] >= state_per_device
    assert host["restore"] < 0.75 * host["whole_state"]
    # compiled = per device x devices; within bounds of the analytic count (routing: no double expert work)
    assert plan["compiled_flops"] == pytest.approx(plan["compiled_flops_per_device"] * 4)
    assert 0.85 < plan["compiled_flops"] / plan["analytic_flops"] < 1.2
    assert plan["analytic_flops"] == pytest.approx(sum(plan["analytic_parts"].values()))
    assert plan["largest_buffers"] and plan["largest_buffers"][0]["bytes"] > 0
    # Loop bodies are added to XLA's figure (never removed); the peak's buffers come from XLA's live ranges.
    assert plan["compiled_flops"] >= plan["xla_cost_analysis_flops"] > 0
    assert plan["buffers_kind"] == "live at the peak" and plan["peak_live"]["count"] > 0
    assert plan["peak_live"]["bytes"] >= sum(b["bytes"] for b in plan["largest_buffers"])
    assert plan["analytic_model_flops"] > 0
    assert "PEAK" in proc.stdout and "theoretical minimum" in proc.stdout
    # "auto" resolves to the Pallas kernels on the default --target gpu: their CPU stand-ins are compiled, the
    # output says so, and the attention kernel's own working set is added to the per-device figure.
    assert plan["target"] == "gpu" and plan["attention_impl"] == "chunked"
    assert plan["kernels"]["stand_ins"] == {"attention": {"target": "pallas/triton", "compiled": "chunked"},
                                            "flow_matching": {"target": "pallas/triton", "compiled": "reference"}}
    assert plan["kernels"]["summary"].startswith("attention: pallas/triton, flow matching: pallas/triton, under "
                                                 "shard_map over data×fsdp")
    assert "compiling 'chunked' in its place" in proc.stdout
    assert plan["kernel_working_set_bytes_per_device"] == plan["kernel_working_set"]["total"] > 0
    assert plan["per_device_bytes"] == plan["peak_bytes_per_device"] + plan["kernel_working_set_bytes_per_device"]
    # tiny computes in float32: no f32 copy of a bf16 operand, the accelerator-equivalent figure is the same.
    assert plan["f32_copy_bytes_per_device"] == 0
    assert plan["accelerator_equivalent_peak_bytes_per_device"] == plan["per_device_bytes"]
    # The sampler's batch (one slice per data x fsdp shard, 50 CFG steps) is planned on the same mesh.
    sampler = plan["sampler"]
    assert sampler["slices_per_batch"] == 4 and sampler["steps"] == 50
    sampler_memory = sampler["memory_per_device"]
    assert sampler["peak_bytes_per_device"] == (sampler_memory["argument_bytes"] + sampler_memory["output_bytes"]
                                                - sampler_memory["alias_bytes"] + sampler_memory["temp_bytes"])
    # Its arguments hold this device's parameter shard (placed by the same rules as training) plus the packs.
    assert sampler_memory["argument_bytes"] >= sampler["params_bytes_per_device"] > 0
    parts = plan["min_parts_per_device"]
    assert sampler["params_bytes_per_device"] == parts["params_trained"] + parts["params_frozen"]
    assert sampler["compiled_flops_per_batch"] > 0 and sampler["fits_device"]


def test_bench_train_tiny_and_compare(tmp_path, capsys):
    a = tmp_path / "a.json"
    code = cli(["bench", "--config", "configs/stage1_gau.py:tiny", "--what", "train", "--steps", "2", "--warmup",
                "0", "--rows", str(len(__import__("jax").devices())), "--peak-tflops", "1", "--json", str(a)])
    assert code == 0
    result = json.loads(a.read_text())
    train = result["train"]
    for key in ("step_time_s", "tokens_per_s", "tokens_per_s_per_device", "images_per_s", "analytic_flops_per_step",
                "compiled_flops_per_step", "mfu", "memory", "flops_counted_as"):
        assert key in train, key
    assert {"device_kind", "jax", "flax", "git_commit"} <= set(result["environment"]) and result["config_hash"]
    assert len(train["step_times_s"]) == 2
    assert train["step_time_s"] == pytest.approx(statistics.median(train["step_times_s"]))
    assert train["tokens_per_s"] == pytest.approx(train["tokens_per_step"] / train["step_time_s"])
    assert train["tokens_per_s_per_device"] == pytest.approx(train["tokens_per_s"] / train["devices"])
    assert train["images_per_s"] == pytest.approx(train["images_per_step"] / train["step_time_s"])
    assert 0 < train["tokens_per_step"] <= train["slot_tokens_per_step"]
    assert train["mfu"] == pytest.approx(train["analytic_flops_per_step"] / train["step_time_s"]
                                         / (1e12 * train["devices"]))
    assert 0.8 < train["compiled_flops_per_step"] / train["analytic_flops_per_step"] < 1.25
    assert train["memory"]["bytes_in_use"] > 0
    # Per slot vs per real token (issue 29): padding is no work, so the real figures are never above the slot ones.
    fill = train["real_fraction"]["tokens"]
    assert fill == pytest.approx(train["tokens_per_step"] / train["slot_tokens_per_step"]) and 0 < fill < 1
    assert all(0 <= v <= 1 for v in train["real_fraction"].values())
    assert train["tokens_per_s_real"] == train["tokens_per_s"] <= train["tokens_per_s_slots"]
    assert train["mfu_slots"] == train["mfu"]
    assert train["analytic_flops_per_step_real"] < train["analytic_flops_per_step"]  # fill < 1
    assert train["mfu_real"] == pytest.approx(train["analytic_flops_per_step_real"] / train["step_time_s"] / 1e12)
    assert train["mfu_real"] < train["mfu_slots"]
    assert train["analytic_flops_parts_real"]["decoder_attention"] < train["analytic_flops_parts"]["decoder_attention"]
    printed = capsys.readouterr().out
    assert "real fraction of the slots: tokens" in printed
    mfu_line = next(row for row in printed.splitlines() if row.startswith("MFU "))
    assert [float(x) for x in mfu_line.split()[1:]] == pytest.approx([train["mfu_slots"], train["mfu_real"]], rel=1e-3)

    b = tmp_path / "b.json"
    slower = json.loads(a.read_text())
    slower["train"]["step_time_s"] *= 2
    b.write_text(json.dumps(slower))
    capsys.readouterr()
    assert cli(["bench", "--compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    line = next(row for row in printed.splitlines() if row.startswith("train.step_time_s "))
    assert line.split()[-1] == "2"

    # A result written before the per-real fields existed still compares; what it lacks shows as "–".
    old = json.loads(a.read_text())
    for key in [k for k in old["train"] if k.endswith("_real") or k in ("real_fraction", "mfu_slots")]:
        del old["train"][key]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert cli(["bench", "--compare", str(tmp_path / "old.json"), str(a)]) == 0
    printed = capsys.readouterr().out
    line = next(row for row in printed.splitlines() if row.startswith("train.mfu_real "))
    assert line.split()[1] == "–" and line.split()[-1] == "–"
    assert next(row for row in printed.splitlines() if row.startswith("train.mfu ")).split()[-1] == "1"


@pytest.mark.parametrize("variant", ["configs/stage1_gau.py:tiny", "configs/stage2_ucg.py:tiny"])
def test_real_counts_of_bench_packs(variant):
    """The bench's real-token accounting on its synthetic packs: visible pairs match the dense visibility mask,
    the real FLOPs are the slot formula at the real counts (all below the slot figure, attention included)."""
    import numpy as np

    from synermedgen_jax.accounting.flops import analytic_step_flops
    from synermedgen_jax.benchmark import train_bench
    from synermedgen_jax.config import load_config
    from synermedgen_jax.data.packing import PackBudget, real_counts
    from synermedgen_jax.kernels.attention import visibility_mask
    from synermedgen_jax.training.loop import real_fractions

    config = load_config(variant)
    budget = PackBudget.from_config(config.data.pack)
    batch, counts = train_bench.synthetic_batch(config, budget, 2)
    batch["sample_id"][1, :] = -1  # an all-padding row counts nothing
    dense = np.asarray(visibility_mask(batch["sample_id"], batch["split_id"], batch["split_kind"])).sum((1, 2))
    assert train_bench.visible_pairs(batch["sample_id"], batch["split_id"], batch["split_kind"]).tolist() \
        == dense.tolist() and dense[0] > 0 and dense[1] == 0
    for visible_blocks in (False, True):
        real = train_bench.real_step_flops(config.model, budget, batch, visible_blocks)
        slots = analytic_step_flops(config.model, budget, 2, None)
        assert 0 < real["total"] < slots["total"]
        assert all(real["parts"][k] <= slots["parts"][k] for k in slots["parts"])
    # Row 0 alone: the slot formula evaluated at its real counts (dense attention over its real tokens).
    one = {k: v[:1] for k, v in batch.items()}
    row = {k: int(v[0]) for k, v in real_counts(one, config.model).items()}
    at_counts = analytic_step_flops(config.model, PackBudget(
        row["und_tokens"], row["gen_tokens"], row["vit_patches"], row["vit_images"], row["vae_images"],
        row["ce_tokens"], budget.image_size, budget.vit_image_size), 1, None)
    assert train_bench.real_step_flops(config.model, budget, one, False)["total"] == pytest.approx(at_counts["total"])
    # The per-step fractions the training loop logs, from the same counter.
    fractions = real_fractions(batch, config.model)
    assert fractions["real_frac/und"] == pytest.approx(
        real_counts(batch, config.model)["und_tokens"].sum() / (2 * budget.und_tokens))
    assert ("real_frac/gen" in fractions) == (budget.gen_tokens > 0)
    assert all(0 <= v <= 1 for v in fractions.values())


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert cli(["plan", "--mesh", "data=1,fsdp=x", "--devices", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --mesh") and "not an integer" in err and "\n" not in err
    assert cli(["plan", "--mesh", "data=1,fsdp=8,tensor=1", "--devices", "4"]) == 2
    assert "needs 8 devices" in capsys.readouterr().err
    assert cli(["plan", "--mesh", "pipeline=4", "--devices", "4"]) == 2
    assert cli(["bench", "--what", "train,speed"]) == 2
    assert "--what" in capsys.readouterr().err
    assert cli(["bench", "--compare", str(tmp_path / "missing.json"), str(tmp_path / "x.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_plan_compiler_options_reach_xla(tmp_path):
    """The scheduler option must be a real DebugOptions field: an unknown or alias name is silently ignored."""
    import jax
    import jax.numpy as jnp

    from synermedgen_jax.benchmark.plan_compile import compiler_options

    options = compiler_options("cpu", str(tmp_path))
    jax.jit(lambda a: jnp.tanh(a @ a)).lower(jnp.ones((8, 8))).compile(compiler_options=options)
    applied = "".join(p.read_text() for p in tmp_path.glob("*.debug_options"))
    assert "xla_cpu_scheduler_type: CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED" in applied, applied
    assert list(tmp_path.glob("*after_optimizations-live-range.txt"))


def test_f32_copies_of_bf16_operands_are_counted_at_the_peak():
    from synermedgen_jax.accounting.hlo import f32_copy_bytes

    hlo = """%fused_computation.1 (param_0: bf16[4,4]) -> f32[4,4] {
  %param_0 = bf16[4,4]{1,0} parameter(0)
  ROOT %convert.1 = f32[4,4]{1,0} convert(%param_0)
}

%fused_dot (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  ROOT %dot.9 = f32[4,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (p0: bf16[4,4], p1: f32[16,4], p2: f32[4,4]) -> f32[4,4] {
  %p0 = bf16[4,4]{1,0} parameter(0)
  %p1 = f32[16,4]{1,0} parameter(1)
  %p2 = f32[4,4]{1,0} parameter(2)
  %ynn_fusion.1 = f32[4,4]{1,0} fusion(%p2, %p2), kind=kCustom, calls=%fused_dot
  %convert.4 = bf16[4,4]{1,0} convert(%ynn_fusion.1)
  %ynn_fusion.2 = f32[4,4]{1,0} fusion(%p2, %p2), kind=kCustom, calls=%fused_dot
  %wrapped_convert = f32[4,4]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.1
  %all-gather = f32[64,4]{1,0} all-gather(%p1), dimensions={0}
  %convert.2 = f32[4,4]{1,0} convert(%p0)
  %convert.3 = f32[4,4]{1,0} convert(%p2)
  %bitcast.1 = f32[16]{0} bitcast(%convert.2)
  %add.1 = f32[4,4]{1,0} add(%ynn_fusion.2, %p2)
  ROOT %add = f32[4,4]{1,0} add(%wrapped_convert, %convert.2)
}
"""
    live = """  Live ranges at 3 (peak):
    wrapped_convert{}: 64 bytes (cumulative: 64 bytes)
    all-gather{}: 1024 bytes (cumulative: 1088 bytes)
    convert.2{}: 64 bytes (cumulative: 1152 bytes)
    convert.3{}: 64 bytes (cumulative: 1216 bytes)
    bitcast.1{}: 64 bytes (cumulative: 1280 bytes)
    p1{}: 256 bytes (cumulative: 1536 bytes)
    ynn_fusion.1{}: 64 bytes (cumulative: 1600 bytes)
    ynn_fusion.2{}: 64 bytes (cumulative: 1664 bytes)
  Stack trace breakdown for peak usage: 1664 bytes
"""
    found = f32_copy_bytes(live, hlo)
    # the fusion rooted in a bf16 convert, the direct convert and its bitcast: whole; the f32 gather and the f32
    # dot result only converted to bf16: half; not the convert of an f32 value, the parameter, nor the f32 dot
    # result used in f32.
    assert found["converts_of_bf16_bytes"] == 3 * 64 and found["f32_gathers_excess_bytes"] == 512
    assert found["f32_dot_results_excess_bytes"] == 32
    assert found["bytes"] == 3 * 64 + 512 + 32 and found["values"] == 5 and found["live_bytes"] == 1664


def test_helpers():
    assert parse_mesh("fsdp=-1") == {"data": 1, "fsdp": -1, "tensor": 1}
    with pytest.raises(BenchError):
        parse_mesh("data=-1,fsdp=-1")
    assert peaks.lookup("NVIDIA H100 80GB HBM3").bf16_tflops == pytest.approx(989.4)
    assert peaks.lookup("TPU v5 lite").name == "TPU v5e" and peaks.lookup("TPU v6 lite").name == "TPU v6e"
    assert peaks.lookup("cpu") is None and peaks.peak_flops("cpu", 2.0)[0] == 2e12
    from synermedgen_jax.config import load_config
    from synermedgen_jax.data.packing import PackBudget

    budget = PackBudget.from_config(load_config("configs/stage2_ucg.py:bagel_7b_mot").data.pack)
    big = scale_budget(budget, 32768)
    assert big.total_tokens == 32768 and big.gen_tokens == big.vae_images * (budget.gen_tokens // budget.vae_images)
    hlo = ("%fused_computation (p: f32[4]) -> f32[4] {\n  %big = f32[1000,1000]{1,0} add(p, p)\n}\n"
           "ENTRY %main (a: f32[8,8]) -> f32[8,8] {\n  %a = f32[8,8]{1,0} parameter(0)\n"
           "  ROOT %fusion = bf16[64,64]{1,0} fusion(%a), calls=%fused_computation\n}\n")
    names = [b["name"] for b in largest_buffers(hlo)]
    assert names == ["fusion", "a"]  # values inside the fused body are not buffers
    live = ("HloLiveRange (max 9):\n  Live ranges at 7 (peak):\n    fusion{}: 8192 bytes (cumulative: 8192 bytes)\n"
            "    a{}: 256 bytes (cumulative: 8448 bytes)\n  Stack trace breakdown for peak usage: 8448 bytes\n"
            "    a{}: 999 bytes\n")
    peak = peak_live_buffers(live, hlo.replace("calls=%fused_computation", 'metadata={op_name="jit(f)/dot"}'), top=1)
    assert peak["position"] == 7 and peak["bytes"] == 8448 and peak["count"] == 2
    assert peak["buffers"] == [{"name": "fusion", "dtype": "bf16", "shape": [64, 64], "bytes": 8192,
                                "op": "jit(f)/dot"}]
    rows = compare({"x": {"t": 2.0}, "environment": {"n": 1}}, {"x": {"t": 3.0}, "environment": {"n": 2}})
    assert rows == [{"name": "x.t", "a": 2.0, "b": 3.0, "ratio": 1.5}]
    assert flatten_numbers({"r": [{"name": "on", "v": 1}], "flag": True}) == {"r.on.v": 1.0}
