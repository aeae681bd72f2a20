"""Reports of task-aware verdicts: thresholds, detections, embeddings, masks, the focus and its plot."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import browserkit
import modelkit
import numpy as np
import pytest
import recordkit

from pytest_quantgate.records import (
    ClassDetections,
    DetectionReport,
    EmbeddingReport,
    Focus,
    GateResult,
    Interval,
    LabelReport,
    Outcome,
    OutputReport,
    PairMetrics,
    ThresholdChannel,
    ThresholdReport,
)
from pytest_quantgate.reporting.html import MISSING_PLOTS, render_html
from pytest_quantgate.reporting.reports import failure_text, metrics_table, summary_lines
from pytest_quantgate.runner import gate
from pytest_quantgate.runner.gate import FOCUS_PLOT_SAMPLES, focus_plot_data, measure, plot_points

NO_VALUES = PairMetrics(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def ci(low: float, high: float) -> Interval:
    """Return a 95 % interval."""
    return Interval(low, high, 0.95, 500)


def thresholds() -> ThresholdReport:
    """Return 12 crossing channels (channel 9 worst) and 4 that never cross."""
    rows = [ThresholdChannel(c, either=100, disagree=c, fp32_over=90, int8_over=95, interval=ci(c / 200, c / 50))
            for c in range(12)]
    rows[9] = ThresholdChannel(9, either=40, disagree=22, fp32_over=30, int8_over=12, interval=ci(0.4, 0.7))
    silent = [ThresholdChannel(c, 0, 0, 0, 0) for c in (12, 13, 14, 20)]
    return ThresholdReport(0.5, 0.05, (*rows, *silent), worst_channel=9)


def detections() -> DetectionReport:
    """Return 13 classes; class 7 misses most detections, class 3 is rare and unjudged."""
    classes = [ClassDetections(c, fp32=50, int8=50, matched=50 - c % 4, judged=True) for c in range(13)]
    classes[7] = ClassDetections(7, fp32=60, int8=20, matched=18, judged=True, missed_interval=ci(0.6, 0.8))
    classes[3] = ClassDetections(3, fp32=4, int8=1, matched=0, judged=False)
    return DetectionReport(fp32=sum(c.fp32 for c in classes), int8=sum(c.int8 for c in classes),
                           matched=sum(c.matched for c in classes), budget_missed=0.05, budget_extra=0.1,
                           missed_interval=ci(0.08, 0.12), extra_interval=ci(0.01, 0.03), classes=tuple(classes))


def embedding() -> EmbeddingReport:
    """Return an embedding report with neighbour recall."""
    return EmbeddingReport(axis=1, cosine_distance=0.0234, budget_cosine=0.01, neighbours_recall=0.8125,
                           neighbours_k=10, neighbours_samples=480, budget_neighbours=0.9,
                           interval=ci(0.019, 0.028))


def task_result(name: str = "head", **changes: Any) -> GateResult:
    """Return a failing result with every new block: thresholds, detections, embedding, mask, ignore, labels."""
    metrics = recordkit.pair_metrics()
    outputs = (
        OutputReport(name, 0.0009, metrics, channels=16, channel_axis=1, thresholds=thresholds()),
        OutputReport("boxes", 0.0, NO_VALUES, detections=detections()),
        OutputReport("embed", 0.0, NO_VALUES, embedding=embedding()),
        OutputReport("logits", 0.002, metrics, mask="attention_mask",
                     labels=LabelReport("argmax(axis=2)", 0.031, 0.01, ci(0.02, 0.04), fp32_accuracy=0.91,
                                        int8_accuracy=0.87, accuracy_interval=ci(0.02, 0.06), budget_accuracy=0.01)),
        OutputReport("aux", 0.3, metrics, ignored=True),
    )
    fields: dict[str, Any] = {
        "verdict": "FAIL", "kind": "detections", "reason": "output 'boxes': class 7 misses 70.00% of detections",
        "outputs": outputs, "focus": Focus("boxes", 2, (11,), "class 7"), "diagnosis": None, "warnings": (),
        "also": (),
    }
    fields.update(changes)
    return recordkit.gate_result(**fields)


def focus_plot(label: str = "boxes[class 7 along axis 2]") -> Any:
    """Return plot data of a focused channel: int8 far from fp32."""
    rng = np.random.default_rng(1)
    fp32 = rng.uniform(0, 1, 300)
    return plot_points(label, fp32, fp32 * 0.5 + rng.normal(scale=0.05, size=300))


# --- the terminal ---------------------------------------------------------------------------------------------------


def test_threshold_block_lists_crossing_channels_worst_first_and_truncates() -> None:
    lines = metrics_table(task_result())
    text = "\n".join(lines)
    assert "threshold 0.5 (decisions x >= 0.5), budget 0.05 flip share per channel; worst channel 9" in text
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("channel "))
    rows = lines[start + 2: start + 10]
    assert [r.split()[0] for r in rows] == ["9", "11", "10", "8", "7", "6", "5", "4"]
    assert rows[0].split()[1:6] == ["40", "22", "30", "12", "55.00%"] and "[40.00%, 70.00%]" in rows[0]
    assert rows[0].endswith("OVER") and rows[-1].endswith("ok")  # 4 % is within 5 %
    assert lines[start + 10].strip() == "… 4 more channels"
    assert "4 channel(s) never reach 0.5 in either model: 12-14, 20" in text


def test_detection_block_has_totals_budgets_and_classes_by_missed_detections() -> None:
    lines = metrics_table(task_result())
    text = "\n".join(lines)
    report = detections()
    assert f"detections: fp32 {report.fp32}, int8 {report.int8}, matched {report.matched}" in text
    assert f"missed {report.missed:.2%} of fp32 detections, 95% CI [8.00%, 12.00%], budget 0.05" in text
    assert f"extra {report.extra:.2%} of int8 detections, 95% CI [1.00%, 3.00%], budget 0.1" in text
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("class "))
    assert lines[start].split() == ["class", "fp32", "int8", "matched", "missed", "missed", "CI", "judged"]
    rows = [line.split() for line in lines[start + 2: start + 12]]
    assert rows[0][:5] == ["7", "60", "20", "18", "70.00%"] and "[60.00%, 80.00%]" in lines[start + 2]
    missed = [int(r[1]) - int(r[3]) for r in rows]
    assert missed == sorted(missed, reverse=True)
    assert lines[start + 12].strip() == "… 3 more classes"
    assert ["3", "4", "1", "0", "100.00%", "-", "no"] in rows  # 4 missed: ranks with the classes missing 3


def test_embedding_mask_ignore_and_label_lines() -> None:
    text = "\n".join(metrics_table(task_result()))
    assert "embedding along axis 1: mean 1 − cos 0.023400, 95% CI [0.019000, 0.028000], budget 0.01" in text
    assert "nearest neighbours: recall@10 0.8125 over 480 samples, minimum 0.9" in text
    assert "(masked by 'attention_mask': only the positions it marks are counted)" in text
    assert "(ignored: reported, not judged)" in text
    assert "argmax(axis=2): int8 differs from fp32 on 3.10% of elements" in text
    assert "accuracy vs target: fp32 91.0000%, int8 87.0000%, drop 4.0000%" in text


def test_failure_text_names_what_failed_and_the_remedy() -> None:
    text = failure_text(task_result(), "model/registry.json")
    lines = text.splitlines()
    assert lines[2] == "  failing: output 'boxes', class 7"
    assert "nodes_to_exclude" in text and "budget_missed" in text
    for kind, words in (("threshold", "budget_threshold_flip"), ("embedding", "budget_cosine")):
        assert words in failure_text(task_result(kind=kind), "r.json")
    plain = failure_text(task_result(focus=Focus("head", 1, (9, 10, 11))), "r.json")
    assert "  failing: output 'head', channels 9-11 along axis 1" in plain
    assert "failing:" not in failure_text(task_result(focus=None), "r.json")


def test_summary_says_what_failed() -> None:
    result = task_result()
    lines = summary_lines([Outcome("m", "cpu", "dynamic", "fail", result.reason, result)])
    assert lines[-1] == f"m [cpu] FAIL: {result.reason} (failing: output 'boxes', class 7)"


def test_the_focus_plot_round_trips_and_stays_out_of_the_json_report() -> None:
    from pytest_quantgate.reporting.reports import report_document
    from pytest_quantgate.settings import Settings

    result = task_result(focus_plot=focus_plot())
    assert GateResult.from_json(result.to_json()).to_json() == result.to_json()  # NaN != NaN: compare the JSON
    doc = report_document([Outcome("m", "cpu", "dynamic", "fail", "r", result)], Settings())
    assert doc["items"][0]["result"]["focus_plot"] is None
    assert replace(result, focus_plot=None).focus_plot is None


# --- the HTML page ----------------------------------------------------------------------------------------------

EVIL = "<img src=x onerror=alert(1)>&\"'"

# injected first in <head>: collects errors (scripts, resources) and, once loaded, what a reader would see
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)),
                        true);
window.addEventListener('load', () => {
  const box = el => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  const figures = [...document.querySelectorAll('figure')].map(f => ({
    box: box(f), caption: f.querySelector('figcaption').textContent,
    img: f.querySelector('img') ? f.querySelector('img').naturalWidth : 0}));
  const classes = document.querySelector('table.classes');
  const probe = {
    errors: window.__errors, figures: figures,
    classes: classes ? {box: box(classes), rows: [...classes.querySelectorAll('tbody tr')].map(
      tr => [...tr.children].map(td => td.textContent))} : null,
    thresholds: [...document.querySelectorAll('table.thresholds tbody tr')].map(tr => tr.firstChild.textContent),
    focus: [...document.querySelectorAll('.focus')].map(d => d.textContent),
    headings: [...document.querySelectorAll('h3')].map(h => h.textContent),
    scripts: document.querySelectorAll('script').length,
    images: document.images.length,
    handlers: document.querySelectorAll('[onerror]').length,
  };
  document.body.setAttribute('data-probe', JSON.stringify(probe));
});
</script>"""


