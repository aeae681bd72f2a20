"""Sharded soak sets: N shard states merged give the unsharded drops, intervals and verdicts; bad sets are refused."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import convkit
import modelkit
import numpy as np
import pytest

from pytest_quantgate.engine import streaming
from pytest_quantgate.engine.comparison import Collector, CompareOptions, plan_outputs
from pytest_quantgate.errors import ShardError
from pytest_quantgate.frontends.cli import main
from pytest_quantgate.io.registry import load_registry
from pytest_quantgate.io.soak import Fixture, TensorSpec
from pytest_quantgate.records import GateResult, dump
from pytest_quantgate.runner import shards
from pytest_quantgate.runner.gate import measure, prepare
from pytest_quantgate.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-12


def _same(merged: Any, whole: Any, where: str = "result") -> None:
    """Assert two dumped results agree: numbers to TOLERANCE (relative past 1), everything else exactly."""
    if isinstance(whole, dict):
        assert set(merged) == set(whole), where
        for key in whole:
            _same(merged[key], whole[key], f"{where}.{key}")
    elif isinstance(whole, list):
        assert len(merged) == len(whole), where
        for i, (a, b) in enumerate(zip(merged, whole)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(whole, float) and isinstance(merged, float):
        assert math.isclose(merged, whole, rel_tol=TOLERANCE, abs_tol=TOLERANCE), f"{where}: {merged!r} vs {whole!r}"
    else:
        assert merged == whole, f"{where}: {merged!r} vs {whole!r}"


def _comparable(result: GateResult) -> Any:
    """Return the result's JSON data without what depends on the machine's speed and the time of day."""
    data = dump(replace(result, timing=None, provenance=None))
    assert isinstance(data, dict)
    return data


# --- the engine: every accumulator's state, merged ----------------------------------------------------------------


def _entry(**extra: Any) -> Any:
    return modelkit.registry_entry(id="task", onnx="t.onnx", quant_mode="static", quant_calibration_set="c.npz",
                                   **extra)


def _sharded_decide(tmp_path: Path, entry: Any, name: str, fp32: np.ndarray, int8: np.ndarray, n: int, chunk: int,
                    cap: int | None = None, target: np.ndarray | None = None) -> tuple[GateResult, GateResult]:
    """Return (unsharded, merged) verdicts of one output, the shards cut on the chunk grid as measure_part does."""
    samples = fp32.shape[0]
    x = np.zeros((samples, 1), np.float32)
    fixture = Fixture(Path("soak.npz"), "0", {"x": x}, target)
    spec = TensorSpec(name, "tensor(float)", ("N", *fp32.shape[1:]))
    plans = plan_outputs(entry, fixture, (TensorSpec("x", "tensor(float)", ("N", 1)),), (spec,))
    options = CompareOptions(bootstrap=300)

    def fold(c: Collector, lo: int, hi: int) -> None:
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            c.add(start, {"x": x[start:stop]}, None if target is None else target[start:stop],
                  {name: fp32[start:stop]}, {name: int8[start:stop]})

    whole = Collector(entry, plans, samples, 0, "soak.npz", max_units=cap)
    fold(whole, 0, samples)
    grid = shards.Grid(samples, chunk, chunk)
    parts = []
    for k in range(1, n + 1):
        a, b = grid.part(k, n)
        c = Collector(entry, plans, samples, 0, "soak.npz", max_units=cap)
        if a > 0 and b > a:
            probe = Collector(entry, plans, samples, 0, "soak.npz", max_units=cap)
            fold(probe, 0, min(chunk, samples))
            c.adopt(probe)
        fold(c, a, b)
        rows = slice(a, b) if c.units is not None and not c.units.blocked else None
        header, arrays = c.state(rows)
        path = tmp_path / f"part{k}.npz"
        shards.write_state(path, {"format": shards.FORMAT, "version": shards.VERSION, "collector": header}, arrays)
        state = shards.read_state(path)
        parts.append(Collector.from_state(entry, plans, samples, 0, "soak.npz", state.header["collector"],
                                          state.arrays))
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    return whole.decide("cpu", options), merged.decide("cpu", options)


HEAD = {"detections": {"layout": "yolo", "boxes": "0:4", "scores": "4:", "score_threshold": 0.25, "nms_iou": 0.45,
                       "min_class_detections": 5}}


def _head(samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return a raw detector head [N, 4 + 3, 60] and a noisy int8 of it."""
    rng = np.random.default_rng(seed)
    head = np.zeros((samples, 7, 60), np.float32)
    head[:, :2] = rng.uniform(20, 600, (samples, 2, 60))
    head[:, 2:4] = rng.uniform(10, 60, (samples, 2, 60))
    head[:, 4:] = rng.uniform(0.0, 0.05, (samples, 3, 60))
    for i in range(samples):
        for _ in range(3):
            head[i, 4 + int(rng.integers(0, 3)), int(rng.integers(0, 60))] = rng.uniform(0.5, 0.95)
    noisy = head.copy()
    noisy[:, :4] += rng.normal(0, 0.5, noisy[:, :4].shape)
    noisy[:, 4:] = np.clip(noisy[:, 4:] + rng.normal(0, 0.01, noisy[:, 4:].shape), 0, 1)
    return head, noisy.astype(np.float32)


