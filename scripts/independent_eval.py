"""Independent float64 evaluation of one registry entry, for cross-checking the gate's verdicts.

Usage::

    python -m scripts.independent_eval REGISTRY --id ID [--fixtures DIR] [--batch N] [--json PATH]

It shares no code with ``pytest_quantgate``: it reads the registry JSON itself (paths relative to the registry
folder first, then the fixtures folder, as docs/registry.md documents), ``np.load``s the soak fixture whole, runs fp32
and int8 with plain onnxruntime at the batch the gate uses (the model's fixed batch, else ``quant_deploy_batch``,
else 1 for ``dynamic`` sidecars, else ``--batch``), keeps every output whole, and evaluates the whole arrays in
float64 with the two-pass formulas and ``scipy.stats.pearsonr``, never with streamed one-pass sums as the gate
does. It costs O(output elements) of memory: a reference for fixtures that fit in RAM, not a gate.

The rules are docs/verdicts.md's, re-implemented from the text:

* float outputs: drop = 1 − PLCC(fp32, int8) over every element; with a fixture ``target`` on that output, the
  larger of PLCC(fp32, t) − PLCC(int8, t) and PLCC(fp32, t)·(1 − PLCC(fp32, int8)). Outputs of rank ≥ 3 are also
  judged per channel along ``quant_channel_axis`` (default 1, but not past 1024 channels on the default axis;
  null for none; a single channel is the whole):
  channels whose fp32 std is 0 or below (|mean| + std)/256 are not judged, an int8 channel with an undefined PLCC
  counts 1, and the output's drop is the larger of the whole-output and the worst judged channel's. NaN/inf or a
  constant output fails; ``quant_compare: residual`` subtracts the input first; the affine fit of int8 on fp32
  must keep |slope − 1| and |offset at the mean|/std within ``quant_budget_slope`` (0.1); ``quant_budget_mae`` /
  ``quant_budget_max_abs``.
* integer and boolean outputs (and ``quant_argmax_axis`` on float outputs): the share of elements that differ,
  against ``quant_budget_label_flip`` (0.01).

The verdict is the worst output's drop against ``quant_accuracy_budget_plcc`` (0.01, 0.002 for ``qat``) plus the
other budgets. Exit 0 pass, 1 fail, 2 error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_BUDGET = {"qat": 0.002}
DEFAULT_SLOPE = 0.1
DEFAULT_MAX_CHANNELS = 1024  # the default channel axis splits no more channels than this
DEFAULT_LABEL_FLIP = 0.01


@dataclass(frozen=True)
class Paths:
    """The files of one entry."""

    fp32: Path
    int8: Path
    fixture: Path


def entry_paths(registry: Path, fixtures: Path, entry: dict[str, Any]) -> Paths:
    """Resolve the fp32 model, the sidecar and the soak fixture as docs/registry.md says."""
    base = registry.parent
    fp32 = base / entry["onnx"]
    int8 = base / entry["int8_onnx"] if "int8_onnx" in entry else fp32.with_name(fp32.stem + ".int8.onnx")
    rel = entry.get("soak_fixture", f"{entry['id']}.npz")
    fixture = base / rel if "soak_fixture" in entry and (base / rel).is_file() else fixtures / rel
    return Paths(fp32, int8, fixture)


def plcc(x: np.ndarray, y: np.ndarray) -> float:
    """Return Pearson's r of two arrays in float64 (scipy), NaN when either is constant."""
    from scipy import stats

    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.pearsonr(x, y).statistic)


