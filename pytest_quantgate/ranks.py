"""Rank correlations (Spearman's rho, Kendall's tau-b) in numpy, O(n log n), equal to scipy.stats' values.

The gate needs them only on the bounded reservoir (≤ 20 000 element pairs), but importing ``scipy.stats`` costs
about 0.6 s of every fresh process (measured on the 2-core CI machine), more than the whole plain ORT loop of a
small model. The formulas are scipy's (``rankdata(method="average")`` then Pearson; tau-b from concordant,
discordant and tied pair counts); ``tests/test_ranks.py`` checks them against scipy.stats on ties and on
random data.
"""

from __future__ import annotations

import math

import numpy as np

# values compared pairwise by brute force before the merge levels start (see :func:`inversions`)
BRUTE_BLOCK = 64


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Return 1-based ranks of ``values``, ties given the mean of their ranks (scipy's ``method="average"``)."""
    x = np.asarray(values).ravel()
    n = x.size
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    # start of each run of equal values, and the run each sorted position belongs to
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], n]
    run = np.repeat(np.arange(starts.size), ends - starts)
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[run]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Return Spearman's rho of two equally long 1-D arrays (NaN when either is constant)."""
    rx = average_ranks(x)
    ry = average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    # einsum, not np.dot: BLAS's dot may start threads on long vectors, which stalls on a busy 2-core machine
    denom = math.sqrt(float(np.einsum("i,i->", rx, rx)) * float(np.einsum("i,i->", ry, ry)))
    return float(np.einsum("i,i->", rx, ry)) / denom if denom > 0 else float("nan")


def _tied_pairs(sorted_values: np.ndarray) -> int:
    """Return the number of pairs of equal values in a sorted array."""
    if sorted_values.size == 0:
        return 0
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    counts = np.diff(np.r_[starts, sorted_values.size]).astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def inversions(values: np.ndarray) -> int:
    """Return the number of pairs i < j with values[i] > values[j] (a bottom-up merge count, vectorised)."""
    r = np.unique(np.asarray(values).ravel(), return_inverse=True)[1].astype(np.int64).ravel()
    n = r.size
    span = int(r.max()) + 1 if n else 1
    # pairs inside each block of BRUTE_BLOCK consecutive values are compared all at once (n · BRUTE_BLOCK
    # booleans), which replaces the first log2(BRUTE_BLOCK) merge levels
    total = 0
    later = np.triu(np.ones((BRUTE_BLOCK, BRUTE_BLOCK), dtype=bool), 1)
    for lo in range(0, n, BRUTE_BLOCK * 256):
        part = r[lo : min(n, lo + BRUTE_BLOCK * 256)]
        whole = part.size // BRUTE_BLOCK * BRUTE_BLOCK
        blocks = part[:whole].reshape(-1, BRUTE_BLOCK)
        total += int(np.count_nonzero((blocks[:, :, None] > blocks[:, None, :]) & later))
        rest = part[whole:]
        total += int(np.count_nonzero((rest[:, None] > rest[None, :]) & later[: rest.size, : rest.size]))
    index = np.arange(n, dtype=np.int64)
    width = BRUTE_BLOCK
    # at each level the blocks [2kw, 2kw+w) and [2kw+w, 2kw+2w) are siblings: every pair i < j in different
    # blocks is counted once, at the level where i sits in the left sibling and j in the right one
    while width < n:
        pair = index // (2 * width)
        left = (index // width) % 2 == 0
        keys = pair * span + r
        left_keys = np.sort(keys[left])
        right_keys = keys[~left]
        right_pair = pair[~left]
        above = np.searchsorted(left_keys, (right_pair + 1) * span, side="left")
        at_most = np.searchsorted(left_keys, right_keys, side="right")
        total += int((above - at_most).sum())
        width *= 2
    return total


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Return Kendall's tau-b of two equally long 1-D arrays (NaN when either is constant)."""
    x = np.asarray(x).ravel()
    y = np.asarray(y).ravel()
    n = x.size
    if n < 2:
        return float("nan")
    order = np.lexsort((y, x))  # by x, ties by y: pairs tied in x are never counted as discordant
    xs, ys = x[order], y[order]
    discordant = inversions(ys)
    x_ties = _tied_pairs(xs)
    y_ties = _tied_pairs(np.sort(y))
    # pairs tied in both: runs of equal (x, y) in the lexicographic order
    same = np.r_[True, (xs[1:] != xs[:-1]) | (ys[1:] != ys[:-1])]
    starts = np.flatnonzero(same)
    counts = np.diff(np.r_[starts, n]).astype(np.int64)
    both_ties = int((counts * (counts - 1) // 2).sum())
    total = n * (n - 1) // 2
    difference = total - x_ties - y_ties + both_ties - 2 * discordant
    if total in (x_ties, y_ties):
        return float("nan")
    tau = difference / math.sqrt(total - x_ties) / math.sqrt(total - y_ties)
    return min(1.0, max(-1.0, tau))
