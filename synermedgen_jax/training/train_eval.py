"""In-training evaluation on the held-out split: per-task understanding accuracy, Stage II MSE, VAE PSNR, and
Stage II sample grids.

Eval batches are fixed (read once, the same rows every time) and replicated on every process; the eval step
runs on the training mesh with the EMA weights when the run keeps an EMA. Understanding accuracy is greedy
exact match of the answer (objective.answer_exact_match): chance is 1/4 for the lettered CTS/TIA questions.

Sample grids (``SampleGrids``, Stage II, every ``train.image_every`` steps): a few fixed held-out slices of one
route are synthesized with inference/sampler.py's ``Sampler`` from the current (EMA) weights and written as a
source / target / prediction PNG (``images/step_<s>.png``, atomic) and a tensorboard image.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from synermedgen_jax.training import inputs, sharding
from synermedgen_jax.training import step as step_lib
from synermedgen_jax.training.logging import image_grid

UND_TASKS = ("cts", "tia", "mi")


def eval_tasks(config) -> tuple[str, ...]:
    if config.stage == "vae":
        return ("images",)
    if config.stage == "stage2_ucg":
        return ("pairs",)
    return UND_TASKS + (("vqa",) if config.stage == "baseline_vqa" else ())


def _global(batch: dict, mesh) -> dict:
    shardings = sharding.batch_sharding(mesh, batch)
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx]) for k, v in batch.items()}


class Evaluator:
    def __init__(self, config, codec, objective, state_sh, mesh, logger):
        self.config, self.codec, self.objective, self.mesh, self.logger = config, codec, objective, mesh, logger
        rows = int(config.train.eval_rows)
        if rows % sharding.batch_divisor(mesh):
            raise ValueError(f"config.train.eval_rows={rows} must be a multiple of data×fsdp="
                             f"{sharding.batch_divisor(mesh)}")
        self.batches = {}
        for task in eval_tasks(config):
            if task == "images":
                ds = inputs.image_dataset(config, shard=0, shards=1, rows=rows, split=config.data.eval_split,
                                          shuffle=False)
                self.batches[task] = next(iter(ds))
            else:
                self.batches[task] = inputs.eval_batches(config, task, rows)
        self._steps = {}
        self.state_sh = state_sh

    def _step(self, task: str, batch: dict):
        if task not in self._steps:
            batch_sh = sharding.batch_sharding(self.mesh, batch)
            if task == "images":
                fn = _vae_eval(self.codec, self.objective)
            else:
                fn = step_lib.make_eval_step(self.codec, self.objective)
            self._steps[task] = jax.jit(fn, in_shardings=(self.state_sh, batch_sh),
                                        out_shardings=sharding.replicated(self.mesh))
        return self._steps[task]

    def __call__(self, state: dict, step: int) -> dict[str, dict]:
        results = {}
        for task, batch in self.batches.items():
            out = jax.device_get(self._step(task, batch)(state, _global(batch, self.mesh)))
            if task == "images":
                grid = image_grid([out.pop("source"), out.pop("recon")])
                if self.logger:
                    self.logger.images("eval/reconstruction", grid, step)
                values = {k: float(v) for k, v in out.items()}
            elif task == "pairs":
                values = {"mse": float(out["mse"])}
            else:
                values = {"answer_accuracy": float(out["answers_correct"]) / max(float(out["answers"]), 1.0),
                          "answers": float(out["answers"]), "token_accuracy": float(out["token_accuracy"]),
                          "ce": float(out["ce"])}
            results[task] = values
            if self.logger:
                self.logger.scalars(f"eval/{task}", values, step)
        return results


def _vae_eval(codec, objective):
    from synermedgen_jax.training.vae_stage import reconstruct

    def fn(state, batch):
        params = state["ema"] or state["params"]
        model = codec.model(params, state["frozen"])
        recon = reconstruct(model, batch["image"])
        l2 = np.float32(0) + ((recon - batch["image"]) ** 2).mean()
        return {"l2": l2, "psnr": 10.0 * jax.numpy.log10(4.0 / l2), "source": batch["image"][:8],
                "recon": recon[:8]}

    return fn


class SampleGrids:
    """Stage II pictures during training: ``train.image_slices`` held-out slices of one route (the first route
    of the eval split's pair table), synthesized with ``train.image_sample_steps`` flow-matching steps.

    Every process takes part in gathering the (sharded) weights; process 0 samples and writes."""

    def __init__(self, config, codec, workdir: str | Path, logger):
        from synermedgen_jax.data import prompts
        from synermedgen_jax.data.records import RecordReader, load_index
        from synermedgen_jax.data.tokenizer import load_tokenizer
        from synermedgen_jax.data.understanding import load_instances
        from synermedgen_jax.data.volumes import MODALITY_NAMES

        tcfg, data = config.train, config.data
        self.config, self.codec, self.logger = config, codec, logger
        self.dir = Path(workdir) / "images"
        count = int(tcfg.image_slices)
        if count < 1 or int(tcfg.image_sample_steps) < 2:
            raise ValueError(f"config.train.image_slices={count} must be >= 1 and train.image_sample_steps="
                             f"{tcfg.image_sample_steps} >= 2")
        path = Path(data.dir) / "instances" / f"{data.eval_split}.npz"
        pairs = load_instances(path).get("pairs") if path.exists() else None
        if pairs is None or len(pairs["rec"]) == 0:
            raise ValueError(f"{path}: no Stage II pairs in split {data.eval_split!r} for the sample grids "
                             "(set config.train.image_every=0)")
        src, tgt = int(pairs["src"][0]), int(pairs["tgt"][0])
        same = np.flatnonzero((pairs["src"] == src) & (pairs["tgt"] == tgt))
        records = pairs["rec"][same]
        # Prefer slices with the most anatomy (the builder's foreground fraction), then spread them evenly.
        foreground = np.asarray(load_index(data.dir, data.eval_split)["foreground"], np.float64)[records]
        records = records[foreground >= np.median(foreground)]
        picks = np.unique(np.linspace(0, len(records) - 1, num=min(count, len(records))).round().astype(int))
        reader = RecordReader(data.dir, data.eval_split)
        items = [reader[int(records[i])] for i in picks]
        self.src, self.tgt = MODALITY_NAMES[src], MODALITY_NAMES[tgt]
        self.sources = np.stack([np.asarray(r["images"][self.src], np.float32) for r in items])
        self.targets = np.stack([np.asarray(r["images"][self.tgt], np.float32) for r in items])
        self.indices = np.asarray([int(records[i]) for i in picks])
        self.tokenizer = load_tokenizer(Path(data.dir) / "tokenizer.json")
        # Template 0 is the registry's wording: the instruction eval and synthesize use.
        self.instruction = self.tokenizer.encode(prompts.generation_instruction(0, self.src, self.tgt,
                                                                                items[0]["anatomy"]))
        self._gather = None
        self._sampler = None

    def _host_weights(self, state: dict, mesh) -> tuple[dict, dict]:
        """Fully replicated copies of the (EMA) parameters and the frozen ones as host numpy arrays."""
        tree = {"params": state["ema"] or state["params"], "frozen": state["frozen"]}
        if self._gather is None:
            self._gather = jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh))
        full = self._gather(tree)
        host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), full)
        return host["params"], host["frozen"]

    def __call__(self, state: dict, step: int, mesh) -> Path | None:
        """Samples the slices at ``step``; returns the PNG path on process 0 (None elsewhere)."""
        from synermedgen_jax.data.packing import SpecialTokens
        from synermedgen_jax.data.records import write_png
        from synermedgen_jax.data.volumes import resize_image
        from synermedgen_jax.inference.sampler import Sampler, SamplerConfig

        params, frozen = self._host_weights(state, mesh)
        if jax.process_index() != 0:
            return None
        tcfg, pack = self.config.train, self.config.data.pack
        model = self.codec.model(params, frozen)
        if self._sampler is None:
            self._sampler = Sampler(model, SpecialTokens.from_tokenizer(self.tokenizer), tuple(pack.image_size),
                                    tuple(pack.vit_image_size), SamplerConfig(num_steps=int(tcfg.image_sample_steps)))
        else:
            # Same graph, new weights: the sampler's compiled function takes its state as an argument, so
            # swapping the state reuses the compilation instead of tracing a new sampler every time.
            self._sampler.state = nnx.state(model)
        preds = self._sampler.generate(self.sources, self.instruction, seed=int(tcfg.seed),
                                       batch_size=len(self.sources), indices=self.indices)
        size = preds.shape[1:]
        columns = [np.stack([resize_image(x, size) for x in images]) for images in (self.sources, self.targets)]
        grid = image_grid(columns + [np.asarray(preds)])
        path = self.dir / f"step_{step:08d}.png"
        write_png(path, grid.transpose(1, 2, 0))
        if self.logger:
            self.logger.images(f"samples/{self.src}_to_{self.tgt}", grid, step)
        return path
