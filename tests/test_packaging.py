"""The distribution as a new user gets it: built with `python -m build`, checked by twine, installed in a fresh
virtualenv, and run on the bundled registry from a folder outside the repository.

First without any onnxruntime (the base install: every command that runs a model must say which extra to
install), then with the ``[cpu]`` extra (``quantgate measure`` and ``pytest --quantgate`` must pass).

Needs ``build`` and ``twine`` (dev extra) and a reachable package index. It takes about a minute; set
``QUANTGATE_SKIP_PACKAGING=1`` to skip it (nothing else skips it, CI included).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
SKIP_VAR = "QUANTGATE_SKIP_PACKAGING"
BUNDLED_IDS = ("fusion_mlp_v1", "nr_cnn_v1", "residual_filter_v1")
# what must travel inside the package: the registry schema (loaded at run time) and the PEP 561 marker
PACKAGE_DATA = ("pytest_quantgate/schema/registry.schema.json", "pytest_quantgate/py.typed")
# never copied into the build tree: environments, build output, caches, and the bundled data (not packaged)
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                       ".pytest_cache", "model", "fixtures", "bench")

pytestmark = pytest.mark.skipif(os.environ.get(SKIP_VAR) == "1", reason=f"{SKIP_VAR}=1")


def _env() -> dict[str, str]:
    """Return the environment of a user's shell: nothing of this test run leaks into the child."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "PYTHON", "VIRTUAL_ENV", "GITHUB_", "QUANTGATE_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(*args: str | Path, cwd: Path, clean: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; ``clean`` gives it a user's environment instead of this test run's."""
    return subprocess.run([str(a) for a in args], cwd=cwd, env=_env() if clean else None, capture_output=True,
                          text=True, timeout=600, check=False)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the sdist and, from it, the wheel once per run (xdist workers share one build through a lock)."""
    missing = [m for m in ("build", "twine") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: they come with the dev extra "
                    "(pip install -e '.[cpu,dev,qat]')")
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp is a child of the run's: the parent is shared by the workers
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "quantgate-dist"
    with FileLock(str(shared / "quantgate-dist.lock")):
        if not (out / "done").is_file():
            shutil.rmtree(out, ignore_errors=True)
            # build from a copy: setuptools writes *.egg-info and build/ beside the sources
            source = shared / "quantgate-source"
            shutil.rmtree(source, ignore_errors=True)
            shutil.copytree(ROOT, source, ignore=SOURCE_IGNORE, symlinks=True)
            _ok(_run(sys.executable, "-m", "build", "--outdir", out / "files", source, cwd=source, clean=False))
            (out / "done").touch()
    return out / "files"


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {[f.name for f in found]}"
    return found[0]


def test_wheel_and_sdist_carry_schema_and_marker_and_pass_twine(dist: Path) -> None:
    wheel = _one(dist, "pytest_quantgate-*.whl")
    sdist = _one(dist, "pytest_quantgate-*.tar.gz")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        schema = json.loads(zf.read(PACKAGE_DATA[0]))
    assert set(PACKAGE_DATA) <= names
    assert schema["$schema"].startswith("https://json-schema.org/draft/2020-12")
    assert "quantgate = pytest_quantgate.frontends.plugin" in entry_points  # pytest11: the plugin loads on install
    assert "quantgate = pytest_quantgate.frontends.cli:main" in entry_points
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    assert set(PACKAGE_DATA) <= members

    # onnxruntime only through an extra, one wheel per extra
    requires = metadata.get_all("Requires-Dist") or []
    runtime = [r for r in requires if r.lower().startswith("onnxruntime")]
    assert sorted(runtime) == [
        'onnxruntime-gpu>=1.20; extra == "gpu"',
        'onnxruntime-openvino>=1.20; extra == "openvino"',
        'onnxruntime>=1.20; extra == "cpu"',
    ]
    assert {"cpu", "gpu", "openvino"} <= set(metadata.get_all("Provides-Extra") or [])

    check = _ok(_run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist, cwd=dist, clean=False))
    assert check.count("PASSED") == 2, check


def test_wheel_in_a_fresh_virtualenv_gates_the_bundled_registry_outside_the_repository(
        dist: Path, tmp_path: Path) -> None:
    wheel = _one(dist, "pytest_quantgate-*.whl")
    venv = tmp_path / "venv"
    _ok(_run(sys.executable, "-m", "venv", venv, cwd=tmp_path))
    python, quantgate = venv / "bin" / "python", venv / "bin" / "quantgate"
    project = tmp_path / "project"  # a user's checkout: the bundled registry and fixtures, no source tree
    shutil.copytree(ROOT / "model", project / "model")
    shutil.copytree(ROOT / "fixtures", project / "fixtures")
    assert not project.resolve().is_relative_to(ROOT)

    # 1. the base install: no onnxruntime; commands that run models name the extras, the others still work
    _ok(_run(python, "-m", "pip", "install", "-q", wheel, cwd=tmp_path))
    installed = _ok(_run(python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path)).lower()
    assert "onnxruntime" not in installed, installed
    extras_named = ("pip install 'pytest-quantgate[cpu]'", "pip install 'pytest-quantgate[gpu]'",
                    "pip install 'pytest-quantgate[openvino]'")

    measure = _run(quantgate, "measure", cwd=project)
    assert measure.returncode == 2, measure.stdout + measure.stderr
    assert "quantgate: error: onnxruntime is not installed;" in measure.stderr
    assert all(e in measure.stderr for e in extras_named), measure.stderr

    gate = _run(python, "-m", "pytest", "--quantgate", "-p", "no:cacheprovider", cwd=project)
    assert gate.returncode == pytest.ExitCode.USAGE_ERROR, gate.stdout + gate.stderr
    assert "ERROR: quantgate: onnxruntime is not installed;" in gate.stderr
    assert all(e in gate.stderr for e in extras_named), gate.stderr

    validate = _ok(_run(quantgate, "validate", cwd=project))  # schema, files, hashes: no model is run
    assert "model/registry.json: 4 entries, 0 problem(s)" in validate

    # 2. the [cpu] extra adds exactly one onnxruntime wheel; the gate then passes
    _ok(_run(python, "-m", "pip", "install", "-q", f"{wheel}[cpu]", cwd=tmp_path))
    lines = _ok(_run(python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path)).lower().splitlines()
    assert [line.split("==")[0] for line in lines if line.startswith("onnxruntime")] == ["onnxruntime"]
    _ok(_run(python, "-m", "pip", "check", cwd=tmp_path))
    location = _ok(_run(python, "-c", "import pytest_quantgate; print(pytest_quantgate.__file__)", cwd=project))
    assert Path(location.strip()).is_relative_to(venv), location

    measured = _ok(_run(quantgate, "measure", "--ep", "cpu", "--json", "measure.json", cwd=project))
    doc = json.loads((project / "measure.json").read_text())
    rows = {o["id"]: o for o in (doc["items"] if isinstance(doc, dict) else doc)}
    assert sorted(rows) == sorted(BUNDLED_IDS), measured
    assert {o["verdict"] for o in rows.values()} == {"PASS"}, measured

    gated = _ok(_run(python, "-m", "pytest", "--quantgate", "-p", "no:cacheprovider", "-v", "--quantgate-ep=cpu",
                     "--quantgate-strict-ep", "--quantgate-report=report.json", cwd=project))
    for entry_id in BUNDLED_IDS:
        assert f"model/registry.json::{entry_id}[cpu] PASSED" in gated, gated
    assert "3 passed" in gated, gated
    report = json.loads((project / "report.json").read_text())
    assert sorted(i["id"] for i in report["items"]) == sorted(BUNDLED_IDS)

    # 3. the `quantgate` fixture in a user's own test file: ModelProtos and arrays, and a failure's report
    (project / "test_user.py").write_text(USER_TEST)
    user = _run(python, "-m", "pytest", "-p", "no:cacheprovider", "test_user.py", cwd=project)
    assert user.returncode == pytest.ExitCode.TESTS_FAILED, user.stdout + user.stderr
    assert "1 failed, 1 passed" in user.stdout, user.stdout
    assert "quantgate FAILED: fusion_mlp_v1 [cpu] mode=dynamic: lineage: " in user.stdout, user.stdout


USER_TEST = '''
import numpy as np
import onnx


def test_objects(quantgate):
    feeds = dict(np.load("fixtures/fusion_mlp_v1.npz"))
    result = quantgate.check(onnx.load("model/fusion_mlp_v1.onnx"), onnx.load("model/fusion_mlp_v1.int8.onnx"),
                             feeds=feeds, mode="dynamic", budget_mae=0.01)
    assert result.passed and result.entry_id == "main_graph"  # a ModelProto is named by its graph


def test_the_fp32_as_its_own_sidecar(quantgate):
    quantgate.check("model/fusion_mlp_v1.onnx", "model/fusion_mlp_v1.onnx", feeds="fixtures/fusion_mlp_v1.npz",
                    mode="dynamic")
'''
