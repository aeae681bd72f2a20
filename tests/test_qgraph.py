"""qgraph: the one model of an int8 graph's weights — read in every form, dequantised, paired with fp32, measured.

Sidecars are made by onnxruntime.quantization (dynamic, static QDQ and QOperator, MatMulNBits) from tiny models;
the forms ORT does not write by default (blocked int4 QDQ, QuantizeLinear of a float weight, run-time quantised
weights, hand-packed MatMulNBits) are built with onnx.helper.
"""

from __future__ import annotations

import math
from pathlib import Path

import convkit
import modelkit
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_quantgate.analysis import lineage, qgraph

RNG = np.random.default_rng(20)


def _save(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], path: Path | None = None,
          inputs: tuple[str, ...] = ("x",), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    if path is not None:
        onnx.save(model, str(path))
    return model


def matmul_fp32(path: Path) -> Path:
    """Save x @ w1 + b1 → Relu → @ w2 (MatMul weights [16, 32] and [32, 8])."""
    w1, b1, w2 = RNG.normal(0, 0.5, (16, 32)), RNG.normal(0, 0.1, 32), RNG.normal(0, 0.5, (32, 8))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in (("w1", w1), ("b1", b1), ("w2", w2))]
    _save(nodes, inits, path)
    return path


def quantise_static(fp32: Path, out: Path, input_name: str, shape: tuple[int, ...], fmt: str,
                    per_channel: bool = True) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            self._feeds = iter([{input_name: rng.normal(size=shape).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    quantize_static(str(fp32), str(out), Reader(), per_channel=per_channel,
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator)
    return out


class Built:
    """The tiny fp32 models of this module and their sidecars, built once."""

    def __init__(self, root: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        self.root = root
        self.mm = matmul_fp32(root / "mm.onnx")
        self.mm_dynamic = root / "mm.dyn.onnx"
        quantize_dynamic(str(self.mm), str(self.mm_dynamic), weight_type=QuantType.QInt8)
        self.mm_qdq = quantise_static(self.mm, root / "mm.qdq.onnx", "x", (2, 16), "qdq")
        self.mm_qop = quantise_static(self.mm, root / "mm.qop.onnx", "x", (2, 16), "qoperator")
        self.conv = convkit.conv_chain(root / "conv.onnx", layers=2, channels=4, size=16)
        self.conv_qop = quantise_static(self.conv, root / "conv.qop.onnx", "image", (2, 1, 16, 16), "qoperator")
        self.gemm = root / "gemm.onnx"
        onnx.save(modelkit.mlp_model(modelkit.fitted_mlp_weights(8)), str(self.gemm))
        self.gemm_qop = quantise_static(self.gemm, root / "gemm.qop.onnx", "features", (2, 64), "qoperator", False)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(self.mm)), block_size=16, is_symmetric=False)
        quantizer.process()
        self.mm_nbits = root / "mm.nbits.onnx"
        onnx.save(quantizer.model.model, str(self.mm_nbits))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("qgraph"))


def pairs(int8: Path | onnx.ModelProto, fp32: Path | onnx.ModelProto) -> dict[str, qgraph.Pairing]:
    """Return the int8 graph's pairings by int8 tensor name."""
    q = int8 if isinstance(int8, onnx.ModelProto) else onnx.load(str(int8))
    f = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load(str(fp32))
    return {p.tensor.name: p for p in qgraph.pair_weights(qgraph.Graph(q), qgraph.Graph(f))}


def assert_rounded(p: qgraph.Pairing) -> None:
    """A PTQ weight of this very fp32: every element within half a step of its fp32 value."""
    m = qgraph.measure(p)
    assert m.off_grid == 0.0 and m.off_step == 0.0, m
    assert m.step_rms is not None and m.step_rms <= 0.5, m
    assert m.correlation > 0.99 or p.tensor.values.size == 1, m  # one value has no correlation


# --- forms ----------------------------------------------------------------------------------------------------


def test_int8_format_of_each_form(built: Built) -> None:
    formats = {path.name: qgraph.int8_format(onnx.load(str(path)))
               for path in (built.mm, built.mm_dynamic, built.mm_qdq, built.mm_qop, built.conv_qop)}
    assert formats == {"mm.onnx": "unknown", "mm.dyn.onnx": "dynamic", "mm.qdq.onnx": "qdq",
                       "mm.qop.onnx": "qoperator", "conv.qop.onnx": "qoperator"}


def test_dynamic_sidecar(built: Built) -> None:
    found = pairs(built.mm_dynamic, built.mm)
    assert {k: (p.tensor.kind, p.tensor.granularity, p.fp32_name, p.how) for k, p in found.items()} == {
        "w1_quantized": ("integer", "tensor", "w1", "name"),
        "w2_quantized": ("integer", "tensor", "w2", "name"),
        "b1": ("float", "", "b1", "name"),  # a float initializer stays as it is
    }
    assert found["w1_quantized"].tensor.consumers == ("mm1_quant",)  # the MatMulInteger node
    assert found["b1"].tensor.step is None
    assert_rounded(found["w1_quantized"])
    assert_rounded(found["w2_quantized"])


def test_dynamic_weight_scale_found_through_the_mul_after_the_integer_op(built: Built) -> None:
    model = onnx.load(str(built.mm_dynamic))
    for init in model.graph.initializer:  # a scale whose name says nothing: only the graph leads to it
        if init.name == "w1_scale":
            init.name = "opaque"
    for node in model.graph.node:
        node.input[:] = ["opaque" if n == "w1_scale" else n for n in node.input]
    before, after = pairs(built.mm_dynamic, built.mm), pairs(model, built.mm)
    assert np.array_equal(after["w1_quantized"].tensor.values, before["w1_quantized"].tensor.values)
    assert "opaque" not in after  # a quantisation parameter is no weight


def test_qdq_per_channel(built: Built) -> None:
    found = pairs(built.mm_qdq, built.mm)
    w1 = found["w1_quantized"]
    assert (w1.tensor.kind, w1.tensor.granularity, w1.fp32_name, w1.how) == ("qdq", "channel", "w1", "name")
    assert w1.tensor.consumers == ("mm1",)  # the node that reads the DequantizeLinear's output
    # one scale per output column (axis 1 of the [16, 32] MatMul weight)
    steps = w1.tensor.step
    assert steps is not None and len(np.unique(steps[:, 0])) == 1 and len(np.unique(steps[0])) == 32
    for name in ("w1_quantized", "w2_quantized", "b1_quantized"):
        assert_rounded(found[name])


@pytest.mark.parametrize("which", ["conv", "gemm", "matmul"])
def test_qoperator_weights_and_int32_biases(built: Built, which: str) -> None:
    int8, fp32 = {"conv": (built.conv_qop, built.conv), "gemm": (built.gemm_qop, built.gemm),
                  "matmul": (built.mm_qop, built.mm)}[which]
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert ops >= {"conv": {"QLinearConv"}, "gemm": {"QGemm"}, "matmul": {"QLinearMatMul", "QLinearAdd"}}[which]
    found = pairs(int8, fp32)
    quantised = {k: p for k, p in found.items() if p.tensor.kind != "float"}
    expected = {"conv": {"conv0.weight", "conv0.bias", "conv1.weight", "conv1.bias"},
                "gemm": {"w1", "b1", "w2", "b2"}, "matmul": {"w1", "b1", "w2"}}[which]
    assert {p.fp32_name for p in quantised.values()} == expected
    assert all(p.tensor.kind == "qoperator" and p.how == "name" for p in quantised.values())
    for p in quantised.values():  # int32 biases too: their step is input scale × weight scale
        assert_rounded(p)
    if which == "conv":
        assert found["conv0.weight_quantized"].tensor.granularity == "channel"  # 4 output channels, axis 0


def test_matmulnbits_unpacked_to_the_matmul_layout(built: Built) -> None:
    found = pairs(built.mm_nbits, built.mm)
    nbits = {k: p for k, p in found.items() if p.tensor.kind == "nbits"}
    assert {p.fp32_name: p.tensor.values.shape for p in nbits.values()} == {"w1": (16, 32), "w2": (32, 8)}
    assert all(p.how == "name" and p.tensor.granularity == "block" for p in nbits.values())
    for p in nbits.values():
        assert_rounded(p)


def test_matmulnbits_nibbles_low_first_with_packed_zero_points() -> None:
    # K=8, N=2, blocks of 4: B is [N, 2 blocks, 2 bytes], element 2i in the low nibble of byte i and 2i+1 in its
    # high one; each column's two 4-bit zero points share one byte the same way
    q = np.array([[1, 2, 3, 15, 0, 4, 9, 9], [0, 7, 8, 9, 10, 11, 12, 13]])
    b = np.array([[q[n, 2 * i] | q[n, 2 * i + 1] << 4 for i in range(4)] for n in range(2)], np.uint8)
    scales, zps = np.array([[0.5, 0.25], [2.0, 1.0]], np.float32), np.array([[3, 8], [0, 15]])
    packed = np.array([zps[n, 0] | zps[n, 1] << 4 for n in range(2)], np.uint8)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft", K=8, N=2,
                            bits=4, block_size=4)
    model = _save([node], [numpy_helper.from_array(b.reshape(2, 2, 2), "B"),
                           numpy_helper.from_array(scales.ravel(), "scales"), numpy_helper.from_array(packed, "zp")])
    (tensor,) = qgraph.read_int8(qgraph.Graph(model))
    per_element = np.repeat(scales, 4, axis=1)
    assert tensor.values.shape == (8, 2)  # the MatMul weight's [K, N]
    assert np.array_equal(tensor.values, ((q - np.repeat(zps, 4, axis=1)) * per_element).T)
    assert tensor.step is not None and np.array_equal(tensor.step, per_element.T)


