"""Tests of the PTQ producers (dynamic and static) and the provenance helpers.

Test models are built here with onnx.helper: an MLP, a small conv net, opset-11/12 variants, a two-input graph on
which ORT's symbolic shape inference fails, and a graph with value_info duplicating an initializer. Weights are
smooth deterministic patterns (not noise), so quantisation error is small and comparable across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from modelkit import cpu_session
from onnx import TensorProto, helper, numpy_helper

from pytest_quantgate.fileio import sha256_file
from pytest_quantgate.producers import ptq_dynamic, ptq_static
from pytest_quantgate.producers.base import ProducerError
from pytest_quantgate.producers.provenance import (
    library_versions,
    provenance_path_for,
    read_provenance,
    write_provenance,
)
from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic
from pytest_quantgate.producers.ptq_static import StaticConfig, quantize_static

IR_VERSION = 8  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 loads IR <= 13


# ---------------------------------------------------------------------------------------------------------------
# model builders


def _weights(shape: tuple[int, ...], phase: float = 0.0, scale: float = 0.5) -> np.ndarray:
    """A smooth, deterministic weight tensor (cosine pattern over the flattened index, fan-in scaled)."""
    n = int(np.prod(shape))
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    values = np.cos(np.arange(n) * 0.7 + phase) * np.sin(np.arange(n) * 0.013 + 1.0 + phase)
    return (values * scale * np.sqrt(3.0 / fan_in)).astype(np.float32).reshape(shape)


def _save(model: onnx.ModelProto, path: Path, opset: int) -> Path:
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", opset))
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_mlp(path: Path, opset: int = 17, hidden: int = 32, layers: int = 2) -> Path:
    """x[N,16] -> Gemm(fc1) -> Relu -> ... -> MatMul(head) -> out[N,4]."""
    nodes, inits, prev, width = [], [], "x", 16
    for i in range(layers):
        w, b = f"W{i}", f"B{i}"
        # Gemm with transB=1: weight stored [out, in] like torch.nn.Linear
        inits += [numpy_helper.from_array(_weights((hidden, width), phase=i), w),
                  numpy_helper.from_array(_weights((hidden,), phase=i + 0.5, scale=0.1), b)]
        nodes += [helper.make_node("Gemm", [prev, w, b], [f"h{i}"], name=f"fc{i + 1}", transB=1),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i + 1}")]
        prev, width = f"r{i}", hidden
    inits.append(numpy_helper.from_array(_weights((width, 4), phase=9.0), "Whead"))
    nodes.append(helper.make_node("MatMul", [prev, "Whead"], ["out"], name="head"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], inits)
    return _save(helper.make_model(graph), path, opset)


def make_convnet(path: Path, opset: int = 17, size: int = 16, channels: int = 8, batch: str | int = "N") -> Path:
    """x[N,3,S,S] -> Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> out[N,5]."""
    c = channels
    inits = [
        numpy_helper.from_array(_weights((c, 3, 3, 3), 0.1), "conv1.w"),
        numpy_helper.from_array(_weights((c,), 0.2, 0.1), "conv1.b"),
        numpy_helper.from_array(_weights((c, c, 3, 3), 0.3), "conv2.w"),
        numpy_helper.from_array(_weights((c,), 0.4, 0.1), "conv2.b"),
        numpy_helper.from_array(_weights((5, c), 0.5), "fc.w"),
        numpy_helper.from_array(_weights((5,), 0.6, 0.1), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["out"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 5])], inits)
    return _save(helper.make_model(graph), path, opset)


def make_two_input(path: Path) -> Path:
    """Two inputs whose batch dims carry different symbolic names and are broadcast together.

    ORT's symbolic shape inference cannot merge ``batch_x`` with ``batch_y`` (without auto_merge) and raises
    "Incomplete symbolic shape inference" -- the pattern of exports that name each input's dynamic axis
    separately.
    """
    inits = [numpy_helper.from_array(_weights((8, 4)), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
             helper.make_node("Add", ["a", "y"], ["out"], name="add")]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_x", 8]),
                       helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_y", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4])], inits)
    return _save(helper.make_model(graph), path, 17)


def add_conflicting_value_info(path: Path) -> Path:
    """Add a value_info named like an initializer, with the wrong shape (ORT shape inference then fails)."""
    model = onnx.load(str(path))
    init = model.graph.initializer[0]
    wrong = list(reversed(init.dims)) if len(set(init.dims)) > 1 else [d + 1 for d in init.dims]
    model.graph.value_info.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, wrong))
    onnx.save(model, str(path))  # no checker: the model is deliberately inconsistent
    return path


def _inputs(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype(np.float32)


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = cpu_session(path)
    return session.run(None, feed)[0]


def _assert_close(fp32: Path, int8: Path, feed: dict[str, np.ndarray], rel: float = 0.1) -> None:
    ref, got = _run(fp32, feed), _run(int8, feed)
    assert got.shape == ref.shape
    err = np.max(np.abs(ref - got)) / (np.max(np.abs(ref)) + 1e-12)
    assert err < rel, f"int8 differs from fp32 by {err:.3f} of the output range"


def _node(model_path: Path, name: str) -> onnx.NodeProto:
    return next(n for n in onnx.load(str(model_path)).graph.node if n.name == name)


def _producers(path: Path) -> dict[str, str]:
    """Map each tensor name to the op type of the node that produces it."""
    return {out: n.op_type for n in onnx.load(str(path)).graph.node for out in n.output}


@pytest.fixture()
def conv_cal(tmp_path: Path) -> Path:
    path = tmp_path / "cal.npz"
    np.savez(path, x=_inputs(12, (3, 16, 16)), target=np.arange(12))
    return path


# ---------------------------------------------------------------------------------------------------------------
# provenance


def test_provenance_path_and_versions(tmp_path: Path) -> None:
    assert provenance_path_for(tmp_path / "m.int8.onnx") == tmp_path / "m.int8.json"
    versions = library_versions()
    assert versions["onnxruntime"] == ort.__version__
    assert versions["onnxruntime_distribution"] == "onnxruntime"
    assert versions["onnx"] == onnx.__version__ and versions["numpy"] == np.__version__
    target = write_provenance(tmp_path / "m.int8.onnx", {"path": tmp_path, "t": (1, 2)})
    assert json.loads(target.read_text()) == {"path": str(tmp_path), "t": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.json"]


def test_library_versions_never_imports_torch() -> None:
    code = ("import sys; from pytest_quantgate.producers.provenance import library_versions; "
            "v = library_versions(); assert 'torch' not in sys.modules, 'torch imported'; print(v)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# dynamic


def test_dynamic_mlp(tmp_path: Path) -> None:
    fp32 = make_mlp(tmp_path / "m.onnx")
    before = sha256_file(fp32)
    result = quantize_dynamic(fp32, tmp_path / "m.int8.onnx", DynamicConfig())
    assert result.sha256 == sha256_file(result.int8_path)
    assert result.provenance_path == result.int8_path  # the record lives inside the sidecar
    ops = {n.op_type for n in onnx.load(str(result.int8_path)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    _assert_close(fp32, result.int8_path, {"x": _inputs(8, (16,))[:, :]})
    record = read_provenance(result.int8_path)
    assert record["mode"] == "ptq-dynamic" and record["fp32_sha256"] == before
    assert record["int8_sha256"] == result.sha256
    assert record["config"] == DynamicConfig().to_dict()
    assert record["library_versions"]["onnxruntime"] == ort.__version__
    assert sha256_file(fp32) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx"]


def test_dynamic_nodes_to_exclude_and_per_channel_opset11(tmp_path: Path) -> None:
    fp32 = make_mlp(tmp_path / "m.onnx", opset=11)
    config = DynamicConfig(per_channel=True, nodes_to_exclude=("head",))
    result = quantize_dynamic(fp32, tmp_path / "m.int8.onnx", config)
    head = _node(result.int8_path, "head")
    assert head.op_type == "MatMul" and head.input[1] == "Whead"  # float weight, float MatMul
    _assert_close(fp32, result.int8_path, {"x": _inputs(8, (16,))})
    steps = {s["step"]: s for s in result.provenance["steps"]}
    assert steps["opset_upgrade"] == {"step": "opset_upgrade", "status": "ran", "from": 11, "to": 17}


def test_dynamic_drops_duplicated_value_info_on_a_copy(tmp_path: Path) -> None:
    fp32 = add_conflicting_value_info(make_mlp(tmp_path / "m.onnx"))
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with pytest.raises(Exception, match="Inferred shape and existing shape differ"):  # the ORT behaviour we fix
        ort_quantize_dynamic(str(fp32), str(tmp_path / "plain.onnx"))
    (tmp_path / "plain.onnx").unlink(missing_ok=True)
    before = fp32.read_bytes()
    result = quantize_dynamic(fp32, tmp_path / "m.int8.onnx", DynamicConfig())
    assert fp32.read_bytes() == before
    assert result.provenance["steps"][0] == {"step": "drop_initializer_value_info", "status": "ran", "removed": ["W0"]}
    _assert_close(fp32, result.int8_path, {"x": _inputs(4, (16,))})


def test_dynamic_unknown_excluded_node_is_an_error(tmp_path: Path) -> None:
    fp32 = make_mlp(tmp_path / "m.onnx")
    with pytest.raises(ProducerError, match=r"nodes_to_exclude names node\(s\) not in the model: 'haed'"):
        quantize_dynamic(fp32, tmp_path / "m.int8.onnx", DynamicConfig(nodes_to_exclude=("haed",)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_unloadable_fp32_is_named(tmp_path: Path) -> None:
    fp32 = make_mlp(tmp_path / "m.onnx")
    model = onnx.load(str(fp32))
    model.ir_version = 99
    onnx.save(model, str(fp32))
    with pytest.raises(ProducerError, match=r"m\.onnx: stage 'load fp32': onnxruntime .* cannot load the fp32 model"):
        quantize_dynamic(fp32, tmp_path / "m.int8.onnx", DynamicConfig())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="weight_type must be one of 'int8', 'uint8', got 'int4'"):
        DynamicConfig(weight_type="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nodes_to_exclude must be a tuple of names"):
        DynamicConfig(nodes_to_exclude="fc1")  # type: ignore[arg-type]
    assert DynamicConfig(nodes_to_exclude=["a"]).nodes_to_exclude == ("a",)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DynamicConfig(True)  # type: ignore[misc]  # keyword-only
    with pytest.raises(ValueError, match="calibrate_method must be one of"):
        StaticConfig(calibration_set=Path("c.npz"), calibrate_method="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="moving_average only applies to calibrate_method='minmax'"):
        StaticConfig(calibration_set=Path("c.npz"), calibrate_method="entropy", moving_average=True)
    with pytest.raises(ValueError, match=r"percentile must be a number in \(0, 100\]"):
        StaticConfig(calibration_set=Path("c.npz"), percentile=0)
    config = StaticConfig(calibration_set="c.npz")  # type: ignore[arg-type]
    assert config.calibration_set == Path("c.npz")
    with pytest.raises(Exception):  # frozen
        config.per_channel = False  # type: ignore[misc]


def test_argparse_round_trip() -> None:
    parser = argparse.ArgumentParser()
    ptq_dynamic.add_arguments(parser)
    ns = parser.parse_args(["--per-channel", "--nodes-to-exclude", "a,b", "--nodes-to-exclude", "c"])
    assert ptq_dynamic.config_from_args(ns) == DynamicConfig(per_channel=True, nodes_to_exclude=("a", "b", "c"))
    assert ptq_dynamic.config_from_args(parser.parse_args([])) == DynamicConfig()

    parser = argparse.ArgumentParser()
    ptq_static.add_arguments(parser)
    ns = parser.parse_args(["--calibration-set", "c.npz", "--calibrate-method", "percentile", "--no-per-channel",
                            "--op-types-to-exclude", "Gemm", "--max-calibration-samples", "8", "--percentile", "99.9"])
    assert ptq_static.config_from_args(ns) == StaticConfig(
        calibration_set=Path("c.npz"), calibrate_method="percentile", per_channel=False,
        op_types_to_exclude=("Gemm",), max_calibration_samples=8, percentile=99.9)
    assert ptq_static.config_from_args(parser.parse_args(["--calibration-set", "c.npz"])) == StaticConfig(
        calibration_set=Path("c.npz"))


# ---------------------------------------------------------------------------------------------------------------
# static


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_convnet_each_calibrate_method(tmp_path: Path, conv_cal: Path, method: str) -> None:
    fp32 = make_convnet(tmp_path / "m.onnx")
    result = quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=conv_cal,
                                                                         calibrate_method=method))
    ops = _producers(result.int8_path)
    assert "QuantizeLinear" in ops.values() and "DequantizeLinear" in ops.values()
    _assert_close(fp32, result.int8_path, {"x": _inputs(4, (3, 16, 16), seed=1)}, rel=0.15)
    record = read_provenance(result.int8_path)
    assert record["config"]["calibrate_method"] == method
    assert record["calibration"] == {
        "path": conv_cal.name, "sha256": sha256_file(conv_cal), "sample_count": 12, "samples_used": 12,
        "batch_size": 1, "batches": 12, "layout": {"x": "axis 0 is the model's batch axis"}}
    assert record["fp32_sha256"] == sha256_file(fp32) and record["int8_sha256"] == result.sha256
    if method == "percentile":
        assert record["extra_options"]["CalibPercentile"] == 99.999
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "m.int8.onnx", "m.onnx"]


@pytest.mark.parametrize("opset", [11, 12])
def test_static_per_channel_old_opset_is_upgraded(tmp_path: Path, conv_cal: Path, opset: int) -> None:
    fp32 = make_convnet(tmp_path / "m.onnx", opset=opset)
    result = quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=conv_cal))
    upgraded = next(s for s in result.provenance["steps"] if s["step"] == "opset_upgrade")
    assert upgraded == {"step": "opset_upgrade", "status": "ran", "from": opset, "to": 17}
    # per-channel: a weight DequantizeLinear carries a 1-D scale with one entry per output channel
    model = onnx.load(str(result.int8_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    conv1_w = _node(result.int8_path, "conv1").input[1]
    dq = next(n for n in model.graph.node if conv1_w in n.output)
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[1]].shape == (8,)
    _assert_close(fp32, result.int8_path, {"x": _inputs(4, (3, 16, 16), seed=2)}, rel=0.15)


def test_static_qoperator_mlp_per_sample_layout(tmp_path: Path) -> None:
    fp32 = make_mlp(tmp_path / "m.onnx", opset=12)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=_inputs(64, (2, 16)))  # one model input [2, 16] per sample
    config = StaticConfig(calibration_set=cal, quant_format="qoperator", per_channel=False, max_calibration_samples=48)
    result = quantize_static(fp32, tmp_path / "m.int8.onnx", config)
    assert "QGemm" in _producers(result.int8_path).values() or "QLinearMatMul" in _producers(result.int8_path).values()
    assert result.provenance["calibration"]["samples_used"] == 48
    assert result.provenance["calibration"]["layout"] == {"x": "one model input per sample"}
    _assert_close(fp32, result.int8_path, {"x": _inputs(6, (16,), seed=3)})


def test_static_nodes_and_op_types_to_exclude(tmp_path: Path, conv_cal: Path) -> None:
    fp32 = make_convnet(tmp_path / "m.onnx")
    config = StaticConfig(calibration_set=conv_cal, nodes_to_exclude=("conv2",), op_types_to_exclude=("Gemm",))
    result = quantize_static(fp32, tmp_path / "m.int8.onnx", config)
    produced_by = _producers(result.int8_path)
    floats = {i.name for i in onnx.load(str(result.int8_path)).graph.initializer if i.data_type == TensorProto.FLOAT}
    for name, weight in (("conv2", "conv2.w"), ("fc", "fc.w")):
        node = _node(result.int8_path, name)
        assert node.input[1] == weight and weight in floats, f"{name} weight was quantised"
        assert produced_by.get(node.output[0]) == node.op_type
        assert not any(n.op_type == "QuantizeLinear" and n.input[0] == node.output[0]
                       for n in onnx.load(str(result.int8_path)).graph.node if name == "fc")
    conv1_w = _node(result.int8_path, "conv1").input[1]
    assert produced_by[conv1_w] == "DequantizeLinear"  # the rest is still quantised
    assert result.provenance["nodes_excluded"] == ["conv2", "fc"]
    assert result.provenance["nodes_excluded_by_op_type"] == ["fc"]


def test_static_exclusion_survives_preprocessing_fusion(tmp_path: Path) -> None:
    """ORT's pre-processing optimiser fuses MatMul+Add into a Gemm named 'mm/MatMulAddFusion', which would
    silently drop an exclusion of 'mm'; the producer re-runs pre-processing without optimisation instead."""
    inits = [numpy_helper.from_array(_weights((8, 4)), "W"), numpy_helper.from_array(_weights((4,), 1.0), "b"),
             numpy_helper.from_array(_weights((4, 4), 2.0), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="bias"),
             helper.make_node("MatMul", ["a", "W2"], ["out"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], inits)
    fp32 = _save(helper.make_model(graph), tmp_path / "m.onnx", 17)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=_inputs(64, (8,)))
    result = quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=cal, nodes_to_exclude=("mm",)))
    step = next(s for s in result.provenance["steps"] if s["step"] == "quant_pre_process")
    assert step["optimisation"] is False and step["attempts"][-1]["skip_optimization"] is True
    assert "optimiser removed excluded node(s) ['mm']" in step["attempts"][-1]["reason"]
    mm = _node(result.int8_path, "mm")
    assert mm.op_type == "MatMul" and mm.input[1] == "W"
    assert _producers(result.int8_path)[_node(result.int8_path, "mm2").input[1]] == "DequantizeLinear"
    _assert_close(fp32, result.int8_path, {"x": _inputs(4, (8,), seed=9)})


def test_static_symbolic_shape_inference_failure_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # ORT drops sym_shape_infer_temp.onnx into the CWD when symbolic inference fails
    fp32 = make_two_input(tmp_path / "m.onnx")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with pytest.raises(Exception, match="Incomplete symbolic shape inference"):  # the real ORT failure
        quant_pre_process(str(fp32), str(tmp_path / "pp.onnx"))
    (tmp_path / "sym_shape_infer_temp.onnx").unlink()
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=_inputs(64, (8,)), y=_inputs(64, (4,), seed=5))
    result = quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=cal))
    step = next(s for s in result.provenance["steps"] if s["step"] == "quant_pre_process")
    assert step["status"] == "ran" and step["symbolic_shape_inference"] is False
    assert "Incomplete symbolic shape inference" in step["attempts"][0]["error"]
    assert step["attempts"][1] == {"skip_symbolic_shape": True, "error": None}
    _assert_close(fp32, result.int8_path, {"x": _inputs(3, (8,), 7), "y": _inputs(3, (4,), 8)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "m.int8.onnx", "m.onnx"]


def test_static_preprocessing_failing_entirely_is_recorded(tmp_path: Path, conv_cal: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization.shape_inference as shape_inference

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("pre-processing exploded")

    monkeypatch.setattr(shape_inference, "quant_pre_process", broken)
    fp32 = make_convnet(tmp_path / "m.onnx")
    result = quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=conv_cal))
    step = next(s for s in result.provenance["steps"] if s["step"] == "quant_pre_process")
    assert step["status"] == "failed_continued_without" and len(step["attempts"]) == 2
    assert all("pre-processing exploded" in a["error"] for a in step["attempts"])
    _assert_close(fp32, result.int8_path, {"x": _inputs(2, (3, 16, 16))}, rel=0.15)


def test_static_duplicated_value_info(tmp_path: Path, conv_cal: Path) -> None:
    fp32 = add_conflicting_value_info(make_convnet(tmp_path / "m.onnx"))
    before = sha256_file(fp32)
    result = quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=conv_cal))
    assert result.provenance["steps"][0]["removed"] == ["conv1.w"]
    assert sha256_file(fp32) == before
    _assert_close(fp32, result.int8_path, {"x": _inputs(2, (3, 16, 16))}, rel=0.15)


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"input": _inputs(4, (3, 16, 16))},
         ["array 'input' matches no model input (model inputs: 'x' float32 [?, 3, 16, 16]",
          "model input 'x' (float32 [?, 3, 16, 16]) has no array"]),
        ({"x": _inputs(4, (3, 16, 16)).astype(np.float64)},
         ["array 'x': dtype float64, expected float32 (convert with .astype(np.float32))"]),
        ({"x": _inputs(4, (3, 15, 16))}, ["array 'x': shape [4, 3, 15, 16], expected [?, 3, 16, 16] (axis 2: 15 != 16)"]),
        ({"x": _inputs(4, (2, 3, 16, 17))},
         ["array 'x': shape [4, 2, 3, 16, 17], expected [samples, ?, 3, 16, 16] (axis 4: 17 != 16)"]),
        ({"x": _inputs(4, (16, 16))}, ["array 'x': shape [4, 16, 16] (rank 3), expected rank 4"]),
    ],
    ids=["wrong-name", "wrong-dtype", "wrong-shape", "wrong-shape-per-sample", "wrong-rank"],
)
def test_static_calibration_set_mismatch(tmp_path: Path, arrays: dict[str, np.ndarray], expected: list[str]) -> None:
    fp32 = make_convnet(tmp_path / "m.onnx")
    cal = tmp_path / "cal.npz"
    np.savez(cal, **arrays)
    with pytest.raises(ProducerError) as info:
        quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=cal))
    message = str(info.value)
    assert message.startswith(f"{cal}: calibration set does not match the inputs of {fp32}:")
    for line in expected:
        assert line in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "m.onnx"]


def test_static_calibration_set_other_errors(tmp_path: Path) -> None:
    fp32 = make_two_input(tmp_path / "m.onnx")
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=_inputs(4, (8,)), y=_inputs(5, (4,)))
    with pytest.raises(ProducerError, match=r"arrays hold different numbers of samples: 'x': 4, 'y': 5"):
        quantize_static(fp32, tmp_path / "a.int8.onnx", StaticConfig(calibration_set=cal))
    np.savez(cal, x=np.array([{"a": 1}] * 4, dtype=object), y=_inputs(4, (4,)))
    with pytest.raises(ProducerError, match=r"array 'x': cannot be loaded without pickle"):
        quantize_static(fp32, tmp_path / "a.int8.onnx", StaticConfig(calibration_set=cal))
    np.save(tmp_path / "one.npy", _inputs(4, (8,)))
    with pytest.raises(ProducerError, match=r"must be an \.npz archive"):
        quantize_static(fp32, tmp_path / "a.int8.onnx", StaticConfig(calibration_set=tmp_path / "one.npy"))
    with pytest.raises(ProducerError, match=r"missing\.npz: calibration set not found"):
        quantize_static(fp32, tmp_path / "a.int8.onnx", StaticConfig(calibration_set=tmp_path / "missing.npz"))


def test_static_fixed_batch_model(tmp_path: Path) -> None:
    fp32 = make_convnet(tmp_path / "m.onnx", batch=2)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=_inputs(7, (3, 16, 16)))
    with pytest.raises(ProducerError, match="model input 'x' has a fixed batch size of 2, calibration_batch_size is 3"):
        quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=cal, calibration_batch_size=3))
    result = quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=cal))
    assert result.provenance["calibration"]["batch_size"] == 2
    assert result.provenance["calibration"]["samples_used"] == 6  # the incomplete last batch is dropped


def test_static_ort_crash_becomes_producer_error(tmp_path: Path, conv_cal: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    def crash(self: object) -> None:
        raise KeyError("conv1.b_quantized_scale")

    monkeypatch.setattr(QDQQuantizer, "_adjust_weight_quant_params_for_bias_tensors", crash)
    fp32 = make_convnet(tmp_path / "m.onnx")
    (tmp_path / "m.int8.onnx").write_bytes(b"old sidecar")
    with pytest.raises(ProducerError) as info:
        quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=conv_cal))
    message = str(info.value)
    assert message.startswith(f"{fp32}: stage 'quantize_static (calibrate + quantise, minmax)': onnxruntime crashed "
                              "in crash() (onnxruntime qdq_quantizer.py:")
    assert "KeyError" in message and "conv1.b_quantized_scale" in message
    assert (tmp_path / "m.int8.onnx").read_bytes() == b"old sidecar"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "m.int8.onnx", "m.onnx"]


def test_static_default_tensor_type_retry(tmp_path: Path, conv_cal: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization as quantization

    real = quantization.quantize_static
    calls: list[dict[str, object]] = []

    def flaky(*args: object, **kwargs: object) -> None:
        calls.append(dict(kwargs["extra_options"]))  # type: ignore[call-overload]
        if len(calls) == 1:
            raise ValueError("Unable to find data type for weight_name='fc.w'")
        real(*args, **kwargs)

    monkeypatch.setattr(quantization, "quantize_static", flaky)
    fp32 = make_convnet(tmp_path / "m.onnx")
    result = quantize_static(fp32, tmp_path / "m.int8.onnx", StaticConfig(calibration_set=conv_cal))
    assert "DefaultTensorType" not in calls[0] and calls[1]["DefaultTensorType"] == TensorProto.FLOAT
    assert any(s["step"] == "default_tensor_type_retry" for s in result.provenance["steps"])


# ---------------------------------------------------------------------------------------------------------------
# killed mid-run

_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import onnxruntime.quantization as quantization
    from pytest_quantgate.producers import ptq_static
    from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic
    from pytest_quantgate.producers.ptq_static import StaticConfig, quantize_static

    mode, fp32, int8, cal, marker = sys.argv[1:6]
    if mode == "static":  # killed during calibration: signal after a few real calibration batches
        real_reader = ptq_static._make_reader
        def reader(calibration):
            inner = real_reader(calibration)
            get_next = inner.get_next
            count = [0]
            def slow_next():
                count[0] += 1
                if count[0] == 3:
                    Path(marker).write_text("calibrating")
                time.sleep(0.05)
                return get_next()
            inner.get_next = slow_next
            return inner
        ptq_static._make_reader = reader
        quantize_static(Path(fp32), Path(int8), StaticConfig(calibration_set=Path(cal), calibrate_method="entropy"))
    else:  # killed after ORT wrote its int8 model into the scratch folder, before publishing
        real = quantization.quantize_dynamic
        def slow(*args, **kwargs):
            real(*args, **kwargs)
            Path(marker).write_text("quantised")
            time.sleep(60)
        quantization.quantize_dynamic = slow
        quantize_dynamic(Path(fp32), Path(int8), DynamicConfig())
    """
)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_killed_producer_leaves_no_partial_and_keeps_old_sidecar(tmp_path: Path, mode: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    models.mkdir()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    if mode == "static":
        fp32 = make_convnet(models / "m.onnx", size=32, channels=16)
        np.savez(models / "cal.npz", x=_inputs(200, (3, 32, 32)))
    else:
        fp32 = make_mlp(models / "m.onnx", hidden=512, layers=4)
    old_int8, old_json = models / "m.int8.onnx", models / "m.int8.json"
    old_int8.write_bytes(b"old sidecar")
    old_json.write_text('{"old": true}')
    listing = sorted(p.name for p in models.iterdir())
    marker = tmp_path / "marker"
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, mode, str(fp32), str(old_int8),
                             str(models / "cal.npz"), str(marker)], env=env, cwd=models,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, f"producer ended early: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "producer never reached the kill point"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in models.iterdir()) == listing  # no partial, no temp, nothing new
    assert old_int8.read_bytes() == b"old sidecar" and old_json.read_text() == '{"old": true}'
    leftovers = [p.name for p in scratch.iterdir()]
    # SIGKILL skips all cleanup...
    assert any(name.startswith(f"quantgate-ptq_{mode}-{proc.pid}-") for name in leftovers), leftovers

    # ...and the next producer run sweeps the dead process's scratch folder
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    small = make_mlp(tmp_path / "small.onnx")
    quantize_dynamic(small, tmp_path / "small.int8.onnx", DynamicConfig())
    assert not any(p.name.startswith(f"quantgate-ptq_{mode}-{proc.pid}-") for p in scratch.iterdir())
