"""Stage II, UCG: flow matching on the paired data; the generation expert, vae2llm, llm2vae and the time
embedder are trained. The understanding side is frozen with BAGEL's freeze_und detaches
(``train.finetune_und=False``, default) or fine-tuned (``True``). Starts from a Stage I checkpoint
(``init_from``); ``init_moe`` fills the generation-expert weights the checkpoint lacks from its understanding
expert (a generation expert it holds, BAGEL's or an import's, is kept).

    python -m synermedgen_jax train --config configs/stage2_ucg.py:tiny --workdir runs/s2 \
        --config.data.dir=DIR --config.init_from=runs/s1
"""

from configs.train_common import base_config, parse_variant


def get_config(variant=None):
    variant, options = parse_variant(variant)
    config = base_config("stage2_ucg", variant, data_stage="stage2", pack="stage2", **options)
    config.init_moe = True
    if variant != "bagel_7b_mot":
        # BAGEL samples the FLUX posterior, whose spread is negligible. A briefly trained stage-0 VAE is far
        # from that (posterior std ≈ 0.45 against a latent-mean std ≈ 1.7 after 130 steps), so sampling would
        # put unpredictable noise into the flow-matching target and the source condition, while inference
        # conditions on the posterior mean (SamplerConfig.sample_posterior=False): train on the mean too.
        config.model.vae.sample_posterior = False
    return config
