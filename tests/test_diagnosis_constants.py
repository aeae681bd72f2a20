"""diagnose() on an fp32 graph whose weights are Constant nodes (as Paddle exports them), and on a scalar weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pytest_quantgate.analysis import qgraph
from pytest_quantgate.analysis.diagnosis import diagnose, feeds_from_fixture

ROOT = Path(__file__).resolve().parents[1]


def _feeds() -> list[dict[str, np.ndarray]]:
    with np.load(ROOT / "fixtures" / "fusion_mlp_v1.npz") as npz:
        inputs = {k: npz[k] for k in npz.files if k != "target"}
    return feeds_from_fixture(inputs, batched=True, count=3, batch=16)


def _as_constants(src: Path, dst: Path) -> None:
    """Move every initializer of ``src`` into a Constant node of the same output name."""
    model = onnx.load(str(src))
    constants = [helper.make_node("Constant", [], [init.name], value=init) for init in model.graph.initializer]
    nodes = list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(constants + nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def test_weights_held_in_constant_nodes_are_compared_like_initializers(tmp_path: Path) -> None:
    fp32, int8 = ROOT / "model" / "fusion_mlp_v1.onnx", ROOT / "model" / "fusion_mlp_v1.int8.onnx"
    _as_constants(fp32, tmp_path / "const.onnx")
    plain = diagnose(fp32, int8, _feeds(), top=10)
    const = diagnose(tmp_path / "const.onnx", int8, _feeds(), top=10)
    expected = {t.tensor: t.sqnr_db for t in plain.worst if t.kind == "weight"}
    assert set(expected) == {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight"}
    assert {t.tensor: t.sqnr_db for t in const.worst if t.kind == "weight"} == expected
    assert "weights" in const.analysed
    assert not any("matched no fp32 initializer" in n for n in const.notes)


def test_a_scalar_weight_dequantises_to_an_array(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "q_scale", "q_zero_point"], ["w"])], "g", [],
        [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array(7, np.int8), "q"),
                     numpy_helper.from_array(np.array(0.5, np.float32), "q_scale"),
                     numpy_helper.from_array(np.array(1, np.int8), "q_zero_point")])
    tensor = qgraph.read_int8(qgraph.Graph(helper.make_model(graph), tmp_path))[0]
    found = (tensor.values, tensor.step)
    assert found[1] is not None
    values, step = found
    assert step.shape == ()
    assert isinstance(values, np.ndarray) and values.shape == () and float(values) == 3.0
    assert qgraph.sqnr_db(np.array(3.0), values) == float("inf")
