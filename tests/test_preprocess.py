"""Tests of the pre-processing stage the PTQ producers run first (pytest_quantgate/producers/preprocess.py).

The models are built here with onnx.helper in the shape of a Paddle2ONNX export: opset 11, every weight in a
``Constant`` node, literal ``-1`` batch dims on the input and the output. Plain ORT cannot quantise such a graph
dynamically ("Expected ... to be an initializer"); the producers must, from the command line, and the gate must
pass the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_quantgate.producers import preprocess
from pytest_quantgate.producers.base import ProducerError
from pytest_quantgate.producers.provenance import read_provenance
from pytest_quantgate.producers.ptq_static import model_inputs

ROOT = Path(__file__).resolve().parents[1]
IR_VERSION = 8  # onnxruntime 1.31 loads IR <= 13; onnx 1.23 would write 14


def _weights(shape: tuple[int, ...], phase: float) -> np.ndarray:
    """Return a smooth deterministic weight tensor, fan-in scaled (quantisation error stays small and repeatable)."""
    n = int(np.prod(shape))
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    values = np.cos(np.arange(n) * 0.7 + phase) * np.sin(np.arange(n) * 0.013 + 1.0 + phase)
    return (values * np.sqrt(3.0 / fan_in)).astype(np.float32).reshape(shape)


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(array, name))


def make_paddle_style(path: Path, *, batch: int = -1) -> Path:
    """x[-1,3,16,16] -> Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul + Add -> out[-1,4].

    Opset 11, every weight and bias a Constant node, the batch dim a literal ``batch`` (-1 as Paddle writes it).
    """
    nodes = [
        _constant("conv1.w", _weights((8, 3, 3, 3), 0.0)), _constant("conv1.b", _weights((8,), 0.5) * 0.1),
        _constant("conv2.w", _weights((8, 8, 3, 3), 1.0)), _constant("conv2.b", _weights((8,), 1.5) * 0.1),
        _constant("fc.w", _weights((8, 4), 2.0)), _constant("fc.b", _weights((4,), 2.5) * 0.1),
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "fc.w"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "fc.b"], ["out"], name="fc_bias"),
    ]
    graph = helper.make_graph(nodes, "paddle_style",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _images(n: int, seed: int) -> np.ndarray:
    """Return smooth image-like inputs (low-frequency patterns plus a little noise), axis 0 = samples."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16] / 16.0
    freq = rng.uniform(0.5, 3.0, size=(n, 3, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 3, 1, 1))
    base = np.sin(2 * np.pi * freq * xx + phase) * np.cos(2 * np.pi * freq * yy)
    return (base + 0.05 * rng.standard_normal((n, 3, 16, 16))).astype(np.float32)


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest_quantgate.frontends.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _steps(int8: Path) -> dict[str, dict[str, Any]]:
    record = read_provenance(int8)
    assert record is not None
    return {step["step"]: step for step in record["steps"]}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the Paddle-style model, a calibration set and a held-out soak fixture."""
    root = tmp_path_factory.mktemp("paddle_style")
    make_paddle_style(root / "m.onnx")
    np.savez(root / "cal.npz", x=_images(16, seed=1))
    np.savez(root / "soak.npz", x=_images(32, seed=2))
    return root


def test_plain_ort_cannot_quantise_the_export(export: Path, tmp_path: Path) -> None:
    """The ORT behaviour the stage exists for: weights in Constant nodes crash dynamic quantisation."""
    from onnxruntime.quantization import quantize_dynamic

    with pytest.raises(ValueError, match="to be an initializer"):
        quantize_dynamic(str(export / "m.onnx"), str(tmp_path / "plain.int8.onnx"))


def test_literal_minus_one_is_no_fixed_batch_size(export: Path) -> None:
    """A -1 batch dim read as a size made the calibration batch -1: no feed, ORT's 'No data is collected'."""
    (spec,) = model_inputs(onnx.load(str(export / "m.onnx")))
    assert spec.dims == (None, 3, 16, 16)


