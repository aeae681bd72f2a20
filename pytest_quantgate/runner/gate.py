"""The gate for one entry on one EP, independent of pytest: check inputs, stream both models, decide.

:func:`run_one` is the one orchestrator: it rebuilds a missing sidecar, consults the cache, checks and
opens everything (:func:`prepare`), streams the fixture through both models (:func:`evaluate`), diagnoses a
failure and applies the strict rules. pytest items, ``quantgate measure`` and ``quantgate pre-commit`` only
translate its :class:`Outcome`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..engine.comparison import Breach, Collector, CompareOptions, plan_outputs, with_breaches
from ..engine.providers import SessionSpec, open_session
from ..engine.sessions import check_signatures, run, signature
from ..errors import FixtureError, HashMismatchError, InsufficientSamplesError, ModelFileError
from ..fileio import sha256_file
from ..io.registry import DEFAULT_MIN_SAMPLES, Entry, Registry
from ..io.soak import FeedPlan, Fixture, TensorSpec, find_fixture, load_fixture, plan_feeds
from ..records import (
    INCONCLUSIVE,
    FileRef,
    Focus,
    GateResult,
    LineageRecord,
    Outcome,
    PlotData,
    Provenance,
    SequentialRecord,
    Status,
    Timing,
)
from ..settings import Settings

if TYPE_CHECKING:
    import onnxruntime as ort

    from ..producers.base import Assess


@dataclass(frozen=True)
class Prepared:
    """Everything checked and loaded for one (entry, EP): ready to run."""

    entry: Entry
    ep: str
    fp32_path: Path
    int8_path: Path
    fp32_sha256: str
    int8_sha256: str
    fixture: Fixture
    plan: FeedPlan
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    fp32: ort.InferenceSession
    int8: ort.InferenceSession


def check_model_file(path: Path, role: str, entry: Entry, registry: Registry) -> frozenset[str]:
    """Refuse a missing, empty or unsafe ONNX file before ORT sees it."""
    if not path.exists():
        raise ModelFileError(f"{registry.path}: entry {entry.id!r}: {role} model {path} does not exist")
    if not path.is_file():
        raise ModelFileError(f"{registry.path}: entry {entry.id!r}: {role} model {path} is not a file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{registry.path}: entry {entry.id!r}: {role} model {path} is empty")
    return check_external_data(path)


def check_external_data(path: Path) -> frozenset[str]:
    """Refuse an ONNX file whose external data points outside its own folder (or cannot be parsed).

    Returns the names of graph inputs that declare no shape at all: ORT reports them as rank 0, like scalars.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for garbage and truncated files
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    folder = path.parent.resolve()
    for tensor in _all_tensors(model.graph):
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            target = (path.parent / location).resolve()
            if Path(location).is_absolute() or not target.is_relative_to(folder):
                raise ModelFileError(
                    f"{path}: initializer {tensor.name!r} reads external data from {location!r}, outside {folder}"
                )
    return frozenset(i.name for i in model.graph.input
                     if i.type.HasField("tensor_type") and not i.type.tensor_type.HasField("shape"))


def _all_tensors(graph: Any) -> Iterator[Any]:
    """Yield every initializer and attribute tensor of a graph, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def check_hash(path: Path, pinned: str | None, field: str, entry: Entry, registry: Registry) -> str:
    """Return the file's sha256; raise HashMismatchError when it differs from the pinned value."""
    actual = sha256_file(path)
    if pinned is not None and actual.lower() != pinned.lower():
        raise HashMismatchError(
            f"{registry.path}: entry {entry.id!r} field {field!r}: {path} has sha256 {actual}, "
            f"the registry pins {pinned.lower()}; if the file change is intended, re-pin with "
            f"`quantgate pin {registry.path} --id {entry.id}`"
        )
    return actual


