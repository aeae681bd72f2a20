"""Where an int8 sidecar loses accuracy: per-tensor SQNR of weights and activations, fp32 vs int8.

Use it after a gate failure to find the tensors worth excluding. ``diagnose`` copies both models into a
temporary folder (ORT's helpers write ``-inferred`` files beside the model they read), runs them on a few soak
feeds and ranks tensors by the quantisation noise they add (SQNR in dB, 20·log10(‖x‖/‖x − x̂‖); lower is worse).

* QDQ sidecars (static PTQ, QAT): ``onnxruntime.quantization.qdq_loss_debug`` matches every weight with its
  dequantised value and every activation before/after its QuantizeLinear→DequantizeLinear pair and with the fp32
  model's tensor of the same name.
* Dynamic sidecars (MatMulInteger/ConvInteger with DynamicQuantizeLinear): weights are dequantised here from
  ``<w>_quantized``/``<w>_scale``/``<w>_zero_point``; activations are quantised at run time, per batch, so their
  local error is simulated from the DynamicQuantizeLinear formula and there is no calibrated range to fix.
* Anything else (QOperator graphs, renamed tensors): per-output comparison, plus whatever weights match by name.

``diagnose`` never raises: what could not be analysed is said in ``Diagnosis.notes``.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .ort import import_onnxruntime

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"})
QOPERATOR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QAttention"})

# a weight with more than this share of elements off by over one int8 step was not just rounded
CHANGED_SHARE = 0.01


def sqnr_db(reference: np.ndarray | Sequence[np.ndarray], test: np.ndarray | Sequence[np.ndarray]) -> float:
    """Return 20·log10(‖ref‖/‖ref − test‖) in dB, in float64 (inf when identical, -inf for non-finite test)."""
    ref = _flat(reference)
    out = _flat(test)
    if ref.size != out.size:
        raise ValueError(f"cannot compare {ref.size} values with {out.size}")
    if not np.isfinite(out).all():
        return float("-inf")
    noise = float(np.linalg.norm(ref - out))
    signal = float(np.linalg.norm(ref))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 20.0 * math.log10(signal / noise)


def _flat(values: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype(np.float64).ravel()
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values]) if len(values) else np.zeros(0)


@dataclass(frozen=True)
class TensorError:
    """The quantisation error of one tensor.

    ``sqnr_db`` is the local error (fp32 weight vs its dequantised int8 value; an activation before vs after its
    Q/DQ pair), ``xmodel_db`` the accumulated one (fp32 model tensor vs int8 model tensor of the same name).
    ``exclude`` lists the fp32 node names whose exclusion keeps this tensor in float.
    """

    kind: str  # "weight" | "activation" | "output"
    tensor: str
    node: str | None
    sqnr_db: float | None
    xmodel_db: float | None = None
    exclude: tuple[str, ...] = ()

    @property
    def rank_key(self) -> float:
        """Return the SQNR this tensor is ranked by (local when known, else accumulated)."""
        value = self.sqnr_db if self.sqnr_db is not None else self.xmodel_db
        return float("inf") if value is None or math.isnan(value) else value


@dataclass(frozen=True)
class Diagnosis:
    """Ranked per-tensor errors of one int8 sidecar against its fp32 original, and what to try."""

    fp32_path: str
    int8_path: str
    format: str  # "qdq" | "dynamic" | "qoperator" | "unknown"
    feeds: int
    worst: tuple[TensorError, ...] = ()
    outputs: tuple[TensorError, ...] = ()
    analysed: tuple[str, ...] = ()  # what was compared: "weights", "activations", "outputs"
    suggestion: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def lines(self) -> list[str]:
        """Return the failure-message block: a fixed-width table of the worst tensors and a suggestion line."""
        head = f"Diagnosis ({self.format} sidecar, {self.feeds} feed(s); SQNR in dB, lower is worse):"
        out = [head]
        rows = [("kind", "tensor", "node", "local dB", "vs fp32 dB")]
        for t in (*self.worst, *self.outputs):
            rows.append((t.kind, _clip(t.tensor), _clip(t.node or "-"), _db(t.sqnr_db), _db(t.xmodel_db)))
        if len(rows) > 1:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for i, r in enumerate(rows):
                cells = [c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))]
                out.append("    " + "  ".join(cells).rstrip())
                if i == 0:
                    out.append("    " + "  ".join("-" * w for w in widths))
        else:
            out.append("    (no tensor could be compared)")
        if self.suggestion:
            out.append(f"  Suggestion: {self.suggestion}")
        out += [f"  note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (infinities become the strings "inf"/"-inf")."""
        raw = asdict(self)
        data: dict[str, Any] = _jsonable(raw)
        return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.1f}"


