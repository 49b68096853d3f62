"""The main job on the embedded default, end to end, in about 20 minutes on 2 CPU cores.

  python -m synermedgen_jax quickstart [--workdir runs/quickstart] [--budget-minutes 19]

Stages (each resumable: running the command again continues where it stopped, finished stages are skipped):
  1. build the mni152-sim data (simulated subjects from nilearn's MNI152 template) + a contact sheet PNG;
  2. stage 0: train the small VAE on it;
  3. understanding pre-training (configs/und_pretrain.py): in-context lookups and captions, the stand-in for the
     Qwen2.5 + SigLIP start of BAGEL's Stage I;
  4. Stage I (GAU): CTS + MI + TIA understanding, from the pre-training;
  5. Stage II (UCG): flow matching, initialised from Stage I (understanding copied into the generation expert);
  6. evaluate every available route (SSIM×100 / PSNR / MAE next to the identity baseline) and the
     understanding accuracies; score the VAE's own reconstruction of the same targets (the ceiling of any
     synthesis through it) and a local latent map fitted on the training pairs (a yardstick for Stage II);
  7. synthesize one whole held-out NIfTI volume;
  8. write WORKDIR/report.md with the tables, timings per stage and the pictures beside it.

--budget-minutes scales every stage's step count (the defaults take ~19 minutes alone on 2 cores); the seed is fixed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from synermedgen_jax.commands import _stages
from synermedgen_jax.commands._args import (
    float_range,
    int_range,
    non_negative_float,
    one_line_errors,
    positive_float,
    positive_int,
)
from synermedgen_jax.commands._runner import StageState
from synermedgen_jax.commands.eval import EvalRequest
from synermedgen_jax.commands.synthesize import SynthesisRequest
from synermedgen_jax.config import load_config
from synermedgen_jax.data import phantom
from synermedgen_jax.data.build import BuildConfig
from synermedgen_jax.evaluation.ceiling import route_ceilings
from synermedgen_jax.evaluation.report_io import read_results
from synermedgen_jax.inference.sampler import SamplerConfig
from synermedgen_jax.staging import atomic_path, write_atomic
from synermedgen_jax.training import checkpoint

# Steps per stage at the default budget (BASE_MINUTES, the default run's wall time alone on 2 cores), and the batch
# of each step (the VAE's counts images, the others pack rows): the VAE gets enough steps to bound synthesis well,
# Stage II the rest. Timings and the runs behind these numbers: docs/experiments.md.
BASE_MINUTES = 19.0
UND_PRETRAIN_STEPS = 100
STAGES = (
    # name, config file, steps at the base budget, rows per step, the stage it is initialised from
    ("vae", "configs/vae.py", 300, 4, None),
    ("und_pretrain", "configs/und_pretrain.py", UND_PRETRAIN_STEPS, 4, None),
    ("stage1", "configs/stage1_gau.py", 60, 4, "und_pretrain"),
    ("stage2", "configs/stage2_ucg.py", 1000, 4, "stage1"),  # small's Stage II rows hold about two samples each
)
# Short runs end on an annealed learning rate; Stage II takes more, smaller steps at a higher peak (the model is
# far from converged at this budget). Text guidance 1.5, not BAGEL's 4, scored best on the val split; image
# guidance stays at BAGEL's 1.5. The runs: docs/experiments.md.
CFG_TEXT = 1.5
STAGE_FIELDS = {"stage2": {"train.schedule": "cosine", "train.lr": 2e-3}}


def init_fields(stage: str, init_dir: str) -> dict[str, object]:
    """How a stage starts from the one before it. Stage II (from scratch, no pretrained generator) copies Stage I's
    trained understanding expert over its generation expert; the other stages load the checkpoint as it is."""
    if stage == "stage2":
        return {"init_from": init_dir, "init_moe": True, "init_moe_overwrite": True}
    return {"init_from": init_dir}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/quickstart", help="everything is written here (resumable)")
    parser.add_argument("--budget-minutes", type=positive_float, default=BASE_MINUTES,
                        help="scales the training steps of every stage (default 19: about 19 minutes alone on 2 cores)")
    parser.add_argument("--subjects", type=positive_int, default=8, help="simulated subjects (default 8)")
    parser.add_argument("--eval-slices", type=positive_int, default=4, help="slices evaluated per route (default 4)")
    parser.add_argument("--sample-steps", type=int_range(2, 1000), default=12,
                        help="flow-matching steps at evaluation (default 12)")
    parser.add_argument("--cfg-text", type=non_negative_float, default=CFG_TEXT,
                        help=f"text guidance scale of eval and synthesis (default {CFG_TEXT}; BAGEL's is 4)")
    parser.add_argument("--variant", default="small", choices=("small", "tiny"),
                        help="model variant (small; tiny is for smoke tests)")
    parser.add_argument("--slice-size", type=int_range(8, 4096), default=64, help="slice side in pixels (default 64)")
    parser.add_argument("--sim-voxel-mm", type=float_range(0.5, 20.0), default=2.0,
                        help="simulation grid in mm (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--und-pretrained", metavar="DIR",
                        help="start Stage I from this finished understanding pre-training (e.g. another quickstart's "
                             "WORKDIR/und_pretrain, or `train --config configs/und_pretrain.py:small`) instead of "
                             "training one")
    one_line_errors(parser)


def _argument_error(args: argparse.Namespace) -> str | None:
    """A one-line complaint about the arguments, found before minutes of training rather than at evaluation."""
    workdir = Path(args.workdir)
    blocker = next((p for p in (workdir, *workdir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"--workdir {args.workdir}: {blocker} is a file, not a folder"
    if not args.budget_minutes > 0 or args.eval_slices < 1:
        return f"--budget-minutes must be > 0 and --eval-slices >= 1, got {args.budget_minutes} and {args.eval_slices}"
    try:
        SamplerConfig(num_steps=args.sample_steps, cfg_text=args.cfg_text)
    except ValueError as err:
        return f"--sample-steps {args.sample_steps} / --cfg-text {args.cfg_text}: {err}"
    return und_pretrained_error(getattr(args, "und_pretrained", None), args.variant)


def und_pretrained_error(path: str | None, variant: str) -> str | None:
    """A one-line complaint when ``--und-pretrained`` is not a finished understanding pre-training of ``variant``."""
    if path is None:
        return None
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
        stage, layers = config["stage"], config["model"]["llm"]["num_layers"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"--und-pretrained {path}: no readable training config.json there ({err})"
    expected = load_config(f"configs/und_pretrain.py:{variant}").model.llm.num_layers
    if stage != "und_pretrain" or layers != expected:
        return (f"--und-pretrained {path}: {config_file} is a {stage!r} run with {layers} LLM layers; expected an "
                f"und_pretrain run of the {variant} model")
    try:
        checkpoint.resolve(path)
    except (checkpoint.CheckpointError, FileNotFoundError) as err:
        return f"--und-pretrained {path}: {err}"
    return None


def main(args: argparse.Namespace) -> int:
    error = _argument_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state = StageState(workdir / "quickstart.json")
    data_dir = workdir / "data"
    scale = args.budget_minutes / BASE_MINUTES

    build = BuildConfig(source="mni152-sim", out=str(data_dir), slice_size=args.slice_size,
                        sim_voxel_mm=args.sim_voxel_mm, subjects=args.subjects, seed=args.seed,
                        contact_sheet=str(workdir / "contact_sheet.png"), overwrite=True)
    state.run("data", lambda: _stages.build(build))
    previous: dict[str, str] = {}
    for name, config_file, base_steps, rows, init_from in STAGES:
        if name == "und_pretrain" and args.und_pretrained:
            previous[name] = str(Path(args.und_pretrained).resolve())
            continue
        steps = max(2, int(round(base_steps * scale)))
        fields = _stages.quick_train_fields(data_dir, steps, rows, args.seed) | STAGE_FIELDS.get(name, {})
        if "vae" in previous:  # every stage after the VAE encodes its images with it
            fields["vae_from"] = previous["vae"]
        if init_from:
            fields |= init_fields(name, previous[init_from])
        run_dir = workdir / name
        state.run(name, lambda spec=f"{config_file}:{args.variant}", run_dir=run_dir, fields=fields:
                  _stages.train(spec, run_dir, fields), steps=steps)
        previous[name] = str(run_dir)

    evaluation = EvalRequest(checkpoints=(str(workdir / "stage2"),), data=str(data_dir), out=str(workdir / "eval"),
                             max_slices=args.eval_slices, steps=args.sample_steps, cfg_text=args.cfg_text,
                             seed=args.seed)
    state.run("eval", lambda: _stages.evaluate(evaluation))
    _vae_ceiling(state, workdir, data_dir, args.eval_slices)
    volume = _held_out_volume(workdir, args.seed, args.sim_voxel_mm)
    synthesis = SynthesisRequest(checkpoint=str(workdir / "stage2"), input=str(volume), source_modality="t1",
                                 target_modality="t2", output=str(workdir / "synthesized_t2.nii.gz"),
                                 steps=args.sample_steps, cfg_text=args.cfg_text, seed=args.seed, force=True)
    state.run("synthesize", lambda: _stages.synthesize_volume(synthesis))
    report = write_report(workdir, state, args.variant)
    print(f"\n[quickstart] report: {report}")
    return 0


def _vae_ceiling(state: StageState, workdir: Path, data_dir: Path, max_slices: int) -> None:
    """``eval/vae_ceiling.json``: per route, the stage-0 VAE's reconstruction and the local map's SSIM×100 on
    eval's slices (evaluation/ceiling.py)."""
    if state.done("vae_ceiling"):
        return
    start = time.time()
    rows = route_ceilings(str(workdir / "vae"), str(data_dir), "test", max_slices)
    write_atomic(workdir / "eval" / "vae_ceiling.json", json.dumps(rows, indent=1) + "\n")
    state.finish("vae_ceiling", time.time() - start)


