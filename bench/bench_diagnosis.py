"""A failing item with its diagnosis against the same item passing: wall time and peak RSS (issue 10 target ≤ 2×, ≤ 1.5×).

The model is the project's own image-to-image conv chain (tests/convkit.py) with 8×256×256 maps and outputs, its
QDQ sidecar built by ORT, and real-photo crops. "pass" is a streaming fp32+int8 loop over the samples in batches,
folding per-sample float64 error sums (what the streaming gate does); "fail" is the same loop followed by
``diagnose`` on the 4 samples where fp32 and int8 disagree most. Each runs in its own process, optionally under
an address-space limit (RLIMIT_AS, as ``prlimit --as``); peak RSS is the child's ru_maxrss. Usage: python bench/bench_diagnosis.py [samples] [--as GIB]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import json, resource, sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort

fp32, int8, npz, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
start = time.perf_counter()
images = np.load(npz, mmap_mode="r")["image"]
sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)]
errors = np.zeros(len(images))
for s in range(0, len(images), 16):
    batch = np.ascontiguousarray(images[s:s + 16])
    ref, test = (sess.run(None, {"image": batch})[0] for sess in sessions)
    for i in range(len(batch)):
        d = ref[i].astype(np.float64) - test[i].astype(np.float64)
        errors[s + i] = float(np.dot(d.ravel(), d.ravel()))
    del ref, test
del sessions
loop = time.perf_counter() - start
diag_s = 0.0
notes = []
if mode == "fail":
    from pytest_quantgate.diagnosis import diagnose
    worst = np.argsort(errors)[-4:]
    t = time.perf_counter()
    diag = diagnose(fp32, int8, [{"image": np.ascontiguousarray(images[i:i + 1])} for i in sorted(worst)], top=3)
    diag_s = time.perf_counter() - t
    notes = list(diag.notes) + [w.tensor for w in diag.worst]
wall = time.perf_counter() - start
print(json.dumps({"wall": wall, "loop": loop, "diag": diag_s, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "notes": notes}))
"""


def run(mode: str, fp32: Path, int8: Path, npz: Path, cap: int | None) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(fp32), str(int8), str(npz), mode]

    def limit() -> None:
        # what `prlimit --as` sets (that binary crashed on the VM this was written on)
        if cap:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, preexec_fn=limit)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    import convkit
    import numpy as np

    samples = int(argv[0]) if argv and not argv[0].startswith("--") else 100
    cap = int(float(argv[argv.index("--as") + 1]) * 2**30) if "--as" in argv else None
    with tempfile.TemporaryDirectory(prefix="bench-diagnosis-") as tmp_name:
        tmp = Path(tmp_name)
        fp32 = convkit.conv_chain(tmp / "chain.onnx", layers=3, channels=8, size=256, out_channels=8)
        int8 = convkit.quantise_qdq(fp32, tmp / "chain.int8.onnx", convkit.photo_crops(8, 256, seed=1))
        np.save(tmp / "images.npy", convkit.photo_crops(samples, 256, seed=2))
        npz = tmp / "images.npz"
        np.savez(npz, image=np.load(tmp / "images.npy"))
        rows = {"pass": [], "fail": []}
        for _ in range(3):  # interleaved, so drift hits both alike
            for mode in ("pass", "fail"):
                rows[mode].append(run(mode, fp32, int8, npz, cap))
        med = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall", "rss", "diag")}
               for m, rs in rows.items()}
        print(f"diagnosis bench: {samples} samples, 8x256x256 maps, 4 diagnosis samples"
              + (f", address space limited to {cap / 2**30:g} GiB" if cap else ""))
        print(f"  pass: wall {med['pass']['wall']:.2f} s, peak RSS {med['pass']['rss'] / 2**20:.0f} MiB")
        print(f"  fail: wall {med['fail']['wall']:.2f} s (diagnosis {med['fail']['diag']:.2f} s), "
              f"peak RSS {med['fail']['rss'] / 2**20:.0f} MiB")
        wr, mr = med["fail"]["wall"] / med["pass"]["wall"], med["fail"]["rss"] / med["pass"]["rss"]
        print(f"  fail/pass: wall {wr:.2f}x (target <= 2x: {'met' if wr <= 2 else 'MISSED'}), "
              f"peak RSS {mr:.2f}x (target <= 1.5x: {'met' if mr <= 1.5 else 'MISSED'})")
        print("  diagnosis said:", rows["fail"][-1]["notes"])


if __name__ == "__main__":
    main(sys.argv[1:])
