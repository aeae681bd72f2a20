"""Turn streamed fp32 and int8 outputs into a verdict: what is compared, the budgets, one decision.

The statistics are folded chunk by chunk into per-sample sums (:mod:`.streaming`); this module decides what
each output is (values, labels), how it is viewed (residual, channels, argmax), and what the sums mean.

What is compared
    Per output, over every fixture sample (float64 sums): the int8 output against the fp32 output, and
    both against the fixture's ``target`` where it has one.
    Channels: an output of rank ≥ 3 (samples first) is also judged per channel along axis 1 (NCHW maps,
    ``[N, 4 + classes, anchors]`` detector heads; at most MAX_DEFAULT_CHANNELS of them) unless the entry sets
    ``quant_channel_axis`` (an axis, or null for none); the output's drop is the larger of the whole-output
    drop and the worst channel's, so a collapsed score channel fails even when the box channels dominate the
    flattened correlation. Rank-2
    outputs (a feature or logit vector per sample) are not split: one value per sample and channel is too
    little to correlate. A channel whose fp32 values are constant is skipped; an int8 channel that is
    constant where fp32 varies counts as a drop of 1.
    Labels: integer, boolean and string outputs (class ids from ArgMax, masks, class names) are compared by
    agreement, never by PLCC: the flip rate (share of elements that differ) must stay within
    ``quant_budget_label_flip`` (default 0.01), with its own paired bootstrap interval. ``quant_argmax_axis``
    adds the same top-1 agreement check on float outputs (logits, per-pixel class scores) along that axis.
    With ``quant_compare: residual`` the named input
    (the filter's own input) is subtracted from the outputs and the target first, so a residual filter's
    near-identity output does not inflate the correlation.

The drop
    Without a target: ``1 − PLCC(fp32, int8)``. With a target: the larger of the target drop
    ``PLCC(fp32, t) − PLCC(int8, t)`` and the implied drop ``PLCC(fp32, t) · (1 − PLCC(fp32, int8))``, the
    drop the int8 deviations would cause if they were unrelated to the target, as quantisation error is
    (see :class:`~pytest_quantgate.engine.metrics.DropTerm`). The implied term stops a sidecar that is a different
    model of similar quality from passing on the target alone. The entry's drop is the worst output's.

The interval
    A paired percentile bootstrap over samples: each replicate draws sample indices with replacement (seeded
    from ``--quantgate-seed`` and the entry id, so the interval is the same on every run, worker and
    collection order) and recomputes the drop for fp32, int8 and target on the *same* indices, from
    per-sample sufficient statistics. It is shown with every verdict and in the summary. Past
    ``streaming.MAX_UNITS`` samples (fewer for outputs with many channels) the statistics are kept per hashed
    block of samples instead, and a replicate draws blocks: the same variance, memory that does not grow with the
    fixture (see :mod:`.streaming`).

The decision rule
    ``point`` (default): FAIL when the drop on the full fixture exceeds the budget. ``conservative``
    (``--quantgate-decision conservative``): FAIL when the upper bound of the interval exceeds it, so a PASS
    holds for nearly every resampled fixture; use it where a bad sidecar costs more than a rebuild.

    Rationale: a verdict is only worth having if it survives resampling the fixture, i.e. if it would be the
    same on another draw of soak samples from the same source. When the interval lies wholly on one side of
    the budget, the point and the conservative rule agree and resampled fixtures reproduce the verdict (the
    interval is the spread of the drop over exactly such resamples). When it straddles the budget no rule on
    this fixture is stable, so the gate does not pretend: it warns that the fixture cannot resolve the
    verdict and estimates the samples needed (half-width ∝ 1/√n); ``--quantgate-strict`` makes that an
    error. The point rule is the default because it is unbiased (a sidecar exactly at the budget fails half
    the time under either rule's resampling, but the conservative rule also fails sidecars that are good
    and merely measured on a small fixture).

    ``three-way`` (``--quantgate-decision three-way``): PASS when the whole interval is at or under the budget,
    FAIL when it is over, INCONCLUSIVE (its own verdict) when it straddles; ``--quantgate-sequential`` replaces
    the bootstrap interval by an anytime-valid confidence sequence and stops early (see :mod:`.sequential`).

The other budgets (checked on the full fixture, every breach reported; the first is the verdict's reason)
    - degenerate outputs: NaN/inf or constant int8 output (raw, before any residual subtraction): FAIL.
    - gain and offset (``quant_budget_slope``): int8 regressed on fp32; ``|slope − 1|`` and the mean shift
      in fp32 standard deviations must stay within it (PLCC is blind to ``0.5·y + 10``). For residual entries
      it is checked on the raw outputs first, then on the residuals.
    - absolute errors (``quant_budget_mae``, ``quant_budget_max_abs``): mean and worst ``|int8 − fp32|`` in
      output units; off unless the entry sets them.
    - relative (``quant_budget_relative`` r, MLPerf style, needs a target): ``PLCC(int8, t) ≥ r · PLCC(fp32,
      t)``. It replaces the default PLCC budget by ``(1 − r) · PLCC(fp32, t)`` (an explicit
      ``quant_accuracy_budget_plcc`` still applies; the tighter wins), so the interval and decision rule above
      apply to it unchanged; its implied-drop term reduces to ``PLCC(fp32, int8) ≥ r``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FixtureError, RegistryError
from ..io.soak import Fixture, TensorSpec
from ..records import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Focus,
    GateResult,
    Interval,
    Kind,
    LabelReport,
    OutputReport,
    PairMetrics,
)
from .detections import DetectionAccumulator, DetectionRules, detection_breaches, detection_report
from .embeddings import EmbeddingAccumulator, embedding_breaches, embedding_report
from .metrics import MomentTerm, bootstrap_drop, samples_needed
from .selection import select_channels
from .streaming import (
    AccuracyAccumulator,
    Field,
    LabelAccumulator,
    PairAccumulator,
    Units,
    WorstSamples,
    describe_sums,
    pair_moments,
)
from .thresholds import ThresholdAccumulator, shares, threshold_breaches, threshold_report

if TYPE_CHECKING:
    from ..io.registry import Entry

DEFAULT_LABEL_FLIP = 0.01
DEFAULT_THRESHOLD_FLIP = 0.05
DEFAULT_COSINE = 0.01
DEFAULT_NEIGHBOURS = 0.9


@dataclass(frozen=True)
class CompareOptions:
    """Statistics knobs that come from the settings."""

    bootstrap: int = 1000
    seed: int = 0
    confidence: float = 0.95
    decision: str = "point"
    strict: bool = False
    sequential: bool = False  # the drop's interval is the confidence sequence's (engine/sequential.py)


# --- what each output is, and how it is viewed --------------------------------------------------------------


@dataclass(frozen=True)
class OutputPlan:
    """How one output is compared: as values or labels, along which channel axis, minus which input."""

    spec: TensorSpec
    labels: bool
    channel_axis: int | None
    argmax_axis: int | None
    residual: str | None
    target: bool
    explicit_axis: bool = False  # the axis was declared (entry or quant_outputs): honoured however many channels
    ignore: bool = False  # quant_outputs ignore: run and reported, never judged
    budget_plcc: float | None = None  # quant_outputs budget_plcc: this output's own PLCC budget
    budget_label_flip: float | None = None  # quant_outputs budget_label_flip
    budget_accuracy: float | None = None  # quant_outputs budget_accuracy (class-id targets of an argmax view)
    mask: str | None = None  # quant_outputs mask: the fixture array whose non-zero positions count
    mask_invert: bool = False  # quant_outputs mask_invert: the mask marks padding
    threshold: float | None = None  # quant_outputs threshold: these channels are judged by their decisions
    threshold_channels: Any = None  # "4:"-style slice or list; None: every channel
    budget_threshold_flip: float = DEFAULT_THRESHOLD_FLIP
    detections: Mapping[str, Any] | None = None  # quant_outputs detections: a raw detector head
    embedding_axis: int | None = None  # quant_outputs embedding_axis: an embedding along this axis
    budget_cosine: float = DEFAULT_COSINE
    budget_neighbours: float = DEFAULT_NEIGHBOURS

    @property
    def plcc_judged(self) -> bool:
        """Return whether this output's PLCC can decide (detections and embeddings replace it)."""
        return not self.labels and self.detections is None and self.embedding_axis is None


# which quant_outputs keys make sense for which output: a key outside its set is a usage error naming both
LABEL_KEYS = frozenset({"ignore", "budget_label_flip", "mask", "mask_invert"})
NEEDS = {"budget_accuracy": "argmax_axis", "mask_invert": "mask", "threshold_channels": "threshold",
         "budget_threshold_flip": "threshold", "budget_cosine": "embedding_axis",
         "budget_neighbours": "embedding_axis"}
