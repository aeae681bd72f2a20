"""``residual_filter_v1``: a residual conv filter, degraded luma → clean luma (``clean = luma + net(luma)``).

Data: 32×32 crops of real scikit-image photographs degraded by additive Gaussian noise, Pillow JPEG, or
JPEG + noise (``common.degrade``; blur is left out, see ``KINDS``); the target is the pristine crop. Training crops and the
static-quantisation calibration set come from ``common.TRAIN_IMAGES``; the soak fixture comes from
``common.HELDOUT_IMAGES`` only.

Graph: Conv/Relu/Conv/Relu/Conv then Add with the input. Input ``luma`` [N,1,32,32], output ``clean``
[N,1,32,32]. The registry compares residuals (``quant_compare: residual``): PLCC over outputs is inflated by
the identity path.
"""

from __future__ import annotations

import numpy as np

from . import common

MODEL_ID = "residual_filter_v1"
PATCH = 32
INPUT_SHAPE = (1, PATCH, PATCH)  # one sample; the batch axis comes first
SEED = 20260302
N_TRAIN = 6000
N_CALIB = 128
N_SOAK = 320
EPOCHS = 12
LR = 1e-3
BATCH = 32
WIDTH = 24
# A 3-layer filter can undo noise and JPEG artefacts but barely blur; training on blur only adds label noise.
KINDS = ("noise", "jpeg", "jpeg+noise")


def build_model():
    """Return a fresh fp32 residual filter."""
    from torch import nn

    class ResidualFilter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, WIDTH, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(WIDTH, WIDTH, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(WIDTH, 1, 3, padding=1),
            )

        def forward(self, luma):
            return luma + self.body(luma)

    return ResidualFilter()


def datasets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{"train", "calib", "soak"}`` → ``(degraded [N,1,32,32], clean [N,1,32,32])``."""
    train_deg, train_clean = common.degraded_pairs(common.TRAIN_IMAGES, N_TRAIN + N_CALIB, PATCH, SEED, kinds=KINDS)
    soak_deg, soak_clean = common.degraded_pairs(common.HELDOUT_IMAGES, N_SOAK, PATCH, SEED + 1, kinds=KINDS)
    return {
        "train": (train_deg[:N_TRAIN, None], train_clean[:N_TRAIN, None]),
        "calib": (train_deg[N_TRAIN:, None], train_clean[N_TRAIN:, None]),
        "soak": (soak_deg[:, None], soak_clean[:, None]),
    }


def loss(prediction, target):
    """Mean squared error on pixels."""
    import torch.nn.functional as F

    return F.mse_loss(prediction, target)
