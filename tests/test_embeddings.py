"""Embedding outputs: cosine distance against scipy, masks, neighbour recall against brute force, kept set, memory."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist, cosine

from pytest_quantgate.engine.embeddings import EmbeddingAccumulator, embedding_breaches, embedding_report
from pytest_quantgate.engine.streaming import Units
from pytest_quantgate.records import Interval


def point_rule(value: float, interval: Interval | None, budget: float) -> bool:
    """The point decision rule: over when the estimate is."""
    return value > budget


def _fold(a: np.ndarray, b: np.ndarray, axis: int, chunk: int, *, keep: int = 4096, units: Units | None = None,
          mask: np.ndarray | None = None, seed: int = 0, order: range | None = None) -> EmbeddingAccumulator:
    acc = EmbeddingAccumulator(a.shape[0], axis, seed, units, keep)
    starts = range(0, a.shape[0], chunk) if order is None else order
    for start in starts:
        end = min(a.shape[0], start + chunk)
        acc.add(start, a[start:end], b[start:end], None if mask is None else mask[start:end])
    return acc


def _tokens(samples: int = 30, tokens: int = 7, dim: int = 16, noise: float = 0.05,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(samples, tokens, dim)).astype(np.float32)
    b = (a + rng.normal(scale=noise, size=a.shape)).astype(np.float32)
    return a, b


def _recall_reference(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Brute force: each row's k nearest other rows by cosine distance in x and in y, and their overlap."""
    dx = cdist(x.astype(np.float64), x.astype(np.float64), "cosine")
    dy = cdist(y.astype(np.float64), y.astype(np.float64), "cosine")
    np.fill_diagonal(dx, np.inf)
    np.fill_diagonal(dy, np.inf)
    near_x = np.argsort(dx, axis=1)[:, :k]
    near_y = np.argsort(dy, axis=1)[:, :k]
    return float(np.mean([len(set(p) & set(q)) / k for p, q in zip(near_x.tolist(), near_y.tolist())]))


# --- the mean cosine distance --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tokens last", "dim first"])
def test_the_mean_cosine_distance_is_scipys_over_every_vector(layout: str) -> None:
    a, b = _tokens()
    b[::2, 3] *= -1  # some vectors reversed in int8: cos near -1, distance near 2
    want = np.array([[cosine(a[i, t].astype(np.float64), b[i, t].astype(np.float64)) for t in range(7)]
                     for i in range(30)])
    if layout == "tokens last":  # [N, T, D], axis 2
        acc = EmbeddingAccumulator(30, 2, 0)
        per_sample = np.concatenate([acc.add(s, a[s:s + 4], b[s:s + 4]) for s in range(0, 30, 4)])
    else:  # [N, D, T], axis 1: the same vectors
        at, bt = a.transpose(0, 2, 1).copy(), b.transpose(0, 2, 1).copy()
        acc = EmbeddingAccumulator(30, 1, 0)
        per_sample = np.concatenate([acc.add(s, at[s:s + 4], bt[s:s + 4]) for s in range(0, 30, 4)])
    assert want.mean() > 1e-4  # a distance large enough for rel 1e-9 to mean something
    np.testing.assert_allclose(float(acc.cosine_distance()), want.mean(), rtol=1e-9)
    np.testing.assert_allclose(per_sample, want.mean(axis=1), rtol=1e-9)
    assert acc.sums[:, 1].sum() == 30 * 7 and acc.nonfinite == 0


def test_masked_vectors_are_skipped() -> None:
    a, b = _tokens()
    b[:, 6] = -a[:, 6]  # the last token is reversed in int8: counted, it would dominate the mean
    rng = np.random.default_rng(5)
    mask = (rng.random((30, 7)) < 0.7).astype(np.int64)
    mask[:, 6] = 0
    mask[0] = 0  # a sample with nothing counted scores 0
    keep = mask != 0
    want = np.mean([cosine(a[i, t].astype(np.float64), b[i, t].astype(np.float64))
                    for i in range(30) for t in range(7) if keep[i, t]])
    acc = EmbeddingAccumulator(30, 2, 0)
    per_sample = acc.add(0, a, b, mask)
    np.testing.assert_allclose(float(acc.cosine_distance()), want, rtol=1e-9)
    assert acc.sums[:, 1].sum() == keep.sum() and per_sample[0] == 0.0
    assert acc.neighbours()[1] == keep.sum()  # masked vectors are not kept either
    # a mask of the leading axes that broadcasts: (N, 1) drops whole samples
    whole = EmbeddingAccumulator(30, 2, 0)
    samples = np.zeros((30, 1))
    samples[::3] = 1
    whole.add(0, a[:, :6], b[:, :6], samples)
    want = np.mean([cosine(a[i, t].astype(np.float64), b[i, t].astype(np.float64))
                    for i in range(0, 30, 3) for t in range(6)])
    np.testing.assert_allclose(float(whole.cosine_distance()), want, rtol=1e-9)


