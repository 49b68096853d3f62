"""Model families and their inference defaults; UniMedVL's understanding-then-edit mode.

A checkpoint carries its family: ``port.json`` ``"family"`` for what ``import`` writes, the folder's keys for a
PyTorch folder read directly (``port/bagel.py``: UniMedVL's ``vae_model.*`` / ``vae_batch_norm.*``), a run
config's ``family`` for a training run (default ``synermedgen``). The family picks the inference defaults of
``synthesize``, ``synthesize --metadata``, ``ask`` and ``eval``; each is overridable by a flag
(:func:`add_family_arguments`, :func:`resolve`):

=============  ==========  =========  ===================  ========================  =====================
family         text CFG    image CFG  mode                 VAE resize (min–max/st)   ViT resize
=============  ==========  =========  ===================  ========================  =====================
synermedgen    4.0         1.5        edit                 the checkpoint's rules    the checkpoint's rules
bagel          4.0         1.5        edit                 the checkpoint's rules    the checkpoint's rules
unimedvl       4.0         2.0        understand-edit      32–1024 px / 16           387–980 px / 14
=============  ==========  =========  ===================  ========================  =====================

UniMedVL's values are those of its public ``codes/interactive_image_generator.py`` (``vae_transform_size
(1024, 32, 16)``, ``vit_transform_size (980, 387, 14)``, ``cfg_text_scale 4.0``, ``cfg_img_scale 2.0``,
``cfg_interval [0, 1]``, ``text_channel`` renorm, 50 timesteps, shift 3, greedy text with up to 800 tokens). Its
inferencer resizes an input image by the VAE rule first and the ViT transform resizes that again, so the ViT size
follows from the VAE size (``Inference.vit_after_vae``).

Modes (UniMedVL's ``use_thinking`` switch):

* ``edit``: the edit is conditioned on the instruction.
* ``understand-edit`` (UniMedVL's default): the model first answers the instruction about the source image
  (``inferencer(image, text=instruction, understanding_output=True)``: context ``[source as ViT tokens,
  <|im_start|> instruction <|im_end|>]``, then greedy decoding from ``<|im_start|>``); the edit is then
  conditioned on ``f"{instruction}\\n\\n{answer}"`` (the instruction alone when the answer is empty), one text
  span ``<|im_start|> … <|im_end|>`` after the source's VAE and ViT tokens, as ``interleave_inference([image,
  text])`` packs it.
* ``think-edit``: the answer comes from ``[VLM think system prompt, source (ViT), "Analyze this medical image and
  develop an editing strategy for: '{instruction}'."]``; the edit text is
  ``f"{instruction}\\n\\nBased on analysis: {answer}"``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from synermedgen_jax.data.geometry import ResizeRule, inference_rules
from synermedgen_jax.data.packing import Text, VitImage
from synermedgen_jax.data.volumes import resize_image
from synermedgen_jax.inference.loading import FAMILIES, InferenceError
from synermedgen_jax.inference.understanding import Answerer, DecodeConfig

MODES = ("edit", "understand-edit", "think-edit")

# UniMedVL's inferencer.py (VLM_THINK_SYSTEM_PROMPT) and interactive_image_generator.py (the analysis prompt).
THINK_SYSTEM_PROMPT = ("You should first think about the reasoning process in the mind and then provide the user "
                       "with the answer.\nThe reasoning process is enclosed within <think> </think> tags, i.e. "
                       "<think> reasoning process here </think> answer here")
THINK_PROMPT = "Analyze this medical image and develop an editing strategy for: '{instruction}'."


@dataclasses.dataclass(frozen=True)
class FamilyDefaults:
    cfg_text: float = 4.0
    cfg_img: float = 1.5
    mode: str = "edit"
    vae_rule: ResizeRule | None = None  # None: the checkpoint's own sizes/rules
    vit_rule: ResizeRule | None = None
    answer_tokens: int = 800  # the understanding step's token budget (UniMedVL's max_think_token_n)
    image_first: bool | None = None  # edit context order; None: the commands' own choice


DEFAULTS: dict[str, FamilyDefaults] = {
    "synermedgen": FamilyDefaults(),
    "bagel": FamilyDefaults(),
    "unimedvl": FamilyDefaults(cfg_img=2.0, mode="understand-edit",
                               vae_rule=ResizeRule(min_side=32, max_side=1024, stride=16),
                               vit_rule=ResizeRule(min_side=387, max_side=980, stride=14), image_first=True),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one command run uses: the family's defaults with the flags given applied."""

    family: str
    cfg_text: float
    cfg_img: float
    mode: str
    answer_tokens: int
    image_first: bool | None


