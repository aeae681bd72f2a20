"""Shared helpers of the benchmarks: timed subprocesses, medians, temporary gate projects.

Every benchmark prints its own measured value, the baseline measured in the same run, their ratio and the target.
Nothing here asserts on wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# a bench must never rebuild a sidecar, and must not read the developer's pytest cache
# children import the package of this checkout (cwd is often a temporary project, where an editable install of
# another checkout would win)
ENV = {**os.environ, "CI": "true", "PYTHONDONTWRITEBYTECODE": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


@dataclass(frozen=True)
class Result:
    """One benchmark line: measured and baseline medians (seconds or a ratio), and the target."""

    name: str
    measured: float
    baseline: float
    ratio: float
    target: str
    met: bool
    unit: str = "s"
    detail: str = ""

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def timed(cmd: Sequence[str], cwd: Path, env: dict | None = None, check: bool = True) -> float:
    """Run ``cmd``; return its wall time in seconds (output swallowed; non-zero exit raises when ``check``)."""
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=cwd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if check and proc.returncode not in (0, 1):  # 1 = some gate item failed: still a full run
        tail = proc.stdout.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return elapsed


def median_of(fn: Callable[[], float], reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Return (median, all samples) of ``reps`` calls after ``warmup`` discarded calls."""
    for _ in range(warmup):
        fn()
    samples = [fn() for _ in range(reps)]
    return statistics.median(samples), samples


def interleaved(fa: Callable[[], float], fb: Callable[[], float], reps: int) -> tuple[list[float], list[float]]:
    """Alternate a and b ``reps`` times (one warm-up each), so drift hits both alike."""
    fa(), fb()
    a, b = [], []
    for _ in range(reps):
        a.append(fa())
        b.append(fb())
    return a, b


def gated_entries() -> list[dict]:
    """Return the bundled registry's gated entries (quant_mode other than fp32)."""
    data = json.loads((ROOT / "model" / "registry.json").read_text())
    return [m for m in data["models"] if m.get("quant_mode", "fp32") != "fp32"]


def make_project(dest: Path, copies: int = 1, entries: int | None = None, files: bool = True, repeat: int = 1) -> Path:
    """Write a gate project under ``dest``: model/registry.json and fixtures/ with the bundled gated entries.

    ``copies`` repeats every gated entry under new ids (files copied too, so ids never share a file);
    ``entries`` instead writes that many entries cycling over the bundled ones. ``files=False`` writes the
    registry alone (enough for --collect-only). ``repeat`` > 1 tiles each fixture's samples that many times, so
    an entry does as much work as one with a larger soak set. Returns the registry path.
    """
    model, fixtures = dest / "model", dest / "fixtures"
    model.mkdir(parents=True, exist_ok=True)
    fixtures.mkdir(parents=True, exist_ok=True)
    base = gated_entries()
    wanted = entries if entries is not None else copies * len(base)
    out = []
    for i in range(wanted):
        src = base[i % len(base)]
        new_id = f"{src['id']}_c{i // len(base)}"
        entry = dict(src, id=new_id, onnx=f"{new_id}.onnx")
        if files:
            shutil.copy(ROOT / "model" / src["onnx"], model / f"{new_id}.onnx")
            shutil.copy(ROOT / "model" / src["onnx"].replace(".onnx", ".int8.onnx"), model / f"{new_id}.int8.onnx")
            if repeat > 1:
                import numpy as np

                with np.load(ROOT / "fixtures" / f"{src['id']}.npz") as data:
                    tiled = {k: np.concatenate([data[k]] * repeat) for k in data.files}
                np.savez(fixtures / f"{new_id}.npz", **tiled)
            else:
                shutil.copy(ROOT / "fixtures" / f"{src['id']}.npz", fixtures / f"{new_id}.npz")
            if "quant_calibration_set" in src:
                shutil.copy(ROOT / "fixtures" / src["quant_calibration_set"], fixtures / src["quant_calibration_set"])
        if "qat_recipe" in entry:
            entry.pop("qat_recipe")  # never needed: the sidecar exists and CI=true forbids rebuilding
        out.append(entry)
    registry = model / "registry.json"
    registry.write_text(json.dumps({"schema_version": 1, "models": out}, indent=2))
    return registry


def pytest_cmd(*args: str) -> list[str]:
    return [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args]


def print_table(results: Sequence[Result]) -> None:
    head = ("benchmark", "measured", "baseline", "ratio", "target", "met?")
    rows = [head]
    for r in results:
        fmt = (lambda v: f"{v * 1000:.1f} ms") if r.unit == "s" else (lambda v: f"{v:.3f}")
        rows.append((r.name, fmt(r.measured), fmt(r.baseline), f"{r.ratio:.2f}", r.target, "yes" if r.met else "NO"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in results:
        if r.detail:
            print(f"{r.name}: {r.detail}")