def test_cli_builds_and_the_gate_passes(export: Path, tmp_path: Path) -> None:
    model_dir, fixtures = tmp_path / "model", tmp_path / "fixtures"
    model_dir.mkdir()
    fixtures.mkdir()
    fp32 = model_dir / "m.onnx"
    fp32.write_bytes((export / "m.onnx").read_bytes())
    for name in ("cal.npz", "soak.npz"):
        (fixtures / name).write_bytes((export / name).read_bytes())
    before = fp32.read_bytes()

    static = _cli("ptq-static", fp32, "-o", model_dir / "m_static.int8.onnx", "--calibration-set", fixtures / "cal.npz")
    assert static.returncode == 0, static.stderr
    dynamic = _cli("ptq-dynamic", fp32, "-o", model_dir / "m_dyn.int8.onnx")
    assert dynamic.returncode == 0, dynamic.stderr
    assert fp32.read_bytes() == before  # the repairs work on a copy

    steps = _steps(model_dir / "m_static.int8.onnx")
    assert list(steps) == ["constants_to_initializers", "symbolic_dims", "drop_initializer_value_info",
                           "opset_upgrade", "quant_pre_process"]
    assert steps["constants_to_initializers"] == {
        "step": "constants_to_initializers", "status": "ran", "converted": 6,
        "consumers": {"Add": 1, "Conv": 4, "MatMul": 1}}
    assert steps["symbolic_dims"] == {"step": "symbolic_dims", "status": "ran", "axes": {"out": [0], "x": [0]}}
    assert steps["opset_upgrade"] == {"step": "opset_upgrade", "status": "ran", "from": 11, "to": 17}
    assert steps["quant_pre_process"]["status"] == "ran"
    record = read_provenance(model_dir / "m_static.int8.onnx")
    assert record is not None and record["calibration"]["batch_size"] == 1
    assert record["calibration"]["samples_used"] == 16
    assert record["int8_op_counts"]["DequantizeLinear"] >= 3  # both convs and the MatMul run in int8

    steps = _steps(model_dir / "m_dyn.int8.onnx")
    assert list(steps) == ["constants_to_initializers", "symbolic_dims", "drop_initializer_value_info",
                           "quant_pre_process"]
    assert steps["quant_pre_process"] == {"step": "quant_pre_process", "status": "skipped",
                                          "reason": "not used for dynamic quantisation"}
    ops = read_provenance(model_dir / "m_dyn.int8.onnx")["int8_op_counts"]  # type: ignore[index]
    assert ops.get("ConvInteger") == 2 and ops.get("MatMulInteger") == 1

    entries = [{"id": f"m_{kind}", "description": f"Paddle-style export, {kind}", "onnx": "m.onnx",
                "int8_onnx": f"m_{kind}.int8.onnx", "soak_fixture": "soak.npz",
                "quant_mode": "static" if kind == "static" else "dynamic", "quant_accuracy_budget_plcc": 0.01,
                "sha256": "0" * 64, "int8_sha256": "0" * 64} for kind in ("static", "dyn")]
    entries[0]["quant_calibration_set"] = "cal.npz"
    registry = model_dir / "registry.json"
    registry.write_text(json.dumps({"schema_version": 1, "models": entries}, indent=1))
    pinned = _cli("pin", registry, "--fixtures", fixtures)
    assert pinned.returncode == 0, pinned.stderr
    report = tmp_path / "report.json"
    measured = _cli("measure", registry, "--fixtures", fixtures, "--ep", "cpu", "--json", report)
    assert measured.returncode == 0, measured.stdout + measured.stderr
    assert "2 passed, 0 failed" in measured.stdout


def test_builds_are_byte_identical(export: Path, tmp_path: Path) -> None:
    from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic
    from pytest_quantgate.producers.ptq_static import StaticConfig, quantize_static

    hashes = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        fp32 = folder / "m.onnx"
        fp32.write_bytes((export / "m.onnx").read_bytes())
        static = quantize_static(fp32, folder / "s.int8.onnx", StaticConfig(calibration_set=export / "cal.npz"))
        dynamic = quantize_dynamic(fp32, folder / "d.int8.onnx", DynamicConfig())
        hashes.append((static.sha256, dynamic.sha256))
    assert hashes[0] == hashes[1]


