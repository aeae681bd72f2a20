"""The plugin end to end with pytester: collection, verdicts, failure text, errors, summary."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from conftest import GateProject, affine, append_to_output, rounded_weights

from pytest_quantgate.fileio import sha256_file
from pytest_quantgate.records import read_report


def healthy(project: GateProject) -> list[dict]:
    return [
        project.add_sidecar("alpha"),
        project.add_sidecar("beta", mode="static", quant_calibration_set="beta.npz"),
        {"id": "plain", "onnx": "digits.onnx"},
        {"id": "plain32", "onnx": "digits.onnx", "quant_mode": "fp32"},
    ]


def test_collects_one_item_per_gated_entry_sorted(project: GateProject) -> None:
    project.write(list(reversed(healthy(project))))
    result = project.run("--collect-only", "-q", "--quantgate-ep", "cpu")
    result.stdout.fnmatch_lines(["model/registry.json::alpha[[]cpu[]]", "model/registry.json::beta[[]cpu[]]",
                                 "2 tests collected*"])
    assert "plain" not in result.stdout.str()


def test_without_the_flag_nothing_is_collected_and_onnxruntime_is_not_imported(project: GateProject) -> None:
    project.write(healthy(project))
    project.pytester.makepyfile(test_mods="""
        import sys
        def test_no_heavy_imports():
            assert "onnxruntime" not in sys.modules
            assert "torch" not in sys.modules
    """)
    # a subprocess: this test process itself has onnxruntime loaded already
    result = project.pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "registry.json" not in result.stdout.str()


def test_healthy_sidecars_pass_and_the_summary_has_a_row_each(project: GateProject) -> None:
    project.write(healthy(project))
    result = project.run("-v", "--quantgate-ep", "cpu")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "*quantgate summary*",
        "id*EP*mode*samples*drop*CI*budget*headroom*size*speed-up*verdict",
        "alpha*cpu*dynamic*1197*PASS",
        "beta*cpu*static*1197*PASS",
    ])


def test_select_by_id_glob_and_unknown_selection_is_an_error(project: GateProject) -> None:
    project.write(healthy(project))
    result = project.run("--quantgate-select", "al*")
    result.assert_outcomes(passed=1)
    result = project.run("--quantgate-select", "nope")
    result.stdout.fnmatch_lines(["*--quantgate-select*'nope' match no entry*ids: alpha, beta, plain, plain32*"])
    assert result.ret != 0


def test_affine_sidecar_fails_although_its_plcc_is_perfect(project: GateProject) -> None:
    int8 = onnx.load(project.model / "digits.int8.onnx")
    project.write([project.add_sidecar("fake", affine(int8, 0.5, 10.0))])
    result = project.run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*quantgate FAILED: fake [[]cpu[]] mode=dynamic: output 'score': int8 ≈ 0.50*·fp32 +9.9*",
        "*output 'score'*",
        "*PLCC*",
        "What to do:",
        "*PLCC ignores gain and offset*",
    ])


def test_lossy_sidecar_fails_on_the_drop_with_table_and_remedy(project: GateProject) -> None:
    fp32 = onnx.load(project.model / "digits.onnx")
    project.write([project.add_sidecar("coarse", rounded_weights(fp32, 0.25), quant_budget_slope=0.5)])
    result = project.run()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*quantgate FAILED: coarse [[]cpu[]] mode=dynamic: PLCC drop * > budget 0.01 on output 'score'",
        "*drop * vs budget 0.01, 95% CI [[]*[]]; 1197 samples*",
        "*metric*fp32 vs target*int8 vs target*int8 vs fp32",
        "*PLCC*", "*SROCC*", "*KRCC*", "*RMSE*", "*mean |err|*", "*max |err|*",
        "What to do:",
        "*quantgate ptq-dynamic*",
    ])
    assert "Traceback" not in out


@pytest.mark.parametrize(("op", "value", "message"), [
    ("Add", float("nan"), "*int8 output 'score' has NaN/inf values in 1197 of 1197 samples*"),
    ("Mul", 0.0, "*int8 output 'score' is constant*"),
])
def test_nan_and_constant_outputs_fail_with_their_own_message(project: GateProject, op: str, value: float,
                                                              message: str) -> None:
    int8 = onnx.load(project.model / "digits.int8.onnx")
    project.write([project.add_sidecar("bad", append_to_output(int8, op, value))])
    result = project.run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([message])


def test_sha256_mismatch_is_an_error_naming_file_and_both_hashes(project: GateProject) -> None:
    entry = project.add_sidecar("tampered")
    entry["int8_sha256"] = "0" * 64
    project.write([entry, project.add_sidecar("fine")])
    result = project.run()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*quantgate ERROR: tampered [[]cpu[]]: *registry.json: entry 'tampered' field 'int8_sha256': "
        "*tampered.int8.onnx has sha256 *, the registry pins 0000000000000000000000000000000000000000000000000000000"
        "000000000*quantgate pin*",
    ])
    assert "Traceback" not in result.stdout.str()


def test_schema_error_names_file_entry_and_json_path_and_spares_the_others(project: GateProject) -> None:
    broken = project.add_sidecar("broken")
    broken["quant_mode"] = "int4"
    no_sha = project.add_sidecar("nosha")
    del no_sha["int8_sha256"]
    project.write([broken, no_sha, project.add_sidecar("fine")])
    result = project.run()
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines([
        "*registry.json: entry 'broken' is invalid: at $.models[[]0[]].quant_mode: 'int4' is not one of "
        "'fp32', 'static', 'dynamic', 'qat'*",
        "*registry.json: entry 'nosha' is invalid: at $.models[[]1[]]: missing required field(s) 'int8_sha256' "
        "(required when quant_mode is 'dynamic')*",
    ])
    assert "Traceback" not in result.stdout.str()


def test_static_entry_without_calibration_set_is_refused_by_the_schema(project: GateProject) -> None:
    project.write([project.add_sidecar("stat", mode="static")])
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*missing required field(s) 'quant_calibration_set' (required when quant_mode "
                                 "is 'static')*"])


def test_malformed_json_is_a_clean_collection_error(project: GateProject) -> None:
    (project.model / "registry.json").write_text('{"schema_version": 1, "models": [}')
    result = project.run()
    result.stdout.fnmatch_lines(["*registry.json:1:*: malformed JSON: *"])
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "Traceback" not in result.stdout.str()


def test_missing_fixture_says_every_place_it_looked(project: GateProject) -> None:
    entry = project.add_sidecar("lonely")
    (project.fixtures / "lonely.npz").unlink()
    entry_named = project.add_sidecar("named", soak_fixture="elsewhere.npz")
    project.write([entry, entry_named])
    result = project.run()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*lonely*soak fixture not found; looked in: *fixtures/lonely.npz (no random data is substituted)*",
        "*named*soak fixture not found; looked in: *model/elsewhere.npz, *fixtures/elsewhere.npz*",
    ])


def test_escaping_and_absolute_paths_are_refused(project: GateProject) -> None:
    up = project.add_sidecar("up")
    up["onnx"] = "../outside.onnx"
    absolute = project.add_sidecar("abs")
    absolute["soak_fixture"] = str(project.fixtures / "abs.npz")
    project.write([up, absolute])
    result = project.run()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*entry 'abs' field 'soak_fixture': '/*abs.npz' is an absolute path*",
        "*entry 'up' field 'onnx': '../outside.onnx' resolves to */outside.onnx, outside the folder*",
    ])


def test_fixture_with_wrong_dtype_is_an_error_naming_the_array(project: GateProject) -> None:
    import numpy as np

    entry = project.add_sidecar("wrongtype")
    data = dict(np.load(project.fixtures / "wrongtype.npz"))
    data["features"] = data["features"].astype(np.float64)
    np.savez(project.fixtures / "wrongtype.npz", **data)
    project.write([entry])
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*wrongtype.npz: array 'features' has dtype float64, model input expects float32*"])


def test_option_values_are_validated_when_parsed(project: GateProject) -> None:
    project.write(healthy(project))
    result = project.run("--quantgate-ep", "tpu")
    result.stderr.fnmatch_lines(["*--quantgate-ep: invalid choice: 'tpu'*cpu*cuda*openvino*auto*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    project.pytester.makeini("[pytest]\nquantgate_decision = optimistic\n")
    result = project.run()
    result.stderr.fnmatch_lines(["*quantgate_decision (ini) = 'optimistic' is invalid; allowed: point, conservative*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_ini_twins_configure_the_gate(project: GateProject) -> None:
    project.write(healthy(project))
    project.pytester.makeini("[pytest]\nquantgate = true\nquantgate_select = beta\nquantgate_ep = cpu\n")
    result = project.pytester.runpytest("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*registry.json::beta[[]cpu[]] PASSED*"])


def test_other_registry_and_fixture_folders(project: GateProject) -> None:
    import shutil

    project.write(healthy(project))
    other = project.root / "elsewhere"
    shutil.copytree(project.model, other / "models")
    shutil.copytree(project.fixtures, other / "soak")
    shutil.rmtree(project.model)
    result = project.run("--quantgate-registry", "elsewhere/models/registry.json",
                         "--quantgate-fixtures", "elsewhere/soak")
    result.assert_outcomes(passed=2)


def test_missing_registry_is_a_usage_error(project: GateProject) -> None:
    result = project.run("--quantgate-registry", "nowhere.json")
    result.stderr.fnmatch_lines(["*quantgate: registry */nowhere.json not found*"])


def test_xdist_workers_agree_and_the_controller_prints_the_summary(project: GateProject) -> None:
    project.write(healthy(project))
    result = project.run("-n", "2")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*quantgate summary*", "alpha*PASS", "beta*PASS"])


def test_multi_input_multi_output_and_stacked_samples(project: GateProject) -> None:
    """Two inputs, two outputs, no batch axis: the fixture's leading axis stacks whole inputs."""
    import modelkit
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = modelkit.fitted_mlp_weights()
    nodes = [
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Gemm", ["ab", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["score"]),
        helper.make_node("Relu", ["h"], ["hidden"]),
    ]
    graph = helper.make_graph(
        nodes, "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, 32])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, project.model / "two.onnx")
    modelkit.quantize_dynamic_file(project.model / "two.onnx", project.model / "two.int8.onnx")
    _, _, tx, ty = modelkit.digits_split()
    half = (tx / 2).astype("float32")
    np.savez(project.fixtures / "two.npz", a=half[:, None, :], b=half[:, None, :], target=ty)
    entry = modelkit.pin({"id": "two", "onnx": "two.onnx", "quant_mode": "dynamic",
                          "quant_target_output": "score"}, project.model)
    project.write([entry])
    result = project.run("-v")
    result.assert_outcomes(passed=1)
    rows = [line for line in result.stdout.lines if line.startswith("two ")]
    assert rows and "1197" in rows[0]


def test_plugin_module_has_no_heavy_imports() -> None:
    code = ("import sys, pytest_quantgate.frontends.plugin; "
            "print(sorted(m for m in ('onnxruntime','torch','onnx','scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


def test_json_report_junit_properties_and_github_summary(project: GateProject, monkeypatch: pytest.MonkeyPatch) -> None:
    import xml.etree.ElementTree as ET

    int8 = onnx.load(project.model / "digits.int8.onnx")
    project.write([project.add_sidecar("good"), project.add_sidecar("fake", affine(int8, 0.5, 10.0))])
    summary = project.root / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = project.run("-n", "2", "--quantgate-report", "out/report.json", "--junitxml", "junit.xml")
    result.assert_outcomes(passed=1, failed=1)
    doc = json.loads((project.root / "out" / "report.json").read_text())
    assert doc["totals"] == {"PASS": 1, "FAIL": 1, "ERROR": 0, "SKIP": 0}
    assert doc["format"] == 2 and [i["id"] for i in doc["items"]] == ["fake", "good"]
    fake, good = doc["items"]
    assert good["verdict"] == "PASS" and fake["verdict"] == "FAIL" and fake["result"]["kind"] == "affine"
    ci = good["result"]["interval"]
    assert ci["low"] <= good["result"]["drop"] <= ci["high"] and ci["level"] == 0.95
    prov = good["result"]["provenance"]
    assert prov["int8"]["sha256"] == sha256_file(project.model / "good.int8.onnx")
    assert prov["ep"] == "cpu" and prov["providers"] == ["CPUExecutionProvider"]
    assert prov["onnxruntime"].startswith("onnxruntime")
    assert prov["system"]["cpu"]["isa"] is not None and prov["system"]["python"]
    assert prov["fixture"]["sha256"] == sha256_file(project.fixtures / "good.npz")
    timing = good["result"]["timing"]
    assert timing["fp32_bytes"] > 0 and timing["int8_bytes"] > 0 and timing["fp32_ms"] > 0 and timing["speedup"] > 0
    # the controller rebuilt each worker's typed outcome from the report attribute xdist carried (-n 2)
    outcomes = {o.entry_id: o for o in read_report(doc)}
    assert outcomes["fake"].result is not None and outcomes["fake"].result.kind == "affine"
    props = {p.get("name"): p.get("value") for p in ET.parse(project.root / "junit.xml").iter("property")}
    assert props["quantgate_verdict"] in ("PASS", "FAIL") and float(props["quantgate_drop"]) < 0.01
    text = summary.read_text()
    assert "| `good` | cpu | dynamic | 1197 |" in text and "❌ FAIL" in text


def test_cache_skips_unchanged_passing_items_and_reruns_changed_ones(project: GateProject) -> None:
    project.write([project.add_sidecar("steady")])
    args = ("-p", "cacheprovider", "--quantgate-cache")
    first = project.pytester.runpytest("--quantgate", *args)
    first.assert_outcomes(passed=1)
    second = project.pytester.runpytest("--quantgate", *args)
    second.assert_outcomes(skipped=1)
    second.stdout.fnmatch_lines(["steady*PASS (cached)"])
    # changing the budget changes the key: the item is measured again
    entry = json.loads((project.model / "registry.json").read_text())["models"][0]
    entry["quant_accuracy_budget_plcc"] = 0.02
    project.write([entry])
    third = project.pytester.runpytest("--quantgate", *args)
    third.assert_outcomes(passed=1)


def test_strict_mode_turns_an_unresolvable_fixture_into_an_error(project: GateProject) -> None:
    import numpy as np

    entry = project.add_sidecar("tiny", fixture="digits_notarget.npz")
    data = dict(np.load(project.fixtures / "tiny.npz"))
    np.savez(project.fixtures / "tiny.npz", features=data["features"][:40])
    project.write([entry])
    project.run("--quantgate-report", "r.json").assert_outcomes(passed=1)
    drop = json.loads((project.root / "r.json").read_text())["items"][0]["result"]["drop"]
    # a budget equal to the point estimate lies inside the interval: 40 samples cannot resolve it
    project.write([{**entry, "quant_accuracy_budget_plcc": drop * 1.05}])
    warned = project.run("-W", "default")
    warned.assert_outcomes(passed=1)
    warned.stdout.fnmatch_lines(["*straddles the budget*this fixture cannot resolve the verdict; about * samples would*"])
    strict = project.run("--quantgate-strict")
    strict.assert_outcomes(errors=1)
    strict.stdout.fnmatch_lines(["*quantgate ERROR: tiny [[]cpu[]]:*straddles the budget*(--quantgate-strict)*"])


def test_an_unreadable_outcome_from_a_worker_is_that_items_error_not_an_internal_error(project: GateProject) -> None:
    """The controller rebuilds each outcome from its report; one that does not load loses nothing else."""
    project.write([project.add_sidecar("good"), project.add_sidecar("other")])
    project.pytester.makeconftest('''
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report):
    data = getattr(report, "quantgate_outcome", None)
    if data is not None and data["id"] == "other":
        report.quantgate_outcome = {**data, "status": "bogus"}
''')
    result = project.run("--quantgate-report", "r.json")
    result.assert_outcomes(passed=2)
    assert "INTERNALERROR" not in result.stdout.str()
    items = {i["id"]: i for i in json.loads((project.root / "r.json").read_text())["items"]}
    assert items["good"]["verdict"] == "PASS" and items["other"]["verdict"] == "ERROR"
    assert "Outcome.status: 'bogus' is not one of" in items["other"]["reason"]


def test_a_later_check_turns_a_passing_verdict_once(project: GateProject) -> None:
    """quant_min_speedup fails a healthy sidecar through the same path as lineage and a rebuild's review."""
    project.write([project.add_sidecar("slow", quant_min_speedup=1000.0)])
    result = project.run("-v")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*slow*int8 speedup x* is below quant_min_speedup x1000*"])
