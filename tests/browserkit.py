"""Open an HTML page in headless Chromium and read back what a probe script found in it.

A page is opened as a file with the probe injected into its <head>; the probe writes its findings as JSON into
the body's ``data-probe`` attribute, which ``--dump-dom`` prints. `.ci/run` installs Chromium (Debian's package)
and sets QUANTGATE_REQUIRE_BROWSER=1, so there a missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium() -> str:
    """Return the Chromium binary; skip without one, or fail where the run requires a browser."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    message = "needs chromium (`apt-get install chromium`)"
    if os.environ.get("QUANTGATE_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


def browse(page: str, tmp_path: Path, probe: str, window: str = "1600,1000") -> dict[str, Any]:
    """Return what ``probe`` (a <script> element) reports of ``page`` rendered by headless Chromium."""
    path = tmp_path / "probe.html"
    path.write_text(page.replace("<head>", "<head>" + probe, 1), encoding="utf-8")
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--window-size={window}", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path}/ud",
                           "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return result
