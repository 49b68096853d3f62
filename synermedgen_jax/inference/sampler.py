"""Flow-matching sampler with classifier-free guidance and a prefilled KV cache (BAGEL's ``generate_image``).

Per batch of source slices:

1. Three contexts are packed (data/packing.py) with the noised target appended, as in training
   (``[instruction text, source as ViT tokens, source as clean VAE latents, noised target]``):

   * conditional: the whole context;
   * text-unconditional: without the instruction (``[ViT, VAE, target]``; RoPE starts at 0, as BAGEL's
     ``cfg_text_precontext`` is the context before the text);
   * image-unconditional: without the source's ViT and VAE splits (``[text, target]``; the target's RoPE id
     follows the text directly, as BAGEL's ``cfg_img_precontext`` never saw the image).

   Each context is prefilled once into its own KV cache (inference/kv_cache.py).
2. ``x`` starts as N(0, 1) latent tokens (one key per slice: ``fold_in(seed, slice index)``, so results do not
   depend on the batch size); timesteps ``linspace(1, 0, N)`` shifted by ``s·t / (1 + (s−1)·t)``; at each
   of the N−1 steps the target's split (two marker tokens + latent tokens) runs against each cache, the
   three velocities are combined by kernels.flow_matching.cfg_euler_step (CFG inside ``cfg_interval``,
   ``text_channel`` / ``channel`` / ``global`` renorm clamped at ``renorm_min``) and ``x ← x − v·dt``.
   BAGEL skips the unconditional passes outside the interval; so do we (``lax.cond``).
3. Latent tokens → unpatchify → VAE decode → grey image in [-1, 1].

Prefill, the whole ``fori_loop`` and the decode are one jitted function per (batch size, context layout).
With ``use_cache=False`` every step instead runs the whole pack (context + target) through the model: the
reference path, and the "without KV cache" row of benchmark/sampler.py (python -m tools.bench_sampler).

On a device mesh (``Sampler(..., mesh=...)``, axes ``('data', 'fsdp', 'tensor')`` from synermedgen_jax/sharding.py)
the slices of a batch are split over ``data × fsdp`` (the batch is padded to a multiple of that product and
the padding dropped), parameters are placed by the same logical-axis rules as in training
(``sharding.logical_spec``: ``fsdp`` / ``tensor`` splits where the rules give them, replicated otherwise) and
the jitted loop has explicit in/out shardings. On a data-only mesh the compiled Euler loop has no
collective (checked on the tiny config's HLO); the only one left is an all-gather of the ViT embeddings
for the row scatter in ``SynerMedGen.embed_understanding``, once per batch. Parameters split over ``fsdp``
cost gathers / partial-sum all-reduces per use, as in training. Single process: inputs are placed with
``jax.device_put``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from synermedgen_jax import sharding
from synermedgen_jax.axes import DATA, FSDP, TENSOR
from synermedgen_jax.data.packing import (
    NOISE,
    Geometry,
    Pack,
    PackBudget,
    PackBuilder,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    stack_rows,
)
from synermedgen_jax.data.volumes import resize_image
from synermedgen_jax.inference.kv_cache import Meta, forward_cached, prefill
from synermedgen_jax.kernels import partition
from synermedgen_jax.kernels.flow_matching import RENORMS, cfg_euler_step, shift_timesteps, uses_kernel
from synermedgen_jax.modeling.generation import patchify_latents, unpatchify_latents
from synermedgen_jax.modeling.layers import active_mesh

PASSES = ("cond", "text_uncond", "img_uncond")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """SynerMedGen's evaluation settings by default (docs/architecture.md, Inference)."""

    num_steps: int = 50  # timesteps, N - 1 Euler steps
    shift: float = 3.0
    cfg_text: float = 4.0
    cfg_img: float = 1.5
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    renorm: str = "text_channel"  # text_channel | channel | global
    renorm_min: float = 0.0
    # kernels.flow_matching impl of the CFG + Euler step; "auto": the model's flow_matching_impl (kernels/dispatch.py)
    step_impl: str = "auto"
    use_cache: bool = True
    sample_posterior: bool = False  # source latents: posterior mean (deterministic) unless True

    def __post_init__(self):
        if self.num_steps < 2:
            raise ValueError(f"SamplerConfig.num_steps must be >= 2, got {self.num_steps}")
        if self.renorm not in RENORMS:
            raise ValueError(f"SamplerConfig.renorm must be one of {RENORMS}, got {self.renorm!r}")
        if self.shift <= 0:
            raise ValueError(f"SamplerConfig.shift must be > 0, got {self.shift}")
        for name in ("cfg_text", "cfg_img"):
            if not getattr(self, name) >= 0:  # also rejects NaN
                raise ValueError(f"SamplerConfig.{name} (guidance scale) must be >= 0, got {getattr(self, name)}")