def _browse(page: str, tmp_path: Path) -> dict[str, Any]:
    """Return what headless chromium sees of ``page`` (the PROBE's findings)."""
    return browserkit.browse(page, tmp_path, PROBE, window="2400,1600")


def _outcomes(name: str = "head") -> list[Outcome]:
    result = task_result(name, plot=focus_plot("head"), focus_plot=focus_plot(f"{name}[class 7 along axis 2]"))
    return [Outcome("m", "cpu", "dynamic", "fail", result.reason, result)]


def test_page_shows_every_block_and_the_focus_plot(tmp_path: Path) -> None:
    page = render_html(_outcomes(), "tasks", plots=False)
    assert "threshold 0.5 (decisions x &gt;= 0.5)" in page and "… 4 more channels" in page
    assert "… 3 more classes" in page and "recall@10 0.8125 over 480 samples, minimum 0.9" in page
    assert "masked by <code>attention_mask</code>" in page and "ignored: reported, not judged" in page
    assert "accuracy vs target: fp32 91.00%, int8 87.00%, drop 4.00%" in page
    assert "<b>Failing:</b> output &#x27;boxes&#x27;, class 7" in page
    assert MISSING_PLOTS in page


def test_page_renders_in_chromium_with_both_plots_side_by_side(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    page = render_html(_outcomes(), "tasks", plots=True)
    assert "<script" not in page and page.count('src="data:image/png;base64,') == 2
    probe = _browse(page, tmp_path)
    assert probe["errors"] == [] and probe["scripts"] == 1  # the probe's own
    whole, failed = probe["figures"]
    assert whole["caption"] == "Whole output head" and failed["caption"] == "What failed: head[class 7 along axis 2]"
    assert whole["img"] > 0 and failed["img"] > 0  # both PNGs decode
    assert failed["box"][0] > whole["box"][0] and failed["box"][1] == whole["box"][1]  # next to it
    assert probe["classes"]["box"][2] > 0 and probe["classes"]["box"][3] > 0
    rows = probe["classes"]["rows"]
    assert len(rows) == 10 and rows[0] == ["7", "60", "20", "18", "70.00%", "[60.00%, 80.00%]", "yes"]
    assert probe["thresholds"][:2] == ["9", "11"] and len(probe["thresholds"]) == 8
    assert probe["focus"] == ["Failing: output 'boxes', class 7"]


def test_a_malicious_output_name_stays_text(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    outcomes = _outcomes(EVIL)
    result = outcomes[0].result
    assert result is not None
    outcomes = [replace(outcomes[0], result=replace(result, focus=Focus(EVIL, 1, (9,), f"channel {EVIL}")))]
    page = render_html(outcomes, "tasks", plots=True)
    assert EVIL not in page and "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#x27;" in page
    probe = _browse(page, tmp_path)
    assert probe["errors"] == [] and probe["handlers"] == 0 and probe["images"] == 2
    assert f"output {EVIL}, drop 0.000900" in probe["headings"]
    assert probe["focus"] == [f"Failing: output {EVIL!r}, channel {EVIL}"]
    assert probe["figures"][1]["caption"] == f"What failed: {EVIL}[class 7 along axis 2]"


# --- the plot of what failed, from a real model -------------------------------------------------------------------


def _digits(tmp_path: Path, assets: Path, **entry: Any) -> tuple[Any, Any]:
    """Return (prepared, settings) of the digits MLP with a ``keep`` mask array beside its features."""
    from pytest_quantgate.io.registry import load_registry
    from pytest_quantgate.runner.gate import prepare
    from pytest_quantgate.settings import Settings

    model, fixtures = tmp_path / "model", tmp_path / "fixtures"
    model.mkdir()
    fixtures.mkdir()
    shutil.copy(assets / "digits.onnx", model / "m.onnx")
    shutil.copy(assets / "digits.int8.onnx", model / "m.int8.onnx")
    with np.load(assets / "digits_notarget.npz") as archive:
        features = archive["features"]
    keep = (np.arange(len(features)) % 3 == 0).astype(np.int64)[:, None]  # one position per sample: [N, 1]
    np.savez(fixtures / "m.npz", features=features, keep=keep)
    registry_path = modelkit.write_registry(model / "registry.json", [modelkit.pin(
        {"id": "m", "onnx": "m.onnx", "quant_mode": "dynamic", **entry}, model)])
    settings = Settings(enabled=True, registry=registry_path, fixtures_dir=fixtures, eps=("cpu",), regen="never",
                        bootstrap=100, html=tmp_path / "r.html")
    registry = load_registry(registry_path)
    return prepare(registry, registry.entry("m"), "cpu", settings), settings


def _direct(path: Path, features: np.ndarray) -> np.ndarray:
    session = modelkit.cpu_session(path)
    return np.concatenate([session.run(["score"], {"features": features[i: i + 1]})[0]
                           for i in range(len(features))]).astype(np.float64).ravel()


def test_focus_plot_reruns_the_worst_samples_of_the_focused_channel(tmp_path: Path, digits_assets: Path) -> None:
    prepared, settings = _digits(tmp_path, digits_assets)
    result, collector = measure(prepared, settings)
    assert result.passed and result.focus is None and result.focus_plot is None  # nothing failed: no second plot
    focus = Focus("score", 1, (0,))
    plot = focus_plot_data(prepared, collector, replace(result, focus=focus))
    assert plot is not None and plot.output == "score[channel 0 along axis 1]"
    picked = sorted(collector.worst_samples(FOCUS_PLOT_SAMPLES, focus))
    features = prepared.fixture.take(picked)["features"]
    fp32, int8 = _direct(prepared.fp32_path, features), _direct(prepared.int8_path, features)
    assert len(plot.fp32) == FOCUS_PLOT_SAMPLES == sum(plot.hist_counts)
    np.testing.assert_allclose(plot.fp32, fp32, rtol=1e-6)
    np.testing.assert_allclose(plot.int8, int8, rtol=1e-6)
    # the worst samples of the focus: their mean error is above the whole fixture's
    whole = np.abs(_direct(prepared.int8_path, prepared.fixture.inputs["features"])
                   - _direct(prepared.fp32_path, prepared.fixture.inputs["features"]))
    assert np.mean(np.abs(int8 - fp32)) > np.mean(whole)


@pytest.mark.parametrize("invert", [False, True])
def test_focus_plot_keeps_only_masked_positions(tmp_path: Path, digits_assets: Path, invert: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rules = {"mask": "keep", "mask_invert": True} if invert else {"mask": "keep"}
    prepared, settings = _digits(tmp_path, digits_assets, quant_outputs={"score": rules})
    result, collector = measure(prepared, settings)
    focused = replace(result, focus=Focus("score"))
    # the worst samples of a masked output are all masked ones; pick every sample to see the others dropped
    monkeypatch.setattr(collector, "worst_samples", lambda count, focus=None, kind=None: list(range(count)))
    plot = focus_plot_data(prepared, collector, focused)
    kept = [i for i in range(FOCUS_PLOT_SAMPLES) if (i % 3 == 0) != invert]
    assert plot is not None and plot.output == f"score[where 'keep' is {'not set' if invert else 'set'}]"
    assert len(plot.fp32) == len(kept) == sum(plot.hist_counts)
    np.testing.assert_allclose(plot.fp32, _direct(prepared.fp32_path, prepared.fixture.take(kept)["features"]),
                               rtol=1e-6)
    assert focus_plot_data(prepared, collector, replace(result, focus=None)) is None
    assert focus_plot_data(prepared, collector, replace(result, focus=Focus("nope", 1, (0,)))) is None


def test_focus_plot_never_raises(tmp_path: Path, digits_assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared, settings = _digits(tmp_path, digits_assets)
    result, collector = measure(prepared, settings)
    focused = replace(result, focus=Focus("score", 1, (0,)))

    def broken(*args: Any) -> Any:
        raise RuntimeError("session died")

    monkeypatch.setattr(gate, "run", broken)
    assert focus_plot_data(prepared, collector, focused) is None
    assert focus_plot_data(prepared, collector, replace(focused, focus=Focus("score", 5, (99,)))) is None
