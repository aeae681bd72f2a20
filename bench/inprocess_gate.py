"""One fresh process: time the gate's own work (prepare + evaluate per entry) and the plain ORT loop, in-process.

Interpreter and pytest start-up are EXCLUDED; the gate's lazy imports (scipy.stats inside the metrics) are
INCLUDED on the gate side, as a run pays them. Prints JSON: {"loop": s, "gate": s, "gate_warm": s}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pytest_quantgate import gate
from pytest_quantgate.registry import load_registry
from pytest_quantgate.settings import Settings


def main(registry_path: Path, fixtures: Path) -> None:
    registry = load_registry(registry_path)
    settings = Settings(registry=registry_path, fixtures_dir=fixtures)
    entries = [e for e in registry.entries if e.gated]
    start = time.perf_counter()
    for entry in entries:
        with np.load(fixtures / f"{entry.id}.npz", allow_pickle=False) as npz:
            inputs = {k: npz[k] for k in npz.files if k != "target"}
        n = next(iter(inputs.values())).shape[0]
        for path in (registry.fp32_path(entry), registry.int8_path(entry)):
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for s in range(0, n, settings.batch_size):
                sess.run(None, {k: v[s:s + settings.batch_size] for k, v in inputs.items()})
    loop = time.perf_counter() - start
    times = []
    for _ in range(2):  # first pass pays the lazy imports, second is warm
        start = time.perf_counter()
        for entry in entries:
            gate.evaluate(gate.prepare(registry, entry, "cpu", settings), settings)
        times.append(time.perf_counter() - start)
    print(json.dumps({"loop": loop, "gate": times[0], "gate_warm": times[1]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
