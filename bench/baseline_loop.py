"""The gate's floor: a plain loop of batched ORT inference of fp32 + int8 over the same fixtures (bench_gate).

Run as a script: imports onnxruntime and numpy, opens every session, runs every fixture through both models in
batches of 256 (the gate's default) and exits. Interpreter start-up is included, as it is for the pytest run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main(registry: Path, fixtures: Path, batch: int = 256) -> None:
    data = json.loads(registry.read_text())
    for entry in data["models"]:
        if entry.get("quant_mode", "fp32") == "fp32":
            continue
        fp32 = registry.parent / entry["onnx"]
        with np.load(fixtures / f"{entry['id']}.npz", allow_pickle=False) as npz:
            inputs = {k: npz[k] for k in npz.files if k != "target"}
        n = next(iter(inputs.values())).shape[0]
        for path in (fp32, fp32.with_name(fp32.name.replace(".onnx", ".int8.onnx"))):
            options = ort.SessionOptions()
            options.add_session_config_entry("session.x64quantprecision", "1")  # the gate's int8 kernels
            sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for start in range(0, n, batch):
                sess.run(None, {k: v[start:start + batch] for k, v in inputs.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
