"""The run planner every front end shares: select entries, expand EPs, run each (entry, EP), collect outcomes.

pytest items, ``quantgate measure``, the pre-commit hook and ``quantgate advise`` used to each loop over the
registry in their own way; they now all ask :func:`select` which entries a run covers and :func:`plan` which
(entry, EP) pairs, and the command-line front ends run them with :func:`run`. pytest runs the pairs as items
(one :func:`~pytest_quantgate.runner.gate.run_one` per item) from the same plan.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..errors import RegistryError
from ..io.registry import Entry, EntryProblem, Registry
from ..records import Outcome
from ..settings import Settings
from .gate import CacheStore, run_one


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select(registry: Registry, patterns: Sequence[str] | None, option: str = "--id",
           *, gated_only: bool = False) -> tuple[list[Entry], list[EntryProblem]]:
    """Return the entries and the invalid entries whose ids match any glob of ``patterns`` (all when none).

    A pattern that matches nothing (valid or invalid) is a RegistryError naming ``option``, the patterns and the
    ids there are: a typo must not gate nothing and pass.
    """
    entries = [e for e in registry.entries if e.gated or not gated_only]
    problems = list(registry.problems)
    if not patterns:
        return entries, problems
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(e.id, p) for e in registry.entries)
               and not any(fnmatch.fnmatchcase(q.label, p) for q in problems)]
    if unknown:
        known = ", ".join(e.id for e in registry.entries) or "none"
        raise RegistryError(f"{option} {', '.join(repr(u) for u in unknown)} match no entry of {registry.path} "
                            f"(ids: {known})")
    return [e for e in entries if _matches(e.id, patterns)], [q for q in problems if _matches(q.label, patterns)]


@dataclass(frozen=True)
class Plan:
    """What one run gates: gated entries (sorted by id) times EPs, and the invalid entries to report."""

    registry: Registry
    entries: tuple[Entry, ...]
    eps: tuple[str, ...]
    problems: tuple[EntryProblem, ...] = ()

    @property
    def pairs(self) -> list[tuple[Entry, str]]:
        """Return every (entry, EP) the run gates, entry-major."""
        return [(entry, ep) for entry in self.entries for ep in self.eps]


def plan(registry: Registry, settings: Settings, patterns: Sequence[str] | None = None, option: str = "--id",
         *, keep: Callable[[Entry], bool] | None = None, problems: bool = True) -> Plan:
    """Return the plan of a run: the selected gated entries (``keep`` filters further) on ``settings.eps``."""
    from ..engine import providers

    entries, broken = select(registry, patterns, option, gated_only=True)
    if keep is not None:
        entries = [e for e in entries if keep(e)]
    return Plan(registry, tuple(sorted(entries, key=lambda e: e.id)), tuple(providers.expand(settings.eps)),
                tuple(broken) if problems else ())


Progress = Callable[[int, int, Entry, str, "Outcome | None"], None]


def run(the_plan: Plan, settings: Settings, *, run_id: str = "", cache: CacheStore | None = None,
        progress: Progress | None = None) -> list[Outcome]:
    """Gate every pair of the plan; return the invalid entries' errors, then one outcome per pair, in order.

    ``progress(i, total, entry, ep, outcome)`` is called before each pair (outcome None) and after it.
    """
    outcomes = [Outcome(p.label, "-", "-", "error", p.message) for p in the_plan.problems]
    pairs = the_plan.pairs
    for index, (entry, ep) in enumerate(pairs, start=1):
        if progress is not None:
            progress(index, len(pairs), entry, ep, None)
        if settings.shard is not None:  # a part of every fixture: its state is written, merge-shards decides
            from .shards import run_shard

            outcome = run_shard(the_plan.registry, entry, ep, settings, run_id=run_id)
        else:
            outcome = run_one(the_plan.registry, entry, ep, settings, run_id=run_id, cache=cache)
        if progress is not None:
            progress(index, len(pairs), entry, ep, outcome)
        outcomes.append(outcome)
    return outcomes
