"""Text for people: the failure report of one item and the end-of-run summary table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .comparison import GateResult

REMEDIES = {
    "drop": [
        "Rebuild the sidecar: `quantgate {producer} {registry} --id {id}` and compare again.",
        "Static/QAT: try another calibration method (entropy, percentile) or a calibration set closer to the soak "
        "data.",
        "Exclude the most sensitive nodes (StaticConfig.nodes_to_exclude) or move the entry to a stronger mode "
        "(dynamic -> static -> qat).",
        "Raise quant_accuracy_budget_plcc in {registry} only with a reviewed reason.",
    ],
    "nonfinite": [
        "The int8 graph produces NaN/inf: a scale or zero point is broken, or an op overflowed. Rebuild the sidecar.",
    ],
    "constant": [
        "A constant output carries no signal; a correlation with it is undefined. Rebuild the sidecar and check that "
        "the soak fixture exercises the model (its inputs vary).",
    ],
    "affine": [
        "PLCC ignores gain and offset, so this sidecar would pass a PLCC-only gate. Check the output "
        "quantisation scale/zero point; rebuild the sidecar.",
        "If a gain change is intended, set quant_budget_slope for the entry in {registry}.",
    ],
    "mae": ["The absolute error budget quant_budget_mae is exceeded; rebuild the sidecar or review the budget."],
    "max_abs": ["The worst-case error budget quant_budget_max_abs is exceeded; rebuild the sidecar or review it."],
    "relative": [
        "int8 keeps less than quant_budget_relative of the fp32 correlation with the target. Rebuild the sidecar "
        "(`quantgate {producer} {registry} --id {id}`) or move the entry to a stronger mode.",
    ],
    "lineage": [
        "The sidecar is not quantised from this fp32 model: it is the fp32 file itself, another model, or was built "
        "from an older fp32. Rebuild it: `quantgate {producer} {registry} --id {id}`, then re-pin both hashes.",
    ],
    "labels": [
        "Too many labels (class ids, or argmax of the scores) differ between int8 and fp32. Rebuild the sidecar with "
        "per-channel weights or keep the last layer in fp32 (nodes_to_exclude), or review quant_budget_label_flip.",
    ],
    "speed": [
        "The int8 sidecar is not fast enough for quant_min_speedup on this EP. Dynamic int8 of Conv runs ConvInteger, "
        "often slower than fp32 on CPU: try static (QDQ) quantisation, or review the speed budget.",
    ],
}
PRODUCER = {"dynamic": "ptq-dynamic", "static": "ptq-static", "qat": "qat"}


def _f(value: float | None, digits: int = 6) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def metrics_table(result: GateResult) -> list[str]:
    """Return a fixed-width table of every output's metrics."""
    lines: list[str] = []
    for rep in result.outputs:
        cols = [("int8 vs fp32", rep.vs_fp32)]
        if rep.fp32_vs_target is not None and rep.int8_vs_target is not None:
            cols = [("fp32 vs target", rep.fp32_vs_target), ("int8 vs target", rep.int8_vs_target), *cols]
        head = f"  output {rep.name!r} ({result.compare}, drop {_f(rep.drop)})"
        lines.append(head)
        lines.append("    " + "metric".ljust(12) + "".join(name.rjust(16) for name, _ in cols))
        for label, attr in (("PLCC", "plcc"), ("SROCC", "srocc"), ("KRCC", "krcc"), ("RMSE", "rmse"),
                            ("mean |err|", "mae"), ("max |err|", "max_abs"), ("slope", "slope"),
                            ("intercept", "intercept")):
            lines.append("    " + label.ljust(12) + "".join(_f(getattr(m, attr)).rjust(16) for _, m in cols))
    return lines


def failure_text(result: GateResult, registry: str) -> str:
    """Return the pytest-regressions style report: verdict line, metrics table, remedy."""
    ci = ""
    if result.interval is not None:
        ci = f", {result.interval.level:.0%} CI [{_f(result.interval.low)}, {_f(result.interval.high)}]"
    drop = f"drop {_f(result.drop)} vs budget {result.budget:g}{ci}" if result.drop is not None else "no drop computed"
    lines = [
        f"quantgate FAILED: {result.entry_id} [{result.ep}] mode={result.mode}: {result.reason}",
        f"  {drop}; {result.samples} samples; decision rule: {result.decision}",
    ]
    lines += [f"  also: {text}" for text in result.also]
    lines.append("")
    lines += metrics_table(result)
    for warning in result.warnings:
        lines.append(f"  warning: {warning}")
    diagnosis = result.extra.get("diagnosis_lines")
    if diagnosis:
        lines += ["", *diagnosis]
    lines += ["", "What to do:"]
    for remedy in REMEDIES.get(result.kind, REMEDIES["drop"]):
        text = remedy.format(producer=PRODUCER.get(result.mode, "ptq-static"), registry=registry, id=result.entry_id)
        lines.append(f"  - {text}")
    return "\n".join(lines)


