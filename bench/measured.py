"""Run one child process and measure it: wall time, peak RSS (from a small launcher), exit status, memory cap.

Kept apart from ``common.py`` so the third-party trials (scripts/thirdparty.py) and any benchmark can share it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PYTHON = sys.executable


@dataclass(frozen=True)
class Child:
    """One measured child process: wall seconds, peak RSS (MiB, the child and its reaped descendants), exit status."""

    wall: float
    peak_mib: float
    rc: int
    timed_out: bool
    tail: str

    @property
    def ok(self) -> bool:
        """Return whether it ran to the end (exit 0 or 1: a gate run that found a failure still finished)."""
        return self.rc in (0, 1) and not self.timed_out


def run_measured(cmd: Sequence[str], cwd: Path, *, memcap: int | None = None, timeout: float | None = None,
                 env: dict[str, str] | None = None) -> Child:
    """Run ``cmd`` in its own process group through bench/rss_launch.py; return wall time and peak RSS.

    The peak is ``RUSAGE_CHILDREN.ru_maxrss`` as the small launcher sees it: the largest of the command and every
    descendant it waited for (pytest-xdist workers included), free of this process's own size (see rss_launch.py).
    ``memcap`` bytes caps the command's address space (``prlimit --as``), so a run that would take the machine down
    fails inside the command instead. ``timeout`` seconds kills the whole group; the peak is then unknown (nan).
    """
    if memcap is not None:
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise RuntimeError("--memcap needs prlimit (util-linux)")
        cmd = [prlimit, f"--as={memcap}", "--", *cmd]
    with tempfile.TemporaryDirectory(prefix="qg-rss-") as tmp:
        report = Path(tmp) / "rss.json"
        log = Path(tmp) / "out.log"
        launcher = [PYTHON, "-S", str(Path(__file__).resolve().parent / "rss_launch.py"), str(report), *cmd]
        with log.open("wb") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(launcher, cwd=cwd, env=env or dict(os.environ), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            wall = time.perf_counter() - start
        tail = log.read_bytes().decode(errors="replace")[-256_000:]  # pytest -v prints item lines before reports
        if report.is_file():
            data = json.loads(report.read_text())
            rc, peak = int(data["rc"]), data["maxrss_kb"] / 1024.0
        else:
            rc, peak = proc.returncode, math.nan
    return Child(wall, peak, rc, timed_out, tail)
