"""``build-data --source synermed``: the SynerMed release folder -> validated ArrayRecord shards.

Work is cut into *units*: one per Parquet row group (``edit-NNNNN``) and one per JSONL byte chunk
(``conv-NNNNN``, ``--jsonl-chunk-mb``, cut at line starts). A unit streams its rows (``pyarrow``
``iter_batches`` over its one row group, ``--batch-rows`` rows at a time) or its lines, validates each
(every image decoded with Pillow; conversation slices checked on disk), and writes the good ones to its own
shard ``records/<unit>.array_record`` under a temporary name, renamed when complete; then
``parts/<unit>.json`` (counts, routes, skipped rows with their global row / line numbers, a few texts for
the tokenizer) marks the unit done. Memory is bounded by one batch of rows per worker, never a whole column.

* Parallel: ``--workers`` processes take units in turn; the progress bar counts rows as units finish.
* Resumable: a rerun (after a kill, or of an interrupted multi-host build) skips units with a part file;
  ``plan.json`` fixes the units and fingerprints the release (a changed release needs ``--overwrite``).
* Multi-host: ``--process-index I --process-count N`` builds units ``I::N`` only (each process reads only its
  share of the release); whichever process finds every part present writes the manifest (idempotent).

Rows are kept or skipped as the official loaders train them or not (data/synermed.py): combined rows (an
optional ``combined_instruction`` column, or one instruction for three or more images) and truncated PNGs are
kept, and so are conversations whose ``<image>`` markers outnumber their images; the manifest counts those
(``kept_as_official``) and every skipped row by its reason's code (``skipped_by_reason``).

Finishing writes ``manifest.json`` (shards per kind in unit order: record ``i`` of a kind is in their
concatenation; counts per route; the sha256 of every shard), ``skipped.jsonl`` (file, row or line, reason, code),
``tokenizer.json`` (the embedded BPE trained on the prompt corpus plus sampled release texts, or
``--tokenizer``'s copy) and ``slice`` (a symbolic link to the release's ``slice/``, read by conversations).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from synermedgen_jax.data import synermed
from synermedgen_jax.data.build import code_version
from synermedgen_jax.data.images import decode_image
from synermedgen_jax.data.prompts import corpus
from synermedgen_jax.data.records import SCHEMA_VERSION, SHARD_SUFFIX, encode_record, sha256_file, write_json
from synermedgen_jax.data.route_text import modality_from_path, route_name
from synermedgen_jax.data.tokenizer import load_tokenizer, train_tokenizer
from synermedgen_jax.data.volumes import DataError
from synermedgen_jax.staging import atomic_path, write_atomic

COMBINED = "combined_instruction"  # the optional Parquet column of combined rows (edit_dataset_new.py)
PLAN_VERSION = 2  # 2: combined rows, lenient decodes, reason codes in the parts
TEXTS_PER_UNIT = 64


@dataclasses.dataclass
class SynerMedBuildConfig:
    root: str
    out: str
    workers: int = 1
    process_index: int = 0
    process_count: int = 1
    jsonl_chunk_mb: float = 64.0
    batch_rows: int = 64
    vocab_size: int = 512
    tokenizer: str | None = None
    overwrite: bool = False
    progress: bool = True


@dataclasses.dataclass
class SynerMedBuildResult:
    out: Path
    finished: bool
    units_done: int
    units_total: int
    units_resumed: int
    manifest: dict | None
    skipped: list[dict]

    @property
    def records(self) -> dict[str, int]:
        return dict(self.manifest["counts"]["records"]) if self.manifest else {}


# ------------------------------------------------------------------------------------------------ planning


def _fingerprint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    stat = path.stat()
    return {"file": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _jsonl_chunks(path: Path, chunk_bytes: int) -> list[dict]:
    """Byte ranges starting at line starts, with the 1-based number of each range's first line."""
    size = path.stat().st_size
    starts = [0]
    with open(path, "rb") as f:
        at = chunk_bytes
        while at < size:
            f.seek(at - 1)
            f.readline()  # to the end of the line holding byte at-1: the next line starts at a line start
            pos = f.tell()
            if pos >= size:
                break
            if pos > starts[-1]:
                starts.append(pos)
            at = max(pos, at) + chunk_bytes
        bounds = starts + [size]
        chunks, line = [], 1
        for a, b in zip(bounds[:-1], bounds[1:]):
            chunks.append({"start": a, "end": b, "first_line": line})
            f.seek(a)
            remaining = b - a
            while remaining > 0:  # count newlines of the range in 16 MiB blocks (bounded memory)
                block = f.read(min(remaining, 1 << 24))
                if not block:
                    break
                line += block.count(b"\n")
                remaining -= len(block)
    return chunks


