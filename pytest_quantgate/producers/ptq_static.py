"""Static post-training quantisation: int8 weights and activations, activation ranges from a calibration set.

Use it for conv nets and anything that should run as QDQ on CPU / OpenVINO / TensorRT. The calibration set is
an ``.npz`` file (loaded with ``allow_pickle=False``) with one array per model input, named like the input,
axis 0 = samples; an extra ``target`` array is ignored. An array may have the model input's rank (axis 0 is
also the model's batch axis) or one more axis (each ``array[i]`` is one whole model input). The set is checked
against the model before anything runs, and every mismatch is reported at once.

Pipeline (each step is recorded in the provenance record):

1. check the calibration set against the model's inputs;
2. the shared pre-processing stage (:mod:`pytest_quantgate.producers.preprocess`) in a private scratch folder
   (the user's fp32 file is never modified, and ORT's ``-inferred.onnx`` temp files never land beside it):
   Constant-node weights to initializers, literal ``-1`` dims to symbolic ones, duplicated ``value_info``
   dropped, graphs below opset 13 converted to ``target_opset`` for per-channel or QDQ output, then ORT's
   ``quant_pre_process`` with its fallbacks (``preprocess=False`` skips only that last step);
3. calibrate and quantise (``quantize_static``), retried with ``DefaultTensorType=FLOAT`` on ORT's
   "Unable to find data type for weight_name"; any other ORT crash becomes a ``ProducerError`` naming the
   model, the stage and the ORT function that crashed;
4. check that ORT loads the result and runs one calibration batch through it;
5. publish atomically, the provenance record inside the model's ``metadata_props``.
"""

from __future__ import annotations

import argparse
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pytest_quantgate.fileio import sha256_file
from pytest_quantgate.producers.base import ProducerError, ProducerResult
from pytest_quantgate.producers.preprocess import prepare_for_quantisation
from pytest_quantgate.producers.provenance import publish_sidecar, scratch_dir
from pytest_quantgate.producers.ptq_common import (
    DEFAULT_TARGET_OPSET,
    add_common_arguments,
    begin,
    check_bool,
    check_choice,
    check_opset,
    check_ort_loads,
    config_defaults,
    config_to_dict,
    csv_names,
    given_options,
    is_default_tensor_type_error,
    normalise_names,
    one_line,
    onnx_float,
    ort_failure,
    provenance_record,
)
from pytest_quantgate.settings import positive_int

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from pytest_quantgate.io.registry import WriteGuard

CalibrateMethod = Literal["minmax", "entropy", "percentile"]
QuantFormat = Literal["qdq", "qoperator"]
IntType = Literal["int8", "uint8"]
ActivationType = Literal["int8", "uint8", "int16", "uint16"]  # 16-bit: a16w8, QDQ at opset 21
_CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
_QUANT_FORMATS = ("qdq", "qoperator")
_INT_TYPES = ("int8", "uint8")
_ACTIVATION_TYPES = (*_INT_TYPES, "int16", "uint16")
TARGET_KEY = "target"


