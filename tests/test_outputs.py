"""quant_outputs: per-output rules (ignore, budget_plcc, channel_axis, argmax_axis, budget_label_flip)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from conftest import GateProject
from onnx import helper, numpy_helper

from pytest_quantgate.engine.comparison import plan_outputs
from pytest_quantgate.errors import RegistryError
from pytest_quantgate.io.registry import parse_registry
from pytest_quantgate.io.soak import TensorSpec


def _with_tap(model: onnx.ModelProto, gain: float, offset: float) -> onnx.ModelProto:
    """Return ``model`` with a second output ``tap = gain * score + offset`` (a debug tap)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.array([gain], np.float32), "tap_gain"),
                              numpy_helper.from_array(np.array([offset], np.float32), "tap_offset")])
    graph.node.extend([helper.make_node("Mul", ["score", "tap_gain"], ["tap_scaled"]),
                       helper.make_node("Add", ["tap_scaled", "tap_offset"], ["tap"])])
    graph.output.append(helper.make_tensor_value_info("tap", onnx.TensorProto.FLOAT, ["N", 1]))
    return model


def _entry(project: GateProject, entry_id: str, tap_gain: float, **extra: Any) -> dict[str, Any]:
    """An entry whose fp32 has a faithful tap and whose int8's tap is ``tap_gain * score + 10`` when gain != 1."""
    fp32 = _with_tap(onnx.load(project.assets / "digits.onnx"), 1.0, 0.0)
    int8 = _with_tap(onnx.load(project.assets / "digits.int8.onnx"), tap_gain, 0.0 if tap_gain == 1.0 else 10.0)
    entry = project.add_sidecar(entry_id, int8, fixture="digits_notarget.npz", **extra)
    onnx.save(fp32, project.model / f"{entry_id}.onnx")
    import modelkit

    return modelkit.pin({k: v for k, v in entry.items() if k not in ("sha256", "int8_sha256")}, project.model)


def test_an_ignored_output_is_reported_but_not_judged(project: GateProject, tmp_path: Path) -> None:
    project.write([_entry(project, "judged", 0.5), _entry(project, "tapped", 0.5,
                                                          quant_outputs={"tap": {"ignore": True}})])
    report = tmp_path / "r.json"
    result = project.run("--quantgate-report", str(report))
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*judged*output 'tap': int8 ≈ 0.50*·fp32 +9.9*quant_budget_slope*"])
    items = {i["id"]: i for i in json.loads(report.read_text())["items"]}
    assert items["tapped"]["verdict"] == "PASS"
    assert [o["name"] for o in items["tapped"]["result"]["outputs"]] == ["score", "tap"]  # still measured


def test_an_output_s_own_budget_decides_for_that_output(project: GateProject) -> None:
    project.write([_entry(project, "strict_score", 1.0, quant_outputs={"score": {"budget_plcc": 1e-12}}),
                   _entry(project, "loose", 1.0, quant_outputs={"tap": {"budget_plcc": 0.5}})])
    result = project.run("-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*strict_score*PLCC drop * > budget 1e-12 on output 'score' (quant_outputs "
                                 "'score' budget_plcc)*"])


def test_an_unknown_output_name_is_an_error_naming_entry_field_and_outputs(project: GateProject) -> None:
    project.write([_entry(project, "typo", 1.0, quant_outputs={"tapp": {"ignore": True}})])
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*entry 'typo' field 'quant_outputs': 'tapp' is not an output of the model "
                                 "(outputs: score, tap)*"])


def test_the_schema_names_an_unsupported_per_output_key(tmp_path: Path) -> None:
    raw = {"id": "m", "onnx": "m.onnx", "quant_mode": "fp32", "quant_outputs": {"y": {"mask_positions": "m"}}}
    registry = parse_registry({"schema_version": 1, "models": [raw]}, tmp_path / "registry.json")
    (problem,) = registry.problems
    assert "quant_outputs" in problem.message and "'mask_positions' was unexpected" in problem.message


