"""The one model of an int8 graph's weights: read, dequantised, paired with their fp32 origin, measured.

This module owns everything that turns a quantised ONNX graph into weights: which form the graph is in
(``int8_format``), which of its tensors are weights in each form — QDQ (``DequantizeLinear`` of an integer tensor,
or ``QuantizeLinear`` → ``DequantizeLinear`` of a float one), QOperator (``QLinearConv``, ``QLinearMatMul``,
``QGemm`` and their int32 biases), dynamic (``ConvInteger``/``MatMulInteger``/``DynamicQuantizeMatMul``, and float
weights quantised at run time by ``DynamicQuantizeLinear``) and ``MatMulNBits`` — stored as initializers, in
``Constant`` nodes or in external data (``read_int8``); how each dequantises to float64 (per tensor, per axis, per
block, int4/uint4 included, ``dequantize``); which fp32 tensor each comes from, by name first (ORT's suffixes and
fusion prefixes stripped) and then by value, with ORT's Conv+BatchNormalization/Mul folding reproduced and
transposed or reshaped layouts tried (``read_fp32``, ``pair``); and the SQNR and error in quantisation steps of each
pair (``measure``). Lineage and diagnosis are judges over this one model and hold no reader, dequantiser or matcher
of their own. It is analysis layer: it may import numpy, onnx (lazily) and the project's io helpers (``fileio``,
``errors``), never the gate, comparison, reports or the front ends (plugin, cli, precommit), and it runs no model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = [
    "Graph",
    "Pairing",
    "QTensor",
    "WeightMatch",
    "base_name",
    "dequantize",
    "dynamic_qdq",
    "int8_format",
    "match_weights",
    "measure",
    "pair",
    "pair_weights",
    "read_fp32",
    "read_int8",
]

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"})
QOPERATOR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QAttention"})

# Suffixes ORT's quantisers and exporters append to a weight's name; stripped (repeatedly) to find its origin.
_SUFFIXES = (
    "_quantized", "_QuantizeLinear_Output", "_DequantizeLinear_Output", "_QuantizeLinear", "_DequantizeLinear",
    "_quantized_scale", "_dequantized", "_quant", "_int8", "_uint8", "_int4", "_uint4", "_TransposeB",
)
# ORT's graph fusions prefix the tensors they rewrite: ConvBnFusion_W_<w>, ConvBnFusion_BN_B_<beta>, ...
_FUSION_PREFIX = re.compile(r"^[A-Za-z]+Fusion_(?:(?:BN_)?[WB]_)?")
_NBITS_SUFFIX = re.compile(r"_Q\d+(G\d+)?$")  # MatMulNBits weights: <w>_Q4, <w>_Q4G32

_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
_CHUNK = 1 << 18  # elements quantised at a time by dynamic_qdq
_SAMPLE = 4096  # elements compared when searching for a renamed weight among same-sized candidates
_MIN_VALUE_CORR = 0.5  # a value match below this correlation is no match (unrelated trained weights sit near 0)
# numpy has no 4-bit integer type: onnx reads INT4/UINT4 tensors as ml_dtypes' int4/uint4 (dtype kind "V")
_INT4_RANGE = {"int4": (-8, 7), "uint4": (0, 15)}


def int8_format(model: onnx.ModelProto) -> str:
    """Return the quantised form of a graph: ``qoperator``, ``dynamic``, ``qdq`` or ``unknown`` (none of them)."""
    ops = {n.op_type for n in model.graph.node}
    if ops & QOPERATOR_OPS:
        return "qoperator"
    if ops & DYNAMIC_OPS:
        return "dynamic"
    if ops & QDQ_OPS:
        return "qdq"
    return "unknown"


# --------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class QTensor:
    """A weight-like tensor of the int8 graph, read back to float64.

    name: the stored tensor (the integer one; for a float weight quantised by a QuantizeLinear or at run time, the
        float one).
    values: dequantised, in the layout its consumer reads (``[K, N]`` for MatMulNBits, which stores ``[N, K]``).
    step: the quantisation step broadcast to ``values``' shape; None for float tensors.
    kind: ``qdq``, ``qoperator``, ``integer`` (dynamic), ``nbits`` or ``float`` (not quantised).
    granularity: ``tensor``, ``channel`` or ``block`` (one scale per ...); ``""`` for float tensors.
    consumers: names of the int8 graph's nodes that read it (after its DequantizeLinear, for QDQ).
    """

    name: str
    values: np.ndarray
    step: np.ndarray | None
    kind: str
    granularity: str = ""
    consumers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pairing:
    """An int8 tensor and its fp32 origin: the fp32 values laid out like the int8 ones, folded ops applied."""

    tensor: QTensor
    fp32_name: str | None
    reference: np.ndarray | None
    how: str  # name/value (+ -transposed/-reshaped, + +BatchNormalization/+Mul); "" when no origin was found


@dataclass(frozen=True)
class WeightMatch:
    """One weight of the int8 graph, dequantised to float64, and how it compares with its fp32 origin.

    kind: how it is stored: ``qdq``, ``qoperator``, ``integer`` (dynamic), ``nbits`` or ``float`` (not quantised).
    how: ``name``/``value`` (+ ``-transposed``/``-reshaped``, + ``+BatchNormalization``/``+Mul`` when compared with
        the fp32 weight that op was folded into), or ``""`` when no origin was found.
    step_rms / off_grid: RMS error in quantisation steps and share of elements more than half a step off
        (None for float tensors and unmatched ones).
    off_step: share of elements more than one step off (None likewise): rounding alone leaves none.
    """

    int8_name: str
    fp32_name: str | None
    shape: tuple[int, ...]
    kind: str
    how: str
    sqnr_db: float
    rel_error: float
    correlation: float
    step_rms: float | None = None
    off_grid: float | None = None
    off_step: float | None = None

    @property
    def quantised(self) -> bool:
        """Return True for a tensor stored as integers in the int8 graph."""
        return self.kind != "float"

    @property
    def is_weight(self) -> bool:
        """Return True for a quantised tensor of 2 or more dimensions and elements (a weight, not a bias)."""
        return self.quantised and len(self.shape) >= 2 and math.prod(self.shape) > 1


# --------------------------------------------------------------------------------------------------- graph


class Graph:
    """One ONNX graph's constant tensors (initializers and Constant nodes) and its producer/consumer look-ups.

    ``base`` is the folder external data is read from when the model was loaded without it.
    """

    def __init__(self, model: onnx.ModelProto, base: Path | None = None) -> None:
        self.model = model
        self.base = base
        self.initializers: dict[str, Any] = {i.name: i for i in model.graph.initializer}
        # some exporters (Paddle, e.g. PP-OCRv4) hold every weight in a Constant node and no initializer at all
        self.constants: dict[str, Any] = dict(self.initializers)
        for node in model.graph.node:
            if node.op_type == "Constant" and len(node.output) == 1 and node.output[0] not in self.constants:
                value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in model.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def array(self, name: str) -> np.ndarray | None:
        """Return constant ``name`` as an array (external data read from ``base``), or None when it is none."""
        from onnx import numpy_helper

        tensor = self.constants.get(name) if name else None
        if tensor is None:
            return None
        base = "" if self.base is None else str(self.base)
        return np.asarray(numpy_helper.to_array(tensor, base_dir=base))


def _attr(node: Any, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _input(node: Any, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


# --------------------------------------------------------------------------------------------- dequantising


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int | None,
               block: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """Return (dequantised float64 values, step broadcast to their shape), or None when the shapes do not fit.

    One scale: per tensor. Else per ``axis`` (one scale per index along it), or with ``block`` > 0 per block (opset
    21: the scale has ``q``'s shape with ``axis`` shrunk to ceil(dim / block)). ``q`` may be int4/uint4.
    """
    qf = np.asarray(q).astype(np.float64)
    s = np.asarray(scale).astype(np.float64)
    z = np.zeros_like(s) if zero_point is None else np.asarray(zero_point).astype(np.float64)
    if s.size == 1:
        step = np.broadcast_to(np.abs(s.reshape(())), qf.shape)
        # asarray: a 0-d weight (a quantised scalar operand) would otherwise come back as a numpy scalar
        return np.asarray((qf - z.reshape(())) * s.reshape(())), step
    if axis is None or qf.ndim == 0:
        return None
    axis %= qf.ndim
    if block > 0:
        if s.shape != tuple(-(-d // block) if a == axis else d for a, d in enumerate(qf.shape)):
            return None
        s = np.repeat(s, block, axis=axis).take(range(qf.shape[axis]), axis=axis)
        z = np.repeat(z, block, axis=axis).take(range(qf.shape[axis]), axis=axis) if z.shape != () else z
        return (qf - z) * s, np.abs(s)
    if qf.shape[axis] != s.size:
        return None
    shape = [1] * qf.ndim
    shape[axis] = s.size
    s = s.reshape(shape)
    z = z.reshape(shape) if z.size == s.size else z.reshape(()) if z.size == 1 else np.zeros(shape)
    return (qf - z) * s, np.broadcast_to(np.abs(s), qf.shape)


def _axis_for(shape: Sequence[int], size: int, preferred: int) -> int | None:
    """Return the axis of length ``size`` a per-channel scale applies to, ``preferred`` first."""
    if size == 1:
        return preferred
    if shape and shape[preferred % len(shape)] == size:
        return preferred % len(shape)
    axes = [a for a, d in enumerate(shape) if d == size]
    return axes[0] if len(axes) == 1 else None


def _int_range(dtype: np.dtype[Any]) -> tuple[int, int]:
    """Return the (min, max) of an integer type, int4/uint4 included; int8's for anything else."""
    if dtype.name in _INT4_RANGE:
        return _INT4_RANGE[dtype.name]
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.iinfo(np.int8)
    return int(info.min), int(info.max)


def _quantise_float(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """Round a float initializer the way QuantizeLinear does (half to even, saturating to the zero point's type)."""
    low, high = _int_range(np.dtype(np.int8) if zp is None else np.asarray(zp).dtype)
    s = np.asarray(scale, np.float64)
    z = np.zeros_like(s) if zp is None else np.asarray(zp).astype(np.float64)
    if s.size > 1:
        shape = [1] * w.ndim
        shape[axis % w.ndim] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    return np.clip(np.rint(np.asarray(w, np.float64) / s) + z, low, high)


def dynamic_qdq(x: np.ndarray, dtype: type[np.floating[Any]] = np.float64) -> tuple[np.ndarray, float]:
    """Quantise and dequantise like DynamicQuantizeLinear (uint8, range widened to hold 0) in ``dtype``: (values, step).

    A weight is read back in float64; an activation, quantised by ORT in float32 at run time, is simulated in float32.
    """
    x = np.asarray(x, dtype=dtype)
    lo = min(0.0, float(x.min())) if x.size else 0.0
    hi = max(0.0, float(x.max())) if x.size else 0.0
    scale = dtype((hi - lo) / 255.0)
    if scale == 0:  # all zeros: reproduced exactly, with a nominal step of 1
        return x.copy(), 1.0
    zp = dtype(np.clip(np.rint(-lo / scale), 0, 255))
    out = np.empty_like(x)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    # chunk by chunk: an activation can be large, and a whole-tensor temporary would double it
    for start in range(0, flat_in.size, _CHUNK):
        q = np.clip(np.rint(flat_in[start:start + _CHUNK] / scale) + zp, 0, 255)
        flat_out[start:start + _CHUNK] = (q - zp) * scale
    return out, float(scale)


def _unpack_nibbles(packed: np.ndarray, rows: int) -> np.ndarray:
    """Return the 4-bit values of ``packed`` (two per byte, low nibble first) as float64 rows."""
    raw = np.asarray(packed, np.uint8).reshape(rows, -1)
    out = np.empty((rows, raw.shape[1] * 2), np.float64)
    out[:, 0::2], out[:, 1::2] = raw & 0x0F, raw >> 4
    return out


def _nbits(graph: _Reader, node: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Unpack a MatMulNBits weight (4- or 8-bit, stored [N, K] in blocks along K) to float64 [K, N]."""
    b, scales = graph.array(_input(node, 1)), graph.array(_input(node, 2))
    bits, block = _attr(node, "bits", 4), _attr(node, "block_size", 0)
    k, n = _attr(node, "K", 0), _attr(node, "N", 0)
    if b is None or scales is None or bits not in (4, 8) or block <= 0 or k <= 0 or n <= 0:
        return None
    blocks = -(-k // block)
    flat = _unpack_nibbles(b, n) if bits == 4 else np.asarray(b, np.uint8).reshape(n, -1).astype(np.float64)
    if flat.shape[1] < blocks * block:
        return None
    q = flat[:, : blocks * block].reshape(n, blocks, block)
    s = np.asarray(scales, np.float64).reshape(n, blocks, 1)
    zp_arr = graph.array(_input(node, 3))
    if zp_arr is None:
        z = np.full((n, blocks, 1), float(2 ** (bits - 1)))
    elif zp_arr.dtype.kind != "f" and bits == 4:
        z = _unpack_nibbles(zp_arr, n)[:, :blocks].reshape(n, blocks, 1)
    else:
        z = np.asarray(zp_arr, np.float64).reshape(n, blocks, 1)
    values = ((q - z) * s).reshape(n, blocks * block)[:, :k]
    step = np.broadcast_to(np.abs(s), (n, blocks, block)).reshape(n, blocks * block)[:, :k]
    return values.T, step.T  # the MatMul weight's own layout, [K, N]


# ------------------------------------------------------------------------------------------------ reading


class _Reader:
    """A graph's constants, each converted once while one int8 graph is read (and dropped with the reader)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._cache: dict[str, np.ndarray | None] = {}

    def array(self, name: str) -> np.ndarray | None:
        if name not in self._cache:
            self._cache[name] = self.graph.array(name)
        return self._cache[name]


def _granularity(scale: np.ndarray, block: int = 0) -> str:
    return "tensor" if scale.size == 1 else "block" if block > 0 else "channel"


def _node_names(nodes: Iterable[Any]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.name for n in nodes if n.name))


def read_int8(graph: Graph) -> list[QTensor]:
    """Return the weight-like tensors of an int8 graph, dequantised, in graph order; quantised ones first.

    Float constants that are not quantisation parameters come last, as they are (biases of dynamic graphs, weights
    of excluded nodes); 0-d and integer ones (shapes, indices) are not weights. A dynamic weight's scale is
    ``<w>_scale`` or found by following the integer op's output through its ``Cast``/``Mul`` nodes.
    """
    reader = _Reader(graph)
    tensors: dict[str, QTensor] = {}
    qparams: set[str] = set()

    def add(name: str, got: tuple[np.ndarray, np.ndarray] | None, kind: str, granularity: str,
            consumers: Iterable[Any]) -> None:
        if got is not None and name not in tensors:
            tensors[name] = QTensor(name, got[0], got[1], kind, granularity, _node_names(consumers))

    def arr(name: str) -> np.ndarray | None:
        return reader.array(name) if name else None

    def readers(outputs: Iterable[str]) -> list[Any]:
        return [c for out in outputs for c in graph.consumers.get(out, [])]

    for node in graph.model.graph.node:
        op, ins = node.op_type, list(node.input)
        if op in ("QuantizeLinear", "DequantizeLinear"):
            qparams.update(n for n in ins[1:3] if n)
        if op == "DequantizeLinear":
            scale, zp = arr(_input(node, 1)), arr(_input(node, 2))
            if scale is None:
                continue
            src = ins[0]
            q = arr(src)
            axis, block = _attr(node, "axis", 1), _attr(node, "block_size", 0)
            if q is not None and q.dtype.kind != "f":
                add(src, dequantize(q, scale, zp, axis, block), "qdq", _granularity(scale, block),
                    readers(node.output))
                continue
            qnode = graph.producer.get(src)
            if qnode is not None and qnode.op_type == "QuantizeLinear":
                w = arr(qnode.input[0])
                if w is not None and w.dtype.kind == "f":
                    qs = _quantise_float(w, scale, zp, axis) if w.ndim else np.asarray(w)
                    add(qnode.input[0], dequantize(qs, scale, zp, axis, block), "qdq", _granularity(scale, block),
                        readers(node.output))
        elif op in ("QLinearConv", "QLinearConvTranspose"):
            qparams.update(n for i, n in enumerate(ins) if i in (1, 2, 4, 5, 6, 7) and n)
            w, ws = arr(_input(node, 3)), arr(_input(node, 4))
            if w is not None and ws is not None:
                ax = _axis_for(w.shape, ws.size, 0 if op == "QLinearConv" else 1)
                add(ins[3], dequantize(w, ws, arr(_input(node, 5)), ax), "qoperator", _granularity(ws), [node])
                xs, b = arr(_input(node, 1)), arr(_input(node, 8))
                if b is not None and xs is not None and xs.size == 1:
                    # an int32 bias is stored in steps of input scale × weight scale
                    add(ins[8], dequantize(b, ws * xs.reshape(()), None, 0), "qoperator", _granularity(ws), [node])
        elif op in ("QLinearMatMul", "QGemm"):
            qparams.update(n for i, n in enumerate(ins) if i in (1, 2, 4, 5, 6, 7, 8) and n and not
                           (op == "QGemm" and i == 6))
            for wi, si, zi in ((3, 4, 5), (0, 1, 2)):
                w, ws = arr(_input(node, wi)), arr(_input(node, si))
                if w is None or ws is None or w.dtype.kind == "f":
                    continue
                trans = _attr(node, "transB" if wi == 3 else "transA", 0) if op == "QGemm" else 0
                pref = (0 if trans else -1) if wi == 3 else (-1 if trans else 0)
                add(ins[wi], dequantize(w, ws, arr(_input(node, zi)), _axis_for(w.shape, ws.size, pref)),
                    "qoperator", _granularity(ws), [node])
            if op == "QGemm":
                a_s, b_s, c = arr(_input(node, 1)), arr(_input(node, 4)), arr(_input(node, 6))
                if c is not None and a_s is not None and b_s is not None and c.dtype.kind in "iu":
                    add(ins[6], dequantize(c, b_s * a_s.reshape(()), None, 0), "qoperator", _granularity(b_s),
                        [node])
        elif op in ("QLinearAdd", "QLinearMul"):
            # a constant operand is stored quantised too: a MatMul's bias, when ORT fused no Gemm
            qparams.update(n for i, n in enumerate(ins) if i in (1, 2, 4, 5, 6, 7) and n)
            for vi, si, zi in ((0, 1, 2), (3, 4, 5)):
                v, vs = arr(_input(node, vi)), arr(_input(node, si))
                if v is not None and vs is not None and v.dtype.kind != "f":
                    add(ins[vi], dequantize(v, vs, arr(_input(node, zi)), _axis_for(v.shape, vs.size, -1)),
                        "qoperator", _granularity(vs), [node])
        elif op in ("ConvInteger", "MatMulInteger"):
            qparams.update(n for n in ins[2:4] if n)
            w = arr(_input(node, 1))
            if w is None:
                continue
            found = _integer_scale(graph, reader, node, ins[1], w)
            if found is not None:
                qparams.add(found[0])
                ws = found[1]
                pref = 0 if op == "ConvInteger" else -1
                add(ins[1], dequantize(w, ws, arr(_input(node, 3)), _axis_for(w.shape, ws.size, pref)),
                    "integer", _granularity(ws), [node])
        elif op == "DynamicQuantizeMatMul":
            qparams.update(n for n in ins[2:4] if n)
            w, ws = arr(_input(node, 1)), arr(_input(node, 2))
            if w is not None and ws is not None:
                add(ins[1], dequantize(w, ws, arr(_input(node, 3)), _axis_for(w.shape, ws.size, -1)),
                    "integer", _granularity(ws), [node])
        elif op == "DynamicQuantizeLinear":
            # a weight ORT did not see as constant (listed among an old opset's graph inputs) is quantised at run
            # time, uint8 over its range with 0 included: do the same here
            w = arr(ins[0])
            if w is not None and w.dtype.kind == "f" and w.ndim >= 1:
                values, step = dynamic_qdq(w)
                add(ins[0], (values, np.full(values.shape, step)), "integer", "tensor", readers(node.output[:1]))
        elif op == "MatMulNBits":
            qparams.update(n for n in ins[2:5] if n)
            add(ins[1], _nbits(reader, node), "nbits", "block", [node])
    for name, init in graph.constants.items():
        if name in tensors or name in qparams or init.data_type not in _FLOAT_TYPES or len(init.dims) == 0:
            continue
        value = reader.array(name)
        if value is not None and value.size > 0:
            tensors[name] = QTensor(name, value.astype(np.float64), None, "float", "",
                                    _node_names(graph.consumers.get(name, [])))
    return list(tensors.values())


def _integer_scale(graph: Graph, reader: _Reader, node: Any, wname: str, w: np.ndarray
                   ) -> tuple[str, np.ndarray] | None:
    """Find the weight scale of a ConvInteger/MatMulInteger: ``<w>_scale``, or a Mul the integer output goes through."""
    base = base_name(wname)
    for cand in (base + "_scale", wname + "_scale"):
        value = reader.array(cand)
        if value is not None and value.dtype.kind == "f":
            return cand, value
    # ORT writes Cast(int32 -> float) then Mul(., act_scale * w_scale): look two nodes ahead, and one node behind
    # the Mul's other input, for a float initializer the size of one scale or of one per output channel
    channels = {1, w.shape[0] if node.op_type == "ConvInteger" else w.shape[-1]}
    frontier, seen = list(node.output), 0
    while frontier and seen < 4:
        seen += 1
        nxt: list[str] = []
        for tensor in frontier:
            for consumer in graph.consumers.get(tensor, []):
                if consumer.op_type == "Cast":
                    nxt += list(consumer.output)
                if consumer.op_type != "Mul":
                    continue
                for other in (n for n in consumer.input if n != tensor):
                    value = reader.array(other)
                    if value is not None and value.dtype.kind == "f" and value.size in channels:
                        return other, value
                    prod = graph.producer.get(other)
                    if prod is not None and prod.op_type == "Mul":
                        for leaf in prod.input:
                            value = reader.array(leaf)
                            if value is not None and value.dtype.kind == "f" and value.size in channels:
                                return leaf, value
        frontier = nxt
    return None


_Refs = dict[str, list[tuple[np.ndarray, str]]]  # fp32 name -> (values, "" or what was folded into them)


def read_fp32(graph: Graph) -> _Refs:
    """Return the float tensors (1-D and up) of an fp32 graph, plus their values after ORT's Conv fusions.

    ``quant_pre_process`` folds a BatchNormalization or a constant Mul that follows a Conv into the Conv's weight and
    bias (``ConvBnFusion_W_<w>``, ``ConvBnFusion_BN_B_<beta>``): the folded values are computed here the same way,
    so a sidecar of the pre-processed graph is compared exactly, not just by correlation.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in graph.constants.items():
        if tensor.data_type in _FLOAT_TYPES and len(tensor.dims) > 0:
            value = graph.array(name)
            if value is not None:
                arrays[name] = value.astype(np.float64)
    refs: _Refs = {name: [(value, "")] for name, value in arrays.items()}
    for node in graph.model.graph.node:
        conv = graph.producer.get(node.input[0]) if node.input else None
        if conv is None or conv.op_type != "Conv" or _input(conv, 1) not in arrays:
            continue
        w = arrays[conv.input[1]]
        bias = arrays.get(_input(conv, 2), np.zeros(w.shape[0]))
        if node.op_type == "BatchNormalization" and all(n in arrays for n in node.input[1:5]):
            gamma, beta, mean, var = (arrays[n].ravel() for n in node.input[1:5])
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            factor = gamma / np.sqrt(var + eps)
            folded_b = (bias - mean) * factor + beta
            names, label = (conv.input[1], node.input[2], _input(conv, 2)), "+BatchNormalization"
        elif node.op_type == "Mul" and len(node.input) > 1 and node.input[1] in arrays:
            factor = arrays[node.input[1]].ravel()
            if factor.size not in (1, w.shape[0]):
                continue
            folded_b, names, label = bias * factor, (conv.input[1], _input(conv, 2), ""), "+Mul"
        else:
            continue
        folded_w = w * np.asarray(factor).reshape((-1,) + (1,) * (w.ndim - 1))
        refs[names[0]].append((folded_w, label))
        for bias_name in names[1:]:
            if bias_name in refs:
                refs[bias_name].append((np.broadcast_to(folded_b, (w.shape[0],)).astype(np.float64), label))
    return refs


# -------------------------------------------------------------------------------------------------- matching


def base_name(name: str) -> str:
    """Return ``name`` without the suffixes ORT's quantisers and exporters append (``_quantized``, ``_Q4``...)."""
    name = _NBITS_SUFFIX.sub("", name)
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name, changed = name[: -len(suffix)], True
    return name


def _alignments(ref: np.ndarray, shape: tuple[int, ...]) -> list[tuple[np.ndarray, str]]:
    """Return the ways the fp32 tensor can be laid out as the int8 one: as is, reshaped, or transposed (2-D)."""
    out: list[tuple[np.ndarray, str]] = []
    if ref.size != math.prod(shape):
        return out
    squeezed_ref = tuple(d for d in ref.shape if d != 1)
    squeezed = tuple(d for d in shape if d != 1)
    if ref.shape == shape:
        out.append((ref, ""))
    elif squeezed_ref == squeezed:
        out.append((ref.reshape(shape), "-reshaped"))
    # a square matrix fits both ways: Gemm transB and MatMulNBits store the transpose of a MatMul weight
    if len(squeezed_ref) == 2 and squeezed_ref[::-1] == squeezed:
        out.append((ref.reshape(squeezed_ref).T.reshape(shape), "-transposed"))
    return out


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -2.0


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two same-sized arrays in float64; 1.0 when identical, NaN when one is constant."""
    x, y = a.ravel(), b.ravel()
    if x.size == 0:
        return math.nan
    if np.array_equal(x, y):
        return 1.0
    xc, yc = x - x.mean(), y - y.mean()
    # einsum, not @: BLAS's dot may start threads on long vectors, which stalls on a busy 2-core machine
    den = math.sqrt(float(np.einsum("i,i->", xc, xc)) * float(np.einsum("i,i->", yc, yc)))
    return float(np.einsum("i,i->", xc, yc)) / den if den > 0 else math.nan


def _sample(a: np.ndarray) -> np.ndarray:
    flat = a.ravel()
    return flat if flat.size <= _SAMPLE else flat[:: flat.size // _SAMPLE][:_SAMPLE]


def _candidates(t: QTensor) -> list[str]:
    """Return the fp32 names ``t`` may carry: as stored, ORT's suffixes stripped, then its fusion prefix too."""
    stripped = base_name(t.name)
    return list(dict.fromkeys([t.name, stripped, _FUSION_PREFIX.sub("", stripped)]))


def _closest(t: QTensor, options: Sequence[tuple[np.ndarray, str]]) -> tuple[np.ndarray, str] | None:
    """Return the (layout, how) of an fp32 tensor's options that is nearest to the int8 values."""
    best: tuple[float, np.ndarray, str] | None = None
    for values, label in options:
        for layout, suffix in _alignments(values, tuple(t.values.shape)):
            err = float(np.linalg.norm(layout - t.values))
            if best is None or err < best[0]:
                best = (err, layout, suffix + label)
    return None if best is None else (best[1], best[2])


def pair(tensors: Sequence[QTensor], fp32: _Refs) -> list[Pairing]:
    """Pair int8 tensors with fp32 tensors: by name, then by value among unused same-sized tensors; in input order.

    Each fp32 tensor is the origin of one int8 tensor at most. By value, every compatible unused fp32 tensor is
    scored by correlation on a sample and the best pairs are taken first; below 0.5 there is no match.
    """
    used: set[str] = set()
    found: dict[str, Pairing] = {}
    for t in tensors:
        for cand in _candidates(t):
            chosen = _closest(t, fp32[cand]) if cand in fp32 and cand not in used else None
            if chosen is not None:
                used.add(cand)
                found[t.name] = Pairing(t, cand, chosen[0], "name" + chosen[1])
                break
    # renamed tensors: score every compatible unused fp32 tensor on a sample, best pairs first
    rest = [t for t in tensors if t.name not in found]
    by_size: dict[int, list[str]] = {}
    for name, options in fp32.items():
        if name not in used:
            by_size.setdefault(options[0][0].size, []).append(name)
    scored: list[tuple[float, str, str]] = []
    for t in rest:
        probe = _sample(t.values)
        for name in by_size.get(t.values.size, []):
            best = max((_finite(_corr(_sample(layout), probe))
                        for values, _ in fp32[name] for layout, _ in _alignments(values, tuple(t.values.shape))),
                       default=-2.0)
            scored.append((best, t.name, name))
    by_name = {t.name: t for t in rest}
    for c, tname, fname in sorted(scored, reverse=True):
        if tname in found or fname in used or c < _MIN_VALUE_CORR:
            continue
        chosen = _closest(by_name[tname], fp32[fname])
        if chosen is not None:
            used.add(fname)
            found[tname] = Pairing(by_name[tname], fname, chosen[0], "value" + chosen[1])
    return [found.get(t.name) or Pairing(t, None, None, "") for t in tensors]


def pair_weights(int8: Graph, fp32: Graph) -> list[Pairing]:
    """Read the int8 graph's weight-like tensors and pair each with its fp32 origin (``read_int8``, ``pair``)."""
    return pair(read_int8(int8), read_fp32(fp32))


# ------------------------------------------------------------------------------------------------ measuring

CHUNK = 1 << 18  # elements turned into float64 at a time by the SQNR sums (2 MiB per float64 chunk)


def sqnr_db(reference: np.ndarray | Sequence[np.ndarray], test: np.ndarray | Sequence[np.ndarray]) -> float:
    """Return 20·log10(‖ref‖/‖ref − test‖) in dB, in float64 (inf when identical, -inf for non-finite test)."""
    refs = [reference] if isinstance(reference, np.ndarray) else list(reference)
    tests = [test] if isinstance(test, np.ndarray) else list(test)
    ref_size, test_size = sum(np.size(r) for r in refs), sum(np.size(t) for t in tests)
    if ref_size != test_size:
        raise ValueError(f"cannot compare {ref_size} values with {test_size}")
    acc = SqnrSums()
    if len(refs) == len(tests) and all(np.size(r) == np.size(t) for r, t in zip(refs, tests)):
        for r, t in zip(refs, tests):
            acc.add(np.asarray(r), np.asarray(t))
    else:
        acc.add(_flat(refs), _flat(tests))
    return acc.db()


def _flat(values: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v).ravel() for v in values]) if len(values) else np.zeros(0)


