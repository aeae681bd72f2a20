"""Bad-input corpus: every broken registry, model file or fixture is an ERROR naming the file and the field.

Each case writes a registry holding one healthy entry and the broken one(s) and runs ``pytest --quantgate``
in-process. A case passes when the broken entry is an ERROR (never a FAILED comparison), the message names the
file and the field, no Python traceback is printed, and the healthy entry still PASSES. Whole-file problems
(malformed JSON, a top level that breaks the schema) stop collection cleanly instead.

Unreadable files: the tests run as root, where ``chmod 000`` does not stop a read, so unreadable inputs are a
directory or a FIFO where a file is expected (a FIFO would block a reader forever: it must be refused by type).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import GateProject, rounded_weights

import modelkit

HEALTHY = "healthy"
RUN_ARGS = ("--quantgate-ep", "cpu", "--quantgate-regen", "never", "-v")


class Pickled:
    """Unpickling this would create the marker file: proof that nothing was unpickled if it is absent."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _fixture(project: GateProject, name: str, **arrays: np.ndarray) -> None:
    np.savez(project.fixtures / name, **arrays)


def _features(project: GateProject) -> dict[str, np.ndarray]:
    with np.load(project.assets / "digits.npz") as z:
        return {k: z[k] for k in z.files}


# --- the cases: each returns the broken entries (the healthy one is added by the runner) -------------------------


def bad_field(field: str, value: Any) -> Callable[[GateProject], list[Any]]:
    def build(project: GateProject) -> list[Any]:
        entry = project.add_sidecar("broken")
        entry[field] = value
        return [entry]
    return build


def drop_field(field: str, **extra: Any) -> Callable[[GateProject], list[Any]]:
    def build(project: GateProject) -> list[Any]:
        entry = project.add_sidecar("broken", **extra)
        del entry[field]
        return [entry]
    return build


def duplicate_ids(project: GateProject) -> list[Any]:
    return [project.add_sidecar("dup"), project.add_sidecar("dup")]


def not_an_object(project: GateProject) -> list[Any]:
    return ["broken"]


def symlink_out(project: GateProject) -> list[Any]:
    entry = project.add_sidecar("broken")
    outside = project.root / "outside.onnx"
    shutil.copy(project.model / "broken.onnx", outside)
    (project.model / "broken.onnx").unlink()
    (project.model / "broken.onnx").symlink_to(outside)
    return [entry]


def replace_file(name: str, content: Callable[[bytes], bytes], field: str = "int8_sha256") -> Callable[..., Any]:
    """Overwrite a model file and re-pin it, so only the file's content is wrong."""

    def build(project: GateProject) -> list[Any]:
        entry = project.add_sidecar("broken")
        path = project.model / name
        path.write_bytes(content(path.read_bytes()))
        return [modelkit.pin(entry, project.model)]
    return build


def not_a_file(where: str, kind: str) -> Callable[[GateProject], list[Any]]:
    def build(project: GateProject) -> list[Any]:
        entry = project.add_sidecar("broken")
        path = (project.model if where.endswith(".onnx") else project.fixtures) / where
        path.unlink()
        if kind == "dir":
            path.mkdir()
        else:
            os.mkfifo(path)
        return [entry]
    return build


def missing_file(name: str) -> Callable[[GateProject], list[Any]]:
    def build(project: GateProject) -> list[Any]:
        entry = project.add_sidecar("broken")
        (project.model / name).unlink()
        return [entry]
    return build


def external_data_outside(project: GateProject) -> list[Any]:
    """An int8 file whose initializer claims its bytes live in ../secret.bin (outside the model folder)."""
    entry = project.add_sidecar("broken")
    model = onnx.load(project.model / "broken.int8.onnx")
    (project.root / "secret.bin").write_bytes(b"\0" * 4096)
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "256")):
        init.external_data.add(key=key, value=value)
    onnx.save(model, project.model / "broken.int8.onnx")
    return [modelkit.pin(entry, project.model)]


def hash_mismatch(field: str) -> Callable[[GateProject], list[Any]]:
    def build(project: GateProject) -> list[Any]:
        entry = project.add_sidecar("broken")
        entry[field] = "ab" * 32
        return [entry]
    return build


