"""--quantgate-save-disagreements: the samples where int8 departs most from fp32, saved as a ready-to-use fixture."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import modelkit
import numpy as np
import onnx
import oswrite
import pytest
from conftest import GateProject, rounded_weights

from pytest_quantgate.engine.comparison import Collector, plan_outputs
from pytest_quantgate.frontends.api import check
from pytest_quantgate.frontends.cli import main
from pytest_quantgate.io.registry import parse_registry
from pytest_quantgate.io.soak import Fixture, TensorSpec, load_fixture
from pytest_quantgate.records import Focus
from pytest_quantgate.runner.disagreements import INDICES_KEY
from pytest_quantgate.settings import Settings

COUNT = 32


@pytest.fixture
def files(tmp_path: Path, digits_assets: Path) -> GateProject:
    """The gate project's files in a plain temp folder (the CLI runs in-process or in a subprocess)."""
    return GateProject(cast(pytest.Pytester, SimpleNamespace(path=tmp_path)), digits_assets)


def _bad(project: GateProject) -> Path:
    """Write a registry with one failing sidecar 'bad' (weights rounded to 0.5, not derived by int8 PTQ)."""
    fp32 = onnx.load(project.assets / "digits.onnx")
    return project.write([project.add_sidecar("bad", rounded_weights(fp32, 0.5), quant_lineage=False)])


def _errors(project: GateProject, entry_id: str, features: np.ndarray) -> np.ndarray:
    """Return each sample's squared int8-vs-fp32 error, computed here with plain onnxruntime sessions."""
    a = modelkit.cpu_session(project.model / f"{entry_id}.onnx").run(None, {"features": features})[0]
    b = modelkit.cpu_session(project.model / f"{entry_id}.int8.onnx").run(None, {"features": features})[0]
    return np.asarray(((b.astype(np.float64) - a) ** 2).reshape(len(features), -1).sum(axis=1))


def test_a_registry_run_saves_the_worst_samples_as_a_fixture(project: GateProject) -> None:
    _bad(project)
    run = project.run("--quantgate-ep", "cpu", "--quantgate-save-disagreements=worst",
                      "--quantgate-save-count", str(COUNT))
    run.assert_outcomes(failed=1)
    saved = project.root / "worst" / "bad.cpu.disagreements.npz"
    run.stdout.fnmatch_lines([f"quantgate disagreements: {saved.parent}"])
    with np.load(project.fixtures / "bad.npz") as soak:
        features, target = soak["features"], soak["target"]
    with np.load(saved, allow_pickle=False) as kept:
        assert sorted(kept.files) == ["features", INDICES_KEY, "target"]
        indices = kept[INDICES_KEY]
        assert indices.dtype == np.int64 and indices.shape == (COUNT,)
        # an independent ranking: the largest squared errors, worst first (one output, so the variance scale of
        # the gate's score does not change the order)
        expected = np.argsort(-_errors(project, "bad", features), kind="stable")[:COUNT]
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_array_equal(kept["features"], features[indices])
        np.testing.assert_array_equal(kept["target"], target[indices])
    fixture = load_fixture(saved)  # a soak fixture as it stands: 'indices' is an extra array, never fed
    assert fixture.samples == COUNT and fixture.target is not None


def test_gating_on_the_saved_fixture_reproduces_the_worst_samples(project: GateProject, tmp_path: Path) -> None:
    _bad(project)
    project.run("--quantgate-ep", "cpu", "--quantgate-save-disagreements=worst", "--quantgate-save-count",
                str(COUNT)).assert_outcomes(failed=1)
    saved = project.root / "worst" / "bad.cpu.disagreements.npz"
    with np.load(saved) as kept:
        indices, features = kept[INDICES_KEY], kept["features"]
    with np.load(project.fixtures / "bad.npz") as soak:
        full = _errors(project, "bad", soak["features"])
    np.testing.assert_allclose(_errors(project, "bad", features), full[indices], rtol=1e-6)
    fp32, int8 = project.model / "bad.onnx", project.model / "bad.int8.onnx"
    settings = Settings(bootstrap=200, save_disagreements=tmp_path / "again", save_count=8)
    everywhere = check(fp32, int8, feeds=project.fixtures / "bad.npz", mode="dynamic", lineage=False, id="bad",
                       settings=Settings(bootstrap=200))
    on_worst = check(fp32, int8, feeds=saved, mode="dynamic", lineage=False, id="bad", settings=settings)
    assert not on_worst.passed and on_worst.samples == COUNT
    assert on_worst.drop is not None and everywhere.drop is not None and on_worst.drop > everywhere.drop
    # cut again from a saved fixture: the indices still point into the soak fixture it came from
    with np.load(tmp_path / "again" / "bad.cpu.disagreements.npz") as again:
        np.testing.assert_array_equal(again[INDICES_KEY], indices[:8])


