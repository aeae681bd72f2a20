"""Execution providers: expansion, ids, skip vs strict error, provider options, and refusing ORT's silent fallback.

The dev environment has the plain onnxruntime wheel, so ``openvino`` and ``cuda`` are really unavailable here. What
needs another wheel (OpenVINO placing every node with CPU fallback disabled, onnxruntime-gpu falling back to CPU
without the CUDA libraries) runs in ``.ci/ep_gate.sh``; here ORT's behaviour in those cases is reproduced by a
wrapper around a real CPU session that lies the way onnxruntime-gpu does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from conftest import GateProject
from pytest_quantgate.engine import providers
from pytest_quantgate.frontends.cli import main
from pytest_quantgate.errors import EpUnavailableError
from pytest_quantgate.engine.providers import SessionSpec, open_session, placements
from pytest_quantgate.settings import EpOptions

CPU_ONLY = "openvino" not in providers.available() and "cuda" not in providers.available()
needs_cpu_only = pytest.mark.skipif(not CPU_ONLY, reason="needs the plain (CPU-only) onnxruntime wheel")


# --- expansion and ids ----------------------------------------------------------------------------------------


def test_auto_expands_to_the_available_eps_in_a_fixed_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers.available() == ["cpu", "cuda"]
    assert providers.expand(("auto",)) == ["cpu", "cuda"]
    assert providers.expand(("openvino", "auto", "cpu")) == ["openvino", "cpu", "cuda"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    assert providers.expand(("auto",)) == ["cpu", "openvino"]


@needs_cpu_only
def test_auto_here_is_cpu_and_an_explicit_unavailable_ep_is_kept() -> None:
    assert providers.expand(("auto",)) == ["cpu"]
    assert providers.expand(("cuda", "cpu", "cuda")) == ["cuda", "cpu"]


@needs_cpu_only
def test_each_item_carries_its_ep_and_an_unavailable_ep_skips_naming_the_wheel(project: GateProject) -> None:
    project.write([project.add_sidecar("digits")])
    result = project.run("--quantgate-ep", "cpu", "--quantgate-ep", "openvino", "-v", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "*model/registry.json::digits[[]cpu[]] PASSED*",
        "*model/registry.json::digits[[]openvino[]] SKIPPED*",
        "SKIPPED *quantgate: openvino: OpenVINOExecutionProvider is not offered by the installed onnxruntime *; "
        "install onnxruntime-openvino (one onnxruntime wheel per virtualenv: in a fresh one, pip install "
        "'pytest-quantgate[[]openvino[]]') (use --quantgate-strict-ep to make this an error)",
    ])


@needs_cpu_only
def test_strict_ep_turns_the_skip_into_an_error(project: GateProject) -> None:
    project.write([project.add_sidecar("digits")])
    result = project.run("--quantgate-ep", "openvino", "--quantgate-ep", "cuda", "--quantgate-strict-ep", "-v")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*quantgate ERROR: digits [[]cuda[]]: cuda: CUDAExecutionProvider is not offered by the installed onnxruntime "
        "*; install onnxruntime-gpu (one onnxruntime wheel per virtualenv: in a fresh one, pip install "
        "'pytest-quantgate[[]gpu[]]') (--quantgate-strict-ep)*",
        "*quantgate ERROR: digits [[]openvino[]]: openvino: OpenVINOExecutionProvider is not offered *install "
        "onnxruntime-openvino*(--quantgate-strict-ep)*",
    ])
    assert result.ret == 1


@needs_cpu_only
def test_ini_twins_select_eps_and_strictness(project: GateProject) -> None:
    project.write([project.add_sidecar("digits")])
    project.pytester.makeini("[pytest]\nquantgate_ep = cpu openvino\nquantgate_strict_ep = true\n")
    result = project.run("-v")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*digits[[]cpu[]] PASSED*", "*digits[[]openvino[]] ERROR*"])


@needs_cpu_only
def test_measure_skips_or_errors_an_unavailable_ep(project: GateProject, capsys: pytest.CaptureFixture[str]) -> None:
    registry = project.write([project.add_sidecar("digits")])
    common = [str(registry), "--fixtures", str(project.fixtures), "--bootstrap", "100", "--ep", "openvino"]
    assert main(["measure", *common]) == 0
    out = capsys.readouterr().out
    assert "quantgate SKIP: digits [openvino]: openvino: OpenVINOExecutionProvider is not offered" in out
    assert "0 passed, 0 failed, 0 errors, 1 skipped" in out
    assert main(["measure", *common, "--strict-ep"]) == 2
    out = capsys.readouterr().out
    assert "quantgate ERROR: digits [openvino]: openvino: OpenVINOExecutionProvider is not offered" in out


# --- provider options -----------------------------------------------------------------------------------------


def test_openvino_session_spec_uses_the_option_names_onnxruntime_openvino_accepts() -> None:
    spec = SessionSpec("openvino", EpOptions(openvino_device="gpu", openvino_precision="fp32"))
    # onnxruntime-openvino 1.24.1 rejects lower-case "fp32" ("CPU only supports FP32, ACCURACY"): always upper case
    assert spec.providers() == [("OpenVINOExecutionProvider", {"device_type": "GPU", "precision": "FP32"})]
    # no CPU EP listed, and no CPU fallback: ORT refuses the session unless OpenVINO takes every node
    assert spec.config_entries() == {"session.disable_cpu_ep_fallback": "1"}
    assert SessionSpec("openvino", EpOptions()).providers()[0][1] == {"device_type": "CPU", "precision": "FP32"}


def test_cuda_session_spec_passes_the_device_id_and_keeps_cpu_for_int8_ops() -> None:
    spec = SessionSpec("cuda", EpOptions(cuda_device_id=3))
    assert spec.providers() == [("CUDAExecutionProvider", {"device_id": "3"}), "CPUExecutionProvider"]
    # the int8 nodes CUDA leaves to the CPU EP sum exactly, as on the CPU EP
    assert spec.config_entries() == {"session.x64quantprecision": "1"}
    fast = SessionSpec("cuda", EpOptions(int8_precision="fast"))
    assert fast.config_entries() == {}


def test_cpu_int8_precision_is_exact_by_default_and_fast_on_request() -> None:
    assert SessionSpec("cpu", EpOptions()).config_entries() == {"session.x64quantprecision": "1"}
    assert SessionSpec("cpu", EpOptions(int8_precision="fast")).config_entries() == {}


def test_plugin_passes_the_ep_options_through(project: GateProject) -> None:
    project.write([project.add_sidecar("digits")])
    project.pytester.makeconftest(
        "import pytest\n"
        "def pytest_collection_finish(session):\n"
        "    from pytest_quantgate.frontends.stash import SETTINGS_KEY\n"
        "    print('EPOPTIONS', session.config.stash[SETTINGS_KEY].ep_options)\n"
    )
    result = project.run("--quantgate-ep", "cpu", "--quantgate-openvino-device", "npu",
                         "--quantgate-openvino-precision", "ACCURACY", "--quantgate-cuda-device", "2",
                         "--quantgate-int8-precision", "FAST", "-s")
    result.stdout.fnmatch_lines(["*EPOPTIONS EpOptions(cuda_device_id=2, openvino_device='NPU', "
                                 "openvino_precision='ACCURACY', int8_precision='fast')*"])
    bad = project.run("--quantgate-int8-precision", "loose")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--quantgate-int8-precision*invalid choice*'loose'*"])


# --- ORT's log: what it says when an EP cannot run -------------------------------------------------------------

# lines as onnxruntime-openvino 1.24.1 and onnxruntime-gpu 1.31.1 wrote them here (ANSI colours included)
OPENVINO_NO_GPU = (
    "\x1b[1;31m2026-11-22 05:48:21.436395109 [E:onnxruntime:Default, provider_bridge_ort.cc:2310 Create] "
    "/onnxruntime/onnxruntime/core/providers/openvino/openvino_provider_factory.cc:141 std::string "
    "onnxruntime::openvino_ep::ParseDeviceType(std::shared_ptr<OVCore>, const onnxruntime::ProviderOptions&) "
    "[ERROR] [OpenVINO] Device GPU is not available\n\x1b[m\n"
    "\x1b[0;93m2026-11-22 05:48:21.436432345 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1066 "
    "CreateExecutionProviderFactoryInstance] Failed to create OpenVINOExecutionProvider. Please refer "
    "https://onnxruntime.ai/docs/execution-providers/OpenVINO-ExecutionProvider.html#requirements to ensure all "
    "dependencies are met.\x1b[m\n"
)
CUDA_NO_LIBS = (
    "2026-11-22 05:49:58.655074767 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared object file: No such file "
    "or directory\n\n"
    "2026-11-22 05:49:58.655084221 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*.\n"
)
MIXED_PLACEMENT = (
    "2026-11-22 05:49:30.428 [V:onnxruntime:, session_state.cc:1310 VerifyEachNodeIsAssignedToAnEp] Node placements\n"
    "2026-11-22 05:49:30.428 [V:onnxruntime:, session_state.cc:1313 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed "
    "on [OpenVINOExecutionProvider]. Number of nodes: 1\n"
    "2026-11-22 05:49:30.428 [V:onnxruntime:, session_state.cc:1313 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed "
    "on [CPUExecutionProvider]. Number of nodes: 2\n"
    "2026-11-22 05:49:30.428 [V:onnxruntime:, session_state.cc:1315 VerifyEachNodeIsAssignedToAnEp]   Relu (relu0)\n"
    "2026-11-22 05:49:30.428 [V:onnxruntime:, session_state.cc:1315 VerifyEachNodeIsAssignedToAnEp]   Det (det0)\n"
    "2026-11-22 05:49:30.428 [V:onnxruntime:, session_state.cc:193 CreateGraphInfo] SaveMLValueNameIndexMapping\n"
)


def test_the_openvino_reason_is_read_from_orts_log() -> None:
    assert providers._problems(OPENVINO_NO_GPU, "", "OpenVINOExecutionProvider") == [
        "[OpenVINO] Device GPU is not available"
    ]


def test_the_missing_cuda_library_comes_first() -> None:
    found = providers._problems(CUDA_NO_LIBS, "", "CUDAExecutionProvider")
    assert found[0] == ("Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: "
                        "cannot open shared object file: No such file or directory")
    assert "Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*." in found


def test_placements_lists_the_nodes_left_on_cpu() -> None:
    assert placements(MIXED_PLACEMENT) == {"OpenVINOExecutionProvider": ["?"], "CPUExecutionProvider":
                                           ["Relu (relu0)", "Det (det0)"]}
    assert placements("no placement here\n") is None


def test_placements_of_a_real_verbose_session_log(digits_assets: Path, capfd: pytest.CaptureFixture[str]) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 0
    ort.InferenceSession(str(digits_assets / "digits.int8.onnx"), options, providers=["CPUExecutionProvider"])
    placed = placements(capfd.readouterr().err)
    assert placed is not None and list(placed) == ["CPUExecutionProvider"] and len(placed["CPUExecutionProvider"]) > 3


# --- refusing a silent fallback -------------------------------------------------------------------------------


class LyingGpuWheel:
    """Stand-in for onnxruntime-gpu on a machine without CUDA: CUDA is offered, sessions run on CPU.

    ``claims`` is what ``get_providers()`` answers; the log line is the one onnxruntime-gpu 1.31.1 wrote here.
    """

    def __init__(self, claims: list[str] | None, log: str = CUDA_NO_LIBS) -> None:
        self.claims = claims
        self.log = log
        self.real = ort.InferenceSession

    def __call__(self, path: str, sess_options: Any = None, providers: Any = None) -> Any:
        os.write(2, self.log.encode())
        session = self.real(path, sess_options, providers=["CPUExecutionProvider"])
        if self.claims is not None:
            session.get_providers = lambda: list(self.claims)  # type: ignore[method-assign]
        return session


@pytest.fixture
def gpu_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])


def test_silent_cpu_fallback_is_never_cuda(gpu_wheel: None, monkeypatch: pytest.MonkeyPatch,
                                           digits_assets: Path) -> None:
    monkeypatch.setattr(ort, "InferenceSession", LyingGpuWheel(claims=None))
    with pytest.raises(EpUnavailableError) as info:
        open_session(digits_assets / "digits.int8.onnx", SessionSpec("cuda", EpOptions()))
    message = str(info.value)
    assert message.startswith("cuda: asked for CUDAExecutionProvider(device_id=0) but the session runs on "
                              "['CPUExecutionProvider']; ORT fell back silently (onnxruntime said: Failed to load "
                              "library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13")


def test_cuda_listed_first_but_placing_no_node_is_refused(gpu_wheel: None, monkeypatch: pytest.MonkeyPatch,
                                                          digits_assets: Path) -> None:
    # get_providers() says CUDA, but ORT's own placement log (real: the session is a CPU one) puts every node on CPU
    monkeypatch.setattr(ort, "InferenceSession",
                        LyingGpuWheel(claims=["CUDAExecutionProvider", "CPUExecutionProvider"], log=""))
    with pytest.raises(EpUnavailableError, match=r"CUDAExecutionProvider took none of the nodes "
                                                 r"\(CPUExecutionProvider: \d+\); ORT fell back silently"):
        open_session(digits_assets / "digits.int8.onnx", SessionSpec("cuda", EpOptions()))


def test_silent_fallback_skips_in_the_gate_and_errors_when_strict(gpu_wheel: None, monkeypatch: pytest.MonkeyPatch,
                                                                  project: GateProject) -> None:
    monkeypatch.setattr(ort, "InferenceSession", LyingGpuWheel(claims=None))
    project.write([project.add_sidecar("digits")])
    result = project.run("--quantgate-ep", "cuda", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *quantgate: cuda: asked for CUDAExecutionProvider(device_id=0) but the "
                                 "session runs on *CPUExecutionProvider*; ORT fell back silently*libcublasLt.so.13*"])
    result = project.run("--quantgate-ep", "cuda", "--quantgate-strict-ep")
    result.assert_outcomes(errors=1)
    assert "PASSED" not in result.stdout.str()


def test_a_broken_model_is_a_model_error_not_an_ep_problem(tmp_path: Path) -> None:
    from pytest_quantgate.errors import ModelFileError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="onnxruntime cannot load the model"):
        open_session(bad, SessionSpec("cpu", EpOptions()))


def test_sessions_on_cpu_still_run(digits_assets: Path) -> None:
    session = open_session(digits_assets / "digits.int8.onnx", SessionSpec("cpu", EpOptions()))
    assert session.get_providers() == ["CPUExecutionProvider"]
    (out,) = session.run(None, {"features": np.zeros((2, 64), np.float32)})
    assert out.shape == (2, 1)


def test_fast_int8_kernels_on_a_cpu_without_vnni_are_named_in_the_result(project: GateProject,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_quantgate import system

    project.write([project.add_sidecar("mlp")])
    monkeypatch.setattr(system, "int8_saturates", lambda: True)
    fast = project.run("--quantgate-ep", "cpu", "--quantgate-int8-precision", "fast", "-rA")
    # the verdict itself depends on this CPU's kernels in fast mode (the digits sidecar is U8S8): only the warning is
    # the same everywhere
    assert fast.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
    fast.stdout.fnmatch_lines(["*--quantgate-int8-precision fast on an x86 CPU without VNNI*"])
    exact = project.run("--quantgate-ep", "cpu", "-rA")
    exact.assert_outcomes(passed=1)
    assert "without VNNI" not in exact.stdout.str()
