"""The one reader of what XLA compiled: its cost and memory analyses, the optimised HLO text and the buffer
live-range dump. Every HLO-text pattern of the package is here.

``cost_analysis()`` counts a while-loop body once, whatever its trip count, so :func:`hlo_matmul_flops` recounts
the dot and convolution FLOPs from the HLO text with each body times its ``known_trip_count``;
:func:`peak_live_buffers` and :func:`f32_copy_bytes` read the values live at the memory peak.
"""

from __future__ import annotations

import glob
import math
import re
from pathlib import Path
from typing import Any

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
# HLO text patterns (the optimised module, ``compiled.as_text()``) and XLA's live-range dump.
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->\s*.*\{\s*$")  # entry?, name
_MATMUL_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")  # the dims of an array type
_OPERANDS = re.compile(r"%?([\w.\-]+),\s*%?([\w.\-]+)\)")  # the first two operands
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_ARRAY_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\]")  # name, dtype, dims
_VALUE_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\]\S*\s+([\w\-]+)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NAMED_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%\S+) = (\S+) ([\w\-]+)\(")  # %name, type, opcode
_LIVE = re.compile(r"^\s+([\w.\-]+)\{[^}]*\}: (\d+) bytes", re.M)  # a live-range dump's "name{}: N bytes"


def compiled_flops(compiled: Any) -> float:
    """FLOPs XLA reports for a compiled executable (``jit(f).lower(...).compile()``)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def memory_figures(compiled: Any) -> dict | None:
    """Per-device bytes of a compiled executable (``compiled.memory_analysis()``: arguments, outputs, their
    aliased part, temporaries, generated code) and the peak; ``None`` where the backend gives no analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    argument, output = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
    alias, temp = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
    code = int(getattr(stats, "generated_code_size_in_bytes", 0))
    # Donated state aliases the output: those bytes are counted once.
    peak = argument + output - alias + temp + code
    return {"argument_bytes": argument, "output_bytes": output, "alias_bytes": alias, "temp_bytes": temp,
            "generated_code_bytes": code, "peak_bytes": peak}


def loop_corrected_flops(compiled: Any, hlo_text: str | None = None) -> tuple[float, float, list[dict]]:
    """``(XLA's cost_analysis FLOPs, FLOPs to add, loops)`` per device: cost_analysis counts every while-loop
    body once, so the dot/convolution FLOPs of each body's remaining ``trips - 1`` runs are added."""
    matmuls = hlo_matmul_flops(hlo_text if hlo_text is not None else compiled.as_text())
    return compiled_flops(compiled), matmuls["with_trips"] - matmuls["once"], matmuls["loops"]


# Matmul FLOPs from the HLO text, loops included: XLA's cost_analysis() counts a while-loop body ONCE, and the
# chunked attention (a scan over key chunks), the grouped VAE encoding (lax.map) and gradient accumulation run in
# loops; the optimised HLO states each loop's ``known_trip_count``, so every body is multiplied by its trips.
def _dims(type_text: str) -> list[int] | None:
    match = _ARRAY.match(type_text)
    return [int(d) for d in match.group(1).split(",") if d] if match else None


def _parse_hlo(text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str | None]:
    """``{computation: [(name, type, opcode, rest of line)]}`` and the entry computation's name."""
    computations: dict[str, list] = {}
    entry, current = None, None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None:
            match = _COMPUTATION.match(stripped)
            if match and not stripped.startswith("HloModule"):
                current = match.group(2)
                computations[current] = []
                entry = current if match.group(1) else entry
            continue
        if stripped == "}":
            current = None
            continue
        match = _MATMUL_INSTRUCTION.match(line)
        if match:
            computations[current].append(match.groups())
    return computations, entry


def _matmul_flops(opcode: str, out_type: str, rest: str, types: dict[str, str]) -> float:
    operands = _OPERANDS.match(rest)
    out = _dims(out_type)
    if operands is None or out is None:
        return 0.0
    if opcode == "dot":
        lhs = _dims(types.get(operands.group(1), ""))
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
        if lhs is None or contracting is None:
            return 0.0
        depth = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
        return 2.0 * math.prod(out) * depth
    rhs = _dims(types.get(operands.group(2), ""))
    labels = re.search(r"dim_labels=[^_]*_([0-9a-z]+)->", rest)
    if rhs is None or labels is None or "o" not in labels.group(1):
        return 0.0
    # Each output element sums over the kernel's spatial window × input features (per feature group).
    return 2.0 * math.prod(out) * math.prod(rhs) / rhs[labels.group(1).index("o")]


def hlo_matmul_flops(hlo_text: str) -> dict:
    """Dot + convolution FLOPs of a compiled HLO module (``compiled.as_text()``).

    Returns ``{"once": every loop body counted once (what cost_analysis does), "with_trips": loop bodies
    times their known trip counts, "loops": [{"trips", "body_flops"}, ...] for loops doing matmuls}``.
    Fusions, calls and conditionals (largest branch) are followed; loops without a known trip count count
    once in both figures.
    """
    computations, entry = _parse_hlo(hlo_text)
    loops: list[dict] = []

    def total(name: str, trips: bool, memo: dict) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # guards against cycles
        instructions = computations.get(name, [])
        types = {n: t for n, t, _, _ in instructions}
        flops = 0.0
        for _, out_type, opcode, rest in instructions:
            if opcode in ("dot", "convolution"):
                flops += _matmul_flops(opcode, out_type, rest, types)
            elif opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
                condition = re.search(r"condition=%?([\w.\-]+)", rest).group(1)
                known = _TRIPS.search(rest)
                count = int(known.group(1)) if (trips and known) else 1
                inner = total(body, trips, memo) + total(condition, trips, memo)
                if trips and inner:
                    loops.append({"trips": int(known.group(1)) if known else None, "body_flops": inner})
                flops += count * inner
            elif opcode == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                if branches:
                    flops += max(total(b.strip().lstrip("%"), trips, memo) for b in branches.group(1).split(","))
            else:
                for called in re.findall(r"(?:calls|to_apply|called_computations)=\{?%?([\w.\-]+)", rest):
                    flops += total(called, trips, memo)
        memo[name] = flops
        return flops

    if entry is None:
        raise ValueError("hlo_matmul_flops: no ENTRY computation in the HLO text")
    once = total(entry, False, {})
    with_trips = total(entry, True, {})
    return {"once": once, "with_trips": with_trips, "loops": loops}


def largest_buffers(hlo_text: str, top: int = 8) -> list[dict]:
    """The largest array values of the compiled per-device HLO outside fusion bodies (what XLA may have to
    allocate), as ``{name, dtype, shape, bytes}``. Fused computations' internals never hit memory, so they
    are skipped."""
    found: dict[str, dict] = {}
    in_fused = False
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and ("computation" in stripped.split("(")[0] or stripped.startswith(("%", "ENTRY"))):
            head = stripped.split("(")[0].split()[-1].lstrip("%")
            in_fused = "fused" in head or "fusion" in head
            continue
        if in_fused:
            continue
        match = _ARRAY_DEF.match(line)
        if not match or match.group(2) not in _DTYPE_BYTES:
            continue
        dims = [int(d) for d in match.group(3).split(",") if d]
        size = math.prod(dims) * _DTYPE_BYTES[match.group(2)]
        name = match.group(1)
        if name not in found or found[name]["bytes"] < size:
            found[name] = {"name": name, "dtype": match.group(2), "shape": dims, "bytes": size}
    return sorted(found.values(), key=lambda r: -r["bytes"])[:top]


def _live_at_peak(live_range_text: str) -> list[tuple[str, int]]:
    """``[(value name, bytes)]`` of the live-range dump's "(peak):" section (up to its stack trace)."""
    start = live_range_text.find("(peak):")
    if start < 0:
        raise ValueError("no '(peak):' section in the live-range dump")
    section = live_range_text[start:]
    end = section.find("Stack trace")
    return [(name, int(size)) for name, size in _LIVE.findall(section[: end if end > 0 else None])]


def peak_live_buffers(live_range_text: str, hlo_text: str, top: int = 12) -> dict:
    """The values live at the memory peak of a compiled module, from XLA's live-range dump
    (``*after_optimizations-live-range.txt``): ``{"position", "bytes", "buffers": [{name, dtype, shape, bytes,
    op}]}`` with the ``top`` largest (``op``: the JAX name stack of the defining op, where XLA kept it)."""
    rows = _live_at_peak(live_range_text)
    position = re.search(r"Live ranges at (\d+) \(peak\)", live_range_text)
    shapes, ops = {}, {}
    for line in hlo_text.splitlines():
        match = _ARRAY_DEF.match(line)
        if match:
            shapes[match.group(1)] = (match.group(2), [int(d) for d in match.group(3).split(",") if d])
            op = _OP_NAME.search(line)
            if op:
                ops[match.group(1)] = op.group(1)
    buffers = []
    for name, size in sorted(rows, key=lambda r: -r[1])[:top]:
        dtype, shape = shapes.get(name, ("", []))
        buffers.append({"name": name, "dtype": dtype, "shape": shape, "bytes": size, "op": ops.get(name, "")})
    return {"position": int(position.group(1)) if position else None, "bytes": sum(size for _, size in rows),
            "count": len(rows), "buffers": buffers}


_PASS_THROUGH = {"bitcast", "reshape", "transpose", "copy", "broadcast", "slice", "dynamic-slice"}
_GATHERS = {"all-gather", "all-gather-start", "all-gather-done"}


def _hlo_values(hlo_text: str) -> tuple[dict, dict]:
    """``({name: (dtype, op, operands, called computation)}, {computation: root name})`` of an HLO module."""
    values, roots, computation = {}, {}, None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and "=" not in stripped.split("(")[0]:
            computation = stripped.split("(")[0].split()[-1].lstrip("%")
            continue
        match = _VALUE_INSTRUCTION.match(line)
        if not match:
            continue
        root, name, dtype, _, op, rest = match.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0]) if op != "parameter" else []
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        values[name] = (dtype, op, operands, called.group(1) if called else None)
        if root and computation:
            roots[computation] = name
    return values, roots


