"""Three-way verdicts and early stopping: an anytime-valid confidence sequence of the PLCC drop.

The three outcomes
    With ``--quantgate-decision three-way`` the drop's interval decides alone: PASS (non-inferior) when the whole
    interval lies at or under the budget, FAIL when the whole interval lies over it, INCONCLUSIVE when it
    straddles the budget, with the estimated number of further samples that would settle it.

Why not re-check the bootstrap after every chunk
    A fixed-sample 95% interval covers the drop with probability 0.95 *at one pre-chosen sample count*. Looking
    after every chunk and stopping at the first interval that clears the budget picks the luckiest of many
    looks: a sidecar exactly at its budget then gets a decisive verdict far more often than 5% of the time
    (``tests/test_sequential.py`` measures about 35-40% over 20 looks). Early stopping needs an interval that is
    valid at every sample count *simultaneously*.

The method: an asymptotic confidence sequence (Waudby-Smith, Arnold, Wu, Howard & Ramdas, "Time-uniform central
limit theory and asymptotic confidence sequences", Ann. Statist. 2024, arXiv:2103.06476, Theorem 2.2, the
Gaussian-mixture boundary of Robbins (1970) as tuned by Howard et al., Ann. Statist. 2021, eq. (14)).
    For iid observations with mean μ, sample mean μ̂_t and standard deviation σ̂_t after t of them,

        μ̂_t ± σ̂_t · sqrt( 2(tρ² + 1) / (t²ρ²) · log( sqrt(tρ² + 1) / α ) )

    covers μ at every t at once with probability → 1 − α (time-uniformly, as the looks start later). ρ > 0 is
    fixed before any data; ``ρ² = (−2 log α + log(−2 log α + 1)) / t*`` makes the sequence narrowest at
    t* (Howard et al., eq. (15)); t* is the fixture's sample count, so the verdict at the end of the fixture
    loses least (there the radius is 3.04 standard errors at α = 0.05, against 1.96 for a single look: the price
    of being allowed to stop early). The drop is not a mean but a smooth function of means of per-unit moment
    rows (:mod:`.streaming`), so the sequence is applied to its delta-method influence values, as the paper does
    for functionals with an influence function (its Section 3): the drop's standard error after t samples is
    the infinitesimal-jackknife ``sqrt(Σ_u d_u²)``, where ``d_u`` is the derivative of the drop along unit u's
    row of sums (PLCC is scale-invariant in the sums, so the ``d_u`` add up to zero exactly). Where the drop
    is a maximum (worst channel, worst output, target vs implied drop) the active piece's influence is used.

The stopping rule (``--quantgate-sequential``)
    It applies to entries judged by their PLCC drop alone; one with a judged label output, argmax view or task
    view (thresholds, detections, embeddings) runs its whole fixture, since those are fixed-sample checks.
    The fixture streams in chunks (at most 64 samples); after each chunk, once MIN_LOOK samples are in, the
    sequence's interval is computed: an upper bound under the budget stops with PASS, a lower bound over it
    stops with FAIL, anything else continues. At the end of the fixture the three-way outcome of the last
    (still valid) interval is the verdict. The samples not run are the saving.

Shards
    Every number here is a function of the per-unit rows of sums and the number of samples folded in, so two
    shards' merged rows give the same sequence as one run over their union. The merged state is one look;
    shards that each stopped on their own data are not one sequence, so shards run to their end and the stopping
    decision is made on the merged state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..records import FAIL, INCONCLUSIVE, PASS, Interval
from .metrics import MomentTerm

METHOD = "asymptotic confidence sequence (Waudby-Smith et al. 2024, Gaussian mixture), delta-method drop"
# no look before this many samples: the variance of the influence values is itself estimated, and below ~30
# samples that estimate is too rough for the asymptotic guarantee (the registry's default sample floor, too)
MIN_LOOK = 32

Settled = Literal["PASS", "FAIL", "INCONCLUSIVE"]


# --- the boundary -------------------------------------------------------------------------------------------------


def mixture_rho(planned: int, alpha: float) -> float:
    """Return the mixture parameter ρ that makes the sequence narrowest after ``planned`` samples."""
    two_log = -2.0 * math.log(alpha)
    return math.sqrt((two_log + math.log(two_log + 1.0)) / max(planned, 1))


def mixture_radius(t: int, alpha: float, rho: float) -> float:
    """Return the sequence's half-width after ``t`` samples in standard errors of the mean (σ̂_t / √t)."""
    v = t * rho * rho
    return math.sqrt(2.0 * (v + 1.0) / v * math.log(math.sqrt(v + 1.0) / alpha))


# --- the drop's influence values --------------------------------------------------------------------------------


