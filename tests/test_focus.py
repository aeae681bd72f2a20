"""What failed, traced back: paths.tensors_on_path, diagnose's focused ranking and advise's exclusion order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import convkit
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_quantgate.analysis.diagnosis import diagnose
from pytest_quantgate.analysis.paths import tensors_on_path
from pytest_quantgate.frontends import advise
from pytest_quantgate.records import Diagnosis, Focus, TensorError, dump, load

# --- paths on hand-built graphs -------------------------------------------------------------------------------


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any] | None = None) -> Any:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _f(name: str, shape: list[Any] | None) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _ints(name: str, values: list[int]) -> Any:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _two_branches() -> Any:
    """Return x[N,2,5] -> Relu -> a[N,2,5]; x -> MatMul -> Sigmoid -> b[N,3,5]; y = Concat(a, b, axis 1)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Transpose", ["x"], ["xt"], name="t1", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["xt", "wt"], ["m"], name="mm"),
        helper.make_node("Transpose", ["m"], ["logits"], name="t2", perm=[0, 2, 1]),
        helper.make_node("Sigmoid", ["logits"], ["b"], name="sig"),
        helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=1),
    ]
    wt = numpy_helper.from_array(np.ones((2, 3), np.float32), "wt")
    return _model(nodes, [_f("x", ["N", 2, 5])], [_f("y", ["N", 5, 5])], [wt])


def test_concat_focus_on_the_second_input_selects_only_that_branch() -> None:
    model = _two_branches()
    path = tensors_on_path(model, Focus("y", 1, (3, 4)))
    assert {"y", "b", "logits", "m", "xt", "wt", "x"} <= path.tensors
    assert "a" not in path.tensors and "relu" not in path.nodes
    assert path.tracked and path.axis == 1
    # channels followed: y's rows 3,4 are b's rows 1,2; the MatMul stops tracking
    assert path.channels["y"] == {3, 4} and path.channels["b"] == {1, 2} and path.channels["logits"] == {1, 2}
    assert "m" not in path.channels
    assert path.distance["y"] == 0 and path.distance["b"] == 1 and path.distance["logits"] == 2
    assert path.distance["x"] == 5
    # y's other rows (0-2: the boxes and b's row 0) come through x and the MatMul too: shared, the head is not
    assert "x" in path.shared and "m" in path.shared
    assert path.specific("b") and path.specific("y") and path.specific("logits")
    # a focus on the first input's rows selects the other branch
    boxes = tensors_on_path(model, Focus("y", 1, (0,)))
    assert "a" in boxes.tensors and "b" not in boxes.tensors and "wt" not in boxes.tensors
    # negative axis, same answer
    assert tensors_on_path(model, Focus("y", -2, (3, 4))).tensors == path.tensors


def test_no_channels_or_no_axis_is_the_whole_ancestry() -> None:
    model = _two_branches()
    whole = tensors_on_path(model, Focus("y"))
    assert {"a", "b", "x", "wt"} <= whole.tensors and not whole.tracked and not whole.channels
    assert tensors_on_path(model, Focus("y", None, (3,))).tensors == whole.tensors
    assert tensors_on_path(model, Focus("nope", 1, (3,))).tensors == frozenset()


def test_unknown_shapes_keep_every_concat_input() -> None:
    # the Concat inputs' widths along axis 1 cannot be inferred: every input is kept, whole
    nodes = [
        helper.make_node("Relu", ["p"], ["a"], name="relu"),
        helper.make_node("Sigmoid", ["q"], ["b"], name="sig"),
        helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=1),
    ]
    model = _model(nodes, [_f("p", None), _f("q", None)], [_f("y", None)])
    path = tensors_on_path(model, Focus("y", 1, (3,)))
    assert {"a", "b", "p", "q"} <= path.tensors
    assert "a" not in path.channels and "b" not in path.channels


def test_slice_and_split_map_channel_ranges() -> None:
    # x[N,10,4] -> Slice rows 2:10:2 -> s[N,4,4]; x -> Split [3,7] -> (u[N,3,4], v[N,7,4]); y = Concat(s, v)
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["s"], name="slice"),
        helper.make_node("Split", ["x", "sizes"], ["u", "v"], name="split", axis=1),
        helper.make_node("Neg", ["s"], ["sn"], name="neg"),
        helper.make_node("Concat", ["sn", "v"], ["y"], name="cat", axis=1),
    ]
    inits = [_ints("starts", [2]), _ints("ends", [10]), _ints("axes", [1]), _ints("steps", [2]), _ints("sizes", [3, 7])]
    model = _model(nodes, [_f("x", ["N", 10, 4])], [_f("y", ["N", 11, 4])], inits)
    # y row 1 = sn row 1 = s row 1 = x row 2 + 1·2 = 4
    path = tensors_on_path(model, Focus("y", 1, (1,)))
    assert path.channels["s"] == {1} and path.channels["x"] == {4}
    assert "v" not in path.tensors and "split" not in path.nodes
    # y row 6 = v row 2 = x row 3 + 2 = 5 (Split's offset is u's width)
    path = tensors_on_path(model, Focus("y", 1, (6,)))
    assert path.channels["v"] == {2} and path.channels["x"] == {5}
    assert "s" not in path.tensors and "sizes" in path.tensors
    # negative starts resolve against the inferred width: rows -4: of x are 6..9
    nodes[0] = helper.make_node("Slice", ["x", "nstart", "big", "axes"], ["s"], name="slice")
    inits2 = [_ints("nstart", [-4]), _ints("big", [100]), _ints("axes", [1]), _ints("sizes", [3, 7])]
    model = _model(nodes, [_f("x", ["N", 10, 4])], [_f("y", ["N", 11, 4])], inits2)
    assert tensors_on_path(model, Focus("y", 1, (0, 3))).channels["x"] == {6, 9}