def fixture_with(mutate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Callable[..., Any]:
    def build(project: GateProject) -> list[Any]:
        entry = project.add_sidecar("broken")
        _fixture(project, "broken.npz", **mutate(_features(project)))
        return [entry]
    return build


def pickle_in_npz(project: GateProject) -> list[Any]:
    entry = project.add_sidecar("broken")
    Pickled.marker = str(project.root / "UNPICKLED")
    with zipfile.ZipFile(project.fixtures / "broken.npz", "a") as archive:
        archive.writestr("features_extra.pkl", pickle.dumps(Pickled()))
    return [entry]


def object_array(project: GateProject) -> list[Any]:
    entry = project.add_sidecar("broken")
    Pickled.marker = str(project.root / "UNPICKLED")
    data = _features(project)
    data["features"] = np.array([Pickled()] * len(data["features"]), dtype=object)
    np.savez(project.fixtures / "broken.npz", allow_pickle=True, **data)
    return [entry]


def truncated_npz(project: GateProject) -> list[Any]:
    entry = project.add_sidecar("broken")
    path = project.fixtures / "broken.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [entry]


def plain_npy(project: GateProject) -> list[Any]:
    entry = project.add_sidecar("broken")
    with open(project.fixtures / "broken.npz", "wb") as handle:
        np.save(handle, _features(project)["features"])
    return [entry]


def int8_changes_a_ragged_shape(project: GateProject) -> list[Any]:
    """A stacked fixture (the layout the gate advises) for an output whose length int8 changes on some sample."""
    onnx.save(modelkit.ragged_model(keep_from_input=False), project.model / "broken.onnx")
    modelkit.quantize_dynamic_file(project.model / "broken.onnx", project.model / "broken.int8.onnx")
    _fixture(project, "broken.npz", x=np.random.default_rng(5).normal(size=(120, 1, 8)).astype(np.float32))
    return [modelkit.pin({"id": "broken", "onnx": "broken.onnx", "quant_mode": "dynamic"}, project.model)]


def relative_without_target(project: GateProject) -> list[Any]:
    entry = project.add_sidecar("broken", fixture="digits_notarget.npz", quant_budget_relative=0.99)
    return [entry]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[GateProject], list[Any]]
    lines: tuple[str, ...]  # fnmatch patterns the output must hold (file and field named)
    errors: int = 1
    whole_file: bool = False