def make_plan(root: Path, config: SynerMedBuildConfig) -> dict:
    parquet, jsonl = root / synermed.PARQUET_NAME, root / synermed.JSONL_NAME
    if not parquet.is_file() and not jsonl.is_file():
        raise DataError(f"--root {root}: neither {synermed.PARQUET_NAME} nor {synermed.JSONL_NAME} is there "
                        "(expected the SynerMed release folder)")
    units: list[dict] = []
    if parquet.is_file():
        try:
            handle = pq.ParquetFile(parquet)
            meta = handle.metadata
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
            raise DataError(f"{parquet}: not a readable Parquet file ({err})") from None
        names = set(handle.schema_arrow.names)
        # The official edit loader reads instruction_list, or a combined_instruction column in its place.
        missing = {"image_list"} - names | ({"instruction_list"} - names if COMBINED not in names else set())
        if missing:
            raise DataError(f"{parquet}: missing column(s) {sorted(missing)} (has {sorted(names)})")
        first = 0
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            units.append({"id": f"{synermed.EDIT}-{rg:05d}", "kind": synermed.EDIT, "row_group": rg,
                          "first_row": first, "rows": rows})
            first += rows
    if jsonl.is_file():
        chunk = max(1, int(config.jsonl_chunk_mb * (1 << 20)))
        for k, c in enumerate(_jsonl_chunks(jsonl, chunk)):
            units.append({"id": f"{synermed.CONV}-{k:05d}", "kind": synermed.CONV, **c})
    return {"version": PLAN_VERSION, "root": str(root.resolve()),
            "release": {"parquet": _fingerprint(parquet), "jsonl": _fingerprint(jsonl)}, "units": units}


# ------------------------------------------------------------------------------------------------- units


class _SliceChecker:
    """``path -> None | (reason code, message)`` for images under slice/, memoised (conversations reuse slices);
    ``lenient(path)``: whether that slice decoded only with the official loaders' Pillow settings."""

    def __init__(self, root: Path, limit: int = 200_000):
        self.root, self.limit, self.seen = root / synermed.SLICE_DIR, limit, {}

    def __call__(self, path: str) -> tuple[str, str] | None:
        if path not in self.seen:
            if len(self.seen) >= self.limit:
                self.seen.clear()
            file = self.root / path
            lenient = False
            if not file.is_file():
                reason = ("missing slice file", f"slice/{path}")
            else:
                try:
                    lenient = decode_image(file.read_bytes())[1]
                    reason = None
                except DataError as err:
                    reason = ("corrupt slice file", f"slice/{path}: {err}")
            self.seen[path] = (reason, lenient)
        return self.seen[path][0]

    def lenient(self, path: str) -> bool:
        return path in self.seen and self.seen[path][1]


class _UnitWriter:
    """The records of one unit, encoded into one ArrayRecord file (``count``: how many)."""

    def __init__(self, path: Path):
        self.writer = ArrayRecordWriter(str(path), "group_size:1")
        self.count = 0

    def write(self, record: dict) -> None:
        self.writer.write(encode_record(record))
        self.count += 1


class _EmptyUnit(Exception):
    """A unit without a usable row has no shard: raised inside ``atomic_path``, which then removes the temp file."""


def _sample_texts(texts: list[str], new: list[str]) -> None:
    for t in new:
        if len(texts) < TEXTS_PER_UNIT:
            texts.append(t[:300])


def _skip(summary: dict, where: dict, err: DataError) -> None:
    """One skipped row or line, with its reason and the reason's code (what the summary counts)."""
    code = err.code if isinstance(err, synermed.RowError) else _reason_code(str(err))
    summary["skipped"].append({**where, "reason": str(err), "code": code})


def _reason_code(reason: str) -> str:
    """The code of a reason written without one (parts of an older build): its text before any detail."""
    return reason.split(":")[0].split(" (")[0]


