"""Read ``.npz`` soak fixtures and calibration sets without pickles, without trusting their headers, in chunks.

Every consumer of fixture data (the gate, the calibration readers, the diagnosis, QAT) reads through this
module, so the safety rules live in one place:

- only ``.npy`` members are accepted, never pickles (``allow_pickle`` stays off);
- a member's header is read and checked against the zip directory *before* anything is allocated: the
  declared ``shape × itemsize`` must equal the member's uncompressed size (a lying header is refused), and
  the archive's total declared bytes must stay under a cap (``DEFAULT_MAX_BYTES``, overridable), so a
  zip bomb or a header claiming ``(1e9, 64)`` is an error, not an allocation;
- members stored uncompressed (``numpy.savez``) are read block by block with ``readinto`` (the kernel's page
  cache is not charged to the gate's RSS, as a memory map's touched pages are); compressed members
  (``numpy.savez_compressed``) are streamed row block by row block, never inflated whole;
- a fixture may also be a folder of shard files (``part-000.npz``, ``part-001.npz``, ...; sorted by name),
  each holding the same arrays: the samples are their concatenation, so data larger than RAM (or than one
  file) can be gated.
"""

from __future__ import annotations

import hashlib
import io
import stat
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import FixtureError

# A fixture's declared (uncompressed) bytes may not exceed this unless the caller raises it: 64 GiB is far above
# any fixture we have seen (the largest real-size trials hold ~3 GiB) and far below what a forged header claims.
DEFAULT_MAX_BYTES = 64 << 30
# Rows streamed per read from a compressed member are bounded by bytes, not by count
STREAM_BLOCK_BYTES = 32 << 20
# at most this many samples are read from a member at a time (fewer when they exceed STREAM_BLOCK_BYTES)
STREAM_ROWS = 1024
# rows read at once from a stored (uncompressed) member are bounded tighter: reading costs no inflation, so small
# blocks are as fast, and the gate's peak memory does not follow the fixture's size
STORED_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class Member:
    """One ``.npy`` array inside one archive: its header, checked, and where its bytes are."""

    archive: Path
    key: str  # the array name (member name without ``.npy``)
    member: str  # the zip member name
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran: bool
    compressed: bool
    data_offset: int | None  # byte offset of the array data in the archive file, for stored members

    @property
    def nbytes(self) -> int:
        """Return the declared size of the array data."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Return the bytes of one sample (one index of axis 0)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def refuse_special(path: Path, what: str) -> None:
    """Raise FixtureError when ``path`` is not a regular file (a FIFO would block, /dev/zero never ends)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise FixtureError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
        kind = next((name for test, name in kinds if test(mode)), "not a regular file")
        raise FixtureError(f"{path}: the {what} is {kind}, not a regular file")


def _read_header(handle: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype[Any], bool]:
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = npy.read_array_header_2_0(handle)
    except (ValueError, OSError, EOFError) as exc:
        raise FixtureError(f"{where}: not a .npy array ({exc}); only arrays saved with numpy.savez are accepted, "
                           f"nothing is unpickled") from None
    return tuple(int(d) for d in shape), np.dtype(dtype), bool(fortran)


def read_members(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Member]:
    """Return the checked members of one ``.npz`` archive, reading headers only."""
    refuse_special(path, "soak fixture")
    try:
        with open(path, "rb") as handle:
            if handle.read(6) == b"\x93NUMPY":
                raise FixtureError(f"{path}: not an .npz archive (got a single .npy array); save the arrays with "
                                   f"numpy.savez")
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise FixtureError(f"{path}: unreadable soak fixture: {type(exc).__name__}: {exc}") from None
    members: dict[str, Member] = {}
    total = 0
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            where = f"{path}: member {info.filename!r}"
            if not info.filename.endswith(".npy"):
                raise FixtureError(f"{where} is not a .npy array; only numpy arrays saved with numpy.savez are "
                                   f"accepted, nothing is unpickled")
            key = info.filename[: -len(".npy")]
            try:
                with archive.open(info) as handle:
                    shape, dtype, fortran = _read_header(handle, where)
                    header_len = handle.tell()
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
                raise FixtureError(f"{where}: unreadable: {type(exc).__name__}: {exc}") from None
            if dtype.hasobject or dtype.kind not in "biuf":
                raise FixtureError(f"{path}: array {key!r} has dtype {dtype}; only numeric arrays are accepted "
                                   f"(object arrays would need pickle)")
            if len(shape) == 0:
                raise FixtureError(f"{path}: array {key!r} is a scalar; axis 0 must index samples")
            declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if all(d >= 0 for d in shape) else -1
            if declared < 0 or declared + header_len != info.file_size:
                raise FixtureError(
                    f"{path}: array {key!r} declares shape {shape} of {dtype} ({declared} bytes) but the member "
                    f"holds {info.file_size - header_len} bytes of data: the header does not match its data"
                )
            total += declared
            if total > max_bytes:
                raise FixtureError(
                    f"{path}: the arrays declare {total} bytes, over the fixture cap of {max_bytes} bytes "
                    f"(--quantgate-max-fixture-gib raises it)"
                )
            offset = None
            if info.compress_type == zipfile.ZIP_STORED and not fortran:
                offset = _stored_data_offset(path, info) + header_len
            members[key] = Member(path, key, info.filename, shape, dtype, fortran,
                                  info.compress_type != zipfile.ZIP_STORED, offset)
    if not members:
        raise FixtureError(f"{path}: the archive holds no arrays")
    return members


