"""scripts/independent_eval.py: the float64 cross-check agrees with scipy and follows the rules in docs/verdicts.md."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy import stats

from scripts import independent_eval, thirdparty
from tests.modelkit import cpu_session, digits_split, quantize_dynamic_file, write_registry

ROOT = Path(__file__).resolve().parents[1]
CHANNELS, WIDTH = 3, 5


def _model(w: np.ndarray) -> onnx.ModelProto:
    """[N, 64] digits pixels -> maps [N, 3, 5] (MatMul + Reshape) and labels [N] (ArgMax over the 15 values)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["maps"]),
        helper.make_node("ArgMax", ["flat"], ["labels"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "maps",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", CHANNELS, WIDTH]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"])],
        initializer=[numpy_helper.from_array(w, "w"),
                     numpy_helper.from_array(np.array([-1, CHANNELS, WIDTH], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """Run one sample at a time, as the gate runs dynamic sidecars (activation ranges per batch)."""

    sess = cpu_session(path)
    parts = [sess.run(None, {"x": x[i:i + 1]}) for i in range(len(x))]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """fp32 model, a real dynamic-int8 sidecar, a sidecar with channel 2 rewired, fixtures stored and deflated."""
    root = tmp_path_factory.mktemp("ieval")
    _, _, test_x, _ = digits_split()
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.3, (64, CHANNELS * WIDTH)).astype(np.float32)
    onnx.save(_model(w), str(root / "m.onnx"))
    quantize_dynamic_file(root / "m.onnx", root / "m.int8.onnx")
    broken = w.copy()
    broken[:, 2 * WIDTH:] = rng.normal(0, 0.3, (64, WIDTH))  # channel 2 no longer follows fp32
    onnx.save(_model(broken), str(root / "broken.int8.onnx"))
    np.savez(root / "plain.npz", x=test_x)
    np.savez_compressed(root / "packed.npz", x=test_x)
    def digest(name: str) -> str:
        return hashlib.sha256((root / name).read_bytes()).hexdigest()

    base = {"onnx": "m.onnx", "quant_mode": "dynamic", "sha256": digest("m.onnx"),
            "int8_sha256": digest("m.int8.onnx")}
    registry = write_registry(root / "registry.json", [
        dict(base, id="plain", soak_fixture="plain.npz"),
        dict(base, id="packed", soak_fixture="packed.npz"),
        dict(base, id="broken", soak_fixture="plain.npz", int8_onnx="broken.int8.onnx",
             int8_sha256=digest("broken.int8.onnx")),
    ])
    return {"root": root, "registry": registry, "x": test_x}


@pytest.mark.parametrize("entry", ["plain", "packed"])
def test_drop_matches_scipy_on_the_whole_arrays(project: dict[str, Any], entry: str) -> None:
    root, x = project["root"], project["x"]
    report = independent_eval.evaluate(project["registry"], entry, root)
    ref, test = _run(root / "m.onnx", x), _run(root / "m.int8.onnx", x)
    a, b = ref[0].astype(np.float64), test[0].astype(np.float64)
    whole = 1.0 - stats.pearsonr(a.ravel(), b.ravel()).statistic
    per = [1.0 - stats.pearsonr(a[:, k].ravel(), b[:, k].ravel()).statistic for k in range(CHANNELS)]
    maps = report["outputs"]["maps"]
    assert report["samples"] == len(x) and report["batch"] == 1
    assert maps["whole_drop"] == pytest.approx(whole, rel=1e-9, abs=1e-12)
    assert maps["worst_channel"] == int(np.argmax(per))
    assert maps["worst_channel_drop"] == pytest.approx(max(per), rel=1e-9, abs=1e-12)
    assert maps["drop"] == pytest.approx(max(whole, *per), rel=1e-9, abs=1e-12)
    assert maps["mae"] == pytest.approx(float(np.abs(b - a).mean()), rel=1e-9)
    assert maps["max_abs"] == pytest.approx(float(np.abs(b - a).max()))
    assert maps["slope"] == pytest.approx(stats.linregress(a.ravel(), b.ravel()).slope, rel=1e-9)
    assert report["outputs"]["labels"]["label_flip_rate"] == pytest.approx(float(np.mean(ref[1] != test[1])))
    assert report["verdict"] == "PASS"


def test_a_rewired_channel_is_named_and_fails(project: dict[str, Any]) -> None:
    report = independent_eval.evaluate(project["registry"], "broken", project["root"])
    maps = report["outputs"]["maps"]
    assert maps["worst_channel"] == 2
    assert maps["worst_channel_drop"] > 0.5
    assert maps["drop"] == maps["worst_channel_drop"]
    assert report["verdict"] == "FAIL"
    assert report["breaches"][0].startswith("PLCC drop")


def test_channels_that_barely_vary_are_not_judged_and_collapsed_ones_count_one() -> None:
    rng = np.random.default_rng(0)
    ref = np.stack([rng.normal(0, 1, (40, 9)), 0.999 + rng.normal(0, 1e-5, (40, 9)), rng.normal(5, 1, (40, 9))], 1)
    test = ref + rng.normal(0, 0.01, ref.shape)
    test[:, 1] = rng.normal(0, 1, (40, 9))  # unrelated, but channel 1 is a saturated score: not judged
    test[:, 2] = 3.0  # collapsed where fp32 varies
    drops, mask = independent_eval.channel_drops(ref, test, 1)
    assert mask.tolist() == [True, False, True]
    assert drops[2] == 1.0
    assert drops[0] == pytest.approx(1.0 - stats.pearsonr(ref[:, 0].ravel(), test[:, 0].ravel()).statistic)


def test_gate_and_independent_evaluation_agree(project: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, "-m", "pytest_quantgate.frontends.cli", "measure", str(project["registry"]),
                           "--fixtures", str(project["root"]), "--ep", "cpu", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=False, env={**os.environ, "CI": "true"})
    assert proc.returncode == 1, proc.stderr  # 'broken' fails
    rows = {r["id"]: r for r in json.loads(out.read_text())}
    for entry in ("plain", "packed", "broken"):
        report = independent_eval.evaluate(project["registry"], entry, project["root"])
        assert rows[entry]["verdict"] == report["verdict"], rows[entry].get("reason")
        assert thirdparty.gate_result(rows[entry])["drop"] == pytest.approx(report["drop"], abs=1e-6)


def test_cli_exit_codes_and_json(project: dict[str, Any], tmp_path: Path) -> None:
    script = ROOT / "scripts" / "independent_eval.py"
    out = tmp_path / "r.json"
    good = subprocess.run([sys.executable, str(script), str(project["registry"]), "--id", "plain", "--fixtures",
                           str(project["root"]), "--json", str(out)], capture_output=True, text=True, check=False)
    assert good.returncode == 0, good.stderr
    assert json.loads(out.read_text())["id"] == "plain"
    bad = subprocess.run([sys.executable, str(script), str(project["registry"]), "--id", "broken", "--fixtures",
                          str(project["root"])], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    missing = subprocess.run([sys.executable, str(script), str(project["registry"]), "--id", "nope", "--fixtures",
                              str(project["root"])], capture_output=True, text=True, check=False)
    assert missing.returncode == 2
    assert "0 entries have id 'nope'" in missing.stderr
