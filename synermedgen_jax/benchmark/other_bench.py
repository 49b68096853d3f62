"""Attention kernel, data pipeline and metrics benchmarks for the `bench` command: adapters over
benchmark/attention.py, benchmark/metrics.py and the data pipeline, returning JSON-ready dicts."""

from __future__ import annotations

from pathlib import Path

import jax

from synermedgen_jax.benchmark import attention as attention_bench
from synermedgen_jax.benchmark import metrics as metrics_bench
from synermedgen_jax.benchmark.data import build_if_missing, pack_budget, packs_per_s, records_per_s
from synermedgen_jax.config import load_config
from synermedgen_jax.data.pipeline import PipelineConfig
from synermedgen_jax.data.records import RecordReader
from synermedgen_jax.kernels.attention.pallas import BlockSizes
from synermedgen_jax.stages import DataStage


def bench_attention(seq_lens: list[int], repeats: int) -> dict:
    """pallas vs xla_dense vs reference, forward and forward+backward (ms, TFLOP/s) on GPU/TPU; on CPU only
    the block-skip fractions, with the reason the timings are skipped."""
    if jax.default_backend() in ("gpu", "cuda", "tpu"):
        rows = attention_bench.timing_report(seq_lens, repeats, ("pallas", "xla_dense", "reference"))
        return {"name": "attention", "timings": rows}
    sizes = {"triton_128x64": BlockSizes(128, 64, 64, 64), "mosaic_256": BlockSizes(256, 256, 256, 256)}
    skips = attention_bench.skip_report(min(seq_lens), sizes)
    return {"name": "attention", "block_fractions": skips,
            "skipped": "timings of pallas / xla_dense / reference need a GPU or TPU: on CPU the Pallas kernel only "
                       "runs in interpret mode (a Python-level emulation whose time says nothing about the kernel), "
                       "so only the fraction of key blocks the kernel computes is reported"}


def bench_metrics(n: int, size: int, repeats: int) -> dict:
    """Images/s of the jitted batched SSIM vs a scikit-image loop (benchmark/metrics.py); prints the row."""
    row = metrics_bench.measure(n, size, repeats)
    metrics_bench.print_table([row])
    return {"name": "metrics", **row}


def bench_data(data_dir: str, variant: str, rows: int, records: int) -> dict:
    """Records/s (random read + decode) and packs/s (samples → packed rows, in-process) of the Grain
    pipeline over a built dataset; builds a small mni152-sim one first when ``data_dir`` has none."""
    data = Path(data_dir)
    built = build_if_missing(data, subjects=2, slice_size=64)
    n, records_s = records_per_s(RecordReader(data, "train"), records)
    config = PipelineConfig(stage=DataStage.MIXED, rows_per_batch=1, workers=0, augment=True, process_index=0,
                            process_count=1)
    packs_s, samples_s = packs_per_s(data, pack_budget(variant, 64), load_config(f"configs/models.py:{variant}"),
                                     config, rows)
    return {"name": "data", "data_dir": str(data), "built_now": built, "records_read": n,
            "records_per_s": records_s, "packs": rows, "packs_per_s": packs_s, "samples_per_s": samples_s,
            "budget_variant": variant, "workers": 0}
