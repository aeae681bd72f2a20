"""The pytest nodes: a registry file that collects one item per gated entry and execution provider."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..errors import InputError, QuantGateError
from ..io.registry import Entry, EntryProblem, Registry, load_registry
from ..records import GateResult, Outcome
from ..reporting.reports import failure_text
from ..settings import Settings
from .stash import RUN_ID_KEY, SETTINGS_KEY


def settings_of(config: pytest.Config) -> Settings:
    """Return the settings resolved in pytest_configure."""
    return config.stash[SETTINGS_KEY]


class QuantGateFailure(QuantGateError):
    """The int8 sidecar failed the gate; carries the full result for the failure report."""

    def __init__(self, result: GateResult) -> None:
        super().__init__(result.reason)
        self.result = result


class RegistryFile(pytest.File):
    """A ``registry.json``: yields one QuantGateItem per non-fp32 entry and EP, sorted."""

    def collect(self) -> Iterator[pytest.Item]:
        """Load the registry and yield its items; whole-file problems become a clean collection error."""
        settings = settings_of(self.config)
        try:
            registry = load_registry(self.path)
        except InputError as exc:
            raise self.CollectError(str(exc)) from None
        from ..runner.plan import plan

        try:
            the_plan = plan(registry, settings, settings.select, "--quantgate-select / quantgate_select:")
        except InputError as exc:
            raise self.CollectError(str(exc)) from None
        lines = _id_lines(self.path)
        items: list[pytest.Item] = []
        for entry, ep in the_plan.pairs:
            items.append(QuantGateItem.from_parent(self, name=f"{entry.id}[{ep}]", registry=registry,
                                                   entry=entry, ep=ep, line=lines.get(entry.id, 0)))
        for problem in the_plan.problems:
            items.append(BrokenEntryItem.from_parent(self, name=problem.label, problem=problem))
        yield from sorted(items, key=lambda item: item.name)


def _id_lines(path: Path) -> dict[str, int]:
    """Return the 0-based line of each ``"id": "..."`` in the registry, so reports can point at the entry."""
    import re

    found: dict[str, int] = {}
    text = path.read_text(encoding="utf-8", errors="replace")
    for match in re.finditer(r'"id"\s*:\s*"((?:[^"\\]|\\.)*)"', text):
        found.setdefault(match.group(1), text.count("\n", 0, match.start()))
    return found


def junit_properties(result: GateResult) -> list[tuple[str, object]]:
    """Return the metrics that also go to JUnit XML (record_property style), so CI test views show them."""
    ci = [result.interval.low, result.interval.high] if result.interval is not None else None
    props: list[tuple[str, object]] = [("verdict", result.verdict), ("drop", result.drop), ("budget", result.budget),
                                       ("headroom", result.headroom), ("ci", ci), ("samples", result.samples)]
    if result.timing is not None:
        t = result.timing
        props += [("speedup", t.speedup), ("fp32_ms", t.fp32_ms), ("int8_ms", t.int8_ms),
                  ("fp32_bytes", t.fp32_bytes), ("int8_bytes", t.int8_bytes)]
    return [(f"quantgate_{name}", value) for name, value in props if value is not None]


class QuantGateItem(pytest.Item):
    """One registry entry gated on one execution provider."""

    def __init__(self, *, registry: Registry, entry: Entry, ep: str, line: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.line = line
        self.registry = registry
        self.entry = entry
        self.ep = ep
        self.outcome: Outcome | None = None
        self.quantgate_outcome: dict[str, Any] | None = None  # the outcome's JSON form, put on the report
        self.add_marker("quantgate")

    @property
    def result(self) -> GateResult | None:
        """Return the measured result, if the gate got that far."""
        return self.outcome.result if self.outcome is not None else None

    def setup(self) -> None:
        """Run the gate (gate.run_one); bad input is an ERROR here, never a failed comparison."""
        from ..runner.cache import PytestCache
        from ..runner.gate import run_one

        settings = settings_of(self.config)
        if settings.shard is not None:  # --quantgate-shard: write this part's state, no verdict
            from ..runner.shards import run_shard

            outcome = run_shard(self.registry, self.entry, self.ep, settings, run_id=self.config.stash[RUN_ID_KEY])
        else:
            cache = PytestCache(self.config) if settings.cache else None
            outcome = run_one(self.registry, self.entry, self.ep, settings, run_id=self.config.stash[RUN_ID_KEY],
                              cache=cache)
        self.outcome = outcome
        for note in outcome.notes:
            self.warn(pytest.PytestWarning(f"quantgate {self.entry.id}: {note}"))
        self.quantgate_outcome = outcome.to_json()
        if outcome.log:
            # shown with the item's report (failures, or -rA), once, instead of ORT's lines on the terminal
            self.add_report_section("setup", "onnxruntime log", "\n".join(outcome.log))
        if outcome.result is not None and outcome.status != "error" and not outcome.cached:
            self.user_properties.extend(junit_properties(outcome.result))
        if outcome.cached:
            pytest.skip(f"quantgate: {self.entry.id} [{self.ep}] {outcome.message}")
        if outcome.status == "skip":
            pytest.skip(f"quantgate: {outcome.message} (use --quantgate-strict-ep to make this an error)")
        if outcome.status == "error":
            message = f"quantgate ERROR: {self.entry.id} [{self.ep}]: {outcome.message}"
            if outcome.traceback and self.config.get_verbosity() > 0:
                message += "\n" + outcome.traceback
            pytest.fail(message, pytrace=False)
        if outcome.status == "inconclusive":
            # neither a pass nor a fail: pytest's own category for "did not pass, and we know why" (xfailed), so
            # the run shows it apart; --quantgate-strict makes it an ERROR (gate.run_one) that fails the run
            pytest.xfail(f"quantgate {self.entry.id} [{self.ep}] {outcome.message} (--quantgate-strict makes an "
                         f"INCONCLUSIVE verdict an error)")

    def runtest(self) -> None:
        """Deliver the verdict measured in setup; raise QuantGateFailure when the sidecar fails."""
        result = self.result
        if result is None and self.outcome is not None and self.outcome.status == "pass":
            return  # a shard wrote its state (setup's outcome says where); merge-shards gives the verdict
        if result is None:  # setup either measured or ended the item
            raise QuantGateError(f"{self.entry.id} [{self.ep}]: no result was measured")
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
        return self.registry.path, self.line, f"quantgate {self.entry.id} [{self.ep}] ({self.registry.path.name}" \
            f" {self.entry.location}, mode={self.entry.mode})"


class BrokenEntryItem(pytest.Item):
    """An entry the schema rejected: reported as an error of its own so the others still run."""

    def __init__(self, *, problem: EntryProblem, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.problem = problem
        self.quantgate_outcome: dict[str, Any] | None = None
        self.add_marker("quantgate")

    def setup(self) -> None:
        """Fail the setup with the schema message (no Python traceback)."""
        self.quantgate_outcome = Outcome(self.problem.label, "-", "-", "error", self.problem.message).to_json()
        pytest.fail(f"quantgate ERROR: {self.problem.message}", pytrace=False)

    def runtest(self) -> None:
        """Never reached: setup always fails."""

    def reportinfo(self) -> tuple[Path, int | None, str]:
        """Name the broken entry."""
        return self.path, 0, f"quantgate registry entry {self.problem.label} (models[{self.problem.index}])"
