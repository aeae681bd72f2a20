"""``quantgate report merge``: join the JSON reports of separate EP jobs into one model × EP table.

A CI matrix gates each execution provider in its own job, and each job writes its own report. The merge reads
them back as typed outcomes (:func:`~pytest_quantgate.records.read_report`), refuses reports that cannot be
compared (an unknown format, other file hashes for the same entry, two different results for one entry on one
EP), puts the EPs side by side with the provenance of each (onnxruntime distribution, EP options, CPU and its
int8-relevant ISA flags, session config), and flags an EP whose drop differs from another EP's for the same
sidecar by more than their bootstrap intervals allow.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from html import escape
from itertools import combinations
from pathlib import Path
from typing import Any

from ..errors import InputError, WriteError
from ..records import Outcome, RecordError, dump, read_report
from .html import _fmt  # one way to write a number in a cell, in both pages

# the report formats this version reads (reports.REPORT_FORMAT); `quantgate measure --json` writes format 2's
# items as a bare list
KNOWN_FORMATS = (2,)
MERGE_FORMAT = 1  # the merged JSON's own format
# a report is a few kB per item; a file far above this is not a report (and would be read whole)
MAX_REPORT_BYTES = 256 * 1024 * 1024
# without a bootstrap interval nothing bounds the noise of a drop: two EPs' point drops count as divergent when
# they differ by more than this share of the entry's budget (the gate's own scale for "a difference that matters")
POINT_TOLERANCE = 0.1
# fp32 outputs on two EPs may differ by rounding (fused kernels, other reduction orders), not by more than this
# fraction of the output's spread (the same tolerance as the per-EP table of one run)
FP32_TOLERANCE = 1e-3
EP_ORDER = ("cpu", "cuda", "openvino")
FILE_FIELDS = ("fp32", "int8", "fixture")
EXIT_PASS, EXIT_FAIL, EXIT_REFUSED = 0, 1, 2


class MergeError(InputError):
    """Reports that cannot be merged: unreadable, of an unknown format, or disagreeing on what they measured."""


@dataclass(frozen=True)
class Source:
    """One report file as read: its path, format and outcomes."""

    path: str
    format: str  # "2", or "2 (item list)" for quantgate measure --json
    tool: str | None
    outcomes: tuple[Outcome, ...]


@dataclass(frozen=True)
class Cell:
    """One entry on one EP: the outcome and the report it came from."""

    outcome: Outcome
    report: str
    also_in: tuple[str, ...] = ()  # further reports holding the identical result (deduplicated)


@dataclass(frozen=True)
class Column:
    """What one EP's results were measured with: the provenance its items share, and the reports they came from."""

    ep: str
    onnxruntime: str
    providers: tuple[str, ...]
    provider_options: Mapping[str, Any]
    session_config: Mapping[str, str]
    cpu: str
    isa: tuple[str, ...]
    machine: str
    python: str
    platform: str
    quantgate: str
    reports: tuple[str, ...]

    def options_text(self) -> str:
        """Return the EP's provider options (the requested EP's first), or ``defaults``."""
        own = [(name, opts) for name, opts in self.provider_options.items() if opts]
        if not own:
            return "defaults"
        return "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(dict(opts).items()))
                         for name, opts in own)

    def session_text(self) -> str:
        """Return the session config entries as ``key=value`` pairs, or ``-``."""
        return ", ".join(f"{k}={v}" for k, v in sorted(self.session_config.items())) or "-"


@dataclass(frozen=True)
class Divergence:
    """Two EPs' results for the same entry and sidecar compared; ``flagged`` ones fail the merge."""

    entry_id: str
    int8_sha256: str
    eps: tuple[str, str]  # the worse first
    kind: str  # "interval" | "point" | "budget_use" | "fp32"
    flagged: bool
    text: str


