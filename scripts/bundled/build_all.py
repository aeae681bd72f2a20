"""Rebuild every bundled model, its int8 sidecar, its fixtures and ``model/registry.json``.

Run from the repository root: ``python -m scripts.bundled.build_all`` (or ``python scripts/bundled/build_all.py``).
Takes a few minutes on 2 CPU cores. Every step is seeded and torch runs deterministic single-threaded
kernels, so a rerun with the same library versions writes byte-identical ``.onnx`` / ``.npz`` files and the
same registry (provenance ``.int8.json`` files carry timestamps and durations, so they differ).

Models (see each module's docstring for data and targets):

=====================  ==========  ==========================================================
id                     quant_mode  sidecar producer
=====================  ==========  ==========================================================
fusion_mlp_v1          dynamic     ``pytest_quantgate.producers.ptq_dynamic.quantize_dynamic``
fusion_mlp_small_v1    fp32        none (the gate skips it)
residual_filter_v1     static      ``pytest_quantgate.producers.ptq_static.quantize_static``
nr_cnn_v1              qat         ``pytest_quantgate.producers.qat.quantize_qat`` (bridge route)
=====================  ==========  ==========================================================

``--check`` only re-measures the gate numbers of the files on disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``scripts.bundled`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "scripts.bundled"

from pytest_quantgate.fileio import atomic_write_text, sha256_file  # noqa: E402

from . import common, fusion_mlp, nr_cnn, residual_filter  # noqa: E402

NR_QAT_EPOCHS = 2
NR_QAT_SEED = 7


def _say(line: str) -> None:
    print(line, flush=True)


def build_fusion(timings: dict[str, float]) -> None:
    import torch

    from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic

    t0 = time.monotonic()
    x_tr, y_tr = fusion_mlp.training_data()
    x_soak, y_soak = fusion_mlp.soak_data()
    _say(f"[fusion] {len(x_tr)} training rows, {len(x_soak)} soak rows ({time.monotonic() - t0:.1f}s features)")
    for model_id, hidden in ((fusion_mlp.MODEL_ID, 64), (fusion_mlp.SMALL_ID, 16)):
        t = time.monotonic()
        common.seed_everything(fusion_mlp.SEED)
        model = fusion_mlp.build_model(hidden)
        common.train_model(model, x_tr, y_tr, fusion_mlp.loss, epochs=fusion_mlp.EPOCHS, lr=fusion_mlp.LR,
                           batch_size=fusion_mlp.BATCH, seed=fusion_mlp.SEED, log=lambda _l: None)
        common.export_onnx(model, torch.from_numpy(x_tr[:2]), common.MODEL_DIR / f"{model_id}.onnx", "features", "score")
        common.save_npz(common.FIXTURES_DIR / f"{model_id}.npz", features=x_soak, target=y_soak)
        timings[model_id] = time.monotonic() - t
        _say(f"[fusion] {model_id} trained in {timings[model_id]:.1f}s")
    quantize_dynamic(common.MODEL_DIR / "fusion_mlp_v1.onnx", common.MODEL_DIR / "fusion_mlp_v1.int8.onnx", DynamicConfig())


def build_residual(timings: dict[str, float]) -> None:
    import torch

    from pytest_quantgate.producers.ptq_static import StaticConfig, quantize_static

    t = time.monotonic()
    data = residual_filter.datasets()
    x_tr, y_tr = data["train"]
    common.seed_everything(residual_filter.SEED)
    model = residual_filter.build_model()
    common.train_model(model, x_tr, y_tr, residual_filter.loss, epochs=residual_filter.EPOCHS, lr=residual_filter.LR,
                       batch_size=residual_filter.BATCH, seed=residual_filter.SEED, log=_say)
    fp32 = common.MODEL_DIR / "residual_filter_v1.onnx"
    common.export_onnx(model, torch.from_numpy(x_tr[:2]), fp32, "luma", "clean")
    calib = common.FIXTURES_DIR / "residual_filter_v1.calib.npz"
    common.save_npz(calib, luma=data["calib"][0])
    common.save_npz(common.FIXTURES_DIR / "residual_filter_v1.npz", luma=data["soak"][0], target=data["soak"][1])
    timings["residual_filter_v1"] = time.monotonic() - t
    _say(f"[residual] trained in {timings['residual_filter_v1']:.1f}s")
    quantize_static(fp32, common.MODEL_DIR / "residual_filter_v1.int8.onnx", StaticConfig(calibration_set=calib))


def build_nr(timings: dict[str, float]) -> None:
    import torch

    from pytest_quantgate.producers.qat import QatConfig, quantize_qat

    t = time.monotonic()
    x_tr, y_tr = nr_cnn.training_data()
    x_soak, y_soak = nr_cnn.soak_data()
    common.seed_everything(nr_cnn.SEED)
    model = nr_cnn.build_model()
    nr_cnn.init_for_training(model, y_tr)
    common.train_model(model, x_tr, y_tr, nr_cnn.loss, epochs=nr_cnn.EPOCHS, lr=nr_cnn.LR, batch_size=nr_cnn.BATCH,
                       seed=nr_cnn.SEED, log=_say)
    fp32 = common.MODEL_DIR / "nr_cnn_v1.onnx"
    common.export_onnx(model, torch.from_numpy(x_tr[:2]), fp32, "luma", "score")
    common.save_npz(common.FIXTURES_DIR / "nr_cnn_v1.npz", luma=x_soak, target=y_soak)
    timings["nr_cnn_v1"] = time.monotonic() - t
    _say(f"[nr_cnn] fp32 trained in {timings['nr_cnn_v1']:.1f}s")
    t = time.monotonic()
    common.seed_everything(NR_QAT_SEED)
    result = quantize_qat(fp32, common.MODEL_DIR / "nr_cnn_v1.int8.onnx",
                          QatConfig(epochs_qat=NR_QAT_EPOCHS, lr_qat=nr_cnn.LR_QAT, seed=NR_QAT_SEED),
                          recipe=common.MODEL_DIR / "recipes" / "nr_cnn_v1.py", progress=_say)
    timings["nr_cnn_v1_qat"] = time.monotonic() - t
    _say(f"[nr_cnn] QAT {timings['nr_cnn_v1_qat']:.1f}s, losses {result.epoch_losses}, "
         f"L2 from fp32 {result.weight_l2_from_fp32:.4g}")


def registry_entries() -> list[dict]:
    return [
        {
            "id": "fusion_mlp_v1",
            "kind": "fusion_mlp",
            "description": "VMAF-like fusion MLP: 8 elementary full-reference features of a degraded real-photo "
                           "patch -> predicted SSIM (scripts/bundled/fusion_mlp.py)",
            "onnx": "fusion_mlp_v1.onnx",
            "quant_mode": "dynamic",
            # absolute budgets about 2x the measured healthy values (MAE 0.0050, max 0.022 in SSIM units)
            "quant_budget_mae": 0.01,
            "quant_budget_max_abs": 0.05,
        },
        {
            "id": "fusion_mlp_small_v1",
            "kind": "fusion_mlp",
            "description": "One-hidden-layer variant of fusion_mlp_v1, shipped fp32 only",
            "onnx": "fusion_mlp_small_v1.onnx",
            "quant_mode": "fp32",
        },
        {
            "id": "residual_filter_v1",
            "kind": "residual_filter",
            "description": "Residual conv filter: noisy/JPEG real-photo luma -> clean luma "
                           "(scripts/bundled/residual_filter.py)",
            "onnx": "residual_filter_v1.onnx",
            "quant_mode": "static",
            "quant_calibration_set": "residual_filter_v1.calib.npz",
            "quant_compare": "residual",
            # measured healthy: MAE 0.0015, max 0.040 (luma in [0, 1])
            "quant_budget_mae": 0.003,
            "quant_budget_max_abs": 0.08,
        },
        {
            "id": "nr_cnn_v1",
            "kind": "nr_cnn",
            "description": "No-reference CNN: degraded real-photo luma patch -> SSIM vs its pristine patch "
                           "(scripts/bundled/nr_cnn.py)",
            "onnx": "nr_cnn_v1.onnx",
            "quant_mode": "qat",
            "qat_recipe": "recipes/nr_cnn_v1.py",
            "quant_accuracy_budget_plcc": 0.002,
            # the QAT run build_all makes, so regeneration through the gate repeats it
            "quant_options": {"epochs_qat": NR_QAT_EPOCHS, "lr_qat": nr_cnn.LR_QAT, "seed": NR_QAT_SEED},
            # measured healthy: MAE 0.0134, max 0.064 (SSIM units)
            "quant_budget_mae": 0.03,
            "quant_budget_max_abs": 0.12,
        },
    ]


def write_registry() -> Path:
    models = []
    for entry in registry_entries():
        entry = dict(entry)
        fp32 = common.MODEL_DIR / entry["onnx"]
        if not fp32.is_file():
            _say(f"warning: {fp32} is missing; {entry['id']} left out of the registry")
            continue
        entry["sha256"] = sha256_file(fp32)
        if entry["quant_mode"] != "fp32":
            entry["int8_sha256"] = sha256_file(fp32.with_name(fp32.name[: -len(".onnx")] + ".int8.onnx"))
        models.append(entry)
    path = common.MODEL_DIR / "registry.json"
    atomic_write_text(path, json.dumps({"schema_version": 1, "models": models}, indent=2) + "\n")
    return path


def measure() -> dict[str, dict]:
    """Gate numbers of every non-fp32 sidecar on its soak fixture (PLCC drops, float64)."""
    report = {}
    for entry in registry_entries():
        if entry["quant_mode"] == "fp32":
            continue
        fp32 = common.MODEL_DIR / entry["onnx"]
        if not fp32.with_name(entry["id"] + ".int8.onnx").is_file():
            continue
        report[entry["id"]] = common.gate_drop(
            fp32, fp32.with_name(entry["id"] + ".int8.onnx"), common.FIXTURES_DIR / f"{entry['id']}.npz",
            compare=entry.get("quant_compare", "output"),
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only measure the files on disk")
    parser.add_argument("--only", choices=("fusion", "residual", "nr"), action="append",
                        help="rebuild only these models (repeatable); the registry is rewritten from disk")
    args = parser.parse_args(argv)
    timings: dict[str, float] = {}
    if not args.check:
        started = time.monotonic()
        only = set(args.only or ("fusion", "residual", "nr"))
        if "fusion" in only:
            build_fusion(timings)
        if "residual" in only:
            build_residual(timings)
        if "nr" in only:
            build_nr(timings)
        _say(f"wrote {write_registry()} ({time.monotonic() - started:.1f}s total)")
    budgets = {"dynamic": 0.01, "static": 0.01, "qat": 0.002}
    ok = True
    rep = measure()
    for entry in registry_entries():
        if entry["id"] not in rep:
            continue
        r = rep[entry["id"]]
        budget = entry.get("quant_accuracy_budget_plcc", budgets[entry["quant_mode"]])
        passed = r["with_target"] <= budget
        ok &= passed
        _say(f"{entry['id']:20s} {entry['quant_mode']:8s} drop(target) {r['with_target']:+.6f}  "
             f"1-PLCC(fp32,int8) {r['without_target']:.6f}  implied {r['implied']:.6f}  PLCC fp32/target {r['plcc_fp32_target']:.4f}  "
             f"budget {budget}  {'PASS' if passed else 'FAIL'}")
    size = sum(p.stat().st_size for d in (common.MODEL_DIR, common.FIXTURES_DIR) for p in d.rglob("*") if p.is_file())
    _say(f"model/ + fixtures/: {size / 1e6:.2f} MB")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