def test_blocked_int4_and_uint4_qdq() -> None:
    # opset 21: one scale per block of 4 along axis 1; q is [2, 6], so 2 blocks per row, the last one short
    q = np.array([[-8, 7, 1, 2, -3, 0], [4, 4, -1, -2, 6, 5]])
    scale = np.array([[0.5, 0.25], [2.0, 1.0]], np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=1, block_size=4),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = _save(nodes, [helper.make_tensor("q", TensorProto.INT4, [2, 6], q.ravel().tolist()),
                          numpy_helper.from_array(scale, "s")], opset=21)
    (tensor,) = qgraph.read_int8(qgraph.Graph(model))
    per_element = np.repeat(scale, 4, axis=1)[:, :6]
    assert (tensor.kind, tensor.granularity) == ("qdq", "block")
    assert np.array_equal(tensor.values, q * per_element) and np.array_equal(tensor.step, per_element)

    uq, uz = np.array([[0, 15, 3, 8]]), np.array([[8]])
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1, block_size=4),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = _save(nodes, [helper.make_tensor("q", TensorProto.UINT4, [1, 4], uq.ravel().tolist()),
                          numpy_helper.from_array(np.array([[0.5]], np.float32), "s"),
                          helper.make_tensor("z", TensorProto.UINT4, [1, 1], [8])], opset=21)
    (tensor,) = qgraph.read_int8(qgraph.Graph(model))
    assert np.array_equal(tensor.values, (uq - uz) * 0.5)


