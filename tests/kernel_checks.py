"""The kernel checks: each Pallas kernel, and the model's loss and every gradient, against the jnp references.

On a GPU/TPU machine ``python -m pytest -m gpu tests`` runs them with the compiled kernels (``impl="pallas"``:
Triton on a GPU, Mosaic on a TPU): tests/test_gpu_kernels.py and tests/test_gpu_model_kernels.py. On CPU,
tests/test_model_kernels.py runs the same code in interpret mode on small shapes.

Per kernel (:func:`attention_case`, :func:`fm_case`): forward and backward against the jnp references computed in
float32 at ``highest`` matmul precision on the same (dtype-rounded) inputs, on BAGEL's packed split masks (causal
text, full ViT/VAE splits, noise splits, several samples per row, padding, rows that see nothing), GQA, head_dim
64/72/128, sequence lengths that are not multiples of the tiles, several tile sizes, and the flow-matching kernels
(noising, velocity MSE, CFG + Euler with each renorm). Errors are ``max |kernel − reference|``; a case passes when,
for every output, that error is at most ``tol · max(max |reference|, 1)`` (attention tol: 2e-4 for float32 traced
at ``highest`` precision (IEEE dots), 3e-3 for float32 at the default precision ("tf32": Triton and XLA use TF32
tensor cores on GPU), 3e-2 for bfloat16; flow matching: 1e-5 float32, 1e-2 bfloat16).

Per model (:func:`model_check`): one packed Stage II batch (text + ViT source + clean VAE source + noised VAE
target + answer text, several samples per row); the loss and every parameter gradient computed twice from the
same weights and noise, with ``attention_impl = flow_matching_impl = "reference"`` (matmuls at ``highest``
precision) and with the fused kernels; a difference over ``rtol`` of the loss or of a gradient's scale fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from synermedgen_jax.config import load_config
from synermedgen_jax.data.packing import (
    Pack,
    PackBudget,
    PackBuilder,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    stack_rows,
)
from synermedgen_jax.kernels import flow_matching as fm
from synermedgen_jax.kernels.attention import packed_attention, reference_attention
from synermedgen_jax.kernels.attention.pallas import BlockSizes
from synermedgen_jax.kernels.attention.tile_math import FULL, NOISE
from synermedgen_jax.kernels.synthetic_packs import (
    GEN,
    UND,
    causal_samples,
    layout_pack,
    random_samples,
    stage1_samples,
    stage2_samples,
)
from synermedgen_jax.modeling.synermedgen import SynerMedGen
from synermedgen_jax.training.objective import Prepared, UnifiedObjective

TOL = {"float32": 2e-4, "tf32": 3e-3, "bfloat16": 3e-2}
FM_TOL = {"float32": 1e-5, "bfloat16": 1e-2}


# ------------------------------------------------------------------------------------------------ packs


def _pack(kind: str, seq_len: int, rng: np.random.Generator):
    unit = max(seq_len // 32, 1)
    if kind == "stage2":  # 4 x (prompt + ViT source + clean VAE + noised VAE target), und then gen region
        return layout_pack(stage2_samples(4, unit, 2 * unit, 2 * unit), seq_len)
    if kind == "stage1":  # 8 x (question + ViT + answer)
        return layout_pack(stage1_samples(8, 3 * unit // 4, 2 * unit, max(unit // 4, 1)), seq_len)
    if kind == "causal":
        return layout_pack(causal_samples(1, seq_len), seq_len)
    if kind == "docs":
        return layout_pack(causal_samples(4, seq_len // 4), seq_len)
    if kind == "full":  # one bidirectional split (a ViT image alone)
        return layout_pack([[(FULL, seq_len, UND)]], seq_len)
    if kind == "blind":  # a noise split with padding around: padding rows see nothing
        return layout_pack([[(NOISE, seq_len // 3, GEN)]], seq_len, region_gap=seq_len // 3)
    if kind == "random":
        gap = int(rng.integers(0, 9))  # the samples leave room for the gap between the two regions
        return layout_pack(random_samples(rng, seq_len - gap), seq_len, region_gap=gap)
    raise ValueError(kind)


def _meta(kinds: tuple[str, ...], seq_len: int, rng):
    rows = [_pack(k, seq_len, rng) for k in kinds]
    return tuple(jnp.asarray(np.stack(x)) for x in zip(*rows))


# ------------------------------------------------------------------------------------------- attention


def attention_case(name, kinds, seq_len, hq, hkv, dim, dtype, sizes, impl, seed):
    """``dtype``: jnp.float32 (kernel traced at ``highest`` precision: IEEE float32 dots), "tf32" (float32 at the
    default precision, which on GPU lets Triton and XLA use TF32 tensor cores) or jnp.bfloat16."""
    label = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    precision = "highest" if label == "float32" else None
    dtype = jnp.float32 if label == "tf32" else dtype
    rng = np.random.default_rng(seed)
    meta = _meta(kinds, seq_len, rng)
    batch = len(kinds)
    q = jnp.asarray(rng.normal(size=(batch, seq_len, hq, dim)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(batch, seq_len, hkv, dim)), dtype) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(batch, seq_len, hq, dim)), dtype)  # random cotangent

    def vjp(fn, q, k, v, w):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(w.astype(out.dtype)))

    kernel = jax.jit(lambda q, k, v, w: vjp(
        lambda q, k, v: packed_attention(q, k, v, *meta, impl=impl, block_sizes=sizes), q, k, v, w))
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda q, k, v, w: vjp(lambda q, k, v: reference_attention(q, k, v, *meta), q, k, v, w))
        expected = ref(*(x.astype(jnp.float32) for x in (q, k, v, w)))
    with jax.default_matmul_precision(precision):
        got = kernel(q, k, v, w)
    tol = TOL[label]
    errs, rels, finite = {}, {}, True
    for output, g, r in zip(("out", "dq", "dk", "dv"), got, expected):
        g32 = np.asarray(g.astype(jnp.float32))
        r32 = np.asarray(r)
        finite &= bool(np.all(np.isfinite(g32)))
        errs[output] = float(np.max(np.abs(g32 - r32)))
        rels[output] = errs[output] / max(float(np.max(np.abs(r32))), 1.0)
    # Rows that see nothing (padding) must give exact zeros, forward and backward.
    blind = np.asarray(meta[0] < 0)
    zeros_ok = bool(np.all(np.asarray(got[0].astype(jnp.float32))[blind] == 0)
                    and np.all(np.asarray(got[1].astype(jnp.float32))[blind] == 0))
    ok = finite and zeros_ok and all(r <= tol for r in rels.values())
    blocks = "default" if sizes is None else f"{sizes.block_q}x{sizes.block_k}/{sizes.block_q_bwd}x{sizes.block_k_bwd}"
    return dict(kind="attention", case=name, B=batch, T=seq_len, Hq=hq, Hkv=hkv, D=dim, dtype=label,
                blocks=blocks, **{f"err_{k}": v for k, v in errs.items()}, worst_rel=max(rels.values()), tol=tol,
                finite=finite, padding_zero=zeros_ok, ok=ok)


def attention_cases(quick: bool):
    b64 = BlockSizes(64, 64, 64, 64)
    b128 = BlockSizes(128, 128, 64, 128, num_warps=8, num_stages=2)
    b32 = BlockSizes(32, 32, 32, 32, num_warps=4, num_stages=2)
    cases = [
        # name, kinds per batch row, T, Hq, Hkv, D, dtype, block sizes
        ("stage2 GQA7:1 D128", ("stage2",), 1024, 7, 1, 128, jnp.float32, None),
        ("stage2 GQA7:1 D128", ("stage2",), 1024, 7, 1, 128, jnp.bfloat16, None),
        ("random B2 odd T GQA3:1 D64", ("random", "random"), 777, 6, 2, 64, jnp.float32, None),
        ("random B2 odd T GQA3:1 D64", ("random", "random"), 777, 6, 2, 64, jnp.bfloat16, None),
        ("SigLIP full D72 T729", ("full",), 729, 4, 4, 72, jnp.bfloat16, None),
    ]
    if quick:
        return cases
    return cases + [
        ("stage2 GQA7:1 D128", ("stage2",), 1024, 7, 1, 128, "tf32", None),
        ("stage1 MHA D64", ("stage1",), 1024, 8, 8, 64, jnp.bfloat16, None),
        ("causal odd T GQA2:1 D128", ("causal",), 1000, 4, 2, 128, "tf32", None),
        ("causal odd T GQA2:1 D128", ("causal",), 1000, 4, 2, 128, jnp.bfloat16, None),
        ("docs+blind B2 D128", ("docs", "blind"), 640, 4, 1, 128, jnp.bfloat16, None),
        ("SigLIP full D72 T729", ("full",), 729, 4, 4, 72, jnp.float32, None),
        ("stage2 BAGEL-7B heads 28:4 D128", ("stage2",), 2048, 28, 4, 128, jnp.bfloat16, None),
        ("random B3 T333 tiles 32", ("random",) * 3, 333, 4, 2, 64, jnp.float32, b32),
        ("random B3 T333 tiles 32", ("random",) * 3, 333, 4, 2, 64, jnp.bfloat16, b32),
        ("stage2 tiles 64", ("stage2", "random"), 1500, 8, 2, 128, jnp.bfloat16, b64),
        ("stage2 tiles 128", ("stage2", "random"), 1500, 8, 2, 128, jnp.bfloat16, b128),
    ]


# ---------------------------------------------------------------------------------------- flow matching


def _rel(got, want):
    got, want = np.asarray(jnp.asarray(got, jnp.float32)), np.asarray(jnp.asarray(want, jnp.float32))
    return float(np.max(np.abs(got - want))), float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1.0)


def fm_case(name, n, c, dtype, fn, impl, seed):
    rng = np.random.default_rng(seed)
    arrays = [jnp.asarray(rng.normal(size=(n, c)), dtype) for _ in range(4)]
    t = jnp.asarray(rng.uniform(size=(n,)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(n,)) < 0.7)
    pairs = fn(arrays, t, mask, impl)
    tol = FM_TOL[jnp.dtype(dtype).name]
    errs = {label: _rel(g, r) for label, (g, r) in pairs.items()}
    finite = all(bool(np.all(np.isfinite(np.asarray(jnp.asarray(g, jnp.float32))))) for g, _ in pairs.values())
    worst = max(r for _, r in errs.values())
    return dict(kind="flow_matching", case=name, N=n, C=c, dtype=jnp.dtype(dtype).name,
                **{f"err_{k}": a for k, (a, _) in errs.items()}, worst_rel=worst, tol=tol, finite=finite,
                ok=finite and worst <= tol)


def _noised(arrays, t, mask, impl):
    x0, noise, g, _ = arrays

    def run(which):
        fn = lambda x0, noise, t: fm.noised_latents(x0, noise, t, impl=which)
        out, pullback = jax.vjp(fn, x0, noise, t)
        return (out, *pullback(g.astype(out.dtype)))

    got = jax.jit(lambda: run(impl))()
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda: run("reference"))()
    return dict(zip(("out", "dx0", "dnoise", "dt"), zip(got, want)))


def _mse(arrays, t, mask, impl):
    pred, x0, noise, _ = arrays

    def run(which):
        return jax.value_and_grad(lambda p, a, b: fm.velocity_mse_sum(p, a, b, mask, impl=which),
                                  argnums=(0, 1, 2))(pred, x0, noise)

    (loss, grads) = jax.jit(lambda: run(impl))()
    (ref_loss, ref_grads) = jax.jit(lambda: run("reference"))()
    # The loss is a sum over N tokens: compare it per token.
    n = pred.shape[0]
    return dict(loss_per_token=(loss / n, ref_loss / n), dpred=(grads[0], ref_grads[0]), dx0=(grads[1], ref_grads[1]),
                dnoise=(grads[2], ref_grads[2]))


def _step(renorm, cfg_img, t_value):
    def fn(arrays, t, mask, impl):
        x, v, vt, vi = arrays
        vt = (v.astype(jnp.float32) + 0.5 * vt.astype(jnp.float32)).astype(v.dtype)
        kwargs = dict(cfg_text=4.0, cfg_img=cfg_img, cfg_interval=(0.1, 1.0), renorm=renorm, renorm_min=0.0)
        step = lambda which: jax.jit(lambda x, v, vt, vi, t: fm.cfg_euler_step(
            x, v, vt, vi, t, 0.02, impl=which, **kwargs))(x, v, vt, vi, jnp.float32(t_value))
        return dict(x_next=(step(impl), step("reference")))

    return fn


def interpret_sized(cases):
    """Attention cases at an eighth of T (odd lengths stay odd): interpret mode on CPU is slow."""
    return [(*c[:2], max(64, c[2] // 8) | (c[2] & 1), *c[3:]) for c in cases]


def flow_matching_cases(quick: bool):
    cases = [("noised_latents", _noised), ("velocity_mse_sum", _mse),
             ("cfg_euler text_channel", _step("text_channel", 1.5, 0.6))]
    if not quick:
        cases += [("cfg_euler channel", _step("channel", 1.5, 0.6)), ("cfg_euler global", _step("global", 1.5, 0.6)),
                  ("cfg_euler global cfg_img=1", _step("global", 1.0, 0.6)),
                  ("cfg_euler outside interval", _step("text_channel", 1.5, 0.05))]
    shapes = [(1000, 64, jnp.float32), (1000, 64, jnp.bfloat16), (333, 48, jnp.float32)]
    if not quick:
        shapes += [(4096, 64, jnp.bfloat16), (333, 48, jnp.bfloat16)]
    return [(name, n, c, dtype, fn) for name, fn in cases for n, c, dtype in shapes]


def format_row(row: dict) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


# ------------------------------------------------------------------------------------------------- model


def packed_batch(config, image_side: int, samples: int, seed: int) -> tuple[dict, PackBudget]:
    """One Stage II pack row of ``samples`` random samples, as the model sees it (``[1, ...]`` arrays)."""
    patch = config.vit.patch_size
    vit_side = (image_side // patch) * patch
    rng = np.random.default_rng(seed)
    vocab = config.llm.vocab_size
    rows = []
    for _ in range(samples):
        source, target = (rng.uniform(-1, 1, (image_side, image_side)).astype(np.float32) for _ in range(2))
        rows.append([Text(rng.integers(5, vocab, size=8).tolist()), VitImage(source[:vit_side, :vit_side]),
                     VaeImage(source), VaeImage(target, noised=True),
                     Text(rng.integers(5, vocab, size=3).tolist(), loss=True)])
    # Size the budget from what the samples need (the builder's own count), plus a little padding.
    big = PackBudget(1 << 20, 1 << 20, 1 << 20, samples, 2 * samples, 1 << 20, (image_side,) * 2, (vit_side,) * 2)
    needs = [PackBuilder(big, SpecialTokens(1, 2, 3, 4, 0), config).need(sample) for sample in rows]
    budget = PackBudget(und_tokens=sum(n.und for n in needs) + 5, gen_tokens=sum(n.gen for n in needs) + 3,
                        vit_patches=sum(n.vit_patches for n in needs), vit_images=samples,
                        vae_images=2 * samples, ce_tokens=sum(n.ce for n in needs),
                        image_size=(image_side, image_side), vit_image_size=(vit_side, vit_side))
    builder = PackBuilder(budget, SpecialTokens(1, 2, 3, 4, 0), config)
    for sample in rows:
        builder.add(sample, rng)
    return {k: jnp.asarray(v) for k, v in stack_rows([builder.build()]).items()}, budget


def loss_and_grads(config, batch: dict, noise: jax.Array):
    """Loss terms and parameter gradients (a flat ``{path: array}``) of a fresh model (param seed 1)."""
    model = SynerMedGen(config, rngs=nnx.Rngs(params=1))
    # llm2vae starts at zero in BAGEL; a non-zero value makes the velocity (and its gradients) non-trivial.
    model.llm2vae.kernel[...] = 0.05 * jnp.ones_like(model.llm2vae.kernel[...])

    def loss_fn(model):
        inputs = Prepared(Pack.from_arrays(batch), model.latent_tokens(batch["vae_images"], None), noise)
        losses = UnifiedObjective().batch_metrics(model, inputs, flow_impl=config.flow_matching_impl)
        return losses["loss"], losses

    (_, losses), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    flat = {"/".join(map(str, path)): np.asarray(value[...], np.float32)
            for path, value in nnx.to_flat_state(nnx.state(grads, nnx.Param))}
    return {k: float(v) for k, v in losses.items() if np.ndim(v) == 0}, flat


def model_check(variant: str, impl: str, *, image_side: int = 64, samples: int = 3, seed: int = 0,
                rtol: float = 2e-3, precision: str = "default") -> tuple[list[str], list[str]]:
    """``(report lines, failures)``: the loss terms and every parameter gradient of ``variant`` with ``impl``
    against the jnp references (at ``highest``). ``precision``: matmul precision of the fused run ("default"
    lets XLA and the Triton kernels use TF32 for float32 on GPU; "highest" isolates the kernels' own error)."""
    reference = load_config(f"configs/models.py:{variant}")
    reference.attention_impl = reference.flow_matching_impl = "reference"  # the configs' "auto" is the kernels
    reference.vae.sample_posterior = False  # both runs must see the same latents
    fused = reference.copy_and_resolve_references()
    fused.attention_impl = fused.flow_matching_impl = impl
    batch, budget = packed_batch(reference, image_side, samples, seed)
    noise = jax.random.normal(jax.random.key(seed), (1, budget.gen_tokens, reference.vae.z_channels *
                                                     reference.latent_patch_size ** 2))
    with jax.default_matmul_precision("highest"):
        ref_losses, ref_grads = loss_and_grads(reference, batch, noise)
    with jax.default_matmul_precision(None if precision == "default" else precision):
        fused_losses, fused_grads = loss_and_grads(fused, batch, noise)

    lines = [f"# platform={jax.default_backend()} devices={jax.devices()} variant={variant} impl={impl} "
             f"T={budget.total_tokens} (und {budget.und_tokens} + gen {budget.gen_tokens}) precision={precision}"]
    failed = []
    for key, value in ref_losses.items():
        rel = abs(fused_losses[key] - value) / max(abs(value), 1e-6)
        lines.append(f"loss {key:>6}: reference={value:.6f} fused={fused_losses[key]:.6f} rel_diff={rel:.2e}")
        if rel > rtol:
            failed.append(f"loss {key}")
    # A gradient that is zero in exact arithmetic (e.g. a key bias: softmax ignores a constant shift) holds only
    # rounding noise, so each parameter's scale is floored at 1e-3 of the largest gradient in the model.
    floor = 1e-3 * max(float(np.max(np.abs(g))) for g in ref_grads.values())
    worst = sorted(((float(np.max(np.abs(fused_grads[p] - g))) / max(float(np.max(np.abs(g))), floor), p)
                    for p, g in ref_grads.items()), reverse=True)
    lines.append(f"gradients: {len(worst)} parameters; largest |Δgrad| / max(max|grad|, 1e-3 * model max):")
    lines += [f"  {rel:.2e}  {path}" for rel, path in worst[:8]]
    failed += [p for rel, p in worst if rel > rtol]
    if any(not np.all(np.isfinite(g)) for g in fused_grads.values()):
        failed.append("non-finite fused gradients")
    return lines, failed
