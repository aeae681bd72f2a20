"""Text for people: the failure report of one item and the end-of-run summary table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analysis.qgraph import format_db
from ..records import (
    ClassDetections,
    DetectionReport,
    Diagnosis,
    EmbeddingReport,
    Focus,
    GateResult,
    Interval,
    LabelReport,
    OutputReport,
    ThresholdChannel,
    ThresholdReport,
    dump,
)

if TYPE_CHECKING:
    from ..records import Outcome

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
    "rebuild": [
        "This run rebuilt the sidecar and its bytes differ from int8_sha256 in a way the regeneration rule does not "
        "accept without review (docs/regeneration.md). Compare the rebuilt file with the pinned one; if it is "
        "right, `quantgate pin {registry} --id {id}` records it, else restore the pinned file.",
    ],
    "accuracy": [
        "The int8 sidecar's top-1 accuracy against the class-id target drops by more than quant_outputs "
        "budget_accuracy. Rebuild it with per-channel weights or keep the last layer in fp32 (nodes_to_exclude), "
        "or review the budget.",
    ],
    "labels": [
        "Too many labels (class ids, or argmax of the scores) differ between int8 and fp32. Rebuild the sidecar with "
        "per-channel weights or keep the last layer in fp32 (nodes_to_exclude), or review quant_budget_label_flip.",
    ],
    "threshold": [
        "Too many of the output's decisions (score >= quant_outputs threshold) flip between fp32 and int8 in the "
        "channel named above: the scores near the threshold moved. Keep the head's last layers in fp32 (the Sigmoid "
        "or Softmax and the Conv/Gemm/Concat feeding it, StaticConfig.nodes_to_exclude) and rebuild "
        "(`quantgate {producer} {registry} --id {id}`).",
        "Quantise weights per channel (per_channel) so a small-range score channel keeps its own scale, or "
        "calibrate on samples whose scores cross the threshold.",
        "Review quant_outputs budget_threshold_flip (or threshold_channels: which channels are decisions) for this "
        "output in {registry} only with a reviewed reason.",
    ],
    "detections": [
        "int8 misses (or adds) too many of fp32's detections. Keep the detector head in fp32: the class-score "
        "Sigmoid and the Concat of boxes and scores, with the Conv/Gemm feeding them (StaticConfig.nodes_to_exclude)"
        ", then rebuild: `quantgate {producer} {registry} --id {id}`.",
        "Quantise weights per channel (per_channel): box coordinates and class scores share the head's tensor but "
        "not its range, so one per-tensor scale rounds the small class scores away.",
        "Review quant_outputs detections budget_missed / budget_extra (or min_class_detections for a rare class) "
        "by name in {registry} only with a reviewed reason.",
    ],
    "embedding": [
        "The int8 embeddings point elsewhere than fp32's (mean 1 − cos over budget) or reorder the nearest "
        "neighbours. Keep the final projection and normalisation (Gemm/MatMul, LayerNormalization, "
        "ReduceL2/Div) in fp32 with StaticConfig.nodes_to_exclude, quantise weights per channel, and rebuild: "
        "`quantgate {producer} {registry} --id {id}`.",
        "Review quant_outputs budget_cosine / budget_neighbours for this output by name in {registry} only with a "
        "reviewed reason.",
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
    """Return a fixed-width table of every output's metrics, with its threshold, detection and embedding blocks."""
    lines: list[str] = []
    for rep in result.outputs:
        judged_apart = rep.labels is not None or rep.detections is not None or rep.embedding is not None
        if judged_apart and rep.vs_fp32.n == 0:  # no values compared: judged by agreement, detections, cosine
            head = f"  output {rep.name!r}" + (f" ({_agreement(rep.labels)})" if rep.labels is not None else "")
            lines.append(head)
            lines += _output_notes(rep)
        else:
            cols = [("int8 vs fp32", rep.vs_fp32)]
            if rep.fp32_vs_target is not None and rep.int8_vs_target is not None:
                cols = [("fp32 vs target", rep.fp32_vs_target), ("int8 vs target", rep.int8_vs_target), *cols]
            lines.append(f"  output {rep.name!r} ({result.compare}, drop {_f(rep.drop)})")
            lines += _output_notes(rep)
            lines.append("    " + "metric".ljust(12) + "".join(name.rjust(16) for name, _ in cols))
            for label, attr in (("PLCC", "plcc"), ("SROCC", "srocc"), ("KRCC", "krcc"), ("RMSE", "rmse"),
                                ("mean |err|", "mae"), ("max |err|", "max_abs"), ("slope", "slope"),
                                ("intercept", "intercept")):
                lines.append("    " + label.ljust(12) + "".join(_f(getattr(m, attr)).rjust(16) for _, m in cols))
            if rep.labels is not None:
                lines.append(f"    {_agreement(rep.labels)}")
        if rep.thresholds is not None:
            lines += threshold_lines(rep.thresholds)
        if rep.detections is not None:
            lines += detection_lines(rep.detections)
        if rep.embedding is not None:
            lines += embedding_lines(rep.embedding)
    return lines


