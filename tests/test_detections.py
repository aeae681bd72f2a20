"""Detector heads: decoding, NMS and matching against a plain-Python reference; verdict sentences; streaming."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import numpy as np
import pytest

from pytest_quantgate.engine import detections
from pytest_quantgate.engine.detections import (
    DetectionAccumulator,
    DetectionRules,
    Detections,
    decode,
    detection_breaches,
    detection_report,
    match,
)
from pytest_quantgate.engine.metrics import bootstrap_drop
from pytest_quantgate.engine.streaming import Units
from pytest_quantgate.errors import RegistryError
from pytest_quantgate.records import ClassDetections, DetectionReport, Interval

# --- an independent reference: one anchor, one box, one pair at a time --------------------------------------------

Box = tuple[float, float, float, float]
Found = tuple[Box, float, int]  # (xyxy box, score, class)


def ref_iou(p: Box, q: Box) -> float:
    """Return the IoU of two xyxy boxes (an inverted box has no area; an empty union gives 0)."""
    w = min(p[2], q[2]) - max(p[0], q[0])
    h = min(p[3], q[3]) - max(p[1], q[1])
    inter = max(w, 0.0) * max(h, 0.0)
    area_p = max(p[2] - p[0], 0.0) * max(p[3] - p[1], 0.0)
    area_q = max(q[2] - q[0], 0.0) * max(q[3] - q[1], 0.0)
    union = area_p + area_q - inter
    return inter / union if union > 0 else 0.0


def ref_decode(head: np.ndarray, box_ch: list[int], score_ch: list[int], fmt: str, threshold: float, nms_iou: float,
               agnostic: bool, limit: int) -> list[Found]:
    """Decode one sample (C, A) anchor by anchor, then suppress greedily."""
    candidates: list[tuple[float, int, Box, int]] = []
    for anchor in range(head.shape[1]):
        best_cls, best = -1, -math.inf
        for k, ch in enumerate(score_ch):
            value = float(head[ch, anchor])
            if value > best:
                best_cls, best = k, value
        if best < threshold:
            continue
        v0, v1, v2, v3 = (float(head[ch, anchor]) for ch in box_ch)
        if fmt == "cxcywh":
            box = (v0 - v2 / 2.0, v1 - v3 / 2.0, v0 + v2 / 2.0, v1 + v3 / 2.0)
        else:
            box = (v0, v1, v2, v3)
        candidates.append((-best, anchor, box, best_cls))
    candidates.sort(key=lambda c: (c[0], c[1]))
    kept: list[Found] = []
    for neg, _, box, cls in candidates:
        if len(kept) == limit:
            break
        if all(ref_iou(box, other) <= nms_iou for other, _, ocls in kept if agnostic or ocls == cls):
            kept.append((box, -neg, cls))
    return kept


def ref_match(a: list[Found], b: list[Found], match_iou: float, classes: int) -> np.ndarray:
    """Return [fp32, int8, matched] per class: fp32 by score, each taking its best free int8 box of its class."""
    counts = np.zeros((classes, 3), dtype=np.int64)
    for _, _, cls in a:
        counts[cls, 0] += 1
    for _, _, cls in b:
        counts[cls, 1] += 1
    used: set[int] = set()
    for box, _, cls in sorted(a, key=lambda d: -d[1]):
        pick, pick_iou = -1, -1.0
        for j, (other, _, ocls) in enumerate(b):
            if j in used or ocls != cls:
                continue
            value = ref_iou(box, other)
            if value >= match_iou and value > pick_iou:
                pick, pick_iou = j, value
        if pick >= 0:
            used.add(pick)
            counts[cls, 2] += 1
    return counts


# --- synthetic heads ----------------------------------------------------------------------------------------------


def write_boxes(head: np.ndarray, index: Any, boxes: np.ndarray, fmt: str) -> None:
    """Write cxcywh boxes (k, 4) into channels 0..3 of anchors ``index`` of one sample head (C, A)."""
    if fmt == "xyxy":
        boxes = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1)
    head[0:4, index] = boxes.T


def clustered_heads(seed: int, samples: int, classes: int, anchors: int, fmt: str) -> np.ndarray:
    """Return heads whose anchors gather in overlapping clusters (NMS matters) over noise near the threshold."""
    rng = np.random.default_rng(seed)
    head = np.zeros((samples, 4 + classes, anchors), dtype=np.float32)
    for s in range(samples):
        boxes = np.column_stack([rng.uniform(0, 200, (anchors, 2)), rng.uniform(5, 40, (anchors, 2))])
        head[s, 4:] = rng.uniform(0, 0.3, (classes, anchors))
        free = rng.permutation(anchors)
        for k in range(8):
            members = free[k * 12 : (k + 1) * 12]
            centre = np.concatenate([rng.uniform(20, 180, 2), rng.uniform(20, 60, 2)])
            boxes[members] = centre + rng.normal(0, 6, (members.size, 4))
            # mostly one class, sometimes two: per-class and agnostic NMS then differ
            cls = rng.integers(classes, size=members.size) if k % 3 == 0 else np.full(members.size, k % classes)
            head[s, 4 + cls, members] = rng.uniform(0.3, 1.0, members.size).astype(np.float32)
        write_boxes(head[s], slice(None), boxes, fmt)
    return head


def separated_heads(seed: int, samples: int, classes: int = 8, anchors: int = 400, objects: int = 5,
                    present: int = 7) -> np.ndarray:
    """Return cxcywh heads of a few well separated objects (classes < ``present``) over a quiet background."""
    rng = np.random.default_rng(seed)
    head = np.zeros((samples, 4 + classes, anchors), dtype=np.float32)
    for s in range(samples):
        write_boxes(head[s], slice(None), np.column_stack([rng.uniform(0, 600, (anchors, 2)),
                                                           rng.uniform(5, 20, (anchors, 2))]), "cxcywh")
        head[s, 4:] = rng.uniform(0, 0.1, (classes, anchors))
        cells = rng.choice(9, objects, replace=False)
        free = rng.permutation(anchors)
        for k, cell in enumerate(cells):
            members = free[k * 6 : (k + 1) * 6]
            centre = np.array([100 + 200 * (cell % 3), 100 + 200 * (cell // 3), *rng.uniform(40, 100, 2)])
            write_boxes(head[s], members, centre + rng.normal(0, 2, (members.size, 4)), "cxcywh")
            head[s, 4 + rng.integers(present), members] = rng.uniform(0.5, 0.95, members.size)
    return head


def noisy(head: np.ndarray, seed: int, box_sigma: float, score_sigma: float) -> np.ndarray:
    """Return ``head`` plus Gaussian noise on the boxes and the scores: an int8 head's rounding."""
    rng = np.random.default_rng(seed)
    out = head.copy()
    out[:, :4] += rng.normal(0, box_sigma, out[:, :4].shape).astype(np.float32)
    out[:, 4:] += rng.normal(0, score_sigma, out[:, 4:].shape).astype(np.float32)
    return out