def _ceiling_table(eval_dir: Path) -> list[str]:
    """Markdown lines: model / VAE reconstruction / identity SSIM×100 per route (empty before both exist)."""
    ceiling_path, results_path = eval_dir / "vae_ceiling.json", eval_dir / "results.json"
    if not (ceiling_path.exists() and results_path.exists()):
        return []
    ceiling = json.loads(ceiling_path.read_text())
    synthesis = json.loads(results_path.read_text()).get("synthesis", {})
    lines = ["## Where the limit is", "",
             "SSIM×100 per route: the model, the stage-0 VAE's reconstruction of the same target slices (no "
             "synthesis through this VAE can do better), a local map (ridge regression from each source latent "
             "pixel's 3×3 neighbourhood to the target latent, fitted on the training pairs: what simply carrying "
             "the source latent over achieves) and the identity copy.", "",
             "| route | model | VAE reconstruction | local map | identity |", "|---|---|---|---|---|"]
    shown = lambda value: "-" if value is None else f"{value:.2f}"
    for name, row in ceiling.items():
        model = synthesis.get(name, {}).get("model", {}).get("ssim")
        lines.append(f"| {name} | {shown(model)} | {row['reconstruction']:.2f} | {shown(row.get('local_map'))} "
                     f"| {row['identity']:.2f} |")
    lines.append("")
    for key, what in (("reconstruction", "The reconstruction"), ("local_map", "The local map")):
        above = sum(row.get(key) is not None and row[key] > row["identity"] for row in ceiling.values())
        lines.append(f"{what} beats the identity copy on {above} of {len(ceiling)} routes.")
    return lines + [""]