def _output_notes(rep: OutputReport) -> list[str]:
    """Return the lines saying an output is not judged, or counted only where its mask marks a position."""
    notes = []
    if rep.ignored:
        notes.append("    (ignored: reported, not judged)")
    if rep.mask is not None:
        # the record names the mask but not mask_invert, so the words stay true either way
        notes.append(f"    (masked by {rep.mask!r}: only the positions it marks are counted)")
    return notes


def _ci(interval: Interval | None, percent: bool = False) -> str:
    """Return ``, 95% CI [low, high]`` (empty without an interval)."""
    if interval is None:
        return ""
    low, high = (f"{interval.low:.2%}", f"{interval.high:.2%}") if percent else (_f(interval.low), _f(interval.high))
    return f", {interval.level:.0%} CI [{low}, {high}]"


def ranges_text(values: Sequence[int]) -> str:
    """Return sorted ints as ``0-3, 5, 7-9``."""
    out: list[str] = []
    ordered = sorted(set(values))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(out)


def _table(rows: Sequence[Sequence[str]], left: int = 1, indent: str = "      ") -> list[str]:
    """Return rows as a fixed-width table: the first ``left`` columns left-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        out.append(indent + "  ".join(cells).rstrip())
        if k == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return out


THRESHOLD_ROWS = 8
CLASS_ROWS = 10


def threshold_rows(report: ThresholdReport) -> tuple[list[ThresholdChannel], list[int]]:
    """Return the channels that cross the threshold (worst flip share first) and those that never do."""
    crossing = sorted((c for c in report.channels if c.either > 0),
                      key=lambda c: (-c.flip_share, -c.disagree, c.channel))
    return crossing, [c.channel for c in report.channels if c.either == 0]


def threshold_lines(report: ThresholdReport) -> list[str]:
    """Return the threshold block: each crossing channel's flips (worst first, capped) and the silent ones."""
    crossing, silent = threshold_rows(report)
    worst = f"; worst channel {report.worst_channel}" if report.worst_channel is not None else ""
    out = [f"    threshold {report.threshold:g} (decisions x >= {report.threshold:g}), budget {report.budget:g} flip "
           f"share per channel{worst}",
           "    flip share: elements over the threshold in exactly one model / over it in either"]
    if crossing:
        level = next((c.interval.level for c in crossing if c.interval is not None), None)
        rows = [("channel", "over in either", "disagree", "fp32 over", "int8 over", "flip share",
                 "CI" if level is None else f"{level:.0%} CI", "vs budget")]
        for c in crossing[:THRESHOLD_ROWS]:
            ci = "-" if c.interval is None else f"[{c.interval.low:.2%}, {c.interval.high:.2%}]"
            rows.append((str(c.channel), str(c.either), str(c.disagree), str(c.fp32_over), str(c.int8_over),
                         f"{c.flip_share:.2%}", ci, "OVER" if c.flip_share > report.budget else "ok"))
        out += _table(rows)
        if len(crossing) > THRESHOLD_ROWS:
            out.append(f"      … {len(crossing) - THRESHOLD_ROWS} more channels")
    if silent:
        out.append(f"      {len(silent)} channel(s) never reach {report.threshold:g} in either model: "
                   f"{ranges_text(silent)}")
    return out


def class_rows(report: DetectionReport) -> list[ClassDetections]:
    """Return the per-class rows, most missed detections first."""
    return sorted(report.classes, key=lambda c: (-(c.fp32 - c.matched), -c.missed, c.cls))


def detection_lines(report: DetectionReport) -> list[str]:
    """Return the detections block: totals, missed and extra shares against their budgets, the worst classes."""
    out = [f"    detections: fp32 {report.fp32}, int8 {report.int8}, matched {report.matched}",
           f"    missed {report.missed:.2%} of fp32 detections{_ci(report.missed_interval, True)}, budget "
           f"{report.budget_missed:g}",
           f"    extra {report.extra:.2%} of int8 detections{_ci(report.extra_interval, True)}, budget "
           f"{report.budget_extra:g}"]
    classes = class_rows(report)
    if classes:
        rows = [("class", "fp32", "int8", "matched", "missed", "missed CI", "judged")]
        for c in classes[:CLASS_ROWS]:
            ci = "-" if c.missed_interval is None else f"[{c.missed_interval.low:.2%}, {c.missed_interval.high:.2%}]"
            rows.append((str(c.cls), str(c.fp32), str(c.int8), str(c.matched), f"{c.missed:.2%}", ci,
                         "yes" if c.judged else "no"))
        out += _table(rows)
        if len(classes) > CLASS_ROWS:
            out.append(f"      … {len(classes) - CLASS_ROWS} more classes")
    return out


