"""The gate for one entry on one EP, independent of pytest: check inputs, run both models, compare."""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .comparison import CompareOptions, GateResult, check_signatures, compare, run_model, signature
from .errors import HashMismatchError, ModelFileError
from .fileio import sha256_file
from .providers import SessionSpec, open_session
from .registry import Entry, Registry
from .settings import Settings
from .soak import FeedPlan, Fixture, TensorSpec, find_fixture, load_fixture, plan_feeds

if TYPE_CHECKING:
    import onnxruntime as ort


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


def check_model_file(path: Path, role: str, entry: Entry, registry: Registry) -> None:
    """Refuse a missing, empty or unsafe ONNX file before ORT sees it."""
    if not path.exists():
        raise ModelFileError(f"{registry.path}: entry {entry.id!r}: {role} model {path} does not exist")
    if not path.is_file():
        raise ModelFileError(f"{registry.path}: entry {entry.id!r}: {role} model {path} is not a file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{registry.path}: entry {entry.id!r}: {role} model {path} is empty")
    check_external_data(path)


def check_external_data(path: Path) -> None:
    """Refuse an ONNX file whose external data points outside its own folder (or cannot be parsed)."""
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


def prepare(registry: Registry, entry: Entry, ep: str, settings: Settings, *, int8_pinned: bool = True) -> Prepared:
    """Check files, hashes, fixture and EP, and open both sessions; raise an InputError subclass on bad input.

    ``int8_pinned=False`` skips the int8 hash check for a sidecar this run rebuilt (its pin is reported apart).
    """
    fp32_path = registry.fp32_path(entry)
    int8_path = registry.int8_path(entry)
    check_model_file(fp32_path, "fp32", entry, registry)
    check_model_file(int8_path, "int8", entry, registry)
    fp32_sha = check_hash(fp32_path, entry.sha256, "sha256", entry, registry)
    int8_sha = check_hash(int8_path, entry.int8_sha256 if int8_pinned else None, "int8_sha256", entry, registry)
    fixture = load_fixture(find_fixture(registry.soak_candidates(entry, settings.fixtures_dir)))
    spec = SessionSpec(ep, settings.ep_options)
    fp32 = open_session(fp32_path, spec, threads=settings.threads)
    int8 = open_session(int8_path, spec, threads=settings.threads)
    check_signatures(fp32, int8, str(fp32_path), str(int8_path))
    inputs, outputs = signature(fp32)
    plan = plan_feeds(fixture, inputs, settings.batch_size)
    return Prepared(entry, ep, fp32_path, int8_path, fp32_sha, int8_sha, fixture, plan, inputs, outputs, fp32, int8)


def evaluate(prepared: Prepared, settings: Settings) -> GateResult:
    """Run fp32 and int8 over every soak sample and compare them; add size, speed and plot data."""
    p = prepared
    fp32_times: list[float] = []
    int8_times: list[float] = []
    fp32_out = run_model(p.fp32, p.fixture, p.plan, str(p.fp32_path), fp32_times)
    int8_out = run_model(p.int8, p.fixture, p.plan, str(p.int8_path), int8_times)
    options = CompareOptions(
        bootstrap=settings.bootstrap,
        seed=settings.seed,
        confidence=settings.confidence,
        decision=settings.decision,
        strict=settings.strict,
    )
    result = compare(p.entry, p.ep, p.fixture, p.inputs, p.outputs, fp32_out, int8_out, options)
    extra = dict(result.extra)
    extra.update(speed_and_size(p, fp32_times, int8_times))
    extra.update(provenance(p, settings))
    if settings.html is not None:
        extra["plot"] = plot_data(p, fp32_out, int8_out, result)
    result = check_speed(replace(result, extra=extra), p.entry)
    if not result.passed and result.kind != "speed":
        result = with_diagnosis(result, p)
    return result


DIAGNOSIS_BATCH = 16  # every intermediate tensor of every diagnosis feed is held in memory: keep feeds small


def with_diagnosis(result: GateResult, p: Prepared) -> GateResult:
    """Attach where the drop comes from (worst tensors by SQNR) to a failed result."""
    from .diagnosis import diagnose, feeds_from_fixture

    batch = p.plan.batch if p.plan.fixed_batch else DIAGNOSIS_BATCH
    found = diagnose(p.fp32_path, p.int8_path, feeds_from_fixture(p.fixture.inputs, p.plan.batched, batch=batch))
    return replace(result, extra={**result.extra, "diagnosis": found.to_dict(), "diagnosis_lines": found.lines()})


def _median_warm(times: list[float]) -> float | None:
    # the first full-size run pays for allocation and kernel selection: it is the warm-up, not a sample
    warm = times[1:] if len(times) > 1 else times
    return float(statistics.median(warm)) * 1000.0 if warm else None


