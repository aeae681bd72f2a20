"""Sidecar regeneration through ``pytest --quantgate``: missing, all, never; serial and under xdist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import GateProject

from pytest_quantgate.frontends.cli import main
from pytest_quantgate.producers.provenance import read_provenance


def _shared_pair(project: GateProject) -> list[dict]:
    """Two entries that point at the same fp32 model and the same sidecar: a race if both rebuilt it."""
    first = _produced(project, "twin_a")
    second = {**first, "id": "twin_b"}
    (project.fixtures / "twin_b.npz").write_bytes((project.fixtures / "twin_a.npz").read_bytes())
    return [first, second]


def _produced(project: GateProject, entry_id: str) -> dict:
    """An entry whose pinned sidecar comes from the gate's own producer (provenance inside, naming its fp32)."""
    import modelkit

    from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic

    project.add_sidecar(entry_id)
    quantize_dynamic(project.model / f"{entry_id}.onnx", project.model / f"{entry_id}.int8.onnx", DynamicConfig())
    entry = modelkit.pin({"id": entry_id, "onnx": f"{entry_id}.onnx", "quant_mode": "dynamic"}, project.model)
    assert entry["int8_build"]["reproducible"] == "bytes"  # what `quantgate pin` records of a PTQ build
    return entry


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


def test_rebuilt_sidecar_without_a_build_record_fails_until_reviewed_and_repinned(project: GateProject) -> None:
    entry = project.add_sidecar("moved", quant_options={"per_channel": True})  # pinned by hand: no int8_build
    project.write([entry])
    (project.model / "moved.int8.onnx").unlink()
    result = project.run("--quantgate-regen", "missing", "-W", "default")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines_random([
        f"moved [[]cpu[]] regenerated: rebuilt moved.int8.onnx: sha256 * differs from the pinned int8_sha256 "
        f"{entry['int8_sha256']}: the registry holds no int8_build for the pinned sidecar *, so the cause is unknown; "
        f"needs review: without a record of both builds the difference cannot be explained",
        "*the rebuilt moved.int8.onnx differs from its pin and needs review: *; review it, then re-pin with "
        "`quantgate pin */model/registry.json --id moved`",
    ])
    assert main(["pin", str(project.model / "registry.json"), "--id", "moved"]) == 0
    assert json.loads((project.model / "registry.json").read_text())["models"][0]["int8_build"]["producer"] == \
        "ptq_dynamic"
    assert project.run("--quantgate-regen", "never").ret == 0


@pytest.mark.parametrize(("change", "why"), [
    ({}, "same inputs and libraries, and this producer's bytes do not depend on the CPU: a real change*"),
    ({"libraries": {"onnxruntime": "1.20.0"}},
     "built with other libraries (onnxruntime 1.20.0 -> *): new bytes are expected, and so is a new review"),
    ({"inputs_sha256": "0" * 64}, "built from other inputs (fp32 model, producer options, recipe or calibration *"),
], ids=["same-environment", "libraries", "inputs"])
def test_a_ptq_rebuild_that_differs_from_its_pin_says_why_and_needs_review(project: GateProject, change: dict,
                                                                           why: str) -> None:
    """PTQ bytes do not depend on the CPU: every difference is explained, none is accepted without review."""
    entry = _produced(project, "ptq")
    build = entry["int8_build"]
    entry["int8_build"] = {**build, **{k: {**build[k], **v} if isinstance(v, dict) else v for k, v in change.items()}}
    entry["int8_sha256"] = "f" * 64  # a pin of another build of the same entry
    project.write([entry])
    result = project.run("--quantgate-regen", "all", "-W", "default")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"ptq [[]cpu[]] regenerated: rebuilt ptq.int8.onnx: sha256 * differs from the pinned "
                                 f"int8_sha256 {'f' * 64}: {why}; needs review: *"])


def test_never_makes_a_missing_sidecar_an_error_with_the_build_command(project: GateProject) -> None:
    project.write([project.add_sidecar("gone"), project.add_sidecar("here")])
    (project.model / "gone.int8.onnx").unlink()
    result = project.run("--quantgate-regen", "never")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*gone.int8.onnx does not exist and --quantgate-regen is 'never'; build it with "
                                 "`quantgate ptq-dynamic */registry.json --id gone`*"])


