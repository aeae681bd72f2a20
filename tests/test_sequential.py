"""Three-way verdicts and the sequential mode: the confidence sequence's error rate over repeated looks (simulated
on synthetic per-sample statistics), its early stopping, its state as a function of mergeable rows, and the option
end to end through pytester."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import modelkit
import numpy as np
import pytest
from conftest import GateProject

from pytest_quantgate.engine import sequential as sq
from pytest_quantgate.engine.comparison import CompareOptions, compare
from pytest_quantgate.engine.metrics import MomentTerm, bootstrap_drop
from pytest_quantgate.engine.streaming import PairAccumulator, pair_moments
from pytest_quantgate.io.soak import Fixture, TensorSpec
from pytest_quantgate.records import GateResult, Interval, Outcome, read_report

ALPHA = 0.05
ELEMENTS = 8  # values per sample


def sample_rows(rng: np.random.Generator, samples: int, drop: float, df: float | None = None) -> np.ndarray:
    """Return per-sample moment rows [n, Σa, Σb, Σa², Σb², Σab] of outputs whose population drop is ``drop``.

    fp32 values share a per-sample effect (values of one sample correlate, as an image's pixels do); int8 adds
    independent noise, Gaussian or Student-t with ``df`` degrees of freedom, scaled so that 1 − PLCC = drop.
    """
    noise_var = 2.0 / (1.0 - drop) ** 2 - 2.0  # Var(a) = 2: PLCC = sqrt(2 / (2 + noise_var))
    a = rng.standard_normal((samples, 1)) + rng.standard_normal((samples, ELEMENTS))
    z = rng.standard_normal((samples, ELEMENTS)) if df is None else (
        rng.standard_t(df, (samples, ELEMENTS)) / math.sqrt(df / (df - 2.0)))
    b = a + math.sqrt(noise_var) * z
    return np.stack([np.full(samples, float(ELEMENTS)), a.sum(1), b.sum(1), (a * a).sum(1), (b * b).sum(1),
                     (a * b).sum(1)], axis=1)


def run_sequential(rows: np.ndarray, budget: float, chunk: int = 64, naive: bool = False, seed: int = 0
                   ) -> tuple[str | None, int]:
    """Look after every chunk; return (the first decisive verdict or None, samples used)."""
    total = rows.shape[0]
    k = 0
    for k in range(chunk, total + 1, chunk):
        if k < sq.MIN_LOOK:
            continue
        term = MomentTerm(rows[:k])
        interval = (bootstrap_drop([term], k, 100, seed, 1 - ALPHA) if naive
                    else sq.confidence_sequence([term], k, total, 1 - ALPHA))
        assert interval is not None
        verdict = sq.three_way(interval, budget)
        if verdict != "INCONCLUSIVE":
            return verdict, k
    return None, k


def error_rate(reps: int, samples: int, drop: float, budget: float, seed: int, **kwargs: Any
               ) -> tuple[float, float]:
    """Return (share of runs with a decisive verdict, mean share of samples used) over seeded replications."""
    rng = np.random.default_rng(seed)
    decisive, used = 0, 0.0
    df = kwargs.pop("df", None)
    for rep in range(reps):
        verdict, k = run_sequential(sample_rows(rng, samples, drop, df), budget, seed=rep, **kwargs)
        decisive += verdict is not None
        used += k / samples
    return decisive / reps, used / reps


def tolerance(reps: int) -> float:
    """Return three Monte-Carlo standard errors of a rate of ALPHA over ``reps`` replications."""
    return 3.0 * math.sqrt(ALPHA * (1 - ALPHA) / reps)


# --- the influence values and the boundary ----------------------------------------------------------------------


def _directional(term: MomentTerm, unit: int, h: float = 1e-5) -> float:
    weights = np.ones((2, term.ref_test.shape[0]))
    weights[0, unit] += h
    weights[1, unit] -= h
    up, down = term.replicates(weights)
    return float((up - down) / (2 * h))


def test_influence_matches_the_derivative_of_the_drop_in_every_form() -> None:
    """The analytic derivative along each unit's row equals finite differences of MomentTerm's own drop: plain,
    with a target (target and implied drop), and per channel (the worst channel)."""
    rng = np.random.default_rng(3)
    rows = sample_rows(rng, 200, 0.05)
    ref = rng.normal(size=(200, 3, 5))
    test = ref + rng.normal(scale=[0.1, 0.4, 0.2], size=(3,))[None, :, None] * rng.normal(size=ref.shape)
    target = ref + rng.normal(scale=0.5, size=ref.shape)
    other = ref + 0.3 * rng.normal(size=ref.shape)  # another model: the implied drop leads

    def moments(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.stack([np.full(x.shape[:2], 5.0), x.sum(-1), y.sum(-1), (x * x).sum(-1), (y * y).sum(-1),
                         (x * y).sum(-1)], axis=-1)

    flat = [np.stack([m[:, :, i].sum(1) for i in range(6)], 1) for m in (moments(ref, test), moments(ref, target),
                                                                          moments(test, target))]
    flat_other = [np.stack([m[:, :, i].sum(1) for i in range(6)], 1)
                  for m in (moments(ref, other), moments(ref, target), moments(other, target))]
    terms = [MomentTerm(rows), MomentTerm(*flat, implied=True), MomentTerm(*flat, implied=False),
             MomentTerm(*flat_other, implied=True), MomentTerm(moments(ref, test), mask=np.array([True, True, True])),
             MomentTerm(moments(ref, test), mask=np.array([True, False, True]))]
    for term in terms:
        drop, derivative = sq.term_influence(term)
        assert drop == pytest.approx(term.point(), abs=1e-12)
        assert abs(float(derivative.sum())) < 1e-9 * float(np.abs(derivative).sum())  # scale invariance
        scale = float(np.abs(derivative).max())
        for unit in (0, 17, 199):
            assert derivative[unit] == pytest.approx(_directional(term, unit), rel=1e-4, abs=1e-5 * scale)


def test_standard_error_agrees_with_the_bootstrap() -> None:
    rows = sample_rows(np.random.default_rng(1), 1000, 0.05)
    _, derivative = sq.drop_influence([MomentTerm(rows)])
    se = sq.standard_error(derivative)
    interval = bootstrap_drop([MomentTerm(rows)], 1000, 2000, 0, 0.95)
    assert interval is not None
    assert se == pytest.approx((interval.high - interval.low) / (2 * 1.959964), rel=0.1)


def test_boundary_is_the_gaussian_mixture_of_the_paper() -> None:
    """Radius in standard errors: sqrt(2(tρ²+1)/(tρ²) · log(sqrt(tρ²+1)/α)); at t* = planned it is 3.04 for α =
    0.05 (the price of anytime validity against 1.96), and it is smallest near t*."""
    rho = sq.mixture_rho(1000, ALPHA)
    assert rho == pytest.approx(math.sqrt((-2 * math.log(ALPHA) + math.log(1 - 2 * math.log(ALPHA))) / 1000))
    at_plan = sq.mixture_radius(1000, ALPHA, rho)
    assert at_plan == pytest.approx(3.035, abs=0.01)
    for other in (300, 3000):  # tuned for another sample count, the sequence is wider at 1000 samples
        assert sq.mixture_radius(1000, ALPHA, sq.mixture_rho(other, ALPHA)) > at_plan


# --- the simulation: error rate over repeated looks -------------------------------------------------------------


def test_sequence_keeps_the_error_rate_at_alpha_over_20_looks() -> None:
    """A sidecar exactly at its budget: any decisive verdict is wrong. Looking after every 64-sample chunk of a
    1280-sample fixture (20 looks), the confidence sequence stays under α (measured 1.5%)."""
    reps = 1000
    rate, used = error_rate(reps, 1280, 0.05, 0.05, seed=11)
    assert rate <= ALPHA + tolerance(reps), rate
    assert used > 0.9  # at the budget it runs (nearly) the whole fixture: nothing settles it


def test_sequence_keeps_the_error_rate_with_heavy_tailed_errors() -> None:
    """Student-t(5) quantisation noise (finite fourth moments, which PLCC's own CLT needs): still under α."""
    reps = 600
    rate, _ = error_rate(reps, 1280, 0.05, 0.05, seed=12, df=5.0)
    assert rate <= ALPHA + tolerance(reps), rate


def test_rechecking_the_fixed_sample_bootstrap_after_every_chunk_exceeds_alpha() -> None:
    """The same looks with the fixed-sample bootstrap interval: the luckiest of 20 looks decides far more often
    than α (measured ≈ 1/3). This is what the sequence replaces, and it shows the test above can fail."""
    reps = 150
    rate, _ = error_rate(reps, 1280, 0.05, 0.05, seed=13, naive=True)
    assert rate > ALPHA + tolerance(reps), rate


@pytest.mark.parametrize(("drop", "verdict", "most"), [(0.005, "PASS", 0.1), (0.02, "PASS", 0.15),
                                                       (0.1, "FAIL", 0.15)])
def test_far_from_the_budget_it_stops_early(drop: float, verdict: str, most: float) -> None:
    """Budget 0.05: a drop ten times under it, 2.5 times under or twice over settles within the first looks."""
    rng = np.random.default_rng(21)
    used = []
    for _ in range(40):
        found, k = run_sequential(sample_rows(rng, 1280, drop), 0.05)
        assert found == verdict
        used.append(k / 1280)
    assert float(np.mean(used)) <= most


# --- shards: the state is a function of mergeable rows -----------------------------------------------------------


def test_merged_shards_give_the_same_sequence_as_one_run() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(300, 2, 7))
    b = a + 0.2 * rng.normal(size=a.shape)
    whole = PairAccumulator(300, 2, with_target=False, seed=0)
    whole.add(0, a, b)
    first = PairAccumulator(300, 2, with_target=False, seed=0)
    second = PairAccumulator(300, 2, with_target=False, seed=0)
    first.add(0, a[:120], b[:120])
    second.add(120, a[120:], b[120:])
    merged = first.merge(second)

    def interval(acc: PairAccumulator) -> Interval | None:
        return sq.confidence_sequence([MomentTerm(pair_moments(acc.output_rows(), 0, 1))], 300, 600, 0.95)

    one, both = interval(whole), interval(merged)
    assert one is not None and both is not None
    assert both.low == pytest.approx(one.low, rel=1e-9) and both.high == pytest.approx(one.high, rel=1e-9)


# --- the three-way rule on a fixed sample ------------------------------------------------------------------------

INPUTS = (TensorSpec("x", "tensor(float)", ("N", 1)),)
OUTPUTS = (TensorSpec("y", "tensor(float)", ("N", 1)),)


def _entry(**extra: Any) -> Any:
    return modelkit.registry_entry(**extra)


def _compare(budget: float, **options: Any) -> GateResult:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 1))
    test = ref + rng.normal(scale=0.12, size=ref.shape)
    fixture = Fixture(Path("soak.npz"), "0", {"x": ref.astype(np.float32)}, None)
    return compare(_entry(quant_accuracy_budget_plcc=budget), "cpu", fixture, INPUTS, OUTPUTS, {"y": ref},
                   {"y": test}, CompareOptions(**options))


