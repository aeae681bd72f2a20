"""Outputs whose shape depends on the input's values (Compress, NonZero, kept detections), in the stacked layout.

The gate's own advice for a model that does not keep the batch axis is to stack one model input per sample; each
run then returns its own shape. The gate folds such runs into its per-sample sums one shape at a time (the
statistics do not depend on how samples are grouped), so the verdict is the one over every value of every sample,
paired by position. Where int8 returns another shape than fp32 for a sample, the values cannot be paired: that is
an ERROR naming the fixture, the entry, the output, the sample and both shapes, and what to gate instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import GateProject

import modelkit

SAMPLES = 120


def add_ragged(project: GateProject, entry_id: str, keep_from_input: bool, column: bool = False,
               **extra: Any) -> dict[str, Any]:
    """Write the model, its real dynamic-int8 sidecar and a stacked fixture (one [1, 8] input per sample)."""
    onnx.save(modelkit.ragged_model(keep_from_input, column), project.model / f"{entry_id}.onnx")
    modelkit.quantize_dynamic_file(project.model / f"{entry_id}.onnx", project.model / f"{entry_id}.int8.onnx")
    x = np.random.default_rng(5).normal(size=(SAMPLES, 1, 8)).astype(np.float32)
    np.savez(project.fixtures / f"{entry_id}.npz", x=x)
    return modelkit.pin({"id": entry_id, "onnx": f"{entry_id}.onnx", "quant_mode": "dynamic", **extra}, project.model)


def outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = modelkit.cpu_session(path)
    return [session.run(["y"], {"x": sample})[0] for sample in x]


def test_the_batched_layout_is_told_to_stack_and_the_stacked_layout_is_measured(project: GateProject) -> None:
    entry = add_ragged(project, "kept", keep_from_input=True)
    x = np.load(project.fixtures / "kept.npz")["x"]
    # the layout a user tries first: samples on the model's own axis 0
    batched = add_ragged(project, "batched", keep_from_input=True)
    np.savez(project.fixtures / "batched.npz", x=x[:, 0])
    project.write([entry, batched])
    report = project.root / "r.json"
    result = project.run("--quantgate-ep", "cpu", "-v", "--quantgate-report", str(report))
    out = result.stdout.str()
    assert "Traceback" not in out and "unexpected" not in out, out
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*batched.onnx: output 'y' has shape (*,) for a batch of 1; the model does not keep "
                                 "the batch axis, so stack one model input per sample (add a leading axis)*"])
    # the stacked fixture's verdict is PLCC over every kept value of every sample, paired by position
    fp32 = np.concatenate(outputs(project.model / "kept.onnx", x))
    int8 = np.concatenate(outputs(project.model / "kept.int8.onnx", x))
    assert len({o.shape for o in outputs(project.model / "kept.onnx", x)}) > 5  # really ragged
    item = next(i for i in json.loads(report.read_text())["items"] if i["id"] == "kept")
    assert item["verdict"] == "PASS"
    assert item["result"]["drop"] == pytest.approx(1.0 - np.corrcoef(fp32, int8)[0, 1], abs=1e-9)
    assert item["result"]["outputs"][0]["vs_fp32"]["n"] == fp32.size


def test_int8_changing_the_shape_is_an_error_naming_fixture_entry_output_sample_and_shapes(
        project: GateProject) -> None:
    entry = add_ragged(project, "moved", keep_from_input=False)
    x = np.load(project.fixtures / "moved.npz")["x"]
    pairs = zip(outputs(project.model / "moved.onnx", x), outputs(project.model / "moved.int8.onnx", x))
    first = next(i for i, (a, b) in enumerate(pairs) if a.shape != b.shape)  # int8 moved a value across zero
    project.write([entry, project.add_sidecar("healthy")])
    result = project.run("--quantgate-ep", "cpu", "-v")
    out = result.stdout.str()
    assert "Traceback" not in out and "unexpected" not in out, out
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        f"quantgate ERROR: moved [[]cpu[]]: {project.fixtures / 'moved.npz'}: entry 'moved': output 'y' has shape "
        f"(*,) from the int8 model and (*,) from fp32 on fixture sample {first}; its shape depends on the values "
        f"(NonZero, NMS, a score threshold) and int8 moved one across, so the two cannot be compared value by value: "
        f"gate the model without that step (e.g. the scores before NMS), whose outputs keep their shape",
    ])


def test_a_ragged_channel_axis_is_an_error_until_the_output_is_judged_whole(project: GateProject) -> None:
    project.write([add_ragged(project, "col", keep_from_input=True, column=True)])
    result = project.run("--quantgate-ep", "cpu")
    assert "Traceback" not in result.stdout.str()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        f"quantgate ERROR: col [[]cpu[]]: {project.fixtures / 'col.npz'}: entry 'col': output 'y' has * channel(s) "
        f"along axis 1 here and * before: its shape depends on the input, so it cannot be judged channel by channel; "
        f"set quant_channel_axis to an axis of fixed size, or to null to judge the output whole",
    ])
    for axis in (None, 2):
        project.write([add_ragged(project, "col", keep_from_input=True, column=True, quant_channel_axis=axis)])
        project.run("--quantgate-ep", "cpu").assert_outcomes(passed=1)