def _clip(text: str, width: int = 48) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


class _Reader:
    """A CalibrationDataReader over a list of feed dicts (the protocol qdq_loss_debug iterates)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._feeds):
            return None
        self._index += 1
        return dict(self._feeds[self._index - 1])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (item := self.get_next()) is not None:
            yield item


def _graph_format(model: Any) -> str:
    ops = {n.op_type for n in model.graph.node}
    if ops & QOPERATOR_OPS:
        return "qoperator"
    if ops & DYNAMIC_OPS:
        return "dynamic"
    if ops & QDQ_OPS:
        return "qdq"
    return "unknown"


def _copy_model(src: Path, dst: Path) -> Any:
    """Load ``src`` with its external data and save it self-contained as ``dst``; return the ModelProto."""
    import onnx

    model = onnx.load(str(src))
    big = model.ByteSize() > 1_800_000_000
    onnx.save(model, str(dst), save_as_external_data=big, location=dst.name + ".data" if big else None)
    return model


class _Graph:
    """Producer/consumer look-ups of one graph."""

    def __init__(self, model: Any) -> None:
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in model.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.inputs = {i.name for i in model.graph.input}
        self.initializers = {i.name: i for i in model.graph.initializer}

    def keep_float(self, tensor: str) -> tuple[str, ...]:
        """Return the node names that quantise ``tensor`` (producer and consumers): excluding all keeps it float."""
        names: list[str] = []
        prod = self.producer.get(tensor)
        if prod is not None and prod.name:
            names.append(prod.name)
        names += [c.name for c in self.consumers.get(tensor, []) if c.name]
        return tuple(dict.fromkeys(names))


def _session(path: Path, optimised: bool) -> Any:
    ort = import_onnxruntime()

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if not optimised:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _model_feeds(session: Any, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if any(n not in f for f in feeds)]
    if missing:
        raise ValueError(f"the feeds lack model input(s) {missing}")
    return [{n: np.asarray(f[n]) for n in names} for f in feeds]


def _outputs(fp32: Path, int8: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[TensorError]:
    ref_s, test_s = _session(fp32, True), _session(int8, True)
    names = [o.name for o in ref_s.get_outputs()]
    mine = _model_feeds(ref_s, feeds)
    ref = [ref_s.run(names, f) for f in mine]
    test = [test_s.run(names, f) for f in mine]
    return [TensorError("output", n, None, None, sqnr_db([r[i] for r in ref], [t[i] for t in test]))
            for i, n in enumerate(names)]


def _collect(path: Path, aug: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    modify_model_output_intermediate_tensors(str(path), str(aug))
    session = _session(path, True)
    collected: dict[str, list[np.ndarray]] = collect_activations(str(aug), _Reader(_model_feeds(session, feeds)))
    return collected


def _qdq_weights(fp32: Path, int8: Path, fgraph: _Graph, qgraph: _Graph) -> list[_Weight]:
    from onnxruntime.quantization.qdq_loss_debug import compute_weight_error, create_weight_matching

    matched = create_weight_matching(str(fp32), str(int8))
    # ORT's helper subtracts the zero point in the stored integer type (wraps for uint8 or a non-zero zero point):
    # redo the arithmetic in float64 from the same initializers, and keep the scale for the rounding check
    lsb: dict[str, np.ndarray | None] = {}
    for name, match in matched.items():
        redo = _dequantize_by_dq(name, qgraph)
        lsb[name] = None
        if redo is not None and redo[0].shape == np.shape(match["dequantized"]):
            match["dequantized"], lsb[name] = redo
    errors = compute_weight_error(matched, err_func=sqnr_db)
    return [_weight(name, value, matched[name]["float"], matched[name]["dequantized"], lsb[name], fgraph, qgraph)
            for name, value in errors.items()]


@dataclass(frozen=True)
class _Weight:
    error: TensorError
    lsb_excess: float | None  # share of elements off by more than one quantisation step (rounding gives 0)


def _weight(name: str, value: float, ref: np.ndarray, deq: np.ndarray, step: np.ndarray | None, fgraph: _Graph,
            qgraph: _Graph) -> _Weight:
    consumers = _weight_consumers(name, fgraph) or _weight_consumers(name, qgraph)
    excess = None
    if step is not None:
        diff = np.abs(np.asarray(ref, np.float64) - np.asarray(deq, np.float64))
        excess = float(np.mean(diff > np.broadcast_to(step, diff.shape) * 1.01))
    return _Weight(TensorError("weight", name, consumers[0] if consumers else None, value, None, tuple(consumers)),
                   excess)


def _dequantize_by_dq(name: str, graph: _Graph) -> tuple[np.ndarray, np.ndarray] | None:
    from onnx import numpy_helper

    for node in graph.consumers.get(name + "_quantized", []):
        if node.op_type != "DequantizeLinear":
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        try:
            q = numpy_helper.to_array(graph.initializers[node.input[0]]).astype(np.float64)
            scale = numpy_helper.to_array(graph.initializers[node.input[1]]).astype(np.float64)
            zp = (numpy_helper.to_array(graph.initializers[node.input[2]]).astype(np.float64)
                  if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
        except KeyError:
            return None
        return _dequantize(q, scale, zp, axis)
    return None


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (dequantised values, the quantisation step broadcast to their shape)."""
    if scale.size == 1:
        step = np.full(q.shape, float(scale.reshape(())))
        return (q - zp.reshape(())) * scale.reshape(()), step
    shape = [1] * q.ndim
    shape[axis % q.ndim] = scale.size
    return (q - zp.reshape(shape)) * scale.reshape(shape), np.broadcast_to(scale.reshape(shape), q.shape)


