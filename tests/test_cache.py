"""cache: the key changes with every input of a verdict and only with them; stores give back passes, else miss."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import modelkit
import numpy as np
import pytest
import recordkit

import pytest_quantgate
from pytest_quantgate.runner import cache
from pytest_quantgate.engine import providers
from pytest_quantgate.runner.cache import CACHE_PREFIX, FolderCache, PytestCache
from pytest_quantgate.io.registry import Registry, load_registry
from pytest_quantgate.settings import EpOptions, Settings


class Project:
    """A registry of two entries over plain files: the key hashes bytes, it never parses them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = root / "model"
        self.fixtures = root / "fixtures"
        self.fixtures.mkdir(parents=True)
        self.model.mkdir()
        for entry_id in ("m", "other"):
            (self.model / f"{entry_id}.onnx").write_bytes(b"fp32 " + entry_id.encode())
            (self.model / f"{entry_id}.int8.onnx").write_bytes(b"int8 " + entry_id.encode())
            np.savez(self.fixtures / f"{entry_id}.npz", x=np.zeros((3, 2), np.float32))
        self.entries = [modelkit.pin({"id": i, "onnx": f"{i}.onnx", "quant_mode": "dynamic"}, self.model)
                        for i in ("m", "other")]
        self.write()

    def write(self) -> None:
        """Write the registry from ``entries``."""
        modelkit.write_registry(self.model / "registry.json", self.entries)

    def registry(self) -> Registry:
        """Return the registry as the gate loads it."""
        return load_registry(self.model / "registry.json")

    def settings(self, **changes: Any) -> Settings:
        """Return settings pointing at this project's fixtures."""
        return replace(Settings(enabled=True, registry=self.model / "registry.json", fixtures_dir=self.fixtures),
                       **changes)

    def key(self, ep: str = "cpu", **changes: Any) -> str | None:
        """Return the cache key of entry ``m``."""
        registry = self.registry()
        return cache.key(registry, registry.entry("m"), ep, self.settings(**changes))


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """Return a fresh project of plain files."""
    return Project(tmp_path / "project")


# --- the key --------------------------------------------------------------------------------------------------


def test_the_key_is_stable(project: Project) -> None:
    first = project.key()
    assert first is not None and len(first) == 64
    assert project.key() == first
    for name in ("m.onnx", "m.int8.onnx"):
        path = project.model / name
        path.write_bytes(path.read_bytes())  # rewritten, same bytes: only the content counts
    assert project.key() == first


@pytest.mark.parametrize("path", ["model/m.onnx", "model/m.int8.onnx", "fixtures/m.npz"])
def test_the_key_changes_with_each_files_bytes(project: Project, path: str) -> None:
    before = project.key()
    with open(project.root / path, "ab") as handle:
        handle.write(b"\0")
    assert project.key() not in (None, before)


@pytest.mark.parametrize(("field", "value"), [("quant_accuracy_budget_plcc", 0.02), ("quant_compare", "residual"),
                                              ("quant_min_samples", 500), ("license", "MIT")])
def test_the_key_changes_with_any_field_of_the_entry(project: Project, field: str, value: Any) -> None:
    before = project.key()
    project.entries[0] = {**project.entries[0], field: value}
    project.write()
    assert project.key() != before


def test_the_key_ignores_other_entries(project: Project) -> None:
    before = project.key()
    project.entries[1] = {**project.entries[1], "quant_accuracy_budget_plcc": 0.5}
    project.write()
    (project.model / "other.int8.onnx").write_bytes(b"changed")
    assert project.key() == before


KEYED: list[tuple[str, dict[str, Any]]] = [
    ("bootstrap", {"bootstrap": 200}), ("seed", {"seed": 1}), ("confidence", {"confidence": 0.99}),
    ("decision", {"decision": "conservative"}), ("batch_size", {"batch_size": 8}), ("strict", {"strict": True}),
    ("max_samples", {"max_samples": 100}),
    ("cuda device", {"ep_options": EpOptions(cuda_device_id=1)}),
    ("openvino device", {"ep_options": EpOptions(openvino_device="GPU")}),
    ("openvino precision", {"ep_options": EpOptions(openvino_precision="FP16")}),
    ("int8 precision", {"ep_options": EpOptions(int8_precision="fast")}),
]


@pytest.mark.parametrize("changes", [c for _, c in KEYED], ids=[n for n, _ in KEYED])
def test_the_key_changes_with_the_statistics_and_ep_settings(project: Project, changes: dict[str, Any]) -> None:
    assert project.key(**changes) != project.key()