EXCLUSIVE = (("detections", "mask"), ("detections", "threshold"), ("detections", "embedding_axis"),
             ("threshold", "embedding_axis"), ("detections", "argmax_axis"), ("embedding_axis", "argmax_axis"))


def _check_rules(entry: Entry, spec: TensorSpec, rules: Mapping[str, Any], labels: bool, arrays: Sequence[str],
                 argmax: int | None) -> None:
    """Refuse quant_outputs keys that make no sense for this output, naming the entry, output and choices."""
    where = f"entry {entry.id!r} field 'quant_outputs' output {spec.name!r}"
    if labels:
        wrong = sorted(set(rules) - LABEL_KEYS)
        if wrong:
            raise RegistryError(f"{where} ({spec.describe()}, compared as labels): {', '.join(map(repr, wrong))} "
                                f"apply to float outputs; a label output takes {', '.join(sorted(LABEL_KEYS))}")
    for key, needed in NEEDS.items():
        if key in rules and rules.get(needed) is None and not (needed == "argmax_axis" and argmax is not None):
            raise RegistryError(f"{where}: {key!r} needs {needed!r} (it has no meaning without it)")
    if "budget_label_flip" in rules and not labels and argmax is None:
        raise RegistryError(f"{where}: 'budget_label_flip' needs an argmax view ('argmax_axis' or the entry's "
                            f"quant_argmax_axis): a float output has no labels to flip")
    for a, b in EXCLUSIVE:
        if rules.get(a) is not None and (rules.get(b) is not None or (b == "argmax_axis" and "argmax_axis" not in
                                                                      rules and argmax is not None)):
            if b == "argmax_axis" and "argmax_axis" not in rules:
                raise RegistryError(f"{where}: {a!r} replaces the entry's quant_argmax_axis for this output; set "
                                    f"'argmax_axis': null next to it")
            raise RegistryError(f"{where}: {a!r} and {b!r} are two ways of judging the output; declare one")
    mask = rules.get("mask")
    if mask is not None and mask not in arrays:
        raise RegistryError(f"{where} key 'mask': {mask!r} is not an array of the soak fixture (arrays: "
                            f"{', '.join(map(repr, arrays))}); store the mask in the fixture under that name")


def _is_label_type(spec: TensorSpec) -> bool:
    if spec.type == "tensor(string)":  # class names: only agreement means anything
        return True
    return spec.type.startswith("tensor(") and any(
        t in spec.type for t in ("int8)", "int16)", "int32)", "int64)", "bool)")) and "uint8" not in spec.type


def plan_outputs(entry: Entry, fixture: Fixture, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec]) -> tuple[OutputPlan, ...]:
    """Decide, before anything runs, how every output is compared; raise FixtureError on a contradiction."""
    target_name = _target_output(entry, outputs, fixture)
    residual = None
    if entry.compare == "residual":
        residual = entry.residual_input
        if residual is None:
            if len(inputs) != 1:
                raise FixtureError(
                    f"entry {entry.id!r}: quant_compare is 'residual' but the model has {len(inputs)} inputs; "
                    f"name one in 'quant_residual_input'"
                )
            residual = inputs[0].name
        if residual not in fixture.inputs:
            raise FixtureError(f"entry {entry.id!r}: quant_residual_input {residual!r} is not a model input")
    if entry.budget_relative is not None and fixture.target is None:
        raise FixtureError(
            f"entry {entry.id!r} field 'quant_budget_relative': the soak fixture {fixture.path} has no "
            f"{'target'!r} array; a relative budget compares int8 and fp32 against the target"
        )
    names = [o.name for o in outputs]
    unknown = sorted(set(entry.outputs) - set(names))
    if unknown:
        raise RegistryError(f"entry {entry.id!r} field 'quant_outputs': {', '.join(repr(u) for u in unknown)} "
                            f"{'is not an output' if len(unknown) == 1 else 'are not outputs'} of the model "
                            f"(outputs: {', '.join(names)})")
    plans = []
    arrays = sorted(str(k) for k in fixture.inputs)
    for spec in outputs:
        labels = _is_label_type(spec)
        rules = entry.outputs.get(spec.name, {})
        axis = rules["channel_axis"] if "channel_axis" in rules else _channel_axis(entry)
        argmax = None if labels else rules.get("argmax_axis", entry.argmax_axis)
        _check_rules(entry, spec, rules, labels, arrays, argmax)
        detections = rules.get("detections")
        plans.append(OutputPlan(
            spec, labels, None if labels else axis, argmax,
            None if labels else residual, spec.name == target_name,
            explicit_axis="channel_axis" in rules or entry.channel_axis_set, ignore=bool(rules.get("ignore", False)),
            budget_plcc=rules.get("budget_plcc"), budget_label_flip=rules.get("budget_label_flip"),
            budget_accuracy=rules.get("budget_accuracy"), mask=rules.get("mask"),
            mask_invert=bool(rules.get("mask_invert", False)), threshold=rules.get("threshold"),
            threshold_channels=rules.get("threshold_channels"),
            budget_threshold_flip=rules.get("budget_threshold_flip", DEFAULT_THRESHOLD_FLIP),
            detections=None if detections is None else dict(detections),
            embedding_axis=rules.get("embedding_axis"), budget_cosine=rules.get("budget_cosine", DEFAULT_COSINE),
            budget_neighbours=rules.get("budget_neighbours", DEFAULT_NEIGHBOURS)))
    return tuple(plans)


def _channel_axis(entry: Entry) -> int | None:
    return entry.channel_axis if entry.channel_axis_set else 1


# The default channel axis (1) splits an output only up to this many channels: each channel keeps 13 float64 sums
# per unit (a sample, or a block past the cap), so an anchor-major detector head ([N, 25 200, 85]) split along
# axis 1 would keep a third of its output's size per unit, and its blocks would be few (streaming.STATE_BYTES).
# Such heads want quant_channel_axis: 2 (the class axis); an explicit axis is honoured.
MAX_DEFAULT_CHANNELS = 1024


def _target_output(entry: Entry, outputs: Sequence[TensorSpec], fixture: Fixture) -> str | None:
    if fixture.target is None:
        return None
    names = [o.name for o in outputs]
    if entry.target_output is not None:
        if entry.target_output not in names:
            raise FixtureError(f"entry {entry.id!r}: quant_target_output {entry.target_output!r} is not an output "
                               f"{names}")
        return entry.target_output
    if len(names) != 1:
        raise FixtureError(
            f"{fixture.path}: has a 'target' but the model has outputs {names}; "
            f"name the one it belongs to in the entry's 'quant_target_output'"
        )
    return names[0]


def _seed_for(base: int, entry_id: str) -> int:
    # a stable per-entry stream: verdicts never depend on collection order or on the xdist worker
    return base ^ int.from_bytes(hashlib.sha256(entry_id.encode()).digest()[:4], "little")


def _channels_view(array: np.ndarray, axis: int | None) -> np.ndarray:
    """Return (n, C, m): the channel axis second, everything else flattened (C = 1 without one)."""
    count = array.shape[0]
    if axis is None or array.ndim < 3 or axis >= array.ndim or axis == 0:
        return array.reshape(count, 1, -1)
    moved = np.moveaxis(array, axis, 1)
    return moved.reshape(count, moved.shape[1], -1)