def _weight_consumers(name: str, graph: _Graph) -> list[str]:
    """Return the compute nodes that read weight ``name`` (through its DequantizeLinear, if any)."""
    names: list[str] = []
    for tensor in (name, name + "_DequantizeLinear_Output", name + "_quantized"):
        for node in graph.consumers.get(tensor, []):
            if node.op_type == "DequantizeLinear":
                for out in node.output:
                    names += [c.name for c in graph.consumers.get(out, []) if c.name]
            elif node.name and node.op_type not in QDQ_OPS:
                names.append(node.name)
    return list(dict.fromkeys(names))


def _fused_relu_floor(name: str, qgraph: _Graph) -> float | None:
    """Return 0.0 when the QuantizeLinear of activation ``name`` has its zero point at the type's minimum."""
    from onnx import numpy_helper

    for tensor in (name, name + "_QuantizeLinear_Input"):
        for node in qgraph.consumers.get(tensor, []):
            if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[2] not in qgraph.initializers:
                continue
            zp = numpy_helper.to_array(qgraph.initializers[node.input[2]])
            if zp.dtype.kind in "iu" and zp.size and np.all(zp == np.iinfo(zp.dtype).min):
                return 0.0
            return None
    return None


def _qdq_activations(fp32: Path, int8: Path, feeds: Sequence[Mapping[str, np.ndarray]], tmp: Path,
                     fgraph: _Graph, qgraph: _Graph) -> tuple[list[TensorError], list[str]]:
    from onnxruntime.quantization.qdq_loss_debug import compute_activation_error, create_activation_matching

    notes: list[str] = []
    float_acts = _collect(fp32, tmp / "fp32.aug.onnx", feeds)
    qdq_acts = _collect(int8, tmp / "int8.aug.onnx", feeds)
    matching = create_activation_matching(qdq_acts, float_acts)
    # compute_activation_error reads match["float"] and raises KeyError without it: keep the local error of
    # unmatched tensors, computed here, and hand the library only the matched ones
    for name, match in matching.items():
        low = _fused_relu_floor(name, qgraph)
        if low is not None:
            # ORT drops a Relu before a Q/DQ whose range starts at 0: the clamp is the Relu, not quantisation noise
            match["pre_qdq"] = [np.maximum(np.asarray(v), low) for v in match["pre_qdq"]]
    with_float = {k: v for k, v in matching.items() if "float" in v}
    errors = compute_activation_error(with_float, err_func=sqnr_db)
    out = []
    for name, match in matching.items():
        if name in errors:
            local, cross = errors[name].get("qdq_err"), errors[name].get("xmodel_err")
        else:
            local, cross = sqnr_db(match["pre_qdq"], match["post_qdq"]), None
        exclude = fgraph.keep_float(name)
        node = fgraph.producer[name].name if name in fgraph.producer else (exclude[0] if exclude else None)
        out.append(TensorError("activation", name, node, local, cross, exclude))
    unmatched = sorted(set(matching) - set(with_float))
    if unmatched:
        notes.append(f"{len(unmatched)} quantised activation(s) have no fp32 tensor of the same name "
                     f"(e.g. {unmatched[0]!r}): only their local Q/DQ error is shown")
    if not matching:
        notes.append("no QuantizeLinear/DequantizeLinear activation pair follows ORT's naming "
                     "(<t>_QuantizeLinear_Input / <t>_DequantizeLinear_Output): activations were not compared")
    return out, notes


