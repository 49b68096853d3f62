"""Which slices a route is evaluated on: evenly spread over the slices showing anatomy, never the empty ones."""

from __future__ import annotations

import numpy as np
import pytest

from synermedgen_jax.data.routes import get_task
from synermedgen_jax.evaluation import evaluate

TASK = get_task("mni152-sim/brain/t1->t2")


class FakeReader:
    """Records in slice order whose t1/t2 show a disc of anatomy of the given pixel fraction (rest at -1)."""

    def __init__(self, fractions_t1, fractions_t2=None, size=32):
        self.fractions = {"t1": list(fractions_t1), "t2": list(fractions_t2 or fractions_t1)}
        self.size = size
        self.reads = 0

    def __len__(self):
        return len(self.fractions["t1"])

    def _image(self, fraction):
        yy, xx = np.mgrid[:self.size, :self.size]
        radius2 = fraction * self.size * self.size / np.pi
        disc = (yy - self.size / 2) ** 2 + (xx - self.size / 2) ** 2 < radius2
        return np.where(disc, 0.5, -1.0).astype(np.float32)

    def __getitem__(self, i):
        self.reads += 1
        return {"images": {m: self._image(f[i]) for m, f in self.fractions.items()}, "id": i}


@pytest.mark.parametrize("n,count", [(1, 4), (4, 4), (5, 4), (80, 4), (63, 16), (7, 3), (100, 1)])
def test_bin_centres_one_per_equal_bin(n, count):
    picks = evaluate.bin_centres(n, count)
    bins = min(n, count)
    assert len(picks) == bins and len(set(picks.tolist())) == bins
    assert np.all(np.diff(picks) > 0) and picks[0] >= 0 and picks[-1] < n
    # Brute force: record p covers [p, p + 1) of the slab [0, n); pick j is the record holding the centre of
    # the j-th of ``bins`` equal bins.
    for j, p in enumerate(picks):
        centre = (j + 0.5) * n / bins
        assert p == next(i for i in range(n) if i <= centre < i + 1)


def test_pick_slices_spreads_over_anatomy_and_skips_empty_slices():
    # An 80-slice volume: no anatomy in the first 8 and the last 10 slices, a bell of content in between.
    positions = np.arange(80)
    fractions = np.where((positions >= 8) & (positions < 70), 0.06 + 0.25 * np.sin(np.pi * (positions - 8) / 62),
                         0.0)
    reader = FakeReader(fractions)
    records = list(range(100, 180))  # route record numbers (not 0-based: picks map back through this list)
    remap = {r: r - 100 for r in records}

    class Offset:
        def __getitem__(self, r):
            return reader[remap[r]]

    picked, data = evaluate.pick_slices(Offset(), records, TASK, 4)
    assert len(picked) == 4 and picked == sorted(picked) and [d["id"] + 100 for d in data] == picked
    usable = [r for r in records if fractions[r - 100] >= 0.05]
    assert set(picked) <= set(usable)
    # One pick per quarter of the slices with anatomy, at the quarter's centre (not the near-empty edges).
    quarters = np.array_split(np.asarray(usable), 4)
    for pick, quarter in zip(picked, quarters):
        assert quarter[0] <= pick <= quarter[-1] and abs(pick - np.median(quarter)) <= 1
    assert min(fractions[p - 100] for p in picked) > 2 * 0.06  # the edge slices of the anatomy hold 0.06


def test_pick_slices_needs_anatomy_in_both_modalities_and_shares_reads():
    t1 = [0.3] * 10
    t2 = [0.0] * 5 + [0.3] * 5  # target empty in the first half
    reader = FakeReader(t1, t2)
    content = evaluate.ContentIndex(reader)
    picked, _ = evaluate.pick_slices(reader, list(range(10)), TASK, 2, content)
    assert picked == [6, 8]  # centres of two equal bins over records 5..9
    reads = reader.reads
    again, _ = evaluate.pick_slices(reader, list(range(10)), get_task("mni152-sim/brain/t2->t1"), 2, content)
    assert again == picked and reader.reads - reads == 2  # content known: only the picked records are read
    assert evaluate.pick_slices(FakeReader([0.0] * 6), list(range(6)), TASK, 3) == ([], [])
