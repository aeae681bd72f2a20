"""``nr_cnn_v1``: a no-reference CNN that predicts SSIM of a degraded 32×32 luma patch from the patch alone.

Data: random 32×32 crops of real scikit-image photographs, each degraded by Gaussian blur, additive Gaussian
noise, Pillow JPEG, or a pair of them (``common.degrade``). Target: Gaussian-window SSIM of the degraded crop
against its pristine crop (``skimage.metrics.structural_similarity``) — a full-reference score the network
must infer blind. Training crops come from ``common.TRAIN_IMAGES``; the soak fixture comes from
``common.HELDOUT_IMAGES`` only.

Graph: Conv/Relu ×3 (two strided) → global average pool → Flatten → Gemm. Input ``luma`` [N,1,32,32],
output ``score`` [N,1]. Quantisation: QAT (``model/recipes/nr_cnn_v1.py`` drives
``pytest_quantgate.producers.qat``).

The QAT recipe loads this package by file path (under a private module name) and calls ``build_model``,
``training_data`` and ``loss``; keep their behaviour in step with the shipped ``nr_cnn_v1.onnx``.
"""

from __future__ import annotations

import numpy as np

from . import common

MODEL_ID = "nr_cnn_v1"
PATCH = 32
INPUT_SHAPE = (1, PATCH, PATCH)  # one sample; the batch axis comes first
SEED = 20260301
N_TRAIN = 8000
N_SOAK = 1024
EPOCHS = 12
LR = 2e-3
# QAT fine-tune LR used by build_all (measured: fp32 LR / 10 drifts the held-out PLCC by more than the 0.002 budget)
LR_QAT = 3e-5
BATCH = 64


def build_model():
    """Return a fresh fp32 ``nr_cnn_v1`` module (same parameter names as the exported ONNX initializers)."""
    from torch import nn

    class NrCnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.head = nn.Linear(32, 1)

        def forward(self, luma):
            return self.head(self.features(luma))

    return NrCnn()


def init_for_training(model, targets: np.ndarray) -> None:
    """Start-of-training init (measured: without it training sits on the predict-the-mean plateau).

    The first conv's weights are scaled ×8 (degradations are small luma deviations, so default-init features
    barely respond) and the head bias starts at the mean target.
    """
    import torch

    with torch.no_grad():
        model.features[0].weight.mul_(8.0)
        model.head.bias.fill_(float(np.mean(targets)))


def _dataset(names, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    deg, pristine = common.degraded_pairs(names, n, PATCH, seed)
    return deg[:, None].astype(np.float32), common.ssim_scores(deg, pristine)[:, None].astype(np.float32)


def training_data() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(luma [8000,1,32,32], ssim [8000,1])`` from the training photographs (deterministic)."""
    return _dataset(common.TRAIN_IMAGES, N_TRAIN, SEED)


def soak_data() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(luma [1024,1,32,32], ssim [1024,1])`` from the held-out photographs (deterministic)."""
    return _dataset(common.HELDOUT_IMAGES, N_SOAK, SEED + 1)


def loss(prediction, target):
    """Mean squared error on the SSIM score."""
    import torch.nn.functional as F

    return F.mse_loss(prediction, target)
