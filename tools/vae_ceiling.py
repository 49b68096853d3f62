"""The autoencoder's ceiling per synthesis route: how well can any prediction score through this VAE?

Every synthesized slice is a VAE decode, so ``decode(encode(target))`` (posterior mean) bounds what Stage II can
reach on a route. This prints that reconstruction's SSIM with the evaluation's own slice choice, next to the
identity baseline (a copy of the source): where the reconstruction does not beat the copy, no amount of Stage II
training will. The "local map" column scores a ridge regression from each source latent's 3×3 neighbourhood to
the target latent, fitted on the training pairs: a yardstick of what carrying the source latent over achieves
(synermedgen_jax/evaluation/ceiling.py).

Usage::

    python tools/vae_ceiling.py --vae runs/quickstart/vae --data runs/quickstart/data [--split test] [--max-slices 4]

``--vae`` takes a stage-0 workdir or any training workdir whose checkpoint holds the VAE (Stage I/II).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synermedgen_jax.evaluation.ceiling import route_ceilings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True, help="stage-0 (or later) training workdir holding the VAE")
    parser.add_argument("--data", required=True, help="built data folder (build-data --out)")
    parser.add_argument("--split", default="test", help="record split (test, as eval)")
    parser.add_argument("--max-slices", type=int, default=4, help="slices per route (4, as quickstart's eval)")
    args = parser.parse_args(argv)
    from synermedgen_jax.inference.loading import InferenceError
    from synermedgen_jax.training.checkpoint import CheckpointError

    try:
        rows = route_ceilings(args.vae, args.data, args.split, args.max_slices)
    except (CheckpointError, InferenceError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("| route | slices | reconstruction SSIM×100 | local map SSIM×100 | identity SSIM×100 |\n"
          "|---|---|---|---|---|")
    for name, row in rows.items():
        local = "-" if row.get("local_map") is None else f"{row['local_map']:.2f}"
        print(f"| {name} | {row['slices']} | {row['reconstruction']:.2f} | {local} | {row['identity']:.2f} |")
    for key, what in (("reconstruction", "reconstruction"), ("local_map", "local map")):
        above = sum(row.get(key) is not None and row[key] > row["identity"] for row in rows.values())
        print(f"{what} above the identity copy on {above} of {len(rows)} routes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
