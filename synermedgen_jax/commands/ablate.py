"""The control the paper lacked: does generation-aligned understanding (GAU) help synthesis at this scale?

  python -m synermedgen_jax ablate [--workdir runs/ablate] [--arms gau,vqa,none,...] [--seeds 0,1,2]
      [--mode both|stage2|zero-shot] [--stage1-steps N] [--stage2-steps N] [--gen-pretrain-steps N]
      [--und-pretrain-steps N] ...

Arms, each with the same data, the same Stage I data volume and compute (steps × rows) and the same Stage II:
  gau      Stage I on CTS + MI + TIA (configs/stage1_gau.py)  → Stage II
  vqa      Stage I on non-aligned VQA questions about the same images (configs/baseline_vqa.py) → Stage II
  none     no Stage I → Stage II
  no_cts, no_mi, no_tia   Stage I without one task (configs/ablations.py) → Stage II
Every arm runs once per seed (--seeds): the seed drives model initialisation, data order and sampling noise;
the built data and the stage-0 VAE (a fixed autoencoder, as BAGEL's FLUX VAE) are shared by all runs. Per seed,
one understanding pre-training (configs/und_pretrain.py, --und-pretrain-steps; the stand-in for the Qwen2.5 +
SigLIP start of BAGEL) is where every arm starts: its Stage I, or `none`'s Stage II.

Zero-shot (--mode both or zero-shot; the paper's headline setting, which rests on BAGEL's pretrained
generator): per seed, a generic generation pre-training that never sees a cross-modal pair
(configs/gen_pretrain.py: neighbouring slices, flips, denoising, intensity changes of one modality; its
generation expert starts as a copy of the pre-trained understanding expert, as BAGEL's starts from Qwen2.5), then each
zero-shot arm's Stage I starting from it (Stage I trains only the understanding side, so the pre-trained
generation expert reaches the checkpoint untouched), then synthesis evaluated with no Stage II.

WORKDIR/ablation.md and .json: mean ± std over the seeds (sample std, n−1) per arm of SSIM×100 per route group
(after Stage II, and zero-shot), routes above the copy-the-source baseline, the understanding accuracies (CTS,
MI panel accuracy, TIA) and wall time; ablation.json also holds every arm × seed result. Resumable: rerun the
same command and finished arm × seed stages are skipped (WORKDIR/ablate.json lists them with their seconds).
At scale, point --data at a built real dataset and --variant at a bigger model; add --config.* overrides
(applied to every training stage) for the mesh.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from synermedgen_jax.commands import _stages, quickstart
from synermedgen_jax.commands._args import (
    float_range,
    int_range,
    non_negative_float,
    non_negative_int,
    one_line_errors,
    positive_int,
)
from synermedgen_jax.commands._runner import StageState, accept_config_overrides
from synermedgen_jax.commands.eval import EvalRequest
from synermedgen_jax.config import ConfigError, apply_overrides, load_config
from synermedgen_jax.data.build import BuildConfig
from synermedgen_jax.evaluation.report_io import read_results
from synermedgen_jax.staging import write_atomic

ARMS = {
    "gau": "configs/stage1_gau.py:{variant}",
    "vqa": "configs/baseline_vqa.py:{variant}",
    "none": None,
    "no_cts": "configs/ablations.py:no_cts_{variant}",
    "no_mi": "configs/ablations.py:no_mi_{variant}",
    "no_tia": "configs/ablations.py:no_tia_{variant}",
}
MODES = ("both", "stage2", "zero-shot")
ZERO_SHOT_ARMS = ("gau", "vqa", "none")  # the comparison; --zero-shot-arms takes any arm
STAGE2_CONFIG = "configs/stage2_ucg.py:{variant}"
GEN_PRETRAIN_CONFIG = "configs/gen_pretrain.py:{variant}"
UND_PRETRAIN_CONFIG = "configs/und_pretrain.py:{variant}"
# Understanding columns: (key in the summary, results.json task, field of that task's result, header).
UNDERSTANDING = (("cts", "cts", "accuracy", "CTS acc %"), ("mi_panel", "mi", "panel_accuracy", "MI panel acc %"),
                 ("tia", "tia", "accuracy", "TIA acc %"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/ablate", help="everything is written here (resumable)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds, each arm runs once per seed (default 0,1,2)")
    parser.add_argument("--mode", default="both", choices=MODES,
                        help="stage2: Stage I → Stage II; zero-shot: generic pre-training → Stage I, no Stage II; "
                             "both (default): the two column groups in one table")
    parser.add_argument("--zero-shot-arms",
                        help="comma-separated arms of the zero-shot columns (default: those of --arms among "
                             f"{','.join(ZERO_SHOT_ARMS)})")
    parser.add_argument("--variant", default="small", help="model variant of every stage (default small)")
    parser.add_argument("--data", help="a built data folder (default: build mni152-sim into WORKDIR/data)")
    parser.add_argument("--data-seed", type=non_negative_int, default=0,
                        help="seed of the data build and the shared stage-0 VAE (default 0)")
    parser.add_argument("--subjects", type=positive_int, default=8,
                        help="mni152-sim subjects when building (default 8)")
    parser.add_argument("--slice-size", type=int_range(8, 4096), default=64,
                        help="slice side when building (default 64)")
    parser.add_argument("--sim-voxel-mm", type=float_range(0.5, 20.0), default=2.0,
                        help="mni152-sim grid in mm when building (2)")
    parser.add_argument("--vae-steps", type=positive_int, default=300,
                        help="stage-0 VAE steps, once for all runs (300)")
    parser.add_argument("--stage1-steps", type=positive_int, default=150, help="Stage I steps of every arm (150)")
    parser.add_argument("--stage2-steps", type=positive_int, default=400, help="Stage II steps of every arm (400)")
    parser.add_argument("--gen-pretrain-steps", type=positive_int, default=400,
                        help="generic generation pre-training steps, once per seed (400; zero-shot only)")
    parser.add_argument("--und-pretrain-steps", type=non_negative_int, default=quickstart.UND_PRETRAIN_STEPS,
                        help="understanding pre-training steps (configs/und_pretrain.py), once per seed; every arm "
                             f"starts from it, as BAGEL's start from Qwen2.5 (default {quickstart.UND_PRETRAIN_STEPS}; "
                             "0: every arm starts from the random initialisation)")
    parser.add_argument("--und-pretrained", metavar="DIR",
                        help="a finished understanding pre-training every seed's arms start from, instead of one "
                             "trained per seed (e.g. a quickstart's WORKDIR/und_pretrain)")
    parser.add_argument("--rows", type=positive_int, default=4,
                        help="pack rows per step of the VAE and Stage I (default 4)")
    parser.add_argument("--stage2-rows", type=positive_int, default=8,
                        help="pack rows per Stage II / generic pre-training step (default 8: small's Stage II rows "
                             "hold about two samples each)")
    parser.add_argument("--eval-split", default="test", help="record split every arm is evaluated on (test)")
    parser.add_argument("--eval-tasks", default="",
                        help="comma-separated eval task or dataset names (default: every route of the split)")
    parser.add_argument("--eval-slices", type=positive_int, default=8, help="slices per route in each evaluation (8)")
    parser.add_argument("--sample-steps", type=int_range(2, 1000), default=20,
                        help="flow-matching steps at evaluation (20)")
    parser.add_argument("--cfg-text", type=non_negative_float, default=None,
                        help="text guidance scale at evaluation (default: quickstart's)")
    parser.add_argument("--eval-instances", type=non_negative_int, default=32,
                        help="understanding instances per task (CTS / MI / TIA) in each arm's evaluation (32)")
    parser.epilog = "--config.KEY=VALUE   extra override for every training stage (repeatable)"
    accept_config_overrides(parser)
    one_line_errors(parser)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def parse_arguments(args: argparse.Namespace) -> tuple[list[str], list[int], list[str]]:
    """``(arms, seeds, zero-shot arms)``; a ValueError with a one-line message for anything unusable."""
    arms = _csv(args.arms)
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise ValueError(f"--arms: unknown arm(s) {unknown or '(none given)'}; valid: {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"--arms {args.arms}: an arm is listed twice")
    try:
        seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {args.seeds!r}: expected distinct non-negative integers, e.g. 0,1,2")
    zero_shot: list[str] = []
    if args.mode != "stage2":
        if args.zero_shot_arms is None:
            zero_shot = [arm for arm in arms if arm in ZERO_SHOT_ARMS]
        else:
            zero_shot = _csv(args.zero_shot_arms)
            stray = [arm for arm in zero_shot if arm not in arms]
            if stray or len(set(zero_shot)) != len(zero_shot):
                raise ValueError(f"--zero-shot-arms {args.zero_shot_arms}: each must be one of --arms "
                                 f"({', '.join(arms)}), once")
        if not zero_shot:
            raise ValueError(f"--mode {args.mode}: no zero-shot arm among --arms {','.join(arms)} "
                             f"(default {','.join(ZERO_SHOT_ARMS)}; or pass --zero-shot-arms)")
    for name in ("vae_steps", "stage1_steps", "stage2_steps", "gen_pretrain_steps", "rows", "stage2_rows",
                 "eval_slices", "sample_steps", "subjects"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.eval_instances < 0 or args.data_seed < 0:
        raise ValueError("--eval-instances and --data-seed must be >= 0")
    problem = quickstart.und_pretrained_error(getattr(args, "und_pretrained", None), args.variant)
    if problem:
        raise ValueError(problem)
    if args.data and not (Path(args.data) / "manifest.json").is_file():
        raise ValueError(f"--data {args.data}: not a built data folder (no manifest.json); build it with build-data")
    _check_configs(args, arms, zero_shot)
    return arms, seeds, zero_shot


def _check_configs(args: argparse.Namespace, arms: list[str], zero_shot: list[str]) -> None:
    """Loads every config the run will train, with the --config overrides: a bad variant or key fails here,
    before any stage runs (no model is built)."""
    specs = ["configs/vae.py:{variant}", *(ARMS[arm] for arm in arms if ARMS[arm])]
    specs += [STAGE2_CONFIG] if args.mode != "zero-shot" else []
    specs += [GEN_PRETRAIN_CONFIG] if zero_shot else []
    specs += [UND_PRETRAIN_CONFIG] if args.und_pretrain_steps and not getattr(args, "und_pretrained", None) else []
    for spec in dict.fromkeys(specs):
        try:
            apply_overrides(load_config(spec.format(variant=args.variant)), list(getattr(args, "overrides", [])))
        except ConfigError as err:
            raise ValueError(str(err).splitlines()[0]) from None


def main(args: argparse.Namespace) -> int:
    try:
        arms, seeds, zero_shot = parse_arguments(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The main job's text guidance and Stage II fields (commands/quickstart.py): the arms are trained and
    # evaluated as the default run is.
    cfg_text = quickstart.CFG_TEXT if args.cfg_text is None else args.cfg_text
    stage2_recipe = quickstart.STAGE_FIELDS["stage2"]
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state = StageState(workdir / "ablate.json")
    data_dir = Path(args.data).resolve() if args.data else workdir / "data"
    if not args.data:
        build = BuildConfig(source="mni152-sim", out=str(data_dir), slice_size=args.slice_size,
                            sim_voxel_mm=args.sim_voxel_mm, subjects=args.subjects, seed=args.data_seed,
                            overwrite=True)
        state.run("data", lambda: _stages.build(build))
    extra = list(getattr(args, "overrides", []))

    def train(name: str, config: str, run_dir: Path, steps: int, rows: int, seed: int, more: dict) -> None:
        fields = _stages.quick_train_fields(data_dir, steps, rows, seed) | more
        state.run(name, lambda: _stages.train(config.format(variant=args.variant), run_dir, fields, extra),
                  steps=steps)

    def evaluate(name: str, checkpoint: Path, out: Path, seed: int, instances: int) -> None:
        request = EvalRequest(checkpoints=(str(checkpoint),), data=str(data_dir), out=str(out),
                              tasks=tuple(_csv(args.eval_tasks)), split=args.eval_split, steps=args.sample_steps,
                              cfg_text=cfg_text, max_slices=args.eval_slices, max_instances=instances, seed=seed,
                              progress=False)
        state.run(name, lambda: _stages.evaluate(request))

    vae_dir = workdir / "vae"
    vae = {"vae_from": str(vae_dir)}
    train("vae", "configs/vae.py:{variant}", vae_dir, args.vae_steps, args.rows, args.data_seed, {})
    runs = [(seed, arm) for seed in seeds for arm in arms]
    for k, (seed, arm) in enumerate(runs, 1):
        # Every arm of a seed starts from the same understanding pre-training (the stand-in for Qwen2.5 + SigLIP):
        # Stage I from it, `none`'s Stage II from it, the generic generation pre-training from it.
        given = getattr(args, "und_pretrained", None)
        und_pretrained = Path(given).resolve() if given else workdir / "und_pretrain" / f"seed{seed}"
        start_from = {"init_from": str(und_pretrained)} if args.und_pretrain_steps or given else {}
        if args.und_pretrain_steps and not given and not state.done(f"und_pretrain/seed{seed}"):
            print(f"\n[ablate] seed {seed}: understanding pre-training (shared by every arm)", flush=True)
            train(f"und_pretrain/seed{seed}", UND_PRETRAIN_CONFIG, und_pretrained, args.und_pretrain_steps,
                  args.rows, seed, {})
        pretrained = workdir / "gen_pretrain" / f"seed{seed}"
        if zero_shot and not state.done(f"gen_pretrain/seed{seed}"):
            print(f"\n[ablate] seed {seed}: generic generation pre-training (shared by the zero-shot arms)", flush=True)
            # BAGEL's generation expert starts as a copy of Qwen2.5's layers: here, of the pre-trained und expert.
            copy_und = start_from | {"init_moe": True, "init_moe_overwrite": True} if start_from else {}
            train(f"gen_pretrain/seed{seed}", GEN_PRETRAIN_CONFIG, pretrained, args.gen_pretrain_steps,
                  args.stage2_rows, seed, vae | stage2_recipe | copy_und)
        stage1_config, run = ARMS[arm], workdir / arm / f"seed{seed}"
        first = ["Stage I"] if stage1_config else []
        plan = [*first, "Stage II", "eval"] if args.mode != "zero-shot" else []
        plan += ["zero-shot: " + " → ".join([*first, "eval"])] if arm in zero_shot else []
        print(f"\n[ablate] seed {seed} · arm {arm} ({k}/{len(runs)}): {' → '.join(plan)}", flush=True)
        start = time.time()
        if args.mode != "zero-shot":
            stage2_more = vae | stage2_recipe
            stage2_start = start_from
            if stage1_config:
                train(f"{arm}/seed{seed}/stage1", stage1_config, run / "stage1", args.stage1_steps, args.rows, seed,
                      vae | start_from)
                stage2_start = {"init_from": str(run / "stage1")}
            if stage2_start:
                stage2_more |= stage2_start | {"init_moe": True, "init_moe_overwrite": True}
            train(f"{arm}/seed{seed}/stage2", STAGE2_CONFIG, run / "stage2", args.stage2_steps, args.stage2_rows,
                  seed, stage2_more)
            evaluate(f"{arm}/seed{seed}/eval", run / "stage2", run / "eval", seed, args.eval_instances)
        if arm in zero_shot:
            checkpoint = pretrained
            if stage1_config:  # init_moe stays off: the pre-trained generation expert must survive Stage I
                checkpoint = run / "zero_shot_stage1"
                train(f"{arm}/seed{seed}/zero_shot_stage1", stage1_config, checkpoint, args.stage1_steps, args.rows,
                      seed, vae | {"init_from": str(pretrained), "init_moe": False})
            # Understanding is measured once per arm and seed: after Stage II when that runs (same weights).
            evaluate(f"{arm}/seed{seed}/zero_shot_eval", checkpoint, run / "zero_shot_eval", seed,
                     args.eval_instances if args.mode == "zero-shot" else 0)
        print(f"[ablate] seed {seed} · arm {arm} done ({time.time() - start:.0f} s this invocation)", flush=True)
    table = collect(workdir, arms, seeds, zero_shot, args.mode, state.data["stages"])
    table.update(variant=args.variant, seeds=seeds, mode=args.mode, data=str(data_dir), eval_split=args.eval_split)
    write_atomic(workdir / "ablation.json", json.dumps(table, indent=2, allow_nan=False))
    markdown = render(table)
    write_atomic(workdir / "ablation.md", markdown)
    print("\n" + markdown)
    return 0


# ---------------------------------------------------------------------------------------------------------
# The table: per arm and seed the eval results, then mean ± std over the seeds.


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def per_seed_row(eval_dir: Path) -> dict:
    """One arm × seed's numbers from its eval folder: SSIM×100 per group, identity per group, routes above the
    copy, and the understanding columns (None where not measured)."""
    results = read_results(eval_dir)
    understanding = {key: _finite(results["understanding_detail"].get(task, {}).get(field))
                     for key, task, field, _ in UNDERSTANDING}
    return {"groups": results["groups"], "identity_groups": results["identity_groups"],
            "routes_better": results["routes_better"], "routes": results["routes"], "understanding": understanding}


def mean_std(values: list) -> dict:
    """``{"mean", "std", "n"}`` over the values that are not None; std is the sample std (n−1), None for n < 2."""
    values = [float(v) for v in values if v is not None]
    n = len(values)
    if not n:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def summarise(per_seed: dict) -> dict:
    """Mean ± std over the seeds of one arm's ``{seed: {"stage2": row|None, "zero_shot": row|None}}``."""
    out: dict = {}
    for setting in ("stage2", "zero_shot"):
        rows = [r[setting] for r in per_seed.values() if r.get(setting)]
        if not rows:
            continue
        groups = sorted({g for row in rows for g in row["groups"]})
        out[setting] = {"groups": {g: mean_std([row["groups"].get(g) for row in rows]) for g in groups},
                        "routes_better": mean_std([row["routes_better"] for row in rows]),
                        "routes": max(row["routes"] for row in rows)}
    # Understanding after Stage II where it ran (the understanding side is frozen there), else zero-shot's.
    rows = [r.get("stage2") or r.get("zero_shot") for r in per_seed.values()]
    out["understanding"] = {key: mean_std([row["understanding"].get(key) for row in rows if row])
                            for key, *_ in UNDERSTANDING}
    out["wall_s"] = round(sum(r.get("wall_s", 0.0) for r in per_seed.values()), 1)
    return out


