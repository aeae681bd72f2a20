"""Soak fixtures: load an ``.npz`` without pickles and check it against a model's inputs before anything runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FixtureError
from .npz import (
    DEFAULT_MAX_BYTES,
    ArchiveArrays,
    ShardedArray,
    aligned_chunks,
    digest,
    open_fixture_arrays,
    refuse_special,
)

TARGET_KEY = "target"
# Fixture.take reads blocks of at most this many samples and bytes
TAKE_ROWS = 4096
TAKE_BYTES = 4 << 20

# ONNX tensor element types the gate can feed, as ORT spells them.
ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, ORT type string and shape (int, symbolic name or None per axis)."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]
    known_rank: bool = True  # False: the graph declares no shape (ORT reports rank 0, as for a scalar)

    @property
    def dtype(self) -> np.dtype | None:
        """Return the numpy dtype of this tensor, or None if the gate cannot feed it."""
        return ORT_DTYPES.get(self.type)

    def describe(self) -> str:
        """Return e.g. ``float32[N,1,32,32]``, ``float32 scalar`` or ``float32 (no shape declared)``."""
        dtype = self.dtype.name if self.dtype is not None else self.type
        if not self.known_rank:
            return f"{dtype} (no shape declared in the model)"
        if not self.shape:
            return f"{dtype} scalar"
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{dtype}[{dims}]"


@dataclass(frozen=True)
class Fixture:
    """A soak fixture: one array per model input, an optional target, and where it came from.

    ``inputs`` maps names to arrays; for a fixture read from disk it is an :class:`~.npz.ArchiveArrays`
    that loads a member only when indexed, and :meth:`chunks` streams the members instead.
    ``target`` is an array, a :class:`~.npz.ShardedArray` (streamed) or None.
    """

    path: Path
    sha256: str
    inputs: Mapping[str, np.ndarray]
    target: Any

    def info(self, name: str) -> Any:
        """Return the input array or its streamed handle: anything with ``shape``, ``ndim`` and ``dtype``."""
        if isinstance(self.inputs, ArchiveArrays):
            return self.inputs.arrays[name]
        return self.inputs[name]

    @property
    def samples(self) -> int:
        """Return the number of samples (length of the leading axis)."""
        return int(self.info(next(iter(self.inputs))).shape[0])

    def target_array(self) -> np.ndarray | None:
        """Return the whole target (loaded when streamed; targets are one value or map per sample)."""
        if isinstance(self.target, ShardedArray):
            return self.target.load()
        return None if self.target is None else np.asarray(self.target)

    def chunks(self, rows: int | Callable[[], int],
               start: int = 0) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Yield (inputs, target) blocks of ``rows`` samples from sample ``start``, streamed where on disk."""
        arrays: dict[str, Any] = {name: self.info(name) for name in self.inputs}
        if self.target is not None:
            arrays[TARGET_KEY] = self.target
        for block in aligned_chunks(arrays, rows, start):
            target = block.pop(TARGET_KEY, None)
            yield block, target

    def take(self, indices: Sequence[int], *, target: bool = False) -> dict[str, np.ndarray]:
        """Return the inputs of the given samples (sorted), reading only as far as the last one.

        With ``target``, the target's rows come too, under ``TARGET_KEY`` (when the fixture has one).
        """
        wanted = sorted(set(int(i) for i in indices))
        names = [*self.inputs, *([TARGET_KEY] if target and self.target is not None else [])]
        picked: dict[str, list[np.ndarray]] = {name: [] for name in names}
        start = 0
        # blocks of ~4 MiB: only the picked samples are kept, and tiny samples do not cost a Python step each
        row_bytes = sum(int(np.prod(self.info(name).shape[1:])) * self.info(name).dtype.itemsize
                        for name in self.inputs)
        for block, rows in self.chunks(max(32, min(TAKE_ROWS, TAKE_BYTES // max(row_bytes, 1)))):
            stop = start + next(iter(block.values())).shape[0]
            local = [i - start for i in wanted if start <= i < stop]
            if local:
                if TARGET_KEY in picked and rows is not None:
                    block = {**block, TARGET_KEY: rows}
                for name, value in block.items():
                    picked[name].append(np.ascontiguousarray(value[local]))
            start = stop
            if wanted and start > wanted[-1]:
                break
        return {name: np.concatenate(parts, axis=0) for name, parts in picked.items() if parts}


@dataclass(frozen=True)
class FeedPlan:
    """How fixture samples are fed: batches of ``batch`` samples, or one stacked model input per run."""

    samples: int
    batched: bool
    batch: int
    fixed_batch: bool = False  # the model fixes its batch axis: every run must feed exactly ``batch`` samples
    # arrays of the fixture that are no model input (masks, positions): read with the samples, never fed
    extras: tuple[str, ...] = ()

    def slices(self) -> list[slice]:
        """Return the sample slices, one per session run."""
        step = self.batch if self.batched else 1
        return [slice(i, min(i + step, self.samples)) for i in range(0, self.samples, step)]


def find_fixture(candidates: Sequence[Path]) -> Path:
    """Return the first existing candidate, or raise naming every place looked at."""
    for candidate in candidates:
        if candidate.is_file() or (candidate.is_dir() and any(candidate.glob("*.npz"))):
            return candidate
        if candidate.exists():
            # a directory, FIFO or device: opening a FIFO would block the run, so refuse it by its type
            raise FixtureError(f"{candidate}: the soak fixture path exists but is not a regular file "
                               f"({_file_kind(candidate)}); expected an .npz archive or a folder of .npz shards")
    looked = ", ".join(str(c) for c in candidates)
    raise FixtureError(f"soak fixture not found; looked in: {looked} (no random data is substituted)")


def _file_kind(path: Path) -> str:
    import stat

    mode = path.stat().st_mode
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def load_fixture(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Fixture:
    """Open an ``.npz`` fixture (or a folder of shards): headers checked, nothing unpickled, data left on disk."""
    if not path.is_dir():
        refuse_special(path, "soak fixture")
    arrays = open_fixture_arrays(path, max_bytes)
    target = arrays.pop(TARGET_KEY, None)
    if not arrays:
        raise FixtureError(f"{path}: the archive holds only {TARGET_KEY!r}; it needs one array per model input")
    return Fixture(path=path, sha256=digest(path), inputs=ArchiveArrays(arrays), target=target)


def plan_feeds(fixture: Fixture, inputs: Sequence[TensorSpec], batch_size: int) -> FeedPlan:
    """Check the fixture against the model inputs and decide how to feed it; raise FixtureError on mismatch."""
    where = str(fixture.path)
    expected = {spec.name for spec in inputs}
    got = set(fixture.inputs)
    if TARGET_KEY in expected:
        raise FixtureError(f"{where}: the model has an input named {TARGET_KEY!r}, which is reserved for ground truth")
    missing = sorted(expected - got)
    extra = sorted(got - expected)
    if missing:
        # extra arrays (masks, positions) are allowed; next to a missing input they are the likely misspelling
        parts = [f"missing array(s) for model input(s) {', '.join(repr(m) for m in missing)}"]
        if extra:
            parts.append(f"unexpected array(s) {', '.join(repr(e) for e in extra)}")
        names = ", ".join(f"{s.name!r}: {s.describe()}" for s in inputs)
        raise FixtureError(f"{where}: {'; '.join(parts)} (model inputs: {names}; optional {TARGET_KEY!r}; other "
                           f"arrays are never fed, e.g. masks named by quant_outputs)")

    counts: dict[str, int] = {}
    layouts: dict[str, bool] = {}  # True = batched along the model's own axis 0
    fixed_batch: set[int] = set()
    for spec in inputs:
        array = fixture.info(spec.name)
        if spec.dtype is None:
            raise FixtureError(f"{where}: model input {spec.name!r} has type {spec.type}, which the gate cannot feed")
        if array.dtype != spec.dtype:
            raise FixtureError(
                f"{where}: array {spec.name!r} has dtype {array.dtype}, model input expects {spec.dtype.name}"
            )
        rank = len(spec.shape)
        if not spec.known_rank:
            # nothing to check the array against: samples on axis 0, fed in batches
            batched, model_dims = True, tuple[int, ...]()
        elif array.ndim == rank + 1:
            batched, model_dims = False, array.shape[1:]
        elif array.ndim == rank and rank > 0:
            batched, model_dims = True, array.shape
        else:
            raise FixtureError(
                f"{where}: array {spec.name!r} has shape {array.shape}; model input is {spec.describe()} "
                f"(expected rank {rank} with samples on axis 0, or rank {rank + 1} stacking whole inputs)"
            )
        for axis, (want, have) in enumerate(zip(spec.shape, model_dims)):
            if batched and axis == 0:
                if isinstance(want, int) and want > 0:
                    fixed_batch.add(want)
                continue
            if isinstance(want, int) and want > 0 and want != have:
                raise FixtureError(
                    f"{where}: array {spec.name!r} has shape {array.shape}; model input {spec.name!r} is "
                    f"{spec.describe()} and axis {axis} must be {want}, got {have}"
                )
        if array.shape[0] == 0:
            raise FixtureError(f"{where}: array {spec.name!r} has zero samples")
        counts[spec.name] = int(array.shape[0])
        layouts[spec.name] = batched

    for name in extra:
        array = fixture.info(name)
        if array.ndim == 0:
            raise FixtureError(f"{where}: array {name!r} is a scalar; extra arrays carry one value or map per sample "
                               f"on axis 0")
        counts[name] = int(array.shape[0])
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k!r}: {v}" for k, v in counts.items())
        raise FixtureError(f"{where}: arrays disagree on the sample count (axis 0): {listing}")
    if len(set(layouts.values())) > 1:
        raise FixtureError(
            f"{where}: some arrays carry a batch axis and others stack whole inputs; use one layout for all inputs"
        )
    samples = next(iter(counts.values()))
    target = fixture.target
    if target is not None and target.shape[0] != samples:
        raise FixtureError(f"{where}: array {TARGET_KEY!r} has {target.shape[0]} samples, the inputs have "
                           f"{samples}")

    batched = next(iter(layouts.values()))
    if batched and fixed_batch:
        if len(fixed_batch) > 1:
            raise FixtureError(f"{where}: model inputs fix different batch sizes {sorted(fixed_batch)}")
        batch = fixed_batch.pop()
        if samples % batch:
            raise FixtureError(
                f"{where}: the model's batch axis is fixed at {batch}; the fixture's {samples} samples "
                f"are not a multiple of it"
            )
        return FeedPlan(samples=samples, batched=True, batch=batch, fixed_batch=True, extras=tuple(extra))
    return FeedPlan(samples=samples, batched=batched, batch=batch_size if batched else 1, extras=tuple(extra))
