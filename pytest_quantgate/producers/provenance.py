"""Provenance sidecars and safe publishing, shared by every producer (PTQ dynamic, PTQ static, QAT).

A producer builds its int8 model in a private scratch folder (outside the target folder), then calls
:func:`publish_sidecar`, which moves the finished file into place atomically, hashes it and writes the
provenance record beside it as ``<name>.json`` (``m.int8.onnx`` -> ``m.int8.json``).

Public API (kept small on purpose; the QAT producer uses it too):

- :func:`library_versions` -- versions of onnxruntime (and which distribution provides it), onnx, numpy, and
  torch/torchao when installed, read from package metadata (never imports torch).
- :func:`provenance_path_for` -- where the provenance record of a sidecar lives.
- :func:`write_provenance` -- write a record atomically; returns its path.
- :func:`scratch_dir` -- a private working folder in the system temp dir, removed afterwards; folders left by
  killed producers are swept on the next call.
- :func:`publish_sidecar` -- move a built model onto the sidecar path atomically and write its provenance.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytest_quantgate.fileio import atomic_path, atomic_write_text, sha256_file
from pytest_quantgate.producers.base import ProducerError, ProducerResult

PROVENANCE_FORMAT = 1

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
_SCRATCH_PREFIX = "quantgate-"
_SCRATCH_RE = re.compile(rf"^{re.escape(_SCRATCH_PREFIX)}(\d+)-([0-9a-f]{{8}})-")


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


def provenance_path_for(int8_path: str | os.PathLike[str]) -> Path:
    """Return the provenance path of a sidecar: ``m.int8.onnx`` -> ``m.int8.json``."""
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
    """Write ``record`` as JSON beside the sidecar (``m.int8.json``), atomically; return its path.

    Paths, enums, sets and numpy scalars in ``record`` are converted; anything else that JSON cannot hold
    raises ``TypeError`` before a file is touched.
    """
    target = provenance_path_for(int8_path)
    text = json.dumps(dict(record), indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write_text(target, text)
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _host_tag() -> str:
    """A short tag of this host, so a temp dir shared between containers (other pid namespaces) is left alone."""
    return hashlib.sha256(platform.node().encode("utf-8", "replace")).hexdigest()[:8]


def _sweep_dead_scratch_dirs(base: Path) -> None:
    host = _host_tag()
    try:
        entries = list(base.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _SCRATCH_RE.match(entry.name)
        if (match and match.group(2) == host and entry.is_dir() and not entry.is_symlink()
                and not _pid_alive(int(match.group(1)))):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def scratch_dir(label: str = "producer") -> Iterator[Path]:
    """Yield a private working folder in the system temp dir and remove it afterwards.

    Producers do all their intermediate writing here, never in the target folder, so a producer killed with
    SIGKILL leaves nothing beside the sidecar. Folders left by killed producers (their pid is gone) are
    removed the next time any producer on the same host starts.
    """
    base = Path(tempfile.gettempdir())
    _sweep_dead_scratch_dirs(base)
    safe_label = re.sub(r"[^A-Za-z0-9_.]+", "_", label)[:40]
    path = Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-{_host_tag()}-{safe_label}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish_sidecar(built: str | os.PathLike[str], int8_path: str | os.PathLike[str], record: Mapping[str, Any]) -> ProducerResult:
    """Copy a finished model onto ``int8_path`` atomically, then write its provenance; return the result.

    ``record`` is completed with ``int8_path``, ``int8_sha256``, ``library_versions`` (unless given),
    ``provenance_format`` and ``written_at`` (UTC, ISO 8601). The sidecar is written first: a reader that finds
    a provenance record whose ``int8_sha256`` differs from the sidecar's hash is looking at an interrupted
    publish and must not trust either.
    """
    built = Path(built)
    int8_path = Path(int8_path)
    if not built.is_file():
        raise ProducerError(f"{int8_path}: the producer finished without writing a model ({built} is missing)")
    with atomic_path(int8_path, suffix=".onnx") as tmp:
        shutil.copyfile(built, tmp)
    digest = sha256_file(int8_path)
    full = dict(record)
    full.setdefault("library_versions", library_versions())
    full["int8_path"] = str(int8_path)
    full["int8_sha256"] = digest
    full["provenance_format"] = PROVENANCE_FORMAT
    full["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    provenance_path = write_provenance(int8_path, full)
    return ProducerResult(int8_path=int8_path, sha256=digest, provenance_path=provenance_path, provenance=full)
