"""What a sidecar's bytes depend on (producers.build): the one-line reasons and the regeneration rule."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from conftest import GateProject

from pytest_quantgate.producers.build import (
    build_block,
    explain,
    inputs_digest,
    kernel_environment,
    pinned_build,
    usable_without_review,
)

GATE = {"drop": 0.0015, "drop_interval": [0.0012, 0.0018], "fixture_sha256": "a" * 64, "samples": 1024,
        "bootstrap": 1000, "seed": 0, "confidence": 0.95, "verdict": "PASS"}
ENV = {"torch_cpu_capability": "AVX512", "variables": {}, "cpu_vendor": "GenuineIntel",
       "cpu_flags": "avx avx2 avx512f fma", "threads": 1, "seed": 7}


def _qat(**changes: Any) -> dict[str, Any]:
    """A QAT provenance record as the producer writes it, with ``changes`` applied (dotted keys go one level in)."""
    record: dict[str, Any] = {
        "producer": "qat", "mode": "qat", "route": "bridge", "config": {"epochs_qat": 2, "seed": 7},
        "fp32_sha256": "b" * 64, "recipe": {"path": "r.py", "sha256": "c" * 64},
        "calibration": {"sha256": "d" * 64, "n_samples": 128},
        "library_versions": {"onnxruntime": "1.32.0", "torch": "2.13.0+cpu"},
        "training": {"epoch_losses": [0.1, 0.09]},
        "build": {"reproducible": "kernels", "environment": copy.deepcopy(ENV), "gate": dict(GATE)},
    }
    for key, value in changes.items():
        target = record
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        target[last] = value
    return record


def test_the_pinned_build_holds_inputs_libraries_kernels_and_the_build_time_gate() -> None:
    pinned = pinned_build(_qat())
    assert pinned is not None
    assert pinned["reproducible"] == "kernels" and pinned["environment"] == ENV and pinned["gate"] == GATE
    assert pinned["libraries"] == {"onnxruntime": "1.32.0", "torch": "2.13.0+cpu"}
    json.dumps(pinned)  # the registry stores it as JSON
    ptq = pinned_build({"producer": "ptq_dynamic", "config": {}, "fp32_sha256": "b" * 64,
                        "library_versions": {"onnxruntime": "1.32.0"}})
    assert ptq is not None and ptq["reproducible"] == "bytes" and "environment" not in ptq
    assert pinned_build(None) is None and pinned_build({}) is None


def test_the_inputs_digest_ignores_what_training_produced_and_follows_what_it_was_given() -> None:
    assert inputs_digest(_qat()) == inputs_digest(_qat(**{"training.epoch_losses": [0.2, 0.1]}))
    assert inputs_digest(_qat()) != inputs_digest(_qat(**{"config.epochs_qat": 3}))
    assert inputs_digest(_qat()) != inputs_digest(_qat(**{"calibration.sha256": "e" * 64}))
    assert inputs_digest(_qat()) != inputs_digest(_qat(fp32_sha256="f" * 64))


@pytest.mark.parametrize(("rebuilt", "kind", "text"), [
    (_qat(**{"build.environment.torch_cpu_capability": "DEFAULT",
             "build.environment.variables": {"ONEDNN_MAX_CPU_ISA": "SSE41"}}),
     "kernels", "other CPU kernels (torch_cpu_capability AVX512 -> DEFAULT; ONEDNN_MAX_CPU_ISA unset -> SSE41): "
                "expected for a training producer (qat)"),
    (_qat(**{"build.environment.cpu_flags": "avx avx2 fma"}), "kernels", "other CPU kernels (cpu flags -avx512f)"),
    (_qat(**{"build.environment.cpu_vendor": "AuthenticAMD"}), "kernels",
     "other CPU kernels (cpu_vendor GenuineIntel -> AuthenticAMD)"),
    (_qat(), "same-environment", "same inputs, libraries and CPU kernels as the pinned build: a real change"),
    (_qat(**{"library_versions.torch": "2.14.0+cpu"}), "libraries", "built with other libraries (torch 2.13.0+cpu "
                                                                    "-> 2.14.0+cpu)"),
    (_qat(**{"config.epochs_qat": 3}), "inputs", "built from other inputs"),
    (None, "no-record", "the rebuilt sidecar has no provenance record"),
])
def test_a_difference_is_explained_in_one_line(rebuilt: dict[str, Any] | None, kind: str, text: str) -> None:
    difference = explain(pinned_build(_qat()), rebuilt)
    assert difference.kind == kind and text in difference.text and "\n" not in difference.text
    assert difference.expected is (kind == "kernels")


def test_without_a_pinned_build_the_cause_is_unknown() -> None:
    difference = explain(None, _qat())
    assert difference.kind == "no-record" and "cause is unknown" in difference.text
    assert usable_without_review(difference, None, _qat(), True)[0] is False


def _other_kernels(**changes: Any) -> dict[str, Any]:
    return _qat(**{"build.environment.torch_cpu_capability": "DEFAULT", **changes})


@pytest.mark.parametrize(("rebuilt", "passed", "usable", "why"), [
    (_other_kernels(**{"build.gate.drop": 0.0016}), True, True, "within the pinned build's interval"),
    (_other_kernels(**{"build.gate.drop": 0.0018}), True, True, "within the pinned build's interval"),
    (_other_kernels(**{"build.gate.drop": 0.0019}), True, False, "above the pinned build's interval"),
    (_other_kernels(**{"build.gate.drop": 0.0016}), False, False, "does not pass the gate"),
    (_other_kernels(**{"build.gate": {"error": "FixtureError: not found"}}), True, False, "not recorded"),
    (_other_kernels(**{"build.gate.fixture_sha256": "0" * 64}), True, False, "other soak data or statistics"),
    (_other_kernels(**{"build.gate.bootstrap": 200}), True, False, "other soak data or statistics"),
    (_qat(), True, False, "only a training producer rebuilt on other CPU kernels"),
])
def test_the_rule_accepts_only_explained_kernel_changes_no_worse_than_the_review(
        rebuilt: dict[str, Any], passed: bool, usable: bool, why: str) -> None:
    pinned = pinned_build(_qat())
    verdict, reason = usable_without_review(explain(pinned, rebuilt), pinned, rebuilt, passed)
    assert verdict is usable and why in reason


def test_the_kernel_environment_names_the_variables_that_select_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    environment = kernel_environment(threads=2, seed=5)
    assert environment["variables"] == {"ONEDNN_MAX_CPU_ISA": "SSE41"}
    assert environment["threads"] == 2 and environment["seed"] == 5
    assert isinstance(environment["cpu_flags"], str) and environment["cpu_vendor"]
    block = build_block(threads=1, seed=0, gate=None)
    assert block["reproducible"] == "kernels" and block["gate"] is None


def test_pin_records_the_build_and_clears_a_stale_one(project: GateProject, capsys: pytest.CaptureFixture[str]) -> None:
    """`quantgate pin` copies the sidecar's build into int8_build, and sets it to null for a file without one."""
    import shutil

    from pytest_quantgate.frontends.cli import main
    from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic

    entry = project.add_sidecar("m")
    registry = project.write([entry])
    quantize_dynamic(project.model / "m.onnx", project.model / "m.int8.onnx", DynamicConfig())
    assert main(["pin", str(registry)]) == 0
    assert "m: int8_build ptq_dynamic, reproducible: bytes" in capsys.readouterr().out
    pinned = json.loads(registry.read_text())["models"][0]
    assert pinned["int8_build"]["producer"] == "ptq_dynamic" and pinned["int8_build"]["reproducible"] == "bytes"
    assert main(["pin", str(registry)]) == 0
    assert "every selected hash is already pinned" in capsys.readouterr().out
    shutil.copy(project.assets / "digits.int8.onnx", project.model / "m.int8.onnx")  # made by hand: no record
    assert main(["pin", str(registry)]) == 0
    assert "m: int8_build removed (the sidecar records no build)" in capsys.readouterr().out
    assert json.loads(registry.read_text())["models"][0]["int8_build"] is None
    assert project.run("--quantgate-regen", "never").ret == 0

