"""Agreement metrics in float64 (scipy.stats) and a paired, seeded bootstrap of the PLCC drop."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from ..records import Interval, PairMetrics


class DegenerateOutputError(ValueError):
    """An output is NaN/inf or constant, so a correlation is meaningless; always a failure."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "nonfinite" | "constant"


def check_finite_and_varying(values: np.ndarray, label: str) -> None:
    """Raise DegenerateOutputError when ``values`` holds NaN/inf or has no spread."""
    finite = np.isfinite(values)
    if not finite.all():
        nan = int(np.isnan(values).sum())
        inf = int(np.isinf(values).sum())
        raise DegenerateOutputError("nonfinite", f"{label} has {nan} NaN and {inf} inf value(s) of {values.size}")
    if values.size < 2 or float(np.ptp(values)) == 0.0:
        raise DegenerateOutputError("constant", f"{label} is constant ({values.flat[0]!r} everywhere)")


RANK_LIMIT = 20_000


def rank_subsample(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``x, y`` or, beyond RANK_LIMIT elements, the same evenly spaced subsample of both."""
    if x.size <= RANK_LIMIT:
        return x, y
    index = np.linspace(0, x.size - 1, num=RANK_LIMIT).astype(np.int64)
    return x[index], y[index]


def pair_metrics(x: np.ndarray, y: np.ndarray) -> PairMetrics:
    """Return PLCC, SROCC, KRCC, RMSE, mean/max absolute error and the regression of ``y`` on ``x``."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs {y.shape}")
    diff = y - x
    plcc = float(stats.pearsonr(x, y).statistic)
    # rank correlations are descriptive (the verdict uses PLCC and the absolute checks) and O(n log n) with a
    # large constant: on more than RANK_LIMIT elements they use a fixed, evenly spaced subsample
    rx, ry = rank_subsample(x, y)
    srocc = float(stats.spearmanr(rx, ry).statistic)
    krcc = float(stats.kendalltau(rx, ry).statistic)
    fit = stats.linregress(x, y)
    std_x = float(np.std(x))
    offset = float(fit.intercept + (fit.slope - 1.0) * float(np.mean(x)))
    return PairMetrics(
        n=int(x.size),
        plcc=plcc,
        srocc=srocc,
        krcc=krcc,
        rmse=float(np.sqrt(np.mean(diff * diff))),
        mae=float(np.mean(np.abs(diff))),
        max_abs=float(np.max(np.abs(diff))),
        slope=float(fit.slope),
        intercept=float(fit.intercept),
        offset_rel=abs(offset) / std_x if std_x > 0 else math.inf,
    )


