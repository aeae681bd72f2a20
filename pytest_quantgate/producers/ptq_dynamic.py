"""Dynamic post-training quantisation: int8 weights, activations quantised at run time (no calibration set).

Use it for MLP / transformer style models dominated by MatMul/Gemm; on CPU, dynamically quantised Conv runs as
ConvInteger and is often much slower than fp32 -- prefer :mod:`pytest_quantgate.producers.ptq_static` for conv
nets. ``quantize_dynamic`` never touches the user's fp32 file: it works on a copy in a private scratch folder
(ORT writes ``<model>-inferred.onnx`` beside whatever model path it is given) and publishes the result atomically
with a provenance record.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pytest_quantgate.fileio import sha256_file
from pytest_quantgate.producers.base import ProducerError, ProducerResult
from pytest_quantgate.producers.provenance import library_versions, publish_sidecar, scratch_dir, sweep_stale_partials

if TYPE_CHECKING:
    import onnx

WeightType = Literal["int8", "uint8"]
_WEIGHT_TYPES = ("int8", "uint8")
DEFAULT_TARGET_OPSET = 17
_PER_CHANNEL_MIN_OPSET = 13


@dataclass(frozen=True, kw_only=True)
class DynamicConfig:
    """Options of dynamic PTQ (``onnxruntime.quantization.quantize_dynamic``).

    per_channel: one weight scale per output channel instead of one per tensor.
    reduce_range: 7-bit weights (can help on CPUs without VNNI).
    weight_type: ``"int8"`` (symmetric, default) or ``"uint8"``.
    op_types_to_quantize: only these op types (e.g. ``("MatMul", "Gemm")``); ``None`` = every op ORT supports.
    nodes_to_quantize: only these node names; ``None`` = all.
    nodes_to_exclude: node names left in float; each must exist in the model.
    matmul_const_b_only: quantise only MatMuls whose B is a constant (ORT's default for dynamic mode).
    weight_symmetric: symmetric weight ranges; ``None`` = ORT's default (symmetric for int8).
    target_opset: opset that graphs below 13 are converted to before per-channel quantisation.
    weight_bits: 8 (``quantize_dynamic``) or 4: int4 weight-only ``MatMulNBits`` for constant-weight MatMul/Gemm
        (:mod:`pytest_quantgate.producers.weight_only`); with 4, ``block_size``, ``weight_symmetric`` and
        ``accuracy_level`` apply and the int8-only options are ignored.
    block_size: input channels per int4 scale block (a power of two >= 16).
    accuracy_level: MatMulNBits compute type (``None`` = ORT's default; 4 = int8 activations per block).
    """

    per_channel: bool = False
    reduce_range: bool = False
    weight_type: WeightType = "int8"
    op_types_to_quantize: tuple[str, ...] | None = None
    nodes_to_quantize: tuple[str, ...] | None = None
    nodes_to_exclude: tuple[str, ...] = ()
    matmul_const_b_only: bool = True
    weight_symmetric: bool | None = None
    target_opset: int = DEFAULT_TARGET_OPSET
    weight_bits: int = 8
    block_size: int = 32
    accuracy_level: int | None = None

    def __post_init__(self) -> None:
        _check_bool(self, "per_channel", "reduce_range", "matmul_const_b_only")
        if self.weight_bits not in (4, 8) or isinstance(self.weight_bits, bool):
            raise ValueError(f"DynamicConfig.weight_bits must be 8 or 4, got {self.weight_bits!r}")
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size & (size - 1):
            raise ValueError(f"DynamicConfig.block_size must be a power of two >= 16, got {size!r}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ValueError(f"DynamicConfig.accuracy_level must be None or 0..4, got {self.accuracy_level!r}")
        _check_choice(self, "weight_type", _WEIGHT_TYPES)
        _normalise_names(self, "op_types_to_quantize", optional=True)
        _normalise_names(self, "nodes_to_quantize", optional=True)
        _normalise_names(self, "nodes_to_exclude", optional=False)
        if self.weight_symmetric is not None and not isinstance(self.weight_symmetric, bool):
            raise ValueError(f"DynamicConfig.weight_symmetric must be True, False or None, got {self.weight_symmetric!r}")
        _check_opset(self)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready data (tuples become lists)."""
        return _config_to_dict(self)


def quantize_dynamic(fp32_path: Path, int8_path: Path, config: DynamicConfig) -> ProducerResult:
    """Write a dynamically quantised ``int8_path`` from ``fp32_path``; return the sha256 to pin and provenance.

    Steps: copy the model into a scratch folder, drop ``value_info`` entries that duplicate initializer names
    (ORT's shape inference fails on them with "Inferred shape and existing shape differ"), convert graphs below
    opset 13 to ``config.target_opset`` when ``per_channel`` is set, quantise, check that ORT loads the result,
    then publish it atomically with ``m.int8.json`` beside it. Raises :class:`ProducerError` naming the model
    and the stage on any failure; the old sidecar, if any, is then left untouched.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    fp32_path, int8_path, started, fp32_sha, model = begin(fp32_path, int8_path, config, DynamicConfig,
                                                           "quantize_dynamic")
    steps: list[dict[str, Any]] = []
    steps.append(drop_initializer_value_info(model))
    if config.per_channel:
        steps.append(upgrade_opset(fp32_path, model, config.target_opset))
    steps.append({"step": "quant_pre_process", "status": "skipped", "reason": "not used for dynamic quantisation"})

    extra_options: dict[str, Any] = {"MatMulConstBOnly": config.matmul_const_b_only}
    if config.weight_symmetric is not None:
        extra_options["WeightSymmetric"] = config.weight_symmetric
    with scratch_dir("ptq-dynamic") as work:
        source = work / "fp32.onnx"
        built = work / "int8.onnx"
        save_model(fp32_path, model, source)
        del model
        check_ort_loads(fp32_path, source, "load fp32")
        kwargs = dict(
            op_types_to_quantize=list(config.op_types_to_quantize) if config.op_types_to_quantize else None,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            weight_type=QuantType.QInt8 if config.weight_type == "int8" else QuantType.QUInt8,
            nodes_to_quantize=list(config.nodes_to_quantize) if config.nodes_to_quantize else None,
            nodes_to_exclude=list(config.nodes_to_exclude) or None,
            extra_options=extra_options,
        )
        if config.weight_bits == 4:
            steps.append(_weight_only(fp32_path, source, built, config))
            check_ort_loads(fp32_path, built, "verify")
            record = provenance_record("ptq_dynamic", config, fp32_path, fp32_sha, steps, {}, built, started)
            return publish_sidecar(built, int8_path, record)
        try:
            ort_quantize_dynamic(str(source), str(built), **kwargs)
        except Exception as exc:
            if not is_default_tensor_type_error(exc):
                raise ort_failure(fp32_path, "quantize_dynamic", exc) from exc
            extra_options["DefaultTensorType"] = _onnx_float()
            steps.append({"step": "default_tensor_type_retry", "status": "ran", "reason": _one_line(exc)})
            built.unlink(missing_ok=True)
            try:
                ort_quantize_dynamic(str(source), str(built), **kwargs)
            except Exception as exc2:
                raise ort_failure(fp32_path, "quantize_dynamic (retry with DefaultTensorType=FLOAT)", exc2) from exc2
        check_ort_loads(fp32_path, built, "verify")
        record = provenance_record("ptq_dynamic", config, fp32_path, fp32_sha, steps, extra_options, built, started)
        return publish_sidecar(built, int8_path, record)


def _weight_only(fp32_path: Path, source: Path, built: Path, config: DynamicConfig) -> dict[str, Any]:
    """Run the int4 weight-only rewrite; turn its failures into a ProducerError naming the model."""
    from pytest_quantgate.producers.weight_only import quantize_matmul_nbits

    symmetric = True if config.weight_symmetric is None else config.weight_symmetric
    try:
        return quantize_matmul_nbits(source, built, bits=4, block_size=config.block_size, symmetric=symmetric,
                                     accuracy_level=config.accuracy_level, nodes_to_exclude=config.nodes_to_exclude)
    except ValueError as exc:
        raise ProducerError(f"{fp32_path}: weight_bits=4: {exc}") from exc
    except Exception as exc:
        raise ort_failure(fp32_path, "MatMulNBits (int4 weight-only)", exc) from exc


# --------------------------------------------------------------------------------------------------------------
# argparse glue (the CLI's ``quantgate ptq-dynamic`` subcommand builds its options here)


def add_common_arguments(group: Any, defaults: dict[str, Any]) -> None:
    """Add the options every PTQ producer shares (defaults shown from the producer's own config dataclass)."""
    group.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                       help=f"one weight scale per output channel (default: {defaults['per_channel']})")
    group.add_argument("--weight-type", choices=_WEIGHT_TYPES, default=None,
                       help=f"weight integer type (default: {defaults['weight_type']})")
    group.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=None,
                       help=f"7-bit weights, for CPUs without VNNI (default: {defaults['reduce_range']})")
    group.add_argument("--op-types-to-quantize", type=csv_names, action="extend", default=None, metavar="OP[,OP...]",
                       help="quantise only these op types (default: every op ORT supports)")
    group.add_argument("--nodes-to-quantize", type=csv_names, action="extend", default=None, metavar="NODE[,NODE...]",
                       help="quantise only these node names (default: all)")
    group.add_argument("--nodes-to-exclude", type=csv_names, action="extend", default=None, metavar="NODE[,NODE...]",
                       help="leave these node names in float (repeatable)")
    group.add_argument("--weight-symmetric", action=argparse.BooleanOptionalAction, default=None,
                       help="symmetric weight ranges (default: ORT's choice, symmetric for int8)")
    group.add_argument("--target-opset", type=int, default=None,
                       help=f"opset that graphs below 13 are converted to for per-channel (default: {defaults['target_opset']})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of :class:`DynamicConfig` to ``parser`` (defaults come from the dataclass)."""
    defaults = _defaults(DynamicConfig)
    group = parser.add_argument_group("dynamic PTQ")
    add_common_arguments(group, defaults)
    group.add_argument("--matmul-const-b-only", action=argparse.BooleanOptionalAction, default=None,
                       help=f"quantise only MatMuls with a constant B (default: {defaults['matmul_const_b_only']})")


def config_from_args(ns: argparse.Namespace) -> DynamicConfig:
    """Build a :class:`DynamicConfig` from parsed arguments; options left unset keep the dataclass default."""
    return DynamicConfig(**_given(ns, DynamicConfig))


# --------------------------------------------------------------------------------------------------------------
# Helpers shared with ptq_static (same package; not part of the public API)


def begin(fp32_path: Path, int8_path: Path, config: Any, config_cls: type, name: str
          ) -> tuple[Path, Path, float, str, onnx.ModelProto]:
    """Check the paths and config, sweep stale partials, hash and load the fp32 model, check node names.

    Returns ``(fp32_path, int8_path, start time, fp32 sha256, model)``: the common start of every PTQ producer.
    """
    fp32_path, int8_path = _check_paths(fp32_path, int8_path)
    if not isinstance(config, config_cls):
        raise ProducerError(f"{fp32_path}: {name} needs a {config_cls.__name__}, got {type(config).__name__}")
    started = time.monotonic()
    sweep_stale_partials(int8_path)
    fp32_sha = sha256_file(fp32_path)
    model = load_model(fp32_path)
    check_node_names(fp32_path, model, "nodes_to_exclude", config.nodes_to_exclude)
    if config.nodes_to_quantize is not None:
        check_node_names(fp32_path, model, "nodes_to_quantize", config.nodes_to_quantize)
    return fp32_path, int8_path, started, fp32_sha, model


def provenance_record(producer: str, config: Any, fp32_path: Path, fp32_sha: str, steps: list[dict[str, Any]],
                      extra_options: dict[str, Any], built: Path, started: float, **extra: Any) -> dict[str, Any]:
    """Return the provenance record every PTQ producer writes beside its sidecar."""
    return {
        "producer": producer,
        "mode": producer.replace("_", "-"),
        "config": config.to_dict(),
        "fp32_path": str(fp32_path),
        "fp32_sha256": fp32_sha,
        **extra,
        "steps": steps,
        "extra_options": {k: _jsonable_option(v) for k, v in extra_options.items()},
        "int8_op_counts": op_counts(built),
        "library_versions": library_versions(),
        "duration_s": round(time.monotonic() - started, 3),
    }


def csv_names(text: str) -> list[str]:
    """argparse ``type=`` for comma-separated names: ``"a,b"`` -> ``["a", "b"]``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated names, got {text!r}")
    return names


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _given(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name, None)
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


def _check_bool(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{type(config).__name__}.{name} must be True or False, got {value!r}")


def _check_choice(config: Any, name: str, allowed: Sequence[str]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ValueError(f"{type(config).__name__}.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_opset(config: Any) -> None:
    opset = config.target_opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < _PER_CHANNEL_MIN_OPSET:
        raise ValueError(f"{type(config).__name__}.target_opset must be an int >= {_PER_CHANNEL_MIN_OPSET}, got {opset!r}")


def _normalise_names(config: Any, name: str, *, optional: bool) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{type(config).__name__}.{name} must be a tuple of names, got {value!r}")
    names = tuple(value)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ValueError(f"{type(config).__name__}.{name} must hold non-empty strings, got {bad!r}")
    object.__setattr__(config, name, names)


def _config_to_dict(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        out[f.name] = value
    return out


def _check_paths(fp32_path: Path, int8_path: Path) -> tuple[Path, Path]:
    fp32_path = Path(fp32_path)
    int8_path = Path(int8_path)
    if not fp32_path.is_file():
        raise ProducerError(f"{fp32_path}: fp32 model not found")
    if not int8_path.name.endswith(".onnx"):
        raise ProducerError(f"{int8_path}: the int8 sidecar must end in .onnx (e.g. m.int8.onnx)")
    if int8_path.resolve() == fp32_path.resolve():
        raise ProducerError(f"{int8_path}: refusing to overwrite the fp32 model with its int8 sidecar")
    return fp32_path, int8_path


def load_model(fp32_path: Path) -> onnx.ModelProto:
    """Load the fp32 model (external data included) or raise a ProducerError naming the file."""
    import onnx

    try:
        return onnx.load(str(fp32_path))
    except Exception as exc:
        raise ProducerError(f"{fp32_path}: cannot read the fp32 model: {_one_line(exc)}") from exc


def save_model(fp32_path: Path, model: onnx.ModelProto, target: Path) -> None:
    """Save a working copy; models over protobuf's 2 GB limit go to external data beside it."""
    import onnx

    try:
        large = model.ByteSize() > 1_800_000_000
        onnx.save_model(model, str(target), save_as_external_data=large,
                        location=f"{target.name}.data" if large else None)
    except Exception as exc:
        raise ProducerError(f"{fp32_path}: cannot write a working copy of the model: {_one_line(exc)}") from exc


def check_node_names(fp32_path: Path, model: onnx.ModelProto, option: str, names: Sequence[str]) -> None:
    """Raise if a configured node name is not in the model (a typo would otherwise be ignored silently)."""
    if not names:
        return
    present = {node.name for node in model.graph.node}
    missing = [n for n in names if n not in present]
    if missing:
        sample = sorted(n for n in present if n)[:12]
        raise ProducerError(
            f"{fp32_path}: {option} names node(s) not in the model: {', '.join(map(repr, missing))}; "
            f"node names in the model include: {', '.join(map(repr, sample)) or '(none named)'}"
        )


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
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return None


def upgrade_opset(fp32_path: Path, model: onnx.ModelProto, target_opset: int) -> dict[str, Any]:
    """Convert a graph below opset 13 to ``target_opset`` in place; return the provenance step.

    Per-channel quantisation of an opset < 13 graph writes an invalid model (DequantizeLinear with an axis on
    an int32 bias needs opset 13).
    """
    import onnx.version_converter

    current = model_opset(model)
    if current is None or current >= _PER_CHANNEL_MIN_OPSET:
        return {"step": "opset_upgrade", "status": "not_needed", "opset": current}
    try:
        converted = onnx.version_converter.convert_version(model, target_opset)
    except Exception as exc:
        raise ProducerError(
            f"{fp32_path}: stage 'opset upgrade': cannot convert opset {current} to {target_opset} "
            f"(needed for per-channel quantisation): {_one_line(exc)}"
        ) from exc
    model.CopyFrom(converted)
    return {"step": "opset_upgrade", "status": "ran", "from": current, "to": target_opset}


def is_default_tensor_type_error(exc: BaseException) -> bool:
    return "Unable to find data type for weight_name" in str(exc)


def _onnx_float() -> int:
    import onnx

    return onnx.TensorProto.FLOAT


def _jsonable_option(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 500:
        text = text[:497] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def ort_failure(fp32_path: Path, stage: str, exc: BaseException) -> ProducerError:
    """Turn an exception raised inside onnxruntime.quantization into a ProducerError naming model and stage.

    The innermost function on the traceback (e.g. ``_adjust_weight_quant_params_for_bias_tensors``) and the
    innermost onnxruntime frame are named too, which is what a bug report upstream needs.
    """
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        where = f" in {frames[-1].name}()"
        ort_frames = [f for f in frames if f"{os.sep}onnxruntime{os.sep}" in f.filename]
        if ort_frames:
            last = ort_frames[-1]
            where += f" (onnxruntime {Path(last.filename).name}:{last.lineno} {last.name}())"
    return ProducerError(
        f"{fp32_path}: stage '{stage}': onnxruntime crashed{where}: {_one_line(exc)}. "
        "This model cannot be quantised with these options; try excluding the node or op type named in the "
        "error (nodes_to_exclude / op_types_to_exclude), per_channel=False, or another quant_format."
    )


def check_ort_loads(fp32_path: Path, model_path: Path, stage: str, feed: dict[str, Any] | None = None) -> None:
    """Raise a ProducerError naming ``stage`` unless ORT (CPU EP) loads ``model_path`` and runs ``feed`` on it."""
    import onnxruntime as ort

    if not model_path.is_file():
        raise ProducerError(f"{fp32_path}: stage '{stage}': onnxruntime wrote no model")
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        if feed is not None:
            session.run(None, feed)
    except Exception as exc:
        what = "the fp32 model" if stage == "load fp32" else "the quantised model"
        raise ProducerError(
            f"{fp32_path}: stage '{stage}': onnxruntime {ort.__version__} cannot "
            f"{'run' if feed is not None else 'load'} {what}: {_one_line(exc)}"
        ) from exc


def op_counts(model_path: Path) -> dict[str, int]:
    """Count the op types of a model (for provenance: how many Q/DQ or integer ops were written)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))