def test_quantgate_measure_saves_passing_entries_too(files: GateProject, tmp_path: Path) -> None:
    registry = files.write([files.add_sidecar("m")])
    code = main(["measure", str(registry), "--fixtures", str(files.fixtures), "--ep", "cpu", "--bootstrap", "200",
                 "--save-disagreements", str(tmp_path / "out"), "--save-count", "40"])
    assert code == 0
    with np.load(tmp_path / "out" / "m.cpu.disagreements.npz") as kept:
        assert kept[INDICES_KEY].shape == (40,) and len(set(kept[INDICES_KEY].tolist())) == 40


def test_an_unwritable_folder_is_an_error_naming_the_file(files: GateProject) -> None:
    registry = files.write([files.add_sidecar("m")])
    folder = files.root / "out"
    folder.mkdir()
    line, code = oswrite.command("readonly", folder, [
        sys.executable, "-m", "pytest_quantgate.frontends.cli", "measure", str(registry), "--fixtures",
        str(files.fixtures), "--ep", "cpu", "--bootstrap", "200", "--save-disagreements", str(folder)])
    done = subprocess.run(line, capture_output=True, text=True, timeout=600, cwd=files.root)
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    out = report["stdout"] + report["stderr"]
    assert report["returncode"] == 2, out
    assert (f"entry 'm': --quantgate-save-disagreements: {folder / 'm.cpu.disagreements.npz'}: cannot write the "
            f"disagreements fixture") in out, out
    assert f"({code})" in out, out
    assert report["files"] == {}  # no partial left behind


def test_a_file_in_the_way_is_an_error_of_the_item(project: GateProject) -> None:
    project.write([project.add_sidecar("m")])
    (project.root / "taken").write_text("a file, not a folder")
    run = project.run("--quantgate-ep", "cpu", "--quantgate-save-disagreements=taken/deeper")
    run.assert_outcomes(errors=1)
    run.stdout.fnmatch_lines([f"*quantgate ERROR: m [[]cpu[]]: *entry 'm': --quantgate-save-disagreements: "
                              f"{project.root / 'taken' / 'deeper' / 'm.cpu.disagreements.npz'}: cannot write the "
                              f"disagreements fixture*"])


# --- the ranking counts threshold decisions that flip -------------------------------------------------------------


def _threshold_collector(cap: int | None = None) -> Collector:
    """Ten samples of a score map [N, 1, 16] judged at x >= 0.5: sample 3 errs most, sample 7 flips decisions."""
    rng = np.random.default_rng(0)
    fp32 = rng.uniform(0.0, 1.0, size=(10, 1, 16)).astype(np.float32)
    int8 = fp32 + np.float32(0.001)
    fp32[3], int8[3] = 0.05, 0.25  # far off, but under the threshold in both models
    fp32[7], int8[7] = 0.4995, 0.5005  # a hair apart, and every decision flips
    raw = {"id": "map", "onnx": "m.onnx", "quant_mode": "dynamic", "sha256": "0" * 64, "int8_sha256": "1" * 64,
           "quant_outputs": {"map": {"threshold": 0.5}}}
    entry = parse_registry({"schema_version": 1, "models": [raw]}, Path("registry.json")).entries[0]
    x = np.zeros((10, 2), np.float32)
    fixture = Fixture(Path("soak.npz"), "0", {"x": x}, None)
    plans = plan_outputs(entry, fixture, (TensorSpec("x", "tensor(float)", ("N", 2)),),
                         (TensorSpec("map", "tensor(float)", ("N", 1, 16)),))
    collector = Collector(entry, plans, 10, 0, "soak.npz", max_units=cap)
    collector.add(0, {"x": x}, None, {"map": fp32}, {"map": int8})
    return collector


def test_threshold_flips_rank_a_sample_worst() -> None:
    assert _threshold_collector().worst_samples(2) == [7, 3]
    assert _threshold_collector(cap=4).worst_samples(2) == [7, 3]  # past the cap too
    focus = Focus("map", 1, (0,), "channel 0 along axis 1")
    assert _threshold_collector().worst_samples(1, focus, "threshold") == [7]  # what a threshold FAIL is about
    assert _threshold_collector().worst_samples(1, focus, "drop") == [3]  # what a PLCC FAIL is about
