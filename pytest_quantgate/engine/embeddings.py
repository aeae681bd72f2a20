"""Embedding outputs judged by direction, not by value: cosine similarity and nearest-neighbour agreement.

An embedding is used through its direction (retrieval, clustering, a cosine head), so the checks are:

* per vector, ``1 − cos(fp32, int8)``; the mean over every counted vector against ``budget_cosine``. A vector is
  the output along ``embedding_axis`` at one sample and one position of the other axes, so token embeddings
  ``[N, T, D]`` with axis 2 give one vector per (sample, token). Per unit (a sample, or a hashed block of samples
  past the cap, :class:`~.streaming.Units`) the accumulator keeps ``[Σ(1 − cos), vectors]``;
* within the fixture, for each of a bounded, seeded subset of vectors, the recall@k of its ``k`` nearest fp32
  neighbours (cosine) among its ``k`` nearest int8 neighbours, against ``budget_neighbours`` (a floor). Small
  per-vector errors can still reorder a tight cluster, which is what a retrieval index sees.

Edge cases, decided here:

* a vector with NaN/inf in either model counts as distance 1, is counted in :attr:`EmbeddingAccumulator.nonfinite`
  and is left out of the neighbour search (it has no distance to rank by);
* a vector of norm zero in exactly one model has cosine 0 (distance 1): int8 lost the direction fp32 has;
* a vector of norm zero in both models is skipped (counted in :attr:`EmbeddingAccumulator.zero` only): it has no
  direction to compare, and counting it as agreement would let all-zero padding dilute the mean;
* masked vectors (``weights`` zero) are skipped entirely.

The kept vectors are those of lowest hash priority, the hash taken of (seed, sample index, position) alone
(streaming's ``_mix``), so any chunking, order or split of the fixture keeps the same vectors. They are stored as
float32, both models: at most ``keep × D × 2 × 4`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..records import EmbeddingReport, Interval
from .metrics import bootstrap_drop, weighted_sum
from .streaming import Units, _mix, _put_counts, placed

# vectors kept for the neighbour search; 4096 × 768 float32 × 2 models is 24 MiB
KEEP = 4096
# neighbours compared per kept vector (the schema's recall@10)
NEIGHBOURS = 10
# rows of the similarity matrix computed at once: (rows, kept) float64, 8 MiB at 4096 kept vectors
SEARCH_ROWS = 256
_SAMPLE_SALT = 0x2545F4914F6CDD1D
_VECTOR_SALT = 0x9FB21C651E98DF25


@dataclass(frozen=True)
class Kept:
    """The kept vectors, in (sample, position) order: their identities (n, 2) and both models' values (n, D)."""

    ident: np.ndarray  # (n, 2) int64: sample index, position among the sample's vectors
    fp32: np.ndarray  # (n, D) float32
    int8: np.ndarray  # (n, D) float32


