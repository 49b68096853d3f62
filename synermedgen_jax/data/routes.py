"""Registry of the synthesis evaluation tasks: the paper's 22 routes and their ``mni152-sim`` analogues.

Paper routes (docs/architecture.md), grouped as the paper averages them:

* ``"brats"`` (12): every ordered pair among T1, T1CE, T2, FLAIR (``brats/brain/<src>-><tgt>``).
* ``"synthrad+autopet"`` (10): SynthRAD2023 MR->CT, CT->MR, CBCT->CT, CT->CBCT for brain and pelvis
  (``synthrad2023/<anatomy>/<src>-><tgt>``) and AutoPET PET->CT, CT->PET
  (``autopet/whole-body/<src>-><tgt>``).

The embedded ``mni152-sim`` source (brain only) provides analogues: the same 12 BraTS routes, MR<->CT with
T1 as the MR, CBCT<->CT and PET<->CT (18 routes). Each analogue records the paper task it stands for
(``analogue_of``) and carries that task's group, so group averages on simulated data line up with the
paper's; the simulated "synthrad+autopet" group has 6 routes, not 10, since it has no pelvis.

Task names are ``<dataset>/<anatomy>/<source>-><target>`` with the modality names of ``valid_modalities()``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping

__all__ = ["Task", "MODALITIES", "DATASETS", "GROUPS", "PAPER_GROUP_AVERAGES", "valid_modalities",
           "route_key", "all_tasks", "get_task", "tasks_for", "group_average"]

# Same names and order as synermedgen_jax.data.volumes.MODALITY_NAMES (a test keeps them in step); kept
# local so that importing the registry does not pull in the NIfTI stack.
MODALITIES: tuple[str, ...] = ("ct", "cbct", "mr", "t1", "t1ce", "t2", "flair", "pet")

# How a modality is named inside an instruction sentence.
_PHRASE = {
    "ct": "CT",
    "cbct": "CBCT",
    "mr": "MRI",
    "t1": "T1-weighted MRI",
    "t1ce": "contrast-enhanced T1-weighted MRI",
    "t2": "T2-weighted MRI",
    "flair": "FLAIR MRI",
    "pet": "PET",
}

DATASETS: tuple[str, ...] = ("brats", "synthrad2023", "autopet", "mni152-sim")
GROUPS: tuple[str, ...] = ("synthrad+autopet", "brats")

# SynerMedGen's SSIM x 100 averaged over each group, as reported by the paper.
PAPER_GROUP_AVERAGES: dict[str, float] = {"synthrad+autopet": 83.28, "brats": 89.03}

# SynerMedGen's per-route SSIM x 100 where the paper quotes it (the other routes are left None).
_PAPER_SSIM: dict[str, float] = {
    "synthrad2023/brain/cbct->ct": 87.15,
    "synthrad2023/pelvis/cbct->ct": 87.14,
    "synthrad2023/brain/mr->ct": 88.87,
    "autopet/whole-body/ct->pet": 91.10,
    "brats/brain/t2->t1": 90.58,
    "brats/brain/t1->t2": 87.14,
}


@dataclasses.dataclass(frozen=True)
class Task:
    """One synthesis route on one dataset."""

    name: str  # "<dataset>/<anatomy>/<source>-><target>"
    dataset: str
    anatomy: str
    source: str  # modality name, see valid_modalities()
    target: str
    group: str  # "synthrad+autopet" or "brats": the paper group this route (or its analogue) averages in
    instruction: str  # the Stage II generation instruction for this route
    paper_ssim: float | None = None  # SynerMedGen's SSIM x 100 in the paper, when known
    analogue_of: str | None = None  # for mni152-sim: the paper task this route stands in for

    @property
    def route(self) -> str:
        return route_key(self.source, self.target)


def valid_modalities() -> tuple[str, ...]:
    """Modality names accepted by the registry, the data builder and the CLI."""
    return MODALITIES


def _check_modality(m: str, what: str) -> None:
    if m not in MODALITIES:
        raise ValueError(f"unknown {what} modality {m!r}; valid modalities: {', '.join(MODALITIES)}")


def route_key(src: str, tgt: str) -> str:
    """``"src->tgt"``, e.g. ``route_key("cbct", "ct") == "cbct->ct"``; both must be valid and differ."""
    _check_modality(src, "source")
    _check_modality(tgt, "target")
    if src == tgt:
        raise ValueError(f"a route needs two different modalities; got {src!r} -> {tgt!r}")
    return f"{src}->{tgt}"


def instruction(src: str, tgt: str, anatomy: str) -> str:
    """The route's instruction, e.g. "Synthesize the CT slice corresponding to this brain CBCT slice."."""
    region = "" if anatomy == "whole-body" else f"{anatomy} "
    return f"Synthesize the {_PHRASE[tgt]} slice corresponding to this {region}{_PHRASE[src]} slice."