def _rule(text: str) -> ResizeRule:
    try:
        low, high, stride = (int(v) for v in text.split(","))
        return ResizeRule(min_side=low, max_side=high, stride=stride)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX,STRIDE in pixels, got {text!r} ({err})") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FamilyOptions:
    """The options ``add_family_arguments`` adds, typed: a request dataclass of a command inherits them (None:
    the checkpoint family's default); ``resolve`` reads them by name."""

    family: str | None = None
    vae_resize: ResizeRule | None = None
    vit_resize: ResizeRule | None = None
    mode: str | None = None
    answer_tokens: int | None = None


def add_family_arguments(parser: argparse.ArgumentParser, *, generation: bool = True) -> None:
    """``--family``, ``--vae-resize``/``--vit-resize`` and (``generation``) ``--mode``, ``--answer-tokens``. The
    guidance flags (``--cfg-text``/``--cfg-img``, default None) stay with each command."""
    group = parser.add_argument_group("model family (defaults carried with the checkpoint; see inference/family.py)")
    group.add_argument("--family", choices=FAMILIES, default=None,
                       help="use this family's inference defaults instead of the checkpoint's own family "
                            "(unimedvl: guidance 4 / 2, understanding-then-edit, VAE 32-1024 px, ViT 387-980 px)")
    if generation:
        group.add_argument("--vae-resize", type=_rule, default=None, metavar="MIN,MAX,STRIDE",
                           help="VAE / generated image resize rule (default: the family's, else the checkpoint's)")
    group.add_argument("--vit-resize", type=_rule, default=None, metavar="MIN,MAX,STRIDE",
                       help="ViT image resize rule (default: the family's, else the checkpoint's)")
    if generation:
        group.add_argument("--mode", choices=MODES, default=None,
                           help="edit: conditioned on the instruction; understand-edit (UniMedVL's default): the "
                                "model first answers the instruction about the source and the edit is conditioned "
                                "on instruction + answer; think-edit: UniMedVL's thinking variant")
        group.add_argument("--answer-tokens", type=int, default=None,
                           help="token budget of the understanding step (default 800, UniMedVL's)")


def resolve(inference, args: argparse.Namespace | FamilyOptions) -> Settings:
    """The run's settings; also applies the resize rules to ``inference`` (its sizes follow them)."""
    family = getattr(args, "family", None) or getattr(inference, "family", "synermedgen")
    defaults = DEFAULTS[family]
    vae_rule = getattr(args, "vae_resize", None) or defaults.vae_rule
    vit_rule = getattr(args, "vit_resize", None) or defaults.vit_rule
    if vae_rule is not None or vit_rule is not None:
        apply_rules(inference, vae_rule, vit_rule, vit_after_vae=defaults.vit_rule is not None)
    get = lambda name, default: default if getattr(args, name, None) is None else getattr(args, name)  # noqa: E731
    settings = Settings(family=family, cfg_text=float(get("cfg_text", defaults.cfg_text)),
                        cfg_img=float(get("cfg_img", defaults.cfg_img)), mode=get("mode", defaults.mode),
                        answer_tokens=int(get("answer_tokens", defaults.answer_tokens)),
                        image_first=defaults.image_first)
    if settings.answer_tokens < 1:
        raise InferenceError(f"--answer-tokens {settings.answer_tokens}: must be at least 1")
    return settings


def apply_rules(inference, vae_rule: ResizeRule | None, vit_rule: ResizeRule | None, *,
                vit_after_vae: bool) -> None:
    """Sets ``inference``'s resize rules (each clipped to the model's position tables and strides, as
    ``geometry.inference_rules`` clips the official ones) and its square sizes."""
    config = inference.model.config
    own_vae, own_vit = inference_rules(config, vae=vae_rule, vit=vit_rule)
    if vae_rule is not None:
        inference.vae_rule = own_vae
    if vit_rule is not None:
        inference.vit_rule = own_vit
    inference.vit_after_vae = vit_after_vae
    # The fixed sizes: those of a 512 px square (every NIfTI and build slice is at most that), as loading.py.
    image_size, vit_image_size = inference.sizes_for(512, 512)
    if vae_rule is not None:
        inference.image_size = image_size
    if vit_rule is not None or vit_after_vae:
        inference.vit_image_size = vit_image_size


