"""Streaming, mergeable statistics of fp32-vs-int8 outputs: memory O(units × channels), never O(elements).

Each chunk of outputs is folded into per-sample, per-channel float64 sums and then dropped. The sums are
*shifted* (every channel's values minus a constant taken from the first chunk, close to the channel's mean),
so the one-pass formulas for variance and covariance do not cancel catastrophically. Everything the verdict
needs follows from them: PLCC, slope and offset, RMSE, mean and max absolute error, and the paired bootstrap
(a replicate is a weighted sum of rows). Rank correlations and plots come from a bounded, seeded reservoir of
element triples.

Units: what a row of sums stands for. Up to a cap (:data:`MAX_UNITS` samples, fewer when the outputs have so many
channels that the rows would pass :data:`STATE_BYTES`) every sample keeps its own row and the bootstrap resamples
samples. Past the cap the rows are *blocks*: sample ``i`` is summed into block ``hash(seed, i) mod units``, a
fixed random partition that depends on the sample's index alone (so any chunking, order or xdist split gives the
same blocks), and the bootstrap resamples blocks. Each block's sums are a sum of iid per-sample sums and the
random partition keeps the blocks exchangeable, so resampling blocks with replacement reproduces the variance of
every sum that resampling samples gives: the interval agrees with the per-sample bootstrap within Monte-Carlo
error, and the state stays ``units × channels × 13`` float64 (the sums of :class:`Field`) whatever the sample
count. Below the cap the numbers are the per-sample ones, bit for bit. The reservoir and the worst samples (for
the diagnosis) are bounded the same way: past the cap they keep the samples of lowest hash priority and the
highest-scoring samples of each output.

Mergeable: two accumulators over disjoint samples of one fixture combine by :meth:`PairAccumulator.merge`
(rows add up, shifts are reconciled exactly), so a fixture can be split across xdist workers or CI shards and
the verdict computed from the merged sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Self

import numpy as np


class Field(IntEnum):
    """The columns of a row of sums, one row per (unit, channel): ``a`` fp32, ``b`` int8, ``t`` the target.

    ``a``, ``b`` and ``t`` are each taken minus their channel's shift (``PairAccumulator.shift``), so the one-pass
    variance and covariance formulas do not cancel; the errors ``b − a`` are taken unshifted (the shifts of ``a``
    and ``b`` differ, and an error is what the budgets are in).
    """

    COUNT = 0  # n: elements folded into the row
    SUM_A = 1  # Σa
    SUM_B = 2  # Σb
    SUM_T = 3  # Σt (0 without a target)
    SUM_AA = 4  # Σa²
    SUM_BB = 5  # Σb²
    SUM_TT = 6  # Σt²
    SUM_AB = 7  # Σab
    SUM_AT = 8  # Σat
    SUM_BT = 9  # Σbt
    SUM_ABS_ERR = 10  # Σ|b − a|: the mean absolute error
    SUM_SQ_ERR = 11  # Σ(b − a)²: the RMSE and each sample's disagreement
    MAX_ABS_ERR = 12  # max |b − a|: a maximum, so merging rows takes the max where every other field adds


FIELDS = len(Field)
# the fields of each of a (0), b (1), t (2), the selectors of pair_moments, describe_sums and Sums.plcc
SUM_OF = (Field.SUM_A, Field.SUM_B, Field.SUM_T)
SQUARE_OF = (Field.SUM_AA, Field.SUM_BB, Field.SUM_TT)
PRODUCT_OF = {(0, 1): Field.SUM_AB, (0, 2): Field.SUM_AT, (1, 2): Field.SUM_BT}
# elements converted to float64 at once: bounds the temporaries (1 MiB each) whatever the output size, and keeps
# them in cache between the passes over a block
BLOCK_ELEMENTS = 1 << 17
# element triples kept for rank correlations and plots, per output
RESERVOIR = 20_000
# samples that keep a row of their own; past this many the rows are hashed blocks (module docstring)
MAX_UNITS = 1 << 16
# the rows of one fixture's statistics (units × channels × FIELDS float64, every output together) stay under this
# unless that leaves fewer than MIN_UNITS rows: 256 MiB holds 2.5 M rows of a scalar output, 2 520 of 1024 channels
STATE_BYTES = 256 << 20
# fewer blocks than this would make the bootstrap's variance itself noisy (relative error about sqrt(2 / units))
MIN_UNITS = 256
# past the cap, the samples of highest disagreement kept per output for the diagnosis
WORST_KEPT = 256
_MASK = (1 << 64) - 1
_BLOCK_SALT = 0x5851F42D4C957F2D
_RESERVOIR_SALT = 0x14057B7EF767814F


def _splitmix(seed: int, index: np.ndarray) -> np.ndarray:
    """Return each sample's stateless reservoir seed, so a sample keeps its positions whatever the chunking."""
    # (seed·c1 + index·c2 + 1) mod 2^64, then one xorshift: uint64 arrays wrap modulo 2^64 as the masked ints did
    x = np.uint64((seed * 0x9E3779B97F4A7C15 + 1) & _MASK) + index.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
    return np.asarray(x ^ (x >> np.uint64(31)))


