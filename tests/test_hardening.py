"""Registry parsing refuses what json accepts but a registry must not hold, and never blocks or reads unbounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_quantgate.errors import RegistryError
from pytest_quantgate.fileio import DEFAULT_READ_CAP, check_regular, read_bounded
from pytest_quantgate.io.registry import (
    ID_MAX_LENGTH,
    MAX_JSON_DEPTH,
    REGISTRY_MAX_BYTES,
    known_keys,
    load_registry,
    parse_registry,
)

SHA = "a" * 64


def _entry(**extra: Any) -> dict[str, Any]:
    return {"id": "m", "onnx": "m.onnx", "quant_mode": "dynamic", "sha256": SHA, "int8_sha256": SHA, **extra}


def _write(folder: Path, text: str) -> Path:
    path = folder / "registry.json"
    path.write_text(text, encoding="utf-8")
    return path


def _quantgate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_quantgate.frontends.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])


# --- non-finite numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
@pytest.mark.parametrize("key", ["quant_budget_slope", "quant_accuracy_budget_plcc", "quant_min_speedup"])
def test_non_finite_numbers_are_refused_at_parse_naming_file_line_and_field(tmp_path: Path, literal: str,
                                                                           key: str) -> None:
    text = '{\n  "schema_version": 1,\n  "models": [\n    {"id": "m", "onnx": "m.onnx",\n     "%s": %s}\n  ]\n}\n'
    path = _write(tmp_path, text % (key, literal))
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = str(info.value)
    assert message.startswith(f"{path}:5:")
    assert f"field {key!r}" in message and f"{literal} is not a finite number" in message


def test_non_finite_number_inside_quant_options_and_arrays(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps({"schema_version": 1, "models": [_entry()]}).replace(
        '"sha256"', '"quant_options": {"lr_qat": NaN}, "notes": [1, Infinity], "sha256"', 1))
    with pytest.raises(RegistryError, match=r"registry.json:1:\d+: field 'lr_qat': NaN is not a finite number"):
        load_registry(path)


def test_the_words_inside_strings_are_fine(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps({"schema_version": 1, "models": [_entry(description="NaN Infinity 1e999")]}))
    assert load_registry(path).entries[0].description == "NaN Infinity 1e999"


def test_validate_reports_a_nan_budget_as_exit_2_without_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"schema_version": 1, "models": [{"id": "m", "onnx": "m.onnx", '
                            '"quant_budget_slope": NaN}]}')
    done = _quantgate("validate", str(path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert f"{path}:1:" in done.stderr and "'quant_budget_slope': NaN is not a finite number" in done.stderr


# --- ids ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["m\n", "m\r\n", "\nm", "a" * (ID_MAX_LENGTH + 1), "-m", "m/n", "", "m\u00e9"])
def test_bad_ids_are_entry_problems(tmp_path: Path, bad: str) -> None:
    registry = parse_registry({"schema_version": 1, "models": [_entry(id=bad), _entry(id="ok")]}, tmp_path / "r.json")
    assert [e.id for e in registry.entries] == ["ok"]
    (problem,) = registry.problems
    assert "$.models[0].id" in problem.message


def test_id_length_message_and_the_longest_allowed_id(tmp_path: Path) -> None:
    longest = "a" * ID_MAX_LENGTH
    registry = parse_registry({"schema_version": 1, "models": [_entry(id=longest), _entry(id=longest + "b")]},
                              tmp_path / "r.json")
    assert [e.id for e in registry.entries] == [longest]
    assert f"{ID_MAX_LENGTH + 1} characters, over the {ID_MAX_LENGTH} allowed" in registry.problems[0].message
    # the longest id still leaves room for the longest suffix the gate puts after an id
    assert len(f"{longest}.int8.onnx.0123456789ab.onnx.partial".encode()) + 1 < 255


def test_sha256_with_trailing_newline_is_refused(tmp_path: Path) -> None:
    registry = parse_registry({"schema_version": 1, "models": [_entry(sha256=SHA + "\n")]}, tmp_path / "r.json")
    assert not registry.entries and "a 64-character hex sha256" in registry.problems[0].message


def test_paths_with_nul_or_lone_surrogates_are_entry_problems(tmp_path: Path) -> None:
    registry = parse_registry({"schema_version": 1, "models": [
        _entry(id="nul", onnx="m\u0000.onnx"), _entry(id="sur", onnx="\ud800.onnx")]}, tmp_path / "r.json")
    assert not registry.entries
    messages = {p.label: p.message for p in registry.problems}
    assert "a path without NUL bytes" in messages["nul"]
    assert "$.models[1].onnx" in messages["sur"] and "cannot be encoded as a file name" in messages["sur"]


# --- every key the gate reads is typed, in the schema and on Entry ------------------------------------------


def test_every_schema_key_is_a_typed_entry_field(tmp_path: Path) -> None:
    entry_json = _entry(
        kind="mlp", description="d", quant_min_speedup=1.5, quant_options={"per_channel": True},
        quant_accuracy_budget_plcc=0.02, int8_onnx="x.int8.onnx", quant_budget_slope=0.2, license="MIT",
    )
    (entry,) = parse_registry({"schema_version": 1, "models": [entry_json]}, tmp_path / "r.json").entries
    assert (entry.kind, entry.description, entry.min_speedup) == ("mlp", "d", 1.5)
    assert dict(entry.quant_options) == {"per_channel": True}
    assert (entry.explicit_budget_plcc, entry.budget_plcc, entry.budget_slope) == (0.02, 0.02, 0.2)
    assert entry.int8_onnx_explicit and entry.int8_onnx == "x.int8.onnx"
    # raw keeps only what the schema does not name; source keeps everything as written
    assert dict(entry.raw) == {"license": "MIT"}
    assert dict(entry.source) == entry_json
    assert {"quant_min_speedup", "quant_options", "kind", "description"} <= known_keys()
    with pytest.raises(TypeError):
        entry.quant_options["per_channel"] = False  # type: ignore[index]


@pytest.mark.parametrize(("key", "value"), [
    ("quant_min_speedup", "fast"), ("quant_min_speedup", 0), ("quant_options", [1]), ("kind", 3),
    ("description", None), ("quant_budget_slope", True),
])
def test_known_keys_of_the_wrong_type_are_entry_problems(tmp_path: Path, key: str, value: Any) -> None:
    registry = parse_registry({"schema_version": 1, "models": [_entry(**{key: value})]}, tmp_path / "r.json")
    assert not registry.entries
    assert f"$.models[0].{key}" in registry.problems[0].message


# --- parse failures of any kind are RegistryErrors naming the file -------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_JSON_DEPTH} levels"),
    ('{"schema_version": 1, "models": [{"id": "m", "onnx": "m.onnx", "notes": ' + "[" * 40 + "]" * 40 + "}]}",
     "nested deeper"),
    ("{" * 100_000, "malformed JSON"),
    ('{"schema_version": 1, "models": [' + "1" * 5000 + "]}", "malformed JSON"),
    ("\ufeff{}", "malformed JSON"),
    ("", "malformed JSON"),
])
def test_any_parse_failure_is_a_registry_error_naming_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(RegistryError, match=expected) as info:
        load_registry(path)
    assert str(info.value).startswith(str(path))


def test_deep_json_through_the_cli_is_exit_2_without_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path, "[" * 100_000 + "]" * 100_000)
    done = _quantgate("validate", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr and str(path) in done.stderr


def test_invalid_utf8_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_bytes(b'{"schema_version": 1, "models": [], "x": "\xff"}')
    with pytest.raises(RegistryError, match=r"not UTF-8 text \(byte 42"):
        load_registry(path)


# --- special files and sizes ---------------------------------------------------------------------------------


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "registry.json"
    os.mkfifo(fifo)
    # in a subprocess with a timeout: a regression would hang forever on open() or read()
    for command in ("validate", "measure", "pin"):
        done = _quantgate(command, str(fifo), timeout=60)
        assert done.returncode == 2, done.stderr
        assert f"{fifo}: the registry file is a FIFO (named pipe), not a regular file" in done.stderr


@pytest.mark.parametrize(("special", "kind"), [("/dev/zero", "character device"), ("/dev/null", "character device")])
def test_devices_are_refused(special: str, kind: str) -> None:
    if not Path(special).exists():
        pytest.fail(f"{special} is missing on this system")
    with pytest.raises(RegistryError, match=f"{special}: the registry file is a {kind}, not a regular file"):
        load_registry(special)


def test_a_directory_and_a_symlink_to_a_device_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="the registry file is a directory"):
        load_registry(tmp_path)
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(RegistryError, match=r"zero\.json: the registry file is a character device"):
        load_registry(link)


def test_a_registry_over_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    with open(path, "wb") as handle:  # sparse: st_size says 1 GiB without using the disk
        handle.truncate(1 << 30)
    with pytest.raises(RegistryError, match=f"1073741824 bytes, over the {REGISTRY_MAX_BYTES}-byte cap"):
        load_registry(path)


def test_read_bounded_stops_at_the_cap_for_files_whose_size_lies(tmp_path: Path) -> None:
    # /proc files report st_size 0 and yield more: the cap must hold on the bytes read, not on the size
    with pytest.raises(RegistryError, match="over the 16-byte cap"):
        read_bounded("/proc/self/status", 16, "registry file", RegistryError)
    small = tmp_path / "f"
    small.write_bytes(b"x" * 16)
    assert read_bounded(small, 16, "file") == b"x" * 16
    assert DEFAULT_READ_CAP == REGISTRY_MAX_BYTES


def test_check_regular_names_missing_and_nul_paths(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="fixture not found"):
        check_regular(tmp_path / "nope.npz", "fixture", RegistryError)
    with pytest.raises(RegistryError, match="cannot read the fixture"):
        check_regular(str(tmp_path / "a\0b"), "fixture", RegistryError)


def test_a_symlink_loop_in_a_path_field_is_a_registry_error(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").symlink_to("b.onnx")
    (tmp_path / "b.onnx").symlink_to("a.onnx")
    registry = parse_registry({"schema_version": 1, "models": [_entry(onnx="a.onnx")]}, tmp_path / "r.json")
    with pytest.raises(RegistryError, match=r"entry 'm' field 'onnx': 'a\.onnx' cannot be resolved"):
        registry.fp32_path(registry.entries[0])


# --- output options are checked before the work ------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("", "expected a file path, got ''"),
    ("{tmp}/afile/r.json", "cannot use this path: Not a directory"),
    ("{tmp}/afile/sub/r.json", "cannot use this path: Not a directory"),
    ("{tmp}", "is a directory, not a regular file"),
    ("/proc/quantgate-r.json", "cannot write in /proc"),
])
@pytest.mark.parametrize("command", ["measure", "ptq-dynamic"])
def test_unwritable_output_paths_fail_before_the_work_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  value: str, expected: str, command: str) -> None:
    from pytest_quantgate.frontends.cli import main

    (tmp_path / "afile").write_text("x")
    repo = Path(__file__).resolve().parents[1]
    value, expected = value.format(tmp=tmp_path), expected.format(tmp=tmp_path)
    if command == "measure":
        argv = ["measure", str(repo / "model" / "registry.json"), "--fixtures", str(repo / "fixtures"), "--json", value]
        option = "--json"
    else:
        argv = ["ptq-dynamic", str(repo / "model" / "fusion_mlp_v1.onnx"), "-o", value]
        option = "-o/--output"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and expected in err
    assert "quantgate: [1/" not in err  # nothing was measured or built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_report_needs_an_existing_folder_a_sidecar_gets_its_folders_made(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_quantgate.frontends.cli import main

    repo = Path(__file__).resolve().parents[1]
    missing = tmp_path / "missing" / "r.json"
    assert main(["measure", str(repo / "model" / "registry.json"), "--json", str(missing)]) == 2
    assert f"argument --json: {missing}: the folder {missing.parent} does not exist" in capsys.readouterr().err
    sidecar = tmp_path / "new" / "deeper" / "m.int8.onnx"
    assert main(["ptq-dynamic", str(repo / "model" / "fusion_mlp_v1.onnx"), "-o", str(sidecar)]) == 0
    assert sidecar.is_file()


def test_check_writable_names_the_option(tmp_path: Path) -> None:
    from pytest_quantgate.errors import InputError
    from pytest_quantgate.fileio import check_writable

    assert check_writable(tmp_path / "r.json", "--json") == tmp_path / "r.json"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"^--json .*pipe: is a FIFO \(named pipe\), not a regular file$"):
        check_writable(fifo, "--json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # the probe file is gone
