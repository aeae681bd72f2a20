"""The quantgate hook as another repository gets it: pre-commit clones this repository and builds the hook itself.

``tests/test_precommit.py`` runs the manifest's hook as a local ``language: system`` hook with this interpreter. Here
a user's ``.pre-commit-config.yaml`` names the hook exactly as docs/ci.md shows (``repo``, ``rev``, ``id``, and no
``additional_dependencies``), so the real pre-commit clones a commit of this working tree, builds the hook's
virtualenv with ``pip install . <the manifest's additional_dependencies>`` and runs ``quantgate pre-commit`` from that
virtualenv on every ``git commit``. The scenarios share one build (one ``PRE_COMMIT_HOME`` per test run).

It needs the package index that ``make setup-dev`` installs from: an index that cannot be reached fails it, with
pip's message. ``QUANTGATE_SKIP_PACKAGING=1`` skips it, as it skips the other tests that install this package into
a fresh environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import modelkit
import onnx
import pytest
from conftest import affine
from filelock import FileLock
from test_precommit import HookRepo

pytest.importorskip("pre_commit", reason="pre-commit is not installed (dev extra)")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
SKIP_VAR = "QUANTGATE_SKIP_PACKAGING"
# never copied into the hook's source repository: environments, build output and caches (the snapshot's own
# `git add -A` then applies the copied .gitignore, so it commits what a commit of this working tree would hold)
SNAPSHOT_IGNORE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                         ".pytest_cache", ".mypy_cache", ".ruff_cache", ".quantgate-cache")
# pip in the hook's virtualenv must see this user's pip configuration and cache (the index `make setup-dev` uses),
# so HOME stays the user's; git must still not read the user's configuration (hooks, signing, templates)
USER_ENV = {"HOME": str(Path.home()), "GIT_CONFIG_GLOBAL": os.devnull}
# a user's shell: nothing of this test run may reach the hook (a PYTHONPATH could lend it this venv's onnxruntime)
LEAKY_PREFIXES = ("PYTHON", "VIRTUAL_ENV", "PYTEST_", "QUANTGATE_")
REPIN = "if the file change is intended, re-pin with `quantgate pin "
OPENVINO_WHEEL = "onnxruntime-openvino>=1.20"

pytestmark = pytest.mark.skipif(os.environ.get(SKIP_VAR) == "1", reason=f"{SKIP_VAR}=1")


@dataclass(frozen=True)
class HookSource:
    """A commit of this working tree that pre-commit clones, and the store holding the hook's built environment."""

    path: Path
    rev: str
    store: Path

    def config(self, **hook: Any) -> str:
        """Return a user's .pre-commit-config.yaml naming the quantgate hook as docs/ci.md shows, plus ``hook``."""
        return str(yaml.safe_dump({"repos": [{"repo": str(self.path), "rev": self.rev,
                                              "hooks": [{"id": "quantgate", **hook}]}]}))


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **USER_ENV, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _snapshot(dest: Path) -> str:
    """Commit a copy of this working tree, uncommitted changes included, to a new repository; return the sha."""
    shutil.copytree(ROOT, dest, ignore=SNAPSHOT_IGNORE, symlinks=True)
    _git(dest, "init", "-q", "-b", "main")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "snapshot of the working tree under test")
    return _git(dest, "rev-parse", "HEAD").strip()


def _user_shell(env: dict[str, str]) -> dict[str, str]:
    """Return ``env`` without the variables through which this test run could reach a child process."""
    return {k: v for k, v in env.items() if not k.startswith(LEAKY_PREFIXES)}


def _user_repo(root: Path, assets: Path, source: HookSource, config: str) -> HookRepo:
    """Return a HookRepo whose pre-commit configuration is ``config`` and whose environment is a user's shell."""
    repo = HookRepo(root, assets, source.store, config=config, env=USER_ENV)
    repo.env = _user_shell(repo.env)
    return repo


def _install_hooks(repo: HookRepo) -> float:
    """Build the hook environments of the repository's configuration; return seconds, fail with pip's message."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pre_commit", "install-hooks"], cwd=repo.root, env=repo.env,
                            capture_output=True, text=True, timeout=600, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        log = Path(repo.env["PRE_COMMIT_HOME"]) / "pre-commit.log"
        tail = log.read_text(errors="replace")[-6000:] if log.is_file() else "(no pre-commit.log)"
        pytest.fail("pre-commit could not build the quantgate hook's environment (pip install of this repository and "
                    "its additional_dependencies); it needs the package index that `make setup-dev` installs from "
                    f"({SKIP_VAR}=1 skips this test).\n{result.stdout}{result.stderr}\n{tail}", pytrace=False)
    return seconds


def _hook_envs(store: Path) -> dict[tuple[str, ...], Path]:
    """Map the additional_dependencies of each hook virtualenv in the store (pre-commit's install state) to it."""
    envs = {}
    for state in store.glob("repo*/py_env-*/.install_state_v1"):
        envs[tuple(json.loads(state.read_text())["additional_dependencies"])] = state.parent
    return envs


def _distributions(env: Path) -> dict[str, str]:
    """Return the environment's installed distributions, normalised name to version."""
    listed = subprocess.run([env / "bin" / "python", "-m", "pip", "list", "--format=json"],
                            env=_user_shell(dict(os.environ)), capture_output=True, text=True, check=True).stdout
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(listed)}