def test_broadcast_operand_is_taken_whole_and_odd_graphs_never_raise() -> None:
    bias = numpy_helper.from_array(np.ones((1, 4, 1), np.float32), "bias")
    scalar = numpy_helper.from_array(np.ones((), np.float32), "k")
    nodes = [
        helper.make_node("Add", ["x", "bias"], ["a"], name="add"),
        helper.make_node("Mul", ["a", "k"], ["y"], name="mul"),
    ]
    model = _model(nodes, [_f("x", ["N", 4, 6])], [_f("y", ["N", 4, 6])], [bias, scalar])
    path = tensors_on_path(model, Focus("y", 1, (2,)))
    assert path.channels["x"] == {2} and path.channels["bias"] == {2} and "k" not in path.channels
    assert "k" in path.tensors
    # a graph that is not a graph: an empty path, not an exception
    assert tensors_on_path(SimpleNamespace(graph=None), Focus("y", 1, (2,))).tensors == frozenset()  # type: ignore[arg-type]


# --- a detector whose class scores die in its head ------------------------------------------------------------

CLASSES = 3
CLASS_ROWS = tuple(range(4, 4 + CLASSES))


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    """A YOLO-style head: boxes in pixels concatenated with sigmoid class scores, quantised static (QDQ).

    The output's one per-tensor scale is set by the box coordinates (hundreds of pixels), so every class score in
    [0, 1] rounds to about nothing: the scores die in the head's Concat while every tensor before it is fine.
    """
    import torch

    class Det(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)

            def conv(i: int, o: int, k: int, s: int = 1) -> torch.nn.Conv2d:
                c = torch.nn.Conv2d(i, o, k, s, k // 2)
                with torch.no_grad():
                    c.weight.copy_(torch.randn(c.weight.shape, generator=g) * (2.0 / (i * k * k)) ** 0.5)
                    c.bias.copy_(torch.randn(c.bias.shape, generator=g) * 0.05)
                return c

            self.stem, self.down = conv(1, 8, 3), conv(8, 8, 3, 2)
            self.box, self.cls1, self.cls2 = conv(8, 4, 1), conv(8, 8, 3), conv(8, CLASSES, 1)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            f = torch.relu(self.down(torch.relu(self.stem(image))))
            boxes = (self.box(f) * 64.0 + 256.0).flatten(2)
            cls = self.cls2(torch.relu(self.cls1(f))).flatten(2)
            return torch.cat([boxes, torch.sigmoid(cls)], 1)

    root = tmp_path_factory.mktemp("detector")
    fp32, int8 = root / "det.onnx", root / "det.int8.onnx"
    torch.onnx.export(Det().eval(), (torch.zeros(2, 1, 16, 16),), str(fp32), input_names=["image"],
                      output_names=["pred"], dynamic_axes={"image": {0: "N"}, "pred": {0: "N"}}, opset_version=17,
                      dynamo=False)
    crops = convkit.photo_crops(24, 16)
    convkit.quantise_qdq(fp32, int8, crops[:16])
    return fp32, int8, [{"image": crops[16:24]}]


def _head_group(group: tuple[str, ...], fp32: Path) -> bool:
    """Return whether ``group`` holds the head's Sigmoid or its final Concat."""
    model = onnx.load(str(fp32))
    head = {n.name for n in model.graph.node if n.op_type == "Sigmoid" or "pred" in n.output}
    return bool(head & set(group))


def _order(found: Diagnosis) -> list[str]:
    return [f"{t.tensor} {t.rank_key:.2f} dB{' (path)' if t.on_path else ''}" for t in found.worst]


def test_detector_focus_on_the_class_rows_ranks_the_head_first(
        detector: tuple[Path, Path, list[dict[str, np.ndarray]]]) -> None:
    fp32, int8, feeds = detector
    focus = Focus("pred", 1, CLASS_ROWS, "classes 0-2")
    plain = diagnose(fp32, int8, feeds, top=30)
    focused = diagnose(fp32, int8, feeds, top=30, focus=focus)
    print("\nunfocused:", _order(plain), "\nfocused:", _order(focused))
    # whole-tensor SQNR alone: the output's scale serves its box rows well, so a conv ranks first, not the head
    assert plain.worst[0].kind != "output" and not _head_group(plain.worst[0].exclude, fp32)
    assert all(t.on_path is None for t in plain.worst)
    # focused: the class rows of the output are measured on their own, and they are lost in the head's Concat
    first = focused.worst[0]
    assert first.tensor == "pred[:, 4:7]" and first.on_path is True and first.rank_key < 3.0
    assert _head_group(first.exclude, fp32)
    # the box branch is off the path and ranks after every tensor on it
    flags = [t.on_path for t in focused.worst]
    assert flags == sorted(flags, reverse=True) and False in flags
    assert all(not t.on_path for t in focused.worst if t.tensor.startswith(("/box/", "box.")))
    # the outputs part reports the focused slice next to the whole output
    outputs = {t.tensor: t.xmodel_db for t in focused.outputs}
    assert set(outputs) == {"pred", "pred[:, 4:7]"} and [t.tensor for t in plain.outputs] == ["pred"]
    assert outputs["pred[:, 4:7]"] is not None and outputs["pred"] is not None
    assert outputs["pred[:, 4:7]"] < 3.0 < 40.0 < outputs["pred"]
    # the records' JSON round trip carries on_path
    assert load(Diagnosis, json.loads(json.dumps(dump(focused)))) == focused


def test_exclusion_groups_put_the_focused_path_first(
        detector: tuple[Path, Path, list[dict[str, np.ndarray]]]) -> None:
    fp32, int8, feeds = detector
    path = tensors_on_path(onnx.load(str(fp32)), Focus("pred", 1, CLASS_ROWS))
    # an unfocused diagnosis (on_path unknown, whole-tensor SQNR): the path alone reorders its groups, the class
    # branch and head (feeding the class rows only) first, then the shared backbone, then the box branch
    plain = diagnose(fp32, int8, feeds, top=30)
    before = advise.exclusion_groups(plain.worst)
    groups = advise.exclusion_groups(plain.worst, path)
    assert sorted(groups) == sorted(before)

    def first(node: str, order: list[tuple[str, ...]]) -> int:
        return next(i for i, g in enumerate(order) if node in g)

    assert first("/box/Conv", before) < first("/Sigmoid", before)
    assert first("/down/Conv", before) < first("/cls1/Conv", before)
    assert first("/Sigmoid", groups) < first("/down/Conv", groups) < first("/box/Conv", groups)
    assert max(first(n, groups) for n in ("/cls1/Conv", "/cls2/Conv", "/Sigmoid", "/Concat_2")) < min(
        first(n, groups) for n in ("/down/Conv", "/stem/Conv", "/box/Conv"))
    # a tensor's own on_path (set by a focused diagnosis) wins over the name lookup
    off = TensorError("activation", "/Sigmoid_output_0", "/Sigmoid", 1.0, None, ("a",), on_path=False)
    on = TensorError("activation", "elsewhere", "x", 50.0, None, ("b",), on_path=True)
    assert advise.exclusion_groups([off, on], path) == [("b",), ("a",)]


@dataclass(frozen=True)
class _Settings:
    """What rank_exclusions reads of the gate's settings (prepare and measure are stand-ins here)."""

    diagnose: str = "auto"


def test_rank_exclusions_passes_the_gates_focus_to_the_diagnosis(
        detector: tuple[Path, Path, list[dict[str, np.ndarray]]], monkeypatch: pytest.MonkeyPatch) -> None:
    fp32, int8, feeds = detector
    from pytest_quantgate.runner import gate

    images = feeds[0]["image"]
    fixture = SimpleNamespace(take=lambda picked: {"image": images[list(picked)]})
    prepared = SimpleNamespace(plan=SimpleNamespace(batch=None, fixed_batch=False, batched=True), fixture=fixture)
    collector = SimpleNamespace(worst_samples=lambda count, focus=None, kind=None: list(range(min(count, len(images)))))
    result = SimpleNamespace(focus=Focus("pred", 1, CLASS_ROWS, "classes 0-2"))
    monkeypatch.setattr(gate, "prepare", lambda *args, **kwargs: prepared)
    monkeypatch.setattr(gate, "measure", lambda *args: (result, collector))
    said: list[str] = []
    entry = SimpleNamespace(id="det", as_mode=lambda mode: SimpleNamespace(id="det"))
    run = SimpleNamespace(settings=_Settings(), registry=None, entry=entry, fp32=fp32, say=said.append,
                          options=advise.AdviseOptions(ep="cpu"))
    groups = advise.rank_exclusions(run, int8)  # type: ignore[arg-type]
    assert _head_group(groups[0], fp32), said
    assert "for classes 0-2" in said[0] and "pred[:, 4:7]" in said[0]
    # without a focus the same samples put a conv first
    monkeypatch.setattr(gate, "measure", lambda *args: (SimpleNamespace(focus=None), collector))
    assert not _head_group(advise.rank_exclusions(run, int8)[0], fp32)  # type: ignore[arg-type]
