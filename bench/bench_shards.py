"""Sharded soak sets: merge time and state size at 10 000 samples × 1024 channels; N = 2 shards against one run.

1. Merge: a synthetic output of 1024 channels × 8 elements per sample (float32, 10 000 samples, streamed in chunks
   of 64 as the gate does) folded by two shards (the second adopts the first chunk's shifts, as
   ``runner.shards.measure_part`` does); each writes its state file. Measured: reading both files, merging and
   deciding (what ``quantgate merge-shards`` does). Baseline: deciding the unsharded statistics, what every run
   pays at its end anyway. The size line compares both state files together with the outputs they summarise
   (fp32 and int8, float32): the state is per unit and channel, never per element.
2. Wall time: ``quantgate measure --shard 1/2`` and ``--shard 2/2`` as two processes at once, then
   ``quantgate merge-shards``, against one unsharded ``quantgate measure`` of the bundled registry (CPU EP).
   On a machine with two free cores the sharded wall time approaches half the run plus a process start-up and
   the merge; on a busy one it is what it is: read the table.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ENV, PYTHON, ROOT, Result, print_table

SAMPLES = 10_000
CHANNELS = 1024
ELEMENTS = 8  # per channel and sample
CHUNK = 64


def _collectors() -> tuple[object, list[object], object]:
    """Return (entry, plans, options) of one synthetic output, planned as the gate plans it."""
    from pytest_quantgate.engine.comparison import CompareOptions, plan_outputs
    from pytest_quantgate.io.registry import parse_registry
    from pytest_quantgate.io.soak import Fixture, TensorSpec

    raw = {"id": "wide", "onnx": "w.onnx", "quant_mode": "static", "sha256": "0" * 64, "int8_sha256": "1" * 64,
           "quant_calibration_set": "c.npz"}
    entry = parse_registry({"schema_version": 1, "models": [raw]}, Path("registry.json")).entries[0]
    fixture = Fixture(Path("soak.npz"), "0", {"x": np.zeros((SAMPLES, 1), np.float32)}, None)
    plans = plan_outputs(entry, fixture, (TensorSpec("x", "tensor(float)", ("N", 1)),),
                         (TensorSpec("y", "tensor(float)", ("N", CHANNELS, ELEMENTS)),))
    return entry, list(plans), CompareOptions()


def _chunk(start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(start)
    a = rng.normal(size=(count, CHANNELS, ELEMENTS)).astype(np.float32)
    return a, (a + rng.normal(0, 0.02, a.shape)).astype(np.float32)


def run_merge() -> list[Result]:
    """Return the merge-time and state-size lines."""
    from pytest_quantgate.engine.comparison import Collector
    from pytest_quantgate.runner import shards

    entry, plans, options = _collectors()
    x = np.zeros((CHUNK, 1), np.float32)

    def fold(c: Collector, lo: int, hi: int) -> None:
        for start in range(lo, hi, CHUNK):
            a, b = _chunk(start, min(CHUNK, hi - start))
            c.add(start, {"x": x[: a.shape[0]]}, None, {"y": a}, {"y": b})

    half = SAMPLES // 2 // CHUNK * CHUNK
    first = Collector(entry, plans, SAMPLES, 0, "soak.npz")
    fold(first, 0, half)
    second = Collector(entry, plans, SAMPLES, 0, "soak.npz")
    probe = Collector(entry, plans, SAMPLES, 0, "soak.npz")
    fold(probe, 0, CHUNK)
    second.adopt(probe)
    fold(second, half, SAMPLES)
    with tempfile.TemporaryDirectory(prefix="qg-bench-shards-") as tmp:
        paths = []
        for k, (c, lo, hi) in enumerate(((first, 0, half), (second, half, SAMPLES)), start=1):
            assert c.units is not None
            header, arrays = c.state(None if c.units.blocked else slice(lo, hi))
            path = Path(tmp) / f"part{k}.npz"
            shards.write_state(path, {"format": shards.FORMAT, "version": shards.VERSION, "collector": header},
                               arrays)
            paths.append(path)
        size = sum(p.stat().st_size for p in paths)

        def merge() -> float:
            begin = time.perf_counter()
            states = [shards.read_state(p) for p in paths]
            parts = [Collector.from_state(entry, plans, SAMPLES, 0, "soak.npz", s.header["collector"], s.arrays)
                     for s in states]
            parts[0].merge(parts[1]).decide("cpu", options)
            return time.perf_counter() - begin

        merged = first.merge(second)

        def decide() -> float:
            begin = time.perf_counter()
            merged.decide("cpu", options)
            return time.perf_counter() - begin

        merge(), decide()
        a = [merge() for _ in range(3)]
        b = [decide() for _ in range(3)]
    units = merged.unit_count
    outputs = SAMPLES * CHANNELS * ELEMENTS * 4 * 2
    m, d = statistics.median(a), statistics.median(b)
    return [
        Result(f"merge-shards, 2 states of {SAMPLES:,} samples × {CHANNELS} channels", m, d, m / d,
               "merge ≈ decide + reading", True,
               detail=f"read+merge+decide {[round(v, 3) for v in a]} s; decide alone {[round(v, 3) for v in b]} s; "
                      f"{units} units (hashed blocks past the cap)"),
        Result(f"shard state size, {SAMPLES:,} × {CHANNELS} channels (2 files)", size / (1 << 20),
               outputs / (1 << 20), size / outputs, "per unit and channel, never per element", True, unit="MiB",
               detail=f"{size:,} bytes of state vs {outputs:,} bytes of fp32+int8 outputs ({ELEMENTS} per channel)"),
    ]


def _measure(*args: str) -> list[str]:
    return [PYTHON, "-m", "pytest_quantgate.frontends.cli", *args]


def run_wall(reps: int = 3) -> Result:
    """Return the N = 2 sharded-then-merged wall time against one unsharded run."""
    registry = str(ROOT / "model" / "registry.json")
    common = [registry, "--fixtures", str(ROOT / "fixtures"), "--ep", "cpu", "--regen", "never"]
    sharded, whole = [], []
    with tempfile.TemporaryDirectory(prefix="qg-bench-shards-") as tmp:
        for rep in range(reps + 1):  # the first of each is a warm-up
            folder = Path(tmp) / f"states{rep}"
            begin = time.perf_counter()
            jobs = [subprocess.Popen(_measure("measure", *common, "--shard", f"{k}/2", "--shard-dir", str(folder)),
                                     env=ENV, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for k in (1, 2)]
            codes = [job.wait() for job in jobs]
            merge = subprocess.run(_measure("merge-shards", *map(str, sorted(folder.glob("*.npz")))), env=ENV,
                                   cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elapsed = time.perf_counter() - begin
            if codes != [0, 0] or merge.returncode not in (0, 1):
                raise RuntimeError(f"sharded run exited {codes} and merge {merge.returncode}")
            begin = time.perf_counter()
            one = subprocess.run(_measure("measure", *common), env=ENV, cwd=tmp, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            if one.returncode not in (0, 1):
                raise RuntimeError(f"unsharded run exited {one.returncode}")
            if rep:
                sharded.append(elapsed)
                whole.append(time.perf_counter() - begin)
    s, w = statistics.median(sharded), statistics.median(whole)
    return Result("N = 2 shards on two processes + merge vs one run (bundled, cpu)", s, w, s / w,
                  "< 1 with two free cores", s < w,
                  detail=f"sharded+merged {[round(v, 2) for v in sharded]} s; unsharded "
                         f"{[round(v, 2) for v in whole]} s")


def run(quick: bool = False) -> list[Result]:
    """Return every line of this benchmark."""
    return [*run_merge(), run_wall(1 if quick else 3)]


if __name__ == "__main__":
    print_table(run(quick="--quick" in sys.argv))
