"""pytest-quantgate: a pytest plugin that gates int8 ONNX sidecars against their fp32 originals."""

from __future__ import annotations

__version__ = "0.1.0"
