"""The plain-ORT floor for one registry: batched fp32 + int8 inference over each entry's soak fixture.

Usage: ``python bench/ort_loop.py REGISTRY FIXTURES [--id ID ...] [--batch N] [--passes K]``.

What a user would write without the gate: ``np.load`` the fixture, open both sessions, run every batch through
each, keep nothing but a running float64 sum of the outputs (so the work cannot be optimised away). It reads the
registry JSON itself (no import of pytest_quantgate), so it keeps working whatever the gate's internals become.
Prints one JSON line: per pass the in-process seconds (imports excluded), and the checksum.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
from pathlib import Path
from typing import Any


def _paths(registry: Path, fixtures: Path, entry: dict[str, Any]) -> tuple[Path, Path, Path]:
    base = registry.parent
    fp32 = base / entry["onnx"]
    int8 = base / entry["int8_onnx"] if "int8_onnx" in entry else fp32.with_name(fp32.stem + ".int8.onnx")
    if "soak_fixture" in entry:
        fixture = base / entry["soak_fixture"]
        if not fixture.is_file():
            fixture = fixtures / entry["soak_fixture"]
    else:
        fixture = fixtures / f"{entry['id']}.npz"
    return fp32, int8, fixture


def run(registry: Path, fixtures: Path, ids: list[str], batch: int, as_gate: bool = False) -> float:
    """Run every selected gated entry once; return the float64 sum of every output element.

    ``as_gate``: run each entry at the batch the gate runs it at (``quant_deploy_batch``, else 1 for dynamic
    sidecars, whose activation ranges are taken per batch), so both do the same ORT work.
    """
    import numpy as np
    import onnxruntime as ort

    total = 0.0
    for entry in json.loads(registry.read_text())["models"]:
        if entry.get("quant_mode", "fp32") == "fp32" or (ids and not any(fnmatch.fnmatch(entry["id"], p)
                                                                         for p in ids)):
            continue
        fp32, int8, fixture = _paths(registry, fixtures, entry)
        with np.load(fixture, allow_pickle=False) as npz:
            inputs = {k: npz[k] for k in npz.files if k != "target"}
        n = next(iter(inputs.values())).shape[0]
        for path in (fp32, int8):
            options = ort.SessionOptions()
            options.add_session_config_entry("session.x64quantprecision", "1")  # the gate's int8 kernels
            sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            names = {i.name for i in sess.get_inputs()}
            fixed = {i.shape[0] for i in sess.get_inputs() if isinstance(i.shape[0], int) and i.shape[0] > 0}
            deploy = entry.get("quant_deploy_batch", 1 if entry.get("quant_mode") == "dynamic" else batch)
            step = fixed.pop() if fixed else (deploy if as_gate else batch)  # a fixed batch is the only one
            for start in range(0, n - n % step if fixed else n, step):
                outs = sess.run(None, {k: v[start:start + step] for k, v in inputs.items() if k in names})
                total += sum(float(np.sum(o, dtype=np.float64)) for o in outs if o.dtype.kind in "fiu")
            del sess
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("registry", type=Path)
    parser.add_argument("fixtures", type=Path)
    parser.add_argument("--id", dest="ids", action="append", default=[])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--passes", type=int, default=1, help="repeat in this process (pass 2+ is warm)")
    parser.add_argument("--as-gate", action="store_true", help="each entry at the gate's batch (dynamic: 1)")
    args = parser.parse_args(argv)
    import numpy  # noqa: F401  (imports paid before the clock, as for the gate's warm numbers)
    import onnxruntime  # noqa: F401

    times, total = [], 0.0
    for _ in range(args.passes):
        start = time.perf_counter()
        total = run(args.registry, args.fixtures, args.ids, args.batch, args.as_gate)
        times.append(time.perf_counter() - start)
    print(json.dumps({"passes": times, "checksum": total}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
