"""``quantgate advise``: build quantisation candidates in ADR-0129's escalation order and keep the cheapest that passes.

Use it when a model needs a sidecar (or its sidecar fails its budget). For one registry entry it builds, in order,
dynamic PTQ (per-tensor / per-channel; on graphs with Conv, MatMul/Gemm only with ``matmul_const_b_only`` on and
off), static QDQ PTQ (MinMax / Entropy / Percentile, per-channel; a method whose scales equal MinMax's is not gated
again), int4 weight-only ``MatMulNBits`` on MatMul-heavy graphs, then, while nothing passes, static with the most
harmful nodes kept in fp32 (greedy), with one op type kept in fp32, with the failing output's head in fp32, static
with 16-bit activations (a16w8), and QAT / QAD when the entry has a recipe. The node, op-type and head candidates
follow the diagnosis focused on what the gate found failing. A stage stops at its first pass unless
``exhaustive``; ``max_minutes`` bounds the search; built candidates can be cached across runs (``cache_dir``).
Every candidate is gated by :func:`_gate_candidate` with the gate's full statistics; the cheapest passing one
(fastest measured int8 latency, then smallest file) is chosen. Nothing beside the registry changes unless
``write=True``; candidates are built in a scratch folder inside the registry folder (the gate confines every model
path to it) and removed afterwards. The budget is never relaxed (ADR-0129: escalate instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import scratch_folder
from ..io.registry import Entry, Registry
from ..settings import Settings

if TYPE_CHECKING:

    from ..analysis.paths import PathInfo
    from ..records import GateResult, TensorError

STAGES = ("dynamic", "static", "int4", "exclusions", "optypes", "head", "a16w8", "qat", "qad")
MIN_CALIBRATION_SAMPLES = 100  # the QAT literature's "100+ representative batches"
DISAGREEING_SAMPLES = 8  # soak samples the exclusion ranking looks at (every intermediate tensor is kept in memory)
MAX_EXCLUSION_STEPS = 4
MATMUL_HEAVY_SHARE = 0.5  # share of weight parameters in constant-weight MatMul/Gemm for the int4 candidate
# below this share of the weights in MatMul/Gemm, a MatMul-only dynamic sidecar of a Conv graph is not worth
# building: it passes any budget by leaving the model fp32 (a direction classifier: one 0.3% Gemm)
MATMUL_ONLY_SHARE = 0.10
EXIT_FOUND, EXIT_NONE, EXIT_ERROR = 0, 1, 2
RELAX_NOTE = "relaxing the budget is not advised (ADR-0129: escalate rather than relax)"


class AdviseError(Exception):
    """Bad input for advise (entry, calibration set, options); the message names the file and the field."""


@dataclass(frozen=True)
class Candidate:
    """One way to build the sidecar: the registry ``quant_mode`` and the ``quant_options`` that rebuild it."""

    stage: str
    mode: str
    options: Mapping[str, Any]
    label: str

    @property
    def key(self) -> str:
        """Return what identifies the sidecar this candidate builds (mode and options; the stage is a name only)."""
        return json.dumps({"mode": self.mode, "options": dict(self.options)}, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """Return the candidate as JSON-ready data."""
        return {"stage": self.stage, "mode": self.mode, "options": dict(self.options), "label": self.label}


@dataclass(frozen=True)
class CandidateResult:
    """What the gate said about one candidate (``status`` pass / fail / error / skip / untried)."""

    candidate: Candidate
    status: str
    reason: str = ""
    gate: GateResult | None = None  # the gate's own result, when the candidate was measured
    sha256: str | None = None
    path: Path | None = None
    cached: bool = False  # the sidecar came from the candidate cache (re-gated, not rebuilt)
    build_s: float | None = None
    gate_s: float | None = None

    @property
    def passed(self) -> bool:
        """Return True when the gate passed this candidate."""
        return self.status == "pass"

    @property
    def drop(self) -> float | None:
        """Return the measured drop."""
        return self.gate.drop if self.gate is not None else None

    @property
    def score(self) -> float | None:
        """Return what candidates are ranked by: the largest share of any judged budget (GateResult.budget_use).

        It is the drop over the budget for PLCC verdicts, and the missed detections, decision flips or cosine
        distance over theirs for outputs judged by their task, where the gate has no PLCC drop.
        """
        return self.gate.budget_use if self.gate is not None else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """Return the drop's bootstrap interval."""
        ci = self.gate.interval if self.gate is not None else None
        return (ci.low, ci.high) if ci is not None else None

    @property
    def budget(self) -> float | None:
        """Return the budget the candidate was gated against."""
        return self.gate.budget if self.gate is not None else None

    @property
    def verdict(self) -> str:
        """Return the gate's verdict, or "" when nothing was measured."""
        return self.gate.verdict if self.gate is not None else ""

    @property
    def int8_ms(self) -> float | None:
        """Return the int8 latency per sample the gate measured."""
        return self.gate.timing.int8_ms if self.gate is not None and self.gate.timing is not None else None

    @property
    def int8_bytes(self) -> int | None:
        """Return the sidecar's size on disk."""
        return self.gate.timing.int8_bytes if self.gate is not None and self.gate.timing is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready data (the gate's own result included)."""
        return {**self.candidate.to_dict(), "status": self.status, "reason": self.reason, "drop": self.drop,
                "budget_use": self.score,
                "ci": list(self.interval) if self.interval else None, "budget": self.budget, "verdict": self.verdict,
                "int8_ms": self.int8_ms, "int8_bytes": self.int8_bytes, "int8_sha256": self.sha256,
                "cached": self.cached, "build_s": self.build_s, "gate_s": self.gate_s,
                "gate": self.gate.to_json() if self.gate is not None else {}}


@dataclass(frozen=True)
class AdviseOptions:
    """Knobs of one advise run besides the gate's own settings."""

    ep: str = "cpu"
    stages: tuple[str, ...] = STAGES
    calibration_set: Path | None = None
    allow_recipes: bool = False
    epochs_qat: int | None = None
    max_exclusions: int = MAX_EXCLUSION_STEPS
    distill_weight: float = 1.0
    exhaustive: bool = False  # try every candidate of every stage instead of stopping at a stage's first pass
    max_minutes: float | None = None  # no candidate starts after this many minutes
    cache_dir: Path | None = None  # the candidate cache; None: every candidate is built


@dataclass(frozen=True)
class Advice:
    """The outcome for one entry: every candidate, the chosen one (or the best failing one) and what to do next."""

    entry_id: str
    ep: str
    results: tuple[CandidateResult, ...]
    chosen: int | None
    best: int | None
    next_step: str
    warnings: tuple[str, ...] = ()
    calibration: str | None = None
    # the chosen sidecar and its provenance record, kept in memory: the scratch folder is gone when advise returns
    sidecar: bytes | None = field(default=None, compare=False, repr=False)
    provenance: bytes | None = field(default=None, compare=False, repr=False)
    elapsed_s: float | None = None

    @property
    def found(self) -> bool:
        """Return True when a candidate passed."""
        return self.chosen is not None

    def to_dict(self) -> dict[str, Any]:
        """Return the advice as JSON-ready data."""
        return {"id": self.entry_id, "ep": self.ep, "found": self.found, "chosen": self.chosen, "best": self.best,
                "best_numbers": self.results[self.best].to_dict() if self.best is not None else None,
                "next_step": self.next_step, "warnings": list(self.warnings), "calibration_set": self.calibration,
                "elapsed_s": self.elapsed_s, "candidates": [r.to_dict() for r in self.results]}


# --------------------------------------------------------------------------------------------------------------
# The one place a candidate meets the gate


def _gate_candidate(registry: Registry, entry: Entry, int8_path: Path, ep: str, settings: Settings) -> CandidateResult:
    """Gate the sidecar ``int8_path`` as if it were ``entry``'s (same fixture, checks and budget; no pinned hash).

    ``entry`` must already carry the candidate's ``mode`` and budget; the returned result's candidate is a
    placeholder the caller replaces.
    """
    from ..fileio import sha256_file
    from ..runner.gate import run_one

    # candidates are ranked by the verdict alone: diagnosing every failing one would only cost time
    outcome = run_one(registry, entry, ep, dataclasses.replace(settings, diagnose="off"), int8_path=int8_path)
    placeholder = Candidate("", entry.mode, {}, "")
    result = outcome.result
    sha = sha256_file(int8_path) if int8_path.is_file() else None
    if result is None:
        return CandidateResult(placeholder, outcome.status, outcome.message, sha256=sha, path=int8_path)
    return CandidateResult(placeholder, outcome.status, outcome.message, result, sha256=sha, path=int8_path)


# --------------------------------------------------------------------------------------------------------------
# Graph facts that decide which candidates make sense


@dataclass(frozen=True)
class GraphFacts:
    """What the fp32 graph is made of."""

    conv_nodes: int
    matmul_nodes: int  # MatMul/Gemm with a constant weight
    matmul_weight_share: float  # share of weight parameters held by those nodes
    single_input: bool
    matmul_any: int = 0  # every MatMul/Gemm, a computed B (attention) included

    @property
    def matmul_heavy(self) -> bool:
        """Return True when most weights sit in constant-weight MatMul/Gemm nodes."""
        return self.matmul_nodes > 0 and self.matmul_weight_share >= MATMUL_HEAVY_SHARE


def graph_facts(fp32_path: Path) -> GraphFacts:
    """Count Conv and constant-weight MatMul/Gemm nodes and where the weights are."""
    import onnx

    from ..producers.preprocess import constants_to_initializers
    from ..producers.weight_only import constant_weight_matmuls

    model = onnx.load(str(fp32_path))
    constants_to_initializers(model)  # Paddle exports keep every weight in a Constant node: count those too
    sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    matmuls = set(constant_weight_matmuls(model))
    in_matmul = sum(sizes[n.input[1]] for n in model.graph.node if n.name in matmuls)
    total = sum(size for size in sizes.values() if size > 1) or 1
    inputs = [i for i in model.graph.input if i.name not in sizes]
    return GraphFacts(
        conv_nodes=sum(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node),
        matmul_nodes=len(matmuls),
        matmul_weight_share=in_matmul / total,
        single_input=len(inputs) == 1,
        matmul_any=sum(n.op_type in ("MatMul", "Gemm") for n in model.graph.node),
    )


# --------------------------------------------------------------------------------------------------------------
# Candidates


def _label(options: Mapping[str, Any]) -> str:
    parts = []
    for key, value in options.items():
        if isinstance(value, bool):
            parts.append(key if value else f"no-{key}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{key}={','.join(map(str, value))}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts) or "defaults"


def _candidate(stage: str, mode: str, options: Mapping[str, Any], label: str | None = None) -> Candidate:
    return Candidate(stage, mode, dict(options), label if label is not None else _label(options))


MATMUL_ONLY = ["MatMul", "Gemm"]
A16W8 = {"calibrate_method": "minmax", "per_channel": True, "activation_type": "uint16"}


def ptq_candidates(facts: GraphFacts, stages: Sequence[str], has_calibration: bool) -> tuple[list[Candidate],
                                                                                               list[CandidateResult]]:
    """Return the dynamic, static and int4 candidates for this graph, and skipped rows saying why others are not.

    On a graph with Conv, dynamic PTQ quantises MatMul/Gemm only, with ``matmul_const_b_only`` on and off (off
    also quantises a MatMul whose B is computed, e.g. attention scores); two variants that build the same graph
    are gated once.
    """
    out: list[Candidate] = []
    skipped: list[CandidateResult] = []
    if "dynamic" in stages:
        if facts.conv_nodes:
            skip = _candidate("dynamic", "dynamic", {"per_channel": False})
            skipped.append(CandidateResult(skip, "skip", f"{facts.conv_nodes} Conv node(s) would run as ConvInteger "
                                                         "(slow on CPU and known to wreck outputs)"))
            if facts.matmul_any and facts.matmul_weight_share < MATMUL_ONLY_SHARE:
                skipped.append(CandidateResult(
                    _candidate("dynamic", "dynamic", {"op_types_to_quantize": MATMUL_ONLY}), "skip",
                    f"MatMul/Gemm hold {facts.matmul_weight_share:.0%} of the weights: a MatMul-only sidecar would "
                    f"leave the model almost all fp32"))
            elif facts.matmul_any:
                for per_channel in (False, True):
                    for const_b in (True, False):
                        out.append(_candidate("dynamic", "dynamic", {
                            "per_channel": per_channel, "op_types_to_quantize": MATMUL_ONLY,
                            "matmul_const_b_only": const_b}))
        else:
            for per_channel in (False, True):
                out.append(_candidate("dynamic", "dynamic", {"per_channel": per_channel}))
            if facts.matmul_any > facts.matmul_nodes:  # a MatMul with a computed B: ORT skips it by default
                for per_channel in (False, True):
                    out.append(_candidate("dynamic", "dynamic", {"per_channel": per_channel,
                                                                 "matmul_const_b_only": False}))
    if "static" in stages:
        for method in ("minmax", "entropy", "percentile"):
            cand = _candidate("static", "static", {"calibrate_method": method, "per_channel": True})
            if has_calibration:
                out.append(cand)
            else:
                skipped.append(CandidateResult(cand, "skip", NO_CALIBRATION))
    if "int4" in stages:
        cand = _candidate("int4", "dynamic", {"weight_bits": 4, "block_size": 32})
        if facts.matmul_heavy:
            out.append(cand)
        else:
            skipped.append(CandidateResult(cand, "skip", f"not MatMul-heavy ({facts.matmul_weight_share:.0%} of the "
                                                         "weights in constant-weight MatMul/Gemm)"))
    return out, skipped


NO_CALIBRATION = "no calibration set (quant_calibration_set or --calibration-set)"


# --------------------------------------------------------------------------------------------------------------
# Building one candidate


def build_candidate(candidate: Candidate, fp32: Path, out: Path, calibration: Path | None,
                    recipe: Path | None) -> None:
    """Write the candidate's sidecar to ``out`` with the existing producers; raise ProducerError/ValueError."""
    if candidate.mode == "dynamic":
        from ..producers.ptq_dynamic import DynamicConfig, quantize_dynamic

        quantize_dynamic(fp32, out, DynamicConfig(**_tuples(candidate.options)))
    elif candidate.mode == "static":
        from ..producers.ptq_static import StaticConfig, quantize_static

        if calibration is None:
            raise ValueError("static candidates need a calibration set")
        quantize_static(fp32, out, StaticConfig(calibration_set=calibration, **_tuples(candidate.options)))
    elif candidate.mode == "qat":
        from ..producers.qat import QatConfig, quantize_qat

        if recipe is None:
            raise ValueError("QAT candidates need the entry's qat_recipe")
        quantize_qat(fp32, out, QatConfig(**candidate.options), recipe=recipe)
    else:
        raise ValueError(f"no producer for mode {candidate.mode!r}")


def _tuples(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def activation_ranges(path: Path) -> dict[str, tuple[Any, Any]]:
    """Return each quantised activation's (scale, zero point) in a QDQ sidecar; {} when it has none (QOperator)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}

    def value(name: str) -> Any:
        return numpy_helper.to_array(inits[name]).tolist() if name in inits else None

    return {node.input[0]: (value(node.input[1]), value(node.input[2]) if len(node.input) > 2 else None)
            for node in graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] not in inits and len(node.input) > 1}


def graph_digest(path: Path) -> str:
    """Return a digest of the sidecar's graph without its metadata (the provenance differs between configs)."""
    import hashlib

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# The candidate cache: built sidecars reused across runs, keyed by everything the build depends on


@dataclass(frozen=True)
class CandidateCache:
    """Built sidecars in ``folder`` (``<key>.int8.onnx`` and ``<key>.json`` with its sha256 and key material)."""

    folder: Path

    @staticmethod
    def key(candidate: Candidate, fp32_sha: str, calibration_sha: str | None, recipe_sha: str | None) -> str:
        """Return the digest of the inputs' bytes, the candidate's options and the producers' versions."""
        import hashlib

        import onnx

        from .. import __version__
        from ..engine.providers import ort_distribution

        material = {"cache": 1, "fp32": fp32_sha, "mode": candidate.mode, "options": dict(candidate.options),
                    # a dynamic build reads no calibration set and a PTQ build no recipe: they must not miss on them
                    "calibration": calibration_sha if candidate.mode == "static" else None,
                    "recipe": recipe_sha if candidate.mode == "qat" else None,
                    "quantgate": __version__, "onnxruntime": ort_distribution(), "onnx": onnx.__version__}
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()

    def fetch(self, key: str, out: Path) -> bool:
        """Copy the cached sidecar to ``out`` when its bytes are intact; return whether it was there."""
        from ..fileio import sha256_file

        sidecar = self.folder / f"{key}.int8.onnx"
        try:
            record = json.loads((self.folder / f"{key}.json").read_text("utf-8"))
            if not sidecar.is_file() or record.get("sha256") != sha256_file(sidecar):
                return False  # a torn or hand-edited entry is a miss, rebuilt and overwritten
            shutil.copyfile(sidecar, out)
        except (OSError, ValueError, AttributeError):
            return False
        return True

    def store(self, key: str, built: Path, candidate: Candidate) -> None:
        """Keep a copy of the built sidecar (the record last: an entry without it is a miss)."""
        from ..fileio import atomic_path, atomic_write_text, sha256_file

        with atomic_path(self.folder / f"{key}.int8.onnx", ".onnx", what="cached candidate") as tmp:
            shutil.copyfile(built, tmp)
        atomic_write_text(self.folder / f"{key}.json", json.dumps(
            {"sha256": sha256_file(built), **candidate.to_dict()}, sort_keys=True) + "\n", "candidate cache record")


# --------------------------------------------------------------------------------------------------------------
# The advisor


def _time_left(seconds: float) -> str:
    return "under a minute left" if seconds < 60 else f"about {seconds / 60:.0f} min left"


class _Run:
    """State of one entry's advise run: scratch folder, counters, timings and results so far."""

    def __init__(self, registry: Registry, entry: Entry, settings: Settings, options: AdviseOptions,
                 scratch: Path, say: Callable[[str], None]) -> None:
        self.registry = registry
        self.entry = entry
        self.settings = settings
        self.options = options
        self.scratch = scratch
        self.say = say
        self.fp32 = registry.fp32_path(entry)
        self.results: list[CandidateResult] = []
        self.recipe: Path | None = None
        self.started = time.monotonic()
        self.planned = 0  # candidates queued by the stages begun so far and not yet taken
        self.seconds: list[float] = []  # build + gate time of each candidate built or fetched
        self.by_key: dict[str, int] = {}  # candidate key -> index in results
        self.graphs: dict[str, int] = {}  # graph digest of a gated sidecar -> index in results
        self.cache = CandidateCache(options.cache_dir) if options.cache_dir is not None else None
        self.hashes: dict[Path, str] = {}
        self.rankings: dict[Path, Ranking | str] = {}

    def budget_entry(self, mode: str) -> Entry:
        """Return the entry as the gate will see it once written with ``mode`` (that mode's default budget and
        deploy batch, unless the entry sets them): the candidate's numbers are then the ones measure repeats."""
        return self.entry.as_mode(mode)

    @property
    def passed_any(self) -> bool:
        """Return True when a candidate has passed."""
        return any(r.passed for r in self.results)

    def out_of_time(self) -> str | None:
        """Return why no candidate may start any more (``--max-minutes`` spent), or None."""
        limit = self.options.max_minutes
        if limit is None:
            return None
        spent = time.monotonic() - self.started
        if spent < limit * 60:
            return None
        return f"not tried: --max-minutes {limit:g} reached ({spent:.0f} s spent)"

    def add(self, result: CandidateResult) -> CandidateResult:
        """Record a row (skipped, not tried, or measured)."""
        self.results.append(result)
        return result

    def run_stage(self, candidates: Sequence[Candidate], calibration: Path | None) -> None:
        """Try ``candidates`` in order; after the first pass the rest are not tried unless ``exhaustive``."""
        self.planned += len(candidates)
        passed: int | None = None
        for candidate in candidates:
            if passed is not None and not self.options.exhaustive:
                self.planned -= 1
                self.add(CandidateResult(candidate, "untried", f"not tried: #{passed} of this stage passed "
                                                               "(--exhaustive tries the rest)"))
                continue
            if self.try_candidate(candidate, calibration).passed:
                passed = len(self.results)

    def _sha(self, path: Path) -> str:
        from ..fileio import sha256_file

        if path not in self.hashes:
            self.hashes[path] = sha256_file(path)
        return self.hashes[path]

    def try_candidate(self, candidate: Candidate, calibration: Path | None) -> CandidateResult:
        """Build (or fetch from the cache) and gate one candidate; a producer failure is an error row."""
        from ..errors import InputError, WriteError
        from ..producers.base import ProducerError

        self.planned = max(0, self.planned - 1)
        index = len(self.results) + 1
        seen = self.by_key.get(candidate.key)
        if seen is not None:
            return self.add(CandidateResult(candidate, "skip", f"same options as #{seen}: built once, gated once"))
        late = self.out_of_time()
        if late is not None:
            return self.add(CandidateResult(candidate, "untried", late))
        self.by_key[candidate.key] = index
        out = self.scratch / f"{self.entry.id}.c{index:02d}.int8.onnx"
        head = (f"[{self.entry.id}] [{index}/{index + self.planned}] {candidate.stage} {candidate.mode} "
                f"{candidate.label}")
        self.say(f"{head}: building…")
        started = time.monotonic()
        key = None
        if self.cache is not None:
            key = self.cache.key(candidate, self._sha(self.fp32),
                                 self._sha(calibration) if calibration is not None else None,
                                 self._sha(self.recipe) if self.recipe is not None else None)
        cached = key is not None and self.cache is not None and self.cache.fetch(key, out)
        result: CandidateResult | None = None
        if not cached:
            try:
                # ORT's calibrators print progress with print(): keep stdout for the table
                with contextlib.redirect_stdout(io.StringIO()):
                    build_candidate(candidate, self.fp32, out, calibration, self.recipe)
            except WriteError:  # a full disk or read-only folder fails every candidate alike: stop, say why
                raise
            except (ProducerError, InputError, ValueError, TypeError) as exc:
                result = CandidateResult(candidate, "error", f"build failed: {_first_line(exc)}")
            except Exception as exc:
                result = CandidateResult(candidate, "error",
                                         f"build failed: {type(exc).__name__}: {_first_line(exc)}")
            else:
                if key is not None and self.cache is not None:
                    self.cache.store(key, out, candidate)
        build_s = time.monotonic() - started
        if result is None:
            same = self._same_as_earlier(candidate, out)
            if same is not None:
                result = CandidateResult(candidate, "skip", same, path=out, cached=cached)
            else:
                started = time.monotonic()
                gated = _gate_candidate(self.registry, self.budget_entry(candidate.mode), out, self.options.ep,
                                        self.settings)
                result = dataclasses.replace(gated, candidate=candidate, cached=cached,
                                             gate_s=time.monotonic() - started)
                self.graphs.setdefault(graph_digest(out), index)
        result = dataclasses.replace(result, build_s=build_s)
        self.add(result)
        spent = build_s + (result.gate_s or 0.0)
        self.seconds.append(spent)
        left = sum(self.seconds) / len(self.seconds) * self.planned
        if result.drop is not None:
            measured = f"drop {result.drop:.6f}"
        elif result.score is not None:  # judged by its task (detections, decisions...): the budget it uses
            measured = f"budget use {result.score:.0%}"
        else:
            measured = "drop n/a"
        what = "cached" if cached else "built"
        self.say(f"{head}: {what}, gated: {measured} {(result.verdict or result.status).upper()} ({spent:.1f} s); "
                 f"{_time_left(left)}" + (f" ({result.reason})" if result.status == "skip" else ""))
        return result

    def _same_as_earlier(self, candidate: Candidate, out: Path) -> str | None:
        """Return why ``out`` need not be gated (same ranges as the minmax build, same graph as a gated one)."""
        method = candidate.options.get("calibrate_method")
        if candidate.mode == "static" and method not in (None, "minmax"):
            options = {k: v for k, v in candidate.options.items() if k != "percentile"}
            reference = self.by_key.get(_candidate("", "static", {**options, "calibrate_method": "minmax"}).key)
            ref = self.results[reference - 1] if reference is not None else None
            if ref is not None and ref.gate is not None and ref.path is not None:
                mine = activation_ranges(out)
                if mine and mine == activation_ranges(ref.path):
                    return f"same ranges as minmax (#{reference}): {method} changed no scale, not gated again"
        first = self.graphs.get(graph_digest(out))
        if first is not None:
            return f"same graph as #{first}: not gated again"
        return None

    def ranking(self, base: CandidateResult) -> Ranking | str:
        """Return the focused diagnosis of ``base`` (computed once), or why there is none."""
        assert base.path is not None
        if base.path not in self.rankings:
            try:
                self.rankings[base.path] = rank(self, base.path)
            except Exception as exc:
                self.rankings[base.path] = f"could not rank nodes: {type(exc).__name__}: {_first_line(exc)}"
        return self.rankings[base.path]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def calibration_for(registry: Registry, entry: Entry, settings: Settings, given: Path | None) -> Path | None:
    """Return the calibration set to use: ``--calibration-set``, else the entry's, else None."""
    from ..errors import InputError
    from ..producers.dispatch import calibration_set

    if given is not None:
        if not given.is_file():
            raise AdviseError(f"--calibration-set {given}: file not found")
        return given.resolve()
    if entry.calibration_set is None:
        return None
    try:
        return calibration_set(registry, entry, settings.fixtures_dir)
    except InputError as exc:
        raise AdviseError(str(exc)) from None


def calibration_samples(path: Path) -> int:
    """Return how many samples (axis 0) the calibration set holds; raise AdviseError if unreadable."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            counts = [int(data[k].shape[0]) for k in data.files if k != "target" and data[k].ndim > 0]
    except Exception as exc:
        raise AdviseError(f"{path}: cannot read the calibration set: {_first_line(exc)}") from None
    return min(counts) if counts else 0


def advise(registry: Registry, entry: Entry, settings: Settings, options: AdviseOptions,
           say: Callable[[str], None] = lambda _line: None) -> Advice:
    """Build and gate the candidates of one entry; return every result, the choice and the next step."""
    fp32 = registry.fp32_path(entry)
    if not fp32.is_file():
        raise AdviseError(f"{registry.path}: entry {entry.id!r} field 'onnx': {fp32} does not exist")
    unknown = [s for s in options.stages if s not in STAGES]
    if unknown:
        raise AdviseError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    warnings: list[str] = []
    calibration = calibration_for(registry, entry, settings, options.calibration_set)
    if calibration is not None:
        count = calibration_samples(calibration)
        if count < MIN_CALIBRATION_SAMPLES:
            warnings.append(f"calibration set {calibration} holds {count} sample(s), fewer than the "
                            f"{MIN_CALIBRATION_SAMPLES}+ representative samples static ranges need")
    facts = graph_facts(fp32)
    # beside the registry, not in the temp dir: candidates are gated as sidecars of this registry's folder
    with scratch_folder("advise", registry.folder, hidden=True, what="scratch folder for the candidates") as (
            scratch, _):
        return _advise_in(registry, entry, settings, options, scratch, say, facts, calibration, warnings)


ESCALATIONS = ("exclusions", "optypes", "head", "a16w8")  # cheapest first: fewest float / 16-bit tensors


def _advise_in(registry: Registry, entry: Entry, settings: Settings, options: AdviseOptions, scratch: Path,
               say: Callable[[str], None], facts: GraphFacts, calibration: Path | None,
               warnings: list[str]) -> Advice:
    """Try the candidates in ``scratch`` and return the advice (the chosen sidecar's bytes kept in memory)."""
    run = _Run(registry, entry, settings, options, scratch, say)
    candidates, skipped = ptq_candidates(facts, options.stages, calibration is not None)
    run.planned = len(candidates)  # known up front: the progress line counts them all
    for stage in ("dynamic", "static", "int4"):
        batch = [c for c in candidates if c.stage == stage]
        run.planned -= len(batch)
        run.run_stage(batch, calibration)
    for row in skipped:
        run.add(row)
    for stage in ESCALATIONS:
        if stage in options.stages and (options.exhaustive or not run.passed_any):
            _escalation(run, stage, calibration)
    if options.exhaustive or not run.passed_any:
        _qat_stages(run, facts, calibration, warnings)
    advice = _decide(run, warnings, calibration)
    if advice.chosen is not None:
        path = advice.results[advice.chosen].path
        assert path is not None  # a passing candidate was gated, so it has a file
        from ..producers.provenance import provenance_path_for

        record = provenance_path_for(path)
        advice = dataclasses.replace(advice, sidecar=path.read_bytes(),
                                     provenance=record.read_bytes() if record.is_file() else None)
    return advice


def _escalation(run: _Run, stage: str, calibration: Path | None) -> None:
    """Run one escalation stage on the best static candidate, or record why it cannot run."""
    placeholder = _candidate(stage, "static", A16W8 if stage == "a16w8" else {},
                             "a16w8" if stage == "a16w8" else None)
    if calibration is None:
        run.add(CandidateResult(placeholder, "skip", NO_CALIBRATION))
        return
    late = run.out_of_time()
    if late is not None:
        run.add(CandidateResult(placeholder, "untried", late))
        return
    if stage == "a16w8":
        run.run_stage([placeholder], calibration)
        return
    base = _static_base(run)
    if base is None:
        run.add(CandidateResult(placeholder, "skip", "no static candidate was measured"))
        return
    ranking = run.ranking(base)
    if isinstance(ranking, str):
        run.add(CandidateResult(placeholder, "skip", ranking))
        return
    if stage == "exclusions":
        exclusion_stage(run, calibration, base, ranking.groups)
    elif stage == "optypes":
        types = op_type_order(ranking)[: run.options.max_exclusions]
        if not types:
            run.add(CandidateResult(placeholder, "skip", "the diagnosis named no op type to keep in fp32"))
            return
        run.run_stage([_candidate("optypes", "static", {**base.candidate.options, "op_types_to_exclude": [t]})
                       for t in types], calibration)
    else:
        head = head_nodes(ranking)
        if head is None:
            run.add(CandidateResult(placeholder, "skip", "the diagnosis found no head on the failing output's path"))
            return
        start, nodes = head
        options = {**base.candidate.options, "nodes_to_exclude": list(nodes)}
        run.run_stage([_candidate("head", "static", options, f"head in fp32: {len(nodes)} node(s) from {start}")],
                      calibration)


def _static_base(run: _Run) -> CandidateResult | None:
    """Return the measured 8-bit static candidate with the lowest drop (what the escalations start from)."""
    statics = [r for r in run.results if r.candidate.stage == "static" and r.path is not None and r.score is not None]
    return min(statics, key=_drop_key) if statics else None


def _qat_stages(run: _Run, facts: GraphFacts, calibration: Path | None, warnings: list[str]) -> None:
    """Try QAT and QAD when the entry has a recipe and recipes may run."""
    wanted = [s for s in ("qat", "qad") if s in run.options.stages]
    if not wanted:
        return
    entry = run.entry
    base = dict(entry.quant_options) if entry.mode == "qat" else {}
    if run.options.epochs_qat is not None:
        base["epochs_qat"] = run.options.epochs_qat
    variants = {"qat": base, "qad": {**base, "distill_weight": run.options.distill_weight, "fold_bn": True}}
    why = None
    if entry.qat_recipe is None:
        why = "the entry has no qat_recipe"
    elif not run.options.allow_recipes:
        why = "running the entry's qat_recipe needs --allow-recipes"
    elif not facts.single_input:
        why = "the QAT producer takes single-input models only"
    for stage in wanted:
        candidate = _candidate(stage, "qat", variants[stage])
        if why is not None:
            run.add(CandidateResult(candidate, "skip", why))
            continue
        if run.recipe is None:
            assert entry.qat_recipe is not None
            run.recipe = run.registry.resolve(entry, entry.qat_recipe, "qat_recipe")
        run.run_stage([candidate], calibration)


def _decide(run: _Run, warnings: list[str], calibration: Path | None) -> Advice:
    results = run.results
    passing = [i for i, r in enumerate(results) if r.passed]
    chosen = min(passing, key=lambda i: _cost(results[i])) if passing else None
    measured = [i for i, r in enumerate(results) if r.score is not None]
    best = chosen if chosen is not None else (min(measured, key=lambda i: (_drop_key(results[i]), _cost(results[i])))
                                              if measured else None)
    if chosen is not None:
        r = results[chosen]
        step = (f"review the table, then rerun with --write to adopt #{chosen + 1} "
                f"({r.candidate.mode} {r.candidate.label})")
    else:
        step = _next_step(run, calibration)
    rel = None
    if calibration is not None:
        rel = str(calibration)
    return Advice(run.entry.id, run.options.ep, tuple(results), chosen, best, step, tuple(warnings), rel,
                  elapsed_s=round(time.monotonic() - run.started, 3))


def _cost(result: CandidateResult) -> tuple[float, float]:
    ms = result.int8_ms if result.int8_ms is not None else math.inf
    size = float(result.int8_bytes) if result.int8_bytes is not None else math.inf
    return ms, size


def _drop_key(result: CandidateResult) -> float:
    return result.score if result.score is not None and math.isfinite(result.score) else math.inf


def _next_step(run: _Run, calibration: Path | None) -> str:
    entry, options = run.entry, run.options
    steps = []
    timed_out = sum("--max-minutes" in r.reason for r in run.results if r.status == "untried")
    if timed_out:
        steps.append(f"rerun with a larger --max-minutes ({timed_out} candidate(s) or stage(s) not tried; built "
                     "candidates come from the cache with --cache)")
    if calibration is None and "static" in options.stages:
        steps.append("give a calibration set (--calibration-set, 100+ representative samples) for static candidates")
    if entry.qat_recipe is None:
        steps.append(f"write a QAT recipe (qat_recipe in {run.registry.path.name}) and rerun with --allow-recipes")
    elif not options.allow_recipes:
        steps.append("rerun with --allow-recipes to try QAT and QAD with the entry's recipe")
    else:
        steps.append("tune the QAT recipe (epochs_qat, lr_qat, distill_weight) or keep the entry fp32")
    return "; ".join(steps) + f"; {RELAX_NOTE}"


# --------------------------------------------------------------------------------------------------------------
# Static with the most harmful nodes, op types or the output head kept in fp32


def exclusion_stage(run: _Run, calibration: Path, base: CandidateResult, groups: Sequence[tuple[str, ...]]) -> None:
    """Starting from the best static candidate, keep its most harmful nodes in fp32, greedily.

    Node groups are ranked on the soak samples where fp32 and that sidecar disagree most; each group is added to
    the exclusion list and the rebuilt sidecar re-gated on the full fixture; a group that does not lower the
    gate's drop is reverted. Stops at the first pass (unless ``exhaustive``) or after ``max_exclusions`` steps.
    """
    if not groups:
        run.add(CandidateResult(_candidate("exclusions", "static", {}), "skip",
                                "the diagnosis named no node to keep in fp32"))
        return
    assert base.score is not None
    steps = list(groups[: run.options.max_exclusions])
    run.planned += len(steps)
    kept: list[str] = []
    best = base.score
    for n, group in enumerate(steps):
        trial = kept + [name for name in group if name not in kept]
        candidate = _candidate("exclusions", "static", {**base.candidate.options, "nodes_to_exclude": trial})
        result = run.try_candidate(candidate, calibration)
        if result.passed and not run.options.exhaustive:
            passed = len(run.results)
            for rest in steps[n + 1:]:  # the next greedy steps, as groups: their lists depend on what is kept
                run.planned -= 1
                run.add(CandidateResult(_candidate("exclusions", "static", {"nodes_to_exclude": list(rest)}),
                                        "untried", f"not tried: #{passed} of this stage passed "
                                                   "(--exhaustive tries the rest)"))
            return
        if result.score is not None and result.score < best:
            kept, best = trial, result.score


@dataclass(frozen=True)
class Ranking:
    """The focused diagnosis of the best static candidate: ranked tensors, the failing output's path, node ops."""

    worst: tuple[TensorError, ...]
    path: PathInfo | None  # the focused output's path; None without a focus
    head_path: PathInfo | None  # the focused path, else the first output's whole ancestry
    groups: tuple[tuple[str, ...], ...]
    op_types: Mapping[str, str]  # fp32 node name -> op type
    produced: Mapping[str, str]  # fp32 tensor name -> the node computing it


def rank_exclusions(run: _Run, int8_path: Path) -> list[tuple[str, ...]]:
    """Return fp32 node groups, most harmful first, from activation/weight SQNR on the most-disagreeing samples.

    When the gate says what failed (``GateResult.focus``), the groups of tensors that feed it come first.
    """
    return list(rank(run, int8_path).groups)


def rank(run: _Run, int8_path: Path) -> Ranking:
    """Diagnose ``int8_path`` on the soak samples where it departs most from fp32, focused on what failed."""
    import onnx

    from ..analysis.diagnosis import diagnose
    from ..analysis.paths import tensors_on_path
    from ..records import Focus
    from ..runner.gate import measure, prepare

    settings = dataclasses.replace(run.settings, diagnose="off")
    # the gate's own streaming pass finds the samples where int8 departs most from fp32, on the EP advised for
    prepared = prepare(run.registry, run.entry.as_mode("static"), run.options.ep, settings, int8_pinned=False,
                       int8_path=int8_path)
    result, collector = measure(prepared, settings)
    plan = prepared.plan
    count = plan.batch if plan.fixed_batch else DISAGREEING_SAMPLES
    picked = sorted(collector.worst_samples(count, result.focus))
    chosen = prepared.fixture.take(picked)
    if plan.batched:
        feeds = [chosen]
    else:
        feeds = [{k: v[i] for k, v in chosen.items()} for i in range(len(picked))]
    focus = result.focus
    found = diagnose(run.fp32, int8_path, feeds, top=4 * run.options.max_exclusions, focus=focus)
    model = onnx.load(str(run.fp32), load_external_data=False)
    path = tensors_on_path(model, focus) if focus is not None else None
    # no focus: the first output's whole ancestry is the head's path (the node ranking stays unfocused)
    head_path = path if path is not None or not model.graph.output else tensors_on_path(
        model, Focus(model.graph.output[0].name))
    run.say(f"[{run.entry.id}] ranked on soak samples {picked}"
            + (f" for {focus.what or focus.output}" if focus is not None else "") + ": "
            + ", ".join(f"{t.tensor} {t.rank_key:.1f} dB" for t in found.worst[:6]))
    return Ranking(found.worst, path, head_path, tuple(exclusion_groups(found.worst, path)),
                   {n.name: n.op_type for n in model.graph.node if n.name},
                   {o: n.name for n in model.graph.node if n.name for o in n.output})


def exclusion_groups(worst: Sequence[TensorError], path: PathInfo | None = None) -> list[tuple[str, ...]]:
    """Return the fp32 node groups that keep ``worst``'s tensors in float, in order, without repeats.

    With the focused ``path``, groups of tensors that feed only the failing output's channels come first, then
    those of the other tensors on the path, then the rest, each in ``worst``'s order. A tensor marked ``on_path``
    by a focused diagnosis (which ranked the path already) keeps its place on or off it; otherwise its name (a
    weight's origin) is looked up in ``path``.
    """
    groups: list[tuple[str, ...]] = []
    for tensor in sorted(worst, key=lambda t: _tier(t, path)):  # stable: the diagnosis' order within a tier
        group = tensor.exclude or ((tensor.node,) if tensor.node else ())
        if group and group not in groups:
            groups.append(tuple(group))
    return groups


def _tier(tensor: TensorError, path: PathInfo | None) -> int:
    """Return 0 for a tensor feeding only the failing output, 1 for one shared with the rest, 2 off the path."""
    if path is None:
        return 0
    if tensor.on_path is not None:
        return 0 if tensor.on_path else 2
    # a weight renamed by a fusion is shown as "origin (int8 name)"
    name = tensor.tensor.split(" (", 1)[0] if tensor.kind == "weight" else tensor.tensor
    return 2 if not path.on_path(name) else 0 if path.specific(name) else 1


def op_type_order(ranking: Ranking) -> list[str]:
    """Return the op types of the ranked tensors' nodes, the failing output's path first, without repeats."""
    types: list[str] = []
    for tensor in sorted(ranking.worst, key=lambda t: _tier(t, ranking.path)):
        for node in tensor.exclude or ((tensor.node,) if tensor.node else ()):
            op = ranking.op_types.get(node)
            if op is not None and op not in types:
                types.append(op)
    return types


def head_nodes(ranking: Ranking) -> tuple[str, tuple[str, ...]] | None:
    """Return the on-path tensor with the most local loss and the fp32 nodes from it to the failing output.

    The distance (in nodes) from the output of the most harmful activation on the path bounds the head: every
    path node whose output lies that close to the output or closer stays in fp32.
    """
    path = ranking.head_path
    if path is None:
        return None
    on_path = [t for t in ranking.worst if t.kind != "weight" and t.tensor in path.distance
               and t.tensor in ranking.produced]
    if not on_path:
        return None
    start = min(on_path, key=lambda t: t.rank_key)  # the tensor where most of the loss is made
    reach = path.distance[start.tensor]
    nodes = [name for tensor, name in ranking.produced.items()
             if tensor in path.distance and path.distance[tensor] <= reach]
    return start.tensor, tuple(dict.fromkeys(nodes))


# --------------------------------------------------------------------------------------------------------------
# Output: table, JSON, PR body


def _fmt(value: float | None, digits: int = 6) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_budget(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def table_lines(advice: Advice) -> list[str]:
    """Return the fixed-width table of every candidate (the chosen one marked ``*``)."""
    rows = [("#", "stage", "mode", "options", "drop", "interval", "budget", "use", "int8 ms", "size KB", "build",
             "verdict")]
    for i, r in enumerate(advice.results):
        interval = f"[{r.interval[0]:.6f}, {r.interval[1]:.6f}]" if r.interval else "n/a"
        size = f"{r.int8_bytes / 1024:.1f}" if r.int8_bytes is not None else "n/a"
        ms = f"{r.int8_ms:.3f}" if r.int8_ms is not None else "n/a"
        verdict = r.verdict if r.verdict else r.status.upper()
        mark = "*" if i == advice.chosen else " "
        build = "cached" if r.cached else f"{r.build_s:.1f} s" if r.build_s is not None else "n/a"
        use = f"{r.score:.0%}" if r.score is not None and math.isfinite(r.score) else "n/a"
        rows.append((f"{mark}{i + 1}", r.candidate.stage, r.candidate.mode, r.candidate.label, _fmt(r.drop), interval,
                     _fmt_budget(r.budget), use, ms, size, build, verdict))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    reasons = [f"  #{i + 1}: {r.reason}" for i, r in enumerate(advice.results)
               if r.reason and (r.status in ("error", "skip", "untried") or not r.passed)]
    return lines + (["", "why:"] + reasons if reasons else [])


def _measured(r: CandidateResult, relation: str) -> str:
    """Return "drop D <= budget B", or the budget use of a candidate judged by its task (no PLCC drop)."""
    if r.drop is None and r.score is not None:
        return f"budget use {r.score:.0%} (the largest share of a judged budget)"
    return f"drop {_fmt(r.drop)} {relation} budget {_fmt_budget(r.budget)}"


def summary_lines(advice: Advice) -> list[str]:
    """Return the verdict lines under the table."""
    out = [f"warning: {w}" for w in advice.warnings]
    if advice.found:
        assert advice.chosen is not None
        r = advice.results[advice.chosen]
        out.append(f"{advice.entry_id}: chosen #{advice.chosen + 1}: {r.candidate.mode} ({r.candidate.label}), "
                   f"{_measured(r, '<=')}, int8 {_fmt(r.int8_ms, 3)} ms, {r.int8_bytes} bytes")
        timing = r.gate.timing if r.gate is not None else None
        if timing is not None and timing.speedup is not None and timing.speedup < 1.0:
            # a pass on accuracy alone: say so rather than let a slower "int8" model look like a win
            out.append(f"warning: #{advice.chosen + 1} runs at x{timing.speedup:.2f} the speed of fp32 on this "
                       f"machine (int8 {timing.int8_ms:.3f} ms vs fp32 {timing.fp32_ms:.3f} ms per sample); set "
                       f"quant_min_speedup in the entry to require a speed-up, or keep the model fp32")
    else:
        out.append(f"{advice.entry_id}: no candidate passes its budget")
        if advice.best is not None:
            r = advice.results[advice.best]
            out.append(f"{advice.entry_id}: best was #{advice.best + 1}: {r.candidate.mode} ({r.candidate.label}), "
                       f"{_measured(r, 'vs')}")
    out.append(f"{advice.entry_id}: next step: {advice.next_step}")
    return out


def pr_body(advice: Advice, registry: Registry, settings: Settings) -> str:
    """Return the markdown body of the per-model PR ADR-0208 asks for (decision, measured table, reproduce)."""
    entry = registry.entry(advice.entry_id)
    lines = [f"# Quantise `{entry.id}`: " + (
        f"{advice.results[advice.chosen].candidate.mode} ({advice.results[advice.chosen].candidate.label})"
        if advice.chosen is not None else "no candidate meets the budget"), ""]
    lines += ["## Context", "",
              (f"`quantgate advise` built every candidate of ADR-0129's escalation order for `{entry.id}` "
              f"(`{entry.onnx}`) and gated each on the soak fixture with the gate's own statistics "
              f"(EP `{advice.ep}`, batch {settings.batch_size}, {settings.bootstrap} bootstrap resamples, "
              f"decision `{settings.decision}`). The budget was not changed."), ""]
    lines += ["## Decision", ""]
    if advice.chosen is not None:
        r = advice.results[advice.chosen]
        lines.append(f"Adopt candidate #{advice.chosen + 1}: `quant_mode: \"{r.candidate.mode}\"`, `quant_options: "
                     f"{json.dumps(dict(r.candidate.options), sort_keys=True)}`: the fastest passing candidate "
                     f"(int8 {_fmt(r.int8_ms, 3)} ms per batch, {r.int8_bytes} bytes), int8_sha256 `{r.sha256}`.")
    else:
        lines.append(f"No candidate passes. Next step: {advice.next_step}.")
    lines += ["", "## Empirical delta (fp32 baseline vs int8, soak fixture)", "",
              "| # | stage | mode | options | PLCC drop | interval | budget | int8 ms | size (bytes) | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(advice.results):
        interval = f"[{r.interval[0]:.6f}, {r.interval[1]:.6f}]" if r.interval else "n/a"
        verdict = (r.verdict or r.status.upper()) + (" (chosen)" if i == advice.chosen else "")
        options = r.candidate.label.replace("|", "\\|")
        lines.append(f"| {i + 1} | {r.candidate.stage} | {r.candidate.mode} | {options} | {_fmt(r.drop)} | {interval} "
                     f"| {_fmt_budget(r.budget)} | {_fmt(r.int8_ms, 3)} "
                     f"| {r.int8_bytes if r.int8_bytes is not None else 'n/a'} "
                     f"| {verdict} |")
    notes = [f"* #{i + 1}: {r.reason}" for i, r in enumerate(advice.results)
             if r.status in ("skip", "error", "untried")]
    notes += [f"* warning: {w}" for w in advice.warnings]
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += ["", "## Reproduce", "", "```",
              f"quantgate advise {registry.path.name} --id {entry.id} --ep {advice.ep}"
              + (" --write" if advice.chosen is not None else ""),
              f"quantgate measure {registry.path.name} --id {entry.id} --ep {advice.ep}", "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# --write: the sidecar and the registry change


def _registry_relative(path: Path, registry: Registry, settings: Settings) -> str:
    """Return how the registry names a calibration set: relative to its folder, else to the fixtures folder."""
    for base in (registry.folder, settings.fixtures_dir):
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    raise AdviseError(f"--calibration-set {path}: the registry can only name files under {registry.folder} or "
                      f"{settings.fixtures_dir}; copy it there and rerun")


def registry_change(advice: Advice, registry: Registry, settings: Settings) -> tuple[dict[str, Any], str]:
    """Return the fields the chosen candidate sets and the new registry text (validated, nothing written)."""
    from ..errors import RegistryError
    from ..fileio import sha256_file
    from ..io.registry import parse_registry, pin_text
    from ..producers.build import pinned_build
    from ..producers.provenance import embedded_provenance

    if advice.chosen is None:
        raise AdviseError(f"{advice.entry_id}: nothing passed, nothing to write")
    r = advice.results[advice.chosen]
    entry = registry.entry(advice.entry_id)
    strings: dict[str, str] = {"quant_mode": r.candidate.mode}
    if entry.sha256 is None:
        strings["sha256"] = sha256_file(registry.fp32_path(entry))
    assert r.sha256 is not None
    strings["int8_sha256"] = r.sha256
    if r.candidate.mode == "static":
        assert advice.calibration is not None
        strings["quant_calibration_set"] = _registry_relative(Path(advice.calibration), registry, settings)
    changed: dict[str, Any] = {k: v for k, v in strings.items() if entry.source.get(k) != v}
    changed["quant_options"] = dict(r.candidate.options)
    # the chosen sidecar's build, as `quantgate pin` records it: a later rebuild is explained against it
    build = pinned_build(embedded_provenance(advice.sidecar)[1] if advice.sidecar is not None else None)
    if build is not None or "int8_build" in entry.source:
        changed["int8_build"] = build
    text = registry.path.read_text(encoding="utf-8")
    try:
        new = pin_text(text, {entry.id: changed}, registry.path)
    except RegistryError as exc:
        raise AdviseError(str(exc)) from None
    expected = json.loads(text)
    for raw in expected["models"]:
        if isinstance(raw, dict) and raw.get("id") == entry.id:
            raw.update(changed)
    if json.loads(new) != expected:
        raise AdviseError(f"{registry.path}: the edit would change more than entry {entry.id!r}; edit it by hand")
    parsed = parse_registry(json.loads(new), registry.path)
    problems = [p.message for p in parsed.problems if p.label == entry.id]
    if problems:
        raise AdviseError("; ".join(problems))
    return changed, new


def write_choice(advice: Advice, registry: Registry, settings: Settings) -> dict[str, Any]:
    """Write the chosen sidecar (and its provenance) and the registry change together; return the fields.

    Every file is written in full to its partial before any is renamed into place, so a write that fails (a
    full disk, a read-only folder) leaves the sidecar and the registry as they were, never one without the other.
    """
    from ..fileio import atomic_path
    from ..producers.provenance import provenance_path_for

    fields, text = registry_change(advice, registry, settings)  # validated before anything is written
    assert advice.sidecar is not None
    entry = registry.entry(advice.entry_id)
    int8 = registry.int8_path(entry)
    files = [(registry.path, text.encode("utf-8"), "registry"), (int8, advice.sidecar, "int8 sidecar")]
    if advice.provenance is not None:
        files.append((provenance_path_for(int8), advice.provenance, "provenance record"))
    with contextlib.ExitStack() as stack:
        # contexts close in reverse: the sidecar lands before the registry that pins it
        for path, data, what in files:
            tmp = stack.enter_context(atomic_path(path, what=what, size=len(data)))
            with open(tmp, "r+b") as handle:
                handle.write(data)
    return fields


# --------------------------------------------------------------------------------------------------------------
# Command line (``quantgate advise``; registered in cli.py)


def add_arguments(parser: Any) -> None:
    """Add advise's own options (the registry and gate options come from cli.py)."""
    from ..settings import positive_int

    group = parser.add_argument_group("advise")
    group.add_argument("--all-failing", action="store_true",
                       help="advise every gated entry whose current sidecar fails (instead of --id)")
    group.add_argument("--calibration-set", type=Path, default=None, metavar="NPZ",
                       help="calibration .npz for static candidates (default: the entry's quant_calibration_set)")
    group.add_argument("--stages", default=",".join(STAGES), metavar="S[,S...]",
                       help=f"candidate stages to try (default: {','.join(STAGES)})")
    # --allow-recipes comes with the gate options (settings.add_gate_args): regeneration and advise share it
    group.add_argument("--epochs-qat", type=positive_int, default=None, metavar="N",
                       help="QAT/QAD epochs (default: the entry's quant_options, else the producer's)")
    group.add_argument("--distill-weight", type=float, default=1.0, metavar="W",
                       help="QAD: weight of the teacher loss against the task loss (default: 1.0, teacher only)")
    group.add_argument("--max-exclusions", type=positive_int, default=MAX_EXCLUSION_STEPS, metavar="N",
                       help=f"greedy exclusion steps at most (default: {MAX_EXCLUSION_STEPS})")
    group.add_argument("--exhaustive", action="store_true",
                       help="try every candidate of every stage (default: stop a stage at its first passing "
                            "candidate, and escalate only while nothing passes)")
    group.add_argument("--max-minutes", type=_minutes_arg, default=None, metavar="M",
                       help="start no candidate after M minutes (the table lists those not tried)")
    group.add_argument("--write", action="store_true",
                       help="write the chosen sidecar and the registry change (default: print only)")
    group.add_argument("--pr-body", type=Path, default=None, metavar="PATH",
                       help="write the markdown body of the per-model PR (ADR-0208)")


def _minutes_arg(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of minutes >= 0")
    return value


def run_command(ns: Any, settings: Settings, out: Callable[[str], None], err: Callable[[str], None]) -> int:
    """Run ``quantgate advise`` from parsed arguments; return 0 found, 1 none passes, 2 bad input."""

    from ..errors import InputError
    from ..fileio import atomic_write_text
    from ..io.registry import load_registry

    eps = list(dict.fromkeys(ns.eps or ["cpu"]))
    if len(eps) != 1 or eps[0] == "auto":
        err("quantgate advise: error: give exactly one --ep (cpu, cuda or openvino)")
        return EXIT_ERROR
    if bool(ns.ids) == bool(ns.all_failing):
        err("quantgate advise: error: give --id ID or --all-failing (not both)")
        return EXIT_ERROR
    if not math.isfinite(ns.distill_weight) or not 0.0 <= ns.distill_weight <= 1.0:
        err(f"quantgate advise: error: --distill-weight {ns.distill_weight} must lie in [0, 1]")
        return EXIT_ERROR
    options = AdviseOptions(ep=eps[0], stages=tuple(s.strip() for s in ns.stages.split(",") if s.strip()),
                            calibration_set=ns.calibration_set, allow_recipes=ns.allow_recipes,
                            epochs_qat=ns.epochs_qat, max_exclusions=ns.max_exclusions,
                            distill_weight=ns.distill_weight, exhaustive=ns.exhaustive,
                            max_minutes=ns.max_minutes,
                            # --cache: built candidates are kept under --cache-dir and re-gated on the next run
                            cache_dir=ns.cache_dir.resolve() / "advise" if settings.cache else None)
    try:
        registry = load_registry(ns.registry)
        if ns.all_failing:
            entries = failing_entries(registry, options.ep, settings)
            if not entries:
                out(f"{registry.path}: no gated entry fails on {options.ep}; nothing to advise")
                return EXIT_FOUND
        else:
            from ..errors import RegistryError
            from ..runner.plan import select

            try:
                entries = select(registry, ns.ids, "--id")[0]
            except RegistryError as exc:
                raise AdviseError(str(exc)) from None
        advices: list[Advice] = []
        bodies: list[str] = []
        for entry in entries:
            advice = advise(registry, entry, settings, options, say=err)
            advices.append(advice)
            out(f"== {entry.id} ({options.ep}) ==")
            for line in table_lines(advice) + [""] + summary_lines(advice):
                out(line)
            if ns.write and advice.found:
                fields = write_choice(advice, registry, settings)
                registry = load_registry(registry.path)  # the next entry's edit starts from the written file
                out(f"{entry.id}: wrote {registry.int8_path(registry.entry(entry.id))} and {registry.path} "
                    f"({', '.join(sorted(fields))})")
            bodies.append(pr_body(advice, registry, settings))
            out("")
        if ns.json_out is not None:
            data: Any = [a.to_dict() for a in advices]
            atomic_write_text(ns.json_out, json.dumps(data if ns.all_failing else data[0], indent=2) + "\n",
                              "JSON advice")
        if ns.pr_body is not None:
            atomic_write_text(ns.pr_body, "\n\n".join(bodies), "PR body")
    except (AdviseError, InputError) as exc:
        err(f"quantgate advise: error: {exc}")
        return EXIT_ERROR
    return EXIT_FOUND if all(a.found for a in advices) else EXIT_NONE


def failing_entries(registry: Registry, ep: str, settings: Settings) -> list[Entry]:
    """Return the gated entries whose current sidecar fails the gate on ``ep``."""
    from ..runner.gate import run_one

    return [e for e in registry.entries if e.gated and run_one(registry, e, ep, settings).status == "fail"]
