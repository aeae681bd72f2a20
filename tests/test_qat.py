"""The QAT producer really trains, writes a sidecar inside the QAT budget, and never leaves partial files."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchao")

from modelkit import cpu_session  # noqa: E402

from pytest_quantgate.fileio import sha256_file, sweep_partials  # noqa: E402
from pytest_quantgate.producers.base import ProducerError, QatRecipe  # noqa: E402
from pytest_quantgate.producers.provenance import read_provenance  # noqa: E402
from pytest_quantgate.producers.qat import QatConfig, QatResult, load_recipe, quantize_qat  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FP32 = REPO / "model" / "nr_cnn_v1.onnx"
RECIPE = REPO / "model" / "recipes" / "nr_cnn_v1.py"
SOAK = REPO / "fixtures" / "nr_cnn_v1.npz"
QAT_BUDGET = 0.002


def _plcc(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0])


def _run(path: Path, luma: np.ndarray) -> np.ndarray:
    sess = cpu_session(path)
    return sess.run(None, {"luma": luma})[0]


@pytest.fixture(scope="module")
def bridge_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[QatResult, Path]:
    """The bundled recipe, bridge route, two QAT epochs over the full 8000-patch training set."""
    out = tmp_path_factory.mktemp("qat_bridge")
    shutil.copyfile(FP32, out / "nr_cnn_v1.onnx")
    result = quantize_qat(out / "nr_cnn_v1.onnx", out / "nr_cnn_v1.int8.onnx",
                          QatConfig(epochs_qat=2, lr_qat=3e-5, seed=7), recipe=RECIPE)
    return result, out


def test_loss_falls_across_epochs(bridge_run: tuple[QatResult, Path]) -> None:
    result, _ = bridge_run
    assert len(result.epoch_losses) == 2
    assert all(np.isfinite(result.epoch_losses))
    assert result.epoch_losses[1] < result.epoch_losses[0]


def test_weights_move_from_fp32_checkpoint(bridge_run: tuple[QatResult, Path]) -> None:
    result, _ = bridge_run
    assert result.weight_l2_from_fp32 > 1e-3
    assert result.lr_qat == pytest.approx(3e-5)
    # and the moved weights are what the sidecar was built from: its fp32 twin differs from the checkpoint
    import onnx
    from onnx import numpy_helper

    fp32_inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(FP32)).graph.initializer}
    int8_inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(result.int8_path)).graph.initializer}
    assert "features.0.weight" in fp32_inits and any(n.startswith("features.0.weight") for n in int8_inits)


def test_every_epoch_sees_all_data(bridge_run: tuple[QatResult, Path]) -> None:
    result, _ = bridge_run
    assert result.n_train == 8000
    assert result.samples_per_epoch == (8000, 8000)


def test_sidecar_passes_qat_budget(bridge_run: tuple[QatResult, Path]) -> None:
    result, out = bridge_run
    with np.load(SOAK, allow_pickle=False) as z:
        luma, target = z["luma"], z["target"]
    assert len(luma) >= 1000
    fp32_out, int8_out = _run(out / "nr_cnn_v1.onnx", luma), _run(result.int8_path, luma)
    drop = _plcc(fp32_out, target) - _plcc(int8_out, target)
    assert drop <= QAT_BUDGET, f"PLCC drop {drop:.6f} over the QAT budget {QAT_BUDGET}"
    assert 1 - _plcc(fp32_out, int8_out) < 0.01  # still the same model


def test_sidecar_and_provenance(bridge_run: tuple[QatResult, Path]) -> None:
    import onnx

    result, out = bridge_run
    assert sorted(p.name for p in out.iterdir()) == ["nr_cnn_v1.int8.onnx", "nr_cnn_v1.onnx"]
    assert result.sha256 == sha256_file(result.int8_path)
    ops = {n.op_type for n in onnx.load(str(result.int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    prov = read_provenance(result.int8_path)
    assert prov is not None and prov["provenance_source"] == "metadata_props"
    assert prov["mode"] == "qat" and prov["route"] == "bridge"
    assert prov["int8_sha256"] == result.sha256
    assert prov["fp32_sha256"] == sha256_file(FP32)
    assert prov["calibration"]["n_samples"] == 128 and len(prov["calibration"]["sha256"]) == 64
    assert prov["training"]["samples_per_epoch"] == [8000, 8000]
    assert {"onnxruntime", "torch", "torchao"} <= set(prov["library_versions"])
    assert prov["config"]["epochs_qat"] == 2


def test_pt2e_route_gives_a_qdq_model_ort_loads(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    recipe = load_recipe(RECIPE)
    recipe._n_train = 512  # a short run: this test is about the export, not the accuracy
    result = quantize_qat(FP32, tmp_path / "nr.int8.onnx", QatConfig(epochs_qat=1, route="pt2e"), recipe=recipe)
    assert result.samples_per_epoch == (512,)
    assert result.lr_qat == pytest.approx(2e-4)  # lr_qat unset: the recipe's fp32_lr / 10
    model = onnx.load(str(result.int8_path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    sess = ort.InferenceSession(str(result.int8_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["luma"]
    with np.load(SOAK, allow_pickle=False) as z:
        luma, target = z["luma"][:256], z["target"][:256]
    out = sess.run(None, {"luma": luma})[0]
    assert out.shape == (256, 1)
    assert _plcc(out, target) > 0.5


def test_config_is_frozen_keyword_only_and_validated() -> None:
    with pytest.raises(TypeError):
        QatConfig(3)  # type: ignore[misc]
    cfg = QatConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs_qat = 5  # type: ignore[misc]
    assert cfg.route == "bridge" and cfg.lr_qat is None
    for bad in ({"route": "fx"}, {"epochs_qat": 0}, {"lr_qat": -1.0}, {"n_calibration": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QatConfig(**bad)


def test_load_recipe_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(RECIPE)
    assert isinstance(recipe, QatRecipe)
    model = recipe.build_model()
    recipe.load_fp32_weights(model, FP32)


def test_load_recipe_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ProducerError, match=r"broken\.py.*boom"):
        load_recipe(broken)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ProducerError, match="neither"):
        load_recipe(empty)
    partial = tmp_path / "partial.py"
    partial.write_text("class R:\n    def build_model(self):\n        pass\nrecipe = R()\n")
    with pytest.raises(ProducerError, match="load_fp32_weights"):
        load_recipe(partial)
    with pytest.raises(ProducerError, match="not found"):
        load_recipe(tmp_path / "missing.py")


def test_unmatched_weights_fail_loudly(tmp_path: Path) -> None:
    import torch

    inner = load_recipe(RECIPE)
    inner._n_train = 128

    class Renamed:
        """Second build_model() call (the fresh fp32 module) has an extra layer the QAT model lacks."""

        fp32_lr = 1e-3

        def __init__(self) -> None:
            self.calls = 0

        def build_model(self):
            self.calls += 1
            model = inner.build_model()
            if self.calls > 1:
                model.extra = torch.nn.Linear(1, 1)
            return model

        def load_fp32_weights(self, model, path):
            inner.load_fp32_weights(model, path)

        def training_data(self):
            return inner.training_data()

        def loss(self, p, t):
            return inner.loss(p, t)

        def example_input(self):
            return inner.example_input()

    with pytest.raises(ProducerError, match=r"extra\.weight"):
        quantize_qat(FP32, tmp_path / "x.int8.onnx", QatConfig(epochs_qat=1), recipe=Renamed())
    assert list(tmp_path.iterdir()) == []


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from pytest_quantgate.producers.qat import QatConfig, load_recipe, quantize_qat
    out = Path(sys.argv[1]); stage = sys.argv[2]
    recipe = load_recipe(sys.argv[3]); recipe._n_train = 2048
    if stage == "write":
        real_fsync = os.fsync
        def slow_fsync(fd):
            real_fsync(fd)
            print("WRITING", flush=True)
            time.sleep(120)
        os.fsync = slow_fsync
    def progress(line):
        print(line, flush=True)
        if stage == "train" and line.startswith("QAT epoch 1/"):
            print("TRAINING", flush=True)
    quantize_qat(out / "nr_cnn_v1.onnx", out / "nr_cnn_v1.int8.onnx",
                 QatConfig(epochs_qat=50, n_calibration=16), recipe=recipe, progress=progress)
    print("FINISHED", flush=True)
    """
)


