"""records: one JSON round trip for every record (GateResult and Outcome too), refusals naming the field path."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import recordkit

from pytest_quantgate.records import GateResult, LabelReport, OutputReport
from pytest_quantgate.records import Outcome, read_report
from pytest_quantgate.records import Interval, PairMetrics
from pytest_quantgate.records import (
    Diagnosis,
    FileRef,
    LineageRecord,
    PlotData,
    Provenance,
    RecordError,
    TensorError,
    Timing,
    dump,
    load,
)

RECORDS: list[Any] = [
    recordkit.timing(), replace(recordkit.timing(), speedup=1.25, batch=None),
    FileRef("a.onnx", "d" * 64), recordkit.provenance(), LineageRecord(False, ("weights differ",), 1, 2),
    recordkit.plot(), replace(recordkit.plot(), target=(0.1, 0.3)), *recordkit.diagnosis().worst,
    recordkit.diagnosis(), Diagnosis("a", "b", "unknown", 0), recordkit.pair_metrics(), recordkit.interval(),
    LabelReport("argmax(axis=1)", 0.0, 0.01), *recordkit.gate_result().outputs, recordkit.gate_result(),
    recordkit.gate_result(verdict="FAIL", kind="drop", drop=math.inf, interval=None, outputs=(), timing=None,
                          provenance=None, lineage=None, diagnosis=None, plot=None),
    recordkit.outcome(), recordkit.outcome(status="error", result=None, traceback="Traceback ...", cached=True),
]


def _json(value: Any) -> Any:
    """Return ``value`` through strict JSON text, as a report file or pytest's cache holds it."""
    return json.loads(json.dumps(value, allow_nan=False))  # allow_nan=False: no Infinity/NaN literals written


def _same(a: Any, b: Any) -> bool:
    """Compare records whose floats may be NaN (NaN != NaN): equal types and equal JSON forms."""
    return type(a) is type(b) and json.dumps(dump(a), sort_keys=True) == json.dumps(dump(b), sort_keys=True)


def test_every_record_type_is_covered() -> None:
    covered = {type(r) for r in RECORDS}
    assert covered == {Timing, FileRef, Provenance, LineageRecord, PlotData, TensorError, Diagnosis, PairMetrics,
                       Interval, LabelReport, OutputReport, GateResult, Outcome}


@pytest.mark.parametrize("record", RECORDS, ids=[f"{type(r).__name__}-{i}" for i, r in enumerate(RECORDS)])
def test_dump_then_load_gives_the_record_back(record: Any) -> None:
    back = load(type(record), _json(dump(record)))
    assert _same(back, record)
    if not any(isinstance(v, float) and math.isnan(v) for v in _floats(record)):
        assert back == record  # field by field, where no NaN makes == meaningless


def _floats(value: Any) -> list[float]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f for field in dataclasses.fields(value) for f in _floats(getattr(value, field.name))]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _floats(v)]
    return [value] if isinstance(value, float) else []


def test_non_finite_floats_are_strings_in_json_and_floats_again() -> None:
    metrics = recordkit.pair_metrics()
    data = dump(metrics)
    assert (data["srocc"], data["offset_rel"]) == ("nan", "inf")
    assert dump(-math.inf) == "-inf"
    back = load(PairMetrics, data)
    assert math.isnan(back.srocc) and back.offset_rel == math.inf
    # the reading is by type: a string field that says "nan" stays a string
    assert load(TensorError, dump(TensorError("output", "nan", "inf", None))).tensor == "nan"


def test_json_keys_of_renamed_fields() -> None:
    data = dump(recordkit.outcome())
    assert data["id"] == "m" and data["reason"].startswith("drop") and "entry_id" not in data and "message" not in data
    assert data["result"]["id"] == "m"


def test_dump_turns_numpy_paths_and_tuples_into_json() -> None:
    assert dump({"n": np.int64(3), "x": np.float32(0.5), "p": Path("a/b"), 2: (1, np.float64(math.nan))}) == \
        {"n": 3, "x": 0.5, "p": "a/b", "2": [1, "nan"]}
    assert dump(True) is True and dump(None) is None


def test_gate_result_json_adds_readers_values_and_reads_them_back_ignored() -> None:
    result = recordkit.gate_result()
    data = result.to_json()
    assert data["headroom"] == pytest.approx(0.01 / 0.0007)
    assert data["timing"]["size_ratio"] == pytest.approx(0.3)
    assert _same(GateResult.from_json(_json(data)), result)
    assert replace(result, drop=0.0).to_json()["headroom"] == "inf"
    assert replace(result, drop=None, outputs=()).to_json()["headroom"] is None