SUMMARY_COLUMNS = ("id", "EP", "mode", "samples", "drop", "CI", "budget", "headroom", "size", "speed-up", "verdict")


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _ci_cell(row: Mapping[str, Any]) -> str:
    ci = row.get("ci")
    return f"[{ci[0]:.5f}, {ci[1]:.5f}]" if ci else "-"


def _headroom_cell(row: Mapping[str, Any]) -> str:
    value = row.get("headroom")
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"x{value:.1f}"


def summary_lines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Return the summary table: one row per item, sorted by id then EP."""
    rows = list(rows)
    table = [SUMMARY_COLUMNS]
    for row in sorted(rows, key=lambda r: (r["id"], r["ep"])):
        drop = row.get("drop")
        table.append((
            row["id"], row["ep"], row.get("mode", "-"), str(row.get("samples") or "-"),
            "-" if drop is None else f"{drop:.6f}", _ci_cell(row),
            "-" if row.get("budget") is None else f"{row['budget']:g}",
            _headroom_cell(row), _ratio_cell(row.get("size_ratio")), _ratio_cell(row.get("speedup")),
            row["verdict"] + (" (cached)" if row.get("cached") else ""),
        ))
    widths = [max(len(str(r[i])) for r in table) for i in range(len(SUMMARY_COLUMNS))]
    out = ["  ".join(str(cell).ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = [r for r in rows if r["verdict"] != "PASS" and r.get("reason")]
    for row in sorted(notes, key=lambda r: (r["id"], r["ep"])):
        out.append(f"{row['id']} [{row['ep']}] {row['verdict']}: {row['reason']}")
    for row in sorted((r for r in rows if r.get("regenerated")), key=lambda r: (r["id"], r["ep"])):
        out.append(f"{row['id']} [{row['ep']}] regenerated: {row['regenerated']}")
    return out


# fp32 outputs on two EPs may differ by rounding (fused kernels, other reduction orders), not by more than this
# fraction of the output's spread; beyond it the EP computes a different fp32 baseline.
EP_FP32_TOLERANCE = 1e-3


def fp32_disagreement(a: list[float], b: list[float]) -> float:
    """Return max |a − b| over the probe, relative to the spread of ``a``."""
    import numpy as np

    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.size == 0:
        return float("inf")
    spread = float(np.ptp(x)) or 1.0
    return float(np.max(np.abs(x - y)) / spread)


def per_ep_lines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Return a table of drops per EP side by side, flagging fp32 baselines that disagree across EPs."""
    rows = [r for r in rows if r.get("ep") not in (None, "-")]
    eps = sorted({r["ep"] for r in rows}, key=lambda e: ("cpu", "cuda", "openvino").index(e)
                 if e in ("cpu", "cuda", "openvino") else 9)
    if len(eps) < 2:
        return []
    by_id: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        by_id.setdefault(row["id"], {})[row["ep"]] = row
    table = [("id", *eps, "fp32 across EPs")]
    flags: list[str] = []
    for entry_id in sorted(by_id):
        cells = []
        for ep in eps:
            found = by_id[entry_id].get(ep)
            if found is None:
                cells.append("-")
            elif found.get("drop") is None:
                cells.append(found["verdict"])
            else:
                cells.append(f"{found['drop']:.6f} {found['verdict']}")
        probes = {ep: r["fp32_probe"] for ep, r in by_id[entry_id].items() if r.get("fp32_probe")}
        agree = "-"
        if len(probes) >= 2:
            ref_ep = next(iter(sorted(probes)))
            worst = max(fp32_disagreement(probes[ref_ep], p) for ep, p in probes.items() if ep != ref_ep)
            agree = "agree" if worst <= EP_FP32_TOLERANCE else f"DISAGREE ({worst:.2e})"
            if worst > EP_FP32_TOLERANCE:
                flags.append(f"{entry_id}: fp32 outputs differ across EPs by {worst:.2e} of their range "
                             f"(tolerance {EP_FP32_TOLERANCE:g}): the EPs do not compute the same baseline")
        table.append((entry_id, *cells, agree))
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out + flags


