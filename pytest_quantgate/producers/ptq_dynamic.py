"""Dynamic post-training quantisation: int8 weights, activations quantised at run time (no calibration set).

Use it for MLP / transformer style models dominated by MatMul/Gemm; on CPU, dynamically quantised Conv runs as
ConvInteger and is often much slower than fp32 -- prefer :mod:`pytest_quantgate.producers.ptq_static` for conv
nets. ``quantize_dynamic`` never touches the user's fp32 file: it works on a copy in a private scratch folder
(ORT writes ``<model>-inferred.onnx`` beside whatever model path it is given) and publishes the result atomically
with a provenance record.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_quantgate.producers.base import ProducerError, ProducerResult
from pytest_quantgate.producers.preprocess import prepare_for_quantisation
from pytest_quantgate.producers.provenance import publish_sidecar, scratch_dir
from pytest_quantgate.producers.ptq_common import (
    DEFAULT_TARGET_OPSET,
    WEIGHT_TYPES,
    WeightType,
    add_common_arguments,
    begin,
    check_bool,
    check_choice,
    check_opset,
    check_ort_loads,
    config_defaults,
    config_to_dict,
    given_options,
    is_default_tensor_type_error,
    normalise_names,
    one_line,
    onnx_float,
    ort_failure,
    provenance_record,
)

if TYPE_CHECKING:
    from pytest_quantgate.io.registry import WriteGuard

__all__ = ["DEFAULT_TARGET_OPSET", "DynamicConfig", "add_arguments", "config_from_args", "quantize_dynamic"]


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
        check_bool(self, "per_channel", "reduce_range", "matmul_const_b_only")
        if self.weight_bits not in (4, 8) or isinstance(self.weight_bits, bool):
            raise ValueError(f"DynamicConfig.weight_bits must be 8 or 4, got {self.weight_bits!r}")
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size & (size - 1):
            raise ValueError(f"DynamicConfig.block_size must be a power of two >= 16, got {size!r}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ValueError(f"DynamicConfig.accuracy_level must be None or 0..4, got {self.accuracy_level!r}")
        check_choice(self, "weight_type", WEIGHT_TYPES)
        normalise_names(self, "op_types_to_quantize", optional=True)
        normalise_names(self, "nodes_to_quantize", optional=True)
        normalise_names(self, "nodes_to_exclude", optional=False)
        if self.weight_symmetric is not None and not isinstance(self.weight_symmetric, bool):
            raise ValueError("DynamicConfig.weight_symmetric must be True, False or None, "
                             f"got {self.weight_symmetric!r}")
        check_opset(self)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready data (tuples become lists); int4-only options only for int4 builds."""
        data = config_to_dict(self)
        if self.weight_bits == 8:
            for key in ("weight_bits", "block_size", "accuracy_level"):
                data.pop(key, None)
        return data


def quantize_dynamic(fp32_path: Path, int8_path: Path, config: DynamicConfig, *,
                     guard: WriteGuard | None = None) -> ProducerResult:
    """Write a dynamically quantised ``int8_path`` from ``fp32_path``; return the sha256 to pin and provenance.

    Steps: the shared pre-processing stage (:mod:`pytest_quantgate.producers.preprocess`) on a copy in a scratch
    folder (Constant-node weights to initializers, literal ``-1`` dims named, ``value_info`` entries that
    duplicate initializer names dropped, graphs below opset 13 converted to ``config.target_opset`` when
    ``per_channel`` is set; ORT's ``quant_pre_process`` is recorded as skipped), quantise, check that ORT loads
    the result, then publish it atomically with its provenance inside. ``guard`` (from ``Registry.write_guard``)
    refuses a target the registry names in another role. Raises :class:`ProducerError` naming the model and the
    stage on any failure; the old sidecar, if any, is then left untouched.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    fp32_path, int8_path, started, fp32_sha, model = begin(fp32_path, int8_path, config, DynamicConfig,
                                                           "quantize_dynamic", guard=guard)

    extra_options: dict[str, Any] = {"MatMulConstBOnly": config.matmul_const_b_only}
    if config.weight_symmetric is not None:
        extra_options["WeightSymmetric"] = config.weight_symmetric
    with scratch_dir("ptq-dynamic") as work:
        source, steps = prepare_for_quantisation(
            fp32_path, model, work, per_channel=config.per_channel, need_qdq=False,
            target_opset=config.target_opset, pre_process=False,
            pre_process_skipped="not used for dynamic quantisation", keep_nodes=config.nodes_to_exclude)
        del model
        built = work / "int8.onnx"
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
            extra_options["DefaultTensorType"] = onnx_float()
            steps.append({"step": "default_tensor_type_retry", "status": "ran", "reason": one_line(exc)})
            built.unlink(missing_ok=True)
            try:
                ort_quantize_dynamic(str(source), str(built), **kwargs)
            except Exception as exc2:
                raise ort_failure(fp32_path, "quantize_dynamic (retry with DefaultTensorType=FLOAT)", exc2) from exc2
        check_ort_loads(fp32_path, built, "verify")
        record = provenance_record("ptq_dynamic", config, fp32_path, fp32_sha, steps, extra_options, built, started)
        return publish_sidecar(built, int8_path, record, fp32_path=fp32_path, guard=guard)


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of :class:`DynamicConfig` to ``parser`` (defaults come from the dataclass)."""
    defaults = config_defaults(DynamicConfig)
    group = parser.add_argument_group("dynamic PTQ")
    add_common_arguments(group, defaults)
    group.add_argument("--matmul-const-b-only", action=argparse.BooleanOptionalAction, default=None,
                       help=f"quantise only MatMuls with a constant B (default: {defaults['matmul_const_b_only']})")


def config_from_args(ns: argparse.Namespace) -> DynamicConfig:
    """Build a :class:`DynamicConfig` from parsed arguments; options left unset keep the dataclass default."""
    return DynamicConfig(**given_options(ns, DynamicConfig))
