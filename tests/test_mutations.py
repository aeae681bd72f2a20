"""Mutation corpus: broken sidecars built from every bundled gated model must fail the gate for the right reason.

Everything is derived from ``model/registry.json`` at collection time, so the corpus follows the bundled models as
they are rebuilt: each gated entry's fp32 model, healthy int8 sidecar, soak fixture and budgets are copied into a
temp project whose registry re-pins the hashes (the bundled pins are checked by test_bundled.py, not here).

The healthy sidecars must pass on the full fixture and on 30 bootstrap-resampled fixtures (seeds 0..29) with no
verdict flip. The corpus is printed as a table (mutation x model -> verdict, reason) by ``test_print_corpus_table``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_quantgate.fileio import sha256_file

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "model"
FIXTURES_DIR = REPO / "fixtures"
RESAMPLES = 30
BUDGET_KINDS = {"drop", "affine", "mae", "max_abs", "relative"}
# entry keys that name files or pins: the temp registry sets its own
PATH_KEYS = {"id", "onnx", "int8_onnx", "sha256", "int8_sha256", "soak_fixture", "qat_recipe",
             "quant_calibration_set"}


def _bundled_entries() -> list[dict[str, Any]]:
    """Return the bundled gated entries whose fp32 model, sidecar and fixture exist."""
    try:
        data = json.loads((MODEL_DIR / "registry.json").read_text("utf-8"))
    except (OSError, ValueError):
        return []
    out = []
    for raw in data.get("models", []):
        if raw.get("quant_mode", "fp32") == "fp32":
            continue
        int8 = raw.get("int8_onnx", raw["onnx"].removesuffix(".onnx") + ".int8.onnx")
        fixture = raw.get("soak_fixture", f"{raw['id']}.npz")
        if (MODEL_DIR / raw["onnx"]).is_file() and (MODEL_DIR / int8).is_file() and (FIXTURES_DIR / fixture).is_file():
            out.append(raw)
    return sorted(out, key=lambda r: r["id"])


def _all_bundled_fp32() -> dict[str, Path]:
    """Return every bundled fp32 model by id (candidates for the 'different model' mutation)."""
    data = json.loads((MODEL_DIR / "registry.json").read_text("utf-8"))
    return {r["id"]: MODEL_DIR / r["onnx"] for r in data["models"] if (MODEL_DIR / r["onnx"]).is_file()}


ENTRIES = _bundled_entries()
MODEL_IDS = [e["id"] for e in ENTRIES]


# --- graph surgery ------------------------------------------------------------------------------------------


class NotApplicable(Exception):
    """This mutation cannot be built from this model (reported as a skip naming why)."""


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def _append(model: onnx.ModelProto, op: str, operand: np.ndarray | float, output: str) -> onnx.ModelProto:
    """Return a copy whose graph output ``output`` goes through ``op(output, operand)``."""
    model = _copy(model)
    graph = model.graph
    pre = f"{output}__pre_{op}_{len(graph.node)}"
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == output:
                node.output[i] = pre
    const = f"mutant_{op}_{len(graph.initializer)}"
    graph.initializer.append(numpy_helper.from_array(np.asarray(operand, np.float32).reshape(-1), const))
    graph.node.append(helper.make_node(op, [pre, const], [output], name=f"mutant_{op}_{len(graph.node)}"))
    return model


def _outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def mut_affine(ctx: Context) -> onnx.ModelProto:
    """0.5·y + 10 on every output: PLCC 1.0, so only the gain/offset check can see it."""
    model = ctx.int8
    for name in _outputs(model):
        model = _append(_append(model, "Mul", 0.5, name), "Add", 10.0, name)
    return model


def mut_constant(ctx: Context) -> onnx.ModelProto:
    """y·0 + 0.5: a constant output."""
    model = ctx.int8
    for name in _outputs(model):
        model = _append(_append(model, "Mul", 0.0, name), "Add", 0.5, name)
    return model


def mut_nan(ctx: Context) -> onnx.ModelProto:
    """y + NaN everywhere."""
    model = ctx.int8
    for name in _outputs(model):
        model = _append(model, "Add", float("nan"), name)
    return model


def mut_noise(ctx: Context) -> onnx.ModelProto:
    """y + σ·sin(flatten(x) @ W): deterministic pseudo-noise per sample and element, σ = 0.5 × std of the
    compared signal (the fp32 output, or its residual for quant_compare 'residual')."""
    model = _copy(ctx.int8)
    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise NotApplicable("noise mutation is built for one input and one output")
    x = graph.input[0].name
    y = graph.output[0].name
    in_size = int(np.prod(ctx.fixture[x].shape[1:]))
    out_size = int(np.prod(ctx.fp32_out.shape[1:]))
    rng = np.random.default_rng(1234)
    # scale so the argument of sin spans many periods: its values are then close to independent, uniform draws
    w = rng.normal(0.0, 50.0 / np.sqrt(in_size), size=(in_size, out_size)).astype(np.float32)
    sigma = 0.5 * ctx.signal_std / np.sqrt(0.5)  # std of sin(uniform phase) is 1/√2
    pre = f"{y}__pre_noise"
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == y:
                node.output[i] = pre
    graph.initializer.extend([
        numpy_helper.from_array(w, "noise_w"),
        numpy_helper.from_array(np.array([sigma], np.float32), "noise_sigma"),
    ])
    graph.node.extend([
        helper.make_node("Flatten", [x], ["noise_flat"], axis=1),
        helper.make_node("MatMul", ["noise_flat", "noise_w"], ["noise_arg"]),
        helper.make_node("Sin", ["noise_arg"], ["noise_sin"]),
        helper.make_node("Mul", ["noise_sin", "noise_sigma"], ["noise_scaled"]),
        helper.make_node("Shape", [pre], ["noise_shape"]),
        helper.make_node("Reshape", ["noise_scaled", "noise_shape"], ["noise"]),
        helper.make_node("Add", [pre, "noise"], [y]),
    ])
    return model


def _float_inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}


def _consumers(model: onnx.ModelProto) -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            used.setdefault(name, []).append(node.name or node.op_type)
    return used


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(init).dtype), name))
            return
    raise KeyError(name)


def swap_pair(model: onnx.ModelProto) -> tuple[str, str, bool]:
    """Return the two float initializers of different layers to swap: same shape (or 2-D transposes of each
    other), weights (rank >= 2) before biases, largest first; the flag says whether the swap transposes."""
    inits = _float_inits(model)
    used = _consumers(model)
    names = [n for n, a in inits.items() if a.size > 1 and n in used]
    best: tuple[tuple[int, int], str, str, bool] | None = None
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if set(used[a]) & set(used[b]):
                continue  # same layer
            va, vb = inits[a], inits[b]
            if va.shape == vb.shape:
                transposed = False
            elif va.ndim == 2 and va.shape == vb.shape[::-1]:
                transposed = True
            else:
                continue
            if np.allclose(va, vb.T if transposed else vb):
                continue
            rank = (int(va.ndim >= 2), va.size)
            if best is None or rank > best[0]:
                best = (rank, a, b, transposed)
    if best is None:
        raise NotApplicable("no two layers have weights of the same (or transposed) shape")
    return best[1], best[2], best[3]


def mut_swap(ctx: Context) -> onnx.ModelProto:
    """Two layers' parameters swapped in the fp32-derived graph (same shape, or transposed 2-D)."""
    model = _copy(ctx.fp32)
    a, b, transposed = swap_pair(model)
    inits = _float_inits(model)
    _set_init(model, a, inits[b].T if transposed else inits[b])
    _set_init(model, b, inits[a].T if transposed else inits[a])
    ctx.notes["swap"] = f"{a} <-> {b}{' (transposed)' if transposed else ''}"
    return model


