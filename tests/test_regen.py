"""Sidecar regeneration through ``pytest --quantgate``: missing, all, never; serial and under xdist."""

from __future__ import annotations

import json

import pytest
from conftest import GateProject

from pytest_quantgate.cli import main
from pytest_quantgate.producers.provenance import read_provenance


def _shared_pair(project: GateProject) -> list[dict]:
    """Two entries that point at the same fp32 model and the same sidecar: a race if both rebuilt it."""
    first = project.add_sidecar("twin_a")
    second = {**first, "id": "twin_b"}
    (project.fixtures / "twin_b.npz").write_bytes((project.fixtures / "twin_a.npz").read_bytes())
    return [first, second]


def _produced(project: GateProject, entry_id: str) -> dict:
    """An entry whose pinned sidecar comes from the gate's own producer (provenance inside, naming its fp32)."""
    import modelkit

    from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic

    project.add_sidecar(entry_id)
    quantize_dynamic(project.model / f"{entry_id}.onnx", project.model / f"{entry_id}.int8.onnx", DynamicConfig())
    return modelkit.pin({"id": entry_id, "onnx": f"{entry_id}.onnx", "quant_mode": "dynamic"}, project.model)


def test_missing_sidecar_is_rebuilt_gated_and_reported(project: GateProject) -> None:
    project.write([_produced(project, "lost")])
    (project.model / "lost.int8.onnx").unlink()
    result = project.run("--quantgate-regen", "missing", "-W", "default")
    result.assert_outcomes(passed=1)
    assert (project.model / "lost.int8.onnx").is_file()
    provenance = read_provenance(project.model / "lost.int8.onnx")
    assert provenance is not None and provenance["mode"] == "ptq-dynamic"
    # ORT's dynamic quantiser is deterministic here: the rebuilt file matches the pin
    result.stdout.fnmatch_lines(["lost [[]cpu[]] regenerated: rebuilt lost.int8.onnx; sha256 matches the pin"])
    assert not list(project.model.glob("*.partial")) and not list(project.model.glob("*.lock"))


def test_rebuilt_sidecar_that_differs_from_the_pin_says_both_hashes_and_how_to_repin(project: GateProject) -> None:
    entry = project.add_sidecar("moved", quant_options={"per_channel": True})
    project.write([entry])
    (project.model / "moved.int8.onnx").unlink()
    result = project.run("--quantgate-regen", "missing", "-W", "default")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        f"moved [[]cpu[]] regenerated: rebuilt moved.int8.onnx: sha256 * differs from the pinned int8_sha256 "
        f"{entry['int8_sha256']}; review it, then re-pin with `quantgate pin */model/registry.json --id moved`",
    ])
    assert main(["pin", str(project.model / "registry.json"), "--id", "moved"]) == 0
    assert project.run("--quantgate-regen", "never").ret == 0


def test_never_makes_a_missing_sidecar_an_error_with_the_build_command(project: GateProject) -> None:
    project.write([project.add_sidecar("gone"), project.add_sidecar("here")])
    (project.model / "gone.int8.onnx").unlink()
    result = project.run("--quantgate-regen", "never")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*gone.int8.onnx does not exist and --quantgate-regen is 'never'; build it with "
                                 "`quantgate ptq-dynamic */registry.json --id gone`*"])


def test_ci_defaults_to_never(project: GateProject, monkeypatch: pytest.MonkeyPatch) -> None:
    project.write([project.add_sidecar("gone")])
    (project.model / "gone.int8.onnx").unlink()
    monkeypatch.setenv("CI", "true")
    project.run().assert_outcomes(errors=1)
    monkeypatch.setenv("CI", "")
    project.run().assert_outcomes(passed=1)


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
@pytest.mark.parametrize("policy", ["missing", "all"])
def test_a_shared_sidecar_is_built_once_per_run(project: GateProject, workers: list[str], policy: str) -> None:
    project.write(_shared_pair(project))
    if policy == "missing":
        (project.model / "twin_a.int8.onnx").unlink()
    result = project.run("--quantgate-regen", policy, *workers)
    result.assert_outcomes(passed=2)
    notes = [line for line in result.stdout.lines if " regenerated: " in line]
    assert len(notes) == 2, result.stdout.str()
    assert sum(": rebuilt twin_a.int8.onnx" in n for n in notes) == 1
    assert sum("reused the sidecar rebuilt earlier in this run" in n for n in notes) == 1


def test_qat_regeneration_needs_the_recipe_opt_in(project: GateProject) -> None:
    entry = project.add_sidecar("trained", mode="qat")
    entry["qat_recipe"] = "recipes/trained.py"
    project.write([entry])
    (project.model / "trained.int8.onnx").unlink()
    result = project.run("--quantgate-regen", "missing")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*field 'qat_recipe': rebuilding this sidecar runs the Python file "
                                 "*recipes/trained.py; opt in with --quantgate-allow-recipes*"])


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_deleted_bundled_sidecars_are_rebuilt_to_their_pins(pytester: pytest.Pytester, workers: list[str]) -> None:
    """Delete every bundled sidecar; the gate rebuilds dynamic, static and QAT ones byte for byte, then passes."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for folder in ("model", "fixtures", "scripts"):
        shutil.copytree(repo / folder, pytester.path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for sidecar in (pytester.path / "model").glob("*.int8.onnx"):
        sidecar.unlink()
    result = pytester.runpytest("--quantgate", "-p", "no:cacheprovider", "--quantgate-regen", "missing",
                                "--quantgate-allow-recipes", "--quantgate-bootstrap", "200", *workers)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines_random([
        "fusion_mlp_v1 [[]cpu[]] regenerated: rebuilt fusion_mlp_v1.int8.onnx; sha256 matches the pin",
        "residual_filter_v1 [[]cpu[]] regenerated: rebuilt residual_filter_v1.int8.onnx; sha256 matches the pin",
        "nr_cnn_v1 [[]cpu[]] regenerated: rebuilt nr_cnn_v1.int8.onnx; sha256 matches the pin",
    ])
    assert not [p.name for p in (pytester.path / "model").iterdir() if p.name.startswith(".")]


def test_measure_rebuilds_a_missing_sidecar_exactly_as_the_pytest_gate_does(project: GateProject,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """One runner: `quantgate measure` regenerates, gates and reports like `pytest --quantgate`."""
    project.write([_produced(project, "lost")])
    pinned = (project.model / "lost.int8.onnx").read_bytes()
    (project.model / "lost.int8.onnx").unlink()
    out = project.root / "measure.json"
    code = main(["measure", str(project.model / "registry.json"), "--fixtures", str(project.fixtures), "--ep", "cpu",
                 "--regen", "missing", "--bootstrap", "200", "--json", str(out)])
    assert code == 0
    assert (project.model / "lost.int8.onnx").read_bytes() == pinned
    row = json.loads(out.read_text())[0]
    assert row["regenerated"] == "rebuilt lost.int8.onnx; sha256 matches the pin" and row["verdict"] == "PASS"
    assert "lost [cpu] regenerated: rebuilt lost.int8.onnx; sha256 matches the pin" in capsys.readouterr().out
    # and with --regen never the same missing file is the same error as in pytest
    (project.model / "lost.int8.onnx").unlink()
    assert main(["measure", str(project.model / "registry.json"), "--fixtures", str(project.fixtures), "--ep", "cpu",
                 "--regen", "never"]) == 2
