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

if TYPE_CHECKING:
    from ..records import Outcome, OutputReport

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
    if not plots and any(o.result is not None and o.result.plot is not None for o in outcomes):
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
    extra = [*r.also, *(f"warning: {w}" for w in r.warnings)] if r is not None else []
    extra += [f"note: {n}" for n in outcome.notes]
    if outcome.regenerated:
        extra.append(f"regenerated: {outcome.regenerated}")
    if extra:
        out.append("<ul>" + "".join(f"<li>{escape(x)}</li>" for x in extra) + "</ul>")
    if r is None:
        return "\n".join(out)
    for output in r.outputs:
        out.append(_metrics_table(output))
    if r.plot is not None:
        if plots:
            try:
                out.append(_plots(r.plot, outcome.entry_id))
            except Exception as exc:  # a bad plot never loses the page
                out.append(f'<div class="note">plot not drawn: {escape(type(exc).__name__)}: {escape(str(exc))}</div>')
        else:
            out.append(f'<div class="note">{escape(MISSING_PLOTS)}</div>')
    if r.diagnosis is not None:
        out.append(_diagnosis(r.diagnosis))
    return "\n".join(out)


def _metrics_table(output: OutputReport) -> str:
    cols = [(label, m) for label, m in (("fp32 vs target", output.fp32_vs_target),
                                        ("int8 vs target", output.int8_vs_target), ("int8 vs fp32", output.vs_fp32))
            if m is not None]
    head = f"output <code>{escape(output.name)}</code>, drop {_fmt(output.drop)}"
    rows = "".join(
        f'<tr><th class="l">{escape(label)}</th>' + "".join(f"<td>{_fmt(getattr(m, key))}</td>" for _, m in cols)
        + "</tr>" for label, key in METRICS)
    return (f"<h3>{head}</h3><table><thead><tr><th class=\"l\">metric</th>"
            + "".join(f"<th>{escape(name)}</th>" for name, _ in cols) + f"</tr></thead><tbody>{rows}</tbody></table>")


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