def _mix(seed: int, salt: int, index: np.ndarray) -> np.ndarray:
    """Return a well-mixed 64-bit hash of (seed, salt, index) for each index (splitmix64's finaliser)."""
    z = np.uint64((seed * 0x9E3779B97F4A7C15 + salt) & _MASK) + index.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return np.asarray(z)


@dataclass(frozen=True)
class Units:
    """Where each sample's sums go: a row of its own up to a cap, else one of ``count`` hashed blocks."""

    samples: int
    count: int
    seed: int = 0

    @classmethod
    def plan(cls, samples: int, seed: int, channels: int = 1, cap: int | None = None) -> Units:
        """Return the units of rows holding ``channels`` channels in all: at most ``cap``, within STATE_BYTES."""
        fits = STATE_BYTES // (max(channels, 1) * FIELDS * 8)
        limit = min(MAX_UNITS if cap is None else cap, max(MIN_UNITS, fits))
        return cls(samples, max(0, min(samples, limit)), seed)

    @property
    def blocked(self) -> bool:
        """Return whether samples share rows (hashed blocks) rather than keeping one each."""
        return self.count < self.samples

    def of(self, start: int, count: int) -> np.ndarray | None:
        """Return the block of each sample ``start .. start+count``; None when every sample is its own row."""
        if not self.blocked:
            return None
        index = np.arange(start, start + count, dtype=np.uint64)
        return np.asarray(_mix(self.seed, _BLOCK_SALT, index) % np.uint64(self.count)).astype(np.intp)


def _scatter(into: np.ndarray, units: np.ndarray, rows: np.ndarray) -> None:
    """Add per-sample rows (n, C, F) into their blocks of ``into`` (U, C, F); MAX_ABS_ERR is a max, not a sum."""
    table = into.reshape(into.shape[0], -1)  # (U, C·F), a view of the state
    assert np.shares_memory(table, into)
    values = rows.reshape(units.size, -1)
    mad = np.flatnonzero(np.arange(table.shape[1]) % FIELDS == Field.MAX_ABS_ERR)
    if units.size * 8 < table.shape[0]:
        # the gate's chunks (64 samples): unbuffered adds of whole rows, ~25 µs; then MAX_ABS_ERR put back and maxed
        kept = table[units[:, None], mad[None, :]]
        np.add.at(table, units, values)
        table[units[:, None], mad[None, :]] = kept
    else:
        # large chunks: a bincount per column is ~5x faster than ufunc.at (measured on 2^18 samples)
        for column in np.flatnonzero(np.arange(table.shape[1]) % FIELDS != Field.MAX_ABS_ERR):
            table[:, column] += np.bincount(units, weights=values[:, column], minlength=table.shape[0])
    np.maximum.at(table, (units[:, None], mad[None, :]), values[:, mad])


def _scatter_counts(into: np.ndarray, units: np.ndarray, values: np.ndarray) -> None:
    """Add rows of counts (n, K) into their blocks of ``into`` (U, K)."""
    if units.size * 8 < into.shape[0]:
        np.add.at(into, units, values)
        return
    for column in range(into.shape[1]):
        into[:, column] += np.bincount(units, weights=values[:, column], minlength=into.shape[0])


def placed(part: np.ndarray, count: int, rows: slice) -> np.ndarray:
    """Return a zeroed (count, ...) array holding a shard's per-unit ``part`` at ``rows`` (its own samples)."""
    part = np.asarray(part)
    if part.shape[0] != len(range(*rows.indices(count))):
        raise ValueError(f"{part.shape[0]} unit rows stored for units {rows.start}..{rows.stop} of {count}")
    out = np.zeros((count, *part.shape[1:]), dtype=part.dtype)
    out[rows] = part
    return out