def test_quantize_linear_of_a_float_weight_is_rounded_like_ort() -> None:
    # pt2e-style exports keep the float weight and quantise it in the graph: int4 saturates at 7, half to even
    w = np.array([[0.25, 0.75, -0.75, 9.0]], np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=1),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], axis=1),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    model = _save(nodes, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.5, np.float32), "s"),
                          helper.make_tensor("z", TensorProto.INT4, [], [0])], opset=21)
    (tensor,) = qgraph.read_int8(qgraph.Graph(model))
    assert tensor.name == "w" and tensor.kind == "qdq"
    assert np.array_equal(tensor.values, [[0.0, 1.0, -1.0, 3.5]])  # 0.5 and -1.5 steps round to even; 18 → 7


def test_weight_quantised_at_run_time_by_dynamic_quantize_linear() -> None:
    w = RNG.normal(0, 1, (8, 4)).astype(np.float32)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["w"], ["wq", "ws", "wz"]),
             helper.make_node("MatMulInteger", ["x", "wq", "", "wz"], ["yi"], name="mmi"),
             helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT)]
    model = _save(nodes, [numpy_helper.from_array(w, "w")])
    (tensor,) = qgraph.read_int8(qgraph.Graph(model))
    values, step = qgraph.dynamic_qdq(w)
    assert (tensor.name, tensor.kind, tensor.consumers) == ("w", "integer", ("mmi",))
    assert np.array_equal(tensor.values, values) and tensor.step is not None and np.all(tensor.step == step)
    assert np.max(np.abs(values - w)) <= step / 2 + 1e-12


def test_dynamic_qdq_in_float32_and_float64() -> None:
    x = np.array([-1.0, 0.1, 0.2, 3.0], np.float32)
    v64, s64 = qgraph.dynamic_qdq(x)
    v32, s32 = qgraph.dynamic_qdq(x, np.float32)
    assert v64.dtype == np.float64 and v32.dtype == np.float32
    assert s64 == pytest.approx(4.0 / 255) and s32 == pytest.approx(4.0 / 255, rel=1e-6)
    assert np.allclose(v64, v32, atol=1e-6) and np.max(np.abs(v64 - x)) <= s64 / 2 + 1e-9
    zeros, step = qgraph.dynamic_qdq(np.zeros(3))
    assert np.array_equal(zeros, np.zeros(3)) and step == 1.0


