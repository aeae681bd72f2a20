"""What a sidecar's bytes depend on, and why a rebuilt sidecar differs from its pin.

Two kinds of producer:

- **byte-reproducible** (PTQ dynamic and static): the int8 bytes are a function of the fp32 model, the config,
  the calibration set and the library versions. Their provenance already holds all of these, and nothing
  machine-specific is added to it, so the same inputs give the same sha256 on every CPU.
- **kernel-dependent** (QAT and QAD: training): float rounding in torch's CPU kernels (ATen's dispatch level,
  oneDNN's ISA, MKL on Intel) moves the trained weights by an ulp here and there, so the bytes depend on which
  kernels ran. Such a sidecar records its :func:`kernel_environment` and the gate's verdict measured right
  after it was built (``build.gate``), inside its own provenance.

``quantgate pin`` copies the pinned sidecar's :func:`pinned_build` into the registry entry (``int8_build``), so
a later rebuild -- after the sidecar itself is gone -- can be compared with what was reviewed.
:func:`explain` says in one line why a rebuild differs from its pin; :func:`usable_without_review` applies
the rule docs/regeneration.md documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

# environment variables that change which float kernels torch runs (read, never set)
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                    "MKL_CBWR")

# CPU flags that oneDNN, MKL and ATen dispatch on (the width and the fused ops of their float kernels)
KERNEL_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl",
                "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
                "asimd", "sve")

Kind = Literal["no-record", "inputs", "libraries", "not-reproducible", "same-environment", "kernels"]


def torch_cpu_capability() -> str | None:
    """Return ATen's CPU dispatch level (``DEFAULT``, ``AVX2``, ``AVX512``...) when torch is already imported."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return None


def kernel_environment(*, threads: int, seed: int) -> dict[str, Any]:
    """Return everything that selects the float kernels a training producer ran, beside its seed and threads."""
    from ..system import cpu_flags

    vendor, flags = cpu_flags(KERNEL_FLAGS)
    return {
        "torch_cpu_capability": torch_cpu_capability(),
        "variables": {name: os.environ.get(name) for name in KERNEL_VARIABLES if os.environ.get(name)},
        "cpu_vendor": vendor,
        "cpu_flags": " ".join(flags),  # one string: the registry copy stays one line per key
        "threads": threads,
        "seed": seed,
    }