def _task(dataset: str, anatomy: str, src: str, tgt: str, group: str, analogue_of: str | None = None) -> Task:
    name = f"{dataset}/{anatomy}/{route_key(src, tgt)}"
    return Task(name=name, dataset=dataset, anatomy=anatomy, source=src, target=tgt, group=group,
                instruction=instruction(src, tgt, anatomy), paper_ssim=_PAPER_SSIM.get(name),
                analogue_of=analogue_of)


_BRATS = ("t1", "t1ce", "t2", "flair")
_SYNTHRAD_ROUTES = (("mr", "ct"), ("ct", "mr"), ("cbct", "ct"), ("ct", "cbct"))


def _build() -> dict[str, Task]:
    tasks: list[Task] = []
    for src, tgt in itertools.permutations(_BRATS, 2):
        tasks.append(_task("brats", "brain", src, tgt, "brats"))
    for anatomy in ("brain", "pelvis"):
        for src, tgt in _SYNTHRAD_ROUTES:
            tasks.append(_task("synthrad2023", anatomy, src, tgt, "synthrad+autopet"))
    for src, tgt in (("pet", "ct"), ("ct", "pet")):
        tasks.append(_task("autopet", "whole-body", src, tgt, "synthrad+autopet"))
    # Simulated brain analogues; MR is simulated as T1.
    for src, tgt in itertools.permutations(_BRATS, 2):
        tasks.append(_task("mni152-sim", "brain", src, tgt, "brats", f"brats/brain/{src}->{tgt}"))
    for src, tgt in (("t1", "ct"), ("ct", "t1")):
        paper = f"synthrad2023/brain/{'mr' if src == 't1' else src}->{'mr' if tgt == 't1' else tgt}"
        tasks.append(_task("mni152-sim", "brain", src, tgt, "synthrad+autopet", paper))
    for src, tgt in (("cbct", "ct"), ("ct", "cbct")):
        tasks.append(_task("mni152-sim", "brain", src, tgt, "synthrad+autopet",
                           f"synthrad2023/brain/{src}->{tgt}"))
    for src, tgt in (("pet", "ct"), ("ct", "pet")):
        tasks.append(_task("mni152-sim", "brain", src, tgt, "synthrad+autopet",
                           f"autopet/whole-body/{src}->{tgt}"))
    registry = {t.name: t for t in tasks}
    assert len(registry) == len(tasks), "duplicate task names"
    return registry


_REGISTRY: dict[str, Task] = _build()


def all_tasks(*, paper_only: bool = False) -> tuple[Task, ...]:
    """Every registered task (paper routes first, then the mni152-sim analogues); 22 with ``paper_only``."""
    return tuple(t for t in _REGISTRY.values() if not (paper_only and t.dataset == "mni152-sim"))


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name raises ValueError listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(_REGISTRY)}") from None


def tasks_for(dataset: str) -> tuple[Task, ...]:
    """The tasks of one dataset (``brats``, ``synthrad2023``, ``autopet`` or ``mni152-sim``)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    return tuple(t for t in _REGISTRY.values() if t.dataset == dataset)


def group_average(results: Mapping[str, float]) -> dict[str, float]:
    """Average a metric per paper group, as the paper's table does.

    Args:
      results: task name -> metric value (e.g. SSIM x 100) for the tasks that were evaluated. Non-finite
        values (a route that produced NaN) are a ValueError rather than silently poisoning the mean.

    Returns:
      group -> mean over that group's tasks present in ``results``; groups with no task are left out.
      Tasks of different datasets in one group (e.g. real and simulated) are averaged together, so pass
      one dataset family at a time.
    """
    sums: dict[str, list[float]] = {}
    for name, value in results.items():
        task = get_task(name)
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"results[{name!r}] is not finite: {value!r}")
        sums.setdefault(task.group, []).append(v)
    return {g: sum(vs) / len(vs) for g in GROUPS if (vs := sums.get(g))}
