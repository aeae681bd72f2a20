"""One self-contained HTML page for a gate run: the summary table, and per item its metrics and plots.

The page has no external resources: CSS is inline and plots are base64 PNGs drawn with matplotlib (the ``html``
extra). Without matplotlib the page still has every table, and says how to get the plots. It renders the run's
typed outcomes (:class:`~pytest_quantgate.records.Outcome`, each with its :class:`GateResult` when one was measured).
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..fileio import atomic_write_text
from ..records import Diagnosis, PlotData
from .reports import CLASS_ROWS, THRESHOLD_ROWS, class_rows, focus_text, ranges_text, threshold_rows

if TYPE_CHECKING:
    from ..records import (
        DetectionReport,
        EmbeddingReport,
        Interval,
        LabelReport,
        Outcome,
        OutputReport,
        ThresholdReport,
    )

MISSING_PLOTS = "Plots need matplotlib: pip install pytest-quantgate[html]"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 6px;padding-top:10px;border-top:1px solid #d8dee4}
h3{font-size:14px;margin:14px 0 4px}
.meta{color:#57606a;margin-bottom:14px}.note{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;
border-radius:4px;display:inline-block;margin:6px 0}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:3px 6px;text-align:right;white-space:nowrap}
.scroll{overflow-x:auto;max-width:100%}table.summary{font-size:13px}
td.id{white-space:normal;overflow-wrap:anywhere;max-width:260px;text-align:left}
th{background:#f6f8fa;font-weight:600}td.l,th.l{text-align:left}
td.wrap{white-space:normal;text-align:left;max-width:640px;overflow-wrap:anywhere}
.v{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px;color:#fff}
.PASS{background:#1a7f37}.FAIL{background:#cf222e}.ERROR{background:#8250df}.SKIP{background:#6e7781}
.OTHER{background:#9a6700}.reason{margin:4px 0 8px;overflow-wrap:anywhere}
img.plot{max-width:100%;height:auto;border:1px solid #d0d7de;margin:4px 0}
code{background:#f6f8fa;padding:0 3px;border-radius:3px;overflow-wrap:anywhere}
ul{margin:4px 0 8px 18px;padding:0}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;max-width:100%}figcaption{font-weight:600;margin:6px 0 0;overflow-wrap:anywhere}
.focus{background:#ffebe9;border:1px solid #ff8182;padding:4px 10px;border-radius:4px;display:inline-block;
margin:4px 0 8px;overflow-wrap:anywhere}.over{color:#cf222e;font-weight:600}.sub{color:#57606a;margin:2px 0}
"""


def write_html(path: Path, outcomes: Sequence[Outcome], title: str) -> None:
    """Write the report page to ``path`` (atomically, readable as the umask allows); plots need matplotlib."""
    atomic_write_text(path, render_html(outcomes, title), "HTML report")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def render_html(outcomes: Sequence[Outcome], title: str, *, plots: bool | None = None) -> str:
    """Return the page as a string; ``plots=None`` draws plots when matplotlib can be imported."""
    if plots is None:
        plots = _have_matplotlib()
    outcomes = sorted(outcomes, key=lambda o: (o.entry_id, o.ep))
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.verdict] = counts.get(o.verdict, 0) + 1
    tally = ", ".join(f"{n} {v}" for v, n in sorted(counts.items())) or "no items"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<div class="meta">{len(outcomes)} item(s): {escape(tally)}</div>',
    ]
    if not plots and any(o.result is not None and (o.result.plot is not None or o.result.focus_plot is not None)
                         for o in outcomes):
        parts.append(f'<div class="note">{escape(MISSING_PLOTS)}</div>')
    parts.append(_summary_table(outcomes))
    for i, o in enumerate(outcomes):
        parts.append(_item_section(o, i, plots))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        return False
    return True


# ---- cells -------------------------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 6) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    x = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return "-"


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"×{value:.2f}"


def _badge(outcome: Outcome) -> str:
    verdict = outcome.verdict
    css = verdict if verdict in ("PASS", "FAIL", "ERROR", "SKIP") else "OTHER"
    return f'<span class="v {css}">{escape(verdict)}</span>'


def _anchor(index: int) -> str:
    return f"item-{index}"


