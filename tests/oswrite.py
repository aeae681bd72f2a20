"""Make writes into one folder fail for real, the way the OS refuses them: a read-only folder, a full disk.

``python tests/oswrite.py MODE FOLDER -- COMMAND...`` runs COMMAND with FOLDER made unwritable and prints one
JSON object: the command's exit code, stdout and stderr, and every file left in FOLDER with its sha256, read
while the failure is still in place (a tmpfs is gone once its mount namespace ends). Modes:

``readonly-mount``  FOLDER bind-mounted read-only onto itself: writes fail with EROFS.
``full-mount``      FOLDER's files copied onto a tmpfs of their own size and the rest filled: ENOSPC.
``nearfull-mount:N`` the same with N bytes left free: small writes (tempfile's probe) succeed, larger ones fail.
``readonly-chmod``  FOLDER chmod 555 (for root: the child runs without CAP_DAC_OVERRIDE): EACCES.
``full-fsize``      the child's RLIMIT_FSIZE at 1 KiB, so every larger write fails: EFBIG.

The ``-mount`` modes must run in a private mount namespace (``unshare --mount``, which needs CAP_SYS_ADMIN);
nothing outside it sees the mounts. :func:`command` picks them where they work, else the others.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

FSIZE_LIMIT = 1024
DRIVER = Path(__file__).resolve()


def _namespaces_work() -> bool:
    """Return True when a private mount namespace with its own tmpfs can be made here."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    with tempfile.TemporaryDirectory() as probe:
        done = subprocess.run(["unshare", "--mount", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe],
                              capture_output=True, timeout=30)
    return done.returncode == 0


def command(kind: str, folder: Path, argv: list[str]) -> tuple[list[str], str]:
    """Return the command line that runs ``argv`` with ``folder`` unwritable, and the errno name it will see.

    ``kind``: ``readonly``, ``full``, or ``nearfull:N`` (N bytes left free).

    Real mounts where the machine allows them (EROFS, ENOSPC), else permissions and a file-size limit (EACCES,
    EFBIG): each is a real refusal by the kernel, not a patched function.
    """
    if _namespaces_work():
        name, _, free = kind.partition(":")
        mode, code = f"{name}-mount" + (f":{free}" if free else ""), "EROFS" if kind == "readonly" else "ENOSPC"
        return ["unshare", "--mount", sys.executable, str(DRIVER), mode, str(folder), "--", *argv], code
    mode, code = ("readonly-chmod", "EACCES") if kind == "readonly" else ("full-fsize", "EFBIG")
    return [sys.executable, str(DRIVER), mode, str(folder), "--", *argv], code


def _listing(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "filler"}


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _fill(folder: Path) -> None:
    """Write zeros into ``folder/filler`` until the file system refuses more."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while handle.write(b"\0" * 4096):
                pass
        except OSError:
            pass


def _drop_dac() -> None:
    """Take CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH out of the bounding set: root then obeys permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "cannot drop a capability (needs CAP_SETPCAP)")


def _fsize() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def main(argv: list[str]) -> int:
    """Set the failure up, run the command, report as JSON on stdout."""
    mode, folder_text, sep, *child = argv
    assert sep == "--" and child, "usage: oswrite.py MODE FOLDER -- COMMAND..."
    folder = Path(folder_text).resolve()
    preexec: Callable[[], None] | None = None
    restore: Callable[[], None] = lambda: None  # noqa: E731
    if mode == "readonly-mount":
        _mount("--bind", str(folder), str(folder))
        _mount("-o", "remount,bind,ro", str(folder))
    elif mode == "full-mount" or mode.startswith("nearfull-mount:"):
        staging = Path(tempfile.mkdtemp())
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) + (256 << 10)
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
        shutil.copytree(staging, folder, dirs_exist_ok=True)
        shutil.rmtree(staging)
        _fill(folder)
        if mode.startswith("nearfull-mount:"):  # room for tempfile's 4-byte probe, not for a model
            filler = folder / "filler"
            os.truncate(filler, max(0, filler.stat().st_size - int(mode.split(":")[1])))
    elif mode == "readonly-chmod":
        before = folder.stat().st_mode & 0o7777
        folder.chmod(0o555)
        restore = lambda: folder.chmod(before)  # noqa: E731
        preexec = _drop_dac if os.geteuid() == 0 else None
    elif mode == "full-fsize":
        preexec = _fsize
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    try:
        done = subprocess.run(child, capture_output=True, text=True, timeout=600, preexec_fn=preexec)
        listing = _listing(folder)
    finally:
        restore()
    print(json.dumps({"mode": mode, "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                      "files": listing}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
