"""Which attention and flow-matching implementation runs: the names a config may give and the one rule behind
``impl="auto"``.

This module holds only the choice: the names (``ATTENTION_IMPLS``, ``FLOW_MATCHING_IMPLS``), the platform being
traced for and the ``auto`` policy. It imports no implementation; each op lists what computes each name where the
op is defined (kernels/attention/__init__.py, kernels/flow_matching.py) and asks this module for ``auto``.

``auto`` (the default of ``model.attention_impl`` and ``model.flow_matching_impl`` in configs/models.py) means:

* GPU: the Pallas kernels, lowered through Triton (kernels/attention/triton_kernel.py, flow_matching.py);
* TPU: the Pallas kernels, lowered through Mosaic (kernels/attention/mosaic_kernel.py, flow_matching.py);
* CPU (no Pallas compiler): attention ``CPU_ATTENTION`` and flow matching ``"reference"`` (jnp; XLA fuses its
  elementwise code as well as a kernel would). ``CPU_ATTENTION`` is the faster of the jnp reference and
  ``chunked`` on the quickstart's shapes, measured below.

On a device mesh the kernels run under ``shard_map`` (kernels/partition.py): rows over ``data × fsdp``, heads
over ``tensor``; the jnp paths are partitioned by XLA.

:func:`resolve_kernels` applies the rule to a model config once per run (the trainer, the inference loaders and
the benchmarks call it), keeps what was asked for in ``model.kernels`` and returns a copy whose ``*_impl`` fields
name what computes; a checkpoint's saved request is resolved again on the machine that loads it. Code that
meets ``"auto"`` at trace time (a config never resolved) asks :func:`auto_attention` / :func:`auto_flow_matching`
for the same answer.

The platform is the one being traced for: a platform named by :func:`for_platform`, else the device of the
active abstract mesh (``jax.sharding.use_abstract_mesh`` with a TPU ``AbstractDevice`` is how a CPU machine
lowers for TPU), else ``jax.default_backend()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator

import jax
import ml_collections

from synermedgen_jax import axes

# The values of ``model.attention_impl`` / ``model.flow_matching_impl`` (configs/models.py).
ATTENTION_IMPLS = ("reference", "chunked", "pallas", "pallas_interpret", "xla_dense", "auto")
FLOW_MATCHING_IMPLS = ("reference", "pallas", "pallas_interpret", "auto")
KERNEL_IMPLS = ("pallas", "pallas_interpret")  # opaque to XLA: partitioned with shard_map on a mesh

# Measured with the small config on 2 CPU cores, the quickstart's train steps (jitted, median of 16 steps): Stage II
# 8 rows x 184 tokens and Stage I 4 rows x 512 tokens; see README "Kernels".
CPU_ATTENTION = "chunked"
CPU_FLOW_MATCHING = "reference"
KERNEL_PLATFORMS = ("gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernel_platform", default=None)


def normalise_platform(platform: str) -> str:
    """``"cuda"``/``"rocm"`` → ``"gpu"``; ``"tpu"``, ``"cpu"``, ``"gpu"`` as they are."""
    platform = str(platform).lower()
    return _ALIASES.get(platform, platform)


@contextlib.contextmanager
def for_platform(platform: str) -> Iterator[None]:
    """Traces inside resolve ``auto`` and pick the Pallas lowering for ``platform`` (e.g. lowering for ``cuda``
    on a CPU machine)."""
    token = _PLATFORM.set(normalise_platform(platform))
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def current_platform() -> str:
    """The platform code is being traced for (see the module docstring), normalised."""
    named = _PLATFORM.get()
    if named:
        return named
    try:
        mesh = jax.sharding.get_abstract_mesh()
        device = None if mesh is None or mesh.empty else mesh.abstract_device
    except (AttributeError, RuntimeError):
        device = None
    if device is not None and getattr(device, "platform", None):
        return normalise_platform(device.platform)
    return normalise_platform(jax.default_backend())


def pallas_backend(platform: str | None = None) -> str:
    """The Pallas lowering for ``platform``: ``"mosaic"`` on TPU, ``"triton"`` otherwise."""
    return "mosaic" if normalise_platform(platform or current_platform()) == "tpu" else "triton"


def auto_attention(platform: str | None = None) -> str:
    """What ``attention_impl="auto"`` computes with on ``platform`` (default: :func:`current_platform`)."""
    platform = normalise_platform(platform or current_platform())
    return "pallas" if platform in KERNEL_PLATFORMS else CPU_ATTENTION


def auto_flow_matching(platform: str | None = None) -> str:
    """What ``flow_matching_impl="auto"`` computes with on ``platform`` (default: :func:`current_platform`)."""
    platform = normalise_platform(platform or current_platform())
    return "pallas" if platform in KERNEL_PLATFORMS else CPU_FLOW_MATCHING


def _name(impl: str, platform: str) -> str:
    if impl == "pallas":
        return f"pallas/{pallas_backend(platform)}"
    if impl == "pallas_interpret":
        return "pallas/interpret"
    return impl


def describe(attention: str, flow_matching: str, platform: str, mesh_shape: dict | None = None) -> str:
    """One line: ``"attention: pallas/triton, flow matching: pallas/triton, under shard_map over data×fsdp,
    heads over tensor"``; ``mesh_shape`` (axis → size) says how a multi-device mesh splits the work."""
    line = f"attention: {_name(attention, platform)}, flow matching: {_name(flow_matching, platform)}"
    sizes = {k: int(v) for k, v in (mesh_shape or {}).items()}
    devices = 1
    for size in sizes.values():
        devices *= size
    kernels = attention.startswith("pallas") or flow_matching.startswith("pallas")
    if devices > 1:
        batch = "×".join(f"{a}" for a in axes.BATCH_AXES if a in sizes) or "none"
        split = f"over {batch}, heads over {axes.TENSOR}" if axes.TENSOR in sizes else f"over {batch}"
        line += (f", under shard_map {split}" if kernels else f", partitioned by XLA ({split})")
        line += f" ({' x '.join(f'{a}={s}' for a, s in sizes.items())})"
    else:
        line += ", one device"
    return line + f" [{platform}]"


