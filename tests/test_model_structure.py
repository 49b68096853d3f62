"""Structure declared by the modules, not by name strings: the MoT expert twins (what ``init_moe`` copies) and
the optimizer's parameter groups (optim.GROUPS), checked on abstract models (nothing is allocated)."""

from __future__ import annotations

import pytest
from flax import nnx

from synermedgen_jax import axes, sharding
from synermedgen_jax.config import load_config
from synermedgen_jax.modeling.synermedgen import build_model, expert_twin_names
from synermedgen_jax.training import optim


@pytest.fixture(scope="module", params=["tiny", "small"])
def abstract_model(request):
    return nnx.eval_shape(lambda: build_model(load_config(f"configs/models.py:{request.param}"), 0))


def _flat(model):
    return {".".join(str(p) for p in path): (path, variable) for path, variable in nnx.to_flat_state(nnx.state(model))}


def test_expert_twins_are_every_generation_expert_variable_and_its_understanding_twin(abstract_model):
    flat = _flat(abstract_model)
    twins = expert_twin_names(abstract_model)
    # BAGEL's checkpoint names: the generation twin of ``x`` is ``x`` with ``_moe_gen`` on its module.
    assert twins == {name: name.replace("_moe_gen", "") for name in flat if "_moe_gen" in name}
    for gen, und in twins.items():
        assert flat[gen][1].get_value().shape == flat[und][1].get_value().shape, gen


def test_parameter_groups_partition_the_trained_parameters(abstract_model):
    params = {name: entry for name, entry in _flat(abstract_model).items() if isinstance(entry[1], nnx.Param)}
    groups = {group: nnx.filterlib.to_predicate(f) for group, f in optim.GROUPS.items()}
    twins = expert_twin_names(abstract_model)
    for name, (path, variable) in params.items():
        member = [group for group, pred in groups.items() if pred(path, variable)]
        assert len(member) == 1, (name, member)
        top = str(path[0])
        expected = ("vae" if top == "vae" else "gen" if name in twins or top in ("vae2llm", "llm2vae", "time_embedder")
                    else "und")
        assert member == [expected], name
    vision = nnx.filterlib.to_predicate(optim.VISION_TOWER)
    assert {n for n, (p, v) in params.items() if vision(p, v)} == {n for n in params if n.startswith("vit_model.")}


def test_logical_axes_are_the_named_constants_and_each_has_one_rule(abstract_model):
    """Every logical axis a variable carries is one of synermedgen_jax/axes.py's names, and the rules table maps
    exactly those names (mesh axis names are not logical ones)."""
    logical = {value for name, value in vars(axes).items()
               if name.isupper() and isinstance(value, str) and value not in sharding.MESH_AXES}
    assert set(sharding.LOGICAL_RULES) == logical
    used = {axis for _, variable in _flat(abstract_model).values()
            for axis in variable.get_metadata().get("logical_axes") or () if axis is not None}
    assert used <= logical and {axes.EMBED, axes.HEADS, axes.MLP, axes.VOCAB, axes.VIT_EMBED} <= used