def speed_and_size(p: Prepared, fp32_times: list[float], int8_times: list[float]) -> dict[str, Any]:
    """Return on-disk bytes and the median warm latency (ms per run of one batch) of both models."""
    fp32_ms, int8_ms = _median_warm(fp32_times), _median_warm(int8_times)
    fp32_bytes, int8_bytes = p.fp32_path.stat().st_size, p.int8_path.stat().st_size
    return {
        "fp32_bytes": fp32_bytes,
        "int8_bytes": int8_bytes,
        "size_ratio": int8_bytes / fp32_bytes if fp32_bytes else None,
        "fp32_ms": fp32_ms,
        "int8_ms": int8_ms,
        "speedup": fp32_ms / int8_ms if fp32_ms and int8_ms else None,
        "latency_batch": p.plan.batch,
        "latency_runs": max(len(fp32_times) - 1, len(fp32_times)),
    }


def check_speed(result: GateResult, entry: Entry) -> GateResult:
    """Fail a sidecar slower than the entry's optional ``quant_min_speedup`` (off by default)."""
    minimum = entry.raw.get("quant_min_speedup")
    speedup = result.extra.get("speedup")
    if minimum is None or speedup is None or speedup >= minimum:
        return result
    reason = (f"int8 speedup x{speedup:.2f} (fp32 {result.extra['fp32_ms']:.3f} ms vs int8 "
              f"{result.extra['int8_ms']:.3f} ms per batch) is below quant_min_speedup x{minimum:g}")
    if result.passed:
        return replace(result, verdict="FAIL", kind="speed", reason=reason)
    return replace(result, also=(*result.also, reason))


def provenance(p: Prepared, settings: Settings) -> dict[str, Any]:
    """Return what produced this verdict: files and hashes, EP and options, onnxruntime, CPU, time."""
    from . import __version__, providers, system

    return {
        "provenance": {
            "fp32": {"path": str(p.fp32_path), "sha256": p.fp32_sha256},
            "int8": {"path": str(p.int8_path), "sha256": p.int8_sha256},
            "fixture": {"path": str(p.fixture.path), "sha256": p.fixture.sha256},
            "ep": p.ep,
            "providers": [str(x) for x in p.int8.get_providers()],
            "provider_options": p.int8.get_provider_options(),
            "onnxruntime": providers.ort_distribution(),
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "quantgate": __version__,
            "bootstrap": settings.bootstrap,
            "seed": settings.seed,
            "decision": settings.decision,
            **system.describe(),
        }
    }


def plot_data(p: Prepared, fp32_out: Mapping[str, np.ndarray], int8_out: Mapping[str, np.ndarray],
              result: GateResult) -> dict[str, Any]:
    """Return the HTML report's plot data for the worst output, as compared (residuals when asked)."""
    from .html import plot_data as subsample

    name = max(result.outputs, key=lambda r: r.drop).name if result.outputs else p.outputs[0].name
    ref = np.asarray(fp32_out[name], dtype=np.float64)
    test = np.asarray(int8_out[name], dtype=np.float64)
    target = None
    if p.fixture.target is not None and p.fixture.target.size == ref.size:
        target = np.asarray(p.fixture.target, dtype=np.float64).reshape(ref.shape)
    if p.entry.compare == "residual":
        base_name = p.entry.residual_input or p.inputs[0].name
        base = np.asarray(p.fixture.inputs[base_name], dtype=np.float64)
        if base.size == ref.size:
            base = base.reshape(ref.shape)
            ref, test = ref - base, test - base
            target = None if target is None else target - base
    return subsample(name, ref, test, target)


@dataclass(frozen=True)
class Outcome:
    """What happened to one (entry, EP) outside pytest: pass, fail, error or skip."""

    entry_id: str
    ep: str
    mode: str
    status: str  # "pass" | "fail" | "error" | "skip"
    message: str
    result: GateResult | None = None

    def to_row(self) -> dict[str, Any]:
        """Return the summary row of this outcome."""
        if self.result is not None:
            return self.result.to_row()
        return {"id": self.entry_id, "ep": self.ep, "mode": self.mode, "samples": None, "drop": None,
                "budget": None, "headroom": None, "verdict": self.status.upper(), "reason": self.message}


def run_one(registry: Registry, entry: Entry, ep: str, settings: Settings) -> Outcome:
    """Gate one entry on one EP; bad input becomes an error outcome, never an exception."""
    from .errors import EpUnavailableError, InputError

    try:
        prepared = prepare(registry, entry, ep, settings)
        result = evaluate(prepared, settings)
    except EpUnavailableError as exc:
        status = "error" if settings.strict_ep else "skip"
        return Outcome(entry.id, ep, entry.mode, status, str(exc))
    except InputError as exc:
        return Outcome(entry.id, ep, entry.mode, "error", str(exc))
    if settings.strict and result.needed_samples is not None:
        return Outcome(entry.id, ep, entry.mode, "error", result.warnings[-1], result)
    return Outcome(entry.id, ep, entry.mode, "pass" if result.passed else "fail", result.reason, result)