# ------------------------------------------------------------------------------------------------------------
# Understanding then edit.
def understanding_items(mode: str, instruction_ids: Sequence[int], vit_image: np.ndarray, encode: Callable):
    """The understanding step's context as packing items, in UniMedVL's order: ``[ViT image, question]``
    (``interleave_inference([image, text], understanding_output=True)``; the image enters as ViT tokens only),
    with the think system prompt first in ``think-edit``."""
    if mode == "think-edit":
        return [Text(encode(THINK_SYSTEM_PROMPT)), VitImage(vit_image), Text(list(instruction_ids))]
    return [VitImage(vit_image), Text(list(instruction_ids))]


def question(mode: str, instruction: str) -> str:
    return THINK_PROMPT.format(instruction=instruction) if mode == "think-edit" else instruction


def edit_text(mode: str, instruction: str, answer: str) -> str:
    """The text the edit is conditioned on (UniMedVL's ``final_instruction``)."""
    if mode == "edit" or not answer:
        return instruction
    if mode == "think-edit":
        return f"{instruction}\n\nBased on analysis: {answer}"
    return f"{instruction}\n\n{answer}"


def answers_for(inference, settings: Settings, instruction: str, sources: np.ndarray, *, seed: int = 0,
                batch_size: int = 8) -> list[str]:
    """The understanding step's answer for each source ``[N, H, W]`` (in [-1, 1]), greedy, decoded as UniMedVL's
    ``gen_text`` returns it (the text between ``<|im_start|>`` and ``<|im_end|>``, not stripped)."""
    tokenizer = inference.tokenizer
    ids = tokenizer.encode(question(settings.mode, instruction))
    groups: dict[tuple, list[int]] = {}
    for i, source in enumerate(sources):
        groups.setdefault(tuple(inference.sizes_for(*np.shape(source)[:2])[1]), []).append(i)
    answers: list[str] = [""] * len(sources)
    for vit_size, members in groups.items():
        answerer = Answerer(inference.model, tokenizer, inference.image_size, vit_size,
                            DecodeConfig(max_new_tokens=settings.answer_tokens))
        samples = [understanding_items(settings.mode, ids, resize_image(sources[i], vit_size), tokenizer.encode)
                   for i in members]
        for start in range(0, len(samples), batch_size):
            chunk = members[start:start + batch_size]
            for i, tokens in zip(chunk, answerer.generate_item_ids(samples[start:start + batch_size],
                                                                   seed=seed + start)):
                answers[i] = tokenizer.decode(tokens)
    return answers


def edit_instructions(inference, settings: Settings, instruction: str, sources: np.ndarray, *, seed: int = 0,
                      batch_size: int = 8) -> list[str]:
    """Per source, the text its edit is conditioned on (the instruction itself in ``edit`` mode)."""
    if settings.mode == "edit":
        return [instruction] * len(sources)
    answers = answers_for(inference, settings, instruction, sources, seed=seed, batch_size=batch_size)
    return [edit_text(settings.mode, instruction, answer) for answer in answers]


def generate_edits(sampler, sources: np.ndarray, instruction_ids: Sequence[Sequence[int]], *, seed: int = 0,
                   batch_size: int = 8, indices: Sequence[int] | None = None,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """``sampler.generate`` with one instruction per source: sources sharing an instruction are batched together;
    each keeps its own noise index, so the result does not depend on the grouping."""
    indices = np.arange(len(sources)) if indices is None else np.asarray(indices, np.int64)
    groups: dict[tuple, list[int]] = {}
    for i, ids in enumerate(instruction_ids):
        groups.setdefault(tuple(ids), []).append(i)
    out: list[np.ndarray | None] = [None] * len(sources)
    for ids, members in groups.items():
        images = sampler.generate(np.asarray(sources)[members], list(ids), seed=seed,
                                  batch_size=min(batch_size, len(members)), indices=indices[members],
                                  progress=progress)
        for i, image in zip(members, images):
            out[i] = image
    return np.stack(out)
