"""Shared test setup: CPU JAX, float32 matmuls at full precision, and small shared fixtures."""

import os

_CALLER_PLATFORMS = os.environ.get("JAX_PLATFORMS")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_config():
    from synermedgen_jax.config import load_config

    return load_config("configs/models.py:tiny")


@pytest.fixture(scope="module")
def fast_compile():
    """For modules of tiny programs: XLA optimisations cost more compile time than they save at run time.
    Use with ``pytestmark = pytest.mark.usefixtures("fast_compile")``; the setting is restored afterwards."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def pytest_configure(config):
    """``-m gpu`` selects the accelerator checks (tests/test_gpu_kernels.py): they run on the machine's GPU/TPU,
    not on the CPU every other run is pinned to (a JAX_PLATFORMS the caller set is kept)."""
    markexpr = config.option.markexpr
    if _CALLER_PLATFORMS is None and "gpu" in markexpr.split() and "not gpu" not in markexpr:
        jax.config.update("jax_platforms", None)


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` (minutes-long end-to-end runs) go first: under ``-n 2`` they then run beside the
    rest of the suite instead of starting last and trailing it."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: the rest keep their order