def channel_drops(ref: np.ndarray, test: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (1 − PLCC per channel, judged mask) along ``axis``, two-pass float64."""
    a = np.moveaxis(np.asarray(ref, np.float64), axis, 1)
    b = np.moveaxis(np.asarray(test, np.float64), axis, 1)
    a = a.reshape(a.shape[0], a.shape[1], -1)
    b = b.reshape(b.shape[0], b.shape[1], -1)
    mean_a = a.mean(axis=(0, 2))
    std_a = a.std(axis=(0, 2))
    da = a - mean_a[None, :, None]
    db = b - b.mean(axis=(0, 2))[None, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (da * db).sum(axis=(0, 2)) / np.sqrt((da * da).sum(axis=(0, 2)) * (db * db).sum(axis=(0, 2)))
    drops = np.where(np.isfinite(r), 1.0 - r, 1.0)
    mask = (std_a > 0) & (std_a >= (np.abs(mean_a) + std_a) / 256.0)
    return drops, mask


def run_batch(sessions: list[Any], entry: dict[str, Any], batch: int) -> int:
    """Return the batch the gate runs this entry at."""
    fixed = {i.shape[0] for s in sessions for i in s.get_inputs() if isinstance(i.shape[0], int) and i.shape[0] > 0}
    if fixed:
        return int(fixed.pop())
    if "quant_deploy_batch" in entry:
        return int(entry["quant_deploy_batch"])
    return 1 if entry.get("quant_mode") == "dynamic" else batch


def infer(paths: Paths, entry: dict[str, Any], batch: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]],
                                                                    np.ndarray | None, int]:
    """Run both models over the whole fixture; return (inputs, [fp32 outputs, int8 outputs], target, batch)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # exact int8 sums on x86 CPUs without VNNI, as the gate runs by default (--quantgate-int8-precision exact)
    opts.add_session_config_entry("session.x64quantprecision", "1")
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for p in (paths.fp32, paths.int8)]
    names = [i.name for i in sessions[0].get_inputs()]
    with np.load(paths.fixture, allow_pickle=False) as npz:
        missing = [n for n in names if n not in npz.files]
        if missing:
            raise KeyError(f"{paths.fixture}: no array for model input(s) {missing}; it has {sorted(npz.files)}")
        inputs = {n: np.asarray(npz[n]) for n in names}
        target = np.asarray(npz["target"]) if "target" in npz.files else None
    step = run_batch(sessions, entry, batch)
    samples = next(iter(inputs.values())).shape[0]
    fixed = any(isinstance(i.shape[0], int) and i.shape[0] > 0 for i in sessions[0].get_inputs())
    if fixed and samples % step:
        raise ValueError(f"{paths.fixture}: {samples} samples do not fill batches of the model's fixed {step}")
    outs: list[dict[str, np.ndarray]] = []
    for sess in sessions:
        parts: dict[str, list[np.ndarray]] = {o.name: [] for o in sess.get_outputs()}
        for start in range(0, samples, step):
            result = sess.run(list(parts), {n: v[start:start + step] for n, v in inputs.items()})
            for name, value in zip(parts, result):
                parts[name].append(np.asarray(value))
        outs.append({name: np.concatenate(v) for name, v in parts.items()})
    return inputs, outs, target, step