def _manifest_hook() -> dict[str, Any]:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    return dict(next(h for h in hooks if h["id"] == "quantgate"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, digits_assets: Path) -> HookSource:
    """Snapshot the working tree and build the hook's default environment once per run (xdist workers share both)."""
    if shutil.which("git") is None:
        pytest.fail("git is not installed; pre-commit needs it")
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp is a child of the run's: the parent is shared by the workers, so they
    # share one snapshot (the same repo and rev) and one store (pre-commit locks it while it builds)
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with FileLock(str(shared / "quantgate-hook-source.lock")):
        path, rev_file = shared / "quantgate-hook-source", shared / "quantgate-hook-source.rev"
        if not rev_file.is_file():
            shutil.rmtree(path, ignore_errors=True)
            rev_file.write_text(_snapshot(path))
        found = HookSource(path, rev_file.read_text(), shared / "quantgate-pre-commit-home")
        # docs/ci.md's configuration: no additional_dependencies, so the manifest's default decides the wheel
        scratch = _user_repo(tmp_path_factory.mktemp("install"), digits_assets, found, found.config())
        seconds = _install_hooks(scratch)
    print(f"pre-commit built (or found) the hook environment in {seconds:.1f} s")
    return found


def test_manifest_default_is_the_cpu_extra() -> None:
    # the hook's environment must get exactly the wheel `pip install pytest-quantgate[cpu]` gets
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    hook = _manifest_hook()
    assert hook["language"] == "python" and hook["entry"] == "quantgate pre-commit"
    assert hook["additional_dependencies"] == extras["cpu"]


def test_hook_environment_has_the_package_and_the_cpu_wheel(source: HookSource) -> None:
    default = tuple(_manifest_hook()["additional_dependencies"])
    env = _hook_envs(source.store)[default]
    installed = _distributions(env)
    assert "pytest-quantgate" in installed, installed
    assert [name for name in installed if name.startswith("onnxruntime")] == ["onnxruntime"], installed


def test_unpinned_sidecar_is_refused_until_pinned(source: HookSource, tmp_path: Path, digits_assets: Path) -> None:
    repo = _user_repo(tmp_path / "repo", digits_assets, source, source.config(verbose=True))
    before = repo.head()
    sidecar = repo.model / "digits_b.int8.onnx"
    onnx.save(affine(onnx.load(str(sidecar)), 1.0, 0.0), sidecar)  # new bytes, same outputs: healthy but unpinned
    result, _ = repo.commit("a new sidecar, not pinned")
    out = result.stdout + result.stderr
    assert result.returncode != 0 and repo.head() == before, out
    assert "onnxruntime is not installed" not in out
    assert "quantgate ERROR: digits_b [cpu]" in out and REPIN in out and "--id digits_b`" in out, out
    assert "- exit code: 2" in out, out  # bad input, as `quantgate measure` reports it

    pinned = subprocess.run([sys.executable, "-m", "pytest_quantgate.frontends.cli", "pin", "--id", "digits_b"], cwd=repo.root,
                            capture_output=True, text=True, check=False)
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    result, seconds = repo.commit("the new sidecar, pinned")
    out = result.stdout + result.stderr
    assert result.returncode == 0 and repo.head() != before, out
    assert "quantgate pre-commit: gating digits_b on cpu" in out and "gating digits_a" not in out, out
    assert "1 passed, 0 failed, 0 errors, 0 skipped" in out, out
    print(f"the accepted commit took {seconds:.1f} s")


def test_sidecar_that_breaks_its_budget_is_refused_with_exit_1(source: HookSource, tmp_path: Path,
                                                               digits_assets: Path) -> None:
    repo = _user_repo(tmp_path / "repo", digits_assets, source, source.config())
    before = repo.head()
    sidecar = repo.model / "digits_b.int8.onnx"
    onnx.save(affine(onnx.load(str(sidecar)), 1.5, 2.0), sidecar)
    repo.entries[1] = modelkit.pin(repo.entries[1], repo.model)  # pinned: intended, but over its budget
    repo.write_registry()
    result, _ = repo.commit("a worse sidecar")
    out = result.stdout + result.stderr
    assert result.returncode != 0 and repo.head() == before, out
    assert "quantgate FAILED: digits_b [cpu] mode=dynamic:" in out, out
    assert "0 passed, 1 failed, 0 errors, 0 skipped" in out, out
    assert "- exit code: 1" in out, out


def test_users_additional_dependencies_replace_the_default(source: HookSource, tmp_path: Path,
                                                           digits_assets: Path) -> None:
    # the user picks the OpenVINO wheel: pre-commit must install it *instead of* the manifest's onnxruntime (two
    # onnxruntime wheels in one environment break both), and the hook must gate with it
    config = source.config(additional_dependencies=[OPENVINO_WHEEL], args=["--ep", "openvino", "--strict-ep"],
                           verbose=True)
    repo = _user_repo(tmp_path / "repo", digits_assets, source, config)
    seconds = _install_hooks(repo)
    print(f"pre-commit built the OpenVINO hook environment in {seconds:.1f} s")
    installed = _distributions(_hook_envs(source.store)[(OPENVINO_WHEEL,)])
    assert [name for name in installed if name.startswith("onnxruntime")] == ["onnxruntime-openvino"], installed

    sidecar = repo.model / "digits_b.int8.onnx"
    onnx.save(affine(onnx.load(str(sidecar)), 1.0, 0.0), sidecar)
    repo.entries[1] = modelkit.pin(repo.entries[1], repo.model)
    repo.write_registry()
    result, _ = repo.commit("a new sidecar, pinned")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "quantgate pre-commit: gating digits_b on openvino" in out, out
    assert "1 passed, 0 failed, 0 errors, 0 skipped" in out, out
