"""Throughput benchmarks on the local devices: train step, sampling, attention kernel, data pipeline, metrics.

  --what train      median device-synchronised step time of the real jitted sharded train step (after
                    --warmup steps) over --steps steps on synthetic packs of the config's budget; tokens/s and
                    images/s per device and in total (non-padding tokens), analytic FLOPs per step (MoT with
                    its real token routing; attention dense, or over the visible key blocks when the model
                    uses the Pallas kernel), compiled FLOPs, MFU against the peak table (H100/H200/A100/TPU
                    v4/v5e/v5p/v6e bf16 dense) or --peak-tflops, memory in use; tokens/s and MFU both per slot
                    (padding counted as work) and per real token (FLOPs of each row's real counts), and the
                    packs' real fraction per region
  --what sample     slices/s and ms/slice of the CFG flow-matching sampler (50 steps, 3 passes), KV cache on/off
  --what attention  pallas vs xla_dense vs reference, fwd and fwd+bwd, ms and TFLOP/s (GPU/TPU; on CPU only
                    the block-skip fractions, and the output says why)
  --what data       records/s and packs/s of the data pipeline (--data DIR; a small mni152-sim set is built
                    there when it holds none)
  --what metrics    images/s of the jitted SSIM vs scikit-image

A console table and, with --json OUT, a JSON file with the environment (device kind, jax/flax versions, git
commit, config hash). --compare A.json B.json prints B/A ratios of every numeric field the two files share.

Examples:
  python -m synermedgen_jax bench --config configs/stage2_ucg.py:small --what train --steps 10 --json a.json
  python -m synermedgen_jax bench --compare a.json b.json
"""

from __future__ import annotations

import argparse
import sys

from synermedgen_jax.benchmark import other_bench, train_bench
from synermedgen_jax.benchmark.report import BenchError, compare_text, config_hash, environment, gib, table, write_json
from synermedgen_jax.commands._args import non_negative_int, one_line_errors, positive_float, positive_int
from synermedgen_jax.commands._runner import accept_config_overrides
from synermedgen_jax.config import ConfigError, apply_overrides, load_config

