"""Does an int8 sidecar derive from its fp32 model? Weight-by-weight and op-by-op evidence, without running either.

Use ``check_lineage`` before comparing outputs: a sidecar that is the fp32 file itself, another model, or a
quantisation of an *older* fp32 (the fp32 was retrained and ``quantgate pin`` re-pinned both hashes) can pass an
output budget by luck; its weights cannot hide where they came from. Use ``match_weights`` for per-weight SQNR in
a diagnosis: it pairs every weight of the int8 graph with its fp32 origin even when ORT's fusions or an exporter
renamed it.

How a weight is read back, per format:

* QDQ: an integer initializer (int8, uint8, int4, uint4, int16, int32 biases) feeding ``DequantizeLinear`` with
  its scale and zero point, per tensor, per axis or per block; a float initializer feeding
  ``QuantizeLinear`` → ``DequantizeLinear`` (pt2e exports without folding) is quantised here the same way.
* QOperator: the weight inputs of ``QLinearConv``, ``QLinearMatMul``, ``QGemm`` (and their int32 biases, whose
  scale is input scale × weight scale).
* Dynamic: ``ConvInteger``/``MatMulInteger``/``DynamicQuantizeMatMul`` weights; the weight scale is found as
  ``<w>_scale`` or by following the integer op's output through its ``Cast``/``Mul`` nodes.
* ``MatMulNBits`` (4- and 8-bit blocks, stored ``[N, K]``): unpacked to the MatMul weight's ``[K, N]``.
* Float initializers of the int8 graph that are not quantisation parameters are kept as they are.

Matching: by name first (ORT's ``_quantized``/``_QuantizeLinear_Output``/``_Q4``... suffixes and its fusions'
``ConvBnFusion_W_``-style prefixes stripped), then among the unused fp32 tensors of a compatible shape (same,
transposed 2-D, or equal after dropping 1-sized axes) by value correlation. A Conv followed by BatchNormalization or
a constant Mul in the fp32 graph is also offered with that op folded in, as ``quant_pre_process`` does, and the
nearer of the two is kept.

Why the error is measured in quantisation steps: rounding ``w`` to its grid moves each element by at most half a
step, so a PTQ sidecar of *this* fp32 sits within half a step everywhere (a handful of clipped extremes aside),
whatever the weights' spread; a sidecar of an fp32 that has since moved by even a fraction of a step does not. QAT
fine-tunes the weights before rounding, so its error is larger and judged against a threshold measured on QAT
sidecars. See ``THRESHOLDS`` for the measured numbers.

Only ``onnx`` and numpy are imported; nothing here runs a model.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelFileError
from .fileio import sha256_file

if TYPE_CHECKING:
    import onnx

__all__ = [
    "THRESHOLDS",
    "LineageReport",
    "LineageThresholds",
    "WeightMatch",
    "check_lineage",
    "match_weights",
    "op_structure",
]

# Suffixes ORT's quantisers and exporters append to a weight's name; stripped (repeatedly) to find its origin.
_SUFFIXES = (
    "_quantized", "_QuantizeLinear_Output", "_DequantizeLinear_Output", "_QuantizeLinear", "_DequantizeLinear",
    "_quantized_scale", "_dequantized", "_quant", "_int8", "_uint8", "_int4", "_uint4", "_TransposeB",
)
# ORT's graph fusions prefix the tensors they rewrite: ConvBnFusion_W_<w>, ConvBnFusion_BN_B_<beta>, ...
_FUSION_PREFIX = re.compile(r"^[A-Za-z]+Fusion_(?:(?:BN_)?[WB]_)?")
_NBITS_SUFFIX = re.compile(r"_Q\d+(G\d+)?$")  # MatMulNBits weights: <w>_Q4, <w>_Q4G32

# Quantised op -> the float op it replaces (None: quantisation plumbing with no float counterpart).
_FLOAT_OP: dict[str, str | None] = {
    "QuantizeLinear": None, "DequantizeLinear": None, "DynamicQuantizeLinear": None,
    "QLinearConv": "Conv", "ConvInteger": "Conv", "FusedConv": "Conv", "NhwcFusedConv": "Conv",
    "QLinearMatMul": "MatMul", "MatMulInteger": "MatMul", "DynamicQuantizeMatMul": "MatMul",
    "MatMulIntegerToFloat": "MatMul", "MatMulNBits": "MatMul", "FusedMatMul": "MatMul",
    "QGemm": "Gemm", "FusedGemm": "Gemm", "QLinearAdd": "Add", "QLinearMul": "Mul",
    "QLinearSigmoid": "Sigmoid", "QLinearLeakyRelu": "LeakyRelu", "QLinearConcat": "Concat",
    "QLinearGlobalAveragePool": "GlobalAveragePool", "QLinearAveragePool": "AveragePool",
    "QLinearSoftmax": "Softmax", "QLinearWhere": "Where", "QLinearReduceMean": "ReduceMean",
    "QAttention": "Attention", "QLinearConvTranspose": "ConvTranspose",
}

# Ops that carry a model's learned weights: their counts must agree between fp32 and int8. MatMul and Gemm are one
# family because ORT's pre-processing fuses MatMul + Add into Gemm.
_COMPUTE_FAMILY = {"Conv": "Conv", "ConvTranspose": "ConvTranspose", "MatMul": "MatMul/Gemm", "Gemm": "MatMul/Gemm",
                   "LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN", "Einsum": "Einsum", "Attention": "Attention"}

_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
_MODES = ("dynamic", "static", "qat")
_SAMPLE = 4096  # elements compared when searching for a renamed weight among same-shaped candidates


@dataclass(frozen=True)
class LineageThresholds:
    """Limits of one quant mode; a sidecar beyond any of them is not derived from the fp32 it is gated against.

    different_corr: every quantised weight must correlate at least this well with its fp32 origin (another model
        or another training run correlates near 0).
    max_off_grid: largest share of a weight's elements more than half a quantisation step from the fp32 value
        (None: not checked, QAT moves weights off the fp32 grid by design).
    max_step_rms: largest RMS error of a weight in quantisation steps (rounding alone gives ≤ 0.289 on average).
    min_matched: least share of the int8 graph's quantised weights that must find an fp32 origin.
    """

    different_corr: float
    max_off_grid: float | None
    max_step_rms: float
    min_matched: float = 1.0


# Measured with scripts/lineage_measure.py (onnxruntime 1.32, torch 2.13; README "Lineage" has the full table).
# Per weight (2-D and up), worst over the model's weights:
#   healthy PTQ (bundled dynamic fusion_mlp_v1 and static residual_filter_v1, plus fresh sidecars: dynamic
#     per-channel / uint8 / reduce_range, static per-tensor / QOperator / uint8 / no pre-processing, sidecars of
#     fine-tuned fp32s): off-grid share 0.000 everywhere, error 0.27-0.33 steps RMS, correlation >= 0.9989;
#   healthy QAT (nr_cnn_v1 bridge route): bundled recipe (2 epochs, LR 3e-5) 0.42-0.46 steps, 5 epochs 0.81,
#     1 epoch at the default LR 2e-4 1.14, 2 epochs at 2e-4 2.09 (QAT is a fine-tune: 18-66% of elements off-grid);
#   stale (bundled sidecar vs its fp32 fine-tuned k Adam steps at the training LR): off-grid share >= 0.13 for
#     every PTQ model from k = 1; QAT 0.92 (k=1), 2.36 (5), 3.51 (10), 5.36 (25), 8.0 (50), 12.6 (125 = 1 epoch);
#   other training runs: correlation -0.17..0.21 per weight (other seeds), 0.79 (same seed, 10 instead of 12 epochs);
#   real third-party models (rapidocr PP-OCRv4 det/rec, mobile cls; static QDQ/QOperator, dynamic): off-grid 0.000,
#     <= 0.315 steps, correlation >= 0.9996, every weight matched (ConvBnFusion_* included).
# PTQ: rounding alone keeps every element within half a step, so any real drift shows; QAT's own drift overlaps a
# fp32 fine-tune of < ~10 steps, so 4.0 steps is ~2x the worst healthy QAT measured and catches >= ~20 steps.
THRESHOLDS: Mapping[str, LineageThresholds] = {
    "dynamic": LineageThresholds(different_corr=0.9, max_off_grid=0.05, max_step_rms=0.5),
    "static": LineageThresholds(different_corr=0.9, max_off_grid=0.05, max_step_rms=0.5),
    "qat": LineageThresholds(different_corr=0.9, max_off_grid=None, max_step_rms=4.0),
}


@dataclass(frozen=True)
class WeightMatch:
    """One weight of the int8 graph, dequantised to float64, and how it compares with its fp32 origin.

    kind: how it is stored: ``qdq``, ``qoperator``, ``integer`` (dynamic), ``nbits`` or ``float`` (not quantised).
    how: ``name``/``value`` (+ ``-transposed``/``-reshaped``, + ``+BatchNormalization``/``+Mul`` when compared with
        the fp32 weight that op was folded into), or ``""`` when no origin was found.
    step_rms / off_grid: RMS error in quantisation steps and share of elements more than half a step off
        (None for float tensors and unmatched ones).
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

    @property
    def quantised(self) -> bool:
        """Return True for a tensor stored as integers in the int8 graph."""
        return self.kind != "float"

    @property
    def is_weight(self) -> bool:
        """Return True for a quantised tensor of 2 or more dimensions and elements (a weight, not a bias)."""
        return self.quantised and len(self.shape) >= 2 and math.prod(self.shape) > 1


