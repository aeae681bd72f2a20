"""Read files safely and write them atomically: the one place that touches bytes on disk for the gate.

Reading: :func:`check_regular` and :func:`read_bounded` refuse FIFOs, devices, sockets and folders without
ever blocking on them (``stat`` first, then an ``O_NONBLOCK`` open checked again with ``fstat``), and never read
more than a stated cap.

Writing: :func:`atomic_path` writes a hidden ``.<name>.<random><suffix>.partial`` beside the target and renames
it onto the target only when complete, so the target is always either the old file or the new one, never a torn
one. Any OS failure on the way (a read-only folder, a full disk, a size limit) removes the partial and raises
:class:`~.errors.WriteError` naming the target, not the partial, with the reason and what to do.
A writer killed with SIGKILL cannot remove its partial, so every partial carries proof of life instead: its writer
holds an exclusive ``flock`` on it from creation until the rename. :func:`sweep_partials` deletes the
partials whose lock it can take -- their writer is dead, however recently it died -- and leaves live writers'
partials alone. No age rule is involved. Locks are per open file description, so the check also holds
between threads and between two opens in one process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, WriteError

_CHUNK = 1 << 20
PARTIAL_SUFFIX = ".partial"
# 16 MiB: the largest text file (a registry) the gate reads whole; a 10 000-entry registry is about 5 MiB
DEFAULT_READ_CAP = 16 * 1024 * 1024


def lock_path_for(path: str | os.PathLike[str]) -> Path:
    """Return the lock file that serialises writers of ``path`` (keyed by its real path, symlinks followed).

    Locks live in the temp dir, not beside the file, so they never show up in the user's git status.
    """
    digest = hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / "quantgate-locks"
    folder.mkdir(exist_ok=True)
    return folder / f"{digest}.lock"


def check_writable(path: str | os.PathLike[str], option: str, *, create_folders: bool = False) -> Path:
    """Return ``path`` when a file can be written there; raise InputError naming ``option`` otherwise.

    Run before the work, so that a report path that cannot be written fails in a second, not after an hour
    of measuring. The check creates and removes a probe file in the target's folder (or, with
    ``create_folders``, in its nearest existing ancestor, the folders being made by the writer later):
    permission bits alone do not tell (root, read-only mounts, ACLs). An existing target must be a regular file.
    """
    text = os.fspath(path)
    if not text.strip():
        raise InputError(f"{option}: expected a file path, got {text!r}")
    target = Path(text)
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    except (OSError, ValueError) as exc:
        raise InputError(f"{option} {text}: cannot use this path: {_os_reason(exc)}") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise InputError(f"{option} {text}: is a {file_kind(info.st_mode)}, not a regular file")
    folder = target.parent
    if create_folders:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"{option} {text}: the folder {folder} {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantgate-probe-", dir=folder)
    except OSError as exc:
        raise InputError(f"{option} {text}: cannot write in {folder}: {_os_reason(exc)}") from None
    os.close(fd)
    os.unlink(probe)
    return target


def writable_file(text: str) -> Path:
    """argparse ``type=`` for an output file in an existing folder (reports): argparse names the option."""
    return _argparse_checked(text, create_folders=False)


def creatable_file(text: str) -> Path:
    """argparse ``type=`` for an output file whose missing folders the writer creates (``ptq-* -o``)."""
    return _argparse_checked(text, create_folders=True)


def _argparse_checked(text: str, *, create_folders: bool) -> Path:
    import argparse

    try:
        return check_writable(text, "path", create_folders=create_folders)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("path ").removeprefix("path: ")) from None


def file_kind(mode: int) -> str:
    """Return a human name for the type of a file mode (``regular file``, ``FIFO``, ``directory``, ...)."""
    kinds = (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def check_regular(path: str | os.PathLike[str], what: str, error: type[Exception] = InputError) -> os.stat_result:
    """Return ``os.stat(path)`` when it is a regular file (symlinks followed); raise ``error`` naming its kind.

    ``stat`` never opens the file, so a FIFO without a writer or a device is refused without blocking.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL byte
        raise error(f"{path}: cannot read the {what}: {_os_reason(exc)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: the {what} is a {file_kind(info.st_mode)}, not a regular file")
    return info