def test_nonfinite_and_zero_vectors() -> None:
    a, b = _tokens(samples=4, tokens=3)
    b[0, 0, 2] = np.nan  # distance 1, flagged, not kept
    b[1, 1] = 0.0  # zero in int8 only: cos 0, distance 1
    a[2, 2] = b[2, 2] = 0.0  # zero in both: skipped
    acc = EmbeddingAccumulator(4, 2, 0)
    acc.add(0, a, b)
    fine = [cosine(a[i, t].astype(np.float64), b[i, t].astype(np.float64))
            for i in range(4) for t in range(3) if (i, t) not in {(0, 0), (1, 1), (2, 2)}]
    np.testing.assert_allclose(float(acc.cosine_distance()), (sum(fine) + 2.0) / 11, rtol=1e-9)
    assert (acc.nonfinite, acc.zero) == (1, 1)
    assert acc.neighbours(k=2)[1] == 10  # the NaN vector has no distance to rank by; the zero pair is skipped


# --- nearest neighbours ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", [((240, 16), 1), ((40, 6, 16), 2)])
def test_recall_equals_a_brute_force_reference_when_every_vector_is_kept(shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=shape).astype(np.float32)
    b = (a + rng.normal(scale=0.3, size=shape)).astype(np.float32)
    acc = _fold(a, b, axis, 9)
    recall, count = acc.neighbours()
    want = _recall_reference(a.reshape(-1, 16), b.reshape(-1, 16))
    assert count == 240 and 0.2 < want < 0.9  # a partial overlap, not a trivial 0 or 1
    assert recall == pytest.approx(want, abs=1e-12)
    assert acc.neighbours(k=3)[0] == pytest.approx(_recall_reference(a.reshape(-1, 16), b.reshape(-1, 16), 3),
                                                   abs=1e-12)
    flat_a, flat_b = a.reshape(-1, 16)[:10], b.reshape(-1, 16)[:10]
    assert _fold(flat_a, flat_b, 1, 9).neighbours() == (None, 10)  # 10 vectors: nobody has 10 neighbours


def test_the_kept_set_past_keep_is_the_same_whatever_the_chunking_order_or_split() -> None:
    a, b = _tokens(samples=400, tokens=5, dim=8)
    reference = _fold(a, b, 2, 400, keep=300).kept()
    assert reference.ident.shape == (300, 2)
    # the kept values are the vectors they name, from both models
    np.testing.assert_array_equal(reference.fp32, a[reference.ident[:, 0], reference.ident[:, 1]])
    np.testing.assert_array_equal(reference.int8, b[reference.ident[:, 0], reference.ident[:, 1]])
    cases = {f"chunks of {c}": _fold(a, b, 2, c, keep=300) for c in (1, 7, 64)}
    cases["reversed"] = _fold(a, b, 2, 16, keep=300, order=range(384, -1, -16))
    cases["merged"] = _fold(a, b, 2, 16, keep=300, order=range(0, 160, 16)).merge(
        _fold(a, b, 2, 16, keep=300, order=range(160, 400, 16)))
    whole = _fold(a, b, 2, 400, keep=300)
    for name, acc in cases.items():
        np.testing.assert_allclose(acc.sums, whole.sums, rtol=1e-15, err_msg=name)
        kept = acc.kept()
        np.testing.assert_array_equal(kept.ident, reference.ident, err_msg=name)
        np.testing.assert_array_equal(kept.fp32, reference.fp32, err_msg=name)
        assert acc.neighbours() == whole.neighbours(), name
    other_seed = _fold(a, b, 2, 400, keep=300, seed=1).kept()
    assert not np.array_equal(other_seed.ident, reference.ident)
    # spread over the fixture, not the first samples that arrived
    assert reference.ident[:, 0].max() > 350 and reference.ident[:, 0].min() < 50


