"""Image geometry: the official aspect-preserving resize rule (BAGEL's ``MaxLongEdgeMinShortEdgeResize``).

A rule maps an image of ``(height, width)`` to the size the model sees: scale so that the long side is at most
``max_side`` and the short side at least ``min_side`` (the short side wins when both cannot hold), round each side
to a multiple of ``stride``, then shrink again if the pixel count exceeds ``max_pixels / images`` or the long side
exceeds ``max_side``. The official code uses it everywhere an image enters the model; the named rules below are
the release's values (BAGEL's data config and its image-editing inference script).
"""

from __future__ import annotations

import dataclasses

import numpy as np

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
        from synermedgen_jax.data.volumes import resize_image

        return resize_image(image, self.size_for(*np.shape(image)[:2]))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The release's rules (BAGEL data config `unified_edit` / `vlm_sft`, and the image-editing inference script).
EDIT_VAE = ResizeRule(min_side=512, max_side=1024, stride=16)
EDIT_VIT = ResizeRule(min_side=224, max_side=518, stride=14)
VLM_VIT = ResizeRule(min_side=378, max_side=980, stride=14, max_pixels=2_007_040)
INFERENCE_VAE = ResizeRule(min_side=512, max_side=1024, stride=16)
INFERENCE_VIT = ResizeRule(min_side=378, max_side=980, stride=14)
