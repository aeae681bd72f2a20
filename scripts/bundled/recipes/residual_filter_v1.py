"""QAT recipe for ``residual_filter_v1`` (same protocol as ``model/recipes/nr_cnn_v1.py``).

Not named by the registry (``residual_filter_v1`` ships ``quant_mode: "static"``); ``scripts/quant_table.py``
passes it to ``pytest_quantgate.producers.qat.quantize_qat`` directly. Training pairs come from
``residual_filter.datasets()["train"]`` (``common.TRAIN_IMAGES`` only); ``calibration_data()`` returns the
``"calib"`` split — the same 128 patches as the registered static calibration set
``fixtures/residual_filter_v1.calib.npz`` — so the bridge's static step and static PTQ calibrate on identical data.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


_BUNDLED_DIR = Path(__file__).resolve().parents[1]  # scripts/bundled
_PKG = "_quantgate_bundled_scripts"  # the same private package name as model/recipes/nr_cnn_v1.py


def _bundled(module: str):
    if _PKG not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            _PKG, _BUNDLED_DIR / "__init__.py", submodule_search_locations=[str(_BUNDLED_DIR)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the bundled training scripts from {_BUNDLED_DIR}")
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[_PKG] = pkg
        spec.loader.exec_module(pkg)
    return importlib.import_module(f"{_PKG}.{module}")


class ResidualFilterRecipe:
    """Rebuilds ``residual_filter_v1`` and its (degraded, clean) training pairs for the QAT producer."""

    fp32_lr = 1e-3  # residual_filter.LR; QatConfig.lr_qat defaults to a tenth of it

    def __init__(self, n_train: int | None = None) -> None:
        self._n_train = n_train
        self._data = None

    def _datasets(self):
        if self._data is None:
            self._data = _bundled("residual_filter").datasets()
        return self._data

    def build_model(self):
        return _bundled("residual_filter").build_model()

    def load_fp32_weights(self, model, fp32_onnx: Path) -> None:
        from pytest_quantgate.producers.qat import load_onnx_initializers

        load_onnx_initializers(model, fp32_onnx)

    def training_data(self):
        x, y = self._datasets()["train"]
        return (x, y) if self._n_train is None else (x[: self._n_train], y[: self._n_train])

    def calibration_data(self):
        return self._datasets()["calib"][0]

    def loss(self, prediction, target):
        return _bundled("residual_filter").loss(prediction, target)

    def example_input(self):
        import torch

        return torch.zeros(2, 1, _bundled("residual_filter").PATCH, _bundled("residual_filter").PATCH)


recipe = ResidualFilterRecipe()
