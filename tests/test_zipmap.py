"""Classifiers laid out as skl2onnx writes them: a ``label`` tensor and ZipMap's ``output_probability``.

``output_probability`` is a sequence of maps (class -> probability), one map per sample. The gate and the
diagnosis both compare it as a (samples, classes) array with the keys in sorted order; ``label`` is compared by
agreement, int64 class ids and string class names alike. Nothing here may end in "outputs not analysed:
TypeError: float() argument must be ... not 'dict'".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import modelkit
import numpy as np
import onnx
import pytest
from conftest import GateProject, rounded_weights

from pytest_quantgate.analysis.diagnosis import diagnose
from pytest_quantgate.analysis.qgraph import sqnr_db


def _write_classifier(folder: Path, name: str, string_labels: bool) -> tuple[Path, Path]:
    fp32, int8 = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
    onnx.save(modelkit.zipmap_classifier(string_labels), fp32)
    modelkit.quantize_dynamic_file(fp32, int8)
    return fp32, int8


def _probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    """Return ``output_probability`` of every sample (run one at a time) as (samples, classes) in key order."""
    session = modelkit.cpu_session(path)
    maps = [session.run(["output_probability"], {"features": x[i:i + 1]})[0][0] for i in range(len(x))]
    return np.array([[m[k] for k in sorted(m)] for m in maps], dtype=np.float64)


def _labels(path: Path, x: np.ndarray) -> np.ndarray:
    session = modelkit.cpu_session(path)
    return np.concatenate([session.run(["label"], {"features": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("string_labels", [False, True], ids=["int64-labels", "string-labels"])
def test_diagnosis_compares_the_probability_maps_and_names_what_it_leaves_out(tmp_path: Path,
                                                                              string_labels: bool) -> None:
    fp32, int8 = _write_classifier(tmp_path, "clf", string_labels)
    x = modelkit.digits_split()[2][:8]
    feeds = [{"features": x[i:i + 2]} for i in range(0, 8, 2)]
    found = diagnose(fp32, int8, feeds)
    assert not [n for n in found.notes if "not analysed" in n], found.notes
    assert "outputs" in found.analysed
    outputs = {t.tensor: t.xmodel_db for t in found.outputs}
    expected = sqnr_db(_probabilities(fp32, x), _probabilities(int8, x))
    assert outputs["output_probability"] == pytest.approx(expected, abs=1e-6)
    if string_labels:
        assert "label" not in outputs
        assert ("output 'label' (tensor(string)) not compared: the diagnosis compares numeric tensors and sequences "
                "of maps") in found.notes
    else:
        assert "label" in outputs


@pytest.mark.parametrize("string_labels", [False, True], ids=["int64-labels", "string-labels"])
def test_the_gate_judges_the_probabilities_as_an_array_and_the_labels_by_agreement(project: GateProject,
                                                                                   string_labels: bool) -> None:
    fp32, int8 = _write_classifier(project.model, "clf", string_labels)
    _, _, x, _ = modelkit.digits_split()
    np.savez(project.fixtures / "clf.npz", features=x)
    coarse = project.model / "coarse.int8.onnx"
    (project.model / "coarse.onnx").write_bytes(fp32.read_bytes())
    onnx.save(rounded_weights(onnx.load(fp32), 0.5), coarse)  # a sidecar that fails
    (project.fixtures / "coarse.npz").write_bytes((project.fixtures / "clf.npz").read_bytes())
    entries: list[dict[str, Any]] = [
        modelkit.pin({"id": name, "onnx": f"{name}.onnx", "quant_mode": "dynamic", "quant_lineage": False},
                     project.model) for name in ("clf", "coarse")]
    project.write(entries)
    report = project.root / "r.json"
    result = project.run("--quantgate-ep", "cpu", "--quantgate-diagnose", "always", "--quantgate-report", str(report))
    out = result.stdout.str()
    assert "Traceback" not in out and "not analysed" not in out and "float() argument" not in out, out
    result.assert_outcomes(passed=1, failed=1)
    items = {i["id"]: i for i in json.loads(report.read_text())["items"]}
    good = items["clf"]["result"]
    # the drop is 1 - PLCC over every probability of every sample, keys in sorted order; labels by agreement
    expected = 1.0 - np.corrcoef(_probabilities(fp32, x).ravel(), _probabilities(int8, x).ravel())[0, 1]
    assert good["drop"] == pytest.approx(expected, abs=1e-9)
    by_name = {o["name"]: o for o in good["outputs"]}
    flips = float(np.mean(_labels(fp32, x) != _labels(int8, x)))
    assert by_name["label"]["labels"]["flip_rate"] == pytest.approx(flips, abs=1e-12)
    assert {t["tensor"] for t in good["diagnosis"]["outputs"]} >= {"output_probability"}
    # the failing sidecar's report shows the labels' agreement, not a table of NaN correlations
    result.stdout.fnmatch_lines(["  output 'label' (labels: int8 differs from fp32 on *% of elements, budget 0.01, "
                                 "95% CI [[]*, *[]])"])