def point(value: float, interval: Interval | None, budget: float) -> bool:
    """Decide on the point value alone."""
    return value > budget


# --- 1. the module against the reference --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fmt", ["cxcywh", "xyxy"])
@pytest.mark.parametrize("nms", ["class", "agnostic"])
def test_decode_and_match_agree_with_the_reference(seed: int, fmt: str, nms: str) -> None:
    classes, anchors = 5, 160
    rules = DetectionRules(box_format=fmt, nms=nms)
    a = clustered_heads(seed, 4, classes, anchors, fmt)
    scaled = a.copy()
    scaled[:, 4 + 2] *= 0.6  # class 2 fades: most of its detections fall under the threshold
    cases = {"noise": noisy(a, seed + 10, 1.5, 0.03), "class 2 scaled down": scaled}
    box, score = rules.channels(4 + classes, "test")

    def reference(head: np.ndarray, nms_iou: float = 0.45) -> list[Found]:
        return ref_decode(head, [0, 1, 2, 3], list(range(4, 4 + classes)), fmt, 0.25, nms_iou, nms == "agnostic", 300)

    found_a = decode(a, rules, box, score)
    suppressed = 0
    for name, b in cases.items():
        found_b = decode(b, rules, box, score)
        lost = np.zeros(classes, dtype=np.int64)
        for s in range(a.shape[0]):
            want_a, want_b = reference(a[s]), reference(b[s])
            for got, want in ((found_a[s], want_a), (found_b[s], want_b)):
                assert got.boxes.tolist() == [list(w[0]) for w in want], (name, s)
                assert got.scores.tolist() == [w[1] for w in want], (name, s)
                assert got.classes.tolist() == [w[2] for w in want], (name, s)
            counts = ref_match(want_a, want_b, 0.5, classes)
            np.testing.assert_array_equal(match(found_a[s], found_b[s], 0.5, classes), counts,
                                          err_msg=f"{name} sample {s}")
            lost += counts[:, 0] - counts[:, 2]
            suppressed += len(reference(a[s], nms_iou=2.0)) - len(want_a)
        if name == "class 2 scaled down":
            assert lost[2] > lost.sum() - lost[2], "the fixture must make class 2 lose detections"
    assert suppressed > 20, "the fixture must give NMS boxes to suppress"


