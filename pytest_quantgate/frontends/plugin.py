"""pytest hooks and options of pytest-quantgate; the logic lives in the modules named for each concern."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..settings import add_pytest_options, resolve
from .stash import OUTCOMES_KEY, RUN_ID_KEY, SETTINGS_KEY

if TYPE_CHECKING:
    from .api import QuantgateFixture


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the quantgate options (settings.OPTIONS), each flag with an ini twin that shares its help text."""
    add_pytest_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    """Resolve the settings once; register the collecting plugin only when --quantgate is on."""
    config.addinivalue_line("markers", "quantgate: an int8-vs-fp32 gate item of pytest-quantgate")
    settings = resolve(config)
    config.stash[SETTINGS_KEY] = settings
    config.stash[RUN_ID_KEY] = _run_id(config)
    if not settings.enabled:
        return
    from ..engine.ort import OnnxRuntimeError, check_onnxruntime

    try:
        check_onnxruntime()  # finds the wheel without importing it: start-up stays cheap
    except OnnxRuntimeError as exc:
        raise pytest.UsageError(f"quantgate: {exc}") from None
    if not settings.registry.is_file():
        raise pytest.UsageError(
            f"quantgate: registry {settings.registry} not found (set --quantgate-registry or quantgate_registry)"
        )
    if getattr(config, "workerinput", None) is None:  # the controller writes the reports: check it can, first
        from ..errors import InputError
        from ..fileio import check_writable

        # pytest's own --junitxml writer raises at the end of the run when it cannot write: check it first too
        junit = getattr(config.option, "xmlpath", None)
        for option, path in (("--quantgate-report", settings.report), ("--quantgate-html", settings.html),
                             ("--junitxml", Path(junit) if junit else None)):
            if path is not None:
                try:
                    check_writable(path, option, create_folders=True)  # the writer makes missing folders
                except InputError as exc:
                    raise pytest.UsageError(f"quantgate: {exc}") from None
    _ensure_registry_collected(config, settings.registry)
    config.stash[OUTCOMES_KEY] = {}
    config.pluginmanager.register(QuantGateSession(config), "quantgate-session")


@pytest.fixture
def quantgate(request: pytest.FixtureRequest) -> QuantgateFixture:
    """Gate int8 sidecars built inside a test: ``quantgate.check(fp32, int8, feeds=..., budget_plcc=...)``.

    Available without --quantgate; it runs the registry item's gate with this run's --quantgate-* options and
    fails the test with the registry item's text (pytest_quantgate.frontends.api).
    """
    from .api import QuantgateFixture  # onnxruntime is imported only when a check runs

    return QuantgateFixture(request)


def _run_id(config: pytest.Config) -> str:
    """Return an id shared by the controller and every xdist worker of this run."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "quantgate_run_id" in workerinput:
        return str(workerinput["quantgate_run_id"])
    import uuid

    return uuid.uuid4().hex


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Hand the controller's run id to each xdist worker."""
    node.workerinput["quantgate_run_id"] = node.config.stash[RUN_ID_KEY]


def _ensure_registry_collected(config: pytest.Config, registry: Path) -> None:
    """Make the registry a collection argument.

    With no path on the command line, ``pytest --quantgate`` runs the gate alone (the registry replaces
    testpaths); with paths, the registry is added beside them unless one of them already covers it.
    """
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [str(registry)]
        return
    for arg in config.args:
        target = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        if registry == target or registry.is_relative_to(target):
            return
    config.args.append(str(registry))