def _stored_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Return where a stored member's bytes start: after its local header (whose extra field may differ)."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def _open_rows(member: Member) -> tuple[zipfile.ZipFile, IO[bytes]]:
    archive = zipfile.ZipFile(member.archive)
    handle = archive.open(member.member)
    _read_header(handle, f"{member.archive}: member {member.member!r}")
    return archive, handle


def read_rows(member: Member, handle: IO[bytes], count: int) -> np.ndarray:
    """Read the next ``count`` samples of a member from an open stream."""
    want = count * member.row_bytes
    data = handle.read(want)
    if len(data) != want:
        raise FixtureError(f"{member.archive}: array {member.key!r} ends early (truncated archive)")
    return np.frombuffer(data, dtype=member.dtype).reshape((count, *member.shape[1:]))


def read_stored(member: Member, handle: io.FileIO, first: int, count: int) -> np.ndarray:
    """Read samples ``first .. first+count`` of a stored (uncompressed, C-order) member into a new array."""
    assert member.data_offset is not None
    out = np.empty((count, *member.shape[1:]), dtype=member.dtype)
    view = out.data.cast("B")
    handle.seek(member.data_offset + first * member.row_bytes)
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise FixtureError(f"{member.archive}: array {member.key!r} ends early (truncated archive)")
        done += got
    return out


def load(member: Member) -> np.ndarray:
    """Return a whole member: memory-mapped when stored uncompressed, else read (its size is already capped)."""
    if member.data_offset is not None:
        if member.nbytes == 0:
            return np.zeros(member.shape, dtype=member.dtype)
        return np.memmap(member.archive, dtype=member.dtype, mode="r", offset=member.data_offset,
                         shape=member.shape)
    archive, handle = _open_rows(member)
    with archive, handle:
        data = handle.read(member.nbytes)
    if len(data) != member.nbytes:
        raise FixtureError(f"{member.archive}: array {member.key!r} ends early (truncated archive)")
    array = np.frombuffer(data, dtype=member.dtype)
    return array.reshape(member.shape, order="F" if member.fortran else "C")


class ShardedArray:
    """One named array across the shards of a fixture: samples are the shards' rows, in order."""

    def __init__(self, parts: Sequence[Member]) -> None:
        self.parts = tuple(parts)
        first = parts[0]
        self.key = first.key
        self.dtype = first.dtype
        self.shape = (sum(p.shape[0] for p in parts), *first.shape[1:])

    @property
    def stored(self) -> bool:
        """Return whether every shard holds this array uncompressed (read without inflating)."""
        return all(p.data_offset is not None for p in self.parts)

    @property
    def ndim(self) -> int:
        """Return the rank."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Return the element count."""
        return int(np.prod(self.shape, dtype=np.int64))

    def load(self) -> np.ndarray:
        """Return the whole array (one shard: memory-mapped where stored)."""
        if len(self.parts) == 1:
            return load(self.parts[0])
        return np.concatenate([load(p) for p in self.parts], axis=0)

    def blocks(self, rows: int, start: int = 0) -> Iterator[np.ndarray]:
        """Yield consecutive blocks of at most ``rows`` samples from sample ``start``, streamed, never loaded whole.

        Stored members seek to ``start``; compressed ones inflate the samples before it block by block (a
        deflate stream has no index) and drop them.
        """
        for part in self.parts:
            if start >= part.shape[0]:
                start -= part.shape[0]
                continue
            skip, start = start, 0
            if part.data_offset is not None and part.row_bytes:
                with io.FileIO(part.archive, "r") as raw:
                    for first in range(skip, part.shape[0], rows):
                        yield read_stored(part, raw, first, min(rows, part.shape[0] - first))
                continue
            if part.data_offset is not None or part.fortran:
                whole = load(part)
                for first in range(skip, part.shape[0], rows):
                    yield whole[first : first + rows]
                continue
            archive, handle = _open_rows(part)
            with archive, handle:
                left = part.shape[0] - skip
                while skip > 0:
                    count = min(rows, skip)
                    read_rows(part, handle, count)
                    skip -= count
                while left > 0:
                    count = min(rows, left)
                    yield read_rows(part, handle, count)
                    left -= count