def _edit_unit(root: Path, unit: dict, writer: _UnitWriter, summary: dict, batch_rows: int) -> None:
    name = synermed.PARQUET_NAME
    row = unit["first_row"]
    try:
        handle = pq.ParquetFile(root / name)
        columns = [c for c in ("image_list", "instruction_list", COMBINED) if c in handle.schema_arrow.names]
        batches = iter(handle.iter_batches(batch_size=batch_rows, row_groups=[unit["row_group"]], columns=columns))
    except Exception as err:  # pyarrow: ArrowInvalid / OSError
        batches, failure = iter(()), err
    else:
        failure = None
    while failure is None:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except Exception as err:  # a damaged row group: the rows not yet read are skipped with the reason
            failure = err
            break
        column = {c: batch.column(c).to_pylist() for c in batch.schema.names}
        absent = [None] * batch.num_rows
        images, instructions = column["image_list"], column.get("instruction_list", absent)
        combined = column.get(COMBINED, absent)
        for k in range(batch.num_rows):
            summary["rows"] += 1
            try:
                good = synermed.check_edit_row(images[k], instructions[k], combined[k])
            except DataError as err:
                _skip(summary, {"file": name, "row": row}, err)
                row += 1
                continue
            mods, step_routes = synermed.edit_routes(len(good.images), good.instructions, good.combined)
            record = {"schema": SCHEMA_VERSION, "format": "synermed-edit", "row": row, "images": good.images,
                      "instructions": good.instructions, "modalities": mods}
            if good.combined is not None:
                record["combined"] = good.combined
            writer.write(record)
            summary["edit_rows_by_route"][route_name(mods[0], mods[-1])] += 1
            summary["edit_steps_by_route"].update(step_routes)
            summary["kept"].update(good.kept)
            texts = good.combined[:1] if good.combined is not None else [p for phr in good.instructions
                                                                         for p in phr[:1]]
            _sample_texts(summary["texts"], texts)
            row += 1
    if failure is not None:
        end = unit["first_row"] + unit["rows"]
        reason = f"unreadable Parquet row group {unit['row_group']}: {type(failure).__name__}: {str(failure)[:200]}"
        summary["skipped"].extend({"file": name, "row": r, "reason": reason, "code": "unreadable Parquet row group"}
                                  for r in range(row, end))
        summary["rows"] += end - row


def _conv_unit(root: Path, unit: dict, writer: _UnitWriter, summary: dict) -> None:
    name = synermed.JSONL_NAME
    check = _SliceChecker(root)
    line_no = unit["first_line"] - 1
    with open(root / name, "rb") as f:
        f.seek(unit["start"])
        pos = unit["start"]
        while pos < unit["end"]:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            line_no += 1
            if not raw.strip():
                continue
            summary["rows"] += 1
            try:
                try:
                    obj = json.loads(raw)
                except ValueError as err:
                    raise synermed.RowError("not JSON", str(err)[:100]) from None
                images, turns, kept = synermed.check_conversation(obj, check)
            except DataError as err:
                _skip(summary, {"file": name, "line": line_no}, err)
                continue
            summary["kept"].update(kept + ([synermed.KEPT_TRUNCATED] if any(map(check.lenient, images)) else []))
            mods = [modality_from_path(p) for p in images]
            writer.write({"schema": SCHEMA_VERSION, "format": "synermed-conv", "line": line_no, "images": images,
                          "turns": turns, "modalities": mods})
            for m in mods:
                summary["conversation_images_by_modality"][m or "unknown"] += 1
            _sample_texts(summary["texts"], [t["value"].replace(synermed.IMAGE_MARKER, " ") for t in turns])