class Collector:
    """Fold chunks of (fp32, int8) outputs of one entry into streaming statistics, then decide.

    Every accumulator shares one :class:`~.streaming.Units` (samples, or past ``max_units`` hashed blocks), chosen
    at the first chunk from the channels of every output, so the paired bootstrap resamples the same units.
    """

    def __init__(self, entry: Entry, plans: Sequence[OutputPlan], samples: int, seed: int, where: str = "",
                 max_units: int | None = None) -> None:
        self.entry = entry
        self.where = where  # the fixture, named in messages about its target
        self.plans = tuple(plans)
        self.samples = samples
        self.seed = _seed_for(seed, entry.id)
        self.max_units = max_units  # None: streaming.MAX_UNITS
        self.units: Units | None = None
        self.values: dict[str, PairAccumulator] = {}
        self.raw: dict[str, PairAccumulator] = {}  # residual entries: the outputs before subtraction
        self.labels: dict[str, LabelAccumulator] = {}
        self.accuracy: dict[str, AccuracyAccumulator] = {}  # argmax views scored against class-id targets
        self.worst = WorstSamples()  # past the cap: the worst samples of each output, for the diagnosis
        self.target_range = [np.inf, -np.inf]
        self.filled = 0
        self.notes: dict[str, str] = {}  # per output: why the default channel view was not used
        # the task-aware views of quant_outputs: decisions of score channels, decoded detections, embeddings
        self.thresholds: dict[str, ThresholdAccumulator] = {}
        self.detections: dict[str, DetectionAccumulator] = {}
        self.embeddings: dict[str, EmbeddingAccumulator] = {}

    @property
    def unit_count(self) -> int:
        """Return the rows the bootstrap resamples: the samples, or the blocks past the cap."""
        return self.units.count if self.units is not None else self.samples

    def state_bytes(self) -> int:
        """Return the bytes every accumulator holds: what must not grow with the sample count."""
        pairs = sum(acc.nbytes() for acc in [*self.values.values(), *self.raw.values()])
        return (pairs + sum(lab.nbytes() for lab in self.labels.values()) + self.worst.nbytes()
                + sum(acc.nbytes() for acc in self.accuracy.values())
                + sum(acc.nbytes() for acc in self.thresholds.values())
                + sum(acc.nbytes() for acc in self.detections.values())
                + sum(acc.nbytes() for acc in self.embeddings.values()))

    def _plan_units(self, fp32: Mapping[str, np.ndarray]) -> Units:
        """Return the units for this fixture: the channels of every value output share the memory bound."""
        width = 0
        for plan in self.plans:
            a = fp32.get(plan.spec.name)
            if plan.labels or a is None:
                continue
            channels = _channels_view(a, self._axis(plan, a.shape)).shape[1] if a.ndim else 1
            width += channels * (2 if plan.residual is not None else 1)
        return Units.plan(self.samples, self.seed, width, self.max_units)

    def _axis(self, plan: OutputPlan, shape: tuple[int, ...]) -> int | None:
        """Return the channel axis this output is viewed along (None: judged whole)."""
        axis = plan.channel_axis
        if axis is None or plan.explicit_axis or len(shape) < 3 or not 0 < axis < len(shape):
            return axis
        if shape[axis] <= MAX_DEFAULT_CHANNELS:
            return axis
        name = plan.spec.name
        self.notes.setdefault(name, (
            f"output {name!r} has {shape[axis]} entries along axis {axis}, more than the {MAX_DEFAULT_CHANNELS} the "
            f"default channel view splits; it is judged whole. Set quant_channel_axis to its class axis (e.g. "
            f"{len(shape) - 1} for an [N, anchors, 4 + classes] head) to judge each channel"))
        return None

    @staticmethod
    def _class_ids(plan: OutputPlan, a: np.ndarray, target: np.ndarray) -> bool:
        """Return True when ``target`` holds one integer class id per position of ``a`` without its argmax axis."""
        axis = plan.argmax_axis
        return (axis is not None and 0 < axis < a.ndim and np.issubdtype(target.dtype, np.integer)
                and target.size * a.shape[axis] == a.size)

    def _acc(self, store: dict[str, PairAccumulator], name: str, channels: int, target: bool,
             axis: int | None) -> PairAccumulator:
        if name not in store:
            store[name] = PairAccumulator(self.samples, channels, with_target=target, seed=self.seed,
                                          units=self.units)
        acc = store[name]
        if acc.channels != channels:
            # an output whose shape follows the input's values: its channels are not the same ones sample to sample
            raise FixtureError(
                f"{self.where}: entry {self.entry.id!r}: output {name!r} has {channels} channel(s) along axis {axis} "
                f"here and {acc.channels} before: its shape depends on the input, so it cannot be judged channel by "
                f"channel; set quant_channel_axis to an axis of fixed size, or to null to judge the output whole")
        return acc

    def add(self, start: int, inputs: Mapping[str, np.ndarray], target: np.ndarray | None,
            fp32: Mapping[str, np.ndarray], int8: Mapping[str, np.ndarray]) -> None:
        """Fold samples ``start ..`` in: outputs and inputs carry the samples on axis 0."""
        if self.units is None:
            self.units = self._plan_units(fp32)
        scores: dict[str, np.ndarray] = {}  # each sample's disagreement per output, for the worst samples
        for plan in self.plans:
            name = plan.spec.name
            a, b = fp32[name], int8[name]
            count = a.shape[0] if a.ndim else 0
            if a.shape != b.shape:
                raise FixtureError(f"output {name!r}: the int8 output has shape {b.shape}, fp32 has {a.shape}")
            keep = self._mask(plan, inputs, a)
            if plan.labels:
                scores[name] = self.labels.setdefault(name, LabelAccumulator(self.samples, self.units)).add(
                    start, a, b, keep)
                continue
            label_keep = None
            if plan.argmax_axis is not None:
                axis = plan.argmax_axis
                if not 0 < axis < a.ndim:
                    raise FixtureError(f"entry {self.entry.id!r} field 'quant_argmax_axis': output {name!r} has "
                                       f"shape {a.shape} (samples first); axis {axis} is not one of its class axes")
                if keep is not None:
                    if axis < self._mask_rank(plan, inputs):
                        raise FixtureError(
                            f"{self.where}: entry {self.entry.id!r} field 'quant_outputs' output {name!r}: mask "
                            f"{plan.mask!r} covers axis {axis}, the argmax (class) axis; a mask marks positions, "
                            f"so it spans only the axes before the class axis")
                    label_keep = keep.take(0, axis=axis)
                scores[f"{name}:argmax"] = self.labels.setdefault(
                    f"{name}:argmax", LabelAccumulator(self.samples, self.units)).add(
                    start, np.argmax(a, axis=axis), np.argmax(b, axis=axis), label_keep)
            t = None
            if plan.target and target is not None and target.size != a.size:
                if not self._class_ids(plan, a, target):
                    per = target[0].size if target.ndim else 1
                    raise FixtureError(
                        f"array 'target' has {per} value(s) per sample, output {name!r} has "
                        f"{a[0].size if a.ndim > 1 else 1}: store a target of the output's shape (scored by PLCC), "
                        f"or integer class ids with one value per position of the output without its class axis "
                        f"and set quant_argmax_axis (or quant_outputs {name!r} argmax_axis) to that axis (scored as "
                        f"accuracy)")
                class_axis = int(plan.argmax_axis or 0)
                ids = target.reshape(tuple(d for i, d in enumerate(a.shape) if i != class_axis))
                self.accuracy.setdefault(name, AccuracyAccumulator(self.samples, self.units)).add(
                    start, np.argmax(a, axis=class_axis), np.argmax(b, axis=class_axis), ids, label_keep)
            elif plan.target and target is not None:
                t = target.reshape(a.shape)
                self.target_range = [min(self.target_range[0], float(np.min(t))),
                                     max(self.target_range[1], float(np.max(t)))]
            axis_used = self._axis(plan, a.shape)
            view_keep = None if keep is None else _channels_view(keep, axis_used)
            base = None
            if plan.residual is not None:
                base = np.asarray(inputs[plan.residual])
                if base.size != a.size:
                    raise FixtureError(
                        f"entry {self.entry.id!r}: residual comparison needs output {name!r} {a.shape[1:]} and its "
                        f"input {base.shape[1:]} to have the same number of values"
                    )
                base = _channels_view(base.reshape(a.shape), axis_used)
                self._acc(self.raw, name, _channels_view(a, axis_used).shape[1], False, axis_used).add(
                    start, _channels_view(a, axis_used), _channels_view(b, axis_used), mask=view_keep)
            va, vb = _channels_view(a, axis_used), _channels_view(b, axis_used)
            vt = None if t is None else _channels_view(t, axis_used)
            scores[name] = self._acc(self.values, name, va.shape[1], vt is not None, axis_used).add(
                start, va, vb, vt, base, view_keep)
            flips = self._add_tasks(plan, start, a, b, keep)
            if flips is not None:  # threshold decisions that flip rank a sample as top-1 flips do
                scores[f"{name}:threshold"] = flips
            del count
        rows = next(iter(fp32.values())).shape[0]
        if self.units.blocked and scores:
            self.worst.add(np.arange(start, start + rows), np.stack([scores[k] for k in sorted(scores)], axis=1))
        self.filled = max(self.filled, start + rows)

    def _add_tasks(self, plan: OutputPlan, start: int, a: np.ndarray, b: np.ndarray, keep: np.ndarray | None
                   ) -> np.ndarray | None:
        """Fold one output into its quant_outputs task views; return each sample's threshold flip share, if any."""
        name = plan.spec.name
        flips = None
        where = f"entry {self.entry.id!r} field 'quant_outputs' output {name!r}"
        if plan.threshold is not None:
            axis = plan.channel_axis if plan.channel_axis is not None and 0 < plan.channel_axis < a.ndim else None
            va, vb = _channels_view(a, axis), _channels_view(b, axis)
            if name not in self.thresholds:
                chosen = select_channels(plan.threshold_channels, va.shape[1], f"{where} threshold_channels")
                self.thresholds[name] = ThresholdAccumulator(self.samples, chosen, float(plan.threshold), self.units)
            flips = self.thresholds[name].add(
                start, va, vb, None if keep is None else _channels_view(keep, axis))
        if plan.detections is not None:
            axis = plan.channel_axis if plan.channel_axis is not None else 1
            if not 0 < axis < a.ndim or a.ndim < 3:
                raise FixtureError(f"{self.where}: {where}: a detector head needs a channel axis (boxes and scores) "
                                   f"and an anchor axis; the output has shape {a.shape} and channel_axis {axis}")
            va = np.moveaxis(a, axis, 1).reshape(a.shape[0], a.shape[axis], -1)
            vb = np.moveaxis(b, axis, 1).reshape(b.shape[0], b.shape[axis], -1)
            if name not in self.detections:
                rules = DetectionRules.from_rules(plan.detections)
                box_idx, score_idx = rules.channels(va.shape[1], where)
                self.detections[name] = DetectionAccumulator(self.samples, rules, box_idx, score_idx, self.units)
            self.detections[name].add(start, va, vb)
        if plan.embedding_axis is not None:
            axis = plan.embedding_axis
            if not 0 < axis < a.ndim:
                raise FixtureError(f"{self.where}: {where}: embedding_axis {axis} is not an axis of the output's "
                                   f"shape {a.shape} (samples first)")
            if name not in self.embeddings:
                self.embeddings[name] = EmbeddingAccumulator(self.samples, axis, self.seed, self.units)
            self.embeddings[name].add(
                start, a, b, None if keep is None else keep.take(0, axis=axis))
        return flips

    def _mask_rank(self, plan: OutputPlan, inputs: Mapping[str, np.ndarray]) -> int:
        return int(np.ndim(inputs[plan.mask])) if plan.mask is not None else 0

    def _mask(self, plan: OutputPlan, inputs: Mapping[str, np.ndarray], a: np.ndarray) -> np.ndarray | None:
        """Return the positions of ``a`` that count (quant_outputs mask), broadcast to its shape; None: all."""
        if plan.mask is None:
            return None
        name = plan.spec.name
        if plan.mask not in inputs:
            raise FixtureError(f"{self.where}: entry {self.entry.id!r} field 'quant_outputs' output {name!r}: the "
                               f"fixture has no array {plan.mask!r} (the mask)")
        raw = np.asarray(inputs[plan.mask])
        if raw.ndim > a.ndim or raw.shape != a.shape[: raw.ndim]:
            raise FixtureError(
                f"{self.where}: entry {self.entry.id!r} field 'quant_outputs' output {name!r}: mask {plan.mask!r} "
                f"has shape {raw.shape[1:]} per sample, the output {a.shape[1:]}; a mask matches the output's "
                f"leading axes (e.g. [N, T] for [N, T, vocab])")
        keep = raw != 0
        if plan.mask_invert:  # PyTorch's key_padding_mask: True marks padding
            keep = ~keep
        return np.broadcast_to(keep.reshape(keep.shape + (1,) * (a.ndim - keep.ndim)), a.shape)

    def worst_samples(self, count: int, focus: Focus | None = None, kind: str | None = None) -> list[int]:
        """Return the samples where int8 departs most from fp32 (relative to each output's spread).

        Unfocused, a sample's score sums its squared error relative to each output's variance, its top-1 (argmax)
        and label flip shares and its threshold-decision flip shares. With a ``focus`` (what a FAIL is about) only
        that output counts, and of it only the focused channels or classes: the diagnosis then looks where the
        failing decision broke, not where the box coordinates moved; ``kind`` (the verdict's) says whether a
        focused channel failed on its threshold decisions or on its values.
        Past the unit cap they are ranked among each output's WORST_KEPT worst samples (exact for one output).
        """
        if focus is not None and (self.units is None or not self.units.blocked):
            score = self._focus_scores(focus, kind)
            if score is not None:
                order = np.argsort(-score, kind="stable")
                return [int(i) for i in order[:count]]
        if self.units is not None and self.units.blocked:
            keys = sorted([*self.values, *self.labels, *(f"{name}:threshold" for name in self.thresholds)])
            weights = np.array([1.0 / self.values[k].variance() if k in self.values else 1.0 for k in keys])
            return self.worst.top(weights, count, self.samples)
        score = np.zeros(self.samples)
        for acc in self.values.values():
            score += acc.disagreement()
        for lab in self.labels.values():
            score += lab.unit_rates()
        for found in self.thresholds.values():
            score += _threshold_shares(found)
        order = np.argsort(-score, kind="stable")
        return [int(i) for i in order[:count]]

    def _focus_scores(self, focus: Focus, kind: str | None = None) -> np.ndarray | None:
        """Return each sample's disagreement on the focused output (and channels), or None if not kept per sample."""
        name = focus.output
        decisions = self.thresholds.get(name)
        if decisions is not None and kind == "threshold":  # the failing channels' flipped decisions per sample
            chosen = [j for j, c in enumerate(decisions.channels) if int(c) in focus.channels]
            return _threshold_shares(decisions, chosen or None)
        found = self.detections.get(name)
        if found is not None:  # the failing classes' missed and extra detections per sample
            classes = [int(i) for i, c in enumerate(found.score_idx) if int(c) in focus.channels] or list(
                range(found.classes))
            per = found.counts.reshape(found.counts.shape[0], found.classes, 3)[:, classes, :].sum(axis=1)
            return np.asarray((per[:, 0] - per[:, 2]) + (per[:, 1] - per[:, 2]), dtype=np.float64)
        acc = self.values.get(name)
        if acc is not None and focus.channels and acc.channels > max(focus.channels):
            rows = acc.stats[:, list(focus.channels), :]
            err = rows[..., Field.SUM_SQ_ERR].sum(axis=1) / np.maximum(rows[..., Field.COUNT].sum(axis=1), 1)
            return np.asarray(np.where(np.isfinite(err), err, np.inf))
        if acc is not None:
            return acc.disagreement()
        for key in (name, f"{name}:argmax"):
            lab = self.labels.get(key)
            if lab is not None:
                return lab.unit_rates()
        return None

    def reservoir(self, name: str) -> np.ndarray:
        """Return the kept (fp32, int8, target) element triples of an output, as compared."""
        acc = self.values.get(name)
        return acc.reservoir() if acc is not None else np.zeros((0, 3))

    def decide(self, ep: str, options: CompareOptions) -> GateResult:
        """Compute every metric, the drop and its interval, and the verdict (rules in the module docstring)."""
        return _decide(self, ep, options)

    # --- sharding: a part's mergeable state, and the merge of the parts (runner/shards.py writes the file) -----

    def adopt(self, probe: Collector) -> None:
        """Take the units and shifts that the fixture's first chunk gave ``probe``, before folding anything.

        Every shard sums around the shifts of the unsharded run, so merging re-expresses nothing: a sample's
        row is the same float64 numbers whichever shard folded it.
        """
        self.units = probe.units
        for mine, theirs in ((self.values, probe.values), (self.raw, probe.raw)):
            for name, acc in theirs.items():
                mine[name] = PairAccumulator(self.samples, acc.channels, with_target=acc.with_target, seed=self.seed,
                                             units=self.units)
                mine[name].shift = None if acc.shift is None else acc.shift.copy()

    def state(self, rows: slice | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return (JSON-able header, arrays) of every accumulator; per-unit rows only at ``rows`` (default all).

        Arrays are per unit and channel (or bounded: reservoirs, kept vectors, worst samples), never per element.
        """
        if self.units is None:  # nothing was folded (a shard without samples)
            return {"units": None}, {}
        rows = slice(0, self.units.count) if rows is None else rows
        arrays: dict[str, np.ndarray] = {"target_range": np.asarray(self.target_range, dtype=np.float64),
                                         **{f"worst.{k}": v for k, v in self.worst.state().items()}}
        parts: list[dict[str, Any]] = []

        def put(store: str, name: str, meta: dict[str, Any], found: dict[str, np.ndarray]) -> None:
            key = f"a{len(parts)}"  # output names may hold any character: members are numbered
            parts.append({"store": store, "name": name, "key": key, "meta": meta})
            arrays.update({f"{key}.{k}": v for k, v in found.items()})

        for store, accs in (("values", self.values), ("raw", self.raw)):
            for name, acc in accs.items():
                put(store, name, *acc.state(rows))
        for store, counted in (("labels", self.labels), ("accuracy", self.accuracy)):
            for name, lab in counted.items():
                put(store, name, {}, lab.state(rows))
        for name, thr in self.thresholds.items():
            put("thresholds", name, *thr.state(rows))
        for name, det in self.detections.items():
            put("detections", name, {}, det.state(rows))
        for name, emb in self.embeddings.items():
            put("embeddings", name, *emb.state(rows))
        units = self.units
        header = {"units": {"samples": units.samples, "count": units.count, "seed": units.seed},
                  "rows": [rows.start, rows.stop], "filled": self.filled, "notes": dict(self.notes),
                  "parts": parts}
        return header, arrays

    @classmethod
    def from_state(cls, entry: Entry, plans: Sequence[OutputPlan], samples: int, seed: int, where: str,
                   header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Collector:
        """Return the collector :meth:`state` described (``seed`` is the run's, as given to the constructor)."""
        c = cls(entry, plans, samples, seed, where)
        if header.get("units") is None:
            return c
        u = header["units"]
        units = c.units = Units(int(u["samples"]), int(u["count"]), int(u["seed"]))
        rows = slice(int(header["rows"][0]), int(header["rows"][1]))
        c.filled = int(header["filled"])
        c.notes = {str(k): str(v) for k, v in header["notes"].items()}
        low, high = (float(v) for v in arrays["target_range"])
        c.target_range = [low, high]
        c.worst.restore({k.removeprefix("worst."): v for k, v in arrays.items() if k.startswith("worst.")})
        rules = {plan.spec.name: plan for plan in c.plans}
        for part in header["parts"]:
            store, name, meta = part["store"], part["name"], part["meta"]
            own = {k.removeprefix(part["key"] + "."): v for k, v in arrays.items()
                   if k.startswith(part["key"] + ".")}
            if store in ("values", "raw"):
                getattr(c, store)[name] = PairAccumulator.restore(meta, own, samples, c.seed, units, rows)
            elif store == "labels":
                c.labels[name] = LabelAccumulator.restore(own, units, rows)
            elif store == "accuracy":
                c.accuracy[name] = AccuracyAccumulator.restore(own, units, rows)
            elif store == "thresholds":
                c.thresholds[name] = ThresholdAccumulator.restore(meta, own, units, rows)
            elif store == "detections":
                detections = rules[name].detections
                if detections is None:
                    raise ValueError(f"output {name!r} holds detections but its plan declares none")
                c.detections[name] = DetectionAccumulator.restore(own, DetectionRules.from_rules(detections), units,
                                                                  rows)
            elif store == "embeddings":
                c.embeddings[name] = EmbeddingAccumulator.restore(meta, own, c.seed, units, rows)
            else:
                raise ValueError(f"unknown statistics {store!r}")
        return c

    def merge(self, other: Collector) -> Collector:
        """Return the collector of both parts of a split fixture (disjoint samples, same entry and units)."""
        if self.units is None or other.units is None:
            return other if self.units is None else self
        if other.units != self.units:
            raise ValueError(f"cannot merge statistics over different units ({self.units} vs {other.units})")
        out = Collector(self.entry, self.plans, self.samples, 0, self.where, self.max_units)
        out.seed, out.units = self.seed, self.units

        def joined(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, Any]:
            # an output only one part holds comes as it is (the other part saw no sample of it)
            return {k: mine[k].merge(theirs[k]) if k in mine and k in theirs else mine.get(k, theirs.get(k))
                    for k in [*mine, *(k for k in theirs if k not in mine)]}

        out.values, out.raw = joined(self.values, other.values), joined(self.raw, other.raw)
        out.labels, out.accuracy = joined(self.labels, other.labels), joined(self.accuracy, other.accuracy)
        out.thresholds, out.detections = joined(self.thresholds, other.thresholds), joined(self.detections,
                                                                                           other.detections)
        out.embeddings = joined(self.embeddings, other.embeddings)
        out.worst = self.worst.merged(other.worst)
        out.target_range = [min(self.target_range[0], other.target_range[0]),
                            max(self.target_range[1], other.target_range[1])]
        out.filled = max(self.filled, other.filled)
        out.notes = {**other.notes, **self.notes}
        return out


def _threshold_shares(acc: ThresholdAccumulator, channels: Sequence[int] | None = None) -> np.ndarray:
    """Return each unit's flip share of threshold decisions over the chosen channels (positions in acc.channels)."""
    rows = acc.rows if channels is None else acc.rows[:, list(channels), :]
    return shares(rows.sum(axis=1))


# --- budget checks: each returns its breaches (kind, text) ----------------------------------------------------


@dataclass(frozen=True)
class Breach:
    """One budget a result breaks: its kind (what the report's remedy dispatches on) and the sentence saying so."""

    kind: Kind
    reason: str
    focus: Focus | None = None  # the output (and channels or classes) the breach is about


def decide(fields: Mapping[str, Any], breaches: Sequence[Breach], passed: str) -> GateResult:
    """Build the GateResult: the first breach leads a FAIL and the others join ``also``; none is a PASS (``passed``).

    Every check returns typed breaches; this is the one place a measured result gets its verdict (checks that
    run after it -- lineage, speed, a rebuild's review -- go through :func:`with_breaches`).
    """
    if breaches:
        return GateResult(**fields, verdict=FAIL, kind=breaches[0].kind, reason=breaches[0].reason,
                          also=tuple(b.reason for b in breaches[1:]), focus=breaches[0].focus)
    return GateResult(**fields, verdict=PASS, kind="pass", reason=passed)


def with_breaches(result: GateResult, breaches: Sequence[Breach], **fields: Any) -> GateResult:
    """Return ``result`` after later checks (lineage, speed, a rebuild's review): the one place a verdict turns.

    A passing result takes the first breach as its verdict and reason, the rest join ``also``; a failing one
    keeps its leading reason and gains them all in ``also``.
    """
    if not breaches:
        return replace(result, **fields) if fields else result
    if result.verdict != FAIL:  # a breach is decisive: it turns a PASS, and an INCONCLUSIVE drop, into a FAIL
        first, *rest = breaches
        return replace(result, verdict=FAIL, kind=first.kind, reason=first.reason,
                       also=(*result.also, *(b.reason for b in rest)), focus=first.focus, **fields)
    return replace(result, also=(*result.also, *(b.reason for b in breaches)), **fields)


# --- the checks: each looks at one thing and returns the breaches it finds --------------------------------------


def _degenerate(name: str, acc: PairAccumulator, what: str) -> Breach | None:
    """Return a breach when an output holds NaN/inf or is constant."""
    bad_a, bad_b, count = acc.nonfinite()
    if bad_a or bad_b:
        side = "fp32" if bad_a else "int8"
        return Breach("nonfinite", f"{side} output {name!r}{what} has NaN/inf values in {count} of {acc.samples} "
                                   f"samples", Focus(name))
    rows = acc.output_rows()
    totals = rows.sum(axis=0)
    n = totals[Field.COUNT]
    for side, s, ss in (("fp32", Field.SUM_A, Field.SUM_AA), ("int8", Field.SUM_B, Field.SUM_BB)):
        var = totals[ss] - totals[s] ** 2 / n if n else 0.0
        if n < 2 or var <= 0.0:
            return Breach("constant", f"{side} output {name!r}{what} is constant", Focus(name))
    return None


def check_degenerate(c: Collector) -> Breach | None:
    """Return the first output that is NaN/inf or constant; raw outputs first (a constant output minus the
    residual input is not constant)."""
    for plan in c.plans:
        name = plan.spec.name
        if plan.labels or plan.ignore:
            continue
        if name in c.raw:
            found = _degenerate(name, c.raw[name], "")
            if found is not None:
                return found
        found = _degenerate(name, c.values[name], " (residual)" if name in c.raw else "")
        if found is not None:
            return found
    return None


def check_affine(name: str, m: PairMetrics, budget: float, what: str = "") -> Breach | None:
    """Return a breach when int8 ≈ a·fp32 + b with a gain or offset beyond ``quant_budget_slope`` (the one rule)."""
    if abs(m.slope - 1.0) <= budget and m.offset_rel <= budget:
        return None
    return Breach("affine", f"output {name!r}{what}: int8 ≈ {m.slope:.4f}·fp32 {m.intercept:+.4g}; the gain/offset "
                            f"error exceeds quant_budget_slope {budget:g} (|slope−1| {abs(m.slope - 1):.4f}, "
                            f"mean shift |mean(int8) − mean(fp32)| {m.offset_rel:.4f} std of fp32)", Focus(name))


def check_absolute(name: str, m: PairMetrics, entry: Entry) -> list[Breach]:
    """Return breaches of the optional absolute error budgets (``quant_budget_mae``, ``quant_budget_max_abs``)."""
    out: list[Breach] = []
    if entry.budget_mae is not None and m.mae > entry.budget_mae:
        out.append(Breach("mae", f"output {name!r}: mean |int8 − fp32| {m.mae:.6g} exceeds quant_budget_mae "
                                 f"{entry.budget_mae:g}", Focus(name)))
    if entry.budget_max_abs is not None and m.max_abs > entry.budget_max_abs:
        out.append(Breach("max_abs", f"output {name!r}: max |int8 − fp32| {m.max_abs:.6g} exceeds "
                                     f"quant_budget_max_abs {entry.budget_max_abs:g}", Focus(name)))
    return out


def over_budget(value: float, interval: Interval | None, budget: float, decision: str) -> bool:
    """Return whether ``value`` breaks ``budget`` under the decision rule (the one drop rule, also for labels).

    ``three-way`` judges the PLCC drop by its interval (:func:`check_drop`); the other budgets keep the point rule.
    """
    if decision == "conservative" and interval is not None:
        return interval.high > budget
    return value > budget


def check_drop(worst: OutputReport, interval: Interval | None, budget: Budget, decision: str,
               hint: str = "") -> Breach | None:
    """Return a breach when the worst output's drop exceeds the budget, saying where the drop comes from."""
    drop = worst.drop
    if decision == "three-way" and interval is not None:  # FAIL only when the whole interval is over the budget
        if interval.low <= budget.value:
            return None
    elif not over_budget(drop, interval, budget.value, decision):
        return None
    bound = "" if decision == "point" or interval is None else (
        f" (lower {interval.level:.0%} bound {interval.low:.6f})" if decision == "three-way" else
        f" (upper {interval.level:.0%} bound {interval.high:.6f})")
    how = ""
    focus = Focus(worst.name)
    if worst.fp32_vs_target is not None and worst.int8_vs_target is not None:
        target_drop = worst.fp32_vs_target.plcc - worst.int8_vs_target.plcc
        if drop > target_drop + 1e-12:
            how = (f"; implied by int8 vs fp32 PLCC {worst.vs_fp32.plcc:.6f} (the int8 output does not track "
                   f"the fp32 output; against the target alone the drop is {target_drop:.6f})")
    if worst.worst_channel_drop is not None and worst.worst_channel_drop >= drop:
        how += (f"; worst channel {worst.worst_channel} of {worst.channels} along axis {worst.channel_axis} "
                f"(whole-output drop {1.0 - worst.vs_fp32.plcc:.6f})")
        if worst.worst_channel is not None:
            focus = Focus(worst.name, worst.channel_axis, (worst.worst_channel,),
                          f"channel {worst.worst_channel} along axis {worst.channel_axis}")
    if hint:
        how += f". {hint}"
    return Breach(budget.kind, f"PLCC drop {drop:.6f} > budget {budget.value:g}{bound} on output {worst.name!r}"
                               f"{budget.note}{how}", focus)


# --- the metrics of each output --------------------------------------------------------------------------------


def _metrics(values: np.ndarray, shift: np.ndarray, x: int, y: int, sample: np.ndarray) -> PairMetrics:
    return PairMetrics(**describe_sums(values, shift, x, y, sample))


def _pair_metrics(acc: PairAccumulator, pairs: Sequence[tuple[int, int]]) -> list[PairMetrics]:
    """Return the metrics of each pair of columns (0 fp32, 1 int8, 2 target) over every sample."""
    rows = acc.output_rows()
    totals = rows.sum(axis=0)
    totals[Field.MAX_ABS_ERR] = rows[:, Field.MAX_ABS_ERR].max()  # the largest |error| is a max, not a sum
    shift, sample = acc.output_shift(), acc.reservoir()
    return [_metrics(totals, shift, x, y, sample) for x, y in pairs]


def _channel_drop(acc: PairAccumulator, skip: np.ndarray | None = None) -> tuple[MomentTerm, int, float]:
    """Return the per-channel drop term, the worst judged channel and its drop (``skip``: channels not judged)."""
    sums = acc.channel_sums()
    v = sums.values
    count = v[:, Field.COUNT]
    fp32_std = np.sqrt(np.maximum(v[:, Field.SUM_AA] - v[:, Field.SUM_A] ** 2 / count, 0.0) / count)
    fp32_mean = v[:, Field.SUM_A] / count + acc.shift[0] if acc.shift is not None else 0.0
    # a channel whose fp32 values vary by less than one 8-bit step of their own magnitude (a saturated sigmoid,
    # an unused class) carries nothing int8 can keep: it is not judged; a real score channel (0-1 next to 0-320
    # px boxes) varies far more and is
    mask = (fp32_std > 0) & (fp32_std >= (np.abs(fp32_mean) + fp32_std) / 256.0)
    if skip is not None:  # threshold channels: their decisions judge them, not their PLCC
        mask[skip] = False
    fidelity = 1.0 - sums.plcc(0, 1)
    fidelity = np.where(np.isfinite(fidelity), fidelity, 1.0)
    fidelity = np.where(mask, fidelity, -np.inf)
    worst = int(np.argmax(fidelity))
    return MomentTerm(pair_moments(acc.stats, 0, 1), mask=mask), worst, float(fidelity[worst])


# a channel whose fp32 RMS is below this share of the output's largest channel RMS is "tiny" next to the others:
# a detector's never-firing class row (max score 0.0067 next to 0-640 px boxes) is ~1e-5 of it
TINY_CHANNEL = 0.01


def tiny_channel_hint(name: str, acc: PairAccumulator, channel: int | None) -> str:
    """Return the advice for a failing channel whose fp32 values are tiny next to the output's others ("" if not)."""
    if channel is None or acc.channels < 2 or acc.shift is None:
        return ""
    v = acc.channel_sums().values
    count = np.maximum(v[:, Field.COUNT], 1)
    mean = v[:, Field.SUM_A] / count + acc.shift[0]
    var = np.maximum(v[:, Field.SUM_AA] / count - (v[:, Field.SUM_A] / count) ** 2, 0.0)
    rms = np.sqrt(mean ** 2 + var)
    largest = float(rms.max())
    if not largest > 0 or rms[channel] >= TINY_CHANNEL * largest:
        return ""
    return (f"Channel {channel}'s fp32 values are tiny next to the output's other channels (RMS {rms[channel]:.3g} "
            f"vs up to {largest:.3g}): if it is a score row that rarely fires, judge the output by what it means in "
            f"quant_outputs, e.g. {{\"{name}\": {{\"detections\": {{\"layout\": \"yolo\", \"boxes\": \"0:4\", "
            f"\"scores\": \"4:\"}}}}}} for a detector head, {{\"{name}\": {{\"threshold\": 0.5, "
            f"\"threshold_channels\": \"{channel}:{channel + 1}\"}}}} for a score map, or {{\"{name}\": "
            f"{{\"ignore\": true}}}}")


def output_report(plan: OutputPlan, acc: PairAccumulator, skip: np.ndarray | None = None
                  ) -> tuple[OutputReport, list[MomentTerm]]:
    """Return one value output's metrics and drop, and the bootstrap terms that drop is made of.

    ``skip``: channels judged by their threshold decisions. The whole-output correlation then mixes judged and
    skipped channels, so only the other channels' own drops make the output's drop (no terms: nothing left).
    """
    with_target = plan.target and acc.with_target
    rows = acc.output_rows()
    term = MomentTerm(pair_moments(rows, 0, 1), pair_moments(rows, 0, 2) if with_target else None,
                      pair_moments(rows, 1, 2) if with_target else None, implied=True)
    terms = [term] if skip is None else []
    drop = term.point()
    worst_channel = worst_drop = None
    if acc.channels > 1 and (skip is None or skip.size < acc.channels):
        channel_term, worst_channel, worst_drop = _channel_drop(acc, skip)
        terms.append(channel_term)
        drop = max(drop, worst_drop) if skip is None else max(worst_drop, 0.0)
    if with_target:
        vs_fp32, fp32_t, int8_t = _pair_metrics(acc, [(0, 1), (0, 2), (1, 2)])
    else:
        (vs_fp32,), fp32_t, int8_t = _pair_metrics(acc, [(0, 1)]), None, None
    report = OutputReport(plan.spec.name, drop, vs_fp32, fp32_t, int8_t, channels=acc.channels,
                          channel_axis=plan.channel_axis if acc.channels > 1 else None,
                          worst_channel=worst_channel, worst_channel_drop=worst_drop, ignored=plan.ignore,
                          mask=plan.mask)
    return report, terms


def _masked(plan: OutputPlan) -> str:
    """Return the words saying which positions counted, for an output with a mask."""
    if plan.mask is None:
        return ""
    return f" at the positions {plan.mask!r} {'leaves unset' if plan.mask_invert else 'sets'}"


def _label_term(acc: LabelAccumulator) -> Any:
    class _Term:
        def replicates(self, weights: np.ndarray) -> np.ndarray:
            return acc.rate(weights)

    return _Term()


def _accuracy_term(acc: AccuracyAccumulator) -> Any:
    class _Term:
        def replicates(self, weights: np.ndarray) -> np.ndarray:
            return acc.drop(weights)

    return _Term()


def label_reports(c: Collector, options: CompareOptions) -> tuple[dict[str, LabelReport], list[Breach]]:
    """Return the agreement of every label output (and argmax view) and the ones over their flip budget."""
    entry = c.entry
    plans = {plan.spec.name: plan for plan in c.plans}
    reports: dict[str, LabelReport] = {}
    breaches: list[Breach] = []
    for key, lab in sorted(c.labels.items()):
        plan = plans[key.removesuffix(":argmax")]
        budget = next(b for b in (plan.budget_label_flip, entry.budget_label_flip, DEFAULT_LABEL_FLIP) if b is not None)
        rate = float(lab.rate())
        interval = bootstrap_drop([_label_term(lab)], c.unit_count, options.bootstrap, c.seed, options.confidence)
        what = "labels" if not key.endswith(":argmax") else f"argmax(axis={plan.argmax_axis})"
        accuracy = c.accuracy.get(plan.spec.name) if key.endswith(":argmax") else None
        if accuracy is not None:
            fp32_acc, int8_acc = accuracy.accuracies()
            acc_interval = bootstrap_drop([_accuracy_term(accuracy)], c.unit_count, options.bootstrap, c.seed,
                                          options.confidence)
            reports[key] = LabelReport(what, rate, budget, interval, fp32_acc, int8_acc, acc_interval,
                                       plan.budget_accuracy)
            if plan.budget_accuracy is not None:  # it decides; an accuracy drop never exceeds the flip rate
                drop = fp32_acc - int8_acc
                if not plan.ignore and over_budget(drop, acc_interval, plan.budget_accuracy, options.decision):
                    breaches.append(Breach("accuracy", (
                        f"output {plan.spec.name!r}: accuracy against the class-id target drops by {drop:.4%} "
                        f"(fp32 {fp32_acc:.4%}, int8 {int8_acc:.4%}), over quant_outputs budget_accuracy "
                        f"{plan.budget_accuracy:g}{_masked(plan)}"), Focus(plan.spec.name, what=what)))
                continue
        else:
            reports[key] = LabelReport(what, rate, budget, interval)
        if not plan.ignore and over_budget(rate, interval, budget, options.decision):
            breaches.append(Breach("labels", f"output {key.removesuffix(':argmax')!r}: {what} differ on {rate:.2%} "
                                             f"of elements (int8 vs fp32){_masked(plan)}, over quant_budget_label_flip "
                                             f"{budget:g}", Focus(plan.spec.name, what=what)))
    return reports, breaches


@dataclass(frozen=True)
class Budget:
    """The PLCC budget that applies: the entry's, or the one ``quant_budget_relative`` derives from the target."""

    value: float
    kind: Kind = "drop"
    note: str = ""


def plcc_budget(entry: Entry, reports: Sequence[OutputReport]) -> Budget:
    """Return the budget the drop is held to (``quant_budget_relative`` r: ``(1 − r) · PLCC(fp32, t)``)."""
    relative = entry.budget_relative
    if relative is None:
        return Budget(entry.budget_plcc)
    ref_t = next((r.fp32_vs_target for r in reports if r.fp32_vs_target is not None), None)
    if ref_t is None:
        raise FixtureError(f"entry {entry.id!r} field 'quant_budget_relative': no output is compared with the "
                           f"fixture's target")
    allowed = (1.0 - relative) * ref_t.plcc
    explicit = entry.explicit_budget_plcc
    return Budget(allowed if explicit is None else min(float(explicit), allowed), "relative",
                  f" (quant_budget_relative {relative:g}: int8 PLCC vs target must be >= {relative:g} × fp32 PLCC "
                  f"vs target {ref_t.plcc:.6f})")


# --- one decision ------------------------------------------------------------------------------------------------


def _decide(c: Collector, ep: str, options: CompareOptions) -> GateResult:
    """Measure every output, run every check, and turn the breaches into one verdict (the first one leads)."""
    entry = c.entry
    samples = c.filled if options.sequential else c.samples  # sequential: the samples run so far
    base: dict[str, Any] = dict(entry_id=entry.id, ep=ep, mode=entry.mode, samples=samples,
                                budget=entry.budget_plcc, compare=entry.compare, decision=options.decision)
    if c.target_range[0] == c.target_range[1]:
        raise FixtureError(f"{c.where}: array 'target' is constant; a correlation against it is undefined")
    degenerate = check_degenerate(c)
    if degenerate is not None:  # no metric of a NaN or constant output means anything: it decides alone
        return decide(base, [degenerate], "")

    reports: list[OutputReport] = []
    terms: list[MomentTerm] = []
    terms_of: dict[str, list[MomentTerm]] = {}
    judged: set[str] = set()  # the outputs a verdict is made of (quant_outputs ignore leaves one reported only)
    by_plcc: set[str] = set()  # the outputs whose PLCC drop is judged (detections, embeddings and thresholds judge
    whole: set[str] = set()  # the rest); whole: judged whole, so gain/offset and absolute errors apply too
    breaches: list[Breach] = []  # a residual entry's gross raw gain/offset error leads: it is the diagnosis
    for plan in c.plans:
        name = plan.spec.name
        if not plan.ignore:
            judged.add(name)
        if plan.labels:
            continue
        threshold = c.thresholds.get(name)
        skip = np.asarray(threshold.channels) if threshold is not None else None
        report, output_terms = output_report(plan, c.values[name], skip)
        reports.append(report)
        terms_of[name] = output_terms
        if plan.ignore:
            continue
        if plan.plcc_judged and output_terms:
            by_plcc.add(name)
            terms += output_terms
            if skip is None:
                whole.add(name)
        raw = c.raw.get(name)
        if raw is not None:
            found = check_affine(name, _pair_metrics(raw, [(0, 1)])[0], entry.budget_slope,
                                 " (raw, before the residual)")
            if found is not None:
                breaches.append(found)
    labels, label_breaches = label_reports(c, options)
    for plan in c.plans:  # label outputs get a report carrying only their agreement; argmax views join theirs
        name = plan.spec.name
        if plan.labels:
            nan = float("nan")
            empty = PairMetrics(0, nan, nan, nan, nan, nan, nan, nan, nan, nan)
            reports.append(OutputReport(name, 0.0, empty, labels=labels[name], ignored=plan.ignore, mask=plan.mask))
        elif f"{name}:argmax" in labels:
            i = next(i for i, r in enumerate(reports) if r.name == name)
            reports[i] = replace(reports[i], labels=labels[f"{name}:argmax"])
    reports, task_breaches, task_passes = _task_reports(c, options, reports)

    budget = plcc_budget(entry, reports)
    base["budget"] = budget.value
    value_reports = [r for r in reports if r.name in by_plcc]
    if not value_reports:  # no PLCC decides: label agreement and the task views (detections, thresholds...)
        said = [f"label flip rate {', '.join(f'{k} {v.flip_rate:.2%}' for k, v in labels.items())} within budget"
                ] if labels else []
        return decide(dict(base, outputs=tuple(reports), warnings=tuple(c.notes[n] for n in sorted(c.notes))),
                      [*breaches, *label_breaches, *task_breaches], "; ".join([*said, *task_passes]))

    def hint_of(rep: OutputReport) -> str:
        if rep.worst_channel_drop is None or rep.worst_channel_drop < rep.drop:
            return ""
        return tiny_channel_hint(rep.name, c.values[rep.name], rep.worst_channel)

    def interval_of(output_terms: Sequence[MomentTerm]) -> Interval | None:
        if options.sequential:  # valid at every look, unlike a bootstrap re-checked after each chunk
            from .sequential import confidence_sequence

            return confidence_sequence(output_terms, samples, c.samples, options.confidence)
        return bootstrap_drop(output_terms, c.unit_count, options.bootstrap, c.seed, options.confidence)

    own = {p.spec.name: p.budget_plcc for p in c.plans if p.budget_plcc is not None and p.spec.name in by_plcc}
    drop_breaches: list[Breach] = []
    if not own:  # one budget: the worst output's drop, with the interval of the worst over every output
        worst = max(value_reports, key=lambda r: r.drop)
        interval = interval_of(terms)
        found = check_drop(worst, interval, budget, options.decision, hint_of(worst))
        drop_breaches += [found] if found is not None else []
    else:  # quant_outputs budget_plcc: each output against its own budget; the one furthest over it is shown
        def budget_of(name: str) -> Budget:
            if name not in own:
                return budget
            return Budget(own[name], "drop", f" (quant_outputs {name!r} budget_plcc)")

        judged_by: list[tuple[float, OutputReport, Interval | None, Budget]] = []
        for rep in value_reports:
            own_interval = interval_of(terms_of[rep.name])
            rep_budget = budget_of(rep.name)
            found = check_drop(rep, own_interval, rep_budget, options.decision, hint_of(rep))
            drop_breaches += [found] if found is not None else []
            judged_by.append((rep.drop - rep_budget.value, rep, own_interval, rep_budget))
        _, worst, interval, budget = max(judged_by, key=lambda j: j[0])
        base["budget"] = budget.value
    needed = samples_needed(samples, interval, worst.drop, budget.value) if interval else None
    warnings: list[str] = [c.notes[name] for name in sorted(c.notes)]
    if needed is not None and interval is not None:
        warnings.append(
            f"the {interval.level:.0%} interval [{interval.low:.6f}, {interval.high:.6f}] straddles the budget "
            f"{budget.value:g}: this fixture cannot resolve the verdict; "
            + (f"about {needed} samples would" if needed else "the drop sits on the budget, no sample count would")
        )
    probe = tuple(float(v) for v in c.values[value_reports[0].name].reservoir()[:64, 0])

    # every budget is checked and every breach reported: the PLCC drop, then what PLCC cannot see (gain and
    # offset errors have PLCC 1.0), the absolute errors, the label agreement and the task views
    breaches += drop_breaches
    for rep in value_reports:
        if rep.name not in whole:
            continue
        found = check_affine(rep.name, rep.vs_fp32, entry.budget_slope)
        if found is not None:
            breaches.append(found)
        breaches += check_absolute(rep.name, rep.vs_fp32, entry)
    breaches += label_breaches
    breaches += task_breaches
    common = dict(base, drop=worst.drop, interval=interval, outputs=tuple(reports), needed_samples=needed,
                  warnings=tuple(warnings), fp32_probe=probe)
    passed = "; ".join([f"PLCC drop {worst.drop:.6f} <= budget {budget.value:g}{budget.note}", *task_passes])
    if options.decision == "three-way" and not breaches and interval is not None and interval.high > budget.value:
        from .sequential import inconclusive_text  # neither proven under the budget nor over it

        return GateResult(**common, verdict=INCONCLUSIVE, kind="inconclusive",
                          reason=inconclusive_text(interval, budget.value, samples, needed))
    return decide(common, breaches, passed)


def _task_reports(c: Collector, options: CompareOptions, reports: list[OutputReport]
                  ) -> tuple[list[OutputReport], list[Breach], list[str]]:
    """Return the reports with their task views attached, the breaches of those views and what passed."""

    def over(value: float, interval: Interval | None, budget: float) -> bool:
        return over_budget(value, interval, budget, options.decision)

    breaches: list[Breach] = []
    passes: list[str] = []
    plans = {plan.spec.name: plan for plan in c.plans}
    out = []
    for rep in reports:
        name = rep.name
        plan = plans[name]
        threshold = c.thresholds.get(name)
        if threshold is not None:
            found_t = threshold_report(threshold, plan.budget_threshold_flip, c.unit_count, options.bootstrap,
                                       c.seed, options.confidence)
            rep = replace(rep, thresholds=found_t)
            failing = [] if plan.ignore else threshold_breaches(name, found_t, over)
            channels = tuple(sorted((row for row in found_t.channels if row.either and over(
                row.flip_share, row.interval, found_t.budget)), key=lambda row: -row.flip_share))
            axis = plan.channel_axis if c.values[name].channels > 1 else None
            focus = Focus(name, axis, tuple(row.channel for row in channels),
                          ", ".join(f"channel {row.channel}" for row in channels[:5]) + (
                              f" along axis {axis}" if axis is not None else ""))
            breaches += [Breach("threshold", text, focus) for text in failing]
            if not failing and not plan.ignore:
                crossing = [row for row in found_t.channels if row.either]
                worst = max((row.flip_share for row in crossing), default=0.0)
                passes.append(f"output {name!r}: decisions x >= {found_t.threshold:g} agree (worst channel "
                              f"{worst:.2%} <= {found_t.budget:g})")
        detections = c.detections.get(name)
        if detections is not None:
            found_d = detection_report(detections, c.unit_count, options.bootstrap, c.seed, options.confidence)
            if found_d.fp32 == 0:  # nothing to miss: a verdict on it would pass any sidecar
                rules = detections.rules
                raise FixtureError(
                    f"{c.where}: entry {c.entry.id!r} field 'quant_outputs' output {name!r}: the fp32 model makes no "
                    f"detection on the soak fixture at score_threshold {rules.score_threshold:g} (boxes "
                    f"{rules.boxes!r}, scores {rules.scores!r}, channel axis {plan.channel_axis or 1}); check the "
                    f"layout and the slices, or lower score_threshold")
            rep = replace(rep, detections=found_d)
            failing = [] if plan.ignore else detection_breaches(name, found_d, over)
            losing = sorted((k for k in found_d.classes if k.fp32 > k.matched), key=lambda k: k.matched - k.fp32)
            focus = Focus(name, plan.channel_axis if plan.channel_axis is not None else 1,
                          tuple(int(detections.score_idx[k.cls]) for k in losing[:5]),
                          ", ".join(f"class {k.cls}" for k in losing[:5]) or "the detections")
            breaches += [Breach("detections", text, focus) for text in failing]
            if not failing and not plan.ignore:
                passes.append(f"output {name!r}: int8 matches {found_d.matched} of {found_d.fp32} fp32 detections "
                              f"(missed {found_d.missed:.2%} <= {found_d.budget_missed:g}, extra "
                              f"{found_d.extra:.2%} <= {found_d.budget_extra:g})")
        embedding = c.embeddings.get(name)
        if embedding is not None:
            found_e = embedding_report(embedding, plan.budget_cosine, plan.budget_neighbours, c.unit_count,
                                       options.bootstrap, c.seed, options.confidence)
            rep = replace(rep, embedding=found_e)
            failing = [] if plan.ignore else embedding_breaches(name, found_e, over)
            breaches += [Breach("embedding", text, Focus(name, what=f"embedding along axis {found_e.axis}"))
                         for text in failing]
            if not failing and not plan.ignore:
                passes.append(f"output {name!r}: mean 1 - cos {found_e.cosine_distance:.4g} <= "
                              f"{found_e.budget_cosine:g}" + (
                                  f", recall@{found_e.neighbours_k} {found_e.neighbours_recall:.3f}"
                                  if found_e.neighbours_recall is not None else ""))
        out.append(rep)
    return out, breaches, passes


def compare(
    entry: Entry,
    ep: str,
    fixture: Fixture,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    fp32_out: Mapping[str, np.ndarray],
    int8_out: Mapping[str, np.ndarray],
    options: CompareOptions,
) -> GateResult:
    """Compare whole in-memory outputs (samples on axis 0): one chunk through the same streaming statistics."""
    plans = plan_outputs(entry, fixture, inputs, outputs)
    collector = Collector(entry, plans, fixture.samples, options.seed, str(fixture.path))
    feeds = {name: np.asarray(fixture.inputs[name]) for name in fixture.inputs}
    collector.add(0, feeds, fixture.target_array(), fp32_out, int8_out)
    return collector.decide(ep, options)


# --- --quantgate-sequential: one look at the confidence sequence -----------------------------------------------


@dataclass(frozen=True)
class LookResult:
    """What one look found: the interval, the budget it is held to, and whether the verdict is settled."""

    samples: int
    interval: Interval | None
    budget: float
    settled: str | None  # PASS or FAIL when the interval clears the budget; None: continue


def look(collector: Collector, ep: str, samples: int, level: float) -> LookResult:
    """Compute the sequence's interval on the samples folded so far and say whether it settles the verdict."""
    from ..errors import InputError
    from .sequential import MIN_LOOK, three_way

    if samples < MIN_LOOK:
        return LookResult(samples, None, math.nan, None)
    judged = {plan.spec.name for plan in collector.plans if not plan.ignore}
    others = [*collector.labels, *collector.thresholds, *collector.detections, *collector.embeddings]
    if any(key.removesuffix(":argmax") in judged for key in others):
        # the sequence covers the PLCC drop only: label flips, decisions, detections and embeddings are judged
        # on the whole fixture (a stop on the drop would decide them on its first samples)
        return LookResult(samples, None, math.nan, None)
    try:  # the final decision's own code, without bootstraps: the same drop, budget and interval
        result = collector.decide(ep, CompareOptions(bootstrap=0, confidence=level, decision="three-way",
                                                     sequential=True))
    except InputError:  # e.g. a target still constant in the first samples: no look yet
        return LookResult(samples, None, math.nan, None)
    interval = result.interval
    if interval is None:
        return LookResult(samples, None, result.budget, None)
    verdict = three_way(interval, result.budget)
    return LookResult(samples, interval, result.budget, None if verdict == INCONCLUSIVE else verdict)
