"""pytest_quantgate.engine.logcapture: ORT's native log lines and the quantisation tooling's log records are caught for a
block and summarised once (counts per level, distinct messages with repeat counts), never printed."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_quantgate.engine.logcapture import (
    ORT_ERROR,
    ORT_WARNING,
    LogMessage,
    capture_logs,
    session_options,
    set_ort_log_severity,
)
from pytest_quantgate.engine.ort import import_onnxruntime

UNUSED = "Removing initializer 'unused'. It is not used by any node and should be removed from the model."
PREPROCESS = "Please consider to run pre-processing before quantization."


def _conv_model(path: Path) -> Path:
    """Save a Conv+Relu model carrying an initializer no node uses (ORT warns about it on every load)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(3, np.float32), "unused")]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _open(path: Path, severity: int = ORT_WARNING) -> None:
    import_onnxruntime().InferenceSession(str(path), session_options(severity), providers=["CPUExecutionProvider"])


def test_native_ort_warnings_are_caught_counted_and_deduplicated(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    model = _conv_model(tmp_path / "conv.onnx")
    capfd.readouterr()
    with capture_logs() as captured:
        for _ in range(3):
            _open(model)
    assert UNUSED not in "".join(capfd.readouterr())  # nothing reached the terminal
    summary = captured.summary()
    assert summary.counts == {"WARNING": 3}
    assert summary.messages == (LogMessage("onnxruntime", "WARNING", UNUSED, 3),)
    assert summary.lines() == ["captured log output: 3 WARNING", f"  WARNING onnxruntime (x3): {UNUSED}"]

    _open(model)  # outside the block ORT prints as before: fd 2 was restored
    assert UNUSED in capfd.readouterr().err


def test_quantize_static_advice_and_native_lines_are_caught(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from onnxruntime.quantization import (  # type: ignore[import-untyped]
        CalibrationDataReader,
        QuantFormat,
        quantize_static,
    )

    model = _conv_model(tmp_path / "conv.onnx")
    rng = np.random.default_rng(1)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{"x": rng.normal(size=(1, 1, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    capfd.readouterr()
    with capture_logs() as captured:
        quantize_static(str(model), str(tmp_path / "conv.int8.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    out, err = capfd.readouterr()
    assert PREPROCESS not in out + err and UNUSED not in out + err
    summary = captured.summary()
    sources = {(m.source, m.level) for m in summary.messages}
    assert ("root", "WARNING") in sources and ("onnxruntime", "WARNING") in sources
    assert any(m.text.startswith(PREPROCESS) for m in summary.messages)
    assert any(m.text == UNUSED for m in summary.messages)
    assert summary.total == sum(m.count for m in summary.messages)
    assert (tmp_path / "conv.int8.onnx").is_file()


def test_session_severity_silences_ort_at_the_source(tmp_path: Path) -> None:
    model = _conv_model(tmp_path / "conv.onnx")
    with capture_logs() as captured:
        _open(model, severity=ORT_ERROR)
    assert captured.summary().total == 0
    assert captured.summary().lines() == []


def test_default_severity_is_set_in_one_place(tmp_path: Path) -> None:
    """set_ort_log_severity raises ORT's process default; a session without its own level follows it."""
    ort = import_onnxruntime()

    model = _conv_model(tmp_path / "conv.onnx")
    try:
        set_ort_log_severity(ORT_ERROR)
        with capture_logs() as quiet:
            ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        set_ort_log_severity(ORT_WARNING)  # ORT's own default
        with capture_logs() as loud:
            ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    finally:
        set_ort_log_severity(ORT_WARNING)
    assert quiet.summary().total == 0
    assert loud.summary().counts == {"WARNING": 1}


def test_python_records_limit_and_levels() -> None:
    log = logging.getLogger("onnxruntime.quantization.test")
    with capture_logs(limit=3, native=False) as captured:
        for i in range(5):
            log.warning("tensor %s has no calibration range", f"t{i}")
        for _ in range(4):
            logging.error("op type not supported")  # noqa: LOG015 - the ORT call behind `ERROR:root ...`
        log.info("below the level: not kept")
    summary = captured.summary()
    assert summary.counts == {"WARNING": 5, "ERROR": 4}
    assert [m.text for m in summary.messages] == [f"tensor t{i} has no calibration range" for i in range(3)]
    assert summary.omitted == 3  # t3, t4 and the root error
    assert summary.lines()[-1] == "  ... and 3 more distinct message(s)"


def test_basic_config_console_handler_is_detached_for_the_block_only(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)  # what logging.basicConfig() installs
    root.addHandler(console)
    try:
        with capture_logs(native=False) as captured:
            logging.warning("inside")  # noqa: LOG015 - as onnxruntime.quantization logs
            assert console not in root.handlers
        assert console in root.handlers
        logging.warning("outside")  # noqa: LOG015 - as onnxruntime.quantization logs
    finally:
        root.removeHandler(console)
    err = capsys.readouterr().err
    assert "inside" not in err and "outside" in err
    assert [m.text for m in captured.summary().messages] == ["inside"]


def test_fd_2_is_restored_after_an_exception_and_when_nested(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), capture_logs() as outer:
        os.write(2, b"outer before\n")
        with capture_logs() as inner:
            os.write(2, b"inner\n")
        os.write(2, b"outer after\n")
        raise RuntimeError("boom")
    os.write(2, b"free\n")
    assert capfd.readouterr().err == "free\n"
    assert [m.text for m in inner.summary().messages] == ["inner"]
    assert [(m.source, m.text) for m in outer.summary().messages] == [("stderr", "outer before"),
                                                                      ("stderr", "outer after")]


@pytest.mark.parametrize("mode", [["-n", "2"], ["-s"]], ids=["xdist", "no-capture"])
def test_safe_under_xdist_and_without_pytest_capture(pytester: pytest.Pytester, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, mode: list[str]) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # this checkout's package
    model = _conv_model(tmp_path / "conv.onnx")
    pytester.makepyfile(f"""
        import onnxruntime as ort
        import pytest
        from pytest_quantgate.engine.logcapture import capture_logs

        @pytest.mark.parametrize("i", range(4))
        def test_open(i):
            with capture_logs() as captured:
                ort.InferenceSession({str(model)!r}, providers=["CPUExecutionProvider"])
            assert captured.summary().counts == {{"WARNING": 1}}, captured.native
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *mode)
    result.assert_outcomes(passed=4)
    assert "Removing initializer" not in result.stdout.str() + result.stderr.str()


def test_cli_producer_prints_one_summary_instead_of_the_raw_lines(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    from pytest_quantgate.frontends.cli import main

    model = _conv_model(tmp_path / "conv.onnx")
    calibration = tmp_path / "conv.calib.npz"
    np.savez(calibration, x=np.random.default_rng(2).normal(size=(16, 1, 8, 8)).astype(np.float32))
    capfd.readouterr()
    assert main(["ptq-static", str(model), "--calibration-set", str(calibration)]) == 0
    out, err = capfd.readouterr()
    assert "[W:onnxruntime" not in err and "WARNING:root" not in err
    assert err.startswith("captured log output: "), err
    assert "  WARNING onnxruntime" in err and "Removing initializer 'unused'" in err
    assert err.count("Removing initializer 'unused'") == 1  # once, however often ORT said it
    assert "wrote " in out and (tmp_path / "conv.int8.onnx").is_file()