def _registry_nodeid(path: Path, config: pytest.Config) -> str | None:
    """Return the registry's node id when it lies outside the rootdir, else None (pytest's own rule applies).

    Outside the rootdir, pytest names a file by its path relative to the command-line argument that holds it; the
    registry is that argument itself, so its node id would be "" and its items "::<id>[<ep>]". It gets its path
    relative to the rootdir instead (``../models/registry.json``): it keeps its name, and pytest, which reads node
    ids as rootdir-relative paths, shows and resolves it to the right file.
    """
    import os

    registry, rootdir = path.resolve(), config.rootpath.resolve()
    if registry.is_relative_to(rootdir):
        return None
    try:
        return Path(os.path.relpath(registry, rootdir)).as_posix()
    except ValueError:  # Windows: another drive has no relative path
        return path.name


class QuantGateSession:
    """Hooks that only exist while the gate is on."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.unwritten: list[str] = []  # reports that could not be written, said in the terminal summary

    @pytest.hookimpl
    def pytest_collect_file(self, file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        """Collect the configured registry file."""
        settings = parent.config.stash[SETTINGS_KEY]
        if file_path.resolve() == settings.registry:
            from .items import RegistryFile

            return RegistryFile.from_parent(parent, path=file_path, nodeid=_registry_nodeid(file_path, parent.config))
        return None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        """Put the item's outcome (JSON form) on its report; xdist carries report attributes to the controller."""
        outcome = yield
        data = getattr(item, "quantgate_outcome", None)
        if data is not None and call.when in ("setup", "call"):
            outcome.get_result().quantgate_outcome = data

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Gather each item's outcome (on the controller when xdist runs workers)."""
        data = getattr(report, "quantgate_outcome", None)
        if data is not None:
            from ..records import Outcome, RecordError

            try:
                outcome = Outcome.from_json(data)
            except RecordError as exc:  # a bug, never a reason to lose the other items' summary
                outcome = Outcome(str(data.get("id", report.nodeid)), str(data.get("ep", "-")), "-", "error",
                                  f"quantgate could not read this item's outcome from its worker: {exc}")
            self.config.stash[OUTCOMES_KEY][report.nodeid] = outcome

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write the JSON, HTML and GitHub step-summary reports (controller only)."""
        if getattr(self.config, "workerinput", None) is not None:
            return
        from ..errors import WriteError
        from ..reporting import reports

        outcomes = list(self.config.stash.get(OUTCOMES_KEY, {}).values())
        settings = self.config.stash[SETTINGS_KEY]

        def html(path: Path) -> None:
            from ..reporting.html import write_html

            write_html(path, outcomes, title=f"quantgate: {settings.registry}")

        jobs: list[tuple[Path | None, Callable[[Path], None]]] = [
            (settings.report, lambda path: reports.write_json(path, outcomes, settings)), (settings.html, html)]
        for path, write in jobs:
            try:
                if path is not None:
                    write(path)
            except WriteError as exc:  # one line in the summary, never an INTERNALERROR; the others still write
                self.unwritten.append(str(exc))
        try:
            reports.append_github_summary(outcomes)
        except WriteError as exc:
            self.unwritten.append(str(exc))
        if self.unwritten and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # a report CI reads is missing: never green

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any, config: pytest.Config) -> None:
        """Print one row per gated item, drops per EP when several ran, and any report that was not written."""
        from ..reporting.reports import per_ep_lines, summary_lines

        outcomes = list(config.stash.get(OUTCOMES_KEY, {}).values())
        if outcomes:
            terminalreporter.section("quantgate summary")
            for line in summary_lines(outcomes):
                terminalreporter.line(line)
            per_ep = per_ep_lines(outcomes)
            if per_ep:
                terminalreporter.section("quantgate drops per execution provider")
                for line in per_ep:
                    terminalreporter.line(line)
            settings = config.stash[SETTINGS_KEY]
            for label, path in (("JSON report", settings.report), ("HTML report", settings.html),
                                ("disagreements", settings.save_disagreements)):
                if path is not None and not any(message.startswith(f"{path}:") for message in self.unwritten):
                    terminalreporter.line(f"quantgate {label}: {path}")
        for message in self.unwritten:
            terminalreporter.line(f"quantgate ERROR: {message}", red=True)
