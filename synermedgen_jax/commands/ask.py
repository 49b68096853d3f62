"""Answer a question about images with the understanding expert (KV-cached autoregressive decoding).

  python -m synermedgen_jax ask --checkpoint runs/stage1 --image a.png --image case/ct.nii.gz:40 \
      --prompt "Which modality is each panel? ..." [--max-new-tokens 32] [--temperature 0.7 --top-p 0.9]

--image takes a PNG/JPEG (converted to grey) or a NIfTI slice ``FILE.nii.gz:INDEX`` (axial index in RAS+
orientation, display orientation as the training data; without an index the middle slice). NIfTI slices
are normalised with --modality's rule (ct/cbct: HU window; pet: SUV clip; MR names or none: the volume's
0.5-99.5 percentiles). The prompt comes first and the images follow it, as in training; --label gives each
image the text placed before it (training's multi-image questions label their images: MI "A:" .. "D:", CTS
"Source:" "A:" .. "D:", TIA "x1:" "x2:"; data/prompts.py). Greedy by default
(--temperature 0); with a temperature, nucleus sampling with --top-p and --seed. Prints the answer.

Limits, checked before the checkpoint is read (exit status 2, one line): --prompt at most 32,768 characters
(BAGEL's context), --max-new-tokens 1..8,192, a finite --temperature >= 0, --top-p in (0, 1], at most 64
images, PNG/JPEG pictures of at most 8192 x 8192 pixels, NIfTI volumes with a usable affine (no zero spacing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from synermedgen_jax.commands._args import (
    MAX_IMAGE_PIXELS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    bounded_text,
    float_range,
    int_range,
    non_negative_float,
)
from synermedgen_jax.data.routes import valid_modalities
from synermedgen_jax.data.volumes import DataError, load_volume, norm_params, normalise
from synermedgen_jax.inference import family, loading
from synermedgen_jax.inference.loading import InferenceError
from synermedgen_jax.inference.understanding import Answerer, DecodeConfig

MAX_IMAGES = 64  # images per question (training's questions hold at most 5)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="training workdir, step directory, what import writes, or a BAGEL / SynerMedGen folder "
                             "(converted on the fly)")
    parser.add_argument("--image", action="append", default=[], help="PNG or FILE.nii[.gz][:INDEX]; repeatable")
    parser.add_argument("--prompt", required=True, type=bounded_text(MAX_PROMPT_CHARS),
                        help=f"the question (at most {MAX_PROMPT_CHARS} characters)")
    parser.add_argument("--label", action="append", default=[], type=bounded_text(256),
                        help="text before the matching --image (e.g. A:); none or one per image")
    parser.add_argument("--modality", help="modality of the NIfTI images (normalisation rule)")
    parser.add_argument("--max-new-tokens", type=int_range(1, MAX_NEW_TOKENS), default=32,
                        help=f"answer length limit, 1..{MAX_NEW_TOKENS} (32)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float_range(0.0, 1.0, low_open=True), default=1.0,
                        help="nucleus mass in (0, 1] (1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer",
                        help="tokenizer.json or Qwen2-format folder (default: the checkpoint's own: an import's "
                             "tokenizer/, the BAGEL "
                             "folder's, or the run's data folder); refused when its ids differ from the weights'")
    family.add_family_arguments(parser, generation=False)


def load_image(spec: str, modality: str | None = None) -> np.ndarray:
    """``[H, W]`` float32 in [-1, 1] from a picture file or ``volume.nii.gz[:index]``."""
    path_text, _, index_text = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
    path = Path(path_text)
    if not path.is_file():
        raise InferenceError(f"--image {spec}: {'not a file' if path.exists() else 'file not found'}")
    if not path.name.endswith((".nii", ".nii.gz")):
        if index_text:
            raise InferenceError(f"--image {spec}: a slice index is for NIfTI volumes only")
        try:
            with Image.open(path) as picture:  # reads the header only: the size is known before any decoding
                width, height = picture.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InferenceError(f"--image {spec}: {width}x{height} pixels is more than the "
                                         f"{MAX_IMAGE_PIXELS} accepted; downscale it first")
                grey = np.asarray(picture.convert("L"), np.float32)
        except Image.DecompressionBombError as err:  # PIL refuses before we see the size (over 2x its limit)
            raise InferenceError(f"--image {spec}: too many pixels ({str(err).split('(')[0].strip()})") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise InferenceError(f"--image {spec}: not a readable image ({err})") from None
        return grey / 127.5 - 1.0
    try:
        volume = load_volume(path)
    except DataError as err:
        raise InferenceError(f"--image {err}") from None
    depth = volume.data.shape[2]
    index = int(index_text) if index_text else depth // 2
    if not 0 <= index < depth:
        raise InferenceError(f"--image {spec}: slice {index} out of range (the volume has {depth} axial slices)")
    try:
        params = norm_params(modality or "mr", volume.data, None)
    except DataError as err:
        raise InferenceError(f"--image {spec}: {err}") from None
    return normalise(volume.data[:, ::-1, index].T, params)  # display orientation: row 0 anterior


def main(args: argparse.Namespace) -> int:
    try:
        if args.modality is not None:
            if args.modality not in valid_modalities():
                raise loading.InferenceError(f"--modality: unknown {args.modality!r}; valid: "
                                             f"{', '.join(valid_modalities())}")
        if not args.prompt.strip():
            raise loading.InferenceError("--prompt: empty; give the question to answer")
        if len(args.image) > MAX_IMAGES:
            raise loading.InferenceError(f"--image: {len(args.image)} images; at most {MAX_IMAGES} per question")
        config = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
        if args.label and len(args.label) != len(args.image):
            raise loading.InferenceError(f"--label: {len(args.label)} labels for {len(args.image)} images; give "
                                         "none or one per --image")
        images = [load_image(spec, args.modality) for spec in args.image]
        inference = loading.load_for_inference(args.checkpoint, tokenizer=args.tokenizer)
        settings = family.resolve(inference, args)  # the family's ViT rule (UniMedVL: after its VAE rule)
        # A checkpoint with the official geometry sees the images aspect-preserved (the first image's sizes).
        image_size, vit_image_size = inference.sizes_for(*np.shape(images[0])[:2]) if images else (
            inference.image_size, inference.vit_image_size)
        # UniMedVL's inferencer puts the images before the question.
        answerer = Answerer(inference.model, inference.tokenizer, image_size, vit_image_size, config,
                            image_first=bool(settings.image_first))
        answer = answerer.answer([(args.prompt, images, tuple(args.label))], seed=args.seed)[0]
    except ValueError as err:  # InferenceError and DecodeConfig's checks
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(answer)
    return 0