def test_the_key_changes_with_the_ep_onnxruntime_and_the_plugin(project: Project,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    before = project.key()
    assert project.key("cuda") != before
    monkeypatch.setattr(providers, "ort_distribution", lambda: "onnxruntime-gpu 9.9.9")
    assert project.key() != before
    monkeypatch.undo()
    monkeypatch.setattr(pytest_quantgate, "__version__", "9.9.9")
    assert project.key() != before


UNKEYED: list[tuple[str, dict[str, Any]]] = [
    ("report", {"report": Path("r.json")}), ("html", {"html": Path("r.html")}), ("diagnose", {"diagnose": "always"}),
    ("select", {"select": ("m*",)}), ("threads", {"threads": 2}), ("cache", {"cache": True}),
    ("regen", {"regen": "never"}), ("allow_recipes", {"allow_recipes": True}), ("strict_ep", {"strict_ep": True}),
    ("eps", {"eps": ("cpu", "cuda")}),
]


@pytest.mark.parametrize("changes", [c for _, c in UNKEYED], ids=[n for n, _ in UNKEYED])
def test_the_key_stays_for_settings_a_verdict_does_not_depend_on(project: Project, changes: dict[str, Any]) -> None:
    assert project.key(**changes) == project.key()


def test_the_key_is_the_content_not_the_place(project: Project, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(project.root, elsewhere)
    registry = load_registry(elsewhere / "model" / "registry.json")
    settings = project.settings(registry=registry.path, fixtures_dir=elsewhere / "fixtures")
    # a CI cache restored in another checkout still hits
    assert cache.key(registry, registry.entry("m"), "cpu", settings) == project.key()


@pytest.mark.parametrize("missing", ["model/m.int8.onnx", "fixtures/m.npz", "model/m.onnx"])
def test_no_key_when_an_input_is_missing(project: Project, missing: str) -> None:
    (project.root / missing).unlink()
    assert project.key() is None


def test_the_key_changes_with_the_fixture_cap(project: Project) -> None:
    assert project.key(max_fixture_bytes=1 << 20) != project.key()


def test_a_folder_of_shards_has_a_key_that_follows_its_shards(project: Project) -> None:
    (project.fixtures / "m.npz").unlink()
    (project.fixtures / "m.npz").mkdir()
    np.savez(project.fixtures / "m.npz" / "part-0.npz", x=np.zeros((3, 2), np.float32))
    before = project.key()
    assert before is not None
    np.savez(project.fixtures / "m.npz" / "part-1.npz", x=np.ones((3, 2), np.float32))
    assert project.key() not in (None, before)


# --- the stores -------------------------------------------------------------------------------------------------


def test_folder_cache_round_trip_without_plot_and_diagnosis(tmp_path: Path) -> None:
    store = FolderCache(tmp_path / "new" / "cache")
    result = recordkit.gate_result()
    assert store.get("k") is None  # no folder yet: a miss
    store.set("k", result)
    assert (tmp_path / "new" / "cache" / "k.json").is_file()
    got = store.get("k")
    assert got is not None
    assert got.plot is None and got.diagnosis is None  # a cached pass is listed, not plotted
    assert got.to_json() == replace(result, plot=None, diagnosis=None).to_json()
    store.set("k", replace(result, drop=0.0001))
    assert store.get("k") is not None and store.get("k").drop == 0.0001  # type: ignore[union-attr]


def test_a_stored_failure_reads_as_a_miss(tmp_path: Path) -> None:
    store = FolderCache(tmp_path)
    store.set("k", recordkit.gate_result(verdict="FAIL", kind="drop"))
    assert store.get("k") is None


CORRUPT: list[tuple[str, bytes]] = [
    ("empty", b""), ("not json", b"{'id': 'm'"), ("truncated", json.dumps(recordkit.gate_result().to_json())[:200]
                                                 .encode()),
    ("a list", b"[1, 2]"), ("a string", b'"PASS"'), ("a v1 row", json.dumps({"id": "m", "verdict": "PASS"}).encode()),
    ("a bad field", json.dumps({**recordkit.gate_result().to_json(), "samples": "many"}).encode()),
    ("not utf-8", b"\xff\xfe{}"),
]


@pytest.mark.parametrize("data", [d for _, d in CORRUPT], ids=[n for n, _ in CORRUPT])
def test_a_corrupt_entry_reads_as_a_miss(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "k.json").write_bytes(data)
    assert FolderCache(tmp_path).get("k") is None


def test_an_unreadable_entry_reads_as_a_miss(tmp_path: Path) -> None:
    (tmp_path / "k.json").mkdir()
    assert FolderCache(tmp_path).get("k") is None


def test_pytest_cache_round_trip(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfigure()
    store = PytestCache(config)
    assert store.get("d") is None
    store.set("d", recordkit.gate_result())
    assert config.cache is not None and config.cache.get(CACHE_PREFIX + "d", None)["id"] == "m"
    got = store.get("d")
    assert got is not None and got.entry_id == "m" and got.plot is None
    config.cache.set(CACHE_PREFIX + "e", {"id": "m"})  # an entry of another format
    assert store.get("e") is None


def test_pytest_cache_without_a_cache_plugin() -> None:
    store = PytestCache(SimpleNamespace(cache=None))  # type: ignore[arg-type]
    store.set("d", recordkit.gate_result())
    assert store.get("d") is None