# --- storage ----------------------------------------------------------------------------------------------------


def test_weights_in_constant_nodes_read_like_initializers(built: Built) -> None:
    model = onnx.load(str(built.mm_qdq))
    constants = [helper.make_node("Constant", [], [init.name], value=init) for init in model.graph.initializer]
    nodes = list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(constants + nodes)
    as_inits, as_constants = pairs(built.mm_qdq, built.mm), pairs(model, built.mm)
    assert list(as_constants) == list(as_inits)
    for name, p in as_inits.items():
        q = as_constants[name]
        assert (q.tensor.kind, q.tensor.granularity, q.fp32_name, q.how) == (
            p.tensor.kind, p.tensor.granularity, p.fp32_name, p.how)
        assert np.array_equal(q.tensor.values, p.tensor.values)


def test_external_data_read_from_the_base_folder(built: Built, tmp_path: Path) -> None:
    for path in (built.mm_qdq, built.mm):
        onnx.save_model(onnx.load(str(path)), str(tmp_path / path.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.stem + ".data", size_threshold=0)
    int8 = onnx.load(str(tmp_path / built.mm_qdq.name), load_external_data=False)
    fp32 = onnx.load(str(tmp_path / built.mm.name), load_external_data=False)
    stored = {i.name: i.data_location for i in (*int8.graph.initializer, *fp32.graph.initializer)}
    assert stored["w1_quantized"] == stored["w1"] == TensorProto.EXTERNAL
    external = qgraph.pair_weights(qgraph.Graph(int8, tmp_path), qgraph.Graph(fp32, tmp_path))
    inline = pairs(built.mm_qdq, built.mm)
    assert [p.tensor.name for p in external] == list(inline)
    for p in external:
        assert p.fp32_name == inline[p.tensor.name].fp32_name
        assert np.array_equal(p.tensor.values, inline[p.tensor.name].tensor.values)


# --- pairing with the fp32 origin ------------------------------------------------------------------------------


def test_renamed_weight_matched_by_value(built: Built) -> None:
    model = onnx.load(str(built.mm_qdq))
    for init in model.graph.initializer:
        if init.name == "w1_quantized":
            init.name = "onnx::MatMul_7"
    for node in model.graph.node:
        node.input[:] = ["onnx::MatMul_7" if n == "w1_quantized" else n for n in node.input]
    by_name, by_value = pairs(built.mm_qdq, built.mm)["w1_quantized"], pairs(model, built.mm)["onnx::MatMul_7"]
    assert (by_value.fp32_name, by_value.how) == ("w1", "value")
    assert qgraph.measure(by_value).sqnr_db == qgraph.measure(by_name).sqnr_db


def test_transposed_fp32_weight_matched(built: Built) -> None:
    # the same weight exported for Gemm(transB=1) is stored [N, K]
    fp32 = onnx.load(str(built.mm))
    for i, init in enumerate(fp32.graph.initializer):
        if init.name == "w1":
            fp32.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).T.copy(), "w1"))
    p = pairs(built.mm_dynamic, fp32)["w1_quantized"]
    assert (p.fp32_name, p.how) == ("w1", "name-transposed")
    assert_rounded(p)


def test_batchnorm_folded_by_preprocessing_matched_exactly(tmp_path: Path) -> None:
    fp32 = convkit.conv_bn(tmp_path / "cbn.onnx")
    calibration = np.random.default_rng(3).uniform(0, 1, (4, 1, 32, 32)).astype(np.float32)
    int8 = convkit.quantise_qdq(fp32, tmp_path / "cbn.int8.onnx", calibration, pre_process=True)
    found = pairs(int8, fp32)
    weight, beta = found["ConvBnFusion_W_conv.weight_quantized"], found["ConvBnFusion_BN_B_bn.beta_quantized"]
    assert (weight.fp32_name, weight.how) == ("conv.weight", "name+BatchNormalization")
    assert (beta.fp32_name, beta.how) == ("bn.beta", "name+BatchNormalization")
    assert_rounded(weight)  # the fold reproduces ORT's: rounding is the only error left
    # renamed as well: the fold is still found, by value
    model = onnx.load(str(int8))
    for init in model.graph.initializer:
        if init.name == "ConvBnFusion_W_conv.weight_quantized":
            init.name = "t0"
    for node in model.graph.node:
        node.input[:] = ["t0" if n == "ConvBnFusion_W_conv.weight_quantized" else n for n in node.input]
    renamed = pairs(model, fp32)["t0"]
    assert (renamed.fp32_name, renamed.how) == ("conv.weight", "value+BatchNormalization")
    assert qgraph.measure(renamed).sqnr_db == qgraph.measure(weight).sqnr_db


