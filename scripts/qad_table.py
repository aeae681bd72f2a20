"""Plain QAT vs QAD (distillation from the fp32 teacher) on every gated bundled model, measured by the gate.

Run from the repository root: ``python scripts/qad_table.py [--out FILE] [--only ID]``. For each model of
``scripts/quant_table.py``'s ``PLANS`` it builds into a temporary folder (never touching ``model/``):

* **QAT**: ``QatConfig(epochs_qat=2, lr_qat=<plan's>, seed=7)``, the bridge route, recipe ``int8-x86`` -- the same
  settings ``quant_table.py`` uses;
* **QAD**: the same plus ``distill_weight=1.0`` (loss = MSE to the registered fp32 model's outputs) and
  ``fold_bn=True`` (no bundled model has BatchNorm, so folding changes nothing here);
* **QAD, default LR**: QAD with ``lr_qat`` unset, i.e. the recipe's fp32 training rate / 10.

Each sidecar is gated as ``quant_mode: "qat"`` (budget 0.002, the registered entry's other ``quant_*`` checks and
its soak fixture) through ``quantgate measure --ep cpu``. The markdown goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts import quant_table as qt
from scripts.bundled import common

VARIANTS = (
    ("QAT", {}),
    ("QAD", {"distill_weight": 1.0, "fold_bn": True}),
    ("QAD, lr = fp32 LR / 10", {"distill_weight": 1.0, "fold_bn": True, "lr_qat": None}),
)


def build(plan: qt.ModelPlan, entry: dict[str, Any], work: Path) -> tuple[qt.Built, dict[str, str]]:
    """Build the three sidecars of one model; return the Built record and each variant's error, if any."""
    from pytest_quantgate.producers.qat import QatConfig, quantize_qat

    fp32 = work / f"{plan.id}.onnx"
    shutil.copyfile(qt.REGISTRY.parent / entry["onnx"], fp32)
    built = qt.Built(plan.id, work, fp32.name, entry)
    errors: dict[str, str] = {}
    for label, extra in VARIANTS:
        options: dict[str, Any] = {"epochs_qat": qt.QAT_EPOCHS, "lr_qat": plan.lr_qat, "seed": qt.QAT_SEED, **extra}
        name = f"{plan.id}.{label.split(',')[0].lower()}{'-lr' if 'lr' in label else ''}.int8.onnx"
        started = time.monotonic()
        common.seed_everything(qt.QAT_SEED)
        try:
            result = quantize_qat(fp32, work / name, QatConfig(**options), recipe=plan.recipe)
        except Exception as exc:  # noqa: BLE001  (a producer that cannot take this model is a table row)
            errors[label] = qt._why(exc)
            continue
        built.files[label] = name
        built.seconds[label] = time.monotonic() - started
        losses = ", ".join(f"{v:.4g}" for v in result.epoch_losses)
        built.notes.append(f"{label}: lr_qat {result.lr_qat:g}, epoch losses {losses} "
                           f"({'teacher MSE' if 'distill_weight' in extra else 'task loss'}), "
                           f"weights moved {result.weight_l2_from_fp32:.4g} (L2), {built.seconds[label]:.1f}s")
        qt._say(f"[{plan.id}] {label} {built.seconds[label]:.1f}s")
    return built, errors


def _slug(label: str) -> str:
    """Return a registry-safe id part for a variant label."""
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def measure(builts: list[qt.Built], work: Path) -> dict[str, dict[str, Any]]:
    """Gate every sidecar as a qat entry; return the gate's JSON rows by entry id."""
    from pytest_quantgate.frontends import cli

    models = [qt._entry(work, b, f"{b.model}.{_slug(label)}", "qat", b.fp32, b.files[label], qt.BUDGETS["qat"])
              for b in builts for label, _ in VARIANTS if label in b.files]
    reg = work / "registry.json"
    reg.write_text(json.dumps({"schema_version": 1, "models": models}, indent=2) + "\n")
    out = work / "measure.json"
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        rc = cli.main(["measure", str(reg), "--fixtures", str(qt.FIXTURES), "--ep", "cpu", "--json", str(out)])
    if rc not in (0, 1, 2) or not out.is_file():
        sys.stderr.write(captured.getvalue())
        raise SystemExit(f"quantgate measure failed (exit {rc}); its output is above")
    for line in captured.getvalue().splitlines():
        if line.startswith("quantgate ERROR"):
            qt._say(line)
    return {item["id"]: qt.flat_row(item) for item in json.loads(out.read_text())}


def table(builts: list[qt.Built], errors: dict[str, dict[str, str]], rows: dict[str, dict[str, Any]]) -> str:
    """Return the markdown table and notes."""
    lines = ["| model | variant | PLCC drop (fp32-baseline vs int8) | interval | RMSE | budget | verdict |",
             "|---|---|---|---|---|---|---|"]
    for b in builts:
        for label, _ in VARIANTS:
            if label in errors.get(b.model, {}):
                lines.append(f"| {b.model} | {label} | n/a | n/a | n/a | 0.002 | NOT BUILT: {errors[b.model][label]} |")
                continue
            row = rows.get(f"{b.model}.{_slug(label)}")
            if row is None or row.get("drop") is None:
                reason = "no result" if row is None else str(row.get("reason", "")).replace("|", "\\|")
                lines.append(f"| {b.model} | {label} | n/a | n/a | n/a | 0.002 | ERROR: {reason} |")
                continue
            worst = max(row["outputs"], key=lambda o: o["drop"])
            ci = f"[{row['ci'][0]:.6f}, {row['ci'][1]:.6f}]" if row.get("ci") else "n/a"
            verdict = row["verdict"] if row["kind"] in ("pass", "drop") else f"{row['verdict']} ({row['kind']})"
            lines.append(f"| {b.model} | {label} | {row['drop']:.6f} | {ci} | {worst['vs_fp32']['rmse']:.5f} | 0.002 "
                         f"| {verdict} |")
    notes = [f"* {b.model}: {n}" for b in builts for n in b.notes]
    return "\n".join(["## QAT vs QAD on the bundled models (gate semantics, CPU EP)", "", *lines, "", "### Notes", "",
                      *notes]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, metavar="FILE")
    parser.add_argument("--only", action="append", choices=[p.id for p in qt.PLANS], default=None)
    args = parser.parse_args(argv)
    started = time.monotonic()
    registered = {e["id"]: e for e in json.loads(qt.REGISTRY.read_text())["models"]}
    with tempfile.TemporaryDirectory(prefix="qad-table-") as scratch:
        work = Path(scratch)
        builts, errors = [], {}
        for plan in qt.PLANS:
            if args.only and plan.id not in args.only:
                continue
            built, errs = build(plan, registered[plan.id], work)
            builts.append(built)
            errors[plan.id] = errs
        text = table(builts, errors, measure(builts, work))
    text += f"\nTotal wall time {time.monotonic() - started:.0f}s (`python scripts/qad_table.py`).\n"
    sys.stdout.write(text)
    if args.out is not None:
        from pytest_quantgate.fileio import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