@pytest.mark.parametrize("cap", [None, 24], ids=["per-sample", "past-the-cap"])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_task_views_merge_to_the_unsharded_verdict(tmp_path: Path, n: int, cap: int | None) -> None:
    rng = np.random.default_rng(n)
    head, noisy = _head(90)
    whole, merged = _sharded_decide(tmp_path, _entry(quant_outputs={"head": HEAD}), "head", head, noisy, n, 8, cap)
    assert whole.outputs[0].detections is not None
    _same(_comparable(merged), _comparable(whole))
    maps = rng.uniform(0, 0.1, (90, 2, 12, 12)).astype(np.float32)
    maps[:, 0, 3:8, 2:9] = 0.8
    int8 = np.clip(maps + rng.normal(0, 0.05, maps.shape), 0, 1).astype(np.float32)
    rules = {"maps": {"threshold": 0.3, "threshold_channels": [0]}}
    whole, merged = _sharded_decide(tmp_path, _entry(quant_outputs=rules), "maps", maps, int8, n, 8, cap)
    assert whole.outputs[0].thresholds is not None
    _same(_comparable(merged), _comparable(whole))
    emb = rng.normal(size=(90, 3, 16)).astype(np.float32)
    whole, merged = _sharded_decide(tmp_path, _entry(quant_outputs={"emb": {"embedding_axis": 2}}), "emb", emb,
                                    (emb + rng.normal(0, 0.05, emb.shape)).astype(np.float32), n, 8, cap)
    assert whole.outputs[0].embedding is not None
    _same(_comparable(merged), _comparable(whole))


