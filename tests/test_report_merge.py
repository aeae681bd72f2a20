"""``quantgate report merge``: the JSON reports of separate EP jobs joined into one model × EP table.

The reports are real: the gate runs on the digits project twice, the second run standing in for an OpenVINO job
(the test environment has one onnxruntime wheel, the CPU one) by its EP name, runtime and session config. A
divergence, a task-judged entry and the refusals are made by editing those real reports where a real run cannot
produce them here. ``.ci/run`` merges real CPU and OpenVINO reports from its two environments.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import browserkit
import pytest
from conftest import GateProject

from pytest_quantgate.frontends.cli import main
from pytest_quantgate.reporting.merge import merge_files, render_html

EVIL = "<img src=x onerror=alert(1)>&\"'"


def _gate(project: GateProject, name: str, *args: str) -> dict[str, Any]:
    """Run the gate on the project, writing the JSON report ``name``; return the report."""
    path = project.root / name
    result = project.run(f"--quantgate-report={path}", *args)
    assert result.ret == 0, result.stdout.str()
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def as_openvino(report: dict[str, Any]) -> dict[str, Any]:
    """Return ``report`` as an OpenVINO job writes it: the EP, its providers, runtime and session config."""
    report = copy.deepcopy(report)
    for item in report["items"]:
        item["ep"] = "openvino"
        result = item["result"]
        result["ep"] = "openvino"
        prov = result["provenance"]
        prov.update(ep="openvino", providers=["OpenVINOExecutionProvider", "CPUExecutionProvider"],
                    provider_options={"OpenVINOExecutionProvider": {"device_type": "CPU", "precision": "FP32"},
                                      "CPUExecutionProvider": {}},
                    onnxruntime="onnxruntime-openvino 1.24.1",
                    session_config={"session.disable_cpu_ep_fallback": "1"})
    return report


@pytest.fixture
def reports(project: GateProject) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return a CPU report of two entries and a second run of them (another bootstrap seed) as an OpenVINO job."""
    project.write([project.add_sidecar("digits_a"), project.add_sidecar("digits_b")])
    cpu = _gate(project, "cpu.json", "--quantgate-ep=cpu")
    other = _gate(project, "other.json", "--quantgate-ep=cpu", "--quantgate-seed=7")
    return cpu, as_openvino(other)


def _save(folder: Path, name: str, report: Any) -> Path:
    path = folder / name
    path.write_text(json.dumps(report, indent=2))
    return path


