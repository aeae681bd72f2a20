"""Statistics of the verdict: the paired, seeded bootstrap interval, the decision rules, the minimum sample count
(warning, or error in strict mode) and the MLPerf-style relative budget; in memory and through pytester."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import modelkit
import numpy as np
import onnx
import pytest
from conftest import GateProject, rounded_weights

from pytest_quantgate.engine import comparison
from pytest_quantgate.engine.comparison import CompareOptions, compare
from pytest_quantgate.engine.metrics import DropTerm, bootstrap_drop, samples_needed
from pytest_quantgate.errors import FixtureError
from pytest_quantgate.io.registry import parse_registry
from pytest_quantgate.io.soak import Fixture, TensorSpec
from pytest_quantgate.records import GateResult

INPUTS = (TensorSpec("x", "tensor(float)", ("N", 1)),)
OUTPUTS = (TensorSpec("y", "tensor(float)", ("N", 1)),)


def _entry(**extra: Any) -> Any:
    return modelkit.registry_entry(**extra)


def _data(n: int = 300, noise: float = 0.06, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fp32 output, int8 output (fp32 + quantisation-like noise) and a target the fp32 model predicts."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, 1))
    target = ref + rng.normal(scale=0.6, size=(n, 1))
    test = ref + rng.normal(scale=noise, size=(n, 1))
    return ref, test, target


def _run(entry: Any, ref: np.ndarray, test: np.ndarray, target: np.ndarray | None,
         **options: Any) -> GateResult:
    fixture = Fixture(Path("soak.npz"), "0", {"x": ref.astype(np.float32)}, target)
    return compare(entry, "cpu", fixture, INPUTS, OUTPUTS, {"y": ref}, {"y": test}, CompareOptions(**options))


# --- the interval --------------------------------------------------------------------------------------------


def test_interval_is_reproducible_for_a_seed_and_moves_with_it() -> None:
    ref, test, target = _data()
    entry = _entry()
    a, b = _run(entry, ref, test, target), _run(entry, ref, test, target)
    c = _run(entry, ref, test, target, seed=1)
    assert a.interval == b.interval and a.interval is not None
    assert c.interval != a.interval
    assert a.interval.low <= a.drop <= a.interval.high
    # the stream depends on the entry id, not on the order entries are gated in
    other = _run(_entry(), ref, test, target)
    assert other.interval == a.interval


def test_interval_is_paired_identical_outputs_give_a_zero_width_interval() -> None:
    """Every replicate resamples fp32, int8 and target with the same indices: identical outputs have drop 0 in
    every replicate (an unpaired bootstrap would spread around 0)."""
    ref, _, target = _data()
    interval = bootstrap_drop([DropTerm(ref, ref.copy(), target, implied=True)], len(ref), 300, 3, 0.95)
    assert interval is not None
    assert interval.low == pytest.approx(0.0, abs=1e-12) and interval.high == pytest.approx(0.0, abs=1e-12)


def test_implied_drop_catches_a_different_model_of_equal_quality() -> None:
    """A 'sidecar' that is another predictor of the target, as good as fp32, has target drop ≈ 0 but does not
    track the fp32 output: the implied drop PLCC(fp32,t)·(1 − PLCC(fp32,int8)) fails it."""
    rng = np.random.default_rng(5)
    signal = rng.normal(size=(2000, 1))
    target = signal + rng.normal(scale=0.3, size=signal.shape)
    ref = signal + rng.normal(scale=0.3, size=signal.shape)
    other = signal + rng.normal(scale=0.3, size=signal.shape)
    result = _run(_entry(), ref, other, target)
    target_drop = result.outputs[0].fp32_vs_target.plcc - result.outputs[0].int8_vs_target.plcc
    assert abs(target_drop) < 0.01
    assert result.verdict == "FAIL" and result.kind == "drop"
    assert "implied by int8 vs fp32 PLCC" in result.reason


# --- the decision rule -----------------------------------------------------------------------------------------


def test_decision_rule_is_documented_in_the_module_docstring() -> None:
    doc = comparison.__doc__ or ""
    for phrase in ("The decision rule", "``point``", "``conservative``", "upper bound", "resampl",
                   "--quantgate-strict", "quant_budget_relative"):
        assert phrase in doc, phrase


def _budgets() -> tuple[np.ndarray, np.ndarray, np.ndarray, GateResult]:
    ref, test, target = _data(n=200, noise=0.12)
    probe = _run(_entry(quant_accuracy_budget_plcc=1.0), ref, test, target)
    assert probe.interval is not None and probe.interval.low < probe.drop < probe.interval.high
    return ref, test, target, probe


@pytest.mark.parametrize(("where", "point", "conservative", "straddles"), [
    ("above the interval", "PASS", "PASS", False),
    ("between drop and upper bound", "PASS", "FAIL", True),
    ("between lower bound and drop", "FAIL", "FAIL", True),
    ("below the interval", "FAIL", "FAIL", False),
])
def test_point_and_conservative_rules(where: str, point: str, conservative: str, straddles: bool) -> None:
    ref, test, target, probe = _budgets()
    low, drop, high = probe.interval.low, probe.drop, probe.interval.high
    budget = {"above the interval": high * 1.5, "between drop and upper bound": (drop + high) / 2,
              "between lower bound and drop": (low + drop) / 2, "below the interval": low / 2}[where]
    entry = _entry(quant_accuracy_budget_plcc=budget)
    by_point = _run(entry, ref, test, target)
    by_bound = _run(entry, ref, test, target, decision="conservative")
    assert (by_point.verdict, by_bound.verdict) == (point, conservative)
    assert by_point.interval == by_bound.interval == probe.interval
    assert (by_point.needed_samples is not None) is straddles
    if by_bound.verdict == "FAIL":
        assert f"(upper 95% bound {high:.6f})" in by_bound.reason
    if straddles:
        assert by_point.needed_samples > probe.samples
        assert f"about {by_point.needed_samples} samples would" in by_point.warnings[-1]


@pytest.mark.parametrize("decision", ["point", "conservative"])
def test_a_resolved_verdict_survives_30_resampled_fixtures(decision: str) -> None:
    """When the interval clears the budget, bootstrap-resampled fixtures give the same verdict."""
    ref, test, target, probe = _budgets()
    for budget, verdict in ((probe.interval.high * 1.5, "PASS"), (probe.interval.low / 2, "FAIL")):
        entry = _entry(quant_accuracy_budget_plcc=budget)
        for seed in range(30):
            index = np.random.default_rng(seed).integers(0, len(ref), len(ref))
            result = _run(entry, ref[index], test[index], target[index], bootstrap=0, decision=decision)
            assert result.verdict == verdict, (budget, seed, result.reason)


# --- relative budgets (MLPerf style) -------------------------------------------------------------------------


def test_relative_budget_passes_and_fails_against_r_times_the_fp32_metric() -> None:
    ref, test, target = _data(n=1000, noise=0.2)
    loose = _run(_entry(quant_budget_relative=0.9), ref, test, target)
    tight = _run(_entry(quant_budget_relative=0.999), ref, test, target)
    fp32_t = loose.outputs[0].fp32_vs_target.plcc
    int8_t = loose.outputs[0].int8_vs_target.plcc
    assert int8_t >= 0.9 * fp32_t and int8_t < 0.999 * fp32_t
    assert loose.verdict == "PASS" and loose.budget == pytest.approx(0.1 * fp32_t)
    assert "quant_budget_relative 0.9" in loose.reason
    assert tight.verdict == "FAIL" and tight.kind == "relative"
    assert tight.budget == pytest.approx(0.001 * fp32_t)
    assert "int8 PLCC vs target must be >= 0.999 × fp32 PLCC vs target" in tight.reason


def test_relative_budget_and_an_explicit_plcc_budget_the_tighter_wins() -> None:
    ref, test, target = _data(n=1000, noise=0.2)
    both = _run(_entry(quant_budget_relative=0.9, quant_accuracy_budget_plcc=0.0001), ref, test, target)
    assert both.budget == pytest.approx(0.0001) and both.verdict == "FAIL"


def test_relative_budget_without_a_target_names_the_entry_and_field() -> None:
    ref, test, _ = _data()
    with pytest.raises(FixtureError, match=r"entry 'synthetic' field 'quant_budget_relative': the soak fixture "
                                           r"soak\.npz has no 'target' array"):
        _run(_entry(quant_budget_relative=0.99), ref, test, None)


@pytest.mark.parametrize("value", [0, -0.1, 1.01, "0.99"])
def test_relative_budget_schema_bounds(value: Any) -> None:
    raw = {"id": "r", "onnx": "r.onnx", "quant_budget_relative": value}
    registry = parse_registry({"schema_version": 1, "models": [raw]}, Path("registry.json"))
    assert not registry.entries
    assert "quant_budget_relative" in registry.problems[0].message


def test_relative_budget_is_described_in_the_schema() -> None:
    from pytest_quantgate.io.registry import load_schema

    spec = load_schema()["$defs"]["entry"]["properties"]["quant_budget_relative"]
    assert spec["exclusiveMinimum"] == 0 and spec["maximum"] == 1
    assert "MLPerf" in spec["description"] and "target" in spec["description"]


# --- through pytester: CI in every verdict and the summary; rules; minimum sample count -----------------------


def _tiny(project: GateProject, samples: int) -> None:
    """Cut the entry's fixture to its first ``samples`` samples."""
    path = project.fixtures / "tiny.npz"
    with np.load(path) as z:
        data = {k: z[k][:samples] for k in z.files}
    np.savez(path, **data)