def test_per_output_axes_override_the_entry_keys(tmp_path: Path) -> None:
    raw = {"id": "m", "onnx": "m.onnx", "quant_mode": "fp32", "quant_argmax_axis": 2, "quant_channel_axis": 1,
           "quant_budget_label_flip": 0.02,
           "quant_outputs": {"hidden_out": {"argmax_axis": None, "channel_axis": None},
                             "logprobs": {"budget_label_flip": 0.005}}}
    entry = parse_registry({"schema_version": 1, "models": [raw]}, tmp_path / "r.json").entry("m")

    class _Fixture:
        target = None
        inputs: ClassVar[dict[str, Any]] = {}

    specs = [TensorSpec("logprobs", "tensor(float)", ("N", 32, 100)),
             TensorSpec("hidden_out", "tensor(float)", (2, "N", 64))]
    logprobs, hidden = plan_outputs(entry, _Fixture(), [], specs)  # type: ignore[arg-type]
    assert (logprobs.argmax_axis, logprobs.channel_axis, logprobs.budget_label_flip) == (2, 1, 0.005)
    assert (hidden.argmax_axis, hidden.channel_axis, hidden.explicit_axis) == (None, None, True)
    with pytest.raises(RegistryError, match="'nope' is not an output"):
        bad = parse_registry({"schema_version": 1, "models": [{**raw, "quant_outputs": {"nope": {}}}]},
                             tmp_path / "r.json").entry("m")
        plan_outputs(bad, _Fixture(), [], specs)  # type: ignore[arg-type]


def _classifier(project: GateProject, entry_id: str, broken: bool = False, **extra: Any) -> dict[str, Any]:
    """A digits classifier (logits [N, 10]) with a real dynamic int8 sidecar (or a crude rounded one), class ids."""
    import modelkit
    from conftest import rounded_weights
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    fit = LogisticRegression(max_iter=500).fit(x[:1000], y[:1000])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["features", "w", "b"], ["logits"])], "clf",
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(fit.coef_.T.astype(np.float32), "w"),
         numpy_helper.from_array(fit.intercept_.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp32 = project.model / f"{entry_id}.onnx"
    onnx.save(model, fp32)
    if broken:
        onnx.save(rounded_weights(model, 2.0), project.model / f"{entry_id}.int8.onnx")
    else:
        modelkit.quantize_dynamic_file(fp32, project.model / f"{entry_id}.int8.onnx")
    np.savez(project.fixtures / f"{entry_id}.npz", features=x[1000:], target=y[1000:].astype(np.int64))
    return modelkit.pin({"id": entry_id, "onnx": f"{entry_id}.onnx", "quant_mode": "dynamic", "quant_lineage": False,
                         **extra}, project.model)


def test_class_id_targets_are_scored_as_accuracy(project: GateProject, tmp_path: Path) -> None:
    import onnxruntime as ort

    project.write([_classifier(project, "no_axis"), _classifier(project, "clf", quant_argmax_axis=1),
                   _classifier(project, "bad", broken=True, quant_argmax_axis=1, quant_budget_label_flip=1.0,
                               quant_accuracy_budget_plcc=2.0, quant_budget_slope=1.0,
                               quant_outputs={"logits": {"budget_accuracy": 0.01}})])
    report = tmp_path / "r.json"
    result = project.run("--quantgate-report", str(report), "-v")
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines_random([
        "*no_axis*array 'target' has 1 value(s) per sample, output 'logits' has 10: store a target of the output's "
        "shape (scored by PLCC), or integer class ids * set quant_argmax_axis *",
        "*bad*output 'logits': accuracy against the class-id target drops by * over quant_outputs budget_accuracy "
        "0.01*",
    ])
    items = {i["id"]: i for i in json.loads(report.read_text())["items"]}
    labels = items["clf"]["result"]["outputs"][0]["labels"]
    # an independent evaluation: both models over the whole fixture, numpy argmax against the ids
    data = np.load(project.fixtures / "clf.npz")
    accuracies = []
    for name in ("clf.onnx", "clf.int8.onnx"):
        session = ort.InferenceSession(str(project.model / name), providers=["CPUExecutionProvider"])
        logits = np.concatenate([session.run(None, {"features": data["features"][i:i + 1]})[0]
                                 for i in range(len(data["target"]))])
        accuracies.append(float(np.mean(np.argmax(logits, axis=1) == data["target"])))
    assert labels["fp32_accuracy"] == pytest.approx(accuracies[0], abs=1e-12)
    assert labels["int8_accuracy"] == pytest.approx(accuracies[1], abs=1e-12)
    assert accuracies[0] > 0.9