def read_bounded(path: str | os.PathLike[str], limit: int, what: str, error: type[Exception] = InputError) -> bytes:
    """Return the bytes of a regular file of at most ``limit`` bytes; raise ``error`` naming the path otherwise.

    The file is opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor, so a file swapped
    for a FIFO or device after the first check is still refused without blocking; the read stops at
    ``limit + 1`` bytes whatever the size claims (files that grow while read, ``/proc`` files).
    """
    check_regular(path, what, error)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {_os_reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: the {what} is a {file_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise error(f"{path}: the {what} is {info.st_size} bytes, over the {limit}-byte cap")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise error(f"{path}: the {what} is over the {limit}-byte cap (it grew while being read)")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {_os_reason(exc)}") from None
    finally:
        os.close(fd)


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _folder_lock(folder: Path, operation: int) -> Iterator[None]:
    """Hold ``flock(operation)`` on the folder itself (no lock file): creators share it, a sweep takes it alone.

    This closes the window between creating a partial and locking it, in which a sweep would take the new,
    still unlocked partial for a dead writer's. Filesystems without ``flock`` on folders fall back to no lock.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _new_locked_partial(target: Path, suffix: str) -> tuple[int, Path]:
    """Create ``.<name>.<random><suffix>.partial`` beside ``target`` and lock it; return its fd and path."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    with _folder_lock(target.parent, fcntl.LOCK_SH):
        for _ in range(100):
            tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{suffix}{PARTIAL_SUFFIX}")
            try:
                fd = os.open(tmp, flags, 0o600)
            except FileExistsError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)  # fresh file: nobody else can hold it, so this never waits
            return fd, tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target))


@contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "", *, what: str = "file",
                size: int | None = None) -> Iterator[Path]:
    """Yield a locked partial file beside ``target``; rename it onto ``target`` only when the body succeeds.

    The partial lives in the target's folder, so the final ``os.replace`` is a same-filesystem rename (atomic
    on POSIX): readers see the old file or the new one, never a torn one. On an exception (KeyboardInterrupt
    included) the partial is removed; after a SIGKILL it stays until the next :func:`sweep_partials` of its
    folder, which every ``atomic_path`` runs first.
    Write into the yielded path in place (``open(path, "wb")``, ``shutil.copyfile``): replacing it with another
    file would drop the lock. The name keeps ``suffix`` (e.g. ``.onnx``) for writers that dispatch on it.
    A symlinked ``target`` is replaced by a plain file; resolve it first to write through the link.
    An ``OSError`` of the folder, the partial or the body becomes a :class:`WriteError` naming ``target`` as
    ``what`` (``size``, when known, is quoted to a full disk).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_partials(target.parent)  # every writer clears what dead writers left in the folder it writes to
        fd, tmp = _new_locked_partial(target, suffix)
    except OSError as exc:
        raise write_error(target, exc, what, size) from None
    try:
        yield tmp
        os.fsync(fd)
        # the partial is created 0600; give the file the mode of the old file, or the one a plain open() gives
        try:
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.fchmod(fd, mode)
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(target, exc, what, size) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # the lock goes with the last descriptor, after the rename


# what the OS said, as the errno's name and what to do about it; {folder} is the folder written to
_REMEDIES: dict[int, str] = {
    errno.EROFS: "{folder} is on a read-only file system: remount it read-write or write the {what} elsewhere",
    errno.EACCES: "no permission to write in {folder}: make it writable for this user or write the {what} elsewhere",
    errno.EPERM: "the operation is not permitted in {folder}: make it writable for this user or write the {what} "
                 "elsewhere",
    errno.ENOSPC: "the file system holding {folder} is full: free space there{need}",
    errno.EDQUOT: "the disk quota for {folder} is used up: free space or raise the quota{need}",
    errno.EFBIG: "the {what} is larger than this process may write (ulimit -f) or the file system allows{need}",
    errno.ENOTDIR: "a path component of {folder} is a file, not a folder",
    errno.EIO: "the device holding {folder} reported an I/O error: check it",
}


def write_error(target: str | os.PathLike[str], exc: OSError, what: str = "file", size: int | None = None, *,
                hint: str | None = None) -> WriteError:
    """Return the WriteError for ``exc``, met while writing ``target``: the file, the reason, what to do.

    The message names ``target`` itself, never the hidden partial or the folder probe the OS named, and ends
    with the state of ``target`` (unchanged, or not written), or with ``hint`` where that says more.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    code = exc.errno if isinstance(exc.errno, int) else 0
    name = errno.errorcode.get(code)
    reason = (exc.strerror or os.strerror(code)) if code else (str(exc) or type(exc).__name__)
    if name:
        reason += f" ({name})"
    need = f" (the {what} needs about {_bytes(size)})" if size else ""
    remedy = _REMEDIES.get(code, "").format(folder=folder, what=what, need=need)
    state = hint or ("the existing file is unchanged" if _exists(target) else "nothing was written")
    return WriteError(f"{target}: cannot write the {what}: {reason}" + (f"; {remedy}" if remedy else "")
                      + f"; {state}")