def test_ci_defaults_to_never(project: GateProject, monkeypatch: pytest.MonkeyPatch) -> None:
    project.write([_produced(project, "gone")])
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
    """Delete every bundled sidecar; the gate rebuilds PTQ ones byte for byte and QAT ones under the rule; all pass."""
    _bundled_copy(pytester.path)
    for sidecar in (pytester.path / "model").glob("*.int8.onnx"):
        sidecar.unlink()
    # in a subprocess: QAT imports torch, which pytester would drop after an in-process run (see conftest)
    result = pytester.runpytest_subprocess("--quantgate", "-p", "no:cacheprovider", "--quantgate-regen", "missing",
                                           "--quantgate-allow-recipes", "--quantgate-bootstrap", "200", *workers)
    result.assert_outcomes(passed=3)
    # PTQ builds are byte-reproducible on every CPU and kernel setting (.ci/run reruns this under other ones)
    result.stdout.fnmatch_lines_random([
        "fusion_mlp_v1 [[]cpu[]] regenerated: rebuilt fusion_mlp_v1.int8.onnx; sha256 matches the pin",
        "residual_filter_v1 [[]cpu[]] regenerated: rebuilt residual_filter_v1.int8.onnx; sha256 matches the pin",
    ])
    # a QAT build's bytes depend on the CPU's float kernels: the pin's bytes on the pin's kernels, else explained
    # and accepted by the rule (its build-time drop within the pinned build's interval)
    qat = [line for line in result.stdout.lines if line.startswith("nr_cnn_v1 [cpu] regenerated: ")]
    assert len(qat) == 1, result.stdout.str()
    assert qat[0].endswith("rebuilt nr_cnn_v1.int8.onnx; sha256 matches the pin") or (
        ": other CPU kernels (" in qat[0] and "expected for a training producer (qat); used without review: its "
        "build-time drop" in qat[0] and "is within the pinned build's interval" in qat[0]), qat[0]
    assert not [p.name for p in (pytester.path / "model").iterdir() if p.name.startswith(".")]


def _bundled_copy(root: Path) -> Path:
    import shutil

    repo = Path(__file__).resolve().parents[1]
    for folder in ("model", "fixtures", "scripts"):
        shutil.copytree(repo / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return root / "model" / "registry.json"


def test_qat_rebuilt_on_other_cpu_kernels_is_judged_by_its_build_time_drop(pytester: pytest.Pytester,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Other kernels (ATen's baseline, oneDNN at SSE4.1): other bytes, explained; the drop rule decides."""
    registry = _bundled_copy(pytester.path)
    # every x86-64 CPU with AVX2 or newer picks other kernels than these (a CPU without AVX2 matches the pin)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    args = ("--quantgate", "-p", "no:cacheprovider", "--quantgate-regen", "all", "--quantgate-allow-recipes",
            "--quantgate-bootstrap", "200", "-k", "nr_cnn_v1", "-W", "default")
    result = pytester.runpytest_subprocess(*args)  # a fresh torch: ATen reads its capability at import
    result.assert_outcomes(passed=1)
    line = next(x for x in result.stdout.lines if x.startswith("nr_cnn_v1 [cpu] regenerated: "))
    if not line.endswith("sha256 matches the pin"):
        assert "ONEDNN_MAX_CPU_ISA unset -> SSE41" in line and "ATEN_CPU_CAPABILITY unset -> default" in line, line
        assert "expected for a training producer (qat); used without review: its build-time drop" in line, line
    # the same rebuild against a reviewed build whose interval it exceeds: a FAIL that says so and how to go on
    data = json.loads(registry.read_text())
    entry = next(e for e in data["models"] if e["id"] == "nr_cnn_v1")
    entry["int8_sha256"] = "e" * 64
    entry["int8_build"]["gate"]["drop_interval"] = [0.0001, 0.0002]
    registry.write_text(json.dumps(data, indent=2))
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*the rebuilt nr_cnn_v1.int8.onnx differs from its pin and needs review: its build-time drop 0.00* is above "
        "the pinned build's interval (drop 0.00*, upper bound 0.000200); review it, then re-pin with `quantgate pin "
        "*registry.json --id nr_cnn_v1`*",
    ])


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
