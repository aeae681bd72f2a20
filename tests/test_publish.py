"""No producer, regeneration or QAT run writes over a file the registry names otherwise; provenance and sidecar
are one file, published by one atomic rename."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import modelkit
import onnx
import pytest
from conftest import GateProject

from pytest_quantgate.frontends.cli import main
from pytest_quantgate.errors import RegistryError
from pytest_quantgate.fileio import sha256_file
from pytest_quantgate.producers.base import ProducerError
from pytest_quantgate.producers.dispatch import produce
from pytest_quantgate.producers.provenance import (
    PROVENANCE_KEY,
    provenance_path_for,
    publish_sidecar,
    read_provenance,
)
from pytest_quantgate.producers.ptq_dynamic import DynamicConfig, quantize_dynamic
from pytest_quantgate.io.registry import load_registry


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _victims(project: GateProject) -> dict[str, Any]:
    """Entries whose files are the targets the attacker entry points its int8_onnx at."""
    shutil.copy(project.assets / "digits.npz", project.model / "cal.npz")
    shutil.copy(project.assets / "digits.npz", project.model / "other_soak.npz")
    shutil.copy(project.assets / "digits.npz", project.model / "attacker.npz")  # attacker's default soak fixture
    other = project.add_sidecar("other", soak_fixture="other_soak.npz")
    static = project.add_sidecar("stat", mode="dynamic", quant_calibration_set="cal.npz")
    return {"other": other, "stat": static}


_ATTACKS = [
    ("other.onnx", "fp32 model of entry 'other' (field 'onnx')"),
    ("other.int8.onnx", "int8 sidecar of entry 'other' (field 'int8_onnx')"),
    ("other_soak.npz", "soak fixture of entry 'other' (field 'soak_fixture')"),
    ("cal.npz", "calibration set of entry 'stat' (field 'quant_calibration_set')"),
    ("registry.json", "registry registry.json itself"),
    ("attacker.onnx", "fp32 model of this entry (field 'onnx')"),
    ("attacker.npz", "soak fixture of entry 'attacker' (default attacker.npz)"),
]


@pytest.mark.parametrize(("int8_onnx", "role"), _ATTACKS, ids=[a[0] for a in _ATTACKS])
def test_a_sidecar_path_that_names_another_role_is_refused_before_any_write(project: GateProject, int8_onnx: str,
                                                                           role: str) -> None:
    victims = _victims(project)
    attacker = project.add_sidecar("attacker")
    attacker["int8_onnx"] = int8_onnx
    attacker["int8_sha256"] = victims["other"]["int8_sha256"]
    registry_path = project.write([victims["other"], victims["stat"], attacker])
    before = _snapshot(project.model)
    registry = load_registry(registry_path)
    with pytest.raises(RegistryError) as info:  # the fixtures folder is the model folder here
        produce(registry, registry.entry("attacker"), project.model, allow_recipes=False)
    message = str(info.value)
    assert message.startswith(f"{registry_path}: entry 'attacker' field 'int8_onnx': refusing to write")
    assert role in message
    assert _snapshot(project.model) == before


def test_regen_all_in_pytest_is_an_error_item_and_the_other_model_survives(project: GateProject) -> None:
    victims = _victims(project)
    # the other entry's sidecar as its producer builds it, pinned with its build record: rebuilt, it matches
    quantize_dynamic(project.model / "other.onnx", project.model / "other.int8.onnx", DynamicConfig())
    other = modelkit.pin(victims["other"], project.model)
    attacker = project.add_sidecar("attacker")
    attacker["int8_onnx"] = "other.onnx"
    project.write([other, attacker])
    fp32_before = sha256_file(project.model / "other.onnx")
    result = project.run("--quantgate-regen", "all")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*entry 'attacker' field 'int8_onnx': refusing to write the int8 sidecar "
                                 "*other.onnx: that file is the fp32 model of entry 'other' (field 'onnx')*"])
    assert sha256_file(project.model / "other.onnx") == fp32_before


def test_links_to_a_protected_file_are_refused(project: GateProject) -> None:
    victims = _victims(project)
    entries = [victims["other"]]
    for name in ("soft", "hard"):
        entry = project.add_sidecar(name)
        entry["int8_onnx"] = f"{name}.int8.onnx"
        entries.append(entry)
        (project.model / f"{name}.int8.onnx").unlink()
    os.symlink("other.onnx", project.model / "soft.int8.onnx")
    os.link(project.model / "other.onnx", project.model / "hard.int8.onnx")
    registry = load_registry(project.write(entries))
    for name in ("soft", "hard"):
        with pytest.raises(RegistryError, match="that file is the fp32 model of entry 'other'"):
            produce(registry, registry.entry(name), project.fixtures, allow_recipes=False)
    assert sha256_file(project.model / "other.onnx") == victims["other"]["sha256"]


def test_twin_entries_share_a_sidecar_built_from_the_same_fp32(project: GateProject) -> None:
    first = project.add_sidecar("twin_a")
    second = {**first, "id": "twin_b"}
    registry = load_registry(project.write([first, second]))
    result = produce(registry, registry.entry("twin_b"), project.fixtures, allow_recipes=False)
    assert result.int8_path == project.model / "twin_a.int8.onnx"


def test_the_cli_producer_refuses_its_own_fp32_even_through_a_link(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import modelkit

    fp32 = tmp_path / "m.onnx"
    onnx.save(modelkit.mlp_model(modelkit.fitted_mlp_weights()), fp32)
    os.link(fp32, tmp_path / "alias.onnx")
    before = sha256_file(fp32)
    assert main(["ptq-dynamic", str(fp32), "-o", str(tmp_path / "alias.onnx")]) == 2
    assert "refusing to overwrite the fp32 model" in capsys.readouterr().err
    assert sha256_file(fp32) == before


# --- provenance inside the sidecar --------------------------------------------------------------------------


def test_provenance_is_inside_the_sidecar_and_reproducible(tmp_path: Path) -> None:
    import modelkit

    fp32 = tmp_path / "m.onnx"
    onnx.save(modelkit.mlp_model(modelkit.fitted_mlp_weights()), fp32)
    first = quantize_dynamic(fp32, tmp_path / "m.int8.onnx", DynamicConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx"]  # one file, no .json
    props = {p.key: p.value for p in onnx.load(str(first.int8_path)).metadata_props}
    record = json.loads(props[PROVENANCE_KEY])
    assert record["fp32_sha256"] == sha256_file(fp32) and record["fp32_path"] == "m.onnx"
    assert str(tmp_path) not in props[PROVENANCE_KEY]  # no machine-specific path: rebuilds reproduce
    other_folder = tmp_path / "elsewhere"
    other_folder.mkdir()
    shutil.copy(fp32, other_folder / "m.onnx")
    again = quantize_dynamic(other_folder / "m.onnx", other_folder / "m.int8.onnx", DynamicConfig())
    assert again.sha256 == first.sha256 == sha256_file(first.int8_path)
    read = read_provenance(first.int8_path)
    assert read is not None and read["int8_sha256"] == first.sha256
    assert read["provenance_source"] == "metadata_props"


def test_publishing_removes_an_old_json_record_and_reads_old_sidecars_only_when_they_match(tmp_path: Path) -> None:
    import modelkit

    fp32 = tmp_path / "m.onnx"
    model = modelkit.mlp_model(modelkit.fitted_mlp_weights())
    onnx.save(model, fp32)
    legacy_sidecar = tmp_path / "old.int8.onnx"
    onnx.save(model, legacy_sidecar)
    legacy = provenance_path_for(legacy_sidecar)
    legacy.write_text(json.dumps({"mode": "ptq-dynamic", "int8_sha256": sha256_file(legacy_sidecar)}))
    assert read_provenance(legacy_sidecar) == {"mode": "ptq-dynamic", "int8_sha256": sha256_file(legacy_sidecar),
                                               "provenance_source": "old.int8.json"}
    legacy.write_text(json.dumps({"mode": "ptq-dynamic", "int8_sha256": "0" * 64}))  # describes another file
    assert read_provenance(legacy_sidecar) is None
    result = publish_sidecar(fp32, legacy_sidecar, {"producer": "test"}, fp32_path=None)
    assert not legacy.exists()  # the stale record went with the old sidecar
    assert read_provenance(result.int8_path)["producer"] == "test"  # type: ignore[index]


def test_a_model_the_provenance_cannot_be_embedded_in_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    built = tmp_path / "built.onnx"
    built.write_bytes(b"\xff\xff not a protobuf")
    with pytest.raises(ProducerError, match="cannot store the provenance in the model"):
        publish_sidecar(built, tmp_path / "m.int8.onnx", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built.onnx"]
