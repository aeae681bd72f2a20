"""``quantgate pre-commit`` through the real pre-commit package, installed as a git hook in a temporary repository.

The hook definition is this repository's ``.pre-commit-hooks.yaml`` (its ``files`` pattern, ``pass_filenames`` and
``require_serial``), run as a local hook with this interpreter so no environment has to be built from the network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import modelkit
import onnx
import pytest
from conftest import affine

pytest.importorskip("pre_commit", reason="pre-commit is not installed (dev extra)")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]


def _hook_config() -> str:
    """Return a .pre-commit-config.yaml running the manifest's quantgate hook with this interpreter."""
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    hook = dict(next(h for h in hooks if h["id"] == "quantgate"))
    assert hook["entry"] == "quantgate pre-commit" and hook["language"] == "python" and hook["pass_filenames"]
    # the onnxruntime wheel the manifest installs into its own environment: this interpreter already has one, and
    # pre-commit refuses additional_dependencies for a hook that builds no environment
    assert hook.pop("additional_dependencies")
    hook.update(
        entry=f"{sys.executable} -m pytest_quantgate.frontends.cli pre-commit",
        args=["--bootstrap", "200", "--ep", "cpu"],
        language="system",
        verbose=True,
    )
    return yaml.safe_dump({"repos": [{"repo": "local", "hooks": [hook]}]})


class HookRepo:
    """A git repository with two gated digits entries and the quantgate hook installed."""

    def __init__(self, root: Path, assets: Path, home: Path, config: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        """Build the repository with ``config`` (default: the local hook) and ``env`` over the isolated environment."""
        self.root = root
        self.env = {**os.environ, "PRE_COMMIT_HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(home),
                    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                    "GIT_COMMITTER_EMAIL": "t@example.com", **(env or {})}
        self.env.pop("CI", None)
        self.model = root / "model"
        self.fixtures = root / "fixtures"
        self.model.mkdir(parents=True)
        self.fixtures.mkdir()
        self.assets = assets
        for entry_id in ("digits_a", "digits_b"):
            shutil.copy(assets / "digits.onnx", self.model / f"{entry_id}.onnx")
            shutil.copy(assets / "digits.int8.onnx", self.model / f"{entry_id}.int8.onnx")
            shutil.copy(assets / "digits.npz", self.fixtures / f"{entry_id}.npz")
        self.entries = [modelkit.pin({"id": i, "onnx": f"{i}.onnx", "quant_mode": "dynamic"}, self.model)
                        for i in ("digits_a", "digits_b")]
        self.write_registry()
        (root / "README.md").write_text("models\n")
        (root / ".pre-commit-config.yaml").write_text(_hook_config() if config is None else config)
        self.git("init", "-q", "-b", "main")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", "initial")
        installed = subprocess.run([sys.executable, "-m", "pre_commit", "install"], cwd=root, env=self.env,
                                   capture_output=True, text=True)
        assert installed.returncode == 0, installed.stdout + installed.stderr

    def write_registry(self) -> None:
        (self.model / "registry.json").write_text(json.dumps({"schema_version": 1, "models": self.entries}, indent=2))

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["git", *args], cwd=self.root, env=self.env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def commit(self, message: str) -> tuple[subprocess.CompletedProcess[str], float]:
        """Stage everything and run `git commit` (which runs the installed hook); return the result and seconds."""
        self.git("add", "-A")
        start = time.perf_counter()
        result = subprocess.run(["git", "commit", "-m", message], cwd=self.root, env=self.env, capture_output=True,
                                text=True, timeout=120)
        return result, time.perf_counter() - start

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, digits_assets: Path) -> HookRepo:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    return HookRepo(tmp_path / "repo", digits_assets, tmp_path / "home")


def test_commit_that_breaks_a_sidecar_is_refused_with_the_gates_message(repo: HookRepo) -> None:
    before = repo.head()
    broken = affine(onnx.load(str(repo.model / "digits_b.int8.onnx")), 1.5, 2.0)
    onnx.save(broken, repo.model / "digits_b.int8.onnx")
    repo.entries[1] = modelkit.pin(repo.entries[1], repo.model)  # re-pinned: the sidecar is "intended", but bad
    repo.write_registry()
    result, _ = repo.commit("a worse sidecar")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert repo.head() == before, "the commit went through"
    assert "quantgate pre-commit: gating digits_b on cpu" in out
    assert "quantgate FAILED: digits_b [cpu] mode=dynamic:" in out
    assert "What to do:" in out
    assert "gating digits_a" not in out  # its files and its registry entry did not change
    assert "1 passed" not in out and "0 passed, 1 failed, 0 errors, 0 skipped" in out


def test_commit_that_touches_nothing_gated_runs_no_model(repo: HookRepo) -> None:
    # README: the hook's files pattern does not match, pre-commit does not even start it
    (repo.root / "README.md").write_text("models, documented\n")
    result, _ = repo.commit("docs")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "(no files to check)" in out and "Skipped" in out
    # an .npz no entry uses, and a registry whose entries did not change (key order only): the hook runs, gates nothing
    (repo.fixtures / "unrelated.npz").write_bytes((repo.fixtures / "digits_a.npz").read_bytes())
    text = json.loads((repo.model / "registry.json").read_text())
    (repo.model / "registry.json").write_text(json.dumps(text, indent=4, sort_keys=True))
    result, seconds = repo.commit("unrelated data and a reformatted registry")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "nothing to gate" in out
    assert "gating" not in out and "passed," not in out  # no model ran, no summary was printed
    assert seconds < 20, f"the no-op hook took {seconds:.1f} s"


def test_changed_registry_entry_and_new_entry_are_gated_by_comparison_with_head(repo: HookRepo) -> None:
    repo.entries[0]["quant_accuracy_budget_plcc"] = 0.02  # digits_a changes in the registry only
    shutil.copy(repo.assets / "digits.onnx", repo.model / "digits_c.onnx")
    shutil.copy(repo.assets / "digits.int8.onnx", repo.model / "digits_c.int8.onnx")
    shutil.copy(repo.assets / "digits.npz", repo.fixtures / "digits_c.npz")
    repo.entries.append(modelkit.pin({"id": "digits_c", "onnx": "digits_c.onnx", "quant_mode": "dynamic"}, repo.model))
    repo.write_registry()
    before = repo.head()
    result, _ = repo.commit("looser budget for digits_a, new digits_c")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert repo.head() != before
    assert "gating digits_a on cpu (changed: " in out and "(entry changed)" in out
    assert "gating digits_c on cpu" in out
    assert "gating digits_b" not in out
    assert "2 passed, 0 failed, 0 errors, 0 skipped" in out


def test_broken_registry_entry_is_refused(repo: HookRepo) -> None:
    repo.entries[1]["quant_mode"] = "int4"
    repo.write_registry()
    before = repo.head()
    result, _ = repo.commit("bad mode")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert repo.head() == before
    assert "quantgate ERROR: digits_b [-]:" in out and "'int4' is not one of" in out


def test_manifest_and_config_validate() -> None:
    for command, path in (("validate-manifest", ".pre-commit-hooks.yaml"),
                          ("validate-config", ".pre-commit-config.yaml")):
        result = subprocess.run([sys.executable, "-m", "pre_commit", command, str(ROOT / path)], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hook = config["repos"][0]["hooks"][0]
    assert hook["entry"] == "quantgate pre-commit" and hook["require_serial"] is True
