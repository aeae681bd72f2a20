"""Which tensors of the fp32 graph feed what failed: the path back from a focused output, channel by channel.

A gate FAIL names an output and, where it knows, the channels or class rows of it that failed
(:class:`~pytest_quantgate.records.Focus`). :func:`tensors_on_path` walks the fp32 graph backwards from that output
and returns every tensor that can change those values, with its distance in nodes from the output.

Channels are followed precisely while the graph lets them be: through Concat (only the inputs whose channel range
covers the focused channels), Split and Slice (channel ranges mapped to the input), and through elementwise and
unary ops (the same channels; a broadcast operand that is not as wide as the output is taken whole). Through any
other op (Conv, MatMul, Reshape, Transpose, ...) channel tracking stops and the whole ancestry of its inputs counts.
Offsets come from ONNX shape inference; where a shape is unknown, every input is kept whole.

The same walk from the rest of the graph (the output's other channels, the other outputs) tells which path tensors
are *shared* with what did not fail: a tensor that is not shared (or whose focused channels the rest does not use)
explains the focused channels alone.

Nothing here raises on an odd graph: whatever cannot be followed precisely is followed whole.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..records import Focus

if TYPE_CHECKING:
    import onnx

# ops whose output channel c depends on channel c of each input (after broadcasting) and on nothing else
ELEMENTWISE = frozenset({
    "Abs", "Add", "Cast", "Ceil", "Clip", "DequantizeLinear", "Div", "Elu", "Erf", "Exp", "Floor", "Gelu",
    "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "Max", "Min", "Mish", "Mul", "Neg", "Pow",
    "PRelu", "QuantizeLinear", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Softplus", "Softsign",
    "Sqrt", "Sub", "Sum", "Tanh", "ThresholdedRelu", "Where",
})
# a tensor widened this many times is followed whole from then on: bounds the walk on graphs with many branches
MAX_WIDENINGS = 8

Shape = tuple[int | None, ...]  # None: a dimension shape inference could not tell
Channels = frozenset[int] | None  # None: the whole tensor


@dataclass(frozen=True)
class PathInfo:
    """The fp32 tensors that feed a focused output (its channels where given), and how far each is from it.

    ``distance`` counts nodes: the output itself is 0, the inputs of the node that computes it are 1, and so on
    (the shortest way when there are several). ``nodes`` are the fp32 nodes the path runs through. ``shared``
    holds the path tensors that also feed the rest of the graph (other channels of the output, other outputs)
    through the same channels;
    ``tracked`` says whether the channels were followed at all (False: the whole ancestry of the output);
    ``channels`` holds, for each tensor they were followed into, the channels along ``axis`` that feed the focus.
    """

    output: str
    tensors: frozenset[str] = frozenset()
    distance: Mapping[str, int] = field(default_factory=dict)
    nodes: frozenset[str] = frozenset()
    shared: frozenset[str] = frozenset()
    tracked: bool = False
    axis: int | None = None
    channels: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def on_path(self, tensor: str) -> bool:
        """Return whether ``tensor`` feeds the focused output."""
        return tensor in self.tensors

    def specific(self, tensor: str) -> bool:
        """Return whether ``tensor`` feeds the focused output and nothing else the graph computes."""
        return tensor in self.tensors and tensor not in self.shared


@dataclass(frozen=True)
class _Walk:
    """What one backward walk reached: tensors with their shortest distance, and the nodes it went through."""

    distance: dict[str, int]
    covered: dict[str, Channels]  # the channels of each tensor the walk came through (None: all of it)
    nodes: set[str]
    tracked: bool


class _GraphView:
    """The fp32 graph as the walk needs it: producers, shapes and small constants."""

    def __init__(self, model: Any, read_shapes: bool = True) -> None:
        graph = model.graph
        self.nodes: list[Any] = list(graph.node)
        self.producer: dict[str, tuple[int, Any]] = {}
        for node in self.nodes:
            for slot, out in enumerate(node.output):
                if out:
                    self.producer[out] = (slot, node)
        self.outputs = [o.name for o in graph.output]
        self.initializers = {t.name: t for t in graph.initializer}
        self.shapes = _shapes(model) if read_shapes else {}

    def shape(self, tensor: str) -> Shape | None:
        """Return the shape of ``tensor`` where shape inference knows its rank, else None."""
        return self.shapes.get(tensor)

    def constant(self, tensor: str) -> list[int] | None:
        """Return a small integer constant (an initializer or a Constant node's value) as a list, else None."""
        from onnx import numpy_helper

        proto = self.initializers.get(tensor)
        if proto is None:
            found = self.producer.get(tensor)
            if found is None or found[1].op_type != "Constant":
                return None
            attr = next((a for a in found[1].attribute if a.name == "value"), None)
            if attr is None or not attr.HasField("t"):
                return None
            proto = attr.t
        try:
            values = numpy_helper.to_array(proto)
        except Exception:  # external data not loaded, an odd type: the caller follows the tensor whole
            return None
        if values.dtype.kind not in "iu" or values.size > 64:
            return None
        return [int(v) for v in values.reshape(-1)]


def _shapes(model: Any) -> dict[str, Shape]:
    """Return every tensor shape ONNX shape inference (or the model's own value_info) knows, by name."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # an odd or huge graph: the shapes the model itself declares are all there is
        inferred = model
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for info in (*graph.input, *graph.value_info, *graph.output):
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            continue
        shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                  for d in info.type.tensor_type.shape.dim)
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _axis(axis: int, rank: int | None) -> int | None:
    """Return ``axis`` counted from the front, or None when it is negative and the rank is unknown or it is out."""
    if rank is None:
        return axis if axis >= 0 else None
    if axis < 0:
        axis += rank
    return axis if 0 <= axis < rank else None


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _reads(node: Any) -> list[str]:
    """Return every tensor ``node`` reads, including those its subgraphs (If/Loop/Scan bodies) take from outside."""
    reads = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
            for inner in sub.node:
                reads += _reads(inner)
    return reads


def _whole(node: Any) -> list[tuple[str, Channels]]:
    return [(name, None) for name in _reads(node)]


def _concat(view: _GraphView, node: Any, axis: int, channels: frozenset[int]) -> list[tuple[str, Channels]]:
    """Map channels of a Concat's output to its inputs: only the inputs whose range covers them."""
    out_shape = view.shape(node.output[0])
    rank = len(out_shape) if out_shape is not None else None
    cat = _axis(int(_attr(node, "axis", 0)), rank)
    if cat is None:
        return _whole(node)
    if cat != axis:
        return [(name, channels) for name in node.input if name]
    widths: list[int] = []
    for name in node.input:
        shape = view.shape(name)
        width = shape[cat] if shape is not None and len(shape) > cat else None
        if width is None:  # one unknown width moves every later offset: keep all inputs
            return _whole(node)
        widths.append(width)
    out: list[tuple[str, Channels]] = []
    start = 0
    for name, width in zip(node.input, widths):
        local = frozenset(c - start for c in channels if start <= c < start + width)
        if local and name:
            out.append((name, local))
        start += width
    return out


def _split(view: _GraphView, node: Any, slot: int, axis: int, channels: frozenset[int]
           ) -> list[tuple[str, Channels]]:
    """Map channels of one Split output to its input (the offset is the widths of the outputs before it)."""
    data = node.input[0]
    shape = view.shape(data)
    rank = len(shape) if shape is not None else None
    cut = _axis(int(_attr(node, "axis", 0)), rank)
    rest = [(name, None) for name in node.input[1:] if name]
    if cut is None:
        return _whole(node)
    if cut != axis:
        return [(data, channels), *rest]
    offset = 0
    for out in node.output[:slot]:
        out_shape = view.shape(out)
        width = out_shape[cut] if out_shape is not None and len(out_shape) > cut else None
        if width is None:
            return _whole(node)
        offset += width
    return [(data, frozenset(c + offset for c in channels)), *rest]


def _slice(view: _GraphView, node: Any, axis: int, channels: frozenset[int]) -> list[tuple[str, Channels]]:
    """Map channels of a Slice's output to its input (start + channel · step along the sliced axis)."""
    data = node.input[0]
    rest = [(name, None) for name in node.input[1:] if name]
    shape = view.shape(data)
    rank = len(shape) if shape is not None else None
    starts = view.constant(node.input[1]) if len(node.input) > 1 else None
    if starts is None:
        return _whole(node)
    axes = view.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
    steps = view.constant(node.input[4]) if len(node.input) > 4 and node.input[4] else [1] * len(starts)
    if axes is None or steps is None or not len(axes) == len(starts) == len(steps):
        return _whole(node)
    normal = [_axis(a, rank) for a in axes]
    if any(a is None for a in normal):
        return _whole(node)
    if axis not in normal:
        return [(data, channels), *rest]
    i = normal.index(axis)
    start, step = starts[i], steps[i]
    dim = shape[axis] if shape is not None and len(shape) > axis else None
    if start < 0 or step < 0:
        if dim is None:  # where a negative start or step lands depends on the width
            return _whole(node)
        if start < 0:
            start += dim
        start = max(0, min(start, dim - 1 if step < 0 else dim))
    elif dim is not None:
        start = min(start, dim)
    return [(data, frozenset(start + c * step for c in channels)), *rest]


def _elementwise(view: _GraphView, node: Any, axis: int, channels: frozenset[int]) -> list[tuple[str, Channels]]:
    """Keep the channels on every operand as wide as the output along the axis; take the others whole."""
    operands = [name for name in node.input if name]
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        # scale and zero point are per tensor or per axis constants: taken whole, they are tiny
        return [(operands[0], channels), *((n, None) for n in operands[1:])] if operands else []
    if len(operands) == 1:
        return [(operands[0], channels)]
    out_shape = view.shape(node.output[0])
    width = out_shape[axis] if out_shape is not None and len(out_shape) > axis else None
    found: list[tuple[str, Channels]] = []
    for name in operands:
        shape = view.shape(name)
        same = (width is not None and shape is not None and out_shape is not None and len(shape) == len(out_shape)
                and shape[axis] == width)
        found.append((name, channels if same else None))
    return found


def _step(view: _GraphView, node: Any, slot: int, axis: int | None, channels: Channels
          ) -> list[tuple[str, Channels]]:
    """Return the inputs of ``node`` (whose output ``slot`` is on the path) and their channels on the path."""
    if channels is None or axis is None:
        return _whole(node)
    op = node.op_type
    if op == "Concat":
        return _concat(view, node, axis, channels)
    if op == "Split":
        return _split(view, node, slot, axis, channels)
    if op == "Slice":
        return _slice(view, node, axis, channels)
    if op in ELEMENTWISE:
        return _elementwise(view, node, axis, channels)
    return _whole(node)


def _walk(view: _GraphView, seeds: Iterable[tuple[str, int | None, Channels]]) -> _Walk:
    """Walk backwards from ``seeds`` (tensor, channel axis, channels) breadth first; return what was reached.

    A tensor reached again with channels it was not reached with before is walked again for those channels only;
    the walk is breadth first, so the first time a tensor is reached is its shortest distance.
    """
    distance: dict[str, int] = {}
    covered: dict[str, Channels] = {}
    widened: collections.Counter[str] = collections.Counter()
    nodes: set[str] = set()
    tracked = False
    queue: collections.deque[tuple[str, int | None, Channels, int]] = collections.deque(
        (tensor, axis, channels, 0) for tensor, axis, channels in seeds)
    while queue:
        tensor, axis, channels, far = queue.popleft()
        if channels is not None and not channels:
            continue
        if tensor in covered:
            before = covered[tensor]
            if before is None or (channels is not None and channels <= before):
                continue
            widened[tensor] += 1
            if channels is not None and widened[tensor] < MAX_WIDENINGS:
                channels = channels - before
                covered[tensor] = before | channels
            else:
                channels = None
                covered[tensor] = None
        else:
            covered[tensor] = channels
        distance[tensor] = min(distance.get(tensor, far), far)
        found = view.producer.get(tensor)
        if found is None:
            continue
        slot, node = found
        if node.name:  # an unnamed node cannot be excluded by name anyway
            nodes.add(node.name)
        steps = _step(view, node, slot, axis, channels)
        tracked = tracked or any(ch is not None for _, ch in steps)
        for name, ch in steps:
            queue.append((name, axis if ch is not None else None, ch, far + 1))
    return _Walk(distance, covered, nodes, tracked)


def _overlap(a: Channels, b: Channels) -> bool:
    return a is None or b is None or bool(a & b)


def tensors_on_path(model: onnx.ModelProto, focus: Focus) -> PathInfo:
    """Return the fp32 tensors that feed ``focus``'s output (its channels along its axis, where it names them).

    Weights may stay external: only shapes and small constants are read. An output the graph does not compute
    gives an empty path. Never raises: a graph the walk cannot follow precisely is followed whole.
    """
    output = focus.output
    try:
        return _tensors_on_path(model, focus, output)
    except Exception:  # an odd graph: the whole ancestry of the output, with no shape or constant read
        try:
            walk = _walk(_GraphView(model, read_shapes=False), [(output, None, None)])
            return PathInfo(output, frozenset(walk.distance), dict(walk.distance), frozenset(walk.nodes))
        except Exception:  # not a graph at all
            return PathInfo(output)


def _tensors_on_path(model: Any, focus: Focus, output: str) -> PathInfo:
    view = _GraphView(model)
    known = output in view.producer or output in view.shapes or output in view.outputs
    if not known:
        return PathInfo(output)
    axis_given = focus.channel_axis
    wanted = frozenset(int(c) for c in focus.channels)
    shape = view.shape(output)
    axis = _axis(int(axis_given), len(shape) if shape is not None else None) if axis_given is not None else None
    channels: Channels = wanted if axis is not None and wanted else None
    walk = _walk(view, [(output, axis if channels is not None else None, channels)])
    # the rest of the graph: the output's other channels (when its width is known) and every other output
    rest: list[tuple[str, int | None, Channels]] = [(o, None, None) for o in view.outputs if o != output]
    if channels is not None and axis is not None:
        width = shape[axis] if shape is not None and len(shape) > axis else None
        if width is not None:
            rest.append((output, axis, frozenset(range(width)) - channels))
    others = _walk(view, rest) if rest else _Walk({}, {}, set(), False)
    tensors = frozenset(walk.distance)
    # a tensor both walks came through is shared unless they came through different channels of it (the focused
    # class rows of a head, beside the other classes' rows and the boxes)
    shared = frozenset(t for t in tensors if t in others.covered
                       and _overlap(walk.covered.get(t), others.covered[t]))
    tracked = {t: ch for t, ch in walk.covered.items() if ch is not None}
    return PathInfo(output, tensors, dict(walk.distance), frozenset(walk.nodes), shared,
                    channels is not None and walk.tracked, axis if tracked else None, tracked)
