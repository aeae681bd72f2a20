"""Gate wall time on the bundled registry vs a plain loop of batched ORT inference over the same fixtures.

Measured: ``python -m pytest --quantgate -p no:cacheprovider -q`` as a subprocess in the repository root.
Baseline: ``python bench/baseline_loop.py`` as a subprocess (same fixtures, same batch size, fp32 + int8).
Both include interpreter start-up and imports (in-process overhead INCLUDED on both sides). Target: ≤ 1.15×.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from common import ENV, PYTHON, ROOT, Result, interleaved, print_table, pytest_cmd, timed

TARGET = 1.15


def run(reps: int = 7) -> Result:
    gate = pytest_cmd("--quantgate")
    loop = [PYTHON, str(ROOT / "bench" / "baseline_loop.py"), str(ROOT / "model" / "registry.json"),
            str(ROOT / "fixtures")]
    a, b = interleaved(lambda: timed(gate, ROOT), lambda: timed(loop, ROOT), reps)
    measured, baseline = statistics.median(a), statistics.median(b)
    ratio = measured / baseline
    return Result("gate vs plain ORT loop", measured, baseline, ratio, f"<= {TARGET:.2f}x", ratio <= TARGET,
                  detail=f"gate {[round(x, 3) for x in a]} s; loop {[round(x, 3) for x in b]} s "
                         f"(subprocess wall, start-up included on both sides)")


def run_inprocess(reps: int = 5) -> list[Result]:
    """The same comparison without start-up: ``inprocess_gate.py`` in ``reps`` fresh processes, medians."""
    cmd = [PYTHON, str(ROOT / "bench" / "inprocess_gate.py"), str(ROOT / "model" / "registry.json"),
           str(ROOT / "fixtures")]
    runs = [json.loads(subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, text=True)
                       .stdout.strip().splitlines()[-1]) for _ in range(reps)]
    loop = statistics.median(r["loop"] for r in runs)
    cold = statistics.median(r["gate"] for r in runs)
    warm = statistics.median(r["gate_warm"] for r in runs)
    same = statistics.median(r["loop_same"] for r in runs)
    return [
        Result("gate vs loop, in-process (lazy imports in)", cold, loop, cold / loop, f"<= {TARGET:.2f}x",
               cold / loop <= TARGET, detail="prepare+evaluate per entry vs sessions+batched runs; start-up excluded"),
        Result("gate vs loop, in-process, warm imports", warm, loop, warm / loop, "<= 1.5x", warm / loop <= 1.5,
               detail=f"gate {[round(r['gate_warm'], 3) for r in runs]} s; "
                      f"loop {[round(r['loop'], 3) for r in runs]} s"),
        Result("gate vs loop at the gate's batches, in-process, warm", warm, same, warm / same, "<= 1.5x",
               warm / same <= 1.5,
               detail="the loop runs each entry at the batch the gate runs (deployment batch 1 for the dynamic "
                      f"entry): {[round(r['loop_same'], 3) for r in runs]} s"),
    ]


if __name__ == "__main__":
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    print_table([run(reps), *run_inprocess(max(3, reps // 2))])
