"""The control the paper lacked: does generation-aligned understanding (GAU) help synthesis at this scale?

  python -m synermedgen_jax ablate [--workdir runs/ablate] [--arms gau,vqa,none,...] [--stage2-steps N] ...

Arms, each with the same data, the same Stage I data volume (steps × rows) and the same Stage II:
  gau      Stage I on CTS + MI + TIA (configs/stage1_gau.py)  → Stage II
  vqa      Stage I on non-aligned VQA questions about the same images (configs/baseline_vqa.py) → Stage II
  none     no Stage I → Stage II from the random initialisation
  no_cts, no_mi, no_tia   Stage I without one task (configs/ablations.py) → Stage II
Every arm is evaluated on the same routes and slices with the same seed; WORKDIR/ablation.md and .json hold
one table (SSIM×100 per route group, understanding accuracies) with the seeds. Resumable like quickstart.
At scale, point --data at a built real dataset and --variant at a bigger model; add --config.* overrides
(applied to every training stage) for the mesh.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from synermedgen_jax.commands._runner import StageState, accept_config_overrides, train_overrides, write_atomic

ARMS = {
    "gau": "configs/stage1_gau.py:{variant}",
    "vqa": "configs/baseline_vqa.py:{variant}",
    "none": None,
    "no_cts": "configs/ablations.py:no_cts_{variant}",
    "no_mi": "configs/ablations.py:no_mi_{variant}",
    "no_tia": "configs/ablations.py:no_tia_{variant}",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/ablate", help="everything is written here (resumable)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--variant", default="small", help="model variant of every stage (default small)")
    parser.add_argument("--data", help="a built data folder (default: build mni152-sim into WORKDIR/data)")
    parser.add_argument("--subjects", type=int, default=8, help="mni152-sim subjects when building (default 8)")
    parser.add_argument("--slice-size", type=int, default=64, help="slice side when building (default 64)")
    parser.add_argument("--sim-voxel-mm", type=float, default=2.0, help="mni152-sim grid in mm when building (2)")
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--stage1-steps", type=int, default=150)
    parser.add_argument("--stage2-steps", type=int, default=400)
    parser.add_argument("--rows", type=int, default=4, help="pack rows per step of the VAE and Stage I (default 4)")
    parser.add_argument("--stage2-rows", type=int, default=16,
                        help="pack rows per Stage II step (default 16: small's Stage II rows hold one sample each)")
    parser.add_argument("--eval-slices", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--eval-instances", type=int, default=32,
                        help="understanding instances per task (CTS / MI / TIA) in each arm's evaluation (32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.epilog = "--config.KEY=VALUE   extra override for every training stage (repeatable)"
    accept_config_overrides(parser)


def main(args: argparse.Namespace) -> int:
    import sys

    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        print(f"error: unknown arm(s) {unknown}; valid: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state = StageState(workdir / "ablate.json")
    data_dir = Path(args.data).resolve() if args.data else workdir / "data"
    if not args.data:
        state.run("data", ["build-data", "--source", "mni152-sim", "--root", "none", "--out", str(data_dir),
                           "--slice-size", str(args.slice_size), "--sim-voxel-mm", str(args.sim_voxel_mm),
                           "--subjects", str(args.subjects), "--seed", str(args.seed), "--overwrite"])
    extra = list(getattr(args, "overrides", []))

    def train(name: str, config: str, run_dir: Path, steps: int, more: list[str], rows: int | None = None) -> None:
        state.run(name, ["train", "--config", config, "--workdir", str(run_dir),
                         *train_overrides(data_dir, steps, rows or args.rows, args.seed), *more, *extra], steps=steps)

    vae_dir = workdir / "vae"
    train("vae", f"configs/vae.py:{args.variant}", vae_dir, args.vae_steps, [])
    for arm in arms:
        arm_dir = workdir / arm
        stage2_more = [f"--config.vae_from={vae_dir}"]
        if ARMS[arm] is not None:
            train(f"{arm}/stage1", ARMS[arm].format(variant=args.variant), arm_dir / "stage1", args.stage1_steps,
                  [f"--config.vae_from={vae_dir}"])
            stage2_more += [f"--config.init_from={arm_dir / 'stage1'}", "--config.init_moe=True"]
        train(f"{arm}/stage2", f"configs/stage2_ucg.py:{args.variant}", arm_dir / "stage2", args.stage2_steps,
              stage2_more, rows=args.stage2_rows)
        state.run(f"{arm}/eval", ["eval", "--workdir", str(arm_dir / "stage2"), "--data", str(data_dir), "--out",
                                  str(arm_dir / "eval"), "--max-slices", str(args.eval_slices), "--steps",
                                  str(args.sample_steps), "--seed", str(args.seed),
                                  "--max-instances", str(args.eval_instances)])
    table = collect(workdir, arms)
    write_atomic(workdir / "ablation.json", json.dumps({"seed": args.seed, "variant": args.variant,
                                                         "arms": table}, indent=2))
    markdown = render(table, args)
    write_atomic(workdir / "ablation.md", markdown)
    print("\n" + markdown)
    return 0


def collect(workdir: Path, arms: list[str]) -> dict:
    """Per arm: SSIM×100 per route group and the understanding accuracies, from each arm's eval results."""
    from synermedgen_jax.evaluation.report_io import read_results

    return {arm: read_results(workdir / arm / "eval") for arm in arms}


def render(table: dict, args: argparse.Namespace) -> str:
    groups = sorted({g for row in table.values() for g in row["groups"]})
    tasks = sorted({t for row in table.values() for t in row["understanding"]})
    header = ["arm", *[f"SSIM×100 {g}" for g in groups], "routes above identity", *[f"{t} acc" for t in tasks]]
    lines = [f"# Ablation: generation-aligned understanding (variant {args.variant}, seed {args.seed})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, row in table.items():
        cells = [arm, *[_fmt(row["groups"].get(g)) for g in groups], f"{row['routes_better']} of {row['routes']}",
                 *[_fmt(row["understanding"].get(t), 3) for t in tasks]]
        lines.append("| " + " | ".join(cells) + " |")
    identity = next(iter(table.values()))["identity_groups"]
    lines.append("| identity (copy source) | " + " | ".join(_fmt(identity.get(g)) for g in groups)
                 + " | |" + " |" * len(tasks))
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