def _held_out_volume(workdir: Path, seed: int, voxel_mm: float) -> Path:
    """A fresh simulated subject (not in the training data) written as T1 NIfTI, for the synthesis demo."""
    path = workdir / "held_out_t1.nii.gz"
    if path.exists():
        return path
    # Index 10,000 of the population: never among the build's subjects (0 .. --subjects - 1).
    subject = phantom.simulate_subject(10_000, seed=seed, config=phantom.PhantomConfig(voxel_mm=voxel_mm))
    image = nib.Nifti1Image(np.asarray(subject.images["t1"], np.float32), subject.affine)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return path


def write_report(workdir: Path, state: StageState, variant: str) -> Path:
    """``report.md``: evaluation tables (from eval's Markdown), identity comparison, timings, pictures."""
    eval_dir = workdir / "eval"
    lines = ["# SynerMedGen-JAX quickstart report", "",
             "Embedded default data (mni152-sim, simulated from nilearn's MNI152 template), "
             f"`{variant}` model, "
             "2 CPU cores. Numbers from `python -m synermedgen_jax quickstart`. The identity row copies the source "
             "image: a model has to beat it to add anything.", ""]
    results_md = eval_dir / "results.md"
    if results_md.exists():
        lines += ["## Evaluation", "", results_md.read_text().strip(), ""]
    summary = beats_identity(eval_dir)
    if summary is not None:
        better, total = summary
        lines += [f"Model SSIM above the identity baseline on **{better} of {total}** routes.", ""]
    lines += _ceiling_table(eval_dir)
    lines += ["## Timings", "", "| stage | seconds | steps |", "|---|---|---|"]
    for name, info in state.data["stages"].items():
        lines.append(f"| {name} | {info['seconds']} | {info.get('steps', '')} |")
    lines += ["", "## Pictures", ""]
    for png in sorted([workdir / "contact_sheet.png", *sorted(eval_dir.glob("**/*.png"))[:6]]):
        if png.exists():
            lines.append(f"![{png.stem}]({png.relative_to(workdir)})")
    path = workdir / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def beats_identity(eval_dir: Path) -> tuple[int, int] | None:
    """(routes where the model's SSIM beats the identity baseline, routes evaluated), or None before eval."""
    try:
        results = read_results(eval_dir)
    except FileNotFoundError:
        return None
    return results["routes_better"], results["routes"]