REG = "*model/registry.json"
CASES = [
    # registry: whole file
    Case("malformed JSON", lambda p: [], (f"{REG}:*:*: malformed JSON: Expecting value*",), whole_file=True),
    Case("top level: schema_version not an integer", lambda p: [],
         (f"{REG}: not a valid registry: at $.schema_version: expected integer, got str '1'*",), whole_file=True),
    Case("top level: models not an array", lambda p: [],
         (f"{REG}: not a valid registry: at $.models: expected array, got dict*",), whole_file=True),
    # registry: one entry breaks the schema
    Case("id of the wrong type", bad_field("id", 7), (f"*{REG}: entry 'models[[]1[]]' is invalid: at $.models[[]1[]].id: "
                                                      "expected string, got int 7*",)),
    Case("onnx of the wrong type", bad_field("onnx", ["a.onnx"]),
         ("*entry 'broken' is invalid: at $.models[[]1[]].onnx: expected string, got list*",)),
    Case("budget of the wrong type", bad_field("quant_accuracy_budget_plcc", "0.01"),
         ("*entry 'broken' is invalid: at $.models[[]1[]].quant_accuracy_budget_plcc: expected number, got str '0.01'*",)),
    Case("unknown quant_mode", bad_field("quant_mode", "int4"),
         ("*entry 'broken' is invalid: at $.models[[]1[]].quant_mode: 'int4' is not one of 'fp32', 'static', "
          "'dynamic', 'qat'*",)),
    Case("bad quant_compare enum", bad_field("quant_compare", "diff"),
         ("*entry 'broken' is invalid: at $.models[[]1[]].quant_compare: 'diff' is not one of 'output', 'residual'*",)),
    Case("bad sha256 pattern", bad_field("sha256", "abc123"),
         ("*entry 'broken' is invalid: at $.models[[]1[]].sha256: 'abc123' is not valid; expected a 64-character hex "
          "sha256*",)),
    Case("bad int8_sha256 pattern", bad_field("int8_sha256", "z" * 64),
         ("*entry 'broken' is invalid: at $.models[[]1[]].int8_sha256: 'zzz*' is not valid; expected a 64-character "
          "hex sha256*",)),
    Case("budget out of range", bad_field("quant_accuracy_budget_plcc", -0.5),
         ("*entry 'broken' is invalid: at $.models[[]1[]].quant_accuracy_budget_plcc: -0.5 is less than the minimum "
          "of 0*",)),
    Case("relative budget out of range", bad_field("quant_budget_relative", 1.5),
         ("*entry 'broken' is invalid: at $.models[[]1[]].quant_budget_relative: 1.5 is greater than the maximum "
          "of 1*",)),
    Case("missing id", drop_field("id"),
         ("*entry 'models[[]1[]]' is invalid: at $.models[[]1[]]: missing required field(s) 'id'*",)),
    Case("missing onnx", drop_field("onnx"),
         ("*entry 'broken' is invalid: at $.models[[]1[]]: missing required field(s) 'onnx'*",)),
    Case("missing int8_sha256 (if/then)", drop_field("int8_sha256"),
         ("*entry 'broken' is invalid: at $.models[[]1[]]: missing required field(s) 'int8_sha256' (required when "
          "quant_mode is 'dynamic')*",)),
    Case("missing quant_calibration_set (if/then)", drop_field("quant_calibration_set", mode="static",
                                                               quant_calibration_set="x.npz"),
         ("*entry 'broken' is invalid: at $.models[[]1[]]: missing required field(s) 'quant_calibration_set' "
          "(required when quant_mode is 'static')*",)),
    Case("entry not an object", not_an_object,
         ("*entry 'models[[]1[]]' is invalid: at $.models[[]1[]]: expected object, got str 'broken'*",)),
    Case("duplicate ids", duplicate_ids,
         ("*registry.json: duplicate id 'dup' at $.models[[]1[]], $.models[[]2[]]; ids must be unique*",), errors=2),
    # paths
    Case("absolute path", lambda p: [dict(p.add_sidecar("broken"), onnx=str(p.model / "broken.onnx"))],
         ("*entry 'broken' field 'onnx': '/*broken.onnx' is an absolute path*",)),
    Case("../ escape", lambda p: [dict(p.add_sidecar("broken"), int8_onnx="../outside.int8.onnx")],
         ("*entry 'broken' field 'int8_onnx': '../outside.int8.onnx' resolves to */outside.int8.onnx, outside "
          "the folder*",)),
    Case("symlink out of the folder", symlink_out,
         ("*entry 'broken' field 'onnx': 'broken.onnx' resolves to */outside.onnx, outside the folder*",)),
    # model files
    Case("missing fp32 model", missing_file("broken.onnx"),
         ("*entry 'broken': fp32 model */broken.onnx does not exist*",)),
    Case("missing int8 sidecar", missing_file("broken.int8.onnx"),
         ("*entry 'broken': int8 sidecar */broken.int8.onnx does not exist and --quantgate-regen is 'never'*",)),
    Case("empty int8 file", replace_file("broken.int8.onnx", lambda b: b""),
         ("*entry 'broken': int8 model */broken.int8.onnx is empty*",)),
    Case("truncated int8 file", replace_file("broken.int8.onnx", lambda b: b[: len(b) // 3]),
         ("*/broken.int8.onnx: not a readable ONNX model*",)),
    Case("garbage int8 file", replace_file("broken.int8.onnx", lambda b: b"\xff\xfe garbage \x00" * 64),
         ("*/broken.int8.onnx: not a readable ONNX model (DecodeError*",)),
    Case("directory where the int8 file should be", not_a_file("broken.int8.onnx", "dir"),
         ("*entry 'broken': int8 model */broken.int8.onnx is not a file*",)),
    Case("FIFO where the fp32 file should be", not_a_file("broken.onnx", "fifo"),
         ("*entry 'broken': fp32 model */broken.onnx is not a file*",)),
    Case("external data outside the folder", external_data_outside,
         ("*/broken.int8.onnx: initializer * reads external data from '../secret.bin', outside */model*",)),
    Case("fp32 sha256 mismatch", hash_mismatch("sha256"),
         ("*entry 'broken' field 'sha256': */broken.onnx has sha256 *, the registry pins abab*",)),
    Case("int8 sha256 mismatch", hash_mismatch("int8_sha256"),
         ("*entry 'broken' field 'int8_sha256': */broken.int8.onnx has sha256 *, the registry pins abab*",)),
    # fixtures
    Case("fixture missing a key", fixture_with(lambda d: {"pixels": d["features"], "target": d["target"]}),
         ("*broken.npz: missing array(s) for model input(s) 'features'; unexpected array(s) 'pixels'*",)),
    Case("fixture wrong dtype", fixture_with(lambda d: {**d, "features": d["features"].astype(np.float16)}),
         ("*broken.npz: array 'features' has dtype float16, model input expects float32*",)),
    Case("fixture wrong shape", fixture_with(lambda d: {**d, "features": d["features"][:, :63]}),
         ("*broken.npz: array 'features' has shape (1197, 63); model input 'features' is float32[[]N,64[]] and axis 1 "
          "must be 64, got 63*",)),
    Case("fixture zero samples", fixture_with(lambda d: {"features": d["features"][:0]}),
         ("*broken.npz: array 'features' has zero samples*",)),
    Case("fixture NaN inputs", fixture_with(lambda d: {**d, "features": np.where(np.arange(64) == 3, np.nan,
                                                                                 d["features"]).astype(np.float32)}),
         ("*broken.npz: array 'features' holds * NaN/inf value(s) in samples *; soak inputs must be finite*",)),
    Case("fixture constant target", fixture_with(lambda d: {**d, "target": np.ones_like(d["target"])}),
         ("*broken.npz: array 'target' is constant; a correlation against it is undefined*",)),
    Case("fixture object array", object_array,
         ("*broken.npz: array 'features' has dtype object; only numeric arrays are accepted (object arrays would need "
          "pickle)*",)),
    Case("pickle inside the npz", pickle_in_npz,
         ("*broken.npz: member 'features_extra.pkl' is not a .npy array; only numpy arrays*nothing is unpickled*",)),
    Case("truncated npz", truncated_npz, ("*broken.npz: unreadable soak fixture: BadZipFile*",)),
    Case("a bare .npy saved as .npz", plain_npy, ("*broken.npz: not an .npz archive (got a single .npy array)*",)),
    Case("directory where the fixture should be", not_a_file("broken.npz", "dir"),
         ("*fixtures/broken.npz: the soak fixture path exists but is not a regular file (a directory)*",)),
    Case("FIFO where the fixture should be (unreadable)", not_a_file("broken.npz", "fifo"),
         ("*fixtures/broken.npz: the soak fixture path exists but is not a regular file (a FIFO)*",)),
    Case("int8 changes an output shape that depends on the values", int8_changes_a_ragged_shape,
         ("*broken.npz: entry 'broken': output 'y' has shape (*,) from the int8 model and (*,) from fp32 on fixture "
          "sample *; its shape depends on the values*gate the model without that step*",)),
    Case("relative budget without a target", relative_without_target,
         ("*entry 'broken' field 'quant_budget_relative': the soak fixture */broken.npz has no 'target' array*",)),
]


def _write(project: GateProject, case: Case) -> None:
    healthy = project.add_sidecar(HEALTHY)
    broken = case.build(project)
    if case.name == "malformed JSON":
        text = json.dumps({"schema_version": 1, "models": [healthy]}, indent=2)
        (project.model / "registry.json").write_text(text[:-3] + ",]}")
    elif case.name.startswith("top level: schema_version"):
        (project.model / "registry.json").write_text(json.dumps({"schema_version": "1", "models": [healthy]}))
    elif case.name.startswith("top level: models"):
        (project.model / "registry.json").write_text(json.dumps({"schema_version": 1, "models": {"a": healthy}}))
    else:
        project.write([healthy, *broken])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_a_clean_error_and_the_healthy_entry_still_passes(project: GateProject, case: Case) -> None:
    _write(project, case)
    result = project.run(*RUN_ARGS)
    out = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in out, out
    assert "INTERNALERROR" not in out, out
    result.stdout.fnmatch_lines(list(case.lines))
    if case.whole_file:
        # the whole file is unusable: collection stops with the message alone
        assert result.ret == pytest.ExitCode.INTERRUPTED
        result.stdout.fnmatch_lines(["*ERROR collecting*registry.json*"])
        return
    result.assert_outcomes(passed=1, errors=case.errors)
    result.stdout.fnmatch_lines([f"*registry.json::{HEALTHY}[[]cpu[]] PASSED*"])
    assert "FAILED" not in result.stdout.str()
    assert not (project.root / "UNPICKLED").exists(), "a fixture was unpickled"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


# --- trust: nothing is unpickled; external data outside the folder never reaches onnxruntime --------------------


def test_external_data_outside_the_folder_is_refused_before_onnxruntime_opens_it(
        project: GateProject, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_quantgate.runner import gate
    from pytest_quantgate.engine import providers
    from pytest_quantgate.errors import ModelFileError
    from pytest_quantgate.io.registry import load_registry
    from pytest_quantgate.settings import Settings

    entries = external_data_outside(project)
    path = project.write(entries)
    opened: list[str] = []
    monkeypatch.setattr(providers, "open_session", lambda p, *a, **k: opened.append(str(p)))
    monkeypatch.setattr(gate, "open_session", lambda p, *a, **k: opened.append(str(p)))
    registry = load_registry(path)
    settings = Settings(enabled=True, registry=path, fixtures_dir=project.fixtures, eps=("cpu",), regen="never")
    with pytest.raises(ModelFileError, match=r"reads external data from '\.\./secret\.bin', outside"):
        gate.prepare(registry, registry.entry("broken"), "cpu", settings)
    assert opened == []


def test_a_pickle_in_an_npz_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    from pytest_quantgate.errors import FixtureError
    from pytest_quantgate.io.soak import load_fixture

    Pickled.marker = str(tmp_path / "UNPICKLED")
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 2), np.float32))
    with zipfile.ZipFile(tmp_path / "a.npz", "a") as archive:
        archive.writestr("evil.npy", pickle.dumps(Pickled()))  # even named .npy
        archive.writestr("evil2.pkl", pickle.dumps(Pickled()))
    with pytest.raises(FixtureError, match="evil"):
        load_fixture(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.array([Pickled()] * 3, dtype=object))
    with pytest.raises(FixtureError, match="object arrays would need pickle"):
        load_fixture(tmp_path / "b.npz")
    assert not (tmp_path / "UNPICKLED").exists()


