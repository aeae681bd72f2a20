"""Soak fixtures: load an ``.npz`` without pickles and check it against a model's inputs before anything runs."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FixtureError
from .fileio import sha256_file

TARGET_KEY = "target"

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

    @property
    def dtype(self) -> np.dtype | None:
        """Return the numpy dtype of this tensor, or None if the gate cannot feed it."""
        return ORT_DTYPES.get(self.type)

    def describe(self) -> str:
        """Return e.g. ``float32[N,1,32,32]``."""
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        dtype = self.dtype.name if self.dtype is not None else self.type
        return f"{dtype}[{dims}]"


@dataclass(frozen=True)
class Fixture:
    """A loaded soak fixture: one array per model input, an optional target, and where it came from."""

    path: Path
    sha256: str
    inputs: Mapping[str, np.ndarray]
    target: np.ndarray | None

    @property
    def samples(self) -> int:
        """Return the number of samples (length of the leading axis)."""
        return int(next(iter(self.inputs.values())).shape[0])


@dataclass(frozen=True)
class FeedPlan:
    """How fixture samples are fed: batches of ``batch`` samples, or one stacked model input per run."""

    samples: int
    batched: bool
    batch: int
    fixed_batch: bool = False  # the model fixes its batch axis: every run must feed exactly ``batch`` samples

    def slices(self) -> list[slice]:
        """Return the sample slices, one per session run."""
        step = self.batch if self.batched else 1
        return [slice(i, min(i + step, self.samples)) for i in range(0, self.samples, step)]


def find_fixture(candidates: Sequence[Path]) -> Path:
    """Return the first existing candidate, or raise naming every place looked at."""
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        if candidate.exists():
            # a directory, FIFO or device: opening a FIFO would block the run, so refuse it by its type
            raise FixtureError(f"{candidate}: the soak fixture path exists but is not a regular file "
                               f"({_file_kind(candidate)}); expected an .npz archive")
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


def load_fixture(path: Path) -> Fixture:
    """Load an ``.npz`` soak fixture with ``allow_pickle=False``; refuse anything that is not plain numeric arrays."""
    try:
        digest = sha256_file(path)
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            # a bare .npy holds one array and is no context manager: refuse it before using it as one
            raise FixtureError(f"{path}: not an .npz archive (got a single array); save with numpy.savez")
        with loaded as npz:
            arrays: dict[str, np.ndarray] = {}
            for key in sorted(npz.files):
                try:
                    value = npz[key]
                except ValueError as exc:
                    # object arrays (pickles) refuse to load without allow_pickle: never unpickle a fixture
                    raise FixtureError(f"{path}: array {key!r} cannot be loaded without pickle ({exc})") from None
                if not isinstance(value, np.ndarray):
                    # numpy hands back the raw bytes of a member that is not a .npy file (a pickle, a text file)
                    raise FixtureError(f"{path}: member {key!r} is not a .npy array ({len(value)} raw bytes); "
                                       f"only numpy arrays saved with numpy.savez are accepted, nothing is unpickled")
                arrays[key] = value
    except FixtureError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise FixtureError(f"{path}: unreadable soak fixture: {type(exc).__name__}: {exc}") from None
    if not arrays:
        raise FixtureError(f"{path}: the archive holds no arrays")
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise FixtureError(f"{path}: array {key!r} has dtype {array.dtype}; only numeric arrays are accepted")
        if array.ndim == 0:
            raise FixtureError(f"{path}: array {key!r} is a scalar; axis 0 must index samples")
    target = arrays.pop(TARGET_KEY, None)
    return Fixture(path=path, sha256=digest, inputs=arrays, target=target)


def plan_feeds(fixture: Fixture, inputs: Sequence[TensorSpec], batch_size: int) -> FeedPlan:
    """Check the fixture against the model inputs and decide how to feed it; raise FixtureError on mismatch."""
    where = str(fixture.path)
    expected = {spec.name for spec in inputs}
    got = set(fixture.inputs)
    if TARGET_KEY in expected:
        raise FixtureError(f"{where}: the model has an input named {TARGET_KEY!r}, which is reserved for ground truth")
    missing = sorted(expected - got)
    extra = sorted(got - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing array(s) for model input(s) {', '.join(repr(m) for m in missing)}")
        if extra:
            parts.append(f"unexpected array(s) {', '.join(repr(e) for e in extra)}")
        names = ", ".join(f"{s.name!r}: {s.describe()}" for s in inputs)
        raise FixtureError(f"{where}: {'; '.join(parts)} (model inputs: {names}; optional {TARGET_KEY!r})")

    counts: dict[str, int] = {}
    layouts: dict[str, bool] = {}  # True = batched along the model's own axis 0
    fixed_batch: set[int] = set()
    for spec in inputs:
        array = fixture.inputs[spec.name]
        if spec.dtype is None:
            raise FixtureError(f"{where}: model input {spec.name!r} has type {spec.type}, which the gate cannot feed")
        if array.dtype != spec.dtype:
            raise FixtureError(
                f"{where}: array {spec.name!r} has dtype {array.dtype}, model input expects {spec.dtype.name}"
            )
        rank = len(spec.shape)
        if array.ndim == rank + 1:
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
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise FixtureError(f"{where}: array {spec.name!r} holds {bad} NaN/inf value(s); soak inputs must be finite")
        counts[spec.name] = int(array.shape[0])
        layouts[spec.name] = batched

    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k!r}: {v}" for k, v in counts.items())
        raise FixtureError(f"{where}: arrays disagree on the sample count (axis 0): {listing}")
    if len(set(layouts.values())) > 1:
        raise FixtureError(
            f"{where}: some arrays carry a batch axis and others stack whole inputs; use one layout for all inputs"
        )
    samples = next(iter(counts.values()))
    target = fixture.target
    if target is not None:
        if target.shape[0] != samples:
            raise FixtureError(f"{where}: array {TARGET_KEY!r} has {target.shape[0]} samples, the inputs have {samples}")
        if target.dtype.kind == "f" and not np.isfinite(target).all():
            raise FixtureError(f"{where}: array {TARGET_KEY!r} holds NaN/inf values")
        if np.ptp(target.astype(np.float64)) == 0:
            raise FixtureError(f"{where}: array {TARGET_KEY!r} is constant; a correlation against it is undefined")

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
        return FeedPlan(samples=samples, batched=True, batch=batch, fixed_batch=True)
    return FeedPlan(samples=samples, batched=batched, batch=batch_size if batched else 1)
