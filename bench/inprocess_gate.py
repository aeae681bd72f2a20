"""One fresh process: time the gate's own work (prepare + evaluate per entry) and the plain ORT loop, in-process.

Interpreter and pytest start-up are EXCLUDED; the gate's lazy imports (scipy.stats inside the metrics) are
INCLUDED on the gate side, as a run pays them. ``loop_same`` is the plain loop at the batches the gate runs (an
entry's deployment batch: 1 for the bundled dynamic entry), so ``gate_warm - loop_same`` is the gate's own work.
Prints JSON: {"loop": s, "loop_same": s, "gate": s, "gate_warm": s}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pytest_quantgate.runner import gate
from pytest_quantgate.io.registry import load_registry
from pytest_quantgate.settings import Settings


def main(registry_path: Path, fixtures: Path) -> None:
    registry = load_registry(registry_path)
    settings = Settings(registry=registry_path, fixtures_dir=fixtures)
    entries = [e for e in registry.entries if e.gated]
    def plain_loop(steps: dict[str, int]) -> float:
        start = time.perf_counter()
        for entry in entries:
            with np.load(fixtures / f"{entry.id}.npz", allow_pickle=False) as npz:
                inputs = {k: npz[k] for k in npz.files if k != "target"}
            n = next(iter(inputs.values())).shape[0]
            step = steps[entry.id]
            for path in (registry.fp32_path(entry), registry.int8_path(entry)):
                options = ort.SessionOptions()
                options.add_session_config_entry("session.x64quantprecision", "1")  # the gate's int8 kernels
                sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for s in range(0, n, step):
                    sess.run(None, {k: v[s:s + step] for k, v in inputs.items()})
        return time.perf_counter() - start

    loop = plain_loop({e.id: settings.batch_size for e in entries})
    # the batch each gate run has (the deployment batch of an entry whose model does not fix it)
    same = {}
    for entry in entries:
        prepared = gate.prepare(registry, entry, "cpu", settings)
        same[entry.id] = gate.run_batch(prepared) or min(settings.batch_size, gate.CHUNK_ROWS)
        del prepared
    loop_same = plain_loop(same)
    times = []
    for _ in range(2):  # first pass pays the lazy imports, second is warm
        start = time.perf_counter()
        for entry in entries:
            gate.evaluate(gate.prepare(registry, entry, "cpu", settings), settings)
        times.append(time.perf_counter() - start)
    print(json.dumps({"loop": loop, "loop_same": loop_same, "gate": times[0], "gate_warm": times[1]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