def _named_weights(fp32_model: Any, fgraph: _Graph, qgraph: _Graph) -> list[_Weight]:
    """Dequantise ``<w>_quantized`` with ``<w>_scale``/``<w>_zero_point`` (dynamic and QOperator naming)."""
    from onnx import numpy_helper

    out = []
    for init in fp32_model.graph.initializer:
        name = init.name
        q_init = qgraph.initializers.get(name + "_quantized")
        s_init = qgraph.initializers.get(name + "_scale")
        if q_init is None or s_init is None:
            continue
        ref = numpy_helper.to_array(init).astype(np.float64)
        q = numpy_helper.to_array(q_init).astype(np.float64)
        scale = numpy_helper.to_array(s_init).astype(np.float64)
        z_init = qgraph.initializers.get(name + "_zero_point")
        zp = numpy_helper.to_array(z_init).astype(np.float64) if z_init is not None else np.zeros_like(scale)
        ops = {n.op_type for n in qgraph.consumers.get(name + "_quantized", [])}
        axis = q.ndim - 1 if ops & {"MatMulInteger", "QLinearMatMul", "MatMul"} else 0
        if scale.size > 1 and q.shape[axis] != scale.size:
            axes = [a for a, d in enumerate(q.shape) if d == scale.size]
            if not axes:
                continue
            axis = axes[0]
        deq, step = _dequantize(q, scale, zp, axis)
        if deq.shape != ref.shape:
            continue
        out.append(_weight(name, sqnr_db(ref, deq), ref, deq, step, fgraph, qgraph))
    return out


def _dynamic_activations(fp32: Path, int8: Path, feeds: Sequence[Mapping[str, np.ndarray]], tmp: Path,
                         fgraph: _Graph, qgraph: _Graph) -> list[TensorError]:
    """Simulate each DynamicQuantizeLinear on its collected input; compare same-named float tensors across models."""
    float_acts = _collect(fp32, tmp / "fp32.aug.onnx", feeds)
    int8_acts = _collect(int8, tmp / "int8.aug.onnx", feeds)
    out = []
    seen: set[str] = set()
    for name, values in int8_acts.items():
        consumers = qgraph.consumers.get(name, [])
        if not any(c.op_type == "DynamicQuantizeLinear" for c in consumers) or name in seen:
            continue
        seen.add(name)
        local = sqnr_db(values, [_dynamic_qdq(v) for v in values])
        cross = sqnr_db(float_acts[name], values) if name in float_acts and _same_sizes(float_acts[name], values) \
            else None
        exclude = fgraph.keep_float(name)
        node = fgraph.producer[name].name if name in fgraph.producer else (exclude[0] if exclude else None)
        out.append(TensorError("activation", name, node, local, cross, exclude))
    return out