def evaluate(registry: Path, entry_id: str, fixtures: Path, batch: int = 256) -> dict[str, Any]:
    """Evaluate one entry from scratch; return a JSON-ready report."""
    data = json.loads(registry.read_text())
    matches = [e for e in data["models"] if e["id"] == entry_id]
    if len(matches) != 1:
        raise KeyError(f"{registry}: {len(matches)} entries have id {entry_id!r}")
    entry = matches[0]
    paths = entry_paths(registry, fixtures, entry)
    inputs, (ref_all, test_all), target, step = infer(paths, entry, batch)
    mode = entry.get("quant_mode", "fp32")
    budget = float(entry.get("quant_accuracy_budget_plcc", DEFAULT_BUDGET.get(mode, 0.01)))
    slope_budget = float(entry.get("quant_budget_slope", DEFAULT_SLOPE))
    flip_budget = float(entry.get("quant_budget_label_flip", DEFAULT_LABEL_FLIP))
    axis = entry.get("quant_channel_axis", 1)  # an explicit null means whole outputs only
    argmax_axis = entry.get("quant_argmax_axis")
    target_out = entry.get("quant_target_output", next(iter(ref_all)) if len(ref_all) == 1 else None)
    residual = entry.get("quant_compare") == "residual"
    res_in = entry.get("quant_residual_input", next(iter(inputs)))
    samples = next(iter(ref_all.values())).shape[0]
    report: dict[str, Any] = {"id": entry["id"], "fixture": str(paths.fixture), "samples": samples, "batch": step,
                              "outputs": {}}
    breaches: list[str] = []
    worst = 0.0
    for name, ref_raw in ref_all.items():
        test_raw = test_all[name]
        flips: list[float] = []
        if ref_raw.dtype.kind in "iub":
            flips.append(float(np.mean(ref_raw != test_raw)))
        elif argmax_axis is not None:
            flips.append(float(np.mean(ref_raw.argmax(axis=argmax_axis) != test_raw.argmax(axis=argmax_axis))))
        out: dict[str, Any] = {"shape": list(ref_raw.shape)}
        report["outputs"][name] = out
        if flips:
            out["label_flip_rate"] = flips[0]
            if flips[0] > flip_budget:
                breaches.append(f"{name}: label flip rate {flips[0]:.6f} > {flip_budget:g}")
        if ref_raw.dtype.kind in "iub":
            continue
        ref = ref_raw.astype(np.float64)
        test = test_raw.astype(np.float64)
        bad = int(np.count_nonzero(~np.isfinite(ref)) + np.count_nonzero(~np.isfinite(test)))
        if bad:
            out["nonfinite"] = bad
            breaches.append(f"{name}: {bad} non-finite values")
            continue
        t = None if target is None or name != target_out else target.astype(np.float64).reshape(ref.shape)
        if residual:
            base = inputs[res_in].astype(np.float64)[:samples].reshape(ref.shape)
            ref, test = ref - base, test - base
            t = None if t is None else t - base
        if np.ptp(ref) == 0 or np.ptp(test) == 0:
            out["constant"] = True
            breaches.append(f"{name}: constant output")
            continue
        r = plcc(ref, test)
        drop = 1.0 - r
        out.update(plcc=r, whole_drop=drop)
        if t is not None:
            pr, pt = plcc(ref, t), plcc(test, t)
            drop = max(pr - pt, pr * (1.0 - r))
            out.update(plcc_fp32_target=pr, plcc_int8_target=pt)
        default_too_wide = "quant_channel_axis" not in entry and ref.ndim >= 3 and ref.shape[1] > DEFAULT_MAX_CHANNELS
        if axis is not None and not default_too_wide and ref.ndim >= 3 and ref.shape[int(axis)] > 1:
            drops, mask = channel_drops(ref, test, int(axis))
            judged = np.where(mask, drops, -np.inf)
            k = int(np.argmax(judged))
            out.update(channels=int(drops.size), judged_channels=int(mask.sum()), worst_channel=k,
                       worst_channel_drop=float(judged[k]))
            if mask.any():
                drop = max(drop, float(judged[k]))
        diff = np.abs(test - ref)
        ma, sa = float(ref.mean()), float(ref.std())
        slope = float(np.mean((ref - ma) * (test - test.mean())) / (sa * sa))
        offset = float(test.mean() - slope * ma + (slope - 1.0) * ma)
        out.update(drop=drop, mae=float(diff.mean()), max_abs=float(diff.max()), slope=slope,
                   offset_rel=abs(offset) / sa)
        worst = max(worst, drop)
        if abs(slope - 1.0) > slope_budget or abs(offset) / sa > slope_budget:
            breaches.append(f"{name}: affine slope {slope:.4f}, offset {abs(offset) / sa:.4f} std")
        if "quant_budget_mae" in entry and out["mae"] > entry["quant_budget_mae"]:
            breaches.append(f"{name}: MAE {out['mae']:.6g} > {entry['quant_budget_mae']}")
        if "quant_budget_max_abs" in entry and out["max_abs"] > entry["quant_budget_max_abs"]:
            breaches.append(f"{name}: max |Δ| {out['max_abs']:.6g} > {entry['quant_budget_max_abs']}")
    if worst > budget:
        breaches.insert(0, f"PLCC drop {worst:.6f} > budget {budget:g}")
    report.update(drop=worst, budget=budget, verdict="FAIL" if breaches else "PASS", breaches=breaches)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("registry", type=Path)
    parser.add_argument("--id", required=True, help="entry id")
    parser.add_argument("--fixtures", type=Path, default=Path("fixtures"))
    parser.add_argument("--batch", type=int, default=256, help="batch for static/QAT sidecars (the gate's chunks)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = evaluate(args.registry, args.id, args.fixtures, args.batch)
    except (OSError, KeyError, ValueError) as exc:
        print(f"independent_eval: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if report["verdict"] == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