def test_unrelated_tensor_has_no_origin(built: Built) -> None:
    fp32 = qgraph.read_fp32(qgraph.Graph(onnx.load(str(built.mm))))
    noise = qgraph.QTensor("n", RNG.normal(size=(16, 32)), None, "qdq")
    (p,) = qgraph.pair([noise], fp32)
    assert (p.fp32_name, p.reference, p.how) == (None, None, "")
    m = qgraph.measure(p)
    assert m.fp32_name is None and math.isnan(m.sqnr_db) and m.how == ""


def test_each_fp32_tensor_is_the_origin_of_one_int8_tensor_at_most(built: Built) -> None:
    fp32 = qgraph.read_fp32(qgraph.Graph(onnx.load(str(built.mm))))
    w1 = fp32["w1"][0][0]
    twins = [qgraph.QTensor(n, w1 + 1e-3 * RNG.normal(size=w1.shape), None, "qdq") for n in ("a", "b")]
    assert [p.fp32_name for p in qgraph.pair(twins, fp32)].count("w1") == 1


# --- measuring --------------------------------------------------------------------------------------------------


def test_measure_sqnr_and_error_in_steps() -> None:
    ref = np.array([3.0, 4.0])
    exact = qgraph.measure(qgraph.Pairing(qgraph.QTensor("q", ref.copy(), np.full(2, 0.5), "qdq"), "w", ref, "name"))
    assert (exact.sqnr_db, exact.rel_error, exact.off_grid, exact.step_rms) == (math.inf, 0.0, 0.0, 0.0)
    noisy = qgraph.measure(qgraph.Pairing(qgraph.QTensor("q", ref * 1.1, np.full(2, 0.5), "qdq"), "w", ref, "name"))
    assert noisy.sqnr_db == pytest.approx(20.0) and noisy.rel_error == pytest.approx(0.1)
    # errors of 0.2, 0.6, 1.2 and 2.4 steps of 0.5, and an exact zero of a zero scale
    ref = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    deq = np.array([1.1, 1.3, 1.6, 2.2, 0.0])
    step = np.array([0.5, 0.5, 0.5, 0.5, 0.0])
    m = qgraph.measure(qgraph.Pairing(qgraph.QTensor("q", deq, step, "qdq"), "w", ref, "name"))
    assert m.off_grid == pytest.approx(3 / 5) and m.off_step == pytest.approx(2 / 5)
    assert m.step_rms == pytest.approx(math.sqrt((0.2**2 + 0.6**2 + 1.2**2 + 2.4**2) / 4))
    dead = qgraph.measure(qgraph.Pairing(qgraph.QTensor("q", np.array([1.0]), np.array([0.0]), "qdq"), "w",
                                         np.array([0.5]), "name"))
    assert dead.off_grid == 1.0 and dead.off_step == 1.0  # a zero scale can only reproduce zeros


def test_match_weights_is_the_one_model_lineage_judges(built: Built) -> None:
    fp32, int8 = onnx.load(str(built.mm)), onnx.load(str(built.mm_qdq))
    assert lineage.match_weights is qgraph.match_weights and lineage.WeightMatch is qgraph.WeightMatch
    assert qgraph.match_weights(fp32, int8) == tuple(qgraph.measure(p) for p in pairs(int8, fp32).values())


def test_lineage_and_diagnosis_name_the_same_origin(tmp_path: Path) -> None:
    from pytest_quantgate.analysis.diagnosis import diagnose

    fp32 = convkit.conv_bn(tmp_path / "cbn.onnx")
    calibration = np.random.default_rng(3).uniform(0, 1, (4, 1, 32, 32)).astype(np.float32)
    int8 = convkit.quantise_qdq(fp32, tmp_path / "cbn.int8.onnx", calibration, pre_process=True)
    origins = {m.int8_name: m.fp32_name for m in lineage.check_lineage(fp32, int8, "static").matches}
    diag = diagnose(fp32, int8, [{"image": calibration[:2]}], top=20)
    weights = [t for t in diag.worst if t.kind == "weight"]
    assert weights
    for t in weights:
        # "origin (int8 name)", or the origin alone when the int8 name says it
        origin, _, shown = t.tensor.partition(" (")
        int8_name = shown[:-1] if shown else next(k for k in origins if qgraph.base_name(k) == origin)
        assert origins[int8_name] == origin, (t.tensor, origins)
