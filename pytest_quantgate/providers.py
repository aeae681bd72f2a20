"""Execution providers: which ones exist, how to open a session on one, and proof that it really runs there."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EpUnavailableError, ModelFileError
from .settings import EpOptions

if TYPE_CHECKING:
    import onnxruntime as ort

ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
# the distribution that brings each EP: named in skip messages so the fix is obvious
PACKAGES = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu", "openvino": "onnxruntime-openvino"}


def available() -> list[str]:
    """Return the gate's EP names the installed onnxruntime offers, in a fixed order."""
    import onnxruntime as ort

    offered = set(ort.get_available_providers())
    return [ep for ep, name in ORT_NAMES.items() if name in offered]


def expand(requested: tuple[str, ...]) -> list[str]:
    """Expand ``auto`` into the available EPs; keep explicit requests even when unavailable (they skip)."""
    out: list[str] = []
    for ep in requested:
        for name in available() if ep == "auto" else [ep]:
            if name not in out:
                out.append(name)
    return out


def ort_distribution() -> str:
    """Return which onnxruntime wheel is installed (they all install the same module)."""
    from importlib import metadata

    for dist in ("onnxruntime-openvino", "onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "onnxruntime (unknown distribution)"


@dataclass(frozen=True)
class SessionSpec:
    """What a session needs: the EP, its options, and the ORT configuration entries to apply."""

    ep: str
    options: EpOptions

    def providers(self) -> list[Any]:
        """Return the ``providers=`` argument for InferenceSession."""
        if self.ep == "cpu":
            return ["CPUExecutionProvider"]
        if self.ep == "cuda":
            # CPU stays listed: ORT places int8 QDQ nodes that CUDA has no kernel for on it by design
            return [("CUDAExecutionProvider", {"device_id": str(self.options.cuda_device_id)}), "CPUExecutionProvider"]
        ov = {"device_type": self.options.openvino_device, "precision": self.options.openvino_precision}
        return [("OpenVINOExecutionProvider", ov)]

    def config_entries(self) -> dict[str, str]:
        """Return session config entries; OpenVINO gets no silent CPU fallback."""
        if self.ep == "openvino":
            return {"session.disable_cpu_ep_fallback": "1"}
        return {}


@contextlib.contextmanager
def _captured_stderr() -> Any:
    """Capture what native code writes to fd 2 (ORT reports CUDA load failures there, raising nothing)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        box: dict[str, str] = {}
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            box["text"] = sink.read().decode("utf-8", "replace")


def open_session(path: Path, spec: SessionSpec, *, threads: int | None = None) -> ort.InferenceSession:
    """Open an ORT session on exactly the requested EP, or raise EpUnavailableError/ModelFileError."""
    import onnxruntime as ort

    wanted = ORT_NAMES[spec.ep]
    if wanted not in ort.get_available_providers():
        raise EpUnavailableError(
            f"{spec.ep}: {wanted} is not offered by the installed {ort_distribution()}; "
            f"install {PACKAGES[spec.ep]} (one onnxruntime wheel per virtualenv)"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    for key, value in spec.config_entries().items():
        options.add_session_config_entry(key, value)
    with _captured_stderr() as err:
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=spec.providers())
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types; all mean "cannot load"
            text = str(exc).strip().splitlines()
            reason = text[0] if text else type(exc).__name__
            if spec.ep != "cpu" and ("provider" in str(exc).lower() or "fallback" in str(exc).lower()):
                raise EpUnavailableError(f"{spec.ep}: {path}: {wanted} cannot run this model: {reason}") from None
            raise ModelFileError(f"{path}: onnxruntime cannot load the model: {reason}") from None
    running = session.get_providers()
    if not running or running[0] != wanted:
        detail = err.get("text", "").strip().splitlines()
        hint = f" (onnxruntime said: {detail[-1][:300]})" if detail else ""
        raise EpUnavailableError(
            f"{spec.ep}: asked for {wanted} but the session runs on {running}; ORT fell back silently{hint}"
        )
    return session