def prepare(registry: Registry, entry: Entry, ep: str, settings: Settings, *, int8_pinned: bool = True,
            int8_path: Path | None = None) -> Prepared:
    """Check files, hashes, fixture and EP, and open both sessions; raise an InputError subclass on bad input.

    ``int8_pinned=False`` skips the int8 hash check for a sidecar this run rebuilt (its pin is reported apart);
    ``int8_path`` gates another file than the entry's sidecar (a build not yet published).
    """
    fp32_path = registry.fp32_path(entry)
    int8_path = int8_path if int8_path is not None else registry.int8_path(entry)
    unshaped = check_model_file(fp32_path, "fp32", entry, registry)
    check_model_file(int8_path, "int8", entry, registry)
    fp32_sha = check_hash(fp32_path, entry.sha256, "sha256", entry, registry)
    int8_sha = check_hash(int8_path, entry.int8_sha256 if int8_pinned else None, "int8_sha256", entry, registry)
    fixture = load_fixture(find_fixture(registry.soak_candidates(entry, settings.fixtures_dir)),
                           settings.max_fixture_bytes)
    check_sample_ceiling(fixture, fixture.samples, settings.max_samples)  # read off the headers: nothing has run
    spec = SessionSpec(ep, settings.ep_options)
    fp32 = open_session(fp32_path, spec, threads=settings.threads)
    int8 = open_session(int8_path, spec, threads=settings.threads)
    check_signatures(fp32, int8, str(fp32_path), str(int8_path))
    inputs, outputs = signature(fp32, unshaped)
    plan = plan_feeds(fixture, inputs, settings.batch_size)
    floor = entry.min_samples if entry.min_samples is not None else DEFAULT_MIN_SAMPLES
    if plan.samples < floor:
        field = "quant_min_samples" if entry.min_samples is not None else "the default sample floor"
        raise InsufficientSamplesError(
            f"{fixture.path}: {plan.samples} sample(s); entry {entry.id!r} needs at least {floor} ({field}): "
            f"a smaller fixture cannot bound the drop, add samples"
        )
    return Prepared(entry, ep, fp32_path, int8_path, fp32_sha, int8_sha, fixture, plan, inputs, outputs, fp32, int8)


def check_sample_ceiling(fixture: Fixture, samples: int, ceiling: int) -> None:
    """Refuse a fixture with more samples than ``--quantgate-max-samples`` (0: no ceiling), before anything runs."""
    if ceiling and samples > ceiling:
        raise FixtureError(
            f"{fixture.path}: {samples} samples, over the ceiling of {ceiling} (--quantgate-max-samples, ini "
            f"quantgate_max_samples, `quantgate measure --max-samples`; 0 lifts it): the gate's memory stays bounded "
            f"whatever the count, but every sample runs through both models; gate a subset written with numpy.savez"
        )


# outputs of one chunk (per model) are kept under this many bytes, and chunks under CHUNK_ROWS samples: ORT's
# arena grows to the largest run's intermediates, so small fixed chunks keep peak memory flat as samples grow
CHUNK_BYTES = 4 << 20
CHUNK_ROWS = 64
DIAGNOSIS_SAMPLES = 4


def run_batch(p: Prepared) -> int | None:
    """Return the batch each session run must have: fixed by the model, or the entry's deployment batch."""
    if not p.plan.batched:
        return None
    if p.plan.fixed_batch:
        return p.plan.batch
    return p.entry.deploy_batch


@dataclass
class _Clock:
    fp32: float = 0.0
    int8: float = 0.0
    runs: int = 0
    samples: int = 0


def _check_finite(block: Mapping[str, np.ndarray], start: int, where: Path) -> None:
    for name, value in block.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(np.size(value) - np.isfinite(value).sum())
            raise FixtureError(f"{where}: array {name!r} holds {bad} NaN/inf value(s) in samples {start}.."
                               f"{start + value.shape[0] - 1}; soak inputs must be finite")


@dataclass(frozen=True)
class _Part:
    """Consecutive samples of one chunk whose outputs have the same shapes: folded into the statistics together."""

    rows: slice  # the samples, within the chunk
    fp32: dict[str, np.ndarray]
    int8: dict[str, np.ndarray]


