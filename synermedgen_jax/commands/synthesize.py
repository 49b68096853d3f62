"""NIfTI in, NIfTI out: synthesize a target-modality volume from a source volume, slice by slice.

  python -m synermedgen_jax synthesize --checkpoint runs/stage2 --input case/cbct.nii.gz \
      --source-modality cbct --target-modality ct --output case/sct.nii.gz [--mask case/mask.nii.gz]

The route's instruction comes from the task registry (data/routes.py; --task picks one when several
datasets share a route). The input is normalised with its modality's rule, cut into axial slices like the
training data, synthesized in batches (flow matching, --steps timesteps, three-pass CFG, KV cache) and
written in the target's native units (HU for CT/CBCT, SUV for PET; MR targets: --target-window, default
0..1000) with the input's affine and header geometry. Slices without foreground are not synthesized.
The same --seed gives the same volume whatever --batch-size. Modalities: ct, cbct, mr, t1, t1ce, t2, flair, pet.

  python -m synermedgen_jax synthesize --checkpoint runs/stage2 --metadata metadata.json --image-root DIR \
      --output-dir OUT

follows the official inference convention instead: {key: {"id": path under DIR, "prompt": text}} -> OUT/<key>.png
(RGB at the generated size cropped to its bounding box, or --output-style ours: grey at the source's size), keys
with an existing output skipped, --split-count/--split-index over the keys in file order (inference/metadata.py).

Exit status 2 with a one-line error for bad input (unknown modality or route, a 2-D/4-D or non-NIfTI file, a
zero voxel spacing, a --mask off the input's grid or with no voxel inside, an input with no foreground, a
non-finite or inverted --target-window, --output equal to --input or existing without --force, a checkpoint of
another config); nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from synermedgen_jax.commands import synthesize_metadata
from synermedgen_jax.commands._args import int_range, non_negative_float, positive_float, positive_int, window
from synermedgen_jax.commands._runner import request_from
from synermedgen_jax.data.volumes import DataError, check_affine, modality_foreground
from synermedgen_jax.inference import family
from synermedgen_jax.inference.loading import InferenceError, load_for_inference
from synermedgen_jax.inference.sampler import Sampler, SamplerConfig, inference_mesh
from synermedgen_jax.inference.synthesize import (
    NIFTI_SUFFIXES,
    read_nifti,
    resolve_route,
    synthesize_volume,
    write_nifti,
)


@dataclasses.dataclass(frozen=True)
class SynthesisRequest(family.FamilyOptions):
    """One volume to synthesize, typed (``synthesize``'s options; quickstart builds one). None for a guidance or
    family option: the checkpoint family's default (inference/family.py)."""

    checkpoint: str
    input: str
    source_modality: str
    target_modality: str
    output: str
    mask: str | None = None
    task: str | None = None
    steps: int = 50
    shift: float = 3.0
    cfg_text: float | None = None
    cfg_img: float | None = None
    renorm: str = "text_channel"
    batch_size: int = 8
    devices: int = 1
    seed: int = 0
    target_window: tuple[float, float] | None = None
    tokenizer: str | None = None
    force: bool = False
    progress: bool = True


# How command_line spells the request's fields that are not --field-name options.
FLAGS = {"progress": "--no-progress"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="training workdir, step directory, what import writes, or a BAGEL / SynerMedGen folder "
                             "(converted on the fly)")
    parser.add_argument("--input", help="source volume (.nii or .nii.gz)")
    parser.add_argument("--source-modality", help="modality of --input")
    parser.add_argument("--target-modality", help="modality to synthesize")
    parser.add_argument("--output", help="output volume (.nii or .nii.gz)")
    synthesize_metadata.add_metadata_arguments(parser)
    parser.add_argument("--mask", help="body mask volume (same grid): synthesize inside it, background outside")
    parser.add_argument("--task", help="registry task whose instruction to use, e.g. synthrad2023/brain/cbct->ct")
    parser.add_argument("--steps", type=int_range(2, 1000), default=SynthesisRequest.steps,
                        help="flow-matching timesteps, 2..1000 (50; steps-1 Euler steps)")
    parser.add_argument("--shift", type=positive_float, default=SynthesisRequest.shift, help="timestep shift (3.0)")
    parser.add_argument("--cfg-text", type=non_negative_float, default=None,
                        help="text guidance scale (default: the checkpoint family's, 4.0)")
    parser.add_argument("--cfg-img", type=non_negative_float, default=None,
                        help="image guidance scale (default: the checkpoint family's, 1.5; UniMedVL 2.0)")
    parser.add_argument("--renorm", choices=("text_channel", "channel", "global"), default=SynthesisRequest.renorm)
    parser.add_argument("--batch-size", type=positive_int, default=SynthesisRequest.batch_size,
                        help="slices per batch (8)")
    parser.add_argument("--devices", type=positive_int, default=SynthesisRequest.devices,
                        help="split each batch's slices over this many local devices (1; the batch size is rounded "
                             "up to a multiple)")
    parser.add_argument("--seed", type=int, default=SynthesisRequest.seed, help="noise seed (0)")
    parser.add_argument("--target-window", type=window(), metavar="LO,HI",
                        help="native-unit window of the output (default: CT -1024,3071 HU or the build's; "
                             "PET 0,SUVmax; MR 0,1000)")
    parser.add_argument("--tokenizer",
                        help="tokenizer.json or Qwen2-format folder (default: the checkpoint's own: an import's "
                             "tokenizer/, the BAGEL "
                             "folder's, or the run's data folder); refused when its ids differ from the weights'")
    parser.add_argument("--force", action="store_true", help="overwrite --output (even when it is --input)")
    family.add_family_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _check_volumes(request: SynthesisRequest, image, mask) -> None:
    """Before the checkpoint is loaded: usable affines (no zero spacing), a mask on the input's grid with at least
    one voxel inside, or without a mask an input with some foreground (either would otherwise write an
    all-background volume with exit 0: refused instead, exit 2)."""
    try:
        check_affine(request.input, image.affine)
        if mask is not None:
            check_affine(request.mask, mask.affine)
    except DataError as err:
        raise InferenceError(str(err)) from None
    if mask is None:
        if not modality_foreground(request.source_modality, np.asarray(image.dataobj, np.float32)).any():
            raise InferenceError(f"--input {request.input}: no foreground voxel by the {request.source_modality} "
                                 "rule (an empty or constant volume); nothing would be synthesized")
        return
    if tuple(mask.shape[:3]) != tuple(image.shape[:3]) or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise InferenceError(f"--mask {request.mask}: shape {tuple(mask.shape)} / affine do not match the input "
                             f"{tuple(image.shape)}")
    if not np.any(np.asarray(mask.dataobj) > 0.5):
        raise InferenceError(f"--mask {request.mask}: no voxel is inside the mask (all values <= 0.5); nothing would "
                             "be synthesized")


def main(args: argparse.Namespace) -> int:
    if args.metadata:  # the official metadata convention (commands/synthesize_metadata.py)
        return synthesize_metadata.main(args)
    missing = [f"--{n.replace('_', '-')}" for n in ("input", "source_modality", "target_modality", "output")
               if not getattr(args, n)]
    if missing:
        return _error(f"{', '.join(missing)} required (or --metadata FILE --image-root DIR --output-dir DIR)")
    return run(request_from(SynthesisRequest, args, progress=not args.no_progress))


def run(request: SynthesisRequest) -> int:
    """Synthesizes ``request.output`` from ``request.input``: the typed entry point of ``synthesize`` (quickstart
    calls it). A bad input is one error line, exit status 2, with nothing written."""
    try:
        for name in ("steps", "batch_size", "devices"):
            if getattr(request, name) < (2 if name == "steps" else 1):
                raise InferenceError(f"--{name.replace('_', '-')}: {getattr(request, name)} is too small")
        task = resolve_route(request.source_modality, request.target_modality, task=request.task)
        output = Path(request.output)
        if not output.name.endswith(NIFTI_SUFFIXES):
            raise InferenceError(f"--output {output}: must end in .nii or .nii.gz")
        same = output.exists() and Path(request.input).exists() and output.resolve() == Path(request.input).resolve()
        if same and not request.force:
            raise InferenceError(f"--output {output} is the input file; refusing to overwrite it without --force")
        if output.exists() and not request.force:
            raise InferenceError(f"--output {output} exists; pass --force to overwrite it")
        image = read_nifti(request.input)
        mask = read_nifti(request.mask) if request.mask else None
        _check_volumes(request, image, mask)
        mesh = inference_mesh(request.devices)
        inference = load_for_inference(request.checkpoint, tokenizer=request.tokenizer, mesh=mesh)
        if inference.source:  # prefer the phrasing of the dataset the run was trained on
            task = resolve_route(request.source_modality, request.target_modality, task=request.task,
                                 dataset=inference.source)
        settings = family.resolve(inference, request)
        config = SamplerConfig(num_steps=request.steps, shift=request.shift, cfg_text=settings.cfg_text,
                               cfg_img=settings.cfg_img, renorm=request.renorm)
        sampler = Sampler(inference.model, inference.special, inference.image_size, inference.vit_image_size, config,
                          mesh=mesh, image_first=bool(settings.image_first))
        edit_texts = None if settings.mode == "edit" else (
            lambda slices: family.edit_instructions(inference, settings, task.instruction, slices, seed=request.seed,
                                                    batch_size=request.batch_size))
        bar = tqdm(total=0, unit="slice", disable=not request.progress, file=sys.stderr, desc=task.name)

        def on_total(n: int) -> None:
            bar.total = n
            bar.refresh()

        try:
            volume = synthesize_volume(inference, image, request.source_modality, request.target_modality,
                                       task.instruction, mask=mask, sampler=sampler, batch_size=request.batch_size,
                                       seed=request.seed, target_window=request.target_window, progress=bar.update,
                                       on_total=on_total, edit_texts=edit_texts)
        finally:
            bar.close()
        write_nifti(output, volume, image)
    except (InferenceError, ValueError) as err:
        return _error(str(err).splitlines()[0])
    print(f"wrote {output} ({task.name}: {volume.shape}, {volume.min():.4g}..{volume.max():.4g}; family "
          f"{settings.family}, {settings.mode}, guidance {settings.cfg_text:g}/{settings.cfg_img:g})")
    return 0