# --- quantgate measure: exit 0 / 1 / 2 whatever the mix -------------------------------------------------------


@pytest.mark.parametrize(("mix", "code"), [
    (("pass",), 0),
    (("pass", "pass"), 0),
    (("fail",), 1),
    (("pass", "fail"), 1),
    (("error",), 2),
    (("schema",), 2),
    (("pass", "error"), 2),
    (("fail", "error"), 2),
    (("pass", "fail", "error", "schema"), 2),
    (("fp32only",), 5),  # nothing gated: 5, as pytest --quantgate exits on the same registry
    (("malformed",), 2),
])
def test_measure_exit_code(project: GateProject, mix: tuple[str, ...], code: int,
                           capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_quantgate.frontends import cli

    entries: list[Any] = []
    for i, kind in enumerate(mix):
        name = f"{kind}{i}"
        if kind == "pass":
            entries.append(project.add_sidecar(name))
        elif kind == "fail":
            fp32 = onnx.load(project.model / "digits.onnx")
            entries.append(project.add_sidecar(name, rounded_weights(fp32, 0.25)))
        elif kind == "error":
            entries.append(dict(project.add_sidecar(name), int8_sha256="ab" * 32))
        elif kind == "schema":
            entries.append({"id": name, "onnx": "digits.onnx", "quant_mode": "int4"})
        elif kind == "fp32only":
            entries.append({"id": name, "onnx": "digits.onnx"})
    path = project.write(entries)
    if "malformed" in mix:
        path.write_text("{not json")
    rc = cli.main(["measure", str(path), "--fixtures", str(project.fixtures), "--ep", "cpu", "--bootstrap", "100"])
    captured = capsys.readouterr()
    assert rc == code, captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err


def test_an_entry_missing_two_required_keys_is_described_once(tmp_path: Path) -> None:
    """jsonschema reports one error per missing key, each naming both: the message says it once."""
    from pytest_quantgate.io.registry import load_registry

    (tmp_path / "registry.json").write_text(json.dumps(
        {"schema_version": 1, "models": [{"id": "d", "onnx": "d.onnx", "quant_mode": "dynamic"}]}))
    (problem,) = load_registry(tmp_path / "registry.json").problems
    assert problem.message.count("missing required field(s) 'sha256', 'int8_sha256'") == 1, problem.message
