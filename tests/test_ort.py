"""pytest_quantgate.engine.ort: the one door to onnxruntime names the extras when no wheel, or two wheels, are installed.

The whole-package version of these checks (a wheel installed without any onnxruntime, then with the [cpu] extra)
is in tests/test_packaging.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_quantgate.errors import InputError
from pytest_quantgate.engine.ort import (
    EXTRAS,
    OnnxRuntimeError,
    check_onnxruntime,
    import_onnxruntime,
    installed_wheels,
)

ROOT = Path(__file__).resolve().parents[1]


def _dist_info(site: Path, name: str, version: str) -> None:
    """Write the metadata folder pip leaves for an installed wheel."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_import_returns_the_installed_module() -> None:
    ort = import_onnxruntime()
    assert ort.__name__ == "onnxruntime"
    assert "CPUExecutionProvider" in ort.get_available_providers()
    check_onnxruntime()  # this environment holds exactly one wheel


def test_error_is_an_input_error_naming_every_extra() -> None:
    assert issubclass(OnnxRuntimeError, InputError)
    assert set(EXTRAS.values()) == {"cpu", "gpu", "openvino"}


def test_installed_wheels_reads_normalised_dist_info_names(tmp_path: Path) -> None:
    _dist_info(tmp_path, "onnxruntime-gpu", "1.31.1")
    _dist_info(tmp_path, "onnxruntime", "1.31.1")
    _dist_info(tmp_path, "onnxruntime-extensions", "0.14.0")  # not a runtime wheel: ignored
    _dist_info(tmp_path, "onnx", "1.19.0")
    assert installed_wheels(tmp_path) == ["onnxruntime 1.31.1", "onnxruntime-gpu 1.31.1"]


def _run_isolated(code: str, site: Path | None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with -S (no site-packages), so onnxruntime is only what ``site`` holds."""
    path = [str(ROOT)] + ([str(site)] if site is not None else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


CHECK = (
    "from pytest_quantgate.engine.ort import OnnxRuntimeError, import_onnxruntime\n"
    "try:\n"
    "    import_onnxruntime()\n"
    "except OnnxRuntimeError as exc:\n"
    "    print(exc)\n"
    "    raise SystemExit(3)\n"
    "print('imported')\n"
)


def test_no_onnxruntime_names_the_three_extras() -> None:
    result = _run_isolated(CHECK, None)
    assert result.returncode == 3, result.stderr
    message = result.stdout
    assert message.startswith("onnxruntime is not installed;")
    for command in ("pip install 'pytest-quantgate[cpu]'", "pip install 'pytest-quantgate[gpu]'",
                    "pip install 'pytest-quantgate[openvino]'"):
        assert command in message


def test_two_wheels_in_one_environment_are_refused(tmp_path: Path) -> None:
    """The broken state pip leaves: one `onnxruntime` package folder, metadata of two wheels beside it."""
    package = tmp_path / "onnxruntime"
    package.mkdir()
    (package / "__init__.py").write_text("def get_available_providers():\n    return ['CPUExecutionProvider']\n")
    _dist_info(tmp_path, "onnxruntime", "1.31.1")
    result = _run_isolated(CHECK, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "imported", result.stdout + result.stderr

    _dist_info(tmp_path, "onnxruntime-openvino", "1.24.1")
    result = _run_isolated(CHECK, tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    message = result.stdout
    assert f"several onnxruntime wheels are installed in {tmp_path}: onnxruntime 1.31.1, onnxruntime-openvino 1.24.1" \
        in message
    assert "pip uninstall -y onnxruntime onnxruntime-openvino" in message
    assert "pip install 'pytest-quantgate[openvino]'" in message


def test_broken_module_is_reported_not_raised_raw(tmp_path: Path) -> None:
    """A wheel whose native part fails to load (wrong platform, missing library) gets the same clear error."""
    package = tmp_path / "onnxruntime"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('libonnxruntime.so.1: cannot open shared object file')\n")
    _dist_info(tmp_path, "onnxruntime-gpu", "1.31.1")
    result = _run_isolated(CHECK, tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "onnxruntime is installed but cannot be imported (libonnxruntime.so.1: cannot open shared object file)" \
        in result.stdout


def test_plugin_refuses_to_start_without_onnxruntime(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest --quantgate without any onnxruntime: a usage error at configure time that names the extras."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's plugin, whichever one is installed
    pytester.makefile(".json", registry='{"schema_version": 1, "models": []}')
    pytester.makeconftest("import sys\nsys.modules['onnxruntime'] = None  # as if no wheel were installed\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--quantgate",
                                           "--quantgate-registry=registry.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    stderr = result.stderr.str()
    assert "ERROR: quantgate: onnxruntime is not installed; install exactly one onnxruntime wheel" in stderr
    for command in ("pip install 'pytest-quantgate[cpu]'", "pip install 'pytest-quantgate[gpu]'",
                    "pip install 'pytest-quantgate[openvino]'"):
        assert command in stderr
