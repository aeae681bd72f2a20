"""``fusion_mlp_v1`` / ``fusion_mlp_small_v1``: VMAF-like feature fusion, elementary quality features → score.

Choice (documented as the brief asks): like VMAF, a small regressor fuses cheap, elementary full-reference
features of a distorted patch into one quality score. VMAF fuses its features against human opinion scores;
no such scores ship offline, so the target here is the Gaussian-window SSIM of the distorted patch against
its pristine patch — a metric the eight cheap features below do *not* contain (none is SSIM or a local
statistic of it), so the network must learn a real non-linear fusion. Patches are 48×48 crops of real
scikit-image photographs degraded by blur, noise, JPEG or pairs (``common.degrade``). Training rows come
from ``common.TRAIN_IMAGES``; the soak fixture's rows from ``common.HELDOUT_IMAGES`` only.

Features (all roughly in [0, 1] or [-1, 1], so per-tensor dynamic int8 activations keep every feature):

0. PSNR / 60 dB (capped at 60 dB)
1. gradient-magnitude similarity mean (Sobel; GMSM, Xue et al. 2014)
2. tanh(log ratio of Laplacian energy distorted / reference) — blur (<0) vs noise (>0)
3. contrast ratio std(d) / std(r), capped at 2, halved
4. detail-loss correlation: PLCC of the Laplacians of d and r (VMAF's DLM in spirit)
5. blockiness: excess mean absolute step across 8-px block edges of d over r, ×10, clipped to [-1, 1]
6. mean luminance of the reference (luminance masking)
7. 4 × std of the reference, capped at 1 (contrast masking)

Graph: MatMul/Add/Relu ×2 then MatMul/Add (see ``build_model`` for why not Gemm). Input ``features`` [N,8], output ``score`` [N,1].
"""

from __future__ import annotations

import numpy as np

from . import common

MODEL_ID = "fusion_mlp_v1"
SMALL_ID = "fusion_mlp_small_v1"
PATCH = 48
SEED = 20260303
N_TRAIN = 8000
N_SOAK = 1200
N_FEATURES = 8
INPUT_SHAPE = (N_FEATURES,)  # one sample; the batch axis comes first
EPOCHS = 60
LR = 2e-3
BATCH = 64


def build_model(hidden: int = 64):
    """Return a fresh fp32 fusion MLP (``hidden < 32``: the small variant with one hidden layer).

    Layers are written as ``x @ W + b`` so the ONNX graph has MatMul + Add: onnxruntime's *dynamic*
    quantiser handles MatMul (MatMulInteger) but leaves Gemm in float, which would make a dynamic sidecar a
    no-op.
    """
    import torch
    from torch import nn

    class Dense(nn.Module):
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            bound = 1.0 / n_in**0.5
            self.weight = nn.Parameter(torch.empty(n_in, n_out).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(n_out).uniform_(-bound, bound))

        def forward(self, x):
            return torch.matmul(x, self.weight) + self.bias

    class FusionMlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if hidden >= 32:
                self.mlp = nn.Sequential(
                    Dense(N_FEATURES, hidden), nn.ReLU(), Dense(hidden, hidden), nn.ReLU(), Dense(hidden, 1)
                )
            else:
                self.mlp = nn.Sequential(Dense(N_FEATURES, hidden), nn.ReLU(), Dense(hidden, 1))

        def forward(self, features):
            return self.mlp(features)

    return FusionMlp()


def features(d: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Return the eight elementary features of distorted patch ``d`` against reference ``r`` (float32 [8])."""
    from scipy import ndimage

    d64, r64 = d.astype(np.float64), r.astype(np.float64)
    mse = float(np.mean((d64 - r64) ** 2))
    psnr = 60.0 if mse <= 1e-6 else min(60.0, 10.0 * np.log10(1.0 / mse))
    gr = np.hypot(ndimage.sobel(r64, 0), ndimage.sobel(r64, 1))
    gd = np.hypot(ndimage.sobel(d64, 0), ndimage.sobel(d64, 1))
    c = 0.0026 * 16  # GMSD constant scaled for [0,1] images and the unnormalised Sobel kernel
    gms = float(np.mean((2 * gr * gd + c) / (gr**2 + gd**2 + c)))
    lr_, ld = ndimage.laplace(r64), ndimage.laplace(d64)
    energy = float(np.tanh(np.log((ld.var() + 1e-6) / (lr_.var() + 1e-6))))
    contrast = min(2.0, (d64.std() + 1e-4) / (r64.std() + 1e-4)) / 2.0
    if lr_.std() < 1e-8 or ld.std() < 1e-8:
        dlm = 0.0
    else:
        dlm = float(np.corrcoef(lr_.ravel(), ld.ravel())[0, 1])

    def block_step(x: np.ndarray) -> float:
        h = np.abs(np.diff(x, axis=1))
        v = np.abs(np.diff(x, axis=0))
        edge = np.r_[h[:, 7::8].ravel(), v[7::8, :].ravel()].mean()
        inner = np.r_[h.ravel(), v.ravel()].mean()
        return float(edge - inner)

    block = float(np.clip(10.0 * (block_step(d64) - block_step(r64)), -1.0, 1.0))
    return np.array(
        [psnr / 60.0, gms, energy, contrast, dlm, block, r64.mean(), min(1.0, 4.0 * r64.std())], np.float32
    )


def _rows(names, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    deg, pristine = common.degraded_pairs(names, n, PATCH, seed)
    feats = np.stack([features(d, r) for d, r in zip(deg, pristine)])
    return feats, common.ssim_scores(deg, pristine)[:, None]


def training_data() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(features [8000,8], ssim [8000,1])`` from the training photographs."""
    return _rows(common.TRAIN_IMAGES, N_TRAIN, SEED)


def soak_data() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(features [1200,8], ssim [1200,1])`` from the held-out photographs."""
    return _rows(common.HELDOUT_IMAGES, N_SOAK, SEED + 1)


def loss(prediction, target):
    """Mean squared error on the SSIM score."""
    import torch.nn.functional as F

    return F.mse_loss(prediction, target)
