"""Decision diffs become fixtures: the soak samples where int8 departs most from fp32, saved as a soak fixture.

``--quantgate-save-disagreements DIR`` writes ``DIR/<id>.<ep>.disagreements.npz`` after an entry is measured: the
samples :meth:`~..engine.comparison.Collector.worst_samples` ranks first (top-1 and label flips, threshold
decision flips, the largest errors relative to each output's spread; focused on what failed when the entry
failed), worst first, with every array of the soak fixture (model inputs, masks and other extras, the target)
and ``indices``, their positions in the soak fixture. The gate never feeds an array that is no model input, so
the file is a soak fixture as it stands: the next sidecar is gated first on what broke the last one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.comparison import Collector
from ..errors import FixtureError
from ..fileio import atomic_path
from ..io.npz import save_arrays
from ..io.soak import FeedPlan, Fixture
from ..records import GateResult

INDICES_KEY = "indices"
SUFFIX = ".disagreements.npz"


def disagreements_path(folder: Path, entry_id: str, ep: str) -> Path:
    """Return where the disagreements of one entry on one EP are written."""
    return folder / f"{entry_id}.{ep}{SUFFIX}"


def pick(plan: FeedPlan, collector: Collector, result: GateResult, count: int) -> list[int]:
    """Return at most ``count`` samples, worst first; whole batches for a model that fixes its batch."""
    want = min(count, plan.samples)
    if plan.fixed_batch:
        # a model that fixes its batch takes only whole batches: the file must hold a multiple of it to be fed
        want = min(plan.samples, max(plan.batch, want // plan.batch * plan.batch))
    return collector.worst_samples(want, result.focus, result.kind)[:want]


def disagreement_arrays(fixture: Fixture, plan: FeedPlan, ranked: list[int]) -> dict[str, np.ndarray]:
    """Return the fixture's arrays for the ``ranked`` samples, in that order, and their ``indices``."""
    if INDICES_KEY in fixture.inputs and INDICES_KEY not in plan.extras:
        raise FixtureError(f"{fixture.path}: the model has an input named {INDICES_KEY!r}, which a disagreements "
                           f"fixture uses for the samples' positions; --quantgate-save-disagreements cannot save it")
    taken = fixture.take(ranked, target=True)  # in fixture order
    order = np.searchsorted(np.asarray(sorted(set(ranked)), dtype=np.int64), np.asarray(ranked, dtype=np.int64))
    arrays = {name: value[order] for name, value in taken.items()}
    positions = np.asarray(ranked, dtype=np.int64)
    if INDICES_KEY in arrays:
        # the fixture is itself a saved one: keep the positions in the soak fixture it was cut from
        positions = np.asarray(arrays.pop(INDICES_KEY), dtype=np.int64).reshape(-1)
    arrays[INDICES_KEY] = positions
    return arrays


def write_disagreements(fixture: Fixture, plan: FeedPlan, collector: Collector, result: GateResult, folder: Path,
                        count: int) -> Path:
    """Write the worst samples of one measured entry as ``<id>.<ep>.disagreements.npz``; return its path.

    The file is replaced atomically (readers see the old one or the new one); a failure is a WriteError naming it.
    """
    target = disagreements_path(folder, result.entry_id, result.ep)
    arrays = disagreement_arrays(fixture, plan, pick(plan, collector, result, count))
    size = sum(int(a.nbytes) for a in arrays.values())
    with atomic_path(target, ".npz", what="disagreements fixture", size=size) as tmp, open(tmp, "r+b") as handle:
        save_arrays(handle, arrays)
    return target