def test_outcome_json_nests_the_results_json() -> None:
    outcome = recordkit.outcome()
    data = outcome.to_json()
    assert data["verdict"] == "PASS" and data["result"]["headroom"] == pytest.approx(0.01 / 0.0007)
    assert _same(Outcome.from_json(_json(data)), outcome)
    assert Outcome.from_json(_json(recordkit.outcome(result=None).to_json())).result is None


def test_unknown_keys_are_ignored_and_missing_defaults_apply() -> None:
    data = dump(FileRef("a", "b"))
    assert load(FileRef, {**data, "size": 12, "note": [1]}) == FileRef("a", "b")
    assert load(Diagnosis, {"fp32_path": "a", "int8_path": "b", "format": "qdq", "feeds": 2}) == \
        Diagnosis("a", "b", "qdq", 2)


def test_read_report_takes_both_report_forms() -> None:
    items = [recordkit.outcome().to_json(), recordkit.outcome(entry_id="n", status="skip", result=None).to_json()]
    for document in ({"items": items, "summary": {}}, items):
        got = read_report(_json(document))
        assert [o.entry_id for o in got] == ["m", "n"] and got[1].status == "skip"
    for bad in ({"rows": items}, "items", None):
        with pytest.raises(RecordError, match="report: expected a list of items or an object with 'items'"):
            read_report(bad)


# --- bad data: RecordError naming the field path ---------------------------------------------------------------


def _result_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = _json(recordkit.gate_result().to_json())
    data.update(changes)
    return data


def _nested(path: list[Any], value: Any) -> dict[str, Any]:
    data = _result_data()
    cursor: Any = data
    for key in path[:-1]:
        cursor = cursor[key]
    cursor[path[-1]] = value
    return data


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("int as text", _result_data(samples="1200"), "GateResult.samples: expected an integer, got '1200'"),
    ("bool for an int", _result_data(samples=True), "GateResult.samples: expected an integer, got True"),
    ("float for an int", _result_data(samples=1200.0), "GateResult.samples: expected an integer, got 1200.0"),
    ("number as text", _result_data(budget="0.01"), "GateResult.budget: expected a number, got '0.01'"),
    ("bool for a float", _result_data(budget=False), "GateResult.budget: expected a number, got False"),
    ("literal", _result_data(verdict="MAYBE"), "GateResult.verdict: 'MAYBE' is not one of 'PASS', 'FAIL'"),
    ("kind", _result_data(kind="vibes"), "GateResult.kind: 'vibes' is not one of 'pass', 'drop', "),
    ("string", _result_data(ep=7), "GateResult.ep: expected a string, got 7"),
    ("missing", {k: v for k, v in _result_data().items() if k != "reason"}, r"GateResult.reason: missing"),
    ("renamed key missing", {k: v for k, v in _result_data().items() if k != "id"}, r"GateResult.id: missing"),
    ("list", _result_data(warnings="w1"), "GateResult.warnings: expected a list, got str"),
    ("list item", _result_data(fp32_probe=[0.5, "x"]), r"GateResult.fp32_probe\[1\]: expected a number, got 'x'"),
    ("optional record", _result_data(interval=[0.1, 0.2]), "GateResult.interval: expected an object for Interval, "
                                                           "got list"),
    ("optional number", _result_data(drop="small"), "GateResult.drop: expected a number, got 'small'"),
    ("nested", _nested(["outputs", 1, "vs_fp32", "plcc"], "high"),
     r"GateResult.outputs\[1\].vs_fp32.plcc: expected a number, got 'high'"),
    ("nested deeper", _nested(["outputs", 1, "labels", "interval", "replicates"], 1.5),
     r"GateResult.outputs\[1\].labels.interval.replicates: expected an integer, got 1.5"),
    ("a mapping", _nested(["provenance", "system"], ["cpu"]), "GateResult.provenance.system: expected an object, "
                                                              "got list"),
    ("a mapping of strings", _nested(["provenance", "session_config", "k"], 1),
     "GateResult.provenance.session_config.k: expected a string, got 1"),
    ("a tensor's optional float", _nested(["diagnosis", "worst", 0, "sqnr_db"], "-"),
     r"GateResult.diagnosis.worst\[0\].sqnr_db: expected a number, got '-'"),
]


@pytest.mark.parametrize(("data", "message"), [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_data_that_does_not_fit_names_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(RecordError, match=f"^{message}"):
        GateResult.from_json(data)


def test_the_path_starts_where_the_caller_says() -> None:
    with pytest.raises(RecordError, match=r"^items\[3\].status: 'done' is not one of"):
        load(Outcome, {**recordkit.outcome().to_json(), "status": "done"}, "items[3]")
    with pytest.raises(RecordError, match=r"^Timing: expected an object for Timing, got list"):
        load(Timing, [1, 2])
