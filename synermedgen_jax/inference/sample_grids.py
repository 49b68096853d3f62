"""Stage II sample grids during training, rendered with the sampler: the renderer ``loop.train`` takes.

Every ``train.image_every`` steps a few fixed held-out slices of one route are synthesized with
inference/sampler.py's ``Sampler`` from the current (EMA) weights and written as a source / target /
prediction PNG (``images/step_<s>.png``, atomic) and a tensorboard image. training/ does not import the
sampler: commands/train.py passes :class:`SampleGrids` to ``loop.train(..., sample_grids=SampleGrids)``, which
builds it as ``SampleGrids(config, codec, workdir, logger)`` and calls it as ``grids(state, step, mesh)``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from synermedgen_jax import sharding
from synermedgen_jax.training.logging import image_grid


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
