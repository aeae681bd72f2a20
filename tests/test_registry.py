"""The registry module on its own: parsing, defaults, per-entry problems, paths, the write guard and pin_text."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_quantgate.errors import RegistryError
from pytest_quantgate.io.registry import load_registry, parse_json_text, parse_registry, pin_text

SHA = "a" * 64


def _entry(entry_id: str, mode: str = "dynamic", **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": entry_id, "onnx": f"{entry_id}.onnx", "quant_mode": mode, **extra}
    if mode != "fp32":
        entry.setdefault("sha256", SHA)
        entry.setdefault("int8_sha256", SHA)
    return entry


def _parse(tmp_path: Path, *entries: dict[str, Any]) -> Any:
    return parse_registry({"schema_version": 1, "models": list(entries)}, tmp_path / "registry.json")


def test_entries_come_sorted_by_id_with_the_mode_defaults(tmp_path: Path) -> None:
    registry = _parse(tmp_path, _entry("b", "qat"), _entry("a"), _entry("c", "fp32"))
    assert [e.id for e in registry.entries] == ["a", "b", "c"]  # xdist workers must collect the same order
    a, b, c = registry.entries
    assert (a.budget_plcc, a.deploy_batch, a.int8_onnx) == (0.01, 1, "a.int8.onnx")
    assert (b.budget_plcc, b.deploy_batch) == (0.002, None)
    assert not c.gated and a.gated and a.location == "$.models[1]"


def test_an_invalid_entry_is_a_problem_of_its_own_and_the_others_stay(tmp_path: Path) -> None:
    registry = _parse(tmp_path, _entry("good"), {"id": "bad", "onnx": "bad.onnx", "quant_mode": "static",
                                                 "sha256": SHA, "int8_sha256": SHA})
    assert [e.id for e in registry.entries] == ["good"]
    (problem,) = registry.problems
    assert problem.label == "bad" and "quant_calibration_set" in problem.message
    assert str(tmp_path / "registry.json") in problem.message


def test_duplicate_ids_are_problems_naming_every_place(tmp_path: Path) -> None:
    registry = _parse(tmp_path, _entry("twin"), _entry("twin"), _entry("solo"))
    assert [e.id for e in registry.entries] == ["solo"]
    assert {p.label for p in registry.problems} == {"twin@models[0]", "twin@models[1]"}
    assert all("$.models[0], $.models[1]" in p.message for p in registry.problems)


def test_a_whole_file_problem_raises_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"registry\.json: not a valid registry"):
        parse_registry({"models": []}, tmp_path / "registry.json")


@pytest.mark.parametrize(("text", "message"), [
    ('{"schema_version": 1, "models": [}', "malformed JSON"),
    ('{"schema_version": 1, "models": [], "x": NaN}', "NaN is not a finite number"),
    ('{"schema_version": 1, "models": [], "x": 1e999}', "1e999 is not a finite number"),
    ("[" * 40 + "]" * 40, "nested deeper than"),
])
def test_json_that_cannot_be_a_registry_is_refused_with_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        parse_json_text(text, tmp_path / "registry.json")


def test_paths_stay_inside_the_registry_folder(tmp_path: Path) -> None:
    registry = _parse(tmp_path, _entry("m", soak_fixture="soak/m.npz"))
    entry = registry.entry("m")
    assert registry.fp32_path(entry) == tmp_path / "m.onnx"
    assert registry.soak_candidates(entry, tmp_path / "fx") == [tmp_path / "soak/m.npz", tmp_path / "fx/soak/m.npz"]
    with pytest.raises(RegistryError, match="field 'onnx'"):
        registry.resolve(entry, "../outside.onnx", "onnx")
    with pytest.raises(RegistryError, match="no entry with id 'nope'"):
        registry.entry("nope")


def test_the_write_guard_protects_every_file_named_in_another_role(tmp_path: Path) -> None:
    for name in ("a.onnx", "b.onnx", "b.int8.onnx"):
        (tmp_path / name).write_bytes(b"x")
    registry = _parse(tmp_path, _entry("a"), _entry("b"))
    (tmp_path / "registry.json").write_text("{}")
    guard = registry.write_guard(registry.entry("a"), tmp_path)
    guard.check(tmp_path / "a.int8.onnx")  # its own sidecar
    for target, role in (("a.onnx", "fp32 model of this entry"), ("b.int8.onnx", "int8 sidecar of entry 'b'"),
                         ("registry.json", "registry registry.json itself")):
        with pytest.raises(RegistryError, match=role):
            guard.check(tmp_path / target)
    os.link(tmp_path / "b.onnx", tmp_path / "hard.onnx")
    with pytest.raises(RegistryError, match="fp32 model of entry 'b'"):
        guard.check(tmp_path / "hard.onnx")  # a hard link is the same file


def test_pin_text_changes_only_the_pinned_fields_and_keeps_the_layout(tmp_path: Path) -> None:
    text = ('{\n  "schema_version":  1,\n  "models": [\n    {"id": "m", "onnx": "m.onnx",\n     "quant_mode": "fp32"}\n'
            '  ]\n}\n')
    out = pin_text(text, {"m": {"sha256": SHA}}, tmp_path / "r.json")
    assert out == text.replace('"onnx": "m.onnx",', f'"onnx": "m.onnx", "sha256": "{SHA}",')
    with pytest.raises(RegistryError, match="no entry with id 'x'"):
        pin_text(text, {"x": {"sha256": SHA}}, tmp_path / "r.json")


def test_pin_text_writes_an_object_last_and_re_pins_it_member_by_member(tmp_path: Path) -> None:
    data = {"schema_version": 1, "models": [_entry("m")]}
    text = json.dumps(data, indent=4)
    build = {"producer": "qat", "gate": {"drop": 0.001, "drop_interval": [0.0, 0.002]}, "libraries": {"torch": "1"}}
    once = pin_text(text, {"m": {"int8_build": build}}, tmp_path / "r.json")
    assert json.loads(once)["models"][0]["int8_build"] == build
    assert once.rstrip().endswith('"producer": "qat"\n            }\n        }\n    ]\n}')  # last, in the file's indent
    assert '\n                "gate": {\n                    "drop": 0.001,' in once
    changed = {**build, "gate": {**build["gate"], "drop": 0.0012}}
    twice = pin_text(once, {"m": {"int8_build": changed}}, tmp_path / "r.json")
    diff = [(a, b) for a, b in zip(once.splitlines(), twice.splitlines()) if a != b]
    assert diff == [('                    "drop": 0.001,', '                    "drop": 0.0012,')]
    assert json.loads(pin_text(twice, {"m": {"int8_build": None}}, tmp_path / "r.json"))["models"][0][
        "int8_build"] is None


def test_load_registry_reads_the_bundled_registry() -> None:
    registry = load_registry(Path(__file__).resolve().parents[1] / "model" / "registry.json")
    assert {e.id for e in registry.entries if e.gated} == {"fusion_mlp_v1", "nr_cnn_v1", "residual_filter_v1"}
    assert not registry.problems
    assert all(e.source.get("int8_build") for e in registry.entries if e.gated)  # pinned with their builds