def _run_chunk(p: Prepared, block: Mapping[str, np.ndarray], batch: int | None, clock: _Clock, start: int
               ) -> list[_Part]:
    """Run both models over one chunk; return their outputs (samples on axis 0) in parts of one shape each.

    A model whose output shape depends on the input's values (NonZero, Compress, a detector's kept boxes) gives
    each run its own shape: such runs cannot be stacked, so each becomes a part of its own. The statistics are
    per-sample sums, so folding a chunk part by part gives the same verdict as folding it whole.
    """
    count = int(next(iter(block.values())).shape[0])
    block = {spec.name: block[spec.name] for spec in p.inputs}  # extra arrays (masks) are never fed
    if p.plan.batched:
        step = batch or count
        spans = [(i, min(i + step, count)) for i in range(0, count, step)]
        feeds = [{k: v[lo:hi] for k, v in block.items()} for lo, hi in spans]
    else:
        spans = [(i, i + 1) for i in range(count)]
        feeds = [{k: v[i] for k, v in block.items()} for i in range(count)]
    # consecutive runs whose outputs have the same shapes beyond axis 0, joined once at the end: (rows, fp32, int8)
    groups: list[tuple[slice, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]] = []
    for (lo, hi), feed in zip(spans, feeds):
        got: list[dict[str, np.ndarray]] = []
        for session, label, attr in ((p.fp32, str(p.fp32_path), "fp32"), (p.int8, str(p.int8_path), "int8")):
            outs, seconds = run(session, p.outputs, feed, label)
            setattr(clock, attr, getattr(clock, attr) + seconds)
            for name, out in outs.items():
                if p.plan.batched and (out.ndim == 0 or out.shape[0] != hi - lo):
                    raise FixtureError(
                        f"{label}: output {name!r} has shape {out.shape} for a batch of {hi - lo}; the model does "
                        f"not keep the batch axis, so stack one model input per sample (add a leading axis)"
                    )
            got.append(outs if p.plan.batched else {name: out[None, ...] for name, out in outs.items()})
        clock.runs += 1
        fp32_out, int8_out = got
        _check_pairable(p, fp32_out, int8_out, start + lo, start + hi)
        if groups and all(groups[-1][1][0][n].shape[1:] == v.shape[1:] for n, v in fp32_out.items()):
            rows, fp32_runs, int8_runs = groups[-1]
            groups[-1] = (slice(rows.start, hi), fp32_runs, int8_runs)
            fp32_runs.append(fp32_out)
            int8_runs.append(int8_out)
        else:
            groups.append((slice(lo, hi), [fp32_out], [int8_out]))
    return [_Part(rows, _joined(fp32_runs), _joined(int8_runs)) for rows, fp32_runs, int8_runs in groups]


def _joined(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: value if len(runs) == 1 else np.concatenate([r[name] for r in runs], axis=0)
            for name, value in runs[0].items()}


def _check_pairable(p: Prepared, fp32: Mapping[str, np.ndarray], int8: Mapping[str, np.ndarray], lo: int,
                    hi: int) -> None:
    """Refuse a run whose int8 output has another shape than fp32's: its values cannot be paired one to one."""
    for name, a in fp32.items():
        b = int8[name]
        if a.shape != b.shape:
            which = f"sample {lo}" if hi - lo == 1 else f"samples {lo}..{hi - 1}"
            shapes = (b.shape[1:], a.shape[1:]) if not p.plan.batched else (b.shape, a.shape)
            raise FixtureError(
                f"{p.fixture.path}: entry {p.entry.id!r}: output {name!r} has shape {shapes[0]} from the int8 "
                f"model and {shapes[1]} from fp32 on fixture {which}; its shape depends on the values "
                f"(NonZero, NMS, a score threshold) and int8 moved one across, so the two cannot be compared value "
                f"by value: gate the model without that step (e.g. the scores before NMS), whose outputs keep "
                f"their shape"
            )