def _merge(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["report", "merge", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _item(report: dict[str, Any], entry_id: str) -> dict[str, Any]:
    item: dict[str, Any] = next(i for i in report["items"] if i["id"] == entry_id)
    return item


def _set_drop(report: dict[str, Any], entry_id: str, drop: float, low: float, high: float) -> None:
    result = _item(report, entry_id)["result"]
    result["drop"] = drop
    result["interval"] = {**result["interval"], "low": low, "high": high}


# --- the table ------------------------------------------------------------------------------------------------------


def test_two_ep_reports_merge_into_one_table_with_each_eps_provenance(
        reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpu, openvino = reports
    a, b = _save(tmp_path, "quantgate-cpu.json", cpu), _save(tmp_path, "quantgate-openvino.json", openvino)
    code, out, err = _merge(capsys, a, b, "--json", tmp_path / "merged.json")
    assert code == 0, out + err
    rows = [line.split() for line in out.splitlines() if line.startswith("digits_")]
    assert [(r[0], r[1], r[8]) for r in rows] == [("digits_a", "cpu", "PASS"), ("digits_a", "openvino", "PASS"),
                                                 ("digits_b", "cpu", "PASS"), ("digits_b", "openvino", "PASS")]
    drop = _item(cpu, "digits_a")["result"]["drop"]
    assert rows[0][3] == f"{drop:.6f}" and rows[0][9] == str(a) and rows[1][9] == str(b)
    # each column names its runtime, EP options and CPU kernel flags
    assert "  openvino: onnxruntime-openvino 1.24.1, providers OpenVINOExecutionProvider, CPUExecutionProvider; " \
           "EP options OpenVINOExecutionProvider: device_type=CPU, precision=FP32" in out
    assert "session config session.disable_cpu_ep_fallback=1" in out
    assert "session config session.x64quantprecision=1" in out  # the CPU EP's exact int8 kernels
    isa = _item(cpu, "digits_a")["result"]["provenance"]["system"]["cpu"]["isa"]
    assert f"ISA {' '.join(isa) or '-'}" in out
    assert "No divergence between EPs." in out
    # the other seed moved the interval, not the drop: compared, and they overlap
    assert "compared: digits_a: " in out and ": intervals overlap (95% CI [" in out

    doc = json.loads((tmp_path / "merged.json").read_text())
    assert doc["kind"] == "quantgate report merge" and doc["eps"] == ["cpu", "openvino"]
    assert [r["id"] for r in doc["rows"]] == ["digits_a", "digits_b"]
    cell = doc["rows"][0]["cells"]["openvino"]
    assert cell["verdict"] == "PASS" and cell["report"] == str(b) and cell["interval"]["level"] == 0.95
    assert doc["columns"]["openvino"][0]["onnxruntime"] == "onnxruntime-openvino 1.24.1"
    assert doc["columns"]["cpu"][0]["session_config"] == {"session.x64quantprecision": "1"}
    assert {d["kind"] for d in doc["divergences"]} == {"interval"}
    assert not any(d["flagged"] for d in doc["divergences"]) and doc["exit_code"] == 0
    assert [r["format"] for r in doc["reports"]] == ["2", "2"]


def test_measure_item_lists_merge_like_pytest_reports(
        reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpu, openvino = reports
    code, out, err = _merge(capsys, _save(tmp_path, "cpu.json", cpu["items"]), _save(tmp_path, "ov.json", openvino))
    assert code == 0, out + err
    assert out.count(" PASS ") == 4


def test_a_divergence_names_both_eps_and_fails_the_merge(
        reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, openvino = reports
    _set_drop(cpu, "digits_a", 0.0015, 0.0012, 0.0018)
    _set_drop(openvino, "digits_a", 0.0031, 0.0027, 0.0035)
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, out, _ = _merge(capsys, _save(tmp_path, "cpu.json", cpu), _save(tmp_path, "ov.json", openvino),
                          "--step-summary", "--json", tmp_path / "m.json")
    assert code == 1
    sentence = "digits_a: openvino drop 0.0031 vs cpu 0.0015: intervals do not overlap (95% CI [0.0027, 0.0035] " \
               "vs [0.0012, 0.0018])"
    assert f"  DIVERGE {sentence}" in out
    assert re.search(r"^digits_a +openvino .* PASS \*", out, re.M)  # the cells stay PASS, marked
    assert "digits_b: " in out and "Divergences between EPs (1):" in out
    text = summary.read_text()
    assert text.startswith("earlier step\n### quantgate: model × EP\n")  # appended, not replaced
    assert f"- ⚠️ {sentence}" in text
    assert "| `digits_a` | dynamic | **✅ PASS 0.001500 [0.00120, 0.00180] / " in text and "⚠️ diverges**" in text
    assert "| cpu | onnxruntime " in text and "| openvino | onnxruntime-openvino 1.24.1 |" in text
    doc = json.loads((tmp_path / "m.json").read_text())
    flagged = [d for d in doc["divergences"] if d["flagged"]]
    assert [(d["id"], d["eps"], d["kind"]) for d in flagged] == [("digits_a", ["openvino", "cpu"], "interval")]
    assert flagged[0]["int8_sha256"] == _item(cpu, "digits_a")["result"]["provenance"]["int8"]["sha256"]
    assert doc["exit_code"] == 1


def test_without_step_summary_variable_the_markdown_is_printed(
        reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    cpu, openvino = reports
    code, out, _ = _merge(capsys, _save(tmp_path, "c.json", cpu), _save(tmp_path, "o.json", openvino),
                          "--step-summary")
    assert code == 0
    assert "### quantgate: model × EP" in out and "| id | mode | cpu | openvino |" in out


def test_without_an_interval_the_point_drops_are_compared_with_a_note(
        project: GateProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project.write([project.add_sidecar("digits_a")])
    cpu = _gate(project, "cpu.json", "--quantgate-ep=cpu")
    other = as_openvino(_gate(project, "nobootstrap.json", "--quantgate-ep=cpu", "--quantgate-bootstrap=0"))
    assert _item(other, "digits_a")["result"]["interval"] is None  # a real run without bootstrap
    a, b = _save(tmp_path, "cpu.json", cpu), _save(tmp_path, "ov.json", other)
    code, out, _ = _merge(capsys, a, b)
    assert code == 0
    assert "point drops within 0.1 × budget" in out and "note: no bootstrap interval on" in out
    # a gap of more than a tenth of the budget is flagged
    budget = _item(cpu, "digits_a")["result"]["budget"]
    _item(other, "digits_a")["result"]["drop"] = _item(cpu, "digits_a")["result"]["drop"] + 0.2 * budget
    code, out, _ = _merge(capsys, a, _save(tmp_path, "ov.json", other))
    assert code == 1
    assert re.search(r"DIVERGE digits_a: openvino drop \S+ vs cpu \S+: point drops differ by more than 0.1 × budget",
                     out), out


def test_task_judged_entries_compare_budget_use_without_flagging(
        reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpu, openvino = reports
    for report, flips in ((cpu, 0.002), (openvino, 0.009)):  # judged by label flips: no PLCC drop
        result = _item(report, "digits_b")["result"]
        result["drop"] = None
        result["outputs"][0]["labels"] = {"what": "argmax(axis=1)", "flip_rate": flips, "budget": 0.01}
    code, out, _ = _merge(capsys, _save(tmp_path, "c.json", cpu), _save(tmp_path, "o.json", openvino))
    assert code == 0, out
    assert "compared: digits_b: openvino budget use 90.00% vs cpu 20.00% (judged by task measures, no PLCC drop: " \
           "compared, not flagged)" in out
    assert re.search(r"^digits_b +openvino +dynamic +use 90.00% ", out, re.M)


def test_a_failed_item_fails_the_merge(reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cpu, openvino = reports
    item = _item(openvino, "digits_b")
    item["status"], item["verdict"], item["reason"] = "fail", "FAIL", "drop over budget"
    item["result"]["verdict"] = "FAIL"
    code, out, _ = _merge(capsys, _save(tmp_path, "c.json", cpu), _save(tmp_path, "o.json", openvino))
    assert code == 1
    assert "digits_b [openvino] FAIL: drop over budget" in out


# --- refusals -------------------------------------------------------------------------------------------------------


def test_refuses_reports_of_other_sidecar_bytes_naming_files_entry_and_field(
        reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpu, openvino = reports
    _item(openvino, "digits_a")["result"]["provenance"]["int8"]["sha256"] = "ab" * 32
    a, b = _save(tmp_path, "cpu.json", cpu), _save(tmp_path, "ov.json", openvino)
    code, out, err = _merge(capsys, a, b, "--json", tmp_path / "m.json")
    assert code == 2 and out == "" and not (tmp_path / "m.json").exists()
    pinned = _item(cpu, "digits_a")["result"]["provenance"]["int8"]["sha256"]
    assert err == (f"quantgate report merge: error: digits_a: the reports measured different int8 files: int8 "
                   f"sha256 {pinned} in {a} [cpu], {'ab' * 32} in {b} [openvino]; merge only reports of the same "
                   "commit\n")


@pytest.mark.parametrize(("change", "expected"), [
    ({"format": 3}, "unknown report format: it is format 3; this version of quantgate reads format 2"),
    ({"format": 1}, "unknown report format: it is format 1 (flat rows, replaced by format 2: gate again with this "
                    "version)"),
    ({"format": None}, "unknown report format: it has no 'format' key"),
])
def test_refuses_a_report_format_it_does_not_know(
        reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        change: dict[str, Any], expected: str) -> None:
    cpu, openvino = reports
    odd = {k: v for k, v in {**openvino, **change}.items() if v is not None}
    bad = _save(tmp_path, "ov.json", odd)
    code, _, err = _merge(capsys, _save(tmp_path, "cpu.json", cpu), bad)
    assert code == 2
    assert err.startswith(f"quantgate report merge: error: {bad}: {expected}"), err


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "not a JSON report: Expecting property name"),
    ('"a string"', "not a quantgate report: expected an object with 'format' and 'items', got str"),
    ('{"format": 2, "items": [{"id": "m"}]}', "not a readable format-2 report: Outcome.ep: missing"),
])
def test_refuses_unreadable_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                    expected: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    code, _, err = _merge(capsys, bad)
    assert code == 2
    assert err.startswith(f"quantgate report merge: error: {bad}: {expected}"), err
    code, _, err = _merge(capsys, tmp_path / "missing.json")
    assert code == 2 and "missing.json: JSON report not found" in err


def test_refuses_a_merged_table_as_input(reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cpu, openvino = reports
    a, b = _save(tmp_path, "c.json", cpu), _save(tmp_path, "o.json", openvino)
    assert _merge(capsys, a, b, "--json", tmp_path / "merged.json")[0] == 0
    code, _, err = _merge(capsys, a, tmp_path / "merged.json")
    assert code == 2
    assert "merged.json: this is a merged table (quantgate report merge --json), not a gate report" in err


def test_one_entry_on_one_ep_twice_is_refused_unless_the_results_are_the_same(
        reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpu, openvino = reports
    a, b = _save(tmp_path, "cpu.json", cpu), _save(tmp_path, "ov.json", openvino)
    copy_of_a = _save(tmp_path, "cpu-again.json", cpu)  # the same artifact downloaded twice
    code, out, _ = _merge(capsys, a, b, copy_of_a)
    assert code == 0
    assert f"note: digits_a [cpu]: the same result is in {a} and {copy_of_a}; shown once" in out
    rerun = copy.deepcopy(cpu)
    _item(rerun, "digits_a")["result"]["drop"] = 0.0042
    other = _save(tmp_path, "cpu-rerun.json", rerun)
    code, _, err = _merge(capsys, a, b, other)
    assert code == 2
    drop = _item(cpu, "digits_a")["result"]["drop"]
    assert err == (f"quantgate report merge: error: digits_a [cpu] is in two reports with different results: {a} "
                   f"(PASS, drop {drop:.6f}) and {other} (PASS, drop 0.004200); merge one report per EP job\n")


# --- the HTML page --------------------------------------------------------------------------------------------------

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e)), true);
window.addEventListener('load', () => {
  const table = document.querySelector('table.merged');
  const r = table.getBoundingClientRect();
  const probe = {
    errors: window.__errors, table: [r.width, r.height],
    heads: [...table.querySelectorAll('th.ep')].map(th => th.textContent),
    provenance: [...table.querySelectorAll('td.prov')].map(td => td.innerText),
    rows: [...table.querySelectorAll('tbody tr')].map(tr => [...tr.children].map(td => td.textContent)),
    diverge: [...table.querySelectorAll('td.diverge')].map(td => getComputedStyle(td).backgroundColor),
    flagged: [...document.querySelectorAll('li.diverge')].map(li => li.textContent),
    scripts: document.querySelectorAll('script').length, handlers: document.querySelectorAll('[onerror]').length,
    images: document.images.length,
  };
  document.body.setAttribute('data-probe', JSON.stringify(probe));
});
</script>"""


def _browse(page: str, tmp_path: Path) -> dict[str, Any]:
    """Return what headless chromium sees of ``page`` (the PROBE's findings)."""
    return browserkit.browse(page, tmp_path, PROBE, window="1600,1000")


def test_html_page_renders_the_table_provenance_and_divergence_and_escapes_everything(
        reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpu, openvino = reports
    _set_drop(cpu, "digits_a", 0.0015, 0.0012, 0.0018)
    _set_drop(openvino, "digits_a", 0.0031, 0.0027, 0.0035)
    for report in (cpu, openvino):  # hostile text from a report stays text
        item = _item(report, "digits_b")
        item["id"] = item["result"]["id"] = EVIL
        report["items"][0]["result"]["provenance"]["system"]["cpu"]["model"] = EVIL
    page_path = tmp_path / "merged.html"
    code, _, err = _merge(capsys, _save(tmp_path, "c.json", cpu), _save(tmp_path, "o.json", openvino),
                          "--html", page_path)
    assert code == 1, err
    page = page_path.read_text()
    assert EVIL not in page and "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#x27;" in page
    assert "<script" not in page
    probe = _browse(page, tmp_path)
    assert probe["errors"] == [] and probe["scripts"] == 1 and probe["handlers"] == 0 and probe["images"] == 0
    assert probe["table"][0] > 300 and probe["table"][1] > 100
    assert probe["heads"] == ["cpu", "openvino"]
    cpu_prov, ov_prov = probe["provenance"]
    assert "onnxruntime: onnxruntime 1." in cpu_prov and "session config: session.x64quantprecision=1" in cpu_prov
    assert "onnxruntime: onnxruntime-openvino 1.24.1" in ov_prov
    assert "EP options: OpenVINOExecutionProvider: device_type=CPU, precision=FP32" in ov_prov
    assert f"CPU: {EVIL} (" in ov_prov or f"CPU: {EVIL} (" in cpu_prov
    ids = [row[0] for row in probe["rows"]]
    assert ids == sorted(["digits_a", EVIL])
    row = probe["rows"][ids.index("digits_a")]
    assert row[1:8] == ["dynamic", "0.001500", "[0.00120, 0.00180]", row[4], "PASS", row[6], "0.003100"]
    assert len(probe["diverge"]) == 10 and set(probe["diverge"]) == {"rgb(255, 235, 233)"}  # both EPs' cells
    assert probe["flagged"] == ["digits_a: openvino drop 0.0031 vs cpu 0.0015: intervals do not overlap (95% CI "
                                "[0.0027, 0.0035] vs [0.0012, 0.0018])"]


def test_html_without_a_cell_says_so(reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path) -> None:
    cpu, openvino = reports
    openvino["items"] = [i for i in openvino["items"] if i["id"] == "digits_a"]
    page = render_html(merge_files([_save(tmp_path, "c.json", cpu), _save(tmp_path, "o.json", openvino)]))
    assert page.count("not in any report") == 1


def test_merge_runs_without_onnxruntime(reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path) -> None:
    """The merge job installs no onnxruntime wheel: the command must not need one."""
    import sys

    cpu, openvino = reports
    a, b = _save(tmp_path, "c.json", cpu), _save(tmp_path, "o.json", openvino)
    code = ("import sys; sys.modules['onnxruntime'] = None\n"  # any import of it raises ImportError
            "from pytest_quantgate.frontends.cli import main\n"
            f"raise SystemExit(main(['report', 'merge', {str(a)!r}, {str(b)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No divergence between EPs." in done.stdout