@dataclass(frozen=True, kw_only=True)
class StaticConfig:
    """Options of static PTQ (``onnxruntime.quantization.quantize_static``).

    calibration_set: ``.npz`` with one array per model input (axis 0 = samples); ``target`` is ignored.
    calibrate_method: ``"minmax"`` (default), ``"entropy"`` (often MinMax-like scales at ~3x the time) or
        ``"percentile"`` (clips to ``percentile``).
    per_channel: one weight scale per output channel (default True).
    quant_format: ``"qdq"`` (QuantizeLinear/DequantizeLinear pairs; default) or ``"qoperator"`` (QLinear* ops).
    activation_type / weight_type: ``"int8"`` or ``"uint8"``; defaults uint8 activations + int8 weights, ORT's
        advice for x86 CPUs. ``activation_type`` may also be ``"uint16"`` / ``"int16"`` (a16w8; QDQ only, ORT
        raises the graph to opset 21).
    reduce_range: 7-bit weights (can help on CPUs without VNNI).
    op_types_to_quantize: only these op types; ``None`` = every op ORT supports.
    op_types_to_exclude: every node of these op types stays in float.
    nodes_to_quantize: only these node names; ``None`` = all.
    nodes_to_exclude: these node names stay in float; each must exist in the model.
    max_calibration_samples: use at most this many samples (the first ones); ``None`` = all.
    calibration_batch_size: samples per calibration run; ``None`` = 1, or the model's batch size if fixed.
    percentile: the percentile kept by ``calibrate_method="percentile"`` (0 < p <= 100).
    activation_symmetric: symmetric activation ranges (ORT ``ActivationSymmetric``).
    weight_symmetric: symmetric weight ranges; ``None`` = ORT's default (symmetric for int8).
    calib_range_symmetric: make every calibrated range symmetric around 0 (ORT ``CalibTensorRangeSymmetric``).
    moving_average / moving_average_constant: MinMax over a moving average of per-batch ranges.
    preprocess: run ORT's ``quant_pre_process`` after the graph repairs (recommended by ORT); the repairs of
        :mod:`pytest_quantgate.producers.preprocess` run either way.
    target_opset: opset that graphs below 13 are converted to before per-channel or QDQ quantisation.
    """

    calibration_set: Path
    calibrate_method: CalibrateMethod = "minmax"
    per_channel: bool = True
    quant_format: QuantFormat = "qdq"
    activation_type: ActivationType = "uint8"
    weight_type: IntType = "int8"
    reduce_range: bool = False
    op_types_to_quantize: tuple[str, ...] | None = None
    op_types_to_exclude: tuple[str, ...] = ()
    nodes_to_quantize: tuple[str, ...] | None = None
    nodes_to_exclude: tuple[str, ...] = ()
    max_calibration_samples: int | None = None
    calibration_batch_size: int | None = None
    percentile: float = 99.999
    activation_symmetric: bool = False
    weight_symmetric: bool | None = None
    calib_range_symmetric: bool = False
    moving_average: bool = False
    moving_average_constant: float = 0.01
    preprocess: bool = True
    target_opset: int = DEFAULT_TARGET_OPSET

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.calibration_set, (str, os.PathLike)):
            raise ValueError(f"{name}.calibration_set must be a path to an .npz file, got {self.calibration_set!r}")
        object.__setattr__(self, "calibration_set", Path(self.calibration_set))
        check_choice(self, "calibrate_method", _CALIBRATE_METHODS)
        check_choice(self, "quant_format", _QUANT_FORMATS)
        check_choice(self, "activation_type", _ACTIVATION_TYPES)
        check_choice(self, "weight_type", _INT_TYPES)
        check_bool(self, "per_channel", "reduce_range", "activation_symmetric", "calib_range_symmetric",
                    "moving_average", "preprocess")
        normalise_names(self, "op_types_to_quantize", optional=True)
        normalise_names(self, "op_types_to_exclude", optional=False)
        normalise_names(self, "nodes_to_quantize", optional=True)
        normalise_names(self, "nodes_to_exclude", optional=False)
        for field_name in ("max_calibration_samples", "calibration_batch_size"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}.{field_name} must be a positive int or None, got {value!r}")
        percentile = self.percentile
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise ValueError(f"{name}.percentile must be a number in (0, 100], got {self.percentile!r}")
        if self.weight_symmetric is not None and not isinstance(self.weight_symmetric, bool):
            raise ValueError(f"{name}.weight_symmetric must be True, False or None, got {self.weight_symmetric!r}")
        if self.moving_average and self.calibrate_method != "minmax":
            raise ValueError(f"{name}.moving_average only applies to calibrate_method='minmax', "
                             f"not {self.calibrate_method!r}")
        const = self.moving_average_constant
        if isinstance(const, bool) or not isinstance(const, (int, float)) or not 0 < const <= 1:
            raise ValueError(f"{name}.moving_average_constant must be a number in (0, 1], got {const!r}")
        check_opset(self)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready data (paths become strings, tuples lists)."""
        return config_to_dict(self)


# --------------------------------------------------------------------------------------------------------------
# Calibration set


@dataclass(frozen=True)
class _InputSpec:
    name: str
    dtype: Any  # numpy dtype
    dims: tuple[int | None, ...] | None  # None: no shape in the model; a None dim: dynamic


@dataclass(frozen=True)
class CalibrationSet:
    """A validated calibration set: per-input arrays and how to slice them into model feeds."""

    path: Path
    sha256: str
    arrays: dict[str, np.ndarray]
    per_sample: dict[str, bool]  # True: array has one more axis than the model input
    sample_count: int  # samples in the file
    used_samples: int  # after max_calibration_samples and dropping an incomplete fixed-size batch
    batch_size: int

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        import numpy as np

        for start in range(0, self.used_samples, self.batch_size):
            stop = min(start + self.batch_size, self.used_samples)
            feed = {}
            for name, array in self.arrays.items():
                block = array[start:stop]
                if self.per_sample[name]:
                    block = block[0] if len(block) == 1 else np.concatenate(list(block), axis=0)
                feed[name] = np.ascontiguousarray(block)
            yield feed

    def batch_count(self) -> int:
        return -(-self.used_samples // self.batch_size)

    def layout(self) -> dict[str, str]:
        return {name: "one model input per sample" if ps else "axis 0 is the model's batch axis"
                for name, ps in self.per_sample.items()}


def model_inputs(model: onnx.ModelProto) -> list[_InputSpec]:
    """The graph inputs that are fed at run time (initializers listed as inputs by old exporters excluded)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        try:
            dtype = tensor_dtype_to_np_dtype(tensor_type.elem_type)
        except Exception:
            dtype = None
        dims: tuple[int | None, ...] | None = None
        if tensor_type.HasField("shape"):
            # a literal -1 (or 0) is an exporter's "any size", not a size (the pre-processing names it)
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in tensor_type.shape.dim)
        specs.append(_InputSpec(value.name, dtype, dims))
    return specs


