"""npz: headers checked against the zip directory, refusals before any allocation, lazy and bounded reading."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.lib import format as npy

from pytest_quantgate.io import npz
from pytest_quantgate.errors import FixtureError
from pytest_quantgate.io.npz import (
    ArchiveArrays,
    ShardedArray,
    aligned_chunks,
    digest,
    open_fixture_arrays,
    read_members,
    read_rows,
    read_stored,
)


def _npy(array: np.ndarray) -> bytes:
    handle = io.BytesIO()
    np.save(handle, array, allow_pickle=False)
    return handle.getvalue()


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _rows(n: int, width: int = 3, dtype: Any = np.float32) -> np.ndarray:
    return np.arange(n * width).reshape(n, width).astype(dtype)


# --- members: what the headers say, checked -------------------------------------------------------------------


def test_members_of_stored_and_compressed_archives(tmp_path: Path) -> None:
    x, y = _rows(5), np.arange(4, dtype=np.int64)
    np.savez(tmp_path / "s.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    for name, compressed in (("s.npz", False), ("c.npz", True)):
        members = read_members(tmp_path / name)
        assert sorted(members) == ["x", "y"]
        m = members["x"]
        assert (m.key, m.member, m.shape, m.dtype, m.fortran, m.compressed) == ("x", "x.npy", (5, 3),
                                                                              np.dtype(np.float32), False, compressed)
        assert (m.nbytes, m.row_bytes) == (60, 12)
        assert (m.data_offset is None) == compressed
        assert members["y"].row_bytes == 8  # a 1-d array: one element per sample


def test_a_stored_members_offset_points_at_its_data(tmp_path: Path) -> None:
    x, y = _rows(7), _rows(2, 5, np.float64)
    np.savez(tmp_path / "s.npz", x=x, y=y)
    raw = (tmp_path / "s.npz").read_bytes()
    for key, array in (("x", x), ("y", y)):
        member = read_members(tmp_path / "s.npz")[key]
        assert member.data_offset is not None
        assert raw[member.data_offset : member.data_offset + member.nbytes] == array.tobytes()


def test_directory_entries_are_skipped_and_accepted_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo("sub/"), b"")
        archive.writestr("flags.npy", _npy(np.array([True, False])))
        archive.writestr("bytes.npy", _npy(np.arange(3, dtype=np.uint8)))
        archive.writestr("half.npy", _npy(np.ones((2, 2), np.float16)))
    assert sorted(read_members(path)) == ["bytes", "flags", "half"]


def _saved(array: np.ndarray) -> Callable[[Path], Path]:
    return lambda p: _zip(p, {"x.npy": _npy(array)})


def _lying_header(p: Path) -> Path:
    handle = io.BytesIO()
    npy.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (10, 4)})
    return _zip(p, {"x.npy": handle.getvalue() + b"\0" * 100})  # declares 160 bytes, holds 100


def _object_array(p: Path) -> Path:
    np.savez(p, x=np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return p


def _bare_npy(p: Path) -> Path:
    p.write_bytes(_npy(_rows(3)))
    return p


def _text(data: bytes) -> Callable[[Path], Path]:
    def build(p: Path) -> Path:
        p.write_bytes(data)
        return p
    return build


def _truncated(p: Path) -> Path:
    np.savez(p, x=_rows(100))
    p.write_bytes(p.read_bytes()[:700])  # the zip's directory at the end is gone
    return p


REFUSED: list[tuple[str, Callable[[Path], Path], str]] = [
    ("not a zip", _text(b"x,y\n1,2\n"), "unreadable soak fixture: BadZipFile"),
    ("empty file", _text(b""), "unreadable soak fixture: BadZipFile"),
    ("a bare .npy", _bare_npy, r"not an .npz archive \(got a single .npy array\)"),
    ("a pickle member", lambda p: _zip(p, {"x.npy": _npy(_rows(2)), "evil.pkl": pickle.dumps([1])}),
     "member 'evil.pkl' is not a .npy array; .*nothing is unpickled"),
    ("a pickle named .npy", lambda p: _zip(p, {"x.npy": pickle.dumps(np.zeros(3))}),
     r"member 'x.npy': not a .npy array \(.*nothing is unpickled"),
    ("an object array", _object_array, r"array 'x' has dtype object; only numeric arrays .*would need pickle"),
    ("strings", _saved(np.array(["a", "b"])), r"array 'x' has dtype <U1; only numeric arrays"),
    ("complex", _saved(np.ones(3, np.complex64)), r"array 'x' has dtype complex64; only numeric arrays"),
    ("structured", _saved(np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")])), r"array 'x' has dtype .*only numeric"),
    ("a scalar", _saved(np.array(1.0, np.float32)), "array 'x' is a scalar; axis 0 must index samples"),
    ("a header that lies", _lying_header,
     r"array 'x' declares shape \(10, 4\) of float32 \(160 bytes\) but the member holds 100 bytes of data"),
    ("no arrays", lambda p: _zip(p, {}), "the archive holds no arrays"),
    ("truncated", _truncated, "unreadable soak fixture: BadZipFile"),
]


@pytest.mark.parametrize(("build", "message"), [(b, m) for _, b, m in REFUSED], ids=[n for n, _, _ in REFUSED])
def test_bad_archives_are_refused_naming_the_file(tmp_path: Path, build: Callable[[Path], Path], message: str) -> None:
    path = build(tmp_path / "bad.npz")
    with pytest.raises(FixtureError, match=message) as raised:
        read_members(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_special_files_are_refused_by_type(tmp_path: Path) -> None:
    with pytest.raises(FixtureError, match="the soak fixture is a directory, not a regular file"):
        read_members(tmp_path)
    os.mkfifo(tmp_path / "pipe.npz")
    with pytest.raises(FixtureError, match="the soak fixture is a FIFO, not a regular file"):
        read_members(tmp_path / "pipe.npz")  # returns at once: a FIFO is never opened
    with pytest.raises(FixtureError, match="cannot read the soak fixture"):
        read_members(tmp_path / "absent.npz")


def test_the_cap_is_on_the_archives_declared_total(tmp_path: Path) -> None:
    np.savez(tmp_path / "two.npz", x=_rows(50), y=_rows(50))  # 600 bytes each
    assert len(read_members(tmp_path / "two.npz", max_bytes=1200)) == 2  # at the cap: accepted
    with pytest.raises(FixtureError, match="the arrays declare 1200 bytes, over the fixture cap of 1199 bytes"):
        read_members(tmp_path / "two.npz", max_bytes=1199)


def test_the_cap_spans_every_shard_of_a_folder(tmp_path: Path) -> None:
    for i in range(3):
        np.savez(tmp_path / f"part-{i:03d}.npz", x=_rows(50))  # 600 bytes each
    assert open_fixture_arrays(tmp_path, max_bytes=1800)["x"].shape == (150, 3)
    with pytest.raises(FixtureError, match=r"part-002.npz: the arrays declare 600 bytes, over the fixture cap of 500"):
        open_fixture_arrays(tmp_path, max_bytes=1700)


# --- shards ---------------------------------------------------------------------------------------------------


def test_shards_are_concatenated_in_name_order_and_other_files_ignored(tmp_path: Path) -> None:
    x = _rows(20)
    np.savez(tmp_path / "part-010.npz", x=x[12:], t=x[12:, 0].copy())
    np.savez_compressed(tmp_path / "part-002.npz", x=x[:12], t=x[:12, 0].copy())
    (tmp_path / "README.txt").write_text("not a shard")
    arrays = open_fixture_arrays(tmp_path)
    assert sorted(arrays) == ["t", "x"]
    assert arrays["x"].shape == (20, 3) and arrays["x"].ndim == 2 and arrays["x"].size == 60
    assert not arrays["x"].stored  # one shard is compressed
    np.testing.assert_array_equal(arrays["x"].load(), x)
    np.testing.assert_array_equal(np.concatenate(list(arrays["t"].blocks(7))), x[:, 0])


@pytest.mark.parametrize(("second", "message"), [
    ({"x": _rows(4, 4)}, r"array 'x' is float32\[4, 4\], the first shard has float32\[4, 3\]; shards may differ "
                         r"only in their sample count"),
    ({"x": _rows(4, 3, np.float64)}, r"array 'x' is float64\[4, 3\], the first shard has float32\[4, 3\]"),
    ({"y": _rows(4)}, r"shard holds arrays \['y'\], the first shard part-0.npz holds \['x'\]"),
])
def test_shards_must_agree(tmp_path: Path, second: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "part-0.npz", x=_rows(4))
    np.savez(tmp_path / "part-1.npz", **second)  # type: ignore[arg-type]
    with pytest.raises(FixtureError, match=message) as raised:
        open_fixture_arrays(tmp_path)
    assert str(raised.value).startswith(str(tmp_path / "part-1.npz"))


def test_an_empty_folder_is_not_a_fixture(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(FixtureError, match=r"the fixture folder holds no \.npz shard"):
        open_fixture_arrays(tmp_path)


def test_digest_of_a_file_and_of_a_folder(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=_rows(3))
    assert digest(tmp_path / "a.npz") == hashlib.sha256((tmp_path / "a.npz").read_bytes()).hexdigest()
    folder = tmp_path / "shards"
    folder.mkdir()
    np.savez(folder / "part-0.npz", x=_rows(3))
    np.savez(folder / "part-1.npz", x=_rows(2))
    before = digest(folder)
    (folder / "notes.txt").write_text("ignored")
    assert digest(folder) == before
    (folder / "part-1.npz").rename(folder / "part-2.npz")
    assert digest(folder) != before  # the names count: they fix the order
    (folder / "part-2.npz").rename(folder / "part-1.npz")
    assert digest(folder) == before
    np.savez(folder / "part-1.npz", x=_rows(2) + 1)
    assert digest(folder) != before


# --- reading: lazy, in bounded blocks, and an early end is an error ---------------------------------------------


def test_archive_arrays_load_a_member_only_when_indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.savez(tmp_path / "a.npz", x=_rows(4), y=_rows(4, 2))
    loaded: list[str] = []
    real = npz.load
    def counting(member: npz.Member) -> np.ndarray:
        loaded.append(member.key)
        return real(member)

    monkeypatch.setattr(npz, "load", counting)
    arrays = ArchiveArrays(open_fixture_arrays(tmp_path / "a.npz"))
    assert (len(arrays), sorted(arrays), loaded) == (2, ["x", "y"], [])
    np.testing.assert_array_equal(arrays["y"], _rows(4, 2))
    assert arrays["y"] is arrays["y"]  # indexed again: kept, not reloaded
    assert loaded == ["y"]


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_blocks_stream_without_loading_the_whole_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        save: Any) -> None:
    x = _rows(25)
    save(tmp_path / "a.npz", x=x)
    array = open_fixture_arrays(tmp_path / "a.npz")["x"]

    def whole(member: npz.Member) -> np.ndarray:
        raise AssertionError(f"{member.key} loaded whole")

    monkeypatch.setattr(npz, "load", whole)
    blocks = list(array.blocks(4))
    assert [len(b) for b in blocks] == [4] * 6 + [1]
    np.testing.assert_array_equal(np.concatenate(blocks), x)


def test_a_fortran_order_member_reads_right(tmp_path: Path) -> None:
    x = np.asfortranarray(_rows(6, 4))
    _zip(tmp_path / "f.npz", {"x.npy": _npy(x)})
    member = read_members(tmp_path / "f.npz")["x"]
    assert member.fortran and member.data_offset is None  # no row-wise reads of a column-major layout
    array = ShardedArray([member])
    np.testing.assert_array_equal(array.load(), x)
    np.testing.assert_array_equal(np.concatenate(list(array.blocks(4))), x)


def test_stored_reads_are_bounded_by_bytes_not_by_the_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _rows(40)  # 12 bytes a sample
    np.savez(tmp_path / "a.npz", x=x)
    monkeypatch.setattr(npz, "STORED_BLOCK_BYTES", 40)
    reads: list[int] = []
    real = npz.read_stored

    def counting(member: npz.Member, handle: io.FileIO, first: int, count: int) -> np.ndarray:
        reads.append(count)
        return real(member, handle, first, count)

    monkeypatch.setattr(npz, "read_stored", counting)
    chunks = list(aligned_chunks(open_fixture_arrays(tmp_path / "a.npz"), 25))
    assert [len(c["x"]) for c in chunks] == [25, 15]
    np.testing.assert_array_equal(np.concatenate([c["x"] for c in chunks]), x)
    assert max(reads) == 3 and sum(reads) == 40  # 40 bytes hold 3 samples: never a chunk's worth at once


def test_aligned_chunks_cut_shards_and_memory_arrays_in_lockstep(tmp_path: Path) -> None:
    x, t = _rows(23), np.arange(23, dtype=np.float64)
    np.savez(tmp_path / "part-0.npz", x=x[:5])
    np.savez_compressed(tmp_path / "part-1.npz", x=x[5:17])
    np.savez(tmp_path / "part-2.npz", x=x[17:])
    sizes = iter([4, 10, 1, 100])
    asked: list[int] = []

    def rows() -> int:
        asked.append(next(sizes))
        return asked[-1]

    chunks = list(aligned_chunks({"x": open_fixture_arrays(tmp_path)["x"], "t": t}, rows))
    assert [len(c["x"]) for c in chunks] == [len(c["t"]) for c in chunks] == [4, 10, 1, 8]
    assert asked == [4, 10, 1, 100]  # asked once before each chunk
    np.testing.assert_array_equal(np.concatenate([c["x"] for c in chunks]), x)
    np.testing.assert_array_equal(np.concatenate([c["t"] for c in chunks]), t)


def test_an_early_end_is_a_truncated_archive(tmp_path: Path) -> None:
    x = _rows(100)
    np.savez(tmp_path / "a.npz", x=x)
    member = read_members(tmp_path / "a.npz")["x"]
    assert member.data_offset is not None
    # the file is cut after its headers were checked (replaced while the gate runs)
    with open(tmp_path / "a.npz", "r+b") as handle:
        handle.truncate(member.data_offset + 50 * member.row_bytes)
    with io.FileIO(tmp_path / "a.npz", "r") as raw:
        np.testing.assert_array_equal(read_stored(member, raw, 40, 10), x[40:50])
        with pytest.raises(FixtureError, match=r"a.npz: array 'x' ends early \(truncated archive\)"):
            read_stored(member, raw, 45, 10)
    stream = io.BytesIO(x[:3].tobytes())
    np.testing.assert_array_equal(read_rows(member, stream, 2), x[:2])
    with pytest.raises(FixtureError, match=r"array 'x' ends early \(truncated archive\)"):
        read_rows(member, stream, 2)
