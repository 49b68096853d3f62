"""Image geometry: the official aspect-preserving resize rule (BAGEL's ``MaxLongEdgeMinShortEdgeResize``).

A rule maps an image of ``(height, width)`` to the size the model sees: scale so that the long side is at most
``max_side`` and the short side at least ``min_side`` (the short side wins when both cannot hold), round each side
to a multiple of ``stride``, then shrink again if the pixel count exceeds ``max_pixels / images`` or the long side
exceeds ``max_side``. The official code uses it everywhere an image enters the model; the named rules below are
the release's values (BAGEL's data config and its image-editing inference script).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from synermedgen_jax.data.volumes import resize_image
from synermedgen_jax.stages import DataStage

DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024  # BAGEL's ImageTransform default (1,806,336)


@dataclasses.dataclass(frozen=True)
class ResizeRule:
    """Aspect-preserving resize bounds. ``size_for(h, w)`` gives the ``(H, W)`` an image is resized to."""

    min_side: int
    max_side: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if not 0 < self.min_side <= self.max_side or self.stride <= 0 or self.max_pixels <= 0:
            raise ValueError(f"ResizeRule: need 0 < min_side <= max_side and a positive stride/max_pixels, got "
                             f"{self}")

    def _scaled(self, height: float, width: float, scale: float) -> tuple[int, int]:
        def side(value: float) -> int:
            return max(self.stride, int(round(round(value * scale) / self.stride) * self.stride))

        return side(height), side(width)

    def size_for(self, height: int, width: int, images: int = 1) -> tuple[int, int]:
        """``(H, W)``, both multiples of ``stride``, for an image of ``height × width`` (one of ``images``
        sharing the pixel budget, as BAGEL's ``img_num``)."""
        if height <= 0 or width <= 0:
            raise ValueError(f"ResizeRule: image size {height}x{width} is empty")
        scale = min(self.max_side / max(height, width), 1.0)
        scale = max(scale, self.min_side / min(height, width))
        new_h, new_w = self._scaled(height, width, scale)
        budget = self.max_pixels / images
        if new_h * new_w > budget:
            new_h, new_w = self._scaled(new_h, new_w, budget / (new_h * new_w))
        if max(new_h, new_w) > self.max_side:
            new_h, new_w = self._scaled(new_h, new_w, self.max_side / max(new_h, new_w))
        return new_h, new_w

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``[H, W]`` → the resized ``[H', W']`` float32 (the project's one resize, ``volumes.resize_image``)."""
        return resize_image(image, self.size_for(*np.shape(image)[:2]))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The release's rules (BAGEL data config `unified_edit` / `vlm_sft`, and the image-editing inference script).
EDIT_VAE = ResizeRule(min_side=512, max_side=1024, stride=16)
EDIT_VIT = ResizeRule(min_side=224, max_side=518, stride=14)
VLM_VIT = ResizeRule(min_side=378, max_side=980, stride=14, max_pixels=2_007_040)
INFERENCE_VAE = ResizeRule(min_side=512, max_side=1024, stride=16)
INFERENCE_VIT = ResizeRule(min_side=378, max_side=980, stride=14)


# ----------------------------------------------------------------------------------------------- pack slots
#
# Packs have static shapes: a VAE image lives in one of ``vae_images`` slots of ``image_size`` pixels, and a ViT
# image may be at most ``vit_image_size``. With the official rules, the slots are the rules applied to the
# build's slice shape (:meth:`ImageRules.slots`, resolved at training start by ``training/inputs.pack_budget``),
# and each image is then resized by its rule and *fitted* to its slot (:func:`fit_into`):
#
# * a rule size that fits the slot is kept: a smaller VAE image sits at the slot's top-left with zeros around it
#   and only its own latent tokens enter the sequence (BAGEL zero-pads its VAE batch top-left the same way and
#   takes ``latent[:h, :w]``); a smaller ViT image just has fewer patches;
# * a rule size larger than the slot on a side (an image bigger than the build's first slice) is scaled down,
#   aspect kept, to the largest stride multiple that fits, and counted (:attr:`SlotResize.fitted`, logged).

ROLES = ("vae", "vit", "vlm_vit")  # VAE images; ViT images of edits; ViT images of understanding samples
CONFIG_KEYS = {"vae": "vae_resize", "vit": "vit_resize", "vlm_vit": "vlm_vit_resize"}  # fields of config.data.pack
# Which ViT rules a data stage uses (stages.DataStage): understanding samples, edits, or both.
_STAGE_VIT_ROLES = {DataStage.STAGE1: ("vlm_vit",), DataStage.VQA: ("vlm_vit",), DataStage.STAGE2: ("vit",),
                    DataStage.GEN_PRETRAIN: ("vit",), DataStage.MIXED: ("vit", "vlm_vit"),
                    DataStage.UND_PRETRAIN: ("vlm_vit",)}


def fit_into(size: tuple[int, int], slot: tuple[int, int], stride: int) -> tuple[int, int]:
    """``size`` when it fits ``slot`` (both ``(H, W)``); else scaled down, aspect kept, to the largest multiples
    of ``stride`` that fit (at least one stride per side)."""
    height, width = int(size[0]), int(size[1])
    if height <= slot[0] and width <= slot[1]:
        return height, width
    scale = min(slot[0] / height, slot[1] / width)
    return (max(stride, int(height * scale) // stride * stride), max(stride, int(width * scale) // stride * stride))


def rule_from_config(value) -> ResizeRule | None:
    """A rule from a config value: None, a :class:`ResizeRule`, or a mapping of its fields (``ConfigDict``)."""
    if value is None or isinstance(value, ResizeRule):
        return value
    fields = {f.name for f in dataclasses.fields(ResizeRule)}
    items = dict(value.items()) if hasattr(value, "items") else None
    if items is None or not set(items) <= fields:
        raise ValueError(f"a resize rule is None or a dict of {sorted(fields)}, got {value!r}")
    return ResizeRule(**{k: int(v) for k, v in items.items()})


@dataclasses.dataclass(frozen=True)
class ImageRules:
    """The official geometry of a run (``config.data.pack.{vae,vit,vlm_vit}_resize``); all None: fixed squares."""

    vae: ResizeRule | None = None
    vit: ResizeRule | None = None
    vlm_vit: ResizeRule | None = None

    @classmethod
    def from_pack(cls, pack) -> ImageRules:
        """From a ``config.data.pack`` (a missing field is None)."""
        get = pack.get if hasattr(pack, "get") else (lambda key, default=None: getattr(pack, key, default))
        return cls(**{role: rule_from_config(get(key, None)) for role, key in CONFIG_KEYS.items()})

    @property
    def any(self) -> bool:
        return any(getattr(self, role) is not None for role in ROLES)

    def slots(self, slice_shape: tuple[int, int], stage: str, image_size: tuple[int, int],
              vit_image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(image_size, vit_image_size)`` for slices of ``slice_shape`` in data stage ``stage``: each rule's size
        of the slice (the ViT slot: the largest of the stage's ViT rules); a role without a rule keeps the given
        fixed size."""
        height, width = int(slice_shape[0]), int(slice_shape[1])
        vae = self.vae.size_for(height, width) if self.vae else tuple(image_size)
        vits = [getattr(self, role).size_for(height, width) for role in _STAGE_VIT_ROLES.get(stage, ROLES[1:])
                if getattr(self, role) is not None]
        vit = (max(s[0] for s in vits), max(s[1] for s in vits)) if vits else tuple(vit_image_size)
        return (int(vae[0]), int(vae[1])), (int(vit[0]), int(vit[1]))

    def check_model(self, latent_stride: int, max_latent_size: int, vit_patch: int, vit_max_side: int) -> None:
        """Raises (one line) when a rule's stride is not a multiple of the model's (latent stride / ViT patch) or
        its largest size exceeds the model's position tables (``max_latent_size``, ViT patches per side)."""
        checks = (("vae", latent_stride, max_latent_size, "model.max_latent_size"),
                  ("vit", vit_patch, vit_max_side, "model.vit.max_num_patch_per_side"),
                  ("vlm_vit", vit_patch, vit_max_side, "model.vit.max_num_patch_per_side"))
        for role, stride, table, field in checks:
            rule = getattr(self, role)
            if rule is None:
                continue
            if rule.stride % stride:
                raise ValueError(f"config.data.pack.{CONFIG_KEYS[role]}: stride {rule.stride} is not a multiple of "
                                 f"the model's {stride} px")
            if rule.max_side // stride > table:
                raise ValueError(f"config.data.pack.{CONFIG_KEYS[role]}: max_side {rule.max_side} px is "
                                 f"{rule.max_side // stride} tokens per side, more than {field}={table}")


class SlotResize:
    """One image role's resize: ``rule`` (None: straight to the fixed ``slot``, the tiny/small configs), then
    :func:`fit_into` the slot. ``fitted`` counts images the slot made smaller than their rule size."""

    def __init__(self, slot: tuple[int, int], rule: ResizeRule | None = None, name: str = "image"):
        self.slot, self.rule, self.name = (int(slot[0]), int(slot[1])), rule, name
        self.fitted = 0

    def size_for(self, height: int, width: int, images: int = 1) -> tuple[int, int]:
        if self.rule is None:
            return self.slot
        size = self.rule.size_for(height, width, images)
        fitted = fit_into(size, self.slot, self.rule.stride)
        if fitted != size:
            self.fitted += 1
            if self.fitted in (1, 10, 100, 1000) or self.fitted % 10000 == 0:
                logging.warning("%s: %d image(s) larger than the %dx%d slot after the resize rule, scaled down to "
                                "fit (latest %dx%d -> %dx%d)", self.name, self.fitted, *self.slot, *size, *fitted)
        return fitted

    def __call__(self, image: np.ndarray, images: int = 1) -> np.ndarray:
        """``[H, W]`` or ``[H, W, C]`` → float32 at :meth:`size_for` (``images``: how many share BAGEL's
        ``max_pixels``, a conversation's image count)."""
        return resize_image(image, self.size_for(*np.shape(image)[:2], images=images))


class PackImages:
    """The data-side image transform of a pack: VAE images, edit ViT images and understanding ViT images,
    each by its rule (``rules``; None everywhere: the fixed squares ``image_size`` / ``vit_image_size``)."""

    def __init__(self, image_size: tuple[int, int], vit_image_size: tuple[int, int],
                 rules: ImageRules | None = None):
        rules = rules or ImageRules()
        self.vae = SlotResize(image_size, rules.vae, "VAE image")
        self.vit = SlotResize(vit_image_size, rules.vit, "ViT image (edit)")
        self.vlm_vit = SlotResize(vit_image_size, rules.vlm_vit, "ViT image (understanding)")

    @classmethod
    def for_budget(cls, budget, rules: ImageRules | None = None) -> PackImages:
        return cls(tuple(budget.image_size), tuple(budget.vit_image_size), rules)


def inference_rules(model_config, *, vae: ResizeRule | None = None, vit: ResizeRule | None = None
                    ) -> tuple[ResizeRule, ResizeRule]:
    """``(vae_rule, vit_rule)`` for inference with a model that brings no run config (an imported checkpoint):
    the official inference rules (:data:`INFERENCE_VAE`, :data:`INFERENCE_VIT`; ``vae``/``vit``: another
    family's, inference/family.py) on the model's own strides, their bounds clipped to what its position tables
    cover (a tiny test model's tables are far smaller than BAGEL's)."""
    latent_stride = int(model_config.latent_patch_size) * 2 ** (len(model_config.vae.ch_mult) - 1)
    vae_cover = int(model_config.max_latent_size) * latent_stride  # one latent token per stride² pixels
    vit_stride = int(model_config.vit.patch_size)
    vit_cover = int(model_config.vit.max_num_patch_per_side) * vit_stride

    def clipped(rule: ResizeRule, stride: int, cover: int) -> ResizeRule:
        top = min(rule.max_side, cover) // stride * stride
        return ResizeRule(min_side=min(rule.min_side, top), max_side=top, stride=stride, max_pixels=rule.max_pixels)

    return (clipped(vae or INFERENCE_VAE, latent_stride, vae_cover),
            clipped(vit or INFERENCE_VIT, vit_stride, vit_cover))
