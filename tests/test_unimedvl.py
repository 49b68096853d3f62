"""UniMedVL (a BAGEL fork, arXiv 2510.15710, github.com/uni-medical/UniMedVL) in the BAGEL port.

A tiny folder in UniMedVL's layout: the BAGEL files (written by tests/port_fixtures.py with the official
safetensors writer, every bias and norm randomised) plus UniMedVL's extra model-file keys: the VAE inside the
model (``vae_model.<FLUX name>``; ``ae.safetensors`` then holds *other* values, since UniMedVL's loader lets the
model file's copy win) and the latent BatchNorm's running statistics (``vae_batch_norm.*``, BatchNorm2d(z,
eps=1e-4, affine=False), applied to every encoded latent). Checked against independent PyTorch references
(diffusers AutoencoderKL + torch BatchNorm2d, transformers Qwen, a hand-written MoT stack): the VAE path, the
understanding logits and the generation velocities within 1e-4 (float32); import → ``export --family unimedvl``
→ import is bit for bit.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from port_fixtures import SPECIAL_IDS, make_bagel_folder, port_test_config  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from synermedgen_jax.__main__ import main as cli  # noqa: E402
from synermedgen_jax.data.packing import (  # noqa: E402
    Pack,
    PackBudget,
    PackBuilder,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    patchify,
    stack_rows,
)
from synermedgen_jax.modeling.synermedgen import SynerMedGen  # noqa: E402
from synermedgen_jax.port import bagel, keys  # noqa: E402
from synermedgen_jax.training.objective import flow_matching_inputs  # noqa: E402

SPECIAL = SpecialTokens(**SPECIAL_IDS)
SEED = int(np.random.SeedSequence().entropy % 2**31)
ATOL = 1e-4
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159  # FLUX's latent map (UniMedVL's load_ae hard-codes it)
BN_EPS = 1e-4  # UniMedVL: nn.BatchNorm2d(latent_channel, eps=1e-4, affine=False, track_running_stats=True)


def make_unimedvl_folder(path, config, seed: int) -> dict:
    """A BAGEL folder turned into UniMedVL's layout: ``vae_model.*`` (the reference VAE) and ``vae_batch_norm.*``
    in ema.safetensors, and ae.safetensors perturbed (the model file's VAE must be the one read). Returns the
    references, with ``refs["bn"]`` the torch BatchNorm2d holding the written statistics."""
    refs = make_bagel_folder(path, config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    z = config.vae.z_channels
    bn = torch.nn.BatchNorm2d(z, eps=BN_EPS, affine=False, track_running_stats=True).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(z, generator=gen) - 0.5)
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(z, generator=gen))
        bn.num_batches_tracked.fill_(1234)
    ema = dict(refs["ema"])
    ema.update({f"vae_model.{k}": v for k, v in refs["ae"].items()})
    ema.update({f"vae_batch_norm.{k}": v.clone() for k, v in bn.state_dict().items()})
    save_file(ema, str(path / "ema.safetensors"), metadata={"format": "pt"})
    perturbed = {k: v + 0.5 * torch.rand(v.shape, generator=gen) for k, v in refs["ae"].items()}
    save_file(perturbed, str(path / "ae.safetensors"), metadata={"format": "pt"})
    refs.update(ema=ema, bn=bn)
    return refs


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_config):
    config = port_test_config(tiny_config)
    path = tmp_path_factory.mktemp("unimedvl") / "unimedvl"
    return config, path, make_unimedvl_folder(path, config, SEED)


def _imported(path, **options):
    config, params = bagel.load(path, compute_dtype="float32", **options)
    config.vae.sample_posterior = False  # the references encode to the posterior mean
    model = SynerMedGen(config, rngs=nnx.Rngs(params=0))
    flat = bagel.flatten(params)
    nnx.update(model, nnx.from_flat_state([(p, v.replace(np.asarray(flat[keys.dotted(p)])))
                                           for p, v in nnx.to_flat_state(keys.abstract_state(config))]))
    return config, params, model


def _reference_latents(refs, images: np.ndarray) -> torch.Tensor:
    """UniMedVL's conditioning latents: FLUX encode (posterior mean), scale/shift, then its BatchNorm
    (``forward_cache_update_vae``); ``images [N, H, W, 3]`` → ``[N, z, h, w]``."""
    with torch.no_grad():
        mean = refs["vae"].encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist.mean
        return refs["bn"](FLUX_SCALE * (mean - FLUX_SHIFT))


def test_import_recognises_unimedvl(folder, tmp_path, capsys):
    _, path, _ = folder
    assert cli(["import", "--bagel", str(path), "--out", str(tmp_path / "ck"), "--dtype", "f32"]) == 0
    out = capsys.readouterr().out
    assert "family: unimedvl (UniMedVL keys found)" in out
    assert "vae_model.* tensors read from the model file" in out and "latent BatchNorm" in out
    info = json.loads((tmp_path / "ck" / "port.json").read_text())
    assert info["family"] == "unimedvl"
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["vae"]["latent_batch_norm"] is True


def test_vae_path_matches_reference_with_batch_norm(folder):
    config, path, refs = folder
    imported, _, model = _imported(path)
    rng = np.random.default_rng(SEED)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    ours = nnx.jit(lambda m, x: m.vae.encode(x, sample=False))(model, jnp.asarray(images))
    theirs = _reference_latents(refs, images)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1), atol=ATOL, rtol=0)
    # Decoding does not invert the BatchNorm: UniMedVL's decode_image hands latents to vae.decode as they are.
    latents = rng.standard_normal((1, 8, 8, config.vae.z_channels)).astype(np.float32)
    decoded = nnx.jit(lambda m, z: m.vae.decode(z))(model, jnp.asarray(latents))
    with torch.no_grad():
        expect = refs["vae"].decode(torch.from_numpy(latents.transpose(0, 3, 1, 2)) / FLUX_SCALE + FLUX_SHIFT).sample
    np.testing.assert_allclose(np.asarray(decoded), expect.numpy().transpose(0, 2, 3, 1), atol=ATOL, rtol=0)


def test_understanding_logits_match_transformers(folder):
    config, path, refs = folder
    imported, _, model = _imported(path)
    ids = np.random.default_rng(SEED).integers(5, config.llm.vocab_size, size=20).tolist()
    budget = PackBudget(und_tokens=32, gen_tokens=0, vit_patches=0, vit_images=0, vae_images=0, ce_tokens=0,
                        image_size=(16, 16), vit_image_size=(28, 28))
    builder = PackBuilder(budget, SPECIAL, imported)
    builder.add([Text(ids)], np.random.default_rng(0))
    batch = {k: jnp.asarray(v) for k, v in stack_rows([builder.build()]).items()}

    @nnx.jit
    def logits(m, batch):
        lm = m.language_model
        meta = {k: batch[k] for k in ("sample_id", "split_id", "split_kind", "rope_id")}
        return lm.logits(lm(lm.embed(batch["token_ids"]), batch["token_ids"].shape[1], meta))

    ours = np.asarray(logits(model, batch))[0, : len(ids) + 2]
    with torch.no_grad():
        theirs = refs["llm"](torch.tensor([[SPECIAL.bos, *ids, SPECIAL.eos]])).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# An independent MoT reference (BAGEL's Qwen2MoTDecoderLayer, written from its code, as tests/test_port_bagel.py).
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _lin(sd, name, x):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos[:, None] * inv] * 2, -1).float()[:, None]
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * ang.cos() + rot * ang.sin()


def _mask(lens, modes):
    split_of = np.repeat(np.arange(len(lens)), lens)
    i, j = np.meshgrid(np.arange(sum(lens)), np.arange(sum(lens)), indexing="ij")
    si, sj = split_of[i], split_of[j]
    earlier = (sj < si) & ~np.isin(sj, [k for k, m in enumerate(modes) if m == "noise"])
    same = (sj == si) & ((np.asarray(modes)[si] != "causal") | (j <= i))
    return torch.from_numpy(earlier | same)


def _time_embed(sd, t):
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    feats = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    return _lin(sd, "time_embedder.mlp.2", torch.nn.functional.silu(_lin(sd, "time_embedder.mlp.0", feats)))


def _torch_vit(sd, vit, patches, pos_ids):
    p = "vit_model.vision_model."
    x = _lin(sd, p + "embeddings.patch_embedding", patches) + sd[p + "embeddings.position_embedding.weight"][pos_ids]
    ln = torch.nn.functional.layer_norm
    heads, dim = vit.num_heads, vit.hidden_size // vit.num_heads
    for i in range(vit.num_layers):
        q = f"{p}encoder.layers.{i}."
        h = ln(x, (x.shape[-1],), sd[q + "layer_norm1.weight"], sd[q + "layer_norm1.bias"], vit.layer_norm_eps)
        qh, kh, vh = (_lin(sd, q + f"self_attn.{n}_proj", h).view(-1, heads, dim).transpose(0, 1) for n in "qkv")
        att = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(dim), -1) @ vh
        x = x + _lin(sd, q + "self_attn.out_proj", att.transpose(0, 1).reshape(x.shape))
        h = ln(x, (x.shape[-1],), sd[q + "layer_norm2.weight"], sd[q + "layer_norm2.bias"], vit.layer_norm_eps)
        x = x + _lin(sd, q + "mlp.fc2", torch.nn.functional.gelu(_lin(sd, q + "mlp.fc1", h), approximate="tanh"))
    return ln(x, (x.shape[-1],), sd[p + "post_layernorm.weight"], sd[p + "post_layernorm.bias"], vit.layer_norm_eps)


def _torch_mot(sd, llm, x, gen, rope_ids, mask):
    m = "language_model.model."
    heads, kv, dim, eps = llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.rms_norm_eps
    pick = lambda und, gen_out: torch.where(gen[:, None], gen_out, und)  # noqa: E731
    for i in range(llm.num_layers):
        p = f"{m}layers.{i}."
        h = pick(_rms(x, sd[p + "input_layernorm.weight"], eps), _rms(x, sd[p + "input_layernorm_moe_gen.weight"], eps))
        qkv = {}
        for name, n_heads in (("q", heads), ("k", kv), ("v", kv)):
            per = [_lin(sd, f"{p}self_attn.{name}_proj{s}", h).view(-1, n_heads, dim) for s in ("", "_moe_gen")]
            if name != "v":
                per = [_rms(t, sd[f"{p}self_attn.{name}_norm{s}.weight"], eps) for t, s in zip(per, ("", "_moe_gen"))]
            qkv[name] = torch.where(gen[:, None, None], per[1], per[0])
        q, k = _rope(qkv["q"], rope_ids, llm.rope_theta), _rope(qkv["k"], rope_ids, llm.rope_theta)
        k, v = (t.repeat_interleave(heads // kv, dim=1).transpose(0, 1) for t in (k, qkv["v"]))
        scores = (q.transpose(0, 1) @ k.transpose(1, 2)) / math.sqrt(dim)
        att = (torch.softmax(scores.masked_fill(~mask, -torch.inf), -1) @ v).transpose(0, 1).reshape(len(x), -1)
        x = x + pick(_lin(sd, p + "self_attn.o_proj", att), _lin(sd, p + "self_attn.o_proj_moe_gen", att))
        outs = []
        for s in ("", "_moe_gen"):
            h = _rms(x, sd[f"{p}post_attention_layernorm{s}.weight"], eps)
            act = torch.nn.functional.silu(_lin(sd, f"{p}mlp{s}.gate_proj", h)) * _lin(sd, f"{p}mlp{s}.up_proj", h)
            outs.append(_lin(sd, f"{p}mlp{s}.down_proj", act))
        x = x + pick(*outs)
    return pick(_rms(x, sd[m + "norm.weight"], eps), _rms(x, sd[m + "norm_moe_gen.weight"], eps))


def test_edit_forward_matches_reference(folder):
    """UniMedVL's edit sequence ``[VAE(source), ViT(source), text, noised target]``: our model encodes the images
    itself (FLUX encoder → scale/shift → latent BatchNorm), the reference does the same in torch."""
    config, path, refs = folder
    imported, _, model = _imported(path)
    sd = {k: v.float() for k, v in refs["ema"].items()}
    rng = np.random.default_rng(SEED)
    ids = rng.integers(5, 500, 5).tolist()
    source = rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)
    target = rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)
    vit_img = rng.uniform(-1, 1, (28, 28, 3)).astype(np.float32)
    sample = [VaeImage(source), VitImage(vit_img), Text(ids), VaeImage(target, noised=True)]
    budget = PackBudget(und_tokens=24, gen_tokens=32, vit_patches=4, vit_images=1, vae_images=2, ce_tokens=1,
                        image_size=(16, 16), vit_image_size=(28, 28))
    builder = PackBuilder(budget, SPECIAL, imported)
    builder.add(sample, rng)
    batch = {k: jnp.asarray(v) for k, v in stack_rows([builder.build()]).items()}
    noise = rng.standard_normal((1, 32, 16)).astype(np.float32)

    def forward(m, pack, noise):
        clean = m.latent_tokens(pack.vae_images, None)  # the model's own VAE path, BatchNorm included
        flow = flow_matching_inputs(m, pack, clean, noise)
        return m(pack, flow.noised, flow.t)

    out = nnx.jit(forward)(model, Pack.from_arrays(batch), jnp.asarray(noise))

    latents = _reference_latents(refs, np.stack([source, target]))  # [2, z, 8, 8]: 4×4 tokens of 2×2 patches
    p = imported.latent_patch_size
    tokens = torch.einsum("nchpwq->nhwpqc", latents.reshape(2, -1, 4, p, 4, p)).reshape(2, 16, -1)
    t_noised = torch.sigmoid(torch.tensor(float(np.asarray(batch["timestep_logit"])[0, 16])))
    lat_pos = torch.tensor([r * imported.max_latent_size + c for r in range(4) for c in range(4)])

    def latent_block(x_t, t):
        return _lin(sd, "vae2llm", x_t) + _time_embed(sd, torch.full((16,), t)) + \
            sd["latent_pos_embed.pos_embed"][lat_pos]

    emb = lambda tokens: sd["language_model.model.embed_tokens.weight"][torch.tensor(tokens)]  # noqa: E731
    side = imported.vit.max_num_patch_per_side
    vit_pos = torch.tensor([r * side + c for r in range(2) for c in range(2)])
    vit_tok = _torch_vit(sd, imported.vit, torch.from_numpy(patchify(vit_img, 14)), vit_pos)
    vit_tok = _lin(sd, "connector.fc2", torch.nn.functional.gelu(_lin(sd, "connector.fc1", vit_tok),
                                                                 approximate="tanh"))
    vit_tok = vit_tok + sd["vit_pos_embed.pos_embed"][vit_pos]
    eps_ = torch.from_numpy(noise[0, 16:])  # the target's 16 tokens follow the source's in the gen region
    noised = (1 - t_noised) * tokens[1] + t_noised * eps_
    vs, ve = SPECIAL.vision_start, SPECIAL.vision_end
    x = torch.cat([emb([vs]), latent_block(tokens[0], 0.0), emb([ve]), emb([vs]), vit_tok, emb([ve]),
                   emb([SPECIAL.bos, *ids, SPECIAL.eos]), emb([vs]), latent_block(noised, float(t_noised)), emb([ve])])
    n_text = len(ids) + 2
    lens, modes = [18, 6, n_text, 18], ["full", "full", "causal", "noise"]
    rope = [0] * 18 + [1] * 6 + list(range(2, 2 + n_text)) + [2 + n_text] * 18
    target_at = 24 + n_text + 1
    gen = torch.zeros(len(x), dtype=torch.bool)
    gen[1:17] = gen[target_at:target_at + 16] = True
    with torch.no_grad():
        hidden = _torch_mot(sd, imported.llm, x, gen, torch.tensor(rope, dtype=torch.float64), _mask(lens, modes))
        velocity = _lin(sd, "llm2vae", hidden)
    gen_positions = [*range(1, 17), *range(target_at, target_at + 16)]
    np.testing.assert_allclose(np.asarray(out["velocity"])[0], velocity[gen_positions].numpy(), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
def _bits(path):
    return {k: (v.dtype, tuple(v.shape), v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            for k, v in load_file(str(path)).items()}


def test_export_unimedvl_reimports_bit_for_bit(folder, tmp_path, capsys):
    config, path, refs = folder
    ck, back, again = tmp_path / "ck", tmp_path / "back", tmp_path / "again"
    assert cli(["import", "--bagel", str(path), "--out", str(ck), "--dtype", "f32"]) == 0
    assert cli(["export", "--checkpoint", str(ck), "--out", str(back), "--dtype", "f32"]) == 0  # family from port.json
    assert "unimedvl layout" in capsys.readouterr().out
    original, exported = _bits(path / "ema.safetensors"), _bits(back / "ema.safetensors")
    counter = "vae_batch_norm.num_batches_tracked"  # a training counter: written as 0
    assert sorted(original) == sorted(exported)
    assert [k for k in original if k != counter and original[k] != exported[k]] == []
    assert _bits(back / "model.safetensors") == exported
    # ae.safetensors now holds the VAE UniMedVL's loader ends up with: the model file's copy.
    assert _bits(back / "ae.safetensors") == {k.removeprefix("vae_model."): v for k, v in exported.items()
                                              if k.startswith("vae_model.")}
    _, first = bagel.load(path)
    _, second = bagel.load(back)
    first, second = bagel.flatten(first), bagel.flatten(second)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k].tobytes() != second[k].tobytes()] == []
    assert cli(["import", "--bagel", str(back), "--out", str(again), "--dtype", "f32"]) == 0
    assert json.loads((again / "port.json").read_text())["family"] == "unimedvl"


def test_unmappable_keys_are_refused_in_one_line(folder, tmp_path, capsys):
    config, path, refs = folder
    bad = tmp_path / "affine"
    make_bagel_folder(bad, config, seed=SEED + 1)
    ema = load_file(str(bad / "ema.safetensors"))
    z = config.vae.z_channels
    ema.update({"vae_batch_norm.running_mean": torch.zeros(z), "vae_batch_norm.running_var": torch.ones(z),
                "vae_batch_norm.weight": torch.ones(z), "vae_batch_norm.bias": torch.zeros(z)})
    save_file(ema, str(bad / "ema.safetensors"))
    assert cli(["import", "--bagel", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "vae_batch_norm.bias, vae_batch_norm.weight" in err and "affine=False" in err
    assert cli(["import", "--bagel", str(path), "--out", str(tmp_path / "y"), "--family", "bagel"]) == 2
    assert "holds UniMedVL keys" in capsys.readouterr().err
    ck = tmp_path / "ck"
    assert cli(["import", "--bagel", str(path), "--out", str(ck)]) == 0
    assert cli(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "z"), "--family", "bagel"]) == 2
    assert "export it as family unimedvl" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


# ---------------------------------------------------------------------------------------------------------
# Understanding then edit: our packed contexts against UniMedVL's inferencer, re-implemented from reading
# codes/inferencer.py and codes/modeling/unimedvl/bagel.py (prepare_prompts / prepare_vit_images /
# prepare_vae_images / prepare_vae_latent / prepare_start_tokens) and codes/interactive_image_generator.py:
#   * a text update is one causal split [<|im_start|>, *tokenizer.encode(text), <|im_end|>] at RoPE ids
#     rope, rope+1, ...; the rope advances by its length;
#   * an image's VAE update is [start_of_image, h·w latents, end_of_image] at one RoPE id, then its ViT update
#     [start_of_image, patches, end_of_image] at the next (rope + 1 after each);
#   * understanding (understanding_output=True): the image enters as ViT only, then the question; decoding
#     starts with <|im_start|> at the current rope;
#   * the edit (interleave_inference([image, final_instruction])): gen = [VAE, ViT, text]; cfg_text = the
#     context before the text ([VAE, ViT]); cfg_img = [text]; each then gets the noised target
#     [start_of_image, h·w noised latents, end_of_image] at its current rope;
#   * final_instruction = f"{edit_instruction}\n\n{understanding_text}" when the answer is non-empty.
class _UniMedVLContext:
    def __init__(self, special: SpecialTokens):
        self.special = special  # new_token_ids: bos/eos_token_id, start_of_image/end_of_image
        self.splits: list[tuple[str, tuple, tuple]] = []
        self.rope = 0

    def copy(self):
        other = _UniMedVLContext(self.special)
        other.splits, other.rope = list(self.splits), self.rope
        return other

    def text(self, ids):
        tokens = (self.special.bos, *ids, self.special.eos)
        self.splits.append(("causal", tokens, tuple(range(self.rope, self.rope + len(tokens)))))
        self.rope += len(tokens)

    def image(self, what: str, count: int, kind: str = "full", advance: bool = True):
        tokens = (self.special.vision_start, *[what] * count, self.special.vision_end)
        self.splits.append((kind, tokens, (self.rope,) * len(tokens)))
        self.rope += int(advance)


def _our_splits(batch) -> list[tuple[str, tuple, tuple]]:
    """Row 0 of a pack as UniMedVL-style splits: markers and text ids from the understanding region, ViT patch
    slots as "vit", the split's generation tokens (between its two markers) as "latent" / "noise"."""
    from synermedgen_jax.data.packing import NOISE

    arrays = {k: np.asarray(v)[0] for k, v in batch.arrays().items()}
    tu = arrays["token_ids"].shape[0]
    valid = arrays["sample_id"] >= 0
    vit_slots = set(arrays["vit_dest"][arrays["vit_image_id"] >= 0].tolist())
    names = {0: "causal", 1: "full", 2: "noise"}
    out = []
    for split in sorted(set(arrays["split_id"][valid].tolist())):
        where = np.nonzero(valid & (arrays["split_id"] == split))[0]
        und, gen = [i for i in where if i < tu], [i for i in where if i >= tu]
        tokens = ["vit" if i in vit_slots else int(arrays["token_ids"][i]) for i in und]
        ropes = [int(arrays["rope_id"][i]) for i in und]
        kind = int(arrays["split_kind"][where[0]])
        if gen:  # a VAE split: its two markers are in the understanding region, its latents between them
            assert len(und) == 2
            tokens = [tokens[0], *["noise" if kind == NOISE else "latent"] * len(gen), tokens[1]]
            ropes = [ropes[0], *[int(arrays["rope_id"][i]) for i in gen], ropes[1]]
        out.append((names[kind], tuple(tokens), tuple(ropes)))
    return out


@pytest.mark.parametrize("mode", ["understand-edit", "think-edit"])
def test_understand_then_edit_context_matches_unimedvl(tiny_config, mode):
    from argparse import Namespace

    from synermedgen_jax.data.packing import Geometry
    from synermedgen_jax.data.tokenizer import build_default_tokenizer
    from synermedgen_jax.data.volumes import resize_image
    from synermedgen_jax.inference import family
    from synermedgen_jax.inference.loading import Inference
    from synermedgen_jax.inference.sampler import context_samples, exact_pack
    from synermedgen_jax.inference.understanding import Answerer, DecodeConfig

    config = tiny_config.copy_and_resolve_references()
    config.vae.sample_posterior = False
    model = SynerMedGen(config, rngs=nnx.Rngs(params=0))  # fixed: its greedy answer is not empty
    tokenizer = build_default_tokenizer()
    special = SpecialTokens.from_tokenizer(tokenizer)
    inference = Inference(model=model, tokenizer=tokenizer, image_size=(16, 16), vit_image_size=(28, 28),
                          family="unimedvl")
    settings = family.resolve(inference, Namespace(mode=mode, answer_tokens=5))
    assert (settings.cfg_text, settings.cfg_img, settings.image_first) == (4.0, 2.0, True)
    instruction = "Translate this T1 MRI slice to T2."
    source = np.random.default_rng(SEED).uniform(-1, 1, (1, 16, 16)).astype(np.float32)
    vae_size, vit_size = inference.sizes_for(16, 16)
    assert vit_size == inference.vit_rule.size_for(*vae_size)  # ViT rule on the VAE-resized image
    patches = (vit_size[0] // 14) * (vit_size[1] // 14)
    latents = (vae_size[0] // 4) * (vae_size[1] // 4)  # tiny model: VAE /2, latent patch 2

    # Understanding step: our pack against the inferencer's context.
    question = family.question(mode, instruction)
    items = family.understanding_items(mode, tokenizer.encode(question), resize_image(source[0], vit_size),
                                       tokenizer.encode)
    pack = exact_pack([items], Geometry.from_model_config(config), special, vae_size, vit_size)[0]
    reference = _UniMedVLContext(special)
    if mode == "think-edit":
        reference.text(tokenizer.encode(family.THINK_SYSTEM_PROMPT))
        assert question == f"Analyze this medical image and develop an editing strategy for: '{instruction}'."
    reference.image("vit", patches)
    reference.text(tokenizer.encode(question))
    ours = _our_splits(pack)
    assert ours == reference.splits
    assert max(r for _, _, ropes in ours for r in ropes) + 1 == reference.rope  # where <|im_start|> decodes from

    # The answer, then the edit text exactly as UniMedVL composes it.
    answerer = Answerer(model, tokenizer, vae_size, vit_size, DecodeConfig(max_new_tokens=5))
    answer = tokenizer.decode(answerer.generate_item_ids([items])[0])
    assert answer.strip()
    texts = family.edit_instructions(inference, settings, instruction, source)
    expected = (f"{instruction}\n\nBased on analysis: {answer}" if mode == "think-edit" else
                f"{instruction}\n\n{answer}") if answer else instruction
    assert texts == [expected]

    # The edit's three CFG contexts.
    final_ids = tokenizer.encode(texts[0])
    samples = context_samples(final_ids, source, vae_size, vit_size, image_first=settings.image_first)
    gen = _UniMedVLContext(special)
    gen.image("latent", latents)
    gen.image("vit", patches)
    cfg_text = gen.copy()
    cfg_img = _UniMedVLContext(special)
    gen.text(final_ids)
    cfg_img.text(final_ids)
    for name, context in (("cond", gen), ("text_uncond", cfg_text), ("img_uncond", cfg_img)):
        context.image("noise", latents, kind="noise", advance=False)
        pack = exact_pack([samples[name][0]], Geometry.from_model_config(config), special, vae_size, vit_size)[0]
        assert _our_splits(pack) == context.splits, name


# ---------------------------------------------------------------------------------------------------------
def test_eval_scores_several_checkpoints_in_one_table(tiny_config, tmp_path_factory, monkeypatch, capsys):
    """``eval --checkpoint A --checkpoint B``: one table with the copy baseline and both models on the same
    slices, each with its family's defaults (B: UniMedVL's guidance 4 / 2 and understanding-then-edit)."""
    import train_helpers as h

    from synermedgen_jax.data.tokenizer import load_tokenizer
    from synermedgen_jax.inference import family, loading

    data = h.build_data(tmp_path_factory.mktemp("evaldata"))
    data_tokenizer = load_tokenizer(data / "tokenizer.json")
    config = tiny_config.copy_and_resolve_references()
    config.vae.sample_posterior = False
    models = {name: SynerMedGen(config, rngs=nnx.Rngs(params=seed)) for seed, name in enumerate(("ours", "uni"))}
    families = {"ours": "synermedgen", "uni": "unimedvl"}

    def load(path, tokenizer=None, mesh=None):  # stands in for the checkpoints (what --checkpoint calls)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return loading.Inference(model=models[name], tokenizer=data_tokenizer, image_size=(32, 32),
                                 vit_image_size=(28, 28), family=families[name])

    asked = []
    answers = family.answers_for
    monkeypatch.setattr(loading, "load_for_inference", load)
    monkeypatch.setattr(family, "answers_for", lambda *a, **k: asked.append(a[2]) or answers(*a, **k))
    out = tmp_path_factory.mktemp("compare")
    task = "mni152-sim/brain/t1->t2"
    assert cli(["eval", "--checkpoint", "ckpt/ours", "--checkpoint", "ckpt/uni", "--data", str(data), "--split", "val",
                "--tasks", task, "--steps", "2", "--max-slices", "2", "--max-instances", "0", "--batch-size", "2",
                "--answer-tokens", "3", "--out", str(out), "--no-progress"]) == 0
    assert "comparison written" in capsys.readouterr().out
    table = json.loads((out / "comparison.json").read_text())
    assert table["methods"] == ["copy", "ours", "uni"]
    assert table["settings"]["ours"] == {"family": "synermedgen", "mode": "edit", "cfg_text": 4.0, "cfg_img": 1.5}
    assert table["settings"]["uni"] == {"family": "unimedvl", "mode": "understand-edit", "cfg_text": 4.0,
                                        "cfg_img": 2.0}
    assert len(asked) == 1  # only UniMedVL answered the instruction first (one route)
    reports = {name: json.loads((out / name / "results.json").read_text()) for name in ("ours", "uni")}
    row = table["routes"][task]
    assert row["slices"] == 2 and reports["ours"]["synthesis"][task]["records"] == \
        reports["uni"]["synthesis"][task]["records"]
    identity = {name: reports[name]["synthesis"][task]["identity"] for name in ("ours", "uni")}
    assert row["copy"] == identity["ours"] == identity["uni"]
    for name in ("ours", "uni"):
        assert row[name] == reports[name]["synthesis"][task]["model"]
    assert row["ours"] != row["uni"]
    md = (out / "comparison.md").read_text()
    assert "| uni | unimedvl | understand-edit | 4 / 2 |" in md and task in md
    # The same flags score one checkpoint alone as before; several need --out.
    assert cli(["eval", "--checkpoint", "a", "--checkpoint", "b", "--data", str(data)]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_family_defaults_and_flags(tiny_config):
    """The checkpoint's family picks the defaults; --family / --cfg-* / --mode / --*-resize override them."""
    from argparse import Namespace
    from types import SimpleNamespace

    from synermedgen_jax.data.geometry import ResizeRule
    from synermedgen_jax.inference import family
    from synermedgen_jax.inference.loading import Inference

    def inference(name):
        return Inference(model=SimpleNamespace(config=tiny_config), tokenizer=None, image_size=(32, 32),
                         vit_image_size=(28, 28), family=name)

    ours = inference("synermedgen")
    settings = family.resolve(ours, Namespace())
    assert (settings.cfg_text, settings.cfg_img, settings.mode, settings.image_first) == (4.0, 1.5, "edit", None)
    assert (ours.vae_rule, ours.vit_rule, ours.image_size) == (None, None, (32, 32))  # its own fixed sizes
    uni = inference("unimedvl")
    settings = family.resolve(uni, Namespace(cfg_img=None, mode=None))
    assert (settings.family, settings.cfg_img, settings.mode) == ("unimedvl", 2.0, "understand-edit")
    assert (uni.vae_rule.min_side, uni.vae_rule.stride, uni.vit_rule.stride, uni.vit_after_vae) == (32, 4, 14, True)
    settings = family.resolve(inference("unimedvl"), Namespace(cfg_img=1.0, mode="edit", cfg_text=3.0))
    assert (settings.cfg_text, settings.cfg_img, settings.mode) == (3.0, 1.0, "edit")
    as_uni = inference("synermedgen")
    settings = family.resolve(as_uni, Namespace(family="unimedvl", vae_resize=ResizeRule(16, 32, 4)))
    assert settings.mode == "understand-edit" and as_uni.vae_rule == ResizeRule(16, 32, 4)
    assert as_uni.sizes_for(10, 20) == ((16, 32), as_uni.vit_rule.size_for(16, 32))
    assert family.edit_text("understand-edit", "do x", "") == "do x"  # an empty answer: the instruction alone
    assert family.edit_text("think-edit", "do x", "plan") == "do x\n\nBased on analysis: plan"


def test_metadata_and_volume_paths_edit_on_instruction_plus_answer(tmp_path, monkeypatch):
    """``synthesize --metadata`` and the NIfTI path in understanding-then-edit mode: each source's edit runs on
    its own "instruction\\n\\nanswer" text with the image-first context; entries with the same answer share a
    batch (the answers and the sampler are stand-ins here: the packing is the context test's)."""
    from PIL import Image

    from synermedgen_jax.inference import family
    from synermedgen_jax.inference import metadata as meta
    from synermedgen_jax.inference.loading import Inference
    from synermedgen_jax.inference.sampler import Sampler, SamplerConfig

    class Tokenizer:
        def encode(self, text):
            return [ord(c) for c in text]

    calls = []
    monkeypatch.setattr(Sampler, "__init__", lambda self, model, special, image_size, vit_image_size, config, *,
                        mesh=None, image_first=False: self.__dict__.update(
                            image_size=tuple(image_size), image_first=image_first, batch_divisor=1))

    def generate(self, sources, ids, *, seed=0, batch_size=8, indices=None, progress=None):
        calls.append(("".join(map(chr, ids)), self.image_first, [int(i) for i in indices]))
        return np.zeros((len(sources), *self.image_size), np.float32)

    monkeypatch.setattr(Sampler, "generate", generate)
    monkeypatch.setattr(Inference, "special", property(lambda self: None))
    # The answer depends on the source's brightness: "bright" or "dark".
    monkeypatch.setattr(family, "answers_for", lambda inference, settings, instruction, sources, **kw: [
        "bright" if s.mean() > 0 else "dark" for s in sources])
    inference = Inference(model=None, tokenizer=Tokenizer(), image_size=(16, 16), vit_image_size=(28, 28))
    settings = family.Settings("unimedvl", 4.0, 2.0, "understand-edit", 8, True)
    root = tmp_path / "src"
    root.mkdir()
    for key, value in (("a", 250), ("b", 10), ("c", 240)):
        Image.fromarray(np.full((16, 16), value, np.uint8)).save(root / f"{key}.png")
    metadata = {key: {"id": f"{key}.png", "prompt": "T1 to T2"} for key in "abc"}
    result = meta.synthesize_metadata(inference, metadata, root, tmp_path / "out", sampler_config=SamplerConfig(
        num_steps=2), settings=settings)
    assert sorted(result["written"]) == ["a", "b", "c"]
    assert sorted(calls) == [("T1 to T2\n\nbright", True, [0, 2]), ("T1 to T2\n\ndark", True, [1])]
    # The NIfTI path: per-slice texts, noise indices kept (the slice numbers).
    calls.clear()
    sampler = Sampler(None, None, (16, 16), (28, 28), None, image_first=True)
    slices = np.stack([np.full((16, 16), v, np.float32) for v in (0.5, -0.5, 0.5)])
    texts = family.edit_instructions(inference, settings, "T1 to T2", slices)
    ids = [inference.tokenizer.encode(t) for t in texts]
    family.generate_edits(sampler, slices, ids, seed=3, indices=[4, 5, 6])
    assert sorted(calls) == [("T1 to T2\n\nbright", True, [4, 6]), ("T1 to T2\n\ndark", True, [5])]
