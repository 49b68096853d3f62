"""Prompt templates (CTS, MI, TIA, non-aligned VQA, Stage II and generic pre-training instructions) and the TIA
description pools.

The paper does not release its prompts or description pools; these are our own. Template ids are stored in
the instance tables, so changing a template's text changes rendered prompts but never instance identity.
Modality wording: ``volumes.MODALITIES[m].display`` (e.g. ``FLAIR (MRI)``) in questions and MI answers,
and the longer ``PHRASE`` names inside route descriptions.
"""

from __future__ import annotations

import itertools

from synermedgen_jax.data.routes import instruction
from synermedgen_jax.data.volumes import MODALITY_NAMES, display_name

LETTERS = "ABCD"

PHRASE = {
    "ct": "CT",
    "cbct": "cone-beam CT",
    "mr": "MRI",
    "t1": "T1-weighted MRI",
    "t1ce": "contrast-enhanced T1-weighted MRI",
    "t2": "T2-weighted MRI",
    "flair": "FLAIR MRI",
    "pet": "FDG PET",
}

CTS_TEMPLATES = (
    "The first image is a {src} slice. The next four images are candidate {tgt} slices A, B, C and D. "
    "Which candidate is the {tgt} slice paired with the {src} slice? Answer with one letter.",
    "Source: a {src} image (first image). Candidates A-D: four {tgt} images. Pick the candidate that shows "
    "exactly the same slice as the source. Reply with A, B, C or D.",
    "Given the {src} slice shown first, which of the following {tgt} slices (A, B, C, D) corresponds to it? "
    "Answer with the letter only.",
    "Match the {src} image to its {tgt} counterpart. The four images after it are options A to D. "
    "Which option is the true pair?",
)

# Text placed before each image of a multi-image question, so an answer can refer to an image by the label the
# prompt gave it ("A: CT" names the image after "A:") instead of by its rank among unlabelled images.
MI_IMAGE_LABELS = ("A:", "B:", "C:", "D:")
CTS_IMAGE_LABELS = ("Source:", "A:", "B:", "C:", "D:")
TIA_IMAGE_LABELS = ("x1:", "x2:")

MI_TEMPLATES = (
    "Identify the imaging modality of each of the four images A, B, C and D.",
    "Four medical images follow, labelled A to D in order. Name the modality of each one.",
    "What modality is each image? Answer in the form 'A: modality, B: modality, C: modality, D: modality'.",
    "Classify the acquisition modality of panels A, B, C and D.",
)

TIA_TEMPLATES = (
    "The first image is x1 and the second is x2. Which description best matches the transformation from "
    "x1 to x2?\n{options}\nAnswer with one letter.",
    "Image pair (x1, then x2). Choose the instruction that turns x1 into x2.\n{options}",
    "Which of these describes how the second image was obtained from the first?\n{options}\n"
    "Reply with A, B, C or D.",
    "Select the transformation x1 -> x2 shown by the two images.\n{options}",
)

GEN_TEMPLATES = (
    "Translate this {src} image into a {tgt} image.",
    "Synthesize the corresponding {tgt} slice from the given {src} slice.",
    "Generate the {tgt} image of the same anatomy shown in this {src} image.",
    "Convert {src} to {tgt}.",
)

# Generic generation pre-training (data/gen_pretrain.py): same-modality edits of one slice, never a cross-modal
# pair; two phrasings per edit, {mod} is the slice's modality.
GEN_PRETRAIN_TEMPLATES = {
    "slice_up": ("Show the next slice above this {mod} slice.",
                 "Generate the {mod} slice just above this one."),
    "slice_down": ("Show the next slice below this {mod} slice.",
                   "Generate the {mod} slice just below this one."),
    "flip": ("Mirror this {mod} image left to right.", "Flip this {mod} slice horizontally."),
    "denoise": ("Remove the noise from this {mod} image.", "Denoise this {mod} slice."),
    "brighten": ("Brighten this {mod} image.", "Make this {mod} slice brighter."),
    "darken": ("Darken this {mod} image.", "Make this {mod} slice darker."),
    "contrast": ("Increase the contrast of this {mod} image.", "Stretch the contrast of this {mod} slice."),
}
GEN_PRETRAIN_EDITS = tuple(GEN_PRETRAIN_TEMPLATES)


def gen_pretrain_instruction(edit: str, template: int, modality: str) -> str:
    """The instruction of a generic pre-training edit of a ``modality`` slice."""
    return GEN_PRETRAIN_TEMPLATES[edit][template].format(mod=display_name(modality))


# Generic phrasings of an ordered route (src -> tgt); each route also gets its specific phrasings below.
_GENERIC_DESCRIPTIONS = (
    "Translate a {src} image into a {tgt} image.",
    "Synthesize {tgt} from {src}.",
    "Convert the {src} scan into its {tgt} counterpart.",
    "Map {src} appearance onto {tgt} appearance.",
    "Generate a {tgt} slice from a {src} slice of the same anatomy.",
    "{src} to {tgt} image synthesis.",
    "Predict how this {src} anatomy would look on {tgt}.",
    "Cross-modality translation from {src} to {tgt}.",
    "Render the {src} input as a {tgt} image.",
    "Estimate the {tgt} image that matches the {src} input.",
)