def write_json(path: Any, rows: Sequence[Mapping[str, Any]], settings: Any) -> None:
    """Write every item's row (metrics, interval, budget, verdict, provenance) as one JSON document."""
    import json
    from dataclasses import asdict

    from . import __version__
    from .fileio import atomic_write_text

    settings_doc = {k: str(v) if not isinstance(v, (bool, int, float, list, tuple, dict, type(None))) else v
                    for k, v in asdict(settings).items()}
    doc = {
        "format": 1,
        "tool": f"pytest-quantgate {__version__}",
        "registry": str(settings.registry),
        "settings": settings_doc,
        "items": sorted((_without_plot(r) for r in rows), key=lambda r: (r["id"], r["ep"])),
        "totals": {v: sum(r["verdict"] == v for r in rows) for v in ("PASS", "FAIL", "ERROR", "SKIP")},
    }
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


def _without_plot(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("plot", "diagnosis_lines")}


def markdown_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return the summary as a GitHub-flavoured markdown table."""
    icon = {"PASS": "✅ PASS", "FAIL": "❌ FAIL", "ERROR": "⚠️ ERROR", "SKIP": "⏭️ SKIP"}
    out = ["### quantgate", "", "| id | EP | mode | samples | drop | 95% CI | budget | headroom | speed-up | verdict |",
           "|---|---|---|---:|---:|---|---:|---:|---:|---|"]
    for row in sorted(rows, key=lambda r: (r["id"], r["ep"])):
        drop = row.get("drop")
        speed = row.get("speedup")
        out.append("| " + " | ".join([
            f"`{row['id']}`", str(row["ep"]), str(row.get("mode", "-")), str(row.get("samples") or "-"),
            "-" if drop is None else f"{drop:.6f}", _ci_cell(row),
            "-" if row.get("budget") is None else f"{row['budget']:g}", _headroom_cell(row),
            "-" if speed is None else f"x{speed:.2f}", icon.get(row["verdict"], row["verdict"]),
        ]) + " |")
    for row in rows:
        if row["verdict"] != "PASS" and row.get("reason"):
            reason = str(row["reason"]).replace("|", "\\|")
            out.append(f"\n- **{row['id']} [{row['ep']}] {row['verdict']}**: {reason}")
    return out


def append_github_summary(rows: Sequence[Mapping[str, Any]]) -> None:
    """Append the markdown summary to ``$GITHUB_STEP_SUMMARY`` when GitHub Actions sets it."""
    import os

    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target or not rows:
        return
    with open(target, "a", encoding="utf-8") as handle:
        handle.write("\n".join(markdown_lines(rows)) + "\n")


# --- the command line's report (quantgate measure and pre-commit) ------------------------------------------

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
EXIT_NOTHING = 5  # like pytest: nothing was gated


def out(text: str = "") -> None:
    """Print a line of the command line's report."""
    print(text, flush=True)


def err(text: str) -> None:
    """Print an error line to stderr."""
    import sys

    print(text, file=sys.stderr, flush=True)


def report_outcomes(outcomes: Sequence[Any], registry_path: str, json_out: Path | None) -> int:
    """Print failure reports, errors, skips, the summary tables and the counts; return measure's exit code."""
    for outcome in outcomes:
        if outcome.status == "fail" and outcome.result is not None:
            out(failure_text(outcome.result, registry_path))
            out()
        elif outcome.status in ("error", "skip"):
            out(f"quantgate {outcome.status.upper()}: {outcome.entry_id} [{outcome.ep}]: {outcome.message}")
    if outcomes:
        out()
        rows = [o.to_row() for o in outcomes]
        for line in [*summary_lines(rows), "", *per_ep_lines(rows)]:
            out(line)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("pass", "fail", "error", "skip")}
    out(f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, {counts['skip']} skipped")
    if json_out is not None:
        from .fileio import atomic_write_text

        atomic_write_text(json_out, json.dumps([o.to_row() for o in outcomes], indent=2) + "\n")
    if counts["error"]:
        return EXIT_ERROR
    return EXIT_FAIL if counts["fail"] else EXIT_PASS