class Reservoir:
    """Element triples of at most ``capacity`` samples: all of them, or those of lowest hash priority.

    Which samples are kept depends on (seed, index) alone, so chunking, order and merging give the same
    reservoir; :meth:`triples` returns them in sample order.
    """

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.seed = seed
        self.index = np.zeros(0, dtype=np.int64)
        self.priority = np.zeros(0, dtype=np.uint64)
        self.values: np.ndarray | None = None  # (kept, k, 3), padded to the widest sample
        self.width = np.zeros(0, dtype=np.int64)  # triples of each kept sample (outputs may vary in size)
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.waiting = 0
        self.bound: np.uint64 | None = None  # a sample of this priority or above can no longer get in

    def wants(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (mask, priority) of the samples that could still be kept."""
        priority = _mix(self.seed, _RESERVOIR_SALT, index)
        if self.bound is None:
            return np.ones(index.shape, dtype=bool), priority
        return priority < self.bound, priority

    def add(self, index: np.ndarray, priority: np.ndarray, values: np.ndarray) -> None:
        """Offer samples ``index`` with their triples (n, k, 3)."""
        if index.size == 0:
            return
        width = np.full(index.size, values.shape[1], dtype=np.int64)
        self.pending.append((index.astype(np.int64), priority, values, width))
        self.waiting += index.size
        if self.waiting > max(self.capacity, 1024):  # amortised: a compaction per capacity of admitted samples
            self._compact()

    def _compact(self) -> None:
        parts = [(self.index, self.priority, self.values, self.width)] if self.values is not None else []
        parts += self.pending
        self.pending, self.waiting = [], 0
        if not parts:
            return
        index = np.concatenate([p[0] for p in parts])
        priority = np.concatenate([p[1] for p in parts])
        width = np.concatenate([p[3] for p in parts])
        # a value-dependent output shape gives samples of other sizes: pad to the widest, remember each width
        widest = max(p[2].shape[1] for p in parts)
        values = np.concatenate([p[2] if p[2].shape[1] == widest
                                 else np.pad(p[2], ((0, 0), (0, widest - p[2].shape[1]), (0, 0))) for p in parts],
                                axis=0)
        if index.size > self.capacity:
            keep = np.argpartition(priority, self.capacity - 1)[: self.capacity]
            index, priority, values, width = index[keep], priority[keep], values[keep], width[keep]
            self.bound = priority.max()
        self.index, self.priority, self.values, self.width = index, priority, values, width

    def triples(self) -> np.ndarray:
        """Return the kept triples (k, 3) in sample order."""
        self._compact()
        if self.values is None or self.values.size == 0:
            return np.zeros((0, 3))
        order = np.argsort(self.index, kind="stable")
        valid = np.arange(self.values.shape[1])[None, :] < self.width[order][:, None]
        return np.asarray(self.values[order][valid].reshape(-1, 3))

    def nbytes(self) -> int:
        """Return the bytes held: kept and pending samples."""
        held = [self.index, self.priority, self.width] + ([self.values] if self.values is not None else [])
        return sum(int(a.nbytes) for a in held) + sum(int(a.nbytes) for part in self.pending for a in part)

    def state(self) -> dict[str, np.ndarray]:
        """Return the kept samples as arrays (index, priority, width and, when any, values)."""
        self._compact()
        arrays = {"index": self.index, "priority": self.priority, "width": self.width}
        return arrays if self.values is None else {**arrays, "values": self.values}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Take back what :meth:`state` returned."""
        self.index = np.asarray(arrays["index"], dtype=np.int64)
        self.priority = np.asarray(arrays["priority"], dtype=np.uint64)
        self.width = np.asarray(arrays["width"], dtype=np.int64)
        self.values = np.asarray(arrays["values"], dtype=np.float64) if "values" in arrays else None
        # full: a sample of this priority or above could not have got in (what _compact would have said)
        self.bound = self.priority.max() if self.priority.size >= self.capacity and self.priority.size else None

    def merged(self, other: Reservoir) -> Reservoir:
        """Return the reservoir of both (disjoint samples)."""
        out = Reservoir(self.capacity, self.seed)
        for side in (self, other):
            side._compact()
            if side.values is not None:
                out.pending.append((side.index, side.priority, side.values, side.width))
        out._compact()
        return out


class WorstSamples:
    """The samples of highest score in each column (at most ``keep`` per column), with every column's score.

    A bounded stand-in for per-sample scores past the unit cap: exact for one column, and for several the
    combined ranking is taken among each column's ``keep`` worst.
    """

    def __init__(self, keep: int = WORST_KEPT) -> None:
        self.keep = keep
        self.index = np.zeros(0, dtype=np.int64)
        self.scores: np.ndarray | None = None  # (n, columns)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.waiting = 0

    def add(self, index: np.ndarray, scores: np.ndarray) -> None:
        """Offer samples ``index`` with their scores (n, columns); NaN counts as the worst."""
        self.pending.append((index.astype(np.int64), np.where(np.isnan(scores), np.inf, scores)))
        self.waiting += index.size
        if self.waiting > 4 * self.keep * max(1, scores.shape[1]):
            self._compact()

    def _compact(self) -> None:
        parts = ([(self.index, self.scores)] if self.scores is not None else []) + self.pending
        self.pending, self.waiting = [], 0
        if not parts:
            return
        index = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts], axis=0)
        chosen = np.zeros(index.size, dtype=bool)
        for column in range(scores.shape[1]):
            chosen[np.lexsort((index, -scores[:, column]))[: self.keep]] = True  # ties: the earlier sample
        self.index, self.scores = index[chosen], scores[chosen]

    def nbytes(self) -> int:
        """Return the bytes held: kept and pending samples."""
        held = [self.index] + ([self.scores] if self.scores is not None else [])
        return sum(int(a.nbytes) for a in held) + sum(int(a.nbytes) for part in self.pending for a in part)

    def state(self) -> dict[str, np.ndarray]:
        """Return the kept samples and their scores as arrays."""
        self._compact()
        return {"index": self.index} if self.scores is None else {"index": self.index, "scores": self.scores}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Take back what :meth:`state` returned."""
        self.index = np.asarray(arrays["index"], dtype=np.int64)
        self.scores = np.asarray(arrays["scores"], dtype=np.float64) if "scores" in arrays else None

    def merged(self, other: WorstSamples) -> WorstSamples:
        """Return the worst samples of both (disjoint samples): each column's ``keep`` highest of the union."""
        out = WorstSamples(self.keep)
        for side in (self, other):
            side._compact()
            if side.scores is not None:
                out.pending.append((side.index, side.scores))
        out._compact()
        return out

    def top(self, weights: np.ndarray, count: int, samples: int) -> list[int]:
        """Return ``count`` samples by descending weighted score (ties: earlier first), padded with the first ones."""
        self._compact()
        picked: list[int] = []
        if self.scores is not None and self.index.size:
            with np.errstate(invalid="ignore"):
                combined = self.scores @ weights
            combined = np.where(np.isnan(combined), np.inf, combined)
            picked = [int(i) for i in self.index[np.lexsort((self.index, -combined))][:count]]
        taken = set(picked)
        filler = (i for i in range(samples) if i not in taken)
        while len(picked) < min(count, samples):
            picked.append(next(filler))
        return picked


