"""soak: finding and opening fixtures, checking them against the model's inputs, chunks and picks of samples."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_quantgate.io import npz, soak
from pytest_quantgate.errors import FixtureError
from pytest_quantgate.io.npz import ArchiveArrays, ShardedArray, digest
from pytest_quantgate.io.soak import FeedPlan, Fixture, TensorSpec, find_fixture, load_fixture, plan_feeds


def _fixture(target: np.ndarray | None = None, **inputs: np.ndarray) -> Fixture:
    return Fixture(Path("/data/f.npz"), "0" * 64, inputs, target)


def _f32(*shape: int) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def _spec(name: str, *shape: int | str | None, type: str = "tensor(float)", known_rank: bool = True) -> TensorSpec:
    return TensorSpec(name, type, tuple(shape), known_rank)


# --- TensorSpec -------------------------------------------------------------------------------------------------


def test_tensor_spec_dtype_and_description() -> None:
    assert _spec("x", "N", 1, 32, None).describe() == "float32[N,1,32,?]"
    assert _spec("x").describe() == "float32 scalar"
    assert _spec("x", known_rank=False).describe() == "float32 (no shape declared in the model)"
    assert _spec("ids", "N", type="tensor(int64)").dtype == np.dtype(np.int64)
    unknown = _spec("s", "N", type="tensor(string)")
    assert unknown.dtype is None and unknown.describe() == "tensor(string)[N]"


# --- find_fixture and load_fixture --------------------------------------------------------------------------------


def test_find_fixture_takes_the_first_candidate_that_exists(tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", x=_f32(2, 1))
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "part-0.npz", x=_f32(2, 1))
    assert find_fixture([tmp_path / "a.npz", tmp_path / "b.npz", shards]) == tmp_path / "b.npz"
    assert find_fixture([tmp_path / "a.npz", shards, tmp_path / "b.npz"]) == shards


def test_find_fixture_names_every_place_it_looked(tmp_path: Path) -> None:
    candidates = [tmp_path / "a.npz", tmp_path / "fixtures" / "a.npz"]
    with pytest.raises(FixtureError) as raised:
        find_fixture(candidates)
    assert str(raised.value) == (f"soak fixture not found; looked in: {candidates[0]}, {candidates[1]} (no random "
                                 f"data is substituted)")


@pytest.mark.parametrize("kind", ["directory", "FIFO"])
def test_find_fixture_refuses_what_is_not_a_file_or_a_shard_folder(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.npz"
    if kind == "directory":
        path.mkdir()
        (path / "notes.txt").write_text("no shard here")
    else:
        os.mkfifo(path)
    with pytest.raises(FixtureError, match=f"x.npz: the soak fixture path exists but is not a regular file \\(a {kind}"
                                           f"\\); expected an .npz archive or a folder of .npz shards"):
        find_fixture([path, tmp_path / "later.npz"])  # an existing bad candidate stops the search


def test_load_fixture_takes_the_target_apart_and_leaves_data_on_disk(tmp_path: Path) -> None:
    x, t = _f32(6, 2), np.arange(6.0)
    np.savez(tmp_path / "f.npz", x=x, target=t)
    fixture = load_fixture(tmp_path / "f.npz")
    assert isinstance(fixture.inputs, ArchiveArrays) and list(fixture.inputs) == ["x"]
    assert isinstance(fixture.info("x"), ShardedArray) and fixture.inputs._loaded == {}
    assert fixture.samples == 6 and fixture.sha256 == digest(tmp_path / "f.npz")
    assert isinstance(fixture.target, ShardedArray)
    target = fixture.target_array()
    assert target is not None
    np.testing.assert_array_equal(target, t)


def test_a_fixture_of_only_a_target_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", target=np.arange(3.0))
    with pytest.raises(FixtureError, match=r"f\.npz: the archive holds only 'target'; it needs one array per model"):
        load_fixture(tmp_path / "f.npz")


def test_load_fixture_applies_the_cap(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", x=_f32(10, 10))
    with pytest.raises(FixtureError, match="over the fixture cap of 399 bytes"):
        load_fixture(tmp_path / "f.npz", max_bytes=399)


# --- Fixture over numpy arrays: chunks, take ----------------------------------------------------------------------


def test_chunks_yield_inputs_and_target_in_step() -> None:
    x, y, t = _f32(10, 3), _f32(10, 2, 2), np.arange(10.0)
    fixture = _fixture(t, x=x, y=y)
    got = list(fixture.chunks(4))
    assert [len(block["x"]) for block, _ in got] == [4, 4, 2]
    for i, (block, target) in enumerate(got):
        assert sorted(block) == ["x", "y"]  # the target is not an input
        np.testing.assert_array_equal(block["y"], y[4 * i : 4 * i + 4])
        assert target is not None
        np.testing.assert_array_equal(target, t[4 * i : 4 * i + 4])
    assert all(target is None for _, target in _fixture(x=x).chunks(4))


def test_chunks_ask_a_callable_for_each_size() -> None:
    sizes = iter([1, 5, 100])
    got = [len(block["x"]) for block, _ in _fixture(x=_f32(10, 1)).chunks(lambda: next(sizes))]
    assert got == [1, 5, 4]


def test_take_returns_the_picked_samples_sorted_without_repeats() -> None:
    x, y = _f32(50, 3), _f32(50, 1).astype(np.int64)
    picked = _fixture(x=x, y=y).take([42, 3, 3, 17])
    np.testing.assert_array_equal(picked["x"], x[[3, 17, 42]])
    np.testing.assert_array_equal(picked["y"], y[[3, 17, 42]])
    assert picked["x"].flags.c_contiguous
    assert _fixture(x=x).take([]) == {}


def test_take_reads_only_as_far_as_the_last_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _f32(100_000, 2)
    served: list[int] = []
    real = npz.aligned_chunks

    def counted(arrays: Mapping[str, Any], rows: Any, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for block in real(arrays, rows, start):
            served.append(len(block["x"]))
            yield block

    monkeypatch.setattr(soak, "aligned_chunks", counted)
    np.testing.assert_array_equal(_fixture(x=x).take([10, 5000])["x"], x[[10, 5000]])
    assert sum(served) <= 2 * soak.TAKE_ROWS < len(x)  # two blocks of 4096 tiny samples, not the whole fixture


def test_target_array() -> None:
    assert _fixture(x=_f32(2, 1)).target_array() is None
    target = _fixture(np.array([1, 2]), x=_f32(2, 1)).target_array()
    assert target is not None and target.tolist() == [1, 2]


# --- FeedPlan and plan_feeds ----------------------------------------------------------------------------------


def test_feed_plan_slices() -> None:
    assert FeedPlan(10, True, 4).slices() == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert FeedPlan(3, False, 1).slices() == [slice(0, 1), slice(1, 2), slice(2, 3)]


def test_arrays_of_the_models_rank_are_fed_in_batches() -> None:
    fixture = _fixture(x=_f32(10, 3), m=np.zeros((10, 2, 2), np.int64))
    inputs = (_spec("x", "N", 3), _spec("m", "batch", 2, None, type="tensor(int64)"))
    assert plan_feeds(fixture, inputs, 4) == FeedPlan(samples=10, batched=True, batch=4)


def test_arrays_one_rank_up_stack_whole_inputs() -> None:
    fixture = _fixture(x=_f32(7, 1, 3))  # 7 samples, each a whole [1, 3] input
    assert plan_feeds(fixture, (_spec("x", 1, 3),), 256) == FeedPlan(samples=7, batched=False, batch=1)


def test_a_fixed_batch_axis_sets_the_batch() -> None:
    fixture = _fixture(x=_f32(12, 3))
    assert plan_feeds(fixture, (_spec("x", 4, 3),), 256) == FeedPlan(12, True, 4, fixed_batch=True)


def test_an_input_without_a_declared_shape_is_batched() -> None:
    fixture = _fixture(x=_f32(5, 9, 9))
    assert plan_feeds(fixture, (_spec("x", known_rank=False),), 2) == FeedPlan(5, True, 2)


MISMATCHES: list[tuple[str, dict[str, np.ndarray], tuple[TensorSpec, ...], np.ndarray | None, str]] = [
    ("missing and extra arrays", {"pixels": _f32(4, 3)}, (_spec("x", "N", 3),), None,
     r"missing array\(s\) for model input\(s\) 'x'; unexpected array\(s\) 'pixels' \(model inputs: 'x': "
     r"float32\[N,3\]; optional 'target'; other arrays are never fed, e.g. masks named by quant_outputs\)"),
    ("an input named target", {"x": _f32(4, 3)}, (_spec("x", "N", 3), _spec("target", "N")), None,
     "the model has an input named 'target', which is reserved for ground truth"),
    ("a type the gate cannot feed", {"s": _f32(4, 1)}, (_spec("s", "N", 1, type="tensor(string)"),), None,
     r"model input 's' has type tensor\(string\), which the gate cannot feed"),
    ("dtype", {"x": _f32(4, 3).astype(np.float64)}, (_spec("x", "N", 3),), None,
     "array 'x' has dtype float64, model input expects float32"),
    ("rank", {"x": _f32(4, 3, 2, 1)}, (_spec("x", "N", 3),), None,
     r"array 'x' has shape \(4, 3, 2, 1\); model input is float32\[N,3\] \(expected rank 2 with samples on axis 0, "
     r"or rank 3 stacking whole inputs\)"),
    ("a fixed axis", {"x": _f32(4, 5)}, (_spec("x", "N", 3),), None,
     r"model input 'x' is float32\[N,3\] and axis 1 must be 3, got 5"),
    ("a fixed axis of a stacked input", {"x": _f32(4, 1, 5)}, (_spec("x", 1, 3),), None,
     "axis 1 must be 3, got 5"),
    ("zero samples", {"x": _f32(0, 3)}, (_spec("x", "N", 3),), None, "array 'x' has zero samples"),
    ("sample counts", {"x": _f32(4, 3), "y": _f32(5, 1)}, (_spec("x", "N", 3), _spec("y", "N", 1)), None,
     r"arrays disagree on the sample count \(axis 0\): 'x': 4, 'y': 5"),
    ("layouts", {"x": _f32(4, 3), "y": _f32(4, 1, 1)}, (_spec("x", "N", 3), _spec("y", 1, 1)), None,
     "some arrays carry a batch axis and others stack whole inputs"),
    ("target samples", {"x": _f32(4, 3)}, (_spec("x", "N", 3),), np.arange(3.0),
     "array 'target' has 3 samples, the inputs have 4"),
    ("a batch that does not divide", {"x": _f32(10, 3)}, (_spec("x", 4, 3),), None,
     "the model's batch axis is fixed at 4; the fixture's 10 samples are not a multiple of it"),
    ("two fixed batches", {"x": _f32(8, 3), "y": _f32(8, 1)}, (_spec("x", 4, 3), _spec("y", 2, 1)), None,
     r"model inputs fix different batch sizes \[2, 4\]"),
]


@pytest.mark.parametrize(("arrays", "inputs", "target", "message"), [row[1:] for row in MISMATCHES],
                         ids=[row[0] for row in MISMATCHES])
def test_a_fixture_that_does_not_fit_the_model_is_refused_naming_it(
        arrays: dict[str, np.ndarray], inputs: tuple[TensorSpec, ...], target: np.ndarray | None,
        message: str) -> None:
    with pytest.raises(FixtureError, match=message) as raised:
        plan_feeds(_fixture(target, **arrays), inputs, 8)
    assert str(raised.value).startswith("/data/f.npz: ")


def test_plan_feeds_reads_shapes_off_the_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.savez(tmp_path / "f.npz", x=_f32(6, 3), target=np.arange(6.0))
    fixture = load_fixture(tmp_path / "f.npz")
    monkeypatch.setattr(ShardedArray, "load", lambda self: pytest.fail(f"{self.key} loaded"))
    assert plan_feeds(fixture, (_spec("x", "N", 3),), 4) == FeedPlan(6, True, 4)


def test_extra_arrays_are_allowed_and_listed_never_fed() -> None:
    fixture = _fixture(None, x=_f32(6, 3), attention_mask=np.ones((6, 2), np.int64))
    plan = plan_feeds(fixture, (_spec("x", "N", 3),), 4)
    assert plan == FeedPlan(6, True, 4, extras=("attention_mask",))


def test_an_extra_array_must_have_one_row_per_sample() -> None:
    with pytest.raises(FixtureError, match=r"arrays disagree on the sample count \(axis 0\): 'x': 6, 'valid': 5"):
        plan_feeds(_fixture(None, x=_f32(6, 3), valid=np.ones((5, 2), np.int64)), (_spec("x", "N", 3),), 4)