class EmbeddingAccumulator:
    """Per-unit sums of ``1 − cos`` and vector counts of one embedding output, plus the kept vectors."""

    def __init__(self, samples: int, axis: int, seed: int, units: Units | None = None, keep: int = KEEP) -> None:
        if axis < 1:
            raise ValueError(f"embedding axis {axis} must be >= 1 (axis 0 is the sample axis)")
        self.samples = samples
        self.axis = axis
        self.seed = seed
        self.keep = max(0, keep)
        self.units = units if units is not None else Units(samples, samples)
        self.sums = np.zeros((self.units.count, 2), dtype=np.float64)  # [Σ(1 − cos), vectors]
        self.nonfinite = 0  # vectors with NaN/inf in either model (counted as distance 1)
        self.zero = 0  # vectors of norm zero in both models (skipped)
        self.dim: int | None = None
        # the kept vectors: filled up to `keep`, then a candidate of lower priority replaces the highest one
        self.size = 0
        self.ident = np.zeros((0, 2), dtype=np.int64)
        self.priority = np.zeros(0, dtype=np.uint64)
        self.fp32 = np.zeros((0, 0), dtype=np.float32)
        self.int8 = np.zeros((0, 0), dtype=np.float32)

    def add(self, start: int, a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Fold samples ``start .. start+len(a)`` of raw outputs (n, ...) in; return each one's mean 1 − cos.

        ``weights`` (the output's shape without the embedding axis, or broadcastable to it) masks vectors: those
        where it is zero are skipped. A sample without a counted vector scores 0.
        """
        if a.shape != b.shape or a.ndim <= self.axis:
            raise ValueError(f"expected two outputs of one shape with an axis {self.axis}, got {a.shape} and {b.shape}")
        count, dim = a.shape[0], a.shape[self.axis]
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise ValueError(f"embedding axis {self.axis} has {dim} elements, earlier samples had {self.dim}")
        # (n, v, D): the embedding axis last, every other non-sample axis flattened into positions
        va = np.moveaxis(a, self.axis, -1).reshape(count, -1, dim)
        vb = np.moveaxis(b, self.axis, -1).reshape(count, -1, dim)
        per = va.shape[1]
        counted = np.ones((count, per), dtype=bool)
        if weights is not None:
            lead = np.moveaxis(a, self.axis, -1).shape[:-1]
            counted = (np.broadcast_to(weights, lead) != 0).reshape(count, per)
        fa = va.astype(np.float64)
        fb = vb.astype(np.float64)
        finite = np.isfinite(fa).all(axis=2) & np.isfinite(fb).all(axis=2)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            dot = np.einsum("nvd,nvd->nv", fa, fb)
            na = np.sqrt(np.einsum("nvd,nvd->nv", fa, fa))
            nb = np.sqrt(np.einsum("nvd,nvd->nv", fb, fb))
            # a zero norm in one model: cos 0; the clip keeps rounding (|cos| a hair over 1) inside [-1, 1]
            cos = np.clip(np.where((na > 0) & (nb > 0), dot / (na * nb), 0.0), -1.0, 1.0)
        both_zero = finite & (na == 0) & (nb == 0)
        self.zero += int((counted & both_zero).sum())
        counted &= ~both_zero
        self.nonfinite += int((counted & ~finite).sum())
        distance = np.where(counted, np.where(finite & np.isfinite(cos), 1.0 - cos, 1.0), 0.0)
        rows = np.stack([distance.sum(axis=1), counted.sum(axis=1).astype(np.float64)], axis=1)
        _put_counts(self.units, self.sums, start, rows)
        self._offer(start, va, vb, counted & finite)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(np.where(rows[:, 1] > 0, rows[:, 0] / np.maximum(rows[:, 1], 1), 0.0))

    def _offer(self, start: int, va: np.ndarray, vb: np.ndarray, eligible: np.ndarray) -> None:
        """Keep the eligible vectors (n, v) of lowest priority among these and the kept ones."""
        if self.keep == 0:
            return
        sample, position = np.nonzero(eligible)
        if sample.size == 0:
            return
        priority = _priority(self.seed, sample + start, position)
        if self.size == self.keep:
            # full: only a vector below the highest kept priority can get in; most are dropped here, ungathered
            low = priority < self.priority.max()
            sample, position, priority = sample[low], position[low], priority[low]
            if sample.size == 0:
                return
        ident = np.stack([sample + start, position], axis=1).astype(np.int64)
        free = self.keep - self.size
        if free > 0:
            take = min(free, sample.size)
            self._store(np.arange(self.size, self.size + take), ident[:take], priority[:take],
                        va[sample[:take], position[:take]], vb[sample[:take], position[:take]])
            self.size += take
            sample, position, priority, ident = sample[take:], position[take:], priority[take:], ident[take:]
            if sample.size == 0:
                return
        # full: of the kept and the candidates, the `keep` lowest priorities stay; candidates take the freed slots
        pool = np.concatenate([self.priority, priority])
        chosen = np.argpartition(pool, self.keep - 1)[: self.keep]
        entering = chosen[chosen >= self.keep] - self.keep
        staying = np.zeros(self.keep, dtype=bool)
        staying[chosen[chosen < self.keep]] = True
        slots = np.flatnonzero(~staying)
        self._store(slots, ident[entering], priority[entering], va[sample[entering], position[entering]],
                    vb[sample[entering], position[entering]])

    def _store(self, slots: np.ndarray, ident: np.ndarray, priority: np.ndarray, fa: np.ndarray,
               fb: np.ndarray) -> None:
        """Write vectors into ``slots`` of the kept arrays, growing them (up to ``keep`` rows) as they fill."""
        need = int(slots.max()) + 1 if slots.size else 0
        if need > self.priority.size:
            # doubling, capped at keep: a fixture of fewer vectors never holds a keep-sized buffer
            rows = min(self.keep, max(need, 2 * self.priority.size, 64))
            dim = fa.shape[1]
            self.ident = _grown(self.ident, rows, (2,), np.int64)
            self.priority = _grown(self.priority, rows, (), np.uint64)
            self.fp32 = _grown(self.fp32 if self.fp32.size else np.zeros((0, dim), np.float32), rows, (dim,),
                               np.float32)
            self.int8 = _grown(self.int8 if self.int8.size else np.zeros((0, dim), np.float32), rows, (dim,),
                               np.float32)
        self.ident[slots] = ident
        self.priority[slots] = priority
        self.fp32[slots] = fa
        self.int8[slots] = fb

    def nbytes(self) -> int:
        """Return the bytes of the state: count rows and the kept vectors (at most keep × D × 2 × 4 + 24 × keep)."""
        return int(self.sums.nbytes + self.ident.nbytes + self.priority.nbytes + self.fp32.nbytes + self.int8.nbytes)

    def kept(self) -> Kept:
        """Return the kept vectors in (sample, position) order."""
        n = self.size
        order = np.lexsort((self.ident[:n, 1], self.ident[:n, 0]))
        dim = self.dim or 0
        if n == 0:
            return Kept(np.zeros((0, 2), np.int64), np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32))
        return Kept(self.ident[:n][order], self.fp32[:n][order], self.int8[:n][order])

    def cosine_distance(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Return the mean 1 − cos (0 with no vector), or one per weight row (B, units) (NaN with no vector)."""
        if weights is None:
            total, vectors = self.sums.sum(axis=0)
            return np.asarray(total / vectors if vectors else 0.0)
        summed = weighted_sum(weights, self.sums)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(summed[:, 0] / summed[:, 1])

    def neighbours(self, k: int = NEIGHBOURS) -> tuple[float | None, int]:
        """Return (mean recall@k of each kept vector's fp32 neighbours among its int8 ones, kept vectors).

        The recall is None with fewer than ``k + 1`` kept vectors (a vector is not its own neighbour).
        """
        kept = self.kept()
        n = kept.ident.shape[0]
        if n < k + 1 or k < 1:
            return None, n
        ua, ub = _unit(kept.fp32), _unit(kept.int8)
        found = 0
        for lo in range(0, n, SEARCH_ROWS):
            hi = min(n, lo + SEARCH_ROWS)
            near_a = _nearest(ua, lo, hi, k)
            near_b = _nearest(ub, lo, hi, k)
            # both are k distinct indices per row: the shared ones are the duplicates of the joined rows
            joined = np.sort(np.concatenate([near_a, near_b], axis=1), axis=1)
            found += int((joined[:, 1:] == joined[:, :-1]).sum())
        return found / (n * k), n

    def merge(self, other: EmbeddingAccumulator) -> EmbeddingAccumulator:
        """Return the accumulator of both halves of a split fixture (disjoint samples, same layout and units)."""
        if other.units != self.units or (other.axis, other.seed, other.keep) != (self.axis, self.seed, self.keep):
            raise ValueError("cannot merge embedding statistics of other units, axis, seed or keep")
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise ValueError(f"cannot merge embeddings of {self.dim} and {other.dim} dimensions")
        merged = EmbeddingAccumulator(self.samples, self.axis, self.seed, self.units, self.keep)
        merged.sums = self.sums + other.sums
        merged.nonfinite = self.nonfinite + other.nonfinite
        merged.zero = self.zero + other.zero
        merged.dim = self.dim if self.dim is not None else other.dim
        for side in (self, other):
            n = side.size
            if n:
                merged._offer_kept(side.ident[:n], side.priority[:n], side.fp32[:n], side.int8[:n])
        return merged

    def state(self, rows: slice) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return (JSON-able meta, arrays) of the state; the sums only at ``rows`` (a shard's own units)."""
        n = self.size
        meta = {"axis": self.axis, "keep": self.keep, "nonfinite": self.nonfinite, "zero": self.zero, "dim": self.dim}
        return meta, {"sums": self.sums[rows], "ident": self.ident[:n], "priority": self.priority[:n],
                      "fp32": self.fp32[:n], "int8": self.int8[:n]}

    @classmethod
    def restore(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], seed: int, units: Units,
                rows: slice) -> EmbeddingAccumulator:
        """Return the accumulator :meth:`state` described; the units outside ``rows`` hold zeros."""
        acc = cls(units.samples, int(meta["axis"]), seed, units, int(meta["keep"]))
        acc.sums = placed(np.asarray(arrays["sums"], dtype=np.float64).reshape(-1, 2), units.count, rows)
        acc.nonfinite, acc.zero = int(meta["nonfinite"]), int(meta["zero"])
        acc.dim = None if meta["dim"] is None else int(meta["dim"])
        acc.ident = np.asarray(arrays["ident"], dtype=np.int64).reshape(-1, 2).copy()
        acc.priority = np.asarray(arrays["priority"], dtype=np.uint64).copy()
        acc.size = int(acc.priority.size)
        if acc.size:
            acc.fp32 = np.asarray(arrays["fp32"], dtype=np.float32).copy()
            acc.int8 = np.asarray(arrays["int8"], dtype=np.float32).copy()
        return acc

    def _offer_kept(self, ident: np.ndarray, priority: np.ndarray, fa: np.ndarray, fb: np.ndarray) -> None:
        """Offer vectors another accumulator kept (their priorities already drawn)."""
        pool_ident = np.concatenate([self.ident[: self.size], ident])
        pool_priority = np.concatenate([self.priority[: self.size], priority])
        pool_a = np.concatenate([self.fp32[: self.size], fa]) if self.size else fa
        pool_b = np.concatenate([self.int8[: self.size], fb]) if self.size else fb
        if pool_priority.size > self.keep:
            chosen = np.argpartition(pool_priority, self.keep - 1)[: self.keep]
            pool_ident, pool_priority = pool_ident[chosen], pool_priority[chosen]
            pool_a, pool_b = pool_a[chosen], pool_b[chosen]
        self.ident, self.priority = pool_ident, pool_priority
        self.fp32, self.int8 = np.ascontiguousarray(pool_a), np.ascontiguousarray(pool_b)
        self.size = pool_priority.size


def _priority(seed: int, sample: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Return each vector's keep priority: a hash of (seed, sample index, position) alone."""
    # the sample's hash plus the position, hashed again: no assumption on how many vectors a sample has
    per_sample = _mix(seed, _SAMPLE_SALT, sample.astype(np.uint64))
    return _mix(seed, _VECTOR_SALT, per_sample + position.astype(np.uint64))


def _grown(array: np.ndarray, rows: int, tail: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
    """Return ``array`` copied into a zeroed array of ``rows`` rows."""
    out = np.zeros((rows, *tail), dtype=dtype)
    out[: array.shape[0]] = array
    return out


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Return float64 rows scaled to norm 1 (a zero row stays zero)."""
    x = vectors.astype(np.float64)
    norm = np.sqrt(np.einsum("nd,nd->n", x, x))
    return np.asarray(x / np.where(norm > 0, norm, 1.0)[:, None])


def _nearest(unit: np.ndarray, lo: int, hi: int, k: int) -> np.ndarray:
    """Return the indices of the ``k`` most cosine-similar other rows of rows ``lo .. hi``, (hi − lo, k)."""
    similarity = unit[lo:hi] @ unit.T
    similarity[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # a vector is not its own neighbour
    return np.asarray(np.argpartition(-similarity, k - 1, axis=1)[:, :k])


@dataclass(frozen=True)
class CosineTerm:
    """The mean cosine distance, recomputed for rows of bootstrap unit weights (a metrics.Term)."""

    acc: EmbeddingAccumulator

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """Return the mean 1 − cos for each weight row, (B,)."""
        return self.acc.cosine_distance(weights)


def embedding_report(acc: EmbeddingAccumulator, budget_cosine: float, budget_neighbours: float | None,
                     unit_count: int, bootstrap: int, seed: int, confidence: float) -> EmbeddingReport:
    """Return the mean cosine distance with its bootstrap interval and the neighbour recall of the kept vectors."""
    if unit_count != acc.units.count:
        raise ValueError(f"unit_count {unit_count} is not the accumulator's {acc.units.count} units")
    interval = bootstrap_drop([CosineTerm(acc)], unit_count, bootstrap, seed, confidence)
    recall, kept = acc.neighbours(NEIGHBOURS)
    return EmbeddingReport(acc.axis, float(acc.cosine_distance()), float(budget_cosine), recall, NEIGHBOURS, kept,
                           None if budget_neighbours is None else float(budget_neighbours), interval)


def embedding_breaches(name: str, report: EmbeddingReport,
                       over: Callable[[float, Interval | None, float], bool]) -> list[str]:
    """Return a sentence for the mean cosine distance over budget_cosine and one for recall under budget_neighbours."""
    out = []
    if over(report.cosine_distance, report.interval, report.budget_cosine):
        out.append(f"output {name!r}: mean 1 - cos(fp32, int8) along axis {report.axis} is "
                   f"{report.cosine_distance:.4g}, over budget_cosine {report.budget_cosine:g}")
    recall, floor = report.neighbours_recall, report.budget_neighbours
    # a floor on a point estimate over the kept vectors (no interval): fails strictly below it
    if recall is not None and floor is not None and recall < floor:
        out.append(f"output {name!r}: recall@{report.neighbours_k} of each vector's fp32 nearest neighbours among "
                   f"its int8 nearest neighbours is {recall:.3f} over {report.neighbours_samples:,} vectors, under "
                   f"budget_neighbours {floor:g}")
    return out
