"""Memory against the sample count: hashed blocks past the cap vs per-sample rows, in the same run.

Three parts, each printed as measured (the gate as shipped: blocks past ``streaming.MAX_UNITS`` samples) against
the baseline (the per-sample path: the cap raised past the sample count, as every fixture was gated before):

- ``state``: a Collector fed 10^5 / 10^6 (/ 10^7 new path only) one-float samples in large chunks, in-process:
  wall time and tracemalloc peak;
- ``gate``: ``quantgate measure`` in a child on a generated archive of 8-float samples (an 8 → 16 → 1 MLP, its
  dynamic int8 sidecar at batch 1): wall time and VmHWM;
- ``realsize``: the interval of blocks (128 of them) vs per-sample rows on the real-size ``img`` (8×256×256) and
  ``det`` ([N, 12, 2100], judged whole) models of bench_realsize at 400 samples, 6 seeds each, from one pass
  through ORT.

Usage: ``python bench/bench_memory.py [--quick] [--full]`` (quick: 10^5 only and no real size; full: the gate
at 10^7 samples too, about five minutes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ENV, PYTHON, Result

PER_SAMPLE = 10**9  # a cap past any sample count: every sample keeps its own row (STATE_BYTES still applies)


def _entry() -> Any:
    from pytest_quantgate.io.registry import parse_registry

    raw = {"id": "bench", "onnx": "b.onnx", "quant_mode": "dynamic", "sha256": "0" * 64, "int8_sha256": "1" * 64}
    return parse_registry({"schema_version": 1, "models": [raw]}, Path("registry.json")).entries[0]


def _state(samples: int, cap: int | None) -> tuple[float, float, int, int]:
    """Return (wall s, traced peak MiB, state bytes, units) of a Collector fed ``samples`` one-float samples."""
    from pytest_quantgate.engine.comparison import Collector, CompareOptions, plan_outputs
    from pytest_quantgate.io.soak import Fixture, TensorSpec

    chunk = 1 << 16
    rng = np.random.default_rng(0)
    a = rng.normal(size=(chunk, 1)).astype(np.float32)
    b = (a + rng.normal(scale=0.05, size=a.shape)).astype(np.float32)
    entry = _entry()
    fixture = Fixture(Path("soak.npz"), "0", {"x": a}, None)
    plans = plan_outputs(entry, fixture, (TensorSpec("x", "tensor(float)", ("N", 1)),),
                         (TensorSpec("y", "tensor(float)", ("N", 1)),))
    started = time.perf_counter()
    tracemalloc.start()
    collector = Collector(entry, plans, samples, 0, "soak.npz", max_units=cap)
    for lo in range(0, samples, chunk):
        n = min(chunk, samples - lo)
        collector.add(lo, {"x": a[:n]}, None, {"y": a[:n]}, {"y": b[:n]})
    collector.decide("cpu", CompareOptions())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return time.perf_counter() - started, peak / 2**20, collector.state_bytes(), collector.unit_count


def run_state(sizes: tuple[int, ...], baseline_up_to: int = 10**6) -> list[Result]:
    _state(1000, None)  # imports (scipy.stats) and first calls, outside the traced runs
    results = []
    for samples in sizes:
        wall, peak, state, units = _state(samples, None)
        if samples <= baseline_up_to:
            base_wall, base_peak, base_state, _ = _state(samples, PER_SAMPLE)
        else:  # per-sample rows of 10^7 samples: ~1.4 GB of state and a bootstrap of 10^10 draws; not run
            base_wall = base_peak = base_state = float("nan")
        results.append(Result(f"state, {samples:.0e} samples: blocks vs per-sample, traced peak MiB", peak, base_peak,
                              peak / base_peak, "flat past 10^5", True, unit="MiB",
                              detail=f"{units} units, state {state / 2**20:.1f} MiB (per-sample "
                                     f"{base_state / 2**20:.1f} MiB); wall {wall:.2f} s vs {base_wall:.2f} s"))
    return results


def tiny_project(root: Path, samples: int, deploy_batch: int | None = None) -> Path:
    """An 8 → 16 → 1 MLP, its dynamic sidecar, ``samples`` deflated 8-float samples; return the registry.

    Also tests/test_memory.py's model: the values lie on a coarse grid, so the archive deflates as the issue's did
    (4.8 MB for 4 GiB). ``deploy_batch`` sets the entry's quant_deploy_batch (dynamic sidecars run at 1 otherwise).
    """
    import hashlib

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.5, (8, 16)), "b1": rng.normal(0, 0.1, 16), "w2": rng.normal(0, 0.3, (16, 1)),
               "b2": np.zeros(1)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, root / "tiny.onnx")
    quantize_dynamic(str(root / "tiny.onnx"), str(root / "tiny.int8.onnx"), weight_type=QuantType.QInt8)
    (root / "fixtures").mkdir()
    np.savez_compressed(root / "fixtures" / "tiny.npz",
                        x=rng.integers(-8, 8, size=(samples, 8)).astype(np.float32) / 4)
    entry = {"id": "tiny", "onnx": "tiny.onnx", "quant_mode": "dynamic",
             **({"quant_deploy_batch": deploy_batch} if deploy_batch is not None else {}),
             "quant_accuracy_budget_plcc": 0.05,
             **{key: hashlib.sha256((root / name).read_bytes()).hexdigest()
                for key, name in (("sha256", "tiny.onnx"), ("int8_sha256", "tiny.int8.onnx"))}}
    (root / "registry.json").write_text(json.dumps({"schema_version": 1, "models": [entry]}))
    return root / "registry.json"


def _gate(registry: Path, cap: int | None) -> tuple[float, float, dict[str, Any]]:
    """Return (wall s, VmHWM MiB, result) of ``quantgate measure`` in a child (``cap``: streaming.MAX_UNITS)."""
    out = registry.parent / "out.json"
    patch = f"from pytest_quantgate.engine import streaming; streaming.MAX_UNITS = {cap}; " if cap else ""
    code = (f"import sys; {patch}from pytest_quantgate.frontends.cli import main; "
            f"rc = main(['measure', {str(registry)!r}, '--fixtures', {str(registry.parent / 'fixtures')!r}, "
            f"'--ep', 'cpu', '--max-samples', '0', '--json', {str(out)!r}]); "
            f"print('VmHWM', next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]); "
            f"sys.exit(rc)")
    started = time.perf_counter()
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return wall, int(proc.stdout.split("VmHWM")[-1].split()[0]) / 1024, json.loads(out.read_text())[0]["result"]


def run_gate(sizes: tuple[int, ...], baseline_up_to: int = 10**6) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="qg-memory-") as tmp:
        for samples in sizes:
            registry = tiny_project(Path(tmp) / f"n{samples}", samples)
            wall, rss, result = _gate(registry, None)
            base_wall = base_rss = float("nan")
            base: dict[str, Any] = {}
            if samples <= baseline_up_to:
                base_wall, base_rss, base = _gate(registry, PER_SAMPLE)
            interval, base_interval = result["interval"], base.get("interval") or {}
            results.append(Result(f"gate, {samples:.0e} tiny samples: blocks vs per-sample, VmHWM MiB", rss, base_rss,
                                  rss / base_rss, "flat past 10^5", True, unit="MiB",
                                  detail=f"wall {wall:.1f} s vs {base_wall:.1f} s; interval "
                                         f"[{interval['low']:.4g}, {interval['high']:.4g}] vs "
                                         f"[{base_interval.get('low', float('nan')):.4g}, "
                                         f"{base_interval.get('high', float('nan')):.4g}]"))
    return results


def run_realsize(samples: int = 400, seeds: int = 6, blocks: int = 128) -> list[Result]:
    """Intervals of ``blocks`` blocks vs per-sample rows on the real-size models, one ORT pass, many collectors."""
    import dataclasses

    import bench_realsize

    from pytest_quantgate.engine.comparison import Collector, CompareOptions, plan_outputs
    from pytest_quantgate.runner.gate import _Clock, _run_chunk, prepare, run_batch
    from pytest_quantgate.io.registry import load_registry
    from pytest_quantgate.settings import Settings

    results = []
    with tempfile.TemporaryDirectory(prefix="qg-memory-real-") as tmp:
        root = Path(tmp)
        for name, builder, size, exclude in (("img", bench_realsize._img_model, 256, ()),
                                             ("det", bench_realsize._det_model, 160, ("Concat",))):
            _, registry_path = bench_realsize._project(root, name, builder, samples, size, exclude)
            if name == "det":
                # its sidecar's score channels collapse (drop 1.0 in every replicate, bench_realsize): judged whole,
                # the [N, 12, 2100] output has an interval to compare
                data = json.loads(registry_path.read_text())
                data["models"][0]["quant_channel_axis"] = None
                registry_path.write_text(json.dumps(data))
            registry = load_registry(registry_path)
            settings = Settings(enabled=True, registry=registry_path, fixtures_dir=root / "fixtures", eps=("cpu",),
                                regen="never")
            p = prepare(registry, registry.entry(name), "cpu", settings)
            plans = plan_outputs(p.entry, p.fixture, p.inputs, p.outputs)
            collectors = {(cap, seed): Collector(p.entry, plans, samples, seed, str(p.fixture.path), max_units=cap)
                          for cap in (None, blocks) for seed in range(seeds)}
            start, clock, batch = 0, _Clock(), run_batch(p)
            for block, target in p.fixture.chunks(16):
                fp32, int8 = _run_chunk(p, block, batch, clock)
                for collector in collectors.values():
                    collector.add(start, block, target, fp32, int8)
                start += int(next(iter(block.values())).shape[0])
            bounds: dict[int | None, np.ndarray] = {}
            for cap in (None, blocks):
                rows = []
                for seed in range(seeds):
                    r = collectors[(cap, seed)].decide("cpu", dataclasses.replace(CompareOptions(), seed=seed))
                    assert r.interval is not None
                    rows.append((r.interval.low, r.interval.high))
                bounds[cap] = np.array(rows)
            per, blk = bounds[None], bounds[blocks]
            se = np.sqrt(per.var(axis=0, ddof=1) / seeds + blk.var(axis=0, ddof=1) / seeds)
            gap = np.abs(blk.mean(axis=0) - per.mean(axis=0)) / np.where(se > 0, se, np.inf)
            results.append(Result(f"realsize {name}, {samples} samples: high bound, {blocks} blocks vs per-sample",
                                  float(blk[:, 1].mean()), float(per[:, 1].mean()),
                                  float(blk[:, 1].mean() / per[:, 1].mean()), "within 4 MC SE", bool((gap <= 4).all()),
                                  unit="drop",
                                  detail=f"low {blk[:, 0].mean():.6g} vs {per[:, 0].mean():.6g}, high "
                                         f"{blk[:, 1].mean():.6g} vs {per[:, 1].mean():.6g}; gaps {gap.round(2)} SE "
                                         f"({seeds} seeds each; per-run sd low {per[:, 0].std(ddof=1):.2g} / "
                                         f"{blk[:, 0].std(ddof=1):.2g}, high {per[:, 1].std(ddof=1):.2g} / "
                                         f"{blk[:, 1].std(ddof=1):.2g})"))
    return results


def run(quick: bool = False, full: bool = False) -> list[Result]:
    sizes = (10**5,) if quick else (10**5, 10**6)
    results = run_state((10**5,) if quick else (10**5, 10**6, 10**7))
    results += run_gate(sizes + ((10**7,) if full else ()))
    if not quick:
        results += run_realsize()
    return results


if __name__ == "__main__":
    from common import print_table

    print_table(run(quick="--quick" in sys.argv, full="--full" in sys.argv))
