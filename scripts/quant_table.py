"""Dynamic PTQ vs static PTQ vs QAT on every gated bundled model, measured by the gate, as an ADR-0208 §5 table.

Run from the repository root: ``python scripts/quant_table.py [--out FILE] [--keep DIR]``. For each gated entry
of ``model/registry.json`` (``fusion_mlp_v1``, ``residual_filter_v1``, ``nr_cnn_v1``) it builds into a temporary
folder, never touching ``model/`` or ``fixtures/``:

* a **dynamic PTQ** sidecar: ``quantize_dynamic(fp32, int8, DynamicConfig())`` (what ``build_all`` uses);
* a **static PTQ** sidecar: ``quantize_static(fp32, int8, StaticConfig(calibration_set=...))``. Calibration:
  the registered ``quant_calibration_set`` where the entry has one (``residual_filter_v1``); otherwise
  ``N_CALIB`` = 128 inputs of the model's *training* data (``scripts/bundled/<model>.training_data()``, training
  photographs only, never the soak fixture), drawn exactly as the QAT bridge draws its calibration samples
  (``default_rng(QAT_SEED)``), so static PTQ and the QAT bridge's static step see the same 128 inputs;
* a **QAT** sidecar: ``quantize_qat(fp32, int8, QatConfig(epochs_qat=2, lr_qat=..., seed=7), recipe=...)``
  (bridge route), plus the **QAT-conditioned fp32** model. The producer keeps that fp32 export in memory, so a
  thin recipe wrapper keeps the fresh module the producer copies the QAT weights into (the last
  ``build_model()`` it calls) and this script exports it with the same legacy-exporter settings. The export is
  checked: re-running the bridge's onnxruntime static step on it must give the QAT sidecar's exact bytes.

Recipes: ``model/recipes/nr_cnn_v1.py`` (the registered one) and ``scripts/bundled/recipes/{fusion_mlp_v1,
residual_filter_v1}.py``, all passed to the producer as file paths. ``quantize_qat`` takes any recipe path or
object; only the gate's registry resolution of an entry's ``qat_recipe`` field insists on a path inside the
registry folder, and that is not used here.

Measurement is the gate's own: one temporary registry with one entry per comparison (the registered entry's
``quant_compare`` and other ``quant_*`` checks, its soak fixture with its ``target``, the mode's budget: 0.01
dynamic/static, 0.002 qat) run through ``quantgate measure --ep cpu --json``. "PLCC drop" is the gate's drop,
max(PLCC(fp32, target) − PLCC(int8, target), PLCC(fp32, target)·(1 − PLCC(fp32, int8))); "RMSE" is
int8 vs the comparison's fp32 (residual entries: over residuals, where the input cancels). Comparisons:

* PTQ: registered fp32 → int8 (within-pipeline and vs the fp32 baseline are the same comparison);
* QAT within-pipeline: QAT-conditioned fp32 → QAT int8;
* QAT vs fp32 baseline: registered fp32 → QAT int8;
* QAT drift (information, no budget): registered fp32 → QAT-conditioned fp32, i.e. what the fine-tune alone cost;
* QAT control (information, no budget): registered fp32 → the bridge's onnxruntime static step applied to the
  registered fp32 itself (QAT with zero epochs), which separates the fine-tune's effect from the bridge's own
  calibration settings (no ``quant_pre_process``, batches of 16) when comparing QAT with static PTQ.

The notes say whether each registered sidecar was reproduced byte for byte (it is, with the library versions
this was written against: the build here uses ``build_all``'s producers and settings).

The markdown goes to stdout (progress to stderr); ``--out FILE`` also writes it atomically. Every step is
seeded and torch runs deterministic single-threaded kernels (``common.seed_everything``), so reruns on the same
library versions give the same sidecars and the same numbers (latencies in the speed table excepted).
Takes about 1.5 to 2 minutes on 2 CPU cores (about 100 s measured). ``--only ID`` limits it to some models;
``--keep DIR`` builds into DIR and keeps every file (sidecars, QAT fp32, temporary registry, gate JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make ``scripts.bundled`` and the package importable
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from scripts.bundled import common  # noqa: E402

REGISTRY = REPO_ROOT / "model" / "registry.json"
FIXTURES = REPO_ROOT / "fixtures"
BUDGETS = {"dynamic": 0.01, "static": 0.01, "qat": 0.002}
N_CALIB = 128
QAT_EPOCHS = 2
QAT_SEED = 7
PTQ_SEED = 0


@dataclass(frozen=True)
class ModelPlan:
    """How to build the three sidecars of one bundled model."""

    id: str
    module: str  # scripts/bundled/<module>.py
    recipe: Path
    lr_qat: float
    note: str = ""


# lr_qat: nr_cnn_v1 uses build_all's 3e-5 (nr_cnn.LR_QAT: measured there, fp32 LR / 10 drifts the held-out PLCC
# past the 0.002 budget); the other two use the same ratio to their fp32 LR (about 1/70), rounded: 3e-5 for the
# fusion MLP (LR 2e-3) and 1.5e-5 for the residual filter (LR 1e-3). Chosen by rule, not tuned on the soak fixture.
PLANS = (
    ModelPlan("fusion_mlp_v1", "fusion_mlp", REPO_ROOT / "scripts" / "bundled" / "recipes" / "fusion_mlp_v1.py", 3e-5),
    ModelPlan("residual_filter_v1", "residual_filter", REPO_ROOT / "scripts" / "bundled" / "recipes" / "residual_filter_v1.py", 1.5e-5),
    ModelPlan("nr_cnn_v1", "nr_cnn", REPO_ROOT / "model" / "recipes" / "nr_cnn_v1.py", 3e-5),
)

# registry fields that belong to the sidecar/producer, not to how the gate compares; replaced per comparison
_PRODUCER_FIELDS = {"id", "onnx", "sha256", "int8_onnx", "int8_sha256", "quant_mode", "quant_calibration_set",
                    "quant_accuracy_budget_plcc", "qat_recipe", "quant_options", "soak_fixture", "description", "kind"}


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Built:
    """What was built for one model: file names inside the work folder, notes, errors and timings."""

    model: str
    work: Path
    fp32: str
    entry: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # "dynamic" / "static" / "qat" / "qat_fp32" -> file name
    calib: str | None = None
    errors: dict[str, str] = field(default_factory=dict)  # mode -> why it could not be built
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


class _KeepFresh:
    """Delegating recipe that remembers every module it builds (the producer's last one holds the QAT weights).

    Optional members (``fp32_lr``, ``calibration_data``) are forwarded through ``__getattr__``, so the producer's
    ``hasattr`` checks see exactly what the wrapped recipe has.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.built: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def build_model(self):
        model = self._inner.build_model()
        self.built.append(model)
        return model

    def load_fp32_weights(self, model, fp32_onnx: Path) -> None:
        self._inner.load_fp32_weights(model, fp32_onnx)

    def training_data(self):
        return self._inner.training_data()

    def loss(self, prediction, target):
        return self._inner.loss(prediction, target)

    def example_input(self):
        return self._inner.example_input()


def _io_names(path: Path) -> tuple[str, list[str], int]:
    import onnx

    proto = onnx.load(str(path))
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in inits]
    return inputs[0] if inputs else "", [o.name for o in proto.graph.output], len(inputs)