def _straddling_budget(project: GateProject) -> tuple[float, Any]:
    """Measure the tiny entry as pytest will (same seed stream, 200 replicates); return a budget between the
    point drop and the upper bound, and the result."""
    from pytest_quantgate.io.registry import load_registry
    from pytest_quantgate.runner import gate
    from pytest_quantgate.settings import Settings

    path = project.model / "registry.json"
    registry = load_registry(path)
    settings = Settings(enabled=True, registry=path, fixtures_dir=project.fixtures, eps=("cpu",),
                        regen="never", bootstrap=200)
    result = gate.evaluate(gate.prepare(registry, registry.entry("tiny"), "cpu", settings), settings)
    return (result.drop + result.interval.high) / 2, result


@pytest.fixture
def tiny(project: GateProject) -> tuple[GateProject, float, Any]:
    fp32 = onnx.load(project.model / "digits.onnx")
    # a float graph with rounded weights stands in for quantisation noise: not a real sidecar, so no lineage check
    entry = project.add_sidecar("tiny", rounded_weights(fp32, 0.05), quant_budget_slope=0.5, quant_lineage=False)
    _tiny(project, 60)
    project.write([entry])
    budget, result = _straddling_budget(project)
    entry["quant_accuracy_budget_plcc"] = round(budget, 8)
    project.write([entry, project.add_sidecar("fine")])
    # what the gate will say at that budget
    needed = samples_needed(result.samples, result.interval, result.drop, entry["quant_accuracy_budget_plcc"])
    return project, entry["quant_accuracy_budget_plcc"], replace(result, needed_samples=needed)