@dataclass(frozen=True)
class Merged:
    """The merged table: rows of entries, a cell per EP, the EP columns' provenance and the divergences."""

    sources: tuple[Source, ...]
    eps: tuple[str, ...]
    rows: tuple[tuple[str, Mapping[str, Cell]], ...]
    columns: Mapping[str, tuple[Column, ...]]
    divergences: tuple[Divergence, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def exit_code(self) -> int:
        """Return 1 when an item failed or errored or a divergence is flagged, else 0."""
        bad = any(c.outcome.status in ("fail", "error") for _, cells in self.rows for c in cells.values())
        return EXIT_FAIL if bad or any(d.flagged for d in self.divergences) else EXIT_PASS


# --- reading ------------------------------------------------------------------------------------------------------


def read_source(path: str | os.PathLike[str]) -> Source:
    """Return one report file as a Source; raise MergeError naming the file when it is not a report this reads."""
    from ..fileio import read_bounded

    name = str(path)
    raw = read_bounded(path, MAX_REPORT_BYTES, "JSON report", MergeError)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MergeError(f"{name}: not a JSON report: {exc}") from None
    tool = None
    if isinstance(data, list):
        fmt = "2 (item list)"
    elif isinstance(data, dict):
        if data.get("kind") == "quantgate report merge":  # its own "format" counts merges, not gate reports
            raise MergeError(f"{name}: this is a merged table (quantgate report merge --json), not a gate report; "
                             "merge the EP jobs' own reports")
        version = data.get("format")
        if version not in KNOWN_FORMATS:
            told = "it has no 'format' key" if version is None else f"it is format {version!r}"
            if version == 1:
                told += " (flat rows, replaced by format 2: gate again with this version)"
            raise MergeError(f"{name}: unknown report format: {told}; this version of quantgate reads format "
                             f"{', '.join(map(str, KNOWN_FORMATS))}")
        fmt = str(version)
        tool = data.get("tool") if isinstance(data.get("tool"), str) else None
    else:
        raise MergeError(f"{name}: not a quantgate report: expected an object with 'format' and 'items', got "
                         f"{type(data).__name__}")
    try:
        outcomes = tuple(read_report(data))
    except RecordError as exc:
        raise MergeError(f"{name}: not a readable format-{fmt.split()[0]} report: {exc}") from None
    return Source(name, fmt, tool, outcomes)


# --- merging ------------------------------------------------------------------------------------------------------


def ep_key(ep: str) -> tuple[int, str]:
    """Return the sort key of an EP: cpu, cuda, openvino, then any other by name."""
    return (EP_ORDER.index(ep), "") if ep in EP_ORDER else (len(EP_ORDER), ep)


def merge(sources: Sequence[Source]) -> Merged:
    """Return the merged table of ``sources``; raise MergeError when they disagree on what they measured."""
    if not sources:
        raise MergeError("no report to merge")
    formats = {s.format.split()[0] for s in sources}
    if len(formats) > 1:  # only reachable once a second format is known; the items would not mean the same
        raise MergeError("reports of different formats: " + ", ".join(f"{s.path} is format {s.format}"
                                                                      for s in sources))
    _check_hashes(sources)
    cells: dict[tuple[str, str], Cell] = {}
    notes: list[str] = []
    for source in sources:
        for outcome in source.outcomes:
            key = (outcome.entry_id, outcome.ep)
            seen = cells.get(key)
            if seen is None:
                cells[key] = Cell(outcome, source.path)
            elif _comparable(seen.outcome) == _comparable(outcome):
                cells[key] = replace(seen, also_in=(*seen.also_in, source.path))
                notes.append(f"{outcome.entry_id} [{outcome.ep}]: the same result is in {seen.report} and "
                             f"{source.path}; shown once")
            else:
                raise MergeError(f"{outcome.entry_id} [{outcome.ep}] is in two reports with different results: "
                                 f"{seen.report} ({_short(seen.outcome)}) and {source.path} ({_short(outcome)}); "
                                 f"merge one report per EP job")
    eps = tuple(sorted({ep for _, ep in cells}, key=ep_key))
    rows = tuple((entry_id, {ep: c for (i, ep), c in cells.items() if i == entry_id})
                 for entry_id in sorted({i for i, _ in cells}))
    columns = {ep: _columns(ep, [c for (_, e), c in cells.items() if e == ep]) for ep in eps}
    divergences = tuple(d for entry_id, row in rows for d in _divergences(entry_id, row))
    tools = sorted({s.tool for s in sources if s.tool})
    if len(tools) > 1:
        notes.append("the reports come from different versions: " + ", ".join(tools))
    return Merged(tuple(sources), eps, rows, columns, divergences, tuple(notes))


def merge_files(paths: Iterable[str | os.PathLike[str]]) -> Merged:
    """Return the merged table of the report files at ``paths``."""
    return merge([read_source(p) for p in paths])


def _check_hashes(sources: Sequence[Source]) -> None:
    """Refuse two items of the same entry id that name other fp32, int8 or fixture bytes."""
    first: dict[tuple[str, str], tuple[str, str, str]] = {}  # (id, field) -> (sha256, report, ep)
    for source in sources:
        for outcome in source.outcomes:
            prov = outcome.result.provenance if outcome.result is not None else None
            if prov is None:
                continue
            for name in FILE_FIELDS:
                sha = getattr(prov, name).sha256.lower()
                key = (outcome.entry_id, name)
                seen = first.setdefault(key, (sha, source.path, outcome.ep))
                if seen[0] != sha:
                    raise MergeError(
                        f"{outcome.entry_id}: the reports measured different {name} files: {name} sha256 "
                        f"{seen[0]} in {seen[1]} [{seen[2]}], {sha} in {source.path} [{outcome.ep}]; merge only "
                        f"reports of the same commit")


def _comparable(outcome: Outcome) -> Any:
    """Return what two copies of one result must share to count as the same: the verdict and every measure.

    Timing, paths, machine and log vary from run to run of the same job and say nothing about the verdict.
    """
    data = outcome.to_json()
    for key in ("log", "notes", "traceback", "cached"):
        data.pop(key, None)
    result = data.get("result")
    if isinstance(result, dict):
        for key in ("timing", "provenance", "plot", "focus_plot", "diagnosis"):
            result.pop(key, None)
    return data


def _short(outcome: Outcome) -> str:
    """Return ``PASS, drop 0.001520`` for an error message."""
    r = outcome.result
    if r is None or r.drop is None:
        return outcome.verdict
    return f"{outcome.verdict}, drop {r.drop:.6f}"


def _columns(ep: str, cells: Sequence[Cell]) -> tuple[Column, ...]:
    """Return the distinct provenances of one EP's items (one, unless the EP's items ran in different setups)."""
    found: dict[tuple[str, ...], Column] = {}
    for cell in cells:
        r = cell.outcome.result
        if r is None or r.provenance is None:
            continue
        p = r.provenance
        raw = p.system.get("cpu")
        cpu: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        column = Column(
            ep=ep, onnxruntime=p.onnxruntime, providers=p.providers, provider_options=p.provider_options,
            session_config=p.session_config, cpu=str(cpu.get("model", "-")),
            isa=tuple(str(f) for f in cpu.get("isa", ())), machine=str(cpu.get("machine", "-")),
            python=str(p.system.get("python", "-")), platform=str(p.system.get("platform", "-")),
            quantgate=p.quantgate, reports=(cell.report,))
        key = tuple(json.dumps(dump(v), sort_keys=True) for v in (
            column.onnxruntime, column.providers, column.provider_options, column.session_config, column.cpu,
            column.isa, column.machine, column.python, column.platform, column.quantgate))
        seen = found.get(key)
        if seen is None:
            found[key] = column
        elif cell.report not in seen.reports:
            found[key] = replace(seen, reports=(*seen.reports, cell.report))
    return tuple(found.values())


def _digits(a: float, b: float) -> int:
    """Return the decimals that show two significant digits of both drops and tell them apart (at most 8)."""
    small = min((abs(x) for x in (a, b) if x and math.isfinite(x)), default=1.0)
    start = min(8, max(4, 1 - math.floor(math.log10(small))))
    for digits in range(start, 9):
        if f"{a:.{digits}f}" != f"{b:.{digits}f}":
            return digits
    return start


def _divergences(entry_id: str, row: Mapping[str, Cell]) -> list[Divergence]:
    """Return each pair of EPs' comparison for one entry (its hashes agree: checked when reading)."""
    measured = [(ep, row[ep].outcome.result) for ep in sorted(row, key=ep_key)]
    results = [(ep, r) for ep, r in measured if r is not None]
    out: list[Divergence] = []
    for (ep_a, a), (ep_b, b) in combinations(results, 2):
        assert a is not None and b is not None
        sha = a.provenance.int8.sha256 if a.provenance is not None else ""
        if a.drop is not None and b.drop is not None:
            (ep_hi, hi), (ep_lo, lo) = ((ep_a, a), (ep_b, b)) if a.drop >= b.drop else ((ep_b, b), (ep_a, a))
            assert hi.drop is not None and lo.drop is not None
            digits = _digits(hi.drop, lo.drop)
            head = f"{entry_id}: {ep_hi} drop {hi.drop:.{digits}f} vs {ep_lo} {lo.drop:.{digits}f}"
            if hi.interval is not None and lo.interval is not None:
                apart = hi.interval.low > lo.interval.high or lo.interval.low > hi.interval.high
                bounds = (f"{hi.interval.level:.0%} CI [{hi.interval.low:.{digits}f}, {hi.interval.high:.{digits}f}]"
                          f" vs [{lo.interval.low:.{digits}f}, {lo.interval.high:.{digits}f}]")
                text = f"{head}: intervals {'do not overlap' if apart else 'overlap'} ({bounds})"
                out.append(Divergence(entry_id, sha, (ep_hi, ep_lo), "interval", apart, text))
            else:
                missing = " and ".join(ep for ep, r in ((ep_hi, hi), (ep_lo, lo)) if r.interval is None)
                tolerance = POINT_TOLERANCE * max(hi.budget, lo.budget)
                apart = hi.drop - lo.drop > tolerance
                text = (f"{head}: point drops {'differ by more than' if apart else 'within'} "
                        f"{POINT_TOLERANCE:g} × budget ({tolerance:g}); note: no bootstrap interval on {missing}, "
                        "so the point drops were compared")
                out.append(Divergence(entry_id, sha, (ep_hi, ep_lo), "point", apart, text))
        else:
            use_a, use_b = a.budget_use, b.budget_use
            if use_a is not None and use_b is not None:
                (ep_hi, u_hi), (ep_lo, u_lo) = ((ep_a, use_a), (ep_b, use_b)) if use_a >= use_b else \
                    ((ep_b, use_b), (ep_a, use_a))
                text = (f"{entry_id}: {ep_hi} budget use {_share(u_hi)} vs {ep_lo} {_share(u_lo)} (judged by task "
                        "measures, no PLCC drop: compared, not flagged)")
                out.append(Divergence(entry_id, sha, (ep_hi, ep_lo), "budget_use", False, text))
        if a.fp32_probe and b.fp32_probe:
            from .reports import fp32_disagreement

            worst = fp32_disagreement(list(a.fp32_probe), list(b.fp32_probe))
            if worst > FP32_TOLERANCE:
                text = (f"{entry_id}: fp32 outputs of {ep_b} and {ep_a} differ by {worst:.2e} of their range "
                        f"(tolerance {FP32_TOLERANCE:g}): the EPs do not compute the same fp32 baseline")
                out.append(Divergence(entry_id, sha, (ep_b, ep_a), "fp32", True, text))
    return out


def _share(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2%}"


# --- cells --------------------------------------------------------------------------------------------------------


def _ci(cell: Cell) -> str:
    r = cell.outcome.result
    ci = r.interval if r is not None else None
    return "-" if ci is None else f"[{_fmt(ci.low, 5)}, {_fmt(ci.high, 5)}]"


def _drop(cell: Cell) -> str:
    r = cell.outcome.result
    if r is None:
        return "-"
    if r.drop is None:
        use = r.budget_use
        return "-" if use is None else f"use {_share(use)}"  # judged by task measures: the budget it uses
    return _fmt(r.drop)


def _budget(cell: Cell) -> str:
    r = cell.outcome.result
    return "-" if r is None else f"{r.budget:g}"


def _speedup(cell: Cell) -> str:
    r = cell.outcome.result
    value = r.timing.speedup if r is not None and r.timing is not None else None
    return "-" if value is None or math.isnan(value) else f"x{value:.2f}"


def _flagged(merged: Merged) -> set[tuple[str, str]]:
    """Return the (id, EP) cells a flagged divergence names."""
    return {(d.entry_id, ep) for d in merged.divergences if d.flagged for ep in d.eps}


# --- text ---------------------------------------------------------------------------------------------------------

TEXT_COLUMNS = ("id", "EP", "mode", "drop", "CI", "budget", "speed-up", "verdict", "report")


def text_lines(merged: Merged) -> list[str]:
    """Return the merged table for a terminal: a row per (entry, EP), the EP columns' provenance, divergences."""
    flagged = _flagged(merged)
    table = [TEXT_COLUMNS]
    for entry_id, row in merged.rows:
        for ep in sorted(row, key=ep_key):
            cell = row[ep]
            mark = " *" if (entry_id, ep) in flagged else ""
            table.append((entry_id, ep, cell.outcome.mode, _drop(cell), _ci(cell), _budget(cell), _speedup(cell),
                          cell.outcome.verdict + mark, cell.report))
    widths = [max(len(r[i]) for r in table) for i in range(len(TEXT_COLUMNS))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    for entry_id, row in merged.rows:
        for ep in sorted(row, key=ep_key):
            o = row[ep].outcome
            if o.status != "pass" and o.message:
                out.append(f"{entry_id} [{ep}] {o.verdict}: {o.message}")
    out += ["", "Provenance per EP:"]
    for ep in merged.eps:
        columns = merged.columns[ep] or ()
        if not columns:
            out.append(f"  {ep}: no measured item")
        for col in columns:
            out += [f"  {ep}: {col.onnxruntime}, providers {', '.join(col.providers)}; EP options {col.options_text()}",
                    f"    CPU {col.cpu} ({col.machine}), ISA {' '.join(col.isa) or '-'}",
                    f"    session config {col.session_text()}; Python {col.python}; quantgate {col.quantgate}",
                    f"    from {', '.join(col.reports)}"]
    flagged_list = [d for d in merged.divergences if d.flagged]
    others = [d for d in merged.divergences if not d.flagged]
    out.append("")
    if flagged_list:
        out.append(f"Divergences between EPs ({len(flagged_list)}):")
        out += [f"  DIVERGE {d.text}" for d in flagged_list]
    elif len(merged.eps) > 1:
        out.append("No divergence between EPs.")
    out += [f"  compared: {d.text}" for d in others]
    out += [f"note: {n}" for n in merged.notes]
    return out


# --- markdown (the step summary) ----------------------------------------------------------------------------------

ICON = {"PASS": "✅ PASS", "FAIL": "❌ FAIL", "ERROR": "⚠️ ERROR", "SKIP": "⏭️ SKIP"}


def _md(text: str) -> str:
    """Return text safe inside a markdown table cell: no pipe, no newline, no HTML."""
    return escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def markdown_lines(merged: Merged) -> list[str]:
    """Return the merged table as GitHub-flavoured markdown: a row per entry, a column per EP."""
    flagged = _flagged(merged)
    out = ["### quantgate: model × EP", "",
           "| id | mode | " + " | ".join(_md(ep) for ep in merged.eps) + " |",
           "|---|---|" + "---|" * len(merged.eps)]
    for entry_id, row in merged.rows:
        mode = next(iter(row.values())).outcome.mode
        cells = []
        for ep in merged.eps:
            cell = row.get(ep)
            if cell is None:
                cells.append("-")
                continue
            text = (f"{ICON.get(cell.outcome.verdict, cell.outcome.verdict)} {_drop(cell)} {_ci(cell)} "
                    f"/ {_budget(cell)}, {_speedup(cell)}")
            cells.append(f"**{_md(text)} ⚠️ diverges**" if (entry_id, ep) in flagged else _md(text))
        out.append(f"| `{_md(entry_id)}` | {_md(mode)} | " + " | ".join(cells) + " |")
    out += ["", "drop, 95% CI / budget, speed-up (fp32 time / int8 time).", "",
            "| EP | onnxruntime | EP options | CPU | ISA flags | session config | report |",
            "|---|---|---|---|---|---|---|"]
    for ep in merged.eps:
        for col in merged.columns[ep]:
            out.append("| " + " | ".join(_md(x) for x in (
                ep, col.onnxruntime, col.options_text(), f"{col.cpu} ({col.machine})", " ".join(col.isa) or "-",
                col.session_text(), ", ".join(col.reports))) + " |")
    flagged_list = [d for d in merged.divergences if d.flagged]
    if flagged_list:
        out += ["", f"**Divergences between EPs ({len(flagged_list)}):**", ""]
        out += [f"- ⚠️ {_md(d.text)}" for d in flagged_list]
    elif len(merged.eps) > 1:
        out += ["", "No divergence between EPs."]
    for entry_id, row in merged.rows:
        for ep in merged.eps:
            cell = row.get(ep)
            if cell is not None and cell.outcome.status != "pass" and cell.outcome.message:
                out.append(f"\n- **{_md(entry_id)} [{_md(ep)}] {cell.outcome.verdict}**: {_md(cell.outcome.message)}")
    return out


def write_step_summary(merged: Merged) -> str | None:
    """Append the markdown to ``$GITHUB_STEP_SUMMARY``; return the markdown instead when the variable is unset."""
    text = "\n".join(markdown_lines(merged)) + "\n"
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return text
    try:
        with open(target, "a", encoding="utf-8") as handle:  # appended: earlier steps' summaries stay
            handle.write(text)
    except OSError as exc:
        raise WriteError(f"{target}: cannot append the merged table to $GITHUB_STEP_SUMMARY: "
                         f"{exc.strerror or exc}") from None
    return None


# --- JSON ---------------------------------------------------------------------------------------------------------


def merged_document(merged: Merged) -> dict[str, Any]:
    """Return the merged JSON: the reports, per EP the provenance columns, the rows of cells and the divergences."""
    from .. import __version__

    def cell_json(cell: Cell) -> dict[str, Any]:
        o, r = cell.outcome, cell.outcome.result
        return {
            "status": o.status, "verdict": o.verdict, "reason": o.message, "report": cell.report,
            "also_in": list(cell.also_in),
            "drop": dump(r.drop) if r else None, "interval": dump(r.interval) if r else None,
            "budget": dump(r.budget) if r else None, "budget_use": dump(r.budget_use) if r else None,
            "headroom": dump(r.headroom) if r else None, "samples": r.samples if r else None,
            "speedup": dump(r.timing.speedup) if r and r.timing else None,
            "int8_sha256": r.provenance.int8.sha256 if r and r.provenance else None,
        }

    return {
        "format": MERGE_FORMAT,
        "kind": "quantgate report merge",
        "tool": f"pytest-quantgate {__version__}",
        "reports": [{"path": s.path, "format": s.format, "tool": s.tool, "items": len(s.outcomes)}
                    for s in merged.sources],
        "eps": list(merged.eps),
        "columns": {ep: [{k: dump(v) for k, v in vars(col).items()} for col in merged.columns[ep]]
                    for ep in merged.eps},
        "rows": [{"id": entry_id, "mode": next(iter(row.values())).outcome.mode,
                  "cells": {ep: cell_json(row[ep]) for ep in sorted(row, key=ep_key)}}
                 for entry_id, row in merged.rows],
        "divergences": [{"id": d.entry_id, "int8_sha256": d.int8_sha256, "eps": list(d.eps), "kind": d.kind,
                         "flagged": d.flagged, "text": d.text} for d in merged.divergences],
        "notes": list(merged.notes),
        "exit_code": merged.exit_code,
    }


def write_json(path: str | os.PathLike[str], merged: Merged) -> None:
    """Write the merged JSON atomically."""
    from ..fileio import atomic_write_text

    atomic_write_text(path, json.dumps(merged_document(merged), indent=2, allow_nan=False) + "\n",
                      "merged JSON report")


# --- HTML ---------------------------------------------------------------------------------------------------------

MERGE_CSS = """
th.ep{text-align:center;border-bottom:2px solid #57606a}td.prov{white-space:normal;text-align:left;max-width:420px;
font-size:12px;color:#1d232a;background:#f6f8fa;vertical-align:top;overflow-wrap:anywhere}
td.diverge{background:#ffebe9;outline:2px solid #cf222e;outline-offset:-2px}
li.diverge{color:#cf222e;font-weight:600}td.miss{color:#8c959f;text-align:center}
"""
CELL_FIELDS = ("drop", "CI", "budget", "verdict", "speed-up")


def render_html(merged: Merged, title: str = "quantgate: model × EP") -> str:
    """Return one self-contained page: the model × EP table, a provenance row per EP, the divergences."""
    from .html import CSS

    flagged = _flagged(merged)
    eps = merged.eps
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title)}</title><style>{CSS}{MERGE_CSS}</style></head><body>",
             f"<h1>{escape(title)}</h1>",
             f'<div class="meta">{len(merged.rows)} model(s) on {len(eps)} EP(s), from '
             f'{len(merged.sources)} report(s): {escape(", ".join(s.path for s in merged.sources))}</div>',
             '<div class="scroll"><table class="summary merged"><thead>',
             '<tr><th class="l" rowspan="2">id</th><th class="l" rowspan="2">mode</th>'
             + "".join(f'<th class="ep" colspan="{len(CELL_FIELDS)}">{escape(ep)}</th>' for ep in eps) + "</tr>",
             "<tr>" + "".join(f'<th class="{"l" if h == "verdict" else ""}">{h}</th>'
                              for _ in eps for h in CELL_FIELDS) + "</tr>",
             '<tr class="provenance"><th class="l" colspan="2">provenance</th>'
             + "".join(f'<td class="prov" colspan="{len(CELL_FIELDS)}">{_provenance_html(merged.columns[ep])}</td>'
                       for ep in eps) + "</tr>",
             "</thead><tbody>"]
    for entry_id, row in merged.rows:
        mode = next(iter(row.values())).outcome.mode
        cells = [f'<td class="id">{escape(entry_id)}</td>', f'<td class="l">{escape(mode)}</td>']
        for ep in eps:
            cell = row.get(ep)
            if cell is None:
                cells.append(f'<td class="miss" colspan="{len(CELL_FIELDS)}">not in any report</td>')
                continue
            diverges = (entry_id, ep) in flagged
            num = ' class="diverge"' if diverges else ""
            left = ' class="l diverge"' if diverges else ' class="l"'
            verdict = cell.outcome.verdict
            badge = f'<span class="v {verdict if verdict in ICON else "OTHER"}">{escape(verdict)}</span>'
            cells += [f"<td{num}>{escape(v)}</td>" for v in (_drop(cell), _ci(cell), _budget(cell))]
            cells += [f"<td{left}>{badge}</td>", f"<td{num}>{escape(_speedup(cell))}</td>"]
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")
    parts.append('<div class="sub">drop: 1 − PLCC(int8, fp32) (or the share of its budget a task-judged entry '
                 "uses); CI: the bootstrap interval; speed-up: fp32 time / int8 time.</div>")
    flagged_list = [d for d in merged.divergences if d.flagged]
    parts.append("<h2>Divergences between EPs</h2>")
    if merged.divergences:
        parts.append("<ul>" + "".join(
            f'<li class="{"diverge" if d.flagged else "same"}">{escape(d.text)}</li>' for d in merged.divergences)
            + "</ul>")
    if not flagged_list:
        parts.append('<div class="sub">None flagged.</div>')
    problems = [(entry_id, ep, c.outcome) for entry_id, row in merged.rows for ep, c in sorted(
        row.items(), key=lambda kv: ep_key(kv[0])) if c.outcome.status != "pass" and c.outcome.message]
    if problems:
        parts.append("<h2>Not passed</h2><ul>" + "".join(
            f"<li><b>{escape(i)} [{escape(ep)}] {escape(o.verdict)}</b>: {escape(o.message)}</li>"
            for i, ep, o in problems) + "</ul>")
    if merged.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in merged.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _provenance_html(columns: Sequence[Column]) -> str:
    """Return the provenance of one EP's column: runtime, EP options, CPU and ISA flags, session config."""
    if not columns:
        return "no measured item"
    blocks = []
    for col in columns:
        lines = [("onnxruntime", col.onnxruntime), ("providers", ", ".join(col.providers)),
                 ("EP options", col.options_text()), ("CPU", f"{col.cpu} ({col.machine})"),
                 ("ISA", " ".join(col.isa) or "-"), ("session config", col.session_text()),
                 ("Python", col.python), ("quantgate", col.quantgate), ("report", ", ".join(col.reports))]
        blocks.append("<br>".join(f"<b>{escape(k)}</b>: {escape(v)}" for k, v in lines))
    return "<hr>".join(blocks)


def write_html(path: str | os.PathLike[str], merged: Merged) -> None:
    """Write the merged page atomically."""
    from ..fileio import atomic_write_text

    atomic_write_text(path, render_html(merged), "merged HTML report")


# --- the command --------------------------------------------------------------------------------------------------


def run_command(reports: Sequence[Path], json_out: Path | None, html_out: Path | None, step_summary: bool,
                out: Any, err: Any) -> int:
    """Merge ``reports``, print the table, write the outputs asked for; return 0 pass, 1 fail/diverge, 2 refused."""
    try:
        merged = merge_files(reports)
    except MergeError as exc:
        err(f"quantgate report merge: error: {exc}")
        return EXIT_REFUSED
    for line in text_lines(merged):
        out(line)
    if json_out is not None:
        write_json(json_out, merged)
        out(f"merged JSON: {json_out}")
    if html_out is not None:
        write_html(html_out, merged)
        out(f"merged HTML: {html_out}")
    if step_summary:
        printed = write_step_summary(merged)
        if printed is None:
            out("merged table appended to $GITHUB_STEP_SUMMARY")
        else:
            out("")
            out(printed.rstrip("\n"))
    return merged.exit_code