def mut_round4(ctx: Context) -> onnx.ModelProto:
    """Every weight (rank >= 2) of the fp32 graph rounded to 4 bits: symmetric, per tensor, 15 levels."""
    model = _copy(ctx.fp32)
    count = 0
    for name, value in _float_inits(model).items():
        if value.ndim < 2:
            continue
        step = float(np.max(np.abs(value))) / 7.0
        if step > 0:
            _set_init(model, name, np.clip(np.round(value / step), -7, 7) * step)
            count += 1
    if not count:
        raise NotApplicable("no weight tensors")
    return model


def scale_to_double(model: onnx.ModelProto) -> str:
    """Return the scale initializer of the first quantised weight, in graph order.

    QDQ graphs: the scale of a DequantizeLinear whose data input is an initializer (a weight; activation
    scales are shared by a QuantizeLinear/DequantizeLinear pair, so doubling one only coarsens rounding).
    Dynamic graphs: the ``*_scale`` initializer that ORT multiplies into a MatMulInteger/ConvInteger result.
    """
    inits = {i.name: i for i in model.graph.initializer}
    integer = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and len(node.input) > 1 \
                and node.input[1] in inits:
            weight = inits[node.input[0]]
            if weight.data_type in integer and len(weight.dims) >= 2:
                return node.input[1]
    for node in model.graph.node:
        if node.op_type in ("MatMulInteger", "ConvInteger") and node.input[1] in inits:
            weight = node.input[1]
            stem = weight.removesuffix("_quantized")
            if f"{stem}_scale" in inits:
                return f"{stem}_scale"
    raise NotApplicable("no weight quantisation scale initializer in the int8 graph")


