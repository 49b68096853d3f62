"""Understanding pre-training data (data/und_pretrain.py, ``data.stage = "und_pretrain"``) and the Stage I
curriculum (``data.curriculum``, training/inputs.CurriculumBatches): every lookup's answers name the option the
query names; every same-slice query image is closest to the candidate its letter names; a curriculum switches
task weights at its steps and resumes inside the right phase."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synermedgen_jax.__main__ import main as cli
from synermedgen_jax.config import ConfigError, from_json, load_config, set_fields, to_json
from synermedgen_jax.data import prompts, und_pretrain
from synermedgen_jax.data.geometry import PackImages
from synermedgen_jax.data.packing import PackBudget, Text, VitImage
from synermedgen_jax.data.pipeline import PipelineConfig, sample_dataset
from synermedgen_jax.data.records import RecordReader, load_index
from synermedgen_jax.data.tokenizer import load_tokenizer
from synermedgen_jax.data.understanding import SliceIndex
from synermedgen_jax.data.volumes import MODALITY_NAMES, display_name
from synermedgen_jax.training import inputs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("up_data")
    assert cli(["build-data", "--source", "mni152-sim", "--out", str(out), "--subjects", "2", "--sim-voxel-mm",
                "8", "--slice-size", "32", "--split", "1", "0", "0", "--instances-per-pair", "0.5",
                "--no-progress"]) == 0
    return out


def _samples(data, task: str, count: int, seed: int):
    config = load_config("configs/und_pretrain.py:tiny")
    budget = PackBudget.from_config(config.data.pack)
    pipe = PipelineConfig(stage="und_pretrain", task_weights=((task, 1.0),), seed=seed, process_index=0,
                          process_count=1)
    stream = iter(sample_dataset(data, budget, pipe))
    return [next(stream) for _ in range(count)]


@pytest.mark.parametrize("task", ["lookup", "lookup_6w", "lookup_1tok", "lookup_4tok"])
def test_lookup_answers_name_the_queried_option(data, task):
    """Full lookups and their easier levels: the answer letter labels the option the query names; a level's
    options are single corpus words of at most its number of tokens."""
    tokenizer = load_tokenizer(data / "tokenizer.json")
    seed = int(np.random.default_rng().integers(1 << 20))
    words, used = set(und_pretrain.corpus_words()), set()
    for items, tag in _samples(data, task, 40, seed):
        assert tag.startswith(f"{task}#")
        texts = [(tokenizer.decode(item.token_ids), item.loss) for item in items]
        options_text, *rest = texts
        options = dict(line.split(". ", 1) for line in options_text[0].splitlines()[1:])
        assert sorted(options) == list(prompts.LETTERS) and len(set(options.values())) == 4, (seed, options)
        if task in und_pretrain.LEVELS:
            level = und_pretrain.LEVELS[task]
            max_tokens = level.max_tokens
            assert set(options.values()) <= words, (seed, options)
            used |= set(options.values())
            assert all(len(tokenizer.encode(" " + name)) <= max_tokens for name in options.values()), (seed, options)
        queries, answers = rest[0::2], rest[1::2]
        count = und_pretrain.QUERIES
        assert [loss for _, loss in queries] == [False] * count and [loss for _, loss in answers] == [True] * count
        assert len({a for a, _ in answers}) == count  # distinct options asked for
        for (query, _), (answer, _) in zip(queries, answers):
            key = query[len("Which option names "):query.index("? ")]
            assert options[answer] == key, (seed, options, query, answer)
    if task in und_pretrain.LEVELS and und_pretrain.LEVELS[task].words:
        assert len(used) <= und_pretrain.LEVELS[task].words, (seed, sorted(used))


@pytest.mark.parametrize("task, count", [("same_slice", 4), ("same_slice_2", 2), ("same_image_6", 4)])
def test_same_slice_query_is_closest_to_the_answered_candidate(data, task, count):
    """The query image is the answered candidate's slice re-acquired (gamma, noise): it is nearer that candidate
    than the neighbouring slices are, so the letter is determined by the images. The prompt names as many
    candidates as it shows."""
    seed = int(np.random.default_rng().integers(1 << 20))
    tokenizer = load_tokenizer(data / "tokenizer.json")
    nearest = []
    for items, _ in _samples(data, task, 20, seed):
        images = [np.squeeze(item.pixels) for item in items if isinstance(item, VitImage)]
        letters = [tokenizer.decode(item.token_ids) for item in items if isinstance(item, Text) and item.loss]
        labels = [tokenizer.decode(item.token_ids) for item in items[1:2 * count:2]]
        assert labels == [f"{letter}:" for letter in prompts.LETTERS[:count]], labels
        assert tokenizer.decode(items[0].token_ids).startswith(und_pretrain.COUNT_WORDS[count] + " ")
        candidates, queries = images[:count], images[count:]
        assert len(queries) == len(letters) == und_pretrain.QUERIES and len(set(letters)) == len(letters)
        for query, letter in zip(queries, letters):
            distances = [float(np.mean((query - c) ** 2)) for c in candidates]
            assert letter in prompts.LETTERS[:count]
            nearest.append(prompts.LETTERS[int(np.argmin(distances))] == letter)
    # 99 % on the quickstart's 2 mm slices; these 8 mm slices differ more from their neighbours.
    assert np.mean(nearest) >= 0.9, (seed, np.mean(nearest))


@pytest.mark.parametrize("task, count, floor", [("same_shape_2", 2, 0.7), ("same_shape", 4, 0.6)])
def test_same_shape_query_matches_the_answered_candidate_by_outline(data, task, count, floor):
    """Under a synthetic contrast only the outline tells the slice: the query's foreground overlaps the answered
    candidate's best (85 % / 78 % of queries at 2 / 4 candidates on these 8 mm slices, the rest ties and
    near-empty slices), while its intensities do not match it."""
    seed = int(np.random.default_rng().integers(1 << 20))
    tokenizer = load_tokenizer(data / "tokenizer.json")
    nearest, intensity_nearest = [], []
    for items, _ in _samples(data, task, 100, seed):
        images = [np.squeeze(item.pixels) for item in items if isinstance(item, VitImage)]
        letter = next(tokenizer.decode(item.token_ids) for item in items if isinstance(item, Text) and item.loss)
        candidates, query = images[:count], images[count]
        assert len(images) == count + und_pretrain.QUERIES
        overlap = [np.sum((query > -0.9999) & (c > -0.9999)) / max(1, np.sum((query > -0.9999) | (c > -0.9999)))
                   for c in candidates]
        nearest.append(prompts.LETTERS[int(np.argmax(overlap))] == letter)
        intensity_nearest.append(prompts.LETTERS[int(np.argmin([np.mean((query - c) ** 2) for c in candidates]))]
                                 == letter)
    assert np.mean(nearest) >= floor, (seed, np.mean(nearest))
    assert np.mean(intensity_nearest) < np.mean(nearest), (seed, np.mean(intensity_nearest))


def test_recontrast_keeps_the_outline_and_changes_the_intensities():
    rng = np.random.default_rng()
    image = np.full((16, 16), -1.0, np.float32)
    image[4:12, 4:12] = np.linspace(-0.9, 1.0, 64).reshape(8, 8)
    first, second = und_pretrain.recontrast(image, rng), und_pretrain.recontrast(image, rng)
    for out in (first, second):
        assert np.array_equal(out > -1.0, image > -1.0) and out.min() >= -1.0 and out.max() <= 1.0
        assert out[image > -1.0].min() >= -0.8  # foreground never reaches the background's level
    assert not np.allclose(first, second) and not np.allclose(first, image)


def test_name_image_answer_is_the_named_modality(data):
    """Up to four modalities of one slice, labelled; the answer letter labels the image of the modality the query
    names, and the query names one of them."""
    tokenizer = load_tokenizer(data / "tokenizer.json")
    table = und_pretrain.slice_table(load_index(data, "train"), min_modalities=2)
    reader = RecordReader(data, "train")
    pack_images = PackImages.for_budget(PackBudget.from_config(load_config("configs/und_pretrain.py:tiny").data.pack))
    for items, tag in _samples(data, "name_image", 20, int(np.random.default_rng().integers(1 << 20))):
        rec = int(table["rec"][int(tag.split("#")[1])])
        images = [item.pixels for item in items if isinstance(item, VitImage)]
        count = len(images)
        texts = [tokenizer.decode(item.token_ids) for item in items if isinstance(item, Text)]
        assert count == min(4, len(reader[rec]["images"]))
        assert texts[0].startswith(und_pretrain.COUNT_WORDS[count] + " ")
        assert texts[1:1 + count] == [f"{letter}:" for letter in prompts.LETTERS[:count]]
        query, letter = texts[-2:]
        assert items[-1].loss and not any(getattr(item, "loss", False) for item in items[:-1])
        named = next(m for m in MODALITY_NAMES if f"the {display_name(m)} image?" in query)
        by_modality = {m: pack_images.vlm_vit(np.asarray(img, np.float32), images=count)
                       for m, img in reader[rec]["images"].items()}
        np.testing.assert_allclose(images[prompts.LETTERS.index(letter)], by_modality[named])
        # each image is one of the slice's modalities (an empty slice looks the same in several)
        assert all(any(np.allclose(pixels, image) for pixels in by_modality.values()) for image in images)
    index, rng = SliceIndex(load_index(data, "train")), np.random.default_rng()
    for row in rng.choice(len(table["rec"]), size=20, replace=False):
        rec, shown, answer = und_pretrain.name_image_plan(index, table, int(row), rng)
        assert shown[answer] == MODALITY_NAMES[int(table["mod"][row])] and rec == int(table["rec"][row])
        assert len(set(shown)) == len(shown) == min(4, len(index.modalities(rec)))


def test_image_lookup_answer_names_the_images_modality(data):
    """Four modality names as TIA's options name them, then the image: the answer letter labels its modality."""
    tokenizer = load_tokenizer(data / "tokenizer.json")
    table = und_pretrain.slice_table(load_index(data, "train"))
    for items, tag in _samples(data, "image_lookup", 20, int(np.random.default_rng().integers(1 << 20))):
        modality = MODALITY_NAMES[int(table["mod"][int(tag.split("#")[1])])]
        options_text, query, image, answer = items
        assert isinstance(image, VitImage) and answer.loss and not options_text.loss and not query.loss
        options = dict(line.split(". ", 1) for line in tokenizer.decode(options_text.token_ids).splitlines()[1:])
        assert sorted(options) == list(prompts.LETTERS) and len(set(options.values())) == 4
        assert options[tokenizer.decode(answer.token_ids)] == prompts.PHRASE[modality], (options, modality)


