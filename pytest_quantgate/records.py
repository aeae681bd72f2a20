"""The typed records a gate run produces, and their one JSON round trip.

Every record is a frozen dataclass. :func:`dump` turns any of them into JSON-ready data and :func:`load` turns
that data back into the same record, checking each field against its annotation; reports, the HTML page, the
cache and xdist's report attributes all use this one pair, so there is no hand-written row shape to drift.

A field may name its JSON key in ``field(metadata={"json": ...})``. Keys the record does not know are ignored
when loading (derived values such as ``headroom`` are written for readers, not read back).

JSON has no infinities or NaN, so non-finite floats are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"``
and read back as floats (Python's ``json`` would otherwise write ``Infinity``, which strict parsers refuse).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, TypeVar, Union

T = TypeVar("T")


class RecordError(ValueError):
    """JSON data that does not fit the record it is loaded as; the message names the field path."""


# --- the records --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """On-disk size and latency per sample of both models, from the gate's own runs of the soak fixture."""

    fp32_bytes: int
    int8_bytes: int
    fp32_ms: float
    int8_ms: float
    speedup: float | None  # total fp32 run time / total int8 run time over the same feeds
    batch: int | None  # the batch the models ran at (None: one sample per run)
    runs: int

    @property
    def size_ratio(self) -> float | None:
        """Return int8 bytes / fp32 bytes."""
        return self.int8_bytes / self.fp32_bytes if self.fp32_bytes else None


@dataclass(frozen=True)
class FileRef:
    """A file a verdict depends on, by path and content hash."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Provenance:
    """What produced a verdict: the files, the EP as ONNX Runtime resolved it, the statistics, the machine."""

    fp32: FileRef
    int8: FileRef
    fixture: FileRef
    ep: str
    providers: tuple[str, ...]
    provider_options: Mapping[str, Any]
    onnxruntime: str
    graph_optimization_level: str
    quantgate: str
    bootstrap: int
    seed: int
    decision: str
    system: Mapping[str, Any]  # cpu (model, isa, machine), python, platform, time
    session_config: Mapping[str, str] = field(default_factory=dict)  # ORT session config entries both sessions had


@dataclass(frozen=True)
class LineageRecord:
    """Whether the sidecar is quantised from this fp32 model (see :mod:`.lineage`)."""

    ok: bool
    reasons: tuple[str, ...]
    weights_matched: int
    weights_total: int


@dataclass(frozen=True)
class PlotData:
    """The HTML report's plot of one output: evenly spaced values of both models and the error histogram."""

    output: str
    fp32: tuple[float, ...]
    int8: tuple[float, ...]
    target: tuple[float, ...] | None
    hist_edges: tuple[float, ...]
    hist_counts: tuple[int, ...]
    hist_clipped: int


@dataclass(frozen=True)
class TensorError:
    """The quantisation error of one tensor.

    ``sqnr_db`` is the local error (fp32 weight vs its dequantised int8 value; an activation before vs after its
    Q/DQ pair), ``xmodel_db`` the accumulated one (fp32 model tensor vs int8 model tensor of the same name).
    ``exclude`` lists the fp32 node names whose exclusion keeps this tensor in float. ``on_path`` says whether the
    tensor feeds what the gate found failing (its :class:`Focus`); None when the diagnosis had no focus.
    """

    kind: str  # "weight" | "activation" | "output"
    tensor: str
    node: str | None
    sqnr_db: float | None
    xmodel_db: float | None = None
    exclude: tuple[str, ...] = ()
    on_path: bool | None = None

    @property
    def rank_key(self) -> float:
        """Return the SQNR this tensor is ranked by (local when known, else accumulated)."""
        value = self.sqnr_db if self.sqnr_db is not None else self.xmodel_db
        return float("inf") if value is None or math.isnan(value) else value


