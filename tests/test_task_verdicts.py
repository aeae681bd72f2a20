"""Verdicts that follow the task: detector heads, score maps and embeddings judged by what they mean.

Each case has a healthy int8 that a tensor-level verdict gets wrong (a never-firing class row, padding) and a
broken one; the healthy one must pass and the broken one fail naming the class or channel that broke.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import modelkit
import numpy as np
import pytest

from pytest_quantgate.engine.comparison import CompareOptions, compare
from pytest_quantgate.io.soak import Fixture, TensorSpec

CLASSES, ANCHORS, N = 6, 400, 64
HEAD = {"detections": {"layout": "yolo", "boxes": "0:4", "scores": "4:", "score_threshold": 0.25,
                       "nms_iou": 0.45, "min_class_detections": 20}}


def _entry(**extra: Any) -> Any:
    return modelkit.registry_entry(id="task", onnx="t.onnx", quant_mode="static", quant_calibration_set="c.npz",
                                   **extra)


def _run(entry: Any, name: str, fp32: np.ndarray, int8: np.ndarray, **arrays: np.ndarray) -> Any:
    x = np.zeros((fp32.shape[0], 1), np.float32)
    fixture = Fixture(Path("soak.npz"), "0", {"x": x, **arrays}, None)
    spec = TensorSpec(name, "tensor(float)", ("N", *fp32.shape[1:]))
    return compare(entry, "cpu", fixture, (TensorSpec("x", "tensor(float)", ("N", 1)),), (spec,), {name: fp32},
                   {name: int8}, CompareOptions(bootstrap=300))


def _head(seed: int = 0) -> np.ndarray:
    """Return [N, 4 + CLASSES, ANCHORS]: pixel boxes, class 5 never fires (max ~0.006), the others fire on objects."""
    rng = np.random.default_rng(seed)
    head = np.zeros((N, 4 + CLASSES, ANCHORS), np.float32)
    cx, cy = rng.uniform(20, 620, (N, ANCHORS)), rng.uniform(20, 620, (N, ANCHORS))
    w, h = rng.uniform(10, 80, (N, ANCHORS)), rng.uniform(10, 80, (N, ANCHORS))
    head[:, 0], head[:, 1], head[:, 2], head[:, 3] = cx, cy, w, h
    head[:, 4:] = rng.uniform(0.0, 0.05, (N, CLASSES, ANCHORS))
    head[:, 4 + 5] = rng.uniform(0.0, 0.006, (N, ANCHORS))
    for i in range(N):
        for _ in range(4):  # objects: a few neighbouring anchors of one class fire, with nearly the same box
            cls, anchor = int(rng.integers(0, 5)), int(rng.integers(0, ANCHORS - 3))
            score = rng.uniform(0.5, 0.95)
            for k in range(3):
                head[i, 4 + cls, anchor + k] = score - 0.1 * k
                head[i, :4, anchor + k] = head[i, :4, anchor] + rng.normal(0, 1.0, 4)
    return head


def _healthy(head: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = head.copy()
    out[:, :4] += rng.normal(0, 0.5, out[:, :4].shape)
    out[:, 4:] = np.clip(out[:, 4:] + rng.normal(0, 0.004, out[:, 4:].shape), 0, 1)  # 8-bit steps of [0, 1]
    return out.astype(np.float32)


def test_a_healthy_detector_fails_on_a_noise_row_without_declarations_and_says_how_to_declare_it() -> None:
    head = _head()
    result = _run(_entry(), "output0", head, _healthy(head))
    assert result.verdict == "FAIL"
    assert "worst channel 9 of 10 along axis 1" in result.reason
    assert "Channel 9's fp32 values are tiny next to the output's other channels" in result.reason
    assert '"detections": {"layout": "yolo", "boxes": "0:4", "scores": "4:"}' in result.reason
    assert result.focus is not None and result.focus.channels == (9,)


def test_a_healthy_detector_passes_when_declared_a_detector_head() -> None:
    head = _head()
    result = _run(_entry(quant_outputs={"output0": HEAD}), "output0", head, _healthy(head))
    assert result.verdict == "PASS", result.reason
    (out,) = result.outputs
    assert out.detections is not None and out.detections.fp32 > 100
    assert out.detections.missed <= 0.05 and out.detections.extra <= 0.10
    assert "int8 matches" in result.reason and result.drop is None  # no PLCC decides this output
    det = out.detections
    assert result.budget_use == pytest.approx(max(det.missed / 0.05, det.extra / 0.10, *(
        c.missed / 0.05 for c in det.classes if c.judged)))
    assert result.budget_use < 1
    assert result.headroom == (pytest.approx(1 / result.budget_use) if result.budget_use else float("inf"))


def test_a_class_that_vanishes_is_named_never_a_noise_row() -> None:
    head = _head()
    broken = _healthy(head)
    broken[:, 4 + 2] *= 0.2  # class 2's scores shrink under the score threshold
    result = _run(_entry(quant_outputs={"output0": HEAD}), "output0", head, broken)
    assert result.verdict == "FAIL" and result.kind == "detections"
    lost = [c for c in result.outputs[0].detections.classes if c.fp32 > c.matched]
    assert [c.cls for c in lost] == [2]
    assert "classes that lost detections: class 2:" in result.reason
    assert "class 5" not in result.reason and "class 5" not in " ".join(result.also)
    assert result.focus is not None and result.focus.channels == (4 + 2,)
    assert result.budget_use is not None and result.budget_use > 1


def _score_map(seed: int = 0) -> np.ndarray:
    """Return [N, 2, 24, 24] probability maps: channel 0 text blobs, channel 1 never above 0.05."""
    rng = np.random.default_rng(seed)
    maps = rng.uniform(0, 0.1, (N, 2, 24, 24)).astype(np.float32)
    maps[:, 1] *= 0.5
    for i in range(N):
        r, c = rng.integers(0, 16, 2)
        maps[i, 0, r:r + 6, c:c + 8] = rng.uniform(0.7, 0.95)
    return maps


def test_a_score_map_is_judged_by_its_decisions_per_channel() -> None:
    maps = _score_map()
    rng = np.random.default_rng(3)
    healthy = np.clip(maps + rng.normal(0, 0.01, maps.shape), 0, 1).astype(np.float32)
    rules = {"maps": {"threshold": 0.3, "budget_threshold_flip": 0.05}}
    passed = _run(_entry(), "maps", maps, healthy)
    assert passed.verdict == "FAIL"  # channel 1 is noise: its PLCC drop is large
    judged = _run(_entry(quant_outputs=rules), "maps", maps, healthy)
    assert judged.verdict == "PASS", judged.reason
    report = judged.outputs[0].thresholds
    assert report is not None and [row.either for row in report.channels][1] == 0
    # the decisions against an independent count
    over_a, over_b = maps[:, 0] >= 0.3, healthy[:, 0] >= 0.3
    assert report.channels[0].disagree == int((over_a ^ over_b).sum())
    assert report.channels[0].either == int((over_a | over_b).sum())
    shrunk = (maps * np.array([0.35, 1.0], np.float32)[None, :, None, None]).astype(np.float32)
    failed = _run(_entry(quant_outputs=rules), "maps", maps, shrunk)
    assert failed.verdict == "FAIL" and failed.kind == "threshold"
    over_b = shrunk[:, 0] >= 0.3
    share = (over_a ^ over_b).sum() / (over_a | over_b).sum()
    assert f"output 'maps' channel 0: x >= 0.3 disagrees on {share:.1%} of the {(over_a | over_b).sum():,} " \
           "elements" in failed.reason
    assert failed.focus is not None and failed.focus.channels == (0,)


def test_threshold_channels_leave_the_other_channels_to_plcc() -> None:
    maps = _score_map()
    rng = np.random.default_rng(4)
    int8 = np.clip(maps + rng.normal(0, 0.01, maps.shape), 0, 1).astype(np.float32)
    int8[:, 1] = rng.uniform(0, 0.05, int8[:, 1].shape)  # channel 1 unrelated to fp32: its PLCC decides
    result = _run(_entry(quant_outputs={"maps": {"threshold": 0.3, "threshold_channels": [0]}}), "maps", maps, int8)
    assert result.verdict == "FAIL" and result.kind == "drop"
    assert "worst channel 1 of 2" in result.reason


def test_an_embedding_is_judged_by_cosine_and_neighbours() -> None:
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(20, 64))
    emb = (centres[rng.integers(0, 20, 400)] + rng.normal(0, 0.3, (400, 64))).astype(np.float32)
    healthy = (emb + rng.normal(0, 0.01, emb.shape)).astype(np.float32)
    rules = {"emb": {"embedding_axis": 1}}
    good = _run(_entry(quant_outputs=rules), "emb", emb, healthy)
    assert good.verdict == "PASS", good.reason
    report = good.outputs[0].embedding
    assert report is not None
    reference = 1.0 - np.sum(emb.astype(np.float64) * healthy, axis=1) / (
        np.linalg.norm(emb.astype(np.float64), axis=1) * np.linalg.norm(healthy.astype(np.float64), axis=1))
    assert report.cosine_distance == pytest.approx(float(reference.mean()), rel=1e-9)
    shuffled = healthy[rng.permutation(400)]
    bad = _run(_entry(quant_outputs=rules), "emb", emb, shuffled)
    assert bad.verdict == "FAIL" and bad.kind == "embedding"
    assert "budget_cosine" in bad.reason