def test_values_with_a_target_and_labels_merge_past_the_cap(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fp32 = rng.normal(size=(200, 4, 10)).astype(np.float32)
    target = (fp32 + rng.normal(0, 0.3, fp32.shape)).astype(np.float32)
    int8 = (fp32 + rng.normal(0, 0.05, fp32.shape)).astype(np.float32)
    entry = _entry(quant_argmax_axis=1)
    for cap in (None, 30):
        whole, merged = _sharded_decide(tmp_path, entry, "y", fp32, int8, 3, 16, cap, target)
        assert whole.outputs[0].labels is not None and whole.outputs[0].fp32_vs_target is not None
        _same(_comparable(merged), _comparable(whole))


# --- real models: the bundled registry and a conv model with maps ----------------------------------------------


def _settings(registry: Path, fixtures: Path, **extra: Any) -> Settings:
    return Settings(enabled=True, registry=registry, fixtures_dir=fixtures, eps=("cpu",), regen="never",
                    bootstrap=300, **extra)


def _sharded(registry_path: Path, settings: Settings, entry_id: str, n: int, folder: Path) -> tuple[GateResult, Any]:
    """Return the unsharded result and the merged outcome of ``n`` shards of one entry."""
    registry = load_registry(registry_path)
    entry = registry.entry(entry_id)
    whole, _ = measure(prepare(registry, entry, "cpu", settings), settings)
    shard_settings = replace(settings, shard_dir=folder)
    for k in range(1, n + 1):
        outcome = shards.run_shard(registry, entry, "cpu", replace(shard_settings, shard=(k, n)))
        assert outcome.status == "pass", outcome.message
        assert f"shard {k}/{n} of {entry_id}: state written to {folder}" in outcome.message
        assert "KiB" in outcome.message or "MiB" in outcome.message  # the size is printed
    paths = sorted(folder.glob(f"{entry_id}.cpu.shard-*-of-{n}.npz"))
    assert len(paths) == n
    outcomes, _ = shards.merge_states(paths)
    assert len(outcomes) == 1
    return whole, outcomes[0]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("entry_id", ["fusion_mlp_v1", "residual_filter_v1"])
def test_merged_shards_of_the_bundled_models_are_the_unsharded_verdict(tmp_path: Path, entry_id: str, n: int
                                                                       ) -> None:
    settings = _settings(ROOT / "model" / "registry.json", ROOT / "fixtures", batch_size=32)
    whole, merged = _sharded(ROOT / "model" / "registry.json", settings, entry_id, n, tmp_path)
    assert merged.status == whole.verdict.lower() and merged.result is not None
    _same(_comparable(merged.result), _comparable(whole))
    # below the cap the rows are placed, not summed: the numbers are the same float64 values
    assert merged.result.drop == whole.drop and merged.result.interval == whole.interval
    assert merged.result.reason == whole.reason and merged.result.timing is not None


@pytest.fixture(scope="module")
def conv_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a registry holding a conv model with 4 maps of 48×48 per sample and its static QDQ sidecar."""
    root = tmp_path_factory.mktemp("conv_shards")
    model = root / "model"
    fixtures = root / "fixtures"
    model.mkdir()
    fixtures.mkdir()
    convkit.conv_chain(model / "conv.onnx", layers=3, channels=8, size=48, out_channels=4)
    crops = convkit.photo_crops(150, 48)
    convkit.quantise_qdq(model / "conv.onnx", model / "conv.int8.onnx", crops[:16])
    np.savez(fixtures / "conv.npz", image=crops)
    entry = {"id": "conv_maps", "onnx": "conv.onnx", "quant_mode": "static", "quant_calibration_set": "conv.npz",
             "soak_fixture": "conv.npz", "quant_accuracy_budget_plcc": 0.05}
    modelkit.write_registry(model / "registry.json", [modelkit.pin(entry, model)])
    return root


@pytest.mark.parametrize("cap", [None, 40], ids=["per-sample", "past-the-cap"])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_merged_shards_of_a_large_output_model_are_the_unsharded_verdict(
        conv_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, cap: int | None) -> None:
    if cap is not None:
        monkeypatch.setattr(streaming, "MAX_UNITS", cap)  # both runs: blocks of samples, summed in another order
    registry = conv_project / "model" / "registry.json"
    settings = _settings(registry, conv_project / "fixtures", batch_size=8)
    whole, merged = _sharded(registry, settings, "conv_maps", n, tmp_path)
    assert merged.result is not None and whole.outputs[0].channels == 4
    _same(_comparable(merged.result), _comparable(whole))
    # the state is per unit and channel, never per element: all N files together stay far below the outputs
    states = [shards.read_state(p) for p in tmp_path.glob("*.npz")]
    held = sum(a.nbytes for s in states for a in s.arrays.values())
    units = 150 if cap is None else cap
    rows = units * 4 * streaming.FIELDS * 8 * (1 if cap is None else n)  # past the cap every shard holds each block
    reservoir = streaming.RESERVOIR * 3 * 8 * 2 + 64 * 1024  # bounded: kept triples (and their padding), flags
    assert held <= rows + reservoir * n, held
    assert held < 150 * 4 * 48 * 48 * 4 * 2 / 2  # less than half of one copy of both models' outputs


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a folder holding the 3 shard states of fusion_mlp_v1."""
    folder = tmp_path_factory.mktemp("three")
    registry = load_registry(ROOT / "model" / "registry.json")
    settings = replace(_settings(ROOT / "model" / "registry.json", ROOT / "fixtures"), shard_dir=folder)
    for k in (1, 2, 3):
        outcome = shards.run_shard(registry, registry.entry("fusion_mlp_v1"), "cpu", replace(settings, shard=(k, 3)))
        assert outcome.status == "pass", outcome.message
    return folder


def _parts(folder: Path) -> list[Path]:
    return [folder / f"fusion_mlp_v1.cpu.shard-{k}-of-3.npz" for k in (1, 2, 3)]


def _edited(source: Path, target: Path, edit: Any) -> Path:
    state = shards.read_state(source)
    header = json.loads(json.dumps(state.header))
    edit(header)
    shards.write_state(target, header, state.arrays)
    return target


def test_a_missing_shard_is_refused_naming_it(three_shards: Path) -> None:
    one, _, three = _parts(three_shards)
    with pytest.raises(ShardError, match=r"fusion_mlp_v1 \[cpu\]: shard\(s\) 2 of 3 missing \(given: 1, 3\)"):
        shards.merge_states([one, three])


def test_a_duplicated_shard_is_refused_naming_both_files(three_shards: Path, tmp_path: Path) -> None:
    one, two, three = _parts(three_shards)
    copy = shutil.copy(two, tmp_path / "again.npz")
    with pytest.raises(ShardError, match=r"shard 2/3 is given twice: .*shard-2-of-3\.npz and .*again\.npz"):
        shards.merge_states([one, two, three, Path(copy)])


@pytest.mark.parametrize(("field", "edit"), [
    ("soak fixture sha256", lambda h: h["files"]["fixture"].update(sha256="f" * 64)),
    ("int8 sidecar sha256", lambda h: h["files"]["int8"].update(sha256="e" * 64)),
    ("option seed", lambda h: h["options"].update(seed=1)),
    ("option decision", lambda h: h["options"].update(decision="conservative")),
    ("shard count N", lambda h: h["shard"].update(n=4)),
])
def test_a_shard_of_another_run_is_refused_naming_the_field_and_both_files(three_shards: Path, tmp_path: Path,
                                                                           field: str, edit: Any) -> None:
    one, two, three = _parts(three_shards)
    other = _edited(three, tmp_path / "other.npz", edit)
    with pytest.raises(ShardError, match=rf"{field} is .* in .*shard-1-of-3\.npz and .* in .*other\.npz"):
        shards.merge_states([one, two, other])


def test_a_shard_run_with_another_seed_is_refused(three_shards: Path, tmp_path: Path) -> None:
    registry = load_registry(ROOT / "model" / "registry.json")
    settings = _settings(ROOT / "model" / "registry.json", ROOT / "fixtures", seed=7, shard=(3, 3), shard_dir=tmp_path)
    assert shards.run_shard(registry, registry.entry("fusion_mlp_v1"), "cpu", settings).status == "pass"
    one, two, _ = _parts(three_shards)
    with pytest.raises(ShardError, match=r"option seed is 0 in .* and 7 in "):
        shards.merge_states([one, two, tmp_path / "fusion_mlp_v1.cpu.shard-3-of-3.npz"])


def test_an_unknown_format_version_and_other_files_are_refused(three_shards: Path, tmp_path: Path) -> None:
    one = _parts(three_shards)[0]
    newer = _edited(one, tmp_path / "newer.npz", lambda h: h.update(version=99))
    with pytest.raises(ShardError, match=r"newer\.npz: shard state format version 99; this quantgate reads version 1"):
        shards.merge_states([newer])
    np.savez(tmp_path / "fixture.npz", features=np.zeros((3, 2)))
    with pytest.raises(ShardError, match=r"fixture\.npz: not a quantgate shard state"):
        shards.merge_states([tmp_path / "fixture.npz"])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ShardError, match=r"junk\.npz: not a quantgate shard state"):
        shards.merge_states([tmp_path / "junk.npz"])


