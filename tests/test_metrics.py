"""Metrics against hand-computed values, degenerate outputs, and the bootstrap's reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_quantgate.engine.metrics import DegenerateOutputError, DropTerm, bootstrap_drop, check_finite_and_varying, pair_metrics, samples_needed
from pytest_quantgate.records import Interval

X = np.array([1.0, 2.0, 3.0, 4.0])
Y = np.array([2.0, 4.0, 5.0, 4.0])


def test_pair_metrics_match_hand_computed_values() -> None:
    m = pair_metrics(X, Y)
    # PLCC: cov 3.5 / sqrt(5 * 4.75)
    assert m.plcc == pytest.approx(3.5 / math.sqrt(23.75), abs=1e-12)
    # SROCC: ranks of y are 1, 2.5, 4, 2.5 -> 3 / sqrt(5 * 4.5)
    assert m.srocc == pytest.approx(3 / math.sqrt(22.5), abs=1e-12)
    # KRCC (tau-b): 4 concordant, 1 discordant, one tie in y -> 3 / sqrt(6 * 5)
    assert m.krcc == pytest.approx(3 / math.sqrt(30), abs=1e-12)
    assert m.rmse == pytest.approx(1.5)
    assert m.mae == pytest.approx(1.25)
    assert m.max_abs == pytest.approx(2.0)
    assert m.slope == pytest.approx(0.7)
    assert m.intercept == pytest.approx(2.0)


def test_affine_copy_has_perfect_plcc_but_visible_gain_and_offset() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000)
    m = pair_metrics(x, 0.5 * x + 10)
    assert m.plcc == pytest.approx(1.0)
    assert m.slope == pytest.approx(0.5)
    assert m.offset_rel > 1.0


def test_float32_inputs_are_computed_in_float64() -> None:
    x = np.linspace(0, 1, 2_000_000, dtype=np.float32) + np.float32(1000)
    assert pair_metrics(x, x.copy()).plcc == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (np.array([1.0, np.nan, 2.0]), "nonfinite"),
        (np.array([1.0, np.inf, 2.0]), "nonfinite"),
        (np.full(10, 3.0), "constant"),
        (np.array([7.0]), "constant"),
    ],
)
def test_degenerate_outputs_are_refused(values: np.ndarray, kind: str) -> None:
    with pytest.raises(DegenerateOutputError) as info:
        check_finite_and_varying(values, "int8 output 'y'")
    assert info.value.kind == kind
    assert "int8 output 'y'" in str(info.value)


def test_drop_term_point_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 4))
    test = ref + rng.normal(scale=0.2, size=ref.shape)
    term = DropTerm(ref, test)
    assert term.point() == pytest.approx(1 - pair_metrics(ref, test).plcc, abs=1e-10)
    target = ref + rng.normal(scale=0.5, size=ref.shape)
    with_target = DropTerm(ref, test, target)
    expected = pair_metrics(ref, target).plcc - pair_metrics(test, target).plcc
    assert with_target.point() == pytest.approx(expected, abs=1e-10)


def test_bootstrap_is_seeded_and_brackets_the_point_estimate() -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(size=500)
    test = ref + rng.normal(scale=0.1, size=500)
    term = DropTerm(ref[:, None], test[:, None])
    a = bootstrap_drop([term], 500, 400, seed=5, level=0.95)
    b = bootstrap_drop([term], 500, 400, seed=5, level=0.95)
    c = bootstrap_drop([term], 500, 400, seed=6, level=0.95)
    assert a == b
    assert a != c
    assert a.low < term.point() < a.high
    assert bootstrap_drop([term], 500, 0, seed=5, level=0.95) is None


def test_samples_needed_only_when_the_interval_straddles_the_budget() -> None:
    assert samples_needed(100, Interval(0.001, 0.003, 0.95, 100), 0.002, 0.01) is None
    needed = samples_needed(100, Interval(0.006, 0.012, 0.95, 100), 0.009, 0.01)
    assert needed == math.ceil(100 * (0.003 / 0.001) ** 2)
    # a drop exactly on the budget: unresolved, and no sample count would resolve it
    assert samples_needed(100, Interval(0.006, 0.012, 0.95, 100), 0.01, 0.01) == 0


def test_bootstrap_of_a_term_with_many_channels_is_bounded_in_memory() -> None:
    """25 200 channels (a YOLOv5-style head judged per anchor): replicates are batched by channels too."""
    import tracemalloc

    from pytest_quantgate.engine.metrics import BOOTSTRAP_VALUES, MomentTerm, bootstrap_drop

    rng = np.random.default_rng(0)
    samples, channels = 100, 25_200
    a = rng.normal(size=(samples, channels, 8))
    b = a + rng.normal(scale=0.05, size=a.shape)
    moments = np.stack([np.full(a.shape[:2], 8.0), a.sum(-1), b.sum(-1), (a * a).sum(-1), (b * b).sum(-1),
                        (a * b).sum(-1)], axis=-1)
    del a, b
    term = MomentTerm(moments)
    tracemalloc.start()
    interval = bootstrap_drop([term], samples, 200, seed=1, level=0.95)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert interval is not None and 0.0 < interval.low <= interval.high < 0.05
    # unbatched, one batch of 200 replicates would sum (200, 25 200, 6) float64: 242 MB; batched it stays near
    # a few arrays of BOOTSTRAP_VALUES float64 (32 MB each)
    assert peak < 6 * BOOTSTRAP_VALUES * 8, f"{peak / 2**20:.0f} MiB"
