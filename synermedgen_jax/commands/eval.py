"""Evaluate synthesis routes and understanding accuracy of a checkpoint on a built data folder.

  python -m synermedgen_jax eval --checkpoint runs/stage2 --data data/sim [--tasks mni152-sim/brain/t1->t2 ...]
      [--split test] [--steps 50] [--cfg-text 4 --cfg-img 1.5] [--max-slices 16] [--max-instances 32]
      [--out runs/stage2/eval]
  python -m synermedgen_jax eval --checkpoint /models/SynerMedGen --checkpoint /models/UniMedVL --data data/b \
      --out compare/   # one table: copy baseline, SynerMedGen, UniMedVL on the same routes and slices

Each checkpoint runs with its own family's inference defaults (inference/family.py: UniMedVL's guidance 4 / 2,
understanding-then-edit, its resize rules); --cfg-text/--cfg-img/--mode/--family/--vae-resize/--vit-resize
override them for every checkpoint.

Routes (registry tasks, data/routes.py) whose two modalities the split's records hold are evaluated;
the dataset's other routes are listed as absent. --tasks takes task names or dataset names. Per route:
SSIM×100 and PSNR on normalised slices, MAE in native units (HU/SUV) inside the body mask, for the model
and for an identity baseline that copies the source; group averages as the paper groups routes. CTS, MI and
TIA accuracy comes from greedy KV-cached answers (unparseable answers counted). A Stage-I-only checkpoint is
evaluated the same way (zero-shot synthesis).

Writes to --out (default: <checkpoint>/eval): results.md, results.csv, results.json, grids/<task>.png
(source / target / prediction / |error|) and tensorboard scalars in tb/. Bad input: one-line error, exit 2.

  python -m synermedgen_jax eval --metadata metadata.json --predictions OUT --targets DIR [--out DIR]

scores PNG pairs instead (ours or the official script's outputs; no checkpoint): SSIM×100 / PSNR / MAE per
route of <key>.png against DIR/<key>.png (or each entry's 'target' / 'gt' under --image-root); writes
scores.md, scores.csv and scores.json to --out (default: --predictions). A prediction is never stretched: one of
the target's shape is scored as is; one that is the target scaled uniformly (±1 px; an uncropped official output)
is resized back; one that is the target's bounding box scaled uniformly (±1 px per edge; an official output
cropped with getbbox()) is shrunk and placed centred on the box on a zero canvas; any other is skipped, its reason
recorded (scores.json 'skipped', 'counts') and counted in the summary (evaluation/png_pairs.py states the rule).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tqdm import tqdm

from synermedgen_jax.commands._args import (
    int_range,
    non_negative_float,
    non_negative_int,
    one_line_errors,
    positive_int,
)
from synermedgen_jax.commands._runner import request_from
from synermedgen_jax.data.records import ShardError, check_shards
from synermedgen_jax.evaluation import compare
from synermedgen_jax.evaluation.evaluate import EvalConfig, markdown, run_evaluation
from synermedgen_jax.evaluation.png_pairs import markdown as pairs_markdown
from synermedgen_jax.evaluation.png_pairs import score_pairs
from synermedgen_jax.evaluation.png_pairs import write_report as write_pairs_report
from synermedgen_jax.inference import family, loading
from synermedgen_jax.inference.metadata import read_metadata
from synermedgen_jax.inference.sampler import SamplerConfig, inference_mesh


@dataclasses.dataclass(frozen=True)
class EvalRequest(family.FamilyOptions):
    """What ``eval`` scores, typed (its options; quickstart and ablate build one): checkpoints on a built data
    folder. None for a guidance or family option (FamilyOptions): each checkpoint family's default."""

    checkpoints: tuple[str, ...]
    data: str
    out: str | None = None  # default: <checkpoint>/eval; required with several checkpoints
    tasks: tuple[str, ...] = ()
    split: str = "test"
    steps: int = 50
    cfg_text: float | None = None
    cfg_img: float | None = None
    max_slices: int = 16
    max_instances: int = 32
    batch_size: int = 8
    devices: int = 1
    seed: int = 0
    tokenizer: str | None = None  # default: the data's tokenizer.json
    progress: bool = True