# --- the command line and pytest ------------------------------------------------------------------------------


def test_measure_shard_then_merge_shards_prints_the_table_and_exits_like_measure(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "states"
    for k in (1, 2):
        code = main(["measure", str(ROOT / "model" / "registry.json"), "--fixtures", str(ROOT / "fixtures"), "--id",
                     "fusion_mlp_v1", "--ep", "cpu", "--regen", "never", "--bootstrap", "200", "--shard", f"{k}/2",
                     "--shard-dir", str(folder)])
        assert code == 0
        assert f"shard {k}/2 of fusion_mlp_v1: state written to {folder}" in capsys.readouterr().out
    code = main(["merge-shards", *map(str, sorted(folder.glob("*.npz"))), "--json", str(tmp_path / "merged.json")])
    out = capsys.readouterr()
    assert code == 0, out
    assert "fusion_mlp_v1" in out.out and "PASS" in out.out and "1 passed, 0 failed" in out.out
    assert "merged 2 shard state(s)" in out.err
    assert json.loads((tmp_path / "merged.json").read_text())[0]["verdict"] == "PASS"
    assert main(["merge-shards", str(sorted(folder.glob("*.npz"))[0])]) == 2
    assert "shard(s) 2 of 2 missing" in capsys.readouterr().err
    assert main(["measure", "--shard", "3/2"]) == 2
    assert "'3/2' is not K/N with 1 <= K <= N" in capsys.readouterr().err


def test_the_pytest_option_writes_state_instead_of_deciding(project: Any) -> None:
    project.write([project.add_sidecar("digits_v1")])
    result = project.run("--quantgate-shard", "2/2", "--quantgate-shard-dir", "states", "-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*shard 2/2 of digits_v1: state written to *digits_v1.cpu.shard-2-of-2.npz (*)*"])
    assert (project.root / "states" / "digits_v1.cpu.shard-2-of-2.npz").is_file()
    bad = project.run("--quantgate-shard", "0/2")
    bad.stderr.fnmatch_lines(["*quantgate: --quantgate-shard = '0/2' is invalid; allowed: K/N with 1 <= K <= N*"])


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_fixture_chunks_start_at_a_sample_of_any_part(tmp_path: Path, compressed: bool) -> None:
    from pytest_quantgate.io.soak import load_fixture

    data = np.arange(70 * 3, dtype=np.float32).reshape(70, 3)
    folder = tmp_path / "parts"
    folder.mkdir()
    save = np.savez_compressed if compressed else np.savez
    save(folder / "part-0.npz", x=data[:25])
    save(folder / "part-1.npz", x=data[25:])
    fixture = load_fixture(folder)
    for start in (0, 7, 25, 31, 69, 70):
        blocks = [block["x"] for block, _ in fixture.chunks(9, start)]
        got = np.concatenate(blocks) if blocks else np.zeros((0, 3), np.float32)
        assert np.array_equal(got, data[start:]), start
        assert all(len(b) == 9 for b in blocks[:-1])


def test_sequential_shards_merge_into_one_look_of_the_sequence(tmp_path: Path) -> None:
    """Shards run to their end; the merged state is one look: the confidence sequence's interval over every
    sample, as one run that had not stopped would compute it at the end of its fixture."""
    registry = load_registry(ROOT / "model" / "registry.json")
    entry = registry.entry("fusion_mlp_v1")
    settings = _settings(ROOT / "model" / "registry.json", ROOT / "fixtures", batch_size=32)
    _, collector = measure(prepare(registry, entry, "cpu", settings), settings)
    final_look = collector.decide("cpu", CompareOptions(bootstrap=300, decision="three-way", sequential=True))
    folder = tmp_path / "states"
    sequential = replace(settings, sequential=True, shard_dir=folder)
    for k in (1, 2, 3):
        assert shards.run_shard(registry, entry, "cpu", replace(sequential, shard=(k, 3))).status == "pass"
    (merged,), _ = shards.merge_states(sorted(folder.glob("*.npz")))
    assert merged.result is not None and merged.result.decision == "three-way"
    assert merged.result.interval == final_look.interval and merged.result.drop == final_look.drop
    assert merged.result.samples == final_look.samples == collector.samples
