"""Quiet output: catch what onnxruntime and its quantisation tooling log during a block, and summarise it once.

Two channels carry that noise. ``onnxruntime.quantization`` logs through Python's ``logging`` (``logging.warning``
on the root logger, whose first call also installs a stderr handler via ``basicConfig``: hence the ``ERROR:root``
and "Please consider to run pre-processing before quantization" lines). ONNX Runtime's C++ core writes its own log
lines (``[W:onnxruntime:, graph.cc:... ] Removing initializer ...``) straight to file descriptor 2, out of Python's
reach. :func:`capture_logs` takes both for the duration of a ``with`` block and hands back a
:class:`LogSummary`: counts per level and the distinct messages with their repeat counts, to be printed once.

    with capture_logs() as captured:
        quantize_static(...)
    for line in captured.summary().lines():
        print(line)

fd 2 is process-wide: while a block runs, whatever any thread of the process writes to stderr lands in the
summary. The gate runs one item at a time per process (xdist workers are separate processes), so that is exactly
the item's own output. Under pytest's fd capture the descriptor saved and restored is pytest's own capture file.

ORT's own threshold is set in one place too: :func:`set_ort_log_severity` (process default) and
:func:`session_options` (per session, which overrides the default).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# ONNX Runtime's severities (OrtLoggingLevel), lowest first
ORT_VERBOSE, ORT_INFO, ORT_WARNING, ORT_ERROR, ORT_FATAL = 0, 1, 2, 3, 4
DEFAULT_LIMIT = 10
_ORT_LEVELS = {"V": "DEBUG", "I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
# "2026-11-22 18:12:33.709498112 [W:onnxruntime:, graph.cc:5809 CleanUnusedInitializersAndNodeArgs] Removing ..."
_ORT_LINE = re.compile(r"\[([VIWEF]):onnxruntime:[^,\]]*,\s*[^\]]*\]\s?(.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # ORT colours its lines even when stderr is a file


@dataclass(frozen=True)
class LogMessage:
    """One distinct message: where it came from, its level, its text and how often it repeated."""

    source: str  # "onnxruntime" (native), "stderr" (other native output) or the Python logger's name
    level: str  # Python level names; ORT's V/I/W/E/F map to DEBUG/INFO/WARNING/ERROR/CRITICAL
    text: str
    count: int


@dataclass(frozen=True)
class LogSummary:
    """What a block logged: counts per level and the first distinct messages, in order of first appearance."""

    counts: Mapping[str, int] = field(default_factory=dict)
    messages: tuple[LogMessage, ...] = ()
    omitted: int = 0  # distinct messages beyond the limit

    @property
    def total(self) -> int:
        """Return the number of log lines and records caught."""
        return sum(self.counts.values())

    def lines(self, width: int = 200) -> list[str]:
        """Return the summary as printable lines, each message cut to ``width`` characters; none when quiet."""
        if not self.total:
            return []
        levels = ", ".join(f"{n} {level}" for level, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        out = [f"captured log output: {levels}"]
        for m in self.messages:
            repeat = f" (x{m.count})" if m.count > 1 else ""
            text = m.text if len(m.text) <= width else m.text[: width - 3] + "..."
            out.append(f"  {m.level} {m.source}{repeat}: {text}")
        if self.omitted:
            out.append(f"  ... and {self.omitted} more distinct message(s)")
        return out


class _Collector(logging.Handler):
    """Keep (logger, level, message) of every record that reaches the root logger."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[tuple[str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        self.records.append((record.name, record.levelname, message.strip()))


class CapturedLogs:
    """The handle :func:`capture_logs` yields; :meth:`summary` is complete once the block has ended."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.records: list[tuple[str, str, str]] = []
        self.native = ""  # what native code wrote to fd 2
        self.printed = ""  # what Python code printed to stdout (with ``stdout=True``)

    def summary(self) -> LogSummary:
        """Return counts per level and the first ``limit`` distinct messages with their repeat counts."""
        entries = list(self.records)
        for raw in self.native.splitlines():
            line = _ANSI.sub("", raw).strip()
            if not line:
                continue
            match = _ORT_LINE.search(line)
            if match:
                entries.append(("onnxruntime", _ORT_LEVELS[match.group(1)], match.group(2)))
            else:
                entries.append(("stderr", "OUTPUT", line))
        counts = Counter(level for _, level, _ in entries)
        distinct = Counter(entries)  # insertion-ordered: first appearance first
        kept = [LogMessage(source, level, text, n) for (source, level, text), n in distinct.items()][: self.limit]
        return LogSummary(dict(counts), tuple(kept), max(0, len(distinct) - self.limit))


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """Return the handlers ``logging.basicConfig`` installs: plain StreamHandlers on the process's stdout/stderr."""
    consoles = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) if s is not None}
    return [h for h in logger.handlers
            if type(h) is logging.StreamHandler and id(getattr(h, "stream", None)) in consoles]


@contextlib.contextmanager
def capture_logs(*, level: int = logging.WARNING, native: bool = True, records: bool = True, stdout: bool = False,
                 limit: int = DEFAULT_LIMIT) -> Iterator[CapturedLogs]:
    """Catch Python log records (``level`` and up), with ``native`` ORT's fd-2 output, with ``stdout`` what is printed.

    ``records=False`` leaves Python's logging alone (an enclosing capture keeps collecting them); ``stdout`` is for
    onnxruntime's Python layer, which prints its "Falling back to CPU" notice rather than logging it.
    """
    captured = CapturedLogs(limit)
    root = logging.getLogger()
    collector = _Collector(level)
    # a console handler left by an earlier basicConfig() would print every record again: detach it for the block
    consoles = _console_handlers(root) if records else []
    for handler in consoles:
        root.removeHandler(handler)
    if records:  # with a handler on the root logger, logging.warning() no longer calls basicConfig(), which prints
        root.addHandler(collector)
    printed = io.StringIO()
    try:
        with tempfile.TemporaryFile() as sink, (contextlib.redirect_stdout(printed) if stdout
                                                else contextlib.nullcontext()):
            saved_fd: int | None = None
            if native:
                _flush_stderr()
                saved_fd = os.dup(2)
                os.dup2(sink.fileno(), 2)
            try:
                yield captured
            finally:
                if saved_fd is not None:
                    _flush_stderr()
                    os.dup2(saved_fd, 2)
                    os.close(saved_fd)
                    sink.seek(0)
                    captured.native = sink.read().decode("utf-8", errors="replace")
    finally:
        if records:
            root.removeHandler(collector)
        for handler in consoles:
            root.addHandler(handler)
        captured.records = collector.records
        captured.printed = printed.getvalue()


def _flush_stderr() -> None:
    """Flush Python's stderr buffer so its bytes land on the descriptor they were written for."""
    with contextlib.suppress(Exception):  # a closed or replaced stream has nothing to flush
        sys.stderr.flush()


def set_ort_log_severity(severity: int = ORT_ERROR) -> None:
    """Set onnxruntime's process-wide default log severity (ORT offers no way to read it back)."""
    from .ort import import_onnxruntime

    import_onnxruntime().set_default_logger_severity(severity)


def session_options(severity: int = ORT_ERROR, options: Any = None) -> Any:
    """Return ``options`` (or new SessionOptions) with its log severity set; it overrides the process default."""
    from .ort import import_onnxruntime

    if options is None:
        options = import_onnxruntime().SessionOptions()
    options.log_severity_level = severity
    return options
