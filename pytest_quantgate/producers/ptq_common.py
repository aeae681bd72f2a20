"""Building blocks every PTQ producer shares (dynamic and static): config checks, argparse glue, the common
start of a run (paths, hashes, node names), graph fixes, ORT error reports and the provenance record.

Producers import these public names from here; nothing is imported across producer modules by a private name.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pytest_quantgate.engine.ort import import_onnxruntime
from pytest_quantgate.errors import WriteError
from pytest_quantgate.fileio import sha256_file, sweep_partials, write_error
from pytest_quantgate.producers.base import ProducerError
from pytest_quantgate.producers.provenance import check_target, shaping_versions

if TYPE_CHECKING:
    import onnx

    from pytest_quantgate.io.registry import WriteGuard

WeightType = Literal["int8", "uint8"]
WEIGHT_TYPES = ("int8", "uint8")
DEFAULT_TARGET_OPSET = 17
PER_CHANNEL_MIN_OPSET = 13


def add_common_arguments(group: Any, defaults: dict[str, Any]) -> None:
    """Add the options every PTQ producer shares (defaults shown from the producer's own config dataclass)."""
    group.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                       help=f"one weight scale per output channel (default: {defaults['per_channel']})")
    group.add_argument("--weight-type", choices=WEIGHT_TYPES, default=None,
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
                       help="opset that graphs below 13 are converted to for per-channel or QDQ output "
                            f"(default: {defaults['target_opset']})")


def begin(fp32_path: Path, int8_path: Path, config: Any, config_cls: type[Any], name: str, *,
          guard: WriteGuard | None = None) -> tuple[Path, Path, float, str, onnx.ModelProto]:
    """Check the paths and config, sweep dead writers' partials, hash and load the fp32 model, check node names.

    Returns ``(fp32_path, int8_path, start time, fp32 sha256, model)``: the common start of every PTQ producer.
    """
    fp32_path, int8_path = _check_paths(fp32_path, int8_path, guard)
    if not isinstance(config, config_cls):
        raise ProducerError(f"{fp32_path}: {name} needs a {config_cls.__name__}, got {type(config).__name__}")
    started = time.monotonic()
    sweep_partials(int8_path.parent)
    fp32_sha = sha256_file(fp32_path)
    model = load_model(fp32_path)
    check_node_names(fp32_path, model, "nodes_to_exclude", config.nodes_to_exclude)
    if config.nodes_to_quantize is not None:
        check_node_names(fp32_path, model, "nodes_to_quantize", config.nodes_to_quantize)
    return fp32_path, int8_path, started, fp32_sha, model


def provenance_record(producer: str, config: Any, fp32_path: Path, fp32_sha: str, steps: list[dict[str, Any]],
                      extra_options: dict[str, Any], built: Path, started: float, **extra: Any) -> dict[str, Any]:
    """Return the provenance record every PTQ producer embeds in its sidecar.

    Only facts a rebuild repeats go in (file names, not absolute paths; no times), so the sidecar's bytes, and
    its pinned sha256, are reproducible. ``started`` is kept for the caller's own timing.
    """
    del started  # a duration would make every rebuild's bytes differ
    return {
        "producer": producer,
        "mode": producer.replace("_", "-"),
        "config": config.to_dict(),
        "fp32_path": fp32_path.name,
        "fp32_sha256": fp32_sha,
        **extra,
        "steps": steps,
        "extra_options": {k: _jsonable_option(v) for k, v in extra_options.items()},
        "int8_op_counts": op_counts(built),
        "library_versions": shaping_versions(torch=False),
    }


def csv_names(text: str) -> list[str]:
    """argparse ``type=`` for comma-separated names: ``"a,b"`` -> ``["a", "b"]``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated names, got {text!r}")
    return names


def config_defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def given_options(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name, None)
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


def check_bool(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{type(config).__name__}.{name} must be True or False, got {value!r}")


def check_choice(config: Any, name: str, allowed: Sequence[str]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ValueError(f"{type(config).__name__}.{name} must be one of {', '.join(map(repr, allowed))}, "
                         f"got {value!r}")


def check_opset(config: Any) -> None:
    opset = config.target_opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < PER_CHANNEL_MIN_OPSET:
        raise ValueError(f"{type(config).__name__}.target_opset must be an int >= {PER_CHANNEL_MIN_OPSET}, "
                         f"got {opset!r}")


def normalise_names(config: Any, name: str, *, optional: bool) -> None:
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


def config_to_dict(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        out[f.name] = value
    return out


def _check_paths(fp32_path: Path, int8_path: Path, guard: WriteGuard | None) -> tuple[Path, Path]:
    fp32_path = Path(fp32_path)
    int8_path = Path(int8_path)
    if not fp32_path.is_file():
        raise ProducerError(f"{fp32_path}: fp32 model not found")
    if not int8_path.name.endswith(".onnx"):
        raise ProducerError(f"{int8_path}: the int8 sidecar must end in .onnx (e.g. m.int8.onnx)")
    check_target(int8_path, fp32_path, guard)  # before the work; publish_sidecar checks again before writing
    return fp32_path, int8_path


def load_model(fp32_path: Path) -> onnx.ModelProto:
    """Load the fp32 model (external data included) or raise a ProducerError naming the file."""
    import onnx

    try:
        return onnx.load(str(fp32_path))
    except Exception as exc:
        raise ProducerError(f"{fp32_path}: cannot read the fp32 model: {one_line(exc)}") from exc


def save_model(fp32_path: Path, model: onnx.ModelProto, target: Path) -> None:
    """Save a working copy; models over protobuf's 2 GB limit go to external data beside it."""
    import onnx

    try:
        large = model.ByteSize() > 1_800_000_000
        onnx.save_model(model, str(target), save_as_external_data=large,
                        location=f"{target.name}.data" if large else None)
    except Exception as exc:
        raise scratch_write_error(exc, target) or ProducerError(
            f"{fp32_path}: cannot write a working copy of the model: {one_line(exc)}") from exc


