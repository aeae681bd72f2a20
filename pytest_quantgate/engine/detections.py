"""Raw detector heads judged by their detections: decode, suppress, match int8 to fp32 by class and IoU, count.

An output with ``quant_outputs`` ``detections`` rules is a raw head such as YOLOv8's ``[N, 4 + classes, anchors]``.
Both models' heads are decoded the same way (:func:`decode`: best class per anchor, score threshold, boxes to
xyxy, greedy NMS, the top ``max_detections``), the int8 detections are matched to the fp32 ones of the same class
(:func:`match`), and only counts are kept: per unit (sample, or hashed block past the cap, as in
:mod:`.streaming`) and class, [fp32 detections, int8 detections, matched]. The state is ``units × classes × 3``
float64 whatever the anchor count, and two accumulators over disjoint samples merge by adding rows.

The verdict is on two shares: fp32 detections int8 misses (``1 − matched / fp32``) and int8 detections fp32 does
not have (``1 − matched / int8``), overall and, for classes with enough fp32 detections, per class; their
intervals resample units, a replicate's share being ``Σ w·(fp32 − matched) / Σ w·fp32``.

IoU of two xyxy boxes is ``intersection / (area₁ + area₂ − intersection)`` with a box's area taken as 0 when it
is inverted, and 0 when the union is empty. An anchor with a NaN score is never a detection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..errors import RegistryError
from ..records import ClassDetections, DetectionReport, Interval
from .metrics import bootstrap_drop, weighted_sum
from .selection import select_channels
from .streaming import Units, _put_counts, placed

# candidates NMS resolves at once: a block's IoU matrix is BLOCK² values (128 KiB), so a head whose every anchor
# passes the threshold never builds an anchors² matrix (8400² float64 would be 565 MB)
NMS_BLOCK = 128
# the columns of a class's counts
FP32, INT8, MATCHED = 0, 1, 2
# classes named in the overall missed sentence
NAMED_CLASSES = 5
# below this share of non-zero per-class counts, the bootstrap sums them as a sparse matrix
SPARSE_SHARE = 0.25
_FORMATS = ("cxcywh", "xyxy")
_NMS = ("class", "agnostic")
_LAYOUTS = ("yolo",)


@dataclass(frozen=True)
class DetectionRules:
    """How a raw head is decoded and judged: the ``detections`` rules of one output, with the schema's defaults."""

    boxes: str = "0:4"
    scores: str = "4:"
    box_format: str = "cxcywh"
    score_threshold: float = 0.25
    nms_iou: float = 0.45
    nms: str = "class"
    match_iou: float = 0.5
    budget_missed: float = 0.05
    budget_extra: float = 0.10
    min_class_detections: int = 20
    max_detections: int = 300
    layout: str = "yolo"

    @classmethod
    def from_rules(cls, raw: Mapping[str, Any]) -> DetectionRules:
        """Return the rules of a registry ``detections`` object; a key or value the schema forbids: RegistryError."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise RegistryError(f"detections: unknown key(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            kind = type(getattr(cls, key))
            # bool is an int to Python but never a number in the registry
            if isinstance(value, bool) or (kind is str and not isinstance(value, str)) or (
                    kind in (int, float) and not isinstance(value, (int, float))) or (
                    kind is int and isinstance(value, float) and not value.is_integer()):
                raise RegistryError(f"detections: {key} must be a {kind.__name__}, not {value!r}")
            values[key] = kind(value)
        rules = cls(**values)
        for key, allowed in (("box_format", _FORMATS), ("nms", _NMS), ("layout", _LAYOUTS)):
            if getattr(rules, key) not in allowed:
                raise RegistryError(f"detections: {key} {getattr(rules, key)!r} is not one of {list(allowed)}")
        for key, low, high in (("nms_iou", 0.0, 1.0), ("match_iou", 0.0, 1.0), ("budget_missed", 0.0, 1.0),
                               ("budget_extra", 0.0, 1.0), ("score_threshold", 0.0, float("inf"))):
            if not low <= getattr(rules, key) <= high:
                raise RegistryError(f"detections: {key} {getattr(rules, key)!r} is outside [{low:g}, {high:g}]")
        if rules.match_iou == 0.0:
            raise RegistryError("detections: match_iou must be above 0 (every pair of boxes would match)")
        for key in ("min_class_detections", "max_detections"):
            if getattr(rules, key) < 1:
                raise RegistryError(f"detections: {key} must be at least 1, not {getattr(rules, key)!r}")
        return rules

    def channels(self, size: int, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Return the (box, score) channel indices among ``size``; a RegistryError names ``where`` and the field."""
        box = select_channels(self.boxes, size, f"{where} detections boxes")
        if box.size != 4:
            raise RegistryError(f"{where} detections boxes: {self.boxes!r} selects {box.size} channel(s) of the "
                                f"{size}; a box takes exactly 4")
        score = select_channels(self.scores, size, f"{where} detections scores")
        shared = np.intersect1d(box, score)
        if shared.size:
            raise RegistryError(f"{where} detections boxes {self.boxes!r} and scores {self.scores!r} overlap on "
                                f"channel(s) {shared.tolist()}")
        return box, score


