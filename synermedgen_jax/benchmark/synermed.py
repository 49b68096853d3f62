"""Throughput and memory of ``build-data --source synermed`` on a simulated release (printed, not asserted).

    python -m tools.bench_synermed [--rows 2400] [--workers 2] [--image-size 256] [--keep DIR]

Writes a release in the published layout from the embedded simulation (data/synermed_sim.py; 256x256 PNG
slices like the release's with fresh noise per row, 2-4 images per edit row, three conversations per slice),
builds it with ``--workers`` processes (a subprocess, as a user runs it) while sampling the summed RSS of the
whole process tree every 50 ms, and prints:

* rows/s of the Parquet part and lines/s of the JSONL part (wall clock, and per worker from the units' own
  timings), peak RSS of the build (all processes together, and the largest one);
* the extrapolated wall time for the full release (2,506,240 Parquet rows, ~102 GiB, in 612 row groups) on a
  32-core host (32 workers, assuming the per-worker rate measured here and disk that keeps up; the read rate
  that needs is printed);
* what the in-place alternative would cost: reading one row group (random access to one row means decoding
  its row group) scaled to the release's ~4,096-row groups, against reading one built record; and the JSONL
  line-offset scan an in-place reader needs at start-up, scaled to 7 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from synermedgen_jax.benchmark.report import REPO_ROOT as REPO
from synermedgen_jax.data.records import RecordReader
from synermedgen_jax.data.synermed_sim import write_release

RELEASE_ROWS = 2_506_240
RELEASE_ROW_GROUPS = 612
RELEASE_PARQUET_GIB = 102.0
RELEASE_JSONL_GIB = 7.0


def _tree_rss(pid: int) -> tuple[int, int]:
    import psutil  # optional (not in requirements.txt): only this benchmark reads process memory

    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0, 0
    sizes = []
    for p in procs:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:
            pass
    return sum(sizes), max(sizes, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2400, help="Parquet rows to simulate (2400)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--row-group", type=int, default=256, help="rows per Parquet row group (256)")
    parser.add_argument("--noise", type=float, default=1.0,
                        help="grey-level noise making every row's PNGs unique, like the release's (1)")
    parser.add_argument("--keep", help="write the release and build here instead of a temporary folder")
    args = parser.parse_args()

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_synermed_"))
    root, out = base / "SynerMed", base / "built"
    slices = 24
    started = time.time()
    expected = write_release(root, subjects=1, voxel_mm=4.0, image_size=args.image_size, slices_per_subject=slices,
                             row_group_size=args.row_group, repeat=max(1, args.rows // slices), bad=False,
                             noise=args.noise)
    parquet_bytes = (root / "SynerMed.parquet").stat().st_size
    jsonl_bytes = (root / "SynerMed.jsonl").stat().st_size
    print(f"simulated release: {expected['rows']} Parquet rows ({parquet_bytes / 2**20:.1f} MiB, "
          f"{parquet_bytes / expected['rows'] / 1024:.1f} KiB/row; the release: "
          f"{RELEASE_PARQUET_GIB * 2**30 / RELEASE_ROWS / 1024:.1f} KiB/row), {len(expected['conv_lines'])} JSONL "
          f"lines, {args.image_size}px slices, written in {time.time() - started:.1f} s")

    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "synermedgen_jax", "build-data", "--source", "synermed", "--root", str(root),
           "--out", str(out), "--workers", str(args.workers), "--overwrite", "--no-progress"]
    peak = {"total": 0, "largest": 0}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total, largest = _tree_rss(proc.pid)
            peak["total"], peak["largest"] = max(peak["total"], total), max(peak["largest"], largest)
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    wall = time.time() - t0
    stop.set()
    thread.join()
    if proc.returncode != 0:
        print(output[-3000:])
        return 1
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [json.loads(p.read_text()) for p in sorted((out / "parts").glob("*.json"))]
    edit_s = sum(p["seconds"] for p in parts if p["kind"] == "edit")
    conv_s = sum(p["seconds"] for p in parts if p["kind"] == "conv")
    rows, lines = manifest["counts"]["rows"].get("edit", 0), manifest["counts"]["rows"].get("conv", 0)
    per_worker = rows / edit_s
    print(f"build ({args.workers} workers, {os.cpu_count()} cores): {wall:.1f} s wall in all "
          f"({rows + lines} rows+lines: {(rows + lines) / wall:.0f}/s, process start-up included)")
    print(f"  Parquet edit rows: {per_worker:.0f} rows/s per worker ({edit_s:.1f} worker-s for {rows} rows; "
          f"{args.workers} workers: {per_worker * args.workers:.0f} rows/s)")
    print(f"  JSONL conversations: {lines / conv_s:.0f} lines/s per worker ({conv_s:.1f} worker-s for {lines} lines)")
    print(f"  peak RSS: {peak['total'] / 2**20:.0f} MiB all processes together, largest process "
          f"{peak['largest'] / 2**20:.0f} MiB")
    hours = RELEASE_ROWS / (per_worker * 32) / 3600
    print(f"extrapolated, full release on 32 cores (32 workers): {RELEASE_ROWS:,} rows in {hours:.2f} h "
          f"(~{hours * 60:.0f} min) for the Parquet part, needing "
          f"{RELEASE_PARQUET_GIB * 1024 / (hours * 3600):.0f} MiB/s of disk reads; 2 cores at this rate: "
          f"{RELEASE_ROWS / (per_worker * args.workers) / 3600:.1f} h")

    # In-place alternative: random access to one row = decoding its row group.
    pf = pq.ParquetFile(root / "SynerMed.parquet")
    t = time.time()
    group = pf.read_row_group(min(1, pf.num_row_groups - 1))
    per_group = time.time() - t
    scale = (RELEASE_ROWS / RELEASE_ROW_GROUPS) / group.num_rows
    reader = RecordReader(out, "edit")
    t = time.time()
    for i in range(0, len(reader), max(1, len(reader) // 200)):
        reader[i]
    per_record = (time.time() - t) / len(range(0, len(reader), max(1, len(reader) // 200)))
    print(f"random access to one edit row: built ArrayRecord {per_record * 1e3:.2f} ms; in place, its Parquet row "
          f"group ({group.num_rows} rows here) {per_group * 1e3:.0f} ms -> ~{per_group * scale:.1f} s for a release "
          f"row group of {RELEASE_ROWS // RELEASE_ROW_GROUPS} rows")
    t = time.time()
    with open(root / "SynerMed.jsonl", "rb") as f:
        newlines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
    scan = time.time() - t
    rate = jsonl_bytes / max(scan, 1e-9)
    print(f"JSONL line-offset scan (an in-place reader's start-up): {newlines} lines at {rate / 2**20:.0f} MiB/s -> "
          f"~{RELEASE_JSONL_GIB * 2**30 / rate:.0f} s for 7 GiB (page-cached here; disk-bound in practice)")
    print(f"built folder: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MiB "
          f"(release Parquet {parquet_bytes / 2**20:.1f} MiB, JSONL {jsonl_bytes / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