def test_three_way_rule_pass_fail_inconclusive() -> None:
    probe = _compare(1.0)
    assert probe.interval is not None
    low, drop, high = probe.interval.low, probe.drop, probe.interval.high
    assert drop is not None
    assert _compare(high * 1.2, decision="three-way").verdict == "PASS"
    failed = _compare(low * 0.8, decision="three-way")
    assert failed.verdict == "FAIL" and f"(lower 95% bound {low:.6f})" in failed.reason
    # the point rule fails a drop over the budget; three-way calls it unresolved while the interval straddles
    budget = (low + drop) / 2
    assert _compare(budget).verdict == "FAIL"
    unsure = _compare(budget, decision="three-way")
    assert unsure.verdict == "INCONCLUSIVE" and unsure.kind == "inconclusive" and not unsure.passed
    assert unsure.needed_samples is not None and unsure.needed_samples > 200
    assert unsure.reason == (f"INCONCLUSIVE: the 95% interval [{low:.6f}, {high:.6f}] straddles the budget "
                             f"{budget:g}; about {unsure.needed_samples - 200} more samples would settle it")
    assert GateResult.from_json(json.loads(json.dumps(unsure.to_json()))) == unsure


def test_sequential_options_give_the_sequence_interval_wider_than_the_bootstrap() -> None:
    fixed = _compare(1.0)
    seq = _compare(1.0, decision="three-way", sequential=True)
    assert fixed.interval is not None and seq.interval is not None and seq.interval.replicates == 0
    assert seq.interval.high - seq.interval.low > 1.2 * (fixed.interval.high - fixed.interval.low)


