"""bench/measured.py and bench/ort_loop.py: the pieces every real-size number comes from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from measured import run_measured  # noqa: E402

from tests.modelkit import (  # noqa: E402
    cpu_session,
    fitted_mlp_weights,
    mlp_model,
    quantize_dynamic_file,
    write_registry,
)

ALLOC = "import numpy as np; a = np.ones({n} * 2**20 // 8); print(a.sum())"


BIG_PARENT = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from measured import run_measured
ballast = np.ones(300 * 2**20 // 8)  # this process is big: a forked child would start at its size
small = run_measured([sys.executable, "-c", sys.argv[2].format(n=8)], sys.argv[3])
big = run_measured([sys.executable, "-c", sys.argv[2].format(n=400)], sys.argv[3])
ok = bool(ballast.sum() > 0)
print(json.dumps({"rc": [small.rc, big.rc], "small": small.peak_mib, "big": big.peak_mib, "ok": ok}))
"""


def test_peak_rss_of_a_child_counts_what_it_touched_not_its_parent(tmp_path: Path) -> None:
    # the big parent is a child of its own: a 300 MB pytest process would raise the floor of every later test's
    # forked children (tests/test_diagnosis.py measures RSS growth in one)
    proc = subprocess.run([sys.executable, "-c", BIG_PARENT, str(ROOT / "bench"), ALLOC, str(tmp_path)],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rc"] == [0, 0] and out["ok"]
    assert out["big"] - out["small"] > 350
    assert out["small"] < 200


def test_memcap_makes_a_hungry_child_fail_instead_of_growing(tmp_path: Path) -> None:
    capped = run_measured([sys.executable, "-c", ALLOC.format(n=2000)], tmp_path, memcap=1_000_000_000)
    assert capped.rc != 0
    assert "MemoryError" in capped.tail or "Unable to allocate" in capped.tail
    assert capped.peak_mib < 1000


def test_timeout_kills_the_child_and_says_so(tmp_path: Path) -> None:
    slow = run_measured([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, timeout=0.5)
    assert slow.timed_out and not slow.ok


def test_plain_loop_runs_both_models_over_the_fixture(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    onnx.save(mlp_model(fitted_mlp_weights()), str(tmp_path / "m.onnx"))
    quantize_dynamic_file(tmp_path / "m.onnx", tmp_path / "m.int8.onnx")
    x = (load_digits().data[:50] / 16.0).astype(np.float32)
    np.savez(tmp_path / "m1.npz", features=x, target=np.zeros(50))
    registry = write_registry(tmp_path / "registry.json", [
        {"id": "m1", "onnx": "m.onnx", "quant_mode": "dynamic"},
        {"id": "skipped", "onnx": "m.onnx", "quant_mode": "fp32"},
    ])
    child = run_measured([sys.executable, str(ROOT / "bench" / "ort_loop.py"), str(registry), str(tmp_path),
                          "--batch", "16", "--passes", "2"], ROOT)
    assert child.rc == 0, child.tail
    out = json.loads(child.tail.strip().splitlines()[-1])

    expected = 0.0
    for name in ("m.onnx", "m.int8.onnx"):
        sess = cpu_session(tmp_path / name)
        # same batches as the loop: dynamic int8 takes its activation ranges per batch
        expected += sum(float(sess.run(None, {"features": x[s:s + 16]})[0].astype(np.float64).sum())
                        for s in range(0, len(x), 16))
    assert len(out["passes"]) == 2
    assert out["checksum"] == pytest.approx(expected, rel=1e-6)
    # --as-gate: a dynamic entry runs one sample at a time, as the gate runs it
    child = run_measured([sys.executable, str(ROOT / "bench" / "ort_loop.py"), str(registry), str(tmp_path),
                          "--batch", "16", "--as-gate"], ROOT)
    single = 0.0
    for name in ("m.onnx", "m.int8.onnx"):
        sess = cpu_session(tmp_path / name)
        single += sum(float(sess.run(None, {"features": x[s:s + 1]})[0].astype(np.float64).sum())
                      for s in range(len(x)))
    assert json.loads(child.tail.strip().splitlines()[-1])["checksum"] == pytest.approx(single, rel=1e-9)
    assert single != pytest.approx(expected, rel=1e-9)  # the batch matters, so the check above can fail


def test_thirdparty_trial_reports_gate_and_independent_verdicts_under_a_cap(tmp_path: Path) -> None:
    import argparse
    import hashlib
    import shutil

    from sklearn.datasets import load_digits

    from scripts import thirdparty

    onnx.save(mlp_model(fitted_mlp_weights()), str(tmp_path / "m.onnx"))
    quantize_dynamic_file(tmp_path / "m.onnx", tmp_path / "m.int8.onnx")
    shutil.copy(tmp_path / "m.onnx", tmp_path / "copy.onnx")  # the fp32 named as its own sidecar: not quantised
    np.savez(tmp_path / "soak.npz", features=(load_digits().data[:60] / 16.0).astype(np.float32))

    def digest(name: str) -> str:
        return hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()

    base = {"onnx": "m.onnx", "quant_mode": "dynamic", "sha256": digest("m.onnx"), "soak_fixture": "soak.npz"}
    registry = write_registry(tmp_path / "registry.json", [
        dict(base, id="good", int8_sha256=digest("m.int8.onnx")),
        dict(base, id="same", int8_onnx="copy.onnx", int8_sha256=digest("copy.onnx")),
        dict(base, id="nofix", int8_sha256=digest("m.int8.onnx"), soak_fixture="absent.npz"),
    ])
    args = argparse.Namespace(batch=256, memcap=3_000_000_000, timeout=300.0, no_eval=False, diagnose="auto")
    good = thirdparty.trial(registry, tmp_path, "good", args)
    assert good["gate"]["verdict"] == "PASS" == good["independent"]["verdict"]
    assert good["gate"]["drop"] == pytest.approx(good["independent"]["drop"], abs=1e-9)
    assert good["loop"]["rc"] == 0 and good["gate"]["peak_mib"] > 0
    same = thirdparty.trial(registry, tmp_path, "same", args)
    # drop 0 for both, but the gate's lineage check refuses a sidecar with no integer weight
    assert same["gate"]["verdict"] == "FAIL" and same["gate"]["kind"] == "lineage"
    assert same["independent"]["verdict"] == "PASS" and same["independent"]["drop"] == pytest.approx(0.0, abs=1e-12)
    run = thirdparty.pytest_run(registry, tmp_path, args)
    assert run["rc"] == 1, run["summary"]
    verdicts = {line.split("::")[1].split("[")[0]: line.split()[1] for line in run["items"]}
    assert verdicts == {"good": "PASSED", "same": "FAILED", "nofix": "ERROR"}
    assert "1 failed, 1 passed, 1 error" in run["summary"]