def run_unit(root: str, out: str, unit: dict, batch_rows: int = 64) -> dict:
    """Builds one unit (see module doc) and writes its part file; returns the part's summary."""
    root_p, out_p = Path(root), Path(out)
    started = time.time()
    summary = {"id": unit["id"], "kind": unit["kind"], "rows": 0, "skipped": [], "texts": [],
               "edit_rows_by_route": Counter(), "edit_steps_by_route": Counter(),
               "conversation_images_by_modality": Counter(), "kept": Counter()}
    final = out_p / "records" / f"{unit['id']}{SHARD_SUFFIX}"
    try:
        with atomic_path(final) as tmp:
            writer = _UnitWriter(tmp)
            try:
                if unit["kind"] == synermed.EDIT:
                    _edit_unit(root_p, unit, writer, summary, batch_rows)
                else:
                    _conv_unit(root_p, unit, writer, summary)
            finally:
                writer.writer.close()
            if writer.count == 0:
                raise _EmptyUnit
        shard = {"file": f"records/{final.name}", "records": writer.count, "sha256": sha256_file(final)}
    except _EmptyUnit:
        shard = None
    summary.update(shard=shard, records=shard["records"] if shard else 0, seconds=round(time.time() - started, 3))
    for key in ("edit_rows_by_route", "edit_steps_by_route", "conversation_images_by_modality", "kept"):
        summary[key] = dict(sorted(summary[key].items()))
    write_json(out_p / "parts" / f"{unit['id']}.json", summary, indent=None)
    return summary


# ------------------------------------------------------------------------------------------------ driver


def _prepare(out: Path, root: Path, config: SynerMedBuildConfig) -> dict:
    ours = ["records", "parts", "plan.json", "manifest.json", "skipped.jsonl", "tokenizer.json", "slice"]
    if config.overwrite:
        for name in ours:
            path = out / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
    elif (out / "manifest.json").exists() and not (out / "plan.json").exists():
        raise DataError(f"{out}: holds another build (manifest.json without plan.json); pass --overwrite")
    (out / "records").mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    for stale in (out / "records").glob(".tmp-*"):  # left by a killed run (staging.atomic_path's temp names)
        stale.unlink(missing_ok=True)
    plan_path = out / "plan.json"
    fresh = make_plan(root, config) if not plan_path.exists() else None
    if fresh is not None:
        write_json(plan_path, fresh, indent=None)
        return fresh
    plan = json.loads(plan_path.read_text())
    release = {"parquet": _fingerprint(root / synermed.PARQUET_NAME), "jsonl": _fingerprint(root / synermed.JSONL_NAME)}
    if plan.get("version") != PLAN_VERSION or plan.get("release") != release:
        raise DataError(f"{out}: an unfinished build of another release (or an older version) is here; pass "
                        "--overwrite to start again")
    return plan


def _done(out: Path, unit: dict) -> bool:
    return (out / "parts" / f"{unit['id']}.json").is_file()


def build_release(config: SynerMedBuildConfig) -> SynerMedBuildResult:
    """Builds this process's share of the units (resuming), then finishes the build if every unit is done."""
    root, out = Path(config.root or ""), Path(config.out)
    if not config.root or not root.is_dir():
        raise DataError(f"--root {config.root}: not a folder (the SynerMed release folder is needed)")
    if config.process_count < 1 or not 0 <= config.process_index < config.process_count:
        raise DataError(f"--process-index {config.process_index} must be in [0, --process-count "
                        f"{config.process_count})")
    if config.tokenizer and not Path(config.tokenizer).exists():
        raise DataError(f"--tokenizer {config.tokenizer}: no such file or folder")
    plan = _prepare(out, root, config)
    units = plan["units"]
    mine = units[config.process_index::config.process_count]
    todo = [u for u in mine if not _done(out, u)]
    resumed = len(mine) - len(todo)
    rows_of = {u["id"]: u.get("rows", 0) for u in units}
    total_rows = sum(u.get("rows", 0) for u in mine if u["kind"] == synermed.EDIT)
    share = f", process {config.process_index}/{config.process_count}" if config.process_count > 1 else ""
    bar = tqdm(total=len(todo), unit="unit", disable=not config.progress,
               desc=f"build-data synermed ({total_rows:,} Parquet rows{share})")
    try:
        if config.workers <= 1 or len(todo) <= 1:
            for unit in todo:
                run_unit(str(root), str(out), unit, config.batch_rows)
                bar.update(1)
                bar.set_postfix(rows=rows_of[unit["id"]] or "")
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
                futures = [pool.submit(run_unit, str(root), str(out), u, config.batch_rows) for u in todo]
                try:
                    for future in as_completed(futures):
                        future.result()
                        bar.update(1)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    finished = all(_done(out, u) for u in units)
    manifest, skipped = (finish(out, root, plan, config) if finished else (None, []))
    return SynerMedBuildResult(out, finished, sum(_done(out, u) for u in units), len(units), resumed, manifest,
                               skipped)


