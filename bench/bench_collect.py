"""``--collect-only`` on a generated 200-entry registry (registry only, no model files are needed to collect).

Measured: ``pytest --quantgate --collect-only`` subprocess on the 200-entry project. Baseline: the same command
with ``-p no:quantgate`` on the same folder (pytest's own start-up and collection of nothing). Target: < 1 s
absolute for the measured run; the ratio is informative.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from common import Result, interleaved, make_project, print_table, pytest_cmd, timed

ENTRIES = 200
TARGET_S = 1.0


def run(reps: int = 7) -> Result:
    with tempfile.TemporaryDirectory(prefix="qg-bench-collect-") as tmp:
        root = Path(tmp)
        make_project(root, entries=ENTRIES, files=False)
        (root / "pytest.ini").write_text("[pytest]\n")
        gate = pytest_cmd("--quantgate", "--collect-only", "--quantgate-ep", "cpu")
        bare = pytest_cmd("-p", "no:quantgate", "--collect-only")
        a, b = interleaved(lambda: timed(gate, root, check=False), lambda: timed(bare, root, check=False), reps)
    measured, baseline = statistics.median(a), statistics.median(b)
    return Result(f"--collect-only, {ENTRIES} entries", measured, baseline, measured / baseline,
                  f"< {TARGET_S:.0f} s", measured < TARGET_S,
                  detail=f"collect {[round(x, 3) for x in a]} s; bare pytest {[round(x, 3) for x in b]} s")


if __name__ == "__main__":
    print_table([run(int(sys.argv[1]) if len(sys.argv) > 1 else 7)])
