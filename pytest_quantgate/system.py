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
def _cpuinfo() -> tuple[str, str, frozenset[str]]:
    """Return the CPU model, vendor and every flag of the first processor (Linux /proc/cpuinfo; best effort)."""
    model = platform.processor() or platform.machine()
    vendor = platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "vendor_id":
                vendor = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    return model, vendor, frozenset(flags)


def cpu() -> dict[str, Any]:
    """Return the CPU model and the int8-relevant ISA flags."""
    model, _, flags = _cpuinfo()
    return {"model": model, "isa": sorted(f for f in ISA_FLAGS if f in flags), "machine": platform.machine()}


def cpu_flags(names: tuple[str, ...]) -> tuple[str, list[str]]:
    """Return the CPU vendor and which of ``names`` its flags include, sorted."""
    _, vendor, flags = _cpuinfo()
    return vendor, sorted(f for f in names if f in flags)


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