def finish(out: Path, root: Path, plan: dict, config: SynerMedBuildConfig) -> tuple[dict, list[dict]]:
    """Assembles the parts into ``manifest.json``, ``skipped.jsonl``, ``tokenizer.json`` and the slice link."""
    shards = {k: [] for k in synermed.KINDS}
    counts = {"rows": Counter(), "records": Counter(), "edit_rows_by_route": Counter(),
              "edit_steps_by_route": Counter(), "conversation_images_by_modality": Counter(), "kept": Counter()}
    skipped: list[dict] = []
    texts: list[str] = []
    seconds = 0.0
    for unit in plan["units"]:
        part = json.loads((out / "parts" / f"{unit['id']}.json").read_text())
        if part["shard"]:
            shards[unit["kind"]].append(part["shard"])
        counts["rows"][unit["kind"]] += part["rows"]
        counts["records"][unit["kind"]] += part["records"]
        for key in ("edit_rows_by_route", "edit_steps_by_route", "conversation_images_by_modality"):
            counts[key].update(part[key])
        counts["kept"].update(part.get("kept", {}))
        skipped.extend(part["skipped"])
        texts.extend(part["texts"])
        seconds += part["seconds"]
    tokenizer = _write_tokenizer(out, config, texts)
    write_atomic(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    link = out / synermed.SLICE_DIR
    target = (root / synermed.SLICE_DIR).resolve()
    if target.is_dir() and not (link.is_symlink() and Path(os.readlink(link)) == target):
        with atomic_path(link) as tmp:
            tmp.symlink_to(target, target_is_directory=True)
    by_reason = Counter(s.get("code") or _reason_code(s["reason"]) for s in skipped)
    manifest = {
        "schema": SCHEMA_VERSION,
        "source": synermed.SOURCE_NAME,
        "root": plan["root"],
        "release": plan["release"],
        "code_version": code_version(),
        "created_unix": int(time.time()),
        "unit_seconds": round(seconds, 2),
        "splits": ["train"],
        "counts": {"rows": dict(counts["rows"]), "records": {k: counts["records"][k] for k in synermed.KINDS},
                   "skipped_rows": len(skipped), "skipped_by_reason": dict(sorted(by_reason.items())),
                   # Rows and lines kept that a strict reader would drop, read as the official loaders read them.
                   "kept_as_official": dict(sorted(counts["kept"].items())),
                   **{k: dict(sorted(counts[k].items())) for k in ("edit_rows_by_route", "edit_steps_by_route",
                                                                   "conversation_images_by_modality")}},
        "shards": shards,
        "tokenizer": {"file": "tokenizer.json", **tokenizer.describe()},
        "slice_link": synermed.SLICE_DIR if link.exists() else None,
    }
    write_json(out / "manifest.json", manifest)
    return manifest, skipped


def _write_tokenizer(out: Path, config: SynerMedBuildConfig, texts: list[str]):
    if config.tokenizer:
        tok = load_tokenizer(config.tokenizer)
    else:
        # Deterministic whatever the worker order: texts come in unit order; duplicates removed in order.
        unique = list(dict.fromkeys(texts))
        tok = train_tokenizer(corpus() + unique, config.vocab_size)
    tok.save(out / "tokenizer.json")
    return tok


def summary_lines(result: SynerMedBuildResult) -> list[str]:
    if not result.finished:
        return [f"units done: {result.units_done}/{result.units_total} (this process's share is finished; the "
                "manifest is written by the process that completes the last unit, or by a rerun)"]
    c = result.manifest["counts"]
    lines = [f"edit chains: {c['records']['edit']} of {c['rows'].get('edit', 0)} rows; conversations: "
             f"{c['records']['conv']} of {c['rows'].get('conv', 0)} lines; skipped: {c['skipped_rows']}"
             f"{f'; resumed {result.units_resumed} finished units' if result.units_resumed else ''}"]
    lines += [f"edit steps {route}: {n}" for route, n in c["edit_steps_by_route"].items()]
    lines += [f"skipped: {n} x {reason}" for reason, n in c["skipped_by_reason"].items()]
    lines += [f"kept as the official loaders read them: {n} x {what}"
              for what, n in c.get("kept_as_official", {}).items()]
    return lines