class ArchiveArrays(Mapping[str, np.ndarray]):
    """The arrays of an archive (or of a shard folder), loaded lazily by key; streamed by :meth:`chunks`."""

    def __init__(self, arrays: Mapping[str, ShardedArray]) -> None:
        self.arrays = dict(arrays)
        self._loaded: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._loaded:
            self._loaded[key] = self.arrays[key].load()
        return self._loaded[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)


def open_fixture_arrays(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, ShardedArray]:
    """Return every array of an ``.npz`` file or of a folder of ``.npz`` shards, headers checked."""
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix == ".npz")
        if not shards:
            raise FixtureError(f"{path}: the fixture folder holds no .npz shard")
    else:
        shards = [path]
    per_shard = []
    budget = max_bytes
    for shard in shards:
        members = read_members(shard, budget)
        budget -= sum(m.nbytes for m in members.values())
        per_shard.append(members)
    keys = sorted(per_shard[0])
    for shard, members in zip(shards[1:], per_shard[1:]):
        if sorted(members) != keys:
            raise FixtureError(f"{shard}: shard holds arrays {sorted(members)}, the first shard {shards[0].name} "
                               f"holds {keys}; every shard must hold the same arrays")
        for key in keys:
            a, b = per_shard[0][key], members[key]
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                raise FixtureError(f"{shard}: array {key!r} is {b.dtype}{list(b.shape)}, the first shard has "
                                   f"{a.dtype}{list(a.shape)}; shards may differ only in their sample count")
    return {key: ShardedArray([members[key] for members in per_shard]) for key in keys}


def digest(path: Path) -> str:
    """Return the sha256 of a fixture: of the file, or of the shard names and hashes of a folder."""
    from ..fileio import sha256_file

    if not path.is_dir():
        return sha256_file(path)
    combined = hashlib.sha256()
    for shard in sorted(p for p in path.iterdir() if p.suffix == ".npz"):
        combined.update(f"{shard.name}\0{sha256_file(shard)}\n".encode())
    return combined.hexdigest()


def _slices(array: np.ndarray, rows: int, start: int = 0) -> Iterator[np.ndarray]:
    for first in range(start, int(array.shape[0]), rows):
        yield array[first : first + rows]


def aligned_chunks(arrays: Mapping[str, Any], rows: int | Callable[[], int],
                   start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yield dicts of consecutive blocks of every array, in lockstep, from sample ``start``.

    Works on in-memory arrays (sliced) and on :class:`ShardedArray` values (streamed); blocks of different
    shards are re-cut so every yielded chunk has ``rows`` samples except the last. ``rows`` may be a
    callable, asked before each chunk, so a caller can size chunks from what the first one cost.
    """
    fixed = rows if isinstance(rows, int) else 0
    size: Callable[[], int] = rows if callable(rows) else (lambda: fixed)
    streams: dict[str, Iterator[np.ndarray]] = {}
    for key, value in arrays.items():
        if isinstance(value, ShardedArray):
            row_bytes = max(1, value.parts[0].row_bytes)
            cap = STORED_BLOCK_BYTES if value.stored else STREAM_BLOCK_BYTES
            streams[key] = value.blocks(max(1, min(STREAM_ROWS, cap // row_bytes)), start)
        else:
            streams[key] = _slices(value, STREAM_ROWS, start)
    pending: dict[str, list[np.ndarray]] = {key: [] for key in streams}
    have: dict[str, int] = {key: 0 for key in streams}
    done = False
    while not done:
        want = max(1, int(size()))
        for key, stream in streams.items():
            while have[key] < want:
                block = next(stream, None)
                if block is None:
                    done = True
                    break
                pending[key].append(block)
                have[key] += int(block.shape[0])
        count = min(have.values()) if have else 0
        if count == 0:
            return
        count = min(count, want)
        out: dict[str, np.ndarray] = {}
        for key in streams:
            joined = pending[key][0] if len(pending[key]) == 1 else np.concatenate(pending[key], axis=0)
            out[key] = joined[:count]
            rest = joined[count:]
            pending[key] = [rest] if rest.shape[0] else []
            have[key] = int(rest.shape[0])
        yield out
        if done and all(v == 0 for v in have.values()):
            return


def save_arrays(handle: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` (what the gate streams without inflating), no pickles."""
    if "allow_pickle" in arrays:  # numpy.savez would read it as its own keyword
        raise FixtureError("an array named 'allow_pickle' cannot be stored in an .npz by numpy.savez")
    savez: Any = np.savez  # numpy's stubs type the arrays as the allow_pickle keyword
    savez(handle, allow_pickle=False, **arrays)
