"""The summary tables: one row per item, and drops per EP side by side with the fp32 cross-EP check."""

from __future__ import annotations

from pytest_quantgate.reporting.reports import EP_FP32_TOLERANCE, per_ep_lines, summary_lines
from pytest_quantgate.records import GateResult
from pytest_quantgate.records import Outcome
from pytest_quantgate.records import Interval


def row(entry_id: str, ep: str, drop: float | None, verdict: str, probe: list[float] | None = None) -> Outcome:
    """An outcome as the gate makes it: measured (PASS/FAIL, with a result) or not (ERROR/SKIP)."""
    status = verdict.lower()
    if drop is None:
        return Outcome(entry_id, ep, "static", status, "r")  # type: ignore[arg-type]
    result = GateResult(entry_id, ep, "static", 100, 0.01, verdict, "r", "pass" if verdict == "PASS" else "drop",
                        drop=drop, interval=Interval(0.001, 0.003, 0.95, 100), fp32_probe=tuple(probe or ()))
    return Outcome(entry_id, ep, "static", status, "r", result)  # type: ignore[arg-type]


def test_summary_has_headroom_ci_and_sorted_rows() -> None:
    lines = summary_lines([row("b", "cpu", 0.002, "PASS"), row("a", "cpu", 0.02, "FAIL")])
    assert lines[0].split() == ["id", "EP", "mode", "samples", "drop", "CI", "budget", "headroom", "size",
                                "speed-up", "verdict"]
    assert lines[2].split()[:2] == ["a", "cpu"] and lines[2].endswith("FAIL")
    assert "x5.0" in lines[3]
    assert lines[-1] == "a [cpu] FAIL: r"


def test_per_ep_table_puts_drops_side_by_side_and_flags_a_disagreeing_baseline() -> None:
    probe = [float(i) for i in range(10)]
    shifted = [v + 0.5 for v in probe]  # 0.5 / range 9 = 5.6e-2, far above the tolerance
    nearly = [v + 1e-6 for v in probe]
    lines = per_ep_lines([
        row("m1", "cpu", 0.001, "PASS", probe), row("m1", "openvino", 0.0012, "PASS", nearly),
        row("m2", "cpu", 0.001, "PASS", probe), row("m2", "openvino", 0.004, "PASS", shifted),
        row("m3", "cpu", None, "ERROR"), row("m3", "openvino", None, "SKIP"),
    ])
    assert lines[0].split() == ["id", "cpu", "openvino", "fp32", "across", "EPs"]
    assert lines[2].split() == ["m1", "0.001000", "PASS", "0.001200", "PASS", "agree"]
    assert "DISAGREE (5.56e-02)" in lines[3]
    assert lines[4].split() == ["m3", "ERROR", "SKIP", "-"]
    assert any(line.startswith("m2: fp32 outputs differ across EPs") for line in lines)
    assert EP_FP32_TOLERANCE < 5.56e-2


def test_per_ep_table_is_empty_with_one_ep() -> None:
    assert per_ep_lines([row("m1", "cpu", 0.001, "PASS", [1.0, 2.0])]) == []