def _clusters(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """40 tight clusters of 25 unit-scale vectors (D 64); int8 = fp32 + Gaussian noise of ``noise`` per element."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, 64))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    a = (np.repeat(centres, 25, axis=0) + rng.normal(scale=0.01, size=(1000, 64))).astype(np.float32)
    b = (a + rng.normal(scale=noise, size=a.shape)).astype(np.float32)
    return a, b


def _judge(a: np.ndarray, b: np.ndarray) -> tuple[list[str], float, float | None]:
    acc = _fold(a, b, 1, 64)
    report = embedding_report(acc, 0.01, 0.9, a.shape[0], 200, 0, 0.95)
    assert report.interval is not None
    assert report.interval.low <= report.cosine_distance <= report.interval.high
    return embedding_breaches("emb", report, point_rule), report.cosine_distance, report.neighbours_recall


def test_healthy_noise_passes_and_reordered_neighbours_fail() -> None:
    a, b = _clusters(noise=0.0005)
    assert _judge(a, b)[0] == []
    # noise as large as a cluster's spread: every vector keeps its direction (cos distance ~0.003) but the
    # order within its cluster is lost -- what a retrieval index sees
    a, b = _clusters(noise=0.01)
    found, distance, recall = _judge(a, b)
    assert distance < 0.01 and recall is not None and recall < 0.9
    assert found == [f"output 'emb': recall@10 of each vector's fp32 nearest neighbours among its int8 nearest "
                     f"neighbours is {recall:.3f} over 1,000 vectors, under budget_neighbours 0.9"]


def test_an_int8_that_permutes_or_rotates_embeddings_fails() -> None:
    a, b = _clusters(noise=0.0005)
    rng = np.random.default_rng(8)
    swapped = b[rng.permutation(1000)]  # vectors handed to the wrong samples
    found, _, recall = _judge(a, swapped)
    assert recall is not None and recall < 0.2
    assert any("budget_neighbours" in f for f in found) and any("budget_cosine" in f for f in found)
    # one rotation of the whole space: the neighbours are intact, but every vector points elsewhere
    q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    found, distance, recall = _judge(a, (b @ q).astype(np.float32))
    assert recall is not None and recall > 0.95 and distance > 0.5
    assert found == [f"output 'emb': mean 1 - cos(fp32, int8) along axis 1 is {distance:.4g}, over budget_cosine 0.01"]


def test_no_neighbour_budget_judges_only_the_cosine() -> None:
    a, b = _clusters(noise=0.01)
    report = embedding_report(_fold(a, b, 1, 500), 0.01, None, 1000, 0, 0, 0.95)
    assert report.neighbours_recall is not None and report.neighbours_recall < 0.9 and report.interval is None
    assert embedding_breaches("emb", report, point_rule) == []


# --- memory ------------------------------------------------------------------------------------------------------


def test_the_state_is_bounded_when_samples_grow_tenfold() -> None:
    rng = np.random.default_rng(0)
    dim, keep = 32, 512
    sizes = {}
    for samples in (2000, 20_000):
        units = Units(samples, min(samples, 256), seed=0)
        acc = EmbeddingAccumulator(samples, 2, 0, units, keep)
        for start in range(0, samples, 500):
            a = rng.normal(size=(500, 3, dim)).astype(np.float32)
            acc.add(start, a, a + np.float32(0.01))
        assert acc.neighbours()[1] == keep and acc.sums[:, 1].sum() == samples * 3
        sizes[samples] = acc.nbytes()
    assert sizes[2000] == sizes[20_000] <= keep * dim * 2 * 4 + keep * 24 + 256 * 16, sizes
    # per-sample units: only the count rows grow (16 bytes a sample), the kept vectors do not
    small = _fold(np.ones((100, 4), np.float32), np.ones((100, 4), np.float32), 1, 50, keep=1000)
    assert small.nbytes() < 100 * 16 + 2 * 100 * (4 * 2 * 4 + 24)  # at most twice the rows kept, not keep rows
