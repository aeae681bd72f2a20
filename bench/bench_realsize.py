"""Real-size outputs: the streamed gate against a plain ORT loop, wall time and peak RSS, at 100 and 400 samples.

Two models of our own, built here (seeded, nothing downloaded), fed real photographs from scikit-image:

- ``img``: an image-to-image conv net, 1×256×256 luma in, 8×256×256 out (2 MiB of float32 output per sample);
- ``det``: a detector-like head whose one output concatenates box coordinates (0-320 px) and class scores (0-1),
  ``[N, 4 + 8, 2100]``.

Both get ORT static QDQ sidecars from the project's producer. Each configuration runs in its own subprocess
(``quantgate measure`` vs a script that runs both sessions over the same fixture in batches of 256 and keeps
only a running sum), and the peak RSS is the child's ``ru_maxrss``. A failing variant (budget set below the
measured drop) gives the "failing item with diagnosis" cost. Usage: ``python bench/bench_realsize.py [--quick]``.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ENV, PYTHON, Result

# the plain loop: ORT defaults; with a 4th argument "nospin" its pool threads do not spin between runs (as the gate's)
LOOP = """
import sys, numpy as np, onnxruntime as ort
fp32, int8, fixture = sys.argv[1:4]
x = np.load(fixture)["x"]
total = 0.0
options = ort.SessionOptions()
options.add_session_config_entry("session.x64quantprecision", "1")  # the gate's exact int8 kernels
if sys.argv[4:] == ["nospin"]:
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
for path in (fp32, int8):
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for i in range(0, len(x), 256):
        total += float(sess.run(None, {"x": x[i:i + 256]})[0].sum(dtype=np.float64))
print(total)
"""


def _photos(count: int, size: int) -> np.ndarray:
    from skimage import data as skdata
    from skimage.transform import resize

    photos = [skdata.camera(), skdata.coins(), skdata.moon(), skdata.page(), skdata.text(), skdata.brick(),
              skdata.grass(), skdata.gravel()]
    rng = np.random.default_rng(0)
    out = []
    while len(out) < count:
        img = photos[len(out) % len(photos)].astype(np.float32) / 255.0
        y, x = rng.integers(0, img.shape[0] - 128), rng.integers(0, img.shape[1] - 128)
        out.append(resize(img[y:y + 128, x:x + 128], (size, size), anti_aliasing=True).astype(np.float32))
    return np.stack(out)[:, None]


def _img_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    w1 = (rng.normal(size=(8, 1, 3, 3)) / 3).astype(np.float32)
    w2 = (rng.normal(size=(8, 8, 3, 3)) / 8.5).astype(np.float32)
    w3 = (rng.normal(size=(8, 8, 3, 3)) / 8.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "W2"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Conv", ["d", "W3"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "img", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 256, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 256, 256])],
                              [numpy_helper.from_array(w, n) for w, n in ((w1, "W1"), (w2, "W2"), (w3, "W3"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _det_model(path: Path) -> None:
    """Conv features of a 1×160×160 image -> [N, 12, 2100]: 4 box rows ×320 px, 8 sigmoid class-score rows."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(12)
    w1 = (rng.normal(size=(16, 1, 3, 3)) / 3).astype(np.float32)
    w2 = (rng.normal(size=(12, 16, 1, 1)) / 4).astype(np.float32)
    w2[4:] *= 4.0  # class logits spread over several units: scores that span 0-1, as a trained head's do
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "W2"], ["c"]),  # [N, 12, 80, 80]
             helper.make_node("Reshape", ["c", "shape"], ["flat"]),  # [N, 12, 6400]
             helper.make_node("Slice", ["flat", "s0", "s1", "ax"], ["cut"]),  # [N, 12, 2100]
             helper.make_node("Split", ["cut", "sizes"], ["box_raw", "cls_raw"], axis=1),
             helper.make_node("Sigmoid", ["box_raw"], ["box_s"]), helper.make_node("Mul", ["box_s", "k"], ["boxes"]),
             helper.make_node("Sigmoid", ["cls_raw"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1)]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(np.array([0, 12, 6400], np.int64), "shape"),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([2100], np.int64), "s1"),
             numpy_helper.from_array(np.array([2], np.int64), "ax"),
             numpy_helper.from_array(np.array([4, 8], np.int64), "sizes"),
             numpy_helper.from_array(np.array(320.0, np.float32), "k")]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 160, 160])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12, 2100])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _child(cmd: list[str], cwd: Path) -> tuple[float, float, int]:
    """Return (wall s, peak RSS MiB, exit code) of a command run in a fresh child."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            f"rc = subprocess.run({cmd!r}, cwd={str(cwd)!r}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"
            ".returncode; w = time.perf_counter() - t; "
            "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc)")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=ENV, check=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def _project(root: Path, name: str, builder: object, samples: int, size: int,
             exclude: tuple[str, ...] = ()) -> tuple[Path, Path]:
    from pytest_quantgate.fileio import sha256_file
    from pytest_quantgate.producers.ptq_static import StaticConfig, quantize_static

    (root / "fixtures").mkdir(parents=True, exist_ok=True)
    x = _photos(samples, size)
    np.savez(root / "fixtures" / f"{name}.npz", x=x)
    calib = root / "fixtures" / f"{name}.calib.npz"
    if not calib.exists():
        np.savez(calib, x=_photos(32, size))
    fp32 = root / f"{name}.onnx"
    if not fp32.exists():
        builder(fp32)  # type: ignore[operator]
        quantize_static(fp32, root / f"{name}.int8.onnx", StaticConfig(calibration_set=calib,
                                                                       op_types_to_exclude=exclude))
    entry = {"id": name, "onnx": f"{name}.onnx", "quant_mode": "static", "quant_calibration_set": calib.name,
             "quant_accuracy_budget_plcc": 0.05, "quant_budget_slope": 0.5,
             "sha256": sha256_file(fp32), "int8_sha256": sha256_file(root / f"{name}.int8.onnx")}
    return root / "fixtures" / f"{name}.npz", _write(root, [entry])


def _write(root: Path, entries: list[dict]) -> Path:
    registry = root / "registry.json"
    registry.write_text(json.dumps({"schema_version": 1, "models": entries}, indent=2))
    return registry


def _median_child(cmds: list[list[str]], cwd: Path, reps: int) -> list[tuple[float, float, int]]:
    """Run the commands interleaved ``reps`` times; return each one's (median wall, median peak RSS, last exit)."""
    runs: list[list[tuple[float, float, int]]] = [[] for _ in cmds]
    for _ in range(reps):
        for cmd, out in zip(cmds, runs):
            out.append(_child(cmd, cwd))
    return [(statistics.median(r[0] for r in out), statistics.median(r[1] for r in out), out[-1][2]) for out in runs]