def _summary_table(outcomes: Sequence[Outcome]) -> str:
    head = ("id", "EP", "mode", "samples", "drop", "CI", "budget", "headroom", "verdict", "fp32 size", "int8 size",
            "fp32 ms", "int8 ms", "speedup")
    out = ['<div class="scroll"><table class="summary"><thead><tr>' + "".join(
        f'<th class="l">{h}</th>' if h in ("id", "EP", "mode", "verdict") else f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"]
    for i, o in enumerate(outcomes):
        r = o.result
        t = r.timing if r is not None else None
        ci = r.interval if r is not None else None
        headroom = r.headroom if r is not None else None
        cells = [
            f'<td class="id"><a href="#{_anchor(i)}">{escape(o.entry_id)}</a></td>',
            f'<td class="l">{escape(o.ep or "-")}</td>',
            f'<td class="l">{escape(o.mode or "-")}</td>',
            f"<td>{r.samples if r is not None else '-'}</td>",
            f"<td>{_fmt(r.drop if r is not None else None)}</td>",
            f"<td>{'-' if ci is None else f'[{_fmt(ci.low, 5)}, {_fmt(ci.high, 5)}]'}</td>",
            f"<td>{'-' if r is None else f'{r.budget:g}'}</td>",
            f"<td>{'-' if headroom is None else ('inf' if math.isinf(headroom) else f'×{headroom:.1f}')}</td>",
            f'<td class="l">{_badge(o)}</td>',
            f"<td>{_bytes(t.fp32_bytes if t else None)}</td>",
            f"<td>{_bytes(t.int8_bytes if t else None)}</td>",
            f"<td>{_ms(t.fp32_ms if t else None)}</td>",
            f"<td>{_ms(t.int8_ms if t else None)}</td>",
            f"<td>{_ratio(t.speedup if t else None)}</td>",
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


# ---- per item ----------------------------------------------------------------------------------------------------

METRICS = (("PLCC", "plcc"), ("SROCC", "srocc"), ("KRCC", "krcc"), ("RMSE", "rmse"), ("mean |err|", "mae"),
           ("max |err|", "max_abs"), ("slope", "slope"), ("intercept", "intercept"))


def _item_section(outcome: Outcome, index: int, plots: bool) -> str:
    r = outcome.result
    title = f"{outcome.entry_id} [{outcome.ep or '-'}]"
    out = [f'<h2 id="{_anchor(index)}">{escape(title)} {_badge(outcome)}</h2>']
    if outcome.message:
        out.append(f'<div class="reason">{escape(outcome.message)}</div>')
    if r is not None and r.focus is not None:
        out.append(f'<div class="focus"><b>Failing:</b> {escape(focus_text(r.focus))}</div>')
    extra = [*r.also, *(f"warning: {w}" for w in r.warnings)] if r is not None else []
    extra += [f"note: {n}" for n in outcome.notes]
    if outcome.regenerated:
        extra.append(f"regenerated: {outcome.regenerated}")
    if extra:
        out.append("<ul>" + "".join(f"<li>{escape(x)}</li>" for x in extra) + "</ul>")
    if r is None:
        return "\n".join(out)
    for output in r.outputs:
        out.append(_output_section(output))
    figures = [(caption, plot) for caption, plot in ((f"Whole output {r.plot.output}" if r.plot else "", r.plot),
                                                     (f"What failed: {r.focus_plot.output}" if r.focus_plot else "",
                                                      r.focus_plot))
               if plot is not None]
    if figures and plots:
        out.append('<div class="plots">')
        for caption, plot in figures:
            try:
                drawn = _plots(plot, outcome.entry_id)
            except Exception as exc:  # a bad plot never loses the page
                drawn = f'<div class="note">plot not drawn: {escape(type(exc).__name__)}: {escape(str(exc))}</div>'
            out.append(f"<figure>{drawn}<figcaption>{escape(caption)}</figcaption></figure>")
        out.append("</div>")
    elif figures:
        out.append(f'<div class="note">{escape(MISSING_PLOTS)}</div>')
    if r.diagnosis is not None:
        out.append(_diagnosis(r.diagnosis))
    return "\n".join(out)


def _output_section(output: OutputReport) -> str:
    """Return one output's heading, its metrics table, and its labels, threshold, detection and embedding blocks."""
    head = f"output <code>{escape(output.name)}</code>"
    judged_apart = output.labels is not None or output.detections is not None or output.embedding is not None
    values = not (judged_apart and output.vs_fp32.n == 0)  # no values compared: no PLCC table to show
    if values:
        head += f", drop {_fmt(output.drop)}"
    out = [f"<h3>{head}</h3>"]
    if output.ignored:
        out.append('<div class="sub">ignored: reported, not judged</div>')
    if output.mask is not None:
        # the record names the mask but not mask_invert, so the words stay true either way
        out.append(f'<div class="sub">masked by <code>{escape(output.mask)}</code>: only the positions it marks '
                   f"are counted</div>")
    if values:
        out.append(_metrics_table(output))
    if output.labels is not None:
        out.append(_labels(output.labels))
    if output.thresholds is not None:
        out.append(_thresholds(output.thresholds))
    if output.detections is not None:
        out.append(_detections(output.detections))
    if output.embedding is not None:
        out.append(_embedding(output.embedding))
    return "\n".join(out)


def _metrics_table(output: OutputReport) -> str:
    cols = [(label, m) for label, m in (("fp32 vs target", output.fp32_vs_target),
                                        ("int8 vs target", output.int8_vs_target), ("int8 vs fp32", output.vs_fp32))
            if m is not None]
    rows = "".join(
        f'<tr><th class="l">{escape(label)}</th>' + "".join(f"<td>{_fmt(getattr(m, key))}</td>" for _, m in cols)
        + "</tr>" for label, key in METRICS)
    return ("<table><thead><tr><th class=\"l\">metric</th>"
            + "".join(f"<th>{escape(name)}</th>" for name, _ in cols) + f"</tr></thead><tbody>{rows}</tbody></table>")


def _pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2%}"


def _interval(interval: Interval | None, percent: bool = True) -> str:
    """Return ``[low, high]`` of an interval ("-" without one)."""
    if interval is None:
        return "-"
    if percent:
        return f"[{_pct(interval.low)}, {_pct(interval.high)}]"
    return f"[{_fmt(interval.low)}, {_fmt(interval.high)}]"


def _level(interval: Interval | None) -> str:
    return "" if interval is None else f", {interval.level:.0%} CI "


def _labels(labels: LabelReport) -> str:
    """Return the agreement line (and the accuracy line against a class-id target) of a label or argmax view."""
    ci = labels.interval
    bounds = "" if ci is None else f"{_level(ci)}{_interval(ci)}"
    out = [f'<div class="sub"><code>{escape(labels.what)}</code>: int8 differs from fp32 on '
           f"{_pct(labels.flip_rate)} of elements, budget {labels.budget:g}{escape(bounds)}</div>"]
    if labels.fp32_accuracy is not None and labels.int8_accuracy is not None:
        acc = labels.accuracy_interval
        acc_bounds = "" if acc is None else f"{_level(acc)}{_interval(acc)}"
        budget = "" if labels.budget_accuracy is None else f", budget {labels.budget_accuracy:g}"
        out.append(f'<div class="sub">accuracy vs target: fp32 {_pct(labels.fp32_accuracy)}, int8 '
                   f"{_pct(labels.int8_accuracy)}, drop {_pct(labels.fp32_accuracy - labels.int8_accuracy)}"
                   f"{escape(acc_bounds)}{escape(budget)}</div>")
    return "\n".join(out)


def _thresholds(report: ThresholdReport) -> str:
    """Return the decisions table: each channel crossing the threshold, worst flip share first."""
    crossing, silent = threshold_rows(report)
    worst = "" if report.worst_channel is None else f"; worst channel {report.worst_channel}"
    out = [f'<div class="sub">threshold {report.threshold:g} (decisions x &gt;= {report.threshold:g}), budget '
           f"{report.budget:g} flip share per channel{worst}; flip share: elements over the threshold in exactly "
           f"one model / over it in either</div>"]
    if crossing:
        out.append('<table class="thresholds"><thead><tr><th class="l">channel</th><th>over in either</th>'
                   "<th>disagree</th><th>fp32 over</th><th>int8 over</th><th>flip share</th><th>CI</th></tr>"
                   "</thead><tbody>")
        for c in crossing[:THRESHOLD_ROWS]:
            over = ' class="over"' if c.flip_share > report.budget else ""
            out.append(f'<tr><td class="l">{c.channel}</td><td>{c.either}</td><td>{c.disagree}</td>'
                       f"<td>{c.fp32_over}</td><td>{c.int8_over}</td><td{over}>{_pct(c.flip_share)}</td>"
                       f"<td>{_interval(c.interval)}</td></tr>")
        out.append("</tbody></table>")
        if len(crossing) > THRESHOLD_ROWS:
            out.append(f'<div class="sub">… {len(crossing) - THRESHOLD_ROWS} more channels</div>')
    if silent:
        out.append(f'<div class="sub">{len(silent)} channel(s) never reach {report.threshold:g} in either model: '
                   f"{escape(ranges_text(silent))}</div>")
    return "\n".join(out)


def _detections(report: DetectionReport) -> str:
    """Return the detection totals, missed/extra shares against their budgets, and the per-class table."""
    missed_over = ' class="over"' if report.missed > report.budget_missed else ""
    extra_over = ' class="over"' if report.extra > report.budget_extra else ""
    out = [f'<div class="sub">detections: fp32 {report.fp32}, int8 {report.int8}, matched {report.matched}</div>',
           f'<div class="sub">missed <span{missed_over}>{_pct(report.missed)}</span> of fp32 detections'
           f"{_level(report.missed_interval)}{_interval(report.missed_interval) if report.missed_interval else ''}"
           f", budget {report.budget_missed:g}</div>",
           f'<div class="sub">extra <span{extra_over}>{_pct(report.extra)}</span> of int8 detections'
           f"{_level(report.extra_interval)}{_interval(report.extra_interval) if report.extra_interval else ''}"
           f", budget {report.budget_extra:g}</div>"]
    classes = class_rows(report)
    if classes:
        out.append('<table class="classes"><thead><tr><th class="l">class</th><th>fp32</th><th>int8</th>'
                   "<th>matched</th><th>missed</th><th>missed CI</th><th class=\"l\">judged</th></tr></thead><tbody>")
        for c in classes[:CLASS_ROWS]:
            over = ' class="over"' if c.judged and c.missed > report.budget_missed else ""
            out.append(f'<tr><td class="l">{c.cls}</td><td>{c.fp32}</td><td>{c.int8}</td><td>{c.matched}</td>'
                       f"<td{over}>{_pct(c.missed)}</td><td>{_interval(c.missed_interval)}</td>"
                       f'<td class="l">{"yes" if c.judged else "no"}</td></tr>')
        out.append("</tbody></table>")
        if len(classes) > CLASS_ROWS:
            out.append(f'<div class="sub">… {len(classes) - CLASS_ROWS} more classes</div>')
    return "\n".join(out)


def _embedding(report: EmbeddingReport) -> str:
    """Return the embedding lines: mean cosine distance and neighbour recall against their budgets."""
    ci = "" if report.interval is None else f"{_level(report.interval)}{_interval(report.interval, False)}"
    out = [f'<div class="sub">embedding along axis {report.axis}: mean 1 − cos {_fmt(report.cosine_distance)}'
           f"{ci}, budget {report.budget_cosine:g}</div>"]
    if report.neighbours_recall is not None:
        budget = "" if report.budget_neighbours is None else f", minimum {report.budget_neighbours:g}"
        out.append(f'<div class="sub">nearest neighbours: recall@{report.neighbours_k} '
                   f"{_fmt(report.neighbours_recall, 4)} over {report.neighbours_samples} samples{budget}</div>")
    return "\n".join(out)


def _diagnosis(diag: Diagnosis) -> str:
    samples = f", samples {', '.join(map(str, diag.samples))}" if diag.samples else ""
    out = [f"<h3>Diagnosis ({escape(diag.format)} sidecar, {diag.feeds} feed(s){escape(samples)}; SQNR in dB, "
           f"lower is worse)</h3>"]
    tensors = (*diag.worst, *diag.outputs)
    if tensors:
        out.append('<table><thead><tr><th class="l">kind</th><th class="l">tensor</th><th class="l">node</th>'
                   "<th>local dB</th><th>vs fp32 dB</th></tr></thead><tbody>")
        for t in tensors:
            out.append(f'<tr><td class="l">{escape(t.kind)}</td>'
                       f'<td class="l"><code>{escape(t.tensor)}</code></td>'
                       f'<td class="l">{escape(t.node or "-")}</td>'
                       f"<td>{_fmt(t.sqnr_db, 1)}</td><td>{_fmt(t.xmodel_db, 1)}</td></tr>")
        out.append("</tbody></table>")
    if diag.suggestion:
        out.append(f'<div class="reason"><b>Suggestion:</b> {escape(diag.suggestion)}</div>')
    if diag.notes:
        out.append("<ul>" + "".join(f"<li>{escape(n)}</li>" for n in diag.notes) + "</ul>")
    return "\n".join(out)


# ---- plots -------------------------------------------------------------------------------------------------------

def _plots(plot: PlotData, item: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fp32, int8 = np.asarray(plot.fp32, dtype=np.float64), np.asarray(plot.int8, dtype=np.float64)
    target = np.asarray(plot.target if plot.target is not None else (), dtype=np.float64)
    edges, counts = np.asarray(plot.hist_edges, dtype=np.float64), np.asarray(plot.hist_counts, dtype=np.float64)
    n = min(fp32.size, int8.size)
    fp32, int8 = fp32[:n], int8[:n]
    has_target = target.size == n and n > 0
    has_hist = edges.size == counts.size + 1 and counts.size > 0
    panels = (n > 0) + has_target + has_hist
    if panels == 0:
        return '<div class="note">no plot data</div>'
    fig = Figure(figsize=(4.3 * panels, 3.6), dpi=96, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    name = plot.output
    k = 0
    size = 6 if n > 500 else 12
    if n > 0:
        ax = axes[k]
        k += 1
        ax.scatter(fp32, int8, s=size, alpha=0.5, color="#0969da", edgecolors="none", rasterized=True)
        _identity(ax, fp32, int8)
        ax.set_xlabel("fp32")
        ax.set_ylabel("int8")
        ax.set_title(f"int8 vs fp32 ({name})", fontsize=10)
    if has_target:
        ax = axes[k]
        k += 1
        ax.scatter(target, fp32, s=size, alpha=0.35, color="#0969da", edgecolors="none", label="fp32",
                   rasterized=True)
        ax.scatter(target, int8, s=size, alpha=0.35, color="#fb8500", edgecolors="none", label="int8",
                   rasterized=True)
        _identity(ax, target, np.concatenate([fp32, int8]))
        ax.set_xlabel("target")
        ax.set_ylabel("prediction")
        legend = ax.legend(loc="upper left", fontsize=8, markerscale=2)
        for handle in legend.legend_handles:
            handle.set_alpha(1.0)
        ax.set_title("vs target", fontsize=10)
    if has_hist:
        ax = axes[k]
        widths = np.diff(edges)
        ax.bar(edges[:-1], counts, width=widths, align="edge", color="#8250df", edgecolor="white", linewidth=0.3)
        ax.axvline(0.0, color="#1d232a", linewidth=0.8, linestyle="--")
        ax.set_xlabel("int8 − fp32")
        ax.set_ylabel("count")
        note = f" ({plot.hist_clipped} tail values in end bins)" if plot.hist_clipped else ""
        ax.set_title(f"error histogram{note}", fontsize=10)
    for ax in axes:
        ax.tick_params(labelsize=8)
        ax.grid(True, linewidth=0.3, alpha=0.6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    alt = escape(f"plots of {item} output {name}", quote=True)
    return f'<img class="plot" alt="{alt}" src="data:image/png;base64,{data}">'


def _identity(ax: Any, x: np.ndarray, y: np.ndarray) -> None:
    both = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
    if both.size == 0:
        return
    lo, hi = float(both.min()), float(both.max())
    if lo == hi:
        lo, hi = lo - 1.0, hi + 1.0
    ax.plot([lo, hi], [lo, hi], color="#1d232a", linewidth=0.8, linestyle="--", label="y = x")
