"""diagnose() on the bundled sidecars, on a deliberately broken QDQ sidecar and on graphs it cannot analyse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pytest_quantgate.diagnosis import Diagnosis, diagnose, feeds_from_fixture, sqnr_db
from pytest_quantgate.reports import diagnosis_lines

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model"
FIXTURES = ROOT / "fixtures"
BROKEN_SCALE = "/body/body.3/Relu_output_0_scale"
BROKEN_TENSOR = "/body/body.3/Relu_output_0"


def _feeds(entry_id: str, count: int = 3) -> list[dict[str, np.ndarray]]:
    with np.load(FIXTURES / f"{entry_id}.npz") as npz:
        inputs = {k: npz[k] for k in npz.files if k != "target"}
    return feeds_from_fixture(inputs, batched=True, count=count, batch=16)


@pytest.fixture()
def residual(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the bundled static residual filter (so a test can watch the folder for stray files)."""
    for name in ("residual_filter_v1.onnx", "residual_filter_v1.int8.onnx"):
        shutil.copy(MODEL / name, tmp_path / name)
    return tmp_path / "residual_filter_v1.onnx", tmp_path / "residual_filter_v1.int8.onnx"


def _check_json(diag: Diagnosis) -> dict:
    data = json.loads(json.dumps(diag.to_dict(), allow_nan=False))
    assert data["format"] == diag.format
    return data


def test_sqnr_db_matches_definition() -> None:
    x = np.array([3.0, 4.0])
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x + np.array([0.3, 0.4])) == pytest.approx(20.0)
    assert sqnr_db(x, np.array([np.nan, 1.0])) == float("-inf")


def test_static_qdq_sidecar_weights_activations_and_outputs(residual: tuple[Path, Path]) -> None:
    fp32, int8 = residual
    before = sorted(p.name for p in fp32.parent.iterdir())
    diag = diagnose(fp32, int8, _feeds("residual_filter_v1"), top=4)
    assert sorted(p.name for p in fp32.parent.iterdir()) == before, "diagnose wrote beside the user's models"
    assert diag.format == "qdq"
    assert set(diag.analysed) == {"outputs", "weights", "activations"}
    assert len(diag.worst) == 4
    keys = [t.rank_key for t in diag.worst]
    assert keys == sorted(keys)
    kinds = {t.kind for t in diag.worst}
    assert kinds == {"weight", "activation"}
    # rounding a healthy calibration: every local error is well above 20 dB (the fused Relu clamp is not noise)
    assert all(t.sqnr_db is not None and t.sqnr_db > 20 for t in diag.worst)
    act = next(t for t in diag.worst if t.kind == "activation")
    assert act.xmodel_db is not None and act.exclude and all(n.startswith("/") for n in act.exclude)
    assert [o.tensor for o in diag.outputs] == ["clean"]
    assert diag.outputs[0].xmodel_db > 30
    lines = diagnosis_lines(diag)
    assert lines[0].startswith("Diagnosis (qdq sidecar, 3 feed(s)")
    assert any("local dB" in line and "vs fp32 dB" in line for line in lines)
    assert any(line.startswith("  Suggestion: ") and "--nodes-to-exclude" in line for line in lines)
    _check_json(diag)


def test_broken_activation_scale_ranks_first(residual: tuple[Path, Path], tmp_path: Path) -> None:
    fp32, int8 = residual
    model = onnx.load(str(int8))
    for init in model.graph.initializer:
        if init.name == BROKEN_SCALE:
            init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * 8).astype(np.float32), init.name))
            break
    else:
        pytest.fail(f"{BROKEN_SCALE} not in the bundled sidecar")
    broken = tmp_path / "broken.int8.onnx"
    onnx.save(model, str(broken))
    healthy = diagnose(fp32, int8, _feeds("residual_filter_v1"))
    diag = diagnose(fp32, broken, _feeds("residual_filter_v1"))
    first = diag.worst[0]
    assert (first.kind, first.tensor, first.node) == ("activation", BROKEN_TENSOR, "/body/body.3/Relu")
    assert healthy.worst[0].tensor != BROKEN_TENSOR  # the ranking moved because of the break
    before = next(t for t in healthy.worst if t.tensor == BROKEN_TENSOR).sqnr_db
    assert before - first.sqnr_db == pytest.approx(20 * np.log10(8), abs=3)  # 8x coarser steps: ~18 dB
    assert "'/body/body.3/Relu'" in diag.suggestion and "--nodes-to-exclude" in diag.suggestion
    assert BROKEN_TENSOR in "\n".join(diagnosis_lines(diag))


def test_dynamic_sidecar_weights_by_name_and_simulated_activations(tmp_path: Path) -> None:
    diag = diagnose(MODEL / "fusion_mlp_v1.onnx", MODEL / "fusion_mlp_v1.int8.onnx", _feeds("fusion_mlp_v1"),
                    top=10)
    assert diag.format == "dynamic"
    weights = {t.tensor: t for t in diag.worst if t.kind == "weight"}
    assert set(weights) == {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight"}
    assert weights["mlp.2.weight"].node == "/mlp/mlp.2/MatMul"  # the fp32 node name nodes_to_exclude takes
    assert all(20 < t.sqnr_db < 60 for t in weights.values())
    acts = [t for t in diag.worst if t.kind == "activation"]
    assert acts and all(t.sqnr_db is not None for t in acts)
    assert any("run time" in n and "no calibrated scales" in n for n in diag.notes)
    assert diag.outputs[0].tensor == "score"
    _check_json(diag)


def test_qat_sidecar_with_retrained_weights_is_said_not_ranked() -> None:
    diag = diagnose(MODEL / "nr_cnn_v1.onnx", MODEL / "nr_cnn_v1.int8.onnx", _feeds("nr_cnn_v1", 2))
    assert diag.format == "qdq"
    assert diag.worst
    if any("trained (QAT)" in n for n in diag.notes):
        assert all(t.sqnr_db is None or t.sqnr_db > 10 for t in diag.worst)


def test_unreadable_int8_model_is_a_diagnosis_not_an_exception(tmp_path: Path) -> None:
    bad = tmp_path / "bad.int8.onnx"
    bad.write_bytes(b"not an onnx file")
    diag = diagnose(MODEL / "fusion_mlp_v1.onnx", bad, _feeds("fusion_mlp_v1"))
    assert diag.worst == () and diag.analysed == ()
    assert "could not load the models" in diag.notes[0]
    assert "could not load" in "\n".join(diagnosis_lines(diag))
    _check_json(diag)


def test_float_only_sidecar_and_wrong_feeds(tmp_path: Path) -> None:
    same = diagnose(MODEL / "fusion_mlp_v1.onnx", MODEL / "fusion_mlp_v1.onnx", _feeds("fusion_mlp_v1"))
    assert same.format == "unknown" and same.outputs[0].xmodel_db == float("inf")
    assert any("only outputs were compared" in n for n in same.notes)
    _check_json(same)
    wrong = diagnose(MODEL / "residual_filter_v1.onnx", MODEL / "residual_filter_v1.int8.onnx",
                     [{"x": np.zeros((1, 1, 32, 32), np.float32)}])
    assert "outputs" not in wrong.analysed and any("lack model input" in n for n in wrong.notes)
    assert any(t.kind == "weight" for t in wrong.worst)  # weights need no feeds
    empty = diagnose(MODEL / "residual_filter_v1.onnx", MODEL / "residual_filter_v1.int8.onnx", [])
    assert any("no feeds" in n for n in empty.notes)