def embedding_lines(report: EmbeddingReport) -> list[str]:
    """Return the embedding block: mean cosine distance and neighbour recall against their budgets."""
    out = [f"    embedding along axis {report.axis}: mean 1 − cos {report.cosine_distance:.6f}"
           f"{_ci(report.interval)}, budget {report.budget_cosine:g}"]
    if report.neighbours_recall is not None:
        budget = "" if report.budget_neighbours is None else f", minimum {report.budget_neighbours:g}"
        out.append(f"    nearest neighbours: recall@{report.neighbours_k} {report.neighbours_recall:.4f} over "
                   f"{report.neighbours_samples} samples{budget}")
    return out


def focus_text(focus: Focus) -> str:
    """Return what failed in words: ``output 'det', class 7``."""
    text = f"output {focus.output!r}"
    if focus.what:
        return f"{text}, {focus.what}"
    if focus.channels:
        along = "" if focus.channel_axis is None else f" along axis {focus.channel_axis}"
        noun = "channel" if len(focus.channels) == 1 else "channels"
        return f"{text}, {noun} {ranges_text(focus.channels)}{along}"
    return text


def _agreement(labels: LabelReport) -> str:
    """Return e.g. ``labels: int8 differs from fp32 on 2.10% of elements, budget 0.01, 95% CI [...]``."""
    ci = labels.interval
    bounds = f", {ci.level:.0%} CI [{_f(ci.low)}, {_f(ci.high)}]" if ci is not None else ""
    text = (f"{labels.what}: int8 differs from fp32 on {labels.flip_rate:.2%} of elements, budget "
            f"{labels.budget:g}{bounds}")
    if labels.fp32_accuracy is not None and labels.int8_accuracy is not None:
        acc = labels.accuracy_interval
        acc_bounds = f", {acc.level:.0%} CI [{acc.low:.4%}, {acc.high:.4%}]" if acc is not None else ""
        budget = f", budget {labels.budget_accuracy:g}" if labels.budget_accuracy is not None else ""
        text += (f"; accuracy vs target: fp32 {labels.fp32_accuracy:.4%}, int8 {labels.int8_accuracy:.4%}, drop "
                 f"{labels.fp32_accuracy - labels.int8_accuracy:.4%}{acc_bounds}{budget}")
    return text


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
    if result.sequential is not None:
        lines.append(f"  {sequential_text(result)}")
    if result.focus is not None:
        lines.append(f"  failing: {focus_text(result.focus)}")
    lines += [f"  also: {text}" for text in result.also]
    lines.append("")
    lines += metrics_table(result)
    for warning in result.warnings:
        lines.append(f"  warning: {warning}")
    if result.diagnosis is not None:
        lines += ["", *diagnosis_lines(result.diagnosis)]
    lines += ["", "What to do:"]
    for remedy in REMEDIES.get(result.kind, REMEDIES["drop"]):
        text = remedy.format(producer=PRODUCER.get(result.mode, "ptq-static"), registry=registry, id=result.entry_id)
        lines.append(f"  - {text}")
    return "\n".join(lines)


def _clip(text: str, width: int = 48) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def diagnosis_lines(diagnosis: Diagnosis) -> list[str]:
    """Return the failure report's diagnosis block: a fixed-width table of the worst tensors and a suggestion."""
    samples = f", samples {list(diagnosis.samples)}" if diagnosis.samples else ""
    out = [f"Diagnosis ({diagnosis.format} sidecar, {diagnosis.feeds} feed(s){samples}; SQNR in dB, lower is worse):"]
    rows = [("kind", "tensor", "node", "local dB", "vs fp32 dB")]
    for t in (*diagnosis.worst, *diagnosis.outputs):
        rows.append((t.kind, _clip(t.tensor), _clip(t.node or "-"), format_db(t.sqnr_db), format_db(t.xmodel_db)))
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, r in enumerate(rows):
            cells = [c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))]
            out.append("    " + "  ".join(cells).rstrip())
            if i == 0:
                out.append("    " + "  ".join("-" * w for w in widths))
    else:
        out.append("    (no tensor could be compared)")
    if diagnosis.suggestion:
        out.append(f"  Suggestion: {diagnosis.suggestion}")
    out += [f"  note: {n}" for n in diagnosis.notes]
    return out