# --- end to end ----------------------------------------------------------------------------------------------------


def _drop_of(project: GateProject, entry_id: str) -> float:
    report = project.root / "probe.json"
    project.run("--quantgate-ep", "cpu", "--quantgate-report", str(report))
    items = read_report(json.loads(report.read_text()))
    result = next(o.result for o in items if o.entry_id == entry_id)
    assert result is not None and result.drop is not None
    return result.drop


def test_sequential_stops_early_and_the_report_shows_the_samples_used(project: GateProject) -> None:
    project.write([project.add_sidecar("clear", quant_accuracy_budget_plcc=0.5)])
    report = project.root / "out.json"
    run = project.run("--quantgate-ep", "cpu", "--quantgate-sequential", "--quantgate-report", str(report))
    run.assert_outcomes(passed=1)
    outcome = read_report(json.loads(report.read_text()))[0]
    seq = outcome.result.sequential if outcome.result is not None else None
    assert seq is not None and seq.stopped_early and seq.samples_used < seq.samples_planned
    assert outcome.result is not None and outcome.result.samples == seq.samples_used
    assert outcome.result.decision == "three-way" and outcome.result.interval is not None
    text = run.stdout.str()
    assert f"{seq.samples_used}/{seq.samples_planned}" in text
    assert f"sequential: stopped early after {seq.samples_used} of {seq.samples_planned} samples" in text


