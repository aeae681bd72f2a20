"""Provenance records and safe publishing, shared by every producer (PTQ dynamic, PTQ static, QAT).

A producer builds its int8 model in a private scratch folder (or in memory), then calls :func:`publish_sidecar`,
which stores the provenance record *inside* the model (ONNX ``metadata_props`` key ``quantgate.provenance``)
and moves the model into place with one atomic rename: the sidecar and its provenance cannot disagree, even
after a SIGKILL. Records hold only what is the same on every rebuild (no times, no absolute paths), so a
rebuild still reproduces the pinned sha256. Sidecars written before this format kept their record in
``m.int8.json`` beside ``m.int8.onnx``; :func:`read_provenance` still reads those when the record's
``int8_sha256`` matches the sidecar, and a producer removes the old file once it has published.

Public API (the QAT producer uses it too):

- :func:`library_versions` -- versions of onnxruntime (and which distribution provides it), onnx, numpy, and
  torch/torchao when installed, read from package metadata (never imports torch).
- :func:`shaping_versions` -- the subset of those that shapes a sidecar's bytes, for the embedded record.
- :func:`scratch_dir` -- a private working folder in the system temp dir, removed afterwards; folders left by
  killed producers are swept on the next call.
- :func:`check_target` -- refuse a sidecar path that is the fp32 model or a file the registry names otherwise.
- :func:`publish_sidecar` -- embed the provenance and move a built model onto the sidecar path atomically.
- :func:`read_provenance` -- the record of a sidecar (embedded, or a matching legacy ``.int8.json``).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import importlib.metadata as metadata
import json
import os
import platform
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pytest_quantgate.fileio import atomic_path, atomic_write_text, scratch_folder, sweep_partials
from pytest_quantgate.producers.base import ProducerError, ProducerResult

if TYPE_CHECKING:
    from pytest_quantgate.io.registry import WriteGuard

# 2: the record lives in the model's metadata_props; 1: in m.int8.json beside it
PROVENANCE_FORMAT = 2
PROVENANCE_KEY = "quantgate.provenance"

# Distributions that install the ``onnxruntime`` module; installing two in one environment breaks both.
_ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-directml",
    "onnxruntime-qnn",
    "onnxruntime-training",
    "ort-nightly",
    "ort-nightly-gpu",
)


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    """Return the versions of the libraries that shape a sidecar, from package metadata.

    Keys: ``onnxruntime``, ``onnxruntime_distribution`` (e.g. ``onnxruntime-gpu``; several names joined by
    ``+`` when more than one distribution provides the module -- a broken environment), ``onnx``, ``numpy``,
    ``python``, and ``torch`` / ``torchao`` only when installed. torch is never imported here.
    """
    versions: dict[str, str] = {}
    ort_dists = [(name, v) for name in _ORT_DISTRIBUTIONS if (v := _dist_version(name)) is not None]
    ort_module = sys.modules.get("onnxruntime")
    if ort_module is not None and getattr(ort_module, "__version__", None):
        versions["onnxruntime"] = str(ort_module.__version__)
    elif ort_dists:
        versions["onnxruntime"] = ort_dists[0][1]
    if ort_dists:
        versions["onnxruntime_distribution"] = "+".join(name for name, _ in ort_dists)
    for name in ("onnx", "numpy", "torch", "torchao"):
        module = sys.modules.get(name)  # the running version wins over metadata when already imported
        version = getattr(module, "__version__", None) if module is not None else None
        version = str(version) if version else _dist_version(name)
        if version is not None:
            versions[name] = version
    versions["python"] = platform.python_version()
    return versions


def shaping_versions(*, torch: bool) -> dict[str, str]:
    """Return the library versions that shape a sidecar's bytes (torch and torchao only for QAT).

    The Python version and unrelated libraries are left out: they would change the sidecar's hash on every
    upgrade without changing a single weight.
    """
    keep = {"onnxruntime", "onnxruntime_distribution", "onnx", "numpy"} | ({"torch", "torchao"} if torch else set())
    return {k: v for k, v in library_versions().items() if k in keep}


def provenance_path_for(int8_path: str | os.PathLike[str]) -> Path:
    """Return where format-1 provenance lived: ``m.int8.onnx`` -> ``m.int8.json`` (read for old sidecars)."""
    int8_path = Path(int8_path)
    name = int8_path.name
    stem = name[: -len(".onnx")] if name.endswith(".onnx") else name
    return int8_path.with_name(f"{stem}.json")


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"provenance value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def write_provenance(int8_path: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Write ``record`` as format-1 JSON beside the sidecar (``m.int8.json``), atomically; return its path.

    Kept for tools that want a readable copy; producers embed the record instead (see :func:`publish_sidecar`).

    Paths, enums, sets and numpy scalars in ``record`` are converted; anything else that JSON cannot hold
    raises ``TypeError`` before a file is touched.
    """
    target = provenance_path_for(int8_path)
    text = json.dumps(dict(record), indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write_text(target, text)
    return target


@contextmanager
def scratch_dir(label: str = "producer") -> Iterator[Path]:
    """Yield a private working folder in the system temp dir and remove it afterwards (``fileio.scratch_folder``).

    Producers do all their intermediate writing here, never in the target folder, so a producer killed with
    SIGKILL leaves nothing beside the sidecar; its folder is swept the next time a producer of that kind starts.
    """
    with scratch_folder(label, what="producer's working folder",
                        hint="set TMPDIR to a writable folder with space; the sidecar was not touched") as (path, _):
        yield path


def check_target(int8_path: str | os.PathLike[str], fp32_path: str | os.PathLike[str] | None,
                 guard: WriteGuard | None = None) -> None:
    """Refuse a sidecar path that is the fp32 model (symlinks and hard links included) or that ``guard`` protects.

    Raises ProducerError for the fp32 model without a registry, and the guard's RegistryError (an input
    error naming the entry, the field and the other role) with one.
    """
    if guard is not None:
        guard.check(int8_path)
    if fp32_path is not None:
        same = os.path.realpath(int8_path) == os.path.realpath(fp32_path)
        with contextlib.suppress(OSError):  # a missing target is not the fp32 model
            same = same or os.path.samefile(int8_path, fp32_path)
        if same:
            raise ProducerError(f"{int8_path}: refusing to overwrite the fp32 model {fp32_path} with its int8 sidecar")


def _portable(value: Any, replace: Mapping[str, str]) -> Any:
    """Return ``value`` as JSON data with machine-specific path prefixes replaced (a record must reproduce)."""
    if isinstance(value, Mapping):
        return {str(k): _portable(v, replace) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v, replace) for v in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        for prefix, stand_in in replace.items():
            value = value.replace(prefix, stand_in)
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _portable(_json_default(value), replace)


def embed_provenance(model_bytes: bytes, record: Mapping[str, Any]) -> bytes:
    """Return the model bytes with ``record`` stored as JSON under ``metadata_props[quantgate.provenance]``."""
    import onnx

    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    kept = [p for p in model.metadata_props if p.key != PROVENANCE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=PROVENANCE_KEY,
                             value=json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False))
    return bytes(model.SerializeToString())