def test_symbolic_shape_inference_failure_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two inputs whose batch axes are named apart and broadcast together: ORT's symbolic shape inference gives
    up ("Incomplete symbolic shape inference"); the model still quantises and the record says how."""
    from pytest_quantgate.producers.ptq_static import StaticConfig, quantize_static

    monkeypatch.chdir(tmp_path)  # ORT drops sym_shape_infer_temp.onnx into the CWD when symbolic inference fails
    nodes = [_constant("W", _weights((64, 4), 0.0)),
             helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
             helper.make_node("Add", ["a", "y"], ["out"], name="add")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 64]),
                                             helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [-1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = IR_VERSION
    fp32 = tmp_path / "two.onnx"
    onnx.save(model, str(fp32))
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((32, 64)).astype(np.float32),
             y=rng.standard_normal((32, 4)).astype(np.float32))

    result = quantize_static(fp32, tmp_path / "two.int8.onnx", StaticConfig(calibration_set=tmp_path / "cal.npz"))
    steps = {s["step"]: s for s in result.provenance["steps"]}
    pre = steps["quant_pre_process"]
    assert pre["status"] == "ran" and pre["symbolic_shape_inference"] is False
    assert "Incomplete symbolic shape inference" in pre["attempts"][0]["error"]
    assert pre["attempts"][1] == {"skip_symbolic_shape": True, "error": None}
    assert steps["symbolic_dims"]["axes"] == {"out": [0], "x": [0], "y": [0]}
    # nothing left in the CWD: ORT's failed inference saved its model there with a <uuid1>.data file of weights
    # (over onnx's 1 KiB threshold: 64 × 4 float32), both removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "two.int8.onnx", "two.onnx"]

    from modelkit import cpu_session

    feed = {"x": rng.standard_normal((5, 64)).astype(np.float32), "y": rng.standard_normal((5, 4)).astype(np.float32)}
    ref, got = cpu_session(fp32).run(None, feed)[0], cpu_session(result.int8_path).run(None, feed)[0]
    assert np.max(np.abs(ref - got)) < 0.05 * np.max(np.abs(ref))


def test_a_model_needing_no_repair_keeps_its_record() -> None:
    """No-op repairs leave no step: a clean model's record (and a pinned sidecar's bytes) is what it was."""
    model = onnx.load(str(ROOT / "model" / "residual_filter_v1.onnx"))
    assert preprocess.constants_to_initializers(model)["status"] == "nothing_to_do"
    assert preprocess.symbolic_dims(model)["status"] == "nothing_to_do"
    record = read_provenance(ROOT / "model" / "residual_filter_v1.int8.onnx")
    assert record is not None
    assert [s["step"] for s in record["steps"]] == ["drop_initializer_value_info", "opset_upgrade", "quant_pre_process"]


def test_constants_become_initializers_and_the_model_computes_the_same(export: Path, tmp_path: Path) -> None:
    from modelkit import cpu_session

    model = onnx.load(str(export / "m.onnx"))
    model.graph.node.append(_constant("extra_out", np.arange(3, dtype=np.float32)))
    model.graph.output.append(helper.make_tensor_value_info("extra_out", TensorProto.FLOAT, [3]))
    step = preprocess.constants_to_initializers(model)
    assert step["converted"] == 6  # the constant that is a graph output stays a node
    assert [n.op_type for n in model.graph.node].count("Constant") == 1
    assert {i.name for i in model.graph.initializer} == {"conv1.w", "conv1.b", "conv2.w", "conv2.b", "fc.w", "fc.b"}
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    x = _images(3, seed=9)
    ref = cpu_session(export / "m.onnx").run(["out"], {"x": x})[0]
    np.testing.assert_array_equal(cpu_session(tmp_path / "fixed.onnx").run(["out"], {"x": x})[0], ref)


def test_a_failed_opset_conversion(export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-tensor QDQ goes on at the old opset (recorded); per-channel would write an invalid model: an error."""
    import onnx.version_converter

    def broken(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("no adapter for Clip")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    model = onnx.load(str(export / "m.onnx"))
    step = preprocess.upgrade_opset(export / "m.onnx", model, 17, per_channel=False)
    assert step == {"step": "opset_upgrade", "status": "failed_continued_without", "from": 11, "to": 17,
                    "error": "RuntimeError: no adapter for Clip"}
    assert preprocess.model_opset(model) == 11
    with pytest.raises(ProducerError, match=r"stage 'opset upgrade'.*per_channel=False quantises at opset 11"):
        preprocess.upgrade_opset(export / "m.onnx", model, 17, per_channel=True)
