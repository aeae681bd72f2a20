"""Rank correlations in numpy equal scipy.stats' values: random data, heavy ties, constant and tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pytest_quantgate.ranks import average_ranks, inversions, kendall_tau_b, spearman


def _cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=5000)
    cases = [
        ("continuous", x, x + rng.normal(scale=0.5, size=x.size)),
        ("anti", x, -x + rng.normal(scale=0.1, size=x.size)),
        # quantised outputs: few distinct values, so most pairs are tied in one or both arrays
        ("ties", np.round(x * 2) / 2, np.round(x + rng.normal(scale=0.3, size=x.size))),
        ("ties-both", rng.integers(0, 4, size=999).astype(float), rng.integers(0, 3, size=999).astype(float)),
        ("odd", rng.normal(size=7), rng.normal(size=7)),
        ("three", np.array([1.0, 2.0, 2.0]), np.array([3.0, 1.0, 2.0])),
        ("float32", x.astype(np.float32), (x * 3 + 1).astype(np.float32)),
    ]
    return cases


@pytest.mark.parametrize("name, x, y", _cases(), ids=[c[0] for c in _cases()])
def test_rank_correlations_equal_scipy(name: str, x: np.ndarray, y: np.ndarray) -> None:
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_average_ranks_equal_scipy_rankdata() -> None:
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, -1.0, 2.0])
    np.testing.assert_array_equal(average_ranks(values), stats.rankdata(values))


def test_inversions_count_every_out_of_order_pair() -> None:
    rng = np.random.default_rng(5)
    values = rng.integers(0, 20, size=300)
    brute = sum(int((values[i] > values[i + 1:]).sum()) for i in range(values.size))
    assert inversions(values) == brute
    assert inversions(np.arange(10)) == 0
    assert inversions(np.arange(10)[::-1]) == 45


def test_a_constant_input_has_no_rank_correlation() -> None:
    x = np.ones(50)
    y = np.arange(50.0)
    assert np.isnan(spearman(x, y)) and np.isnan(kendall_tau_b(x, y))
    with pytest.warns(stats.ConstantInputWarning):  # scipy agrees: no correlation of a constant
        assert np.isnan(stats.spearmanr(x, y).statistic) and np.isnan(stats.kendalltau(x, y).statistic)