def requested(model_config) -> tuple[str, str]:
    """``(attention, flow_matching)`` as the config asked for them, before any resolution."""
    kernels = model_config.get("kernels") if hasattr(model_config, "get") else None
    if kernels:
        return str(kernels["attention_requested"]), str(kernels["flow_matching_requested"])
    return str(model_config.attention_impl), str(model_config.flow_matching_impl)


def resolve_kernels(model_config, platform: str | None = None, *, mesh_shape: dict | None = None):
    """A copy of ``model_config`` with ``attention_impl`` / ``flow_matching_impl`` resolved for ``platform``
    (default: :func:`current_platform`) and ``kernels`` = ``{attention_requested, flow_matching_requested,
    platform, summary}`` (``summary``: :func:`describe`'s line). Explicit choices are kept; only ``auto``
    changes. Resolving a resolved config again starts from its request, so a checkpoint's config resolves
    for the machine that loads it."""
    platform = normalise_platform(platform or current_platform())
    want_attention, want_flow = requested(model_config)
    if want_attention not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl {want_attention!r}: expected one of {ATTENTION_IMPLS}")
    if want_flow not in FLOW_MATCHING_IMPLS:
        raise ValueError(f"model.flow_matching_impl {want_flow!r}: expected one of {FLOW_MATCHING_IMPLS}")
    attention = auto_attention(platform) if want_attention == "auto" else want_attention
    flow = auto_flow_matching(platform) if want_flow == "auto" else want_flow
    out = copy.deepcopy(model_config)
    locked = getattr(out, "is_locked", False)
    if locked:
        out.unlock()
    out.attention_impl = attention
    out.flow_matching_impl = flow
    out.kernels = ml_collections.ConfigDict(dict(
        attention_requested=want_attention, flow_matching_requested=want_flow, platform=platform,
        summary=describe(attention, flow, platform, mesh_shape)))
    if locked:
        out.lock()
    return out


def summary(model_config) -> str:
    """The resolved config's one-line description (resolving a copy first when it was never resolved)."""
    kernels = model_config.get("kernels") if hasattr(model_config, "get") else None
    return str(kernels["summary"]) if kernels else resolve_kernels(model_config).kernels.summary
