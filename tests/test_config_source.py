"""``config.data.source`` as a variant option: ``configs/stage1_gau.py:tiny,source=synermed``. The old spelling
``synermed_tiny`` still loads the same config, with one deprecation line on stderr."""

from __future__ import annotations

import pytest

from synermedgen_jax.config import ConfigError, load_config


@pytest.mark.parametrize("old, new", [
    ("configs/stage1_gau.py:synermed_tiny", "configs/stage1_gau.py:tiny,source=synermed"),
    ("configs/stage2_ucg.py:synermed_bagel_7b_mot", "configs/stage2_ucg.py:bagel_7b_mot,source=synermed"),
    ("configs/ablations.py:no_mi_synermed_small", "configs/ablations.py:no_mi_small,source=synermed"),
])
def test_old_spelling_loads_the_same_config_with_one_deprecation_line(old, new, capsys):
    config = load_config(new)
    assert capsys.readouterr().err == ""
    assert config.data.source == "synermed" and config.data.dir == "data/synermed" and not config.data.augment
    assert config.train.eval_every == 0 and config.train.image_every == 0
    assert load_config(old).to_json_best_effort() == config.to_json_best_effort()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "deprecated" in lines[0] and new.partition(":")[2] in lines[0], lines


def test_source_option_is_checked():
    assert load_config("configs/stage1_gau.py:tiny,source=records").data.source == "records"
    assert load_config("configs/stage1_gau.py:tiny").data.source == "auto"
    with pytest.raises(ConfigError, match="source='nifti'"):
        load_config("configs/stage1_gau.py:tiny,source=nifti")
    with pytest.raises(ConfigError, match="keys"):
        load_config("configs/stage1_gau.py:tiny,sauce=synermed")
