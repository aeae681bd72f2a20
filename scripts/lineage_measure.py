"""Build healthy and broken sidecars of the bundled models and measure what ``check_lineage`` sees on each.

Run from the repository root: ``python -m scripts.lineage_measure [--quick] [--qat]``. The numbers it prints are the
ones ``pytest_quantgate.analysis.lineage.THRESHOLDS`` and docs/verdicts.md's "Lineage" section quote.

Cases, per bundled gated model (fp32 ``m.onnx``, healthy sidecar ``m.int8.onnx``):

* healthy: the bundled sidecar; fresh PTQ sidecars of other producer settings (per-channel / per-tensor,
  QOperator, uint8 weights) and a sidecar of the fine-tuned fp32 below (must pass too);
* stale ("older fp32"): the bundled sidecar gated against its fp32 fine-tuned ``k`` Adam steps at the model's own
  training LR on fresh training rows (the realistic case: the fp32 was retrained a bit, ``quantgate pin`` re-pinned
  both hashes, the old sidecar stayed);
* different model: the same architecture trained from another seed; another bundled architecture; the fp32 file
  named as its own sidecar.

The builders are also used by ``tests/test_lineage.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``scripts.bundled`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "scripts"

from scripts.bundled import common, fusion_mlp, nr_cnn, residual_filter

MODES = {"fusion_mlp_v1": "dynamic", "residual_filter_v1": "static", "nr_cnn_v1": "qat"}
NAMES = {"fusion_mlp_v1": ("features", "score"), "residual_filter_v1": ("luma", "clean"), "nr_cnn_v1": ("luma", "score")}
_MODULES: dict[str, Any] = {"fusion_mlp_v1": fusion_mlp, "residual_filter_v1": residual_filter, "nr_cnn_v1": nr_cnn}


def training_rows(model_id: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n`` fresh training rows (inputs, targets) of a bundled model, from the training photographs."""
    if model_id == "fusion_mlp_v1":
        deg, pristine = common.degraded_pairs(common.TRAIN_IMAGES, n, fusion_mlp.PATCH, seed)
        feats = np.stack([fusion_mlp.features(d, r) for d, r in zip(deg, pristine)])
        return feats, common.ssim_scores(deg, pristine)[:, None]
    if model_id == "residual_filter_v1":
        deg, clean = common.degraded_pairs(common.TRAIN_IMAGES, n, residual_filter.PATCH, seed,
                                           kinds=residual_filter.KINDS)
        return deg[:, None], clean[:, None]
    deg, pristine = common.degraded_pairs(common.TRAIN_IMAGES, n, nr_cnn.PATCH, seed)
    return deg[:, None], common.ssim_scores(deg, pristine)[:, None].astype(np.float32)


def _fresh(model_id: str) -> Any:
    module = _MODULES[model_id]
    return module.build_model(64) if model_id == "fusion_mlp_v1" else module.build_model()