# what the OS says when it refuses a write for want of space, permission or a writable file system
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def scratch_write_error(exc: BaseException, fallback: Path) -> WriteError | None:
    """Return a WriteError when ``exc`` (or an exception behind it) is the OS refusing a working-copy write.

    Producers write their working copies in the temp folder (``scratch_dir``), so a full or read-only temp
    folder fails there, before the sidecar's folder is touched: the message names the file the OS named (else
    ``fallback``) and says how to move the working copies.
    """
    seen: BaseException | None = exc
    visited: set[int] = set()  # a chain can loop back on itself
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            where = Path(seen.filename) if isinstance(seen.filename, str) else fallback
            return write_error(where, seen, "producer's working copy", hint=(
                "working copies go to the temp folder: set TMPDIR to a folder with space to move them; the "
                "sidecar was not touched"))
        seen = seen.__cause__ or seen.__context__
    return None


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


def is_default_tensor_type_error(exc: BaseException) -> bool:
    return "Unable to find data type for weight_name" in str(exc)


def onnx_float() -> int:
    import onnx

    return onnx.TensorProto.FLOAT


def _jsonable_option(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 500:
        text = text[:497] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def ort_failure(fp32_path: Path, stage: str, exc: BaseException) -> ProducerError | WriteError:
    """Turn an exception raised inside onnxruntime.quantization into a ProducerError naming model and stage.

    The innermost function on the traceback (e.g. ``_adjust_weight_quant_params_for_bias_tensors``) and the
    innermost onnxruntime frame are named too, which is what a bug report upstream needs. The OS refusing a
    write of the quantiser's working files (a full temp folder) is a WriteError instead: no option fixes it.
    """
    refused = scratch_write_error(exc, Path(tempfile.gettempdir()))
    if refused is not None:
        return refused
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        where = f" in {frames[-1].name}()"
        ort_frames = [f for f in frames if f"{os.sep}onnxruntime{os.sep}" in f.filename]
        if ort_frames:
            last = ort_frames[-1]
            where += f" (onnxruntime {Path(last.filename).name}:{last.lineno} {last.name}())"
    return ProducerError(
        f"{fp32_path}: stage '{stage}': onnxruntime crashed{where}: {one_line(exc)}. " + _temp_space_note(fp32_path)
        + "This model cannot be quantised with these options; try excluding the node or op type named in the "
        "error (nodes_to_exclude / op_types_to_exclude), per_channel=False, or another quant_format."
    )


# the quantiser keeps a few copies of the model in the temp folder (ours, its shape-inferred and augmented ones)
TEMP_COPIES = 4


def _temp_space_note(fp32_path: Path) -> str:
    """Return a sentence saying the temp folder is too full for the quantiser's copies of the model, or ''.

    onnx writes some of them from C++ and does not report a short write: the next step then reads a truncated
    model and fails with an unrelated error (measured: "Failed to find proper ai.onnx domain" with 16 KiB free).
    """
    import shutil

    folder = tempfile.gettempdir()
    try:
        free, need = shutil.disk_usage(folder).free, TEMP_COPIES * fp32_path.stat().st_size
    except OSError:
        return ""
    if free >= need:
        return ""
    return (f"The temp folder {folder} has {free} bytes free, less than the quantiser's copies of this model need "
            f"(about {need}), which is the likely cause: free space there or set TMPDIR to a folder with space, "
            f"and retry. Otherwise: ")


def check_ort_loads(fp32_path: Path, model_path: Path, stage: str, feed: dict[str, Any] | None = None) -> None:
    """Raise a ProducerError naming ``stage`` unless ORT (CPU EP) loads ``model_path`` and runs ``feed`` on it."""
    ort = import_onnxruntime()

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
            f"{'run' if feed is not None else 'load'} {what}: {one_line(exc)}"
        ) from exc


def op_counts(model_path: Path) -> dict[str, int]:
    """Count the op types of a model (for provenance: how many Q/DQ or integer ops were written)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))