@dataclass(frozen=True)
class Diagnosis:
    """Ranked per-tensor errors of one int8 sidecar against its fp32 original, and what to try."""

    fp32_path: str
    int8_path: str
    format: str  # "qdq" | "dynamic" | "qoperator" | "unknown"
    feeds: int
    worst: tuple[TensorError, ...] = ()
    outputs: tuple[TensorError, ...] = ()
    analysed: tuple[str, ...] = ()  # what was compared: "weights", "activations", "outputs"
    suggestion: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    samples: tuple[int, ...] = ()  # the fixture samples the feeds came from (where int8 departs most)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form (infinities become the strings "inf"/"-inf")."""
        data: dict[str, Any] = dump(self)
        return data



# --- the verdict: metrics, results and outcomes (every layer reads them, so they live here) -------------------


@dataclass(frozen=True)
class PairMetrics:
    """How closely ``y`` follows ``x`` (both flattened, float64)."""

    n: int
    plcc: float
    srocc: float
    krcc: float
    rmse: float
    mae: float
    max_abs: float
    slope: float
    intercept: float
    offset_rel: float  # |intercept + (slope - 1)·mean(x)| / std(x): the affine error at the mean, in std units


@dataclass(frozen=True)
class Interval:
    """A two-sided bootstrap percentile interval of the drop."""

    low: float
    high: float
    level: float
    replicates: int


PASS: Final = "PASS"
FAIL: Final = "FAIL"
INCONCLUSIVE: Final = "INCONCLUSIVE"  # three-way rule: the interval straddles the budget (engine/sequential.py)
# the verdict of a measured result; an item that could not be measured is an Outcome with status error or skip
Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE"]
# why a result failed (or "pass"): one per budget check, so reports, remedies and tests can dispatch on it
Kind = Literal["pass", "drop", "relative", "nonfinite", "constant", "affine", "mae", "max_abs", "speed", "labels",
               "lineage", "rebuild", "accuracy", "threshold", "detections", "embedding", "inconclusive"]


@dataclass(frozen=True)
class SequentialRecord:
    """How a sequential run (``--quantgate-sequential``) stopped: samples used of the fixture's, looks, method."""

    method: str
    samples_used: int
    samples_planned: int
    looks: int
    stopped_early: bool  # the verdict was settled before the fixture's end: the other samples were not run
    first_look: int  # no look before this many samples

    @property
    def share(self) -> float:
        """Return the share of the fixture's samples that were run."""
        return self.samples_used / self.samples_planned if self.samples_planned else 1.0


@dataclass(frozen=True)
class LabelReport:
    """Agreement of an integer output (or of argmax along an axis): flip rate against its budget."""

    what: str  # "labels" or "argmax(axis=k)"
    flip_rate: float
    budget: float
    interval: Interval | None = None
    # against an integer class-id target (argmax views): both models' accuracy and the drop, with its interval
    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None
    accuracy_interval: Interval | None = None
    budget_accuracy: float | None = None  # quant_outputs budget_accuracy: it then decides instead of the flips


@dataclass(frozen=True)
class ThresholdChannel:
    """Decisions ``x >= threshold`` of one channel: how many cross it in either model and how many disagree."""

    channel: int
    either: int  # elements over the threshold in fp32 or int8
    disagree: int  # elements over it in exactly one model
    fp32_over: int
    int8_over: int
    interval: Interval | None = None  # of the flip share disagree / either

    @property
    def flip_share(self) -> float:
        """Return disagree / either (0.0 when nothing crosses the threshold in either model)."""
        return self.disagree / self.either if self.either else 0.0


@dataclass(frozen=True)
class ThresholdReport:
    """A dense score output judged by its decisions (``quant_outputs`` threshold): one row per declared channel."""

    threshold: float
    budget: float  # budget_threshold_flip
    channels: tuple[ThresholdChannel, ...]
    worst_channel: int | None = None  # the channel of the largest flip share among those that cross


