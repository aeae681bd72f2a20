"""The composite GitHub Action in action.yml: linted, then its steps run for real on this machine.

The lint checks what a CI engineer relies on (every input used is declared and described, every run step names its
shell, every action is pinned, no input is pasted into a script) and runs actionlint on a workflow that uses the
action through ``uses: ./``. The run test plays the runner: it evaluates the ``${{ }}`` expressions the action uses,
runs each ``run:`` step in order with bash as GitHub does, hands step outputs on through ``$GITHUB_OUTPUT``, and
checks that the files the ``uses:`` steps would upload exist. It installs the action's own checkout with the
``[cpu]`` extra into a fresh virtualenv (a package index must be reachable); ``QUANTGATE_SKIP_PACKAGING=1`` skips
it together with tests/test_packaging.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_workflows import actionlint

yaml = pytest.importorskip("yaml")  # PyYAML comes with pre-commit (dev extra)

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
SKIP_VAR = "QUANTGATE_SKIP_PACKAGING"
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                       ".pytest_cache", "model", "fixtures", "bench")


def _action() -> dict[str, Any]:
    doc = yaml.safe_load(ACTION.read_text())
    assert isinstance(doc, dict)
    return doc


def _strings(node: Any) -> list[str]:
    """Return every string in a YAML tree (keys excluded)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


# --- lint -----------------------------------------------------------------------------------------------------


def test_action_metadata_is_complete() -> None:
    action = _action()
    for key in ("name", "description", "inputs", "outputs", "runs"):
        assert action.get(key), f"action.yml lacks {key!r}"
    assert action["runs"]["using"] == "composite"
    assert {"registry", "fixtures", "ep", "args", "python-version", "mode", "reports"} <= set(action["inputs"])
    assert action["inputs"]["mode"]["default"] == "gate"
    for name, spec in {**action["inputs"], **action["outputs"]}.items():
        assert spec.get("description"), f"{name} has no description"
    assert all("value" in spec for spec in action["outputs"].values())


def test_every_expression_refers_to_a_declared_input_or_an_earlier_step() -> None:
    action = _action()
    steps = action["runs"]["steps"]
    inputs = set(action["inputs"])
    ids = [s.get("id") for s in steps]
    used_inputs: set[str] = set()
    for index, step in enumerate(steps):
        for text in _strings(step):
            for expr in EXPRESSION.findall(text):
                used_inputs |= set(re.findall(r"inputs\.([A-Za-z0-9_-]+)", expr))
                for ref in re.findall(r"steps\.([A-Za-z0-9_-]+)\.outputs", expr):
                    assert ref in ids[:index], f"step {step.get('name')!r} reads steps.{ref} before it runs"
        condition = step.get("if", "")
        used_inputs |= set(re.findall(r"inputs\.([A-Za-z0-9_-]+)", condition))
    for spec in action["outputs"].values():
        for ref in re.findall(r"steps\.([A-Za-z0-9_-]+)\.outputs", spec["value"]):
            assert ref in ids, f"output reads unknown step {ref}"
    assert used_inputs <= inputs, f"undeclared inputs: {sorted(used_inputs - inputs)}"
    assert inputs <= used_inputs, f"inputs never used: {sorted(inputs - used_inputs)}"


def test_run_steps_name_their_shell_and_paste_no_expression_into_the_script() -> None:
    for step in _action()["runs"]["steps"]:
        if "run" in step:
            assert step.get("shell") == "bash", f"step {step.get('name')!r}: composite run steps need a shell"
            # inputs arrive as environment variables: a value like `"; rm -rf ~` stays data
            assert "${{" not in step["run"], f"step {step.get('name')!r} pastes an expression into its script"
        else:
            assert "uses" in step


def test_actions_are_pinned_to_a_release() -> None:
    uses = [s["uses"] for s in _action()["runs"]["steps"] if "uses" in s]
    assert uses
    for ref in uses:
        _, _, version = ref.partition("@")
        assert re.fullmatch(r"v\d+(\.\d+)*|[0-9a-f]{40}", version), f"{ref} is not pinned to a release or commit"
    assert {u.split("@")[0] for u in uses} == {"actions/setup-python", "actions/upload-artifact"}