class SqnrSums:
    """Running ‖ref‖² and ‖ref − test‖² in float64, fed chunk by chunk so no float64 copy of a whole tensor exists."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.finite = True
        self.mismatch = False

    def add(self, ref: np.ndarray, test: np.ndarray, floor: float | None = None) -> None:
        r, t = ref.reshape(-1), test.reshape(-1)
        if r.size != t.size:
            self.mismatch = True
            return
        # einsum, not np.dot: BLAS's dot starts threads on long vectors, and beside ORT's threads on 2 cores these
        # sums took 0.14-0.52 s per diagnosis instead of 0.02 s (measured with OPENBLAS_NUM_THREADS=1)
        for start in range(0, r.size, CHUNK):
            a = r[start:start + CHUNK].astype(np.float64)
            if floor is not None:
                np.maximum(a, floor, out=a)
            b = t[start:start + CHUNK].astype(np.float64)
            b -= a
            noise = float(np.einsum("i,i->", b, b))
            if not math.isfinite(noise) and not np.isfinite(t[start:start + CHUNK]).all():
                self.finite = False
                continue
            self.signal += float(np.einsum("i,i->", a, a))
            self.noise += noise

    def db(self) -> float:
        if not self.finite:
            return float("-inf")
        if math.isnan(self.noise) or math.isnan(self.signal):
            return float("nan")
        if self.noise == 0.0:
            return float("inf")
        if self.signal == 0.0:
            return float("-inf")
        return 10.0 * math.log10(self.signal / self.noise)




def measure(p: Pairing) -> WeightMatch:
    """Return the SQNR, relative error, correlation and error in quantisation steps of one pairing."""
    t = p.tensor
    shape = tuple(int(d) for d in t.values.shape)
    if p.reference is None or p.fp32_name is None:
        return WeightMatch(t.name, None, shape, t.kind, "", math.nan, math.nan, math.nan)
    ref, deq = p.reference, t.values
    err = ref - deq
    # the same float64 sums as every other SQNR of the package (activations, outputs): one number per tensor
    sqnr = sqnr_db(ref, deq)
    noise, signal = float(np.linalg.norm(err)), float(np.linalg.norm(ref))
    if noise == 0.0:
        rel = 0.0
    elif signal == 0.0 or not math.isfinite(noise):
        rel = math.inf
    else:
        rel = noise / signal
    step_rms = off_grid = off_step = None
    if t.step is not None:
        step = np.asarray(t.step, np.float64)
        live = step > 0
        in_steps = np.abs(err[live]) / step[live]
        dead_off = int(np.count_nonzero(err[~live]))  # a zero scale can only reproduce zeros
        step_rms = float(np.sqrt(np.mean(in_steps**2))) if in_steps.size else 0.0
        # half a step, plus float32 slack: ORT divides by the scale in float32
        off = int(np.count_nonzero(in_steps > 0.5 + 1e-3)) + dead_off
        off_grid = off / err.size if err.size else 0.0
        # one step, plus 1% slack for the float32 scale
        beyond = int(np.count_nonzero(in_steps > 1.01)) + dead_off
        off_step = beyond / err.size if err.size else 0.0
    return WeightMatch(t.name, p.fp32_name, shape, t.kind, p.how, sqnr, rel, _corr(ref, deq), step_rms, off_grid,
                       off_step)


def match_weights(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> tuple[WeightMatch, ...]:
    """Match every weight-like tensor of the int8 graph, dequantised to float64, with its fp32 origin and measure it."""
    return tuple(measure(p) for p in pair_weights(Graph(int8), Graph(fp32)))


def format_db(value: float | None) -> str:
    """Return an SQNR in dB as the reports show it (one decimal, inf, -inf or -)."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.1f}"