@dataclass(frozen=True)
class LineageReport:
    """Verdict of ``check_lineage``: ``ok`` or the reasons the sidecar is not derived from the fp32 model."""

    ok: bool
    reasons: tuple[str, ...]
    mode: str
    weights_matched: int
    weights_total: int
    min_sqnr_db: float
    median_sqnr_db: float
    max_step_rms: float
    max_off_grid: float
    min_correlation: float
    structure: str
    matches: tuple[WeightMatch, ...] = field(repr=False, default=())

    def lines(self) -> list[str]:
        """Return the verdict, the numbers and the reasons as report lines."""
        head = "lineage OK" if self.ok else "lineage REFUSED: the int8 sidecar is not derived from this fp32 model"
        out = [
            head,
            (f"  weights matched {self.weights_matched}/{self.weights_total}  SQNR min {_db(self.min_sqnr_db)}"
             f" median {_db(self.median_sqnr_db)}  error in steps max {self.max_step_rms:.3f}"
             f"  off-grid max {self.max_off_grid:.3f}  correlation min {self.min_correlation:.5f}"),
            f"  structure: {self.structure}",
        ]
        out += [f"  - {reason}" for reason in self.reasons]
        return out


# --------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Tensor:
    """A weight-like tensor of the int8 graph, read back to float64."""

    name: str
    aliases: tuple[str, ...]
    values: np.ndarray
    step: np.ndarray | None  # quantisation step broadcast to values' shape; None for float tensors
    kind: str