@dataclass(frozen=True)
class Sums:
    """Summed fields of one output (or channel) over samples, with the shifts they were taken around."""

    values: np.ndarray  # (..., FIELDS)
    shift: np.ndarray  # (3,) shifts of a, b, t

    def plcc(self, x: int, y: int) -> np.ndarray:
        """Return PLCC between two of a (0), b (1), t (2) for every leading index."""
        v = self.values
        sx, sy = SUM_OF[x], SUM_OF[y]
        sxx, syy = SQUARE_OF[x], SQUARE_OF[y]
        sxy = PRODUCT_OF[(x, y)]
        n = v[..., Field.COUNT]
        cov = v[..., sxy] - v[..., sx] * v[..., sy] / n
        var_x = v[..., sxx] - v[..., sx] ** 2 / n
        var_y = v[..., syy] - v[..., sy] ** 2 / n
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(cov / np.sqrt(var_x * var_y))


class PairAccumulator:
    """Per-unit, per-channel float64 sums of one output: fp32 ``a``, int8 ``b``, optional target ``t``.

    A unit is a sample, or past the cap a hashed block of samples (:class:`Units`); every accumulator of one
    fixture must share its units, so the bootstrap resamples the same units for all of them.
    """

    def __init__(self, samples: int, channels: int, *, with_target: bool, seed: int,
                 reservoir: int = RESERVOIR, units: Units | None = None) -> None:
        self.samples = samples
        self.channels = channels
        self.with_target = with_target
        self.seed = seed
        self.units = units if units is not None else Units.plan(samples, seed, channels)
        self.stats = np.zeros((self.units.count, channels, FIELDS), dtype=np.float64)
        self.seen = np.zeros(self.units.count, dtype=bool)
        self.shift: np.ndarray | None = None  # (3, channels)
        self.per_sample = max(1, math.ceil(reservoir / max(samples, 1)))
        # every sample's triples below the cap; above it as many samples as the cap (at least RESERVOIR triples)
        kept = samples if not self.units.blocked else max(reservoir, self.units.count) // self.per_sample
        self.picks = Reservoir(max(1, kept), seed)
        self.bad = np.zeros(3, dtype=np.int64)  # samples with NaN/inf in fp32, in int8, in either

    def nbytes(self) -> int:
        """Return the bytes of the state: rows, flags, reservoir (bounded whatever the sample count)."""
        return self.stats.nbytes + self.seen.nbytes + self.bad.nbytes + self.picks.nbytes()

    def _set_shift(self, a: np.ndarray, b: np.ndarray, t: np.ndarray | None, w: np.ndarray | None = None) -> None:
        # a channel's first-chunk mean (of the counted positions under a mask): exact for a constant channel
        shift = np.zeros((3, self.channels))
        for row, x in enumerate((a, b, t)):
            if x is None:
                continue
            if w is None:
                shift[row] = x.mean(axis=(0, 2), dtype=np.float64)
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    shift[row] = np.where(w, x, 0.0).sum(axis=(0, 2)) / w.sum(axis=(0, 2))
        self.shift = np.where(np.isfinite(shift), shift, 0.0)

    def add(self, start: int, a: np.ndarray, b: np.ndarray, t: np.ndarray | None = None,
            base: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
        """Fold samples ``start .. start+len(a)`` in; arrays are (n, channels, m); ``base`` is subtracted first.

        ``mask`` (bool, same shape) keeps only the positions where it is True in every sum, the largest error,
        the NaN/inf check and the reservoir (quant_outputs mask: padding does not count).
        Returns each sample's mean squared int8-vs-fp32 error (inf where NaN/inf): what ranks the worst samples.
        """
        count, channels = a.shape[0], self.channels
        if self.shift is None:
            first = slice(0, min(count, 8))
            offset = 0.0 if base is None else base[first].astype(np.float64)
            self._set_shift(a[first].astype(np.float64) - offset, b[first].astype(np.float64) - offset,
                            None if t is None else t[first].astype(np.float64) - offset,
                            None if mask is None else mask[first])
        assert self.shift is not None
        m = a.shape[2]
        rows = count * channels
        blocks = self.units.of(start, count)
        # a sample's own rows are a view of the state; past the cap they are folded apart, then added to blocks
        own = self.stats[start : start + count] if blocks is None else np.zeros((count, channels, FIELDS))
        stats = own.reshape(rows, FIELDS)  # rows are (sample, channel)
        stats[:, Field.COUNT] = m if mask is None else mask.reshape(rows, m).sum(axis=1)
        self._reservoir(start, a, b, t, base, mask)
        if rows and m:
            # one (sample, channel) row of m elements at a time, in blocks of rows: the float64 copies of a block
            # stay in cache across the passes below (measured ~2x faster than
            # 8 MiB blocks of whole samples)
            flat = [x.reshape(rows, m) for x in (a, b) + (() if t is None else (t,))]
            lean = None if base is None else base.reshape(rows, m)
            keep = None if mask is None else mask.reshape(rows, m)
            shifts = [np.tile(self.shift[k], count)[:, None] for k in range(3 if t is not None else 2)]
            per = max(1, min(rows, BLOCK_ELEMENTS // m))
            buffers = np.empty((4 if t is not None else 3, per, m))
            for lo in range(0, rows, per):
                hi = min(rows, lo + per)
                self._fold(stats[lo:hi], [x[lo:hi] for x in flat], None if lean is None else lean[lo:hi],
                           [x[lo:hi] for x in shifts], buffers[:, : hi - lo], None if keep is None else keep[lo:hi])
        bad_a = ~np.isfinite(own[..., Field.SUM_AA]).all(axis=1)
        bad_b = ~np.isfinite(own[..., Field.SUM_BB]).all(axis=1)
        self.bad += [int(bad_a.sum()), int(bad_b.sum()), int((bad_a | bad_b).sum())]
        with np.errstate(invalid="ignore", divide="ignore"):
            score = own[..., Field.SUM_SQ_ERR].sum(axis=1) / np.maximum(own[..., Field.COUNT].sum(axis=1), 1)
        if blocks is None:
            self.seen[start : start + count] = True
        else:
            _scatter(self.stats, blocks, own)
            self.seen[blocks] = True
        return np.asarray(np.where(np.isfinite(score), score, np.inf))

    @staticmethod
    def _fold(out: np.ndarray, raw: list[np.ndarray], base: np.ndarray | None, shifts: list[np.ndarray],
              buffers: np.ndarray, keep: np.ndarray | None = None) -> None:
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
        if keep is not None:
            # masked-out positions become exact zeros in every buffer (NaN padding included): with 0/1 weights
            # Σw·x = Σ over kept x, Σw·x·y likewise, and |0| never raises the largest error
            drop = ~keep
            for into in (D, *shifted):
                np.copyto(into, 0.0, where=drop)
        A, B = shifted[0], shifted[1]
        out[:, Field.SUM_SQ_ERR] = _dots(D, D)
        np.abs(D, out=D)
        out[:, Field.SUM_ABS_ERR] = D.sum(axis=1)
        out[:, Field.MAX_ABS_ERR] = D.max(axis=1)
        out[:, Field.SUM_A] = A.sum(axis=1)
        out[:, Field.SUM_B] = B.sum(axis=1)
        out[:, Field.SUM_AA] = _dots(A, A)
        out[:, Field.SUM_BB] = _dots(B, B)
        out[:, Field.SUM_AB] = _dots(A, B)
        if len(shifted) == 3:
            T = shifted[2]
            out[:, Field.SUM_T] = T.sum(axis=1)
            out[:, Field.SUM_TT] = _dots(T, T)
            out[:, Field.SUM_AT] = _dots(A, T)
            out[:, Field.SUM_BT] = _dots(B, T)

    def _reservoir(self, start: int, a: np.ndarray, b: np.ndarray, t: np.ndarray | None,
                   base: np.ndarray | None, mask: np.ndarray | None = None) -> None:
        # a stratified sample of each kept sample's elements: k evenly spaced positions behind an offset drawn
        # from (seed, sample index) alone, so the same sample keeps the same positions whatever the chunking
        count = a.shape[0]
        size = a[0].size if count else 0
        index = np.arange(start, start + count, dtype=np.int64)
        if count == 0 or size == 0:
            self.picks.add(index, np.zeros(count, dtype=np.uint64), np.zeros((count, 0, 3)))
            return
        wanted, priority = self.picks.wants(index)
        chosen = np.flatnonzero(wanted)  # past the cap, most samples cannot get in: skip their gathering
        if chosen.size == 0:
            return
        k = min(self.per_sample, size)
        stride = max(1, size // k)
        offsets = (_splitmix(self.seed, index[chosen]) % np.uint64(stride)).astype(np.int64)
        pos = offsets[:, None] + np.arange(k, dtype=np.int64)[None, :] * stride
        rows = chosen[:, None]
        offset = 0.0 if base is None else base.reshape(count, -1)[rows, pos].astype(np.float64)
        triple = np.empty((chosen.size, k, 3))
        triple[..., 0] = a.reshape(count, -1)[rows, pos].astype(np.float64) - offset
        triple[..., 1] = b.reshape(count, -1)[rows, pos].astype(np.float64) - offset
        if t is not None:
            triple[..., 2] = t.reshape(count, -1)[rows, pos].astype(np.float64) - offset
        else:
            triple[..., 2] = np.nan
        if mask is not None:  # a masked-out position is no triple: NaN rows are dropped when read (reservoir())
            triple[~mask.reshape(count, -1)[rows, pos]] = np.nan
        self.picks.add(index[chosen], priority[chosen], triple)

    def merge(self, other: PairAccumulator) -> PairAccumulator:
        """Return the accumulator of both halves of a split fixture (disjoint samples, same layout and units)."""
        if other.shift is None or self.shift is None:
            return self if other.shift is None else other
        if other.units != self.units:
            raise ValueError(f"cannot merge statistics over different units ({self.units} vs {other.units})")
        merged = PairAccumulator(self.samples, self.channels, with_target=self.with_target, seed=self.seed,
                                 units=self.units)
        merged.shift = self.shift.copy()
        # a sample's row is zero in the half that did not see it, and a zero row re-expressed around another
        # shift stays zero: adding the halves places each sample's row (per-sample units) or sums blocks
        merged.stats = self.stats + shift_rows(other.stats, other.shift, self.shift)
        largest = Field.MAX_ABS_ERR
        merged.stats[..., largest] = np.maximum(self.stats[..., largest], other.stats[..., largest])
        merged.seen = self.seen | other.seen
        merged.picks = self.picks.merged(other.picks)
        merged.bad = self.bad + other.bad
        return merged

    def state(self, rows: slice) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return (JSON-able meta, arrays) of the state; per-unit arrays only at ``rows`` (a shard's own samples)."""
        arrays = {"stats": self.stats[rows], "seen": self.seen[rows], "bad": self.bad,
                  **{f"picks.{k}": v for k, v in self.picks.state().items()}}
        if self.shift is not None:
            arrays["shift"] = self.shift
        return {"channels": self.channels, "with_target": self.with_target}, arrays

    @classmethod
    def restore(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], samples: int, seed: int, units: Units,
                rows: slice) -> PairAccumulator:
        """Return the accumulator :meth:`state` described; the units outside ``rows`` hold zeros."""
        acc = cls(samples, int(meta["channels"]), with_target=bool(meta["with_target"]), seed=seed, units=units)
        stats = np.asarray(arrays["stats"], dtype=np.float64)
        if stats.shape[1:] != acc.stats.shape[1:]:
            raise ValueError(f"rows of shape {stats.shape[1:]} for {acc.channels} channel(s)")
        acc.stats = placed(stats, units.count, rows)
        acc.seen = placed(np.asarray(arrays["seen"], dtype=bool), units.count, rows)
        acc.bad = np.asarray(arrays["bad"], dtype=np.int64).copy()
        acc.shift = np.asarray(arrays["shift"], dtype=np.float64).copy() if "shift" in arrays else None
        acc.picks.restore({k.removeprefix("picks."): v for k, v in arrays.items() if k.startswith("picks.")})
        return acc

    # --- results -----------------------------------------------------------------------------------------

    def channel_sums(self, weights: np.ndarray | None = None) -> Sums:
        """Return per-channel sums over units: (channels, F), or (B, channels, F) for weight rows (B, units)."""
        assert self.shift is not None
        if weights is None:
            values = self.stats.sum(axis=0)
            values[..., Field.MAX_ABS_ERR] = self.stats[..., Field.MAX_ABS_ERR].max(axis=0)
        else:
            from .metrics import weighted_sum

            values = weighted_sum(weights, self.stats)
        return Sums(values, self.shift)

    def output_rows(self) -> np.ndarray:
        """Return per-unit rows of the whole output (channels combined around one shift), (units, F)."""
        assert self.shift is not None
        target = self.shift.mean(axis=1)
        rows = shift_rows(self.stats, self.shift, target[:, None] * np.ones_like(self.shift))
        out = rows.sum(axis=1)
        out[:, Field.MAX_ABS_ERR] = rows[..., Field.MAX_ABS_ERR].max(axis=1)
        return np.asarray(out)

    def output_shift(self) -> np.ndarray:
        """Return the shift of :meth:`output_rows`."""
        assert self.shift is not None
        return np.asarray(self.shift.mean(axis=1))

    def reservoir(self) -> np.ndarray:
        """Return the kept element triples (k, 3) in sample order (unshifted; column 2 NaN without a target)."""
        kept = self.picks.triples()
        return np.asarray(kept[~(np.isnan(kept[:, 0]) & np.isnan(kept[:, 1]))])  # positions a mask left out

    def nonfinite(self) -> tuple[bool, bool, int]:
        """Return (fp32 has NaN/inf, int8 has NaN/inf, samples affected), counted as the samples were folded."""
        bad_a, bad_b, either = (int(v) for v in self.bad)
        return bad_a > 0, bad_b > 0, either

    def variance(self) -> float:
        """Return the fp32 output's variance per element (1.0 where it has none): the scale of disagreement."""
        rows = self.output_rows()
        n = rows[:, Field.COUNT].sum()
        var = (rows[:, Field.SUM_AA].sum() - rows[:, Field.SUM_A].sum() ** 2 / n) / n if n else 0.0
        return float(var) if var > 0 else 1.0

    def disagreement(self) -> np.ndarray:
        """Return each unit's mean squared int8-vs-fp32 error relative to the output's variance, (units,)."""
        rows = self.output_rows()
        with np.errstate(invalid="ignore", divide="ignore"):
            score = rows[:, Field.SUM_SQ_ERR] / np.maximum(rows[:, Field.COUNT], 1) / self.variance()
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
    n = rows[..., Field.COUNT]
    sa, sb, st = rows[..., Field.SUM_A], rows[..., Field.SUM_B], rows[..., Field.SUM_T]
    out[..., Field.SUM_A] = sa + n * da
    out[..., Field.SUM_B] = sb + n * db
    out[..., Field.SUM_T] = st + n * dt
    out[..., Field.SUM_AA] = rows[..., Field.SUM_AA] + 2 * da * sa + n * da * da
    out[..., Field.SUM_BB] = rows[..., Field.SUM_BB] + 2 * db * sb + n * db * db
    out[..., Field.SUM_TT] = rows[..., Field.SUM_TT] + 2 * dt * st + n * dt * dt
    out[..., Field.SUM_AB] = rows[..., Field.SUM_AB] + db * sa + da * sb + n * da * db
    out[..., Field.SUM_AT] = rows[..., Field.SUM_AT] + dt * sa + da * st + n * da * dt
    out[..., Field.SUM_BT] = rows[..., Field.SUM_BT] + dt * sb + db * st + n * db * dt
    return out


def pair_moments(rows: np.ndarray, x: int, y: int) -> np.ndarray:
    """Return the (S, ..., 6) moments [n, Σx, Σy, Σx², Σy², Σxy] of two of a (0), b (1), t (2)."""
    return np.stack([rows[..., Field.COUNT], rows[..., SUM_OF[x]], rows[..., SUM_OF[y]], rows[..., SQUARE_OF[x]],
                     rows[..., SQUARE_OF[y]], rows[..., PRODUCT_OF[(x, y)]]], axis=-1)


def _put_counts(units: Units, counts: np.ndarray, start: int, rows: np.ndarray) -> None:
    """Store per-sample count rows (n, K) of samples ``start ..``: in their own rows, or added into their blocks."""
    blocks = units.of(start, rows.shape[0])
    if blocks is None:
        counts[start : start + rows.shape[0]] = rows
    else:
        _scatter_counts(counts, blocks, rows)


class CountRows:
    """Per-unit rows of counts (``WIDTH`` columns): merged by adding, stored and restored by a shard's rows."""

    WIDTH = 1

    def __init__(self, samples: int, units: Units | None = None) -> None:
        self.units = units if units is not None else Units(samples, samples)
        self.counts = np.zeros((self.units.count, self.WIDTH), dtype=np.float64)

    def merge(self, other: Self) -> Self:
        """Return the counts of both halves of a split fixture (disjoint samples, same units)."""
        if other.units != self.units:
            raise ValueError(f"cannot merge counts over different units ({self.units} vs {other.units})")
        merged = type(self)(self.units.samples, self.units)
        merged.counts = self.counts + other.counts  # a sample's row is zero in the half that did not see it
        return merged

    def state(self, rows: slice) -> dict[str, np.ndarray]:
        """Return the count rows of ``rows`` (a shard's own units)."""
        return {"counts": self.counts[rows]}

    @classmethod
    def restore(cls, arrays: dict[str, np.ndarray], units: Units, rows: slice) -> Self:
        """Return the accumulator :meth:`state` described; the units outside ``rows`` hold zeros."""
        acc = cls(units.samples, units)
        acc.counts = placed(np.asarray(arrays["counts"], dtype=np.float64).reshape(-1, cls.WIDTH), units.count, rows)
        return acc

    def nbytes(self) -> int:
        """Return the bytes of the state."""
        return self.counts.nbytes


class LabelAccumulator(CountRows):
    """Per-unit counts of elements where int8 and fp32 disagree: labels, or argmax along an axis."""

    WIDTH = 2

    def add(self, start: int, a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Fold samples ``start .. start+len(a)`` of two label arrays (n, ...) in; return each one's flip share.

        ``mask`` (bool, same shape) counts only the positions where it is True.
        """
        count = a.shape[0]
        flat_a = a.reshape(count, -1)
        flat_b = b.reshape(count, -1)
        differ = flat_a != flat_b
        if mask is None:
            flips, total = differ.sum(axis=1), np.full(count, flat_a.shape[1])
        else:
            keep = mask.reshape(count, -1)
            flips, total = (differ & keep).sum(axis=1), keep.sum(axis=1)
        _put_counts(self.units, self.counts, start, np.stack([flips, total], axis=1))
        return np.asarray(flips / np.maximum(total, 1))


    def unit_rates(self) -> np.ndarray:
        """Return each unit's flip share (0 where it counted nothing): what ranks the worst samples."""
        return np.asarray(self.counts[:, 0] / np.maximum(self.counts[:, 1], 1))

    def rate(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Return the flip rate, or one per weight row (B, units)."""
        if weights is None:
            total = self.counts.sum(axis=0)
            return np.asarray(total[0] / total[1] if total[1] else 0.0)
        from .metrics import weighted_sum

        sums = weighted_sum(weights, self.counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(sums[:, 0] / sums[:, 1])


class AccuracyAccumulator(CountRows):
    """Per-unit counts of class predictions (argmax) that equal an integer target: [fp32 right, int8 right, total]."""

    WIDTH = 3

    def add(self, start: int, pred_a: np.ndarray, pred_b: np.ndarray, target: np.ndarray,
            mask: np.ndarray | None = None) -> None:
        """Fold samples ``start ..`` in: predicted class ids of both models and the target ids, same shape (n, ...).

        ``mask`` (bool, same shape) counts only the positions where it is True (the masked tokens of a masked LM).
        """
        count = pred_a.shape[0]
        flat_t = target.reshape(count, -1)
        keep = np.ones(flat_t.shape, dtype=bool) if mask is None else mask.reshape(count, -1)
        right = np.stack([((pred_a.reshape(count, -1) == flat_t) & keep).sum(axis=1),
                          ((pred_b.reshape(count, -1) == flat_t) & keep).sum(axis=1),
                          keep.sum(axis=1)], axis=1).astype(np.float64)
        _put_counts(self.units, self.counts, start, right)


    def accuracies(self) -> tuple[float, float]:
        """Return (fp32 accuracy, int8 accuracy) over every counted position."""
        total = self.counts.sum(axis=0)
        return (float(total[0] / total[2]), float(total[1] / total[2])) if total[2] else (0.0, 0.0)

    def drop(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Return fp32 accuracy minus int8 accuracy, or one per weight row (B, units)."""
        if weights is None:
            fp32, int8 = self.accuracies()
            return np.asarray(fp32 - int8)
        from .metrics import weighted_sum

        sums = weighted_sum(weights, self.counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray((sums[:, 0] - sums[:, 1]) / sums[:, 2])


def describe_sums(values: np.ndarray, shift: np.ndarray, x: int, y: int, sample: np.ndarray) -> dict[str, Any]:
    """Return PairMetrics fields of ``y`` against ``x`` from summed fields (F,) and a reservoir (k, 3)."""
    # scipy.stats for the rank statistics (the project's rule: a kept library before our own); importing it costs
    # ~0.6 s of a fresh process, which the speed table in docs/measurements.md counts
    from scipy import stats

    rows = values
    n = float(rows[Field.COUNT])
    sx, sy = float(rows[SUM_OF[x]]), float(rows[SUM_OF[y]])
    var_x = float(rows[SQUARE_OF[x]]) - sx * sx / n
    var_y = float(rows[SQUARE_OF[y]]) - sy * sy / n
    cov = float(rows[PRODUCT_OF[(x, y)]]) - sx * sy / n
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
        rmse = math.sqrt(max(float(rows[Field.SUM_SQ_ERR]), 0.0) / n)
        mae = float(rows[Field.SUM_ABS_ERR]) / n
        max_abs = float(rows[Field.MAX_ABS_ERR])
    else:
        # errors against the target are not accumulated (only int8 vs fp32 has budgets on them)
        rmse = mae = max_abs = float("nan")
    return {
        "n": int(n), "plcc": plcc, "srocc": srocc, "krcc": krcc, "rmse": rmse, "mae": mae, "max_abs": max_abs,
        "slope": slope, "intercept": mean_y - slope * mean_x,
        "offset_rel": abs(mean_y - mean_x) / std_x if std_x > 0 else math.inf,
    }