def chunk_rows(parts: list[_Part], count: int, settings: Settings, batch: int | None) -> int:
    """Return the samples of every chunk after the first (of ``count`` samples, run as ``parts``).

    Chunks hold CHUNK_BYTES of outputs, at most --quantgate-batch-size samples, whole batches of a fixed one; a
    shard run cuts the fixture on the same grid, so each model run sees the same batch as in the unsharded run.
    """
    per_sample = sum(v.nbytes for part in parts for v in part.fp32.values()) / max(count, 1)
    rows = max(1, min(settings.batch_size, CHUNK_ROWS, int(CHUNK_BYTES // max(per_sample, 1.0))))
    return max(batch, rows // batch * batch) if batch else rows


def evaluate(prepared: Prepared, settings: Settings) -> GateResult:
    """Return the verdict of one prepared (entry, EP), without a diagnosis."""
    return measure(prepared, settings)[0]


def measure(prepared: Prepared, settings: Settings) -> tuple[GateResult, Collector]:
    """Stream every soak sample through fp32 and int8 into the statistics; decide; add size and speed."""
    p = prepared
    plans = plan_outputs(p.entry, p.fixture, p.inputs, p.outputs)
    collector = Collector(p.entry, plans, p.plan.samples, settings.seed, str(p.fixture.path))
    batch = run_batch(p)
    clock = _Clock()
    # the first chunk is one run's worth (or one sample), so the output size per sample is known before the
    # chunk size is chosen: chunks then hold CHUNK_BYTES of outputs, at most --quantgate-batch-size samples
    first = batch or 1
    rows_next = [first]
    start = 0
    looks: list[int] = []  # --quantgate-sequential: the sample counts the sequence was looked at
    settled = False
    try:
        for block, target in p.fixture.chunks(lambda: rows_next[0]):
            _check_finite(block, start, p.fixture.path)
            parts = _run_chunk(p, block, batch, clock, start)
            for part in parts:
                span = part.rows
                collector.add(start + span.start, {k: v[span] for k, v in block.items()},
                              None if target is None else target[span], part.fp32, part.int8)
            count = int(next(iter(block.values())).shape[0])
            if start == 0:
                rows_next[0] = chunk_rows(parts, count, settings, batch)
            start += count
            if settings.sequential and start < p.plan.samples:
                from ..engine.comparison import look

                found = look(collector, p.ep, start, settings.confidence)
                looks += [start] if found.interval is not None else []
                if found.settled is not None:  # the sequence is valid at every look: the rest need not run
                    settled = True
                    break
    except MemoryError:
        # the statistics are bounded (streaming.Units), so what is left is a chunk or a model too large for the
        # limit: an ERROR that names the fixture and how far it got, not an "unexpected MemoryError"
        raise FixtureError(
            f"{p.fixture.path}: out of memory after {start} of {p.plan.samples} samples through {p.fp32_path.name} "
            f"and {p.int8_path.name} on {p.ep}; a smaller --quantgate-batch-size or a higher memory limit may help"
        ) from None
    clock.samples = start
    options = CompareOptions(
        bootstrap=settings.bootstrap,
        seed=settings.seed,
        confidence=settings.confidence,
        decision="three-way" if settings.sequential else settings.decision,
        strict=settings.strict,
        sequential=settings.sequential,
    )
    result = collector.decide(p.ep, options)
    if settings.sequential:
        from ..engine.sequential import METHOD, MIN_LOOK

        result = replace(result, sequential=SequentialRecord(METHOD, start, p.plan.samples, len(looks) + (
            0 if settled else 1), settled, MIN_LOOK))
    result = with_lineage(result, p)
    result = with_kernel_warning(result, p, settings)
    result = replace(result, timing=speed_and_size(p, clock, batch), provenance=provenance(p, settings))
    if settings.html is not None:
        result = replace(result, plot=plot_data(p, collector, result),
                         focus_plot=focus_plot_data(p, collector, result))
    return check_speed(result, p.entry), collector


def with_kernel_warning(result: GateResult, p: Prepared, settings: Settings) -> GateResult:
    """Warn when the drop was measured with onnxruntime's saturating int8 kernels (fast mode on a CPU without VNNI)."""
    text = kernel_warning(p, settings)
    if text is None:
        return result
    return replace(result, warnings=(text, *result.warnings))  # first: the strict rule quotes the last one


def kernel_warning(p: Prepared, settings: Settings) -> str | None:
    """Return the warning of onnxruntime's saturating int8 kernels on this CPU, or None where they do not apply."""
    from .. import system

    if settings.ep_options.int8_precision != "fast" or p.ep == "openvino" or not system.int8_saturates():
        return None
    return ("--quantgate-int8-precision fast on an x86 CPU without VNNI: onnxruntime's default int8 kernels can "
            "saturate U8S8/S8S8 products here, so a CPU with VNNI may measure another drop; 'exact' gives the "
            "result every CPU computes")


def with_lineage(result: GateResult, p: Prepared) -> GateResult:
    """Add the lineage check: the sidecar must be quantised from *this* fp32 model (``lineage.py``).

    Budget breaches keep the lead (they say what the sidecar does wrong); a sidecar that meets every budget but
    is not derived from the fp32 (the fp32 file itself, another model, one built from an older fp32) fails
    with kind ``lineage``. ``quant_lineage: false`` turns the check off for an entry.
    """
    return apply_lineage(result, lineage_record(p), p.fp32_path.name, p.int8_path.name)


def lineage_record(p: Prepared) -> LineageRecord | None:
    """Return the lineage check of the prepared pair (None where the entry or its mode has none)."""
    if not p.entry.lineage or p.entry.mode not in ("dynamic", "static", "qat"):
        return None
    from ..analysis.lineage import check_lineage

    report = check_lineage(p.fp32_path, p.int8_path, p.entry.mode, fp32_sha256=p.fp32_sha256,
                           int8_sha256=p.int8_sha256)
    return LineageRecord(report.ok, tuple(report.reasons), report.weights_matched, report.weights_total)


def apply_lineage(result: GateResult, lineage: LineageRecord | None, fp32_name: str, int8_name: str) -> GateResult:
    """Return ``result`` with the lineage record; a sidecar not derived from the fp32 fails (kind ``lineage``)."""
    if lineage is None:
        return result
    if lineage.ok:
        return replace(result, lineage=lineage)
    reason = f"lineage: {int8_name} is not derived from {fp32_name}: " + "; ".join(lineage.reasons)
    return with_breaches(result, [Breach("lineage", reason)], lineage=lineage)


def with_diagnosis(result: GateResult, p: Prepared, collector: Collector, settings: Settings) -> GateResult:
    """Attach where the drop comes from (worst tensors by SQNR) on the samples where int8 departs most."""
    from ..analysis.diagnosis import diagnose

    picked = collector.worst_samples(DIAGNOSIS_SAMPLES, result.focus, result.kind)
    inputs = p.fixture.take(picked)
    batch = run_batch(p)
    if p.plan.batched and batch:
        feeds = [{k: v[i : i + batch] for k, v in inputs.items()} for i in range(0, len(picked), batch)
                 if i + batch <= len(picked) or not p.plan.fixed_batch]
        if p.plan.fixed_batch and not feeds:
            feeds = [{k: v for k, v in p.fixture.take(range(batch)).items()}]
    elif p.plan.batched:
        feeds = [dict(inputs)]
    else:
        feeds = [{k: v[i] for k, v in inputs.items()} for i in range(len(picked))]
    found = diagnose(p.fp32_path, p.int8_path, feeds, exact=settings.ep_options.int8_precision == "exact",
                     focus=result.focus)
    return replace(result, diagnosis=replace(found, samples=tuple(int(i) for i in picked)))


def assessor(registry: Registry, entry: Entry, fixtures_dir: Path) -> Assess:
    """Return the callback that gates a training producer's build before it is published.

    It always measures the same way -- CPU EP, exact int8 kernels, one thread, the default bootstrap and seed
    -- whatever the run's own options, so the number recorded in the sidecar depends on the build alone and
    two builds' numbers compare.
    """

    def assess(candidate: Path) -> dict[str, Any]:
        settings = Settings(enabled=True, registry=registry.path, fixtures_dir=fixtures_dir, eps=("cpu",),
                            regen="never", diagnose="off", threads=1)
        try:
            prepared = prepare(registry, entry, "cpu", settings, int8_pinned=False, int8_path=candidate)
            result = evaluate(prepared, settings)
        except Exception as exc:  # the build stays usable; its record says why it has no drop
            message = (str(exc).strip().splitlines() or [""])[0].replace(str(candidate.parent), "")
            return {"error": f"{type(exc).__name__}: {message}"[:300]}
        gate: dict[str, Any] = {"ep": "cpu", "int8_precision": settings.ep_options.int8_precision,
                                "verdict": str(result.verdict), "budget": result.budget, "samples": result.samples,
                                "fixture": prepared.fixture.path.name, "fixture_sha256": prepared.fixture.sha256,
                                "bootstrap": settings.bootstrap, "seed": settings.seed,
                                "confidence": settings.confidence, "drop": result.drop}
        if result.interval is not None:
            gate["drop_interval"] = [result.interval.low, result.interval.high]
        return gate

    return assess


def speed_and_size(p: Prepared, clock: _Clock, batch: int | None) -> Timing:
    """Return on-disk bytes and the latency per sample of both models, from the gate's own runs.

    Both models ran the same feeds, so the ratio of their total run times is the speed-up; it has a value
    however few runs there were (the first run's warm-up is in both totals).
    """
    samples = max(clock.samples, 1)
    return Timing(fp32_bytes=p.fp32_path.stat().st_size, int8_bytes=p.int8_path.stat().st_size,
                  fp32_ms=clock.fp32 * 1000.0 / samples, int8_ms=clock.int8 * 1000.0 / samples,
                  speedup=clock.fp32 / clock.int8 if clock.int8 > 0 else None, batch=batch, runs=clock.runs)


def check_speed(result: GateResult, entry: Entry) -> GateResult:
    """Fail a sidecar slower than the entry's optional ``quant_min_speedup`` (off by default)."""
    minimum = entry.min_speedup
    timing = result.timing
    if minimum is None or timing is None or timing.speedup is None or timing.speedup >= minimum:
        return result
    reason = (f"int8 speedup x{timing.speedup:.2f} (fp32 {timing.fp32_ms:.3f} ms vs int8 "
              f"{timing.int8_ms:.3f} ms per sample) is below quant_min_speedup x{minimum:g}")
    return with_breaches(result, [Breach("speed", reason)])


def provenance(p: Prepared, settings: Settings) -> Provenance:
    """Return what produced this verdict: files and hashes, EP and options, onnxruntime, CPU, time."""
    from .. import __version__, system
    from ..engine import providers

    return Provenance(
        fp32=FileRef(str(p.fp32_path), p.fp32_sha256),
        int8=FileRef(str(p.int8_path), p.int8_sha256),
        fixture=FileRef(str(p.fixture.path), p.fixture.sha256),
        ep=p.ep,
        providers=tuple(str(x) for x in p.int8.get_providers()),
        provider_options=p.int8.get_provider_options(),
        onnxruntime=providers.ort_distribution(),
        graph_optimization_level="ORT_ENABLE_ALL",
        quantgate=__version__,
        bootstrap=settings.bootstrap,
        seed=settings.seed,
        decision=settings.decision,
        system=system.describe(),
        session_config=SessionSpec(p.ep, settings.ep_options).config_entries(),
    )


def plot_data(p: Prepared, collector: Collector, result: GateResult) -> PlotData:
    """Return the HTML report's plot data for the worst output, as compared, from the bounded reservoir."""
    values = [r for r in result.outputs if r.labels is None]
    name = max(values, key=lambda r: r.drop).name if values else p.outputs[0].name
    kept = collector.reservoir(name)
    target = kept[:, 2] if kept.size and np.isfinite(kept[:, 2]).all() else None
    return plot_points(name, kept[:, 0], kept[:, 1], target)


FOCUS_PLOT_SAMPLES = 64  # samples rerun for the plot of what failed: its memory stays that of 64 samples


def focus_plot_data(p: Prepared, collector: Collector, result: GateResult) -> PlotData | None:
    """Return the plot of what failed (the focused channels or classes, the masked positions), or None.

    The reservoir keeps whole-output values only, so the samples where the focus departs most are run again
    through both models. Nothing here may fail the item: any problem leaves the report without this plot.
    """
    if result.focus is None:
        return None
    try:
        return _focus_plot(p, collector, result.focus, result.kind)
    except Exception:  # the plot is an aid; the verdict and the rest of the report stand without it
        return None


def _focus_plot(p: Prepared, collector: Collector, focus: Focus, kind: str | None = None) -> PlotData | None:
    plan = next((plan for plan in collector.plans if plan.spec.name == focus.output), None)
    if plan is None or (not focus.channels and plan.mask is None):
        return None  # the whole-output plot already shows it
    picked = sorted(set(collector.worst_samples(FOCUS_PLOT_SAMPLES, focus, kind)))
    batch = run_batch(p)
    if p.plan.fixed_batch and batch:
        # the model takes only whole batches: keep whole groups of the worst, or the first batch when too few
        picked = picked[: len(picked) // batch * batch] or list(range(min(batch, p.plan.samples)))
    if not picked:
        return None
    arrays = p.fixture.take(picked)
    inputs = {spec.name: arrays[spec.name] for spec in p.inputs}  # masks and other extras are never fed
    count = len(picked)
    if p.plan.batched:
        step = batch or count
        spans = [(lo, min(lo + step, count)) for lo in range(0, count, step)]
    else:
        spans = [(i, i + 1) for i in range(count)]
    fp32_parts: list[np.ndarray] = []
    int8_parts: list[np.ndarray] = []
    for lo, hi in spans:
        feed = {k: v[lo:hi] if p.plan.batched else v[lo] for k, v in inputs.items()}
        a, _ = run(p.fp32, p.outputs, feed, str(p.fp32_path))
        b, _ = run(p.int8, p.outputs, feed, str(p.int8_path))
        ref, test = a[focus.output], b[focus.output]
        if not p.plan.batched:
            ref, test = ref[None, ...], test[None, ...]
        if ref.shape != test.shape:
            continue  # a value-dependent shape that int8 moved: no pairing (the gate reported it)
        ref, test = np.asarray(ref, dtype=np.float64), np.asarray(test, dtype=np.float64)
        if plan.residual is not None:  # compared as output minus input: plot it that way
            base = np.asarray(arrays[plan.residual][lo:hi], dtype=np.float64).reshape(ref.shape)
            ref, test = ref - base, test - base
        keep = np.ones(ref.shape, dtype=bool)
        if plan.mask is not None:
            raw = np.asarray(arrays[plan.mask][lo:hi]) != 0
            raw = ~raw if plan.mask_invert else raw
            keep = np.broadcast_to(raw.reshape(raw.shape + (1,) * (ref.ndim - raw.ndim)), ref.shape)
        axis = focus.channel_axis
        if focus.channels and axis is not None and 0 < axis < ref.ndim and max(focus.channels) < ref.shape[axis]:
            chosen = list(focus.channels)
            ref, test, keep = (np.take(x, chosen, axis=axis) for x in (ref, test, keep))
        fp32_parts.append(ref[keep])
        int8_parts.append(test[keep])
    if not fp32_parts or not sum(x.size for x in fp32_parts):
        return None
    return plot_points(_focus_label(focus, plan.mask, plan.mask_invert), np.concatenate(fp32_parts),
                       np.concatenate(int8_parts))


def _focus_label(focus: Focus, mask: str | None, invert: bool) -> str:
    """Return e.g. ``output0[channel 9 along axis 1]`` or ``logits[where 'attention_mask' is set]``."""
    parts = []
    if focus.what:
        parts.append(focus.what)
    elif focus.channels:
        shown = ", ".join(map(str, focus.channels[:8])) + (", …" if len(focus.channels) > 8 else "")
        along = "" if focus.channel_axis is None else f" along axis {focus.channel_axis}"
        parts.append(f"{'channel' if len(focus.channels) == 1 else 'channels'} {shown}{along}")
    if mask is not None and repr(mask) not in focus.what:
        parts.append(f"where {mask!r} is {'not set' if invert else 'set'}")
    return f"{focus.output}[{'; '.join(parts)}]"


PLOT_POINTS = 2000  # points in the HTML report's scatter plots
HIST_BINS = 40


def plot_points(output: str, fp32: np.ndarray, int8: np.ndarray, target: np.ndarray | None = None, *,
              points: int = PLOT_POINTS, bins: int = HIST_BINS) -> PlotData:
    """Return the plot of one output: at most ``points`` evenly spaced values and the error histogram.

    The histogram counts every element of int8 − fp32, not only the plotted subset.
    """
    ref = np.asarray(fp32, dtype=np.float64).ravel()
    test = np.asarray(int8, dtype=np.float64).ravel()
    index = np.linspace(0, max(ref.size - 1, 0), num=min(points, ref.size)).astype(np.int64)
    err = test - ref
    err = err[np.isfinite(err)]
    clipped = 0
    if err.size:
        # a few outliers would squash the bulk into one bar: clip the 0.1 % tails into the end bins, and say so
        lo, hi = np.percentile(err, [0.1, 99.9])
        if hi > lo:
            clipped = int(np.count_nonzero((err < lo) | (err > hi)))
            err = np.clip(err, lo, hi)
    counts, edges = np.histogram(err, bins=bins) if err.size else (np.zeros(0), np.zeros(0))
    tgt = None
    if target is not None:
        t = np.asarray(target, dtype=np.float64).ravel()
        tgt = tuple(float(v) for v in t[index]) if t.size == ref.size else None
    return PlotData(output, tuple(float(v) for v in ref[index]), tuple(float(v) for v in test[index]), tgt,
                    tuple(float(v) for v in edges), tuple(int(v) for v in counts), clipped)


class CacheStore(Protocol):
    """Where passing rows are remembered between runs (pytest's cache, or a folder for the CLI)."""

    def get(self, key: str) -> GateResult | None:
        """Return the passing result stored under ``key``."""

    def set(self, key: str, result: GateResult) -> None:
        """Store a passing result."""


def run_one(registry: Registry, entry: Entry, ep: str, settings: Settings, *, run_id: str = "",
            cache: CacheStore | None = None, int8_path: Path | None = None) -> Outcome:
    """Gate one entry on one EP; every problem becomes an error or skip outcome, never an exception.

    What ONNX Runtime and its quantisation tooling log meanwhile (Python records and the C++ core's lines on
    fd 2) is captured and summarised once, in the outcome's ``log``, instead of being printed line by line.
    ``int8_path`` gates that file as the entry's sidecar (a candidate of ``quantgate advise``): its fixture,
    checks and budget, no pin to match, nothing regenerated or cached.
    """
    from ..engine.logcapture import capture_logs

    with capture_logs() as captured:
        outcome = _run_one(registry, entry, ep, settings, run_id=run_id, cache=cache, int8_path=int8_path)
    lines = captured.summary().lines()
    return replace(outcome, log=tuple(lines)) if lines else outcome


def _run_one(registry: Registry, entry: Entry, ep: str, settings: Settings, *, run_id: str,
             cache: CacheStore | None, int8_path: Path | None = None) -> Outcome:
    from ..errors import EpUnavailableError, InputError, WriteError

    regenerated: str | None = None
    notes: list[str] = []
    if int8_path is not None:  # a candidate file: nothing to rebuild, no pin, no cache
        settings, cache = replace(settings, regen="never"), None
    try:
        from . import regen

        try:
            built = None if int8_path is not None else regen.ensure_sidecar(
                registry, entry, settings, run_id, assess=assessor(registry, entry, settings.fixtures_dir))
        except WriteError as exc:
            # the error names the file; the entry and the regen policy say why it was being written
            kept = registry.int8_path(entry).is_file()
            raise WriteError(f"{registry.path}: entry {entry.id!r}: cannot rebuild the sidecar (regen "
                             f"{settings.regen!r}): {exc}" + ("; regen 'never' gates the sidecar on disk as it is"
                                                             if kept else "")) from None
        if built is not None:
            regenerated = built.note(registry, entry)
            if not built.matches_pin:
                notes.append(regenerated)
        key = None
        if cache is not None:
            from .cache import key as cache_key

            key = cache_key(registry, entry, ep, settings)
            earlier = cache.get(key) if key else None
            if earlier is not None:
                return Outcome(entry.id, ep, entry.mode, "pass", f"unchanged since a passing run (drop "
                               f"{earlier.drop}); --quantgate-cache", earlier, regenerated=regenerated, cached=True)
        prepared = prepare(registry, entry, ep, settings, int8_pinned=built is None and int8_path is None,
                           int8_path=int8_path)
        result, collector = measure(prepared, settings)
        failed = result.verdict == "FAIL" and result.kind != "speed"  # an INCONCLUSIVE drop has nothing to find
        if (failed and settings.diagnose != "off") or settings.diagnose == "always":
            result = with_diagnosis(result, prepared, collector, settings)
        unsaved = _save_disagreements(prepared, collector, result, settings) if int8_path is None else None
        if unsaved is not None:  # the file asked for is missing: an ERROR, with the verdict still reported
            return Outcome(entry.id, ep, entry.mode, "error", f"{registry.path}: entry {entry.id!r}: {unsaved}",
                           result, regenerated=regenerated, notes=tuple(notes))
    except EpUnavailableError as exc:
        if settings.strict_ep:
            return Outcome(entry.id, ep, entry.mode, "error", f"{exc} (--quantgate-strict-ep)",
                           regenerated=regenerated, notes=tuple(notes))
        return Outcome(entry.id, ep, entry.mode, "skip", str(exc), regenerated=regenerated, notes=tuple(notes))
    except InputError as exc:
        return Outcome(entry.id, ep, entry.mode, "error", str(exc), regenerated=regenerated, notes=tuple(notes))
    except (Exception, SystemExit) as exc:  # a recipe's sys.exit too: one entry never takes the run down
        import traceback

        where = f"{registry.path}: entry {entry.id!r} ({entry.location})"
        return Outcome(entry.id, ep, entry.mode, "error",
                       f"{where}: unexpected {type(exc).__name__}: {_first_line(exc)}",
                       regenerated=regenerated, notes=tuple(notes), traceback=traceback.format_exc())
    if settings.strict and result.needed_samples is not None:
        return Outcome(entry.id, ep, entry.mode, "error",
                       f"{registry.path}: entry {entry.id!r}: {result.warnings[-1]} (--quantgate-strict)", result,
                       regenerated=regenerated, notes=tuple(notes))
    if built is not None and not built.matches_pin:
        # the regeneration rule (docs/regeneration.md): a rebuild that differs from its pin is used without
        # review only when the difference is explained and its drop is no worse than the reviewed build's
        usable, why = built.review(result.passed)
        repin = f"`quantgate pin {registry.path} --id {entry.id}`"
        if not usable:
            regenerated = f"{regenerated}; needs review: {why}"
            notes[-1] = regenerated
            reason = (f"the rebuilt {built.path.name} differs from its pin and needs review: {why}; review it, then "
                      f"re-pin with {repin}")
            result = with_breaches(result, [Breach("rebuild", reason)])
        else:
            regenerated = f"{regenerated}; used without review: {why} (re-pin with {repin} to record this build)"
            notes[-1] = regenerated
    if key is not None and cache is not None and result.passed:
        try:
            cache.set(key, result)
        except (WriteError, OSError) as exc:  # the verdict stands; only the shortcut for the next run is lost
            notes.append(f"the passing result was not cached: {exc}")
    status: Status = "pass" if result.passed else "inconclusive" if result.verdict == INCONCLUSIVE else "fail"
    return Outcome(entry.id, ep, entry.mode, status, result.reason, result, regenerated=regenerated, notes=tuple(notes))


def _save_disagreements(p: Prepared, collector: Collector, result: GateResult, settings: Settings) -> str | None:
    """Write the entry's disagreements fixture when asked to; return why it could not be written, else None."""
    if settings.save_disagreements is None:
        return None
    from ..errors import InputError
    from .disagreements import write_disagreements

    try:
        write_disagreements(p.fixture, p.plan, collector, result, settings.save_disagreements, settings.save_count)
    except InputError as exc:  # WriteError names the file; FixtureError a model input the file cannot hold
        return f"--quantgate-save-disagreements: {exc}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else repr(exc))[:300]