def collect(workdir: Path, arms: list[str], seeds: list[int], zero_shot: list[str], mode: str,
            stages: dict) -> dict:
    """Every arm × seed's results (from its eval folders) and wall time (from the stage log), and the summary."""
    seconds = {name: float(info.get("seconds", 0.0)) for name, info in stages.items()}
    table: dict = {"arms": {}, "identity_groups": {}}
    for arm in arms:
        per_seed = {}
        for seed in seeds:
            run = workdir / arm / f"seed{seed}"
            row = {"stage2": per_seed_row(run / "eval") if mode != "zero-shot" else None,
                   "zero_shot": per_seed_row(run / "zero_shot_eval") if arm in zero_shot else None,
                   "wall_s": round(sum(s for name, s in seconds.items() if name.startswith(f"{arm}/seed{seed}/")), 1)}
            per_seed[str(seed)] = row
            for setting in ("stage2", "zero_shot"):
                if row[setting]:
                    table["identity_groups"] = table["identity_groups"] or row[setting]["identity_groups"]
        table["arms"][arm] = {"per_seed": per_seed, "summary": summarise(per_seed)}
    shared = {name: s for name, s in seconds.items()
              if name in ("data", "vae") or name in {f"{pre}/seed{seed}" for seed in seeds
                                                     for pre in ("gen_pretrain", "und_pretrain")}}
    arm_total = sum(a["summary"]["wall_s"] for a in table["arms"].values())
    table["wall_s"] = {"shared": shared, "arms": round(arm_total, 1),
                       "total": round(arm_total + sum(shared.values()), 1)}
    table["std"] = "sample standard deviation over seeds (n-1); null for one seed"
    return table