@dataclass(frozen=True)
class ClassDetections:
    """Detections of one class: fp32, int8, and those matched by class and IoU."""

    cls: int
    fp32: int
    int8: int
    matched: int
    judged: bool = False  # at least min_class_detections fp32 detections: judged on its own
    missed_interval: Interval | None = None

    @property
    def missed(self) -> float:
        """Return the share of fp32 detections int8 misses (0.0 without fp32 detections)."""
        return 1.0 - self.matched / self.fp32 if self.fp32 else 0.0


@dataclass(frozen=True)
class DetectionReport:
    """A raw detector head judged by its decoded detections (``quant_outputs`` detections)."""

    fp32: int
    int8: int
    matched: int
    budget_missed: float
    budget_extra: float
    missed_interval: Interval | None = None
    extra_interval: Interval | None = None
    classes: tuple[ClassDetections, ...] = ()  # every class with a detection in either model

    @property
    def missed(self) -> float:
        """Return the share of fp32 detections int8 misses."""
        return 1.0 - self.matched / self.fp32 if self.fp32 else 0.0

    @property
    def extra(self) -> float:
        """Return the share of int8 detections fp32 does not have."""
        return 1.0 - self.matched / self.int8 if self.int8 else 0.0


@dataclass(frozen=True)
class EmbeddingReport:
    """An embedding output judged by per-sample cosine similarity and nearest-neighbour agreement."""

    axis: int
    cosine_distance: float  # mean 1 - cos(fp32, int8) over samples
    budget_cosine: float
    neighbours_recall: float | None = None  # recall@k of each kept sample's fp32 neighbours among its int8 ones
    neighbours_k: int = 10
    neighbours_samples: int = 0  # samples the neighbour search ran over (a bounded, seeded subset past the cap)
    budget_neighbours: float | None = None
    interval: Interval | None = None  # of the mean cosine distance


@dataclass(frozen=True)
class Focus:
    """What failed, as precisely as the gate knows it: an output, and a channel or class of it."""

    output: str
    channel_axis: int | None = None
    channels: tuple[int, ...] = ()  # along channel_axis: a failing channel, or a detector's failing class rows
    what: str = ""  # e.g. "channel 9 along axis 1", "class 7", "positions where 'attention_mask' is set"


@dataclass(frozen=True)
class OutputReport:
    """Metrics of one output: int8 vs fp32, and fp32/int8 vs target where the output has one."""

    name: str
    drop: float
    vs_fp32: PairMetrics
    fp32_vs_target: PairMetrics | None = None
    int8_vs_target: PairMetrics | None = None
    channels: int = 1
    channel_axis: int | None = None
    worst_channel: int | None = None
    worst_channel_drop: float | None = None
    labels: LabelReport | None = None
    ignored: bool = False  # quant_outputs ignore: run and reported, never judged
    mask: str | None = None  # quant_outputs mask: the fixture array whose non-zero positions every statistic counts
    thresholds: ThresholdReport | None = None
    detections: DetectionReport | None = None
    embedding: EmbeddingReport | None = None

    def budget_shares(self) -> list[float]:
        """Return each task measure of this output over its budget (labels, decisions, detections, embedding)."""
        def share(value: float, budget: float) -> float:
            return value / budget if budget > 0 else (0.0 if value <= 0 else float("inf"))

        out: list[float] = []
        if self.labels is not None:
            lab = self.labels
            if lab.budget_accuracy is not None and lab.fp32_accuracy is not None and lab.int8_accuracy is not None:
                out.append(share(lab.fp32_accuracy - lab.int8_accuracy, lab.budget_accuracy))
            else:
                out.append(share(lab.flip_rate, lab.budget))
        if self.thresholds is not None:
            out += [share(row.flip_share, self.thresholds.budget) for row in self.thresholds.channels if row.either]
        if self.detections is not None:
            det = self.detections
            out += [share(det.missed, det.budget_missed), share(det.extra, det.budget_extra)]
            out += [share(c.missed, det.budget_missed) for c in det.classes if c.judged]
        if self.embedding is not None:
            emb = self.embedding
            out.append(share(emb.cosine_distance, emb.budget_cosine))
            if emb.neighbours_recall is not None and emb.budget_neighbours is not None:
                out.append(share(1.0 - emb.neighbours_recall, 1.0 - emb.budget_neighbours))
        return out