# How command_line spells the request's fields that are not --field-name options.
FLAGS = {"checkpoints": "--checkpoint", "progress": "--no-progress"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--workdir", help="training workdir (its latest checkpoint)")
    source.add_argument("--checkpoint", action="append", default=None,
                        help="training workdir, step directory, what import writes, or a BAGEL / SynerMedGen / "
                             "UniMedVL PyTorch folder; repeat it to score several checkpoints on the same routes "
                             "and slices in one table (with the copy baseline)")
    parser.add_argument("--data", help="built data folder (build-data --out)")
    parser.add_argument("--tasks", nargs="+", default=EvalRequest.tasks,
                        help="task or dataset names (default: all present)")
    parser.add_argument("--split", default=EvalRequest.split, help="record split (test)")
    parser.add_argument("--steps", type=int_range(2, 1000), default=EvalRequest.steps,
                        help="flow-matching timesteps (50)")
    parser.add_argument("--cfg-text", type=non_negative_float, default=None,
                        help="text guidance scale (default: each checkpoint family's, 4.0)")
    parser.add_argument("--cfg-img", type=non_negative_float, default=None,
                        help="image guidance scale (default: each checkpoint family's, 1.5; UniMedVL 2.0)")
    parser.add_argument("--max-slices", type=positive_int, default=EvalRequest.max_slices,
                        help="slices per route (16)")
    parser.add_argument("--max-instances", type=non_negative_int, default=EvalRequest.max_instances,
                        help="instances per understanding task (32; 0: skip)")
    parser.add_argument("--batch-size", type=positive_int, default=EvalRequest.batch_size)
    parser.add_argument("--devices", type=positive_int, default=EvalRequest.devices,
                        help="split each sampler batch over this many local devices (1; the batch is rounded up to "
                             "a multiple)")
    parser.add_argument("--seed", type=int, default=EvalRequest.seed)
    parser.add_argument("--out", help="report folder (default: <checkpoint>/eval; required with several "
                                      "--checkpoint: each one's report goes to OUT/<name>/, the table to OUT/)")
    family.add_family_arguments(parser)
    parser.add_argument("--tokenizer", help="tokenizer.json (default: --data's)")
    parser.add_argument("--no-progress", action="store_true")
    group = parser.add_argument_group("PNG pairs (the official metadata convention; no checkpoint needed)")
    group.add_argument("--metadata", help="{key: {id, prompt}} JSON: score <key>.png predictions per route; a "
                                           "prediction of another shape is aligned only when it is the target "
                                           "(±1 px) or the target's bounding box (±1 px per edge) scaled uniformly, "
                                           "else skipped and counted (never stretched)")
    group.add_argument("--predictions", help="folder of <key>.png outputs (synthesize --output-dir or the official "
                                              "script's)")
    group.add_argument("--targets", help="folder of <key>.png targets (default: each entry's 'target' / 'gt' "
                                          "under --image-root)")
    group.add_argument("--image-root", help="folder the entries' paths are relative to")
    one_line_errors(parser)


def _warn_if_untrained_on(inference, data: Path) -> None:
    """A warning (scores are still computed) when --data is another dataset or slice size than the run's."""
    trained = loading._data_manifest(inference.data_dir)
    given = loading._data_manifest(str(data))
    if not trained or not given:
        return
    for key, what in (("source", "dataset"), ("slice_size", "slice size")):
        had = trained.get(key, (trained.get("config") or {}).get(key))
        has = given.get(key, (given.get("config") or {}).get(key))
        if had is not None and has is not None and had != has:
            print(f"warning: --data {data} has {what} {has!r}, the model was trained on {had!r} "
                  f"({inference.data_dir}); the scores are out of distribution", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    if args.metadata:  # PNG pairs per route (evaluation/png_pairs.py)
        return _png_pairs(args)
    checkpoints = tuple(args.checkpoint or ([args.workdir] if args.workdir else []))
    if not checkpoints or not args.data:
        print("error: --workdir/--checkpoint and --data are required (or --metadata with --predictions)",
              file=sys.stderr)
        return 2
    return run(request_from(EvalRequest, args, checkpoints=checkpoints, tasks=tuple(args.tasks),
                            progress=not args.no_progress))


def run(request: EvalRequest) -> int:
    """Scores ``request.checkpoints`` and writes their reports: the typed entry point of ``eval`` (quickstart and
    ablate call it). A bad input is one error line, exit status 2."""
    if len(request.checkpoints) > 1 and not request.out:
        print("error: --out is required with several --checkpoint (OUT/<name>/ per checkpoint, the table in OUT/)",
              file=sys.stderr)
        return 2
    labels = compare.labels_for(list(request.checkpoints))
    reports = {}
    try:
        if request.steps < 2 or request.max_slices < 1 or request.batch_size < 1 or request.devices < 1:
            raise loading.InferenceError("--steps must be >= 2, --max-slices, --batch-size and --devices >= 1")
        data = Path(request.data)
        if not (data / "records").is_dir():
            raise loading.InferenceError(f"--data {data}: not a built data folder (no records/)")
        try:  # a damaged shard named now, not as a Riegeli traceback half-way through the evaluation
            check_shards(data)
        except ShardError as err:
            raise loading.InferenceError(f"--data {data}: {err}") from None
        tokenizer = request.tokenizer or (str(data / "tokenizer.json") if (data / "tokenizer.json").exists()
                                          else None)
        for checkpoint, label in zip(request.checkpoints, labels):
            inference = loading.load_for_inference(checkpoint, tokenizer=tokenizer,
                                                   mesh=inference_mesh(request.devices))
            _warn_if_untrained_on(inference, data)
            settings = family.resolve(inference, request)  # this checkpoint's family defaults, options applied
            config = EvalConfig(split=request.split, tasks=tuple(request.tasks), max_slices=request.max_slices,
                                max_instances=request.max_instances, batch_size=request.batch_size,
                                seed=request.seed, sampler=SamplerConfig(num_steps=request.steps,
                                                                         cfg_text=settings.cfg_text,
                                                                         cfg_img=settings.cfg_img),
                                devices=request.devices, family=settings.family, mode=settings.mode,
                                image_first=bool(settings.image_first), answer_tokens=settings.answer_tokens)
            if len(request.checkpoints) == 1:
                out = Path(request.out) if request.out else Path(checkpoint) / "eval"
            else:
                out = Path(request.out) / label
            bar = tqdm(unit="slice", disable=not request.progress, file=sys.stderr)
            try:
                reports[label] = run_evaluation(inference, str(data), config, out,
                                                progress=lambda name, n, bar=bar: (bar.set_description(name),
                                                                                   bar.update(n)))
            finally:
                bar.close()
            del inference  # one model in memory at a time
            if len(request.checkpoints) == 1:
                print(markdown(reports[label]))
                print(f"report written to {out}")
                return 0
            print(f"{label}: {settings.family} ({settings.mode}), report written to {out}", file=sys.stderr)
        table = compare.compare(reports)
        compare.write_comparison(table, Path(request.out))
    except ValueError as err:  # InferenceError and config checks
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(compare.markdown(table))
    print(f"comparison written to {request.out}/comparison.{{md,csv,json}}")
    return 0


def _png_pairs(args: argparse.Namespace) -> int:
    try:
        if not args.predictions:
            raise ValueError("--metadata needs --predictions DIR (the <key>.png outputs to score)")
        report = score_pairs(read_metadata(args.metadata), args.predictions, targets=args.targets,
                             image_root=args.image_root)
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(pairs_markdown(report))
    if report["skipped"]:  # said on stderr too: these keys are absent from every mean
        print(f"warning: {len(report['skipped'])} prediction(s) skipped: their shape cannot be aligned with the "
              f"target (see scores.json 'skipped')", file=sys.stderr)
    out = Path(args.out) if args.out else Path(args.predictions)
    write_pairs_report(report, out)
    print(f"scores written to {out}/scores.{{md,csv,json}}")
    return 0 if report["keys"] else 1