def run(quick: bool = False, reps: int = 3) -> list[Result]:
    """Measure gate vs loop for both models at 100 and 400 samples, and a failing item with diagnosis."""
    results: list[Result] = []
    reps = 1 if quick else reps
    with tempfile.TemporaryDirectory(prefix="qg-realsize-") as tmp:
        root = Path(tmp)
        # one QDQ scale on the head's Concat would serve boxes (0-320) and scores (0-1) alike and collapse the
        # scores (measured: drop 1.0 on the score channels, flattened drop < 0.01): the healthy detector sidecar
        # keeps the Concat in float, as real detector exports are quantised
        for name, builder, size, exclude in (("img", _img_model, 256, ()), ("det", _det_model, 160, ("Concat",))):
            rss: dict[int, float] = {}
            for samples in (100, 400):
                fixture, registry = _project(root, name, builder, samples, size, exclude)
                gate_cmd = [PYTHON, "-m", "pytest_quantgate.frontends.cli", "measure", str(registry), "--fixtures",
                            str(root / "fixtures"), "--ep", "cpu", "--json", str(root / "out.json")]
                loop_cmd = [PYTHON, "-c", LOOP, str(root / f"{name}.onnx"), str(root / f"{name}.int8.onnx"),
                            str(fixture)]
                (loop_wall, loop_rss, _), (quiet_wall, _, _), (gate_wall, gate_rss, rc) = _median_child(
                    [loop_cmd, [*loop_cmd, "nospin"], gate_cmd], root, reps)
                row = json.loads((root / "out.json").read_text())[0]
                result = row["result"] or {}  # measure's items are outcomes; the numbers are in their result
                rss[samples] = gate_rss
                results.append(Result(f"{name} {samples} samples: gate vs loop, wall", gate_wall, loop_wall,
                                      gate_wall / loop_wall, "<= 1.2x", gate_wall / loop_wall <= 1.2,
                                      detail=f"verdict {row['verdict']} drop {result['drop']} (exit {rc}), diagnosed: "
                                             f"{result.get('diagnosis') is not None}; medians of {reps}; the loop with "
                                             f"ORT threads not spinning (as the gate's) took {quiet_wall:.2f} s: "
                                             f"gate / that = {gate_wall / quiet_wall:.2f}"))
                results.append(Result(f"{name} {samples} samples: gate vs loop, peak RSS MiB", gate_rss, loop_rss,
                                      gate_rss / loop_rss, "<= 1.5x", gate_rss / loop_rss <= 1.5, unit="MiB"))
                if row["verdict"] == "FAIL":
                    # the same gate without the diagnosis a failing item gets: the streamed verdict alone
                    (off_wall, off_rss, _), = _median_child([[*gate_cmd, "--diagnose", "off"]], root, reps)
                    results.append(Result(f"{name} {samples} samples, --diagnose off: gate vs loop, wall", off_wall,
                                          loop_wall, off_wall / loop_wall, "<= 1.2x", off_wall / loop_wall <= 1.2,
                                          detail=f"peak RSS {off_rss:.0f} MiB"))
                if samples == 100 and not quick and row["verdict"] == "PASS":  # a failing model has no passing twin
                    data = json.loads(registry.read_text())
                    data["models"][0]["quant_accuracy_budget_plcc"] = max(result["drop"] / 4, 1e-9)
                    registry.write_text(json.dumps(data))
                    (fail_wall, fail_rss, _), = _median_child([gate_cmd], root, reps)
                    frow = json.loads((root / "out.json").read_text())[0]
                    results.append(Result(f"{name} 100 samples: failing + diagnosis vs passing, wall", fail_wall,
                                          gate_wall, fail_wall / gate_wall, "<= 2x", fail_wall / gate_wall <= 2,
                                          detail=f"verdict {frow['verdict']}, diagnosed: "
                                                 f"{(frow['result'] or {}).get('diagnosis') is not None}"))
                    results.append(Result(f"{name} 100 samples: failing + diagnosis vs passing, peak RSS MiB",
                                          fail_rss, gate_rss, fail_rss / gate_rss, "<= 1.5x",
                                          fail_rss / gate_rss <= 1.5, unit="MiB"))
            growth = rss[400] / rss[100]
            results.append(Result(f"{name}: gate peak RSS 400 vs 100 samples", rss[400], rss[100], growth,
                                  "within ±10%", abs(growth - 1.0) <= 0.10, unit="MiB"))
    return results


if __name__ == "__main__":
    from common import print_table

    started = time.perf_counter()
    print_table(run("--quick" in sys.argv))
    print(f"(bench_realsize: {time.perf_counter() - started:.0f} s; ru_maxrss of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
