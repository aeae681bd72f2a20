"""Build small, real ONNX models and soak fixtures for the tests (weights fitted on real scikit-learn data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pytest_quantgate.fileio import sha256_file


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (train_x, train_y, test_x, test_y) from scikit-learn's digits: 64 pixel features -> digit value."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.float64)
    rng = np.random.default_rng(7)
    order = rng.permutation(len(x))
    train, test = order[:600], order[600:]
    return x[train], y[train], x[test], y[test]


def fitted_mlp_weights(hidden: int = 32) -> dict[str, np.ndarray]:
    """Fit a random-feature MLP (fixed projection + least-squares readout) on the digits table."""
    train_x, train_y, _, _ = digits_split()
    rng = np.random.default_rng(11)
    w1 = rng.normal(0, 0.5, size=(64, hidden)).astype(np.float32)
    b1 = rng.normal(0, 0.1, size=(hidden,)).astype(np.float32)
    h = np.maximum(train_x @ w1 + b1, 0)
    design = np.hstack([h, np.ones((len(h), 1), np.float32)])
    coef, *_ = np.linalg.lstsq(design, train_y, rcond=None)
    w2 = coef[:-1].reshape(hidden, 1).astype(np.float32)
    b2 = np.array([coef[-1]], dtype=np.float32)
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2}


def mlp_model(weights: dict[str, np.ndarray], input_name: str = "features", output_name: str = "score",
              opset: int = 17) -> onnx.ModelProto:
    """Return a Gemm-Relu-Gemm ONNX model with a dynamic batch axis."""
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Gemm", [input_name, "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], [output_name], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", weights["w1"].shape[0]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ragged_model(keep_from_input: bool, column: bool = False) -> onnx.ModelProto:
    """Return x[N, 8] -> some values of x @ W, flattened: y[K] (or y[K, 1] with ``column``).

    ``keep_from_input``: which values are kept is decided by the input (x > 0), so int8 keeps the same ones;
    otherwise by the product itself (x @ W > 0), which int8 moves across zero now and then.
    """
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(8, 8)).astype(np.float32)
    mask_of = "xv" if keep_from_input else "hv"
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Reshape", ["h", "flat"], ["hv"]),
        helper.make_node("Reshape", ["x", "flat"], ["xv"]),
        helper.make_node("Greater", [mask_of, "zero"], ["keep"]),
        helper.make_node("Compress", ["hv", "keep"], ["kept" if column else "y"]),
    ]
    if column:
        nodes.append(helper.make_node("Unsqueeze", ["kept", "last"], ["y"]))
    out_shape: list[Any] = ["K", 1] if column else ["K"]
    graph = helper.make_graph(
        nodes, "ragged", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([-1], np.int64), "flat"),
                     numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                     numpy_helper.from_array(np.array([1], np.int64), "last")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def zipmap_classifier(string_labels: bool = False, ridge: float = 1.0) -> onnx.ModelProto:
    """Return a digits classifier laid out as skl2onnx writes one: ``label`` and ZipMap ``output_probability``.

    Gemm (a ridge fit on one-hot targets) -> Softmax -> ArgMax ``label`` (int64, or the class name through a
    Gather with ``string_labels``) and ``output_probability``, a seq(map(int64|string, float)) from ai.onnx.ml's
    ZipMap.
    """
    train_x, train_y, _, _ = digits_split()
    design = np.hstack([train_x, np.ones((len(train_x), 1), np.float32)])
    targets = np.eye(10)[train_y.astype(int)] * 8.0
    coef = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ targets)
    names = [f"digit_{i}" for i in range(10)]
    nodes = [
        helper.make_node("Gemm", ["features", "w", "b"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
        helper.make_node("ArgMax", ["probabilities"], ["index" if string_labels else "label"], axis=1, keepdims=0),
        helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml",
                         **({"classlabels_strings": names} if string_labels
                            else {"classlabels_int64s": list(range(10))})),
    ]
    inits = [numpy_helper.from_array(coef[:-1].astype(np.float32), "w"),
             numpy_helper.from_array(coef[-1].astype(np.float32), "b")]
    if string_labels:
        nodes.append(helper.make_node("Gather", ["classes", "index"], ["label"], axis=0))
        inits.append(numpy_helper.from_array(np.array(names, dtype=object), "classes"))
    key = TensorProto.STRING if string_labels else TensorProto.INT64
    probability = helper.make_value_info("output_probability", helper.make_sequence_type_proto(
        helper.make_map_type_proto(key, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("label", key, ["N"]), probability], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def quantize_dynamic_file(fp32: Path, int8: Path) -> None:
    """Write a real ORT dynamic-int8 sidecar."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)


def cpu_session(path: Path | str) -> Any:
    """Return a CPU session with the gate's int8 kernels (exact int8 sums on x86 CPUs without VNNI too)."""
    import onnxruntime as ort

    from pytest_quantgate.engine.providers import X64_PRECISION

    options = ort.SessionOptions()
    for key, value in X64_PRECISION.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def write_registry(path: Path, models: list[dict[str, Any]], schema_version: int = 1) -> Path:
    """Write a registry.json and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": schema_version, "models": models}, indent=2))
    return path


def pin(entry: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Fill in sha256 and int8_sha256 of an entry from the files in ``folder``."""
    entry = dict(entry)
    entry["sha256"] = sha256_file(folder / entry["onnx"])
    int8 = entry.get("int8_onnx", entry["onnx"].removesuffix(".onnx") + ".int8.onnx")
    if (folder / int8).exists():
        entry["int8_sha256"] = sha256_file(folder / int8)
        from pytest_quantgate.producers.build import pinned_build
        from pytest_quantgate.producers.provenance import read_provenance

        build = pinned_build(read_provenance(folder / int8))  # as `quantgate pin` records it
        if build is not None:
            entry["int8_build"] = build
    return entry


def registry_entry(**raw: Any) -> Any:
    """Return the Entry a one-entry registry of ``raw`` keys parses to (files need not exist); refuse problems."""
    from pytest_quantgate.io.registry import parse_registry

    keys = {"id": "synthetic", "onnx": "s.onnx", "quant_mode": "dynamic", "sha256": "0" * 64,
            "int8_sha256": "1" * 64, **raw}
    registry = parse_registry({"schema_version": 1, "models": [keys]}, Path("registry.json"))
    assert not registry.problems, registry.problems
    return registry.entries[0]