def _fmt_dims(dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def load_calibration_set(fp32_path: Path, model: onnx.ModelProto, config: StaticConfig) -> CalibrationSet:
    """Load ``config.calibration_set`` and check it against the model's inputs; report every mismatch at once."""
    import numpy as np

    path = config.calibration_set
    if not path.is_file():
        raise ProducerError(f"{path}: calibration set not found (for {fp32_path})")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ProducerError(f"{path}: cannot read the calibration set: {one_line(exc)}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ProducerError(f"{path}: the calibration set must be an .npz archive (np.savez), not a single .npy array")
    arrays: dict[str, np.ndarray] = {}
    problems: list[str] = []
    with loaded:
        for key in loaded.files:
            if key == TARGET_KEY:
                continue
            try:
                arrays[key] = loaded[key]
            except (ValueError, zipfile.BadZipFile, OSError) as exc:  # object arrays need pickle: refused
                problems.append(f"array {key!r}: cannot be loaded without pickle ({one_line(exc)})")
    specs = model_inputs(model)
    by_name = {spec.name: spec for spec in specs}
    expected = ", ".join(f"{s.name!r} {s.dtype} {_fmt_dims(s.dims) if s.dims is not None else '[any]'}" for s in specs)

    for key in sorted(set(arrays) - set(by_name)):
        problems.append(f"array {key!r} matches no model input (model inputs: {expected}; "
                        f"an array named {TARGET_KEY!r} is ignored)")
    for spec in specs:
        if spec.name not in arrays:
            problems.append(f"model input {spec.name!r} ({spec.dtype} "
                            f"{_fmt_dims(spec.dims) if spec.dims is not None else '[any]'}) has no array")

    per_sample: dict[str, bool] = {}
    counts: dict[str, int] = {}
    for name, array in arrays.items():
        found = by_name.get(name)
        if found is None:
            continue
        spec = found
        if spec.dtype is not None and array.dtype != spec.dtype:
            problems.append(f"array {name!r}: dtype {array.dtype}, expected {np.dtype(spec.dtype)} "
                            f"(convert with .astype(np.{np.dtype(spec.dtype).name}))")
        if array.ndim == 0:
            problems.append(f"array {name!r}: a scalar; axis 0 must index samples")
            continue
        counts[name] = array.shape[0]
        if spec.dims is None:
            per_sample[name] = False
            continue
        rank = len(spec.dims)
        if array.ndim == rank + 1:
            per_sample[name], model_dims = True, spec.dims
        elif array.ndim == rank and rank >= 1:
            per_sample[name], model_dims = False, spec.dims[1:]
        else:
            problems.append(
                f"array {name!r}: shape {list(array.shape)} (rank {array.ndim}), expected rank {rank} "
                f"(samples on the model's batch axis, model input {_fmt_dims(spec.dims)}) or rank {rank + 1} "
                f"(one model input per sample: [samples, {_fmt_dims(spec.dims)[1:-1]}])"
            )
            continue
        pairs = zip(model_dims, array.shape[1:], strict=False)
        wrong = [(axis, want, got) for axis, (want, got) in enumerate(pairs, start=1)
                 if want is not None and want != got]
        if wrong:
            detail = ", ".join(f"axis {axis}: {got} != {want}" for axis, want, got in wrong)
            layout = "[samples, " + _fmt_dims(model_dims)[1:] if per_sample[name] else _fmt_dims(spec.dims)
            problems.append(f"array {name!r}: shape {list(array.shape)}, expected {layout} ({detail})")
    if len(set(counts.values())) > 1:
        problems.append("arrays hold different numbers of samples: "
                        + ", ".join(f"{k!r}: {v}" for k, v in sorted(counts.items())))
    if counts and max(counts.values()) == 0:
        problems.append("the calibration set holds no samples")
    if problems:
        raise ProducerError(
            f"{path}: calibration set does not match the inputs of {fp32_path}:\n  - " + "\n  - ".join(problems)
        )

    arrays = {spec.name: arrays[spec.name] for spec in specs}  # model input order
    sample_count = next(iter(counts.values()))
    batch_size = _batch_size(path, specs, per_sample, config.calibration_batch_size)
    used = min(sample_count, config.max_calibration_samples or sample_count)
    if any(not per_sample[s.name] and s.dims and s.dims[0] is not None for s in specs):
        used -= used % batch_size  # a model with a fixed batch size cannot take an incomplete last batch
        if used == 0:
            raise ProducerError(f"{path}: {sample_count} sample(s) but the model's fixed batch size is {batch_size}")
    return CalibrationSet(path=path, sha256=sha256_file(path), arrays=arrays, per_sample=per_sample,
                          sample_count=sample_count, used_samples=used, batch_size=batch_size)


def _batch_size(path: Path, specs: list[_InputSpec], per_sample: dict[str, bool], requested: int | None) -> int:
    fixed = {s.name: s.dims[0] for s in specs if not per_sample[s.name] and s.dims and s.dims[0] is not None}
    size = requested if requested is not None else (next(iter(fixed.values())) if fixed else 1)
    problems = [f"model input {name!r} has a fixed batch size of {dim}, calibration_batch_size is {size}"
                for name, dim in fixed.items() if dim != size]
    if size > 1:
        problems += [f"array {s.name!r} holds one model input per sample and the model input's axis 0 is fixed "
                     f"({s.dims[0]}), so samples cannot be batched (calibration_batch_size is {size})"
                     for s in specs if per_sample[s.name] and s.dims and s.dims[0] is not None]
    if problems:
        raise ProducerError(f"{path}: " + "; ".join(problems))
    return size


def _make_reader(calibration: CalibrationSet) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _NpzReader(CalibrationDataReader):  # type: ignore[misc]  # ORT has no type hints
        """Feeds of one calibration set, in file order; rewindable (ORT's strided MinMax uses set_range)."""

        def __init__(self) -> None:
            self._feeds = list(calibration.feeds())
            self._start, self._stop = 0, len(self._feeds)
            self._index = 0

        def get_next(self) -> dict[str, Any] | None:
            if self._start + self._index >= self._stop:
                return None
            feed = self._feeds[self._start + self._index]
            self._index += 1
            return feed

        def rewind(self) -> None:
            self._index = 0

        def set_range(self, start_index: int, end_index: int) -> None:
            self._start, self._stop, self._index = start_index, min(end_index, len(self._feeds)), 0

        def __len__(self) -> int:
            return len(self._feeds)

    return _NpzReader()


# --------------------------------------------------------------------------------------------------------------
# Producer


def quantize_static(fp32_path: Path, int8_path: Path, config: StaticConfig, *,
                    guard: WriteGuard | None = None) -> ProducerResult:
    """Write a statically quantised ``int8_path`` from ``fp32_path``; return the sha256 to pin and provenance.

    See the module docstring for the pipeline. Raises :class:`ProducerError` (naming the model, the calibration
    set or the stage) on any failure; the old sidecar, if any, is then left untouched. ``guard`` (from
    ``Registry.write_guard``) refuses a target the registry names in another role.
    """
    fp32_path, int8_path, started, fp32_sha, model = begin(fp32_path, int8_path, config, StaticConfig,
                                                           "quantize_static", guard=guard)
    calibration = load_calibration_set(fp32_path, model, config)

    with scratch_dir("ptq-static") as work:
        prepared, steps = prepare_for_quantisation(
            fp32_path, model, work, per_channel=config.per_channel, need_qdq=config.quant_format == "qdq",
            target_opset=config.target_opset, pre_process=config.preprocess, keep_nodes=config.nodes_to_exclude)
        del model
        nodes_to_exclude, excluded_by_type = _nodes_to_exclude(prepared, config)
        extra_options = _extra_options(config)
        built = work / "int8.onnx"
        _run_quantize_static(fp32_path, prepared, built, calibration, config, nodes_to_exclude, extra_options, steps)
        check_ort_loads(fp32_path, built, "verify", feed=next(calibration.feeds()))
        record = provenance_record(
            "ptq_static", config, fp32_path, fp32_sha, steps, extra_options, built, started,
            calibration={
                "path": calibration.path.name,  # a name, not a path: the record must be the same on every machine
                "sha256": calibration.sha256,
                "sample_count": calibration.sample_count,
                "samples_used": calibration.used_samples,
                "batch_size": calibration.batch_size,
                "batches": calibration.batch_count(),
                "layout": calibration.layout(),
            },
            nodes_excluded=nodes_to_exclude,
            nodes_excluded_by_op_type=excluded_by_type,
        )
        record["config"]["calibration_set"] = calibration.path.name
        return publish_sidecar(built, int8_path, record, fp32_path=fp32_path, guard=guard)


def _extra_options(config: StaticConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"ActivationSymmetric": config.activation_symmetric}
    if config.weight_symmetric is not None:
        options["WeightSymmetric"] = config.weight_symmetric
    if config.calib_range_symmetric:
        options["CalibTensorRangeSymmetric"] = True
    if config.moving_average:
        options["CalibMovingAverage"] = True
        options["CalibMovingAverageConstant"] = float(config.moving_average_constant)
    if config.calibrate_method == "percentile":
        options["CalibPercentile"] = float(config.percentile)
    return options


def _nodes_to_exclude(prepared: Path, config: StaticConfig) -> tuple[list[str], list[str]]:
    import onnx

    names = list(config.nodes_to_exclude)
    by_type: list[str] = []
    if config.op_types_to_exclude:
        wanted = set(config.op_types_to_exclude)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        by_type = [node.name for node in graph.node if node.op_type in wanted and node.name]
        names += [n for n in by_type if n not in names]
    return names, by_type


def _run_quantize_static(fp32_path: Path, prepared: Path, built: Path, calibration: CalibrationSet,
                         config: StaticConfig, nodes_to_exclude: list[str], extra_options: dict[str, Any],
                         steps: list[dict[str, Any]]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    int_types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8, "int16": QuantType.QInt16,
                 "uint16": QuantType.QUInt16}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}

    def run(options: dict[str, Any]) -> None:
        built.unlink(missing_ok=True)
        ort_quantize_static(
            str(prepared), str(built), _make_reader(calibration),
            quant_format=QuantFormat.QDQ if config.quant_format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=list(config.op_types_to_quantize) if config.op_types_to_quantize else None,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            activation_type=int_types[config.activation_type],
            weight_type=int_types[config.weight_type],
            nodes_to_quantize=list(config.nodes_to_quantize) if config.nodes_to_quantize else None,
            nodes_to_exclude=nodes_to_exclude or None,
            calibrate_method=methods[config.calibrate_method],
            extra_options=dict(options),
        )

    try:
        run(extra_options)
    except Exception as exc:
        if not is_default_tensor_type_error(exc):
            stage = f"quantize_static (calibrate + quantise, {config.calibrate_method})"
            raise ort_failure(fp32_path, stage, exc) from exc
        extra_options["DefaultTensorType"] = onnx_float()
        steps.append({"step": "default_tensor_type_retry", "status": "ran", "reason": one_line(exc)})
        try:
            run(extra_options)
        except Exception as exc2:
            raise ort_failure(fp32_path, "quantize_static (retry with DefaultTensorType=FLOAT)", exc2) from exc2


# --------------------------------------------------------------------------------------------------------------
# argparse glue (the CLI's ``quantgate ptq-static`` subcommand builds its options here)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of :class:`StaticConfig` to ``parser`` (defaults come from the dataclass)."""
    d = config_defaults(StaticConfig)
    group = parser.add_argument_group("static PTQ")
    add_common_arguments(group, d)
    group.add_argument("--calibration-set", type=Path, default=None, metavar="NPZ",
                       help="calibration .npz: one array per model input, axis 0 = samples ('target' is ignored)")
    group.add_argument("--calibrate-method", choices=_CALIBRATE_METHODS, default=None,
                       help=f"how activation ranges are chosen (default: {d['calibrate_method']})")
    group.add_argument("--quant-format", choices=_QUANT_FORMATS, default=None,
                       help=f"QDQ pairs or QLinear* operators (default: {d['quant_format']})")
    group.add_argument("--activation-type", choices=_ACTIVATION_TYPES, default=None,
                       help=f"activation integer type (default: {d['activation_type']})")
    group.add_argument("--op-types-to-exclude", type=csv_names, action="extend", default=None, metavar="OP[,OP...]",
                       help="leave every node of these op types in float (repeatable)")
    group.add_argument("--max-calibration-samples", type=positive_int, default=None, metavar="N",
                       help="use at most the first N calibration samples (default: all)")
    group.add_argument("--calibration-batch-size", type=positive_int, default=None, metavar="N",
                       help="samples per calibration run (default: 1, or the model's fixed batch size)")
    group.add_argument("--percentile", type=float, default=None,
                       help=f"percentile kept by --calibrate-method percentile (default: {d['percentile']})")
    group.add_argument("--activation-symmetric", action=argparse.BooleanOptionalAction, default=None,
                       help=f"symmetric activation ranges (default: {d['activation_symmetric']})")
    group.add_argument("--calib-range-symmetric", action=argparse.BooleanOptionalAction, default=None,
                       help=f"make calibrated ranges symmetric around 0 (default: {d['calib_range_symmetric']})")
    group.add_argument("--moving-average", action=argparse.BooleanOptionalAction, default=None,
                       help=f"MinMax over a moving average of batch ranges (default: {d['moving_average']})")
    group.add_argument("--moving-average-constant", type=float, default=None,
                       help=f"smoothing factor of --moving-average (default: {d['moving_average_constant']})")
    group.add_argument("--preprocess", action=argparse.BooleanOptionalAction, default=None,
                       help="run ORT's quant_pre_process after the graph repairs, which always run "
                            f"(default: {d['preprocess']})")


def config_from_args(ns: argparse.Namespace) -> StaticConfig:
    """Build a :class:`StaticConfig` from parsed arguments; options left unset keep the dataclass default."""
    return StaticConfig(**given_options(ns, StaticConfig))