def test_ties_keep_the_lower_anchor_and_the_threshold_is_inclusive() -> None:
    head = np.zeros((1, 6, 4), dtype=np.float32)
    head[0, :4] = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]], dtype=np.float32).T
    head[0, 4] = np.array([0.5, 0.5, 0.25, 0.2499], dtype=np.float32)  # anchors 0 and 1: one box, score, class
    head[0, 5] = [0.0, 0.0, 0.0, 0.0]
    rules = DetectionRules(box_format="xyxy")
    (found,) = decode(head, rules, np.arange(4), np.array([4, 5]))
    assert found.scores.tolist() == [0.5, 0.25] and found.boxes[1].tolist() == [50, 50, 60, 60]
    head[0, 4, 1], head[0, 5, 1] = 0.0, 0.5  # anchor 1 is another class now: a tie for the only place kept
    head[0, :4, 1] = [20, 20, 30, 30]
    (found,) = decode(head, DetectionRules(box_format="xyxy", max_detections=1), np.arange(4), np.array([4, 5]))
    assert found.classes.tolist() == [0] and found.boxes.tolist() == [[0, 0, 10, 10]]
    reversed_head = head[:, :, [1, 0, 2, 3]]  # the same tie with the anchors swapped keeps the other
    (found,) = decode(reversed_head, DetectionRules(box_format="xyxy", max_detections=1), np.arange(4),
                      np.array([4, 5]))
    assert found.classes.tolist() == [1]


def test_scattered_score_channels_and_a_small_limit_agree_with_the_reference() -> None:
    head = clustered_heads(7, 3, 6, 120, "cxcywh")
    rules = DetectionRules(max_detections=4, score_threshold=0.4, nms_iou=0.3)
    box, score = np.array([0, 1, 2, 3]), np.array([4, 5, 7, 9])  # channels 6 and 8 are not scores here
    for s, got in enumerate(decode(head, rules, box, score)):
        want = ref_decode(head[s], [0, 1, 2, 3], [4, 5, 7, 9], "cxcywh", 0.4, 0.3, False, 4)
        assert len(want) == 4
        assert got.classes.tolist() == [w[2] for w in want] and got.scores.tolist() == [w[1] for w in want]