@dataclass(frozen=True)
class Detections:
    """One sample's detections after NMS, by descending score (ties: lower anchor first)."""

    boxes: np.ndarray  # (k, 4) float64 xyxy
    scores: np.ndarray  # (k,) float64
    classes: np.ndarray  # (k,) int64: index among the score channels

    def __len__(self) -> int:
        """Return the number of detections."""
        return int(self.scores.shape[0])


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the IoU of every xyxy box of ``a`` (p, 4) with every one of ``b`` (q, 4): (p, q)."""
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(width, 0.0, None) * np.clip(height, 0.0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0.0, None) * np.clip(a[:, 3] - a[:, 1], 0.0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0))


def _as_index(idx: np.ndarray) -> slice | np.ndarray:
    """Return a slice for consecutive indices, so selecting them is a view rather than a copy of the head."""
    if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        return slice(int(idx[0]), int(idx[0]) + idx.size)
    return idx


def _suppress(boxes: np.ndarray, classes: np.ndarray, threshold: float, agnostic: bool, limit: int) -> np.ndarray:
    """Return the positions greedy NMS keeps of boxes sorted by descending score, at most ``limit``, in order.

    Greedy NMS keeps a box unless a kept box before it (of its class, unless agnostic) overlaps it by IoU above
    ``threshold``. Blocks of NMS_BLOCK candidates are first cut down by the boxes already kept, then resolved
    among themselves as the fixed point of ``keep[j] = no kept i < j suppresses j``: greedy's result is that
    equation's only solution, and iterating it from all-kept settles one more position per pass at least, so a
    pass that changes nothing has reached it (a suppression chain is rarely more than a few boxes deep).
    """
    kept: list[np.ndarray] = []
    kept_boxes = np.zeros((0, 4))
    kept_classes = np.zeros(0, dtype=np.int64)
    total = 0
    for low in range(0, boxes.shape[0], NMS_BLOCK):
        index = np.arange(low, min(low + NMS_BLOCK, boxes.shape[0]))
        block, cls = boxes[index], classes[index]
        if total:
            hit = iou(kept_boxes, block) > threshold
            if not agnostic:
                hit &= kept_classes[:, None] == cls[None, :]
            alive = ~hit.any(axis=0)
            index, block, cls = index[alive], block[alive], cls[alive]
        hit = np.triu(iou(block, block) > threshold, k=1)  # hit[i, j]: i (earlier) would suppress j
        if not agnostic:
            hit &= cls[:, None] == cls[None, :]
        keep = np.ones(index.size, dtype=bool)
        for _ in range(index.size + 1):
            settled = np.asarray(~(hit & keep[:, None]).any(axis=0))
            if np.array_equal(settled, keep):
                break
            keep = settled
        kept.append(index[keep])
        kept_boxes = np.concatenate([kept_boxes, block[keep]])
        kept_classes = np.concatenate([kept_classes, cls[keep]])
        total += int(keep.sum())
        if total >= limit:
            break
    return np.concatenate(kept)[:limit] if kept else np.zeros(0, dtype=np.intp)


def decode(head: np.ndarray, rules: DetectionRules, box_idx: np.ndarray, score_idx: np.ndarray) -> list[Detections]:
    """Decode a raw head (n, C, A), channels second and anchors flattened last, into each sample's detections.

    Per anchor the best class is the first score channel of highest score; the anchor is a candidate when that
    score reaches ``score_threshold``. Candidates are ordered by descending score, ties by anchor index, and go
    through greedy NMS (per class, or across classes with ``nms == "agnostic"``); the first ``max_detections``
    kept are the sample's detections.
    """
    if head.ndim != 3 or box_idx.size != 4:
        raise ValueError(f"decode takes a head (n, channels, anchors) and 4 box channels, not {head.shape} and "
                         f"{box_idx.size}")
    boxes_at, scores_at = _as_index(box_idx), _as_index(score_idx)
    agnostic = rules.nms == "agnostic"
    out: list[Detections] = []
    for sample in head:
        scores = sample[scores_at]  # (K, A): a view when the score channels are consecutive
        # the maximum first (a fast reduction over rows), the class only for the few anchors that pass: argmax
        # over all 8400 anchors costs more than the rest of decoding; NaN propagates and never passes
        best = scores.max(axis=0).astype(np.float64)
        with np.errstate(invalid="ignore"):
            anchors = np.flatnonzero(best >= rules.score_threshold)
        cls = np.argmax(scores[:, anchors], axis=0).astype(np.int64)
        score = best[anchors]
        raw = sample[boxes_at][:, anchors].astype(np.float64).T  # (k, 4)
        if rules.box_format == "cxcywh":
            half = raw[:, 2:] / 2.0
            box = np.concatenate([raw[:, :2] - half, raw[:, :2] + half], axis=1)
        else:
            box = raw
        order = np.argsort(-score, kind="stable")  # anchors are ascending: ties keep the lower anchor first
        box, score, cls = box[order], score[order], cls[order]
        keep = _suppress(box, cls, rules.nms_iou, agnostic, rules.max_detections)
        out.append(Detections(np.ascontiguousarray(box[keep]), score[keep], cls[keep]))
    return out


def _greedy(value: np.ndarray) -> np.ndarray:
    """Return which rows greedy matching pairs: row by row, each takes the free column of highest finite value.

    Ties go to the lower column. Vectorised in rounds: every waiting row picks its best free column, and the
    rows before the first one whose pick an earlier waiting row also made are committed, since greedy gives
    each of them that pick too; a row with no finite free column never matches. Every round commits one row at
    least, and a round per conflict is needed, which is rare after NMS.
    """
    value = value.copy()
    matched = np.zeros(value.shape[0], dtype=bool)
    waiting = np.arange(value.shape[0])
    while waiting.size:
        rows = value[waiting]
        pick = rows.argmax(axis=1)
        possible = np.isfinite(rows[np.arange(waiting.size), pick])
        waiting, pick = waiting[possible], pick[possible]
        if not waiting.size:
            break
        _, first = np.unique(pick, return_index=True)
        repeat = np.ones(pick.size, dtype=bool)
        repeat[first] = False
        stop = int(np.argmax(repeat)) if repeat.any() else pick.size
        matched[waiting[:stop]] = True
        value[:, pick[:stop]] = -np.inf
        waiting = waiting[stop:]
    return matched


def match(a: Detections, b: Detections, match_iou: float, classes: int) -> np.ndarray:
    """Return per-class counts (classes, 3): [fp32 detections, int8 detections, matched] of one sample.

    The rule: within each class, the fp32 detections ``a`` are taken in descending score order (ties: the order
    given), and each takes the still unmatched int8 detection ``b`` of that class with the highest IoU, when that
    IoU is at least ``match_iou`` (IoU ties: the earlier int8 detection). An fp32 detection that finds none is
    missed; an int8 detection no fp32 detection took is extra.
    """
    if max(int(a.classes.max(initial=-1)), int(b.classes.max(initial=-1))) >= classes:
        raise ValueError(f"a detection's class is past the {classes} classes counted")
    counts = np.zeros((classes, 3), dtype=np.int64)
    counts[:, FP32] = np.bincount(a.classes, minlength=classes)
    counts[:, INT8] = np.bincount(b.classes, minlength=classes)
    if len(a) and len(b):
        order = np.argsort(-a.scores, kind="stable")
        overlap = iou(a.boxes[order], b.boxes)
        fits = (overlap >= match_iou) & (a.classes[order][:, None] == b.classes[None, :])
        matched = _greedy(np.where(fits, overlap, -np.inf))
        counts[:, MATCHED] = np.bincount(a.classes[order][matched], minlength=classes)
    return counts


def _share(sums: np.ndarray, of: int) -> np.ndarray:
    """Return ``1 − matched / sums[..., of]`` from count sums (..., 3): NaN where there is nothing to share."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray((sums[..., of] - sums[..., MATCHED]) / sums[..., of])


