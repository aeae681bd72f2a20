"""The run planner (runner.plan) on its own: selection, (entry, EP) pairs, running them in order."""

from __future__ import annotations

import json

import pytest
from conftest import GateProject

from pytest_quantgate.errors import RegistryError
from pytest_quantgate.io.registry import load_registry
from pytest_quantgate.runner.plan import plan, run, select
from pytest_quantgate.settings import Settings


def _registry(project: GateProject) -> object:
    entries = [project.add_sidecar("alpha"), project.add_sidecar("beta"),
               {"id": "plain", "onnx": "alpha.onnx", "quant_mode": "fp32"},
               {"id": "broken", "onnx": "beta.onnx", "quant_mode": "static"}]  # no calibration set: invalid
    return load_registry(project.write(entries))


def test_select_matches_globs_over_valid_and_invalid_entries(project: GateProject) -> None:
    registry = _registry(project)
    entries, problems = select(registry, None)
    assert [e.id for e in entries] == ["alpha", "beta", "plain"] and [p.label for p in problems] == ["broken"]
    entries, problems = select(registry, ["a*", "br*"], gated_only=True)
    assert [e.id for e in entries] == ["alpha"] and [p.label for p in problems] == ["broken"]
    with pytest.raises(RegistryError, match=r"--id 'nope' match no entry of .*registry.json \(ids: alpha, beta, "
                                            r"plain\)"):
        select(registry, ["alpha", "nope"])


def test_a_plan_pairs_each_gated_entry_with_each_ep(project: GateProject) -> None:
    registry = _registry(project)
    settings = Settings(enabled=True, registry=project.model / "registry.json", fixtures_dir=project.fixtures,
                        eps=("cpu", "cpu"), bootstrap=100)
    the_plan = plan(registry, settings)
    assert [(e.id, ep) for e, ep in the_plan.pairs] == [("alpha", "cpu"), ("beta", "cpu")]
    assert [p.label for p in the_plan.problems] == ["broken"]
    only_beta = plan(registry, settings, keep=lambda e: e.id == "beta", problems=False)
    assert [(e.id, ep) for e, ep in only_beta.pairs] == [("beta", "cpu")] and only_beta.problems == ()
    seen: list[tuple[int, int, str, str | None]] = []
    outcomes = run(the_plan, settings, progress=lambda i, n, e, ep, o: seen.append(
        (i, n, e.id, None if o is None else o.status)))
    assert [(o.entry_id, o.status) for o in outcomes] == [("broken", "error"), ("alpha", "pass"), ("beta", "pass")]
    assert seen == [(1, 2, "alpha", None), (1, 2, "alpha", "pass"), (2, 2, "beta", None), (2, 2, "beta", "pass")]
    json.dumps([o.to_json() for o in outcomes])  # what measure and pre-commit report