SUMMARY_COLUMNS = ("id", "EP", "mode", "samples", "drop", "CI", "budget", "headroom", "size", "speed-up", "verdict")


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _ci_cell(result: GateResult | None) -> str:
    ci = result.interval if result is not None else None
    return f"[{ci.low:.5f}, {ci.high:.5f}]" if ci else "-"


def _samples_cell(result: GateResult | None) -> str:
    """Return the samples a verdict used: ``320/2000`` when a sequential run stopped early."""
    if result is None:
        return "-"
    seq = result.sequential
    return f"{seq.samples_used}/{seq.samples_planned}" if seq is not None else str(result.samples)


def sequential_text(result: GateResult) -> str:
    """Return how a sequential run ended (empty for a fixed-sample run)."""
    seq = result.sequential
    if seq is None:
        return ""
    how = "stopped early" if seq.stopped_early else "ran the whole fixture"
    return (f"sequential: {how} after {seq.samples_used} of {seq.samples_planned} samples ({seq.share:.0%}), "
            f"{seq.looks} look(s) from {seq.first_look} samples on; {seq.method}")


def _headroom_cell(result: GateResult | None) -> str:
    value = result.headroom if result is not None else None
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"x{value:.1f}"


def _order(outcomes: Iterable[Outcome]) -> list[Outcome]:
    return sorted(outcomes, key=lambda o: (o.entry_id, o.ep))


