"""Writes the OS refuses (a read-only folder, a full disk) are one clean ERROR line, exit 2, and nothing is lost.

Every writer goes through ``fileio.atomic_path``: the refusal becomes a WriteError naming the file meant to be
written (never its hidden ``.partial``), the reason with its errno name and what to do; the partial is removed and
the file that was there stays as it was. The in-process tests make the OS refuse at the two places it does (the
partial cannot be created; the data cannot be flushed) by patching exactly those calls; the subprocess tests at
the end make the kernel itself refuse (``tests/oswrite.py``: a read-only bind mount and a full tmpfs in a private
mount namespace where the machine allows it, else chmod 555 and RLIMIT_FSIZE).
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import modelkit
import oswrite
import pytest
from conftest import GateProject

from pytest_quantgate import fileio
from pytest_quantgate.frontends.cli import main
from pytest_quantgate.errors import WriteError
from pytest_quantgate.fileio import atomic_write_bytes, sha256_file
from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic

Refuse = Callable[..., None]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file in ``folder`` (hidden partials included) with its sha256."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _partials(*folders: Path) -> list[str]:
    return [p.name for folder in folders for p in folder.iterdir() if p.name.endswith(".partial")]


@pytest.fixture
def refuse(monkeypatch: pytest.MonkeyPatch) -> Iterator[Refuse]:
    """Return ``refuse(code, match, at="create")``: the OS refuses writes of targets ``match`` accepts.

    ``at="create"``: the hidden partial cannot be created (a read-only folder; a full directory); the error names
    the partial, as the kernel's does. ``at="flush"``: the data went in but fsync says the disk is full (delayed
    allocation, NFS), so the partial holds bytes that must be removed.
    """

    def install(code: int, match: Callable[[Path], bool], at: str = "create") -> None:
        if at == "create":
            real_new = fileio._new_locked_partial

            def new_partial(target: Path, suffix: str) -> tuple[int, Path]:
                if match(target):
                    partial = target.with_name(f".{target.name}.0123456789ab{suffix}.partial")
                    raise OSError(code, os.strerror(code), str(partial))
                return real_new(target, suffix)

            monkeypatch.setattr(fileio, "_new_locked_partial", new_partial)
            return
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            try:
                name = Path(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                name = Path()
            found = re.fullmatch(r"\.(.+)\.[0-9a-f]{12}.*\.partial", name.name)
            if found and match(name.with_name(found.group(1))):
                raise OSError(code, os.strerror(code))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    yield install


@pytest.fixture
def files(tmp_path: Path, digits_assets: Path) -> GateProject:
    """The gate project's files in a plain temp folder, for tests that run the command line in-process.

    pytester (behind ``project``) drops, when its test ends, every module first imported during the test;
    onnxruntime's quantisation tooling and its native dependencies do not survive being imported twice.
    """
    return GateProject(cast(pytest.Pytester, SimpleNamespace(path=tmp_path)), digits_assets)


def _named(*names: str) -> Callable[[Path], bool]:
    return lambda target: target.name in names


def _clean_one_line(out: str, *expected: str) -> str:
    """Return the one ``error`` line of ``out``; it holds every expected piece and there is no traceback."""
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    lines = [line for line in out.splitlines() if all(piece in line for piece in expected)]
    assert lines, f"no line holds {expected}:\n{out}"
    assert ".partial" not in lines[0], lines[0]
    return lines[0]


# --- the write helpers ---------------------------------------------------------------------------------------


def test_a_partial_that_cannot_be_created_names_the_target_and_leaves_it(tmp_path: Path, refuse: Refuse) -> None:
    target = tmp_path / "m.int8.onnx"
    target.write_bytes(b"old")
    refuse(errno.EROFS, _named("m.int8.onnx"))
    with pytest.raises(WriteError) as info:
        atomic_write_bytes(target, b"new", "int8 sidecar")
    assert str(info.value) == (
        f"{target}: cannot write the int8 sidecar: Read-only file system (EROFS); {tmp_path} is on a read-only file "
        f"system: remount it read-write or write the int8 sidecar elsewhere; the existing file is unchanged")
    assert target.read_bytes() == b"old" and _partials(tmp_path) == []


def test_a_full_disk_at_the_flush_removes_the_partial_and_keeps_the_old_file(tmp_path: Path, refuse: Refuse) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    refuse(errno.ENOSPC, _named("report.json"), at="flush")
    with pytest.raises(WriteError, match=r"^.*report\.json: cannot write the JSON report: No space left on device "
                                         r"\(ENOSPC\); the file system holding .* is full: free space there \(the "
                                         r"JSON report needs about 2\.0 KiB\); the existing file is unchanged$"):
        atomic_write_bytes(target, b"x" * 2048, "JSON report")
    assert target.read_text() == "old" and _partials(tmp_path) == []


@pytest.mark.parametrize(("code", "said"), [
    (errno.EACCES, "Permission denied (EACCES); no permission to write in {f}: make it writable for this user"),
    (errno.EDQUOT, "(EDQUOT); the disk quota for {f} is used up: free space or raise the quota (the file needs"),
    (errno.EFBIG, "File too large (EFBIG); the file is larger than this process may write (ulimit -f)"),
    (errno.ENOTDIR, "Not a directory (ENOTDIR); a path component of {f} is a file, not a folder"),
])
def test_each_reason_says_what_to_do(tmp_path: Path, code: int, said: str) -> None:
    message = str(fileio.write_error(tmp_path / "new.bin", OSError(code, os.strerror(code), "/x/.new.bin.ab.partial"),
                                     size=10))
    assert message.startswith(f"{tmp_path / 'new.bin'}: cannot write the file: ")
    assert said.format(f=tmp_path) in message and message.endswith("; nothing was written")
    assert ".partial" not in message


def test_a_real_refusal_through_a_file_in_the_path(tmp_path: Path) -> None:
    """No patching: a file where the folder should be (the kernel says ENOTDIR or EEXIST)."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(WriteError, match=r"afile/r\.json: cannot write the registry: .*; nothing was written$"):
        atomic_write_bytes(tmp_path / "afile" / "r.json", b"{}", "registry")
    assert (tmp_path / "afile").read_text() == "x"