def _plcc_and_derivative(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return PLCC of the summed moments (...,) and its derivative along each unit's row (U, ...).

    ``rows`` (U, ..., 6) holds [n, Σx, Σy, Σx², Σy², Σxy] per unit; the derivative along row u is
    d/dε PLCC(S + ε·rows[u]) at ε = 0, with S the sum over units.
    """
    total = rows.sum(axis=0)
    n, sx, sy, sxx, syy, sxy = (total[..., i] for i in range(6))
    m = [rows[..., i] for i in range(6)]
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / n
        vx = sxx - sx * sx / n
        vy = syy - sy * sy / n
        scale = np.sqrt(vx * vy)
        r = cov / scale
        nn = n * n
        dcov = m[5] - (m[1] * sy + sx * m[2]) / n + sx * sy * m[0] / nn
        dvx = m[3] - 2.0 * sx * m[1] / n + sx * sx * m[0] / nn
        dvy = m[4] - 2.0 * sy * m[2] / n + sy * sy * m[0] / nn
        dr = dcov / scale - 0.5 * r * (dvx / vx + dvy / vy)
    return np.asarray(r), np.asarray(np.where(np.isfinite(dr), dr, 0.0))


def term_influence(term: MomentTerm) -> tuple[float, np.ndarray]:
    """Return a term's drop and its derivative along each unit's rows, (U,): the rules of MomentTerm.parts."""
    r, dr = _plcc_and_derivative(term.ref_test)
    finite = np.isfinite(r)
    fidelity = np.where(finite, 1.0 - r, 1.0)  # an undefined PLCC (constant int8) counts as a drop of 1
    dfid = np.where(finite, -dr, 0.0)
    if fidelity.ndim == 1:  # per channel: the worst judged channel is the active piece
        judged = np.where(term.mask, fidelity, -np.inf) if term.mask is not None else fidelity
        worst = int(np.argmax(judged))
        fid, dfid_u = float(fidelity[worst]), dfid[:, worst]
    else:
        fid, dfid_u = float(fidelity), dfid
    if term.ref_t is None or term.test_t is None:
        return fid, np.asarray(dfid_u)
    r_rt, dr_rt = _plcc_and_derivative(term.ref_t)
    r_tt, dr_tt = _plcc_and_derivative(term.test_t)
    target_drop, d_target = float(r_rt - r_tt), dr_rt - dr_tt
    if not term.implied:
        return target_drop, np.asarray(d_target)
    implied, d_implied = float(r_rt) * fid, fid * dr_rt + float(r_rt) * dfid_u
    if implied > target_drop:
        return implied, np.asarray(d_implied)
    return target_drop, np.asarray(d_target)


def drop_influence(terms: Sequence[MomentTerm]) -> tuple[float, np.ndarray]:
    """Return the drop (the worst term's) and its derivative along each unit's rows."""
    found = [term_influence(term) for term in terms]
    return max(found, key=lambda f: f[0])


def standard_error(derivatives: np.ndarray) -> float:
    """Return the infinitesimal-jackknife standard error ``sqrt(Σ d_u²)``, with the k/(k−1) small-sample factor."""
    used = int(np.count_nonzero(derivatives))  # units not yet reached have zero rows, hence zero derivatives
    if used < 2:
        return math.inf
    return math.sqrt(float(np.sum(derivatives * derivatives)) * used / (used - 1))


# --- the interval and the verdict ------------------------------------------------------------------------------


def confidence_sequence(terms: Sequence[MomentTerm], samples: int, planned: int, level: float) -> Interval | None:
    """Return the sequence's interval of the drop after ``samples`` of ``planned`` samples (valid at every look)."""
    if not terms or samples < 2:
        return None
    drop, derivatives = drop_influence(terms)
    se = standard_error(derivatives)
    if not math.isfinite(drop) or not math.isfinite(se):
        return None
    return interval_at(drop, se, samples, planned, level)


def interval_at(drop: float, se: float, samples: int, planned: int, level: float) -> Interval:
    """Return the sequence's interval around ``drop`` with standard error ``se`` after ``samples`` samples."""
    alpha = 1.0 - level
    half = se * mixture_radius(samples, alpha, mixture_rho(planned, alpha))
    return Interval(drop - half, drop + half, level, 0)  # 0 replicates: an analytic interval, not a bootstrap


def three_way(interval: Interval, budget: float) -> Settled:
    """Return PASS when the interval lies at or under the budget, FAIL when over it, else INCONCLUSIVE."""
    if interval.high <= budget:
        return PASS
    if interval.low > budget:
        return FAIL
    return INCONCLUSIVE


def inconclusive_text(interval: Interval, budget: float, samples: int, needed: int | None) -> str:
    """Return the reason of an INCONCLUSIVE verdict, with the further samples that would settle it."""
    head = (f"INCONCLUSIVE: the {interval.level:.0%} interval [{interval.low:.6f}, {interval.high:.6f}] straddles "
            f"the budget {budget:g}")
    if not needed:
        return f"{head}; the drop sits on the budget, no sample count would settle it"
    return f"{head}; about {max(needed - samples, 1)} more samples would settle it"
