"""Shared pieces of the bundled training scripts: seeding, real-image patches, degradations, export, metrics.

Every random draw goes through a ``numpy.random.Generator`` or a ``torch.Generator`` seeded by the caller, and
``seed_everything`` pins torch to deterministic single-threaded kernels, so a rebuild on the same library
versions writes the same bytes.

Train / held-out split is by *image*: patches for training and calibration come only from ``TRAIN_IMAGES``;
soak fixtures come only from ``HELDOUT_IMAGES``. No image is in both lists (checked at import).
"""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "model"
FIXTURES_DIR = REPO_ROOT / "fixtures"
OPSET = 17

# Real photographs bundled in the scikit-image wheel (all load offline; checked with scikit-image 0.26).
TRAIN_IMAGES: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "brick", "grass",
    "immunohistochemistry", "hubble_deep_field", "page", "retina",
)
HELDOUT_IMAGES: tuple[str, ...] = ("camera", "moon", "gravel", "coins", "text", "cell", "clock")
assert not set(TRAIN_IMAGES) & set(HELDOUT_IMAGES), "train and held-out images must be disjoint"

DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "jpeg", "blur+noise", "jpeg+noise")


def seed_everything(seed: int, threads: int = 1) -> None:
    """Seed python, numpy and torch, and pin torch to deterministic kernels on ``threads`` threads."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def load_luma(name: str) -> np.ndarray:
    """Return one scikit-image sample photograph as float32 luma in [0, 1] (BT.601 weights for colour)."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 3:
        rgb = img[..., :3].astype(np.float64) / 255.0
        luma = rgb @ np.array([0.299, 0.587, 0.114])
    else:
        luma = img.astype(np.float64) / (255.0 if img.dtype == np.uint8 else 1.0)
    return np.clip(luma, 0.0, 1.0).astype(np.float32)


def sample_patches(
    names: Sequence[str], n: int, size: int, rng: np.random.Generator, min_std: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` random ``size``×``size`` crops, round-robin over ``names``; skip near-flat crops.

    Returns ``(patches [n, size, size] float32, image index [n] int64)``.
    """
    images = [load_luma(name) for name in names]
    out = np.empty((n, size, size), np.float32)
    src = np.empty(n, np.int64)
    i = 0
    while i < n:
        k = i % len(images)
        img = images[k]
        y = int(rng.integers(0, img.shape[0] - size + 1))
        x = int(rng.integers(0, img.shape[1] - size + 1))
        crop = img[y : y + size, x : x + size]
        if crop.std() < min_std:
            continue
        out[i] = crop
        src[i] = k
        i += 1
    return out, src


def _jpeg(patch: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(patch * 255.0).astype(np.uint8), mode="L").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf), dtype=np.float32) / 255.0


def degrade(patch: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """Apply one real degradation (Gaussian blur, additive Gaussian noise, Pillow JPEG, or a pair) to a patch."""
    from scipy.ndimage import gaussian_filter

    kind = kind or DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
    out = patch.astype(np.float32)
    if "blur" in kind:
        out = gaussian_filter(out, sigma=float(rng.uniform(0.4, 2.5)), mode="reflect").astype(np.float32)
    if "jpeg" in kind:
        out = _jpeg(np.clip(out, 0, 1), int(rng.integers(5, 70)))
    if "noise" in kind:
        sigma = float(rng.uniform(0.005, 0.08 if kind == "noise" else 0.03))
        out = out + rng.normal(0.0, sigma, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def degraded_pairs(
    names: Sequence[str], n: int, size: int, seed: int, margin: int = 8, kinds: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(degraded, pristine)`` [n, size, size] float32 pairs from real photographs.

    Crops carry ``margin`` pixels on each side while degrading (so blur and JPEG see real surroundings, not a
    border), then the centre ``size``×``size`` is kept.
    """
    rng = np.random.default_rng(seed)
    big, _ = sample_patches(names, n, size + 2 * margin, rng)
    deg = np.empty((n, size, size), np.float32)
    for i in range(n):
        kind = None if kinds is None else kinds[int(rng.integers(len(kinds)))]
        deg[i] = degrade(big[i], rng, kind)[margin:-margin, margin:-margin]
    return deg, np.ascontiguousarray(big[:, margin:-margin, margin:-margin])


def ssim_scores(degraded: np.ndarray, pristine: np.ndarray) -> np.ndarray:
    """Gaussian-window SSIM (Wang et al. 2004 constants) of each degraded patch against its pristine patch."""
    from skimage.metrics import structural_similarity

    return np.array(
        [
            structural_similarity(p, d, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
            for d, p in zip(degraded, pristine)
        ],
        np.float32,
    )


def train_model(
    model,
    inputs: np.ndarray,
    targets: np.ndarray,
    loss_fn: Callable,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Seeded Adam training over shuffled mini-batches with a cosine LR decay to 0; returns per-epoch mean losses.

    The decay matters for QAT: a model that ends training on a settled minimum (not mid-oscillation) needs less
    drift in the fake-quant fine-tune.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(inputs)
    y_all = torch.from_numpy(targets)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x_all) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(order))
        log(f"  epoch {epoch + 1:3d}/{epochs}  loss {losses[-1]:.6f}")
    model.eval()
    return losses


def export_onnx(model, example, path: Path, input_name: str, output_name: str) -> None:
    """Export ``model`` to ONNX opset 17 with a dynamic batch axis (legacy TorchScript exporter), atomically."""
    import torch

    from pytest_quantgate.fileio import atomic_write_bytes

    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    atomic_write_bytes(path, buf.getvalue())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write a compressed ``.npz`` of float32 arrays atomically (no pickles)."""
    from pytest_quantgate.fileio import atomic_path

    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **{k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()})


def plcc(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson linear correlation of two arrays, flattened and cast to float64."""
    from scipy.stats import pearsonr

    return float(pearsonr(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0])


def run_onnx(path: Path, feeds: dict[str, np.ndarray], output: str | None = None) -> np.ndarray:
    """Run an ONNX model on the CPU EP and return one output."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.x64quantprecision", "1")  # the gate's exact int8 kernels
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return sess.run([output or names[0]], feeds)[0]


def gate_drop(
    fp32: Path, int8: Path, fixture: Path, *, compare: str = "output", residual_input: str | None = None
) -> dict[str, float]:
    """Measure the gate's PLCC drop of ``int8`` vs ``fp32`` on a soak fixture, with and without its target.

    ``with_target`` = PLCC(fp32, target) − PLCC(int8, target); ``without_target`` = 1 − PLCC(fp32, int8).
    For ``compare="residual"`` outputs and target have the input subtracted first.
    """
    with np.load(fixture, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    target = arrays.pop("target", None)
    out_f = run_onnx(fp32, arrays).astype(np.float64)
    out_q = run_onnx(int8, arrays).astype(np.float64)
    if compare == "residual":
        ref = arrays[residual_input or next(iter(arrays))].astype(np.float64)
        out_f, out_q = out_f - ref, out_q - ref
        target = None if target is None else target.astype(np.float64) - ref
    res = {"without_target": 1.0 - plcc(out_f, out_q), "mae_fp32_int8": float(np.mean(np.abs(out_f - out_q)))}
    if target is not None:
        res["plcc_fp32_target"] = plcc(out_f, target)
        res["plcc_int8_target"] = plcc(out_q, target)
        res["with_target"] = res["plcc_fp32_target"] - res["plcc_int8_target"]
        # the plugin's "implied" drop: what the int8 deviations would cost were they unrelated to the target
        res["implied"] = res["plcc_fp32_target"] * res["without_target"]
    return res