# --- the command line: every writer exits 2 with one line -------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_pin_on_a_full_disk(files: GateProject, refuse: Refuse, capsys: pytest.CaptureFixture[str]) -> None:
    entry = files.add_sidecar("m")
    registry = files.write([{**entry, "int8_sha256": "ab" * 32}])
    before = _snapshot(files.model)
    refuse(errno.ENOSPC, _named("registry.json"), at="flush")
    code, out = _cli(capsys, "pin", str(registry))
    assert code == 2
    _clean_one_line(out, "quantgate: error: ", f"{registry}: cannot write the registry: No space left on device "
                                              "(ENOSPC)", "the existing file is unchanged")
    assert _snapshot(files.model) == before


@pytest.mark.parametrize("command", ["ptq-dynamic", "ptq-static"])
def test_producers_from_the_registry_into_a_read_only_folder(files: GateProject, refuse: Refuse, command: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    extra: dict[str, Any] = {}
    if command == "ptq-static":
        with np.load(files.fixtures / "digits.npz") as data:
            np.savez(files.fixtures / "m.calib.npz", features=data["features"][:64])
        extra = {"mode": "static", "quant_calibration_set": "m.calib.npz"}
    registry = files.write([files.add_sidecar("m", **extra)])
    before = _snapshot(files.model)
    refuse(errno.EROFS, _named("m.int8.onnx"))
    code, out = _cli(capsys, command, str(registry), "--id", "m", "--fixtures", str(files.fixtures))
    assert code == 2, out
    _clean_one_line(out, f"quantgate: error: {registry}: entry 'm': {files.model / 'm.int8.onnx'}: cannot write "
                         f"the int8 sidecar: Read-only file system (EROFS)", "the existing file is unchanged")
    assert _snapshot(files.model) == before


def test_a_producer_on_a_file_when_the_disk_fills(files: GateProject, refuse: Refuse,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out_path = files.root / "out" / "m.int8.onnx"
    refuse(errno.ENOSPC, _named("m.int8.onnx"), at="flush")
    code, out = _cli(capsys, "ptq-dynamic", str(files.model / "digits.onnx"), "-o", str(out_path))
    assert code == 2
    _clean_one_line(out, f"{out_path}: cannot write the int8 sidecar: No space left on device (ENOSPC)",
                    "needs about", "nothing was written")
    assert list(out_path.parent.iterdir()) == []


def test_a_write_failure_inside_qat_is_not_blamed_on_the_recipe(files: GateProject,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_quantgate.producers import dispatch

    # the module produce() imports now: an in-process pytester run may have dropped an earlier copy of it
    qat = importlib.import_module("pytest_quantgate.producers.qat")
    from pytest_quantgate.io.registry import load_registry

    (files.model / "recipe.py").write_text("")
    registry = load_registry(files.write([files.add_sidecar("m", mode="qat", qat_recipe="recipe.py")]))

    def full(*args: Any, **kwargs: Any) -> Any:
        raise fileio.write_error(files.model / "m.int8.onnx", OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(qat, "quantize_qat", full)
    with pytest.raises(WriteError, match=r"m\.int8\.onnx: cannot write the file: No space left on device"):
        dispatch.produce(registry, registry.entry("m"), files.fixtures, allow_recipes=True)


@pytest.mark.parametrize(("where", "expected"), [
    ("temp", "{tmp}/quantgate-qat-x/int8.onnx: cannot write the producer's working copy: No space left on device "
             "(ENOSPC); the file system holding {tmp}/quantgate-qat-x is full: free space there; working copies go to "
             "the temp folder: set TMPDIR to a folder with space to move them; the sidecar was not touched"),
    ("elsewhere", "entry 'm': QAT recipe {recipe} raised OSError: [Errno 28] No space left on device: '/data/x'"),
])
def test_a_full_temp_folder_under_qat_names_tmpdir_and_a_recipe_failure_stays_the_recipes(
        files: GateProject, monkeypatch: pytest.MonkeyPatch, where: str, expected: str) -> None:
    import tempfile

    from pytest_quantgate.producers import dispatch

    # the module produce() imports now: an in-process pytester run may have dropped an earlier copy of it
    qat = importlib.import_module("pytest_quantgate.producers.qat")
    from pytest_quantgate.producers.base import ProducerError
    from pytest_quantgate.io.registry import load_registry

    (files.model / "recipe.py").write_text("")
    registry = load_registry(files.write([files.add_sidecar("m", mode="qat", qat_recipe="recipe.py")]))
    tmp = tempfile.gettempdir()
    path = f"{tmp}/quantgate-qat-x/int8.onnx" if where == "temp" else "/data/x"

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(qat, "quantize_qat", full)
    with pytest.raises((WriteError, ProducerError)) as info:
        dispatch.produce(registry, registry.entry("m"), files.fixtures, allow_recipes=True)
    assert expected.format(tmp=tmp, recipe=files.model / "recipe.py") in str(info.value)
    assert isinstance(info.value, WriteError) == (where == "temp")


def test_measure_json_on_a_full_disk_keeps_the_report_and_exits_2(files: GateProject, refuse: Refuse,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    registry = files.write([files.add_sidecar("m")])
    report = files.root / "measure.json"
    report.write_text("old")
    refuse(errno.ENOSPC, _named("measure.json"))
    code, out = _cli(capsys, "measure", str(registry), "--fixtures", str(files.fixtures), "--ep", "cpu",
                     "--bootstrap", "100", "--json", str(report))
    assert code == 2
    assert "1 passed, 0 failed, 0 errors, 0 skipped" in out  # the verdicts were printed before the write
    _clean_one_line(out, f"quantgate: error: {report}: cannot write the JSON report: No space left on device")
    assert report.read_text() == "old" and _partials(files.root) == []


def test_measure_cache_that_cannot_be_written_keeps_the_verdict(files: GateProject, refuse: Refuse,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    registry = files.write([files.add_sidecar("m")])
    cache = files.root / "cache"
    refuse(errno.EROFS, lambda target: target.parent == cache)
    code, out = _cli(capsys, "measure", str(registry), "--fixtures", str(files.fixtures), "--ep", "cpu",
                     "--bootstrap", "100", "--cache", "--cache-dir", str(cache))
    assert code == 0, out
    _clean_one_line(out, "quantgate: m [cpu]: the passing result was not cached: ", "cannot write the cache entry: "
                         "Read-only file system (EROFS)")


def test_advise_write_that_fails_changes_neither_the_sidecar_nor_the_registry(
        files: GateProject, refuse: Refuse, capsys: pytest.CaptureFixture[str]) -> None:
    registry = files.write([files.add_sidecar("m")])
    before = _snapshot(files.model)
    refuse(errno.ENOSPC, _named("m.int8.onnx"))  # the registry's partial is written first, then this one fails
    code, out = _cli(capsys, "advise", str(registry), "--id", "m", "--ep", "cpu", "--bootstrap", "100",
                     "--fixtures", str(files.fixtures), "--stages", "dynamic", "--write")
    assert code == 2, out
    _clean_one_line(out, "quantgate advise: error: ", "m.int8.onnx: cannot write the int8 sidecar: No space left "
                         "on device (ENOSPC)")
    assert _snapshot(files.model) == before  # no partial, no scratch folder, the registry as it was


def test_advise_in_a_read_only_registry_folder(files: GateProject, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import tempfile

    registry = files.write([files.add_sidecar("m")])

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.EROFS, "Read-only file system", str(files.model / ".quantgate-advise-m-x1y2"))

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    code, out = _cli(capsys, "advise", str(registry), "--id", "m", "--ep", "cpu", "--fixtures", str(files.fixtures),
                     "--stages", "dynamic")
    assert code == 2
    _clean_one_line(out, "quantgate advise: error: ", "cannot write the scratch folder for the candidates: "
                         "Read-only file system (EROFS)")


# --- pytest --quantgate: regeneration and the reports ----------------------------------------------------------


def test_regen_into_a_read_only_folder_is_an_error_item_and_the_other_entry_passes(project: GateProject,
                                                                                   refuse: Refuse) -> None:
    project.add_sidecar("healthy")
    # the healthy entry's sidecar as its producer builds it, pinned with its build: rebuilt, it matches its pin
    quantize_dynamic(project.model / "healthy.onnx", project.model / "healthy.int8.onnx", DynamicConfig())
    healthy = modelkit.pin({"id": "healthy", "onnx": "healthy.onnx", "quant_mode": "dynamic"}, project.model)
    entries = [project.add_sidecar("locked"), healthy]
    project.write(entries)
    before = sha256_file(project.model / "locked.int8.onnx")
    refuse(errno.EROFS, _named("locked.int8.onnx"))
    result = project.run("--quantgate-ep", "cpu", "--quantgate-regen", "all")
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str() + result.stderr.str()
    line = _clean_one_line(out, "quantgate ERROR: locked [cpu]: ")
    assert line == (
        f"quantgate ERROR: locked [cpu]: {project.model / 'registry.json'}: entry 'locked': cannot rebuild the "
        f"sidecar (regen 'all'): {project.model / 'locked.int8.onnx'}: cannot write the int8 sidecar: Read-only file "
        f"system (EROFS); {project.model} is on a read-only file system: remount it read-write or write the int8 "
        f"sidecar elsewhere; the existing file is unchanged; regen 'never' gates the sidecar on disk as it is")
    assert sha256_file(project.model / "locked.int8.onnx") == before and _partials(project.model) == []


def test_regen_of_a_missing_sidecar_on_a_full_disk(project: GateProject, refuse: Refuse) -> None:
    project.write([project.add_sidecar("lost")])
    (project.model / "lost.int8.onnx").unlink()
    refuse(errno.ENOSPC, _named("lost.int8.onnx"), at="flush")
    result = project.run("--quantgate-ep", "cpu", "--quantgate-regen", "missing")
    result.assert_outcomes(errors=1)
    line = _clean_one_line(result.stdout.str(), "quantgate ERROR: lost [cpu]: ", "entry 'lost': cannot rebuild the "
                           "sidecar (regen 'missing'): ", "lost.int8.onnx: cannot write the int8 sidecar: No space "
                           "left on device (ENOSPC)", "nothing was written")
    assert "regen 'never'" not in line  # there is no sidecar on disk to gate instead
    assert not (project.model / "lost.int8.onnx").exists() and _partials(project.model) == []


def test_a_report_the_disk_has_no_room_for_is_an_error_line_not_an_internal_error(
        project: GateProject, refuse: Refuse) -> None:
    project.write([project.add_sidecar("m")])
    report, html = project.root / "r.json", project.root / "r.html"
    refuse(errno.ENOSPC, _named("r.json"))
    result = project.run("--quantgate-ep", "cpu", "--quantgate-report", str(report), "--quantgate-html", str(html))
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # a report CI reads is missing: the run is not green
    _clean_one_line(result.stdout.str(), f"quantgate ERROR: {report}: cannot write the JSON report: No space left on "
                                         "device (ENOSPC)")
    assert f"quantgate JSON report: {report}" not in result.stdout.str()
    assert html.is_file() and not report.exists()  # the other report was still written


@pytest.mark.parametrize("option", ["--quantgate-report", "--quantgate-html", "--junitxml"])
def test_a_report_folder_that_cannot_be_written_is_refused_before_the_run(project: GateProject, option: str) -> None:
    """Checked when pytest starts, pytest's own --junitxml too (its writer raises a traceback at the end)."""
    project.write([project.add_sidecar("m")])
    result = project.run(f"{option}=/proc/quantgate-r.out")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*quantgate: {option} /proc/quantgate-r.out: cannot write in /proc*"])


def test_a_step_summary_that_cannot_be_appended_to(project: GateProject, monkeypatch: pytest.MonkeyPatch) -> None:
    """No patching of the OS: $GITHUB_STEP_SUMMARY names a folder, which the kernel refuses to open for writing."""
    project.write([project.add_sidecar("m")])
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(project.root))
    result = project.run("--quantgate-ep", "cpu")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    _clean_one_line(result.stdout.str(), f"quantgate ERROR: {project.root}: cannot append the summary to "
                                         "$GITHUB_STEP_SUMMARY: Is a directory")


# --- the kernel refuses: a read-only folder and a full file system, in a subprocess -----------------------------


def _refused(kind: str, folder: Path, argv: list[str], cwd: Path) -> tuple[dict[str, Any], str]:
    """Run ``argv`` with ``folder`` unwritable for real; return the driver's report and the errno name expected."""
    line, code = oswrite.command(kind, folder, argv)
    done = subprocess.run(line, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report, code


@pytest.mark.parametrize("kind", ["readonly", "full"])
def test_ptq_dynamic_registry_entry_when_the_kernel_refuses(files: GateProject, kind: str) -> None:
    registry = files.write([files.add_sidecar("m")])
    before = {k: v for k, v in _snapshot(files.model).items()}
    report, code = _refused(kind, files.model, [sys.executable, "-m", "pytest_quantgate.frontends.cli", "ptq-dynamic",
                                                  str(registry), "--id", "m", "--fixtures", str(files.fixtures)],
                            files.root)
    out = report["stdout"] + report["stderr"]
    assert report["returncode"] == 2, out
    if code == "EFBIG":  # the size limit stops the producer's working copy in the temp folder first
        _clean_one_line(out, f"quantgate: error: {registry}: entry 'm': ", "(EFBIG)")
    else:
        _clean_one_line(out, f"quantgate: error: {registry}: entry 'm': {files.model / 'm.int8.onnx'}: cannot "
                             f"write the int8 sidecar: ", f"({code})", "the existing file is unchanged")
    assert report["files"] == before  # the sidecar's bytes, the registry, and no partial left


@pytest.mark.parametrize("kind", ["readonly", "full"])
def test_pytest_regen_when_the_kernel_refuses(files: GateProject, kind: str) -> None:
    files.write([files.add_sidecar("m")])
    before = _snapshot(files.model)
    report, code = _refused(kind, files.model, [sys.executable, "-m", "pytest", "--quantgate", "-p",
                                                  "no:cacheprovider", "--quantgate-ep", "cpu", "--quantgate-regen",
                                                  "all", "--quantgate-bootstrap", "100"], files.root)
    out = report["stdout"] + report["stderr"]
    assert report["returncode"] == 1, out
    assert "1 error" in out and "passed" not in out.splitlines()[-1]
    _clean_one_line(out, "quantgate ERROR: m [cpu]: ", "entry 'm': cannot rebuild the sidecar (regen 'all'): ",
                    f"({code})")
    assert report["files"] == before


@pytest.mark.parametrize("free", [4096, 16384], ids=["no-room-for-the-working-copy", "no-room-for-ort-copies"])
def test_a_nearly_full_temp_folder_names_tmpdir(files: GateProject, free: int) -> None:
    """A temp folder that passes tempfile's 4-byte probe but has no room for the model's working copies.

    With 4 KiB free our own working copy fails (a WriteError naming it); with 16 KiB it fits, and onnx, writing
    its shape-inferred copy from C++ without reporting the short write, makes onnxruntime fail on a truncated
    model: the error then says the temp folder is the likely cause.
    """
    registry = files.write([files.add_sidecar("m")])
    scratch = files.root / "scratch"
    scratch.mkdir()
    before = _snapshot(files.model)
    report, code = _refused(f"nearfull:{free}", scratch, ["env", f"TMPDIR={scratch}", sys.executable, "-m",
                                                          "pytest_quantgate.frontends.cli", "ptq-dynamic", str(registry), "--id",
                                                          "m"], files.root)
    out = report["stdout"] + report["stderr"]
    assert report["returncode"] == 2, out
    if free == 4096 or code == "EFBIG":  # without mounts, the size limit stops the first working copy
        _clean_one_line(out, f"quantgate: error: {registry}: entry 'm': ", "cannot write the producer's working "
                        "copy: ", f"({code})", "set TMPDIR to a folder with space to move them; the sidecar was not "
                        "touched")
    else:
        _clean_one_line(out, f"quantgate: error: {files.model / 'm.onnx'}: stage ", f"The temp folder {scratch} has "
                        "", "bytes free, less than the quantiser's copies of this model need", "which is the likely "
                        "cause: free space there or set TMPDIR to a folder with space, and retry.")
    assert _snapshot(files.model) == before


def test_pin_into_a_read_only_folder(files: GateProject) -> None:
    registry = files.write([{**files.add_sidecar("m"), "int8_sha256": "ab" * 32}])
    before = _snapshot(files.model)
    report, code = _refused("readonly", files.model,
                            [sys.executable, "-m", "pytest_quantgate.frontends.cli", "pin", str(registry)], files.root)
    out = report["stdout"] + report["stderr"]
    assert report["returncode"] == 2, out
    _clean_one_line(out, f"quantgate: error: {registry}: cannot write the registry: ", f"({code})",
                    "the existing file is unchanged")
    assert report["files"] == before