def test_caption_names_the_images_modality(data):
    tokenizer = load_tokenizer(data / "tokenizer.json")
    table = und_pretrain.slice_table(load_index(data, "train"))
    reader = RecordReader(data, "train")
    budget = PackBudget.from_config(load_config("configs/und_pretrain.py:tiny").data.pack)
    for items, tag in _samples(data, "caption", 10, int(np.random.default_rng().integers(1 << 20))):
        row = int(tag.split("#")[1])
        rec, modality = int(table["rec"][row]), MODALITY_NAMES[int(table["mod"][row])]
        question, image, answer = items
        assert not question.loss and answer.loss
        assert tokenizer.decode(answer.token_ids) == und_pretrain.caption(modality, reader[rec]["anatomy"])
        assert tokenizer.decode(answer.token_ids).startswith(display_name(modality) + ",")
        expected = PackImages.for_budget(budget).vlm_vit(np.asarray(reader[rec]["images"][modality], np.float32),
                                                         images=1)
        np.testing.assert_allclose(image.pixels, expected)


def test_same_slice_candidates_are_neighbours_of_one_volume(data):
    index = SliceIndex(load_index(data, "train"))
    table = und_pretrain.slice_table(index)
    assert len(table["rec"]) > 0
    rng = np.random.default_rng()
    reader = RecordReader(data, "train")
    for row in rng.choice(len(table["rec"]), size=10, replace=False):
        modality, candidates, order = und_pretrain.same_slice_plan(index, table, int(row), rng)
        assert len(set(order)) == len(order) == und_pretrain.QUERIES
        assert int(table["rec"][row]) in candidates and len(set(candidates)) == 4
        cases = {int(index.case[r]) for r in candidates}
        offsets = sorted(abs(int(index.slice_index[r]) - int(index.slice_index[table["rec"][row]])) for r in candidates)
        assert len(cases) == 1 and offsets[0] == 0 and 0 < offsets[1] and offsets[-1] <= und_pretrain.NEIGHBOUR_K
        assert all(modality in reader[r]["images"] for r in candidates)


