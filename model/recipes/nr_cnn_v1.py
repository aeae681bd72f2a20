"""QAT recipe for ``nr_cnn_v1`` (registry ``qat_recipe: "recipes/nr_cnn_v1.py"``).

Executed by ``pytest_quantgate.producers.qat.load_recipe`` (trusted, opt-in user code). It loads the bundled
training scripts in ``scripts/bundled/`` by file path under a private package name, so it imports the same
way from any working directory. Training data is regenerated deterministically from the scikit-image
photographs in ``common.TRAIN_IMAGES`` (never the held-out soak images).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_BUNDLED_DIR = Path(__file__).resolve().parents[2] / "scripts" / "bundled"
_PKG = "_quantgate_bundled_scripts"


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


class NrCnnRecipe:
    """Rebuilds ``nr_cnn_v1`` and its training data for the QAT producer."""

    fp32_lr = 2e-3  # peak LR of the fp32 training (nr_cnn.LR); QatConfig.lr_qat defaults to a tenth of it

    def __init__(self, n_train: int | None = None) -> None:
        self._n_train = n_train
        self._data = None

    def build_model(self):
        return _bundled("nr_cnn").build_model()

    def load_fp32_weights(self, model, fp32_onnx: Path) -> None:
        from pytest_quantgate.producers.qat import load_onnx_initializers

        load_onnx_initializers(model, fp32_onnx)

    def training_data(self):
        if self._data is None:
            x, y = _bundled("nr_cnn").training_data()
            self._data = (x, y) if self._n_train is None else (x[: self._n_train], y[: self._n_train])
        return self._data

    def loss(self, prediction, target):
        return _bundled("nr_cnn").loss(prediction, target)

    def example_input(self):
        import torch

        return torch.zeros(2, 1, 32, 32)


recipe = NrCnnRecipe()
