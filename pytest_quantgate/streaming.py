"""Streaming, mergeable statistics of fp32-vs-int8 outputs: memory O(samples × channels), never O(elements).

Each chunk of outputs is folded into per-sample, per-channel float64 sums and then dropped. The sums are
*shifted* (every channel's values minus a constant taken from the first chunk, close to the channel's mean),
so the one-pass formulas for variance and covariance do not cancel catastrophically. Everything the verdict
needs follows from them: PLCC, slope and offset, RMSE, mean and max absolute error, and the paired bootstrap
(a replicate is a weighted sum of per-sample rows). Rank correlations and plots come from a bounded, seeded,
per-sample reservoir of element triples.

Mergeable: the per-sample rows of two accumulators over disjoint samples of one fixture combine by
:meth:`PairAccumulator.merge` (rows are placed by sample index; shifts are reconciled exactly), so a fixture
can be split across xdist workers or CI shards and the verdict computed from the merged sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# per-sample, per-channel fields: counts, shifted sums, shifted products, absolute/squared/max differences
N, SA, SB, ST, SAA, SBB, STT, SAB, SAT, SBT, SAD, SDD, MAD = range(13)
FIELDS = 13
# elements converted to float64 at once: bounds the temporaries (1 MiB each) whatever the output size, and keeps
# them in cache between the passes over a block
BLOCK_ELEMENTS = 1 << 17
# element triples kept for rank correlations and plots, per output
RESERVOIR = 20_000


def _splitmix(seed: int, index: int) -> int:
    # a stateless per-sample seed: the same sample gets the same reservoir positions whatever the chunking
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x


@dataclass(frozen=True)
class Sums:
    """Summed fields of one output (or channel) over samples, with the shifts they were taken around."""

    values: np.ndarray  # (..., FIELDS)
    shift: np.ndarray  # (3,) shifts of a, b, t

    def plcc(self, x: int, y: int) -> np.ndarray:
        """Return PLCC between two of a (0), b (1), t (2) for every leading index."""
        v = self.values
        sx, sy = (SA, SB, ST)[x], (SA, SB, ST)[y]
        sxx, syy = (SAA, SBB, STT)[x], (SAA, SBB, STT)[y]
        sxy = {(0, 1): SAB, (0, 2): SAT, (1, 2): SBT}[(x, y)]
        n = v[..., N]
        cov = v[..., sxy] - v[..., sx] * v[..., sy] / n
        var_x = v[..., sxx] - v[..., sx] ** 2 / n
        var_y = v[..., syy] - v[..., sy] ** 2 / n
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(cov / np.sqrt(var_x * var_y))


class PairAccumulator:
    """Per-sample, per-channel float64 sums of one output: fp32 ``a``, int8 ``b``, optional target ``t``."""

    def __init__(self, samples: int, channels: int, *, with_target: bool, seed: int,
                 reservoir: int = RESERVOIR) -> None:
        self.samples = samples
        self.channels = channels
        self.with_target = with_target
        self.seed = seed
        self.stats = np.zeros((samples, channels, FIELDS), dtype=np.float64)
        self.seen = np.zeros(samples, dtype=bool)
        self.shift: np.ndarray | None = None  # (3, channels)
        self.per_sample = max(1, math.ceil(reservoir / max(samples, 1)))
        self.picks: dict[int, np.ndarray] = {}  # sample -> (k, 3) reservoir triples

    def _set_shift(self, a: np.ndarray, b: np.ndarray, t: np.ndarray | None) -> None:
        # a channel's first-chunk mean: exact for a constant channel (float32 values summed in float64)
        shift = np.zeros((3, self.channels))
        shift[0] = a.mean(axis=(0, 2), dtype=np.float64)
        shift[1] = b.mean(axis=(0, 2), dtype=np.float64)
        if t is not None:
            shift[2] = t.mean(axis=(0, 2), dtype=np.float64)
        self.shift = np.where(np.isfinite(shift), shift, 0.0)

    def add(self, start: int, a: np.ndarray, b: np.ndarray, t: np.ndarray | None = None,
            base: np.ndarray | None = None) -> None:
        """Fold samples ``start .. start+len(a)`` in; arrays are (n, channels, m); ``base`` is subtracted first."""
        count, channels = a.shape[0], self.channels
        if self.shift is None:
            first = slice(0, min(count, 8))
            offset = 0.0 if base is None else base[first].astype(np.float64)
            self._set_shift(a[first].astype(np.float64) - offset, b[first].astype(np.float64) - offset,
                            None if t is None else t[first].astype(np.float64) - offset)
        assert self.shift is not None
        m = a.shape[2]
        rows = count * channels
        stats = self.stats[start : start + count].reshape(rows, FIELDS)  # a view: rows are (sample, channel)
        stats[:, N] = m
        self._reservoir(start, a, b, t, base)
        if rows and m:
            # one (sample, channel) row of m elements at a time, in blocks of rows: the float64 copies of a block
            # stay in cache across the passes below (measured ~2x faster than
            # 8 MiB blocks of whole samples)
            flat = [x.reshape(rows, m) for x in (a, b) + (() if t is None else (t,))]
            lean = None if base is None else base.reshape(rows, m)
            shifts = [np.tile(self.shift[k], count)[:, None] for k in range(3 if t is not None else 2)]
            per = max(1, min(rows, BLOCK_ELEMENTS // m))
            buffers = np.empty((4 if t is not None else 3, per, m))
            for lo in range(0, rows, per):
                hi = min(rows, lo + per)
                self._fold(stats[lo:hi], [x[lo:hi] for x in flat], None if lean is None else lean[lo:hi],
                           [x[lo:hi] for x in shifts], buffers[:, : hi - lo])
        self.seen[start : start + count] = True

    @staticmethod
    def _fold(out: np.ndarray, raw: list[np.ndarray], base: np.ndarray | None, shifts: list[np.ndarray],
              buffers: np.ndarray) -> None:
        # every value is converted to float64 once, straight into a buffer, and shifted on the way (the same
        # float64 operations as converting, subtracting the base and then the shift)
        D = buffers[0]
        shifted = [buffers[1 + k] for k in range(len(raw))]
        if base is None:
            for value, shift, into in zip(raw, shifts, shifted):
                np.subtract(value, shift, out=into, dtype=np.float64)
            np.subtract(raw[1], raw[0], out=D, dtype=np.float64)
        else:
            for value, into in zip(raw, shifted):
                np.subtract(value, base, out=into, dtype=np.float64)
            np.subtract(shifted[1], shifted[0], out=D)
            for shift, into in zip(shifts, shifted):
                into -= shift
        A, B = shifted[0], shifted[1]
        out[:, SDD] = _dots(D, D)
        np.abs(D, out=D)
        out[:, SAD] = D.sum(axis=1)
        out[:, MAD] = D.max(axis=1)
        out[:, SA] = A.sum(axis=1)
        out[:, SB] = B.sum(axis=1)
        out[:, SAA] = _dots(A, A)
        out[:, SBB] = _dots(B, B)
        out[:, SAB] = _dots(A, B)
        if len(shifted) == 3:
            T = shifted[2]
            out[:, ST] = T.sum(axis=1)
            out[:, STT] = _dots(T, T)
            out[:, SAT] = _dots(A, T)
            out[:, SBT] = _dots(B, T)

    def _reservoir(self, start: int, a: np.ndarray, b: np.ndarray, t: np.ndarray | None,
                   base: np.ndarray | None) -> None:
        # a stratified sample of each sample's elements: k evenly spaced positions behind an offset drawn from
        # (seed, sample index) alone, so the same sample keeps the same positions whatever the chunking
        count = a.shape[0]
        size = a[0].size
        if count == 0 or size == 0:
            for i in range(count):
                self.picks[start + i] = np.zeros((0, 3))
            return
        k = min(self.per_sample, size)
        stride = max(1, size // k)
        offsets = np.array([_splitmix(self.seed, start + i) % stride for i in range(count)], dtype=np.int64)
        pos = offsets[:, None] + np.arange(k, dtype=np.int64)[None, :] * stride
        rows = np.arange(count)[:, None]
        offset = 0.0 if base is None else base.reshape(count, -1)[rows, pos].astype(np.float64)
        triple = np.empty((count, k, 3))
        triple[..., 0] = a.reshape(count, -1)[rows, pos].astype(np.float64) - offset
        triple[..., 1] = b.reshape(count, -1)[rows, pos].astype(np.float64) - offset
        if t is not None:
            triple[..., 2] = t.reshape(count, -1)[rows, pos].astype(np.float64) - offset
        else:
            triple[..., 2] = np.nan
        for i in range(count):
            self.picks[start + i] = triple[i]

    def merge(self, other: PairAccumulator) -> PairAccumulator:
        """Return the accumulator of both halves of a split fixture (disjoint samples, same layout)."""
        if other.shift is None or self.shift is None:
            return self if other.shift is None else other
        merged = PairAccumulator(self.samples, self.channels, with_target=self.with_target, seed=self.seed)
        merged.shift = self.shift.copy()
        merged.stats = self.stats.copy()
        merged.seen = self.seen | other.seen
        merged.picks = {**self.picks, **other.picks}
        moved = shift_rows(other.stats[other.seen], other.shift, self.shift)
        merged.stats[other.seen] = moved
        return merged

    # --- results -----------------------------------------------------------------------------------------

    def channel_sums(self, weights: np.ndarray | None = None) -> Sums:
        """Return per-channel sums over samples: (channels, F), or (B, channels, F) for weight rows (B, S)."""
        assert self.shift is not None
        if weights is None:
            values = self.stats.sum(axis=0)
            values[..., MAD] = self.stats[..., MAD].max(axis=0)
        else:
            from .metrics import weighted_sum

            values = weighted_sum(weights, self.stats)
        return Sums(values, self.shift)

    def output_rows(self) -> np.ndarray:
        """Return per-sample rows of the whole output (channels combined around one shift), (S, F)."""
        assert self.shift is not None
        target = self.shift.mean(axis=1)
        rows = shift_rows(self.stats, self.shift, target[:, None] * np.ones_like(self.shift))
        out = rows.sum(axis=1)
        out[:, MAD] = rows[..., MAD].max(axis=1)
        return np.asarray(out)

    def output_shift(self) -> np.ndarray:
        """Return the shift of :meth:`output_rows`."""
        assert self.shift is not None
        return np.asarray(self.shift.mean(axis=1))

    def reservoir(self) -> np.ndarray:
        """Return the kept element triples (k, 3) in sample order (unshifted; column 2 NaN without a target)."""
        if not self.picks:
            return np.zeros((0, 3))
        return np.concatenate([self.picks[i] for i in sorted(self.picks)], axis=0)

    def nonfinite(self) -> tuple[bool, bool, int]:
        """Return (fp32 has NaN/inf, int8 has NaN/inf, samples affected), read off the sums."""
        bad_a = ~np.isfinite(self.stats[..., SAA]).all(axis=1)
        bad_b = ~np.isfinite(self.stats[..., SBB]).all(axis=1)
        return bool(bad_a.any()), bool(bad_b.any()), int((bad_a | bad_b).sum())

    def disagreement(self) -> np.ndarray:
        """Return each sample's mean squared int8-vs-fp32 error relative to the output's variance, (S,)."""
        rows = self.output_rows()
        n = rows[:, N].sum()
        var = (rows[:, SAA].sum() - rows[:, SA].sum() ** 2 / n) / n if n else 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            score = rows[:, SDD] / np.maximum(rows[:, N], 1) / (var if var > 0 else 1.0)
        return np.asarray(np.where(np.isfinite(score), score, np.inf))


def _dots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return the dot product of each row pair of two (rows, m) float64 arrays."""
    # einsum, not a batched matmul: matmul hands long rows to BLAS, which may start threads; on this shared
    # 2-core machine one such run took 2.1 s instead of 0.3 s, while einsum's single-threaded loop stays steady
    return np.asarray(np.einsum("rm,rm->r", x, y))


