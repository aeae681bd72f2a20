"""pytest start-up with the plugin installed but ``--quantgate`` off, vs the plugin disabled (``-p no:quantgate``).

Both run ``pytest --collect-only`` on a folder holding one trivial test file, interleaved, many times.
Target: the median difference is < 30 ms.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from common import Result, interleaved, print_table, pytest_cmd, timed

TARGET_MS = 30.0


def run(reps: int = 21) -> Result:
    with tempfile.TemporaryDirectory(prefix="qg-bench-startup-") as tmp:
        root = Path(tmp)
        (root / "pytest.ini").write_text("[pytest]\n")
        (root / "test_one.py").write_text("def test_one():\n    assert True\n")
        on = pytest_cmd("--collect-only")
        off = pytest_cmd("-p", "no:quantgate", "--collect-only")
        a, b = interleaved(lambda: timed(on, root), lambda: timed(off, root), reps)
    measured, baseline = statistics.median(a), statistics.median(b)
    extra_ms = 1000 * (measured - baseline)
    paired = statistics.median(x - y for x, y in zip(a, b)) * 1000
    return Result("start-up, plugin loaded but off", measured, baseline, measured / baseline,
                  f"< +{TARGET_MS:.0f} ms", extra_ms < TARGET_MS,
                  detail=f"extra {extra_ms:+.1f} ms (median of paired differences {paired:+.1f} ms) over {reps} "
                         f"interleaved runs")


if __name__ == "__main__":
    print_table([run(int(sys.argv[1]) if len(sys.argv) > 1 else 21)])
