"""In-training evaluation on the held-out split: per-task understanding accuracy, Stage II MSE, VAE PSNR.

Eval batches are fixed (read once, the same rows every time) and replicated on every process; the eval step
runs on the training mesh with the EMA weights when the run keeps an EMA. Understanding accuracy is greedy
exact match of the answer (objective.answer_exact_match): chance is 1/4 for the lettered CTS/TIA questions.

Stage II sample grids need the sampler, which sits above training/: the caller of ``loop.train`` passes their
renderer (inference/sample_grids.py's ``SampleGrids``, given by commands/train.py).
"""

from __future__ import annotations

import jax
import numpy as np

from synermedgen_jax import sharding
from synermedgen_jax.data import und_pretrain
from synermedgen_jax.stages import Stage
from synermedgen_jax.training import inputs
from synermedgen_jax.training import step as step_lib
from synermedgen_jax.training.logging import image_grid

UND_TASKS = ("cts", "tia", "mi")


def eval_tasks(config) -> tuple[str, ...]:
    if config.stage == Stage.VAE:
        return ("images",)
    if config.stage == Stage.STAGE2_UCG:
        return ("pairs",)
    if config.stage == Stage.UND_PRETRAIN:
        return und_pretrain.TASKS
    return UND_TASKS + (("vqa",) if config.stage == Stage.BASELINE_VQA else ())


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