def build_block(*, threads: int, seed: int, gate: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the ``build`` block a kernel-dependent producer stores in its provenance."""
    return {"reproducible": "kernels", "environment": kernel_environment(threads=threads, seed=seed),
            "gate": None if gate is None else dict(gate)}


def _calibration_digest(record: Mapping[str, Any]) -> Any:
    calibration = record.get("calibration")
    return calibration.get("sha256") if isinstance(calibration, Mapping) else calibration


def inputs_digest(record: Mapping[str, Any]) -> str:
    """Return a digest of what the producer was asked to build from (fp32, config, recipe, calibration data)."""
    inputs = {key: record.get(key) for key in ("producer", "mode", "route", "config", "fp32_sha256", "recipe")}
    inputs["calibration"] = _calibration_digest(record)
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def pinned_build(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Return what ``quantgate pin`` stores as the entry's ``int8_build``, from a sidecar's provenance (or None)."""
    if not record or not record.get("producer"):
        return None
    build = record.get("build")
    kernels = isinstance(build, Mapping) and build.get("reproducible") == "kernels"
    pinned: dict[str, Any] = {
        "producer": record["producer"],
        "reproducible": "kernels" if kernels else "bytes",
        "inputs_sha256": inputs_digest(record),
        "libraries": dict(record.get("library_versions") or {}),
    }
    if kernels:
        assert isinstance(build, Mapping)
        pinned["environment"] = build.get("environment")
        pinned["gate"] = build.get("gate")
    return pinned


@dataclass(frozen=True)
class Difference:
    """Why a rebuilt sidecar's bytes differ from the pinned ones, in one line."""

    kind: Kind
    text: str

    @property
    def expected(self) -> bool:
        """Return True when the difference is one a training producer makes on other CPU kernels."""
        return self.kind == "kernels"


def _changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Return ``key old -> new`` for every key whose value differs (keys in either mapping)."""
    out = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old != new:
            out.append(f"{key} {_short(old)} -> {_short(new)}")
    return out


def _short(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return "[" + " ".join(str(v) for v in value) + "]"
    return str(value)


def _kernel_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Return the kernel-selecting differences between two environments, flags as added/removed."""
    changes = []
    for key in ("torch_cpu_capability", "cpu_vendor", "threads", "seed"):
        if before.get(key) != after.get(key):
            changes.append(f"{key} {_short(before.get(key))} -> {_short(after.get(key))}")
    changes += _changes(before.get("variables") or {}, after.get("variables") or {})
    old_flags = set(str(before.get("cpu_flags") or "").split())
    new_flags = set(str(after.get("cpu_flags") or "").split())
    if old_flags != new_flags:
        moved = [f"+{f}" for f in sorted(new_flags - old_flags)] + [f"-{f}" for f in sorted(old_flags - new_flags)]
        changes.append("cpu flags " + " ".join(moved))
    return changes


def explain(pinned: Mapping[str, Any] | None, rebuilt: Mapping[str, Any] | None) -> Difference:
    """Return why a rebuilt sidecar (its provenance ``rebuilt``) differs from the pinned build ``pinned``."""
    if not isinstance(pinned, Mapping) or not pinned.get("producer"):
        return Difference("no-record", "the registry holds no int8_build for the pinned sidecar (pinned by hand or "
                                       "before builds were recorded), so the cause is unknown")
    now = pinned_build(rebuilt)
    if now is None:
        return Difference("no-record", "the rebuilt sidecar has no provenance record")
    if now["inputs_sha256"] != pinned.get("inputs_sha256") or now["producer"] != pinned.get("producer"):
        return Difference("inputs", "built from other inputs (fp32 model, producer options, recipe or calibration "
                                    "data changed since the pin): a real change")
    libraries = _changes(pinned.get("libraries") or {}, now["libraries"])
    if libraries:
        return Difference("libraries", f"built with other libraries ({', '.join(libraries)}): new bytes are "
                                       f"expected, and so is a new review")
    if now["reproducible"] != "kernels":
        return Difference("not-reproducible", "same inputs and libraries, and this producer's bytes do not depend "
                                              "on the CPU: a real change (a non-deterministic build)")
    kernels = _kernel_changes(pinned.get("environment") or {}, (rebuilt or {}).get("build", {}).get("environment")
                              or {})
    if not kernels:
        return Difference("same-environment", "same inputs, libraries and CPU kernels as the pinned build: a real "
                                              "change (a non-deterministic build)")
    return Difference("kernels", f"other CPU kernels ({'; '.join(kernels)}): expected for a training producer "
                                 f"({now['producer']})")


def _interval_high(gate: Mapping[str, Any]) -> float | None:
    interval = gate.get("drop_interval")
    if isinstance(interval, list) and len(interval) == 2 and isinstance(interval[1], (int, float)):
        return float(interval[1])
    return None


def usable_without_review(difference: Difference, pinned: Mapping[str, Any] | None,
                          rebuilt: Mapping[str, Any] | None, gate_passed: bool) -> tuple[bool, str]:
    """Apply the regeneration rule; return (usable, the reason in one clause).

    A rebuilt sidecar that differs from its pin is used without review only when all hold: the only difference
    is the CPU kernels of a training producer; it passes the gate; both builds were gated at build time on the
    same soak fixture with the same statistics; and the rebuilt build's drop is within the pinned build's
    interval (not worse than what was reviewed, beyond the noise the reviewer saw).
    """
    if difference.kind == "no-record":
        return False, "without a record of both builds the difference cannot be explained"
    if not difference.expected:
        return False, "only a training producer rebuilt on other CPU kernels may differ from its pin without review"
    if not gate_passed:
        return False, "the rebuilt sidecar does not pass the gate"
    before = (pinned or {}).get("gate")
    after = ((rebuilt or {}).get("build") or {}).get("gate")
    if not isinstance(before, Mapping) or not isinstance(after, Mapping) or "drop" not in before \
            or "drop" not in after:
        return False, "the build-time drop of one of the two builds is not recorded"
    comparable = ("fixture_sha256", "samples", "bootstrap", "seed", "confidence")
    if any(before.get(k) != after.get(k) for k in comparable):
        return False, "the two builds were gated on other soak data or statistics, so their drops do not compare"
    high = _interval_high(before)
    drop = after.get("drop")
    if high is None or not isinstance(drop, (int, float)):
        return False, "the pinned build's drop interval is not recorded"
    if drop > high:
        return False, (f"its build-time drop {drop:.6f} is above the pinned build's interval (drop "
                       f"{before['drop']:.6f}, upper bound {high:.6f})")
    return True, (f"its build-time drop {drop:.6f} is within the pinned build's interval (drop {before['drop']:.6f}, "
                  f"upper bound {high:.6f})")
