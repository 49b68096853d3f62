"""Peak dense bf16 matmul throughput and memory per device, for MFU and for "does the plan fit".

Figures are the vendors' published dense (no 2:4 sparsity) bf16 numbers per chip / GPU:
  - NVIDIA H100 SXM5: 989.4 TFLOP/s bf16 dense (datasheet lists 1,979 "with sparsity"), 80 GB HBM3;
    H100 PCIe: 756 TFLOP/s, 80 GB (NVIDIA H100 Tensor Core GPU datasheet).
  - NVIDIA H200 SXM: 989 TFLOP/s bf16 dense (1,979 with sparsity), 141 GB HBM3e (NVIDIA H200 datasheet).
  - NVIDIA A100 SXM4: 312 TFLOP/s bf16 dense (624 with sparsity), 40 or 80 GB (NVIDIA A100 datasheet).
  - Google Cloud TPU v4: 275 TFLOP/s bf16 per chip, 32 GiB HBM (cloud.google.com/tpu/docs/v4).
  - TPU v5e: 197 TFLOP/s bf16 per chip, 16 GiB HBM (cloud.google.com/tpu/docs/v5e).
  - TPU v5p: 459 TFLOP/s bf16 per chip, 95 GiB HBM (cloud.google.com/tpu/docs/v5p).
  - TPU v6e (Trillium): 918 TFLOP/s bf16 per chip, 32 GiB HBM (cloud.google.com/tpu/docs/v6e).
``jax.devices()[0].device_kind`` strings differ from marketing names ("TPU v5 lite" is v5e, "TPU v6 lite"
is v6e), so matching is by ordered substring rules.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Peak:
    name: str
    bf16_tflops: float  # dense, per device
    memory_gb: float  # HBM per device (GB = 1e9 bytes)


PEAKS: dict[str, Peak] = {
    "h100": Peak("NVIDIA H100 SXM", 989.4, 80.0),
    "h100_pcie": Peak("NVIDIA H100 PCIe", 756.0, 80.0),
    "h200": Peak("NVIDIA H200 SXM", 989.4, 141.0),
    "a100": Peak("NVIDIA A100 SXM4 80GB", 312.0, 80.0),
    "a100_40gb": Peak("NVIDIA A100 SXM4 40GB", 312.0, 40.0),
    "tpu_v4": Peak("TPU v4", 275.0, 34.4),
    "tpu_v5e": Peak("TPU v5e", 197.0, 17.2),
    "tpu_v5p": Peak("TPU v5p", 459.0, 102.0),
    "tpu_v6e": Peak("TPU v6e", 918.0, 34.4),
}

# (substring of the lower-cased device_kind, table key); the first match wins, so specific rules go first.
_RULES: tuple[tuple[str, str], ...] = (
    ("h100 pcie", "h100_pcie"),
    ("h100", "h100"),
    ("h200", "h200"),
    ("a100-sxm4-40gb", "a100_40gb"),
    ("a100-pcie-40gb", "a100_40gb"),
    ("a100", "a100"),
    ("v5 lite", "tpu_v5e"),
    ("v5e", "tpu_v5e"),
    ("v5p", "tpu_v5p"),
    ("tpu v5", "tpu_v5p"),
    ("v6 lite", "tpu_v6e"),
    ("v6e", "tpu_v6e"),
    ("tpu v4", "tpu_v4"),
)


def lookup(device_kind: str) -> Peak | None:
    """The table row for a ``device_kind`` string (None: unknown device, e.g. a CPU)."""
    kind = device_kind.lower()
    for needle, key in _RULES:
        if needle in kind:
            return PEAKS[key]
    return None


def peak_flops(device_kind: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """``(peak FLOP/s per device or None, where the figure comes from)``."""
    if override_tflops:
        return float(override_tflops) * 1e12, f"--peak-tflops {override_tflops:g}"
    peak = lookup(device_kind)
    if peak is None:
        return None, f"no peak known for device kind {device_kind!r} (give --peak-tflops)"
    return peak.bf16_tflops * 1e12, f"{peak.name} bf16 dense {peak.bf16_tflops:g} TFLOP/s (vendor figure)"