def test_nms_is_greedy_a_suppressed_box_suppresses_nothing() -> None:
    # c0 suppresses c1 (IoU 0.54); c1 would suppress c2 (0.54), but c1 is gone, and c0 barely touches c2 (0.25)
    head = np.zeros((1, 5, 3), dtype=np.float32)
    head[0, :4] = np.array([[0, 0, 10, 1], [3, 0, 13, 1], [6, 0, 16, 1]], dtype=np.float32).T
    head[0, 4] = [0.9, 0.8, 0.7]
    (found,) = decode(head, DetectionRules(box_format="xyxy"), np.arange(4), np.array([4]))
    assert found.scores.tolist() == pytest.approx([0.9, 0.7])


def test_matching_is_greedy_in_fp32_score_order() -> None:
    # a0 and a1 both prefer b0; a1 falls back on b1, which a2 prefers; a2 falls back on b2. Greedy matches all
    # three; resolving picks in parallel would hand b1 to a2 and leave a1 without a match
    def dets(xs: list[tuple[float, float]], scores: list[float]) -> Detections:
        boxes = np.array([[x1, 0.0, x2, 1.0] for x1, x2 in xs])
        return Detections(boxes, np.array(scores), np.zeros(len(xs), dtype=np.int64))

    a = dets([(0, 10), (1, 11), (4, 14)], [0.9, 0.8, 0.7])
    b = dets([(0, 10), (3, 13), (6, 16)], [0.9, 0.8, 0.7])
    assert match(a, b, 0.5, 1).tolist() == [[3, 3, 3]]
    shuffled = Detections(a.boxes[::-1].copy(), a.scores[::-1].copy(), a.classes)  # the score order, not the given
    assert match(shuffled, b, 0.5, 1).tolist() == [[3, 3, 3]]
    other = Detections(b.boxes, b.scores, np.array([0, 1, 0]))  # b1 is another class: a1 then finds nothing
    assert match(a, other, 0.5, 2).tolist() == [[3, 2, 2], [0, 1, 0]]


# --- 2. the verdict -------------------------------------------------------------------------------------------


def _fold(a: np.ndarray, b: np.ndarray, rules: DetectionRules, units: Units | None = None, chunk: int = 64,
          start: int = 0, stop: int | None = None) -> DetectionAccumulator:
    """Fold samples ``start .. stop`` of two fixtures' heads in chunks."""
    stop = a.shape[0] if stop is None else stop
    box, score = rules.channels(a.shape[1], "test")
    acc = DetectionAccumulator(a.shape[0], rules, box, score, units)
    for low in range(start, stop, chunk):
        high = min(low + chunk, stop)
        acc.add(low, a[low:high], b[low:high])
    return acc


def test_a_healthy_int8_head_passes_and_a_lost_class_is_named() -> None:
    rules = DetectionRules()
    a = separated_heads(0, 200)
    healthy = noisy(a, 1, 0.5, 0.01)
    report = detection_report(_fold(a, healthy, rules), 200, 500, 0, 0.95)
    assert report.fp32 > 800 and report.missed < 0.05 and report.extra < 0.10
    assert detection_breaches("output0", report, point) == []
    assert all(c.cls != 7 for c in report.classes)  # class 7 never shows up in either model

    broken = healthy.copy()
    broken[:, 4 + 3] = 0.0  # int8 loses class 3
    rng = np.random.default_rng(2)
    for s in range(0, 200, 4):  # and invents class 7 boxes fp32 never has
        broken[s, 4 + 7, rng.integers(400)] = 0.9
    report = detection_report(_fold(a, broken, rules), 200, 500, 0, 0.95)
    by_class = {c.cls: c for c in report.classes}
    assert by_class[7].fp32 == 0 and by_class[7].int8 > 0 and not by_class[7].judged
    assert by_class[3].judged and by_class[3].matched == 0 and by_class[3].missed_interval is not None
    sentences = detection_breaches("output0", report, point)
    overall = re.fullmatch(r"output 'output0': int8 misses (\d+\.\d)% of the fp32 detections \((\d+) of (\d+) "
                           r"matched\), over budget_missed 0\.05; classes that lost detections: (.*)", sentences[0])
    assert overall is not None, sentences[0]
    assert int(overall[2]) == report.matched and int(overall[3]) == report.fp32
    assert overall[4].startswith(f"class 3: {by_class[3].fp32} → 0 matched")
    assert f"output 'output0' class 3: {by_class[3].fp32} fp32 detections → 0 matched (missed 100.0%), over " \
           "budget_missed 0.05" in sentences
    assert not any("class 7" in s for s in sentences), sentences