class DetectionAccumulator:
    """Per-unit, per-class detection counts [fp32, int8, matched] of a raw head, (units, classes · 3) float64.

    It keeps the head's box and score channels (:meth:`DetectionRules.channels`): class ``k`` is the score channel
    ``score_idx[k]`` of the head.
    """

    def __init__(self, samples: int, rules: DetectionRules, box_idx: np.ndarray, score_idx: np.ndarray,
                 units: Units | None = None) -> None:
        self.units = units if units is not None else Units(samples, samples)
        self.rules = rules
        self.box_idx = np.asarray(box_idx, dtype=np.intp)
        self.score_idx = np.asarray(score_idx, dtype=np.intp)
        self.classes = int(self.score_idx.size)
        self.counts = np.zeros((self.units.count, self.classes * 3), dtype=np.float64)

    def add(self, start: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Fold samples ``start ..`` of the fp32 and int8 heads (n, C, A) in; return each one's disagreement.

        A sample's disagreement is (missed + extra) / (fp32 + int8 detections), 0 without detections.
        """
        found_a = decode(a, self.rules, self.box_idx, self.score_idx)
        found_b = decode(b, self.rules, self.box_idx, self.score_idx)
        rows = np.stack([match(x, y, self.rules.match_iou, self.classes) for x, y in zip(found_a, found_b)])
        _put_counts(self.units, self.counts, start, rows.reshape(rows.shape[0], -1).astype(np.float64))
        total = rows.sum(axis=1)  # (n, 3)
        wrong = total[:, FP32] + total[:, INT8] - 2 * total[:, MATCHED]
        return np.asarray(wrong / np.maximum(total[:, FP32] + total[:, INT8], 1), dtype=np.float64)

    def nbytes(self) -> int:
        """Return the bytes of the state."""
        return int(self.counts.nbytes)

    def totals(self) -> np.ndarray:
        """Return the counts over every unit, (classes, 3): [fp32, int8, matched]."""
        return np.asarray(self.counts.sum(axis=0).reshape(self.classes, 3))

    def _sums(self, weights: np.ndarray | None, cls: int | None) -> np.ndarray:
        rows = self.counts.reshape(-1, self.classes, 3)
        rows = rows.sum(axis=1) if cls is None else rows[:, cls, :]
        return np.asarray(rows.sum(axis=0) if weights is None else weighted_sum(weights, rows))

    def missed(self, weights: np.ndarray | None = None, cls: int | None = None) -> np.ndarray:
        """Return the share of fp32 detections int8 misses (overall or of class ``cls``), one per weight row."""
        share = _share(self._sums(weights, cls), FP32)
        return share if weights is not None else np.asarray(np.nan_to_num(share, nan=0.0))

    def extra(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Return the share of int8 detections fp32 does not have, one per weight row (B, units)."""
        share = _share(self._sums(weights, None), INT8)
        return share if weights is not None else np.asarray(np.nan_to_num(share, nan=0.0))

    def merge(self, other: DetectionAccumulator) -> DetectionAccumulator:
        """Return the accumulator of both halves of a split fixture (disjoint samples, same units and classes)."""
        if other.units != self.units or not np.array_equal(other.score_idx, self.score_idx):
            raise ValueError(f"cannot merge detection counts over different units or classes ({self.units}, "
                             f"{self.classes} vs {other.units}, {other.classes})")
        merged = DetectionAccumulator(self.units.samples, self.rules, self.box_idx, self.score_idx, self.units)
        # a sample's row is zero in the half that did not see it: adding places it (or sums blocks)
        merged.counts = self.counts + other.counts
        return merged

    def state(self, rows: slice) -> dict[str, np.ndarray]:
        """Return the count rows of ``rows`` (a shard's own units) and the head's box and score channels."""
        return {"counts": self.counts[rows], "box_idx": self.box_idx, "score_idx": self.score_idx}

    @classmethod
    def restore(cls, arrays: dict[str, np.ndarray], rules: DetectionRules, units: Units,
                rows: slice) -> DetectionAccumulator:
        """Return the accumulator :meth:`state` described; the units outside ``rows`` hold zeros."""
        acc = cls(units.samples, rules, arrays["box_idx"], arrays["score_idx"], units)
        acc.counts = placed(np.asarray(arrays["counts"], dtype=np.float64).reshape(-1, acc.classes * 3),
                            units.count, rows)
        return acc


@dataclass(frozen=True)
class _Extra:
    """The share of int8 detections fp32 lacks, per bootstrap replicate."""

    acc: DetectionAccumulator

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """Return one share per weight row."""
        return self.acc.extra(weights)


@dataclass(frozen=True)
class _Missed:
    """The overall missed share per replicate, recording each judged class's share from the same replicates.

    One pass serves every class: a bootstrap call per class would redraw the same weights once per class.
    """

    rows: Any  # (units, 2 · (1 + judged)) [fp32, matched] overall, then per judged class: ndarray or sparse
    seen: list[np.ndarray] = field(default_factory=list)  # (B, judged) per batch of replicates

    @property
    def width(self) -> int:
        """Return the values one replicate sums, which sizes bootstrap_drop's batches."""
        return int(self.rows.shape[1])

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """Return the overall missed share per weight row; keep the judged classes' shares."""
        if isinstance(self.rows, np.ndarray):
            sums = weighted_sum(weights, self.rows)
        else:
            sums = np.asarray(self.rows.T @ weights.T).T
        pairs = sums.reshape(weights.shape[0], -1, 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = (pairs[..., 0] - pairs[..., 1]) / pairs[..., 0]
        self.seen.append(share[:, 1:])
        return np.asarray(share[:, 0])


def _missed_rows(acc: DetectionAccumulator, judged: np.ndarray) -> Any:
    """Return the [fp32, matched] columns of every unit, overall then per judged class, sparse when mostly zero."""
    per_class = acc.counts.reshape(-1, acc.classes, 3)
    rows = np.concatenate([per_class.sum(axis=1)[:, None, :], per_class[:, judged, :]], axis=1)[..., [FP32, MATCHED]]
    rows = rows.reshape(rows.shape[0], -1)
    if np.count_nonzero(rows) > SPARSE_SHARE * rows.size:
        return rows
    # a sample has a few detections of a few of the classes: a replicate's sums over mostly-zero columns cost
    # B × nonzero values instead of B × units × columns (the whole report at 65 536 units, 80 judged classes and
    # ~4 detections a sample: 4.1 s instead of 10.3 s); counts and weights are integers, so the sums are exact
    # and both ways give the same intervals
    from scipy import sparse

    return sparse.csc_array(rows)


def _interval(values: np.ndarray, level: float, replicates: int) -> Interval | None:
    """Return the percentile interval of replicate values, as bootstrap_drop takes it."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return Interval(float(low), float(high), level, int(replicates))


def detection_report(acc: DetectionAccumulator, unit_count: int, bootstrap: int, seed: int,
                     confidence: float) -> DetectionReport:
    """Return the detections judged over the fixture, with bootstrap intervals over its units."""
    rules = acc.rules
    totals = acc.totals().astype(np.int64)
    judged = np.flatnonzero(totals[:, FP32] >= rules.min_class_detections)
    term = _Missed(_missed_rows(acc, judged))
    missed_interval = bootstrap_drop([term], unit_count, bootstrap, seed, confidence)
    extra_interval = bootstrap_drop([_Extra(acc)], unit_count, bootstrap, seed, confidence)
    class_values = np.concatenate(term.seen, axis=0) if term.seen else None
    intervals = {int(c): _interval(class_values[:, k], confidence, bootstrap) if class_values is not None else None
                 for k, c in enumerate(judged)}
    classes = tuple(
        ClassDetections(int(c), int(totals[c, FP32]), int(totals[c, INT8]), int(totals[c, MATCHED]),
                        judged=int(c) in intervals, missed_interval=intervals.get(int(c)))
        for c in np.flatnonzero(totals[:, FP32] + totals[:, INT8] > 0))
    fp32, int8, matched = (int(v) for v in totals.sum(axis=0))
    return DetectionReport(fp32, int8, matched, rules.budget_missed, rules.budget_extra, missed_interval,
                           extra_interval, classes)


def detection_breaches(name: str, report: DetectionReport,
                       over: Callable[[float, Interval | None, float], bool]) -> list[str]:
    """Return a sentence per breach: overall missed, overall extra, then each judged class over budget_missed."""
    out: list[str] = []
    if report.fp32 and over(report.missed, report.missed_interval, report.budget_missed):
        sentence = (f"output {name!r}: int8 misses {report.missed:.1%} of the fp32 detections ({report.matched} of "
                    f"{report.fp32} matched), over budget_missed {report.budget_missed:g}")
        # only classes that lost fp32 detections: one int8 adds detections to is not losing any
        losing = sorted((c for c in report.classes if c.fp32 > c.matched), key=lambda c: (c.matched - c.fp32, c.cls))
        if losing:
            sentence += "; classes that lost detections: " + ", ".join(
                f"class {c.cls}: {c.fp32} → {c.matched} matched" for c in losing[:NAMED_CLASSES])
        out.append(sentence)
    if report.int8 and over(report.extra, report.extra_interval, report.budget_extra):
        out.append(f"output {name!r}: int8 adds {report.int8 - report.matched} detections fp32 does not have "
                   f"({report.extra:.1%} of int8's {report.int8}), over budget_extra {report.budget_extra:g}")
    for c in report.classes:
        if c.judged and c.fp32 and over(c.missed, c.missed_interval, report.budget_missed):
            out.append(f"output {name!r} class {c.cls}: {c.fp32} fp32 detections → {c.matched} matched (missed "
                       f"{c.missed:.1%}), over budget_missed {report.budget_missed:g}")
    return out
