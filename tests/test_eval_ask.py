"""Understanding decoding with a KV cache: equal to the uncached model forward; top-p; the ask command."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from synermedgen_jax.data.packing import Text, VitImage
from synermedgen_jax.inference.understanding import Answerer, DecodeConfig, choose_tokens
from synermedgen_jax.modeling.synermedgen import SynerMedGen

pytestmark = pytest.mark.usefixtures("fast_compile")


class _Tok:
    """Integer 'tokenizer' over the tiny vocabulary: text is space-separated ids (keeps the test exact)."""

    bos_id, eos_id, vision_start_id, vision_end_id, pad_id = 1, 2, 3, 4, 0
    vocab_size = 500

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def model(tiny_config):
    return SynerMedGen(tiny_config, rngs=nnx.Rngs(params=3))


def test_cached_decoding_equals_uncached_forward(model):
    rng = np.random.default_rng(0)
    prompts = [([7, 8, 9, 10, 11], [rng.uniform(-1, 1, (28, 28)).astype(np.float32)]),
               ([12, 13], [rng.uniform(-1, 1, (28, 28)).astype(np.float32)] * 2)]  # rows of different length
    answerer = Answerer(model, _Tok(), (16, 16), (28, 28), DecodeConfig(max_new_tokens=5))
    answers = answerer.generate_ids(prompts)
    assert all(len(a) >= 1 for a in answers)
    # Uncached reference: the training forward on [question, images, answer (CE)] predicts each answer token
    # as the argmax of its position's logits, and its first logits equal the decoder's.
    for (ids, images), answer in zip(prompts, answers):
        sample = [Text(ids)] + [VitImage(img) for img in images] + [Text(answer, loss=True)]
        batch = answerer.pack([(ids, images)])  # context only, to size the budget
        from synermedgen_jax.inference.sampler import exact_pack

        full, _ = exact_pack([sample], answerer.geometry, answerer.special, (16, 16), (28, 28))
        del batch
        jb = jax.tree.map(jnp.asarray, full)
        tokens = jnp.zeros((1, 0, model.llm2vae.kernel.value.shape[1]))
        out = nnx.jit(lambda m, b, c: m(b, c, c[..., 0]))(model, jb, tokens)  # no generation tokens, no times
        logits = np.asarray(out["logits"])[0][np.asarray(full.ce_mask[0]) > 0]
        allowed = logits[:, :_Tok.vocab_size]
        predicted = allowed.argmax(-1).tolist()
        # CE positions: <|im_start|>, answer tokens; labels: answer tokens, <|im_end|>.
        assert predicted[:len(answer)] == answer
        if len(answer) < 5:  # decoding stopped at <|im_end|>: the forward predicts it too
            assert predicted[len(answer)] == _Tok.eos_id


def test_top_p_keeps_the_nucleus_only():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    draws = jax.vmap(lambda k: choose_tokens(logits, k, DecodeConfig(temperature=1.0, top_p=0.7)))(
        jax.random.split(jax.random.key(0), 2000))
    counts = np.bincount(np.asarray(draws).ravel(), minlength=4) / 2000
    # Nucleus {0, 1} (0.5 + 0.3 >= 0.7), renormalised: 0.625 / 0.375; token 2 and 3 never drawn.
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] - 0.625) < 0.04
    assert int(choose_tokens(logits, jax.random.key(1), DecodeConfig())[0]) == 0


def test_ask_command_reads_png_and_nifti_slices(model, tmp_path, monkeypatch, capsys):
    from synermedgen_jax.__main__ import main as cli
    from synermedgen_jax.inference import loading

    png = tmp_path / "a.png"
    Image.fromarray((np.arange(30 * 30).reshape(30, 30) % 256).astype(np.uint8)).save(png)
    vol = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(20, 20, 4)).astype(np.float32), np.eye(4)),
             str(vol))
    inference = loading.Inference(model=model, tokenizer=_Tok(), image_size=(16, 16), vit_image_size=(28, 28))
    monkeypatch.setattr(loading, "load_for_inference", lambda path, tokenizer=None: inference)
    code = cli(["ask", "--checkpoint", "x", "--image", str(png), "--image", f"{vol}:2", "--prompt", "5 6 7",
                "--max-new-tokens", "3"])
    assert code == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    code = cli(["ask", "--checkpoint", "x", "--image", str(png), "--label", "5", "--image", f"{vol}:2", "--label",
                "6", "--prompt", "5 6 7", "--max-new-tokens", "3"])
    assert code == 0 and len(capsys.readouterr().out.strip().splitlines()) == 1
    code = cli(["ask", "--checkpoint", "x", "--image", str(png), "--label", "5", "--image", f"{vol}:2",
                "--prompt", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "1 labels for 2 images" in err[0], err
    for bad, message in [(f"{vol}:9", "slice 9 out of range"), (str(tmp_path / "none.png"), "not found"),
                         (f"{png}:1", "for NIfTI volumes only")]:
        code = cli(["ask", "--checkpoint", "x", "--image", bad, "--prompt", "5"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (bad, err)
