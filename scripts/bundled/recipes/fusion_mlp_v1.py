"""QAT recipe for ``fusion_mlp_v1`` (same protocol as ``model/recipes/nr_cnn_v1.py``).

Not named by the registry (``fusion_mlp_v1`` ships ``quant_mode: "dynamic"``); ``scripts/quant_table.py`` passes
it to ``pytest_quantgate.producers.qat.quantize_qat`` directly, which takes a recipe object or any file path —
the registry's "recipe must live inside the registry folder" rule only applies when the gate resolves an
entry's ``qat_recipe`` field. Training data is regenerated deterministically from ``common.TRAIN_IMAGES``
(never the held-out soak images). The model is the 64-wide, two-hidden-layer variant
(``fusion_mlp.build_model(64)``); parameter names match the fp32 ONNX initializers (``mlp.0.weight`` ...).
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


class FusionMlpRecipe:
    """Rebuilds ``fusion_mlp_v1`` (hidden 64) and its training rows for the QAT producer."""

    fp32_lr = 2e-3  # fusion_mlp.LR; QatConfig.lr_qat defaults to a tenth of it

    def __init__(self, hidden: int = 64, n_train: int | None = None) -> None:
        self._hidden = hidden
        self._n_train = n_train
        self._data = None

    def build_model(self):
        return _bundled("fusion_mlp").build_model(self._hidden)

    def load_fp32_weights(self, model, fp32_onnx: Path) -> None:
        from pytest_quantgate.producers.qat import load_onnx_initializers

        load_onnx_initializers(model, fp32_onnx)

    def training_data(self):
        if self._data is None:
            x, y = _bundled("fusion_mlp").training_data()
            self._data = (x, y) if self._n_train is None else (x[: self._n_train], y[: self._n_train])
        return self._data

    def loss(self, prediction, target):
        return _bundled("fusion_mlp").loss(prediction, target)

    def example_input(self):
        import torch

        return torch.zeros(2, _bundled("fusion_mlp").N_FEATURES)


recipe = FusionMlpRecipe()