def finetune(model_id: str, fp32: Path, out: Path, steps: int, seed: int = 1234, rows: int = 512) -> Path:
    """Write ``out``: the fp32 model fine-tuned ``steps`` Adam steps at its training LR on fresh training rows."""
    import torch

    from pytest_quantgate.producers.qat import load_onnx_initializers

    module = _MODULES[model_id]
    x, y = training_rows(model_id, rows, seed)
    common.seed_everything(seed)
    model = _fresh(model_id)
    load_onnx_initializers(model, fp32)
    opt = torch.optim.Adam(model.parameters(), lr=module.LR)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (module.BATCH,), generator=gen)
        loss = module.loss(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    common.export_onnx(model, xt[:2], out, *NAMES[model_id])
    return out


def retrain(model_id: str, out: Path, seed: int, epochs: int = 2, rows: int = 1024) -> Path:
    """Write ``out``: the same architecture trained from scratch with another seed (a different model)."""
    import torch

    module = _MODULES[model_id]
    x, y = training_rows(model_id, rows, seed)
    common.seed_everything(seed)
    model = _fresh(model_id)
    if model_id == "nr_cnn_v1":
        nr_cnn.init_for_training(model, y)
    common.train_model(model, x, y, module.loss, epochs=epochs, lr=module.LR, batch_size=module.BATCH, seed=seed,
                       log=lambda _line: None)
    common.export_onnx(model, torch.from_numpy(x[:2]), out, *NAMES[model_id])
    return out


def quantise(model_id: str, fp32: Path, out: Path, **options: Any) -> Path:
    """Write a PTQ sidecar of ``fp32`` with the project's producers (static: calibrated on fresh training rows)."""
    from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic
    from pytest_quantgate.producers.ptq_static import StaticConfig, quantize_static

    if options.pop("dynamic", False):
        quantize_dynamic(fp32, out, DynamicConfig(**options))
        return out
    x, _ = training_rows(model_id, 64, 99)
    calib = out.with_suffix(".calib.npz")
    common.save_npz(calib, **{NAMES[model_id][0]: x})
    quantize_static(fp32, out, StaticConfig(calibration_set=calib, **options))
    return out


def _row(label: str, fp32: Path, int8: Path, mode: str) -> dict[str, Any]:
    from pytest_quantgate.analysis.lineage import check_lineage

    t0 = time.perf_counter()
    rep = check_lineage(fp32, int8, mode)
    ms = (time.perf_counter() - t0) * 1000
    weights = [m for m in rep.matches if m.is_weight and m.fp32_name is not None]
    med_rms = statistics.median([m.step_rms for m in weights if m.step_rms is not None]) if weights else float("nan")
    corr_max = max((m.correlation for m in weights), default=float("nan"))
    print(f"{label:44s} {mode:8s} {'OK ' if rep.ok else 'REF'} matched {rep.weights_matched}/{rep.weights_total} "
          f"corr min/max {rep.min_correlation:.4f}/{corr_max:.4f} sqnr min/med {rep.min_sqnr_db:6.1f}/{rep.median_sqnr_db:6.1f} "
          f"steps max/med {rep.max_step_rms:6.3f}/{med_rms:6.3f} offgrid max {rep.max_off_grid:.3f} {ms:5.1f} ms",
          flush=True)
    if not rep.ok:
        print("      " + rep.reasons[0][:200], flush=True)
    return {"ok": rep.ok, "report": rep}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer fine-tune lengths")
    parser.add_argument("--qat", action="store_true", help="also run the QAT producer on a fine-tuned nr_cnn_v1")
    args = parser.parse_args(argv)
    models = common.MODEL_DIR
    steps = (1, 5, 25) if args.quick else (1, 2, 5, 10, 25, 100)
    with tempfile.TemporaryDirectory(prefix="lineage-") as tmp_name:
        tmp = Path(tmp_name)
        for model_id, mode in MODES.items():
            fp32, int8 = models / f"{model_id}.onnx", models / f"{model_id}.int8.onnx"
            print(f"== {model_id}", flush=True)
            _row("healthy bundled sidecar", fp32, int8, mode)
            _row("identical (fp32 as its own sidecar)", fp32, fp32, mode)
            for k in steps:
                tuned = finetune(model_id, fp32, tmp / f"{model_id}.ft{k}.onnx", k)
                _row(f"stale: fp32 fine-tuned {k} steps", tuned, int8, mode)
                if k == 25 and mode != "qat":
                    fresh = quantise(model_id, tuned, tmp / f"{model_id}.ft{k}.int8.onnx", dynamic=mode == "dynamic")
                    _row("healthy: sidecar of the fine-tuned fp32", tuned, fresh, mode)
            for seed in (1, 2):
                other = retrain(model_id, tmp / f"{model_id}.seed{seed}.onnx", seed)
                _row(f"different: retrained seed {seed}", other, int8, mode)
            if mode == "dynamic":
                for label, opts in (("per_channel", {"per_channel": True}), ("uint8 weights", {"weight_type": "uint8"}),
                                    ("reduce_range", {"reduce_range": True})):
                    out = quantise(model_id, fp32, tmp / f"{model_id}.{label}.int8.onnx", dynamic=True, **opts)
                    _row(f"healthy dynamic {label}", fp32, out, mode)
            else:
                for label, opts in (("per-tensor", {"per_channel": False}), ("qoperator", {"quant_format": "qoperator"}),
                                    ("uint8 weights", {"weight_type": "uint8"}), ("no preprocess",
                                                                                  {"preprocess": False})):
                    out = quantise(model_id, fp32, tmp / f"{model_id}.{label}.int8.onnx", **opts)
                    _row(f"healthy static {label}", fp32, out, "static")
        for fp32_id, int8_id in (("fusion_mlp_small_v1", "fusion_mlp_v1"), ("residual_filter_v1", "nr_cnn_v1"),
                                 ("nr_cnn_v1", "residual_filter_v1"), ("fusion_mlp_v1", "nr_cnn_v1")):
            _row(f"different: {fp32_id} fp32 vs {int8_id} int8", models / f"{fp32_id}.onnx",
                 models / f"{int8_id}.int8.onnx", MODES[int8_id])
        if args.qat:
            from pytest_quantgate.producers.qat import QatConfig, quantize_qat
            from scripts.bundled.build_all import NR_QAT_EPOCHS, NR_QAT_SEED

            tuned = finetune("nr_cnn_v1", models / "nr_cnn_v1.onnx", tmp / "nr.ft25.onnx", 25)
            out = tmp / "nr.ft25.int8.onnx"
            common.seed_everything(NR_QAT_SEED)
            quantize_qat(tuned, out, QatConfig(epochs_qat=NR_QAT_EPOCHS, lr_qat=nr_cnn.LR_QAT, seed=NR_QAT_SEED),
                         recipe=models / "recipes" / "nr_cnn_v1.py")
            _row("healthy: QAT sidecar of the fine-tuned fp32", tuned, out, "qat")
            _row("stale: that QAT sidecar vs the bundled fp32", models / "nr_cnn_v1.onnx", out, "qat")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