def _fake_quant_count(recipe: Any, fp32: Path) -> int | None:
    """How many fake-quant observers ``prepare_qat_pt2e`` inserts with the producer's quantiser (None: unknown).

    Uses the producer's private ``_prepare_qat`` so the count is for exactly the graph the producer trains.
    """
    try:
        from pytest_quantgate.producers.qat import _prepare_qat

        model = recipe.build_model()
        recipe.load_fp32_weights(model, fp32)
        example = recipe.example_input().detach().float()
        if example.shape[0] < 2:
            example = example.repeat(2, *([1] * (example.dim() - 1)))
        prepared = _prepare_qat(model, example)
    except Exception as exc:  # diagnostic only
        _say(f"  (could not count fake-quant nodes: {type(exc).__name__}: {exc})")
        return None
    return sum(1 for n in prepared.graph.nodes if n.op == "call_module" and "activation_post_process" in str(n.target))


def _bridge_requantize(fp32_onnx: Path, input_name: str, calib: np.ndarray) -> bytes:
    """Run the QAT bridge's onnxruntime static step (its documented settings) on ``fp32_onnx``; return the bytes."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{input_name: calib[i : i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="quant-table-requant-") as scratch:
        out = Path(scratch) / "int8.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(onnx.load(str(fp32_onnx)), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        return out.read_bytes()


def _why(exc: BaseException) -> str:
    from pytest_quantgate.producers.base import ProducerError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, ProducerError) else f"{type(exc).__name__}: {text}"


def _training_calibration(plan: ModelPlan, input_name: str, work: Path) -> tuple[Path, np.ndarray]:
    """Write ``N_CALIB`` training inputs, drawn like the QAT bridge draws them, as a static calibration set."""
    import importlib

    x_train, _ = importlib.import_module(f"scripts.bundled.{plan.module}").training_data()
    rng = np.random.default_rng(QAT_SEED)
    idx = np.sort(rng.permutation(len(x_train))[:N_CALIB])
    calib = np.ascontiguousarray(x_train[idx], np.float32)
    path = work / f"{plan.id}.calib.npz"
    np.savez_compressed(path, **{input_name: calib})
    return path, calib


def build(plan: ModelPlan, entry: dict[str, Any], work: Path) -> Built:
    """Build the dynamic, static and QAT sidecars (and the QAT fp32) of one model into ``work``."""
    from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic
    from pytest_quantgate.producers.ptq_static import StaticConfig, quantize_static
    from pytest_quantgate.producers.qat import QatConfig, load_recipe, quantize_qat

    src = REGISTRY.parent / entry["onnx"]
    fp32 = work / f"{plan.id}.onnx"
    shutil.copyfile(src, fp32)  # the gate refuses paths outside the registry folder, symlinks included
    out = Built(plan.id, work, fp32.name, entry)
    input_name, output_names, n_inputs = _io_names(fp32)

    t = time.monotonic()
    try:
        quantize_dynamic(fp32, work / f"{plan.id}.dynamic.int8.onnx", DynamicConfig())
        out.files["dynamic"] = f"{plan.id}.dynamic.int8.onnx"
    except Exception as exc:  # a producer that cannot take this model is a table row, not a crash
        out.errors["dynamic"] = _why(exc)
    out.seconds["dynamic"] = time.monotonic() - t
    _say(f"[{plan.id}] dynamic PTQ {out.seconds['dynamic']:.1f}s")

    t = time.monotonic()
    calib_array: np.ndarray | None = None
    if entry.get("quant_calibration_set"):
        calib = work / Path(entry["quant_calibration_set"]).name
        from pytest_quantgate.producers.dispatch import calibration_set
        from pytest_quantgate.io.registry import load_registry

        registry = load_registry(REGISTRY)  # the gate's own lookup: registry folder, then fixtures folder
        shutil.copyfile(calibration_set(registry, registry.entry(plan.id), FIXTURES), calib)
        out.notes.append(f"static calibration: the registered set {entry['quant_calibration_set']}")
    else:
        calib, calib_array = _training_calibration(plan, input_name, work)
        out.notes.append(f"static calibration: {N_CALIB} training inputs ({plan.module}.training_data(), "
                         f"default_rng({QAT_SEED})), the same inputs the QAT bridge calibrates on")
    out.calib = calib.name
    try:
        quantize_static(fp32, work / f"{plan.id}.static.int8.onnx", StaticConfig(calibration_set=calib))
        out.files["static"] = f"{plan.id}.static.int8.onnx"
    except Exception as exc:  # a producer that cannot take this model is a table row, not a crash
        out.errors["static"] = _why(exc)
    out.seconds["static"] = time.monotonic() - t
    _say(f"[{plan.id}] static PTQ {out.seconds['static']:.1f}s")

    t = time.monotonic()
    if n_inputs != 1:
        out.errors["qat"] = f"the QAT producer supports single-input models only; {plan.id} has {n_inputs} inputs"
        return out
    try:
        recipe = _KeepFresh(load_recipe(plan.recipe))
        common.seed_everything(QAT_SEED)
        fq = _fake_quant_count(recipe, fp32)
        if fq == 0:
            out.notes.append("QAT: prepare_qat_pt2e (X86InductorQuantizer) inserted no fake-quant node (it annotates "
                             "conv/linear patterns, not aten.matmul), so the QAT phase is a plain fp32 fine-tune")
        elif fq is not None:
            out.notes.append(f"QAT: {fq} fake-quant nodes in the prepared graph")
        common.seed_everything(QAT_SEED)
        recipe.built.clear()
        int8 = work / f"{plan.id}.qat.int8.onnx"
        res = quantize_qat(fp32, int8, QatConfig(epochs_qat=QAT_EPOCHS, lr_qat=plan.lr_qat, seed=QAT_SEED),
                           recipe=recipe, progress=lambda line: _say(f"[{plan.id}] qat: {line}"))
        fresh = recipe.built[-1]  # _copy_into_fresh: the last build_model(), loaded with the QAT weights
        qat_fp32 = work / f"{plan.id}.qat.fp32.onnx"
        common.export_onnx(fresh, recipe.example_input().detach().float(), qat_fp32, input_name, output_names[0])
        out.files["qat"] = int8.name
        out.files["qat_fp32"] = qat_fp32.name
        losses = ", ".join(f"{v:.4g}" for v in res.epoch_losses)
        out.notes.append(f"QAT: {QAT_EPOCHS} epochs over {res.n_train} samples, lr_qat {res.lr_qat:g}, seed {QAT_SEED}; "
                         f"epoch losses {losses}; weights moved {res.weight_l2_from_fp32:.4g} (L2) from fp32")
        cal = res.provenance.get("calibration", {})
        if hasattr(recipe, "calibration_data"):
            bridge_calib = np.ascontiguousarray(recipe.calibration_data(), np.float32)[:N_CALIB]
        else:
            x_train, _ = recipe.training_data()
            rng = np.random.default_rng(QAT_SEED)
            bridge_calib = np.ascontiguousarray(x_train[np.sort(rng.permutation(len(x_train))[:N_CALIB])], np.float32)
        if calib_array is not None and hashlib.sha256(calib_array.tobytes()).hexdigest() != cal.get("sha256"):
            out.notes.append("WARNING: the static calibration set differs from the QAT bridge's calibration samples")
        same = _bridge_requantize(qat_fp32, input_name, bridge_calib) == int8.read_bytes()
        out.notes.append("QAT-fp32 export check: requantising it reproduces the QAT sidecar byte for byte" if same else
                         "WARNING: requantising the QAT-fp32 export does not reproduce the QAT sidecar's bytes")
        # control: the bridge's static step on the *registered* fp32 (QAT with zero epochs), to tell the
        # fine-tune's effect apart from the bridge's calibration settings (no pre-processing, batches of 16)
        control = work / f"{plan.id}.bridge0.int8.onnx"
        control.write_bytes(_bridge_requantize(fp32, input_name, bridge_calib))
        out.files["bridge0"] = control.name
    except Exception as exc:  # a producer that cannot take this model is a table row, not a crash
        out.errors["qat"] = _why(exc)
    out.seconds["qat"] = time.monotonic() - t
    _say(f"[{plan.id}] QAT {out.seconds['qat']:.1f}s")
    return out


def _entry(work: Path, built: Built, eid: str, mode: str, fp32: str, int8: str, budget: float | None) -> dict[str, Any]:
    from pytest_quantgate.fileio import sha256_file

    base = {k: v for k, v in built.entry.items() if k not in _PRODUCER_FIELDS}
    entry = dict(base, id=eid, onnx=fp32, soak_fixture=f"{built.model}.npz", quant_mode=mode, int8_onnx=int8,
                 sha256=sha256_file(work / fp32), int8_sha256=sha256_file(work / int8))
    entry["quant_accuracy_budget_plcc"] = budget if budget is not None else 2.0  # drift rows: information only
    if mode == "static":
        entry["quant_calibration_set"] = built.calib
    return entry


# (row key, mode, comparison label, fp32 key, int8 key, budget applies)
_COMPARISONS = (
    ("dynamic", "dynamic", "fp32-baseline vs dynamic-PTQ-int8 (= within-pipeline)", None, "dynamic", True),
    ("static", "static", "fp32-baseline vs static-PTQ-int8 (= within-pipeline)", None, "static", True),
    ("qat.within", "qat", "QAT-fp32 vs QAT-int8 (within-pipeline)", "qat_fp32", "qat", True),
    ("qat.baseline", "qat", "fp32-baseline vs QAT-int8", None, "qat", True),
    ("qat.drift", "qat", "fp32-baseline vs QAT-fp32 (fine-tune drift, info)", None, "qat_fp32", False),
    ("qat.control", "qat", "fp32-baseline vs bridge-int8, no fine-tune (control, info)", None, "bridge0", False),
)


def measure(builts: list[Built], work: Path) -> dict[str, dict[str, Any]]:
    """Gate every comparison through ``quantgate measure``; return the JSON rows by entry id."""
    from pytest_quantgate.frontends import cli

    models = []
    for b in builts:
        for key, mode, _label, fp32_key, int8_key, budgeted in _COMPARISONS:
            if int8_key not in b.files or (fp32_key is not None and fp32_key not in b.files):
                continue
            fp32 = b.files[fp32_key] if fp32_key else b.fp32
            models.append(_entry(work, b, f"{b.model}.{key}", mode, fp32, b.files[int8_key],
                                 BUDGETS[mode] if budgeted else None))
    reg = work / "registry.json"
    reg.write_text(json.dumps({"schema_version": 1, "models": models}, indent=2) + "\n")
    out = work / "measure.json"
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        rc = cli.main(["measure", str(reg), "--fixtures", str(FIXTURES), "--ep", "cpu", "--json", str(out)])
    if rc not in (0, 1) or not out.is_file():
        sys.stderr.write(captured.getvalue())
        raise SystemExit(f"quantgate measure failed (exit {rc}); its output is above")
    return {item["id"]: flat_row(item) for item in json.loads(out.read_text())}


def flat_row(item: dict[str, Any]) -> dict[str, Any]:
    """Return a measure JSON item (an Outcome: verdict and reason, the GateResult under "result") as one flat row."""
    result = item.get("result") or {}
    ci = result.get("interval")
    return {**result, "verdict": item["verdict"], "reason": item["reason"],
            "ci": [ci["low"], ci["high"]] if ci else None}


SPEED_ROUNDS = 7


def speed(builts: list[Built]) -> dict[str, dict[str, float]]:
    """Median single-thread latency (ms) of one pass over the whole soak fixture, per model file.

    The gate's own latency (one timing pass per comparison) swings by 2x between rows on a shared 2-core
    machine; here every model of one entry is warmed up, then timed in ``SPEED_ROUNDS`` interleaved rounds.
    """
    import onnxruntime as ort

    out: dict[str, dict[str, float]] = {}
    for b in builts:
        with np.load(FIXTURES / f"{b.model}.npz", allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files if k != "target"}
        names = {"fp32": b.fp32, **{k: b.files[k] for k in ("dynamic", "static", "qat") if k in b.files}}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.x64quantprecision", "1")  # the gate's exact int8 kernels
        sessions = {k: ort.InferenceSession(str(b.work / f), opts, providers=["CPUExecutionProvider"])
                    for k, f in names.items()}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for k, sess in sessions.items():
            sess.run(None, feeds)
        for _ in range(SPEED_ROUNDS):
            for k, sess in sessions.items():
                t = time.perf_counter()
                sess.run(None, feeds)
                times[k].append(time.perf_counter() - t)
        out[b.model] = {k: float(np.median(v)) * 1000.0 for k, v in times.items()}
        out[b.model]["_samples"] = float(next(iter(feeds.values())).shape[0])
    return out


def _fmt(value: float | None, digits: int = 6) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(builts: list[Built], rows: dict[str, dict[str, Any]], timings: dict[str, dict[str, float]]) -> str:
    """Return the ADR-0208 §5 style markdown: the main table, the speed table and the notes."""
    lines = ["| model | mode | comparison | PLCC drop | RMSE | budget | verdict |",
             "|---|---|---|---|---|---|---|"]
    speed_lines = ["| model | samples | fp32 ms | dynamic ms (speed-up) | static ms (speed-up) | QAT ms (speed-up) |",
                   "|---|---|---|---|---|---|"]
    for b in builts:
        t = timings.get(b.model, {})
        if "fp32" not in t:
            continue
        def ms(v: float) -> str:
            return f"{v:.3f}" if v < 1 else f"{v:.1f}"

        cells = [f"{ms(t[k])} (x{t['fp32'] / t[k]:.2f})" if k in t else "n/a" for k in ("dynamic", "static", "qat")]
        speed_lines.append(f"| {b.model} | {int(t['_samples'])} | {ms(t['fp32'])} | {' | '.join(cells)} |")
    implied_used = False
    for b in builts:
        for key, mode, label, _fp32_key, int8_key, budgeted in _COMPARISONS:
            budget = _fmt(BUDGETS[mode], 3) if budgeted else "—"
            if int8_key not in b.files:
                why = b.errors.get(mode, "not built").replace("|", "\\|").splitlines()[0]
                if key == "qat.within" or key.startswith("dynamic") or key.startswith("static"):
                    lines.append(f"| {b.model} | {mode} | {label} | n/a | n/a | {budget} | NOT BUILT: {why} |")
                continue
            row = rows.get(f"{b.model}.{key}")
            if row is None or row.get("drop") is None:
                reason = "no result" if row is None else str(row.get("reason", "")).replace("|", "\\|")
                lines.append(f"| {b.model} | {mode} | {label} | n/a | n/a | {budget} | ERROR: {reason} |")
                continue
            out = max(row["outputs"], key=lambda o: o["drop"])
            drop = _fmt(row["drop"])
            if out.get("fp32_vs_target") and out.get("int8_vs_target"):
                target_drop = out["fp32_vs_target"]["plcc"] - out["int8_vs_target"]["plcc"]
                if row["drop"] > target_drop + 1e-12:
                    drop += "*"
                    implied_used = True
            if budgeted:
                verdict = row["verdict"] if row["kind"] in ("pass", "drop") else f"{row['verdict']} ({row['kind']})"
            else:
                verdict = "info"
            lines.append(f"| {b.model} | {mode} | {label} | {drop} | {_fmt(out['vs_fp32']['rmse'], 5)} | {budget} | {verdict} |")
    text = ["## Quantisation modes on the bundled models (gate semantics, CPU EP)", "", *lines, ""]
    text.append("PLCC drop: the gate's drop on the soak fixture (with its `target`), "
                "max(PLCC(fp32, target) − PLCC(int8, target), PLCC(fp32, target)·(1 − PLCC(fp32, int8))); "
                "RMSE: int8 vs that row's fp32 (residual entries: over residuals). "
                "Verdict: the gate's (drop vs budget plus its gain/offset checks).")
    if implied_used:
        text.append("`*`: the implied term (int8 not tracking fp32) set the drop, not the drop against the target.")
    text += ["", f"### Speed (CPU EP, 1 thread, one pass over the whole soak fixture, median of {SPEED_ROUNDS} "
             "interleaved rounds, this machine)", "", *speed_lines, ""]
    text += ["### Notes", ""]
    for b in builts:
        for note in b.notes:
            text.append(f"* {b.model}: {note}")
        for mode, err in b.errors.items():
            text.append(f"* {b.model}: {mode} not built: {err}")
        pinned = b.entry.get("int8_sha256")
        mode = b.entry.get("quant_mode")
        if pinned and mode in b.files:
            from pytest_quantgate.fileio import sha256_file

            same = sha256_file(b.work / b.files[mode]) == pinned
            text.append(f"* {b.model}: the {mode} sidecar built here is "
                        f"{'byte-identical to' if same else 'NOT byte-identical to'} the registered one (int8_sha256)")
        secs = ", ".join(f"{k} {v:.1f}s" for k, v in b.seconds.items())
        text.append(f"* {b.model}: build times {secs}")
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the markdown here (atomically)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="build into DIR (created; must be empty) and keep it, instead of a temporary folder")
    parser.add_argument("--only", action="append", choices=[p.id for p in PLANS], default=None,
                        help="only these models (repeatable)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    registered = {e["id"]: e for e in json.loads(REGISTRY.read_text())["models"]}
    plans = [p for p in PLANS if not args.only or p.id in args.only]
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            if any(args.keep.iterdir()):
                parser.error(f"--keep {args.keep}: folder is not empty")
            work = args.keep.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quant-table-")))
        builts = [build(p, registered[p.id], work) for p in plans]
        t = time.monotonic()
        rows = measure(builts, work)
        _say(f"measured in {time.monotonic() - t:.1f}s")
        t = time.monotonic()
        timings = speed(builts)
        _say(f"timed in {time.monotonic() - t:.1f}s")
        text = table(builts, rows, timings)  # inside: the notes compare the built files with the registered pins
    text += f"\nTotal wall time {time.monotonic() - started:.0f}s (`python scripts/quant_table.py`).\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.out is not None:
        from pytest_quantgate.fileio import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
