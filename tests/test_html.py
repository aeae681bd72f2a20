"""write_html: one self-contained page, escaped text, with or without plot data and matplotlib."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_quantgate.records import GateResult, OutputReport
from pytest_quantgate.records import Outcome
from pytest_quantgate.runner.gate import plot_points as plot_data
from pytest_quantgate.reporting.html import MISSING_PLOTS, render_html, write_html
from pytest_quantgate.records import Interval, PairMetrics
from pytest_quantgate.records import Diagnosis, PlotData, TensorError, Timing

METRICS = PairMetrics(n=200, plcc=0.999, srocc=0.998, krcc=0.97, rmse=0.01, mae=0.008, max_abs=0.05, slope=1.001,
                      intercept=-0.002, offset_rel=0.01)


def _rows(with_plot: bool = True) -> list[Outcome]:
    rng = np.random.default_rng(0)
    fp32 = rng.normal(size=500)
    int8 = fp32 + rng.normal(scale=0.02, size=500)
    target = fp32 + rng.normal(scale=0.3, size=500)
    diagnosis = Diagnosis("m.onnx", "m.int8.onnx", "dynamic", 3,
                          worst=(TensorError("weight", "w<1>", "/fc&1", 32.5, None, ("/fc&1",)),),
                          outputs=(TensorError("output", "score", None, None, float("inf")),),
                          suggestion="exclude <b>it</b>", notes=("n <i>1</i>",))
    ok = GateResult("mlp_v1", "cpu", "dynamic", 500, 0.01, "PASS", "PLCC drop 0.000400 <= budget 0.01", "pass",
                    drop=0.0004, interval=Interval(0.0001, 0.0008, 0.95, 100),
                    outputs=(OutputReport("score", 0.0004, METRICS, METRICS, METRICS),),
                    timing=Timing(20480, 8800, 0.05, 0.03, 1.67, None, 500), diagnosis=diagnosis,
                    plot=plot_data("score", fp32, int8, target) if with_plot else None)
    failed = GateResult("cnn", "cpu", "qat", 12, 0.002, "FAIL", "PLCC drop 0.02 > budget 0.002", "drop", drop=0.02,
                        outputs=(OutputReport("score", 0.02, METRICS),),
                        timing=Timing(100, 50, 0.01, 0.0, float("inf"), 1, 12))
    return [
        Outcome("mlp_v1", "cpu", "dynamic", "pass", ok.reason, ok),
        Outcome("<script>alert(1)</script>", "cpu", "static", "error", "bad <script>alert('x')</script> & co"),
        Outcome("only_id", "-", "-", "skip", ""),
        Outcome("cnn", "cpu", "qat", "fail", failed.reason, failed),
    ]


def _self_contained(page: str) -> None:
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.I)
    assert all(r.startswith(("#", "data:")) for r in refs), refs
    assert "http" not in page.lower()
    assert "@import" not in page and "url(" not in page


def test_page_with_plots_is_self_contained_and_escaped(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.html"
    write_html(path, _rows(), "gate <run>")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    _self_contained(page)
    assert page.count('src="data:image/png;base64,') == 1
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bad &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    assert "<title>gate &lt;run&gt;</title>" in page
    assert "exclude &lt;b&gt;it&lt;/b&gt;" in page and "w&lt;1&gt;" in page and "/fc&amp;1" in page
    for header in ("id", "EP", "mode", "samples", "drop", "CI", "budget", "headroom", "verdict", "fp32 size",
                   "int8 size", "fp32 ms", "int8 ms", "speedup"):
        assert f">{header}</th>" in page
    assert "[0.00010, 0.00080]" in page and "×25.0" in page and "20.0 KiB" in page and "×1.67" in page
    assert MISSING_PLOTS not in page


def test_page_without_plot_data(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(path, _rows(with_plot=False), "no plots")
    page = path.read_text(encoding="utf-8")
    _self_contained(page)
    assert "<img" not in page and MISSING_PLOTS not in page
    assert page.count('<span class="v ') == 2 * 4  # a badge per row in the summary and in each section


def test_page_without_matplotlib_says_how_to_get_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "report.html"
    write_html(path, _rows(), "no matplotlib")
    page = path.read_text(encoding="utf-8")
    _self_contained(page)
    assert "<img" not in page
    assert "pip install pytest-quantgate[html]" in page
    assert "0.999000" in page  # the tables are all there


def test_empty_and_odd_records_never_raise() -> None:
    """No items, NaN and infinite numbers, a plot with no points or a constant error: the page is still written."""
    page = render_html([], "empty", plots=False)
    assert "0 item(s)" in page
    nan = float("nan")
    odd_metrics = PairMetrics(3, nan, nan, nan, 0.0, 0.0, 0.0, nan, nan, nan)
    odd = GateResult("odd", "cpu", "static", 3, 0.01, "FAIL", "constant", "constant", drop=nan,
                     outputs=(OutputReport("y", nan, odd_metrics),),
                     plot=PlotData("y", (1.0, nan), (1.0,), None, (), (), 0))
    empty_plot = GateResult("e", "cpu", "static", 3, 0.01, "PASS", "ok", "pass", drop=0.0,
                            plot=PlotData("z", (), (), None, (), (), 0))
    outcomes = [Outcome("odd", "cpu", "static", "fail", "constant", odd),
                Outcome("e", "cpu", "static", "pass", "ok", empty_plot)]
    page = render_html(outcomes, "odd", plots=False)
    assert "nan" in page and "inf" in page  # drop NaN; headroom of a zero drop is inf
    pytest.importorskip("matplotlib")
    page = render_html(outcomes, "odd", plots=True)
    assert "no plot data" in page


def test_plot_data_caps_points_and_counts_every_error() -> None:
    fp32 = np.linspace(0, 1, 10_000)
    int8 = fp32 + 0.001
    int8[0] += 5.0  # one outlier: clipped into the end bin, counted
    data = plot_data("y", fp32, int8, None)
    assert len(data.fp32) == len(data.int8) == 2000 and data.target is None
    assert sum(data.hist_counts) == 10_000
    assert len(data.hist_edges) == len(data.hist_counts) + 1
    assert data.hist_clipped >= 1