def test_the_overall_sentence_names_the_five_largest_losses_and_only_real_ones() -> None:
    classes = [ClassDetections(c, fp32, int8, matched) for c, fp32, int8, matched in [
        (0, 100, 100, 100), (1, 10, 4, 4), (2, 30, 10, 10), (3, 0, 50, 0), (4, 8, 0, 0), (5, 6, 6, 5),
        (6, 12, 3, 3), (7, 9, 1, 1), (8, 50, 47, 47), (9, 20, 25, 20)]]
    fp32, int8, matched = (sum(getattr(c, k) for c in classes) for k in ("fp32", "int8", "matched"))
    report = DetectionReport(fp32, int8, matched, 0.05, 0.10, classes=tuple(classes))
    sentences = detection_breaches("head", report, point)
    assert sentences[0].endswith("classes that lost detections: class 2: 30 → 10 matched, class 6: 12 → 3 matched, "
                                 "class 4: 8 → 0 matched, class 7: 9 → 1 matched, class 1: 10 → 4 matched")
    extra = int8 - matched
    assert sentences[1] == (f"output 'head': int8 adds {extra} detections fp32 does not have "
                            f"({extra / int8:.1%} of int8's {int8}), over budget_extra 0.1")
    assert len(sentences) == 2  # no class is judged on its own here
    # an interval-aware decision sees the intervals: a wide one below the budget clears it
    lenient = detection_breaches("head", report, lambda v, i, b: i is None or i.low > b)
    assert len(lenient) == 2
    report = DetectionReport(fp32, int8, matched, 0.05, 0.10, Interval(0.0, 0.01, 0.95, 100),
                             Interval(0.0, 0.01, 0.95, 100), tuple(classes))
    assert detection_breaches("head", report, lambda v, i, b: i is None or i.low > b) == []
    # fewer losing classes than places: a class with only int8 detections, or with extras only, is still not named
    few = tuple(c for c in classes if c.cls in (0, 3, 4, 8, 9))
    fp32, int8, matched = (sum(getattr(c, k) for c in few) for k in ("fp32", "int8", "matched"))
    (missed, *_) = detection_breaches("head", DetectionReport(fp32, int8, matched, 0.05, 0.10, classes=few), point)
    assert missed.endswith("over budget_missed 0.05; classes that lost detections: class 4: 8 → 0 matched, "
                           "class 8: 50 → 47 matched")


# --- 3. streaming ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_heads() -> tuple[np.ndarray, np.ndarray]:
    a = separated_heads(3, 480, anchors=200)
    b = noisy(a, 4, 1.0, 0.02)
    b[:, 4 + 2] *= 0.29  # class 2 fades: an object is lost when all its anchors score under 0.25 (~1 in 4)
    rng = np.random.default_rng(5)
    for s in range(0, a.shape[0], 3):  # and int8 sees a class 5 box on a third of the samples
        b[s, 4 + 5, rng.integers(a.shape[2])] = 0.8
    return a, b


