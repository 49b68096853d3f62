"""Sampler on a 4-device mesh (simulated CPU devices) vs the single-device sampler.

The device count must be set before JAX initialises, so the comparison runs in a fresh process (the pattern
of test_kernels_attention.py). Tiny model, float32, highest matmul precision, 3 timesteps (2 Euler steps
with three-pass CFG). Tolerance: 1e-4 absolute on images in [-1, 1] (the sharded program may sum in
another order; the cached-vs-uncached test in test_sampler.py uses the same bound).
"""

from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = r"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_disable_most_optimizations", True)  # tiny programs: compile time dominates
assert jax.device_count() == 4, jax.devices()

from synermedgen_jax.config import load_config
from synermedgen_jax.inference import sampler as smp
from synermedgen_jax.data.packing import SpecialTokens
from synermedgen_jax.modeling.synermedgen import SynerMedGen
from synermedgen_jax import sharding

SPECIAL = SpecialTokens(bos=1, eos=2, vision_start=3, vision_end=4, pad=0)
IMAGE, VIT = (16, 16), (28, 28)
INSTRUCTION = [17, 41, 9, 230, 77]

config = load_config("configs/models.py:tiny")
config.vae.sample_posterior = False
model = SynerMedGen(config, rngs=nnx.Rngs(params=0))
# llm2vae starts at zero (as BAGEL): give it weights so the velocities, and so the images, depend on the model.
model.llm2vae.kernel.value = 0.2 * jax.random.normal(jax.random.key(1), model.llm2vae.kernel.value.shape)
model.llm2vae.bias.value = 0.1 * jax.random.normal(jax.random.key(2), model.llm2vae.bias.value.shape)

sources = np.random.default_rng(0).uniform(-1, 1, (5, 20, 20)).astype(np.float32)
indices = [3, 1, 4, 10, 7]
cfg = smp.SamplerConfig(num_steps=3)

single = smp.Sampler(model, SPECIAL, IMAGE, VIT, cfg)
ref = single.generate(sources, INSTRUCTION, seed=5, batch_size=5, indices=indices)
assert ref.shape == (5, 16, 16) and ref.std() > 1e-3

# data x fsdp = 2 x 2: slices split four ways, parameters with an fsdp rule split two ways.
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
sharded = smp.Sampler(model, SPECIAL, IMAGE, VIT, cfg, mesh=mesh)
assert sharded.batch_divisor == 4
# 5 slices, batch_size 5 -> rounded up to 8 rows: one call with 3 padding rows, dropped from the result.
done = []
out = sharded.generate(sources, INSTRUCTION, seed=5, batch_size=5, indices=indices, progress=done.append)
assert out.shape == (5, 16, 16) and done == [5], (out.shape, done)
err = float(np.abs(out - ref).max())
assert err <= 1e-4, f"sharded vs single-device max |diff| {err}"

# The parameters sit where synermedgen_jax/sharding.py's rules put them, and some are really split over fsdp.
flat = nnx.to_flat_state(sharded.state)
split = 0
for path, variable in flat:
    value = variable.get_value()
    want = sharding.logical_spec(variable.get_metadata().get("logical_axes"), value.shape, mesh)
    assert value.sharding.spec == want, (path, value.sharding, want)
    split += "fsdp" in str(want)
assert split > 0, "no parameter is split over fsdp"

# One compiled batch (the same shape as above: no new compile) stays split over data x fsdp, row per device.
padded = np.concatenate([sources, np.repeat(sources[-1:], 3, axis=0)])
images = sharded.sample_batch(padded, INSTRUCTION, indices + [7, 7, 7], seed=5)
assert isinstance(images.sharding, NamedSharding), images.sharding
assert images.sharding.spec == PartitionSpec(("data", "fsdp")), images.sharding.spec
shards = images.addressable_shards
assert len(shards) == 4 and {s.data.shape for s in shards} == {(2, 16, 16)}, [s.data.shape for s in shards]
assert len({s.device for s in shards}) == 4
np.testing.assert_allclose(np.asarray(images)[:5], ref, atol=1e-4, rtol=0)

# A batch that is not a multiple of the batch axes is refused with a clear error.
try:
    sharded.sample_batch(sources[:3], INSTRUCTION, indices[:3], seed=5)
except ValueError as e:
    assert "multiple of 4" in str(e), e
else:
    raise AssertionError("a 3-slice batch was accepted on a 4-way batch mesh")
# The synthesize command's --devices mesh: all slices over "data"; one device means the plain sampler.
assert smp.inference_mesh(1) is None
assert dict(smp.inference_mesh(4).shape) == {"data": 4, "fsdp": 1, "tensor": 1}
assert dict(smp.inference_mesh().shape) == {"data": 4, "fsdp": 1, "tensor": 1}
try:
    smp.inference_mesh(5)
except ValueError as e:
    assert "5 requested, 4 local devices" in str(e), e
else:
    raise AssertionError("5 devices accepted")
print("SHARDED_SAMPLER_OK", err)
"""


def test_sharded_sampler_equals_single_device_on_four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=repo, capture_output=True, text=True,
                            timeout=600)
    assert "SHARDED_SAMPLER_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
