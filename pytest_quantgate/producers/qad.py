"""QAD: quantisation-aware distillation, a QAT recipe wrapper that trains the student on the fp32 teacher's outputs.

Use it through :class:`pytest_quantgate.producers.qat.QatConfig` (``distill_weight`` and ``fold_bn``), so a
registry entry rebuilds a QAD sidecar with ``quant_mode: "qat"`` and ``quant_options: {"distill_weight": 1.0,
"fold_bn": true, ...}``. The wrapper changes three things of the user's recipe and nothing else:

* **teacher targets**: the frozen fp32 model (the recipe model with the registered fp32 weights, eval mode) is run
  once over the training inputs; the targets become ``[teacher output | task target]`` side by side, and the loss
  is ``w * MSE(student, teacher) + (1 - w) * recipe.loss(student, target)`` (``w = 1``: teacher only);
* **BatchNorm folded before prepare**: Conv+BatchNorm pairs inside ``nn.Sequential`` containers become one conv
  (``torch.nn.utils.fusion.fuse_conv_bn_eval``) in every model the producer builds, so fake quantisation sees the
  deployed conv weights and no BatchNorm statistics drift during the fine-tune;
* the learning rate is the producer's: ``lr_qat`` unset means the recipe's ``fp32_lr`` / 10.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

TEACHER_BATCH = 256


def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold every Conv followed by BatchNorm inside an ``nn.Sequential`` into the conv, in place; return the count."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    folded = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in itertools.pairwise(names):
            conv, norm = parent._modules[first], parent._modules[second]
            if isinstance(conv, convs) and isinstance(norm, norms):
                was_training = conv.training
                fused = fuse_conv_bn_eval(conv.eval(), norm.eval())
                fused.train(was_training)
                parent._modules[first] = fused
                parent._modules[second] = nn.Identity()
                folded += 1
    return folded


class DistillingRecipe:
    """A :class:`~pytest_quantgate.producers.base.QatRecipe` that distils from the fp32 teacher and folds BatchNorm.

    ``distill_weight=None`` keeps the recipe's own loss and targets (only BatchNorm folding, when ``fold_bn``).
    Optional members of the wrapped recipe (``fp32_lr``, ``calibration_data``) are passed through.
    """

    def __init__(self, inner: Any, fp32_path: Path, *, distill_weight: float | None, fold_bn: bool) -> None:
        self._inner = inner
        self._fp32_path = Path(fp32_path)
        self._weight = distill_weight
        self._fold = fold_bn
        self._target_shape: tuple[int, ...] = ()
        self._teacher_width = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def build_model(self) -> torch.nn.Module:
        """Return the recipe's model, with Conv+BatchNorm folded when asked (same structure the weights load into)."""
        model: torch.nn.Module = self._inner.build_model()
        if self._fold:
            fold_batchnorm(model)
        return model

    def _fp32_model(self) -> torch.nn.Module:
        """Return the recipe model with the registered fp32 weights, folded when asked, in eval mode."""
        model: torch.nn.Module = self._inner.build_model()
        self._inner.load_fp32_weights(model, self._fp32_path)
        model.eval()
        if self._fold:
            fold_batchnorm(model)
        return model

    def load_fp32_weights(self, model: torch.nn.Module, fp32_onnx: Path) -> None:
        """Load the fp32 weights through the recipe (into the unfolded model), fold, and copy into ``model``."""
        source = self._fp32_model() if Path(fp32_onnx) == self._fp32_path else None
        if source is None:
            source = self._inner.build_model()
            self._inner.load_fp32_weights(source, fp32_onnx)
            source.eval()
            if self._fold:
                fold_batchnorm(source)
        model.load_state_dict(source.state_dict(), strict=True)

    def training_data(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the recipe's inputs and, when distilling, ``[teacher output | task target]`` as targets."""
        x, y = self._inner.training_data()
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.ascontiguousarray(y, dtype=np.float32)
        if self._weight is None:
            return x, y
        import torch

        teacher = self._fp32_model()
        with torch.no_grad():
            outs = [teacher(torch.from_numpy(x[i:i + TEACHER_BATCH])).numpy() for i in range(0, len(x), TEACHER_BATCH)]
        taught = np.concatenate(outs).astype(np.float32).reshape(len(x), -1)
        self._teacher_width = taught.shape[1]
        self._target_shape = y.shape[1:]
        return x, np.ascontiguousarray(np.concatenate([taught, y.reshape(len(y), -1)], axis=1))

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the distillation loss (teacher MSE, mixed with the recipe's loss by the weight)."""
        if self._weight is None:
            result: torch.Tensor = self._inner.loss(prediction, target)
            return result
        import torch.nn.functional as F

        teacher = target[:, : self._teacher_width].reshape(prediction.shape)
        distill = F.mse_loss(prediction, teacher)
        if self._weight >= 1.0:
            return distill
        task_target = target[:, self._teacher_width:].reshape(len(target), *self._target_shape)
        task: torch.Tensor = self._inner.loss(prediction, task_target)
        return self._weight * distill + (1.0 - self._weight) * task

    def example_input(self) -> torch.Tensor:
        """Return the recipe's example batch."""
        example: torch.Tensor = self._inner.example_input()
        return example