def test_chunking_blocks_and_merging_keep_the_counts(fixture_heads: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = fixture_heads
    rules = DetectionRules()
    samples = a.shape[0]
    whole = _fold(a, b, rules, chunk=samples)
    assert 0.01 < float(whole.missed()) < 0.3 and whole.totals()[2, 0] > 50
    for chunk in (1, 7, 64):
        np.testing.assert_array_equal(_fold(a, b, rules, chunk=chunk).counts, whole.counts, err_msg=f"{chunk}")
    units = Units(samples, 64, 3)
    assert units.blocked
    blocked = _fold(a, b, rules, units, chunk=37)
    assert blocked.counts.shape == (64, 8 * 3)
    np.testing.assert_array_equal(blocked.totals(), whole.totals())
    for u, full in ((Units(samples, samples), whole), (units, blocked)):
        first = _fold(a, b, rules, u, stop=200)
        second = _fold(a, b, rules, u, start=200)
        np.testing.assert_array_equal(first.merge(second).counts, full.counts)
    with pytest.raises(ValueError, match="different units"):
        whole.merge(blocked)

    # the blocks' interval agrees with the per-sample one within Monte-Carlo error
    per_sample = detection_report(whole, samples, 2000, 0, 0.95)
    per_block = detection_report(blocked, units.count, 2000, 0, 0.95)
    for got, want in ((per_block.missed_interval, per_sample.missed_interval),
                      (per_block.extra_interval, per_sample.extra_interval)):
        assert got is not None and want is not None
        width = want.high - want.low
        assert width > 0
        assert abs(got.low - want.low) < 0.3 * width and abs(got.high - want.high) < 0.3 * width, (got, want)
    assert (per_block.fp32, per_block.int8, per_block.matched) == (per_sample.fp32, per_sample.int8,
                                                                    per_sample.matched)


def test_each_sample_scores_its_disagreement(fixture_heads: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = fixture_heads
    rules = DetectionRules()
    box, score = rules.channels(12, "test")
    acc = DetectionAccumulator(20, rules, box, score)
    got = acc.add(0, a[:20], b[:20])
    rows = acc.counts.reshape(20, 8, 3).sum(axis=1)
    want = (rows[:, 0] + rows[:, 1] - 2 * rows[:, 2]) / np.maximum(rows[:, 0] + rows[:, 1], 1)
    np.testing.assert_allclose(got, want)
    assert got.max() > 0 and got.min() >= 0
    empty = DetectionAccumulator(1, rules, box, score).add(0, np.zeros((1, 12, 5)), np.zeros((1, 12, 5)))
    assert empty.tolist() == [0.0]


@pytest.mark.parametrize("sparse", [False, True])
def test_report_intervals_are_the_bootstrap_of_each_share(fixture_heads: tuple[np.ndarray, np.ndarray], sparse: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detections, "SPARSE_SHARE", 1.0 if sparse else 0.0)
    a, b = fixture_heads
    a, b = a[:160], b[:160].copy()
    present = _fold(a, b, DetectionRules()).totals()[:, 0]
    b[:, 4 + np.argsort(-present)[:2]] *= 0.29  # the two largest classes fade: judged, with intervals of their own
    least = int(np.sort(present[present > 0])[3])  # the smaller classes go unjudged; one sits on the threshold
    acc = _fold(a, b, DetectionRules(min_class_detections=least))
    report = detection_report(acc, 160, 400, 11, 0.9)

    class Share:
        def __init__(self, cls: int | None, extra: bool = False) -> None:
            self.cls, self.is_extra = cls, extra

        def replicates(self, weights: np.ndarray) -> np.ndarray:
            return acc.extra(weights) if self.is_extra else acc.missed(weights, self.cls)

    assert report.missed_interval == bootstrap_drop([Share(None)], 160, 400, 11, 0.9)
    assert report.extra_interval == bootstrap_drop([Share(None, extra=True)], 160, 400, 11, 0.9)
    judged = [c for c in report.classes if c.judged]
    assert 0 < len(judged) < len(report.classes)
    assert len({c.missed_interval for c in judged}) > 2  # classes' intervals differ: none is taken for another
    for c in report.classes:
        assert c.judged == (c.fp32 >= least)
        want = bootstrap_drop([Share(c.cls)], 160, 400, 11, 0.9) if c.judged else None
        assert c.missed_interval == want, c
    totals = acc.totals()
    assert report.missed == pytest.approx(float(acc.missed()))
    assert report.missed == pytest.approx(1 - totals[:, 2].sum() / totals[:, 0].sum())
    assert float(acc.missed(np.ones((1, 160)))[0]) == pytest.approx(float(acc.missed()))
    assert float(acc.extra()) == pytest.approx(report.extra)
    assert detection_report(acc, 160, 0, 11, 0.9).missed_interval is None


def test_the_state_does_not_grow_with_anchors() -> None:
    rules = DetectionRules()
    box, score = rules.channels(12, "test")
    sizes = []
    for anchors in (50, 2000):
        a = separated_heads(5, 16, anchors=anchors)
        acc = DetectionAccumulator(16, rules, box, score)
        acc.add(0, a, a)
        sizes.append(acc.nbytes())
    assert sizes[0] == sizes[1] == 16 * 8 * 3 * 8


# --- 4. registry rules ----------------------------------------------------------------------------------------


def test_channels_refuse_a_box_of_other_than_four_values_and_overlaps() -> None:
    where = "entry 'yolo' output 'output0'"
    with pytest.raises(RegistryError, match=r"entry 'yolo' output 'output0' detections boxes: '0:3' selects 3"):
        DetectionRules(boxes="0:3").channels(84, where)
    with pytest.raises(RegistryError, match=r"output 'output0' detections boxes '0:4' and scores '3:' overlap"):
        DetectionRules(scores="3:").channels(84, where)
    with pytest.raises(RegistryError, match="detections scores"):
        DetectionRules(scores="90:").channels(84, where)
    box, score = DetectionRules(boxes="-4:", scores=":-4").channels(10, where)
    assert box.tolist() == [6, 7, 8, 9] and score.tolist() == list(range(6))


def test_rules_come_from_the_registry_with_the_schema_defaults() -> None:
    assert DetectionRules.from_rules({"layout": "yolo"}) == DetectionRules()
    rules = DetectionRules.from_rules({"layout": "yolo", "nms": "agnostic", "score_threshold": 1, "max_detections": 50})
    assert rules.nms == "agnostic" and rules.score_threshold == 1.0 and rules.max_detections == 50
    cases: list[tuple[dict[str, Any], str]] = [
        ({"nms": "all"}, "nms"), ({"box_format": "xywh"}, "box_format"), ({"colour": 1}, "colour"),
        ({"match_iou": 0}, "match_iou"), ({"max_detections": 2.5}, "max_detections"),
        ({"min_class_detections": True}, "min_class_detections")]
    for raw, field in cases:
        with pytest.raises(RegistryError, match=field):
            DetectionRules.from_rules({"layout": "yolo", **raw})


# --- 5. speed -------------------------------------------------------------------------------------------------


def test_decoding_a_batch_of_yolov8_heads_is_quick() -> None:
    rng = np.random.default_rng(0)
    n, classes, anchors = 64, 80, 8400
    head = rng.random((n, 4 + classes, anchors), dtype=np.float32) * 0.2
    head[:, 0:2] *= 3200
    head[:, 2:4] = head[:, 2:4] * 300 + 10
    for s in range(n):
        for _ in range(30):
            members = rng.choice(anchors, 20, replace=False)
            centre = np.concatenate([rng.uniform(0, 600, 2), rng.uniform(20, 120, 2)])
            write_boxes(head[s], members, centre + rng.normal(0, 3, (20, 4)), "cxcywh")
            head[s, 4 + rng.integers(classes), members] = rng.uniform(0.3, 1.0, 20)
    rules = DetectionRules()
    box, score = rules.channels(4 + classes, "test")
    started = time.perf_counter()
    found = decode(head, rules, box, score)
    elapsed = time.perf_counter() - started
    print(f"decoded {n} heads of [{4 + classes}, {anchors}] in {elapsed:.3f} s "
          f"({sum(len(f) for f in found)} detections)")
    assert all(0 < len(f) <= 300 for f in found)