@dataclass(frozen=True)
class GateResult:
    """The verdict of one entry on one EP, with every number needed to explain it."""

    entry_id: str = field(metadata={"json": "id"})
    ep: str
    mode: str
    samples: int
    budget: float
    verdict: Verdict
    reason: str
    kind: Kind
    drop: float | None = None
    interval: Interval | None = None
    outputs: tuple[OutputReport, ...] = ()
    compare: str = "output"
    decision: str = "point"
    needed_samples: int | None = None
    warnings: tuple[str, ...] = ()
    also: tuple[str, ...] = ()  # further budget breaches after the first
    fp32_probe: tuple[float, ...] = ()  # a few fp32 output values, to compare the fp32 baseline across EPs
    timing: Timing | None = None
    provenance: Provenance | None = None
    lineage: LineageRecord | None = None
    diagnosis: Diagnosis | None = None
    plot: PlotData | None = None
    focus: Focus | None = None  # what failed: the output and the channel or classes the FAIL is about
    focus_plot: PlotData | None = None  # the plot of what failed: the focused channels, classes or masked positions
    sequential: SequentialRecord | None = None  # --quantgate-sequential: where the sequence stopped

    @property
    def passed(self) -> bool:
        """Return True when the sidecar passed."""
        return self.verdict == PASS

    @property
    def headroom(self) -> float | None:
        """Return budget / drop (how many times the drop fits in the budget); inf when drop <= 0.

        Without a PLCC drop (outputs judged by labels, decisions, detections or embeddings), 1 / budget_use: how
        many times the most used budget fits.
        """
        if self.drop is None:
            use = self.budget_use
            return None if use is None else (float("inf") if use <= 0 else 1.0 / use)
        return float("inf") if self.drop <= 0 else self.budget / self.drop

    @property
    def budget_use(self) -> float | None:
        """Return the largest share of a budget any judged measure uses (over 1: that budget is broken).

        One number for every kind of verdict, so candidates judged by detections, decisions or embeddings rank
        like those judged by the PLCC drop: drop / budget, label flips, accuracy, threshold flips, missed and
        extra detections, cosine distance, each over its own budget; a neighbour-recall floor f counts as
        (1 − recall) / (1 − f). Ignored outputs do not count; None when nothing was measured.
        """
        shares: list[float] = []
        if self.drop is not None and self.budget > 0:
            shares.append(self.drop / self.budget)
        for out in self.outputs:
            if out.ignored:
                continue
            shares += out.budget_shares()
        return max(shares) if shares else None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form (:func:`records.dump`, plus the derived headroom for readers of the report)."""
        data: dict[str, Any] = dump(self)
        data["headroom"] = dump(self.headroom)
        data["budget_use"] = dump(self.budget_use)
        if self.timing is not None:
            data["timing"]["size_ratio"] = self.timing.size_ratio
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GateResult:
        """Rebuild the result from :meth:`to_json`'s form; raise RecordError naming a field that does not fit."""
        return load(cls, data)


# what happened to an item: measured (pass, fail), not measurable (error: bad input), or not run here (skip)
# inconclusive: measured under the three-way rule, the interval straddles the budget (neither pass nor fail)
Status = Literal["pass", "fail", "error", "skip", "inconclusive"]


