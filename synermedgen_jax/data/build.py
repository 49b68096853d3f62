"""The builder: a source's cases -> normalised paired-slice records in ArrayRecord shards, the per-split slice
index, understanding instances and Stage II pairs, the tokenizer, ``manifest.json`` and ``skipped.jsonl``.

Memory stays bounded: one case's volumes at a time; only per-record metadata (a few numbers) accumulates.
A case that fails any check is skipped with its reason; the build fails only when no valid record remains.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from synermedgen_jax import __version__, staging
from synermedgen_jax.data import understanding
from synermedgen_jax.data.contact_sheet import write_contact_sheet
from synermedgen_jax.data.records import (
    SCHEMA_VERSION,
    SPLITS,
    ShardWriter,
    encode_record,
    write_json,
    write_text,
)
from synermedgen_jax.data.sources import CaseSpec, Source, get_source
from synermedgen_jax.data.tokenizer import build_default_tokenizer, load_tokenizer
from synermedgen_jax.data.volumes import (
    DataError,
    NormConfig,
    case_foreground,
    check_aligned,
    modality_spec,
    norm_params,
    normalise,
    slice_geometry,
    to_axial_slices,
)


@dataclasses.dataclass
class BuildConfig:
    source: str
    out: str
    root: str | None = None
    slice_size: int = 256
    dtype: str = "float16"  # image storage: float16 (half the space, ~1 HU resolution in the CT window)
    min_foreground: float = 0.05  # skip slices whose foreground covers less than this fraction
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    ct_window: tuple[float, float] = (-1024.0, 3071.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    pet_suv_max: float = 15.0
    resample: bool = False
    affine_tolerance_mm: float = 1e-2
    neighbour_k: int = 3
    instances_per_pair: float = 2.3
    mix: tuple[tuple[str, float], ...] = tuple(understanding.DEFAULT_MIX.items())
    records_per_shard: int = 1000
    subjects: int = 8  # mni152-sim
    sim_voxel_mm: float = 2.0  # mni152-sim
    sim_lesion_probability: float = 0.8  # mni152-sim
    vocab_size: int = 512
    tokenizer: str | None = None  # a tokenizer.json or Qwen2-format folder (a BAGEL download) instead of the BPE
    contact_sheet: str | None = None
    overwrite: bool = False
    progress: bool = True

    def norm(self) -> NormConfig:
        return NormConfig(tuple(self.ct_window), tuple(self.mr_percentiles), float(self.pet_suv_max))

    def source_options(self) -> dict:
        return {"subjects": self.subjects, "sim_voxel_mm": self.sim_voxel_mm, "seed": self.seed,
                "sim_lesion_probability": self.sim_lesion_probability}


def validate_build_config(config: BuildConfig) -> None:
    """Every value of the build, checked before any file is touched: one DataError naming the option as
    build-data spells it (the CLI's argument types check most of them already; this covers the API and the
    relations between values, such as split fractions summing to 1)."""
    def number(option: str, value, low=None, high=None, *, integer=False, low_open=False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise DataError(f"{option} {value!r}: expected {'an integer' if integer else 'a number'}")
        if not np.isfinite(value):
            raise DataError(f"{option} {value}: must be finite")
        if low is not None and (value <= low if low_open else value < low):
            raise DataError(f"{option} {value}: must be {'>' if low_open else '>='} {low}")
        if high is not None and value > high:
            raise DataError(f"{option} {value}: must be <= {high}")

    number("--slice-size", config.slice_size, 8, 4096, integer=True)
    number("--records-per-shard", config.records_per_shard, 1, integer=True)
    number("--subjects", config.subjects, 1, integer=True)
    number("--neighbour-k", config.neighbour_k, 1, integer=True)
    number("--vocab-size", config.vocab_size, 1, integer=True)
    number("--min-foreground", config.min_foreground, 0.0)  # above 1 skips every slice: "no valid record"
    number("--instances-per-pair", config.instances_per_pair, 0.0)
    number("--pet-suv-max", config.pet_suv_max, 0.0, low_open=True)
    number("--sim-voxel-mm", config.sim_voxel_mm, 0.5, 20.0)
    number("--sim-lesion-probability", config.sim_lesion_probability, 0.0, 1.0)
    if config.dtype not in ("float16", "float32"):
        raise DataError(f"--dtype {config.dtype!r}: expected float16 or float32")
    fractions = tuple(config.split_fractions)
    if len(fractions) != 3:
        raise DataError(f"--split {fractions}: expected three fractions TRAIN VAL TEST")
    for value in fractions:
        number("--split", value, 0.0, 1.0)
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"--split {' '.join(f'{f:g}' for f in fractions)}: the fractions must sum to 1 (they sum "
                        f"to {sum(fractions):g})")
    for option, (lo, hi), bounds in (("--ct-window", config.ct_window, None),
                                     ("--mr-percentiles", config.mr_percentiles, (0.0, 100.0))):
        number(option, lo)
        number(option, hi)
        if not lo < hi:
            raise DataError(f"{option} {lo:g},{hi:g}: LO must be below HI")
        if bounds and (lo < bounds[0] or hi > bounds[1]):
            raise DataError(f"{option} {lo:g},{hi:g}: must lie within {bounds[0]:g}..{bounds[1]:g}")
    mix = tuple(config.mix)
    if not mix or any(name not in understanding.TASKS for name, _ in mix):
        raise DataError(f"--mix {mix}: expected weights of {', '.join(understanding.TASKS)}")
    for name, weight in mix:
        number(f"--mix {name}", weight, 0.0)
    if sum(w for _, w in mix) <= 0:
        raise DataError(f"--mix {mix}: at least one weight must be > 0")
    if config.contact_sheet and not str(config.contact_sheet).lower().endswith(".png"):
        raise DataError(f"--contact-sheet {config.contact_sheet}: must end in .png")


@dataclasses.dataclass
class BuildResult:
    out: Path
    records: dict[str, int]
    skipped: list[dict]
    manifest: dict


def assign_splits(patients: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Patient -> split; a seeded permutation of the sorted unique ids (case-level split, no patient in two).

    With at least three patients, val and test each get at least one patient when their fraction is > 0.
    """
    unique = sorted(set(patients))
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions {fractions} must be three non-negative numbers")
    total = sum(fractions)
    n = len(unique)
    n_val = int(round(n * fractions[1] / total))
    n_test = int(round(n * fractions[2] / total))
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    order = np.random.default_rng([seed, 7]).permutation(n)
    out = {}
    for rank, i in enumerate(order):
        out[unique[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            return f"{__version__}+git.{commit.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def process_case(case: CaseSpec, source: Source, config: BuildConfig) -> tuple[list[dict], dict]:
    """Loads, checks and slices one case. Returns (records without split/index, case summary)."""
    if case.problem:
        raise DataError(case.problem)
    loaded = source.load(case, config.source_options())
    for name in loaded.volumes:
        modality_spec(name)  # unknown modality -> DataError
    volumes = dict(loaded.volumes)
    if loaded.mask is not None:
        volumes["__mask__"] = loaded.mask
    volumes = check_aligned(volumes, atol_mm=config.affine_tolerance_mm, resample=config.resample)
    mask = volumes.pop("__mask__", None)
    first = next(iter(volumes.values()))
    foreground = case_foreground(volumes, mask)
    if not foreground.any():
        raise DataError(f"{case.first_file}: empty foreground (no body voxels found)")
    geometry = slice_geometry(first.data.shape, first.spacing, config.slice_size)
    fg_slices = to_axial_slices(foreground.astype(np.float32), geometry, background=0.0, order=0) > 0.5
    fraction = fg_slices.mean(axis=(1, 2))
    keep = np.flatnonzero(fraction >= config.min_foreground)
    if keep.size == 0:
        raise DataError(f"{case.first_file}: no slice has foreground >= {config.min_foreground:.3g} of its area "
                        f"(largest {fraction.max():.3g})")
    dtype = np.dtype(config.dtype)
    images, params = {}, {}
    for name, vol in volumes.items():
        params[name] = norm_params(name, vol.data, foreground, config.norm())
        slices = to_axial_slices(normalise(vol.data, params[name]), geometry, background=-1.0)
        images[name] = slices[keep].astype(dtype)
        vol.data = None  # release the volume early: bounded memory
    modalities = list(images)
    routes = [list(r) for r in source.routes(modalities)]
    depth = int(fraction.shape[0])
    records = []
    for j, z in enumerate(keep):
        records.append({
            "schema": SCHEMA_VERSION, "dataset": case.dataset, "anatomy": case.anatomy, "group": case.group,
            "case_id": case.case_id, "patient_id": case.patient_id, "slice_index": int(z), "depth": depth,
            "spacing": list(first.spacing), "geometry": geometry.to_dict(), "modalities": modalities,
            "norm": params, "images": {m: images[m][j] for m in modalities}, "mask": fg_slices[z],
            "foreground": float(fraction[z]), "routes": routes,
        })
    summary = {"key": case.key, "dataset": case.dataset, "anatomy": case.anatomy, "group": case.group,
               "case_id": case.case_id, "patient_id": case.patient_id, "modalities": modalities,
               "routes": routes, "depth": depth}
    return records, summary


# What a build writes into --out; manifest.json is written last and marks a complete build.
OURS = ("records", "instances", "skipped.jsonl", "tokenizer.json", "manifest.json")


def check_out(out: Path) -> None:
    """--out must be (or become) a writable folder: a one-line DataError before any work."""
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise DataError(f"--out {out}: {blocker} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--out {out}: cannot create its parent folder ({err.strerror or err})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK | os.X_OK)):
        raise DataError(f"--out {out}: not writable")


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """Checks ``out`` and returns a fresh staging folder beside it (``.<name>.building-<pid>``) that
    :func:`_swap_in` moves into place only when the build succeeded: a failed or killed build never touches a
    previous build. Leftovers of killed builds (stale staging folders, a folder without manifest.json) are
    cleared; a swap killed half-way is rolled back to the previous build."""
    check_out(out)
    staging.clear_stale(out, "building")
    old = out.parent / f".{out.name}.previous"
    if old.is_dir():  # a swap was killed half-way: put the previous build back if the new one is incomplete
        if (old / "manifest.json").is_file() and not (out / "manifest.json").is_file():
            out.mkdir(exist_ok=True)
            for name in OURS:
                if (old / name).exists():
                    _remove(out / name)
                    os.replace(old / name, out / name)
        shutil.rmtree(old, ignore_errors=True)
    if (out / "manifest.json").is_file() and not overwrite:
        existing = [name for name in OURS if (out / name).exists()]
        raise DataError(f"{out}: already holds a build ({', '.join(existing)}); pass --overwrite to replace it")
    stage = staging.staging_folder(out, "building")
    (stage / "records").mkdir(parents=True)
    return stage


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _swap_in(stage: Path, out: Path) -> None:
    """Moves the complete build from ``stage`` into ``out`` (a new folder: one rename). Into an existing folder
    the previous build is moved aside first and deleted last; manifest.json goes last either way."""
    if not out.exists():
        os.replace(stage, out)
        return
    old = out.parent / f".{out.name}.previous"
    old.mkdir(exist_ok=True)
    for name in ("manifest.json", *OURS[:-1]):  # the old manifest first: out is never a mixed "complete" build
        if (out / name).exists() or (out / name).is_symlink():
            os.replace(out / name, old / name)
    for name in OURS:
        if (stage / name).exists():
            os.replace(stage / name, out / name)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


def build(config: BuildConfig) -> BuildResult:
    """Runs the whole build (see module doc)."""
    started = time.time()
    validate_build_config(config)
    source = get_source(config.source)
    root = Path(config.root) if config.root else None
    if root is None and config.source != "mni152-sim":
        raise DataError(f"--root is required for source {config.source}")
    if root is not None and config.source != "mni152-sim" and not root.is_dir():
        raise DataError(f"--root {root}: not a folder")
    out = Path(config.out)
    tokenizer = load_build_tokenizer(config.tokenizer, config.vocab_size)  # before any slice: a bad path fails fast
    stage = _prepare_out(out, config.overwrite)
    try:
        return _build_into(stage, out, config, source, root, started, tokenizer)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _build_into(stage: Path, out: Path, config: BuildConfig, source, root, started: float, tokenizer) -> BuildResult:
    """The build proper, written into ``stage`` and swapped into ``out`` when at least one record is valid."""
    cases = source.discover(root, config.source_options())
    split_of = assign_splits([c.patient_id for c in cases], config.split_fractions, config.seed)

    writers = {s: ShardWriter(stage / "records", s, config.records_per_shard) for s in SPLITS}
    index = {s: {"cases": [], "case": [], "slice_index": [], "foreground": [], "mean": []} for s in SPLITS}
    skipped: list[dict] = []
    sheet_written = False
    try:
        for case in tqdm(cases, desc=f"build-data {config.source}", unit="case", disable=not config.progress):
            try:
                records, summary = process_case(case, source, config)
            except DataError as err:
                skipped.append({"file": case.first_file, "case": case.key, "reason": str(err)})
                continue
            split = split_of[case.patient_id]
            idx = index[split]
            summary["split"] = split
            case_number = len(idx["cases"])
            idx["cases"].append(summary)
            for record in records:
                record["split"] = split
                writers[split].write(encode_record(record))
                idx["case"].append(case_number)
                idx["slice_index"].append(record["slice_index"])
                idx["foreground"].append(round(record["foreground"], 5))
                idx["mean"].append([round(float(np.mean(record["images"][m], dtype=np.float64)), 5)
                                    for m in summary["modalities"]])
            if config.contact_sheet and not sheet_written:
                write_contact_sheet(config.contact_sheet, records, title=case.key)
                sheet_written = True
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    shards = {s: w.close() for s, w in writers.items()}
    counts = {s: w.count for s, w in writers.items()}

    skipped_text = "".join(json.dumps(s) + "\n" for s in skipped)
    if not any(counts.values()):
        first = f", e.g. {skipped[0]['reason']}" if skipped else ""
        if not (out / "manifest.json").is_file():  # nothing to keep: leave the reasons where the user looks
            out.mkdir(exist_ok=True)
            _remove(out / "records")
            write_text(out / "skipped.jsonl", skipped_text)
            where = f"see {out}/skipped.jsonl"
        else:
            where = f"the previous build in {out} is unchanged"
        raise DataError(f"{out}: no valid record remains ({len(skipped)} cases skipped{first}); {where}")
    manifest_counts = _write_indices_and_instances(stage, index, config)
    tokenizer.save(stage / "tokenizer.json")
    write_text(stage / "skipped.jsonl", skipped_text)
    manifest = {
        "schema": SCHEMA_VERSION,
        "source": config.source,
        "root": str(root) if root else None,
        "code_version": code_version(),
        "created_unix": int(started),
        "build_seconds": round(time.time() - started, 2),
        "config": _jsonable(dataclasses.asdict(config)),
        "counts": {"cases": {s: len(index[s]["cases"]) for s in SPLITS}, "records": counts,
                   **manifest_counts, "skipped_cases": len(skipped)},
        "shards": shards,
        "tokenizer": {"file": "tokenizer.json", **tokenizer.describe()},
        "slice_orientation": "axial; row 0 anterior, column 0 subject left (RAS+ canonical)",
    }
    write_json(stage / "manifest.json", manifest)
    _swap_in(stage, out)
    return BuildResult(out, counts, skipped, manifest)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _write_indices_and_instances(out: Path, index: dict, config: BuildConfig) -> dict:
    inst_config = understanding.InstanceConfig(neighbour_k=config.neighbour_k,
                                               instances_per_pair=config.instances_per_pair,
                                               mix=tuple(config.mix))
    by_dataset: dict[str, Counter] = {}
    by_route: dict[str, Counter] = {}
    by_task: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        idx = index[split]
        write_json(out / "records" / f"{split}.index.json", idx, indent=None)
        cases = idx["cases"]
        by_dataset[split] = Counter(cases[c]["dataset"] for c in idx["case"])
        routes: Counter = Counter()
        for c in idx["case"]:
            routes.update(f"{a}->{b}" for a, b in cases[c]["routes"])
        by_route[split] = routes
        tables = understanding.make_instances(idx, config.seed, inst_config) if idx["case"] else {
            t: understanding._empty(0) for t in understanding.TASKS}
        sl = understanding.SliceIndex(idx)
        tables["pairs"] = understanding.pair_table(sl, config.seed) if sl.n else {
            k: np.zeros(0, np.int32) for k in ("rec", "src", "tgt", "template")}
        understanding.save_instances(out / "instances" / f"{split}.npz", tables)
        by_task[split] = {t: int(len(cols.get("task", cols.get("rec")))) for t, cols in tables.items()}
    return {"records_by_dataset": {s: dict(c) for s, c in by_dataset.items()},
            "pairs_by_route": {s: dict(sorted(c.items())) for s, c in by_route.items()},
            "instances": by_task, "datasets": sorted({d for c in by_dataset.values() for d in c})}


def load_build_tokenizer(path: str | None, vocab_size: int):
    """``--tokenizer`` (a tokenizer.json, or a Qwen2-format folder such as a BAGEL download, with BAGEL's tokens
    added: data/tokenizer.py) or, without it, the embedded BPE of ``vocab_size`` tokens; one-line DataError."""
    if not path:
        try:
            return build_default_tokenizer(vocab_size)
        except ValueError as err:  # a vocabulary too small for the byte alphabet and the special tokens
            raise DataError(f"--vocab-size {vocab_size}: {str(err).splitlines()[0]}") from None
    try:
        return load_tokenizer(path)
    except (ValueError, OSError) as err:
        raise DataError(f"--tokenizer {path}: {str(err).splitlines()[0]}") from None


def summary_lines(result: BuildResult) -> list[str]:
    counts = result.manifest["counts"]
    lines = [f"records: {counts['records']}  cases: {counts['cases']}  skipped cases: {len(result.skipped)}"]
    for split in SPLITS:
        if counts["instances"].get(split):
            lines.append(f"{split} instances: {counts['instances'][split]}")
    by_reason = defaultdict(int)
    for s in result.skipped:
        by_reason[s["reason"].split(":")[-1].strip()[:60]] += 1
    lines.extend(f"skipped: {n} x {reason}" for reason, n in sorted(by_reason.items()))
    return lines