def publish_sidecar(
    built: str | os.PathLike[str] | bytes,
    int8_path: str | os.PathLike[str],
    record: Mapping[str, Any],
    *,
    fp32_path: str | os.PathLike[str] | None = None,
    guard: WriteGuard | None = None,
) -> ProducerResult:
    """Embed ``record`` in the built model and move it onto ``int8_path`` in one atomic rename; return the result.

    ``built`` is the finished model file (in a scratch folder) or its bytes. ``record`` is completed with
    ``provenance_format``; paths inside it under the scratch folder or the fp32 model's folder are made
    relative, so a rebuild writes the same bytes. The target is checked first (:func:`check_target`), the
    folder is swept of dead writers' partials, and a format-1 ``m.int8.json`` left beside the sidecar is
    removed once the new sidecar is in place (it describes the old one).
    """
    int8_path = Path(int8_path)
    check_target(int8_path, fp32_path, guard)
    replace: dict[str, str] = {}
    if isinstance(built, (bytes, bytearray)):
        data = bytes(built)
    else:
        built = Path(built)
        if not built.is_file():
            raise ProducerError(f"{int8_path}: the producer finished without writing a model ({built} is missing)")
        data = built.read_bytes()
        replace[str(built.parent.resolve()) + os.sep] = ""
        replace[str(built.parent) + os.sep] = ""
    if fp32_path is not None:
        replace[str(Path(fp32_path).resolve().parent) + os.sep] = ""
        replace[str(Path(fp32_path).parent) + os.sep] = ""
    full = _portable({**dict(record), "provenance_format": PROVENANCE_FORMAT}, replace)
    try:
        data = embed_provenance(data, full)
    except Exception as exc:
        raise ProducerError(f"{int8_path}: cannot store the provenance in the model: {type(exc).__name__}: {exc}") \
            from exc
    sweep_partials(int8_path.parent)
    with atomic_path(int8_path, suffix=".onnx", what="int8 sidecar", size=len(data)) as tmp, open(tmp, "r+b") as handle:
        handle.write(data)
    digest = hashlib.sha256(data).hexdigest()
    _remove_legacy_record(int8_path, guard)
    return ProducerResult(int8_path=int8_path, sha256=digest, provenance_path=int8_path,
                          provenance={**full, "int8_sha256": digest})


def _remove_legacy_record(int8_path: Path, guard: WriteGuard | None) -> None:
    legacy = provenance_path_for(int8_path)
    if legacy == int8_path or not legacy.is_file() or legacy.is_symlink():
        return
    try:
        if guard is not None:
            guard.check(legacy)  # never delete a file the registry names (however unlikely for a .json)
        legacy.unlink()
    except Exception:
        return


def read_provenance(int8_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return a sidecar's provenance record, or None when it has none (or the file is not a readable model).

    The record gains ``int8_sha256`` (the sidecar's hash) and ``provenance_source`` (``metadata_props`` or
    the legacy file's name). A format-1 ``m.int8.json`` counts only when its ``int8_sha256`` matches the
    sidecar: one left from an earlier build describes another file.
    """
    int8_path = Path(int8_path)
    try:
        data = int8_path.read_bytes()
    except OSError:
        return None
    status, embedded = embedded_provenance(data)
    if status != "absent":
        return embedded
    digest = hashlib.sha256(data).hexdigest()
    legacy = provenance_path_for(int8_path)
    try:
        record = json.loads(legacy.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("int8_sha256") == digest:
        return {**record, "provenance_source": legacy.name}
    return None


def embedded_provenance(data: bytes) -> tuple[Literal["found", "absent", "broken"], dict[str, Any] | None]:
    """Return whether a model's bytes hold a provenance record, and the record (with ``int8_sha256``)."""
    import onnx

    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception:
        return "broken", None
    for prop in model.metadata_props:
        if prop.key == PROVENANCE_KEY:
            try:
                record = json.loads(prop.value)
            except ValueError:
                return "broken", None
            if isinstance(record, dict):
                return "found", {**record, "int8_sha256": hashlib.sha256(data).hexdigest(),
                                 "provenance_source": "metadata_props"}
            return "broken", None
    return "absent", None