def test_same_image_candidates_come_from_a_pool_of_distinct_images(data):
    table = und_pretrain.slice_table(load_index(data, "train"))
    rng = np.random.default_rng()
    for pool in (6, 24):
        seen = set()
        for _ in range(60):
            candidates, order = und_pretrain.same_image_plan(table, rng, pool, 4)
            assert len(set(candidates)) == 4 and len(order) == und_pretrain.QUERIES
            seen |= set(candidates)
        assert 4 < len(seen) <= pool, (pool, len(seen))
    with pytest.raises(ValueError, match="pool of 100000"):
        und_pretrain.same_image_plan(table, rng, 100_000, 4)


def test_reacquire_keeps_background_and_range():
    rng = np.random.default_rng()
    image = np.full((16, 16), -1.0, np.float32)
    image[4:12, 4:12] = rng.uniform(-0.5, 1.0, (8, 8))
    out = und_pretrain.reacquire(image, rng)
    assert np.array_equal(out[image == -1.0], image[image == -1.0]) and out.min() >= -1.0 and out.max() <= 1.0
    assert not np.allclose(out, image)


def test_und_pretrain_stage_rejects_stage1_tasks(data):
    budget = PackBudget.from_config(load_config("configs/und_pretrain.py:tiny").data.pack)
    pipe = PipelineConfig(stage="und_pretrain", task_weights=(("cts", 1.0),), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="und_pretrain stage mixes lookup, same_slice, caption"):
        sample_dataset(data, budget, pipe)


