"""Sharded soak sets: measure part K of N of every fixture, write its mergeable state, then merge N parts and decide.

The split
    A shard is a contiguous run of whole *chunks* of the unsharded run: the first chunk (one run's worth of
    samples), then chunks of :func:`~.gate.chunk_rows` samples. Every model run therefore sees exactly the batch
    it sees unsharded (dynamic quantisation's activation scale is taken per run, so another batch would give
    other int8 outputs), and reads stay sequential (a shard seeks to its first sample). Shard K takes chunks
    ``ceil((K-1)·C/N) .. ceil(K·C/N)`` of the C chunks, so shard 1 always holds the first; with more shards than
    chunks some shards hold no sample, and still write a state so the merge can tell that none is missing.

Exactness
    Every shard runs the first chunk (a probe, for shards past the first) to learn the chunk size and the shifts
    the unsharded run sums around (:meth:`~..engine.comparison.Collector.adopt`). Below the unit cap a sample's
    rows are then the same float64 numbers whichever shard folded them, and the merge places them (the other
    shards hold zeros there), so the merged drops, intervals and verdicts equal the unsharded ones bit for bit.
    Past the cap a block's sums are the sums of the same samples in another order: equal to ~1e-15 relative.

The state file
    An ``.npz`` archive (no pickles) of numeric arrays plus a JSON header stored as bytes in the member
    ``header``: the format and its version, the entry (as written in the registry, and its sha256), the EP,
    the sha256 of the fp32 model, the int8 sidecar and the fixture, every option that changes the statistics,
    the shard K/N and its samples, the chunk grid, the output plans and every accumulator's arrays. Per-unit
    arrays (units × channels × 13 float64, count rows) hold only the shard's own samples below the cap, so the N
    files together hold one state; past the cap each holds every block. Nothing is kept per element.

The merge
    :func:`merge_states` groups states by (entry, EP), refuses missing, duplicated or mismatched parts and
    unknown formats (:class:`~..errors.ShardError`, naming the files and the field), merges the collectors in
    shard order and decides with :meth:`Collector.decide`, so the verdict text is the unsharded one. Speed is
    the sum of the shards' run times over the sum of their samples (the probes excluded). A failing merge has no
    diagnosis (it needs the models and the fixture: run the unsharded gate for it) and no plots.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.comparison import Collector, CompareOptions, OutputPlan, plan_outputs
from ..errors import EpUnavailableError, FixtureError, InputError, ShardError
from ..fileio import atomic_path
from ..io.npz import load as load_member
from ..io.npz import read_members
from ..io.registry import Entry, Registry, entry_from_source
from ..io.soak import TensorSpec
from ..records import GateResult, LineageRecord, Outcome, Provenance, Timing, dump, load
from ..settings import Settings
from .gate import (
    Prepared,
    _check_finite,
    _Clock,
    _first_line,
    _run_chunk,
    apply_lineage,
    check_speed,
    chunk_rows,
    kernel_warning,
    lineage_record,
    prepare,
    provenance,
    run_batch,
)

FORMAT = "quantgate-shard-state"
VERSION = 1
HEADER = "header"  # the member holding the JSON header, as uint8 bytes
# a state holds at most STATE_BYTES of rows per accumulator set (streaming.STATE_BYTES) plus bounded extras
MAX_STATE_BYTES = 4 << 30


@dataclass(frozen=True)
class Grid:
    """The chunks of the unsharded run: ``first`` samples, then ``rows`` at a time, over ``samples``."""

    samples: int
    first: int
    rows: int

    def cuts(self) -> list[tuple[int, int]]:
        """Return every chunk's sample range [lo, hi)."""
        head = [(0, min(self.first, self.samples))] if self.samples else []
        return head + [(lo, min(lo + self.rows, self.samples)) for lo in range(self.first, self.samples, self.rows)]

    def part(self, k: int, n: int) -> tuple[int, int]:
        """Return the samples [a, b) of shard ``k`` of ``n``: chunks ceil((k-1)·C/n) .. ceil(k·C/n)."""
        cuts = self.cuts()
        lo, hi = -(-(k - 1) * len(cuts) // n), -(-k * len(cuts) // n)
        if lo >= hi:
            a = cuts[lo][0] if lo < len(cuts) else self.samples
            return a, a
        return cuts[lo][0], cuts[hi - 1][1]


@dataclass(frozen=True)
class Part:
    """What one shard measured: the statistics of samples [start, stop), its run times and the chunk grid."""

    collector: Collector
    clock: _Clock
    grid: Grid
    start: int
    stop: int


def state_name(entry_id: str, ep: str, k: int, n: int) -> str:
    """Return the file name of a shard state (ids may hold characters a file name should not)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", entry_id)
    return f"{safe}.{ep}.shard-{k}-of-{n}.npz"


def measure_part(p: Prepared, settings: Settings, k: int, n: int) -> Part:
    """Stream shard ``k`` of ``n`` of the fixture through both models into the statistics (no decision)."""
    plans = plan_outputs(p.entry, p.fixture, p.inputs, p.outputs)

    def collector() -> Collector:
        return Collector(p.entry, plans, p.plan.samples, settings.seed, str(p.fixture.path))

    def fold(into: Collector, start: int, block: Mapping[str, np.ndarray], target: np.ndarray | None,
             parts: Sequence[Any]) -> None:
        for part in parts:  # as gate.measure folds them
            span = part.rows
            into.add(start + span.start, {name: v[span] for name, v in block.items()},
                     None if target is None else target[span], part.fp32, part.int8)

    mine = collector()
    batch = run_batch(p)
    clock = _Clock()
    # the first chunk, as the unsharded run reads it: it fixes the chunk size and the shifts of the sums
    head = next(iter(p.fixture.chunks(batch or 1)), None)
    if head is None:
        return Part(mine, clock, Grid(0, 0, 1), 0, 0)
    block, target = head
    _check_finite(block, 0, p.fixture.path)
    count = int(next(iter(block.values())).shape[0])
    probe_clock = _Clock()
    parts = _run_chunk(p, block, batch, probe_clock, 0)
    grid = Grid(p.plan.samples, count, chunk_rows(parts, count, settings, batch))
    start, stop = grid.part(k, n)
    if start == stop:
        return Part(mine, clock, grid, start, stop)
    at = start
    if start == 0:  # the first chunk is this shard's own
        fold(mine, 0, block, target, parts)
        clock = probe_clock
        at = count
    else:  # another shard's: it only gives the shifts (its run time is not this shard's)
        probe = collector()
        fold(probe, 0, block, target, parts)
        mine.adopt(probe)
    if at < stop:
        for block, target in p.fixture.chunks(grid.rows, at):
            _check_finite(block, at, p.fixture.path)
            fold(mine, at, block, target, _run_chunk(p, block, batch, clock, at))
            at += int(next(iter(block.values())).shape[0])
            if at >= stop:
                break
    clock.samples = stop - start
    return Part(mine, clock, grid, start, stop)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def plan_to_json(plan: OutputPlan) -> dict[str, Any]:
    """Return an output plan as JSON data (the merge has no model to plan from)."""
    data: dict[str, Any] = {f.name: getattr(plan, f.name) for f in fields(plan) if f.name != "spec"}
    data["detections"] = None if plan.detections is None else dict(plan.detections)
    spec = plan.spec
    data["spec"] = {"name": spec.name, "type": spec.type, "shape": list(spec.shape), "known_rank": spec.known_rank}
    return data


def plan_from_json(data: Mapping[str, Any]) -> OutputPlan:
    """Return the output plan :func:`plan_to_json` wrote."""
    spec = data["spec"]
    rest = {k: v for k, v in data.items() if k != "spec"}
    return OutputPlan(TensorSpec(str(spec["name"]), str(spec["type"]), tuple(spec["shape"]), bool(spec["known_rank"])),
                      **rest)


def shard_state(registry: Registry, p: Prepared, settings: Settings, part: Part, k: int,
                n: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Return (header, arrays) of one shard's state file."""
    c = part.collector
    per_sample = c.units is not None and not c.units.blocked
    collected, arrays = c.state(slice(part.start, part.stop) if per_sample else None)
    lineage = lineage_record(p)
    header = {
        "format": FORMAT, "version": VERSION,
        "entry": {"id": p.entry.id, "index": p.entry.index, "source": dict(p.entry.source),
                  "sha256": _digest(dict(p.entry.source))},
        "registry": str(registry.path), "ep": p.ep,
        "files": {"fp32": {"path": str(p.fp32_path), "sha256": p.fp32_sha256},
                  "int8": {"path": str(p.int8_path), "sha256": p.int8_sha256},
                  "fixture": {"path": str(p.fixture.path), "sha256": p.fixture.sha256}},
        # every option that changes the statistics or the decision
        "options": {"seed": settings.seed, "bootstrap": settings.bootstrap, "confidence": settings.confidence,
                    "decision": settings.decision, "strict": settings.strict,
                    "int8_precision": settings.ep_options.int8_precision, "batch_size": settings.batch_size,
                    "run_batch": run_batch(p), "sequential": settings.sequential},
        "shard": {"k": k, "n": n}, "samples": p.plan.samples, "range": [part.start, part.stop],
        "grid": {"first": part.grid.first, "rows": part.grid.rows},
        "plans": [plan_to_json(plan) for plan in c.plans],
        "collector": collected,
        "timing": {"fp32_s": part.clock.fp32, "int8_s": part.clock.int8, "runs": part.clock.runs,
                   "samples": part.clock.samples, "fp32_bytes": p.fp32_path.stat().st_size,
                   "int8_bytes": p.int8_path.stat().st_size, "batch": run_batch(p)},
        "lineage": None if lineage is None else dump(lineage),
        "kernel_warning": kernel_warning(p, settings),
        "provenance": dump(provenance(p, settings)),
    }
    return header, arrays


def write_state(target: Path, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> int:
    """Write a state file atomically; return its size in bytes."""
    payload = np.frombuffer(json.dumps(header, sort_keys=True, allow_nan=False).encode(), dtype=np.uint8)
    members: dict[str, Any] = {HEADER: payload, **{name: np.ascontiguousarray(v) for name, v in arrays.items()}}
    with atomic_path(target, ".npz", what="shard state") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **members)
    return target.stat().st_size


@dataclass(frozen=True)
class State:
    """One shard state file as read: its header and arrays."""

    path: Path
    header: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]

    @property
    def k(self) -> int:
        """Return the shard's number K (1-based)."""
        return int(self.header["shard"]["k"])

    @property
    def key(self) -> tuple[str, str]:
        """Return (entry id, EP): the parts of one verdict."""
        return str(self.header["entry"]["id"]), str(self.header["ep"])


