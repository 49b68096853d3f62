"""Build SynerMed ArrayRecord shards from NIfTI datasets (or the simulated mni152-sim default).

  python -m synermedgen_jax build-data --source mni152-sim --out data/sim --subjects 16 --slice-size 64
  python -m synermedgen_jax build-data --source brats --root /data/BraTS2021 --out data/brats

Sources and the layouts they read:
  synthrad2023  Task1/{brain,pelvis}/<case>/{mr,ct,mask}.nii.gz, Task2/{brain,pelvis}/<case>/{cbct,ct,mask}.nii.gz
  brats         <case>/<case>_{t1,t1ce,t2,flair}.nii.gz (2021) or <case>/<case>-{t1n,t1c,t2w,t2f}.nii.gz (2023)
  autopet       <patient>/<study>/{CTres,SUV}.nii.gz
  mni152-sim    no files: subjects simulated from nilearn's MNI152 template (T1, T1CE, T2, FLAIR, CT, CBCT, PET)
  synermed      the published release: SynerMed.parquet, SynerMed.jsonl, slice/<modality>/*.png (its own
                options: --workers, --process-index/--process-count, ...; see commands/build_synermed.py)

Writes to --out: records/<split>-NNNNN.array_record (one record per case and axial slice, every modality,
normalised to [-1, 1] with the inverse parameters), records/<split>.index.json, instances/<split>.npz
(CTS/TIA/MI, the non-aligned VQA control and Stage II pairs as index views), tokenizer.json,
manifest.json (counts, shard sha256, config, code version) and skipped.jsonl (file, case, reason).
Bad cases are skipped; the exit status is non-zero only when no valid record remains. The build is written
into a hidden sibling folder and moved into --out only when it succeeded: a failed --overwrite build keeps
the previous one, a killed build leaves nothing a rerun trips over. A split given a fraction but left without
a patient (too few subjects) is a warning.
"""

from __future__ import annotations

import argparse
import sys

from synermedgen_jax.commands import build_synermed
from synermedgen_jax.commands._args import (
    float_range,
    fraction,
    int_range,
    non_negative_float,
    one_line_errors,
    positive_float,
    positive_int,
    window,
)
from synermedgen_jax.commands._runner import request_from
from synermedgen_jax.data.build import BuildConfig, build, summary_lines
from synermedgen_jax.data.records import SPLITS
from synermedgen_jax.data.sources import SOURCES


