"""gate: prepare's refusals, measure/evaluate on the digits MLP against a direct PLCC, run_one's outcomes."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import modelkit
import numpy as np
import onnx
import pytest
import recordkit
from conftest import rounded_weights
from scipy import stats

from pytest_quantgate.runner import gate
from pytest_quantgate.records import GateResult
from pytest_quantgate.errors import (
    EpUnavailableError,
    FixtureError,
    HashMismatchError,
    InputError,
    InsufficientSamplesError,
    ModelFileError,
    SignatureMismatchError,
)
from pytest_quantgate.fileio import sha256_file
from pytest_quantgate.runner.gate import Prepared, evaluate, measure, prepare, run_one
from pytest_quantgate.io.registry import Registry, load_registry
from pytest_quantgate.settings import Settings


class Project:
    """model/registry.json with entry ``m`` (the digits MLP and its dynamic int8 sidecar) and fixtures/m.npz."""

    def __init__(self, root: Path, assets: Path, fixture: str = "digits_notarget.npz") -> None:
        self.model = root / "model"
        self.fixtures = root / "fixtures"
        self.model.mkdir(parents=True)
        self.fixtures.mkdir()
        shutil.copy(assets / "digits.onnx", self.model / "m.onnx")
        shutil.copy(assets / "digits.int8.onnx", self.model / "m.int8.onnx")
        shutil.copy(assets / fixture, self.fixtures / "m.npz")
        self.entry: dict[str, Any] = modelkit.pin({"id": "m", "onnx": "m.onnx", "quant_mode": "dynamic"}, self.model)
        self.write()

    def write(self, **changes: Any) -> None:
        """Write the registry with ``changes`` to the entry."""
        self.entry.update(changes)
        modelkit.write_registry(self.model / "registry.json", [self.entry])

    def registry(self) -> Registry:
        """Return the registry as the gate loads it."""
        return load_registry(self.model / "registry.json")

    def settings(self, **changes: Any) -> Settings:
        """Return CPU settings that never rebuild, with a short bootstrap."""
        return replace(Settings(enabled=True, registry=self.model / "registry.json", fixtures_dir=self.fixtures,
                                eps=("cpu",), regen="never", bootstrap=200), **changes)

    def prepare(self, **changes: Any) -> Prepared:
        """Return ``gate.prepare`` of entry ``m`` on the CPU."""
        registry = self.registry()
        return prepare(registry, registry.entry("m"), "cpu", self.settings(**changes))

    def run_one(self, cache: Any = None, **changes: Any) -> gate.Outcome:
        """Return ``gate.run_one`` of entry ``m`` on the CPU."""
        registry = self.registry()
        return run_one(registry, registry.entry("m"), "cpu", self.settings(**changes), cache=cache)


@pytest.fixture
def project(tmp_path: Path, digits_assets: Path) -> Project:
    """Return a fresh project without a target in its fixture."""
    return Project(tmp_path, digits_assets)


def _features(assets: Path, name: str = "digits.npz") -> dict[str, np.ndarray]:
    with np.load(assets / name) as archive:
        return {key: archive[key] for key in archive.files}


def _outputs(path: Path, features: np.ndarray) -> np.ndarray:
    """Run a model one sample at a time, as the gate runs a dynamic sidecar (its deploy batch is 1)."""
    session = modelkit.cpu_session(path)  # the gate's exact int8 kernels
    return np.concatenate([session.run(["score"], {"features": features[i : i + 1]})[0]
                           for i in range(len(features))]).astype(np.float64).ravel()


# --- prepare ---------------------------------------------------------------------------------------------------


def test_prepare_checks_and_opens_everything(project: Project) -> None:
    p = project.prepare(batch_size=64)
    assert (p.entry.id, p.ep) == ("m", "cpu")
    assert (p.fp32_path, p.int8_path) == (project.model / "m.onnx", project.model / "m.int8.onnx")
    assert (p.fp32_sha256, p.int8_sha256) == (project.entry["sha256"], project.entry["int8_sha256"])
    assert p.fixture.path == project.fixtures / "m.npz" and p.fixture.samples == 1197
    assert (p.plan.samples, p.plan.batched, p.plan.batch, p.plan.fixed_batch) == (1197, True, 64, False)
    assert [(s.name, s.type) for s in p.inputs] == [("features", "tensor(float)")]
    assert [(s.name, s.shape) for s in p.outputs] == [("score", ("N", 1))]
    assert p.int8.get_providers()[0] == "CPUExecutionProvider"


@pytest.mark.parametrize(("field", "file"), [("sha256", "m.onnx"), ("int8_sha256", "m.int8.onnx")])
def test_a_hash_mismatch_names_registry_entry_field_file_and_both_hashes(project: Project, field: str,
                                                                         file: str) -> None:
    project.write(**{field: "ab" * 32})
    with pytest.raises(HashMismatchError) as raised:
        project.prepare()
    registry = project.model / "registry.json"
    actual = sha256_file(project.model / file)
    assert str(raised.value) == (
        f"{registry}: entry 'm' field {field!r}: {project.model / file} has sha256 {actual}, the registry pins "
        f"{'ab' * 32}; if the file change is intended, re-pin with `quantgate pin {registry} --id m`")


def test_a_rebuilt_sidecar_skips_the_int8_pin_but_never_the_fp32_one(project: Project) -> None:
    project.write(int8_sha256="ab" * 32)
    registry = project.registry()
    settings = project.settings()
    assert prepare(registry, registry.entry("m"), "cpu", settings, int8_pinned=False).int8_sha256 == \
        sha256_file(project.model / "m.int8.onnx")
    project.write(sha256="cd" * 32)
    registry = project.registry()
    with pytest.raises(HashMismatchError, match="field 'sha256'"):
        prepare(registry, registry.entry("m"), "cpu", settings, int8_pinned=False)


@pytest.mark.parametrize(("file", "role"), [("m.onnx", "fp32"), ("m.int8.onnx", "int8")])
def test_a_missing_model_file_names_registry_entry_and_role(project: Project, file: str, role: str) -> None:
    (project.model / file).unlink()
    with pytest.raises(ModelFileError) as raised:
        project.prepare()
    assert str(raised.value) == (f"{project.model / 'registry.json'}: entry 'm': {role} model {project.model / file} "
                                 f"does not exist")


def test_a_missing_fixture_names_where_it_was_looked_for(project: Project) -> None:
    (project.fixtures / "m.npz").unlink()
    with pytest.raises(FixtureError, match=f"soak fixture not found; looked in: {project.fixtures / 'm.npz'} "):
        project.prepare()


def test_too_few_samples_names_the_fixture_the_entry_and_the_floor(project: Project, digits_assets: Path) -> None:
    np.savez(project.fixtures / "m.npz", features=_features(digits_assets)["features"][:29])
    with pytest.raises(InsufficientSamplesError) as raised:
        project.prepare()
    assert str(raised.value).startswith(f"{project.fixtures / 'm.npz'}: 29 sample(s); entry 'm' needs at least 30 "
                                        f"(the default sample floor)")
    project.write(quant_min_samples=20)
    assert project.prepare().plan.samples == 29
    project.write(quant_min_samples=100)
    with pytest.raises(InsufficientSamplesError, match=r"29 sample\(s\); entry 'm' needs at least 100 "
                                                       r"\(quant_min_samples\)"):
        project.prepare()


def test_the_sample_ceiling_refuses_before_any_session(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate, "open_session", lambda *a, **k: pytest.fail("a session was opened"))
    with pytest.raises(FixtureError, match=f"^{project.fixtures / 'm.npz'}: 1197 samples, over the ceiling of 1000 "):
        project.prepare(max_samples=1000)


def test_a_sidecar_of_another_graph_is_a_signature_mismatch(project: Project) -> None:
    weights = modelkit.fitted_mlp_weights()
    onnx.save(modelkit.mlp_model(weights, input_name="pixels"), project.model / "m.int8.onnx")
    project.write(int8_sha256=sha256_file(project.model / "m.int8.onnx"))
    with pytest.raises(SignatureMismatchError, match=r"m.int8.onnx: int8 graph inputs \['pixels'\] differ from the "
                                                     r"fp32 graph's \['features'\]"):
        project.prepare()


def test_every_refusal_is_an_input_error() -> None:
    for error in (HashMismatchError, ModelFileError, FixtureError, InsufficientSamplesError, SignatureMismatchError,
                  EpUnavailableError):
        assert issubclass(error, InputError)


# --- measure and evaluate ----------------------------------------------------------------------------------------


def test_measure_passes_with_the_drop_of_a_direct_plcc(project: Project, digits_assets: Path) -> None:
    result, collector = measure(project.prepare(), project.settings())
    features = _features(digits_assets, "digits_notarget.npz")["features"]
    a, b = _outputs(project.model / "m.onnx", features), _outputs(project.model / "m.int8.onnx", features)
    plcc = stats.pearsonr(a, b).statistic
    assert (result.verdict, result.kind, result.entry_id, result.ep, result.samples) == ("PASS", "pass", "m", "cpu",
                                                                                         1197)
    assert result.drop is not None and result.drop == pytest.approx(1.0 - plcc, rel=1e-6, abs=1e-12)
    assert 0.0 < result.drop < result.budget
    assert result.interval is not None and result.interval.low <= result.drop <= result.interval.high
    report = result.outputs[0]
    assert report.vs_fp32.plcc == pytest.approx(plcc, abs=1e-12) and report.fp32_vs_target is None
    assert report.vs_fp32.mae == pytest.approx(np.mean(np.abs(b - a)), rel=1e-9)
    assert report.vs_fp32.max_abs == pytest.approx(np.max(np.abs(b - a)), rel=1e-9)
    assert result.timing is not None and result.timing.runs == 1197 and result.timing.batch == 1
    assert result.provenance is not None and result.provenance.fixture.sha256 == sha256_file(project.fixtures / "m.npz")
    assert result.lineage is not None and result.lineage.ok
    assert result.plot is None and result.diagnosis is None  # no --quantgate-html, no diagnosis asked for here
    assert len(collector.worst_samples(4)) == 4


def test_with_a_target_the_drop_is_the_larger_of_the_target_and_implied_drops(tmp_path: Path,
                                                                              digits_assets: Path) -> None:
    project = Project(tmp_path, digits_assets, fixture="digits.npz")
    result = evaluate(project.prepare(), project.settings())
    data = _features(digits_assets)
    a, b = _outputs(project.model / "m.onnx", data["features"]), _outputs(project.model / "m.int8.onnx",
                                                                          data["features"])
    ref_t, test_t, ref_test = (stats.pearsonr(x, y).statistic for x, y in ((a, data["target"]), (b, data["target"]),
                                                                           (a, b)))
    assert result.verdict == "PASS"
    assert result.drop == pytest.approx(max(ref_t - test_t, ref_t * (1.0 - ref_test)), rel=1e-6, abs=1e-12)
    assert result.outputs[0].fp32_vs_target is not None
    assert result.outputs[0].fp32_vs_target.plcc == pytest.approx(ref_t, abs=1e-12)


def test_a_lossy_sidecar_fails_on_the_drop(project: Project) -> None:
    fp32 = onnx.load(project.model / "m.onnx")
    onnx.save(rounded_weights(fp32, 0.25), project.model / "m.int8.onnx")
    project.write(int8_sha256=sha256_file(project.model / "m.int8.onnx"), quant_lineage=False)
    result = evaluate(project.prepare(), project.settings())
    assert (result.verdict, result.kind) == ("FAIL", "drop")
    assert result.drop is not None and result.drop > result.budget


def test_the_html_option_adds_the_plot(project: Project, tmp_path: Path) -> None:
    result = evaluate(project.prepare(), project.settings(html=tmp_path / "r.html"))
    assert result.plot is not None and result.plot.output == "score" and len(result.plot.fp32) > 0


# --- run_one: every problem is an outcome, never an exception ------------------------------------------------------


def test_run_one_passes(project: Project) -> None:
    outcome = project.run_one()
    assert (outcome.status, outcome.verdict, outcome.entry_id, outcome.ep, outcome.mode) == ("pass", "PASS", "m",
                                                                                           "cpu", "dynamic")
    assert outcome.result is not None and outcome.message == outcome.result.reason and not outcome.cached


def test_run_one_turns_input_errors_into_error_outcomes(project: Project) -> None:
    project.write(sha256="ab" * 32)
    outcome = project.run_one()
    assert (outcome.status, outcome.result, outcome.traceback) == ("error", None, None)
    assert "entry 'm' field 'sha256'" in outcome.message
    (project.model / "m.int8.onnx").unlink()
    outcome = project.run_one()
    assert outcome.status == "error" and "does not exist and --quantgate-regen is 'never'" in outcome.message


@pytest.mark.parametrize("strict_ep", [False, True])
def test_an_unavailable_ep_is_a_skip_or_with_strict_ep_an_error(project: Project, monkeypatch: pytest.MonkeyPatch,
                                                                strict_ep: bool) -> None:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise EpUnavailableError("cuda: CUDAExecutionProvider is not offered")

    monkeypatch.setattr(gate, "open_session", unavailable)
    outcome = project.run_one(strict_ep=strict_ep)
    assert outcome.status == ("error" if strict_ep else "skip")
    assert outcome.message == "cuda: CUDAExecutionProvider is not offered" + (" (--quantgate-strict-ep)"
                                                                              if strict_ep else "")


@pytest.mark.parametrize("error", [RuntimeError("boom\nsecond line"), SystemExit(3), ZeroDivisionError()])
def test_an_unexpected_exception_is_an_error_outcome_with_its_traceback(project: Project,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        error: BaseException) -> None:
    def broken(*args: Any) -> Any:
        raise error

    monkeypatch.setattr(gate, "measure", broken)
    outcome = project.run_one()
    where = f"{project.model / 'registry.json'}: entry 'm' ($.models[0])"
    assert outcome.status == "error" and outcome.message.startswith(f"{where}: unexpected {type(error).__name__}: ")
    assert "\n" not in outcome.message
    assert outcome.traceback is not None and type(error).__name__ in outcome.traceback


def test_an_interrupt_is_not_swallowed(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(gate, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        project.run_one()


def test_strict_turns_an_unresolved_budget_into_an_error(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    unresolved = recordkit.gate_result(needed_samples=5000, warnings=("the interval straddles the budget",),
                                       diagnosis=None)
    monkeypatch.setattr(gate, "measure", lambda *args: (unresolved, None))
    assert project.run_one().status == "pass"
    outcome = project.run_one(strict=True)
    assert outcome.status == "error" and outcome.result is unresolved
    assert outcome.message == (f"{project.model / 'registry.json'}: entry 'm': the interval straddles the budget "
                               f"(--quantgate-strict)")


class Store:
    """A CacheStore in memory; ``broken`` makes every write fail as a full disk would."""

    def __init__(self, broken: bool = False) -> None:
        self.rows: dict[str, GateResult] = {}
        self.broken = broken

    def get(self, key: str) -> GateResult | None:
        """Return the stored result."""
        return self.rows.get(key)

    def set(self, key: str, result: GateResult) -> None:
        """Store a result, or fail."""
        if self.broken:
            raise OSError(28, "No space left on device")
        self.rows[key] = result


def test_a_pass_is_cached_and_served_without_running(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store()
    first = project.run_one(cache=store)
    assert first.status == "pass" and not first.cached and len(store.rows) == 1
    monkeypatch.setattr(gate, "prepare", lambda *a, **k: pytest.fail("a cached entry was measured again"))
    again = project.run_one(cache=store)
    assert again.status == "pass" and again.cached and again.result == next(iter(store.rows.values()))
    assert again.message.startswith("unchanged since a passing run")


def test_a_cache_that_cannot_be_written_keeps_the_verdict(project: Project) -> None:
    outcome = project.run_one(cache=Store(broken=True))
    assert outcome.status == "pass"
    assert outcome.notes == ("the passing result was not cached: [Errno 28] No space left on device",)


def test_a_failure_is_never_cached(project: Project) -> None:
    fp32 = onnx.load(project.model / "m.onnx")
    onnx.save(rounded_weights(fp32, 0.25), project.model / "m.int8.onnx")
    project.write(int8_sha256=sha256_file(project.model / "m.int8.onnx"), quant_lineage=False)
    store = Store()
    outcome = project.run_one(cache=store, diagnose="off")
    assert outcome.status == "fail" and outcome.result is not None and outcome.result.kind == "drop"
    assert store.rows == {}
