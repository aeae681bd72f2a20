"""Threshold decisions of dense score outputs: counts against numpy, chunks, blocks, merges, verdicts, memory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_quantgate.engine.streaming import Units
from pytest_quantgate.engine.thresholds import ThresholdAccumulator, threshold_breaches, threshold_report
from pytest_quantgate.records import Interval

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 0.3


def point_rule(value: float, interval: Interval | None, budget: float) -> bool:
    """The point decision rule: over when the estimate is."""
    return value > budget


def _scores(samples: int = 40, channels: int = 5, m: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.random((samples, channels, m)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1).astype(np.float32)
    return a, b


def _reference(a: np.ndarray, b: np.ndarray, channels: list[int], mask: np.ndarray | None) -> np.ndarray:
    """Per sample and channel [either, disagree, fp32 over, int8 over], element by element in plain numpy."""
    out = np.zeros((a.shape[0], len(channels), 4))
    full = np.ones(a.shape, dtype=bool) if mask is None else np.broadcast_to(mask, a.shape).astype(bool)
    for i in range(a.shape[0]):
        for j, c in enumerate(channels):
            keep = full[i, c]
            x = a[i, c][keep] >= THRESHOLD
            y = b[i, c][keep] >= THRESHOLD
            out[i, j] = [np.sum(x | y), np.sum(x != y), np.sum(x), np.sum(y)]
    return out


def _fold(a: np.ndarray, b: np.ndarray, channels: list[int], chunk: int, units: Units | None = None,
          mask: np.ndarray | None = None, lo: int = 0, hi: int | None = None) -> ThresholdAccumulator:
    hi = a.shape[0] if hi is None else hi
    acc = ThresholdAccumulator(a.shape[0], np.array(channels), THRESHOLD, units)
    for start in range(lo, hi, chunk):
        end = min(hi, start + chunk)
        acc.add(start, a[start:end], b[start:end], None if mask is None else mask[start:end])
    return acc


@pytest.mark.parametrize("mask_shape", [None, (40, 1, 300), (40, 5, 300)])
def test_counts_equal_a_plain_numpy_reference(mask_shape: tuple[int, ...] | None) -> None:
    a, b = _scores()
    mask = None if mask_shape is None else (np.random.default_rng(9).random(mask_shape) < 0.6).astype(np.float32)
    channels = [0, 2, 4]
    want = _reference(a, b, channels, mask)
    acc = ThresholdAccumulator(a.shape[0], np.array(channels), THRESHOLD)
    shares = acc.add(0, a, b, mask)
    np.testing.assert_array_equal(acc.rows, want)
    np.testing.assert_array_equal(acc.counts(), want.sum(axis=0))
    summed = want.sum(axis=1)
    np.testing.assert_allclose(shares, summed[:, 1] / summed[:, 0], rtol=1e-15)
    totals = want.sum(axis=0)
    np.testing.assert_allclose(acc.flip_share(), totals[:, 1] / totals[:, 0], rtol=1e-15)
    assert (totals[:, 1] > 0).all() and (totals[:, 0] < a.shape[0] * a.shape[2]).all()  # a real, partial case


def test_chunked_folding_equals_one_chunk() -> None:
    a, b = _scores()
    whole = _fold(a, b, [1, 3], a.shape[0])
    for chunk in (1, 3, 16):
        np.testing.assert_array_equal(_fold(a, b, [1, 3], chunk).rows, whole.rows)


def test_hashed_blocks_give_identical_totals_and_merge_of_halves_is_the_whole() -> None:
    a, b = _scores(samples=300, m=50)
    mask = (np.random.default_rng(2).random((300, 1, 50)) < 0.7)
    channels = [0, 1, 4]
    whole = _fold(a, b, channels, 300, mask=mask)
    units = Units(300, 17, seed=3)
    for chunk in (1, 7, 300):
        blocked = _fold(a, b, channels, chunk, units, mask)
        assert blocked.rows.shape == (17, 3, 4)
        np.testing.assert_array_equal(blocked.counts(), whole.counts())
    for u in (None, units):
        first = _fold(a, b, channels, 11, u, mask, 0, 130)
        second = _fold(a, b, channels, 11, u, mask, 130, 300)
        merged = first.merge(second)
        np.testing.assert_array_equal(merged.rows, _fold(a, b, channels, 300, u, mask).rows)
    with pytest.raises(ValueError, match="different units"):
        whole.merge(_fold(a, b, channels, 300, units))


def test_a_channel_that_never_crosses_never_fails() -> None:
    a, b = _scores()
    a[:, 2] *= THRESHOLD * 0.9  # below the threshold in both models
    b[:, 2] = a[:, 2] * 0.5
    acc = _fold(a, b, [0, 2], 8)
    report = threshold_report(acc, 0.05, a.shape[0], 200, 0, 0.95)
    quiet = report.channels[1]
    assert (quiet.channel, quiet.either, quiet.disagree, quiet.interval) == (2, 0, 0, None)
    assert quiet.flip_share == 0.0
    always = threshold_breaches("maps", report, lambda value, interval, budget: True)
    assert len(always) == 1 and "channel 0:" in always[0]  # only the channel that crosses can fail


def test_nothing_crossing_anywhere_has_no_worst_channel() -> None:
    a, b = _scores()
    acc = _fold(a * 0.1, b * 0.1, [0, 1], 8)
    report = threshold_report(acc, 0.05, a.shape[0], 100, 0, 0.95)
    assert report.worst_channel is None and all(c.interval is None for c in report.channels)
    assert threshold_breaches("maps", report, lambda value, interval, budget: True) == []


def test_a_healthy_int8_passes_and_a_shifted_one_fails_naming_the_channel() -> None:
    a, b = _scores(samples=60)
    healthy = threshold_report(_fold(a, b, [0, 1, 2], 16), 0.05, 60, 300, 0, 0.95)
    assert threshold_breaches("maps", healthy, point_rule) == []
    assert max(c.flip_share for c in healthy.channels) < 0.05
    shifted = b.copy()
    shifted[:, 1] *= 0.8  # only channel 1's scores shrink: its masks lose their edges
    report = threshold_report(_fold(a, shifted, [0, 1, 2], 16), 0.05, 60, 300, 0, 0.95)
    assert report.worst_channel == 1
    found = threshold_breaches("maps", report, point_rule)
    assert len(found) == 1
    c = report.channels[1]
    # scores uniform on [0, 1]: elements in [0.3, 0.375) drop under it, 0.075 / 0.7 of those over it
    assert 0.09 < c.flip_share < 0.13
    assert found[0] == (f"output 'maps' channel 1: x >= 0.3 disagrees on {c.flip_share:.1%} of the {c.either:,} "
                        f"elements over it in either model (fp32 {c.fp32_over:,} over, int8 {c.int8_over:,}), "
                        f"over budget_threshold_flip 0.05")


def test_at_most_five_failing_channels_are_named_worst_first() -> None:
    a, _ = _scores(channels=8)
    b = a * np.linspace(0.85, 0.5, 8, dtype=np.float32)[None, :, None]  # channel 7 the worst, 0 the least bad
    report = threshold_report(_fold(a, b, list(range(8)), 40), 0.05, 40, 0, 0, 0.95)
    found = threshold_breaches("maps", report, point_rule)
    assert [f.split(":")[0] for f in found[:5]] == [f"output 'maps' channel {c}" for c in (7, 6, 5, 4, 3)]
    assert found[5] == "output 'maps': and 3 more channels over budget_threshold_flip 0.05"
    assert len(found) == 6


def test_the_interval_contains_the_estimate_and_narrows_with_samples() -> None:
    widths = []
    for samples in (100, 1600):
        a, b = _scores(samples=samples, channels=1, m=64, seed=samples)
        b = (b * 0.95).astype(np.float32)
        report = threshold_report(_fold(a, b, [0], 256), 0.05, samples, 1000, 4, 0.95)
        c = report.channels[0]
        assert c.interval is not None and c.interval.low <= c.flip_share <= c.interval.high
        widths.append(c.interval.high - c.interval.low)
    # 16 times the samples: a quarter of the width, within Monte-Carlo error
    assert widths[1] < widths[0] / 2.5, widths


def test_a_large_score_output_is_counted_under_an_address_space_cap() -> None:
    """2000 samples of [4, 256, 256] float32 (2 GiB per model, more than the cap) folded in chunks of 16."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit is not installed")
    cap = 3 << 29  # 1.5 GiB of address space
    code = """
import sys
import numpy as np
from pytest_quantgate.engine.thresholds import ThresholdAccumulator
samples, chunk, shape = 2000, 16, (4, 256 * 256)
rng = np.random.default_rng(0)
acc = ThresholdAccumulator(samples, np.arange(4), 0.5)
for start in range(0, samples, chunk):
    a = rng.random((chunk, *shape), dtype=np.float32)
    b = a + rng.standard_normal((chunk, *shape), dtype=np.float32) * np.float32(0.01)
    acc.add(start, a, b)
hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1]
print('COUNTS', *acc.counts().sum(axis=0).astype(np.int64), 'MAXRSS', hwm, 'NBYTES', acc.nbytes())
"""
    proc = subprocess.run(["prlimit", f"--as={cap}", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    fields = proc.stdout.split()
    either, disagree, fp32_over, int8_over = (int(v) for v in fields[1:5])
    total = 2000 * 4 * 256 * 256
    assert abs(fp32_over / total - 0.5) < 1e-3 and abs(int8_over / total - 0.5) < 1e-3
    assert 0 < disagree < 0.02 * either and either <= total
    print(f"peak RSS {int(fields[6]) / 1024:.0f} MiB, state {int(fields[8])} bytes, flip share {disagree / either:.4f}")
    # the cap would stop a run that held the output: the same cap refuses one model's array
    refused = subprocess.run(["prlimit", f"--as={cap}", sys.executable, "-c",
                              "import numpy as np; np.ones((2000, 4, 256 * 256), dtype=np.float32)"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "MemoryError" in refused.stderr
