"""Node ids name the registry file even when it lies outside pytest's rootdir (pytest's own rule gives it "").

Outside the rootdir the registry's node id is its path relative to the rootdir (``../model/registry.json``), so
pytest, which reads node ids as rootdir-relative paths, shows it relative to the current folder correctly.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import GateProject

ROOT = Path(__file__).resolve().parents[1]


def _outside(project: GateProject) -> list[str]:
    """Write a two-entry registry; return the options of a run whose rootdir is a sibling folder of model/."""
    project.write([project.add_sidecar("alpha"), project.add_sidecar("beta")])
    rootdir = project.root / "proj"
    rootdir.mkdir()
    (rootdir / "pytest.ini").write_text("[pytest]\n")
    return [f"--rootdir={rootdir}", "-c", str(rootdir / "pytest.ini"),
            f"--quantgate-registry={project.model / 'registry.json'}", f"--quantgate-fixtures={project.fixtures}",
            "--quantgate-ep=cpu"]


def test_registry_outside_the_rootdir_keeps_its_name(project: GateProject) -> None:
    options = _outside(project)
    junit = project.root / "junit.xml"
    result = project.run(*options, "-v", f"--junitxml={junit}")
    result.assert_outcomes(passed=2)
    # run from the rootdir's parent: pytest shows ids relative to the current folder, through the rootdir
    result.stdout.fnmatch_lines([f"rootdir: {project.root / 'proj'}",
                                 "proj/../model/registry.json::alpha[[]cpu[]] PASSED*",
                                 "proj/../model/registry.json::beta[[]cpu[]] PASSED*"])
    assert "\n::alpha" not in result.stdout.str()
    cases = [(c.get("classname"), c.get("name")) for c in ET.parse(junit).getroot().iter("testcase")]
    assert cases == [("...model.registry.json", "alpha[cpu]"), ("...model.registry.json", "beta[cpu]")]


def test_run_from_the_rootdir_shows_a_path_pytest_accepts_back(project: GateProject,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    options = _outside(project)
    monkeypatch.chdir(project.root / "proj")
    result = project.run(*options, "--collect-only", "-q")
    result.stdout.fnmatch_lines(["../model/registry.json::alpha[[]cpu[]]", "../model/registry.json::beta[[]cpu[]]"])
    result = project.run(*options, "-v", "../model/registry.json::beta[cpu]")  # the id as printed selects it
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["../model/registry.json::beta[[]cpu[]] PASSED*"])


def test_node_ids_outside_the_rootdir_select_and_deselect(project: GateProject) -> None:
    options = _outside(project)
    result = project.run(*options, "-v", "--deselect=../model/registry.json::alpha[cpu]")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*registry.json::beta[[]cpu[]] PASSED*"])


def test_registry_inside_the_rootdir_keeps_pytests_own_ids(project: GateProject) -> None:
    project.write([project.add_sidecar("alpha")])
    result = project.run("--collect-only", "-q", "--quantgate-ep=cpu")
    result.stdout.fnmatch_lines(["model/registry.json::alpha[[]cpu[]]"])


def test_outside_the_rootdir_under_xdist(project: GateProject, monkeypatch: pytest.MonkeyPatch) -> None:
    """xdist workers collect the same ids as the controller (they would refuse to run otherwise)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the workers import this checkout's plugin
    options = _outside(project)
    result = project.run(*options, "-v", "-n", "2")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*PASSED proj/../model/registry.json::alpha[[]cpu[]]*"])