def read_state(path: Path) -> State:
    """Read a state file (numeric arrays only, headers checked before reading); refuse another format."""
    try:
        members = read_members(path, MAX_STATE_BYTES)
    except FixtureError as exc:
        raise ShardError(f"{path}: not a quantgate shard state ({exc})") from None
    try:
        header = json.loads(bytes(np.asarray(load_member(members[HEADER]))).decode("utf-8"))
    except (KeyError, ValueError, UnicodeDecodeError):
        raise ShardError(f"{path}: not a quantgate shard state (no readable {HEADER!r} member)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise ShardError(f"{path}: not a quantgate shard state (format {found!r}, expected {FORMAT!r})")
    if header.get("version") != VERSION:
        raise ShardError(f"{path}: shard state format version {header.get('version')!r}; this quantgate reads "
                         f"version {VERSION}: write the shards and merge them with the same quantgate release")
    arrays = {name: np.array(load_member(m)) for name, m in members.items() if name != HEADER}
    return State(path, header, arrays)


def _identity(header: Mapping[str, Any]) -> dict[str, Any]:
    """Return every field the parts of one verdict must share, by the name an error gives it."""
    files = header["files"]
    fields_ = {"entry id": header["entry"]["id"], "entry (its registry fields, sha256)": header["entry"]["sha256"],
               "EP": header["ep"], "fp32 model sha256": files["fp32"]["sha256"],
               "int8 sidecar sha256": files["int8"]["sha256"], "soak fixture sha256": files["fixture"]["sha256"],
               "shard count N": header["shard"]["n"], "fixture samples": header["samples"],
               "chunk grid": header["grid"]}
    fields_.update({f"option {name}": value for name, value in sorted(header["options"].items())})
    return fields_


def check_parts(states: Sequence[State]) -> list[State]:
    """Return the parts of one verdict in shard order; refuse mismatched, duplicated or missing ones."""
    first = states[0]
    want = _identity(first.header)
    for other in states[1:]:
        got = _identity(other.header)
        for name in sorted(set(want) | set(got)):
            if want.get(name) != got.get(name):
                raise ShardError(f"shard states of different runs: {name} is {want.get(name)!r} in {first.path} and "
                                 f"{got.get(name)!r} in {other.path}; merge the N states of one sharded run")
    entry_id, ep = first.key
    n = int(first.header["shard"]["n"])
    by_k: dict[int, State] = {}
    for state in states:
        if state.k in by_k:
            raise ShardError(f"{entry_id} [{ep}]: shard {state.k}/{n} is given twice: {by_k[state.k].path} and "
                             f"{state.path}")
        by_k[state.k] = state
    missing = [k for k in range(1, n + 1) if k not in by_k]
    if missing:
        have = ", ".join(str(k) for k in sorted(by_k))
        raise ShardError(f"{entry_id} [{ep}]: shard(s) {', '.join(str(k) for k in missing)} of {n} missing (given: "
                         f"{have}); merge every shard's state")
    return [by_k[k] for k in range(1, n + 1)]


def merged_collector(parts: Sequence[State]) -> tuple[Entry, Collector]:
    """Return the entry and the merged statistics of the parts of one verdict (in shard order)."""
    head = parts[0].header
    entry = entry_from_source(head["entry"]["source"], int(head["entry"]["index"]))
    plans = tuple(plan_from_json(plan) for plan in head["plans"])
    where = str(head["files"]["fixture"]["path"])
    try:
        collectors = [Collector.from_state(entry, plans, int(head["samples"]), int(head["options"]["seed"]), where,
                                           state.header["collector"], state.arrays) for state in parts]
        return entry, reduce(Collector.merge, collectors)
    except (KeyError, ValueError, TypeError) as exc:
        raise ShardError(f"{parts[0].path}: a damaged shard state ({type(exc).__name__}: {exc})") from None


def _timing(parts: Sequence[State]) -> Timing:
    """Return the speed of the shards together: their summed run times over their summed samples."""
    t = [state.header["timing"] for state in parts]
    fp32, int8 = sum(float(x["fp32_s"]) for x in t), sum(float(x["int8_s"]) for x in t)
    samples = max(sum(int(x["samples"]) for x in t), 1)
    return Timing(fp32_bytes=int(t[0]["fp32_bytes"]), int8_bytes=int(t[0]["int8_bytes"]),
                  fp32_ms=fp32 * 1000.0 / samples, int8_ms=int8 * 1000.0 / samples,
                  speedup=fp32 / int8 if int8 > 0 else None, batch=t[0]["batch"], runs=sum(int(x["runs"]) for x in t))


def decide_parts(parts: Sequence[State]) -> Outcome:
    """Merge the parts of one verdict and decide, as gate.run_one does after measuring (no diagnosis)."""
    head = parts[0].header
    entry, collector = merged_collector(parts)
    ep = str(head["ep"])
    opts = head["options"]
    # --quantgate-sequential: every shard ran to its end (a stop on one shard's samples is not a look at the
    # sequence); the merged state is one look, decided with the confidence sequence's interval
    sequential = bool(opts.get("sequential", False))
    options = CompareOptions(bootstrap=int(opts["bootstrap"]), seed=int(opts["seed"]),
                             confidence=float(opts["confidence"]),
                             decision="three-way" if sequential else str(opts["decision"]),
                             strict=bool(opts["strict"]), sequential=sequential)
    try:
        result: GateResult = collector.decide(ep, options)
    except InputError as exc:
        return Outcome(entry.id, ep, entry.mode, "error", str(exc))
    lineage = None if head["lineage"] is None else load(LineageRecord, head["lineage"])
    files = head["files"]
    result = apply_lineage(result, lineage, Path(files["fp32"]["path"]).name, Path(files["int8"]["path"]).name)
    warning = next((state.header["kernel_warning"] for state in parts if state.header["kernel_warning"]), None)
    if warning:
        result = replace(result, warnings=(str(warning), *result.warnings))
    result = replace(result, timing=_timing(parts), provenance=load(Provenance, head["provenance"]))
    result = check_speed(result, entry)
    if options.strict and result.needed_samples is not None:
        return Outcome(entry.id, ep, entry.mode, "error", f"{head['registry']}: entry {entry.id!r}: "
                       f"{result.warnings[-1]} (--quantgate-strict)", result)
    return Outcome(entry.id, ep, entry.mode, "pass" if result.passed else "fail", result.reason, result)


def merge_states(paths: Sequence[Path]) -> tuple[list[Outcome], str]:
    """Read every state, group them by (entry, EP), check and merge each group, decide; return (outcomes, registry).

    Raises ShardError for an unreadable, unknown, mismatched, duplicated or missing part.
    """
    if not paths:
        raise ShardError("no shard state given")
    groups: dict[tuple[str, str], list[State]] = {}
    for path in paths:
        state = read_state(Path(path))
        groups.setdefault(state.key, []).append(state)
    outcomes = [decide_parts(check_parts(groups[key])) for key in sorted(groups)]
    return outcomes, str(next(iter(groups.values()))[0].header["registry"])


def size_text(size: int) -> str:
    """Return a size in MiB (KiB below one)."""
    return f"{size / (1 << 20):.2f} MiB" if size >= 1 << 20 else f"{size / 1024:.1f} KiB"


def run_shard(registry: Registry, entry: Entry, ep: str, settings: Settings, *, run_id: str = "") -> Outcome:
    """Measure this run's shard of one (entry, EP) and write its state; every problem becomes an error outcome.

    A shard run never rebuilds the sidecar (N jobs would gate N builds): it gates the pinned file on disk.
    """
    from ..engine.logcapture import capture_logs

    del run_id  # a shard writes no sidecar and caches nothing
    with capture_logs() as captured:
        outcome = _run_shard(registry, entry, ep, settings)
    lines = captured.summary().lines()
    return replace(outcome, log=tuple(lines)) if lines else outcome


def _run_shard(registry: Registry, entry: Entry, ep: str, settings: Settings) -> Outcome:
    assert settings.shard is not None
    k, n = settings.shard
    try:
        p = prepare(registry, entry, ep, settings)
        part = measure_part(p, settings, k, n)
        header, arrays = shard_state(registry, p, settings, part, k, n)
        target = settings.shard_dir / state_name(entry.id, ep, k, n)
        size = write_state(target, header, arrays)
    except EpUnavailableError as exc:
        if settings.strict_ep:
            return Outcome(entry.id, ep, entry.mode, "error", f"{exc} (--quantgate-strict-ep)")
        return Outcome(entry.id, ep, entry.mode, "skip", str(exc))
    except InputError as exc:
        return Outcome(entry.id, ep, entry.mode, "error", str(exc))
    except Exception as exc:  # one entry never takes the run down
        import traceback

        return Outcome(entry.id, ep, entry.mode, "error", f"{registry.path}: entry {entry.id!r} ({entry.location}): "
                       f"unexpected {type(exc).__name__}: {_first_line(exc)}", traceback=traceback.format_exc())
    span = f"samples {part.start}..{part.stop - 1}" if part.stop > part.start else "no sample"
    return Outcome(entry.id, ep, entry.mode, "pass", f"shard {k}/{n} of {entry.id}: state written to {target} "
                   f"({size_text(size)}; {span} of {p.plan.samples}); `quantgate merge-shards` decides")
