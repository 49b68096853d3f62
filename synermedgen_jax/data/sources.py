"""Registry of dataset layouts. Adding a dataset is one ``Source`` subclass plus ``register_source``.

A source discovers cases under a root folder (``CaseSpec``: files per modality, patient id, anatomy), says
which ordered synthesis routes its cases support, and loads a case into aligned ``Volume``s. Problems
found while discovering (a missing or unknown modality file) are carried on the case as ``problem`` so the
builder records them in ``skipped.jsonl`` and goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable
from pathlib import Path

from synermedgen_jax.data.phantom import PhantomConfig, simulate_subject
from synermedgen_jax.data.volumes import DataError, Volume, load_volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclasses.dataclass
class CaseSpec:
    dataset: str
    anatomy: str
    case_id: str
    patient_id: str  # the split unit: no patient in two splits
    files: dict[str, Path] = dataclasses.field(default_factory=dict)  # modality -> NIfTI path
    mask: Path | None = None
    group: str = ""  # e.g. SynthRAD's Task1/Task2
    problem: str | None = None  # set at discovery when the case cannot be used
    index: int = 0  # phantom subject number

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.group + '/' if self.group else ''}{self.anatomy}/{self.case_id}"

    @property
    def first_file(self) -> str:
        return str(next(iter(self.files.values()), "")) if self.files else ""


@dataclasses.dataclass
class LoadedCase:
    volumes: dict[str, Volume]  # modality -> volume, all on one grid after checks
    mask: Volume | None = None  # the dataset's body mask, when it ships one


class Source:
    """Base class: a named dataset layout."""

    name: str = ""
    description: str = ""

    def discover(self, root: Path, options: dict) -> list[CaseSpec]:
        raise NotImplementedError

    def routes(self, modalities: Iterable[str]) -> list[tuple[str, str]]:
        """Ordered (source, target) routes for a case with these modalities: every ordered pair."""
        mods = list(modalities)
        return [(a, b) for a, b in itertools.permutations(mods, 2)]

    def load(self, case: CaseSpec, options: dict) -> LoadedCase:
        volumes = {m: load_volume(p) for m, p in case.files.items()}
        mask = load_volume(case.mask) if case.mask is not None else None
        return LoadedCase(volumes, mask)


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    if not source.name:
        raise ValueError("a source needs a name")
    SOURCES[source.name] = source
    return source


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def _nifti_stem(path: Path) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    return None


def _folder_case(dataset: str, anatomy: str, folder: Path, names: dict[str, str], *, patient_id: str,
                 group: str = "", mask_stem: str | None = None, ignore: Iterable[str] = (),
                 case_id: str | None = None) -> CaseSpec:
    """A case whose modalities are files ``<stem>.nii[.gz]`` in one folder; ``names`` maps stem -> modality."""
    case = CaseSpec(dataset, anatomy, case_id or folder.name, patient_id, group=group)
    known = set(names) | set(ignore) | ({mask_stem} if mask_stem else set())
    for path in sorted(folder.iterdir()):
        stem = _nifti_stem(path)
        if stem is not None and stem not in known:
            case.problem = f"unknown modality file {path.name} (expected {', '.join(sorted(names))})"
            case.files = {m: folder / f"{s}.nii.gz" for s, m in names.items()}
            return case
    for stem, modality in names.items():
        found = _find(folder, stem)
        if found is None:
            case.problem = f"missing modality {modality}: no {stem}.nii.gz in {folder}"
        else:
            case.files[modality] = found
    if mask_stem:
        case.mask = _find(folder, mask_stem)
    return case


class SynthRAD2023(Source):
    name = "synthrad2023"
    description = "SynthRAD2023: Task1/{brain,pelvis}/<case>/{mr,ct,mask}.nii.gz, Task2/.../{cbct,ct,mask}"
    TASKS = {"Task1": {"mr": "mr", "ct": "ct"}, "Task2": {"cbct": "cbct", "ct": "ct"}}

    def discover(self, root: Path, options: dict) -> list[CaseSpec]:
        cases = []
        tasks = [t for t in self.TASKS if (root / t).is_dir()]
        if not tasks:
            raise DataError(f"{root}: no Task1/ or Task2/ folder (SynthRAD2023 layout expected)")
        for task in tasks:
            for anatomy_dir in sorted(p for p in (root / task).iterdir() if p.is_dir()):
                for case_dir in sorted(p for p in anatomy_dir.iterdir() if p.is_dir()):
                    # SynthRAD case ids (1BA001, 2PA042) are unique per patient and task.
                    cases.append(_folder_case(self.name, anatomy_dir.name.lower(), case_dir, self.TASKS[task],
                                              patient_id=case_dir.name, group=task.lower(), mask_stem="mask"))
        return cases


class BraTS(Source):
    name = "brats"
    description = ("BraTS 2021 <case>/<case>_{t1,t1ce,t2,flair}.nii.gz or 2023 "
                   "<case>/<case>-{t1n,t1c,t2w,t2f}.nii.gz")
    LAYOUTS = (("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}),
               ("-", {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}))
    # BraTS 2023 ids are BraTS-<cohort>-<patient>-<timepoint>; timepoints of one patient share a split.
    PATIENT_2023 = re.compile(r"^(BraTS-[A-Za-z]+-\d+)-\d+$")

    def _case_dirs(self, root: Path) -> list[Path]:
        found = []
        for depth_dirs in ([root], sorted(p for p in root.iterdir() if p.is_dir())):
            for parent in depth_dirs:
                for d in sorted(p for p in parent.iterdir() if p.is_dir()):
                    if any(_nifti_stem(f) and _nifti_stem(f).startswith(d.name) for f in d.iterdir()):
                        found.append(d)
            if found:
                return found
        return found

    def discover(self, root: Path, options: dict) -> list[CaseSpec]:
        cases = []
        for folder in self._case_dirs(root):
            stems = [_nifti_stem(f) for f in folder.iterdir() if _nifti_stem(f)]
            sep = "-" if any(x.startswith(folder.name + "-") for x in stems) else "_"
            names = dict(self.LAYOUTS)[sep]
            prefixed = {f"{folder.name}{sep}{k}": v for k, v in names.items()}
            match = self.PATIENT_2023.match(folder.name)
            cases.append(_folder_case(self.name, "brain", folder, prefixed,
                                      patient_id=match.group(1) if match else folder.name,
                                      ignore=[f"{folder.name}{sep}seg"]))
        if not cases:
            raise DataError(f"{root}: no BraTS case folders (<case>/<case>_t1.nii.gz or <case>-t1n.nii.gz)")
        return cases


class AutoPET(Source):
    name = "autopet"
    description = "autoPET FDG PET/CT: <patient>/<study>/{CTres,SUV}.nii.gz"
    NAMES = {"CTres": "ct", "SUV": "pet"}
    IGNORE = ("CT", "PET", "SEG")  # the release also ships these; not used for paired slices

    def discover(self, root: Path, options: dict) -> list[CaseSpec]:
        cases = []
        for patient in sorted(p for p in root.iterdir() if p.is_dir()):
            for study in sorted(p for p in patient.iterdir() if p.is_dir()):
                cases.append(_folder_case(self.name, "whole-body", study, self.NAMES, patient_id=patient.name,
                                          ignore=self.IGNORE, case_id=f"{patient.name}/{study.name}"))
        if not cases:
            raise DataError(f"{root}: no autoPET studies (<patient>/<study>/CTres.nii.gz)")
        return cases


class MNI152Sim(Source):
    name = "mni152-sim"
    description = "simulated subjects from nilearn's MNI152 2009 template (no files needed)"
    # Brain analogues of the paper's 22 routes: BraTS' 12, MR<->CT with T1 as the MR, CBCT<->CT, PET<->CT.
    ROUTES = ([(a, b) for a, b in itertools.permutations(("t1", "t1ce", "t2", "flair"), 2)]
              + [("t1", "ct"), ("ct", "t1"), ("cbct", "ct"), ("ct", "cbct"), ("pet", "ct"), ("ct", "pet")])

    def discover(self, root: Path, options: dict) -> list[CaseSpec]:
        n = int(options.get("subjects", 8))
        if n <= 0:
            raise DataError(f"--subjects must be positive, got {n}")
        return [CaseSpec(self.name, "brain", f"sim-{i:04d}", f"sim-{i:04d}", index=i) for i in range(n)]

    def routes(self, modalities: Iterable[str]) -> list[tuple[str, str]]:
        mods = set(modalities)
        return [r for r in self.ROUTES if r[0] in mods and r[1] in mods]

    def load(self, case: CaseSpec, options: dict) -> LoadedCase:
        config = PhantomConfig(voxel_mm=float(options.get("sim_voxel_mm", 2.0)),
                               lesion_probability=float(options.get("sim_lesion_probability", 0.8)))
        subject = simulate_subject(case.index, seed=int(options.get("seed", 0)), config=config)
        volumes = {m: Volume(d, subject.affine, f"mni152-sim:{case.case_id}:{m}")
                   for m, d in subject.images.items()}
        mask = Volume(subject.head_mask.astype("float32"), subject.affine, f"mni152-sim:{case.case_id}:mask")
        return LoadedCase(volumes, mask)


for _source in (SynthRAD2023(), BraTS(), AutoPET(), MNI152Sim()):
    register_source(_source)