def shift_rows(rows: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Re-express sums taken around ``old`` shifts (3, C) as sums around ``new`` shifts; rows (..., C, F)."""
    d = old - new
    da, db, dt = d[0], d[1], d[2]
    out = rows.copy()
    n = rows[..., N]
    sa, sb, st = rows[..., SA], rows[..., SB], rows[..., ST]
    out[..., SA] = sa + n * da
    out[..., SB] = sb + n * db
    out[..., ST] = st + n * dt
    out[..., SAA] = rows[..., SAA] + 2 * da * sa + n * da * da
    out[..., SBB] = rows[..., SBB] + 2 * db * sb + n * db * db
    out[..., STT] = rows[..., STT] + 2 * dt * st + n * dt * dt
    out[..., SAB] = rows[..., SAB] + db * sa + da * sb + n * da * db
    out[..., SAT] = rows[..., SAT] + dt * sa + da * st + n * da * dt
    out[..., SBT] = rows[..., SBT] + dt * sb + db * st + n * db * dt
    return out


def pair_moments(rows: np.ndarray, x: int, y: int) -> np.ndarray:
    """Return the (S, ..., 6) moments [n, Σx, Σy, Σx², Σy², Σxy] of two of a (0), b (1), t (2)."""
    sums = (SA, SB, ST)
    squares = (SAA, SBB, STT)
    cross = {(0, 1): SAB, (0, 2): SAT, (1, 2): SBT}[(x, y)]
    return np.stack([rows[..., N], rows[..., sums[x]], rows[..., sums[y]], rows[..., squares[x]],
                     rows[..., squares[y]], rows[..., cross]], axis=-1)


class LabelAccumulator:
    """Per-sample counts of elements where int8 and fp32 disagree: labels, or argmax along an axis."""

    def __init__(self, samples: int) -> None:
        self.counts = np.zeros((samples, 2), dtype=np.float64)  # [mismatches, total]

    def add(self, start: int, a: np.ndarray, b: np.ndarray) -> None:
        """Fold samples ``start .. start+len(a)`` of two label arrays (n, ...) in."""
        count = a.shape[0]
        flat_a = a.reshape(count, -1)
        flat_b = b.reshape(count, -1)
        self.counts[start : start + count, 0] = (flat_a != flat_b).sum(axis=1)
        self.counts[start : start + count, 1] = flat_a.shape[1]

    def rate(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Return the flip rate, or one per weight row (B, S)."""
        if weights is None:
            total = self.counts.sum(axis=0)
            return np.asarray(total[0] / total[1] if total[1] else 0.0)
        from .metrics import weighted_sum

        sums = weighted_sum(weights, self.counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(sums[:, 0] / sums[:, 1])


def plcc_of(moments: np.ndarray) -> np.ndarray:
    """Return PLCC from moments [..., 6] = [n, Σx, Σy, Σx², Σy², Σxy]."""
    n, sx, sy, sxx, syy, sxy = (moments[..., i] for i in range(6))
    cov = sxy - sx * sy / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n)))


