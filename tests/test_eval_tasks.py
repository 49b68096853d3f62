"""The route registry (data/routes.py: 22 paper routes + mni152-sim analogues) and understanding-answer scoring."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synermedgen_jax.data import routes
from synermedgen_jax.evaluation import answers

BRATS = ("t1", "t1ce", "t2", "flair")


# ------------------------------------------------------------------------------------------ registry


def test_paper_routes_are_the_22_of_the_paper():
    paper = routes.all_tasks(paper_only=True)
    assert len(paper) == 22 and len({t.name for t in paper}) == 22
    by_ds = {ds: {(t.anatomy, t.source, t.target) for t in paper if t.dataset == ds}
             for ds in ("brats", "synthrad2023", "autopet")}
    assert by_ds["brats"] == {("brain", a, b) for a, b in itertools.permutations(BRATS, 2)}
    assert by_ds["synthrad2023"] == {(an, s, t) for an in ("brain", "pelvis")
                                     for s, t in (("mr", "ct"), ("ct", "mr"), ("cbct", "ct"), ("ct", "cbct"))}
    assert by_ds["autopet"] == {("whole-body", "pet", "ct"), ("whole-body", "ct", "pet")}
    groups = {g: [t for t in paper if t.group == g] for g in routes.GROUPS}
    assert len(groups["brats"]) == 12 and len(groups["synthrad+autopet"]) == 10
    assert all(t.dataset == "brats" for t in groups["brats"])


def test_task_fields_and_names():
    for t in routes.all_tasks():
        assert t.name == f"{t.dataset}/{t.anatomy}/{t.source}->{t.target}"
        assert t.route == routes.route_key(t.source, t.target)
        assert t.source in routes.valid_modalities() and t.target in routes.valid_modalities()
        assert t.group in routes.GROUPS
        assert routes.get_task(t.name) is t
        assert t.instruction.startswith("Synthesize the ") and t.instruction.endswith(" slice.")
    assert (routes.get_task("synthrad2023/brain/cbct->ct").instruction
            == "Synthesize the CT slice corresponding to this brain CBCT slice.")
    assert "pelvis" in routes.get_task("synthrad2023/pelvis/mr->ct").instruction
    assert "FLAIR" in routes.get_task("brats/brain/t1->flair").instruction


def test_paper_numbers():
    reported = {t.name: t.paper_ssim for t in routes.all_tasks() if t.paper_ssim is not None}
    assert reported == {
        "synthrad2023/brain/cbct->ct": 87.15, "synthrad2023/pelvis/cbct->ct": 87.14,
        "synthrad2023/brain/mr->ct": 88.87, "autopet/whole-body/ct->pet": 91.10,
        "brats/brain/t2->t1": 90.58, "brats/brain/t1->t2": 87.14,
    }
    assert routes.PAPER_GROUP_AVERAGES == {"synthrad+autopet": 83.28, "brats": 89.03}


def test_mni152_sim_analogues_match_the_data_source():
    from synermedgen_jax.data.sources import MNI152Sim

    sim = routes.tasks_for("mni152-sim")
    assert len(sim) == 18
    assert {(t.source, t.target) for t in sim} == set(MNI152Sim.ROUTES)
    for t in sim:
        paper = routes.get_task(t.analogue_of)
        assert paper.dataset != "mni152-sim" and paper.group == t.group
        assert t.anatomy == "brain" and t.paper_ssim is None


def test_modality_names_match_the_data_package():
    from synermedgen_jax.data.volumes import MODALITY_NAMES

    assert routes.valid_modalities() == tuple(MODALITY_NAMES)
    assert routes.valid_modalities() == ("ct", "cbct", "mr", "t1", "t1ce", "t2", "flair", "pet")


def test_lookup_errors_list_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown task 'brats/brain/t1->ct'.*brats/brain/t1->t1ce"):
        routes.get_task("brats/brain/t1->ct")
    with pytest.raises(ValueError, match=r"unknown dataset 'synthrad'.*synthrad2023"):
        routes.tasks_for("synthrad")
    with pytest.raises(ValueError, match=r"unknown source modality 'mri'.*flair"):
        routes.route_key("mri", "ct")
    with pytest.raises(ValueError, match=r"unknown target modality 'T1'"):
        routes.route_key("ct", "T1")
    with pytest.raises(ValueError, match="two different modalities"):
        routes.route_key("ct", "ct")
    assert routes.route_key("cbct", "ct") == "cbct->ct"
    assert [t.dataset for t in routes.tasks_for("autopet")] == ["autopet", "autopet"]


def test_group_average_against_manual_means():
    rng = random.Random()
    paper = routes.all_tasks(paper_only=True)
    present = rng.sample(paper, 15)
    results = {t.name: rng.uniform(50, 95) for t in present}
    got = routes.group_average(results)
    for g in routes.GROUPS:
        vals = [v for n, v in results.items() if routes.get_task(n).group == g]
        if vals:
            assert math.isclose(got[g], sum(vals) / len(vals), rel_tol=1e-12)
        else:
            assert g not in got
    only_brats = {t.name: 80.0 for t in paper if t.group == "brats"}
    assert routes.group_average(only_brats) == {"brats": 80.0}
    with pytest.raises(ValueError, match="not finite"):
        routes.group_average({"brats/brain/t1->t2": float("nan")})
    with pytest.raises(ValueError, match="unknown task"):
        routes.group_average({"brats/t1->t2": 1.0})


# ------------------------------------------------------------------------------------------ answers


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("b", "B"), ("B.", "B"), ("(B)", "B"), ("( c )", "C"), ("D)", "D"), ("Answer: B", "B"),
    ("answer:a", "A"), ("  The answer is (D).  ", "D"), ("Answer is c", "C"), ("A\n", "A"),
])
def test_parse_choice_accepts_letter_forms(text, letter):
    assert answers.parse_choice(text) == letter


@pytest.mark.parametrize("text", ["", "E", "AB", "B or C", "Answer: E", "B. FLAIR to CT", "I think B",
                                  "((B))", "Answer:", "1", None])
def test_parse_choice_rejects_everything_else(text):
    assert answers.parse_choice(text) is None


DISPLAY = {"ct": ["CT", "ct"], "cbct": ["CBCT", "cone-beam CT"], "mr": ["MRI", "mr"],
           "t1": ["T1 (MRI)", "T1", "t1 mri"], "t1ce": ["T1CE (MRI)", "t1ce", "T1-CE"],
           "t2": ["T2 (MRI)", "T2"], "flair": ["FLAIR (MRI)", "Flair"], "pet": ["PET", "pet"]}


@settings(max_examples=60, deadline=None)
@given(mods=st.permutations(list(DISPLAY)).map(lambda p: p[:4]), data=st.data())
def test_parse_modality_map_round_trip(mods, data):
    seps = data.draw(st.lists(st.sampled_from([", ", ";", "\n", " ;\n", ",  "]), min_size=3, max_size=3))
    parts = []
    for letter, m in zip("ABCD", mods):
        name = data.draw(st.sampled_from(DISPLAY[m]))
        lt = data.draw(st.sampled_from([letter, letter.lower()]))
        colon = data.draw(st.sampled_from([":", " : ", ": ", ":  "]))
        parts.append(f"{lt}{colon}{name}")
    text = parts[0] + "".join(s + p for s, p in zip(seps, parts[1:]))
    assert answers.parse_modality_map(text) == dict(zip("ABCD", mods))


@pytest.mark.parametrize("text", [
    "A: FLAIR (MRI), B: CBCT, C: CT",  # a panel missing
    "A: FLAIR (MRI), B: CBCT, C: CT, D: T1 (MRI), E: PET",  # a fifth panel
    "A: FLAIR (MRI), A: CBCT, C: CT, D: T1 (MRI)",  # duplicate panel
    "A: FLAIR (MRI), B: X-ray, C: CT, D: T1 (MRI)",  # unknown modality
    "FLAIR, CBCT, CT, T1",  # no panel letters
    "A FLAIR B CBCT C CT D T1",  # no separators
    "",
])
def test_parse_modality_map_rejects_malformed(text):
    assert answers.parse_modality_map(text) is None


def test_accuracy_counts_correct_wrong_and_unparseable():
    rng = random.Random()
    n = 50
    truth = [rng.choice("ABCD") for _ in range(n)]
    preds, correct, bad = [], 0, 0
    for t in truth:
        kind = rng.random()
        if kind < 0.5:
            preds.append(rng.choice([t, f"({t.lower()})", f"Answer: {t}"]))
            correct += 1
        elif kind < 0.8:
            preds.append(rng.choice([c for c in "ABCD" if c != t]))
        else:
            preds.append(rng.choice(["maybe", "E", "B and C"]))
            bad += 1
    for task in ("cts", "TIA"):
        out = answers.accuracy(task, preds, truth)
        assert out == {"accuracy": correct / n, "n": n, "unparseable": bad}


def test_accuracy_mi_exact_and_panel():
    truth = ["A: FLAIR (MRI), B: CBCT, C: CT, D: T1 (MRI)", {"A": "ct", "B": "pet", "C": "mr", "D": "t2"}]
    preds = ["a: flair; b: cbct; c: ct; d: t1", "A: CT, B: PET, C: MRI, D: T1"]
    out = answers.accuracy("mi", preds, truth)
    assert out == {"accuracy": 0.5, "n": 2, "unparseable": 0, "panel_accuracy": 7 / 8}
    out = answers.accuracy("mi", ["nonsense", preds[1]], truth)
    assert out == {"accuracy": 0.0, "n": 2, "unparseable": 1, "panel_accuracy": 3 / 8}
    assert math.isnan(answers.accuracy("mi", [], [])["accuracy"])


def test_accuracy_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown understanding task 'vqa'.*cts, mi, tia"):
        answers.accuracy("vqa", ["A"], ["A"])
    with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
        answers.accuracy("cts", ["A", "B"], ["A"])
    with pytest.raises(ValueError, match=r"answers\[1\] is not a valid CTS answer"):
        answers.accuracy("cts", ["A", "B"], ["A", "Z"])
    with pytest.raises(ValueError, match=r"answers\[0\] is not a valid MI answer"):
        answers.accuracy("mi", ["A: CT"], [{"A": "ct"}])
    with pytest.raises(ValueError, match="not a single string"):
        answers.accuracy("tia", "ABC", "ABC")