def _cell(stat: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text if stat.get("std") is None else f"{text} ± {stat['std'] * scale:.{digits}f}"


def render(table: dict) -> str:
    """The markdown table of ``collect``'s output (plus ``variant``, ``seeds``, ``mode``)."""
    summaries = {arm: a["summary"] for arm, a in table["arms"].items()}
    settings = [s for s in ("stage2", "zero_shot") if any(s in row for row in summaries.values())]
    groups = {s: sorted({g for row in summaries.values() for g in row.get(s, {}).get("groups", {})})
              for s in settings}
    label = {"stage2": "", "zero_shot": "zero-shot "}
    header = ["arm"]
    for s in settings:
        header += [f"{label[s]}SSIM×100 {g}" for g in groups[s]] + [f"{label[s]}routes above copy"]
    header += [title for *_, title in UNDERSTANDING] + ["wall s"]
    seeds = ", ".join(str(s) for s in table["seeds"])
    lines = [f"# Ablation: generation-aligned understanding (variant {table['variant']}, seeds {seeds})", "",
             f"Mean ± std over {len(table['seeds'])} seed(s) (sample std, n−1). SSIM×100 per route group on the "
             f"{table.get('eval_split', 'test')} split"
             + ("; zero-shot: Stage I from the generic generation pre-training, no Stage II" if "zero_shot" in settings
                else "") + ". Understanding: held-out accuracy in % (MI: panels named correctly). Wall time: "
             "the arm's stages over all seeds.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, row in summaries.items():
        cells = [arm]
        for s in settings:
            part = row.get(s)
            cells += [_cell(part["groups"].get(g)) if part else "–" for g in groups[s]]
            cells.append(f"{_cell(part['routes_better'], 1)} of {part['routes']}" if part else "–")
        cells += [_cell(row["understanding"].get(key), 1, 100.0) for key, *_ in UNDERSTANDING]
        cells.append(f"{row['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    identity = table.get("identity_groups", {})
    cells = ["identity (copy source)"]
    for s in settings:
        cells += [f"{identity[g]:.2f}" if g in identity else "–" for g in groups[s]] + [""]
    cells += [""] * (len(UNDERSTANDING) + 1)
    lines.append("| " + " | ".join(cells) + " |")
    wall = table["wall_s"]
    shared = ", ".join(f"{name} {s:.0f} s" for name, s in wall["shared"].items())
    lines += ["", f"Wall time: arms {wall['arms']:.0f} s, shared stages {sum(wall['shared'].values()):.0f} s "
              f"({shared or 'none run here'}), total {wall['total']:.0f} s."]
    return "\n".join(lines) + "\n"
