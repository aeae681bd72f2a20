"""onnxruntime through one door: the wheel is the user's choice (an extra), and a missing or doubled one is named.

``onnxruntime``, ``onnxruntime-gpu`` and ``onnxruntime-openvino`` all install the same module, ``onnxruntime``, so
pytest-quantgate depends on none of them directly: ``pip install pytest-quantgate[cpu]`` (or ``[gpu]``,
``[openvino]``) picks one. Call :func:`import_onnxruntime` instead of ``import onnxruntime``: when no wheel is
installed, or two of them overwrote each other's files in one environment, it raises :class:`OnnxRuntimeError`
whose message says which extra to install. :func:`check_onnxruntime` does the same checks without importing, for
start-up paths that must stay cheap (pytest's configure, the CLI).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from ..errors import InputError

# distribution -> the extra of pytest-quantgate that installs it (all three ship the module `onnxruntime`)
EXTRAS = {"onnxruntime": "cpu", "onnxruntime-gpu": "gpu", "onnxruntime-openvino": "openvino"}
INSTALL_HINT = (
    "install exactly one onnxruntime wheel through an extra of pytest-quantgate: "
    "pip install 'pytest-quantgate[cpu]' (onnxruntime, CPU EP), "
    "pip install 'pytest-quantgate[gpu]' (onnxruntime-gpu, CUDA EP) or "
    "pip install 'pytest-quantgate[openvino]' (onnxruntime-openvino, OpenVINO EP)"
)


class OnnxRuntimeError(InputError):
    """onnxruntime cannot be used here: no wheel is installed, or two wheels share one environment."""


def installed_wheels(site_dir: Path) -> list[str]:
    """Return the onnxruntime distributions (``name version``) whose metadata lies in ``site_dir``, sorted."""
    found: list[str] = []
    # one directory listing instead of importlib.metadata's scan of every path entry (0.5 ms vs 40-80 ms)
    for info in site_dir.glob("onnxruntime*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        name = name.lower().replace("_", "-").replace(".", "-")
        if name in EXTRAS:
            found.append(f"{name} {version}")
    return sorted(found)


def check_onnxruntime() -> None:
    """Raise OnnxRuntimeError unless exactly one onnxruntime wheel provides the module; import nothing."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):  # a parent import failed, or sys.modules holds a blocked (None) entry
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise OnnxRuntimeError(f"onnxruntime is not installed; {INSTALL_HINT}")
    site_dir = Path(next(iter(spec.submodule_search_locations))).parent
    wheels = installed_wheels(site_dir)
    if len(wheels) > 1:
        names = ", ".join(wheels)
        raise OnnxRuntimeError(
            f"several onnxruntime wheels are installed in {site_dir}: {names}. They all install the module "
            "`onnxruntime` and overwrite each other's files, which breaks every one of them. Uninstall all of "
            f"them (pip uninstall -y {' '.join(w.split()[0] for w in wheels)}), then {INSTALL_HINT}"
        )


def import_onnxruntime() -> ModuleType:
    """Import and return the onnxruntime module, or raise OnnxRuntimeError naming the extras to install."""
    check_onnxruntime()
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise OnnxRuntimeError(f"onnxruntime is installed but cannot be imported ({exc}); {INSTALL_HINT}") from exc
