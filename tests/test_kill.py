"""Writers killed with a real SIGKILL at many moments never leave a torn file, and the next run sweeps them.

The child processes write through :func:`pytest_quantgate.fileio.atomic_path`; the parent kills them with
SIGKILL at fixed and seeded-random delays, then checks the target (old bytes or new bytes, nothing else) and
that a sweep (the next writer, or :func:`sweep_partials`) leaves no partial behind. A live writer's partial is
never swept.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_quantgate.fileio import PARTIAL_SUFFIX, atomic_write_bytes, sweep_partials

REPO = Path(__file__).resolve().parents[1]
CHUNK = 1 << 20
CHUNKS = 48  # 48 MiB

# Writes CHUNKS MiB of a known pattern to argv[1] atomically, pausing between chunks so that the kill delays
# spread over import, write and rename rather than all landing after a tmpfs write finished.
_WRITER = textwrap.dedent(f"""
    import sys, time
    from pathlib import Path
    from pytest_quantgate.fileio import atomic_path
    target = Path(sys.argv[1])
    with atomic_path(target) as tmp, open(tmp, "r+b") as handle:
        print("partial", flush=True)
        for i in range({CHUNKS}):
            handle.write(bytes([i % 251]) * {CHUNK})
            time.sleep(0.02)
    print("done", flush=True)
""")


def _new_bytes_digest() -> str:
    digest = hashlib.sha256()
    for i in range(CHUNKS):
        digest.update(bytes([i % 251]) * CHUNK)
    return digest.hexdigest()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(PARTIAL_SUFFIX))


def _start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


# seeded random delays plus fixed ones that cover: before the import finished, mid-write, and after the rename
_DELAYS = [0.0, 0.05, 0.15, 0.3, 0.6, 1.0, 2.5] + [round(random.Random(seed).uniform(0.0, 2.0), 3) for seed in range(8)]


@pytest.mark.parametrize("delay", _DELAYS)
def test_sigkill_at_any_time_leaves_old_or_new_bytes_and_the_next_run_sweeps(tmp_path: Path, delay: float) -> None:
    target = tmp_path / "m.int8.onnx"
    target.write_bytes(b"old sidecar")
    old = _digest(target)
    child = _start(_WRITER, str(target))
    time.sleep(delay)
    _kill(child)
    assert _digest(target) in (old, _new_bytes_digest())  # never torn
    # the next writer of the folder (here an unrelated file) sweeps the dead writer's partial first
    atomic_write_bytes(tmp_path / "other.json", b"{}")
    assert _partials(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "other.json"]


@pytest.mark.parametrize("chunks_written", [0, 1, 17])
def test_a_kill_mid_write_leaves_a_partial_that_sweep_removes(tmp_path: Path, chunks_written: int) -> None:
    """Kill exactly while the partial exists (after the child said so), so the leftover case is always hit."""
    target = tmp_path / "registry.json"
    target.write_text("{}")
    script = textwrap.dedent(f"""
        import sys, time
        from pytest_quantgate.fileio import atomic_path
        with atomic_path(sys.argv[1]) as tmp, open(tmp, "r+b") as handle:
            handle.write(b"x" * {CHUNK} * {chunks_written})
            handle.flush()
            print("partial", flush=True)
            time.sleep(60)
    """)
    child = _start(script, str(target))
    assert child.stdout is not None and child.stdout.readline().strip() == "partial"
    (partial,) = _partials(tmp_path)
    assert partial.stat().st_size == CHUNK * chunks_written
    _kill(child)
    assert target.read_text() == "{}"
    assert sweep_partials(tmp_path) == [partial]
    assert _partials(tmp_path) == []


def test_a_live_writers_partial_is_never_swept_however_old(tmp_path: Path) -> None:
    target = tmp_path / "m.int8.onnx"
    script = textwrap.dedent("""
        import sys
        from pytest_quantgate.fileio import atomic_path
        with atomic_path(sys.argv[1]) as tmp, open(tmp, "r+b") as handle:
            handle.write(b"new")
            handle.flush()
            print("partial", flush=True)
            sys.stdin.readline()  # hold the partial until the parent says go
        print("done", flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline().strip() == "partial"
    (partial,) = _partials(tmp_path)
    os.utime(partial, (0, 0))  # 1970: an age rule would take it for a leftover
    assert sweep_partials(tmp_path) == []
    atomic_write_bytes(tmp_path / "other", b"1")  # another writer in the same folder leaves it alone too
    assert partial.exists()
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "done"
    assert child.wait(timeout=30) == 0
    assert target.read_bytes() == b"new" and _partials(tmp_path) == []


def test_writers_and_sweepers_racing_in_one_folder_lose_nothing(tmp_path: Path) -> None:
    """Four processes each write 40 files atomically into one folder; every write sweeps the folder first."""
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from pytest_quantgate.fileio import atomic_write_bytes
        folder, name = Path(sys.argv[1]), sys.argv[2]
        for i in range(40):
            atomic_write_bytes(folder / f"{name}-{i}.bin", f"{name}:{i}".encode() * 1000)
    """)
    children = [_start(script, str(tmp_path), f"w{n}") for n in range(4)]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    for n in range(4):
        for i in range(40):
            assert (tmp_path / f"w{n}-{i}.bin").read_bytes() == f"w{n}:{i}".encode() * 1000
    assert _partials(tmp_path) == []


def test_sweep_leaves_symlinks_and_other_files_alone(tmp_path: Path) -> None:
    (tmp_path / "outside").write_text("keep")
    (tmp_path / ".x.partial").symlink_to(tmp_path / "outside")
    (tmp_path / "notes.partial").write_text("not hidden: not ours")
    (tmp_path / ".dir.partial").mkdir()
    assert sweep_partials(tmp_path) == []
    assert (tmp_path / "outside").read_text() == "keep"
    assert sweep_partials(tmp_path / "missing") == []
