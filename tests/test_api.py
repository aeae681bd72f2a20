"""quantgate.check() and the ``quantgate`` fixture: the registry item's gate for sidecars built inside tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import modelkit
import numpy as np
import onnx
import pytest
from conftest import GateProject, rounded_weights
from onnx import helper, numpy_helper

from pytest_quantgate.errors import InputError, ModelFileError, RegistryError
from pytest_quantgate.frontends.api import CheckError, assert_passes, check, entry_fields
from pytest_quantgate.records import GateResult
from pytest_quantgate.settings import Settings

FAST = Settings(bootstrap=200)


def _digits(assets: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(assets / "digits.npz") as data:
        return data["features"], data["target"]


def test_check_on_paths_returns_the_typed_result(digits_assets: Path) -> None:
    result = check(digits_assets / "digits.onnx", digits_assets / "digits.int8.onnx",
                   feeds=digits_assets / "digits.npz", mode="dynamic", settings=FAST)
    assert isinstance(result, GateResult)
    assert result.passed and result.verdict == "PASS"
    assert result.entry_id == "digits" and result.ep == "cpu" and result.mode == "dynamic"
    assert result.samples == len(_digits(digits_assets)[0])
    assert result.budget == 0.01 and result.drop is not None and result.drop < 0.01
    assert result.lineage is not None and result.lineage.ok
    assert result.outputs[0].fp32_vs_target is not None  # the fixture's target is read as a registry entry's is


def test_check_on_model_protos_and_numpy_feeds_gives_the_file_verdict(digits_assets: Path) -> None:
    features, target = _digits(digits_assets)
    fp32, int8 = onnx.load(digits_assets / "digits.onnx"), onnx.load(digits_assets / "digits.int8.onnx")
    from_files = check(digits_assets / "digits.onnx", digits_assets / "digits.int8.onnx",
                       feeds=digits_assets / "digits.npz", mode="dynamic", settings=FAST)
    from_objects = check(fp32, int8, feeds={"features": features, "target": target}, mode="dynamic", id="digits",
                         settings=FAST)
    # the same entry id, statistics and seed: the same numbers, whatever the files were handed over as
    assert from_objects.drop == from_files.drop
    assert from_objects.interval == from_files.interval
    assert from_objects.lineage is not None and from_objects.lineage.ok  # an int8 ModelProto built from the fp32
    assert from_objects.provenance is not None
    scratch = Path(from_objects.provenance.int8.path).parent
    assert scratch.name.startswith("quantgate-check-") and not scratch.exists()  # the private folder is gone


def test_lineage_refuses_the_fp32_as_its_own_sidecar_unless_turned_off(digits_assets: Path) -> None:
    fp32 = onnx.load(digits_assets / "digits.onnx")
    features, _ = _digits(digits_assets)
    refused = check(fp32, fp32, feeds={"features": features}, mode="dynamic", settings=FAST)
    assert not refused.passed and refused.kind == "lineage"
    assert "is the fp32 file itself" in refused.reason
    allowed = check(fp32, fp32, feeds={"features": features}, mode="dynamic", lineage=False, settings=FAST)
    assert allowed.passed and allowed.lineage is None


def _two_outputs(sign: float) -> onnx.ModelProto:
    """Return the digits MLP with a second output ``aux`` = sign * score (a debug tap)."""
    model = modelkit.mlp_model(modelkit.fitted_mlp_weights())
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array([sign], np.float32), "sign"))
    graph.node.append(helper.make_node("Mul", ["score", "sign"], ["aux"], name="tap"))
    graph.output.append(helper.make_tensor_value_info("aux", onnx.TensorProto.FLOAT, ["N", 1]))
    return model


def test_outputs_rules_pass_through_an_ignored_output(digits_assets: Path, tmp_path: Path) -> None:
    onnx.save(_two_outputs(1.0), tmp_path / "tap.onnx")
    modelkit.quantize_dynamic_file(tmp_path / "tap.onnx", tmp_path / "tap.int8.onnx")
    broken = onnx.load(tmp_path / "tap.int8.onnx")
    for init in broken.graph.initializer:
        if init.name == "sign":  # the tap flips sign in int8: its PLCC against fp32 is -1
            init.CopyFrom(numpy_helper.from_array(np.array([-1.0], np.float32), "sign"))
    features, _ = _digits(digits_assets)
    judged = check(tmp_path / "tap.onnx", broken, feeds={"features": features}, mode="dynamic", settings=FAST)
    assert not judged.passed and "'aux'" in judged.reason
    ignored = check(tmp_path / "tap.onnx", broken, feeds={"features": features}, mode="dynamic",
                    outputs={"aux": {"ignore": True}}, settings=FAST)
    assert ignored.passed, ignored.reason
    assert {o.name: o.ignored for o in ignored.outputs} == {"score": False, "aux": True}


def test_keys_go_by_their_registry_names_with_or_without_quant() -> None:
    fields = entry_fields({"budget_plcc": 0.02, "budget_mae": 0.5, "quant_budget_slope": 0.2, "outputs": {},
                           "lineage": False, "id": "m", "kind": "mlp", "channel_axis": None})
    assert fields == {"quant_accuracy_budget_plcc": 0.02, "quant_budget_mae": 0.5, "quant_budget_slope": 0.2,
                      "quant_outputs": {}, "quant_lineage": False, "id": "m", "kind": "mlp",
                      "quant_channel_axis": None}
    with pytest.raises(CheckError, match=r"unknown registry key 'budget_plc'.*budget_mae"):
        entry_fields({"budget_plc": 0.02})
    with pytest.raises(CheckError, match=r"'onnx' is not a keyword of check\(\)"):
        entry_fields({"onnx": "x.onnx"})
    with pytest.raises(CheckError, match="given twice"):
        entry_fields({"budget_mae": 0.5, "quant_budget_mae": 0.5})


def test_bad_input_raises_an_input_error_naming_it(digits_assets: Path, tmp_path: Path) -> None:
    fp32, int8 = digits_assets / "digits.onnx", digits_assets / "digits.int8.onnx"
    features, _ = _digits(digits_assets)
    with pytest.raises(ModelFileError, match=r"int8 model .*missing.onnx is not a file"):
        check(fp32, tmp_path / "missing.onnx", feeds={"features": features})
    with pytest.raises(RegistryError, match=r"quantgate.check\(\): entry 'digits' is invalid: .*quant_budget_slope"):
        check(fp32, int8, feeds={"features": features}, budget_slope=5.0)
    with pytest.raises(InputError, match=r"missing array\(s\) for model input\(s\) 'features'"):
        check(fp32, int8, feeds={"pixels": features}, mode="dynamic", settings=FAST)
    with pytest.raises(CheckError, match="mode 'fp32' gates nothing"):
        check(fp32, int8, feeds={"features": features}, mode="fp32")
    with pytest.raises(CheckError, match="ep 'tpu'"):
        check(fp32, int8, feeds={"features": features}, ep="tpu")


def test_assert_passes_fails_with_the_report(digits_assets: Path) -> None:
    fp32 = onnx.load(digits_assets / "digits.onnx")
    features, _ = _digits(digits_assets)
    result = check(fp32, rounded_weights(fp32, 0.5), feeds={"features": features}, mode="dynamic", lineage=False,
                   settings=FAST)
    assert not result.passed
    with pytest.raises(pytest.fail.Exception) as failed:
        assert_passes(result)
    assert str(failed.value).startswith(f"quantgate FAILED: mlp [cpu] mode=dynamic: {result.reason}")
    assert "What to do:" in str(failed.value)
    assert assert_passes(check(fp32, onnx.load(digits_assets / "digits.int8.onnx"), feeds={"features": features},
                               mode="dynamic", settings=FAST)).passed


# --- the fixture, in test files outside the repository (pytester's temp folder) ----------------------------------


def _failure_block(text: str) -> list[str]:
    """Return the failure report's lines: from 'quantgate FAILED' to the last remedy."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("quantgate FAILED"))
    end = next(i for i in range(start, len(lines)) if re.match(r"^(_{3,}|={3,}|-{3,} Captured)", lines[i]))
    return lines[start:end]


