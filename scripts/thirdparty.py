"""Manual trials (not CI): gate real trained third-party ONNX models shipped in PyPI wheels, under a memory cap.

Usage::

    python -m scripts.thirdparty [--cache DIR] [--samples N] [--memcap BYTES] [--timeout S] [--batch N]
                                 [--only GLOB ...] [--no-eval] [--no-pytest] [--json PATH]

1. Fetch: ``pip download --no-deps`` of rapidocr-onnxruntime 1.4.4 (PP-OCRv4 text detector with 1-channel
   probability maps, PP-OCRv4 text-line recogniser with [N, 40, 6625] softmax outputs, PP-OCR direction classifier)
   and ddddocr 1.6.1 (a YOLO-style detector [1, 3, 416, 416] -> [1, 3549, 6]: boxes, objectness and class score
   concatenated in one output, fixed batch 1) into the cache, and unzip their .onnx files.
2. Fixtures from real scikit-image photographs (held-out ones for soak, others for calibration), cropped and
   resized to each model's input, normalised as the models' own packages do; text-line strips for the recogniser
   and classifier come mostly from the scanned ``page`` and ``text`` images.
3. Sidecars with the project's producers, as the quantisation notes advise: detectors static QDQ; the recogniser
   MatMul-only dynamic (and, as a known-bad control, dynamic with ORT's defaults, which turns its convolutions into
   ConvInteger) and static; the classifier static and dynamic. ``quantgate pin`` writes the hashes.
4. For every entry, one child process each (timed, peak RSS from wait4, under ``prlimit --as``): the plain ORT loop
   (bench/ort_loop.py), ``quantgate measure REGISTRY --fixtures DIR --ep cpu --id ID --json OUT``, and
   scripts/independent_eval.py (whole arrays in float64). Prints verdicts, drops, wall and peak RSS side by side.
5. ``pytest --quantgate -v`` over the whole registry in one capped child, from an empty folder, as a new user
   would run it; prints every item's verdict line.

Everything lives in the cache folder (default ``$XDG_CACHE_HOME/pytest-quantgate/thirdparty``); rebuilt pieces are
skipped when present. Nothing is downloaded at gate time or in CI.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from measured import Child, run_measured  # noqa: E402

PYTHON = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "true", "PYTHONDONTWRITEBYTECODE": "1"}
WHEELS = {"rapidocr-onnxruntime": "1.4.4", "ddddocr": "1.6.1"}
CALIB_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "immunohistochemistry")
SOAK_IMAGES = ("camera", "moon", "gravel", "coins", "text", "cell", "clock", "page", "retina")
TEXT_IMAGES = ("page", "text")
CALIB_SAMPLES = 16


@dataclass(frozen=True)
class Model:
    """One third-party model: where it is in its wheel and how to feed it."""

    name: str
    wheel_path: str
    input_name: str
    shape: tuple[int, int, int]  # C, H, W
    kind: str  # "det-ppocr" | "strip" | "det-yolo"


MODELS = (
    Model("ppocr_det", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "x", (3, 320, 320), "det-ppocr"),
    Model("ppocr_rec", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "x", (3, 48, 320), "strip"),
    Model("ppocr_cls", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x", (3, 48, 192),
          "strip"),
    Model("dddd_det", "ddddocr/common_det.onnx", "images", (3, 416, 416), "det-yolo"),
)

# (entry id, model, producer, extra producer options, note)
SIDECARS: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    ("ppocr_det_static", "ppocr_det", "ptq-static", (), "QDQ static, defaults"),
    ("ppocr_rec_dyn_matmul", "ppocr_rec", "ptq-dynamic", ("--op-types-to-quantize", "MatMul"), "MatMul-only dynamic"),
    ("ppocr_rec_dyn_matmul_anyb", "ppocr_rec", "ptq-dynamic",
     ("--op-types-to-quantize", "MatMul", "--no-matmul-const-b-only"), "MatMul-only dynamic, any B"),
    ("ppocr_rec_dyn_all", "ppocr_rec", "ptq-dynamic", (), "dynamic, ORT defaults (Conv -> ConvInteger): known bad"),
    ("ppocr_rec_static", "ppocr_rec", "ptq-static", (), "QDQ static, defaults"),
    ("ppocr_det_static_head_fp32", "ppocr_det", "ptq-static",
     ("--nodes-to-exclude", "p2o.ConvTranspose.0,p2o.Add.278,p2o.BatchNormalization.2,p2o.Relu.11,"
      "p2o.ConvTranspose.2,p2o.Add.280,p2o.Sigmoid.0"), "QDQ static, the upsampling head kept in fp32"),
    ("ppocr_cls_static", "ppocr_cls", "ptq-static", (), "QDQ static, defaults"),
    ("ppocr_cls_dyn", "ppocr_cls", "ptq-dynamic", (), "dynamic, defaults"),
    ("dddd_det_static", "dddd_det", "ptq-static", (), "QDQ static, defaults (fixed batch 1)"),
)

# extra registry entries over an existing sidecar: (entry id, sidecar's entry id, registry keys, note). ddddocr's
# head is [N, anchors, 4 + 1 + classes]: the default channel axis 1 judges each of its 3549 anchors (boxes and
# scores of one anchor pooled); axis 2 judges each column (x, y, w, h, objectness, class score) over all anchors
VARIANTS: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("dddd_det_static_axis2", "dddd_det_static", {"quant_channel_axis": 2}, "channels along axis 2 (columns)"),
    # the same sidecars declared as a user would from the README (quant_outputs): judged by what they mean
    # (ddddocr's head is YOLOX-style: its box columns are grid offsets the package decodes after the graph, so the
    # "yolo" layout, which reads boxes as they come out of the graph, does not apply to it)
    ("ppocr_det_static_threshold", "ppocr_det_static", {"quant_outputs": {"sigmoid_0.tmp_0": {"threshold": 0.3}}},
     "a text probability map: decisions x >= 0.3 (PP-OCR's DB threshold)"),
    ("ppocr_det_static_head_fp32_threshold", "ppocr_det_static_head_fp32",
     {"quant_outputs": {"sigmoid_0.tmp_0": {"threshold": 0.3}}}, "the same decisions, head in fp32"),
    ("ppocr_rec_dyn_matmul_anyb_argmax", "ppocr_rec_dyn_matmul_anyb", {"quant_outputs": {"softmax_11.tmp_0": {
        "argmax_axis": 2, "channel_axis": None}}}, "CTC character ids: argmax over the 6625 classes"),
)


def default_cache() -> Path:
    """Return $QUANTGATE_THIRDPARTY_CACHE, else $XDG_CACHE_HOME or ~/.cache, /pytest-quantgate/thirdparty."""
    if os.environ.get("QUANTGATE_THIRDPARTY_CACHE"):
        return Path(os.environ["QUANTGATE_THIRDPARTY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pytest-quantgate" / "thirdparty"


def fetch(cache: Path) -> Path:
    """Download the wheels (no dependencies) and unzip their .onnx files; return the source folder."""
    wheels, src = cache / "wheels", cache / "src"
    wheels.mkdir(parents=True, exist_ok=True)
    for pkg, version in WHEELS.items():
        stem = pkg.replace("-", "_")
        if not list(wheels.glob(f"{stem}-{version}-*.whl")):
            subprocess.run([PYTHON, "-m", "pip", "download", "--no-deps", "-q", f"{pkg}=={version}", "-d",
                            str(wheels)], check=True)
        wheel = next(wheels.glob(f"{stem}-{version}-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith(".onnx") and not (src / name).is_file():
                    zf.extract(name, src)
    return src


def load_rgb(name: str) -> np.ndarray:
    """Return one scikit-image sample photograph as float32 RGB in [0, 1] (grey images repeated on 3 channels)."""
    from skimage import data

    img = getattr(data, name)()
    scale = 255.0 if img.dtype == np.uint8 else (65535.0 if img.dtype == np.uint16 else 1.0)
    img = img.astype(np.float32) / scale
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.asarray(np.clip(img[..., :3], 0.0, 1.0), np.float32)


def _crop_resize(img: np.ndarray, h: int, w: int, rng: np.random.Generator, strip: bool) -> np.ndarray:
    from skimage.transform import resize

    if strip:  # a text-line-like strip: 16-64 rows, aspect of the target
        ch = int(rng.integers(16, min(64, img.shape[0]) + 1))
        cw = min(img.shape[1], int(ch * w / h * rng.uniform(0.7, 1.3)))
    else:
        ch = cw = int(min(img.shape[:2]) * rng.uniform(0.4, 1.0))
    y = int(rng.integers(0, img.shape[0] - ch + 1))
    x = int(rng.integers(0, img.shape[1] - cw + 1))
    out = resize(img[y:y + ch, x:x + cw], (h, w), anti_aliasing=True,  # type: ignore[no-untyped-call]
                 preserve_range=True)
    return np.asarray(out, np.float32)


def make_inputs(model: Model, names: tuple[str, ...], n: int, seed: int) -> np.ndarray:
    """Return ``n`` real-image inputs [n, C, H, W] float32, normalised as the model's package does."""
    rng = np.random.default_rng(seed)
    images = [load_rgb(name) for name in names]
    text = [load_rgb(name) for name in TEXT_IMAGES]
    _, h, w = model.shape
    out = np.empty((n, *model.shape), np.float32)
    for i in range(n):
        if model.kind == "strip":
            # mostly real text lines (the scanned page and text photos), some strips of other photographs
            pool = text if rng.random() < 0.75 else images
            rgb = _crop_resize(pool[int(rng.integers(len(pool)))], h, w, rng, strip=True)
            x = (rgb - 0.5) / 0.5
        else:
            rgb = _crop_resize(images[i % len(images)], h, w, rng, strip=False)
            bgr = rgb[..., ::-1]
            if model.kind == "det-ppocr":
                x = (bgr - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
            else:  # YOLO-style: raw 0-255 BGR
                x = bgr * 255.0
        out[i] = np.transpose(x, (2, 0, 1))
    return out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "pytest_quantgate.frontends.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, check=False)


def build(cache: Path, samples: int) -> tuple[Path, dict[str, str]]:
    """Write fixtures, sidecars and the registry; return (registry, build problems per entry id)."""
    src = fetch(cache)
    model_dir, fixtures = cache / "model", cache / "fixtures"
    model_dir.mkdir(parents=True, exist_ok=True)
    fixtures.mkdir(parents=True, exist_ok=True)
    problems: dict[str, str] = {}
    for m in MODELS:
        dest = model_dir / f"{m.name}.onnx"
        if not dest.is_file():
            dest.write_bytes((src / m.wheel_path).read_bytes())
        for fname, names, n, seed in ((f"{m.name}.calib.npz", CALIB_IMAGES, CALIB_SAMPLES, 5),
                                      (f"{m.name}_n{samples}.npz", SOAK_IMAGES, samples, 17)):
            if not (fixtures / fname).is_file():
                tmp = fixtures / (fname + ".tmp.npz")
                arrays: dict[str, Any] = {m.input_name: make_inputs(m, names, n, seed)}
                np.savez(tmp, **arrays)
                tmp.replace(fixtures / fname)
    entries = []
    for entry_id, model, producer, extra, note in SIDECARS:
        sidecar = model_dir / f"{entry_id}.int8.onnx"
        args = [producer, str(model_dir / f"{model}.onnx"), "-o", str(sidecar), *extra]
        if producer == "ptq-static":
            args += ["--calibration-set", str(fixtures / f"{model}.calib.npz")]
        if not sidecar.is_file():
            proc = _cli(*args)
            print(f"  built {entry_id}: rc {proc.returncode}", flush=True)
            if proc.returncode != 0:
                problems[entry_id] = (proc.stderr or proc.stdout).strip().splitlines()[-1][-300:]
                continue
        entry: dict[str, Any] = {
            "id": entry_id, "description": f"third-party {model}: {note}", "onnx": f"{model}.onnx",
            "int8_onnx": sidecar.name, "soak_fixture": f"{model}_n{samples}.npz",
            "quant_mode": "static" if producer == "ptq-static" else "dynamic",
            "quant_accuracy_budget_plcc": 0.01, "sha256": "0" * 64, "int8_sha256": "0" * 64,
        }
        if producer == "ptq-static":
            entry["quant_calibration_set"] = f"{model}.calib.npz"
        entries.append(entry)
    for entry_id, of, keys, note in VARIANTS:
        for entry in list(entries):
            if entry["id"] == of:
                entries.append({**entry, **keys, "id": entry_id, "description": f"{entry['description']}; {note}"})
    registry = model_dir / "registry.json"
    registry.write_text(json.dumps({"schema_version": 1, "models": entries}, indent=2) + "\n")
    pin = _cli("pin", str(registry), "--fixtures", str(fixtures))
    if pin.returncode != 0:
        raise RuntimeError(f"quantgate pin failed:\n{pin.stdout}\n{pin.stderr}")
    return registry, problems


def _last_json(child: Child) -> dict[str, Any]:
    text = "\n" + child.tail  # the report may be the whole output, with no newline before its "{"
    start = text.rfind("\n{")
    try:
        return dict(json.loads(text[start + 1:])) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def _why(child: Child) -> str:
    if child.timed_out:
        return "TIMEOUT"
    if child.rc < 0 or child.rc > 128:
        return f"killed (status {child.rc})"
    lines = [ln for ln in child.tail.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else f"rc {child.rc}")[-200:]


def _measure(child: Child) -> dict[str, Any]:
    return {"wall": child.wall, "peak_mib": child.peak_mib, "rc": child.rc, "why": "" if child.ok else _why(child)}


def gate_result(row: dict[str, Any]) -> dict[str, Any]:
    """Return the measurements of one report item: its ``result`` (today's report), else the item itself."""
    result = row.get("result")
    return dict(result) if isinstance(result, dict) else row


def trial(registry: Path, fixtures: Path, entry_id: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one entry, each in a fresh capped child: plain loop, ``quantgate measure``, independent evaluation."""
    loop = run_measured([PYTHON, str(ROOT / "bench" / "ort_loop.py"), str(registry), str(fixtures), "--id", entry_id,
                         "--batch", str(args.batch), "--as-gate"], ROOT, memcap=args.memcap, timeout=args.timeout,
                        env=ENV)
    with tempfile.TemporaryDirectory(prefix="qg-thirdparty-") as tmp:
        out = Path(tmp) / "gate.json"
        gate = run_measured([PYTHON, "-m", "pytest_quantgate.frontends.cli", "measure", str(registry), "--fixtures",
                             str(fixtures), "--ep", "cpu", "--id", entry_id, "--batch-size", str(args.batch),
                             "--json", str(out), "--diagnose", args.diagnose], ROOT, memcap=args.memcap,
                            timeout=args.timeout, env=ENV)
        rows = json.loads(out.read_text()) if out.is_file() else []
    row = rows[0] if rows else {}
    res = gate_result(row)
    worst = max(res.get("outputs") or [{}], key=lambda o: o.get("drop") or 0.0)
    result: dict[str, Any] = {
        "id": entry_id,
        "loop": _measure(loop),
        "gate": {**_measure(gate), "verdict": row.get("verdict"), "drop": res.get("drop"), "kind": res.get("kind"),
                 "reason": row.get("reason") or res.get("reason"), "also": res.get("also"),
                 "samples": res.get("samples"), "worst_channel": worst.get("worst_channel"),
                 "worst_channel_drop": worst.get("worst_channel_drop")},
    }
    if not args.no_eval:
        ev = run_measured([PYTHON, "-m", "scripts.independent_eval", str(registry), "--id", entry_id, "--fixtures",
                           str(fixtures), "--batch", str(args.batch)], ROOT, memcap=args.memcap,
                          timeout=args.timeout, env=ENV)
        rep = _last_json(ev)
        result["independent"] = {**_measure(ev), "verdict": rep.get("verdict"), "drop": rep.get("drop"),
                                 "breaches": rep.get("breaches"), "outputs": rep.get("outputs", {})}
    return result


def pytest_run(registry: Path, fixtures: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``pytest --quantgate -v`` over the whole registry, as a user would, in one capped child."""
    with tempfile.TemporaryDirectory(prefix="qg-thirdparty-pytest-") as tmp:
        report = Path(tmp) / "report.json"
        child = run_measured([PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "--quantgate", "-v",
                              f"--quantgate-registry={registry}", f"--quantgate-fixtures={fixtures}",
                              "--quantgate-ep=cpu", f"--quantgate-batch-size={args.batch}",
                              f"--quantgate-diagnose={args.diagnose}",
                              f"--quantgate-report={report}", "-p", "no:randomly"], Path(tmp), memcap=args.memcap,
                             timeout=args.timeout * 4, env=ENV)
        rows = json.loads(report.read_text()) if report.is_file() else []
    # pytest -v: one "<nodeid> PASSED|FAILED|ERROR|SKIPPED [ n%]" line per item (an ERROR's own line as well)
    items = [ln.strip() for ln in child.tail.splitlines()
             if re.match(r"\S+::\S+ (PASSED|FAILED|ERROR|SKIPPED)\b", ln.strip())]
    return {**_measure(child), "items": items, "rows": rows,
            "summary": (child.tail.strip().splitlines() or [""])[-1]}


def _fmt(v: Any, spec: str = ".6f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: list[dict[str, Any]], problems: dict[str, str]) -> None:
    """Print one line per entry: loop and gate cost, both verdicts and drops."""
    head = ("entry", "loop s", "loop MiB", "gate s", "gate MiB", "gate", "gate drop", "indep.", "indep. drop",
            "|Δ drop|")
    lines = [head]
    for r in results:
        lp, gt, ev = r["loop"], r["gate"], r.get("independent", {})
        delta = (abs(gt["drop"] - ev["drop"]) if gt.get("drop") is not None and ev.get("drop") is not None
                 else None)
        lines.append((r["id"], f"{lp['wall']:.1f}", f"{lp['peak_mib']:.0f}", f"{gt['wall']:.1f}",
                      f"{gt['peak_mib']:.0f}", f"{gt['verdict']} ({gt['kind']})" if gt["verdict"] else gt["why"][:60],
                      _fmt(gt["drop"]), str(ev.get("verdict") or ev.get("why", "")[:40]), _fmt(ev.get("drop")),
                      _fmt(delta, ".1e")))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for entry_id, why in problems.items():
        print(f"{entry_id}: the producer failed: {why}")
    for r in results:
        if r["gate"]["verdict"] != "PASS":
            print(f"{r['id']}: gate {r['gate']['verdict']}: {r['gate']['reason'] or r['gate']['why']}")
            for extra in r["gate"].get("also") or ():
                print(f"    also: {extra}")
        if r.get("independent", {}).get("breaches"):
            print(f"{r['id']}: independent: {'; '.join(r['independent']['breaches'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--memcap", type=int, default=8_000_000_000, help="bytes of address space per child")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    parser.add_argument("--batch", type=int, default=256, help="batch of loop, gate and evaluation (gate default)")
    parser.add_argument("--only", action="append", help="entry id glob (repeatable)")
    parser.add_argument("--diagnose", choices=("auto", "off", "always"), default="auto",
                        help="the gate's --diagnose for `quantgate measure` (auto: failing items are diagnosed)")
    parser.add_argument("--no-eval", action="store_true", help="skip the independent float64 evaluation")
    parser.add_argument("--no-pytest", action="store_true", help="skip the `pytest --quantgate -v` run")
    parser.add_argument("--no-trials", action="store_true", help="only the `pytest --quantgate -v` run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    registry, problems = build(args.cache, args.samples)
    ids = [e["id"] for e in json.loads(registry.read_text())["models"]]
    ids = [i for i in ids if not args.no_trials and (not args.only or any(fnmatch.fnmatch(i, p) for p in args.only))]
    results = []
    for entry_id in ids:
        r = trial(registry, args.cache / "fixtures", entry_id, args)
        ev = r.get("independent", {})
        print(f"  {entry_id}: gate {r['gate']['verdict']} {_fmt(r['gate']['drop'])} {r['gate']['wall']:.1f} s "
              f"{r['gate']['peak_mib']:.0f} MiB; loop {r['loop']['wall']:.1f} s {r['loop']['peak_mib']:.0f} MiB; "
              f"independent {ev.get('verdict')} {_fmt(ev.get('drop'))}", flush=True)
        results.append(r)
    print_table(results, problems)
    run: dict[str, Any] = {}
    if not args.no_pytest:
        run = pytest_run(registry, args.cache / "fixtures", args)
        print(f"\npytest --quantgate -v: rc {run['rc']}, {run['wall']:.1f} s, peak {run['peak_mib']:.0f} MiB")
        for line in run["items"]:
            print(f"  {line}")
        print(f"  {run['summary']}")
    if args.json:
        args.json.write_text(json.dumps({"memcap": args.memcap, "samples": args.samples, "results": results,
                                         "pytest": run, "problems": problems}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
