"""Manual trial (not CI): train a small YOLO-style detector, quantise it, and gate it as a user would.

Usage::

    python -m scripts.detector_trial [--out DIR] [--steps N]

1. Train (torch, CPU, about a minute) a detector of three shapes (squares, discs, crosses) drawn on crops of
   scikit-image's real photographs: a conv backbone to an 8×8 grid, a head ``Concat(boxes in pixels,
   Sigmoid(class logits))`` -> ``[N, 4 + 3, 64]``, as YOLOv8 exports it.
2. Export it to ONNX; build a dynamic sidecar and a static (QDQ) one with the project's producers. The static one
   quantises the head's Concat with one per-tensor scale set by the pixel boxes, so the class scores lose their
   resolution there: the case of a detector whose scores die in the head.
3. Write a registry with two entries per sidecar: undeclared, and declared a detector head in ``quant_outputs``.
   Run ``quantgate measure --diagnose always`` on each and print verdict, reason and the diagnosis' first tensors.
4. Run ``quantgate advise`` on the declared static entry and print its table: its first exclusion should be the
   head's Concat/Sigmoid, which the focused diagnosis ranks first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
SIZE, GRID, CLASSES = 64, 8, 3
HEAD = {"layout": "yolo", "boxes": "0:4", "scores": "4:", "score_threshold": 0.25, "nms_iou": 0.45,
        "min_class_detections": 20}


def backgrounds(count: int, seed: int) -> np.ndarray:
    """Return ``count`` grey 64×64 crops of scikit-image photographs, dimmed so the shapes stand out."""
    from skimage import color, data

    photos = [data.camera(), color.rgb2gray(data.astronaut()), color.rgb2gray(data.chelsea()), data.coins(),
              data.moon(), data.page(), color.rgb2gray(data.coffee())]
    rng = np.random.default_rng(seed)
    out = np.empty((count, SIZE, SIZE), np.float32)
    for i in range(count):
        img = np.asarray(photos[int(rng.integers(len(photos)))], np.float64)
        img = img / 255.0 if img.max() > 1.0 else img
        top, left = int(rng.integers(0, img.shape[0] - SIZE)), int(rng.integers(0, img.shape[1] - SIZE))
        out[i] = 0.5 * img[top:top + SIZE, left:left + SIZE]
    return out


def scenes(count: int, seed: int) -> tuple[np.ndarray, list[list[tuple[int, float, float, float]]]]:
    """Return images [count, 1, 64, 64] and per image its objects (class, cx, cy, size) in pixels."""
    rng = np.random.default_rng(seed)
    images = backgrounds(count, seed + 1)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    objects: list[list[tuple[int, float, float, float]]] = []
    for i in range(count):
        found: list[tuple[int, float, float, float]] = []
        used: set[tuple[int, int]] = set()
        for _ in range(int(rng.integers(1, 4))):
            size = float(rng.uniform(8, 16))
            cx, cy = float(rng.uniform(size, SIZE - size)), float(rng.uniform(size, SIZE - size))
            cell = (int(cy) * GRID // SIZE, int(cx) * GRID // SIZE)
            if cell in used:
                continue
            used.add(cell)
            cls = int(rng.integers(CLASSES))
            half = size / 2
            if cls == 0:  # filled square
                shape = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
            elif cls == 1:  # disc
                shape = (xx - cx) ** 2 + (yy - cy) ** 2 <= half ** 2
            else:  # cross
                shape = ((np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half / 4)) | (
                    (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half / 4))
            images[i][shape] = 0.9
            found.append((cls, cx, cy, size))
        objects.append(found)
    return images[:, None], objects


def model() -> Any:
    """Return the torch detector: backbone to an 8×8 grid, head Concat(boxes in pixels, Sigmoid(class logits))."""
    import torch

    class Detector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Sequential(
                torch.nn.Conv2d(1, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
                torch.nn.Conv2d(32, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, 1, 1), torch.nn.ReLU())
            self.box = torch.nn.Conv2d(32, 4, 1)
            self.cls = torch.nn.Conv2d(32, CLASSES, 1)
            stride = SIZE / GRID
            gy, gx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
            self.register_buffer("grid", torch.stack([gx, gy]).float().reshape(1, 2, GRID, GRID) * stride)
            self.stride = stride

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            f = self.backbone(image)
            raw = self.box(f)
            centre = self.grid + torch.sigmoid(raw[:, :2]) * self.stride
            size = torch.exp(raw[:, 2:].clamp(-4, 4)) * self.stride
            boxes = torch.cat([centre, size], 1).flatten(2)
            return torch.cat([boxes, torch.sigmoid(self.cls(f).flatten(2))], 1)

    return Detector()


def train(steps: int, seed: int = 0) -> Any:
    """Train the detector on fresh scenes: BCE on every cell's class scores, L1 on the boxes of object cells."""
    import torch

    torch.manual_seed(seed)
    net = model()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    images, objects = scenes(4096, seed + 10)
    x = torch.from_numpy(images)
    target_cls = torch.zeros(len(objects), CLASSES, GRID * GRID)
    target_box = torch.zeros(len(objects), 4, GRID * GRID)
    positive = torch.zeros(len(objects), GRID * GRID, dtype=torch.bool)
    for i, found in enumerate(objects):
        for cls, cx, cy, size in found:
            cell = (int(cy) * GRID // SIZE) * GRID + int(cx) * GRID // SIZE
            target_cls[i, cls, cell] = 1.0
            target_box[i, :, cell] = torch.tensor([cx, cy, size, size])
            positive[i, cell] = True
    rng = np.random.default_rng(seed)
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(objects), 64))
        out = net(x[idx])
        scores = out[:, 4:].clamp(1e-6, 1 - 1e-6)
        loss_cls = torch.nn.functional.binary_cross_entropy(scores, target_cls[idx])
        pos = positive[idx]
        loss_box = (out[:, :4] - target_box[idx]).abs().permute(0, 2, 1)[pos].mean() / SIZE
        loss = loss_cls * 10 + loss_box
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.4f} (classes {loss_cls.item():.4f}, boxes {loss_box.item():.4f})",
                  flush=True)
    return net.eval()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``quantgate ARGS`` from this checkout."""
    return subprocess.run([PYTHON, "-m", "pytest_quantgate.frontends.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/quantgate-detector-trial"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--no-advise", action="store_true")
    args = parser.parse_args()
    import torch

    out: Path = args.out
    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "fixtures").mkdir(exist_ok=True)
    fp32 = out / "model" / "det.onnx"
    if not fp32.is_file():
        net = train(args.steps)
        torch.onnx.export(net, (torch.zeros(2, 1, SIZE, SIZE),), str(fp32), input_names=["image"],
                          output_names=["output0"], dynamic_axes={"image": {0: "N"}, "output0": {0: "N"}},
                          opset_version=17, dynamo=False)
    soak, _ = scenes(400, 1234)
    calib, _ = scenes(64, 99)
    np.savez(out / "fixtures" / "det.npz", image=soak)
    np.savez(out / "fixtures" / "det.calib.npz", image=calib)
    for name, producer, extra in (("det_dynamic", "ptq-dynamic", ()),
                                  ("det_static", "ptq-static", ("--calibration-set", str(out / "fixtures" /
                                                                                         "det.calib.npz")))):
        proc = cli(producer, str(fp32), "-o", str(out / "model" / f"{name}.int8.onnx"), *extra)
        if proc.returncode:
            print(proc.stdout, proc.stderr)
            return 1
    entries = []
    for name, mode in (("det_dynamic", "dynamic"), ("det_static", "static")):
        base = {"onnx": "det.onnx", "int8_onnx": f"{name}.int8.onnx", "soak_fixture": "det.npz", "quant_mode": mode,
                "quant_lineage": True, "sha256": "0" * 64, "int8_sha256": "0" * 64}
        if mode == "static":
            base["quant_calibration_set"] = "det.calib.npz"
        entries.append({"id": name, **base})
        entries.append({"id": f"{name}_declared", **base, "quant_outputs": {"output0": {"detections": HEAD}}})
    registry = out / "model" / "registry.json"
    registry.write_text(json.dumps({"schema_version": 1, "models": entries}, indent=2) + "\n")
    pin = cli("pin", str(registry), "--fixtures", str(out / "fixtures"))
    if pin.returncode:
        print(pin.stdout, pin.stderr)
        return 1
    for entry in entries:
        report = out / f"{entry['id']}.json"
        cli("measure", str(registry), "--fixtures", str(out / "fixtures"), "--id", entry["id"], "--diagnose",
            "always", "--json", str(report))
        row = json.loads(report.read_text())[0]
        result = row.get("result") or {}
        print(f"{entry['id']}: {row.get('verdict')} [{result.get('kind')}] {row.get('reason')}")
        for output in result.get("outputs", []):
            det = output.get("detections")
            if det:
                print(f"    detections: fp32 {det['fp32']}, int8 {det['int8']}, matched {det['matched']}; per class "
                      + ", ".join(f"{c['cls']}: {c['fp32']}/{c['int8']}/{c['matched']}" for c in det["classes"]))
        diagnosis = result.get("diagnosis") or {}
        worst = [f"{t['tensor']} {float(t['sqnr_db'] if t['sqnr_db'] is not None else t['xmodel_db']):.1f} dB"
                 + (" (on path)" if t.get("on_path") else "") for t in diagnosis.get("worst", [])[:4]]
        print(f"    diagnosis (focus {result.get('focus', {}) and result['focus'].get('what')}): {', '.join(worst)}")
    # the HTML report as a user gets it: pytest --quantgate over the registry (plots of what failed included)
    page = out / "report.html"
    proc = subprocess.run([PYTHON, "-m", "pytest", "--quantgate", "--quantgate-registry", str(registry),
                           "--quantgate-fixtures", str(out / "fixtures"), "--quantgate-html", str(page),
                           "-p", "no:cacheprovider", "-q", "--quantgate-diagnose", "off"], cwd=out, env=ENV,
                          capture_output=True, text=True, check=False)
    print(f"pytest --quantgate: rc {proc.returncode}; HTML report {page}")
    if not args.no_advise:
        proc = cli("advise", str(registry), "--id", "det_static_declared", "--fixtures", str(out / "fixtures"),
                   "--stages", "static,exclusions")
        print(proc.stdout[-4000:], proc.stderr[-2000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