def mut_scale2(ctx: Context) -> onnx.ModelProto:
    """A weight quantisation scale of the real int8 sidecar multiplied by 2."""
    model = _copy(ctx.int8)
    name = scale_to_double(model)
    value = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)
    _set_init(model, name, value * 2)
    ctx.notes["scale2"] = name
    return model


def _io_signature(model: onnx.ModelProto) -> tuple[Any, ...]:
    def dims(vi: Any) -> tuple[Any, ...]:
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)

    return (tuple((i.name, i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input),
            tuple((o.name, o.type.tensor_type.elem_type, dims(o)) for o in model.graph.output))


def mut_other_model(ctx: Context) -> onnx.ModelProto:
    """Another bundled fp32 model with the same inputs and outputs, else the same graph with its weights
    shuffled (a seeded permutation of each weight tensor: the same architecture with other weights)."""
    want = _io_signature(ctx.fp32)
    for other_id, path in sorted(_all_bundled_fp32().items()):
        if other_id == ctx.entry_id:
            continue
        other = onnx.load(str(path))
        if _io_signature(other) == want:
            ctx.notes["other_model"] = f"bundled {other_id}"
            return other
    model = _copy(ctx.fp32)
    rng = np.random.default_rng(99)
    for name, value in _float_inits(model).items():
        if value.ndim >= 2:
            _set_init(model, name, rng.permutation(value.ravel()).reshape(value.shape))
    ctx.notes["other_model"] = "same architecture, weights shuffled"
    return model


def mut_input_name(ctx: Context) -> onnx.ModelProto:
    """The int8 graph's first input renamed."""
    model = _copy(ctx.int8)
    old = model.graph.input[0].name
    new = f"{old}_renamed"
    model.graph.input[0].name = new
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    return model


def mut_input_shape(ctx: Context) -> onnx.ModelProto:
    """The int8 graph's first input declared with another batch axis (fixed 1 instead of symbolic, or 7)."""
    model = _copy(ctx.int8)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if dim.HasField("dim_value"):
        dim.dim_value = dim.dim_value + 7
    else:
        dim.Clear()
        dim.dim_value = 1
    return model


@dataclass(frozen=True)
class Mutation:
    name: str
    build: Callable[[Context], onnx.ModelProto]
    expect: str  # "fail" | "error"
    kinds: frozenset[str]  # allowed GateResult.kind for a fail; error class name for an error
    message: str  # substring the reason must hold


def mut_identity(ctx: Context) -> onnx.ModelProto:
    """The fp32 model named as its own sidecar: drop 0, passes every budget, quantises nothing."""
    return ctx.fp32


MUTATIONS = [
    Mutation("affine 0.5y+10", mut_affine, "fail", frozenset({"affine"}), "gain/offset error exceeds"),
    Mutation("constant output", mut_constant, "fail", frozenset({"constant"}), "is constant"),
    Mutation("NaN output", mut_nan, "fail", frozenset({"nonfinite"}), "NaN"),
    Mutation("noise 0.5 std", mut_noise, "fail", frozenset({"drop", "relative"}), "drop"),
    Mutation("layers swapped", mut_swap, "fail", frozenset(BUDGET_KINDS), ""),
    Mutation("weights 4-bit", mut_round4, "fail", frozenset(BUDGET_KINDS), ""),
    Mutation("weight scale x2", mut_scale2, "fail", frozenset(BUDGET_KINDS), ""),
    Mutation("other model", mut_other_model, "fail", frozenset(BUDGET_KINDS), ""),
    Mutation("fp32 as its own sidecar", mut_identity, "fail", frozenset({"lineage"}), "not a quantised sidecar"),
    Mutation("input renamed", mut_input_name, "error", frozenset({"SignatureMismatchError"}), "differ from the fp32"),
    Mutation("input shape", mut_input_shape, "error", frozenset({"SignatureMismatchError"}), "the fp32 graph has"),
]
MUTATION_NAMES = [m.name for m in MUTATIONS]


# --- the temp project and the gate runs ------------------------------------------------------------------------


@dataclass
class Context:
    """What a mutation is built from: the bundled entry's graphs, fixture and fp32 outputs."""

    entry_id: str
    raw: dict[str, Any]
    fp32: onnx.ModelProto
    int8: onnx.ModelProto
    fixture: dict[str, np.ndarray]
    fp32_out: np.ndarray
    signal_std: float
    notes: dict[str, str]


@dataclass(frozen=True)
class Cell:
    """One corpus outcome: status pass/fail/error/skip, the result kind or error class, and the message."""

    status: str
    kind: str
    message: str
    note: str = ""


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class Corpus:
    """Builds the temp project lazily, one (model, mutation) at a time, and caches every outcome."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model_dir = root / "model"
        self.fixtures_dir = root / "fixtures"
        self.model_dir.mkdir()
        self.fixtures_dir.mkdir()
        self.contexts: dict[str, Context] = {}
        self.cells: dict[tuple[str, str], Cell] = {}
        self.healthy: dict[str, list[Any]] = {}

    def context(self, entry_id: str) -> Context:
        if entry_id in self.contexts:
            return self.contexts[entry_id]
        import onnxruntime as ort

        raw = next(e for e in ENTRIES if e["id"] == entry_id)
        int8_rel = raw.get("int8_onnx", raw["onnx"].removesuffix(".onnx") + ".int8.onnx")
        fixture_rel = raw.get("soak_fixture", f"{entry_id}.npz")
        fixture = _load_npz(FIXTURES_DIR / fixture_rel)
        shutil.copy(MODEL_DIR / raw["onnx"], self.model_dir / f"{entry_id}.onnx")
        shutil.copy(FIXTURES_DIR / fixture_rel, self.fixtures_dir / f"{entry_id}.npz")
        if raw.get("quant_calibration_set"):
            shutil.copy(FIXTURES_DIR / raw["quant_calibration_set"], self.fixtures_dir / f"{entry_id}.calib.npz")
        fp32 = onnx.load(str(MODEL_DIR / raw["onnx"]))
        int8 = onnx.load(str(MODEL_DIR / int8_rel))
        session = ort.InferenceSession(str(MODEL_DIR / raw["onnx"]), providers=["CPUExecutionProvider"])
        feed = {i.name: fixture[i.name] for i in session.get_inputs()}
        out = session.run(None, feed)[0].astype(np.float64)
        signal = out
        if raw.get("quant_compare") == "residual":
            name = raw.get("quant_residual_input", session.get_inputs()[0].name)
            signal = out - fixture[name].astype(np.float64).reshape(out.shape)
        ctx = Context(entry_id, raw, fp32, int8, fixture, out, float(np.std(signal)), {})
        self.contexts[entry_id] = ctx
        return ctx

    def entry(self, entry_id: str, suffix: str, sidecar: onnx.ModelProto | None) -> dict[str, Any]:
        """Write the sidecar and return a pinned registry entry ``<id>__<suffix>`` for it."""
        ctx = self.context(entry_id)
        mutant_id = f"{entry_id}__{suffix}"
        int8_name = f"{mutant_id}.int8.onnx"
        if sidecar is None:
            shutil.copy(MODEL_DIR / ctx.raw.get("int8_onnx", ctx.raw["onnx"].removesuffix(".onnx") + ".int8.onnx"),
                        self.model_dir / int8_name)
        else:
            onnx.save(sidecar, str(self.model_dir / int8_name))
        entry = {k: v for k, v in ctx.raw.items() if k not in PATH_KEYS}
        entry.update(id=mutant_id, onnx=f"{entry_id}.onnx", int8_onnx=int8_name,
                     soak_fixture=f"{entry_id}.npz",
                     sha256=sha256_file(self.model_dir / f"{entry_id}.onnx"),
                     int8_sha256=sha256_file(self.model_dir / int8_name))
        if ctx.raw.get("quant_calibration_set"):
            entry["quant_calibration_set"] = f"{entry_id}.calib.npz"
        return entry

    def gate(self, entry: dict[str, Any], note: str = "") -> Cell:
        """Run the gate on one entry as ``quantgate measure`` does (prepare, evaluate); return its Cell."""
        from pytest_quantgate.runner import gate
        from pytest_quantgate.errors import InputError
        from pytest_quantgate.io.registry import parse_registry
        from pytest_quantgate.settings import Settings

        path = self.model_dir / f"registry-{entry['id']}.json"
        data = {"schema_version": 1, "models": [entry]}
        path.write_text(json.dumps(data, indent=2))
        registry = parse_registry(data, path)
        assert not registry.problems, registry.problems
        settings = Settings(enabled=True, registry=path, fixtures_dir=self.fixtures_dir, eps=("cpu",),
                            regen="never")
        try:
            result = gate.evaluate(gate.prepare(registry, registry.entries[0], "cpu", settings), settings)
        except InputError as exc:
            return Cell("error", type(exc).__name__, str(exc), note)
        return Cell(result.verdict.lower(), result.kind, result.reason, note)

    def cell(self, entry_id: str, mutation: Mutation) -> Cell:
        key = (entry_id, mutation.name)
        if key in self.cells:
            return self.cells[key]
        ctx = self.context(entry_id)
        suffix = mutation.name.replace(" ", "_").replace(".", "").replace("+", "p")
        try:
            sidecar = mutation.build(ctx)
        except NotApplicable as exc:
            self.cells[key] = cell = Cell("skip", "-", str(exc))
            return cell
        note = ctx.notes.get(mutation.build.__name__.removeprefix("mut_"), "")
        cell = self.gate(self.entry(entry_id, suffix, sidecar), note)
        self.cells[key] = cell
        return cell


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("mutations"))


pytestmark = pytest.mark.skipif(not ENTRIES, reason="no bundled gated model with its sidecar and fixture")


@pytest.mark.parametrize("entry_id", MODEL_IDS)
@pytest.mark.parametrize("mutation", MUTATIONS, ids=MUTATION_NAMES)
def test_gate_rejects_mutant(corpus: Corpus, entry_id: str, mutation: Mutation) -> None:
    cell = corpus.cell(entry_id, mutation)
    if cell.status == "skip":
        pytest.skip(cell.message)
    if mutation.expect == "error":
        assert cell.status == "error", cell
        assert cell.kind in mutation.kinds, cell
        assert mutation.message in cell.message, cell
    else:
        assert cell.status == "fail", cell
        assert cell.kind in mutation.kinds, cell
        assert mutation.message in cell.message, cell


def _resampled(fixture: Any, seed: int) -> Any:
    """Return the fixture with its samples drawn with replacement (a bootstrap resample), seeded."""
    index = np.random.default_rng(seed).integers(0, fixture.samples, fixture.samples)
    target = None if fixture.target is None else fixture.target_array()[index]
    return replace(fixture, inputs={k: v[index] for k, v in fixture.inputs.items()}, target=target)


@pytest.mark.parametrize("entry_id", MODEL_IDS)
def test_healthy_sidecar_passes_on_30_resampled_fixtures_without_a_flip(corpus: Corpus, entry_id: str) -> None:
    """The bundled sidecar passes on its fixture and on 30 bootstrap resamples of it (seeds 0..29), each run
    through both models again (dynamic quantisation picks activation scales per batch, so outputs of a
    resampled fixture are not a resample of the outputs)."""
    from pytest_quantgate.runner import gate

    entry = corpus.entry(entry_id, "healthy", None)
    full = corpus.gate(entry)
    assert full.status == "pass", full
    registry_path = corpus.model_dir / f"registry-{entry['id']}.json"
    from pytest_quantgate.io.registry import load_registry
    from pytest_quantgate.settings import Settings

    registry = load_registry(registry_path)
    settings = Settings(enabled=True, registry=registry_path, fixtures_dir=corpus.fixtures_dir, eps=("cpu",),
                        regen="never", bootstrap=200)
    prepared = gate.prepare(registry, registry.entries[0], "cpu", settings)
    verdicts = []
    for seed in range(RESAMPLES):
        # the resampled fixture streams through both models exactly as the gate runs them
        result = gate.evaluate(replace(prepared, fixture=_resampled(prepared.fixture, seed)), settings)
        verdicts.append((seed, result.verdict, result.kind, round(result.drop, 6)))
    flips = [v for v in verdicts if v[1] != "PASS"]
    assert not flips, f"{entry_id}: verdict flips on resampled fixtures {flips} (all: {verdicts})"
    corpus.healthy[entry_id] = verdicts


def _table(corpus: Corpus) -> list[str]:
    cols = MODEL_IDS
    header = ["mutation", *cols]
    rows = [header]
    for mutation in MUTATIONS:
        row = [mutation.name]
        for entry_id in cols:
            cell = corpus.cell(entry_id, mutation)
            row.append(f"{cell.status.upper()} ({cell.kind})" if cell.status != "skip" else "n/a")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("")
    for mutation in MUTATIONS:
        for entry_id in cols:
            cell = corpus.cell(entry_id, mutation)
            note = f" [{cell.note}]" if cell.note else ""
            reason = cell.message.replace(str(corpus.root), "<tmp>")
            lines.append(f"- {mutation.name} × {entry_id}{note}: {reason[:220]}")
    return lines


def test_print_corpus_table(corpus: Corpus, capsys: pytest.CaptureFixture[str]) -> None:
    """Print the corpus (mutation × model → verdict (kind), then each reason) to the terminal."""
    lines = _table(corpus)
    with capsys.disabled():
        print("\n\nquantgate mutation corpus (mutation × bundled model → verdict (kind))")
        print("\n".join(lines))
    failing = [line for line in lines[2:len(MUTATIONS) + 2] if "PASS" in line]
    assert not failing, failing