def describe_sums(values: np.ndarray, shift: np.ndarray, x: int, y: int, sample: np.ndarray) -> dict[str, Any]:
    """Return PairMetrics fields of ``y`` against ``x`` from summed fields (F,) and a reservoir (k, 3)."""
    # scipy.stats for the rank statistics (the project's rule: a kept library before our own); importing it costs
    # ~0.6 s of a fresh process, which the README's speed table counts
    from scipy import stats

    rows = values
    n = float(rows[N])
    sums = (SA, SB, ST)
    squares = (SAA, SBB, STT)
    cross = {(0, 1): SAB, (0, 2): SAT, (1, 2): SBT}[(x, y)]
    sx, sy = float(rows[sums[x]]), float(rows[sums[y]])
    var_x = float(rows[squares[x]]) - sx * sx / n
    var_y = float(rows[squares[y]]) - sy * sy / n
    cov = float(rows[cross]) - sx * sy / n
    mean_x, mean_y = sx / n + float(shift[x]), sy / n + float(shift[y])
    plcc = cov / math.sqrt(var_x * var_y) if var_x > 0 and var_y > 0 else float("nan")
    slope = cov / var_x if var_x > 0 else float("nan")
    std_x = math.sqrt(max(var_x, 0.0) / n)
    srocc = krcc = float("nan")
    keep = sample[:, [x, y]]
    keep = keep[np.isfinite(keep).all(axis=1)]
    if keep.shape[0] >= 3 and np.ptp(keep[:, 0]) > 0 and np.ptp(keep[:, 1]) > 0:
        srocc = float(stats.spearmanr(keep[:, 0], keep[:, 1]).statistic)
        krcc = float(stats.kendalltau(keep[:, 0], keep[:, 1]).statistic)
    if (x, y) == (0, 1):
        rmse = math.sqrt(max(float(rows[SDD]), 0.0) / n)
        mae = float(rows[SAD]) / n
        max_abs = float(rows[MAD])
    else:
        # errors against the target are not accumulated (only int8 vs fp32 has budgets on them)
        rmse = mae = max_abs = float("nan")
    return {
        "n": int(n), "plcc": plcc, "srocc": srocc, "krcc": krcc, "rmse": rmse, "mae": mae, "max_abs": max_abs,
        "slope": slope, "intercept": mean_y - slope * mean_x,
        "offset_rel": abs(mean_y - mean_x) / std_x if std_x > 0 else math.inf,
    }
