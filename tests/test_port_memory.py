"""Peak resident memory of ``import`` on a synthetic bf16 BAGEL checkpoint: it must stream.

The checkpoint size is ``SMG_PORT_RSS_MB`` (default 1024 MB of bf16 tensors; set e.g. 4096 for "a few GB").
The import runs in a fresh subprocess that records its RSS after the imports (the baseline: Python, JAX, Orbax)
and its peak (``VmHWM``, the high-water mark of its own address space; not ``ru_maxrss``, which Linux carries
over from the parent at exec, so under a big pytest worker it reports the worker's size). Converting to float32
doubles the bytes, so an import that held the checkpoint would peak at ≥ 2× the checkpoint size above the
baseline. The bound asserted is the write chunk plus a few copies of the largest tensor (read buffer, float32
cast, transpose) plus slack for Orbax/tensorstore buffers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from synermedgen_jax.port import keys as K
from synermedgen_jax.port.bagel import llm_config_json, vit_config_json
from synermedgen_jax.port.safetensors_stream import TensorSpec, write_streaming

CHUNK_MB = 64
SLACK_MB = 300


def _config(tiny_config, target_mb: int):
    config = tiny_config.copy_and_resolve_references()
    llm = config.llm
    llm.vocab_size, llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.head_dim = 32768, 1024, 8, 2, 128
    llm.intermediate_size = 2816
    h, kv, i = llm.hidden_size, llm.num_kv_heads * llm.head_dim, llm.intermediate_size
    layer_bytes = 2 * 2 * (2 * h * h + 2 * h * kv + 3 * h * i)  # two experts, bf16
    fixed_bytes = 2 * 2 * llm.vocab_size * h
    llm.num_layers = max(1, round((target_mb * 2**20 - fixed_bytes) / layer_bytes))
    return config


def _write_synthetic(folder, config) -> tuple[int, int]:
    """Writes the folder tensor by tensor; returns (ema + ae bytes, largest tensor's float32 bytes)."""
    folder.mkdir()
    rules = K.build_table(config)
    total, largest = 0, 0
    for kind, dtype, name in (("ema", "BF16", "ema.safetensors"), ("ae", "F32", "ae.safetensors")):
        specs = []
        for index, rule in enumerate(r for r in rules if r.file == kind):
            def produce(shape=rule.bagel_shape, seed=index):  # values do not change the memory profile; cheap
                return np.full(shape, 0.001 * (seed % 97), np.float32)  # ones keep the test within its time budget
            specs.append(TensorSpec(rule.bagel, dtype, rule.bagel_shape, produce))
            size = int(np.prod(rule.bagel_shape))
            total += size * (2 if dtype == "BF16" else 4)
            largest = max(largest, size * 4)
        metadata = {"format": "pt", "synermedgen_vae": json.dumps({"norm_groups": config.vae.norm_groups})}
        write_streaming(folder / name, specs, metadata)
    (folder / "llm_config.json").write_text(json.dumps(llm_config_json(config)))
    (folder / "vit_config.json").write_text(json.dumps(vit_config_json(config)))
    return total, largest


_CHILD = textwrap.dedent("""
    import os, resource, sys, json
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import psutil
    from synermedgen_jax.__main__ import main
    import synermedgen_jax.port.orbax_io, orbax.checkpoint, orbax.checkpoint.experimental.v1  # noqa
    baseline = psutil.Process().memory_info().rss
    rc = main(sys.argv[1:])
    # VmHWM is the high-water mark of this process's own address space. ru_maxrss is not: Linux carries it over
    # from the pre-exec copy of the parent, so under a large parent (a pytest-xdist worker that has run other
    # tests) it reports the parent's size, not the import's.
    status = open("/proc/self/status").read().splitlines()
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024  # kB
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"rc": rc, "baseline": baseline, "peak": peak, "ru_maxrss": ru_maxrss}))
""")


def test_import_peak_rss_stays_near_largest_tensor(tiny_config, tmp_path):
    pytest.importorskip("psutil")
    if sys.platform != "linux":
        pytest.skip("the peak is read from /proc/self/status (VmHWM), which is Linux only")
    target_mb = int(os.environ.get("SMG_PORT_RSS_MB", "1024"))
    config = _config(tiny_config, target_mb)
    total, largest = _write_synthetic(tmp_path / "bagel", config)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, whatever earlier tests in this worker set
    # Fewer glibc malloc arenas: freed blocks of Orbax/tensorstore's worker threads are reused rather than kept per
    # thread, so the peak reflects what the import holds.
    env["MALLOC_ARENA_MAX"] = "2"
    proc = subprocess.run([sys.executable, "-c", _CHILD, "import", "--bagel", str(tmp_path / "bagel"), "--out",
                           str(tmp_path / "ck"), "--dtype", "f32", "--chunk-mb", str(CHUNK_MB)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    mb = 2**20
    peak, growth = report["peak"] / mb, (report["peak"] - report["baseline"]) / mb
    line = (f"peak RSS {peak:.0f} MB ({growth:.0f} MB above the {report['baseline'] / mb:.0f} MB baseline) for a "
            f"{total / mb:.0f} MB checkpoint (bf16; {2 * total / mb:.0f} MB as float32), largest tensor "
            f"{largest / mb:.0f} MB float32, chunk {CHUNK_MB} MB")
    print(line)
    with open(os.environ.get("SMG_PORT_RSS_REPORT", os.devnull), "a") as out:
        out.write(line + "\n")
    bound = CHUNK_MB + 4 * largest / mb + SLACK_MB
    assert growth < bound, line
    if total > 8 * largest:  # meaningful only when no single tensor is a large part of the checkpoint
        assert growth < total / mb, line  # less than the bf16 checkpoint, let alone its float32 copy
