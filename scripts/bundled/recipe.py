"""The QAT recipe protocol (``pytest_quantgate.producers.base.QatRecipe``) implemented once for the bundled models.

The recipe files (``model/recipes/nr_cnn_v1.py``, ``scripts/bundled/recipes/*.py``) load this file by path and
instantiate :class:`BundledRecipe`. It imports the training scripts of ``scripts/bundled/`` under a private package
name, so recipes import the same way from any working directory. Training data is regenerated deterministically
from ``common.TRAIN_IMAGES`` (never the held-out soak images).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

BUNDLED_DIR = Path(__file__).resolve().parent
PACKAGE = "_quantgate_bundled_scripts"


def bundled(module: str) -> Any:
    """Import ``scripts/bundled/<module>.py`` under the private package name."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, BUNDLED_DIR / "__init__.py", submodule_search_locations=[str(BUNDLED_DIR)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the bundled training scripts from {BUNDLED_DIR}")
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{module}")


class BundledRecipe:
    """Rebuild one bundled model and its training data for the QAT producer.

    ``module`` names the training script; it provides ``build_model``, ``loss``, ``LR`` and ``INPUT_SHAPE``, and
    either ``training_data()`` or, with ``split``, ``datasets()[split]``. ``calibration_split`` adds
    ``calibration_data()`` (the inputs of that split) so the bridge calibrates where static PTQ does.
    """

    def __init__(self, module: str, *, build_args: tuple[Any, ...] = (), split: str | None = None,
                 calibration_split: str | None = None, n_train: int | None = None) -> None:
        self._module = module
        self._build_args = build_args
        self._split = split
        self._n_train = n_train
        self._data: tuple[Any, Any] | None = None
        self._splits: dict[str, Any] | None = None
        self.fp32_lr = bundled(module).LR  # QatConfig.lr_qat defaults to a tenth of it
        if calibration_split is not None:
            self.calibration_data = lambda: self._datasets()[calibration_split][0]

    def _datasets(self) -> dict[str, Any]:
        if self._splits is None:
            self._splits = bundled(self._module).datasets()
        return self._splits

    def build_model(self) -> Any:
        return bundled(self._module).build_model(*self._build_args)

    def load_fp32_weights(self, model: Any, fp32_onnx: Path) -> None:
        from pytest_quantgate.producers.qat import load_onnx_initializers

        load_onnx_initializers(model, fp32_onnx)

    def training_data(self) -> tuple[Any, Any]:
        if self._data is None:
            x, y = self._datasets()[self._split] if self._split else bundled(self._module).training_data()
            self._data = (x, y) if self._n_train is None else (x[: self._n_train], y[: self._n_train])
        return self._data

    def loss(self, prediction: Any, target: Any) -> Any:
        return bundled(self._module).loss(prediction, target)

    def example_input(self) -> Any:
        import torch

        return torch.zeros(2, *bundled(self._module).INPUT_SHAPE)