class _Graph:
    """Initializers and consumers of one graph, with arrays converted on first use."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:  # some exporters (Paddle) store weights as Constant nodes
            if node.op_type == "Constant" and len(node.output) == 1 and node.output[0] not in self.inits:
                value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
                if value is not None:
                    self.inits[node.output[0]] = value
        self.consumers: dict[str, list[Any]] = {}
        self.producer: dict[str, Any] = {}
        for node in model.graph.node:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
            for name in node.output:
                self.producer[name] = node
        self._cache: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray | None:
        """Return initializer ``name`` as a numpy array, or None when it is not an initializer."""
        from onnx import numpy_helper

        if name not in self.inits:
            return None
        if name not in self._cache:
            self._cache[name] = numpy_helper.to_array(self.inits[name])
        return self._cache[name]


def _attr(node: Any, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _input(node: Any, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int | None,
                block: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """Return (dequantised float64 values, step broadcast to their shape), or None when the shapes do not fit."""
    qf = np.asarray(q).astype(np.float64)
    s = np.asarray(scale).astype(np.float64)
    z = np.zeros_like(s) if zp is None else np.asarray(zp).astype(np.float64)
    if s.size == 1:
        step = np.broadcast_to(np.abs(s.reshape(())), qf.shape)
        return (qf - z.reshape(())) * s.reshape(()), step
    if axis is None or qf.ndim == 0:
        return None
    axis %= qf.ndim
    if block > 0:  # blocked (opset 21): scale has the shape of q with axis shrunk to ceil(dim / block)
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


def _quantise_float(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """Round a float initializer the way QuantizeLinear does (half to even, saturating to the zero point's type)."""
    dtype = np.dtype(np.int8) if zp is None else np.asarray(zp).dtype
    s = np.asarray(scale, np.float64)
    z = np.zeros_like(s) if zp is None else np.asarray(zp).astype(np.float64)
    if s.size > 1:
        shape = [1] * w.ndim
        shape[axis % w.ndim] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.iinfo(np.int8)
    return np.clip(np.rint(np.asarray(w, np.float64) / s) + z, info.min, info.max)


def _read_int8(graph: _Graph) -> tuple[list[_Tensor], set[str]]:
    """Return the weight-like tensors of an int8 graph and the names of its quantisation parameters."""
    tensors: dict[str, _Tensor] = {}
    qparams: set[str] = set()

    def add(name: str, alias: Iterable[str], got: tuple[np.ndarray, np.ndarray] | None, kind: str) -> None:
        if got is not None and name not in tensors:
            tensors[name] = _Tensor(name, tuple(a for a in alias if a), got[0], got[1], kind)

    def arr(name: str) -> np.ndarray | None:
        return graph.array(name) if name else None

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
            if q is not None and q.dtype.kind not in "f":
                add(src, node.output, _dequantize(q, scale, zp, axis, block), "qdq")
                continue
            qnode = graph.producer.get(src)
            if qnode is not None and qnode.op_type == "QuantizeLinear":
                w = arr(qnode.input[0])
                if w is not None and w.dtype.kind == "f":
                    qs = _quantise_float(w, scale, zp, axis) if w.ndim else np.asarray(w)
                    add(qnode.input[0], (src, *node.output), _dequantize(qs, scale, zp, axis, block), "qdq")
        elif op in ("QLinearConv", "QLinearConvTranspose"):
            qparams.update(n for i, n in enumerate(ins) if i in (1, 2, 4, 5, 6, 7) and n)
            w, ws = arr(_input(node, 3)), arr(_input(node, 4))
            if w is not None and ws is not None:
                ax = _axis_for(w.shape, ws.size, 0 if op == "QLinearConv" else 1)
                add(ins[3], (), _dequantize(w, ws, arr(_input(node, 5)), ax), "qoperator")
                xs, b = arr(_input(node, 1)), arr(_input(node, 8))
                if b is not None and xs is not None and xs.size == 1:
                    add(ins[8], (), _dequantize(b, ws * xs.reshape(()), None, 0), "qoperator")
        elif op in ("QLinearMatMul", "QGemm"):
            qparams.update(n for i, n in enumerate(ins) if i in (1, 2, 4, 5, 6, 7, 8) and n and not
                           (op == "QGemm" and i == 6))
            for wi, si, zi in ((3, 4, 5), (0, 1, 2)):
                w, ws = arr(_input(node, wi)), arr(_input(node, si))
                if w is None or ws is None or w.dtype.kind == "f":
                    continue
                trans = _attr(node, "transB" if wi == 3 else "transA", 0) if op == "QGemm" else 0
                pref = (0 if trans else -1) if wi == 3 else (-1 if trans else 0)
                add(ins[wi], (), _dequantize(w, ws, arr(_input(node, zi)), _axis_for(w.shape, ws.size, pref)),
                    "qoperator")
            if op == "QGemm":
                a_s, b_s, c = arr(_input(node, 1)), arr(_input(node, 4)), arr(_input(node, 6))
                if c is not None and a_s is not None and b_s is not None and c.dtype.kind in "iu":
                    add(ins[6], (), _dequantize(c, b_s * a_s.reshape(()), None, 0), "qoperator")
        elif op in ("ConvInteger", "MatMulInteger"):
            qparams.update(n for n in ins[2:4] if n)
            w = arr(_input(node, 1))
            if w is None:
                continue
            found = _integer_scale(graph, node, ins[1], w)
            if found is not None:
                qparams.add(found[0])
                ws = found[1]
                pref = 0 if op == "ConvInteger" else -1
                add(ins[1], (), _dequantize(w, ws, arr(_input(node, 3)), _axis_for(w.shape, ws.size, pref)),
                    "integer")
        elif op == "DynamicQuantizeMatMul":
            qparams.update(n for n in ins[2:4] if n)
            w, ws = arr(_input(node, 1)), arr(_input(node, 2))
            if w is not None and ws is not None:
                add(ins[1], (), _dequantize(w, ws, arr(_input(node, 3)), _axis_for(w.shape, ws.size, -1)),
                    "integer")
        elif op == "DynamicQuantizeLinear":
            # a weight ORT did not see as constant (listed among an old opset's graph inputs) is quantised at run
            # time, uint8 over its range with 0 included: do the same here
            w = arr(ins[0])
            if w is not None and w.dtype.kind == "f" and w.ndim >= 1:
                add(ins[0], node.output[:1], _dynamic_uint8(np.asarray(w, np.float64)), "integer")
        elif op == "MatMulNBits":
            qparams.update(n for n in ins[2:5] if n)
            add(ins[1], (), _nbits(graph, node), "nbits")
    # float initializers that are not quantisation parameters stay as they are (biases of dynamic graphs,
    # weights of excluded nodes); 0-d constants and integer tensors (shapes, indices) are not weights
    for name, init in graph.inits.items():
        if name in tensors or name in qparams or init.data_type not in _FLOAT_TYPES or len(init.dims) == 0:
            continue
        value = graph.array(name)
        if value is not None and value.size > 0:
            tensors[name] = _Tensor(name, (), value.astype(np.float64), None, "float")
    return list(tensors.values()), qparams


def _dynamic_uint8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantise and dequantise like DynamicQuantizeLinear (uint8, range widened to include 0)."""
    low, high = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    scale = (high - low) / 255.0 if high > low else 1.0
    zp = float(np.clip(np.rint(-low / scale), 0, 255))
    q = np.clip(np.rint(w / scale) + zp, 0, 255)
    return (q - zp) * scale, np.full(w.shape, scale)


def _integer_scale(graph: _Graph, node: Any, wname: str, w: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Find the weight scale of a ConvInteger/MatMulInteger: ``<w>_scale``, or a Mul the integer output goes through."""
    base = _strip(wname)
    for cand in (base + "_scale", wname + "_scale"):
        value = graph.array(cand)
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
                others = [n for n in consumer.input if n != tensor]
                for other in others:
                    value = graph.array(other)
                    if value is not None and value.dtype.kind == "f" and value.size in channels:
                        return other, value
                    prod = graph.producer.get(other)
                    if prod is not None and prod.op_type == "Mul":
                        for leaf in prod.input:
                            value = graph.array(leaf)
                            if value is not None and value.dtype.kind == "f" and value.size in channels:
                                return leaf, value
        frontier = nxt
    return None


def _nbits(graph: _Graph, node: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Unpack a MatMulNBits weight (4- or 8-bit, stored [N, K] in blocks along K) to float64 [K, N]."""
    b, scales = graph.array(_input(node, 1)), graph.array(_input(node, 2))
    bits, block = _attr(node, "bits", 4), _attr(node, "block_size", 0)
    k, n = _attr(node, "K", 0), _attr(node, "N", 0)
    if b is None or scales is None or bits not in (4, 8) or block <= 0 or k <= 0 or n <= 0:
        return None
    blocks = -(-k // block)
    raw = np.asarray(b, np.uint8).reshape(n, -1)
    if bits == 4:
        flat = np.empty((n, raw.shape[1] * 2), np.float64)
        flat[:, 0::2], flat[:, 1::2] = raw & 0x0F, raw >> 4
    else:
        flat = raw.astype(np.float64)
    if flat.shape[1] < blocks * block:
        return None
    q = flat[:, : blocks * block].reshape(n, blocks, block)
    s = np.asarray(scales, np.float64).reshape(n, blocks, 1)
    zp_arr = graph.array(_input(node, 3))
    if zp_arr is None:
        z = np.full((n, blocks, 1), float(2 ** (bits - 1)))
    elif zp_arr.dtype.kind == "f":
        z = np.asarray(zp_arr, np.float64).reshape(n, blocks, 1)
    elif bits == 4:
        packed = np.asarray(zp_arr, np.uint8).reshape(n, -1)
        unpacked = np.empty((n, packed.shape[1] * 2), np.float64)
        unpacked[:, 0::2], unpacked[:, 1::2] = packed & 0x0F, packed >> 4
        z = unpacked[:, :blocks].reshape(n, blocks, 1)
    else:
        z = np.asarray(zp_arr, np.float64).reshape(n, blocks, 1)
    values = ((q - z) * s).reshape(n, blocks * block)[:, :k]
    step = np.broadcast_to(np.abs(s), (n, blocks, block)).reshape(n, blocks * block)[:, :k]
    return values.T, step.T  # the MatMul weight's own layout, [K, N]


_Refs = dict[str, list[tuple[np.ndarray, str]]]  # fp32 name -> (values, "" or what was folded into them)


def _read_fp32(model: onnx.ModelProto) -> _Refs:
    """Return the float tensors (1-D and up) of an fp32 graph, plus their values after ORT's Conv fusions.

    ``quant_pre_process`` folds a BatchNormalization or a constant Mul that follows a Conv into the Conv's weight and
    bias (``ConvBnFusion_W_<w>``, ``ConvBnFusion_BN_B_<beta>``): the folded values are computed here the same way,
    so a sidecar of the pre-processed graph is checked exactly, not just by correlation.
    """
    from onnx import numpy_helper

    arrays: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        if init.data_type in _FLOAT_TYPES and len(init.dims) > 0:
            arrays[init.name] = numpy_helper.to_array(init).astype(np.float64)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES and len(attr.t.dims) > 0:
                    arrays[node.output[0]] = numpy_helper.to_array(attr.t).astype(np.float64)
    refs: _Refs = {name: [(value, "")] for name, value in arrays.items()}
    producer = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        conv = producer.get(node.input[0]) if node.input else None
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


def _strip(name: str) -> str:
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


def _align(ref: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, str] | None:
    """Return the layout of ``ref`` that best follows ``values`` (by correlation on a sample), or None."""
    options = _alignments(ref, tuple(values.shape))
    if len(options) < 2:
        return options[0] if options else None
    probe = _sample(values)
    return max(options, key=lambda o: _finite(_corr(_sample(o[0]), probe)))


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


def _measure(int8: _Tensor, fp32_name: str | None, ref: np.ndarray | None, how: str) -> WeightMatch:
    shape = tuple(int(d) for d in int8.values.shape)
    if ref is None or fp32_name is None:
        return WeightMatch(int8.name, None, shape, int8.kind, "", math.nan, math.nan, math.nan)
    deq = int8.values
    err = ref - deq
    noise, signal = float(np.linalg.norm(err)), float(np.linalg.norm(ref))
    if noise == 0.0:
        sqnr, rel = math.inf, 0.0
    elif signal == 0.0:
        sqnr, rel = -math.inf, math.inf
    else:
        sqnr, rel = 20.0 * math.log10(signal / noise), noise / signal
    step_rms = off_grid = None
    if int8.step is not None:
        step = np.asarray(int8.step, np.float64)
        live = step > 0
        in_steps = np.abs(err[live]) / step[live]
        dead_off = int(np.count_nonzero(err[~live]))  # a zero scale can only reproduce zeros
        step_rms = float(np.sqrt(np.mean(in_steps**2))) if in_steps.size else 0.0
        # half a step, plus float32 slack: ORT divides by the scale in float32
        off = int(np.count_nonzero(in_steps > 0.5 + 1e-3)) + dead_off
        off_grid = off / err.size if err.size else 0.0
    return WeightMatch(int8.name, fp32_name, shape, int8.kind, how, sqnr, rel, _corr(ref, deq), step_rms, off_grid)


def _candidates(t: _Tensor) -> list[str]:
    names = [t.name, *t.aliases]
    stripped = [_strip(n) for n in names]
    unfused = [_FUSION_PREFIX.sub("", n) for n in stripped]
    return list(dict.fromkeys(names + stripped + unfused))


def _closest(t: _Tensor, options: Sequence[tuple[np.ndarray, str]]) -> tuple[np.ndarray, str] | None:
    """Return the (layout, how) of an fp32 tensor's options that is nearest to the int8 values."""
    best: tuple[float, np.ndarray, str] | None = None
    for values, label in options:
        for layout, suffix in _alignments(values, tuple(t.values.shape)):
            err = float(np.linalg.norm(layout - t.values))
            if best is None or err < best[0]:
                best = (err, layout, suffix + label)
    return None if best is None else (best[1], best[2])


def _match(tensors: Sequence[_Tensor], fp32: _Refs) -> list[WeightMatch]:
    """Pair int8 tensors with fp32 tensors: by name, then by value among unused same-sized tensors."""
    used: set[str] = set()
    found: dict[str, WeightMatch] = {}
    for t in tensors:
        for cand in _candidates(t):
            chosen = _closest(t, fp32[cand]) if cand in fp32 and cand not in used else None
            if chosen is not None:
                used.add(cand)
                found[t.name] = _measure(t, cand, chosen[0], "name" + chosen[1])
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
        if tname in found or fname in used or c < 0.5:
            continue
        chosen = _closest(by_name[tname], fp32[fname])
        if chosen is not None:
            used.add(fname)
            found[tname] = _measure(by_name[tname], fname, chosen[0], "value" + chosen[1])
    return [found.get(t.name) or _measure(t, None, None, "") for t in tensors]


def match_weights(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> tuple[WeightMatch, ...]:
    """Match every weight-like initializer of the int8 graph, dequantised to float64, with its fp32 origin."""
    tensors, _ = _read_int8(_Graph(int8))
    return tuple(_match(tensors, _read_fp32(fp32)))


# ------------------------------------------------------------------------------------------------- structure


def op_structure(model: onnx.ModelProto, quantised: bool) -> Counter[str]:
    """Return the op-type multiset of a graph, quantised ops mapped back to the float ops they replace."""
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        op: str | None = node.op_type
        if quantised and op in _FLOAT_OP:
            op = _FLOAT_OP[node.op_type]
        if op is not None:
            counts[op] += 1
    return counts


def _families(counts: Counter[str]) -> Counter[str]:
    fam: Counter[str] = Counter()
    for op, n in counts.items():
        if op in _COMPUTE_FAMILY:
            fam[_COMPUTE_FAMILY[op]] += n
    return fam


def _diff_text(a: Counter[str], b: Counter[str]) -> str:
    more = ", ".join(f"{op}×{n}" for op, n in sorted((b - a).items()))
    fewer = ", ".join(f"{op}×{n}" for op, n in sorted((a - b).items()))
    return "; ".join(x for x in (f"int8 adds {more}" if more else "", f"int8 drops {fewer}" if fewer else "") if x)


def _structure(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> tuple[str, list[str]]:
    """Compare compute-op counts and graph inputs/outputs; return (summary, reasons)."""
    f_ops, q_ops = op_structure(fp32, False), op_structure(int8, True)
    f_fam, q_fam = _families(f_ops), _families(q_ops)
    reasons: list[str] = []
    fams = sorted(set(f_fam) | set(q_fam))
    summary = ", ".join(f"{k} {f_fam[k]}/{q_fam[k]}" for k in fams) or "no compute ops"
    bad = [k for k in fams if f_fam[k] != q_fam[k]]
    if bad:
        reasons.append("different graph: compute ops fp32/int8 " + ", ".join(f"{k} {f_fam[k]}/{q_fam[k]}" for k in bad)
                       + " (another architecture)")
    other = _diff_text(f_ops, q_ops)
    if other:
        summary += f" (other ops: {other})"
    f_init = {i.name for i in fp32.graph.initializer}
    q_init = {i.name for i in int8.graph.initializer}
    f_in = [i.name for i in fp32.graph.input if i.name not in f_init]
    q_in = [i.name for i in int8.graph.input if i.name not in q_init]
    f_out, q_out = [o.name for o in fp32.graph.output], [o.name for o in int8.graph.output]
    if f_in != q_in:
        reasons.append(f"different graph inputs: fp32 {f_in} vs int8 {q_in}")
    if f_out != q_out:
        reasons.append(f"different graph outputs: fp32 {f_out} vs int8 {q_out}")
    return summary, reasons


# ------------------------------------------------------------------------------------------------- verdict


def _db(value: float) -> str:
    return f"{value:.1f} dB" if math.isfinite(value) else ("inf" if value > 0 else str(value))


def _shape(m: WeightMatch) -> str:
    return "[" + "x".join(map(str, m.shape)) + "]"


def _worst(items: Sequence[WeightMatch], key: Any, limit: int = 3) -> str:
    chosen = sorted(items, key=key)[:limit]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(f"{m.int8_name!r} {_shape(m)}" for m in chosen) + more


def _judge(matches: Sequence[WeightMatch], mode: str, limits: LineageThresholds) -> list[str]:
    reasons: list[str] = []
    weights = [m for m in matches if m.is_weight]
    if not weights:
        return reasons
    orphans = [m for m in weights if m.fp32_name is None]
    if len(weights) - len(orphans) < limits.min_matched * len(weights):
        reasons.append(f"different model: {len(orphans)} of {len(weights)} quantised weights have no fp32 tensor "
                       f"of their name or shape and values: {_worst(orphans, lambda m: m.int8_name)}")
    matched = [m for m in weights if m.fp32_name is not None]
    # NaN: a constant fp32 tensor (all zeros, one value) has no correlation; the step checks below still apply
    unlike = [m for m in matched if m.correlation < limits.different_corr]
    if unlike:
        worst = min(unlike, key=lambda m: m.correlation)
        reasons.append(f"different model (or another training run): {len(unlike)} of {len(matched)} quantised weights "
                       f"do not follow their fp32 values (correlation below {limits.different_corr}; worst "
                       f"{worst.int8_name!r} vs "
                       f"{worst.fp32_name!r}: {worst.correlation:.3f}, SQNR {_db(worst.sqnr_db)}): "
                       f"{_worst(unlike, lambda m: m.correlation)}")
        return reasons
    if limits.max_off_grid is not None:
        # and more than one element: a single clipped extreme of a tiny weight is not drift
        off = [m for m in matched if m.off_grid is not None and m.off_grid > limits.max_off_grid
               and m.off_grid * math.prod(m.shape) > 1.5]
        if off:
            worst = max(off, key=lambda m: m.off_grid or 0.0)
            reasons.append(f"the weights are not this fp32's weights rounded to the int8 grid (an older or retrained "
                           f"fp32, or edited weights): in {len(off)} of {len(matched)} quantised weights more than "
                           f"{limits.max_off_grid:.0%} of elements are over half a quantisation step from the fp32 "
                           f"value "
                           f"(rounding keeps every one within it); worst "
                           f"{worst.int8_name!r}: {worst.off_grid:.1%} off, error {worst.step_rms:.2f} steps RMS")
            return reasons
    far = [m for m in matched if m.step_rms is not None and m.step_rms > limits.max_step_rms]
    if far:
        worst = max(far, key=lambda m: m.step_rms or 0.0)
        reasons.append(f"the weights moved from this fp32 by more than {mode} quantisation explains (an older or "
                       f"retrained fp32, or edited weights): {len(far)} of {len(matched)} quantised weights are over "
                       f"{limits.max_step_rms} steps "
                       f"RMS from the fp32 value; worst {worst.int8_name!r}: {worst.step_rms:.2f} steps, SQNR "
                       f"{_db(worst.sqnr_db)}")
    return reasons


def _load(path: Path, role: str) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ModelFileError(f"{path}: {role} model is not a readable ONNX model ({type(exc).__name__}: {exc})") \
            from None


def _provenance(fp32_sha: str, int8_sha: str, int8_path: Path) -> tuple[str, str | None]:
    """Read the producer's provenance of the sidecar: (what it says, a refusal reason or None)."""
    from .producers.provenance import read_provenance

    record = read_provenance(int8_path)
    if record is None:
        return "none", None
    name = str(record.get("provenance_source", "provenance"))
    if not isinstance(record.get("fp32_sha256"), str):
        return f"{name} records no fp32 hash", None
    if record.get("int8_sha256") != int8_sha:
        # the sidecar changed since it was hashed: the record describes another file, so it proves nothing
        return f"{name} describes another sidecar (int8 sha256 differs)", None
    if record["fp32_sha256"] != fp32_sha:
        return f"{name} records another fp32", (
            f"stale sidecar: its provenance ({name}) says it was built from an fp32 with sha256 "
            f"{record['fp32_sha256'][:12]}…, the fp32 model is now {fp32_sha[:12]}… (retrained since?); "
            "rebuild the sidecar")
    return f"{name} names this fp32", None


def check_lineage(fp32_path: Path, int8_path: Path, mode: str, *, thresholds: LineageThresholds | None = None,
                  fp32_sha256: str | None = None, int8_sha256: str | None = None) -> LineageReport:
    """Decide whether the int8 sidecar was quantised from this fp32 model; name what does not match.

    ``thresholds`` replaces ``THRESHOLDS[mode]``; pass the files' sha256 when already known to skip hashing.
    Raises ModelFileError for an unreadable file and ValueError for a mode other than dynamic/static/qat.
    """
    if mode not in _MODES:
        raise ValueError(f"lineage is checked for quant modes {', '.join(_MODES)}, not {mode!r}")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    fp32, int8 = _load(fp32_path, "fp32"), _load(int8_path, "int8")
    fp32_sha = fp32_sha256 or sha256_file(fp32_path)
    int8_sha = int8_sha256 or sha256_file(int8_path)
    structure, reasons = _structure(fp32, int8)
    provenance, stale = _provenance(fp32_sha, int8_sha, int8_path)
    structure += f"; provenance: {provenance}"
    matches = match_weights(fp32, int8)
    quantised = [m for m in matches if m.quantised]
    if not quantised:
        what = "is the fp32 file itself (same bytes)" if fp32_sha == int8_sha else "holds no quantised tensor"
        reasons.insert(0, f"not a quantised sidecar: {int8_path.name} {what}; no DequantizeLinear, QLinear*, "
                          f"*Integer or MatMulNBits weight was found")
    else:
        reasons += _judge(matches, mode, thresholds or THRESHOLDS[mode])
    if stale is not None:
        reasons.append(stale)
    weights = [m for m in matches if m.is_weight and m.fp32_name is not None]
    sqnrs = [m.sqnr_db for m in weights]
    return LineageReport(
        ok=not reasons,
        reasons=tuple(reasons),
        mode=mode,
        weights_matched=sum(1 for m in matches if m.is_weight and m.fp32_name is not None),
        weights_total=sum(1 for m in matches if m.is_weight),
        min_sqnr_db=min(sqnrs) if sqnrs else math.nan,
        median_sqnr_db=statistics.median(sqnrs) if sqnrs else math.nan,
        max_step_rms=max((m.step_rms for m in weights if m.step_rms is not None), default=math.nan),
        max_off_grid=max((m.off_grid for m in weights if m.off_grid is not None), default=math.nan),
        min_correlation=min((m.correlation for m in weights if math.isfinite(m.correlation)), default=math.nan),
        structure=structure,
        matches=matches,
    )
