"""Producers: the code that writes ``.int8.onnx`` sidecars (PTQ dynamic, PTQ static, QAT)."""

from __future__ import annotations