def summary_lines(outcomes: Iterable[Outcome]) -> list[str]:
    """Return the summary table: one row per item, sorted by id then EP."""
    outcomes = _order(outcomes)
    table = [SUMMARY_COLUMNS]
    for o in outcomes:
        r = o.result
        timing = r.timing if r is not None else None
        table.append((
            o.entry_id, o.ep, o.mode, _samples_cell(r),
            "-" if r is None or r.drop is None else f"{r.drop:.6f}", _ci_cell(r),
            "-" if r is None else f"{r.budget:g}", _headroom_cell(r),
            _ratio_cell(timing.size_ratio if timing else None), _ratio_cell(timing.speedup if timing else None),
            o.verdict + (" (cached)" if o.cached else ""),
        ))
    widths = [max(len(str(r[i])) for r in table) for i in range(len(SUMMARY_COLUMNS))]
    out = ["  ".join(str(cell).ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    for o in outcomes:
        if (o.status != "pass" or o.result is None) and o.message:  # a shard's pass says where its state went
            focus = o.result.focus if o.result is not None else None
            failing = f" (failing: {focus_text(focus)})" if focus is not None and o.status == "fail" else ""
            out.append(f"{o.entry_id} [{o.ep}] {o.verdict}: {o.message}{failing}")
    for o in outcomes:
        if o.result is not None and o.result.sequential is not None:
            out.append(f"{o.entry_id} [{o.ep}] {sequential_text(o.result)}")
    for o in outcomes:
        if o.regenerated:
            out.append(f"{o.entry_id} [{o.ep}] regenerated: {o.regenerated}")
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


def per_ep_lines(outcomes: Iterable[Outcome]) -> list[str]:
    """Return a table of drops per EP side by side, flagging fp32 baselines that disagree across EPs."""
    outcomes = [o for o in outcomes if o.ep not in ("", "-")]
    eps = sorted({o.ep for o in outcomes}, key=lambda e: ("cpu", "cuda", "openvino").index(e)
                 if e in ("cpu", "cuda", "openvino") else 9)
    if len(eps) < 2:
        return []
    by_id: dict[str, dict[str, Outcome]] = {}
    for o in outcomes:
        by_id.setdefault(o.entry_id, {})[o.ep] = o
    table = [("id", *eps, "fp32 across EPs")]
    flags: list[str] = []
    for entry_id in sorted(by_id):
        cells = []
        for ep in eps:
            found = by_id[entry_id].get(ep)
            if found is None:
                cells.append("-")
            elif found.result is None or found.result.drop is None:
                cells.append(found.verdict)
            else:
                cells.append(f"{found.result.drop:.6f} {found.verdict}")
        probes = {ep: list(o.result.fp32_probe) for ep, o in by_id[entry_id].items()
                  if o.result is not None and o.result.fp32_probe}
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


REPORT_FORMAT = 2  # 2: items are Outcome.to_json() (the result nested under "result"); 1 held flat row dicts


def report_document(outcomes: Sequence[Outcome], settings: Any) -> dict[str, Any]:
    """Return the JSON report: every item (metrics, interval, budget, verdict, provenance) and the settings."""
    from .. import __version__

    items = []
    for o in _order(outcomes):
        item = o.to_json()
        if item["result"] is not None:
            item["result"]["plot"] = None  # the plots live in the HTML report; the numbers are all here
            item["result"]["focus_plot"] = None
        items.append(item)
    return {
        "format": REPORT_FORMAT,
        "tool": f"pytest-quantgate {__version__}",
        "registry": str(settings.registry),
        "settings": dump(settings),
        "items": items,
        # INCONCLUSIVE (three-way rule) is counted only where it occurs: reports of the other rules keep their shape
        "totals": {v: sum(o.verdict == v for o in outcomes) for v in ("PASS", "FAIL", "ERROR", "SKIP", "INCONCLUSIVE")
                   if v != "INCONCLUSIVE" or any(o.verdict == v for o in outcomes)},
    }


def write_json(path: Any, outcomes: Sequence[Outcome], settings: Any) -> None:
    """Write the JSON report atomically."""
    from ..fileio import atomic_write_text

    atomic_write_text(path, json.dumps(report_document(outcomes, settings), indent=2, allow_nan=False) + "\n",
                      "JSON report")


def markdown_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """Return the summary as a GitHub-flavoured markdown table."""
    icon = {"PASS": "✅ PASS", "FAIL": "❌ FAIL", "ERROR": "⚠️ ERROR", "SKIP": "⏭️ SKIP",
            "INCONCLUSIVE": "❔ INCONCLUSIVE"}
    out = ["### quantgate", "", "| id | EP | mode | samples | drop | 95% CI | budget | headroom | speed-up | verdict |",
           "|---|---|---|---:|---:|---|---:|---:|---:|---|"]
    ordered = _order(outcomes)
    for o in ordered:
        r = o.result
        speed = r.timing.speedup if r is not None and r.timing is not None else None
        out.append("| " + " | ".join([
            f"`{o.entry_id}`", o.ep, o.mode, _samples_cell(r),
            "-" if r is None or r.drop is None else f"{r.drop:.6f}", _ci_cell(r),
            "-" if r is None else f"{r.budget:g}", _headroom_cell(r),
            "-" if speed is None else f"x{speed:.2f}", icon.get(o.verdict, o.verdict),
        ]) + " |")
    for o in ordered:
        if o.status != "pass" and o.message:
            reason = o.message.replace("|", "\\|")
            out.append(f"\n- **{o.entry_id} [{o.ep}] {o.verdict}**: {reason}")
    return out


def append_github_summary(outcomes: Sequence[Outcome]) -> None:
    """Append the markdown summary to ``$GITHUB_STEP_SUMMARY`` when GitHub Actions sets it."""
    import os

    from ..errors import WriteError

    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target or not outcomes:
        return
    try:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write("\n".join(markdown_lines(outcomes)) + "\n")
    except OSError as exc:  # appended, not replaced: it may hold a part of the table
        raise WriteError(f"{target}: cannot append the summary to $GITHUB_STEP_SUMMARY: "
                         f"{exc.strerror or exc}; the step summary may be incomplete") from None


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


def report_outcomes(outcomes: Sequence[Outcome], registry_path: str, json_out: Path | None) -> int:
    """Print failure reports, errors, skips, the summary tables and the counts; return measure's exit code."""
    for outcome in outcomes:
        if outcome.status == "fail" and outcome.result is not None:
            out(failure_text(outcome.result, registry_path))
            out()
        elif outcome.status in ("error", "skip", "inconclusive"):
            out(f"quantgate {outcome.status.upper()}: {outcome.entry_id} [{outcome.ep}]: {outcome.message}")
    if outcomes:
        out()
        for line in [*summary_lines(outcomes), "", *per_ep_lines(outcomes)]:
            out(line)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("pass", "fail", "error", "skip", "inconclusive")}
    # an INCONCLUSIVE item does not change the exit code (like pytest's xfailed); --strict makes it an error
    out(f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, {counts['skip']} skipped"
        + (f", {counts['inconclusive']} inconclusive" if counts["inconclusive"] else ""))
    if json_out is not None:
        from ..errors import WriteError
        from ..fileio import atomic_write_text

        try:
            atomic_write_text(json_out, json.dumps([o.to_json() for o in _order(outcomes)], indent=2,
                                                   allow_nan=False) + "\n", "JSON report")
        except WriteError as exc:  # the report above stands; the missing file makes the run an error
            err(f"quantgate: error: {exc}")
            return EXIT_ERROR
    if counts["error"]:
        return EXIT_ERROR
    return EXIT_FAIL if counts["fail"] else EXIT_PASS