def _lint_repo(tmp_path: Path, with_block: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / ".git").mkdir()
    shutil.copy(ACTION, tmp_path / "action.yml")
    workflows = tmp_path / ".github" / "workflows"
    workflows.mkdir(parents=True)
    (workflows / "gate.yml").write_text(
        "on: pull_request\n"
        "jobs:\n"
        "  gate:\n"
        "    runs-on: ubuntu-latest\n"
        "    strategy:\n"
        "      matrix:\n"
        "        ep: [cpu, openvino]\n"
        "    steps:\n"
        "      - uses: actions/checkout@v4\n"
        "      - id: quantgate\n"
        "        uses: ./\n"
        f"        with:\n{with_block}"
        "      - run: echo \"exit ${{ steps.quantgate.outputs.exit-code }}, report "
        "${{ steps.quantgate.outputs.report }}\"\n"
    )
    return subprocess.run([actionlint(), "-no-color"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)


def test_actionlint_accepts_a_workflow_using_the_action(tmp_path: Path) -> None:
    block = ("          registry: model/registry.json\n"
             "          ep: ${{ matrix.ep }}\n"
             "          args: --quantgate-select=fusion_*\n")
    result = _lint_repo(tmp_path, block)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_accepts_the_merge_mode(tmp_path: Path) -> None:
    block = ("          mode: merge\n"
             "          reports: reports/quantgate-*.json\n")
    result = _lint_repo(tmp_path, block)
    assert result.returncode == 0, result.stdout + result.stderr


def test_merge_mode_runs_only_the_merge_step_and_uploads_its_files() -> None:
    """The gate step is skipped in merge mode and the merge step in gate mode; the upload takes whichever ran."""
    steps = {s.get("id"): s for s in _action()["runs"]["steps"]}
    assert steps["gate"]["if"] == "inputs.mode != 'merge'" and steps["merge"]["if"] == "inputs.mode == 'merge'"
    assert steps["merge"]["env"]["QG_REPORTS"] == "${{ inputs.reports }}"  # data, never pasted into the script
    assert "quantgate\" report merge \"--json=$report\" \"--html=$html\" --step-summary -- " in steps["merge"]["run"]
    upload = next(s for s in _action()["runs"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["path"].strip().splitlines() == [
        "${{ steps.gate.outputs.report || steps.merge.outputs.report }}",
        "${{ steps.gate.outputs.html || steps.merge.outputs.html }}"]


def test_actionlint_reads_the_action_inputs(tmp_path: Path) -> None:
    """A misspelt input fails the lint: actionlint really checked the `with:` block against action.yml."""
    result = _lint_repo(tmp_path, "          regsitry: model/registry.json\n")
    assert result.returncode != 0
    assert 'input "regsitry" is not defined in action "pytest-quantgate"' in result.stdout, result.stdout


# --- run ------------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """Just enough of a GitHub runner to run a composite action's `run:` steps in order."""

    action_path: Path
    workspace: Path
    temp: Path
    tools: Path  # stands in for what actions/setup-python puts on PATH
    inputs: dict[str, str]
    summary: Path
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def value(self, expr: str) -> str:
        """Evaluate one context lookup or string literal of the expressions the action uses."""
        if "||" in expr:  # GitHub's `a || b`: the first operand that is not empty (step outputs are strings)
            return next((v for v in (self.value(part.strip()) for part in expr.split("||")) if v), "")
        if re.fullmatch(r"'[^']*'", expr):
            return expr[1:-1]
        if expr == "github.action_path":
            return str(self.action_path)
        if expr == "runner.temp":
            return str(self.temp)
        match = re.fullmatch(r"inputs\.([A-Za-z0-9_-]+)", expr)
        if match:
            return self.inputs[match.group(1)]
        match = re.fullmatch(r"steps\.([A-Za-z0-9_-]+)\.outputs\.([A-Za-z0-9_-]+)", expr)
        if match:
            return self.outputs.get(match.group(1), {}).get(match.group(2), "")
        raise AssertionError(f"expression this test cannot evaluate: {expr!r} (extend Runner.value)")

    def substitute(self, text: str) -> str:
        return EXPRESSION.sub(lambda m: self.value(m.group(1)), text)

    def condition(self, expr: str | None, failed: bool) -> bool:
        """Evaluate a step's `if:` (GitHub's implicit success() when there is none)."""
        if expr is None:
            return not failed
        expr = EXPRESSION.sub(lambda m: m.group(1), expr).strip()
        if expr == "always()":
            return True
        match = re.fullmatch(r"(\S+)\s*(==|!=)\s*('[^']*')", expr)
        if match:
            equal = self.value(match.group(1)) == self.value(match.group(3))
            return (equal if match.group(2) == "==" else not equal) and not failed
        raise AssertionError(f"condition this test cannot evaluate: {expr!r}")

    def run_step(self, index: int, step: Mapping[str, Any]) -> int:
        output = self.temp / f"_output_{index}"
        output.touch()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST_", "PYTHON", "VIRTUAL_ENV", "GITHUB_", "QUANTGATE_"))}
        env.update({
            "PATH": f"{self.tools}{os.pathsep}{os.environ['PATH']}",
            "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(self.workspace),
            "GITHUB_ACTION_PATH": str(self.action_path), "RUNNER_TEMP": str(self.temp),
            "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(self.summary),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        })
        env.update({k: self.substitute(str(v)) for k, v in (step.get("env") or {}).items()})
        script = self.temp / f"_step_{index}.sh"
        script.write_text(step["run"])
        cwd = self.workspace / self.substitute(step.get("working-directory", "."))
        # what `shell: bash` runs on a GitHub runner
        result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=600, check=False)
        self.log.append(f"--- {step.get('name')} (exit {result.returncode})\n{result.stdout}{result.stderr}")
        if step.get("id"):
            self.outputs[step["id"]] = _read_outputs(output.read_text())
        return result.returncode

    def run(self, action: Mapping[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        """Run every step; return the first failing exit code (0 if none) and the skipped `uses:` steps, evaluated."""
        failed = 0
        uploads: list[dict[str, Any]] = []
        for index, step in enumerate(action["runs"]["steps"]):
            if not self.condition(step.get("if"), failed != 0):
                self.log.append(f"--- {step.get('name')}: skipped by its condition")
                continue
            if "uses" in step:
                uploads.append({"uses": step["uses"],
                                **{k: self.substitute(str(v)) for k, v in (step.get("with") or {}).items()}})
                continue
            code = self.run_step(index, step)
            if code and not failed:
                failed = code
        return failed, uploads

    def action_outputs(self, action: Mapping[str, Any]) -> dict[str, str]:
        return {name: self.substitute(spec["value"]) for name, spec in action["outputs"].items()}


def _read_outputs(text: str) -> dict[str, str]:
    """Parse $GITHUB_OUTPUT: `name=value` lines and `name<<DELIM` blocks."""
    out: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            block: list[str] = []
            for inner in lines:
                if inner == delimiter:
                    break
                block.append(inner)
            out[name] = "\n".join(block)
        elif "=" in line:
            name, value = line.split("=", 1)
            out[name] = value
    return out


@pytest.mark.skipif(os.environ.get(SKIP_VAR) == "1", reason=f"{SKIP_VAR}=1")
def test_action_steps_gate_a_registry_upload_reports_and_write_the_summary(tmp_path: Path) -> None:
    action = _action()
    action_path = tmp_path / "action"  # the runner's checkout of the action (pip builds inside it)
    shutil.copytree(ROOT, action_path, ignore=SOURCE_IGNORE, symlinks=True)
    workspace = tmp_path / "workspace"  # the user's repository
    shutil.copytree(ROOT / "model", workspace / "model")
    shutil.copytree(ROOT / "fixtures", workspace / "fixtures")
    # a second registry where one entry's budget is far below its measured drop: a real FAIL verdict
    registry = json.loads((workspace / "model" / "registry.json").read_text())
    for entry in registry["models"]:
        if entry["id"] == "fusion_mlp_v1":
            entry["quant_accuracy_budget_plcc"] = 0.00001
    (workspace / "model" / "tight.json").write_text(json.dumps(registry, indent=2))
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    temp = tmp_path / "runner-temp"
    temp.mkdir()
    summary = tmp_path / "step_summary.md"
    defaults = {name: str(spec.get("default", "")) for name, spec in action["inputs"].items()}

    # 1. the bundled registry on the CPU EP: every item passes
    runner = Runner(action_path, workspace, temp, tools, {**defaults, "ep": "cpu"}, summary)
    code, uploads = runner.run(action)
    log = "\n".join(runner.log)
    assert code == 0, log
    outputs = runner.action_outputs(action)
    assert outputs["exit-code"] == "0", log
    report = json.loads(Path(outputs["report"]).read_text())
    assert sorted((i["id"], i["ep"], i["verdict"]) for i in report["items"]) == [
        ("fusion_mlp_v1", "cpu", "PASS"), ("nr_cnn_v1", "cpu", "PASS"), ("residual_filter_v1", "cpu", "PASS")]
    assert "<html" in Path(outputs["html"]).read_text()[:500].lower()
    upload = next(u for u in uploads if u["uses"].startswith("actions/upload-artifact@"))
    assert upload["name"] == "quantgate-cpu"
    paths = [p.strip() for p in upload["path"].splitlines() if p.strip()]
    assert paths == [outputs["report"], outputs["html"]]
    assert all(Path(p).is_file() for p in paths)
    assert "--quantgate-ep=cpu --quantgate-strict-ep" in log  # the command line, traced
    text = summary.read_text()
    for entry_id in ("fusion_mlp_v1", "nr_cnn_v1", "residual_filter_v1"):
        assert entry_id in text, text
    assert "PASS" in text

    # 2. a sidecar over its budget: the step fails with pytest's exit code, the reports are still uploaded
    summary.write_text("")
    inputs = {**defaults, "ep": "cpu", "registry": "model/tight.json", "args": "--quantgate-select=fusion_mlp_v1",
              "report-name": "tight"}
    runner = Runner(action_path, workspace, temp, tools, inputs, summary)
    code, uploads = runner.run(action)
    log = "\n".join(runner.log)
    assert code == 1, log
    outputs = runner.action_outputs(action)
    assert outputs["exit-code"] == "1"
    report = json.loads(Path(outputs["report"]).read_text())
    assert [(i["id"], i["verdict"]) for i in report["items"]] == [("fusion_mlp_v1", "FAIL")]
    upload = next(u for u in uploads if u["uses"].startswith("actions/upload-artifact@"))  # if: always()
    assert upload["name"] == "tight"
    assert all(Path(p.strip()).is_file() for p in upload["path"].splitlines() if p.strip())
    assert "fusion_mlp_v1" in summary.read_text() and "FAIL" in summary.read_text()

    # 3. a bad input never gets as far as pytest, and says why
    runner = Runner(action_path, workspace, temp, tools, {**defaults, "ep": "tpu"}, summary)
    code, _ = runner.run(action)
    assert code == 2
    assert "::error title=pytest-quantgate::input ep must be cpu, cuda or openvino, got 'tpu'" in "\n".join(runner.log)


# --- merge mode: the action's steps for real, with the test's interpreter standing in for the installed venv --------


def _stand_in_tools(tmp_path: Path) -> Path:
    """Return a PATH folder whose ``python -m venv DIR`` makes a venv that runs this checkout and skips pip."""
    tools = tmp_path / "tools"
    tools.mkdir()
    real = sys.executable
    venv_python = tools / "venv-python"
    venv_python.write_text(f"""#!/bin/bash
if [[ "$1" == -m && "$2" == pip ]]; then echo "(stand-in: pip $* not run)"; exit 0; fi
PYTHONPATH={ROOT} exec {real} "$@"
""")
    venv_quantgate = tools / "venv-quantgate"
    venv_quantgate.write_text(f"#!/bin/bash\nPYTHONPATH={ROOT} exec {real} -m pytest_quantgate.frontends.cli \"$@\"\n")
    python = tools / "python"
    python.write_text(f"""#!/bin/bash
if [[ "$1" == -m && "$2" == venv ]]; then
  mkdir -p "$3/bin" && cp {venv_python} "$3/bin/python" && cp {venv_quantgate} "$3/bin/quantgate"; exit 0
fi
exec {real} "$@"
""")
    for path in (venv_python, venv_quantgate, python):
        path.chmod(0o755)
    return tools


def test_merge_mode_merges_ep_reports_into_the_summary_and_uploads_the_page(
        project: Any, tmp_path: Path) -> None:
    from test_report_merge import _gate, _set_drop, as_openvino

    project.write([project.add_sidecar("digits_a")])
    cpu = _gate(project, "cpu.json", "--quantgate-ep=cpu")
    workspace = tmp_path / "workspace"
    (workspace / "reports" / "quantgate-openvino").mkdir(parents=True)
    (workspace / "reports" / "quantgate-cpu.json").write_text(json.dumps(cpu))
    (workspace / "reports" / "quantgate-openvino" / "quantgate-openvino.json").write_text(
        json.dumps(as_openvino(cpu)))
    action = _action()
    temp = tmp_path / "runner-temp"
    temp.mkdir()
    summary = tmp_path / "step_summary.md"
    defaults = {name: str(spec.get("default", "")) for name, spec in action["inputs"].items()}
    inputs = {**defaults, "mode": "merge", "reports": "reports/quantgate-*.json\nreports/**/quantgate-*.json"}
    runner = Runner(ROOT, workspace, temp, _stand_in_tools(tmp_path), inputs, summary)
    code, uploads = runner.run(action)
    log = "\n".join(runner.log)
    assert code == 0, log
    assert f"pip install {ROOT}\n" in log  # the package alone: merging needs no onnxruntime wheel
    assert "--- Run the gate: skipped by its condition" in log
    outputs = runner.action_outputs(action)
    assert outputs["exit-code"] == "0"
    assert outputs["report"] == str(temp / "quantgate-report" / "quantgate-merged.json")
    merged = json.loads(Path(outputs["report"]).read_text())
    assert merged["eps"] == ["cpu", "openvino"] and len(merged["reports"]) == 2  # each file once
    assert "<table" in Path(outputs["html"]).read_text()
    upload = next(u for u in uploads if u["uses"].startswith("actions/upload-artifact@"))
    assert upload["name"] == "quantgate-merged"
    assert [p.strip() for p in upload["path"].splitlines() if p.strip()] == [outputs["report"], outputs["html"]]
    text = summary.read_text()
    assert "| id | mode | cpu | openvino |" in text and "| `digits_a` | dynamic | ✅ PASS " in text

    # EPs that diverge: the step fails with exit 1, the summary names the divergence, the page is still uploaded
    _set_drop(cpu, "digits_a", 0.0015, 0.0012, 0.0018)
    openvino = as_openvino(cpu)
    _set_drop(openvino, "digits_a", 0.0031, 0.0027, 0.0035)
    (workspace / "reports" / "quantgate-cpu.json").write_text(json.dumps(cpu))
    (workspace / "reports" / "quantgate-openvino" / "quantgate-openvino.json").write_text(json.dumps(openvino))
    summary.write_text("")
    runner = Runner(ROOT, workspace, temp, runner.tools, inputs, summary)
    code, uploads = runner.run(action)
    assert code == 1, "\n".join(runner.log)
    assert runner.action_outputs(action)["exit-code"] == "1"
    assert "openvino drop 0.0031 vs cpu 0.0015: intervals do not overlap" in summary.read_text()
    assert any(u["uses"].startswith("actions/upload-artifact@") for u in uploads)

    # no report found, and a bad mode: exit 2 with an error annotation
    runner = Runner(ROOT, workspace, temp, runner.tools, {**inputs, "reports": "nowhere/*.json"}, summary)
    code, _ = runner.run(action)
    assert code == 2
    assert "::error title=pytest-quantgate::no JSON report matches the input reports: 'nowhere/*.json'" in \
        "\n".join(runner.log)
    runner = Runner(ROOT, workspace, temp, runner.tools, {**inputs, "mode": "merged"}, summary)
    code, _ = runner.run(action)
    assert code == 2
    assert "::error title=pytest-quantgate::input mode must be gate or merge, got 'merged'" in "\n".join(runner.log)