def _mix(text: str) -> tuple[tuple[str, float], ...]:
    out = []
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in ("cts", "tia", "mi") or not value:
            raise argparse.ArgumentTypeError(f"expected cts=W,tia=W,mi=W, got {text!r}")
        try:
            weight = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected cts=W,tia=W,mi=W, got {text!r}") from None
        if not 0.0 <= weight < float("inf"):
            raise argparse.ArgumentTypeError(f"{name}={value}: weights must be finite and >= 0")
        out.append((name, weight))
    if sum(w for _, w in out) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one weight must be > 0")
    return tuple(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults from BuildConfig: the command line and the typed call (quickstart, ablate) build the same data.
    parser.add_argument("--source", required=True, choices=sorted(SOURCES) + ["synermed"],
                        help="dataset layout (synermed: the published SynerMed release folder, see below)")
    parser.add_argument("--root", help="dataset folder (not needed for mni152-sim)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous build in --out")
    parser.add_argument("--slice-size", type=int_range(8, 4096), default=BuildConfig.slice_size,
                        help="square slice side in pixels (256)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default=BuildConfig.dtype, help="image storage")
    parser.add_argument("--min-foreground", type=non_negative_float, default=BuildConfig.min_foreground,
                        help="skip slices whose foreground covers less than this fraction (0.05)")
    parser.add_argument("--seed", type=int, default=BuildConfig.seed, help="splits, simulation and instances (0)")
    parser.add_argument("--split", type=fraction, nargs=3, default=BuildConfig.split_fractions,
                        metavar=("TRAIN", "VAL", "TEST"),
                        help="patient-level split fractions summing to 1 (0.8 0.1 0.1)")
    parser.add_argument("--ct-window", type=window(), default=BuildConfig.ct_window, help="HU window LO,HI")
    parser.add_argument("--mr-percentiles", type=window(0.0, 100.0), default=BuildConfig.mr_percentiles,
                        help="MR percentiles LO,HI")
    parser.add_argument("--pet-suv-max", type=positive_float, default=BuildConfig.pet_suv_max, help="PET SUV clip (15)")
    parser.add_argument("--resample", action="store_true",
                        help="resample misaligned modalities onto the first one instead of skipping the case")
    parser.add_argument("--neighbour-k", type=positive_int, default=BuildConfig.neighbour_k,
                        help="CTS distractors: slices within +-K (3)")
    parser.add_argument("--instances-per-pair", type=non_negative_float, default=BuildConfig.instances_per_pair,
                        help="understanding instances per paired sample (2.3, the released ratio)")
    parser.add_argument("--mix", type=_mix, default=BuildConfig.mix,
                        help="task weights, e.g. cts=0.468,tia=0.381,mi=0.15")
    parser.add_argument("--records-per-shard", type=positive_int, default=BuildConfig.records_per_shard)
    parser.add_argument("--subjects", type=positive_int, default=BuildConfig.subjects,
                        help="mni152-sim: number of subjects (8)")
    parser.add_argument("--sim-voxel-mm", type=float_range(0.5, 20.0), default=BuildConfig.sim_voxel_mm,
                        help="mni152-sim: voxel size in mm, 0.5..20 (2)")
    parser.add_argument("--sim-lesion-probability", type=fraction, default=BuildConfig.sim_lesion_probability,
                        help="mni152-sim: chance a subject has a BraTS-like lesion (0.8)")
    parser.add_argument("--vocab-size", type=int_range(1, 1_000_000), default=BuildConfig.vocab_size,
                        help="embedded tokenizer vocabulary (512)")
    parser.add_argument("--tokenizer", metavar="FILE_OR_FOLDER",
                        help="the weights' tokenizer instead of the embedded BPE: a tokenizer.json or a Qwen2-format "
                             "folder (a BAGEL-7B-MoT / Qwen2.5 download: tokenizer.json, or vocab.json + merges.txt "
                             "+ tokenizer_config.json); BAGEL's special tokens are added as BAGEL adds them. Needed "
                             "to fine-tune imported weights (train refuses a build whose ids differ)")
    parser.add_argument("--contact-sheet", metavar="PNG", help="write a PNG of the first case, all modalities")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build_synermed.add_release_arguments(parser)
    one_line_errors(parser)


def run(config: BuildConfig) -> int:
    """Builds ``config.out`` from a NIfTI source (or mni152-sim): the typed entry point of ``build-data``
    (quickstart and ablate call it). A bad input is one error line, exit status 2."""
    result = build_synermed.run_build(build, config, summary_lines)
    if result is None:
        return 2
    print(f"wrote {result.out}/manifest.json")
    cases = result.manifest["counts"]["cases"]
    for split, share in zip(SPLITS, config.split_fractions, strict=True):
        if share > 0 and not result.records[split]:
            print(f"warning: the {split} split is empty ({sum(cases.values())} patients for fractions "
                  f"{' '.join(str(f) for f in config.split_fractions)}): "
                  + ("training has no data" if split == "train" else
                     f"eval --split {split} and in-run evaluation need it; build more --subjects"), file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    if args.source == "synermed":  # the release folder: its own builder (commands/build_synermed.py)
        return build_synermed.main(args)
    return run(request_from(BuildConfig, args, split_fractions=tuple(args.split), ct_window=tuple(args.ct_window),
                            mr_percentiles=tuple(args.mr_percentiles), mix=tuple(args.mix),
                            progress=not args.no_progress))