def _same_sizes(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.size(x) == np.size(y) for x, y in zip(a, b))


def _dynamic_qdq(x: np.ndarray) -> np.ndarray:
    """Quantise and dequantise like ONNX DynamicQuantizeLinear (uint8, range always holding 0)."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255.0)
    if scale == 0:
        return x.astype(np.float64)
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    q = np.clip(np.rint(x / scale) + zp, 0, 255)
    return np.asarray((q - zp).astype(np.float64) * float(scale))


def _suggest(fmt: str, worst: Sequence[TensorError], outputs: Sequence[TensorError], weights_per_tensor: bool) -> str:
    if not worst:
        if fmt == "qoperator":
            return ("QOperator sidecars cannot be compared tensor by tensor; rebuild as QDQ (quant_format=QDQ) to "
                    "diagnose, or move the entry to a stronger mode")
        return "no per-tensor data: compare the outputs above and rebuild the sidecar"
    first = worst[0]
    exclude = ", ".join(repr(n) for n in first.exclude) or repr(first.node)
    db = _db(first.rank_key)
    if fmt == "dynamic":
        if first.kind == "weight":
            return (f"weight {first.tensor!r} ({db} dB) loses most; dynamic mode quantises weights per tensor: try "
                    f"ptq-static with per_channel, or --nodes-to-exclude {exclude}")
        return (f"activation {first.tensor!r} ({db} dB) loses most to run-time quantisation; exclude its consumer "
                f"({exclude}) or move the entry to static (calibrated ranges) or qat mode")
    if first.kind == "weight":
        extra = " or enable per_channel" if weights_per_tensor else ""
        return (f"weight {first.tensor!r} ({db} dB) is the noisiest tensor: --nodes-to-exclude {exclude}{extra}; "
                f"if many weights are low, move to qat mode")
    return (f"activation {first.tensor!r} ({db} dB) is the noisiest tensor: --nodes-to-exclude {exclude} "
            f"(its producer and consumers in the fp32 graph), or recalibrate with --calibrate-method "
            f"percentile/entropy; "
            f"if the loss is spread over many tensors, move to qat mode")


def diagnose(fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]], *, top: int = 5) -> Diagnosis:
    """Compare an int8 sidecar with its fp32 original on ``feeds`` and rank the noisiest tensors.

    ``feeds`` are ORT feed dicts (a few soak batches; every intermediate tensor of every feed is held in memory).
    Nothing is written beside the models. Never raises: failures become ``Diagnosis.notes``.
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    notes: list[str] = []
    fmt = "unknown"
    analysed: list[str] = []
    tensors: list[TensorError] = []
    weights: list[_Weight] = []
    outputs: list[TensorError] = []
    per_tensor_weights = False
    try:
        tmp_ctx = tempfile.TemporaryDirectory(prefix="quantgate-diagnose-")
    except OSError as exc:
        return Diagnosis(str(fp32_path), str(int8_path), fmt, len(feeds),
                         notes=(f"no temporary folder: {exc}",), suggestion="")
    with tmp_ctx as tmp_name:
        tmp = Path(tmp_name)
        fp32, int8 = tmp / "fp32.onnx", tmp / "int8.onnx"
        try:
            fp32_model = _copy_model(fp32_path, fp32)
            int8_model = _copy_model(int8_path, int8)
        except Exception as exc:  # unreadable models: nothing else can run
            return Diagnosis(str(fp32_path), str(int8_path), fmt, len(feeds), notes=(
                f"could not load the models: {type(exc).__name__}: {exc}",))
        fmt = _graph_format(int8_model)
        fgraph, qgraph = _Graph(fp32_model), _Graph(int8_model)
        if not feeds:
            notes.append("no feeds given: activations and outputs were not compared")

        def attempt(what: str, fn: Any) -> Any:
            try:
                result = fn()
            except Exception as exc:  # any ORT/onnx failure on an odd graph is reported, not raised
                notes.append(f"{what} not analysed: {type(exc).__name__}: {str(exc)[:300]}")
                return None
            analysed.append(what)
            return result

        if feeds:
            outputs = attempt("outputs", lambda: _outputs(fp32, int8, feeds)) or []
        if fmt == "qdq":
            weights += attempt("weights", lambda: _qdq_weights(fp32, int8, fgraph, qgraph)) or []
            per_tensor_weights = any(
                n.op_type == "DequantizeLinear" and n.input[1] in qgraph.initializers
                and len(qgraph.initializers[n.input[1]].dims) == 0 and n.input[0].endswith("_quantized")
                and n.input[0][: -len("_quantized")] in fgraph.initializers
                and len(fgraph.initializers[n.input[0][: -len("_quantized")]].dims) > 1
                for n in int8_model.graph.node)
            if feeds:
                found = attempt("activations", lambda: _qdq_activations(fp32, int8, feeds, tmp, fgraph, qgraph))
                if found is not None:
                    acts, more = found
                    tensors += acts
                    notes += more
        elif fmt == "dynamic":
            weights += attempt("weights", lambda: _named_weights(fp32_model, fgraph, qgraph)) or []
            per_tensor_weights = True
            if feeds:
                tensors += attempt("activations", lambda: _dynamic_activations(
                    fp32, int8, feeds, tmp, fgraph, qgraph)) or []
            notes.append("dynamic sidecar: activation ranges are computed per batch at run time, so there are no "
                         "calibrated scales to inspect or fix; activation 'local dB' is simulated from the "
                         "DynamicQuantizeLinear formula on the collected fp32-path inputs")
        elif fmt == "qoperator":
            weights += attempt("weights", lambda: _named_weights(fp32_model, fgraph, qgraph)) or []
            notes.append("QOperator sidecar (QLinearConv/QLinearMatMul...): intermediate int8 tensors have no float "
                         "twin, so activations cannot be compared; only weights and outputs are")
        else:
            notes.append("the int8 graph has no QuantizeLinear/DequantizeLinear, dynamic or QOperator nodes: "
                         "only outputs were compared")
        if "weights" in analysed and not weights:
            notes.append("no int8 weight matched an fp32 initializer by name (<w>_quantized): weights not compared")
    changed = [w.error for w in weights if w.lsb_excess is not None and w.lsb_excess > CHANGED_SHARE]
    tensors += [w.error for w in weights if w.lsb_excess is None or w.lsb_excess <= CHANGED_SHARE]
    if changed:
        names = ", ".join(repr(t.tensor) for t in changed[:4]) + (" ..." if len(changed) > 4 else "")
        notes.append(f"{len(changed)} of {len(weights)} weight(s) differ from the fp32 original by more than one "
                     f"int8 step ({names}): the sidecar was trained (QAT) or built from another fp32 model; their "
                     f"SQNR measures that change, not rounding, so they are not ranked")

    ranked = sorted(tensors, key=lambda t: (t.rank_key, t.kind, t.tensor))
    worst = tuple(ranked[: max(0, top)])
    suggestion = _suggest(fmt, worst, outputs, per_tensor_weights)
    return Diagnosis(str(fp32_path), str(int8_path), fmt, len(feeds), worst, tuple(outputs), tuple(analysed),
                     suggestion, tuple(notes))


def feeds_from_fixture(inputs: Mapping[str, np.ndarray], batched: bool, count: int = 4, batch: int = 16
                       ) -> list[dict[str, np.ndarray]]:
    """Return up to ``count`` feed dicts from fixture arrays (a ``Fixture.inputs`` and ``FeedPlan.batched``)."""
    samples = int(next(iter(inputs.values())).shape[0])
    if batched:
        starts = range(0, samples, batch)
        return [{k: v[s:s + batch] for k, v in inputs.items()} for s in list(starts)[:count]]
    return [{k: v[i] for k, v in inputs.items()} for i in range(min(count, samples))]