def test_an_entry_with_a_fixed_sample_check_runs_its_whole_fixture(project: GateProject) -> None:
    # a judged argmax view is a fixed-sample check: a stop on the drop would decide it on the first samples
    project.write([project.add_sidecar("flips", quant_accuracy_budget_plcc=0.5, quant_argmax_axis=1,
                                       quant_channel_axis=None, quant_budget_label_flip=1.0)])
    report = project.root / "out.json"
    run = project.run("--quantgate-ep", "cpu", "--quantgate-sequential", "--quantgate-report", str(report))
    run.assert_outcomes(passed=1)
    outcome = read_report(json.loads(report.read_text()))[0]
    seq = outcome.result.sequential if outcome.result is not None else None
    assert seq is not None and not seq.stopped_early and seq.samples_used == seq.samples_planned


def test_inconclusive_is_its_own_outcome_and_strict_makes_it_an_error(project: GateProject) -> None:
    project.write([project.add_sidecar("edge", quant_accuracy_budget_plcc=0.5)])
    drop = _drop_of(project, "edge")
    project.write([project.add_sidecar("edge", quant_accuracy_budget_plcc=round(drop, 6))])
    report = project.root / "out.json"
    run = project.run("--quantgate-ep", "cpu", "--quantgate-decision", "three-way", "--quantgate-report",
                      str(report), "-rx")
    run.assert_outcomes(xfailed=1)
    text = run.stdout.str()
    assert "INCONCLUSIVE: the 95% interval [" in text and "more samples would settle it" in text
    document = json.loads(report.read_text())
    assert document["totals"]["INCONCLUSIVE"] == 1
    outcome = Outcome.from_json(document["items"][0])
    assert outcome.status == "inconclusive" and outcome.verdict == "INCONCLUSIVE"
    assert any(line.split()[-1] == "INCONCLUSIVE" for line in text.splitlines() if line.startswith("edge"))
    strict = project.run("--quantgate-ep", "cpu", "--quantgate-decision", "three-way", "--quantgate-strict")
    strict.assert_outcomes(errors=1)
    assert "(--quantgate-strict)" in strict.stdout.str()


def test_decision_choice_is_validated(project: GateProject) -> None:
    project.write([project.add_sidecar("m")])
    run = project.run("--quantgate-ep", "cpu", "--quantgate-decision", "three_way")
    assert run.ret != 0
    assert "three-way" in run.stderr.str()
