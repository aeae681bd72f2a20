"""One self-contained HTML page for a gate run: the summary table, and per item its metrics and plots.

The page has no external resources: CSS is inline and plots are base64 PNGs drawn with matplotlib (the ``html``
extra). Without matplotlib the page still has every table, and says how to get the plots. Rows are the summary
rows of the run (``GateResult.to_row()`` plus optional ``plot``, sizes, latencies and ``diagnosis``); any key may
be missing or None.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import atomic_write_text

PLOT_POINTS = 2000
HIST_BINS = 40
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


def plot_data(output: str, fp32: np.ndarray, int8: np.ndarray, target: np.ndarray | None = None, *,
              points: int = PLOT_POINTS, bins: int = HIST_BINS) -> dict[str, Any]:
    """Return the ``plot`` value of a row: at most ``points`` evenly spaced values and the error histogram.

    The histogram counts every element of int8 − fp32, not only the plotted subset.
    """
    ref = np.asarray(fp32, dtype=np.float64).ravel()
    test = np.asarray(int8, dtype=np.float64).ravel()
    index = np.linspace(0, max(ref.size - 1, 0), num=min(points, ref.size)).astype(np.int64)
    err = test - ref
    err = err[np.isfinite(err)]
    clipped = 0
    if err.size:
        # a few outliers would squash the bulk into one bar: clip the 0.1 % tails into the end bins, and say so
        lo, hi = np.percentile(err, [0.1, 99.9])
        if hi > lo:
            clipped = int(np.count_nonzero((err < lo) | (err > hi)))
            err = np.clip(err, lo, hi)
    counts, edges = np.histogram(err, bins=bins) if err.size else (np.zeros(0), np.zeros(0))
    tgt = None
    if target is not None:
        t = np.asarray(target, dtype=np.float64).ravel()
        tgt = [float(v) for v in t[index]] if t.size == ref.size else None
    return {"output": output, "fp32": [float(v) for v in ref[index]], "int8": [float(v) for v in test[index]],
            "target": tgt, "hist_edges": [float(v) for v in edges], "hist_counts": [int(v) for v in counts],
            "hist_clipped": clipped}


def write_html(path: Path, rows: Sequence[Mapping[str, Any]], title: str) -> None:
    """Write the report page to ``path`` (atomically, readable as the umask allows); plots need matplotlib."""
    atomic_write_text(path, render_html(rows, title))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def render_html(rows: Sequence[Mapping[str, Any]], title: str, *, plots: bool | None = None) -> str:
    """Return the page as a string; ``plots=None`` draws plots when matplotlib can be imported."""
    if plots is None:
        plots = _have_matplotlib()
    rows = sorted((r for r in rows if isinstance(r, Mapping)), key=lambda r: (str(r.get("id")), str(r.get("ep"))))
    counts: dict[str, int] = {}
    for row in rows:
        counts[_verdict(row)] = counts.get(_verdict(row), 0) + 1
    tally = ", ".join(f"{n} {v}" for v, n in sorted(counts.items())) or "no items"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<div class="meta">{len(rows)} item(s): {escape(tally)}</div>',
    ]
    if not plots and any(r.get("plot") for r in rows):
        parts.append(f'<div class="note">{escape(MISSING_PLOTS)}</div>')
    parts.append(_summary_table(rows))
    for i, row in enumerate(rows):
        parts.append(_item_section(row, i, plots))
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

def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("inf", "-inf", "Infinity", "-Infinity"):
        return float(value.replace("inity", ""))
    return None


def _fmt(value: Any, digits: int = 6) -> str:
    x = _num(value)
    if x is None:
        return "-" if value is None else escape(str(value))
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _bytes(value: Any) -> str:
    x = _num(value)
    if x is None or math.isinf(x) or math.isnan(x):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return "-"


def _ms(value: Any) -> str:
    x = _num(value)
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def _ratio(value: Any) -> str:
    x = _num(value)
    if x is None or math.isnan(x):
        return "-"
    return "inf" if math.isinf(x) else f"×{x:.2f}"


def _ci(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return f"[{_fmt(value[0], 5)}, {_fmt(value[1], 5)}]"
    return "-"


def _verdict(row: Mapping[str, Any]) -> str:
    return str(row.get("verdict") or "?")


def _badge(row: Mapping[str, Any]) -> str:
    verdict = _verdict(row)
    css = verdict if verdict in ("PASS", "FAIL", "ERROR", "SKIP") else "OTHER"
    return f'<span class="v {css}">{escape(verdict)}</span>'


def _anchor(row: Mapping[str, Any], index: int) -> str:
    return f"item-{index}"


def _summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ("id", "EP", "mode", "samples", "drop", "CI", "budget", "headroom", "verdict", "fp32 size", "int8 size",
            "fp32 ms", "int8 ms", "speedup")
    out = ['<div class="scroll"><table class="summary"><thead><tr>' + "".join(
        f'<th class="l">{h}</th>' if h in ("id", "EP", "mode", "verdict") else f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        budget = _num(row.get("budget"))
        headroom = _num(row.get("headroom"))
        cells = [
            f'<td class="id"><a href="#{_anchor(row, i)}">{escape(str(row.get("id", "?")))}</a></td>',
            f'<td class="l">{escape(str(row.get("ep") or "-"))}</td>',
            f'<td class="l">{escape(str(row.get("mode") or "-"))}</td>',
            f"<td>{escape(str(row.get('samples') if row.get('samples') is not None else '-'))}</td>",
            f"<td>{_fmt(row.get('drop'))}</td>",
            f"<td>{_ci(row.get('ci'))}</td>",
            f"<td>{'-' if budget is None else f'{budget:g}'}</td>",
            f"<td>{'-' if headroom is None else ('inf' if math.isinf(headroom) else f'×{headroom:.1f}')}</td>",
            f'<td class="l">{_badge(row)}</td>',
            f"<td>{_bytes(row.get('fp32_bytes'))}</td>",
            f"<td>{_bytes(row.get('int8_bytes'))}</td>",
            f"<td>{_ms(row.get('fp32_ms'))}</td>",
            f"<td>{_ms(row.get('int8_ms'))}</td>",
            f"<td>{_ratio(row.get('speedup'))}</td>",
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


# ---- per item ----------------------------------------------------------------------------------------------------

METRICS = (("PLCC", "plcc"), ("SROCC", "srocc"), ("KRCC", "krcc"), ("RMSE", "rmse"), ("mean |err|", "mae"),
           ("max |err|", "max_abs"), ("slope", "slope"), ("intercept", "intercept"))


def _item_section(row: Mapping[str, Any], index: int, plots: bool) -> str:
    title = f"{row.get('id', '?')} [{row.get('ep') or '-'}]"
    out = [f'<h2 id="{_anchor(row, index)}">{escape(str(title))} {_badge(row)}</h2>']
    if row.get("reason"):
        out.append(f'<div class="reason">{escape(str(row["reason"]))}</div>')
    extra = [str(x) for x in (row.get("also") or [])] + [f"warning: {w}" for w in (row.get("warnings") or [])]
    if row.get("regenerated"):
        extra.append(f"regenerated: {row['regenerated']}")
    if extra:
        out.append("<ul>" + "".join(f"<li>{escape(x)}</li>" for x in extra) + "</ul>")
    for output in row.get("outputs") or []:
        if isinstance(output, Mapping):
            out.append(_metrics_table(output))
    plot = row.get("plot")
    if isinstance(plot, Mapping) and plot:
        if plots:
            try:
                out.append(_plots(plot, str(row.get("id", ""))))
            except Exception as exc:  # a bad plot never loses the page
                out.append(f'<div class="note">plot not drawn: {escape(type(exc).__name__)}: {escape(str(exc))}</div>')
        else:
            out.append(f'<div class="note">{escape(MISSING_PLOTS)}</div>')
    diagnosis = row.get("diagnosis")
    if isinstance(diagnosis, Mapping):
        out.append(_diagnosis(diagnosis))
    return "\n".join(out)


def _metrics_table(output: Mapping[str, Any]) -> str:
    cols: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(output.get("fp32_vs_target"), Mapping):
        cols.append(("fp32 vs target", output["fp32_vs_target"]))
    if isinstance(output.get("int8_vs_target"), Mapping):
        cols.append(("int8 vs target", output["int8_vs_target"]))
    if isinstance(output.get("vs_fp32"), Mapping):
        cols.append(("int8 vs fp32", output["vs_fp32"]))
    head = f"output <code>{escape(str(output.get('name', '?')))}</code>, drop {_fmt(output.get('drop'))}"
    if not cols:
        return f"<h3>{head}</h3>"
    rows = "".join(
        f'<tr><th class="l">{escape(label)}</th>' + "".join(f"<td>{_fmt(m.get(key))}</td>" for _, m in cols) + "</tr>"
        for label, key in METRICS)
    return (f"<h3>{head}</h3><table><thead><tr><th class=\"l\">metric</th>"
            + "".join(f"<th>{escape(name)}</th>" for name, _ in cols) + f"</tr></thead><tbody>{rows}</tbody></table>")


def _diagnosis(diag: Mapping[str, Any]) -> str:
    out = [f"<h3>Diagnosis ({escape(str(diag.get('format', '?')))} sidecar, {escape(str(diag.get('feeds', '?')))} "
           f"feed(s); SQNR in dB, lower is worse)</h3>"]
    tensors = [t for t in (*(diag.get("worst") or []), *(diag.get("outputs") or [])) if isinstance(t, Mapping)]
    if tensors:
        out.append('<table><thead><tr><th class="l">kind</th><th class="l">tensor</th><th class="l">node</th>'
                   "<th>local dB</th><th>vs fp32 dB</th></tr></thead><tbody>")
        for t in tensors:
            out.append(f'<tr><td class="l">{escape(str(t.get("kind", "")))}</td>'
                       f'<td class="l"><code>{escape(str(t.get("tensor", "")))}</code></td>'
                       f'<td class="l">{escape(str(t.get("node") or "-"))}</td>'
                       f"<td>{_fmt(t.get('sqnr_db'), 1)}</td><td>{_fmt(t.get('xmodel_db'), 1)}</td></tr>")
        out.append("</tbody></table>")
    if diag.get("suggestion"):
        out.append(f'<div class="reason"><b>Suggestion:</b> {escape(str(diag["suggestion"]))}</div>')
    notes = [str(n) for n in (diag.get("notes") or [])]
    if notes:
        out.append("<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(out)


# ---- plots -------------------------------------------------------------------------------------------------------

def _floats(values: Any) -> np.ndarray:
    if not isinstance(values, Sequence) or isinstance(values, str):
        return np.zeros(0)
    out = np.array([_num(v) if _num(v) is not None else np.nan for v in values], dtype=np.float64)
    return out


def _plots(plot: Mapping[str, Any], item: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fp32, int8 = _floats(plot.get("fp32")), _floats(plot.get("int8"))
    target = _floats(plot.get("target")) if plot.get("target") is not None else np.zeros(0)
    edges, counts = _floats(plot.get("hist_edges")), _floats(plot.get("hist_counts"))
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
    name = str(plot.get("output", ""))
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
        clipped = _num(plot.get("hist_clipped"))
        note = f" ({int(clipped)} tail values in end bins)" if clipped else ""
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
