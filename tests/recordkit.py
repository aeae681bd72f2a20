"""Fully populated records for the record, cache and report tests: every field set, non-finite floats included."""

from __future__ import annotations

import math
from typing import Any

from pytest_quantgate.records import GateResult, LabelReport, OutputReport
from pytest_quantgate.records import Outcome
from pytest_quantgate.records import Interval, PairMetrics
from pytest_quantgate.records import (
    Diagnosis,
    FileRef,
    LineageRecord,
    PlotData,
    Provenance,
    TensorError,
    Timing,
)


def pair_metrics(plcc: float = 0.9991) -> PairMetrics:
    """Return metrics with an infinite offset (a constant fp32) and a NaN rank correlation."""
    return PairMetrics(n=1200, plcc=plcc, srocc=math.nan, krcc=0.97, rmse=0.04, mae=0.03, max_abs=0.25,
                       slope=1.001, intercept=-0.002, offset_rel=math.inf)


def interval() -> Interval:
    """Return a bootstrap interval of the drop."""
    return Interval(low=0.0003, high=0.0012, level=0.95, replicates=1000)


def timing() -> Timing:
    """Return a timing whose speed-up is unknown."""
    return Timing(fp32_bytes=40_000, int8_bytes=12_000, fp32_ms=0.05, int8_ms=0.04, speedup=None, batch=32, runs=38)


def provenance() -> Provenance:
    """Return a provenance with nested mappings."""
    return Provenance(
        fp32=FileRef("model/m.onnx", "a" * 64), int8=FileRef("model/m.int8.onnx", "b" * 64),
        fixture=FileRef("fixtures/m.npz", "c" * 64), ep="cpu", providers=("CPUExecutionProvider",),
        provider_options={"CPUExecutionProvider": {"arena": "1"}}, onnxruntime="onnxruntime 1.20.0",
        graph_optimization_level="ORT_ENABLE_ALL", quantgate="0.1.0", bootstrap=1000, seed=0, decision="point",
        system={"cpu": {"model": "x", "isa": ["avx2"]}, "python": "3.12"},
        session_config={"session.x64quantprecision": "1"})


def diagnosis() -> Diagnosis:
    """Return a diagnosis with tensors of every kind, one with an unknown SQNR."""
    return Diagnosis(
        fp32_path="model/m.onnx", int8_path="model/m.int8.onnx", format="dynamic", feeds=4,
        worst=(TensorError("weight", "w1", "fc1", 21.5, 19.0, ("fc1",)),
               TensorError("activation", "h", None, None, -math.inf)),
        outputs=(TensorError("output", "score", "fc2", math.nan),), analysed=("weights", "outputs"),
        suggestion="exclude fc1", notes=("one note",), samples=(5, 9, 12, 40))


def plot() -> PlotData:
    """Return plot data without a target."""
    return PlotData("score", (0.1, 0.2), (0.11, 0.19), None, (-0.01, 0.0, 0.01), (3, 4), 0)


def gate_result(**changes: Any) -> GateResult:
    """Return a passing result with every field set; ``changes`` replace fields."""
    fields: dict[str, Any] = {
        "entry_id": "m", "ep": "cpu", "mode": "dynamic", "samples": 1200, "budget": 0.01, "verdict": "PASS",
        "reason": "drop 0.0007 <= budget 0.01", "kind": "pass", "drop": 0.0007, "interval": interval(),
        "outputs": (OutputReport("score", 0.0007, pair_metrics(), pair_metrics(0.95), pair_metrics(0.949), 3, 1, 2,
                                 0.001),
                    OutputReport("label", 0.0, pair_metrics(1.0),
                                 labels=LabelReport("labels", 0.002, 0.01, interval()))),
        "compare": "output", "decision": "point", "needed_samples": 3000, "warnings": ("w1",), "also": ("mae",),
        "fp32_probe": (0.5, -1.25), "timing": timing(), "provenance": provenance(),
        "lineage": LineageRecord(True, (), 2, 2), "diagnosis": diagnosis(), "plot": plot(),
    }
    fields.update(changes)
    return GateResult(**fields)


def outcome(**changes: Any) -> Outcome:
    """Return a passing outcome carrying :func:`gate_result`; ``changes`` replace fields."""
    fields: dict[str, Any] = {
        "entry_id": "m", "ep": "cpu", "mode": "dynamic", "status": "pass", "message": "drop 0.0007 <= budget 0.01",
        "result": gate_result(), "regenerated": "rebuilt m.int8.onnx", "cached": False, "notes": ("n",),
        "traceback": None, "log": ("onnxruntime: 2 warnings",),
    }
    fields.update(changes)
    return Outcome(**fields)