@dataclass(frozen=True)
class Outcome:
    """What happened to one (entry, EP): pass, fail, error or skip, with the result when one was measured.

    A cached outcome (``cached=True``) carries the result of the earlier passing run it stands for.
    """

    entry_id: str = field(metadata={"json": "id"})
    ep: str
    mode: str
    status: Status
    message: str = field(metadata={"json": "reason"})  # why: the result's reason, or what went wrong
    result: GateResult | None = None
    regenerated: str | None = None
    cached: bool = False
    notes: tuple[str, ...] = ()  # warnings for the user (a rebuilt sidecar that differs from its pin)
    traceback: str | None = None  # an unexpected exception's traceback (JSON report, or -v)
    log: tuple[str, ...] = ()  # the summary of what ORT and its tooling logged meanwhile

    @property
    def verdict(self) -> str:
        """Return the verdict shown for the item: PASS, FAIL, ERROR, SKIP or INCONCLUSIVE."""
        return self.status.upper()

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form: the JSON report's items and the attribute xdist carries to the controller."""
        data: dict[str, Any] = dump(replace(self, result=None))
        data["verdict"] = self.verdict
        data["result"] = self.result.to_json() if self.result is not None else None
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Outcome:
        """Rebuild an outcome from :meth:`to_json`'s form; raise RecordError naming a field that does not fit."""
        return load(cls, data)


def read_report(data: Any) -> list[Outcome]:
    """Return the outcomes of a JSON report (:func:`report_document`'s form, or measure's list of items)."""
    items = data.get("items") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise RecordError("report: expected a list of items or an object with 'items'")
    return [Outcome.from_json(item) for item in items]


# --- the one JSON round trip --------------------------------------------------------------------------------------


def dump(value: Any) -> Any:
    """Return ``value`` (a record, or anything inside one) as JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {_key(f): dump(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [dump(v) for v in value]
    if hasattr(value, "item"):  # a numpy scalar
        return dump(value.item())
    return str(value)


def load(cls: type[T], data: Any, where: str = "") -> T:
    """Return the record of type ``cls`` that :func:`dump` wrote as ``data``; raise RecordError naming the field."""
    return typing.cast(T, _load(cls, data, where or cls.__name__))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _key(f: dataclasses.Field[Any]) -> str:
    """Return the JSON key of a field: its name, or ``metadata["json"]`` (``entry_id`` is ``id`` in reports)."""
    return str(f.metadata.get("json", f.name))


def _load(tp: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return data
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _load(option, data, where)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError(errors[0] if len(errors) == 1 else f"{where}: {data!r} fits none of {tp}")
    if origin is Literal:
        if data not in typing.get_args(tp):
            raise RecordError(f"{where}: {data!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}")
        return data
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, Mapping):
            raise RecordError(f"{where}: expected an object for {tp.__name__}, got {type(data).__name__}")
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            key = _key(f)
            if key in data:
                kwargs[f.name] = _load(hints[f.name], data[key], f"{where}.{key}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}.{key}: missing")
        return tp(**kwargs)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(data, (list, tuple)):
            raise RecordError(f"{where}: expected a list, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_load(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(args) != len(data):
            raise RecordError(f"{where}: expected {len(args)} items, got {len(data)}")
        return tuple(_load(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        if not isinstance(data, Mapping):
            raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
        args = typing.get_args(tp) or (str, Any)
        return {str(k): _load(args[1], v, f"{where}.{k}") for k, v in data.items()}
    if tp is float:
        if isinstance(data, str) and data in ("inf", "-inf", "nan"):
            return float(data)
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
        raise RecordError(f"{where}: expected a number, got {data!r}")
    if tp is int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
        raise RecordError(f"{where}: expected an integer, got {data!r}")
    if tp is bool:
        if isinstance(data, bool):
            return data
        raise RecordError(f"{where}: expected true or false, got {data!r}")
    if tp is str:
        if isinstance(data, str):
            return data
        raise RecordError(f"{where}: expected a string, got {data!r}")
    raise RecordError(f"{where}: cannot load a {tp!r}")