def timestep_schedule(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """BAGEL's schedule: ``t`` (the N−1 step times, from 1 down) and ``dt = t_i − t_{i+1} > 0``, float32."""
    # numpy, not jnp: the schedule is a host constant even when called under a trace.
    t = np.asarray(shift_timesteps(np.linspace(1.0, 0.0, num_steps, dtype=np.float32), np.float32(shift)),
                   np.float32)
    return t[:-1], t[:-1] - t[1:]


# ------------------------------------------------------------------------------------------------ packing


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the context and the query (noised target split) sit in a generation pack (same in every row).

    ``ctx_und`` / ``q_und``: positions in the understanding region; ``ctx_gen`` / ``q_gen``: positions in the
    generation region. ``und_tokens``: size of the understanding region.
    """

    und_tokens: int
    ctx_und: tuple[int, ...]
    ctx_gen: tuple[int, ...]
    q_und: tuple[int, ...]
    q_gen: tuple[int, ...]


def exact_pack(samples: Sequence[Sequence], geometry: Geometry, special: SpecialTokens,
               image_size: tuple[int, int], vit_image_size: tuple[int, int]) -> tuple[Pack, PackBudget]:
    """One sample per row, padded to the largest sample: ``(Pack [B, ...], budget)``."""
    probe = PackBuilder(PackBudget(0, 0, 0, 0, 0, 0, tuple(image_size), tuple(vit_image_size)), special, geometry)
    needs = [probe.need(s) for s in samples]
    budget = PackBudget(und_tokens=max(n.und for n in needs), gen_tokens=max(n.gen for n in needs),
                        vit_patches=max(n.vit_patches for n in needs), vit_images=max(n.vit_images for n in needs),
                        vae_images=max(n.vae_images for n in needs), ce_tokens=max(1, max(n.ce for n in needs)),
                        image_size=tuple(image_size), vit_image_size=tuple(vit_image_size))
    builder = PackBuilder(budget, special, geometry)
    rng = np.random.default_rng(0)  # only draws training timestep logits, which inference overrides
    rows = []
    for sample in samples:
        builder.add(sample, rng)
        rows.append(builder.build())
    return Pack.from_arrays(stack_rows(rows)), budget


def generation_layout(batch: Pack, budget: PackBudget) -> Layout:
    """The layout of a generation pack; every row must share it (same instruction and image sizes)."""
    kind, sample = batch.split_kind, batch.sample_id
    if not (np.all(kind == kind[:1]) and np.all(sample == sample[:1])):
        raise ValueError("generation_layout: rows differ in layout (instruction or image size); batch them apart")
    tu = budget.und_tokens
    valid = sample[0] >= 0
    noise = kind[0] == NOISE
    pick = lambda m: tuple(int(i) for i in np.nonzero(m)[0])
    return Layout(tu, pick((~noise & valid)[:tu]), pick((~noise & valid)[tu:]), pick((noise & valid)[:tu]),
                  pick((noise & valid)[tu:]))


def context_samples(instruction_ids: Sequence[int], sources: np.ndarray, image_size: tuple[int, int],
                    vit_image_size: tuple[int, int], *, image_first: bool = False) -> dict[str, list[list]]:
    """The three CFG contexts for each source ``[B, H, W]`` (in [-1, 1]), each with the noised target last.

    ``image_first``: the official SynerMed edit order, conditional ``[VAE, ViT, text, target]`` (text-
    unconditional ``[VAE, ViT, target]``); otherwise ``[text, ViT, VAE, target]`` as our packs train."""
    out: dict[str, list[list]] = {name: [] for name in PASSES}
    target = VaeImage(np.zeros(image_size, np.float32), noised=True)
    for source in sources:
        text = Text(list(instruction_ids))
        vit = VitImage(resize_image(source, vit_image_size))
        vae = VaeImage(resize_image(source, image_size))
        images = [vae, vit] if image_first else [vit, vae]
        out["cond"].append(images + [text, target] if image_first else [text, *images, target])
        out["text_uncond"].append([*images, target])
        out["img_uncond"].append([text, target])
    return out


# ------------------------------------------------------------------------------------------ model passes


def source_latent_tokens(model, images: jax.Array, key: jax.Array | None, sample: bool) -> jax.Array:
    """``images [B, H, W, C]`` in [-1, 1] → clean latent tokens ``[B, L, p·p·z]``."""
    latents = model.vae.encode(images, key, sample=sample)
    return patchify_latents(latents, model.config.latent_patch_size)


def _pack_meta(batch: Pack, positions: np.ndarray) -> Meta:
    index = jnp.asarray(positions, jnp.int32)
    fields = [jnp.take(v, index, axis=1) for v in batch.meta().values()]  # sample, split, kind, rope
    return Meta(*fields, jnp.broadcast_to(index, fields[0].shape))


def context_embeddings(model, batch: Pack, layout: Layout, source_tokens: jax.Array) -> tuple[jax.Array, Meta]:
    """Embedded context ``[B, Tc, E]`` (und tokens first) and its metadata. Clean latents get t = 0."""
    x_und = jnp.take(model.embed_understanding(batch), jnp.asarray(layout.ctx_und, jnp.int32), axis=1)
    parts = [x_und]
    if layout.ctx_gen:
        gen = jnp.asarray(layout.ctx_gen, jnp.int32)
        index = jnp.take(batch.latent_index, gen, axis=1)
        clean = jnp.take_along_axis(source_tokens, index[..., None], axis=1)
        pos = jnp.take(batch.latent_pos_id, gen, axis=1)
        parts.append(model.embed_generation(clean, jnp.zeros(pos.shape, jnp.float32), pos).astype(x_und.dtype))
    positions = np.concatenate([layout.ctx_und, np.asarray(layout.ctx_gen, int) + layout.und_tokens])
    return jnp.concatenate(parts, axis=1), _pack_meta(batch, positions)


def query_embeddings(model, batch: Pack, layout: Layout, x_t: jax.Array, t: jax.Array) -> tuple[jax.Array, Meta]:
    """The target split: its markers (understanding expert) then ``x_t [B, Lq, C]`` at time ``t`` (scalar)."""
    markers = jnp.take(batch.token_ids, jnp.asarray(layout.q_und, jnp.int32), axis=1)
    x_und = model.language_model.embed(markers)
    pos = jnp.take(batch.latent_pos_id, jnp.asarray(layout.q_gen, jnp.int32), axis=1)
    x_gen = model.embed_generation(x_t, jnp.broadcast_to(jnp.asarray(t, jnp.float32), pos.shape), pos)
    positions = np.concatenate([layout.q_und, np.asarray(layout.q_gen, int) + layout.und_tokens])
    return jnp.concatenate([x_und, x_gen.astype(x_und.dtype)], axis=1), _pack_meta(batch, positions)


def generation_tokens(batch: Pack, layout: Layout, source_tokens: jax.Array, x_t: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """The model's generation input over the whole pack: ``(tokens [B, Tg, C], times [B, Tg])`` with the clean
    source latents at ``t = 0`` and ``x_t`` at time ``t`` (scalar) in the target's slots."""
    shape = (x_t.shape[0], batch.gen_tokens)
    tokens = jnp.zeros((*shape, x_t.shape[-1]), jnp.float32)
    if layout.ctx_gen:
        gen = jnp.asarray(layout.ctx_gen, jnp.int32)
        clean = jnp.take_along_axis(source_tokens, jnp.take(batch.latent_index, gen, axis=1)[..., None], axis=1)
        tokens = tokens.at[:, gen].set(clean.astype(tokens.dtype))
    q_gen = jnp.asarray(layout.q_gen, jnp.int32)
    tokens = tokens.at[:, q_gen].set(x_t.astype(tokens.dtype))
    times = jnp.zeros(shape, jnp.float32).at[:, q_gen].set(jnp.asarray(t, jnp.float32))
    return tokens, times


def uncached_velocity(model, batch: Pack, layout: Layout, x_und_full: jax.Array, source_tokens: jax.Array,
                      x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Velocity from one full forward over the whole pack (context + target), the model's own forward
    (``SynerMedGen.__call__``, as in training) with the understanding embeddings ``x_und_full`` computed once:
    ``[B, Lq, C]`` float32."""
    tokens, times = generation_tokens(batch, layout, source_tokens, x_t, t)
    velocity = model(batch, tokens, times, x_und=x_und_full)["velocity"]
    return jnp.take(velocity, jnp.asarray(layout.q_gen, jnp.int32), axis=1)


# ---------------------------------------------------------------------------------------------- sampling


def _guided_step(config: SamplerConfig, x, v, vt, vi, t, dt):
    """``cfg_euler_step`` per image (vmap over the batch: the "global" renorm's norm is per image). On a mesh a
    Pallas step runs under ``shard_map`` on each device's images (kernels/partition.py)."""
    def images_step(x, v, vt, vi, t, dt):
        step = lambda xb, vb, vtb, vib: cfg_euler_step(
            xb, vb, vtb, vib, t, dt, cfg_text=config.cfg_text, cfg_img=config.cfg_img,
            cfg_interval=config.cfg_interval, renorm=config.renorm, renorm_min=config.renorm_min,
            impl=config.step_impl)
        return (jax.vmap(step)(x, v, vt, vi),)

    mesh = active_mesh()
    if mesh is not None and uses_kernel(config.step_impl):
        images_step = partition.over_rows(images_step, mesh, x.shape[0], 4, 1, "sampler CFG step")
    return images_step(x, v, vt, vi, jnp.asarray(t, jnp.float32), jnp.asarray(dt, jnp.float32))[0]


def sample_latents(model, batches: dict[str, dict], layouts: dict[str, Layout], source_tokens: jax.Array,
                   noise: jax.Array, config: SamplerConfig) -> jax.Array:
    """Runs the sampler (traceable). ``batches``/``layouts`` per pass name (``PASSES``; passes the guidance
    scales do not need may be absent), ``noise [B, Lq, C]``. Returns the final latent tokens ``[B, Lq, C]``."""
    ts, dts = (jnp.asarray(a) for a in timestep_schedule(config.num_steps, config.shift))
    use_text = config.cfg_text > 1.0
    use_img = use_text and config.cfg_img > 1.0  # cfg_euler_step ignores cfg_img without text guidance
    names = ["cond"] + (["text_uncond"] if use_text else []) + (["img_uncond"] if use_img else [])

    if config.use_cache:
        caches = {}
        for name in names:
            x_ctx, meta = context_embeddings(model, batches[name], layouts[name], source_tokens)
            caches[name] = prefill(model.language_model, x_ctx, len(layouts[name].ctx_und), meta)[1]

        def velocity(name, x, t):
            x_q, meta = query_embeddings(model, batches[name], layouts[name], x, t)
            und = len(layouts[name].q_und)
            hidden = forward_cached(model.language_model, x_q, und, meta, caches[name])[0]
            return model.llm2vae(hidden[:, und:]).astype(jnp.float32)
    else:
        x_und = {name: model.embed_understanding(batches[name]) for name in names}

        def velocity(name, x, t):
            return uncached_velocity(model, batches[name], layouts[name], x_und[name], source_tokens, x, t)

    def body(i, x):
        t, dt = ts[i], dts[i]
        v = velocity("cond", x, t)
        if not use_text:
            return _guided_step(config, x, v, v, v, t, dt)
        active = (t > config.cfg_interval[0]) & (t <= config.cfg_interval[1])

        def unconditional():
            vt = velocity("text_uncond", x, t)
            return vt, (velocity("img_uncond", x, t) if use_img else vt)

        vt, vi = jax.lax.cond(active, unconditional, lambda: (v, v))
        return _guided_step(config, x, v, vt, vi, t, dt)

    return jax.lax.fori_loop(0, ts.shape[0], body, noise.astype(jnp.float32))


def slice_noise(key: jax.Array, indices: np.ndarray, shape: tuple[int, int]) -> jax.Array:
    """Initial noise ``[len(indices), *shape]``: slice ``i`` draws from ``fold_in(key, i)``."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(jnp.asarray(indices))


def decode_tokens(model, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Latent tokens ``[B, rows·cols, C]`` → grey images ``[B, H, W]`` in [-1, 1] (channel mean, clipped)."""
    latents = unpatchify_latents(tokens, grid[0], grid[1], model.config.latent_patch_size)
    images = model.vae.decode(latents.astype(jnp.float32))
    return jnp.clip(jnp.mean(images.astype(jnp.float32), axis=-1), -1.0, 1.0)


def inference_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh | None:
    """A sampling mesh: the given devices (a count takes the first local ones; default all local devices) on
    the ``data`` axis, ``fsdp = tensor = 1``. ``None`` for a single device (the plain, unsharded sampler)."""
    if devices is None:
        devices = jax.local_devices()
    elif isinstance(devices, int):
        available = jax.local_devices()
        if not 1 <= devices <= len(available):
            raise ValueError(f"devices: {devices} requested, {len(available)} local devices available")
        devices = available[:devices]
    devices = list(devices)
    if len(devices) == 1:
        return None
    return sharding.make_mesh({DATA: -1, FSDP: 1, TENSOR: 1}, devices)


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for an nnx state (same tree), from each variable's ``logical_axes`` metadata through
    synermedgen_jax/sharding.py's rule table (no metadata: replicated)."""
    def one(variable: nnx.Variable) -> NamedSharding:
        axes = variable.get_metadata().get("logical_axes")
        return NamedSharding(mesh, sharding.logical_spec(axes, np.shape(variable.get_value()), mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _vae_sources(batches: dict[str, dict]) -> np.ndarray:
    """``[B, H, W(, C)]`` VAE source images of a batch's context packs (slot 0 holds the source in every pack)."""
    return batches["cond"].vae_images[:, 0]


def _place(state: nnx.State, shardings: nnx.State) -> nnx.State:
    """Puts the parameters on the mesh; abstract ones (``nnx.eval_shape``, for ``plan``) only get the sharding."""
    leaves = jax.tree.leaves(state)
    if leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        def one(where: NamedSharding, variable: nnx.Variable) -> nnx.Variable:
            value = variable.get_value()
            return variable.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=where))

        # ``shardings`` is a prefix of ``state`` (one sharding per variable), so it leads the map.
        return jax.tree.map(one, shardings, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return jax.device_put(state, shardings)


class Sampler:
    """Batched slice synthesis: ``Sampler(model, special, image_size, vit_image_size).generate(...)``.

    ``image_size``: the generated (and VAE source) size ``(H, W)``, a multiple of the latent stride;
    ``vit_image_size``: the ViT source size. Sources are resized to both; outputs are ``image_size``.
    ``mesh``: optional device mesh (axes ``('data', 'fsdp', 'tensor')``, e.g. :func:`inference_mesh`); the
    model's parameters are placed on it once, here, and every batch is split over its batch axes.
    """

    def __init__(self, model, special: SpecialTokens, image_size: tuple[int, int], vit_image_size: tuple[int, int],
                 config: SamplerConfig = SamplerConfig(), mesh: Mesh | None = None, image_first: bool = False):
        self.image_first = image_first  # context order (context_samples)
        if config.step_impl == "auto":  # the step follows the model's resolved kernels
            config = dataclasses.replace(config, step_impl=str(model.config.get("flow_matching_impl", "auto")))
        self.config = config
        self.special = special
        self.image_size, self.vit_image_size = tuple(image_size), tuple(vit_image_size)
        self.geometry = Geometry.from_model_config(model.config)
        stride = self.geometry.latent_stride
        if self.image_size[0] % stride or self.image_size[1] % stride:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the latent stride {stride}")
        self.grid = (self.image_size[0] // stride, self.image_size[1] // stride)
        self.token_dim = model.config.latent_patch_size**2 * model.config.vae.z_channels
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh
        # Batches must hold a multiple of this many slices (the product of the mesh's batch axes).
        self.batch_divisor = 1 if mesh is None else sharding.batch_divisor(mesh)
        if mesh is not None:
            self._state_shardings = param_shardings(self.state, mesh)
            self.state = _place(self.state, self._state_shardings)
            self._rows = NamedSharding(mesh, sharding.batch_spec(1))  # leading axis over data × fsdp
        self._compiled: dict[tuple, Callable] = {}

    def _packs(self, instruction_ids: Sequence[int], sources: np.ndarray) -> tuple[dict, dict]:
        samples = context_samples(instruction_ids, sources, self.image_size, self.vit_image_size,
                                  image_first=self.image_first)
        batches, layouts = {}, {}
        for name in PASSES:
            batch, budget = exact_pack(samples[name], self.geometry, self.special, self.image_size,
                                       self.vit_image_size)
            layouts[name] = generation_layout(batch, budget)
            batches[name] = batch
        return batches, layouts

    def _function(self, layouts: dict[str, Layout]) -> Callable:
        key = tuple(sorted(layouts.items()))
        if key not in self._compiled:
            config, graphdef, grid = self.config, self.graphdef, self.grid

            def run(state, batches, vae_sources, noise, vae_key):
                model = nnx.merge(graphdef, state)
                source_tokens = source_latent_tokens(model, vae_sources, vae_key, config.sample_posterior)
                tokens = sample_latents(model, batches, layouts, source_tokens, noise, config)
                return decode_tokens(model, tokens, grid)

            if self.mesh is None:
                self._compiled[key] = jax.jit(run)
            else:
                mesh, rows = self.mesh, self._rows
                # Pytree prefixes: every array of the packs, the sources and the noise is split on its leading
                # (slice) axis; the VAE key is replicated.
                self._compiled[key] = jax.jit(
                    sharding.traced_on_mesh(run, mesh),
                    in_shardings=(self._state_shardings, rows, rows, rows, sharding.replicated(mesh)),
                    out_shardings=rows)
        return self._compiled[key]

    def sample_batch(self, sources: np.ndarray, instruction_ids: Sequence[int], indices: Sequence[int], *,
                     seed: int = 0) -> jax.Array:
        """One compiled call on one batch (no padding, no host copy of the result).

        Args:
          sources: ``[B, H, W]`` float in [-1, 1]; ``B`` a multiple of ``batch_divisor``.
          instruction_ids: the route's instruction, tokenized.
          indices: ``[B]`` noise indices (slice ``i`` starts from ``fold_in(key(seed), indices[i])``).
        Returns:
          ``[B, H', W']`` float32 device array at ``image_size``; on a mesh, split over its batch axes.
        """
        sources = np.asarray(sources, np.float32)
        indices = np.asarray(indices, np.int64)
        if (sources.ndim != 3 or len(sources) == 0 or len(sources) % self.batch_divisor
                or indices.shape != (len(sources),)):
            raise ValueError(f"Sampler.sample_batch: sources {sources.shape} must be [B, H, W] with B >= 1 a multiple "
                             f"of {self.batch_divisor} and one index per source (got {indices.shape})")
        noise_base, vae_base = jax.random.split(jax.random.PRNGKey(seed))
        batches, layouts = self._packs(instruction_ids, sources)
        function = self._function(layouts)
        noise = slice_noise(noise_base, indices, (len(layouts["cond"].q_gen), self.token_dim))
        vae_sources = _vae_sources(batches)
        vae_key = jax.random.fold_in(vae_base, int(indices[0]))  # used only with sample_posterior
        if self.mesh is None:
            batches = jax.tree.map(jnp.asarray, batches)
            return function(self.state, batches, jnp.asarray(vae_sources), noise, vae_key)
        batches, vae_sources, noise = jax.device_put((batches, vae_sources, noise), self._rows)
        return function(self.state, batches, vae_sources, noise, jax.device_put(vae_key, sharding.replicated(
            self.mesh)))

    def lower(self, batch_size: int, instruction_ids: Sequence[int]) -> jax.stages.Lowered:
        """Lowers one batch's compiled call without running it (for ``plan``): the packs are built on the host
        from blank sources (their shapes do not depend on pixel values); every argument is abstract, so a model
        made with ``nnx.eval_shape`` (no parameter allocated) can be planned on a simulated mesh."""
        function, args = self.lowering_args(batch_size, instruction_ids)
        return function.lower(*args)

    def lowering_args(self, batch_size: int, instruction_ids: Sequence[int]) -> tuple[Callable, tuple]:
        """``(jitted function, abstract arguments)`` of one batch's call (see :meth:`lower`; ``jax.export``
        takes the same pair)."""
        if batch_size < 1 or batch_size % self.batch_divisor:
            raise ValueError(f"Sampler.lower: batch_size {batch_size} must be a positive multiple of "
                             f"{self.batch_divisor}")
        batches, layouts = self._packs(instruction_ids, np.zeros((batch_size, *self.image_size), np.float32))
        rows = None if self.mesh is None else self._rows
        abstract = lambda x, where=rows: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,  # noqa: E731
                                                               sharding=where)
        noise = jax.ShapeDtypeStruct((batch_size, len(layouts["cond"].q_gen), self.token_dim), jnp.float32,
                                     sharding=rows)
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        if self.mesh is not None:
            key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(self.mesh))
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        return self._function(layouts), (state, jax.tree.map(abstract, batches), abstract(_vae_sources(batches)),
                                         noise, key)

    def generate(self, sources: np.ndarray, instruction_ids: Sequence[int], *, seed: int = 0, batch_size: int = 8,
                 indices: Sequence[int] | None = None, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Synthesizes one target per source slice.

        Args:
          sources: ``[N, H, W]`` float in [-1, 1] (any size; resized to the sampler's sizes).
          instruction_ids: the route's instruction, tokenized (no bos/eos).
          seed, indices: source ``i`` starts from the noise of ``fold_in(key(seed), indices[i])`` (default
            ``indices = 0..N-1``), so a slice's result depends on neither the batch size nor its neighbours.
          batch_size: slices per compiled call, rounded up to a multiple of ``batch_divisor`` on a mesh; the
            last batch is padded by repeating its last slice (padding is dropped from the result).
          progress: called with the number of slices finished after each batch.
        Returns:
          ``[N, H', W']`` float32 in [-1, 1] at ``image_size``.
        """
        sources = np.asarray(sources, np.float32)
        if sources.ndim != 3 or len(sources) == 0:
            raise ValueError(f"Sampler.generate: sources must be [N, H, W] with N >= 1, got {sources.shape}")
        indices = np.arange(len(sources)) if indices is None else np.asarray(indices, np.int64)
        if indices.shape != (len(sources),):
            raise ValueError(f"Sampler.generate: {len(indices)} indices for {len(sources)} sources")
        batch_size = -(-max(1, batch_size) // self.batch_divisor) * self.batch_divisor
        outputs = []
        for start in range(0, len(sources), batch_size):
            chunk, chunk_indices = sources[start:start + batch_size], indices[start:start + batch_size]
            count = len(chunk)
            if count < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - count, axis=0)])
                chunk_indices = np.concatenate([chunk_indices, np.repeat(chunk_indices[-1:], batch_size - count)])
            images = self.sample_batch(chunk, instruction_ids, chunk_indices, seed=seed)
            outputs.append(np.asarray(images)[:count])
            if progress is not None:
                progress(count)
        return np.concatenate(outputs)
