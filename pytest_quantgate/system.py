"""Describe the machine a verdict was measured on: int8 results differ across CPU generations."""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

# instruction-set extensions that change int8 kernels (VNNI/AMX give int8 dot products; AVX2/AVX-512 width)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
             "amx_tile", "asimd", "asimddp", "i8mm")


@lru_cache(maxsize=1)
def cpu() -> dict[str, Any]:
    """Return the CPU model and the int8-relevant ISA flags (Linux /proc/cpuinfo; best effort elsewhere)."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    return {"model": model, "isa": sorted(f for f in ISA_FLAGS if f in flags), "machine": platform.machine()}


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_saturates() -> bool:
    """Return True on an x86 CPU without VNNI: onnxruntime's default U8S8/S8S8 kernels saturate int16 sums there."""
    info = cpu()
    return info["machine"].lower() in ("x86_64", "amd64", "i686", "x86") and not set(VNNI_FLAGS) & set(info["isa"])


def describe() -> dict[str, Any]:
    """Return CPU, Python and time for a provenance record."""
    return {
        "cpu": cpu(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
