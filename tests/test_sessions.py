"""sessions: signatures of real onnxruntime sessions, refusals of mismatched graphs, outputs as arrays, one run."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_quantgate.errors import FixtureError, SignatureMismatchError
from pytest_quantgate.engine.sessions import as_array, check_signatures, run, signature
from pytest_quantgate.io.soak import TensorSpec

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def _model(*, x: str = "x", x_type: int = FLOAT, x_shape: list[Any] | None = None, y: str = "y",
           y_shape: list[Any] | None = None, extra_output: str | None = None) -> onnx.ModelProto:
    """Return ``y = x * 2`` (and ``ids -> ids_out``, ``u`` added in) with the given names, types and shapes."""
    x_shape = ["N", 3] if x_shape is None else x_shape
    nodes = [helper.make_node("Mul", [x, "two"], ["scaled"]), helper.make_node("Add", ["scaled", "u"], [y]),
             helper.make_node("Identity", ["ids"], ["ids_out"])]
    outputs = [helper.make_tensor_value_info(y, x_type, ["N", 3] if y_shape is None else y_shape),
               helper.make_tensor_value_info("ids_out", INT64, ["N"])]
    if extra_output is not None:
        nodes.append(helper.make_node("SequenceConstruct", [y], [extra_output]))
        outputs.append(helper.make_tensor_sequence_value_info(extra_output, x_type, None))
    two = numpy_helper.from_array(np.array(2, dtype=helper.tensor_dtype_to_np_dtype(x_type)), "two")
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(x, x_type, x_shape), helper.make_tensor_value_info("ids", INT64, ["N"]),
         helper.make_tensor_value_info("u", x_type, None)],  # u declares no shape at all
        outputs, initializer=[two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # no onnx.checker: it refuses an input without a shape, which onnxruntime runs
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny() -> ort.InferenceSession:
    """Return a session of the healthy tiny model."""
    return _session(_model())


def test_signature_lists_inputs_and_outputs_as_specs(tiny: ort.InferenceSession) -> None:
    inputs, outputs = signature(tiny, frozenset({"u"}))
    assert inputs == (TensorSpec("x", "tensor(float)", ("N", 3)), TensorSpec("ids", "tensor(int64)", ("N",)),
                      TensorSpec("u", "tensor(float)", (), known_rank=False))
    assert outputs == (TensorSpec("y", "tensor(float)", ("N", 3)), TensorSpec("ids_out", "tensor(int64)", ("N",)))
    assert signature(tiny)[0][2] == TensorSpec("u", "tensor(float)", ())  # unnamed: read as a scalar


def test_matching_graphs_pass_whatever_their_symbolic_dims(tiny: ort.InferenceSession) -> None:
    check_signatures(tiny, tiny, "a.onnx", "a.int8.onnx")
    other = _session(_model(x_shape=["batch", 3], y_shape=["batch", 3]))
    check_signatures(tiny, other, "a.onnx", "a.int8.onnx")  # symbolic names are not compared, fixed dims are


def test_an_output_dim_fixed_on_one_side_only_is_compatible(tiny: ort.InferenceSession) -> None:
    # quant_pre_process resolves output dims an exporter left symbolic: the values are compared run by run
    check_signatures(tiny, _session(_model(y_shape=["N", "M"])), "a.onnx", "a.int8.onnx")
    check_signatures(_session(_model(y_shape=["N", "M"])), tiny, "a.onnx", "a.int8.onnx")


MISMATCHED: list[tuple[str, dict[str, Any], str]] = [
    ("input names", {"x": "pixels"},
     r"^a.int8.onnx: int8 graph inputs \['pixels', 'ids', 'u'\] differ from the fp32 graph's \['x', 'ids', 'u'\] "
     r"\(a.onnx\)$"),
    ("output names", {"y": "score"},
     r"^a.int8.onnx: int8 graph outputs \['score', 'ids_out'\] differ from the fp32 graph's \['y', 'ids_out'\] "
     r"\(a.onnx\)$"),
    ("an extra output", {"extra_output": "seq"},
     r"^a.int8.onnx: int8 graph outputs \['y', 'ids_out', 'seq'\] differ from the fp32 graph's \['y', 'ids_out'\]"),
    ("input type", {"x_type": TensorProto.DOUBLE, "y_shape": ["N", 3]},
     r"^a.int8.onnx: int8 input 'x' is float64\[N,3\], the fp32 graph has float32\[N,3\]$"),
    ("fixed input dim", {"x_shape": ["N", 4], "y_shape": ["N", 4]},
     r"^a.int8.onnx: int8 input 'x' is float32\[N,4\], the fp32 graph has float32\[N,3\]$"),
    ("fixed batch", {"x_shape": [8, 3], "y_shape": [8, 3]},
     r"^a.int8.onnx: int8 input 'x' is float32\[8,3\], the fp32 graph has float32\[N,3\]$"),
    ("output shape", {"y_shape": ["N", 4]},
     r"^a.int8.onnx: int8 output 'y' is float32\[N,4\], the fp32 graph has float32\[N,3\]$"),
]


@pytest.mark.parametrize(("changes", "message"), [row[1:] for row in MISMATCHED], ids=[row[0] for row in MISMATCHED])
def test_a_mismatched_int8_graph_is_refused_naming_both_files(tiny: ort.InferenceSession, changes: dict[str, Any],
                                                             message: str) -> None:
    with pytest.raises(SignatureMismatchError, match=message):
        check_signatures(tiny, _session(_model(**changes)), "a.onnx", "a.int8.onnx")


def test_an_output_type_the_gate_cannot_compare_is_refused_naming_the_fp32_file() -> None:
    both = _session(_model(extra_output="seq"))
    with pytest.raises(SignatureMismatchError, match=r"^a.onnx: output 'seq' has type seq\(tensor\(float\)\); the "
                                                     r"gate compares tensors and sequences of maps"):
        check_signatures(both, both, "a.onnx", "a.int8.onnx")


# --- outputs as arrays -------------------------------------------------------------------------------------------

MAPS = TensorSpec("probabilities", "seq(map(int64,tensor(float)))", ("N",))


def test_a_sequence_of_maps_is_an_array_in_key_order() -> None:
    got = as_array([{2: 0.25, 0: 0.5, 1: 0.25}, {0: 0.1, 2: 0.8, 1: 0.1}], MAPS, "a.onnx")
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    assert as_array([], MAPS, "a.onnx").shape == (0, 0)


@pytest.mark.parametrize(("value", "message"), [
    (np.zeros(3), r"a.onnx: output 'probabilities' \(seq\(map\(int64,tensor\(float\)\)\)\) did not return a list "
                  r"of maps"),
    ([{0: 1.0}, [1.0]], "did not return a list of maps"),
    ([{0: 0.5, 1: 0.5}, {0: 0.5, 2: 0.5}], "a.onnx: output 'probabilities': the maps of one run have different keys"),
])
def test_sequences_of_maps_that_do_not_fit_are_refused(value: Any, message: str) -> None:
    with pytest.raises(FixtureError, match=message):
        as_array(value, MAPS, "a.onnx")


def test_tensors_pass_through_strings_stay_strings_objects_are_refused() -> None:
    values = np.arange(6, dtype=np.int64).reshape(2, 3)
    got = as_array(values, TensorSpec("y", "tensor(int64)", ("N", 3)), "m")
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, values)
    labels = as_array(np.array(["cat", "dog"], dtype=object), TensorSpec("label", "tensor(string)", ("N",)), "m")
    assert labels.dtype.kind == "U" and labels.tolist() == ["cat", "dog"]
    with pytest.raises(FixtureError, match=r"m: output 'y' \(tensor\(float\)\) is not a numeric tensor"):
        as_array(np.array([{"a": 1}], dtype=object), TensorSpec("y", "tensor(float)", ("N",)), "m")


# --- one run ------------------------------------------------------------------------------------------------------


def test_run_returns_each_requested_output_and_its_time(tiny: ort.InferenceSession) -> None:
    _, outputs = signature(tiny)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    feed = {"x": x, "ids": np.array([7, 9]), "u": np.array(0.5, np.float32)}
    got, seconds = run(tiny, outputs, feed, "tiny.onnx")
    assert list(got) == ["y", "ids_out"]
    np.testing.assert_array_equal(got["y"], x * 2 + 0.5)
    np.testing.assert_array_equal(got["ids_out"], [7, 9])
    assert isinstance(seconds, float) and 0.0 < seconds < 10.0
    only, _ = run(tiny, outputs[1:], feed, "tiny.onnx")
    assert list(only) == ["ids_out"]


def test_run_turns_a_sequence_of_maps_into_an_array() -> None:
    """A ZipMap classifier as skl2onnx writes one: its probabilities come back as (samples, classes)."""
    import modelkit

    session = _session(modelkit.zipmap_classifier())
    _, outputs = signature(session)
    features = np.random.default_rng(0).uniform(0, 1, (5, 64)).astype(np.float32)
    got, _ = run(session, outputs, {"features": features}, "clf.onnx")
    assert got["label"].shape == (5,) and got["output_probability"].shape == (5, 10)
    np.testing.assert_allclose(got["output_probability"].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(got["output_probability"].argmax(axis=1), got["label"])
