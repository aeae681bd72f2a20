"""``quantgate pin``: concurrent pins lose nothing, symlinks stay links, any valid JSON, kills leave no copy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_quantgate.frontends.cli import main
from pytest_quantgate.errors import RegistryError
from pytest_quantgate.fileio import sha256_file
from pytest_quantgate.io.registry import pin_text

REPO = Path(__file__).resolve().parents[1]
ZERO = "0" * 64


def _project(folder: Path, count: int) -> Path:
    """A registry of ``count`` fp32 entries with stale pins (the files are not models: pin only hashes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    models = []
    for i in range(count):
        (folder / f"m{i}.onnx").write_bytes(f"model {i}".encode())
        models.append({"id": f"m{i}", "onnx": f"m{i}.onnx", "sha256": ZERO})
    path = folder / "registry.json"
    path.write_text(json.dumps({"schema_version": 1, "models": models}, indent=2) + "\n")
    return path


def _pinned(path: Path) -> dict[str, str]:
    return {m["id"]: m["sha256"] for m in json.loads(path.read_text())["models"]}


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_pins_all_land(tmp_path: Path, round_: int) -> None:
    count = 8
    registry = _project(tmp_path / "p", count)
    procs = [subprocess.Popen([sys.executable, "-m", "pytest_quantgate.frontends.cli", "pin", str(registry), "--id", f"m{i}"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(count)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
    assert _pinned(registry) == {f"m{i}": sha256_file(registry.parent / f"m{i}.onnx") for i in range(count)}
    assert [p.name for p in registry.parent.iterdir() if p.name.endswith(".partial")] == []


def test_a_symlinked_registry_is_written_through_and_stays_a_link(tmp_path: Path) -> None:
    real = _project(tmp_path / "real", 2)
    link_folder = tmp_path / "elsewhere"
    link_folder.mkdir()
    link = link_folder / "registry.json"
    link.symlink_to(real)
    real.chmod(0o640)
    assert main(["pin", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert _pinned(real) == {"m0": sha256_file(real.parent / "m0.onnx"), "m1": sha256_file(real.parent / "m1.onnx")}
    assert real.stat().st_mode & 0o777 == 0o640  # the file keeps its mode
    assert sorted(p.name for p in link_folder.iterdir()) == ["registry.json"]


def test_names_with_quotes_backslashes_and_unicode_escapes(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    name = 'we"ird\\ é.onnx'
    (folder / name).write_bytes(b"weird")
    (folder / "plain.onnx").write_bytes(b"plain")
    # hand-written: unicode escapes, a description that looks like a hash field, a key given twice, odd spacing
    text = ('{"schema_version":1,"models":[\n'
            '  {"id":"w","description":"\\"sha256\\": \\"x\\"","onnx":"we\\"ird\\\\ \\u00e9.onnx"},\n'
            '  {"id" : "p" , "onnx" : "plain.onnx" , "sha256":"' + ZERO + '", "sha256" : "' + ZERO + '"}\n'
            ']}\n')
    registry = folder / "registry.json"
    registry.write_text(text)
    assert main(["pin", str(registry)]) == 0
    after = registry.read_text()
    data = json.loads(after)
    assert data["models"][0]["onnx"] == name and data["models"][0]["description"] == '"sha256": "x"'
    assert _pinned(registry) == {"w": sha256_file(folder / name), "p": sha256_file(folder / "plain.onnx")}
    assert '"we\\"ird\\\\ \\u00e9.onnx"' in after  # the escapes as written, untouched
    assert after.count("\n") == text.count("\n")  # the inserted hash joined the one-line entry


def test_pin_text_refuses_an_edit_that_would_change_anything_else() -> None:
    text = '{"schema_version": 1, "models": [{"id": "a", "onnx": "a.onnx"}]}'
    with pytest.raises(RegistryError, match="no entry with id 'b'"):
        pin_text(text, {"b": {"sha256": ZERO}}, Path("r.json"))
    assert json.loads(pin_text(text, {"a": {"sha256": ZERO}}, Path("r.json")))["models"][0]["sha256"] == ZERO


# Runs `quantgate pin` with fsync made to hang, so the pin is inside its atomic write (partial complete, not
# yet renamed) when the parent kills it.
_KILLED_PIN = textwrap.dedent("""
    import os, sys, time
    real_fsync = os.fsync
    def hang(fd):
        real_fsync(fd)
        print("WRITING", flush=True)
        time.sleep(120)
    os.fsync = hang
    from pytest_quantgate.frontends.cli import main
    main(["pin", sys.argv[1]])
""")


def test_a_killed_pin_leaves_the_old_registry_and_the_next_pin_sweeps_its_partial(tmp_path: Path) -> None:
    registry = _project(tmp_path / "p", 3)
    before = registry.read_text()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PIN, str(registry)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while "WRITING" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert registry.read_text() == before  # old text, whole
    partials = [p for p in registry.parent.iterdir() if p.name.endswith(".partial")]
    assert len(partials) == 1 and partials[0].name.startswith(".registry.json.")
    # the dead pin's lock went with its process: the next pin neither waits nor leaves the partial
    assert main(["pin", str(registry)]) == 0
    assert [p for p in registry.parent.iterdir() if p.name.endswith(".partial")] == []
    assert set(_pinned(registry).values()) != {ZERO}