@pytest.mark.parametrize("stage", ["train", "write"])
def test_sigkill_leaves_no_partial_or_temp_file(tmp_path: Path, stage: str) -> None:
    out = tmp_path / "out"
    tmp = tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    shutil.copyfile(FP32, out / "nr_cnn_v1.onnx")
    (out / "nr_cnn_v1.int8.onnx").write_bytes(b"old sidecar")
    if stage == "write":  # get there fast: one epoch
        child = _CHILD.replace("epochs_qat=50", "epochs_qat=1")
    else:
        child = _CHILD
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", child, str(out), stage, str(RECIPE)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    marker = {"train": "TRAINING", "write": "WRITING"}[stage]
    deadline = time.monotonic() + 150
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line.strip())
            if line.strip() == marker or time.monotonic() > deadline:
                break
        assert seen and seen[-1] == marker, seen
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "nr_cnn_v1.int8.onnx").read_bytes() == b"old sidecar"  # never torn
    # a kill inside the atomic write leaves at most the writer's locked partial; the next writer's sweep removes it
    assert all(p.name.endswith(".partial") for p in out.iterdir() if p.name.startswith("."))
    sweep_partials(out)
    assert sorted(p.name for p in out.iterdir()) == ["nr_cnn_v1.int8.onnx", "nr_cnn_v1.onnx"]
    # onnxruntime's native library writes a session-id file ``$TMPDIR/.ses`` on every session creation and
    # keeps it on a normal exit too: it is ORT's own state, not a temp file of the killed run
    assert [p.name for p in tmp.iterdir() if p.name != ".ses"] == []


def test_a_model_the_quantiser_cannot_annotate_is_refused_not_fine_tuned_silently() -> None:
    """Bare ``x @ W`` gets no fake-quant from the x86 quantiser: QAT would be plain fp32 fine-tuning."""
    import torch

    from pytest_quantgate.producers import qat
    from pytest_quantgate.producers.base import ProducerError

    class Bare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    assert qat.fake_quant_count(qat._prepare_qat(Linear(), torch.ones(8, 4))) > 0
    with pytest.raises(ProducerError, match="inserted no fake-quant node"):
        qat._prepare_qat(Bare(), torch.ones(8, 4))
