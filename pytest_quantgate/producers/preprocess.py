"""The pre-processing stage every PTQ producer runs before ORT's quantiser sees a model.

Exports from other tool chains (Paddle2ONNX, old tf2onnx, hand-edited graphs) trip the quantisers in ways that
have nothing to do with the weights: Conv weights held in ``Constant`` nodes ("Expected conv2d_157.w_0 to be an
initializer"), literal ``-1`` input dims (static calibration collects nothing), opset-11 graphs that per-channel
QDQ writes invalid. :func:`prepare_for_quantisation` repairs a copy, in this order:

1. ``constants_to_initializers``: main-graph ``Constant`` nodes holding a tensor become initializers (ORT does the
   same when it loads a graph, so the model computes the same thing; the quantisers only see initializers);
2. ``symbolic_dims``: literal dims <= 0 on graph inputs and outputs become named symbolic dims;
3. ``drop_initializer_value_info``: ``value_info`` entries that duplicate initializer names are removed;
4. ``opset_upgrade``: graphs below opset 13 are converted to ``target_opset`` when per-channel or QDQ is asked for;
5. the working copy is saved and ORT must load it;
6. ``quant_pre_process`` (symbolic shape inference, graph optimisation, ONNX shape inference), retried without
   symbolic shape inference, run without optimisation when the optimiser removed a node the user excluded, and
   skipped (recorded) when it fails entirely.

Every step goes into the provenance record. Steps 1 and 2 are recorded only when they changed something, so a
model that needs no repair gets the same record, and the same sidecar bytes, as before the stage existed.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_quantgate.producers.base import ProducerError
from pytest_quantgate.producers.ptq_common import (
    PER_CHANNEL_MIN_OPSET,
    check_ort_loads,
    one_line,
    save_model,
)

if TYPE_CHECKING:
    import onnx

__all__ = [
    "constants_to_initializers",
    "drop_initializer_value_info",
    "model_opset",
    "prepare_for_quantisation",
    "run_quant_pre_process",
    "symbolic_dims",
    "upgrade_opset",
]

_log = logging.getLogger(__name__)

_SYM_TEMP = "sym_shape_infer_temp.onnx"  # written into the CWD by ORT's symbolic shape inference on failure
_DIM_PREFIX = "qg_dim"  # names given to literal -1 dims; a prefix no exporter uses, so no accidental sharing


def prepare_for_quantisation(fp32_path: Path, model: onnx.ModelProto, work: Path, *, per_channel: bool,
                             need_qdq: bool, target_opset: int, pre_process: bool,
                             pre_process_skipped: str = "preprocess=False",
                             keep_nodes: Sequence[str] = ()) -> tuple[Path, list[dict[str, Any]]]:
    """Repair ``model`` in place, write it to ``work`` and pre-process it; return the model to quantise and the steps.

    ``per_channel`` / ``need_qdq``: the quantiser will write per-channel scales / QuantizeLinear-DequantizeLinear
    pairs, which need opset >= 13 (an older graph is converted to ``target_opset``). ``pre_process``: run ORT's
    ``quant_pre_process``; when False the step is recorded as skipped with ``pre_process_skipped`` as the reason.
    ``keep_nodes``: node names that must survive pre-processing (the user's exclusions). The user's fp32 file is
    never written; everything lands in ``work``.
    """
    steps: list[dict[str, Any]] = []
    for repair in (constants_to_initializers, symbolic_dims):
        step = repair(model)
        if step["status"] != "nothing_to_do":  # a no-op leaves the record (and a pinned sidecar) as it was
            steps.append(step)
    steps.append(drop_initializer_value_info(model))
    if per_channel or need_qdq:
        steps.append(upgrade_opset(fp32_path, model, target_opset, per_channel=per_channel))
    source = work / "fp32.onnx"
    save_model(fp32_path, model, source)
    check_ort_loads(fp32_path, source, "load fp32")
    if not pre_process:
        steps.append({"step": "quant_pre_process", "status": "skipped", "reason": pre_process_skipped})
        return source, steps
    prepared, step = run_quant_pre_process(fp32_path, source, work, tuple(keep_nodes))
    steps.append(step)
    return prepared, steps


# --------------------------------------------------------------------------------------------------------------
# In-memory graph repairs (each returns its provenance step)


def constants_to_initializers(model: onnx.ModelProto) -> dict[str, Any]:
    """Turn main-graph ``Constant`` nodes holding a tensor into initializers, in place; return the provenance step.

    ORT's quantisers quantise only weights stored as initializers: a Paddle export keeps every Conv weight in a
    Constant node, so dynamic mode crashes ("Expected conv2d_157.w_0 to be an initializer") and static mode
    leaves the convolutions in float. Constants that are graph outputs stay nodes (an initializer cannot be one
    in every IR version); constants inside subgraphs stay too (they are not where the quantisers look).
    """
    from onnx import TensorProto

    graph = model.graph
    outputs = {value.name for value in graph.output}
    taken = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    consumers: Counter[str] = Counter()
    converted: list[Any] = []
    kept_nodes = []
    for node in graph.node:
        tensor = _constant_tensor(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        name = node.output[0] if len(node.output) == 1 else ""
        if tensor is None or not name or name in outputs or name in taken:
            kept_nodes.append(node)
            continue
        initializer = TensorProto()
        initializer.CopyFrom(tensor)  # a copy of the proto: no round trip through numpy, no dtype to lose
        initializer.name = name
        converted.append(initializer)
        taken.add(name)
    if not converted:
        return {"step": "constants_to_initializers", "status": "nothing_to_do"}
    names = {init.name for init in converted}
    for node in kept_nodes:
        for value in node.input:
            if value in names:
                consumers[node.op_type] += 1
    if model.ir_version < 4:  # before IR 4 every initializer also had to be a graph input
        graph.input.extend(_value_info(init) for init in converted)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(converted)
    return {"step": "constants_to_initializers", "status": "ran", "converted": len(converted),
            "consumers": dict(sorted(consumers.items()))}


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """Return the tensor a Constant node holds (``value`` or a scalar/list attribute), or None for a sparse one."""
    from onnx import TensorProto, helper

    for attr in node.attribute:
        if attr.name == "value" and attr.type == attr.TENSOR:
            tensor: onnx.TensorProto = attr.t
            return tensor
        if attr.name == "value_float":
            return helper.make_tensor("c", TensorProto.FLOAT, [], [attr.f])
        if attr.name == "value_floats":
            return helper.make_tensor("c", TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
        if attr.name == "value_int":
            return helper.make_tensor("c", TensorProto.INT64, [], [attr.i])
        if attr.name == "value_ints":
            return helper.make_tensor("c", TensorProto.INT64, [len(attr.ints)], list(attr.ints))
    return None  # sparse_value or value_string(s): left as nodes


def _value_info(initializer: onnx.TensorProto) -> onnx.ValueInfoProto:
    from onnx import helper

    return helper.make_tensor_value_info(initializer.name, initializer.data_type, list(initializer.dims))


def symbolic_dims(model: onnx.ModelProto) -> dict[str, Any]:
    """Give literal dims <= 0 on graph inputs and outputs a symbolic name, in place; return the provenance step.

    Exporters write ``-1`` (or 0) for "any size" where ONNX wants a named dim: ORT's symbolic shape inference and
    its calibrator then treat it as a real size, and static calibration ends in "No data is collected".
    """
    renamed: dict[str, list[int]] = {}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
                continue
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value <= 0:
                    dim.dim_param = f"{_DIM_PREFIX}_{kind}_{value.name}_{axis}"  # clears dim_value (a oneof)
                    renamed.setdefault(value.name, []).append(axis)
    if not renamed:
        return {"step": "symbolic_dims", "status": "nothing_to_do"}
    return {"step": "symbolic_dims", "status": "ran", "axes": renamed}


def drop_initializer_value_info(model: onnx.ModelProto) -> dict[str, Any]:
    """Remove ``value_info`` entries named like an initializer, in place; return the provenance step.

    Such entries (left by some exporters and graph editors) make ORT's shape inference fail with
    "Inferred shape and existing shape differ" when they disagree with the initializer.
    """
    initializers = {init.name for init in model.graph.initializer}
    kept = [vi for vi in model.graph.value_info if vi.name not in initializers]
    removed = [vi.name for vi in model.graph.value_info if vi.name in initializers]
    if removed:
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return {"step": "drop_initializer_value_info", "status": "ran" if removed else "nothing_to_do", "removed": removed}


def model_opset(model: onnx.ModelProto) -> int | None:
    """Return the model's default-domain opset, or None when it imports none."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return None


def upgrade_opset(fp32_path: Path, model: onnx.ModelProto, target_opset: int, *,
                  per_channel: bool = True) -> dict[str, Any]:
    """Convert a graph below opset 13 to ``target_opset`` in place; return the provenance step.

    Per-channel quantisation of an opset < 13 graph writes an invalid model (DequantizeLinear with an axis on
    an int32 bias needs opset 13), so a failed conversion is an error then; for per-tensor QDQ the graph is
    quantised at its own opset and the failure is recorded.
    """
    import onnx.version_converter

    current = model_opset(model)
    if current is None or current >= PER_CHANNEL_MIN_OPSET:
        return {"step": "opset_upgrade", "status": "not_needed", "opset": current}
    try:
        converted = onnx.version_converter.convert_version(model, target_opset)
    except Exception as exc:
        if per_channel:
            raise ProducerError(
                f"{fp32_path}: stage 'opset upgrade': cannot convert opset {current} to {target_opset} "
                f"(needed for per-channel quantisation; per_channel=False quantises at opset {current}): "
                f"{one_line(exc)}"
            ) from exc
        _log.warning("%s: opset %s -> %s conversion failed; quantising at opset %s", fp32_path, current,
                     target_opset, current)
        return {"step": "opset_upgrade", "status": "failed_continued_without", "from": current, "to": target_opset,
                "error": one_line(exc)}
    model.CopyFrom(converted)
    return {"step": "opset_upgrade", "status": "ran", "from": current, "to": target_opset}


# --------------------------------------------------------------------------------------------------------------
# ORT's quant_pre_process


def run_quant_pre_process(fp32_path: Path, source: Path, work: Path,
                          keep_nodes: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    """Run ORT pre-processing with fallbacks; return the model to quantise and the provenance step."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    step: dict[str, Any] = {"step": "quant_pre_process", "attempts": []}
    attempts = [{"skip_symbolic_shape": False}, {"skip_symbolic_shape": True}]
    for index, options in enumerate(attempts):
        target = work / f"preprocessed-{index}.onnx"
        error = _call_pre_process(quant_pre_process, source, target, options)
        step["attempts"].append({**options, "error": error})
        if error is None:
            break
    else:
        _log.warning("%s: ORT pre-processing failed; quantising without it", fp32_path)
        step.update(status="failed_continued_without", symbolic_shape_inference=False, optimisation=False)
        return source, step

    step.update(status="ran", symbolic_shape_inference=not options["skip_symbolic_shape"], optimisation=True)
    if keep_nodes:
        present = {node.name for node in onnx.load(str(target), load_external_data=False).graph.node}
        lost = [name for name in keep_nodes if name not in present]
        if lost:  # the optimiser fused or renamed a node the user excluded: keep the graph as exported
            options = {**options, "skip_optimization": True}
            retry = work / "preprocessed-no-opt.onnx"
            error = _call_pre_process(quant_pre_process, source, retry, options)
            step["attempts"].append({**options, "error": error, "reason": f"optimiser removed excluded node(s) {lost}"})
            if error is None:
                target = retry
                step["optimisation"] = False
            else:
                step.update(status="failed_continued_without", symbolic_shape_inference=False, optimisation=False)
                return source, step
    return target, step


def _call_pre_process(quant_pre_process: Any, source: Path, target: Path, options: dict[str, Any]) -> str | None:
    """Call quant_pre_process; return None on success or the error in one line.

    ORT's symbolic shape inference saves ``sym_shape_infer_temp.onnx`` into the current directory when it
    fails, with its weights in an external file onnx names ``<uuid1>.data`` (no location is given): the model
    and the data files that appear during the call are removed (measured: a 10 MB copy of the weights per
    failed attempt was left in the user's folder).
    """
    cwd = Path.cwd()
    leftovers = [cwd / _SYM_TEMP, cwd / f"{_SYM_TEMP}.data"]
    existed = {path: path.exists() for path in leftovers}
    data_before = _uuid_data_files(cwd)
    try:
        quant_pre_process(str(source), str(target), **options)
    except Exception as exc:
        target.unlink(missing_ok=True)
        return one_line(exc)
    finally:
        for path, was_there in existed.items():
            if not was_there:
                path.unlink(missing_ok=True)
        if not existed[cwd / _SYM_TEMP]:  # the model it wrote was ours to remove, so are its weights
            for path in _uuid_data_files(cwd) - data_before:
                path.unlink(missing_ok=True)
    if not target.is_file():
        return "quant_pre_process wrote no model"
    return None


# onnx names an external-data file uuid1() + ".data" when it is given no location
_UUID_DATA = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}\.data$")


def _uuid_data_files(folder: Path) -> set[Path]:
    """Return the external-data files in ``folder`` named as onnx names them without a location."""
    try:
        return {path for path in folder.iterdir() if _UUID_DATA.match(path.name)}
    except OSError:
        return set()