def _f32_from_bf16(name: str, values: dict, roots: dict, depth: int = 0) -> bool:
    """Whether value ``name`` is an f32 convert of a bf16 value (directly, through layout-only ops, or as the
    root of the fusion that defines it)."""
    if name not in values or depth > 8:
        return False
    dtype, op, operands, called = values[name]
    if op == "convert":
        return dtype == "f32" and bool(operands) and values.get(operands[0], ("",))[0] == "bf16"
    if op in _PASS_THROUGH and operands:
        return _f32_from_bf16(operands[0], values, roots, depth + 1)
    if op in ("fusion", "call") and called in roots:
        return dtype == "f32" and _f32_from_bf16(roots[called], values, roots, depth + 1)
    return False


def _dot_result(name: str, values: dict, roots: dict) -> bool:
    """Whether ``name`` is made by a dot (directly or as the root of its fusion, e.g. XLA:CPU's YNNPACK
    ``ynn_fusion``)."""
    _, op, _, called = values[name]
    if op == "dot":
        return True
    root = roots.get(called) if op == "fusion" else None
    return root is not None and values.get(root, ("", ""))[1] == "dot"


def f32_copy_bytes(live_range_text: str, hlo_text: str) -> dict:
    """Bytes of the values live at the memory peak that exist in f32 only because XLA:CPU computes bf16 dots in
    f32 (its float normalisation turns each bf16 dot into converts to f32, an f32 dot and a convert back):

    * f32 converts of bf16 values (the dot operands): all their bytes;
    * f32 dot results whose every user makes bf16 (the convert back): half their bytes (an accelerator's dot
      writes the bf16 result, accumulating in f32 on chip);
    * f32 all-gathers: half their bytes (the FSDP weight gathers, which an accelerator performs on the bf16
      weights after the model's cast, while XLA:CPU drops the f32→bf16→f32 round trip and gathers f32).

    Read from XLA's live-range dump (every value live at the peak) and the optimised module (each value's
    defining instruction, a fusion by its root, and its users). Subtracting these bytes from the peak gives the
    same program point without the copies; values the classification does not recognise stay counted, so the
    accelerator-equivalent figure errs high. For programs that compute in bf16 (an f32 model's f32 gathers are
    its own)."""
    live = _live_at_peak(live_range_text)
    values, roots = _hlo_values(hlo_text)
    users: dict[str, list[str]] = {}
    for name, (_, _, operands, _) in values.items():
        for operand in operands:
            users.setdefault(operand, []).append(name)
    converts = dots = gathers = count = 0
    for name, size in live:
        value = values.get(name)
        if value is None or value[0] != "f32":
            continue
        if _f32_from_bf16(name, values, roots):
            converts, count = converts + size, count + 1
        elif value[1] in _GATHERS:
            gathers, count = gathers + size // 2, count + 1
        elif (_dot_result(name, values, roots) and users.get(name)
              and all(values[user][0] == "bf16" for user in users[name])):
            dots, count = dots + size // 2, count + 1
    return {"bytes": converts + dots + gathers, "converts_of_bf16_bytes": converts,
            "f32_dot_results_excess_bytes": dots, "f32_gathers_excess_bytes": gathers,
            "values": count, "live_bytes": sum(size for _, size in live),
            "method": "values live at the peak (XLA live-range dump): f32 converts of bf16 values (whole), f32 dot "
                      "results only converted to bf16 (half), f32 all-gathers (half: bf16 on an accelerator)"}


def live_range_text(dump_dir: str) -> str:
    """XLA's buffer live-range dump of the optimised module in ``dump_dir`` (compiled with ``xla_dump_to``; the
    shortest-named of several), ``""`` when there is none."""
    found = sorted(glob.glob(f"{dump_dir}/*after_optimizations-live-range.txt"), key=len)
    return Path(found[0]).read_text() if found else ""


def instructions(hlo_text: str, opcodes: set[str]) -> list[tuple[str, str, str]]:
    """``[(%name, output type, opcode)]`` of the instructions of ``hlo_text`` with one output (not a tuple) whose
    opcode is in ``opcodes``, in module order."""
    matches = (_NAMED_INSTRUCTION.match(line) for line in hlo_text.splitlines())
    return [match.groups() for match in matches if match and match.group(3) in opcodes]