def test_a_failing_fixture_check_fails_with_the_registry_items_text(project: GateProject) -> None:
    fp32 = onnx.load(project.assets / "digits.onnx")
    project.write([project.add_sidecar("bad", rounded_weights(fp32, 0.5), quant_lineage=False)])
    assert not project.root.resolve().is_relative_to(Path(__file__).resolve().parents[1])  # outside the repository
    registry_run = project.run("--quantgate-ep", "cpu")
    registry_run.assert_outcomes(failed=1)
    project.pytester.makepyfile(test_mine="""
        def test_sidecar(quantgate):
            quantgate.check("model/bad.onnx", "model/bad.int8.onnx", feeds="fixtures/bad.npz", mode="dynamic",
                            lineage=False, id="bad")
    """)
    fixture_run = project.pytester.runpytest("-p", "no:cacheprovider", "--quantgate-bootstrap", "200", "test_mine.py")
    fixture_run.assert_outcomes(failed=1)
    registry = str(project.model / "registry.json")
    ours = [line.replace(str(project.root / "quantgate.check"), registry)
            for line in _failure_block(fixture_run.stdout.str())]
    theirs = _failure_block(registry_run.stdout.str())
    assert ours == theirs and len(ours) > 10, ours
    assert any(line.startswith("Diagnosis (") for line in ours)  # the diagnosis runs as for a registry item


def test_a_passing_fixture_check_returns_the_result_and_records_properties(project: GateProject) -> None:
    for name in ("digits.onnx", "digits.int8.onnx", "digits.npz"):
        (project.root / name).write_bytes((project.assets / name).read_bytes())
    project.pytester.makepyfile(test_mine="""
        import onnx
        import numpy as np
        from pytest_quantgate.records import GateResult

        def test_paths(quantgate, record_property):
            result = quantgate.check("digits.onnx", "digits.int8.onnx", feeds="digits.npz", mode="dynamic")
            assert isinstance(result, GateResult) and result.passed
            assert quantgate.results == [result]

        def test_objects(quantgate):
            features = np.load("digits.npz")["features"]
            result = quantgate.check(onnx.load("digits.onnx"), onnx.load("digits.int8.onnx"),
                                     feeds={"features": features}, budget_plcc=0.02, mode="dynamic")
            assert result.passed and result.budget == 0.02

        def test_bad_input(quantgate):
            quantgate.check("digits.onnx", "nothing.onnx", feeds="digits.npz", mode="dynamic")
    """)
    run = project.pytester.runpytest("-p", "no:cacheprovider", "--quantgate-bootstrap", "200",
                                     "--junitxml=junit.xml", "test_mine.py")
    run.assert_outcomes(passed=2, failed=1)
    run.stdout.fnmatch_lines(["*quantgate ERROR: quantgate.check(): int8 model nothing.onnx is not a file*"])
    junit = (project.root / "junit.xml").read_text()
    assert 'name="quantgate_verdict" value="PASS"' in junit


def test_the_plugin_and_the_fixture_import_no_onnxruntime_until_a_check_runs() -> None:
    code = ("import sys; import pytest_quantgate.frontends.plugin as p; from pytest_quantgate.frontends.api import "
            "QuantgateFixture; QuantgateFixture(None); print(sorted(m for m in sys.modules if 'onnxruntime' in m))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
