"""write_html: one self-contained page, escaped text, with or without plot data and matplotlib."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_quantgate.html import MISSING_PLOTS, plot_data, render_html, write_html

METRICS = {"n": 200, "plcc": 0.999, "srocc": 0.998, "krcc": 0.97, "rmse": 0.01, "mae": 0.008, "max_abs": 0.05,
           "slope": 1.001, "intercept": -0.002, "offset_rel": 0.01}


def _rows(with_plot: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    fp32 = rng.normal(size=500)
    int8 = fp32 + rng.normal(scale=0.02, size=500)
    target = fp32 + rng.normal(scale=0.3, size=500)
    ok = {"id": "mlp_v1", "ep": "cpu", "mode": "dynamic", "samples": 500, "drop": 0.0004, "budget": 0.01,
          "headroom": 25.0, "verdict": "PASS", "reason": "PLCC drop 0.000400 <= budget 0.01", "ci": [0.0001, 0.0008],
          "outputs": [{"name": "score", "drop": 0.0004, "vs_fp32": METRICS, "fp32_vs_target": METRICS,
                       "int8_vs_target": METRICS}],
          "fp32_bytes": 20480, "int8_bytes": 8800, "fp32_ms": 0.05, "int8_ms": 0.03, "speedup": 1.67,
          "diagnosis": {"format": "dynamic", "feeds": 3, "worst": [
              {"kind": "weight", "tensor": "w<1>", "node": "/fc&1", "sqnr_db": 32.5, "xmodel_db": None,
               "exclude": ["/fc&1"]}], "outputs": [{"kind": "output", "tensor": "score", "node": None,
                                                    "sqnr_db": None, "xmodel_db": "inf", "exclude": []}],
              "suggestion": "exclude <b>it</b>", "notes": ["n <i>1</i>"]}}
    if with_plot:
        ok["plot"] = plot_data("score", fp32, int8, target)
    hostile = {"id": "<script>alert(1)</script>", "ep": "cpu", "mode": "static", "samples": None, "drop": None,
               "budget": None, "headroom": None, "verdict": "ERROR", "reason": "bad <script>alert('x')</script> & co"}
    sparse = {"id": "only_id", "verdict": "SKIP"}
    failed = {"id": "cnn", "ep": "cpu", "mode": "qat", "samples": 12, "drop": 0.02, "budget": 0.002,
              "headroom": 0.1, "verdict": "FAIL", "reason": "PLCC drop 0.02 > budget 0.002", "ci": None,
              "outputs": [{"name": "score", "drop": 0.02, "vs_fp32": METRICS, "fp32_vs_target": None,
                           "int8_vs_target": None}], "speedup": float("inf")}
    return [ok, hostile, sparse, failed]


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


def test_empty_and_odd_rows_never_raise() -> None:
    page = render_html([], "empty", plots=False)
    assert "0 item(s)" in page
    odd = [{"id": 3, "verdict": None, "ci": "x", "outputs": [None, {"name": "y"}], "plot": {"fp32": [1, "a"]},
            "diagnosis": {"worst": [None]}}]
    assert "3" in render_html(odd, "odd", plots=False)
    pytest.importorskip("matplotlib")
    assert "3" in render_html(odd, "odd", plots=True)


def test_plot_data_caps_points_and_counts_every_error() -> None:
    fp32 = np.linspace(0, 1, 10_000)
    int8 = fp32 + 0.001
    int8[0] += 5.0  # one outlier: clipped into the end bin, counted
    data = plot_data("y", fp32, int8, None)
    assert len(data["fp32"]) == len(data["int8"]) == 2000 and data["target"] is None
    assert sum(data["hist_counts"]) == 10_000
    assert len(data["hist_edges"]) == len(data["hist_counts"]) + 1
    assert data["hist_clipped"] >= 1