def weighted_sum(weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Return ``weights`` (B, S) times ``rows`` (S, ...) summed over samples: (B, ...)."""
    # einsum's own loop, not tensordot: BLAS's gemm starts threads on these shapes, and beside ORT (or another
    # process) on 2 cores a 1000-replicate bootstrap then took 4-260 ms instead of a steady 4-9 ms (measured)
    flat = rows.reshape(rows.shape[0], -1)
    return np.asarray(np.einsum("bs,sf->bf", weights, flat)).reshape(weights.shape[0], *rows.shape[1:])


def _sample_moments(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample sufficient statistics [n, Σa, Σb, Σa², Σb², Σab] of centred float64 data, shape (S, 6)."""
    samples = a.shape[0]
    a = a.reshape(samples, -1)
    b = b.reshape(samples, -1)
    # centring on the global means keeps the one-pass formulas free of cancellation
    a = a - a.mean()
    b = b - b.mean()
    n = np.full(samples, a.shape[1], dtype=np.float64)
    return np.stack([n, a.sum(1), b.sum(1), (a * a).sum(1), (b * b).sum(1), (a * b).sum(1)], axis=1)


def _plcc_from_sums(sums: np.ndarray) -> np.ndarray:
    n, sa, sb, saa, sbb, sab = (sums[:, i] for i in range(6))
    cov = sab - sa * sb / n
    var_a = saa - sa * sa / n
    var_b = sbb - sb * sb / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(cov / np.sqrt(var_a * var_b))


@dataclass(frozen=True)
class DropTerm:
    """One output's contribution to the drop: ``1 − PLCC(ref, test)`` or ``PLCC(ref, t) − PLCC(test, t)``.

    With a target and ``implied=True`` the drop is the larger of the target drop and the *implied* drop
    ``PLCC(ref, t) · (1 − PLCC(ref, test))``: the drop the int8 deviations from fp32 would cause were they
    unrelated to the target (for ``test = ref + e`` with ``e`` independent of ``ref`` and ``t``,
    ``PLCC(test, t) = PLCC(ref, t) · PLCC(ref, test)`` exactly). Quantisation error is such a deviation, so for a
    healthy sidecar both agree; a sidecar whose deviations happen to line up with the target (another model of
    similar quality, or chance on a small fixture) shows a small target drop but a large implied one.
    """

    ref: np.ndarray  # (samples, ...) float64
    test: np.ndarray
    target: np.ndarray | None = None
    implied: bool = False

    @cached_property
    def term(self) -> MomentTerm:
        """Return the same drop as a :class:`MomentTerm` over this data's per-sample moments."""
        if self.target is None:
            return MomentTerm(_sample_moments(self.ref, self.test))
        return MomentTerm(_sample_moments(self.ref, self.test), _sample_moments(self.ref, self.target),
                          _sample_moments(self.test, self.target), implied=self.implied)

    def point(self) -> float:
        """Return the drop on the full fixture (moment formulas; pair_metrics gives the scipy value)."""
        return self.term.point()

    def parts(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (target drop, implied drop) per row of sample weights; without a target both are 1 − PLCC."""
        return self.term.parts(weights)

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """Return the drop for each row of sample weights (bootstrap counts), shape (B,)."""
        return self.term.replicates(weights)


@dataclass(frozen=True)
class MomentTerm:
    """A drop computed from per-sample moments ``[n, Σx, Σy, Σx², Σy², Σxy]`` (S, 6), or (S, K, 6) for K
    channels whose worst counts; see :class:`DropTerm` for the target and implied-drop rules.

    A channel whose fp32 values are constant carries no signal and is skipped (``mask``); an int8 channel
    that is constant where fp32 varies has an undefined PLCC and counts as a drop of 1 (collapsed).
    """

    ref_test: np.ndarray
    ref_t: np.ndarray | None = None
    test_t: np.ndarray | None = None
    implied: bool = False
    mask: np.ndarray | None = None  # (K,) channels that count

    def _plcc(self, moments: np.ndarray, weights: np.ndarray) -> np.ndarray:
        summed = weighted_sum(weights, moments)
        return _plcc_from_sums(summed.reshape(-1, 6)).reshape(summed.shape[:-1])

    def point(self) -> float:
        """Return the drop on the full fixture."""
        return float(self.replicates(np.ones((1, self.ref_test.shape[0])))[0])

    @property
    def width(self) -> int:
        """Return the float64 values one replicate sums (6 per channel): what bounds a replicate batch."""
        return int(np.prod(self.ref_test.shape[1:]))

    def parts(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (target drop, implied drop) per weight row, worst channel; without a target both are 1 − PLCC."""
        fidelity = 1.0 - self._plcc(self.ref_test, weights)
        fidelity = np.where(np.isfinite(fidelity), fidelity, 1.0)
        if fidelity.ndim == 2:
            if self.mask is not None:
                fidelity = np.where(self.mask[None, :], fidelity, -np.inf)
            fidelity = fidelity.max(axis=1)
        if self.ref_t is None or self.test_t is None:
            return fidelity, fidelity
        plcc_ref_t = self._plcc(self.ref_t, weights)
        return plcc_ref_t - self._plcc(self.test_t, weights), plcc_ref_t * fidelity

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """Return the drop for each row of sample weights (bootstrap counts), shape (B,)."""
        target_drop, implied_drop = self.parts(weights)
        if self.ref_t is not None and self.implied:
            return np.asarray(np.maximum(target_drop, implied_drop))
        return np.asarray(target_drop)


BOOTSTRAP_VALUES = 4_000_000


class Term(Protocol):
    """Anything whose value can be recomputed for rows of bootstrap sample weights (B, S)."""

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """Return one value per weight row."""


def bootstrap_drop(terms: Sequence[Term], samples: int, replicates: int, seed: int, level: float) -> Interval | None:
    """Paired bootstrap over samples of the overall drop (max over terms); None when disabled.

    The same resampled sample indices serve fp32, int8 and target, so the interval is of the *paired*
    difference. Drawing is seeded, so the interval is reproducible run to run and across xdist workers.
    """
    if replicates <= 0 or samples < 2:
        return None
    rng = np.random.default_rng(seed)
    drops = np.full(replicates, -np.inf)
    # a batch of replicates holds (batch, samples) weights and (batch, width) sums per term: ≤ 4 M values each
    # (32 MiB), so a detector head judged per anchor (thousands of channels) costs no more than a scalar output
    width = max((int(getattr(term, "width", 1)) for term in terms), default=1)
    chunk = max(1, min(replicates, BOOTSTRAP_VALUES // max(samples, width, 1)))
    for start in range(0, replicates, chunk):
        count = min(chunk, replicates - start)
        # counts of each sample among `samples` uniform draws with replacement, one row per replicate: one
        # bincount over flattened (row, index) pairs is ~20x faster than Generator.multinomial here
        draws = rng.integers(0, samples, size=(count, samples))
        draws += np.arange(count)[:, None] * samples
        weights = np.bincount(draws.ravel(), minlength=count * samples).reshape(count, samples).astype(np.float64)
        block = np.full(count, -np.inf)
        for term in terms:
            block = np.maximum(block, term.replicates(weights))
        drops[start : start + count] = block
    finite = drops[np.isfinite(drops)]
    if finite.size == 0:
        return None
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return Interval(float(low), float(high), level, int(replicates))


def samples_needed(samples: int, interval: Interval, drop: float, budget: float) -> int | None:
    """Estimate the sample count at which the interval would clear the budget (half-width ∝ 1/√n).

    Returns None when the interval already lies on one side of the budget, and 0 when no sample count can
    resolve it (the drop sits exactly on the budget).
    """
    if interval.high <= budget or interval.low > budget:
        return None
    half = (interval.high - interval.low) / 2.0
    margin = abs(budget - drop)
    if margin == 0.0:
        return 0
    return math.ceil(samples * (half / margin) ** 2)
