"""Sequential mode: the share of the fixture it runs on sidecars far from, near and over their budget.

For every bundled gated model and a large-output conv model built here (``tests/convkit.py``: 1×96×96 real photo
crops in, 8×96×96 maps out, an ORT static QDQ sidecar), the drop is measured once on the whole fixture; then
each sidecar is gated with three budgets around it: *far* (budget 4× the drop), *near* (the drop plus twice
the half-width of its fixed-sample 95% interval: that interval clears the budget, by its own half-width) and
*over* (budget half the drop). Measured: samples the sequential run (``--quantgate-sequential``) used; baseline:
the fixed-sample run of the same entry in the same process (the whole fixture); ratio: the share. Wall times of
both are in the detail line, with the verdicts (the fixed-sample run uses the point rule).
Usage: ``python bench/bench_sequential.py [--quick]``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import ROOT, Result, gated_entries, print_table

from pytest_quantgate.io.registry import load_registry
from pytest_quantgate.records import GateResult
from pytest_quantgate.runner.gate import run_one
from pytest_quantgate.settings import Settings

CASES = ("far", "near", "over")
TARGETS = {"far": 0.5, "near": 1.0, "over": 0.5}  # share of samples at most (near: no saving expected)


def _conv_entry(model: Path, fixtures: Path, samples: int) -> dict:
    """Build the large-output conv model, its static QDQ sidecar and its fixture; return its registry entry."""
    import convkit

    fp32 = convkit.conv_chain(model / "bigmap.onnx", layers=3, channels=8, size=96, out_channels=8)
    convkit.quantise_qdq(fp32, model / "bigmap.int8.onnx", convkit.photo_crops(8, 96, seed=1), per_channel=False)
    np.savez(fixtures / "bigmap.npz", image=convkit.photo_crops(samples, 96, seed=2))
    np.savez(fixtures / "bigmap_calib.npz", image=convkit.photo_crops(8, 96, seed=1))
    return {"id": "bigmap", "onnx": "bigmap.onnx", "quant_mode": "static", "quant_lineage": False,
            "quant_calibration_set": "bigmap_calib.npz"}


def _project(root: Path, quick: bool) -> tuple[Path, list[dict]]:
    """Write the models and fixtures; return the fixtures folder and the base entries (no budget yet)."""
    import modelkit

    model, fixtures = root / "model", root / "fixtures"
    model.mkdir(parents=True)
    fixtures.mkdir()
    entries = []
    for src in gated_entries():
        for suffix in ("", ".int8"):
            shutil.copy(ROOT / "model" / src["onnx"].replace(".onnx", f"{suffix}.onnx"), model)
        shutil.copy(ROOT / "fixtures" / f"{src['id']}.npz", fixtures)
        if "quant_calibration_set" in src:
            shutil.copy(ROOT / "fixtures" / src["quant_calibration_set"], fixtures)
        entry = {k: v for k, v in src.items() if k not in ("qat_recipe", "quant_accuracy_budget_plcc",
                                                           "quant_budget_relative")}
        entries.append(entry)
    entries.append(_conv_entry(model, fixtures, 256 if quick else 640))
    return fixtures, [modelkit.pin(e, model) for e in entries]


def _gate(root: Path, entries: list[dict], fixtures: Path, settings: Settings) -> dict[str, tuple[GateResult, float]]:
    """Gate every entry once; return each one's result and wall time."""
    path = root / "model" / "registry.json"
    path.write_text(json.dumps({"schema_version": 1, "models": entries}, indent=2))
    registry = load_registry(path)
    if registry.problems:
        raise RuntimeError("; ".join(p.message for p in registry.problems))
    out = {}
    for entry in registry.entries:
        if not entry.gated:
            continue
        start = time.perf_counter()
        outcome = run_one(registry, entry, "cpu", replace(settings, registry=path, fixtures_dir=fixtures))
        elapsed = time.perf_counter() - start
        if outcome.result is None:
            raise RuntimeError(f"{entry.id}: {outcome.status}: {outcome.message}")
        out[entry.id] = (outcome.result, elapsed)
    return out


def run(quick: bool = False) -> list[Result]:
    settings = Settings(enabled=True, eps=("cpu",), regen="never", diagnose="off", threads=1,
                        bootstrap=200 if quick else 1000)
    with tempfile.TemporaryDirectory(prefix="qg-bench-seq-") as tmp:
        root = Path(tmp)
        fixtures, base = _project(root, quick)
        probe = _gate(root, [dict(e, quant_accuracy_budget_plcc=1.0) for e in base], fixtures, settings)
        variants = []
        for entry in base:
            found = probe[entry["id"]][0]
            drop = max(found.drop or 0.0, 1e-6)
            half = (found.interval.high - found.interval.low) / 2 if found.interval is not None else drop
            budgets = {"far": 4.0 * drop, "near": drop + 2.0 * half, "over": 0.5 * drop}
            for case in CASES:
                variant = f"{entry['id']}-{case}"
                shutil.copy(fixtures / f"{entry['id']}.npz", fixtures / f"{variant}.npz")
                variants.append(dict(entry, id=variant, quant_accuracy_budget_plcc=float(f"{budgets[case]:.6g}")))
        fixed = _gate(root, variants, fixtures, settings)
        sequential = _gate(root, variants, fixtures, replace(settings, sequential=True))
    results = []
    for variant in sorted(fixed):
        (full, full_s), (seq, seq_s) = fixed[variant], sequential[variant]
        assert seq.sequential is not None
        used, planned = seq.sequential.samples_used, seq.sequential.samples_planned
        case = variant.rsplit("-", 1)[1]
        results.append(Result(
            f"sequential samples, {variant}", used, planned, used / planned, f"<= {TARGETS[case]:.0%} of samples",
            used / planned <= TARGETS[case], unit="samples",
            detail=(f"drop {full.drop:.5f} vs budget {full.budget:g}; fixed {full.verdict} in {full_s:.2f} s, "
                    f"sequential {seq.verdict} after {used}/{planned} samples ({seq.sequential.looks} looks) in "
                    f"{seq_s:.2f} s (x{seq_s / full_s:.2f})")))
    return results


if __name__ == "__main__":
    print_table(run(quick="--quick" in sys.argv))