WHATS = ("train", "sample", "attention", "data", "metrics")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/stage2_ucg.py:tiny", help="run config FILE.py[:variant]")
    parser.add_argument("--what", default="train", help=f"comma-separated subset of {','.join(WHATS)}")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps / repeats (default 10)")
    parser.add_argument("--warmup", type=non_negative_int, default=2,
                        help="untimed steps after compilation (default 2)")
    parser.add_argument("--rows", type=non_negative_int, default=0,
                        help="global pack rows per step (default config.train.rows)")
    parser.add_argument("--peak-tflops", type=positive_float, default=None, help="per-device peak TFLOP/s for the MFU")
    parser.add_argument("--slices", type=positive_int, default=2, help="slices per sampler batch (default 2)")
    parser.add_argument("--seq-lens", default="4096,8192,16384", help="attention sequence lengths")
    parser.add_argument("--data", default="/tmp/smg_bench_data", help="built data folder for --what data")
    parser.add_argument("--json", metavar="OUT", help="write the results to this JSON file")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print B/A ratios and exit")
    parser.epilog = (parser.epilog or "") + "\n--config.KEY=VALUE   override any config key (repeatable), as in train"
    accept_config_overrides(parser)
    one_line_errors(parser)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _check(args: argparse.Namespace) -> list[str]:
    whats = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = [w for w in whats if w not in WHATS]
    if not whats or unknown:
        raise BenchError(f"--what {args.what!r}: expected a comma-separated subset of {','.join(WHATS)}")
    if args.steps < 1 or args.warmup < 0 or args.rows < 0 or args.slices < 1:
        raise BenchError("--steps and --slices must be >= 1, --warmup and --rows >= 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise BenchError(f"--peak-tflops must be positive, got {args.peak_tflops}")
    return whats


def _print_train(r: dict) -> None:
    print(f"train step: {r['rows']} rows on {r['devices']} device(s) {r['mesh']}, median of {r['steps']} steps "
          f"after {r['warmup']} warm-up (compile {r['compile_s']:.1f} s)")
    # Per slot: every pack slot counted as work, padding included (what the step costs); per real: only the
    # packs' real contents (what the step achieved). Side by side so a half-padding pack cannot pass for work.
    devices = r["devices"]
    rows = [{"k": "step time (s)", "v": r["step_time_s"]},
            {"k": "tokens / step", "v": r["slot_tokens_per_step"], "r": r["tokens_per_step"]},
            {"k": "tokens/s total", "v": r["tokens_per_s_slots"], "r": r["tokens_per_s_real"]},
            {"k": "tokens/s per device", "v": r["tokens_per_s_slots"] / devices, "r": r["tokens_per_s_per_device"]},
            {"k": "images/s total", "v": r["images_per_s"]},
            {"k": "images/s per device", "v": r["images_per_s_per_device"]},
            {"k": "analytic FLOPs / step", "v": r["analytic_flops_per_step"], "r": r["analytic_flops_per_step_real"]},
            {"k": "compiled FLOPs / step (XLA)", "v": r["compiled_flops_per_step"]},
            {"k": "achieved TFLOP/s per device", "v": r["achieved_tflops_per_device"],
             "r": r["achieved_tflops_per_device_real"]},
            {"k": "MFU", "v": r["mfu_slots"], "r": r["mfu_real"]},
            {"k": f"memory ({r['memory']['source']})", "v": gib(r["memory"]["bytes_in_use"])}]
    for row in rows:  # single figures (not per slot / per real) leave the real column empty
        row.setdefault("r", "")
    print(table(rows, [("k", "train"), ("v", "slots"), ("r", "real")]))
    fractions = ", ".join(f"{name} {value:.3f}" for name, value in r["real_fraction"].items())
    print(f"  real fraction of the slots: {fractions}")
    print(f"  FLOPs counted as: {r['flops_counted_as']}")
    print(f"  real FLOPs: {r['flops_real_counted_as']}")
    print(f"  peak: {r['peak_source']}")


def main(args: argparse.Namespace) -> int:
    if args.compare:
        try:
            print(compare_text(*args.compare))
        except BenchError as err:
            return _error(str(err))
        return 0
    try:
        whats = _check(args)
        seq_lens = [int(s) for s in args.seq_lens.split(",") if s.strip()]
        if not seq_lens or min(seq_lens) < 1:
            raise ValueError("expected comma-separated positive lengths")
    except ValueError as err:  # BenchError is a ValueError; int() failures land here too
        return _error(str(err) if isinstance(err, BenchError) else f"--seq-lens {args.seq_lens!r}: {err}")

    try:
        config = apply_overrides(load_config(args.config), list(getattr(args, "overrides", None) or []))
    except (ConfigError, ValueError) as err:
        return _error(str(err))
    if ("train" in whats or "sample" in whats) and "train" not in config:
        return _error(f"{args.config}: train/sample benches need a run config (configs/stage2_ucg.py, ...)")
    result = {"command": "bench", "config": args.config, "overrides": list(getattr(args, "overrides", None) or []),
              "config_hash": config_hash(config),
              "environment": environment(), "what": whats}
    try:
        if "train" in whats:
            result["train"] = train_bench.bench_train(config, steps=args.steps, warmup=args.warmup, rows=args.rows,
                                                      peak_tflops=args.peak_tflops)
            _print_train(result["train"])
        if "sample" in whats:
            r = result["sample"] = train_bench.bench_sample(config, steps=args.steps, warmup=args.warmup,
                                                            slices=args.slices)
            print(f"\nsampling ({r.get('num_steps')} steps, CFG {r.get('cfg')}):")
            print(r["skipped"] if "skipped" in r else table(r["results"], [
                ("name", "sampler"), ("slices_per_s", "slices/s"), ("ms_per_slice", "ms/slice"),
                ("first_call_s", "first call s")]))
        if "attention" in whats:
            r = result["attention"] = other_bench.bench_attention(seq_lens, args.steps)
            print("\nattention:")
            if "timings" in r:
                print(table(r["timings"], [(k, k) for k in r["timings"][0]]))
            else:
                print(table(r["block_fractions"], [(k, k) for k in r["block_fractions"][0]]))
                print(f"  skipped: {r['skipped']}")
        if "data" in whats:
            r = result["data"] = other_bench.bench_data(args.data, config.get("model", config).variant
                                                        if config.get("model", config).variant in ("tiny", "small")
                                                        else "small", rows=max(args.steps, 5), records=200)
            print(f"\ndata ({r['data_dir']}): records/s {r['records_per_s']:.1f}, packs/s {r['packs_per_s']:.2f}, "
                  f"samples/s {r['samples_per_s']:.1f}")
        if "metrics" in whats:
            print()
            result["metrics"] = other_bench.bench_metrics(16, 128, max(1, min(args.steps, 5)))
    except BenchError as err:
        return _error(str(err))
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return 0