def _bytes(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a folder that cannot be searched: say nothing was written, the safer claim to check
        return False


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (the folder entry), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def sweep_partials(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the partial files of dead writers in ``folder``; return what was deleted.

    A partial is a dead writer's exactly when its lock can be taken: a live writer holds it until its rename.
    Files are checked again after locking (same inode, still a regular file), so a partial renamed away or
    replaced meanwhile is never touched. Safe to call at any time, from any number of processes.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    with _folder_lock(folder, fcntl.LOCK_EX):
        try:
            candidates = sorted(p for p in folder.iterdir()
                                if p.name.startswith(".") and p.name.endswith(PARTIAL_SUFFIX))
        except OSError:
            return removed
        for candidate in candidates:
            if _remove_if_unlocked(candidate):
                removed.append(candidate)
    return removed


def _remove_if_unlocked(path: Path) -> bool:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # gone, a symlink (O_NOFOLLOW), or not ours to open: leave it
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its writer is alive
            return False
        current = os.stat(path, follow_symlinks=False)
        if (current.st_dev, current.st_ino) != (info.st_dev, info.st_ino):
            return False
        path.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, what: str = "file") -> None:
    """Write ``data`` to ``target`` atomically; raise WriteError naming ``target`` as ``what`` on an OS failure."""
    with atomic_path(target, what=what, size=len(data)) as tmp, open(tmp, "r+b") as handle:
        handle.write(data)


def atomic_write_text(target: str | os.PathLike[str], text: str, what: str = "file") -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically; raise WriteError naming ``target`` as ``what``."""
    atomic_write_bytes(target, text.encode("utf-8"), what)


# --- scratch folders: the one scheme for working files (producers, diagnosis, advise) ------------------------------

OWNER_LOCK = "owner.lock"
# a folder whose owner has not taken its lock yet is left alone this long (its pid may live in another container)
SCRATCH_GRACE_S = 60.0


def scratch_prefix(label: str, *, hidden: bool = False) -> str:
    """Return the name prefix of ``label``'s scratch folders: ``quantgate-<label>-`` (``.`` first when hidden)."""
    safe = "".join(c if c.isalnum() or c in "_." else "_" for c in label)[:40]
    return f"{'.' if hidden else ''}quantgate-{safe}-"


def _pid_alive(pid: int) -> bool:
    import sys

    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C_EVENT there: trust the lock file alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, owned by someone else
        return True
    return True


def sweep_scratch(base: Path, label: str | None = None, *, hidden: bool = False) -> list[Path]:
    """Remove scratch folders under ``base`` (of ``label``, or of every label) whose owner is gone; return them.

    An owner holds a lock on ``owner.lock`` inside its folder while it lives, so a folder whose lock can be taken
    belongs to a killed run; one without a lock file is removed only when its pid is not running and it is older
    than SCRATCH_GRACE_S. A name without an owner pid is never touched.
    """
    import re
    import shutil
    import time

    from filelock import FileLock, Timeout

    start = scratch_prefix(label, hidden=hidden) if label is not None else scratch_prefix("", hidden=hidden)[:-1]
    shape = re.compile(re.escape(start) + (r"(\d+)-.*" if label is not None else r"[A-Za-z0-9_.]+-(\d+)-.*"))
    removed: list[Path] = []
    try:
        entries = sorted(base.glob(start + "*"))
    except OSError:
        return removed
    for entry in entries:
        found = shape.fullmatch(entry.name)
        if found is None or entry.is_symlink() or not entry.is_dir():
            continue
        lock_path = entry / OWNER_LOCK
        if lock_path.exists():
            lock = FileLock(str(lock_path), timeout=0)
            try:
                lock.acquire()
            except (Timeout, OSError):
                continue  # held: the owner is alive
            try:
                shutil.rmtree(entry, ignore_errors=True)
            finally:
                lock.release()
        else:
            try:
                young = time.time() - entry.stat().st_mtime < SCRATCH_GRACE_S
            except OSError:
                continue
            if young or _pid_alive(int(found.group(1))):
                continue
            shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


@contextmanager
def scratch_folder(label: str, base: Path | None = None, *, hidden: bool = False, what: str = "working folder",
                   hint: str | None = None) -> Iterator[tuple[Path, int]]:
    """Yield (a private folder owned by this process, how many dead owners' folders were swept); remove it after.

    The folder ``<base>/quantgate-<label>-<pid>-<random>`` (base: the temp dir) holds a locked ``owner.lock`` while
    it is in use, so a run killed with SIGKILL leaves a folder the next scratch folder made in ``base`` removes.
    A folder that cannot be made is a WriteError naming it.
    """
    import shutil
    import tempfile

    from filelock import FileLock

    root = Path(base) if base is not None else Path(tempfile.gettempdir())
    prefix = scratch_prefix(label, hidden=hidden)
    swept = len(sweep_scratch(root, hidden=hidden))  # every label's: whoever runs next cleans up after a kill
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
    except OSError as exc:
        raise write_error(root / f"{prefix}*", exc, what, hint=hint) from None
    lock = FileLock(str(path / OWNER_LOCK), timeout=0)
    try:
        lock.acquire()
        yield path, swept
    finally:
        with contextlib.suppress(Exception):
            lock.release()
        shutil.rmtree(path, ignore_errors=True)