class _Phase:
    """A stand-in phase stream: batches ``{"phase": k, "i": n}``, state = n."""

    def __init__(self, phase: int):
        self.phase, self.n = phase, 0

    def __next__(self):
        self.n += 1
        return {"phase": self.phase, "i": self.n}

    def get_state(self) -> bytes:
        return json.dumps(self.n).encode()

    def set_state(self, state: bytes) -> None:
        self.n = json.loads(state)


def test_curriculum_switches_phase_at_its_steps_and_resumes_inside_it():
    made = []

    def make(k):
        made.append(k)
        return _Phase(k)

    batches = inputs.CurriculumBatches([0, 3, 5], make)
    seen = [next(batches)["phase"] for _ in range(7)]
    assert seen == [0, 0, 0, 1, 1, 2, 2]
    state = batches.get_state()
    resumed = inputs.CurriculumBatches([0, 3, 5], make)
    resumed.set_state(state)
    assert next(resumed) == next(batches) == {"phase": 2, "i": 3}
    with pytest.raises(ValueError, match="data.curriculum"):
        inputs.CurriculumBatches([0, 3], make).set_state(b'{"0": "{}"}')


def test_curriculum_phases_from_fractions_of_the_run():
    config = set_fields(load_config("configs/stage1_gau.py:tiny"), {"train.steps": 90})
    config.data.curriculum = ((0.0, (("mi", 1.0),)), (1 / 3, (("mi", 0.5), ("tia", 0.5))),
                              (2 / 3, (("cts", 1.0), ("mi", 1.0), ("tia", 1.0))))
    phases = inputs.curriculum_phases(config)
    assert [start for start, _ in phases] == [0, 30, 60] and phases[1][1] == (("mi", 0.5), ("tia", 0.5))
    for bad in (((0.5, (("mi", 1.0),)),), ((0.0, (("mi", 1.0),)), (1.5, (("mi", 1.0),))),
                ((0.0, (("mi", -1.0),)),), ((0.0, "mi"),)):
        with pytest.raises(ConfigError, match="data.curriculum"):
            set_fields(load_config("configs/stage1_gau.py:tiny"), {"data.curriculum": bad})


def test_curriculum_survives_the_config_json_round_trip():
    """A saved config.json holds lists where the config file had tuples: an empty curriculum (none) and a real one
    read back from JSON validate as they did before saving (eval/resume/init_from read configs this way)."""
    for curriculum in ((), ((0.0, (("mi", 1.0),)), (0.5, (("cts", 1.0), ("tia", 1.0))))):
        config = set_fields(load_config("configs/stage1_gau.py:tiny"), {"data.curriculum": curriculum})
        again = set_fields(from_json(to_json(config)), {"train.steps": 10})
        assert [(float(f), [tuple(w) for w in ws]) for f, ws in again.data.curriculum] == \
            [(f, list(ws)) for f, ws in curriculum]


def test_ladder_variant_climbs_the_lookup_levels_to_the_full_task(data):
    """``ladder_tiny``: a valid config whose phases each build a stream on real data, end on the full lookup and
    start each level after the one it keeps."""
    config = load_config("configs/und_pretrain.py:ladder_tiny")
    tiny = load_config("configs/und_pretrain.py:tiny")
    assert config.model.to_dict() == tiny.model.to_dict()
    phases = inputs.curriculum_phases(set_fields(config, {"train.steps": 800}))
    assert [start for start, _ in phases] == sorted({start for start, _ in phases}) and phases[0][0] == 0
    assert dict(phases[-1][1])["lookup"] == 1.0
    for (_, before), (_, after) in zip(phases, phases[1:]):
        new = [task for task, weight in after if weight == 1.0]
        assert len(new) == 1 and new[0] not in dict(before) and max(dict(before), key=dict(before).get) in dict(after)
    budget = PackBudget.from_config(config.data.pack)
    for _, weights in phases:
        pipe = PipelineConfig(stage="und_pretrain", task_weights=weights, process_index=0, process_count=1)
        next(iter(sample_dataset(data, budget, pipe)))
    with pytest.raises(ValueError, match="ladder_"):
        load_config("configs/und_pretrain.py:ladder_tiny,colour=red")