_SPECIFIC_DESCRIPTIONS = {
    ("t1", "t1ce"): ("Add gadolinium contrast enhancement to a non-contrast T1-weighted MRI.",
                     "Simulate the post-contrast T1 scan from the pre-contrast one."),
    ("t1ce", "t1"): ("Remove the contrast enhancement from a post-gadolinium T1-weighted MRI.",
                     "Recover the pre-contrast T1 scan from the post-contrast one."),
    ("t2", "flair"): ("Suppress the fluid signal of a T2-weighted MRI to obtain FLAIR.",),
    ("flair", "t2"): ("Restore the bright fluid signal, turning FLAIR into a T2-weighted MRI.",),
    ("cbct", "ct"): ("Correct cone-beam CT artefacts to produce a diagnostic-quality CT.",),
    ("ct", "cbct"): ("Degrade a CT into a noisier cone-beam CT with shading artefacts.",),
    ("ct", "pet"): ("Estimate FDG uptake from the anatomy seen on CT.",),
    ("pet", "ct"): ("Recover CT attenuation anatomy from an FDG PET image.",),
    ("mr", "ct"): ("Create a synthetic CT from MRI, as for MR-only radiotherapy planning.",),
    ("t1", "ct"): ("Create a synthetic CT from a T1-weighted MRI, as for MR-only planning.",),
    ("ct", "mr"): ("Derive MRI soft-tissue contrast from a CT scan.",),
    ("ct", "t1"): ("Derive T1-weighted soft-tissue contrast from a CT scan.",),
}


def description_pool(src: str, tgt: str) -> tuple[str, ...]:
    """All phrasings of the ordered route ``src -> tgt`` (at least 10)."""
    generic = tuple(t.format(src=PHRASE[src], tgt=PHRASE[tgt]) for t in _GENERIC_DESCRIPTIONS)
    return generic + _SPECIFIC_DESCRIPTIONS.get((src, tgt), ())


# Non-aligned VQA: generic questions about the same images that need no cross-modal correspondence.
VQA_QUESTIONS = {
    "anatomy": ("Which body region does this image show?", ("brain", "pelvis", "whole body", "chest",
                                                            "abdomen", "knee")),
    "plane": ("In which anatomical plane is this slice?", ("axial", "coronal", "sagittal")),
    "position": ("Is this axial slice from the inferior, middle or superior third of the scan?",
                 ("inferior third", "middle third", "superior third")),
    "coverage": ("About how much of the image area is covered by the body?",
                 ("less than a quarter", "a quarter to a half", "a half to three quarters",
                  "more than three quarters")),
    "brighter": ("Which of the two images is brighter on average?", ("the first image", "the second image")),
}
VQA_TYPES = tuple(VQA_QUESTIONS)
VQA_TEMPLATE = "{question}\n{options}\nAnswer with one letter."


def format_options(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def generation_instruction(template: int, src: str, tgt: str, anatomy: str) -> str:
    """The Stage II instruction of a pair. Template 0 is the task registry's wording for the route — the exact
    sentence ``eval`` and ``synthesize`` give the model — so training covers what inference asks; the others
    vary the phrasing."""
    if template == 0:
        return instruction(src, tgt, anatomy)
    return GEN_TEMPLATES[template].format(src=display_name(src), tgt=display_name(tgt))


def mi_answer(modalities: list[str]) -> str:
    return ", ".join(f"{LETTERS[i]}: {display_name(m)}" for i, m in enumerate(modalities))


def corpus() -> list[str]:
    """Every text the embedded tokenizer should encode compactly: all templates rendered with all modality
    names, all description pools, all VQA options and the answers."""
    texts: list[str] = []
    pairs = list(itertools.permutations(MODALITY_NAMES, 2))
    for src, tgt in pairs:
        for t in CTS_TEMPLATES + GEN_TEMPLATES:
            texts.append(t.format(src=display_name(src), tgt=display_name(tgt)))
        for anatomy in ("brain", "pelvis", "whole-body"):
            texts.append(generation_instruction(0, src, tgt, anatomy))
        texts.extend(description_pool(src, tgt))
    for modality in MODALITY_NAMES:
        texts.extend(t.format(mod=display_name(modality)) for ts in GEN_PRETRAIN_TEMPLATES.values() for t in ts)
    for t in MI_TEMPLATES:
        texts.append(t)
    for t in TIA_TEMPLATES:
        texts.append(t.format(options=format_options([description_pool(*p)[0] for p in pairs[:4]])))
    for question, options in VQA_QUESTIONS.values():
        texts.append(VQA_TEMPLATE.format(question=question, options=format_options(list(options[:4]))))
    for combo in itertools.islice(itertools.permutations(MODALITY_NAMES, 4), 0, None, 7):
        texts.append(mi_answer(list(combo)))
    texts.extend(LETTERS)
    texts.extend(MI_IMAGE_LABELS + CTS_IMAGE_LABELS + TIA_IMAGE_LABELS)
    return texts
