"""Dense score outputs judged by their decisions: per channel, agreement of ``x >= threshold`` in fp32 and int8.

A segmentation or text-probability map is used through a threshold, so PLCC over every pixel says little about
what changes: a map whose scores all shrink by 20% keeps a PLCC of 1 while its masks lose their edges. Per unit
(a sample, or a hashed block of samples past the cap, :class:`~.streaming.Units`) and per selected channel the
accumulator keeps four counts, and the verdict is the channel's *flip share*: elements over the threshold in
exactly one model, out of the elements over it in either. Elements under it in both models are left out on
purpose: a map that is mostly background would otherwise hide any disagreement on the objects.

NaN is never over the threshold (``NaN >= t`` is false), so an int8 map that turns NaN where fp32 crosses counts
every such element as a disagreement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from ..records import Interval, ThresholdChannel, ThresholdReport
from .metrics import bootstrap_drop, weighted_sum
from .streaming import Units, _put_counts, placed


class Count(IntEnum):
    """The columns of a (unit, channel) row of counts."""

    EITHER = 0  # over the threshold in fp32 or int8
    DISAGREE = 1  # over it in exactly one model
    FP32_OVER = 2
    INT8_OVER = 3


COUNTS = len(Count)
# failing channels named one by one in a verdict; the rest are counted
NAMED = 5


def shares(sums: np.ndarray) -> np.ndarray:
    """Return disagree / either of count rows (..., 4), 0 where nothing crosses in either model."""
    either = sums[..., Count.EITHER]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(either > 0, sums[..., Count.DISAGREE] / np.where(either > 0, either, 1), 0.0))


class ThresholdAccumulator:
    """Per-unit, per-channel counts of the decisions ``x >= threshold`` of fp32 and int8: (units, k, 4)."""

    def __init__(self, samples: int, channels: np.ndarray, threshold: float, units: Units | None = None) -> None:
        self.samples = samples
        self.channels = np.asarray(channels, dtype=np.intp).reshape(-1)
        self.threshold = float(threshold)
        self.units = units if units is not None else Units(samples, samples)
        self.rows = np.zeros((self.units.count, self.channels.size, COUNTS), dtype=np.float64)

    def add(self, start: int, a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Fold samples ``start .. start+len(a)`` of channel views (n, C, m) in; return each one's flip share.

        ``weights`` (broadcastable to (n, C, m)) masks positions: only those where it is non-zero count. A sample's
        flip share is its disagreements over its elements that cross in either model, both summed over the
        selected channels (0 when nothing crosses): what ranks the worst samples.
        """
        if a.shape != b.shape or a.ndim != 3:
            raise ValueError(f"expected two (n, C, m) channel views of one shape, got {a.shape} and {b.shape}")
        count = a.shape[0]
        mask = None if weights is None else np.broadcast_to(weights, a.shape)
        own = np.empty((count, self.channels.size, COUNTS), dtype=np.float64)
        for j, channel in enumerate(self.channels):
            # one channel at a time, on views: the temporaries are (n, m) booleans whatever the channel count
            over_a = a[:, channel] >= self.threshold
            over_b = b[:, channel] >= self.threshold
            if mask is not None:
                counted = mask[:, channel] != 0
                over_a &= counted
                over_b &= counted
            own[:, j, Count.FP32_OVER] = np.count_nonzero(over_a, axis=1)
            own[:, j, Count.INT8_OVER] = np.count_nonzero(over_b, axis=1)
            own[:, j, Count.DISAGREE] = np.count_nonzero(over_a ^ over_b, axis=1)
            over_a |= over_b
            own[:, j, Count.EITHER] = np.count_nonzero(over_a, axis=1)
        table = self.rows.reshape(self.units.count, -1)  # (U, k·4), a view of the state
        assert np.shares_memory(table, self.rows) or self.rows.size == 0
        _put_counts(self.units, table, start, own.reshape(count, -1))
        return shares(own.sum(axis=1))

    def nbytes(self) -> int:
        """Return the bytes of the state."""
        return int(self.rows.nbytes + self.channels.nbytes)

    def counts(self) -> np.ndarray:
        """Return the totals of each selected channel, (k, 4): [either, disagree, fp32 over, int8 over]."""
        return np.asarray(self.rows.sum(axis=0))

    def flip_share(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Return each channel's disagree / either, (k,), or one row per weight row (B, units): (B, k)."""
        if weights is None:
            return shares(self.counts())
        return shares(weighted_sum(weights, self.rows))

    def merge(self, other: ThresholdAccumulator) -> ThresholdAccumulator:
        """Return the accumulator of both halves of a split fixture (disjoint samples, same layout and units)."""
        if other.units != self.units:
            raise ValueError(f"cannot merge counts over different units ({self.units} vs {other.units})")
        if not np.array_equal(other.channels, self.channels) or other.threshold != self.threshold:
            raise ValueError("cannot merge counts of other channels or another threshold")
        merged = ThresholdAccumulator(self.samples, self.channels, self.threshold, self.units)
        # a sample's row is zero in the half that did not see it: adding places it (or sums its block)
        merged.rows = self.rows + other.rows
        return merged

    def state(self, rows: slice) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return (JSON-able meta, arrays) of the state; the count rows only at ``rows`` (a shard's own units)."""
        return {"threshold": self.threshold}, {"rows": self.rows[rows], "channels": self.channels}

    @classmethod
    def restore(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], units: Units,
                rows: slice) -> ThresholdAccumulator:
        """Return the accumulator :meth:`state` described; the units outside ``rows`` hold zeros."""
        acc = cls(units.samples, np.asarray(arrays["channels"]), float(meta["threshold"]), units)
        part = np.asarray(arrays["rows"], dtype=np.float64).reshape(-1, acc.channels.size, COUNTS)
        acc.rows = placed(part, units.count, rows)
        return acc


@dataclass(frozen=True)
class ChannelTerm:
    """One channel's flip share, recomputed for rows of bootstrap unit weights (a metrics.Term)."""

    rows: np.ndarray  # (units, 4) counts of the channel

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """Return the flip share for each weight row, (B,)."""
        return shares(weighted_sum(weights, self.rows))


def threshold_report(acc: ThresholdAccumulator, budget: float, unit_count: int, bootstrap: int, seed: int,
                     confidence: float) -> ThresholdReport:
    """Return every selected channel's decisions, with a bootstrap interval for the channels that cross."""
    if unit_count != acc.units.count:
        raise ValueError(f"unit_count {unit_count} is not the accumulator's {acc.units.count} units")
    totals = acc.counts()
    rows: list[ThresholdChannel] = []
    for j, channel in enumerate(acc.channels):
        either, disagree, fp32_over, int8_over = (int(v) for v in totals[j])
        interval = None
        if either > 0:
            # the same seed for every channel: each channel's interval is over the same resampled units
            interval = bootstrap_drop([ChannelTerm(np.ascontiguousarray(acc.rows[:, j]))], unit_count, bootstrap,
                                      seed, confidence)
        rows.append(ThresholdChannel(int(channel), either, disagree, fp32_over, int8_over, interval))
    crossing = [row for row in rows if row.either > 0]
    # ties go to the earlier channel: max keeps the first of equal keys
    worst = max(crossing, key=lambda row: row.flip_share).channel if crossing else None
    return ThresholdReport(acc.threshold, float(budget), tuple(rows), worst)


def threshold_breaches(name: str, report: ThresholdReport,
                       over: Callable[[float, Interval | None, float], bool]) -> list[str]:
    """Return one sentence per channel over budget_threshold_flip, worst first: five named, then a count."""
    failing = [row for row in report.channels
               if row.either > 0 and over(row.flip_share, row.interval, report.budget)]
    failing.sort(key=lambda row: (-row.flip_share, row.channel))
    out = [f"output {name!r} channel {row.channel}: x >= {report.threshold:g} disagrees on {row.flip_share:.1%} of "
           f"the {row.either:,} elements over it in either model (fp32 {row.fp32_over:,} over, int8 "
           f"{row.int8_over:,}), over budget_threshold_flip {report.budget:g}" for row in failing[:NAMED]]
    if len(failing) > NAMED:
        rest = len(failing) - NAMED
        out.append(f"output {name!r}: and {rest} more channel{'s' if rest > 1 else ''} over budget_threshold_flip "
                   f"{report.budget:g}")
    return out
