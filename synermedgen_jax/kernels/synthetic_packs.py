"""Synthetic pack metadata for kernel tests and benchmarks (not the training packer).

Lays out samples the way the model's packs do: every sample's understanding splits (text, ViT) go into
an *und* region at the front, its generation splits (clean and noised VAE latents) into a *gen* region
after it, then padding (``sample_id = -1``). Split ids count a sample's splits in their logical order, so
visibility depends only on metadata and on position order inside a split, as the attention contract says.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from synermedgen_jax.kernels.attention.tile_math import CAUSAL, FULL, NOISE

UND, GEN = "und", "gen"
Split = tuple[int, int, str]  # (kind, length, region)


def layout_pack(
    samples: Sequence[Sequence[Split]], seq_len: int, region_gap: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sample_id, split_id, split_kind)``, each ``[seq_len]`` int32, for the given samples.

    ``samples[s]`` lists the splits of sample ``s`` in logical order as ``(kind, length, region)``;
    ``region_gap`` padding tokens separate the und and gen regions.
    """
    sample_id = np.full(seq_len, -1, np.int32)
    split_id = np.zeros(seq_len, np.int32)
    split_kind = np.zeros(seq_len, np.int32)
    pos = 0
    for region in (UND, GEN):
        for s, splits in enumerate(samples):
            for index, (kind, length, split_region) in enumerate(splits):
                if split_region not in (UND, GEN) or kind not in (CAUSAL, FULL, NOISE):
                    raise ValueError(f"layout_pack: bad split {(kind, length, split_region)} in sample {s}")
                if split_region != region:
                    continue
                if pos + length > seq_len:
                    raise ValueError(f"layout_pack: samples need more than seq_len={seq_len} tokens")
                sample_id[pos : pos + length] = s
                split_id[pos : pos + length] = index
                split_kind[pos : pos + length] = kind
                pos += length
        if region == UND:
            pos += region_gap
    return sample_id, split_id, split_kind


def stage2_samples(num_samples: int, text: int, vit: int, vae: int) -> list[list[Split]]:
    """Stage II (generation) samples: text prompt + ViT source + clean VAE source + noised VAE target."""
    one = [(CAUSAL, text, UND), (FULL, vit, UND), (FULL, vae, GEN), (NOISE, vae, GEN)]
    return [list(one) for _ in range(num_samples)]


def stage1_samples(num_samples: int, text: int, vit: int, answer: int) -> list[list[Split]]:
    """Stage I (understanding) samples: question text + ViT image(s) + answer text, all in the und region."""
    one = [(CAUSAL, text, UND), (FULL, vit, UND), (CAUSAL, answer, UND)]
    return [list(one) for _ in range(num_samples)]


def causal_samples(num_samples: int, length: int) -> list[list[Split]]:
    """Plain language-model samples: one causal split each."""
    return [[(CAUSAL, length, UND)] for _ in range(num_samples)]


def random_samples(rng: np.random.Generator, seq_len: int, max_samples: int = 4) -> list[list[Split]]:
    """Random samples (1..max_samples, 1..4 splits of random kind, length and region) fitting ``seq_len``."""
    samples: list[list[Split]] = []
    budget = seq_len
    for _ in range(int(rng.integers(1, max_samples + 1))):
        splits = []
        for _ in range(int(rng.integers(1, 5))):
            length = int(rng.integers(1, max(2, seq_len // 6)))
            if length > budget:
                break
            budget -= length
            splits.append((int(rng.integers(0, 3)), length, UND if rng.random() < 0.6 else GEN))
        if splits:
            samples.append(splits)
    return samples