def test_ci_is_in_the_summary_and_in_every_failure(project: GateProject) -> None:
    fp32 = onnx.load(project.model / "digits.onnx")
    project.write([project.add_sidecar("fine"),
                   project.add_sidecar("coarse", rounded_weights(fp32, 0.25), quant_budget_slope=0.5)])
    result = project.run("--quantgate-ep", "cpu")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*quantgate FAILED: coarse*PLCC drop*",
        "*drop * vs budget 0.01, 95% CI [[]0.*, 0.*[]]; 1197 samples; decision rule: point*",
    ])
    result.stdout.fnmatch_lines(["id*drop*CI*budget*verdict", "coarse*[[]0.*, 0.*[]]*FAIL",
                                 "fine*[[]*, *[]]*PASS"])
    # the same seed gives the same interval on a second run; another seed gives another
    def ci(run: pytest.RunResult) -> list[str]:
        return [re.search(r"\[[^\]]+\]", line).group(0) for line in run.stdout.lines if line.startswith("coarse ")]

    first = ci(result)
    assert first
    assert ci(project.run("--quantgate-ep", "cpu")) == first
    assert ci(project.run("--quantgate-ep", "cpu", "--quantgate-seed", "7")) != first


def test_too_small_fixture_warns_by_default_with_the_samples_needed(tiny: tuple[GateProject, float, Any]) -> None:
    project, budget, measured = tiny
    result = project.run("--quantgate-ep", "cpu")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        f"*quantgate tiny [[]cpu[]]: the 95% interval [[]*[]] straddles the budget {budget:g}: this fixture cannot "
        f"resolve the verdict; about {measured.needed_samples} samples would*",
    ])
    assert measured.needed_samples > 60


def test_too_small_fixture_is_an_error_in_strict_mode(tiny: tuple[GateProject, float, Any]) -> None:
    project, budget, measured = tiny
    result = project.run("--quantgate-ep", "cpu", "--quantgate-strict")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        f"*quantgate ERROR: tiny [[]cpu[]]:*straddles the budget {budget:g}*about {measured.needed_samples} "
        f"samples would*(--quantgate-strict)*",
    ])
    assert "Traceback" not in result.stdout.str()


def test_conservative_rule_fails_what_the_point_rule_passes(tiny: tuple[GateProject, float, Any]) -> None:
    project, budget, measured = tiny
    result = project.run("--quantgate-ep", "cpu", "--quantgate-decision", "conservative")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        f"*quantgate FAILED: tiny [[]cpu[]] mode=dynamic: PLCC drop * > budget {budget:g} (upper 95% bound "
        f"{measured.interval.high:.6f}) on output 'score'*",
        "*decision rule: conservative*",
    ])


def test_strict_cli_measure_exits_2_for_an_unresolved_fixture(tiny: tuple[GateProject, float, Any],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_quantgate.frontends import cli

    project, _, _ = tiny
    args = ["measure", str(project.model / "registry.json"), "--fixtures", str(project.fixtures), "--ep", "cpu",
            "--bootstrap", "200"]
    assert cli.main(args) == 0
    assert cli.main([*args, "--strict"]) == 2
    assert "straddles the budget" in capsys.readouterr().out


def test_relative_budget_through_pytester(project: GateProject) -> None:
    fp32 = onnx.load(project.model / "digits.onnx")
    project.write([
        project.add_sidecar("rel_ok", quant_budget_relative=0.9),
        project.add_sidecar("rel_bad", rounded_weights(fp32, 0.25), quant_budget_relative=0.999,
                            quant_budget_slope=0.5),
    ])
    result = project.run("--quantgate-ep", "cpu")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*quantgate FAILED: rel_bad [[]cpu[]] mode=dynamic: PLCC drop * > budget * on output 'score' "
        "(quant_budget_relative 0.999: int8 PLCC vs target must be >= 0.999 × fp32 PLCC vs target 0.*)*",
    ])
    rows = {line.split()[0]: line for line in result.stdout.lines if line.startswith("rel_")}
    assert "PASS" in rows["rel_ok"] and "FAIL" in rows["rel_bad"]
