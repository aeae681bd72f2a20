"""The pytest nodes: a registry file that collects one item per gated entry and execution provider."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from .comparison import GateResult
from .errors import EpUnavailableError, InputError, InsufficientSamplesError, QuantGateFailure
from .registry import Entry, EntryProblem, Registry, load_registry
from .reports import failure_text
from .settings import Settings

ROW_PROPERTY = "quantgate_result"


def settings_of(config: pytest.Config) -> Settings:
    """Return the settings resolved in pytest_configure."""
    from .plugin import SETTINGS_KEY

    return config.stash[SETTINGS_KEY]


class RegistryFile(pytest.File):
    """A ``registry.json``: yields one QuantGateItem per non-fp32 entry and EP, sorted."""

    def collect(self) -> Iterator[pytest.Item]:
        """Load the registry and yield its items; whole-file problems become a clean collection error."""
        settings = settings_of(self.config)
        try:
            registry = load_registry(self.path)
        except InputError as exc:
            raise self.CollectError(str(exc)) from None
        from . import providers

        eps = providers.expand(settings.eps)
        entries = [e for e in registry.entries if e.gated]
        problems = list(registry.problems)
        if settings.select:
            unknown = [p for p in settings.select if not any(fnmatch.fnmatchcase(e.id, p) for e in registry.entries)
                       and not any(fnmatch.fnmatchcase(p2.label, p) for p2 in problems)]
            if unknown:
                known = ", ".join(e.id for e in registry.entries) or "none"
                raise self.CollectError(
                    f"--quantgate-select / quantgate_select: {', '.join(repr(u) for u in unknown)} match no entry "
                    f"of {self.path} (ids: {known})"
                )
            entries = [e for e in entries if any(fnmatch.fnmatchcase(e.id, p) for p in settings.select)]
            problems = [p for p in problems if any(fnmatch.fnmatchcase(p.label, p2) for p2 in settings.select)]
        items: list[pytest.Item] = []
        for entry in entries:
            for ep in eps:
                items.append(QuantGateItem.from_parent(self, name=f"{entry.id}[{ep}]", registry=registry,
                                                       entry=entry, ep=ep))
        for problem in problems:
            items.append(BrokenEntryItem.from_parent(self, name=problem.label, problem=problem))
        yield from sorted(items, key=lambda item: item.name)


def _error(item: pytest.Item, message: str, row: dict[str, Any]) -> NoReturn:
    """Record an ERROR row and fail the setup phase with the message alone (no Python traceback)."""
    item.user_properties.append((ROW_PROPERTY, json.dumps(row)))
    pytest.fail(message, pytrace=False)


class QuantGateItem(pytest.Item):
    """One registry entry gated on one execution provider."""

    def __init__(self, *, registry: Registry, entry: Entry, ep: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.registry = registry
        self.entry = entry
        self.ep = ep
        self.prepared: Any = None
        self.result: GateResult | None = None
        self.regen_note: str | None = None
        self.add_marker("quantgate")

    def _row(self, verdict: str, reason: str) -> dict[str, Any]:
        return {"id": self.entry.id, "ep": self.ep, "mode": self.entry.mode, "samples": None, "drop": None,
                "budget": self.entry.budget_plcc, "headroom": None, "verdict": verdict, "reason": reason}

    def setup(self) -> None:
        """Check every input (files, hashes, fixture, EP) so bad input is an ERROR, not a failed comparison."""
        from . import gate

        from . import regen
        from .plugin import RUN_ID_KEY

        settings = settings_of(self.config)
        try:
            built = regen.ensure_sidecar(self.registry, self.entry, settings, self.config.stash[RUN_ID_KEY])
            if built is not None:
                self.regen_note = built.note(self.registry, self.entry)
                if not built.matches_pin:
                    self.warn(pytest.PytestWarning(f"quantgate {self.entry.id}: {self.regen_note}"))
            self.prepared = gate.prepare(self.registry, self.entry, self.ep, settings, int8_pinned=built is None)
            return
        except EpUnavailableError as exc:
            if not settings.strict_ep:
                self.user_properties.append((ROW_PROPERTY, json.dumps(self._row("SKIP", str(exc)))))
                pytest.skip(f"quantgate: {exc} (use --quantgate-strict-ep to make this an error)")
            reason = f"{exc} (--quantgate-strict-ep)"
        except InputError as exc:
            reason = str(exc)
        _error(self, f"quantgate ERROR: {self.entry.id} [{self.ep}]: {reason}", self._row("ERROR", reason))

    def runtest(self) -> None:
        """Run fp32 and int8 on every soak sample; raise QuantGateFailure when the sidecar fails."""
        from . import gate

        settings = settings_of(self.config)
        result = gate.evaluate(self.prepared, settings)
        self.result = result
        self.prepared = None  # release the sessions and arrays as soon as possible
        row = result.to_row()
        row["regenerated"] = self.regen_note
        self.user_properties.append((ROW_PROPERTY, json.dumps(row)))
        for name, value in (("quantgate_drop", result.drop), ("quantgate_budget", result.budget),
                            ("quantgate_verdict", result.verdict)):
            self.user_properties.append((name, value))
        if settings.strict and result.needed_samples is not None:
            raise InsufficientSamplesError(result.warnings[-1])
        for warning in result.warnings:
            self.warn(pytest.PytestWarning(f"quantgate {self.entry.id} [{self.ep}]: {warning}"))
        if not result.passed:
            raise QuantGateFailure(result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        """Format the gate's own failures as a report; anything else as pytest would."""
        if isinstance(excinfo.value, QuantGateFailure):
            return failure_text(excinfo.value.result, str(self.registry.path))
        if isinstance(excinfo.value, InputError):
            return f"quantgate ERROR: {self.entry.id} [{self.ep}]: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        """Name the registry entry, so ``-v`` and reports point at it."""
        return self.registry.path, None, f"quantgate {self.entry.id} [{self.ep}] ({self.registry.path.name}" \
            f" {self.entry.location}, mode={self.entry.mode})"


class BrokenEntryItem(pytest.Item):
    """An entry the schema rejected: reported as an error of its own so the others still run."""

    def __init__(self, *, problem: EntryProblem, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.problem = problem
        self.add_marker("quantgate")

    def setup(self) -> None:
        """Fail the setup with the schema message."""
        row = {"id": self.problem.label, "ep": "-", "mode": "-", "samples": None, "drop": None, "budget": None,
               "headroom": None, "verdict": "ERROR", "reason": self.problem.message}
        _error(self, f"quantgate ERROR: {self.problem.message}", row)

    def runtest(self) -> None:
        """Never reached: setup always fails."""

    def reportinfo(self) -> tuple[Path, int | None, str]:
        """Name the broken entry."""
        return self.path, None, f"quantgate registry entry {self.problem.label} (models[{self.problem.index}])"
