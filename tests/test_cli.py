"""The ``quantgate`` command: producers on files and registry entries, measure, validate, pin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import modelkit
from pytest_quantgate.frontends.cli import main
from pytest_quantgate.fileio import sha256_file
from pytest_quantgate.producers.provenance import read_provenance

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path: Path, digits_assets: Path) -> Path:
    """A registry folder with the digits model (dynamic) and the bundled residual filter (static)."""
    model = tmp_path / "model"
    fixtures = tmp_path / "fixtures"
    model.mkdir()
    fixtures.mkdir()
    shutil.copy(digits_assets / "digits.onnx", model / "digits.onnx")
    shutil.copy(digits_assets / "digits.int8.onnx", model / "digits.int8.onnx")
    shutil.copy(digits_assets / "digits.npz", fixtures / "digits.npz")
    for name in ("residual_filter_v1.onnx", "residual_filter_v1.int8.onnx"):
        shutil.copy(REPO / "model" / name, model / name)
    for name in ("residual_filter_v1.npz", "residual_filter_v1.calib.npz"):
        shutil.copy(REPO / "fixtures" / name, fixtures / name)
    entries = [
        modelkit.pin({"id": "digits", "onnx": "digits.onnx", "quant_mode": "dynamic"}, model),
        modelkit.pin({"id": "residual_filter_v1", "onnx": "residual_filter_v1.onnx", "quant_mode": "static",
                      "quant_calibration_set": "residual_filter_v1.calib.npz", "quant_compare": "residual"}, model),
    ]
    # a hand-formatted registry: pin must keep this layout
    text = json.dumps({"schema_version": 1, "models": entries}, indent=4).replace('"schema_version": 1',
                                                                                  '"schema_version":   1')
    (model / "registry.json").write_text(text + "\n")
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_ptq_dynamic_on_a_file_prints_the_sha_to_pin(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = workdir / "out" / "digits.int8.onnx"
    code, out = run(capsys, "ptq-dynamic", str(workdir / "model" / "digits.onnx"), "-o", str(out_path))
    assert code == 0, out
    assert f"int8_sha256 {sha256_file(out_path)}" in out
    assert read_provenance(out_path)["mode"] == "ptq-dynamic"  # type: ignore[index]


def test_ptq_static_on_a_file_needs_a_calibration_set(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(workdir / "model" / "residual_filter_v1.onnx")
    code, out = run(capsys, "ptq-static", model, "-o", str(workdir / "x.int8.onnx"))
    assert code == 2 and "--calibration-set is required" in out
    code, out = run(capsys, "ptq-static", model, "-o", str(workdir / "x.int8.onnx"),
                    "--calibration-set", str(workdir / "fixtures" / "residual_filter_v1.calib.npz"))
    assert code == 0, out
    assert (workdir / "x.int8.onnx").is_file()


def test_ptq_static_from_the_registry_entry_then_pin_and_measure(workdir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    registry = str(workdir / "model" / "registry.json")
    fixtures = str(workdir / "fixtures")
    code, out = run(capsys, "ptq-static", registry, "--id", "residual_filter_v1", "--fixtures", fixtures,
                    "--calibrate-method", "percentile")
    assert code == 0, out
    assert "residual_filter_v1: int8_sha256 " in out
    provenance = read_provenance(workdir / "model" / "residual_filter_v1.int8.onnx")
    assert provenance is not None
    assert provenance["config"]["calibrate_method"] == "percentile"
    before = (workdir / "model" / "registry.json").read_text()
    code, out = run(capsys, "validate", registry, "--fixtures", fixtures)
    assert code == 2 and "field 'int8_sha256'" in out
    code, out = run(capsys, "pin", registry, "--id", "residual_filter_v1")
    assert code == 0, out
    after = (workdir / "model" / "registry.json").read_text()
    # only the hash and the build record's inputs digest (other calibration options) changed: same layout,
    # same key order, same hand-made spacing
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(before.splitlines()) == len(after.splitlines())
    assert [a.split(":")[0].strip() for a, _ in changed] == ['"int8_sha256"', '"inputs_sha256"'], changed
    assert '"schema_version":   1' in after
    assert run(capsys, "validate", registry, "--fixtures", fixtures)[0] == 0
    code, out = run(capsys, "measure", registry, "--fixtures", fixtures, "--bootstrap", "200")
    assert code == 0, out
    assert "2 passed, 0 failed, 0 errors, 0 skipped" in out


def test_pin_inserts_a_missing_hash_after_onnx(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = workdir / "model" / "registry.json"
    data = json.loads(path.read_text())
    data["models"].append({"id": "plain", "onnx": "digits.onnx"})
    path.write_text(json.dumps(data, indent=2))
    code, out = run(capsys, "pin", str(path), "--id", "plain")
    assert code == 0, out
    plain = json.loads(path.read_text())["models"][-1]
    assert list(plain) == ["id", "onnx", "sha256"] and plain["sha256"] == sha256_file(workdir / "model" / "digits.onnx")


def test_measure_exit_codes_and_json(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = workdir / "model" / "registry.json"
    fixtures = str(workdir / "fixtures")
    out_json = workdir / "measure.json"
    code, _ = run(capsys, "measure", str(registry), "--fixtures", fixtures, "--json", str(out_json), "--id", "digits")
    assert code == 0
    rows = json.loads(out_json.read_text())
    assert [r["verdict"] for r in rows] == ["PASS"]
    # a broken sidecar: exit 1
    broken = modelkit.mlp_model({k: np.round(v * 2) / 2 for k, v in modelkit.fitted_mlp_weights().items()})
    onnx.save(broken, workdir / "model" / "digits.int8.onnx")
    run(capsys, "pin", str(registry), "--id", "digits")
    assert run(capsys, "measure", str(registry), "--fixtures", fixtures, "--id", "digits")[0] == 1
    # an unknown id: exit 2, naming the ids
    code, out = run(capsys, "measure", str(registry), "--id", "nope")
    assert code == 2 and "match no entry" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--ep", "tpu"]) == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    assert main([]) == 2


def test_qat_refuses_to_run_a_recipe_without_opt_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(REPO / "model", tmp_path / "model")
    code, out = run(capsys, "qat", str(tmp_path / "model" / "registry.json"), "--id", "nr_cnn_v1")
    assert code == 2
    assert "opt in with --quantgate-allow-recipes (pytest) or --allow-recipes (quantgate)" in out


def test_qat_rebuilds_the_bundled_qat_sidecar_with_opt_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`quantgate qat` on the bundled nr_cnn_v1 entry: fine-tune, bridge, atomic write, sha to pin, gate passes."""
    shutil.copytree(REPO / "model", tmp_path / "model")
    shutil.copytree(REPO / "fixtures", tmp_path / "fixtures")
    registry = str(tmp_path / "model" / "registry.json")
    code, out = run(capsys, "qat", registry, "--id", "nr_cnn_v1", "--allow-recipes")
    # the bundled recipe reuses the training code in scripts/bundled/: without it, a clean error, no traceback
    assert code == 2 and "QAT recipe" in out and "raised" in out and "Traceback" not in out
    shutil.copytree(REPO / "scripts", tmp_path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    sidecar = tmp_path / "model" / "nr_cnn_v1.int8.onnx"
    sidecar.unlink()
    code, out = run(capsys, "qat", registry, "--id", "nr_cnn_v1", "--allow-recipes", "--fixtures",
                    str(tmp_path / "fixtures"))
    assert code == 0, out
    assert f"nr_cnn_v1: int8_sha256 {sha256_file(sidecar)}" in out
    provenance = read_provenance(sidecar)
    assert provenance is not None
    assert provenance["config"]["epochs_qat"] == 2 and provenance["config"]["lr_qat"] == 3e-5
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.startswith(".")]
    run(capsys, "pin", registry, "--id", "nr_cnn_v1")
    code, out = run(capsys, "measure", registry, "--fixtures", str(tmp_path / "fixtures"), "--id", "nr_cnn_v1",
                    "--bootstrap", "200")
    assert code == 0, out
